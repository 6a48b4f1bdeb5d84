//! Time-ordered merging of several streams with a bounded sort window. Pure: the caller
//! feeds items and the clock.
//!
//! Items are held until they are older than the window (so that a slightly later item
//! from another node can still go before them), or until the buffer is full, in which
//! case the oldest goes out at once. An item older than what was already sent cannot be
//! put in order any more: it is sent immediately and counted as late.

use std::{cmp::Reverse, collections::BinaryHeap};

/// Nanoseconds since the epoch.
pub type Nanos = i128;

struct Held<T> {
    at: Nanos,
    seq: u64,
    /// Boxed: the heap moves its entries on every push and pop, and a flow is large
    /// (those moves were the relay's largest memory copy).
    item: Box<T>,
}

impl<T> PartialEq for Held<T> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl<T> Eq for Held<T> {}
impl<T> PartialOrd for Held<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Held<T> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

pub struct SortWindow<T> {
    heap: BinaryHeap<Reverse<Held<T>>>,
    window: Nanos,
    capacity: usize,
    seq: u64,
    last_sent: Option<Nanos>,
    /// Items that arrived after a newer one had been sent.
    pub late: u64,
}

impl<T> SortWindow<T> {
    pub fn new(window: std::time::Duration, capacity: usize) -> SortWindow<T> {
        SortWindow {
            heap: BinaryHeap::new(),
            window: window.as_nanos() as Nanos,
            capacity: capacity.max(1),
            seq: 0,
            last_sent: None,
            late: 0,
        }
    }

    /// Adds an item; returns what must go out now (late items, or the oldest when full).
    pub fn push(&mut self, at: Nanos, item: T) -> Vec<T> {
        if self.last_sent.is_some_and(|l| at < l) {
            self.late += 1;
            return vec![item];
        }
        self.seq += 1;
        self.heap.push(Reverse(Held {
            at,
            seq: self.seq,
            item: Box::new(item),
        }));
        let mut out = Vec::new();
        while self.heap.len() > self.capacity {
            if let Some(Reverse(h)) = self.heap.pop() {
                self.last_sent = Some(h.at);
                out.push(*h.item);
            }
        }
        out
    }

    /// Items older than `now - window`, oldest first.
    pub fn ready(&mut self, now: Nanos) -> Vec<T> {
        let mut out = Vec::new();
        while self.heap.peek().is_some_and(|Reverse(h)| h.at <= now - self.window) {
            if let Some(Reverse(h)) = self.heap.pop() {
                self.last_sent = Some(h.at);
                out.push(*h.item);
            }
        }
        out
    }

    /// Everything, oldest first (end of stream).
    pub fn drain(&mut self) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(Reverse(h)) = self.heap.pop() {
            self.last_sent = Some(h.at);
            out.push(*h.item);
        }
        out
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn orders_within_the_window() {
        let mut w = SortWindow::new(Duration::from_nanos(100), 10);
        assert!(w.push(50, "b").is_empty());
        assert!(w.push(10, "a").is_empty());
        assert!(w.push(120, "c").is_empty());
        assert_eq!(w.ready(160), vec!["a", "b"]);
        // Arrives after "b" went out: sent at once, counted.
        assert_eq!(w.push(40, "late"), vec!["late"]);
        assert_eq!(w.late, 1);
        assert_eq!(w.drain(), vec!["c"]);
    }

    #[test]
    fn full_buffer_releases_the_oldest() {
        let mut w = SortWindow::new(Duration::from_secs(10), 2);
        assert!(w.push(3, 3).is_empty());
        assert!(w.push(1, 1).is_empty());
        assert_eq!(w.push(2, 2), vec![1]);
        assert_eq!(w.len(), 2);
    }
}
