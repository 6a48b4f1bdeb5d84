//! flows' components on a real API server, each with its own service account and the
//! chart's roles, never the lab's admin: the relay names flows from the API, each node's
//! kube-sync gives its probe the cluster's policies, `flows lab policy` writes through
//! the API. Each account is refused what its role does not grant, and a component whose
//! rights are taken away says so and acts on nothing half-known. The figures (API change
//! to datapath, to annotation) are printed.

mod common;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{Cleanup, drive, ok, root};
use flows_lab::{
    components::{self, Component},
    testing::{lab_lock, skip_unless_root},
};
use serde_json::Value;

fn kubectl(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    Command::new("kubectl").arg("--kubeconfig").arg(kubeconfig).args(args).output().expect("run kubectl (scripts/setup.sh installs it)")
}

/// `kubectl auth can-i` as `user`, through the admin's impersonation.
fn can(admin: &Path, user: &str, verb: &str, resource: &str) -> bool {
    let out = kubectl(admin, &["auth", "can-i", verb, resource, "--all-namespaces", &format!("--as={user}")]);
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

/// The environment variable `name` of process `pid`.
fn environ(pid: u32, name: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(String::from))
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// A one-attempt scenario; true when the attempt got through.
fn attempt(dir: &Path, name: &str, line: &str) -> bool {
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, format!("connections:\n  - {{ name: {name}, {line}, timeout_ms: 300 }}\n")).expect("scenario");
    drive(dir, &p).succeeded == 1
}

/// Repeats `check` until it holds; how long that took. Panics after `limit`.
fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// Applies the chart's access objects again (as `kubectl apply`).
fn restore_access(admin: &Path) {
    let list = serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": components::access_objects().expect("chart") });
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(admin)
        .args(["apply", "--server-side", "--force-conflicts", "--field-manager=flows-lab", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("kubectl apply");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), list.to_string().as_bytes()).expect("write");
    drop(child.stdin.take());
    assert!(child.wait().expect("kubectl").success());
}

