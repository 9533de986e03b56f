//! Bare CRIU, as an operator would script it with the same CRIU binary phaul uses and the options phaul passes:
//!
//! ```text
//! B: criu page-server --images-dir DST --address 10.91.0.2 --port P --status-fd 3     (started, waited for)
//! A: criu dump -t PID -D SRC --page-server --address 10.91.0.2 --port P \
//!         --tcp-established --file-locks --link-remap --network-lock nftables -v4 -o dump.log
//! A→B: the other SRC/*.img files, streamed over a TCP connection between the hosts (as scp would)
//! B: criu restore -D DST -d --pidfile FILE \
//!         --tcp-established --file-locks --link-remap --network-lock nftables -v4 -o restore.log
//! ```

use std::fs::File;
use std::io::Read;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use phaul_core::images::{read_dump_stats, read_restore_stats};
use phaul_testbed::{collect_every, pid_alive, spawn_with_fds, Collected, ADDR_B};

use crate::sample::{metric, mib, ms, Sample};
use crate::{copy, finish_workload, Context, Ctx, Result};

/// How often the benchmark checks whether a process it waits for has ended.
pub const POLL: Duration = Duration::from_millis(1);
/// Bound for one CRIU command (a dump or restore of 1 GiB takes a few seconds).
const CRIU_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound for the page server to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound for a socket read or write while copying images.
const COPY_IO_TIMEOUT: Duration = Duration::from_secs(60);
/// First TCP port for page servers (inside host B's private network namespace).
const PORT_BASE: u16 = 27000;

/// The options phaul gives CRIU for the `pid` host type (tcp_established, file_locks, link_remap, network lock
/// by nftables), with CRIU's log at level 4 in a file of the image directory as phaul does.
fn phaul_equivalent_options(log: &str) -> Vec<String> {
    ["--tcp-established", "--file-locks", "--link-remap", "--network-lock", "nftables", "-v4", "-o", log]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Measures one bare-CRIU migration of a fresh `size_mib` workload into `s`. With `keep_source`, the dump leaves
/// the source stopped (`--leave-stopped`) and it is killed only once the restore on B succeeded.
pub fn measure(ctx: &Ctx<'_>, size_mib: u64, s: &mut Sample, keep_source: bool) -> Result<()> {
    let (mut w, before) = ctx.start_workload(size_mib)?;
    let id = ctx.next_id();
    let run_dir = ctx.lab.path(&format!("bare-{id}"));
    let (src, dst) = (run_dir.join("src"), run_dir.join("dst"));
    for d in [&src, &dst] {
        std::fs::create_dir_all(d).ctx(|| format!("creating {}", d.display()))?;
    }
    let pidfile = run_dir.join("restored.pid");
    let port = PORT_BASE + (id % 20_000) as u16;
    let result = migrate(ctx, w.pid(), &src, &dst, &pidfile, port, keep_source, s);
    let restored = read_pidfile(&pidfile);
    if keep_source && result.is_ok() {
        // The restore succeeded: now the kept source goes, as phaul's source does once B confirms.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(w.pid()), nix::sys::signal::Signal::SIGKILL);
    }
    let verified = match (&result, restored) {
        (Ok(()), Some(pid)) => ctx.verify_restored(&mut w, pid, &before, s),
        (Ok(()), None) => Err(format!("criu restore wrote no pid to {}", pidfile.display()).into()),
        (Err(_), Some(pid)) => {
            // A restored tree of a failed run must not outlive it.
            let _ = w.adopt_pid(pid);
            Ok(())
        }
        (Err(_), None) => Ok(()),
    };
    finish_workload(w, restored.as_slice());
    if std::env::var_os("PHAUL_KEEP_TEST_DIRS").is_none() {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    result?;
    verified
}

fn read_pidfile(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok().filter(|p| *p > 0)
}

/// Kills and reaps a child that was not collected (on error paths).
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn take(&mut self) -> Option<Child> {
        self.0.take()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if !matches!(c.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Runs a command to completion, checking every [`POLL`] whether it ended.
fn run_timed(mut cmd: Command, what: &str) -> Result<Collected> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().ctx(|| format!("starting {what}"))?;
    Ok(collect_every(child, CRIU_TIMEOUT, what, POLL)?)
}

/// The error lines of a CRIU log (the last few), for failure messages.
fn log_errors(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("Error") || l.contains("error")).collect();
    let tail = &lines[lines.len().saturating_sub(8)..];
    if tail.is_empty() {
        format!("(no error lines in {})", path.display())
    } else {
        format!("{}:\n  {}", path.display(), tail.join("\n  "))
    }
}

fn check(c: &Collected, what: &str, log: &Path) -> Result<()> {
    if c.status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({}); stderr: {}; {}", c.status, c.stderr.trim(), log_errors(log)).into())
    }
}

/// Watches whether the source tree is still alive, to time the moment CRIU kills it (the end of its frozen time).
struct DeathWatch {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Option<Instant>>,
}

impl DeathWatch {
    fn start(pid: i32) -> DeathWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + CRIU_TIMEOUT;
            while Instant::now() < deadline {
                if !pid_alive(pid) {
                    return Some(Instant::now());
                }
                if flag.load(Ordering::SeqCst) {
                    return None;
                }
                std::thread::sleep(POLL);
            }
            None
        });
        DeathWatch { stop, handle }
    }

    /// When the tree was first seen dead, if it was.
    fn finish(self) -> Option<Instant> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().ok().flatten()
    }
}

