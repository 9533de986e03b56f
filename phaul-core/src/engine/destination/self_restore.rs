//! The restore done by the host type itself (`HostType::restores_itself`: liblxc, vzctl), which runs CRIU as a
//! command. CRIU's notifications then reach phaul only through the action script CRIU runs: phaul writes one into
//! the round directory (`phaul __notify SOCKET`, see [`run_helper`]), listens on a unix socket beside it, and
//! answers each action the way it answers CRIU's RPC notifications, so the hold works as with its own restores:
//! `post-restore` waits for the session's decision, and a refusal makes CRIU kill the tree it restored.
//!
//! The host type is not told of these notifications (its own tool sees CRIU's actions, and it is busy inside
//! `restore`). A restore that returns without phaul's `post-restore` having been run was never held: the tree it
//! made runs uncommitted, so it is discarded and the restore fails.
//!
//! The helper's protocol, one exchange per action: the helper sends `ACTION PID\n` (PID 0 when CRIU gave none),
//! phaul answers `ok\n` or `fail REASON\n`; the helper exits 0 or 1, which is what CRIU acts on.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use abi_stable::std_types::{RString, RVec};
use phaul_abi::{CriuOptions, HostTypeBox, KeyValue, RestoreRequest};

use super::{lock, Event};
use crate::criu::{command_line_args, CriuError};
use crate::engine::fault;

/// The environment variable of CRIU's action scripts naming the action, and the one naming the restored root.
const ACTION_ENV: &str = "CRTOOLS_SCRIPT_ACTION";
const INIT_PID_ENV: &str = "CRTOOLS_INIT_PID";
/// The longest line either side of the helper's socket sends.
const MAX_LINE: u64 = 4096;

pub(super) struct Job {
    /// The round directory with the images.
    pub dir: PathBuf,
    /// The phaul executable that runs `__notify`.
    pub helper: PathBuf,
    /// The CRIU executable phaul uses (the request's `criu`).
    pub criu_path: PathBuf,
    pub options: CriuOptions,
    pub htype: Arc<Mutex<HostTypeBox>>,
    pub htype_name: String,
    pub events: Sender<Event>,
    /// `true`: let the held tree run; `false` (or the sender gone): discard it.
    pub decisions: Receiver<bool>,
}

pub(super) fn spawn(job: Job) {
    std::thread::spawn(move || run(job));
}

fn failed(dir: &Path, message: String) -> CriuError {
    let log = dir.join("restore.log");
    let log_errors = if log.is_file() { crate::criu::error_lines(&log) } else { Vec::new() };
    CriuError::Failed {
        op: "the host type's restore",
        errmsg: Some(message),
        errno: None,
        log: log.is_file().then_some(log),
        log_errors,
    }
}

/// A new directory only this user can enter, with a short path: `TMPDIR/phaul-notify-PID-N`.
fn short_private_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = std::env::temp_dir();
    // Those of a phaul serve that died during a restore go first.
    for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("phaul-notify-").and_then(|r| r.split('-').next()) else { continue };
        if pid.parse::<i32>().is_ok_and(|p| !crate::sys::pid_alive(p)) {
            let _ = std::fs::remove_file(e.path().join("s"));
            let _ = std::fs::remove_dir(e.path());
        }
    }
    let d = tmp.join(format!("phaul-notify-{}-{n}", std::process::id()));
    // `create` fails on anything already there (a directory or a planted symbolic link).
    std::fs::DirBuilder::new().mode(0o700).create(&d)?;
    Ok(d)
}

/// Writes the action script CRIU is to run: it hands the action to `phaul __notify` on `socket`.
fn write_script(dir: &Path, helper: &Path, socket: &Path) -> std::io::Result<PathBuf> {
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let script = dir.join("phaul-action-script");
    let text = format!(
        "#!/bin/sh\n# Written by phaul: CRIU's actions go to the restoring phaul serve.\nexec {} __notify {}\n",
        quote(helper),
        quote(socket)
    );
    std::fs::write(&script, text)?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700))?;
    Ok(script)
}

