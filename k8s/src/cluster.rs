//! Writing a cluster into an API server and playing its kubelets: what the lab needs to
//! run on a real control plane. Objects are applied server-side (as `kubectl apply
//! --server-side` does); what is read back is reduced to the plain records below, so no
//! other crate sees Kubernetes' client types.

use std::{collections::BTreeMap, path::Path, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::ReplicaSet,
        core::v1::{Pod, Service},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::{Value, json};

/// The field manager of everything the lab writes.
pub const MANAGER: &str = "flows-lab";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("kubeconfig {path}: {message}")]
    Config { path: String, message: String },
    #[error("{what}: {message}")]
    Api { what: String, message: String },
    #[error("object without {field}: {object}")]
    Object { field: &'static str, object: String },
}

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ApiError {
    let what = what.into();
    move |e| ApiError::Api { what, message: e.to_string() }
}

/// A client with the credentials of a kubeconfig file.
pub async fn connect(kubeconfig: &Path) -> Result<Client, ApiError> {
    let err = |message: String| ApiError::Config { path: kubeconfig.display().to_string(), message };
    let file = Kubeconfig::read_from(kubeconfig).map_err(|e| err(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(e.to_string()))?;
    Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// True once the API server answers `/readyz` with ok.
pub async fn ready(client: &Client) -> bool {
    let Ok(req) = http::Request::get("/readyz").body(Vec::new()) else { return false };
    matches!(client.request_text(req).await, Ok(t) if t.trim() == "ok")
}

/// A document's kind and name, once it is known to say its apiVersion, kind and name.
fn identify(object: &Value) -> Result<(&str, &str), ApiError> {
    let field = |f: &'static str| ApiError::Object { field: f, object: object.to_string().chars().take(200).collect() };
    object["apiVersion"].as_str().ok_or_else(|| field("apiVersion"))?;
    let kind = object["kind"].as_str().ok_or_else(|| field("kind"))?;
    let name = object["metadata"]["name"].as_str().ok_or_else(|| field("metadata.name"))?;
    Ok((kind, name))
}

/// Applies objects server-side, learning each kind's resource from the API server once.
#[derive(Clone)]
pub struct Applier {
    client: Client,
    manager: String,
    known: std::sync::Arc<tokio::sync::Mutex<BTreeMap<String, (kube::discovery::ApiResource, kube::discovery::Scope)>>>,
}

impl Applier {
    pub fn new(client: Client) -> Applier {
        Applier::with_manager(client, MANAGER)
    }

    /// An applier owning what it sets as `manager`: two writers with different managers
    /// do not take each other's fields away (server-side apply drops the fields a
    /// manager no longer sets).
    pub fn with_manager(client: Client, manager: &str) -> Applier {
        Applier { client, manager: manager.to_string(), known: Default::default() }
    }

    /// Applies one object (a manifest's document as JSON) server-side, taking ownership
    /// of every field it sets.
    pub async fn apply(&self, object: &Value) -> Result<(), ApiError> {
        let (kind, name) = identify(object)?;
        let what = format!("applying {kind} {name}");
        let api = self.api_for(object).await.map_err(api_err(what.clone()))?;
        api.patch(name, &PatchParams::apply(&self.manager).force(), &Patch::Apply(object))
            .await
            .map_err(api_err(what))?;
        Ok(())
    }

    /// Deletes the object a manifest's document names; false if there was none.
    pub async fn delete(&self, object: &Value) -> Result<bool, ApiError> {
        let (kind, name) = identify(object)?;
        let what = format!("deleting {kind} {name}");
        let api = self.api_for(object).await.map_err(api_err(what.clone()))?;
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(api_err(what)(e)),
        }
    }

    /// The API of the document's kind, in its namespace (`default` when it names none).
    async fn api_for(&self, object: &Value) -> Result<Api<DynamicObject>, kube::Error> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let (resource, scope) = self.resource(api_version, kind).await?;
        Ok(match (scope, object["metadata"]["namespace"].as_str()) {
            (kube::discovery::Scope::Namespaced, ns) => Api::namespaced_with(self.client.clone(), ns.unwrap_or("default"), &resource),
            (kube::discovery::Scope::Cluster, _) => Api::all_with(self.client.clone(), &resource),
        })
    }

    async fn resource(&self, api_version: &str, kind: &str) -> Result<(kube::discovery::ApiResource, kube::discovery::Scope), kube::Error> {
        let key = format!("{api_version}/{kind}");
        if let Some(found) = self.known.lock().await.get(&key) {
            return Ok(found.clone());
        }
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (resource, caps) = kube::discovery::pinned_kind(&self.client, &gvk).await?;
        let found = (resource, caps.scope);
        self.known.lock().await.insert(key, found.clone());
        Ok(found)
    }
}

