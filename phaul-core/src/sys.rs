//! The syscall layer: the few operations that need raw file descriptors. All of phaul-core's `unsafe` outside the
//! plugin loader is here.

use std::fs::File;
use std::io::{self, IsTerminal, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::socket::{getsockopt, socketpair, sockopt, AddressFamily, SockFlag, SockType};
use nix::sys::stat::{fstat, SFlag};

/// What is behind a file descriptor number handed to phaul on its command line.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    #[error(
        "fd {fd} given to {flag} is not open in this process; the caller must pass it open (without close-on-exec)"
    )]
    NotOpen { fd: RawFd, flag: &'static str },
    #[error("fd {fd} given to {flag} is {what}, not a socket; pass a connected stream socket (TCP or AF_UNIX)")]
    NotASocket { fd: RawFd, flag: &'static str, what: &'static str },
    #[error("fd {fd} given to {flag} is a {kind} socket; phaul needs a connected stream socket (SOCK_STREAM)")]
    NotStream { fd: RawFd, flag: &'static str, kind: String },
    #[error("fd {fd} given to {flag} is a socket that is not connected; connect it to the peer before starting phaul")]
    NotConnected { fd: RawFd, flag: &'static str },
    #[error("fd {fd} is given to both {first} and {second}; each channel needs its own connection")]
    Duplicate { fd: RawFd, first: &'static str, second: &'static str },
    #[error("fd {fd} given to {flag} is one of phaul's standard streams (0, 1, 2); pass a descriptor of 3 or more")]
    Standard { fd: RawFd, flag: &'static str },
}

fn describe_mode(mode: SFlag) -> &'static str {
    match mode & SFlag::S_IFMT {
        m if m == SFlag::S_IFREG => "a regular file",
        m if m == SFlag::S_IFDIR => "a directory",
        m if m == SFlag::S_IFCHR => "a character device",
        m if m == SFlag::S_IFBLK => "a block device",
        m if m == SFlag::S_IFIFO => "a pipe",
        m if m == SFlag::S_IFLNK => "a symbolic link",
        _ => "not a socket",
    }
}

/// Takes ownership of an inherited descriptor after checking it is a connected stream socket.
///
/// The caller must not hand the same number to this function twice (see [`check_distinct`]).
pub fn adopt_stream_socket(fd: RawFd, flag: &'static str) -> Result<OwnedFd, FdError> {
    if fd <= 2 {
        return Err(FdError::Standard { fd, flag });
    }
    if fcntl(fd, FcntlArg::F_GETFD).is_err() {
        return Err(FdError::NotOpen { fd, flag });
    }
    let st = fstat(fd).map_err(|_| FdError::NotOpen { fd, flag })?;
    let mode = SFlag::from_bits_truncate(st.st_mode);
    if mode & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(FdError::NotASocket { fd, flag, what: describe_mode(mode) });
    }
    // SAFETY: `fd` was checked open just above; the command line names each descriptor once (check_distinct), so
    // no other owner exists in this process, and from here on the returned OwnedFd is its only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    match getsockopt(&owned, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(other) => {
            let kind = format!("{other:?}").to_lowercase();
            std::mem::forget(owned);
            return Err(FdError::NotStream { fd, flag, kind });
        }
        Err(_) => {
            std::mem::forget(owned);
            return Err(FdError::NotASocket { fd, flag, what: "not a socket" });
        }
    }
    if nix::sys::socket::getpeername::<nix::sys::socket::SockaddrStorage>(owned.as_raw_fd()).is_err() {
        // Leave the caller's descriptor alone: we do not own it after all.
        std::mem::forget(owned);
        return Err(FdError::NotConnected { fd, flag });
    }
    Ok(owned)
}

/// Rejects the same descriptor number given to two channel flags.
pub fn check_distinct(fds: &[(Option<RawFd>, &'static str)]) -> Result<(), FdError> {
    for (i, (a, fa)) in fds.iter().enumerate() {
        for (b, fb) in &fds[i + 1..] {
            if let (Some(a), Some(b)) = (a, b) {
                if a == b {
                    return Err(FdError::Duplicate { fd: *a, first: fa, second: fb });
                }
            }
        }
    }
    Ok(())
}

/// A connected SOCK_SEQPACKET pair, close-on-exec on both ends (CRIU's swrk speaks over one).
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).map_err(io::Error::from)
}

