//! Starting `phaul serve` in host B and `phaul migrate` in host A without the testbed's `Lab::migrate`, for the
//! variants it does not cover:
//!
//! * phaul's own TLS connections: `phaul serve --listen 10.91.0.2:PORT --once --tls-*` and `phaul migrate ... --to
//!   10.91.0.2:PORT --tls-*` (certificates from `phaul cert`, made once per run: [`Pki`]);
//! * another build of phaul (the baseline before the handover commit, [`PhaulBuild::other`]) over handed-in
//!   descriptors, with that build's own plugin libraries and its own command line ([`Dialect`]).
//!
//! Both processes are sampled like `Lab::migrate` samples them (see [`crate::usage`]).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use phaul_testbed::{spawn_with_fds, Host, MigrationRun, ProcUsage, ADDR_A, ADDR_B, PLUGIN_FILES};
use serde_json::Value;

use crate::usage::Watched;
use crate::{Context, Ctx, Result};

/// How long `phaul serve --listen` may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a whole migration may take before both sides are killed.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(180);
/// How long `phaul serve` may take to exit once `phaul migrate` has.
const SERVE_EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// First TCP port `phaul serve --listen` is given (inside host B's private network namespace).
const PORT_BASE: u16 = 29000;

/// The command line a phaul build takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// The working tree's: global `--state-dir`; `serve --rpid-dir DIR` and `migrate --dst-rpid NAME` (a bare
    /// name the destination writes under its directory).
    Current,
    /// Before the handover commit (859f623 and earlier): no `--state-dir` or `--rpid-dir`; `migrate --dst-rpid
    /// PATH` names the file the destination writes.
    Before,
}

/// A `phaul` binary with the plugin list that goes with it.
#[derive(Debug, Clone)]
pub struct PhaulBuild {
    pub bin: PathBuf,
    pub plugins: PathBuf,
    pub dialect: Dialect,
    /// The commit it was built from, when it can be told (`git rev-parse` in its tree).
    pub commit: Option<String>,
}

impl PhaulBuild {
    /// The workspace's own build, as `Lab::migrate` runs it.
    pub fn current(ctx: &Ctx<'_>) -> PhaulBuild {
        PhaulBuild {
            bin: ctx.lab.phaul.clone(),
            plugins: ctx.lab.plugins.clone(),
            dialect: Dialect::Current,
            commit: None,
        }
    }

    /// The build in `dir` (a `target/release` holding `phaul` and its plugin libraries): a plugin list naming
    /// that directory's libraries is written to `plugins` (plugins are checked against the binary's ABI, so each
    /// build needs its own), and the command line it takes is read from its `serve --help`.
    pub fn other(dir: &Path, plugins: &Path) -> Result<PhaulBuild> {
        let bin = dir.join("phaul");
        if !bin.is_file() {
            return Err(format!("no phaul binary in {} (give the baseline's target/release)", dir.display()).into());
        }
        let mut text = format!("# written by phaul-bench for the build in {}\n", dir.display());
        for (name, file) in PLUGIN_FILES.iter().filter(|(n, _)| ["pid", "shared"].contains(n)) {
            let lib = dir.join(file);
            if !lib.is_file() {
                return Err(
                    format!("{} is missing (build that tree with `cargo build --workspace`)", lib.display()).into()
                );
            }
            text.push_str(&format!("\n[[plugin]]\n# {name}\npath = \"{}\"\n", lib.display()));
        }
        text.push_str("\n[host-type.pid]\nfs = \"shared\"\n");
        std::fs::write(plugins, text).ctx(|| format!("writing {}", plugins.display()))?;
        let help = phaul_testbed::run_command(Command::new(&bin).args(["serve", "--help"]), Duration::from_secs(20))
            .ctx(|| format!("running {} serve --help", bin.display()))?;
        let dialect = if String::from_utf8_lossy(&help.stdout).contains("--rpid-dir") {
            Dialect::Current
        } else {
            Dialect::Before
        };
        let commit = commit_of_build(&bin);
        Ok(PhaulBuild { bin, plugins: plugins.to_path_buf(), dialect, commit })
    }
}

