//! Running real migrations between the two hosts of a [`HostPair`]: `phaul serve` in host B and `phaul migrate`
//! in host A, connected by three TCP connections over the veth (handed in as `--fdrpc/--fdmem/--fdfs`).

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::Value;

use crate::binary::locate_binary;
use crate::error::TestbedError;
use crate::netns::{Host, HostPair};
use crate::process::{become_subreaper, require_root};
use crate::spawn::spawn_with_fds;
use crate::workload::Workload;

/// How long a whole migration may take in a test before both sides are killed.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);

/// The driver libraries the workspace builds, by plugin name.
pub const PLUGIN_FILES: &[(&str, &str)] = &[
    ("pid", "libphaul_htype_pid.so"),
    ("lxc", "libphaul_htype_lxc.so"),
    ("shared", "libphaul_fs_shared.so"),
    ("external", "libphaul_fs_external.so"),
    ("rsync", "libphaul_fs_rsync.so"),
    ("btrfs", "libphaul_fs_btrfs.so"),
    ("zfs", "libphaul_fs_zfs.so"),
    ("lvm", "libphaul_fs_lvm.so"),
    // A test fixture (phaul-testbed/fixtures/plugin-restartable), listed only where a test asks for it.
    ("cmd", "libphaul_fixture_plugin_restartable.so"),
    // Another (phaul-testbed/fixtures/plugin-selfrestore): a host type that runs `criu restore` itself.
    ("selfpid", "libphaul_fixture_plugin_selfrestore.so"),
];

