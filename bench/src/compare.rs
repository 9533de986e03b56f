//! Side-by-side comparisons, each in one run with the variants interleaved (the order rotated every repetition):
//!
//! * `--compare tls` (issue 8): phaul over its own mutual-TLS connections (`serve --listen 10.91.0.2:PORT`,
//!   `migrate --to`) against phaul over handed-in plaintext descriptors (`Lab::migrate`), stop-and-copy, with the
//!   veth throttled by a token bucket on both ends and unthrottled (a raw TCP copy of the same bytes for context);
//! * `--compare handover` (issue 7): phaul now (with the handover commit) against phaul before it (a build of
//!   859f623, `--baseline-phaul`), bare CRIU with the source kept until the restore succeeded (the order phaul
//!   follows) and bare CRIU.
//!
//! Every workload carries a heartbeat, so each method's downtime is also seen from inside the workload the same
//! way. Results: `results.md` and `results.json` in the output directory.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use phaul_testbed::Lab;
use serde::Serialize;

use crate::launch::{self, Dialect, PhaulBuild, Pki};
use crate::report::{bold, fmt, loadavg3, opt, stat, Environment, Stat};
use crate::sample::{metric, order_for_rep, Method, Sample, SHOWN};
use crate::throttle::{Tbf, Throttle};
use crate::{calibrate, measure_one, settle, Context, Ctx, Result, Variants};

/// Which comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Suite {
    /// phaul's own TLS connections against handed-in plaintext descriptors.
    Tls,
    /// phaul with the handover commit against phaul before it and bare CRIU (source kept, and not).
    Handover,
}

impl Suite {
    pub fn name(self) -> &'static str {
        match self {
            Suite::Tls => "tls",
            Suite::Handover => "handover",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    pub suite: Suite,
    pub sizes: Vec<u64>,
    pub reps: u32,
    pub out: PathBuf,
    pub quick: bool,
    /// `--compare handover`: the baseline build's `target/release`.
    pub baseline: Option<PathBuf>,
    /// `--compare tls`: the throttled condition.
    pub tbf: Tbf,
}

/// Sizes at which the targets are set.
const TARGET_SIZES: &[u64] = &[256, 1024];
/// The network label of the unthrottled runs.
pub const UNTHROTTLED: &str = "unthrottled";

fn network_label(t: Option<&Tbf>) -> String {
    t.map_or_else(|| UNTHROTTLED.to_string(), |t| format!("tbf {}", t.rate))
}

/// Programs seen running besides the benchmark (other test suites skew the figures): `name ×count`.
pub fn other_work() -> String {
    let me = std::process::id();
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let Some(exe) = cmdline.split(|b| *b == 0).next().map(|a| String::from_utf8_lossy(a).into_owned()) else {
            continue;
        };
        let base = exe.rsplit('/').next().unwrap_or(&exe).to_string();
        let interesting = ["cargo", "rustc", "afl-fuzz", "qemu-system-x86_64", "phaul", "criu", "phaul-workload"]
            .contains(&base.as_str())
            || exe.contains("/deps/")
            || exe.contains("target-fuzz");
        if interesting {
            // A test binary's name without its hash.
            let name = match base.rsplit_once('-') {
                Some((n, h)) if exe.contains("/deps/") && h.len() == 16 => format!("test {n}"),
                _ => base,
            };
            *seen.entry(name).or_default() += 1;
        }
    }
    if seen.is_empty() {
        return "none".into();
    }
    seen.iter().map(|(n, c)| format!("{n} ×{c}")).collect::<Vec<_>>().join(", ")
}

/// A phaul build, as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct BuildInfo {
    pub dir: String,
    pub commit: Option<String>,
    pub dialect: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompareRunConfig {
    pub suite: Suite,
    pub sizes_mib: Vec<u64>,
    pub methods: Vec<Method>,
    pub networks: Vec<String>,
    pub tbf: Option<Tbf>,
    pub reps: u32,
    pub quick: bool,
    pub order: String,
}

/// One cell of the summary.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    pub size_mib: u64,
    pub method: Method,
    pub metric: String,
    #[serde(flatten)]
    pub stat: Stat,
}

/// A target, or a figure for context, evaluated on medians.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub what: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    pub size_mib: u64,
    /// The figure judged (e.g. TLS's median).
    pub subject: Option<f64>,
    /// What it is compared with (e.g. plaintext's median).
    pub reference: Option<f64>,
    /// The ratio or difference compared with the limit.
    pub value: Option<f64>,
    pub comparison: &'static str,
    pub limit: Option<f64>,
    /// `PASS`, `MISS`, `info` (not a target here) or `n/a` (figures missing).
    pub result: &'static str,
}

/// Everything a comparison concludes.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub config: CompareRunConfig,
    pub environment: Environment,
    pub other_work_before: String,
    pub other_work_after: String,
    /// The phaul that ran as "phaul" (and "phaul, own TLS").
    pub phaul: BuildInfo,
    pub baseline: Option<BuildInfo>,
    pub verdicts: Vec<Verdict>,
    pub summary: Vec<Row>,
    /// `tc -s qdisc show` of both veth ends at the end of each throttled block.
    pub qdisc_stats: Vec<String>,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
}

