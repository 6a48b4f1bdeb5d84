//! Datapath cost per packet, measured in the kernel with BPF_PROG_TEST_RUN, as a ratio
//! to an empty TC program measured in the same run. Needs root; prints why it skips
//! otherwise. Run: `cargo bench -p flows-node-probe --bench datapath`.

use flows_node_probe::datapath::measure_packet_cost;

/// Ethernet + IPv4 + TCP header (no payload), checksums left zero: the programs do not
/// verify them.
fn tcp_packet(sport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 14 + 20 + 20];
    p[12] = 0x08; // ETH_P_IP
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 244, 1, 2]);
    ip[16..20].copy_from_slice(&[10, 244, 2, 3]);
    let tcp = &mut p[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
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
}