/// Each component's account: who the API server says it is, and what it may do.
fn accounts_are_least_privilege(state: &flows_lab::State, admin: &Path) {
    let api = state.api.as_ref().expect("api");
    for c in Component::ALL {
        let out = kubectl(&components::kubeconfig(api, c), &["auth", "whoami", "-o", "json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let who: Value = serde_json::from_slice(&out.stdout).expect("whoami");
        assert_eq!(who["status"]["userInfo"]["username"], c.user().as_str());
    }
    let relay = Component::Relay.user();
    for (verb, resource) in [("list", "pods"), ("watch", "pods"), ("list", "namespaces"), ("watch", "services"), ("list", "nodes"), ("watch", "replicasets.apps"), ("watch", "jobs.batch")] {
        assert!(can(admin, &relay, verb, resource), "the relay may {verb} {resource}");
    }
    for (verb, resource) in [("get", "secrets"), ("list", "configmaps"), ("create", "pods"), ("delete", "pods"), ("patch", "namespaces"), ("list", "networkpolicies.networking.k8s.io"), ("create", "serviceaccounts/token")] {
        assert!(!can(admin, &relay, verb, resource), "the relay may not {verb} {resource}");
    }
    let sync = Component::KubeSync.user();
    for (verb, resource) in [("list", "pods"), ("watch", "namespaces"), ("watch", "networkpolicies.networking.k8s.io")] {
        assert!(can(admin, &sync, verb, resource), "kube-sync may {verb} {resource}");
    }
    for (verb, resource) in [("list", "services"), ("get", "secrets"), ("create", "networkpolicies.networking.k8s.io"), ("patch", "pods"), ("list", "nodes")] {
        assert!(!can(admin, &sync, verb, resource), "kube-sync may not {verb} {resource}");
    }
    // The processes run with those accounts, not the admin's.
    for d in &state.daemons {
        let want = match d.role.as_str() {
            "relay" => Component::Relay,
            "kube-sync" => Component::KubeSync,
            _ => continue,
        };
        let kc = environ(d.pid, "KUBECONFIG").unwrap_or_else(|| panic!("{} runs without KUBECONFIG", d.role));
        assert_eq!(Path::new(&kc), components::kubeconfig(api, want), "{}", d.role);
        let text = std::fs::read_to_string(&kc).expect("kubeconfig");
        assert!(text.contains("tokenFile:") && !text.contains("client-certificate"), "{}: a token, no certificate", d.role);
        if d.role == "relay" {
            let args = cmdline(d.pid);
            assert!(args.iter().any(|a| a == "--kubernetes") && !args.iter().any(|a| a == "--manifests"), "{args:?}");
        }
    }
    assert_eq!(state.daemons.iter().filter(|d| d.role == "kube-sync").count(), state.nodes.len(), "a kube-sync per node");
}

/// Policies and modes written through the API reach the datapath; how long that takes.
fn policies_through_the_api(dir: &Path, d: &str, admin: &Path) {
    let intruder_to_db = "from: frontend/intruder, to: { pod: db/db }, protocol: TCP, port: 80";
    assert!(attempt(dir, "before", intruder_to_db), "no policy yet: the intruder reaches db");
    let start = Instant::now();
    let policies = root().join("lab/examples/seed-policies").display().to_string();
    ok(dir, &["lab", "policy", "apply", &policies, "--state-dir", d]);
    let applied = start.elapsed();
    let enforced = until("the policies applied through the API are enforced", Duration::from_secs(15), || !attempt(dir, "after", intruder_to_db));
    eprintln!("FIGURE policy write through the API: {applied:?}; API write to enforced in the datapath: {:?} (each check is one attempt of up to 300 ms)", applied + enforced);
    let names = kubectl(admin, &["get", "networkpolicies", "-A", "-o", "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} {end}"]);
    let names = String::from_utf8_lossy(&names.stdout).to_string();
    for p in ["db/deny", "db/db", "frontend/deny", "backend/backend"] {
        assert!(names.split_whitespace().any(|n| n == p), "{p} is in the API: {names}");
    }
    let report = drive(dir, &root().join("lab/scenarios/seed-traffic-policies.yaml"));
    assert!(report.expectations_met, "{:?}", report.connections);
    // Modes are namespace annotations in the API: audit lets the intruder through.
    ok(dir, &["lab", "policy", "mode", "frontend", "audit", "--state-dir", d]);
    ok(dir, &["lab", "policy", "mode", "db", "audit", "--state-dir", d]);
    let audited = until("audit mode set through the API", Duration::from_secs(15), || attempt(dir, "audited", intruder_to_db));
    eprintln!("FIGURE mode annotation through the API to the datapath: {audited:?}");
    let ns = kubectl(admin, &["get", "namespace", "db", "-o", "jsonpath={.metadata.annotations.flows\\.dev/policy-mode} {.metadata.labels.ns}"]);
    assert_eq!(String::from_utf8_lossy(&ns.stdout), "audit db", "the mode is set beside the namespace's own labels");
    ok(dir, &["lab", "policy", "mode", "frontend", "enforce", "--state-dir", d]);
    ok(dir, &["lab", "policy", "mode", "db", "enforce", "--state-dir", d]);
    until("enforce again", Duration::from_secs(15), || !attempt(dir, "enforced", intruder_to_db));
    ok(dir, &["lab", "policy", "delete", "00-namespace-deny.yaml", "--state-dir", d]);
    let left = kubectl(admin, &["get", "networkpolicies", "-n", "db", "deny", "-o", "name"]);
    assert!(!left.status.success(), "deleting the file deletes its policies from the API");
    let deny = root().join("lab/examples/seed-policies/00-namespace-deny.yaml").display().to_string();
    ok(dir, &["lab", "policy", "apply", &deny, "--state-dir", d]);
}

/// The `api` Deployment's pods, as the lab built them.
fn api_pods(dir: &Path) -> Vec<flows_lab::state::PodRec> {
    let state = flows_lab::State::load(dir).expect("state");
    state.deployment_pods("backend", "api").into_iter().cloned().collect()
}

/// "Running <podIP>" of a pod, as the API has it.
fn phase_and_ip(admin: &Path, ns: &str, name: &str) -> String {
    let out = kubectl(admin, &["get", "pod", "-n", ns, name, "-o", "jsonpath={.status.phase} {.status.podIP}"]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Pods made and deleted after `up` (a scale-up, a deletion the ReplicaSet replaces, a
/// bare pod): the lab's kubelet builds each (network, listeners, service endpoints,
/// status) and takes it away; policy, naming and kernel drops cover it as they do the
/// pods of `up`. The figures are printed.
fn pods_come_and_go(dir: &Path, admin: &Path) {
    let before = api_pods(dir);
    assert_eq!(before.len(), 2, "the seed's api Deployment: {before:?}");
    // Every kube-sync paused: no probe can learn of the new pod, which must then be
    // closed (not open to what its policies would deny) until one does.
    let kube_syncs: Vec<u32> = flows_lab::State::load(dir).expect("state").daemons.iter().filter(|d| d.role == "kube-sync").map(|d| d.pid).collect();
    assert!(!kube_syncs.is_empty());
    let signal = |sig: &str| {
        for pid in &kube_syncs {
            assert!(Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill").success());
        }
    };
    signal("-STOP");
    let start = Instant::now();
    assert!(kubectl(admin, &["scale", "deployment", "api", "-n", "backend", "--replicas=3"]).status.success());
    let mut new = None;
    let running = until("a pod made by a scale-up is built and Running", Duration::from_secs(30), || {
        new = api_pods(dir).into_iter().find(|p| !before.iter().any(|b| b.uid == p.uid));
        new.as_ref().is_some_and(|p| phase_and_ip(admin, "backend", &p.name) == format!("Running {}", p.ipv4))
    });
    let new = new.expect("the new pod");
    eprintln!("FIGURE scale-up to the new pod Running (built: netns, veth, listeners, service rules): {running:?}");
    assert!(flows_lab::netns::netns_exists(&new.netns));
    let to_new = |from: &str, protocol: &str, port: u16| format!("from: {from}, to: {{ pod: backend/{} }}, protocol: {protocol}, port: {port}", new.name);
    // The probe of its node takes the new interface as the link monitor reports it.
    let probe_log = dir.join(format!("probe-{}.log", new.node));
    let attached = until("the new pod's interface is attached", Duration::from_secs(15), || {
        std::fs::read_to_string(&probe_log).unwrap_or_default().lines().any(|l| l.contains("attached") && l.contains(&new.host_ifname))
    });
    eprintln!("FIGURE new pod Running to its interface attached (0: attached before it was Running): {attached:?}");
    // A datagram from the world to the new pod is denied, and reported with `reason`.
    let world_denied = |name: &str, reason: &str| {
        let since = common::now_rfc3339();
        assert!(!attempt(dir, name, &to_new("world", "UDP", 5353)), "{name}: denied");
        until(&format!("{name}: reported as {reason}"), Duration::from_secs(15), || {
            let out = ok(dir, &["observe", "--since", &since, "--to-pod", &format!("backend/{}", new.name), "--verdict", "DROPPED", "-o", "json"]);
            out.lines().any(|l| l.contains(&format!("\"{reason}\"")))
        });
    };
    // The world's packets meet no source-side policy: the destination's node must close
    // the pod it does not know.
    world_denied("unknown-from-world", "POLICY_ENDPOINT_UNKNOWN");
    assert!(!attempt(dir, "unknown-from-backend", &to_new("backend/backend", "UDP", 5353)), "closed to all, until its policy is known");
    signal("-CONT");
    // Its siblings' verdicts (lab/scenarios/seed-traffic-policies.yaml) once its policy
    // is known.
    let allowed = until("the new pod is reachable where its siblings are", Duration::from_secs(15), || attempt(dir, "to-new", &to_new("backend/backend", "UDP", 5353)));
    eprintln!("FIGURE kube-sync resumed to the new pod reachable under its policies: {allowed:?}");
    world_denied("known-from-world", "POLICY_DENIED");
    // Nothing listens on 9: a kernel drop in the new pod's namespace, named by the relay.
    let since = common::now_rfc3339();
    let refused = until("the kernel's drop in the new pod is reported and named", Duration::from_secs(15), || {
        attempt(dir, "to-new-refused", &to_new("backend/backend", "TCP", 9));
        let out = ok(dir, &["observe", "--since", &since, "--verdict", "DROPPED", "-o", "json"]);
        out.lines().any(|l| l.contains("NO_SOCKET") && l.contains(&new.name))
    });
    eprintln!("FIGURE new pod's kernel drops reported: {refused:?}");
    // Through the service: its endpoints include the new pod.
    let service = until("the service sends to the new pod", Duration::from_secs(15), || {
        let since = common::now_rfc3339();
        for i in 0..12 {
            attempt(dir, &format!("via-service-{i}"), "from: backend/backend, to: { service: backend/api }, protocol: UDP, port: 5353");
        }
        ok(dir, &["observe", "--since", &since, "-o", "json"]).lines().any(|l| l.contains(&new.name))
    });
    eprintln!("FIGURE new pod behind its service: {service:?}");

    // Deleted: the network goes, the API's deletion is finished, the ReplicaSet's
    // replacement is built.
    assert!(kubectl(admin, &["delete", "pod", "-n", "backend", &new.name, "--wait=false"]).status.success());
    let gone = until("a deleted pod's network is removed and its deletion finished", Duration::from_secs(30), || {
        !flows_lab::netns::netns_exists(&new.netns)
            && !kubectl(admin, &["get", "pod", "-n", "backend", &new.name]).status.success()
            && !api_pods(dir).iter().any(|p| p.uid == new.uid)
    });
    eprintln!("FIGURE pod deletion to its network removed and the deletion finished: {gone:?}");
    until("the ReplicaSet's replacement is built and Running", Duration::from_secs(30), || {
        let pods = api_pods(dir);
        pods.len() == 3 && pods.iter().all(|p| phase_and_ip(admin, "backend", &p.name) == format!("Running {}", p.ipv4))
    });
    // A bare pod, and a scale-down.
    assert!(kubectl(admin, &["run", "visitor", "-n", "frontend", "--image=flows-lab/visitor", "--port=80", "--labels=run=visitor"]).status.success());
    until("a bare pod is built and Running", Duration::from_secs(30), || {
        flows_lab::State::load(dir).expect("state").pod("frontend", "visitor").is_some_and(|p| phase_and_ip(admin, "frontend", "visitor") == format!("Running {}", p.ipv4))
    });
    // Its interface is watched and its flows named, whatever the verdict.
    let since = common::now_rfc3339();
    until("the bare pod's flows are seen and named", Duration::from_secs(15), || {
        attempt(dir, "visitor", "from: frontend/visitor, to: { ip: world }, protocol: UDP, port: 30999");
        ok(dir, &["observe", "--since", &since, "--from-pod", "frontend/visitor", "-o", "json"]).lines().any(|l| l.contains("30999"))
    });
    assert!(kubectl(admin, &["delete", "pod", "-n", "frontend", "visitor", "--wait=false"]).status.success());
    assert!(kubectl(admin, &["scale", "deployment", "api", "-n", "backend", "--replicas=2"]).status.success());
    until("the scale-down and the bare pod's deletion are done", Duration::from_secs(30), || {
        let state = flows_lab::State::load(dir).expect("state");
        let netns = flows_lab::netns::list_netns("flows-pod-");
        api_pods(dir).len() == 2 && state.pod("frontend", "visitor").is_none() && netns.len() == state.pods.len()
    });
    eprintln!("FIGURE scale-up to Running {running:?}; total for the pods' comings and goings {:?}", start.elapsed());
}

/// A relabelled pod is named with its new labels by the relay; how long that takes.
fn annotation_follows_the_api(dir: &Path, admin: &Path) {
    let start = Instant::now();
    assert!(kubectl(admin, &["label", "pod", "-n", "frontend", "intruder", "flows-test=relabelled"]).status.success());
    let mut port = 31_000;
    until("the relay names the pod with its new label", Duration::from_secs(15), || {
        port += 1;
        attempt(dir, "marker", &format!("from: frontend/intruder, to: {{ ip: world }}, protocol: UDP, port: {port}"));
        let out = ok(dir, &["observe", "--last", "20", "--from-label", "flows-test=relabelled", "--to-port", &port.to_string(), "-o", "json"]);
        !out.trim().is_empty()
    });
    eprintln!("FIGURE pod label change in the API to the relay's annotation: {:?} (each check is an attempt and a read)", start.elapsed());
}

/// Flows since `since` whose pod name is not the pod that holds the address (the lab's
/// record); and how many flows were checked.
fn misattributed(dir: &Path, state: &flows_lab::State, since: &str) -> (usize, usize) {
    let mut holder = std::collections::BTreeMap::new();
    for p in &state.pods {
        for ip in [p.ipv4.to_string(), p.ipv6.to_string()] {
            holder.insert(ip, format!("{}/{}", p.namespace, p.name));
        }
    }
    let out = ok(dir, &["observe", "--since", since, "-o", "json"]);
    let (mut wrong, mut checked) = (0, 0);
    for l in out.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        let f = &l["flow"];
        for (side, addr) in [("source", "source"), ("destination", "destination")] {
            let Some(want) = f["ip"][addr].as_str().and_then(|ip| holder.get(ip)) else { continue };
            checked += 1;
            let got = format!("{}/{}", f[side]["namespace"].as_str().unwrap_or(""), f[side]["pod_name"].as_str().unwrap_or(""));
            if &got != want {
                eprintln!("misattributed: {got} for {want}: {l}");
                wrong += 1;
            }
        }
    }
    (wrong, checked)
}

/// The API server goes away under traffic: enforcement and naming go on from what was
/// last read; when it is back, changes reach the index and the datapath again.
fn an_api_server_outage(dir: &Path, d: &str, state: &flows_lab::State) {
    let since = common::now_rfc3339();
    ok(dir, &["lab", "apiserver", "stop", "--state-dir", d]);
    let report = drive(dir, &root().join("lab/scenarios/seed-traffic-policies.yaml"));
    assert!(report.expectations_met, "policy holds while the API server is away: {:?}", report.connections);
    let out = ok(dir, &["lab", "apiserver", "start", "--state-dir", d]);
    let ready = Instant::now();
    eprintln!("FIGURE lab API server restart: {}", out.trim());
    let admin = state.api.as_ref().expect("api").kubeconfig.clone();
    assert!(kubectl(&admin, &["label", "pod", "-n", "frontend", "intruder", "outage=after"]).status.success());
    // Both ends audit: the intruder's attempt on db passes once the modes are in force.
    ok(dir, &["lab", "policy", "mode", "frontend", "audit", "--state-dir", d]);
    ok(dir, &["lab", "policy", "mode", "db", "audit", "--state-dir", d]);
    let intruder_to_db = "from: frontend/intruder, to: { pod: db/db }, protocol: TCP, port: 80";
    let mut port = 33_000;
    let mut named = None;
    let mut enforced = None;
    until("the index and the datapath follow the API again", Duration::from_secs(90), || {
        if enforced.is_none() && attempt(dir, "after-outage", intruder_to_db) {
            enforced = Some(ready.elapsed());
        }
        if named.is_none() {
            port += 1;
            attempt(dir, "marker", &format!("from: frontend/intruder, to: {{ ip: world }}, protocol: UDP, port: {port}"));
            let out = ok(dir, &["observe", "--last", "20", "--from-label", "outage=after", "--to-port", &port.to_string(), "-o", "json"]);
            if !out.trim().is_empty() {
                named = Some(ready.elapsed());
            }
        }
        named.is_some() && enforced.is_some()
    });
    eprintln!("FIGURE after the API server is back: relay names a relabelled pod in {named:?}, a mode change is enforced in {enforced:?}");
    ok(dir, &["lab", "policy", "mode", "frontend", "enforce", "--state-dir", d]);
    ok(dir, &["lab", "policy", "mode", "db", "enforce", "--state-dir", d]);
    until("enforce again", Duration::from_secs(15), || !attempt(dir, "re-enforced", intruder_to_db));
    // Every flow of the window is readable once the nodes' markers are.
    common::settle(dir);
    let (wrong, checked) = misattributed(dir, state, &since);
    eprintln!("FIGURE flows through the outage and after: {checked} pod addresses checked, {wrong} misattributed");
    assert!(checked > 0);
    assert_eq!(wrong, 0);
}

/// kube-sync without its role binding: it says what it may not read and writes nothing;
/// with the binding back, it writes the cluster.
fn kube_sync_without_rights(dir: &Path, state: &flows_lab::State, admin: &Path, children: &mut Vec<Child>) {
    let api = state.api.as_ref().expect("api");
    assert!(kubectl(admin, &["delete", "clusterrolebinding", "flows-node-probe"]).status.success());
    let out = dir.join("denied-sync");
    let log = dir.join("denied-sync.log");
    let child = Command::new(env!("CARGO_BIN_EXE_flows"))
        .args(["kube-sync", "--out"])
        .arg(&out)
        .env("KUBECONFIG", components::kubeconfig(api, Component::KubeSync))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("flows kube-sync");
    children.push(child);
    until("kube-sync says it is forbidden", Duration::from_secs(15), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("networkpolicies.networking.k8s.io is forbidden") && text.contains(&Component::KubeSync.user())
    });
    assert!(!out.join(flows_k8s::export::FILE).exists(), "nothing written from a cluster it could not read");
    // The probes keep enforcing what they were last given.
    assert!(!attempt(dir, "still-enforced", "from: frontend/intruder, to: { pod: db/db }, protocol: TCP, port: 80"));
    restore_access(admin);
    let back = until("kube-sync writes once its rights are back", Duration::from_secs(60), || out.join(flows_k8s::export::FILE).exists());
    eprintln!("FIGURE kube-sync: rights restored to the cluster written: {back:?} (its watch backs off, up to 30 s)");
}

/// The relay without its role binding: it serves, says what it may not read, and names
/// no address world on an index it could not fill (the nodes' names stay).
fn relay_without_rights(dir: &Path, d: &str, admin: &Path) {
    assert!(kubectl(admin, &["delete", "clusterrolebinding", "flows-relay"]).status.success());
    ok(dir, &["lab", "relay", "stop", "--state-dir", d]);
    ok(dir, &["lab", "relay", "start", "--state-dir", d]);
    until("the relay says it is forbidden", Duration::from_secs(15), || {
        std::fs::read_to_string(dir.join("relay.log")).unwrap_or_default().contains("pods is forbidden")
    });
    let since = common::now_rfc3339();
    let mut flows: Vec<Value> = Vec::new();
    until("the nodes' flows still come through the relay, named by the nodes", Duration::from_secs(15), || {
        attempt(dir, "unnamed", "from: frontend/frontend, to: { pod: backend/backend }, protocol: TCP, port: 80");
        let out = ok(dir, &["observe", "--since", &since, "--to-port", "80", "--from-pod", "frontend/frontend", "-o", "json"]);
        flows = out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        !flows.is_empty()
    });
    for f in &flows {
        assert_ne!(f["flow"]["destination"]["is_world"], true, "a pod's address is not world because the relay could not list pods: {f}");
        assert_eq!(f["flow"]["destination"]["pod_name"], "backend", "the node's name stays: {f}");
    }
    restore_access(admin);
    until("the relay's index syncs once its rights are back", Duration::from_secs(60), || {
        std::fs::read_to_string(dir.join("relay.log")).unwrap_or_default().contains("Kubernetes index synced")
    });
}

#[test]
fn flows_components_use_the_api_with_their_own_accounts() {
    if skip_unless_root("flows_components_use_the_api_with_their_own_accounts") {
        return;
    }
    let _lock = lab_lock().expect("lab lock");
    let dir = flows_lab::testing::temp_dir("flows-apiserver-components").expect("temp dir");
    let mut cleanup = Cleanup(dir.clone(), Vec::new());
    let d = dir.display().to_string();
    let seed = root().join("lab/examples/seed").display().to_string();
    let intruder = root().join("lab/examples/intruder").display().to_string();
    ok(&dir, &["lab", "up", &seed, &intruder, "--apiserver", "--probes", "--state-dir", &d]);
    let state = flows_lab::State::load(&dir).expect("state");
    let admin = state.api.clone().expect("a control plane").kubeconfig;
    accounts_are_least_privilege(&state, &admin);
    policies_through_the_api(&dir, &d, &admin);
    pods_come_and_go(&dir, &admin);
    // Who holds which address, after the pods' comings and goings.
    let state = flows_lab::State::load(&dir).expect("state");
    annotation_follows_the_api(&dir, &admin);
    an_api_server_outage(&dir, &d, &state);
    kube_sync_without_rights(&dir, &state, &admin, &mut cleanup.1);
    relay_without_rights(&dir, &d, &admin);
}
