//! Shared helpers of the end-to-end tests. Everything here runs the real phaul, the real CRIU (installed by
//! scripts/setup), real network namespaces and real workloads.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use phaul_testbed::fault::wait_until;
use phaul_testbed::reap_pid;

use phaul_testbed::{
    netns_of_pid, pid_alive, pids_in_netns, state_ok, wait_pid_gone, Lab, MigrateOptions, MigrationRun, Workload,
    PROBE_TIMEOUT,
};
use serde_json::Value;

pub fn lab(tag: &str) -> Lab {
    Lab::new(tag).unwrap_or_else(|e| panic!("cannot set up the lab: {e}"))
}

pub fn u64_of(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or_else(|| panic!("state has no number {k}: {v}"))
}

/// Probes the workload and insists its self-check passes.
pub fn probe_ok(w: &Workload, pid: i32) -> Value {
    let v = w.probe_pid(pid, PROBE_TIMEOUT).unwrap_or_else(|e| panic!("probe of pid {pid} failed: {e}"));
    state_ok(&v).unwrap_or_else(|e| panic!("workload state not ok: {e}"));
    v
}

/// What a successful migration left behind.
pub struct Migrated {
    pub run: MigrationRun,
    pub restored: i32,
    pub before: Value,
    pub after: Value,
}

/// Migrates `w` from A to B and asserts what every successful migration must show: both sides exit 0, the
/// source tree is gone from A, the restored tree runs in B's network namespace and passes its self-check, and
/// its counter went on from where it was.
pub fn migrate_and_check(lab: &Lab, w: &mut Workload, opts: MigrateOptions) -> Migrated {
    let before = probe_ok(w, w.pid());
    let run = lab.migrate(w.pid(), opts).unwrap_or_else(|e| panic!("migration did not run: {e}"));
    assert!(run.succeeded(), "migration failed:\n{}", run.describe());
    let restored = run.restored_pid.unwrap_or_else(|| panic!("no restored pid written:\n{}", run.describe()));
    w.adopt_pid(restored).expect("adopt restored pid");
    assert!(wait_pid_gone(w.pid(), Duration::from_secs(10)), "the source tree {} is still alive on A", w.pid());
    assert!(pid_alive(restored), "the restored tree {restored} is not running");
    let b = lab.b().netns_inode().expect("netns of B");
    assert_eq!(netns_of_pid(restored).expect("netns of restored"), b, "the restored tree is not in host B");
    assert!(pids_in_netns(lab.a().netns_inode().expect("netns of A")).expect("pids in A").is_empty());
    let after = probe_ok(w, restored);
    assert!(
        u64_of(&after, "counter") >= u64_of(&before, "counter"),
        "the counter restarted: {} before, {} after",
        u64_of(&before, "counter"),
        u64_of(&after, "counter")
    );
    let report = run.report.clone().unwrap_or_else(|| panic!("no JSON report:\n{}", run.describe()));
    assert_eq!(report["outcome"], "migrated", "{report}");
    assert_eq!(report["restored_pid"], restored, "{report}");
    Migrated { run, restored, before, after }
}

/// Asserts the workload still runs on A, unharmed, and nothing of it runs on B.
pub fn assert_still_on_source(lab: &Lab, w: &Workload, run: &MigrationRun) {
    assert!(!run.src_status.success(), "the source reported success:\n{}", run.describe());
    assert!(pid_alive(w.pid()), "the workload died on the source:\n{}", run.describe());
    probe_ok(w, w.pid());
    let b = lab.b().netns_inode().expect("netns of B");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = pids_in_netns(b).expect("pids in B");
        if left.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "processes left in host B: {left:?}\n{}", run.describe());
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(r) = &run.report {
        assert_eq!(r["outcome"], "failed", "{r}");
    }
}

/// A CA and certificates for hosts A and B (valid for their names, loopback and the veth addresses), made with
/// `phaul cert` in the lab's scratch directory.
pub struct Pki {
    pub dir: std::path::PathBuf,
}

