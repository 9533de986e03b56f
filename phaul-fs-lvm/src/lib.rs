//! The `lvm` filesystem driver: a workload's root is the mount point of an ext4 (or any) filesystem on an LVM
//! thin volume. Each round takes a thin snapshot of the volume (LVM suspends the volume for it, which freezes the
//! mounted filesystem, so the snapshot is consistent) and sends blocks of it over phaul's filesystem channel
//! (one substream per root and round, see `phaul-fs-stream`): round 1 every block the snapshot maps (from
//! `thin_dump`), each later round only the blocks `thin_delta` says differ from the previous round's snapshot
//! (both read from a metadata snapshot of the pool, `reserve_metadata_snap`). The destination writes them into a
//! thin volume of its own, unmounted, and after the final round (taken while the workload is frozen) mounts it at
//! the target directory: the workload's filesystem on B, block for block the source's at the freeze (so inode
//! numbers survive: `persistent_inodes` is true; both copies carry the same filesystem UUID, which ext4 allows on
//! one kernel).
//!
//! Round 1 begins, for each root, with a session that carries only the stream's header (the volume's name, size
//! and mapped bytes): the destination makes its volume then, or refuses it, before any block travels.
//!
//! Snapshots are temporary: the source keeps only the latest (the base of the next round's delta) and removes it
//! at the end, whatever the outcome; snapshots a killed source run left are removed by the next run on that VG.
//! The source's volume is never removed; after a migration away it carries the tag `phaul_migrated_away`. Every
//! snapshot carries `phaul_snapshot_TOKEN`, the volume being received `phaul_receiving_TOKEN` (TOKEN begins with
//! the pid of the process that made it) until the migration succeeded, then `phaul_migrated`; phaul removes only
//! volumes with its tag of that run, and leftovers of dead runs (their tag's pid is gone).
//!
//! Source options (`--fs-opt KEY=VALUE`): `lv=VG/LV` (checked against what is mounted at the root; by default
//! found from it), `max-pool-percent=N` (90: refuse a round while the source's pool is fuller: the workload's
//! writes after a snapshot need new blocks, and a full thin pool queues writes instead of failing them),
//! `lvm=PATH`, `thin_dump=PATH`, `thin_delta=PATH`, `dmsetup=PATH`, `lvm-config=TEXT` (passed as `--config` to
//! every lvm command; or set `LVM_SYSTEM_DIR`), `io-timeout=SECONDS` (300). The roots are the host type's
//! (`--htype-opt root=DIR` for `pid`); each must be the mount point of a thin volume.
//!
//! Destination options (`phaul serve --fs-opt lvm:KEY=VALUE`): `vg=VG` (required: where volumes are received),
//! `pool=POOL` (the thin pool; by default the VG's only one), `map=SOURCE-DIR=DESTINATION-DIR` and `allow=DIR`
//! (where a root's filesystem may be mounted, as for rsync), `mount=yes|no` (yes: mount the received volume at
//! the target after the final round; no: leave it to the host type, which gets `device`), `max-pool-percent=N`
//! (90: the pool's data may not grow past this; a round that would is refused before it starts when its size says
//! so, and stopped when the pool reaches it), `lvm=PATH`, `lvm-config=TEXT`, `io-timeout=SECONDS`. The received
//! volume gets the source volume's name in `vg`; a volume of that name that phaul did not make is refused, so is
//! the volume a workload left when it migrated away from this host (a migration back copies the whole volume
//! into a new one: remove or rename the old one first), and so is one another live run is receiving; a leftover
//! of a dead run (its tag names a pid that is gone) is removed. The name is checked as round 1 starts (while the
//! workload runs), or already as the destination is set up when the source names its volume (`lv=VG/LV`, which
//! the receiver sees as `peer.lv`). The target directory must not exist or be empty, and not be a mount point.
//!
//! Pool space: before round 1 the destination refuses a volume whose mapped bytes would take its pool past
//! `max-pool-percent`; while writing it flushes every 32 MiB and stops the round when the pool reaches it. The
//! source refuses a live round while its own pool is that full. A pool made with `--errorwhenfull y` fails writes
//! at once instead of queueing them; phaul does not rely on it.

mod lvm;
pub mod records;
pub mod thin;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use phaul_abi::{
    options, FsArgs, FsReceiver, FsRound, FsRoundInfo, FsSender, Host, KeyValue, Outcome, PluginError, PluginResult,
};
use phaul_fs_mark::Placement;
use phaul_fs_stream::kit::{self, check_known, io_err, receive_round, seconds, SessionReceiver};
use phaul_fs_stream::{Channel, Done, Start};

use lvm::{Tools, MIGRATED_AWAY_TAG, MIGRATED_TAG, RECEIVING_TAG, SNAPSHOT_TAG};
use records::{Decoder, Header, Sink};
use thin::Extent;

/// A session of blocks: every mapped one (round 1), or those that changed.
const PASS_BLOCKS: u8 = 1;
/// Round 1 starts with this session for each root: the header alone (no blocks), so that the destination makes
/// its volume, or refuses (name taken, pool too small), before any block travels.
const PASS_PLAN: u8 = 2;
/// Bytes read from a snapshot per record.
const CHUNK: usize = records::MAX_DATA as usize;
/// The destination flushes and looks at its pool's usage after this many bytes written.
const WATCH_EVERY: u64 = 32 << 20;
const MIB: f64 = 1048576.0;

fn max_pool_percent(args: &FsArgs) -> PluginResult<f64> {
    match args.option("max-pool-percent") {
        None => Ok(90.0),
        Some(v) => v.parse::<f64>().ok().filter(|p| *p > 0.0 && *p < 100.0).ok_or_else(|| {
            PluginError::invalid(format!("--fs-opt max-pool-percent={v}: give a percentage between 1 and 99"))
        }),
    }
}

fn tools(args: &FsArgs, side: &str) -> PluginResult<Tools> {
    Ok(Tools {
        lvm: kit::find_program(args.option("lvm"), "lvm", "lvm", side, "lvm2")?,
        config: args.option("lvm-config").map(str::to_string),
    })
}

fn mountinfo() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()
}

