//! Reading the lab's input: ordinary Kubernetes YAML (Namespace, Pod, Deployment, Service),
//! parsed with k8s-openapi types and validated the way the API server would, with errors that
//! name the file, the document and the field.

use flows_policy::validate;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;

use crate::error::LabError;
use crate::state::{PortRec, ServicePortRec};

/// Where an object came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based index of the YAML document in the file.
    pub doc: usize,
    /// "Kind ns/name", as far as known.
    pub object: String,
}

impl Origin {
    pub(crate) fn err(&self, field: impl Into<String>, message: impl Into<String>) -> LabError {
        LabError::Spec {
            file: self.file.clone(),
            doc: self.doc,
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Everything the input declares, in input order.
#[derive(Clone, Debug, Default)]
pub struct Input {
    pub namespaces: Vec<NamespaceIn>,
    pub workloads: Vec<WorkloadIn>,
    pub services: Vec<ServiceIn>,
}

#[derive(Clone, Debug)]
pub struct NamespaceIn {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    Pod,
    Deployment {
        replicas: u32,
        /// Stable text of the pod template; its hash is the pod-template-hash.
        template: String,
    },
}

/// A Pod, or a Deployment whose replicas the plan expands into pods.
#[derive(Clone, Debug)]
pub struct WorkloadIn {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
    /// The pod's labels (for a Deployment: its template's).
    pub labels: BTreeMap<String, String>,
    pub node_name: Option<String>,
    pub ports: Vec<PortRec>,
    pub origin: Origin,
}

#[derive(Clone, Debug)]
pub struct ServiceIn {
    pub namespace: String,
    pub name: String,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePortRec>,
    pub origin: Origin,
}

/// Reads files and directories (their manifests, as `expand_paths` lists them).
pub fn load_paths(paths: &[PathBuf]) -> Result<Input, LabError> {
    let mut input = Input::default();
    for file in expand_paths(paths)? {
        let text = std::fs::read_to_string(&file).map_err(|e| LabError::io(&file, e))?;
        parse_str(&file, &text, &mut input)?;
    }
    check_duplicates(&input)?;
    Ok(input)
}

/// The files `load_paths` reads, in the order it reads them (`flows_manifest_files`'s
/// rule); a directory without manifests is an error, as it is surely a wrong path.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LabError> {
    let mut files = Vec::new();
    for path in paths {
        let found = flows_manifest_files::list(std::slice::from_ref(path))
            .map_err(|error| LabError::Files { error })?;
        if found.is_empty() {
            return Err(LabError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "directory has no *.yaml, *.yml or *.json files"),
            ));
        }
        files.extend(found.into_iter().map(|f| f.path));
    }
    Ok(files)
}

/// Parses one multi-document YAML text into `input`. Nothing is added unless every document
/// of the text is valid.
pub fn parse_str(file: &Path, text: &str, input: &mut Input) -> Result<(), LabError> {
    // First pass: plain values, to learn each document's kind (and catch YAML syntax errors).
    let mut values = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).map_err(|e| {
            LabError::Yaml {
                file: file.to_path_buf(),
                message: format!("document {}: {e}", i + 1),
            }
        })?;
        values.push(value);
    }
    let mut staged = Input::default();
    // Second pass: the typed object, straight from the YAML so errors carry line numbers.
    for ((i, value), doc) in values
        .iter()
        .enumerate()
        .zip(serde_yaml::Deserializer::from_str(text))
    {
        let n = i + 1;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        let mut origin = Origin {
            file: file.to_path_buf(),
            doc: n,
            object: describe(value),
        };
        let Some(map) = value.as_mapping() else {
            return Err(origin.err("(document)", "not a mapping (expected a Kubernetes object)"));
        };
        let kind = match map.get("kind") {
            Some(serde_yaml::Value::String(k)) => k.as_str(),
            Some(_) => return Err(origin.err("kind", "must be a string")),
            None => return Err(origin.err("kind", "required")),
        };
        let want = match kind {
            "Namespace" | "Pod" | "Service" => Some("v1"),
            "Deployment" => Some("apps/v1"),
            _ => None,
        };
        if let Some(want) = want {
            match map.get("apiVersion") {
                Some(serde_yaml::Value::String(v)) if v == want => {}
                Some(serde_yaml::Value::String(v)) => {
                    return Err(origin.err("apiVersion", format!("{v:?}: a {kind} is {want}")));
                }
                Some(_) => return Err(origin.err("apiVersion", "must be a string")),
                None => return Err(origin.err("apiVersion", format!("required ({want})"))),
            }
        }
        match kind {
            "Namespace" => {
                let ns: Namespace = typed(doc, &origin)?;
                staged.namespaces.push(namespace_in(ns, &origin)?);
            }
            "Pod" => {
                let pod: Pod = typed(doc, &origin)?;
                staged.workloads.push(pod_in(pod, &origin)?);
            }
            "Deployment" => {
                let deploy: Deployment = typed(doc, &origin)?;
                staged.workloads.push(deployment_in(deploy, &origin)?);
            }
            "Service" => {
                let svc: Service = typed(doc, &origin)?;
                if let Some(s) = service_in(svc, &mut origin)? {
                    staged.services.push(s);
                }
            }
            other => {
                tracing::debug!(file = %file.display(), doc = n, kind = other, "not handled by the lab; skipped");
            }
        }
    }
    input.namespaces.extend(staged.namespaces);
    input.workloads.extend(staged.workloads);
    input.services.extend(staged.services);
    Ok(())
}

