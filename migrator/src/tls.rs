//! Host identities and mutual TLS between tether hosts.
//!
//! A development CA (`tether certs`) signs one certificate per host. Every host directory holds
//! `ca.pem`, `cert.pem` and `key.pem`. The agent accepts only clients whose certificate chains to
//! the CA; the source accepts only an agent whose certificate chains to the CA, and, when told the
//! agent's name, whose certificate carries that name.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// ALPN of the migration protocol.
pub const ALPN: &[u8] = b"tether-migrate/1";

/// Errors about certificates and keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The certificate directory does not exist.
    #[error("certificate directory {0} does not exist (create one with `tether certs`)")]
    NoDirectory(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
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
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// A host name is not usable.
    #[error("invalid host name `{0}`: use letters, digits, '-' and '.'")]
    BadName(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !name.starts_with(['-', '.'])
}

fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))
}

/// Creates (or reuses) a development CA in `out` and issues one certificate per name into
/// `out/<name>/`. Returns the host directories written.
pub fn generate(out: &Path, names: &[String]) -> Result<Vec<PathBuf>, TlsError> {
    for n in names {
        if !valid_host_name(n) {
            return Err(TlsError::BadName(n.clone()));
        }
    }
    fs::create_dir_all(out).map_err(io_err(out))?;
    let ca_cert_path = out.join("ca.pem");
    let ca_key_path = out.join("ca.key");
    // The CA certificate is re-derived from its key and fixed parameters: the issuer name and key
    // (hence the signatures and key identifier) are those of the ca.pem written the first time,
    // so certificates issued later chain to it.
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "tether development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = if ca_key_path.exists() && ca_cert_path.exists() {
        let key_pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
        KeyPair::from_pem(&key_pem)?
    } else {
        KeyPair::generate()?
    };
    let ca = ca_params.self_signed(&ca_key)?;
    if !ca_key_path.exists() {
        write_private(&ca_key_path, &ca_key.serialize_pem())?;
        fs::write(&ca_cert_path, ca.pem()).map_err(io_err(&ca_cert_path))?;
    }
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
    let mut dirs = Vec::new();
    for name in names {
        let dir = out.join(name);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut params = CertificateParams::new(vec![name.clone()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, name.as_str());
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        write_private(&dir.join("key.pem"), &key.serialize_pem())?;
        fs::write(dir.join("cert.pem"), cert.pem()).map_err(io_err(&dir))?;
        fs::write(dir.join("ca.pem"), &ca_pem).map_err(io_err(&dir))?;
        dirs.push(dir);
    }
    Ok(dirs)
}

/// A host's identity: its certificate and key, and the CA it trusts.
#[derive(Debug)]
pub struct Identity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(io_err(path))
}

fn certs_in(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let data = read_pem(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
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
    /// Loads `ca.pem`, `cert.pem` and `key.pem` from a host directory.
    pub fn load(dir: &Path) -> Result<Identity, TlsError> {
        use rustls_pki_types::pem::PemObject;
        if !dir.is_dir() {
            return Err(TlsError::NoDirectory(dir.to_path_buf()));
        }
        let mut roots = RootCertStore::empty();
        for c in certs_in(&dir.join("ca.pem"))? {
            roots.add(c).map_err(|e| TlsError::Pem {
                path: dir.join("ca.pem"),
                what: e.to_string(),
            })?;
        }
        let chain = certs_in(&dir.join("cert.pem"))?;
        let key_path = dir.join("key.pem");
        let key =
            PrivateKeyDer::from_pem_slice(&read_pem(&key_path)?).map_err(|e| TlsError::Pem {
                path: key_path.clone(),
                what: format!("bad private key PEM: {e}"),
            })?;
        Ok(Identity {
            roots: Arc::new(roots),
            chain,
            key,
        })
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Server side (agent): TLS 1.3, client certificates required and checked against the CA.
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
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// Client side (source): presents this host's certificate; accepts a server whose
    /// certificate chains to the CA and, if `expect_name` is given, names it.
    pub fn client_config(
        &self,
        expect_name: Option<&str>,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Self::provider();
        let inner =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let verifier = Arc::new(CaVerifier {
            inner,
            name_required: expect_name.is_some(),
        });
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

/// The server name the source asks for when no agent name is given.
pub const ANY_AGENT: &str = "tether-agent";

/// WebPKI verification against the project CA. Without an expected name, any host certificate
/// the CA signed is accepted (the CA is private to the cluster); the chain, validity and
/// signatures are always checked.
#[derive(Debug)]
struct CaVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name_required: bool,
}

impl ServerCertVerifier for CaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.name_required => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
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

    #[test]
    fn generates_loads_and_reuses_the_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dirs = generate(dir.path(), &["src".into(), "dst".into()]).expect("generate");
        assert_eq!(dirs.len(), 2);
        let ca1 = fs::read(dir.path().join("ca.pem")).expect("ca");
        generate(dir.path(), &["third".into()]).expect("again");
        let ca2 = fs::read(dir.path().join("ca.pem")).expect("ca");
        assert_eq!(ca1, ca2, "an existing CA is reused");
        let id = Identity::load(&dir.path().join("src")).expect("load");
        id.server_config().expect("server config");
        id.client_config(Some("dst")).expect("client config");
        let chain = certs_in(&dir.path().join("dst/cert.pem")).expect("cert");
        assert_eq!(peer_name(&chain[0]), "dst");
    }

    #[test]
    fn missing_directory_and_bad_names_are_clear_errors() {
        let err = Identity::load(Path::new("/nonexistent/tether")).expect_err("must fail");
        assert!(err.to_string().contains("does not exist"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            generate(dir.path(), &["../evil".into()]),
            Err(TlsError::BadName(_))
        ));
    }
}
