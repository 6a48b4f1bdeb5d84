//! Minimal NetworkPolicies from observed, allowed traffic.
//!
//! The rules that make a suggestion minimal (also in the README):
//! 1. A default-deny policy (ingress and egress) per namespace in scope; everything else
//!    is an allow policy per workload that had allowed traffic.
//! 2. A workload is the pods of one owner (Deployment, StatefulSet, DaemonSet, CronJob,
//!    Job), else the pods that share their stable labels. Its podSelector, and the
//!    podSelector naming it as a peer, is the smallest stable label set that selects
//!    exactly its pods in its namespace ([`super::select`]); never the empty selector
//!    when any label would do.
//! 3. A peer in another namespace adds a namespaceSelector on
//!    `kubernetes.io/metadata.name`, which the API server sets on every namespace.
//! 4. An address that is no pod (the world, a node) is an ipBlock of that one address
//!    (/32, /128), or of a wider prefix only when asked.
//! 5. Ports are exactly the observed ones, per peer and protocol; contiguous runs
//!    become `port` with `endPort`. Peers with the same ports share a rule.
//! 6. Two exceptions, both stated in `--explain`: egress to DNS (port 53 of a pod) is
//!    allowed on UDP and TCP 53, since resolvers fall back to TCP; ICMP cannot be named
//!    by a NetworkPolicy port, so a peer seen with ICMP gets a rule without ports.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::networking::v1::{
        IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
        NetworkPolicyPort, NetworkPolicySpec,
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::Serialize;

use super::{
    Inventory, Observation, Outcome, Party, WorkloadId, cidr_of, party_names,
    select::{self, Choice},
};
use crate::{Protocol, eval::NAMESPACE_NAME_LABEL, selector::Labels};

/// Label on every suggested policy.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "flows");

#[derive(Debug, Clone)]
pub struct SuggestOptions {
    /// Namespaces to write policies for; empty: every namespace with a pod in the
    /// observations except `kube-*` ones.
    pub namespaces: Vec<String>,
    /// Only this workload (`name` or `kind/name`), and then no default-deny: its policy
    /// isolates it in both directions on its own.
    pub workload: Option<String>,
    /// Prefix lengths for addresses that are no pod (32 and 128: one address).
    pub world_prefix_v4: u8,
    pub world_prefix_v6: u8,
    /// Count attempts forwarded in audit mode (policy denied them) as allowed.
    pub include_audit: bool,
    /// Count attempts their destination refused (nothing listened) as allowed.
    pub include_refused: bool,
    /// The API server the policies are for knows `endPort` (Kubernetes 1.25 and
    /// later); without it, port runs are listed port by port.
    pub end_port: bool,
    /// The API server labels every namespace with `kubernetes.io/metadata.name` (1.22
    /// and later); without it, a warning says which namespaces need the label.
    pub namespace_name_label: bool,
}

impl SuggestOptions {
    /// Whether attempts with this recorded outcome are traffic the policies must allow.
    pub fn counts_as_allowed(&self, o: Outcome) -> bool {
        match o {
            Outcome::Allowed => true,
            Outcome::Audit => self.include_audit,
            Outcome::Refused => self.include_refused,
            Outcome::Denied => false,
        }
    }
}

impl Default for SuggestOptions {
    fn default() -> Self {
        SuggestOptions {
            namespaces: Vec::new(),
            workload: None,
            world_prefix_v4: 32,
            world_prefix_v6: 128,
            include_audit: false,
            include_refused: false,
            end_port: true,
            namespace_name_label: true,
        }
    }
}

/// An observed attempt a rule exists for, summed over its pods and addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObservedFlow {
    pub src_namespace: String,
    pub src_workload: String,
    pub dst_namespace: String,
    pub dst_workload: String,
    pub protocol: String,
    pub port: u16,
    pub flows: u64,
    pub first_seen: i64,
    pub last_seen: i64,
}

