//! The policy maps: compiled policy state written into the kernel's maps, changing only
//! what differs, in an order that never denies what both states allow.

use aya::maps::{
    Array, HashMap as BpfHashMap, MapData,
    lpm_trie::{Key, LpmTrie},
};
use flows_common::{
    DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, EndpointValue, MODE_AUDIT,
    MODE_ENFORCE, MODE_OFF, POLICY_KEY_FIXED_BITS, PolicyKey,
};
use flows_policy::compile::{DatapathState, Direction, Mode};

use crate::datapath::error::{DatapathError, map_err};

/// The policy maps and what was last written to them.
pub struct PolicyMaps {
    ipcache: LpmTrie<MapData, [u8; 16], u32>,
    endpoints: BpfHashMap<MapData, [u8; 16], EndpointValue>,
    policy: LpmTrie<MapData, PolicyKey, u32>,
    rev: Array<MapData, u32>,
    unknown_mode: Array<MapData, u8>,
    current: DatapathState,
    revision: u32,
}

/// A new policy revision: connections decided before it are decided again.
fn bump(rev: &mut Array<MapData, u32>, revision: &mut u32) -> Result<(), DatapathError> {
    *revision = revision.wrapping_add(1);
    rev.set(0, *revision, 0).map_err(map_err("POLICY_REV"))
}

/// Counts of one update, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyUpdate {
    pub written: usize,
    pub removed: usize,
    pub revision: u32,
}

fn ip_key(ip: std::net::IpAddr) -> [u8; 16] {
    match ip {
        std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(a) => a.octets(),
    }
}

fn cidr_key(c: &flows_policy::cidr::Cidr) -> Key<[u8; 16]> {
    let extra = if c.addr.is_ipv4() { 96 } else { 0 };
    Key::new(c.len as u32 + extra, ip_key(c.addr))
}

fn policy_key(k: &flows_policy::compile::PolicyKey) -> Key<PolicyKey> {
    Key::new(
        POLICY_KEY_FIXED_BITS + k.port_bits as u32,
        PolicyKey {
            endpoint_be: k.endpoint.to_be(),
            identity_be: k.identity.to_be(),
            direction: match k.direction {
                Direction::Ingress => DIR_INGRESS,
                Direction::Egress => DIR_EGRESS,
            },
            proto: k.protocol,
            port_be: k.port.to_be(),
        },
    )
}

fn endpoint_value(e: &flows_policy::compile::EndpointEntry) -> EndpointValue {
    let mut flags = 0;
    if e.ingress_isolation.is_some() {
        flags |= EP_INGRESS_ISOLATED;
    }
    if e.egress_isolation.is_some() {
        flags |= EP_EGRESS_ISOLATED;
    }
    EndpointValue {
        endpoint: e.endpoint,
        mode: match e.mode {
            Mode::Off => MODE_OFF,
            Mode::Audit => MODE_AUDIT,
            Mode::Enforce => MODE_ENFORCE,
        },
        flags,
        _pad: [0; 2],
        ingress_isolation: e.ingress_isolation.unwrap_or(0),
        egress_isolation: e.egress_isolation.unwrap_or(0),
    }
}

impl PolicyMaps {
    pub(crate) fn new(
        ipcache: LpmTrie<MapData, [u8; 16], u32>,
        endpoints: BpfHashMap<MapData, [u8; 16], EndpointValue>,
        policy: LpmTrie<MapData, PolicyKey, u32>,
        rev: Array<MapData, u32>,
        unknown_mode: Array<MapData, u8>,
    ) -> PolicyMaps {
        PolicyMaps {
            ipcache,
            endpoints,
            policy,
            rev,
            unknown_mode,
            current: DatapathState::default(),
            revision: 0,
        }
    }

    /// Moves the maps to `next`, touching only what differs, in an order that never
    /// denies what both the old and the new state allow: new policy entries first, then
    /// the ipcache (identities may move to entries that now exist), then endpoints, then
    /// the revision (established connections are decided again), and only then removal
    /// of what is no longer needed.
    pub fn apply(&mut self, next: DatapathState) -> Result<PolicyUpdate, DatapathError> {
        let mut u = PolicyUpdate::default();
        // `current` is replaced only once the maps hold `next`: after a failed write the
        // next update still knows what is in the kernel and removes what is stale.
        let cur = &self.current;
        for (k, set) in &next.policy {
            if cur.policy.get(k) != Some(set) {
                self.policy
                    .insert(&policy_key(k), set, 0)
                    .map_err(map_err("POLICY"))?;
                u.written += 1;
            }
        }
        for (c, id) in &next.ipcache {
            if cur.ipcache.get(c) != Some(id) {
                self.ipcache
                    .insert(&cidr_key(c), id, 0)
                    .map_err(map_err("IPCACHE"))?;
                u.written += 1;
            }
        }
        for (ip, e) in &next.endpoints {
            if cur.endpoints.get(ip) != Some(e) {
                self.endpoints
                    .insert(ip_key(*ip), endpoint_value(e), 0)
                    .map_err(map_err("ENDPOINTS"))?;
                u.written += 1;
            }
        }
        if u.written > 0 {
            bump(&mut self.rev, &mut self.revision)?;
        }
        for ip in cur.endpoints.keys() {
            if !next.endpoints.contains_key(ip) {
                let _ = self.endpoints.remove(&ip_key(*ip));
                u.removed += 1;
            }
        }
        for k in cur.policy.keys() {
            if !next.policy.contains_key(k) {
                let _ = self.policy.remove(&policy_key(k));
                u.removed += 1;
            }
        }
        for c in cur.ipcache.keys() {
            if !next.ipcache.contains_key(c) {
                let _ = self.ipcache.remove(&cidr_key(c));
                u.removed += 1;
            }
        }
        // Connections decided while removals were under way saw a mix of old and new:
        // decide them again against the final state.
        if u.removed > 0 {
            bump(&mut self.rev, &mut self.revision)?;
        }
        u.revision = self.revision;
        self.current = next;
        Ok(u)
    }

    /// How a pod behind this node's interfaces that the policy does not know yet is
    /// decided: closed with the node's default mode once a policy source has spoken
    /// (a new pod is not open while its address travels to the probe), open (`Off`)
    /// without one.
    pub fn set_unknown_endpoint_mode(&mut self, mode: Mode) -> Result<(), DatapathError> {
        let value = match mode {
            Mode::Off => MODE_OFF,
            Mode::Audit => MODE_AUDIT,
            Mode::Enforce => MODE_ENFORCE,
        };
        self.unknown_mode.set(0, value, 0).map_err(map_err("UNKNOWN_ENDPOINT_MODE"))
    }

    /// The policy sets of the state last applied (for naming policies in flows).
    pub fn current(&self) -> &DatapathState {
        &self.current
    }

    /// The revision last written to the datapath.
    pub fn revision(&self) -> u32 {
        self.revision
    }
}
