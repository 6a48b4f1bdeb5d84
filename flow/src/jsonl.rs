//! Flows as JSON lines: what `flows observe -o json` prints, and what `flows observe
//! --input-file` and `flows tui --replay` read back. One record per line, in the shape of
//! Hubble's: `{"flow": {...}, "node_name": ..., "time": ...}`, `{"lost_events": {...}}`,
//! `{"node_status": {...}}`; a bare flow object is read as a flow too. Pure functions on
//! strings: the callers own the files.

use flows_proto::{Flow, GetFlowsResponse, LostEvent, NodeStatusEvent, get_flows_response::ResponseTypes};

#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("not JSON: {source}")]
    Json { source: serde_json::Error },
    #[error("not a flow: {source}")]
    Flow { source: serde_json::Error },
    #[error("not a {kind} record: {source}")]
    Record { kind: &'static str, source: serde_json::Error },
    #[error("cannot be written as JSON: {source}")]
    Write { source: serde_json::Error },
}

/// One line read: `Ok(None)` for a blank line.
pub fn read_line(line: &str) -> Result<Option<GetFlowsResponse>, LineError> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let mut v: serde_json::Value = serde_json::from_str(line).map_err(|source| LineError::Json { source })?;
    for (key, kind) in [("lost_events", "lost_events"), ("node_status", "node_status")] {
        if v.get(key).is_some() {
            return serde_json::from_value::<GetFlowsResponse>(v)
                .map(Some)
                .map_err(|source| LineError::Record { kind, source });
        }
    }
    // `-o json` wraps the flow; its node_name and time are copies of the flow's own.
    let f = match v.get_mut("flow") {
        Some(f) => f.take(),
        None => v,
    };
    let flow: Flow = serde_json::from_value(f).map_err(|source| LineError::Flow { source })?;
    Ok(Some(GetFlowsResponse {
        time: flow.time,
        node_name: flow.node_name.clone(),
        response_types: Some(ResponseTypes::Flow(flow)),
    }))
}

/// A JSON line with the characters that would reorder or hide text on a terminal
/// (bidirectional overrides, invisible characters; serde_json escapes only control
/// characters) written as `\uXXXX` escapes: the same JSON value, safe to print. They can
/// only occur inside strings, and are all in the Basic Multilingual Plane.
fn inert(line: String) -> String {
    if !line.chars().any(crate::text::is_unsafe) {
        return line;
    }
    let mut out = String::with_capacity(line.len() + 16);
    for c in line.chars() {
        if crate::text::is_unsafe(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// A flow's line, as `flows observe -o json` prints it (without the newline).
pub fn flow_line(f: &Flow) -> Result<String, LineError> {
    let write = |source| LineError::Write { source };
    let v = serde_json::json!({
        "flow": serde_json::to_value(f).map_err(write)?,
        "node_name": f.node_name,
        "time": serde_json::to_value(f.time).map_err(write)?,
    });
    Ok(inert(v.to_string()))
}

pub fn lost_events_line(l: &LostEvent) -> Result<String, LineError> {
    let v = serde_json::to_value(l).map_err(|source| LineError::Write { source })?;
    Ok(inert(serde_json::json!({ "lost_events": v }).to_string()))
}

pub fn node_status_line(s: &NodeStatusEvent) -> Result<String, LineError> {
    let v = serde_json::to_value(s).map_err(|source| LineError::Write { source })?;
    Ok(inert(serde_json::json!({ "node_status": v }).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flows_proto::{Ip, Timestamp};

    fn flow() -> Flow {
        Flow {
            time: Some(Timestamp { seconds: 1_700_000_000, nanos: 5 }),
            node_name: "node-1".into(),
            ip: Some(Ip { source: "10.0.0.1".into(), destination: "10.0.0.2".into(), ..Default::default() }),
            ..Default::default()
        }
    }

    fn as_flow(r: Option<GetFlowsResponse>) -> Flow {
        match r.and_then(|r| r.response_types) {
            Some(ResponseTypes::Flow(f)) => f,
            other => panic!("not a flow: {other:?}"),
        }
    }

    #[test]
    fn printed_flows_read_back() {
        let f = flow();
        let line = flow_line(&f).expect("printable");
        assert!(line.starts_with("{\"flow\":"), "{line}");
        assert_eq!(as_flow(read_line(&line).expect("readable")), f);
    }

    #[test]
    fn bare_flows_and_blank_lines() {
        let bare = serde_json::to_string(&flow()).expect("json");
        assert_eq!(as_flow(read_line(&bare).expect("bare flow")), flow());
        assert!(read_line("  \t").expect("blank").is_none());
    }

    #[test]
    fn lost_events_and_node_status_are_records_not_flows() {
        let l = LostEvent { num_events_lost: 7, ..Default::default() };
        let r = read_line(&lost_events_line(&l).expect("printable")).expect("readable").expect("record");
        assert_eq!(r.response_types, Some(ResponseTypes::LostEvents(l)));
        let s = NodeStatusEvent { node_names: vec!["n".into()], message: "up".into(), ..Default::default() };
        let r = read_line(&node_status_line(&s).expect("printable")).expect("readable").expect("record");
        assert_eq!(r.response_types, Some(ResponseTypes::NodeStatus(s)));
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        assert!(matches!(read_line("{not json"), Err(LineError::Json { .. })));
        let e = read_line(r#"{"flow": {"verdict": "NO_SUCH_VERDICT"}}"#).expect_err("bad verdict");
        assert!(matches!(e, LineError::Flow { .. }), "{e}");
        let e = read_line(r#"{"lost_events": 3}"#).expect_err("bad record");
        assert!(e.to_string().starts_with("not a lost_events record"), "{e}");
    }
}
