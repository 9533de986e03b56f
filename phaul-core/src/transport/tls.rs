//! TLS 1.3 with client certificates on every connection phaul opens itself (control, memory, filesystem), with
//! rustls.
//!
//! CRIU writes pages straight into a socket and cannot speak this TLS, and filesystem drivers want a plain
//! descriptor too. So the engine never sees the TLS stream: each connection becomes one end of a socketpair
//! (never a listening loopback port a local user could reach first), and a relay thread carries its bytes through
//! the TLS session on the TCP connection, both ways. Everything above (CRIU's page server, the lazy-pages relay,
//! drivers) keeps working on plain descriptors.
//!
//! The destination accepts only peers whose certificate chains to its configured CA (minus what a CRL revokes),
//! and, with an allow list, whose certificate names one of the allowed names; the source checks that the
//! destination's certificate names the host it connects to (or `--tls-server-name`). Certificate files are read
//! when a listener starts and again whenever they change on disk (see [`TlsFiles::server_config`]), so renewing
//! them needs no restart.

use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use super::{Channel, ChannelName};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {what} {path}: {source}; check --tls-{what} (or [tls] {what} in phaul.toml)")]
    Read { what: &'static str, path: PathBuf, source: io::Error },
    #[error("the TLS {what} {path} holds no usable {what} ({detail}); it must be PEM")]
    Parse { what: &'static str, path: PathBuf, detail: String },
    #[error("the TLS configuration is unusable: {0}")]
    Config(String),
    #[error("{0:?} is not a name TLS can check a certificate against; pass --tls-server-name NAME")]
    ServerName(String),
    #[error("the TLS handshake with {peer} failed: {detail}")]
    Handshake { peer: String, detail: String },
    #[error("the TLS handshake with {peer} did not finish within {secs} s")]
    HandshakeTimeout { peer: String, secs: u64 },
    #[error(
        "{peer}'s certificate names none of the allowed peers ({allowed}); add its name to --tls-allow or [tls] allow"
    )]
    NotAllowed { peer: String, allowed: String },
    #[error("setting up the TLS relay failed: {0}")]
    Io(#[from] io::Error),
}

/// Where the TLS material is, and who may connect.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This host's certificate chain (PEM), signed by the CA.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that signs every phaul host's certificate (PEM).
    pub ca: PathBuf,
    /// A certificate revocation list of that CA (PEM), optional.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// Destination: the only peer names accepted (DNS names in their certificates); empty: any the CA signed.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// Who is on the other end of a TLS connection, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerIdentity {
    /// SHA-256 of the peer's end-entity certificate, hex: what sessions are bound to.
    pub fingerprint: String,
    /// The allowed name it matched, if an allow list applies.
    pub name: Option<String>,
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = fs::read(path).map_err(|source| TlsError::Read { what: "cert", path: path.into(), source })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Parse { what: "cert", path: path.into(), detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Parse { what: "cert", path: path.into(), detail: "no CERTIFICATE block".into() });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = fs::read(path).map_err(|source| TlsError::Read { what: "key", path: path.into(), source })?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| TlsError::Parse {
        what: "key",
        path: path.into(),
        detail: e.to_string(),
    })
}

fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(path).map_err(|e| match e {
        TlsError::Read { path, source, .. } => TlsError::Read { what: "ca", path, source },
        TlsError::Parse { path, detail, .. } => TlsError::Parse { what: "ca", path, detail },
        e => e,
    })? {
        roots.add(c).map_err(|e| TlsError::Parse { what: "ca", path: path.into(), detail: e.to_string() })?;
    }
    Ok(roots)
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let text = fs::read(path).map_err(|source| TlsError::Read { what: "crl", path: path.into(), source })?;
    CertificateRevocationListDer::pem_slice_iter(&text).collect::<Result<_, _>>().map_err(|e| TlsError::Parse {
        what: "crl",
        path: path.into(),
        detail: e.to_string(),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn mtime(p: &Path) -> Option<SystemTime> {
    fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The configuration built from the files, with the files' modification times it was built from.
type Cached = (Vec<Option<SystemTime>>, Arc<ServerConfig>);

/// A server configuration, rebuilt when one of its files changes.
#[derive(Debug, Default)]
pub struct ServerTls {
    files: TlsFiles,
    cached: Mutex<Option<Cached>>,
}

impl TlsFiles {
    fn stamps(&self) -> Vec<Option<SystemTime>> {
        let mut v = vec![mtime(&self.cert), mtime(&self.key), mtime(&self.ca)];
        v.push(self.crl.as_deref().and_then(mtime));
        v
    }

    /// The destination's configuration: TLS 1.3, a client certificate chaining to the CA required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let roots = Arc::new(read_roots(&self.ca)?);
        let mut b = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider());
        if let Some(crl) = &self.crl {
            b = b.with_crls(read_crls(crl)?);
        }
        let verifier = b.build().map_err(|e| TlsError::Config(e.to_string()))?;
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(read_certs(&self.cert)?, read_key(&self.key)?)
            .map_err(|e| TlsError::Config(format!("the certificate and key do not go together ({e})")))?;
        Ok(Arc::new(cfg))
    }

    /// The source's configuration: TLS 1.3, the destination's certificate checked against the CA, this host's
    /// certificate offered.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let roots = Arc::new(read_roots(&self.ca)?);
        let mut b = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider());
        if let Some(crl) = &self.crl {
            b = b.with_crls(read_crls(crl)?);
        }
        let verifier = b.build().map_err(|e| TlsError::Config(e.to_string()))?;
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(read_certs(&self.cert)?, read_key(&self.key)?)
            .map_err(|e| TlsError::Config(format!("the certificate and key do not go together ({e})")))?;
        Ok(Arc::new(cfg))
    }
}

impl ServerTls {
    pub fn new(files: TlsFiles) -> Result<ServerTls, TlsError> {
        let t = ServerTls { files, cached: Mutex::new(None) };
        t.config()?;
        Ok(t)
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The current configuration: the files are read again when they changed on disk (certificate renewal, a
    /// new CRL), so that the next connection uses them; a broken new file keeps the previous configuration.
    pub fn config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let stamps = self.files.stamps();
        let mut g = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, c)) = g.as_ref() {
            if *s == stamps {
                return Ok(c.clone());
            }
        }
        match self.files.server_config() {
            Ok(c) => {
                if g.is_some() {
                    log::info!("TLS files changed on disk: new connections use them");
                }
                *g = Some((stamps, c.clone()));
                Ok(c)
            }
            Err(e) => match g.as_ref() {
                Some((_, c)) => {
                    log::warn!("{e}; keeping the TLS configuration read before");
                    Ok(c.clone())
                }
                None => Err(e),
            },
        }
    }
}

