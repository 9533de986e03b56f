//! `phaul-bench`: phaul against bare CRIU and a raw TCP copy. Run as root after `scripts/setup` and a release
//! build (or simply `bench/run`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use phaul_bench::sample::Method;
use phaul_bench::{default_out_dir, run, Config};

#[derive(Debug, Parser)]
#[command(
    name = "phaul-bench",
    about = "Migrate the same memory workload between two network-namespace hosts with phaul, with bare CRIU, and \
             copy as many bytes raw over TCP; write a markdown table, JSON and PNG plots"
)]
struct Cli {
    /// Workload sizes in MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    sizes: Vec<u64>,
    /// Repetitions of each method at each size.
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Smoke mode: 16 MiB, one repetition, results in a temporary directory unless --out is given.
    #[arg(long)]
    quick: bool,
    /// Also run bare CRIU with the source kept stopped until the restore succeeded (the order phaul follows), for
    /// context.
    #[arg(long)]
    with_kept_source: bool,
    /// Where to write results.md, results.json and the plots [default: bench/results of the workspace].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // In quick mode without --out, the results go to a temporary directory that is kept (and printed).
    let out = match (&cli.out, cli.quick) {
        (Some(o), _) => o.clone(),
        (None, false) => default_out_dir(),
        (None, true) => match tempfile::Builder::new().prefix("phaul-bench-quick-").tempdir() {
            Ok(d) => d.keep(),
            Err(e) => {
                eprintln!("phaul-bench: cannot create a temporary directory: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let mut methods = Method::MAIN.to_vec();
    if cli.with_kept_source {
        methods.push(Method::CriuKeepSource);
    }
    let cfg = if cli.quick {
        Config { sizes: vec![16], reps: 1, out, quick: true, methods }
    } else {
        Config { sizes: cli.sizes, reps: cli.reps, out, quick: false, methods }
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
