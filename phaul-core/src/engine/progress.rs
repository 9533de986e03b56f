//! Progress: on a terminal, the phase, the round, bytes and rate on one line of standard error (an indicatif
//! spinner; nothing when standard error is not a terminal); and for programs that drive phaul, the same as JSON lines on a status
//! descriptor (`--status-fd`, [`StatusSink`]), whose schema is written down in docs/status-fd.md.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The status stream's schema: every line carries `"schema": STATUS_SCHEMA`. A new field is added without a new
/// version; a field removed or changed in meaning gets one.
pub const STATUS_SCHEMA: &str = "phaul-status/1";

/// How many status lines may wait for a slow reader; beyond that lines are dropped (and counted), never waited for.
const STATUS_QUEUE: usize = 4096;

/// Where status lines go: one JSON object per line, to a file (`--status-fd`), or to a callback of a program
/// that embeds phaul-core ([`StatusSink::callback`]). The engine never waits for the reader: lines go through a
/// bounded queue to a writer thread, a full queue drops lines (the next line written says how many in
/// `dropped`), and a reader that goes away turns the sink off (logged once). [`StatusSink::finish`] waits, bounded,
/// for the queue to drain.
pub struct StatusSink {
    out: Mutex<Option<Target>>,
    started: Instant,
    dropped: std::sync::atomic::AtomicU64,
}

enum Target {
    Queue { tx: std::sync::mpsc::SyncSender<String>, writer: std::thread::JoinHandle<()> },
    Callback(Arc<dyn Fn(&Value) + Send + Sync>),
}

/// Writes all of `bytes`, waiting (on this writer thread only) while a non-blocking descriptor is full.
fn write_all_waiting(out: &mut std::fs::File, mut bytes: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    while !bytes.is_empty() {
        match out.write(bytes) {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "the reader took nothing")),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fds = [nix::poll::PollFd::new(out.as_fd(), nix::poll::PollFlags::POLLOUT)];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl std::fmt::Debug for StatusSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusSink").field("started", &self.started).finish_non_exhaustive()
    }
}

