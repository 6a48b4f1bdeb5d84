//! End-to-end: a real 2-node lab (needs root). Skipped with a message otherwise. Labs are
//! serialized machine-wide by `/run/flows-lab.lock`, and every lab is taken down by a guard
//! even when an assertion fails.

use std::net::IpAddr;
use std::path::PathBuf;

use flows_lab::agent::AgentLaunch;
use flows_lab::drive::{self, DriveOptions, Family, Outcome, Protocol, Scenario};
use flows_lab::testing::{self, LabGuard};
use flows_lab::{LabError, UpOptions};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: alpha, labels: {team: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: beta}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: alpha}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        ports:
        - {name: http, containerPort: 8080}
        - {name: echo, containerPort: 7007, protocol: UDP}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: beta, labels: {app: client}}
spec:
  containers:
  - name: c
    ports: [{name: http, containerPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: alpha}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: echo, port: 7007, targetPort: echo, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: beta}
spec:
  selector: {app: nobody}
  ports: [{port: 80}]
"#;

/// Links in the root netns that look like the lab's.
fn root_lab_links() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .filter(|n| n.starts_with("fl") && !n.starts_with("flannel"))
        .collect()
}

fn assert_clean() {
    let netns = flows_lab::netns::list_netns("flows-");
    assert!(netns.is_empty(), "netns left behind: {netns:?}");
    let links = root_lab_links();
    assert!(links.is_empty(), "links left behind: {links:?}");
}

flows_lab::per_cni!(lab_end_to_end);

