//! When to stop pre-copy rounds.
//!
//! Two policies:
//! - [`Policy::Downtime`] (the default), as QEMU does it: from each round's measured transfer rate and the
//!   workload's dirty rate, predict how long the final dump would keep the workload frozen; stop as soon as the
//!   prediction is under the target. When the workload dirties memory as fast as the channel carries it, or the
//!   rounds stop shrinking, pre-copy cannot converge: stop and let `--on-no-converge` decide.
//! - [`Policy::Phaul`]: P.Haul's rules (at most 8 rounds; stop when a round writes at most 64 pages; stop when the
//!   pages written grow by more than 10 % from one round to the next).

use serde::Serialize;

/// What one finished pre-dump round measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundSample {
    pub pages_written: u64,
    /// Wall time of the round: freezing, dumping and sending its pages.
    pub duration_s: f64,
    /// Time from the start of the previous round to the start of this one (the window in which this round's
    /// pages were dirtied); for the first round, its own duration.
    pub interval_s: f64,
    /// What the final filesystem round is expected to add to the frozen time, from the filesystem round that
    /// followed this one (what its driver says is left, at the rate that round moved); 0 when unknown.
    pub fs_final_ms: f64,
}

/// Why pre-copy stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// The predicted downtime is under `--max-downtime`.
    Converged,
    /// P.Haul: the last round wrote few enough pages.
    SmallEnough,
    /// P.Haul: the pages written grew from one round to the next.
    Growing,
    /// The round limit was reached.
    MaxRounds,
    /// The workload dirties memory at least as fast as the channel carries it.
    DirtyFasterThanChannel,
    /// The rounds stopped shrinking.
    NoProgress,
    /// `--post-copy-after N` rounds.
    PostCopyAfter,
}

impl StopReason {
    /// Whether this is a failure to converge (then `--on-no-converge` applies).
    pub fn is_non_convergence(self) -> bool {
        matches!(self, StopReason::DirtyFasterThanChannel | StopReason::NoProgress | StopReason::MaxRounds)
    }

    pub fn describe(self) -> &'static str {
        match self {
            StopReason::Converged => "the predicted downtime is under --max-downtime",
            StopReason::SmallEnough => "the last round wrote few enough pages",
            StopReason::Growing => "the pages written grew from one round to the next",
            StopReason::MaxRounds => "reached the round limit without converging",
            StopReason::DirtyFasterThanChannel => "the workload dirties memory as fast as the channel carries it",
            StopReason::NoProgress => "the rounds stopped shrinking",
            StopReason::PostCopyAfter => "--post-copy-after rounds were done",
        }
    }
}

/// What to do when pre-copy does not converge (`--on-no-converge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnNoConverge {
    /// Dump what is left while frozen, accepting the longer downtime.
    StopAndCopy,
    /// Move the rest lazily after the workload runs on the destination (needs `--allow-post-copy`).
    PostCopy,
    /// Give up; the workload keeps running on the source.
    Abort,
}

/// The convergence policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    Downtime {
        max_downtime_ms: f64,
        max_rounds: u32,
        /// Rounds in a row that shrink by less than 10 % before pre-copy is declared stuck.
        stall_rounds: u32,
    },
    Phaul {
        max_rounds: u32,
        small_enough_pages: u64,
        max_growth_percent: u64,
    },
}

impl Policy {
    /// QEMU's default target downtime.
    pub fn default_downtime() -> Policy {
        Policy::Downtime { max_downtime_ms: 300.0, max_rounds: 16, stall_rounds: 3 }
    }

    /// P.Haul's constants.
    pub fn phaul() -> Policy {
        Policy::Phaul { max_rounds: 8, small_enough_pages: 64, max_growth_percent: 10 }
    }
}

/// Rates derived from a round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Bytes per second the round moved.
    pub transfer_bytes_s: f64,
    /// Bytes per second the workload dirtied (pages of this round over the window they were dirtied in).
    pub dirty_bytes_s: f64,
    /// The frozen time a final dump right after this round would take: what the workload will have dirtied by
    /// then, sent at the measured rate.
    pub predicted_downtime_ms: f64,
}

