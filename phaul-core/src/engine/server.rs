//! `phaul serve --listen`: every connection on a thread of its own, sorted by its first frame. A `Hello` opens a
//! session; a `ChannelOpen` is a session's memory or filesystem channel (they may arrive in any order, before or
//! after the control connection); a `Resolve` is a source coming back about a session (reconnecting after a cut
//! link, or `phaul resolve`): it reaches the live session, or is answered from the session's journal.

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use phaul_proto::wire::envelope::Body;
use phaul_proto::wire::{self as w, ChannelKind};

use super::destination::{serve_session, DestinationChannels, DestinationContext, Event, ServeError, ServeSummary};
use crate::journal::Journals;
use crate::transport::{Acceptance, Channel, TransportError};
use crate::wire;

/// How long a new connection may take for its TLS handshake and, again, for its first frame.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many data channels wait for their session at most (the oldest go first).
const MAX_PARKED: usize = 32;
/// How many connections may be waiting for their first frame at once.
pub const MAX_HANDSHAKES: usize = 64;

/// Sessions in progress and data channels waiting for theirs.
#[derive(Default)]
pub struct SessionRegistry {
    inner: Mutex<Inner>,
    arrived: Condvar,
}

#[derive(Default)]
struct Inner {
    /// Data channels waiting for their session: (session, kind, the peer that opened it, channel, since).
    parked: Vec<(String, i32, Option<String>, Channel, Instant)>,
    /// Live sessions: their event queue and the peer (certificate fingerprint) that opened them.
    live: HashMap<String, (Sender<Event>, Option<String>)>,
}

