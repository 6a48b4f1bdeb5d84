//! The audit: denied connection attempts over a time range, grouped by source and
//! destination workload, destination port and protocol, with counts, first and last seen,
//! the drop reasons and the policies that denied them.

use flows_proto::FlowFilter;
use serde::Serialize;

use crate::{Store, StoreError, json_u64, sql};

#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Nanoseconds since the epoch, inclusive.
    pub since: Option<i64>,
    /// Nanoseconds since the epoch, exclusive.
    pub until: Option<i64>,
    /// Verdicts that count as denied: DROPPED (2) and AUDIT (3) when empty.
    pub verdicts: Vec<i32>,
    pub allow: Vec<FlowFilter>,
    pub deny: Vec<FlowFilter>,
    /// The N largest groups (0: all).
    pub top: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRow {
    pub verdict: String,
    pub src_namespace: String,
    pub src_workload: String,
    pub src_workload_kind: String,
    pub dst_namespace: String,
    pub dst_workload: String,
    pub dst_workload_kind: String,
    pub dst_port: u16,
    pub protocol: String,
    pub flows: u64,
    /// Nanoseconds since the epoch.
    pub first_seen: i64,
    pub last_seen: i64,
    pub drop_reasons: Vec<String>,
    /// `Kind:namespace/name` of the policies that denied them.
    pub policies: Vec<String>,
}

impl AuditQuery {
    pub fn sql(&self, db: &str) -> Result<String, StoreError> {
        let verdicts = if self.verdicts.is_empty() { vec![2, 3] } else { self.verdicts.clone() };
        let names: Vec<String> = verdicts
            .iter()
            .filter_map(|v| crate::row::VERDICTS.get(*v as usize))
            .map(|s| sql::quote(s))
            .collect();
        if names.is_empty() {
            return Err(StoreError::Filter {
                message: "no valid verdict to audit".into(),
            });
        }
        let filter = sql::condition(&self.allow, &self.deny)?;
        let keys = "verdict, src_namespace, src_workload, src_workload_kind, dst_namespace, dst_workload, dst_workload_kind, dst_port, protocol";
        Ok(format!(
            "SELECT {keys}, count() AS flows, \
             toUnixTimestamp64Nano(min(time)) AS first_seen, toUnixTimestamp64Nano(max(time)) AS last_seen, \
             arraySort(groupUniqArray(drop_reason)) AS drop_reasons, \
             arraySort(groupUniqArrayArray(arrayConcat(ingress_denied_by, egress_denied_by))) AS policies \
             FROM {db}.flows \
             WHERE verdict IN ({}) AND NOT is_reply AND {} AND {filter} \
             GROUP BY {keys} \
             ORDER BY flows DESC, last_seen DESC, {keys}",
            names.join(", "),
            sql::time_range(self.since, self.until),
        ))
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

impl Store {
    pub async fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditRow>, StoreError> {
        let rows = self.bounded_json(&q.sql(self.database())?, q.top).await?;
        rows.into_iter()
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                let n = |k: &str| {
                    json_u64(&r[k]).ok_or_else(|| StoreError::Decode {
                        message: format!("audit row without {k}: {r}"),
                    })
                };
                Ok(AuditRow {
                    verdict: s("verdict"),
                    src_namespace: s("src_namespace"),
                    src_workload: s("src_workload"),
                    src_workload_kind: s("src_workload_kind"),
                    dst_namespace: s("dst_namespace"),
                    dst_workload: s("dst_workload"),
                    dst_workload_kind: s("dst_workload_kind"),
                    dst_port: u16::try_from(n("dst_port")?).unwrap_or(0),
                    protocol: s("protocol"),
                    flows: n("flows")?,
                    first_seen: n("first_seen")? as i64,
                    last_seen: n("last_seen")? as i64,
                    drop_reasons: strings(&r["drop_reasons"]),
                    policies: strings(&r["policies"]),
                })
            })
            .collect()
    }
}