/// Why one rule of a suggested policy exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// `namespace/name`.
    pub policy: String,
    /// "ingress", "egress", or "policy" (the policy's own podSelector or a default deny).
    pub section: String,
    /// Rule index within the section.
    pub rule: usize,
    pub text: String,
    pub flows: Vec<ObservedFlow>,
}

#[derive(Debug, Clone, Default)]
pub struct Suggestion {
    /// In output order: per namespace, the default deny then the allow policies by name.
    pub policies: Vec<NetworkPolicy>,
    pub explanations: Vec<Explanation>,
    /// Where the suggestion is broader than what was observed, and why.
    pub warnings: Vec<String>,
    /// Distinct (source workload, destination workload, protocol/port) the policies
    /// stand for.
    pub triples: usize,
    /// Attempts of workloads in scope that their destination refused (nothing
    /// listened), left out: no port is opened for them.
    pub refused: Vec<ObservedFlow>,
}

impl Suggestion {
    /// Multi-document YAML that `kubectl apply -f` takes; with `explain`, each policy is
    /// preceded by comments naming, per rule, the observed flows it exists for.
    pub fn yaml(&self, explain: bool) -> Result<String, serde_yaml::Error> {
        let mut out = String::new();
        if explain && !self.refused.is_empty() {
            out.push_str("# Left out: attempts their destination refused (nothing listened there), no reason to\n");
            out.push_str("# open a port (--include-refused keeps them):\n");
            for f in &self.refused {
                out.push_str(&format!("#   {}\n", one_line(&f.describe())));
            }
        }
        for (i, p) in self.policies.iter().enumerate() {
            if i > 0 {
                out.push_str("---\n");
            }
            if explain {
                let id = format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap_or_default(),
                    p.metadata.name.as_deref().unwrap_or_default()
                );
                for e in self.explanations.iter().filter(|e| e.policy == id) {
                    let head = if e.section == "policy" { String::new() } else { format!("{} rule {}: ", e.section, e.rule + 1) };
                    out.push_str(&format!("# {head}{}\n", one_line(&e.text)));
                    for f in &e.flows {
                        out.push_str(&format!("#   {}\n", one_line(&f.describe())));
                    }
                }
            }
            out.push_str(&serde_yaml::to_string(p)?);
        }
        Ok(out)
    }

    /// The policies as a `v1/List`, which `kubectl apply -f` takes too.
    pub fn json_list(&self) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": self.policies,
        })
    }

    /// The policies compiled for the engine (they are valid by construction; one that
    /// is not is an error here rather than a wrong proof).
    pub fn compiled(&self) -> Result<Vec<crate::CompiledPolicy>, crate::InvalidPolicy> {
        self.policies
            .iter()
            .enumerate()
            .map(|(i, p)| {
                crate::compile(
                    &crate::Origin {
                        source: "suggestion".into(),
                        document: i,
                    },
                    p,
                )
            })
            .collect()
    }
}

impl ObservedFlow {
    pub fn describe(&self) -> String {
        let side = |ns: &str, w: &str| if ns.is_empty() { w.to_string() } else { format!("{ns}/{w}") };
        let port = if self.port == 0 { self.protocol.clone() } else { format!("{}/{}", self.port, self.protocol) };
        format!(
            "{} -> {} {port}: {} attempt{}",
            side(&self.src_namespace, &self.src_workload),
            side(&self.dst_namespace, &self.dst_workload),
            self.flows,
            if self.flows == 1 { "" } else { "s" }
        )
    }
}

