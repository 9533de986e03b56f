//! The `rsync` filesystem driver: the real rsync, speaking its own protocol over phaul's filesystem channel.
//!
//! Each round runs one rsync session per root on its own substream of the channel (see `phaul-fs-stream`). On the
//! source, the rsync client reaches its "remote shell" through a two-line helper joined to the channel by two
//! FIFOs in phaul's work directory (no ssh, no daemon, no port). On the destination the receiver starts
//! `rsync --server` with a command line it builds itself, from its own fixed option set and serve's options:
//! what the source sends names only the round, the root's index and which of the two fixed passes runs.
//!
//! Pass 1 (every round): archive mode with hard links, ACLs, xattrs, devices, sparse files, numeric ids and
//! deletions. Pass 2 (final round only, while the workload is frozen): the files changed since the migration
//! began are sent again with `--ignore-times --inplace`, so that a same-size rewrite within one timestamp tick,
//! which rsync's size-and-mtime check cannot see, is not missed.
//!
//! Source options (`--fs-opt KEY=VALUE`): `rsync=PATH` (the rsync to run; default from PATH), `io-timeout=SECONDS`
//! (300), `exact-final=yes|no` (yes: pass 2). The roots are the host type's (`--htype-opt root=DIR` for `pid`).
//!
//! Destination options (`phaul serve --fs-opt rsync:KEY=VALUE`): `map=SOURCE-DIR=DESTINATION-DIR` (repeatable),
//! `allow=DIR` (repeatable: source roots at or below DIR are received at the same path), `rsync=PATH`,
//! `io-timeout=SECONDS`. A source root neither maps nor allows is refused before anything is frozen. Targets
//! follow `phaul-fs-mark`'s rule (never over someone else's data).
//!
//! rsync writes each changed file anew and renames it into place, so inode numbers do not survive:
//! `persistent_inodes` is false and CRIU resolves inotify watches by path.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use phaul_abi::{
    options, FsArgs, FsReceiver, FsRound, FsRoundInfo, FsSender, Host, KeyValue, Outcome, PluginError, PluginResult,
};
use phaul_fs_mark::Target;
use phaul_fs_stream::kit::{self, check_known, collect, io_err, receive_round, seconds, SessionReceiver};
use phaul_fs_stream::{tail, Channel, Done, Start};

/// Pass 1: the whole tree, with deletions.
const PASS_TREE: u8 = 1;
/// Pass 2: the files changed since the migration began, compared by content.
const PASS_TOUCHED: u8 = 2;

/// The options both sides use for a pass (the client's; the server's command line is derived from them by the
/// local rsync itself, see [`server_args`]).
fn pass_options(pass: u8) -> &'static [&'static str] {
    match pass {
        PASS_TREE => &["-aHAXS", "--numeric-ids", "--delete", "--stats"],
        _ => &["-aHAXS", "--numeric-ids", "--stats", "--ignore-times", "--inplace"],
    }
}

/// phaul's own marks are neither copied nor deleted by rsync (see phaul-fs-mark).
const MARK_FILTER: &str = "--filter=-x trusted.phaul.*";

/// Slack under the migration's start when choosing pass 2's files (coarse timestamps, clock steps).
const TOUCHED_SLACK: Duration = Duration::from_secs(2);

/// A number after `label` in rsync's `--stats` output (`Total bytes sent: 1,234`).
fn stat(stats: &str, label: &str) -> Option<u64> {
    let line = stats.lines().find_map(|l| l.trim().strip_prefix(label))?;
    let digits: String =
        line.trim_start_matches(':').trim().chars().take_while(|c| c.is_ascii_digit() || *c == ',').collect();
    digits.replace(',', "").parse().ok()
}

// ---------------------------------------------------------------------------------------------------------------
// Source

struct RsyncSender {
    host: Host,
    chan: Channel,
    rsync: PathBuf,
    roots: Vec<PathBuf>,
    work: PathBuf,
    exact_final: bool,
    /// When round 1 began: pass 2 sends what changed since then.
    migration_start: Option<SystemTime>,
    /// Bytes of file data the last round moved, the estimate for the next.
    last_literal: u64,
}

