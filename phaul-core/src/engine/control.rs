//! The source's end of the control channel: a reader thread hands every message over, so every wait has a
//! deadline that names who did not answer what, and a destination's unasked abort is acted on at once even while
//! the source sits inside a CRIU request (its memory channel is shut down, so CRIU's writes fail and the dump
//! ends in seconds instead of at a timeout).

use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phaul_proto::wire::envelope::Body;
use phaul_proto::wire::Failure;

use crate::transport::Channel;
use crate::wire::{self, WireError};

/// A bound on a wait.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub at: Instant,
    /// The option that set it, for the message (`--timeout`, `--max-frozen`, `--resolve-timeout`).
    pub bound: &'static str,
    pub secs: u64,
}

impl Deadline {
    pub fn after(d: Duration, bound: &'static str) -> Deadline {
        Deadline { at: Instant::now() + d, bound, secs: d.as_secs().max(1) }
    }

    /// The earlier of two deadlines.
    pub fn min(self, other: Deadline) -> Deadline {
        if other.at < self.at {
            other
        } else {
            self
        }
    }

    pub fn passed(&self) -> bool {
        Instant::now() >= self.at
    }

    pub fn left(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }
}

/// What the destination said unasked: it ended the session.
pub(crate) type PeerAbort = Arc<Mutex<Option<Failure>>>;

/// Post-copy: the commit the reader thread sends by itself as soon as the destination holds its copy, while the
/// source sits inside CRIU's DUMP request serving pages (see [`Control::arm_auto_commit`]).
pub(crate) struct AutoCommit {
    /// Not after this (the freeze bound).
    pub deadline: Instant,
    /// Records the decision durably; `false` means it could not be recorded, and then it is not sent.
    pub record: Box<dyn FnMut() -> bool + Send>,
    /// Set to stop it (the migration is being abandoned).
    pub cancelled: Arc<std::sync::atomic::AtomicBool>,
}

/// What the reader thread saw of the commit.
#[derive(Debug, Default)]
pub(crate) struct CommitSeen {
    /// When `Commit` went out (by the reader thread, in post-copy).
    pub sent_at: Mutex<Option<Instant>>,
    /// The destination's `Committed` arrived.
    pub committed: Arc<std::sync::atomic::AtomicBool>,
}

