//! The pool's credentials, and the connections inside the pool that they protect: gateway ↔ worker links and
//! worker ↔ worker peer connections (mutual TLS 1.3), and the workers' membership datagrams (sealed with an AEAD).
//!
//! A pool has its own certificate authority. Every host of the pool holds a directory with:
//!
//! | file | what |
//! |---|---|
//! | `ca.pem` | the pool CA's certificate: a peer whose certificate it signed is a member |
//! | `node.pem`, `node.key` | this host's certificate (signed by the pool CA) and its private key |
//! | `swim.key` | 32 random bytes (hex) that seal membership datagrams |
//! | `ca.key` | the CA's private key: only on the host that issues credentials for others |
//!
//! [`init`] creates them for a new pool, with a worker's certificate; [`issue`] writes a directory for another host
//! (everything above but `ca.key`), for a worker or for a gateway. What a certificate is for is its name:
//! [`WORKER_NAME`] or [`GATEWAY_NAME`], whatever address the host has. A worker's link port takes any certificate
//! the pool CA signed; its peer port, and the membership, only workers: a gateway's directory holds no `swim.key`,
//! and a gateway's certificate is refused on the peer port. Every connection is to a worker and names the server
//! [`WORKER_NAME`], so no gateway can stand in for one.
//!
//! Without credentials a server keeps its internal ports on loopback addresses (each server's configuration check
//! refuses others), and the connections are plain TCP and plain datagrams.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};
use tokio_util::either::Either;

/// The name a worker's certificate carries, and the server name every connection inside the pool asks for.
pub const WORKER_NAME: &str = "thingport-worker";
/// The name a gateway's certificate carries.
pub const GATEWAY_NAME: &str = "thingport-gateway";

/// What a host's credentials are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    /// A foundation worker: its certificate passes the peer port, and it holds the membership key.
    Worker,
    /// A gateway: it opens links to workers, and can neither join the ring nor read its traffic.
    Gateway,
}
/// ALPN of gateway ↔ worker links.
pub const LINK_ALPN: &[u8] = b"thingport-link";
/// ALPN of worker ↔ worker peer connections.
pub const PEER_ALPN: &[u8] = b"thingport-peer";
/// The files of a worker's credentials directory.
pub const WORKER_FILES: [&str; 4] = ["ca.pem", "node.pem", "node.key", "swim.key"];
/// The files of a gateway's credentials directory.
pub const GATEWAY_FILES: [&str; 3] = ["ca.pem", "node.pem", "node.key"];
/// How long a TLS handshake on an internal connection may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Validity of the CA and node certificates.
const VALID_DAYS: i64 = 10 * 365;

/// A connection inside the pool: plain TCP without credentials, mutual TLS with them.
pub type PoolStream = Either<TcpStream, TlsStream<TcpStream>>;

/// Accepts internal connections from members of the pool only.
#[derive(Clone)]
pub struct Acceptor(TlsAcceptor);

/// Opens internal connections to members of the pool, as a member.
#[derive(Clone)]
pub struct Connector(TlsConnector);

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("pool::Acceptor")
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("pool::Connector")
    }
}

