//! Policy advice over the lab's seed cluster, built by hand: what is suggested, that it
//! is valid, minimal and stable, and that replay proves it (or says what it breaks).

use std::net::IpAddr;

use flows_policy::{
    Cluster, Engine, Protocol, compile,
    advice::{
        AddressKind, Inventory, InventoryPod, Observation, Outcome, Owner, Party, PodParty, SuggestOptions,
        replay, suggest,
    },
    load::{self, Origin},
    selector::Labels,
    validate,
};

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn pod(ns: &str, name: &str, kv: &[(&str, &str)], owner: Option<(&str, &str)>, ip: &str) -> Party {
    Party::Pod(PodParty {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(kv),
        owner: owner.map(|(k, n)| Owner { kind: k.into(), name: n.into() }),
        ip: Some(ip.parse().unwrap()),
    })
}

fn world(ip: &str) -> Party {
    Party::Address { ip: ip.parse::<IpAddr>().unwrap(), kind: AddressKind::World }
}

fn frontend() -> Party {
    pod("frontend", "frontend", &[("run", "frontend")], None, "10.244.1.2")
}
fn intruder() -> Party {
    pod("frontend", "intruder", &[("run", "intruder")], None, "10.244.1.9")
}
fn backend() -> Party {
    pod("backend", "backend", &[("run", "backend")], None, "10.244.2.2")
}
fn api(i: u8) -> Party {
    pod(
        "backend",
        &format!("api-7d9-{i}"),
        &[("app", "api"), ("pod-template-hash", "7d9")],
        Some(("Deployment", "api")),
        &format!("10.244.{i}.3"),
    )
}
fn db() -> Party {
    pod("db", "db", &[("run", "db")], None, "10.244.1.4")
}
fn coredns() -> Party {
    pod(
        "kube-system",
        "coredns-5c6-x",
        &[("k8s-app", "kube-dns"), ("pod-template-hash", "5c6")],
        Some(("Deployment", "coredns")),
        "10.244.2.4",
    )
}

fn obs(src: Party, dst: Party, protocol: Protocol, port: u16, outcome: Outcome, flows: u64) -> Observation {
    Observation { src, dst, protocol, port, outcome, flows, first: 1_000, last: 2_000 + flows as i64 }
}

/// The seed traffic with no policies: everything forwarded.
fn seed_history() -> Vec<Observation> {
    use Outcome::Allowed as A;
    use Protocol::*;
    vec![
        obs(frontend(), backend(), Tcp, 80, A, 6),
        obs(backend(), db(), Tcp, 80, A, 6),
        obs(frontend(), db(), Tcp, 80, A, 6),
        obs(frontend(), api(1), Udp, 5353, A, 4),
        obs(frontend(), api(2), Udp, 5353, A, 4),
        obs(backend(), api(1), Udp, 5353, A, 2),
        obs(backend(), api(2), Udp, 5353, A, 2),
        obs(frontend(), backend(), Icmp, 0, A, 4),
        obs(frontend(), coredns(), Udp, 53, A, 2),
        obs(backend(), world("203.0.113.10"), Tcp, 80, A, 2),
    ]
}

/// The cluster as the manifests describe it (the intruder exists but never talked).
fn inventory() -> Inventory {
    let mut inv = Inventory::new();
    for p in [frontend(), intruder(), backend(), api(1), api(2), db(), coredns()] {
        if let Party::Pod(p) = p {
            inv.add(InventoryPod { namespace: p.namespace, name: p.name, labels: p.labels, owner: p.owner });
        }
    }
    inv
}

fn yaml(policies: &[k8s_openapi::api::networking::v1::NetworkPolicy]) -> String {
    policies
        .iter()
        .map(|p| serde_yaml::to_string(p).unwrap())
        .collect::<Vec<_>>()
        .join("---\n")
}

fn engine_of(policies: &[k8s_openapi::api::networking::v1::NetworkPolicy]) -> Engine {
    Engine::new(policies.iter().map(|p| compile(&Origin { source: "suggestion".into(), document: 0 }, p).expect("valid")))
}

