//! Aggregates over every flow that matched the filter: bounded maps (the smallest
//! entries are forgotten past a bound, so hours of traffic keep a steady footprint) and a
//! sliding rate.

use std::collections::{BTreeMap, HashMap};

use flows_proto::{Endpoint, Flow, Verdict, layer4::Protocol};

/// Entries each map keeps before it forgets the smaller half.
pub const MAX_KEYS: usize = 10_000;

/// Source workload → destination workload and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pair {
    pub src: String,
    pub dst: String,
    /// "80/TCP", or "ICMPv4".
    pub port: String,
}

/// Flows per second over the last few seconds (whole seconds, the current one excluded).
#[derive(Debug, Clone, Default)]
pub struct Rate {
    /// (second, count), oldest first.
    buckets: Vec<(u64, u64)>,
}

const RATE_WINDOW_S: u64 = 5;

impl Rate {
    pub fn add(&mut self, now_ms: u64, n: u64) {
        let s = now_ms / 1000;
        match self.buckets.last_mut() {
            Some((sec, c)) if *sec == s => *c += n,
            _ => self.buckets.push((s, n)),
        }
        self.buckets.retain(|(sec, _)| sec + RATE_WINDOW_S + 1 >= s);
    }

    pub fn per_second(&self, now_ms: u64) -> f64 {
        let s = now_ms / 1000;
        let sum: u64 = self
            .buckets
            .iter()
            .filter(|(sec, _)| *sec < s && sec + RATE_WINDOW_S >= s)
            .map(|(_, c)| c)
            .sum();
        sum as f64 / RATE_WINDOW_S as f64
    }
}

#[derive(Debug, Clone, Default)]
pub struct Aggregates {
    pub by_verdict: BTreeMap<&'static str, u64>,
    pub by_reason: BTreeMap<String, u64>,
    denied: HashMap<Pair, u64>,
    /// (source namespace, destination namespace) → (allowed, denied) attempts.
    matrix: HashMap<(String, String), (u64, u64)>,
    talkers: HashMap<String, u64>,
    pub rate: Rate,
}

pub fn verdict_name(v: i32) -> &'static str {
    match Verdict::try_from(v) {
        Ok(Verdict::Forwarded) => "FORWARDED",
        Ok(Verdict::Dropped) => "DROPPED",
        Ok(Verdict::Audit) => "AUDIT",
        Ok(Verdict::Error) => "ERROR",
        _ => "UNKNOWN",
    }
}

/// How one end is named: namespace/workload (top owner, else pod), world:address, or the
/// address.
pub fn side_name(e: Option<&Endpoint>, ip: &str) -> String {
    match e {
        Some(e) if e.is_world => format!("world:{ip}"),
        Some(e) if !e.pod_name.is_empty() => {
            let w = e.workloads.last().map(|w| w.name.as_str()).unwrap_or(&e.pod_name);
            format!("{}/{w}", e.namespace)
        }
        Some(e) if e.labels.iter().any(|l| l == "reserved:host") => format!("host:{ip}"),
        _ => ip.to_string(),
    }
}

/// "80/TCP", "ICMPv4".
pub fn port_name(f: &Flow) -> String {
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => format!("{}/TCP", t.destination_port),
        Some(Protocol::Udp(u)) => format!("{}/UDP", u.destination_port),
        Some(Protocol::Sctp(s)) => format!("{}/SCTP", s.destination_port),
        Some(Protocol::Icmpv4(_)) => "ICMPv4".into(),
        Some(Protocol::Icmpv6(_)) => "ICMPv6".into(),
        None => match &f.l4_unknown {
            Some(u) => format!("{}/?", flows_proto::ip_protocol_name(u.protocol)),
            None => "-".into(),
        },
    }
}

fn bump<K: std::hash::Hash + Eq + Clone>(m: &mut HashMap<K, u64>, k: K, n: u64) {
    *m.entry(k).or_default() += n;
    if m.len() > MAX_KEYS {
        forget_smaller_half(m, |v| *v);
    }
}

