//! Statistics, targets, and the files the benchmark writes: `results.md`, `results.json` and the PNG plots.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::plot::{self, Series};
use crate::sample::{metric, Method, Sample, SHOWN};
use crate::{Config, Context, Result};

/// Median, minimum and maximum of the successful runs.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Stat {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The statistics of `values` (none for no values).
pub fn stat(values: &[f64]) -> Option<Stat> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some(Stat { n, median, min: v[0], max: v[n - 1] })
}

/// Where and on what the benchmark ran.
#[derive(Debug, Clone, Serialize)]
pub struct Environment {
    pub started_utc: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub mem_total_mib: u64,
    pub criu: String,
    pub criu_version: String,
    pub phaul_commit: Option<String>,
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub duration_s: f64,
    pub memory_calibration: Option<crate::calibrate::MemoryCalibration>,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

fn command_line(cmd: &mut Command) -> Option<String> {
    let out = phaul_testbed::run_command(cmd, Duration::from_secs(10)).ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// The workspace's commit, marked when tracked files differ from it (the binaries may then not be that commit).
fn commit_of(workspace: &Path) -> Option<String> {
    let git = |args: &[&str]| command_line(Command::new("git").arg("-C").arg(workspace).args(args));
    let head = git(&["rev-parse", "--short", "HEAD"])?;
    // Bounded like every command here; no output means a clean tree.
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some();
    Some(if dirty { format!("{head} plus uncommitted changes") } else { head })
}

impl Environment {
    /// What can be known before the run.
    pub fn capture(criu: &Path) -> Environment {
        let cpuinfo = read_trim("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim()))
            .unwrap_or("unknown")
            .to_string();
        let mem_total_mib = read_trim("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib / 1024)
            .unwrap_or(0);
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        Environment {
            started_utc: utc_now(),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            cpu_model,
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            mem_total_mib,
            criu: criu.display().to_string(),
            criu_version: command_line(Command::new(criu).arg("--version"))
                .and_then(|v| v.lines().next().map(str::to_string))
                .unwrap_or_else(|| "unknown".into()),
            phaul_commit: commit_of(&workspace),
            loadavg_before: read_trim("/proc/loadavg"),
            loadavg_after: String::new(),
            duration_s: 0.0,
            memory_calibration: None,
        }
    }

    /// Completes the record after the run.
    pub fn finish(mut self, took: Duration) -> Environment {
        self.loadavg_after = read_trim("/proc/loadavg");
        self.duration_s = took.as_secs_f64();
        self
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// One cell of the summary: a metric of a method at a size.
#[derive(Debug, Clone, Serialize)]
pub struct SummaryRow {
    pub size_mib: u64,
    pub method: Method,
    pub metric: String,
    #[serde(flatten)]
    pub stat: Stat,
}

/// One target evaluated at one size.
#[derive(Debug, Clone, Serialize)]
pub struct TargetRow {
    pub target: String,
    pub size_mib: u64,
    /// phaul's figure.
    pub phaul: Option<f64>,
    /// What it is compared with (bare CRIU, the raw copy), if anything.
    pub reference: Option<f64>,
    /// The ratio or value compared with the limit.
    pub value: Option<f64>,
    /// `<=`, `>=` or `<`.
    pub comparison: &'static str,
    pub limit: f64,
    /// `PASS`, `MISS`, `n/a` (figures missing) or `info` (the target is not set at this size).
    pub result: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    pub sizes_mib: Vec<u64>,
    pub methods: Vec<Method>,
    pub reps: u32,
    pub quick: bool,
    pub order: String,
}

/// Everything the benchmark concludes.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: RunConfig,
    pub environment: Environment,
    pub targets: Vec<TargetRow>,
    pub summary: Vec<SummaryRow>,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
}

/// Sizes at which the downtime and total-time targets are set.
const TIME_TARGET_SIZES: &[u64] = &[256, 1024];
/// Size at which the RSS target is set.
const RSS_TARGET_SIZE: u64 = 1024;

impl Report {
    pub fn build(cfg: &Config, environment: Environment, samples: &[Sample]) -> Report {
        let mut summary = Vec::new();
        for &size in &cfg.sizes {
            for &method in &cfg.methods {
                for (key, _, _) in SHOWN {
                    let values: Vec<f64> = ok_samples(samples, size, method).filter_map(|s| s.get(key)).collect();
                    if let Some(stat) = stat(&values) {
                        summary.push(SummaryRow { size_mib: size, method, metric: key.to_string(), stat });
                    }
                }
            }
        }
        let mut r = Report {
            config: RunConfig {
                sizes_mib: cfg.sizes.clone(),
                methods: cfg.methods.clone(),
                reps: cfg.reps,
                quick: cfg.quick,
                order: "rotated each repetition: phaul, bare CRIU, raw; then bare CRIU, raw, phaul; then raw, phaul, \
                        bare CRIU; ..."
                    .into(),
            },
            environment,
            targets: Vec::new(),
            summary,
            failures: samples
                .iter()
                .filter_map(|s| {
                    s.error.as_ref().map(|e| format!("{} MiB, rep {}, {}: {e}", s.size_mib, s.rep, s.method.label()))
                })
                .collect(),
            notes: samples
                .iter()
                .flat_map(|s| {
                    s.notes.iter().map(move |n| format!("{} MiB, rep {}, {}: {n}", s.size_mib, s.rep, s.method.label()))
                })
                .collect(),
        };
        r.targets = r.evaluate(cfg, samples);
        r
    }

    /// The statistic of a metric of a method at a size.
    pub fn get(&self, size: u64, method: Method, key: &str) -> Option<Stat> {
        self.summary.iter().find(|r| r.size_mib == size && r.method == method && r.metric == key).map(|r| r.stat)
    }

    fn median(&self, size: u64, method: Method, key: &str) -> Option<f64> {
        self.get(size, method, key).map(|s| s.median)
    }

    fn evaluate(&self, cfg: &Config, samples: &[Sample]) -> Vec<TargetRow> {
        let mut rows = Vec::new();
        let verdict = |applies: bool, v: Option<f64>, ok: &dyn Fn(f64) -> bool| match (applies, v) {
            (_, None) => "n/a",
            (false, Some(_)) => "info",
            (true, Some(v)) if ok(v) => "PASS",
            (true, Some(_)) => "MISS",
        };
        for &size in &cfg.sizes {
            let timed = TIME_TARGET_SIZES.contains(&size);
            let ratio_row = |target: &str, key: &str, against: Method, cmp: &'static str, limit: f64, applies: bool| {
                let p = self.median(size, Method::Phaul, key);
                let r = self.median(size, against, key);
                let value = match (p, r) {
                    (Some(p), Some(r)) if r > 0.0 => Some(p / r),
                    _ => None,
                };
                let ok = |v: f64| if cmp == "<=" { v <= limit } else { v >= limit };
                TargetRow {
                    target: target.to_string(),
                    size_mib: size,
                    phaul: p,
                    reference: r,
                    value,
                    comparison: cmp,
                    limit,
                    result: verdict(applies, value, &ok),
                }
            };
            rows.push(ratio_row(
                "downtime: phaul ÷ bare CRIU (comparable downtime, medians)",
                metric::DOWNTIME_MS,
                Method::Criu,
                "<=",
                1.10,
                timed,
            ));
            if cfg.methods.contains(&Method::CriuKeepSource) {
                let mut r = ratio_row(
                    "(context) downtime: phaul ÷ bare CRIU with the source kept until restored (medians)",
                    metric::DOWNTIME_MS,
                    Method::CriuKeepSource,
                    "<=",
                    f64::NAN,
                    false,
                );
                r.result = if r.value.is_some() { "info" } else { "n/a" };
                rows.push(r);
            }
            rows.push(ratio_row(
                "total time: phaul ÷ bare CRIU (medians)",
                metric::TOTAL_MS,
                Method::Criu,
                "<=",
                1.20,
                timed,
            ));
            rows.push(ratio_row(
                "memory-channel rate: phaul ÷ raw TCP copy (medians)",
                metric::RATE_MIB_S,
                Method::Raw,
                ">=",
                0.80,
                true,
            ));
            let rss: Vec<f64> = ok_samples(samples, size, Method::Phaul)
                .flat_map(|s| [s.get(metric::SRC_RSS_MIB), s.get(metric::DST_RSS_MIB)])
                .flatten()
                .collect();
            let peak = rss.iter().copied().fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
            rows.push(TargetRow {
                target: "phaul peak RSS, larger side, worst repetition (MiB)".into(),
                size_mib: size,
                phaul: peak,
                reference: None,
                value: peak,
                comparison: "<",
                limit: 64.0,
                result: verdict(size == RSS_TARGET_SIZE, peak, &|v| v < 64.0),
            });
            // For context only: CRIU's raw frozen times are not comparable (phaul's includes the restore on B).
            let mut raw_frozen = ratio_row(
                "(context) CRIU frozen_time: phaul ÷ bare CRIU, raw, not comparable",
                metric::CRIU_FROZEN_MS,
                Method::Criu,
                "<=",
                f64::NAN,
                false,
            );
            raw_frozen.result = if raw_frozen.value.is_some() { "info" } else { "n/a" };
            rows.push(raw_frozen);
            let p = self.median(size, Method::Phaul, metric::RATE_MIB_S);
            let to_file = self.median(size, Method::Raw, metric::RAW_TO_FILE_RATE_MIB_S);
            rows.push(TargetRow {
                target: "(context) memory-channel rate: phaul ÷ raw TCP copy written to a file on B (medians)".into(),
                size_mib: size,
                phaul: p,
                reference: to_file,
                value: p.zip(to_file).filter(|(_, r)| *r > 0.0).map(|(p, r)| p / r),
                comparison: ">=",
                limit: f64::NAN,
                result: "info",
            });
            let pc = self.median(size, Method::Criu, metric::RATE_MIB_S);
            let raw = self.median(size, Method::Raw, metric::RATE_MIB_S);
            rows.push(TargetRow {
                target: "(context) page-server rate: bare CRIU ÷ raw TCP copy (medians)".into(),
                size_mib: size,
                phaul: None,
                reference: raw,
                value: pc.zip(raw).filter(|(_, r)| *r > 0.0).map(|(p, r)| p / r),
                comparison: ">=",
                limit: f64::NAN,
                result: "info",
            });
        }
        rows
    }

    /// Writes results.md, results.json and the plots into `out`; returns the paths written.
    pub fn write(&self, out: &Path, samples: &[Sample]) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        let md = out.join("results.md");
        std::fs::write(&md, self.markdown()).ctx(|| format!("writing {}", md.display()))?;
        files.push(md);
        let json = out.join("results.json");
        let doc = serde_json::json!({ "report": self, "samples": samples });
        let text = serde_json::to_string_pretty(&doc).ctx(|| "encoding the results as JSON".into())?;
        std::fs::write(&json, text + "\n").ctx(|| format!("writing {}", json.display()))?;
        files.push(json);
        files.extend(self.plots(out)?);
        Ok(files)
    }

    fn series(&self, name: &str, method: Method, key: &str, style: plot::Style) -> Series {
        let points =
            self.config.sizes_mib.iter().filter_map(|&size| self.get(size, method, key).map(|s| (size, s))).collect();
        Series { name: name.to_string(), style, points }
    }

    fn plots(&self, out: &Path) -> Result<Vec<PathBuf>> {
        use plot::Style;
        let downtime = out.join("downtime.png");
        plot::line_chart(
            &downtime,
            "Downtime against workload size (median, min-max bars)",
            "ms",
            &[
                self.series(
                    "phaul (CRIU frozen_time, spans the restore on B)",
                    Method::Phaul,
                    metric::DOWNTIME_MS,
                    Style::Phaul,
                ),
                self.series("bare CRIU: frozen_time + copy + restore", Method::Criu, metric::DOWNTIME_MS, Style::Criu),
                self.series(
                    "bare CRIU: dump frozen_time only",
                    Method::Criu,
                    metric::CRIU_FROZEN_MS,
                    Style::CriuDashed,
                ),
                self.series(
                    "(context) bare CRIU, source kept stopped until restored",
                    Method::CriuKeepSource,
                    metric::DOWNTIME_MS,
                    Style::Context,
                ),
            ],
        )?;
        let total = out.join("total.png");
        plot::line_chart(
            &total,
            "Total migration time against workload size (median, min-max bars)",
            "ms",
            &[
                self.series("phaul", Method::Phaul, metric::TOTAL_MS, Style::Phaul),
                self.series("bare CRIU", Method::Criu, metric::TOTAL_MS, Style::Criu),
                self.series(
                    "(context) bare CRIU, source kept stopped until restored",
                    Method::CriuKeepSource,
                    metric::TOTAL_MS,
                    Style::Context,
                ),
            ],
        )?;
        let rate = out.join("rate.png");
        let mut ceiling80 = self.series("0.8 x raw copy (target)", Method::Raw, metric::RATE_MIB_S, Style::RawDashed);
        for (_, s) in &mut ceiling80.points {
            *s = Stat { n: s.n, median: s.median * 0.8, min: s.median * 0.8, max: s.median * 0.8 };
        }
        plot::line_chart(
            &rate,
            "Memory page transfer rate against the raw TCP copy (median, min-max bars)",
            "MiB/s",
            &[
                self.series(
                    "phaul memory channel (pages / CRIU memwrite_time)",
                    Method::Phaul,
                    metric::RATE_MIB_S,
                    Style::Phaul,
                ),
                self.series(
                    "bare CRIU page server (pages / memwrite_time)",
                    Method::Criu,
                    metric::RATE_MIB_S,
                    Style::Criu,
                ),
                self.series("raw TCP copy, same bytes (ceiling)", Method::Raw, metric::RATE_MIB_S, Style::Raw),
                ceiling80,
                self.series(
                    "(context) raw TCP copy written to a file on B",
                    Method::Raw,
                    metric::RAW_TO_FILE_RATE_MIB_S,
                    Style::Context,
                ),
            ],
        )?;
        Ok(vec![downtime, total, rate])
    }

    /// The whole results document.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let e = &self.environment;
        let c = &self.config;
        let sizes: Vec<String> = c.sizes_mib.iter().map(|s| s.to_string()).collect();
        let _ = writeln!(s, "# phaul benchmark: phaul vs bare CRIU vs a raw TCP copy\n");
        if c.quick {
            let _ =
                writeln!(s, "**Quick smoke run** (`--quick`): one small size, one repetition; not a measurement.\n");
        }
        let _ = writeln!(
            s,
            "A `phaul-workload memory` process (pid 1 of its own pid namespace, every page touched) is moved from host A \
             to host B (two network namespaces joined by a veth, 10.91.0.1 → 10.91.0.2) by phaul (stop-and-copy), by \
             bare CRIU scripted as an operator would, and the same number of bytes is copied raw over TCP between the \
             two namespaces. Generated by `phaul-bench`; see `bench/README.md` for the method.\n"
        );
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(s, "| started | {} (took {:.0} s) |", e.started_utc, e.duration_s);
        let _ =
            writeln!(s, "| machine | Linux {}, {} × {}, {} MiB RAM |", e.kernel, e.cpus, e.cpu_model, e.mem_total_mib);
        let _ = writeln!(
            s,
            "| load average (1/5/15 min) | before: {} — after: {} |",
            loadavg3(&e.loadavg_before),
            loadavg3(&e.loadavg_after)
        );
        if let Some(m) = &e.memory_calibration {
            let _ = writeln!(
                s,
                "| first-touching {} MiB (see README) | {:.0} ms while another {} MiB is held; {:.0} ms right after \
                 {} MiB were freed; {:.0} ms for the very first buffer |",
                m.size_mib, m.while_held_ms, m.size_mib, m.just_freed_ms, m.size_mib, m.first_ms
            );
        }
        let _ = writeln!(s, "| CRIU | {} ({}) |", e.criu_version, e.criu);
        let _ = writeln!(s, "| phaul commit | {} |", e.phaul_commit.as_deref().unwrap_or("unknown"));
        let _ = writeln!(s, "| sizes, repetitions | {} MiB; {} each |", sizes.join(", "), c.reps);
        let _ = writeln!(s, "| order | {} |", c.order);
        let _ = writeln!(s);

        let _ = writeln!(s, "## Targets\n");
        let _ = writeln!(
            s,
            "Ratios of medians measured in this run. The downtime target is judged on the *comparable downtime* (see \
             Definitions), not on CRIU's raw `frozen_time`, which measures different spans in the two methods. \
             `info` rows are not targets at that size (downtime and total time are targets at 256 and 1024 MiB, \
             RSS at 1024 MiB).\n"
        );
        let _ = writeln!(s, "| target | size (MiB) | phaul | reference | ratio / value | limit | result |");
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|");
        for t in &self.targets {
            let limit = if t.limit.is_finite() { format!("{} {}", t.comparison, t.limit) } else { "—".into() };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                t.target,
                t.size_mib,
                opt(t.phaul, 1),
                opt(t.reference, 1),
                opt(t.value, 3),
                limit,
                bold(t.result)
            );
        }
        let _ = writeln!(s);

        let _ = writeln!(s, "## Results\n");
        let _ = writeln!(s, "Median, min and max over the successful repetitions (n = how many).\n");
        for &size in &c.sizes_mib {
            let _ = writeln!(s, "### {size} MiB\n");
            let mut head = String::from("| metric |");
            let mut rule = String::from("|---|");
            for m in &c.methods {
                let _ = write!(head, " {0} median | {0} min | {0} max |", m.label());
                rule.push_str("---:|---:|---:|");
            }
            let _ = writeln!(s, "{head}\n{rule}");
            for (key, label, dec) in SHOWN {
                let cells: Vec<Option<Stat>> = c.methods.iter().map(|&m| self.get(size, m, key)).collect();
                if cells.iter().all(Option::is_none) {
                    continue;
                }
                let _ = write!(s, "| {label} |");
                for c in cells {
                    match c {
                        Some(st) => {
                            let _ = write!(
                                s,
                                " {} | {} | {} |",
                                fmt(st.median, *dec),
                                fmt(st.min, *dec),
                                fmt(st.max, *dec)
                            );
                        }
                        None => s.push_str(" — | — | — |"),
                    }
                }
                s.push('\n');
            }
            let n: Vec<String> = c
                .methods
                .iter()
                .map(|&m| format!("{} n = {}", m.label(), self.get(size, m, metric::TOTAL_MS).map_or(0, |st| st.n)))
                .collect();
            let _ = writeln!(s, "\n{}.\n", n.join(", "));
        }

        let _ = writeln!(s, "## Plots\n");
        let _ = writeln!(s, "![downtime](downtime.png)\n\n![total time](total.png)\n\n![rate](rate.png)\n");

        let _ = writeln!(s, "## Definitions\n");
        for d in DEFINITIONS {
            let _ = writeln!(s, "- {d}");
        }
        let _ = writeln!(s);
        if !self.failures.is_empty() {
            let _ = writeln!(s, "## Failed runs (left out of the statistics)\n");
            for f in &self.failures {
                let _ = writeln!(s, "- {}", f.replace('\n', " "));
            }
            let _ = writeln!(s);
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "## Notes\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {}", n.replace('\n', " "));
            }
            let _ = writeln!(s);
        }
        s
    }
}