/// This host's credentials, loaded.
#[derive(Clone)]
pub struct Credentials {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// Only in a worker's credentials.
    swim: Option<Arc<SwimKey>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("chain", &self.chain.len()).finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Credentials {
    /// Loads `dir`'s `ca.pem`, `node.pem`, `node.key` and, if it is there, `swim.key`.
    pub fn load(dir: &Path) -> Result<Credentials> {
        let ca = dir.join("ca.pem");
        let mut roots = RootCertStore::empty();
        for der in CertificateDer::pem_file_iter(&ca)
            .with_context(|| format!("reading the pool CA {}", ca.display()))?
        {
            roots.add(der.with_context(|| format!("parsing the pool CA {}", ca.display()))?)?;
        }
        if roots.is_empty() {
            bail!("no certificate in {}", ca.display());
        }
        let chain = crate::https::read_chain(&dir.join("node.pem"))?;
        let key_file = dir.join("node.key");
        let key = PrivateKeyDer::from_pem_file(&key_file)
            .with_context(|| format!("reading {}", key_file.display()))?;
        let swim_file = dir.join("swim.key");
        let swim = match std::fs::read_to_string(&swim_file) {
            Ok(text) => Some(Arc::new(
                SwimKey::from_hex(text.trim())
                    .with_context(|| format!("{}: expected 64 hex digits", swim_file.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", swim_file.display())),
        };
        let credentials = Credentials { roots: Arc::new(roots), chain, key: Arc::new(key), swim };
        // both configurations are built once here, so that a key that does not match its certificate is an error
        // at start
        credentials.acceptor(LINK_ALPN, Member::Gateway)?;
        credentials.connector(LINK_ALPN)?;
        Ok(credentials)
    }

    /// What this host's certificate is for.
    pub fn member(&self) -> Member {
        if names(&self.chain[0]).iter().any(|n| n == WORKER_NAME) {
            Member::Worker
        } else {
            Member::Gateway
        }
    }

    /// Accepts connections that present a certificate the pool CA signed; with `Member::Worker`, only a worker's.
    pub fn acceptor(&self, alpn: &[u8], from: Member) -> Result<Acceptor> {
        let webpki = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .context("building the pool's client verifier")?;
        let verifier: Arc<dyn ClientCertVerifier> = match from {
            Member::Gateway => webpki,
            Member::Worker => Arc::new(WorkersOnly(webpki)),
        };
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("the node certificate and key")?;
        config.alpn_protocols = vec![alpn.to_vec()];
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(Acceptor(TlsAcceptor::from(Arc::new(config))))
    }

    /// Connects to members only, as a member.
    pub fn connector(&self, alpn: &[u8]) -> Result<Connector> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .context("the node certificate and key")?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Connector(TlsConnector::from(Arc::new(config))))
    }

    /// The key that seals membership datagrams (a worker's credentials only).
    pub fn swim(&self) -> Option<Arc<SwimKey>> {
        self.swim.clone()
    }

    /// Exports when this host's pool certificate expires (`thingport_certificate_expiry_timestamp_seconds`,
    /// `cert="pool"`); the recorder must be installed.
    pub fn export_expiry(&self) {
        crate::admin::certificate_expiry("pool", self.chain[0].as_ref());
    }
}

/// The DNS names of a certificate.
fn names(der: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_string()),
            _ => None,
        })
        .collect()
}

/// The pool's client verifier, and then the certificate must be a worker's.
#[derive(Debug)]
struct WorkersOnly(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for WorkersOnly {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        if names(end_entity).iter().any(|n| n == WORKER_NAME) {
            Ok(verified)
        } else {
            Err(rustls::Error::General("not a worker's certificate".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The server side of an internal connection: mutual TLS when `acceptor` is set, bounded by
/// [`HANDSHAKE_TIMEOUT`].
pub async fn accept(acceptor: Option<&Acceptor>, tcp: TcpStream) -> std::io::Result<PoolStream> {
    let _ = tcp.set_nodelay(true);
    let Some(acceptor) = acceptor else { return Ok(Either::Left(tcp)) };
    let tls =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.0.accept(tcp)).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
        })??;
    Ok(Either::Right(TlsStream::Server(tls)))
}

/// The client side of an internal connection to `addr`: mutual TLS when `connector` is set. `timeout` bounds the
/// TCP connect and the handshake together.
pub async fn connect(
    connector: Option<&Connector>,
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<PoolStream> {
    let connecting = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let Some(connector) = connector else { return Ok(Either::Left(tcp)) };
        let name = ServerName::try_from(WORKER_NAME).map_err(std::io::Error::other)?;
        let tls = connector.0.connect(name, tcp).await?;
        Ok(Either::Right(TlsStream::Client(tls)))
    };
    tokio::time::timeout(timeout, connecting).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connecting to {addr} timed out"))
    })?
}

/// Seals and opens membership datagrams: ChaCha20-Poly1305 with a random 96-bit nonce per datagram, sent in
/// front of the ciphertext. A datagram that does not open (forged, altered, from another pool) is dropped. A
/// replayed datagram opens; the membership protocol ignores what it already knows (updates carry incarnation
/// numbers).
pub struct SwimKey {
    key: LessSafeKey,
    random: SystemRandom,
}

impl std::fmt::Debug for SwimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SwimKey")
    }
}

/// What sealing adds to a datagram: the nonce and the tag.
pub const SWIM_OVERHEAD: usize = NONCE_LEN + 16;
const SWIM_AAD: &[u8] = b"thingport swim 1";

