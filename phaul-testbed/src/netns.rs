//! Two network-namespace "hosts" joined by a veth pair, and TCP channels between them.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

use crate::cmd::{run_command, COMMAND_TIMEOUT};
use crate::error::TestbedError;

/// Address of host A on the veth.
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 91, 0, 1);
/// Address of host B on the veth.
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 91, 0, 2);
/// Prefix length of the veth subnet.
pub const PREFIX_LEN: u8 = 24;

const NETNS_DIR: &str = "/run/netns";
/// Bound for setting up one TCP channel (connect + accept).
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(10);

static PAIR_COUNTER: AtomicU32 = AtomicU32::new(0);

fn tool(preferred: &str, fallback: &str) -> String {
    if Path::new(preferred).is_file() {
        preferred.to_string()
    } else {
        fallback.to_string()
    }
}

fn ip_cmd() -> Command {
    Command::new(tool("/usr/sbin/ip", "ip"))
}

/// One side of a [`HostPair`]: a named network namespace with one veth end. A clone names the same namespace
/// (for a thread that acts on the host while the pair lives).
#[derive(Debug, Clone)]
pub struct Host {
    name: String,
    addr: Ipv4Addr,
    veth: String,
}

impl Host {
    /// The netns name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// The host's address on the veth.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The name of the host's veth end (inside its netns).
    pub fn veth(&self) -> &str {
        &self.veth
    }

    /// The inode of this host's network namespace (compare with [`crate::netns_of_pid`]).
    pub fn netns_inode(&self) -> io::Result<u64> {
        Ok(std::fs::metadata(self.netns_path())?.ino())
    }

    /// A command running `program args...` inside this host's network namespace, through
    /// `nsenter --net=/run/netns/NAME -- program args...`. Unlike `ip netns exec`, this does not create a
    /// mount namespace (which would break CRIU). nsenter execs the program, so the child's pid is the
    /// program's.
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut net = std::ffi::OsString::from("--net=");
        net.push(self.netns_path());
        let mut cmd = Command::new(tool("/usr/bin/nsenter", "nsenter"));
        cmd.arg(net).arg("--").arg(program).args(args);
        cmd
    }

    /// Run a short command inside this host to completion (bounded by [`COMMAND_TIMEOUT`]).
    pub fn run<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output, TestbedError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_command(&mut self.command(program, args), COMMAND_TIMEOUT)
    }

    /// Cuts the link to the other host at this host's end (see [`CutKind`]); the returned guard restores it.
    pub fn cut_link(&self, kind: CutKind) -> Result<LinkCut, TestbedError> {
        match kind {
            CutKind::Down => {
                self.run(tool("/usr/sbin/ip", "ip"), ["link", "set", self.veth.as_str(), "down"])?;
            }
            CutKind::Blackhole => {
                static N: AtomicU32 = AtomicU32::new(0);
                let n = N.fetch_add(1, Ordering::SeqCst);
                let file = std::env::temp_dir().join(format!("phaul-testbed-blackhole-{}-{n}.nft", std::process::id()));
                let veth = &self.veth;
                // Before conntrack and everything else (priority -400), both ways.
                let rules = format!(
                    "table inet {BLACKHOLE_TABLE} {{\n  chain input {{ type filter hook input priority -400; policy accept; iifname \"{veth}\" drop; }}\n  chain output {{ type filter hook output priority -400; policy accept; oifname \"{veth}\" drop; }}\n}}\n"
                );
                std::fs::write(&file, rules).map_err(|e| TestbedError::io(format!("writing {}", file.display()), e))?;
                let r = self.run(nft_tool(), [std::ffi::OsStr::new("-f"), file.as_os_str()]);
                let _ = std::fs::remove_file(&file);
                r?;
            }
        }
        Ok(LinkCut { host: self.clone(), kind, cut_at: Instant::now(), restored_at: None })
    }

    /// The nftables tables of this host, as `FAMILY NAME`.
    pub fn nft_tables(&self) -> Result<Vec<String>, TestbedError> {
        let out = self.run(nft_tool(), ["list", "tables"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("table "))
            .map(str::to_string)
            .collect())
    }

    /// Adds `cidr` to this host's loopback device (idempotent).
    pub fn add_loopback_address(&self, cidr: &str) -> Result<(), TestbedError> {
        let shown = self.run(tool("/usr/sbin/ip", "ip"), ["-o", "addr", "show", "dev", "lo"])?;
        if String::from_utf8_lossy(&shown.stdout).split_whitespace().any(|w| w == cidr) {
            return Ok(());
        }
        self.run(tool("/usr/sbin/ip", "ip"), ["addr", "add", cidr, "dev", "lo"]).map(|_| ())
    }

    /// Run `f` on a fresh thread that has joined this host's network namespace (sockets created there stay
    /// in it), waiting at most `timeout` for its result. On timeout the thread is left behind, so `f` should
    /// bound its own waits.
    pub fn in_netns<T, F>(&self, timeout: Duration, f: F) -> Result<T, TestbedError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = self.netns_path();
        let ns = File::open(&path).map_err(|e| TestbedError::io(format!("opening {}", path.display()), e))?;
        let (tx, rx) = mpsc::channel();
        let what = format!("a thread in netns {}", self.name);
        std::thread::Builder::new()
            .name(format!("in-{}", self.name))
            .spawn(move || {
                let r = setns(&ns, CloneFlags::CLONE_NEWNET).map(|()| {
                    drop(ns);
                    f()
                });
                // The receiver may have given up already.
                let _ = tx.send(r);
            })
            .map_err(|e| TestbedError::io(format!("spawning {what}"), e))?;
        match rx.recv_timeout(timeout) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(TestbedError::sys(format!("setns into {}", path.display()), e)),
            Err(_) => Err(TestbedError::Timeout { what, timeout }),
        }
    }
}

