//! Post-copy (lazy pages): the workload runs on the destination before all its memory is there, and the
//! destination's CRIU `lazy-pages` daemon pulls the rest from the source's CRIU on demand.
//!
//! CRIU's lazy page server and daemon speak over TCP to an address; phaul carries that conversation over its
//! memory channel instead: on the source, phaul connects to CRIU's lazy page server on loopback and pumps bytes
//! between it and the memory channel; on the destination, phaul listens on loopback for the `lazy-pages` daemon
//! and pumps likewise.
//!
//! Whether lazy pages really work cannot be read from CRIU's feature check (it reports userfaultfd, yet remote
//! lazy pages fail on some kernel/CRIU pairs), so before anything is frozen each side runs a trial: a complete
//! local lazy migration of a throwaway process ([`trial`]).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use phaul_proto::criu::{CriuPageServerInfo, CriuReqType};

use crate::criu::{error_lines, rpc, Criu, CriuError};
use crate::sys;

/// How long the trial may take in all.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("lazy pages (which post-copy and --lazy-restore need) cannot work on this host: CRIU reports no userfaultfd support")]
    NoFeature,
    #[error(
        "lazy pages (which post-copy and --lazy-restore need) do not work on {side}: a trial lazy migration of a throwaway process failed ({what}){}; nothing was frozen",
        fmt_lines(lines)
    )]
    TrialFailed { side: &'static str, what: String, lines: Vec<String> },
    #[error("cannot set up post-copy: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Criu(#[from] CriuError),
}

fn fmt_lines(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        let mut s = String::from("; CRIU's log says:");
        for l in lines {
            s.push_str("\n    ");
            s.push_str(l);
        }
        s
    }
}

fn first_line(e: &CriuError) -> String {
    e.to_string().lines().next().unwrap_or_default().trim_end_matches("; CRIU's log says:").to_string()
}

/// A free TCP port on loopback (bound and released; CRIU binds it right after).
pub fn free_port() -> io::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Whether something listens on 127.0.0.1:`port` or on all addresses at `port` in this network namespace.
///
/// CRIU's RPC ignores `ps.address` for lazy dumps, so its lazy page server listens on every address; it accepts
/// one client only, and phaul connects as soon as it listens.
pub fn listening(port: u16) -> bool {
    let ours = [format!("0100007F:{port:04X}"), format!("00000000:{port:04X}")];
    std::fs::read_to_string("/proc/net/tcp")
        .map(|t| {
            t.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && ours.iter().any(|o| f[1] == o.as_str()) && f[3] == "0A"
            })
        })
        .unwrap_or(false)
}

/// Sets its flag when dropped (a thread's end, however it ends).
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Bytes moved by a relay, both ways: post-copy is bounded by its progress, not by its length.
pub type Moved = Arc<AtomicU64>;

fn pump(mut from: impl Read, mut to: impl Write, moved: &AtomicU64, done: impl FnOnce()) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match from.read(&mut buf) {
            // A phaul stopped and continued (SIGSTOP, a debugger, the test hook) sees EINTR on a socket with a
            // timeout: that is no end of the transfer.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                moved.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    done();
}