/// "Kind ns/name" from an untyped document, for messages about it.
fn describe(value: &serde_yaml::Value) -> String {
    let get = |v: &serde_yaml::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    let kind = get(value, "kind").unwrap_or_else(|| "object".to_string());
    let meta = value.get("metadata");
    let name = meta.and_then(|m| get(m, "name"));
    let ns = meta.and_then(|m| get(m, "namespace"));
    match (kind.as_str(), ns, name) {
        ("Namespace", _, Some(name)) => format!("Namespace {name}"),
        (_, Some(ns), Some(name)) => format!("{kind} {ns}/{name}"),
        (_, None, Some(name)) => format!("{kind} {name}"),
        _ => format!("{kind} without a name"),
    }
}

fn typed<T: DeserializeOwned>(
    doc: serde_yaml::Deserializer<'_>,
    origin: &Origin,
) -> Result<T, LabError> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." {
            "(object)".to_string()
        } else {
            field
        };
        let message = e.into_inner().to_string();
        // serde_yaml puts its own copy of the path in front of the message; keep one.
        let message = message
            .strip_prefix(&format!("{field}: "))
            .map(str::to_owned)
            .unwrap_or(message);
        origin.err(field, message)
    })
}

fn namespace_in(ns: Namespace, origin: &Origin) -> Result<NamespaceIn, LabError> {
    let name = required_name(ns.metadata.name, origin)?;
    dns_label(&name).map_err(|m| origin.err("metadata.name", m))?;
    Ok(NamespaceIn {
        name,
        labels: ns.metadata.labels.unwrap_or_default(),
        origin: origin.clone(),
    })
}

fn pod_in(pod: Pod, origin: &Origin) -> Result<WorkloadIn, LabError> {
    let name = required_name(pod.metadata.name, origin)?;
    dns_subdomain(&name).map_err(|m| origin.err("metadata.name", m))?;
    let namespace = object_namespace(pod.metadata.namespace, origin)?;
    let spec = pod.spec.ok_or_else(|| origin.err("spec", "required"))?;
    let ports = container_ports(&spec.containers, "spec.containers", origin)?;
    Ok(WorkloadIn {
        kind: WorkloadKind::Pod,
        namespace,
        name,
        labels: pod.metadata.labels.unwrap_or_default(),
        node_name: spec.node_name.filter(|n| !n.is_empty()),
        ports,
        origin: origin.clone(),
    })
}

