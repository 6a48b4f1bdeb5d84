//! What makes a `GetFlowsRequest` valid, decided in one place for every server of the
//! Observer API (node-probe and relay): its filters, its time window, and the flags
//! that cannot be combined.

use flows_proto::{GetFlowsRequest, Timestamp, timestamp_nanos};

use crate::{FilterError, FilterSet};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("`first` and `follow` cannot be combined")]
    FirstAndFollow,
    #[error("`{field}`: nanos {nanos} out of range (0 to 999,999,999)")]
    Nanos { field: &'static str, nanos: i32 },
    #[error("`since` is after `until`")]
    SinceAfterUntil,
}

/// A request's time window, in nanoseconds since the epoch: from `since` (included) to
/// `until` (excluded), as the store reads it too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub since: Option<i64>,
    pub until: Option<i64>,
}

impl Window {
    pub fn contains(&self, ns: i64) -> bool {
        self.since.is_none_or(|s| ns >= s) && self.until.is_none_or(|u| ns < u)
    }

    /// Whether `ns` is at or after the window's end (a reader following in time order
    /// can stop there).
    pub fn is_past(&self, ns: i64) -> bool {
        self.until.is_some_and(|u| ns >= u)
    }
}

/// A request that passed [`validate`]: its filters built once, its window.
#[derive(Debug)]
pub struct Valid {
    pub filters: FilterSet,
    pub window: Window,
}

/// Checks a request as every server must before it reads anything.
pub fn validate(req: &GetFlowsRequest) -> Result<Valid, RequestError> {
    let filters = FilterSet::new(&req.allow_list, &req.deny_list)?;
    if req.first && req.follow {
        return Err(RequestError::FirstAndFollow);
    }
    let since = checked("since", &req.since)?;
    let until = checked("until", &req.until)?;
    if let (Some(s), Some(u)) = (since, until) {
        if s > u {
            return Err(RequestError::SinceAfterUntil);
        }
    }
    Ok(Valid {
        filters,
        window: Window { since, until },
    })
}

fn checked(field: &'static str, t: &Option<Timestamp>) -> Result<Option<i64>, RequestError> {
    match t {
        None => Ok(None),
        Some(t) if !(0..1_000_000_000).contains(&t.nanos) => Err(RequestError::Nanos { field, nanos: t.nanos }),
        Some(t) => Ok(Some(timestamp_nanos(t))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flows_proto::FlowFilter;

    fn at(seconds: i64, nanos: i32) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos })
    }

    #[test]
    fn bad_requests_are_named() {
        let ok = GetFlowsRequest { since: at(10, 0), until: at(10, 0), ..Default::default() };
        assert_eq!(validate(&ok).expect("valid").window, Window { since: Some(10_000_000_000), until: Some(10_000_000_000) });
        let cases = [
            (GetFlowsRequest { first: true, follow: true, ..Default::default() }, RequestError::FirstAndFollow),
            (GetFlowsRequest { since: at(11, 0), until: at(10, 0), ..Default::default() }, RequestError::SinceAfterUntil),
            (GetFlowsRequest { until: at(1, -1), ..Default::default() }, RequestError::Nanos { field: "until", nanos: -1 }),
            // The second timestamp is checked too, not only the first present.
            (GetFlowsRequest { since: at(1, 0), until: at(2, 1_000_000_000), ..Default::default() }, RequestError::Nanos { field: "until", nanos: 1_000_000_000 }),
        ];
        for (req, want) in cases {
            assert_eq!(validate(&req).expect_err("invalid"), want);
        }
        let bad = GetFlowsRequest { allow_list: vec![FlowFilter { source_ip: vec!["nope".into()], ..Default::default() }], ..Default::default() };
        assert!(matches!(validate(&bad), Err(RequestError::Filter(_))));
        // Far ends saturate instead of overflowing.
        let far = GetFlowsRequest { since: at(i64::MIN, 0), until: at(i64::MAX, 999_999_999), ..Default::default() };
        assert_eq!(validate(&far).expect("valid").window, Window { since: Some(i64::MIN), until: Some(i64::MAX) });
    }
}
