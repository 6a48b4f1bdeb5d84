//! Connection attempts grouped by every input of a policy decision (both parties'
//! namespace, pod, labels, workload and address; protocol and destination port) and by
//! recorded outcome: the history that policy advice and what-if checks replay.
//!
//! Each attempt is counted once, from the record that saw its outcome:
//! - to a pod: the record at the destination (INGRESS), or the source's record when it
//!   was stopped there (a non-forwarded EGRESS record);
//! - to an address that is no pod (the world, a node): the source's record.
//!
//! Records towards a service address are left out: the destination pod's record of the
//! same attempt carries the translated address and port, which is what policy sees.
//! Replies and drops that are not policy's (kernel drop reasons) are left out too.
//!
//! An attempt is marked refused when its destination had nothing listening: the kernel
//! dropped it for want of a socket (NO_SOCKET), or a TCP reply reset it without ever
//! answering SYN-ACK. Refusals are told by their 5-tuple within the same window, so an
//! attempt that reuses the exact tuple of a refused one in the window counts as refused.

use std::net::{IpAddr, Ipv6Addr};

use flows_proto::FlowFilter;

use crate::{Store, StoreError, json_u64, sql};

#[derive(Debug, Clone, Default)]
pub struct AttemptQuery {
    /// Nanoseconds since the epoch, inclusive.
    pub since: Option<i64>,
    /// Nanoseconds since the epoch, exclusive.
    pub until: Option<i64>,
    pub allow: Vec<FlowFilter>,
    pub deny: Vec<FlowFilter>,
}

/// One side of a group of attempts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AttemptSide {
    pub namespace: String,
    pub pod: String,
    /// `key=value` (and `reserved:...` for the world and nodes).
    pub labels: Vec<String>,
    pub workload: String,
    pub workload_kind: String,
    pub ip: Option<IpAddr>,
    pub world: bool,
}

