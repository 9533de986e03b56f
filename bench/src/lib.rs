//! phaul-bench: migrates the same workload (a `phaul-workload memory` process holding N MiB of touched memory, pid 1
//! of its own pid namespace) between the two network-namespace hosts of the testbed three ways — phaul
//! stop-and-copy, bare CRIU as an operator scripts it, and a raw TCP copy of the same number of bytes (the
//! channel's ceiling) — several repetitions each in a rotating order, then writes a markdown table, a JSON file and
//! PNG plots. See `bench/README.md` for what each figure means.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use phaul_testbed::{netns_of_pid, state_ok, wait_pid_gone, Lab, TestbedError, Workload, PROBE_TIMEOUT};
use serde_json::Value;

pub mod bare;
pub mod calibrate;
pub mod compare;
pub mod copy;
pub mod fs_rounds;
pub mod launch;
pub mod phaul_run;
pub mod plot;
pub mod raw;
pub mod report;
pub mod sample;
pub mod throttle;
pub mod usage;

use sample::{order_for_rep, Method, Sample};

/// Bound for a workload to fill its memory and publish its first state.
const WORKLOAD_START_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound for the source tree to be gone after a successful migration.
const SOURCE_GONE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two measurements, after `sync`, so that one run's leftovers (dirty pages, exiting processes)
/// do not land in the next one.
const SETTLE: Duration = Duration::from_millis(300);

/// A failure of the benchmark itself, as a sentence.
#[derive(Debug)]
pub struct BenchError(pub String);

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BenchError {}

impl From<TestbedError> for BenchError {
    fn from(e: TestbedError) -> Self {
        BenchError(e.to_string())
    }
}

impl From<String> for BenchError {
    fn from(s: String) -> Self {
        BenchError(s)
    }
}

impl From<&str> for BenchError {
    fn from(s: &str) -> Self {
        BenchError(s.to_string())
    }
}

pub type Result<T> = std::result::Result<T, BenchError>;

/// Adds what was being done to an error.
pub trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| BenchError(format!("{}: {e}", what())))
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Workload sizes, MiB.
    pub sizes: Vec<u64>,
    /// Repetitions of each method at each size.
    pub reps: u32,
    /// Where results go.
    pub out: PathBuf,
    /// Smoke mode (recorded in the results).
    pub quick: bool,
    /// The methods to run ([`Method::MAIN`], possibly with [`Method::CriuKeepSource`]).
    pub methods: Vec<Method>,
}

/// Everything one measurement needs.
pub struct Ctx<'a> {
    pub lab: &'a Lab,
    /// The CRIU binary phaul uses (and the bare-CRIU path too).
    pub criu: PathBuf,
    counter: AtomicU32,
    /// Give every workload a heartbeat (`phaul-workload --heartbeat`: a line every 20 ms naming the host it runs
    /// on) and record the gap the migration left in it ([`sample::metric::HEARTBEAT_GAP_MS`]).
    pub heartbeat: bool,
}

/// Bound for the restored workload's first heartbeat line on B to show up after it answered its probe.
const HEARTBEAT_WAIT: Duration = Duration::from_secs(3);

impl<'a> Ctx<'a> {
    pub fn new(lab: &'a Lab, criu: PathBuf) -> Self {
        Ctx { lab, criu, counter: AtomicU32::new(0), heartbeat: false }
    }

    /// The heartbeat log of a workload started with [`Ctx::heartbeat`].
    fn heartbeat_log(w: &Workload) -> PathBuf {
        w.state_dir().join("heartbeat.log")
    }

    /// A number unique within this run (for directories and ports).
    pub fn next_id(&self) -> u32 {
        self.counter.fetch_add(1, Ordering::SeqCst)
    }

    /// Starts a fresh memory workload of `size_mib` in host A (own state directory) and probes it.
    pub fn start_workload(&self, size_mib: u64) -> Result<(Workload, Value)> {
        let dir = self.lab.path("state").join(format!("memory-{}", self.next_id()));
        let size = size_mib.to_string();
        let heartbeat = dir.join("heartbeat.log").display().to_string();
        let mut args = vec!["--size-mib", &size];
        if self.heartbeat {
            args.extend(["--heartbeat", &heartbeat]);
        }
        let w = Workload::start_with_timeout(
            self.lab.a(),
            &self.lab.workload_bin,
            "memory",
            &args,
            &dir,
            WORKLOAD_START_TIMEOUT,
        )?;
        let before = w.probe(PROBE_TIMEOUT)?;
        state_ok(&before)?;
        Ok((w, before))
    }

