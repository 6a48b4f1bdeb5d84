//! A real Kubernetes control plane for the lab: etcd, kube-apiserver (RBAC and the Node
//! authorizer on, service-account tokens), kube-controller-manager and kube-scheduler,
//! from the binaries `scripts/setup.sh` unpacks. Everything listens on loopback; the
//! PKI, kubeconfigs, etcd's data and the logs live in `<state dir>/k8s`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use flows_tls::certs::{Authority, Usage, signing_key, write_file};

use crate::{LabError, daemon::spawn_detached, state::ApiRec};

/// Where the binaries are: `FLOWS_K8S_BIN`, else where the set-up script puts them.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("FLOWS_K8S_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/flows-tools/k8s"))
}

/// The control plane's programs, in the order they start (and the reverse of the order
/// they stop: an API server whose etcd is gone ignores SIGTERM).
pub const PROGRAMS: [&str; 4] = ["lab-etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"];

/// The daemon role of a program in the lab's state.
pub fn role(program: &str) -> String {
    format!("k8s-{program}")
}

/// The binaries missing from `dir`, if any.
pub fn missing(dir: &Path) -> Vec<String> {
    PROGRAMS.iter().filter(|p| !dir.join(p).is_file()).map(|p| dir.join(p).display().to_string()).collect()
}

/// Service addresses the API server hands out: dual stack, the ranges of the lab's plan.
fn service_cidrs() -> String {
    format!("{},{}", crate::plan::SERVICE_CIDR_V4, crate::plan::SERVICE_CIDR_V6)
}

fn cp_err(message: impl Into<String>) -> LabError {
    LabError::ControlPlane { message: message.into(), log: None }
}

fn write(path: &Path, contents: &str, secret: bool) -> Result<(), LabError> {
    write_file(path, contents, secret).map_err(|e| cp_err(format!("writing {}: {e}", path.display())))
}

/// A kubeconfig for `user` with the certificate files `pki/<user>.{crt,key}`.
fn kubeconfig(dir: &Path, url: &str, user: &str) -> Result<PathBuf, LabError> {
    let pki = dir.join("pki");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\n\
         users:\n- name: {user}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\n\
         contexts:\n- name: lab\n  context: {{ cluster: lab, user: {user} }}\ncurrent-context: lab\n",
        ca = pki.join("ca.crt").display(),
        crt = pki.join(format!("{user}.crt")).display(),
        key = pki.join(format!("{user}.key")).display(),
    );
    let path = dir.join(format!("{user}.kubeconfig"));
    write(&path, &text, true)?;
    Ok(path)
}

/// The PKI: one CA for serving and clients, a front-proxy CA, the service-account key.
fn pki(dir: &Path) -> Result<(), LabError> {
    let pki = dir.join("pki");
    fs::create_dir_all(&pki).map_err(|e| LabError::io(&pki, e))?;
    let tls = |e: flows_tls::TlsError| cp_err(format!("making the control plane's certificates: {e}"));
    let ca = Authority::new("flows-lab kubernetes CA", 30).map_err(tls)?;
    write(&pki.join("ca.crt"), ca.cert_pem(), false)?;
    write(&pki.join("ca.key"), ca.key_pem(), true)?;
    let serving: Vec<String> = ["127.0.0.1", "10.96.0.1", "fd00:10:96::1", "localhost", "kubernetes", "kubernetes.default",
        "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"]
        .map(String::from)
        .to_vec();
    let issue = |file: &str, cn: &str, orgs: &[&str], names: &[String], usage: Usage| -> Result<(), LabError> {
        let (crt, key) = ca.issue(cn, orgs, names, usage).map_err(tls)?;
        write(&pki.join(format!("{file}.crt")), &crt, false)?;
        write(&pki.join(format!("{file}.key")), &key, true)
    };
    issue("apiserver", "kube-apiserver", &[], &serving, Usage::Server)?;
    issue("admin", "flows-lab-admin", &["system:masters"], &[], Usage::Client)?;
    issue("controller-manager", "system:kube-controller-manager", &[], &[], Usage::Client)?;
    issue("scheduler", "system:kube-scheduler", &[], &[], Usage::Client)?;
    // The default binding system:node-proxier names this user.
    issue("kube-proxy", "system:kube-proxy", &[], &[], Usage::Client)?;
    issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", &["system:masters"], &[], Usage::Client)?;
    let front = Authority::new("flows-lab front-proxy CA", 30).map_err(tls)?;
    write(&pki.join("front-proxy-ca.crt"), front.cert_pem(), false)?;
    let (crt, key) = front.issue("front-proxy-client", &[], &[], Usage::Client).map_err(tls)?;
    write(&pki.join("front-proxy-client.crt"), &crt, false)?;
    write(&pki.join("front-proxy-client.key"), &key, true)?;
    let (private, public) = signing_key().map_err(tls)?;
    write(&pki.join("sa.key"), &private, true)?;
    write(&pki.join("sa.pub"), &public, false)
}