/// A connected SOCK_STREAM pair, close-on-exec on both ends.
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC).map_err(io::Error::from)
}

/// Whether standard error is a terminal (progress is shown only then).
pub fn stderr_is_terminal() -> bool {
    io::stderr().is_terminal()
}

/// Whether a process exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z') | Some('X') | None),
            None => false,
        },
        Err(_) => false,
    }
}

/// A random hex string of `bytes` bytes, from the kernel's generator.
pub fn random_hex(bytes: usize) -> io::Result<String> {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Duplicates a descriptor (close-on-exec).
pub fn dup(fd: impl AsFd) -> io::Result<OwnedFd> {
    fd.as_fd().try_clone_to_owned()
}

/// Turns TCP_CORK off and TCP_NODELAY on, sending whatever a corked socket holds back. CRIU corks the page-server
/// socket and leaves it so; phaul's own writes on the same connection must not sit behind the cork timer.
/// A socket that is not TCP is left alone.
pub fn tcp_uncork(fd: impl AsFd) -> io::Result<()> {
    let off: libc::c_int = 0;
    // SAFETY: `fd` is a valid open descriptor for the duration of the call (borrowed), and the option value points
    // at a live c_int whose size is passed along.
    let r = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&off as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOPROTOOPT) | Some(libc::ENOTSOCK) => Ok(()),
            _ => Err(e),
        };
    }
    tcp_push(fd)
}

/// Sets TCP_NODELAY, which also pushes out frames a corked TCP socket is holding. Not TCP: nothing happens.
pub fn tcp_push(fd: impl AsFd) -> io::Result<()> {
    match nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::TcpNoDelay, &true) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) | Err(nix::errno::Errno::ENOPROTOOPT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Makes a TCP connection notice a dead peer or a cut link within about `secs` seconds: TCP_USER_TIMEOUT bounds
/// how long sent data may stay unacknowledged, and keepalive probes (idle `secs / 3`, then every second, three
/// times) cover an idle line. A socket that is not TCP is left alone.
pub fn tcp_liveness(fd: impl AsFd, secs: u32) -> io::Result<()> {
    use nix::sys::socket::sockopt::{KeepAlive, TcpKeepCount, TcpKeepIdle, TcpKeepInterval};
    let secs = secs.max(3);
    match nix::sys::socket::setsockopt(&fd, KeepAlive, &true) {
        Ok(()) => {}
        Err(nix::errno::Errno::EOPNOTSUPP) | Err(nix::errno::Errno::ENOPROTOOPT) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let tcp = |r: nix::Result<()>| match r {
        Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP) | Err(nix::errno::Errno::ENOPROTOOPT) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    };
    tcp(nix::sys::socket::setsockopt(&fd, TcpKeepIdle, &(secs / 3).max(1)))?;
    tcp(nix::sys::socket::setsockopt(&fd, TcpKeepInterval, &1))?;
    tcp(nix::sys::socket::setsockopt(&fd, TcpKeepCount, &3))?;
    tcp(nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::TcpUserTimeout, &secs.saturating_mul(1000)))?;
    Ok(())
}

/// While alive, pushes out what a corked TCP socket holds every few milliseconds.
///
/// CRIU corks its page-server connection and, at the end of a dump, waits for the page server's answer without
/// pushing the last partial segment, which then waits for the kernel's 200 ms cork timer (every dump pays it).
/// phaul shares the socket, so it pushes pending frames itself while CRIU runs.
#[derive(Debug)]
pub struct CorkPusher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CorkPusher {
    pub fn start(fd: OwnedFd) -> CorkPusher {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if tcp_push(&fd).is_err() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(3));
            }
        });
        CorkPusher { stop, thread: Some(thread) }
    }
}