/// Flow data inside a comment stays inside it.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PeerKey {
    Pods(WorkloadId),
    Block(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PortKey {
    Port(Protocol, u16),
    /// A protocol without ports (ICMP): only a rule without ports admits it.
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Section {
    Ingress,
    Egress,
}

#[derive(Default)]
struct PeerUse<'a> {
    ports: BTreeSet<PortKey>,
    observed: Vec<&'a Observation>,
    dns: bool,
    icmp: bool,
}

type Sections<'a> = BTreeMap<(Section, PeerKey), PeerUse<'a>>;

const DNS_PORT: u16 = 53;

/// Suggests policies for the attempts in `observations` that were allowed, choosing
/// selectors against every pod of `inventory` (plus those observed).
pub fn suggest(observations: &[Observation], inventory: &Inventory, opts: &SuggestOptions) -> Suggestion {
    let mut inv = inventory.clone();
    inv.observe(observations);
    let scope = scope(observations, opts);
    let targeted = |w: &WorkloadId| scope.contains(&w.namespace) && opts.workload.as_deref().is_none_or(|t| w.matches(t));
    // 1. What each targeted workload was seen to use, per direction and peer.
    let (mut by_target, triples) = collect(observations, opts, &targeted);
    // 2. Selectors, chosen once per workload.
    let mut selectors = Selectors::new(&inv);
    let refused: Vec<&Observation> = observations
        .iter()
        .filter(|o| o.outcome == Outcome::Refused && !opts.counts_as_allowed(o.outcome))
        .filter(|o| [&o.src, &o.dst].iter().any(|p| matches!(p, Party::Pod(p) if targeted(&WorkloadId::of_party(p)))))
        .collect();
    let mut out = Suggestion {
        triples: triples.len(),
        refused: summarize(&refused),
        ..Default::default()
    };
    // 3. One allow policy per targeted workload.
    let mut allow: BTreeMap<(String, String), (NetworkPolicy, Vec<Explanation>)> = BTreeMap::new();
    let names = policy_names(by_target.keys());
    for w in targets(&by_target, &selectors, opts, &targeted) {
        let sections = by_target.remove(&w).unwrap_or_default();
        let name = names.get(&w).cloned().unwrap_or_else(|| dns_name(&format!("allow-{}", w.name())));
        let rendered = allow_policy(&w, &name, &sections, &mut selectors, opts.workload.is_some(), &mut out.warnings);
        allow.insert((w.namespace.clone(), name), rendered);
    }
    // 4. Per namespace: its default deny (unless one workload was asked for), then its
    //    allow policies.
    let namespaces: BTreeSet<String> = if opts.workload.is_some() {
        allow.keys().map(|(ns, _)| ns.clone()).collect()
    } else {
        scope
    };
    for ns in namespaces {
        if opts.workload.is_none() {
            out.policies.push(default_deny(&ns));
            out.explanations.push(Explanation {
                policy: format!("{ns}/default-deny"),
                section: "policy".into(),
                rule: 0,
                text: format!("isolates every pod of {ns}, ingress and egress: only what the allow policies name passes"),
                flows: Vec::new(),
            });
        }
        let keys: Vec<(String, String)> = allow.range((ns.clone(), String::new())..).take_while(|(k, _)| k.0 == ns).map(|(k, _)| k.clone()).collect();
        for k in keys {
            if let Some((np, ex)) = allow.remove(&k) {
                out.policies.push(np);
                out.explanations.extend(ex);
            }
        }
    }
    fit_server(&mut out, opts);
    out
}

/// Leaves out what the API server does not know, saying so.
fn fit_server(out: &mut Suggestion, opts: &SuggestOptions) {
    let mut expanded = false;
    let mut named: BTreeSet<String> = BTreeSet::new();
    for p in &mut out.policies {
        let Some(spec) = p.spec.as_mut() else { continue };
        let ingress = spec.ingress.iter_mut().flatten().map(|r| (r.ports.as_mut(), r.from.as_ref()));
        let egress = spec.egress.iter_mut().flatten().map(|r| (r.ports.as_mut(), r.to.as_ref()));
        for (ports, peers) in ingress.chain(egress) {
            for peer in peers.into_iter().flatten() {
                let label = peer.namespace_selector.as_ref().and_then(|s| s.match_labels.as_ref()).and_then(|m| m.get(NAMESPACE_NAME_LABEL));
                named.extend(label.cloned());
            }
            let Some(ports) = ports.filter(|_| !opts.end_port) else { continue };
            let mut each = Vec::new();
            for port in ports.drain(..) {
                match (&port.port, port.end_port) {
                    (Some(IntOrString::Int(start)), Some(end)) => {
                        expanded = true;
                        each.extend((*start..=end).map(|n| NetworkPolicyPort { port: Some(IntOrString::Int(n)), end_port: None, ..port.clone() }));
                    }
                    _ => each.push(port),
                }
            }
            *ports = each;
        }
    }
    if expanded {
        out.warnings.push("the API server does not know endPort (Kubernetes 1.25): port runs are listed port by port".into());
    }
    if !opts.namespace_name_label && !named.is_empty() {
        out.warnings.push(format!(
            "the API server does not label namespaces with {NAMESPACE_NAME_LABEL} (Kubernetes 1.22): label {} with their own names before applying, or the rules naming them match nothing",
            named.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
}

/// The namespaces advice is for: those asked for, else every namespace with an observed
/// pod (the system's own aside).
fn scope(observations: &[Observation], opts: &SuggestOptions) -> BTreeSet<String> {
    if !opts.namespaces.is_empty() {
        return opts.namespaces.iter().cloned().collect();
    }
    observations
        .iter()
        .flat_map(|o| [&o.src, &o.dst])
        .filter_map(|p| match p {
            Party::Pod(p) if !p.namespace.starts_with("kube-") => Some(p.namespace.clone()),
            _ => None,
        })
        .collect()
}

type Triple = (String, String, String, String, Protocol, u16);

/// What each targeted workload used: per (direction, peer), the ports and the flows
/// that show it; and the distinct (source, destination, protocol, port) triples.
fn collect<'a>(
    observations: &'a [Observation],
    opts: &SuggestOptions,
    targeted: &impl Fn(&WorkloadId) -> bool,
) -> (BTreeMap<WorkloadId, Sections<'a>>, BTreeSet<Triple>) {
    let allowed = |o: &Observation| opts.counts_as_allowed(o.outcome);
    let peer_of = |p: &Party| match p {
        Party::Pod(p) => PeerKey::Pods(WorkloadId::of_party(p)),
        Party::Address { ip, .. } => PeerKey::Block(cidr_of(
            *ip,
            if ip.is_ipv4() { opts.world_prefix_v4 } else { opts.world_prefix_v6 },
        )),
    };
    let mut by_target: BTreeMap<WorkloadId, Sections> = BTreeMap::new();
    let mut triples = BTreeSet::new();
    for o in observations.iter().filter(|o| allowed(o)) {
        let port = if o.protocol.has_ports() { PortKey::Port(o.protocol, o.port) } else { PortKey::Any };
        let mut touched = false;
        for (me, peer, section) in [(&o.src, &o.dst, Section::Egress), (&o.dst, &o.src, Section::Ingress)] {
            let Party::Pod(p) = me else { continue };
            let w = WorkloadId::of_party(p);
            if !targeted(&w) {
                continue;
            }
            let u = by_target.entry(w).or_default().entry((section, peer_of(peer))).or_default();
            u.ports.insert(port);
            u.observed.push(o);
            u.icmp |= port == PortKey::Any;
            let dns = section == Section::Egress
                && matches!(o.dst, Party::Pod(_))
                && o.port == DNS_PORT
                && matches!(o.protocol, Protocol::Udp | Protocol::Tcp);
            if dns {
                u.dns = true;
                u.ports.insert(PortKey::Port(Protocol::Udp, DNS_PORT));
                u.ports.insert(PortKey::Port(Protocol::Tcp, DNS_PORT));
            }
            touched = true;
        }
        if touched {
            let (sn, sw) = party_names(&o.src);
            let (dn, dw) = party_names(&o.dst);
            triples.insert((sn, sw, dn, dw, o.protocol, o.port));
        }
    }
    (by_target, triples)
}

/// Label selectors for workloads, chosen once each, with one warning per workload no
/// stable label set selects exactly.
struct Selectors {
    /// Per namespace: (pod, labels, workload).
    ns_pods: BTreeMap<String, Vec<(String, Labels, WorkloadId)>>,
    choices: BTreeMap<WorkloadId, Choice>,
    warned: BTreeSet<WorkloadId>,
}

impl Selectors {
    fn new(inv: &Inventory) -> Selectors {
        let mut ns_pods: BTreeMap<String, Vec<(String, Labels, WorkloadId)>> = BTreeMap::new();
        for p in inv.pods() {
            let w = WorkloadId::of(&p.namespace, &p.name, &p.labels, p.owner.as_ref());
            ns_pods.entry(p.namespace.clone()).or_default().push((p.name.clone(), p.labels.clone(), w));
        }
        Selectors {
            ns_pods,
            choices: BTreeMap::new(),
            warned: BTreeSet::new(),
        }
    }

    /// The selector of `w`'s pods; a warning the first time it is not exact.
    fn choose(&mut self, w: &WorkloadId, warnings: &mut Vec<String>) -> Choice {
        let ns_pods = &self.ns_pods;
        let c = self
            .choices
            .entry(w.clone())
            .or_insert_with(|| {
                let pods = ns_pods.get(&w.namespace).map(Vec::as_slice).unwrap_or_default();
                let members: Vec<&Labels> = pods.iter().filter(|(_, _, pw)| pw == w).map(|(_, l, _)| l).collect();
                let others: Vec<(&str, &Labels)> = pods.iter().filter(|(_, _, pw)| pw != w).map(|(n, l, _)| (n.as_str(), l)).collect();
                select::choose(&members, &others)
            })
            .clone();
        if !c.exact() && self.warned.insert(w.clone()) {
            warnings.push(format!(
                "{}/{} ({}): no stable label set selects exactly its pods; {} also selects {}",
                w.namespace,
                w.name(),
                w.kind(),
                selector_text(&c.labels),
                c.also_selects.join(", ")
            ));
        }
        c
    }
}

/// Names: allow-<workload>, or allow-<kind>-<workload> where two kinds share a name.
fn policy_names<'a>(workloads: impl Iterator<Item = &'a WorkloadId> + Clone) -> BTreeMap<WorkloadId, String> {
    let mut count: BTreeMap<(String, String), usize> = BTreeMap::new();
    for w in workloads.clone() {
        *count.entry((w.namespace.clone(), w.name())).or_default() += 1;
    }
    workloads
        .map(|w| {
            let base = if count.get(&(w.namespace.clone(), w.name())).copied().unwrap_or(0) > 1 {
                format!("allow-{}-{}", w.kind().to_ascii_lowercase(), w.name())
            } else {
                format!("allow-{}", w.name())
            };
            (w.clone(), dns_name(&base))
        })
        .collect()
}

/// The workloads that get a policy: those seen; with a named workload, also that one
/// when nothing it did was allowed (it gets its isolating policy all the same).
fn targets(
    by_target: &BTreeMap<WorkloadId, Sections>,
    selectors: &Selectors,
    opts: &SuggestOptions,
    targeted: &impl Fn(&WorkloadId) -> bool,
) -> Vec<WorkloadId> {
    let mut t: BTreeSet<WorkloadId> = by_target.keys().cloned().collect();
    if opts.workload.is_some() {
        for pods in selectors.ns_pods.values() {
            t.extend(pods.iter().filter(|(_, _, w)| targeted(w)).map(|(_, _, w)| w.clone()));
        }
    }
    t.into_iter().collect()
}

/// One workload's allow policy and what each of its parts stands for.
fn allow_policy(
    w: &WorkloadId,
    name: &str,
    sections: &Sections,
    selectors: &mut Selectors,
    isolate_both: bool,
    warnings: &mut Vec<String>,
) -> (NetworkPolicy, Vec<Explanation>) {
    let id = format!("{}/{}", w.namespace, name);
    let own = selectors.choose(w, warnings);
    let mut explanations = vec![Explanation {
        policy: id.clone(),
        section: "policy".into(),
        rule: 0,
        text: format!("selects {} {} in {} by {}", w.kind(), w.name(), w.namespace, selector_text(&own.labels)),
        flows: Vec::new(),
    }];
    let mut ingress = Vec::new();
    let mut egress = Vec::new();
    for section in [Section::Ingress, Section::Egress] {
        for (rendered, ports, explanation) in rules(&id, &w.namespace, section, sections, selectors, warnings) {
            explanations.push(explanation);
            match section {
                Section::Ingress => ingress.push(NetworkPolicyIngressRule { from: Some(rendered), ports }),
                Section::Egress => egress.push(NetworkPolicyEgressRule { to: Some(rendered), ports }),
            }
        }
    }
    let mut types = Vec::new();
    if !ingress.is_empty() || isolate_both {
        types.push("Ingress".to_string());
    }
    if !egress.is_empty() || isolate_both {
        types.push("Egress".to_string());
    }
    let np = NetworkPolicy {
        metadata: meta(name, &w.namespace),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(match_labels(&own.labels)),
            policy_types: Some(types),
            ingress: (!ingress.is_empty()).then_some(ingress),
            egress: (!egress.is_empty()).then_some(egress),
        }),
    };
    (np, explanations)
}

