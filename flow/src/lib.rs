//! Flow logic without I/O: [`filter::FilterSet`] (FlowFilter allow and deny lists, as
//! Hubble defines them), [`selector::LabelSelector`] (kubectl's selector syntax) and
//! [`id`] (flow ids: the recording probe and its sequence), [`enrich`] (annotation through getter traits, and what a node can filter before it),
//! [`jsonl`] (flows as JSON lines: the printed form and its reader), [`request`] (what
//! makes a GetFlowsRequest valid, for every server), [`text`] (flow data made safe for a
//! terminal).

pub mod advice;
pub mod enrich;
pub mod filter;
pub mod id;
pub mod jsonl;
pub mod request;
pub mod selector;
pub mod text;

pub use filter::{FilterError, FilterSet};
