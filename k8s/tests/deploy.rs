//! deploy/ checked offline, as far as a cluster's API server would check it:
//! - the Helm chart lints (`helm lint --strict`) and renders for each documented value
//!   set in deploy/helm/flows/ci/, and values its schema forbids fail to render;
//! - deploy/manifests/flows.yaml is exactly the chart rendered by its documented command;
//! - every object parses as its typed Kubernetes object with no unknown or null field
//!   (typed, serialised again, compared with the input);
//! - the API server's rules that can be checked locally hold: names, labels, selectors
//!   that select their pods, unique container and port names, probes with one handler
//!   on a declared port, requests within limits, mounts of declared volumes, Services
//!   that select a workload and name its ports, bindings to existing roles and service
//!   accounts, NetworkPolicies through flows-policy's validation;
//! - and flows' own rules: read-only RBAC without secrets, the probe's exact
//!   capabilities, no privileged container, no privilege escalation, read-only roots.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, StatefulSet},
        core::v1::{ConfigMap, Container, Namespace, PodSpec, PodTemplateSpec, Secret, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    root().join("deploy/helm/flows")
}

fn helm(args: &[&str]) -> std::process::Output {
    Command::new("helm")
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("running helm ({e}): scripts/setup.sh installs it"))
}

fn render(extra: &[&str]) -> String {
    let chart = chart().display().to_string();
    let mut args = vec!["template", "flows", chart.as_str(), "--namespace", "flows-system"];
    args.extend_from_slice(extra);
    let out = helm(&args);
    assert!(out.status.success(), "helm {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn value_sets() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .expect("deploy/helm/flows/ci")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    assert!(v.len() >= 3, "documented value sets in ci/: {v:?}");
    v
}

fn documents(text: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(doc).expect("YAML");
        if !v.is_null() {
            out.push(v);
        }
    }
    out
}

/// Paths present in `input` but not in `typed` (fields the type does not know, or
/// values it changed), and nulls anywhere in `input`.
fn differences(input: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (input, typed) {
        (Value::Null, _) => out.push(format!("{path}: null")),
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => differences(v, w, &p, out),
                    None => out.push(format!("{p}: unknown field")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                differences(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} read as {b}")),
    }
}

/// Parses `v` as `T`, and returns what did not survive the round trip.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Result<T, Vec<String>> {
    let t: T = serde_json::from_value(v.clone()).map_err(|e| vec![format!("does not parse: {e}")])?;
    let back = serde_json::to_value(&t).expect("serialise");
    let mut diffs = Vec::new();
    differences(v, &back, "", &mut diffs);
    if diffs.is_empty() { Ok(t) } else { Err(diffs) }
}

#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    daemonsets: Vec<DaemonSet>,
    deployments: Vec<Deployment>,
    statefulsets: Vec<StatefulSet>,
    services: Vec<Service>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    network_policies: Vec<NetworkPolicy>,
    config_maps: Vec<ConfigMap>,
    secrets: Vec<Secret>,
    pdbs: Vec<PodDisruptionBudget>,
}

struct Checker {
    what: String,
    errors: Vec<String>,
}

impl Checker {
    fn err(&mut self, at: &str, msg: impl Into<String>) {
        self.errors.push(format!("{}: {at}: {}", self.what, msg.into()));
    }
}

