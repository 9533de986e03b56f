//! CRIU's RPC, spoken over `criu swrk FD`: one SOCK_SEQPACKET message per request, response or notification.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{send, MsgFlags};
use phaul_proto::criu::{CriuFeatures, CriuOpts, CriuReq, CriuReqType, CriuResp};
use prost::Message;

use super::log::error_lines;
use crate::sys;

/// The descriptor number CRIU's end of the RPC socket gets in the CRIU process.
const SWRK_FD: i32 = 3;
/// Largest RPC message phaul accepts from CRIU (CRIU's are a few hundred bytes).
const MAX_MESSAGE: usize = 1 << 20;

/// A CRIU version as CRIU reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub sublevel: u32,
    pub gitid: Option<String>,
}

impl Version {
    pub fn triple(&self) -> (u32, u32, u32) {
        (self.major, self.minor, self.sublevel)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if self.sublevel != 0 {
            write!(f, ".{}", self.sublevel)?;
        }
        if let Some(g) = &self.gitid {
            write!(f, " ({g})")?;
        }
        Ok(())
    }
}

/// What CRIU says this kernel and build can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Features {
    /// Soft-dirty memory tracking: needed for pre-copy rounds.
    pub mem_track: bool,
    /// userfaultfd-based lazy pages: needed for post-copy.
    pub lazy_pages: bool,
}