fn port(of: &str) -> Result<u16, LabError> {
    let addr = crate::free_fixed_port().map_err(|e| cp_err(format!("a port for {of}: {e}")))?;
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).ok_or_else(|| cp_err(format!("a port for {of}: {addr}")))
}

/// The arguments of each program, given the directory and the ports.
fn args(program: &str, dir: &Path, etcd: (u16, u16), api: u16) -> Vec<String> {
    let pki = |f: &str| format!("{}", dir.join("pki").join(f).display());
    let kc = |u: &str| format!("{}", dir.join(format!("{u}.kubeconfig")).display());
    let etcd_url = format!("http://127.0.0.1:{}", etcd.0);
    let v: Vec<String> = match program {
        "lab-etcd" => vec![
            "--name=lab".into(), format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"), format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls=http://127.0.0.1:{}", etcd.1), "--unsafe-no-fsync".into(), "--log-level=warn".into(),
        ],
        "kube-apiserver" => vec![
            format!("--etcd-servers={etcd_url}"), "--bind-address=127.0.0.1".into(), "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api}"), format!("--tls-cert-file={}", pki("apiserver.crt")),
            format!("--tls-private-key-file={}", pki("apiserver.key")), format!("--client-ca-file={}", pki("ca.crt")),
            format!("--service-account-key-file={}", pki("sa.pub")), format!("--service-account-signing-key-file={}", pki("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            "--authorization-mode=Node,RBAC".into(), "--enable-admission-plugins=NodeRestriction".into(),
            format!("--service-cluster-ip-range={}", service_cidrs()), "--allow-privileged=true".into(),
            format!("--kubelet-client-certificate={}", pki("apiserver-kubelet-client.crt")),
            format!("--kubelet-client-key={}", pki("apiserver-kubelet-client.key")),
            format!("--requestheader-client-ca-file={}", pki("front-proxy-ca.crt")),
            "--requestheader-allowed-names=front-proxy-client".into(), "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(), "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            format!("--proxy-client-cert-file={}", pki("front-proxy-client.crt")),
            format!("--proxy-client-key-file={}", pki("front-proxy-client.key")),
            "--endpoint-reconciler-type=none".into(), "--profiling=false".into(),
            format!("--audit-policy-file={}", dir.join(AUDIT_POLICY_FILE).display()),
            format!("--audit-log-path={}", dir.join(AUDIT_LOG).display()), "--audit-log-maxsize=64".into(),
            "--audit-log-maxbackup=1".into(),
        ],
        "kube-controller-manager" => vec![
            format!("--kubeconfig={}", kc("controller-manager")), format!("--authentication-kubeconfig={}", kc("controller-manager")),
            format!("--authorization-kubeconfig={}", kc("controller-manager")), "--bind-address=127.0.0.1".into(), "--secure-port=0".into(),
            "--leader-elect=false".into(), format!("--service-account-private-key-file={}", pki("sa.key")),
            format!("--root-ca-file={}", pki("ca.crt")), format!("--cluster-signing-cert-file={}", pki("ca.crt")),
            format!("--cluster-signing-key-file={}", pki("ca.key")), "--use-service-account-credentials=true".into(),
            format!("--service-cluster-ip-range={}", service_cidrs()), "--allocate-node-cidrs=false".into(),
        ],
        _ => vec![
            format!("--kubeconfig={}", kc("scheduler")), format!("--authentication-kubeconfig={}", kc("scheduler")),
            format!("--authorization-kubeconfig={}", kc("scheduler")), "--bind-address=127.0.0.1".into(), "--secure-port=0".into(),
            "--leader-elect=false".into(),
        ],
    };
    v
}

/// The API server's record of requests (JSON lines, one per request): who asked what,
/// with which parameters. The control plane's own chatter is left out.
pub const AUDIT_LOG: &str = "audit.log";
const AUDIT_POLICY_FILE: &str = "audit-policy.yaml";
const AUDIT_POLICY: &str = concat!(
    "apiVersion: audit.k8s.io/v1\n",
    "kind: Policy\n",
    "omitStages: [RequestReceived]\n",
    "rules:\n",
    "- level: None\n",
    "  users: [system:kube-controller-manager, system:kube-scheduler, system:apiserver]\n",
    "- level: None\n",
    "  userGroups: [system:serviceaccounts:kube-system]\n",
    "- level: None\n",
    "  resources: [{ group: coordination.k8s.io, resources: [leases] }]\n",
    "- level: None\n",
    "  users: [flows-lab-admin]\n",
    "  verbs: [get, list, watch]\n",
    "- level: None\n",
    "  nonResourceURLs: [/readyz, /healthz, /livez, /version]\n",
    "- level: Metadata\n",
);

/// Starts one program detached, logging to `<dir>/<program>.log` (appended: a restarted
/// program's log follows its predecessor's); returns its pid. Its arguments are kept in
/// `<dir>/<program>.args`, so that it can be started again as it was.
fn spawn(bin: &Path, dir: &Path, program: &str, args: Vec<String>) -> Result<u32, LabError> {
    let args_path = dir.join(format!("{program}.args"));
    write(&args_path, &args.join("\n"), false)?;
    let log_path = dir.join(format!("{program}.log"));
    let log = fs::File::options().create(true).append(true).open(&log_path).map_err(|e| LabError::io(&log_path, e))?;
    let log2 = log.try_clone().map_err(|e| LabError::io(&log_path, e))?;
    let mut cmd = Command::new(bin.join(program));
    cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(log2);
    spawn_detached(cmd, bin.join(program).display().to_string())
}

