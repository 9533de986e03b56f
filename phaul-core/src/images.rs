//! Reading CRIU image files: a magic number (two for most images: a common or service magic, then the image's own),
//! then entries, each a 32-bit little-endian size followed by that many bytes of protobuf.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use phaul_proto::criu::{DumpStatsEntry, RestoreStatsEntry, StatsEntry};
use prost::Message;

/// First word of ordinary images.
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// First word of service images (stats, irmap cache).
pub const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// The inventory image has no common magic, only its own.
pub const INVENTORY_MAGIC: u32 = 0x5831_3116;
/// stats-dump and stats-restore.
pub const STATS_MAGIC: u32 = 0x5709_3306;
/// cpuinfo.img.
pub const CPUINFO_MAGIC: u32 = 0x6140_4013;
/// files.img: one entry per open file of the dumped tree (CRIU's FILES_MAGIC).
pub const FILES_MAGIC: u32 = 0x5630_3138;
/// tty-info.img: one entry per terminal end the dumped tree held (CRIU's TTY_INFO_MAGIC).
pub const TTY_INFO_MAGIC: u32 = 0x5945_3036;
/// tty-data.img: the bytes CRIU drained out of pty queues at dump time (CRIU's TTY_DATA_MAGIC).
pub const TTY_DATA_MAGIC: u32 = 0x5941_3026;

/// Entries larger than this are refused as corrupt (CRIU's largest entries are far smaller).
const MAX_ENTRY: u32 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read CRIU image {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a CRIU image of the expected kind: magic {found:#010x}, expected {expected:#010x}")]
    Magic { path: PathBuf, found: u32, expected: u32 },
    #[error("{path} is truncated: an entry of {want} bytes ends early")]
    Truncated { path: PathBuf, want: u32 },
    #[error("{path} has an entry of {size} bytes, more than any CRIU image holds; the file is corrupt")]
    TooLarge { path: PathBuf, size: u32 },
    #[error("{path} holds an entry that does not decode: {source}")]
    Decode { path: PathBuf, source: prost::DecodeError },
    #[error("{path} holds no {what} entry")]
    Empty { path: PathBuf, what: &'static str },
}

/// A CRIU image file opened for reading its entries.
#[derive(Debug)]
pub struct ImageReader {
    path: PathBuf,
    r: BufReader<File>,
    magic: u32,
}

fn read_u32(r: &mut impl Read) -> io::Result<Option<u32>> {
    let mut b = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut b[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "a size word ends early")),
            n => got += n,
        }
    }
    Ok(Some(u32::from_le_bytes(b)))
}

impl ImageReader {
    /// Opens an image and reads its magic.
    pub fn open(path: &Path) -> Result<ImageReader, ImageError> {
        let io_err = |source| ImageError::Io { path: path.to_path_buf(), source };
        let mut r = BufReader::new(File::open(path).map_err(io_err)?);
        let eof = || io::Error::new(io::ErrorKind::UnexpectedEof, "the file is shorter than a magic number");
        let first = read_u32(&mut r).map_err(io_err)?.ok_or_else(|| io_err(eof()))?;
        let magic = if first == IMG_COMMON_MAGIC || first == IMG_SERVICE_MAGIC {
            read_u32(&mut r).map_err(io_err)?.ok_or_else(|| io_err(eof()))?
        } else {
            first
        };
        Ok(ImageReader { path: path.to_path_buf(), r, magic })
    }

    /// The image's own magic number.
    pub fn magic(&self) -> u32 {
        self.magic
    }

    /// Fails unless the image has the given magic.
    pub fn expect_magic(self, expected: u32) -> Result<Self, ImageError> {
        if self.magic == expected {
            Ok(self)
        } else {
            Err(ImageError::Magic { path: self.path, found: self.magic, expected })
        }
    }

    /// Every remaining entry, in file order.
    pub fn entries<M: Message + Default>(&mut self) -> Result<Vec<M>, ImageError> {
        let mut all = Vec::new();
        while let Some(e) = self.next_entry()? {
            all.push(e);
        }
        Ok(all)
    }

    /// The next entry, or `None` at the end of the file.
    pub fn next_entry<M: Message + Default>(&mut self) -> Result<Option<M>, ImageError> {
        let size = match read_u32(&mut self.r) {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(None),
            Err(_) => return Err(ImageError::Truncated { path: self.path.clone(), want: 4 }),
        };
        if size > MAX_ENTRY {
            return Err(ImageError::TooLarge { path: self.path.clone(), size });
        }
        let mut buf = vec![0u8; size as usize];
        self.r.read_exact(&mut buf).map_err(|_| ImageError::Truncated { path: self.path.clone(), want: size })?;
        M::decode(buf.as_slice()).map(Some).map_err(|source| ImageError::Decode { path: self.path.clone(), source })
    }
}

/// Every entry of an image that must have the given magic.
pub fn read_entries<M: Message + Default>(path: &Path, magic: u32) -> Result<Vec<M>, ImageError> {
    ImageReader::open(path)?.expect_magic(magic)?.entries()
}

/// What CRIU's stats-dump says about one dump or pre-dump. Times in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DumpStats {
    pub freezing_time_us: u32,
    pub frozen_time_us: u32,
    pub memdump_time_us: u32,
    pub memwrite_time_us: u32,
    pub pages_scanned: u64,
    pub pages_skipped_parent: u64,
    pub pages_written: u64,
    pub pages_lazy: u64,
}

