//! A check of the `zfs send` stream a source sends, before `zfs recv` (run as root) sees any of it (used by
//! `phaul-fs-zfs`; here rather than in the plugin so that the fuzz targets can link it).
//!
//! `zfs recv TARGET` receives into the dataset it is told, but what the stream's first record asks for still
//! matters: a compound (replication, `-R` or `-p`) stream carries properties (a `mountpoint` over `/etc`, say) and
//! descendants; a clone stream makes the new dataset a clone of any snapshot on the pool, found by GUID (so the
//! workload would see data it was never given); an incremental stream from a snapshot other than the one this
//! target received last would not apply, or apply to something else. So the receiver passes on only a stream
//! whose begin record is: in either byte order, a single (not compound) stream of a ZFS filesystem (not a
//! volume), no clone flag, from exactly the GUID expected (0 for round 1, then the last received snapshot's), to
//! a non-zero GUID, naming a snapshot with a plain name. Everything after the begin record is passed on as it
//! comes: `zfs recv` reads one stream to its END record.
//!
//! Begin record layout (protocol facts from ZFS's `zfs_ioctl.h`): `u32 type` (0 = BEGIN), `u32 payload length`,
//! `u64 magic` (0x2F5BACBAC), `u64 version info` (low 2 bits: 1 single, 2 compound; bits 2 to 31: feature flags,
//! of which dedup is bit 2 and dedup properties bit 3), `u64 creation time`,
//! `u32 objset type` (2 = ZFS filesystem), `u32 flags` (bit 0: clone), `u64 to-GUID`, `u64 from-GUID`,
//! `char to-name[256]`; 312 bytes in all, as the sender's byte order writes them.

/// The length of a stream's first record.
pub const BEGIN_LEN: usize = 312;
const MAGIC: u64 = 0x2_F5BA_CBAC;
const HDR_SINGLE: u64 = 1;
const OBJSET_ZFS: u32 = 2;
const FLAG_CLONE: u32 = 1;
const NAME_LEN: usize = 256;
/// Feature bits of the version info a receiver refuses: the two dedup features (bits 2 and 3, records that refer
/// to earlier blocks of the stream) and everything above the 30 bits ZFS defines.
const FEATURES_REFUSED: u64 = (0b11 << 2) | !((1u64 << 32) - 1);

/// What a checked begin record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    pub to_guid: u64,
    pub from_guid: u64,
    /// The snapshot's name (after `@`).
    pub snapshot: String,
}

/// Whether `name` is a plain ZFS name component (what a snapshot of ours is called).
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// Checks a begin record (`rec` is at least [`BEGIN_LEN`] bytes; more is ignored) against the GUID the stream must
/// start from.
pub fn check_begin(rec: &[u8], expect_from: u64) -> Result<Begin, String> {
    let rec = rec.get(..BEGIN_LEN).ok_or_else(|| format!("the stream ended within its first {BEGIN_LEN} bytes"))?;
    let le64 = |at: usize| rec.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0);
    let big = match le64(8) {
        MAGIC => false,
        m if m.swap_bytes() == MAGIC => true,
        m => return Err(format!("it is not a ZFS send stream (magic {m:#x})")),
    };
    let u64_at = |at: usize| if big { le64(at).swap_bytes() } else { le64(at) };
    let u32_at = |at: usize| {
        let v = rec.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes).unwrap_or(u32::MAX);
        if big {
            v.swap_bytes()
        } else {
            v
        }
    };
    if u32_at(0) != 0 {
        return Err("its first record is not a BEGIN record".into());
    }
    let version = u64_at(16);
    if version & 3 != HDR_SINGLE {
        return Err("it is a replication (compound) stream, which carries properties and other datasets; phaul sends \
                    one snapshot at a time"
            .into());
    }
    if u32_at(4) != 0 {
        return Err(
            "its begin record carries a payload (a resumed, raw, redacted or property-carrying stream); phaul \
                    sends plain snapshots"
                .into(),
        );
    }
    if version & FEATURES_REFUSED != 0 {
        return Err(format!(
            "it asks for features phaul's plain zfs send does not use (version info {version:#x}: deduplicated \
             records or unknown flags)"
        ));
    }
    if u32_at(32) != OBJSET_ZFS {
        return Err(format!("it is not the stream of a ZFS filesystem (object set type {})", u32_at(32)));
    }
    if u32_at(36) & FLAG_CLONE != 0 {
        return Err("it is a clone stream, which would make the target a clone of another snapshot on this pool".into());
    }
    let (to_guid, from_guid) = (u64_at(40), u64_at(48));
    if to_guid == 0 {
        return Err("its snapshot has no GUID".into());
    }
    if from_guid != expect_from {
        return Err(if expect_from == 0 {
            format!("it is incremental (from GUID {from_guid:#x}) where a full stream was expected")
        } else {
            format!("it starts from GUID {from_guid:#x}, not from the snapshot received last ({expect_from:#x})")
        });
    }
    let name = &rec[56..56 + NAME_LEN];
    let name = name.iter().position(|b| *b == 0).map(|n| &name[..n]).ok_or("its snapshot name is not terminated")?;
    let name = std::str::from_utf8(name).map_err(|_| "its snapshot name is not UTF-8".to_string())?;
    let snapshot = match name.split_once('@') {
        Some((_, s)) if plain_name(s) => s.to_string(),
        _ => return Err(format!("it names the snapshot {name:?}, not DATASET@PLAIN-NAME")),
    };
    Ok(Begin { to_guid, from_guid, snapshot })
}

