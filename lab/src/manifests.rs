//! The lab as Kubernetes manifests: its Namespaces and Pods (with spec.nodeName and
//! status.podIPs filled in, as `kubectl get -o yaml` shows them on a real cluster).
//! Node-probes watch a directory of these, plus NetworkPolicies, to program policy.

use std::{collections::BTreeMap, path::Path};

use k8s_openapi::{
    api::core::v1::{Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
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
