//! A recording stand-in for CRIU, for unit tests of the engine: every request and notification is written to a
//! shared log, and each request type answers as its script says (success, a list of notifications first, a
//! failure, or CRIU dying), so a test can check the order of actions at each failure point without CRIU.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phaul_proto::criu::{CriuReq, CriuReqType, CriuResp};

use super::rpc::{CriuBackend, CriuError, CriuSession, Features, NotifyHandler, Version};

/// How the fake answers one request.
#[derive(Debug, Clone)]
pub enum Script {
    /// Success; `pid` goes into the response where the request type has one (RESTORE, PAGE_SERVER).
    Ok { pid: Option<i32> },
    /// These notifications first, in order, each naming `pid`; then success, or failure if one of them failed
    /// (as CRIU does: a failed post-dump resumes the tree and fails the dump).
    Notify { scripts: Vec<&'static str>, pid: Option<i32> },
    /// CRIU fails the request with this message.
    Fail(String),
    /// CRIU exits: at once (`after: None`) or right after the named notification was answered.
    Die { after: Option<&'static str> },
}

#[derive(Debug, Default)]
struct State {
    log: Vec<String>,
    scripts: HashMap<String, VecDeque<Script>>,
    next_pid: u32,
}

/// The fake. Clones share the log and the scripts.
#[derive(Debug, Clone, Default)]
pub struct FakeCriu {
    state: Arc<Mutex<State>>,
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeCriu {
    pub fn new() -> FakeCriu {
        FakeCriu::default()
    }

    /// Queues how the next request of type `op` (as named in calls: "DUMP", "RESTORE", ...) answers. Requests
    /// with nothing queued succeed.
    pub fn script(&self, op: &str, s: Script) -> &Self {
        lock(&self.state).scripts.entry(op.to_string()).or_default().push_back(s);
        self
    }

    /// Appends a line to the shared log (tests record their own fakes' actions here too, so that one log shows
    /// the order of everything).
    pub fn note(&self, line: impl Into<String>) {
        lock(&self.state).log.push(line.into());
    }

    /// Everything recorded so far.
    pub fn log(&self) -> Vec<String> {
        lock(&self.state).log.clone()
    }
}

impl CriuBackend for FakeCriu {
    fn path(&self) -> &Path {
        Path::new("/nonexistent/fake-criu")
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs(5)
    }
    fn session(&self, _fds: Vec<(OwnedFd, i32)>, _stderr: Option<&Path>) -> Result<Box<dyn CriuSession>, CriuError> {
        lock(&self.state).next_pid += 1;
        // A live pid (the test process itself), so that checks that CRIU is still there pass.
        Ok(Box::new(FakeSession { criu: self.clone(), pid: std::process::id(), dead: false }))
    }
    fn preflight(&self, cpuinfo_dir: Option<&Path>) -> Result<(Version, Features, Option<Vec<u8>>), CriuError> {
        self.note("criu preflight");
        let v = Version { major: 4, minor: 2, sublevel: 1, gitid: None };
        Ok((v, Features { mem_track: false, lazy_pages: false }, cpuinfo_dir.map(|_| b"cpuinfo".to_vec())))
    }
    fn version(&self) -> Result<Version, CriuError> {
        Ok(Version { major: 4, minor: 2, sublevel: 1, gitid: None })
    }
    fn cpuinfo_check(&self, _dir: &Path) -> Result<(), CriuError> {
        self.note("criu cpuinfo-check");
        Ok(())
    }
}

#[derive(Debug)]
struct FakeSession {
    criu: FakeCriu,
    pid: u32,
    dead: bool,
}

fn response(kind: CriuReqType, success: bool, pid: Option<i32>) -> CriuResp {
    let mut r = CriuResp { r#type: kind as i32, success, ..Default::default() };
    if let Some(pid) = pid {
        match kind {
            CriuReqType::Restore => {
                r.restore = Some(phaul_proto::criu::CriuRestoreResp { pid });
            }
            CriuReqType::PageServer => {
                r.ps = Some(phaul_proto::criu::CriuPageServerInfo { pid: Some(pid), ..Default::default() });
            }
            _ => {}
        }
    }
    if kind == CriuReqType::WaitPid {
        r.status = Some(0);
    }
    r
}

impl CriuSession for FakeSession {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn set_log(&mut self, _log: PathBuf) {}
    fn call(&mut self, op: &'static str, req: CriuReq, notify: &mut NotifyHandler<'_>) -> Result<CriuResp, CriuError> {
        if self.dead {
            return Err(CriuError::Died { op, log: None, log_errors: Vec::new() });
        }
        let kind = match CriuReqType::try_from(req.r#type).unwrap_or(CriuReqType::Empty) {
            CriuReqType::PageServerChld => CriuReqType::PageServer,
            k => k,
        };
        self.criu.note(format!("criu {op}"));
        let script = lock(&self.criu.state).scripts.get_mut(op).and_then(|q| q.pop_front());
        match script.unwrap_or(Script::Ok { pid: None }) {
            Script::Ok { pid } => Ok(response(kind, true, pid)),
            Script::Fail(m) => {
                self.criu.note(format!("criu {op} failed"));
                Err(CriuError::Failed { op, errmsg: Some(m), errno: None, log: None, log_errors: Vec::new() })
            }
            Script::Die { after: None } => {
                self.dead = true;
                self.criu.note(format!("criu died in {op}"));
                Err(CriuError::Died { op, log: None, log_errors: Vec::new() })
            }
            Script::Notify { scripts, pid } => {
                let mut failed: Option<(String, String)> = None;
                for s in scripts {
                    let r = notify(s, pid);
                    self.criu.note(format!("notify {s} -> {}", if r.is_ok() { "ok" } else { "failed" }));
                    if let Err(m) = r {
                        failed = Some((s.to_string(), m));
                        break;
                    }
                }
                match failed {
                    Some((script, message)) => Err(CriuError::Notify { op, script, message }),
                    None => Ok(response(kind, true, pid)),
                }
            }
            Script::Die { after: Some(at) } => {
                let r = notify(at, None);
                self.criu.note(format!("notify {at} -> {}", if r.is_ok() { "ok" } else { "failed" }));
                self.dead = true;
                self.criu.note(format!("criu died in {op}"));
                Err(CriuError::Died { op, log: None, log_errors: Vec::new() })
            }
        }
    }
}