impl Pki {
    pub fn new(lab: &Lab) -> Pki {
        let dir = lab.path("pki");
        let run = |args: &[&str]| {
            let out = std::process::Command::new(&lab.phaul).args(args).output().expect("phaul cert");
            assert!(out.status.success(), "phaul {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let d = dir.display().to_string();
        run(&["cert", "ca", &d]);
        for h in ["hosta.test", "hostb.test", "mallory.test"] {
            run(&["cert", "host", &d, h, "--ip", "127.0.0.1", "--ip", "10.91.0.1", "--ip", "10.91.0.2"]);
        }
        Pki { dir }
    }

    /// `--tls-cert/--tls-key/--tls-ca` of `host`.
    pub fn args(&self, host: &str) -> Vec<String> {
        let p = |f: &str| self.dir.join(f).display().to_string();
        vec![
            "--tls-cert".into(),
            p(&format!("{host}.pem")),
            "--tls-key".into(),
            p(&format!("{host}.key")),
            "--tls-ca".into(),
            p("ca.pem"),
        ]
    }
}

/// A `phaul serve` that is killed (by its pid) if the test ends before it was collected. Its standard error goes
/// to a file in the scratch directory (a pipe nobody reads could fill and stall it).
pub struct Serving {
    child: Option<std::process::Child>,
    pub log: std::path::PathBuf,
}

impl Serving {
    pub fn collect(mut self) -> phaul_testbed::Collected {
        let c = self.child.take().expect("not collected yet");
        let mut c = phaul_testbed::collect(c, Duration::from_secs(30), "serve").expect("serve finished");
        c.stderr = self.log_text();
        c
    }
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The test failed: what serve said is the first thing its reader wants.
            eprintln!("--- phaul serve's log ({}):\n{}", self.log.display(), self.log_text());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `phaul serve --listen ADDR` in host A and waits until it listens; with TLS (host B's certificate)
/// unless `pki` is `None` (then `--insecure-loopback`). Restored-pid files go to the scratch directory.
pub fn serve_listening(lab: &Lab, addr: &str, once: bool, pki: Option<&Pki>) -> Serving {
    serve_listening_with(lab, addr, once, pki, &[])
}

/// [`serve_listening`] with more arguments after `serve`.
pub fn serve_listening_with(lab: &Lab, addr: &str, once: bool, pki: Option<&Pki>, extra: &[&str]) -> Serving {
    serve_at(lab, addr, false, once, pki, extra)
}

/// `phaul serve` started by systemd's socket activation: `systemd-socket-activate -l ADDR` listens and starts
/// phaul (no `--listen`) with the listening socket when the first connection comes.
#[allow(dead_code)]
pub fn serve_socket_activated(lab: &Lab, addr: &str, pki: Option<&Pki>) -> Serving {
    serve_at(lab, addr, true, true, pki, &[])
}

fn serve_at(lab: &Lab, addr: &str, activated: bool, once: bool, pki: Option<&Pki>, extra: &[&str]) -> Serving {
    let plugins = lab.plugins.display().to_string();
    let img = lab.path("dst-images").display().to_string();
    let state = lab.path("dst-state").display().to_string();
    let rpid_dir = lab.scratch.path().display().to_string();
    let mut args = vec![
        "--plugins",
        plugins.as_str(),
        "--state-dir",
        state.as_str(),
        "serve",
        "--img-path",
        img.as_str(),
        "--rpid-dir",
        rpid_dir.as_str(),
    ];
    if !activated {
        args.extend(["--listen", addr]);
    }
    if once {
        args.push("--once");
    }
    args.extend_from_slice(extra);
    let tls = pki.map(|p| p.args("hostb.test")).unwrap_or_else(|| vec!["--insecure-loopback".into()]);
    args.extend(tls.iter().map(String::as_str));
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let log = lab.path(&format!("serve-{}.log", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let file = std::fs::File::create(&log).expect("serve log");
    let mut serve = if activated {
        let phaul = lab.phaul.display().to_string();
        let mut all = vec!["-l", addr, "--", phaul.as_str()];
        all.extend(args.iter().copied());
        lab.a().command("systemd-socket-activate", &all)
    } else {
        lab.a().command(&lab.phaul, &args)
    };
    serve.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(file);
    let child = serve.spawn().expect("serve");
    let serving = Serving { child: Some(child), log };
    wait_listening(lab, addr);
    serving
}

/// Waits (10 s at most) until something accepts connections on `addr` in host A.
pub fn wait_listening(lab: &Lab, addr: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = addr.to_string();
        // A probe that connects and closes at once: serve takes it for a connection that never spoke.
        let ok =
            lab.a().in_netns(Duration::from_secs(5), move || std::net::TcpStream::connect(&a).is_ok()).unwrap_or(false);
        if ok {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "nothing listens on {addr} after 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `phaul migrate pid PID --to ADDR --dst-rpid NAME` in host A, with TLS (host A's certificate, checked
/// against hostb.test) unless `pki` is `None` (then `--insecure-loopback`). The destination writes the restored
/// pid to NAME under its --rpid-dir (the scratch directory): read it with [`restored_pid`].
pub fn migrate_to(
    lab: &Lab,
    pid: i32,
    addr: &str,
    rpid: &std::path::Path,
    pki: Option<&Pki>,
) -> phaul_testbed::Collected {
    migrate_to_as(lab, pid, addr, rpid, pki, "hosta.test")
}

/// [`migrate_to`] with the certificate of `host`.
pub fn migrate_to_as(
    lab: &Lab,
    pid: i32,
    addr: &str,
    rpid: &std::path::Path,
    pki: Option<&Pki>,
    host: &str,
) -> phaul_testbed::Collected {
    let plugins = lab.plugins.display().to_string();
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let src_img = lab
        .path(&format!("src-images-{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)))
        .display()
        .to_string();
    std::fs::create_dir_all(&src_img).expect("source image directory");
    let (pid, rpid) = (pid.to_string(), rpid.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let mut args: Vec<String> =
        ["--plugins", &plugins, "migrate", "pid", &pid, "--to", addr, "--img-path", &src_img, "--dst-rpid", &rpid]
            .iter()
            .map(|s| s.to_string())
            .collect();
    match pki {
        Some(p) => {
            args.extend(p.args(host));
            args.extend(["--tls-server-name".into(), "hostb.test".into()]);
        }
        None => args.push("--insecure-loopback".into()),
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.phaul(&args, &[]).expect("migrate")
}

pub fn restored_pid(rpid: &std::path::Path) -> i32 {
    std::fs::read_to_string(rpid).expect("rpid").trim().parse().expect("pid")
}

pub const COUNTER: &str = r#"n=$(cat count 2>/dev/null || echo 0)
trap 'exit 0' TERM
while :; do
  n=$((n+1))
  echo "$n" > count.new && mv count.new count
  sleep 0.05
done
"#;

/// The counter workload of the `cmd` host type (fixture plugin-restartable), in its state directory.
pub struct CmdWorkload {
    pub dir: PathBuf,
    /// Every pid it ran as (killed at the end, whichever still runs).
    pub pids: Vec<i32>,
}

impl CmdWorkload {
    /// Writes the workload's files and starts it in host A.
    pub fn start(lab: &Lab, name: &str) -> CmdWorkload {
        let dir = lab.path(name);
        CmdWorkload::start_in(lab, &dir, &dir, &[])
    }

    /// Starts it in host A at `dir` through a command `prefix` that execs what follows (`nsenter --mount ...
    /// --`, say); `view` is where this process sees `dir`. The workload's `dir` is then `view`.
    #[allow(dead_code)]
    pub fn start_in(lab: &Lab, dir: &Path, view: &Path, prefix: &[String]) -> CmdWorkload {
        std::fs::create_dir_all(view).expect("state dir");
        std::fs::write(view.join("counter.sh"), COUNTER).expect("counter.sh");
        std::fs::write(view.join("command"), "exec /bin/sh ./counter.sh\n").expect("command");
        let script = format!(
            "cd '{}' && exec /bin/sh ./counter.sh </dev/null >/dev/null 2>&1 &\necho $! > '{}/pid'",
            dir.display(),
            dir.display()
        );
        let mut args: Vec<String> = prefix.iter().skip(1).cloned().collect();
        args.extend(["/bin/sh".into(), "-c".into(), script]);
        let program = prefix.first().cloned().unwrap_or_else(|| "/bin/sh".into());
        let args = if prefix.is_empty() { args[1..].to_vec() } else { args };
        let out = lab.a().run(program, args).expect("start the counter in A");
        assert!(out.status.success(), "the counter did not start: {out:?}");
        let mut w = CmdWorkload { dir: view.to_path_buf(), pids: Vec::new() };
        let pid = w.pid().expect("the counter's pid");
        w.pids.push(pid);
        assert!(wait_until(Duration::from_secs(10), || w.count() > 0), "the counter never counted");
        w
    }

    pub fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("pid")).ok()?.trim().parse().ok()
    }

    pub fn count(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("count")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    pub fn opt(&self) -> String {
        format!("dir={}", self.dir.display())
    }

    /// The one live pid the workload runs as now, after waiting up to `timeout` for one that is not `old`.
    pub fn wait_new_pid(&mut self, old: i32, timeout: Duration) -> Option<i32> {
        let mut found = None;
        wait_until(timeout, || {
            found = self.pid().filter(|p| *p != old && pid_alive(*p));
            found.is_some()
        });
        if let Some(p) = found {
            self.pids.push(p);
        }
        found
    }

    /// Asserts that the counter goes on from at least `from` in a process of host `netns`.
    pub fn assert_counts_in(&self, pid: i32, netns: u64, from: u64, what: &str) {
        assert_eq!(netns_of_pid(pid).expect("netns of the workload"), netns, "the workload does not run {what}");
        let now = self.count();
        assert!(now >= from, "the counter went back: {from} before, {now} now");
        assert!(
            wait_until(Duration::from_secs(10), || self.count() > now),
            "the counter stopped at {now}: the workload does not run {what}"
        );
    }
}

impl Drop for CmdWorkload {
    fn drop(&mut self) {
        for &p in &self.pids {
            if pid_alive(p) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
            }
            // Orphaned to this test process (a subreaper): reap it.
            let _ = reap_pid(p, Duration::from_millis(500));
        }
    }
}

/// The value of phaul's mark on `p`, read with getfattr.
pub fn mark(p: &Path) -> Option<String> {
    let out = std::process::Command::new("getfattr")
        .args(["--absolute-names", "--only-values", "-n", "trusted.phaul.owner"])
        .arg(p)
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The differences found between two trees, or why they could not be compared.
pub type Comparison = Result<Vec<String>, String>;

/// Arms `opts` so that the destination stops at its restore reply (both copies held, so both trees stand still)
/// and the trees `a` and `b` are compared there; the destination then goes on. Read the outcome with
/// [`assert_trees_equal`] after the migration.
#[allow(dead_code)]
pub fn compare_at_restore_reply(
    opts: &mut MigrateOptions,
    hook: PathBuf,
    a: PathBuf,
    b: PathBuf,
) -> std::sync::Arc<std::sync::Mutex<Option<Comparison>>> {
    use phaul_testbed::fault::{FaultRecord, FAULT_AT_ENV, FAULT_FILE_ENV};
    opts.dst_env = vec![
        (FAULT_AT_ENV.into(), "dst:send:RestoreReply".into()),
        (FAULT_FILE_ENV.into(), hook.display().to_string()),
    ];
    let compared = std::sync::Arc::new(std::sync::Mutex::new(None));
    let out = std::sync::Arc::clone(&compared);
    opts.while_running_both = Some(Box::new(move |pids| {
        let mut stopped = None;
        wait_until(Duration::from_secs(120), || {
            stopped = std::fs::read_to_string(&hook).ok().and_then(|t| FaultRecord::parse(&t).ok()).map(|f| f.pid);
            stopped.is_some() || !pid_alive(pids.dst as i32)
        });
        let r = phaul_testbed::tree::compare_trees(&a, &b, &|_: &Path| false).map_err(|e| e.to_string());
        *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        if let Some(p) = stopped {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGCONT);
        }
    }));
    compared
}

/// Insists that [`compare_at_restore_reply`] ran and found the trees equal.
#[allow(dead_code)]
pub fn assert_trees_equal(compared: &std::sync::Mutex<Option<Comparison>>, run: &MigrationRun) {
    match compared.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(Ok(d)) => assert!(d.is_empty(), "B's tree differs from A's at the freeze:\n{}", d.join("\n")),
        Some(Err(e)) => panic!("cannot compare the trees: {e}"),
        None => panic!("the destination never reached its restore reply:\n{}", run.describe()),
    }
}

/// Arms `opts` so that host B's link is blackholed once the destination reaches `point` (it waits there, then
/// goes on into the cut), until both phaul processes gave up; the link then comes back. Read the outcome (the
/// cut happened and was undone) with [`assert_cut_done`].
#[allow(dead_code)]
pub fn cut_link_at(
    opts: &mut MigrateOptions,
    lab: &Lab,
    point: &str,
) -> std::sync::Arc<std::sync::Mutex<Option<Result<(), String>>>> {
    use phaul_testbed::fault::{FaultRecord, FAULT_AT_ENV, FAULT_FILE_ENV};
    let hook = lab.path("fault");
    opts.tolerate_timeouts = true;
    opts.dst_env = vec![(FAULT_AT_ENV.into(), point.into()), (FAULT_FILE_ENV.into(), hook.display().to_string())];
    let b = lab.b().clone();
    let done = std::sync::Arc::new(std::sync::Mutex::new(None));
    let out = std::sync::Arc::clone(&done);
    opts.while_running_both = Some(Box::new(move |pids| {
        let mut stopped = None;
        wait_until(Duration::from_secs(120), || {
            stopped = std::fs::read_to_string(&hook).ok().and_then(|t| FaultRecord::parse(&t).ok()).map(|f| f.pid);
            stopped.is_some() || !pid_alive(pids.dst as i32)
        });
        let Some(p) = stopped else { return };
        let mut cut = match b.cut_link(phaul_testbed::CutKind::Blackhole) {
            Ok(c) => c,
            Err(e) => {
                *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(Err(e.to_string()));
                return;
            }
        };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGCONT);
        // The cut lasts until both sides gave up (bounded), then the link comes back.
        wait_until(Duration::from_secs(90), || !pid_alive(pids.src as i32) && !pid_alive(pids.dst as i32));
        let r = cut.restore().map_err(|e| e.to_string());
        *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }));
    done
}

/// Insists that [`cut_link_at`]'s cut happened and the link came back, and that both sides gave up in time.
#[allow(dead_code)]
pub fn assert_cut_done(done: &std::sync::Mutex<Option<Result<(), String>>>, run: &MigrationRun) {
    match done.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(Ok(())) => {}
        Some(Err(e)) => panic!("the link cut failed: {e}"),
        None => panic!("the destination never reached the cut's point:\n{}", run.describe()),
    }
    assert!(!run.src_timed_out && !run.dst_timed_out, "a side did not give up in time:\n{}", run.describe());
}

/// A small tmpfs mounted over a directory (made if missing) for the test's lifetime: a disk that fills.
pub struct SmallDisk(PathBuf);

impl SmallDisk {
    pub fn mount(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).expect("mkdir");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "phaul-test", &dir.display().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "mount tmpfs on {}", dir.display());
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
