//! The three connections between source and destination: control (`rpc`), memory pages and images (`mem`) and
//! filesystem data (`fs`). They are either handed in as descriptors by a caller (`--fdrpc/--fdmem/--fdfs`) or
//! opened by phaul itself over TCP (`phaul serve --listen`, `phaul migrate --to`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

use crate::sys::{self, FdError};

pub mod certs;
pub mod tls;

/// Which channel a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelName {
    Rpc,
    Mem,
    Fs,
}

impl ChannelName {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelName::Rpc => "control",
            ChannelName::Mem => "memory",
            ChannelName::Fs => "filesystem",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Fd(#[from] FdError),
    #[error(
        "refusing to listen on {addr} without TLS: with --insecure-loopback phaul listens on loopback addresses only; give it certificates (--tls-cert, --tls-key, --tls-ca, or [tls] in phaul.toml; `phaul cert` makes them) to listen on any address"
    )]
    NotLoopback { addr: SocketAddr },
    #[error("refusing to connect to {addr} without TLS: --insecure-loopback reaches loopback addresses only; give phaul certificates (--tls-cert, --tls-key, --tls-ca) to migrate between machines")]
    InsecureRemote { addr: String },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot resolve {addr}: {source}")]
    Resolve { addr: String, source: io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
    #[error("cannot connect the {channel} channel to {addr}: {source}; is `phaul serve --listen {addr}` running?")]
    Connect { channel: &'static str, addr: String, source: io::Error },
    #[error("accepting a connection failed: {0}")]
    Accept(io::Error),
    #[error("setting up the {channel} channel failed: {source}")]
    Setup { channel: &'static str, source: io::Error },
}

/// One connection, counting the bytes that pass through phaul's hands.
#[derive(Debug)]
pub struct Channel {
    name: ChannelName,
    file: File,
    sent: u64,
    received: u64,
}

impl Channel {
    pub fn new(name: ChannelName, fd: OwnedFd) -> Channel {
        Channel { name, file: File::from(fd), sent: 0, received: 0 }
    }

    /// Adopts a descriptor given on the command line after checking it is a connected stream socket.
    pub fn from_raw(name: ChannelName, fd: RawFd, flag: &'static str) -> Result<Channel, TransportError> {
        let fd = sys::adopt_stream_socket(fd, flag)?;
        // Control messages are small and answered at once: do not let Nagle hold them (TCP only).
        sys::tcp_push(&fd).map_err(|source| TransportError::Setup { channel: name.as_str(), source })?;
        Ok(Channel::new(name, fd))
    }

    pub fn from_tcp(name: ChannelName, s: TcpStream) -> Result<Channel, TransportError> {
        s.set_nodelay(true).map_err(|source| TransportError::Setup { channel: name.as_str(), source })?;
        Ok(Channel::new(name, OwnedFd::from(s)))
    }

    /// The same connection under another name (a connection accepted before its first frame said what it is).
    pub fn renamed(mut self, name: ChannelName) -> Channel {
        self.name = name;
        self
    }

    pub fn name(&self) -> ChannelName {
        self.name
    }

    /// Bytes phaul wrote and read on this channel (CRIU's page traffic bypasses phaul and is not counted here).
    pub fn counters(&self) -> (u64, u64) {
        (self.sent, self.received)
    }

    /// Bounds every read: a peer silent for longer is treated as gone.
    pub fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        let tv = TimeVal::new(t.as_secs() as i64, t.subsec_micros() as i64);
        setsockopt(&self.file, sockopt::ReceiveTimeout, &tv).map_err(io::Error::from)
    }

    /// A duplicate of the descriptor, for handing to CRIU or a driver.
    pub fn dup_fd(&self) -> io::Result<OwnedFd> {
        sys::dup(&self.file)
    }

    /// Another handle on the same connection (its own byte counters), for a reader thread.
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(Channel::new(self.name, self.dup_fd()?))
    }

    /// Ends the writing half (the peer reads an end), keeping the reading half.
    pub fn shutdown_write(&self) {
        let _ = nix::sys::socket::shutdown(self.file.as_raw_fd(), nix::sys::socket::Shutdown::Write);
    }

    /// Shuts the connection down for both sides of it, whoever else holds it (CRIU, a reader thread): their
    /// reads end and their writes fail at once.
    pub fn shutdown(&self) {
        let _ = nix::sys::socket::shutdown(self.file.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }

    /// On a TCP connection, notices a dead peer or a cut link within about `secs` seconds even while data is
    /// unacknowledged (TCP_USER_TIMEOUT) or the line is idle (keepalive probes); otherwise nothing.
    pub fn set_liveness(&self, secs: u32) -> io::Result<()> {
        sys::tcp_liveness(&self.file, secs)
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.received += n as u64;
        Ok(n)
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.sent += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Opens a TCP connection to `addr` (each address it resolves to in turn).
pub fn connect_tcp(addr: &str, channel: ChannelName, timeout: Duration) -> Result<TcpStream, TransportError> {
    let addrs: Vec<SocketAddr> =
        addr.to_socket_addrs().map_err(|source| TransportError::Resolve { addr: addr.to_string(), source })?.collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(TransportError::Connect { channel: channel.as_str(), addr: addr.to_string(), source: last })
}

/// Connects to a `phaul serve --listen --insecure-loopback` address (no TLS).
pub fn connect(addr: &str, channel: ChannelName, timeout: Duration) -> Result<Channel, TransportError> {
    Channel::from_tcp(channel, connect_tcp(addr, channel, timeout)?)
}

/// How phaul opens its own connections to a destination.
#[derive(Clone)]
pub enum Dialer {
    /// Plain TCP to a loopback address (`--insecure-loopback`).
    Insecure,
    /// TLS 1.3 with this host's certificate; the destination's is checked against `server_name`.
    Tls { config: std::sync::Arc<rustls::ClientConfig>, server_name: String },
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dialer::Insecure => f.write_str("Insecure"),
            Dialer::Tls { server_name, .. } => write!(f, "Tls({server_name})"),
        }
    }
}

/// The host part of `HOST:PORT` (brackets of an IPv6 address removed): what the destination's certificate must
/// name unless `--tls-server-name` says otherwise.
pub fn host_of(addr: &str) -> String {
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']').to_string()
}

