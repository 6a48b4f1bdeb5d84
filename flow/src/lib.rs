//! Flow logic without I/O: [`filter::FilterSet`] (FlowFilter allow and deny lists, as
//! Hubble defines them) and [`selector::LabelSelector`] (kubectl's selector syntax).

pub mod filter;
pub mod selector;

pub use filter::{FilterError, FilterSet};
