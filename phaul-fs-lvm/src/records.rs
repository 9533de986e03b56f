//! The byte stream of one session (one root, one round): what the source read from its snapshot, as records the
//! destination writes into its volume. Every number is big-endian.
//!
//! ```text
//! stream  = MAGIC header (data | zero)* end
//! MAGIC   "PHLVMv1\n"
//! header  'H' size:u64 block:u32 full:u8 planned:u64 name_len:u16 name[name_len]
//!         size: the source volume's size in bytes; block: the pool's chunk size in bytes; full: 1 when the
//!         round sends every mapped block (round 1: the destination starts from an empty volume), 0 for a delta;
//!         planned: the bytes of blocks this session covers; name: the source volume's name (the destination's
//!         volume gets it)
//! data    'D' offset:u64 len:u32 bytes[len]       (1 <= len <= MAX_DATA)
//! zero    'Z' offset:u64 len:u64                  these bytes are zeros (a block the source unmapped or that
//!                                                 holds only zeros)
//! end     'E' records:u64 bytes:u64               how many data and zero records came, and their bytes
//! ```
//!
//! The decoder is written for a peer that may send anything: it never panics, keeps at most one record in memory,
//! refuses a record that reaches past the volume's size, anything before the header or after the end, and a
//! stream whose end does not count what came.

#![forbid(unsafe_code)]

pub const MAGIC: &[u8; 8] = b"PHLVMv1\n";
/// The most bytes one data record carries.
pub const MAX_DATA: u32 = 1 << 20;
/// The longest volume name accepted (LVM's own limit is 127).
pub const MAX_NAME: usize = 127;

const HEADER: u8 = b'H';
const DATA: u8 = b'D';
const ZERO: u8 = b'Z';
const END: u8 = b'E';

/// A session's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub size: u64,
    pub block: u32,
    pub full: bool,
    pub planned: u64,
    pub name: String,
}

/// The stream's start: the magic and the header.
pub fn encode_header(h: &Header, out: &mut Vec<u8>) {
    out.extend_from_slice(MAGIC);
    out.push(HEADER);
    out.extend_from_slice(&h.size.to_be_bytes());
    out.extend_from_slice(&h.block.to_be_bytes());
    out.push(u8::from(h.full));
    out.extend_from_slice(&h.planned.to_be_bytes());
    let name = &h.name.as_bytes()[..h.name.len().min(MAX_NAME)];
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(name);
}