/// Runs in every wiring mode (`per_cni!`).
fn lab_end_to_end(cni: flows_lab::cni::CniMode) {
    if testing::skip_unless_root("lab_end_to_end") {
        return;
    }
    let lab = LabGuard::from_yaml_wired(CLUSTER, 2, cni).expect("lab up");
    let state = lab.state.clone();

    // Layout: the deployment spreads over both nodes; the client sits on node-1.
    let client = state.pod("beta", "client").expect("client pod");
    let web = state.deployment_pods("alpha", "web");
    assert_eq!(web.len(), 2);
    let near = web
        .iter()
        .find(|p| p.node == client.node)
        .expect("a web pod on the client's node");
    let far = web
        .iter()
        .find(|p| p.node != client.node)
        .expect("a web pod on the other node");
    assert!(far.name.starts_with("web-") && far.labels.contains_key("pod-template-hash"));
    assert_eq!(
        state
            .namespaces
            .iter()
            .find(|n| n.name == "alpha")
            .and_then(|n| n.labels.get("team"))
            .map(String::as_str),
        Some("a")
    );
    assert!(
        state
            .daemons
            .iter()
            .any(|d| d.role == "agent" && flows_lab::process_alive(d.pid))
    );

    // A second lab is refused while this one is up, and leaves this one alone.
    let other_dir = testing::temp_dir("flows-lab-second").expect("temp dir");
    let mut opts = UpOptions::new(vec![lab.dir.join("input.yaml")], &other_dir);
    opts.nodes = 1;
    match flows_lab::up(&opts) {
        Err(LabError::AlreadyUp { .. }) => {}
        other => panic!("expected AlreadyUp, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&other_dir);

    let scenario = format!(
        r#"
connections:
  - {{name: tcp-same-node, from: beta/client, to: {{pod: alpha/{near}}}, protocol: TCP, port: 8080, family: both, expect: success}}
  - {{name: udp-same-node, from: beta/client, to: {{pod: alpha/{near}}}, protocol: UDP, port: 7007, family: both, expect: success}}
  - {{name: icmp-same-node, from: beta/client, to: {{pod: alpha/{near}}}, protocol: ICMP, family: both, expect: success}}
  - {{name: tcp-cross-node, from: beta/client, to: {{pod: alpha/{far}}}, protocol: TCP, port: 8080, family: both, expect: success}}
  - {{name: udp-cross-node, from: beta/client, to: {{pod: alpha/{far}}}, protocol: UDP, port: 7007, family: both, expect: success}}
  - {{name: icmp-cross-node, from: beta/client, to: {{pod: alpha/{far}}}, protocol: ICMP, family: both, expect: success}}
  - {{name: tcp-service, from: beta/client, to: {{service: alpha/web}}, protocol: TCP, port: 80, family: both, count: 4, expect: success}}
  - {{name: udp-service, from: beta/client, to: {{service: alpha/web}}, protocol: UDP, port: 7007, family: both, count: 2, expect: success}}
  - {{name: tcp-world, from: alpha/web, to: {{ip: world}}, protocol: TCP, port: 80, family: both, count: 2, expect: success}}
  - {{name: udp-world, from: beta/client, to: {{ip: world}}, protocol: UDP, port: 123, family: both, expect: success}}
  - {{name: icmp-world, from: beta/client, to: {{ip: world}}, protocol: ICMP, family: both, expect: success}}
  - {{name: world-in, from: world, to: {{pod: beta/client}}, protocol: TCP, port: 80, family: both, expect: success}}
  - {{name: dns-udp, from: beta/client, to: {{service: kube-system/kube-dns}}, protocol: UDP, port: 53, family: both, dns_name: web.alpha.svc.cluster.local, expect: success}}
  - {{name: dns-tcp, from: alpha/web, to: {{service: kube-system/kube-dns}}, protocol: TCP, port: 53, family: both, dns_name: nobody.beta.svc.cluster.local, expect: success}}
  - {{name: dns-nxdomain, from: beta/client, to: {{service: kube-system/kube-dns}}, protocol: UDP, port: 53, dns_name: missing.alpha.svc.cluster.local, expect: failure}}
  - {{name: tcp-undeclared-port, from: beta/client, to: {{pod: alpha/{far}}}, protocol: TCP, port: 9999, family: both, timeout_ms: 500, expect: failure}}
  - {{name: udp-undeclared-port, from: beta/client, to: {{pod: alpha/{near}}}, protocol: UDP, port: 9999, family: both, timeout_ms: 500, expect: failure}}
  - {{name: service-without-endpoints, from: beta/client, to: {{service: beta/nobody}}, protocol: TCP, port: 80, family: both, timeout_ms: 500, expect: failure}}
  - {{name: service-wrong-port, from: beta/client, to: {{service: alpha/web}}, protocol: TCP, port: 81, timeout_ms: 500, expect: failure}}
"#,
        near = near.name,
        far = far.name
    );
    let scenario = Scenario::parse("e2e", &scenario).expect("valid scenario");
    let report = drive::run(&state, &scenario, &DriveOptions::default()).expect("drive");
    let summary: Vec<String> = report
        .attempts
        .iter()
        .map(|a| {
            format!(
                "{} #{} {:?} {:?} {:?}",
                a.connection, a.index, a.outcome, a.error, a.reply
            )
        })
        .collect();
    assert!(
        report.expectations_met,
        "expectations not met:\n{}",
        summary.join("\n")
    );
    assert_eq!(report.connections.len(), scenario.connections.len());

    let svc = state.service("alpha", "web").expect("service");
    for a in &report.attempts {
        // The reported source is the real one: the client's own address and a bound port.
        if a.outcome == Outcome::Success && a.from == "beta/client" {
            let want: IpAddr = match a.family {
                Family::Ipv4 => client.ipv4.into(),
                Family::Ipv6 => client.ipv6.into(),
            };
            assert_eq!(a.src_ip, Some(want), "{a:?}");
            assert!(a.src_port.is_some_and(|p| p > 0), "{a:?}");
        }
        if a.protocol == Protocol::Icmp && a.outcome == Outcome::Success {
            assert_eq!(
                a.src_port,
                Some(a.dst_port),
                "ICMP reports the echo id as both ports"
            );
        }
        match a.connection.as_str() {
            "tcp-service" => {
                let ip: IpAddr = match a.family {
                    Family::Ipv4 => svc.cluster_ipv4.into(),
                    Family::Ipv6 => svc.cluster_ipv6.into(),
                };
                assert_eq!((a.dst_ip, a.dst_port), (ip, 80));
                let reply = a.reply.as_deref().unwrap_or("");
                assert!(
                    reply.starts_with("alpha/web-") && reply.ends_with(" 8080"),
                    "{reply}"
                );
            }
            "tcp-cross-node" => assert_eq!(
                a.reply.as_deref(),
                Some(format!("alpha/{} 8080", far.name).as_str())
            ),
            "tcp-world" => assert_eq!(a.dst_port, 80),
            "world-in" => assert_eq!(
                a.src_ip.map(|ip| ip.is_ipv4()),
                Some(a.family == Family::Ipv4)
            ),
            "dns-udp" => {
                let want = match a.family {
                    Family::Ipv4 => svc.cluster_ipv4.to_string(),
                    Family::Ipv6 => svc.cluster_ipv6.to_string(),
                };
                assert_eq!(a.reply.as_deref(), Some(want.as_str()));
            }
            "service-without-endpoints" | "service-wrong-port" => {
                // Rejected like kube-proxy does, not silently dropped.
                assert_eq!(a.error.as_deref(), Some("connection refused"), "{a:?}");
            }
            _ => {}
        }
    }

    // Burst mode: many attempts in parallel, every one with its own source port.
    let burst = Scenario::parse(
        "burst",
        "connections:\n  - {name: burst, from: alpha/web, to: {service: alpha/web}, protocol: TCP, port: 80, count: 60, expect: success}\n",
    )
    .expect("valid");
    let report = drive::run(&state, &burst, &DriveOptions { concurrency: 8 }).expect("drive burst");
    assert!(report.expectations_met, "burst: {:?}", report.connections);
    let mut tuples: Vec<(Option<IpAddr>, Option<u16>)> = report
        .attempts
        .iter()
        .map(|a| (a.src_ip, a.src_port))
        .collect();
    tuples.sort();
    tuples.dedup();
    assert_eq!(tuples.len(), 60, "every attempt has its own 5-tuple");

    let agent_pids: Vec<u32> = state.daemons.iter().map(|d| d.pid).collect();
    let down = lab.down().expect("down");
    assert!(down.state_removed);
    assert!(!down.teardown.netns_removed.is_empty());
    for pid in agent_pids {
        assert!(!flows_lab::process_alive(pid), "daemon {pid} still running");
    }
    assert_clean();
    // A second down finds nothing and succeeds.
    let dir = testing::temp_dir("flows-lab-down").expect("temp dir");
    let again = flows_lab::down(&dir).expect("second down");
    assert!(again.teardown.netns_removed.is_empty() && !again.state_removed);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn failed_up_removes_everything_it_built() {
    if testing::skip_unless_root("failed_up_removes_everything_it_built") {
        return;
    }
    let _lock = testing::lab_lock().expect("lab lock");
    let dir = testing::temp_dir("flows-lab-fail").expect("temp dir");
    let input = dir.join("in.yaml");
    std::fs::write(&input, CLUSTER).expect("write input");
    // The network is built, then the agent dies at once: everything must be rolled back.
    let mut opts = UpOptions::new(vec![input.clone()], &dir);
    opts.agent = AgentLaunch::Command {
        program: PathBuf::from("/bin/false"),
        args: Vec::new(),
    };
    match flows_lab::up(&opts) {
        Err(LabError::Agent { message, .. }) => assert!(message.contains("exited"), "{message}"),
        other => panic!("expected an agent error, got {other:?}"),
    }
    assert_clean();
    assert!(!dir.join("state.json").exists());

    // Invalid input builds nothing at all.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: c\n    ports: [{containerPort: 0}]\n").expect("write");
    let opts = UpOptions::new(vec![input, bad], &dir);
    match flows_lab::up(&opts) {
        Err(LabError::Spec { field, doc, .. }) => {
            assert_eq!(field, "spec.containers[0].ports[0].containerPort");
            assert_eq!(doc, 1);
        }
        other => panic!("expected a spec error, got {other:?}"),
    }
    assert_clean();
    let _ = std::fs::remove_dir_all(&dir);
}
