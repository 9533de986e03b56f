//! `sqlite-writer`: a real SQLite database in WAL mode, written every ~20 ms, with an ack log.
//!
//! One connection stays open for the workload's whole life (that is the point: SQLite then holds POSIX locks
//! on the database and its `-shm`, and keeps the `-shm` mmapped). Every [`WRITE_EVERY`] a thread inserts a
//! row `(seq, host, ts)` in its own `BEGIN IMMEDIATE ... COMMIT` transaction, `host` being the heartbeat's
//! address (see [`crate::heartbeat::addr_label`]), and after each successful COMMIT appends
//! `acked <seq> <host>\n` to the ack log (open, append, close). `seq` lives in memory, so it continues across
//! a migration.
//!
//! A client may only rely on what was acked: [`check_acks`] verifies, from the final database and the ack
//! log, that every acked row is in the database (a committed but not yet acked row is allowed).
//!
//! A busy or locked database (another process holds SQLite's locks) makes a write fail and be retried with
//! the same seq on the next round; it is counted, not an error. Any other failure (e.g. a UNIQUE constraint
//! violation: another copy of this process wrote the same seq) is an error.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};
use serde_json::{Map, Value};

use super::lock_holder::fdinfo_locks;
use super::{record_error, recorded_error};
use crate::heartbeat::{addr_label, append_line, unix_ms};
use crate::runner::Workload;
use std::net::SocketAddr;

/// How often a row is inserted.
pub const WRITE_EVERY: Duration = Duration::from_millis(20);
/// How long one write waits for SQLite's locks before giving up until the next round.
const BUSY_TIMEOUT: Duration = Duration::from_millis(100);
/// The table written.
pub const TABLE: &str = "writes";

#[derive(Debug, Default)]
struct Shared {
    db: Mutex<Option<Connection>>,
    /// The seq of the next insert.
    next_seq: AtomicU64,
    /// The last acked seq (0: none yet; seqs start at 1).
    last_acked: AtomicU64,
    /// The largest seq in the table when the workload started (0: empty).
    start_max: AtomicU64,
    acked: AtomicU64,
    busy: AtomicU64,
    failures: AtomicU64,
    host: Mutex<String>,
    last_failure: Mutex<Option<String>>,
    error: Mutex<Option<String>>,
}

impl Shared {
    fn lock_db(&self) -> MutexGuard<'_, Option<Connection>> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The writer thread and what it reports.
#[derive(Debug)]
pub struct SqliteWriter {
    db_path: PathBuf,
    ack_path: PathBuf,
    shared: Arc<Shared>,
    integrity: Option<String>,
    /// Whether SQLite's POSIX locks on the database and on its `-shm` were seen at the latest check.
    locks_held: Option<(bool, bool)>,
}

fn sql_err(what: &str, path: &Path, e: rusqlite::Error) -> String {
    format!("{what} on {}: {e}", path.display())
}

fn seq_to_sql(seq: u64) -> Result<i64, String> {
    i64::try_from(seq).map_err(|_| format!("seq {seq} does not fit SQLite's INTEGER"))
}

fn seq_from_sql(v: i64) -> Result<u64, String> {
    u64::try_from(v).map_err(|_| format!("negative seq {v} in the table"))
}

/// Open `path` read-write, switch it to WAL and create the table if needed.
fn open_db(path: &Path) -> Result<Connection, String> {
    let conn = Connection::open(path).map_err(|e| sql_err("open", path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| sql_err("busy_timeout", path, e))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| sql_err("PRAGMA journal_mode=WAL", path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("{} refused WAL mode (journal_mode is {mode})", path.display()));
    }
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {TABLE} (seq INTEGER PRIMARY KEY, host TEXT NOT NULL, ts INTEGER NOT NULL)"
    ))
    .map_err(|e| sql_err("CREATE TABLE", path, e))?;
    Ok(conn)
}

fn max_seq(conn: &Connection, path: &Path) -> Result<u64, String> {
    let v: Option<i64> = conn
        .query_row(&format!("SELECT MAX(seq) FROM {TABLE}"), [], |row| row.get(0))
        .map_err(|e| sql_err("SELECT MAX(seq)", path, e))?;
    v.map_or(Ok(0), seq_from_sql)
}

