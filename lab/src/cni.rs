//! How pods are wired to their node (`flows lab up --cni MODE`), the way the CNIs that
//! real clusters run build it. Where a plugin of the CNI project does the job (Debian's
//! `containernetworking-plugins`), the lab calls it as a container runtime does: the
//! plugin binary, run in the node's namespace, with `CNI_COMMAND=ADD|DEL` and the network
//! configuration on stdin. The addresses come from the lab's plan (the `static` IPAM
//! plugin), so a pod has the same address in every mode.
//!
//! | mode | pod interface on the node | between nodes | like |
//! |---|---|---|---|
//! | `bridge` | `fl<hash>` on the `flbr0` bridge (made by the lab) | routed on the underlay | Flannel host-gw, kindnet before ptp |
//! | `flannel-vxlan` | `veth*` on `cni0` (the `bridge` plugin) | VXLAN `flannel.1` / `flannel-v6.1`, UDP 8472 | Flannel's default |
//! | `kindnet` | `veth*`, routed /32 (the `ptp` plugin) | routed on the underlay | kind's kindnet |
//! | `calico` | `cali<hash>`, routed /32, proxy ARP, no bridge | routed on the underlay (BGP's routes) | Calico, encapsulation none |
//! | `calico-vxlan` | as `calico` | VXLAN `vxlan.calico` / `vxlan-v6.calico`, UDP 4789 | Calico, VXLAN encapsulation |
//!
//! Calico's own plugin is not packaged, so `calico` pods are built with `ip` the way it
//! builds them (a `cali` veth whose host end has the MAC ee:ee:ee:ee:ee:ee, routes to
//! 169.254.1.1 and to that end's link-local address, a blackhole route for the node's
//! block).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::error::LabError;
use crate::state::PodRec;
pub use crate::wiring::{CniMode, VXLAN_POD_MTU, Vxlan};

/// Where Debian (and most distributions) put the CNI plugins, then the upstream default.
const PLUGIN_DIRS: [&str; 2] = ["/usr/lib/cni", "/opt/cni/bin"];
/// The network name in the plugins' configuration (and their state files).
const NETWORK: &str = "flows-lab";
/// Calico's gateway address inside every pod: no interface has it; the node's end of
/// the veth answers ARP for it by proxy.
pub const CALICO_GATEWAY_V4: &str = "169.254.1.1";
/// The link-local address of a `cali` veth's node end (from its MAC ee:ee:ee:ee:ee:ee).
pub const CALICO_GATEWAY_V6: &str = "fe80::ecee:eeff:feee:eeee";
pub const CALICO_HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";


/// The nft table of a node's masquerade rules.
pub const MASQ_TABLE: &str = "flows-lab-masq";

/// A node's masquerade towards the world, as the CNIs write it: traffic from the pods'
/// networks to anything outside them leaves with the node's address.
pub fn masquerade_ruleset(pods_v4: &str, pods_v6: &str, uplink: &str) -> String {
    let mut out = String::new();
    for (family, addr, pods) in [("ip", "ip", pods_v4), ("ip6", "ip6", pods_v6)] {
        out.push_str(&format!(
            "table {family} {MASQ_TABLE} {{\n\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\toifname \"{uplink}\" {addr} saddr {pods} {addr} daddr != {pods} masquerade\n\t}}\n}}\n"
        ));
    }
    out
}

/// The directory holding the CNI plugins, or why there is none.
fn plugin_dir() -> Result<PathBuf, LabError> {
    PLUGIN_DIRS
        .iter()
        .map(PathBuf::from)
        .find(|d| d.join("bridge").is_file() && d.join("ptp").is_file() && d.join("static").is_file())
        .ok_or_else(|| LabError::Command {
            command: "find the CNI plugins".to_string(),
            status: format!("none in {}", PLUGIN_DIRS.join(" or ")),
            stderr: "install them: apt-get install -y containernetworking-plugins".to_string(),
        })
}

/// Checks that the plugins `mode` needs are installed (before anything is built).
pub(crate) fn preflight(mode: CniMode) -> Result<(), LabError> {
    if mode.plugin().is_some() {
        plugin_dir()?;
    }
    Ok(())
}

/// The network configuration a runtime hands the plugin for `pod` (gateways: the node's
/// first addresses of its pod CIDRs).
pub fn config(mode: CniMode, pod: &PodRec, gateway_v4: &str, gateway_v6: &str) -> Option<Value> {
    let ipam = json!({
        "type": "static",
        "addresses": [
            { "address": format!("{}/24", pod.ipv4), "gateway": gateway_v4 },
            { "address": format!("{}/64", pod.ipv6), "gateway": gateway_v6 },
        ],
        "routes": [ { "dst": "0.0.0.0/0" }, { "dst": "::/0" } ],
    });
    let conf = match mode.plugin()? {
        "bridge" => json!({
            "cniVersion": "1.0.0", "name": NETWORK, "type": "bridge",
            "bridge": mode.bridge()?, "isGateway": true, "hairpinMode": true,
            "mtu": mode.pod_mtu(), "ipam": ipam,
        }),
        plugin => json!({
            "cniVersion": "1.0.0", "name": NETWORK, "type": plugin,
            "mtu": mode.pod_mtu(), "ipam": ipam,
        }),
    };
    Some(conf)
}

/// The node's end of the pod's veth, from a plugin's ADD result: the interface that is
/// neither in the pod's namespace nor the bridge.
pub fn host_ifname(result: &Value, bridge: Option<&str>) -> Option<String> {
    result["interfaces"]
        .as_array()?
        .iter()
        .filter(|i| i.get("sandbox").and_then(Value::as_str).is_none_or(str::is_empty))
        .filter_map(|i| i["name"].as_str())
        .find(|n| Some(*n) != bridge)
        .map(str::to_string)
}