/// How [`Host::cut_link`] cuts the link between the two hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutKind {
    /// `ip link set VETH down` in the host: its end of the veth is down, so the peer's end loses its carrier (its
    /// packets are dropped) and the host's own route to the other host goes (its sends fail at once).
    Down,
    /// A silent blackhole: an nftables table in the host drops every packet in and out of its veth. Nobody is
    /// told; TCP notices only through its own timeouts.
    Blackhole,
}

impl CutKind {
    pub fn name(self) -> &'static str {
        match self {
            CutKind::Down => "link down",
            CutKind::Blackhole => "blackhole",
        }
    }
}

/// The name of the nftables table [`CutKind::Blackhole`] adds (not `phaul-*`, which is phaul's own).
pub const BLACKHOLE_TABLE: &str = "testbed_blackhole";

/// A cut link; restored by [`LinkCut::restore`] or on drop.
#[derive(Debug)]
pub struct LinkCut {
    host: Host,
    kind: CutKind,
    cut_at: Instant,
    restored_at: Option<Instant>,
}

impl LinkCut {
    pub fn kind(&self) -> CutKind {
        self.kind
    }

    /// When the link was cut.
    pub fn cut_at(&self) -> Instant {
        self.cut_at
    }

    /// When the link was restored, if it was.
    pub fn restored_at(&self) -> Option<Instant> {
        self.restored_at
    }

    /// Restores the link (once; later calls do nothing).
    pub fn restore(&mut self) -> Result<(), TestbedError> {
        if self.restored_at.is_some() {
            return Ok(());
        }
        match self.kind {
            CutKind::Down => {
                self.host.run(tool("/usr/sbin/ip", "ip"), ["link", "set", self.host.veth.as_str(), "up"])?;
            }
            CutKind::Blackhole => {
                self.host.run(nft_tool(), ["delete", "table", "inet", BLACKHOLE_TABLE])?;
            }
        }
        self.restored_at = Some(Instant::now());
        Ok(())
    }
}

impl Drop for LinkCut {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            log::warn!("cannot restore the {} on {}: {e}", self.kind.name(), self.host.name);
        }
    }
}

fn nft_tool() -> String {
    tool("/usr/sbin/nft", "nft")
}

/// The inode of the network namespace a socket belongs to (via the `SIOCGSKNS` ioctl), to compare with
/// [`Host::netns_inode`].
pub fn socket_netns_inode(sock: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: SIOCGSKNS takes no argument and only reads the socket; `sock` is a valid open descriptor
    // for the duration of the call (it is borrowed).
    let raw = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGSKNS) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the ioctl returns a new descriptor that nothing else owns.
    let ns = unsafe { OwnedFd::from_raw_fd(raw) };
    Ok(File::from(ns).metadata()?.ino())
}

/// Three TCP connections between the hosts, as phaul uses them; each is `(end in A, end in B)`.
#[derive(Debug)]
pub struct ChannelTriple {
    /// The RPC channel.
    pub rpc: (OwnedFd, OwnedFd),
    /// The memory-pages channel.
    pub mem: (OwnedFd, OwnedFd),
    /// The filesystem channel.
    pub fs: (OwnedFd, OwnedFd),
}

/// Two hosts (network namespaces) joined by a veth pair: A has [`ADDR_A`], B has [`ADDR_B`]. Dropping it
/// deletes both namespaces (and so the veth).
#[derive(Debug)]
pub struct HostPair {
    a: Host,
    b: Host,
    /// Which namespaces exist and must be deleted on drop.
    created: [bool; 2],
}

