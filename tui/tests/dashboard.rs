//! The dashboard without a terminal: state (aggregation, bounds, filtering, keys) and
//! rendering of each pane, the detail view and the narrow layout with ratatui's
//! TestBackend.

use flows_proto::{
    Endpoint, Flow, FlowFilter, GetFlowsResponse, Ip, Layer4, LostEvent, NodeState, NodeStatusEvent, Policy, Tcp,
    Timestamp, Verdict, Workload, get_flows_response::ResponseTypes, layer4,
};
use flows_tui::{
    state::{App, Connection, FilterParser, Key, aggregate::MAX_KEYS, on_key},
    view,
};
use ratatui::{Terminal, backend::TestBackend, buffer::Buffer};

fn pod(ns: &str, name: &str, deploy: Option<&str>) -> Endpoint {
    Endpoint {
        namespace: ns.into(),
        pod_name: name.into(),
        labels: vec![format!("app={name}")],
        workloads: deploy.map(|d| vec![Workload { name: d.into(), kind: "Deployment".into() }]).unwrap_or_default(),
        node_name: "node-1".into(),
        ..Default::default()
    }
}

fn flow(src: Endpoint, dst: Endpoint, port: u32, verdict: Verdict, t: i64) -> Flow {
    let denied = verdict == Verdict::Dropped;
    Flow {
        time: Some(Timestamp { seconds: t, nanos: 0 }),
        uuid: format!("u-{t}-{port}"),
        node_name: "node-1".into(),
        verdict: verdict as i32,
        drop_reason: if denied { "POLICY_DENIED".into() } else { String::new() },
        ip: Some(Ip { source: "10.244.1.2".into(), destination: "10.244.2.3".into(), ..Default::default() }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Tcp(Tcp { source_port: 40000, destination_port: port, flags: None })),
        }),
        ingress_denied_by: if denied {
            vec![Policy { name: "default-deny".into(), namespace: dst.namespace.clone(), kind: "NetworkPolicy".into(), labels: Vec::new() }]
        } else {
            Vec::new()
        },
        source: Some(src),
        destination: Some(dst),
        ..Default::default()
    }
}

fn as_response(f: Flow) -> GetFlowsResponse {
    GetFlowsResponse { time: f.time, node_name: f.node_name.clone(), response_types: Some(ResponseTypes::Flow(f)) }
}

/// A small stand-in for `flows observe`'s flag parser (the real one lives in the CLI,
/// which depends on this crate): `--verdict V` and `-n NS`.
fn parser() -> FilterParser {
    Box::new(|text: &str| {
        let mut f = FlowFilter::default();
        let words: Vec<&str> = text.split_whitespace().collect();
        let mut i = 0;
        while i < words.len() {
            let v = words.get(i + 1).ok_or_else(|| format!("{} needs a value", words[i]))?;
            match words[i] {
                "--verdict" => f.verdict.push(match *v {
                    "DROPPED" | "drop" => Verdict::Dropped as i32,
                    "FORWARDED" => Verdict::Forwarded as i32,
                    other => return Err(format!("unknown verdict {other}")),
                }),
                "-n" => f.source_pod.push(format!("{v}/")),
                other => return Err(format!("unknown flag {other}")),
            }
            i += 2;
        }
        Ok((if text.trim().is_empty() { Vec::new() } else { vec![f] }, Vec::new()))
    })
}

fn text(buf: &Buffer) -> String {
    let mut s = String::new();
    for y in 0..buf.area.height {
        for x in 0..buf.area.width {
            s.push_str(buf[(x, y)].symbol());
        }
        s.push('\n');
    }
    s
}

fn render(app: &App, w: u16, h: u16, now_ms: u64) -> (String, Buffer) {
    let mut t = Terminal::new(TestBackend::new(w, h)).expect("terminal");
    t.draw(|f| view::draw(f, app, now_ms)).expect("draw");
    let buf = t.backend().buffer().clone();
    (text(&buf), buf)
}