/// The commit of the tree a binary in `TREE/target/PROFILE/` was built in, marked when its tracked files differ
/// from it (none when it is not in such a tree).
pub fn commit_of_build(bin: &Path) -> Option<String> {
    let tree = bin.parent()?.parent()?.parent()?;
    if !tree.join(".git").exists() {
        return None;
    }
    let git = |args: &[&str]| {
        phaul_testbed::run_command(Command::new("git").arg("-C").arg(tree).args(args), Duration::from_secs(10))
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).filter(|h| !h.is_empty())?;
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{head} plus uncommitted changes") } else { head })
}

/// A CA and a certificate for each host, made with `phaul cert`.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca: PathBuf,
    /// Host A's certificate and key (the source's, presented as a client).
    pub a: (PathBuf, PathBuf),
    /// Host B's certificate and key (valid for 10.91.0.2, the address the source dials).
    pub b: (PathBuf, PathBuf),
}

impl Pki {
    /// `phaul cert ca DIR`, `phaul cert host DIR host-a --ip 10.91.0.1`, `phaul cert host DIR host-b --ip 10.91.0.2`.
    pub fn create(phaul: &Path, dir: &Path) -> Result<Pki> {
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        let d = dir.display().to_string();
        let (a, b) = (ADDR_A.to_string(), ADDR_B.to_string());
        for args in [
            vec!["cert", "ca", d.as_str()],
            vec!["cert", "host", d.as_str(), "host-a", "--ip", a.as_str()],
            vec!["cert", "host", d.as_str(), "host-b", "--ip", b.as_str()],
        ] {
            let mut cmd = Command::new(phaul);
            cmd.args(&args);
            let out = phaul_testbed::run_command(&mut cmd, Duration::from_secs(30))
                .ctx(|| format!("phaul {}", args.join(" ")))?;
            if !out.status.success() {
                return Err(format!("phaul {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)).into());
            }
        }
        let pki = Pki {
            ca: dir.join("ca.pem"),
            a: (dir.join("host-a.pem"), dir.join("host-a.key")),
            b: (dir.join("host-b.pem"), dir.join("host-b.key")),
        };
        for f in [&pki.ca, &pki.a.0, &pki.a.1, &pki.b.0, &pki.b.1] {
            if !f.is_file() {
                return Err(format!("phaul cert wrote no {}", f.display()).into());
            }
        }
        Ok(pki)
    }

    fn args(&self, (cert, key): &(PathBuf, PathBuf)) -> Vec<String> {
        let p = |p: &Path| p.display().to_string();
        vec!["--tls-cert".into(), p(cert), "--tls-key".into(), p(key), "--tls-ca".into(), p(&self.ca)]
    }
}

/// How the two phaul processes reach each other.
#[derive(Debug, Clone, Copy)]
pub enum Transport<'a> {
    /// Three TCP connections the benchmark connects across the veth and hands in (`--fdrpc/--fdmem/--fdfs`), as
    /// `Lab::migrate` does.
    Fds,
    /// phaul's own connections with mutual TLS: `serve --listen 10.91.0.2:PORT`, `migrate --to 10.91.0.2:PORT`.
    Tls(&'a Pki),
}

/// What a migration produced, whichever way it was started.
#[derive(Debug)]
pub struct LaunchRun {
    pub src_status: ExitStatus,
    pub src_stdout: String,
    pub src_stderr: String,
    pub dst_status: ExitStatus,
    pub dst_stderr: String,
    pub report: Option<Value>,
    pub restored_pid: Option<i32>,
    pub src_usage: Option<ProcUsage>,
    pub dst_usage: Option<ProcUsage>,
    /// From the start (before `phaul serve` was started) until `phaul migrate` was seen to exit.
    pub src_elapsed: Duration,
}

impl LaunchRun {
    pub fn succeeded(&self) -> bool {
        self.src_status.success() && self.dst_status.success()
    }

    pub fn describe(&self) -> String {
        format!(
            "source exit {:?}, destination exit {:?}\n--- source stderr:\n{}\n--- source stdout:\n{}\n--- destination stderr:\n{}",
            self.src_status.code(),
            self.dst_status.code(),
            self.src_stderr,
            self.src_stdout,
            self.dst_stderr
        )
    }
}

impl From<MigrationRun> for LaunchRun {
    fn from(r: MigrationRun) -> LaunchRun {
        LaunchRun {
            src_status: r.src_status,
            src_stdout: r.src_stdout,
            src_stderr: r.src_stderr,
            dst_status: r.dst_status,
            dst_stderr: r.dst_stderr,
            report: r.report,
            restored_pid: r.restored_pid,
            src_usage: r.src_usage,
            dst_usage: r.dst_usage,
            src_elapsed: r.src_elapsed,
        }
    }
}

fn arg(p: &Path) -> String {
    p.display().to_string()
}

/// `phaul ARGS` in `host`, or `WRAPPER WRAPPER-ARGS -- phaul ARGS`.
fn phaul_command(host: &Host, bin: &Path, wrapper: Option<&(PathBuf, Vec<String>)>, args: &[String]) -> Command {
    match wrapper {
        None => host.command(bin, args),
        Some((prog, wargs)) => {
            let mut all = wargs.clone();
            all.push("--".into());
            all.push(arg(bin));
            all.extend(args.iter().cloned());
            host.command(prog, &all)
        }
    }
}

/// What to run: the build, how the two sides connect, and the extras.
pub struct Launch<'a> {
    pub build: &'a PhaulBuild,
    pub transport: Transport<'a>,
    /// Arguments added to `phaul migrate` (e.g. `--pre-dump off`).
    pub src_args: Vec<String>,
    pub src_wrapper: Option<(PathBuf, Vec<String>)>,
    pub dst_wrapper: Option<(PathBuf, Vec<String>)>,
    /// How often to check for the exits (and to sample).
    pub poll: Duration,
}

/// Migrates the tree rooted at `pid` from A to B as `l` says, sampling both phaul processes.
pub fn migrate(ctx: &Ctx<'_>, pid: i32, l: &Launch<'_>) -> Result<LaunchRun> {
    if matches!((l.build.dialect, l.transport), (Dialect::Before, Transport::Tls(_))) {
        return Err(
            "a phaul build from before the handover commit has no TLS; run it over handed-in descriptors".into()
        );
    }
    let lab = ctx.lab;
    let id = ctx.next_id();
    let (src_images, dst_images) = (lab.path("src-images"), lab.path("dst-images"));
    let rpid_name = format!("rpid-{pid}-{id}");
    let rpid = lab.path(&rpid_name);
    let _ = std::fs::remove_file(&rpid);
    let plugins = arg(&l.build.plugins);

    let mut serve_args = vec!["--plugins".to_string(), plugins.clone(), "serve".into()];
    let mut mig_args = vec!["--plugins".to_string(), plugins, "migrate".into(), "pid".into(), pid.to_string()];
    let port = PORT_BASE + (id % 5000) as u16;
    let target = format!("{ADDR_B}:{port}");
    match l.transport {
        Transport::Fds => {
            for a in [&mut serve_args, &mut mig_args] {
                a.extend(["--fdrpc", "3", "--fdmem", "4", "--fdfs", "5"].map(String::from));
            }
        }
        Transport::Tls(pki) => {
            serve_args.extend(["--listen".to_string(), target.clone(), "--once".into()]);
            serve_args.extend(pki.args(&pki.b));
            mig_args.extend(["--to".to_string(), target.clone()]);
            mig_args.extend(pki.args(&pki.a));
        }
    }
    serve_args.extend(["--img-path".to_string(), arg(&dst_images), "--timeout".into(), "120".into()]);
    mig_args.extend(["--img-path".to_string(), arg(&src_images), "--timeout".into(), "120".into()]);
    match l.build.dialect {
        Dialect::Current => {
            serve_args.extend(["--state-dir".to_string(), arg(&lab.path("dst-state"))]);
            serve_args.extend(["--rpid-dir".to_string(), arg(lab.scratch.path())]);
            mig_args.extend(["--state-dir".to_string(), arg(&lab.path("src-state"))]);
            mig_args.extend(["--dst-rpid".to_string(), rpid_name]);
        }
        Dialect::Before => mig_args.extend(["--dst-rpid".to_string(), arg(&rpid)]),
    }
    mig_args.push("--json".into());
    mig_args.extend(l.src_args.iter().cloned());

    let limit = MIGRATE_TIMEOUT + Duration::from_secs(60);
    let mut serve_cmd = phaul_command(lab.b(), &l.build.bin, l.dst_wrapper.as_ref(), &serve_args);
    serve_cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut mig_cmd = phaul_command(lab.a(), &l.build.bin, l.src_wrapper.as_ref(), &mig_args);
    mig_cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());