fn parse(what: &str, text: &str) -> (Objects, Checker) {
    let mut o = Objects::default();
    let mut c = Checker { what: what.to_string(), errors: Vec::new() };
    for v in documents(text) {
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        let api = v["apiVersion"].as_str().unwrap_or_default().to_string();
        let name = v["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let at = format!("{kind}/{name}");
        macro_rules! take {
            ($ty:ty, $api:expr, $list:ident) => {{
                if api != $api {
                    c.err(&at, format!("apiVersion {api}, expected {}", $api));
                }
                match typed::<$ty>(&v) {
                    Ok(t) => o.$list.push(t),
                    Err(d) => c.err(&at, d.join("; ")),
                }
            }};
        }
        match kind.as_str() {
            "Namespace" => take!(Namespace, "v1", namespaces),
            "DaemonSet" => take!(DaemonSet, "apps/v1", daemonsets),
            "Deployment" => take!(Deployment, "apps/v1", deployments),
            "StatefulSet" => take!(StatefulSet, "apps/v1", statefulsets),
            "Service" => take!(Service, "v1", services),
            "ServiceAccount" => take!(ServiceAccount, "v1", service_accounts),
            "ClusterRole" => take!(ClusterRole, "rbac.authorization.k8s.io/v1", cluster_roles),
            "ClusterRoleBinding" => take!(ClusterRoleBinding, "rbac.authorization.k8s.io/v1", cluster_role_bindings),
            "Role" => take!(Role, "rbac.authorization.k8s.io/v1", roles),
            "RoleBinding" => take!(RoleBinding, "rbac.authorization.k8s.io/v1", role_bindings),
            "NetworkPolicy" => take!(NetworkPolicy, "networking.k8s.io/v1", network_policies),
            "ConfigMap" => take!(ConfigMap, "v1", config_maps),
            "Secret" => take!(Secret, "v1", secrets),
            "PodDisruptionBudget" => take!(PodDisruptionBudget, "policy/v1", pdbs),
            other => c.err(&at, format!("kind {other:?} is not checked here: add it")),
        }
    }
    (o, c)
}

fn meta(c: &mut Checker, kind: &str, m: &ObjectMeta, namespaced: bool) {
    let name = m.name.clone().unwrap_or_default();
    let at = format!("{kind}/{name}");
    let name_ok = match kind {
        // Namespaces and Services are DNS labels; the rest, DNS subdomains.
        "Namespace" | "Service" => flows_policy::validate::is_dns1123_label(&name),
        _ => flows_policy::validate::is_dns1123_subdomain(&name),
    };
    if !name_ok {
        c.err(&at, format!("invalid name {name:?}"));
    }
    match (&m.namespace, namespaced) {
        (Some(ns), true) if ns == "flows-system" => {}
        (ns, true) => c.err(&at, format!("namespace {ns:?}, expected flows-system")),
        (Some(ns), false) => c.err(&at, format!("cluster-scoped object with namespace {ns}")),
        (None, false) => {}
    }
    for (k, v) in m.labels.iter().flatten() {
        if !flows_policy::validate::is_label_key(k) || !flows_policy::validate::is_label_value(v) {
            c.err(&at, format!("invalid label {k}={v}"));
        }
    }
    for k in m.annotations.iter().flatten().map(|(k, _)| k) {
        if !flows_policy::validate::is_label_key(k) {
            c.err(&at, format!("invalid annotation key {k}"));
        }
    }
}

/// Quantities as numbers, enough to compare requests with limits.
fn quantity(q: &Quantity) -> Option<f64> {
    let s = q.0.as_str();
    let (num, mult) = [
        ("Ki", 1024f64),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("m", 1e-3),
    ]
    .iter()
    .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
    .unwrap_or((s, 1.0));
    num.parse::<f64>().ok().map(|n| n * mult)
}

fn container(c: &mut Checker, at: &str, k: &Container, volumes: &BTreeSet<String>) {
    let at = format!("{at} container {}", k.name);
    if !flows_policy::validate::is_dns1123_label(&k.name) {
        c.err(&at, "invalid container name");
    }
    if k.image.as_deref().is_none_or(str::is_empty) {
        c.err(&at, "no image");
    }
    let mut ports = BTreeSet::new();
    for p in k.ports.iter().flatten() {
        if !(1..=65535).contains(&p.container_port) {
            c.err(&at, format!("containerPort {}", p.container_port));
        }
        if let Some(n) = &p.name {
            if !flows_policy::validate::is_port_name(n) {
                c.err(&at, format!("invalid port name {n:?}"));
            }
            if !ports.insert(n.clone()) {
                c.err(&at, format!("port name {n} twice"));
            }
        }
    }
    for (which, probe) in [("liveness", &k.liveness_probe), ("readiness", &k.readiness_probe), ("startup", &k.startup_probe)] {
        let Some(p) = probe else { continue };
        let handlers = [p.exec.is_some(), p.http_get.is_some(), p.tcp_socket.is_some(), p.grpc.is_some()];
        if handlers.iter().filter(|h| **h).count() != 1 {
            c.err(&at, format!("{which} probe needs exactly one handler"));
        }
        let port = p.http_get.as_ref().map(|h| &h.port).or(p.tcp_socket.as_ref().map(|t| &t.port));
        if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(n)) = port {
            if !ports.contains(n) {
                c.err(&at, format!("{which} probe on undeclared port {n}"));
            }
        }
        if which == "startup" && p.success_threshold.is_some_and(|s| s != 1) {
            c.err(&at, "startup probe successThreshold must be 1");
        }
    }
    if let Some(r) = &k.resources {
        for (res, req) in r.requests.iter().flatten() {
            let lim = r.limits.as_ref().and_then(|l| l.get(res));
            match (quantity(req), lim.map(quantity)) {
                (None, _) | (_, Some(None)) => c.err(&at, format!("unreadable quantity for {res}")),
                (Some(a), Some(Some(b))) if a > b => c.err(&at, format!("{res} request {} above limit", req.0)),
                _ => {}
            }
        }
        if r.limits.as_ref().is_none_or(|l| !l.contains_key("memory")) {
            c.err(&at, "no memory limit");
        }
    } else {
        c.err(&at, "no resources");
    }
    let mut mounts = BTreeSet::new();
    for m in k.volume_mounts.iter().flatten() {
        if !volumes.contains(&m.name) {
            c.err(&at, format!("mount of undeclared volume {}", m.name));
        }
        if !mounts.insert(m.mount_path.clone()) {
            c.err(&at, format!("two mounts at {}", m.mount_path));
        }
    }
    for e in k.env.iter().flatten() {
        if e.value.is_some() && e.value_from.is_some() {
            c.err(&at, format!("env {} has both value and valueFrom", e.name));
        }
    }
    // flows' own rules for every container.
    let sc = k.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true) {
        c.err(&at, "privileged");
    }
    if sc.allow_privilege_escalation != Some(false) {
        c.err(&at, "allowPrivilegeEscalation is not false");
    }
    if sc.read_only_root_filesystem != Some(true) {
        c.err(&at, "root filesystem is not read-only");
    }
    let caps = sc.capabilities.unwrap_or_default();
    if !caps.drop.iter().flatten().any(|d| d == "ALL") {
        c.err(&at, "capabilities are not dropped (drop: [ALL])");
    }
}