/// A cluster's worth of traffic: web → api allowed, web → db denied, world → web denied.
fn busy_app() -> App {
    let mut app = App::new("127.0.0.1:4245");
    app.connection = Connection::Connected;
    let web = || pod("shop", "web-1", Some("web"));
    let api = || pod("shop", "api-7d9-x", Some("api"));
    let db = || pod("data", "db-0", None);
    let world = || Endpoint { is_world: true, labels: vec!["reserved:world".into()], ..Default::default() };
    let base = 1_700_000_000_000u64;
    for i in 0..30 {
        app.ingest(as_response(flow(web(), api(), 8080, Verdict::Forwarded, 100 + i)), base + i as u64 * 100);
    }
    for i in 0..7 {
        app.ingest(as_response(flow(web(), db(), 5432, Verdict::Dropped, 200 + i)), base + 3_000 + i as u64 * 100);
    }
    let mut w = flow(world(), web(), 80, Verdict::Dropped, 300);
    w.ip = Some(Ip { source: "203.0.113.7".into(), destination: "10.244.1.2".into(), ..Default::default() });
    app.ingest(as_response(w), base + 4_000);
    app.ingest(
        GetFlowsResponse {
            response_types: Some(ResponseTypes::NodeStatus(NodeStatusEvent {
                state_change: NodeState::Connected as i32,
                node_names: vec!["node-1".into()],
                message: String::new(),
            })),
            ..Default::default()
        },
        base,
    );
    app.ingest(
        GetFlowsResponse {
            response_types: Some(ResponseTypes::NodeStatus(NodeStatusEvent {
                state_change: NodeState::Unavailable as i32,
                node_names: vec!["node-2".into()],
                message: String::new(),
            })),
            ..Default::default()
        },
        base,
    );
    app.ingest(
        GetFlowsResponse { response_types: Some(ResponseTypes::LostEvents(LostEvent { num_events_lost: 5, ..Default::default() })), ..Default::default() },
        base,
    );
    app
}

#[test]
fn aggregates_count_verdicts_pairs_namespaces_and_talkers() {
    let app = busy_app();
    let a = &app.aggregates;
    assert_eq!(a.total(), 38);
    assert_eq!(a.count_verdict(Verdict::Dropped), 8);
    assert_eq!(a.by_reason.get("POLICY_DENIED"), Some(&8));
    let denied = a.top_denied(5);
    assert_eq!(denied[0].0.src, "shop/web");
    assert_eq!((denied[0].0.dst.as_str(), denied[0].0.port.as_str(), denied[0].1), ("data/db-0", "5432/TCP", 7));
    assert_eq!(denied[1].0.src, "world:203.0.113.7");
    let (names, cells) = a.matrix(5);
    assert!(names.contains(&"shop".to_string()) && names.contains(&"data".to_string()));
    assert_eq!(cells.get(&("shop".into(), "shop".into())), Some(&(30, 0)));
    assert_eq!(cells.get(&("shop".into(), "data".into())), Some(&(0, 7)));
    assert_eq!(a.top_talkers(1)[0], ("shop/web".to_string(), 37));
    assert_eq!(app.lost, 5);
    assert_eq!(app.nodes_connected, ["node-1"]);
    assert_eq!(app.nodes_unavailable, ["node-2"]);
    assert!((app.dropped_share() - 8.0 / 38.0).abs() < 1e-9);
}

#[test]
fn memory_stays_bounded() {
    let mut app = App::new("x");
    for i in 0..(3 * MAX_KEYS as i64) {
        let src = pod(&format!("ns-{}", i % 50), &format!("p-{i}"), None);
        app.ingest_flow(flow(src, pod("d", "db", None), (i % 60_000) as u32 + 1, Verdict::Dropped, i), 0);
    }
    assert_eq!(app.recent.len(), flows_tui::state::RECENT);
    assert!(app.aggregates.len() <= 3 * (MAX_KEYS + 1), "{}", app.aggregates.len());
    assert_eq!(app.aggregates.total(), 3 * MAX_KEYS as u64, "counters still count everything");
}

#[test]
fn rate_is_per_second_over_whole_seconds() {
    let mut app = App::new("x");
    for i in 0..5_000u64 {
        // 1,000 a second for 5 seconds.
        app.ingest_flow(flow(pod("a", "a", None), pod("b", "b", None), 80, Verdict::Forwarded, 0), 10_000 + i);
    }
    assert_eq!(app.aggregates.rate.per_second(15_000), 1_000.0);
}