impl Dialer {
    /// Opens one channel: TCP (noticing a dead peer within about `link_timeout` seconds), then TLS unless
    /// insecure.
    pub fn dial(
        &self,
        addr: &str,
        name: ChannelName,
        timeout: Duration,
        link_timeout: u32,
    ) -> Result<Channel, TransportError> {
        let tcp = connect_tcp(addr, name, timeout)?;
        tcp.set_nodelay(true).map_err(|source| TransportError::Setup { channel: name.as_str(), source })?;
        sys::tcp_liveness(&tcp, link_timeout)
            .map_err(|source| TransportError::Setup { channel: name.as_str(), source })?;
        match self {
            Dialer::Insecure => {
                if !tcp.peer_addr().map(|a| a.ip().is_loopback()).unwrap_or(false) {
                    return Err(TransportError::InsecureRemote { addr: addr.to_string() });
                }
                Channel::from_tcp(name, tcp)
            }
            Dialer::Tls { config, server_name } => {
                Ok(tls::connect(tcp, config.clone(), server_name, timeout.max(Duration::from_secs(5)), name)?)
            }
        }
    }
}

/// How `phaul serve --listen` takes connections.
pub enum Acceptance {
    /// Plain TCP, loopback only (`--insecure-loopback`).
    Insecure,
    /// TLS 1.3, a client certificate of the CA required.
    Tls(tls::ServerTls),
}

impl std::fmt::Debug for Acceptance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Acceptance::Insecure => "Insecure",
            Acceptance::Tls(_) => "Tls",
        })
    }
}

impl Acceptance {
    /// Turns an accepted connection into a channel: the TLS handshake (bounded by `handshake`) unless insecure.
    pub fn accept(
        &self,
        tcp: TcpStream,
        handshake: Duration,
        link_timeout: u32,
    ) -> Result<(Channel, Option<tls::PeerIdentity>), TransportError> {
        let _ = tcp.set_nodelay(true);
        let _ = sys::tcp_liveness(&tcp, link_timeout);
        match self {
            Acceptance::Insecure => Ok((Channel::from_tcp(ChannelName::Rpc, tcp)?, None)),
            Acceptance::Tls(t) => {
                let cfg = t.config()?;
                let (ch, id) = tls::accept(tcp, cfg, &t.files().allow, handshake, ChannelName::Rpc)?;
                Ok((ch, Some(id)))
            }
        }
    }
}

/// Listens for sources on `addr`: any address with TLS; without it (`insecure`), loopback only.
pub fn listen(addr: &str, insecure: bool) -> Result<TcpListener, TransportError> {
    let addrs: Vec<SocketAddr> =
        addr.to_socket_addrs().map_err(|source| TransportError::Resolve { addr: addr.to_string(), source })?.collect();
    if insecure {
        if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            return Err(TransportError::NotLoopback { addr: *bad });
        }
    }
    TcpListener::bind(addrs.as_slice()).map_err(|source| TransportError::Listen { addr: addr.to_string(), source })
}
