//! The real thing, with CRIU: a process tree holds a pty pair with bytes queued both ways; `criu dump` drains them
//! into tty-data.img, its post-dump action script moves the tree into a cgroup-v2 cgroup, freezes it and fails, so
//! CRIU resumes the tree (frozen) without the bytes. `write_back_tty_data` puts them back while the tree is
//! frozen; after the thaw the tree's processes read exactly the original bytes. Once with the pty in raw mode, once
//! in the kernel's default cooked mode (echo, CR/NL translation), where the bytes must not be processed again.
//!
//! Needs root, python3, `unshare` and `setsid` (util-linux), a cgroup2 mount and CRIU (PHAUL_CRIU, or where
//! scripts/setup installs it, or on PATH).

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use phaul_core::hold::tty::{write_back_tty_data, PtyEnd};
use phaul_core::sys;

/// Written into the master in raw mode, with bytes a cooked line discipline would act on.
const RAW_INPUT: &[u8] = b"to the slave: \x00\x01\x03\x04\x7f\xff\r\n end";
/// Written into the slave in raw mode.
const RAW_OUTPUT: &[u8] = b"to the master: line one\nline two\n\x00\xfe";
/// Typed into the master in cooked mode: the slave's reader gets a line, the master's reader its echo.
const COOKED_INPUT: &[u8] = b"typed ahead\r";
/// Printed by the slave in cooked mode.
const COOKED_OUTPUT: &[u8] = b"printed\n";

/// The tree: the parent (pid 1 of its own pid namespace, session leader) opens a pty, puts the slave in raw mode
/// (or leaves it cooked), queues both ways, forks; the child keeps the slave, the parent the master. Each writes
/// its descriptor number into a ready file, and on SIGUSR1 reads what is queued for it (without waiting) into a
/// report file, as hex.
const TREE: &str = r#"
import os, sys, tty, time, signal, binascii
work = sys.argv[1]
mode = sys.argv[2]
to_slave = binascii.unhexlify(sys.argv[3])
to_master = binascii.unhexlify(sys.argv[4])
master, slave = os.openpty()
if mode == "raw":
    tty.setraw(slave)
os.write(master, to_slave)
time.sleep(0.2)  # the echo first, then the output
os.write(slave, to_master)

def publish(name, text):
    tmp = os.path.join(work, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, os.path.join(work, name))

def serve(role, fd):
    def report(signum, frame):
        os.set_blocking(fd, False)
        got = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            got += chunk
        publish("report-" + role, binascii.hexlify(got).decode())
    signal.signal(signal.SIGUSR1, report)
    publish("ready-" + role, str(fd))
    while True:
        time.sleep(1)

if os.fork() == 0:
    os.close(master)
    serve("slave", slave)
else:
    os.close(slave)
    serve("master", master)
"#;

/// The post-dump action script: the tree into the test cgroup, the cgroup frozen, the dump failed.
fn action_script(cgroup: &Path, pids: &[i32], marker: &Path) -> String {
    let mut s = String::from("#!/bin/sh\n[ \"$CRTOOLS_SCRIPT_ACTION\" = post-dump ] || exit 0\nset -e\n");
    for p in pids {
        s.push_str(&format!("echo {p} > '{}/cgroup.procs'\n", cgroup.display()));
    }
    s.push_str(&format!("echo 1 > '{}/cgroup.freeze'\n", cgroup.display()));
    s.push_str(&format!("touch '{}'\nexit 1\n", marker.display()));
    s
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    let s = s.trim();
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex from the tree")).collect()
}

/// Waits for `f` to return something, at most `secs` seconds.
fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Where cgroup2 is mounted, from /proc/self/mountinfo.
fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .expect("no cgroup2 mount in /proc/self/mountinfo; mount one (mount -t cgroup2 none /sys/fs/cgroup/unified)")
}

/// The cgroup-v2 path of a process, relative to the cgroup2 mount.
fn cgroup_of(pid: i32) -> String {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read /proc/PID/cgroup");
    text.lines().find_map(|l| l.strip_prefix("0::")).map(|p| p.trim_start_matches('/').to_string()).unwrap_or_default()
}

/// The test's tree, cgroup and CRIU run; everything is undone on drop, also when the test fails half-way.
struct Fixture {
    launcher: Child,
    /// Host pids: the tree's root first.
    pids: Vec<i32>,
    cgroup: Option<PathBuf>,
    /// The cgroup each pid came from.
    home: PathBuf,
}

