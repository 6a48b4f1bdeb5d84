//! The lab's kubelet, for every node of a lab on a real API server, for as long as the
//! agent runs: it renews the nodes' leases and flows' components' tokens, builds each pod
//! the scheduler places after `up` (namespace, veth, addresses, listeners, service rules,
//! status Running), and takes a pod's network away when the pod is deleted, then
//! finishes the deletion in the API.
//!
//! The agent owns the listeners; the kubelet asks it for them through [`AgentLink`] and
//! waits for the answer before it says a pod runs.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use flows_k8s::cluster::{self, PodRecord};

use crate::{
    LabError,
    cluster_api::{api_err, pod_rec},
    components::{self, Component},
    dns::Zone,
    net,
    state::{ApiRec, DirLock, PodRec, State},
};

/// How often the kubelet looks at the API's pods.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// How long the agent may take to open or close a pod's listeners.
const AGENT_ANSWER: Duration = Duration::from_secs(10);

/// What the kubelet asks of the agent; `done` is answered once it is so.
pub(crate) enum ToAgent {
    /// Open these pods' listeners; serve DNS from `zone`.
    Serve { pods: Vec<PodRec>, zone: Zone, done: mpsc::Sender<Result<(), LabError>> },
    /// Close every listener in these namespaces; serve DNS from `zone`.
    Forget { netns: Vec<String>, zone: Zone, done: mpsc::Sender<Result<(), LabError>> },
}

/// The kubelet's way to the agent's event loop: a message, then a wake-up.
pub(crate) struct AgentLink {
    pub tx: mpsc::Sender<ToAgent>,
    pub waker: Arc<mio::Waker>,
}

impl AgentLink {
    fn ask(&self, make: impl FnOnce(mpsc::Sender<Result<(), LabError>>) -> ToAgent) -> Result<(), LabError> {
        let (done, answer) = mpsc::channel();
        let gone = || LabError::sys("asking the agent", std::io::Error::other("its event loop has stopped"));
        self.tx.send(make(done)).map_err(|_| gone())?;
        self.waker.wake().map_err(|e| LabError::sys("waking the agent", e))?;
        answer.recv_timeout(AGENT_ANSWER).map_err(|_| gone())?
    }
}

/// Runs the kubelet on its own thread.
pub(crate) fn spawn(dir: PathBuf, api: ApiRec, link: AgentLink) {
    let _ = std::thread::Builder::new().name("kubelet".into()).spawn(move || {
        if let Err(e) = run(&dir, &api, &link) {
            eprintln!("flows lab agent: the kubelet stopped: {e}");
        }
    });
}

fn run(dir: &Path, api: &ApiRec, link: &AgentLink) -> Result<(), LabError> {
    crate::runtime::block_on(async move {
        let client = cluster::connect(&api.kubeconfig).await.map_err(api_err)?;
        let applier = cluster::Applier::new(client.clone());
        let nodes: Vec<String> = State::load(dir)?.nodes.iter().map(|n| n.name.clone()).collect();
        let mut last = Instant::now() - cluster::HEARTBEAT;
        // Tokens issued at `up` are due at four fifths of their life; until the first
        // renewal here, count from now (an agent restarted later renews early, harmlessly).
        let mut due: Vec<(Component, i64)> =
            Component::ALL.iter().map(|c| (*c, components::renewal_due(components::unix_now() + components::TOKEN_TTL.as_secs() as i64))).collect();
        loop {
            if last.elapsed() >= cluster::HEARTBEAT {
                for n in &nodes {
                    if let Err(e) = cluster::renew_lease(&applier, n).await {
                        tracing::warn!(node = %n, error = %e, "renewing the node's lease");
                    }
                }
                renew_tokens(&client, api, &mut due).await;
                last = Instant::now();
            }
            match cluster::pods(&client).await {
                Ok(pods) => sync_pods(dir, &client, &nodes, pods, link).await,
                Err(e) => tracing::warn!(error = %e, "listing pods"),
            }
            tokio::time::sleep(SYNC_EVERY).await;
        }
    })?
}

