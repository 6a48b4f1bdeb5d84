//! The Helm chart on a real API server: `helm install` of `deploy/helm/flows` with its
//! defaults and with each documented value set (`deploy/helm/flows/ci/*.yaml`), every
//! object accepted by the server's validation and admission; the plain manifests pass a
//! server-side dry run; the chart's roles are sufficient (kube-sync and the relay run
//! with tokens of the chart's own service accounts and sync) and no more (can-i); an
//! upgrade keeps the certificates made at install. No kubelet runs containers here: the
//! pods are placed on the lab's nodes and stay Pending.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{Cleanup, ok, root};
use flows_lab::testing::{lab_lock, skip_unless_root};

fn run(program: &str, kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(program)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program} (scripts/setup.sh installs it): {e}"));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn must(program: &str, kubeconfig: &Path, args: &[&str]) -> String {
    let (ok, out, err) = run(program, kubeconfig, args);
    assert!(ok, "{program} {args:?}:\n{out}\n{err}");
    out
}

/// The documented value sets, by name.
fn value_sets() -> Vec<(String, PathBuf)> {
    let dir = root().join("deploy/helm/flows/ci");
    let mut sets: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .expect("deploy/helm/flows/ci")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| (p.file_stem().unwrap_or_default().to_string_lossy().into_owned(), p))
        .collect();
    sets.sort();
    assert!(sets.len() >= 5, "the documented value sets: {sets:?}");
    sets
}

fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A kubeconfig with a token of `account` in `namespace`, from `kubectl create token`.
fn token_kubeconfig(dir: &Path, admin: &Path, url: &str, namespace: &str, account: &str) -> PathBuf {
    let token = must("kubectl", admin, &["create", "token", "-n", namespace, account]);
    let ca = admin.parent().expect("k8s dir").join("pki/ca.crt");
    let path = dir.join(format!("{account}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster: {{ server: \"{url}\", certificate-authority: \"{}\" }}\n\
             users:\n- name: u\n  user: {{ token: \"{}\" }}\ncontexts:\n- name: lab\n  context: {{ cluster: lab, user: u }}\ncurrent-context: lab\n",
            ca.display(),
            token.trim()
        ),
    )
    .expect("kubeconfig");
    path
}

/// The chart's node-probe and relay accounts are enough for kube-sync and the relay: each,
/// run with a token of its account, lists the cluster whole.
fn roles_are_sufficient(dir: &Path, admin: &Path, url: &str, release: &str, children: &mut Vec<Child>) {
    let sync_config = token_kubeconfig(dir, admin, url, release, &format!("{release}-flows-node-probe"));
    let out = dir.join("sync-out");
    let sync_log = dir.join("sync.log");
    children.push(
        Command::new(env!("CARGO_BIN_EXE_flows"))
            .args(["kube-sync", "--out"])
            .arg(&out)
            .env("KUBECONFIG", &sync_config)
            .stderr(std::fs::File::create(&sync_log).expect("log"))
            .spawn()
            .expect("flows kube-sync"),
    );
    let relay_config = token_kubeconfig(dir, admin, url, release, &format!("{release}-flows-relay"));
    let relay_log = dir.join("relay-chart.log");
    let relay = Path::new(env!("CARGO_BIN_EXE_flows")).with_file_name("flows-relay");
    children.push(
        Command::new(&relay)
            .args(["--kubernetes", "--peer", "node-1=127.0.0.1:9", "--listen", "127.0.0.1:0"])
            .env("KUBECONFIG", &relay_config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&relay_log).expect("log"))
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", relay.display())),
    );
    until("kube-sync with the chart's account writes the cluster", Duration::from_secs(30), || {
        out.join(flows_k8s::export::FILE).exists()
    });
    until("the relay with the chart's account lists the cluster", Duration::from_secs(30), || {
        std::fs::read_to_string(&relay_log).unwrap_or_default().contains("Kubernetes index synced")
    });
    for log in [&sync_log, &relay_log] {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(!text.contains("forbidden"), "{}: {text}", log.display());
    }
}

/// ... and no more than that.
fn roles_are_least(admin: &Path, release: &str) {
    let can = |account: &str, verb: &str, resource: &str| {
        let user = format!("--as=system:serviceaccount:{release}:{release}-flows-{account}");
        run("kubectl", admin, &["auth", "can-i", verb, resource, "--all-namespaces", &user]).1.trim() == "yes"
    };
    for (verb, resource) in [("get", "secrets"), ("list", "configmaps"), ("create", "pods"), ("delete", "pods"), ("patch", "nodes"), ("create", "networkpolicies.networking.k8s.io")] {
        for account in ["relay", "node-probe", "clickhouse"] {
            assert!(!can(account, verb, resource), "{release}: {account} may not {verb} {resource}");
        }
    }
    assert!(!can("clickhouse", "list", "pods"), "ClickHouse talks to no API");
}

