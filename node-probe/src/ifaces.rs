//! Finding pod interfaces.
//!
//! A pod's network namespace is joined to its node by a veth pair; the host side lives
//! in the node's namespace (the host's, on a real node; `flows-node-N` in the lab). The
//! probe attaches to every veth there, except names excluded on the command line (the
//! lab's uplink, for instance). This covers bridge-based CNIs (bridge, flannel) and
//! routed ones (Calico's `cali*`, Cilium's `lxc*`) alike; `--iface-prefix` narrows it.
//! The list is read with `ip -json link`, again whenever `ip monitor link` reports a
//! change (a new pod's interface is attached within milliseconds, not at the next
//! poll), and polled as well, so pods that come and go are attached and forgotten
//! without a restart even if the monitor fails.

use std::process::Command;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("running `ip {args}`: {source}")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("parsing the output of `ip {args}`: {source}")]
    Parse {
        args: String,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Link {
    pub ifindex: u32,
    pub ifname: String,
}

#[derive(Debug, Clone, Default)]
pub struct IfaceSelector {
    /// Only names starting with one of these (empty: any).
    pub prefixes: Vec<String>,
    /// Never these names.
    pub exclude: Vec<String>,
}

impl IfaceSelector {
    pub fn selects(&self, name: &str) -> bool {
        !self.exclude.iter().any(|e| e == name)
            && (self.prefixes.is_empty() || self.prefixes.iter().any(|p| name.starts_with(p)))
    }
}

/// `ip monitor link` in a namespace: every line it prints is a link that came, went or
/// changed. The child ends with the returned handle (killed on drop).
pub fn monitor_links(netns: Option<&str>) -> Result<tokio::process::Child, IfaceError> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["monitor", "link"]);
    tokio::process::Command::new("ip")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| IfaceError::Spawn { args: args.join(" "), source })
}

/// veth links in a network namespace (by `ip netns` name; None: the current one).
pub fn list_veths(netns: Option<&str>) -> Result<Vec<Link>, IfaceError> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-json", "link", "show", "type", "veth"]);
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(&args)
        .output()
        .map_err(|source| IfaceError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(IfaceError::Failed {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    parse_links(&out.stdout).map_err(|source| IfaceError::Parse {
        args: joined,
        source,
    })
}

pub fn parse_links(json: &[u8]) -> Result<Vec<Link>, serde_json::Error> {
    if json.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Vec::new());
    }
    serde_json::from_slice(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_json() {
        let j = br#"[{"ifindex":5,"link_netnsid":1,"ifname":"fl1a2b3c4d","flags":["UP"],"mtu":1500},
                    {"ifindex":9,"ifname":"fl-uplink","mtu":1500}]"#;
        let links = parse_links(j).expect("parse");
        assert_eq!(links.len(), 2);
        assert_eq!(links[0], Link { ifindex: 5, ifname: "fl1a2b3c4d".into() });
        assert!(parse_links(b"\n").expect("empty").is_empty());
        assert!(parse_links(b"{not json").is_err());
    }

    #[test]
    fn selector() {
        let s = IfaceSelector {
            prefixes: vec!["fl".into()],
            exclude: vec!["fl-uplink".into()],
        };
        assert!(s.selects("fl1a2b3c4d"));
        assert!(!s.selects("fl-uplink"));
        assert!(!s.selects("eth0"));
        assert!(IfaceSelector::default().selects("anything"));
    }
}