/// The rules of one direction: peers with the same ports share a rule.
fn rules(
    id: &str,
    policy_ns: &str,
    section: Section,
    sections: &Sections,
    selectors: &mut Selectors,
    warnings: &mut Vec<String>,
) -> Vec<(Vec<NetworkPolicyPeer>, Option<Vec<NetworkPolicyPort>>, Explanation)> {
    let mut rules: BTreeMap<BTreeSet<PortKey>, Vec<(&PeerKey, &PeerUse)>> = BTreeMap::new();
    for ((s, peer), u) in sections {
        if *s == section {
            let ports = if u.icmp { BTreeSet::from([PortKey::Any]) } else { u.ports.clone() };
            rules.entry(ports).or_default().push((peer, u));
        }
    }
    let mut out = Vec::new();
    for (i, (ports, peers)) in rules.iter().enumerate() {
        let mut rendered = Vec::new();
        let mut texts = Vec::new();
        let mut observed: Vec<&Observation> = Vec::new();
        let mut notes = Vec::new();
        for (peer, u) in peers {
            let (p, text) = render_peer(peer, policy_ns, selectors, warnings);
            rendered.push(p);
            texts.push(text);
            observed.extend(u.observed.iter().copied());
            if u.dns {
                notes.push("DNS: UDP and TCP 53 (resolvers fall back to TCP)");
            }
            if u.icmp {
                notes.push("ICMP was seen and no NetworkPolicy port names it: every port and protocol from this peer");
            }
        }
        notes.dedup();
        let port_list = render_ports(ports);
        let mut text = format!(
            "{} {} on {}",
            if section == Section::Ingress { "from" } else { "to" },
            texts.join(" or "),
            ports_text(&port_list)
        );
        for n in notes {
            text.push_str("; ");
            text.push_str(n);
        }
        let explanation = Explanation {
            policy: id.to_string(),
            section: if section == Section::Ingress { "ingress" } else { "egress" }.into(),
            rule: i,
            text,
            flows: summarize(&observed),
        };
        out.push((rendered, (!port_list.is_empty()).then_some(port_list), explanation));
    }
    out
}

