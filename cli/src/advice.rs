//! `flows policy suggest` and `flows policy check`: policy advice from flow history.
//!
//! History comes from the relay's History API (the lab's relay by default) or straight
//! from a store; the cluster (pods, namespaces, current policies) from manifests (the
//! lab's by default). Suggestion and replay are the policy crate's; this is I/O.

use std::{
    collections::BTreeMap,
    io::Write,
    net::IpAddr,
    path::PathBuf,
};

use anyhow::{Context, bail};
use flows_policy::{
    Cluster, CompiledPolicy, Engine, Protocol,
    advice::{
        self, ChangeGroup, Inventory, InventoryPod, Observation, Outcome, Owner, Party, PodParty, Replay,
        SuggestOptions,
    },
};
use flows_flow::advice::{address_kind, labels};
use flows_proto::{AttemptGroup, AttemptsRequest, Verdict, history_client::HistoryClient};

use crate::time::parse_time;

#[derive(clap::Args, Debug, Clone)]
pub struct HistoryArgs {
    /// Relay to read history from (host:port). Default: the running lab's relay.
    #[arg(long, env = "FLOWS_SERVER")]
    pub server: Option<String>,
    /// Read a store directly instead: `embedded:DIR` (not while a relay has it open) or
    /// `http(s)://host:port` of a ClickHouse server.
    #[arg(long, value_name = "embedded:DIR|URL")]
    pub store: Option<String>,
    #[arg(long, default_value = "flows")]
    pub store_database: String,
    #[arg(long, env = "FLOWS_STORE_USER")]
    pub store_user: Option<String>,
    #[arg(long, env = "FLOWS_STORE_PASSWORD", hide_env_values = true)]
    pub store_password: Option<String>,
    /// libchdb.so for an embedded store (default: the one the set-up installed).
    #[arg(long, env = "FLOWS_CHDB_LIB")]
    pub chdb_lib: Option<PathBuf>,
    /// Start of the window: a duration before now (30m, 24h) or RFC 3339.
    #[arg(long, default_value = "24h")]
    pub since: String,
    /// End of the window (default: now).
    #[arg(long)]
    pub until: Option<String>,
    /// The cluster: Pod, Namespace, ReplicaSet and NetworkPolicy manifests (files or
    /// directories). Default: the running lab's (from its API server when it runs one).
    #[arg(long, num_args = 1.., conflicts_with = "kubernetes")]
    pub manifests: Vec<PathBuf>,
    /// Take the cluster from a Kubernetes API server (read once, in pages): the
    /// credentials of --kubeconfig, else $KUBECONFIG, else the lab's, else
    /// ~/.kube/config. What is suggested then uses only fields that server knows.
    #[arg(long)]
    pub kubernetes: bool,
    #[arg(long, env = "KUBECONFIG", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// The lab's state directory (its relay and manifests).
    #[arg(long, env = "FLOWS_LAB_DIR")]
    pub lab_state: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SuggestFormat {
    Yaml,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct SuggestArgs {
    #[command(flatten)]
    pub history: HistoryArgs,
    /// Namespaces to write policies for (repeatable). Default: every namespace with a
    /// pod in the window, except kube-*.
    #[arg(short = 'n', long = "namespace")]
    pub namespaces: Vec<String>,
    /// Only this workload (`name` or `kind/name`); its policy then isolates it on its
    /// own, without a namespace default deny.
    #[arg(long)]
    pub workload: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value_t = SuggestFormat::Yaml)]
    pub output: SuggestFormat,
    /// Say, per rule, which observed flows it exists for (YAML comments; with -o json,
    /// an object with the policies, the explanations and the proof).
    #[arg(long)]
    pub explain: bool,
    /// Merge addresses outside the cluster into prefixes of this length (default 32: one
    /// address per ipBlock).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(0..=32))]
    pub world_prefix_v4: u8,
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u8).range(0..=128))]
    pub world_prefix_v6: u8,
    /// Also allow what was only forwarded because its namespace audits policy.
    #[arg(long)]
    pub include_audit: bool,
    /// Also allow attempts their destination refused (nothing listened: the kernel had
    /// no socket for them, or reset the SYN). Left out by default: a refusal is no
    /// reason to open a port; `--explain` lists them.
    #[arg(long)]
    pub include_refused: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckFormat {
    Table,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Proposed NetworkPolicies: files or directories.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// The proposed policies replace every current one (default: added, replacing
    /// only those of the same namespace and name, as `kubectl apply`).
    #[arg(long)]
    pub replace: bool,
    #[command(flatten)]
    pub history: HistoryArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = CheckFormat::Table)]
    pub output: CheckFormat,
}