fn fingerprint(cert: &CertificateDer<'_>) -> String {
    ring::digest::digest(&ring::digest::SHA256, cert.as_ref()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Which allowed name the certificate is valid for (`Ok(None)` without an allow list).
fn check_allowed(cert: &CertificateDer<'_>, allow: &[String], peer: &str) -> Result<Option<String>, TlsError> {
    if allow.is_empty() {
        return Ok(None);
    }
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| TlsError::Handshake {
        peer: peer.into(),
        detail: format!("its certificate cannot be read: {e}"),
    })?;
    for name in allow {
        let Ok(sn) = ServerName::try_from(name.as_str()) else { continue };
        if ee.verify_is_valid_for_subject_name(&sn).is_ok() {
            return Ok(Some(name.clone()));
        }
    }
    Err(TlsError::NotAllowed { peer: peer.into(), allowed: allow.join(", ") })
}

/// The detail of [`TlsError::Handshake`] when the peer closed the connection before finishing.
pub const PEER_CLOSED: &str = "it closed the connection";

/// Runs the handshake on a blocking TCP stream, bounded as a whole by `limit`: a peer trickling its handshake a
/// byte at a time is cut off at the deadline like a silent one (rustls' own `complete_io` would keep reading as
/// long as bytes come).
fn handshake(conn: &mut dyn Tls, tcp: &mut TcpStream, peer: &str, limit: Duration) -> Result<(), TlsError> {
    let deadline = Instant::now() + limit;
    let timeout = || TlsError::HandshakeTimeout { peer: peer.into(), secs: limit.as_secs() };
    let left = || {
        let l = deadline.saturating_duration_since(Instant::now());
        if l.is_zero() {
            None
        } else {
            Some(l)
        }
    };
    let flush = |conn: &mut dyn Tls, tcp: &mut TcpStream| -> Result<(), TlsError> {
        while conn.t_wants_write() {
            tcp.set_write_timeout(Some(left().ok_or_else(timeout)?))?;
            match conn.t_write_tls(tcp) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(timeout())
                }
                Err(e) => return Err(TlsError::Handshake { peer: peer.into(), detail: e.to_string() }),
            }
        }
        Ok(())
    };
    while conn.t_handshaking() {
        flush(conn, tcp)?;
        if !conn.t_handshaking() {
            break;
        }
        tcp.set_read_timeout(Some(left().ok_or_else(timeout)?))?;
        match conn.t_read_tls(tcp) {
            Ok(0) => return Err(TlsError::Handshake { peer: peer.into(), detail: PEER_CLOSED.into() }),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Err(timeout()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(TlsError::Handshake { peer: peer.into(), detail: e.to_string() }),
        }
        if let Err(e) = conn.t_process() {
            // Tell the peer why (the alert rustls queued), then give up.
            let _ = flush(conn, tcp);
            return Err(TlsError::Handshake { peer: peer.into(), detail: e.to_string() });
        }
    }
    // The last flight (the client's Finished) goes out before the relay takes over.
    flush(conn, tcp)?;
    tcp.set_read_timeout(None)?;
    tcp.set_write_timeout(None)?;
    Ok(())
}

/// Destination: the TLS handshake on an accepted connection (client certificate required), then the relay;
/// returns the plain end the engine uses and who the peer is.
pub fn accept(
    mut tcp: TcpStream,
    cfg: Arc<ServerConfig>,
    allow: &[String],
    limit: Duration,
    name: ChannelName,
) -> Result<(Channel, PeerIdentity), TlsError> {
    let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "the peer".into());
    let mut conn = ServerConnection::new(cfg).map_err(|e| TlsError::Config(e.to_string()))?;
    handshake(&mut conn, &mut tcp, &peer, limit)?;
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or_else(|| TlsError::Handshake { peer: peer.clone(), detail: "it presented no certificate".into() })?;
    let allowed = check_allowed(&cert, allow, &peer)?;
    let id = PeerIdentity { fingerprint: fingerprint(&cert), name: allowed };
    let plain = relay(tcp, Box::new(conn), name)?;
    Ok((plain, id))
}

/// Source: the TLS handshake on a connected stream (the destination's certificate checked against `server_name`),
/// then the relay; returns the plain end the engine uses.
pub fn connect(
    mut tcp: TcpStream,
    cfg: Arc<ClientConfig>,
    server_name: &str,
    limit: Duration,
    name: ChannelName,
) -> Result<Channel, TlsError> {
    let sn = ServerName::try_from(server_name.to_string()).map_err(|_| TlsError::ServerName(server_name.into()))?;
    let mut conn = ClientConnection::new(cfg, sn).map_err(|e| TlsError::Config(e.to_string()))?;
    handshake(&mut conn, &mut tcp, server_name, limit)?;
    relay(tcp, Box::new(conn), name)
}

/// What the relay needs of a TLS connection, client or server.
trait Tls: Send {
    fn t_handshaking(&self) -> bool;
    fn t_read_tls(&mut self, r: &mut dyn Read) -> io::Result<usize>;
    fn t_process(&mut self) -> Result<(), rustls::Error>;
    fn t_read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    fn t_write_plain(&mut self, buf: &[u8]) -> io::Result<usize>;
    fn t_wants_write(&self) -> bool;
    fn t_write_tls(&mut self, w: &mut dyn Write) -> io::Result<usize>;
    fn t_close(&mut self);
}

