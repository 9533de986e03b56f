//! `tree-writer`: a workload that keeps changing a directory tree, for the filesystem drivers' tests.
//!
//! At start it lays out `static/` (a plain file, a file with mode 0640 owned by 1234:5678, a hard-link pair, a
//! symlink, a 1 MiB sparse file, a file with a user xattr and one with an ACL unless told not to, a character
//! device) and `fixed/`
//! (eight 4 KiB files). Every tick it creates `data/nN`, renames `data/n(N-5)` to `data/r(N-5)`, deletes
//! `data/r(N-10)`, rewrites `fixed/s(N mod 8)` in place with the same size, and appends `N` to `open.log`, which
//! it keeps open (its check verifies that file's content). While the file named by `--pause-file` exists it
//! changes nothing, so a test can compare a tree that is not moving.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::kinds::file_append::verify_content;
use crate::runner::Workload;

#[derive(Debug)]
pub struct TreeWriter {
    dir: PathBuf,
    pause: Option<PathBuf>,
    log: File,
    ops: u64,
    paused: bool,
}

/// The content of tick `n`'s files: `len` bytes derived from `n`.
pub fn pattern(n: u64, len: usize) -> Vec<u8> {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let st = std::process::Command::new(program)
        .args(args)
        .status()
        .map_err(|e| format!("cannot run {program} (is it installed?): {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{program} {} failed: {st}", args.join(" ")))
    }
}

fn io(what: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", what.display())
}

impl TreeWriter {
    pub fn open(dir: &Path, pause: Option<&Path>, xattrs: bool) -> Result<TreeWriter, String> {
        for sub in ["static", "fixed", "data"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io(&dir.join(sub)))?;
        }
        let st = dir.join("static");
        std::fs::write(st.join("plain"), b"plain file\n").map_err(io(&st))?;
        let owned = st.join("owned");
        std::fs::write(&owned, b"owned by 1234:5678, mode 0640\n").map_err(io(&owned))?;
        std::os::unix::fs::chown(&owned, Some(1234), Some(5678)).map_err(io(&owned))?;
        std::fs::set_permissions(&owned, std::os::unix::fs::PermissionsExt::from_mode(0o640)).map_err(io(&owned))?;
        std::fs::write(st.join("hard1"), b"two names, one inode\n").map_err(io(&st))?;
        let _ = std::fs::remove_file(st.join("hard2"));
        std::fs::hard_link(st.join("hard1"), st.join("hard2")).map_err(io(&st))?;
        let _ = std::fs::remove_file(st.join("link"));
        std::os::unix::fs::symlink("plain", st.join("link")).map_err(io(&st))?;
        let sparse = st.join("sparse");
        let mut f = File::create(&sparse).map_err(io(&sparse))?;
        f.seek(SeekFrom::Start(1 << 20)).map_err(io(&sparse))?;
        f.write_all(&pattern(7, 4096)).map_err(io(&sparse))?;
        if xattrs {
            std::fs::write(st.join("xattr"), b"has user.phaul-test\n").map_err(io(&st))?;
            run("setfattr", &["-n", "user.phaul-test", "-v", "carried", &st.join("xattr").display().to_string()])?;
            std::fs::write(st.join("acl"), b"has an ACL\n").map_err(io(&st))?;
            run("setfacl", &["-m", "u:4321:r", &st.join("acl").display().to_string()])?;
        }
        let dev = st.join("null");
        let _ = std::fs::remove_file(&dev);
        nix::sys::stat::mknod(
            &dev,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .map_err(|e| format!("mknod {}: {e}", dev.display()))?;
        for i in 0..8 {
            std::fs::write(dir.join(format!("fixed/s{i}")), pattern(1000 + i, 4096)).map_err(io(dir))?;
        }
        let log_path = dir.join("open.log");
        let log = OpenOptions::new().append(true).create(true).open(&log_path).map_err(io(&log_path))?;
        log.set_len(0).map_err(io(&log_path))?;
        Ok(TreeWriter { dir: dir.to_path_buf(), pause: pause.map(Path::to_path_buf), log, ops: 0, paused: false })
    }
}

impl Workload for TreeWriter {
    fn kind(&self) -> &'static str {
        "tree-writer"
    }

    fn tick(&mut self) -> Result<(), String> {
        self.paused = self.pause.as_ref().is_some_and(|p| p.exists());
        if self.paused {
            return Ok(());
        }
        let n = self.ops;
        let d = &self.dir;
        let new = d.join(format!("data/n{n}"));
        std::fs::write(&new, pattern(n, (n as usize * 977) % 20_000 + 1)).map_err(io(&new))?;
        if n >= 5 {
            std::fs::rename(d.join(format!("data/n{}", n - 5)), d.join(format!("data/r{}", n - 5))).map_err(io(d))?;
        }
        if n >= 10 {
            std::fs::remove_file(d.join(format!("data/r{}", n - 10))).map_err(io(d))?;
        }
        let fixed = d.join(format!("fixed/s{}", n % 8));
        let mut f = OpenOptions::new().write(true).open(&fixed).map_err(io(&fixed))?;
        f.write_all(&pattern(n, 4096)).map_err(io(&fixed))?;
        let line = format!("{n}\n");
        let w = self.log.write(line.as_bytes()).map_err(|e| format!("append to open.log: {e}"))?;
        if w != line.len() {
            return Err(format!("short append to open.log: {w} of {} bytes", line.len()));
        }
        self.ops += 1;
        Ok(())
    }

    fn check(&mut self) -> Result<(), String> {
        let p = self.dir.join("open.log");
        let content = std::fs::read(&p).map_err(io(&p))?;
        verify_content(&content, self.ops).map_err(|e| format!("{}: {e} ({} ticks done)", p.display(), self.ops))
    }

    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("dir".into(), Value::from(self.dir.display().to_string()));
        m.insert("tree_ops".into(), Value::from(self.ops));
        m.insert("paused".into(), Value::from(self.paused));
        m
    }
}
