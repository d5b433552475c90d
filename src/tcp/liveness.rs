//! Dead-peer detection: TCP keepalive and TCP_USER_TIMEOUT on every socket of a connection, and
//! the words a request's error uses when the kernel gives up on a silent peer.
//!
//! Keepalive covers a connection with nothing in flight (the kernel runs it only then): probes
//! after `keepalive_s` idle seconds, then every `max(1, keepalive_s / 2)` s, and the connection
//! fails after [`KEEPALIVE_PROBES`] unanswered ones. TCP_USER_TIMEOUT covers data in flight: the
//! connection fails once sent data has stayed unacknowledged (or, on Linux 5.11 and later, the
//! peer's window has stayed closed) for that long; with keepalive on it also replaces the probe
//! count. Either way the socket's next read or write fails with ETIMEDOUT and epoll reports the
//! error, so the request that uses the socket fails with [`ErrorKind::Timeout`].

use crate::error::{Error, ErrorKind};
use socket2::{Socket, TcpKeepalive};
use std::io;
use std::time::Duration;

/// Unanswered keepalive probes after which a connection fails (without a user timeout).
pub const KEEPALIVE_PROBES: u32 = 4;

/// The dead-peer detection settings of a connection's sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    /// Idle seconds before keepalive probes (0: keepalive off).
    pub keepalive_s: u32,
    /// TCP_USER_TIMEOUT in ms (0: the kernel's default).
    pub user_timeout_ms: u32,
}

impl Liveness {
    /// Seconds between two keepalive probes.
    pub fn keepalive_interval_s(&self) -> u32 {
        (self.keepalive_s / 2).max(1)
    }

    /// Sets keepalive and the user timeout on `s` (before connect, or right after accept).
    pub fn apply(&self, s: &Socket) -> io::Result<()> {
        if self.keepalive_s > 0 {
            let ka = TcpKeepalive::new()
                .with_time(Duration::from_secs(self.keepalive_s.into()))
                .with_interval(Duration::from_secs(self.keepalive_interval_s().into()))
                .with_retries(KEEPALIVE_PROBES);
            s.set_tcp_keepalive(&ka)?;
        } else {
            s.set_keepalive(false)?;
        }
        // Zero asks for the kernel's default, which is also what a fresh socket has.
        let ut = (self.user_timeout_ms > 0).then(|| Duration::from_millis(self.user_timeout_ms.into()));
        s.set_tcp_user_timeout(ut)
    }

    /// What bounds the time before the kernel gives up on a silent peer, naming the settings.
    pub fn explain(&self) -> String {
        let (ka, ut) = (self.keepalive_s, self.user_timeout_ms);
        let probes = format!(
            "keepalive probes from {ka} s idle, every {} s",
            self.keepalive_interval_s()
        );
        let bound = match (ka > 0, ut > 0) {
            (true, true) => format!(
                "once data in flight stays unacknowledged, or an idle connection's {probes} stay unanswered, for \
                 {ut} ms (NCCL_TCPXSHIM_TCP_USER_TIMEOUT={ut}, NCCL_TCPXSHIM_TCP_KEEPALIVE={ka})"
            ),
            (false, true) => format!(
                "once data in flight stays unacknowledged for {ut} ms (NCCL_TCPXSHIM_TCP_USER_TIMEOUT={ut}); keepalive \
                 is off (NCCL_TCPXSHIM_TCP_KEEPALIVE=0), so an idle connection is not checked"
            ),
            (true, false) => format!(
                "when an idle connection's {KEEPALIVE_PROBES} {probes} go unanswered \
                 (NCCL_TCPXSHIM_TCP_KEEPALIVE={ka}), or when data in flight outlasts the kernel's retransmissions \
                 (net.ipv4.tcp_retries2, about 15 minutes; NCCL_TCPXSHIM_TCP_USER_TIMEOUT bounds it)"
            ),
            (false, false) => "when data in flight outlasts the kernel's retransmissions (net.ipv4.tcp_retries2, \
                               about 15 minutes; NCCL_TCPXSHIM_TCP_USER_TIMEOUT bounds it); keepalive is off \
                               (NCCL_TCPXSHIM_TCP_KEEPALIVE=0)"
                .to_string(),
        };
        format!(
            "the peer stopped answering (dead, or unreachable): the connection is given up {bound}. Raise these \
             settings if the network has longer outages"
        )
    }
}

/// Whether `e` is how the kernel reports a connection it gave up on because the peer went silent:
/// ETIMEDOUT, or the soft error of the last retransmission (the route to the peer is gone).
pub fn is_silent_peer(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ETIMEDOUT) | Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) | Some(libc::EHOSTDOWN)
    )
}

/// The error of an established connection's socket failing with `e` while doing `what` (a message
/// naming the call, the peer and the operation). A silent peer gives [`ErrorKind::Timeout`] and an
/// explanation naming the settings that bounded the wait; an unreachable route is a lost
/// connection (not a refused one: the connection existed).
pub fn socket_error(what: String, e: io::Error, live: &Liveness) -> Error {
    let kind = match ErrorKind::of_io(&e) {
        ErrorKind::Refused => ErrorKind::ConnectionLost,
        k => k,
    };
    let msg = if is_silent_peer(&e) {
        format!("{what}: {e}; {}", live.explain())
    } else {
        format!("{what}: {e}")
    };
    Error::with_io_as(kind, msg, e)
}