impl AttemptSide {
    pub fn is_host(&self) -> bool {
        self.labels.iter().any(|l| l == "reserved:host")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRow {
    /// FORWARDED, DROPPED or AUDIT.
    pub verdict: String,
    pub src: AttemptSide,
    pub dst: AttemptSide,
    /// TCP, UDP, SCTP, ICMPv4, ICMPv6.
    pub protocol: String,
    /// 0 for ICMP.
    pub port: u16,
    pub flows: u64,
    pub first_seen: i64,
    pub last_seen: i64,
    /// Nothing listened: the destination refused every attempt of the group.
    pub refused: bool,
}

const SIDE: [&str; 7] = ["namespace", "pod", "labels", "workload", "workload_kind", "world", "ip"];

impl AttemptQuery {
    pub fn sql(&self, db: &str) -> Result<String, StoreError> {
        let filter = sql::condition(&self.allow, &self.deny)?;
        let cols: Vec<String> = ["src", "dst"]
            .iter()
            .flat_map(|p| SIDE.iter().map(move |c| format!("{p}_{c}")))
            .collect();
        let keys = format!("verdict, protocol, port, ip_version, refused, {}", cols.join(", "));
        let range = sql::time_range(self.since, self.until);
        // Tuples their destination refused: a kernel drop for want of a socket, or a TCP
        // reply that reset the tuple and never carried SYN-ACK.
        let refusals = format!(
            "SELECT src_ip, src_port, dst_ip, dst_port, protocol FROM {db}.flows \
             WHERE {range} AND verdict = 'DROPPED' AND drop_reason = 'NO_SOCKET' \
             UNION ALL \
             SELECT dst_ip, dst_port, src_ip, src_port, protocol FROM {db}.flows \
             WHERE {range} AND is_reply AND protocol = 'TCP' \
             GROUP BY src_ip, src_port, dst_ip, dst_port, protocol \
             HAVING max(bitAnd(tcp_flags, 4)) > 0 AND max(bitAnd(tcp_flags, 18) = 18) = 0"
        );
        Ok(format!(
            "SELECT {keys}, count() AS flows, \
             toUnixTimestamp64Nano(min(time)) AS first_seen, toUnixTimestamp64Nano(max(time)) AS last_seen \
             FROM (SELECT *, if(protocol IN ('ICMPv4', 'ICMPv6'), 0, dst_port) AS port, \
             verdict != 'DROPPED' AND (src_ip, src_port, dst_ip, dst_port, protocol) IN ({refusals}) AS refused \
             FROM {db}.flows \
             WHERE NOT is_reply AND {range} AND {filter} \
             AND (verdict IN ('FORWARDED', 'AUDIT') OR (verdict = 'DROPPED' AND drop_reason = 'POLICY_DENIED')) \
             AND ((dst_pod != '' AND (direction = 'INGRESS' OR verdict != 'FORWARDED')) OR (dst_pod = '' AND dst_service = ''))) \
             GROUP BY {keys} \
             ORDER BY {keys}"
        ))
    }
}

impl AttemptSide {
    fn into_proto(self) -> flows_proto::AttemptParty {
        flows_proto::AttemptParty {
            namespace: self.namespace,
            pod_name: self.pod,
            labels: self.labels,
            workload: self.workload,
            workload_kind: self.workload_kind,
            ip: self.ip.map(|i| i.to_string()).unwrap_or_default(),
            is_world: self.world,
        }
    }
}

impl AttemptRow {
    /// The History API's form.
    pub fn into_proto(self) -> flows_proto::AttemptGroup {
        let ts = flows_proto::timestamp_from_nanos;
        flows_proto::AttemptGroup {
            source: Some(self.src.into_proto()),
            destination: Some(self.dst.into_proto()),
            destination_port: u32::from(self.port),
            verdict: match self.verdict.as_str() {
                "FORWARDED" => flows_proto::Verdict::Forwarded,
                "DROPPED" => flows_proto::Verdict::Dropped,
                "AUDIT" => flows_proto::Verdict::Audit,
                _ => flows_proto::Verdict::Unspecified,
            } as i32,
            protocol: self.protocol,
            flows: self.flows,
            first_seen: Some(ts(self.first_seen)),
            last_seen: Some(ts(self.last_seen)),
            refused: self.refused,
        }
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

fn ip(v: &serde_json::Value, version: u64) -> Option<IpAddr> {
    let a: Ipv6Addr = v.as_str()?.parse().ok()?;
    if a.is_unspecified() {
        return None;
    }
    Some(match (version, a.to_ipv4_mapped()) {
        (4, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(a),
    })
}

fn side(r: &serde_json::Value, p: &str, version: u64) -> AttemptSide {
    let s = |k: &str| r[format!("{p}_{k}")].as_str().unwrap_or_default().to_string();
    AttemptSide {
        namespace: s("namespace"),
        pod: s("pod"),
        labels: strings(&r[format!("{p}_labels")]),
        workload: s("workload"),
        workload_kind: s("workload_kind"),
        ip: ip(&r[format!("{p}_ip")], version),
        world: r[format!("{p}_world")].as_bool().unwrap_or(false) || r[format!("{p}_world")].as_u64() == Some(1),
    }
}

impl Store {
    pub async fn attempts(&self, q: &AttemptQuery) -> Result<Vec<AttemptRow>, StoreError> {
        let rows = self.bounded_json(&q.sql(self.database())?, 0).await?;
        rows.into_iter()
            .map(|r| {
                let n = |k: &str| {
                    json_u64(&r[k]).ok_or_else(|| StoreError::Decode {
                        message: format!("attempt row without {k}: {r}"),
                    })
                };
                let version = n("ip_version")?;
                Ok(AttemptRow {
                    verdict: r["verdict"].as_str().unwrap_or_default().to_string(),
                    src: side(&r, "src", version),
                    dst: side(&r, "dst", version),
                    protocol: r["protocol"].as_str().unwrap_or_default().to_string(),
                    port: u16::try_from(n("port")?).unwrap_or(0),
                    flows: n("flows")?,
                    first_seen: n("first_seen")? as i64,
                    last_seen: n("last_seen")? as i64,
                    refused: r["refused"].as_bool().unwrap_or(false) || json_u64(&r["refused"]) == Some(1),
                })
            })
            .collect()
    }
}
