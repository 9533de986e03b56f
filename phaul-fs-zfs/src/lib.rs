//! The `zfs` filesystem driver: a workload's root is the mount point of a ZFS dataset; each round takes a snapshot
//! of it and sends it with `zfs send` (from round 2 on, `-i` the previous round's snapshot, so only what changed
//! travels) into `zfs recv` on the destination, over phaul's filesystem channel (one substream per root and
//! round, see `phaul-fs-stream`). The stream's begin record is checked before `zfs recv` sees it
//! (`phaul_fs_stream::zfs_send`): one snapshot, no properties, no clone, from the snapshot received last.
//!
//! On the destination the dataset is created first, unmounted (`canmount=noauto`) and marked with the user
//! property [`OWNER`] = `receiving TOKEN`, and every round is received into it with `zfs recv -u -F` (which keeps
//! its properties). After the final round, taken while the workload is frozen, it is mounted at the target path.
//! Roll-back destroys only a dataset that carries this run's mark.
//!
//! Snapshots are temporary on both sides: each keeps only the latest (the base of the next round) and destroys
//! it at the end, whatever the outcome. The source's dataset is never touched (after a migration away it is
//! marked `migrated-away`).
//!
//! Source options (`--fs-opt KEY=VALUE`): `zfs=PATH` (the zfs program; default from PATH), `io-timeout=SECONDS`
//! (300). The roots are the host type's (`--htype-opt root=DIR` for `pid`); each must be the mount point of a
//! mounted ZFS filesystem.
//!
//! Destination options (`phaul serve --fs-opt zfs:KEY=VALUE`): `map=SOURCE-DIR=DESTINATION-DIR` and `allow=DIR`
//! (where roots may be received, as for rsync); `parent=DATASET` (receive as DATASET/NAME, NAME the target
//! directory's last component, mounted at the target path; by default DATASET is the one mounted at the target's
//! parent directory, and the new dataset inherits its mount point from it); `zfs=PATH`, `io-timeout=SECONDS`. A
//! target dataset that exists is refused unless it is a leftover of a failed phaul run (then destroyed first); a
//! migration back to a host that still has the dataset the workload left is refused with what to do.
//!
//! `zfs recv` keeps object numbers, so inode numbers survive: `persistent_inodes` is true.
//!
//! Trust: the begin-record check keeps a source from asking for properties, clones or another base, but the rest
//! of the stream is parsed by ZFS's own receive code (in the kernel, with OpenZFS), which is not written to
//! withstand hostile streams. Use this driver only between hosts that trust each other (phaul's mutual TLS
//! authenticates the peer; it does not make its stream harmless).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};

use phaul_abi::{
    options, FsArgs, FsReceiver, FsRound, FsRoundInfo, FsSender, Host, KeyValue, Outcome, PluginError, PluginResult,
};
use phaul_fs_mark::Placement;
use phaul_fs_stream::kit::{self, check_known, io_err, receive_round, seconds, SessionReceiver};
use phaul_fs_stream::zfs_send::{plain_name, Gate};
use phaul_fs_stream::{tail, Channel, Done, Start};

/// The user property phaul's marks live in.
pub const OWNER: &str = "phaul:owner";
/// The one pass of a zfs session: a send stream.
const PASS_SEND: u8 = 1;
const PACKAGE: &str = "zfsutils-linux (or zfs-fuse)";

/// Runs `zfs ARGS`; its stdout, or an error with its stderr.
fn zfs(program: &Path, args: &[&str], what: &str) -> PluginResult<String> {
    kit::run_tool(program, args, &[("LC_ALL", "C")], what)
}

/// A property of `dataset` (`None` when the dataset does not exist; `Some("-")` when the property is unset).
fn property(program: &Path, dataset: &str, prop: &str) -> PluginResult<Option<String>> {
    let out = Command::new(program)
        .args(["get", "-H", "-p", "-o", "value", prop, dataset])
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            PluginError::failed(format!("reading {prop} of {dataset}: cannot run {}: {e}", program.display()))
        })?;
    if out.status.success() {
        return Ok(Some(String::from_utf8_lossy(&out.stdout).trim().to_string()));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("does not exist") {
        Ok(None)
    } else {
        Err(PluginError::failed(format!("reading {prop} of {dataset} failed: {}", tail(&out.stderr, 2000))))
    }
}