/// The cluster the history is replayed in.
struct ClusterContext {
    cluster: Cluster,
    policies: Vec<CompiledPolicy>,
    inventory: Inventory,
    /// The API server's version, when the cluster came from one.
    version: Option<flows_k8s::snapshot::Version>,
}

fn lab_dir(h: &HistoryArgs) -> PathBuf {
    h.lab_state.clone().unwrap_or_else(flows_lab::state::default_dir)
}

/// Where the cluster comes from: an API server's kubeconfig, or manifest paths.
enum ClusterSource {
    Api(PathBuf),
    Files(Vec<PathBuf>),
}

fn cluster_source(h: &HistoryArgs) -> anyhow::Result<ClusterSource> {
    let lab_api = flows_lab::State::load(&lab_dir(h)).ok().and_then(|s| s.api).map(|a| a.kubeconfig);
    if h.kubernetes {
        let home = std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".kube/config"));
        let config = h.kubeconfig.clone().or(lab_api).or(home).context("--kubernetes: no kubeconfig (--kubeconfig, $KUBECONFIG)")?;
        return Ok(ClusterSource::Api(config));
    }
    if !h.manifests.is_empty() {
        return Ok(ClusterSource::Files(h.manifests.clone()));
    }
    if let Some(config) = lab_api {
        return Ok(ClusterSource::Api(config));
    }
    let dir = flows_lab::manifests::dir(&lab_dir(h));
    if !dir.is_dir() {
        bail!("no cluster: give --manifests (pods, namespaces, policies) or --kubernetes, or start the lab");
    }
    // The lab's policies are in a subdirectory, which the listing includes.
    Ok(ClusterSource::Files(vec![dir]))
}

fn inventory_of(idx: &flows_k8s::ClusterIndex, inventory: &mut Inventory) {
    for e in idx.pod_endpoints() {
        inventory.add(InventoryPod {
            namespace: e.namespace.clone(),
            name: e.pod_name.clone(),
            labels: labels(&e.labels),
            owner: e.workloads.last().map(|w| Owner { kind: w.kind.clone(), name: w.name.clone() }),
        });
    }
}

async fn load_cluster(h: &HistoryArgs) -> anyhow::Result<ClusterContext> {
    let mut inventory = Inventory::new();
    let (m, version) = match cluster_source(h)? {
        ClusterSource::Api(config) => {
            let snap = flows_k8s::snapshot::read(&config).await.with_context(|| format!("reading the cluster with {}", config.display()))?;
            let source = format!("the API server ({})", snap.server);
            inventory_of(&flows_k8s::manifests::index_of_text(&source, &snap.yaml, Vec::new())?, &mut inventory);
            (flows_policy::Manifests::parse([(source.as_str(), snap.yaml.as_str())])?, Some(snap.version))
        }
        ClusterSource::Files(paths) => {
            let files = crate::manifests::manifest_files(&paths)?;
            let m = if files.is_empty() { flows_policy::Manifests::default() } else { crate::manifests::read_manifests(&paths)? };
            for p in &paths {
                let idx = flows_k8s::manifests::read(p, Vec::new()).with_context(|| format!("reading {}", p.display()))?;
                inventory_of(&idx, &mut inventory);
            }
            (m, None)
        }
    };
    Ok(ClusterContext { cluster: m.cluster, policies: m.policies, inventory, version })
}

