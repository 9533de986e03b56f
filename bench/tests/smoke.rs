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
