//! Datapath cost per packet, measured in the kernel with BPF_PROG_TEST_RUN, as a ratio
//! to an empty TC program measured in the same run. Needs root; prints why it skips
//! otherwise. Run: `cargo bench -p flows-node-probe --bench datapath`.

use flows_node_probe::datapath::{
    PROG_BENCH_NOP, PROG_TO_ENDPOINT, TestHarness, measure_packet_cost,
};
use flows_policy::{
    PodInfo,
    compile::{IdentityAllocator, Mode, NodeView, SetTable, compile_datapath},
    synthetic,
};

/// Ethernet + IPv4 + TCP header (no payload), checksums left zero: the programs do not
/// verify them.
fn tcp_packet(sport: u16, flags: u8) -> Vec<u8> {
    tcp_between([10, 244, 1, 2], [10, 244, 2, 3], sport, 80, flags)
}

fn tcp_between(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 14 + 20 + 20];
    p[12] = 0x08; // ETH_P_IP
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let tcp = &mut p[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    p
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("datapath bench skipped: BPF_PROG_TEST_RUN needs root");
        return;
    }
    let syns = 20_000;
    let repeat = 1_000_000;
    let established = tcp_packet(9, 0x10);
    match measure_packet_cost(|sport| tcp_packet(sport, 0x02), &established, syns, repeat) {
        Ok(c) => {
            println!("datapath cost per packet (BPF_PROG_TEST_RUN, mean ns)");
            println!(
                "  empty program, repeated:        {:>8.1} ns  (baseline)",
                c.nop_ns
            );
            println!(
                "  established packet, repeated:   {:>8.1} ns  = {:.2}x baseline",
                c.established_ns,
                c.established_ns / c.nop_ns
            );
            println!(
                "  empty program, one per syscall: {:>8.1} ns  (baseline for SYN)",
                c.nop_single_ns
            );
            println!(
                "  new SYN, one per syscall:       {:>8.1} ns  = {:.2}x baseline",
                c.syn_ns,
                c.syn_ns / c.nop_single_ns
            );
        }
        Err(e) => {
            eprintln!("datapath bench failed: {e}");
            std::process::exit(1);
        }
    }
    if let Err(e) = policy_cost() {
        eprintln!("policy bench failed: {e}");
        std::process::exit(1);
    }
}

fn octets(ip: std::net::IpAddr) -> [u8; 4] {
    match ip {
        std::net::IpAddr::V4(a) => a.octets(),
        std::net::IpAddr::V6(_) => [0; 4],
    }
}