impl SwimKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> SwimKey {
        let key = UnboundKey::new(&CHACHA20_POLY1305, bytes)
            .unwrap_or_else(|_| unreachable!("a ChaCha20-Poly1305 key is 32 bytes"));
        SwimKey { key: LessSafeKey::new(key), random: SystemRandom::new() }
    }

    fn from_hex(text: &str) -> Result<SwimKey> {
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("not 64 hex digits");
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)?;
        }
        Ok(SwimKey::from_bytes(&bytes))
    }

    /// `plain` sealed: nonce, ciphertext, tag.
    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).map_err(|_| anyhow::anyhow!("no randomness"))?;
        let mut out = Vec::with_capacity(plain.len() + SWIM_OVERHEAD);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(SWIM_AAD),
                &mut out[NONCE_LEN..],
            )
            .map_err(|_| anyhow::anyhow!("sealing failed"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// The plaintext of a sealed datagram (opened in place), or `None` if it was not sealed with this key.
    pub fn open<'a>(&self, datagram: &'a mut [u8]) -> Option<&'a [u8]> {
        if datagram.len() < SWIM_OVERHEAD {
            return None;
        }
        let (nonce, sealed) = datagram.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = self.key.open_in_place(nonce, Aad::from(SWIM_AAD), sealed).ok()?;
        Some(plain)
    }
}

/// Creates the credentials of a new pool in `dir`: a CA, this host's certificate and the membership key. Refuses
/// to overwrite a pool that is there.
pub fn init(dir: &Path, host: &str) -> Result<()> {
    if dir.join("ca.pem").exists() {
        bail!(
            "{} already holds a pool (ca.pem); remove it first to make a new pool",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = rcgen::KeyPair::generate().context("generating the CA key")?;
    let ca_params = ca_params(host)?;
    let ca_cert = ca_params.self_signed(&ca_key).context("signing the CA")?;
    write_secret(&dir.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
    write_public(&dir.join("ca.pem"), ca_cert.pem().as_bytes())?;
    let mut swim = [0u8; 32];
    SystemRandom::new().fill(&mut swim).map_err(|_| anyhow::anyhow!("no randomness"))?;
    let hex: String = swim.iter().map(|b| format!("{b:02x}")).collect();
    write_secret(&dir.join("swim.key"), format!("{hex}\n").as_bytes())?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    write_node(dir, host, Member::Worker, &issuer)
}

/// Writes into `out` what another host needs to join the pool whose credentials (with `ca.key`) are in `dir`: a
/// new certificate for `host` as `member`, the CA certificate, and for a worker the membership key.
pub fn issue(dir: &Path, out: &Path, host: &str, member: Member) -> Result<()> {
    let ca_key_file = dir.join("ca.key");
    let ca_key = std::fs::read_to_string(&ca_key_file).with_context(|| {
        format!("reading {} (issue on the host that made the pool)", ca_key_file.display())
    })?;
    let ca_key = rcgen::KeyPair::from_pem(&ca_key).context("parsing ca.key")?;
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).context("reading ca.pem")?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("parsing ca.pem")?;
    if out.join("node.pem").exists() {
        bail!("{} already holds credentials", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_public(&out.join("ca.pem"), ca_pem.as_bytes())?;
    if member == Member::Worker {
        let swim = std::fs::read(dir.join("swim.key")).context("reading swim.key")?;
        write_secret(&out.join("swim.key"), &swim)?;
    }
    write_node(out, host, member, &issuer)
}

fn ca_params(host: &str) -> Result<rcgen::CertificateParams> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, format!("thingport pool CA ({host})"));
    params.distinguished_name = subject;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    validity(&mut params);
    Ok(params)
}

fn write_node(
    dir: &Path,
    host: &str,
    member: Member,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
) -> Result<()> {
    let (name, what) = match member {
        Member::Worker => (WORKER_NAME, "worker"),
        Member::Gateway => (GATEWAY_NAME, "gateway"),
    };
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, format!("thingport pool {what} {host}"));
    params.distinguished_name = subject;
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params);
    let key = rcgen::KeyPair::generate().context("generating the node key")?;
    let cert = params.signed_by(&key, issuer).context("signing the node certificate")?;
    write_secret(&dir.join("node.key"), key.serialize_pem().as_bytes())?;
    write_public(&dir.join("node.pem"), cert.pem().as_bytes())
}

