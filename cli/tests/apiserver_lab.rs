//! The lab on a real Kubernetes control plane (`flows lab up --apiserver`): the seed
//! cluster is written through the API, the controllers make the pods, the scheduler places
//! them, and the lab, as each node's kubelet, builds them and says they run. Checked with
//! the real `kubectl`: every pod Running at the address the lab gave it, every service's
//! EndpointSlices naming exactly the lab's endpoints, the nodes' leases renewed, a deleted
//! pod's deletion finished. Traffic through the API's service addresses works. Without the
//! binaries, `up` says what is missing and leaves nothing behind.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{drive, flows, ok, root};
use flows_lab::testing::{lab_lock, skip_unless_root};
use serde_json::Value;

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = flows(&self.0, &["lab", "down", "--state-dir", &self.0.display().to_string()]);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Value {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .args(["-o", "json"])
        .output()
        .expect("run kubectl (scripts/setup.sh installs it)");
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("kubectl's JSON")
}

fn strs(v: &Value) -> BTreeSet<String> {
    v.as_array().into_iter().flatten().filter_map(|x| x.as_str().map(String::from)).collect()
}

/// Every pod Running and Ready on the node the lab built it on, at its addresses.
fn pods_match(kubeconfig: &Path, state: &flows_lab::State) {
    let pods = kubectl(kubeconfig, &["get", "pods", "-A"]);
    let items = pods["items"].as_array().expect("pods");
    assert_eq!(items.len(), state.pods.len(), "the API's pods are the lab's");
    for p in &state.pods {
        let found = items
            .iter()
            .find(|i| i["metadata"]["namespace"] == p.namespace.as_str() && i["metadata"]["name"] == p.name.as_str())
            .unwrap_or_else(|| panic!("pod {}/{} is not in the API", p.namespace, p.name));
        assert_eq!(found["spec"]["nodeName"], p.node.as_str(), "{}: placed by the scheduler where the lab built it", p.name);
        assert_eq!(found["status"]["phase"], "Running", "{}", p.name);
        let ips: BTreeSet<String> = found["status"]["podIPs"].as_array().into_iter().flatten().filter_map(|i| i["ip"].as_str().map(String::from)).collect();
        assert_eq!(ips, BTreeSet::from([p.ipv4.to_string(), p.ipv6.to_string()]), "{}", p.name);
        let ready = found["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == "Ready" && c["status"] == "True");
        assert!(ready, "{} is Ready", p.name);
        assert_eq!(found["metadata"]["uid"], p.uid.as_str());
    }
    let deployments = state.pods.iter().filter(|p| p.workload.as_ref().is_some_and(|w| w.kind == "Deployment")).count();
    assert!(deployments >= 3, "the Deployments' pods come from the controllers (ReplicaSet owners)");
}

/// Each service's EndpointSlices, made by the controller manager, list the lab's endpoints.
fn endpoints_match(kubeconfig: &Path, state: &flows_lab::State) {
    let slices = kubectl(kubeconfig, &["get", "endpointslices", "-A"]);
    for s in &state.services {
        let mut from_api = BTreeSet::new();
        for slice in slices["items"].as_array().into_iter().flatten() {
            if slice["metadata"]["namespace"] == s.namespace.as_str() && slice["metadata"]["labels"]["kubernetes.io/service-name"] == s.name.as_str() {
                for e in slice["endpoints"].as_array().into_iter().flatten() {
                    from_api.extend(strs(&e["addresses"]));
                }
            }
        }
        let lab: BTreeSet<String> = flows_lab::endpoints(state, s)
            .iter()
            .flat_map(|pe| pe.endpoints.iter().flat_map(|e| [e.ipv4.to_string(), e.ipv6.to_string()]))
            .collect();
        assert_eq!(from_api, lab, "service {}/{}", s.namespace, s.name);
        let svc = kubectl(kubeconfig, &["get", "service", "-n", &s.namespace, &s.name]);
        assert_eq!(strs(&svc["spec"]["clusterIPs"]), BTreeSet::from([s.cluster_ipv4.to_string(), s.cluster_ipv6.to_string()]));
    }
}

fn renew_times(kubeconfig: &Path) -> BTreeMap<String, String> {
    let leases = kubectl(kubeconfig, &["get", "leases", "-n", "kube-node-lease"]);
    leases["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| (l["metadata"]["name"].as_str().unwrap_or_default().to_string(), l["spec"]["renewTime"].as_str().unwrap_or_default().to_string()))
        .collect()
}

/// The lab's kubelet renews every node's lease (else the node goes NotReady after 40 s).
fn leases_renewed(kubeconfig: &Path, nodes: usize) {
    let first = renew_times(kubeconfig);
    assert_eq!(first.len(), nodes, "a lease per node: {first:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = renew_times(kubeconfig);
        if now.iter().all(|(n, t)| first.get(n).is_some_and(|f| f != t)) {
            break;
        }
        assert!(Instant::now() < deadline, "leases not renewed within 30 s: {first:?} then {now:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn the_seed_cluster_on_a_real_control_plane() {
    if skip_unless_root("the_seed_cluster_on_a_real_control_plane") {
        return;
    }
    let bin = flows_lab::control_plane::bin_dir();
    let missing = flows_lab::control_plane::missing(&bin);
    assert!(missing.is_empty(), "the control plane's binaries are missing: {missing:?} (scripts/setup.sh unpacks them)");
    let _lock = lab_lock().expect("lab lock");
    let dir = flows_lab::testing::temp_dir("flows-apiserver-lab").expect("temp dir");
    let _cleanup = Cleanup(dir.clone());
    let d = dir.display().to_string();
    let seed = root().join("lab/examples/seed").display().to_string();
    let intruder = root().join("lab/examples/intruder").display().to_string();
    let out = ok(&dir, &["lab", "up", &seed, &intruder, "--apiserver", "--state-dir", &d]);
    assert!(out.contains("API server https://127.0.0.1:"), "{out}");
    let state = flows_lab::State::load(&dir).expect("state");
    let api = state.api.clone().expect("the lab records its control plane");
    pods_match(&api.kubeconfig, &state);
    endpoints_match(&api.kubeconfig, &state);

    // Traffic to the services' addresses the API server gave out reaches their pods.
    let scenario = dir.join("through-services.yaml");
    std::fs::write(
        &scenario,
        "connections:\n  - { name: to-backend, from: frontend/frontend, to: { service: backend/backend }, protocol: TCP, port: 80, family: both, count: 2, expect: success }\n  \
         - { name: to-api, from: backend/backend, to: { service: backend/api }, protocol: UDP, port: 5353, family: both, count: 2, expect: success }\n  \
         - { name: dns, from: frontend/frontend, to: { service: kube-system/kube-dns }, protocol: UDP, port: 53, family: both, expect: success }\n",
    )
    .expect("scenario");
    let report = drive(&dir, &scenario);
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(report.succeeded, 10);

    leases_renewed(&api.kubeconfig, state.nodes.len());
    // A deleted pod: its kubelet finishes the deletion (else it stays Terminating).
    let deleted = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&api.kubeconfig)
        .args(["delete", "pod", "-n", "frontend", "intruder", "--wait=true", "--timeout=30s"])
        .output()
        .expect("kubectl delete");
    assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
    let left = kubectl(&api.kubeconfig, &["get", "pods", "-n", "frontend"]);
    let names = left["items"].as_array().into_iter().flatten().filter_map(|p| p["metadata"]["name"].as_str()).collect::<Vec<_>>();
    assert_eq!(names, vec!["frontend"]);
}

#[test]
fn without_the_binaries_up_says_so_and_leaves_nothing() {
    if skip_unless_root("without_the_binaries_up_says_so_and_leaves_nothing") {
        return;
    }
    let _lock = lab_lock().expect("lab lock");
    let dir = flows_lab::testing::temp_dir("flows-apiserver-missing").expect("temp dir");
    let _cleanup = Cleanup(dir.clone());
    let d = dir.display().to_string();
    let seed = root().join("lab/examples/seed").display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_flows"))
        .args(["lab", "up", &seed, "--apiserver", "--k8s-bin", "/nonexistent/k8s", "--state-dir", &d])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("flows");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/k8s/kube-apiserver") && err.contains("scripts/setup.sh"), "{err}");
    assert!(!dir.join("state.json").exists(), "nothing left behind");
    assert!(flows_lab::netns::list_netns("flows-").is_empty(), "no namespace left behind");

    // Not asked for, and not there: the lab comes up from the manifests alone, saying so.
    let out = Command::new(env!("CARGO_BIN_EXE_flows"))
        .args(["lab", "up", &seed, "--k8s-bin", "/nonexistent/k8s", "--state-dir", &d])
        .output()
        .expect("flows");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Kubernetes control plane") && err.contains("manifests alone"), "{err}");
    let state = flows_lab::State::load(&dir).expect("state");
    assert!(state.api.is_none());
    assert!(String::from_utf8_lossy(&out.stdout).contains("the cluster comes from the manifests alone"));
}
