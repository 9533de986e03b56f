//! The heartbeat any kind can carry (`--heartbeat FILE`), and the checker of its log.
//!
//! Every [`BEAT_EVERY`] a background thread appends one line `<addr> <beat> <unix_ms>\n` to FILE, opening it
//! with `O_APPEND|O_CREAT` and closing it again (so no descriptor of a growing file is held across a
//! checkpoint). `<addr>` is the local IPv4 address of a UDP socket `connect()`ed to the probe address (a UDP
//! connect sends nothing; the socket is created and closed on every beat), or `none`; it names the host the
//! process runs on. `<beat>` lives in the process memory and grows by one per line written, so it continues
//! across a migration; `<unix_ms>` is wall-clock milliseconds.
//!
//! [`check_log`] verifies such a log: the address changes at most once (the migration) and never back, and
//! the beats strictly increase.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::kinds::{record_error, recorded_error};
use crate::runner::Workload;

/// How often a heartbeat line is written.
pub const BEAT_EVERY: Duration = Duration::from_millis(20);
/// The default probe address: in the test hosts' network (10.91.0.0/24), but no host has it. Nothing is ever
/// sent to it.
pub const DEFAULT_PROBE: &str = "10.91.0.254:9";
/// What a line carries instead of an address when none could be found.
pub const NO_ADDR: &str = "none";

/// The local address the kernel picks to reach `probe`: that of a UDP socket connected to it (a UDP connect
/// only chooses a route and a source address; nothing is sent). The socket is closed before returning.
pub fn local_addr_towards(probe: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = match probe {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(bind).ok()?;
    sock.connect(probe).ok()?;
    let ip = sock.local_addr().ok()?.ip();
    if ip.is_unspecified() {
        None
    } else {
        Some(ip)
    }
}

/// [`local_addr_towards`] as the heartbeat line writes it: the address, or [`NO_ADDR`].
pub fn addr_label(probe: SocketAddr) -> String {
    local_addr_towards(probe).map_or_else(|| NO_ADDR.to_string(), |ip| ip.to_string())
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One heartbeat line, with its newline.
pub fn format_line(addr: &str, beat: u64, unix_ms: u64) -> String {
    format!("{addr} {beat} {unix_ms}\n")
}

/// Append `line` to `path` with one `write()` (open with `O_APPEND|O_CREAT`, write, close).
pub fn append_line(path: &Path, line: &str) -> Result<(), String> {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| format!("cannot open {} for appending: {e}", path.display()))?;
    let n = f.write(line.as_bytes()).map_err(|e| format!("append to {} failed: {e}", path.display()))?;
    if n != line.len() {
        return Err(format!("short append to {}: {n} of {} bytes", path.display(), line.len()));
    }
    Ok(())
}

/// One parsed heartbeat line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// The address field: an IP address or [`NO_ADDR`].
    pub addr: String,
    /// The beat counter.
    pub beat: u64,
    /// Wall-clock milliseconds.
    pub unix_ms: u64,
}

/// Parse one line (without its newline).
pub fn parse_line(line: &str) -> Result<Beat, String> {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(addr), Some(beat), Some(ms), None) => {
            if addr != NO_ADDR && addr.parse::<IpAddr>().is_err() {
                return Err(format!("address field {addr:?} is neither an IP address nor {NO_ADDR:?}"));
            }
            let beat = beat.parse::<u64>().map_err(|e| format!("bad beat {beat:?}: {e}"))?;
            let unix_ms = ms.parse::<u64>().map_err(|e| format!("bad timestamp {ms:?}: {e}"))?;
            Ok(Beat { addr: addr.to_string(), beat, unix_ms })
        }
        _ => Err(format!("expected \"<addr> <beat> <unix_ms>\", got {line:?}")),
    }
}

