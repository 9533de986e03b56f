//! The migration report: what `phaul migrate` prints at the end, and emits as JSON with `--json`.

use std::fmt;

use serde::Serialize;

use crate::images::{DumpStats, RestoreStats};

/// One memory round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u32,
    /// `pre-dump` (the workload keeps running) or `dump` (the final one, frozen).
    pub kind: &'static str,
    pub pages_scanned: u64,
    pub pages_written: u64,
    pub pages_skipped_parent: u64,
    pub bytes_written: u64,
    pub duration_ms: f64,
    /// Pages written per second of the round, in MiB/s.
    pub rate_mib_s: f64,
    /// Pre-dump rounds after the first: how fast the workload dirtied memory, in MiB/s.
    pub dirty_rate_mib_s: Option<f64>,
    /// Pre-dump rounds: the frozen time a final dump right after this round was predicted to take.
    pub predicted_downtime_ms: Option<f64>,
}

impl RoundReport {
    pub fn new(round: u32, kind: &'static str, s: &DumpStats, duration_ms: f64, page_size: u64) -> Self {
        let bytes = s.pages_written * page_size;
        let secs = duration_ms / 1000.0;
        RoundReport {
            round,
            kind,
            pages_scanned: s.pages_scanned,
            pages_written: s.pages_written,
            pages_skipped_parent: s.pages_skipped_parent,
            bytes_written: bytes,
            duration_ms,
            rate_mib_s: if secs > 0.0 { bytes as f64 / (1 << 20) as f64 / secs } else { 0.0 },
            dirty_rate_mib_s: None,
            predicted_downtime_ms: None,
        }
    }
}

/// How memory was moved, and why.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryStrategy {
    /// `pre-copy` or `stop-and-copy`.
    pub strategy: &'static str,
    pub reason: String,
    pub stop_reason: Option<String>,
    /// What `--on-no-converge` made phaul do when pre-copy did not converge.
    pub fallback: Option<String>,
}

/// One filesystem round.
#[derive(Debug, Clone, Serialize)]
pub struct FsRoundReport {
    pub round: u32,
    /// Run while the workload was frozen (or stopped, in restart mode).
    pub frozen: bool,
    pub bytes: u64,
    pub files: u64,
    pub duration_ms: f64,
    /// What the driver expected a next round to move (bytes), when it could tell.
    pub remaining_bytes: Option<u64>,
}

/// Bytes per channel.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChannelBytes {
    /// Control messages, both directions.
    pub control: u64,
    /// Memory pages CRIU sent to the destination's page server (from CRIU's stats: pages written × page size).
    pub memory_pages: u64,
    /// Non-page image files and the host type's extra files, sent by phaul on the memory channel.
    pub memory_images: u64,
    /// What the filesystem driver reports it moved.
    pub filesystem: u64,
}