/// A private directory that is removed when dropped.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> Result<ScratchDir, TestbedError> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("phaul-{tag}-{}-{n}", std::process::id()));
        if p.exists() {
            std::fs::remove_dir_all(&p).map_err(|e| TestbedError::io(format!("removing {}", p.display()), e))?;
        }
        std::fs::create_dir_all(&p).map_err(|e| TestbedError::io(format!("creating {}", p.display()), e))?;
        Ok(ScratchDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::env::var_os("PHAUL_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Writes a plugins.toml listing the workspace's driver libraries (next to the `phaul` binary), with the host
/// types listed (`pid`, and the fixtures `cmd` and `selfpid`) using `shared` by default.
pub fn write_plugins_toml(path: &Path, names: &[&str]) -> Result<(), TestbedError> {
    let phaul = locate_binary("phaul")?;
    let dir = phaul.parent().unwrap_or(Path::new("."));
    let mut text = String::from("# written by phaul-testbed\n");
    for (name, file) in PLUGIN_FILES.iter().filter(|(n, _)| names.contains(n)) {
        text.push_str(&format!("\n[[plugin]]\n# {name}\npath = \"{}\"\n", dir.join(file).display()));
    }
    for htype in ["pid", "cmd", "selfpid", "lxc"].into_iter().filter(|n| names.contains(n)) {
        text.push_str(&format!("\n[host-type.{htype}]\nfs = \"shared\"\n"));
    }
    std::fs::write(path, text).map_err(|e| TestbedError::io(format!("writing {}", path.display()), e))
}

/// Two hosts, a scratch directory with image directories for each, and a plugin list.
#[derive(Debug)]
pub struct Lab {
    pub pair: HostPair,
    pub scratch: ScratchDir,
    pub plugins: PathBuf,
    pub phaul: PathBuf,
    pub workload_bin: PathBuf,
}

/// How to run one migration.
#[derive(Default)]
pub struct MigrateOptions {
    /// Print phaul's human report instead of JSON (the demo does).
    pub human_report: bool,
    /// Arguments after `phaul migrate pid PID --fdrpc 3 --fdmem 4 --fdfs 5`.
    pub src_args: Vec<String>,
    /// Arguments after `phaul serve --fdrpc 3 --fdmem 4 --fdfs 5`.
    pub dst_args: Vec<String>,
    pub src_plugins: Option<PathBuf>,
    pub dst_plugins: Option<PathBuf>,
    /// Give neither side `--plugins`: an installed phaul reads its own plugin lists (SYSCONFDIR/phaul).
    pub installed_plugins: bool,
    /// Wrap the source: run this program with these arguments, followed by the phaul command line (for example
    /// the sample external caller). It inherits the channel descriptors.
    pub src_wrapper: Option<(PathBuf, Vec<String>)>,
    /// Wrap the destination the same way (for example a profiler: `perf record -g -o FILE`).
    pub dst_wrapper: Option<(PathBuf, Vec<String>)>,
    /// Called while both sides run, with the pid of `phaul serve` (to kill it mid-transfer, say).
    #[allow(clippy::type_complexity)]
    pub while_running: Option<Box<dyn FnOnce(u32) + Send>>,
    pub timeout: Option<Duration>,
    /// Sample the peak RSS and CPU time of both processes started (`phaul migrate`, or the source wrapper when one
    /// is given, and `phaul serve`) from /proc while they run; see [`MigrationRun::src_usage`].
    pub sample_usage: bool,
    /// How often to check whether the two processes have exited (and to sample them); 20 ms when not given. The
    /// benchmark uses a finer step so that the wall time around [`Lab::migrate`] is not rounded up by polling.
    pub poll: Option<Duration>,
    /// Environment variables of `phaul migrate` (and of the source wrapper, when one is given), e.g. the fault
    /// hook's `PHAUL_TEST_FAULT_AT` / `PHAUL_TEST_FAULT_FILE`. Processes phaul starts (CRIU, its guard) inherit them.
    pub src_env: Vec<(String, String)>,
    /// Environment variables of `phaul serve` (and of the destination wrapper).
    pub dst_env: Vec<(String, String)>,
    /// Called while both sides run, with the pids of both processes started (unlike [`Self::while_running`],
    /// which gets only the destination's).
    #[allow(clippy::type_complexity)]
    pub while_running_both: Option<Box<dyn FnOnce(RunningPids) + Send>>,
    /// What to migrate, as `(HOST-TYPE, ID)`, instead of `pid PID` (the pid given to [`Lab::migrate`] then only
    /// names the restored-pid file).
    pub target: Option<(String, String)>,
    /// How long to wait for `phaul serve` once `phaul migrate` has exited (60 s when not given).
    pub dst_timeout: Option<Duration>,
    /// A side that does not exit in time is killed and reported in [`MigrationRun::src_timed_out`] /
    /// [`MigrationRun::dst_timed_out`] (with what it printed) instead of failing the whole run with
    /// [`TestbedError::Timeout`].
    pub tolerate_timeouts: bool,
    /// Migrate the other way: `phaul migrate` runs in host B and `phaul serve` in host A (a return trip).
    pub reverse: bool,
}

/// The two processes a migration started (see [`MigrateOptions::while_running_both`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunningPids {
    /// `phaul migrate` (or the source wrapper).
    pub src: u32,
    /// `phaul serve` (or the destination wrapper).
    pub dst: u32,
}

/// What a migration run produced.
#[derive(Debug)]
pub struct MigrationRun {
    pub src_status: ExitStatus,
    pub src_stdout: String,
    pub src_stderr: String,
    pub dst_status: ExitStatus,
    pub dst_stderr: String,
    /// The JSON report (unless `human_report` was asked for).
    pub report: Option<Value>,
    /// The restored root pid from `--dst-rpid`, once the migration was confirmed.
    pub restored_pid: Option<i32>,
    pub src_images: PathBuf,
    pub dst_images: PathBuf,
    /// What the source process used, when [`MigrateOptions::sample_usage`] was set.
    pub src_usage: Option<ProcUsage>,
    /// What `phaul serve` used, when [`MigrateOptions::sample_usage`] was set.
    pub dst_usage: Option<ProcUsage>,
    /// The pids of the two processes started.
    pub pids: RunningPids,
    /// How long after its start `phaul migrate` was seen to exit (or was killed).
    pub src_elapsed: Duration,
    /// How long after the start `phaul serve` was seen to exit (or was killed); never less than `src_elapsed`,
    /// since it is collected second.
    pub dst_elapsed: Duration,
    /// With [`MigrateOptions::tolerate_timeouts`]: `phaul migrate` did not exit in time and was killed.
    pub src_timed_out: bool,
    /// With [`MigrateOptions::tolerate_timeouts`]: `phaul serve` did not exit in time and was killed.
    pub dst_timed_out: bool,
}

/// What one process used, read from `/proc/PID/status` and `/proc/PID/stat` while it ran and once more when it
/// had exited but was not reaped yet.
///
/// Only the process itself is counted: the children it reaped (CRIU, for phaul) are reported apart, in
/// `children_*`. (GNU time and `wait4` would fold the largest reaped child's RSS and all reaped children's CPU
/// time into the process's own figures.)
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcUsage {
    /// The highest `VmHWM` seen (KiB): the peak resident set, up to the last sample before the exit.
    pub peak_rss_kib: u64,
    /// User CPU time of all its threads, seconds (clock-tick resolution).
    pub user_s: f64,
    /// System CPU time of all its threads, seconds.
    pub sys_s: f64,
    /// User CPU time of the children it waited for, seconds.
    pub children_user_s: f64,
    /// System CPU time of the children it waited for, seconds.
    pub children_sys_s: f64,
    /// How many times it was sampled while alive.
    pub samples: u32,
    /// Whether the final CPU times were read after the exit (false: from the last sample while alive).
    pub final_read: bool,
}

impl ProcUsage {
    /// User plus system time of the process itself.
    pub fn cpu_s(&self) -> f64 {
        self.user_s + self.sys_s
    }
}

/// `VmHWM` of a live process (KiB), unless it is still `nsenter` (whose image is replaced by the program).
fn read_hwm_kib(pid: u32) -> Option<u64> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if comm.trim() == "nsenter" {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// Reads utime, stime, cutime and cstime of `/proc/PID/stat` into `u` (a zombie still has them).
fn read_cpu(pid: u32, u: &mut ProcUsage) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let Some(close) = text.rfind(')') else { return false };
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // After the comm, the state is index 0; utime, stime, cutime and cstime are fields 14-17 of the line.
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().filter(|t| *t > 0).unwrap_or(100);
    let get = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).map(|v| v as f64 / tick as f64);
    match (get(11), get(12), get(13), get(14)) {
        (Some(ut), Some(st), Some(cut), Some(cst)) => {
            u.user_s = ut;
            u.sys_s = st;
            u.children_user_s = cut;
            u.children_sys_s = cst;
            true
        }
        _ => false,
    }
}

