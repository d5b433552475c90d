//! Breaks another process's TCP connections from outside it, the way a NIC reset or a
//! middlebox does, for fault tests (`tcpxshim drop`).
//!
//! The process's sockets are found in `/proc/PID/fd` and matched by inode against
//! `/proc/PID/net/tcp` and `tcp6` (its network namespace's tables) in state ESTABLISHED. Each
//! one is copied into this process with `pidfd_getfd(2)` (Linux 5.6 and later; it needs ptrace
//! rights over the process: root, or its user with `kernel.yama.ptrace_scope` 0), shut down
//! both ways with `shutdown(2)`, and the copy closed. The process keeps its descriptor; its next
//! read sees the end of the stream and its next write fails, and the peer sees the end of the
//! stream too.

use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// TCP_ESTABLISHED in the state column of /proc/net/tcp.
pub const STATE_ESTABLISHED: u8 = 1;

/// One line of `/proc/net/tcp` or `tcp6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpEntry {
    /// The local address.
    pub local: SocketAddr,
    /// The remote address.
    pub remote: SocketAddr,
    /// The kernel's TCP state (1: established).
    pub state: u8,
    /// The socket's inode (the number in `socket:[N]`).
    pub inode: u64,
}

/// An address as the kernel prints it: the 32-bit words of the address in the machine's byte
/// order, `%08X` each, then `:` and the port in hex.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    if port.len() != 4 || !ip.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16)
            .ok()
            .map(u32::to_ne_bytes)
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut o = [0u8; 16];
            for i in 0..4 {
                o[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The entries of a `/proc/net/tcp` or `tcp6` table; lines that are not entries (the header)
/// are skipped.
pub fn parse_tcp_table(text: &str) -> Vec<TcpEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !f[0].ends_with(':') {
                return None;
            }
            if f[3].len() != 2 {
                return None;
            }
            Some(TcpEntry {
                local: parse_addr(f[1])?,
                remote: parse_addr(f[2])?,
                state: u8::from_str_radix(f[3], 16).ok()?,
                inode: f[9].parse().ok()?,
            })
        })
        .collect()
}

/// The socket inode a `/proc/PID/fd` link names (`socket:[N]`).
fn socket_inode(link: &std::path::Path) -> Option<u64> {
    link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Established TCP connections of process `pid`: the process's descriptor of each, and its
/// local and remote address. With a non-empty `filter`, only those with a local or remote port in it.
pub fn established(pid: u32, filter: &[u16]) -> Result<Vec<(i32, SocketAddr, SocketAddr)>> {
    let mut by_inode: HashMap<u64, TcpEntry> = HashMap::new();
    for table in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for e in parse_tcp_table(&text) {
                    if e.state == STATE_ESTABLISHED && e.inode != 0 {
                        by_inode.insert(e.inode, e);
                    }
                }
            }
            // A kernel without IPv6 has no tcp6 table.
            Err(e) if table == "tcp6" && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::io(
                    format!("drop: reading {path} (is process {pid} running?)"),
                    e,
                ))
            }
        }
    }
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        Error::io(
            format!("drop: listing {dir} (is process {pid} running, and may this user see its descriptors?)"),
            e,
        )
    })?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Some(inode) = std::fs::read_link(entry.path()).ok().as_deref().and_then(socket_inode) else {
            continue;
        };
        let Some(e) = by_inode.get(&inode) else { continue };
        if !filter.is_empty() && !filter.contains(&e.local.port()) && !filter.contains(&e.remote.port()) {
            continue;
        }
        // A socket under several descriptors is shut down once.
        if seen.insert(inode) {
            out.push((fd, e.local, e.remote));
        }
    }
    out.sort_by_key(|&(fd, ..)| fd);
    Ok(out)
}

/// Shuts down (`SHUT_RDWR`) every established TCP connection of process `pid` (with a non-empty
/// `filter`, those with a local or remote port in it); returns the local and remote address of
/// each. Needs ptrace rights over the process.
pub fn drop_connections(pid: u32, filter: &[u16]) -> Result<Vec<(SocketAddr, SocketAddr)>> {
    let conns = established(pid, filter)?;
    if conns.is_empty() {
        return Ok(Vec::new());
    }
    let pidfd = pidfd_open(pid)?;
    let mut dropped = Vec::new();
    for (fd, local, remote) in conns {
        let copy = match pidfd_getfd(&pidfd, pid, fd) {
            Ok(c) => c,
            // Closed since it was listed.
            Err(e) if e.io_source().and_then(std::io::Error::raw_os_error) == Some(libc::EBADF) => continue,
            Err(e) => return Err(e),
        };
        // SAFETY: `copy` is an open descriptor this process owns (closed when it drops);
        // shutdown(2) only reads its arguments.
        if unsafe { libc::shutdown(copy.as_raw_fd(), libc::SHUT_RDWR) } != 0 {
            let e = std::io::Error::last_os_error();
            // Already gone (the connection closed since it was listed).
            if e.raw_os_error() == Some(libc::ENOTCONN) {
                continue;
            }
            return Err(Error::io(
                format!("drop: shutdown of pid {pid} fd {fd} ({local} -> {remote})"),
                e,
            ));
        }
        dropped.push((local, remote));
    }
    Ok(dropped)
}