fn deployment_in(deploy: Deployment, origin: &Origin) -> Result<WorkloadIn, LabError> {
    let name = required_name(deploy.metadata.name, origin)?;
    dns_subdomain(&name).map_err(|m| origin.err("metadata.name", m))?;
    // Pod names are `<name>-<10>-<5>` and must stay DNS subdomains.
    if name.len() > 253 - 17 {
        return Err(origin.err("metadata.name", "too long for generated pod names"));
    }
    let namespace = object_namespace(deploy.metadata.namespace, origin)?;
    let spec = deploy.spec.ok_or_else(|| origin.err("spec", "required"))?;
    let replicas = match spec.replicas {
        None => 1,
        Some(r) if (0..=10_000).contains(&r) => r as u32,
        Some(r) => {
            return Err(origin.err("spec.replicas", format!("{r} is out of range 0..=10000")));
        }
    };
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    if labels.is_empty() {
        return Err(origin.err(
            "spec.template.metadata.labels",
            "required (the selector must match them)",
        ));
    }
    if let Some(match_labels) = &spec.selector.match_labels {
        for (k, v) in match_labels {
            if labels.get(k) != Some(v) {
                return Err(origin.err(
                    format!("spec.selector.matchLabels.{k}"),
                    "does not match the template labels",
                ));
            }
        }
    }
    if spec
        .selector
        .match_expressions
        .as_ref()
        .is_some_and(|e| !e.is_empty())
    {
        tracing::debug!(object = %origin.object, "selector.matchExpressions not evaluated by the lab");
    }
    let template_text = serde_json::to_string(&spec.template)
        .map_err(|e| origin.err("spec.template", e.to_string()))?;
    let pod_spec = spec
        .template
        .spec
        .ok_or_else(|| origin.err("spec.template.spec", "required"))?;
    let ports = container_ports(
        &pod_spec.containers,
        "spec.template.spec.containers",
        origin,
    )?;
    Ok(WorkloadIn {
        kind: WorkloadKind::Deployment {
            replicas,
            template: template_text,
        },
        namespace,
        name,
        labels,
        node_name: pod_spec.node_name.filter(|n| !n.is_empty()),
        ports,
        origin: origin.clone(),
    })
}

/// `None` for Services the lab does not model (headless, ExternalName), with a warning.
fn service_in(svc: Service, origin: &mut Origin) -> Result<Option<ServiceIn>, LabError> {
    let name = required_name(svc.metadata.name, origin)?;
    dns_1035_label(&name).map_err(|m| origin.err("metadata.name", m))?;
    let namespace = object_namespace(svc.metadata.namespace, origin)?;
    let spec = svc.spec.ok_or_else(|| origin.err("spec", "required"))?;
    match spec.type_.as_deref() {
        None | Some("ClusterIP") => {}
        Some("NodePort") | Some("LoadBalancer") => {
            tracing::debug!(object = %origin.object, "only the ClusterIP part of this Service is built");
        }
        Some("ExternalName") => {
            tracing::warn!(object = %origin.object, "ExternalName services are not built by the lab; skipped");
            return Ok(None);
        }
        Some(other) => {
            return Err(origin.err("spec.type", format!("unknown type {other:?}")));
        }
    }
    if spec.cluster_ip.as_deref() == Some("None") {
        tracing::warn!(object = %origin.object, "headless services are not built by the lab; skipped");
        return Ok(None);
    }
    if let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty()) {
        tracing::debug!(object = %origin.object, cluster_ip = ip, "requested clusterIP ignored; the lab allocates its own");
    }
    let ports_in = spec.ports.unwrap_or_default();
    if ports_in.is_empty() {
        return Err(origin.err("spec.ports", "required"));
    }
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    let mut names = BTreeSet::new();
    for (i, p) in ports_in.into_iter().enumerate() {
        let at = |f: &str| format!("spec.ports[{i}].{f}");
        let port = port_number(p.port).map_err(|m| origin.err(at("port"), m))?;
        let protocol =
            protocol(p.protocol.as_deref()).map_err(|m| origin.err(at("protocol"), m))?;
        let target_port = match p.target_port {
            None => port.to_string(),
            Some(IntOrString::Int(n)) => port_number(n)
                .map_err(|m| origin.err(at("targetPort"), m))?
                .to_string(),
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => port_number(n)
                    .map_err(|m| origin.err(at("targetPort"), m))?
                    .to_string(),
                Err(_) => {
                    port_name(&s).map_err(|m| origin.err(at("targetPort"), m))?;
                    s
                }
            },
        };
        let name = p.name.filter(|n| !n.is_empty());
        match &name {
            Some(n) => {
                dns_label(n).map_err(|m| origin.err(at("name"), m))?;
                if !names.insert(n.clone()) {
                    return Err(origin.err(at("name"), format!("duplicate port name {n:?}")));
                }
            }
            None if i > 0 => {
                return Err(
                    origin.err(at("name"), "required when a Service has more than one port")
                );
            }
            None => {}
        }
        if !seen.insert((port, protocol.clone())) {
            return Err(origin.err(at("port"), format!("duplicate port {port}/{protocol}")));
        }
        ports.push(ServicePortRec {
            name,
            port,
            target_port,
            protocol,
        });
    }
    if ports.len() > 1 && ports[0].name.is_none() {
        return Err(origin.err(
            "spec.ports[0].name",
            "required when a Service has more than one port",
        ));
    }
    Ok(Some(ServiceIn {
        namespace,
        name,
        selector: spec.selector.unwrap_or_default(),
        ports,
        origin: origin.clone(),
    }))
}