#[test]
fn the_chart_installs_on_a_real_api_server() {
    if skip_unless_root("the_chart_installs_on_a_real_api_server") {
        return;
    }
    let _lock = lab_lock().expect("lab lock");
    let dir = flows_lab::testing::temp_dir("flows-apiserver-chart").expect("temp dir");
    let mut cleanup = Cleanup(dir.clone(), Vec::new());
    let d = dir.display().to_string();
    let seed = root().join("lab/examples/seed").display().to_string();
    ok(&dir, &["lab", "up", &seed, "--apiserver", "--state-dir", &d]);
    let api = flows_lab::State::load(&dir).expect("state").api.expect("a control plane");
    let admin = api.kubeconfig.clone();
    let chart = root().join("deploy/helm/flows").display().to_string();

    // The plain manifests, as the server's validation and admission would take them.
    let plain = root().join("deploy/manifests/flows.yaml").display().to_string();
    must("kubectl", &admin, &["apply", "--dry-run=server", "--server-side", "--force-conflicts", "-f", &plain]);

    let mut installed = Vec::new();
    for (name, values) in std::iter::once(("defaults".to_string(), None)).chain(value_sets().into_iter().map(|(n, p)| (n, Some(p)))) {
        let release = format!("chart-{name}");
        let mut args = vec!["install", &release, &chart, "-n", &release, "--create-namespace"];
        let values = values.map(|p| p.display().to_string());
        if let Some(v) = &values {
            args.extend(["-f", v.as_str()]);
        }
        let (ok, out, err) = run("helm", &admin, &args);
        assert!(ok, "helm install with {name}:\n{out}\n{err}");
        assert!(!err.contains("Warning"), "{name}: the server warned:\n{err}");
        // Every object of the release is in the API.
        let manifest = must("helm", &admin, &["get", "manifest", &release, "-n", &release]);
        let kinds = manifest.lines().filter(|l| l.starts_with("kind: ")).count();
        let mut get = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&admin)
            .args(["get", "-f", "-", "-o", "name"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("kubectl get");
        std::io::Write::write_all(get.stdin.as_mut().expect("stdin"), manifest.as_bytes()).expect("write");
        drop(get.stdin.take());
        let found = get.wait_with_output().expect("kubectl get");
        assert_eq!(String::from_utf8_lossy(&found.stdout).lines().count(), kinds, "{name}: every object of the release exists");
        roles_are_least(&admin, &release);
        installed.push(release);
    }
    // No kubelet runs containers: the probes (host network, nothing of their own for the
    // lab's kubelet to build) are placed, one per node, and stay Pending.
    let pods = must("kubectl", &admin, &["get", "pods", "-n", "chart-defaults", "-o", "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.phase}{\"\\n\"}{end}"]);
    let probes: Vec<&str> = pods.lines().filter(|l| l.contains("-node-probe-")).collect();
    assert_eq!(probes.len(), 2, "a probe per node: {pods}");
    assert!(probes.iter().all(|l| l.ends_with("Pending") && l.contains(" node-")), "{pods}");

    roles_are_sufficient(&dir, &admin, &api.url, "chart-defaults", &mut cleanup.1);

    // The certificates made at install are kept by an upgrade (the chart looks them up).
    let ca = || must("kubectl", &admin, &["get", "secret", "flows-tls", "-n", "chart-defaults", "-o", "jsonpath={.data.ca\\.crt}"]);
    let before = ca();
    assert!(!before.is_empty());
    must("helm", &admin, &["upgrade", "chart-defaults", &chart, "-n", "chart-defaults"]);
    assert_eq!(ca(), before, "an upgrade keeps the CA");

    for release in &installed {
        must("helm", &admin, &["uninstall", release, "-n", release, "--wait", "--timeout", "60s"]);
        // The pods go after their owners (the garbage collector deletes them, the lab's
        // kubelet finishes the deletion of those placed on its nodes).
        until(&format!("{release}: everything gone"), Duration::from_secs(60), || {
            must("kubectl", &admin, &["get", "pods,daemonsets,deployments,statefulsets,services", "-n", release, "-o", "name"]).trim().is_empty()
        });
    }
}
