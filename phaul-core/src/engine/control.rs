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
        let (ab, oa, rc) = (aborted.clone(), on_abort.clone(), received.clone());
        wire::spawn_reader(reader, move |m, bytes| {
            rc.store(bytes, std::sync::atomic::Ordering::Relaxed);
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
        Ok(Control { writer: ch, rx, last_arrival: None, aborted, on_abort, received })
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

    /// Forgets the channels registered with [`Control::shut_on_abort`].
    pub fn clear_on_abort(&self) {
        self.on_abort.lock().unwrap_or_else(|p| p.into_inner()).clear();
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