/// What the run produced.
#[derive(Debug)]
pub struct CompareOutcome {
    pub samples: Vec<Sample>,
    pub report: CompareReport,
    pub files: Vec<PathBuf>,
}

fn methods_of(suite: Suite, with_baseline: bool) -> Vec<Method> {
    match suite {
        Suite::Tls => vec![Method::Phaul, Method::PhaulTls, Method::Raw],
        Suite::Handover => {
            let mut m = vec![Method::Phaul];
            if with_baseline {
                m.push(Method::PhaulBaseline);
            }
            m.extend([Method::CriuKeepSource, Method::Criu]);
            m
        }
    }
}

/// Runs the comparison and writes its results under `cfg.out`.
pub fn run(cfg: &CompareConfig) -> Result<CompareOutcome> {
    if cfg.sizes.is_empty() || cfg.sizes.contains(&0) {
        return Err("--sizes needs at least one size, every one above 0 MiB".into());
    }
    if cfg.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    if cfg.suite == Suite::Handover && cfg.baseline.is_none() && !cfg.quick {
        return Err("--compare handover needs --baseline-phaul DIR (the target/release of a build of 859f623; \
                    bench/run --baseline-rev 859f623 makes one)"
            .into());
    }
    let criu = phaul_core::criu::locate_criu(None).ctx(|| "finding CRIU".into())?.path;
    let mut env = Environment::capture(&criu);
    let other_work_before = other_work();
    let largest = cfg.sizes.iter().copied().max().unwrap_or(0);
    if cfg.suite == Suite::Handover {
        eprintln!("phaul-bench: measuring the cost of first-touching {largest} MiB of memory on this machine");
        env.memory_calibration = calibrate::measure(largest);
    }
    let lab = Lab::new(&format!("bench-{}", cfg.suite.name()))?;
    let mut ctx = Ctx::new(&lab, criu);
    ctx.heartbeat = true;
    std::fs::create_dir_all(&cfg.out).ctx(|| format!("creating {}", cfg.out.display()))?;
    let current = PhaulBuild::current(&ctx);
    let pki = match cfg.suite {
        Suite::Tls => Some(Pki::create(&lab.phaul, &lab.path("pki"))?),
        Suite::Handover => None,
    };
    let mut notes = Vec::new();
    let baseline = match &cfg.baseline {
        Some(dir) => {
            let b = PhaulBuild::other(dir, &lab.path("plugins-baseline.toml"))?;
            if b.dialect == Dialect::Current {
                notes.push(format!(
                    "the baseline in {} takes the current command line (serve --rpid-dir): is it really a build from \
                     before the handover commit?",
                    dir.display()
                ));
            }
            Some(b)
        }
        None => {
            if cfg.suite == Suite::Handover {
                notes.push("no --baseline-phaul: the run has no 'phaul before commit' column".into());
            }
            None
        }
    };
    let methods = methods_of(cfg.suite, baseline.is_some());
    let networks: Vec<Option<Tbf>> = match cfg.suite {
        Suite::Tls => vec![Some(cfg.tbf.clone()), None],
        Suite::Handover => vec![None],
    };
    let v = Variants { pki: pki.as_ref(), baseline: baseline.as_ref(), current: Some(&current) };

    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut qdisc_stats = Vec::new();
    let total = cfg.reps as usize * networks.len() * cfg.sizes.len() * methods.len();
    for rep in 0..cfg.reps {
        let mut nets = networks.clone();
        let k = rep as usize % nets.len();
        nets.rotate_left(k);
        for net in &nets {
            let label = (cfg.suite == Suite::Tls).then(|| network_label(net.as_ref()));
            let throttle = match net {
                Some(t) => Some(Throttle::apply(&lab.pair, t)),
                None => None,
            };
            for &size in &cfg.sizes {
                for (pos, method) in order_for_rep(&methods, rep).into_iter().enumerate() {
                    let mut s = Sample::new(method, size, rep, pos as u32);
                    s.network = label.clone();
                    match &throttle {
                        Some(Err(e)) => s.error = Some(format!("throttling the veth: {e}")),
                        _ => {
                            settle();
                            if let Err(e) = measure_one(&ctx, &v, &samples, &mut s) {
                                s.error = Some(e.to_string());
                            }
                        }
                    }
                    let n = samples.len() + 1;
                    let net = label.as_deref().map(|l| format!(" [{l}]")).unwrap_or_default();
                    eprintln!("phaul-bench: [{n}/{total}]{net} {}", progress_line(&s));
                    samples.push(s);
                }
            }
            if let Some(Ok(t)) = throttle {
                qdisc_stats.push(format!("rep {rep}: {}", t.stats().join(" | ")));
                if let Err(e) = t.remove() {
                    notes.push(format!("removing the throttle after rep {rep}: {e}"));
                }
            }
        }
    }
    let env = env.finish(started.elapsed());
    let run_cfg = CompareRunConfig {
        suite: cfg.suite,
        sizes_mib: cfg.sizes.clone(),
        methods: methods.clone(),
        networks: networks.iter().map(|n| network_label(n.as_ref())).collect(),
        tbf: (cfg.suite == Suite::Tls).then(|| cfg.tbf.clone()),
        reps: cfg.reps,
        quick: cfg.quick,
        order: "methods rotated each repetition (as in the main benchmark); with several network conditions, their \
                order is rotated too, and every size runs under each condition"
            .into(),
    };
    let info = |b: &PhaulBuild| BuildInfo {
        dir: b.bin.parent().map(|p| p.display().to_string()).unwrap_or_default(),
        commit: b.commit.clone(),
        dialect: format!("{:?}", b.dialect),
    };
    let mut phaul_info = info(&current);
    phaul_info.commit = launch::commit_of_build(&lab.phaul).or(env.phaul_commit.clone());
    let baseline_info = baseline.as_ref().map(info);
    let report = CompareReport::build(
        run_cfg,
        env,
        other_work_before,
        other_work(),
        phaul_info,
        baseline_info,
        qdisc_stats,
        notes,
        &samples,
    );
    let files = report.write(&cfg.out, &samples)?;
    Ok(CompareOutcome { samples, report, files })
}

