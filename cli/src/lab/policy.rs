//! `flows lab policy ...`: NetworkPolicies and enforcement modes for the lab.
//!
//! Policies live as files in `<state dir>/manifests/policies/`, next to the lab's own
//! rendering of its namespaces and pods; the lab's node-probes watch that directory, as
//! they would watch the API server on a cluster. Modes are namespace annotations. On a
//! control plane (`flows lab up --apiserver`) policies and modes are written through the
//! API server (server-side apply), where the probes' kube-sync reads them; the files
//! stay as the lab's record of what it applied.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use flows_lab::{manifests, state::State};
use flows_policy::{Manifests, load};

#[derive(clap::Subcommand, Debug)]
pub enum LabPolicyCommand {
    /// Apply NetworkPolicy files (validated first: nothing is applied if any is invalid).
    Apply {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Remove applied policy files (by file name), or all of them.
    Delete {
        names: Vec<String>,
        #[arg(long)]
        all: bool,
    },
    /// Set a namespace's policy mode: enforce (drop what policy denies), audit (report
    /// it as AUDIT, drop nothing) or off.
    Mode {
        namespace: String,
        #[arg(value_parser = ["enforce", "audit", "off"])]
        mode: String,
    },
    /// List the applied policy files and the namespaces' modes.
    List,
}

/// The field managers of the lab's policies and of its namespaces' modes on an API
/// server: neither takes the other's fields, nor the namespaces' own labels.
const POLICY_MANAGER: &str = "flows-lab-policy";
const MODE_MANAGER: &str = "flows-lab-policy-mode";

fn policies_dir(dir: &Path) -> PathBuf {
    manifests::dir(dir).join("policies")
}

fn modes_file(dir: &Path) -> PathBuf {
    dir.join("policy-modes.json")
}

pub fn modes(dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    match std::fs::read_to_string(modes_file(dir)) {
        Ok(t) => serde_json::from_str(&t).with_context(|| format!("{}", modes_file(dir).display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("{}", modes_file(dir).display())),
    }
}

/// Forgets applied policies and modes: a new lab starts without them, and `down`
/// leaves nothing of them behind.
pub fn reset(dir: &Path) -> anyhow::Result<()> {
    let md = manifests::dir(dir);
    match std::fs::remove_dir_all(&md) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", md.display())),
    }
    match std::fs::remove_file(modes_file(dir)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", modes_file(dir).display())),
    }
}

/// Renders the lab's namespaces and pods for the probes (with the current modes).
pub fn write_cluster(dir: &Path, state: &State) -> anyhow::Result<()> {
    manifests::write_cluster(dir, state, &modes(dir)?)?;
    std::fs::create_dir_all(policies_dir(dir))?;
    Ok(())
}

fn apply(dir: &Path, paths: &[PathBuf]) -> anyhow::Result<()> {
    let files = crate::manifests::manifest_files(paths)?;
    if files.is_empty() {
        bail!("no policy files in {paths:?}");
    }
    // Validate everything before copying anything.
    let mut texts = Vec::new();
    for f in &files {
        let t = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        for obj in load::parse(&f.display().to_string(), &t)? {
            if !matches!(obj.object, load::Object::NetworkPolicy(_)) {
                bail!("{}: only NetworkPolicy objects can be applied here", obj.origin);
            }
        }
        texts.push((f.clone(), t));
    }
    Manifests::parse(texts.iter().map(|(n, t)| (n.to_str().unwrap_or("?"), t.as_str())))?;
    let mut names = std::collections::BTreeSet::new();
    for (f, _) in &texts {
        if !names.insert(f.file_name()) {
            bail!("two files named {}: the lab keeps policies by file name", f.display());
        }
    }
    // On a control plane the API server has the last word: it validates and admits
    // each policy before the lab records the file.
    if let Some(api) = State::load(dir)?.api {
        let docs = flows_lab::cluster_api::documents(&files)?;
        flows_lab::cluster_api::apply(&api, &docs, POLICY_MANAGER).context("applying the policies through the API server")?;
    }
    let pd = policies_dir(dir);
    std::fs::create_dir_all(&pd)?;
    for (f, t) in &texts {
        let name = f
            .file_name()
            .with_context(|| format!("{} has no file name", f.display()))?;
        let tmp = pd.join(format!(".{}.tmp", name.to_string_lossy()));
        std::fs::write(&tmp, t)?;
        std::fs::rename(&tmp, pd.join(name))?;
        println!("applied {}", name.to_string_lossy());
    }
    Ok(())
}

fn delete(dir: &Path, names: &[String], all: bool) -> anyhow::Result<()> {
    let pd = policies_dir(dir);
    let targets: Vec<PathBuf> = if all {
        std::fs::read_dir(&pd)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    } else {
        if names.is_empty() {
            bail!("name the policy files to delete, or use --all");
        }
        names.iter().map(|n| pd.join(n)).collect()
    };
    let api = State::load(dir)?.api;
    for t in targets {
        if let Some(api) = &api {
            let docs = flows_lab::cluster_api::documents(std::slice::from_ref(&t))?;
            flows_lab::cluster_api::delete(api, &docs).with_context(|| format!("deleting {}'s policies through the API server", t.display()))?;
        }
        std::fs::remove_file(&t).with_context(|| format!("removing {}", t.display()))?;
        println!("deleted {}", t.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
    }
    Ok(())
}

fn mode(dir: &Path, namespace: &str, mode: &str) -> anyhow::Result<()> {
    let state = State::load(dir)?;
    if !state.namespaces.iter().any(|n| n.name == namespace) {
        bail!("no namespace {namespace} in the lab");
    }
    let mut m = modes(dir)?;
    m.insert(namespace.to_string(), mode.to_string());
    let tmp = modes_file(dir).with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&m)?)?;
    std::fs::rename(&tmp, modes_file(dir))?;
    manifests::write_cluster(dir, &state, &m)?;
    if let Some(api) = &state.api {
        let doc = serde_json::json!({ "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": namespace, "annotations": { manifests::MODE_ANNOTATION: mode } } });
        flows_lab::cluster_api::apply(api, &[doc], MODE_MANAGER).context("annotating the namespace through the API server")?;
    }
    println!("namespace {namespace}: policy mode {mode}");
    Ok(())
}

fn list(dir: &Path) -> anyhow::Result<()> {
    let mut files: Vec<String> = std::fs::read_dir(policies_dir(dir))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    println!("POLICY FILES");
    for f in &files {
        println!("  {f}");
    }
    println!("MODES (default: enforce)");
    for (ns, m) in modes(dir)? {
        println!("  {ns}: {m}");
    }
    Ok(())
}

pub fn run(dir: &Path, cmd: LabPolicyCommand) -> anyhow::Result<()> {
    match cmd {
        LabPolicyCommand::Apply { paths } => apply(dir, &paths),
        LabPolicyCommand::Delete { names, all } => delete(dir, &names, all),
        LabPolicyCommand::Mode { namespace, mode: m } => mode(dir, &namespace, &m),
        LabPolicyCommand::List => list(dir),
    }
}
