//! The bounded ring of recent flows.
//!
//! One writer (the event reader) and any number of readers, each with its own cursor
//! (a sequence number). The writer never waits for readers: when it laps a slow reader,
//! that reader's next read says how many entries it lost and where to resume, so the
//! client is told with a LostEvent instead of silently missing flows.
//!
//! The ring names every flow it takes: its id ([`flows_flow::id::FlowId`]) is this
//! ring's instance and the flow's sequence number, so a reader that comes back later
//! (the relay after a restart) can tell exactly how many flows it can no longer get.

use std::sync::{Arc, Mutex};

use flows_proto::{Flow, LostEvent};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("ring capacity {capacity} must be a power of two between 2 and 2^24")]
    BadCapacity { capacity: usize },
}

/// What the ring holds: flows, and losses that happened upstream of it (kernel ring
/// buffer full), kept in-band so every reader sees them in order.
#[derive(Debug, Clone)]
pub enum Entry {
    Flow(Flow),
    Lost(LostEvent, flows_proto::Timestamp),
}

impl Entry {
    pub fn time(&self) -> Option<&flows_proto::Timestamp> {
        match self {
            Entry::Flow(f) => f.time.as_ref(),
            Entry::Lost(_, t) => Some(t),
        }
    }
}

/// 48 random bits: std's hasher keys come from the OS's random source, and the clock
/// separates two rings of one process.
fn random_instance() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() & ((1 << 48) - 1)
}

#[derive(Debug, Clone)]
pub enum Read {
    Entry(Arc<Entry>),
    /// The reader was overrun: `lost` entries are gone; continue at `resume`.
    Lost { lost: u64, resume: u64 },
    /// Nothing at this sequence yet.
    NotYet,
}

struct Inner {
    slots: Vec<Option<Arc<Entry>>>,
    next: u64,
}

pub struct FlowRing {
    mask: u64,
    /// Random per ring: ids from a restarted probe never continue an old sequence.
    instance: u64,
    inner: Mutex<Inner>,
    written: watch::Sender<u64>,
}

impl FlowRing {
    pub fn new(capacity: usize) -> Result<FlowRing, RingError> {
        if !capacity.is_power_of_two() || !(2..=1 << 24).contains(&capacity) {
            return Err(RingError::BadCapacity { capacity });
        }
        let (written, _) = watch::channel(0);
        Ok(FlowRing {
            mask: capacity as u64 - 1,
            instance: random_instance(),
            inner: Mutex::new(Inner {
                slots: vec![None; capacity],
                next: 0,
            }),
            written,
        })
    }

    /// The instance part of the ids of the flows this ring holds.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    pub fn capacity(&self) -> u64 {
        self.mask + 1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the ring inconsistent (each
        // operation is a single slot write plus a counter), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an entry, overwriting the oldest when full. Never blocks on readers.
    pub fn push(&self, e: Entry) {
        self.push_all(std::iter::once(e));
    }

    /// Appends entries in order under one lock and wakes readers once (a wakeup per
    /// entry cost more than the entry). The overwritten entries are freed after the lock
    /// is released, so readers wait only for the slot writes.
    pub fn push_all(&self, entries: impl IntoIterator<Item = Entry>) {
        let mut overwritten = Vec::new();
        let next = {
            let mut g = self.lock();
            for mut e in entries {
                if let Entry::Flow(f) = &mut e {
                    f.uuid = flows_flow::id::FlowId::new(self.instance, g.next).to_uuid();
                }
                let idx = (g.next & self.mask) as usize;
                if let Some(old) = g.slots[idx].replace(Arc::new(e)) {
                    overwritten.push(old);
                }
                g.next += 1;
            }
            g.next
        };
        drop(overwritten);
        self.written.send_replace(next);
    }

    /// (oldest readable sequence, next sequence to be written).
    pub fn bounds(&self) -> (u64, u64) {
        let g = self.lock();
        (g.next.saturating_sub(self.capacity()), g.next)
    }

    pub fn read(&self, seq: u64) -> Read {
        let g = self.lock();
        if seq >= g.next {
            return Read::NotYet;
        }
        let oldest = g.next.saturating_sub(self.capacity());
        if seq < oldest {
            return Read::Lost {
                lost: oldest - seq,
                resume: oldest,
            };
        }
        match &g.slots[(seq & self.mask) as usize] {
            Some(e) => Read::Entry(e.clone()),
            None => Read::NotYet,
        }
    }

    /// A receiver that changes whenever something is written.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.written.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(n: u32) -> Entry {
        Entry::Flow(Flow {
            packet_length: n,
            ..Default::default()
        })
    }

    fn len_of(r: Read) -> u32 {
        match r {
            Read::Entry(e) => match &*e {
                Entry::Flow(f) => f.packet_length,
                Entry::Lost(..) => panic!("lost"),
            },
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn every_flow_is_named_by_instance_and_sequence() {
        let (a, b) = (FlowRing::new(4).expect("ring"), FlowRing::new(4).expect("ring"));
        assert_ne!(a.instance(), b.instance(), "two rings, two instances");
        a.push_all((0..6).map(flow));
        for seq in 2..6 {
            let Read::Entry(e) = a.read(seq) else { panic!("entry {seq}") };
            let Entry::Flow(f) = &*e else { panic!("flow {seq}") };
            let id = flows_flow::id::FlowId::parse(&f.uuid).expect("a flow id");
            assert_eq!((id.instance, id.seq), (a.instance(), seq));
        }
    }

    #[test]
    fn capacity_must_be_power_of_two() {
        assert!(FlowRing::new(100).is_err());
        assert!(FlowRing::new(0).is_err());
        assert!(FlowRing::new(1).is_err());
        assert_eq!(FlowRing::new(128).map(|r| r.capacity()).ok(), Some(128));
    }

    #[test]
    fn reads_in_order_and_waits_at_the_head() {
        let r = FlowRing::new(4).expect("ring");
        r.push(flow(1));
        r.push(flow(2));
        assert_eq!(len_of(r.read(0)), 1);
        assert_eq!(len_of(r.read(1)), 2);
        assert!(matches!(r.read(2), Read::NotYet));
        assert_eq!(r.bounds(), (0, 2));
    }

    #[test]
    fn a_batch_is_pushed_in_order() {
        let r = FlowRing::new(4).expect("ring");
        let mut rx = r.subscribe();
        r.push_all((0..6).map(flow));
        assert_eq!(r.bounds(), (2, 6));
        assert_eq!(len_of(r.read(2)), 2);
        assert_eq!(len_of(r.read(5)), 5);
        assert!(rx.has_changed().unwrap_or(false));
        assert_eq!(*rx.borrow_and_update(), 6);
    }

    #[test]
    fn overrun_reader_is_told_how_much_it_lost() {
        let r = FlowRing::new(4).expect("ring");
        for i in 0..10 {
            r.push(flow(i));
        }
        assert_eq!(r.bounds(), (6, 10));
        match r.read(1) {
            Read::Lost { lost, resume } => {
                assert_eq!(lost, 5);
                assert_eq!(resume, 6);
            }
            other => panic!("expected Lost, got {other:?}"),
        }
        assert_eq!(len_of(r.read(6)), 6);
        assert_eq!(len_of(r.read(9)), 9);
    }
}