fn pod(c: &mut Checker, at: &str, spec: &PodSpec, claims: &[String]) {
    // A StatefulSet's volumeClaimTemplates are volumes of its pods too.
    let mut volumes: BTreeSet<String> = claims.iter().cloned().collect();
    for v in spec.volumes.iter().flatten() {
        if !flows_policy::validate::is_dns1123_label(&v.name) {
            c.err(at, format!("invalid volume name {}", v.name));
        }
        if !volumes.insert(v.name.clone()) {
            c.err(at, format!("volume {} twice", v.name));
        }
    }
    let mut names = BTreeSet::new();
    for k in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        if !names.insert(k.name.clone()) {
            c.err(at, format!("container {} twice", k.name));
        }
        container(c, at, k, &volumes);
    }
    if spec.containers.is_empty() {
        c.err(at, "no containers");
    }
}

fn workload(
    c: &mut Checker,
    kind: &str,
    m: &ObjectMeta,
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    template: &PodTemplateSpec,
    claims: &[String],
) -> (String, BTreeMap<String, String>) {
    meta(c, kind, m, true);
    let at = format!("{kind}/{}", m.name.clone().unwrap_or_default());
    let labels: BTreeMap<String, String> = template.metadata.as_ref().and_then(|t| t.labels.clone()).unwrap_or_default();
    let wanted = selector.match_labels.clone().unwrap_or_default();
    if wanted.is_empty() && selector.match_expressions.is_none() {
        c.err(&at, "empty selector");
    }
    for (k, v) in &wanted {
        if labels.get(k) != Some(v) {
            c.err(&at, format!("selector {k}={v} does not select its own pods"));
        }
    }
    match &template.spec {
        Some(spec) => pod(c, &at, spec, claims),
        None => c.err(&at, "no pod spec"),
    }
    (at, labels)
}