#[test]
fn seed_suggestion_is_minimal_valid_and_proven() {
    let history = seed_history();
    let s = suggest(&history, &inventory(), &SuggestOptions::default());
    let names: Vec<String> = s
        .policies
        .iter()
        .map(|p| format!("{}/{}", p.metadata.namespace.as_deref().unwrap(), p.metadata.name.as_deref().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            "backend/default-deny",
            "backend/allow-api",
            "backend/allow-backend",
            "db/default-deny",
            "db/allow-db",
            "frontend/default-deny",
            "frontend/allow-frontend",
        ]
    );
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    // 8 (source, destination, protocol/port) triples: the api's two pods are one workload.
    assert_eq!(s.triples, 8);

    // Every policy passes the API server's validation and reads back as written.
    for p in &s.policies {
        assert!(validate::network_policy(p).is_empty(), "{:?}", validate::network_policy(p));
    }
    let text = yaml(&s.policies);
    let back = load::parse("suggestion", &text).expect("parses");
    assert_eq!(back.len(), s.policies.len());

    // The frontend's policy: exactly what it did, nothing more.
    let fe = serde_json::to_value(&s.policies[6]).unwrap();
    assert_eq!(fe["spec"]["podSelector"], serde_json::json!({"matchLabels": {"run": "frontend"}}));
    assert_eq!(fe["spec"]["policyTypes"], serde_json::json!(["Egress"]));
    let egress = fe["spec"]["egress"].as_array().unwrap();
    let rule = |ports: serde_json::Value| {
        egress
            .iter()
            .find(|r| r.get("ports").cloned().unwrap_or(serde_json::Value::Null) == ports)
            .unwrap_or_else(|| panic!("no rule with ports {ports} in {egress:?}"))
            .clone()
    };
    // ICMP to the backend: a rule without ports (stated in the explanation).
    assert_eq!(
        rule(serde_json::Value::Null)["to"],
        serde_json::json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "backend"}}, "podSelector": {"matchLabels": {"run": "backend"}}}])
    );
    // DNS: the DNS pods' own label, in their namespace, UDP and TCP 53.
    assert_eq!(
        rule(serde_json::json!([{"port": 53, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]))["to"],
        serde_json::json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}])
    );
    // The Deployment's pods by app=api, never pod-template-hash.
    assert_eq!(
        rule(serde_json::json!([{"port": 5353, "protocol": "UDP"}]))["to"],
        serde_json::json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "backend"}}, "podSelector": {"matchLabels": {"app": "api"}}}])
    );
    assert_eq!(egress.len(), 4);
    // The backend reaches the world at one address, on the port it uses for the db too:
    // peers with the same ports share a rule.
    let be = serde_json::to_value(&s.policies[2]).unwrap();
    assert_eq!(
        be["spec"]["egress"][0],
        serde_json::json!({"ports": [{"port": 80, "protocol": "TCP"}], "to": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "db"}}, "podSelector": {"matchLabels": {"run": "db"}}},
            {"ipBlock": {"cidr": "203.0.113.10/32"}}]}),
        "{be}"
    );
    // The api is reached from two workloads on the same port: one rule, two peers.
    let api_policy = serde_json::to_value(&s.policies[1]).unwrap();
    assert_eq!(api_policy["spec"]["ingress"].as_array().unwrap().len(), 1);
    assert_eq!(api_policy["spec"]["ingress"][0]["from"].as_array().unwrap().len(), 2);
    assert_eq!(api_policy["spec"]["policyTypes"], serde_json::json!(["Ingress"]));

    // --explain: each rule names the flows it exists for.
    let dns = s.explanations.iter().find(|e| e.text.contains("DNS")).expect("DNS rule explained");
    assert_eq!(dns.policy, "frontend/allow-frontend");
    assert_eq!(dns.flows.len(), 1);
    assert_eq!((dns.flows[0].dst_workload.as_str(), dns.flows[0].flows), ("coredns", 2));

    // Proof: every allowed attempt stays allowed.
    let engine = engine_of(&s.policies);
    let r = replay(&engine, &Cluster::new(), &history, |o| o == Outcome::Allowed);
    assert!(!r.breaks_anything(), "{:?}", r.newly_denied);
    assert_eq!(r.still_allowed, history.iter().map(|o| o.flows).sum::<u64>());

    // An intruder in the frontend namespace is isolated: lateral moves are denied, by
    // the default deny of its namespace and the target's policies.
    let lateral = vec![
        obs(intruder(), db(), Protocol::Tcp, 80, Outcome::Allowed, 1),
        obs(intruder(), backend(), Protocol::Tcp, 80, Outcome::Allowed, 1),
        obs(intruder(), api(1), Protocol::Udp, 5353, Outcome::Allowed, 1),
        obs(intruder(), frontend(), Protocol::Tcp, 80, Outcome::Allowed, 1),
        obs(frontend(), db(), Protocol::Tcp, 5432, Outcome::Allowed, 1),
    ];
    let r = replay(&engine, &Cluster::new(), &lateral, |o| o == Outcome::Allowed);
    assert_eq!(r.newly_denied.len(), 5);
    let to_db = r.newly_denied.iter().find(|g| g.src_workload == "intruder" && g.dst_workload == "db").unwrap();
    assert_eq!(to_db.policies, ["db/allow-db", "db/default-deny", "frontend/default-deny"]);
}