/// Runs the plugin for `pod` as a runtime does; returns its stdout (the result).
fn invoke(command: &str, node_netns: &str, plugin: &str, pod: &PodRec, conf: &Value) -> Result<String, LabError> {
    let dir = plugin_dir()?;
    let what = format!("CNI {command} ({plugin}) for pod {}/{}", pod.namespace, pod.name);
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_netns])
        .arg(dir.join(plugin))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.uid)
        .env("CNI_NETNS", Path::new("/run/netns").join(&pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| LabError::Spawn { command: what.clone(), hint: String::new(), error })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows up as the plugin's own failure below.
        let _ = stdin.write_all(conf.to_string().as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|error| LabError::Spawn { command: what.clone(), hint: String::new(), error })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        // Plugins report errors as JSON on stdout ({"code", "msg", "details"}).
        let stderr = format!("{} {}", stdout.trim(), String::from_utf8_lossy(&out.stderr).trim());
        return Err(LabError::Command { command: what, status: out.status.to_string(), stderr });
    }
    Ok(stdout)
}

/// CNI ADD: wires `pod` (whose namespace exists) to its node; returns the node's end of
/// its veth.
pub(crate) fn add(mode: CniMode, node_netns: &str, pod: &PodRec, conf: &Value) -> Result<String, LabError> {
    let plugin = mode.plugin().ok_or_else(|| LabError::plan(format!("{mode} uses no CNI plugin")))?;
    let out = invoke("ADD", node_netns, plugin, pod, conf)?;
    let result: Value = serde_json::from_str(&out).map_err(|e| LabError::Command {
        command: format!("CNI ADD ({plugin}) for pod {}/{}", pod.namespace, pod.name),
        status: "unreadable result".to_string(),
        stderr: format!("{e}: {out}"),
    })?;
    host_ifname(&result, mode.bridge()).ok_or_else(|| LabError::Command {
        command: format!("CNI ADD ({plugin}) for pod {}/{}", pod.namespace, pod.name),
        status: "no host interface in the result".to_string(),
        stderr: out,
    })
}

/// CNI DEL: unwires `pod`. Like a runtime, tolerant of what is already gone.
pub(crate) fn del(mode: CniMode, node_netns: &str, pod: &PodRec, conf: &Value) -> Result<(), LabError> {
    match mode.plugin() {
        Some(plugin) => invoke("DEL", node_netns, plugin, pod, conf).map(|_| ()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodRec {
        PodRec {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u-1".into(),
            labels: Default::default(),
            node: "node-1".into(),
            netns: "flows-pod-00000001".into(),
            host_ifname: String::new(),
            ipv4: "10.244.1.5".parse().expect("v4"),
            ipv6: "fd00:10:244:1::5".parse().expect("v6"),
            ports: Vec::new(),
            owner: None,
            workload: None,
        }
    }

    #[test]
    fn names_parse_back_and_unknown_ones_are_refused() {
        for m in CniMode::ALL {
            assert_eq!(CniMode::parse(m.name()), Ok(m));
            assert_eq!(serde_json::to_value(m).expect("json"), m.name());
        }
        let e = CniMode::parse("weave").expect_err("unknown");
        assert!(e.contains("flannel-vxlan") && e.contains("calico"), "{e}");
    }

    #[test]
    fn plugin_configs_carry_the_planned_addresses() {
        let c = config(CniMode::FlannelVxlan, &pod(), "10.244.1.1", "fd00:10:244:1::1").expect("bridge plugin");
        assert_eq!(c["type"], "bridge");
        assert_eq!(c["bridge"], "cni0");
        assert_eq!(c["mtu"], VXLAN_POD_MTU);
        assert_eq!(c["ipam"]["addresses"][0]["address"], "10.244.1.5/24");
        assert_eq!(c["ipam"]["addresses"][1]["gateway"], "fd00:10:244:1::1");
        let k = config(CniMode::Kindnet, &pod(), "10.244.1.1", "fd00:10:244:1::1").expect("ptp plugin");
        assert_eq!((k["type"].as_str(), k["mtu"].as_u64()), (Some("ptp"), Some(1500)));
        assert!(config(CniMode::Calico, &pod(), "x", "y").is_none(), "calico is wired by hand");
        assert!(config(CniMode::Bridge, &pod(), "x", "y").is_none());
    }

    #[test]
    fn masquerade_leaves_pod_to_pod_traffic_alone() {
        let r = masquerade_ruleset("10.244.0.0/16", "fd00:10:244::/48", "fl-uplink");
        assert!(r.contains("oifname \"fl-uplink\" ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 masquerade"), "{r}");
        assert!(r.contains("table ip6 flows-lab-masq") && r.contains("ip6 daddr != fd00:10:244::/48"), "{r}");
    }

    #[test]
    fn the_host_end_is_found_in_a_result() {
        let r: Value = serde_json::from_str(
            r#"{"interfaces":[{"name":"cni0","mac":"b2"},{"name":"veth56bffc4b","mac":"4e"},
                {"name":"eth0","mac":"82","sandbox":"/run/netns/p"}]}"#,
        )
        .expect("json");
        assert_eq!(host_ifname(&r, Some("cni0")).as_deref(), Some("veth56bffc4b"));
        let ptp: Value = serde_json::from_str(r#"{"interfaces":[{"name":"eth0","sandbox":"/x"},{"name":"veth1"}]}"#).expect("json");
        assert_eq!(host_ifname(&ptp, None).as_deref(), Some("veth1"));
        assert_eq!(host_ifname(&json!({"interfaces": []}), None), None);
        assert_eq!(host_ifname(&json!({"code": 7, "msg": "x"}), None), None);
    }
}