/// Renews each token that is due; one that fails is tried again at the next heartbeat
/// (the old one stays valid for a fifth of its life).
async fn renew_tokens(client: &flows_k8s::Client, api: &ApiRec, due: &mut [(Component, i64)]) {
    let now = components::unix_now();
    for (c, at) in due.iter_mut().filter(|(_, at)| *at <= now) {
        match components::issue_token(client, api, *c).await {
            Ok(expires) => *at = components::renewal_due(expires),
            Err(e) => tracing::warn!(account = c.account(), error = %e, "renewing a component's token"),
        }
    }
}

/// What the API says the lab's nodes should run, against what they run.
struct Plan {
    /// Built pods that are being deleted or are gone from the API (or are now another
    /// pod of the same name).
    remove: Vec<PodRec>,
    /// Placed on a lab node, not deleting, not built yet. Pods of the host's network
    /// (the chart's probes) are not: the lab runs no containers, and such a pod has
    /// nothing of its own to build; they stay Pending.
    build: Vec<PodRecord>,
    /// Being deleted on a lab node: the deletion is finished once the network is gone.
    finish: Vec<(String, String)>,
}

fn plan(state: &State, nodes: &[String], api: Vec<PodRecord>) -> Plan {
    let live: HashSet<&str> = api.iter().filter(|p| !p.deleting).map(|p| p.uid.as_str()).collect();
    let built: HashSet<&str> = state.pods.iter().map(|p| p.uid.as_str()).collect();
    let remove = state.pods.iter().filter(|p| !live.contains(p.uid.as_str())).cloned().collect();
    let finish = api.iter().filter(|p| p.deleting && nodes.contains(&p.node)).map(|p| (p.namespace.clone(), p.name.clone())).collect();
    let build = api
        .into_iter()
        .filter(|p| !p.deleting && !p.host_network && nodes.contains(&p.node) && !built.contains(p.uid.as_str()))
        .collect();
    Plan { remove, build, finish }
}

async fn sync_pods(dir: &Path, client: &flows_k8s::Client, nodes: &[String], api: Vec<PodRecord>, link: &AgentLink) {
    let state = match State::load(dir) {
        Ok(s) => s,
        Err(e) => return tracing::warn!(error = %e, "reading the lab's state"),
    };
    let plan = plan(&state, nodes, api);
    if !plan.remove.is_empty()
        && let Err(e) = remove(dir, &plan.remove, link)
    {
        tracing::warn!(error = %e, "removing deleted pods");
    }
    for (namespace, name) in &plan.finish {
        if let Err(e) = cluster::finish_deletion(client, namespace, name).await {
            tracing::warn!(pod = %name, error = %e, "finishing a deletion");
        }
    }
    for p in plan.build {
        let what = format!("{}/{}", p.namespace, p.name);
        let started = Instant::now();
        match build(dir, p, link) {
            Ok((pod, host)) => {
                let ips = [pod.ipv4.to_string(), pod.ipv6.to_string()];
                match cluster::pod_running(client, &pod.namespace, &pod.name, &ips, &host).await {
                    Ok(()) => tracing::info!(pod = %what, node = %pod.node, elapsed_ms = started.elapsed().as_millis() as u64, "pod built and running"),
                    Err(e) => tracing::warn!(pod = %what, error = %e, "posting a pod's status"),
                }
            }
            Err(e) => tracing::warn!(pod = %what, error = %e, "building a pod (tried again at the next sync)"),
        }
    }
}

/// Takes the pods' network away: listeners first, then veths and namespaces, then the
/// record and the service rules (their endpoints go with them).
fn remove(dir: &Path, pods: &[PodRec], link: &AgentLink) -> Result<(), LabError> {
    let _lock = DirLock::take(dir)?;
    let mut state = State::load(dir)?;
    let gone: HashSet<&str> = pods.iter().map(|p| p.uid.as_str()).collect();
    state.pods.retain(|p| !gone.contains(p.uid.as_str()));
    link.ask(|done| ToAgent::Forget { netns: pods.iter().map(|p| p.netns.clone()).collect(), zone: Zone::from_state(&state), done })?;
    let mut first_error = None;
    for p in pods {
        if let Err(e) = net::remove_pod(&state, p) {
            first_error.get_or_insert(e);
        }
    }
    state.save(dir)?;
    state.write_drop_netns(dir)?;
    net::load_service_rules(&state)?;
    tracing::info!(pods = pods.len(), "deleted pods removed");
    first_error.map_or(Ok(()), Err)
}