fn sender(args: &FsArgs) -> PluginResult<RsyncSender> {
    check_known(args, &["rsync", "io-timeout", "exact-final"], "rsync", "source")?;
    let rsync = kit::find_program(args.option("rsync"), "rsync", "rsync", "source", "rsync")?;
    let exact_final = match args.option("exact-final") {
        None | Some("yes") => true,
        Some("no") => false,
        Some(v) => return Err(PluginError::invalid(format!("--fs-opt exact-final={v}: the value must be yes or no"))),
    };
    if args.roots.is_empty() {
        return Err(PluginError::invalid(
            "the rsync filesystem driver has nothing to send: the host type names no root directory (for the pid \
             host type, pass --htype-opt root=DIR)",
        ));
    }
    let mut roots = Vec::new();
    for r in args.roots.iter() {
        let p = PathBuf::from(r.as_str());
        if !p.is_absolute() || !p.is_dir() {
            return Err(PluginError::not_found(format!(
                "the root {} is not a directory on the source (the rsync driver sends directories)",
                p.display()
            )));
        }
        roots.push(p);
    }
    let work = PathBuf::from(args.work_dir.as_str()).join("rsync");
    std::fs::create_dir_all(&work).map_err(io_err("creating the rsync work directory"))?;
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("restricting the rsync work directory"))?;
    // The remote shell rsync starts: its stdin goes up the channel, the channel comes down to its stdout. The
    // FIFOs are in a directory only root can enter.
    let helper = work.join("rsh");
    let script = format!(
        "#!/bin/sh\n# rsync's remote shell for phaul: joins rsync to phaul's filesystem channel.\nexec 5<&0\ncat <&5 >'{up}' &\nexec cat <'{down}'\n",
        up = work.join("up").display(),
        down = work.join("down").display()
    );
    std::fs::write(&helper, script).map_err(io_err("writing rsync's remote-shell helper"))?;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("making rsync's remote-shell helper executable"))?;
    let timeout = seconds(args, "io-timeout", 300)?;
    Ok(RsyncSender {
        host: Host::new(args.host, "rsync"),
        chan: kit::channel(args, "rsync", timeout)?,
        rsync,
        roots,
        work,
        exact_final,
        migration_start: None,
        last_literal: 0,
    })
}