/// Waits (bounded) for CRIU's `--status-fd` byte: the page server listens.
fn wait_ready(ready: std::os::fd::OwnedFd) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        let _ = tx.send(File::from(ready).read(&mut b));
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(1)) => Ok(()),
        Ok(Ok(_)) => Err("the page server exited before it listened".into()),
        Ok(Err(e)) => Err(format!("reading the page server's status fd failed: {e}").into()),
        Err(_) => Err(format!("the page server did not listen within {READY_TIMEOUT:?}").into()),
    }
}

fn arg(p: &Path) -> String {
    p.display().to_string()
}

#[allow(clippy::too_many_arguments)]
fn migrate(
    ctx: &Ctx<'_>,
    pid: i32,
    src: &Path,
    dst: &Path,
    pidfile: &Path,
    port: u16,
    keep_source: bool,
    s: &mut Sample,
) -> Result<()> {
    let (lab, criu) = (ctx.lab, &ctx.criu);
    let (addr, port) = (ADDR_B.to_string(), port.to_string());
    let t0 = Instant::now();
    // The connection the other images will cross, opened before anything is frozen (the operator's ssh session).
    let (copy_a, copy_b) = lab.pair.connect_tcp()?;

    // 1. The page server on B, started and waited for until it listens.
    let (ready_r, ready_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).ctx(|| "creating a pipe".into())?;
    let mut ps_args = vec!["page-server".to_string(), "--images-dir".into(), arg(dst), "--address".into()];
    ps_args.extend([addr.clone(), "--port".into(), port.clone(), "--status-fd".into(), "3".into()]);
    ps_args.extend(["-v4".to_string(), "-o".into(), "page-server.log".into()]);
    let mut cmd = lab.b().command(criu, &ps_args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let ps = spawn_with_fds(cmd, &[(ready_w.as_fd(), 3)]).ctx(|| "starting criu page-server".into())?;
    drop(ready_w);
    let mut ps = ChildGuard(Some(ps));
    wait_ready(ready_r).map_err(|e| format!("{e}; {}", log_errors(&dst.join("page-server.log"))))?;

    // 2. The dump on A, into the page server.
    let mut dump_args = vec!["dump".to_string(), "-t".into(), pid.to_string(), "-D".into(), arg(src)];
    dump_args.extend(["--page-server".to_string(), "--address".into(), addr, "--port".into(), port]);
    dump_args.extend(phaul_equivalent_options("dump.log"));
    if keep_source {
        dump_args.push("--leave-stopped".into());
    }
    let watch = DeathWatch::start(pid);
    let t_dump = Instant::now();
    let dump = run_timed(lab.a().command(criu, &dump_args), "criu dump");
    let t_dump_end = Instant::now();
    let dead_at = watch.finish();
    check(&dump?, "criu dump", &src.join("dump.log"))?;
    let ps_child = ps.take().ok_or("the page server vanished")?;
    let ps_done = collect_every(ps_child, Duration::from_secs(30), "criu page-server", POLL)?;
    check(&ps_done, "criu page-server", &dst.join("page-server.log"))?;

    // 3. The other images, A to B over TCP.
    let t_copy = Instant::now();
    let files = copy::image_files(src).ctx(|| format!("listing {}", src.display()))?;
    let sender = {
        let a = TcpStream::from(copy_a);
        a.set_write_timeout(Some(COPY_IO_TIMEOUT)).ctx(|| "setting a socket timeout".into())?;
        std::thread::spawn(move || copy::send_files(&a, &files))
    };
    let b = TcpStream::from(copy_b);
    b.set_read_timeout(Some(COPY_IO_TIMEOUT)).ctx(|| "setting a socket timeout".into())?;
    let received = copy::receive_files(&b, dst).ctx(|| "receiving the images on B".into());
    let sent = sender.join().map_err(|_| "the image sender panicked")?.ctx(|| "sending the images from A".into())?;
    let (_, got) = received?;
    if got != sent {
        return Err(format!("{sent} image bytes sent but {got} received").into());
    }
    let t_copy_end = Instant::now();

    // 4. The restore on B.
    let mut restore_args = vec!["restore".to_string(), "-D".into(), arg(dst), "-d".into(), "--pidfile".into()];
    restore_args.push(arg(pidfile));
    restore_args.extend(phaul_equivalent_options("restore.log"));
    let t_restore = Instant::now();
    let restore = run_timed(lab.b().command(criu, &restore_args), "criu restore")?;
    let t_end = Instant::now();
    check(&restore, "criu restore", &dst.join("restore.log"))?;

    let dump_stats = read_dump_stats(src).ctx(|| "reading the dump's stats".into())?;
    let restore_stats = read_restore_stats(dst).ctx(|| "reading the restore's stats".into())?;
    let page = page_size();
    let frozen = dump_stats.frozen_time_us as f64 / 1000.0;
    // The end of the frozen time: CRIU killed the source (or, kept, left it stopped and exited).
    let dead_at = match (keep_source, dead_at) {
        (false, Some(t)) => t,
        (true, _) => t_dump_end,
        (false, None) => {
            s.notes.push("the source was not seen dying before the dump exited; its exit time is used".into());
            t_dump_end
        }
    };
    let pages = dump_stats.pages_written * page;
    s.set(metric::TOTAL_MS, ms(t_end - t0));
    s.set(metric::CRIU_FROZEN_MS, frozen);
    s.set(metric::CRIU_FREEZING_MS, dump_stats.freezing_time_us as f64 / 1000.0);
    // Frozen until CRIU killed the source; down until the restore on B returned.
    s.set(metric::DOWNTIME_MS, frozen + ms(t_end.saturating_duration_since(dead_at)));
    s.set(metric::RESTORE_MS, ms(t_end - t_restore));
    s.set(metric::CRIU_RESTORE_MS, restore_stats.restore_time_us as f64 / 1000.0);
    s.set(metric::PAGES_MIB, mib(pages));
    s.set(metric::IMAGES_KIB, sent as f64 / 1024.0);
    s.set(metric::CRIU_MEMWRITE_MS, dump_stats.memwrite_time_us as f64 / 1000.0);
    s.set(metric::CRIU_MEMDUMP_MS, dump_stats.memdump_time_us as f64 / 1000.0);
    if dump_stats.memwrite_time_us > 0 {
        s.set(metric::RATE_MIB_S, mib(pages) / (dump_stats.memwrite_time_us as f64 / 1e6));
    }
    s.set(metric::DUMP_WALL_MS, ms(t_dump_end - t_dump));
    s.set(metric::COPY_MS, ms(t_copy_end - t_copy));
    Ok(())
}

/// The page size CRIU counts pages in.
pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .filter(|p| *p > 0)
        .unwrap_or(4096)
}