fn default_deny(ns: &str) -> NetworkPolicy {
    NetworkPolicy {
        metadata: meta("default-deny", ns),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector::default()),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: None,
            egress: None,
        }),
    }
}

fn meta(name: &str, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        labels: Some(BTreeMap::from([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())])),
        ..Default::default()
    }
}

fn match_labels(labels: &Labels) -> LabelSelector {
    LabelSelector {
        match_labels: (!labels.is_empty()).then(|| labels.clone()),
        match_expressions: None,
    }
}

fn selector_text(labels: &Labels) -> String {
    if labels.is_empty() {
        return "{} (every pod)".into();
    }
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn render_peer(
    peer: &PeerKey,
    policy_ns: &str,
    selectors: &mut Selectors,
    warnings: &mut Vec<String>,
) -> (NetworkPolicyPeer, String) {
    match peer {
        PeerKey::Block(cidr) => (
            NetworkPolicyPeer {
                ip_block: Some(IPBlock {
                    cidr: cidr.clone(),
                    except: None,
                }),
                ..Default::default()
            },
            cidr.clone(),
        ),
        PeerKey::Pods(w) => {
            let c = selectors.choose(w, warnings);
            let ns = (w.namespace != policy_ns).then(|| LabelSelector {
                match_labels: Some(BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), w.namespace.clone())])),
                match_expressions: None,
            });
            (
                NetworkPolicyPeer {
                    ip_block: None,
                    namespace_selector: ns,
                    pod_selector: Some(match_labels(&c.labels)),
                },
                format!("{} {}/{} ({})", w.kind(), w.namespace, w.name(), selector_text(&c.labels)),
            )
        }
    }
}