/// How often a usage sampler reads /proc (checking for the exit, a cheap `waitid`, happens at every poll).
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// Checks every `every` whether our child `pid` has exited (without reaping it) and samples it from /proc every
/// [`SAMPLE_EVERY`] (or every `every` if that is longer), until it has exited or `limit` passes.
fn spawn_usage_sampler(pid: u32, every: Duration, limit: Duration) -> std::thread::JoinHandle<ProcUsage> {
    std::thread::spawn(move || {
        let mut u = ProcUsage::default();
        let deadline = Instant::now() + limit;
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG;
        let mut next_sample = Instant::now();
        loop {
            match waitid(Id::Pid(Pid::from_raw(pid as i32)), flags) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(_) => {
                    u.final_read = read_cpu(pid, &mut u);
                    break;
                }
                Err(Errno::EINTR) => continue,
                // Not (or no longer) our child: keep what was sampled.
                Err(_) => break,
            }
            if Instant::now() >= next_sample {
                if let Some(hwm) = read_hwm_kib(pid) {
                    u.peak_rss_kib = u.peak_rss_kib.max(hwm);
                }
                if read_cpu(pid, &mut u) {
                    u.samples += 1;
                }
                next_sample = Instant::now() + SAMPLE_EVERY.max(every);
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(every);
        }
        u
    })
}

impl MigrationRun {
    /// Both sides exited 0.
    pub fn succeeded(&self) -> bool {
        self.src_status.success() && self.dst_status.success()
    }

    /// A one-paragraph account for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "source exit {:?}, destination exit {:?}\n--- source stderr:\n{}\n--- source stdout:\n{}\n--- destination stderr:\n{}",
            self.src_status.code(),
            self.dst_status.code(),
            self.src_stderr,
            self.src_stdout,
            self.dst_stderr
        )
    }
}

impl Lab {
    /// Needs root; makes the calling process a subreaper so restored trees stay reapable.
    pub fn new(tag: &str) -> Result<Lab, TestbedError> {
        require_root()?;
        become_subreaper()?;
        let pair = HostPair::new(tag)?;
        let scratch = ScratchDir::new(tag)?;
        let plugins = scratch.path().join("plugins.toml");
        write_plugins_toml(&plugins, &["pid", "shared", "external"])?;
        for d in ["src-images", "dst-images", "state", "src-state", "dst-state"] {
            std::fs::create_dir_all(scratch.path().join(d)).map_err(|e| TestbedError::io("creating lab dirs", e))?;
        }
        Ok(Lab {
            pair,
            scratch,
            plugins,
            phaul: locate_binary("phaul")?,
            workload_bin: locate_binary("phaul-workload")?,
        })
    }