/// Whether this process holds a POSIX lock on `path` through one of its descriptors, as
/// `/proc/self/fdinfo` shows it. The file itself is never opened: closing a descriptor of it would drop the
/// process's POSIX locks on it (SQLite's included).
pub fn posix_lock_held_on(path: &Path) -> Result<bool, String> {
    let dir = std::fs::read_dir("/proc/self/fd").map_err(|e| format!("cannot list /proc/self/fd: {e}"))?;
    for entry in dir.flatten() {
        if std::fs::read_link(entry.path()).is_ok_and(|t| t == path) {
            let info = Path::new("/proc/self/fdinfo").join(entry.file_name());
            // The descriptor may be gone by now (e.g. the one of the directory listing itself).
            if let Ok(text) = std::fs::read_to_string(&info) {
                if fdinfo_locks(&text).iter().any(|&(class, _)| class == "POSIX") {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// The `-shm` file of database `db`.
pub fn shm_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_os_string();
    s.push("-shm");
    PathBuf::from(s)
}

/// Insert one row in its own `BEGIN IMMEDIATE ... COMMIT` transaction.
fn insert_row(conn: &mut Connection, seq: i64, host: &str, ts: i64) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(&format!("INSERT INTO {TABLE} (seq, host, ts) VALUES (?1, ?2, ?3)"), params![seq, host, ts])?;
    tx.commit()
}

/// One round: insert the next row and, once committed, ack it.
fn write_one(shared: &Shared, db_path: &Path, ack_path: &Path, probe: SocketAddr) {
    let mut guard = shared.lock_db();
    let Some(conn) = guard.as_mut() else { return };
    let seq = shared.next_seq.load(Ordering::SeqCst);
    let host = addr_label(probe);
    let ts = i64::try_from(unix_ms()).unwrap_or(i64::MAX);
    let result = seq_to_sql(seq).and_then(|sql_seq| {
        insert_row(conn, sql_seq, &host, ts).map_err(|e| match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                shared.busy.fetch_add(1, Ordering::SeqCst);
                format!("busy: {e}")
            }
            _ => {
                shared.failures.fetch_add(1, Ordering::SeqCst);
                let msg = sql_err(&format!("insert of seq {seq}"), db_path, e);
                record_error(&shared.error, msg.clone());
                msg
            }
        })
    });
    *shared.host.lock().unwrap_or_else(|p| p.into_inner()) = host.clone();
    match result {
        Ok(()) => {
            shared.next_seq.store(seq + 1, Ordering::SeqCst);
            match append_line(ack_path, &format!("acked {seq} {host}\n")) {
                Ok(()) => {
                    shared.last_acked.store(seq, Ordering::SeqCst);
                    shared.acked.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => record_error(&shared.error, format!("seq {seq} committed but not acked: {e}")),
            }
        }
        Err(e) => *shared.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e),
    }
}

impl SqliteWriter {
    /// Open the database now (so errors are reported at start) and write from a thread. An existing table
    /// is continued: the first seq is one past its largest.
    pub fn start(db_path: &Path, ack_path: &Path, probe: SocketAddr) -> Result<SqliteWriter, String> {
        let conn = open_db(db_path)?;
        let start_max = max_seq(&conn, db_path)?;
        let shared = Arc::new(Shared::default());
        shared.start_max.store(start_max, Ordering::SeqCst);
        shared.next_seq.store(start_max + 1, Ordering::SeqCst);
        *shared.lock_db() = Some(conn);
        let s = Arc::clone(&shared);
        let (db, ack) = (db_path.to_path_buf(), ack_path.to_path_buf());
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || loop {
                std::thread::sleep(WRITE_EVERY);
                write_one(&s, &db, &ack, probe);
            })
            .map_err(|e| format!("cannot spawn the writer thread: {e}"))?;
        Ok(SqliteWriter {
            db_path: db_path.to_path_buf(),
            ack_path: ack_path.to_path_buf(),
            shared,
            integrity: None,
            locks_held: None,
        })
    }

    /// The self-check on `conn`: WAL mode, `integrity_check` ok, the largest seq is the last acked one.
    fn verify(&mut self, conn: &Connection) -> Result<(), String> {
        let path = &self.db_path;
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .map_err(|e| sql_err("PRAGMA journal_mode", path, e))?;
        let mut stmt =
            conn.prepare("PRAGMA integrity_check").map_err(|e| sql_err("PRAGMA integrity_check", path, e))?;
        let rows: Vec<String> = stmt
            .query_map([], |row| row.get(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| sql_err("PRAGMA integrity_check", path, e))?;
        let integrity = rows.join("; ");
        self.integrity = Some(integrity.clone());
        if integrity != "ok" {
            return Err(format!("{}: integrity_check says {integrity}", path.display()));
        }
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(format!("{} is no longer in WAL mode (journal_mode {mode})", path.display()));
        }
        let max = max_seq(conn, path)?;
        let acked = self.shared.last_acked.load(Ordering::SeqCst);
        let want = if acked == 0 { self.shared.start_max.load(Ordering::SeqCst) } else { acked };
        if max != want {
            return Err(format!("the largest seq in {} is {max}, but the last acked seq is {want}", path.display()));
        }
        Ok(())
    }

    /// Stop writing and close the connection (tests only: the workload never stops).
    #[cfg(test)]
    fn close(&self) {
        drop(self.shared.lock_db().take());
    }
}

