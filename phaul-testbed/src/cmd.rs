//! Running short commands with a bounded wait.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::error::TestbedError;

/// The default bound for short administrative commands (`ip`, `nsenter ... true`).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

const POLL: Duration = Duration::from_millis(5);
/// After killing a child, how long to wait for it to be reaped.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// The command line as a human would type it (for messages).
pub fn describe_command(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Wait for `child` at most `timeout`; `None` if it is still running.
pub(crate) fn try_wait_for(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

/// Kill (SIGKILL, by its pid) and reap our child, waiting at most [`KILL_GRACE`].
pub(crate) fn kill_and_reap(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Err(e) = child.kill() {
        log::warn!("cannot kill child {}: {e}", child.id());
    }
    match try_wait_for(child, KILL_GRACE) {
        Ok(Some(_)) => {}
        Ok(None) => log::warn!("child {} still not reaped {KILL_GRACE:?} after SIGKILL", child.id()),
        Err(e) => log::warn!("cannot reap child {}: {e}", child.id()),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error just ends the capture; whatever was read is still reported.
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Run `cmd` to completion with stdin from /dev/null and stdout/stderr captured, killing it after
/// `timeout`. A non-zero exit is an error ([`TestbedError::CommandFailed`]) carrying its stderr.
pub fn run_command(cmd: &mut Command, timeout: Duration) -> Result<Output, TestbedError> {
    let command = describe_command(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| TestbedError::Spawn { command: command.clone(), source })?;
    let out_rx = child.stdout.take().map(drain);
    let err_rx = child.stderr.take().map(drain);
    let status = try_wait_for(&mut child, timeout).map_err(|e| TestbedError::io(format!("waiting for `{command}`"), e));
    let status = match status {
        Ok(Some(st)) => st,
        Ok(None) => {
            kill_and_reap(&mut child);
            let stderr = collect(err_rx);
            return Err(TestbedError::CommandTimedOut { command, timeout, stderr: lossy_trim(&stderr) });
        }
        Err(e) => {
            kill_and_reap(&mut child);
            return Err(e);
        }
    };
    let stdout = collect(out_rx);
    let stderr = collect(err_rx);
    if !status.success() {
        return Err(TestbedError::CommandFailed { command, status: status.to_string(), stderr: lossy_trim(&stderr) });
    }
    Ok(Output { status, stdout, stderr })
}

/// The captured bytes; a grandchild still holding the pipe must not hang us, hence the bound.
fn collect(rx: Option<mpsc::Receiver<Vec<u8>>>) -> Vec<u8> {
    rx.and_then(|rx| rx.recv_timeout(Duration::from_secs(2)).ok()).unwrap_or_default()
}

pub(crate) fn lossy_trim(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes).trim().to_string();
    if s.is_empty() {
        "(empty)".to_string()
    } else {
        s
    }
}
