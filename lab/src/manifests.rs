//! The lab as Kubernetes manifests, as `kubectl get -o yaml` shows them on a real
//! cluster: Nodes (addresses, pod CIDRs), Namespaces, Pods (spec.nodeName,
//! status.podIPs, ownerReferences), the ReplicaSets between Deployments and their pods,
//! and Services (clusterIPs). Node-probes watch a directory of these, plus
//! NetworkPolicies, to program policy; the relay reads them to name addresses.

use std::{collections::BTreeMap, path::Path};

use k8s_openapi::{
    api::{
        apps::v1::ReplicaSet,
        core::v1::{
            Container, ContainerPort, Namespace, Node, NodeAddress, NodeSpec, NodeStatus, Pod,
            PodIP, PodSpec, PodStatus, Service, ServiceSpec,
        },
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};

use crate::{error::LabError, state::State};

/// Namespace annotation read by the node-probe: enforce, audit or off.
pub const MODE_ANNOTATION: &str = "flows.dev/policy-mode";

/// Where the lab keeps the manifests its probes watch.
pub fn dir(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("manifests")
}

/// Multi-document YAML of the lab's namespaces and pods. `modes` sets the policy-mode
/// annotation per namespace.
pub fn cluster_yaml(state: &State, modes: &BTreeMap<String, String>) -> Result<String, LabError> {
    let mut docs = Vec::new();
    let yaml = |what: &str, v: Result<String, serde_yaml::Error>| {
        v.map_err(|e| LabError::Manifests { message: format!("{what}: {e}") })
    };
    for n in &state.nodes {
        let obj = Node {
            metadata: ObjectMeta {
                name: Some(n.name.clone()),
                labels: Some(BTreeMap::from([("kubernetes.io/hostname".to_string(), n.name.clone())])),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some(n.pod_cidr_v4.clone()),
                pod_cidrs: Some(vec![n.pod_cidr_v4.clone(), n.pod_cidr_v6.clone()]),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress { type_: "InternalIP".into(), address: n.uplink_ipv4.to_string() },
                    NodeAddress { type_: "InternalIP".into(), address: n.uplink_ipv6.to_string() },
                ]),
                ..Default::default()
            }),
        };
        docs.push(yaml("node", serde_yaml::to_string(&obj))?);
    }
    // The ReplicaSets between Deployments and their pods, once each.
    let mut sets = std::collections::BTreeSet::new();
    for p in &state.pods {
        if let (Some(o), Some(w)) = (&p.owner, &p.workload) {
            if o.kind == "ReplicaSet" && sets.insert((p.namespace.clone(), o.name.clone())) {
                let obj = ReplicaSet {
                    metadata: ObjectMeta {
                        name: Some(o.name.clone()),
                        namespace: Some(p.namespace.clone()),
                        owner_references: Some(vec![owner_ref("apps/v1", &w.kind, &w.name)]),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                docs.push(yaml("replicaset", serde_yaml::to_string(&obj))?);
            }
        }
    }
    for s in &state.services {
        let obj = Service {
            metadata: ObjectMeta {
                name: Some(s.name.clone()),
                namespace: Some(s.namespace.clone()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(s.cluster_ipv4.to_string()),
                cluster_ips: Some(vec![s.cluster_ipv4.to_string(), s.cluster_ipv6.to_string()]),
                selector: Some(s.selector.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        docs.push(yaml("service", serde_yaml::to_string(&obj))?);
    }
    for ns in &state.namespaces {
        let annotations = modes
            .get(&ns.name)
            .map(|m| BTreeMap::from([(MODE_ANNOTATION.to_string(), m.clone())]));
        let obj = Namespace {
            metadata: ObjectMeta {
                name: Some(ns.name.clone()),
                labels: Some(ns.labels.clone()),
                annotations,
                ..Default::default()
            },
            ..Default::default()
        };
        docs.push(serde_yaml::to_string(&obj).map_err(|e| LabError::Manifests { message: format!("namespace: {e}") })?);
    }
    for p in &state.pods {
        let ports = p
            .ports
            .iter()
            .map(|port| ContainerPort {
                name: port.name.clone(),
                container_port: i32::from(port.port),
                protocol: Some(port.protocol.clone()),
                ..Default::default()
            })
            .collect();
        let obj = Pod {
            metadata: ObjectMeta {
                name: Some(p.name.clone()),
                namespace: Some(p.namespace.clone()),
                labels: Some(p.labels.clone()),
                uid: Some(p.uid.clone()),
                owner_references: p
                    .owner
                    .as_ref()
                    .map(|o| vec![owner_ref(if o.kind == "Job" { "batch/v1" } else { "apps/v1" }, &o.kind, &o.name)]),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(p.node.clone()),
                containers: vec![Container {
                    name: "app".into(),
                    ports: Some(ports),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some(p.ipv4.to_string()),
                pod_ips: Some(vec![
                    PodIP { ip: p.ipv4.to_string() },
                    PodIP { ip: p.ipv6.to_string() },
                ]),
                phase: Some("Running".into()),
                ..Default::default()
            }),
        };
        docs.push(serde_yaml::to_string(&obj).map_err(|e| LabError::Manifests { message: format!("pod: {e}") })?);
    }
    Ok(docs.join("---\n"))
}

fn owner_ref(api_version: &str, kind: &str, name: &str) -> OwnerReference {
    OwnerReference {
        api_version: api_version.into(),
        kind: kind.into(),
        name: name.into(),
        // The lab has no API server to assign one; stable per owner.
        uid: format!("lab-{}-{name}", kind.to_ascii_lowercase()),
        controller: Some(true),
        ..Default::default()
    }
}

/// Writes `<manifests>/00-cluster.yaml` atomically (probes may be reading it).
pub fn write_cluster(state_dir: &Path, state: &State, modes: &BTreeMap<String, String>) -> Result<(), LabError> {
    let d = dir(state_dir);
    std::fs::create_dir_all(&d).map_err(|e| LabError::io(&d, e))?;
    let text = cluster_yaml(state, modes)?;
    let tmp = d.join(".00-cluster.yaml.tmp");
    std::fs::write(&tmp, text).map_err(|e| LabError::io(&tmp, e))?;
    let dst = d.join("00-cluster.yaml");
    std::fs::rename(&tmp, &dst).map_err(|e| LabError::io(&dst, e))?;
    Ok(())
}