/// What CRIU's stats-restore says. Times in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RestoreStats {
    pub pages_compared: u64,
    pub pages_skipped_cow: u64,
    pub pages_restored: u64,
    pub forking_time_us: u32,
    pub restore_time_us: u32,
}

fn read_stats(path: &Path) -> Result<StatsEntry, ImageError> {
    let mut img = ImageReader::open(path)?.expect_magic(STATS_MAGIC)?;
    img.next_entry::<StatsEntry>()?.ok_or(ImageError::Empty { path: path.to_path_buf(), what: "stats" })
}

/// Reads `stats-dump` in a directory.
pub fn read_dump_stats(dir: &Path) -> Result<DumpStats, ImageError> {
    let path = dir.join("stats-dump");
    let e: DumpStatsEntry = read_stats(&path)?.dump.ok_or(ImageError::Empty { path, what: "dump stats" })?;
    Ok(DumpStats {
        freezing_time_us: e.freezing_time,
        frozen_time_us: e.frozen_time,
        memdump_time_us: e.memdump_time,
        memwrite_time_us: e.memwrite_time,
        pages_scanned: e.pages_scanned,
        pages_skipped_parent: e.pages_skipped_parent,
        pages_written: e.pages_written,
        pages_lazy: e.pages_lazy,
    })
}

/// Reads `stats-restore` in a directory.
pub fn read_restore_stats(dir: &Path) -> Result<RestoreStats, ImageError> {
    let path = dir.join("stats-restore");
    let e: RestoreStatsEntry = read_stats(&path)?.restore.ok_or(ImageError::Empty { path, what: "restore stats" })?;
    Ok(RestoreStats {
        pages_compared: e.pages_compared,
        pages_skipped_cow: e.pages_skipped_cow,
        pages_restored: e.pages_restored.unwrap_or(0),
        forking_time_us: e.forking_time,
        restore_time_us: e.restore_time,
    })
}

/// Whether `name` is a plain file name of the form `PREFIX-<lowercase letters, digits, dashes>.img`: safe to
/// create in an image directory when it comes from the peer.
fn is_image_named(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix).and_then(|rest| rest.strip_suffix(".img")).is_some_and(|mid| {
        !mid.is_empty() && mid.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    })
}

/// A CRIU page map image: `pagemap-<pid>.img`, `pagemap-shmem-<id>.img`.
pub fn is_pagemap_image(name: &str) -> bool {
    is_image_named(name, "pagemap-")
}

/// A CRIU page data image: `pages-<id>.img`.
pub fn is_pages_image(name: &str) -> bool {
    is_image_named(name, "pages-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn page_image_names() {
        assert!(is_pagemap_image("pagemap-1.img"));
        assert!(is_pagemap_image("pagemap-shmem-4711.img"));
        assert!(is_pages_image("pages-65537.img"));
        for bad in ["pagemap-.img", "pagemap-1.img/x", "pagemap-../x.img", "pagemap-1.IMG", "pages-1.img", "x"] {
            assert!(!is_pagemap_image(bad), "{bad}");
        }
        assert!(!is_pages_image("pages-/etc/passwd.img"));
        assert!(!is_pages_image("pagemap-1.img"));
    }

    fn write_image(path: &Path, magics: &[u32], entries: &[Vec<u8>]) {
        let mut f = File::create(path).expect("create");
        for m in magics {
            f.write_all(&m.to_le_bytes()).expect("write");
        }
        for e in entries {
            f.write_all(&(e.len() as u32).to_le_bytes()).expect("write");
            f.write_all(e).expect("write");
        }
    }

    #[test]
    fn reads_dump_stats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let entry = StatsEntry {
            dump: Some(DumpStatsEntry {
                frozen_time: 1234,
                pages_written: 77,
                pages_scanned: 100,
                ..Default::default()
            }),
            restore: None,
        };
        write_image(&dir.path().join("stats-dump"), &[IMG_SERVICE_MAGIC, STATS_MAGIC], &[entry.encode_to_vec()]);
        let s = read_dump_stats(dir.path()).expect("stats");
        assert_eq!(s.frozen_time_us, 1234);
        assert_eq!(s.pages_written, 77);
        assert_eq!(s.pages_scanned, 100);
    }

    #[test]
    fn rejects_wrong_magic_and_truncation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("stats-dump");
        write_image(&p, &[IMG_COMMON_MAGIC, INVENTORY_MAGIC], &[]);
        assert!(matches!(read_dump_stats(dir.path()), Err(ImageError::Magic { .. })));
        let mut f = File::create(&p).expect("create");
        f.write_all(&IMG_SERVICE_MAGIC.to_le_bytes()).expect("w");
        f.write_all(&STATS_MAGIC.to_le_bytes()).expect("w");
        f.write_all(&100u32.to_le_bytes()).expect("w");
        f.write_all(&[1, 2, 3]).expect("w");
        drop(f);
        assert!(matches!(read_dump_stats(dir.path()), Err(ImageError::Truncated { .. })));
    }

    #[test]
    fn inventory_has_a_single_magic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("inventory.img");
        write_image(&p, &[INVENTORY_MAGIC], &[]);
        assert_eq!(ImageReader::open(&p).expect("open").magic(), INVENTORY_MAGIC);
    }
}
