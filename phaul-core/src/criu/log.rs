//! Reading CRIU's log for the lines that explain a failure.

use std::io::{BufRead, BufReader};
use std::path::Path;

/// How many error lines are kept: the last ones are the cause, the first ones are context.
const MAX_LINES: usize = 12;

/// CRIU's own error lines from a log file (lines with `Error (` — CRIU's pr_err/pr_perror format), the last
/// [`MAX_LINES`] of them, with the timestamp prefix removed. Empty when the log cannot be read.
pub fn error_lines(log: &Path) -> Vec<String> {
    let Ok(f) = std::fs::File::open(log) else { return Vec::new() };
    let mut lines: Vec<String> = BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.contains("Error (") || l.starts_with("Error"))
        // CRIU complains about RLIMIT_NOFILE whenever it runs without CAP_SYS_RESOURCE-style limits; harmless.
        .filter(|l| !l.contains("Can't setup RLIMIT_NOFILE"))
        // nft's own complaint when CRIU deletes its network-lock table after phaul already removed it (phaul
        // holds the network with a table of its own); it says nothing about what failed.
        .filter(|l| !(l.starts_with("Error: Could not process rule: No such file or directory")))
        .map(|l| {
            let l = match l.find(") ") {
                Some(i) if l.starts_with('(') => &l[i + 2..],
                _ => l.as_str(),
            };
            l.trim().to_string()
        })
        .collect();
    if lines.len() > MAX_LINES {
        lines.drain(..lines.len() - MAX_LINES);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_error_lines_without_timestamps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("restore.log");
        std::fs::write(
            &p,
            "(00.000100) Version: 4.2.1\n(00.000200) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n(00.001000)      1: Error (criu/files-reg.c:2214): File tmp/x has bad size 5 (expect 9)\n(00.002000) Warn  (criu/x.c:1): meh\n",
        )
        .expect("write");
        assert_eq!(error_lines(&p), vec!["1: Error (criu/files-reg.c:2214): File tmp/x has bad size 5 (expect 9)"]);
    }

    #[test]
    fn missing_log_gives_nothing() {
        assert!(error_lines(Path::new("/nonexistent/criu.log")).is_empty());
    }
}