/// phaul's mark on `dataset`, set on the dataset itself (a value inherited from a parent is no mark): `None` when
/// the dataset does not exist, `Some(None)` when it carries no mark.
fn mark(program: &Path, dataset: &str) -> PluginResult<Option<Option<String>>> {
    if property(program, dataset, "type")?.is_none() {
        return Ok(None);
    }
    let out =
        zfs(program, &["get", "-H", "-o", "value,source", OWNER, dataset], &format!("reading {OWNER} of {dataset}"))?;
    let line = out.lines().next().unwrap_or("");
    Ok(Some(match line.split_once('\t') {
        Some((value, "local")) => Some(value.to_string()),
        _ => None,
    }))
}

/// The mark of a dataset phaul is receiving into: `receiving TOKEN` until the final round mounted it, then
/// `mounted TOKEN` (a mounted dataset may hold a restored workload: never removed as a mere leftover).
const RECEIVING: &str = "receiving ";
const MOUNTED: &str = "mounted ";

/// Whether some directory on the way to `path`, or `path` itself, is a symbolic link (a mount there would land
/// wherever it points).
fn symlink_on_the_way(path: &Path) -> bool {
    path.ancestors().any(|a| std::fs::symlink_metadata(a).is_ok_and(|m| m.file_type().is_symlink()))
}

/// The mounted ZFS filesystem whose mount point is `dir`.
fn dataset_at(program: &Path, dir: &Path) -> PluginResult<Option<String>> {
    let out = zfs(program, &["list", "-H", "-o", "name,mountpoint,mounted", "-t", "filesystem"], "listing datasets")?;
    Ok(out.lines().find_map(|l| {
        let mut f = l.split('\t');
        let (name, mp, mounted) = (f.next()?, f.next()?, f.next()?);
        (Path::new(mp) == dir && mounted == "yes").then(|| name.to_string())
    }))
}

/// Whether `path` is a mount point (of anything) in this mount namespace.
fn is_mount_point(path: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines().filter_map(|l| l.split(' ').nth(4)).any(|m| Path::new(&m.replace("\\040", " ")) == path)
}

/// Destroys a snapshot. A `zfs send` of it that was just killed (the channel broke) may keep it busy for a
/// moment, so a busy snapshot is tried again for up to five seconds.
fn destroy(program: &Path, what: &str) -> PluginResult<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match zfs(program, &["destroy", what], &format!("destroying {what}")) {
            Err(e) if e.message.contains("dataset is busy") && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            r => return r.map(|_| ()),
        }
    }
}

