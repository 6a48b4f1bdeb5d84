//! What the dashboard knows, independent of drawing: the recent flows (a bounded ring),
//! aggregates over everything that arrived (counters, top denied pairs, the
//! namespace-to-namespace matrix, top talkers, the rate), the connection, the filter and
//! what the user is looking at. Flows arriving faster than frames are folded into the
//! aggregates; nothing grows without bound.

pub mod aggregate;
pub mod keys;
pub mod suggest;

use std::collections::VecDeque;

use flows_flow::FilterSet;
use flows_proto::{Flow, FlowFilter, GetFlowsResponse, NodeState, Verdict, get_flows_response::ResponseTypes};

pub use aggregate::{Aggregates, Pair, Rate};
pub use keys::{Key, on_key};

/// Flows kept for the table and the detail view.
pub const RECENT: usize = 2_000;

/// The connection to the server, as the header shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    Connecting,
    Connected,
    /// Lost (or refused); retried with backoff.
    Disconnected { error: String, retry_in_ms: u64 },
    /// A file replay that reached its end.
    Ended,
}

/// Parses a filter prompt (the flags of `flows observe`) into allow and deny lists.
pub type FilterParser = Box<dyn Fn(&str) -> Result<(Vec<FlowFilter>, Vec<FlowFilter>), String> + Send + Sync>;

pub struct Filter {
    pub text: String,
    pub set: FilterSet,
}

/// The filter prompt being edited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prompt {
    pub text: String,
    /// The last error for this text, shown in place.
    pub error: Option<String>,
}

pub struct App {
    pub server: String,
    pub connection: Connection,
    /// Nodes as the server's status and its in-band node events report them.
    pub nodes_connected: Vec<String>,
    pub nodes_unavailable: Vec<String>,
    /// Connected nodes counted by the server's status (it names only the unavailable).
    pub status_connected: Option<u32>,
    /// The flows that matched the filter, newest last (the table).
    pub recent: VecDeque<Flow>,
    /// Every recent flow, whatever the filter: a new filter starts from these.
    raw: VecDeque<Flow>,
    pub aggregates: Aggregates,
    pub lost: u64,
    pub filter: Filter,
    pub prompt: Option<Prompt>,
    /// The table is frozen (aggregates keep counting).
    pub paused: bool,
    /// Rows scrolled up from the newest; the selected row is the top of the view.
    pub selected: usize,
    pub detail: bool,
    /// Where the detail view's suggestion was written, or why it was not.
    pub written: Option<String>,
    pub quit: bool,
}

impl App {
    pub fn new(server: impl Into<String>) -> App {
        App {
            server: server.into(),
            connection: Connection::Connecting,
            nodes_connected: Vec::new(),
            nodes_unavailable: Vec::new(),
            status_connected: None,
            recent: VecDeque::with_capacity(RECENT),
            raw: VecDeque::with_capacity(RECENT),
            aggregates: Aggregates::default(),
            lost: 0,
            filter: Filter {
                text: String::new(),
                set: FilterSet::default(),
            },
            prompt: None,
            paused: false,
            selected: 0,
            detail: false,
            written: None,
            quit: false,
        }
    }

    /// Sets the filter from prompt text; on error the previous filter stays.
    pub fn set_filter(&mut self, text: &str, parse: &FilterParser) -> Result<(), String> {
        let (allow, deny) = parse(text)?;
        let set = FilterSet::new(&allow, &deny).map_err(|e| e.to_string())?;
        self.filter = Filter {
            text: text.trim().to_string(),
            set,
        };
        // The table and the aggregates start again from the recent flows (what came
        // before them is not known under the new filter).
        self.recent = self.raw.iter().filter(|f| self.filter.set.matches(f)).cloned().collect();
        let mut aggregates = Aggregates::default();
        for f in &self.recent {
            aggregates.add_counts(f);
        }
        self.aggregates = aggregates;
        self.selected = 0;
        self.detail = false;
        Ok(())
    }

    /// Takes one response from the server; `now_ms` for the rate.
    pub fn ingest(&mut self, r: GetFlowsResponse, now_ms: u64) {
        match r.response_types {
            Some(ResponseTypes::Flow(f)) => self.ingest_flow(f, now_ms),
            // Counts come from the server or a replayed file: saturate, never overflow.
            Some(ResponseTypes::LostEvents(l)) => self.lost = self.lost.saturating_add(l.num_events_lost),
            Some(ResponseTypes::NodeStatus(s)) => {
                let up = NodeState::try_from(s.state_change).ok() == Some(NodeState::Connected);
                for n in s.node_names {
                    self.nodes_connected.retain(|x| *x != n);
                    self.nodes_unavailable.retain(|x| *x != n);
                    // A "store" status is about history, not a node.
                    if n == "store" {
                        continue;
                    }
                    if up {
                        self.nodes_connected.push(n);
                    } else {
                        self.nodes_unavailable.push(n);
                    }
                }
                self.nodes_connected.sort();
                self.nodes_unavailable.sort();
            }
            None => {}
        }
    }

    pub fn ingest_flow(&mut self, f: Flow, now_ms: u64) {
        if !self.paused {
            if self.raw.len() == RECENT {
                self.raw.pop_front();
            }
            self.raw.push_back(f.clone());
        }
        if !self.filter.set.matches(&f) {
            return;
        }
        self.aggregates.add(&f, now_ms);
        if self.paused {
            return;
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(f);
        // Keep the selection on the same flow while new ones arrive above it.
        if self.selected > 0 {
            self.selected = (self.selected + 1).min(self.recent.len().saturating_sub(1));
        }
    }

    /// For the selected flow, if policy denied it: the allow policies that would let it
    /// through (YAML), chosen against the pods seen recently.
    pub fn suggestion(&self) -> Option<String> {
        let f = self.selected_flow()?;
        suggest::for_denied(f, self.raw.iter())
    }

    /// The selected flow (index 0 is the newest).
    pub fn selected_flow(&self) -> Option<&Flow> {
        self.recent.iter().rev().nth(self.selected)
    }

    pub fn scroll(&mut self, delta: isize) {
        let max = self.recent.len().saturating_sub(1) as isize;
        self.selected = (self.selected as isize + delta).clamp(0, max.max(0)) as usize;
    }

    /// Takes the server's status: how many nodes are connected, which are not.
    pub fn server_status(&mut self, s: &flows_proto::ServerStatusResponse) {
        if let Some(n) = s.num_connected_nodes {
            self.status_connected = Some(n);
            self.nodes_unavailable = s.unavailable_nodes.clone();
            self.nodes_unavailable.sort();
        }
    }

    /// Connected nodes: the server's count when it gives one, else those named by events.
    pub fn connected_nodes(&self) -> usize {
        self.status_connected.map(|n| n as usize).unwrap_or(self.nodes_connected.len())
    }

    /// Share of attempts dropped, 0..=1, over everything counted.
    pub fn dropped_share(&self) -> f64 {
        let a = &self.aggregates;
        let total = a.total();
        if total == 0 { 0.0 } else { a.count_verdict(Verdict::Dropped) as f64 / total as f64 }
    }
}
