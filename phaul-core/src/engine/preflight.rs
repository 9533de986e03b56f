//! `phaul check`: what a migration would need, checked on this host and (with `--to` or `--fdrpc`) on the
//! destination, without dumping anything. One line per check: OK, WARN (it works, with a cost or a caveat) or
//! FAIL (a migration would be refused or would fail), each saying what to do.
//!
//! What needs CRIU to seize the tree (a trial dump) is left out: the workload is only read from /proc.

use std::path::{Path, PathBuf};

use phaul_proto::wire::envelope::Body;
use phaul_proto::wire::{self as w, CheckResult, Preflight, PreflightReply};

use super::report::mib;
use crate::criu::{rpc::CriuBackend, MIN_CRIU};
use crate::plugins::Drivers;
use crate::transport::Channel;
use crate::wire;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
    fn from_wire(n: u32) -> Level {
        match n {
            0 => Level::Ok,
            1 => Level::Warn,
            _ => Level::Fail,
        }
    }
    fn to_wire(self) -> u32 {
        self as u32
    }
}

/// One check's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// `source` (this host) or `destination`.
    pub host: &'static str,
    pub name: String,
    pub level: Level,
    pub message: String,
}

impl Check {
    fn new(host: &'static str, name: &str, level: Level, message: impl Into<String>) -> Check {
        Check { host, name: name.to_string(), level, message: message.into() }
    }
}

/// What the migration would ask of a host.
#[derive(Debug, Clone, Default)]
pub struct Want {
    pub htype: Option<String>,
    pub fs: Option<String>,
    pub restart: bool,
    pub pre_copy: bool,
    pub lazy: bool,
    pub expected_image_bytes: u64,
    pub tcp: bool,
    pub img_path: PathBuf,
    /// The source's CRIU version (destination side: its own must be as new).
    pub source_criu: Option<(u32, u32, u32)>,
}

fn on_path(tool: &str) -> bool {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs).chain(["/usr/sbin".into(), "/sbin".into()]).any(|d| d.join(tool).is_file())
}

/// A trial lazy migration of a throwaway process (`--try-lazy`; see [`super::lazy::trial`]).
pub type LazyTrial<'a> = &'a dyn Fn() -> Result<(), String>;

