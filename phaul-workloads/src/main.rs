//! `phaul-workload <KIND> --state-dir DIR [options]`: launch a CRIU-friendly test workload as pid 1 of a new
//! pid namespace.
//!
//! The launcher unshares a pid namespace and forks; it prints `PID <host pid of the child>` on stdout and
//! waits for the child, exiting 0 when the child exits (or the child's own non-zero code if it failed to
//! start) or is killed by a signal. The child becomes a session leader, points stdin/stdout/stderr at
//! /dev/null, moves to `/` and runs the workload, which reports through `DIR/state.json`.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, dup2, fork, setsid, ForkResult, Pid};
use phaul_workloads::heartbeat::{self, Heartbeat, WithHeartbeat};
use phaul_workloads::kinds::{
    busy_server::BusyServer, counter::Counter, file_append::FileAppend, lock_holder, lock_holder::LockHolder,
    memory::Memory, pipes::Pipes, pty_queue, pty_queue::PtyQueue, sqlite_writer::SqliteWriter, tcp_server::TcpServer,
    threads::Threads, tree_writer::TreeWriter, unix_pair::UnixPair, unix_server::UnixServer,
};
use phaul_workloads::runner::{self, Workload};
use phaul_workloads::state::{PROBE_FILE, STATE_FILE, STATE_TMP_FILE};

#[derive(Debug, Parser)]
#[command(name = "phaul-workload", version, about = "CRIU-friendly test workloads for phaul")]
struct Cli {
    #[command(subcommand)]
    kind: Kind,
}

#[derive(Debug, Args)]
struct Common {
    /// Directory receiving state.json and the probe file (created if missing).
    #[arg(long)]
    state_dir: PathBuf,
    /// Append `<addr> <beat> <unix_ms>` to FILE every ~20 ms (opened and closed each time); `<addr>` is the
    /// local address towards --heartbeat-probe, naming the host the workload runs on.
    #[arg(long, value_name = "FILE")]
    heartbeat: Option<PathBuf>,
    /// The address a UDP socket is connect()ed to (nothing is sent) to learn the local address, for the
    /// heartbeat and sqlite-writer's host column.
    #[arg(long, value_name = "ADDR:PORT", default_value = heartbeat::DEFAULT_PROBE)]
    heartbeat_probe: SocketAddr,
}