/// A failure while driving CRIU.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("could not start CRIU ({path}): {source}")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("lost the connection to CRIU during {op}: {source}")]
    Io { op: &'static str, source: io::Error },
    #[error("CRIU exited in the middle of {op}{}", fmt_log(log, log_errors))]
    Died { op: &'static str, log: Option<PathBuf>, log_errors: Vec<String> },
    #[error("CRIU sent a message phaul cannot decode during {op}: {source}")]
    Decode { op: &'static str, source: prost::DecodeError },
    #[error(
        "CRIU did not answer {op} within {secs} s (the --timeout bound); raise --timeout if the workload is that large"
    )]
    Timeout { op: &'static str, secs: u64 },
    #[error("CRIU answered {op} with a {got:?} response")]
    Unexpected { op: &'static str, got: CriuReqType },
    #[error("CRIU {op} failed: {}{}", reason(errmsg, errno), fmt_log(log, log_errors))]
    Failed {
        op: &'static str,
        errmsg: Option<String>,
        errno: Option<i32>,
        log: Option<PathBuf>,
        log_errors: Vec<String>,
    },
    #[error("{message}")]
    Notify { op: &'static str, script: String, message: String },
}

impl CriuError {
    /// CRIU's own error lines, when CRIU failed.
    pub fn criu_errors(&self) -> &[String] {
        match self {
            CriuError::Died { log_errors, .. } | CriuError::Failed { log_errors, .. } => log_errors,
            _ => &[],
        }
    }
}

fn reason(errmsg: &Option<String>, errno: &Option<i32>) -> String {
    let mut s = match errmsg {
        // CRIU reports its first error line; without CAP_SYS_RESOURCE that is a harmless RLIMIT_NOFILE complaint.
        Some(m) if m.contains("Can't setup RLIMIT_NOFILE") => "see CRIU's log below".to_string(),
        Some(m) if !m.trim().is_empty() => m.trim().to_string(),
        _ => "CRIU gave no reason".to_string(),
    };
    if let Some(e) = errno.filter(|e| *e != 0) {
        s.push_str(&format!(" ({})", nix::errno::Errno::from_raw(e).desc()));
    }
    s
}

fn fmt_log(log: &Option<PathBuf>, lines: &[String]) -> String {
    let mut s = String::new();
    if !lines.is_empty() {
        s.push_str("; CRIU's log says:");
        for l in lines {
            s.push_str("\n    ");
            s.push_str(l);
        }
    }
    if let Some(p) = log {
        s.push_str(&format!("\n  (full log: {})", p.display()));
    }
    s
}

/// Answers CRIU's notifications (`pre-dump`, `post-dump`, `network-lock`, `setup-namespaces`, `post-restore`...).
/// Returning an error makes CRIU fail the request: a failed `post-dump` makes CRIU resume the dumped tree.
pub type NotifyHandler<'a> = dyn FnMut(&str, Option<i32>) -> Result<(), String> + 'a;

/// A CRIU binary phaul drives.
#[derive(Debug, Clone)]
pub struct Criu {
    path: PathBuf,
    timeout: Duration,
}

impl Criu {
    pub fn new(path: PathBuf, timeout: Duration) -> Self {
        Criu { path, timeout }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts `criu swrk`, handing it `fds` at the given descriptor numbers (which must be above 3).
    /// CRIU's standard error goes to `stderr_log` when given.
    pub fn start(&self, fds: Vec<(OwnedFd, i32)>, stderr_log: Option<&Path>) -> Result<SwrkSession, CriuError> {
        let spawn_err = |source| CriuError::Spawn { path: self.path.clone(), source };
        let (ours, theirs) = sys::seqpacket_pair().map_err(spawn_err)?;
        let mut mappings = vec![FdMapping { parent_fd: theirs, child_fd: SWRK_FD }];
        mappings.extend(fds.into_iter().map(|(parent_fd, child_fd)| FdMapping { parent_fd, child_fd }));
        let mut cmd = Command::new(&self.path);
        cmd.arg("swrk").arg(SWRK_FD.to_string()).stdin(Stdio::null()).stdout(Stdio::null());
        match stderr_log {
            Some(p) => {
                let f = File::options().create(true).append(true).open(p).map_err(spawn_err)?;
                cmd.stderr(f);
            }
            None => {
                cmd.stderr(Stdio::null());
            }
        }
        // CRIU gets its own process group: a Ctrl-C meant for phaul must not kill CRIU while its parasite code
        // sits inside the workload. phaul aborts instead, and CRIU rolls back when the RPC socket closes.
        cmd.process_group(0);
        cmd.fd_mappings(mappings).map_err(|e| spawn_err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string())))?;
        let child = cmd.spawn().map_err(spawn_err)?;
        Ok(SwrkSession { child, sock: ours, timeout: self.timeout, log: None })
    }

    /// Asks CRIU for its version.
    pub fn version(&self) -> Result<Version, CriuError> {
        let mut s = self.start(Vec::new(), None)?;
        parse_version(s.call("VERSION", req(CriuReqType::Version, None), &mut |_, _| Ok(()))?)
    }

    /// Asks CRIU which of memory tracking and lazy pages work here.
    pub fn features(&self) -> Result<Features, CriuError> {
        let mut s = self.start(Vec::new(), None)?;
        // CRIU answers FEATURE_CHECK with success and the subset that works.
        Ok(parse_features(s.call("FEATURE_CHECK", feature_request(), &mut |_, _| Ok(()))?))
    }

    /// VERSION, FEATURE_CHECK and (when `cpuinfo_dir` is given) CPUINFO_DUMP in one CRIU session (each start of
    /// CRIU costs tens of milliseconds); falls back to one session each if this CRIU will not keep a session open.
    pub fn preflight(&self, cpuinfo_dir: Option<&Path>) -> Result<(Version, Features, Option<Vec<u8>>), CriuError> {
        match self.preflight_one_session(cpuinfo_dir) {
            Ok(r) => Ok(r),
            Err(CriuError::Died { .. }) | Err(CriuError::Io { .. }) => {
                let cpu = cpuinfo_dir.map(|d| self.cpuinfo_dump(d)).transpose()?;
                Ok((self.version()?, self.features()?, cpu))
            }
            Err(e) => Err(e),
        }
    }

    fn preflight_one_session(
        &self,
        cpuinfo_dir: Option<&Path>,
    ) -> Result<(Version, Features, Option<Vec<u8>>), CriuError> {
        let mut s = self.start(Vec::new(), None)?;
        let mut r = req(CriuReqType::Version, None);
        r.keep_open = Some(true);
        let version = parse_version(s.call("VERSION", r, &mut |_, _| Ok(()))?)?;
        let mut r = feature_request();
        r.keep_open = Some(cpuinfo_dir.is_some());
        let features = parse_features(s.call("FEATURE_CHECK", r, &mut |_, _| Ok(()))?);
        let cpu = match cpuinfo_dir {
            Some(dir) => {
                let (opts, _dir) = dir_opts(dir, "cpuinfo-dump.log")?;
                s.set_log(dir.join("cpuinfo-dump.log"));
                s.call("CPUINFO_DUMP", req(CriuReqType::CpuinfoDump, Some(opts)), &mut |_, _| Ok(()))?;
                Some(
                    std::fs::read(dir.join("cpuinfo.img"))
                        .map_err(|source| CriuError::Io { op: "CPUINFO_DUMP", source })?,
                )
            }
            None => None,
        };
        Ok((version, features, cpu))
    }

    /// CPUINFO_DUMP into `dir`; returns the bytes of the image it wrote.
    pub fn cpuinfo_dump(&self, dir: &Path) -> Result<Vec<u8>, CriuError> {
        let (opts, _dir) = dir_opts(dir, "cpuinfo-dump.log")?;
        let mut s = self.start(Vec::new(), None)?;
        s.set_log(dir.join("cpuinfo-dump.log"));
        s.call("CPUINFO_DUMP", req(CriuReqType::CpuinfoDump, Some(opts)), &mut |_, _| Ok(()))?;
        std::fs::read(dir.join("cpuinfo.img")).map_err(|source| CriuError::Io { op: "CPUINFO_DUMP", source })
    }

    /// CPUINFO_CHECK of an image the source sent, stored in `dir` as `cpuinfo.img`.
    pub fn cpuinfo_check(&self, dir: &Path) -> Result<(), CriuError> {
        let (opts, _dir) = dir_opts(dir, "cpuinfo-check.log")?;
        let mut s = self.start(Vec::new(), None)?;
        s.set_log(dir.join("cpuinfo-check.log"));
        s.call("CPUINFO_CHECK", req(CriuReqType::CpuinfoCheck, Some(opts)), &mut |_, _| Ok(()))?;
        Ok(())
    }
}

/// What the engine needs from CRIU: the seam between the migration engine and the real `criu swrk`, so that the
/// order of actions at every failure point can be unit-tested with a recording double.
pub trait CriuBackend: Send + Sync + fmt::Debug {
    /// The CRIU binary (also used to start CRIU's `lazy-pages` daemon, which has no RPC request).
    fn path(&self) -> &Path;
    /// The bound on any single CRIU request.
    fn timeout(&self) -> Duration;
    /// Starts one `criu swrk` session, handing it `fds` at the given descriptor numbers (above 3).
    fn session(&self, fds: Vec<(OwnedFd, i32)>, stderr_log: Option<&Path>) -> Result<Box<dyn CriuSession>, CriuError>;
    /// VERSION, FEATURE_CHECK and (with `cpuinfo_dir`) CPUINFO_DUMP.
    fn preflight(&self, cpuinfo_dir: Option<&Path>) -> Result<(Version, Features, Option<Vec<u8>>), CriuError>;
    fn version(&self) -> Result<Version, CriuError>;
    /// CPUINFO_CHECK of `dir/cpuinfo.img`.
    fn cpuinfo_check(&self, dir: &Path) -> Result<(), CriuError>;
}

/// One CRIU RPC session.
pub trait CriuSession: Send + fmt::Debug {
    /// CRIU's pid (for the fault-injection hook and for waiting on it).
    fn pid(&self) -> u32;
    /// The log whose error lines go into errors from now on.
    fn set_log(&mut self, log: PathBuf);
    /// Bounds the next calls by `timeout` instead of the session's default (a post-copy dump lasts as long as its
    /// pages take to move, and is bounded by their progress instead).
    fn set_timeout(&mut self, _timeout: Duration) {}
    /// Sends a request and serves CRIU's notifications until the response arrives.
    fn call(
        &mut self,
        op: &'static str,
        request: CriuReq,
        on_notify: &mut NotifyHandler<'_>,
    ) -> Result<CriuResp, CriuError>;
}

impl CriuBackend for Criu {
    fn path(&self) -> &Path {
        &self.path
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn session(&self, fds: Vec<(OwnedFd, i32)>, stderr_log: Option<&Path>) -> Result<Box<dyn CriuSession>, CriuError> {
        Ok(Box::new(self.start(fds, stderr_log)?))
    }
    fn preflight(&self, cpuinfo_dir: Option<&Path>) -> Result<(Version, Features, Option<Vec<u8>>), CriuError> {
        Criu::preflight(self, cpuinfo_dir)
    }
    fn version(&self) -> Result<Version, CriuError> {
        Criu::version(self)
    }
    fn cpuinfo_check(&self, dir: &Path) -> Result<(), CriuError> {
        Criu::cpuinfo_check(self, dir)
    }
}

impl CriuSession for SwrkSession {
    fn pid(&self) -> u32 {
        SwrkSession::pid(self)
    }
    fn set_log(&mut self, log: PathBuf) {
        SwrkSession::set_log(self, log)
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }
    fn call(
        &mut self,
        op: &'static str,
        request: CriuReq,
        on_notify: &mut NotifyHandler<'_>,
    ) -> Result<CriuResp, CriuError> {
        SwrkSession::call(self, op, request, on_notify)
    }
}

/// The descriptor number the memory channel gets inside CRIU (for `ps.fd`, which CRIU uses from its own table).
pub const MEM_FD: i32 = 4;

/// An image directory held open for CRIU. CRIU opens `images_dir_fd` and `work_dir_fd` through
/// `/proc/<caller>/fd/N`, that is in phaul's descriptor table, so the directory must stay open here until the
/// request is answered.
#[derive(Debug)]
pub struct OpenDir {
    _fd: OwnedFd,
}

/// Options naming `dir` as both images and work directory (logs and stats land there too).
pub fn dir_opts(dir: &Path, log_name: &str) -> Result<(CriuOpts, OpenDir), CriuError> {
    let fd: OwnedFd = File::open(dir)
        .map(OwnedFd::from)
        .map_err(|source| CriuError::Io { op: "opening the image directory", source })?;
    let raw = fd.as_raw_fd();
    let opts = CriuOpts {
        images_dir_fd: raw,
        work_dir_fd: Some(raw),
        log_file: Some(log_name.to_string()),
        log_level: Some(4),
        ..Default::default()
    };
    Ok((opts, OpenDir { _fd: fd }))
}

fn parse_version(resp: CriuResp) -> Result<Version, CriuError> {
    let v = resp.version.ok_or(CriuError::Failed {
        op: "VERSION",
        errmsg: Some("the response carries no version".into()),
        errno: None,
        log: None,
        log_errors: Vec::new(),
    })?;
    Ok(Version {
        major: v.major_number.max(0) as u32,
        minor: v.minor_number.max(0) as u32,
        sublevel: v.sublevel.unwrap_or(0).max(0) as u32,
        gitid: v.gitid.filter(|g| !g.is_empty()),
    })
}

/// FEATURE_CHECK asking about every feature phaul uses.
fn feature_request() -> CriuReq {
    let mut r = req(CriuReqType::FeatureCheck, None);
    r.features = Some(CriuFeatures { mem_track: Some(true), lazy_pages: Some(true), pidfd_store: None });
    r
}

fn parse_features(resp: CriuResp) -> Features {
    let f = resp.features.unwrap_or_default();
    Features { mem_track: f.mem_track.unwrap_or(false), lazy_pages: f.lazy_pages.unwrap_or(false) }
}

/// A request of a type with options.
pub fn req(kind: CriuReqType, opts: Option<CriuOpts>) -> CriuReq {
    CriuReq { r#type: kind as i32, opts, ..Default::default() }
}

/// One running `criu swrk`.
#[derive(Debug)]
pub struct SwrkSession {
    child: Child,
    sock: OwnedFd,
    timeout: Duration,
    log: Option<PathBuf>,
}

impl SwrkSession {
    /// The log file whose error lines go into errors from now on.
    pub fn set_log(&mut self, log: PathBuf) {
        self.log = Some(log);
    }

    /// CRIU's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_errors(&self) -> Vec<String> {
        self.log.as_deref().map(error_lines).unwrap_or_default()
    }

    fn send(&self, op: &'static str, msg: &CriuReq) -> Result<(), CriuError> {
        let buf = msg.encode_to_vec();
        send(self.sock.as_raw_fd(), &buf, MsgFlags::MSG_NOSIGNAL).map_err(|e| {
            if e == nix::errno::Errno::EPIPE || e == nix::errno::Errno::ECONNRESET {
                self.died(op)
            } else {
                CriuError::Io { op, source: e.into() }
            }
        })?;
        Ok(())
    }

    fn died(&self, op: &'static str) -> CriuError {
        CriuError::Died { op, log: self.log.clone(), log_errors: self.log_errors() }
    }

    /// One message from CRIU and the descriptors it passed with it (`orphan-pts-master` passes the pty master).
    fn recv_with_fds(&mut self, op: &'static str, deadline: Instant) -> Result<(CriuResp, Vec<OwnedFd>), CriuError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CriuError::Timeout { op, secs: self.timeout.as_secs() });
            }
            // In short slices: CRIU may die while a child it forked (a half-restored root) keeps its socket
            // open, so the socket alone would never say so.
            let ms = u16::try_from(left.as_millis().min(100)).unwrap_or(100);
            let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) => {
                    if matches!(self.child.try_wait(), Ok(Some(_))) {
                        return Err(self.died(op));
                    }
                    continue;
                }
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(CriuError::Io { op, source: e.into() }),
            }
        }
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (n, fds) =
            sys::recv_with_fds(self.sock.as_fd(), &mut buf).map_err(|source| CriuError::Io { op, source })?;
        if n == 0 {
            return Err(self.died(op));
        }
        if n > MAX_MESSAGE {
            return Err(CriuError::Io {
                op,
                source: io::Error::new(io::ErrorKind::InvalidData, format!("a {n}-byte message from CRIU")),
            });
        }
        let resp = CriuResp::decode(&buf[..n]).map_err(|source| CriuError::Decode { op, source })?;
        Ok((resp, fds))
    }

    /// Sends a request and serves CRIU's notifications until the response arrives.
    pub fn call(
        &mut self,
        op: &'static str,
        request: CriuReq,
        on_notify: &mut NotifyHandler<'_>,
    ) -> Result<CriuResp, CriuError> {
        let deadline = Instant::now() + self.timeout;
        self.send(op, &request)?;
        let mut notify_failure: Option<(String, String)> = None;
        loop {
            let (resp, fds) = self.recv_with_fds(op, deadline)?;
            let kind = CriuReqType::try_from(resp.r#type).unwrap_or(CriuReqType::Empty);
            if kind == CriuReqType::Notify {
                let n = resp.notify.unwrap_or_default();
                let script = n.script.unwrap_or_default();
                log::debug!("CRIU notification {script} (pid {:?}, {} descriptors)", n.pid, fds.len());
                // The descriptor CRIU passed (if any) is open for the handler's call ([`notification_fd`]) and
                // closed after it.
                NOTIFICATION_FD.with(|c| c.set(fds.first().map(|f| f.as_raw_fd())));
                let outcome = on_notify(&script, n.pid);
                NOTIFICATION_FD.with(|c| c.set(None));
                drop(fds);
                let ok = outcome.is_ok();
                if let Err(message) = outcome {
                    notify_failure = Some((script, message));
                }
                let answer =
                    CriuReq { r#type: CriuReqType::Notify as i32, notify_success: Some(ok), ..Default::default() };
                self.send(op, &answer)?;
                continue;
            }
            if !resp.success {
                if let Some((script, message)) = notify_failure {
                    return Err(CriuError::Notify { op, script, message });
                }
                return Err(CriuError::Failed {
                    op,
                    errmsg: resp.cr_errmsg,
                    errno: resp.cr_errno,
                    log: self.log.clone(),
                    log_errors: self.log_errors(),
                });
            }
            if kind != request_type(&request) {
                return Err(CriuError::Unexpected { op, got: kind });
            }
            return Ok(resp);
        }
    }
}

thread_local! {
    static NOTIFICATION_FD: std::cell::Cell<Option<i32>> = const { std::cell::Cell::new(None) };
}

/// Inside a notification handler: the descriptor CRIU passed with the notification (`orphan-pts-master`: the
/// master of the pty it made for the restored tree), open until the handler returns; duplicate it to keep it.
pub fn notification_fd() -> Option<i32> {
    NOTIFICATION_FD.with(|c| c.get())
}

/// The response type CRIU uses for a request (it answers PAGE_SERVER_CHLD as PAGE_SERVER).
fn request_type(r: &CriuReq) -> CriuReqType {
    match CriuReqType::try_from(r.r#type).unwrap_or(CriuReqType::Empty) {
        CriuReqType::PageServerChld => CriuReqType::PageServer,
        t => t,
    }
}

impl Drop for SwrkSession {
    fn drop(&mut self) {
        // Closing our end tells CRIU there are no more requests; it exits by itself.
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        // CRIU may still be unwinding a dump (resuming the tree); give it time before ending it.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        log::warn!("CRIU (pid {}) did not exit 30 s after its session ended; killing it", self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{sendmsg, ControlMessage};
    use phaul_proto::criu::CriuNotify;
    use std::io::{Read, Write};

    /// A notification that carries a descriptor (CRIU's `orphan-pts-master`) reaches the handler with it open.
    #[test]
    fn a_descriptor_passed_with_a_notification_reaches_the_handler() {
        let (ours, criu_end) = sys::seqpacket_pair().expect("socketpair");
        // A stand-in for CRIU's process: the session only needs a child to watch.
        let child = Command::new("true").spawn().expect("spawn true");
        let mut s = SwrkSession { child, sock: ours, timeout: Duration::from_secs(5), log: None };
        let (pipe_r, pipe_w) = nix::unistd::pipe().expect("pipe");
        let mut pipe_r = File::from(pipe_r);
        // What CRIU would send: the notification with the descriptor, then the response to RESTORE.
        let notify = CriuResp {
            r#type: CriuReqType::Notify as i32,
            success: true,
            notify: Some(CriuNotify { script: Some("orphan-pts-master".into()), pid: None }),
            ..Default::default()
        }
        .encode_to_vec();
        let fds = [pipe_w.as_raw_fd()];
        sendmsg::<()>(
            criu_end.as_raw_fd(),
            &[std::io::IoSlice::new(&notify)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        drop(pipe_w);
        let done =
            CriuResp { r#type: CriuReqType::Restore as i32, success: true, ..Default::default() }.encode_to_vec();
        send(criu_end.as_raw_fd(), &done, MsgFlags::empty()).expect("send");
        let mut seen = Vec::new();
        let r = s.call("RESTORE", req(CriuReqType::Restore, None), &mut |script, _| {
            let fd = notification_fd().ok_or("no descriptor")?;
            let mut f = File::from(phaul_abi::dup_fd(fd).map_err(|e| e.to_string())?);
            f.write_all(b"master").map_err(|e| e.to_string())?;
            seen.push(script.to_string());
            Ok(())
        });
        r.expect("call");
        assert_eq!(seen, ["orphan-pts-master"]);
        assert_eq!(notification_fd(), None, "the descriptor outlived the handler");
        let mut got = String::new();
        pipe_r.read_to_string(&mut got).expect("read");
        assert_eq!(got, "master");
    }
}