/// Every rule above over one rendered set; returns the objects for rules of a case.
fn check(what: &str, text: &str) -> Objects {
    let (o, mut c) = parse(what, text);
    for n in &o.namespaces {
        meta(&mut c, "Namespace", &n.metadata, false);
    }
    let mut pods: Vec<(String, BTreeMap<String, String>, Vec<Container>)> = Vec::new();
    for d in &o.daemonsets {
        let (at, l) = workload(&mut c, "DaemonSet", &d.metadata, &d.spec.as_ref().expect("spec").selector, &d.spec.as_ref().expect("spec").template, &[]);
        pods.push((at, l, d.spec.as_ref().and_then(|s| s.template.spec.clone()).map(|s| s.containers).unwrap_or_default()));
    }
    for d in &o.deployments {
        let s = d.spec.as_ref().expect("spec");
        let (at, l) = workload(&mut c, "Deployment", &d.metadata, &s.selector, &s.template, &[]);
        pods.push((at, l, s.template.spec.clone().map(|s| s.containers).unwrap_or_default()));
    }
    for d in &o.statefulsets {
        let s = d.spec.as_ref().expect("spec");
        let claims: Vec<String> =
            s.volume_claim_templates.iter().flatten().filter_map(|p| p.metadata.name.clone()).collect();
        let (at, l) = workload(&mut c, "StatefulSet", &d.metadata, &s.selector, &s.template, &claims);
        if let Some(svc) = &s.service_name {
            if !o.services.iter().any(|x| x.metadata.name.as_ref() == Some(svc)) {
                c.err(&at, format!("serviceName {svc} is no Service here"));
            }
        }
        pods.push((at, l, s.template.spec.clone().map(|s| s.containers).unwrap_or_default()));
    }
    let accounts: BTreeSet<String> = o.service_accounts.iter().filter_map(|s| s.metadata.name.clone()).collect();
    for s in &o.service_accounts {
        meta(&mut c, "ServiceAccount", &s.metadata, true);
    }
    for d in o.daemonsets.iter().map(|d| (&d.metadata, &d.spec.as_ref().expect("spec").template))
        .chain(o.deployments.iter().map(|d| (&d.metadata, &d.spec.as_ref().expect("spec").template)))
        .chain(o.statefulsets.iter().map(|d| (&d.metadata, &d.spec.as_ref().expect("spec").template)))
    {
        let sa = d.1.spec.as_ref().and_then(|s| s.service_account_name.clone());
        match sa {
            Some(sa) if accounts.contains(&sa) => {}
            sa => c.err(&format!("{:?}", d.0.name), format!("serviceAccountName {sa:?} is not defined here")),
        }
    }
    for s in &o.services {
        meta(&mut c, "Service", &s.metadata, true);
        let at = format!("Service/{}", s.metadata.name.clone().unwrap_or_default());
        let spec = s.spec.clone().unwrap_or_default();
        let sel = spec.selector.clone().unwrap_or_default();
        let backing: Vec<&(String, BTreeMap<String, String>, Vec<Container>)> =
            pods.iter().filter(|(_, l, _)| !sel.is_empty() && sel.iter().all(|(k, v)| l.get(k) == Some(v))).collect();
        if backing.is_empty() {
            c.err(&at, "selects no workload of this release");
        }
        for p in spec.ports.iter().flatten() {
            if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(n)) = &p.target_port {
                let declared = backing.iter().any(|(_, _, cs)| cs.iter().flat_map(|k| k.ports.iter().flatten()).any(|cp| cp.name.as_ref() == Some(n)));
                if !declared {
                    c.err(&at, format!("targetPort {n} is no container port of its pods"));
                }
            }
            if p.name.as_ref().is_some_and(|n| !flows_policy::validate::is_port_name(n)) {
                c.err(&at, format!("invalid port name {:?}", p.name));
            }
        }
    }
    // RBAC: read-only, named resources, no secrets.
    for r in &o.cluster_roles {
        meta(&mut c, "ClusterRole", &r.metadata, false);
        let at = format!("ClusterRole/{}", r.metadata.name.clone().unwrap_or_default());
        for rule in r.rules.iter().flatten() {
            for v in &rule.verbs {
                if !matches!(v.as_str(), "get" | "list" | "watch") {
                    c.err(&at, format!("verb {v} (only get, list, watch)"));
                }
            }
            for res in rule.resources.iter().flatten() {
                if res == "*" || res == "secrets" || res.contains('/') {
                    c.err(&at, format!("resource {res}"));
                }
            }
            if rule.api_groups.iter().flatten().any(|g| g == "*") {
                c.err(&at, "apiGroup *");
            }
        }
    }
    for b in &o.cluster_role_bindings {
        meta(&mut c, "ClusterRoleBinding", &b.metadata, false);
        let at = format!("ClusterRoleBinding/{}", b.metadata.name.clone().unwrap_or_default());
        if b.role_ref.kind != "ClusterRole" || !o.cluster_roles.iter().any(|r| r.metadata.name.as_ref() == Some(&b.role_ref.name)) {
            c.err(&at, format!("roleRef {} {} is not defined here", b.role_ref.kind, b.role_ref.name));
        }
        for s in b.subjects.iter().flatten() {
            if s.kind != "ServiceAccount" || !accounts.contains(&s.name) || s.namespace.as_deref() != Some("flows-system") {
                c.err(&at, format!("subject {} {} {:?} is not a service account here", s.kind, s.name, s.namespace));
            }
        }
    }
    for r in &o.roles {
        meta(&mut c, "Role", &r.metadata, true);
    }
    for b in &o.role_bindings {
        meta(&mut c, "RoleBinding", &b.metadata, true);
    }
    for np in &o.network_policies {
        meta(&mut c, "NetworkPolicy", &np.metadata, true);
        for e in flows_policy::validate::network_policy(np) {
            c.err(&format!("NetworkPolicy/{}", np.metadata.name.clone().unwrap_or_default()), format!("{}: {}", e.field, e.message));
        }
    }
    for m in &o.config_maps {
        meta(&mut c, "ConfigMap", &m.metadata, true);
    }
    for s in &o.secrets {
        meta(&mut c, "Secret", &s.metadata, true);
    }
    // The node-probe: host network, exactly the capabilities it needs, no API token;
    // any other container of its pod adds none.
    for d in &o.daemonsets {
        let at = format!("DaemonSet/{}", d.metadata.name.clone().unwrap_or_default());
        for k in d.spec.as_ref().and_then(|s| s.template.spec.clone()).map(|s| s.containers).unwrap_or_default() {
            let add = k.security_context.and_then(|s| s.capabilities).and_then(|c| c.add).unwrap_or_default();
            if k.name != "node-probe" && !add.is_empty() {
                c.err(&at, format!("container {} adds capabilities {add:?}", k.name));
            }
        }
    }
    for d in &o.daemonsets {
        let at = format!("DaemonSet/{}", d.metadata.name.clone().unwrap_or_default());
        let spec = d.spec.as_ref().and_then(|s| s.template.spec.clone()).unwrap_or_default();
        if spec.host_network != Some(true) {
            c.err(&at, "the probe needs the host network (the pods' veths are there)");
        }
        if spec.automount_service_account_token != Some(false) {
            c.err(&at, "no service account token in the probe's container");
        }
        // Only kube-sync holds API credentials.
        for k in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
            let token = k.volume_mounts.iter().flatten().any(|m| m.mount_path.starts_with("/var/run/secrets/kubernetes.io"));
            if token && k.name != "kube-sync" {
                c.err(&at, format!("container {} mounts an API token", k.name));
            }
        }
        if !spec.tolerations.iter().flatten().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()) {
            c.err(&at, "the probe does not tolerate every taint");
        }
        for k in spec.containers.iter().filter(|k| k.name == "node-probe") {
            let add: BTreeSet<String> = k
                .security_context
                .as_ref()
                .and_then(|s| s.capabilities.as_ref())
                .and_then(|c| c.add.clone())
                .unwrap_or_default()
                .into_iter()
                .collect();
            let allowed: BTreeSet<String> = ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"].map(String::from).into();
            if !add.is_subset(&allowed) || !add.contains("BPF") || !add.contains("NET_ADMIN") {
                c.err(&at, format!("capabilities {add:?}: BPF and NET_ADMIN, and at most PERFMON, SYS_RESOURCE"));
            }
        }
    }
    for d in o.deployments.iter() {
        let at = format!("Deployment/{}", d.metadata.name.clone().unwrap_or_default());
        for k in d.spec.as_ref().and_then(|s| s.template.spec.clone()).map(|s| s.containers).unwrap_or_default() {
            let sc = k.security_context.unwrap_or_default();
            if sc.run_as_non_root != Some(true) {
                c.err(&at, "the relay runs as root");
            }
            if sc.capabilities.and_then(|c| c.add).is_some_and(|a| !a.is_empty()) {
                c.err(&at, "the relay adds capabilities");
            }
        }
    }
    assert!(c.errors.is_empty(), "{} problems:\n{}", c.errors.len(), c.errors.join("\n"));
    o
}

