//! Flow filters: `flows_flow::FilterSet::new` from FlowFilter messages as a GetFlows
//! request brings them (node-probe and relay compile whatever a client sends), the
//! kubectl label-selector parser (`flows_flow::selector`), and the relay's split of a
//! filter between node and relay (`enrich::node_side`), each then matched on flows.
//!
//! The input is either a protobuf GetFlowsRequest (first byte even: the wire path) or a
//! structured one (odd) whose strings come from per-field vocabularies or the fuzzer.
//!
//! Checked: no panic, and no hang (the run's -timeout); a set matches a flow exactly when
//! some allow filter alone does (or there is none) and no deny filter alone does; the node
//! side compiles whenever the full filter does, never drops a flow the full filter wants
//! after annotation, and when `exact` decides the same; a node-name glob decides as a
//! reference matcher; a selector that parses, written back in kubectl syntax, parses to
//! the same requirements.

#![no_main]

use std::{collections::BTreeMap, net::IpAddr};

use arbitrary::{Arbitrary, Unstructured};
use flows_flow::{
    FilterSet,
    enrich::{EndpointGetter, ServiceGetter, annotate, node_side},
    selector::{LabelSelector, Req},
};
use flows_proto::{
    Endpoint, Flow, FlowFilter, GetFlowsRequest, Ip, Layer4, Service, Tcp, TcpFlags, Workload, layer4,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const IPS: &[&str] = &[
    "10.244.1.2", "10.244.2.3", "10.244.0.0/16", "10.0.0.0/8", "0.0.0.0/0", "::/0", "fd00::1",
    "fd00::/8", "10.244.1.2/32", "10.244.1.0/33", "10.0.0.300", "::ffff:10.244.1.2", "",
];
const PORTS: &[&str] = &["80", "70-90", "0-65535", "5432", "65536", "9-1", " 80 ", "1-", "-"];
const SELECTORS: &[&str] = &[
    "app=web", "app in (a,b),!tier", "app==web", "env!=prod", "team", "k8s-app notin (kube-dns)",
    "app=web,tier in (front, edge)", "a in (", "a,,b", "bad key=1", "", "app in ()",
];
const PODS: &[&str] = &["frontend/web", "web", "db/", "/", "frontend/", "postgres-0"];
const NAMESPACES: &[&str] = &["frontend", "db", "", "kube-system"];
const WORKLOADS: &[&str] = &["api", "Deployment/api", "replicaset/api-5d8f", "/", "StatefulSet/"];
const PROTOCOLS: &[&str] = &["tcp", "UDP", "sctp", "icmp", "ICMPv4", "icmpv6", "http", ""];
const NODES: &[&str] = &["node-1", "node-*", "*", "**", "*-1", "node-?", ""];
const DROP_REASONS: &[&str] = &["POLICY_DENIED", "policy_denied", "NETFILTER_DROP", ""];
const LABELS: &[&str] = &["app=web", "tier=front", "team", "env=prod", "k8s-app=kube-dns", "a=b=c"];
const NAMES: &[&str] = &["web-1", "postgres-0", "api-5d8f-x", ""];

/// A string for one field: from that field's vocabulary, the fuzzer's own, or both.
#[derive(Arbitrary, Debug)]
enum S {
    Known(u8),
    Raw(String),
    KnownThenRaw(u8, String),
}

impl S {
    fn get(&self, vocab: &[&str]) -> String {
        let known = |i: &u8| vocab[*i as usize % vocab.len()].to_string();
        match self {
            S::Known(i) => known(i),
            S::Raw(s) => s.clone(),
            S::KnownThenRaw(i, s) => known(i) + s,
        }
    }
}

fn strings(v: &[S], vocab: &[&str]) -> Vec<String> {
    v.iter().take(4).map(|s| s.get(vocab)).collect()
}

/// Enum values: mostly small, some out of range.
fn enums(v: &[i8]) -> Vec<i32> {
    v.iter().take(3).map(|x| *x as i32).collect()
}

#[derive(Arbitrary, Debug)]
struct Filter {
    uuid: Vec<S>,
    source_ip: Vec<S>,
    destination_ip: Vec<S>,
    source_pod: Vec<S>,
    destination_pod: Vec<S>,
    source_label: Vec<S>,
    destination_label: Vec<S>,
    source_workload: Vec<S>,
    destination_workload: Vec<S>,
    source_port: Vec<S>,
    destination_port: Vec<S>,
    source_namespace: Vec<S>,
    destination_namespace: Vec<S>,
    verdict: Vec<i8>,
    event_type: Vec<i8>,
    traffic_direction: Vec<i8>,
    ip_version: Vec<i8>,
    drop_reason: Vec<S>,
    protocol: Vec<S>,
    tcp_flags: Vec<u8>,
    node_name: Vec<S>,
    reply: Vec<bool>,
}

fn flags(b: u8) -> TcpFlags {
    TcpFlags {
        fin: b & 1 != 0,
        syn: b & 2 != 0,
        rst: b & 4 != 0,
        psh: b & 8 != 0,
        ack: b & 16 != 0,
        urg: b & 32 != 0,
        ece: b & 64 != 0,
        cwr: b & 128 != 0,
    }
}

impl Filter {
    fn proto(&self) -> FlowFilter {
        FlowFilter {
            uuid: strings(&self.uuid, &["f1", "f2"]),
            source_ip: strings(&self.source_ip, IPS),
            destination_ip: strings(&self.destination_ip, IPS),
            source_pod: strings(&self.source_pod, PODS),
            destination_pod: strings(&self.destination_pod, PODS),
            source_label: strings(&self.source_label, SELECTORS),
            destination_label: strings(&self.destination_label, SELECTORS),
            source_workload: strings(&self.source_workload, WORKLOADS),
            destination_workload: strings(&self.destination_workload, WORKLOADS),
            source_port: strings(&self.source_port, PORTS),
            destination_port: strings(&self.destination_port, PORTS),
            source_namespace: strings(&self.source_namespace, NAMESPACES),
            destination_namespace: strings(&self.destination_namespace, NAMESPACES),
            verdict: enums(&self.verdict),
            event_type: enums(&self.event_type),
            traffic_direction: enums(&self.traffic_direction),
            ip_version: enums(&self.ip_version),
            drop_reason: strings(&self.drop_reason, DROP_REASONS),
            protocol: strings(&self.protocol, PROTOCOLS),
            tcp_flags: self.tcp_flags.iter().take(3).map(|b| flags(*b)).collect(),
            node_name: strings(&self.node_name, NODES),
            reply: self.reply.iter().take(2).copied().collect(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Side {
    ip: S,
    port: u32,
    namespace: S,
    pod: S,
    labels: Vec<S>,
    workloads: Vec<(S, S)>,
}

impl Side {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            namespace: self.namespace.get(NAMESPACES),
            pod_name: self.pod.get(NAMES),
            labels: strings(&self.labels, LABELS),
            workloads: self
                .workloads
                .iter()
                .take(2)
                .map(|(k, n)| Workload { kind: k.get(&["ReplicaSet", "Deployment", "Job"]), name: n.get(&["api", "api-5d8f"]) })
                .collect(),
            ..Default::default()
        }
    }
}

#[derive(Arbitrary, Debug)]
struct FlowSpec {
    src: Side,
    dst: Side,
    /// Endpoints the annotation would give instead (the relay's view).
    annotated_src: Option<Side>,
    annotated_dst: Option<Side>,
    verdict: i8,
    event_type: i8,
    direction: i8,
    ip_version: i8,
    proto: u8,
    tcp_flags: u8,
    node: S,
    drop_reason: S,
    is_reply: bool,
    uuid: u8,
}

impl FlowSpec {
    fn flow(&self) -> Flow {
        let (sp, dp) = (self.src.port, self.dst.port);
        let protocol = match self.proto % 6 {
            0 => Some(layer4::Protocol::Tcp(Tcp { source_port: sp, destination_port: dp, flags: Some(flags(self.tcp_flags)) })),
            1 => Some(layer4::Protocol::Udp(flows_proto::Udp { source_port: sp, destination_port: dp })),
            2 => Some(layer4::Protocol::Sctp(flows_proto::Sctp { source_port: sp, destination_port: dp })),
            3 => Some(layer4::Protocol::Icmpv4(flows_proto::Icmpv4 { r#type: 8, code: 0, echo_id: sp })),
            4 => Some(layer4::Protocol::Icmpv6(flows_proto::Icmpv6 { r#type: 128, code: 0, echo_id: sp })),
            _ => None,
        };
        Flow {
            uuid: format!("f{}", self.uuid % 3),
            node_name: self.node.get(&["node-1", "node-2", "a-node-1"]),
            verdict: self.verdict as i32,
            event_type: self.event_type as i32,
            traffic_direction: self.direction as i32,
            drop_reason: self.drop_reason.get(DROP_REASONS),
            is_reply: self.is_reply,
            ip: Some(Ip {
                source: self.src.ip.get(IPS),
                destination: self.dst.ip.get(IPS),
                ip_version: self.ip_version as i32,
            }),
            l4: Some(Layer4 { protocol }),
            source: Some(self.src.endpoint()),
            destination: Some(self.dst.endpoint()),
            ..Default::default()
        }
    }
}

/// The annotation the relay would apply: what it knows about each address of the flow.
struct Known(BTreeMap<IpAddr, Endpoint>);

impl EndpointGetter for Known {
    fn endpoint(&self, ip: IpAddr) -> Option<Endpoint> {
        self.0.get(&ip).cloned()
    }
}

impl ServiceGetter for Known {
    fn service(&self, ip: IpAddr) -> Option<Service> {
        self.0.get(&ip).map(|e| Service { name: "svc".into(), namespace: e.namespace.clone() })
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    allow: Vec<Filter>,
    deny: Vec<Filter>,
    flows: Vec<FlowSpec>,
    selectors: Vec<S>,
}

/// kubectl syntax for one requirement, as the parser reads it back.
fn render(r: &Req) -> String {
    match r {
        Req::Eq(k, v) => format!("{k}=={v}"),
        Req::NotEq(k, v) => format!("{k}!={v}"),
        Req::In(k, vs) => format!("{k} in ({})", vs.join(",")),
        Req::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
        Req::Exists(k) => k.clone(),
        Req::NotExists(k) => format!("!{k}"),
    }
}

fn check_selector(s: &str, labels: &BTreeMap<String, String>) {
    let Ok(sel) = LabelSelector::parse(s) else { return };
    let _ = sel.matches(labels);
    let text: Vec<String> = sel.requirements().iter().map(render).collect();
    let text = text.join(",");
    match LabelSelector::parse(&text) {
        Ok(back) => assert_eq!(back, sel, "{s:?} written back as {text:?}"),
        Err(e) => panic!("{s:?} written back as {text:?} does not parse: {e}"),
    }
}

/// Reference for `node_name` globs: `*` any run of bytes, the rest literal (dynamic
/// programming over prefixes, so any length is fine).
fn glob_ref(p: &[u8], s: &[u8]) -> bool {
    let mut m = vec![false; s.len() + 1];
    m[0] = true;
    for &c in p {
        let mut next = vec![false; s.len() + 1];
        if c == b'*' {
            let mut any = false;
            for j in 0..=s.len() {
                any |= m[j];
                next[j] = any;
            }
        } else {
            for j in 1..=s.len() {
                next[j] = m[j - 1] && s[j - 1] == c;
            }
        }
        m = next;
    }
    m[s.len()]
}

/// Each node-name pattern alone decides as the reference glob does.
fn check_globs(filters: &[FlowFilter], flows: &[(Flow, Flow)]) {
    for pattern in filters.iter().flat_map(|f| f.node_name.iter()) {
        let one = FlowFilter { node_name: vec![pattern.clone()], ..Default::default() };
        let Ok(set) = FilterSet::new(&[one], &[]) else {
            panic!("a node-name filter is always valid: {pattern:?}");
        };
        for (f, _) in flows {
            let want = glob_ref(pattern.as_bytes(), f.node_name.as_bytes());
            assert_eq!(set.matches(f), want, "node name {:?} against {pattern:?}", f.node_name);
        }
    }
}

fn check_filters(allow: &[FlowFilter], deny: &[FlowFilter], flows: &[(Flow, Flow)]) {
    let Ok(set) = FilterSet::new(allow, deny) else {
        return;
    };
    // Each filter alone, as an allow list of one.
    let alone = |f: &FlowFilter| match FilterSet::new(std::slice::from_ref(f), &[]) {
        Ok(s) => s,
        Err(e) => panic!("a filter of a valid set does not compile alone: {e}"),
    };
    let allows: Vec<FilterSet> = allow.iter().map(alone).collect();
    let denies: Vec<FilterSet> = deny.iter().map(alone).collect();
    let ns = node_side(allow, deny);
    let node = match FilterSet::new(&ns.allow, &ns.deny) {
        Ok(s) => s,
        Err(e) => panic!("the node side of a valid filter does not compile: {e}"),
    };
    for (raw, annotated) in flows {
        for f in [raw, annotated] {
            let want = (allows.is_empty() || allows.iter().any(|s| s.matches(f))) && !denies.iter().any(|s| s.matches(f));
            assert_eq!(set.matches(f), want, "allow/deny semantics");
        }
        // The node filters its own flow; the relay filters the annotated one.
        let at_node = node.matches(raw);
        let at_relay = set.matches(annotated);
        assert!(at_node || !at_relay, "the node side dropped a flow the filter wants");
        if ns.exact {
            assert_eq!(at_node, at_relay, "an exact node side decided differently");
        }
    }
}

fn structured(bytes: &[u8]) -> arbitrary::Result<()> {
    let input = Input::arbitrary_take_rest(Unstructured::new(bytes))?;
    let allow: Vec<FlowFilter> = input.allow.iter().take(3).map(Filter::proto).collect();
    let deny: Vec<FlowFilter> = input.deny.iter().take(3).map(Filter::proto).collect();
    let mut flows: Vec<(Flow, Flow)> = Vec::new();
    for spec in input.flows.iter().take(4) {
        let raw = spec.flow();
        let mut known = BTreeMap::new();
        if let Some(ip) = raw.ip.as_ref() {
            for (addr, side) in [(&ip.source, &spec.annotated_src), (&ip.destination, &spec.annotated_dst)] {
                if let (Ok(a), Some(s)) = (addr.parse::<IpAddr>(), side) {
                    known.insert(a, s.endpoint());
                }
            }
        }
        let mut annotated = raw.clone();
        annotate(&mut annotated, &Known(known), &Known(BTreeMap::new()));
        flows.push((raw, annotated));
    }
    check_filters(&allow, &deny, &flows);
    check_globs(&allow, &flows);
    let labels: BTreeMap<String, String> = [("app", "web"), ("tier", "front"), ("team", "")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for s in input.selectors.iter().take(4) {
        check_selector(&s.get(SELECTORS), &labels);
    }
    for f in allow.iter().chain(&deny) {
        for s in f.source_label.iter().chain(&f.destination_label) {
            check_selector(s, &labels);
        }
    }
    Ok(())
}

/// A GetFlowsRequest off the wire, its filters matched on a fixed flow or two.
fn wire(bytes: &[u8]) {
    let Ok(req) = GetFlowsRequest::decode(bytes) else { return };
    let flow = Flow {
        uuid: "f1".into(),
        node_name: "node-1".into(),
        verdict: 1,
        ip: Some(Ip { source: "10.244.1.2".into(), destination: "10.244.2.3".into(), ip_version: 1 }),
        l4: Some(Layer4 {
            protocol: Some(layer4::Protocol::Tcp(Tcp { source_port: 40000, destination_port: 80, flags: Some(flags(2)) })),
        }),
        source: Some(Endpoint {
            namespace: "frontend".into(),
            pod_name: "web-1".into(),
            labels: vec!["app=web".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let flows = [(flow.clone(), flow)];
    check_filters(&req.allow_list, &req.deny_list, &flows);
    check_globs(&req.allow_list, &flows);
    for f in req.allow_list.iter().chain(&req.deny_list) {
        for s in f.source_label.iter().chain(&f.destination_label) {
            check_selector(s, &BTreeMap::new());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        wire(rest);
    } else {
        // Input too short for the structure: nothing to check.
        let _ = structured(rest);
    }
});
