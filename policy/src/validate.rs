//! NetworkPolicy validation as the API server does it (Kubernetes
//! pkg/apis/networking/validation and the metav1 label-selector rules). All errors of an
//! object are collected, each with its field path.

use k8s_openapi::{
    api::networking::v1::{
        NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use crate::cidr::Cidr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path from the object root, e.g. `spec.ingress[0].ports[1].endPort`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

struct Errs(Vec<FieldError>);

impl Errs {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

/// One dot-separated part: lowercase alphanumerics and '-', alphanumeric at both ends.
fn is_dns1123_part(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub fn is_dns1123_label(s: &str) -> bool {
    s.len() <= 63 && is_dns1123_part(s)
}

/// As Kubernetes checks it: only the whole name is limited (253), not each part.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_part)
}

/// The name part of a label key, and label values (which may also be empty).
fn is_qualified_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

pub fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_qualified_name_part(name),
        None => is_qualified_name_part(s),
    }
}

pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_qualified_name_part(s)
}

/// IANA service names, as containerPort names: at most 15 lowercase letters, digits and
/// non-adjacent hyphens, at least one letter, no hyphen at either end.
pub fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn selector(sel: &LabelSelector, path: &str, e: &mut Errs) {
    for (k, v) in sel.match_labels.iter().flatten() {
        if !is_label_key(k) {
            e.add(format!("{path}.matchLabels"), format!("invalid label key {k:?}"));
        }
        if !is_label_value(v) {
            e.add(format!("{path}.matchLabels[{k}]"), format!("invalid label value {v:?}"));
        }
    }
    for (i, r) in sel.match_expressions.iter().flatten().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        if !is_label_key(&r.key) {
            e.add(format!("{p}.key"), format!("invalid label key {:?}", r.key));
        }
        let values = r.values.as_deref().unwrap_or(&[]);
        match r.operator.as_str() {
            "In" | "NotIn" => {
                if values.is_empty() {
                    e.add(
                        format!("{p}.values"),
                        format!("values must be non-empty for operator {}", r.operator),
                    );
                }
                for (j, v) in values.iter().enumerate() {
                    if !is_label_value(v) {
                        e.add(format!("{p}.values[{j}]"), format!("invalid label value {v:?}"));
                    }
                }
            }
            "Exists" | "DoesNotExist" => {
                if !values.is_empty() {
                    e.add(
                        format!("{p}.values"),
                        format!("values must be empty for operator {}", r.operator),
                    );
                }
            }
            other => e.add(
                format!("{p}.operator"),
                format!("invalid operator {other:?}: expected In, NotIn, Exists or DoesNotExist"),
            ),
        }
    }
}

fn port(p: &NetworkPolicyPort, path: &str, e: &mut Errs) {
    if let Some(proto) = &p.protocol {
        if !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP") {
            e.add(
                format!("{path}.protocol"),
                format!("unsupported protocol {proto:?}: expected TCP, UDP or SCTP"),
            );
        }
    }
    match (&p.port, p.end_port) {
        (None, Some(_)) => e.add(format!("{path}.endPort"), "endPort requires port"),
        (Some(IntOrString::String(_)), Some(_)) => {
            e.add(format!("{path}.endPort"), "endPort requires a numeric port")
        }
        (Some(IntOrString::Int(start)), Some(end)) => {
            if end < *start {
                e.add(
                    format!("{path}.endPort"),
                    format!("endPort must be greater than or equal to port ({end} < {start})"),
                );
            }
            if !(1..=65535).contains(&end) {
                e.add(format!("{path}.endPort"), format!("port out of range: {end}"));
            }
        }
        _ => {}
    }
    match &p.port {
        Some(IntOrString::Int(n)) if !(1..=65535).contains(n) => {
            e.add(format!("{path}.port"), format!("port out of range: {n}"))
        }
        Some(IntOrString::String(name)) if !is_port_name(name) => e.add(
            format!("{path}.port"),
            format!("invalid port name {name:?}"),
        ),
        _ => {}
    }
}

