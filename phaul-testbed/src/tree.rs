//! Whole-tree comparison for the filesystem drivers' tests: every entry's kind, mode, owner, content (by hash),
//! symlink target, device number, extended attributes (phaul's own marks left out) and POSIX ACLs (which are
//! xattrs), which entries are hard links of one another, and which regular files are sparse.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::TestbedError;

/// One entry of a tree, as compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Regular files: size and a hash of the content; symlinks: the target; devices: rdev.
    pub what: String,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// The other paths of the tree that are the same inode (hard links), sorted.
    pub links: Vec<PathBuf>,
    /// A regular file that occupies fewer blocks than its size needs.
    pub sparse: bool,
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Lists the xattrs of `p` (not following symlinks) through getfattr, leaving out `trusted.phaul.*`.
fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let out = std::process::Command::new("getfattr")
        .args(["-h", "-d", "-m", "-", "-e", "hex", "--absolute-names"])
        .arg(p)
        .output();
    let mut map = BTreeMap::new();
    if let Ok(o) = out {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some((k, v)) = line.split_once('=') {
                if !k.starts_with("trusted.phaul.") {
                    map.insert(k.to_string(), v.as_bytes().to_vec());
                }
            }
        }
    }
    map
}

/// Every entry under `root` (relative paths; the root itself as `.`), skipping relative paths for which `skip`
/// says so.
pub fn snapshot(root: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<BTreeMap<PathBuf, Entry>, TestbedError> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![PathBuf::from(".")];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let m = std::fs::symlink_metadata(&p).map_err(|e| TestbedError::io(format!("stat {}", p.display()), e))?;
        let ft = m.file_type();
        let (kind, what) = if ft.is_dir() {
            let rd = std::fs::read_dir(&p).map_err(|e| TestbedError::io(format!("listing {}", p.display()), e))?;
            for e in rd {
                let e = e.map_err(|e| TestbedError::io(format!("listing {}", p.display()), e))?;
                let child = rel.join(e.file_name());
                if !skip(&child) {
                    stack.push(child);
                }
            }
            ("dir", String::new())
        } else if ft.is_file() {
            let data = std::fs::read(&p).map_err(|e| TestbedError::io(format!("reading {}", p.display()), e))?;
            ("file", format!("{} bytes, hash {:016x}", data.len(), fnv(&data)))
        } else if ft.is_symlink() {
            let t = std::fs::read_link(&p).map_err(|e| TestbedError::io(format!("readlink {}", p.display()), e))?;
            ("symlink", String::from_utf8_lossy(t.as_os_str().as_bytes()).into_owned())
        } else if ft.is_char_device() || ft.is_block_device() {
            (if ft.is_char_device() { "chardev" } else { "blockdev" }, format!("rdev {:x}", m.rdev()))
        } else if ft.is_fifo() {
            ("fifo", String::new())
        } else {
            ("socket", String::new())
        };
        if !ft.is_dir() && m.nlink() > 1 {
            inodes.entry(m.ino()).or_default().push(rel.clone());
        }
        let sparse = ft.is_file() && m.size() > 0 && m.blocks() * 512 + 4096 <= m.size();
        out.insert(
            rel.clone(),
            Entry {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                what,
                xattrs: xattrs(&p),
                links: Vec::new(),
                sparse,
            },
        );
    }
    for group in inodes.values() {
        for p in group {
            let mut others: Vec<PathBuf> = group.iter().filter(|o| *o != p).cloned().collect();
            others.sort();
            if let Some(e) = out.get_mut(p) {
                e.links = others;
            }
        }
    }
    Ok(out)
}

/// The differences between two snapshots, one line each (empty: the trees are equal).
pub fn differences(a: &BTreeMap<PathBuf, Entry>, b: &BTreeMap<PathBuf, Entry>) -> Vec<String> {
    let mut d = Vec::new();
    for (p, ea) in a {
        match b.get(p) {
            None => d.push(format!("{} is missing on the second side", p.display())),
            Some(eb) if ea != eb => d.push(format!("{} differs: {ea:?} vs {eb:?}", p.display())),
            Some(_) => {}
        }
    }
    for p in b.keys().filter(|p| !a.contains_key(*p)) {
        d.push(format!("{} exists only on the second side", p.display()));
    }
    d
}

/// Compares the trees at `a` and `b` (see [`snapshot`]); the root directories' own xattrs and times are compared
/// too.
pub fn compare_trees(a: &Path, b: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<Vec<String>, TestbedError> {
    Ok(differences(&snapshot(a, skip)?, &snapshot(b, skip)?))
}