#[test]
fn suggestions_are_stable() {
    let history = seed_history();
    let a = yaml(&suggest(&history, &inventory(), &SuggestOptions::default()).policies);
    let mut reversed = history.clone();
    reversed.reverse();
    let b = yaml(&suggest(&reversed, &inventory(), &SuggestOptions::default()).policies);
    assert_eq!(a, b);
}

#[test]
fn ports_ranges_prefixes_and_one_workload() {
    use Protocol::*;
    let mut history = Vec::new();
    for port in [8000, 8001, 8002, 8004] {
        history.push(obs(frontend(), db(), Tcp, port, Outcome::Allowed, 1));
    }
    history.push(obs(backend(), world("198.51.100.7"), Tcp, 443, Outcome::Allowed, 1));
    history.push(obs(backend(), world("198.51.100.9"), Tcp, 443, Outcome::Allowed, 1));
    // Dropped and audited attempts are not allowed traffic.
    history.push(obs(backend(), db(), Tcp, 9999, Outcome::Denied, 3));
    history.push(obs(backend(), db(), Tcp, 7777, Outcome::Audit, 3));

    let opts = SuggestOptions { workload: Some("db".into()), ..Default::default() };
    let s = suggest(&history, &inventory(), &opts);
    assert_eq!(s.policies.len(), 1, "only the db's policy, no default deny");
    let p = serde_json::to_value(&s.policies[0]).unwrap();
    assert_eq!(p["spec"]["policyTypes"], serde_json::json!(["Ingress", "Egress"]), "isolates on its own");
    assert_eq!(
        p["spec"]["ingress"][0]["ports"],
        serde_json::json!([{"port": 8000, "endPort": 8002, "protocol": "TCP"}, {"port": 8004, "protocol": "TCP"}])
    );
    assert!(p["spec"].get("egress").is_none());

    // The audited attempt counts when asked.
    let opts = SuggestOptions { workload: Some("Pod/db".into()), include_audit: true, ..Default::default() };
    let p = serde_json::to_value(&suggest(&history, &inventory(), &opts).policies[0]).unwrap();
    assert!(p.to_string().contains("7777") && !p.to_string().contains("9999"), "{p}");

    // World addresses merge into a wider prefix only when asked.
    let backend_egress = |opts: SuggestOptions| {
        let s = suggest(&history, &inventory(), &SuggestOptions { workload: Some("backend".into()), ..opts });
        serde_json::to_value(&s.policies[0]).unwrap()["spec"]["egress"].clone()
    };
    assert_eq!(
        backend_egress(SuggestOptions::default())[0]["to"],
        serde_json::json!([{"ipBlock": {"cidr": "198.51.100.7/32"}}, {"ipBlock": {"cidr": "198.51.100.9/32"}}])
    );
    assert_eq!(
        backend_egress(SuggestOptions { world_prefix_v4: 24, ..Default::default() })[0]["to"],
        serde_json::json!([{"ipBlock": {"cidr": "198.51.100.0/24"}}])
    );
}

#[test]
fn shared_labels_are_narrowed_or_warned_about() {
    use Protocol::*;
    // Two workloads share app=shop; only the pair of labels tells the db apart.
    let shop_db = pod("shop", "db-0", &[("app", "shop"), ("component", "db"), ("controller-revision-hash", "1")], Some(("StatefulSet", "db")), "10.244.5.1");
    let shop_web = pod("shop", "web-1", &[("app", "shop"), ("component", "web")], Some(("Deployment", "web")), "10.244.5.2");
    let blog_db = pod("shop", "blog-db-0", &[("app", "blog"), ("component", "db")], Some(("StatefulSet", "blog-db")), "10.244.5.3");
    // A debug pod carrying exactly the web's labels: nothing tells them apart.
    let twin = pod("shop", "debug", &[("app", "shop"), ("component", "web")], None, "10.244.5.4");
    let history = vec![
        obs(shop_web.clone(), shop_db.clone(), Tcp, 5432, Outcome::Allowed, 5),
        obs(blog_db.clone(), shop_web.clone(), Tcp, 80, Outcome::Denied, 1),
        obs(twin.clone(), shop_db.clone(), Tcp, 5432, Outcome::Denied, 2),
    ];
    let s = suggest(&history, &Inventory::new(), &SuggestOptions::default());
    let db = s.policies.iter().find(|p| p.metadata.name.as_deref() == Some("allow-db")).unwrap();
    let db = serde_json::to_value(db).unwrap();
    assert_eq!(db["spec"]["podSelector"]["matchLabels"], serde_json::json!({"app": "shop", "component": "db"}));
    assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
    assert!(s.warnings[0].contains("shop/web") && s.warnings[0].contains("debug"), "{}", s.warnings[0]);
    // The replay shows what that costs: the twin's denied attempt would now pass.
    let r = replay(&engine_of(&s.policies), &Cluster::new(), &history, |o| o == Outcome::Allowed);
    assert!(!r.breaks_anything());
    assert_eq!(r.newly_allowed.len(), 1);
    assert_eq!((r.newly_allowed[0].src_workload.as_str(), r.newly_allowed[0].flows), ("shop-web", 2));
}