/// A new connection into a local pod, decided by the to-endpoint program, with a
/// 10,000-pod, 1,000-policy cluster compiled into the maps, against the empty program.
fn policy_cost() -> Result<(), Box<dyn std::error::Error>> {
    let (cluster, policies) = synthetic::cluster(100, 100, 10, 100);
    let engine = flows_policy::Engine::new(policies);
    let is_local = |p: &PodInfo| p.node.as_deref() == Some("node-0");
    let mode_of = |_: &str| Mode::Enforce;
    let state = compile_datapath(
        &cluster,
        &engine,
        &NodeView {
            is_local: &is_local,
            mode_of: &mode_of,
        },
        &mut IdentityAllocator::new(),
        SetTable::new(),
    );
    let sizes = (state.ipcache.len(), state.endpoints.len(), state.policy.len());
    let mut h = TestHarness::new()?;
    let t = std::time::Instant::now();
    let update = h.apply_policy(state)?;
    let load = t.elapsed();
    // (see synthetic::cluster) ns-99/pod-1 (number 9901) is on node-0, app-1, http 8081:
    // pol-1 admits tier=front pods of its namespace there. ns-99/pod-2 (front, remote)
    // is allowed; ns-99/pod-3 (back, remote) is denied; ns-98/pod-2 (front, on node-0,
    // another namespace) is denied with both sides decided here.
    let dst = octets(synthetic::pod_ip(9901));
    let allowed_src = octets(synthetic::pod_ip(9902));
    let denied_src = octets(synthetic::pod_ip(9903));
    let local_src = octets(synthetic::pod_ip(9802));
    let n: u16 = 20_000;
    let (mut nop, mut allowed_ns, mut denied_ns, mut local_ns) = (0.0, 0.0, 0.0, 0.0);
    let mut verdicts = [[0usize; 3]; 3];
    for i in 0..n {
        let a = tcp_between(allowed_src, dst, 20_000 + i, 8081, 0x02);
        let b = tcp_between(denied_src, dst, 20_000 + i, 8081, 0x02);
        let c = tcp_between(local_src, dst, 20_000 + i, 8081, 0x02);
        nop += h.run_timed(PROG_BENCH_NOP, &a)?.1;
        for (k, (pkt, total)) in [(&a, &mut allowed_ns), (&b, &mut denied_ns), (&c, &mut local_ns)]
            .into_iter()
            .enumerate()
        {
            let (v, ns) = h.run_timed(PROG_TO_ENDPOINT, pkt)?;
            *total += ns;
            verdicts[k][(v as usize).min(2)] += 1;
        }
    }
    let n = n as f64;
    let _ = h.events();
    // A packet whose ports cannot be read (GRE here), into the same pod from a denied
    // source: decided with the protocol of unknown L4. First packets of new such
    // attempts (one per IP protocol number: the attempt's key), then one repeated.
    let protos: Vec<u8> = (140..=252).collect();
    let (mut nop_u, mut new_u, mut rep_u) = (0.0, 0.0, 0.0);
    let mut unknown_dropped = 0;
    for &proto in &protos {
        let mut pkt = tcp_between(denied_src, dst, 1, 1, 0);
        pkt[23] = proto;
        nop_u += h.run_timed(PROG_BENCH_NOP, &pkt)?.1;
        let (v, ns) = h.run_timed(PROG_TO_ENDPOINT, &pkt)?;
        new_u += ns;
        unknown_dropped += usize::from(v == 2);
    }
    let gre = {
        let mut p = tcp_between(denied_src, dst, 1, 1, 0);
        p[23] = 47;
        p
    };
    let reps = 20_000;
    let mut nop_r = 0.0;
    for _ in 0..reps {
        rep_u += h.run_timed(PROG_TO_ENDPOINT, &gre)?.1;
        nop_r += h.run_timed(PROG_BENCH_NOP, &gre)?.1;
    }
    let _ = h.events();
    println!(
        "\npolicy in the datapath: 10,000 pods, 1,000 policies; this node: {} ipcache, {} endpoints, {} policy entries (map load {:.0} ms, {} writes)",
        sizes.0, sizes.1, sizes.2, load.as_secs_f64() * 1e3, update.written
    );
    println!("  empty program, one per syscall:       {:>8.1} ns  (baseline)", nop / n);
    println!(
        "  new connection, remote pod, allowed:  {:>8.1} ns  = {:.2}x baseline",
        allowed_ns / n,
        allowed_ns / nop
    );
    println!(
        "  new connection, remote pod, denied:   {:>8.1} ns  = {:.2}x baseline",
        denied_ns / n,
        denied_ns / nop
    );
    println!(
        "  new connection, same-node pod:        {:>8.1} ns  = {:.2}x baseline (both sides decided)",
        local_ns / n,
        local_ns / nop
    );
    println!(
        "  verdicts (passed/dropped): allowed {}/{}, denied {}/{}, same-node {}/{}",
        verdicts[0][0], verdicts[0][2], verdicts[1][0], verdicts[1][2], verdicts[2][0], verdicts[2][2]
    );
    let k = protos.len() as f64;
    println!(
        "  unreadable ports (GRE etc.), denied pod, new attempt: {:>8.1} ns  = {:.2}x baseline ({} of {} dropped)",
        new_u / k,
        new_u / nop_u,
        unknown_dropped,
        protos.len()
    );
    println!(
        "  unreadable ports, denied pod, repeated:            {:>8.1} ns  = {:.2}x baseline",
        rep_u / reps as f64,
        rep_u / nop_r
    );
    Ok(())
}
