//! The fault-injection matrix: one real migration per cell (a hook point of the engine × what goes wrong there
//! × the memory mode), and the checks that every cell must pass whatever went wrong.
//!
//! # The hook
//!
//! phaul has a test hook (`phaul-core/src/engine/fault.rs`): with `PHAUL_TEST_FAULT_AT=POINT[#N]` and
//! `PHAUL_TEST_FAULT_FILE=PATH` in its environment, the N-th time it reaches POINT it writes one JSON line
//! `{"point", "pid", "criu_pids"}` to PATH and stops itself with SIGSTOP. Points are `SIDE:EVENT:WHAT`
//! ([`STOP_AND_COPY_POINTS`] lists those of a live stop-and-copy migration). [`run_cell`] arms the side the point
//! names, waits for the file, leaves the process stopped for [`DWELL`], does the cell's [`Action`] and continues
//! the stopped process with SIGCONT (unless the action killed it).
//!
//! # A cell
//!
//! [`run_cell`] starts a `memory` workload (32 MiB checksummed, with a heartbeat) in host A of a fresh [`Lab`],
//! migrates it to host B through [`Lab::migrate`] with the bounds of [`Bounds::default`], does the action at the
//! point, then settles what needs settling: a long link cut is restored once both phaul processes have exited
//! (after phaul gave up: with handed-in descriptors it cannot reconnect anyway); the source's guard is waited for
//! when the source was killed; a session left in doubt is resolved the way an operator would, with
//! `phaul resolve SESSION --fdrpc 3` on a new connection to a new `phaul serve --fdrpc 3 --fdmem 4` in B (which
//! answers from B's journal). Then it checks, each with a bounded wait (each check is a function returning
//! `Result<(), String>`, named in the failure):
//!
//! * [`check_one_copy`]: exactly one copy of the workload exists (a pid-namespace init running the workload's
//!   command line), on the host the outcome names;
//! * [`check_heartbeat`]: at most one copy ran at any time (the heartbeat log's host changes at most once, never
//!   back, and its beats increase), and the last beats come from the surviving copy's host;
//! * [`check_probe`]: the surviving copy answers a probe, its 32 MiB checksum is intact and its counter did not go
//!   back;
//! * [`check_freeze_bound`]: the longest heartbeat gap stays under `--max-frozen` plus a margin, except in cells
//!   that ended in doubt, where [`check_end_bound`] instead bounds when phaul gave up;
//! * [`check_exit_status`]: the exit statuses, the JSON report (`outcome`, `session`, `copies`) and the messages
//!   say what happened (0 migrated, 1 failed, 3 in doubt naming `phaul resolve SESSION`, 4 lost);
//! * [`check_journals`]: the two journals agree with where the workload is;
//! * [`check_held_frozen`] (cells in doubt, before resolving): the source's copy exists and is frozen in phaul's
//!   freezer cgroup;
//! * [`check_guard`]: the source's guard exited (and, when the source was killed, settled the session or left it
//!   in doubt);
//! * [`check_destination_clean`] (workload on A): nothing left in B's network namespace, no CRIU working in the
//!   lab's destination images; [`check_source_clean`]: no freezer cgroup of the session and no `phaul-*` nftables
//!   table left in A.
//!
//! Everything the cell starts or changes is undone on every path (a [`LinkCut`] restores the link, the cell's
//! `Cleanup` kills by pid what it found and removes the session's freezer cgroup), even when a check fails.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use phaul_workloads::heartbeat::{check_log, HeartbeatSummary};
use serde_json::Value;

use crate::migration::{collect, Lab, MigrateOptions, MigrationRun, RunningPids};
use crate::netns::{CutKind, Host, LinkCut};
use crate::process::{ns_pids, pid_alive, pids_in_netns, proc_stat, reap_pid};
use crate::spawn::spawn_with_fds;
use crate::workload::{state_ok, Workload, PROBE_TIMEOUT};

/// The hook's point (`POINT[#N]`).
pub const FAULT_AT_ENV: &str = "PHAUL_TEST_FAULT_AT";
/// Where the hook writes its line.
pub const FAULT_FILE_ENV: &str = "PHAUL_TEST_FAULT_FILE";

/// Every hook point a live stop-and-copy migration passes, in the order it passes them (`#2`: the second time,
/// e.g. the final filesystem round, inside the freeze). Points a run does not reach are reported as such.
pub const STOP_AND_COPY_POINTS: &[&str] = &[
    "src:send:Hello",
    "dst:recv:Hello",
    "src:recv:HelloReply",
    "src:send:CpuCheck",
    "dst:recv:CpuCheck",
    "dst:send:CpuCheckReply",
    "src:recv:CpuCheckReply",
    "src:send:Setup",
    "dst:recv:Setup",
    "dst:send:SetupReply",
    "src:recv:SetupReply",
    // The one filesystem round while the workload runs.
    "src:send:FsRoundDone",
    "dst:recv:FsRoundDone",
    "dst:send:FsRoundReply",
    "src:recv:FsRoundReply",
    // The final round: the page server starts, then the dump freezes the workload.
    "src:send:StartRound",
    "dst:recv:StartRound",
    "dst:send:StartRoundReply",
    "src:recv:StartRoundReply",
    "src:notify:pre-dump",
    "src:notify:post-dump",
    "src:send:EndRound",
    "dst:recv:EndRound",
    "dst:send:EndRoundReply",
    "src:recv:EndRoundReply",
    "src:send:FsRoundDone#2",
    "dst:recv:FsRoundDone#2",
    "dst:send:FsRoundReply#2",
    "src:recv:FsRoundReply#2",
    "src:send:Files",
    "dst:recv:Files",
    "dst:send:FilesReply",
    "src:recv:FilesReply",
    "src:send:Restore",
    "dst:recv:Restore",
    "dst:notify:pre-restore",
    "dst:notify:setup-namespaces",
    "dst:notify:post-setup-namespaces",
    "dst:notify:post-restore",
    "dst:send:RestoreReply",
    "src:recv:RestoreReply",
    // The commit.
    "src:step:committing",
    "src:send:Commit",
    "dst:recv:Commit",
    "dst:step:commit-received",
    "dst:notify:pre-resume",
    "dst:notify:post-resume",
    "dst:send:Committed",
    "src:recv:Committed",
    // After the freeze.
    "src:send:Finish",
    "dst:recv:Finish",
    "dst:send:FinishReply",
    "src:recv:FinishReply",
];

/// The memory mode of a cell. Only stop-and-copy runs on this host's kernel (no soft-dirty tracking, lazy pages
/// broken: see ENVIRONMENT.md); the others are named so that a cell list can ask for them, and are reported as
/// not applicable here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    StopAndCopy,
    /// `--pre-dump off --lazy-restore`.
    LazyRestore,
    /// `--mode lazy`.
    PostCopy,
    /// `--post-copy-after 1`.
    Hybrid,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::StopAndCopy => "stop-and-copy",
            Mode::LazyRestore => "lazy-restore",
            Mode::PostCopy => "post-copy",
            Mode::Hybrid => "hybrid",
        }
    }

    /// The source's arguments for the mode.
    pub fn src_args(self) -> Vec<String> {
        let a: &[&str] = match self {
            Mode::StopAndCopy => &["--pre-dump", "off"],
            Mode::LazyRestore => &["--pre-dump", "off", "--lazy-restore"],
            Mode::PostCopy => &["--mode", "lazy"],
            Mode::Hybrid => &["--post-copy-after", "1"],
        };
        a.iter().map(|s| s.to_string()).collect()
    }

    /// `Err(why)` when the mode cannot run on this host.
    pub fn runs_here(self) -> Result<(), String> {
        match self {
            Mode::StopAndCopy => Ok(()),
            Mode::LazyRestore => {
                Err("--lazy-restore is refused on this kernel (lazy pages do not work here); lab kernel only".into())
            }
            Mode::PostCopy | Mode::Hybrid => {
                Err(format!("{} needs the lab kernel (soft-dirty tracking, working lazy pages)", self.name()))
            }
        }
    }
}