fn progress_line(s: &Sample) -> String {
    let f = |k: &str| s.get(k).map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
    let head = format!("{:>5} MiB rep {} {:<20}", s.size_mib, s.rep, s.method.label());
    match &s.error {
        Some(e) => format!("{head} FAILED: {e}"),
        None => format!(
            "{head} downtime {} ms (phaul's {} ms, heartbeat gap {} ms), commit rtt {} ms, rate {} MiB/s",
            f(metric::DOWNTIME_MS),
            f(metric::PHAUL_DOWNTIME_MS),
            f(metric::HEARTBEAT_GAP_MS),
            f(metric::COMMIT_RTT_MS),
            f(metric::RATE_MIB_S)
        ),
    }
}

impl CompareReport {
    #[allow(clippy::too_many_arguments)]
    fn build(
        config: CompareRunConfig,
        environment: Environment,
        other_work_before: String,
        other_work_after: String,
        phaul: BuildInfo,
        baseline: Option<BuildInfo>,
        qdisc_stats: Vec<String>,
        mut notes: Vec<String>,
        samples: &[Sample],
    ) -> CompareReport {
        let nets: Vec<Option<String>> = match config.suite {
            Suite::Tls => config.networks.iter().cloned().map(Some).collect(),
            Suite::Handover => vec![None],
        };
        let mut summary = Vec::new();
        for net in &nets {
            for &size in &config.sizes_mib {
                for &method in &config.methods {
                    for (key, _, _) in SHOWN {
                        let values: Vec<f64> = samples
                            .iter()
                            .filter(|s| {
                                s.size_mib == size && s.method == method && s.error.is_none() && &s.network == net
                            })
                            .filter_map(|s| s.get(key))
                            .collect();
                        if let Some(stat) = stat(&values) {
                            summary.push(Row {
                                network: net.clone(),
                                size_mib: size,
                                method,
                                metric: key.to_string(),
                                stat,
                            });
                        }
                    }
                }
            }
        }
        let label = |s: &Sample| {
            let net = s.network.as_deref().map(|n| format!("{n}, ")).unwrap_or_default();
            format!("{net}{} MiB, rep {}, {}", s.size_mib, s.rep, s.method.label())
        };
        let failures = samples.iter().filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", label(s)))).collect();
        notes.extend(samples.iter().flat_map(|s| s.notes.iter().map(move |n| format!("{}: {n}", label(s)))));
        let mut r = CompareReport {
            config,
            environment,
            other_work_before,
            other_work_after,
            phaul,
            baseline,
            verdicts: Vec::new(),
            summary,
            qdisc_stats,
            failures,
            notes,
        };
        r.verdicts = match r.config.suite {
            Suite::Tls => r.tls_verdicts(),
            Suite::Handover => r.handover_verdicts(),
        };
        r
    }

    /// The statistic of a metric of a method at a size (and network condition).
    pub fn get(&self, net: Option<&str>, size: u64, method: Method, key: &str) -> Option<Stat> {
        self.summary
            .iter()
            .find(|r| r.network.as_deref() == net && r.size_mib == size && r.method == method && r.metric == key)
            .map(|r| r.stat)
    }

    fn median(&self, net: Option<&str>, size: u64, method: Method, key: &str) -> Option<f64> {
        self.get(net, size, method, key).map(|s| s.median)
    }