const DEFINITIONS: &[&str] = &[
    "**downtime, comparable**: from the freeze on A until the workload runs on B. For phaul this is CRIU's \
     `frozen_time` of the final dump, because phaul keeps the source frozen until the destination has restored it \
     (it is an upper bound: the restored copy already runs when the source is killed). For bare CRIU it is the \
     dump's `frozen_time` plus the wall time from the moment the source was seen killed (polled every 1 ms) until \
     `criu restore` returned: the page server's exit, the copy of the other images and the restore.",
    "**CRIU frozen_time, raw**: CRIU's own figure from `stats-dump`. It spans different things in the two methods \
     (phaul: freeze → restored on B; bare CRIU: freeze → dump written), so it is shown for context only.",
    "**total time**: wall time measured by the benchmark. phaul: around the testbed's `Lab::migrate` (opening the \
     three TCP connections, starting `phaul serve` and `phaul migrate`, until both have exited; phaul's pre-flight \
     CRIU version, feature and CPU checks included). Bare CRIU: opening the copy connection, starting the page \
     server and waiting until it listens, the dump, the copy and the restore. Raw: first byte written to last byte \
     read.",
    "**restore, wall**: phaul: the destination's RESTORE request as phaul measures it (`restore_ms`); bare CRIU: the \
     `criu restore` command. **CRIU restore_time**: CRIU's own figure from `stats-restore`.",
    "**page transfer rate**: memory pages written ÷ CRIU's `memwrite_time` (the time CRIU spent writing pages into \
     the connection to the page server) for phaul (over phaul's memory channel) and bare CRIU (over CRIU's own page \
     server connection); bytes ÷ wall time for the raw copy, which moves as many bytes as phaul's last run at that \
     size moved as pages. The raw copy's receiver discards the bytes; the page servers write them to image files.",
    "**phaul's dump-round rate**: the rate phaul prints in its own report: pages ÷ the whole final dump request, \
     which in stop-and-copy includes sending the images and the restore on B; it is not a channel rate.",
    "**peak RSS / CPU of phaul**: `VmHWM` and `utime + stime` of the `phaul migrate` and `phaul serve` processes \
     themselves, sampled from /proc every 10 ms (CPU read once more after the exit, before reaping). CRIU runs in \
     separate processes; the CPU of the CRIU processes each phaul process reaped is shown apart.",
];