/// The check as a stream goes by: holds the first [`BEGIN_LEN`] bytes back until they are checked, then passes
/// everything on.
#[derive(Debug)]
pub struct Gate {
    expect_from: u64,
    held: Vec<u8>,
    begin: Option<Begin>,
}

impl Gate {
    pub fn new(expect_from: u64) -> Gate {
        Gate { expect_from, held: Vec::with_capacity(BEGIN_LEN), begin: None }
    }

    /// Takes `chunk`; returns what may be passed on now (nothing until the begin record is whole), or why the
    /// stream is refused.
    pub fn feed<'a>(&mut self, chunk: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, String> {
        if self.begin.is_some() {
            return Ok(chunk.into());
        }
        let want = BEGIN_LEN - self.held.len();
        let (head, rest) = chunk.split_at(want.min(chunk.len()));
        self.held.extend_from_slice(head);
        if self.held.len() < BEGIN_LEN {
            return Ok(Vec::new().into());
        }
        self.begin = Some(check_begin(&self.held, self.expect_from)?);
        let mut out = std::mem::take(&mut self.held);
        out.extend_from_slice(rest);
        Ok(out.into())
    }

    /// The begin record, once checked.
    pub fn begin(&self) -> Option<&Begin> {
        self.begin.as_ref()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(big: bool, version: u64, flags: u32, from: u64, name: &str) -> Vec<u8> {
        let mut r = vec![0u8; BEGIN_LEN];
        let put32 = |r: &mut Vec<u8>, at: usize, v: u32| {
            r[at..at + 4].copy_from_slice(&if big { v.to_be_bytes() } else { v.to_le_bytes() })
        };
        let put64 = |r: &mut Vec<u8>, at: usize, v: u64| {
            r[at..at + 8].copy_from_slice(&if big { v.to_be_bytes() } else { v.to_le_bytes() })
        };
        put64(&mut r, 8, MAGIC);
        put64(&mut r, 16, version);
        put32(&mut r, 32, OBJSET_ZFS);
        put32(&mut r, 36, flags);
        put64(&mut r, 40, 0xabc);
        put64(&mut r, 48, from);
        r[56..56 + name.len()].copy_from_slice(name.as_bytes());
        r
    }

    #[test]
    fn a_full_and_an_incremental_stream_pass_in_either_byte_order() {
        for big in [false, true] {
            let b = check_begin(&record(big, 1, 0, 0, "tank/ct@phaul-1-r1"), 0).unwrap();
            assert_eq!(b, Begin { to_guid: 0xabc, from_guid: 0, snapshot: "phaul-1-r1".into() });
            assert!(check_begin(&record(big, 1, 0, 7, "tank/ct@r2"), 7).is_ok());
        }
    }

    #[test]
    fn compound_clone_wrong_parent_and_odd_names_are_refused() {
        assert!(check_begin(&record(false, 2, 0, 0, "t@a"), 0).unwrap_err().contains("compound"));
        assert!(check_begin(&record(false, 1, 1, 0, "t@a"), 0).unwrap_err().contains("clone"));
        assert!(check_begin(&record(false, 1, 0, 5, "t@a"), 0).unwrap_err().contains("incremental"));
        assert!(check_begin(&record(false, 1, 0, 5, "t@a"), 6).unwrap_err().contains("received last"));
        assert!(check_begin(&record(false, 1, 0, 0, "t@a/../b"), 0).is_err());
        assert!(check_begin(&record(false, 1, 0, 0, "no-at"), 0).is_err());
        let mut unterminated = record(false, 1, 0, 0, "t@a");
        unterminated[56..].fill(b'a');
        assert!(check_begin(&unterminated, 0).is_err());
        assert!(check_begin(&[0u8; 100], 0).is_err());
        assert!(check_begin(&[0u8; BEGIN_LEN], 0).unwrap_err().contains("magic"));
        assert!(check_begin(&record(false, 1 | 1 << 2, 0, 0, "t@a"), 0).unwrap_err().contains("features"));
        assert!(check_begin(&record(false, 1 | 1 << 40, 0, 0, "t@a"), 0).unwrap_err().contains("features"));
        // Features a plain send of an ordinary dataset sets (large dnodes, bit 21 of the flags) pass.
        assert!(check_begin(&record(false, 1 | 1 << 23, 0, 0, "t@a"), 0).is_ok());
    }

    #[test]
    fn the_gate_holds_the_begin_record_back_until_it_is_checked() {
        let rec = record(false, 1, 0, 0, "tank/ct@s1");
        let mut g = Gate::new(0);
        assert!(g.feed(&rec[..100]).unwrap().is_empty());
        let mut more = rec[100..].to_vec();
        more.extend_from_slice(b"payload");
        let out = g.feed(&more).unwrap();
        assert_eq!(out.len(), BEGIN_LEN + 7);
        assert_eq!(&*g.feed(b"x").unwrap(), b"x");
        assert_eq!(g.begin().map(|b| b.snapshot.as_str()), Some("s1"));
        let mut refused = Gate::new(9);
        assert!(refused.feed(&rec).is_err());
    }
}