    /// After a migration: the source is gone, `restored` runs in host B, and its memory checksum is the one the
    /// source had. The restored tree is adopted by `w`, so dropping `w` kills it. With [`Ctx::heartbeat`], the gap
    /// in the heartbeat goes into `s`.
    pub fn verify_restored(&self, w: &mut Workload, restored: i32, before: &Value, s: &mut Sample) -> Result<()> {
        w.adopt_pid(restored).ctx(|| format!("the restored pid {restored} does not exist"))?;
        if !wait_pid_gone(w.pid(), SOURCE_GONE_TIMEOUT) {
            return Err(format!("the source tree {} is still alive on A", w.pid()).into());
        }
        let b = self.lab.b().netns_inode().ctx(|| "reading host B's netns".into())?;
        if netns_of_pid(restored).ctx(|| format!("reading the netns of {restored}"))? != b {
            return Err(format!("the restored tree {restored} is not in host B").into());
        }
        let after = w.probe_pid(restored, PROBE_TIMEOUT)?;
        state_ok(&after)?;
        if after["actual_checksum"] != before["expected_checksum"] {
            return Err(format!(
                "memory checksum after the migration is {}, expected {}",
                after["actual_checksum"], before["expected_checksum"]
            )
            .into());
        }
        if self.heartbeat {
            match heartbeat_gap(&Self::heartbeat_log(w)) {
                Ok(gap) => s.set(sample::metric::HEARTBEAT_GAP_MS, gap),
                Err(e) => s.notes.push(format!("heartbeat: {e}")),
            }
        }
        Ok(())
    }
}

