//! `file-append`: keeps one file open (O_APPEND) and appends a numbered line every ~50 ms.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::runner::Workload;

/// The file being appended to, held open for the workload's whole life.
#[derive(Debug)]
pub struct FileAppend {
    path: PathBuf,
    file: File,
    lines_written: u64,
}

impl FileAppend {
    /// Open (creating, and emptying) `path` for appending.
    pub fn open(path: &Path) -> Result<FileAppend, String> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| format!("cannot open {} for appending: {e}", path.display()))?;
        // O_TRUNC cannot be combined with append through OpenOptions; empty it explicitly so the content
        // check below holds from line 0.
        file.set_len(0).map_err(|e| format!("cannot truncate {}: {e}", path.display()))?;
        Ok(FileAppend { path: path.to_path_buf(), file, lines_written: 0 })
    }
}

/// The exact content expected after `n` lines: `0\n1\n...(n-1)\n`.
pub fn expected_content(n: u64) -> String {
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&i.to_string());
        s.push('\n');
    }
    s
}

/// Compare `content` with the first `n` lines, describing the first difference.
pub fn verify_content(content: &[u8], n: u64) -> Result<(), String> {
    let expected = expected_content(n);
    if content == expected.as_bytes() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(content);
    let got: Vec<&str> = text.split_terminator('\n').collect();
    for (i, line) in got.iter().enumerate() {
        if i as u64 >= n {
            return Err(format!("file has {} lines, expected {n}", got.len()));
        }
        if *line != i.to_string() {
            return Err(format!("line {i} is {line:?}, expected \"{i}\""));
        }
    }
    if (got.len() as u64) < n {
        return Err(format!("file has {} lines, expected {n}", got.len()));
    }
    Err(format!("file content differs from lines 0..{n} (missing final newline?)"))
}

impl Workload for FileAppend {
    fn kind(&self) -> &'static str {
        "file-append"
    }

    fn tick(&mut self) -> Result<(), String> {
        let line = format!("{}\n", self.lines_written);
        // Exactly one write() per line.
        let n =
            self.file.write(line.as_bytes()).map_err(|e| format!("append to {} failed: {e}", self.path.display()))?;
        if n != line.len() {
            return Err(format!("short append to {}: {n} of {} bytes", self.path.display(), line.len()));
        }
        self.lines_written += 1;
        Ok(())
    }

    fn check(&mut self) -> Result<(), String> {
        let content = std::fs::read(&self.path).map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        verify_content(&content, self.lines_written)
            .map_err(|e| format!("{}: {e} ({} lines written)", self.path.display(), self.lines_written))
    }

    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("file".into(), Value::from(self.path.display().to_string()));
        m.insert("lines_written".into(), Value::from(self.lines_written));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify() {
        assert!(verify_content(b"", 0).is_ok());
        assert!(verify_content(b"0\n1\n2\n", 3).is_ok());
        assert!(verify_content(b"0\n1\n", 3).is_err());
        assert!(verify_content(b"0\n1\n2\n3\n", 3).is_err());
        assert!(verify_content(b"0\n2\n1\n", 3).is_err());
        assert!(verify_content(b"0\n1\n2", 3).is_err());
    }

    #[test]
    fn append_and_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        std::fs::write(&path, "stale\n").expect("pre-existing content");
        let mut f = FileAppend::open(&path).expect("open");
        for _ in 0..5 {
            f.tick().expect("tick");
        }
        assert!(f.check().is_ok());
        std::fs::OpenOptions::new().append(true).open(&path).and_then(|mut g| g.write_all(b"x\n")).expect("tamper");
        assert!(f.check().is_err());
    }
}