impl Workload for SqliteWriter {
    fn kind(&self) -> &'static str {
        "sqlite-writer"
    }

    fn check(&mut self) -> Result<(), String> {
        recorded_error(&self.shared.error)?;
        let shared = Arc::clone(&self.shared);
        let guard = shared.lock_db();
        let conn = guard.as_ref().ok_or_else(|| format!("the connection to {} is closed", self.db_path.display()))?;
        // Reported, not judged: CRIU 4.2 restores the lock on the -shm and then drops it again (the restorer
        // closes the descriptor it mmapped the file through), so a restored writer has lost it.
        let db_lock = posix_lock_held_on(&self.db_path)?;
        let shm_lock = posix_lock_held_on(&shm_path(&self.db_path))?;
        self.locks_held = Some((db_lock, shm_lock));
        self.verify(conn)
    }

    fn health(&mut self) -> Result<(), String> {
        recorded_error(&self.shared.error)
    }

    fn fields(&self) -> Map<String, Value> {
        let s = &self.shared;
        let mut m = Map::new();
        m.insert("db".into(), Value::from(self.db_path.display().to_string()));
        m.insert("ack_log".into(), Value::from(self.ack_path.display().to_string()));
        m.insert("next_seq".into(), Value::from(s.next_seq.load(Ordering::SeqCst)));
        let last = s.last_acked.load(Ordering::SeqCst);
        m.insert("last_acked".into(), if last == 0 { Value::Null } else { Value::from(last) });
        m.insert("acked".into(), Value::from(s.acked.load(Ordering::SeqCst)));
        m.insert("busy".into(), Value::from(s.busy.load(Ordering::SeqCst)));
        m.insert("failures".into(), Value::from(s.failures.load(Ordering::SeqCst)));
        let failure = s.last_failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
        m.insert("last_failure".into(), failure.map_or(Value::Null, Value::from));
        m.insert("host".into(), Value::from(s.host.lock().unwrap_or_else(|p| p.into_inner()).clone()));
        m.insert("integrity".into(), self.integrity.clone().map_or(Value::Null, Value::from));
        m.insert("db_lock_held".into(), self.locks_held.map_or(Value::Null, |l| Value::from(l.0)));
        m.insert("shm_lock_held".into(), self.locks_held.map_or(Value::Null, |l| Value::from(l.1)));
        m
    }
}

/// Parse an ack log: lines `acked <seq> <host>`, each newline-terminated.
pub fn parse_ack_log(text: &str) -> Result<Vec<(u64, String)>, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the ack log's last line is not newline-terminated".into());
    }
    text.split_terminator('\n')
        .enumerate()
        .map(|(i, line)| {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("acked"), Some(seq), Some(host), None) if !host.is_empty() => seq
                    .parse::<u64>()
                    .map(|s| (s, host.to_string()))
                    .map_err(|e| format!("ack log line {}: bad seq {seq:?}: {e}", i + 1)),
                _ => Err(format!("ack log line {}: expected \"acked <seq> <host>\", got {line:?}", i + 1)),
            }
        })
        .collect()
}

/// What [`check_acks`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckSummary {
    /// Number of acked seqs.
    pub acked: usize,
    /// The first and last acked seq (None for an empty log).
    pub first_acked: Option<u64>,
    pub last_acked: Option<u64>,
    /// The hosts of the acks, in order of appearance.
    pub hosts: Vec<String>,
    /// Rows in the table, and its largest seq (0 when empty).
    pub rows: u64,
    pub max_seq: u64,
}