fn container_ports(
    containers: &[Container],
    at: &str,
    origin: &Origin,
) -> Result<Vec<PortRec>, LabError> {
    if containers.is_empty() {
        return Err(origin.err(at, "at least one container is required"));
    }
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    let mut names = BTreeSet::new();
    for (ci, c) in containers.iter().enumerate() {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            let field = |f: &str| format!("{at}[{ci}].ports[{pi}].{f}");
            let port =
                port_number(p.container_port).map_err(|m| origin.err(field("containerPort"), m))?;
            let protocol =
                protocol(p.protocol.as_deref()).map_err(|m| origin.err(field("protocol"), m))?;
            let name = p.name.clone().filter(|n| !n.is_empty());
            if let Some(n) = &name {
                port_name(n).map_err(|m| origin.err(field("name"), m))?;
                if !names.insert(n.clone()) {
                    return Err(origin.err(
                        field("name"),
                        format!("duplicate port name {n:?} in the pod"),
                    ));
                }
            }
            // Containers share the pod's network namespace: one listener per port/protocol.
            if !seen.insert((port, protocol.clone())) {
                return Err(origin.err(
                    field("containerPort"),
                    format!("duplicate port {port}/{protocol} in the pod"),
                ));
            }
            ports.push(PortRec {
                name,
                port,
                protocol,
            });
        }
    }
    Ok(ports)
}

fn required_name(name: Option<String>, origin: &Origin) -> Result<String, LabError> {
    match name {
        Some(n) if !n.is_empty() => Ok(n),
        _ => Err(origin.err(
            "metadata.name",
            "required (generateName is not supported by the lab)",
        )),
    }
}

fn object_namespace(ns: Option<String>, origin: &Origin) -> Result<String, LabError> {
    match ns.filter(|n| !n.is_empty()) {
        None => Ok("default".to_string()),
        Some(n) => {
            dns_label(&n).map_err(|m| origin.err("metadata.namespace", m))?;
            Ok(n)
        }
    }
}

fn port_number(n: i32) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{n} is not a valid port (1-65535)")),
    }
}

fn protocol(p: Option<&str>) -> Result<String, String> {
    match p {
        None => Ok("TCP".to_string()),
        Some(p @ ("TCP" | "UDP" | "SCTP")) => Ok(p.to_string()),
        Some(other) => Err(format!(
            "unsupported value {other:?}: must be TCP, UDP or SCTP"
        )),
    }
}

/// RFC 1123 label: what namespaces and port names of Services must be.
pub fn dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err(format!("{s:?} must be 1-63 characters"));
    }
    if !validate::is_dns1123_label(s) {
        return Err(format!(
            "{s:?} must consist of lower case alphanumeric characters or '-', and start and end with an alphanumeric character"
        ));
    }
    Ok(())
}

/// RFC 1035 label: a Service name (starts with a letter so it is a valid DNS name).
pub fn dns_1035_label(s: &str) -> Result<(), String> {
    dns_label(s)?;
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!("{s:?} must start with a letter"));
    }
    Ok(())
}

/// RFC 1123 subdomain: what Pod and Deployment names must be.
pub fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!("{s:?} must be 1-253 characters"));
    }
    if !validate::is_dns1123_subdomain(s) {
        return Err(format!(
            "{s:?} must be lower case alphanumeric characters, '-' or '.', starting and ending with an alphanumeric character"
        ));
    }
    Ok(())
}