/// A data record (`data` at most [`MAX_DATA`] bytes).
pub fn encode_data(offset: u64, data: &[u8], out: &mut Vec<u8>) {
    out.push(DATA);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

pub fn encode_zero(offset: u64, len: u64, out: &mut Vec<u8>) {
    out.push(ZERO);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

pub fn encode_end(records: u64, bytes: u64, out: &mut Vec<u8>) {
    out.push(END);
    out.extend_from_slice(&records.to_be_bytes());
    out.extend_from_slice(&bytes.to_be_bytes());
}

/// What the decoded records are handed to. An error stops the stream.
pub trait Sink {
    /// The header; returns the size of the volume the records are written into (data past it is refused).
    fn header(&mut self, h: &Header) -> Result<u64, String>;
    fn data(&mut self, offset: u64, data: &[u8]) -> Result<(), String>;
    fn zero(&mut self, offset: u64, len: u64) -> Result<(), String>;
    /// The end record came and counted what came.
    fn end(&mut self) -> Result<(), String>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Magic,
    Header,
    Records,
    Ended,
}

/// An incremental decoder: [`Decoder::feed`] takes the stream in pieces of any size.
#[derive(Debug)]
pub struct Decoder {
    pending: Vec<u8>,
    state: State,
    /// The smaller of the header's size and the sink's volume size.
    limit: u64,
    records: u64,
    bytes: u64,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).and_then(|s| s.try_into().ok()).map(u32::from_be_bytes)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).and_then(|s| s.try_into().ok()).map(u16::from_be_bytes)
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder { pending: Vec::new(), state: State::Magic, limit: 0, records: 0, bytes: 0 }
    }

    /// Whether the end record came.
    pub fn complete(&self) -> bool {
        self.state == State::Ended
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), String> {
        match offset.checked_add(len) {
            Some(e) if e <= self.limit => Ok(()),
            _ => Err(format!("a record for bytes {offset}..+{len} reaches past the volume's {} bytes", self.limit)),
        }
    }

    /// Takes the next piece of the stream, handing every record it completes to `sink`.
    pub fn feed(&mut self, buf: &[u8], sink: &mut impl Sink) -> Result<(), String> {
        self.pending.extend_from_slice(buf);
        let mut at = 0;
        let r = loop {
            match self.step(at, sink) {
                Ok(Some(n)) => at += n,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.pending.drain(..at.min(self.pending.len()));
        r
    }

    /// Decodes one record at `at` if it is all there: its length, or `None` when more bytes are needed.
    fn step(&mut self, at: usize, sink: &mut impl Sink) -> Result<Option<usize>, String> {
        let b = self.pending.get(at..).unwrap_or_default();
        if b.is_empty() {
            return Ok(None);
        }
        match self.state {
            State::Magic => {
                let n = b.len().min(MAGIC.len());
                if b[..n] != MAGIC[..n] {
                    return Err("the stream does not start as an lvm driver's stream does".into());
                }
                if n < MAGIC.len() {
                    return Ok(None);
                }
                self.state = State::Header;
                Ok(Some(MAGIC.len()))
            }
            State::Header => {
                if b[0] != HEADER {
                    return Err(format!("expected the stream's header, got record kind {}", b[0]));
                }
                // 'H' size block full planned name_len
                const FIXED: usize = 1 + 8 + 4 + 1 + 8 + 2;
                let Some(name_len) = u16_at(b, FIXED - 2) else { return Ok(None) };
                let name_len = usize::from(name_len);
                if name_len == 0 || name_len > MAX_NAME {
                    return Err(format!("the header names a volume of {name_len} bytes"));
                }
                let Some(name) = b.get(FIXED..FIXED + name_len) else { return Ok(None) };
                let name = std::str::from_utf8(name)
                    .map_err(|_| "the header's volume name is not UTF-8".to_string())?
                    .to_string();
                let (Some(size), Some(block), Some(planned)) = (u64_at(b, 1), u32_at(b, 9), u64_at(b, 14)) else {
                    return Ok(None);
                };
                let full = match b[13] {
                    0 => false,
                    1 => true,
                    k => return Err(format!("the header's full flag is {k}")),
                };
                if block == 0 || block % 512 != 0 {
                    return Err(format!("the header gives a block size of {block} bytes"));
                }
                let h = Header { size, block, full, planned, name };
                let room = sink.header(&h)?;
                self.limit = size.min(room);
                self.state = State::Records;
                Ok(Some(FIXED + name_len))
            }
            State::Records => match b[0] {
                DATA => {
                    let (Some(offset), Some(len)) = (u64_at(b, 1), u32_at(b, 9)) else { return Ok(None) };
                    if len == 0 || len > MAX_DATA {
                        return Err(format!("a data record of {len} bytes (at most {MAX_DATA})"));
                    }
                    self.check_range(offset, u64::from(len))?;
                    let Some(data) = b.get(13..13 + len as usize) else { return Ok(None) };
                    sink.data(offset, data)?;
                    self.records += 1;
                    self.bytes += u64::from(len);
                    Ok(Some(13 + len as usize))
                }
                ZERO => {
                    let (Some(offset), Some(len)) = (u64_at(b, 1), u64_at(b, 9)) else { return Ok(None) };
                    if len == 0 {
                        return Err("an empty zero record".into());
                    }
                    self.check_range(offset, len)?;
                    sink.zero(offset, len)?;
                    self.records += 1;
                    self.bytes = self.bytes.saturating_add(len);
                    Ok(Some(17))
                }
                END => {
                    let (Some(records), Some(bytes)) = (u64_at(b, 1), u64_at(b, 9)) else { return Ok(None) };
                    if records != self.records || bytes != self.bytes {
                        return Err(format!(
                            "the stream's end counts {records} records of {bytes} bytes, but {} of {} came",
                            self.records, self.bytes
                        ));
                    }
                    sink.end()?;
                    self.state = State::Ended;
                    Ok(Some(17))
                }
                k => Err(format!("unknown record kind {k}")),
            },
            State::Ended => Err("bytes after the stream's end".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Mem {
        vol: Vec<u8>,
        header: Option<Header>,
        ended: bool,
        zeros: u64,
    }

    impl Sink for Mem {
        fn header(&mut self, h: &Header) -> Result<u64, String> {
            self.header = Some(h.clone());
            Ok(self.vol.len() as u64)
        }
        fn data(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
            let o = offset as usize;
            self.vol[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero(&mut self, offset: u64, len: u64) -> Result<(), String> {
            self.zeros += len;
            let o = offset as usize;
            self.vol[o..o + len as usize].fill(0);
            Ok(())
        }
        fn end(&mut self) -> Result<(), String> {
            self.ended = true;
            Ok(())
        }
    }

    fn header(size: u64) -> Header {
        Header { size, block: 65536, full: true, planned: 8192, name: "ct".into() }
    }

    fn stream(size: u64) -> Vec<u8> {
        let mut s = Vec::new();
        encode_header(&header(size), &mut s);
        encode_data(4096, &[7u8; 4096], &mut s);
        encode_zero(0, 512, &mut s);
        encode_data(size - 10, &[9u8; 10], &mut s);
        encode_end(3, 4096 + 512 + 10, &mut s);
        s
    }

    #[test]
    fn a_stream_round_trips_in_pieces_of_any_size() {
        let s = stream(1 << 16);
        for piece in [1usize, 3, 7, 13, 100, 4097, s.len()] {
            let mut m = Mem { vol: vec![1u8; 1 << 16], ..Default::default() };
            let mut d = Decoder::new();
            for c in s.chunks(piece) {
                d.feed(c, &mut m).expect("feed");
            }
            assert!(d.complete() && m.ended, "piece {piece}");
            assert_eq!(m.header, Some(header(1 << 16)));
            assert!(m.vol[..512].iter().all(|b| *b == 0));
            assert!(m.vol[512..4096].iter().all(|b| *b == 1));
            assert!(m.vol[4096..8192].iter().all(|b| *b == 7));
            assert!(m.vol[(1 << 16) - 10..].iter().all(|b| *b == 9));
            assert_eq!(m.zeros, 512);
        }
    }

    #[test]
    fn a_record_past_the_volume_is_refused() {
        // The header claims a larger volume than the sink has: the sink's size is the limit.
        let s = stream(1 << 20);
        let mut m = Mem { vol: vec![0u8; 1 << 16], ..Default::default() };
        let e = Decoder::new().feed(&s, &mut m).expect_err("past the end");
        assert!(e.contains("reaches past"), "{e}");
        // An offset that overflows.
        let mut s = Vec::new();
        encode_header(&header(1 << 16), &mut s);
        encode_zero(u64::MAX - 1, 10, &mut s);
        let mut m = Mem { vol: vec![0u8; 1 << 16], ..Default::default() };
        assert!(Decoder::new().feed(&s, &mut m).expect_err("overflow").contains("reaches past"));
    }

    #[test]
    fn garbage_truncation_and_miscounts_are_refused_without_panicking() {
        let good = stream(1 << 16);
        // Truncated: never complete, never an error.
        for cut in 0..good.len() {
            let mut m = Mem { vol: vec![0u8; 1 << 16], ..Default::default() };
            let mut d = Decoder::new();
            let _ = d.feed(&good[..cut], &mut m);
            assert!(!d.complete(), "complete after {cut} bytes");
        }
        // Every single-byte corruption: no panic; a change that is accepted must still count right.
        for i in 0..good.len() {
            for v in [0u8, 0xff, b'D', b'E'] {
                let mut s = good.clone();
                s[i] = v;
                let mut m = Mem { vol: vec![0u8; 1 << 16], ..Default::default() };
                let _ = Decoder::new().feed(&s, &mut m);
            }
        }
        // Pseudo-random garbage after a valid header.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200 {
            let mut s = Vec::new();
            encode_header(&header(1 << 16), &mut s);
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s.push(x as u8);
            }
            let mut m = Mem { vol: vec![0u8; 1 << 16], ..Default::default() };
            let _ = Decoder::new().feed(&s, &mut m);
        }
        // A miscounted end.
        let mut s = Vec::new();
        encode_header(&header(1 << 16), &mut s);
        encode_data(0, &[1u8; 16], &mut s);
        encode_end(2, 16, &mut s);
        let mut m = Mem { vol: vec![0u8; 1 << 16], ..Default::default() };
        assert!(Decoder::new().feed(&s, &mut m).expect_err("miscount").contains("counts 2 records"));
        // Bytes after the end; a record before the header; a huge data record.
        let mut s = stream(1 << 16);
        s.push(b'D');
        let mut m = Mem { vol: vec![0u8; 1 << 16], ..Default::default() };
        assert!(Decoder::new().feed(&s, &mut m).expect_err("after end").contains("after the stream's end"));
        let mut s = MAGIC.to_vec();
        encode_zero(0, 1, &mut s);
        assert!(Decoder::new().feed(&s, &mut Mem::default()).expect_err("no header").contains("header"));
        let mut s = Vec::new();
        encode_header(&header(1 << 16), &mut s);
        s.push(b'D');
        s.extend_from_slice(&0u64.to_be_bytes());
        s.extend_from_slice(&(MAX_DATA + 1).to_be_bytes());
        let mut m = Mem { vol: vec![0u8; 1 << 16], ..Default::default() };
        assert!(Decoder::new().feed(&s, &mut m).expect_err("huge").contains("at most"));
        assert!(Decoder::new().feed(b"rsync stream", &mut Mem::default()).is_err());
    }
}
