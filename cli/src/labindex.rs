//! Names for addresses, from the lab's record of its pods and services.
//!
//! The offline counterpart of the relay's Kubernetes watchers: the probe reports
//! addresses only, and this index tells which pod, service or outside host they are.

use std::{collections::HashMap, net::IpAddr, path::Path};

use anyhow::Context;
use flows_lab::state::State;
use flows_proto::{Endpoint, Flow, Service, Workload};

pub struct LabIndex {
    pods: HashMap<IpAddr, Endpoint>,
    services: HashMap<IpAddr, Service>,
    world: Vec<IpAddr>,
}

impl LabIndex {
    pub fn load(dir: &Path) -> anyhow::Result<LabIndex> {
        let state = State::load(dir)
            .with_context(|| format!("reading the lab state in {}", dir.display()))?;
        Ok(LabIndex::from_state(&state))
    }

    pub fn from_state(state: &State) -> LabIndex {
        let mut pods = HashMap::new();
        for p in &state.pods {
            let mut workloads = Vec::new();
            if let Some(o) = &p.owner {
                workloads.push(Workload {
                    name: o.name.clone(),
                    kind: o.kind.clone(),
                });
            }
            if let Some(w) = &p.workload {
                if p.owner.as_ref() != Some(w) {
                    workloads.push(Workload {
                        name: w.name.clone(),
                        kind: w.kind.clone(),
                    });
                }
            }
            let ep = Endpoint {
                identity: 0,
                namespace: p.namespace.clone(),
                pod_name: p.name.clone(),
                labels: p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                workloads,
                node_name: p.node.clone(),
                is_world: false,
            };
            pods.insert(IpAddr::V4(p.ipv4), ep.clone());
            pods.insert(IpAddr::V6(p.ipv6), ep);
        }
        let mut services = HashMap::new();
        for s in &state.services {
            let svc = Service {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
            };
            services.insert(IpAddr::V4(s.cluster_ipv4), svc.clone());
            services.insert(IpAddr::V6(s.cluster_ipv6), svc);
        }
        LabIndex {
            pods,
            services,
            world: vec![IpAddr::V4(state.world.ipv4), IpAddr::V6(state.world.ipv6)],
        }
    }

    fn endpoint(&self, ip: IpAddr) -> Option<Endpoint> {
        if let Some(e) = self.pods.get(&ip) {
            return Some(e.clone());
        }
        if self.services.contains_key(&ip) {
            return None;
        }
        // Anything that is neither a pod nor a service is outside the cluster.
        let _ = &self.world;
        Some(Endpoint {
            is_world: true,
            ..Default::default()
        })
    }

    /// Fills in endpoints and services the flow does not already carry.
    pub fn annotate(&self, f: &mut Flow) {
        let Some(ip) = f.ip.clone() else { return };
        let (Ok(src), Ok(dst)) = (ip.source.parse::<IpAddr>(), ip.destination.parse::<IpAddr>())
        else {
            return;
        };
        if f.source.is_none() {
            f.source = self.endpoint(src);
        }
        if f.destination.is_none() {
            f.destination = self.endpoint(dst);
        }
        if f.source_service.is_none() {
            f.source_service = self.services.get(&src).cloned();
        }
        if f.destination_service.is_none() {
            f.destination_service = self.services.get(&dst).cloned();
        }
    }
}