macro_rules! impl_tls {
    ($t:ty) => {
        impl Tls for $t {
            fn t_handshaking(&self) -> bool {
                self.is_handshaking()
            }
            fn t_read_tls(&mut self, mut r: &mut dyn Read) -> io::Result<usize> {
                self.read_tls(&mut r)
            }
            fn t_process(&mut self) -> Result<(), rustls::Error> {
                self.process_new_packets().map(|_| ())
            }
            fn t_read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.reader().read(buf)
            }
            fn t_write_plain(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.writer().write(buf)
            }
            fn t_wants_write(&self) -> bool {
                self.wants_write()
            }
            fn t_write_tls(&mut self, mut w: &mut dyn Write) -> io::Result<usize> {
                self.write_tls(&mut w)
            }
            fn t_close(&mut self) {
                self.send_close_notify()
            }
        }
    };
}

impl_tls!(ServerConnection);
impl_tls!(ClientConnection);

/// Plaintext buffered towards the TLS session at most (then the plain side is not read until it drains).
const MAX_PENDING: usize = 4 << 20;

/// Bytes waiting to go one way through the relay: a buffer and how much of its front is already gone. Taking
/// bytes only moves the offset; the rest moves to the front only when more is added and at least half of the
/// buffer is spent, so every byte is copied at most a bounded number of times (a `Vec::drain` from the front
/// moved all the rest on every partial write, and cost the relay a third of its CPU at full speed).
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    start: usize,
}

impl Pending {
    fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    fn extend(&mut self, more: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.copy_within(self.start.., 0);
            self.buf.truncate(self.buf.len() - self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(more);
    }
}

/// Starts the relay thread between a socketpair end and the TLS session; returns the engine's end.
fn relay(tcp: TcpStream, conn: Box<dyn Tls>, name: ChannelName) -> Result<Channel, TlsError> {
    let (ours, theirs) = crate::sys::stream_pair()?;
    std::thread::Builder::new().name(format!("tls-{}", name.as_str())).spawn(move || {
        if let Err(e) = pump(tcp, conn, theirs) {
            log::debug!("the TLS relay of the {} channel ended: {e}", name.as_str());
        }
    })?;
    Ok(Channel::new(name, ours))
}

fn set_nonblocking(fd: impl AsFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(
        fcntl(std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd()), FcntlArg::F_GETFL).map_err(io::Error::from)?,
    );
    fcntl(std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd()), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))
        .map_err(io::Error::from)?;
    Ok(())
}

