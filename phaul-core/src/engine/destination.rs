//! The destination side: serves one migration session.
//!
//! Invariant: a restored tree is only left running when the source says `Finish { migrated: true }`. If the source
//! says otherwise, or goes silent, or the control channel breaks, the restored tree is killed and the host type is
//! told to undo what it prepared.

use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use abi_stable::std_types::RResult;
use phaul_abi::{CriuStage, FsReceiverBox, HostTypeBox, Outcome, PluginError, Role};
use phaul_proto::criu::{CriuOpts, CriuPageServerInfo, CriuReq, CriuReqType};
use phaul_proto::wire::envelope::Body;
use phaul_proto::wire::{self as w, ChannelKind, Hello, HelloReply};
use phaul_proto::PROTOCOL_VERSION;

use super::files::{self, FileTransferError};
use super::{lazy, private_dir, sanitize};
use crate::criu::{build_opts, rpc, Criu, CriuError, SwrkSession, Version};
use crate::images;
use crate::plugins::Registry;
use crate::sys;
use crate::transport::{Channel, ChannelName, TransportError};
use crate::wire::{self, WireError};

/// How the destination is set up.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    pub img_path: PathBuf,
    /// Where to write the restored root pid once the migration is confirmed (`--dst-rpid`).
    pub dst_rpid: Option<PathBuf>,
    pub timeout: Duration,
}

