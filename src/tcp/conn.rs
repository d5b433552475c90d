//! Connection establishment without blocking: the connecting side's pending sockets and the
//! listen comm that accepts sockets, reads their hellos and groups them into connections.
//!
//! Nothing here waits for the other side, so whatever never completes is dropped once it has been
//! idle for [`ABANDON_AFTER`]: a connect NCCL stopped polling, a socket that never sends its hello
//! (a port scanner, a stray connection), a connection whose other sockets never arrive.

use super::liveness::Liveness;
use super::wire::{Hello, HELLO_LEN};
use crate::error::{Error, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
#[cfg(test)]
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// Tag of a listen comm (first word, like every object this transport hands out).
pub const TAG_LISTEN: u64 = u64::from_le_bytes(*b"txsLSTN\0");

/// Half-made connections idle this long are dropped (their sockets closed) by the next connect or
/// accept: pending connects not polled, accepted sockets without a complete hello, connections
/// missing sockets.
pub const ABANDON_AFTER: Duration = Duration::from_secs(60);

/// A fresh non-blocking TCP socket with TCP_NODELAY for `peer`'s address family.
fn new_socket(peer: &SocketAddr, call: &str, live: &Liveness) -> Result<Socket> {
    let s = Socket::new(Domain::for_address(*peer), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| Error::io(format!("{call}: creating a socket for {peer}"), e))?;
    s.set_nonblocking(true)
        .map_err(|e| Error::io(format!("{call}: making the socket for {peer} non-blocking"), e))?;
    s.set_tcp_nodelay(true)
        .map_err(|e| Error::io(format!("{call}: setting TCP_NODELAY for {peer}"), e))?;
    live.apply(&s).map_err(|e| {
        Error::io(
            format!(
                "{call}: setting keepalive and TCP_USER_TIMEOUT for {peer} (NCCL_TCPXSHIM_TCP_KEEPALIVE, \
                 NCCL_TCPXSHIM_TCP_USER_TIMEOUT)"
            ),
            e,
        )
    })?;
    Ok(s)
}

struct PendingSock {
    sock: Socket,
    connected: bool,
    hello: [u8; HELLO_LEN],
    sent: usize,
}

/// A connection being set up by `connect`: 1 control + N data sockets.
pub struct PendingConnect {
    /// The listener connected to.
    pub peer: SocketAddr,
    /// When `connect` last polled this connection (entries not polled for [`ABANDON_AFTER`] are dropped).
    pub touched: Instant,
    socks: Vec<PendingSock>,
}

impl PendingConnect {
    /// Starts non-blocking connects of all sockets.
    pub fn start(
        peer: SocketAddr,
        streams: u16,
        inline_max: u32,
        token: u64,
        nonce: u64,
        live: Liveness,
    ) -> Result<PendingConnect> {
        let addr = SockAddr::from(peer);
        let mut socks = Vec::with_capacity(1 + streams as usize);
        for index in 0..=streams {
            let sock = new_socket(&peer, "connect", &live)?;
            let connected = match sock.connect(&addr) {
                Ok(()) => true,
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
                Err(e) => return Err(connect_error(&peer, e)),
            };
            let hello = Hello {
                index,
                streams,
                inline_max,
                nonce,
                token,
            }
            .encode();
            socks.push(PendingSock {
                sock,
                connected,
                hello,
                sent: 0,
            });
        }
        Ok(PendingConnect {
            peer,
            touched: Instant::now(),
            socks,
        })
    }

    /// Advances connects and hello writes; true once every hello is fully written.
    pub fn progress(&mut self) -> Result<bool> {
        let peer = self.peer;
        let mut all = true;
        for p in &mut self.socks {
            if !p.connected {
                match p.sock.take_error() {
                    Ok(None) => {}
                    Ok(Some(e)) | Err(e) => return Err(connect_error(&peer, e)),
                }
                match p.sock.peer_addr() {
                    Ok(_) => p.connected = true,
                    Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                        all = false;
                        continue;
                    }
                    Err(e) => return Err(connect_error(&peer, e)),
                }
            }
            while p.sent < HELLO_LEN {
                match p.sock.send_with_flags(&p.hello[p.sent..], libc::MSG_NOSIGNAL) {
                    Ok(n) => p.sent += n,
                    Err(e) if super::sys::is_would_block(&e) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(connect_error(&peer, e)),
                }
            }
            all &= p.sent == HELLO_LEN;
        }
        Ok(all)
    }

    /// Raw fds of its sockets (tests check they get closed).
    #[cfg(test)]
    pub fn fds(&self) -> Vec<RawFd> {
        self.socks.iter().map(|p| p.sock.as_raw_fd()).collect()
    }

    /// The control socket and the data sockets, in stream order.
    pub fn into_sockets(self) -> Result<(Socket, Vec<Socket>)> {
        let mut it = self.socks.into_iter().map(|p| p.sock);
        let ctrl = it
            .next()
            .ok_or_else(|| Error::internal("connect: pending connection without a control socket"))?;
        Ok((ctrl, it.collect()))
    }
}