#[test]
fn relabelled_pods_make_the_proof_fail() {
    use Protocol::*;
    // The api's pods were relabelled during the window: early attempts carried app=api-v1.
    let old = pod("backend", "api-7d9-1", &[("app", "api-v1"), ("pod-template-hash", "7d9")], Some(("Deployment", "api")), "10.244.1.3");
    let history = vec![
        obs(frontend(), old, Udp, 5353, Outcome::Allowed, 3),
        obs(frontend(), api(2), Udp, 5353, Outcome::Allowed, 3),
    ];
    let s = suggest(&history, &inventory(), &SuggestOptions::default());
    let r = replay(&engine_of(&s.policies), &Cluster::new(), &history, |o| o == Outcome::Allowed);
    assert!(r.breaks_anything());
    assert_eq!(r.newly_denied.len(), 1);
    assert_eq!((r.newly_denied[0].dst_workload.as_str(), r.newly_denied[0].flows), ("api", 3));
    assert!(r.newly_denied[0].policies.contains(&"backend/default-deny".to_string()));
}

#[test]
fn refused_attempts_open_no_port_unless_asked() {
    use Protocol::*;
    let mut history = seed_history();
    // Nothing listens on the db's 5432: its kernel refused each attempt.
    history.push(obs(frontend(), db(), Tcp, 5432, Outcome::Refused, 4));
    let s = suggest(&history, &inventory(), &SuggestOptions::default());
    assert!(!yaml(&s.policies).contains("5432"), "no port opened for a refusal");
    assert_eq!(s.refused.len(), 1);
    assert_eq!(s.refused[0].describe(), "frontend/frontend -> db/db 5432/TCP: 4 attempts");
    let explained = s.yaml(true).unwrap();
    assert!(explained.contains("--include-refused") && explained.contains("db/db 5432/TCP: 4 attempts"), "{explained}");
    // The proof leaves refusals out instead of calling them denied or broken.
    let engine = engine_of(&s.policies);
    let r = replay(&engine, &Cluster::default(), &history, |o| SuggestOptions::default().counts_as_allowed(o));
    assert_eq!(r.refused, 4);
    assert!(!r.breaks_anything() && r.still_denied.is_empty() && r.newly_allowed.is_empty(), "{r:?}");

    let opts = SuggestOptions { include_refused: true, ..Default::default() };
    let s = suggest(&history, &inventory(), &opts);
    assert!(yaml(&s.policies).contains("5432"), "kept when asked");
    assert!(s.refused.is_empty());
}

#[test]
fn fields_an_older_server_lacks_are_left_out_and_said() {
    use Protocol::*;
    let mut history = Vec::new();
    for port in [8000, 8001, 8002] {
        history.push(obs(frontend(), db(), Tcp, port, Outcome::Allowed, 1));
    }
    // Before 1.25: no endPort, each port on its own.
    let old = SuggestOptions { workload: Some("db".into()), end_port: false, namespace_name_label: false, ..Default::default() };
    let s = suggest(&history, &inventory(), &old);
    let p = serde_json::to_value(&s.policies[0]).unwrap();
    assert_eq!(
        p["spec"]["ingress"][0]["ports"],
        serde_json::json!([{"port": 8000, "protocol": "TCP"}, {"port": 8001, "protocol": "TCP"}, {"port": 8002, "protocol": "TCP"}])
    );
    assert!(s.warnings.iter().any(|w| w.contains("endPort")), "{:?}", s.warnings);
    // Before 1.22: the peer's namespace is named by a label the server does not set.
    assert!(s.warnings.iter().any(|w| w.contains("kubernetes.io/metadata.name") && w.contains("frontend")), "{:?}", s.warnings);
    // A current server: one range, no warning.
    let s = suggest(&history, &inventory(), &SuggestOptions { workload: Some("db".into()), ..Default::default() });
    assert!(serde_json::to_value(&s.policies[0]).unwrap().to_string().contains("endPort"));
    assert!(s.warnings.iter().all(|w| !w.contains("endPort") && !w.contains("metadata.name")), "{:?}", s.warnings);
}