impl SessionRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a data channel for its session.
    pub fn park(&self, ch: Channel, open: w::ChannelOpen, peer: Option<String>) {
        let mut g = self.lock();
        if g.parked.len() >= MAX_PARKED {
            log::warn!("too many data channels wait for their sessions; dropping the oldest");
            g.parked.remove(0);
        }
        g.parked.push((open.session, open.kind, peer, ch, Instant::now()));
        drop(g);
        self.arrived.notify_all();
    }

    /// The channel of `kind` for `session`, opened by the same peer, waiting at most `wait` for it to arrive.
    pub fn take_channel(
        &self,
        session: &str,
        kind: ChannelKind,
        wait: Duration,
        peer: &Option<String>,
    ) -> Result<Channel, ServeError> {
        let deadline = Instant::now() + wait;
        let mut g = self.lock();
        loop {
            if let Some(i) = g.parked.iter().position(|(s, k, p, _, _)| s == session && *k == kind as i32 && p == peer)
            {
                return Ok(g.parked.remove(i).3);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let name = match kind {
                    ChannelKind::ChannelFs => "filesystem",
                    _ => "memory",
                };
                return Err(ServeError::MissingChannel { kind: name, session: session.into(), secs: wait.as_secs() });
            }
            g = self.arrived.wait_timeout(g, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    pub(crate) fn register(&self, session: &str, tx: Sender<Event>, peer: Option<String>) {
        self.lock().live.insert(session.to_string(), (tx, peer));
    }

    pub(crate) fn unregister(&self, session: &str) {
        self.lock().live.remove(session);
    }

    /// Hands a resolution to the live session (only from the peer that opened it); gives the channel back if
    /// there is none.
    fn resolve(
        &self,
        session: &str,
        decision: w::Decision,
        mut ch: Channel,
        peer: &Option<String>,
    ) -> Result<(), Channel> {
        let live = self.lock().live.get(session).cloned();
        match live {
            Some((_, opener)) if &opener != peer => {
                log::warn!("a peer other than the one that opened session {session} asked about it; refused");
                let _ = wire::send_failure(&mut ch, "this session was opened by another peer".into(), Vec::new());
                Ok(())
            }
            Some((tx, _)) => match tx.send(Event::Resolve { ch, decision }) {
                Ok(()) => Ok(()),
                Err(std::sync::mpsc::SendError(Event::Resolve { ch, .. })) => Err(ch),
                Err(_) => Ok(()),
            },
            None => Err(ch),
        }
    }
}

/// Connections that have not said who they are yet: when there are too many, the oldest goes (a flood of silent
/// connections then delays a real source by one handshake at most, instead of locking it out).
#[derive(Default)]
struct Pending {
    next: u64,
    conns: std::collections::VecDeque<(u64, std::net::TcpStream)>,
}

/// Serves connections on `listener` until `stop` is set; `on_done` gets each session's outcome. At most
/// `ctx.cfg.max_sessions` sessions run at once (a source beyond that is told so).
pub fn serve_forever(
    ctx: &DestinationContext<'_>,
    listener: TcpListener,
    acceptance: &Acceptance,
    stop: &AtomicBool,
    on_done: &(dyn Fn(Result<ServeSummary, ServeError>) + Sync),
) -> Result<(), TransportError> {
    let registry = SessionRegistry::default();
    let pending = Mutex::new(Pending::default());
    let sessions = AtomicUsize::new(0);
    std::thread::scope(|scope| -> Result<(), TransportError> {
        while !stop.load(Ordering::SeqCst) {
            let ready = {
                let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(100u16)) {
                    Ok(n) => n > 0,
                    Err(nix::errno::Errno::EINTR) => false,
                    Err(e) => return Err(TransportError::Accept(e.into())),
                }
            };
            if !ready {
                continue;
            }
            let (stream, peer) = match listener.accept() {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("accepting a connection failed: {e}");
                    continue;
                }
            };
            let id = {
                let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                if p.conns.len() >= MAX_HANDSHAKES {
                    if let Some((_, oldest)) = p.conns.pop_front() {
                        let who = oldest.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                        log::warn!(
                            "{MAX_HANDSHAKES} connections are waiting to say who they are; closing the oldest (from {who}) to take one from {peer}"
                        );
                        let _ = oldest.shutdown(std::net::Shutdown::Both);
                    }
                }
                p.next += 1;
                let id = p.next;
                if let Ok(c) = stream.try_clone() {
                    p.conns.push_back((id, c));
                }
                id
            };
            let (reg, pend, live) = (&registry, &pending, &sessions);
            scope.spawn(move || {
                let first = acceptance
                    .accept(stream, HANDSHAKE_TIMEOUT, ctx.cfg.link_timeout)
                    .map_err(|e| {
                        // A peer that connects and closes (a port probe, a health check) is not news; one that
                        // fails the handshake (an unknown certificate, a replay, a trickle) is.
                        let closed = matches!(&e, TransportError::Tls(crate::transport::tls::TlsError::Handshake { detail, .. }) if detail == tls_closed());
                        if !closed {
                            log::warn!("refusing a connection from {peer}: {e}");
                        }
                        e.to_string()
                    })
                    .and_then(|(ch, id)| first_frame(ch).map(|(ch, b)| (ch, b, id)));
                pend.lock().unwrap_or_else(|e| e.into_inner()).conns.retain(|(i, _)| *i != id);
                match first {
                    Ok((mut ch, Body::Hello(h), id)) => {
                        if live.fetch_add(1, Ordering::SeqCst) >= ctx.cfg.max_sessions {
                            live.fetch_sub(1, Ordering::SeqCst);
                            log::warn!(
                                "refusing session {} from {peer}: {} sessions run already (--max-sessions)",
                                h.session,
                                ctx.cfg.max_sessions
                            );
                            let msg = format!(
                                "this destination runs {} migrations already (its --max-sessions); try again later",
                                ctx.cfg.max_sessions
                            );
                            let _ = wire::send_failure(&mut ch, msg, Vec::new());
                            return;
                        }
                        let who =
                            id.as_ref().map(|i| i.name.clone().unwrap_or_else(|| i.fingerprint[..16].to_string()));
                        log::info!(
                            "migration session {} from {peer} ({})",
                            h.session,
                            who.unwrap_or_else(|| "no TLS".into())
                        );
                        let peer_fp = id.map(|i| i.fingerprint);
                        let r = serve_session(ctx, ch, Some(h), DestinationChannels::Server { registry: reg, peer: peer_fp });
                        live.fetch_sub(1, Ordering::SeqCst);
                        on_done(r);
                    }
                    Ok((mut ch, body, _)) if bad_session(&body).is_some() => {
                        let e = bad_session(&body).unwrap_or_default();
                        log::warn!("refusing a {} from {peer}: {e}", wire::body_name(&body));
                        let _ = wire::send_failure(&mut ch, e, Vec::new());
                    }
                    Ok((ch, Body::ChannelOpen(o), id)) => reg.park(ch, o, id.map(|i| i.fingerprint)),
                    Ok((mut ch, Body::Preflight(p), _)) => {
                        // Each answer runs CRIU twice: a few at a time, however many peers ask.
                        if PREFLIGHTS.fetch_add(1, Ordering::SeqCst) >= MAX_PREFLIGHTS {
                            PREFLIGHTS.fetch_sub(1, Ordering::SeqCst);
                            let msg = "this destination is answering other preflights; try again in a moment";
                            let _ = wire::send_failure(&mut ch, msg.into(), Vec::new());
                            return;
                        }
                        log::info!("answering a preflight (`phaul check --to`) from {peer}");
                        let (criu, drivers) = (ctx.criu.as_ref(), ctx.drivers);
                        if let Err(e) = super::preflight::answer(criu, drivers, &ctx.cfg.img_path, &mut ch, p) {
                            log::warn!("could not answer a preflight from {peer}: {e}");
                        }
                        PREFLIGHTS.fetch_sub(1, Ordering::SeqCst);
                    }
                    Ok((ch, Body::Resolve(r), id)) => {
                        let decision = w::Decision::try_from(r.decision).unwrap_or(w::Decision::Query);
                        let peer_fp = id.map(|i| i.fingerprint);
                        if let Err(ch) = reg.resolve(&r.session, decision, ch, &peer_fp) {
                            match Journals::open(&ctx.cfg.state_dir) {
                                Ok(j) => super::resolve::answer_from_journal(&j, ctx, ch, r, &peer_fp),
                                Err(e) => log::warn!("cannot answer a resolution: {e}"),
                            }
                        }
                    }
                    Ok((_, other, _)) => {
                        log::info!("dropping a connection from {peer}: its first frame was {}", wire::body_name(&other))
                    }
                    Err(e) => log::info!("dropping a connection from {peer}: {e}"),
                }
            });
        }
        Ok(())
    })
}

/// Preflights answered at once (`phaul check --to`), and the most there may be.
static PREFLIGHTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const MAX_PREFLIGHTS: usize = 4;

fn tls_closed() -> &'static str {
    crate::transport::tls::PEER_CLOSED
}

/// Why the session id a data channel or a resolution names is refused (before it is looked up anywhere).
fn bad_session(body: &Body) -> Option<String> {
    let session = match body {
        Body::ChannelOpen(o) => &o.session,
        Body::Resolve(r) => &r.session,
        _ => return None,
    };
    crate::journal::check_session(session).err().map(|e| e.to_string())
}

fn first_frame(mut ch: Channel) -> Result<(Channel, Body), String> {
    let body = wire::recv_by(&mut ch, Instant::now() + HANDSHAKE_TIMEOUT).map_err(|e| e.to_string())?;
    Ok((ch, body))
}
