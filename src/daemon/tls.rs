//! NBD over TLS for the daemon (`--tls-cert`, `--tls-key`, `--tls-ca`, `--tls`): the
//! rustls configuration the NBD server's STARTTLS uses, from PEM files.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::daemon::args::{DaemonArgs, TlsMode};

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(certs)
}

/// The NBD server's TLS, or `None` for plain NBD.
pub fn setup(args: &DaemonArgs) -> anyhow::Result<Option<Arc<lazyblk_nbd::Tls>>> {
    let mode = args.tls.unwrap_or(if args.tls_cert.is_some() {
        TlsMode::On
    } else {
        TlsMode::Off
    });
    if mode == TlsMode::Off {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        bail!("--tls on|require needs --tls-cert and --tls-key");
    };
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &args.tls_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca)? {
                roots
                    .add(c)
                    .with_context(|| format!("adding a CA from {}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .context("the client-certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .context("the server certificate and key")?;
    Ok(Some(Arc::new(lazyblk_nbd::Tls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        required: mode == TlsMode::Require,
    })))
}