/// The control channel, source side.
pub(crate) struct Control {
    writer: Channel,
    rx: Receiver<(Instant, Result<Body, WireError>)>,
    /// When the last message returned by [`Control::recv`] arrived.
    pub last_arrival: Option<Instant>,
    /// A destination's unasked abort, as soon as the reader saw it.
    pub aborted: PeerAbort,
    /// Channels to shut down when the destination aborts (the memory channel CRIU writes into).
    on_abort: Arc<Mutex<Vec<Channel>>>,
    /// Bytes read (counted by the reader).
    received: Arc<std::sync::atomic::AtomicU64>,
    auto: Arc<Mutex<Option<AutoCommit>>>,
    pub seen: Arc<CommitSeen>,
    /// The reader saw the connection end or break.
    gone: Arc<std::sync::atomic::AtomicBool>,
    /// The destination's last `Working`: when it came and the progress it reported (the reader keeps these out of
    /// the queue; [`Control::recv_working`] reads them).
    working: Arc<Mutex<Option<(Instant, u64)>>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

impl Control {
    pub fn new(ch: Channel) -> std::io::Result<Control> {
        let reader = ch.try_clone()?;
        let (tx, rx) = mpsc::channel();
        let aborted: PeerAbort = Arc::new(Mutex::new(None));
        let on_abort: Arc<Mutex<Vec<Channel>>> = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let auto: Arc<Mutex<Option<AutoCommit>>> = Arc::new(Mutex::new(None));
        let seen = Arc::new(CommitSeen::default());
        let mut commit_writer = ch.try_clone()?;
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ab, oa, rc, au, se) = (aborted.clone(), on_abort.clone(), received.clone(), auto.clone(), seen.clone());
        let gn = gone.clone();
        let working: Arc<Mutex<Option<(Instant, u64)>>> = Arc::new(Mutex::new(None));
        let wk = working.clone();
        wire::spawn_reader(reader, move |m, bytes| {
            rc.store(bytes, std::sync::atomic::Ordering::Relaxed);
            if m.is_err() {
                gn.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            match &m {
                Ok(Body::RestoreReply(r)) if r.held => {
                    // Decided and sent under the lock, so that a cancellation is either before it or after it.
                    let mut g = au.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(mut a) = g.take() {
                        let go = Instant::now() < a.deadline
                            && !a.cancelled.load(std::sync::atomic::Ordering::SeqCst)
                            && (a.record)();
                        if go {
                            super::fault::at("src", "step", "committing");
                            super::fault::at("src", "send", "Commit");
                            *se.sent_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                            if let Err(e) = wire::send(&mut commit_writer, Body::Commit(phaul_proto::wire::Commit {})) {
                                log::warn!("sending Commit failed: {e}");
                            }
                        }
                    }
                }
                Ok(Body::Committed(_)) => se.committed.store(true, std::sync::atomic::Ordering::SeqCst),
                Ok(Body::Working(w)) => {
                    *wk.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), w.progress));
                    return true;
                }
                _ => {}
            }
            if let Ok(Body::Failure(f)) = &m {
                if f.aborted {
                    log::warn!("the destination ended the session: {}", f.message);
                    *ab.lock().unwrap_or_else(|p| p.into_inner()) = Some(f.clone());
                    for c in oa.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                        c.shutdown();
                    }
                }
            }
            tx.send((Instant::now(), m)).is_ok()
        });
        Ok(Control { writer: ch, rx, last_arrival: None, aborted, on_abort, received, auto, seen, gone, working })
    }

    /// Shuts `ch` down as soon as the destination aborts (or now, if it already has).
    pub fn shut_on_abort(&self, ch: &Channel) {
        if let Ok(c) = ch.try_clone() {
            if self.peer_aborted().is_some() {
                c.shutdown();
            }
            self.on_abort.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        }
    }

    /// Post-copy: lets the reader thread send `Commit` itself when the destination reports its copy held.
    pub fn arm_auto_commit(&self, a: AutoCommit) {
        *self.auto.lock().unwrap_or_else(|p| p.into_inner()) = Some(a);
    }

    /// Cancels an armed commit unless it was sent already; returns whether it had been sent.
    pub fn cancel_auto_commit(auto: &Mutex<Option<AutoCommit>>, seen: &CommitSeen) -> bool {
        let mut g = auto.lock().unwrap_or_else(|p| p.into_inner());
        let sent = seen.sent_at.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        if !sent {
            if let Some(a) = g.take() {
                a.cancelled.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        sent
    }

    /// The armed commit, for [`Control::cancel_auto_commit`] from another thread.
    pub fn auto_commit_handle(&self) -> Arc<Mutex<Option<AutoCommit>>> {
        self.auto.clone()
    }

    /// Whether `Commit` went out through [`Control::arm_auto_commit`], and when.
    pub fn auto_commit_sent(&self) -> Option<Instant> {
        *self.seen.sent_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the channels registered with [`Control::shut_on_abort`].
    pub fn clear_on_abort(&self) {
        self.on_abort.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Whether the reader already saw this connection end or break.
    pub fn gone(&self) -> bool {
        self.gone.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn peer_aborted(&self) -> Option<Failure> {
        self.aborted.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The destination's unasked abort, waiting up to `d` for it (it races with the broken channel CRIU saw).
    pub fn wait_peer_abort(&self, d: Duration) -> Option<Failure> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(f) = self.peer_aborted() {
                return Some(f);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn send(&mut self, body: Body) -> Result<(), WireError> {
        super::fault::at("src", "send", wire::body_name(&body));
        wire::send(&mut self.writer, body)
    }

    /// The next message, waiting at most until `deadline`; `what` names what is waited for.
    pub fn recv(&mut self, deadline: Deadline, what: &str) -> Result<Body, WireError> {
        let r = match self.rx.recv_timeout(deadline.left()) {
            Ok((at, r)) => {
                self.last_arrival = Some(at);
                r
            }
            Err(RecvTimeoutError::Timeout) => {
                return Err(WireError::NoAnswer {
                    who: "the destination",
                    what: what.to_string(),
                    secs: deadline.secs,
                    bound: deadline.bound,
                })
            }
            Err(RecvTimeoutError::Disconnected) => return Err(WireError::Closed { channel: "control" }),
        };
        if let Ok(b) = &r {
            super::fault::at("src", "recv", wire::body_name(b));
        }
        r
    }

    /// The next message, waiting while the destination reports progress (`Working` with a growing `progress`):
    /// it fails only once `idle` passed with no progress (or `outer` passed).
    pub fn recv_working(&mut self, idle: Duration, outer: Deadline, what: &str) -> Result<Body, WireError> {
        let mut since = Instant::now();
        let mut last: Option<u64> = None;
        loop {
            let step = Deadline::after(Duration::from_millis(200), "--timeout").min(outer);
            match self.recv(step, what) {
                Err(WireError::NoAnswer { .. }) if !outer.passed() => {
                    let seen = *self.working.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some((_, progress)) = seen {
                        if !matches!(last, Some(l) if progress <= l) {
                            last = Some(progress);
                            since = Instant::now();
                        }
                    }
                    if since.elapsed() >= idle {
                        return Err(WireError::NoAnswer {
                            who: "the destination",
                            what: format!("{what}; it reported no progress"),
                            secs: idle.as_secs(),
                            bound: "--timeout",
                        });
                    }
                }
                r => return r,
            }
        }
    }

    /// Sends `body` and returns the reply; a `Failure` becomes [`WireError::Remote`].
    pub fn request(&mut self, body: Body, deadline: Deadline) -> Result<Body, WireError> {
        let what = format!("{} (while the source waited for its reply)", wire::body_name(&body));
        self.send(body)?;
        match self.recv(deadline, &what)? {
            Body::Failure(f) => Err(WireError::Remote { message: f.message, criu_errors: f.criu_errors }),
            other => Ok(other),
        }
    }

    /// Bytes phaul wrote and read on the channel.
    pub fn counters(&self) -> (u64, u64) {
        (self.writer.counters().0, self.received.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Stops reading and writing (the reader thread ends).
    pub fn close(&self) {
        self.writer.shutdown();
    }
}
