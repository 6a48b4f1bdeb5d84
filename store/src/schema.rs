//! The schema, as versioned migrations applied on start, and retention.
//!
//! `flows` keeps every flow (MergeTree, a partition a day, ordered for the audit: verdict,
//! hour, then destination and source workloads). `flows_1m` and `flows_1h` are rollups fed
//! by materialized views: counts with first and last seen per verdict, drop reason,
//! protocol, destination port and workload pair, without addresses, source ports or
//! replies (the long tail), each with its own retention.

/// How long each table keeps its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub raw_days: u32,
    pub minute_days: u32,
    pub hour_days: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            raw_days: 7,
            minute_days: 30,
            hour_days: 365,
        }
    }
}

const VERDICT: &str = "Enum8('UNKNOWN' = 0, 'FORWARDED' = 1, 'DROPPED' = 2, 'AUDIT' = 3, 'ERROR' = 4)";

fn side_columns(p: &str) -> String {
    format!(
        "{p}_namespace LowCardinality(String), {p}_pod String, {p}_workload LowCardinality(String), \
         {p}_workload_kind LowCardinality(String), {p}_workloads Array(LowCardinality(String)), \
         {p}_labels Array(LowCardinality(String)), {p}_node LowCardinality(String), {p}_world Bool, \
         {p}_identity UInt32"
    )
}

fn flows_table(db: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {db}.flows (\
         time DateTime64(9, 'UTC') CODEC(Delta, ZSTD(1)), \
         node LowCardinality(String), \
         uuid String CODEC(ZSTD(1)), \
         verdict {VERDICT}, \
         drop_reason LowCardinality(String), \
         event_type Enum8('UNKNOWN' = 0, 'TRACE' = 1, 'DROP' = 2, 'POLICY_VERDICT' = 3), \
         point Enum8('UNKNOWN' = 0, 'FROM_ENDPOINT' = 1, 'TO_ENDPOINT' = 2, 'KERNEL_DROP' = 3, 'TO_NETWORK' = 4), \
         direction Enum8('UNKNOWN' = 0, 'INGRESS' = 1, 'EGRESS' = 2), \
         is_reply Bool, \
         ip_version UInt8, \
         protocol LowCardinality(String), \
         src_ip IPv6, dst_ip IPv6, \
         src_port UInt16, dst_port UInt16, tcp_flags UInt8, \
         {}, {}, \
         src_service LowCardinality(String), dst_service LowCardinality(String), \
         ingress_allowed_by Array(LowCardinality(String)), egress_allowed_by Array(LowCardinality(String)), \
         ingress_denied_by Array(LowCardinality(String)), egress_denied_by Array(LowCardinality(String)), \
         packet_length UInt32\
         ) ENGINE = MergeTree \
         PARTITION BY toDate(time) \
         ORDER BY (verdict, toStartOfHour(time), dst_namespace, dst_workload, src_namespace, src_workload, time)",
        side_columns("src"),
        side_columns("dst")
    )
}

fn rollup_table(db: &str, name: &str, bucket: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {db}.{name} (\
         {bucket} DateTime('UTC'), \
         verdict {VERDICT}, \
         drop_reason LowCardinality(String), \
         protocol LowCardinality(String), \
         dst_port UInt16, \
         src_namespace LowCardinality(String), src_workload LowCardinality(String), src_workload_kind LowCardinality(String), \
         dst_namespace LowCardinality(String), dst_workload LowCardinality(String), dst_workload_kind LowCardinality(String), \
         flows SimpleAggregateFunction(sum, UInt64), \
         first_seen SimpleAggregateFunction(min, DateTime64(9, 'UTC')), \
         last_seen SimpleAggregateFunction(max, DateTime64(9, 'UTC'))\
         ) ENGINE = AggregatingMergeTree \
         PARTITION BY toDate({bucket}) \
         ORDER BY (verdict, {bucket}, dst_namespace, dst_workload, src_namespace, src_workload, dst_port, protocol, drop_reason, src_workload_kind, dst_workload_kind)"
    )
}

