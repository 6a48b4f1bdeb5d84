//! Certificates for a flows deployment: one CA, a node-probe server certificate, a relay
//! certificate (server towards clients, client towards node-probes) and a client
//! certificate for `flows` users. Written as PEM files whose names the Helm chart's
//! Secret expects (`ca.crt`, `probe.crt`, `probe.key`, `relay.crt`, `relay.key`,
//! `client.crt`, `client.key`); keys are created mode 0600.

use std::{
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::TlsError;

/// Names (DNS names or IP addresses) each certificate is valid for.
#[derive(Clone, Debug)]
pub struct CertSpec {
    /// Subject alternative names of the node-probe certificate. Probes are reached by
    /// pod IP, so clients check one shared name (`--peer-tls-server-name`).
    pub probe_names: Vec<String>,
    /// Subject alternative names of the relay certificate (its Service's DNS names).
    pub relay_names: Vec<String>,
    /// Common name of the user certificate.
    pub client_name: String,
    /// Validity in days.
    pub days: u32,
}

impl Default for CertSpec {
    fn default() -> Self {
        Self {
            probe_names: vec!["node-probe.flows.local".into()],
            relay_names: vec![
                "relay.flows.local".into(),
                "flows-relay".into(),
                "flows-relay.flows-system.svc".into(),
                "flows-relay.flows-system.svc.cluster.local".into(),
            ],
            client_name: "flows-client".into(),
            days: 365,
        }
    }
}

/// The files written by [`create`].
#[derive(Debug)]
pub struct Created {
    pub files: Vec<PathBuf>,
}

pub const FILES: [&str; 8] = [
    "ca.crt", "ca.key", "probe.crt", "probe.key", "relay.crt", "relay.key", "client.crt", "client.key",
];

fn sans(names: &[String]) -> Result<Vec<SanType>, TlsError> {
    names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
        })
        .collect()
}

fn params(cn: &str, days: u32) -> Result<CertificateParams, TlsError> {
    params_in(cn, &["flows"], days)
}

/// A subject with these organisations (Kubernetes reads them as the user's groups).
fn params_in(cn: &str, orgs: &[&str], days: u32) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    for o in orgs {
        dn.push(DnType::OrganizationName, *o);
    }
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    // A little back-dating absorbs clock skew between the machines that check it.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days));
    Ok(p)
}

fn leaf(
    cn: &str,
    names: &[String],
    usages: Vec<ExtendedKeyUsagePurpose>,
    days: u32,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String), TlsError> {
    leaf_in(cn, &["flows"], names, usages, days, issuer)
}

fn leaf_in(
    cn: &str,
    orgs: &[&str],
    names: &[String],
    usages: Vec<ExtendedKeyUsagePurpose>,
    days: u32,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String), TlsError> {
    let mut p = params_in(cn, orgs, days)?;
    p.subject_alt_names = sans(names)?;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = usages;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A certificate authority held in memory, for a whole PKI made at once (the lab's
/// Kubernetes control plane).
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    key_pem: String,
    days: u32,
}

/// What a certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
    Both,
}

impl Authority {
    pub fn new(cn: &str, days: u32) -> Result<Authority, TlsError> {
        let key = KeyPair::generate()?;
        let mut ca = params_in(cn, &[], days)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = ca.self_signed(&key)?;
        let (pem, key_pem) = (cert.pem(), key.serialize_pem());
        Ok(Authority { issuer: Issuer::new(ca, key), pem, key_pem, days })
    }

    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A certificate and its key (PEM) for `cn` in `orgs`, valid for `names`.
    pub fn issue(&self, cn: &str, orgs: &[&str], names: &[String], usage: Usage) -> Result<(String, String), TlsError> {
        let (server, client) = (ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth);
        let usages = match usage {
            Usage::Server => vec![server],
            Usage::Client => vec![client],
            Usage::Both => vec![server, client],
        };
        leaf_in(cn, orgs, names, usages, self.days, &self.issuer)
    }
}

/// A signing key pair as PEM (private PKCS#8, public SPKI): ECDSA P-256.
pub fn signing_key() -> Result<(String, String), TlsError> {
    let key = KeyPair::generate()?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

/// Writes `contents` to `path`, mode 0600 when `secret`, replacing what was there.
pub fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    write(dir, &name, contents, secret, true).map(|_| ())
}

fn write(dir: &Path, name: &str, contents: &str, secret: bool, force: bool) -> Result<PathBuf, TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(if secret { 0o600 } else { 0o644 });
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let err = |source| TlsError::Write {
        path: path.clone(),
        source,
    };
    let mut f = opts.open(&path).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    Ok(path)
}

/// Creates the CA and the three certificates in `dir` (created if missing). Existing
/// files are kept and reported unless `force`.
pub fn create(dir: &Path, spec: &CertSpec, force: bool) -> Result<Created, TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    if !force {
        for f in FILES {
            let p = dir.join(f);
            if p.exists() {
                return Err(TlsError::Write {
                    path: p,
                    source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "exists (use --force to replace)"),
                });
            }
        }
    }
    let ca_key = KeyPair::generate()?;
    let mut ca = params("flows CA", spec.days.saturating_mul(2))?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);

    let server = ExtendedKeyUsagePurpose::ServerAuth;
    let client = ExtendedKeyUsagePurpose::ClientAuth;
    let (probe, probe_key) = leaf("flows node-probe", &spec.probe_names, vec![server.clone()], spec.days, &issuer)?;
    let (relay, relay_key) = leaf("flows relay", &spec.relay_names, vec![server, client.clone()], spec.days, &issuer)?;
    let (user, user_key) = leaf(&spec.client_name, &[], vec![client], spec.days, &issuer)?;

    let mut files = Vec::new();
    for (name, body, secret) in [
        ("ca.crt", &ca_pem, false),
        ("ca.key", &ca_key_pem, true),
        ("probe.crt", &probe, false),
        ("probe.key", &probe_key, true),
        ("relay.crt", &relay, false),
        ("relay.key", &relay_key, true),
        ("client.crt", &user, false),
        ("client.key", &user_key, true),
    ] {
        files.push(write(dir, name, body, secret, force)?);
    }
    Ok(Created { files })
}
