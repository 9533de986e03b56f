//! `memory`: a large buffer of deterministic pseudo-random data whose checksum is re-verified on probes.

use serde_json::{Map, Value};

use crate::hash::{checksum_words, fill_words, hex64, XorShift64, MEMORY_SEED};
use crate::runner::Workload;

const WORDS_PER_MIB: usize = (1 << 20) / std::mem::size_of::<u64>();

/// N MiB of pseudo-random bytes (held as u64 words so hashing is word-at-a-time without unsafe casts).
pub struct Memory {
    size_mib: u64,
    buf: Vec<u64>,
    expected: u64,
    actual: u64,
    /// Pages to dirty per tick, and where the next one is.
    dirty_pages_per_tick: usize,
    cursor: usize,
    /// Grow when frozen: after every pause longer than a few ticks (a checkpoint's freeze), touch new memory worth
    /// twice what is resident, up to a cap; each block keeps the checksum it was filled with.
    grow_on_freeze: bool,
    grow_cap_words: usize,
    grown: Vec<(Vec<u64>, u64)>,
    last_tick: Option<std::time::Instant>,
}

/// u64 words in a 4 KiB page.
const WORDS_PER_PAGE: usize = 4096 / std::mem::size_of::<u64>();

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory").field("size_mib", &self.size_mib).field("expected", &self.expected).finish()
    }
}

impl Memory {
    /// Allocate and fill `size_mib` MiB, touching every page, and record the checksum.
    pub fn new(size_mib: u64) -> Result<Memory, String> {
        let words = usize::try_from(size_mib)
            .ok()
            .and_then(|m| m.checked_mul(WORDS_PER_MIB))
            .ok_or_else(|| format!("{size_mib} MiB does not fit in memory on this platform"))?;
        let mut buf: Vec<u64> = Vec::new();
        buf.try_reserve_exact(words).map_err(|e| format!("cannot allocate {size_mib} MiB: {e}"))?;
        buf.resize(words, 0);
        fill_words(&mut buf, MEMORY_SEED);
        let expected = checksum_words(&buf);
        Ok(Memory {
            size_mib,
            buf,
            expected,
            actual: expected,
            dirty_pages_per_tick: 0,
            cursor: 0,
            grow_on_freeze: false,
            grow_cap_words: 0,
            grown: Vec::new(),
            last_tick: None,
        })
    }

    /// After each freeze (a pause of more than three ticks), touch new memory worth twice the resident size, up to
    /// `cap_mib` MiB in all: a pre-dump round after a freeze then has more new pages to write than the whole round
    /// before it.
    pub fn growing_when_frozen(mut self, cap_mib: u64) -> Memory {
        if cap_mib > 0 {
            self.grow_on_freeze = true;
            self.grow_cap_words = usize::try_from(cap_mib).unwrap_or(usize::MAX).saturating_mul(WORDS_PER_MIB);
        }
        self
    }

    fn resident_words(&self) -> usize {
        self.buf.len() + self.grown.iter().map(|(b, _)| b.len()).sum::<usize>()
    }

    fn grow(&mut self) {
        let have = self.resident_words();
        let add = (have * 2).min(self.grow_cap_words.saturating_sub(have));
        if add == 0 {
            return;
        }
        let mut block = vec![0u64; add];
        let mut rng = XorShift64::new(MEMORY_SEED ^ (self.grown.len() as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for w in block.iter_mut() {
            *w = rng.next();
        }
        let h = checksum_words(&block);
        self.grown.push((block, h));
    }

    /// Dirty `mib_s` MiB per second from now on (one word per page is rewritten with its own value, which marks
    /// the page dirty for the kernel's tracking while keeping the content, and so the checksum, unchanged).
    pub fn dirtying(mut self, mib_s: u64) -> Memory {
        let per_s = mib_s.saturating_mul(256) as f64; // 4 KiB pages per MiB
        self.dirty_pages_per_tick = (per_s * crate::runner::TICK.as_secs_f64()).round() as usize;
        self
    }
}

impl Workload for Memory {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn tick(&mut self) -> Result<(), String> {
        let now = std::time::Instant::now();
        if let Some(prev) = self.last_tick.replace(now) {
            if self.grow_on_freeze && now.duration_since(prev) > crate::runner::TICK * 3 {
                self.grow();
            }
        }
        let pages = self.buf.len() / WORDS_PER_PAGE;
        if pages == 0 {
            return Ok(());
        }
        for _ in 0..self.dirty_pages_per_tick.min(pages) {
            let i = self.cursor * WORDS_PER_PAGE;
            // black_box keeps the store of the unchanged value from being optimised away.
            self.buf[i] = std::hint::black_box(self.buf[i]);
            self.cursor = (self.cursor + 1) % pages;
        }
        Ok(())
    }

    fn check(&mut self) -> Result<(), String> {
        self.actual = checksum_words(&self.buf);
        if let Some(i) = self.grown.iter().position(|(b, h)| checksum_words(b) != *h) {
            return Err(format!("grown block {i} does not match the checksum it was filled with"));
        }
        if self.actual == self.expected {
            Ok(())
        } else {
            Err(format!("memory checksum mismatch: expected {}, actual {}", hex64(self.expected), hex64(self.actual)))
        }
    }

    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("size_mib".into(), Value::from(self.size_mib));
        m.insert("resident_mib".into(), Value::from((self.resident_words() / WORDS_PER_MIB) as u64));
        m.insert("dirty_pages_per_tick".into(), Value::from(self.dirty_pages_per_tick as u64));
        m.insert("expected_checksum".into(), Value::from(hex64(self.expected)));
        m.insert("actual_checksum".into(), Value::from(hex64(self.actual)));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_buffer_checks_ok_and_detects_corruption() {
        let mut m = Memory::new(1).expect("1 MiB");
        assert_eq!(m.buf.len() * 8, 1 << 20);
        assert!(m.check().is_ok());
        m.buf[12345] ^= 0x10;
        let err = m.check().expect_err("corruption must be detected");
        assert!(err.contains("mismatch"), "{err}");
        assert_eq!(m.fields()["size_mib"], 1);
    }

    #[test]
    fn grows_after_a_freeze_and_checks_what_it_grew() {
        let mut m = Memory::new(2).expect("2 MiB").growing_when_frozen(5);
        m.tick().expect("tick");
        m.tick().expect("tick");
        assert_eq!(m.resident_words(), 2 * WORDS_PER_MIB, "no pause, no growth");
        m.last_tick = Some(std::time::Instant::now() - crate::runner::TICK * 4);
        m.tick().expect("tick");
        assert_eq!(m.resident_words(), 5 * WORDS_PER_MIB, "2 MiB + 2 x 2 MiB, capped at 5");
        assert!(m.check().is_ok());
        m.grown[0].0[3] ^= 1;
        assert!(m.check().is_err());
    }

    #[test]
    fn dirtying_keeps_the_checksum() {
        let mut m = Memory::new(2).expect("2 MiB").dirtying(40);
        assert_eq!(m.dirty_pages_per_tick, 512);
        for _ in 0..5 {
            m.tick().expect("tick");
        }
        assert!(m.check().is_ok());
    }
}