#[derive(Debug, Subcommand)]
enum Kind {
    /// A buffer of pseudo-random bytes whose checksum is verified on every probe.
    Memory {
        #[command(flatten)]
        common: Common,
        /// Size of the buffer in MiB.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
        size_mib: u64,
        /// Dirty this many MiB per second (pages are rewritten with their own content, so the checksum holds).
        #[arg(long, default_value_t = 0)]
        dirty_mib_s: u64,
        /// Once a checkpoint has tracked memory (the first pre-dump), touch this many MiB of new memory per second
        /// (needs soft-dirty tracking in the kernel).
        #[arg(long, default_value_t = 0, value_name = "MIB_S")]
        grow_after_checkpoint: u64,
        /// Stop growing at this many MiB resident in all.
        #[arg(long, default_value_t = 1024, value_name = "MIB")]
        grow_max_mib: u64,
    },
    /// Three processes passing a token around a ring of pipes.
    Pipes {
        #[command(flatten)]
        common: Common,
    },
    /// Worker threads each incrementing its own counter.
    Threads {
        #[command(flatten)]
        common: Common,
        /// Number of worker threads.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1024))]
        threads: u16,
    },
    /// Appends numbered lines to a file it keeps open.
    FileAppend {
        #[command(flatten)]
        common: Common,
        /// The file to append to (created and emptied at start).
        #[arg(long)]
        file: PathBuf,
    },
    /// Keeps creating, renaming, deleting and rewriting files under DIR (see the kind's module).
    TreeWriter {
        #[command(flatten)]
        common: Common,
        /// The tree (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// While this file exists the workload changes nothing.
        #[arg(long)]
        pause_file: Option<PathBuf>,
        /// Lay out no file with an extended attribute or an ACL (for filesystems without them, such as zfs-fuse).
        #[arg(long)]
        no_xattrs: bool,
    },
    /// Two threads ping-ponging a counter over a unix socketpair.
    UnixPair {
        #[command(flatten)]
        common: Common,
    },
    /// Accepts one TCP connection and answers `ping <n>` with `pong <n> <served>`.
    TcpServer {
        #[command(flatten)]
        common: Common,
        /// Address to listen on, e.g. 10.91.0.1:7000.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Only the common fields; the counter ticks every 50 ms.
    Counter {
        #[command(flatten)]
        common: Common,
    },
    /// A pty pair holding a known pattern in both queues, never consumed (the probe reads and writes it back).
    PtyQueue {
        #[command(flatten)]
        common: Common,
        /// Bytes written into the master, queued for the slave's reader.
        #[arg(long, default_value_t = pty_queue::DEFAULT_TO_SLAVE as u16,
              value_parser = clap::value_parser!(u16).range(0..=pty_queue::MAX_QUEUED as i64))]
        to_slave_bytes: u16,
        /// Bytes written into the slave, queued for the master's reader.
        #[arg(long, default_value_t = pty_queue::DEFAULT_TO_MASTER as u16,
              value_parser = clap::value_parser!(u16).range(0..=pty_queue::MAX_QUEUED as i64))]
        to_master_bytes: u16,
    },
    /// Holds an exclusive POSIX record lock (F_SETLK, whole file) on FILE and a flock(LOCK_EX) on another file.
    LockHolder {
        #[command(flatten)]
        common: Common,
        /// The file to lock with fcntl(F_SETLK) (created if missing, never written).
        #[arg(long)]
        file: PathBuf,
        /// The file to flock() (created if missing, never written) [default: FILE.flock].
        #[arg(long)]
        flock_file: Option<PathBuf>,
    },
    /// A unix stream socket bound at PATH answering `ping <n>` with `pong <n> <served>`.
    UnixServer {
        #[command(flatten)]
        common: Common,
        /// The socket path (a stale socket there is unlinked first).
        #[arg(long)]
        path: PathBuf,
    },
    /// A TCP server accepting any number of connections (backlog 64), each served on its own thread.
    BusyServer {
        #[command(flatten)]
        common: Common,
        /// Address to listen on, e.g. 10.91.0.1:7000.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// A SQLite database in WAL mode getting a row every ~20 ms, each acked in a log after its COMMIT.
    SqliteWriter {
        #[command(flatten)]
        common: Common,
        /// The database (created if missing; an existing table is continued).
        #[arg(long)]
        db: PathBuf,
        /// The ack log: `acked <seq> <host>` appended after each COMMIT.
        #[arg(long)]
        ack_log: PathBuf,
    },
}

/// Everything the child needs, with paths made absolute (the child runs in `/`).
#[derive(Debug)]
struct Plan {
    kind: &'static str,
    state_dir: PathBuf,
    spec: Spec,
    /// The heartbeat file, if any.
    heartbeat: Option<PathBuf>,
    heartbeat_probe: SocketAddr,
}

#[derive(Debug)]
enum Spec {
    Memory { size_mib: u64, dirty_mib_s: u64, grow_mib_s: u64, grow_max_mib: u64 },
    Pipes,
    Threads(usize),
    FileAppend(PathBuf),
    TreeWriter { dir: PathBuf, pause: Option<PathBuf>, xattrs: bool },
    UnixPair,
    TcpServer(SocketAddr),
    Counter,
    PtyQueue { to_slave: usize, to_master: usize },
    LockHolder { file: PathBuf, flock_file: PathBuf },
    UnixServer(PathBuf),
    BusyServer(SocketAddr),
    SqliteWriter { db: PathBuf, ack_log: PathBuf },
}

fn absolute_file(path: &Path) -> Result<PathBuf, String> {
    let name = path.file_name().ok_or_else(|| format!("{} does not name a file", path.display()))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent = parent.canonicalize().map_err(|e| format!("directory of {} is not usable: {e}", path.display()))?;
    Ok(parent.join(name))
}

