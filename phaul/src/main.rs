//! `phaul`: live migration of Linux process trees and containers between hosts, with CRIU.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use phaul_core::criu::{locate_criu, Criu};
use phaul_core::engine::guard::ProcessGuards;
use phaul_core::engine::resolve::{self, Force, Reach, SourceSettler};
use phaul_core::engine::{
    self, DestinationChannels, DestinationConfig, DestinationContext, Ended, HandoverOrder, OnNoConverge, Policy,
    PreDump, SourceChannels, SourceConfig, SourceContext,
};
use phaul_core::hold::SystemKeeper;
use phaul_core::journal::{self, DestinationJournal, Journals, SourceJournal};
use phaul_core::plugins::{find_configs, Drivers, Registry};
use phaul_core::transport::{self, Channel, ChannelName};

/// Exit status when the migration failed and the workload still runs on the source.
const EXIT_FAILED: u8 = 1;
/// Exit status for bad input (options, files, descriptors).
const EXIT_USAGE: u8 = 2;
/// Exit status when the outcome is in doubt: the source's copy is kept until `phaul resolve`.
const EXIT_IN_DOUBT: u8 = 3;
/// Exit status when post-copy lost the workload.
const EXIT_LOST: u8 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "phaul",
    version,
    about = "Live migration of Linux process trees and containers between hosts, with CRIU"
)]
#[command(long_about = "phaul moves a running process tree or container from this host (`phaul migrate`) to another \
    (`phaul serve`) with CRIU: optional pre-copy rounds while it runs, a final dump while it is frozen, restore on the \
    destination, and only then is the source killed. Any failure before the destination confirms the restore leaves \
    the workload running on the source.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct Common {
    /// The plugin list (default: $PHAUL_PLUGINS, else SYSCONFDIR/phaul/plugins.toml followed by
    /// SYSCONFDIR/phaul/plugins.d/*.toml in sorted order; never the working directory).
    #[arg(long, global = true, value_name = "FILE")]
    plugins: Option<PathBuf>,
    /// Where phaul's system configuration lives (phaul/plugins.toml, phaul/plugins.d, phaul/phaul.toml).
    #[arg(long, global = true, value_name = "DIR", default_value = phaul_core::plugins::DEFAULT_SYSCONFDIR)]
    sysconfdir: PathBuf,
    /// The CRIU binary (default: $PHAUL_CRIU, then where scripts/setup installs it, then PATH).
    #[arg(long, global = true, value_name = "PATH")]
    criu: Option<PathBuf>,
    /// Write phaul's log to this file.
    #[arg(long, global = true, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Longest wait for the peer or for CRIU, in seconds, while nothing is frozen.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = engine::DEFAULT_TIMEOUT_SECS)]
    timeout: u64,
    /// Where each side keeps its small journal of every session's state (for `phaul resolve`).
    #[arg(long, global = true, value_name = "DIR", default_value = journal::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// A dead peer or a cut link is noticed within about this many seconds (TCP keepalive and user timeout).
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = engine::DEFAULT_LINK_TIMEOUT_SECS)]
    link_timeout: u32,
    /// Settings file ([tls] cert, key, ca, crl, allow); default SYSCONFDIR/phaul/phaul.toml when it exists.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// TLS on phaul's own connections (`--to`, `--listen`). Handed-in descriptors (`--fdrpc`...) are the caller's
/// business: it vouches for them.
#[derive(Args, Debug, Default, Clone)]
struct TlsArgs {
    /// This host's certificate (PEM), signed by the CA both hosts trust (`phaul cert` makes them).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The CA certificate (PEM) the peer's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// A revocation list of that CA (PEM); re-read when it changes.
    #[arg(long, value_name = "FILE")]
    tls_crl: Option<PathBuf>,
    /// serve: accept only peers whose certificate names one of these (repeatable; default: any the CA signed).
    #[arg(long, value_name = "NAME")]
    tls_allow: Vec<String>,
    /// migrate, resolve: the name the destination's certificate must carry (default: the host part of --to).
    #[arg(long, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Without TLS, on loopback addresses only. WARNING: then any local user can make `phaul serve` restore a
    /// process, as root.
    #[arg(long)]
    insecure_loopback: bool,
}

/// The settings file.
#[derive(serde::Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct Settings {
    tls: Option<phaul_core::transport::tls::TlsFiles>,
}

/// The TLS files: the command line's, else the settings file's.
fn tls_files(c: &Common, t: &TlsArgs) -> Result<Option<phaul_core::transport::tls::TlsFiles>, Fail> {
    if t.insecure_loopback {
        if t.tls_cert.is_some() || t.tls_key.is_some() || t.tls_ca.is_some() {
            return Err(Fail(EXIT_USAGE, "--insecure-loopback and --tls-* exclude each other".into()));
        }
        return Ok(None);
    }
    let default_settings = c.sysconfdir.join("phaul/phaul.toml");
    let from_file = match (&c.config, default_settings.as_path()) {
        (Some(p), _) => Some(read_settings(p)?),
        (None, d) if d.exists() => Some(read_settings(d)?),
        _ => None,
    }
    .and_then(|s| s.tls);
    let mut f = match (t.tls_cert.clone(), t.tls_key.clone(), t.tls_ca.clone(), from_file) {
        (Some(cert), Some(key), Some(ca), _) => {
            phaul_core::transport::tls::TlsFiles { cert, key, ca, crl: None, allow: Vec::new() }
        }
        (None, None, None, Some(f)) => f,
        (None, None, None, None) => {
            return Err(Fail(
                EXIT_USAGE,
                "phaul's own connections need TLS: give --tls-cert, --tls-key and --tls-ca (or [tls] in SYSCONFDIR/phaul/phaul.toml, /etc by default; `phaul cert` makes certificates), or --insecure-loopback to stay on loopback without it (then any local user can make phaul serve restore processes as root)".into(),
            ))
        }
        _ => return Err(Fail(EXIT_USAGE, "give --tls-cert, --tls-key and --tls-ca together".into())),
    };
    if let Some(crl) = &t.tls_crl {
        f.crl = Some(crl.clone());
    }
    if !t.tls_allow.is_empty() {
        f.allow = t.tls_allow.clone();
    }
    Ok(Some(f))
}

fn read_settings(p: &std::path::Path) -> Result<Settings, Fail> {
    let meta = std::fs::metadata(p)
        .map_err(|e| Fail(EXIT_USAGE, format!("cannot read the settings file {}: {e}", p.display())))?;
    if !meta.is_file() {
        return Err(Fail(EXIT_USAGE, format!("the settings file {} is not a regular file", p.display())));
    }
    // It names the CA and the peers serve accepts: held to the same ownership rules as the plugin lists.
    if let Some(why) = phaul_core::plugins::unsafe_file(p) {
        return Err(Fail(EXIT_USAGE, format!("refusing the settings file {}: {why}", p.display())));
    }
    if meta.len() > 1 << 20 {
        return Err(Fail(EXIT_USAGE, format!("the settings file {} is larger than 1 MiB", p.display())));
    }
    let text = std::fs::read_to_string(p)
        .map_err(|e| Fail(EXIT_USAGE, format!("cannot read the settings file {}: {e}", p.display())))?;
    toml::from_str(&text)
        .map_err(|e| Fail(EXIT_USAGE, format!("{} is not a valid phaul settings file: {e}", p.display())))
}