fn peer(p: &NetworkPolicyPeer, path: &str, e: &mut Errs) {
    let selectors = p.pod_selector.is_some() || p.namespace_selector.is_some();
    match (&p.ip_block, selectors) {
        (None, false) => e.add(
            path.to_string(),
            "a peer must specify podSelector, namespaceSelector or ipBlock",
        ),
        (Some(_), true) => e.add(
            path.to_string(),
            "ipBlock cannot be combined with selectors in one peer",
        ),
        _ => {}
    }
    if let Some(s) = &p.pod_selector {
        selector(s, &format!("{path}.podSelector"), e);
    }
    if let Some(s) = &p.namespace_selector {
        selector(s, &format!("{path}.namespaceSelector"), e);
    }
    if let Some(b) = &p.ip_block {
        let bp = format!("{path}.ipBlock");
        match Cidr::parse(&b.cidr) {
            None => e.add(format!("{bp}.cidr"), format!("invalid CIDR {:?}", b.cidr)),
            Some(block) => {
                for (i, ex) in b.except.iter().flatten().enumerate() {
                    match Cidr::parse(ex) {
                        None => e.add(format!("{bp}.except[{i}]"), format!("invalid CIDR {ex:?}")),
                        Some(x) if !block.strictly_contains(&x) => e.add(
                            format!("{bp}.except[{i}]"),
                            format!("except must be strictly within cidr {}: {ex}", b.cidr),
                        ),
                        _ => {}
                    }
                }
            }
        }
    }
}

fn spec(s: &NetworkPolicySpec, e: &mut Errs) {
    selector(&s.pod_selector.clone().unwrap_or_default(), "spec.podSelector", e);
    for (i, r) in s.ingress.iter().flatten().enumerate() {
        for (j, p) in r.ports.iter().flatten().enumerate() {
            port(p, &format!("spec.ingress[{i}].ports[{j}]"), e);
        }
        for (j, p) in r.from.iter().flatten().enumerate() {
            peer(p, &format!("spec.ingress[{i}].from[{j}]"), e);
        }
    }
    for (i, r) in s.egress.iter().flatten().enumerate() {
        for (j, p) in r.ports.iter().flatten().enumerate() {
            port(p, &format!("spec.egress[{i}].ports[{j}]"), e);
        }
        for (j, p) in r.to.iter().flatten().enumerate() {
            peer(p, &format!("spec.egress[{i}].to[{j}]"), e);
        }
    }
    let types = s.policy_types.as_deref().unwrap_or(&[]);
    if types.len() > 2 {
        e.add("spec.policyTypes", "at most two policyTypes (Ingress, Egress)");
    }
    for (i, t) in types.iter().enumerate() {
        if t != "Ingress" && t != "Egress" {
            e.add(
                format!("spec.policyTypes[{i}]"),
                format!("unsupported policyType {t:?}: expected Ingress or Egress"),
            );
        }
    }
}

/// Every validation error of a NetworkPolicy (empty when it is valid).
pub fn network_policy(np: &NetworkPolicy) -> Vec<FieldError> {
    let mut e = Errs(Vec::new());
    match np.metadata.name.as_deref() {
        None | Some("") => e.add("metadata.name", "name is required"),
        Some(n) if !is_dns1123_subdomain(n) => {
            e.add("metadata.name", format!("invalid name {n:?}: must be a DNS subdomain"))
        }
        _ => {}
    }
    if let Some(ns) = np.metadata.namespace.as_deref() {
        if !is_dns1123_label(ns) {
            e.add("metadata.namespace", format!("invalid namespace {ns:?}"));
        }
    }
    for (k, v) in np.metadata.labels.iter().flatten() {
        if !is_label_key(k) {
            e.add("metadata.labels", format!("invalid label key {k:?}"));
        }
        if !is_label_value(v) {
            e.add(format!("metadata.labels[{k}]"), format!("invalid label value {v:?}"));
        }
    }
    match &np.spec {
        Some(s) => spec(s, &mut e),
        None => e.add("spec", "spec is required"),
    }
    e.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        assert!(is_label_key("app"));
        assert!(is_label_key("kubernetes.io/metadata.name"));
        assert!(is_label_key("a.b-c_d"));
        assert!(!is_label_key("-app"));
        assert!(!is_label_key("a/b/c"));
        assert!(!is_label_key("Bad_Prefix/x"));
        assert!(!is_label_key(&"x".repeat(64)));
        assert!(is_label_value(""));
        assert!(!is_label_value("has space"));
        assert!(is_port_name("http"));
        assert!(is_port_name("serve-80-tcp"));
        assert!(!is_port_name("80"));
        assert!(!is_port_name("a--b"));
        assert!(!is_port_name("-a"));
        assert!(!is_port_name("sixteen-chars-xx"));
        assert!(!is_port_name("HTTP"));
        assert!(is_dns1123_subdomain(&"a".repeat(100)));
        assert!(!is_dns1123_subdomain(&"a".repeat(254)));
        assert!(!is_dns1123_subdomain("a..b"));
    }
}