/// Waits while `moved` keeps growing: returns once `finished` says so, or `false` once nothing moved for
/// `idle` (checked every 200 ms).
pub fn wait_progress(moved: &AtomicU64, idle: Duration, mut finished: impl FnMut() -> bool) -> bool {
    let (mut last, mut since) = (moved.load(Ordering::Relaxed), Instant::now());
    loop {
        if finished() {
            return true;
        }
        let now = moved.load(Ordering::Relaxed);
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= idle {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The destination's relay between the lazy-pages daemon (`local`) and the memory channel (see
/// [`DestinationRelay::start`]).
fn relay_daemon(local: TcpStream, mem: OwnedFd, moved: Moved, header: usize, guard_pid: GuardPid) -> io::Result<()> {
    let _ = local.set_nodelay(true);
    let closed = Arc::new(AtomicBool::new(false));
    let kill_unless_closed = {
        let (closed, guard_pid) = (closed.clone(), guard_pid.clone());
        move || {
            if !closed.load(Ordering::SeqCst) {
                let p = *guard_pid.lock().unwrap_or_else(|e| e.into_inner());
                // The same process (pid and start time), not whatever has its pid by now.
                if let Some(p) = p.filter(|p| p.pid > 1 && p.alive()) {
                    log::warn!("the memory channel broke during post-copy: killing the restored tree {} before its lazy-pages daemon lets go of its memory", p.pid);
                    super::destination::kill_restored_tree(p.pid);
                }
            }
        }
    };
    // Daemon -> source: its requests, one header at a time (watched for the close request).
    let mut from_daemon = local.try_clone()?;
    let mut mem_w = std::fs::File::from(sys::dup(&mem)?);
    let mem_shut = mem_w.try_clone()?;
    let (mv_up, cl, k1) = (moved.clone(), closed.clone(), kill_unless_closed.clone());
    let up = std::thread::spawn(move || {
        let mut buf = vec![0u8; header.max(4)];
        while from_daemon.read_exact(&mut buf).is_ok() {
            if is_close_request(&buf) {
                cl.store(true, Ordering::SeqCst);
            }
            if mem_w.write_all(&buf).is_err() {
                k1();
                break;
            }
            mv_up.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        let _ =
            nix::sys::socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(&mem_shut), nix::sys::socket::Shutdown::Write);
    });
    // Source -> daemon: pages.
    let mem_r = std::fs::File::from(mem);
    let to_daemon = local.try_clone()?;
    let down = std::thread::spawn(move || {
        let shut = to_daemon.try_clone();
        pump(mem_r, to_daemon, &moved, move || {
            // The source's end: a finished transfer (after the daemon's close) or a broken channel.
            kill_unless_closed();
            if let Ok(s) = shut {
                let _ = s.shutdown(Shutdown::Write);
            }
        })
    });
    let _ = up.join();
    let _ = down.join();
    drop(local);
    Ok(())
}

/// The commands of CRIU's page-server protocol that end a lazy transfer: CRIU treats them (and a plain end of the
/// connection) as success, and then kills the dumped tree.
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_CMD_MASK: u32 = 0xffff;

/// Whether one page-server request (its header, as the lazy-pages daemon sends it) ends the transfer.
fn is_close_request(header: &[u8]) -> bool {
    let Some(cmd) = header.get(..4) else { return false };
    let cmd = u32::from_le_bytes([cmd[0], cmd[1], cmd[2], cmd[3]]) & PS_CMD_MASK;
    cmd == PS_IOV_CLOSE || cmd == PS_IOV_FORCE_CLOSE
}

/// The size of one request of CRIU's page-server protocol (`struct page_server_iov`): CRIU 4.2 widened its
/// `nr_pages` from 32 to 64 bits, which pads the struct from 24 to 32 bytes.
pub fn page_server_request_size(criu: (u32, u32, u32)) -> usize {
    if criu >= (4, 2, 0) {
        32
    } else {
        24
    }
}

/// The source's half: once CRIU's lazy page server listens on `port`, connect to it and pump it over the memory
/// channel.
///
/// CRIU takes the end of the transfer (a close request, or the connection simply ending) as success and kills
/// the dumped tree. Before the destination has confirmed that its copy runs, that must never happen: a
/// lazy-pages daemon whose restored tree was discarded ends its transfer "successfully" too. So the relay reads
/// the daemon's requests and passes its close request on to CRIU only once `committed` is set; otherwise, when the
/// destination hangs up without one, and on [`SourceRelay::poison`], it sends CRIU a request it does not know,
/// which fails the transfer, and CRIU resumes the tree (into phaul's freezer).
#[derive(Debug)]
pub struct SourceRelay {
    abort: Arc<AtomicBool>,
    to_criu: Arc<std::sync::Mutex<Option<TcpStream>>>,
    poisoned: Arc<AtomicBool>,
    header: usize,
    /// Why the relay failed CRIU's transfer by itself, when it did.
    reason: Arc<std::sync::Mutex<Option<String>>>,
    thread: Option<JoinHandle<io::Result<()>>>,
    /// Bytes moved both ways.
    pub moved: Moved,
    /// Set once the relay is done with (its progress watch ends).
    finished: Arc<AtomicBool>,
}

fn poison_criu(to_criu: &std::sync::Mutex<Option<TcpStream>>, poisoned: &AtomicBool, header: usize) {
    let mut g = to_criu.lock().unwrap_or_else(|p| p.into_inner());
    if poisoned.swap(true, Ordering::SeqCst) {
        return;
    }
    if let Some(s) = g.as_mut() {
        let _ = s.write_all(&vec![0xffu8; header]);
        let _ = s.flush();
    }
}

impl SourceRelay {
    pub fn start(port: u16, mem: OwnedFd, timeout: Duration, committed: Arc<AtomicBool>, header: usize) -> SourceRelay {
        let abort = Arc::new(AtomicBool::new(false));
        let poisoned = Arc::new(AtomicBool::new(false));
        let to_criu: Arc<std::sync::Mutex<Option<TcpStream>>> = Arc::new(std::sync::Mutex::new(None));
        let reason: Arc<std::sync::Mutex<Option<String>>> = Arc::new(std::sync::Mutex::new(None));
        let moved: Moved = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicBool::new(false));
        let (a, p, tc, why, mv) = (abort.clone(), poisoned.clone(), to_criu.clone(), reason.clone(), moved.clone());
        let ended = SetOnDrop(finished.clone());
        let say = move |r: &str| {
            let mut g = why.lock().unwrap_or_else(|p| p.into_inner());
            if g.is_none() {
                *g = Some(r.to_string());
            }
        };
        let thread = std::thread::spawn(move || -> io::Result<()> {
            let _ended = ended;
            let deadline = Instant::now() + timeout;
            while !listening(port) {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "CRIU's lazy page server never listened"));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let s = TcpStream::connect(("127.0.0.1", port))?;
            let _ = s.set_nodelay(true);
            // Should this process die, the kernel closes the connection with a reset, not an end: CRIU takes a
            // plain end of its lazy transfer for success and kills the tree, a reset for failure.
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            if let Err(e) = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger) {
                log::warn!("cannot make the lazy-page relay reset on exit: {e}");
            }
            if a.load(Ordering::SeqCst) {
                // The migration did not commit: one unknown request fails CRIU's transfer (a plain hang-up would
                // count as success).
                let mut s = s;
                let _ = s.write_all(&vec![0xffu8; header]);
                return Ok(());
            }
            *tc.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.try_clone()?);
            // CRIU -> destination: pages, passed on as they come.
            let from_criu = s.try_clone()?;
            let mem_w = std::fs::File::from(sys::dup(&mem)?);
            let mem_shut = mem_w.try_clone()?;
            let mv_up = mv.clone();
            let up = std::thread::spawn(move || {
                pump(from_criu, mem_w, &mv_up, move || {
                    let _ = nix::sys::socket::shutdown(
                        std::os::fd::AsRawFd::as_raw_fd(&mem_shut),
                        nix::sys::socket::Shutdown::Write,
                    );
                })
            });
            // Destination -> CRIU: the daemon's requests, one header at a time.
            let mut mem_r = std::fs::File::from(mem);
            let mut buf = vec![0u8; header];
            // Whether the daemon's close request was passed on (only ever after the commit).
            let mut closed = false;
            loop {
                if mem_r.read_exact(&mut buf).is_err() {
                    if closed {
                        // The close went through and the daemon hung up: CRIU now waits for the connection's plain
                        // end; sending it anything would fail its transfer after the fact.
                        if let Some(c) = tc.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                            let _ = c.shutdown(Shutdown::Write);
                        }
                        break;
                    }
                    // The destination hung up without a close request: whatever it holds, its memory is not
                    // complete, so CRIU must not take this for success (after the commit the workload is lost, and
                    // the source's tree is ended by phaul, not by CRIU).
                    if !p.load(Ordering::SeqCst) {
                        say("the destination ended the page transfer without finishing it (its phaul, CRIU or lazy-pages daemon died, or the link broke)");
                    }
                    poison_criu(&tc, &p, header);
                    break;
                }
                if closed {
                    log::warn!("the destination's lazy-pages daemon sent a request after its close request; ignored");
                    continue;
                }
                if is_close_request(&buf) {
                    let wait = Instant::now() + Duration::from_secs(10);
                    while !committed.load(Ordering::SeqCst) && Instant::now() < wait {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    if !committed.load(Ordering::SeqCst) {
                        log::warn!("the destination ended the page transfer before it confirmed the commit; failing CRIU's transfer so that it keeps the source's tree");
                        say("the destination ended the page transfer before it confirmed the commit (its restored copy was discarded)");
                        poison_criu(&tc, &p, header);
                        break;
                    }
                    closed = true;
                }
                let mut g = tc.lock().unwrap_or_else(|p| p.into_inner());
                if p.load(Ordering::SeqCst) {
                    break;
                }
                match g.as_mut() {
                    Some(c) => {
                        if c.write_all(&buf).is_err() {
                            break;
                        }
                        mv.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    }
                    None => break,
                }
            }
            let _ = up.join();
            Ok(())
        });
        // Post-copy lasts as long as its pages take: it is bounded by their progress. Nothing moved for `timeout`
        // (the daemon's background transfer never pauses that long) means the transfer is stuck: it is failed.
        let (mv, p, tc, why) = (moved.clone(), poisoned.clone(), to_criu.clone(), reason.clone());
        let fin = finished.clone();
        std::thread::spawn(move || {
            let moving = wait_progress(&mv, timeout, || fin.load(Ordering::SeqCst) || p.load(Ordering::SeqCst));
            if !moving {
                log::warn!(
                    "no page moved between the hosts for {} s; failing the post-copy transfer",
                    timeout.as_secs()
                );
                let mut g = why.lock().unwrap_or_else(|p| p.into_inner());
                if g.is_none() {
                    *g = Some(format!(
                        "no page moved between the hosts for {} s (the --timeout bound)",
                        timeout.as_secs()
                    ));
                }
                drop(g);
                poison_criu(&tc, &p, header);
            }
        });
        SourceRelay { abort, to_criu, poisoned, header, reason, thread: Some(thread), moved, finished }
    }

    /// The migration failed before CRIU's page server got a client: make it give up at once.
    pub fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
    }

    /// Fails CRIU's transfer now (the migration will not commit): CRIU resumes the tree.
    pub fn poison(&self) {
        self.poisoner().poison();
    }

    /// A handle that can fail CRIU's transfer from another thread.
    pub fn poisoner(&self) -> Poisoner {
        Poisoner {
            abort: self.abort.clone(),
            to_criu: self.to_criu.clone(),
            poisoned: self.poisoned.clone(),
            header: self.header,
        }
    }

    /// Why the relay failed CRIU's transfer by itself (the destination's side ended it), if it did.
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits for the relay to end (it ends when CRIU's page server closes).
    pub fn join(mut self) -> io::Result<()> {
        self.finished.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("the relay thread panicked")),
            None => Ok(()),
        }
    }
}