/// A failed connect, its kind from the OS error (refused, unreachable, timed out: retryable).
fn connect_error(peer: &SocketAddr, e: std::io::Error) -> Error {
    Error::with_io(
        format!(
            "connect: connection to {peer} failed: {e} (is the peer rank alive and listening, and is the address \
             reachable from this host's interface? see NCCL_TCPXSHIM_TCP_IFNAME)"
        ),
        e,
    )
}

struct HalfOpen {
    sock: Socket,
    peer: SocketAddr,
    buf: [u8; HELLO_LEN],
    got: usize,
    /// When it was accepted.
    since: Instant,
}

struct Group {
    peer: SocketAddr,
    ctrl: Option<Socket>,
    data: Vec<Option<Socket>>,
    have: usize,
    /// When its last socket arrived.
    touched: Instant,
}

/// Settings the listener checks hellos against.
#[derive(Clone, Copy)]
pub struct ListenParams {
    /// Data sockets per connection.
    pub streams: u16,
    /// Inline threshold.
    pub inline_max: u32,
    /// The listener's token (also in the handle).
    pub token: u64,
    /// Idle time after which half-made connections are dropped ([`ABANDON_AFTER`]; tests shorten it).
    pub abandon_after: Duration,
    /// Keepalive and user timeout of accepted sockets.
    pub liveness: Liveness,
    /// Ports to bind to (NCCL_TCPXSHIM_TCP_PORT_RANGE); `None`: any.
    pub ports: Option<(u16, u16)>,
}