/// Destroys `dataset` with its snapshots, unmounting it first. zfs-fuse may answer "dataset is busy" while its
/// unmount completes, so a busy dataset is unmounted and tried again for up to five seconds.
fn destroy_dataset(program: &Path, dataset: &str) -> PluginResult<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match zfs(program, &["destroy", "-r", "-f", dataset], &format!("destroying {dataset}")) {
            Err(e) if e.message.contains("dataset is busy") && std::time::Instant::now() < deadline => {
                let _ = zfs(program, &["umount", "-f", dataset], "unmounting");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            r => return r.map(|_| ()),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Source

/// The pid of the phaul process that took snapshot `name` (after `@`), when the name is one phaul gives its
/// snapshots: `phaul-PID-HEX-NANOS-rROUND`.
fn snapshot_owner(name: &str) -> Option<i32> {
    let rest = name.strip_prefix("phaul-")?;
    let parts: Vec<&str> = rest.split('-').collect();
    let [pid, hex, nanos, round] = parts.as_slice() else { return None };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let ok = digits(pid)
        && !hex.is_empty()
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && digits(nanos)
        && round.strip_prefix('r').is_some_and(digits);
    ok.then(|| pid.parse().ok()).flatten()
}

/// Destroys the snapshots of `dataset` that a phaul process which no longer exists took (a migration killed
/// before it could clean up); a live process's snapshots, and every other snapshot, stay.
fn sweep_dead_runs(program: &Path, dataset: &str) {
    let Ok(list) = zfs(program, &["list", "-H", "-o", "name", "-t", "snapshot", "-r", dataset], "listing snapshots")
    else {
        return;
    };
    for snap in list.lines() {
        let Some((ds, name)) = snap.split_once('@') else { continue };
        let Some(pid) = snapshot_owner(name).filter(|_| ds == dataset) else { continue };
        if pid > 0 && !Path::new(&format!("/proc/{pid}")).exists() {
            log::info!("destroying {snap}, left by a phaul run (pid {pid}) that no longer exists");
            if let Err(e) = destroy(program, snap) {
                log::warn!("{}", e.message);
            }
        }
    }
}

struct ZfsSender {
    host: Host,
    chan: Channel,
    zfs: PathBuf,
    /// Per root: (its directory, its dataset).
    roots: Vec<(PathBuf, String)>,
    token: String,
    /// Per root: the snapshots that exist (`DATASET@NAME`; the last is the base of the next round).
    snaps: Vec<Vec<String>>,
}

fn sender(args: &FsArgs) -> PluginResult<ZfsSender> {
    check_known(args, &["zfs", "io-timeout"], "zfs", "source")?;
    let program = kit::find_program(args.option("zfs"), "zfs", "zfs", "source", PACKAGE)?;
    if args.roots.is_empty() {
        return Err(PluginError::invalid(
            "the zfs filesystem driver has nothing to send: the host type names no root (for the pid host type, \
             pass --htype-opt root=DATASET-MOUNT-POINT)",
        ));
    }
    let mut roots = Vec::new();
    for r in args.roots.iter() {
        let p = PathBuf::from(r.as_str());
        if !p.is_absolute() || !p.is_dir() {
            return Err(PluginError::not_found(format!("the root {} is not a directory on the source", p.display())));
        }
        let real = p.canonicalize().map_err(io_err("resolving the root"))?;
        let Some(ds) = dataset_at(&program, &real)? else {
            return Err(PluginError::invalid(format!(
                "the root {} is not the mount point of a mounted ZFS filesystem (the zfs driver sends datasets: \
                 make one with zfs create -o mountpoint={} POOL/NAME and move the files into it, or use --fs rsync \
                 for a plain directory)",
                p.display(),
                p.display()
            )));
        };
        let below =
            zfs(&program, &["list", "-H", "-o", "name", "-r", "-t", "filesystem,volume", &ds], "listing datasets")?;
        let below: Vec<&str> = below.lines().filter(|l| *l != ds).collect();
        if !below.is_empty() {
            return Err(PluginError::invalid(format!(
                "the root {} is the dataset {ds}, which has datasets below it ({}): zfs send moves one dataset, so                  their files would not arrive; name each as a root of its own, or use --fs rsync",
                p.display(),
                below.join(", ")
            )));
        }
        sweep_dead_runs(&program, &ds);
        roots.push((real, ds));
    }
    let timeout = seconds(args, "io-timeout", 300)?;
    let n = roots.len();
    Ok(ZfsSender {
        host: Host::new(args.host, "zfs"),
        chan: kit::channel(args, "zfs", timeout)?,
        zfs: program,
        roots,
        token: phaul_fs_mark::new_token(),
        snaps: vec![Vec::new(); n],
    })
}

impl ZfsSender {
    fn send_one(&mut self, i: usize, info: &FsRoundInfo) -> PluginResult<u64> {
        let (root, ds) = self.roots[i].clone();
        let snap = format!("{ds}@phaul-{}-r{}", self.token, info.number);
        zfs(&self.zfs, &["snapshot", &snap], &format!("taking a snapshot of {ds} ({})", root.display()))?;
        let base = self.snaps[i].last().cloned();
        self.snaps[i].push(snap.clone());
        let start = Start { round: info.number, index: i as u16, pass: PASS_SEND, is_final: info.is_final };
        self.chan.send_start(start).map_err(io_err("starting a zfs session on the filesystem channel"))?;
        let mut cmd = Command::new(&self.zfs);
        cmd.arg("send");
        if let Some(b) = &base {
            cmd.arg("-i").arg(b);
        }
        cmd.arg(&snap);
        let kit::ToolRun { relayed, code: status, stderr } = kit::send_from(&mut self.chan, cmd);
        let relayed = relayed.map_err(io_err("the filesystem channel broke during zfs send"))?;
        let done = self.chan.recv_done().map_err(io_err("reading the destination's zfs verdict"))?;
        if !done.ok {
            return Err(PluginError::failed(format!(
                "zfs recv on the destination failed for {ds} ({}) (exit {}): {}",
                root.display(),
                done.code,
                if done.message.is_empty() { "it gave no reason" } else { done.message.as_str() }
            )));
        }
        if status != 0 {
            return Err(PluginError::failed(format!(
                "zfs send failed for {ds} (exit {status}): {}",
                tail(&stderr, 2000)
            )));
        }
        // The previous snapshot is not needed any more; in the frozen round it waits for finish (each destroy is
        // a transaction group, downtime spent on nothing the workload needs).
        while self.snaps[i].len() > 1 && !info.is_final {
            let old = self.snaps[i].remove(0);
            if let Err(e) = destroy(&self.zfs, &old) {
                log::warn!("{}", e.message);
            }
        }
        Ok(relayed.sent)
    }

    fn round_inner(&mut self, info: &FsRoundInfo) -> PluginResult<FsRound> {
        let mut bytes = 0;
        for i in 0..self.roots.len() {
            bytes += self.send_one(i, info)?;
            self.host.progress(&format!("zfs round {}", info.number), (i + 1) as u64, self.roots.len() as u64);
        }
        self.chan.send_end(info.number, self.roots.len() as u32).map_err(io_err("ending the zfs round"))?;
        Ok(FsRound::moved(bytes, 0))
    }
}

impl FsSender for ZfsSender {
    fn round(&mut self, info: &FsRoundInfo) -> PluginResult<FsRound> {
        let r = self.round_inner(info);
        kit::abort_on_error(&mut self.chan, r)
    }

    fn persistent_inodes(&self) -> bool {
        true
    }

    fn finish(&mut self, outcome: Outcome) -> PluginResult<()> {
        let mut errors = Vec::new();
        for s in self.snaps.iter_mut().flat_map(std::mem::take) {
            if let Err(e) = destroy(&self.zfs, &s) {
                errors.push(e.message.to_string());
            }
        }
        if outcome == Outcome::MIGRATED {
            for (_, ds) in &self.roots {
                let set = format!("{OWNER}={}", phaul_fs_mark::MIGRATED_AWAY);
                if let Err(e) = zfs(&self.zfs, &["set", &set, ds], &format!("marking {ds} as migrated away")) {
                    log::warn!("{}", e.message);
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PluginError::failed(format!("removing the source's snapshots: {}", errors.join("; "))))
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Destination

/// The datasets receiving runs of this process have claimed (phaul serve runs sessions at once).
fn in_use() -> &'static Mutex<HashSet<String>> {
    static IN_USE: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    IN_USE.get_or_init(Default::default)
}

struct Received {
    /// Where the workload's files are to be (the dataset's mount point).
    dir: PathBuf,
    dataset: String,
    /// The target directory existed before this run (else roll-back removes the empty mount point zfs made).
    dir_existed: bool,
    /// The snapshots received so far that still exist, by name (after `@`) and GUID (the latest is the base of
    /// the next stream).
    snapshots: Vec<(String, u64)>,
}

impl Drop for Received {
    fn drop(&mut self) {
        in_use().lock().unwrap_or_else(|p| p.into_inner()).remove(&self.dataset);
    }
}

struct ZfsReceiver {
    chan: Channel,
    zfs: PathBuf,
    token: String,
    roots: Vec<Received>,
    sources: Vec<String>,
}

/// Whether `path` is absolute, with no `.` or `..` components.
fn plain_path(path: &Path) -> bool {
    path.is_absolute() && path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

fn receiver(args: &FsArgs) -> PluginResult<ZfsReceiver> {
    check_known(args, &["map", "allow", "parent", "zfs", "io-timeout"], "zfs", "destination")?;
    let program = kit::find_program(args.option("zfs"), "zfs", "zfs", "destination", PACKAGE)?;
    let placement = Placement::new(options(&args.options, "map"), options(&args.options, "allow"), "zfs")
        .map_err(|e| PluginError::invalid(e.0))?;
    let parent_opt = args.option("parent").map(str::to_string);
    if let Some(p) = &parent_opt {
        if !p.split('/').all(plain_name) || property(&program, p, "type")?.as_deref() != Some("filesystem") {
            return Err(PluginError::invalid(format!(
                "--fs-opt zfs:parent={p}: no such ZFS filesystem on this host (zfs list shows the ones there are)"
            )));
        }
    }
    let timeout = seconds(args, "io-timeout", 300)?;
    let chan = kit::channel(args, "zfs", timeout)?;
    if args.roots.len() > usize::from(u16::MAX) {
        return Err(PluginError::invalid(format!("the source names {} roots; at most 65535", args.roots.len())));
    }
    let hint = "map it elsewhere with phaul serve --fs-opt zfs:map=SOURCE-DIR=DESTINATION-DIR";
    let token = phaul_fs_mark::new_token();
    let mut rx = ZfsReceiver {
        chan,
        zfs: program,
        token,
        roots: Vec::new(),
        sources: args.roots.iter().map(|r| r.to_string()).collect(),
    };
    for r in args.roots.iter() {
        if let Err(e) = rx.claim(r.as_str(), &placement, parent_opt.as_deref(), hint) {
            rx.roll_back_all();
            return Err(e);
        }
    }
    Ok(rx)
}

impl ZfsReceiver {
    /// Claims the target for the source's root `r`: works out the dataset, refuses what is not phaul's, creates
    /// it (unmounted, marked).
    fn claim(&mut self, r: &str, placement: &Placement, parent_opt: Option<&str>, hint: &str) -> PluginResult<()> {
        let Some(dir) = placement.target(r) else {
            return Err(PluginError::invalid(format!(
                "this destination does not accept the source's dataset at {r}: phaul serve receives only into places \
                 its operator named (--fs-opt zfs:map={r}=DESTINATION-DIR, or zfs:allow=PARENT-DIR to receive it at \
                 the same path)"
            )));
        };
        if !plain_path(&dir) || dir.to_string_lossy().chars().any(|c| c.is_control() || c == '\\') {
            return Err(PluginError::invalid(format!(
                "cannot receive {r} into {}: the path must be absolute, without '.' or '..', control characters or                  backslashes",
                dir.display()
            )));
        }
        if symlink_on_the_way(&dir) {
            return Err(PluginError::invalid(format!(
                "cannot receive {r} into {}: a symbolic link is on the way, and phaul mounts only where the path                  itself leads; {hint}",
                dir.display()
            )));
        }
        if let Some(o) = self.roots.iter().find(|o| o.dir.starts_with(&dir) || dir.starts_with(&o.dir)) {
            return Err(PluginError::invalid(format!(
                "the source's root {r} would be received into {}, which is {} or holds it or lies inside it; each \
                 root must go to a place of its own",
                dir.display(),
                o.dir.display()
            )));
        }
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !plain_name(&name) {
            return Err(PluginError::invalid(format!(
                "cannot receive {r} into {}: {name:?} is not a name ZFS takes for a dataset (letters, digits, \
                 '_', '-', '.', ':'); {hint}",
                dir.display()
            )));
        }
        let parent_dir = dir.parent().unwrap_or(Path::new("/"));
        let (parent, own_mountpoint) = match parent_opt {
            Some(p) => (p.to_string(), true),
            None => match dataset_at(&self.zfs, parent_dir)? {
                Some(p) => (p, false),
                None => {
                    return Err(PluginError::invalid(format!(
                        "cannot receive {r} into {}: {} is not the mount point of a ZFS filesystem on this host, so \
                         there is no dataset to receive it under; name one with --fs-opt zfs:parent=POOL/FS (the \
                         new dataset is then mounted at {}), or {hint}",
                        dir.display(),
                        parent_dir.display(),
                        dir.display()
                    )))
                }
            },
        };
        let dataset = format!("{parent}/{name}");
        if !in_use().lock().unwrap_or_else(|p| p.into_inner()).insert(dataset.clone()) {
            return Err(PluginError::invalid(format!(
                "cannot receive {r} into {dataset}: another migration to this host is receiving into it now"
            )));
        }
        // From here on, dropping `rec` releases the claim.
        let mut rec =
            Received { dir: dir.clone(), dataset: dataset.clone(), dir_existed: dir.exists(), snapshots: vec![] };
        let existing = mark(&self.zfs, &dataset)?;
        if let Some(Some(m)) = &existing {
            if m == phaul_fs_mark::MIGRATED_AWAY {
                return Err(PluginError::invalid(format!(
                    "cannot receive {r} into {dataset}: it is the dataset this workload left when it migrated away \
                     from this host, and phaul does not overwrite it (it may be the only older copy of the data): to \
                     migrate back, destroy it (zfs destroy -r {dataset}) or rename it (zfs rename {dataset} \
                     {parent}/OTHER-NAME) first; {hint}"
                )));
            }
            if let Some(token) = m.strip_prefix(MOUNTED) {
                return Err(PluginError::invalid(format!(
                    "cannot receive {r} into {dataset}: a phaul run ({token}) mounted it and did not finish, so a \
                     restored workload may be running in it; see whether one is, then destroy the dataset by hand \
                     (zfs destroy -r {dataset}) or clear the mark (zfs inherit {OWNER} {dataset})"
                )));
            }
            if !m.starts_with(RECEIVING) {
                return Err(PluginError::invalid(format!(
                    "cannot receive {r} into {dataset}: it carries the mark {OWNER}={m:?}, which is not this \
                     version of phaul's; {hint}"
                )));
            }
        } else if existing.is_some() {
            return Err(PluginError::invalid(format!(
                "cannot receive {r} into {dataset}: that dataset exists and phaul did not make it; destroy or \
                 rename it, or {hint}"
            )));
        }
        if is_mount_point(&dir) {
            return Err(PluginError::invalid(format!(
                "cannot receive {r} into {}: something is mounted there; {hint}",
                dir.display()
            )));
        }
        if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(PluginError::invalid(format!(
                "cannot receive {r} into {}: that directory holds files phaul did not put there, and the received \
                 dataset would be mounted over them; {hint}",
                dir.display()
            )));
        }
        if std::fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
            return Err(PluginError::invalid(format!(
                "cannot receive {r} into {}: it exists and is not a directory; {hint}",
                dir.display()
            )));
        }
        if let Some(Some(m)) = existing {
            self.take_leftover(&dataset, &m, r)?;
        }
        let marked = format!("{OWNER}={RECEIVING}{}", self.token);
        let mut create: Vec<String> = vec!["create".into(), "-o".into(), "canmount=noauto".into(), "-o".into(), marked];
        if own_mountpoint {
            create.extend(["-o".into(), format!("mountpoint={}", dir.display())]);
        }
        create.push(dataset.clone());
        let create: Vec<&str> = create.iter().map(String::as_str).collect();
        zfs(&self.zfs, &create, &format!("creating {dataset} to receive {r}"))?;
        rec.dir_existed = rec.dir_existed || dir.exists();
        self.roots.push(rec);
        Ok(())
    }

    /// Destroys `dataset`, a failed receiving run's leftover marked `m`, if nothing says it is in use: it is not
    /// mounted, has no dataset below it, the phaul process that made it is gone, and the mark is still `m` just
    /// before (another process may have taken it meanwhile).
    fn take_leftover(&self, dataset: &str, m: &str, r: &str) -> PluginResult<()> {
        let token = m.strip_prefix(RECEIVING).unwrap_or(m);
        let refuse = |why: String| {
            PluginError::invalid(format!(
                "cannot receive {r} into {dataset}: a phaul run ({token}) was receiving into it, and {why}; if that \
                 run is over, destroy the dataset (zfs destroy -r {dataset}) and try again"
            ))
        };
        if let Some(pid) = token.split('-').next().and_then(|p| p.parse::<u32>().ok()) {
            if pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists() {
                return Err(refuse(format!("its process (pid {pid}) still exists")));
            }
        }
        if property(&self.zfs, dataset, "mounted")?.as_deref() == Some("yes") {
            return Err(refuse("it is mounted".into()));
        }
        let below = zfs(&self.zfs, &["list", "-H", "-o", "name", "-r", "-t", "filesystem,volume", dataset], "listing")?;
        if below.lines().any(|l| l != dataset) {
            return Err(refuse("datasets phaul did not receive are below it".into()));
        }
        if mark(&self.zfs, dataset)?.flatten().as_deref() != Some(m) {
            return Err(refuse("its mark changed while this run looked at it".into()));
        }
        log::info!("destroying {dataset}, left by a failed migration ({m})");
        destroy_dataset(&self.zfs, dataset)
    }

    /// Whether `dataset` still carries this run's mark (the only condition under which phaul destroys it).
    fn ours(&self, dataset: &str) -> bool {
        let m = mark(&self.zfs, dataset).ok().flatten().flatten();
        m.is_some_and(|m| m == format!("{RECEIVING}{}", self.token) || m == format!("{MOUNTED}{}", self.token))
    }

    fn roll_back_all(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for rec in std::mem::take(&mut self.roots) {
            if self.ours(&rec.dataset) {
                match destroy_dataset(&self.zfs, &rec.dataset) {
                    // The empty mount point zfs made goes too (only a directory, only through plain paths).
                    Ok(()) if !rec.dir_existed && !symlink_on_the_way(&rec.dir) => {
                        let _ = std::fs::remove_dir(&rec.dir);
                    }
                    Ok(()) => {}
                    Err(e) => errors.push(e.message.to_string()),
                }
            }
        }
        errors
    }

    fn receive_session(&mut self, st: Start) -> PluginResult<Done> {
        let Some(rec) = self.roots.get(st.index as usize).filter(|_| st.pass == PASS_SEND) else {
            let _ = self.chan.relay(None, None);
            let d = Done {
                ok: false,
                code: -1,
                bytes: 0,
                message: format!(
                    "the source asked for root {} pass {}, which this receiver does not have",
                    st.index, st.pass
                ),
            };
            self.chan.send_done(&d).map_err(io_err("answering the source"))?;
            return Ok(d);
        };
        let dataset = rec.dataset.clone();
        let base = rec.snapshots.last().map(|s| s.1).unwrap_or(0);
        let gate = Arc::new(Mutex::new(Gate::new(base)));
        let refused: Arc<Mutex<Option<String>>> = Arc::default();
        let mut cmd = Command::new(&self.zfs);
        cmd.args(["recv", "-u", "-F", &dataset]);
        let (g, r) = (gate.clone(), refused.clone());
        let run = kit::receive_into(&mut self.chan, cmd, move |stdin| {
            Box::new(Gated { inner: stdin, gate: g, refused: r }) as Box<dyn Write + Send>
        });
        let relayed = run.relayed.map_err(io_err("the filesystem channel broke during zfs recv"))?;
        let mut done =
            Done { ok: run.code == 0, code: run.code, bytes: relayed.received, message: tail(&run.stderr, 2000) };
        let refusal = refused.lock().unwrap_or_else(|p| p.into_inner()).take();
        let begin = gate.lock().unwrap_or_else(|p| p.into_inner()).begin().cloned();
        if let Some(why) = refusal {
            done = Done { ok: false, code: -1, bytes: done.bytes, message: format!("the stream was refused: {why}") };
        }
        if done.ok {
            // What arrived must be the snapshot the stream announced.
            let got = begin.as_ref().map(|b| {
                let guid = property(&self.zfs, &format!("{dataset}@{}", b.snapshot), "guid");
                (b, guid.ok().flatten().and_then(|g| g.parse::<u64>().ok()))
            });
            match got {
                Some((b, Some(g))) if g == b.to_guid => {
                    let rec = &mut self.roots[st.index as usize];
                    rec.snapshots.push((b.snapshot.clone(), g));
                    // As on the source, the frozen round leaves the older snapshot to finish.
                    while rec.snapshots.len() > 1 && !st.is_final {
                        let (old, _) = rec.snapshots.remove(0);
                        if let Err(e) = destroy(&self.zfs, &format!("{dataset}@{old}")) {
                            log::warn!("{}", e.message);
                        }
                    }
                }
                _ => {
                    done = Done {
                        ok: false,
                        code: -1,
                        bytes: done.bytes,
                        message: format!("zfs recv did not leave the snapshot the stream announced on {dataset}"),
                    }
                }
            }
        }
        self.chan.send_done(&done).map_err(io_err("answering the source"))?;
        Ok(done)
    }

    /// After the final round: each dataset mounted at its target.
    fn mount_targets(&mut self) -> PluginResult<()> {
        for rec in &self.roots {
            if !self.ours(&rec.dataset) {
                return Err(PluginError::failed(format!("{} no longer carries this run's mark", rec.dataset)));
            }
            // The path may have changed since the claim: still no symbolic link on the way, nothing in the way.
            if symlink_on_the_way(&rec.dir)
                || is_mount_point(&rec.dir)
                || std::fs::read_dir(&rec.dir).is_ok_and(|mut d| d.next().is_some())
            {
                return Err(PluginError::failed(format!(
                    "{} changed while the dataset was received (a symbolic link, a mount or files are there now); \
                     phaul does not mount over it",
                    rec.dir.display()
                )));
            }
            let mounted = format!("{OWNER}={MOUNTED}{}", self.token);
            zfs(&self.zfs, &["set", &mounted, &rec.dataset], &format!("marking {} as mounted", rec.dataset))?;
            zfs(&self.zfs, &["set", "canmount=on", &rec.dataset], &format!("letting {} be mounted", rec.dataset))?;
            zfs(&self.zfs, &["mount", &rec.dataset], &format!("mounting {} at {}", rec.dataset, rec.dir.display()))?;
        }
        Ok(())
    }
}

/// `zfs recv`'s stdin behind the begin-record check: nothing reaches it before the record was accepted; a
/// refusal ends the stream there (recv then fails on a cut stream).
struct Gated {
    inner: std::process::ChildStdin,
    gate: Arc<Mutex<Gate>>,
    refused: Arc<Mutex<Option<String>>>,
}

impl Write for Gated {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let pass = self.gate.lock().unwrap_or_else(|p| p.into_inner()).feed(buf).map(|c| c.into_owned());
        match pass {
            Ok(out) => {
                self.inner.write_all(&out)?;
                Ok(buf.len())
            }
            Err(why) => {
                self.refused.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why.clone());
                Err(std::io::Error::other(why))
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl SessionReceiver for ZfsReceiver {
    fn channel(&mut self) -> &mut Channel {
        &mut self.chan
    }

    fn session(&mut self, st: Start, _is_final: bool) -> PluginResult<Done> {
        self.receive_session(st)
    }
}

impl FsReceiver for ZfsReceiver {
    fn wait_round(&mut self, info: &FsRoundInfo) -> PluginResult<FsRound> {
        let roots = self.roots.len();
        let bytes = receive_round(self, info, roots, PASS_SEND, "zfs", "zfs recv failed")?;
        if info.is_final {
            self.mount_targets()?;
        }
        Ok(FsRound::moved(bytes, 0))
    }

    fn prepared(&mut self) -> PluginResult<Vec<KeyValue>> {
        let mut out = Vec::new();
        for (s, r) in self.sources.iter().zip(&self.roots) {
            out.push(KeyValue::new("root-map", format!("{s}={}", r.dir.display())));
        }
        if let Some(r) = self.roots.first() {
            out.push(KeyValue::new("root", r.dir.display().to_string()));
        }
        Ok(out)
    }

    fn finish(&mut self, outcome: Outcome) -> PluginResult<()> {
        let mut errors = Vec::new();
        if outcome == Outcome::MIGRATED {
            for rec in &mut self.roots {
                for (snap, _) in rec.snapshots.drain(..) {
                    if let Err(e) = destroy(&self.zfs, &format!("{}@{snap}", rec.dataset)) {
                        errors.push(e.message.to_string());
                    }
                }
                // The workload's dataset now, like any other: the mark goes.
                if let Err(e) = zfs(&self.zfs, &["inherit", OWNER, &rec.dataset], "removing phaul's mark") {
                    errors.push(e.message.to_string());
                }
            }
            // Dropping the records releases the claims.
            self.roots.clear();
        } else {
            errors.extend(self.roll_back_all());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PluginError::failed(format!("cleaning up what was received: {}", errors.join("; "))))
        }
    }
}

phaul_abi::export_fs_driver!(
    name: "zfs",
    description: "ZFS datasets: a snapshot per round, zfs send -i into zfs recv, the last one frozen",
    sender: sender,
    receiver: receiver,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_phaul_gives_its_snapshots_say_whose_they_are() {
        assert_eq!(snapshot_owner("phaul-4316-87d7714c84ba9c74-172314-r3"), Some(4316));
        for other in ["phaul-x-1-2-r3", "phaul-1-zz-2-r3", "phaul-1-ab-2-3", "daily", "phaul-1-ab-2-r3-extra", "phaul-"]
        {
            assert_eq!(snapshot_owner(other), None, "{other}");
        }
    }
}
