//! The fault-injection hook of the test suite. Inactive unless the environment has both
//! `PHAUL_TEST_FAULT_AT=POINT[#N]` and `PHAUL_TEST_FAULT_FILE=PATH`; then, the N-th time (default: the first)
//! phaul reaches POINT, it writes one JSON line `{"point", "pid", "criu_pids"}` to PATH (atomically) and stops
//! itself with SIGSTOP. The test kills a process, cuts the link or does nothing, and continues it with SIGCONT.
//!
//! Points are named `SIDE:EVENT:WHAT`: SIDE is `src` or `dst`; EVENT is `send` (just before a message goes out),
//! `recv` (just after one arrived), `notify` (inside a CRIU notification, before it is handled) or `step` (an
//! engine step, e.g. `src:step:committing`, after the journal has recorded it).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

struct Armed {
    point: String,
    nth: u32,
    file: String,
    seen: AtomicU32,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let at = std::env::var("PHAUL_TEST_FAULT_AT").ok().filter(|v| !v.is_empty())?;
            let file = std::env::var("PHAUL_TEST_FAULT_FILE").ok().filter(|v| !v.is_empty())?;
            let (point, nth) = match at.rsplit_once('#') {
                Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
                None => (at, 1),
            };
            Some(Armed { point, nth: nth.max(1), file, seen: AtomicU32::new(0) })
        })
        .as_ref()
}

fn criu_pids() -> &'static Mutex<Vec<u32>> {
    static PIDS: OnceLock<Mutex<Vec<u32>>> = OnceLock::new();
    PIDS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Records a CRIU process this phaul drives (named in the hook's report), until [`criu_gone`].
pub(crate) fn criu_started(pid: u32) {
    if armed().is_some() {
        criu_pids().lock().unwrap_or_else(|p| p.into_inner()).push(pid);
    }
}

pub(crate) fn criu_gone(pid: u32) {
    if armed().is_some() {
        criu_pids().lock().unwrap_or_else(|p| p.into_inner()).retain(|p| *p != pid);
    }
}

/// Marks reaching `point` (see the module documentation).
pub(crate) fn point(point: &str) {
    let Some(a) = armed() else { return };
    if a.point != point {
        return;
    }
    let n = a.seen.fetch_add(1, Ordering::SeqCst) + 1;
    if n != a.nth {
        return;
    }
    let pids = criu_pids().lock().unwrap_or_else(|p| p.into_inner()).clone();
    let line = serde_json::json!({ "point": point, "pid": std::process::id(), "criu_pids": pids }).to_string();
    let tmp = format!("{}.tmp{}", a.file, std::process::id());
    if std::fs::write(&tmp, format!("{line}\n")).and_then(|_| std::fs::rename(&tmp, &a.file)).is_err() {
        log::error!("fault hook: cannot write {}", a.file);
        return;
    }
    log::warn!("fault hook: stopped at {point}");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    log::warn!("fault hook: continued after {point}");
}

/// `point(&format!(...))` without formatting when the hook is off.
pub(crate) fn at(side: &str, event: &str, what: &str) {
    if armed().is_some() {
        point(&format!("{side}:{event}:{what}"));
    }
}
