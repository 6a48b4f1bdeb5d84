//! Label selectors in kubectl's string form: `app=web,tier in (front,edge),!legacy`.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("label selector {selector:?}: {reason}")]
pub struct SelectorError {
    pub selector: String,
    pub reason: String,
}

/// One requirement of a selector (all must hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSelector {
    reqs: Vec<Req>,
}

/// Splits at commas outside parentheses.
fn split_top(s: &str) -> Option<Vec<&str>> {
    let (mut depth, mut start, mut out) = (0i32, 0usize, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return None;
                }
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return None;
    }
    out.push(&s[start..]);
    Some(out)
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn set_values(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    let v: Vec<String> = inner.split(',').map(|x| x.trim().to_string()).collect();
    (!v.iter().any(|x| x.is_empty())).then_some(v)
}

impl LabelSelector {
    /// The requirements, for translating the selector elsewhere (SQL).
    pub fn requirements(&self) -> &[Req] {
        &self.reqs
    }

    pub fn parse(s: &str) -> Result<LabelSelector, SelectorError> {
        let err = |reason: &str| SelectorError {
            selector: s.to_string(),
            reason: reason.to_string(),
        };
        let parts = split_top(s).ok_or_else(|| err("unbalanced parentheses"))?;
        let mut reqs = Vec::new();
        for p in parts {
            let p = p.trim();
            if p.is_empty() {
                return Err(err("empty requirement"));
            }
            let req = if let Some(k) = p.strip_prefix('!') {
                Req::NotExists(k.trim().to_string())
            } else if let Some((k, v)) = p.split_once("!=") {
                Req::NotEq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                Req::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, rest)) = p.split_once(" notin ") {
                Req::NotIn(k.trim().to_string(), set_values(rest).ok_or_else(|| err("expected notin (a,b)"))?)
            } else if let Some((k, rest)) = p.split_once(" in ") {
                Req::In(k.trim().to_string(), set_values(rest).ok_or_else(|| err("expected in (a,b)"))?)
            } else {
                Req::Exists(p.to_string())
            };
            let key = match &req {
                Req::Eq(k, _) | Req::NotEq(k, _) | Req::In(k, _) | Req::NotIn(k, _) | Req::Exists(k) | Req::NotExists(k) => k,
            };
            if !valid_key(key) {
                return Err(err(&format!("invalid key {key:?}")));
            }
            reqs.push(req);
        }
        Ok(LabelSelector { reqs })
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.reqs.iter().all(|r| match r {
            Req::Eq(k, v) => labels.get(k) == Some(v),
            Req::NotEq(k, v) => labels.get(k) != Some(v),
            Req::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Req::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Req::Exists(k) => labels.contains_key(k),
            Req::NotExists(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(p: &[(&str, &str)]) -> BTreeMap<String, String> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn syntax() {
        let s = LabelSelector::parse("app=web, tier in (front, edge),!legacy,team,env!=prod").expect("parse");
        assert!(s.matches(&l(&[("app", "web"), ("tier", "edge"), ("team", "a")])));
        assert!(!s.matches(&l(&[("app", "web"), ("tier", "edge"), ("team", "a"), ("legacy", "")])));
        assert!(!s.matches(&l(&[("app", "web"), ("tier", "edge"), ("team", "a"), ("env", "prod")])));
        assert!(!s.matches(&l(&[("app", "web"), ("tier", "back"), ("team", "a")])));
        let n = LabelSelector::parse("k8s-app notin (kube-dns)").expect("notin");
        assert!(n.matches(&l(&[])));
        assert!(!n.matches(&l(&[("k8s-app", "kube-dns")])));
        assert!(LabelSelector::parse("app==web").expect("==").matches(&l(&[("app", "web")])));
        for bad in ["", "a in (", "a in ()", "a,,b", "bad key=1", "a in (x))"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
    }
}
