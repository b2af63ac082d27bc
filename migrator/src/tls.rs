//! Host identities and mutual TLS between tether hosts.
//!
//! `tether certs` keeps a CA in its output directory and issues each host two certificates with
//! separate usages, both naming the host (DNS name and common name):
//!
//! | file | what |
//! |---|---|
//! | `ca.pem` | the trust bundle: the current CA first, then the previous one during a CA rotation |
//! | `ca.key` | the current CA's key (only in the CA directory; mode 0600) |
//! | `NAME/ca.pem` | a copy of the trust bundle |
//! | `NAME/server.pem`, `NAME/server.key` | server certificate (TLS server use only): `tether agent` |
//! | `NAME/client.pem`, `NAME/client.key` | client certificate (TLS client use only): `tether migrate` |
//!
//! The agent accepts only clients whose client certificate chains to a CA of the bundle; the
//! source accepts only an agent whose server certificate chains to one and carries the agent's
//! name. rustls' WebPKI verifiers check the extended key usage, so a server certificate cannot
//! be presented as a client and vice versa. Host certificates are valid for a bounded time
//! (default [`DEFAULT_DAYS`] days); running `tether certs` again reissues them (rotation), and a
//! CA rotation ([`CertOptions::new_ca`], then [`CertOptions::drop_old_ca`]) is the way to revoke.
//! Private key files must not be readable or writable by group or others: loading refuses them.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN of the migration protocol.
pub const ALPN: &[u8] = b"tether-migrate/1";

/// The trust bundle, in the CA directory and in every host directory.
pub const CA_BUNDLE: &str = "ca.pem";
/// The CA's private key, in the CA directory.
pub const CA_KEY: &str = "ca.key";
/// A host's server certificate (the agent's).
pub const SERVER_CERT: &str = "server.pem";
/// Its private key.
pub const SERVER_KEY: &str = "server.key";
/// A host's client certificate (the source's).
pub const CLIENT_CERT: &str = "client.pem";
/// Its private key.
pub const CLIENT_KEY: &str = "client.key";

/// Default validity of host certificates, days.
pub const DEFAULT_DAYS: u32 = 90;
/// Default validity of a new CA, days (five years).
pub const DEFAULT_CA_DAYS: u32 = 1826;
/// Host certificates start to be valid this long before they are issued, so that a host whose
/// clock is a little behind accepts them at once.
const BACKDATE: time::Duration = time::Duration::hours(1);