/// Ports per protocol, contiguous runs as port..endPort; empty for "every port".
fn render_ports(ports: &BTreeSet<PortKey>) -> Vec<NetworkPolicyPort> {
    if ports.contains(&PortKey::Any) {
        return Vec::new();
    }
    let mut by_proto: BTreeMap<Protocol, Vec<u16>> = BTreeMap::new();
    for p in ports {
        if let PortKey::Port(proto, n) = p {
            by_proto.entry(*proto).or_default().push(*n);
        }
    }
    let mut out = Vec::new();
    for (proto, mut nums) in by_proto {
        nums.sort_unstable();
        nums.dedup();
        let mut i = 0;
        while i < nums.len() {
            let start = nums[i];
            let mut end = start;
            while i + 1 < nums.len() && nums[i + 1] == end.saturating_add(1) {
                i += 1;
                end = nums[i];
            }
            out.push(NetworkPolicyPort {
                protocol: Some(proto.as_str().to_string()),
                port: Some(IntOrString::Int(i32::from(start))),
                end_port: (end > start).then_some(i32::from(end)),
            });
            i += 1;
        }
    }
    out
}

fn ports_text(ports: &[NetworkPolicyPort]) -> String {
    if ports.is_empty() {
        return "every port and protocol".into();
    }
    ports
        .iter()
        .map(|p| {
            let n = match &p.port {
                Some(IntOrString::Int(n)) => n.to_string(),
                Some(IntOrString::String(s)) => s.clone(),
                None => "*".into(),
            };
            match p.end_port {
                Some(e) => format!("{}/{n}-{e}", p.protocol.as_deref().unwrap_or("TCP")),
                None => format!("{}/{n}", p.protocol.as_deref().unwrap_or("TCP")),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Observations summed per workload pair and port.
fn summarize(observed: &[&Observation]) -> Vec<ObservedFlow> {
    type Key = (String, String, String, String, String, u16);
    let mut by: BTreeMap<Key, (u64, i64, i64)> = BTreeMap::new();
    for o in observed {
        let (sn, sw) = party_names(&o.src);
        let (dn, dw) = party_names(&o.dst);
        let e = by
            .entry((sn, sw, dn, dw, o.protocol.as_str().to_string(), o.port))
            .or_insert((0, i64::MAX, i64::MIN));
        e.0 += o.flows;
        e.1 = e.1.min(o.first);
        e.2 = e.2.max(o.last);
    }
    by.into_iter()
        .map(|((sn, sw, dn, dw, protocol, port), (flows, first, last))| ObservedFlow {
            src_namespace: sn,
            src_workload: sw,
            dst_namespace: dn,
            dst_workload: dw,
            protocol,
            port,
            flows,
            first_seen: first,
            last_seen: last,
        })
        .collect()
}

/// A DNS-1123 subdomain from free text (lowercase alphanumerics, '-' and '.').
fn dns_name(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' }
        })
        .collect();
    let trimmed = mapped.trim_matches(|c: char| c == '-' || c == '.');
    let mut out: String = trimmed.chars().take(253).collect();
    while out.ends_with(['-', '.']) {
        out.pop();
    }
    if out.is_empty() { "allow".into() } else { out }
}