fn plan(cli: Cli) -> Result<Plan, String> {
    let (kind, common, spec) = match cli.kind {
        Kind::Memory { common, size_mib, dirty_mib_s, grow_after_checkpoint, grow_max_mib } => {
            let spec = Spec::Memory { size_mib, dirty_mib_s, grow_mib_s: grow_after_checkpoint, grow_max_mib };
            ("memory", common, spec)
        }
        Kind::Pipes { common } => ("pipes", common, Spec::Pipes),
        Kind::Threads { common, threads } => ("threads", common, Spec::Threads(usize::from(threads))),
        Kind::FileAppend { common, file } => ("file-append", common, Spec::FileAppend(absolute_file(&file)?)),
        Kind::TreeWriter { common, dir, pause_file, no_xattrs } => {
            std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let dir = dir.canonicalize().map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
            let pause = pause_file.as_deref().map(absolute_file).transpose()?;
            ("tree-writer", common, Spec::TreeWriter { dir, pause, xattrs: !no_xattrs })
        }
        Kind::UnixPair { common } => ("unix-pair", common, Spec::UnixPair),
        Kind::TcpServer { common, listen } => ("tcp-server", common, Spec::TcpServer(listen)),
        Kind::Counter { common } => ("counter", common, Spec::Counter),
        Kind::PtyQueue { common, to_slave_bytes, to_master_bytes } => {
            let spec =
                Spec::PtyQueue { to_slave: usize::from(to_slave_bytes), to_master: usize::from(to_master_bytes) };
            ("pty-queue", common, spec)
        }
        Kind::LockHolder { common, file, flock_file } => {
            let file = absolute_file(&file)?;
            let flock_file = match flock_file {
                Some(f) => absolute_file(&f)?,
                None => lock_holder::default_flock_path(&file),
            };
            ("lock-holder", common, Spec::LockHolder { file, flock_file })
        }
        Kind::UnixServer { common, path } => ("unix-server", common, Spec::UnixServer(absolute_file(&path)?)),
        Kind::BusyServer { common, listen } => ("busy-server", common, Spec::BusyServer(listen)),
        Kind::SqliteWriter { common, db, ack_log } => {
            let spec = Spec::SqliteWriter { db: absolute_file(&db)?, ack_log: absolute_file(&ack_log)? };
            ("sqlite-writer", common, spec)
        }
    };
    let heartbeat = common.heartbeat.as_deref().map(absolute_file).transpose()?;
    std::fs::create_dir_all(&common.state_dir)
        .map_err(|e| format!("cannot create state dir {}: {e}", common.state_dir.display()))?;
    let state_dir = common
        .state_dir
        .canonicalize()
        .map_err(|e| format!("cannot resolve state dir {}: {e}", common.state_dir.display()))?;
    // A stale state file from an earlier run would make the new workload look alive.
    for stale in [STATE_FILE, STATE_TMP_FILE, PROBE_FILE] {
        match std::fs::remove_file(state_dir.join(stale)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove stale {}: {e}", state_dir.join(stale).display())),
        }
    }
    Ok(Plan { kind, state_dir, spec, heartbeat, heartbeat_probe: common.heartbeat_probe })
}

/// Close every descriptor above 2 that the child inherited, so a checkpoint sees only what it opens.
fn close_inherited_fds() {
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(rd) => rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()).filter(|&fd| fd > 2).collect(),
        Err(_) => return,
    };
    for fd in fds {
        // The directory's own descriptor is in the list but already closed: EBADF is expected then.
        let _ = nix::unistd::close(fd);
    }
}

/// Point fds 0, 1 and 2 at /dev/null.
fn stdio_to_devnull() -> Result<(), String> {
    let null = open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| format!("cannot open /dev/null: {e}"))?;
    for target in 0..=2 {
        if null != target {
            dup2(null, target).map_err(|e| format!("dup2 /dev/null onto {target} failed: {e}"))?;
        }
    }
    if null > 2 {
        nix::unistd::close(null).map_err(|e| format!("close of /dev/null failed: {e}"))?;
    }
    Ok(())
}