/// Rates of the last round of `rounds`.
///
/// The channel's rate is the best any round reached (the first, which copies all memory, usually shows it; a
/// round of a few pages measures only CRIU's fixed cost). The prediction for a final dump right after the last
/// round is that round's fixed cost (its time beyond moving its pages at the channel's rate: freezing, the
/// parasite, metadata) plus moving what the workload will have dirtied by then.
pub fn rates(rounds: &[RoundSample], page_size: u64) -> Rates {
    let Some(last) = rounds.last() else { return Rates::default() };
    let bytes_of = |r: &RoundSample| (r.pages_written * page_size) as f64;
    let bytes = bytes_of(last);
    let transfer =
        rounds.iter().filter(|r| r.duration_s > 0.0).map(|r| bytes_of(r) / r.duration_s).fold(0.0_f64, f64::max);
    // The first round copies all memory, not what was dirtied: it says nothing about the dirty rate.
    let dirty = if rounds.len() >= 2 && last.interval_s > 0.0 { bytes / last.interval_s } else { 0.0 };
    if transfer <= 0.0 {
        return Rates { transfer_bytes_s: 0.0, dirty_bytes_s: dirty, predicted_downtime_ms: f64::INFINITY };
    }
    let fixed_s = (last.duration_s - bytes / transfer).max(0.0);
    // By the final dump the workload will have dirtied about dirty × (the last round's duration).
    let expected = if rounds.len() >= 2 { dirty * last.duration_s } else { bytes };
    // The final filesystem round runs while frozen too.
    let predicted = (fixed_s + expected / transfer) * 1000.0 + last.fs_final_ms.max(0.0);
    Rates { transfer_bytes_s: transfer, dirty_bytes_s: dirty, predicted_downtime_ms: predicted }
}

