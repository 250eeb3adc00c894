//! TLS for both listeners: certificate loading, hot reload, session tickets, optional client certificates, and
//! self-signed certificate generation.
//!
//! One [`ReloadableCert`] serves WSS and QUIC alike, so a SIGHUP swaps the certificate for both; sessions already
//! established keep theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config;

/// The crypto provider of every TLS endpoint: ring (small, cross-builds simply).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server certificate, replaceable while running.
#[derive(Debug)]
pub struct ReloadableCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

impl ReloadableCert {
    /// Loads the certificate chain and key, checking that they belong together.
    pub fn load(cert: &Path, key: &Path) -> Result<Self> {
        let current = load_certified_key(cert, key)?;
        Ok(ReloadableCert {
            cert: cert.into(),
            key: key.into(),
            current: ArcSwap::from_pointee(current),
        })
    }

    /// Loads the files again. On any error the certificate in use stays, and the error is returned.
    pub fn reload(&self) -> Result<()> {
        let fresh = load_certified_key(&self.cert, &self.key)?;
        self.current.store(Arc::new(fresh));
        Ok(())
    }

    /// DER of the leaf certificate in use.
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.current.load().cert[0].clone()
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey> {
    let chain = thingport_shell::https::read_chain(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading private key {}", key.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .with_context(|| format!("unsupported private key in {}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .with_context(|| format!("{} does not belong to {}", key.display(), cert.display()))?;
    Ok(certified)
}

/// TLS server configurations for WSS (ALPN `http/1.1`) and QUIC (ALPN `thingport/1`), sharing one certificate.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: Arc<ReloadableCert>,
    pub wss: Arc<ServerConfig>,
    pub quic: Arc<ServerConfig>,
}

impl ServerTls {
    pub fn new(tls: &config::Tls) -> Result<Self> {
        let cert = Arc::new(ReloadableCert::load(&tls.cert, &tls.key)?);
        let verifier = match &tls.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for der in CertificateDer::pem_file_iter(ca)
                    .with_context(|| format!("reading client CA {}", ca.display()))?
                {
                    roots
                        .add(der.with_context(|| format!("parsing client CA {}", ca.display()))?)?;
                }
                let builder =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                let builder =
                    if tls.require_client_cert { builder } else { builder.allow_unauthenticated() };
                Some(builder.build().context("building the client certificate verifier")?)
            }
            None => None,
        };
        let build = |versions: &[&'static rustls::SupportedProtocolVersion],
                     alpn: &[u8]|
         -> Result<ServerConfig> {
            let builder =
                ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
            let builder = match &verifier {
                Some(v) => builder.with_client_cert_verifier(v.clone()),
                None => builder.with_no_client_auth(),
            };
            let mut config = builder.with_cert_resolver(cert.clone());
            config.alpn_protocols = vec![alpn.to_vec()];
            // resumption after a reconnect storm costs no certificate signature
            config.ticketer = rustls::crypto::ring::Ticketer::new()?;
            config.send_tls13_tickets = 1;
            Ok(config)
        };
        let wss_versions: &[&'static rustls::SupportedProtocolVersion] = if tls.allow_tls12 {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let wss = build(wss_versions, b"http/1.1")?;
        let mut quic = build(&[&rustls::version::TLS13], thingport_protocol::QUIC_ALPN)?;
        quic.max_early_data_size = 0;
        Ok(ServerTls { cert, wss: Arc::new(wss), quic: Arc::new(quic) })
    }
}

/// A self-signed ECDSA P-256 certificate for `names` (DNS names or IP addresses), as PEM (certificate, key).
pub fn self_signed(names: &[String]) -> Result<(String, String)> {
    let mut params = rcgen::CertificateParams::new(names.to_vec()).context("certificate names")?;
    let mut subject = rcgen::DistinguishedName::new();
    let first = names.first().map_or("localhost", String::as_str);
    subject.push(rcgen::DnType::CommonName, format!("thingport gateway {first}"));
    subject.push(rcgen::DnType::OrganizationName, "thingport (self-signed)");
    params.distinguished_name = subject;
    let now = time::OffsetDateTime::now_utc();
    // an hour back for clocks a little behind; replace it (or renew it) within the validity
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(SELF_SIGNED_DAYS);
    let key = rcgen::KeyPair::generate().context("generating the key")?;
    let cert = params.self_signed(&key).context("generating the certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// How long a certificate from [`self_signed`] is valid: three years.
pub const SELF_SIGNED_DAYS: i64 = 3 * 365;

/// Names a client certificate gives its holder: DNS subject alternative names, then the subject common name.
pub fn client_cert_names(der: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_string());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            names.push(cn.to_string());
        }
    }
    names
}