/// See [`SourceRelay::poisoner`].
#[derive(Debug, Clone)]
pub struct Poisoner {
    abort: Arc<AtomicBool>,
    to_criu: Arc<std::sync::Mutex<Option<TcpStream>>>,
    poisoned: Arc<AtomicBool>,
    header: usize,
}

impl Poisoner {
    pub fn poison(&self) {
        self.abort.store(true, Ordering::SeqCst);
        poison_criu(&self.to_criu, &self.poisoned, self.header);
    }
}

/// The destination's half: a loopback listener for the `lazy-pages` daemon, pumped over the memory channel.
#[derive(Debug)]
pub struct DestinationRelay {
    pub port: u16,
    thread: Option<JoinHandle<()>>,
    /// Bytes moved both ways.
    pub moved: Moved,
    /// The restored root to kill should the memory channel break before the daemon's close request went out.
    guard_pid: GuardPid,
}

type GuardPid = Arc<std::sync::Mutex<Option<crate::journal::ProcId>>>;

impl DestinationRelay {
    /// `header`: the size of one request of the daemon's CRIU ([`page_server_request_size`]).
    ///
    /// When the memory channel breaks before the daemon asked to close (a cut link, a dead source), the relay
    /// kills the restored tree ([`DestinationRelay::guard_pid`]) *before* it hangs up on the daemon: the daemon's
    /// exit releases its userfaultfd, after which the tree's missing pages would read as zeros and it would run on
    /// corrupt memory until phaul noticed.
    pub fn start(mem: OwnedFd, header: usize) -> io::Result<DestinationRelay> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let moved: Moved = Arc::new(AtomicU64::new(0));
        let guard_pid: GuardPid = Arc::new(std::sync::Mutex::new(None));
        let (mv, gp) = (moved.clone(), guard_pid.clone());
        let thread = std::thread::spawn(move || {
            if let Ok((s, _)) = l.accept() {
                let _ = relay_daemon(s, mem, mv, header, gp);
            }
        });
        Ok(DestinationRelay { port, thread: Some(thread), moved, guard_pid })
    }

    /// The restored root the relay kills on a broken memory channel (`None`: none, e.g. once the session has
    /// killed it itself, so that a reused pid is never hit).
    pub fn guard(&self, p: Option<crate::journal::ProcId>) {
        *self.guard_pid.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// Whether the relay has finished (the daemon and the source both hung up).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().map(|t| t.is_finished()).unwrap_or(true)
    }
}

