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
    /// Growth after the first checkpoint (see [`Memory::growing_after_checkpoint`]).
    growth: Option<Growth>,
    grown: Vec<(Vec<u64>, u64)>,
}

/// Steady growth that starts once a checkpoint has reset the kernel's soft-dirty bits.
struct Growth {
    sentinel: CheckpointSentinel,
    words_per_tick: usize,
    cap_words: usize,
    started: bool,
}

/// u64 words in a 4 KiB page.
const WORDS_PER_PAGE: usize = 4096 / std::mem::size_of::<u64>();

/// A page this process writes once and never again. The kernel marks a page soft-dirty when it is written; CRIU
/// clears every soft-dirty bit of the process when a dump or pre-dump tracks memory. So once the sentinel reads as
/// present but clean, a checkpoint has happened (even one whose freeze was too short to notice from the tick).
struct CheckpointSentinel {
    /// 256 KiB: above glibc's mmap threshold, so the page shares its mapping (and any huge page) with nothing
    /// else this process writes.
    _backing: Vec<u64>,
    pagemap: std::fs::File,
    offset: u64,
}

/// /proc/PID/pagemap: bit 63 "page present", bit 55 "soft-dirty".
const PM_PRESENT: u64 = 1 << 63;
const PM_SOFT_DIRTY: u64 = 1 << 55;

/// Whether a pagemap entry says: present, and not written since the soft-dirty bits were last cleared.
fn present_and_clean(entry: u64) -> bool {
    entry & PM_PRESENT != 0 && entry & PM_SOFT_DIRTY == 0
}

impl CheckpointSentinel {
    fn new() -> Result<CheckpointSentinel, String> {
        let mut backing = vec![0u64; 64 * WORDS_PER_PAGE];
        fill_words(&mut backing, MEMORY_SEED ^ 0x5e47);
        let addr = backing.as_ptr() as u64;
        let page = addr.div_ceil(4096);
        let pagemap = std::fs::File::open("/proc/self/pagemap")
            .map_err(|e| format!("cannot open /proc/self/pagemap (needed to notice a checkpoint): {e}"))?;
        let sentinel = CheckpointSentinel { _backing: backing, pagemap, offset: page * 8 };
        let entry = sentinel.entry()?;
        if entry & PM_PRESENT == 0 || entry & PM_SOFT_DIRTY == 0 {
            return Err(format!(
                "this kernel does not track soft-dirty pages (pagemap entry {entry:#x} of a freshly written page), \
                 so growing after a checkpoint cannot work here: use a kernel with CONFIG_MEM_SOFT_DIRTY"
            ));
        }
        Ok(sentinel)
    }

    fn entry(&self) -> Result<u64, String> {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 8];
        self.pagemap.read_exact_at(&mut b, self.offset).map_err(|e| format!("cannot read /proc/self/pagemap: {e}"))?;
        Ok(u64::from_ne_bytes(b))
    }

    fn checkpointed(&self) -> Result<bool, String> {
        Ok(present_and_clean(self.entry()?))
    }
}

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
            growth: None,
            grown: Vec::new(),
        })
    }

    /// Once the first checkpoint (a pre-dump) has happened, touch `mib_s` MiB of new memory per second until
    /// `cap_mib` MiB are resident in all. The next round then has more new pages to write than the first round
    /// wrote in all, whatever the speed of the machine (what P.Haul's growth rule is about). Needs a kernel with
    /// soft-dirty tracking, as pre-copy does.
    pub fn growing_after_checkpoint(mut self, mib_s: u64, cap_mib: u64) -> Result<Memory, String> {
        if mib_s == 0 {
            return Ok(self);
        }
        let per_s = usize::try_from(mib_s).unwrap_or(usize::MAX).saturating_mul(WORDS_PER_MIB) as f64;
        self.growth = Some(Growth {
            sentinel: CheckpointSentinel::new()?,
            words_per_tick: ((per_s * crate::runner::TICK.as_secs_f64()) as usize).max(WORDS_PER_PAGE),
            cap_words: usize::try_from(cap_mib).unwrap_or(usize::MAX).saturating_mul(WORDS_PER_MIB),
            started: false,
        });
        Ok(self)
    }

    fn resident_words(&self) -> usize {
        self.buf.len() + self.grown.iter().map(|(b, _)| b.len()).sum::<usize>()
    }

    /// Add up to `words` words of new memory (capped), touching each page once; the block keeps its checksum.
    fn grow(&mut self, words: usize, cap_words: usize) {
        let add = words.min(cap_words.saturating_sub(self.resident_words()));
        if add == 0 {
            return;
        }
        let mut block = vec![0u64; add];
        let mut rng = XorShift64::new(MEMORY_SEED ^ (self.grown.len() as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // One word per page: enough to make every page resident and distinct, and cheap on an emulated CPU.
        for w in block.iter_mut().step_by(WORDS_PER_PAGE) {
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
        if let Some(g) = &mut self.growth {
            if !g.started && g.sentinel.checkpointed()? {
                g.started = true;
            }
            if g.started {
                let (words, cap) = (g.words_per_tick, g.cap_words);
                self.grow(words, cap);
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
        m.insert("growing".into(), Value::from(self.growth.as_ref().is_some_and(|g| g.started)));
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
    fn grown_blocks_are_capped_and_checked() {
        let mut m = Memory::new(2).expect("2 MiB");
        m.grow(2 * WORDS_PER_MIB, 5 * WORDS_PER_MIB);
        m.grow(2 * WORDS_PER_MIB, 5 * WORDS_PER_MIB);
        m.grow(2 * WORDS_PER_MIB, 5 * WORDS_PER_MIB);
        assert_eq!(m.resident_words(), 5 * WORDS_PER_MIB, "2 MiB + 2 + 1, capped at 5");
        assert!(m.check().is_ok());
        m.grown[1].0[3 * WORDS_PER_PAGE] ^= 1;
        assert!(m.check().is_err());
    }

    #[test]
    fn a_clean_present_page_means_a_checkpoint() {
        assert!(present_and_clean(PM_PRESENT));
        assert!(!present_and_clean(PM_PRESENT | PM_SOFT_DIRTY));
        assert!(!present_and_clean(0), "a page that is not present says nothing");
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