/// Verify the final database at `db` against an ack log: the acked seqs strictly increase, and every one is
/// in the table with the host its ack names. The database is opened read-only (a WAL database left by a
/// killed writer needs its `-wal` and `-shm` next to it, as SQLite leaves them).
pub fn check_acks(db: &Path, ack_log: &str) -> Result<AckSummary, String> {
    let acks = parse_ack_log(ack_log)?;
    for w in acks.windows(2) {
        if w[1].0 <= w[0].0 {
            return Err(format!("acked seq {} follows acked seq {}: seqs must strictly increase", w[1].0, w[0].0));
        }
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(db, flags).map_err(|e| sql_err("read-only open", db, e))?;
    let rows: i64 = conn
        .query_row(&format!("SELECT COUNT(*) FROM {TABLE}"), [], |row| row.get(0))
        .map_err(|e| sql_err("SELECT COUNT(*)", db, e))?;
    let max_seq = max_seq(&conn, db)?;
    let mut stmt =
        conn.prepare(&format!("SELECT host FROM {TABLE} WHERE seq = ?1")).map_err(|e| sql_err("prepare", db, e))?;
    let mut problems = Vec::new();
    let mut hosts: Vec<String> = Vec::new();
    for (seq, host) in &acks {
        if hosts.last() != Some(host) {
            hosts.push(host.clone());
        }
        let found: Option<String> = stmt
            .query_row(params![seq_to_sql(*seq)?], |row| row.get(0))
            .optional()
            .map_err(|e| sql_err(&format!("SELECT seq {seq}"), db, e))?;
        match found {
            None => problems.push(format!("acked seq {seq} is missing")),
            Some(h) if h != *host => problems.push(format!("acked seq {seq} has host {h}, its ack says {host}")),
            Some(_) => {}
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(5);
        return Err(format!("{}: {n} acked rows wrong: {}", db.display(), problems.join("; ")));
    }
    Ok(AckSummary {
        acked: acks.len(),
        first_acked: acks.first().map(|a| a.0),
        last_acked: acks.last().map(|a| a.0),
        hosts,
        rows: u64::try_from(rows).unwrap_or(0),
        max_seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe() -> SocketAddr {
        "127.0.0.1:9".parse().expect("addr")
    }

    #[test]
    fn ack_log_parsing() {
        assert_eq!(parse_ack_log(""), Ok(vec![]));
        assert_eq!(
            parse_ack_log("acked 1 10.91.0.1\nacked 2 10.91.0.2\n"),
            Ok(vec![(1, "10.91.0.1".to_string()), (2, "10.91.0.2".to_string())])
        );
        for bad in ["acked 1 a", "acked x a\n", "acked 1\n", "ack 1 a\n", "acked 1 a b\n", "acked 1 \n", "\n"] {
            assert!(parse_ack_log(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn writes_acks_and_checks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db.sqlite");
        let ack = dir.path().join("acks");
        let mut w = SqliteWriter::start(&db, &ack, probe()).expect("start");
        std::thread::sleep(Duration::from_millis(200));
        w.check().expect("self-check");
        let f = w.fields();
        assert!(f["acked"].as_u64().is_some_and(|n| n >= 3), "{f:?}");
        assert_eq!(f["integrity"], "ok");
        assert_eq!(f["host"], "127.0.0.1");
        assert_eq!(f["db_lock_held"], true, "SQLite holds its SHARED lock on the db in WAL mode");
        assert_eq!(f["shm_lock_held"], true, "and its dead-man-switch lock on the -shm");
        // While the writer runs (WAL, -shm present), and after it stopped.
        let text = std::fs::read_to_string(&ack).expect("ack log");
        let s = check_acks(&db, &text).expect("acked rows are in the db");
        assert_eq!(s.first_acked, Some(1));
        assert_eq!(s.hosts, vec!["127.0.0.1".to_string()]);
        assert!(s.rows >= s.acked as u64);
        w.close();
        let text = std::fs::read_to_string(&ack).expect("ack log");
        let s = check_acks(&db, &text).expect("after close");
        assert_eq!(s.max_seq, s.last_acked.expect("some acks"));

        // A restart continues the table.
        let mut w2 = SqliteWriter::start(&db, &ack, probe()).expect("restart");
        std::thread::sleep(Duration::from_millis(100));
        w2.check().expect("self-check after restart");
        w2.close();
        let text = std::fs::read_to_string(&ack).expect("ack log");
        assert!(check_acks(&db, &text).is_ok());

        // An ack the database does not have is reported.
        let forged = format!("{text}acked 999999 127.0.0.1\n");
        let e = check_acks(&db, &forged).expect_err("forged ack");
        assert!(e.contains("999999 is missing"), "{e}");
        let e = check_acks(&db, "acked 2 127.0.0.1\nacked 2 127.0.0.1\n").expect_err("repeated seq");
        assert!(e.contains("strictly increase"), "{e}");
        let e = check_acks(&db, "acked 1 10.0.0.9\n").expect_err("wrong host");
        assert!(e.contains("has host"), "{e}");
    }

    #[test]
    fn a_row_missing_from_the_db_fails_the_self_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("db.sqlite");
        let mut w = SqliteWriter::start(&db, &dir.path().join("acks"), probe()).expect("start");
        std::thread::sleep(Duration::from_millis(100));
        w.close();
        let e = w.check().expect_err("closed connection");
        assert!(e.contains("closed"), "{e}");
        let other = open_db(&db).expect("reopen");
        w.verify(&other).expect("consistent once stopped");
        other.execute(&format!("DELETE FROM {TABLE} WHERE seq = (SELECT MAX(seq) FROM {TABLE})"), []).expect("delete");
        let e = w.verify(&other).expect_err("the last acked row is gone");
        assert!(e.contains("last acked seq"), "{e}");
    }
}