/// Starts CRIU's `lazy-pages` daemon (there is no RPC request for it), fetching from a page server on loopback at
/// `port`, or with `None` reading the images in `dir` and its parents; waits (bounded) until it listens for the
/// restore on its socket in `dir`.
pub fn start_daemon(criu: &Criu, dir: &Path, port: Option<u16>) -> io::Result<Child> {
    let socket = dir.join("lazy-pages.socket");
    let _ = std::fs::remove_file(&socket);
    let mut child = spawn_daemon(criu, dir, port)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(io::Error::other(format!("CRIU's lazy-pages daemon exited at start ({st})")));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(io::ErrorKind::TimedOut, "CRIU's lazy-pages daemon did not start"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(child)
}

fn spawn_daemon(criu: &Criu, dir: &Path, port: Option<u16>) -> io::Result<Child> {
    let mut cmd = Command::new(criu.path());
    cmd.arg("lazy-pages");
    if let Some(port) = port {
        cmd.arg("--page-server").args(["--address", "127.0.0.1", "--port", &port.to_string()]);
    }
    cmd.arg("-D")
        .arg(dir)
        .arg("-W")
        .arg(dir)
        .args(["-o", "lazy-pages.log", "-v4"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
}

use std::os::unix::process::CommandExt;

/// Waits for a child, bounded; kills it when the bound passes. Returns whether it exited successfully in time.
pub fn wait_child(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return s.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

fn kill_pid(pid: i32) {
    if pid > 1 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// The canary of the trial: `sleep` as pid 1 of its own pid namespace and leader of its own session.
struct Canary {
    launcher: Child,
    pid: i32,
}

impl Canary {
    fn start() -> io::Result<Canary> {
        let mut launcher = Command::new("unshare")
            .args(["--pid", "--fork", "setsid", "sleep", "600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let children = format!("/proc/{}/task/{}/children", launcher.id(), launcher.id());
        loop {
            let pid = std::fs::read_to_string(&children)
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<i32>().ok()));
            if let Some(pid) = pid {
                // Wait until setsid has exec'd sleep (the session is its own).
                let stat = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if stat.trim() == "sleep" {
                    return Ok(Canary { launcher, pid });
                }
            }
            if Instant::now() >= deadline {
                let _ = launcher.kill();
                let _ = launcher.wait();
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the trial process did not start"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        kill_pid(self.pid);
        let _ = wait_child(&mut self.launcher, Duration::from_secs(5));
    }
}

/// A complete local lazy migration of a throwaway process, bounded in time: dump with lazy pages, the
/// `lazy-pages` daemon fetching from CRIU's page server, restore with lazy pages, every page pulled. `work` is a
/// private directory it may use (it is removed).
pub fn trial(criu: &Criu, work: &Path, side: &'static str) -> Result<(), LazyError> {
    let f = criu.features()?;
    if !f.lazy_pages {
        return Err(LazyError::NoFeature);
    }
    // A directory of its own, made here (mode 0700), never one that already exists: root runs CRIU in it.
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(work)?;
    }
    let r = trial_inner(criu, work, side);
    if r.is_ok() {
        let _ = std::fs::remove_dir_all(work);
    }
    r
}

fn trial_inner(criu: &Criu, work: &Path, side: &'static str) -> Result<(), LazyError> {
    let fail = |what: String, logs: &[PathBuf]| LazyError::TrialFailed {
        side,
        what,
        lines: logs.iter().flat_map(|l| error_lines(l)).collect(),
    };
    let dump_log = work.join("dump.log");
    let restore_log = work.join("restore.log");
    let lazy_log = work.join("lazy-pages.log");
    let logs = [dump_log.clone(), lazy_log.clone(), restore_log.clone()];
    let canary = Canary::start()?;
    let port = free_port()?;
    let quick = Criu::new(criu.path().to_path_buf(), TRIAL_TIMEOUT);

    // The dump does not return before every page was served, so it runs beside the rest.
    let (mut opts, open_dir) = rpc::dir_opts(work, "dump.log")?;
    opts.pid = Some(canary.pid);
    opts.lazy_pages = Some(true);
    opts.ps =
        Some(CriuPageServerInfo { address: Some("127.0.0.1".into()), port: Some(port as i32), ..Default::default() });
    let mut dump = quick.start(Vec::new(), None)?;
    dump.set_log(dump_log.clone());
    let dump_pid = dump.pid() as i32;
    let dumper = std::thread::spawn(move || {
        let r = dump.call("DUMP", rpc::req(CriuReqType::Dump, Some(opts)), &mut |_, _| Ok(()));
        drop(open_dir);
        r.map(|_| ())
    });
    let deadline = Instant::now() + TRIAL_TIMEOUT;
    while !listening(port) {
        if dumper.is_finished() || Instant::now() >= deadline {
            let why = match dumper.join() {
                Ok(Err(e)) => e.to_string(),
                _ => "CRIU's lazy page server never started".to_string(),
            };
            return Err(fail(why, &logs));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Whatever fails from here on, CRIU's lazy page server must not be left waiting for a client.
    let unblock = || {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            drop(s);
        }
    };
    let mut daemon = match start_daemon(&quick, work, Some(port)) {
        Ok(d) => d,
        Err(e) => {
            unblock();
            let _ = dumper.join();
            return Err(fail(format!("the lazy-pages daemon did not start: {e}"), &logs));
        }
    };
    let (ropts, _rdir) = rpc::dir_opts(work, "restore.log")?;
    let mut ropts = ropts;
    ropts.lazy_pages = Some(true);
    let mut restore = quick.start(Vec::new(), None)?;
    restore.set_log(restore_log.clone());
    let restore_pid = restore.pid() as i32;
    // If the dump side fails while the restore waits, end the restore's CRIU rather than wait for its timeout.
    let watch_stop = Arc::new(AtomicBool::new(false));
    let ws = watch_stop.clone();
    let watcher = std::thread::spawn(move || {
        let deadline = Instant::now() + TRIAL_TIMEOUT;
        while !ws.load(Ordering::SeqCst) {
            let dump_alive = sys::pid_alive(dump_pid);
            if !dump_alive || Instant::now() >= deadline {
                std::thread::sleep(Duration::from_millis(200));
                if !ws.load(Ordering::SeqCst) {
                    kill_pid(restore_pid);
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let restored = restore.call("RESTORE", rpc::req(CriuReqType::Restore, Some(ropts)), &mut |_, _| Ok(()));
    watch_stop.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    drop(restore);
    let restored_pid = restored.as_ref().ok().and_then(|r| r.restore.as_ref().map(|r| r.pid));
    let daemon_ok = if restored.is_ok() {
        wait_child(&mut daemon, TRIAL_TIMEOUT)
    } else {
        let _ = daemon.kill();
        let _ = daemon.wait();
        false
    };
    if !daemon_ok {
        unblock();
    }
    let dumped =
        dumper.join().unwrap_or_else(|_| Err(CriuError::Died { op: "DUMP", log: None, log_errors: Vec::new() }));
    if let Some(p) = restored_pid {
        kill_pid(p);
    }
    drop(canary);
    match (restored, dumped, daemon_ok) {
        (Ok(_), Ok(()), true) => Ok(()),
        (_, Err(e), _) => Err(fail(format!("the lazy dump failed: {}", first_line(&e)), &logs)),
        (Err(e), _, _) => Err(fail(format!("the lazy restore failed: {}", first_line(&e)), &logs)),
        (_, _, false) => Err(fail("the lazy-pages daemon failed".into(), &logs)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_requests_are_told_from_page_requests() {
        let header = |cmd: u32| {
            let mut h = vec![0u8; 24];
            h[..4].copy_from_slice(&cmd.to_le_bytes());
            h
        };
        assert!(is_close_request(&header(PS_IOV_CLOSE)));
        assert!(is_close_request(&header(PS_IOV_FORCE_CLOSE)));
        // The flags in the upper half do not matter; other commands and short input are not a close.
        assert!(is_close_request(&header(PS_IOV_CLOSE | 0x1_0000)));
        assert!(!is_close_request(&header(0x1022)));
        assert!(!is_close_request(&[0x23, 0x10]));
    }
}
