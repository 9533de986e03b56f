//! Moving image files and a host type's extra files over the memory channel, streamed in fixed-size chunks so
//! that memory use does not grow with image size.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use phaul_proto::wire::FileHeader;

use crate::transport::Channel;

const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FileTransferError {
    #[error("cannot read {path} to send it: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("sending {name} on the memory channel failed: {source}")]
    Send { name: String, source: io::Error },
    #[error("receiving {name} on the memory channel failed after {got} of {size} bytes: {source}")]
    Receive { name: String, got: u64, size: u64, source: io::Error },
    #[error("cannot store {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("the source sent a file named {name:?}; only plain file names are accepted")]
    BadName { name: String },
    #[error("{path} changed size while it was being sent ({announced} bytes announced, {actual} found)")]
    Changed { path: PathBuf, announced: u64, actual: u64 },
}

/// CRIU's images are the `*.img` files of a round directory (logs and stats stay where they were written).
pub fn image_files(dir: &Path) -> Result<Vec<(PathBuf, FileHeader)>, FileTransferError> {
    let rd = |source| FileTransferError::Read { path: dir.to_path_buf(), source };
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(rd)? {
        let e = e.map_err(rd)?;
        let name = e.file_name().to_string_lossy().into_owned();
        let ft = e.file_type().map_err(rd)?;
        if ft.is_file() && name.ends_with(".img") {
            let size = e.metadata().map_err(rd)?.len();
            out.push((e.path(), FileHeader { name, size }));
        }
    }
    out.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    Ok(out)
}

/// Headers for arbitrary files, sent under the given names.
pub fn headers_for(files: &[(PathBuf, String)]) -> Result<Vec<(PathBuf, FileHeader)>, FileTransferError> {
    files
        .iter()
        .map(|(p, name)| {
            let size = fs::metadata(p).map_err(|source| FileTransferError::Read { path: p.clone(), source })?.len();
            Ok((p.clone(), FileHeader { name: name.clone(), size }))
        })
        .collect()
}

/// Sends the files back to back; returns the bytes sent.
pub fn send_files(ch: &mut Channel, files: &[(PathBuf, FileHeader)]) -> Result<u64, FileTransferError> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    for (path, h) in files {
        let mut f = File::open(path).map_err(|source| FileTransferError::Read { path: path.clone(), source })?;
        let mut left = h.size;
        while left > 0 {
            let want = left.min(CHUNK as u64) as usize;
            let n =
                f.read(&mut buf[..want]).map_err(|source| FileTransferError::Read { path: path.clone(), source })?;
            if n == 0 {
                return Err(FileTransferError::Changed {
                    path: path.clone(),
                    announced: h.size,
                    actual: h.size - left,
                });
            }
            ch.write_all(&buf[..n]).map_err(|source| FileTransferError::Send { name: h.name.clone(), source })?;
            left -= n as u64;
        }
        total += h.size;
    }
    ch.flush().map_err(|source| FileTransferError::Send { name: "(flush)".into(), source })?;
    Ok(total)
}

/// Checks a received name is a plain file name.
pub fn check_name(name: &str) -> Result<(), FileTransferError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(FileTransferError::BadName { name: name.to_string() });
    }
    Ok(())
}

/// Receives the announced files into `dir`, refusing to overwrite anything; returns the bytes received.
pub fn receive_files(ch: &mut Channel, dir: &Path, files: &[FileHeader]) -> Result<u64, FileTransferError> {
    for h in files {
        check_name(&h.name)?;
    }
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    for h in files {
        let path = dir.join(&h.name);
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| FileTransferError::Write { path: path.clone(), source })?;
        let mut got = 0u64;
        while got < h.size {
            let want = (h.size - got).min(CHUNK as u64) as usize;
            let n = ch.read(&mut buf[..want]).map_err(|source| FileTransferError::Receive {
                name: h.name.clone(),
                got,
                size: h.size,
                source,
            })?;
            if n == 0 {
                return Err(FileTransferError::Receive {
                    name: h.name.clone(),
                    got,
                    size: h.size,
                    source: io::Error::new(io::ErrorKind::UnexpectedEof, "the channel closed"),
                });
            }
            out.write_all(&buf[..n]).map_err(|source| FileTransferError::Write { path: path.clone(), source })?;
            got += n as u64;
        }
        total += h.size;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::ChannelName;

    #[test]
    fn files_cross_intact_and_names_are_checked() {
        let src = tempfile::tempdir().expect("tempdir");
        let dst = tempfile::tempdir().expect("tempdir");
        let big: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| (i * 31 % 251) as u8).collect();
        fs::write(src.path().join("pages-1.img"), &big).expect("write");
        fs::write(src.path().join("core-1.img"), b"core").expect("write");
        fs::write(src.path().join("dump.log"), b"log").expect("write");
        let files = image_files(src.path()).expect("list");
        assert_eq!(files.iter().map(|f| f.1.name.as_str()).collect::<Vec<_>>(), ["core-1.img", "pages-1.img"]);
        let (a, b) = crate::sys::stream_pair().expect("pair");
        let mut a = Channel::new(ChannelName::Mem, a);
        let mut b = Channel::new(ChannelName::Mem, b);
        let headers: Vec<FileHeader> = files.iter().map(|f| f.1.clone()).collect();
        let t = std::thread::spawn(move || send_files(&mut a, &files).expect("send"));
        let got = receive_files(&mut b, dst.path(), &headers).expect("receive");
        assert_eq!(t.join().expect("join"), got);
        assert_eq!(fs::read(dst.path().join("pages-1.img")).expect("read"), big);
        assert!(check_name("../etc/passwd").is_err());
        assert!(check_name("..").is_err());
        assert!(check_name("inventory.img").is_ok());
    }
}