fn validity(params: &mut rcgen::CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    // an hour back for clocks a little behind
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(VALID_DAYS);
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file(path, bytes, 0o600)
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file(path, bytes, 0o644)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "in tests a panic is a failed assertion")]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Serves one connection on a loopback port with `server`; the bytes it read, or the error.
    async fn exchange(
        server: &Credentials,
        from: Member,
        client: Option<&Credentials>,
    ) -> std::io::Result<Vec<u8>> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = server.acceptor(LINK_ALPN, from).unwrap();
        let serving = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut stream = accept(Some(&acceptor), tcp).await?;
            let mut got = vec![0u8; 5];
            stream.read_exact(&mut got).await?;
            Ok::<_, std::io::Error>(got)
        });
        let connector = client.map(|c| c.connector(LINK_ALPN).unwrap());
        if let Ok(mut stream) = connect(connector.as_ref(), addr, HANDSHAKE_TIMEOUT).await {
            let _ = stream.write_all(b"hello").await;
            let _ = stream.flush().await;
            // a refused client certificate shows on the client's first read
            let _ = stream.read(&mut [0u8; 1]).await;
        }
        serving.await.unwrap()
    }

    #[tokio::test]
    async fn members_of_the_pool_talk_and_strangers_get_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let pool = dir.path().join("pool");
        init(&pool, "host-1").unwrap();
        issue(&pool, &dir.path().join("host-2"), "host-2", Member::Worker).unwrap();
        issue(&pool, &dir.path().join("gw"), "gw", Member::Gateway).unwrap();
        let host1 = Credentials::load(&pool).unwrap();
        let host2 = Credentials::load(&dir.path().join("host-2")).unwrap();
        let gateway = Credentials::load(&dir.path().join("gw")).unwrap();
        assert_eq!((host1.member(), gateway.member()), (Member::Worker, Member::Gateway));
        assert!(gateway.swim().is_none(), "a gateway holds no membership key");
        assert!(!dir.path().join("gw/swim.key").exists());
        assert_eq!(exchange(&host1, Member::Worker, Some(&host2)).await.unwrap(), b"hello");
        assert_eq!(exchange(&host2, Member::Worker, Some(&host1)).await.unwrap(), b"hello");
        // a gateway links to a worker, and is refused where only workers are let in
        assert_eq!(exchange(&host1, Member::Gateway, Some(&gateway)).await.unwrap(), b"hello");
        assert!(exchange(&host1, Member::Worker, Some(&gateway)).await.is_err());
        // no connection is to a gateway: its certificate does not name a worker
        assert!(exchange(&gateway, Member::Gateway, Some(&host1)).await.is_err());

        // another pool's member, and a client with no certificate or no TLS at all, are refused
        let other = dir.path().join("other");
        init(&other, "host-9").unwrap();
        let stranger = Credentials::load(&other).unwrap();
        assert!(exchange(&host1, Member::Gateway, Some(&stranger)).await.is_err());
        assert!(exchange(&host1, Member::Gateway, None).await.is_err());
        // one that trusts the pool's CA but holds another pool's certificate is refused by the server
        let impostor = Credentials { roots: host1.roots.clone(), ..stranger.clone() };
        assert!(exchange(&host1, Member::Gateway, Some(&impostor)).await.is_err());
    }

    #[test]
    fn a_datagram_opens_only_with_the_key_that_sealed_it_and_unaltered() {
        let ours = SwimKey::from_bytes(&[7; 32]);
        let theirs = SwimKey::from_bytes(&[8; 32]);
        let sealed = ours.seal(b"member w2 is alive").unwrap();
        assert_eq!(sealed.len(), 18 + SWIM_OVERHEAD);
        assert_eq!(ours.open(&mut sealed.clone()), Some(&b"member w2 is alive"[..]));
        assert_eq!(theirs.open(&mut sealed.clone()), None);
        let mut altered = sealed.clone();
        altered[NONCE_LEN + 3] ^= 1;
        assert_eq!(ours.open(&mut altered), None);
        assert_eq!(ours.open(&mut [0u8; 10]), None);
        assert_ne!(ours.seal(b"member w2 is alive").unwrap(), sealed, "a new nonce each time");
    }

    #[test]
    fn init_does_not_overwrite_a_pool_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "host-1").unwrap();
        assert!(init(dir.path(), "host-1").is_err());
        use std::os::unix::fs::PermissionsExt;
        for secret in ["ca.key", "node.key", "swim.key"] {
            let mode = std::fs::metadata(dir.path().join(secret)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{secret} is readable by others");
        }
        assert!(
            issue(dir.path(), dir.path(), "again", Member::Worker).is_err(),
            "issue refuses to overwrite"
        );
    }
}
