//! Reading Kubernetes objects from text: multi-document YAML, JSON, and `kind: List`.
//! The caller reads files; this module only parses, so errors name the source it is given.

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use serde::Deserialize;

/// Where an object came from: file (or other source name) and document index (0-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub source: String,
    pub document: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (document {})", self.source, self.document + 1)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoadError {
    #[error("{origin}: not valid YAML or JSON: {message}")]
    Syntax { origin: Origin, message: String },
    #[error("{origin}: {kind} {name}: field {field}: {message}")]
    Field {
        origin: Origin,
        kind: String,
        name: String,
        field: String,
        message: String,
    },
    #[error("{origin}: {message}")]
    Shape { origin: Origin, message: String },
}

#[derive(Debug, Clone)]
pub enum Object {
    NetworkPolicy(Box<NetworkPolicy>),
    Pod(Box<Pod>),
    Namespace(Box<Namespace>),
    /// A kind this crate does not use (Service, Deployment...): kept whole, so that callers
    /// can say so or type it themselves ([`typed`]).
    Other {
        kind: String,
        api_version: String,
        value: Box<serde_yaml::Value>,
    },
}

#[derive(Debug, Clone)]
pub struct Loaded {
    pub origin: Origin,
    pub object: Object,
}

fn str_field<'a>(v: &'a serde_yaml::Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|x| x.as_str())
}

fn name_of(v: &serde_yaml::Value) -> String {
    let meta = v.get("metadata");
    let name = meta.and_then(|m| str_field(m, "name")).unwrap_or("<unnamed>");
    match meta.and_then(|m| str_field(m, "namespace")) {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

/// Types one object, naming the field that does not fit.
pub fn typed<T: for<'de> Deserialize<'de>>(
    v: serde_yaml::Value,
    origin: &Origin,
    kind: &str,
) -> Result<T, LoadError> {
    let name = name_of(&v);
    serde_path_to_error::deserialize(v).map_err(|e| LoadError::Field {
        origin: origin.clone(),
        kind: kind.to_string(),
        name,
        field: e.path().to_string(),
        message: e.into_inner().to_string(),
    })
}

fn object(v: serde_yaml::Value, origin: &Origin, out: &mut Vec<Loaded>) -> Result<(), LoadError> {
    if v.is_null() {
        return Ok(());
    }
    if !v.is_mapping() {
        return Err(LoadError::Shape {
            origin: origin.clone(),
            message: "expected an object (a mapping)".into(),
        });
    }
    let kind = str_field(&v, "kind").unwrap_or("").to_string();
    let api = str_field(&v, "apiVersion").unwrap_or("").to_string();
    let want_api = |expected: &str| {
        if api == expected {
            Ok(())
        } else {
            Err(LoadError::Field {
                origin: origin.clone(),
                kind: kind.clone(),
                name: name_of(&v),
                field: "apiVersion".into(),
                message: format!("expected {expected}, found {api:?}"),
            })
        }
    };
    let object = match kind.as_str() {
        "" => {
            return Err(LoadError::Shape {
                origin: origin.clone(),
                message: "object has no kind".into(),
            });
        }
        "List" => {
            let items = v.get("items").and_then(|i| i.as_sequence()).cloned();
            for item in items.unwrap_or_default() {
                object(item, origin, out)?;
            }
            return Ok(());
        }
        "NetworkPolicy" => {
            want_api("networking.k8s.io/v1")?;
            Object::NetworkPolicy(Box::new(typed(v, origin, &kind)?))
        }
        "Pod" => {
            want_api("v1")?;
            Object::Pod(Box::new(typed(v, origin, &kind)?))
        }
        "Namespace" => {
            want_api("v1")?;
            Object::Namespace(Box::new(typed(v, origin, &kind)?))
        }
        _ => Object::Other {
            kind,
            api_version: api,
            value: Box::new(v),
        },
    };
    out.push(Loaded {
        origin: origin.clone(),
        object,
    });
    Ok(())
}

/// Parses every object in `text` (multi-document YAML or JSON), in order.
pub fn parse(source: &str, text: &str) -> Result<Vec<Loaded>, LoadError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = Origin {
            source: source.to_string(),
            document: i,
        };
        let v = serde_yaml::Value::deserialize(doc).map_err(|e| LoadError::Syntax {
            origin: origin.clone(),
            message: e.to_string(),
        })?;
        object(v, &origin, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_json_and_lists() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: { name: a }
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: { name: p, namespace: a }
spec: { podSelector: {} }
---
apiVersion: v1
kind: List
items:
  - { apiVersion: v1, kind: Pod, metadata: { name: x, namespace: a } }
  - { apiVersion: v1, kind: Service, metadata: { name: s } }
"#;
        let objs = parse("f.yaml", text).expect("parse");
        let kinds: Vec<_> = objs
            .iter()
            .map(|o| match &o.object {
                Object::Namespace(_) => "ns",
                Object::NetworkPolicy(_) => "np",
                Object::Pod(_) => "pod",
                Object::Other { .. } => "other",
            })
            .collect();
        assert_eq!(kinds, vec!["ns", "np", "pod", "other"]);
        let json = r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"j"}}"#;
        assert_eq!(parse("f.json", json).expect("json").len(), 1);
    }

    #[test]
    fn errors_name_file_document_object_and_field() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  ingress:\n    - ports:\n        - port: [1]\n";
        let e = parse("pol.yaml", text).expect_err("bad port type");
        let msg = e.to_string();
        assert!(msg.contains("pol.yaml (document 2)"), "{msg}");
        assert!(msg.contains("NetworkPolicy a/p"), "{msg}");
        assert!(msg.contains("spec.ingress[0].ports[0].port"), "{msg}");

        let e = parse("x.yaml", "kind: NetworkPolicy\napiVersion: v1\nmetadata: {name: p}\n")
            .expect_err("api version");
        assert!(e.to_string().contains("apiVersion"), "{e}");
        assert!(matches!(parse("y.yaml", "a: [1"), Err(LoadError::Syntax { .. })));
        assert!(matches!(parse("z.yaml", "- 1\n- 2\n"), Err(LoadError::Shape { .. })));
    }
}
