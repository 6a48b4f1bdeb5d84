//! flows' own components on the lab's API server, as the chart installs them: the
//! chart's namespace, ServiceAccounts, ClusterRoles and bindings are applied from the
//! plain manifests (`deploy/manifests/flows.yaml`, rendered from the chart), and the lab,
//! as the kubelet of the pods it runs them in, gives each component its service
//! account's token: a token file, renewed before it expires, and a kubeconfig naming it.
//! No component of flows runs with the lab's admin credentials.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use flows_k8s::cluster::{self, Applier};
use serde_json::Value;

use crate::{LabError, state::ApiRec};

/// The chart as plain manifests (the test of `deploy/` keeps them equal to the chart's
/// rendering).
const CHART: &str = include_str!("../../deploy/manifests/flows.yaml");

/// The kinds that say who flows' components are and what they may do.
const ACCESS_KINDS: [&str; 6] = ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"];

/// The namespace the chart installs into.
pub const NAMESPACE: &str = "flows-system";

/// A component of flows that talks to the API, and the service account it runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// The relay: names addresses from the API.
    Relay,
    /// kube-sync, the node-probe's sidecar: the probe's policy source.
    KubeSync,
}

impl Component {
    pub const ALL: [Component; 2] = [Component::Relay, Component::KubeSync];

    /// The chart's ServiceAccount of the component.
    pub fn account(self) -> &'static str {
        match self {
            Component::Relay => "flows-relay",
            Component::KubeSync => "flows-node-probe",
        }
    }

    /// The user the API server knows the component as.
    pub fn user(self) -> String {
        format!("system:serviceaccount:{NAMESPACE}:{}", self.account())
    }
}

/// How long a token lives: a kubelet's default for projected tokens. It is renewed at
/// four fifths of its life, as a kubelet does.
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);

fn api_err(e: impl std::fmt::Display) -> LabError {
    LabError::ControlPlane { message: e.to_string(), log: None }
}

/// The chart's access objects, as JSON documents.
pub fn access_objects() -> Result<Vec<Value>, LabError> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(CHART) {
        let v = <Value as serde::Deserialize>::deserialize(doc)
            .map_err(|e| LabError::Yaml { file: "deploy/manifests/flows.yaml".into(), message: e.to_string() })?;
        if v["kind"].as_str().is_some_and(|k| ACCESS_KINDS.contains(&k)) {
            out.push(v);
        }
    }
    Ok(out)
}

/// Applies the chart's access objects through `applier`.
pub(crate) async fn grant(applier: &Applier) -> Result<(), LabError> {
    for doc in access_objects()? {
        applier.apply(&doc).await.map_err(api_err)?;
    }
    Ok(())
}

fn token_file(api: &ApiRec, c: Component) -> PathBuf {
    api.dir.join("tokens").join(format!("{}.token", c.account()))
}

/// The kubeconfig a component runs with: the API server, its CA, and the component's
/// token file (which kube clients read again as it is renewed).
pub fn kubeconfig(api: &ApiRec, c: Component) -> PathBuf {
    api.dir.join(format!("{}.kubeconfig", c.account()))
}

fn write_secret(path: &Path, text: &str) -> Result<(), LabError> {
    let tmp = path.with_extension("tmp");
    flows_tls::certs::write_file(&tmp, text, true).map_err(|e| api_err(format!("writing {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| LabError::io(path, e))
}

/// Requests a fresh token for `c` and writes it (and, the first time, its kubeconfig);
/// returns when it expires (Unix seconds).
pub(crate) async fn issue_token(client: &flows_k8s::Client, api: &ApiRec, c: Component) -> Result<i64, LabError> {
    let (token, expires) = cluster::service_account_token(client, NAMESPACE, c.account(), TOKEN_TTL).await.map_err(api_err)?;
    let file = token_file(api, c);
    if let Some(d) = file.parent() {
        std::fs::create_dir_all(d).map_err(|e| LabError::io(d, e))?;
    }
    write_secret(&file, &token)?;
    let config = kubeconfig(api, c);
    if !config.exists() {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\n\
             users:\n- name: {user}\n  user:\n    tokenFile: {token}\n\
             contexts:\n- name: lab\n  context: {{ cluster: lab, user: {user}, namespace: {NAMESPACE} }}\ncurrent-context: lab\n",
            url = api.url,
            ca = api.dir.join("pki").join("ca.crt").display(),
            user = c.user(),
            token = file.display(),
        );
        write_secret(&config, &text)?;
    }
    Ok(expires)
}

/// When a token that expires at `expires` is due for renewal: at four fifths of its life.
pub(crate) fn renewal_due(expires: i64) -> i64 {
    expires - (TOKEN_TTL.as_secs() / 5) as i64
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_grants_what_the_components_run_as() {
        let docs = access_objects().unwrap();
        for c in Component::ALL {
            let account = docs
                .iter()
                .find(|d| d["kind"] == "ServiceAccount" && d["metadata"]["name"] == c.account())
                .unwrap_or_else(|| panic!("the chart makes no ServiceAccount {}", c.account()));
            assert_eq!(account["metadata"]["namespace"], NAMESPACE);
            let bound = docs.iter().any(|d| {
                d["kind"] == "ClusterRoleBinding"
                    && d["subjects"].as_array().into_iter().flatten().any(|s| s["name"] == c.account() && s["namespace"] == NAMESPACE)
            });
            assert!(bound, "{} is bound to a role", c.account());
        }
        assert!(docs.iter().all(|d| d["kind"] != "Secret"), "no secrets among the access objects");
    }

    #[test]
    fn a_token_is_renewed_at_four_fifths_of_its_life() {
        assert_eq!(renewal_due(10_000), 10_000 - 720);
    }
}