/// What goes wrong at the point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Nothing: the process continues untouched (the migration must succeed).
    None,
    /// SIGKILL `phaul migrate`.
    KillSrc,
    /// SIGKILL `phaul serve`.
    KillDst,
    /// SIGKILL the source's CRIU: the `criu_pids` of the hook's line when the point is the source's, otherwise
    /// every CRIU process under `phaul migrate`. Not applicable when there is none.
    KillSrcCriu,
    /// SIGKILL the destination's CRIU (page server or restoring CRIU), the same way.
    KillDstCriu,
    /// `ip link set VETH down` in host B; restored once both phaul processes have exited.
    LinkDown,
    /// nftables rules in host B drop everything on its veth, silently; removed once both phaul processes have
    /// exited.
    Blackhole,
    /// The same blackhole for one second only, less than `--link-timeout`: the connections must survive it.
    BlackholeBlip,
}

impl Action {
    pub const ALL: &'static [Action] = &[
        Action::None,
        Action::KillSrc,
        Action::KillDst,
        Action::KillSrcCriu,
        Action::KillDstCriu,
        Action::LinkDown,
        Action::Blackhole,
        Action::BlackholeBlip,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::None => "none",
            Action::KillSrc => "kill-src",
            Action::KillDst => "kill-dst",
            Action::KillSrcCriu => "kill-src-criu",
            Action::KillDstCriu => "kill-dst-criu",
            Action::LinkDown => "link-down",
            Action::Blackhole => "blackhole",
            Action::BlackholeBlip => "blackhole-blip",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.iter().copied().find(|a| a.name() == s)
    }

    fn cut(self) -> Option<CutKind> {
        match self {
            Action::LinkDown => Some(CutKind::Down),
            Action::Blackhole | Action::BlackholeBlip => Some(CutKind::Blackhole),
            _ => None,
        }
    }
}

/// Which phaul process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Src => "source",
            Side::Dst => "destination",
        }
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cell {
    /// `SIDE:EVENT:WHAT[#N]`.
    pub point: String,
    pub action: Action,
    pub mode: Mode,
}

impl Cell {
    /// A stop-and-copy cell.
    pub fn new(point: &str, action: Action) -> Cell {
        Cell { point: point.to_string(), action, mode: Mode::StopAndCopy }
    }

    /// The side the point belongs to (whose environment arms the hook).
    pub fn side(&self) -> Side {
        if self.point.starts_with("dst:") {
            Side::Dst
        } else {
            Side::Src
        }
    }

    /// `POINT × ACTION` (with the mode unless stop-and-copy).
    pub fn name(&self) -> String {
        match self.mode {
            Mode::StopAndCopy => format!("{} × {}", self.point, self.action.name()),
            m => format!("{} × {} [{}]", self.point, self.action.name(), m.name()),
        }
    }
}

/// The bounds every cell runs with.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// `--max-frozen`.
    pub max_frozen: Duration,
    /// `--resolve-timeout`.
    pub resolve_timeout: Duration,
    /// `--link-timeout` (both sides).
    pub link_timeout: Duration,
    /// `--timeout` (both sides).
    pub timeout: Duration,
    /// `serve --reconnect-window`.
    pub reconnect_window: Duration,
    /// What a freeze may exceed `--max-frozen` by (the heartbeat's view includes CRIU's own freezing and
    /// thawing).
    pub margin: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_frozen: Duration::from_secs(10),
            resolve_timeout: Duration::from_secs(10),
            link_timeout: Duration::from_secs(3),
            timeout: Duration::from_secs(30),
            reconnect_window: Duration::from_secs(5),
            margin: Duration::from_secs(3),
        }
    }
}

impl Bounds {
    fn src_args(&self) -> Vec<String> {
        let s = |d: Duration| d.as_secs().to_string();
        vec![
            "--max-frozen".into(),
            s(self.max_frozen),
            "--resolve-timeout".into(),
            s(self.resolve_timeout),
            "--link-timeout".into(),
            s(self.link_timeout),
            "--timeout".into(),
            s(self.timeout),
        ]
    }

    fn dst_args(&self) -> Vec<String> {
        let s = |d: Duration| d.as_secs().to_string();
        vec![
            "--reconnect-window".into(),
            s(self.reconnect_window),
            "--link-timeout".into(),
            s(self.link_timeout),
            "--timeout".into(),
            s(self.timeout),
        ]
    }

    /// When phaul migrate must have ended, counted from the fault: the rest of the freeze, then the resolve
    /// timeout, plus the margin.
    fn end_bound(&self) -> Duration {
        self.max_frozen + self.resolve_timeout + self.margin + self.link_timeout
    }
}

/// The hook's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRecord {
    pub point: String,
    pub pid: i32,
    pub criu_pids: Vec<i32>,
}

impl FaultRecord {
    pub fn parse(text: &str) -> Result<FaultRecord, String> {
        let v: Value = serde_json::from_str(text.trim()).map_err(|e| format!("bad fault line {text:?}: {e}"))?;
        let point = v["point"].as_str().ok_or_else(|| format!("no point in {text:?}"))?.to_string();
        let pid = v["pid"].as_i64().ok_or_else(|| format!("no pid in {text:?}"))? as i32;
        let criu_pids = v["criu_pids"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).map(|p| p as i32).collect())
            .unwrap_or_default();
        Ok(FaultRecord { point, pid, criu_pids })
    }
}

/// The verdict of a cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Every check that failed: `check name: what`.
    Fail(Vec<String>),
    /// Why the cell could not be run as asked (the point was not reached, no CRIU to kill, a lab-only mode).
    NotApplicable(String),
}

/// Where the workload's copies are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadCopy {
    pub pid: i32,
    /// `A`, `B` or `elsewhere`.
    pub host: &'static str,
    /// Its cgroup-v2 path.
    pub cgroup: String,
    /// Whether that cgroup reports itself frozen.
    pub frozen: bool,
}

/// Everything a cell observed.
#[derive(Debug, Default)]
pub struct Observed {
    pub fault: Option<FaultRecord>,
    /// When the hook's line appeared, after the start of the migration.
    pub reached_after: Option<Duration>,
    /// When the action was done, after the start of the migration.
    pub acted_after: Option<Duration>,
    /// What the action did (kills, cuts, continues).
    pub did: Vec<String>,
    /// The action could not be done (nothing to kill).
    pub not_applicable: Option<String>,
    pub killed_src: bool,
    pub killed_dst: bool,
    /// A harness problem while acting.
    pub control_error: Option<String>,
    /// Link cut: when it was restored, after the start of the migration, and whether after phaul gave up.
    pub link_restored_after: Option<Duration>,
    pub run: Option<MigrationRun>,
    pub session: Option<String>,
    pub src_journal: Option<Value>,
    pub dst_journal: Option<Value>,
    pub guard_pid: Option<i32>,
    pub guard_log: Option<String>,
    /// The guard was seen gone (`Some(false)`: still alive at the bound).
    pub guard_exited: Option<bool>,
    /// The session needed `phaul resolve`.
    pub in_doubt: bool,
    pub held_frozen: Option<Result<(), String>>,
    /// `phaul resolve`'s exit, output, and the resolving `phaul serve`'s.
    pub resolution: Option<String>,
    pub resolve_ok: Option<bool>,
    pub copies: Vec<WorkloadCopy>,
    pub heartbeat: Option<HeartbeatSummary>,
    pub heartbeat_error: Option<String>,
    /// The heartbeat log's lines around each change of host (when its check failed).
    pub heartbeat_excerpt: Option<String>,
    pub before: Option<Value>,
    pub after: Option<Value>,
    pub notes: Vec<String>,
}

impl Observed {
    /// Where the workload ended: the host of the one copy, `none` or `several`.
    pub fn ended_on(&self) -> &'static str {
        match self.copies.as_slice() {
            [] => "none",
            [c] => c.host,
            _ => "several",
        }
    }

    fn outcome(&self) -> Option<String> {
        self.run.as_ref()?.report.as_ref()?["outcome"].as_str().map(str::to_string)
    }
}

/// What a cell came to.
#[derive(Debug)]
pub struct CellOutcome {
    pub cell: Cell,
    pub verdict: Verdict,
    pub seconds: f64,
    pub observed: Observed,
    /// Error lines of CRIU's logs in the lab's image directories (filled for failed cells).
    pub criu_logs: String,
}