fn party(p: Option<&flows_proto::AttemptParty>) -> Option<Party> {
    let p = p?;
    let ip: Option<IpAddr> = p.ip.parse().ok();
    if !p.pod_name.is_empty() {
        return Some(Party::Pod(PodParty {
            namespace: p.namespace.clone(),
            name: p.pod_name.clone(),
            labels: labels(&p.labels),
            owner: (!matches!(p.workload_kind.as_str(), "" | "Pod" | "world"))
                .then(|| Owner { kind: p.workload_kind.clone(), name: p.workload.clone() }),
            ip,
        }));
    }
    Some(Party::Address { ip: ip?, kind: address_kind(p.is_world, &p.labels) })
}

fn ns_of(t: &Option<flows_proto::Timestamp>) -> i64 {
    t.as_ref().map(flows_proto::timestamp_nanos).unwrap_or(0)
}

/// An observation from the History API's form; None for a group policy cannot judge
/// (no address, a protocol policy does not know).
pub fn observation(g: &AttemptGroup) -> Option<Observation> {
    Some(Observation {
        src: party(g.source.as_ref())?,
        dst: party(g.destination.as_ref())?,
        protocol: Protocol::from_flow(&g.protocol)?,
        port: u16::try_from(g.destination_port).ok()?,
        outcome: match Verdict::try_from(g.verdict).ok()? {
            Verdict::Dropped => Outcome::Denied,
            // Policy let it through (or only audited it), but nothing listened.
            Verdict::Forwarded | Verdict::Audit if g.refused => Outcome::Refused,
            Verdict::Forwarded => Outcome::Allowed,
            Verdict::Audit => Outcome::Audit,
            _ => return None,
        },
        flows: g.flows,
        first: ns_of(&g.first_seen),
        last: ns_of(&g.last_seen),
    })
}

struct History {
    observations: Vec<Observation>,
    /// Groups and flows policy cannot judge.
    skipped: (usize, u64),
    source: String,
}

async fn history(h: &HistoryArgs) -> anyhow::Result<History> {
    let now = std::time::SystemTime::now();
    let since = Some(parse_time(&h.since, now)?);
    let until = h.until.as_deref().map(|u| parse_time(u, now)).transpose()?;
    let (groups, source) = if let Some(spec) = &h.store {
        let config = flows_store::StoreConfig::parse(
            spec,
            h.chdb_lib.clone().unwrap_or_else(flows_store::chdb::default_library),
            h.store_user.clone(),
            h.store_password.clone(),
        )?;
        let store = flows_store::Store::open_existing(&config, &h.store_database)
            .await
            .with_context(|| format!("opening the store {spec}"))?;
        let q = flows_store::AttemptQuery {
            since: since.map(|t| ns_of(&Some(t))),
            until: until.map(|t| ns_of(&Some(t))),
            ..Default::default()
        };
        let rows = store.attempts(&q).await.context("reading attempts from the store")?;
        (rows.into_iter().map(flows_store::AttemptRow::into_proto).collect::<Vec<_>>(), spec.clone())
    } else {
        let (server, dialer) = crate::connect::relay_or_flag(
            h.server.as_ref(),
            &lab_dir(h),
            "no history: give --server (a relay started with --store) or --store, or start the lab with --probes",
        )?;
        let mut client = HistoryClient::new(crate::connect::channel(&dialer, &server).await?)
            .max_decoding_message_size(64 << 20);
        let mut stream = client
            .attempts(AttemptsRequest { since, until, allow_list: Vec::new(), deny_list: Vec::new() })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unimplemented => anyhow::anyhow!("{server} keeps no history: start the relay with --store"),
                _ => anyhow::anyhow!("reading attempts from {server}: {}", s.message()),
            })?
            .into_inner();
        let mut groups = Vec::new();
        while let Some(batch) = stream.message().await.map_err(|s| anyhow::anyhow!("reading attempts from {server}: {}", s.message()))? {
            groups.extend(batch.groups);
        }
        (groups, server)
    };
    let mut out = History { observations: Vec::with_capacity(groups.len()), skipped: (0, 0), source };
    for g in &groups {
        match observation(g) {
            Some(o) => out.observations.push(o),
            None => {
                out.skipped.0 += 1;
                out.skipped.1 += g.flows;
            }
        }
    }
    Ok(out)
}

