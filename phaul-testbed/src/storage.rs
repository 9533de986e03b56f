//! Real storage for the filesystem drivers' tests and benchmark: a btrfs filesystem on a loop device.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::TestbedError;

fn run(program: &str, args: &[&str]) -> Result<String, TestbedError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| TestbedError::io(format!("running {program} (is it installed?)"), e))?;
    if !out.status.success() {
        return Err(TestbedError::io(
            format!("{program} {}", args.join(" ")),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A btrfs filesystem on a loop device over a sparse file, mounted at `dir`; unmounted (lazily: a restored
/// workload may still hold it for a moment) and detached when dropped.
#[derive(Debug)]
pub struct LoopBtrfs {
    pub dir: PathBuf,
    pub dev: String,
}

impl LoopBtrfs {
    /// `image` (created, `size_mib` MiB, sparse) on a free loop device, formatted and mounted at `dir`.
    pub fn new(image: &Path, dir: &Path, size_mib: u64) -> Result<LoopBtrfs, TestbedError> {
        let f = std::fs::File::create(image).map_err(|e| TestbedError::io("creating the btrfs image", e))?;
        f.set_len(size_mib << 20).map_err(|e| TestbedError::io("sizing the btrfs image", e))?;
        drop(f);
        let dev = run("losetup", &["--find", "--show", &image.display().to_string()])?;
        let fs = LoopBtrfs { dir: dir.to_path_buf(), dev };
        run("mkfs.btrfs", &["-q", "-f", &fs.dev])?;
        std::fs::create_dir_all(&fs.dir).map_err(|e| TestbedError::io("creating the mount point", e))?;
        run("mount", &[&fs.dev, &fs.dir.display().to_string()])?;
        Ok(fs)
    }

    /// The subvolumes on this filesystem (paths relative to its top).
    pub fn subvolumes(&self) -> Result<Vec<String>, TestbedError> {
        let out = run("btrfs", &["subvolume", "list", "-o", &self.dir.display().to_string()])?;
        Ok(out.lines().filter_map(|l| l.split(" path ").nth(1)).map(str::to_string).collect())
    }

    /// Creates the subvolume `name` at the top.
    pub fn create_subvolume(&self, name: &str) -> Result<PathBuf, TestbedError> {
        let p = self.dir.join(name);
        run("btrfs", &["subvolume", "create", &p.display().to_string()])?;
        Ok(p)
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}
