//! phaul, stop-and-copy (`--pre-dump off`), `phaul serve` in host B and `phaul migrate pid` in host A. The main
//! benchmark runs it through the testbed (`Lab::migrate`: three TCP connections across the veth, connected by the
//! harness and handed in as descriptors); the comparisons also run phaul over its own TLS connections and an
//! older build of phaul ([`crate::launch`]). The figures are read the same way whichever way it ran.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phaul_core::images::{read_dump_stats, DumpStats};
use phaul_testbed::{MigrateOptions, MIGRATION_TIMEOUT};
use serde_json::Value;

use crate::bare::POLL;
use crate::launch::{self, LaunchRun, PhaulBuild, Transport};
use crate::sample::{metric, mib, ms, Sample};
use crate::{finish_workload, Context, Ctx, Result};

/// How phaul is started.
#[derive(Debug, Clone, Copy)]
pub enum How<'a> {
    /// The testbed's `Lab::migrate`: the workspace's phaul over handed-in plaintext TCP connections.
    Lab,
    /// The benchmark's own launcher: a given build of phaul over the given transport.
    Own { build: &'a PhaulBuild, transport: Transport<'a> },
}

/// phaul removes its image directories once the migration is confirmed, and its report does not carry CRIU's
/// `memwrite_time`. This watcher opens the source's `stats-dump` as soon as CRIU creates it and keeps it open, so
/// that it can still be read after phaul removed the directory.
struct StatsWatcher {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Option<Vec<u8>>>,
}

impl StatsWatcher {
    fn start(images: PathBuf, pid: i32) -> StatsWatcher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let prefix = format!("pid-{pid}-");
            let deadline = Instant::now() + MIGRATION_TIMEOUT + Duration::from_secs(60);
            let mut file: Option<File> = None;
            while !flag.load(Ordering::SeqCst) && Instant::now() < deadline {
                if file.is_none() {
                    file = find_stats(&images, &prefix).and_then(|p| File::open(p).ok());
                }
                std::thread::sleep(POLL);
            }
            let mut f = file?;
            let mut bytes = Vec::new();
            f.seek(SeekFrom::Start(0)).ok()?;
            f.read_to_end(&mut bytes).ok()?;
            Some(bytes)
        });
        StatsWatcher { stop, handle }
    }

    fn finish(self) -> Option<Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().ok().flatten()
    }
}