/// The device node of `VG/LV` (waits up to 5 s for it: without udev, LVM makes it itself, a little later).
fn device_path(tools: &Tools, vg: &str, lv: &str) -> PluginResult<PathBuf> {
    let listed = tools.lv(vg, lv, "lv_path")?.and_then(|r| r.into_iter().next()).filter(|p| !p.is_empty());
    let candidates: Vec<PathBuf> = listed
        .map(PathBuf::from)
        .into_iter()
        .chain(std::iter::once(PathBuf::from("/dev/mapper").join(lvm::dm_name(vg, lv))))
        .collect();
    for _ in 0..50 {
        if let Some(p) = candidates.iter().find(|p| p.exists()) {
            return Ok(p.clone());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(PluginError::failed(format!(
        "{vg}/{lv} has no device node (looked for {}): is it active (lvchange -ay {vg}/{lv})?",
        candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )))
}

// ---------------------------------------------------------------------------------------------------------------
// Source

/// One root: the thin volume mounted there.
struct Volume {
    root: PathBuf,
    vg: String,
    lv: String,
    pool: String,
    size: u64,
    /// The snapshots of this run that exist, by name and thin device id (the last is the next round's base).
    snaps: Vec<(String, u64)>,
}

struct LvmSender {
    host: Host,
    chan: Channel,
    tools: Tools,
    thin_dump: PathBuf,
    thin_delta: PathBuf,
    dmsetup: PathBuf,
    vols: Vec<Volume>,
    token: String,
    max_pool: f64,
}

const SOURCE_OPTIONS: &[&str] =
    &["lv", "lvm", "lvm-config", "thin_dump", "thin_delta", "dmsetup", "io-timeout", "max-pool-percent"];

fn sender(args: &FsArgs) -> PluginResult<LvmSender> {
    check_known(args, SOURCE_OPTIONS, "lvm", "source")?;
    let tools = tools(args, "source")?;
    let tp = "thin-provisioning-tools";
    let thin_dump = kit::find_program(args.option("thin_dump"), "thin_dump", "lvm", "source", tp)?;
    let thin_delta = kit::find_program(args.option("thin_delta"), "thin_delta", "lvm", "source", tp)?;
    let dmsetup = kit::find_program(args.option("dmsetup"), "dmsetup", "lvm", "source", "dmsetup")?;
    let max_pool = max_pool_percent(args)?;
    if args.roots.is_empty() {
        return Err(PluginError::invalid(
            "the lvm filesystem driver has nothing to send: the host type names no root (for the pid host type, \
             pass --htype-opt root=DIR, the mount point of the workload's thin volume)",
        ));
    }
    let named = match args.option("lv") {
        None => None,
        Some(_) if args.roots.len() > 1 => {
            return Err(PluginError::invalid(
                "--fs-opt lv=VG/LV names one volume, but the host type names several roots: leave lv out, the \
                 lvm driver finds the volume mounted at each root",
            ))
        }
        Some(v) => match v.split_once('/') {
            Some((vg, lv)) if lvm::valid_name(vg) && lvm::valid_name(lv) => Some((vg.to_string(), lv.to_string())),
            _ => return Err(PluginError::invalid(format!("--fs-opt lv={v}: give VG/LV"))),
        },
    };
    let all = tools.lvs(
        "vg_name,lv_name,lv_kernel_major,lv_kernel_minor,segtype,pool_lv,lv_size",
        &[],
        "listing this host's logical volumes",
    )?;
    let info = mountinfo();
    let mut vols = Vec::new();
    for r in args.roots.iter() {
        let root = PathBuf::from(r.as_str());
        if !root.is_absolute() || !root.is_dir() {
            return Err(PluginError::not_found(format!(
                "the root {} is not a directory on the source",
                root.display()
            )));
        }
        let Some((major, minor)) = lvm::mounted_device(&info, &root) else {
            return Err(PluginError::invalid(format!(
                "the root {} is not a mount point (of a filesystem's root): the lvm driver copies the thin volume \
                 mounted there; mount the workload's thin volume at {0}, or use --fs rsync for a plain directory",
                root.display()
            )));
        };
        let row = all.iter().find(|row| row[2] == major.to_string() && row[3] == minor.to_string());
        let Some(row) = row else {
            return Err(PluginError::invalid(format!(
                "the filesystem mounted at {} (device {major}:{minor}) is not on a logical volume: the lvm driver \
                 needs a thin volume (lvcreate -V SIZE -T VG/POOL -n NAME), or use --fs rsync",
                root.display()
            )));
        };
        let (vg, lv) = (row[0].clone(), row[1].clone());
        if let Some((nvg, nlv)) = &named {
            if (nvg, nlv) != (&vg, &lv) {
                return Err(PluginError::invalid(format!(
                    "--fs-opt lv={nvg}/{nlv}, but {} is {vg}/{lv}",
                    root.display()
                )));
            }
        }
        if row[4] != "thin" || row[5].is_empty() {
            return Err(PluginError::invalid(format!(
                "the root {} is on {vg}/{lv}, a {} volume, not a thin volume: the lvm driver needs one in a thin \
                 pool (lvcreate -V SIZE -T VG/POOL -n NAME), or use --fs rsync",
                root.display(),
                if row[4].is_empty() { "plain" } else { row[4].as_str() }
            )));
        }
        // A thin volume with an external origin reads what it never wrote from that origin, which thin_dump does
        // not show: its copy would lack the origin's data.
        if let Some(origin) = tools.lv(&vg, &lv, "origin")?.and_then(|r| r.into_iter().next()).filter(|o| !o.is_empty())
        {
            let seg = tools.lv(&vg, &origin, "segtype")?.and_then(|r| r.into_iter().next()).unwrap_or_default();
            if seg != "thin" {
                return Err(PluginError::invalid(format!(
                    "the root {} is on {vg}/{lv}, a thin volume with the external origin {vg}/{origin}: blocks it \
                     never wrote come from that origin, which the lvm driver does not send; use --fs rsync, or \
                     make the volume self-contained first",
                    root.display()
                )));
            }
        }
        let size: u64 = row[6].parse().map_err(|_| PluginError::failed(format!("lvs gave {vg}/{lv} no size")))?;
        vols.push(Volume { root, vg, lv, pool: row[5].clone(), size, snaps: Vec::new() });
    }
    let timeout = seconds(args, "io-timeout", 300)?;
    let s = LvmSender {
        host: Host::new(args.host, "lvm"),
        chan: kit::channel(args, "lvm", timeout)?,
        tools,
        thin_dump,
        thin_delta,
        dmsetup,
        vols,
        token: phaul_fs_mark::new_token(),
        max_pool,
    };
    for v in &s.vols {
        s.check_pool(v)?;
    }
    s.remove_dead_snapshots();
    Ok(s)
}

/// The pid a `phaul_..._TOKEN` tag's TOKEN begins with.
fn token_pid(token: &str) -> Option<u32> {
    token.split('-').next().and_then(|p| p.parse().ok())
}

impl LvmSender {
    /// Snapshots a killed source run left (tagged `phaul_snapshot_TOKEN`, TOKEN's pid gone) in the volume groups
    /// of this run's volumes: they hold pool space, so they go.
    fn remove_dead_snapshots(&self) {
        let mut vgs: Vec<&str> = self.vols.iter().map(|v| v.vg.as_str()).collect();
        vgs.dedup();
        for vg in vgs {
            let Ok(rows) = self.tools.lvs("lv_name,lv_tags", &[vg], "listing snapshots left by earlier runs") else {
                continue;
            };
            for r in rows {
                let tags = r[1].split(',').filter_map(|t| t.strip_prefix(SNAPSHOT_TAG));
                for token in tags {
                    let dead = token_pid(token)
                        .is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists());
                    if dead {
                        let tag = format!("{SNAPSHOT_TAG}{token}");
                        log::info!("removing {vg}/{}, a snapshot a failed migration left (tag {tag})", r[0]);
                        if let Err(e) = self.tools.remove_tagged(vg, &r[0], &tag) {
                            log::warn!("{}", e.message);
                        }
                    }
                }
            }
        }
    }

    /// Refuses to go on while the source's pool is fuller than allowed.
    fn check_pool(&self, v: &Volume) -> PluginResult<()> {
        let u = self.tools.pool_usage(&v.vg, &v.pool)?;
        if u.data_percent >= self.max_pool || u.metadata_percent >= self.max_pool {
            return Err(PluginError::failed(format!(
                "the source's thin pool {}/{} is {:.1}% full (metadata {:.1}%), at or past max-pool-percent={}: \
                 each round's snapshot keeps blocks the workload then rewrites, and a full thin pool queues writes \
                 (the workload would hang) instead of failing them; extend the pool (lvextend -L +SIZE {0}/{1}) or \
                 free space first",
                v.vg, v.pool, u.data_percent, u.metadata_percent, self.max_pool
            )));
        }
        Ok(())
    }

    fn snapshot_name(&self, v: &Volume, round: u32) -> String {
        let tail = format!(".phaul-r{round}-{}", self.token);
        let keep = 120usize.saturating_sub(tail.len()).min(v.lv.len());
        let mut base = v.lv[..keep].to_string();
        while !base.is_empty() && !v.lv.is_char_boundary(base.len()) {
            base.pop();
        }
        format!("{base}{tail}")
    }

    fn dm(&self, args: &[&str], what: &str) -> PluginResult<String> {
        lvm::run(&self.dmsetup, args, what)
    }

    /// Runs `f` on the pool's metadata device with a metadata snapshot reserved (released afterwards, whatever
    /// `f` returned).
    fn with_metadata_snap<T>(&self, v: &Volume, f: impl FnOnce(&Path) -> PluginResult<T>) -> PluginResult<T> {
        let base = lvm::dm_name(&v.vg, &v.pool);
        let tpool = [format!("{base}-tpool"), base.clone()]
            .into_iter()
            .find(|n| Path::new("/dev/mapper").join(n).exists())
            .unwrap_or_else(|| format!("{base}-tpool"));
        let tmeta = PathBuf::from("/dev/mapper").join(lvm::dm_name(&v.vg, &format!("{}_tmeta", v.pool)));
        if !tmeta.exists() {
            return Err(PluginError::failed(format!(
                "the metadata device of thin pool {}/{} ({}) is not there: is the pool active?",
                v.vg,
                v.pool,
                tmeta.display()
            )));
        }
        self.dm(&["message", &tpool, "0", "reserve_metadata_snap"], "reserving a metadata snapshot").map_err(|e| {
            PluginError::failed(format!(
                "{} (if another tool holds one of pool {}/{}, wait for it; a leftover is released with dmsetup \
                 message {tpool} 0 release_metadata_snap)",
                e.message, v.vg, v.pool
            ))
        })?;
        let r = f(&tmeta);
        let rel = self.dm(&["message", &tpool, "0", "release_metadata_snap"], "releasing the metadata snapshot");
        let out = r?;
        rel?;
        Ok(out)
    }

    /// What round `round` sends for volume `i`: every mapped block of snapshot `id`, or what changed since `base`.
    fn extents(&self, v: &Volume, base: Option<u64>, id: u64) -> PluginResult<thin::Parsed> {
        self.with_metadata_snap(v, |tmeta| {
            let meta = tmeta.to_string_lossy();
            let (program, args, what) = match base {
                None => {
                    let id = id.to_string();
                    (&self.thin_dump, vec!["-m".to_string(), "--dev-id".into(), id, meta.into_owned()], "thin_dump")
                }
                Some(b) => (
                    &self.thin_delta,
                    vec![
                        "-m".to_string(),
                        "--snap1".into(),
                        b.to_string(),
                        "--snap2".into(),
                        id.to_string(),
                        meta.into(),
                    ],
                    "thin_delta",
                ),
            };
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let xml = lvm::run(program, &args, &format!("reading the changed blocks of {}/{} ({what})", v.vg, v.lv))?;
            let parsed = if base.is_none() { thin::parse_dump(&xml, v.size) } else { thin::parse_delta(&xml, v.size) };
            parsed.map_err(|e| PluginError::failed(format!("{what} printed what this driver cannot read: {e}")))
        })
    }

    fn send_one(&mut self, i: usize, info: &FsRoundInfo) -> PluginResult<u64> {
        let v = &self.vols[i];
        // While frozen the workload writes nothing the snapshot would make the pool keep twice.
        if !info.is_final {
            self.check_pool(v)?;
        }
        let t0 = std::time::Instant::now();
        let name = self.snapshot_name(v, info.number);
        let origin = format!("{}/{}", v.vg, v.lv);
        let tag = format!("{SNAPSHOT_TAG}{}", self.token);
        self.tools.lvm(
            "lvcreate",
            &["-s", "--setactivationskip", "n", "--addtag", &tag, "-n", &name, &origin],
            &format!("taking a thin snapshot of {origin}"),
        )?;
        let (vg, lv, base) = (v.vg.clone(), v.lv.clone(), v.snaps.last().map(|s| s.1));
        // Recorded at once, so that finish removes it whatever happens next.
        self.vols[i].snaps.push((name.clone(), u64::MAX));
        let full = format!("{vg}/{name}");
        // The thin device id from the active snapshot's device-mapper table ("0 SECTORS thin POOL ID"): cheaper
        // than a second lvm command, which counts in the frozen round. lvs when the table does not say.
        let dm_name = format!("{}-{}", vg.replace('-', "--"), name.replace('-', "--"));
        let from_table = self.dm(&["table", &dm_name], "reading the snapshot's table").ok().and_then(|t| {
            let f: Vec<&str> = t.split_whitespace().collect();
            (f.len() == 5 && f[2] == "thin").then(|| f[4].parse::<u64>().ok()).flatten()
        });
        let id = match from_table {
            Some(id) => id,
            None => {
                let row = self
                    .tools
                    .lv(&vg, &name, "thin_id,lv_active")?
                    .ok_or_else(|| PluginError::failed(format!("the snapshot {full} just taken is not there")))?;
                if row[1] != "active" {
                    self.tools.lvm("lvchange", &["-ay", "-K", &full], &format!("activating the snapshot {full}"))?;
                }
                row[0]
                    .parse::<u64>()
                    .map_err(|_| PluginError::failed(format!("lvs gave the snapshot {full} no thin device id")))?
            }
        };
        if let Some(s) = self.vols[i].snaps.last_mut() {
            s.1 = id;
        }
        let v = &self.vols[i];
        let t1 = std::time::Instant::now();
        let parsed = self.extents(v, base, id)?;
        let t2 = std::time::Instant::now();
        let planned: u64 = parsed.extents.iter().map(|e| e.len).sum();
        let block = u32::try_from(parsed.block).map_err(|_| {
            PluginError::failed(format!("the pool's block size of {} bytes is too large", parsed.block))
        })?;
        let header = Header { size: v.size, block, full: base.is_none(), planned, name: lv.clone() };
        let dev = device_path(&self.tools, &vg, &name)?;
        let file = File::open(&dev).map_err(io_err(&format!("opening the snapshot {}", dev.display())))?;
        log::info!(
            "lvm round {}: {origin}: {:.2} of {:.0} MiB to send in {} ranges ({})",
            info.number,
            planned as f64 / MIB,
            v.size as f64 / MIB,
            parsed.extents.len(),
            if base.is_some() { "what changed since the previous round" } else { "every mapped block" }
        );
        let mut sent = 0;
        if base.is_none() {
            let mut plan = Vec::new();
            records::encode_header(&header, &mut plan);
            records::encode_end(0, 0, &mut plan);
            let start = Start { round: info.number, index: i as u16, pass: PASS_PLAN, is_final: info.is_final };
            self.chan.send_start(start).map_err(io_err("starting an lvm session on the filesystem channel"))?;
            let relayed = self
                .chan
                .relay(None, Some(Box::new(std::io::Cursor::new(plan))))
                .map_err(io_err("the filesystem channel broke while planning the volume"))?;
            let done = self.chan.recv_done().map_err(io_err("reading the destination's verdict"))?;
            if !done.ok {
                return Err(PluginError::failed(format!(
                    "the destination refused to receive {origin}: {}",
                    if done.message.is_empty() { "it gave no reason" } else { done.message.as_str() }
                )));
            }
            sent += relayed.sent;
        }
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let stream = BlockStream::new(file, &header, parsed.extents, failure.clone(), Some(self.host), info.number);
        let start = Start { round: info.number, index: i as u16, pass: PASS_BLOCKS, is_final: info.is_final };
        self.chan.send_start(start).map_err(io_err("starting an lvm session on the filesystem channel"))?;
        let relayed = self
            .chan
            .relay(None, Some(Box::new(stream)))
            .map_err(io_err("the filesystem channel broke while sending blocks"))?;
        let done = self.chan.recv_done().map_err(io_err("reading the destination's verdict"))?;
        if let Some(f) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(PluginError::failed(format!("reading the snapshot {full}: {f}")));
        }
        if !done.ok {
            return Err(PluginError::failed(format!(
                "the destination could not take the blocks of {origin}: {}",
                if done.message.is_empty() { "it gave no reason" } else { done.message.as_str() }
            )));
        }
        let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_millis();
        log::info!(
            "lvm round {}: {origin}: snapshot {} ms, block list {} ms, {} bytes sent in {} ms",
            info.number,
            ms(t0, t1),
            ms(t1, t2),
            relayed.sent,
            ms(t2, std::time::Instant::now())
        );
        // The new snapshot is the next base; the ones before are not needed any more (after the final round,
        // finish removes them: not while the workload is frozen).
        while !info.is_final && self.vols[i].snaps.len() > 1 {
            let (old, _) = self.vols[i].snaps.remove(0);
            if let Err(e) = self.tools.remove_tagged(&vg, &old, &tag) {
                log::warn!("{}", e.message);
            }
        }
        Ok(sent + relayed.sent)
    }

    fn round_inner(&mut self, info: &FsRoundInfo) -> PluginResult<FsRound> {
        let mut bytes = 0;
        for i in 0..self.vols.len() {
            bytes += self.send_one(i, info)?;
        }
        self.chan.send_end(info.number, self.vols.len() as u32).map_err(io_err("ending the lvm round"))?;
        Ok(FsRound::moved(bytes, 0))
    }
}