/// Errors about certificates and keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The certificate directory does not exist.
    #[error("certificate directory {0} does not exist (create one with `tether certs`)")]
    NoDirectory(PathBuf),
    /// The directory holds certificates in the layout of an older `tether certs`.
    #[error(
        "{0} holds certificates of an older `tether certs` (cert.pem and key.pem, server and \
         client use in one certificate): issue new ones with `tether certs --out <CA directory> \
         --name <this host>`"
    )]
    OldLayout(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A private key file is open to group or others.
    #[error(
        "{path}: private key file has mode {mode:04o}, readable or writable by group or \
         others; refusing to use it: run `chmod 600 {path}`"
    )]
    KeyMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file holds no usable PEM item.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Generating a certificate failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// The CA directory is not in a state this request can proceed from.
    #[error("{0}")]
    Ca(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The agents file is not usable.
    #[error("{path}: {what}")]
    Agents {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A host name is not usable.
    #[error("invalid host name `{0}`: use letters, digits, '-' and '.' (not an IP address)")]
    BadName(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `name` can be a host's certificate name (a DNS name, not an IP address).
pub fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !name.starts_with(['-', '.'])
        && name.parse::<std::net::IpAddr>().is_err()
}

/// Replaces `path` with `contents`, with mode `mode` whatever the file had before: written to a
/// fresh file beside it, then renamed over it.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(&tmp))?;
    f.write_all(contents).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Creates `dir` and its missing parents mode 0700 (an existing one keeps its mode): they hold
/// private keys.
fn private_dirs(dir: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    write_file(path, contents.as_bytes(), 0o600)
}

fn write_public(path: &Path, contents: &str) -> Result<(), TlsError> {
    write_file(path, contents.as_bytes(), 0o644)
}

/// Reads a private key file, refusing one that group or others may read or write.
fn read_private(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    let mode = f.metadata().map_err(io_err(path))?.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(io_err(path))?;
    Ok(data)
}

/// What `tether certs` does besides issuing host certificates.
#[derive(Debug, Clone)]
pub struct CertOptions {
    /// Validity of the host certificates issued, days.
    pub days: u32,
    /// Validity of a new CA, days.
    pub ca_days: u32,
    /// Start a new CA: it signs from now on, and the bundle trusts it and (unless
    /// `drop_old_ca`) the CA it replaces.
    pub new_ca: bool,
    /// Trust only the current CA: the previous one leaves every bundle.
    pub drop_old_ca: bool,
}

impl Default for CertOptions {
    fn default() -> Self {
        CertOptions {
            days: DEFAULT_DAYS,
            ca_days: DEFAULT_CA_DAYS,
            new_ca: false,
            drop_old_ca: false,
        }
    }
}

/// What [`issue`] did.
#[derive(Debug, Default)]
pub struct Issued {
    /// Host directories whose certificates were (re)issued.
    pub issued: Vec<PathBuf>,
    /// Other host directories whose trust bundle was brought up to date.
    pub refreshed: Vec<PathBuf>,
    /// How many CAs the trust bundle now holds (2 while a CA rotation is in progress).
    pub trusted_cas: usize,
    /// Whether a new CA was made.
    pub new_ca: bool,
}

fn now() -> Result<time::OffsetDateTime, TlsError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| TlsError::Ca(format!("the clock is before 1970: {e}")))?
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
        .map_err(|e| TlsError::Ca(format!("the clock is out of range: {e}")))
}

/// The CA's parameters. Its name carries a digest of its key, so that successive CAs have
/// distinct names; `legacy` gives the name of CAs made by older versions.
fn ca_params(key: &KeyPair, legacy: bool) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let cn = if legacy {
        "tether development CA".to_string()
    } else {
        format!(
            "tether CA {:016x}",
            xxhash_rust::xxh3::xxh3_64(&key.public_key_der())
        )
    };
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

/// Whether two certificates have the same subject and key: one can stand for the other as the
/// issuer of certificates.
fn same_issuer(a: &CertificateDer<'_>, b: &CertificateDer<'_>) -> bool {
    match (
        webpki::anchor_from_trusted_cert(a),
        webpki::anchor_from_trusted_cert(b),
    ) {
        (Ok(a), Ok(b)) => {
            a.subject == b.subject && a.subject_public_key_info == b.subject_public_key_info
        }
        _ => false,
    }
}

/// The current CA of `out`, rebuilt from its key to sign with. Its subject and key are checked
/// against the first certificate of the bundle: what it signs chains to that certificate.
fn current_ca(
    out: &Path,
    bundle_first: &CertificateDer<'_>,
) -> Result<(Certificate, KeyPair), TlsError> {
    let key_path = out.join(CA_KEY);
    let key_pem = String::from_utf8(read_private(&key_path)?).map_err(|_| TlsError::Pem {
        path: key_path.clone(),
        what: "not a PEM file".into(),
    })?;
    let key = KeyPair::from_pem(&key_pem)?;
    for legacy in [false, true] {
        let ca = ca_params(&key, legacy)?.self_signed(&key)?;
        if same_issuer(ca.der(), bundle_first) {
            return Ok((ca, key));
        }
    }
    Err(TlsError::Ca(format!(
        "{} does not belong to the first certificate of {}: restore the matching pair, or \
         start a new CA with --new-ca",
        key_path.display(),
        out.join(CA_BUNDLE).display()
    )))
}

fn host_params(
    name: &str,
    usage: ExtendedKeyUsagePurpose,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(vec![name.to_string()])?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.not_before = not_before;
    p.not_after = not_after;
    Ok(p)
}

/// The certificates of a PEM bundle as text, in order.
fn pem_blocks(text: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(b) = rest.find(BEGIN) {
        let Some(e) = rest[b..].find(END) else { break };
        let end = b + e + END.len();
        out.push(format!("{}\n", &rest[b..end]));
        rest = &rest[end..];
    }
    out
}

