//! `memory`: a large buffer of deterministic pseudo-random data whose checksum is re-verified on probes.

use serde_json::{Map, Value};

use crate::hash::{checksum_words, fill_words, hex64, MEMORY_SEED};
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
        Ok(Memory { size_mib, buf, expected, actual: expected, dirty_pages_per_tick: 0, cursor: 0 })
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
        if self.actual == self.expected {
            Ok(())
        } else {
            Err(format!("memory checksum mismatch: expected {}, actual {}", hex64(self.expected), hex64(self.actual)))
        }
    }

    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("size_mib".into(), Value::from(self.size_mib));
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
    fn dirtying_keeps_the_checksum() {
        let mut m = Memory::new(2).expect("2 MiB").dirtying(40);
        assert_eq!(m.dirty_pages_per_tick, 512);
        for _ in 0..5 {
            m.tick().expect("tick");
        }
        assert!(m.check().is_ok());
    }
}
