//! `pty-queue`: a pty pair whose queues hold a known pattern nobody consumes.
//!
//! At start N pseudo-random bytes are written into the master (queued for whoever reads the slave) and M into
//! the slave (queued for the master's reader). The slave is raw (`cfmakeraw`: no echo, no translation; the
//! master side of a pty is raw by default), so the queues hold exactly those bytes. CRIU drains a pty's queues
//! at dump time (and writes them back only if the dumped tree is to keep running), so this shows whether the
//! queued data survives a dump, a restore, or a failed migration that resumes the source.
//!
//! The self-check reads the queued counts (`FIONREAD`, i.e. `TIOCINQ`, on each end), reads everything from
//! both ends without blocking, compares it with the pattern, and writes it back into the opposite end, so the
//! queues are as they were and probes are idempotent.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt, PtyMaster};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use serde_json::{Map, Value};

use crate::hash::XorShift64;
use crate::runner::Workload;

/// The default number of bytes queued for the slave's reader.
pub const DEFAULT_TO_SLAVE: usize = 1000;
/// The default number of bytes queued for the master's reader.
pub const DEFAULT_TO_MASTER: usize = 700;
/// The most either queue may hold: the n_tty read buffer is 4096 bytes.
pub const MAX_QUEUED: usize = 4000;
const SEED_TO_SLAVE: u64 = 0x7074_795f_736c_6176;
const SEED_TO_MASTER: u64 = 0x7074_795f_6d61_7374;
/// Bytes written into one end reach the other end's queue asynchronously (the tty flip buffer is pushed by
/// a kernel worker): counts are waited for at most this long.
const SETTLE: Duration = Duration::from_secs(1);

/// The pattern of `len` bytes for `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = XorShift64::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The bytes queued for reading on `fd` (`FIONREAD`).
fn queued(fd: RawFd) -> Result<usize, String> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points to a live, writable c_int.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
    if r < 0 {
        return Err(format!("ioctl(FIONREAD) failed: {}", std::io::Error::last_os_error()));
    }
    usize::try_from(n).map_err(|_| format!("ioctl(FIONREAD) returned {n}"))
}

fn set_nonblocking(fd: RawFd) -> Result<(), String> {
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| format!("F_GETFL failed: {e}"))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(|e| format!("F_SETFL(O_NONBLOCK) failed: {e}"))?;
    Ok(())
}

/// Write all of `data` to a non-blocking tty end, waiting out `EAGAIN` for at most [`SETTLE`].
fn write_all_nb(mut w: impl Write, data: &[u8], what: &str) -> Result<(), String> {
    let deadline = Instant::now() + SETTLE;
    let mut off = 0;
    while off < data.len() {
        match w.write(&data[off..]) {
            Ok(0) => return Err(format!("writing into the {what} wrote nothing after {off} bytes")),
            Ok(n) => off += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(format!("writing into the {what} failed after {off} bytes: {e}")),
        }
    }
    Ok(())
}

/// Read everything queued on a non-blocking tty end.
fn read_all_nb(mut r: impl Read, what: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(out),
            Err(e) => return Err(format!("reading from the {what} failed after {} bytes: {e}", out.len())),
        }
    }
}

/// Describe how `got` differs from `want` (None if equal).
pub fn describe_difference(got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => Some(format!(
            "byte {i} is {:#04x}, expected {:#04x} ({} of {} bytes)",
            got[i],
            want[i],
            got.len(),
            want.len()
        )),
        None => Some(format!("{} bytes instead of {} (a prefix of the pattern)", got.len(), want.len())),
    }
}

/// The pty pair and the patterns queued in it.
#[derive(Debug)]
pub struct PtyQueue {
    master: PtyMaster,
    slave: File,
    pts: String,
    to_slave: Vec<u8>,
    to_master: Vec<u8>,
    contents_match: Option<bool>,
    checks: u64,
}