/// What [`check_log`] found in a valid log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatSummary {
    /// The address field's values in order of appearance (one, or two after a migration).
    pub addrs: Vec<String>,
    /// The beat of the first line.
    pub first_beat: u64,
    /// The beat of the last line.
    pub last_beat: u64,
    /// Number of lines.
    pub lines: usize,
    /// The largest wall-clock gap between two consecutive lines, in ms (0 for a single line; a clock
    /// stepping backwards counts as 0).
    pub max_gap_ms: u64,
    /// The wall-clock gap between the last line of the first address and the first line of the second, in ms
    /// (None when the address never changed): the heartbeat's view of the migration's downtime.
    pub switch_gap_ms: Option<u64>,
    /// Beats missing between consecutive lines (the sum of each step minus one; 0 when every line's beat is
    /// its predecessor's plus one). Not an error: a failed append leaves no line but does not reuse its beat.
    pub skipped_beats: u64,
}

/// Parse and verify a heartbeat log: every line well-formed and newline-terminated, at least one line, the
/// address changing at most once (so never back), the beats strictly increasing from line to line.
pub fn check_log(text: &str) -> Result<HeartbeatSummary, String> {
    if text.is_empty() {
        return Err("the heartbeat log is empty".into());
    }
    if !text.ends_with('\n') {
        let last = text.rsplit('\n').next().unwrap_or(text);
        return Err(format!("the last line {last:?} is not newline-terminated"));
    }
    let mut addrs: Vec<String> = Vec::new();
    let mut prev: Option<Beat> = None;
    let mut lines = 0usize;
    let mut first_beat = 0u64;
    let mut max_gap_ms = 0u64;
    let mut switch_gap_ms = None;
    let mut skipped_beats = 0u64;
    for (i, line) in text.split_terminator('\n').enumerate() {
        let no = i + 1;
        let b = parse_line(line).map_err(|e| format!("line {no}: {e}"))?;
        match &prev {
            None => {
                first_beat = b.beat;
                addrs.push(b.addr.clone());
            }
            Some(p) => {
                if b.beat <= p.beat {
                    return Err(format!("line {no}: beat {} does not follow beat {} of line {}", b.beat, p.beat, i));
                }
                skipped_beats += b.beat - p.beat - 1;
                let gap = b.unix_ms.saturating_sub(p.unix_ms);
                max_gap_ms = max_gap_ms.max(gap);
                if b.addr != p.addr {
                    if addrs.len() >= 2 {
                        return Err(format!(
                            "line {no}: the address changes a second time ({} -> {}; seen so far: {})",
                            p.addr,
                            b.addr,
                            addrs.join(", ")
                        ));
                    }
                    addrs.push(b.addr.clone());
                    switch_gap_ms = Some(gap);
                }
            }
        }
        lines += 1;
        prev = Some(b);
    }
    let last_beat = prev.map_or(first_beat, |p| p.beat);
    Ok(HeartbeatSummary { addrs, first_beat, last_beat, lines, max_gap_ms, switch_gap_ms, skipped_beats })
}

/// Read `path` and [`check_log`] it.
pub fn check_file(path: &Path) -> Result<HeartbeatSummary, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    check_log(&text).map_err(|e| format!("{}: {e}", path.display()))
}

#[derive(Debug, Default)]
struct Shared {
    beats: AtomicU64,
    addr: Mutex<String>,
    error: Mutex<Option<String>>,
}

/// A running heartbeat thread.
#[derive(Debug)]
pub struct Heartbeat {
    file: PathBuf,
    probe: SocketAddr,
    shared: Arc<Shared>,
}

