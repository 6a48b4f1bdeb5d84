//! Where the store writer picks each node up after a restart, and what it can no
//! longer get.
//!
//! The store's newest flows of each node ([`flows_store::NodeMark`]) say where to
//! start that node (a margin before its newest, by its own clock) and which flows of
//! that margin are stored already (not written twice). The flow ids carry the recording
//! probe's sequence ([`flows_flow::id::FlowId`]): the first flow that comes back after
//! the newest stored one shows how many the node's ring overwrote meanwhile, and those
//! are counted as unrecoverable. A flow that then comes from inside that gap (an
//! earlier sequence stamped later) is taken off the count again.

use std::collections::{HashMap, HashSet};

use flows_flow::id::FlowId;
use flows_proto::Flow;

use crate::stream::Resume;

/// How far before a node's newest stored flow it is read again: flows stamped out of
/// order within a node (events from different CPUs) are caught up within this.
pub const MARGIN_NS: i64 = 2_000_000_000;

/// One node's state after the restart.
#[derive(Debug, Default)]
struct Node {
    /// Its newest stored flow's time less the margin: anything stamped before is
    /// stored already (or was counted lost then).
    floor: i64,
    /// Ids stored within the margin.
    stored: HashSet<String>,
    /// The highest stored id of the recorder, where it has one.
    mark: Option<FlowId>,
    /// Sequences counted unrecoverable: [from, to).
    gap: Option<(u64, u64)>,
    /// Whether the first flow after the mark has come (the gap is known).
    settled: bool,
}

/// What to do with one flow that came after the restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Stored before the restart: not again.
    Stored,
    /// New: write it. `unrecoverable` moves by this much (a gap found, or a flow from
    /// inside one after all).
    Write { unrecoverable: i64 },
}

#[derive(Debug, Default)]
pub struct Resumed {
    nodes: HashMap<String, Node>,
    /// Nodes whose probe restarted while the writer was away (a new instance): what
    /// the old one made after the mark is gone, uncountable. Logged once each.
    restarted: HashSet<String>,
}

impl Resumed {
    pub fn new(marks: Vec<flows_store::NodeMark>) -> Resumed {
        let nodes = marks
            .into_iter()
            .map(|m| {
                let mark = m.uuids.iter().filter_map(|u| FlowId::parse(u)).max_by_key(|id| id.seq);
                let floor = m.newest.saturating_sub(MARGIN_NS);
                let node = Node { floor, stored: m.uuids.into_iter().collect(), mark, ..Default::default() };
                (m.node, node)
            })
            .collect();
        Resumed { nodes, restarted: HashSet::new() }
    }

    /// Each node from the margin before its newest stored flow; others from the start
    /// of what they hold.
    pub fn request(marks: &[flows_store::NodeMark]) -> Resume {
        Resume {
            since: marks.iter().map(|m| (m.node.clone(), m.newest.saturating_sub(MARGIN_NS))).collect(),
        }
    }

    pub fn check(&mut self, f: &Flow) -> Verdict {
        let Some(node) = self.nodes.get_mut(&f.node_name) else {
            return Verdict::Write { unrecoverable: 0 };
        };
        // The request starts each node at its floor already, but a node it could not
        // name (a peer listed by address) is read from the start of its ring.
        let at = f.time.as_ref().map(flows_proto::timestamp_nanos).unwrap_or(i64::MIN);
        if at < node.floor || node.stored.contains(&f.uuid) {
            return Verdict::Stored;
        }
        let (Some(mark), Some(id)) = (node.mark, FlowId::parse(&f.uuid)) else {
            return Verdict::Write { unrecoverable: 0 };
        };
        if id.instance != mark.instance {
            if self.restarted.insert(f.node_name.clone()) {
                tracing::warn!(
                    node = %f.node_name,
                    "the node's probe restarted while the store writer was away: the flows its old instance made after the newest stored one are gone, and cannot be counted"
                );
            }
            return Verdict::Write { unrecoverable: 0 };
        }
        if !node.settled {
            node.settled = true;
            if id.seq > mark.seq + 1 {
                node.gap = Some((mark.seq + 1, id.seq));
                return Verdict::Write { unrecoverable: (id.seq - mark.seq - 1) as i64 };
            }
            return Verdict::Write { unrecoverable: 0 };
        }
        match node.gap {
            Some((from, to)) if (from..to).contains(&id.seq) => Verdict::Write { unrecoverable: -1 },
            _ => Verdict::Write { unrecoverable: 0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flows_store::NodeMark;

    fn flow(node: &str, instance: u64, seq: u64) -> Flow {
        let time = Some(flows_proto::timestamp_from_nanos(10_000_000_000));
        Flow { node_name: node.into(), uuid: FlowId::new(instance, seq).to_uuid(), time, ..Default::default() }
    }

    fn mark(node: &str, instance: u64, seqs: &[u64]) -> NodeMark {
        NodeMark { node: node.into(), newest: 10_000_000_000, uuids: seqs.iter().map(|s| FlowId::new(instance, *s).to_uuid()).collect() }
    }

    #[test]
    fn stored_flows_are_skipped_and_a_gap_is_counted_once() {
        let marks = vec![mark("a", 7, &[8, 9, 10]), mark("b", 3, &[4])];
        assert_eq!(Resumed::request(&marks).since.get("a"), Some(&(10_000_000_000 - MARGIN_NS)));
        let mut r = Resumed::new(marks);
        assert_eq!(r.check(&flow("a", 7, 9)), Verdict::Stored);
        assert_eq!(r.check(&flow("a", 7, 10)), Verdict::Stored);
        // The ring overwrote 11..=14 while the writer was away.
        assert_eq!(r.check(&flow("a", 7, 15)), Verdict::Write { unrecoverable: 4 });
        assert_eq!(r.check(&flow("a", 7, 16)), Verdict::Write { unrecoverable: 0 });
        // One of them was stamped later and comes after all: it is not lost.
        assert_eq!(r.check(&flow("a", 7, 12)), Verdict::Write { unrecoverable: -1 });
        // Stamped before the margin: stored then, whatever its id.
        let mut old = flow("a", 7, 3);
        old.time = Some(flows_proto::timestamp_from_nanos(10_000_000_000 - MARGIN_NS - 1));
        assert_eq!(r.check(&old), Verdict::Stored);
        // Nothing missing on b.
        assert_eq!(r.check(&flow("b", 3, 5)), Verdict::Write { unrecoverable: 0 });
        assert_eq!(r.check(&flow("b", 3, 9)), Verdict::Write { unrecoverable: 0 }, "later gaps are the live stream's LostEvents");
    }

    #[test]
    fn new_nodes_restarted_probes_and_foreign_ids_are_written() {
        let mut r = Resumed::new(vec![mark("a", 7, &[10])]);
        assert_eq!(r.check(&flow("new", 1, 500)), Verdict::Write { unrecoverable: 0 });
        assert_eq!(r.check(&flow("a", 8, 0)), Verdict::Write { unrecoverable: 0 }, "another instance: uncountable, logged");
        let mut foreign = flow("a", 7, 50);
        foreign.uuid = "flow-50".into();
        assert_eq!(r.check(&foreign), Verdict::Write { unrecoverable: 0 });
    }
}