fn ok_samples(samples: &[Sample], size: u64, method: Method) -> impl Iterator<Item = &Sample> {
    samples.iter().filter(move |s| s.size_mib == size && s.method == method && s.error.is_none())
}

pub(crate) fn fmt(v: f64, dec: usize) -> String {
    format!("{v:.dec$}")
}

pub(crate) fn opt(v: Option<f64>, dec: usize) -> String {
    v.map(|v| fmt(v, dec)).unwrap_or_else(|| "—".into())
}

pub(crate) fn bold(r: &str) -> String {
    match r {
        "PASS" | "MISS" => format!("**{r}**"),
        other => other.to_string(),
    }
}

pub(crate) fn loadavg3(s: &str) -> String {
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_odd_and_even_counts() {
        assert_eq!(stat(&[3.0, 1.0, 2.0]), Some(Stat { n: 3, median: 2.0, min: 1.0, max: 3.0 }));
        assert_eq!(stat(&[4.0, 1.0, 2.0, 3.0]), Some(Stat { n: 4, median: 2.5, min: 1.0, max: 4.0 }));
        assert_eq!(stat(&[]), None);
        assert_eq!(stat(&[f64::NAN]), None);
    }

    #[test]
    fn utc_dates_look_right() {
        let d = utc_now();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20") && d.ends_with('Z'), "{d}");
    }

    fn sample(method: Method, size: u64, rep: u32, vals: &[(&str, f64)]) -> Sample {
        let mut s = Sample::new(method, size, rep, 0);
        for (k, v) in vals {
            s.set(k, *v);
        }
        s
    }

    #[test]
    fn targets_use_medians_and_apply_only_at_their_sizes() {
        let mut samples = Vec::new();
        for size in [64, 256] {
            for rep in 0..3 {
                let x = rep as f64;
                samples.push(sample(
                    Method::Phaul,
                    size,
                    rep,
                    &[
                        (metric::DOWNTIME_MS, 105.0 + x),
                        (metric::TOTAL_MS, 130.0 + x),
                        (metric::RATE_MIB_S, 900.0),
                        (metric::SRC_RSS_MIB, 10.0),
                        (metric::DST_RSS_MIB, 12.0 + x),
                    ],
                ));
                samples.push(sample(
                    Method::Criu,
                    size,
                    rep,
                    &[(metric::DOWNTIME_MS, 100.0), (metric::TOTAL_MS, 100.0)],
                ));
                samples.push(sample(Method::Raw, size, rep, &[(metric::RATE_MIB_S, 1000.0)]));
            }
        }
        let mut failed = sample(Method::Criu, 256, 3, &[(metric::TOTAL_MS, 1.0)]);
        failed.error = Some("boom".into());
        samples.push(failed);
        let cfg = Config {
            sizes: vec![64, 256],
            reps: 3,
            out: PathBuf::from("/nonexistent"),
            quick: false,
            methods: Method::MAIN.to_vec(),
        };
        let env = Environment::capture(Path::new("/bin/true"));
        let r = Report::build(&cfg, env, &samples);
        let find = |t: &str, size: u64| {
            r.targets.iter().find(|row| row.target.starts_with(t) && row.size_mib == size).cloned().expect("row")
        };
        let d = find("downtime", 256);
        assert_eq!(d.value.map(|v| (v * 1000.0).round()), Some(1060.0));
        assert_eq!(d.result, "PASS");
        assert_eq!(find("downtime", 64).result, "info");
        let t = find("total", 256);
        assert_eq!(t.result, "MISS", "131/100 > 1.2 (the failed run with 1 ms is left out)");
        assert_eq!(find("memory-channel", 64).result, "PASS");
        let rss = find("phaul peak RSS", 256);
        assert_eq!(rss.value, Some(14.0));
        assert_eq!(rss.result, "info");
        assert_eq!(r.failures.len(), 1);
        let md = r.markdown();
        assert!(md.contains("| downtime, comparable (ms) |"), "{md}");
        assert!(md.contains("**MISS**"));
    }
}