impl Heartbeat {
    /// Start the thread appending to `file` (an absolute path: the workload's working directory is its state
    /// directory) every [`BEAT_EVERY`]. The first line is written before this returns, so an unusable file is
    /// reported at start. The thread never exits.
    pub fn start(file: PathBuf, probe: SocketAddr) -> Result<Heartbeat, String> {
        let shared = Arc::new(Shared::default());
        let mut beat = 0u64;
        let write_one = {
            let file = file.clone();
            let shared = Arc::clone(&shared);
            move |beat: &mut u64| -> Result<(), String> {
                let addr = addr_label(probe);
                append_line(&file, &format_line(&addr, *beat, unix_ms()))?;
                *beat += 1;
                shared.beats.store(*beat, Ordering::SeqCst);
                *shared.addr.lock().unwrap_or_else(|p| p.into_inner()) = addr;
                Ok(())
            }
        };
        write_one(&mut beat)?;
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || loop {
                std::thread::sleep(BEAT_EVERY);
                if let Err(e) = write_one(&mut beat) {
                    record_error(&s.error, format!("heartbeat: {e}"));
                }
            })
            .map_err(|e| format!("cannot spawn the heartbeat thread: {e}"))?;
        Ok(Heartbeat { file, probe, shared })
    }

    /// The first append error, if any.
    pub fn health(&self) -> Result<(), String> {
        recorded_error(&self.shared.error)
    }

    /// The state fields: `heartbeat_file`, `heartbeat_probe`, `heartbeat_beats` (lines written),
    /// `heartbeat_addr` (the latest line's address).
    pub fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("heartbeat_file".into(), Value::from(self.file.display().to_string()));
        m.insert("heartbeat_probe".into(), Value::from(self.probe.to_string()));
        m.insert("heartbeat_beats".into(), Value::from(self.shared.beats.load(Ordering::SeqCst)));
        let addr = self.shared.addr.lock().unwrap_or_else(|p| p.into_inner()).clone();
        m.insert("heartbeat_addr".into(), Value::from(addr));
        m
    }
}

/// A workload carrying a heartbeat: the inner kind's behaviour, plus the heartbeat's fields, and its append
/// errors in `health` and `check`.
pub struct WithHeartbeat {
    inner: Box<dyn Workload>,
    heartbeat: Heartbeat,
}

impl std::fmt::Debug for WithHeartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithHeartbeat").field("kind", &self.inner.kind()).field("heartbeat", &self.heartbeat).finish()
    }
}

impl WithHeartbeat {
    /// Wrap `inner`.
    pub fn new(inner: Box<dyn Workload>, heartbeat: Heartbeat) -> WithHeartbeat {
        WithHeartbeat { inner, heartbeat }
    }
}

fn both(a: Result<(), String>, b: Result<(), String>) -> Result<(), String> {
    match (a, b) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(a), Err(b)) => Err(format!("{a}; {b}")),
    }
}

impl Workload for WithHeartbeat {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn tick(&mut self) -> Result<(), String> {
        self.inner.tick()
    }

    fn check(&mut self) -> Result<(), String> {
        let inner = self.inner.check();
        both(inner, self.heartbeat.health())
    }

    fn health(&mut self) -> Result<(), String> {
        let inner = self.inner.health();
        both(inner, self.heartbeat.health())
    }

