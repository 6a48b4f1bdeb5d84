//! Kubernetes NetworkPolicy, exactly as the API defines it. Pure: no I/O.
//!
//! - [`load::parse`] reads NetworkPolicy, Pod and Namespace objects from YAML or JSON text.
//! - [`validate::network_policy`] applies the API server's validation rules.
//! - [`eval::Engine`] decides a connection attempt and names the deciding policies.
//! - [`Manifests`] ties them together for a set of texts.
//! - [`advice`] suggests minimal policies from observed traffic and replays history
//!   through the engine.

pub mod advice;
pub mod cidr;
pub mod compile;
pub mod eval;
pub mod load;
pub mod selector;
pub mod synthetic;
pub mod validate;

use std::net::IpAddr;

pub use eval::{
    Cluster, CompiledPolicy, ContainerPort, Decision, Endpoint, Engine, PodInfo, PolicyRef,
    Protocol, SideDecision,
};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
pub use load::{LoadError, Origin};
pub use validate::FieldError;

/// A NetworkPolicy the API server would reject, with every reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: NetworkPolicy {namespace}/{name}: {}", .errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct InvalidPolicy {
    pub origin: Origin,
    pub namespace: String,
    pub name: String,
    pub errors: Vec<FieldError>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Invalid(#[from] InvalidPolicy),
    #[error("namespace {namespace}: annotation {MODE_ANNOTATION}={value:?}: expected enforce, audit or off")]
    Mode { namespace: String, value: String },
}

/// The pod model of a Pod object: labels, addresses (status.podIPs, else status.podIP)
/// and containerPorts.
pub fn pod_info(pod: &Pod) -> PodInfo {
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        if let Some(ip) = status.and_then(|s| s.pod_ip.as_ref()).and_then(|i| i.parse().ok()) {
            ips.push(ip);
        }
    }
    // A pod in its node's network namespace (kube-proxy, a CNI agent, flows' own probe)
    // reports the node's addresses: they are the node's, not the pod's, and
    // NetworkPolicy does not apply to such a pod. Holding them would put the node's
    // own traffic under that pod's namespace's policies.
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        ips.clear();
    }
    let ports = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(ContainerPort {
                name: p.name.clone(),
                port: u16::try_from(p.container_port).ok()?,
                protocol: p
                    .protocol
                    .as_deref()
                    .and_then(Protocol::parse)
                    .unwrap_or(Protocol::Tcp),
            })
        })
        .collect();
    PodInfo {
        namespace: pod.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        name: pod.metadata.name.clone().unwrap_or_default(),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips,
        ports,
    }
}

/// Validates and compiles one policy.
pub fn compile(origin: &Origin, np: &NetworkPolicy) -> Result<CompiledPolicy, InvalidPolicy> {
    let errors = validate::network_policy(np);
    if errors.is_empty() {
        Ok(CompiledPolicy::compile(np))
    } else {
        Err(InvalidPolicy {
            origin: origin.clone(),
            namespace: np.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            name: np.metadata.name.clone().unwrap_or_default(),
            errors,
        })
    }
}

/// Objects read from a set of texts: the cluster they describe and their policies.
#[derive(Debug, Clone, Default)]
pub struct Manifests {
    pub cluster: Cluster,
    pub policies: Vec<CompiledPolicy>,
    /// Kinds that were present but play no part in policy (Service, Deployment...).
    pub ignored_kinds: Vec<String>,
    /// Namespaces' enforcement modes, from the `flows.dev/policy-mode` annotation.
    pub modes: std::collections::BTreeMap<String, compile::Mode>,
}

/// Namespace annotation choosing how policy applies to its pods: enforce, audit or off.
pub const MODE_ANNOTATION: &str = "flows.dev/policy-mode";

impl Manifests {
    /// Reads every text; the first error stops it (nothing half-read is returned).
    pub fn parse<'a>(
        texts: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Manifests, ManifestError> {
        let mut m = Manifests::default();
        let mut namespaces: Vec<Namespace> = Vec::new();
        let mut pods: Vec<Pod> = Vec::new();
        for (source, text) in texts {
            for obj in load::parse(source, text)? {
                match obj.object {
                    load::Object::NetworkPolicy(np) => m.policies.push(compile(&obj.origin, &np)?),
                    load::Object::Pod(p) => pods.push(*p),
                    load::Object::Namespace(n) => namespaces.push(*n),
                    load::Object::Other { kind, .. } => m.ignored_kinds.push(kind),
                }
            }
        }
        for n in &namespaces {
            if let Some(name) = &n.metadata.name {
                m.cluster
                    .add_namespace(name, n.metadata.labels.clone().unwrap_or_default());
                if let Some(mode) = n.metadata.annotations.as_ref().and_then(|a| a.get(MODE_ANNOTATION)) {
                    let parsed = compile::Mode::parse(mode).ok_or_else(|| {
                        ManifestError::Mode {
                            namespace: name.clone(),
                            value: mode.clone(),
                        }
                    })?;
                    m.modes.insert(name.clone(), parsed);
                }
            }
        }
        for p in &pods {
            m.cluster.add_pod(pod_info(p));
        }
        Ok(m)
    }

    pub fn engine(&self) -> Engine {
        Engine::new(self.policies.iter().cloned())
    }
}