impl Fixture {
    fn thaw(&self) -> io::Result<()> {
        match &self.cgroup {
            Some(cg) if cg.exists() => fs::write(cg.join("cgroup.freeze"), "0"),
            _ => Ok(()),
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.thaw();
        for p in &self.pids {
            let _ = fs::write(self.home.join("cgroup.procs"), p.to_string());
        }
        if let Some(root) = self.pids.first() {
            // The init of its pid namespace: the kernel kills the rest of the tree with it.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*root), nix::sys::signal::Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.launcher.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if matches!(self.launcher.try_wait(), Ok(None)) {
            let _ = self.launcher.kill();
            let _ = self.launcher.wait();
        }
        if let Some(cg) = self.cgroup.take() {
            for _ in 0..200 {
                if fs::remove_dir(&cg).is_ok() || !cg.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Our own copy of descriptor `fd` of process `pid`.
fn their_fd(pid: i32, fd: i32) -> OwnedFd {
    let pidfd = sys::pidfd_open(pid).expect("pidfd_open");
    sys::pidfd_getfd(pidfd.as_fd(), fd).expect("pidfd_getfd")
}

fn queued(fd: &OwnedFd) -> usize {
    sys::queued_input(fd.as_fd()).expect("FIONREAD")
}

/// Whether an open file (of the tree: our copy shares it) is non-blocking.
fn nonblocking(fd: &OwnedFd) -> bool {
    let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).expect("F_GETFL");
    nix::fcntl::OFlag::from_bits_retain(flags).contains(nix::fcntl::OFlag::O_NONBLOCK)
}

#[test]
fn criu_drained_raw_pty_data_goes_back_into_the_frozen_tree() {
    run("raw", RAW_INPUT, RAW_OUTPUT, RAW_INPUT, RAW_OUTPUT);
}

#[test]
fn criu_drained_cooked_pty_data_goes_back_unprocessed() {
    run("cooked", COOKED_INPUT, COOKED_OUTPUT, b"typed ahead\n", b"typed ahead\r\nprinted\r\n");
}

/// Runs the tree in `mode` with `input` written into the master and `output` into the slave, which queues
/// `for_slave_view` for the slave's reader and `for_master_view` for the master's.
fn run(mode: &str, input: &[u8], output: &[u8], for_slave_view: &[u8], for_master_view: &[u8]) {
    assert!(nix::unistd::geteuid().is_root(), "this test runs CRIU and needs root");
    let criu = phaul_core::criu::locate_criu(None).expect("CRIU for the test").path;
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let images = w.join("images");
    fs::create_dir(&images).expect("images dir");
    fs::write(w.join("tree.py"), TREE).expect("write tree.py");

    let launcher = Command::new("unshare")
        .args(["--pid", "--fork", "setsid", "python3"])
        .arg(w.join("tree.py"))
        .arg(w)
        .args([mode.to_string(), hex(input), hex(output)])
        // CRIU's parasite mounts the tree's /proc at proc.crtools in the tree's working directory: two dumps of
        // trees with one working directory at a time collide there.
        .current_dir(w)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start unshare");
    let launcher_pid = launcher.id();
    let mut fx = Fixture { launcher, pids: Vec::new(), cgroup: None, home: cgroup2_mount() };

    let children = format!("/proc/{launcher_pid}/task/{launcher_pid}/children");
    let root: i32 =
        wait_for("the tree's root", 10, || fs::read_to_string(&children).ok()?.split_whitespace().next()?.parse().ok());
    fx.pids.push(root);
    let ready = |role: &str| fs::read_to_string(w.join(format!("ready-{role}"))).ok()?.trim().parse::<i32>().ok();
    let master_fd = wait_for("the tree's master", 10, || ready("master"));
    let slave_fd = wait_for("the tree's slave", 10, || ready("slave"));
    let child: i32 = wait_for("the tree's child", 10, || {
        fs::read_to_string(format!("/proc/{root}/task/{root}/children")).ok()?.split_whitespace().next()?.parse().ok()
    });
    fx.pids.push(child);
    fx.home = cgroup2_mount().join(cgroup_of(root));

    // Before the dump the bytes are queued.
    let master = their_fd(root, master_fd);
    let slave = their_fd(child, slave_fd);
    wait_for("the queued bytes", 5, || {
        (queued(&slave) == for_slave_view.len() && queued(&master) == for_master_view.len()).then_some(())
    });
    assert!(!nonblocking(&master) && !nonblocking(&slave), "the tree's pty files start blocking");

    let cg = cgroup2_mount().join(format!("phaul-tty-test-{}-{mode}", std::process::id()));
    fs::create_dir(&cg).expect("create the test cgroup");
    fx.cgroup = Some(cg.clone());
    let marker = w.join("post-dump-ran");
    let script = w.join("action.sh");
    fs::write(&script, action_script(&cg, &fx.pids, &marker)).expect("write action script");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod action script");

    let mut dump = Command::new(&criu)
        .args(["dump", "-t", &root.to_string(), "-v4", "-o", "dump.log", "-D"])
        .arg(&images)
        .arg("--action-script")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start criu dump");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = dump.try_wait().expect("wait for criu") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = dump.kill();
            let _ = dump.wait();
            panic!("criu dump did not finish within 60 s (see {})", images.join("dump.log").display());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let log = images.join("dump.log");
    let errors = phaul_core::criu::error_lines(&log);
    assert!(!status.success(), "the dump was to fail at post-dump, yet CRIU succeeded");
    assert!(marker.exists(), "CRIU failed before post-dump: {errors:#?} (see {})", log.display());
    assert!(images.join("tty-data.img").exists(), "CRIU drained no pty data: {errors:#?}");

    // CRIU resumed the tree into the frozen cgroup: alive, frozen, its queues empty.
    wait_for("the frozen cgroup", 5, || {
        fs::read_to_string(cg.join("cgroup.events")).ok()?.lines().any(|l| l == "frozen 1").then_some(())
    });
    assert!(fx.pids.iter().all(|p| sys::pid_alive(*p)), "the tree did not survive the failed dump");
    assert_eq!(queued(&slave), 0, "CRIU left the slave's queue alone");
    assert_eq!(queued(&master), 0, "CRIU left the master's queue alone");
    // CRIU's drain switched the files to non-blocking and, the tree being meant to die, left them so.
    assert!(nonblocking(&master) && nonblocking(&slave), "CRIU left the tree's pty files blocking");

    let done = write_back_tty_data(&images, &fx.pids).expect("write back");
    assert_eq!(done.ttys.len(), 2, "{done:#?}");
    let for_slave = done.ttys.iter().find(|t| t.queued_for == PtyEnd::Slave).expect("the slave's entry");
    let for_master = done.ttys.iter().find(|t| t.queued_for == PtyEnd::Master).expect("the master's entry");
    assert_eq!(for_slave.bytes, for_slave_view);
    assert_eq!((for_slave.written_into, for_slave.holder_pid, for_slave.holder_fd), (PtyEnd::Master, root, master_fd));
    assert_eq!(for_master.bytes, for_master_view);
    assert_eq!(
        (for_master.written_into, for_master.holder_pid, for_master.holder_fd),
        (PtyEnd::Slave, child, slave_fd)
    );
    assert_eq!(for_slave.index, for_master.index);
    assert!(for_slave.remainder.is_empty() && for_master.remainder.is_empty());
    assert_eq!(done.bytes_written(), for_slave_view.len() + for_master_view.len());
    assert_eq!(done.reblocked.len(), 2, "{done:#?}");
    assert!(!nonblocking(&master) && !nonblocking(&slave), "the tree's pty files are blocking again");

    // Queued again while still frozen...
    wait_for("the bytes back in the queues", 5, || {
        (queued(&slave) == for_slave_view.len() && queued(&master) == for_master_view.len()).then_some(())
    });
    let cg_procs = fs::read_to_string(cg.join("cgroup.procs")).expect("cgroup.procs");
    assert_eq!(cg_procs.split_whitespace().count(), 2, "the tree stayed in the frozen cgroup");

    // ...and after the thaw each process reads exactly what was queued for it.
    fx.thaw().expect("thaw");
    wait_for("the thaw", 5, || {
        fs::read_to_string(cg.join("cgroup.events")).ok()?.lines().any(|l| l == "frozen 0").then_some(())
    });
    for p in &fx.pids {
        fs::write(fx.home.join("cgroup.procs"), p.to_string()).expect("move the tree back to its cgroup");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), nix::sys::signal::Signal::SIGUSR1).expect("SIGUSR1");
    }
    let report = |role: &str| fs::read_to_string(w.join(format!("report-{role}"))).ok().map(|s| unhex(&s));
    assert_eq!(wait_for("the slave's report", 10, || report("slave")), for_slave_view);
    assert_eq!(wait_for("the master's report", 10, || report("master")), for_master_view);
    drop(fx);
    assert!(!cg.exists(), "the test cgroup was not removed");
}