/// What one served session came to.
#[derive(Debug, Clone)]
pub struct ServeSummary {
    pub session: String,
    pub migrated: bool,
    pub restored_pid: Option<i32>,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the source speaks phaul protocol version {theirs}, this destination speaks {ours}; run the same phaul release on both hosts")]
    Protocol { ours: u32, theirs: u32 },
    #[error("the peer did not start with a Hello; it is not a phaul source")]
    NoHello,
    #[error("the source's {kind} connection for session {session} did not arrive")]
    MissingChannel { kind: &'static str, session: String },
    #[error("{0}")]
    Refused(String),
    #[error("cannot query this host's CRIU: {0}")]
    Criu(#[from] CriuError),
}

/// Where the memory and filesystem channels come from.
#[derive(Debug)]
pub enum DestinationChannels<'a> {
    Given { mem: Channel, fs: Option<Channel> },
    Accept(&'a mut Acceptor),
}

/// What a newly accepted connection turned out to be, by its first frame.
#[derive(Debug)]
pub enum Incoming {
    /// A source's control connection, with its greeting.
    Control(Channel, Hello),
    /// Not a phaul connection, or a stale one: dropped.
    Dropped(String),
}

/// Accepts phaul's own TCP connections and sorts them by their first frame: a `Hello` opens a session's control
/// channel; a `ChannelOpen` names the session and kind of a memory or filesystem channel. Connections may arrive in
/// any order (relays and tunnels reorder them).
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    timeout: Duration,
    parked: Vec<(String, i32, Channel)>,
}

impl Acceptor {
    pub fn new(listener: TcpListener, timeout: Duration) -> Acceptor {
        Acceptor { listener, timeout, parked: Vec::new() }
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    fn accept_one(&mut self) -> Result<Option<(Channel, Body)>, ServeError> {
        let (s, peer) = self.listener.accept().map_err(TransportError::Accept)?;
        let mut ch = Channel::from_tcp(ChannelName::Rpc, s)?;
        // A connection that says nothing is not waited for long.
        let _ = ch.set_read_timeout(self.timeout.min(Duration::from_secs(30)));
        match wire::recv(&mut ch) {
            Ok(b) => Ok(Some((ch, b))),
            Err(e) => {
                log::warn!("dropping a connection from {peer}: {e}");
                Ok(None)
            }
        }
    }

    fn park(&mut self, ch: Channel, o: w::ChannelOpen) {
        // Only a few stray channels are kept.
        if self.parked.len() >= 8 {
            self.parked.remove(0);
        }
        self.parked.push((o.session, o.kind, ch));
    }

    /// The next control connection; channels that arrive first are kept for their session.
    pub fn next_control(&mut self) -> Result<Incoming, ServeError> {
        let Some((ch, body)) = self.accept_one()? else { return Ok(Incoming::Dropped("unreadable".into())) };
        match body {
            Body::Hello(h) => Ok(Incoming::Control(ch, h)),
            Body::ChannelOpen(o) => {
                self.park(ch, o);
                Ok(Incoming::Dropped("a data channel arrived before its control channel; kept".into()))
            }
            other => Ok(Incoming::Dropped(format!("the first frame was {}", wire::body_name(&other)))),
        }
    }

    /// The channel of `kind` for `session`, parked or yet to arrive (bounded by the timeout).
    fn channel_for(&mut self, session: &str, kind: ChannelKind, name: ChannelName) -> Result<Channel, ServeError> {
        let deadline = Instant::now() + self.timeout.min(Duration::from_secs(60));
        loop {
            if let Some(i) = self.parked.iter().position(|(s, k, _)| s == session && *k == kind as i32) {
                let (_, _, ch) = self.parked.remove(i);
                return Ok(ch.renamed(name));
            }
            if Instant::now() >= deadline {
                return Err(ServeError::MissingChannel { kind: name.as_str(), session: session.to_string() });
            }
            match self.accept_one()? {
                Some((ch, Body::ChannelOpen(o))) => self.park(ch, o),
                Some((mut ch, Body::Hello(_))) => {
                    let _ = wire::send_failure(
                        &mut ch,
                        "this destination is busy with another migration; try again when it has finished".into(),
                        Vec::new(),
                    );
                }
                _ => {}
            }
        }
    }
}

/// Serves one session on an already accepted control channel.
/// Serves one session on a control channel. `hello` is the greeting when it was already read.
pub fn serve_session(
    reg: &Registry,
    criu: &Criu,
    cfg: &DestinationConfig,
    mut rpc: Channel,
    hello: Option<Hello>,
    channels: DestinationChannels<'_>,
) -> Result<ServeSummary, ServeError> {
    let _ = rpc.set_read_timeout(cfg.timeout);
    let local = criu.version()?;
    let hello = match hello {
        Some(h) => h,
        None => match wire::recv(&mut rpc)? {
            Body::Hello(h) => h,
            _ => {
                let _ = wire::send_failure(&mut rpc, "the first message must be Hello".into(), Vec::new());
                return Err(ServeError::NoHello);
            }
        },
    };
    if let Err(e) = check_hello(&hello, &local) {
        let _ = wire::send_failure(&mut rpc, e.to_string(), Vec::new());
        return Err(e);
    }
    wire::send(
        &mut rpc,
        Body::HelloReply(HelloReply {
            protocol_version: PROTOCOL_VERSION,
            phaul_version: env!("CARGO_PKG_VERSION").into(),
            criu: Some(w::CriuVersion {
                major: local.major,
                minor: local.minor,
                sublevel: local.sublevel,
                text: local.to_string(),
            }),
        }),
    )?;
    let (mem, fs) = match channels {
        DestinationChannels::Given { mem, fs } => (mem, fs),
        DestinationChannels::Accept(a) => {
            let mem = a.channel_for(&hello.session, ChannelKind::ChannelMemory, ChannelName::Mem)?;
            let fs = a.channel_for(&hello.session, ChannelKind::ChannelFs, ChannelName::Fs)?;
            (mem, Some(fs))
        }
    };
    let _ = mem.set_read_timeout(cfg.timeout);
    let mut s = Session {
        reg,
        criu,
        cfg,
        session: hello.session.clone(),
        rpc,
        mem,
        fs_ch: fs,
        dir: None,
        htype: None,
        htype_name: String::new(),
        fs: None,
        fs_name: String::new(),
        page_server: None,
        restored_pid: None,
        keep_images: false,
        root_prepared: false,
        dst_rpid: cfg.dst_rpid.clone(),
        lazy: None,
        lazy_restore: false,
    };
    s.run()
}

fn check_hello(h: &Hello, local: &Version) -> Result<(), ServeError> {
    if h.protocol_version != PROTOCOL_VERSION {
        return Err(ServeError::Protocol { ours: PROTOCOL_VERSION, theirs: h.protocol_version });
    }
    let theirs = h.criu.clone().unwrap_or_default();
    if (local.major, local.minor, local.sublevel) < (theirs.major, theirs.minor, theirs.sublevel) && !h.skip_criu_check
    {
        return Err(ServeError::Refused(format!(
            "the destination's CRIU {local} is older than the source's CRIU {}; images written by a newer CRIU may not restore with an older one. Upgrade CRIU on the destination, or pass --skip-criu-check to the source if you know they are compatible",
            theirs.text
        )));
    }
    Ok(())
}

/// A request failed: the message for the source, and CRIU's error lines if CRIU failed.
struct Failed {
    message: String,
    criu_errors: Vec<String>,
}

impl<E: std::fmt::Display> From<E> for Failed {
    fn from(e: E) -> Self {
        Failed { message: e.to_string(), criu_errors: Vec::new() }
    }
}

fn criu_failed(e: CriuError) -> Failed {
    Failed { criu_errors: e.criu_errors().to_vec(), message: e.to_string() }
}

fn plugin<T>(r: RResult<T, PluginError>, what: &str) -> Result<T, Failed> {
    r.into_result()
        .map_err(|e| Failed { message: format!("the destination's {what} failed: {e}"), criu_errors: Vec::new() })
}

struct Session<'a> {
    reg: &'a Registry,
    criu: &'a Criu,
    cfg: &'a DestinationConfig,
    session: String,
    rpc: Channel,
    mem: Channel,
    fs_ch: Option<Channel>,
    dir: Option<PathBuf>,
    htype: Option<HostTypeBox>,
    htype_name: String,
    fs: Option<FsReceiverBox>,
    fs_name: String,
    page_server: Option<(SwrkSession, i32, rpc::OpenDir)>,
    restored_pid: Option<i32>,
    keep_images: bool,
    root_prepared: bool,
    dst_rpid: Option<PathBuf>,
    /// Post-copy or `--lazy-restore`: CRIU's lazy-pages daemon, its relay to the source (post-copy only), and
    /// when the restore finished.
    lazy: Option<(std::process::Child, Option<lazy::DestinationRelay>, Instant)>,
    /// `--lazy-restore`: restore memory on demand from this host's images.
    lazy_restore: bool,
}

impl Session<'_> {
    fn run(&mut self) -> Result<ServeSummary, ServeError> {
        loop {
            let req = match wire::recv(&mut self.rpc) {
                Ok(r) => r,
                Err(e) => {
                    let reason = format!("the control channel failed: {e}");
                    self.roll_back(&reason);
                    return Err(e.into());
                }
            };
            let reply = match req {
                Body::Finish(f) => return self.finish(f.migrated, f.reason),
                Body::CpuCheck(c) => self.cpu_check(c.cpuinfo_image),
                Body::Setup(s) => self.setup(s),
                Body::StartRound(r) if r.lazy => self.start_lazy_round(r.round),
                Body::StartRound(r) => self.start_round(r.round),
                Body::EndRound(r) => self.end_round(r.round, r.want_pagemaps),
                Body::FsRoundDone(r) => self.fs_round(r.round),
                Body::Files(f) => self.files(f),
                Body::Restore(r) => self.restore(r.round, r.lazy),
                other => Err(Failed {
                    message: format!("unexpected request {} at this point", wire::body_name(&other)),
                    criu_errors: Vec::new(),
                }),
            };
            match reply {
                Ok(body) => wire::send(&mut self.rpc, body)?,
                Err(f) => {
                    log::warn!("request failed: {}", f.message);
                    wire::send_failure(&mut self.rpc, f.message, f.criu_errors)?;
                }
            }
        }
    }