/// Given every pre-dump round so far, whether to stop and why.
pub fn should_stop(policy: &Policy, rounds: &[RoundSample], page_size: u64) -> Option<StopReason> {
    let last = rounds.last()?;
    let n = rounds.len() as u32;
    match *policy {
        Policy::Phaul { max_rounds, small_enough_pages, max_growth_percent } => {
            if last.pages_written <= small_enough_pages {
                return Some(StopReason::SmallEnough);
            }
            // The growth rule compares two pre-dump rounds; the first round, which copies all memory, is never
            // compared with "nothing" (go-criu's port did that and always stopped after one round).
            if rounds.len() >= 2 {
                let prev = rounds[rounds.len() - 2].pages_written;
                if last.pages_written * 100 > prev * (100 + max_growth_percent) {
                    return Some(StopReason::Growing);
                }
            }
            (n >= max_rounds).then_some(StopReason::MaxRounds)
        }
        Policy::Downtime { max_downtime_ms, max_rounds, stall_rounds } => {
            let r = rates(rounds, page_size);
            if rounds.len() >= 2 && r.predicted_downtime_ms <= max_downtime_ms {
                return Some(StopReason::Converged);
            }
            if rounds.len() >= 2 && r.dirty_bytes_s >= r.transfer_bytes_s && r.transfer_bytes_s > 0.0 {
                return Some(StopReason::DirtyFasterThanChannel);
            }
            let stall = stall_rounds as usize;
            if stall > 0 && rounds.len() > stall {
                let tail = &rounds[rounds.len() - stall - 1..];
                if tail.windows(2).all(|w| w[1].pages_written * 10 >= w[0].pages_written * 9) {
                    return Some(StopReason::NoProgress);
                }
            }
            (n >= max_rounds).then_some(StopReason::MaxRounds)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    #[test]
    fn what_the_filesystem_has_left_counts_in_the_predicted_downtime() {
        let policy = Policy::Downtime { max_downtime_ms: 300.0, max_rounds: 8, stall_rounds: 3 };
        let quiet = |fs_final_ms| {
            vec![
                RoundSample { pages_written: 65536, duration_s: 1.0, interval_s: 1.0, fs_final_ms: 0.0 },
                RoundSample { pages_written: 30, duration_s: 0.05, interval_s: 1.0, fs_final_ms },
            ]
        };
        // Memory alone converges; a final filesystem round of 2 s does not fit under 300 ms.
        assert_eq!(should_stop(&policy, &quiet(0.0), 4096), Some(StopReason::Converged));
        assert!(rates(&quiet(2000.0), 4096).predicted_downtime_ms >= 2000.0);
        assert_ne!(should_stop(&policy, &quiet(2000.0), 4096), Some(StopReason::Converged));
    }

    fn r(pages: u64) -> RoundSample {
        RoundSample { pages_written: pages, duration_s: 1.0, interval_s: 1.0, fs_final_ms: 0.0 }
    }

    #[test]
    fn phaul_first_round_alone_never_counts_as_growth() {
        assert_eq!(should_stop(&Policy::phaul(), &[r(65536)], PAGE), None);
    }

    #[test]
    fn phaul_stops_for_each_reason() {
        let p = Policy::phaul();
        assert_eq!(should_stop(&p, &[r(65536), r(64)], PAGE), Some(StopReason::SmallEnough));
        assert_eq!(should_stop(&p, &[r(65536), r(1000), r(1101)], PAGE), Some(StopReason::Growing));
        assert_eq!(should_stop(&p, &[r(65536), r(1000), r(1100)], PAGE), None);
        let eight: Vec<_> = (0..8).map(|i| r(10_000 - i)).collect();
        assert_eq!(should_stop(&p, &eight, PAGE), Some(StopReason::MaxRounds));
    }

    #[test]
    fn downtime_converges_when_little_is_dirtied() {
        // 256 MiB in 1 s, then 30 pages dirtied in 1 s: the final dump would take well under a millisecond.
        let rounds = [
            RoundSample { pages_written: 65536, duration_s: 1.0, interval_s: 1.0, fs_final_ms: 0.0 },
            RoundSample { pages_written: 30, duration_s: 0.05, interval_s: 1.0, fs_final_ms: 0.0 },
        ];
        assert_eq!(should_stop(&Policy::default_downtime(), &rounds, PAGE), Some(StopReason::Converged));
        let rt = rates(&rounds, PAGE);
        assert!(rt.predicted_downtime_ms < 300.0, "{rt:?}");
    }

    #[test]
    fn downtime_detects_dirtying_faster_than_the_channel() {
        // Every round rewrites all 64 MiB and the channel needs longer than the window to carry it.
        let rounds = [
            RoundSample { pages_written: 16384, duration_s: 1.0, interval_s: 1.0, fs_final_ms: 0.0 },
            RoundSample { pages_written: 16384, duration_s: 1.2, interval_s: 1.0, fs_final_ms: 0.0 },
        ];
        assert_eq!(should_stop(&Policy::default_downtime(), &rounds, PAGE), Some(StopReason::DirtyFasterThanChannel));
        assert!(StopReason::DirtyFasterThanChannel.is_non_convergence());
    }

    #[test]
    fn the_prediction_counts_criu_s_fixed_cost() {
        // Round 2 moved 12 pages in 188 ms: almost all of it is fixed cost, and a final dump will pay it again.
        let rounds = [
            RoundSample { pages_written: 65587, duration_s: 1.806, interval_s: 1.806, fs_final_ms: 0.0 },
            RoundSample { pages_written: 12, duration_s: 0.188, interval_s: 1.9, fs_final_ms: 0.0 },
        ];
        let p = rates(&rounds, PAGE).predicted_downtime_ms;
        assert!((180.0..200.0).contains(&p), "{p}");
    }

    #[test]
    fn downtime_detects_no_progress() {
        let p = Policy::Downtime { max_downtime_ms: 0.001, max_rounds: 16, stall_rounds: 3 };
        let rounds: Vec<_> = [9000u64, 8800, 8700, 8650]
            .iter()
            .map(|&pg| RoundSample { pages_written: pg, duration_s: 0.1, interval_s: 1.0, fs_final_ms: 0.0 })
            .collect();
        assert_eq!(should_stop(&p, &rounds[..3], PAGE), None);
        assert_eq!(should_stop(&p, &rounds, PAGE), Some(StopReason::NoProgress));
    }

    #[test]
    fn downtime_keeps_going_while_rounds_shrink() {
        let p = Policy::Downtime { max_downtime_ms: 0.001, max_rounds: 16, stall_rounds: 3 };
        let rounds: Vec<_> = [60000u64, 20000, 8000, 3000]
            .iter()
            .map(|&pg| RoundSample { pages_written: pg, duration_s: 0.1, interval_s: 1.0, fs_final_ms: 0.0 })
            .collect();
        assert_eq!(should_stop(&p, &rounds, PAGE), None);
    }
}
