//! A check of the `btrfs send` stream a source sends, before `btrfs receive` (run as root) sees any of it (used by
//! `phaul-fs-btrfs`; here rather than in the plugin so that the fuzz targets can link it).
//!
//! `btrfs receive --chroot` keeps ordinary paths inside the incoming directory, but it looks clone and snapshot
//! sources up by UUID on the whole filesystem and runs commands sent before the subvolume begins relative to the
//! incoming directory itself. So the receiver passes on only a stream that: is send-stream version 1; begins with
//! exactly one SUBVOL (round 1) or SNAPSHOT (later rounds) whose name is one plain path component and whose parent
//! is the subvolume this root received the round before; clones only from that subvolume or the new one; names
//! no absolute path and no `..`; touches no `trusted.phaul.*` attribute (phaul's marks); and ends with END.
//!
//! Stream layout (protocol facts from btrfs-progs' `send.h`): a header `btrfs-stream\0` + le32 version, then
//! commands `le32 len, le16 cmd, le32 crc` + `len` bytes of attributes `le16 type, le16 len, data`.

const MAGIC: &[u8; 13] = b"btrfs-stream\0";
const HEADER: usize = 13 + 4;
const CMD_HEADER: usize = 10;
/// Version 1 commands are at most 64 KiB.
const MAX_CMD: usize = 64 * 1024;

const C_SUBVOL: u16 = 1;
const C_SNAPSHOT: u16 = 2;
const C_SET_XATTR: u16 = 13;
const C_REMOVE_XATTR: u16 = 14;
const C_CLONE: u16 = 16;
const C_END: u16 = 21;
const C_MAX_V1: u16 = 22;

const A_UUID: u16 = 1;
const A_XATTR_NAME: u16 = 13;
const A_PATH: u16 = 15;
const A_PATH_TO: u16 = 16;
const A_CLONE_UUID: u16 = 20;
const A_CLONE_PATH: u16 = 22;

pub type Uuid = [u8; 16];

/// The state of one stream's check.
#[derive(Debug)]
pub struct StreamCheck {
    buf: Vec<u8>,
    header_done: bool,
    /// The subvolume this root received the round before (the only parent allowed), if any.
    parent: Option<Uuid>,
    /// The new subvolume's UUID, once its first command was seen.
    own: Option<Uuid>,
    ended: bool,
}

fn attrs(payload: &[u8]) -> Result<Vec<(u16, &[u8])>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < payload.len() {
        if payload.len() - i < 4 {
            return Err("a command's attribute is cut short".into());
        }
        let t = u16::from_le_bytes([payload[i], payload[i + 1]]);
        let l = usize::from(u16::from_le_bytes([payload[i + 2], payload[i + 3]]));
        i += 4;
        if payload.len() - i < l {
            return Err("a command's attribute runs past the command".into());
        }
        out.push((t, &payload[i..i + l]));
        i += l;
    }
    Ok(out)
}

fn uuid(v: &[u8]) -> Result<Uuid, String> {
    v.try_into().map_err(|_| "a UUID attribute is not 16 bytes".to_string())
}

/// A path the stream names inside the new subvolume: relative (empty: its root), no `..`.
fn check_path(what: &str, v: &[u8]) -> Result<(), String> {
    if v.first() == Some(&b'/') || v.split(|b| *b == b'/').any(|c| c == b"..") || v.contains(&0) {
        return Err(format!(
            "the stream names the {what} {:?}, which leaves the subvolume",
            String::from_utf8_lossy(v)
        ));
    }
    Ok(())
}

impl StreamCheck {
    pub fn new(parent: Option<Uuid>) -> StreamCheck {
        StreamCheck { buf: Vec::new(), header_done: false, parent, own: None, ended: false }
    }

    /// The new subvolume's UUID (as the stream declares it), once known.
    pub fn own_uuid(&self) -> Option<Uuid> {
        self.own
    }

