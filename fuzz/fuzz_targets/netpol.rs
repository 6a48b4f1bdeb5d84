//! Structured manifests: Namespaces, Pods and NetworkPolicies generated from small
//! vocabularies (valid and invalid values), written out as YAML documents, JSON or a
//! `kind: List`, and read through `flows_policy::Manifests::parse` like the probe's
//! `--manifests` files. The fuzzer gets past the YAML parser into validation, evaluation
//! and datapath compilation.
//!
//! Checked: the reader reads every object written (no load error); validation rejects a
//! policy exactly when the vocabulary says one of its values is invalid (an independent
//! model of the API server's rules for these values), and accepts the rest; every
//! accepted set is evaluated on all pairs of pods and outside addresses, and the compiled
//! datapath decides each probe as the evaluator does (flows_fuzz::check_manifests).

#![no_main]

use std::net::IpAddr;

use arbitrary::Arbitrary;
use flows_policy::{ManifestError, Manifests, Protocol};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

const NAMESPACES: [&str; 4] = ["default", "a", "b", "Bad_NS"];
const NS_VALID: [bool; 4] = [true, true, true, false];
const POD_NAMES: [&str; 4] = ["p0", "p1", "p2", "p3"];
const POLICY_NAMES: [&str; 4] = ["allow", "deny", "web.v1", "Bad_Name"];
const POLICY_NAME_VALID: [bool; 4] = [true, true, true, false];
const KEYS: [&str; 5] = ["app", "tier", "team", "kubernetes.io/metadata.name", "-bad"];
const KEY_VALID: [bool; 5] = [true, true, true, true, false];
const VALUES: [&str; 6] = ["web", "db", "a", "b", "", "x y"];
const VALUE_VALID: [bool; 6] = [true, true, true, true, true, false];
const OPS: [&str; 5] = ["In", "NotIn", "Exists", "DoesNotExist", "Bogus"];
const MODES: [&str; 4] = ["enforce", "audit", "off", "Enforce"];
const PORTS: [i32; 9] = [80, 443, 53, 5432, 8080, 1, 65535, 0, 70000];
const END_PORTS: [i32; 7] = [80, 90, 8000, 65535, 70000, 79, 0];
const PORT_NAMES: [&str; 5] = ["http", "dns", "metrics", "HTTP", "a--b"];
const PORT_NAME_VALID: [bool; 5] = [true, true, true, false, false];
const PROTOCOLS: [&str; 4] = ["TCP", "UDP", "SCTP", "ICMP"];
const CIDRS: [&str; 10] = [
    "10.0.0.0/8", "10.0.1.0/24", "10.0.1.5/32", "0.0.0.0/0", "192.168.0.0/16", "fd00::/64", "::/0",
    "10.0.1.1/16", "10.0.0.0/33", "bad",
];
const TYPES: [&str; 3] = ["Ingress", "Egress", "Both"];
const SUBNETS: [&str; 3] = ["10.0.0.", "10.0.1.", "192.168.1."];
const NODES: [&str; 2] = ["node-1", "node-2"];
const EXTERNALS: [&str; 6] = ["10.0.1.5", "10.0.1.200", "192.168.7.7", "8.8.8.8", "fd00::99", "2001:db8::1"];

fn pick<T: Copy>(list: &[T], i: u8) -> T {
    list[i as usize % list.len()]
}

