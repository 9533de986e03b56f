//! When to stop pre-copy rounds.

use crate::images::DumpStats;

/// P.Haul's rules: at most 8 rounds; stop when a round writes at most 64 pages; stop when the pages written grow by
/// more than 10 % from one round to the next (the workload dirties memory faster than it is copied).
///
/// The growth rule compares two pre-dump rounds; the first round, which copies all memory, is never compared with
/// "nothing" (go-criu's port made that mistake and always stopped after one round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaulPolicy {
    pub max_rounds: u32,
    pub small_enough_pages: u64,
    pub max_growth_percent: u64,
}

impl Default for PhaulPolicy {
    fn default() -> Self {
        PhaulPolicy { max_rounds: 8, small_enough_pages: 64, max_growth_percent: 10 }
    }
}

/// Why pre-copy stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    MaxRounds,
    SmallEnough,
    Growing,
}

impl PhaulPolicy {
    /// Given the stats of every pre-dump round so far, whether to stop and why.
    pub fn should_stop(&self, rounds: &[DumpStats]) -> Option<StopReason> {
        let last = rounds.last()?;
        if last.pages_written <= self.small_enough_pages {
            return Some(StopReason::SmallEnough);
        }
        if rounds.len() >= 2 {
            let prev = rounds[rounds.len() - 2].pages_written;
            if last.pages_written * 100 > prev * (100 + self.max_growth_percent) {
                return Some(StopReason::Growing);
            }
        }
        if rounds.len() as u32 >= self.max_rounds {
            return Some(StopReason::MaxRounds);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(pages: u64) -> DumpStats {
        DumpStats { pages_written: pages, ..Default::default() }
    }

    #[test]
    fn first_round_alone_never_counts_as_growth() {
        assert_eq!(PhaulPolicy::default().should_stop(&[r(65536)]), None);
    }

    #[test]
    fn stops_for_each_reason() {
        let p = PhaulPolicy::default();
        assert_eq!(p.should_stop(&[r(65536), r(64)]), Some(StopReason::SmallEnough));
        assert_eq!(p.should_stop(&[r(65536), r(1000), r(1101)]), Some(StopReason::Growing));
        assert_eq!(p.should_stop(&[r(65536), r(1000), r(1100)]), None);
        let eight: Vec<_> = (0..8).map(|i| r(10_000 - i)).collect();
        assert_eq!(p.should_stop(&eight), Some(StopReason::MaxRounds));
    }
}