/// The checks of one host. `cpuinfo`: the source's CPU image, checked against this CPU (destination side);
/// `trial`: proves lazy pages work (`--try-lazy`).
pub fn host_checks(
    host: &'static str,
    criu: &dyn CriuBackend,
    drivers: &dyn Drivers,
    want: &Want,
    cpuinfo: Option<&[u8]>,
    trial: Option<LazyTrial<'_>>,
) -> Vec<Check> {
    let mut out = Vec::new();
    let min = format!("{}.{}.{}", MIN_CRIU.0, MIN_CRIU.1, MIN_CRIU.2);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    out.push(Check::new(host, "kernel", Level::Ok, kernel));
    match criu.preflight(None) {
        Err(e) if want.restart => out.push(Check::new(
            host,
            "criu",
            Level::Warn,
            format!("CRIU does not work here ({e}); restart mode does not need it"),
        )),
        Err(e) => out.push(Check::new(
            host,
            "criu",
            Level::Fail,
            format!("CRIU at {} does not work: {e}; run scripts/setup (or give --criu PATH)", criu.path().display()),
        )),
        Ok((version, features, _)) => {
            let path = criu.path().display().to_string();
            if version.triple() < MIN_CRIU {
                out.push(Check::new(
                    host,
                    "criu",
                    Level::Fail,
                    format!("CRIU {version} at {path} is older than {min}, the oldest phaul drives; run scripts/setup"),
                ));
            } else {
                out.push(Check::new(host, "criu", Level::Ok, format!("CRIU {version} at {path}")));
            }
            if let Some(src) = want.source_criu {
                if version.triple() < src {
                    out.push(Check::new(
                        host,
                        "criu-version",
                        Level::Fail,
                        format!(
                            "this CRIU ({version}) is older than the source's ({}.{}.{}), which may write images it cannot read; upgrade it, or pass --skip-criu-check to the source",
                            src.0, src.1, src.2
                        ),
                    ));
                } else {
                    out.push(Check::new(host, "criu-version", Level::Ok, "as new as the source's"));
                }
            }
            let pre = if features.mem_track {
                Check::new(host, "pre-copy", Level::Ok, "available (dirty-memory tracking works)")
            } else {
                let level = if want.pre_copy { Level::Fail } else { Level::Warn };
                Check::new(
                    host,
                    "pre-copy",
                    level,
                    "unavailable: the kernel cannot track dirty memory (CONFIG_MEM_SOFT_DIRTY); migrations use stop-and-copy (--pre-dump off)",
                )
            };
            out.push(pre);
            let lazy_level = if want.lazy { Level::Fail } else { Level::Warn };
            if !features.lazy_pages {
                out.push(Check::new(
                    host,
                    "lazy-pages",
                    lazy_level,
                    "unavailable (no userfaultfd): post-copy and --lazy-restore cannot run here",
                ));
            } else if let Some(trial) = trial {
                out.push(match trial() {
                    Ok(()) => Check::new(
                        host,
                        "lazy-pages",
                        Level::Ok,
                        "work (a trial lazy migration of a throwaway process succeeded)",
                    ),
                    Err(e) => Check::new(host, "lazy-pages", lazy_level, format!("do not work: {e}")),
                });
            } else {
                out.push(Check::new(host, "lazy-pages", Level::Ok, "CRIU reports userfaultfd (--try-lazy proves it)"));
            }
            if let Some(image) = cpuinfo.filter(|i| !i.is_empty()) {
                out.push(cpu_check(host, criu, &want.img_path, image));
            }
        }
    }
    if let Some(h) = &want.htype {
        out.push(match drivers.ensure_htype(h) {
            Ok(()) => Check::new(host, "host-type", Level::Ok, format!("'{h}' is installed and enabled")),
            Err(e) => Check::new(host, "host-type", Level::Fail, e.to_string()),
        });
    }
    let fs = want.fs.clone().or_else(|| want.htype.as_deref().and_then(|h| drivers.default_fs(h)));
    if let Some(f) = fs {
        out.push(match drivers.ensure_fs(&f) {
            Ok(()) => Check::new(host, "fs-driver", Level::Ok, format!("'{f}' is installed and enabled")),
            Err(e) => Check::new(host, "fs-driver", Level::Fail, e.to_string()),
        });
    }
    let nft = on_path("nft");
    out.push(match (nft, want.tcp) {
        (true, _) => Check::new(
            host,
            "network-lock",
            Level::Ok,
            "nft is there (phaul keeps a held copy's TCP connections silent with it)",
        ),
        (false, true) => Check::new(
            host,
            "network-lock",
            Level::Fail,
            "the workload has TCP connections and nft is missing: apt-get install nftables",
        ),
        (false, false) => Check::new(
            host,
            "network-lock",
            Level::Warn,
            "nft is missing: a workload with TCP connections cannot be migrated (apt-get install nftables)",
        ),
    });
    if want.htype.as_deref() == Some("lxc") {
        out.push(if on_path("iptables-restore") {
            Check::new(host, "iptables", Level::Ok, "iptables-restore is there (CRIU's network lock under liblxc)")
        } else {
            Check::new(host, "iptables", Level::Fail, "iptables-restore is missing, and CRIU's network lock for LXC containers runs it: apt-get install iptables")
        });
    }
    out.push(space_check(host, &want.img_path, want.expected_image_bytes));
    out
}

/// The largest CPU image a peer may send for a check (CRIU's cpuinfo image is a few hundred bytes).
const MAX_CPUINFO: usize = 64 << 10;

fn cpu_check(host: &'static str, criu: &dyn CriuBackend, img_path: &Path, image: &[u8]) -> Check {
    if image.len() > MAX_CPUINFO {
        return Check::new(
            host,
            "cpu",
            Level::Fail,
            format!("the source sent a CPU image of {} bytes; a real one is a few hundred", image.len()),
        );
    }
    // A directory of its own per check (random name, mode 0700), so that neither another user nor a concurrent
    // check can touch what CRIU reads as root.
    let _ = img_path;
    let r = tempfile::Builder::new()
        .prefix("phaul-check-cpu-")
        .tempdir()
        .and_then(|dir| std::fs::write(dir.path().join("cpuinfo.img"), image).map(|()| dir))
        .map_err(|e| e.to_string())
        .and_then(|dir| criu.cpuinfo_check(dir.path()).map_err(|e| e.to_string()));
    match r {
        Ok(()) => Check::new(host, "cpu", Level::Ok, "this CPU has every feature the source's has"),
        Err(e) => Check::new(
            host,
            "cpu",
            Level::Fail,
            format!("this CPU lacks features of the source's, so the workload may crash here ({e}); --skip-cpu-check migrates anyway"),
        ),
    }
}