fn forget_smaller_half<K: std::hash::Hash + Eq + Clone, V: Copy>(m: &mut HashMap<K, V>, weight: impl Fn(&V) -> u64) {
    let mut w: Vec<u64> = m.values().map(&weight).collect();
    w.sort_unstable();
    let cut = w[w.len() / 2];
    m.retain(|_, v| weight(v) > cut);
}

fn top<K: Clone + Ord, V: Copy>(m: &HashMap<K, V>, n: usize, weight: impl Fn(&V) -> u64) -> Vec<(K, V)> {
    let mut v: Vec<(K, V)> = m.iter().map(|(k, v)| (k.clone(), *v)).collect();
    v.sort_by(|a, b| weight(&b.1).cmp(&weight(&a.1)).then_with(|| a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

impl Aggregates {
    pub fn add(&mut self, f: &Flow, now_ms: u64) {
        self.rate.add(now_ms, 1);
        self.add_counts(f);
    }

    /// Everything but the rate (flows re-read from the ring did not just arrive).
    pub fn add_counts(&mut self, f: &Flow) {
        let verdict = verdict_name(f.verdict);
        *self.by_verdict.entry(verdict).or_default() += 1;
        if !f.drop_reason.is_empty() && self.by_reason.len() < 256 {
            *self.by_reason.entry(f.drop_reason.clone()).or_default() += 1;
        }
        if f.is_reply {
            return;
        }
        let ip = f.ip.clone().unwrap_or_default();
        let src = side_name(f.source.as_ref(), &ip.source);
        let dst = side_name(f.destination.as_ref(), &ip.destination);
        let denied = f.verdict == Verdict::Dropped as i32 || f.verdict == Verdict::Audit as i32;
        if denied {
            bump(&mut self.denied, Pair { src: src.clone(), dst, port: port_name(f) }, 1);
        }
        let ns = |e: Option<&Endpoint>| {
            e.filter(|e| !e.namespace.is_empty())
                .map(|e| e.namespace.clone())
                .unwrap_or_else(|| if e.is_some_and(|e| e.is_world) { "world".into() } else { "-".into() })
        };
        let key = (ns(f.source.as_ref()), ns(f.destination.as_ref()));
        let e = self.matrix.entry(key).or_default();
        if denied {
            e.1 += 1;
        } else {
            e.0 += 1;
        }
        if self.matrix.len() > MAX_KEYS {
            forget_smaller_half(&mut self.matrix, |(a, d)| a + d);
        }
        bump(&mut self.talkers, src, 1);
    }

    pub fn total(&self) -> u64 {
        self.by_verdict.values().sum()
    }

    pub fn count_verdict(&self, v: Verdict) -> u64 {
        self.by_verdict.get(verdict_name(v as i32)).copied().unwrap_or(0)
    }

    pub fn top_denied(&self, n: usize) -> Vec<(Pair, u64)> {
        top(&self.denied, n, |v| *v)
    }

    pub fn top_talkers(&self, n: usize) -> Vec<(String, u64)> {
        top(&self.talkers, n, |v| *v)
    }

    /// Namespaces by attempts (largest first, at most `n`), and the cells among them.
    pub fn matrix(&self, n: usize) -> (Vec<String>, HashMap<(String, String), (u64, u64)>) {
        let mut per_ns: HashMap<String, u64> = HashMap::new();
        for ((s, d), (a, x)) in &self.matrix {
            *per_ns.entry(s.clone()).or_default() += a + x;
            *per_ns.entry(d.clone()).or_default() += a + x;
        }
        let names: Vec<String> = top(&per_ns, n, |v| *v).into_iter().map(|(k, _)| k).collect();
        let cells = self
            .matrix
            .iter()
            .filter(|((s, d), _)| names.contains(s) && names.contains(d))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        (names, cells)
    }

    /// Entries held in the bounded maps (for the memory bound's tests and benches).
    pub fn len(&self) -> usize {
        self.denied.len() + self.matrix.len() + self.talkers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