fn exit_text(st: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => {
            format!("signal {}", Signal::try_from(s).map(|s| s.as_str().to_string()).unwrap_or(s.to_string()))
        }
        _ => "?".into(),
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

impl CellOutcome {
    pub fn passed(&self) -> bool {
        !matches!(self.verdict, Verdict::Fail(_))
    }

    /// `pass`, `FAIL` or `n/a`.
    pub fn result(&self) -> &'static str {
        match self.verdict {
            Verdict::Pass => "pass",
            Verdict::Fail(_) => "FAIL",
            Verdict::NotApplicable(_) => "n/a",
        }
    }

    /// One line: what happened (outcome, exit statuses, where the workload ended).
    pub fn what_happened(&self) -> String {
        let o = &self.observed;
        let mut s = String::new();
        if let Some(r) = &o.run {
            let _ = write!(s, "src {}, dst {}", exit_text(&r.src_status), exit_text(&r.dst_status));
        }
        if let Some(out) = o.outcome() {
            let _ = write!(s, ", outcome {out}");
        }
        if o.in_doubt {
            let _ = write!(s, ", in doubt -> resolved {}", if o.resolve_ok == Some(true) { "ok" } else { "FAILED" });
        }
        if o.guard_log.as_deref().is_some_and(|l| l.contains("settling")) {
            s.push_str(", guard settled");
        }
        let _ = write!(s, ", on {}", o.ended_on());
        if let Some(h) = &o.heartbeat {
            let _ = write!(s, ", max gap {} ms", h.max_gap_ms);
        }
        s
    }

    /// The table row: cell, result, seconds, what happened.
    pub fn row(&self) -> String {
        let detail = match &self.verdict {
            Verdict::NotApplicable(why) => why.clone(),
            _ => self.what_happened(),
        };
        format!("{:<48} {:<5} {:>6.1}  {}", self.cell.name(), self.result(), self.seconds, detail)
    }

    /// Everything about the cell, for a failure message.
    pub fn describe(&self) -> String {
        let o = &self.observed;
        let mut s = format!("cell {}: {}\n", self.cell.name(), self.result());
        if let Verdict::Fail(f) = &self.verdict {
            for x in f {
                let _ = writeln!(s, "  FAILED {x}");
            }
        }
        if let Verdict::NotApplicable(w) = &self.verdict {
            let _ = writeln!(s, "  not applicable: {w}");
        }
        let _ = writeln!(s, "  what happened: {}", self.what_happened());
        let _ =
            writeln!(s, "  fault: {:?} reached after {:?}, acted after {:?}", o.fault, o.reached_after, o.acted_after);
        for d in &o.did {
            let _ = writeln!(s, "  did: {d}");
        }
        if let Some(e) = &o.control_error {
            let _ = writeln!(s, "  harness: {e}");
        }
        if let Some(t) = o.link_restored_after {
            let _ = writeln!(s, "  link restored after {t:?}");
        }
        let _ = writeln!(s, "  session: {:?}; copies: {:?}", o.session, o.copies);
        if let Some(r) = &o.run {
            let _ = writeln!(
                s,
                "  phaul migrate ended after {:?}{}, phaul serve after {:?}{}",
                r.src_elapsed,
                if r.src_timed_out { " (KILLED at the test's bound)" } else { "" },
                r.dst_elapsed,
                if r.dst_timed_out { " (KILLED at the test's bound)" } else { "" }
            );
            if let Some(rep) = &r.report {
                let _ = writeln!(
                    s,
                    "  report: outcome {} session {} error {} copies {}",
                    rep["outcome"], rep["session"], rep["error"], rep["copies"]
                );
            }
            let _ = writeln!(s, "  --- phaul migrate stderr (last 40 lines):\n{}", tail(&r.src_stderr, 40));
            let _ = writeln!(s, "  --- phaul serve stderr (last 40 lines):\n{}", tail(&r.dst_stderr, 40));
        }
        if let Some(j) = &o.src_journal {
            let _ = writeln!(s, "  source journal: {j}");
        }
        if let Some(j) = &o.dst_journal {
            let _ = writeln!(s, "  destination journal: {j}");
        }
        if let Some(g) = &o.guard_log {
            let _ =
                writeln!(s, "  --- guard log (pid {:?}, exited {:?}):\n{}", o.guard_pid, o.guard_exited, tail(g, 30));
        }
        if let Some(h) = &o.held_frozen {
            let _ = writeln!(s, "  held frozen before resolving: {h:?}");
        }
        if let Some(r) = &o.resolution {
            let _ = writeln!(s, "  --- resolution:\n{r}");
        }
        let _ = writeln!(s, "  heartbeat: {:?} {}", o.heartbeat, o.heartbeat_error.clone().unwrap_or_default());
        if let Some(x) = &o.heartbeat_excerpt {
            let _ =
                writeln!(s, "  heartbeat lines around each change of host (10.91.100.1 = A, 10.91.100.2 = B):\n{x}");
        }
        let _ = writeln!(
            s,
            "  probe before: {:?}\n  probe after: {:?}",
            o.before.as_ref().map(|v| v.to_string()),
            o.after.as_ref().map(|v| v.to_string())
        );
        for n in &o.notes {
            let _ = writeln!(s, "  note: {n}");
        }
        if !self.criu_logs.is_empty() {
            let _ = writeln!(s, "  --- CRIU logs:\n{}", self.criu_logs);
        }
        s
    }
}

/// The table of a matrix run: one row per cell and the totals.
pub fn summary_table(outcomes: &[CellOutcome]) -> String {
    let mut s = format!("{:<48} {:<5} {:>6}  {}\n", "CELL", "RESULT", "SECS", "WHAT HAPPENED");
    for o in outcomes {
        s.push_str(&o.row());
        s.push('\n');
    }
    let n = |r: &str| outcomes.iter().filter(|o| o.result() == r).count();
    let total: f64 = outcomes.iter().map(|o| o.seconds).sum();
    let _ = writeln!(
        s,
        "{} cells: {} pass, {} FAIL, {} n/a; {:.0} s in all",
        outcomes.len(),
        n("pass"),
        n("FAIL"),
        n("n/a"),
        total
    );
    s
}

/// The heartbeat's view of the two hosts: an address on each host's loopback, reached by the probe address
/// through `lo` whatever happens to the veth (with the veth down, a probe in the veth's subnet would have no
/// route and the heartbeat would write `none`).
const HB_NET_A: &str = "10.91.100.1/24";
const HB_NET_B: &str = "10.91.100.2/24";
const HB_LABEL_A: &str = "10.91.100.1";
const HB_LABEL_B: &str = "10.91.100.2";
const HB_PROBE: &str = "10.91.100.254:9";

/// How long the controller waits for the hook (and a side to stop).
const REACH_TIMEOUT: Duration = Duration::from_secs(90);
/// The bound on the whole migration in a cell.
const CELL_MIGRATION_TIMEOUT: Duration = Duration::from_secs(100);
/// How long the blip of [`Action::BlackholeBlip`] lasts.
const BLIP: Duration = Duration::from_secs(1);
/// How long phaul stays stopped at the point before the action: whatever runs beside it (its CRIU, a tree CRIU
/// has already let run) goes on meanwhile, as it would while a real host stalls, so that a fault lands after
/// what is under way has had the time to show (a resumed tree writes at least two heartbeats).
pub const DWELL: Duration = Duration::from_millis(50);

/// What the controller thread shares with the cell.
#[derive(Debug, Default)]
struct Control {
    fault: Option<FaultRecord>,
    reached_after: Option<Duration>,
    acted_after: Option<Duration>,
    did: Vec<String>,
    not_applicable: Option<String>,
    killed_src: bool,
    killed_dst: bool,
    error: Option<String>,
    cut: Option<LinkCut>,
}

fn lock(c: &Mutex<Control>) -> std::sync::MutexGuard<'_, Control> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

/// The command line of a process, split at NULs.
fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
        })
        .unwrap_or_default()
}

/// A CRIU process: started as `criu` (through its loader here), or renamed by CRIU itself (`criu: restore ...`).
fn is_criu(pid: i32) -> bool {
    cmdline(pid).iter().any(|a| a == "criu" || a.ends_with("/criu") || a.starts_with("criu:"))
}

/// Every live descendant of `root` (not `root` itself).
fn descendants(root: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for t in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(t.path().join("children")) else { continue };
            for c in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
                if !out.contains(&c) && pid_alive(c) {
                    out.push(c);
                    todo.push(c);
                }
            }
        }
    }
    out
}

