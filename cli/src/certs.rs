//! `nodekeeper certs`: a small CA for development and small fleets (rcgen). `init` makes the CA;
//! `issue` makes a certificate whose identity URI says what its holder may do (see
//! `nodekeeper_common::tls`). Larger fleets use their own CA: any issuer that can put the URI SAN
//! in a certificate works (README, "Certificates").

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nodekeeper_common::tls::{Identity, Kind};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::args::CertsCmd;
use crate::output::println;

/// `nodekeeper certs init|issue`.
pub fn run(cmd: CertsCmd) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::Init { dir, days, force } => init(&dir, days, force),
        CertsCmd::Issue { dir, kind, name, cluster, san, days } => {
            if kind == Kind::Node && (cluster.len() != 1 || cluster[0] == "*") {
                bail!("a node certificate names exactly one --cluster");
            }
            issue(&IssueArgs { dir, kind, name, clusters: cluster, sans: san, days })
        }
    }
}

/// Writes a file readable by its owner only when it holds a key.
fn write(path: &Path, content: &str, secret: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true).mode(if secret { 0o600 } else { 0o644 });
    let mut f = opts.open(path).with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut f, content.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // A little backdating absorbs clock skew between machines.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// Creates `ca.pem` and `ca-key.pem` in `dir`.
pub fn init(dir: &Path, days: u32, force: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if !force && (cert_path.exists() || key_path.exists()) {
        bail!(
            "{} already holds a CA; use --force to replace it (every certificate it issued stops working)",
            dir.display()
        );
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "nodekeeper CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    write(&cert_path, &cert.pem(), false)?;
    write(&key_path, &key.serialize_pem(), true)?;
    println(&format!("CA written to {} (key {})", cert_path.display(), key_path.display()))?;
    Ok(())
}

pub struct IssueArgs {
    pub dir: PathBuf,
    pub kind: Kind,
    pub name: String,
    pub clusters: Vec<String>,
    /// DNS names and IP addresses the holder serves under (servers).
    pub sans: Vec<String>,
    pub days: u32,
}

/// Issues `<name>.pem` and `<name>-key.pem` in `dir`, signed by the CA there.
pub fn issue(a: &IssueArgs) -> anyhow::Result<()> {
    nodekeeper_common::names::producer(&a.name).map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    for c in &a.clusters {
        if c != "*" {
            nodekeeper_common::names::cluster(c).map_err(|e| anyhow::anyhow!("--cluster: {e}"))?;
        }
    }
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p)
            .with_context(|| format!("reading {} (run `nodekeeper certs init` first)", p.display()))
    };
    let ca_key = KeyPair::from_pem(&read(a.dir.join("ca-key.pem"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(a.dir.join("ca.pem"))?, ca_key)?;
    let clusters = if a.clusters.is_empty() { vec!["*".to_owned()] } else { a.clusters.clone() };
    let id = Identity { kind: a.kind, name: a.name.clone(), clusters };
    let mut params = CertificateParams::new(a.sans.clone())?;
    for uri in id.uris() {
        params.subject_alt_names.push(SanType::URI(uri.try_into()?));
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, a.name.as_str());
    dn.push(DnType::OrganizationalUnitName, a.kind.as_str());
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = if a.kind == Kind::Server {
        vec![ExtendedKeyUsagePurpose::ServerAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    validity(&mut params, a.days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = (a.dir.join(format!("{}.pem", a.name)), a.dir.join(format!("{}-key.pem", a.name)));
    write(&cert_path, &cert.pem(), false)?;
    write(&key_path, &key.serialize_pem(), true)?;
    println(&format!(
        "{} certificate for {:?} written to {} (key {})",
        a.kind.as_str(),
        id.uris(),
        cert_path.display(),
        key_path.display()
    ))?;
    Ok(())
}
