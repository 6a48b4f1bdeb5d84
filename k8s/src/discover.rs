//! Finding the node-probes in a cluster: the running pods of the probe's DaemonSet, found
//! by namespace and label selector, each named after its node.

use std::{collections::BTreeMap, net::IpAddr};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;

/// node name → `host:port` of its probe.
pub type PeerMap = BTreeMap<String, String>;

fn probe_of(pod: &Pod, port: u16) -> Option<(String, String)> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") || pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let ip: IpAddr = status.pod_ip.as_ref()?.parse().ok()?;
    let node = pod.spec.as_ref()?.node_name.clone()?;
    let addr = match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    };
    Some((node, addr))
}

/// Watches the probe pods and publishes the set of peers whenever it changes.
pub fn probes(client: Client, namespace: &str, selector: &str, port: u16) -> watch::Receiver<PeerMap> {
    let (tx, rx) = watch::channel(PeerMap::new());
    let api = Api::<Pod>::namespaced(client, namespace);
    let config = watcher::Config::default().labels(selector);
    tokio::spawn(async move {
        // pod name → (node, address), rebuilt on relist.
        let mut pods: BTreeMap<String, (String, String)> = BTreeMap::new();
        let mut listing: Option<BTreeMap<String, (String, String)>> = None;
        let stream = watcher(api, config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Init) => listing = Some(BTreeMap::new()),
                Ok(watcher::Event::InitApply(p)) => {
                    if let (Some(l), Some(name)) = (listing.as_mut(), p.metadata.name.clone()) {
                        if let Some(v) = probe_of(&p, port) {
                            l.insert(name, v);
                        }
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(l) = listing.take() {
                        pods = l;
                    }
                }
                Ok(watcher::Event::Apply(p)) => {
                    let Some(name) = p.metadata.name.clone() else { continue };
                    match probe_of(&p, port) {
                        Some(v) => pods.insert(name, v),
                        None => pods.remove(&name),
                    };
                }
                Ok(watcher::Event::Delete(p)) => {
                    if let Some(name) = &p.metadata.name {
                        pods.remove(name);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "watching the node-probe pods failed; retrying");
                    continue;
                }
            }
            if listing.is_some() {
                continue;
            }
            let peers: PeerMap = pods.values().cloned().collect();
            tx.send_if_modified(|cur| {
                let changed = *cur != peers;
                if changed {
                    *cur = peers.clone();
                }
                changed
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}
