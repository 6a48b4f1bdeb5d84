//! JSON lines of flows, as `flows observe -o json` prints them and as `flows observe
//! --input-file` and `flows tui --replay` read them back.
//!
//! - The TUI's reader is a library function: `flows_tui::source::parse_line`; what it
//!   returns is fed to the dashboard's state (`App::ingest`) and drawn (TestBackend), as
//!   the replay does.
//! - The CLI's reader lives in the `flows` binary (cli/src/observe.rs, `from_file`), out
//!   of reach of a fuzz target; `cli_read` below is its parsing step verbatim over the
//!   library it calls (serde_json + the pbjson serde of flows_proto::Flow), and
//!   `cli_print` is `Printer::flow`'s JSON form (cli/src/printer.rs).
//!
//! Checked: no panic; a line either reader accepts prints (the CLI's json! would panic on
//! a flow that does not serialise) and reads back equal; the TUI's response round-trips.

#![no_main]

use flows_proto::{Flow, GetFlowsResponse};
use flows_tui::{source::parse_line, state::App, view};
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

/// cli/src/observe.rs: `{"flow": {...}}` records and bare flows.
fn cli_read(line: &str) -> Option<Flow> {
    if line.trim().is_empty() {
        return None;
    }
    serde_json::from_str::<serde_json::Value>(line)
        .map_err(|e| e.to_string())
        .and_then(|v| {
            let f = v.get("flow").cloned().unwrap_or(v);
            serde_json::from_value::<Flow>(f).map_err(|e| e.to_string())
        })
        .ok()
}

/// cli/src/printer.rs, Format::Json — with the error json! would unwrap returned instead.
fn cli_print(f: &Flow) -> Result<String, serde_json::Error> {
    let v = serde_json::json!({
        "flow": serde_json::to_value(f)?,
        "node_name": f.node_name,
        "time": serde_json::to_value(f.time)?,
    });
    Ok(v.to_string())
}

fn check_cli(line: &str) {
    let Some(f) = cli_read(line) else { return };
    let printed = match cli_print(&f) {
        Ok(p) => p,
        Err(e) => panic!("`flows observe -o json` cannot print a flow it read: {e}\n{line}"),
    };
    if !printable_time(f.time.as_ref()) {
        return;
    }
    match cli_read(&printed) {
        Some(back) => assert_eq!(back, f, "printed as {printed}"),
        None => panic!("`flows observe --input-file` cannot read what it printed: {printed}\n(from {line})"),
    }
}

fn check_tui(r: &GetFlowsResponse, line: &str) {
    let text = match serde_json::to_string(r) {
        Ok(t) => t,
        Err(e) => panic!("a response read from a line does not serialise: {e}\n{line}"),
    };
    // A line naming node_status or lost_events as null reads as an empty response; it
    // writes back as `{}`, which is a (default) bare flow: nothing to compare.
    if r.response_types.is_none() || !printable_time(r.time.as_ref()) {
        return;
    }
    match parse_line(&text) {
        Some(back) => assert_eq!(&back, r, "written back as {text}"),
        None => panic!("the replay cannot read back {text}\n(from {line})"),
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
        check_cli(line);
        if let Some(r) = parse_line(line) {
            check_tui(&r, line);
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