impl FsSender for LvmSender {
    fn round(&mut self, info: &FsRoundInfo) -> PluginResult<FsRound> {
        let r = self.round_inner(info);
        kit::abort_on_error(&mut self.chan, r)
    }

    fn persistent_inodes(&self) -> bool {
        true
    }

    fn finish(&mut self, outcome: Outcome) -> PluginResult<()> {
        let tag = format!("{SNAPSHOT_TAG}{}", self.token);
        let mut errors = Vec::new();
        for v in &mut self.vols {
            for (s, _) in std::mem::take(&mut v.snaps) {
                match self.tools.remove_tagged(&v.vg, &s, &tag) {
                    Ok(true) => {}
                    Ok(false) => log::warn!("{}/{s} is gone or no longer carries {tag}; leaving it", v.vg),
                    Err(e) => errors.push(e.message.to_string()),
                }
            }
            if outcome == Outcome::MIGRATED {
                let name = format!("{}/{}", v.vg, v.lv);
                if let Err(e) = self.tools.lvm(
                    "lvchange",
                    &["--addtag", MIGRATED_AWAY_TAG, &name],
                    &format!("tagging {name} as migrated away"),
                ) {
                    log::warn!("{} (the volume at {} stays as it is)", e.message, v.root.display());
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

/// A session's stream, read from a snapshot: the header, a record per chunk of each extent, the end.
struct BlockStream {
    dev: File,
    extents: VecDeque<Extent>,
    out: Vec<u8>,
    pos: usize,
    chunk: Vec<u8>,
    records: u64,
    bytes: u64,
    ended: bool,
    failure: Arc<Mutex<Option<String>>>,
    host: Option<Host>,
    what: String,
    planned: u64,
}

impl BlockStream {
    fn new(
        dev: File,
        h: &Header,
        extents: Vec<Extent>,
        failure: Arc<Mutex<Option<String>>>,
        host: Option<Host>,
        round: u32,
    ) -> BlockStream {
        let mut out = Vec::new();
        records::encode_header(h, &mut out);
        BlockStream {
            dev,
            extents: extents.into(),
            out,
            pos: 0,
            chunk: vec![0u8; CHUNK],
            records: 0,
            bytes: 0,
            ended: false,
            failure,
            host,
            what: format!("lvm round {round}"),
            planned: h.planned,
        }
    }

    /// The next record into `out`.
    fn fill(&mut self) -> std::io::Result<()> {
        let Some(e) = self.extents.front_mut() else {
            records::encode_end(self.records, self.bytes, &mut self.out);
            self.ended = true;
            return Ok(());
        };
        let (offset, n) = if e.copy {
            let n = e.len.min(CHUNK as u64);
            let buf = &mut self.chunk[..n as usize];
            if let Err(err) = self.dev.read_exact_at(buf, e.offset) {
                let msg = format!("at byte {}: {err}", e.offset);
                self.failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(msg);
                return Err(err);
            }
            if buf.iter().all(|b| *b == 0) {
                records::encode_zero(e.offset, n, &mut self.out);
            } else {
                records::encode_data(e.offset, buf, &mut self.out);
            }
            (e.offset, n)
        } else {
            records::encode_zero(e.offset, e.len, &mut self.out);
            (e.offset, e.len)
        };
        e.offset = offset + n;
        e.len -= n;
        if e.len == 0 {
            self.extents.pop_front();
        }
        self.records += 1;
        self.bytes += n;
        if let Some(h) = &self.host {
            h.progress(&self.what, self.bytes, self.planned);
        }
        Ok(())
    }
}

impl Read for BlockStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.out.len() {
            if self.ended {
                return Ok(0);
            }
            self.out.clear();
            self.pos = 0;
            self.fill()?;
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Destination

/// The tokens of the receiving runs of this process (`phaul serve` runs sessions at once): a volume tagged with
/// this process's pid is a live run's only if its token is here.
fn live_tokens() -> &'static Mutex<std::collections::HashSet<String>> {
    static LIVE: std::sync::OnceLock<Mutex<std::collections::HashSet<String>>> = std::sync::OnceLock::new();
    LIVE.get_or_init(Default::default)
}

/// The volume received for one root.
#[derive(Debug, Clone)]
struct Made {
    name: String,
    path: PathBuf,
    /// The source volume's size (the destination's may be a little larger: its VG's extents).
    source_size: u64,
    size: u64,
}

struct Incoming {
    target: PathBuf,
    created_dir: bool,
    made: Option<Made>,
    /// The full copy (round 1's blocks) arrived.
    whole: bool,
    mounted: bool,
}

struct LvmReceiver {
    host: Host,
    chan: Channel,
    tools: Tools,
    vg: String,
    pool: String,
    mount: bool,
    /// How the received filesystem is mounted (`fstype=`, `mount-options=`): the peer wrote every block of it.
    fstype: String,
    mount_options: String,
    max_pool: f64,
    token: String,
    roots: Vec<Incoming>,
    sources: Vec<String>,
}

const DESTINATION_OPTIONS: &[&str] = &[
    "vg",
    "pool",
    "map",
    "allow",
    "mount",
    "fstype",
    "mount-options",
    "lvm",
    "lvm-config",
    "io-timeout",
    "max-pool-percent",
];

fn release_dirs(roots: &[Incoming]) {
    for r in roots.iter().filter(|r| r.created_dir) {
        let _ = std::fs::remove_dir(&r.target);
    }
}

fn receiver(args: &FsArgs) -> PluginResult<LvmReceiver> {
    check_known(args, DESTINATION_OPTIONS, "lvm", "destination")?;
    let tools = tools(args, "destination")?;
    let max_pool = max_pool_percent(args)?;
    let mount = match args.option("mount") {
        None | Some("yes") => true,
        Some("no") => false,
        Some(v) => return Err(PluginError::invalid(format!("--fs-opt lvm:mount={v}: give yes or no"))),
    };
    // The filesystem the source wrote block by block is parsed by this kernel: its type is the operator's, not
    // guessed from the blocks, and device nodes and set-uid files in it do nothing unless the operator says so.
    let fstype = args.option("fstype").unwrap_or("ext4").to_string();
    let mount_options = args.option("mount-options").unwrap_or("nodev,nosuid").to_string();
    if !lvm::valid_name(&fstype) {
        return Err(PluginError::invalid(format!("--fs-opt lvm:fstype={fstype}: not a filesystem type")));
    }
    if mount_options.is_empty() || mount_options.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(PluginError::invalid(format!(
            "--fs-opt lvm:mount-options={mount_options}: give mount(8) options separated by commas, such as \
             nodev,nosuid"
        )));
    }
    let vg = args.option("vg").ok_or_else(|| {
        PluginError::invalid(
            "the lvm filesystem driver on this destination needs the volume group to receive into: phaul serve \
             --fs-opt lvm:vg=VG (and lvm:pool=POOL when it has several thin pools)",
        )
    })?;
    if !lvm::valid_name(vg) {
        return Err(PluginError::invalid(format!("--fs-opt lvm:vg={vg}: not a volume group name")));
    }
    let pool = match args.option("pool") {
        Some(p) if lvm::valid_name(p) => p.to_string(),
        Some(p) => return Err(PluginError::invalid(format!("--fs-opt lvm:pool={p}: not a volume name"))),
        None => {
            let rows = tools.lvs("lv_name,segtype", &[vg], &format!("listing the volumes of {vg}"))?;
            let pools: Vec<&String> = rows.iter().filter(|r| r[1] == "thin-pool").map(|r| &r[0]).collect();
            match pools.as_slice() {
                [one] => one.to_string(),
                [] => {
                    return Err(PluginError::not_found(format!(
                        "the volume group {vg} on this destination has no thin pool to receive into: make one \
                         (lvcreate -L SIZE -T {vg}/POOL)"
                    )))
                }
                _ => {
                    return Err(PluginError::invalid(format!(
                        "the volume group {vg} has several thin pools ({}): pick one with phaul serve --fs-opt \
                         lvm:pool=POOL",
                        pools.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    )))
                }
            }
        }
    };
    let usage = tools.pool_usage(vg, &pool)?;
    if usage.data_percent >= max_pool || usage.metadata_percent >= max_pool {
        return Err(PluginError::failed(format!(
            "the thin pool {vg}/{pool} on this destination is already {:.1}% full (metadata {:.1}%), at or past \
             max-pool-percent={max_pool}: extend it (lvextend -L +SIZE {vg}/{pool}) or free space",
            usage.data_percent, usage.metadata_percent
        )));
    }
    // Round 1 writes only what the source maps and relies on the rest of a new volume reading as zeros, which a
    // pool guarantees only when it zeroes newly provisioned blocks (lv_attr's 8th letter, 'z').
    let attr = tools.lv(vg, &pool, "lv_attr")?.and_then(|r| r.into_iter().next()).unwrap_or_default();
    if attr.chars().nth(7) != Some('z') {
        return Err(PluginError::invalid(format!(
            "the thin pool {vg}/{pool} on this destination does not zero newly provisioned blocks (lv_attr {attr}), \
             so the parts of a received volume the source never wrote would show whatever the pool held before: \
             turn zeroing on (lvchange -Zy {vg}/{pool}) or pick another pool (--fs-opt lvm:pool=POOL)"
        )));
    }
    let placement = Placement::new(options(&args.options, "map"), options(&args.options, "allow"), "lvm")
        .map_err(|e| PluginError::invalid(e.0))?;
    let timeout = seconds(args, "io-timeout", 300)?;
    let chan = kit::channel(args, "lvm", timeout)?;
    if args.roots.len() > usize::from(u16::MAX) {
        return Err(PluginError::invalid(format!("the source names {} roots; at most 65535", args.roots.len())));
    }
    let hint = "map it elsewhere with phaul serve --fs-opt lvm:map=SOURCE-DIR=DESTINATION-DIR";
    let info = mountinfo();
    let mut roots: Vec<Incoming> = Vec::new();
    for r in args.roots.iter() {
        let refuse = |roots: &[Incoming], msg: String| {
            release_dirs(roots);
            Err(PluginError::invalid(msg))
        };
        let Some(dst) = placement.target(r.as_str()) else {
            return refuse(
                &roots,
                format!(
                    "this destination does not accept the source's root {r}: phaul serve mounts received volumes \
                     only where its operator allowed (--fs-opt lvm:map={r}=DESTINATION-DIR, or lvm:allow=PARENT-DIR \
                     to mount it at the same path)"
                ),
            );
        };
        if !dst.is_absolute() || dst.components().any(|c| c == std::path::Component::ParentDir) {
            return refuse(
                &roots,
                format!("cannot mount {r} at {}: the path must be absolute, without '..'", dst.display()),
            );
        }
        if roots.iter().any(|o| o.target.starts_with(&dst) || dst.starts_with(&o.target)) {
            return refuse(
                &roots,
                format!("two of the source's roots would be mounted at or inside {}", dst.display()),
            );
        }
        if symlink_on_the_way(&dst) || dst.to_string_lossy().chars().any(|c| c.is_control()) {
            return refuse(
                &roots,
                format!(
                    "cannot mount {r} at {}: a symbolic link (or a control character) is on the way, and phaul \
                     mounts only where the path itself leads; {hint}",
                    dst.display()
                ),
            );
        }
        let created_dir = match std::fs::symlink_metadata(&dst) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Err(e) = std::fs::create_dir(&dst) {
                    return refuse(&roots, format!("cannot create {}: {e}; {hint}", dst.display()));
                }
                true
            }
            Err(e) => return refuse(&roots, format!("cannot look at {}: {e}", dst.display())),
            Ok(m) if !m.is_dir() => {
                return refuse(&roots, format!("cannot mount {r} at {}: it is not a directory; {hint}", dst.display()))
            }
            Ok(_) => {
                let empty = std::fs::read_dir(&dst).map(|mut d| d.next().is_none()).unwrap_or(false);
                if lvm::is_mount_point(&info, &dst) || !empty {
                    return refuse(
                        &roots,
                        format!(
                            "{} already exists on this host and {}: the lvm driver mounts the received volume there, \
                             and never over someone else's data; unmount or move it away, or {hint}",
                            dst.display(),
                            if lvm::is_mount_point(&info, &dst) {
                                "a filesystem is mounted there"
                            } else {
                                "holds files"
                            }
                        ),
                    );
                }
                false
            }
        };
        roots.push(Incoming { target: dst, created_dir, made: None, whole: false, mounted: false });
    }
    // The source's volume name, when its operator gave it (--fs-opt lv=VG/LV): a volume of that name here that
    // phaul may not use is refused now, before anything runs (otherwise when round 1 names it).
    if let (Some(peer), 1) = (args.option("peer.lv"), args.roots.len()) {
        if let Some((_, name)) = peer.split_once('/').filter(|(_, n)| lvm::valid_name(n)) {
            if let Err(e) = check_name(&tools, vg, name) {
                release_dirs(&roots);
                return Err(PluginError::invalid(e));
            }
        }
    }
    let token = phaul_fs_mark::new_token();
    live_tokens().lock().unwrap_or_else(|p| p.into_inner()).insert(token.clone());
    Ok(LvmReceiver {
        host: Host::new(args.host, "lvm"),
        chan,
        tools,
        vg: vg.to_string(),
        pool,
        mount,
        fstype,
        mount_options,
        max_pool,
        token,
        roots,
        sources: args.roots.iter().map(|r| r.to_string()).collect(),
    })
}

/// Whether some directory on the way to `path`, or `path` itself, is a symbolic link (a mount there would land
/// wherever it points).
fn symlink_on_the_way(path: &Path) -> bool {
    path.ancestors().any(|a| std::fs::symlink_metadata(a).is_ok_and(|m| m.file_type().is_symlink()))
}

/// The tag a received volume gets just before it is mounted: `phaul_mounted_TOKEN`. A volume with it may hold
/// a restored workload: no later run removes it as a leftover.
const MOUNTED_TAG: &str = "phaul_mounted_";

/// What a receiving session works with (shared with the writer the channel feeds).
struct Session {
    tools: Tools,
    vg: String,
    pool: String,
    token: String,
    max_pool: f64,
    host: Host,
    what: String,
    /// Volume names the other roots use.
    taken: Vec<String>,
    /// This root's volume from earlier rounds, or the one this session made.
    made: Option<Made>,
    /// This session only plans the volume ([`PASS_PLAN`]).
    plan: bool,
    /// The full copy arrived in an earlier session.
    whole: bool,
    dev: Option<File>,
    /// The volume is new and this is the full round: unwritten blocks read as zeros already.
    fresh: bool,
    full: bool,
    planned: u64,
    written: u64,
    since_watch: u64,
    ended: bool,
    /// The frozen round: its end does not look at the pool again (what it wrote is written; the look is an lvm
    /// command the downtime would pay for).
    is_final: bool,
}

/// Whether a volume tagged `tag` (`phaul_receiving_TOKEN`) belongs to a run that is still alive.
fn live_run(tag: &str) -> bool {
    let token = &tag[RECEIVING_TAG.len().min(tag.len())..];
    let Some(pid) = token_pid(token) else { return false };
    if pid == std::process::id() {
        return live_tokens().lock().unwrap_or_else(|p| p.into_inner()).contains(token);
    }
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether this run may receive into `VG/NAME`: `Ok(None)` when there is no such volume, `Ok(Some(TAG))` when
/// it is the leftover of a dead run (tagged TAG; the caller removes it), an error saying why not otherwise.
fn check_name(tools: &Tools, vg: &str, name: &str) -> Result<Option<String>, String> {
    let full = format!("{vg}/{name}");
    let Some(row) = tools.lv(vg, name, "lv_tags").map_err(|e| e.message.to_string())? else { return Ok(None) };
    let tags: Vec<&str> = row.first().map(|t| t.split(',').filter(|s| !s.is_empty()).collect()).unwrap_or_default();
    if tags.contains(&MIGRATED_AWAY_TAG) {
        return Err(format!(
            "{full} is the volume this workload left when it migrated away from this host (tag \
             {MIGRATED_AWAY_TAG}); the lvm driver receives a whole volume into a new thin volume and never writes \
             over an existing one, so a migration back is not incremental: remove it (lvremove {full}) or rename it \
             (lvrename {full} NEW) first, or receive into another volume group (phaul serve --fs-opt lvm:vg=VG)"
        ));
    }
    if let Some(t) = tags.iter().find(|t| t.starts_with(MOUNTED_TAG)) {
        return Err(format!(
            "{full} was mounted by a phaul run that did not finish (tag {t}), so a restored workload may be running \
             on it; see whether one is, then remove it by hand (umount it, lvremove {full}) or drop the tag \
             (lvchange --deltag {t} {full})"
        ));
    }
    match tags.iter().find(|t| t.starts_with(RECEIVING_TAG)) {
        Some(t) if live_run(t) => Err(format!(
            "{full} is being received by another migration into this host now (tag {t}); if no phaul serve runs any \
             more, remove it (lvremove {full})"
        )),
        Some(t) => Ok(Some(t.to_string())),
        None => Err(format!(
            "{full} already exists on this host and phaul did not make it (it has no {RECEIVING_TAG} tag); phaul \
             never writes over someone else's volume: rename or remove it, or receive into another volume group \
             (phaul serve --fs-opt lvm:vg=VG)"
        )),
    }
}

impl Session {
    fn receiving_tag(&self) -> String {
        format!("{RECEIVING_TAG}{}", self.token)
    }

    /// Makes the volume a full round is written into (after the checks that it may).
    fn create(&mut self, h: &Header) -> Result<Made, String> {
        let (vg, name) = (self.vg.clone(), h.name.clone());
        let full = format!("{vg}/{name}");
        if self.taken.contains(&name) {
            return Err(format!(
                "two of the source's roots are volumes named {name}; this destination puts both in {vg}"
            ));
        }
        if let Some(t) = check_name(&self.tools, &vg, &name)? {
            log::info!("removing {full}, a leftover of a failed migration (tag {t})");
            self.tools.remove_tagged(&vg, &name, &t).map_err(|e| e.message.to_string())?;
        }
        let u = self.tools.pool_usage(&vg, &self.pool).map_err(|e| e.message.to_string())?;
        let used = u.size.saturating_sub(u.free());
        if h.planned > h.size {
            return Err(format!("the source plans {} bytes for a volume of {} bytes", h.planned, h.size));
        }
        let after = if u.size == 0 { 100.0 } else { used.saturating_add(h.planned) as f64 * 100.0 / u.size as f64 };
        if after >= self.max_pool {
            return Err(format!(
                "the thin pool {vg}/{} on this destination has {:.1} MiB free ({:.1}% used), and {full} needs about \
                 {:.1} MiB, which would fill it to {after:.1}%, past max-pool-percent={}: a full thin pool queues \
                 writes instead of failing them; extend it (lvextend -L +SIZE {vg}/{0}) or pick another pool \
                 (--fs-opt lvm:pool=POOL)",
                self.pool,
                u.free() as f64 / MIB,
                u.data_percent,
                h.planned as f64 / MIB,
                self.max_pool
            ));
        }
        let size = format!("{}b", h.size);
        let pool = format!("{vg}/{}", self.pool);
        let tag = self.receiving_tag();
        self.tools
            .lvm(
                "lvcreate",
                &["-y", "-V", &size, "-T", &pool, "-n", &name, "--addtag", &tag],
                &format!("creating {full}"),
            )
            .map_err(|e| e.message.to_string())?;
        let made = |tools: &Tools| -> PluginResult<Made> {
            let path = device_path(tools, &vg, &name)?;
            let size = tools
                .lv(&vg, &name, "lv_size")?
                .and_then(|r| r.into_iter().next())
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| PluginError::failed(format!("lvs gave {full} no size")))?;
            Ok(Made { name: name.clone(), path, source_size: h.size, size })
        };
        match made(&self.tools) {
            Ok(m) => Ok(m),
            Err(e) => {
                // Ours: it goes at once.
                let _ = self.tools.remove_tagged(&vg, &name, &tag);
                Err(e.message.to_string())
            }
        }
    }

    /// Flushes and looks at the pool: stops before it fills.
    fn watch(&mut self) -> Result<(), String> {
        self.since_watch = 0;
        if let Some(d) = &self.dev {
            d.sync_data().map_err(|e| format!("flushing the received blocks: {e}"))?;
        }
        let u = self.tools.pool_usage(&self.vg, &self.pool).map_err(|e| e.message.to_string())?;
        if u.data_percent >= self.max_pool || u.metadata_percent >= self.max_pool {
            return Err(format!(
                "the thin pool {}/{} on this destination is {:.1}% full (metadata {:.1}%) after {:.1} MiB of this \
                 round, at or past max-pool-percent={}: stopping before it fills (a full thin pool queues writes \
                 instead of failing them); extend it (lvextend -L +SIZE {0}/{1}) or pick another pool",
                self.vg,
                self.pool,
                u.data_percent,
                u.metadata_percent,
                self.written as f64 / MIB,
                self.max_pool
            ));
        }
        Ok(())
    }

    fn wrote(&mut self, n: u64) -> Result<(), String> {
        self.written = self.written.saturating_add(n);
        if self.written > self.planned {
            return Err(format!(
                "the source sent {} bytes in a round it announced as {} bytes; stopping (the pool is not the peer's \
                 to fill)",
                self.written, self.planned
            ));
        }
        self.since_watch += n;
        self.host.progress(&self.what, self.written, self.planned);
        if self.since_watch >= WATCH_EVERY {
            self.watch()?;
        }
        Ok(())
    }

    fn dev(&self) -> Result<&File, String> {
        self.dev.as_ref().ok_or_else(|| "blocks before the volume was opened".to_string())
    }
}

impl Sink for Session {
    fn header(&mut self, h: &Header) -> Result<u64, String> {
        if !lvm::valid_name(&h.name) || h.name.contains("phaul-r") {
            return Err(format!(
                "the source names its volume '{}', which is not a name this host gives a volume",
                h.name
            ));
        }
        self.full = h.full;
        let made = match (self.plan, &self.made, h.full, self.whole) {
            (true, None, true, _) => {
                let m = self.create(h)?;
                let size = m.size;
                self.made = Some(m);
                return Ok(size);
            }
            (true, ..) => return Err("the source planned its volume twice, or planned a delta".into()),
            (false, None, ..) => return Err("the source sent blocks before planning its volume".into()),
            (false, Some(_), true, true) => {
                return Err("the source sent a whole volume again after the first round".into())
            }
            (false, Some(_), false, false) => {
                return Err("the source sent changed blocks before the whole volume".into())
            }
            (false, Some(m), full, _) => {
                if m.source_size != h.size || m.name != h.name {
                    return Err(format!(
                        "the source's volume changed: {} of {} bytes now, {} of {} bytes before",
                        h.name, h.size, m.name, m.source_size
                    ));
                }
                // Round 1 writes into the volume its plan made: unwritten blocks read as zeros.
                self.fresh = full;
                m.clone()
            }
        };
        if made.size < h.size {
            return Err(format!(
                "{}/{} has {} bytes, less than the source's {}",
                self.vg, made.name, made.size, h.size
            ));
        }
        self.planned = h.planned;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&made.path)
            .map_err(|e| format!("cannot open {} for writing: {e}", made.path.display()))?;
        self.dev = Some(f);
        Ok(made.size)
    }

    fn data(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        if self.plan {
            return Err("the source sent blocks in the session that plans its volume".into());
        }
        self.dev()?.write_all_at(data, offset).map_err(|e| format!("writing at byte {offset}: {e}"))?;
        self.wrote(data.len() as u64)
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<(), String> {
        if self.plan {
            return Err("the source sent blocks in the session that plans its volume".into());
        }
        if self.fresh && self.full {
            // Nothing to write (a new volume reads as zeros), but it counts against what the round announced.
            return self.wrote(len);
        }
        let zeros = vec![0u8; CHUNK];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(CHUNK as u64);
            self.dev()?
                .write_all_at(&zeros[..n as usize], offset + at)
                .map_err(|e| format!("zeroing at byte {}: {e}", offset + at))?;
            at += n;
            self.wrote(n)?;
        }
        Ok(())
    }

    fn end(&mut self) -> Result<(), String> {
        if self.plan {
            self.ended = true;
            return Ok(());
        }
        self.dev()?.sync_all().map_err(|e| format!("flushing the received volume: {e}"))?;
        if !self.is_final {
            self.watch()?;
        }
        self.ended = true;
        Ok(())
    }
}

/// The channel's side of a session: decodes what arrives into the session's volume.
struct SessionWriter {
    decoder: Decoder,
    session: Arc<Mutex<Session>>,
    error: Arc<Mutex<Option<String>>>,
}

impl Write for SessionWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = self.decoder.feed(buf, &mut *s) {
            self.error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e.clone());
            return Err(std::io::Error::other(e));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LvmReceiver {
    fn receive_session(&mut self, st: Start) -> PluginResult<Done> {
        let index = st.index as usize;
        if (st.pass != PASS_BLOCKS && st.pass != PASS_PLAN) || index >= self.roots.len() {
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
        }
        let taken = self
            .roots
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .filter_map(|(_, r)| r.made.as_ref().map(|m| m.name.clone()))
            .collect();
        let session = Arc::new(Mutex::new(Session {
            tools: self.tools.clone(),
            vg: self.vg.clone(),
            pool: self.pool.clone(),
            token: self.token.clone(),
            max_pool: self.max_pool,
            host: self.host,
            what: format!("lvm round {}", st.round),
            taken,
            made: self.roots[index].made.clone(),
            plan: st.pass == PASS_PLAN,
            whole: self.roots[index].whole,
            dev: None,
            fresh: false,
            full: false,
            planned: 0,
            written: 0,
            since_watch: 0,
            ended: false,
            is_final: st.is_final,
        }));
        let error: Arc<Mutex<Option<String>>> = Arc::default();
        let writer = SessionWriter { decoder: Decoder::new(), session: session.clone(), error: error.clone() };
        let relayed = self.chan.relay(Some(Box::new(writer)), None);
        let (made, ended, full) = {
            let mut s = session.lock().unwrap_or_else(|p| p.into_inner());
            s.dev = None;
            (s.made.clone(), s.ended, s.full && !s.plan)
        };
        // Whatever this session made is recorded, so that a roll-back removes it.
        self.roots[index].made = made;
        let relayed = relayed.map_err(io_err("the filesystem channel broke while receiving blocks"))?;
        let error = error.lock().unwrap_or_else(|p| p.into_inner()).take();
        let done = match (error, ended) {
            (Some(e), _) => Done { ok: false, code: -1, bytes: relayed.received, message: e },
            (None, false) => {
                Done { ok: false, code: -1, bytes: relayed.received, message: "the stream ended before its end".into() }
            }
            (None, true) => {
                if full {
                    self.roots[index].whole = true;
                }
                Done { ok: true, code: 0, bytes: relayed.received, message: String::new() }
            }
        };
        self.chan.send_done(&done).map_err(io_err("answering the source"))?;
        Ok(done)
    }

    /// After the final round: each received volume mounted at its target.
    fn mount_targets(&mut self) -> PluginResult<()> {
        if !self.mount {
            return Ok(());
        }
        let info = mountinfo();
        for r in &mut self.roots {
            let m = r
                .made
                .as_ref()
                .ok_or_else(|| PluginError::failed(format!("nothing was received for {}", r.target.display())))?;
            // The path may have changed since the claim: no symbolic link on the way, nothing mounted or put there.
            if lvm::is_mount_point(&info, &r.target)
                || symlink_on_the_way(&r.target)
                || std::fs::read_dir(&r.target).is_ok_and(|mut d| d.next().is_some())
            {
                return Err(PluginError::failed(format!(
                    "{} changed while the volume was received (a mount, a symbolic link or files are there now); the \
                     received volume {}/{} is not mounted over it",
                    r.target.display(),
                    self.vg,
                    m.name
                )));
            }
            let full = format!("{}/{}", self.vg, m.name);
            let mounted_tag = format!("{MOUNTED_TAG}{}", self.token);
            self.tools.lvm("lvchange", &["--addtag", &mounted_tag, &full], &format!("tagging {full} as mounted"))?;
            let dev = m.path.to_string_lossy();
            let target = r.target.to_string_lossy();
            lvm::run(
                Path::new("mount"),
                &["-t", &self.fstype, "-o", &self.mount_options, &dev, &target],
                &format!("mounting the received volume at {target}"),
            )?;
            r.mounted = true;
        }
        Ok(())
    }
}

impl SessionReceiver for LvmReceiver {
    fn channel(&mut self) -> &mut Channel {
        &mut self.chan
    }