#[test]
fn filter_prompt_applies_keeps_the_previous_on_error_and_filters() {
    let parse = parser();
    let mut app = busy_app();
    on_key(&mut app, Key::Char('/'), &parse);
    for c in "--verdict drop".chars() {
        on_key(&mut app, Key::Char(c), &parse);
    }
    on_key(&mut app, Key::Enter, &parse);
    assert!(app.prompt.is_none());
    assert_eq!(app.filter.text, "--verdict drop");
    // The view starts again from the recent flows, under the new filter.
    assert_eq!(app.recent.len(), 8);
    assert_eq!(app.aggregates.total(), 8);
    app.ingest_flow(flow(pod("shop", "web-1", None), pod("shop", "api", None), 80, Verdict::Forwarded, 1), 0);
    app.ingest_flow(flow(pod("shop", "web-1", None), pod("data", "db-0", None), 5432, Verdict::Dropped, 2), 0);
    assert_eq!(app.recent.len(), 9);
    assert_eq!(app.aggregates.total(), 9);
    // Widening again brings back what the narrower filter hid.
    on_key(&mut app, Key::Char('/'), &parse);
    for _ in 0.."--verdict drop".len() {
        on_key(&mut app, Key::Backspace, &parse);
    }
    on_key(&mut app, Key::Enter, &parse);
    assert_eq!(app.recent.len(), 40);
    on_key(&mut app, Key::Char('/'), &parse);
    for c in "--verdict drop".chars() {
        on_key(&mut app, Key::Char(c), &parse);
    }
    on_key(&mut app, Key::Enter, &parse);

    // A bad filter: the error shows in place and the previous filter stays.
    on_key(&mut app, Key::Char('/'), &parse);
    for c in " --bogus".chars() {
        on_key(&mut app, Key::Char(c), &parse);
    }
    on_key(&mut app, Key::Enter, &parse);
    assert_eq!(app.prompt.as_ref().and_then(|p| p.error.clone()).as_deref(), Some("--bogus needs a value"));
    assert_eq!(app.filter.text, "--verdict drop");
    let (screen, _) = render(&app, 100, 20, 0);
    assert!(screen.contains("filter> --verdict drop --bogus  --bogus needs a value"), "{screen}");
    on_key(&mut app, Key::Esc, &parse);
    assert!(app.prompt.is_none());
}

#[test]
fn keys_pause_scroll_detail_and_quit() {
    let parse = parser();
    let mut app = busy_app();
    on_key(&mut app, Key::Char(' '), &parse);
    assert!(app.paused);
    let held = app.recent.len();
    app.ingest_flow(flow(pod("a", "a", None), pod("b", "b", None), 80, Verdict::Forwarded, 9), 0);
    assert_eq!(app.recent.len(), held, "paused: the table holds still");
    assert_eq!(app.aggregates.total(), 39, "and the counters go on");
    on_key(&mut app, Key::Up, &parse);
    on_key(&mut app, Key::Up, &parse);
    assert_eq!(app.selected, 2);
    on_key(&mut app, Key::Enter, &parse);
    assert!(app.detail);
    on_key(&mut app, Key::Esc, &parse);
    assert!(!app.detail);
    on_key(&mut app, Key::Char('q'), &parse);
    assert!(app.quit);
    let mut app = busy_app();
    on_key(&mut app, Key::Interrupt, &parse);
    assert!(app.quit);
}

#[test]
fn wide_layout_shows_every_pane() {
    let app = busy_app();
    let (screen, buf) = render(&app, 160, 40, 1_700_000_005_500);
    // Header: server, connection, nodes, rate, dropped share, lost in red.
    assert!(screen.contains("127.0.0.1:4245"), "{screen}");
    assert!(screen.contains("connected"), "{screen}");
    assert!(screen.contains("nodes 1 up, 1 down (node-2)"), "{screen}");
    assert!(screen.contains("dropped 21.1%"), "{screen}");
    let lost_at = screen.lines().nth(1).and_then(|l| l.find("lost 5")).expect("lost shown");
    assert_eq!(buf[(lost_at as u16, 1)].fg, ratatui::style::Color::Red, "lost events in red");
    // The table, newest first, verdicts coloured.
    assert!(screen.contains("TIME") && screen.contains("DESTINATION") && screen.contains("REASON"), "{screen}");
    let first_row = screen.lines().find(|l| l.contains("world:203.0.113.7")).expect("newest flow first");
    assert!(first_row.contains("DROPPED") && first_row.contains("POLICY_DENIED"), "{first_row}");
    // The panes.
    assert!(screen.contains("top denied pairs"), "{screen}");
    assert!(screen.contains("shop/web → data/db-0:5432/TCP"), "{screen}");
    assert!(screen.contains("namespaces: allowed/denied"), "{screen}");
    assert!(screen.contains("0/7"), "shop → data denied cell: {screen}");
    assert!(screen.contains("top talkers") && screen.contains("shop/web"), "{screen}");
    assert!(screen.contains("verdicts and drop reasons") && screen.contains("POLICY_DENIED 8"), "{screen}");
    assert!(screen.contains("q quit"), "help bar: {screen}");
}

#[test]
fn narrow_layout_keeps_the_table_and_denied_pairs() {
    let app = busy_app();
    let (screen, _) = render(&app, 80, 24, 0);
    assert!(screen.contains("TIME"), "{screen}");
    assert!(screen.contains("top denied pairs"), "{screen}");
    assert!(!screen.contains("top talkers"), "{screen}");
    assert!(!screen.contains("namespaces: allowed/denied"), "{screen}");
}

