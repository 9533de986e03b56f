//! One measured migration (or raw copy) and the names of what is measured.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How the workload was moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// `phaul migrate` / `phaul serve`, stop-and-copy, over phaul's three TCP connections.
    Phaul,
    /// Bare CRIU as an operator scripts it: page server, dump into it, copy the other images, restore.
    Criu,
    /// A raw copy of the same number of bytes over a TCP connection between the two hosts.
    Raw,
    /// Optional, for context: bare CRIU with the source kept (`criu dump --leave-stopped`) until the restore on B
    /// succeeded, then killed: the order phaul follows, so the two hosts' memory is held twice meanwhile.
    CriuKeepSource,
    /// `--compare tls`: phaul over its own connections with mutual TLS (`serve --listen`, `migrate --to`).
    PhaulTls,
    /// `--compare handover`: the baseline build of phaul (before the handover commit) over handed-in descriptors.
    PhaulBaseline,
}

impl Method {
    /// The three methods the issue asks for.
    pub const MAIN: [Method; 3] = [Method::Phaul, Method::Criu, Method::Raw];

    /// The name used in tables and plots.
    pub fn label(self) -> &'static str {
        match self {
            Method::Phaul => "phaul",
            Method::Criu => "bare CRIU",
            Method::Raw => "raw TCP copy",
            Method::CriuKeepSource => "bare CRIU, source kept",
            Method::PhaulTls => "phaul, own TLS",
            Method::PhaulBaseline => "phaul before commit",
        }
    }
}

/// The methods in the order of repetition `rep`: the order is rotated from one repetition to the next so that no
/// method always runs first (on a cold cache) or last.
pub fn order_for_rep(methods: &[Method], rep: u32) -> Vec<Method> {
    let mut m = methods.to_vec();
    if !m.is_empty() {
        let k = rep as usize % m.len();
        m.rotate_left(k);
    }
    m
}