fn ts(ns: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn side(ns: &str, w: &str) -> String {
    if ns.is_empty() { w.to_string() } else { format!("{ns}/{w}") }
}

fn port(g: &ChangeGroup) -> String {
    if g.port == 0 { g.protocol.clone() } else { format!("{}/{}", g.port, g.protocol) }
}

fn table(title: &str, groups: &[ChangeGroup], out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "{title}")?;
    let head = ["SOURCE", "DESTINATION", "PORT", "FLOWS", "FIRST SEEN", "LAST SEEN", "POLICIES"];
    let rows: Vec<[String; 7]> = groups
        .iter()
        .map(|g| {
            [
                side(&g.src_namespace, &g.src_workload),
                side(&g.dst_namespace, &g.dst_workload),
                port(g),
                g.flows.to_string(),
                ts(g.first_seen),
                ts(g.last_seen),
                g.policies.join(","),
            ]
        })
        .collect();
    crate::printer::columns(head, &rows, "  ", out)
}

fn proof_summary(r: &Replay) -> String {
    let refused = if r.refused > 0 { format!(", {} refused by their destination (nothing listened) left out", r.refused) } else { String::new() };
    format!(
        "{} attempts in {} groups replayed: {} allowed stay allowed, {} allowed would be denied, {} denied would be allowed, {} denied stay denied{refused}",
        r.flows,
        r.groups,
        r.still_allowed,
        Replay::count(&r.newly_denied),
        Replay::count(&r.newly_allowed),
        Replay::count(&r.still_denied)
    )
}

/// `flows policy suggest`. Ok(false) when the suggestion would break observed traffic.
pub async fn suggest(args: SuggestArgs) -> anyhow::Result<bool> {
    let ctx = load_cluster(&args.history).await?;
    let h = history(&args.history).await?;
    if h.observations.is_empty() {
        bail!("no attempts in the window from {}: nothing to suggest from", h.source);
    }
    let opts = SuggestOptions {
        namespaces: args.namespaces.clone(),
        workload: args.workload.clone(),
        world_prefix_v4: args.world_prefix_v4,
        world_prefix_v6: args.world_prefix_v6,
        include_audit: args.include_audit,
        include_refused: args.include_refused,
        end_port: ctx.version.is_none_or(|v| v >= flows_k8s::snapshot::Version { major: 1, minor: 25 }),
        namespace_name_label: ctx.version.is_none_or(|v| v >= flows_k8s::snapshot::Version { major: 1, minor: 22 }),
    };
    let s = advice::suggest(&h.observations, &ctx.inventory, &opts);
    if s.policies.is_empty() {
        bail!("no workload in scope had allowed traffic in the window (namespaces: {:?}, workload: {:?})", args.namespaces, args.workload);
    }
    // The proof: the suggestion as it would be applied (over the current policies).
    let suggested = s.compiled().context("a suggested policy is invalid")?;
    let engine = Engine::new(apply(&ctx.policies, suggested, false));
    let r = advice::replay(&engine, &ctx.cluster, &h.observations, |o| opts.counts_as_allowed(o));
    let mut err = std::io::stderr().lock();
    for w in &s.warnings {
        writeln!(err, "warning: {w}")?;
    }
    if h.skipped.0 > 0 {
        writeln!(err, "note: {} groups ({} attempts) without an address or with a protocol policy cannot judge were left out", h.skipped.0, h.skipped.1)?;
    }
    if r.breaks_anything() {
        writeln!(err, "error: the suggestion would deny {} attempts that were allowed; nothing was written", Replay::count(&r.newly_denied))?;
        table("would be denied:", &r.newly_denied, &mut err)?;
        writeln!(err, "{}", proof_summary(&r))?;
        return Ok(false);
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match (args.output, args.explain) {
        (SuggestFormat::Yaml, explain) => out.write_all(s.yaml(explain)?.as_bytes())?,
        (SuggestFormat::Json, false) => writeln!(out, "{}", serde_json::to_string_pretty(&s.json_list())?)?,
        (SuggestFormat::Json, true) => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "policies": s.json_list(),
                "explanations": s.explanations,
                "warnings": s.warnings,
                "triples": s.triples,
                "refused": s.refused,
                "proof": r,
            }))?
        )?,
    }
    writeln!(
        err,
        "{} policies for {} observed (source, destination, port) triples from {}; proof: {}",
        s.policies.len(),
        s.triples,
        h.source,
        proof_summary(&r)
    )?;
    if !r.still_denied.is_empty() {
        table("denied attempts that stay denied:", &r.still_denied, &mut err)?;
    }
    if !r.newly_allowed.is_empty() {
        table("denied attempts the suggestion would allow (selectors broader than observed):", &r.newly_allowed, &mut err)?;
    }
    Ok(true)
}

