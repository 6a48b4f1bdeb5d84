//! kube-proxy emulation: the nftables ruleset loaded into every node netns. Service traffic
//! (ClusterIP + port + protocol) is DNATed to a random endpoint; traffic to a ClusterIP that
//! has no endpoints, or to a port the service does not have, is rejected as kube-proxy does.

use std::fmt::Write as _;

use crate::plan::{self, SERVICE_CIDR_V4, SERVICE_CIDR_V6};
use crate::state::State;

/// The name of the nft tables (`ip` and `ip6`) the lab owns.
pub const TABLE: &str = "flows-lab";
/// Marks connections from an endpoint to its own service so they are masqueraded (hairpin):
/// otherwise the pod would receive a packet from its own address and drop it.
const MASQ_MARK: u32 = 0x4000;

/// The whole ruleset for one node: both families, replacing any previous version.
pub fn nft_ruleset(state: &State) -> String {
    let mut out = String::new();
    for v6 in [false, true] {
        let family = if v6 { "ip6" } else { "ip" };
        // "add table" + "delete table" makes re-applying the ruleset idempotent.
        let _ = writeln!(out, "table {family} {TABLE}\ndelete table {family} {TABLE}");
        table(&mut out, state, v6);
    }
    out
}

fn table(out: &mut String, state: &State, v6: bool) {
    let (family, addr, cidr) = if v6 {
        ("ip6", "ip6", SERVICE_CIDR_V6)
    } else {
        ("ip", "ip", SERVICE_CIDR_V4)
    };
    let _ = writeln!(out, "table {family} {TABLE} {{");
    for (name, hook) in [("prerouting", "prerouting"), ("output", "output")] {
        let _ = writeln!(
            out,
            "\tchain {name} {{\n\t\ttype nat hook {hook} priority -100; policy accept;\n\t\tjump services\n\t}}"
        );
    }
    let _ = writeln!(
        out,
        "\tchain postrouting {{\n\t\ttype nat hook postrouting priority 100; policy accept;\n\t\tmeta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} masquerade\n\t}}"
    );

    let mut dispatch = String::new();
    let mut chains = String::new();
    for (si, svc) in state.services.iter().enumerate() {
        let cluster_ip = if v6 {
            svc.cluster_ipv6.to_string()
        } else {
            svc.cluster_ipv4.to_string()
        };
        for pe in plan::endpoints(state, svc) {
            if pe.endpoints.is_empty() {
                continue; // falls through to the reject chain
            }
            let proto = pe.port.protocol.to_ascii_lowercase();
            let port = pe.port.port;
            let svc_chain = format!("svc-{si}-{proto}-{port}");
            let label = match &pe.port.name {
                Some(n) => format!("{}/{}:{n}", svc.namespace, svc.name),
                None => format!("{}/{}:{port}", svc.namespace, svc.name),
            };
            let _ = writeln!(
                dispatch,
                "\t\t{addr} daddr {cluster_ip} {proto} dport {port} jump {svc_chain} comment \"{label}\""
            );
            let ep_chain = |ei: usize| format!("ep-{si}-{proto}-{port}-{ei}");
            if pe.endpoints.len() == 1 {
                let _ = writeln!(
                    chains,
                    "\tchain {svc_chain} {{\n\t\tjump {}\n\t}}",
                    ep_chain(0)
                );
            } else {
                let arms: Vec<String> = (0..pe.endpoints.len())
                    .map(|ei| format!("{ei} : jump {}", ep_chain(ei)))
                    .collect();
                let _ = writeln!(
                    chains,
                    "\tchain {svc_chain} {{\n\t\tnumgen random mod {} vmap {{ {} }}\n\t}}",
                    pe.endpoints.len(),
                    arms.join(", ")
                );
            }
            for (ei, ep) in pe.endpoints.iter().enumerate() {
                let ip = ep.ip(v6);
                let target = if v6 {
                    format!("[{ip}]:{}", ep.port)
                } else {
                    format!("{ip}:{}", ep.port)
                };
                let _ = writeln!(
                    chains,
                    "\tchain {} {{\n\t\t{addr} saddr {ip} meta mark set meta mark | {MASQ_MARK:#x}\n\t\tmeta l4proto {proto} dnat to {target} comment \"{}/{}\"\n\t}}",
                    ep_chain(ei),
                    ep.namespace,
                    ep.pod
                );
            }
        }
    }
    let _ = writeln!(out, "\tchain services {{\n{dispatch}\t}}");
    out.push_str(&chains);

    // After DNAT nothing is still addressed to the service range: whatever is, had no
    // endpoint or no such service port.
    for (name, hook) in [("filter-forward", "forward"), ("filter-output", "output")] {
        let _ = writeln!(
            out,
            "\tchain {name} {{\n\t\ttype filter hook {hook} priority 0; policy accept;\n\t\tjump reject-services\n\t}}"
        );
    }
    let _ = writeln!(
        out,
        "\tchain reject-services {{\n\t\t{addr} daddr {cidr} meta l4proto tcp reject with tcp reset\n\t\t{addr} daddr {cidr} reject\n\t}}"
    );
    let _ = writeln!(out, "}}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Input, parse_str};
    use std::path::Path;

    #[test]
    fn ruleset_dnats_each_endpoint_and_rejects_the_rest() {
        let text = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: b}
spec:
  replicas: 2
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: b}
spec: {selector: {app: api}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: b}
spec: {selector: {app: none}, ports: [{port: 80}]}
"#;
        let mut input = Input::default();
        parse_str(Path::new("x.yaml"), text, &mut input).expect("valid");
        let state = plan::plan(&input, 2).expect("plan");
        let rules = nft_ruleset(&state);
        let api = state.service("b", "api").expect("svc");
        let empty = state.service("b", "empty").expect("svc");
        assert!(rules.contains(&format!("ip daddr {} tcp dport 80 jump", api.cluster_ipv4)));
        assert!(rules.contains(&format!("ip6 daddr {} tcp dport 80 jump", api.cluster_ipv6)));
        assert!(rules.contains("numgen random mod 2 vmap"));
        for p in state.deployment_pods("b", "api") {
            assert!(rules.contains(&format!("dnat to {}:8080", p.ipv4)));
            assert!(rules.contains(&format!("dnat to [{}]:8080", p.ipv6)));
        }
        assert!(
            !rules.contains(&empty.cluster_ipv4.to_string()),
            "no endpoints: no DNAT rule"
        );
        assert!(rules.contains("ip daddr 10.96.0.0/16 meta l4proto tcp reject with tcp reset"));
        assert!(
            rules.contains("udp dport 53 jump"),
            "kube-dns is always there"
        );
    }
}