impl Drop for CorkPusher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The descriptors above 2 this process was started with (recorded by [`cloexec_inherited`]; the read of
/// /proc/self/fd itself may add one, which is closed again by then).
static INHERITED: std::sync::OnceLock<Vec<RawFd>> = std::sync::OnceLock::new();

/// Whether `fd` was open when this process started (and not one phaul opened itself since, such as its log file).
pub fn was_inherited(fd: RawFd) -> bool {
    INHERITED.get().is_some_and(|v| v.contains(&fd)) && fcntl(fd, FcntlArg::F_GETFD).is_ok()
}

/// Whether `fd` is open for writing.
pub fn is_writable(fd: RawFd) -> bool {
    fcntl(fd, FcntlArg::F_GETFL).is_ok_and(|fl| {
        let mode = fl & libc::O_ACCMODE;
        mode == libc::O_WRONLY || mode == libc::O_RDWR
    })
}

/// Marks every descriptor above 2 that this process inherited close-on-exec. phaul hands children (CRIU, the
/// lazy-pages daemon, a trial process) exactly the descriptors they need; a connection a caller handed phaul must
/// never leak into them (CRIU refuses to dump a process holding a stray TCP socket, for one).
pub fn cloexec_inherited() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<RawFd> = dir.flatten().filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok())).collect();
    let _ = INHERITED.set(fds.iter().copied().filter(|fd| *fd > 2).collect());
    for fd in fds.into_iter().filter(|fd| *fd > 2) {
        if let Ok(flags) = fcntl(fd, FcntlArg::F_GETFD) {
            let flags = nix::fcntl::FdFlag::from_bits_truncate(flags) | nix::fcntl::FdFlag::FD_CLOEXEC;
            let _ = fcntl(fd, FcntlArg::F_SETFD(flags));
        }
    }
}

/// A pidfd for a process (close-on-exec), through the raw `pidfd_open` system call (Linux 5.3).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and a flags word (0) by value and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0 as libc::c_uint) };
    owned_from_syscall(r)
}

/// A copy of descriptor `target_fd` of the process behind `pidfd`, through the raw `pidfd_getfd` system call
/// (Linux 5.6; needs ptrace access to the process). The copy shares the open file description with the process's
/// descriptor (offset, status flags) and is close-on-exec.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target_fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes a descriptor (borrowed, so open for the whole call), a descriptor number of the
    // other process and a flags word (0), all by value, and touches no memory of ours.
    let r =
        unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd as libc::c_int, 0 as libc::c_uint) };
    owned_from_syscall(r)
}

/// Takes ownership of the descriptor a raw system call returned (or its errno).
fn owned_from_syscall(r: libc::c_long) -> io::Result<OwnedFd> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(r).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "descriptor out of range"))?;
    // SAFETY: the kernel just created `fd` for this process and nothing else refers to it; the OwnedFd becomes its
    // only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The number of a pty master (N of /dev/pts/N), by TIOCGPTN.
pub fn pty_number(master: BorrowedFd<'_>) -> io::Result<u32> {
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int through the pointer, which points at a live c_uint; the descriptor
    // is borrowed, so open for the whole call.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n as *mut libc::c_uint) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

/// How many bytes are queued for reading on a terminal (or pipe, socket), by FIONREAD.
pub fn queued_input(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points at a live c_int; the descriptor is
    // borrowed, so open for the whole call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(n).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "negative FIONREAD count"))
}

/// F_SETOWN_EX and F_GETOWN_EX (asm-generic/fcntl.h), which the libc crate does not define for every target.
const F_SETOWN_EX: libc::c_int = 15;
const F_GETOWN_EX: libc::c_int = 16;

/// `struct f_owner_ex`.
#[repr(C)]
struct FOwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// Who gets SIGIO for an open file, as F_GETOWN_EX tells: `kind` is F_OWNER_TID (0), F_OWNER_PID (1) or
/// F_OWNER_PGRP (2), `id` the thread, process or group in our pid namespace (0: nobody).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOwner {
    pub kind: i32,
    pub id: i32,
}

