//! A network lock phaul owns: an nftables table that keeps a held source copy silent, independently of CRIU.
//!
//! CRIU locks the tree's network while it dumps, and lifts the lock whenever it resumes the tree (a failed
//! post-dump notification, which is also what happens when phaul dies). After the point of no return the frozen
//! source must not answer for connections the destination now owns, whatever happens to CRIU or phaul, so phaul
//! adds its own table before it commits: for a tree in the host's network namespace it drops the packets of the
//! tree's TCP connections both ways (as CRIU's connection lock does); for a tree with a network namespace of its
//! own it drops everything in it (as CRIU's namespace lock does). The rules are applied with `nft`.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::tcp::TcpConn;
use super::HoldError;

/// An installed lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetLockRecord {
    /// `inet NAME`.
    pub table: String,
    /// Whether the tree has a network namespace of its own (then the table lives there and goes with it).
    pub own_netns: bool,
    /// What it locks, for the operator.
    pub locks: String,
}

/// The `nft` binary, if installed.
pub fn nft_binary() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().map(PathBuf::from).collect();
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    dirs.into_iter().map(|d| d.join("nft")).find(|p| p.is_file())
}

fn netns_inode(pid: &str) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net")).ok().map(|m| m.ino())
}

/// Whether `pid` lives in another network namespace than phaul.
pub fn has_own_netns(pid: i32) -> bool {
    match (netns_inode(&pid.to_string()), netns_inode("self")) {
        (Some(a), Some(b)) => a != b,
        _ => false,
    }
}

fn run_nft(netns_pid: Option<i32>, script: &str) -> Result<String, HoldError> {
    let nft = nft_binary().ok_or(HoldError::NoNft)?;
    let mut cmd = match netns_pid {
        Some(pid) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/proc/{pid}/ns/net")).arg("--").arg(&nft);
            c
        }
        None => Command::new(&nft),
    };
    let mut child = cmd
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| HoldError::Nft { what: "start".into(), detail: e.to_string() })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = wait_output(child, Duration::from_secs(10))?;
    if !out.status.success() {
        return Err(HoldError::Nft {
            what: first_line(script),
            detail: String::from_utf8_lossy(&out.stderr).trim().into(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn first_line(s: &str) -> String {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or_default().trim().to_string()
}

fn wait_output(mut child: std::process::Child, timeout: Duration) -> Result<std::process::Output, HoldError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => {
                return child
                    .wait_with_output()
                    .map_err(|e| HoldError::Nft { what: "wait".into(), detail: e.to_string() })
            }
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HoldError::Nft {
                    what: "nft".into(),
                    detail: format!("did not finish within {timeout:?}"),
                });
            }
        }
    }
}

fn element(a: &std::net::SocketAddr, b: &std::net::SocketAddr) -> String {
    format!("{} . {} . {} . {}", a.ip(), a.port(), b.ip(), b.port())
}

/// The nft script of a lock on `conns` (host network namespace) or on everything (own namespace).
fn script(table: &str, own_netns: bool, conns: &[TcpConn]) -> String {
    if own_netns {
        return format!(
            "table {table} {{\n  chain output {{ type filter hook output priority 0; policy drop; }}\n  chain input {{ type filter hook input priority 0; policy drop; }}\n}}\n"
        );
    }
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for c in conns {
        let (list, local, remote) = match (c.local, c.remote) {
            (l @ std::net::SocketAddr::V4(_), r @ std::net::SocketAddr::V4(_)) => (&mut v4, l, r),
            (l, r) => (&mut v6, l, r),
        };
        list.push(element(&local, &remote));
        list.push(element(&remote, &local));
    }
    let set = |name: &str, ty: &str, elems: &[String]| {
        let elements =
            if elems.is_empty() { String::new() } else { format!(" elements = {{ {} }};", elems.join(", ")) };
        format!("  set {name} {{ type {ty} . inet_service . {ty} . inet_service;{elements} }}\n")
    };
    let mut s = format!("table {table} {{\n");
    s.push_str(&set("conns4", "ipv4_addr", &v4));
    s.push_str(&set("conns6", "ipv6_addr", &v6));
    for (chain, hook) in [("output", "output"), ("input", "input")] {
        s.push_str(&format!(
            "  chain {chain} {{ type filter hook {hook} priority 0; ip saddr . tcp sport . ip daddr . tcp dport @conns4 drop; ip6 saddr . tcp sport . ip6 daddr . tcp dport @conns6 drop; }}\n"
        ));
    }
    s.push_str("}\n");
    s
}

