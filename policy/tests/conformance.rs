//! Runs the whole conformance table (policy/conformance/*.yaml, format in its README)
//! through the evaluator. Every probe must get its expected verdict (and, where given,
//! its deciding policies); every `error:` case must be rejected by validation.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use flows_policy::{
    Cluster, ContainerPort, Decision, Endpoint, Engine, Origin, PodInfo, Protocol, compile,
    compile::{
        DatapathState, Direction, IdentityAllocator, Mode, NodeView, SetTable, compile_datapath,
        lookup,
    },
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    cluster: Option<ClusterDef>,
    model: Option<String>,
    #[serde(default)]
    cases: Vec<Case>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct ClusterDef {
    #[serde(default)]
    namespaces: Vec<NsDef>,
    #[serde(default)]
    pods: Vec<PodDef>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct NsDef {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct PodDef {
    namespace: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    ip: Option<IpAddr>,
    ip6: Option<IpAddr>,
    #[serde(default)]
    ports: Vec<PortDef>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct PortDef {
    name: Option<String>,
    port: u16,
    protocol: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Allow,
    Deny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeDef {
    from: String,
    to: String,
    port: u16,
    protocol: Option<String>,
    expect: Expect,
    policies: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairDef {
    from: String,
    to: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixDef {
    port: u16,
    protocol: Option<String>,
    default: Expect,
    #[serde(default)]
    except: Vec<PairDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    source: Option<String>,
    #[serde(default)]
    policies: Vec<serde_yaml::Value>,
    #[serde(default)]
    probes: Vec<ProbeDef>,
    #[serde(default)]
    matrix: Vec<MatrixDef>,
    error: Option<String>,
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

fn cluster_of(def: &ClusterDef) -> Result<Cluster, String> {
    let mut c = Cluster::new();
    for n in &def.namespaces {
        c.add_namespace(&n.name, n.labels.clone());
    }
    for p in &def.pods {
        let mut ports = Vec::new();
        for port in &p.ports {
            let protocol = match &port.protocol {
                None => Protocol::Tcp,
                Some(s) => Protocol::parse(s).ok_or(format!("pod {}/{}: protocol {s}", p.namespace, p.name))?,
            };
            ports.push(ContainerPort {
                name: port.name.clone(),
                port: port.port,
                protocol,
            });
        }
        c.add_pod(PodInfo {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            node: None,
            labels: p.labels.clone(),
            ips: p.ip.into_iter().chain(p.ip6).collect(),
            ports,
        });
    }
    Ok(c)
}

fn endpoint<'a>(c: &'a Cluster, s: &str) -> Result<Endpoint<'a>, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(match c.pod_by_ip(ip) {
            Some(p) => Endpoint::Pod(p, Some(ip)),
            None => Endpoint::External(ip),
        });
    }
    let (ns, name) = s.split_once('/').ok_or(format!("endpoint {s:?}: expected ns/pod or an IP"))?;
    c.pod(ns, name)
        .map(|p| Endpoint::Pod(p, None))
        .ok_or(format!("endpoint {s:?}: no such pod"))
}

fn pattern_matches(pattern: &str, p: &PodInfo) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.split_once('/') {
        Some((ns, "*")) => ns == p.namespace,
        Some((ns, name)) => ns == p.namespace && name == p.name,
        None => false,
    }
}

fn protocol(s: &Option<String>) -> Result<Protocol, String> {
    match s {
        None => Ok(Protocol::Tcp),
        Some(s) => Protocol::from_flow(s).ok_or(format!("unknown protocol {s}")),
    }
}

fn policy_of(v: &serde_yaml::Value) -> Result<NetworkPolicy, String> {
    let mut v = v.clone();
    let m = v.as_mapping_mut().ok_or("policy is not a mapping")?;
    m.entry("apiVersion".into())
        .or_insert_with(|| "networking.k8s.io/v1".into());
    m.entry("kind".into()).or_insert_with(|| "NetworkPolicy".into());
    serde_yaml::from_value(v).map_err(|e| format!("policy does not parse: {e}"))
}

/// The address an endpoint uses towards `other` (as the evaluator picks it).
fn addr(ep: &Endpoint, other: &Endpoint) -> Option<IpAddr> {
    match ep {
        Endpoint::External(ip) | Endpoint::Pod(_, Some(ip)) => Some(*ip),
        Endpoint::Pod(p, None) => {
            let v6 = match other {
                Endpoint::External(ip) | Endpoint::Pod(_, Some(ip)) => Some(ip.is_ipv6()),
                _ => None,
            };
            p.ips.iter().find(|i| v6.is_none_or(|v| i.is_ipv6() == v)).copied()
        }
    }
}

/// Decides each side with the compiled state (ipcache + LPM policy entries) and compares
/// verdict and allowing policies with the evaluator's decision.
fn datapath_disagrees(
    state: &DatapathState,
    src: &Endpoint,
    dst: &Endpoint,
    proto: Protocol,
    port: u16,
    d: &Decision,
) -> Option<String> {
    let (Some(sip), Some(dip)) = (addr(src, dst), addr(dst, src)) else {
        return None; // a pod without addresses: nothing to enforce on
    };
    let sides = [
        (matches!(src, Endpoint::Pod(..)), sip, dip, Direction::Egress, &d.egress),
        (matches!(dst, Endpoint::Pod(..)), dip, sip, Direction::Ingress, &d.ingress),
    ];
    for (is_pod, me, peer, dir, want) in sides {
        if !is_pod {
            continue;
        }
        let ep = state.endpoints.get(&me)?;
        let isolation = match dir {
            Direction::Egress => ep.egress_isolation,
            Direction::Ingress => ep.ingress_isolation,
        };
        let (allowed, by): (bool, Vec<String>) = match isolation {
            None => (true, vec![]),
            Some(_) => match lookup(state, ep.endpoint, dir, peer, proto, port) {
                Some(set) => (true, state.set(set).iter().map(|p| p.to_string()).collect()),
                None => (false, vec![]),
            },
        };
        let want_by: Vec<String> = want.allowed_by.iter().map(|p| p.to_string()).collect();
        if allowed != want.allowed || (allowed && by != want_by) {
            return Some(format!(
                "{dir:?}: datapath allowed={allowed} by {by:?}, evaluator allowed={} by {want_by:?}",
                want.allowed
            ));
        }
    }
    None
}

struct Tally {
    probes: usize,
    cases: usize,
    failures: Vec<String>,
}

fn run_case(file: &str, cluster: &Cluster, case: &Case, t: &mut Tally) -> Result<(), String> {
    t.cases += 1;
    let origin = Origin {
        source: format!("{file}:{}", case.name),
        document: 0,
    };
    let mut compiled = Vec::new();
    let mut errors = Vec::new();
    for v in &case.policies {
        match compile(&origin, &policy_of(v)?) {
            Ok(p) => compiled.push(p),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if let Some(want) = &case.error {
        t.probes += 1;
        if !errors.iter().any(|e| e.contains(want.as_str())) {
            t.failures.push(format!(
                "{file} / {}: expected a validation error containing {want:?}, got {errors:?}",
                case.name
            ));
        }
        return Ok(());
    }
    if !errors.is_empty() {
        t.failures.push(format!("{file} / {}: policies rejected: {errors:?}", case.name));
        return Ok(());
    }
    let engine = Engine::new(compiled);
    let state = compile_datapath(
        cluster,
        &engine,
        &NodeView {
            is_local: &|_| true,
            mode_of: &|_| Mode::Enforce,
        },
        &mut IdentityAllocator::new(),
        SetTable::new(),
    );
    let mut check = |from: &str, to: &str, proto: Protocol, port: u16, expect: Expect, policies: Option<&Vec<String>>| -> Result<(), String> {
        t.probes += 1;
        let src = endpoint(cluster, from)?;
        let dst = endpoint(cluster, to)?;
        let d = engine.evaluate(cluster, &src, &dst, proto, port);
        let got = if d.allowed { Expect::Allow } else { Expect::Deny };
        let deciding: Vec<String> = d.deciding().iter().map(|p| p.to_string()).collect();
        if got != expect {
            t.failures.push(format!(
                "{file} / {}: {from} -> {to} {}/{port}: expected {expect:?}, got {got:?} (deciding {deciding:?}; egress {:?}; ingress {:?})",
                case.name,
                proto.as_str(),
                d.egress,
                d.ingress
            ));
        } else if let Some(msg) = datapath_disagrees(&state, &src, &dst, proto, port, &d).or_else(|| {
            // The same two ends with a packet whose ports cannot be read: the datapath
            // decides it as the evaluator does (only rules without ports admit it).
            let u = engine.evaluate(cluster, &src, &dst, Protocol::L4Unknown, 0);
            datapath_disagrees(&state, &src, &dst, Protocol::L4Unknown, 0, &u).map(|m| format!("with L4 unknown: {m}"))
        }) {
            t.failures.push(format!(
                "{file} / {}: {from} -> {to} {}/{port}: compiled datapath disagrees: {msg}",
                case.name,
                proto.as_str()
            ));
        } else if let Some(want) = policies {
            let mut want = want.clone();
            want.sort();
            if want != deciding {
                t.failures.push(format!(
                    "{file} / {}: {from} -> {to} {}/{port}: deciding policies {deciding:?}, expected {want:?}",
                    case.name,
                    proto.as_str()
                ));
            }
        }
        Ok(())
    };
    for p in &case.probes {
        check(&p.from, &p.to, protocol(&p.protocol)?, p.port, p.expect, p.policies.as_ref())?;
    }
    for m in &case.matrix {
        let proto = protocol(&m.protocol)?;
        for a in cluster.pods() {
            for b in cluster.pods() {
                let flipped = m
                    .except
                    .iter()
                    .any(|e| pattern_matches(&e.from, a) && pattern_matches(&e.to, b));
                let expect = match (m.default, flipped) {
                    (e, false) => e,
                    (Expect::Allow, true) => Expect::Deny,
                    (Expect::Deny, true) => Expect::Allow,
                };
                let from = format!("{}/{}", a.namespace, a.name);
                let to = format!("{}/{}", b.namespace, b.name);
                check(&from, &to, proto, m.port, expect, None)?;
            }
        }
    }
    Ok(())
}

#[test]
fn the_whole_table_passes() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .expect("conformance dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no conformance files");
    let mut t = Tally {
        probes: 0,
        cases: 0,
        failures: Vec::new(),
    };
    for path in &files {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let text = std::fs::read_to_string(path).expect("read");
        let file: File = match serde_yaml::from_str(&text) {
            Ok(f) => f,
            Err(e) => {
                t.failures.push(format!("{name}: does not parse: {e}"));
                continue;
            }
        };
        let def = match (&file.cluster, &file.model) {
            (Some(c), None) => c.clone(),
            (None, Some(m)) => {
                let mp = dir().join("models").join(format!("{m}.yaml"));
                let mt = std::fs::read_to_string(&mp).expect("model file");
                let mf: File = serde_yaml::from_str(&mt).expect("model parses");
                mf.cluster.expect("model has a cluster")
            }
            (None, None) if file.cases.iter().all(|c| c.error.is_some()) => ClusterDef {
                namespaces: vec![],
                pods: vec![],
            },
            _ => {
                t.failures.push(format!("{name}: needs exactly one of cluster and model"));
                continue;
            }
        };
        let cluster = match cluster_of(&def) {
            Ok(c) => c,
            Err(e) => {
                t.failures.push(format!("{name}: cluster: {e}"));
                continue;
            }
        };
        let mut names = std::collections::HashSet::new();
        for case in &file.cases {
            if !names.insert(case.name.clone()) {
                t.failures.push(format!("{name}: duplicate case {}", case.name));
            }
            let _ = &case.source;
            if let Err(e) = run_case(&name, &cluster, case, &mut t) {
                t.failures.push(format!("{name} / {}: {e}", case.name));
            }
        }
    }
    println!(
        "conformance: {} files, {} cases, {} probes, {} failures",
        files.len(),
        t.cases,
        t.probes,
        t.failures.len()
    );
    for f in &t.failures {
        println!("FAIL {f}");
    }
    assert!(t.failures.is_empty(), "{} conformance failures (listed above)", t.failures.len());
}