    fn tls_verdicts(&self) -> Vec<Verdict> {
        let mut rows = Vec::new();
        for net in self.config.networks.clone() {
            let throttled = net != UNTHROTTLED;
            let n = Some(net.as_str());
            for &size in &self.config.sizes_mib {
                let target = throttled && TARGET_SIZES.contains(&size);
                let ratio = |what: &str, key: &str, cmp: &'static str, limit: Option<f64>, applies: bool| {
                    let tls = self.median(n, size, Method::PhaulTls, key);
                    let plain = self.median(n, size, Method::Phaul, key);
                    ratio_row(what, Some(net.clone()), size, tls, plain, cmp, limit, applies)
                };
                rows.push(ratio(
                    "downtime (phaul's downtime_ms): TLS ÷ plaintext",
                    metric::PHAUL_DOWNTIME_MS,
                    "<=",
                    Some(1.10),
                    target,
                ));
                rows.push(ratio("CRIU frozen_time: TLS ÷ plaintext", metric::CRIU_FROZEN_MS, "<=", None, false));
                rows.push(ratio("heartbeat gap: TLS ÷ plaintext", metric::HEARTBEAT_GAP_MS, "<=", None, false));
                rows.push(ratio(
                    "memory-channel rate (pages ÷ memwrite_time): TLS ÷ plaintext",
                    metric::RATE_MIB_S,
                    ">=",
                    None,
                    false,
                ));
                if let Some(bucket) = self.config.tbf.as_ref().filter(|_| throttled).and_then(Tbf::rate_bytes_s) {
                    let bucket_mib = bucket / (1u64 << 20) as f64;
                    for (what, m) in [
                        ("plaintext rate ÷ the token bucket's rate", Method::Phaul),
                        ("TLS rate ÷ the token bucket's rate", Method::PhaulTls),
                        ("raw TCP copy rate ÷ the token bucket's rate", Method::Raw),
                    ] {
                        let r = self.median(n, size, m, metric::RATE_MIB_S);
                        rows.push(ratio_row(what, Some(net.clone()), size, r, Some(bucket_mib), ">=", None, false));
                    }
                }
                // The relay's cost in milliseconds and in per cent of plaintext (for context: a ratio above
                // says the same, these are easier to quote).
                for (what, key) in [
                    ("TLS relay cost: downtime (phaul's downtime_ms)", metric::PHAUL_DOWNTIME_MS),
                    ("TLS relay cost: heartbeat gap", metric::HEARTBEAT_GAP_MS),
                    ("TLS relay cost: total time, wall", metric::TOTAL_MS),
                ] {
                    let tls = self.median(n, size, Method::PhaulTls, key);
                    let plain = self.median(n, size, Method::Phaul, key);
                    rows.extend(cost_rows(what, Some(net.clone()), size, tls, plain));
                }
                for (what, key) in [
                    ("phaul migrate CPU per GiB moved (ms/GiB): TLS ÷ plaintext", metric::SRC_CPU_MS_PER_GIB),
                    ("phaul serve CPU per GiB moved (ms/GiB): TLS ÷ plaintext", metric::DST_CPU_MS_PER_GIB),
                    ("CRIU under phaul migrate, CPU per GiB: TLS ÷ plaintext", metric::SRC_CHILDREN_CPU_MS_PER_GIB),
                    ("CRIU under phaul serve, CPU per GiB: TLS ÷ plaintext", metric::DST_CHILDREN_CPU_MS_PER_GIB),
                    ("phaul migrate + its CRIU, CPU per GiB: TLS ÷ plaintext", metric::SRC_ALL_CPU_MS_PER_GIB),
                    ("phaul serve + its CRIU, CPU per GiB: TLS ÷ plaintext", metric::DST_ALL_CPU_MS_PER_GIB),
                ] {
                    rows.push(ratio(what, key, "<=", None, false));
                }
            }
        }
        rows
    }

    fn handover_verdicts(&self) -> Vec<Verdict> {
        let mut rows = Vec::new();
        for &size in &self.config.sizes_mib {
            let target = TARGET_SIZES.contains(&size);
            let m = |method: Method, key: &str| self.median(None, size, method, key);
            let rtt = m(Method::Phaul, metric::COMMIT_RTT_MS);
            for (what, key) in [
                ("commit's cost: phaul now − before, comparable downtime (ms)", metric::DOWNTIME_MS),
                ("commit's cost: phaul now − before, heartbeat gap (ms)", metric::HEARTBEAT_GAP_MS),
            ] {
                let (now, before) = (m(Method::Phaul, key), m(Method::PhaulBaseline, key));
                let value = now.zip(before).map(|(a, b)| a - b);
                rows.push(Verdict {
                    what: format!("{what} ≤ one commit round trip (median of phaul now's commit_rtt_ms)"),
                    network: None,
                    size_mib: size,
                    subject: now,
                    reference: before,
                    value,
                    comparison: "<=",
                    limit: rtt,
                    result: match (value, rtt) {
                        (Some(v), Some(l)) if target => pass(v <= l),
                        (Some(_), Some(_)) => "info",
                        _ => "n/a",
                    },
                });
            }
            for (what, key) in [
                ("downtime: phaul now ÷ bare CRIU with the source kept (comparable downtime)", metric::DOWNTIME_MS),
                ("downtime: phaul now ÷ bare CRIU with the source kept (heartbeat gap)", metric::HEARTBEAT_GAP_MS),
            ] {
                let (p, k) = (m(Method::Phaul, key), m(Method::CriuKeepSource, key));
                rows.push(ratio_row(what, None, size, p, k, "<=", Some(1.0), target));
            }
            for (what, a, b, key) in [
                (
                    "(context) phaul before ÷ bare CRIU with the source kept (comparable downtime)",
                    Method::PhaulBaseline,
                    Method::CriuKeepSource,
                    metric::DOWNTIME_MS,
                ),
                (
                    "(context) phaul before ÷ bare CRIU with the source kept (heartbeat gap)",
                    Method::PhaulBaseline,
                    Method::CriuKeepSource,
                    metric::HEARTBEAT_GAP_MS,
                ),
                (
                    "(context) phaul now ÷ phaul before (comparable downtime)",
                    Method::Phaul,
                    Method::PhaulBaseline,
                    metric::DOWNTIME_MS,
                ),
                (
                    "(context) phaul now ÷ phaul before (total time, wall)",
                    Method::Phaul,
                    Method::PhaulBaseline,
                    metric::TOTAL_MS,
                ),
                (
                    "(context) phaul now ÷ bare CRIU (comparable downtime)",
                    Method::Phaul,
                    Method::Criu,
                    metric::DOWNTIME_MS,
                ),
                (
                    "(context) phaul now ÷ bare CRIU (heartbeat gap)",
                    Method::Phaul,
                    Method::Criu,
                    metric::HEARTBEAT_GAP_MS,
                ),
            ] {
                rows.push(ratio_row(what, None, size, m(a, key), m(b, key), "<=", None, false));
            }
            for (what, key) in [
                ("(context) handover cost, phaul now vs before: heartbeat gap", metric::HEARTBEAT_GAP_MS),
                ("(context) handover cost, phaul now vs before: total time, wall", metric::TOTAL_MS),
            ] {
                rows.extend(cost_rows(what, None, size, m(Method::Phaul, key), m(Method::PhaulBaseline, key)));
            }
            rows.push(Verdict {
                what: "(context) phaul now: commit round trip (ms), median".into(),
                network: None,
                size_mib: size,
                subject: rtt,
                reference: None,
                value: rtt,
                comparison: "",
                limit: None,
                result: if rtt.is_some() { "info" } else { "n/a" },
            });
        }
        rows
    }

    /// Writes results.md and results.json into `out`; returns the paths written.
    pub fn write(&self, out: &std::path::Path, samples: &[Sample]) -> Result<Vec<PathBuf>> {
        let md = out.join("results.md");
        std::fs::write(&md, self.markdown()).ctx(|| format!("writing {}", md.display()))?;
        let json = out.join("results.json");
        let doc = serde_json::json!({ "report": self, "samples": samples });
        let text = serde_json::to_string_pretty(&doc).ctx(|| "encoding the results as JSON".into())?;
        std::fs::write(&json, text + "\n").ctx(|| format!("writing {}", json.display()))?;
        Ok(vec![md, json])
    }

    /// The whole results document.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let (e, c) = (&self.environment, &self.config);
        let title = match c.suite {
            Suite::Tls => "phaul over its own TLS connections vs handed-in plaintext descriptors",
            Suite::Handover => "the handover commit's cost: phaul now vs phaul before vs bare CRIU",
        };
        let _ = writeln!(s, "# phaul benchmark: {title}\n");
        if c.quick {
            let _ =
                writeln!(s, "**Quick smoke run** (`--quick`): one small size, one repetition; not a measurement.\n");
        }
        let _ = writeln!(s, "{}\n", intro(c.suite));
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
        let _ = writeln!(
            s,
            "| other work seen on the machine | before: {} — after: {} |",
            self.other_work_before, self.other_work_after
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
        let _ = writeln!(
            s,
            "| phaul (now) | {} in {} (the benchmark itself: {}) |",
            self.phaul.commit.as_deref().unwrap_or("unknown commit"),
            self.phaul.dir,
            e.phaul_commit.as_deref().unwrap_or("unknown")
        );
        if let Some(b) = &self.baseline {
            let _ = writeln!(
                s,
                "| phaul before (baseline) | {} in {} (command line: {}) |",
                b.commit.as_deref().unwrap_or("unknown commit"),
                b.dir,
                b.dialect
            );
        }
        if let Some(t) = &c.tbf {
            let _ = writeln!(s, "| throttled condition | `tc qdisc replace dev VETH root {t}` on both veth ends |");
        }
        let sizes: Vec<String> = c.sizes_mib.iter().map(|s| s.to_string()).collect();
        let _ = writeln!(s, "| sizes, repetitions | {} MiB; {} each |", sizes.join(", "), c.reps);
        let _ = writeln!(s, "| order | {} |", c.order);
        let _ = writeln!(s);

        let _ = writeln!(s, "## Targets and ratios\n");
        let _ = writeln!(
            s,
            "Medians of this run. `info` rows are not targets (at that size or condition). The targets are set at 256 \
             and 1024 MiB.\n"
        );
        let _ = writeln!(s, "| what | network | size (MiB) | figure | reference | ratio / value | limit | result |");
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---|");
        for v in &self.verdicts {
            let limit = match v.limit {
                Some(l) => format!("{} {}", v.comparison, fmt(l, 2)),
                None => "—".into(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                v.what,
                v.network.as_deref().unwrap_or("—"),
                v.size_mib,
                opt(v.subject, 1),
                opt(v.reference, 1),
                opt(v.value, 3),
                limit,
                bold(v.result)
            );
        }
        let _ = writeln!(s);

        let _ = writeln!(s, "## Results\n");
        let _ = writeln!(s, "Median, min and max over the successful repetitions (n = how many).\n");
        let nets: Vec<Option<String>> = match c.suite {
            Suite::Tls => c.networks.iter().cloned().map(Some).collect(),
            Suite::Handover => vec![None],
        };
        for net in &nets {
            for &size in &c.sizes_mib {
                match net {
                    Some(n) => {
                        let _ = writeln!(s, "### {n}, {size} MiB\n");
                    }
                    None => {
                        let _ = writeln!(s, "### {size} MiB\n");
                    }
                }
                let mut head = String::from("| metric |");
                let mut rule = String::from("|---|");
                for m in &c.methods {
                    let _ = write!(head, " {0} median | {0} min | {0} max |", m.label());
                    rule.push_str("---:|---:|---:|");
                }
                let _ = writeln!(s, "{head}\n{rule}");
                for (key, label, dec) in SHOWN {
                    let cells: Vec<Option<Stat>> =
                        c.methods.iter().map(|&m| self.get(net.as_deref(), size, m, key)).collect();
                    if cells.iter().all(Option::is_none) {
                        continue;
                    }
                    let _ = write!(s, "| {label} |");
                    for cell in cells {
                        match cell {
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
                    .map(|&m| {
                        let n = self.get(net.as_deref(), size, m, metric::TOTAL_MS).map_or(0, |st| st.n);
                        format!("{} n = {n}", m.label())
                    })
                    .collect();
                let _ = writeln!(s, "\n{}.\n", n.join(", "));
            }
        }

        let _ = writeln!(s, "## Definitions\n");
        for d in definitions(c.suite) {
            let _ = writeln!(s, "- {d}");
        }
        let _ = writeln!(s);
        if !self.qdisc_stats.is_empty() {
            let _ = writeln!(s, "## Token bucket statistics (end of each throttled block)\n");
            for q in &self.qdisc_stats {
                let _ = writeln!(s, "- `{}`", q.replace('\n', " ").replace('`', "'"));
            }
            let _ = writeln!(s);
        }
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

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

#[allow(clippy::too_many_arguments)]
fn ratio_row(
    what: &str,
    network: Option<String>,
    size: u64,
    subject: Option<f64>,
    reference: Option<f64>,
    cmp: &'static str,
    limit: Option<f64>,
    applies: bool,
) -> Verdict {
    let value = match (subject, reference) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let result = match (value, limit) {
        (None, _) => "n/a",
        (Some(v), Some(l)) if applies => pass(if cmp == "<=" { v <= l } else { v >= l }),
        _ => "info",
    };
    Verdict {
        what: what.to_string(),
        network,
        size_mib: size,
        subject,
        reference,
        value,
        comparison: cmp,
        limit: limit.filter(|_| applies),
        result,
    }
}

/// Two `info` rows for what `subject` costs over `reference` (medians): the difference in ms and in per cent.
fn cost_rows(
    what: &str,
    network: Option<String>,
    size: u64,
    subject: Option<f64>,
    reference: Option<f64>,
) -> [Verdict; 2] {
    let diff = subject.zip(reference).map(|(a, b)| a - b);
    let pct = subject.zip(reference).filter(|(_, b)| *b > 0.0).map(|(a, b)| (a / b - 1.0) * 100.0);
    let row = |unit: &str, value: Option<f64>| Verdict {
        what: format!("{what}, difference ({unit})"),
        network: network.clone(),
        size_mib: size,
        subject,
        reference,
        value,
        comparison: "",
        limit: None,
        result: if value.is_some() { "info" } else { "n/a" },
    };
    [row("ms", diff), row("%", pct)]
}

fn intro(suite: Suite) -> &'static str {
    match suite {
        Suite::Tls => {
            "A `phaul-workload memory` process (pid 1 of its own pid namespace, every page touched, with a heartbeat) is \
             migrated stop-and-copy (`--pre-dump off`) from host A (10.91.0.1) to host B (10.91.0.2) by phaul over \
             handed-in plaintext TCP descriptors (`Lab::migrate`, *phaul*) and by phaul over its own connections with \
             mutual TLS 1.3 (`phaul serve --listen 10.91.0.2:PORT --once --tls-*`, `phaul migrate --to 10.91.0.2:PORT \
             --tls-*`, certificates from `phaul cert`; *phaul, own TLS*), with the veth throttled by a token bucket on \
             both ends and unthrottled; a raw TCP copy of the same bytes shows the channel's ceiling under each \
             condition. Generated by `phaul-bench --compare tls`; see `bench/README.md`."
        }
        Suite::Handover => {
            "A `phaul-workload memory` process (pid 1 of its own pid namespace, every page touched, with a heartbeat) is \
             migrated from host A (10.91.0.1) to host B (10.91.0.2) by phaul now (stop-and-copy, with the handover \
             commit), by phaul before the commit (a build of the baseline commit, same options, its own plugins), by \
             bare CRIU with the source kept stopped until the restore succeeded (`criu dump --leave-stopped`, the \
             order phaul follows) and by bare CRIU (the dump kills the source). Generated by `phaul-bench --compare \
             handover`; see `bench/README.md`."
        }
    }
}

fn definitions(suite: Suite) -> Vec<&'static str> {
    let common = [
        "**heartbeat gap A→B**: the workload appends a line `ADDR BEAT UNIX_MS` every 20 ms (`phaul-workload \
         --heartbeat`; ADDR names the host it runs on); the gap is the wall-clock time between its last line from A \
         and its first from B. The same definition for every method, seen from inside the workload: it exceeds the \
         time the workload ran nowhere by 0–40 ms (20 ms on average), the beat period on each side.",
        "**phaul's reported downtime_ms**: phaul's own figure. Now: from just before the final dump's freeze until \
         the destination's `Committed` arrived at the source (the restored copy runs from when the destination got \
         `Commit`). Before the commit protocol it was CRIU's frozen time.",
        "**CRIU frozen_time, raw**: CRIU's figure from the source's `stats-dump` (for phaul: from the freeze until \
         CRIU killed the source, after the destination confirmed; it includes tearing down the source's memory).",
        "**page transfer rate**: memory pages written ÷ CRIU's `memwrite_time` (the time CRIU spent writing pages into \
         its connection; with TLS that is the socketpair to phaul's relay, which back-pressures). Raw copy: bytes ÷ \
         wall time.",
        "**CPU per GiB moved**: `utime + stime` of the `phaul migrate` / `phaul serve` process itself (sampled from \
         /proc every 10 ms and read once more after its exit, before it is reaped; the TLS relay threads are in it) \
         per GiB crossing the memory channel (pages + other images); the CPU of the CRIU processes each one reaped \
         is shown apart.",
        "**total time, wall**: from the start (before the connections or `phaul serve`) until both phaul processes \
         exited; **start → phaul migrate exited**: until the source exited (`phaul serve --listen --once` polls its \
         listener every 100 ms before exiting).",
    ];
    let mut d: Vec<&'static str> = match suite {
        Suite::Tls => vec![
            "**downtime (the target)**: phaul's reported `downtime_ms`, the same definition for both variants: both \
             are the working tree's phaul; only the transport differs.",
            "**plaintext**: `Lab::migrate`: the harness connects three TCP connections across the veth and hands them \
             in (`--fdrpc/--fdmem/--fdfs`); CRIU's page server splices straight from that socket. **own TLS**: phaul \
             connects and authenticates itself; each connection is a socketpair to a relay thread carrying it through \
             a TLS session, both ways (CRIU writes into the socketpair).",
        ],
        Suite::Handover => vec![
            "**downtime, comparable**: as in the main benchmark. phaul (now and before): CRIU's `frozen_time` of the \
             final dump, from the freeze until CRIU killed the source after the destination confirmed; it spans the \
             restore on B, and now the commit round trip too. Bare CRIU: the dump's `frozen_time` plus the wall time \
             from the source's end (killed by the dump, polled every 1 ms; source kept: the dump's exit) until `criu \
             restore` returned.",
            "**commit round trip**: phaul now's `handover.commit_rtt_ms`, from `Commit` sent until `Committed` \
             arrived (it includes the destination journaling and letting its held copy run). **freeze → Commit \
             sent**: `handover.commit_sent_ms`.",
            "**phaul before**: the baseline build run over handed-in descriptors like phaul now (its command line: no \
             `--state-dir`/`--rpid-dir`; `--dst-rpid PATH`), with the plugin libraries built with it.",
        ],
    };
    d.extend(common);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(method: Method, size: u64, rep: u32, net: Option<&str>, vals: &[(&str, f64)]) -> Sample {
        let mut s = Sample::new(method, size, rep, 0);
        s.network = net.map(str::to_string);
        for (k, v) in vals {
            s.set(k, *v);
        }
        s
    }

    fn cfg(suite: Suite, methods: Vec<Method>, networks: Vec<String>) -> CompareRunConfig {
        CompareRunConfig {
            suite,
            sizes_mib: vec![64, 256],
            methods,
            networks,
            tbf: (suite == Suite::Tls).then(Tbf::two_gbit),
            reps: 3,
            quick: false,
            order: String::new(),
        }
    }

    fn build(c: CompareRunConfig, samples: &[Sample]) -> CompareReport {
        let env = Environment::capture(std::path::Path::new("/bin/true"));
        let phaul = BuildInfo { dir: "/x".into(), commit: None, dialect: "Current".into() };
        CompareReport::build(c, env, "none".into(), "none".into(), phaul, None, Vec::new(), Vec::new(), samples)
    }

    #[test]
    fn tls_targets_apply_when_throttled_at_their_sizes() {
        let mut samples = Vec::new();
        for net in ["tbf 2gbit", UNTHROTTLED] {
            for size in [64, 256] {
                for rep in 0..3 {
                    let x = f64::from(rep);
                    samples.push(sample(
                        Method::Phaul,
                        size,
                        rep,
                        Some(net),
                        &[(metric::PHAUL_DOWNTIME_MS, 100.0 + x)],
                    ));
                    samples.push(sample(
                        Method::PhaulTls,
                        size,
                        rep,
                        Some(net),
                        &[(metric::PHAUL_DOWNTIME_MS, 120.0 + x), (metric::RATE_MIB_S, 200.0)],
                    ));
                }
            }
        }
        let r = build(
            cfg(Suite::Tls, vec![Method::Phaul, Method::PhaulTls], vec!["tbf 2gbit".into(), UNTHROTTLED.into()]),
            &samples,
        );
        let find = |net: &str, size: u64| {
            r.verdicts
                .iter()
                .find(|v| v.what.starts_with("downtime") && v.network.as_deref() == Some(net) && v.size_mib == size)
                .cloned()
                .expect("row")
        };
        let t = find("tbf 2gbit", 256);
        assert_eq!(t.value.map(|v| (v * 1000.0).round()), Some(1198.0));
        assert_eq!(t.result, "MISS");
        assert_eq!(find("tbf 2gbit", 64).result, "info");
        assert_eq!(find(UNTHROTTLED, 256).result, "info");
        let bucket = r
            .verdicts
            .iter()
            .find(|v| v.what.starts_with("TLS rate ÷") && v.size_mib == 256)
            .expect("the token bucket row");
        assert_eq!(bucket.value.map(|v| (v * 1000.0).round()), Some(839.0), "200 MiB/s of 238.4");
        let cost = |unit: &str| {
            r.verdicts
                .iter()
                .find(|v| {
                    v.what == format!("TLS relay cost: downtime (phaul's downtime_ms), difference ({unit})")
                        && v.network.as_deref() == Some("tbf 2gbit")
                        && v.size_mib == 256
                })
                .cloned()
                .expect("a cost row")
        };
        assert_eq!((cost("ms").value, cost("ms").result), (Some(20.0), "info"));
        assert_eq!(cost("%").value.map(|v| (v * 10.0).round()), Some(198.0), "20 ms of 101");
        let md = r.markdown();
        assert!(md.contains("### tbf 2gbit, 256 MiB"), "{md}");
        assert!(md.contains("**MISS**"), "{md}");
    }

    #[test]
    fn the_commit_cost_is_judged_against_its_round_trip() {
        let mut samples = Vec::new();
        for rep in 0..3 {
            let x = f64::from(rep);
            samples.push(sample(
                Method::Phaul,
                256,
                rep,
                None,
                &[(metric::DOWNTIME_MS, 501.0 + x), (metric::COMMIT_RTT_MS, 2.0), (metric::HEARTBEAT_GAP_MS, 530.0)],
            ));
            samples.push(sample(
                Method::PhaulBaseline,
                256,
                rep,
                None,
                &[(metric::DOWNTIME_MS, 500.0 + x), (metric::HEARTBEAT_GAP_MS, 520.0)],
            ));
            samples.push(sample(
                Method::CriuKeepSource,
                256,
                rep,
                None,
                &[(metric::DOWNTIME_MS, 600.0), (metric::HEARTBEAT_GAP_MS, 525.0)],
            ));
        }
        let methods = vec![Method::Phaul, Method::PhaulBaseline, Method::CriuKeepSource, Method::Criu];
        let r = build(cfg(Suite::Handover, methods, vec![UNTHROTTLED.into()]), &samples);
        let find =
            |prefix: &str| r.verdicts.iter().find(|v| v.what.starts_with(prefix) && v.size_mib == 256).expect(prefix);
        let cost = find("commit's cost: phaul now − before, comparable");
        assert_eq!((cost.value, cost.limit, cost.result), (Some(1.0), Some(2.0), "PASS"));
        assert_eq!(find("commit's cost: phaul now − before, heartbeat").result, "MISS");
        assert_eq!(find("downtime: phaul now ÷ bare CRIU with the source kept (comparable").result, "PASS");
        assert_eq!(find("downtime: phaul now ÷ bare CRIU with the source kept (heartbeat").result, "MISS");
        assert_eq!(
            r.verdicts.iter().find(|v| v.size_mib == 64 && v.what.starts_with("commit's")).expect("64").result,
            "n/a"
        );
    }
}