/// The trust bundle of `out`: its certificates and their PEM text (current CA first).
fn read_bundle(out: &Path) -> Result<Vec<(CertificateDer<'static>, String)>, TlsError> {
    let path = out.join(CA_BUNDLE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    let ders = certs_from(&path, text.as_bytes())?;
    let blocks = pem_blocks(&text);
    if blocks.len() != ders.len() {
        return Err(TlsError::Pem {
            path,
            what: "holds something besides certificates".into(),
        });
    }
    Ok(ders.into_iter().zip(blocks).collect())
}

/// Host directories under `out`: those holding a server or client certificate.
fn host_dirs(out: &Path) -> Result<Vec<PathBuf>, TlsError> {
    let mut dirs = Vec::new();
    for e in fs::read_dir(out).map_err(io_err(out))? {
        let p = e.map_err(io_err(out))?.path();
        if p.is_dir() && (p.join(SERVER_CERT).exists() || p.join(CLIENT_CERT).exists()) {
            dirs.push(p);
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Creates (or reuses) a CA in `out` and issues certificates for each name into `out/<name>/`
/// with the default validity. See [`issue`].
pub fn generate(out: &Path, names: &[String]) -> Result<Vec<PathBuf>, TlsError> {
    Ok(issue(out, names, &CertOptions::default())?.issued)
}

/// `tether certs`: keeps the CA in `out` (made on first use, or anew with
/// [`CertOptions::new_ca`]), issues each name a server and a client certificate in
/// `out/<name>/` (replacing any it had: rotation), and writes the trust bundle to `out` and to
/// every host directory under it, named or not.
///
/// A CA rotation: `new_ca` makes a new CA that signs from then on; the bundle holds it and the
/// previous CA, so hosts still holding certificates of the previous one keep working while
/// hosts are reissued. `drop_old_ca` then leaves the new CA alone in the bundle. Only one
/// rotation at a time: `new_ca` while the bundle still holds two CAs is refused unless
/// `drop_old_ca` is given too (which trusts only the new CA at once).
pub fn issue(out: &Path, names: &[String], opts: &CertOptions) -> Result<Issued, TlsError> {
    for n in names {
        if !valid_host_name(n) {
            return Err(TlsError::BadName(n.clone()));
        }
    }
    if opts.days == 0 || opts.ca_days == 0 {
        return Err(TlsError::Ca("a validity must be at least one day".into()));
    }
    private_dirs(out)?;
    let now = now()?;
    let bundle = read_bundle(out)?;
    let bundle_path = out.join(CA_BUNDLE);
    let key_path = out.join(CA_KEY);
    let make_ca = opts.new_ca || bundle.is_empty();
    if make_ca && bundle.len() > 1 && !opts.drop_old_ca {
        return Err(TlsError::Ca(format!(
            "{} already holds two CAs (a CA rotation is in progress): finish it with \
             --drop-old-ca before starting another",
            bundle_path.display()
        )));
    }
    let (ca, ca_key, trusted) = if make_ca {
        if bundle.is_empty() && key_path.exists() {
            return Err(TlsError::Ca(format!(
                "{} exists without {}: remove it or restore the bundle",
                key_path.display(),
                bundle_path.display()
            )));
        }
        let key = KeyPair::generate()?;
        let mut p = ca_params(&key, false)?;
        p.not_before = now - BACKDATE;
        p.not_after = now + time::Duration::days(i64::from(opts.ca_days));
        let ca = p.self_signed(&key)?;
        let mut trusted = vec![ca.pem()];
        if !opts.drop_old_ca {
            trusted.extend(bundle.first().map(|(_, pem)| pem.clone()));
        }
        // The key first: a crash between the two writes leaves a pair that `current_ca` refuses
        // rather than a CA that silently signs nothing the bundle trusts.
        write_private(&key_path, &key.serialize_pem())?;
        (ca, key, trusted)
    } else {
        let (ca, key) = current_ca(out, &bundle[0].0)?;
        let keep = if opts.drop_old_ca { 1 } else { bundle.len() };
        let trusted: Vec<String> = bundle.iter().take(keep).map(|(_, p)| p.clone()).collect();
        (ca, key, trusted)
    };
    let bundle_text = trusted.concat();
    write_public(&bundle_path, &bundle_text)?;
    let not_after = now + time::Duration::days(i64::from(opts.days));
    let mut issued = Vec::new();
    for name in names {
        let dir = out.join(name);
        private_dirs(&dir)?;
        for (usage, cert_file, key_file) in [
            (ExtendedKeyUsagePurpose::ServerAuth, SERVER_CERT, SERVER_KEY),
            (ExtendedKeyUsagePurpose::ClientAuth, CLIENT_CERT, CLIENT_KEY),
        ] {
            let key = KeyPair::generate()?;
            let cert = host_params(name, usage, now - BACKDATE, not_after)?
                .signed_by(&key, &ca, &ca_key)?;
            write_private(&dir.join(key_file), &key.serialize_pem())?;
            write_public(&dir.join(cert_file), &cert.pem())?;
        }
        write_public(&dir.join(CA_BUNDLE), &bundle_text)?;
        issued.push(dir);
    }
    let mut refreshed = Vec::new();
    for dir in host_dirs(out)? {
        if !issued.contains(&dir) {
            write_public(&dir.join(CA_BUNDLE), &bundle_text)?;
            refreshed.push(dir);
        }
    }
    Ok(Issued {
        issued,
        refreshed,
        trusted_cas: trusted.len(),
        new_ca: make_ca,
    })
}

/// A host's identity: its server and client certificates and keys, and the CAs it trusts.
#[derive(Debug)]
pub struct Identity {
    roots: Arc<RootCertStore>,
    server: CertKey,
    client: CertKey,
}

/// A certificate chain and its key.
#[derive(Debug)]
struct CertKey {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl CertKey {
    fn load(dir: &Path, cert: &str, key: &str) -> Result<CertKey, TlsError> {
        use rustls_pki_types::pem::PemObject;
        let chain = certs_in(&dir.join(cert))?;
        let key_path = dir.join(key);
        let key = PrivateKeyDer::from_pem_slice(&read_private(&key_path)?).map_err(|e| {
            TlsError::Pem {
                path: key_path.clone(),
                what: format!("bad private key PEM: {e}"),
            }
        })?;
        Ok(CertKey { chain, key })
    }
}

fn certs_in(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = fs::read(path).map_err(io_err(path))?;
    certs_from(path, &data)
}

/// The certificates in `data`, the text of the PEM file `path`.
fn certs_from(path: &Path, data: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(data)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: format!("bad certificate PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no certificate in file".into(),
        });
    }
    Ok(certs)
}

impl Identity {
    /// Loads a host directory: the trust bundle `ca.pem`, the server certificate and key
    /// (`server.pem`, `server.key`) and the client certificate and key (`client.pem`,
    /// `client.key`). A key file readable or writable by group or others is refused.
    pub fn load(dir: &Path) -> Result<Identity, TlsError> {
        if !dir.is_dir() {
            return Err(TlsError::NoDirectory(dir.to_path_buf()));
        }
        if !dir.join(SERVER_CERT).exists() && dir.join("cert.pem").exists() {
            return Err(TlsError::OldLayout(dir.to_path_buf()));
        }
        let mut roots = RootCertStore::empty();
        for c in certs_in(&dir.join(CA_BUNDLE))? {
            roots.add(c).map_err(|e| TlsError::Pem {
                path: dir.join(CA_BUNDLE),
                what: e.to_string(),
            })?;
        }
        Ok(Identity {
            roots: Arc::new(roots),
            server: CertKey::load(dir, SERVER_CERT, SERVER_KEY)?,
            client: CertKey::load(dir, CLIENT_CERT, CLIENT_KEY)?,
        })
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Server side (agent): TLS 1.3, presents the server certificate; client certificates are
    /// required, checked against the trust bundle and for client use.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Self::provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.server.chain.clone(), self.server.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// Client side (source): presents the client certificate; accepts a server whose
    /// certificate chains to the trust bundle, is for server use, and carries the server name
    /// the connection is opened with (the agent's name: see [`agent_name_for`]).
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Self::provider();
        let verifier =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(self.client.chain.clone(), self.client.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

/// The file in a host's certificate directory that names the agents it migrates to.
pub const AGENTS_FILE: &str = "agents.toml";

/// The certificate name of the agent at `to`, from `agents.toml` in the host directory
/// `certs`: a TOML table mapping `"ADDR:PORT"` or `"ADDR"` to the name, e.g.
/// `"10.78.0.3:7700" = "edge2"`. An entry for the address and port wins over one for the address
/// alone. `None` if the file does not exist or has no entry for `to`.
pub fn agent_name_for(certs: &Path, to: SocketAddr) -> Result<Option<String>, TlsError> {
    let path = certs.join(AGENTS_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let bad = |what: String| TlsError::Agents {
        path: path.clone(),
        what,
    };
    let table: std::collections::BTreeMap<String, String> =
        toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let (mut by_port, mut by_addr) = (None, None);
    for (key, name) in table {
        if !valid_host_name(&name) {
            return Err(bad(format!("`{name}` (for `{key}`) is not a host name")));
        }
        if let Ok(addr) = key.parse::<SocketAddr>() {
            if addr == to {
                by_port = Some(name);
            }
        } else if let Ok(ip) = key.parse::<IpAddr>() {
            if ip == to.ip() {
                by_addr = Some(name);
            }
        } else {
            return Err(bad(format!(
                "`{key}` is neither ADDR:PORT nor ADDR (an IPv6 address with a port is \
                 written [ADDR]:PORT)"
            )));
        }
    }
    Ok(by_port.or(by_addr))
}

/// The first DNS name a (verified) peer certificate carries, for logs.
pub fn peer_name(cert: &CertificateDer<'_>) -> String {
    webpki::EndEntityCert::try_from(cert)
        .ok()
        .and_then(|c| c.valid_dns_names().next().map(str::to_string))
        .unwrap_or_else(|| "unnamed".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::{ServerName, UnixTime};
    use std::time::Duration;

    fn opts() -> CertOptions {
        CertOptions::default()
    }

    /// A TLS handshake in memory between a client (connecting to `name`) and a server; the
    /// first error either side raises.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
        name: &str,
    ) -> Result<(), rustls::Error> {
        let io = |e: std::io::Error| rustls::Error::General(e.to_string());
        let name = ServerName::try_from(name.to_string()).expect("server name");
        let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..20 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).map_err(io)?;
            if !buf.is_empty() {
                s.read_tls(&mut &buf[..]).map_err(io)?;
                s.process_new_packets()?;
            }
            let mut buf = Vec::new();
            s.write_tls(&mut buf).map_err(io)?;
            if !buf.is_empty() {
                c.read_tls(&mut &buf[..]).map_err(io)?;
                c.process_new_packets()?;
            }
            if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() {
                return Ok(());
            }
        }
        Err(rustls::Error::General(
            "the handshake did not finish".into(),
        ))
    }

    /// `from` (as the source) connects to `to`'s server certificate, expecting the name `name`.
    fn connect(from: &Identity, to: &Identity, name: &str) -> Result<(), rustls::Error> {
        handshake(
            from.client_config().expect("client config"),
            to.server_config().expect("server config"),
            name,
        )
    }

    fn is_bad_purpose(e: &rustls::Error) -> bool {
        matches!(
            e,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::InvalidPurpose
                    | rustls::CertificateError::InvalidPurposeContext { .. }
            )
        )
    }

    fn is_unknown_issuer(e: &rustls::Error) -> bool {
        matches!(
            e,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        )
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").mode() & 0o777
    }

    #[test]
    fn generates_loads_and_reuses_the_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dirs = generate(dir.path(), &["src".into(), "dst".into()]).expect("generate");
        assert_eq!(dirs.len(), 2);
        let ca1 = fs::read(dir.path().join(CA_BUNDLE)).expect("ca");
        generate(dir.path(), &["third".into()]).expect("again");
        let ca2 = fs::read(dir.path().join(CA_BUNDLE)).expect("ca");
        assert_eq!(ca1, ca2, "an existing CA is reused");
        let src = Identity::load(&dir.path().join("src")).expect("load src");
        let dst = Identity::load(&dir.path().join("dst")).expect("load dst");
        let third = Identity::load(&dir.path().join("third")).expect("load third");
        connect(&src, &dst, "dst").expect("src to dst");
        connect(&third, &src, "src").expect("a host issued later talks to the first ones");
        let chain = certs_in(&dir.path().join("dst").join(SERVER_CERT)).expect("cert");
        assert_eq!(peer_name(&chain[0]), "dst");
        let chain = certs_in(&dir.path().join("dst").join(CLIENT_CERT)).expect("cert");
        assert_eq!(peer_name(&chain[0]), "dst");
        assert_eq!(
            mode(&dir.path().join("dst")) & 0o777,
            0o700,
            "a new host directory is private"
        );
        for f in [CA_KEY, "dst/server.key", "dst/client.key"] {
            assert_eq!(mode(&dir.path().join(f)), 0o600, "{f}");
        }
    }

    #[test]
    fn the_agent_must_carry_the_expected_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        generate(dir.path(), &["src".into(), "dst".into()]).expect("generate");
        let src = Identity::load(&dir.path().join("src")).expect("load src");
        let dst = Identity::load(&dir.path().join("dst")).expect("load dst");
        let e = connect(&src, &dst, "other").expect_err("dst is not `other`");
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{e:?}"
        );
    }

    #[test]
    fn a_server_certificate_is_no_client_certificate_and_vice_versa() {
        let dir = tempfile::tempdir().expect("tempdir");
        generate(dir.path(), &["src".into(), "dst".into()]).expect("generate");
        let load = |n: &str| Identity::load(&dir.path().join(n)).expect("load");
        let dst = load("dst");
        // The source presents its server certificate as its client certificate.
        let mut src = load("src");
        src.client = CertKey::load(&dir.path().join("src"), SERVER_CERT, SERVER_KEY).expect("k");
        let e = connect(&src, &dst, "dst").expect_err("a server certificate as a client");
        assert!(is_bad_purpose(&e), "{e:?}");
        // The agent presents its client certificate as its server certificate.
        let src = load("src");
        let mut dst = load("dst");
        dst.server = CertKey::load(&dir.path().join("dst"), CLIENT_CERT, CLIENT_KEY).expect("k");
        let e = connect(&src, &dst, "dst").expect_err("a client certificate as a server");
        assert!(is_bad_purpose(&e), "{e:?}");
        // And the verifiers alone say the same.
        let roots = src.roots.clone();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .expect("client verifier");
        let now = UnixTime::now();
        let e = clients
            .verify_client_cert(&load("src").server.chain[0], &[], now)
            .expect_err("server certificate");
        assert!(is_bad_purpose(&e), "{e:?}");
        clients
            .verify_client_cert(&load("src").client.chain[0], &[], now)
            .expect("client certificate");
        let servers = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .expect("server verifier");
        let name = ServerName::try_from("dst").expect("name");
        let e = servers
            .verify_server_cert(&load("dst").client.chain[0], &[], &name, &[], now)
            .expect_err("client certificate");
        assert!(is_bad_purpose(&e), "{e:?}");
        servers
            .verify_server_cert(&load("dst").server.chain[0], &[], &name, &[], now)
            .expect("server certificate");
    }

    #[test]
    fn host_certificates_expire_after_the_days_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        generate(dir.path(), &["dst".into()]).expect("default validity");
        issue(
            dir.path(),
            &["short".into()],
            &CertOptions { days: 10, ..opts() },
        )
        .expect("10 days");
        let roots = Identity::load(&dir.path().join("dst")).expect("load").roots;
        let servers = WebPkiServerVerifier::builder_with_provider(
            roots,
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        let at = |days: u64| {
            UnixTime::since_unix_epoch(Duration::from_secs(
                UnixTime::now().as_secs() + days * 86_400,
            ))
        };
        let check = |host: &str, days: u64| {
            let cert = &load_server_cert(dir.path(), host);
            let name = ServerName::try_from(host.to_string()).expect("name");
            servers.verify_server_cert(cert, &[], &name, &[], at(days))
        };
        check("dst", 89).expect("valid for 90 days");
        let e = check("dst", 91).expect_err("not after 90 days");
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired
                        | rustls::CertificateError::ExpiredContext { .. }
                )
            ),
            "{e:?}"
        );
        check("short", 9).expect("valid for 10 days");
        check("short", 11).expect_err("not after 10 days");
        assert!(matches!(
            issue(
                dir.path(),
                &["x".into()],
                &CertOptions { days: 0, ..opts() }
            ),
            Err(TlsError::Ca(_))
        ));
    }

    fn load_server_cert(out: &Path, host: &str) -> CertificateDer<'static> {
        certs_in(&out.join(host).join(SERVER_CERT))
            .expect("cert")
            .remove(0)
    }

    #[test]
    fn a_ca_rotation_keeps_old_and_new_hosts_talking_until_the_old_ca_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path();
        generate(out, &["a".into(), "b".into(), "revoked".into()]).expect("first CA");
        let load = |n: &str| Identity::load(&out.join(n)).expect("load");
        // 1. A new CA; every host directory trusts both.
        let r = issue(
            out,
            &[],
            &CertOptions {
                new_ca: true,
                ..opts()
            },
        )
        .expect("new CA");
        // The host to revoke, as deployed after step 1: old certificates, both CAs trusted.
        let old_revoked = load("revoked");
        assert!(r.new_ca);
        assert_eq!(r.trusted_cas, 2);
        assert_eq!(r.refreshed.len(), 3, "{:?}", r.refreshed);
        assert_eq!(
            certs_in(&out.join("b").join(CA_BUNDLE)).expect("b").len(),
            2
        );
        // A second rotation before the first is finished is refused.
        let e = issue(
            out,
            &[],
            &CertOptions {
                new_ca: true,
                ..opts()
            },
        )
        .expect_err("busy");
        assert!(e.to_string().contains("--drop-old-ca"), "{e}");
        // 2. Reissue every host but the revoked one, one at a time: a reissued host and one
        // still on the old CA accept each other both ways.
        issue(out, &["a".into()], &opts()).expect("reissue a");
        connect(&load("a"), &load("b"), "b").expect("new a to old b");
        connect(&load("b"), &load("a"), "a").expect("old b to new a");
        issue(out, &["b".into()], &opts()).expect("reissue b");
        connect(&load("a"), &load("b"), "b").expect("new a to new b");
        connect(&old_revoked, &load("b"), "b").expect("revoked still works before the drop");
        // 3. Drop the old CA: the revoked host's certificates are refused from then on.
        let r = issue(
            out,
            &[],
            &CertOptions {
                drop_old_ca: true,
                ..opts()
            },
        )
        .expect("drop");
        assert_eq!(r.trusted_cas, 1);
        assert_eq!(certs_in(&out.join(CA_BUNDLE)).expect("bundle").len(), 1);
        connect(&load("a"), &load("b"), "b").expect("new hosts still talk");
        let e = connect(&old_revoked, &load("b"), "b").expect_err("revoked as source");
        assert!(is_unknown_issuer(&e), "{e:?}");
        let e = connect(&load("a"), &old_revoked, "revoked").expect_err("revoked as agent");
        assert!(is_unknown_issuer(&e), "{e:?}");
        // The new CA keeps signing in later runs.
        issue(out, &["c".into()], &opts()).expect("a new host");
        connect(&load("c"), &load("a"), "a").expect("c to a");
    }

    #[test]
    fn key_files_open_to_others_are_refused_and_rewritten_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        generate(dir.path(), &["src".into()]).expect("generate");
        let key = dir.path().join("src").join(CLIENT_KEY);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).expect("chmod");
        let e = Identity::load(&dir.path().join("src")).expect_err("a group-readable key");
        let msg = e.to_string();
        assert!(msg.contains(&key.display().to_string()), "{msg}");
        assert!(msg.contains("0640"), "{msg}");
        assert!(
            msg.contains(&format!("chmod 600 {}", key.display())),
            "{msg}"
        );
        // Reissuing replaces the key with a private one.
        generate(dir.path(), &["src".into()]).expect("reissue");
        assert_eq!(mode(&key), 0o600);
        Identity::load(&dir.path().join("src")).expect("loads again");
        // The CA's key is checked the same way.
        let ca_key = dir.path().join(CA_KEY);
        fs::set_permissions(&ca_key, fs::Permissions::from_mode(0o604)).expect("chmod");
        let e = generate(dir.path(), &["src".into()]).expect_err("a world-readable CA key");
        assert!(matches!(e, TlsError::KeyMode { mode: 0o604, .. }), "{e}");
    }

    #[test]
    fn a_ca_made_by_an_older_version_keeps_signing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("key");
        let ca = ca_params(&key, true)
            .expect("params")
            .self_signed(&key)
            .expect("CA");
        write_private(&dir.path().join(CA_KEY), &key.serialize_pem()).expect("key");
        write_public(&dir.path().join(CA_BUNDLE), &ca.pem()).expect("bundle");
        generate(dir.path(), &["a".into(), "b".into()]).expect("issue under the old CA");
        let load = |n: &str| Identity::load(&dir.path().join(n)).expect("load");
        connect(&load("a"), &load("b"), "b").expect("a to b");
    }

    #[test]
    fn a_ca_key_that_does_not_match_the_bundle_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = tempfile::tempdir().expect("tempdir");
        generate(dir.path(), &["a".into()]).expect("generate");
        generate(other.path(), &["a".into()]).expect("generate");
        fs::copy(other.path().join(CA_KEY), dir.path().join(CA_KEY)).expect("copy");
        let e = generate(dir.path(), &["b".into()]).expect_err("mismatched pair");
        assert!(e.to_string().contains("does not belong"), "{e}");
    }

    #[test]
    fn the_agent_name_is_looked_up_by_address_and_port_then_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = |a: &str| agent_name_for(dir.path(), a.parse().expect("addr"));
        assert_eq!(at("10.0.0.3:7700").expect("no file"), None);
        let file = dir.path().join(AGENTS_FILE);
        fs::write(
            &file,
            "# the agents this host migrates to\n\
             \"10.0.0.3\" = \"edge-any-port\"\n\
             \"10.0.0.3:7700\" = \"edge3\"\n\
             \"[fd00::1]:7700\" = \"edge6\"\n",
        )
        .expect("write");
        assert_eq!(at("10.0.0.3:7700").expect("read").as_deref(), Some("edge3"));
        assert_eq!(
            at("10.0.0.3:7701").expect("read").as_deref(),
            Some("edge-any-port")
        );
        assert_eq!(
            at("[fd00::1]:7700").expect("read").as_deref(),
            Some("edge6")
        );
        assert_eq!(at("10.0.0.4:7700").expect("read"), None);
        fs::write(&file, "\"edge3:7700\" = \"edge3\"\n").expect("write");
        let e = at("10.0.0.3:7700").expect_err("a key that is no address");
        assert!(e.to_string().contains("`edge3:7700`"), "{e}");
        fs::write(&file, "\"10.0.0.3\" = \"not a name\"\n").expect("write");
        at("10.0.0.3:7700").expect_err("a value that is no host name");
        fs::write(&file, "\"10.0.0.3\" = [1]\n").expect("write");
        let e = at("10.0.0.3:7700").expect_err("not a table of names");
        assert!(e.to_string().contains(AGENTS_FILE), "{e}");
    }

    #[test]
    fn missing_directory_old_layout_and_bad_names_are_clear_errors() {
        let err = Identity::load(Path::new("/nonexistent/tether")).expect_err("must fail");
        assert!(err.to_string().contains("does not exist"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            generate(dir.path(), &["../evil".into()]),
            Err(TlsError::BadName(_))
        ));
        assert!(matches!(
            generate(dir.path(), &["10.0.0.1".into()]),
            Err(TlsError::BadName(_))
        ));
        fs::write(dir.path().join("cert.pem"), "").expect("old file");
        let e = Identity::load(dir.path()).expect_err("old layout");
        assert!(matches!(e, TlsError::OldLayout(_)), "{e}");
    }
}