/// Free space for images under `img_path` (or, while it does not exist yet, its nearest existing parent), and
/// what `expected` bytes of images need there (a tenth more, for CRIU's metadata). `None` when statvfs fails.
pub(crate) fn room_for(img_path: &Path, expected: u64) -> Option<(u64, u64)> {
    let mut at = img_path.to_path_buf();
    while !at.exists() {
        match at.parent() {
            Some(p) => at = p.to_path_buf(),
            None => break,
        }
    }
    let st = nix::sys::statvfs::statvfs(&at).ok()?;
    Some((st.blocks_available().saturating_mul(st.fragment_size()), expected.saturating_add(expected / 10)))
}

fn space_check(host: &'static str, img_path: &Path, expected: u64) -> Check {
    let Some((free, need)) = room_for(img_path, expected) else {
        return Check::new(
            host,
            "free-space",
            Level::Warn,
            format!("cannot tell the free space under {}", img_path.display()),
        );
    };
    if expected > 0 && free < need {
        Check::new(
            host,
            "free-space",
            Level::Fail,
            format!(
                "{} free under {}, and the images need about {}: free space there or use another --img-path",
                mib(free),
                img_path.display(),
                mib(need)
            ),
        )
    } else if expected > 0 {
        Check::new(
            host,
            "free-space",
            Level::Ok,
            format!("{} free under {} for about {} of images", mib(free), img_path.display(), mib(need)),
        )
    } else {
        Check::new(host, "free-space", Level::Ok, format!("{} free under {}", mib(free), img_path.display()))
    }
}

/// The request a source sends for `want`.
pub fn request(want: &Want, cpuinfo: Vec<u8>) -> Preflight {
    let (major, minor, sublevel) = want.source_criu.unwrap_or_default();
    Preflight {
        htype: want.htype.clone().unwrap_or_default(),
        fs_driver: want.fs.clone().unwrap_or_default(),
        mode: if want.restart { w::Mode::Restart as i32 } else { w::Mode::Live as i32 },
        pre_copy: want.pre_copy,
        lazy: want.lazy,
        expected_image_bytes: want.expected_image_bytes,
        source_criu: Some(w::CriuVersion { major, minor, sublevel, text: String::new() }),
        cpuinfo_image: cpuinfo,
        tcp: want.tcp,
    }
}

/// Destination: answers a `Preflight` (the first frame of its connection) with this host's checks.
pub fn answer(
    criu: &dyn CriuBackend,
    drivers: &dyn Drivers,
    img_path: &Path,
    rpc: &mut Channel,
    p: Preflight,
) -> Result<(), wire::WireError> {
    let clean = |s: &str| (!s.is_empty() && crate::engine::check_name("name", s).is_ok()).then(|| s.to_string());
    let want = Want {
        htype: clean(&p.htype),
        fs: clean(&p.fs_driver),
        restart: p.mode == w::Mode::Restart as i32,
        pre_copy: p.pre_copy,
        lazy: p.lazy,
        expected_image_bytes: p.expected_image_bytes,
        tcp: p.tcp,
        img_path: img_path.to_path_buf(),
        source_criu: p.source_criu.as_ref().map(|v| (v.major, v.minor, v.sublevel)).filter(|v| *v != (0, 0, 0)),
    };
    let checks = host_checks("destination", criu, drivers, &want, Some(&p.cpuinfo_image), None);
    let reply = PreflightReply {
        checks: checks
            .into_iter()
            .map(|c| CheckResult { name: c.name, level: c.level.to_wire(), message: c.message })
            .collect(),
    };
    wire::send(rpc, Body::PreflightReply(reply))
}

/// Source: asks the destination on `rpc` and returns its checks.
pub fn ask(rpc: &mut Channel, req: Preflight, timeout: std::time::Duration) -> Result<Vec<Check>, String> {
    wire::send(rpc, Body::Preflight(req)).map_err(|e| e.to_string())?;
    match wire::recv_by(rpc, std::time::Instant::now() + timeout).map_err(|e| e.to_string())? {
        Body::PreflightReply(r) => Ok(r
            .checks
            .into_iter()
            .map(|c| Check { host: "destination", name: c.name, level: Level::from_wire(c.level), message: c.message })
            .collect()),
        Body::Failure(f) => Err(f.message),
        other => Err(format!(
            "the destination answered {} to a preflight; is it an older phaul (without `phaul check --to`)?",
            wire::body_name(&other)
        )),
    }
}