/// IANA service name: a container port name (and a named targetPort).
pub fn port_name(s: &str) -> Result<(), String> {
    if validate::is_port_name(s) {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a valid port name (1-15 lower case letters, digits and '-', with at least one letter)"
        ))
    }
}

/// Two objects of the same kind with the same namespace/name: the second one is an error.
fn check_duplicates(input: &Input) -> Result<(), LabError> {
    let mut seen = BTreeSet::new();
    for ns in &input.namespaces {
        if !seen.insert(("Namespace", String::new(), ns.name.clone())) {
            return Err(ns.origin.err(
                "metadata.name",
                format!("Namespace {} is declared twice", ns.name),
            ));
        }
    }
    for w in &input.workloads {
        let kind = match w.kind {
            WorkloadKind::Pod => "Pod",
            WorkloadKind::Deployment { .. } => "Deployment",
        };
        if !seen.insert((kind, w.namespace.clone(), w.name.clone())) {
            return Err(w.origin.err(
                "metadata.name",
                format!("{kind} {}/{} is declared twice", w.namespace, w.name),
            ));
        }
    }
    for s in &input.services {
        if !seen.insert(("Service", s.namespace.clone(), s.name.clone())) {
            return Err(s.origin.err(
                "metadata.name",
                format!("Service {}/{} is declared twice", s.namespace, s.name),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Input, LabError> {
        let mut input = Input::default();
        parse_str(Path::new("in.yaml"), text, &mut input)?;
        check_duplicates(&input)?;
        Ok(input)
    }

    fn spec_err(text: &str) -> (usize, String, String, String) {
        match parse(text) {
            Err(LabError::Spec {
                file,
                doc,
                object,
                field,
                message,
            }) => {
                assert_eq!(file, Path::new("in.yaml"));
                (doc, object, field, message)
            }
            other => panic!("expected a Spec error, got {other:?}"),
        }
    }

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: a}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  containers:
  - name: c
    image: x
    ports:
    - {name: http, containerPort: 80}
    - {containerPort: 53, protocol: UDP}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: shop}
spec:
  replicas: 3
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      containers:
      - name: c
        ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  selector: {app: api}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: shop}
spec: {}
---
"#;

    #[test]
    fn parses_the_kinds_it_handles_and_skips_others() {
        let input = parse(GOOD).expect("valid input");
        assert_eq!(input.namespaces.len(), 1);
        assert_eq!(
            input.namespaces[0].labels.get("team").map(String::as_str),
            Some("a")
        );
        assert_eq!(input.workloads.len(), 2);
        let web = &input.workloads[0];
        assert_eq!((web.namespace.as_str(), web.name.as_str()), ("shop", "web"));
        assert_eq!(web.ports[0].name.as_deref(), Some("http"));
        assert_eq!(web.ports[0].protocol, "TCP");
        assert_eq!(web.ports[1].protocol, "UDP");
        assert!(matches!(
            input.workloads[1].kind,
            WorkloadKind::Deployment { replicas: 3, .. }
        ));
        assert_eq!(input.services[0].ports[0].target_port, "http");
        assert_eq!(input.services[0].ports[0].protocol, "TCP");
    }

    #[test]
    fn default_namespace_and_target_port() {
        let input = parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 8080}]}\n",
        )
        .expect("valid");
        assert_eq!(input.services[0].namespace, "default");
        assert_eq!(input.services[0].ports[0].target_port, "8080");
    }

    #[test]
    fn bad_field_type_names_document_and_path() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: c\n    ports:\n    - containerPort: eighty\n";
        let (doc, object, field, message) = spec_err(text);
        assert_eq!(doc, 2);
        assert_eq!(object, "Pod p");
        assert_eq!(field, "spec.containers[0].ports[0].containerPort");
        assert!(message.contains("invalid type"), "{message}");
    }

    #[test]
    fn out_of_range_port_is_rejected() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: n}\nspec:\n  containers:\n  - name: c\n    ports: [{containerPort: 80}, {containerPort: 70000}]\n";
        let (doc, object, field, message) = spec_err(text);
        assert_eq!((doc, object.as_str()), (1, "Pod n/p"));
        assert_eq!(field, "spec.containers[0].ports[1].containerPort");
        assert!(message.contains("70000"), "{message}");
    }

    #[test]
    fn bad_protocol_and_names() {
        let (_, _, field, _) = spec_err(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, protocol: tcp}]}\n",
        );
        assert_eq!(field, "spec.ports[0].protocol");
        let (_, _, field, _) = spec_err(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{name: a, port: 80}, {port: 81}]}\n",
        );
        assert_eq!(field, "spec.ports[1].name");
        let (_, _, field, _) =
            spec_err("apiVersion: v1\nkind: Namespace\nmetadata: {name: Bad_Name}\n");
        assert_eq!(field, "metadata.name");
        let (_, _, field, _) = spec_err(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetPort: not_a_name}]}\n",
        );
        assert_eq!(field, "spec.ports[0].targetPort");
    }

    #[test]
    fn missing_required_fields() {
        let (_, _, field, message) = spec_err(
            "apiVersion: v1\nkind: Pod\nmetadata: {namespace: x}\nspec: {containers: [{name: c}]}\n",
        );
        assert_eq!(field, "metadata.name");
        assert!(message.contains("required"));
        let (_, _, field, _) =
            spec_err("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {}\n");
        assert!(field.starts_with("spec"), "{field}");
        let (_, _, field, _) = spec_err("kind: Pod\nmetadata: {name: p}\nspec: {}\n");
        assert_eq!(field, "apiVersion");
        let (_, _, field, _) = spec_err("apiVersion: v1\nmetadata: {name: p}\n");
        assert_eq!(field, "kind");
    }

    #[test]
    fn deployment_selector_must_match_template() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {matchLabels: {app: x}}\n  template:\n    metadata: {labels: {app: y}}\n    spec: {containers: [{name: c}]}\n";
        let (_, object, field, _) = spec_err(text);
        assert_eq!(object, "Deployment d");
        assert_eq!(field, "spec.selector.matchLabels.app");
    }

    #[test]
    fn wrong_api_version_is_an_error() {
        let (_, _, field, message) =
            spec_err("apiVersion: apps/v1beta1\nkind: Deployment\nmetadata: {name: d}\nspec: {}\n");
        assert_eq!(field, "apiVersion");
        assert!(message.contains("apps/v1"), "{message}");
    }

    #[test]
    fn yaml_syntax_error_names_file_and_document() {
        let err = parse("kind: Namespace\nmetadata: {name: a}\n---\nkind: [unclosed\n")
            .expect_err("bad yaml");
        match err {
            LabError::Yaml { file, message } => {
                assert_eq!(file, Path::new("in.yaml"));
                assert!(message.starts_with("document 2"), "{message}");
            }
            other => panic!("expected Yaml error, got {other:?}"),
        }
    }

    #[test]
    fn duplicates_are_rejected_and_nothing_is_staged_on_error() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
        let (doc, _, field, message) = spec_err(text);
        assert_eq!((doc, field.as_str()), (2, "metadata.name"));
        assert!(message.contains("twice"));

        let mut input = Input::default();
        let bad = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: Pod\n";
        assert!(parse_str(Path::new("x.yaml"), bad, &mut input).is_err());
        assert!(input.namespaces.is_empty(), "a failed file adds nothing");
    }

    #[test]
    fn duplicate_container_ports_are_rejected() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - {name: a, ports: [{containerPort: 80}]}\n  - {name: b, ports: [{containerPort: 80}]}\n";
        let (_, _, field, _) = spec_err(text);
        assert_eq!(field, "spec.containers[1].ports[0].containerPort");
    }

    #[test]
    fn directories_are_read_sorted() {
        let dir = std::env::temp_dir().join(format!("flows-lab-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        std::fs::write(
            dir.join("b.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
        )
        .expect("write");
        std::fs::write(
            dir.join("a.yml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        )
        .expect("write");
        std::fs::write(dir.join("c.txt"), "not yaml: [").expect("write");
        let input = load_paths(std::slice::from_ref(&dir)).expect("load");
        let names: Vec<_> = input.namespaces.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
