//! The lab on a real API server: the cluster is written through the API, the controllers
//! make the pods, the scheduler places them, and the lab plays each node's kubelet (it
//! builds what was placed, posts the pods' status, renews the node's lease and finishes
//! deletions).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use flows_k8s::cluster::{self, NodeRecord, PodRecord};
use serde_json::{Value, json};

use crate::{
    LabError,
    components::{self, Component},
    plan::{self, COREDNS_DEPLOYMENT, KUBE_DNS_SERVICE, KUBE_SYSTEM},
    spec::{Input, WorkloadKind},
    state::{ApiRec, OwnerRec, PodRec, PortRec, State},
};

pub(crate) fn api_err(e: impl std::fmt::Display) -> LabError {
    LabError::ControlPlane { message: e.to_string(), log: None }
}

/// Every document of the files (or directories' manifests), as JSON (what the API
/// server takes).
pub fn documents(paths: &[PathBuf]) -> Result<Vec<Value>, LabError> {
    let mut out = Vec::new();
    for file in crate::spec::expand_paths(paths)? {
        let text = std::fs::read_to_string(&file).map_err(|e| LabError::io(&file, e))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = <Value as serde::Deserialize>::deserialize(doc)
                .map_err(|e| LabError::Yaml { file: file.clone(), message: e.to_string() })?;
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    Ok(out)
}

/// Services are dual stack unless they say otherwise, as in the lab's own plan.
fn prepare(mut doc: Value) -> Value {
    if doc["kind"] == "Service" && doc["spec"].get("ipFamilyPolicy").is_none() && doc["spec"].is_object() {
        doc["spec"]["ipFamilyPolicy"] = json!("PreferDualStack");
    }
    if doc["metadata"].get("namespace").is_none() && !matches!(doc["kind"].as_str(), Some("Namespace" | "Node")) {
        doc["metadata"]["namespace"] = json!("default");
    }
    doc
}

/// The cluster DNS, built in as in the lab's plan: its address is fixed.
fn built_ins() -> Vec<Value> {
    let labels = json!({ "k8s-app": "kube-dns" });
    let ports = json!([{ "name": "dns", "containerPort": 53, "protocol": "UDP" },
                       { "name": "dns-tcp", "containerPort": 53, "protocol": "TCP" },
                       { "name": "metrics", "containerPort": 9153, "protocol": "TCP" }]);
    vec![
        json!({ "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": { "name": COREDNS_DEPLOYMENT, "namespace": KUBE_SYSTEM, "labels": labels },
                "spec": { "replicas": 1, "selector": { "matchLabels": labels },
                          "template": { "metadata": { "labels": labels },
                                        "spec": { "containers": [{ "name": "coredns", "image": "flows-lab/coredns", "ports": ports }] } } } }),
        json!({ "apiVersion": "v1", "kind": "Service",
                "metadata": { "name": KUBE_DNS_SERVICE, "namespace": KUBE_SYSTEM, "labels": labels },
                "spec": { "selector": labels, "ipFamilyPolicy": "PreferDualStack", "clusterIP": plan::kube_dns_ipv4().to_string(),
                          "clusterIPs": [plan::kube_dns_ipv4().to_string(), plan::kube_dns_ipv6().to_string()],
                          "ports": [{ "name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53 },
                                    { "name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53 }] } }),
    ]
}

/// Applies `doc`, again while the API says what a moment will fix (a namespace's
/// default service account not made yet, a webhook starting).
async fn apply_patiently(applier: &cluster::Applier, doc: &Value) -> Result<(), LabError> {
    let start = Instant::now();
    loop {
        match applier.apply(doc).await {
            Ok(()) => {
                tracing::debug!(kind = %doc["kind"], name = %doc["metadata"]["name"], elapsed_ms = start.elapsed().as_millis() as u64, "applied");
                return Ok(());
            }
            Err(e) if start.elapsed() < Duration::from_secs(30) && transient(&e.to_string()) => {
                tracing::debug!(error = %e, "the API server is not ready for this yet; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(api_err(e)),
        }
    }
}

fn transient(message: &str) -> bool {
    ["serviceaccount", "not found", "try again", "connection", "timeout", "503", "500"]
        .iter()
        .any(|m| message.to_lowercase().contains(m))
}

/// How many pods the input makes (with the cluster DNS).
fn expected_pods(input: &Input) -> usize {
    1 + input
        .workloads
        .iter()
        .map(|w| match &w.kind {
            WorkloadKind::Pod => 1,
            WorkloadKind::Deployment { replicas, .. } => *replicas as usize,
        })
        .sum::<usize>()
}

/// Writes the nodes and the cluster through the API, waits until the controllers made
/// every pod and the scheduler placed it, and lays the pods and services out as the API
/// decided (names, nodes, cluster addresses). `state` comes from the plan: its nodes,
/// namespaces and world are kept.
pub(crate) fn write_and_place(api: &ApiRec, paths: &[PathBuf], input: &Input, state: &mut State) -> Result<(), LabError> {
    let docs = documents(paths)?;
    let want = expected_pods(input);
    let (pods, services) = crate::runtime::block_on(async {
        let client = cluster::connect(&api.kubeconfig).await.map_err(api_err)?;
        let applier = cluster::Applier::new(client.clone());
        for n in &state.nodes {
            let node = NodeRecord {
                name: n.name.clone(),
                pod_cidrs: vec![n.pod_cidr_v4.clone(), n.pod_cidr_v6.clone()],
                addresses: vec![n.uplink_ipv4.to_string(), n.uplink_ipv6.to_string()],
            };
            cluster::register_node(&applier, &node).await.map_err(api_err)?;
        }
        for ns in &state.namespaces {
            let doc = json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns.name, "labels": ns.labels } });
            apply_patiently(&applier, &doc).await?;
            // A pod needs its namespace's default service account, which the controller
            // manager makes some seconds after it starts: made here, the pods need not wait.
            let account = json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": "default", "namespace": ns.name } });
            apply_patiently(&applier, &account).await?;
        }
        for doc in docs.into_iter().filter(|d| d["kind"] != "Namespace").map(prepare).chain(built_ins()) {
            apply_patiently(&applier, &doc).await?;
        }
        // flows' own components, as the chart makes them, each with its token.
        components::grant(&applier).await?;
        for c in Component::ALL {
            components::issue_token(&client, api, c).await?;
        }
        let pods = placed(&client, want).await?;
        let services = cluster::services(&client).await.map_err(api_err)?;
        Ok::<_, LabError>((pods, services))
    })??;
    state.pods = lay_out(state, pods)?;
    for s in &mut state.services {
        let Some(found) = services.iter().find(|f| f.namespace == s.namespace && f.name == s.name) else {
            return Err(api_err(format!("service {}/{} is not in the API", s.namespace, s.name)));
        };
        for ip in &found.cluster_ips {
            match ip.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(v4)) => s.cluster_ipv4 = v4,
                Ok(std::net::IpAddr::V6(v6)) => s.cluster_ipv6 = v6,
                Err(_) => {}
            }
        }
    }
    Ok(())
}

/// Waits until `want` pods exist and every one is bound to a node.
async fn placed(client: &flows_k8s::Client, want: usize) -> Result<Vec<PodRecord>, LabError> {
    let limit = Duration::from_secs(60) + Duration::from_millis(100) * want as u32;
    let start = Instant::now();
    loop {
        let pods: Vec<PodRecord> = cluster::pods(client).await.map_err(api_err)?.into_iter().filter(|p| !p.deleting).collect();
        let bound = pods.iter().filter(|p| !p.node.is_empty()).count();
        if pods.len() == want && bound == want {
            tracing::info!(pods = want, elapsed_ms = start.elapsed().as_millis() as u64, "every pod made and placed");
            return Ok(pods);
        }
        if start.elapsed() > limit {
            return Err(api_err(format!(
                "{} of {want} pods made, {bound} placed on a node after {limit:?} (see kube-controller-manager.log and kube-scheduler.log)",
                pods.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The lab's pods from the API's: addresses by slot on each node, in name order.
fn lay_out(state: &State, mut pods: Vec<PodRecord>) -> Result<Vec<PodRec>, LabError> {
    pods.sort_by(|a, b| (&a.node, &a.namespace, &a.name).cmp(&(&b.node, &b.namespace, &b.name)));
    let mut laid = State { pods: Vec::new(), ..state.clone() };
    for p in pods {
        let rec = pod_rec(&laid, p)?;
        laid.pods.push(rec);
    }
    Ok(laid.pods)
}

/// A pod placed by the scheduler, laid out beside `state`'s pods: the first free
/// address slot of its node, and a namespace and veth name no other pod has.
pub(crate) fn pod_rec(state: &State, p: PodRecord) -> Result<PodRec, LabError> {
    let Some(index) = state.nodes.iter().position(|n| n.name == p.node) else {
        return Err(api_err(format!("pod {}/{} was placed on {}, which is not a lab node", p.namespace, p.name, p.node)));
    };
    let taken = |slot: usize| state.pods.iter().any(|q| q.ipv4 == plan::pod_ipv4(index + 1, slot));
    let Some(slot) = (0..plan::MAX_PODS_PER_NODE).find(|s| !taken(*s)) else {
        return Err(LabError::plan(format!("{} got more than {} pods; use more --nodes", p.node, plan::MAX_PODS_PER_NODE)));
    };
    let mut hash8 = plan::pod_hash8(&p.namespace, &p.name);
    let mut salt = 0;
    while state.pods.iter().any(|q| q.netns == plan::pod_netns(&hash8)) {
        salt += 1;
        hash8 = plan::pod_hash8(&p.namespace, &format!("{}#{salt}", p.name));
    }
    let owner = |o: Option<(String, String)>| o.map(|(kind, name)| OwnerRec { kind, name });
    Ok(PodRec {
        ipv4: plan::pod_ipv4(index + 1, slot),
        ipv6: plan::pod_ipv6(index + 1, slot),
        netns: plan::pod_netns(&hash8),
        host_ifname: plan::pod_host_ifname(&hash8, state.cni),
        ports: p.ports.iter().map(|(name, port, protocol)| PortRec { name: name.clone(), port: *port, protocol: protocol.clone() }).collect(),
        owner: owner(p.owner),
        workload: owner(p.workload),
        uid: p.uid,
        labels: p.labels,
        node: p.node,
        namespace: p.namespace,
        name: p.name,
    })
}

/// Says every pod runs where the lab built it (the lab's kubelet, once the pods'
/// listeners are up).
pub(crate) fn post_running(api: &ApiRec, state: &State) -> Result<(), LabError> {
    crate::runtime::block_on(async {
        let client = cluster::connect(&api.kubeconfig).await.map_err(api_err)?;
        for p in &state.pods {
            let host = state.node(&p.node).map(|n| n.uplink_ipv4.to_string()).unwrap_or_default();
            let ips = [p.ipv4.to_string(), p.ipv6.to_string()];
            cluster::pod_running(&client, &p.namespace, &p.name, &ips, &host).await.map_err(api_err)?;
        }
        Ok(())
    })?
}

/// Applies documents through the API server as `manager`, as `kubectl apply
/// --server-side` does: each manager owns the fields it set, so the lab's policy modes
/// and the namespaces' own labels do not undo each other.
pub fn apply(api: &ApiRec, docs: &[Value], manager: &str) -> Result<(), LabError> {
    crate::runtime::block_on(async {
        let client = cluster::connect(&api.kubeconfig).await.map_err(api_err)?;
        let applier = cluster::Applier::with_manager(client, manager);
        for d in docs {
            applier.apply(d).await.map_err(api_err)?;
        }
        Ok(())
    })?
}

/// Deletes the objects the documents name; returns how many were there.
pub fn delete(api: &ApiRec, docs: &[Value]) -> Result<usize, LabError> {
    crate::runtime::block_on(async {
        let client = cluster::connect(&api.kubeconfig).await.map_err(api_err)?;
        let applier = cluster::Applier::new(client);
        let mut n = 0;
        for d in docs {
            n += usize::from(applier.delete(d).await.map_err(api_err)?);
        }
        Ok(n)
    })?
}

/// Applies flows' access objects (a control plane without a lab around it: tests).
pub fn grant_components(api: &ApiRec) -> Result<(), LabError> {
    crate::runtime::block_on(async {
        let client = cluster::connect(&api.kubeconfig).await.map_err(api_err)?;
        components::grant(&cluster::Applier::new(client)).await
    })?
}

/// Issues (or renews) the token of component `c` and writes its kubeconfig.
pub fn issue_component_token(api: &ApiRec, c: Component) -> Result<(), LabError> {
    crate::runtime::block_on(async {
        let client = cluster::connect(&api.kubeconfig).await.map_err(api_err)?;
        components::issue_token(&client, api, c).await.map(|_| ())
    })?
}
