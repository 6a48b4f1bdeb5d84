//! Stored flows made up for benchmarks, by the engine itself: a hundred million rows
//! through a client would take the benchmark longer than what it measures.
//!
//! Every row is distinct (its own id, time, addresses and ports), spread evenly over the
//! span asked for, with the distribution of [`row`]: 8 nodes, 20 namespaces, 400
//! workloads, one flow in ten denied by a policy, one in five UDP, one in four a reply.

use crate::{FlowRow, Store, StoreError};

/// Rows made by one statement: what the engine holds in memory while making them.
const CHUNK: u64 = 5_000_000;

/// The `i`th made-up flow at `time` (nanoseconds), as a client would insert it.
pub fn row(i: u64, time: i64) -> FlowRow {
    let src = (i * 7919) % 400;
    let dst = (i * 104_729 + 13) % 400;
    let denied = i % 10 == 0;
    let v4 = |n: u64| std::net::Ipv4Addr::new(10, 244, (n / 250) as u8, (n % 250) as u8 + 2).to_ipv6_mapped();
    FlowRow {
        time,
        node: format!("node-{}", i % 8),
        uuid: format!("{i:016x}-4a1b-9c2d-{:012x}", i * 31),
        verdict: if denied { 2 } else { 1 },
        drop_reason: if denied { "POLICY_DENIED".into() } else { String::new() },
        event_type: if denied { 3 } else { 1 },
        point: 1 + (i % 2) as i8,
        direction: 1 + (i % 2) as i8,
        is_reply: i % 4 == 3,
        ip_version: 4,
        protocol: if i % 5 == 0 { "UDP" } else { "TCP" }.into(),
        src_ip: v4(src),
        dst_ip: v4(dst),
        src_port: 32_768 + (i % 28_000) as u16,
        dst_port: PORTS[(dst % 8) as usize],
        tcp_flags: 2,
        src_namespace: format!("ns-{}", src % 20),
        src_pod: format!("app-{src}-7d9f8-{:05}", i % 3),
        src_workload: format!("app-{src}"),
        src_workload_kind: "Deployment".into(),
        src_workloads: vec![format!("ReplicaSet/app-{src}-7d9f8"), format!("Deployment/app-{src}")],
        src_labels: vec![format!("app=app-{src}"), format!("tier=t{}", src % 3)],
        src_node: format!("node-{}", src % 8),
        src_world: false,
        src_identity: src as u32,
        dst_namespace: format!("ns-{}", dst % 20),
        dst_pod: format!("app-{dst}-7d9f8-{:05}", i % 2),
        dst_workload: format!("app-{dst}"),
        dst_workload_kind: "Deployment".into(),
        dst_workloads: vec![format!("ReplicaSet/app-{dst}-7d9f8"), format!("Deployment/app-{dst}")],
        dst_labels: vec![format!("app=app-{dst}"), format!("tier=t{}", dst % 3)],
        dst_node: format!("node-{}", dst % 8),
        dst_world: false,
        dst_identity: dst as u32,
        src_service: String::new(),
        dst_service: String::new(),
        ingress_allowed_by: Vec::new(),
        egress_allowed_by: Vec::new(),
        ingress_denied_by: if denied { vec![format!("NetworkPolicy:ns-{}/default-deny", dst % 20)] } else { Vec::new() },
        egress_denied_by: Vec::new(),
        packet_length: 60,
        l4_unknown: String::new(),
    }
}

const PORTS: [u16; 8] = [80, 443, 5432, 6379, 8080, 53, 9090, 3306];

/// Makes flows `from..to` of [`row`]'s sequence in the store's flows table, flow `i` at
/// `start + i * step` nanoseconds; `progress` hears how many are made after each chunk.
pub async fn fill(store: &Store, from: u64, to: u64, start: i64, step: i64, mut progress: impl FnMut(u64)) -> Result<(), StoreError> {
    let mut at = from;
    while at < to {
        let n = CHUNK.min(to - at);
        store.execute(&fill_sql(store.database(), at, n, start, step)).await?;
        at += n;
        progress(at);
    }
    Ok(())
}

/// The statement that makes `n` rows from the `from`th: [`row`], in ClickHouse's words.
fn fill_sql(db: &str, from: u64, n: u64, start: i64, step: i64) -> String {
    let ports = PORTS.map(|p| p.to_string()).join(", ");
    let ip = |x: &str| format!("toIPv6(IPv4NumToString(toUInt32(183762944 + intDiv({x}, 250) * 256 + {x} % 250 + 2)))");
    format!(
        "INSERT INTO {db}.flows (time, node, uuid, verdict, drop_reason, event_type, point, direction, is_reply, ip_version, protocol, \
         src_ip, dst_ip, src_port, dst_port, tcp_flags, \
         src_namespace, src_pod, src_workload, src_workload_kind, src_workloads, src_labels, src_node, src_identity, \
         dst_namespace, dst_pod, dst_workload, dst_workload_kind, dst_workloads, dst_labels, dst_node, dst_identity, \
         ingress_denied_by, packet_length) \
         SELECT fromUnixTimestamp64Nano(toInt64({start}) + toInt64(i) * {step}, 'UTC'), concat('node-', toString(i % 8)), \
         concat(leftPad(lower(hex(i)), 16, '0'), '-4a1b-9c2d-', leftPad(lower(hex(i * 31)), 12, '0')), \
         if(denied, 'DROPPED', 'FORWARDED'), if(denied, 'POLICY_DENIED', ''), if(denied, 'POLICY_VERDICT', 'TRACE'), \
         if(i % 2 = 0, 'FROM_ENDPOINT', 'TO_ENDPOINT'), if(i % 2 = 0, 'INGRESS', 'EGRESS'), i % 4 = 3, 4, if(i % 5 = 0, 'UDP', 'TCP'), \
         {src_ip}, {dst_ip}, toUInt16(32768 + i % 28000), [{ports}][dst % 8 + 1], 2, \
         concat('ns-', toString(src % 20)), concat('app-', toString(src), '-7d9f8-', leftPad(toString(i % 3), 5, '0')), \
         concat('app-', toString(src)), 'Deployment', \
         [concat('ReplicaSet/app-', toString(src), '-7d9f8'), concat('Deployment/app-', toString(src))], \
         [concat('app=app-', toString(src)), concat('tier=t', toString(src % 3))], concat('node-', toString(src % 8)), toUInt32(src), \
         concat('ns-', toString(dst % 20)), concat('app-', toString(dst), '-7d9f8-', leftPad(toString(i % 2), 5, '0')), \
         concat('app-', toString(dst)), 'Deployment', \
         [concat('ReplicaSet/app-', toString(dst), '-7d9f8'), concat('Deployment/app-', toString(dst))], \
         [concat('app=app-', toString(dst)), concat('tier=t', toString(dst % 3))], concat('node-', toString(dst % 8)), toUInt32(dst), \
         if(denied, [concat('NetworkPolicy:ns-', toString(dst % 20), '/default-deny')], []), 60 \
         FROM (SELECT number AS i, (i * 7919) % 400 AS src, (i * 104729 + 13) % 400 AS dst, i % 10 = 0 AS denied \
               FROM numbers({from}, {n}))",
        src_ip = ip("src"),
        dst_ip = ip("dst"),
    )
}
