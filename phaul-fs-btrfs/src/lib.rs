//! The `btrfs` filesystem driver: a workload's root is a btrfs subvolume; each round takes a read-only snapshot
//! of it and sends it with `btrfs send` (from round 2 on, `-p` the previous round's snapshot, so only what changed
//! travels) into `btrfs receive` on the destination, over phaul's filesystem channel (one substream per root and
//! round, see `phaul-fs-stream`). After the final round, taken while the workload is frozen, the destination makes
//! a writable snapshot of the last received one at the target path: the workload's subvolume on B.
//!
//! Snapshots are temporary on both sides: the source keeps only the latest (the parent of the next round) and
//! deletes it at the end, whatever the outcome; the destination does the same with what it received. The
//! source's subvolume is never touched (after a migration away it carries the `migrated-away` mark).
//!
//! Source options (`--fs-opt KEY=VALUE`): `btrfs=PATH` (the btrfs program; default from PATH),
//! `io-timeout=SECONDS` (300). The roots are the host type's (`--htype-opt root=DIR` for `pid`); each must be a
//! subvolume.
//!
//! Destination options (`phaul serve --fs-opt btrfs:KEY=VALUE`): `map=SOURCE-DIR=DESTINATION-DIR` and
//! `allow=DIR` (as for rsync: where roots may be received), `btrfs=PATH`, `io-timeout=SECONDS`. A target must not
//! exist (btrfs makes a new subvolume there), except a leftover of a failed phaul run, which is removed first. A
//! migration back to a host that still has the subvolume the workload left is refused with what to do: btrfs
//! receive cannot update a subvolume in place, and a full send back would need the old one out of the way.
//!
//! btrfs receive recreates every file, so inode numbers do not survive: `persistent_inodes` is false.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use phaul_abi::{
    options, FsArgs, FsReceiver, FsRound, FsRoundInfo, FsSender, Host, KeyValue, Outcome, PluginError, PluginResult,
};
use phaul_fs_mark::{Claim, Placement, Target};
use phaul_fs_stream::kit::{self, check_known, io_err, receive_round, seconds, SessionReceiver};
use phaul_fs_stream::{tail, Channel, Done, Start};

use phaul_fs_stream::btrfs_send::{StreamCheck, Uuid};

/// The one pass of a btrfs session: a send stream.
const PASS_SEND: u8 = 1;
/// A subvolume's root directory has this inode number on btrfs.
const SUBVOLUME_ROOT_INO: u64 = 256;

/// Whether `path` is on a btrfs filesystem.
fn on_btrfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC)
}

/// Whether `path` is the root of a btrfs subvolume.
fn is_subvolume(path: &Path) -> bool {
    on_btrfs(path) && std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.ino() == SUBVOLUME_ROOT_INO)
}

/// Runs `btrfs ARGS`; its stdout, or an error with its stderr.
fn btrfs(program: &Path, args: &[&std::ffi::OsStr], what: &str) -> PluginResult<String> {
    kit::run_tool(program, args, &[], what)
}

/// The subvolume id of `path`, which must be a subvolume's root itself (not a symbolic link to one).
fn subvolume_id(program: &Path, path: &Path) -> PluginResult<u64> {
    if !is_subvolume(path) {
        return Err(PluginError::failed(format!("{} is not a subvolume (any more)", path.display())));
    }
    let out =
        btrfs(program, &["inspect-internal".as_ref(), "rootid".as_ref(), path.as_os_str()], "reading a subvolume id")?;
    out.trim().parse().map_err(|_| PluginError::failed(format!("btrfs printed no subvolume id for {}", path.display())))
}

