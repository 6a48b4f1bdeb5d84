//! The smallest stable label set that selects exactly a workload's pods.
//!
//! Candidates are the stable labels every pod of the workload carries. Sets are tried by
//! size (1, 2, ...); among sets of one size, the one whose keys rank first wins: the
//! well-known application keys in [`PREFERRED_KEYS`] order, then the others by name.
//! The first set that no other pod of the namespace carries is the choice. When none
//! exists (another pod carries all of them), every common label is used and the other
//! pods it selects are named, so the caller can warn.

use crate::selector::Labels;

use super::stable_labels;

/// Keys that name an application, most specific first.
pub const PREFERRED_KEYS: &[&str] = &[
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app",
    "k8s-app",
    "name",
    "run",
    "component",
    "tier",
];

/// Past this many candidate labels, sets are grown greedily instead of tried by size.
const EXHAUSTIVE_LIMIT: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// matchLabels; empty only when the workload's pods share no stable label.
    pub labels: Labels,
    /// Other pods (namespace-local names) these labels select too.
    pub also_selects: Vec<String>,
}

impl Choice {
    pub fn exact(&self) -> bool {
        self.also_selects.is_empty()
    }
}

fn rank(key: &str) -> (usize, &str) {
    (
        PREFERRED_KEYS.iter().position(|k| *k == key).unwrap_or(PREFERRED_KEYS.len()),
        key,
    )
}

fn carries(pod: &Labels, set: &[&(String, String)]) -> bool {
    set.iter().all(|(k, v)| pod.get(k) == Some(v))
}

/// Chooses labels for `members` (a workload's pods' labels) against `others` (name and
/// labels of every other pod in the namespace).
pub fn choose(members: &[&Labels], others: &[(&str, &Labels)]) -> Choice {
    let mut common: Vec<(String, String)> = match members.first() {
        Some(first) => stable_labels(first)
            .into_iter()
            .filter(|(k, v)| members.iter().all(|m| m.get(k) == Some(v)))
            .collect(),
        None => Vec::new(),
    };
    common.sort_by(|a, b| rank(&a.0).cmp(&rank(&b.0)));
    let excludes_all = |set: &[&(String, String)]| others.iter().all(|(_, l)| !carries(l, set));

    let chosen: Option<Vec<&(String, String)>> = if common.len() <= EXHAUSTIVE_LIMIT {
        (1..=common.len()).find_map(|size| {
            combinations(common.len(), size)
                .map(|idx| idx.iter().map(|&i| &common[i]).collect::<Vec<_>>())
                .find(|set| excludes_all(set))
        })
    } else {
        // Greedy: add the label that leaves the fewest others selected.
        let mut set: Vec<&(String, String)> = Vec::new();
        let mut remaining: Vec<&Labels> = others.iter().map(|(_, l)| *l).collect();
        while !remaining.is_empty() && set.len() < common.len() {
            let best = common
                .iter()
                .filter(|c| !set.contains(c))
                .min_by_key(|c| remaining.iter().filter(|l| l.get(&c.0) == Some(&c.1)).count());
            let Some(best) = best else { break };
            set.push(best);
            remaining.retain(|l| l.get(&best.0) == Some(&best.1));
        }
        remaining.is_empty().then_some(set)
    };
    let set: Vec<&(String, String)> = chosen.unwrap_or_else(|| common.iter().collect());
    let mut also: Vec<String> = others
        .iter()
        .filter(|(_, l)| carries(l, &set))
        .map(|(n, _)| n.to_string())
        .collect();
    also.sort();
    Choice {
        labels: set.into_iter().cloned().collect(),
        also_selects: also,
    }
}

/// Index sets of `size` out of `n`, in lexicographic order.
fn combinations(n: usize, size: usize) -> impl Iterator<Item = Vec<usize>> {
    let mut next: Option<Vec<usize>> = (size <= n).then(|| (0..size).collect());
    std::iter::from_fn(move || {
        let cur = next.take()?;
        // Advance: the rightmost index that can move, then the ones after it.
        let mut n2 = cur.clone();
        let mut i = size;
        while i > 0 {
            i -= 1;
            if n2[i] < n - size + i {
                n2[i] += 1;
                for j in i + 1..size {
                    n2[j] = n2[j - 1] + 1;
                }
                next = Some(n2);
                break;
            }
        }
        Some(cur)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(kv: &[(&str, &str)]) -> Labels {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn combinations_in_order() {
        let all: Vec<Vec<usize>> = combinations(4, 2).collect();
        assert_eq!(all, [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]);
        assert_eq!(combinations(3, 3).count(), 1);
        assert_eq!(combinations(2, 3).count(), 0);
    }

    #[test]
    fn one_label_when_it_is_enough_preferring_app_keys() {
        let a = l(&[("tier", "api"), ("app", "api"), ("pod-template-hash", "1"), ("team", "x")]);
        let b = l(&[("tier", "api"), ("app", "api"), ("pod-template-hash", "2"), ("team", "x")]);
        let other = l(&[("tier", "web"), ("app", "web"), ("team", "x")]);
        let c = choose(&[&a, &b], &[("web-1", &other)]);
        assert_eq!(c.labels, l(&[("app", "api")]));
        assert!(c.exact());
    }

    #[test]
    fn two_labels_when_one_is_shared() {
        let a = l(&[("app", "shop"), ("component", "db")]);
        let x = l(&[("app", "shop"), ("component", "web")]);
        let y = l(&[("app", "blog"), ("component", "db")]);
        let c = choose(&[&a], &[("x", &x), ("y", &y)]);
        assert_eq!(c.labels, a);
        assert!(c.exact());
    }

    #[test]
    fn no_exact_set_names_what_else_is_selected() {
        let a = l(&[("app", "shop")]);
        let twin = l(&[("app", "shop"), ("debug", "true")]);
        let c = choose(&[&a], &[("twin", &twin)]);
        assert_eq!(c.labels, a);
        assert_eq!(c.also_selects, ["twin"]);
        // Pods without stable labels: the empty selector, everything else named.
        let bare = l(&[("pod-template-hash", "1")]);
        let c = choose(&[&bare], &[("twin", &twin)]);
        assert!(c.labels.is_empty());
        assert_eq!(c.also_selects, ["twin"]);
    }

    #[test]
    fn many_labels_are_chosen_greedily() {
        let mut a = Labels::new();
        for i in 0..20 {
            a.insert(format!("k{i:02}"), "v".into());
        }
        let mut o = a.clone();
        o.insert("k07".into(), "other".into());
        let c = choose(&[&a], &[("o", &o)]);
        assert_eq!(c.labels, l(&[("k07", "v")]));
    }
}