    fn session(&mut self, st: Start, _is_final: bool) -> PluginResult<Done> {
        self.receive_session(st)
    }
}

impl FsReceiver for LvmReceiver {
    fn wait_round(&mut self, info: &FsRoundInfo) -> PluginResult<FsRound> {
        let roots = self.roots.len();
        let bytes = receive_round(self, info, roots, PASS_BLOCKS, "lvm", "writing the received blocks failed")?;
        if info.is_final {
            self.mount_targets()?;
        }
        Ok(FsRound::moved(bytes, 0))
    }

    fn prepared(&mut self) -> PluginResult<Vec<KeyValue>> {
        let mut out = Vec::new();
        for (s, r) in self.sources.iter().zip(&self.roots) {
            out.push(KeyValue::new("root-map", format!("{s}={}", r.target.display())));
        }
        if let Some(r) = self.roots.first() {
            if r.mounted {
                out.push(KeyValue::new("root", r.target.display().to_string()));
            }
            if let Some(m) = &r.made {
                out.push(KeyValue::new("device", m.path.display().to_string()));
            }
        }
        Ok(out)
    }

    fn finish(&mut self, outcome: Outcome) -> PluginResult<()> {
        let tag = format!("{RECEIVING_TAG}{}", self.token);
        let mut errors = Vec::new();
        for r in &mut self.roots {
            let Some(m) = &r.made else {
                if outcome != Outcome::MIGRATED && r.created_dir {
                    let _ = std::fs::remove_dir(&r.target);
                }
                continue;
            };
            let full = format!("{}/{}", self.vg, m.name);
            if outcome == Outcome::MIGRATED {
                let mounted_tag = format!("{MOUNTED_TAG}{}", self.token);
                if let Err(e) = self.tools.lvm(
                    "lvchange",
                    &["--deltag", &tag, "--deltag", &mounted_tag, "--addtag", MIGRATED_TAG, &full],
                    &format!("tagging {full} as received"),
                ) {
                    errors.push(e.message.to_string());
                }
                continue;
            }
            if r.mounted {
                let target = r.target.to_string_lossy();
                match lvm::run(Path::new("umount"), &[&target], &format!("unmounting {target}")) {
                    Ok(_) => r.mounted = false,
                    Err(e) => {
                        errors.push(format!("{}; {full} stays until it is unmounted and removed by hand", e.message));
                        continue;
                    }
                }
            }
            match self.tools.remove_tagged(&self.vg, &m.name, &tag) {
                Ok(true) => {}
                Ok(false) => log::warn!("{full} is gone or no longer carries {tag}; leaving it"),
                Err(e) => errors.push(e.message.to_string()),
            }
            r.made = None;
            if r.created_dir {
                let _ = std::fs::remove_dir(&r.target);
            }
        }
        if errors.is_empty() {
            // Only a run that ended cleanly lets go of its token: a volume still tagged with it stays this
            // process's (never a leftover to remove).
            live_tokens().lock().unwrap_or_else(|p| p.into_inner()).remove(&self.token);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PluginError::failed(format!("cleaning up what was received: {}", errors.join("; "))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem {
        vol: Vec<u8>,
        ended: bool,
        zero_records: u64,
    }

    impl Sink for Mem {
        fn header(&mut self, _h: &Header) -> Result<u64, String> {
            Ok(self.vol.len() as u64)
        }
        fn data(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
            self.vol[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero(&mut self, offset: u64, len: u64) -> Result<(), String> {
            self.zero_records += 1;
            self.vol[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn end(&mut self) -> Result<(), String> {
            self.ended = true;
            Ok(())
        }
    }

    /// What the source reads from a snapshot (here a file), the destination's decoder writes back: a delta applied
    /// to the previous round's copy gives the new snapshot's bytes.
    #[test]
    fn a_delta_stream_turns_the_old_copy_into_the_new_snapshot() {
        let block = 65536usize;
        let size = 40 * block + 1000;
        let old: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut new = old.clone();
        // Blocks 3-4 rewritten (more than one record: CHUNK is 1 MiB, so make one range longer than that), block 30
        // unmapped (zeros), the partial last block changed, block 10 rewritten with zeros.
        for b in &mut new[3 * block..5 * block] {
            *b = b.wrapping_add(7);
        }
        for b in &mut new[12 * block..30 * block] {
            *b ^= 0x5a;
        }
        new[30 * block..31 * block].fill(0);
        new[10 * block..11 * block].fill(0);
        for b in &mut new[40 * block..] {
            *b = 0xee;
        }
        let dir = std::env::temp_dir().join(format!("phaul-fs-lvm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let snap = dir.join("snap");
        std::fs::write(&snap, &new).expect("write");
        let extents = vec![
            Extent { offset: (3 * block) as u64, len: (2 * block) as u64, copy: true },
            Extent { offset: (10 * block) as u64, len: block as u64, copy: true },
            Extent { offset: (12 * block) as u64, len: (18 * block) as u64, copy: true },
            Extent { offset: (30 * block) as u64, len: block as u64, copy: false },
            Extent { offset: (40 * block) as u64, len: 1000, copy: true },
        ];
        let planned = extents.iter().map(|e| e.len).sum();
        let h = Header { size: size as u64, block: block as u32, full: false, planned, name: "ct".into() };
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let mut stream = BlockStream::new(File::open(&snap).expect("open"), &h, extents, failure.clone(), None, 2);
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).expect("read");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(failure.lock().expect("lock").is_none());
        // Far less than the volume travels.
        assert!(bytes.len() < 22 * block, "{} bytes", bytes.len());
        let mut m = Mem { vol: old, ended: false, zero_records: 0 };
        let mut d = Decoder::new();
        for c in bytes.chunks(100_000) {
            d.feed(c, &mut m).expect("feed");
        }
        assert!(d.complete() && m.ended);
        // The unmapped block and the all-zero block both travel as zero records.
        assert_eq!(m.zero_records, 2);
        assert!(m.vol == new, "the copy differs from the snapshot");
    }

    #[test]
    fn a_snapshot_that_cannot_be_read_fails_the_stream_and_says_where() {
        let dir = std::env::temp_dir().join(format!("phaul-fs-lvm-short-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let snap = dir.join("snap");
        std::fs::write(&snap, [1u8; 4096]).expect("write");
        let h = Header { size: 1 << 20, block: 65536, full: true, planned: 65536, name: "ct".into() };
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let extents = vec![Extent { offset: 0, len: 65536, copy: true }];
        let mut stream = BlockStream::new(File::open(&snap).expect("open"), &h, extents, failure.clone(), None, 1);
        let mut bytes = Vec::new();
        assert!(stream.read_to_end(&mut bytes).is_err());
        let _ = std::fs::remove_dir_all(&dir);
        assert!(failure.lock().expect("lock").as_deref().is_some_and(|f| f.contains("at byte 0")));
    }
}

phaul_abi::export_fs_driver!(
    name: "lvm",
    description: "LVM thin volumes: a thin snapshot per round, the blocks thin_delta says changed, the last round frozen",
    sender: sender,
    receiver: receiver,
);