impl PtyQueue {
    /// Open the pair, make the slave raw and queue `to_slave` bytes for the slave and `to_master` for the master.
    pub fn start(to_slave: usize, to_master: usize) -> Result<PtyQueue, String> {
        if to_slave > MAX_QUEUED || to_master > MAX_QUEUED {
            return Err(format!("a pty queue holds at most {MAX_QUEUED} bytes here"));
        }
        let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
            .map_err(|e| format!("posix_openpt failed: {e}"))?;
        grantpt(&master).map_err(|e| format!("grantpt failed: {e}"))?;
        unlockpt(&master).map_err(|e| format!("unlockpt failed: {e}"))?;
        let pts = ptsname_r(&master).map_err(|e| format!("ptsname_r failed: {e}"))?;
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&pts)
            .map_err(|e| format!("cannot open the pty slave {pts}: {e}"))?;
        let mut t = tcgetattr(slave.as_fd()).map_err(|e| format!("tcgetattr({pts}) failed: {e}"))?;
        cfmakeraw(&mut t);
        tcsetattr(slave.as_fd(), SetArg::TCSANOW, &t).map_err(|e| format!("tcsetattr({pts}) failed: {e}"))?;
        set_nonblocking(master.as_raw_fd()).map_err(|e| format!("pty master: {e}"))?;
        set_nonblocking(slave.as_raw_fd()).map_err(|e| format!("pty slave {pts}: {e}"))?;
        let q = PtyQueue {
            master,
            slave,
            pts,
            to_slave: pattern(SEED_TO_SLAVE, to_slave),
            to_master: pattern(SEED_TO_MASTER, to_master),
            contents_match: None,
            checks: 0,
        };
        write_all_nb(&q.master, &q.to_slave, "pty master")?;
        write_all_nb(&q.slave, &q.to_master, "pty slave")?;
        let counts = q.wait_counts(q.to_slave.len(), q.to_master.len())?;
        if counts != (q.to_slave.len(), q.to_master.len()) {
            return Err(format!(
                "after queueing, the pty holds {counts:?} bytes (slave, master), not {:?}",
                q.expected()
            ));
        }
        Ok(q)
    }

    fn expected(&self) -> (usize, usize) {
        (self.to_slave.len(), self.to_master.len())
    }

    /// (queued for the slave's reader, queued for the master's reader).
    fn counts(&self) -> Result<(usize, usize), String> {
        let s = queued(self.slave.as_raw_fd()).map_err(|e| format!("pty slave: {e}"))?;
        let m = queued(self.master.as_raw_fd()).map_err(|e| format!("pty master: {e}"))?;
        Ok((s, m))
    }

    /// The counts once they equal `(s, m)`, or as they are after [`SETTLE`].
    fn wait_counts(&self, s: usize, m: usize) -> Result<(usize, usize), String> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let c = self.counts()?;
            if c == (s, m) || Instant::now() >= deadline {
                return Ok(c);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Workload for PtyQueue {
    fn kind(&self) -> &'static str {
        "pty-queue"
    }

    fn check(&mut self) -> Result<(), String> {
        self.checks += 1;
        let (want_s, want_m) = self.expected();
        let before = self.wait_counts(want_s, want_m)?;
        let mut problems = Vec::new();
        if before != (want_s, want_m) {
            problems.push(format!(
                "queued: {} bytes for the slave (expected {want_s}), {} for the master (expected {want_m})",
                before.0, before.1
            ));
        }
        let from_slave = read_all_nb(&self.slave, "pty slave")?;
        let from_master = read_all_nb(&self.master, "pty master")?;
        let diff_s = describe_difference(&from_slave, &self.to_slave);
        let diff_m = describe_difference(&from_master, &self.to_master);
        self.contents_match = Some(diff_s.is_none() && diff_m.is_none());
        if let Some(d) = diff_s {
            problems.push(format!("data queued for the slave: {d}"));
        }
        if let Some(d) = diff_m {
            problems.push(format!("data queued for the master: {d}"));
        }
        // Put back exactly what was there, whatever it was.
        write_all_nb(&self.master, &from_slave, "pty master")?;
        write_all_nb(&self.slave, &from_master, "pty slave")?;
        let after = self.wait_counts(from_slave.len(), from_master.len())?;
        if after != (from_slave.len(), from_master.len()) {
            problems.push(format!(
                "after writing back {} and {} bytes, the queues hold {} and {}",
                from_slave.len(),
                from_master.len(),
                after.0,
                after.1
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("pty {}: {}", self.pts, problems.join("; ")))
        }
    }

    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("pty".into(), Value::from(self.pts.clone()));
        m.insert("to_slave_bytes".into(), Value::from(self.to_slave.len()));
        m.insert("to_master_bytes".into(), Value::from(self.to_master.len()));
        match self.counts() {
            Ok((s, mm)) => {
                m.insert("queued_to_slave".into(), Value::from(s));
                m.insert("queued_to_master".into(), Value::from(mm));
            }
            Err(e) => {
                m.insert("queued_to_slave".into(), Value::Null);
                m.insert("queued_to_master".into(), Value::Null);
                m.insert("queue_error".into(), Value::from(e));
            }
        }
        m.insert("contents_match".into(), self.contents_match.map_or(Value::Null, Value::from));
        m.insert("checks".into(), Value::from(self.checks));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic() {
        let a = pattern(SEED_TO_SLAVE, 1001);
        assert_eq!(a.len(), 1001);
        assert_eq!(a, pattern(SEED_TO_SLAVE, 1001));
        assert_eq!(&a[..100], &pattern(SEED_TO_SLAVE, 100)[..]);
        assert_ne!(a[..700], pattern(SEED_TO_MASTER, 700)[..]);
        assert!(pattern(1, 0).is_empty());
    }

    #[test]
    fn differences() {
        assert_eq!(describe_difference(b"abc", b"abc"), None);
        assert!(describe_difference(b"abd", b"abc").is_some_and(|d| d.contains("byte 2")));
        assert!(describe_difference(b"ab", b"abc").is_some_and(|d| d.contains("prefix")));
    }

    #[test]
    fn queues_survive_repeated_checks() {
        let mut q = PtyQueue::start(DEFAULT_TO_SLAVE, DEFAULT_TO_MASTER).expect("start");
        for _ in 0..3 {
            q.check().expect("check");
        }
        let f = q.fields();
        assert_eq!(f["queued_to_slave"], DEFAULT_TO_SLAVE);
        assert_eq!(f["queued_to_master"], DEFAULT_TO_MASTER);
        assert_eq!(f["contents_match"], true);
        // Consuming a byte behind the workload's back is noticed (and the rest is put back).
        let mut one = [0u8; 1];
        assert_eq!((&q.slave).read(&mut one).expect("steal a byte"), 1);
        let e = q.check().expect_err("a byte is missing");
        assert!(e.contains("expected 1000"), "{e}");
        assert_eq!(q.fields()["contents_match"], false);
        assert_eq!(q.fields()["queued_to_slave"], DEFAULT_TO_SLAVE - 1);
    }
}
