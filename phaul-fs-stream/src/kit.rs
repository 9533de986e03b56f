//! What every streaming filesystem driver needs around the channel: its options read and checked, the channel
//! itself, the tool found, a tool's output collected, and the receiving side of a round.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use phaul_abi::{FsArgs, FsRoundInfo, PluginError, PluginResult};

use crate::{Channel, Done, Next, Start};

/// An I/O error as a plugin error, saying what was being done.
pub fn io_err(what: &str) -> impl Fn(std::io::Error) -> PluginError + '_ {
    move |e| PluginError::failed(format!("{what}: {e}"))
}

/// Refuses an option `driver` does not know on this `side` (the source's options as a receiver sees them,
/// `peer.KEY`, are not this side's to check).
pub fn check_known(args: &FsArgs, known: &[&str], driver: &str, side: &str) -> PluginResult<()> {
    match args.options.iter().find(|kv| !known.contains(&kv.key.as_str()) && !phaul_abi::is_peer_option(&kv.key)) {
        Some(kv) => Err(PluginError::invalid(format!(
            "the {driver} filesystem driver has no {side} option '{}'; it knows {}",
            kv.key,
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// A whole number of seconds from option `key` (`default` when not given).
pub fn seconds(args: &FsArgs, key: &str, default: u64) -> PluginResult<Duration> {
    match args.option(key) {
        None => Ok(Duration::from_secs(default)),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|s| *s > 0 && *s < 1 << 31)
            .map(Duration::from_secs)
            .ok_or_else(|| PluginError::invalid(format!("--fs-opt {key}={v}: give a whole number of seconds"))),
    }
}

/// The filesystem channel (a duplicate of phaul's descriptor), with `timeout` on each read and write.
pub fn channel(args: &FsArgs, driver: &str, timeout: Duration) -> PluginResult<Channel> {
    let fd = args.data_fd().ok_or_else(|| {
        PluginError::invalid(format!(
            "the {driver} filesystem driver needs phaul's filesystem channel (--fdfs, or phaul's own)"
        ))
    })?;
    let owned = phaul_abi::dup_fd(fd).map_err(|e| PluginError::failed(format!("the filesystem channel: {e}")))?;
    Ok(Channel::new(owned, Some(timeout)))
}

/// The program `name`: the option's path if given (`--fs-opt NAME=PATH`), else the first on PATH; `package` is
/// what to install when it is missing.
pub fn find_program(opt: Option<&str>, name: &str, driver: &str, side: &str, package: &str) -> PluginResult<PathBuf> {
    if let Some(p) = opt {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(PluginError::not_found(format!("--fs-opt {name}={}: no such program on the {side}", p.display())))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into());
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()).ok_or_else(|| {
        PluginError::not_found(format!(
            "the {driver} filesystem driver needs {name}, which is not installed on the {side} (apt-get install \
             {package}, or --fs-opt {name}=PATH)"
        ))
    })
}

/// The most of a tool's output kept (its end: the last lines say why it failed).
pub const OUTPUT_KEPT: usize = 256 * 1024;

/// Collects a child's pipe in a thread, keeping its last [`OUTPUT_KEPT`] bytes (a peer can make a tool print a
/// lot).
pub fn collect(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    v.extend_from_slice(&buf[..n]);
                    if v.len() > 2 * OUTPUT_KEPT {
                        v.drain(..v.len() - OUTPUT_KEPT);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        v
    })
}

/// The receiving half of a driver, as [`receive_round`] drives it.
pub trait SessionReceiver {
    fn channel(&mut self) -> &mut Channel;
    /// Runs one session the sender started (answering it with its `Done`).
    fn session(&mut self, st: Start, is_final: bool) -> PluginResult<Done>;
}

/// Receives round `info.number`: every session the sender starts, until it ends the round. The round is complete
/// only when each of the `roots` had a session of pass `first_pass`; `tool` names the driver in errors and
/// `failed` what a failed session is called ("rsync failed receiving"). Returns the bytes taken in.
pub fn receive_round<R: SessionReceiver>(
    r: &mut R,
    info: &FsRoundInfo,
    roots: usize,
    first_pass: u8,
    tool: &str,
    failed: &str,
) -> PluginResult<u64> {
    let mut seen = std::collections::BTreeSet::new();
    let mut bytes = 0;
    let mut failure: Option<String> = None;
    let waiting = format!("waiting for the source's {tool} round");
    loop {
        match r.channel().recv_next().map_err(io_err(&waiting))? {
            Next::Session(st) if st.round != info.number => {
                return Err(PluginError::failed(format!(
                    "the source sent {tool} round {} while this side waits for round {}",
                    st.round, info.number
                )))
            }
            Next::Session(st) => {
                if st.pass == first_pass {
                    seen.insert(st.index);
                }
                let d = r.session(st, info.is_final)?;
                bytes += d.bytes;
                if !d.ok && failure.is_none() {
                    failure = Some(format!("{failed} (exit {}): {}", d.code, d.message));
                }
            }
            Next::End { round, .. } if round != info.number => {
                return Err(PluginError::failed(format!(
                    "the source ended {tool} round {round} while this side waits for round {}",
                    info.number
                )))
            }
            Next::End { .. } => break,
            Next::Abort(m) => return Err(PluginError::failed(format!("the source's {tool} round failed: {m}"))),
        }
    }
    if failure.is_none() && seen.len() != roots {
        failure =
            Some(format!("the source ended {tool} round {} after {} of its {roots} roots", info.number, seen.len()));
    }
    match failure {
        Some(f) => Err(PluginError::failed(f)),
        None => Ok(bytes),
    }
}

/// What a tool run for one session gave: the relay's byte counts (or how the channel broke), the tool's exit code
/// (-1 when it could not start or was killed) and the end of its stderr.
pub struct ToolRun {
    pub relayed: std::io::Result<crate::Relayed>,
    pub code: i32,
    pub stderr: Vec<u8>,
}

/// Runs `cmd` for the sending side of a session: its stdout goes into the channel (stdin closed, stderr kept);
/// killed if the channel breaks.
pub fn send_from(chan: &mut Channel, mut cmd: std::process::Command) -> ToolRun {
    use std::process::Stdio;
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    match cmd.spawn() {
        Ok(mut child) => {
            let out = child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
            let err = child.stderr.take().map(collect);
            let relayed = chan.relay(None, out);
            if relayed.is_err() {
                let _ = child.kill();
            }
            let code = child.wait().ok().and_then(|s| s.code()).unwrap_or(-1);
            ToolRun { relayed, code, stderr: err.map(|h| h.join().unwrap_or_default()).unwrap_or_default() }
        }
        Err(e) => {
            let relayed = chan.relay(None, None);
            ToolRun { relayed, code: -1, stderr: format!("cannot start {program}: {e}").into_bytes() }
        }
    }
}

/// Runs `cmd` for the receiving side of a session: what arrives goes into its stdin through `gate` (a check the
/// bytes pass first), its stdout is drained, its stderr kept; killed if the channel breaks.
pub fn receive_into(
    chan: &mut Channel,
    mut cmd: std::process::Command,
    gate: impl FnOnce(std::process::ChildStdin) -> Box<dyn std::io::Write + Send>,
) -> ToolRun {
    use std::process::Stdio;
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    match cmd.spawn() {
        Ok(mut child) => {
            let stdin = child.stdin.take().map(gate);
            let out = child.stdout.take().map(collect);
            let err = child.stderr.take().map(collect);
            let relayed = chan.relay(stdin, None);
            if relayed.is_err() {
                let _ = child.kill();
            }
            let code = child.wait().ok().and_then(|s| s.code()).unwrap_or(-1);
            let _ = out.map(|h| h.join());
            ToolRun { relayed, code, stderr: err.map(|h| h.join().unwrap_or_default()).unwrap_or_default() }
        }
        Err(e) => {
            let relayed = chan.relay(None, None);
            ToolRun { relayed, code: -1, stderr: format!("cannot start {program}: {e}").into_bytes() }
        }
    }
}

/// Runs `program args` to completion with `env` set (stdin closed): its stdout, or an error saying `what` failed,
/// with the end of the tool's stderr.
pub fn run_tool<S: AsRef<std::ffi::OsStr>>(
    program: &std::path::Path,
    args: &[S],
    env: &[(&str, &str)],
    what: &str,
) -> PluginResult<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| PluginError::failed(format!("{what}: cannot run {}: {e}", program.display())))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(PluginError::failed(format!("{what} failed ({}): {}", out.status, crate::tail(&out.stderr, 2000))))
    }
}

/// A sender's round as the engine sees it: when it failed, the receiver is told first that this round will not
/// complete (it may already be gone).
pub fn abort_on_error<T>(chan: &mut Channel, round: PluginResult<T>) -> PluginResult<T> {
    if let Err(e) = &round {
        let _ = chan.send_abort(&e.message);
    }
    round
}