/// The SIGIO owner of an open file (F_GETOWN_EX).
pub fn file_owner(fd: BorrowedFd<'_>) -> io::Result<FileOwner> {
    let mut o = FOwnerEx { kind: 0, pid: 0 };
    // SAFETY: F_GETOWN_EX writes one struct f_owner_ex through the pointer, which points at a live value of that
    // layout (repr(C)); the descriptor is borrowed, so open for the whole call.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), F_GETOWN_EX, &mut o as *mut FOwnerEx) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(FileOwner { kind: o.kind, id: o.pid })
}

/// Sets the SIGIO owner of an open file (F_SETOWN_EX).
pub fn set_file_owner(fd: BorrowedFd<'_>, owner: FileOwner) -> io::Result<()> {
    let o = FOwnerEx { kind: owner.kind, pid: owner.id };
    // SAFETY: F_SETOWN_EX reads one struct f_owner_ex through the pointer, which points at a live value of that
    // layout (repr(C)); the descriptor is borrowed, so open for the whole call.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), F_SETOWN_EX, &o as *const FOwnerEx) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of a descriptor this process inherited under a number agreed with its parent (the guard's
/// watch pipe). Fails unless the number is open.
pub fn adopt_inherited(fd: RawFd) -> io::Result<OwnedFd> {
    if fd <= 2 || fcntl(fd, FcntlArg::F_GETFD).is_err() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("descriptor {fd} is not open")));
    }
    // SAFETY: the descriptor was just seen open, it was handed to this process for it alone (by the parent that
    // spawned it under this number), and nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Receives one message from a SOCK_SEQPACKET socket into `buf`, with the descriptors it carries (SCM_RIGHTS, at
/// most `MAX_PASSED_FDS`; more are closed by the kernel's truncation). Returns the message's full length (which
/// may exceed `buf`: MSG_TRUNC) and the descriptors, each owned by the caller.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut space = nix::cmsg_space!([RawFd; MAX_PASSED_FDS]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg =
        recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_TRUNC | MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(list) = c {
            for fd in list {
                // SAFETY: the kernel installed `fd` in this process for this message (SCM_RIGHTS) and nothing else
                // refers to it yet; the OwnedFd becomes its only owner and closes it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((msg.bytes, fds))
}

/// How many descriptors [`recv_with_fds`] takes from one message.
pub const MAX_PASSED_FDS: usize = 4;

/// The listening TCP socket systemd passed this process (socket activation: `LISTEN_PID` is this process,
/// `LISTEN_FDS` counts the sockets from descriptor 3), or `None` when it was not started so. phaul serve takes
/// exactly one; anything else passed is an error that says so.
pub fn systemd_listener() -> io::Result<Option<std::net::TcpListener>> {
    let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.trim().parse::<u32>().ok()) == Some(std::process::id());
    if !ours {
        return Ok(None);
    }
    let n = std::env::var("LISTEN_FDS").ok().and_then(|n| n.trim().parse::<u32>().ok()).unwrap_or(0);
    if n != 1 {
        return Err(io::Error::other(format!(
            "systemd passed {n} sockets (LISTEN_FDS={n}); phaul serve takes exactly one listening TCP socket: give the socket unit one ListenStream="
        )));
    }
    const FD: RawFd = 3;
    let st = fstat(FD).map_err(|e| io::Error::other(format!("descriptor 3 from systemd: {e}")))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(io::Error::other("descriptor 3 from systemd is not a socket"));
    }
    // SAFETY: descriptor 3 is open (fstat just succeeded on it) and stays open for this borrow, which ends before
    // the descriptor is handed on below.
    let fd = unsafe { BorrowedFd::borrow_raw(FD) };
    let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    let stream = getsockopt(&fd, sockopt::SockType).is_ok_and(|t| t == SockType::Stream);
    if !listening || !stream {
        return Err(io::Error::other(
            "descriptor 3 from systemd is not a listening stream socket: the socket unit needs ListenStream= and Accept=no",
        ));
    }
    // SAFETY: descriptor 3 is an open listening stream socket that systemd handed to this process for it to own
    // (LISTEN_PID names us), and nothing else in phaul owns it; the listener becomes its only owner.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(FD) };
    match listener.local_addr() {
        Ok(_) => Ok(Some(listener)),
        Err(e) => Err(io::Error::other(format!("the socket from systemd is not a TCP socket ({e})"))),
    }
}
