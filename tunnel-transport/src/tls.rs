//! TLS for `wss://` (feature `tls`): rustls with the ring provider.
//!
//! ```no_run
//! use tunnel_transport::{AgentId, ClientConfig, ServerConfig, SharedToken, tls};
//!
//! # fn run() -> Result<(), tls::TlsError> {
//! // Hub: certificate chain and key from PEM files; with a CA file, agents must present
//! // a certificate issued by it whose DNS name is the sync target they claim.
//! let hub = ServerConfig::new(SharedToken::new("t0k3n"))
//!     .tls(Some(tls::server_config("hub.pem", "hub.key", Some("agents-ca.pem".as_ref()))?));
//! // Agent: trust the system roots (or a CA file), optionally with a client certificate.
//! let agent = ClientConfig::new(AgentId::new("root:org", "cluster-1"))
//!     .tls(Some(tls::client_config(None, Some(("cluster-1.pem".as_ref(), "cluster-1.key".as_ref())))?));
//! # Ok(()) }
//! ```

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |reason: String| TlsError::Pem {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no certificate in the file".into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// A hub's TLS configuration: its certificate chain and key (PEM files); with
/// `client_ca`, agents must present a certificate issued by that CA, and the hub checks
/// that it names (as a DNS subject alternative name) the sync target the agent claims.
pub fn server_config(
    cert: impl AsRef<Path>,
    key_file: impl AsRef<Path>,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_single_cert(
        certs(cert.as_ref())?,
        key(key_file.as_ref())?,
    )?))
}

/// An agent's TLS configuration: trust `ca` (a PEM file) or, without one, the system's
/// root certificates; with `client_cert` (certificate chain and key PEM files), present
/// it for mutual TLS.
pub fn client_config(
    ca: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = match ca {
        Some(ca) => roots(ca)?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A system store may hold certificates rustls cannot use: skip them.
                let _ = roots.add(cert);
            }
            roots
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match client_cert {
        Some((cert, key_file)) => builder.with_client_auth_cert(certs(cert)?, key(key_file)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Whether the client certificate `cert` names `sync_target` (as a DNS subject
/// alternative name). The chain itself was verified during the TLS handshake.
pub(crate) fn certificate_names(cert: &CertificateDer<'_>, sync_target: &str) -> bool {
    let Ok(name) = ServerName::try_from(sync_target) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .and_then(|cert| cert.verify_is_valid_for_subject_name(&name))
        .is_ok()
}