fn sigkill(pid: i32) -> bool {
    pid > 1 && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
}

/// The controller: waits for the hook's line, does the action, continues the stopped side.
fn control(pids: RunningPids, cell: Cell, file: PathBuf, b: Host, shared: Arc<Mutex<Control>>, started: Instant) {
    let deadline = Instant::now() + REACH_TIMEOUT;
    let fault = loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            match FaultRecord::parse(&text) {
                Ok(f) => break f,
                Err(e) => {
                    lock(&shared).error = Some(e);
                    return;
                }
            }
        }
        if !pid_alive(pids.src as i32) && !pid_alive(pids.dst as i32) {
            return;
        }
        if Instant::now() >= deadline {
            lock(&shared).error =
                Some(format!("the hook's file {} did not appear within {REACH_TIMEOUT:?}", file.display()));
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    lock(&shared).reached_after = Some(started.elapsed());
    let stopped = fault.pid;
    // The line is written just before the SIGSTOP: wait until the process really is stopped.
    let stop_deadline = Instant::now() + Duration::from_secs(5);
    while !proc_stat(stopped).is_ok_and(|s| s.state == 'T' || s.state == 't') {
        if Instant::now() >= stop_deadline || !pid_alive(stopped) {
            lock(&shared).error = Some(format!("pid {stopped} did not stop at {}", fault.point));
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(DWELL);
    let side = cell.side();
    let pid_of = |s: Side| -> i32 {
        match (s, side) {
            (a, b) if a == b => stopped,
            (Side::Src, _) => pids.src as i32,
            (Side::Dst, _) => pids.dst as i32,
        }
    };
    let criu_of = |s: Side| -> Vec<i32> {
        if s == side {
            fault.criu_pids.clone()
        } else {
            descendants(pid_of(s)).into_iter().filter(|p| is_criu(*p)).collect()
        }
    };
    let mut did = Vec::new();
    for s in [Side::Src, Side::Dst] {
        let all = descendants(pid_of(s));
        let described: Vec<String> = all.iter().map(|p| format!("{p} {}", cmdline(*p).join(" "))).collect();
        did.push(format!("at the fault, under the {} phaul: {described:?}", s.name()));
    }
    let mut na = None;
    let mut cut = None;
    let mut killed = (false, false);
    let mut error = None;
    match cell.action {
        Action::None => {}
        Action::KillSrc | Action::KillDst => {
            let s = if cell.action == Action::KillSrc { Side::Src } else { Side::Dst };
            let pid = pid_of(s);
            if sigkill(pid) {
                did.push(format!("SIGKILL {} phaul (pid {pid})", s.name()));
                if s == Side::Src {
                    killed.0 = true;
                } else {
                    killed.1 = true;
                }
            } else {
                error = Some(format!("cannot SIGKILL the {} phaul (pid {pid})", s.name()));
            }
        }
        Action::KillSrcCriu | Action::KillDstCriu => {
            let s = if cell.action == Action::KillSrcCriu { Side::Src } else { Side::Dst };
            let criu = criu_of(s);
            if criu.is_empty() {
                na = Some(format!("no {} CRIU runs at {}", s.name(), cell.point));
            }
            for p in criu {
                let what = cmdline(p).join(" ");
                if sigkill(p) {
                    did.push(format!("SIGKILL {} CRIU pid {p} ({what})", s.name()));
                }
            }
        }
        Action::LinkDown | Action::Blackhole | Action::BlackholeBlip => {
            let kind = cell.action.cut().unwrap_or(CutKind::Blackhole);
            match b.cut_link(kind) {
                Ok(c) => {
                    did.push(format!("{} on host B's veth", kind.name()));
                    cut = Some(c);
                }
                Err(e) => error = Some(format!("cannot cut the link: {e}")),
            }
        }
    }
    let stopped_killed = (side == Side::Src && killed.0) || (side == Side::Dst && killed.1);
    if !stopped_killed {
        if let Err(e) = kill(Pid::from_raw(stopped), Signal::SIGCONT) {
            error.get_or_insert(format!("cannot SIGCONT pid {stopped}: {e}"));
        } else {
            did.push(format!("SIGCONT {} phaul (pid {stopped})", side.name()));
        }
    }
    {
        let mut c = lock(&shared);
        c.fault = Some(fault);
        c.acted_after = Some(started.elapsed());
        c.did = did;
        c.not_applicable = na;
        c.killed_src = killed.0;
        c.killed_dst = killed.1;
        c.error = error;
    }
    if cell.action == Action::BlackholeBlip {
        std::thread::sleep(BLIP);
        if let Some(mut c) = cut.take() {
            let r = c.restore();
            let mut sh = lock(&shared);
            match r {
                Ok(()) => sh.did.push(format!("blackhole removed after {BLIP:?}")),
                Err(e) => sh.error = Some(format!("cannot remove the blackhole: {e}")),
            }
        }
    }
    lock(&shared).cut = cut;
}

/// Kills by pid (same start time) what a cell leaves behind, removes the session's freezer cgroup.
#[derive(Default)]
struct Cleanup {
    pids: Vec<(i32, u64)>,
    cgroup: Option<PathBuf>,
}

impl Cleanup {
    fn own(&mut self, pid: i32) {
        if let Ok(st) = proc_stat(pid) {
            if !self.pids.iter().any(|(p, _)| *p == pid) {
                self.pids.push((pid, st.start_time));
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(cg) = &self.cgroup {
            if cg.is_dir() {
                let _ = std::fs::write(cg.join("cgroup.kill"), "1");
                let deadline = Instant::now() + Duration::from_secs(5);
                while std::fs::remove_dir(cg).is_err() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        for &(pid, start) in &self.pids {
            if pid_alive(pid) && proc_stat(pid).is_ok_and(|s| s.start_time == start) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        for &(pid, _) in &self.pids {
            let _ = reap_pid(pid, Duration::from_millis(200));
        }
    }
}

/// The cgroup-v2 mount (`/sys/fs/cgroup/unified` on this hybrid host).
fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2").then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

fn cgroup_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_string())))
        .unwrap_or_default()
}

fn cgroup_frozen(rel: &str) -> bool {
    let Some(m) = cgroup2_mount() else { return false };
    std::fs::read_to_string(m.join(rel.trim_start_matches('/')).join("cgroup.events"))
        .is_ok_and(|t| t.lines().any(|l| l == "frozen 1"))
}

/// The freezer cgroup phaul names after a session.
pub fn session_cgroup(session: &str) -> Option<PathBuf> {
    Some(cgroup2_mount()?.join(format!("phaul-{}", &session[..16.min(session.len())])))
}

/// Every live copy of the workload whose state directory is `state_dir`: a pid-namespace init whose command line
/// names that directory.
pub fn workload_copies(lab: &Lab, state_dir: &Path) -> Vec<WorkloadCopy> {
    let dir = state_dir.display().to_string();
    let a = lab.a().netns_inode().ok();
    let b = lab.b().netns_inode().ok();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if !cmdline(pid).iter().any(|a| a == &dir) {
            continue;
        }
        let Ok(ns) = ns_pids(pid) else { continue };
        if ns.len() < 2 || ns.last() != Some(&1) || !pid_alive(pid) {
            continue;
        }
        let net = crate::process::netns_of_pid(pid).ok();
        let host = if net.is_some() && net == a {
            "A"
        } else if net.is_some() && net == b {
            "B"
        } else {
            "elsewhere"
        };
        let cgroup = cgroup_of(pid);
        let frozen = cgroup_frozen(&cgroup);
        out.push(WorkloadCopy { pid, host, cgroup, frozen });
    }
    out.sort_by_key(|c| c.pid);
    out
}

/// The session of the cell: the report's, or the one source journal in the lab's source state directory.
fn find_session(lab: &Lab, run: Option<&MigrationRun>) -> Option<String> {
    if let Some(s) = run.and_then(|r| r.report.as_ref()).and_then(|r| r["session"].as_str()).filter(|s| !s.is_empty()) {
        return Some(s.to_string());
    }
    let rd = std::fs::read_dir(lab.path("src-state")).ok()?;
    rd.flatten().find_map(|e| e.file_name().to_str()?.strip_suffix(".source.json").map(str::to_string))
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn journal(lab: &Lab, session: &str, side: Side) -> Option<Value> {
    match side {
        Side::Src => read_json(&lab.path("src-state").join(format!("{session}.source.json"))),
        Side::Dst => read_json(&lab.path("dst-state").join(format!("{session}.destination.json"))),
    }
}

fn journal_state(j: &Option<Value>) -> Option<String> {
    j.as_ref()?["state"].as_str().map(str::to_string)
}

/// The lines of a heartbeat log around each change of its host field (two either side), numbered.
fn switches(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let host = |l: &str| l.split(' ').next().unwrap_or_default().to_string();
    let mut keep = std::collections::BTreeSet::new();
    for i in 1..lines.len() {
        if host(lines[i]) != host(lines[i - 1]) {
            keep.extend(i.saturating_sub(2)..(i + 3).min(lines.len()));
        }
    }
    let mut s = String::new();
    let mut last = None;
    for i in keep {
        if last.is_some_and(|l: usize| l + 1 != i) {
            s.push_str("    ...\n");
        }
        let _ = writeln!(s, "    line {}: {}", i + 1, lines[i]);
        last = Some(i);
    }
    s
}

/// The heartbeat log up to its last complete line.
fn read_heartbeat(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text[..text.rfind('\n').map_or(0, |i| i + 1)].to_string())
}

/// Waits up to `timeout` for `f` to hold (checked every 20 ms); whether it did.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One fault outside the matrix: arms phaul's hook at `point` on `side` of the migration `opts` describes and
/// SIGKILLs the process that stops there (the hook's record goes to `file`, which tells afterwards whether the
/// point was reached). Both sides' timeouts are tolerated.
pub fn kill_at(opts: &mut MigrateOptions, point: &str, side: Side, file: PathBuf) {
    let _ = std::fs::remove_file(&file);
    let env =
        vec![(FAULT_AT_ENV.to_string(), point.to_string()), (FAULT_FILE_ENV.to_string(), file.display().to_string())];
    match side {
        Side::Src => opts.src_env = env,
        Side::Dst => opts.dst_env = env,
    }
    opts.tolerate_timeouts = true;
    opts.while_running_both = Some(Box::new(move |pids: RunningPids| {
        let mut stopped = None;
        wait_until(Duration::from_secs(120), || {
            stopped = std::fs::read_to_string(&file).ok().and_then(|t| FaultRecord::parse(&t).ok()).map(|f| f.pid);
            stopped.is_some() || (!pid_alive(pids.src as i32) && !pid_alive(pids.dst as i32))
        });
        if let Some(p) = stopped {
            // Stopped by the hook (SIGSTOP); SIGKILL ends it all the same.
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }));
}

/// Runs one cell in `lab` (which must be fresh: one lab per cell) and checks it. Never panics on what phaul did;
/// a harness problem is a failure too.
pub fn run_cell(lab: &Lab, cell: &Cell) -> CellOutcome {
    run_cell_with(lab, cell, Bounds::default())
}

/// [`run_cell`] with other bounds.
pub fn run_cell_with(lab: &Lab, cell: &Cell, bounds: Bounds) -> CellOutcome {
    let t0 = Instant::now();
    let mut o = Observed::default();
    if let Err(why) = cell.mode.runs_here() {
        return CellOutcome {
            cell: cell.clone(),
            verdict: Verdict::NotApplicable(why),
            seconds: 0.0,
            observed: o,
            criu_logs: String::new(),
        };
    }
    let mut cleanup = Cleanup::default();
    let mut failures = Vec::new();
    let binary = || std::fs::metadata(&lab.phaul).and_then(|m| m.modified()).ok();
    let built = binary();
    let r = cell_body(lab, cell, bounds, &mut o, &mut cleanup, &mut failures);
    if let Err(e) = r {
        failures.push(format!("harness: {e}"));
    }
    if binary() != built {
        failures.push(format!(
            "harness: {} was rebuilt while the cell ran (a concurrent cargo build); its result means nothing, run it again",
            lab.phaul.display()
        ));
    }
    let verdict = if !failures.is_empty() {
        Verdict::Fail(failures)
    } else if o.fault.is_none() && o.control_error.is_none() {
        Verdict::NotApplicable(format!("{} was not reached", cell.point))
    } else if let Some(na) = &o.not_applicable {
        Verdict::NotApplicable(na.clone())
    } else {
        Verdict::Pass
    };
    let criu_logs = if matches!(verdict, Verdict::Fail(_)) { criu_log_excerpts(lab) } else { String::new() };
    // The workload's copies are gone by now (the cell's Workload killed them); whatever is still left in either
    // host or works in the lab's images (a CRIU phaul lost track of) is killed too.
    sweep(lab, &mut cleanup);
    drop(cleanup);
    CellOutcome { cell: cell.clone(), verdict, seconds: t0.elapsed().as_secs_f64(), observed: o, criu_logs }
}

/// A check's result into the failure list, named.
fn note(failures: &mut Vec<String>, name: &str, r: Result<(), String>) {
    if let Err(e) = r {
        failures.push(format!("{name}: {e}"));
    }
}

fn cell_body(
    lab: &Lab,
    cell: &Cell,
    bounds: Bounds,
    o: &mut Observed,
    cleanup: &mut Cleanup,
    failures: &mut Vec<String>,
) -> Result<(), String> {
    let fresh = std::fs::read_dir(lab.path("src-state")).map(|mut d| d.next().is_none()).unwrap_or(false);
    if !fresh {
        return Err("run_cell needs a fresh Lab (its source state directory is not empty)".into());
    }
    lab.a().add_loopback_address(HB_NET_A).map_err(|e| e.to_string())?;
    lab.b().add_loopback_address(HB_NET_B).map_err(|e| e.to_string())?;
    let hb = lab.path("heartbeat.log");
    let hb_s = hb.display().to_string();
    let mut w = lab
        .start_workload("memory", &["--size-mib", "32", "--heartbeat", &hb_s, "--heartbeat-probe", HB_PROBE])
        .map_err(|e| format!("the workload did not start: {e}"))?;
    let before = w.probe(PROBE_TIMEOUT).map_err(|e| format!("the first probe failed: {e}"))?;
    state_ok(&before).map_err(|e| e.to_string())?;
    o.before = Some(before.clone());

    let file = lab.path("fault.json");
    let _ = std::fs::remove_file(&file);
    let env =
        vec![(FAULT_AT_ENV.to_string(), cell.point.clone()), (FAULT_FILE_ENV.to_string(), file.display().to_string())];
    let shared = Arc::new(Mutex::new(Control::default()));
    let started = Instant::now();
    let (sh, c2, b) = (shared.clone(), cell.clone(), lab.b().clone());
    let mut src_args = bounds.src_args();
    src_args.extend(cell.mode.src_args());
    let opts = MigrateOptions {
        src_args,
        dst_args: bounds.dst_args(),
        src_env: if cell.side() == Side::Src { env.clone() } else { Vec::new() },
        dst_env: if cell.side() == Side::Dst { env } else { Vec::new() },
        while_running_both: Some(Box::new(move |pids| control(pids, c2, file, b, sh, started))),
        timeout: Some(CELL_MIGRATION_TIMEOUT),
        dst_timeout: Some(Duration::from_secs(60)),
        tolerate_timeouts: true,
        ..Default::default()
    };
    let run = lab.migrate(w.pid(), opts);
    // Both phaul processes have exited (or were killed at the bound): a long cut is restored now, after phaul
    // gave up (it cannot reconnect handed-in descriptors, so it can only roll back or end in doubt).
    let mut cut = {
        let mut c = lock(&shared);
        o.fault = c.fault.take();
        o.reached_after = c.reached_after;
        o.acted_after = c.acted_after;
        o.did = std::mem::take(&mut c.did);
        o.not_applicable = c.not_applicable.take();
        o.killed_src = c.killed_src;
        o.killed_dst = c.killed_dst;
        o.control_error = c.error.take();
        c.cut.take()
    };
    if let Some(c) = cut.as_mut() {
        c.restore().map_err(|e| format!("cannot restore the link: {e}"))?;
        o.link_restored_after = c.restored_at().map(|t| t.saturating_duration_since(started));
    }
    let run = run.map_err(|e| format!("the migration did not run: {e}"))?;
    if let Some(e) = &o.control_error {
        failures.push(format!("harness: {e}"));
    }
    if let Some(p) = run.restored_pid {
        cleanup.own(p);
    }
    o.session = find_session(lab, Some(&run));
    o.run = Some(run);
    if let Some(s) = &o.session {
        cleanup.cgroup = session_cgroup(s);
    }

    // The guard: started inside the freeze, it outlives phaul migrate; when phaul migrate was killed it settles
    // the session (or leaves it in doubt). Either way it must exit.
    if let Some(session) = o.session.clone() {
        o.src_journal = journal(lab, &session, Side::Src);
        o.guard_pid = o.src_journal.as_ref().and_then(|j| j["guard_pid"].as_i64()).map(|p| p as i32);
        if let Some(g) = o.guard_pid {
            let bound = bounds.resolve_timeout + Duration::from_secs(20);
            let gone = wait_until(bound, || !pid_alive(g));
            o.guard_exited = Some(gone);
            if gone {
                let _ = reap_pid(g, Duration::from_millis(200));
            } else {
                cleanup.own(g);
            }
            o.guard_log =
                std::fs::read_to_string(lab.path("src-state").join(format!("{session}.source.guard.log"))).ok();
        }
        o.src_journal = journal(lab, &session, Side::Src);
        o.dst_journal = journal(lab, &session, Side::Dst);
    }

    // In doubt: phaul said so (exit 3), or the guard of a killed source left it so.
    let src_code = o.run.as_ref().and_then(|r| r.src_status.code());
    let src_state = journal_state(&o.src_journal);
    o.in_doubt = src_code == Some(3) || matches!(src_state.as_deref(), Some("in-doubt" | "committing" | "committed"));
    if o.in_doubt {
        let held = check_held_frozen(lab, w.state_dir(), w.pid(), o.session.as_deref().unwrap_or_default(), &hb);
        o.held_frozen = Some(held.clone());
        note(failures, "check_held_frozen", held);
        if let Some(session) = o.session.clone() {
            match resolve(lab, &session, cleanup) {
                Ok((ok, text)) => {
                    o.resolve_ok = Some(ok);
                    o.resolution = Some(text);
                    if !ok {
                        failures
                            .push("resolution: `phaul resolve` did not settle the session (see the resolution)".into());
                    }
                }
                Err(e) => failures.push(format!("resolution: {e}")),
            }
            o.src_journal = journal(lab, &session, Side::Src);
            o.dst_journal = journal(lab, &session, Side::Dst);
        } else {
            failures.push("resolution: in doubt, but no session is known".into());
        }
    }

    // Exactly one copy, once everything has settled (a discarded copy may take a moment to die).
    wait_until(Duration::from_secs(15), || workload_copies(lab, w.state_dir()).len() == 1);
    o.copies = workload_copies(lab, w.state_dir());
    for c in &o.copies {
        if c.pid != w.pid() {
            let _ = w.adopt_pid(c.pid);
            cleanup.own(c.pid);
        }
    }
    note(failures, "check_one_copy", check_one_copy(o));
    note(failures, "check_untouched_migrates", check_untouched_migrates(cell, o));
    note(failures, "check_exit_status", check_exit_status(o));
    note(failures, "check_journals", check_journals(o));
    note(failures, "check_guard", check_guard(o));
    if let [c] = o.copies.as_slice() {
        let c = c.clone();
        match check_probe(&w, c.pid, &before) {
            Ok(after) => o.after = Some(after),
            Err(e) => failures.push(format!("check_probe: {e}")),
        }
        // A few beats of the survivor, then the log.
        std::thread::sleep(Duration::from_millis(300));
    }
    match read_heartbeat(&hb).and_then(|t| check_log(&t)) {
        Ok(s) => {
            o.heartbeat = Some(s);
            note(failures, "check_heartbeat", check_heartbeat(o));
            if !o.in_doubt {
                note(failures, "check_freeze_bound", check_freeze_bound(o, &bounds));
            }
        }
        Err(e) => {
            o.heartbeat_error = Some(e.clone());
            o.heartbeat_excerpt = read_heartbeat(&hb).ok().map(|t| switches(&t));
            failures.push(format!("check_heartbeat: {e}"));
        }
    }
    note(failures, "check_end_bound", check_end_bound(o, &bounds));
    if o.ended_on() == "A" {
        note(failures, "check_destination_clean", check_destination_clean(lab));
    } else if o.ended_on() == "B" {
        note(failures, "check_destination_clean", check_only_copy_in_b(lab, o));
    }
    note(failures, "check_source_clean", check_source_clean(lab, o.session.as_deref()));
    drop(cut);
    drop(w);
    Ok(())
}

/// `phaul resolve SESSION --fdrpc 3` in A on a new connection to a new `phaul serve --fdrpc 3 --fdmem 4` in B.
/// Returns whether both ended well, and what they said.
fn resolve(lab: &Lab, session: &str, cleanup: &mut Cleanup) -> Result<(bool, String), String> {
    let (rpc_a, rpc_b) = connect_retrying(lab)?;
    let (mem_a, mem_b) = connect_retrying(lab)?;
    let plugins = lab.plugins.display().to_string();
    let dst_state = lab.path("dst-state").display().to_string();
    let dst_images = lab.path("dst-images").display().to_string();
    let args = [
        "--plugins",
        plugins.as_str(),
        "--state-dir",
        dst_state.as_str(),
        "--timeout",
        "30",
        "serve",
        "--fdrpc",
        "3",
        "--fdmem",
        "4",
        "--img-path",
        dst_images.as_str(),
    ];
    let mut cmd = lab.b().command(&lab.phaul, args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let serve = spawn_with_fds(cmd, &[(rpc_b.as_fd(), 3), (mem_b.as_fd(), 4)])
        .map_err(|e| format!("starting phaul serve: {e}"))?;
    cleanup.own(serve.id() as i32);
    drop((rpc_b, mem_b, mem_a));
    let out = lab.phaul(&["--plugins", &plugins, "resolve", session, "--fdrpc", "3", "--wait", "10"], &[(rpc_a, 3)]);
    let served = collect(serve, Duration::from_secs(40), "the resolving phaul serve");
    let mut text = String::new();
    let mut ok = true;
    match &out {
        Ok(c) => {
            ok &= c.status.success();
            let _ = writeln!(text, "phaul resolve: {}\n{}{}", exit_text(&c.status), c.stdout, c.stderr);
        }
        Err(e) => {
            ok = false;
            let _ = writeln!(text, "phaul resolve did not finish: {e}");
        }
    }
    match &served {
        Ok(c) => {
            ok &= c.status.success();
            let _ = writeln!(text, "resolving phaul serve: {}\n{}", exit_text(&c.status), c.stderr);
        }
        Err(e) => {
            ok = false;
            let _ = writeln!(text, "the resolving phaul serve did not finish: {e}");
        }
    }
    Ok((ok, text))
}

/// A new connection between the hosts, retried for a while: just after a link comes back, host A may still hold
/// a failed neighbour entry for B ("No route to host") until it asks again.
fn connect_retrying(lab: &Lab) -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match lab.pair.connect_tcp() {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => return Err(format!("no new connection to B within 15 s: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Exactly one copy exists.
pub fn check_one_copy(o: &Observed) -> Result<(), String> {
    match o.copies.as_slice() {
        [c] if c.host == "A" || c.host == "B" => Ok(()),
        [c] => Err(format!("the one copy (pid {}) is in neither host", c.pid)),
        [] => Err("no copy of the workload exists any more".into()),
        many => Err(format!("{} copies exist: {many:?}", many.len())),
    }
}

/// When nothing was done to the migration (action `none`, the point never reached, or nothing to kill), it must
/// have succeeded like any other.
pub fn check_untouched_migrates(cell: &Cell, o: &Observed) -> Result<(), String> {
    let untouched = cell.action == Action::None || o.fault.is_none() || o.not_applicable.is_some();
    if !untouched {
        return Ok(());
    }
    let why = if o.fault.is_none() {
        format!("{} was never reached", cell.point)
    } else if cell.action == Action::None {
        "nothing was done to it".to_string()
    } else {
        "the action had nothing to act on".to_string()
    };
    let code = o.run.as_ref().and_then(|r| r.src_status.code());
    if code != Some(0) || o.ended_on() != "B" {
        return Err(format!(
            "{why}, so the migration had to succeed, but phaul migrate ended with {} and the workload is on {}",
            o.run.as_ref().map(|r| exit_text(&r.src_status)).unwrap_or_else(|| "nothing".into()),
            o.ended_on()
        ));
    }
    Ok(())
}

/// The exit statuses, the report and the messages say what happened, and agree with where the workload is.
pub fn check_exit_status(o: &Observed) -> Result<(), String> {
    let run = o.run.as_ref().ok_or("no migration ran")?;
    let mut bad = Vec::new();
    let on = o.ended_on();
    let session = o.session.clone().unwrap_or_default();
    if run.src_timed_out {
        bad.push("phaul migrate did not exit by itself within the test's bound".to_string());
    }
    if run.dst_timed_out {
        bad.push("phaul serve did not exit by itself within the test's bound (60 s after phaul migrate)".to_string());
    }
    let src = run.src_status.code();
    match (src, o.killed_src) {
        (None, true) => {}
        (None, false) => bad.push(format!("phaul migrate died by {} without being killed", exit_text(&run.src_status))),
        (Some(c), _) => {
            let rep = run.report.as_ref();
            let outcome = rep.and_then(|r| r["outcome"].as_str()).unwrap_or("(no JSON report)");
            let want = match c {
                0 => "migrated",
                1 => "failed",
                3 => "in-doubt",
                4 => "lost",
                _ => "(an exit status phaul does not use)",
            };
            if outcome != want {
                bad.push(format!("phaul migrate exited {c} but its report's outcome is {outcome:?} (want {want:?})"));
            }
            if let Some(r) = rep {
                if r["session"].as_str() != Some(session.as_str()) || session.is_empty() {
                    bad.push(format!("the report's session {} is not the journal's {session:?}", r["session"]));
                }
                if !matches!(r["copies"].as_str(), Some(c) if !c.is_empty()) {
                    bad.push("the report does not say where the copies are".into());
                }
            }
            let copies = rep.and_then(|r| r["copies"].as_str()).unwrap_or_default();
            match c {
                0 => {
                    if !o.in_doubt && on != "B" {
                        bad.push(format!("phaul migrate says migrated, but the workload is on {on}"));
                    }
                    if !copies.contains("runs on the destination") {
                        bad.push(format!("migrated, but the report's copies say {copies:?}"));
                    }
                }
                1 => {
                    if on != "A" {
                        bad.push(format!(
                            "phaul migrate says failed (workload on the source), but the workload is on {on}"
                        ));
                    }
                    if !run.src_stderr.contains("keeps running on this host") {
                        bad.push("exit 1 without \"The workload keeps running on this host\" in the message".into());
                    }
                }
                3 => {
                    let want = format!("phaul resolve {session}");
                    if !run.src_stderr.contains(&want) {
                        bad.push(format!("in doubt, but the message does not name `{want}`"));
                    }
                }
                4 => bad.push("phaul says the workload is lost, which stop-and-copy must never do".into()),
                c => bad.push(format!("phaul migrate exited {c}")),
            }
        }
    }
    let dst = run.dst_status.code();
    match (dst, o.killed_dst) {
        (None, true) => {}
        (None, false) if run.dst_timed_out => {}
        (None, false) => bad.push(format!("phaul serve died by {} without being killed", exit_text(&run.dst_status))),
        (Some(0), _) => {
            if !run.dst_stderr.contains("migrated") {
                bad.push("phaul serve exited 0 without saying the session migrated".into());
            }
            if on != "B" {
                bad.push(format!("phaul serve says migrated (exit 0), but the workload is on {on}"));
            }
        }
        (Some(1), _) => {
            if on == "B" {
                bad.push("phaul serve says the session rolled back (exit 1), but the workload runs on B".into());
            }
        }
        (Some(c), _) => bad.push(format!("phaul serve exited {c}")),
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}

/// The journals agree with where the workload is: the destination's says committed exactly when the workload
/// runs on B; the source's is settled (migrated or rolled back) unless nothing was ever frozen.
pub fn check_journals(o: &Observed) -> Result<(), String> {
    let on = o.ended_on();
    let src = journal_state(&o.src_journal);
    let dst = journal_state(&o.dst_journal);
    let mut bad = Vec::new();
    let dst_committed = dst.as_deref() == Some("committed");
    if dst_committed != (on == "B") {
        bad.push(format!("the destination's journal says {dst:?}, but the workload is on {on}"));
    }
    match (src.as_deref(), on) {
        (Some("migrated"), "B") | (Some("rolled-back"), "A") => {}
        // Killed before anything was frozen: nothing to settle.
        (Some("running"), "A") if o.killed_src => {}
        (s, on) => bad.push(format!("the source's journal says {s:?}, but the workload is on {on}")),
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}

/// The guard exited; when `phaul migrate` was killed after starting it, it settled the session or left it in
/// doubt (saying so in its log).
pub fn check_guard(o: &Observed) -> Result<(), String> {
    let Some(pid) = o.guard_pid else { return Ok(()) };
    if o.guard_exited != Some(true) {
        return Err(format!("the guard (pid {pid}) is still alive"));
    }
    if o.killed_src {
        let log = o.guard_log.clone().unwrap_or_default();
        if !log.contains("settling") {
            return Err(format!(
                "phaul migrate was killed, but the guard's log does not say it settled the session: {}",
                tail(&log, 5)
            ));
        }
    }
    Ok(())
}

/// The surviving copy answers a probe: self-check ok, the memory's checksum as before, the counter not back.
pub fn check_probe(w: &Workload, pid: i32, before: &Value) -> Result<Value, String> {
    let after = w.probe_pid(pid, PROBE_TIMEOUT).map_err(|e| format!("the survivor (pid {pid}) did not answer: {e}"))?;
    state_ok(&after).map_err(|e| e.to_string())?;
    if after["actual_checksum"] != before["expected_checksum"] {
        return Err(format!(
            "the memory checksum is {} but was {} before the migration",
            after["actual_checksum"], before["expected_checksum"]
        ));
    }
    let (b, a) = (before["counter"].as_u64().unwrap_or(0), after["counter"].as_u64().unwrap_or(0));
    if a < b {
        return Err(format!("the counter went back from {b} to {a}"));
    }
    Ok(after)
}

/// At most one copy ran at any time (the log checked by [`check_log`]), and the last beats come from the host the
/// survivor runs on.
pub fn check_heartbeat(o: &Observed) -> Result<(), String> {
    let h = o.heartbeat.as_ref().ok_or("no heartbeat summary")?;
    let label = match o.ended_on() {
        "A" => HB_LABEL_A,
        "B" => HB_LABEL_B,
        other => return Err(format!("the workload is on {other}")),
    };
    if h.addrs.first().map(String::as_str) != Some(HB_LABEL_A) {
        return Err(format!("the heartbeat did not start on A: {:?}", h.addrs));
    }
    if h.addrs.last().map(String::as_str) != Some(label) {
        return Err(format!(
            "the survivor runs on {}, but the heartbeat's last host is {:?}",
            o.ended_on(),
            h.addrs.last()
        ));
    }
    Ok(())
}

/// The freeze (the longest heartbeat gap) stayed under `--max-frozen` plus the margin.
pub fn check_freeze_bound(o: &Observed, b: &Bounds) -> Result<(), String> {
    let h = o.heartbeat.as_ref().ok_or("no heartbeat summary")?;
    let bound = (b.max_frozen + b.margin).as_millis() as u64;
    if h.max_gap_ms > bound {
        return Err(format!(
            "the workload stood still for {} ms, more than --max-frozen plus margin ({bound} ms)",
            h.max_gap_ms
        ));
    }
    Ok(())
}

/// phaul migrate ended within the freeze's rest, the resolve timeout and the margin after the fault.
pub fn check_end_bound(o: &Observed, b: &Bounds) -> Result<(), String> {
    let (Some(run), Some(acted)) = (o.run.as_ref(), o.acted_after) else { return Ok(()) };
    if o.killed_src {
        return Ok(());
    }
    let took = run.src_elapsed.saturating_sub(acted);
    if took > b.end_bound() {
        return Err(format!("phaul migrate ended {took:?} after the fault, later than the bound {:?}", b.end_bound()));
    }
    Ok(())
}

/// A session in doubt keeps the source's copy frozen on A (before anyone resolves it): it exists, sits in
/// phaul's freezer cgroup, which reports itself frozen, and writes no heartbeat.
pub fn check_held_frozen(lab: &Lab, state_dir: &Path, root: i32, session: &str, hb: &Path) -> Result<(), String> {
    if !pid_alive(root) {
        return Err(format!("the source's copy (pid {root}) is gone while the session is in doubt"));
    }
    let cg = cgroup_of(root);
    let want = format!("/phaul-{}", &session[..16.min(session.len())]);
    if cg != want {
        return Err(format!("the source's copy is in cgroup {cg:?}, not phaul's freezer {want:?}"));
    }
    if !cgroup_frozen(&cg) {
        return Err(format!("the freezer {cg} does not report itself frozen"));
    }
    let b_runs = workload_copies(lab, state_dir).iter().any(|c| c.host == "B" && !c.frozen);
    let n0 = read_heartbeat(hb).map(|t| t.lines().filter(|l| l.starts_with(HB_LABEL_A)).count()).unwrap_or(0);
    std::thread::sleep(Duration::from_millis(300));
    let n1 = read_heartbeat(hb).map(|t| t.lines().filter(|l| l.starts_with(HB_LABEL_A)).count()).unwrap_or(0);
    if n1 != n0 {
        return Err(format!(
            "the source's copy wrote heartbeats while held ({} new lines; B runs a copy: {b_runs})",
            n1 - n0
        ));
    }
    Ok(())
}

/// Nothing of the workload or of phaul is left on B (after a bounded wait): no process in its network namespace,
/// no CRIU working in the lab's destination images.
pub fn check_destination_clean(lab: &Lab) -> Result<(), String> {
    let b = lab.b().netns_inode().map_err(|e| e.to_string())?;
    let mut left = Vec::new();
    let clean = wait_until(Duration::from_secs(15), || {
        left = pids_in_netns(b).unwrap_or_default();
        left.is_empty()
    });
    let mut bad = Vec::new();
    if !clean {
        let what: Vec<String> = left.iter().map(|p| format!("{p} ({})", cmdline(*p).join(" "))).collect();
        bad.push(format!("processes left in host B: {}", what.join(", ")));
    }
    let criu = criu_in_images(&lab.path("dst-images"));
    if !criu.is_empty() {
        bad.push(format!("CRIU processes left working in the destination's images: {criu:?}"));
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}

/// The workload on B: the only process left in B is the copy (and its own tree), no CRIU in the images.
fn check_only_copy_in_b(lab: &Lab, o: &Observed) -> Result<(), String> {
    let b = lab.b().netns_inode().map_err(|e| e.to_string())?;
    let copy = o.copies.first().map(|c| c.pid).unwrap_or(0);
    let mut allowed = descendants(copy);
    allowed.push(copy);
    let mut left = Vec::new();
    let clean = wait_until(Duration::from_secs(15), || {
        left = pids_in_netns(b).unwrap_or_default().into_iter().filter(|p| !allowed.contains(p)).collect();
        left.is_empty()
    });
    let mut bad = Vec::new();
    if !clean {
        let what: Vec<String> = left.iter().map(|p| format!("{p} ({})", cmdline(*p).join(" "))).collect();
        bad.push(format!("processes left in host B besides the workload: {}", what.join(", ")));
    }
    let criu = criu_in_images(&lab.path("dst-images"));
    if !criu.is_empty() {
        bad.push(format!("CRIU processes left working in the destination's images: {criu:?}"));
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}

/// Owns (to kill) every process left in either host's network namespace and every CRIU working in the lab's
/// scratch directory.
fn sweep(lab: &Lab, cleanup: &mut Cleanup) {
    let scratch = lab.scratch.path().display().to_string();
    let mut left = Vec::new();
    for h in [lab.a(), lab.b()] {
        if let Ok(ino) = h.netns_inode() {
            left.extend(pids_in_netns(ino).unwrap_or_default());
        }
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let cwd =
                std::fs::read_link(format!("/proc/{pid}/cwd")).map(|p| p.display().to_string()).unwrap_or_default();
            if is_criu(pid) && cwd.starts_with(&scratch) {
                left.push(pid);
            }
        }
    }
    for pid in left {
        if pid != std::process::id() as i32 {
            log::warn!("killing pid {pid} ({}), left behind by a fault cell", cmdline(pid).join(" "));
            cleanup.own(pid);
        }
    }
}

/// CRIU processes whose working directory or command line is inside `dir`.
fn criu_in_images(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if !pid_alive(pid) || !is_criu(pid) {
            continue;
        }
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).map(|p| p.display().to_string()).unwrap_or_default();
        let cmd = cmdline(pid).join(" ");
        if cwd.starts_with(&d) || cmd.contains(&d) {
            out.push(format!("{pid} ({cmd}; cwd {cwd})"));
        }
    }
    out
}

/// No freezer cgroup of the session and no `phaul-*` nftables table is left in A.
pub fn check_source_clean(lab: &Lab, session: Option<&str>) -> Result<(), String> {
    let mut bad = Vec::new();
    if let Some(cg) = session.and_then(session_cgroup) {
        if !wait_until(Duration::from_secs(10), || !cg.exists()) {
            let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
            bad.push(format!("the freezer cgroup {} is left (processes: {:?})", cg.display(), procs.trim()));
        }
    }
    match lab.a().nft_tables() {
        Ok(t) => {
            let phaul: Vec<&String> =
                t.iter().filter(|t| t.split_whitespace().last().is_some_and(|n| n.starts_with("phaul"))).collect();
            if !phaul.is_empty() {
                bad.push(format!("nftables tables left in host A: {phaul:?}"));
            }
        }
        Err(e) => bad.push(format!("cannot list host A's nftables tables: {e}")),
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}

/// CRIU's error lines (and each log's last lines) from the lab's image directories.
fn criu_log_excerpts(lab: &Lab) -> String {
    let mut files = Vec::new();
    for d in ["src-images", "dst-images"] {
        collect_logs(&lab.path(d), &mut files);
    }
    let mut s = String::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        let errors: Vec<&str> =
            text.lines().filter(|l| l.contains("Error") || l.contains("BUG") || l.contains("Warn")).take(12).collect();
        let _ = writeln!(s, "  {} ({} lines):", f.display(), text.lines().count());
        for l in errors {
            let _ = writeln!(s, "    ! {l}");
        }
        for l in tail(&text, 3).lines() {
            let _ = writeln!(s, "    {l}");
        }
    }
    s
}

fn collect_logs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_logs(&p, out);
        } else if p.extension().is_some_and(|e| e == "log") {
            out.push(p);
        }
    }
}

/// Runs `cells` one after the other, each in a fresh [`Lab`], printing each cell's row as it ends (and the full
/// account of a failed one, or of every one with `$PHAUL_FAULT_VERBOSE` set) on standard error.
pub fn run_cells(cells: &[Cell], tag: &str) -> Vec<CellOutcome> {
    let mut out = Vec::new();
    for (i, cell) in cells.iter().enumerate() {
        let outcome = match Lab::new(tag) {
            Ok(lab) => run_cell(&lab, cell),
            Err(e) => CellOutcome {
                cell: cell.clone(),
                verdict: Verdict::Fail(vec![format!("harness: cannot set up the lab: {e}")]),
                seconds: 0.0,
                observed: Observed::default(),
                criu_logs: String::new(),
            },
        };
        eprintln!("[{}/{}] {}", i + 1, cells.len(), outcome.row());
        if !outcome.passed() || std::env::var_os("PHAUL_FAULT_VERBOSE").is_some() {
            eprintln!("{}", outcome.describe());
        }
        out.push(outcome);
    }
    out
}

/// Cells by point: every point of `points` crossed with every action of `actions`, in `mode`.
pub fn cross(points: &[&str], actions: &[Action], mode: Mode) -> Vec<Cell> {
    let mut v = Vec::new();
    for p in points {
        for a in actions {
            v.push(Cell { point: p.to_string(), action: *a, mode });
        }
    }
    v
}

/// The points of `outcomes` that no cell reached.
pub fn unreached_points(outcomes: &[CellOutcome]) -> Vec<String> {
    let mut m: BTreeMap<String, bool> = BTreeMap::new();
    for o in outcomes {
        *m.entry(o.cell.point.clone()).or_insert(false) |= o.observed.fault.is_some();
    }
    m.into_iter().filter(|(_, r)| !r).map(|(p, _)| p).collect()
}
