//! The tree's TCP connections: found from /proc, and put into or out of TCP repair mode from outside the tree
//! (through pidfd_getfd), so that a held source copy never sends a packet for a connection the destination owns:
//! a socket closed in repair mode vanishes without a FIN or RST.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;

use serde::{Deserialize, Serialize};

use super::HoldError;
use crate::journal::ProcId;

/// One TCP socket of the tree that is connected (not listening, not closed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConn {
    /// A process holding it and its descriptor number there.
    pub pid: i32,
    pub fd: i32,
    pub inode: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's state number (1 established ... 11 closing).
    pub state: u8,
}

/// States of /proc/net/tcp that are not connections to lock: LISTEN (10) and CLOSE (7).
const NOT_CONNECTED: [u8; 2] = [10, 7];

fn parse_v4(hex: &str) -> Option<Ipv4Addr> {
    let v = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(v.to_le_bytes()))
}

fn parse_v6(hex: &str) -> Option<Ipv6Addr> {
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for i in 0..4 {
        let word = u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()?;
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
    }
    Some(Ipv6Addr::from(bytes))
}

fn parse_addr(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = if ip.len() == 8 { IpAddr::V4(parse_v4(ip)?) } else { IpAddr::V6(parse_v6(ip)?) };
    Some(SocketAddr::new(ip, port))
}

/// Entries of a /proc/net/tcp or tcp6 table: inode -> (local, remote, state).
fn parse_table(text: &str) -> HashMap<u64, (SocketAddr, SocketAddr, u8)> {
    let mut out = HashMap::new();
    for l in text.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let (Some(local), Some(remote), Ok(state), Ok(inode)) =
            (parse_addr(f[1]), parse_addr(f[2]), u8::from_str_radix(f[3], 16), f[9].parse::<u64>())
        else {
            continue;
        };
        if inode != 0 {
            out.insert(inode, (local, remote, state));
        }
    }
    out
}

/// The connected TCP sockets the processes hold, as seen in the network namespace of the first of them.
pub fn connections(procs: &[ProcId]) -> Result<Vec<TcpConn>, HoldError> {
    let Some(first) = procs.first() else { return Ok(Vec::new()) };
    let mut table = HashMap::new();
    for t in ["tcp", "tcp6"] {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{}/net/{t}", first.pid)) {
            table.extend(parse_table(&text));
        }
    }
    let mut out = Vec::new();
    for p in procs {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", p.pid)) else { continue };
        for e in fds.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let Ok(link) = std::fs::read_link(e.path()) else { continue };
            let link = link.to_string_lossy();
            let Some(inode) = link.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) else { continue };
            let Ok(inode) = inode.parse::<u64>() else { continue };
            if let Some((local, remote, state)) = table.get(&inode) {
                if !NOT_CONNECTED.contains(state) && !out.iter().any(|c: &TcpConn| c.inode == inode) {
                    out.push(TcpConn { pid: p.pid, fd, inode, local: *local, remote: *remote, state: *state });
                }
            }
        }
    }
    Ok(out)
}

/// Turns TCP repair mode on or off for each connection (skipping those whose process or socket is gone).
pub fn set_repair(conns: &[TcpConn], on: bool) -> Result<(), HoldError> {
    for c in conns {
        let Ok(pidfd) = crate::sys::pidfd_open(c.pid) else { continue };
        let sock = match crate::sys::pidfd_getfd(pidfd.as_fd(), c.fd) {
            Ok(s) => s,
            Err(_) => continue,
        };
        // The descriptor number may have been reused for something else since: check it is the same socket.
        let same = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&sock)))
            .map(|l| l.to_string_lossy() == format!("socket:[{}]", c.inode))
            .unwrap_or(false);
        if !same {
            continue;
        }
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::TcpRepair, &u32::from(on))
            .map_err(|e| HoldError::Repair { conn: format!("{} -> {}", c.local, c.remote), source: e.into() })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1\n   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1\n";
        let m = parse_table(t);
        let (l, r, st) = m[&4242];
        assert_eq!(l, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(r, "127.0.0.1:50000".parse().expect("addr"));
        assert_eq!(st, 1);
        assert_eq!(m[&99].2, 10);
        let v6 = parse_addr("00000000000000000000000001000000:0050").expect("v6");
        assert_eq!(v6, "[::1]:80".parse().expect("addr"));
    }

    #[test]
    fn finds_our_own_connection_and_repairs_it() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (_s, _) = l.accept().expect("accept");
        let me = ProcId::of(std::process::id() as i32).expect("self");
        let conns = connections(&[me]).expect("conns");
        let mine: Vec<_> = conns.iter().filter(|k| k.local == c.local_addr().expect("local")).collect();
        assert_eq!(mine.len(), 1, "{conns:?}");
        assert_eq!(mine[0].state, 1);
        let one = vec![mine[0].clone()];
        set_repair(&one, true).expect("repair on");
        set_repair(&one, false).expect("repair off");
    }
}