/// How the two copies handed over.
#[derive(Debug, Clone, Serialize)]
pub struct HandoverReport {
    /// `stop-and-copy`, `lazy-restore`, `post-copy` or `hybrid`.
    pub ending: &'static str,
    /// `overlap` (the destination restores while the source's tree is held frozen) or `sequential` (the source's
    /// copy is its image set; its tree ends before the destination restores).
    pub order: &'static str,
    /// Why this order.
    pub order_reason: String,
    /// Whether the source sent `Commit` (the point of no return).
    pub committed: bool,
    /// From the freeze to `Commit` sent.
    pub commit_sent_ms: Option<f64>,
    /// From `Commit` sent to the destination's `Committed` (one round trip plus the resume).
    pub commit_rtt_ms: Option<f64>,
    /// What the destination said when it discarded its copy (if it did).
    pub destination_aborted: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `migrated`; `failed` (the workload runs on the source); `in-doubt` (the source's copy is kept, frozen or as
    /// images, until `phaul resolve`); `lost` (post-copy: the workload ran on the destination and could not be
    /// completed there).
    pub outcome: &'static str,
    pub error: Option<String>,
    /// The session id (`phaul resolve SESSION`).
    pub session: String,
    /// Which copy exists where, in a sentence.
    pub copies: String,
    pub handover: Option<HandoverReport>,
    pub htype: String,
    pub id: String,
    pub fs_driver: String,
    /// What the source's host type says of the workload (`HostType::report`): its container, root filesystem,
    /// console...
    pub htype_details: std::collections::BTreeMap<String, String>,
    pub mode: &'static str,
    pub memory: MemoryStrategy,
    pub source_criu: String,
    pub destination_criu: String,
    pub rounds: Vec<RoundReport>,
    pub fs_rounds: u32,
    /// Each filesystem round: its number, whether it ran frozen, what it moved and how long it took.
    pub fs_round_list: Vec<FsRoundReport>,
    /// What this side's plugins last said of their progress (`HostServices::progress`), one entry per plugin
    /// and thing it does.
    pub plugin_progress: Vec<crate::plugins::services::PluginProgress>,
    pub total_ms: f64,
    /// How long the workload was frozen (CRIU's own measure; it includes the restore on the destination, because
    /// the source stays frozen until the destination confirms).
    pub frozen_ms: Option<f64>,
    /// The frozen time predicted after the last pre-copy round (compare with `frozen_ms`).
    pub predicted_downtime_ms: Option<f64>,
    /// How long the workload did not run anywhere: the frozen time, or in post-copy from the freeze until the
    /// destination's restore.
    pub downtime_ms: Option<f64>,
    /// Restart mode: from the host type's `stop` on the source to its `start` returning on the destination.
    pub outage_ms: Option<f64>,
    /// Post-copy: from the restore on the destination until its last page arrived.
    pub post_copy_ms: Option<f64>,
    /// `--lazy-restore`: the destination restored memory on demand from its own images.
    pub lazy_restore: bool,
    /// With `--lazy-restore`: from the restore until every page was loaded into the workload.
    pub pages_loaded_ms: Option<f64>,
    #[serde(skip)]
    pub freeze_started: Option<std::time::Instant>,
    /// The destination's RESTORE request, as phaul measured it.
    pub restore_ms: Option<f64>,
    /// CRIU's own measure of the restore.
    pub criu_restore_ms: Option<f64>,
    pub restore_stats: Option<RestoreStats>,
    pub channels: ChannelBytes,
    pub source_pid: Option<i32>,
    pub restored_pid: Option<i32>,
    pub source_images: Option<String>,
    pub destination_images: Option<String>,
    pub images_kept: bool,
}

/// `b` bytes as "12.3 MiB".
pub(crate) fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "migration of {} {}: {}", self.htype, self.id, self.outcome)?;
        if let Some(e) = &self.error {
            writeln!(f, "  error:        {e}")?;
        }
        if !self.copies.is_empty() {
            writeln!(f, "  copies:       {}", self.copies)?;
        }
        writeln!(f, "  session:      {}", self.session)?;
        if let Some(h) = &self.handover {
            write!(f, "  handover:     {}, {} ({})", h.ending, h.order, h.order_reason)?;
            if let Some(ms) = h.commit_rtt_ms {
                write!(f, "; commit round trip {ms:.0} ms")?;
            }
            writeln!(f)?;
        }
        writeln!(f, "  memory:       {} ({})", self.memory.strategy, self.memory.reason)?;
        if let Some(s) = &self.memory.stop_reason {
            writeln!(f, "  pre-copy end: {s}")?;
        }
        if let Some(s) = &self.memory.fallback {
            writeln!(f, "  fallback:     {s}")?;
        }
        writeln!(
            f,
            "  filesystem:   {} ({} rounds, {})",
            self.fs_driver,
            self.fs_rounds,
            mib(self.channels.filesystem)
        )?;
        for (k, v) in &self.htype_details {
            writeln!(f, "  {:<13} {v}", format!("{k}:"))?;
        }
        writeln!(f, "  CRIU:         source {}, destination {}", self.source_criu, self.destination_criu)?;
        writeln!(f, "  total time:   {:.0} ms", self.total_ms)?;
        if let Some(v) = self.frozen_ms {
            write!(f, "  frozen time:  {v:.0} ms")?;
            if let Some(p) = self.predicted_downtime_ms {
                write!(f, " (predicted {p:.0} ms)")?;
            }
            writeln!(f)?;
        }
        if let Some(v) = self.downtime_ms {
            writeln!(f, "  downtime:     {v:.0} ms")?;
        }
        if let Some(v) = self.outage_ms {
            writeln!(f, "  outage:       {v:.0} ms (stopped on the source to started on the destination)")?;
        }
        if let Some(v) = self.post_copy_ms {
            writeln!(f, "  post-copy:    last page arrived {v:.0} ms after the restore")?;
        }
        if let Some(v) = self.pages_loaded_ms {
            writeln!(f, "  lazy restore: every page loaded {v:.0} ms after the restore")?;
        }
        if let Some(v) = self.restore_ms {
            write!(f, "  restore time: {v:.0} ms")?;
            if let Some(c) = self.criu_restore_ms {
                write!(f, " (CRIU: {c:.0} ms)")?;
            }
            writeln!(f)?;
        }
        writeln!(f, "  rounds:")?;
        writeln!(
            f,
            "    {:>5}  {:<8}  {:>10}  {:>10}  {:>10}  {:>10}",
            "round", "kind", "written", "skipped", "ms", "MiB/s"
        )?;
        for r in &self.rounds {
            writeln!(
                f,
                "    {:>5}  {:<8}  {:>10}  {:>10}  {:>10.0}  {:>10.1}",
                r.round, r.kind, r.pages_written, r.pages_skipped_parent, r.duration_ms, r.rate_mib_s
            )?;
        }
        for r in &self.fs_round_list {
            writeln!(
                f,
                "    fs {:>2}{}  {} in {} files, {:.0} ms",
                r.round,
                if r.frozen { " (final)" } else { "" },
                mib(r.bytes),
                r.files,
                r.duration_ms
            )?;
        }
        for p in &self.plugin_progress {
            let of = if p.total > 0 { format!(" of {}", p.total) } else { String::new() };
            writeln!(f, "  plugin:       {} {}: {}{of}", p.plugin, p.what, p.done)?;
        }
        writeln!(
            f,
            "  channels:     control {}, memory {} pages + {} images, filesystem {}",
            mib(self.channels.control),
            mib(self.channels.memory_pages),
            mib(self.channels.memory_images),
            mib(self.channels.filesystem)
        )?;
        if let (Some(a), Some(b)) = (self.source_pid, self.restored_pid) {
            writeln!(f, "  pid:          {a} on the source, {b} on the destination")?;
        }
        if self.images_kept {
            if let Some(p) = &self.source_images {
                writeln!(f, "  images kept:  {p} (source)")?;
            }
            if let Some(p) = &self.destination_images {
                writeln!(f, "                {p} (destination)")?;
            }
        }
        Ok(())
    }
}