/// A CIDR of the vocabulary: (bits, width, prefix length), or None when it is invalid.
fn cidr(s: &str) -> Option<(u128, u8, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let (v, w) = match ip {
        IpAddr::V4(a) => (u32::from(a) as u128, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    (len <= w).then_some((v, w, len))
}

fn mask(w: u8, len: u8) -> u128 {
    if len == 0 { 0 } else { (u128::MAX >> (128 - w as u32)) & !(u128::MAX >> (128 - (w - len) as u32) ) }
}

/// `except` strictly inside `block` (same family, longer prefix, same network bits).
fn strictly_within(block: &str, except: &str) -> Option<bool> {
    let (b, bw, bl) = cidr(block)?;
    let (e, ew, el) = cidr(except)?;
    Some(bw == ew && el > bl && (b & mask(bw, bl)) == (e & mask(bw, bl)))
}

#[derive(Arbitrary, Debug)]
struct Labels(Vec<(u8, u8)>);

impl Labels {
    fn json(&self) -> Value {
        let mut m = Map::new();
        for &(k, v) in self.0.iter().take(3) {
            m.insert(pick(&KEYS, k).to_string(), pick(&VALUES, v).into());
        }
        Value::Object(m)
    }
    fn valid(&self) -> bool {
        // A later duplicate key replaces the earlier one, as in the written mapping.
        let mut m = std::collections::BTreeMap::new();
        for &(k, v) in self.0.iter().take(3) {
            m.insert(k as usize % KEYS.len(), v as usize % VALUES.len());
        }
        m.iter().all(|(k, v)| KEY_VALID[*k] && VALUE_VALID[*v])
    }
}

#[derive(Arbitrary, Debug)]
struct Expr {
    key: u8,
    op: u8,
    values: Option<Vec<u8>>,
}

#[derive(Arbitrary, Debug)]
struct Selector {
    labels: Option<Labels>,
    exprs: Option<Vec<Expr>>,
}

impl Selector {
    fn json(&self) -> Value {
        let mut m = Map::new();
        if let Some(l) = &self.labels {
            m.insert("matchLabels".into(), l.json());
        }
        if let Some(es) = &self.exprs {
            let v: Vec<Value> = es
                .iter()
                .take(3)
                .map(|e| {
                    let mut o = Map::new();
                    o.insert("key".into(), pick(&KEYS, e.key).into());
                    o.insert("operator".into(), pick(&OPS, e.op).into());
                    if let Some(vs) = &e.values {
                        o.insert("values".into(), vs.iter().take(3).map(|v| Value::from(pick(&VALUES, *v))).collect());
                    }
                    Value::Object(o)
                })
                .collect();
            m.insert("matchExpressions".into(), v.into());
        }
        Value::Object(m)
    }
    fn valid(&self) -> bool {
        self.labels.as_ref().is_none_or(Labels::valid)
            && self.exprs.iter().flatten().take(3).all(|e| {
                let values: Vec<u8> = e.values.iter().flatten().take(3).copied().collect();
                KEY_VALID[e.key as usize % KEYS.len()]
                    && match pick(&OPS, e.op) {
                        "In" | "NotIn" => !values.is_empty() && values.iter().all(|v| VALUE_VALID[*v as usize % VALUES.len()]),
                        "Exists" | "DoesNotExist" => values.is_empty(),
                        _ => false,
                    }
            })
    }
}

#[derive(Arbitrary, Debug)]
enum PortValue {
    Number(u8),
    Name(u8),
}

#[derive(Arbitrary, Debug)]
struct PolicyPort {
    protocol: Option<u8>,
    port: Option<PortValue>,
    end_port: Option<u8>,
}

impl PolicyPort {
    fn json(&self) -> Value {
        let mut m = Map::new();
        if let Some(p) = self.protocol {
            m.insert("protocol".into(), pick(&PROTOCOLS, p).into());
        }
        match &self.port {
            Some(PortValue::Number(i)) => {
                m.insert("port".into(), pick(&PORTS, *i).into());
            }
            Some(PortValue::Name(i)) => {
                m.insert("port".into(), pick(&PORT_NAMES, *i).into());
            }
            None => {}
        }
        if let Some(e) = self.end_port {
            m.insert("endPort".into(), pick(&END_PORTS, e).into());
        }
        Value::Object(m)
    }
    fn valid(&self) -> bool {
        let proto_ok = self.protocol.is_none_or(|p| pick(&PROTOCOLS, p) != "ICMP");
        let port_ok = match &self.port {
            None => self.end_port.is_none(),
            Some(PortValue::Name(i)) => PORT_NAME_VALID[*i as usize % PORT_NAMES.len()] && self.end_port.is_none(),
            Some(PortValue::Number(i)) => {
                let p = pick(&PORTS, *i);
                (1..=65535).contains(&p)
                    && self.end_port.is_none_or(|e| {
                        let e = pick(&END_PORTS, e);
                        (1..=65535).contains(&e) && e >= p
                    })
            }
        };
        proto_ok && port_ok
    }
}

#[derive(Arbitrary, Debug)]
enum Peer {
    Selectors { namespace: Option<Selector>, pod: Option<Selector> },
    Block { cidr: u8, except: Option<Vec<u8>> },
    /// ipBlock together with a selector: the API server refuses it.
    Mixed { cidr: u8, pod: Selector },
}

impl Peer {
    fn block(c: u8, except: &Option<Vec<u8>>) -> Value {
        let mut b = Map::new();
        b.insert("cidr".into(), pick(&CIDRS, c).into());
        if let Some(ex) = except {
            b.insert("except".into(), ex.iter().take(3).map(|e| Value::from(pick(&CIDRS, *e))).collect());
        }
        Value::Object(b)
    }
    fn json(&self) -> Value {
        let mut m = Map::new();
        match self {
            Peer::Selectors { namespace, pod } => {
                if let Some(s) = namespace {
                    m.insert("namespaceSelector".into(), s.json());
                }
                if let Some(s) = pod {
                    m.insert("podSelector".into(), s.json());
                }
            }
            Peer::Block { cidr, except } => {
                m.insert("ipBlock".into(), Self::block(*cidr, except));
            }
            Peer::Mixed { cidr, pod } => {
                m.insert("ipBlock".into(), Self::block(*cidr, &None));
                m.insert("podSelector".into(), pod.json());
            }
        }
        Value::Object(m)
    }
    fn valid(&self) -> bool {
        match self {
            Peer::Selectors { namespace: None, pod: None } => false,
            Peer::Selectors { namespace, pod } => {
                namespace.as_ref().is_none_or(Selector::valid) && pod.as_ref().is_none_or(Selector::valid)
            }
            Peer::Block { cidr: c, except } => {
                let block = pick(&CIDRS, *c);
                cidr(block).is_some()
                    && except.iter().flatten().take(3).all(|e| strictly_within(block, pick(&CIDRS, *e)) == Some(true))
            }
            Peer::Mixed { .. } => false,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Rule {
    ports: Option<Vec<PolicyPort>>,
    peers: Option<Vec<Peer>>,
}

impl Rule {
    fn json(&self, peers_field: &str) -> Value {
        let mut m = Map::new();
        if let Some(ps) = &self.ports {
            m.insert("ports".into(), ps.iter().take(3).map(PolicyPort::json).collect());
        }
        if let Some(ps) = &self.peers {
            m.insert(peers_field.into(), ps.iter().take(3).map(Peer::json).collect());
        }
        Value::Object(m)
    }
    fn valid(&self) -> bool {
        self.ports.iter().flatten().take(3).all(PolicyPort::valid) && self.peers.iter().flatten().take(3).all(Peer::valid)
    }
}

#[derive(Arbitrary, Debug)]
struct Policy {
    name: u8,
    namespace: Option<u8>,
    pod_selector: Option<Selector>,
    types: Option<Vec<u8>>,
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
}

impl Policy {
    fn json(&self) -> Value {
        let mut meta = Map::new();
        meta.insert("name".into(), pick(&POLICY_NAMES, self.name).into());
        if let Some(n) = self.namespace {
            meta.insert("namespace".into(), pick(&NAMESPACES, n).into());
        }
        let mut spec = Map::new();
        if let Some(s) = &self.pod_selector {
            spec.insert("podSelector".into(), s.json());
        }
        if let Some(t) = &self.types {
            spec.insert("policyTypes".into(), t.iter().take(3).map(|t| Value::from(pick(&TYPES, *t))).collect());
        }
        if let Some(r) = &self.ingress {
            spec.insert("ingress".into(), r.iter().take(3).map(|r| r.json("from")).collect());
        }
        if let Some(r) = &self.egress {
            spec.insert("egress".into(), r.iter().take(3).map(|r| r.json("to")).collect());
        }
        json!({ "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec })
    }
    fn valid(&self) -> bool {
        let types: Vec<u8> = self.types.iter().flatten().take(3).copied().collect();
        POLICY_NAME_VALID[self.name as usize % POLICY_NAMES.len()]
            && self.namespace.is_none_or(|n| NS_VALID[n as usize % NAMESPACES.len()])
            && self.pod_selector.as_ref().is_none_or(Selector::valid)
            && types.len() <= 2
            && types.iter().all(|t| pick(&TYPES, *t) != "Both")
            && self.ingress.iter().flatten().take(3).all(Rule::valid)
            && self.egress.iter().flatten().take(3).all(Rule::valid)
    }
}

#[derive(Arbitrary, Debug)]
struct ContainerPort {
    name: Option<u8>,
    port: u8,
    protocol: Option<u8>,
}

#[derive(Arbitrary, Debug)]
struct Pod {
    namespace: Option<u8>,
    name: u8,
    labels: Option<Labels>,
    node: u8,
    subnet: u8,
    v4: bool,
    v6: bool,
    ports: Vec<ContainerPort>,
}

impl Pod {
    fn json(&self, i: usize) -> Value {
        let mut meta = Map::new();
        meta.insert("name".into(), format!("{}-{i}", pick(&POD_NAMES, self.name)).into());
        if let Some(n) = self.namespace {
            meta.insert("namespace".into(), pick(&NAMESPACES, n).into());
        }
        if let Some(l) = &self.labels {
            meta.insert("labels".into(), l.json());
        }
        // Addresses derived from the pod's position: two pods never share one.
        let mut ips = Vec::new();
        if self.v4 {
            ips.push(format!("{}{}", pick(&SUBNETS, self.subnet), i + 2));
        }
        if self.v6 {
            ips.push(format!("fd00::{:x}", i + 2));
        }
        let ports: Vec<Value> = self
            .ports
            .iter()
            .take(3)
            .map(|p| {
                let mut m = Map::new();
                if let Some(n) = p.name {
                    m.insert("name".into(), pick(&PORT_NAMES, n).into());
                }
                m.insert("containerPort".into(), pick(&PORTS, p.port).into());
                if let Some(pr) = p.protocol {
                    m.insert("protocol".into(), pick(&PROTOCOLS, pr).into());
                }
                Value::Object(m)
            })
            .collect();
        let mut status = Map::new();
        if let Some(first) = ips.first() {
            status.insert("podIP".into(), first.clone().into());
            status.insert("podIPs".into(), ips.iter().map(|ip| json!({ "ip": ip })).collect());
        }
        json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": { "nodeName": pick(&NODES, self.node), "containers": [ { "name": "c", "ports": ports } ] },
            "status": status,
        })
    }
}

#[derive(Arbitrary, Debug)]
struct Namespace {
    name: u8,
    labels: Option<Labels>,
    mode: Option<u8>,
}

impl Namespace {
    fn json(&self) -> Value {
        let mut meta = Map::new();
        meta.insert("name".into(), pick(&NAMESPACES, self.name).into());
        if let Some(l) = &self.labels {
            meta.insert("labels".into(), l.json());
        }
        if let Some(m) = self.mode {
            meta.insert("annotations".into(), json!({ "flows.dev/policy-mode": pick(&MODES, m) }));
        }
        json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": meta })
    }
    fn mode_valid(&self) -> bool {
        self.mode.is_none_or(|m| pick(&MODES, m) != "Enforce")
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    policies: Vec<Policy>,
    probes: Vec<(u8, u8)>,
    externals: Vec<u8>,
    format: u8,
}

fn text(docs: &[Value], format: u8) -> Option<String> {
    match format % 3 {
        // YAML documents, as kubectl writes them.
        0 => {
            let mut out = String::new();
            for d in docs {
                out.push_str("---\n");
                out.push_str(&serde_yaml::to_string(d).ok()?);
            }
            Some(out)
        }
        // One JSON List.
        1 => serde_json::to_string(&json!({ "apiVersion": "v1", "kind": "List", "items": docs })).ok(),
        // JSON documents in a YAML stream.
        _ => {
            let parts: Option<Vec<String>> = docs.iter().map(|d| serde_json::to_string(d).ok()).collect();
            Some(parts?.join("\n---\n"))
        }
    }
}

fuzz_target!(|input: Input| {
    let namespaces = &input.namespaces[..input.namespaces.len().min(3)];
    let pods = &input.pods[..input.pods.len().min(6)];
    let policies = &input.policies[..input.policies.len().min(4)];
    let mut docs: Vec<Value> = namespaces.iter().map(Namespace::json).collect();
    docs.extend(pods.iter().enumerate().map(|(i, p)| p.json(i)));
    docs.extend(policies.iter().map(Policy::json));
    // Serialising our own values cannot fail; if it does the input is simply skipped.
    let Some(text) = text(&docs, input.format) else { return };

    let parsed = Manifests::parse([("netpol.yaml", text.as_str())]);
    let policies_valid = policies.iter().all(Policy::valid);
    // Namespace modes are checked after every policy; any bad one refuses the set.
    let modes_valid = namespaces.iter().all(Namespace::mode_valid);
    let m = match parsed {
        Err(ManifestError::Load(e)) => panic!("the reader refused well-formed objects: {e}\n{text}"),
        Err(ManifestError::Invalid(e)) => {
            assert!(!policies_valid, "validation refused a valid policy: {e}\n{text}");
            return;
        }
        Err(ManifestError::Mode { namespace, value }) => {
            assert!(policies_valid && !modes_valid, "mode {value:?} of {namespace} refused\n{text}");
            return;
        }
        Ok(m) => {
            assert!(policies_valid, "validation accepted an invalid policy:\n{text}");
            assert!(modes_valid, "an invalid policy mode was accepted:\n{text}");
            m
        }
    };
    assert_eq!(m.policies.len(), policies.len());
    assert_eq!(m.cluster.pods().len(), pods.len(), "every pod read (names are unique)");

    // A few outside addresses (every pair is evaluated: keep the count small).
    let externals: Vec<IpAddr> = input.externals.iter().take(3).filter_map(|i| pick(&EXTERNALS, *i).parse().ok()).collect();
    let mut probes: Vec<(Protocol, u16)> = vec![(Protocol::Tcp, 80), (Protocol::Icmp, 0)];
    for &(proto, port) in input.probes.iter().take(3) {
        let proto = match proto % 5 {
            0 => Protocol::Tcp,
            1 => Protocol::Udp,
            2 => Protocol::Sctp,
            3 => Protocol::Icmp,
            _ => Protocol::Icmpv6,
        };
        probes.push((proto, pick(&PORTS, port).clamp(0, 65535) as u16));
    }
    flows_fuzz::check_manifests(&m, &externals, &probes);
});