/// What the workload checks learned, for the rest of the preflight.
#[derive(Debug, Default)]
pub struct Workload {
    pub root: Option<i32>,
    pub resident_bytes: u64,
    pub tcp: bool,
}

/// Source: the workload itself, read from /proc (nothing is seized): that the host type finds it and accepts it,
/// its namespaces, the files CRIU would refuse, its TCP connections.
pub fn workload_checks(
    drivers: &dyn Drivers,
    htype: &str,
    id: &str,
    options: &[(String, String)],
    work_dir: &Path,
) -> (Vec<Check>, Workload) {
    let mut out = Vec::new();
    let mut wl = Workload::default();
    let h = "source";
    let mut driver =
        match drivers.host_type(htype, phaul_abi::Role::SOURCE, phaul_abi::Mode::LIVE, id, options, work_dir) {
            Ok(d) => d,
            Err(e) => {
                out.push(Check::new(h, "workload", Level::Fail, e.to_string()));
                return (out, wl);
            }
        };
    let root = match driver.root_pid().into_result() {
        Ok(p) => p,
        Err(e) => {
            out.push(Check::new(h, "workload", Level::Fail, format!("the host type '{htype}' refuses {id}: {e}")));
            return (out, wl);
        }
    };
    wl.root = Some(root);
    let procs = crate::hold::procs::tree_processes(root).unwrap_or_default();
    wl.resident_bytes = crate::hold::procs::tree_resident_bytes(root);
    out.push(Check::new(
        h,
        "workload",
        Level::Ok,
        format!("root pid {root}, {} processes, {} resident", procs.len(), mib(wl.resident_bytes)),
    ));
    let own: Vec<&str> = ["pid", "mnt", "net", "uts", "ipc", "user", "cgroup"]
        .into_iter()
        .filter(|ns| {
            let theirs = std::fs::read_link(format!("/proc/{root}/ns/{ns}")).ok();
            theirs.is_some() && theirs != std::fs::read_link(format!("/proc/self/ns/{ns}")).ok()
        })
        .collect();
    out.push(Check::new(
        h,
        "namespaces",
        Level::Ok,
        if own.is_empty() { "the host's own".to_string() } else { format!("its own: {}", own.join(", ")) },
    ));
    let (mut refused, mut devices, mut sockets) = (Vec::new(), Vec::new(), std::collections::BTreeSet::new());
    for p in &procs {
        for fd in std::fs::read_dir(format!("/proc/{}/fd", p.pid)).into_iter().flatten().flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            let t = target.to_string_lossy().into_owned();
            let fdn = fd.file_name().to_string_lossy().into_owned();
            if let Some(kind) =
                ["[io_uring]", "[perf_event]", "[userfaultfd]", "bpf-prog"].iter().find(|k| t.ends_with(*k))
            {
                refused.push(format!("pid {} fd {fdn} is {kind}", p.pid));
            } else if let Some(dev) = t.strip_prefix("/dev/") {
                let usual = ["null", "zero", "full", "random", "urandom", "tty", "ptmx", "console", "net/tun"];
                if !usual.contains(&dev) && !dev.starts_with("pts/") {
                    devices.push(format!("/dev/{dev} (pid {} fd {fdn})", p.pid));
                }
            } else if let Some(ino) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                sockets.insert(ino.to_string());
            }
        }
    }
    out.push(if refused.is_empty() {
        Check::new(h, "files", Level::Ok, "no open file CRIU cannot dump")
    } else {
        Check::new(h, "files", Level::Fail, format!("CRIU cannot dump {}; end those uses first", refused.join("; ")))
    });
    if !devices.is_empty() {
        out.push(Check::new(
            h,
            "devices",
            Level::Warn,
            format!(
                "open device files {}: CRIU reopens them by path, so the destination needs the same devices",
                devices.join(", ")
            ),
        ));
    }
    let (mut est, mut flight, mut listen) = (0, 0, 0);
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{root}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !sockets.contains(f[9]) {
                continue;
            }
            match f[3] {
                "01" => est += 1,
                "02" | "03" => flight += 1,
                "0A" => listen += 1,
                _ => {}
            }
        }
    }
    wl.tcp = est + flight + listen > 0;
    out.push(Check::new(h, "tcp", Level::Ok, format!("{est} established (carried), {listen} listening")));
    if flight > 0 {
        out.push(Check::new(
            h,
            "tcp-in-flight",
            Level::Warn,
            format!("{flight} connections being set up: CRIU skips them (their peers retry)"),
        ));
    }
    (out, wl)
}