    pub fn a(&self) -> &Host {
        self.pair.a()
    }

    pub fn b(&self) -> &Host {
        self.pair.b()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// Starts a workload in host A with its state directory under the scratch directory.
    pub fn start_workload(&self, kind: &str, args: &[&str]) -> Result<Workload, TestbedError> {
        // One directory per workload, so that a test may run several.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.path("state").join(format!("{kind}-{}-{n}", std::process::id()));
        Workload::start(self.a(), &self.workload_bin, kind, args, &dir)
    }

    /// [`Lab::start_workload`] through a command prefix (see [`Workload::start_prefixed`]).
    pub fn start_workload_prefixed(
        &self,
        prefix: &[String],
        kind: &str,
        args: &[&str],
    ) -> Result<Workload, TestbedError> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.path("state").join(format!("{kind}-p{}-{n}", std::process::id()));
        Workload::start_prefixed(self.a(), prefix, &self.workload_bin, kind, args, &dir, crate::START_TIMEOUT)
    }

    /// `phaul ARGS` in `host`, or `WRAPPER WRAPPER-ARGS -- phaul ARGS` when a wrapper is given.
    fn phaul_command(&self, host: &Host, wrapper: Option<&(PathBuf, Vec<String>)>, args: &[String]) -> Command {
        match wrapper {
            None => host.command(&self.phaul, args),
            Some((prog, wargs)) => {
                let mut all: Vec<String> = wargs.clone();
                all.push("--".into());
                all.push(self.phaul.display().to_string());
                all.extend(args.iter().cloned());
                host.command(prog, &all)
            }
        }
    }

