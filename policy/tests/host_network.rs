//! A pod in its node's network namespace (hostNetwork: kube-proxy, a CNI agent, flows'
//! own probe) reports the node's address. NetworkPolicy does not apply to it, and its
//! address must stay the node's: were it the pod's, a policy of the pod's namespace
//! would decide the node's own traffic.

use std::net::IpAddr;

use flows_policy::{
    Engine, Manifests,
    compile::{IdentityAllocator, Mode, NodeView, SetTable, compile_datapath},
};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: kube-system }
---
apiVersion: v1
kind: Pod
metadata: { name: kube-proxy-x, namespace: kube-system, labels: { k8s-app: kube-proxy } }
spec: { nodeName: node-1, hostNetwork: true, containers: [ { name: c } ] }
status: { phase: Running, podIP: 192.168.0.1, podIPs: [ { ip: 192.168.0.1 } ] }
---
apiVersion: v1
kind: Pod
metadata: { name: coredns-x, namespace: kube-system, labels: { k8s-app: kube-dns } }
spec: { nodeName: node-1, containers: [ { name: c } ] }
status: { phase: Running, podIP: 10.244.1.5, podIPs: [ { ip: 10.244.1.5 } ] }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: deny-all, namespace: kube-system }
spec: { podSelector: {}, policyTypes: [ Ingress, Egress ] }
"#;

#[test]
fn a_host_network_pod_holds_no_address_and_is_no_endpoint() {
    let m = Manifests::parse([("cluster.yaml", CLUSTER)]).expect("manifests");
    let node: IpAddr = "192.168.0.1".parse().expect("ip");
    let pod: IpAddr = "10.244.1.5".parse().expect("ip");
    let proxy = m.cluster.pod("kube-system", "kube-proxy-x").expect("the pod is known");
    assert!(proxy.ips.is_empty(), "{:?}", proxy.ips);
    let state = compile_datapath(
        &m.cluster,
        &Engine::new(m.policies.clone()),
        &NodeView { is_local: &|_| true, mode_of: &|_| Mode::Enforce },
        &mut IdentityAllocator::new(),
        SetTable::new(),
    );
    assert!(!state.endpoints.contains_key(&node), "the node's address is no pod's endpoint");
    assert!(state.endpoints.contains_key(&pod), "an ordinary pod of the namespace is");
    let host = flows_policy::cidr::Cidr::parse("192.168.0.1/32").expect("cidr");
    assert!(!state.ipcache.contains_key(&host), "the node's address names no pod");
    assert!(state.ipcache.contains_key(&flows_policy::cidr::Cidr::parse("10.244.1.5/32").expect("cidr")));
}