/// Moves bytes both ways until either side ends: plaintext from the socketpair into the TLS session, records
/// from the TCP connection out as plaintext. One thread, non-blocking, with backpressure both ways.
fn pump(tcp: TcpStream, mut conn: Box<dyn Tls>, plain: OwnedFd) -> io::Result<()> {
    set_nonblocking(&tcp)?;
    set_nonblocking(&plain)?;
    let mut tcp_r = &tcp;
    let mut tcp_w = &tcp;
    let mut plain_f = fs::File::from(plain);
    let mut buf = vec![0u8; 256 << 10];
    // Plaintext read from the TLS session, not yet written to the socketpair.
    let mut to_plain = Pending::default();
    // Plaintext read from the socketpair, not yet taken by the TLS session.
    let mut to_tls = Pending::default();
    let mut plain_eof = false;
    let mut tls_eof = false;
    let mut closed = false;
    loop {
        // Plaintext the session holds already (records read along with the handshake, or beyond what the last
        // read returned) goes out first: no more bytes may come from the peer to wake the poll for it.
        while !tls_eof && to_plain.len() < MAX_PENDING {
            match conn.t_read_plain(&mut buf) {
                Ok(0) => {
                    tls_eof = true;
                    break;
                }
                Ok(n) => to_plain.extend(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    tls_eof = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        // Hand the session what it takes, then flush what is ready.
        while !to_tls.is_empty() {
            match conn.t_write_plain(to_tls.bytes()) {
                Ok(0) => break,
                Ok(n) => to_tls.consume(n),
                Err(e) => return Err(e),
            }
            if conn.t_wants_write() {
                match conn.t_write_tls(&mut tcp_w) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        if plain_eof && to_tls.is_empty() && !closed {
            conn.t_close();
            closed = true;
        }
        while conn.t_wants_write() {
            match conn.t_write_tls(&mut tcp_w) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        while !to_plain.is_empty() {
            match plain_f.write(to_plain.bytes()) {
                Ok(0) => return Ok(()),
                Ok(n) => to_plain.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if tls_eof && to_plain.is_empty() {
            // The peer closed: the engine sees the end.
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&plain_f),
                nix::sys::socket::Shutdown::Write,
            );
            if plain_eof {
                return Ok(());
            }
        }
        if closed && !conn.t_wants_write() {
            let _ = tcp.shutdown(std::net::Shutdown::Write);
            if tls_eof {
                return Ok(());
            }
        }
        let want_tcp_read = !tls_eof && to_plain.len() < MAX_PENDING;
        let want_plain_read = !plain_eof && to_tls.len() < MAX_PENDING;
        let mut tcp_flags = PollFlags::empty();
        if want_tcp_read {
            tcp_flags |= PollFlags::POLLIN;
        }
        if conn.t_wants_write() || !to_tls.is_empty() {
            tcp_flags |= PollFlags::POLLOUT;
        }
        let mut plain_flags = PollFlags::empty();
        if want_plain_read {
            plain_flags |= PollFlags::POLLIN;
        }
        if !to_plain.is_empty() {
            plain_flags |= PollFlags::POLLOUT;
        }
        if tcp_flags.is_empty() && plain_flags.is_empty() {
            return Ok(());
        }
        {
            let mut fds = [PollFd::new(tcp.as_fd(), tcp_flags), PollFd::new(plain_f.as_fd(), plain_flags)];
            match poll(&mut fds, PollTimeout::from(1000u16)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let tcp_ev = fds[0].revents().unwrap_or(PollFlags::empty());
            let plain_ev = fds[1].revents().unwrap_or(PollFlags::empty());
            if tcp_ev.intersects(PollFlags::POLLERR) || plain_ev.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL) {
                return Ok(());
            }
        }
        if want_tcp_read {
            match conn.t_read_tls(&mut tcp_r) {
                Ok(0) => tls_eof = true,
                Ok(_) => {
                    if let Err(e) = conn.t_process() {
                        let _ = conn.t_write_tls(&mut tcp_w);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => tls_eof = true,
            }
        }
        if want_plain_read {
            match plain_f.read(&mut buf) {
                Ok(0) => plain_eof = true,
                Ok(n) => to_tls.extend(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => plain_eof = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::certs;

    #[test]
    fn pending_keeps_order_across_partial_takes_and_compaction() {
        let mut p = Pending::default();
        let mut expected: Vec<u8> = Vec::new();
        let mut taken: Vec<u8> = Vec::new();
        let mut next = 0u8;
        for step in 0..2000usize {
            let add: Vec<u8> = (0..(step * 7919) % 300)
                .map(|_| {
                    next = next.wrapping_add(1);
                    next
                })
                .collect();
            expected.extend_from_slice(&add);
            p.extend(&add);
            let n = ((step * 104_729) % 400).min(p.len());
            taken.extend_from_slice(&p.bytes()[..n]);
            p.consume(n);
            assert!(p.buf.len() <= 2 * p.len() + 2 * 400 + 300, "the buffer grows without bound: {}", p.buf.len());
        }
        taken.extend_from_slice(p.bytes());
        p.consume(p.len());
        assert!(p.is_empty() && p.buf.is_empty());
        assert_eq!(taken, expected);
    }
    use std::net::TcpListener;

    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().expect("tempdir");
            certs::new_ca(&dir.path().join("ca"), "test CA").expect("ca");
            for h in ["src.example", "dst.example", "other.example"] {
                certs::new_host(
                    &dir.path().join("ca"),
                    h,
                    &["127.0.0.1".parse().expect("ip")],
                    &dir.path().join("hosts"),
                )
                .expect("host");
            }
            Pki { dir }
        }
        fn files(&self, host: &str) -> TlsFiles {
            let d = self.dir.path();
            TlsFiles {
                cert: d.join("hosts").join(format!("{host}.pem")),
                key: d.join("hosts").join(format!("{host}.key")),
                ca: d.join("ca/ca.pem"),
                crl: None,
                allow: Vec::new(),
            }
        }
    }

    /// Runs a handshake between `server` and `client` files; returns both ends (or the two results).
    fn pair(
        server: &TlsFiles,
        client: &TlsFiles,
        name: &str,
    ) -> (Result<(Channel, PeerIdentity), TlsError>, Result<Channel, TlsError>) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let scfg = server.server_config().expect("server config");
        let allow = server.allow.clone();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            accept(s, scfg, &allow, Duration::from_secs(5), ChannelName::Rpc)
        });
        let c = TcpStream::connect(addr).expect("connect");
        let client =
            connect(c, client.client_config().expect("client config"), name, Duration::from_secs(5), ChannelName::Rpc);
        (t.join().expect("server thread"), client)
    }

    #[test]
    fn bytes_cross_intact_both_ways_through_the_relay() {
        let pki = Pki::new();
        let (s, c) = pair(&pki.files("dst.example"), &pki.files("src.example"), "dst.example");
        let (mut s, id) = s.expect("server side");
        let mut c = c.expect("client side");
        assert_eq!(id.fingerprint.len(), 64);
        let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let d2 = data.clone();
        let w = std::thread::spawn(move || {
            c.write_all(&d2).expect("write");
            let mut back = Vec::new();
            c.shutdown_write();
            c.read_to_end(&mut back).expect("read back");
            back
        });
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < data.len() {
            let n = s.read(&mut buf).expect("read");
            assert!(n > 0, "early end after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got == data, "the bytes changed on the way");
        s.write_all(b"thanks").expect("answer");
        s.shutdown_write();
        let back = w.join().expect("writer");
        assert_eq!(back, b"thanks");
    }

    #[test]
    fn a_peer_without_a_certificate_of_the_ca_is_refused() {
        let pki = Pki::new();
        let other = Pki::new();
        let (s, c) = pair(&pki.files("dst.example"), &other.files("src.example"), "dst.example");
        assert!(s.is_err() || c.is_err(), "a stranger got through");
        assert!(matches!(s, Err(TlsError::Handshake { .. })), "{s:?}");
    }

    #[test]
    fn the_source_checks_the_destination_name() {
        let pki = Pki::new();
        let (_s, c) = pair(&pki.files("dst.example"), &pki.files("src.example"), "wrong.example");
        assert!(matches!(c, Err(TlsError::Handshake { .. })), "{c:?}");
    }

    #[test]
    fn the_allow_list_and_the_crl_bite() {
        let pki = Pki::new();
        let mut server = pki.files("dst.example");
        server.allow = vec!["src.example".into()];
        let (s, _c) = pair(&server, &pki.files("other.example"), "dst.example");
        assert!(matches!(s, Err(TlsError::NotAllowed { .. })), "{s:?}");
        let (s, _c) = pair(&server, &pki.files("src.example"), "dst.example");
        assert_eq!(s.expect("allowed").1.name.as_deref(), Some("src.example"));
        let crl = certs::revoke(&pki.dir.path().join("ca"), &pki.files("src.example").cert).expect("revoke");
        server.crl = Some(crl);
        let (s, _c) = pair(&server, &pki.files("src.example"), "dst.example");
        assert!(matches!(s, Err(TlsError::Handshake { .. })), "a revoked certificate got through: {s:?}");
    }
}