    /// Whether END was seen.
    pub fn complete(&self) -> bool {
        self.ended
    }

    /// Takes the next bytes of the stream; an error names what is refused (then none of `data` may be passed on).
    pub fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        self.buf.extend_from_slice(data);
        if !self.header_done {
            if self.buf.len() < HEADER {
                return Ok(());
            }
            if &self.buf[..13] != MAGIC {
                return Err("this is not a btrfs send stream".into());
            }
            let v = u32::from_le_bytes([self.buf[13], self.buf[14], self.buf[15], self.buf[16]]);
            if v != 1 {
                return Err(format!("send-stream version {v}: this receiver takes version 1"));
            }
            self.buf.drain(..HEADER);
            self.header_done = true;
        }
        loop {
            if self.buf.len() < CMD_HEADER {
                return Ok(());
            }
            let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
            if len > MAX_CMD {
                return Err(format!("a command of {len} bytes (version 1 has none above {MAX_CMD})"));
            }
            if self.buf.len() < CMD_HEADER + len {
                return Ok(());
            }
            let cmd = u16::from_le_bytes([self.buf[4], self.buf[5]]);
            let payload: Vec<u8> = self.buf[CMD_HEADER..CMD_HEADER + len].to_vec();
            self.command(cmd, &payload)?;
            self.buf.drain(..CMD_HEADER + len);
        }
    }

    fn command(&mut self, cmd: u16, payload: &[u8]) -> Result<(), String> {
        if self.ended {
            return Err("the stream goes on after its end".into());
        }
        let a = attrs(payload)?;
        let get = |t: u16| a.iter().find(|(k, _)| *k == t).map(|(_, v)| *v);
        if self.own.is_none() {
            let want = if self.parent.is_some() { C_SNAPSHOT } else { C_SUBVOL };
            if cmd != want {
                return Err(format!(
                    "the stream begins with command {cmd}; it must begin with {}",
                    if want == C_SNAPSHOT { "a snapshot of the previous round's subvolume" } else { "a new subvolume" }
                ));
            }
            let name = get(A_PATH).ok_or("the new subvolume has no name")?;
            if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." || name.contains(&0) {
                return Err(format!(
                    "the new subvolume's name {:?} is not one plain name",
                    String::from_utf8_lossy(name)
                ));
            }
            if cmd == C_SNAPSHOT {
                let from = uuid(get(A_CLONE_UUID).ok_or("the snapshot names no parent")?)?;
                if Some(from) != self.parent {
                    return Err("the snapshot's parent is not the subvolume this root received last".into());
                }
            }
            self.own = Some(uuid(get(A_UUID).ok_or("the new subvolume has no UUID")?)?);
            return Ok(());
        }
        match cmd {
            C_SUBVOL | C_SNAPSHOT => return Err("the stream makes a second subvolume".into()),
            C_END => {
                self.ended = true;
                return Ok(());
            }
            c if c == 0 || c > C_MAX_V1 => return Err(format!("unknown command {c}")),
            _ => {}
        }
        for (t, what) in [(A_PATH, "path"), (A_PATH_TO, "path"), (A_CLONE_PATH, "clone source path")] {
            if let Some(v) = get(t) {
                check_path(what, v)?;
            }
        }
        if cmd == C_CLONE {
            let from = uuid(get(A_CLONE_UUID).ok_or("a clone names no source")?)?;
            if Some(from) != self.own && Some(from) != self.parent {
                return Err("a clone's source is neither this subvolume nor the previous round's".into());
            }
        }
        if cmd == C_SET_XATTR || cmd == C_REMOVE_XATTR {
            let name = get(A_XATTR_NAME).unwrap_or_default();
            if name.starts_with(b"trusted.phaul.") {
                return Err("the stream sets phaul's own mark attribute".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tlv(t: u16, v: &[u8]) -> Vec<u8> {
        let mut o = t.to_le_bytes().to_vec();
        o.extend_from_slice(&(v.len() as u16).to_le_bytes());
        o.extend_from_slice(v);
        o
    }

    fn cmd(c: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
        let payload: Vec<u8> = attrs.concat();
        let mut o = (payload.len() as u32).to_le_bytes().to_vec();
        o.extend_from_slice(&c.to_le_bytes());
        o.extend_from_slice(&[0; 4]);
        o.extend_from_slice(&payload);
        o
    }

    fn stream(cmds: &[Vec<u8>]) -> Vec<u8> {
        let mut o = MAGIC.to_vec();
        o.extend_from_slice(&1u32.to_le_bytes());
        for c in cmds {
            o.extend_from_slice(c);
        }
        o
    }

    const OWN: Uuid = [7; 16];
    const PREV: Uuid = [9; 16];

    fn subvol() -> Vec<u8> {
        cmd(C_SUBVOL, &[tlv(A_PATH, b"snap"), tlv(A_UUID, &OWN)])
    }

    fn check(parent: Option<Uuid>, cmds: &[Vec<u8>]) -> Result<StreamCheck, String> {
        let mut c = StreamCheck::new(parent);
        // Fed in small pieces, as the channel delivers it.
        for piece in stream(cmds).chunks(7) {
            c.feed(piece)?;
        }
        Ok(c)
    }

    #[test]
    fn a_plain_stream_passes_and_ends() {
        let c = check(None, &[subvol(), cmd(3, &[tlv(A_PATH, b"dir/file")]), cmd(C_END, &[])]).expect("passes");
        assert!(c.complete());
        assert_eq!(c.own_uuid(), Some(OWN));
        let snap = cmd(C_SNAPSHOT, &[tlv(A_PATH, b"s2"), tlv(A_UUID, &OWN), tlv(A_CLONE_UUID, &PREV)]);
        let clone = cmd(C_CLONE, &[tlv(A_PATH, b"f"), tlv(A_CLONE_UUID, &PREV), tlv(A_CLONE_PATH, b"g")]);
        assert!(check(Some(PREV), &[snap, clone, cmd(C_END, &[])]).is_ok());
    }

    #[test]
    fn what_leaves_the_subvolume_is_refused() {
        let bad = [
            vec![cmd(9, &[tlv(A_PATH, b"snap"), tlv(A_PATH_TO, b"x")])], // before the subvolume
            vec![subvol(), cmd(9, &[tlv(A_PATH, b"a"), tlv(A_PATH_TO, b"../S")])],
            vec![subvol(), cmd(3, &[tlv(A_PATH, b"/etc/x")])],
            vec![subvol(), cmd(C_CLONE, &[tlv(A_PATH, b"f"), tlv(A_CLONE_UUID, &[1; 16]), tlv(A_CLONE_PATH, b"g")])],
            vec![subvol(), cmd(C_SET_XATTR, &[tlv(A_PATH, b"."), tlv(A_XATTR_NAME, b"trusted.phaul.owner")])],
            vec![subvol(), subvol()],
            vec![cmd(C_SUBVOL, &[tlv(A_PATH, b"a/b"), tlv(A_UUID, &OWN)])],
            vec![subvol(), cmd(C_END, &[]), cmd(3, &[tlv(A_PATH, b"late")])],
        ];
        for (i, cmds) in bad.iter().enumerate() {
            assert!(check(None, cmds).is_err(), "case {i} passed");
        }
        // A later round must snapshot the previous one, not another subvolume.
        let other = cmd(C_SNAPSHOT, &[tlv(A_PATH, b"s2"), tlv(A_UUID, &OWN), tlv(A_CLONE_UUID, &[3; 16])]);
        assert!(check(Some(PREV), &[other]).is_err());
        assert!(check(Some(PREV), &[subvol()]).is_err());
        let mut v2 = MAGIC.to_vec();
        v2.extend_from_slice(&2u32.to_le_bytes());
        assert!(StreamCheck::new(None).feed(&v2).is_err());
    }
}
