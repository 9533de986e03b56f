//! `phaul-bench`: phaul against bare CRIU and a raw TCP copy. Run as root after `scripts/setup` and a release
//! build (or simply `bench/run`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use phaul_bench::compare::{self, CompareConfig, Suite};
use phaul_bench::fs_rounds::{self, FsConfig};
use phaul_bench::sample::Method;
use phaul_bench::throttle::Tbf;
use phaul_bench::{default_out_dir, run, Config};

#[derive(Debug, Parser)]
#[command(
    name = "phaul-bench",
    about = "Migrate the same memory workload between two network-namespace hosts with phaul, with bare CRIU, and \
             copy as many bytes raw over TCP; write a markdown table, JSON and PNG plots"
)]
struct Cli {
    /// Workload sizes in MiB, comma-separated [default: 64,256,1024; with --compare: 256,1024].
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<u64>>,
    /// Repetitions of each method at each size.
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Smoke mode: 16 MiB, one repetition, results in a temporary directory unless --out is given.
    #[arg(long)]
    quick: bool,
    /// Also run bare CRIU with the source kept stopped until the restore succeeded (the order phaul follows), for
    /// context.
    #[arg(long, conflicts_with = "compare")]
    with_kept_source: bool,
    /// Instead of the main benchmark, a side-by-side comparison: `tls` (phaul's own TLS connections against
    /// handed-in plaintext descriptors, throttled and unthrottled) or `handover` (phaul now against phaul before the
    /// handover commit, bare CRIU with the source kept, and bare CRIU).
    #[arg(long, value_enum)]
    compare: Option<Suite>,
    /// --compare handover: the `target/release` of a build of phaul before the handover commit (859f623); its
    /// own plugin libraries are used with it.
    #[arg(long, value_name = "DIR", requires = "compare")]
    baseline_phaul: Option<PathBuf>,
    /// --compare tls: the throttled condition's rate (tc tbf, on both veth ends).
    #[arg(long, value_name = "RATE", default_value = "2gbit", requires = "compare")]
    throttle_rate: String,
    /// --compare tls: the token bucket's size (tc's units: kb = KiB).
    #[arg(long, value_name = "SIZE", default_value = "256kb", requires = "compare")]
    throttle_burst: String,
    /// --compare tls: the longest a packet may queue in the bucket (sets the queue length).
    #[arg(long, value_name = "TIME", default_value = "10ms", requires = "compare")]
    throttle_latency: String,
    /// Instead of the main benchmark, a filesystem driver's frozen round against a full copy of the tree by the
    /// same tool (`rsync`, `btrfs` or `zfs`); results in bench/results/fs-DRIVER.
    #[arg(long, value_name = "DRIVER", conflicts_with = "compare", value_parser = ["rsync", "btrfs", "zfs"])]
    fs: Option<String>,
    /// Only draws a bar chart (log scale) into --out from a JSON file: {"title": ..., "bars": [{"label": ...,
    /// "value": MS, "style": "phaul"|"criu"|"raw"}]} (bench/fs-lvm/run uses it for the lab's figures).
    #[arg(long, value_name = "JSON", conflicts_with_all = ["compare", "fs"])]
    bar_chart: Option<PathBuf>,
    /// --fs: the number of files in the tree [default: 10000; --quick: 500].
    #[arg(long, requires = "fs")]
    files: Option<usize>,
    /// --fs: the tree's size in MiB [default: 1024; --quick: 16].
    #[arg(long, requires = "fs")]
    tree_mib: Option<u64>,
    /// Where to write the results [default: bench/results of the workspace; with --compare:
    /// bench/results/tls or bench/results/handover].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// `--bar-chart SPEC --out PNG`.
fn draw_bar_chart(spec: &std::path::Path, png: &std::path::Path) -> Result<(), String> {
    use phaul_bench::plot::{bar_chart, Bar, Style};
    let text = std::fs::read_to_string(spec).map_err(|e| format!("reading {}: {e}", spec.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", spec.display()))?;
    let bars: Vec<Bar> = doc["bars"]
        .as_array()
        .ok_or_else(|| format!("{} has no \"bars\" list", spec.display()))?
        .iter()
        .filter_map(|b| {
            let style = match b["style"].as_str() {
                Some("criu") => Style::Criu,
                Some("raw") => Style::Raw,
                _ => Style::Phaul,
            };
            Some(Bar { label: b["label"].as_str()?.to_string(), value: b["value"].as_f64()?, style })
        })
        .collect();
    bar_chart(png, doc["title"].as_str().unwrap_or(""), "ms", &bars).map_err(|e| e.0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(spec) = &cli.bar_chart {
        let Some(png) = &cli.out else {
            eprintln!("phaul-bench: --bar-chart needs --out FILE.png");
            return ExitCode::from(2);
        };
        return match draw_bar_chart(spec, png) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("phaul-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // In quick mode without --out, the results go to a temporary directory that is kept (and printed).
    let out = match (&cli.out, cli.quick) {
        (Some(o), _) => o.clone(),
        (None, false) => match cli.compare {
            Some(suite) => default_out_dir().join(suite.name()),
            None => default_out_dir(),
        },
        (None, true) => match tempfile::Builder::new().prefix("phaul-bench-quick-").tempdir() {
            Ok(d) => d.keep(),
            Err(e) => {
                eprintln!("phaul-bench: cannot create a temporary directory: {e}");
                return ExitCode::from(2);
            }
        },
    };
    if cli.fs.is_some() {
        let out = match (&cli.out, cli.quick) {
            (None, false) => default_out_dir().join(format!("fs-{}", cli.fs.as_deref().unwrap_or("rsync"))),
            _ => out,
        };
        let cfg = FsConfig {
            driver: cli.fs.clone().unwrap_or_default(),
            files: cli.files.unwrap_or(if cli.quick { 500 } else { 10_000 }),
            total_mib: cli.tree_mib.unwrap_or(if cli.quick { 16 } else { 1024 }),
            reps: if cli.quick { 1 } else { cli.reps },
            out: out.clone(),
        };
        return match fs_rounds::run(&cfg) {
            Ok(md) => {
                print!("{md}");
                eprintln!("phaul-bench: wrote {}", out.join("results.md").display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("phaul-bench: {e}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(suite) = cli.compare {
        let (sizes, reps) = match cli.quick {
            true => (vec![16], 1),
            false => (cli.sizes.unwrap_or_else(|| vec![256, 1024]), cli.reps),
        };
        let tbf = Tbf { rate: cli.throttle_rate, burst: cli.throttle_burst, latency: cli.throttle_latency };
        let cfg = CompareConfig { suite, sizes, reps, out, quick: cli.quick, baseline: cli.baseline_phaul, tbf };
        return match compare::run(&cfg) {
            Ok(outcome) => {
                print!("{}", outcome.report.markdown());
                for f in &outcome.files {
                    eprintln!("phaul-bench: wrote {}", f.display());
                }
                if outcome.report.failures.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    eprintln!("phaul-bench: {} run(s) failed; see the results", outcome.report.failures.len());
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("phaul-bench: {e}");
                ExitCode::from(1)
            }
        };
    }
    let mut methods = Method::MAIN.to_vec();
    if cli.with_kept_source {
        methods.push(Method::CriuKeepSource);
    }
    let cfg = if cli.quick {
        Config { sizes: vec![16], reps: 1, out, quick: true, methods }
    } else {
        Config { sizes: cli.sizes.unwrap_or_else(|| vec![64, 256, 1024]), reps: cli.reps, out, quick: false, methods }
    };
    match run(&cfg) {
        Ok(outcome) => {
            print!("{}", outcome.report.markdown());
            for f in &outcome.files {
                eprintln!("phaul-bench: wrote {}", f.display());
            }
            if outcome.report.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!("phaul-bench: {} run(s) failed; see the results", outcome.report.failures.len());
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("phaul-bench: {e}");
            ExitCode::from(1)
        }
    }
}