/// The mount point `path` is under (the longest one in /proc/self/mountinfo that holds it): a mount's root is a
/// subvolume, which `btrfs subvolume delete --subvolid` needs as its path.
fn mount_point(path: &Path) -> PathBuf {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.components().count())
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Deletes subvolume `id` of the filesystem `on` is on (by id: a path inside received data could have been
/// renamed or redirected by what was received).
fn delete_subvolume_id(program: &Path, on: &Path, id: u64) -> PluginResult<()> {
    let on = &mount_point(on);
    let id_text = id.to_string();
    btrfs(
        program,
        &["subvolume".as_ref(), "delete".as_ref(), "--subvolid".as_ref(), id_text.as_ref(), on.as_os_str()],
        &format!("deleting subvolume {id} under {}", on.display()),
    )
    .map(|_| ())
}

fn delete_subvolume(program: &Path, path: &Path) -> PluginResult<()> {
    btrfs(
        program,
        &["subvolume".as_ref(), "delete".as_ref(), path.as_os_str()],
        &format!("deleting {}", path.display()),
    )
    .map(|_| ())
}

// ---------------------------------------------------------------------------------------------------------------
// Source

struct BtrfsSender {
    host: Host,
    chan: Channel,
    btrfs: PathBuf,
    roots: Vec<PathBuf>,
    token: String,
    /// Per root: the snapshots that exist (the last is the parent of the next round's send; the ones before it
    /// are deleted once a round succeeded, all of them at the end).
    snaps: Vec<Vec<PathBuf>>,
}

fn sender(args: &FsArgs) -> PluginResult<BtrfsSender> {
    check_known(args, &["btrfs", "io-timeout"], "btrfs", "source")?;
    let program = kit::find_program(args.option("btrfs"), "btrfs", "btrfs", "source", "btrfs-progs")?;
    if args.roots.is_empty() {
        return Err(PluginError::invalid(
            "the btrfs filesystem driver has nothing to send: the host type names no root (for the pid host type, \
             pass --htype-opt root=SUBVOLUME)",
        ));
    }
    let mut roots = Vec::new();
    for r in args.roots.iter() {
        let p = PathBuf::from(r.as_str());
        if !p.is_absolute() || !p.is_dir() {
            return Err(PluginError::not_found(format!("the root {} is not a directory on the source", p.display())));
        }
        if !is_subvolume(&p) {
            return Err(PluginError::invalid(format!(
                "the root {} is not a btrfs subvolume{} (the btrfs driver sends subvolumes; make it one with btrfs \
                 subvolume create, or use --fs rsync for a plain directory)",
                p.display(),
                if on_btrfs(&p) { "" } else { ": it is not even on btrfs" }
            )));
        }
        roots.push(p);
    }
    let timeout = seconds(args, "io-timeout", 300)?;
    let n = roots.len();
    Ok(BtrfsSender {
        host: Host::new(args.host, "btrfs"),
        chan: kit::channel(args, "btrfs", timeout)?,
        btrfs: program,
        roots,
        token: phaul_fs_mark::new_token(),
        snaps: vec![Vec::new(); n],
    })
}

impl BtrfsSender {
    fn snapshot_path(&self, root: &Path, round: u32) -> PathBuf {
        let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "root".into());
        root.with_file_name(format!(".phaul-{name}-{}-r{round}", self.token))
    }

    fn send_one(&mut self, i: usize, info: &FsRoundInfo) -> PluginResult<u64> {
        let root = self.roots[i].clone();
        let snap = self.snapshot_path(&root, info.number);
        btrfs(
            &self.btrfs,
            &["subvolume".as_ref(), "snapshot".as_ref(), "-r".as_ref(), root.as_os_str(), snap.as_os_str()],
            &format!("taking a read-only snapshot of {}", root.display()),
        )?;
        let parent = self.snaps[i].last().cloned();
        self.snaps[i].push(snap.clone());
        let start = Start { round: info.number, index: i as u16, pass: PASS_SEND, is_final: info.is_final };
        self.chan.send_start(start).map_err(io_err("starting a btrfs session on the filesystem channel"))?;
        let mut cmd = Command::new(&self.btrfs);
        cmd.arg("send").arg("-q");
        if let Some(p) = &parent {
            cmd.arg("-p").arg(p);
        }
        cmd.arg(&snap);
        let kit::ToolRun { relayed, code: status, stderr } = kit::send_from(&mut self.chan, cmd);
        let relayed = relayed.map_err(io_err("the filesystem channel broke during btrfs send"))?;
        let done = self.chan.recv_done().map_err(io_err("reading the destination's btrfs verdict"))?;
        if !done.ok {
            return Err(PluginError::failed(format!(
                "btrfs receive on the destination failed for {} (exit {}): {}",
                root.display(),
                done.code,
                if done.message.is_empty() { "it gave no reason" } else { done.message.as_str() }
            )));
        }
        if status != 0 {
            return Err(PluginError::failed(format!(
                "btrfs send failed for {} (exit {status}): {}",
                root.display(),
                tail(&stderr, 2000)
            )));
        }
        // The new snapshot is the next parent; the ones before are not needed any more.
        while self.snaps[i].len() > 1 {
            let old = self.snaps[i].remove(0);
            if let Err(e) = delete_subvolume(&self.btrfs, &old) {
                log::warn!("{}", e.message);
            }
        }
        Ok(relayed.sent)
    }

    fn round_inner(&mut self, info: &FsRoundInfo) -> PluginResult<FsRound> {
        let mut bytes = 0;
        for i in 0..self.roots.len() {
            bytes += self.send_one(i, info)?;
            self.host.progress(&format!("btrfs round {}", info.number), (i + 1) as u64, self.roots.len() as u64);
        }
        self.chan.send_end(info.number, self.roots.len() as u32).map_err(io_err("ending the btrfs round"))?;
        Ok(FsRound::moved(bytes, 0))
    }
}

