//! The ceiling: a raw copy of N bytes from host A to host B over a TCP connection across the same veth (the
//! connection's two ends live in their hosts' network namespaces; this process writes one and reads the other).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::sample::{metric, mib, ms, Sample};
use crate::{Context, Ctx, Result};

const CHUNK: usize = 1 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Copies `bytes` bytes from A to B and records the time and rate into `s`.
pub fn measure(ctx: &Ctx<'_>, bytes: u64, s: &mut Sample) -> Result<()> {
    let (got, took) = copy_once(ctx, bytes, None)?;
    if got != bytes {
        return Err(format!("the raw copy sent {bytes} bytes but {got} arrived").into());
    }
    let secs = took.as_secs_f64();
    s.set(metric::TOTAL_MS, ms(took));
    s.set(metric::PAGES_MIB, mib(bytes));
    if secs > 0.0 {
        s.set(metric::RATE_MIB_S, mib(bytes) / secs);
    }
    // For context: the same copy, but B writes what it reads into a file, as a page server writes its pages image.
    let sink = ctx.lab.path(&format!("raw-sink-{}", ctx.next_id()));
    let to_file = copy_once(ctx, bytes, Some(&sink));
    let _ = std::fs::remove_file(&sink);
    let (got, took) = to_file?;
    if got != bytes {
        return Err(format!("the raw copy into a file sent {bytes} bytes but {got} arrived").into());
    }
    if took.as_secs_f64() > 0.0 {
        s.set(metric::RAW_TO_FILE_RATE_MIB_S, mib(bytes) / took.as_secs_f64());
    }
    Ok(())
}

/// One copy of `bytes` bytes from A to B over a fresh connection; B discards them, or writes them into `sink`.
/// Returns the bytes that arrived and the time from the first write to the last byte read (and written).
fn copy_once(ctx: &Ctx<'_>, bytes: u64, sink: Option<&Path>) -> Result<(u64, Duration)> {
    let (a, b) = ctx.lab.pair.connect_tcp()?;
    let (a, b) = (TcpStream::from(a), TcpStream::from(b));
    a.set_write_timeout(Some(IO_TIMEOUT)).ctx(|| "setting a socket timeout".into())?;
    b.set_read_timeout(Some(IO_TIMEOUT)).ctx(|| "setting a socket timeout".into())?;
    let mut out = match sink {
        Some(p) => Some(File::create(p).ctx(|| format!("creating {}", p.display()))?),
        None => None,
    };
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, Instant)> {
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        loop {
            match (&b).read(&mut buf)? {
                0 => return Ok((got, Instant::now())),
                n => {
                    if let Some(f) = out.as_mut() {
                        f.write_all(&buf[..n])?;
                    }
                    got += n as u64;
                }
            }
        }
    });
    // Not zeros, in case anything on the way compresses or skips them.
    let buf: Vec<u8> = (0..CHUNK).map(|i| (i.wrapping_mul(131) % 251) as u8).collect();
    let t0 = Instant::now();
    let mut left = bytes;
    let written = (|| -> std::io::Result<()> {
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            (&a).write_all(&buf[..n])?;
            left -= n as u64;
        }
        a.shutdown(Shutdown::Write)
    })();
    if written.is_err() {
        // Unblock the reader before waiting for it.
        let _ = a.shutdown(Shutdown::Both);
    }
    let read = reader.join().map_err(|_| "the raw-copy reader panicked")?;
    written.ctx(|| "writing the raw copy on A".into())?;
    let (got, t_end) = read.ctx(|| "reading the raw copy on B".into())?;
    Ok((got, t_end.saturating_duration_since(t0)))
}