fn run(job: Job) {
    let Job { dir, helper, criu_path, options, htype, htype_name, events, decisions } = job;
    // A unix socket path has at most 107 bytes, so the socket lives in a private directory of its own under the
    // temporary directory (made here, never one that already exists), not beside the images.
    let sock_dir = match short_private_dir() {
        Ok(d) => d,
        Err(e) => {
            let e = failed(&dir, format!("cannot make a private directory for the action script's socket ({e})"));
            let _ = events.send(Event::RestoreDone(Err(e)));
            return;
        }
    };
    let socket = sock_dir.join("s");
    let prepared = UnixListener::bind(&socket).and_then(|l| {
        l.set_nonblocking(true)?;
        write_script(&dir, &helper, &socket).map(|s| (l, s))
    });
    let (listener, script) = match prepared {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(&socket);
            let _ = std::fs::remove_dir(&sock_dir);
            let e =
                failed(&dir, format!("cannot set up the action script for the host type in {} ({e})", dir.display()));
            let _ = events.send(Event::RestoreDone(Err(e)));
            return;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let held = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let listen = {
        let (stop, held, events) = (stop.clone(), held.clone(), events.clone());
        std::thread::spawn(move || serve_actions(listener, &stop, &held, &events, &decisions, started))
    };
    let mut more: Vec<KeyValue> = vec![KeyValue::new("criu", criu_path.display().to_string())];
    more.push(KeyValue::new("log", "restore.log"));
    let req = RestoreRequest {
        images_dir: RString::from(dir.display().to_string()),
        action_script: RString::from(script.display().to_string()),
        criu_args: command_line_args(&options).into_iter().map(RString::from).collect::<RVec<_>>(),
        criu_options: options.to_list(),
        more: more.into(),
    };
    log::info!("the host type '{htype_name}' restores the workload itself from {}", dir.display());
    let result = lock(&htype).restore(&req).into_result();
    stop.store(true, Ordering::SeqCst);
    let _ = listen.join();
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_dir(&sock_dir);
    let outcome = match result {
        Ok(pid) if held.load(Ordering::SeqCst) => {
            log::info!("the host type '{htype_name}' restored the workload as pid {pid}");
            Ok(())
        }
        Ok(pid) => {
            // Never held: it runs beside the source's copy's hold without a commit. It must go.
            if pid > 1 {
                super::kill_restored_tree(pid);
            }
            Err(failed(
                &dir,
                format!(
                    "the host type '{htype_name}' restored pid {pid} without running phaul's action script ({}), so the restore could not be held until the commit; the restored tree was killed. Pass the action script to CRIU (--action-script)",
                    script.display()
                ),
            ))
        }
        Err(e) => Err(failed(&dir, format!("the host type '{htype_name}' failed to restore: {e}"))),
    };
    let _ = events.send(Event::RestoreDone(outcome));
}

/// Answers the helper's connections until `stop`.
fn serve_actions(
    listener: UnixListener,
    stop: &AtomicBool,
    held: &AtomicBool,
    events: &Sender<Event>,
    decisions: &Receiver<bool>,
    started: Instant,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((conn, _)) => {
                if let Err(e) = answer(conn, held, events, decisions, started) {
                    log::warn!("the action script's connection failed: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                log::warn!("the action script's socket failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn answer(
    conn: UnixStream,
    held: &AtomicBool,
    events: &Sender<Event>,
    decisions: &Receiver<bool>,
    started: Instant,
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(&conn, MAX_LINE)).read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let action = words.next().unwrap_or_default().to_string();
    let pid = words.next().and_then(|p| p.parse::<i32>().ok()).filter(|p| *p > 0);
    fault::at("dst", "notify", &action);
    if action.is_empty() {
        return (&conn).write_all(b"fail the action script sent no action\n");
    }
    if action == "post-restore" {
        held.store(true, Ordering::SeqCst);
    }
    let verdict = super::restore::on_restore_action(&action, pid, events, decisions, started);
    let mut w = &conn;
    match verdict {
        Ok(()) => w.write_all(b"ok\n"),
        Err(why) => w.write_all(format!("fail {}\n", why.replace('\n', " ")).as_bytes()),
    }
}

/// `phaul __notify SOCKET`: CRIU's action script. Sends the action CRIU runs it for to the restoring phaul and
/// exits as phaul answers (0: go on; 1: CRIU fails the restore and kills what it restored). Any action phaul does
/// not hear of (no socket, no answer) fails, so a tree is never let run behind the session's back.
pub fn run_helper(socket: &Path) -> Result<(), String> {
    let action = std::env::var(ACTION_ENV).map_err(|_| {
        format!("{ACTION_ENV} is not set: phaul __notify is CRIU's action script, not a command to run by hand")
    })?;
    let pid = std::env::var(INIT_PID_ENV).ok().and_then(|p| p.trim().parse::<i32>().ok()).unwrap_or(0);
    let conn = UnixStream::connect(socket).map_err(|e| {
        format!("cannot reach the restoring phaul at {} ({e}); the restore is refused", socket.display())
    })?;
    let mut w = &conn;
    w.write_all(format!("{action} {pid}\n").as_bytes()).map_err(|e| format!("cannot tell phaul of {action} ({e})"))?;
    let mut reply = String::new();
    // No timeout: the hold lasts as long as the session decides (phaul bounds it); phaul's death ends it (EOF).
    BufReader::new(std::io::Read::take(&conn, MAX_LINE))
        .read_line(&mut reply)
        .map_err(|e| format!("no answer from phaul to {action} ({e})"))?;
    match reply.trim_end() {
        "ok" => Ok(()),
        r if r.starts_with("fail") => Err(format!("phaul refused {action}: {}", r.trim_start_matches("fail").trim())),
        "" => Err(format!("phaul ended without answering {action}; the restore is refused")),
        r => Err(format!("phaul answered {action} with {r:?}")),
    }
}
