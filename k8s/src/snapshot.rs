//! The cluster read once from an API server, as the manifests offline readers take
//! (`flows policy suggest|check --kubernetes`): Namespaces, Pods, ReplicaSets, Jobs and
//! NetworkPolicies as one multi-document YAML text, and the server's version, so that
//! what is suggested uses only fields the server knows.

use std::path::Path;

use k8s_openapi::{
    api::{apps::v1::ReplicaSet, batch::v1::Job, core::v1::{Namespace, Pod}, networking::v1::NetworkPolicy},
    serde::{Serialize, de::DeserializeOwned},
};
use kube::{Api, Client, Resource, api::ListParams};

use crate::cluster::ApiError;

/// A page of a list: the API server answers large lists in pages, as clients should ask.
const PAGE: u32 = 500;

/// The server's Kubernetes version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
}

/// What was read: the objects as YAML, and the server's version.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub yaml: String,
    pub version: Version,
    pub server: String,
}

fn err(what: &str) -> impl FnOnce(kube::Error) -> ApiError + '_ {
    move |e| ApiError::Api { what: what.to_string(), message: e.to_string() }
}

/// Every object of kind `K`, page by page, appended to `out` as YAML documents.
async fn append<K>(client: &Client, kind: &str, out: &mut String) -> Result<usize, ApiError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let api: Api<K> = Api::all(client.clone());
    let what = format!("listing {kind}s");
    let mut params = ListParams::default().limit(PAGE);
    let mut n = 0;
    loop {
        let page = api.list(&params).await.map_err(err(&what))?;
        for mut o in page.items {
            // Who wrote which field is no part of the cluster's meaning.
            o.meta_mut().managed_fields = None;
            let mut v = serde_json::to_value(&o).map_err(|e| ApiError::Api { what: what.clone(), message: e.to_string() })?;
            if let Some(m) = v.as_object_mut() {
                m.insert("apiVersion".into(), K::api_version(&()).into());
                m.insert("kind".into(), K::kind(&()).into());
            }
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&v).map_err(|e| ApiError::Api { what: what.clone(), message: e.to_string() })?);
            n += 1;
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => params = params.continue_token(&c),
            None => return Ok(n),
        }
    }
}

/// Reads the cluster through the credentials of `kubeconfig`.
pub async fn read(kubeconfig: &Path) -> Result<Snapshot, ApiError> {
    let client = crate::cluster::connect(kubeconfig).await?;
    let info = client.apiserver_version().await.map_err(err("asking the API server's version"))?;
    let number = |s: &str| s.trim_end_matches('+').parse::<u32>().unwrap_or(0);
    let version = Version { major: number(&info.major), minor: number(&info.minor) };
    let mut yaml = String::new();
    append::<Namespace>(&client, "namespace", &mut yaml).await?;
    append::<Pod>(&client, "pod", &mut yaml).await?;
    append::<ReplicaSet>(&client, "replica set", &mut yaml).await?;
    append::<Job>(&client, "job", &mut yaml).await?;
    append::<NetworkPolicy>(&client, "network policy", &mut yaml).await?;
    Ok(Snapshot { yaml, version, server: info.git_version })
}