impl HostPair {
    /// Create netns `phaul-<tag>-<pid>-<n>-a` and `-b`, a veth pair with one end in each, the addresses,
    /// and bring up the veth ends and `lo` in both. `tag` is a short label made of letters, digits, `-`,
    /// `_` and `.`.
    pub fn new(tag: &str) -> Result<HostPair, TestbedError> {
        crate::require_root()?;
        if tag.is_empty() || tag.len() > 40 || !tag.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(TestbedError::InvalidArgument(format!(
                "host pair tag {tag:?} must be 1-40 characters of letters, digits, '-', '_' or '.'"
            )));
        }
        let n = PAIR_COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let base = format!("phaul-{tag}-{pid}-{n}");
        // <= 15 characters: 3 + 4 + 1 + at most 7.
        let suffix = format!("{}x{}", pid % 10_000, n % 10_000_000);
        let mut pair = HostPair {
            a: Host { name: format!("{base}-a"), addr: ADDR_A, veth: format!("pha{suffix}") },
            b: Host { name: format!("{base}-b"), addr: ADDR_B, veth: format!("phb{suffix}") },
            created: [false, false],
        };
        // On any error below, dropping `pair` deletes whatever was created.
        run_command(ip_cmd().args(["netns", "add", pair.a.name.as_str()]), COMMAND_TIMEOUT)?;
        pair.created[0] = true;
        run_command(ip_cmd().args(["netns", "add", pair.b.name.as_str()]), COMMAND_TIMEOUT)?;
        pair.created[1] = true;
        // Created directly inside the namespaces: the root namespace never sees the names.
        run_command(
            ip_cmd().args(["-n", &pair.a.name, "link", "add", &pair.a.veth, "type", "veth", "peer", "name"]).args([
                pair.b.veth.as_str(),
                "netns",
                pair.b.name.as_str(),
            ]),
            COMMAND_TIMEOUT,
        )?;
        for host in [&pair.a, &pair.b] {
            let cidr = format!("{}/{PREFIX_LEN}", host.addr);
            run_command(ip_cmd().args(["-n", &host.name, "addr", "add", &cidr, "dev", &host.veth]), COMMAND_TIMEOUT)?;
            run_command(ip_cmd().args(["-n", &host.name, "link", "set", "lo", "up"]), COMMAND_TIMEOUT)?;
            run_command(ip_cmd().args(["-n", &host.name, "link", "set", &host.veth, "up"]), COMMAND_TIMEOUT)?;
        }
        Ok(pair)
    }

    /// Host A (10.91.0.1).
    pub fn a(&self) -> &Host {
        &self.a
    }

    /// Host B (10.91.0.2).
    pub fn b(&self) -> &Host {
        &self.b
    }

    /// A real TCP connection over the veth: a listener created in B on `10.91.0.2:0`, a socket created in A
    /// connecting to it. Returns `(end in A, end in B)`, both blocking and close-on-exec.
    pub fn connect_tcp(&self) -> Result<(OwnedFd, OwnedFd), TestbedError> {
        let bind_to = SocketAddr::V4(SocketAddrV4::new(self.b.addr, 0));
        let listener = self
            .b
            .in_netns(CHANNEL_TIMEOUT, move || TcpListener::bind(bind_to))?
            .map_err(|e| TestbedError::io(format!("binding a listener on {bind_to} in {}", self.b.name), e))?;
        let target = listener.local_addr().map_err(|e| TestbedError::io("getsockname of the channel listener", e))?;
        let client = self
            .a
            .in_netns(CHANNEL_TIMEOUT + Duration::from_secs(1), move || {
                TcpStream::connect_timeout(&target, CHANNEL_TIMEOUT)
            })?
            .map_err(|e| TestbedError::io(format!("connecting from {} to {target}", self.a.name), e))?;
        let server = accept_bounded(&listener, CHANNEL_TIMEOUT)?;
        Ok((OwnedFd::from(client), OwnedFd::from(server)))
    }

    /// Three channels: rpc, mem and fs.
    pub fn channel_triple(&self) -> Result<ChannelTriple, TestbedError> {
        Ok(ChannelTriple { rpc: self.connect_tcp()?, mem: self.connect_tcp()?, fs: self.connect_tcp()? })
    }
}

fn accept_bounded(listener: &TcpListener, timeout: Duration) -> Result<TcpStream, TestbedError> {
    listener.set_nonblocking(true).map_err(|e| TestbedError::io("making the channel listener non-blocking", e))?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| TestbedError::io("making the channel blocking", e))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TestbedError::io("accepting the channel connection", e)),
        }
        if Instant::now() >= deadline {
            return Err(TestbedError::Timeout { what: "the channel connection to be accepted".into(), timeout });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Drop for HostPair {
    fn drop(&mut self) {
        for (host, created) in [(&self.a, self.created[0]), (&self.b, self.created[1])] {
            if created {
                if let Err(e) = run_command(ip_cmd().args(["netns", "del", host.name.as_str()]), COMMAND_TIMEOUT) {
                    log::warn!("cannot delete netns {}: {e}", host.name);
                }
            }
        }
    }
}
