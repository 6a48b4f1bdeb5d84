//! Synthetic clusters for benchmarks: many namespaces, pods and policies of the kinds
//! real clusters have (default deny, app-to-app, cross-namespace, DNS egress, ipBlock with
//! except, named ports, port ranges). Deterministic: same arguments, same cluster.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::networking::v1::{
        IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
        NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
        util::intstr::IntOrString,
    },
};

use crate::{Cluster, CompiledPolicy, ContainerPort, PodInfo, Protocol};

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        match_expressions: None,
    }
}

fn port(p: IntOrString, proto: &str, end: Option<i32>) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(p),
        end_port: end,
        protocol: Some(proto.to_string()),
    }
}

fn pod_peer(ns: Option<LabelSelector>, pod: Option<LabelSelector>) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: ns,
        pod_selector: pod,
        ip_block: None,
    }
}

/// Pod `i` of namespace `n` is number `n * pods_per_ns + i`, on node `(n + i) % nodes`,
/// labelled app-(i % 10) and tier front (even i) or back; its `http` port is 8080 + i % 3.
///
/// The address of pod number `idx` (IPv4) in the synthetic cluster.
pub fn pod_ip(idx: usize) -> IpAddr {
    IpAddr::from([10, 200, (idx / 256) as u8, (idx % 256) as u8])
}

/// The `k`th policy of namespace `n`: six shapes in turn (default deny, named port from
/// a tier, another team's app on a range, DNS and an ipBlock egress, egress to prod
/// namespaces, a NodePort-like range from anywhere).
fn policy_spec(n: usize, k: usize) -> NetworkPolicySpec {
    let app = format!("app-{}", k % 10);
    let mut spec = NetworkPolicySpec {
        pod_selector: Some(sel(&[("app", &app)])),
        ..Default::default()
    };
    match k % 6 {
        0 => {
            // Default deny ingress for the namespace.
            spec.pod_selector = Some(LabelSelector::default());
            spec.policy_types = Some(vec!["Ingress".into()]);
        }
        1 => {
            spec.ingress = Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![pod_peer(None, Some(sel(&[("tier", "front")])))]),
                ports: Some(vec![port(IntOrString::String("http".into()), "TCP", None)]),
            }]);
        }
        2 => {
            spec.ingress = Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![pod_peer(
                    Some(sel(&[("team", &format!("team-{}", (n + 1) % 10))])),
                    Some(sel(&[("app", &format!("app-{}", (k + 1) % 10))])),
                )]),
                ports: Some(vec![
                    port(IntOrString::Int(8080), "TCP", Some(8082)),
                    port(IntOrString::Int(9090), "UDP", None),
                ]),
            }]);
        }
        3 => {
            spec.policy_types = Some(vec!["Egress".into()]);
            spec.egress = Some(vec![
                NetworkPolicyEgressRule {
                    to: Some(vec![pod_peer(
                        Some(sel(&[("kubernetes.io/metadata.name", "kube-system")])),
                        Some(sel(&[("k8s-app", "kube-dns")])),
                    )]),
                    ports: Some(vec![port(IntOrString::Int(53), "UDP", None)]),
                },
                NetworkPolicyEgressRule {
                    to: Some(vec![NetworkPolicyPeer {
                        ip_block: Some(IPBlock {
                            cidr: format!("192.0.{}.0/24", n % 256),
                            except: Some(vec![format!("192.0.{}.128/25", n % 256)]),
                        }),
                        ..Default::default()
                    }]),
                    ports: Some(vec![port(IntOrString::Int(443), "TCP", None)]),
                },
            ]);
        }
        4 => {
            spec.policy_types = Some(vec!["Egress".into()]);
            spec.egress = Some(vec![NetworkPolicyEgressRule {
                to: Some(vec![pod_peer(
                    Some(LabelSelector {
                        match_labels: None,
                        match_expressions: Some(vec![LabelSelectorRequirement {
                            key: "env".into(),
                            operator: "In".into(),
                            values: Some(vec!["prod".into()]),
                        }]),
                    }),
                    None,
                )]),
                ports: Some(vec![port(IntOrString::String("http".into()), "TCP", None)]),
            }]);
        }
        _ => {
            spec.ingress = Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![pod_peer(Some(LabelSelector::default()), None)]),
                ports: Some(vec![port(IntOrString::Int(30000), "TCP", Some(32767))]),
            }]);
        }
    }
    spec
}

/// `namespaces` × `pods_per_ns` pods spread over `nodes` nodes, and `policies_per_ns`
/// policies in every namespace.
pub fn cluster(
    namespaces: usize,
    pods_per_ns: usize,
    policies_per_ns: usize,
    nodes: usize,
) -> (Cluster, Vec<CompiledPolicy>) {
    let mut c = Cluster::new();
    c.add_namespace("kube-system", BTreeMap::new());
    c.add_pod(PodInfo {
        namespace: "kube-system".into(),
        name: "coredns".into(),
        node: Some("node-0".into()),
        labels: [("k8s-app".to_string(), "kube-dns".to_string())].into(),
        ips: vec![IpAddr::from([10, 199, 0, 10])],
        ports: vec![ContainerPort {
            name: Some("dns".into()),
            port: 53,
            protocol: Protocol::Udp,
        }],
    });
    for n in 0..namespaces {
        let ns = format!("ns-{n}");
        c.add_namespace(
            &ns,
            [
                ("team".to_string(), format!("team-{}", n % 10)),
                ("env".to_string(), if n % 3 == 0 { "prod" } else { "dev" }.to_string()),
            ]
            .into(),
        );
        for i in 0..pods_per_ns {
            let idx = n * pods_per_ns + i;
            c.add_pod(PodInfo {
                namespace: ns.clone(),
                name: format!("pod-{i}"),
                // Spread so each node gets pods of every app and tier.
                node: Some(format!("node-{}", (n + i) % nodes.max(1))),
                labels: [
                    ("app".to_string(), format!("app-{}", i % 10)),
                    ("tier".to_string(), if i % 2 == 0 { "front" } else { "back" }.to_string()),
                ]
                .into(),
                ips: vec![pod_ip(idx)],
                ports: vec![
                    ContainerPort {
                        name: Some("http".into()),
                        port: 8080 + (i % 3) as u16,
                        protocol: Protocol::Tcp,
                    },
                    ContainerPort {
                        name: Some("metrics".into()),
                        port: 9090,
                        protocol: Protocol::Udp,
                    },
                ],
            });
        }
    }
    let mut policies = Vec::new();
    for n in 0..namespaces {
        let ns = format!("ns-{n}");
        for k in 0..policies_per_ns {
            let spec = policy_spec(n, k);
            let np = NetworkPolicy {
                metadata: ObjectMeta {
                    name: Some(format!("pol-{k}")),
                    namespace: Some(ns.clone()),
                    ..Default::default()
                },
                spec: Some(spec),
            };
            policies.push(CompiledPolicy::compile(&np));
        }
    }
    (c, policies)
}