/// A node as the lab builds it.
#[derive(Debug, Clone)]
pub struct NodeRecord {
    pub name: String,
    pub pod_cidrs: Vec<String>,
    pub addresses: Vec<String>,
}

fn now() -> String {
    Timestamp::now().to_string()
}

/// Registers a node and says it is ready, with room for pods (the scheduler binds only
/// to nodes that have it).
pub async fn register_node(applier: &Applier, node: &NodeRecord) -> Result<(), ApiError> {
    let client = &applier.client;
    let what = format!("registering node {}", node.name);
    let object = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": node.name, "labels": { "kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux" } },
        "spec": { "podCIDR": node.pod_cidrs.first(), "podCIDRs": node.pod_cidrs },
    });
    applier.apply(&object).await?;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let room = json!({ "cpu": "32", "memory": "64Gi", "pods": "250" });
    let status = json!({ "status": {
        "addresses": node.addresses.iter().map(|a| json!({ "type": "InternalIP", "address": a }))
            .chain(std::iter::once(json!({ "type": "Hostname", "address": node.name }))).collect::<Vec<_>>(),
        "capacity": room, "allocatable": room,
        "conditions": [ready_condition()],
        "nodeInfo": { "kubeletVersion": "flows-lab", "operatingSystem": "linux", "architecture": "amd64",
                      "containerRuntimeVersion": "flows-lab://1", "kernelVersion": "", "osImage": "flows lab",
                      "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": "" },
    }});
    nodes
        .patch_status(&node.name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(api_err(what))?;
    renew_lease(applier, &node.name).await
}

fn ready_condition() -> Value {
    let t = now();
    json!({ "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "the flows lab is this node's kubelet",
            "lastHeartbeatTime": t, "lastTransitionTime": t })
}

/// The node's heartbeat: its lease in `kube-node-lease`, renewed.
pub async fn renew_lease(applier: &Applier, node: &str) -> Result<(), ApiError> {
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": node, "namespace": "kube-node-lease" },
        "spec": { "holderIdentity": node, "leaseDurationSeconds": 40,
                  "renewTime": Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string() },
    });
    applier.apply(&lease).await
}

/// A pod as the API holds it, reduced to what the lab builds from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    /// Empty until the scheduler has bound it.
    pub node: String,
    /// (name, port, protocol) of every container port.
    pub ports: Vec<(Option<String>, u16, String)>,
    /// The controller that owns it (kind, name), and that one's own controller.
    pub owner: Option<(String, String)>,
    pub workload: Option<(String, String)>,
    pub deleting: bool,
    pub phase: String,
    /// In its node's network namespace (`hostNetwork`).
    pub host_network: bool,
}

fn controller_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<(String, String)> {
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| (o.kind.clone(), o.name.clone()))
}

/// Every pod, with its owner and the owner's controller (a ReplicaSet's Deployment).
pub async fn pods(client: &Client) -> Result<Vec<PodRecord>, ApiError> {
    let list = Api::<Pod>::all(client.clone()).list(&ListParams::default()).await.map_err(api_err("listing pods"))?;
    let sets = Api::<ReplicaSet>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("listing replica sets"))?;
    let set_owner: BTreeMap<(String, String), (String, String)> = sets
        .items
        .iter()
        .filter_map(|rs| {
            let key = (rs.metadata.namespace.clone()?, rs.metadata.name.clone()?);
            Some((key, controller_of(&rs.metadata)?))
        })
        .collect();
    Ok(list.items.iter().map(|p| pod_record(p, &set_owner)).collect())
}

fn pod_record(p: &Pod, set_owner: &BTreeMap<(String, String), (String, String)>) -> PodRecord {
    let namespace = p.metadata.namespace.clone().unwrap_or_default();
    let owner = controller_of(&p.metadata);
    let workload = match &owner {
        Some((kind, name)) if kind == "ReplicaSet" => set_owner.get(&(namespace.clone(), name.clone())).cloned(),
        _ => None,
    };
    let spec = p.spec.clone().unwrap_or_default();
    let ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.clone().unwrap_or_default())
        .map(|cp| (cp.name.clone(), cp.container_port as u16, cp.protocol.clone().unwrap_or_else(|| "TCP".into())))
        .collect();
    PodRecord {
        name: p.metadata.name.clone().unwrap_or_default(),
        uid: p.metadata.uid.clone().unwrap_or_default(),
        labels: p.metadata.labels.clone().unwrap_or_default(),
        node: spec.node_name.clone().unwrap_or_default(),
        ports,
        owner,
        workload,
        deleting: p.metadata.deletion_timestamp.is_some(),
        phase: p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default(),
        host_network: spec.host_network == Some(true),
        namespace,
    }
}

/// A service as the API holds it: its cluster addresses are the API server's to give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRecord {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<String>,
}