/// Names of the metrics (keys of [`Sample::metrics`]).
pub mod metric {
    /// Comparable downtime: from the freeze on A until the workload runs on B (see the README).
    pub const DOWNTIME_MS: &str = "downtime_ms";
    /// CRIU's own `frozen_time` from `stats-dump`.
    pub const CRIU_FROZEN_MS: &str = "criu_frozen_ms";
    /// CRIU's own `freezing_time` (freezing the tree, before `frozen_time` starts).
    pub const CRIU_FREEZING_MS: &str = "criu_freezing_ms";
    /// Wall time of the whole migration as the benchmark measured it.
    pub const TOTAL_MS: &str = "total_ms";
    /// Wall time of the restore step.
    pub const RESTORE_MS: &str = "restore_ms";
    /// CRIU's own `restore_time` from `stats-restore`.
    pub const CRIU_RESTORE_MS: &str = "criu_restore_ms";
    /// Memory pages moved, MiB.
    pub const PAGES_MIB: &str = "pages_mib";
    /// Other image files moved, KiB.
    pub const IMAGES_KIB: &str = "images_kib";
    /// Transfer rate of the memory pages, MiB/s (pages ÷ CRIU's `memwrite_time`; raw copy: bytes ÷ wall time).
    pub const RATE_MIB_S: &str = "rate_mib_s";
    /// Raw copy only, for context: the same copy with B writing the bytes into a file (as a page server does).
    pub const RAW_TO_FILE_RATE_MIB_S: &str = "raw_to_file_rate_mib_s";
    /// CRIU's `memwrite_time`: writing the pages into the connection to the page server.
    pub const CRIU_MEMWRITE_MS: &str = "criu_memwrite_ms";
    /// CRIU's `memdump_time`: draining the pages out of the frozen tree.
    pub const CRIU_MEMDUMP_MS: &str = "criu_memdump_ms";
    /// Bare CRIU only: the dump command's wall time.
    pub const DUMP_WALL_MS: &str = "dump_wall_ms";
    /// Bare CRIU only: copying the non-page images from A to B.
    pub const COPY_MS: &str = "image_copy_ms";
    /// phaul only: `total_ms` of phaul's own report.
    pub const PHAUL_REPORTED_TOTAL_MS: &str = "phaul_reported_total_ms";
    /// phaul only: `downtime_ms` of phaul's own report (current phaul: from just before the final dump's freeze until
    /// the destination's `Committed` arrived; before the commit it was CRIU's frozen time).
    pub const PHAUL_DOWNTIME_MS: &str = "phaul_downtime_ms";
    /// phaul only: the report's `handover.commit_sent_ms` (from the freeze until `Commit` was sent).
    pub const COMMIT_SENT_MS: &str = "commit_sent_ms";
    /// phaul only: the report's `handover.commit_rtt_ms` (from `Commit` sent until `Committed` arrived).
    pub const COMMIT_RTT_MS: &str = "commit_rtt_ms";
    /// phaul only: from the start until `phaul migrate` exited.
    pub const SRC_EXIT_MS: &str = "src_exit_ms";
    /// With a heartbeat in the workload: the wall-clock gap between its last beat on A and its first on B.
    pub const HEARTBEAT_GAP_MS: &str = "heartbeat_gap_ms";
    /// phaul only: the dump round's rate in phaul's report (pages ÷ the whole final dump, restore included).
    pub const PHAUL_ROUND_RATE_MIB_S: &str = "phaul_round_rate_mib_s";
    /// phaul only: peak RSS of `phaul migrate`, MiB.
    pub const SRC_RSS_MIB: &str = "phaul_src_peak_rss_mib";
    /// phaul only: peak RSS of `phaul serve`, MiB.
    pub const DST_RSS_MIB: &str = "phaul_dst_peak_rss_mib";
    /// phaul only: CPU time (user + system) of `phaul migrate` itself, seconds.
    pub const SRC_CPU_S: &str = "phaul_src_cpu_s";
    /// phaul only: CPU time of `phaul serve` itself, seconds.
    pub const DST_CPU_S: &str = "phaul_dst_cpu_s";
    /// phaul only: CPU time of the CRIU processes `phaul migrate` reaped, seconds.
    pub const SRC_CHILDREN_CPU_S: &str = "phaul_src_criu_children_cpu_s";
    /// phaul only: CPU time of the CRIU processes `phaul serve` reaped, seconds.
    pub const DST_CHILDREN_CPU_S: &str = "phaul_dst_criu_children_cpu_s";
    /// phaul only: CPU of `phaul migrate` itself per GiB crossing the memory channel (pages + images), ms/GiB.
    pub const SRC_CPU_MS_PER_GIB: &str = "phaul_src_cpu_ms_per_gib";
    /// phaul only: CPU of `phaul serve` itself per GiB crossing the memory channel, ms/GiB.
    pub const DST_CPU_MS_PER_GIB: &str = "phaul_dst_cpu_ms_per_gib";
    /// phaul only: CPU of the CRIU processes `phaul migrate` reaped per GiB, ms/GiB.
    pub const SRC_CHILDREN_CPU_MS_PER_GIB: &str = "phaul_src_criu_children_cpu_ms_per_gib";
    /// phaul only: CPU of the CRIU processes `phaul serve` reaped per GiB, ms/GiB.
    pub const DST_CHILDREN_CPU_MS_PER_GIB: &str = "phaul_dst_criu_children_cpu_ms_per_gib";
    /// phaul only: `phaul migrate` and the CRIU processes it reaped together, per GiB, ms/GiB.
    pub const SRC_ALL_CPU_MS_PER_GIB: &str = "phaul_src_with_criu_cpu_ms_per_gib";
    /// phaul only: `phaul serve` and the CRIU processes it reaped together, per GiB, ms/GiB.
    pub const DST_ALL_CPU_MS_PER_GIB: &str = "phaul_dst_with_criu_cpu_ms_per_gib";
}