fn rollup_view(db: &str, name: &str, bucket: &str, func: &str) -> String {
    // World addresses and unannotated ones fold into one name each.
    let fold = |p: &str| {
        format!(
            "multiIf({p}_workload_kind = 'world', 'world', {p}_workload_kind = '', 'unknown', {p}_workload) AS {p}_workload"
        )
    };
    format!(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{name}_mv TO {db}.{name} AS SELECT \
         {func}(time) AS {bucket}, verdict, drop_reason, protocol, dst_port, \
         src_namespace, {}, src_workload_kind, dst_namespace, {}, dst_workload_kind, \
         count() AS flows, min(time) AS first_seen, max(time) AS last_seen \
         FROM {db}.flows WHERE NOT is_reply \
         GROUP BY {bucket}, verdict, drop_reason, protocol, dst_port, src_namespace, src_workload, src_workload_kind, \
         dst_namespace, dst_workload, dst_workload_kind",
        fold("src"),
        fold("dst")
    )
}

/// Every migration, in order: (version, statements). Applied ones are never changed;
/// a change of schema is a new version.
pub fn migrations(db: &str) -> Vec<(u32, Vec<String>)> {
    vec![
        (
            1,
            vec![
                flows_table(db),
                rollup_table(db, "flows_1m", "minute"),
                rollup_view(db, "flows_1m", "minute", "toStartOfMinute"),
                rollup_table(db, "flows_1h", "hour"),
                rollup_view(db, "flows_1h", "hour", "toStartOfHour"),
            ],
        ),
        (
            // A batch retried after an answer was lost (the server died after its commit)
            // is recognised by its deduplication token and written once, in the rollups
            // too (inserts set deduplicate_blocks_in_dependent_materialized_views).
            2,
            ["flows", "flows_1m", "flows_1h"]
                .iter()
                .map(|t| format!("ALTER TABLE {db}.{t} MODIFY SETTING non_replicated_deduplication_window = {DEDUP_WINDOW}"))
                .collect(),
        ),
        (
            // Why a flow's ports are unknown (the flow's l4_unknown reason; empty when
            // they are known); `protocol` then names the IP protocol. Last column, as
            // FlowRow's field order requires.
            3,
            vec![format!(
                "ALTER TABLE {db}.flows ADD COLUMN IF NOT EXISTS l4_unknown LowCardinality(String) DEFAULT ''"
            )],
        ),
    ]
}

/// The newest schema version this build knows (the last of [`migrations`]).
pub const LATEST: u32 = 3;

/// How many recent insert blocks `flows` remembers for deduplication.
pub const DEDUP_WINDOW: u32 = 1000;

pub fn bootstrap(db: &str) -> Vec<String> {
    vec![
        format!("CREATE DATABASE IF NOT EXISTS {db}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version UInt32, applied DateTime DEFAULT now()) \
             ENGINE = MergeTree ORDER BY version"
        ),
    ]
}

/// Retention as TTL clauses, per table: (table, days, statement). Applied on start when
/// the table's TTL differs; ClickHouse then rewrites existing parts in the background.
pub fn retention(db: &str, r: Retention) -> Vec<(&'static str, u32, String)> {
    vec![
        (
            "flows",
            r.raw_days,
            format!("ALTER TABLE {db}.flows MODIFY TTL toDateTime(time) + INTERVAL {} DAY", r.raw_days),
        ),
        (
            "flows_1m",
            r.minute_days,
            format!("ALTER TABLE {db}.flows_1m MODIFY TTL minute + INTERVAL {} DAY", r.minute_days),
        ),
        (
            "flows_1h",
            r.hour_days,
            format!("ALTER TABLE {db}.flows_1h MODIFY TTL hour + INTERVAL {} DAY", r.hour_days),
        ),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn latest_is_the_last_migration() {
        let versions: Vec<u32> = super::migrations("db").iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, (1..=super::LATEST).collect::<Vec<_>>(), "versions are 1..=LATEST, in order");
    }
}