fn args_of(o: &Objects, kind: &str) -> Vec<String> {
    let spec = match kind {
        "DaemonSet" => o.daemonsets[0].spec.as_ref().and_then(|s| s.template.spec.clone()),
        _ => o.deployments[0].spec.as_ref().and_then(|s| s.template.spec.clone()),
    };
    spec.map(|s| s.containers[0].args.clone().unwrap_or_default()).unwrap_or_default()
}

#[test]
fn the_chart_lints_and_renders_valid_objects_for_every_documented_value_set() {
    let chart = chart().display().to_string();
    let out = helm(&["lint", "--strict", &chart]);
    assert!(out.status.success(), "helm lint:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let default = check("defaults", &render(&[]));
    assert_eq!(default.daemonsets.len(), 1, "one node-probe DaemonSet");
    assert_eq!(default.deployments.len(), 1, "one relay Deployment");
    assert!(!default.network_policies.is_empty(), "NetworkPolicies protect flows' components");
    for values in value_sets() {
        let v = values.display().to_string();
        let out = helm(&["lint", "--strict", &chart, "-f", &v]);
        assert!(out.status.success(), "helm lint -f {v}:\n{}", String::from_utf8_lossy(&out.stdout));
        let o = check(&v, &render(&["-f", &v]));
        let name = values.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let probe = args_of(&o, "DaemonSet");
        let relay = args_of(&o, "Deployment");
        // Every flag the chart passes is one the binary takes (a renamed flag would
        // leave the pod crash-looping).
        for (bin, args) in [("flows-node-probe", &probe), ("flows-relay", &relay)] {
            let help = flags_of(bin);
            for a in args.iter().filter_map(|a| a.strip_prefix("--")) {
                let flag = a.split('=').next().unwrap_or_default();
                assert!(help.contains(flag), "{v}: {bin} has no --{flag}");
            }
        }
        match name {
            "tls" => {
                for a in ["--tls-cert", "--tls-key", "--tls-client-ca"] {
                    assert!(probe.iter().any(|x| x.starts_with(a)), "probe {a}: {probe:?}");
                    assert!(relay.iter().any(|x| x.starts_with(a)), "relay {a}: {relay:?}");
                }
                for a in ["--peer-tls-ca", "--peer-tls-cert", "--peer-tls-key", "--peer-tls-server-name"] {
                    assert!(relay.iter().any(|x| x.starts_with(a)), "relay {a}: {relay:?}");
                }
            }
            "plaintext" => {
                // Said out loud: both refuse plaintext on the network without it.
                assert!(probe.iter().any(|x| x == "--insecure-listen"), "{probe:?}");
                assert!(relay.iter().any(|x| x == "--insecure-listen"), "{relay:?}");
                assert!(!probe.iter().chain(&relay).any(|x| x.starts_with("--tls")), "{probe:?} {relay:?}");
                assert!(o.secrets.iter().all(|s| s.metadata.name.as_deref() != Some("flows-tls")), "no certificates made");
            }
            "external-clickhouse" => {
                assert!(o.statefulsets.is_empty(), "no in-chart ClickHouse");
                assert!(relay.iter().any(|x| x.starts_with("--store")), "{relay:?}");
            }
            "audit-mode" => assert!(probe.iter().any(|x| x == "--default-policy-mode=audit"), "{probe:?}"),
            "enforce" => {
                assert!(probe.iter().any(|x| x == "--default-policy-mode=enforce"), "{probe:?}");
                // The policy source: kube-sync beside the probe, writing what it reads.
                let spec = o.daemonsets[0].spec.as_ref().and_then(|s| s.template.spec.clone()).expect("pod");
                let sync = spec.containers.iter().find(|k| k.name == "kube-sync").expect("kube-sync sidecar");
                let out = sync.args.clone().unwrap_or_default().into_iter().find_map(|a| a.strip_prefix("--out=").map(String::from));
                let read = probe.iter().find_map(|a| a.strip_prefix("--manifests=").map(String::from));
                assert!(out.is_some() && out == read, "kube-sync writes {out:?}, the probe reads {read:?}");
                let role = o
                    .cluster_roles
                    .iter()
                    .find(|r| r.metadata.name.as_deref() == Some("flows-node-probe"))
                    .expect("the probe's ClusterRole");
                let resources: BTreeSet<String> =
                    role.rules.iter().flatten().flat_map(|r| r.resources.clone().unwrap_or_default()).collect();
                assert_eq!(resources, ["namespaces", "networkpolicies", "pods"].map(String::from).into());
            }
            _ => {}
        }
        // No password is ever an argument.
        for a in probe.iter().chain(&relay) {
            assert!(!a.to_lowercase().contains("password"), "a password in args: {a}");
        }
    }
}

#[test]
fn the_plain_manifests_are_the_chart_rendered() {
    let text = std::fs::read_to_string(root().join("deploy/manifests/flows.yaml")).expect("deploy/manifests/flows.yaml");
    let fresh = render(&[
        "--set",
        "createNamespace=true",
        "--set",
        "clickhouse.auth.existingSecret=flows-clickhouse-auth",
        "--set",
        "tls.generate=false",
    ]);
    assert!(
        text == fresh,
        "deploy/manifests/flows.yaml is stale: render it again with the command at its top"
    );
    let o = check("deploy/manifests/flows.yaml", &text);
    assert_eq!(o.namespaces.len(), 1);
    // A committed file carries no generated secret.
    assert!(o.secrets.is_empty(), "a Secret in the plain manifests");
}

#[test]
fn values_the_schema_forbids_do_not_render() {
    let chart = chart().display().to_string();
    for bad in [
        "nodeProbe.ringCapacity=1000",
        "nodeProbe.defaultPolicyMode=sometimes",
        "store.whenFull=maybe",
        "nodeProbe.port=70000",
        // The probe gets a directory of bpffs of its own, never the whole of it.
        "nodeProbe.pinDir=/sys/fs/bpf",
        "nodeProbe.pinDir=/var/lib/flows",
        "notAValue=1",
    ] {
        let out = helm(&["template", "flows", &chart, "--namespace", "flows-system", "--set", bad]);
        assert!(!out.status.success(), "--set {bad} rendered");
    }
}

/// The checks above can fail: each planted mistake is caught.
#[test]
fn planted_mistakes_are_caught() {
    let good = render(&[]);
    for (what, from, to) in [
        ("an unknown field", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: true\n            readOnlyRootFilesytem: true"),
        ("a write verb", r#"verbs: ["get", "list", "watch"]"#, r#"verbs: ["get", "list", "watch", "create"]"#),
        ("a privileged container", "privileged: false", "privileged: true"),
        ("a null", "hostNetwork: true", "hostNetwork: true\n      nodeName: null"),
        ("a wrong type", "terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: soon"),
    ] {
        assert!(good.contains(from), "{what}: {from:?} not in the render");
        let bad = good.replacen(from, to, 1);
        let caught = std::panic::catch_unwind(|| check(what, &bad)).is_err();
        assert!(caught, "{what} was not caught");
    }
}

/// A process killed and reaped when the test ends, however it ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The workspace's binaries (built by `cargo build --bins`, as scripts/test.sh does).
/// The long flags a binary's --help lists.
fn flags_of(bin: &str) -> BTreeSet<String> {
    let out = Command::new(binary(bin)).arg("--help").output().expect("--help");
    assert!(out.status.success(), "{bin} --help");
    String::from_utf8_lossy(&out.stdout)
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == '<')
        .filter_map(|w| w.strip_prefix("--"))
        .map(String::from)
        .collect()
}

fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let p = exe.parent().and_then(Path::parent).expect("target dir").join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --bins` first", p.display());
    p
}

/// With the chart's defaults, mutual TLS is on and the certificates are made at
/// install; they work with flows' own binaries: the relay serves with them, a client
/// with the generated client certificate is served, one without a certificate or
/// checking another name is refused.
#[test]
fn the_certificates_the_chart_makes_work_with_the_relay() {
    let o = check("defaults", &render(&[]));
    let probe = args_of(&o, "DaemonSet");
    assert!(probe.iter().any(|a| a.starts_with("--tls-cert")) && !probe.iter().any(|a| a == "--insecure-listen"), "{probe:?}");
    let secret = o.secrets.iter().find(|s| s.metadata.name.as_deref() == Some("flows-tls")).expect("the chart makes flows-tls");
    let data = secret.data.clone().expect("data");
    let keys: BTreeSet<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(keys, ["ca.crt", "client.crt", "client.key", "probe.crt", "probe.key", "relay.crt", "relay.key"].into());
    let dir = std::env::temp_dir().join(format!("flows-chart-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for (k, v) in &data {
        std::fs::write(dir.join(k), &v.0).expect("write");
    }
    let f = |n: &str| dir.join(n).display().to_string();
    let allowed = |args: &[String]| -> Vec<String> {
        args.iter().filter_map(|a| a.strip_prefix("--tls-allow-client=").map(String::from)).collect()
    };
    let relay_args = args_of(&o, "Deployment");
    // A server with the chart's certificate and allow list for that side: the relay as
    // the chart runs it, and the probe's side played by the same binary (it serves the
    // same Observer API under the same TLS rules).
    let serve = |cert: &str, key: &str, allow: Vec<String>| {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
        let addr = format!("127.0.0.1:{port}");
        let ready = dir.join(format!("ready-{port}"));
        let mut cmd = Command::new(binary("flows-relay"));
        cmd.args(["--peer", "node-1=127.0.0.1:9", "--listen", &addr])
            .args(["--tls-cert", &f(cert), "--tls-key", &f(key), "--tls-client-ca", &f("ca.crt")])
            .args(["--ready-file", &ready.display().to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for a in allow {
            cmd.args(["--tls-allow-client", &a]);
        }
        let child = Reaped(cmd.spawn().expect("relay"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !ready.exists() {
            assert!(std::time::Instant::now() < deadline, "a server did not start with the chart's certificates");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        (child, addr)
    };
    let observe = |addr: &str, name: &str, client: Option<(&str, &str)>| {
        let mut cmd = Command::new(binary("flows"));
        cmd.args(["observe", "--server", addr, "--last", "1", "--tls-ca", &f("ca.crt"), "--tls-server-name", name]);
        if let Some((cert, key)) = client {
            cmd.args(["--tls-client-cert", &f(cert), "--tls-client-key", &f(key)]);
        }
        cmd.output().expect("flows observe")
    };
    let (_relay, addr) = serve("relay.crt", "relay.key", allowed(&relay_args));
    let ok = observe(&addr, "flows-relay", Some(("client.crt", "client.key")));
    assert!(ok.status.success(), "served with the generated client certificate: {}", String::from_utf8_lossy(&ok.stderr));
    assert!(!observe(&addr, "flows-relay", None).status.success(), "served without a client certificate");
    let other_name = observe(&addr, "someone-else", Some(("client.crt", "client.key")));
    assert!(!other_name.status.success(), "the relay's certificate passed for another name");
    // Identity, not just the CA: the probes' own certificate is of the same CA, and is
    // refused as a client of the relay.
    let probe_as_client = observe(&addr, "flows-relay", Some(("probe.crt", "probe.key")));
    let err = String::from_utf8_lossy(&probe_as_client.stderr);
    assert!(!probe_as_client.status.success() && err.contains("not allowed"), "{err}");
    // The probes' side: the relay's certificate is served, a person's is not.
    let (_probe, paddr) = serve("probe.crt", "probe.key", allowed(&probe));
    let relay_as_client = observe(&paddr, "node-probe.flows.local", Some(("relay.crt", "relay.key")));
    assert!(relay_as_client.status.success(), "a probe serves the relay: {}", String::from_utf8_lossy(&relay_as_client.stderr));
    assert!(!observe(&paddr, "node-probe.flows.local", Some(("client.crt", "client.key"))).status.success(), "a probe served a person");
    let _ = std::fs::remove_dir_all(&dir);
}