    /// Migrates the tree rooted at `pid` from A to B.
    pub fn migrate(&self, pid: i32, opts: MigrateOptions) -> Result<MigrationRun, TestbedError> {
        let ch = self.pair.channel_triple()?;
        let rpid = self.path(&format!("rpid-{pid}"));
        let _ = std::fs::remove_file(&rpid);
        let src_images = self.path("src-images");
        let dst_images = self.path("dst-images");
        let dst_plugins = opts.dst_plugins.clone().unwrap_or_else(|| self.plugins.clone());
        let src_plugins = opts.src_plugins.clone().unwrap_or_else(|| self.plugins.clone());

        let (dst_plugins, src_plugins) = if opts.installed_plugins {
            (None, None)
        } else {
            (Some(dst_plugins.as_path()), Some(src_plugins.as_path()))
        };
        let mut serve_args = phaul_args(dst_plugins, &["serve"], &dst_images, &opts.dst_args);
        serve_args.extend(["--state-dir".into(), self.path("dst-state").display().to_string()]);
        serve_args.extend(["--rpid-dir".into(), self.scratch.path().display().to_string()]);
        serve_args.extend(opts.dst_args.iter().cloned());
        let (src_host, dst_host) = if opts.reverse { (self.b(), self.a()) } else { (self.a(), self.b()) };
        let mut serve_cmd = self.phaul_command(dst_host, opts.dst_wrapper.as_ref(), &serve_args);
        serve_cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        serve_cmd.envs(opts.dst_env.iter().map(|(k, v)| (k, v)));
        let started = Instant::now();
        // Each host keeps the ends of the connections that live in its own network namespace.
        let (src_end, dst_end) = if opts.reverse {
            (
                [ch.rpc.1.as_fd(), ch.mem.1.as_fd(), ch.fs.1.as_fd()],
                [ch.rpc.0.as_fd(), ch.mem.0.as_fd(), ch.fs.0.as_fd()],
            )
        } else {
            (
                [ch.rpc.0.as_fd(), ch.mem.0.as_fd(), ch.fs.0.as_fd()],
                [ch.rpc.1.as_fd(), ch.mem.1.as_fd(), ch.fs.1.as_fd()],
            )
        };
        let serve = spawn_with_fds(serve_cmd, &[(dst_end[0], 3), (dst_end[1], 4), (dst_end[2], 5)])
            .map_err(|e| TestbedError::io("starting phaul serve", e))?;

        let (htype, id) = opts.target.clone().unwrap_or_else(|| ("pid".into(), pid.to_string()));
        let mut mig_args = phaul_args(src_plugins, &["migrate", &htype, &id], &src_images, &opts.src_args);
        mig_args.extend(["--state-dir".into(), self.path("src-state").display().to_string()]);
        // The destination writes the restored pid under its --rpid-dir, by the plain name the source gives.
        mig_args.extend(["--dst-rpid".into(), format!("rpid-{pid}")]);
        if !opts.human_report {
            mig_args.push("--json".into());
        }
        mig_args.extend(opts.src_args.iter().cloned());
        let mut mig_cmd = self.phaul_command(src_host, opts.src_wrapper.as_ref(), &mig_args);
        mig_cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        mig_cmd.envs(opts.src_env.iter().map(|(k, v)| (k, v)));
        let migrate = spawn_with_fds(mig_cmd, &[(src_end[0], 3), (src_end[1], 4), (src_end[2], 5)])
            .map_err(|e| TestbedError::io("starting phaul migrate", e))?;
        // Only the two phaul processes may hold the channels, so that either one's death is seen by the other.
        drop(ch);

        let serve_pid = serve.id();
        let pids = RunningPids { src: migrate.id(), dst: serve_pid };
        let timeout = opts.timeout.unwrap_or(MIGRATION_TIMEOUT);
        let poll = opts.poll.unwrap_or(DEFAULT_POLL);
        let samplers = opts.sample_usage.then(|| {
            let limit = timeout + Duration::from_secs(60);
            (spawn_usage_sampler(migrate.id(), poll, limit), spawn_usage_sampler(serve_pid, poll, limit))
        });
        let watcher = opts.while_running.map(|f| std::thread::spawn(move || f(serve_pid)));
        let watcher_both = opts.while_running_both.map(|f| std::thread::spawn(move || f(pids)));
        let (src_sampler, dst_sampler) = match samplers {
            Some((s, d)) => (Some(s), Some(d)),
            None => (None, None),
        };
        let src = collect_inner(migrate, timeout, "phaul migrate", poll, src_sampler.as_ref());
        let src_elapsed = started.elapsed();
        let dst_timeout = opts.dst_timeout.unwrap_or(Duration::from_secs(60));
        let dst = collect_inner(serve, dst_timeout, "phaul serve", poll, dst_sampler.as_ref());
        let dst_elapsed = started.elapsed();
        for w in [watcher, watcher_both].into_iter().flatten() {
            let _ = w.join();
        }
        let (src, dst) = (src?, dst?);
        if !opts.tolerate_timeouts {
            for (c, what) in [(&src, "phaul migrate"), (&dst, "phaul serve")] {
                if let Some(timeout) = c.timed_out {
                    return Err(TestbedError::Timeout { what: format!("{what} to finish"), timeout });
                }
            }
        }
        let src_usage = src_sampler.and_then(|h| h.join().ok());
        let dst_usage = dst_sampler.and_then(|h| h.join().ok());
        let report = serde_json::from_str::<Value>(&src.stdout).ok();
        let restored_pid = std::fs::read_to_string(&rpid).ok().and_then(|s| s.trim().parse().ok());
        Ok(MigrationRun {
            src_status: src.status,
            src_stdout: src.stdout,
            src_stderr: src.stderr,
            dst_status: dst.status,
            dst_stderr: dst.stderr,
            report,
            restored_pid,
            src_images,
            dst_images,
            src_usage,
            dst_usage,
            pids,
            src_elapsed,
            dst_elapsed,
            src_timed_out: src.timed_out.is_some(),
            dst_timed_out: dst.timed_out.is_some(),
        })
    }

    /// Runs `phaul ARGS` in host A and returns (status, stdout, stderr).
    pub fn phaul(&self, args: &[&str], fds: &[(OwnedFd, i32)]) -> Result<Collected, TestbedError> {
        // Session journals go to the scratch directory, like everything else a test makes.
        let state = self.path("src-state").display().to_string();
        let mut all = vec!["--state-dir", state.as_str()];
        all.extend_from_slice(args);
        let mut cmd = self.a().command(&self.phaul, &all);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let borrowed: Vec<_> = fds.iter().map(|(fd, n)| (fd.as_fd(), *n)).collect();
        let child = spawn_with_fds(cmd, &borrowed).map_err(|e| TestbedError::io("starting phaul", e))?;
        collect(child, Duration::from_secs(60), "phaul")
    }
}

/// A finished process's status and output.
#[derive(Debug)]
pub struct Collected {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A thread reading a pipe to its end; what it read so far is always in the buffer.
type Reader = (std::thread::JoinHandle<()>, std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

fn reader(mut r: impl Read + Send + 'static) -> Reader {
    let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = buf.clone();
    let h = std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => sink.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    });
    (h, buf)
}