/// The gap between the last beat written on A and the first written on B, once B has written one (bounded).
fn heartbeat_gap(log: &Path) -> std::result::Result<f64, String> {
    let deadline = Instant::now() + HEARTBEAT_WAIT;
    let (a, b) = (phaul_testbed::ADDR_A.to_string(), phaul_testbed::ADDR_B.to_string());
    loop {
        let summary = phaul_workloads::heartbeat::check_file(log)?;
        match (summary.addrs.as_slice(), summary.switch_gap_ms) {
            ([from, to], Some(gap)) if *from == a && *to == b => return Ok(gap as f64),
            ([_, _], _) => return Err(format!("the heartbeat moved {:?}, not from {a} to {b}", summary.addrs)),
            _ if Instant::now() >= deadline => {
                return Err(format!("no beat from {b} within {HEARTBEAT_WAIT:?} (hosts seen: {:?})", summary.addrs))
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Ends a workload (the restored copy included) and waits, bounded, until `pids` are gone.
pub fn finish_workload(w: Workload, pids: &[i32]) {
    drop(w);
    for &p in pids {
        if !wait_pid_gone(p, Duration::from_secs(10)) {
            eprintln!("phaul-bench: warning: pid {p} is still alive 10 s after SIGKILL");
        }
    }
}

/// Flushes dirty pages and pauses, so that measurements do not inherit each other's writeback.
pub fn settle() {
    nix::unistd::sync();
    std::thread::sleep(SETTLE);
}

/// What the run produced.
#[derive(Debug)]
pub struct Outcome {
    pub samples: Vec<Sample>,
    pub report: report::Report,
    pub files: Vec<PathBuf>,
}

/// Runs the benchmark and writes its results under `cfg.out`.
pub fn run(cfg: &Config) -> Result<Outcome> {
    if cfg.sizes.is_empty() || cfg.sizes.contains(&0) {
        return Err("--sizes needs at least one size, every one above 0 MiB".into());
    }
    if cfg.methods.is_empty() {
        return Err("no method to run".into());
    }
    if cfg.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    let criu = phaul_core::criu::locate_criu(None).ctx(|| "finding CRIU".into())?.path;
    let mut env_before = report::Environment::capture(&criu);
    let largest = cfg.sizes.iter().copied().max().unwrap_or(0);
    eprintln!("phaul-bench: measuring the cost of first-touching {largest} MiB of memory on this machine");
    env_before.memory_calibration = calibrate::measure(largest);
    let lab = Lab::new("bench")?;
    let ctx = Ctx::new(&lab, criu);
    std::fs::create_dir_all(&cfg.out).ctx(|| format!("creating {}", cfg.out.display()))?;

    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let total_runs = cfg.reps as usize * cfg.sizes.len() * cfg.methods.len();
    for rep in 0..cfg.reps {
        for &size in &cfg.sizes {
            for (pos, method) in order_for_rep(&cfg.methods, rep).into_iter().enumerate() {
                settle();
                let mut s = Sample::new(method, size, rep, pos as u32);
                if let Err(e) = measure_one(&ctx, &Variants::default(), &samples, &mut s) {
                    s.error = Some(e.to_string());
                }
                eprintln!("phaul-bench: [{}/{total_runs}] {}", samples.len() + 1, progress_line(&s));
                samples.push(s);
            }
        }
    }
    let env = env_before.finish(started.elapsed());
    let report = report::Report::build(cfg, env, &samples);
    let files = report.write(&cfg.out, &samples)?;
    Ok(Outcome { samples, report, files })
}

/// What the variants beyond the main three need.
#[derive(Debug, Default, Clone, Copy)]
pub struct Variants<'a> {
    /// [`Method::PhaulTls`]: the certificates.
    pub pki: Option<&'a launch::Pki>,
    /// [`Method::PhaulBaseline`]: the baseline build.
    pub baseline: Option<&'a launch::PhaulBuild>,
    /// [`Method::PhaulTls`]: the build that runs with TLS (the workspace's).
    pub current: Option<&'a launch::PhaulBuild>,
}

/// Measures `s.method` at `s.size_mib` into `s`; `earlier` are the samples so far (the raw copy moves as many
/// bytes as the latest phaul run at that size moved).
pub fn measure_one(ctx: &Ctx<'_>, v: &Variants<'_>, earlier: &[Sample], s: &mut Sample) -> Result<()> {
    let size = s.size_mib;
    match s.method {
        Method::Phaul => phaul_run::measure(ctx, size, s),
        Method::Criu => bare::measure(ctx, size, s, false),
        Method::CriuKeepSource => bare::measure(ctx, size, s, true),
        Method::Raw => {
            let bytes = raw_bytes(earlier, size, s.network.as_deref());
            raw::measure(ctx, bytes, s)
        }
        Method::PhaulTls => {
            let (Some(pki), Some(build)) = (v.pki, v.current) else {
                return Err("phaul with TLS needs certificates and the build".into());
            };
            phaul_run::measure_with(ctx, size, s, phaul_run::How::Own { build, transport: launch::Transport::Tls(pki) })
        }
        Method::PhaulBaseline => {
            let Some(build) = v.baseline else { return Err("no baseline build given (--baseline-phaul)".into()) };
            phaul_run::measure_with(ctx, size, s, phaul_run::How::Own { build, transport: launch::Transport::Fds })
        }
    }
}

/// The bytes the raw copy moves at `size`: what the latest phaul run at that size (and network condition) moved
/// (its memory pages), or the workload's size when phaul has not run yet there.
fn raw_bytes(samples: &[Sample], size: u64, network: Option<&str>) -> u64 {
    samples
        .iter()
        .rev()
        .filter(|s| {
            s.method == Method::Phaul && s.size_mib == size && s.error.is_none() && s.network.as_deref() == network
        })
        .find_map(|s| s.get(sample::metric::PAGES_MIB))
        .map(|m| (m * (1u64 << 20) as f64).round() as u64)
        .unwrap_or(size << 20)
}

fn progress_line(s: &Sample) -> String {
    use sample::metric as m;
    let f = |k: &str| s.get(k).map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
    let head = format!("{:>5} MiB rep {} {:<12}", s.size_mib, s.rep, s.method.label());
    match &s.error {
        Some(e) => format!("{head} FAILED: {e}"),
        None => format!(
            "{head} downtime {} ms, frozen {} ms, total {} ms, rate {} MiB/s",
            f(m::DOWNTIME_MS),
            f(m::CRIU_FROZEN_MS),
            f(m::TOTAL_MS),
            f(m::RATE_MIB_S)
        ),
    }
}

/// The default output directory: `bench/results` of this workspace.
pub fn default_out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("results")
}
