//! TLS for both sides of the proxy (rustls, ring): the listener's
//! certificate, swappable without a restart, and the client configuration for
//! `https://` upstreams (system roots or a configured CA bundle).
//!
//! The listener resolves its certificate per handshake from an `ArcSwap`, so
//! a reload changes what new connections get and never touches open ones.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::InconsistentKeys;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate, key or CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("the private key in {path} is not usable: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the certificate in {path} cannot be read: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain and private key into a signing key, and
/// checks that the key is the one the leaf certificate was issued for: with
/// another key every handshake would fail, and nothing would say why.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let file_error = |what, path: &Path, e: &dyn fmt::Display| TlsError::File {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_error("certificate file", cert, &pem_problem(&e, "certificate")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error("certificate file", cert, &pem_problem(&e, "certificate")))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    // Never echo the key file's content in an error: only its path.
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| file_error("private key file", key, &pem_problem(&e, "private key")))?;
    let signing = provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| TlsError::Key {
            path: key.to_owned(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            })
        }
        // A signing key that cannot tell its public key cannot be compared
        // (ring's keys all can); the handshake is the judge then.
        Err(rustls::Error::InconsistentKeys(_)) => Ok(certified),
        // The leaf is PEM but not a certificate webpki can parse.
        Err(e) => Err(TlsError::Certificate {
            path: cert.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// What is wrong with a PEM file, in words: the crate's own messages show a
/// section's label as bytes (`missing section end marker: [67, 69, ...]`)
/// or say `no items found`. `wanted` is what the file should hold. Nothing
/// of the file's content is repeated (a key file's is a secret).
fn pem_problem(error: &pem::Error, wanted: &str) -> String {
    match error {
        pem::Error::MissingSectionEnd { end_marker } => {
            let label = String::from_utf8_lossy(end_marker);
            format!(
                "the file ends inside its {label} section, before the `-----END {label}-----` \
                 line: cut short, or still being written"
            )
        }
        pem::Error::IllegalSectionStart { .. } => {
            "a `-----BEGIN ` line does not end with `-----`".into()
        }
        pem::Error::Base64Decode(_) => {
            "the base64 text between a section's BEGIN and END lines is damaged".into()
        }
        pem::Error::NoItemsFound => {
            format!("it holds no {wanted}: no `-----BEGIN ...-----` section of one")
        }
        pem::Error::Io(e) => e.to_string(),
        other => other.to_string(),
    }
}

/// The listener's current certificate; `replace` swaps it for new handshakes.
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    pub fn new(key: CertifiedKey) -> Arc<CertResolver> {
        Arc::new(CertResolver {
            current: ArcSwap::from_pointee(key),
        })
    }

    pub fn replace(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }

    /// The certificate new handshakes get now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertResolver")
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Server configuration with ALPN `h2` then `http/1.1`.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Client configuration for `https://` upstreams: the CA bundle at
/// `ca_file` if given, else the system's roots.
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| TlsError::File {
                what: "CA file",
                path: path.to_owned(),
                reason: pem_problem(&e, "certificate"),
            })? {
                let cert = cert.map_err(|e| TlsError::File {
                    what: "CA file",
                    path: path.to_owned(),
                    reason: pem_problem(&e, "certificate"),
                })?;
                roots.add(cert)?;
            }
            if roots.is_empty() {
                return Err(TlsError::NoCertificate {
                    path: path.to_owned(),
                });
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for error in &native.errors {
                tracing::warn!(%error, "could not load some system root certificates");
            }
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                tracing::warn!("no system root certificates found: https upstreams will fail");
            }
        }
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `localhost` and its key, as PEM files.
    fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn a_certificate_loads_with_its_own_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(dir.path(), "a");
        load_certified_key(&cert, &key).expect("matching pair");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = pair(dir.path(), "a");
        let (_, other_key) = pair(dir.path(), "b");
        let error = load_certified_key(&cert, &other_key).expect_err("mismatched pair");
        assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains(&*cert.to_string_lossy())
                && message.contains(&*other_key.to_string_lossy())
                && message.contains("does not belong"),
            "{message}"
        );
    }
}