/// How often [`collect`] checks whether the child has exited.
const DEFAULT_POLL: Duration = Duration::from_millis(20);

/// Waits for a child at most `timeout` (then kills it), collecting its output.
pub fn collect(child: Child, timeout: Duration, what: &str) -> Result<Collected, TestbedError> {
    collect_every(child, timeout, what, DEFAULT_POLL)
}

/// [`collect`], checking every `poll` whether the child has exited.
pub fn collect_every(child: Child, timeout: Duration, what: &str, poll: Duration) -> Result<Collected, TestbedError> {
    let c = collect_inner(child, timeout, what, poll, None)?;
    match c.timed_out {
        Some(timeout) => Err(TestbedError::Timeout { what: format!("{what} to finish"), timeout }),
        None => Ok(Collected { status: c.status, stdout: c.stdout, stderr: c.stderr }),
    }
}

/// What [`collect_inner`] saw: the child's end, and whether it had to be killed because it ran past its bound.
struct Ended {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    /// The bound it ran past (it was killed then).
    timed_out: Option<Duration>,
}

/// Waits as [`collect`] does; when `sampler` is given, the exited child is only reaped once the sampler has read
/// its final figures (or given up). A child still running at `timeout` is killed, and its output still collected.
fn collect_inner(
    mut child: Child,
    timeout: Duration,
    what: &str,
    poll: Duration,
    sampler: Option<&std::thread::JoinHandle<ProcUsage>>,
) -> Result<Ended, TestbedError> {
    let out = child.stdout.take().map(reader);
    let err = child.stderr.take().map(reader);
    let deadline = Instant::now() + timeout;
    let mut timed_out = None;
    let status = loop {
        let may_reap = !matches!(sampler, Some(s) if !s.is_finished());
        let state = if may_reap { child.try_wait() } else { Ok(None) };
        match state {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                timed_out = Some(timeout);
                match child.wait() {
                    Ok(s) => break s,
                    Err(e) => return Err(TestbedError::io(format!("waiting for {what}"), e)),
                }
            }
            Ok(None) => std::thread::sleep(poll),
            Err(e) => return Err(TestbedError::io(format!("waiting for {what}"), e)),
        }
    };
    // A grandchild that outlived the child may still hold its pipes: read what is there, bounded.
    let stdout = join_bounded(out, Duration::from_secs(5));
    let stderr = join_bounded(err, Duration::from_secs(5));
    Ok(Ended { status, stdout, stderr, timed_out })
}

/// The text a [`reader`] thread collected, waiting at most `bound` for its pipe to close (a process the child
/// started may still hold it: then what was read so far).
fn join_bounded(r: Option<Reader>, bound: Duration) -> String {
    let Some((h, buf)) = r else { return String::new() };
    let deadline = Instant::now() + bound;
    while !h.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if h.is_finished() {
        let _ = h.join();
    }
    let bytes = buf.lock().unwrap_or_else(|p| p.into_inner()).clone();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs a command to completion with a timeout, collecting output.
pub fn run_collect(mut cmd: Command, timeout: Duration, what: &str) -> Result<Collected, TestbedError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| TestbedError::io(format!("starting {what}"), e))?;
    collect(child, timeout, what)
}

/// `phaul --plugins PLUGINS SUBCOMMAND... --fdrpc 3 --fdmem 4 --fdfs 5 --img-path IMAGES --timeout 120`: what both
/// sides of a handed-in-fds migration share. `--timeout 120` only when the caller's own arguments (`extra`, added
/// after these) give no `--timeout` (phaul refuses an option given twice).
fn phaul_args(plugins: Option<&Path>, subcommand: &[&str], images: &Path, extra: &[String]) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(p) = plugins {
        args.extend(["--plugins".to_string(), p.display().to_string()]);
    }
    args.extend(subcommand.iter().map(|s| s.to_string()));
    for (flag, value) in [("--fdrpc", "3"), ("--fdmem", "4"), ("--fdfs", "5")] {
        args.extend([flag.to_string(), value.to_string()]);
    }
    args.extend(["--img-path".to_string(), images.display().to_string()]);
    if !extra.iter().any(|a| a == "--timeout" || a.starts_with("--timeout=")) {
        args.extend(["--timeout".to_string(), "120".to_string()]);
    }
    args
}
