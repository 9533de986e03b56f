//! Streaming image files from one host to the other over a TCP connection, as an operator's `scp` would: the
//! bare-CRIU path uses it for the images that do not go through the page server.
//!
//! Format: for each file a u16 name length (big-endian), the name, a u64 size, the bytes; a zero name length ends
//! the stream.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const CHUNK: usize = 1 << 20;

/// The `*.img` files of `dir`, sorted by name.
pub fn image_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() && e.file_name().to_string_lossy().ends_with(".img") {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Sends `files` on `w`; returns the bytes of file content sent.
pub fn send_files(w: impl Write, files: &[PathBuf]) -> io::Result<u64> {
    let mut w = BufWriter::with_capacity(CHUNK, w);
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    for path in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("bad file name {}", path.display())))?;
        let len = u16::try_from(name.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("file name too long: {name}")))?;
        let mut f = File::open(path)?;
        let size = f.metadata()?.len();
        w.write_all(&len.to_be_bytes())?;
        w.write_all(name.as_bytes())?;
        w.write_all(&size.to_be_bytes())?;
        let mut left = size;
        while left > 0 {
            let want = left.min(CHUNK as u64) as usize;
            let n = f.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} shrank while sent", path.display()),
                ));
            }
            w.write_all(&buf[..n])?;
            left -= n as u64;
        }
        total += size;
    }
    w.write_all(&0u16.to_be_bytes())?;
    w.flush()?;
    Ok(total)
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("refusing the file name {name:?}")));
    }
    Ok(())
}

/// Receives files from `r` into `dir` (which must not hold them yet); returns (files, bytes of content).
pub fn receive_files(r: impl Read, dir: &Path) -> io::Result<(u32, u64)> {
    let mut r = BufReader::with_capacity(CHUNK, r);
    let mut buf = vec![0u8; CHUNK];
    let (mut files, mut total) = (0u32, 0u64);
    loop {
        let mut len = [0u8; 2];
        r.read_exact(&mut len)?;
        let len = u16::from_be_bytes(len) as usize;
        if len == 0 {
            return Ok((files, total));
        }
        let mut name = vec![0u8; len];
        r.read_exact(&mut name)?;
        let name = String::from_utf8(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        check_name(&name)?;
        let mut size = [0u8; 8];
        r.read_exact(&mut size)?;
        let size = u64::from_be_bytes(size);
        let mut out = OpenOptions::new().write(true).create_new(true).open(dir.join(&name))?;
        let mut left = size;
        while left > 0 {
            let want = left.min(CHUNK as u64) as usize;
            r.read_exact(&mut buf[..want])?;
            out.write_all(&buf[..want])?;
            left -= want as u64;
        }
        files += 1;
        total += size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_cross_intact() {
        let src = tempfile::tempdir().expect("tempdir");
        let dst = tempfile::tempdir().expect("tempdir");
        let big: Vec<u8> = (0..(2 * CHUNK + 5)).map(|i| (i % 253) as u8).collect();
        fs::write(src.path().join("core-1.img"), b"core").expect("write");
        fs::write(src.path().join("mm-1.img"), &big).expect("write");
        fs::write(src.path().join("dump.log"), b"not an image").expect("write");
        let files = image_files(src.path()).expect("list");
        assert_eq!(files.len(), 2);
        let mut wire = Vec::new();
        let sent = send_files(&mut wire, &files).expect("send");
        let (n, got) = receive_files(wire.as_slice(), dst.path()).expect("receive");
        assert_eq!((n, got), (2, sent));
        assert_eq!(fs::read(dst.path().join("mm-1.img")).expect("read"), big);
        assert!(!dst.path().join("dump.log").exists());
    }

    #[test]
    fn bad_names_are_refused() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&5u16.to_be_bytes());
        wire.extend_from_slice(b"../x1");
        wire.extend_from_slice(&0u64.to_be_bytes());
        let dst = tempfile::tempdir().expect("tempdir");
        assert!(receive_files(wire.as_slice(), dst.path()).is_err());
    }
}