/// Makes the PKI and kubeconfigs and starts the four programs; `started` hears each pid
/// as soon as it runs (so a failure later still stops it). Returns once the API server
/// is ready.
pub fn start(state_dir: &Path, bin: &Path, mut started: impl FnMut(&str, u32) -> Result<(), LabError>) -> Result<ApiRec, LabError> {
    let gone = missing(bin);
    if !gone.is_empty() {
        return Err(cp_err(format!("missing {} (scripts/setup.sh unpacks them; FLOWS_K8S_BIN points elsewhere)", gone.join(", "))));
    }
    let dir = state_dir.join("k8s");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("etcd")).map_err(|e| LabError::io(&dir, e))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(dir.join("etcd"), fs::Permissions::from_mode(0o700));
    pki(&dir)?;
    write(&dir.join(AUDIT_POLICY_FILE), AUDIT_POLICY, false)?;
    let (etcd, api) = ((port("etcd")?, port("etcd peers")?), port("the API server")?);
    let url = format!("https://127.0.0.1:{api}");
    let admin = kubeconfig(&dir, &url, "admin")?;
    kubeconfig(&dir, &url, "controller-manager")?;
    kubeconfig(&dir, &url, "scheduler")?;
    kubeconfig(&dir, &url, "kube-proxy")?;
    let rec = ApiRec { url, kubeconfig: admin, dir: dir.clone() };
    for program in &PROGRAMS[..2] {
        let pid = spawn(bin, &dir, program, args(program, &dir, etcd, api))?;
        started(program, pid)?;
    }
    wait_ready(&rec, Duration::from_secs(60))?;
    for program in &PROGRAMS[2..] {
        let pid = spawn(bin, &dir, program, args(program, &dir, etcd, api))?;
        started(program, pid)?;
    }
    Ok(rec)
}

/// Starts `program` again with the arguments it last ran with (after it stopped or was
/// stopped); for the API server, returns once it is ready. Returns the new pid.
pub fn respawn(rec: &ApiRec, bin: &Path, program: &str) -> Result<u32, LabError> {
    let path = rec.dir.join(format!("{program}.args"));
    let args = fs::read_to_string(&path).map_err(|e| LabError::io(&path, e))?;
    let pid = spawn(bin, &rec.dir, program, args.lines().map(String::from).collect())?;
    if program == "kube-apiserver" {
        wait_ready(rec, Duration::from_secs(60))?;
    }
    Ok(pid)
}

/// Polls `/readyz` until ok or `timeout`.
fn wait_ready(rec: &ApiRec, timeout: Duration) -> Result<(), LabError> {
    let log = Some(rec.dir.join("kube-apiserver.log"));
    let err = |message: String| LabError::ControlPlane { message, log: log.clone() };
    crate::runtime::block_on(async {
        let client = flows_k8s::cluster::connect(&rec.kubeconfig).await.map_err(|e| err(e.to_string()))?;
        let start = Instant::now();
        while !flows_k8s::cluster::ready(&client).await {
            if start.elapsed() > timeout {
                return Err(err(format!("the API server at {} was not ready within {timeout:?}", rec.url)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::info!(url = %rec.url, elapsed_ms = start.elapsed().as_millis() as u64, "API server ready");
        Ok(())
    })?
}

/// Stops the lab's API server (SIGTERM, as an outage would take it away); the rest of
/// the control plane and the lab keep running.
pub fn stop_apiserver(state_dir: &Path) -> Result<(), LabError> {
    let state = crate::State::load(state_dir)?;
    let role = role("kube-apiserver");
    let pids: Vec<u32> = state.daemons.iter().filter(|d| d.role == role).map(|d| d.pid).collect();
    if state.api.is_none() || pids.iter().all(|p| !crate::process_alive(*p)) {
        return Err(cp_err("no API server runs in this lab"));
    }
    crate::stop_processes(&pids);
    for p in pids {
        crate::state::remove_daemon(state_dir, p)?;
    }
    Ok(())
}

/// Starts the lab's API server again as it ran; returns once it is ready.
pub fn start_apiserver(state_dir: &Path, bin: &Path) -> Result<(), LabError> {
    let state = crate::State::load(state_dir)?;
    let api = state.api.as_ref().ok_or_else(|| cp_err("this lab runs no control plane"))?;
    let role = role("kube-apiserver");
    if state.daemons.iter().any(|d| d.role == role && crate::process_alive(d.pid)) {
        return Err(cp_err("the API server is already running"));
    }
    let pid = respawn(api, bin, "kube-apiserver")?;
    crate::state::add_daemon(state_dir, crate::Daemon { role, node: None, pid })
}