#[test]
fn detail_names_both_ends_and_the_policies() {
    let parse = parser();
    let mut app = busy_app();
    on_key(&mut app, Key::Char(' '), &parse);
    // Second newest: web → db, denied.
    on_key(&mut app, Key::Up, &parse);
    on_key(&mut app, Key::Enter, &parse);
    let (screen, _) = render(&app, 140, 40, 0);
    assert!(screen.contains("flow (esc: back)"), "{screen}");
    assert!(screen.contains("namespace  shop") && screen.contains("namespace  data"), "{screen}");
    assert!(screen.contains("pod        web-1") && screen.contains("pod        db-0"), "{screen}");
    assert!(screen.contains("labels     app=web-1"), "{screen}");
    assert!(screen.contains("workloads  Deployment/web"), "{screen}");
    assert!(screen.contains("ingress denied by  data/default-deny"), "{screen}");
    assert!(screen.contains("(POLICY_DENIED)"), "{screen}");
    // What `flows policy suggest` would add to allow it: an ingress rule on the db for
    // the web workload, on the port seen.
    assert!(screen.contains("to allow it, flows policy suggest would add"), "{screen}");
    let yaml = app.suggestion().expect("a suggestion for a denied flow");
    assert!(yaml.contains("name: allow-db-0") && yaml.contains("namespace: data"), "{yaml}");
    assert!(yaml.contains("kubernetes.io/metadata.name: shop") && yaml.contains("app: web-1"), "{yaml}");
    assert!(yaml.contains("port: 5432") && !yaml.contains("default-deny"), "{yaml}");
    // An allowed flow has none.
    on_key(&mut app, Key::Esc, &parse);
    for _ in 0..9 {
        on_key(&mut app, Key::Up, &parse);
    }
    assert_eq!(app.selected_flow().map(|f| f.verdict), Some(Verdict::Forwarded as i32));
    assert!(app.suggestion().is_none());
}

#[test]
fn disconnected_and_control_characters() {
    let mut app = busy_app();
    app.connection = Connection::Disconnected { error: "connection refused\u{1b}[2J".into(), retry_in_ms: 2_000 };
    let (screen, _) = render(&app, 160, 30, 0);
    assert!(screen.contains("disconnected: connection refused"), "{screen}");
    assert!(screen.contains("retry in 2.0 s"), "{screen}");
    assert!(!screen.contains('\u{1b}'), "escape sequences from data never reach the terminal");
}

#[test]
fn hostile_strings_reach_no_pane_unescaped() {
    use flows_flow::text::{HOSTILE, is_unsafe};
    let parse = parser();
    let mut app = busy_app();
    for (i, h) in HOSTILE.iter().enumerate() {
        let mut src = pod(h, h, Some(h));
        src.labels = vec![format!("app={h}"), format!("{h}=x")];
        src.node_name = h.to_string();
        let mut dst = pod(&format!("ns-{h}"), &format!("{h}-db"), None);
        dst.workloads = vec![Workload { name: h.to_string(), kind: h.to_string() }];
        let mut f = flow(src, dst, 5432, Verdict::Dropped, 400 + i as i64);
        f.node_name = h.to_string();
        f.drop_reason = h.to_string();
        f.ingress_denied_by = vec![Policy { name: h.to_string(), namespace: h.to_string(), kind: "NetworkPolicy".into(), labels: Vec::new() }];
        f.egress_allowed_by = f.ingress_denied_by.clone();
        f.destination_service = Some(flows_proto::Service { name: h.to_string(), namespace: h.to_string() });
        app.ingest(as_response(f), 1_700_000_010_000 + i as u64);
    }
    app.connection = Connection::Disconnected { error: HOSTILE.join(" "), retry_in_ms: 1_000 };
    let check = |app: &App, what: &str, w: u16, h: u16| {
        let (screen, buf) = render(app, w, h, 0);
        let bad: Vec<String> = buf.content().iter().map(|c| c.symbol()).filter(|s| s.chars().any(is_unsafe)).map(|s| format!("{s:?}")).collect();
        assert!(bad.is_empty(), "{what}: unescaped {bad:?} in\n{screen}");
        screen
    };
    let wide = check(&app, "every pane", 200, 60);
    assert!(wide.contains("\\u{202e}") || wide.contains("\\u{1b}"), "hostile text is shown, escaped:\n{wide}");
    check(&app, "narrow", 80, 30);
    // The detail view of each hostile flow (the newest first).
    on_key(&mut app, Key::Char(' '), &parse);
    for _ in 0..HOSTILE.len() {
        on_key(&mut app, Key::Enter, &parse);
        check(&app, "detail", 200, 60);
        on_key(&mut app, Key::Esc, &parse);
        on_key(&mut app, Key::Up, &parse);
    }
}