impl FsSender for BtrfsSender {
    fn round(&mut self, info: &FsRoundInfo) -> PluginResult<FsRound> {
        let r = self.round_inner(info);
        kit::abort_on_error(&mut self.chan, r)
    }

    fn persistent_inodes(&self) -> bool {
        false
    }

    fn finish(&mut self, outcome: Outcome) -> PluginResult<()> {
        let mut errors = Vec::new();
        for s in self.snaps.iter_mut().flat_map(std::mem::take) {
            if let Err(e) = delete_subvolume(&self.btrfs, &s) {
                errors.push(e.message.to_string());
            }
        }
        if outcome == Outcome::MIGRATED {
            for r in &self.roots {
                if let Err(e) = phaul_fs_mark::set_mark(r, phaul_fs_mark::MIGRATED_AWAY) {
                    log::warn!("cannot mark {} as migrated away: {e}", r.display());
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

struct Received {
    /// The workload's subvolume-to-be (claimed as a directory; the final round puts the subvolume there).
    target: Target,
    /// Where `btrfs receive` puts the snapshots (next to the target, on the same filesystem).
    incoming: Target,
    /// The snapshots received so far that still exist, by path and subvolume id (the latest is the next
    /// round's parent).
    snapshots: Vec<(PathBuf, u64)>,
    /// The UUID the latest received stream gave its subvolume: the only parent the next stream may name.
    last_uuid: Option<Uuid>,
    /// The final round made the writable subvolume at the target.
    made: bool,
}

struct BtrfsReceiver {
    chan: Channel,
    btrfs: PathBuf,
    roots: Vec<Received>,
    sources: Vec<String>,
}

fn refuse_and_release(roots: &[Received], extra: Option<&Target>) {
    for r in roots {
        let _ = r.incoming.roll_back();
        let _ = r.target.roll_back();
    }
    if let Some(t) = extra {
        let _ = t.roll_back();
    }
}

fn receiver(args: &FsArgs) -> PluginResult<BtrfsReceiver> {
    check_known(args, &["map", "allow", "btrfs", "io-timeout"], "btrfs", "destination")?;
    let program = kit::find_program(args.option("btrfs"), "btrfs", "btrfs", "destination", "btrfs-progs")?;
    let placement = Placement::new(options(&args.options, "map"), options(&args.options, "allow"), "btrfs")
        .map_err(|e| PluginError::invalid(e.0))?;
    let timeout = seconds(args, "io-timeout", 300)?;
    let chan = kit::channel(args, "btrfs", timeout)?;
    if args.roots.len() > usize::from(u16::MAX) {
        return Err(PluginError::invalid(format!("the source names {} roots; at most 65535", args.roots.len())));
    }
    let token = phaul_fs_mark::new_token();
    let hint = "map it elsewhere with phaul serve --fs-opt btrfs:map=SOURCE-DIR=DESTINATION-DIR";
    let mut roots: Vec<Received> = Vec::new();
    for (i, r) in args.roots.iter().enumerate() {
        let Some(dst) = placement.target(r.as_str()) else {
            refuse_and_release(&roots, None);
            return Err(PluginError::invalid(format!(
                "this destination does not accept the source's subvolume {r}: phaul serve receives only into places \
                 its operator named (--fs-opt btrfs:map={r}=DESTINATION-DIR, or btrfs:allow=PARENT-DIR to receive \
                 it at the same path)"
            )));
        };
        if let Some(o) = roots.iter().find(|o| o.target.path.starts_with(&dst) || dst.starts_with(&o.target.path)) {
            let clash = o.target.path.display().to_string();
            refuse_and_release(&roots, None);
            return Err(PluginError::invalid(format!(
                "the source's subvolume {r} would be received into {}, which is {clash} or holds it or lies inside it; \
                 each root must go to a place of its own",
                dst.display()
            )));
        }
        let parent = dst.parent().unwrap_or(Path::new("/")).to_path_buf();
        if !on_btrfs(&parent) {
            refuse_and_release(&roots, None);
            return Err(PluginError::invalid(format!(
                "cannot receive {r} into {}: {} is not on a btrfs filesystem on this host (btrfs receive needs \
                 one); {hint}",
                dst.display(),
                parent.display()
            )));
        }
        let mut target = phaul_fs_mark::claim(&dst, &token, hint).map_err(|e| {
            refuse_and_release(&roots, None);
            PluginError::invalid(e.0)
        })?;
        if target.claim == Claim::Leftover {
            // A failed run's target: remove it (a subvolume it made, or its directory), then start afresh.
            if is_subvolume(&target.path) {
                let _ = delete_subvolume(&program, &target.path);
            }
            let _ = target.roll_back();
            drop(target);
            target = phaul_fs_mark::claim(&dst, &token, hint).map_err(|e| {
                refuse_and_release(&roots, None);
                PluginError::invalid(e.0)
            })?;
        }
        if target.claim != Claim::Created {
            let why = if target.claim == Claim::MigratedAway {
                "it is the subvolume this workload left when it migrated away from this host, and btrfs receive \
                 cannot update a subvolume in place: to migrate back, delete it (btrfs subvolume delete) or move it \
                 away first"
                    .to_string()
            } else {
                "it is an empty directory, and btrfs receive makes a new subvolume there: remove it first".to_string()
            };
            refuse_and_release(&roots, Some(&target));
            return Err(PluginError::invalid(format!("cannot receive {r} into {}: {why}; {hint}", dst.display())));
        }
        let incoming_path = parent.join(format!(".phaul-incoming-{token}-{i}"));
        let incoming = phaul_fs_mark::claim(&incoming_path, &token, hint).map_err(|e| {
            refuse_and_release(&roots, Some(&target));
            PluginError::invalid(e.0)
        })?;
        let _ = std::fs::set_permissions(&incoming.path, std::os::unix::fs::PermissionsExt::from_mode(0o700));
        roots.push(Received { target, incoming, snapshots: Vec::new(), last_uuid: None, made: false });
    }
    Ok(BtrfsReceiver { chan, btrfs: program, roots, sources: args.roots.iter().map(|r| r.to_string()).collect() })
}

impl BtrfsReceiver {
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
        let dir = rec.incoming.path.clone();
        let before: Vec<PathBuf> = list(&dir);
        let check = Arc::new(Mutex::new(StreamCheck::new(rec.last_uuid)));
        let refused: Arc<Mutex<Option<String>>> = Arc::default();
        // --chroot: what the stream names stays inside the incoming directory (and the check refuses what
        // --chroot does not cover).
        let mut cmd = Command::new(&self.btrfs);
        cmd.arg("receive").arg("--chroot").arg(&dir);
        let (c, r) = (check.clone(), refused.clone());
        let run = kit::receive_into(&mut self.chan, cmd, move |stdin| {
            Box::new(Checked { inner: stdin, check: c, refused: r }) as Box<dyn Write + Send>
        });
        let relayed = run.relayed.map_err(io_err("the filesystem channel broke during btrfs receive"))?;
        let mut done =
            Done { ok: run.code == 0, code: run.code, bytes: relayed.received, message: tail(&run.stderr, 2000) };
        let refusal = refused.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (complete, own) = {
            let c = check.lock().unwrap_or_else(|p| p.into_inner());
            (c.complete(), c.own_uuid())
        };
        if let Some(why) = refusal {
            done = Done { ok: false, code: -1, bytes: done.bytes, message: format!("the stream was refused: {why}") };
        } else if done.ok && !complete {
            done = Done { ok: false, code: -1, bytes: done.bytes, message: "the stream ended before its end".into() };
        }
        let new: Vec<PathBuf> = list(&dir).into_iter().filter(|p| !before.contains(p)).collect();
        let rec = &mut self.roots[st.index as usize];
        match (done.ok, new.as_slice()) {
            (true, [one]) if is_subvolume(one) => {
                let id = subvolume_id(&self.btrfs, one)?;
                rec.snapshots.push((one.clone(), id));
                rec.last_uuid = own;
                // Only the latest is needed (the parent of the next stream).
                while rec.snapshots.len() > 1 {
                    let (_, old) = rec.snapshots.remove(0);
                    if let Err(e) = delete_subvolume_id(&self.btrfs, &dir, old) {
                        log::warn!("{}", e.message);
                    }
                }
            }
            _ => {
                // Whatever this session left is removed (by id, whatever its name says).
                for p in &new {
                    if let Ok(id) = subvolume_id(&self.btrfs, p) {
                        let _ = delete_subvolume_id(&self.btrfs, &dir, id);
                    } else if std::fs::symlink_metadata(p).is_ok_and(|m| !m.is_dir()) {
                        let _ = std::fs::remove_file(p);
                    }
                }
                if done.ok {
                    done = Done {
                        ok: false,
                        code: -1,
                        bytes: done.bytes,
                        message: format!("the stream did not make exactly one new subvolume in {}", dir.display()),
                    };
                }
            }
        }
        self.chan.send_done(&done).map_err(io_err("answering the source"))?;
        Ok(done)
    }

    /// After the final round: a writable snapshot of the last received one, at each target.
    fn make_targets(&mut self) -> PluginResult<()> {
        for rec in &mut self.roots {
            let (last, id) = rec.snapshots.last().cloned().ok_or_else(|| {
                PluginError::failed(format!("nothing was received for {}", rec.target.path.display()))
            })?;
            // Still the subvolume that was received there.
            if subvolume_id(&self.btrfs, &last)? != id {
                return Err(PluginError::failed(format!(
                    "{} is no longer the subvolume received there",
                    last.display()
                )));
            }
            // The claimed, still empty directory makes way for the subvolume.
            std::fs::remove_dir(&rec.target.path).map_err(io_err("making way for the received subvolume"))?;
            btrfs(
                &self.btrfs,
                &["subvolume".as_ref(), "snapshot".as_ref(), last.as_os_str(), rec.target.path.as_os_str()],
                &format!("making the writable subvolume {}", rec.target.path.display()),
            )?;
            rec.made = true;
            rec.target.reassert().map_err(io_err("marking the received subvolume"))?;
        }
        Ok(())
    }
}

/// `btrfs receive`'s stdin behind the stream check: a chunk is passed on only once everything it completes was
/// accepted; the first refusal ends the stream there (receive then fails on a cut stream).
struct Checked {
    inner: std::process::ChildStdin,
    check: Arc<Mutex<StreamCheck>>,
    refused: Arc<Mutex<Option<String>>>,
}

impl Write for Checked {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Err(why) = self.check.lock().unwrap_or_else(|p| p.into_inner()).feed(buf) {
            self.refused.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why.clone());
            return Err(std::io::Error::other(why));
        }
        self.inner.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The entries of `dir`, sorted.
fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    v.sort();
    v
}

impl SessionReceiver for BtrfsReceiver {
    fn channel(&mut self) -> &mut Channel {
        &mut self.chan
    }

    fn session(&mut self, st: Start, _is_final: bool) -> PluginResult<Done> {
        self.receive_session(st)
    }
}

impl FsReceiver for BtrfsReceiver {
    fn wait_round(&mut self, info: &FsRoundInfo) -> PluginResult<FsRound> {
        let roots = self.roots.len();
        let bytes = receive_round(self, info, roots, PASS_SEND, "btrfs", "btrfs receive failed")?;
        if info.is_final {
            self.make_targets()?;
        }
        Ok(FsRound::moved(bytes, 0))
    }

    fn prepared(&mut self) -> PluginResult<Vec<KeyValue>> {
        let mut out = Vec::new();
        for (s, r) in self.sources.iter().zip(&self.roots) {
            out.push(KeyValue::new("root-map", format!("{s}={}", r.target.path.display())));
        }
        if let Some(r) = self.roots.first() {
            out.push(KeyValue::new("root", r.target.path.display().to_string()));
        }
        Ok(out)
    }

    fn finish(&mut self, outcome: Outcome) -> PluginResult<()> {
        let mut errors = Vec::new();
        for rec in &mut self.roots {
            for (_, id) in rec.snapshots.drain(..) {
                if let Err(e) = delete_subvolume_id(&self.btrfs, &rec.incoming.path, id) {
                    errors.push(e.message.to_string());
                }
            }
            // Anything else received there that is a subvolume (read-only: the directory could not go otherwise).
            for p in list(&rec.incoming.path) {
                if let Ok(id) = subvolume_id(&self.btrfs, &p) {
                    if let Err(e) = delete_subvolume_id(&self.btrfs, &rec.incoming.path, id) {
                        errors.push(e.message.to_string());
                    }
                }
            }
            if let Err(e) = rec.incoming.roll_back() {
                errors.push(format!("{}: {e}", rec.incoming.path.display()));
            }
            let r = if outcome == Outcome::MIGRATED {
                rec.target.keep()
            } else {
                if rec.made {
                    // Ours (marked, made by the final round): delete the subvolume, then the claim is undone.
                    if let Err(e) = delete_subvolume(&self.btrfs, &rec.target.path) {
                        errors.push(e.message.to_string());
                    }
                    rec.made = false;
                }
                rec.target.roll_back()
            };
            if let Err(e) = r {
                errors.push(format!("{}: {e}", rec.target.path.display()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PluginError::failed(format!("cleaning up what was received: {}", errors.join("; "))))
        }
    }
}

phaul_abi::export_fs_driver!(
    name: "btrfs",
    description: "btrfs subvolumes: a read-only snapshot per round, btrfs send -p into btrfs receive, the last one frozen",
    sender: sender,
    receiver: receiver,
);
