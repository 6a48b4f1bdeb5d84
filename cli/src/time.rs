//! Times as the commands take them (`--since`, `--until`).

use anyhow::{Context, bail};
use flows_proto::Timestamp;

/// Parses `--since`/`--until`: "5m"-style durations before now, or RFC 3339.
pub fn parse_time(s: &str, now: std::time::SystemTime) -> anyhow::Result<Timestamp> {
    let s = s.trim();
    if let Ok(d) = humantime::parse_duration(s) {
        let t = now
            .checked_sub(d)
            .with_context(|| format!("{s:?} reaches before the epoch"))?;
        return Ok(flows_proto::timestamp(t));
    }
    match humantime::parse_rfc3339_weak(s) {
        Ok(t) => Ok(flows_proto::timestamp(t)),
        Err(_) => bail!(
            "invalid time {s:?}: expected a duration such as 5m or 1h30m, or RFC 3339 such as 2026-11-22T04:00:00Z"
        ),
    }
}