/// Where the next listen starts looking in the port range, so that listens spread over it.
static NEXT_PORT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A socket bound to `ip` on a port of `ports` (any free port when `None`).
fn bind_in_range(ip: std::net::IpAddr, ports: Option<(u16, u16)>) -> Result<Socket> {
    let fresh = || {
        let s = Socket::new(
            Domain::for_address(SocketAddr::new(ip, 0)),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .map_err(|e| Error::io(format!("listen: creating a socket on {ip}"), e))?;
        Ok::<Socket, Error>(s)
    };
    let Some((lo, hi)) = ports else {
        let s = fresh()?;
        s.bind(&SockAddr::from(SocketAddr::new(ip, 0)))
            .map_err(|e| Error::io(format!("listen: binding to {ip}"), e))?;
        return Ok(s);
    };
    let n = u32::from(hi - lo) + 1;
    let start = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for i in 0..n {
        let port = lo + ((start.wrapping_add(i)) % n) as u16;
        let s = fresh()?;
        // A port of the range is used again and again: connections of an earlier listener in
        // TIME_WAIT on it must not keep a new listener off it.
        s.set_reuse_address(true)
            .map_err(|e| Error::io(format!("listen: setting SO_REUSEADDR on {ip}"), e))?;
        match s.bind(&SockAddr::from(SocketAddr::new(ip, port))) {
            Ok(()) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(Error::io(format!("listen: binding to {ip}:{port}"), e)),
        }
    }
    Err(Error::system(format!(
        "listen: every port of {lo}-{hi} on {ip} is in use (NCCL_TCPXSHIM_TCP_PORT_RANGE): widen the range"
    )))
}

/// A connection fully accepted: its sockets and the peer's control address.
pub struct Accepted {
    /// The connecting side's control-socket address.
    pub peer: SocketAddr,
    /// Control socket.
    pub ctrl: Socket,
    /// Data sockets in stream order.
    pub data: Vec<Socket>,
}

/// A listen comm.
#[repr(C)]
pub struct ListenComm {
    tag: u64,
    /// Address the listener is bound to.
    pub addr: SocketAddr,
    params: ListenParams,
    inner: std::sync::Mutex<ListenInner>,
}

struct ListenInner {
    listener: Socket,
    half: Vec<HalfOpen>,
    groups: HashMap<u64, Group>,
}

impl ListenComm {
    /// Binds and listens on `ip`, on any free port or one of `params.ports`.
    pub fn bind(ip: std::net::IpAddr, backlog: i32, params: ListenParams) -> Result<ListenComm> {
        let s = bind_in_range(ip, params.ports)?;
        s.listen(backlog)
            .map_err(|e| Error::io(format!("listen: listening on {ip}"), e))?;
        s.set_nonblocking(true)
            .map_err(|e| Error::io(format!("listen: making the listener on {ip} non-blocking"), e))?;
        let addr = s
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| Error::system(format!("listen: cannot read back the address bound on {ip}")))?;
        Ok(ListenComm {
            tag: TAG_LISTEN,
            addr,
            params,
            inner: std::sync::Mutex::new(ListenInner {
                listener: s,
                half: Vec::new(),
                groups: HashMap::new(),
            }),
        })
    }

    /// Raw fds of the listener and every half-accepted socket (tests check they get closed).
    #[cfg(test)]
    pub fn fds(&self) -> Vec<RawFd> {
        match self.inner.lock() {
            Ok(g) => {
                let mut v = vec![g.listener.as_raw_fd()];
                v.extend(g.half.iter().map(|h| h.sock.as_raw_fd()));
                for grp in g.groups.values() {
                    v.extend(grp.ctrl.iter().map(|s| s.as_raw_fd()));
                    v.extend(grp.data.iter().flatten().map(|s| s.as_raw_fd()));
                }
                v
            }
            Err(_) => Vec::new(),
        }
    }

    /// Accepts pending sockets, reads hellos and returns a connection once one is complete.
    pub fn poll_accept(&self) -> Result<Option<Accepted>> {
        let mut g = self.inner.try_lock().map_err(|_| {
            Error::invalid_usage(format!(
                "accept: listen comm on {} is busy in another thread",
                self.addr
            ))
        })?;
        let inner = &mut *g;
        self.accept_new(inner)?;
        self.read_hellos(inner)?;
        self.drop_abandoned(inner);
        self.take_complete(inner)
    }

    /// Accepts every socket waiting on the listener, as a half-open socket until its hello is in.
    fn accept_new(&self, inner: &mut ListenInner) -> Result<()> {
        loop {
            match inner.listener.accept() {
                Ok((sock, from)) => {
                    let peer = from.as_socket().unwrap_or(self.addr);
                    let set = sock.set_nonblocking(true).and_then(|()| sock.set_tcp_nodelay(true));
                    if let Err(e) = set.and_then(|()| self.params.liveness.apply(&sock)) {
                        log::warn!("accept: dropping connection from {peer}: {e}");
                        continue;
                    }
                    inner.half.push(HalfOpen {
                        sock,
                        peer,
                        buf: [0; HELLO_LEN],
                        got: 0,
                        since: Instant::now(),
                    });
                }
                Err(e) if super::sys::is_would_block(&e) => return Ok(()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => return Err(Error::io(format!("accept: accepting on {}", self.addr), e)),
            }
        }
    }

    /// Reads what has come of half-open sockets' hellos, filing each socket whose hello is
    /// complete into its connection; sockets closed or failing before that are dropped.
    fn read_hellos(&self, inner: &mut ListenInner) -> Result<()> {
        let mut i = 0;
        while i < inner.half.len() {
            let h = &mut inner.half[i];
            let r = (&h.sock).read(&mut h.buf[h.got..]);
            match r {
                Ok(0) => {
                    log::warn!("accept: connection from {} closed before its hello", h.peer);
                    inner.half.swap_remove(i);
                    continue;
                }
                Ok(n) => {
                    h.got += n;
                    if h.got < HELLO_LEN {
                        continue;
                    }
                }
                Err(e) if super::sys::is_would_block(&e) || e.kind() == std::io::ErrorKind::Interrupted => {
                    i += 1;
                    continue;
                }
                Err(e) => {
                    log::warn!("accept: dropping connection from {}: {e}", h.peer);
                    inner.half.swap_remove(i);
                    continue;
                }
            }
            let h = inner.half.swap_remove(i);
            self.place(&mut inner.groups, h)?;
        }
        Ok(())
    }

    /// Takes out a connection whose sockets have all arrived, if there is one.
    fn take_complete(&self, inner: &mut ListenInner) -> Result<Option<Accepted>> {
        let done = inner
            .groups
            .iter()
            .find(|(_, g)| g.have == 1 + self.params.streams as usize)
            .map(|(&k, _)| k);
        let Some(nonce) = done else { return Ok(None) };
        let Some(grp) = inner.groups.remove(&nonce) else {
            return Ok(None);
        };
        let (Some(ctrl), data) = (grp.ctrl, grp.data.into_iter().flatten().collect::<Vec<_>>()) else {
            return Err(Error::internal("accept: complete connection without a control socket"));
        };
        Ok(Some(Accepted {
            peer: grp.peer,
            ctrl,
            data,
        }))
    }

    /// Drops (closing their sockets) accepted sockets without a complete hello and incomplete
    /// connections that have been idle for `abandon_after`. Complete connections wait for accept.
    fn drop_abandoned(&self, inner: &mut ListenInner) {
        let max = self.params.abandon_after;
        let want = 1 + self.params.streams as usize;
        inner.half.retain(|h| {
            let idle = h.since.elapsed();
            let keep = idle < max;
            if !keep {
                log::info!(
                    "accept: dropping connection from {} on {}: no complete hello after {}s ({} of {HELLO_LEN} \
                     bytes; not a tcpxshim peer, or one that went away)",
                    h.peer,
                    self.addr,
                    idle.as_secs(),
                    h.got
                );
            }
            keep
        });
        inner.groups.retain(|_, g| {
            let idle = g.touched.elapsed();
            let keep = g.have == want || idle < max;
            if !keep {
                log::info!(
                    "accept: dropping incomplete connection from {} on {}: {} of its {want} sockets arrived, \
                     none for {}s (the connecting rank gave up or failed)",
                    g.peer,
                    self.addr,
                    g.have,
                    idle.as_secs()
                );
            }
            keep
        });
    }

    /// Files a socket whose hello is complete into its connection's group.
    fn place(&self, groups: &mut HashMap<u64, Group>, h: HalfOpen) -> Result<()> {
        let Some(hello) = Hello::decode(&h.buf) else {
            log::warn!("accept: dropping connection from {}: not a tcpxshim connection", h.peer);
            return Ok(());
        };
        if hello.token != self.params.token {
            log::warn!(
                "accept: dropping connection from {}: it was made for another listener (stale handle?)",
                h.peer
            );
            return Ok(());
        }
        if hello.streams != self.params.streams {
            return Err(Error::invalid_usage(format!(
                "accept: peer {} connects with {} data streams but this rank uses {}; \
                 NCCL_TCPXSHIM_TCP_STREAMS must match on every rank",
                h.peer, hello.streams, self.params.streams
            )));
        }
        if hello.inline_max != self.params.inline_max {
            return Err(Error::invalid_usage(format!(
                "accept: peer {} inlines messages up to {} bytes but this rank up to {}; \
                 NCCL_TCPXSHIM_TCP_INLINE must match on every rank",
                h.peer, hello.inline_max, self.params.inline_max
            )));
        }
        let streams = self.params.streams as usize;
        let idx = hello.index as usize;
        if idx > streams {
            log::warn!(
                "accept: dropping connection from {}: socket index {idx} out of range",
                h.peer
            );
            return Ok(());
        }
        let grp = groups.entry(hello.nonce).or_insert_with(|| Group {
            peer: h.peer,
            ctrl: None,
            data: (0..streams).map(|_| None).collect(),
            have: 0,
            touched: Instant::now(),
        });
        let slot = if idx == 0 {
            &mut grp.ctrl
        } else {
            &mut grp.data[idx - 1]
        };
        if slot.is_some() {
            log::warn!("accept: dropping duplicate socket {idx} from {}", h.peer);
            return Ok(());
        }
        if idx == 0 {
            grp.peer = h.peer;
        }
        *slot = Some(h.sock);
        grp.have += 1;
        grp.touched = Instant::now();
        Ok(())
    }
}
