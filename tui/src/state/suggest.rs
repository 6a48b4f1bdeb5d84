//! For a denied flow: the policy `flows policy suggest` would add to allow it, chosen with
//! the same rules (smallest exact stable selectors, ports as seen), against the pods the
//! dashboard has seen recently.

use flows_flow::advice::observation;
use flows_policy::advice::{self, Inventory, Outcome, Party, SuggestOptions};
use flows_proto::{Flow, Verdict};

/// The allow policies (YAML) that would let `f` through, or None when it was not denied
/// by policy or names no pod to write a policy for.
pub fn for_denied<'a>(f: &Flow, seen: impl Iterator<Item = &'a Flow>) -> Option<String> {
    if f.verdict != Verdict::Dropped as i32 && f.verdict != Verdict::Audit as i32 {
        return None;
    }
    let egress = !f.egress_denied_by.is_empty();
    let ingress = !f.ingress_denied_by.is_empty();
    if !egress && !ingress {
        return None;
    }
    let mut inventory = Inventory::new();
    inventory.observe(&seen.filter_map(|s| observation(s, Outcome::Allowed)).collect::<Vec<_>>());
    let obs = observation(f, Outcome::Allowed)?;
    let mut namespaces = Vec::new();
    for (denied, p) in [(egress, &obs.src), (ingress, &obs.dst)] {
        if let (true, Party::Pod(p)) = (denied, p) {
            namespaces.push(p.namespace.clone());
        }
    }
    if namespaces.is_empty() {
        return None;
    }
    let mut s = advice::suggest(&[obs], &inventory, &SuggestOptions { namespaces, ..Default::default() });
    s.policies.retain(|p| {
        let spec = p.spec.as_ref();
        p.metadata.name.as_deref() != Some("default-deny")
            && ((egress && spec.is_some_and(|s| s.egress.is_some())) || (ingress && spec.is_some_and(|s| s.ingress.is_some())))
    });
    if s.policies.is_empty() {
        return None;
    }
    s.yaml(false).ok()
}