pub async fn services(client: &Client) -> Result<Vec<ServiceRecord>, ApiError> {
    let list = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("listing services"))?;
    Ok(list
        .items
        .iter()
        .map(|s| ServiceRecord {
            namespace: s.metadata.namespace.clone().unwrap_or_default(),
            name: s.metadata.name.clone().unwrap_or_default(),
            cluster_ips: s.spec.as_ref().and_then(|s| s.cluster_ips.clone()).unwrap_or_default(),
        })
        .collect())
}

/// Says a pod runs on `node` at `ips`: Running, every container started and ready.
pub async fn pod_running(client: &Client, namespace: &str, name: &str, ips: &[String], host_ip: &str) -> Result<(), ApiError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let what = format!("posting the status of pod {namespace}/{name}");
    let pod = pods.get(name).await.map_err(api_err(what.clone()))?;
    let t = now();
    let containers: Vec<Value> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| json!({ "name": c.name, "image": c.image, "imageID": "", "ready": true, "started": true, "restartCount": 0,
                         "containerID": format!("flows-lab://{namespace}/{name}/{}", c.name), "state": { "running": { "startedAt": t } } }))
        .collect();
    let cond = |ty: &str| json!({ "type": ty, "status": "True", "lastTransitionTime": t, "lastProbeTime": null });
    let status = json!({ "status": {
        "phase": "Running", "startTime": t, "hostIP": host_ip, "hostIPs": [{ "ip": host_ip }],
        "podIP": ips.first(), "podIPs": ips.iter().map(|ip| json!({ "ip": ip })).collect::<Vec<_>>(),
        "conditions": [cond("PodReadyToStartContainers"), cond("Initialized"), cond("ContainersReady"), cond("Ready"), cond("PodScheduled")],
        "containerStatuses": containers,
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(api_err(what))?;
    Ok(())
}

/// Finishes the deletion of a pod whose grace period a kubelet would have honoured.
pub async fn finish_deletion(client: &Client, namespace: &str, name: &str) -> Result<(), ApiError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    match pods.delete(name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(api_err(format!("deleting pod {namespace}/{name}"))(e)),
    }
}

/// How long a kubelet may go between heartbeats before its node is marked unknown (40 s
/// by default): the lab renews well within it.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// A service account's token, as a kubelet projects it into a pod: bound to no object,
/// valid for `ttl`. Returns the token and its expiry (Unix seconds).
pub async fn service_account_token(client: &Client, namespace: &str, account: &str, ttl: Duration) -> Result<(String, i64), ApiError> {
    use k8s_openapi::api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
    };
    let what = format!("requesting a token of service account {namespace}/{account}");
    let request = TokenRequest {
        spec: TokenRequestSpec { expiration_seconds: Some(ttl.as_secs() as i64), ..Default::default() },
        ..Default::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(account, &kube::api::PostParams::default(), &request)
        .await
        .map_err(api_err(what.clone()))?;
    let status = answer.status.ok_or_else(|| ApiError::Api { what, message: "the answer has no token".into() })?;
    Ok((status.token, status.expiration_timestamp.0.as_second()))
}

/// The uid of an object (what an ownerReference names).
pub async fn uid(client: &Client, api_version: &str, kind: &str, namespace: &str, name: &str) -> Result<String, ApiError> {
    let applier = Applier::new(client.clone());
    let doc = json!({ "apiVersion": api_version, "kind": kind, "metadata": { "name": name, "namespace": namespace } });
    let what = format!("reading {kind} {namespace}/{name}");
    let api = applier.api_for(&doc).await.map_err(api_err(what.clone()))?;
    let o = api.get(name).await.map_err(api_err(what.clone()))?;
    o.metadata.uid.ok_or(ApiError::Object { field: "metadata.uid", object: what })
}

/// Creates `n` bare pods `<prefix>-<i>` in `namespace`, bound to `node`, `concurrency`
/// requests at a time (clusters of scale for tests and benchmarks); returns how many
/// were made.
pub async fn create_pods(client: &Client, namespace: &str, prefix: &str, node: &str, n: usize, concurrency: usize) -> Result<usize, ApiError> {
    use futures::StreamExt;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let results = futures::stream::iter(0..n)
        .map(|i| {
            let pods = pods.clone();
            let pod: Result<Pod, _> = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": format!("{prefix}-{i}"), "labels": { "app": prefix, "index": i.to_string() } },
                "spec": { "nodeName": node, "containers": [{ "name": "c", "image": "flows-lab/none" }] },
            }));
            async move { pods.create(&kube::api::PostParams::default(), &pod.map_err(kube::Error::SerdeError)?).await }
        })
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    let mut made = 0;
    for r in results {
        r.map_err(api_err(format!("creating pods in {namespace}")))?;
        made += 1;
    }
    Ok(made)
}