    fn dir(&self) -> Result<&Path, Failed> {
        self.dir.as_deref().ok_or_else(|| Failed::from("the source sent a request before Setup"))
    }

    fn cpu_check(&mut self, image: Vec<u8>) -> Result<Body, Failed> {
        private_dir(&self.cfg.img_path, true)?;
        let dir = self.cfg.img_path.join(format!("cpucheck-{}", self.session));
        private_dir(&dir, false)?;
        std::fs::write(dir.join("cpuinfo.img"), image)?;
        let r = self.criu.cpuinfo_check(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        match r {
            Ok(()) => Ok(Body::CpuCheckReply(w::CpuCheckReply {})),
            Err(e) => {
                let mut f = criu_failed(e);
                f.message = format!(
                    "this host's CPU lacks features the source's CPU has, so the workload may crash here ({}); pass --skip-cpu-check to the source to migrate anyway",
                    f.message
                );
                Err(f)
            }
        }
    }

    fn setup(&mut self, s: w::Setup) -> Result<Body, Failed> {
        if self.dir.is_some() {
            return Err("Setup was sent twice".into());
        }
        if s.mode != w::Mode::Live as i32 {
            return Err("this destination serves live migrations only".into());
        }
        private_dir(&self.cfg.img_path, true)?;
        let dir =
            self.cfg.img_path.join(format!("{}-{}-{}-destination", sanitize(&s.htype), sanitize(&s.id), self.session));
        private_dir(&dir, false)?;
        self.dir = Some(dir.clone());
        self.keep_images = s.keep_images;
        self.lazy_restore = s.lazy_restore;
        if s.post_copy || s.lazy_restore {
            // Before the source freezes anything: do lazy pages work here at all?
            lazy::trial(self.criu, &dir.join("lazy-trial"), "the destination")
                .map_err(|e| Failed { message: e.to_string(), criu_errors: Vec::new() })?;
        }
        if !s.dst_rpid.is_empty() {
            self.dst_rpid = Some(PathBuf::from(&s.dst_rpid));
        }
        let opts: Vec<(String, String)> = s.htype_options.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect();
        self.htype = Some(self.reg.new_host_type(&s.htype, Role::Destination, &s.id, &opts, &dir)?);
        self.htype_name = s.htype.clone();
        let fs_opts: Vec<(String, String)> = s.fs_options.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect();
        let fs_fd = self.fs_ch.as_ref().map(|c| c.as_fd().as_raw_fd());
        let mut fs = self.reg.new_fs_receiver(&s.fs_driver, &fs_opts, fs_fd, &s.fs_roots, &dir)?;
        plugin(fs.start(), "filesystem driver")?;
        self.fs = Some(fs);
        self.fs_name = s.fs_driver;
        Ok(Body::SetupReply(w::SetupReply { image_dir: dir.display().to_string() }))
    }

    fn round_dir(&self, round: u32) -> Result<PathBuf, Failed> {
        Ok(self.dir()?.join(round.to_string()))
    }

    fn start_round(&mut self, round: u32) -> Result<Body, Failed> {
        if self.page_server.is_some() {
            return Err("a page server is already running".into());
        }
        let d = self.round_dir(round)?;
        private_dir(&d, false)?;
        if round > 1 && self.round_dir(round - 1)?.is_dir() {
            std::os::unix::fs::symlink(format!("../{}", round - 1), d.join("parent"))?;
        }
        let (mut opts, open_dir) = rpc::dir_opts(&d, "page-server.log").map_err(criu_failed)?;
        opts.ps = Some(CriuPageServerInfo { fd: Some(rpc::MEM_FD), ..Default::default() });
        let fds = vec![(self.mem.dup_fd()?, rpc::MEM_FD)];
        let mut s = self.criu.start(fds, Some(&d.join("criu-stderr.log"))).map_err(criu_failed)?;
        s.set_log(d.join("page-server.log"));
        let mut r = rpc::req(CriuReqType::PageServerChld, Some(opts));
        r.keep_open = Some(true);
        let resp = s.call("PAGE_SERVER_CHLD", r, &mut |_, _| Ok(())).map_err(criu_failed)?;
        let pid = resp.ps.and_then(|p| p.pid).unwrap_or(0);
        self.page_server = Some((s, pid, open_dir));
        Ok(Body::StartRoundReply(w::StartRoundReply {}))
    }

    /// The final round of a post-copy migration: only the directory (pages come on demand, after the restore).
    fn start_lazy_round(&mut self, round: u32) -> Result<Body, Failed> {
        let d = self.round_dir(round)?;
        private_dir(&d, false)?;
        if round > 1 && self.round_dir(round - 1)?.is_dir() {
            std::os::unix::fs::symlink(format!("../{}", round - 1), d.join("parent"))?;
        }
        Ok(Body::StartRoundReply(w::StartRoundReply {}))
    }

    fn end_round(&mut self, round: u32, want_pagemaps: bool) -> Result<Body, Failed> {
        let (mut s, pid, _open_dir) =
            self.page_server.take().ok_or_else(|| Failed::from("no page server is running"))?;
        let r = CriuReq { r#type: CriuReqType::WaitPid as i32, pid: Some(pid.max(0) as u32), ..Default::default() };
        let resp = s.call("WAIT_PID", r, &mut |_, _| Ok(())).map_err(criu_failed)?;
        let status = resp.status.unwrap_or(0);
        if status != 0 {
            let mut f = criu_failed(CriuError::Failed {
                op: "page server",
                errmsg: Some(format!("the page server exited with status {status}")),
                errno: None,
                log: None,
                log_errors: Vec::new(),
            });
            f.criu_errors = crate::criu::error_lines(&self.round_dir(round)?.join("page-server.log"));
            return Err(f);
        }
        let mut reply = w::EndRoundReply { page_server_bytes: 0, pagemaps: Vec::new(), page_files: Vec::new() };
        if want_pagemaps {
            for entry in std::fs::read_dir(self.round_dir(round)?)? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if images::is_pagemap_image(&name) {
                    reply.pagemaps.push(w::ImageFile { data: std::fs::read(entry.path())?, name });
                } else if images::is_pages_image(&name) {
                    reply.page_files.push(name);
                }
            }
        }
        Ok(Body::EndRoundReply(reply))
    }

    fn fs_round(&mut self, round: u32) -> Result<Body, Failed> {
        let fs = self.fs.as_mut().ok_or_else(|| Failed::from("the source sent a request before Setup"))?;
        let r = plugin(fs.wait_round(round), "filesystem driver")?;
        Ok(Body::FsRoundReply(w::FsRoundReply { bytes: r.bytes, files: r.files }))
    }

    fn files(&mut self, f: w::Files) -> Result<Body, Failed> {
        let dir = match w::files::Target::try_from(f.target) {
            Ok(w::files::Target::Images) => self.round_dir(f.round)?,
            Ok(w::files::Target::Extra) => {
                let d = self.dir()?.join("extra");
                if !d.is_dir() {
                    private_dir(&d, false)?;
                }
                d
            }
            _ => return Err("files for an unknown target".into()),
        };
        let n = files::receive_files(&mut self.mem, &dir, &f.files).map_err(|e: FileTransferError| Failed::from(e))?;
        Ok(Body::FilesReply(w::FilesReply { bytes: n }))
    }

    fn restore(&mut self, round: u32, lazy_pages: bool) -> Result<Body, Failed> {
        let d = self.round_dir(round)?;
        // Only the final dump's own pages can be restored on demand: pages in a parent (pre-copy) dump are copied by
        // the restore. CRIU's lazy-pages daemon (3.17) reads parent pages without completing the fault, so marking
        // them lazy would hang the workload.
        if lazy_pages {
            // The daemon's page requests reach the source's CRIU through phaul's relay and the memory channel.
            let relay = lazy::DestinationRelay::start(self.mem.dup_fd()?)?;
            let daemon = lazy::start_daemon(self.criu, &d, Some(relay.port))?;
            self.lazy = Some((daemon, Some(relay), Instant::now()));
        } else if self.lazy_restore {
            // Every page is here already: the daemon reads them from this round's images and its parents.
            let daemon = lazy::start_daemon(self.criu, &d, None)?;
            self.lazy = Some((daemon, None, Instant::now()));
        }
        let extra = self.dir()?.join("extra");
        let htype = self.htype.as_mut().ok_or_else(|| Failed::from("the source sent a request before Setup"))?;
        if extra.is_dir() {
            plugin(htype.install_extra_files(extra.to_string_lossy().as_ref().into()), "host type")?;
        }
        let root = plugin(htype.mount_root(), "host type")?;
        self.root_prepared = true;
        let h = plugin(htype.criu_options(CriuStage::Restore), "host type")?;
        let (base, _open_dir) = rpc::dir_opts(&d, "restore.log").map_err(criu_failed)?;
        let mut opts: CriuOpts = build_opts(base, &h);
        if lazy_pages || self.lazy_restore {
            opts.lazy_pages = Some(true);
        }
        if let abi_stable::std_types::RSome(r) = root {
            opts.root = Some(r.into_string());
        }
        opts.notify_scripts = Some(true);
        let mut s = self.criu.start(Vec::new(), Some(&d.join("criu-stderr.log"))).map_err(criu_failed)?;
        s.set_log(d.join("restore.log"));
        let t = Instant::now();
        let resp = {
            let mut handler = |script: &str, pid: Option<i32>| -> Result<(), String> {
                let r = match script {
                    "setup-namespaces" => htype.setup_namespaces(pid.unwrap_or(0)),
                    "network-unlock" => htype.net_unlock(),
                    "post-restore" => htype.post_restore(pid.unwrap_or(0)),
                    _ => RResult::ROk(()),
                };
                r.into_result().map_err(|e| format!("the destination's host type failed in {script}: {e}"))
            };
            s.call("RESTORE", rpc::req(CriuReqType::Restore, Some(opts)), &mut handler)
        };
        let wall = t.elapsed();
        drop(s);
        let resp = resp.map_err(criu_failed)?;
        if let Some(l) = self.lazy.as_mut() {
            l.2 = Instant::now();
        }
        let pid = resp.restore.map(|r| r.pid).unwrap_or(0);
        self.restored_pid = Some(pid);
        let stats = images::read_restore_stats(&d).ok().map(|s| w::RestoreStats {
            pages_compared: s.pages_compared,
            pages_skipped_cow: s.pages_skipped_cow,
            pages_restored: s.pages_restored,
            forking_time_us: s.forking_time_us,
            restore_time_us: s.restore_time_us,
        });
        Ok(Body::RestoreReply(w::RestoreReply { pid, stats, restore_wall_us: wall.as_micros() as u64 }))
    }

    fn finish(&mut self, migrated: bool, reason: String) -> Result<ServeSummary, ServeError> {
        let mut kept = String::new();
        let mut last_page_ms = 0;
        if migrated {
            if let Some((mut daemon, relay, restored_at)) = self.lazy.take() {
                // The source's CRIU served its last page before the source confirmed; the daemon exits once it
                // has them all.
                if !lazy::wait_child(&mut daemon, self.cfg.timeout) {
                    log::warn!("CRIU's lazy-pages daemon did not finish cleanly");
                }
                last_page_ms = restored_at.elapsed().as_millis() as u64;
                let deadline = Instant::now() + Duration::from_secs(10);
                while relay.as_ref().is_some_and(|r| !r.finished()) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            if let Some(h) = self.htype.as_mut() {
                if let Err(e) = h.finish(Outcome::Migrated).into_result() {
                    log::warn!("host type finish: {e}");
                }
            }
            if let Some(f) = self.fs.as_mut() {
                if let Err(e) = f.finish(Outcome::Migrated).into_result() {
                    log::warn!("filesystem driver finish: {e}");
                }
            }
            if let (Some(path), Some(pid)) = (&self.dst_rpid, self.restored_pid) {
                if let Err(e) = std::fs::write(path, format!("{pid}\n")) {
                    log::warn!("could not write the restored pid to {}: {e}", path.display());
                }
            }
            if let (Some(d), true) = (&self.dir, self.keep_images) {
                kept = d.display().to_string();
            }
        } else {
            self.roll_back(&reason);
            if let Some(d) = &self.dir {
                kept = d.display().to_string();
            }
        }
        let _ = wire::send(&mut self.rpc, Body::FinishReply(w::FinishReply { kept_images: kept, last_page_ms }));
        // Removing a large image directory takes a while: the source need not wait for it.
        if let (true, false, Some(d)) = (migrated, self.keep_images, &self.dir) {
            if let Err(e) = std::fs::remove_dir_all(d) {
                log::warn!("could not remove {}: {e}", d.display());
            }
        }
        Ok(ServeSummary { session: self.session.clone(), migrated, restored_pid: self.restored_pid, reason })
    }

    /// Undoes everything: kills a restored tree, stops the page server, lets the drivers clean up.
    fn roll_back(&mut self, reason: &str) {
        log::warn!("rolling back session {}: {reason}", self.session);
        if let Some(pid) = self.restored_pid.take() {
            kill_tree(pid);
        }
        if let Some((mut daemon, _relay, _)) = self.lazy.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        self.page_server = None;
        if let Some(h) = self.htype.as_mut() {
            if let Err(e) = h.finish(Outcome::RolledBack).into_result() {
                log::warn!("host type roll-back: {e}");
            }
        }
        if let Some(f) = self.fs.as_mut() {
            if let Err(e) = f.finish(Outcome::RolledBack).into_result() {
                log::warn!("filesystem driver roll-back: {e}");
            }
        }
        let _ = self.root_prepared;
        let _ = &self.htype_name;
        let _ = &self.fs_name;
    }
}

/// Kills a restored tree by its root (the init of its pid namespace, so the kernel ends the rest) and waits,
/// bounded, until it is gone.
fn kill_tree(pid: i32) {
    if pid <= 1 {
        return;
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sys::pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if sys::pid_alive(pid) {
        log::error!("the restored tree {pid} is still alive 10 s after SIGKILL");
    }
}