    let started = Instant::now();
    let (serve, migrate) = match l.transport {
        Transport::Fds => {
            let ch = lab.pair.channel_triple()?;
            let serve =
                spawn_with_fds(serve_cmd, &[(ch.rpc.1.as_fd(), 3), (ch.mem.1.as_fd(), 4), (ch.fs.1.as_fd(), 5)])
                    .ctx(|| "starting phaul serve".into())?;
            let serve = Watched::new(serve, true, l.poll, limit);
            let migrate =
                spawn_with_fds(mig_cmd, &[(ch.rpc.0.as_fd(), 3), (ch.mem.0.as_fd(), 4), (ch.fs.0.as_fd(), 5)])
                    .ctx(|| "starting phaul migrate".into())?;
            // Only the two phaul processes may hold the channels, so that either one's death is seen by the other.
            drop(ch);
            (serve, Watched::new(migrate, true, l.poll, limit))
        }
        Transport::Tls(_) => {
            let serve = Watched::new(serve_cmd.spawn().ctx(|| "starting phaul serve".into())?, true, l.poll, limit);
            wait_listening(&serve, &target)?;
            let migrate = mig_cmd.spawn().ctx(|| "starting phaul migrate".into())?;
            (serve, Watched::new(migrate, true, l.poll, limit))
        }
    };
    let src = migrate.finish(MIGRATE_TIMEOUT, l.poll).ctx(|| "waiting for phaul migrate".into())?;
    let src_elapsed = started.elapsed();
    let dst = serve.finish(SERVE_EXIT_TIMEOUT, l.poll).ctx(|| "waiting for phaul serve".into())?;
    for (timed_out, what, bound) in
        [(src.timed_out, "phaul migrate", MIGRATE_TIMEOUT), (dst.timed_out, "phaul serve", SERVE_EXIT_TIMEOUT)]
    {
        if timed_out {
            return Err(format!(
                "{what} did not finish within {bound:?} and was killed; source stderr: {}; destination stderr: {}",
                src.stderr, dst.stderr
            )
            .into());
        }
    }
    let report = serde_json::from_str::<Value>(&src.stdout).ok();
    let restored_pid = std::fs::read_to_string(&rpid).ok().and_then(|s| s.trim().parse().ok());
    let _ = std::fs::remove_file(&rpid);
    Ok(LaunchRun {
        src_status: src.status,
        src_stdout: src.stdout,
        src_stderr: src.stderr,
        dst_status: dst.status,
        dst_stderr: dst.stderr,
        report,
        restored_pid,
        src_usage: src.usage,
        dst_usage: dst.usage,
        src_elapsed,
    })
}

/// Waits until `phaul serve --listen` says it serves (it prints `phaul: serving on ADDR` once it listens), or
/// fails when it exits first or takes longer than [`LISTEN_TIMEOUT`].
fn wait_listening(serve: &Watched, target: &str) -> Result<()> {
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    loop {
        let err = serve.stderr.text();
        if err.contains(&format!("serving on {target}")) {
            return Ok(());
        }
        if serve.exited() {
            return Err(format!("phaul serve --listen {target} exited before it listened: {}", err.trim()).into());
        }
        if Instant::now() >= deadline {
            return Err(
                format!("phaul serve did not listen on {target} within {LISTEN_TIMEOUT:?}: {}", err.trim()).into()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