/// `IMAGES/pid-PID-SESSION-source/ROUND/stats-dump`, if it exists.
fn find_stats(images: &Path, prefix: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(images).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(prefix) && name.ends_with("-source")) {
            continue;
        }
        for r in std::fs::read_dir(e.path()).ok()?.flatten() {
            let round = r.file_name().to_string_lossy().into_owned();
            let p = r.path().join("stats-dump");
            if round.parse::<u32>().is_ok() && p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Decodes stats-dump bytes with phaul-core's reader (which reads a directory).
fn decode_stats(bytes: &[u8]) -> Result<DumpStats> {
    let dir = tempfile::tempdir().ctx(|| "creating a temporary directory".into())?;
    std::fs::write(dir.path().join("stats-dump"), bytes).ctx(|| "writing a copy of stats-dump".into())?;
    read_dump_stats(dir.path()).ctx(|| "decoding the source's stats-dump".into())
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

/// For investigations: `PHAUL_BENCH_SRC_WRAP` / `PHAUL_BENCH_DST_WRAP` hold a command line (split on spaces, `{n}`
/// replaced by a run number) that phaul runs under, e.g. `perf record -g -o /tmp/src-{n}.data`. The usage figures
/// are then the wrapper's, and the run is noted as not clean.
fn wrapper(var: &str, s: &mut Sample) -> Option<(PathBuf, Vec<String>)> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let line = std::env::var(var).ok().filter(|l| !l.trim().is_empty())?;
    let n = N.fetch_add(1, Ordering::SeqCst).to_string();
    let mut words = line.split_whitespace().map(|w| w.replace("{n}", &n));
    let prog = PathBuf::from(words.next()?);
    s.notes.push(format!("{var}: phaul ran under `{line}` (not a clean measurement)"));
    Some((prog, words.collect()))
}

/// Measures one phaul migration of a fresh `size_mib` workload into `s`, through `Lab::migrate`.
pub fn measure(ctx: &Ctx<'_>, size_mib: u64, s: &mut Sample) -> Result<()> {
    measure_with(ctx, size_mib, s, How::Lab)
}

/// Measures one phaul migration of a fresh `size_mib` workload into `s`, started as `how` says.
pub fn measure_with(ctx: &Ctx<'_>, size_mib: u64, s: &mut Sample, how: How<'_>) -> Result<()> {
    let (mut w, before) = ctx.start_workload(size_mib)?;
    let pid = w.pid();
    let watcher = StatsWatcher::start(ctx.lab.path("src-images"), pid);
    let mut src_args: Vec<String> = vec!["--pre-dump".into(), "off".into()];
    // For looking at CRIU's logs afterwards; it changes what is measured (no removal of the images), so it is
    // meant for investigations, not for results.
    if std::env::var_os("PHAUL_BENCH_KEEP_IMAGES").is_some() {
        src_args.push("--keep-images".into());
        s.notes.push("PHAUL_BENCH_KEEP_IMAGES: phaul kept its images (not a clean measurement)".into());
    }
    let (src_wrapper, dst_wrapper) = (wrapper("PHAUL_BENCH_SRC_WRAP", s), wrapper("PHAUL_BENCH_DST_WRAP", s));
    let t0 = Instant::now();
    let run: Result<LaunchRun> = match how {
        How::Lab => {
            let opts = MigrateOptions {
                src_wrapper,
                dst_wrapper,
                src_args,
                sample_usage: true,
                poll: Some(POLL),
                ..Default::default()
            };
            ctx.lab.migrate(pid, opts).map(LaunchRun::from).map_err(Into::into)
        }
        How::Own { build, transport } => {
            let l = launch::Launch { build, transport, src_args, src_wrapper, dst_wrapper, poll: POLL };
            launch::migrate(ctx, pid, &l)
        }
    };
    let wall = t0.elapsed();
    let stats = watcher.finish();
    let run = match run {
        Ok(r) => r,
        Err(e) => {
            finish_workload(w, &[]);
            return Err(e);
        }
    };
    if !run.succeeded() {
        let restored: Vec<i32> = run.restored_pid.into_iter().collect();
        for &p in &restored {
            let _ = w.adopt_pid(p);
        }
        finish_workload(w, &restored);
        return Err(format!("phaul failed: {}", run.describe()).into());
    }
    let Some(restored) = run.restored_pid else {
        finish_workload(w, &[]);
        return Err(format!("phaul wrote no restored pid: {}", run.describe()).into());
    };
    let verified = ctx.verify_restored(&mut w, restored, &before, s);
    finish_workload(w, &[restored]);
    verified?;

    let Some(report) = run.report.clone() else {
        return Err(format!("phaul printed no JSON report: {}", run.describe()).into());
    };
    if report["memory"]["strategy"] != "stop-and-copy" {
        s.notes.push(format!("phaul used {} instead of stop-and-copy", report["memory"]["strategy"]));
    }
    let frozen = num(&report, &["frozen_ms"]);
    s.set(metric::TOTAL_MS, ms(wall));
    s.set(metric::SRC_EXIT_MS, ms(run.src_elapsed));
    if let Some(f) = frozen {
        // phaul's frozen time already spans freeze → restored on B (the source stays frozen until B confirms).
        s.set(metric::CRIU_FROZEN_MS, f);
        s.set(metric::DOWNTIME_MS, f);
    }
    for (key, path) in [
        (metric::RESTORE_MS, &["restore_ms"][..]),
        (metric::CRIU_RESTORE_MS, &["criu_restore_ms"][..]),
        (metric::PHAUL_REPORTED_TOTAL_MS, &["total_ms"][..]),
        (metric::PHAUL_DOWNTIME_MS, &["downtime_ms"][..]),
        (metric::COMMIT_SENT_MS, &["handover", "commit_sent_ms"][..]),
        (metric::COMMIT_RTT_MS, &["handover", "commit_rtt_ms"][..]),
    ] {
        if let Some(v) = num(&report, path) {
            s.set(key, v);
        }
    }
    let pages = num(&report, &["channels", "memory_pages"]).unwrap_or(0.0);
    s.set(metric::PAGES_MIB, pages / (1u64 << 20) as f64);
    if let Some(i) = num(&report, &["channels", "memory_images"]) {
        s.set(metric::IMAGES_KIB, i / 1024.0);
    }
    let last_round = report["rounds"].as_array().and_then(|r| r.last()).cloned().unwrap_or(Value::Null);
    if let Some(r) = num(&last_round, &["rate_mib_s"]) {
        s.set(metric::PHAUL_ROUND_RATE_MIB_S, r);
    }
    match stats.map(|b| decode_stats(&b)) {
        Some(Ok(st)) => {
            let watched_frozen = st.frozen_time_us as f64 / 1000.0;
            if frozen.is_some_and(|f| (f - watched_frozen).abs() > 0.01) {
                s.notes.push(format!(
                    "the stats-dump read by the benchmark (frozen {watched_frozen} ms) is not the one phaul reported \
                     ({frozen:?} ms); rate left out"
                ));
            } else {
                let page_bytes = st.pages_written * crate::bare::page_size();
                s.set(metric::CRIU_FREEZING_MS, st.freezing_time_us as f64 / 1000.0);
                s.set(metric::CRIU_MEMWRITE_MS, st.memwrite_time_us as f64 / 1000.0);
                s.set(metric::CRIU_MEMDUMP_MS, st.memdump_time_us as f64 / 1000.0);
                if st.memwrite_time_us > 0 {
                    s.set(metric::RATE_MIB_S, mib(page_bytes) / (st.memwrite_time_us as f64 / 1e6));
                }
            }
        }
        Some(Err(e)) => s.notes.push(format!("cannot decode the source's stats-dump: {e}")),
        None => s.notes.push("the source's stats-dump was not caught before phaul removed it".into()),
    }
    // What crossed the memory channel: the pages and the other image files.
    let moved_gib = (pages + num(&report, &["channels", "memory_images"]).unwrap_or(0.0)) / (1u64 << 30) as f64;
    for (u, rss, cpu, children, [per_gib, children_per_gib, all_per_gib]) in [
        (
            run.src_usage,
            metric::SRC_RSS_MIB,
            metric::SRC_CPU_S,
            metric::SRC_CHILDREN_CPU_S,
            [metric::SRC_CPU_MS_PER_GIB, metric::SRC_CHILDREN_CPU_MS_PER_GIB, metric::SRC_ALL_CPU_MS_PER_GIB],
        ),
        (
            run.dst_usage,
            metric::DST_RSS_MIB,
            metric::DST_CPU_S,
            metric::DST_CHILDREN_CPU_S,
            [metric::DST_CPU_MS_PER_GIB, metric::DST_CHILDREN_CPU_MS_PER_GIB, metric::DST_ALL_CPU_MS_PER_GIB],
        ),
    ] {
        match u {
            Some(u) if u.samples > 0 => {
                let reaped = u.children_user_s + u.children_sys_s;
                s.set(rss, u.peak_rss_kib as f64 / 1024.0);
                s.set(cpu, u.cpu_s());
                s.set(children, reaped);
                if moved_gib > 0.0 {
                    s.set(per_gib, u.cpu_s() * 1000.0 / moved_gib);
                    s.set(children_per_gib, reaped * 1000.0 / moved_gib);
                    s.set(all_per_gib, (u.cpu_s() + reaped) * 1000.0 / moved_gib);
                }
                if !u.final_read {
                    s.notes.push(format!("{cpu}: the final CPU times were not read after the exit"));
                }
            }
            _ => s.notes.push(format!("{rss}: the process was not sampled")),
        }
    }
    Ok(())
}