impl StatusSink {
    pub fn new(mut out: std::fs::File) -> Arc<StatusSink> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(STATUS_QUEUE);
        let writer = std::thread::spawn(move || {
            for line in rx {
                if let Err(e) = write_all_waiting(&mut out, line.as_bytes()) {
                    log::warn!(
                        "the status descriptor no longer takes lines ({e}); status output stops, the migration goes on"
                    );
                    return;
                }
            }
        });
        Arc::new(StatusSink {
            out: Mutex::new(Some(Target::Queue { tx, writer })),
            started: Instant::now(),
            dropped: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Events as values, handed to `f` (on the engine's threads: keep it short) instead of written as lines.
    pub fn callback(f: impl Fn(&Value) + Send + Sync + 'static) -> Arc<StatusSink> {
        Arc::new(StatusSink {
            out: Mutex::new(Some(Target::Callback(Arc::new(f)))),
            started: Instant::now(),
            dropped: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Sends `{"schema", "t", "event", ...fields}`; `fields` must be a JSON object. Never blocks on the reader.
    pub fn emit(&self, event: &str, fields: Value) {
        self.send(event, fields, None);
    }

    /// As [`StatusSink::emit`], but waits up to `timeout` for room in the queue (for the last line, `end`).
    pub fn emit_waiting(&self, event: &str, fields: Value, timeout: Duration) {
        self.send(event, fields, Some(Instant::now() + timeout));
    }

    fn send(&self, event: &str, fields: Value, deadline: Option<Instant>) {
        use std::sync::atomic::Ordering;
        let mut line = json!({ "schema": STATUS_SCHEMA, "t": self.started.elapsed().as_secs_f64(), "event": event });
        if let (Some(l), Value::Object(f)) = (line.as_object_mut(), fields) {
            l.extend(f);
        }
        let callback = {
            let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
            match out.as_mut() {
                Some(Target::Queue { tx, .. }) => {
                    let dropped = self.dropped.swap(0, Ordering::SeqCst);
                    if dropped > 0 {
                        if let Some(l) = line.as_object_mut() {
                            l.insert("dropped".into(), Value::from(dropped));
                        }
                    }
                    let mut text = line.to_string();
                    text.push('\n');
                    loop {
                        match tx.try_send(text) {
                            Ok(()) => break,
                            Err(std::sync::mpsc::TrySendError::Full(t))
                                if deadline.is_some_and(|d| Instant::now() < d) =>
                            {
                                text = t;
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                                self.dropped.fetch_add(dropped + 1, Ordering::SeqCst);
                                break;
                            }
                            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                                *out = None;
                                break;
                            }
                        }
                    }
                    None
                }
                Some(Target::Callback(f)) => Some(f.clone()),
                None => None,
            }
        };
        // Outside the lock: a callback may take its time, or emit again.
        if let Some(f) = callback {
            f(&line);
        }
    }

    /// No more lines: waits (at most `timeout`) until the queued ones are written.
    pub fn finish(&self, timeout: Duration) {
        let target = self.out.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(Target::Queue { tx, writer }) = target {
            drop(tx);
            let deadline = Instant::now() + timeout;
            while !writer.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if writer.is_finished() {
                let _ = writer.join();
            } else {
                log::warn!("the status reader took more than {timeout:?} for the last lines; leaving them");
            }
        }
    }
}

/// The phases a migration goes through, as the status stream names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Checks before anything is frozen (lazy pages, the destination's CPU).
    Preflight,
    /// Greeting the destination and setting up the session.
    Setup,
    /// A pre-copy round (pre-dump while the workload runs).
    PreCopy,
    /// A filesystem round while the workload runs.
    FsRound,
    /// The workload is stopped (restart mode).
    Stop,
    /// The final dump, the workload frozen.
    FinalDump,
    /// The final filesystem round, the workload frozen or stopped.
    FsFinal,
    /// Images sent to the destination.
    Images,
    /// The restore on the destination (held until the commit).
    Restore,
    /// The commit between the two hosts.
    Commit,
    /// After the outcome: the destination is told it, and both sides clean up.
    Finish,
    /// The workload starts on the destination (restart mode).
    Start,
    /// Rolling back: the workload resumes or restarts on the source.
    Rollback,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preflight => "preflight",
            Phase::Setup => "setup",
            Phase::PreCopy => "pre-copy",
            Phase::FsRound => "fs-round",
            Phase::Stop => "stop",
            Phase::FinalDump => "final-dump",
            Phase::FsFinal => "fs-final",
            Phase::Images => "images",
            Phase::Restore => "restore",
            Phase::Commit => "commit",
            Phase::Finish => "finish",
            Phase::Start => "start",
            Phase::Rollback => "rollback",
        }
    }
}

#[derive(Debug)]
pub struct Progress {
    /// The terminal line (indicatif), when wanted and standard error is a terminal.
    bar: Option<indicatif::ProgressBar>,
    status: Option<Arc<StatusSink>>,
}

/// A spinner on standard error with the elapsed time and the phase; `None` unless stderr is a terminal.
fn terminal_bar() -> Option<indicatif::ProgressBar> {
    if !crate::sys::stderr_is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    let style = indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}

impl Progress {
    /// Shows progress on the terminal only when `wanted` and standard error is a terminal; on `status` always.
    /// Plugins' own progress reports (`HostServices::progress`) are shown on the same line (at most ten times a
    /// second) and sent as `plugin` events, for as long as this lives.
    pub fn new(wanted: bool, status: Option<Arc<StatusSink>>) -> Progress {
        let bar = if wanted { terminal_bar() } else { None };
        let p = Progress { bar, status };
        if p.bar.is_some() || p.status.is_some() {
            let status = p.status.clone();
            let bar = p.bar.clone();
            let last = Mutex::new(None::<Instant>);
            crate::plugins::services::set_progress_sink(Some(Box::new(move |plugin, what, done, total| {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                let complete = total > 0 && done >= total;
                if !complete && last.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
                    return;
                }
                *last = Some(Instant::now());
                if let Some(s) = &status {
                    s.emit("plugin", json!({ "plugin": plugin, "what": what, "done": done, "total": total }));
                }
                if let Some(b) = &bar {
                    let of = if total > 0 { format!(" of {total}") } else { String::new() };
                    b.set_message(format!("{plugin}: {what} {done}{of}"));
                }
            })));
        }
        p
    }

    /// The status sink, if there is one.
    pub fn status(&self) -> Option<&Arc<StatusSink>> {
        self.status.as_ref()
    }

    pub fn phase(&mut self, phase: Phase, text: &str) {
        if let Some(s) = &self.status {
            s.emit("phase", json!({ "phase": phase.as_str(), "text": text }));
        }
        self.line(text);
    }

    fn line(&mut self, text: &str) {
        log::info!("{text}");
        if let Some(b) = &self.bar {
            b.set_message(text.to_string());
        }
    }

    /// A memory round ended: `bytes` written in `secs`.
    pub fn round(&mut self, round: u32, kind: &str, bytes: u64, secs: f64) {
        let rate = if secs > 0.0 { bytes as f64 / secs } else { 0.0 };
        if let Some(s) = &self.status {
            s.emit(
                "round",
                json!({ "round": round, "kind": kind, "bytes": bytes, "secs": secs, "rate_bytes_s": rate }),
            );
        }
        let mib = (1u64 << 20) as f64;
        self.line(&format!("round {round} ({kind}): {:.1} MiB at {:.0} MiB/s", bytes as f64 / mib, rate / mib));
    }

    /// A filesystem round ended: `bytes` sent in `secs`, `remaining` still to send where the driver knows.
    pub fn fs_round(&mut self, round: u32, frozen: bool, bytes: u64, secs: f64, remaining: Option<u64>) {
        if let Some(s) = &self.status {
            let rate = if secs > 0.0 { bytes as f64 / secs } else { 0.0 };
            s.emit(
                "fs_round",
                json!({ "round": round, "frozen": frozen, "bytes": bytes, "secs": secs, "rate_bytes_s": rate,
                        "remaining_bytes": remaining }),
            );
        }
    }

    /// The policy's view after a pre-copy round: the frozen time a final dump now would take, and how fast the
    /// workload dirties memory.
    pub fn prediction(&mut self, round: u32, downtime_ms: Option<f64>, dirty_bytes_s: Option<f64>) {
        if let Some(s) = &self.status {
            s.emit(
                "prediction",
                json!({ "round": round, "predicted_downtime_ms": downtime_ms, "dirty_rate_bytes_s": dirty_bytes_s }),
            );
        }
    }

    /// The session's journal state changed (`prepared`, `frozen`, `commit-sent`, `in-doubt`, ...).
    pub fn state(&mut self, state: &str, note: &str) {
        if let Some(s) = &self.status {
            s.emit("state", json!({ "state": state, "note": note }));
        }
    }

    /// Ends the terminal line, leaving its last message.
    pub fn done(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.bar.is_some() || self.status.is_some() {
            crate::plugins::services::set_progress_sink(None);
        }
        self.done();
    }
}
