//! The main loop shared by every kind: ticks, periodic state publication and probe handling.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use serde_json::{Map, Value};

use crate::state::{self, CommonState};

/// How often the counter ticks.
pub const TICK: Duration = Duration::from_millis(50);
/// How often the state file is republished without a probe.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// How often the main loop looks at the probe flag (the brief asks for at most 20 ms).
pub const POLL: Duration = Duration::from_millis(10);
/// If the loop finds itself this far behind its schedule (e.g. after being frozen for a checkpoint), it
/// resumes from now instead of catching up with a burst of ticks.
const MAX_LAG: Duration = Duration::from_secs(1);

/// Set by the `SIGUSR1` handler; consumed by the main loop.
static PROBE_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_probe_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    PROBE_REQUESTED.store(true, Ordering::SeqCst);
}

/// Install the `SIGUSR1` handler that requests a probe.
pub fn install_probe_handler() -> nix::Result<()> {
    let action = SigAction::new(SigHandler::Handler(on_probe_signal), SaFlags::SA_RESTART, SigSet::empty());
    // SAFETY: the handler only stores to a static atomic, which is async-signal-safe, and the previous
    // disposition (the default one) is not a Rust handler that could be relied upon elsewhere.
    unsafe { sigaction(Signal::SIGUSR1, &action) }?;
    Ok(())
}

/// What a workload kind provides to the main loop.
pub trait Workload {
    /// The kind's name as published in `kind`.
    fn kind(&self) -> &'static str;

    /// Called from the main loop on every tick, after the counter increments.
    fn tick(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// The self-check run when a probe arrives.
    fn check(&mut self) -> Result<(), String>;

    /// Problems noticed continuously (e.g. by background threads), evaluated at each publication.
    fn health(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// The kind's own fields of the state file.
    fn fields(&self) -> Map<String, Value>;
}

/// Publish a failure state for a workload that could not even start, so the test sees why.
pub fn publish_failure(dir: &Path, kind: &str, detail: &str) {
    let common = CommonState {
        kind: kind.to_string(),
        counter: 0,
        nonce: 0,
        ok: false,
        detail: detail.to_string(),
        ns_pid: nix::unistd::getpid().as_raw(),
    };
    // Nowhere left to report a failure to write the failure.
    let _ = state::write_state(dir, &state::render(&common, Map::new()));
}

struct Runner<'a> {
    dir: &'a Path,
    counter: u64,
    nonce: u64,
    check_result: Result<(), String>,
    tick_error: Option<String>,
    ns_pid: i32,
}

impl Runner<'_> {
    fn publish(&mut self, w: &mut dyn Workload) {
        let mut problems = Vec::new();
        if let Some(e) = &self.tick_error {
            problems.push(e.clone());
        }
        if let Err(e) = w.health() {
            problems.push(e);
        }
        if let Err(e) = &self.check_result {
            problems.push(e.clone());
        }
        let common = CommonState {
            kind: w.kind().to_string(),
            counter: self.counter,
            nonce: self.nonce,
            ok: problems.is_empty(),
            detail: problems.join("; "),
            ns_pid: self.ns_pid,
        };
        // A failed write (e.g. the state directory vanished) cannot be reported anywhere; the next
        // publication retries.
        let _ = state::write_state(self.dir, &state::render(&common, w.fields()));
    }

    fn probe(&mut self, w: &mut dyn Workload) {
        match state::read_probe(self.dir) {
            Ok(n) => {
                self.check_result = w.check();
                self.nonce = n;
            }
            Err(e) => self.check_result = Err(e),
        }
        self.publish(w);
    }
}

/// Run `w` forever: tick every [`TICK`], publish every [`PUBLISH_EVERY`], answer probes within [`POLL`].
pub fn run(dir: &Path, w: &mut dyn Workload) -> ! {
    let mut r = Runner {
        dir,
        counter: 0,
        nonce: 0,
        check_result: Ok(()),
        tick_error: None,
        ns_pid: nix::unistd::getpid().as_raw(),
    };
    r.publish(w);
    let mut next_tick = Instant::now() + TICK;
    let mut next_publish = Instant::now() + PUBLISH_EVERY;
    loop {
        if PROBE_REQUESTED.swap(false, Ordering::SeqCst) {
            r.probe(w);
        }
        let now = Instant::now();
        if now >= next_tick {
            r.counter += 1;
            if let Err(e) = w.tick() {
                r.tick_error.get_or_insert(e);
            }
            next_tick += TICK;
            if now.saturating_duration_since(next_tick) > MAX_LAG {
                next_tick = now + TICK;
            }
        }
        if now >= next_publish {
            r.publish(w);
            next_publish += PUBLISH_EVERY;
            if now.saturating_duration_since(next_publish) > MAX_LAG {
                next_publish = now + PUBLISH_EVERY;
            }
        }
        std::thread::sleep(POLL);
    }
}
