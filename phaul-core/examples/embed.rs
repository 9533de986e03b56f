//! Embedding phaul-core: a program that drives both halves of a live migration itself, as a container manager
//! would, instead of running `phaul migrate` and `phaul serve`.
//!
//! It starts a small workload (a shell counting into `WORK/counter`, pid 1 of its own pid namespace), connects
//! the source half ([`engine::migrate`]) to the destination half ([`engine::serve_session`]) over socket pairs
//! it made itself (a real manager would hand in its own authenticated connections the same way), receives the
//! migration's events through a callback ([`StatusSink::callback`]), and prints the report. The restored
//! workload's pid is written to `WORK/restored.pid`; the workload runs on after this program exits.
//!
//! ```sh
//! cargo run -p phaul-core --example embed -- --plugins plugins.toml --work /tmp/embed   # as root
//! ```
//!
//! Both halves run on this host here; between two hosts, each host runs its half with its own [`Registry`],
//! CRIU and configuration, and the channels are connections between them. Without a guard process
//! (`SourceContext::guards: None`), a source that dies after the commit decision leaves the session for
//! `phaul resolve` to settle.

use std::os::fd::{IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phaul_core::criu::{locate_criu, Criu};
use phaul_core::engine::{
    self, DestinationChannels, DestinationConfig, DestinationContext, Ended, HandoverOrder, OnNoConverge, Policy,
    PreDump, SourceChannels, SourceConfig, SourceContext, StatusSink,
};
use phaul_core::hold::SystemKeeper;
use phaul_core::plugins::Registry;
use phaul_core::transport::{Channel, ChannelName};

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("embed: {e}");
            ExitCode::from(2)
        }
    }
}

/// `--plugins FILE --work DIR`.
fn args() -> Result<(PathBuf, PathBuf), String> {
    let mut plugins = None;
    let mut work = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--plugins" => plugins = it.next().map(PathBuf::from),
            "--work" => work = it.next().map(PathBuf::from),
            other => return Err(format!("unknown argument {other}; usage: embed --plugins FILE --work DIR")),
        }
    }
    match (plugins, work) {
        (Some(p), Some(w)) => Ok((p, w)),
        _ => Err("usage: embed --plugins FILE --work DIR".into()),
    }
}

/// A connected pair of channels (the source's end, the destination's end).
fn channel_pair(name: ChannelName, flag: &'static str) -> Result<(Channel, Channel), String> {
    let (a, b) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let adopt = |s: UnixStream| {
        let fd: OwnedFd = s.into();
        Channel::from_raw(name, fd.into_raw_fd(), flag).map_err(|e| e.to_string())
    };
    Ok((adopt(a)?, adopt(b)?))
}

/// The workload: `unshare --pid --fork setsid` runs a counting shell as pid 1 of a new pid namespace (and leader
/// of its own session); returns the
/// `unshare` child (to reap) and the shell's pid (what is migrated).
fn start_workload(work: &Path) -> Result<(std::process::Child, i32), String> {
    let script = format!("i=0; while :; do i=$((i+1)); echo $i > '{}/counter'; sleep 0.1; done", work.display());
    let child = Command::new("unshare")
        // setsid: the tree must be a session of its own for CRIU (sh, pid 1 in the namespace, leads it).
        .args(["--pid", "--fork", "--", "setsid", "/bin/sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the workload: {e}"))?;
    let children = format!("/proc/{}/task/{}/children", child.id(), child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pid = std::fs::read_to_string(&children).ok().and_then(|s| s.split_whitespace().next()?.parse().ok());
        if let Some(pid) = pid {
            if std::fs::read_to_string(work.join("counter")).is_ok() {
                return Ok((child, pid));
            }
        }
        if Instant::now() > deadline {
            return Err("the workload did not start in 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run() -> Result<bool, String> {
    phaul_core::sys::cloexec_inherited();
    let (plugins, work) = args()?;
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let registry = Registry::load(&plugins).map_err(|e| e.to_string())?;
    let loc = locate_criu(None).map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(60);

    let (mut unshare, pid) = start_workload(&work)?;
    let (rpc, rpc_peer) = channel_pair(ChannelName::Rpc, "rpc")?;
    let (mem, mem_peer) = channel_pair(ChannelName::Mem, "mem")?;
    let (fs, fs_peer) = channel_pair(ChannelName::Fs, "fs")?;

    // The destination half.
    let dcfg = DestinationConfig {
        img_path: work.join("dst-images"),
        dst_rpid: Some(work.join("restored.pid")),
        timeout,
        state_dir: work.join("dst-state"),
        reconnect_window: Duration::from_secs(15),
        link_timeout: 10,
        max_sessions: 1,
        rpid_dir: None,
        htype_options: Vec::new(),
        fs_options: Vec::new(),
        // Only host types that restore by themselves (lxc) need the `phaul __notify` helper.
        notify_helper: None,
    };
    let dctx =
        DestinationContext { drivers: &registry, criu: Arc::new(Criu::new(loc.path.clone(), timeout)), cfg: &dcfg };

    // The source half, with a callback for its events.
    let events = StatusSink::callback(|e| {
        let what = e["phase"].as_str().or(e["state"].as_str()).or(e["outcome"].as_str()).unwrap_or("");
        println!("event {} {what}", e["event"].as_str().unwrap_or("?"));
    });
    let cfg = SourceConfig {
        htype: "pid".into(),
        id: pid.to_string(),
        htype_options: Vec::new(),
        fs: None,
        fs_options: Vec::new(),
        pre_dump: PreDump::Off,
        policy: Policy::default_downtime(),
        on_no_converge: OnNoConverge::StopAndCopy,
        post_copy_after: None,
        lazy: false,
        lazy_restore: false,
        restart: false,
        handover: HandoverOrder::Auto,
        keep_images: false,
        img_path: work.join("src-images"),
        state_dir: work.join("src-state"),
        skip_cpu_check: false,
        skip_criu_check: false,
        skip_space_check: false,
        timeout,
        max_frozen: Duration::from_secs(30),
        resolve_timeout: Duration::from_secs(60),
        link_timeout: 10,
        progress: false,
        status: Some(events),
        dst_rpid: None,
    };
    let criu = Criu::new(loc.path, timeout);
    let (report, ended, result) = std::thread::scope(|s| {
        let dst = s.spawn(|| {
            engine::serve_session(
                &dctx,
                rpc_peer,
                None,
                DestinationChannels::Given { mem: mem_peer, fs: Some(fs_peer) },
            )
        });
        let ctx = SourceContext { drivers: &registry, criu: &criu, keeper: Box::new(SystemKeeper), guards: None };
        let out = engine::migrate(ctx, &cfg, SourceChannels::Given { rpc, mem, fs: Some(fs) });
        if let Ok(Err(e)) = dst.join() {
            eprintln!("embed: the destination half: {e}");
        }
        out
    });
    // Migrated: the source's tree ended, and unshare with it. Otherwise this example's workload still runs here,
    // and goes (it is ours).
    if ended != Ended::Migrated {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    let _ = unshare.wait();
    print!("{report}");
    match result {
        Ok(()) => Ok(ended == Ended::Migrated),
        Err(e) => {
            eprintln!("embed: {e}");
            Ok(false)
        }
    }
}