fn pidfd_open(pid: u32) -> Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| Error::invalid_argument(format!("drop: pid {pid} is not a process id")))?;
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1; no memory
    // is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Error::io(
            format!("drop: pidfd_open of pid {pid} (Linux 5.3 or later; is the process running?)"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_getfd(pidfd: &OwnedFd, pid: u32, fd: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_getfd(2) takes a pidfd, a descriptor number of that process and flags, and
    // returns a new descriptor of this process or -1; no memory is passed.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copy < 0 {
        let e = std::io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::EPERM) => {
                " (needs ptrace rights over the process: run as root, or as its user with kernel.yama.ptrace_scope=0)"
            }
            Some(libc::ENOSYS) => " (pidfd_getfd needs Linux 5.6 or later)",
            _ => "",
        };
        return Err(Error::io(format!("drop: pidfd_getfd of pid {pid} fd {fd}{hint}"), e));
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(copy as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_lines_parse() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000 20 4 30 10 -1\n";
        let e = parse_tcp_table(text);
        assert_eq!(
            e,
            vec![TcpEntry {
                local: "127.0.0.1:8080".parse().unwrap(),
                remote: "127.0.0.1:50000".parse().unwrap(),
                state: 1,
                inode: 12345
            }]
        );
        let v6 =
            "   0: 00000000000000000000000001000000:0016 0000000000000000FFFF00000100007F:D431 01 0:0 0:0 0 0 0 777 1";
        let e = parse_tcp_table(v6);
        assert_eq!(e[0].local, "[::1]:22".parse().unwrap());
        assert_eq!(e[0].remote, "[::ffff:127.0.0.1]:54321".parse().unwrap());
    }

    /// The table of this very process lists a loopback connection it holds, under its inode.
    #[test]
    fn this_process_connection_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let port = l.local_addr().unwrap().port();
        let found = established(std::process::id(), &[port]).unwrap();
        let want = (c.local_addr().unwrap(), l.local_addr().unwrap());
        assert!(
            found.iter().any(|&(fd, a, b)| fd == c.as_raw_fd() && (a, b) == want),
            "{found:?}"
        );
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzzing::config;
    use proptest::prelude::*;

    /// An entry as the kernel prints it.
    fn line(i: usize, e: &TcpEntry) -> String {
        let addr = |a: &SocketAddr| {
            let ip = match a.ip() {
                IpAddr::V4(v4) => format!("{:08X}", u32::from_ne_bytes(v4.octets())),
                IpAddr::V6(v6) => v6
                    .octets()
                    .chunks(4)
                    .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
                    .collect(),
            };
            format!("{ip}:{:04X}", a.port())
        };
        format!(
            "{i:4}: {} {} {:02X} 00000000:00000000 00:00000000 00000000     0        0 {} 1 0000000000000000 20 4 30 10 -1",
            addr(&e.local),
            addr(&e.remote),
            e.state,
            e.inode
        )
    }

    fn any_entry() -> impl Strategy<Value = TcpEntry> {
        let addr = || {
            prop_oneof![
                (any::<[u8; 4]>(), any::<u16>()).prop_map(|(o, p)| SocketAddr::new(IpAddr::from(o), p)),
                (any::<[u8; 16]>(), any::<u16>()).prop_map(|(o, p)| SocketAddr::new(IpAddr::from(o), p)),
            ]
        };
        (addr(), addr(), any::<u8>(), any::<u64>()).prop_map(|(local, remote, state, inode)| TcpEntry {
            local,
            remote,
            state,
            inode,
        })
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn tcp_table_arbitrary_text(t in prop_oneof![".{0,300}", "( *[0-9]+: [0-9A-Fa-f]{0,33}:[0-9A-F]{0,5} [0-9A-F:]{0,14} [0-9A-F]{1,3}( [0-9:]{1,10}){5,8}\n){0,4}"]) {
            for e in parse_tcp_table(&t) {
                // What was accepted prints back as a line that parses to it.
                prop_assert_eq!(parse_tcp_table(&line(0, &e)), vec![e]);
            }
        }

        #[test]
        fn tcp_table_round_trips_and_mutations(entries in proptest::collection::vec(any_entry(), 1..4), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let text: String = entries.iter().enumerate().map(|(i, e)| line(i, e) + "\n").collect();
            prop_assert_eq!(parse_tcp_table(&text), entries);
            let mut m = text.into_bytes();
            let i = at.index(m.len());
            m[i] = byte;
            for e in parse_tcp_table(&String::from_utf8_lossy(&m)) {
                prop_assert_eq!(parse_tcp_table(&line(0, &e)), vec![e]);
            }
        }
    }
}