/// Opens the write end of a FIFO whose reader is starting, unless `gave_up` says it never will.
fn open_fifo_writer(path: &Path, gave_up: &dyn Fn() -> bool) -> std::io::Result<Option<std::fs::File>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match std::fs::OpenOptions::new().write(true).custom_flags(nix::libc::O_NONBLOCK).open(path) {
            Ok(f) => {
                let flags = nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
                let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
                flags.remove(nix::fcntl::OFlag::O_NONBLOCK);
                nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
                return Ok(Some(f));
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => {
                if gave_up() || Instant::now() > deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The read end of the FIFO rsync's helper writes into: waits for the helper (or rsync's exit) before reading,
/// so that "no writer yet" is not taken for the end of the stream.
struct FifoReader {
    file: std::fs::File,
    started: bool,
    gave_up: Arc<AtomicBool>,
}

impl FifoReader {
    /// Waits until the FIFO has data or its writer left (or rsync ended before its helper came).
    fn wait_readable(&self) -> std::io::Result<bool> {
        use std::os::fd::AsFd;
        loop {
            let mut fds = [nix::poll::PollFd::new(self.file.as_fd(), nix::poll::PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u16)) {
                Ok(n) if n > 0 => return Ok(true),
                Ok(_) | Err(nix::errno::Errno::EINTR) => {
                    if !self.started && self.gave_up.load(Ordering::SeqCst) {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Read for FifoReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // Before the helper opened its end, a read would say end-of-file: wait for it first.
        if !self.started {
            if !self.wait_readable()? {
                return Ok(0);
            }
            self.started = true;
        }
        loop {
            match self.file.read(buf) {
                // The descriptor is non-blocking: "nothing yet" while the helper still writes.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.wait_readable()?;
                }
                r => return r,
            }
        }
    }
}

/// Regular files under `root` (relative paths) whose content or inode changed at or after `since`.
fn touched_since(root: &Path, since: SystemTime, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let since = since.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let m = entry.metadata()?;
            let name = rel.join(entry.file_name());
            if m.is_dir() {
                stack.push(name);
            } else if m.is_file() && (m.mtime().max(m.ctime()) >= since) {
                out.push(name);
            }
        }
    }
    Ok(())
}

/// Writes a `--files-from` list (NUL-separated, for `--from0`).
fn write_list(path: &Path, files: &[PathBuf]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    for f in files {
        w.write_all(f.as_os_str().as_bytes())?;
        w.write_all(b"\0")?;
    }
    w.flush()
}

/// What one session moved, by the client's `--stats`.
#[derive(Default)]
struct SessionStats {
    wire_bytes: u64,
    literal: u64,
    files: u64,
}

impl RsyncSender {
    fn session(&mut self, start: Start, root: &Path, list: Option<&Path>) -> PluginResult<SessionStats> {
        for f in ["up", "down"] {
            let p = self.work.join(f);
            let _ = std::fs::remove_file(&p);
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(|e| PluginError::failed(format!("creating the FIFO {}: {e}", p.display())))?;
        }
        // Open the reading end first (it never blocks with O_NONBLOCK), so the helper's writer can open at once.
        let up = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(self.work.join("up"))
            .map_err(io_err("opening the rsync FIFO"))?;
        self.chan.send_start(start).map_err(io_err("starting an rsync session on the filesystem channel"))?;
        let mut cmd = Command::new(&self.rsync);
        cmd.args(pass_options(start.pass)).arg(MARK_FILTER).arg("-e").arg(self.work.join("rsh"));
        if let Some(l) = list {
            cmd.arg("--from0").arg(format!("--files-from={}", l.display()));
        }
        let mut src = root.as_os_str().to_owned();
        src.push("/");
        cmd.arg(src).arg("phaul-destination:.");
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let spawned = cmd.spawn();
        let gave_up = Arc::new(AtomicBool::new(false));
        let mut child: Option<Child> = match spawned {
            Ok(c) => Some(c),
            Err(e) => {
                gave_up.store(true, Ordering::SeqCst);
                self.host.log(log::Level::Error, &format!("cannot start {}: {e}", self.rsync.display()));
                None
            }
        };
        let out = child.as_mut().and_then(|c| c.stdout.take()).map(collect);
        let err = child.as_mut().and_then(|c| c.stderr.take()).map(collect);
        // Watch for rsync ending before its helper joined the FIFOs (a bad root, an early failure).
        let exited = Arc::new(std::sync::Mutex::new(child));
        let watcher = {
            let exited = exited.clone();
            let gave_up = gave_up.clone();
            std::thread::spawn(move || loop {
                let mut g = exited.lock().unwrap_or_else(|p| p.into_inner());
                let done = match g.as_mut() {
                    None => true,
                    Some(c) => !matches!(c.try_wait(), Ok(None)),
                };
                drop(g);
                if done {
                    gave_up.store(true, Ordering::SeqCst);
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            })
        };
        let g2 = gave_up.clone();
        let down = open_fifo_writer(&self.work.join("down"), &move || g2.load(Ordering::SeqCst))
            .map_err(io_err("opening the rsync FIFO"))?;
        let reader = FifoReader { file: up, started: false, gave_up: gave_up.clone() };
        let relayed = self.chan.relay(down.map(|d| Box::new(d) as Box<dyn Write + Send>), Some(Box::new(reader)));
        let _ = watcher.join();
        let status = exited.lock().unwrap_or_else(|p| p.into_inner()).as_mut().map(|c| c.wait());
        let stdout = out.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        let stderr = err.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        relayed.map_err(io_err("the filesystem channel broke during an rsync session"))?;
        let done = self.chan.recv_done().map_err(io_err("reading the destination's rsync verdict"))?;
        let code = match status {
            Some(Ok(s)) => s.code().unwrap_or(-1),
            _ => -1,
        };
        let root_shown = root.display();
        if !done.ok {
            // When both ends failed, the source's own words usually say why (the receiver only saw it go).
            let ours = if code != 0 && !stderr.is_empty() {
                format!("; rsync on the source (exit {code}): {}", tail(&stderr, 2000))
            } else {
                String::new()
            };
            return Err(PluginError::failed(format!(
                "rsync on the destination failed receiving {root_shown} (exit {}): {}{ours}",
                done.code,
                if done.message.is_empty() { "it gave no reason" } else { done.message.as_str() }
            )));
        }
        // Exit 24: files vanished while rsync listed them; normal while the workload runs, never while frozen.
        let vanished_ok = code == 24 && !start.is_final;
        if code != 0 && !vanished_ok {
            return Err(PluginError::failed(format!(
                "rsync on the source failed sending {root_shown} (exit {code}): {}",
                tail(&stderr, 2000)
            )));
        }
        let text = String::from_utf8_lossy(&stdout);
        Ok(SessionStats {
            wire_bytes: stat(&text, "Total bytes sent").unwrap_or(0),
            literal: stat(&text, "Literal data").unwrap_or(0),
            files: stat(&text, "Number of regular files transferred").unwrap_or(0),
        })
    }

    fn round_inner(&mut self, info: &FsRoundInfo) -> PluginResult<FsRound> {
        let began = SystemTime::now();
        let since = *self.migration_start.get_or_insert(began);
        let mut total = SessionStats::default();
        let mut sessions = 0u32;
        let roots = self.roots.clone();
        let exact = info.is_final && self.exact_final && info.number > 1;
        // The exact pass's lists: the workload is frozen in the final round, so they are walked while the tree
        // pass runs (the walk is downtime otherwise).
        let lists = exact.then(|| {
            let roots = roots.clone();
            std::thread::spawn(move || {
                roots
                    .iter()
                    .map(|root| {
                        let mut files = Vec::new();
                        touched_since(root, since - TOUCHED_SLACK, &mut files).map(|()| files)
                    })
                    .collect::<Vec<_>>()
            })
        });
        for (i, root) in roots.iter().enumerate() {
            let start = Start { round: info.number, index: i as u16, pass: PASS_TREE, is_final: info.is_final };
            let s = self.session(start, root, None)?;
            sessions += 1;
            total.wire_bytes += s.wire_bytes;
            total.literal += s.literal;
            total.files += s.files;
            self.host.progress(&format!("rsync round {}", info.number), (i + 1) as u64, roots.len() as u64);
        }
        // The exact pass, only when an earlier round ran while the workload could still change files.
        if let Some(lists) = lists {
            let lists = lists.join().map_err(|_| PluginError::failed("listing the changed files panicked"))?;
            for ((i, root), files) in roots.iter().enumerate().zip(lists) {
                let files = files.map_err(io_err(&format!("listing the files changed under {}", root.display())))?;
                if files.is_empty() {
                    continue;
                }
                let list = self.work.join(format!("touched-{i}"));
                write_list(&list, &files).map_err(io_err("writing rsync's file list"))?;
                let start = Start { round: info.number, index: i as u16, pass: PASS_TOUCHED, is_final: true };
                let s = self.session(start, root, Some(&list))?;
                sessions += 1;
                total.wire_bytes += s.wire_bytes;
                total.literal += s.literal;
                log::info!(
                    "final exact pass: {} changed files under {} compared by content",
                    files.len(),
                    root.display()
                );
            }
        }
        self.chan.send_end(info.number, sessions).map_err(io_err("ending the rsync round"))?;
        let remaining = if info.number == 1 { FsRound::UNKNOWN } else { total.literal.max(self.last_literal / 2) };
        self.last_literal = total.literal;
        Ok(FsRound {
            bytes: total.wire_bytes,
            files: total.files,
            remaining_bytes: remaining,
            more: Default::default(),
        })
    }
}

impl FsSender for RsyncSender {
    fn round(&mut self, info: &FsRoundInfo) -> PluginResult<FsRound> {
        let r = self.round_inner(info);
        kit::abort_on_error(&mut self.chan, r)
    }

    fn persistent_inodes(&self) -> bool {
        false
    }

    fn finish(&mut self, outcome: Outcome) -> PluginResult<()> {
        let _ = std::fs::remove_dir_all(&self.work);
        if outcome == Outcome::MIGRATED {
            // The tree stays (phaul never deletes the source's data); the mark lets a migration back receive
            // into it and move only the differences.
            for r in &self.roots {
                if let Err(e) = phaul_fs_mark::set_mark(r, phaul_fs_mark::MIGRATED_AWAY) {
                    log::warn!("cannot mark {} as migrated away: {e}", r.display());
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Destination

struct RsyncReceiver {
    chan: Channel,
    rsync: PathBuf,
    /// Per source root, in order: the target.
    targets: Vec<Target>,
    /// The source roots, for `prepared`.
    sources: Vec<String>,
    /// The server command line per pass, with the destination last (replaced per target).
    server: [Vec<String>; 2],
}

/// The `rsync --server` command line the local rsync would ask a remote shell to run for `pass`, learnt by
/// running the local rsync client with a remote shell that only records its arguments. The destination is the
/// last argument (replaced by each target).
fn server_args(rsync: &Path, work: &Path, pass: u8) -> PluginResult<Vec<String>> {
    let rec = work.join(format!("server-args-{pass}"));
    let probe = work.join("record-args");
    std::fs::write(&probe, format!("#!/bin/sh\nprintf '%s\\0' \"$@\" > '{}'\nexit 1\n", rec.display()))
        .map_err(io_err("writing the rsync argument probe"))?;
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("making the rsync argument probe executable"))?;
    let empty = work.join("empty");
    std::fs::create_dir_all(&empty).map_err(io_err("creating the rsync probe directory"))?;
    let mut cmd = Command::new(rsync);
    cmd.args(pass_options(pass)).arg(MARK_FILTER).arg("-e").arg(&probe);
    if pass == PASS_TOUCHED {
        cmd.arg("--from0").arg("--files-from=/dev/null");
    }
    let mut src = empty.into_os_string();
    src.push("/");
    cmd.arg(src).arg("probe:/DESTINATION/");
    let _ = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
    let bytes = std::fs::read(&rec).map_err(|_| {
        PluginError::failed(format!(
            "{} did not run its remote shell, so the receiver cannot learn its server command line; is it a \
             working rsync?",
            rsync.display()
        ))
    })?;
    let args: Vec<String> =
        bytes.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    // `phaul-host rsync --server ... . /DESTINATION/`
    match args.iter().position(|a| a == "--server") {
        Some(i) if i >= 1 && args.last().map(String::as_str) == Some("/DESTINATION/") => Ok(args[i..].to_vec()),
        _ => Err(PluginError::failed(format!("unexpected rsync server command line: {}", args.join(" ")))),
    }
}

fn receiver(args: &FsArgs) -> PluginResult<RsyncReceiver> {
    check_known(args, &["map", "allow", "rsync", "io-timeout"], "rsync", "destination")?;
    let rsync = kit::find_program(args.option("rsync"), "rsync", "rsync", "destination", "rsync")?;
    let placement =
        phaul_fs_mark::Placement::new(options(&args.options, "map"), options(&args.options, "allow"), "rsync")
            .map_err(|e| PluginError::invalid(e.0))?;
    let work = PathBuf::from(args.work_dir.as_str()).join("rsync");
    std::fs::create_dir_all(&work).map_err(io_err("creating the rsync work directory"))?;
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("restricting the rsync work directory"))?;
    let server = [server_args(&rsync, &work, PASS_TREE)?, server_args(&rsync, &work, PASS_TOUCHED)?];
    // Everything that can fail without touching a target comes first, so that a refusal leaves no mark behind.
    let timeout = seconds(args, "io-timeout", 300)?;
    let chan = kit::channel(args, "rsync", timeout)?;
    if args.roots.len() > usize::from(u16::MAX) {
        return Err(PluginError::invalid(format!("the source names {} roots; at most 65535", args.roots.len())));
    }
    let token = phaul_fs_mark::new_token();
    let mut targets: Vec<Target> = Vec::new();
    let hint = "map it elsewhere with phaul serve --fs-opt rsync:map=SOURCE-DIR=DESTINATION-DIR";
    for r in args.roots.iter() {
        let Some(dst) = placement.target(r.as_str()) else {
            for t in &targets {
                let _ = t.roll_back();
            }
            return Err(PluginError::invalid(format!(
                "this destination does not accept the source's directory {r}: phaul serve receives only into places \
                 its operator named (--fs-opt rsync:map={r}=DESTINATION-DIR, or rsync:allow=PARENT-DIR to receive \
                 it at the same path)"
            )));
        };
        // Targets must be apart: one inside another would let the first session put a symbolic link where the
        // second one writes.
        if let Some(t) = targets.iter().find(|t| t.path.starts_with(&dst) || dst.starts_with(&t.path)) {
            let clash = t.path.display().to_string();
            for t in &targets {
                let _ = t.roll_back();
            }
            return Err(PluginError::invalid(format!(
                "the source's directory {r} would be received into {}, which is {clash} or holds it or lies inside it;                  each root must go to a place of its own",
                dst.display()
            )));
        }
        match phaul_fs_mark::claim(&dst, &token, hint) {
            Ok(t) => targets.push(t),
            Err(e) => {
                for t in &targets {
                    let _ = t.roll_back();
                }
                return Err(PluginError::invalid(e.0));
            }
        }
    }
    Ok(RsyncReceiver { chan, rsync, targets, sources: args.roots.iter().map(|r| r.to_string()).collect(), server })
}

impl RsyncReceiver {
    fn receive_session(&mut self, st: Start, is_final: bool) -> PluginResult<Done> {
        let target = self.targets.get(st.index as usize).map(|t| t.path.clone());
        let argv = match (st.pass, target) {
            (PASS_TREE | PASS_TOUCHED, Some(t)) => {
                let mut a = self.server[(st.pass - 1) as usize].clone();
                let last = a.len() - 1;
                let mut d =
                    t.into_os_string().into_string().map_err(|_| PluginError::invalid("target is not UTF-8"))?;
                d.push('/');
                a[last] = d;
                a
            }
            _ => {
                // Keep the channel in step, then refuse.
                let _ = self.chan.relay(None, None);
                let d = Done {
                    ok: false,
                    code: -1,
                    bytes: 0,
                    message: format!(
                        "the source asked for root {} pass {}, which this receiver does not have",
                        st.index, st.pass
                    ),
                };
                self.chan.send_done(&d).map_err(io_err("answering the source"))?;
                return Ok(d);
            }
        };
        let mut cmd = Command::new(&self.rsync);
        cmd.args(&argv).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let done = match cmd.spawn() {
            Err(e) => {
                let _ = self.chan.relay(None, None);
                Done { ok: false, code: -1, bytes: 0, message: format!("cannot start {}: {e}", self.rsync.display()) }
            }
            Ok(mut child) => {
                let stdin = child.stdin.take().map(|s| Box::new(s) as Box<dyn Write + Send>);
                let stdout = child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
                let err = child.stderr.take().map(collect);
                let relayed = self.chan.relay(stdin, stdout);
                if relayed.is_err() {
                    let _ = child.kill();
                }
                let status = child.wait();
                let stderr = err.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
                let relayed = relayed.map_err(io_err("the filesystem channel broke during an rsync session"))?;
                let code = status.ok().and_then(|s| s.code()).unwrap_or(-1);
                // Exit 24 (files vanished while listed) is normal while the workload runs, never while frozen.
                let ok = code == 0 || (code == 24 && !is_final);
                Done { ok, code, bytes: relayed.received, message: tail(&stderr, 2000) }
            }
        };
        // What was received may have carried a mark of its own on the root: this run's goes back on.
        if let Some(t) = self.targets.get(st.index as usize) {
            if let Err(e) = t.reassert() {
                log::warn!("cannot put phaul's mark back on {}: {e}", t.path.display());
            }
        }
        self.chan.send_done(&done).map_err(io_err("answering the source"))?;
        Ok(done)
    }
}

impl SessionReceiver for RsyncReceiver {
    fn channel(&mut self) -> &mut Channel {
        &mut self.chan
    }

    fn session(&mut self, st: Start, is_final: bool) -> PluginResult<Done> {
        self.receive_session(st, is_final)
    }
}

impl FsReceiver for RsyncReceiver {
    fn wait_round(&mut self, info: &FsRoundInfo) -> PluginResult<FsRound> {
        let roots = self.targets.len();
        let bytes = receive_round(self, info, roots, PASS_TREE, "rsync", "rsync failed receiving")?;
        Ok(FsRound::moved(bytes, 0))
    }

    fn prepared(&mut self) -> PluginResult<Vec<KeyValue>> {
        let mut out = Vec::new();
        for (s, t) in self.sources.iter().zip(&self.targets) {
            out.push(KeyValue::new("root-map", format!("{s}={}", t.path.display())));
        }
        if let Some(t) = self.targets.first() {
            out.push(KeyValue::new("root", t.path.display().to_string()));
        }
        Ok(out)
    }

    fn finish(&mut self, outcome: Outcome) -> PluginResult<()> {
        let mut errors = Vec::new();
        for t in &self.targets {
            let r = if outcome == Outcome::MIGRATED { t.keep() } else { t.roll_back() };
            if let Err(e) = r {
                errors.push(format!("{}: {e}", t.path.display()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PluginError::failed(format!("cleaning up received directories: {}", errors.join("; "))))
        }
    }
}

phaul_abi::export_fs_driver!(
    name: "rsync",
    description: "rsync over phaul's channel: rounds while the workload runs, the last one exact while frozen",
    sender: sender,
    receiver: receiver,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_read_with_thousands_separators() {
        let s = "Number of regular files transferred: 1,204\nTotal bytes sent: 12,345,678\nLiteral data: 99 bytes\n";
        assert_eq!(stat(s, "Total bytes sent"), Some(12_345_678));
        assert_eq!(stat(s, "Number of regular files transferred"), Some(1204));
        assert_eq!(stat(s, "Literal data"), Some(99));
        assert_eq!(stat(s, "Matched data"), None);
    }
}
