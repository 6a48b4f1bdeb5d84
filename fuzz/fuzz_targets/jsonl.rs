//! JSON lines of flows, as `flows observe -o json` prints them and as `flows observe
//! --input-file` and `flows tui --replay` read them back: both read with
//! `flows_flow::jsonl::read_line` and print with its `*_line` writers. What a line reads as
//! is fed to the dashboard's state (`App::ingest`) and drawn (TestBackend), as the replay
//! does.
//!
//! Checked: no panic; a bad line is an error, not a record; every record read prints (the
//! printer would fail the whole output on one that does not) and reads back equal.

#![no_main]

use flows_flow::jsonl::{flow_line, lost_events_line, node_status_line, read_line};
use flows_proto::{GetFlowsResponse, get_flows_response::ResponseTypes};
use flows_tui::{state::App, view};
use libfuzzer_sys::fuzz_target;
use ratatui::{Terminal, backend::TestBackend};

const NOW_MS: u64 = 1_700_000_000_000;

/// Seconds of 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z: RFC 3339's years. A time
/// read with an offset can land outside (`0000-01-01T00:00:00+23:59` is year -1); it is
/// then printed (chrono writes `-0001-…`, `+10000-…`) but the timestamp parser refuses it.
/// That is pbjson-types/chrono, not flows, so such flows are not round-tripped here.
const RFC3339_SECONDS: std::ops::RangeInclusive<i64> = -62_167_219_200..=253_402_300_799;

fn printable_time(t: Option<&flows_proto::Timestamp>) -> bool {
    t.is_none_or(|t| RFC3339_SECONDS.contains(&t.seconds))
}

/// A record read prints as its kind's line, which reads back as the same record.
fn check(r: &GetFlowsResponse, line: &str) {
    let printed = match &r.response_types {
        Some(ResponseTypes::Flow(f)) => flow_line(f),
        Some(ResponseTypes::LostEvents(l)) => lost_events_line(l),
        Some(ResponseTypes::NodeStatus(s)) => node_status_line(s),
        // `{"lost_events": null}` reads as an empty response: nothing to print.
        None => return,
    };
    let printed = match printed {
        Ok(p) => p,
        Err(e) => panic!("a record read from a line cannot be printed: {e}\n{line}"),
    };
    if !printable_time(r.time.as_ref()) {
        return;
    }
    let back = match read_line(&printed) {
        Ok(Some(back)) => back,
        other => panic!("cannot read back what was printed ({other:?}): {printed}\n(from {line})"),
    };
    // A flow's line carries its node_name and time at the top (Hubble's shape); the other
    // records' lines do not, so only their payload is compared.
    match &r.response_types {
        Some(ResponseTypes::Flow(_)) => assert_eq!(&back, r, "printed as {printed}"),
        _ => assert_eq!(back.response_types, r.response_types, "printed as {printed}"),
    }
}

fn draw(app: &App, w: u16, h: u16) {
    // TestBackend's errors are Infallible.
    let Ok(mut t) = Terminal::new(TestBackend::new(w, h));
    let _ = t.draw(|f| view::draw(f, app, NOW_MS));
}

fuzz_target!(|data: &[u8]| {
    let mut app = App::new("replay");
    let mut n = 0;
    for line in data.split(|b| *b == b'\n') {
        // Both readers read lines as UTF-8 and stop (or fail) at one that is not.
        let Ok(line) = std::str::from_utf8(line) else { break };
        if let Ok(Some(r)) = read_line(line) {
            check(&r, line);
            app.ingest(r, NOW_MS + n);
            n += 1;
        }
    }
    if n == 0 {
        return;
    }
    let _ = app.suggestion();
    draw(&app, 100, 30);
    // The detail view of the newest flow, with its policy suggestion.
    app.scroll(1);
    app.detail = true;
    draw(&app, 60, 20);
});
