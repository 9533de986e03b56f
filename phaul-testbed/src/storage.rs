//! Real storage for the filesystem drivers' tests and benchmark: a btrfs filesystem on a loop device, and a ZFS
//! host (zfs-fuse in a mount namespace of its own).

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

/// One host's ZFS: a zfs-fuse daemon in a mount namespace of its own (with its own socket, pool cache and lock,
/// so that two of them, host A's and host B's, run side by side like two machines' ZFS), and a pool on a sparse
/// file. The datasets it mounts exist only in that namespace: run a host's programs there with
/// [`ZfsHost::command`] or [`ZfsHost::wrapper`], and read its files from outside through [`ZfsHost::view`].
/// Dropping it destroys the pool and ends the daemon (the namespace goes with its last process).
#[derive(Debug)]
pub struct ZfsHost {
    pub pool: String,
    daemon: std::process::Child,
}

/// How long a zfs-fuse daemon gets to answer after it started, and to go after it was asked to.
const ZFS_DAEMON_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

impl ZfsHost {
    /// A daemon in a new mount namespace and the pool `pool` on `image` (created, `size_mib` MiB, sparse),
    /// mounted at `mountpoint` in that namespace.
    pub fn new(image: &Path, pool: &str, mountpoint: &Path, size_mib: u64) -> Result<ZfsHost, TestbedError> {
        ZfsHost::new_in(image, pool, mountpoint, size_mib, None)
    }

    /// As [`ZfsHost::new`], the daemon in `host`'s network namespace, and its mount namespace made that host's
    /// for LXC too (its sysfs shows the host's network devices: [`crate::lxc::SYSFS_NET_MOUNTS`]), so that LXC's
    /// tools and phaul, run there ([`crate::lxc::LxcHosts::new_in`]), see the datasets this daemon mounts.
    pub fn new_in(
        image: &Path,
        pool: &str,
        mountpoint: &Path,
        size_mib: u64,
        host: Option<&crate::Host>,
    ) -> Result<ZfsHost, TestbedError> {
        let f = std::fs::File::create(image).map_err(|e| TestbedError::io("creating the pool image", e))?;
        f.set_len(size_mib << 20).map_err(|e| TestbedError::io("sizing the pool image", e))?;
        drop(f);
        let sysfs = if host.is_some() { crate::lxc::SYSFS_NET_MOUNTS } else { "" };
        let script = format!(
            "{sysfs}for d in /var/run/zfs /var/lib/zfs /var/lock/zfs; do \
             mkdir -p $d && mount -t tmpfs -o mode=0700 tmpfs $d || exit 97; done; \
             exec zfs-fuse --no-daemon --no-kstat-mount"
        );
        let args = ["--mount", "--propagation", "private", "--", "/bin/sh", "-c", script.as_str()];
        let daemon = match host {
            Some(h) => h.command("unshare", args),
            None => {
                let mut c = Command::new("unshare");
                c.args(args);
                c
            }
        }
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| TestbedError::io("starting zfs-fuse (apt-get install zfs-fuse)", e))?;
        let mut host = ZfsHost { pool: pool.to_string(), daemon };
        let deadline = std::time::Instant::now() + ZFS_DAEMON_TIMEOUT;
        loop {
            // The namespace is the daemon's once sh has exec'd it and it listens.
            let up = host.command("zpool", ["list"]).output().is_ok_and(|o| o.status.success());
            if up {
                break;
            }
            if std::time::Instant::now() > deadline || host.daemon.try_wait().ok().flatten().is_some() {
                return Err(TestbedError::io(
                    "starting zfs-fuse",
                    std::io::Error::other("the daemon did not answer `zpool list` in 15 s"),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let (mp, img) = (mountpoint.display().to_string(), image.display().to_string());
        host.run("zpool", &["create", "-f", "-m", &mp, pool, &img])?;
        Ok(host)
    }

    /// The daemon's pid (its mount namespace is the host's).
    pub fn pid(&self) -> u32 {
        self.daemon.id()
    }

    /// `program args` in this host's mount namespace.
    pub fn command<I, S>(&self, program: &str, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut c = Command::new("nsenter");
        c.arg("--mount").arg("--target").arg(self.pid().to_string()).arg("--").arg(program).args(args);
        c
    }

    /// Runs `program args` there; its stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String, TestbedError> {
        let out = self
            .command(program, args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| TestbedError::io(format!("running {program} in the zfs host"), e))?;
        if !out.status.success() {
            return Err(TestbedError::io(
                format!("{program} {}", args.join(" ")),
                std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    pub fn zfs(&self, args: &[&str]) -> Result<String, TestbedError> {
        self.run("zfs", args)
    }

    /// Destroys `dataset`, unmounting it first (zfs-fuse may call a dataset busy while its unmount completes).
    pub fn destroy(&self, dataset: &str) -> Result<(), TestbedError> {
        let deadline = std::time::Instant::now() + ZFS_DAEMON_TIMEOUT;
        loop {
            match self.zfs(&["destroy", "-r", "-f", dataset]) {
                Err(e) if e.to_string().contains("busy") && std::time::Instant::now() < deadline => {
                    let _ = self.zfs(&["umount", "-f", dataset]);
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                r => return r.map(|_| ()),
            }
        }
    }

    /// Every dataset and snapshot of the pool, by name.
    pub fn all(&self) -> Result<Vec<String>, TestbedError> {
        Ok(self
            .zfs(&["list", "-H", "-o", "name", "-t", "all", "-r", &self.pool])?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// A command prefix that runs a program in this host's mount namespace (for `MigrateOptions`' wrappers,
    /// which add `--` and the program).
    pub fn wrapper(&self) -> (PathBuf, Vec<String>) {
        (PathBuf::from("/usr/bin/nsenter"), vec!["--mount".into(), "--target".into(), self.pid().to_string()])
    }

    /// `path` as seen from outside (through the daemon's root, which is the namespace's).
    pub fn view(&self, path: &Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.pid())).join(rel)
    }
}

impl Drop for ZfsHost {
    fn drop(&mut self) {
        let _ = self.command("zpool", ["destroy", "-f", &self.pool]).output();
        let pid = nix::unistd::Pid::from_raw(self.daemon.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + ZFS_DAEMON_TIMEOUT;
        while self.daemon.try_wait().ok().flatten().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.daemon.kill();
                let _ = self.daemon.wait();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}
