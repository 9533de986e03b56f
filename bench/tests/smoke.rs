//! Keeps the benchmark from rotting: `phaul-bench --quick` (one 16 MiB workload, each method once) must run end to
//! end and write its table, JSON and plots, with numbers in them. No timing is asserted, ever.
//!
//! Like the testbed's end-to-end tests it needs root, CRIU (scripts/setup) and the workspace's binaries:
//! `cargo build --workspace && cargo test -p phaul-bench`.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

#[test]
fn quick_run_writes_a_table_json_and_plots() {
    let out = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_phaul-bench"));
    cmd.arg("--quick").arg("--out").arg(out.path());
    let run = phaul_testbed::run_collect(cmd, Duration::from_secs(600), "phaul-bench --quick").expect("it runs");
    assert!(run.status.success(), "phaul-bench --quick failed:\n{}\n{}", run.stdout, run.stderr);

    let md = std::fs::read_to_string(out.path().join("results.md")).expect("results.md");
    let row = md.lines().find(|l| l.starts_with("| total time, wall (ms) |")).unwrap_or_else(|| panic!("{md}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
    // The label, then median/min/max for phaul, bare CRIU and the raw copy: all measured.
    assert_eq!(cells.len(), 10, "{row}");
    for c in &cells[1..] {
        assert!(c.parse::<f64>().is_ok_and(|v| v > 0.0), "not a positive number: {c:?} in {row}");
    }
    assert!(md.contains("| downtime: phaul ÷ bare CRIU"), "{md}");

    let text = std::fs::read_to_string(out.path().join("results.json")).expect("results.json");
    let doc: Value = serde_json::from_str(&text).expect("valid JSON");
    let samples = doc["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), 3, "{text}");
    for s in samples {
        assert!(s["error"].is_null(), "a run failed: {s}");
        assert!(s["metrics"]["total_ms"].as_f64().is_some_and(|v| v > 0.0), "{s}");
        assert!(s["metrics"]["pages_mib"].as_f64().is_some_and(|v| v >= 16.0), "{s}");
    }
    let phaul = samples.iter().find(|s| s["method"] == "phaul").expect("a phaul sample");
    for k in ["downtime_ms", "phaul_src_peak_rss_mib", "phaul_dst_peak_rss_mib", "rate_mib_s"] {
        assert!(phaul["metrics"][k].as_f64().is_some_and(|v| v > 0.0), "phaul sample lacks {k}: {phaul}");
    }
    assert!(!doc["report"]["targets"].as_array().expect("targets").is_empty());

    for png in ["downtime.png", "total.png", "rate.png"] {
        let bytes = std::fs::read(out.path().join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(bytes.starts_with(PNG_MAGIC) && bytes.len() > 5_000, "{png} is not a plausible PNG");
    }
}

/// Runs `phaul-bench --compare SUITE --quick` (16 MiB, once per variant) into a fresh directory; returns the JSON
/// document and the markdown.
fn quick_compare(suite: &str, extra: &[&str]) -> (Value, String) {
    let out = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_phaul-bench"));
    cmd.args(["--compare", suite, "--quick", "--out"]).arg(out.path()).args(extra);
    let what = format!("phaul-bench --compare {suite} --quick");
    let run = phaul_testbed::run_collect(cmd, Duration::from_secs(600), &what).expect("it runs");
    assert!(run.status.success(), "{what} failed:\n{}\n{}", run.stdout, run.stderr);
    let md = std::fs::read_to_string(out.path().join("results.md")).expect("results.md");
    let text = std::fs::read_to_string(out.path().join("results.json")).expect("results.json");
    let doc: Value = serde_json::from_str(&text).expect("valid JSON");
    for s in doc["samples"].as_array().expect("samples") {
        assert!(s["error"].is_null(), "a run failed: {s}");
        assert!(s["metrics"]["total_ms"].as_f64().is_some_and(|v| v > 0.0), "{s}");
    }
    (doc, md)
}

fn phaul_samples<'a>(doc: &'a Value, method: &str) -> Vec<&'a Value> {
    doc["samples"].as_array().expect("samples").iter().filter(|s| s["method"] == method).collect()
}

#[test]
fn quick_tls_comparison_measures_both_transports_under_both_conditions() {
    let (doc, md) = quick_compare("tls", &[]);
    let samples = doc["samples"].as_array().expect("samples");
    // phaul, phaul over its own TLS and the raw copy, throttled and not.
    assert_eq!(samples.len(), 6, "{doc}");
    for method in ["phaul", "phaul-tls"] {
        let runs = phaul_samples(&doc, method);
        let mut nets: Vec<&str> = runs.iter().filter_map(|s| s["network"].as_str()).collect();
        nets.sort_unstable();
        assert_eq!(nets, ["tbf 2gbit", "unthrottled"], "{method}: {doc}");
        for s in runs {
            for k in
                ["phaul_downtime_ms", "heartbeat_gap_ms", "rate_mib_s", "phaul_src_cpu_ms_per_gib", "commit_rtt_ms"]
            {
                assert!(s["metrics"][k].as_f64().is_some_and(|v| v >= 0.0), "{method} lacks {k}: {s}");
            }
        }
    }
    assert!(md.contains("| downtime (phaul's downtime_ms): TLS ÷ plaintext | tbf 2gbit | 16 |"), "{md}");
    assert!(md.contains("### unthrottled, 16 MiB"), "{md}");
    // The throttle was in place (its statistics were read) and is gone with the hosts.
    assert!(doc["report"]["qdisc_stats"][0].as_str().is_some_and(|q| q.contains("tbf")), "{doc}");
}

#[test]
fn quick_handover_comparison_writes_its_table() {
    // With PHAUL_BENCH_BASELINE=DIR (a build of 859f623's target/release) the baseline runs too.
    let baseline = std::env::var("PHAUL_BENCH_BASELINE").ok().filter(|b| !b.is_empty());
    let extra: Vec<&str> = baseline.as_deref().map(|b| vec!["--baseline-phaul", b]).unwrap_or_default();
    let (doc, md) = quick_compare("handover", &extra);
    let n = if baseline.is_some() { 4 } else { 3 };
    assert_eq!(doc["samples"].as_array().expect("samples").len(), n, "{doc}");
    for method in ["phaul", "criu-keep-source", "criu"] {
        let runs = phaul_samples(&doc, method);
        assert_eq!(runs.len(), 1, "{method}: {doc}");
        for k in ["downtime_ms", "heartbeat_gap_ms"] {
            assert!(runs[0]["metrics"][k].as_f64().is_some_and(|v| v > 0.0), "{method} lacks {k}: {}", runs[0]);
        }
    }
    assert!(phaul_samples(&doc, "phaul")[0]["metrics"]["commit_rtt_ms"].as_f64().is_some(), "{doc}");
    assert!(md.contains("| commit's cost: phaul now − before"), "{md}");
}

#[test]
fn quick_fs_rsync_comparison_measures_the_frozen_round_and_the_full_copy() {
    quick_fs("rsync");
}

#[test]
fn quick_fs_zfs_comparison_measures_the_frozen_round_and_the_full_copy_and_plots_them() {
    quick_fs("zfs");
}

fn quick_fs(driver: &str) {
    let out = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_phaul-bench"));
    cmd.args(["--fs", driver, "--quick", "--out"]).arg(out.path());
    let what = format!("phaul-bench --fs {driver} --quick");
    let run = phaul_testbed::run_collect(cmd, Duration::from_secs(600), &what).expect("runs");
    assert!(run.status.success(), "{what} failed:\n{}\n{}", run.stdout, run.stderr);
    let text = std::fs::read_to_string(out.path().join("results.json")).expect("results.json");
    let doc: Value = serde_json::from_str(&text).expect("valid JSON");
    let p = &doc["phaul"][0];
    assert!(p["final_round_ms"].as_f64().is_some_and(|v| v > 0.0), "{doc}");
    assert!(p["live_rounds"].as_u64().is_some_and(|n| n >= 1), "{doc}");
    assert!(doc["bare"][0]["full_ms"].as_f64().is_some_and(|v| v > 0.0), "{doc}");
    assert!(doc["ratio_final_to_full"].as_f64().is_some(), "{doc}");
    let md = std::fs::read_to_string(out.path().join("results.md")).expect("results.md");
    assert!(md.contains(&format!("| {driver}-full |")), "{md}");
    let png = std::fs::read(out.path().join("frozen-round.png")).expect("frozen-round.png");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "frozen-round.png is not a chart");
}