/// Installs the lock for the tree whose root is `root_pid`.
pub fn install(name: &str, root_pid: i32, conns: &[TcpConn]) -> Result<NetLockRecord, HoldError> {
    let own = has_own_netns(root_pid);
    let table = format!("inet {name}");
    let text = script(&table, own, conns);
    run_nft(own.then_some(root_pid), &text)?;
    let locks = if own {
        format!("all traffic of the network namespace of pid {root_pid}")
    } else {
        conns.iter().map(|c| format!("{} <-> {}", c.local, c.remote)).collect::<Vec<_>>().join(", ")
    };
    Ok(NetLockRecord { table, own_netns: own, locks })
}

/// Removes the lock. A lock inside the tree's own namespace is removed through a process of the tree while one
/// exists; once the tree is gone, so is its namespace and the table with it.
pub fn remove(rec: &NetLockRecord, netns_pid: Option<i32>) -> Result<(), HoldError> {
    if rec.own_netns {
        match netns_pid {
            Some(pid) => run_nft(Some(pid), &format!("delete table {}\n", rec.table)).map(|_| ()),
            None => Ok(()),
        }
    } else {
        match run_nft(None, &format!("delete table {}\n", rec.table)) {
            Ok(_) => Ok(()),
            Err(HoldError::Nft { detail, .. }) if detail.contains("No such file") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Deletes CRIU's own connection-lock tables (`inet CRIU-...`) in phaul's namespace that name one of `conns`:
/// left behind when CRIU was killed while it held them.
pub fn remove_criu_leftovers(conns: &[TcpConn]) -> Result<usize, HoldError> {
    if conns.is_empty() || nft_binary().is_none() {
        return Ok(0);
    }
    let tables = run_nft(None, "list tables\n")?;
    let mut n = 0;
    for t in tables.lines().filter_map(|l| l.trim().strip_prefix("table inet ")) {
        if !t.starts_with("CRIU-") {
            continue;
        }
        let text = run_nft(None, &format!("list table inet {t}\n")).unwrap_or_default();
        if conns.iter().any(|c| text.contains(&c.local.ip().to_string()) && text.contains(&c.local.port().to_string()))
        {
            run_nft(None, &format!("delete table inet {t}\n"))?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_name_both_directions() {
        let c = TcpConn {
            pid: 1,
            fd: 3,
            inode: 9,
            local: "10.0.0.1:80".parse().expect("addr"),
            remote: "10.0.0.2:5000".parse().expect("addr"),
            state: 1,
        };
        let s = script("inet phaul-x", false, &[c]);
        assert!(s.contains("10.0.0.1 . 80 . 10.0.0.2 . 5000"), "{s}");
        assert!(s.contains("10.0.0.2 . 5000 . 10.0.0.1 . 80"), "{s}");
        assert!(s.contains("@conns4 drop"));
        let own = script("inet phaul-x", true, &[]);
        assert!(own.contains("policy drop"));
    }

    /// A real table in a real network namespace of the test's own: it drops the locked connection's traffic.
    #[test]
    fn locks_a_real_connection() {
        if nft_binary().is_none() {
            eprintln!("nft is not installed (scripts/setup installs it); skipped");
            return;
        }
        let ns = format!("phaul-nl-{}", std::process::id());
        let ok = Command::new("ip").args(["netns", "add", &ns]).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "ip netns add");
        let r = std::panic::catch_unwind(|| {
            let path = format!("/run/netns/{ns}");
            let t = std::thread::spawn(move || {
                let f = std::fs::File::open(&path).expect("netns");
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let _ = Command::new("ip").args(["link", "set", "lo", "up"]).status();
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                let mut c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
                let (mut s, _) = l.accept().expect("accept");
                let me = crate::journal::ProcId::of(nix::unistd::gettid().as_raw()).expect("self");
                let conns = super::super::tcp::connections(&[me]).expect("conns");
                assert!(!conns.is_empty());
                // The table goes into this thread's namespace: run nft through our own thread's ns.
                let table = format!("inet phaul-test-{}", std::process::id());
                run_nft(Some(me.pid), &script(&table, false, &conns)).expect("install");
                use std::io::{Read, Write as _};
                c.write_all(b"x").expect("write");
                s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
                let mut b = [0u8; 1];
                let blocked = s.read(&mut b).is_err();
                run_nft(Some(me.pid), &format!("delete table {table}\n")).expect("remove");
                s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
                let delivered = s.read(&mut b).map(|n| n == 1).unwrap_or(false);
                (blocked, delivered)
            });
            t.join().expect("thread")
        });
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        let (blocked, delivered) = r.expect("test body");
        assert!(blocked, "the locked connection's data got through");
        assert!(delivered, "the data did not arrive once the lock was lifted (retransmission)");
    }
}
