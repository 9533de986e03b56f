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
        "refusing to listen on {addr}: phaul's own connections are not authenticated or encrypted yet, so `phaul serve --listen` only accepts loopback addresses; to migrate between machines, hand phaul connections you have secured yourself with --fdrpc/--fdmem/--fdfs (for example through an SSH tunnel to a loopback port)"
    )]
    NotLoopback { addr: SocketAddr },
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

/// Connects to a `phaul serve --listen` address.
pub fn connect(addr: &str, channel: ChannelName, timeout: Duration) -> Result<Channel, TransportError> {
    let addrs: Vec<SocketAddr> =
        addr.to_socket_addrs().map_err(|source| TransportError::Resolve { addr: addr.to_string(), source })?.collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Channel::from_tcp(channel, s),
            Err(e) => last = e,
        }
    }
    Err(TransportError::Connect { channel: channel.as_str(), addr: addr.to_string(), source: last })
}

/// Listens for sources. Only loopback addresses are accepted until phaul authenticates its peers.
pub fn listen(addr: &str) -> Result<TcpListener, TransportError> {
    let addrs: Vec<SocketAddr> =
        addr.to_socket_addrs().map_err(|source| TransportError::Resolve { addr: addr.to_string(), source })?.collect();
    if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        return Err(TransportError::NotLoopback { addr: *bad });
    }
    TcpListener::bind(addrs.as_slice()).map_err(|source| TransportError::Listen { addr: addr.to_string(), source })
}