/// `current` with `proposed` applied: by namespace and name (as `kubectl apply`), or
/// instead of all of them.
fn apply(current: &[CompiledPolicy], proposed: Vec<CompiledPolicy>, replace: bool) -> Vec<CompiledPolicy> {
    let mut by: BTreeMap<(String, String), CompiledPolicy> = BTreeMap::new();
    if !replace {
        for p in current {
            by.insert((p.id.namespace.clone(), p.id.name.clone()), p.clone());
        }
    }
    for p in proposed {
        by.insert((p.id.namespace.clone(), p.id.name.clone()), p);
    }
    by.into_values().collect()
}

/// `flows policy check`. Ok(false) when something allowed would become denied.
pub async fn check(args: CheckArgs) -> anyhow::Result<bool> {
    let proposed = crate::manifests::read_manifests(&args.paths)?;
    if proposed.policies.is_empty() {
        bail!("no NetworkPolicy in {:?}", args.paths);
    }
    let ctx = load_cluster(&args.history).await?;
    let h = history(&args.history).await?;
    let n_proposed = proposed.policies.len();
    let engine = Engine::new(apply(&ctx.policies, proposed.policies, args.replace));
    let r = advice::replay(&engine, &ctx.cluster, &h.observations, |o| o == Outcome::Allowed);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.output {
        CheckFormat::Json => writeln!(
            out,
            "{}",
            serde_json::to_string(&serde_json::json!({
                "source": h.source,
                "proposed": n_proposed,
                "replace": args.replace,
                "flows": r.flows,
                "groups": r.groups,
                "still_allowed": r.still_allowed,
                "still_denied": Replay::count(&r.still_denied),
                "refused": r.refused,
                "newly_denied": r.newly_denied,
                "newly_allowed": r.newly_allowed,
                "skipped_flows": h.skipped.1,
            }))?
        )?,
        CheckFormat::Table => {
            if r.newly_denied.is_empty() && r.newly_allowed.is_empty() {
                writeln!(out, "no attempt in the window changes verdict")?;
            }
            if !r.newly_denied.is_empty() {
                table("NEWLY DENIED (allowed in the window, denied with the proposed policies):", &r.newly_denied, &mut out)?;
            }
            if !r.newly_allowed.is_empty() {
                table("NEWLY ALLOWED (denied in the window, allowed with the proposed policies):", &r.newly_allowed, &mut out)?;
            }
            writeln!(out, "{} ({} proposed policies, {}, history from {})", proof_summary(&r), n_proposed, if args.replace { "replacing the current ones" } else { "applied over the current ones" }, h.source)?;
        }
    }
    Ok(!r.breaks_anything())
}