/// How `--to` connections are made.
fn dialer(c: &Common, t: &TlsArgs, to: &str) -> Result<phaul_core::transport::Dialer, Fail> {
    match tls_files(c, t)? {
        None => Ok(phaul_core::transport::Dialer::Insecure),
        Some(f) => {
            let config = f.client_config()?;
            let server_name = t.tls_server_name.clone().unwrap_or_else(|| phaul_core::transport::host_of(to));
            Ok(phaul_core::transport::Dialer::Tls { config, server_name })
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Migrate a workload from this host to a destination running `phaul serve`.
    Migrate(MigrateArgs),
    /// Receive migrations: the destination side.
    Serve(ServeArgs),
    /// List the plugins of the plugin list.
    Plugins {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check what a migration would need, on this host and (with --to or --fdrpc) on the destination, without
    /// dumping anything: one line per check, OK / WARN / FAIL with what to do.
    Check(CheckArgs),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// List the image sets kept under --img-path (size, age, outcome), or prune them.
    Images(ImagesArgs),
    /// Write man pages (phaul.1 and one per subcommand, from these very definitions) into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Settle a session whose outcome is in doubt (after a cut link or a dead phaul), on either host.
    Resolve(ResolveArgs),
    /// Make certificates for phaul's TLS: a CA, host certificates it signs, revocations.
    #[command(subcommand)]
    Cert(CertCmd),
    /// The source's guard (started by `phaul migrate`; not for operators).
    #[command(name = "__guard", hide = true)]
    Guard {
        #[arg(long)]
        journal: PathBuf,
        #[arg(long)]
        watch_fd: i32,
        #[arg(long, default_value_t = engine::DEFAULT_RESOLVE_TIMEOUT_SECS)]
        patience: u64,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// CRIU's action script for host types that restore by themselves (written by `phaul serve`; not for
    /// operators): hands the action to the restoring `phaul serve` on SOCKET and exits as it answers.
    #[command(name = "__notify", hide = true)]
    Notify { socket: PathBuf },
}

#[derive(Subcommand, Debug)]
enum CertCmd {
    /// Create a CA in DIR (ca.pem, ca.key).
    Ca {
        dir: PathBuf,
        /// The CA's name.
        #[arg(long, default_value = "phaul CA")]
        name: String,
    },
    /// Create a certificate for host NAME signed by the CA in DIR (NAME.pem, NAME.key), valid as a server and
    /// as a client.
    Host {
        dir: PathBuf,
        name: String,
        /// Also valid for this IP address (repeatable).
        #[arg(long, value_name = "ADDR")]
        ip: Vec<std::net::IpAddr>,
        /// Where to write the files (default: DIR).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Revoke a certificate the CA in DIR signed: DIR/crl.pem lists it from now on (give it to --tls-crl).
    Revoke { dir: PathBuf, cert: PathBuf },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ForceArg {
    /// The destination holds no copy (you checked): resume the source's copy.
    Resume,
    /// The destination runs the workload (you checked): end the source's copy.
    End,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SideArg {
    Source,
    Destination,
}

#[derive(Args, Debug)]
struct ResolveArgs {
    /// The session (in the report, the error message and `phaul resolve --list`).
    #[arg(required_unless_present = "list")]
    session: Option<String>,
    /// List the sessions this host has journals of, and their states.
    #[arg(long)]
    list: bool,
    /// Source side: ask the destination's `phaul serve --listen` at this address (default: the one migrated to).
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "fdrpc")]
    to: Option<String>,
    /// Source side: ask the destination on this connection (to a `phaul serve --fdrpc` there).
    #[arg(long, value_name = "FD")]
    fdrpc: Option<i32>,
    /// Source side, when the destination cannot be asked: your decision.
    #[arg(long, value_enum)]
    force: Option<ForceArg>,
    /// Destination side: discard the copy this host holds or runs (when you decided the source's copy counts).
    #[arg(long)]
    discard: bool,
    /// Which side's journal to settle when this host has both.
    #[arg(long, value_enum)]
    side: Option<SideArg>,
    /// How long to keep asking the destination, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    wait: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum HandoverArg {
    /// Sequential when the storage is shared and the workload holds file locks, unix socket files or FIFOs on it;
    /// overlap otherwise.
    Auto,
    /// The destination restores while the source's tree is held frozen.
    Overlap,
    /// The source's tree ends (its image set is its copy) before the destination restores.
    Sequential,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PreDumpArg {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PolicyArg {
    /// Stop when the predicted final downtime is under --max-downtime (QEMU's approach).
    Downtime,
    /// P.Haul's rules: at most 8 rounds; stop at <= 64 pages; stop when pages written grow by more than 10 %.
    Phaul,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum NoConvergeArg {
    /// Dump what is left while frozen, accepting a longer downtime.
    StopAndCopy,
    /// Switch to post-copy for what is left (hybrid; read --mode lazy's warning).
    PostCopy,
    /// Give up before freezing anything; the workload keeps running on the source.
    Abort,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    /// Checkpoint/restore with memory migration (pre-copy when possible, else stop-and-copy).
    Live,
    /// Post-copy: the workload starts on the destination at once and pulls its memory on demand. RISK: from that
    /// moment until the last page has arrived, losing either host or the connection loses the workload.
    Lazy,
    /// No checkpoint: filesystem rounds while it runs, the host type stops it here, a final filesystem round, the
    /// host type starts it on the destination. Needs a host type that can restart (not `pid`); no CRIU needed.
    Restart,
}

/// Connections a caller hands in, already connected to the peer (stream sockets: TCP or AF_UNIX).
#[derive(Args, Debug)]
struct FdArgs {
    /// Control connection (`phaul serve --fdrpc` alone answers `phaul resolve` only).
    #[arg(long, value_name = "FD")]
    fdrpc: Option<i32>,
    /// Memory-page and image connection.
    #[arg(long, value_name = "FD", requires = "fdrpc")]
    fdmem: Option<i32>,
    /// Filesystem data connection (needed only by drivers that copy files).
    #[arg(long, value_name = "FD", requires = "fdrpc")]
    fdfs: Option<i32>,
}

impl FdArgs {
    /// The handed-in channels, checked; `None` when no descriptors were given.
    fn channels(&self) -> Result<Option<(Channel, Channel, Option<Channel>)>, Fail> {
        if self.fdrpc.is_some() && self.fdmem.is_none() {
            return Err(Fail(
                EXIT_USAGE,
                "--fdrpc needs --fdmem too: a migration has a control and a memory connection".into(),
            ));
        }
        let (Some(rpc), Some(mem)) = (self.fdrpc, self.fdmem) else { return Ok(None) };
        phaul_core::sys::check_distinct(&[(Some(rpc), "--fdrpc"), (Some(mem), "--fdmem"), (self.fdfs, "--fdfs")])?;
        let rpc = Channel::from_raw(ChannelName::Rpc, rpc, "--fdrpc")?;
        let mem = Channel::from_raw(ChannelName::Mem, mem, "--fdmem")?;
        let fs = self.fdfs.map(|fd| Channel::from_raw(ChannelName::Fs, fd, "--fdfs")).transpose()?;
        Ok(Some((rpc, mem, fs)))
    }
}

#[derive(Args, Debug)]
struct MigrateArgs {
    /// Host type: what kind of workload (`pid`, `lxc`, ...; see `phaul plugins`).
    htype: String,
    /// Which one: a pid for `pid`, a container name for `lxc`.
    id: String,
    /// The destination's `phaul serve --listen` address.
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["fdrpc", "fdmem", "fdfs"], required_unless_present = "fdrpc")]
    to: Option<String>,
    #[command(flatten)]
    fds: FdArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// Filesystem driver (default: the host type's entry in plugins.toml).
    #[arg(long, value_name = "DRIVER")]
    fs: Option<String>,
    /// An option for the filesystem driver.
    #[arg(long = "fs-opt", value_name = "KEY=VALUE", value_parser = parse_kv)]
    fs_opts: Vec<(String, String)>,
    /// An option for the host type.
    #[arg(long = "htype-opt", value_name = "KEY=VALUE", value_parser = parse_kv)]
    htype_opts: Vec<(String, String)>,
    /// Migration mode. `lazy` (post-copy) is an explicit opt-in: once the destination runs the workload, losing
    /// either host or the connection before the last page has arrived loses the workload. phaul checks that lazy
    /// pages work on both hosts before it freezes anything.
    #[arg(long, value_enum, default_value = "live")]
    mode: ModeArg,
    /// Stop-and-copy only (with --pre-dump off): restore memory on demand from the destination's own copy, so
    /// the workload resumes before its pages are loaded and copying them into it leaves the frozen time. Every
    /// page is on the destination before the source is killed, but until the last one is loaded the workload
    /// depends on CRIU's lazy-pages daemon there. phaul checks that lazy pages work on the destination before it
    /// freezes anything.
    #[arg(long)]
    lazy_restore: bool,
    /// Hybrid: after N pre-copy rounds, switch to post-copy for what is left (same risk as --mode lazy).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    post_copy_after: Option<u32>,
    /// Pre-copy rounds: auto (when the kernel can track dirty memory), on (fail if it cannot), off (stop-and-copy).
    #[arg(long, value_enum, default_value = "auto")]
    pre_dump: PreDumpArg,
    /// When to stop pre-copy rounds.
    #[arg(long, value_enum, default_value = "downtime")]
    policy: PolicyArg,
    /// Target frozen time for --policy downtime, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    max_downtime: u64,
    /// Most pre-copy rounds for --policy downtime.
    #[arg(long, value_name = "N", default_value_t = 16)]
    max_rounds: u32,
    /// What to do when pre-copy does not converge (dirtying as fast as the channel, no progress, or max rounds).
    #[arg(long, value_enum, default_value = "stop-and-copy")]
    on_no_converge: NoConvergeArg,
    /// The order of the handover.
    #[arg(long, value_enum, default_value = "auto")]
    handover: HandoverArg,
    /// Before the point of no return, abort and resume the workload if it has been frozen this long (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = engine::DEFAULT_MAX_FROZEN_SECS)]
    max_frozen: u64,
    /// After the point of no return, how long to try to learn the outcome before ending in doubt (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = engine::DEFAULT_RESOLVE_TIMEOUT_SECS)]
    resolve_timeout: u64,
    /// Keep the image directories on both hosts after a successful migration (they are always kept on failure).
    #[arg(long)]
    keep_images: bool,
    /// Where image directories are created on this host.
    #[arg(long, value_name = "DIR", default_value = engine::DEFAULT_IMG_PATH)]
    img_path: PathBuf,
    /// Have the destination write the restored root pid, once the migration is committed, into a file of this
    /// name under its `--rpid-dir` (a plain name: [A-Za-z0-9._-], at most 64).
    #[arg(long, value_name = "NAME", value_parser = parse_rpid_name)]
    dst_rpid: Option<String>,
    /// Migrate even if the destination's CPU lacks features of this one.
    #[arg(long)]
    skip_cpu_check: bool,
    /// Migrate even if the destination's CRIU is older than this one.
    #[arg(long)]
    skip_criu_check: bool,
    /// Do not have the destination check its free space against the workload's memory (which can overstate the
    /// images: pages shared after a fork count once per process).
    #[arg(long)]
    skip_space_check: bool,
    /// Print the report as JSON on standard output.
    #[arg(long)]
    json: bool,
    /// Write status as JSON lines to this open descriptor while the migration runs: phases, rounds, bytes and
    /// rates, predicted downtime, the session's states (in-doubt included), then the report (schema
    /// phaul-status/1, docs/status-fd.md).
    #[arg(long, value_name = "FD")]
    status_fd: Option<i32>,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// The host type of the workload to check (with ID), e.g. `pid 4242` or `lxc web`.
    htype: Option<String>,
    /// The workload's id for its host type.
    id: Option<String>,
    /// Ask the destination's `phaul serve --listen` at this address too.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "fdrpc")]
    to: Option<String>,
    /// Ask the destination on this connected descriptor (a `phaul serve --fdrpc` at its other end).
    #[arg(long, value_name = "FD")]
    fdrpc: Option<i32>,
    #[command(flatten)]
    tls: TlsArgs,
    /// The filesystem driver the migration would use (default: the host type's).
    #[arg(long, value_name = "DRIVER")]
    fs: Option<String>,
    /// An option for the host type (repeatable), as for `phaul migrate`.
    #[arg(long = "htype-opt", value_name = "KEY=VALUE", value_parser = parse_kv)]
    htype_options: Vec<(String, String)>,
    /// The mode the migration would use.
    #[arg(long, value_enum, default_value_t = ModeArg::Live)]
    mode: ModeArg,
    /// The migration would use pre-copy rounds (then dirty-memory tracking must work on both hosts).
    #[arg(long)]
    pre_copy: bool,
    /// Also try a lazy (post-copy) migration of a throwaway process on this host.
    #[arg(long)]
    try_lazy: bool,
    /// Where this host would keep its images.
    #[arg(long, value_name = "DIR", default_value = engine::DEFAULT_IMG_PATH)]
    img_path: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ImagesArgs {
    #[command(subcommand)]
    action: Option<ImagesAction>,
    /// Where the image directories are.
    #[arg(long, global = true, value_name = "DIR", default_value = engine::DEFAULT_IMG_PATH)]
    img_path: PathBuf,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum ImagesAction {
    /// List the kept image sets (the default).
    List,
    /// Remove kept image sets; never those of a session in progress or in doubt, nor any a process has open.
    Prune {
        /// Only sets at least this old (7d, 12h, 30m, 45s); without it and --keep-failed, every set.
        #[arg(long, value_name = "AGE", value_parser = phaul_core::kept::parse_age)]
        older_than: Option<Duration>,
        /// Keep the newest N sets of failed migrations (and remove the older ones).
        #[arg(long, value_name = "N")]
        keep_failed: Option<usize>,
        /// Say what would go, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also remove sets whose session has no journal in --state-dir (by age; never younger than an hour).
        #[arg(long)]
        include_orphans: bool,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Accept sources on this address (with TLS; loopback only with --insecure-loopback). Without it (and without
    /// --fdrpc), the listening socket systemd's socket activation passed (phaul-serve.socket).
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["fdrpc", "fdmem", "fdfs"])]
    listen: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Serve one migration and exit (always so with --fdrpc).
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    fds: FdArgs,
    /// Where image directories are created on this host.
    #[arg(long, value_name = "DIR", default_value = engine::DEFAULT_IMG_PATH)]
    img_path: PathBuf,
    /// Write the restored root pid here (a source's --dst-rpid goes under --rpid-dir instead).
    #[arg(long, value_name = "FILE")]
    dst_rpid: Option<PathBuf>,
    /// Where a source's --dst-rpid NAME is written (without it, sources may not ask for a pid file).
    #[arg(long, value_name = "DIR")]
    rpid_dir: Option<PathBuf>,
    /// At most this many migrations at once (--listen).
    #[arg(long, value_name = "N", default_value_t = 16)]
    max_sessions: usize,
    /// This side's own option for a host type (repeatable), e.g. `lxc:lxcpath=/srv/lxc`: it comes after the
    /// source's options for that host type, so it wins (paths differ between hosts).
    #[arg(long = "htype-opt", value_name = "HTYPE:KEY=VALUE", value_parser = parse_driver_kv)]
    htype_options: Vec<(String, String, String)>,
    /// This side's own option for a filesystem driver (repeatable), e.g. `zfs:dataset=tank/ct`.
    #[arg(long = "fs-opt", value_name = "DRIVER:KEY=VALUE", value_parser = parse_driver_kv)]
    fs_options: Vec<(String, String, String)>,
    /// After each session, keep only the newest N image sets of failed migrations under --img-path (never one
    /// of a session in progress or in doubt, nor one a process has open).
    #[arg(long, value_name = "N")]
    keep_failed: Option<usize>,
    /// How long a restored copy waits for its source to come back after the control connection broke (seconds;
    /// phaul's own connections only).
    #[arg(long, value_name = "SECONDS", default_value_t = 15)]
    reconnect_window: u64,
}

/// `--dst-rpid`: refused here already, before anything starts, when the destination would refuse it.
fn parse_rpid_name(s: &str) -> Result<String, String> {
    engine::check_name("restored-pid file name", s)
        .map(|()| s.to_string())
        .map_err(|e| format!("{e}; the destination writes the file under its own --rpid-dir"))
}

/// `DRIVER:KEY=VALUE` (serve's own driver options).
fn parse_driver_kv(s: &str) -> Result<(String, String, String), String> {
    let (driver, kv) = s
        .split_once(':')
        .filter(|(d, _)| !d.is_empty())
        .ok_or_else(|| format!("'{s}' is not DRIVER:KEY=VALUE (on serve, name the driver the option is for)"))?;
    let (k, v) = parse_kv(kv)?;
    Ok((driver.to_string(), k, v))
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{s}' is not KEY=VALUE")),
    }
}

/// A failure with the exit status it maps to.
struct Fail(u8, String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(EXIT_USAGE, e.to_string())
    }
}

fn init_logging(c: &Common) -> Result<(), Fail> {
    let level = match c.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let mut b = env_logger::Builder::new();
    b.filter_level(level).format_timestamp_millis();
    if let Some(p) = &c.log_file {
        let f = std::fs::File::options()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| Fail(EXIT_USAGE, format!("cannot open the log file {}: {e}", p.display())))?;
        b.target(env_logger::Target::Pipe(Box::new(f)));
        if c.verbose == 0 {
            b.filter_level(log::LevelFilter::Info);
        }
    }
    let _ = b.try_init();
    Ok(())
}

fn criu(c: &Common) -> Result<Criu, Fail> {
    let loc = locate_criu(c.criu.as_deref())?;
    log::info!("using CRIU {} (chosen by {})", loc.path.display(), loc.chosen_by);
    Ok(Criu::new(loc.path, Duration::from_secs(c.timeout)))
}

fn registry(c: &Common) -> Result<Registry, Fail> {
    let files = find_configs(c.plugins.as_deref(), &c.sysconfdir)?;
    Ok(Registry::load_all(&files)?)
}

fn main() -> ExitCode {
    phaul_core::sys::cloexec_inherited();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("phaul: error: {msg}");
            ExitCode::from(code)
        }
    }
}

fn run(cli: Cli) -> Result<(), Fail> {
    if let Command::Notify { socket } = &cli.command {
        // Run by CRIU, inside its restore: no logging set-up, no configuration; the answer is the exit status.
        return engine::run_notify_helper(socket).map_err(|m| Fail(EXIT_FAILED, m));
    }
    init_logging(&cli.common)?;
    match cli.command {
        Command::Migrate(a) => migrate(&cli.common, a),
        Command::Serve(a) => serve(&cli.common, a),
        Command::Plugins { json } => plugins(&cli.common, json),
        Command::Check(a) => check(&cli.common, a),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "phaul", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { dir } => man_pages(&dir),
        Command::Images(a) => images(&cli.common, a),
        Command::Resolve(a) => resolve_cmd(&cli.common, a),
        Command::Cert(c) => cert(c),
        Command::Guard { journal, watch_fd, patience, tls } => guard(&cli.common, journal, watch_fd, patience, &tls),
        Command::Notify { .. } => Ok(()),
    }
}

fn migrate(c: &Common, a: MigrateArgs) -> Result<(), Fail> {
    let status = match a.status_fd {
        Some(fd) if [a.fds.fdrpc, a.fds.fdmem, a.fds.fdfs].contains(&Some(fd)) => {
            return Err(Fail(
                EXIT_USAGE,
                format!("--status-fd {fd} is also a channel descriptor; give it a descriptor of its own"),
            ))
        }
        Some(fd) if !phaul_core::sys::was_inherited(fd) => {
            return Err(Fail(EXIT_USAGE, format!("--status-fd {fd}: descriptor {fd} is not open; open it for writing before starting phaul (e.g. {fd}>status.jsonl)")))
        }
        Some(fd) if !phaul_core::sys::is_writable(fd) => {
            return Err(Fail(EXIT_USAGE, format!("--status-fd {fd}: descriptor {fd} is not open for writing")))
        }
        Some(fd) => {
            let owned = phaul_core::sys::adopt_inherited(fd).map_err(|e| {
                Fail(
                    EXIT_USAGE,
                    format!(
                        "--status-fd {fd}: {e}; open it for writing before starting phaul (e.g. {fd}>status.jsonl)"
                    ),
                )
            })?;
            Some(engine::StatusSink::new(std::fs::File::from(owned)))
        }
        None => None,
    };
    let reg = registry(c)?;
    let criu = match (criu(c), a.mode) {
        (Ok(criu), _) => criu,
        // Restart mode checkpoints nothing: a host without CRIU can still move a workload that way.
        (Err(_), ModeArg::Restart) => Criu::new(PathBuf::from("criu"), Duration::from_secs(c.timeout)),
        (Err(e), _) => return Err(e),
    };
    let channels = match (a.to, a.fds.channels()?) {
        (Some(addr), _) => {
            let dialer = dialer(c, &a.tls, &addr)?;
            SourceChannels::Connect { addr, dialer }
        }
        (None, Some((rpc, mem, fs))) => SourceChannels::Given { rpc, mem, fs },
        (None, None) => {
            return Err(Fail(EXIT_USAGE, "give the destination with --to HOST:PORT or --fdrpc/--fdmem".into()))
        }
    };
    if a.max_frozen == 0 {
        return Err(Fail(EXIT_USAGE, "--max-frozen must be at least 1 second".into()));
    }
    let cfg = SourceConfig {
        htype: a.htype,
        id: a.id,
        htype_options: a.htype_opts,
        fs: a.fs,
        fs_options: a.fs_opts,
        pre_dump: match a.pre_dump {
            PreDumpArg::Auto => PreDump::Auto,
            PreDumpArg::On => PreDump::On,
            PreDumpArg::Off => PreDump::Off,
        },
        policy: match a.policy {
            PolicyArg::Phaul => Policy::phaul(),
            PolicyArg::Downtime => Policy::Downtime {
                max_downtime_ms: a.max_downtime as f64,
                max_rounds: a.max_rounds.max(1),
                stall_rounds: 3,
            },
        },
        on_no_converge: match a.on_no_converge {
            NoConvergeArg::StopAndCopy => OnNoConverge::StopAndCopy,
            NoConvergeArg::PostCopy => OnNoConverge::PostCopy,
            NoConvergeArg::Abort => OnNoConverge::Abort,
        },
        post_copy_after: a.post_copy_after,
        lazy: matches!(a.mode, ModeArg::Lazy),
        restart: matches!(a.mode, ModeArg::Restart),
        lazy_restore: a.lazy_restore,
        handover: match a.handover {
            HandoverArg::Auto => HandoverOrder::Auto,
            HandoverArg::Overlap => HandoverOrder::Overlap,
            HandoverArg::Sequential => HandoverOrder::Sequential,
        },
        keep_images: a.keep_images,
        img_path: a.img_path,
        state_dir: c.state_dir.clone(),
        skip_cpu_check: a.skip_cpu_check,
        skip_criu_check: a.skip_criu_check,
        skip_space_check: a.skip_space_check,
        timeout: Duration::from_secs(c.timeout),
        max_frozen: Duration::from_secs(a.max_frozen),
        resolve_timeout: Duration::from_secs(a.resolve_timeout),
        link_timeout: c.link_timeout,
        progress: !a.json,
        status: status.clone(),
        dst_rpid: a.dst_rpid,
    };
    let guards = guard_spawner(c, &a.tls, a.resolve_timeout)?;
    let ctx = SourceContext { drivers: &reg, criu: &criu, keeper: Box::new(SystemKeeper), guards: Some(&guards) };
    let (report, ended, result) = engine::migrate(ctx, &cfg, channels);
    if let Some(s) = &status {
        let outcome = match ended {
            Ended::Migrated => "migrated",
            Ended::RolledBack => "rolled-back",
            Ended::InDoubt => "in-doubt",
            Ended::Lost => "lost",
        };
        let error = result.as_ref().err().map(|e| e.to_string());
        let report = serde_json::to_value(&report).unwrap_or_default();
        let end = serde_json::json!({ "outcome": outcome, "error": error, "report": report });
        s.emit_waiting("end", end, Duration::from_secs(5));
        s.finish(Duration::from_secs(5));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| Fail(EXIT_FAILED, e.to_string()))?);
    } else {
        print!("{report}");
    }
    match (result, ended) {
        (Ok(()), _) => Ok(()),
        (Err(e), Ended::Migrated) => Err(Fail(EXIT_FAILED, format!("the workload runs on the destination, but: {e}"))),
        (Err(e), Ended::InDoubt) => Err(Fail(EXIT_IN_DOUBT, e.to_string())),
        (Err(e), Ended::Lost) => Err(Fail(EXIT_LOST, e.to_string())),
        (Err(e), Ended::RolledBack) => Err(Fail(EXIT_FAILED, format!("{e}\nThe workload keeps running on this host."))),
    }
}

/// Guards re-run this phaul: `phaul --plugins ... --criu ... --state-dir ... __guard --patience N`.
fn guard_spawner(c: &Common, t: &TlsArgs, patience: u64) -> Result<ProcessGuards, Fail> {
    let program = std::env::current_exe()
        .map_err(|e| Fail(EXIT_FAILED, format!("cannot find this phaul's own executable to start its guard: {e}")))?;
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    if let Some(p) = &c.plugins {
        args.extend(["--plugins".into(), std::path::absolute(p).unwrap_or_else(|_| p.clone()).into_os_string()]);
    }
    if let Some(p) = &c.criu {
        args.extend(["--criu".into(), p.clone().into_os_string()]);
    }
    // The guard finds the same plugin lists and settings as this phaul.
    args.extend([
        "--sysconfdir".into(),
        std::path::absolute(&c.sysconfdir).unwrap_or_else(|_| c.sysconfdir.clone()).into_os_string(),
    ]);
    if let Some(p) = &c.log_file {
        args.extend(["--log-file".into(), p.clone().into_os_string()]);
    }
    args.extend([
        "--state-dir".into(),
        std::path::absolute(&c.state_dir).unwrap_or_else(|_| c.state_dir.clone()).into_os_string(),
    ]);
    if let Some(p) = &c.config {
        args.extend(["--config".into(), std::path::absolute(p).unwrap_or_else(|_| p.clone()).into_os_string()]);
    }
    args.extend(["-vv".into(), "__guard".into(), "--patience".into(), patience.to_string().into()]);
    // The guard reaches the destination the way this phaul does.
    for (flag, v) in
        [("--tls-cert", &t.tls_cert), ("--tls-key", &t.tls_key), ("--tls-ca", &t.tls_ca), ("--tls-crl", &t.tls_crl)]
    {
        if let Some(p) = v {
            args.extend([flag.into(), std::path::absolute(p).unwrap_or_else(|_| p.clone()).into_os_string()]);
        }
    }
    if let Some(n) = &t.tls_server_name {
        args.extend(["--tls-server-name".into(), n.into()]);
    }
    if t.insecure_loopback {
        args.push("--insecure-loopback".into());
    }
    Ok(ProcessGuards { program, args })
}

fn serve(c: &Common, a: ServeArgs) -> Result<(), Fail> {
    let reg = registry(c)?;
    let criu = criu(c)?;
    let cfg = DestinationConfig {
        img_path: a.img_path,
        dst_rpid: a.dst_rpid,
        timeout: Duration::from_secs(c.timeout),
        state_dir: c.state_dir.clone(),
        reconnect_window: Duration::from_secs(a.reconnect_window),
        link_timeout: c.link_timeout,
        max_sessions: a.max_sessions.max(1),
        rpid_dir: a.rpid_dir,
        htype_options: a.htype_options,
        fs_options: a.fs_options,
        notify_helper: std::env::current_exe().ok(),
    };
    settle_destination_journals(&cfg.state_dir);
    let ctx = DestinationContext { drivers: &reg, criu: Arc::new(criu), cfg: &cfg };
    let keep_failed = a.keep_failed;
    let prune_failed = || {
        let Some(n) = keep_failed else { return };
        let rule = phaul_core::kept::PruneRule { keep_failed: Some(n), ..Default::default() };
        match phaul_core::kept::prune(&cfg.img_path, &cfg.state_dir, rule) {
            Ok(p) => {
                for s in &p.removed {
                    log::info!("--keep-failed {n}: removed {} ({})", s.dir.display(), s.outcome);
                }
                for (d, e) in &p.failed {
                    log::warn!("--keep-failed {n}: could not remove {}: {e}", d.display());
                }
            }
            Err(e) => log::warn!("--keep-failed {n}: {e}"),
        }
    };
    let report = |r: Result<engine::ServeSummary, engine::ServeError>| -> Result<(), Fail> {
        prune_failed();
        match r {
            Ok(s) if s.migrated => {
                let pid = s.restored_pid.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into());
                eprintln!("phaul: session {}: migrated; restored pid {pid}", s.session);
                Ok(())
            }
            Ok(s) if s.session.is_empty() => Ok(()),
            Ok(s) => Err(Fail(EXIT_FAILED, format!("session {} rolled back: {}", s.session, s.reason))),
            Err(e) => Err(Fail(EXIT_FAILED, e.to_string())),
        }
    };
    if let (Some(fd), None) = (a.fds.fdrpc, a.fds.fdmem) {
        // Only a control connection: a `phaul resolve` on the source asks about a session.
        let rpc = Channel::from_raw(ChannelName::Rpc, fd, "--fdrpc")?;
        return report(engine::answer_resolution(&ctx, rpc));
    }
    if let Some((rpc, mem, fs)) = a.fds.channels()? {
        return report(engine::serve_session(&ctx, rpc, None, DestinationChannels::Given { mem, fs }));
    }
    let activated = match &a.listen {
        Some(_) => None,
        None => phaul_core::sys::systemd_listener().map_err(|e| Fail(EXIT_USAGE, format!("socket activation: {e}")))?,
    };
    if a.listen.is_none() && activated.is_none() {
        return Err(Fail(
            EXIT_USAGE,
            "phaul serve needs --listen HOST:PORT, or --fdrpc FD (with --fdmem and --fdfs), or a listening socket from systemd (phaul-serve.socket)".into(),
        ));
    }
    let addr = a.listen.unwrap_or_default();
    let acceptance = match tls_files(c, &a.tls)? {
        Some(f) => transport::Acceptance::Tls(phaul_core::transport::tls::ServerTls::new(f)?),
        None => {
            eprintln!(
                "phaul: WARNING: --insecure-loopback: no TLS; any local user can connect and make this phaul serve restore a process as root"
            );
            transport::Acceptance::Insecure
        }
    };
    let insecure = matches!(acceptance, transport::Acceptance::Insecure);
    let listener: TcpListener = match activated {
        Some(l) => {
            let local = l.local_addr().map_err(|e| Fail(EXIT_USAGE, format!("socket activation: {e}")))?;
            if insecure && !local.ip().is_loopback() {
                return Err(Fail(
                    EXIT_USAGE,
                    format!("--insecure-loopback, but the socket from systemd listens on {local}, not a loopback address; give the socket unit ListenStream=127.0.0.1:PORT or use TLS"),
                ));
            }
            l
        }
        None => transport::listen(&addr, insecure)?,
    };
    eprintln!(
        "phaul: serving on {}{}",
        listener.local_addr().map(|a| a.to_string()).unwrap_or(addr),
        if insecure { " (no TLS, loopback only)" } else { " (TLS, client certificates required)" }
    );
    let stop = AtomicBool::new(false);
    let first: std::sync::Mutex<Option<Result<(), Fail>>> = std::sync::Mutex::new(None);
    let once = a.once;
    let on_done = |r: Result<engine::ServeSummary, engine::ServeError>| {
        let r = report(r);
        if let Err(Fail(_, m)) = &r {
            eprintln!("phaul: {m}");
        }
        if once {
            let mut f = first.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_none() {
                *f = Some(r);
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    };
    engine::server::serve_forever(&ctx, listener, &acceptance, &stop, &on_done)?;
    first.into_inner().unwrap_or_else(|p| p.into_inner()).unwrap_or(Ok(()))
}

/// At start, every destination journal left unsettled by an earlier `phaul serve` is brought up to date.
fn cert(c: CertCmd) -> Result<(), Fail> {
    use phaul_core::transport::certs;
    match c {
        CertCmd::Ca { dir, name } => {
            certs::new_ca(&dir, &name)?;
            println!(
                "CA written to {}: ca.pem (give it to --tls-ca on every host), ca.key (keep it secret)",
                dir.display()
            );
        }
        CertCmd::Host { dir, name, ip, out } => {
            let out = out.unwrap_or_else(|| dir.clone());
            let (c, k) = certs::new_host(&dir, &name, &ip, &out)?;
            println!("{}: --tls-cert {} --tls-key {}", name, c.display(), k.display());
        }
        CertCmd::Revoke { dir, cert } => {
            let crl = certs::revoke(&dir, &cert)?;
            println!(
                "{} revoked; give {} to --tls-crl (phaul serve re-reads it as it changes)",
                cert.display(),
                crl.display()
            );
        }
    }
    Ok(())
}

fn settle_destination_journals(dir: &std::path::Path) {
    let Ok(j) = Journals::open(dir) else { return };
    for mut rec in j.list::<DestinationJournal>().unwrap_or_default() {
        let before = rec.state;
        if let Err(e) = resolve::settle_destination(&j, &mut rec) {
            log::warn!("{e}");
        } else if rec.state != before {
            eprintln!("phaul: session {}: {:?} -> {:?} ({})", rec.session, before, rec.state, rec.note);
        }
    }
}

fn resolve_cmd(c: &Common, a: ResolveArgs) -> Result<(), Fail> {
    let journals = Journals::open(&c.state_dir)?;
    if a.list {
        let src = journals.list::<SourceJournal>()?;
        let dst = journals.list::<DestinationJournal>()?;
        if a.json {
            println!("{}", serde_json::json!({ "source": src, "destination": dst }));
            return Ok(());
        }
        println!("{:<34} {:<12} {:<16} WHAT", "SESSION", "SIDE", "STATE");
        for j in &src {
            println!(
                "{:<34} {:<12} {:<16} {} {}: {}",
                j.session,
                "source",
                format!("{:?}", j.state),
                j.htype,
                j.id,
                j.note
            );
        }
        for j in &dst {
            println!(
                "{:<34} {:<12} {:<16} {} {}: {}",
                j.session,
                "destination",
                format!("{:?}", j.state),
                j.htype,
                j.id,
                j.note
            );
        }
        return Ok(());
    }
    let session = a.session.unwrap_or_default();
    journal::check_session(&session)?;
    let has_src = journals.read::<SourceJournal>(&session)?.is_some();
    let has_dst = journals.read::<DestinationJournal>(&session)?.is_some();
    let side = match (a.side, has_src, has_dst) {
        (Some(s), _, _) => s,
        (None, true, false) => SideArg::Source,
        (None, false, true) => SideArg::Destination,
        (None, true, true) => {
            return Err(Fail(
                EXIT_USAGE,
                format!(
                    "this host has both sides' journals of session {session}; add --side source or --side destination"
                ),
            ))
        }
        (None, false, false) => {
            return Err(Fail(
                EXIT_USAGE,
                format!(
                    "no journal of session {session} in {}; run this on a host that took part, with its --state-dir",
                    c.state_dir.display()
                ),
            ))
        }
    };
    match side {
        SideArg::Destination => {
            let j = resolve::settle_destination_session(&journals, &session, a.discard)?;
            if a.json {
                println!("{}", serde_json::to_string(&j).unwrap_or_default());
            } else {
                let pid = j.restored.map(|p| format!(" (pid {})", p.pid)).unwrap_or_default();
                println!("session {session} on this destination: {:?}{pid}: {}", j.state, j.note);
            }
            Ok(())
        }
        SideArg::Source => {
            let _claim = resolve::claim(&journals, &session)?;
            let reach = match (a.to, a.fdrpc) {
                (Some(addr), _) => {
                    let d = dialer(c, &a.tls, &addr)?;
                    Reach::Addr(addr, d)
                }
                (None, Some(fd)) => Reach::Channel(Channel::from_raw(ChannelName::Rpc, fd, "--fdrpc")?),
                (None, None) => Reach::None,
            };
            let force = a.force.map(|f| match f {
                ForceArg::Resume => Force::Resume,
                ForceArg::End => Force::End,
            });
            settle_source(c, &a.tls, &journals, &session, reach, force, Duration::from_secs(a.wait), a.json)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn settle_source(
    c: &Common,
    tls: &TlsArgs,
    journals: &Journals,
    session: &str,
    reach: Reach,
    force: Option<Force>,
    patience: Duration,
    json: bool,
) -> Result<(), Fail> {
    let criu = criu(c)?;
    let reg = registry(c).ok();
    let restore_options = |j: &SourceJournal| -> Result<phaul_core::abi::CriuOptions, String> {
        let reg = reg.as_ref().ok_or("the plugin list cannot be loaded to restore the image set")?;
        let mut h = reg
            .host_type(
                &j.htype,
                phaul_core::abi::Role::SOURCE,
                phaul_core::abi::Mode::LIVE,
                &j.id,
                &j.htype_options,
                &j.image_dir,
            )
            .map_err(|e| e.to_string())?;
        phaul_core::plugins::criu_options(&mut h, phaul_core::abi::CriuStage::RESTORE)
            .into_result()
            .map_err(|e| e.to_string())
    };
    let start_again = |j: &SourceJournal| -> Result<i32, String> {
        let reg = reg.as_ref().ok_or("the plugin list cannot be loaded to start the workload again")?;
        let mut h = reg
            .host_type(
                &j.htype,
                phaul_core::abi::Role::SOURCE,
                phaul_core::abi::Mode::RESTART,
                &j.id,
                &j.htype_options,
                &j.image_dir,
            )
            .map_err(|e| e.to_string())?;
        h.start().into_result().map_err(|e| e.to_string())
    };
    let mut keeper = SystemKeeper;
    // The journal's --to address is reached the way the migration reached it.
    let to = journals.read::<SourceJournal>(session).ok().flatten().and_then(|j| j.to);
    let dialer = match to {
        Some(to) => Some(dialer(c, tls, &to)?),
        None => None,
    };
    let mut settler = SourceSettler {
        criu: &criu,
        keeper: &mut keeper,
        restore_options: &restore_options,
        start_again: &start_again,
        journals,
        dialer,
    };
    match settler.settle(session, reach, force, patience) {
        Ok(s) => {
            if json {
                println!("{}", serde_json::json!({ "session": session, "state": s.state, "message": s.message }));
            } else {
                println!("session {session}: {}", s.message);
            }
            Ok(())
        }
        Err(e @ resolve::ResolveError::StillInDoubt { .. }) => Err(Fail(EXIT_IN_DOUBT, e.to_string())),
        Err(e) => Err(Fail(EXIT_FAILED, e.to_string())),
    }
}

/// The guard: waits for `phaul migrate` to say it settled the session; if it dies first, settles it.
fn guard(c: &Common, journal: PathBuf, watch_fd: i32, patience: u64, tls: &TlsArgs) -> Result<(), Fail> {
    let watch = phaul_core::sys::adopt_inherited(watch_fd).map_err(|e| Fail(EXIT_USAGE, e.to_string()))?;
    if let Some(word) = resolve::guard_wait(watch) {
        log::debug!("guard: phaul migrate said {word}");
        return Ok(());
    }
    let (dir, session) = resolve::journal_location(&journal)
        .ok_or_else(|| Fail(EXIT_USAGE, format!("{} is not a source journal", journal.display())))?;
    log::warn!("guard: phaul migrate ended without settling session {session}; settling it");
    let journals = Journals::open(&dir)?;
    let _claim = resolve::claim(&journals, &session)?;
    let r = settle_source(c, tls, &journals, &session, Reach::None, None, Duration::from_secs(patience), false);
    if let Err(Fail(_, m)) = &r {
        log::error!("guard: {m}");
    }
    r
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn human_age(s: u64) -> String {
    match s {
        s if s >= 86400 => format!("{}d", s / 86400),
        s if s >= 3600 => format!("{}h", s / 3600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// `phaul images [list|prune]`.
fn images(c: &Common, a: ImagesArgs) -> Result<(), Fail> {
    use phaul_core::kept;
    let fail = |e: kept::KeptError| Fail(EXIT_FAILED, e.to_string());
    match a.action.unwrap_or(ImagesAction::List) {
        ImagesAction::List => {
            let sets = kept::list(&a.img_path, &c.state_dir).map_err(fail)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&sets).map_err(|e| Fail(EXIT_FAILED, e.to_string()))?);
                return Ok(());
            }
            if sets.is_empty() {
                println!("no image sets kept under {}", a.img_path.display());
                return Ok(());
            }
            println!("{:<11} {:>10} {:>5} {:<12} DIRECTORY", "SIDE", "SIZE", "AGE", "OUTCOME");
            for s in &sets {
                let note = s.protected.as_ref().map(|p| format!("  (kept: {p})")).unwrap_or_default();
                let (side, size, age, outcome) = (s.side, human_bytes(s.bytes), human_age(s.age_s), &s.outcome);
                println!("{side:<11} {size:>10} {age:>5} {outcome:<12} {}{note}", s.dir.display());
            }
            let total: u64 = sets.iter().map(|s| s.bytes).sum();
            println!("{} sets, {}", sets.len(), human_bytes(total));
            Ok(())
        }
        ImagesAction::Prune { older_than, keep_failed, dry_run, include_orphans } => {
            let older_than = match (older_than, keep_failed) {
                (None, None) => Some(Duration::ZERO),
                (o, _) => o,
            };
            let rule = kept::PruneRule { older_than, keep_failed, dry_run, include_orphans };
            let r = kept::prune(&a.img_path, &c.state_dir, rule).map_err(fail)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r).map_err(|e| Fail(EXIT_FAILED, e.to_string()))?);
            } else {
                let verb = if dry_run { "would remove" } else { "removed" };
                for s in &r.removed {
                    println!("{verb} {} ({}, {})", s.dir.display(), s.outcome, human_bytes(s.bytes));
                }
                for s in &r.spared {
                    println!("kept {}: {}", s.dir.display(), s.protected.as_deref().unwrap_or(""));
                }
                for (d, e) in &r.failed {
                    println!("could not remove {}: {e}", d.display());
                }
                let freed: u64 = r.removed.iter().map(|s| s.bytes).sum();
                println!(
                    "{verb} {} sets ({}); kept {} that must stay",
                    r.removed.len(),
                    human_bytes(freed),
                    r.spared.len()
                );
            }
            if r.failed.is_empty() {
                Ok(())
            } else {
                Err(Fail(EXIT_FAILED, format!("{} image sets could not be removed", r.failed.len())))
            }
        }
    }
}

/// `phaul man DIR`: phaul.1 and phaul-SUBCOMMAND.1 for each visible subcommand (clap_mangen).
fn man_pages(dir: &std::path::Path) -> Result<(), Fail> {
    let fail = |e: std::io::Error| Fail(EXIT_USAGE, format!("cannot write man pages into {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(fail)?;
    let mut cmd = Cli::command();
    cmd.build();
    clap_mangen::generate_to(cmd, dir).map_err(fail)?;
    // Hidden subcommands are for phaul itself, not operators; clap's `help` subcommands need no pages.
    for e in std::fs::read_dir(dir).map_err(fail)?.flatten() {
        let name = e.file_name().to_string_lossy().trim_end_matches(".1").to_string();
        if name.starts_with("phaul-__") || name.split('-').any(|w| w == "help") {
            std::fs::remove_file(e.path()).map_err(fail)?;
        }
    }
    Ok(())
}

fn plugins(c: &Common, json: bool) -> Result<(), Fail> {
    let reg = registry(c)?;
    if json {
        let list: Vec<serde_json::Value> = reg
            .plugins()
            .iter()
            .map(|p| {
                serde_json::json!({
                    "kind": p.kind.as_str(), "name": p.name, "version": p.version, "abi_revision": p.abi_version,
                    "file": p.path.display().to_string(), "description": p.description,
                    "default_fs": reg.default_fs(&p.name),
                })
            })
            .chain(
                reg.disabled()
                    .iter()
                    .map(|d| serde_json::json!({"file": d.path.display().to_string(), "enabled": false})),
            )
            .collect();
        println!("{}", serde_json::Value::Array(list));
        return Ok(());
    }
    let files: Vec<String> = reg.config_files().iter().map(|f| f.display().to_string()).collect();
    println!("plugins from {}", files.join(", "));
    println!("{:<6} {:<10} {:<8} {:<4} FILE", "KIND", "NAME", "VERSION", "ABI");
    for p in reg.plugins() {
        let fs = reg.default_fs(&p.name).map(|f| format!("  (default fs: {f})")).unwrap_or_default();
        let (kind, name, version, abi) = (p.kind.as_str(), &p.name, &p.version, p.abi_version);
        println!("{kind:<6} {name:<10} {version:<8} {abi:<4} {}{fs}", p.path.display());
    }
    for d in reg.disabled() {
        println!("{:<6} {:<10} {:<8} {:<4} {}", "-", "(disabled)", "-", "-", d.path.display());
    }
    Ok(())
}

fn check(c: &Common, a: CheckArgs) -> Result<(), Fail> {
    use phaul_core::engine::preflight::{self, Level, Want};
    let mut checks = Vec::new();
    let reg = match registry(c) {
        Ok(r) => {
            let files: Vec<String> = r.config_files().iter().map(|f| f.display().to_string()).collect();
            checks.push(preflight::Check {
                host: "source",
                name: "plugins".into(),
                level: Level::Ok,
                message: format!("{} drivers from {}", r.plugins().len(), files.join(", ")),
            });
            r
        }
        Err(Fail(_, m)) => {
            let asked = a.htype.is_some() || a.fs.is_some();
            checks.push(preflight::Check {
                host: "source",
                name: "plugins".into(),
                level: if asked { Level::Fail } else { Level::Warn },
                message: m,
            });
            Registry::load_all(&[]).map_err(|e| Fail(EXIT_FAILED, e.to_string()))?
        }
    };
    let loc = locate_criu(c.criu.as_deref());
    let criu = match &loc {
        Ok(l) => Criu::new(l.path.clone(), Duration::from_secs(c.timeout)),
        Err(_) => Criu::new(PathBuf::from("criu"), Duration::from_secs(c.timeout)),
    };
    if let Err(e) = &loc {
        checks.push(preflight::Check {
            host: "source",
            name: "criu".into(),
            level: if matches!(a.mode, ModeArg::Restart) { Level::Warn } else { Level::Fail },
            message: format!("{e}; run scripts/setup"),
        });
    }
    let scratch = tempfile_dir("phaul-check-")?;
    let work = scratch.path().to_path_buf();
    let mut want = match (&a.htype, &a.id) {
        (Some(h), Some(id)) => {
            let (wc, wl) = preflight::workload_checks(&reg, h, id, &a.htype_options, &work);
            checks.extend(wc);
            Want { htype: Some(h.clone()), expected_image_bytes: wl.resident_bytes, tcp: wl.tcp, ..Default::default() }
        }
        (Some(h), None) => Want { htype: Some(h.clone()), ..Default::default() },
        _ => Want::default(),
    };
    want.fs = a.fs.clone();
    want.restart = matches!(a.mode, ModeArg::Restart);
    want.lazy = matches!(a.mode, ModeArg::Lazy);
    want.pre_copy = a.pre_copy;
    want.img_path = a.img_path.clone();
    let lazy_trial = || -> Result<(), String> {
        let scratch = tempfile::Builder::new().prefix("phaul-check-lazy-").tempdir().map_err(|e| e.to_string())?;
        engine::lazy::trial(&criu, &scratch.path().join("trial"), "this host").map_err(|e| e.to_string())
    };
    let trial: Option<preflight::LazyTrial<'_>> = if a.try_lazy { Some(&lazy_trial) } else { None };
    if loc.is_ok() || want.restart {
        checks.extend(preflight::host_checks("source", &criu, &reg, &want, None, trial));
    }
    drop(scratch);
    // The destination.
    let remote = match (&a.to, a.fdrpc) {
        (Some(to), _) => {
            let d = dialer(c, &a.tls, to)?;
            Some(
                d.dial(to, ChannelName::Rpc, Duration::from_secs(c.timeout), c.link_timeout).map_err(|e| e.to_string()),
            )
        }
        (None, Some(fd)) => Some(Channel::from_raw(ChannelName::Rpc, fd, "--fdrpc").map_err(|e| e.to_string())),
        (None, None) => None,
    };
    if let Some(ch) = remote {
        let cpuinfo = if want.restart || loc.is_err() {
            Vec::new()
        } else {
            let dir = tempfile_dir("phaul-check-cpu-")?;
            let img = criu.preflight(Some(dir.path())).ok().and_then(|(v, _, img)| {
                want.source_criu = Some(v.triple());
                img
            });
            img.unwrap_or_default()
        };
        match ch.and_then(|mut ch| {
            preflight::ask(&mut ch, preflight::request(&want, cpuinfo), Duration::from_secs(c.timeout.max(30)))
        }) {
            Ok(theirs) => checks.extend(theirs),
            Err(e) => checks.push(preflight::Check {
                host: "destination",
                name: "reach".into(),
                level: Level::Fail,
                message: format!("cannot ask the destination: {e}"),
            }),
        }
    }
    let worst = checks.iter().map(|c| c.level).max().unwrap_or(Level::Ok);
    if a.json {
        let v = serde_json::json!({ "result": worst, "checks": checks });
        println!("{}", serde_json::to_string_pretty(&v).map_err(|e| Fail(EXIT_FAILED, e.to_string()))?);
    } else {
        for ch in &checks {
            println!("{:<4}  {:<11} {:<14} {}", ch.level.as_str(), ch.host, format!("{}:", ch.name), ch.message);
        }
    }
    match worst {
        Level::Fail => {
            let n = checks.iter().filter(|c| c.level == Level::Fail).count();
            Err(Fail(
                EXIT_FAILED,
                format!("{n} checks failed: a migration would be refused or fail (see the FAIL lines)"),
            ))
        }
        _ => Ok(()),
    }
}

/// A fresh private scratch directory (random name, mode 0700) under the system's temporary directory, removed
/// when dropped.
fn tempfile_dir(prefix: &str) -> Result<tempfile::TempDir, Fail> {
    tempfile::Builder::new().prefix(prefix).tempdir().map_err(|e| {
        Fail(EXIT_FAILED, format!("cannot make a scratch directory under {}: {e}", std::env::temp_dir().display()))
    })
}