fn child(plan: &Plan) -> Result<Infallible, String> {
    setsid().map_err(|e| format!("setsid failed: {e}"))?;
    close_inherited_fds();
    stdio_to_devnull()?;
    // Not "/": CRIU's parasite mounts a private /proc at "proc.crtools" relative to the dumped task's working
    // directory, so two trees dumped at the same time from one working directory collide (EEXIST).
    chdir(&plan.state_dir).map_err(|e| format!("chdir {} failed: {e}", plan.state_dir.display()))?;
    runner::install_probe_handler().map_err(|e| format!("cannot install the SIGUSR1 handler: {e}"))?;
    let mut workload: Box<dyn Workload> = match &plan.spec {
        Spec::Memory { size_mib, dirty_mib_s, grow_mib_s, grow_max_mib } => Box::new(
            Memory::new(*size_mib)?.dirtying(*dirty_mib_s).growing_after_checkpoint(*grow_mib_s, *grow_max_mib)?,
        ),
        Spec::Pipes => Box::new(Pipes::start()?),
        Spec::Threads(n) => Box::new(Threads::start(*n)?),
        Spec::FileAppend(path) => Box::new(FileAppend::open(path)?),
        Spec::TreeWriter { dir, pause, xattrs } => Box::new(TreeWriter::open(dir, pause.as_deref(), *xattrs)?),
        Spec::UnixPair => Box::new(UnixPair::start()?),
        Spec::TcpServer(addr) => Box::new(TcpServer::start(*addr)?),
        Spec::Counter => Box::new(Counter),
        Spec::PtyQueue { to_slave, to_master } => Box::new(PtyQueue::start(*to_slave, *to_master)?),
        Spec::LockHolder { file, flock_file } => Box::new(LockHolder::start(file, flock_file)?),
        Spec::UnixServer(path) => Box::new(UnixServer::start(path)?),
        Spec::BusyServer(addr) => Box::new(BusyServer::start(*addr)?),
        Spec::SqliteWriter { db, ack_log } => Box::new(SqliteWriter::start(db, ack_log, plan.heartbeat_probe)?),
    };
    // Started after the kind, which may fork (pipes) and must then still be single-threaded.
    if let Some(file) = &plan.heartbeat {
        let hb = Heartbeat::start(file.clone(), plan.heartbeat_probe)?;
        workload = Box::new(WithHeartbeat::new(workload, hb));
    }
    runner::run(&plan.state_dir, workload.as_mut())
}

fn wait_child(child: Pid) -> ExitCode {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, 0)) | Ok(WaitStatus::Signaled(..)) => return ExitCode::SUCCESS,
            Ok(WaitStatus::Exited(_, code)) => {
                eprintln!("phaul-workload: the workload (pid {child}) exited with status {code}; see its state.json");
                return ExitCode::from(u8::try_from(code).unwrap_or(1));
            }
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("phaul-workload: waitpid({child}) failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let plan = match plan(cli) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("phaul-workload: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = unshare(CloneFlags::CLONE_NEWPID) {
        eprintln!("phaul-workload: unshare(CLONE_NEWPID) failed: {e} (root is required)");
        return ExitCode::FAILURE;
    }
    // SAFETY: the launcher is single-threaded (no thread has been spawned), so the child may run any code.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let code = match child(&plan) {
                Ok(never) => match never {},
                Err(e) => {
                    runner::publish_failure(&plan.state_dir, plan.kind, &e);
                    2
                }
            };
            std::process::exit(code)
        }
        Ok(ForkResult::Parent { child }) => {
            let mut out = std::io::stdout().lock();
            if let Err(e) = writeln!(out, "PID {child}").and_then(|()| out.flush()) {
                eprintln!("phaul-workload: cannot report the pid on stdout: {e}");
            }
            drop(out);
            wait_child(child)
        }
        Err(e) => {
            eprintln!("phaul-workload: fork failed: {e}");
            ExitCode::FAILURE
        }
    }
}