/// Builds one pod placed after `up`; on failure, what was made is taken away again.
/// Returns the pod and its node's address (its hostIP).
fn build(dir: &Path, p: PodRecord, link: &AgentLink) -> Result<(PodRec, String), LabError> {
    let _lock = DirLock::take(dir)?;
    let mut state = State::load(dir)?;
    let mut pod = pod_rec(&state, p)?;
    let made = net::build_pod(&state, &mut pod).and_then(|()| {
        state.pods.push(pod.clone());
        link.ask(|done| ToAgent::Serve { pods: vec![pod.clone()], zone: Zone::from_state(&state), done })
    });
    if let Err(e) = made {
        state.pods.retain(|q| q.uid != pod.uid);
        let _ = net::remove_pod(&state, &pod);
        return Err(e);
    }
    state.save(dir)?;
    state.write_drop_netns(dir)?;
    net::load_service_rules(&state)?;
    let host = state.node(&pod.node).map(|n| n.uplink_ipv4.to_string()).unwrap_or_default();
    Ok((pod, host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_pod(name: &str, uid: &str, node: &str, deleting: bool) -> PodRecord {
        PodRecord {
            namespace: "ns".into(),
            name: name.into(),
            uid: uid.into(),
            labels: Default::default(),
            node: node.into(),
            ports: Vec::new(),
            owner: None,
            workload: None,
            deleting,
            phase: String::new(),
            host_network: false,
        }
    }

    #[test]
    fn plans_what_the_api_asks_of_the_lab_nodes() {
        let input = crate::spec::Input::default();
        let mut state = crate::plan::plan(&input, 2).expect("plan");
        state.pods.clear();
        for (name, uid) in [("kept", "u1"), ("deleting", "u2"), ("gone", "u3"), ("renamed", "old")] {
            let rec = pod_rec(&state, api_pod(name, uid, "node-1", false)).expect("lay out");
            state.pods.push(rec);
        }
        let nodes = vec!["node-1".to_string(), "node-2".to_string()];
        let api = vec![
            api_pod("kept", "u1", "node-1", false),
            api_pod("deleting", "u2", "node-1", true),
            // The same name, made again: a new pod.
            api_pod("renamed", "new", "node-2", false),
            api_pod("unplaced", "u4", "", false),
            api_pod("elsewhere", "u5", "node-9", false),
            PodRecord { host_network: true, ..api_pod("probe", "u6", "node-1", false) },
        ];
        let plan = plan(&state, &nodes, api);
        let names = |v: &[PodRec]| v.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&plan.remove), ["deleting", "gone", "renamed"]);
        assert_eq!(plan.build.iter().map(|p| p.uid.as_str()).collect::<Vec<_>>(), ["new"]);
        assert_eq!(plan.finish, [("ns".to_string(), "deleting".to_string())]);
    }

    #[test]
    fn a_new_pod_takes_the_first_free_slot_and_a_name_no_pod_has() {
        let input = crate::spec::Input::default();
        let mut state = crate::plan::plan(&input, 1).expect("plan");
        state.pods.clear();
        for (name, uid) in [("a", "1"), ("b", "2"), ("c", "3")] {
            let rec = pod_rec(&state, api_pod(name, uid, "node-1", false)).expect("lay out");
            state.pods.push(rec);
        }
        let freed = state.pods.remove(1);
        let again = pod_rec(&state, api_pod("b", "4", "node-1", false)).expect("lay out");
        assert_eq!(again.ipv4, freed.ipv4, "the freed slot is taken first");
        state.pods.push(again);
        let twin = pod_rec(&state, api_pod("b", "5", "node-1", false)).expect("lay out");
        assert_ne!(twin.netns, freed.netns, "a second pod of the same name gets its own namespace");
        assert!(pod_rec(&state, api_pod("x", "6", "node-7", false)).is_err(), "not a lab node");
    }
}