    fn fields(&self) -> Map<String, Value> {
        let mut m = self.inner.fields();
        for (k, v) in self.heartbeat.fields() {
            m.entry(k).or_insert(v);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(lines: &[(&str, u64, u64)]) -> String {
        lines.iter().map(|(a, b, t)| format_line(a, *b, *t)).collect()
    }

    #[test]
    fn line_roundtrip() {
        let l = format_line("10.91.0.1", 7, 1_700_000_000_123);
        assert_eq!(l, "10.91.0.1 7 1700000000123\n");
        assert_eq!(
            parse_line(l.trim_end()),
            Ok(Beat { addr: "10.91.0.1".into(), beat: 7, unix_ms: 1_700_000_000_123 })
        );
        assert!(parse_line("none 1 2").is_ok());
        for bad in ["", "10.91.0.1 1", "10.91.0.1 1 2 3", "host 1 2", "10.91.0.1 -1 2", "10.91.0.1 1 x", " 1 2"] {
            assert!(parse_line(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn single_host_log() {
        let s =
            check_log(&log(&[("10.91.0.1", 0, 1000), ("10.91.0.1", 1, 1020), ("10.91.0.1", 2, 1090)])).expect("valid");
        assert_eq!(s.addrs, vec!["10.91.0.1".to_string()]);
        assert_eq!((s.first_beat, s.last_beat, s.lines), (0, 2, 3));
        assert_eq!(s.max_gap_ms, 70);
        assert_eq!(s.switch_gap_ms, None);
        assert_eq!(s.skipped_beats, 0);
    }

    #[test]
    fn one_migration() {
        let text =
            log(&[("10.91.0.1", 5, 1000), ("10.91.0.1", 6, 1020), ("10.91.0.2", 7, 1400), ("10.91.0.2", 9, 1420)]);
        let s = check_log(&text).expect("valid");
        assert_eq!(s.addrs, vec!["10.91.0.1".to_string(), "10.91.0.2".to_string()]);
        assert_eq!((s.first_beat, s.last_beat, s.lines), (5, 9, 4));
        assert_eq!(s.max_gap_ms, 380);
        assert_eq!(s.switch_gap_ms, Some(380));
        assert_eq!(s.skipped_beats, 1);
    }

    #[test]
    fn single_line() {
        let s = check_log("none 0 5\n").expect("valid");
        assert_eq!(s.addrs, vec!["none".to_string()]);
        assert_eq!((s.first_beat, s.last_beat, s.lines, s.max_gap_ms), (0, 0, 1, 0));
    }

    #[test]
    fn clock_going_back_is_not_a_gap() {
        let s = check_log(&log(&[("10.91.0.1", 0, 1000), ("10.91.0.1", 1, 900)])).expect("valid");
        assert_eq!(s.max_gap_ms, 0);
    }

    #[test]
    fn address_changing_back_is_rejected() {
        let text = log(&[("10.91.0.1", 0, 1000), ("10.91.0.2", 1, 1020), ("10.91.0.1", 2, 1040)]);
        let e = check_log(&text).expect_err("A -> B -> A");
        assert!(e.contains("line 3") && e.contains("second time"), "{e}");
        let text = log(&[("10.91.0.1", 0, 1000), ("10.91.0.2", 1, 1020), ("none", 2, 1040)]);
        assert!(check_log(&text).is_err(), "A -> B -> none");
    }

    #[test]
    fn beats_must_strictly_increase() {
        let text = log(&[("10.91.0.1", 0, 1000), ("10.91.0.1", 1, 1020), ("10.91.0.1", 1, 1040)]);
        let e = check_log(&text).expect_err("repeated beat");
        assert!(e.contains("line 3"), "{e}");
        let text = log(&[("10.91.0.1", 4, 1000), ("10.91.0.2", 3, 1020)]);
        assert!(check_log(&text).is_err(), "beat going back across the switch");
    }

    #[test]
    fn malformed_logs_are_rejected() {
        assert!(check_log("").is_err());
        assert!(check_log("10.91.0.1 0 1000").is_err(), "no final newline");
        assert!(check_log("10.91.0.1 0 1000\n\n").is_err(), "empty line");
        assert!(check_log("10.91.0.1 0 1000\ngarbage\n").is_err());
    }

    #[test]
    fn local_addr_of_loopback() {
        let probe: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        assert_eq!(local_addr_towards(probe), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(addr_label(probe), "127.0.0.1");
    }

    #[test]
    fn thread_writes_a_valid_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("hb");
        let hb = Heartbeat::start(file.clone(), "127.0.0.1:9".parse().expect("addr")).expect("start");
        std::thread::sleep(Duration::from_millis(150));
        assert!(hb.health().is_ok());
        let beats = hb.fields()["heartbeat_beats"].as_u64().expect("beats is a number");
        assert!(beats >= 3, "only {beats} beats");
        // The thread keeps appending: check up to the last complete line.
        let text = std::fs::read_to_string(&file).expect("read the log");
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        let s = check_log(complete).expect("valid log");
        assert_eq!(s.addrs, vec!["127.0.0.1".to_string()]);
        assert_eq!(s.first_beat, 0);
        assert!(s.lines >= 3);
        assert_eq!(s.skipped_beats, 0);
    }
}