/// How a metric is shown: key, label, decimals.
pub const SHOWN: &[(&str, &str, usize)] = &[
    (metric::DOWNTIME_MS, "downtime, comparable (ms)", 1),
    (metric::PHAUL_DOWNTIME_MS, "phaul's reported downtime_ms (ms)", 1),
    (metric::HEARTBEAT_GAP_MS, "heartbeat gap A→B (ms)", 1),
    (metric::COMMIT_SENT_MS, "freeze → Commit sent (ms)", 1),
    (metric::COMMIT_RTT_MS, "commit round trip (ms)", 2),
    (metric::CRIU_FROZEN_MS, "CRIU frozen_time, raw (ms)", 1),
    (metric::TOTAL_MS, "total time, wall (ms)", 1),
    (metric::RESTORE_MS, "restore, wall (ms)", 1),
    (metric::CRIU_RESTORE_MS, "CRIU restore_time (ms)", 1),
    (metric::PAGES_MIB, "memory pages moved (MiB)", 1),
    (metric::IMAGES_KIB, "other images moved (KiB)", 1),
    (metric::RATE_MIB_S, "page transfer rate (MiB/s)", 0),
    (metric::RAW_TO_FILE_RATE_MIB_S, "(context) raw copy into a file on B (MiB/s)", 0),
    (metric::CRIU_MEMWRITE_MS, "CRIU memwrite_time (ms)", 1),
    (metric::CRIU_MEMDUMP_MS, "CRIU memdump_time (ms)", 1),
    (metric::CRIU_FREEZING_MS, "CRIU freezing_time (ms)", 1),
    (metric::DUMP_WALL_MS, "dump command, wall (ms)", 1),
    (metric::COPY_MS, "image copy, wall (ms)", 1),
    (metric::PHAUL_REPORTED_TOTAL_MS, "phaul's own total_ms (ms)", 1),
    (metric::SRC_EXIT_MS, "start → phaul migrate exited (ms)", 1),
    (metric::PHAUL_ROUND_RATE_MIB_S, "phaul's dump-round rate (MiB/s)", 0),
    (metric::SRC_RSS_MIB, "phaul migrate peak RSS (MiB)", 1),
    (metric::DST_RSS_MIB, "phaul serve peak RSS (MiB)", 1),
    (metric::SRC_CPU_S, "phaul migrate CPU, user+sys (s)", 2),
    (metric::DST_CPU_S, "phaul serve CPU, user+sys (s)", 2),
    (metric::SRC_CHILDREN_CPU_S, "CRIU reaped by phaul migrate, CPU (s)", 2),
    (metric::DST_CHILDREN_CPU_S, "CRIU reaped by phaul serve, CPU (s)", 2),
    (metric::SRC_CPU_MS_PER_GIB, "phaul migrate CPU per GiB moved (ms/GiB)", 1),
    (metric::DST_CPU_MS_PER_GIB, "phaul serve CPU per GiB moved (ms/GiB)", 1),
    (metric::SRC_CHILDREN_CPU_MS_PER_GIB, "CRIU reaped by phaul migrate, CPU per GiB (ms/GiB)", 1),
    (metric::DST_CHILDREN_CPU_MS_PER_GIB, "CRIU reaped by phaul serve, CPU per GiB (ms/GiB)", 1),
    (metric::SRC_ALL_CPU_MS_PER_GIB, "phaul migrate + its CRIU, CPU per GiB (ms/GiB)", 1),
    (metric::DST_ALL_CPU_MS_PER_GIB, "phaul serve + its CRIU, CPU per GiB (ms/GiB)", 1),
];

/// One measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub method: Method,
    pub size_mib: u64,
    /// Repetition number, from 0.
    pub rep: u32,
    /// Position within the repetition's rotated order, from 0.
    pub position: u32,
    /// `--compare tls`: the network condition it ran under (e.g. `2gbit`, `unthrottled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    pub metrics: BTreeMap<String, f64>,
    /// Why the run failed; failed runs are left out of the statistics.
    pub error: Option<String>,
    /// Things worth knowing about this run (e.g. a figure that could not be read).
    pub notes: Vec<String>,
}

impl Sample {
    pub fn new(method: Method, size_mib: u64, rep: u32, position: u32) -> Sample {
        Sample {
            method,
            size_mib,
            rep,
            position,
            network: None,
            metrics: BTreeMap::new(),
            error: None,
            notes: Vec::new(),
        }
    }

    /// Records a metric if the value is a finite number.
    pub fn set(&mut self, key: &str, value: f64) {
        if value.is_finite() {
            self.metrics.insert(key.to_string(), value);
        }
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.metrics.get(key).copied()
    }
}

/// Milliseconds of a duration.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// MiB of a byte count.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_rotates_and_covers_all_methods() {
        let m = Method::MAIN;
        assert_eq!(order_for_rep(&m, 0), [Method::Phaul, Method::Criu, Method::Raw]);
        assert_eq!(order_for_rep(&m, 1), [Method::Criu, Method::Raw, Method::Phaul]);
        assert_eq!(order_for_rep(&m, 2), [Method::Raw, Method::Phaul, Method::Criu]);
        assert_eq!(order_for_rep(&m, 3), order_for_rep(&m, 0));
        for r in 0..3 {
            let mut o = order_for_rep(&m, r);
            o.sort();
            assert_eq!(o, m.to_vec());
        }
        assert!(order_for_rep(&[], 1).is_empty());
    }

    #[test]
    fn non_finite_values_are_not_recorded() {
        let mut s = Sample::new(Method::Raw, 16, 0, 0);
        s.set("x", f64::NAN);
        s.set("y", 1.5);
        assert_eq!(s.get("x"), None);
        assert_eq!(s.get("y"), Some(1.5));
    }
}
