//! Control links: a persistent, two-way, authenticated message path between the two processes
//! of one NCCL connection, for recovery (and later connection pooling).
//!
//! The listening process (the receiver) registers the link it expects with [`Hub::expect`]
//! under the connection id and secret it puts into the handle's trailer; the connecting process
//! (the sender) reads them from the handle and calls [`Hub::connect`] with the address of the
//! receiver's control service. The sender opens a TCP connection, sends an authenticated
//! `Attach` frame and the receiver answers `AttachOk`; from then on both sides [`Link::send`]
//! messages (queued, never blocking) and poll for the peer's with [`Link::try_recv`] (an atomic
//! load when nothing is there). When the TCP connection breaks, the sender reconnects with
//! backoff and attaches again; what was queued or not yet acknowledged meanwhile is delivered
//! after, in order, exactly once.
//!
//! # Frames
//!
//! ```text
//! 0      4    6    8        12    16         24     32     40       42     44       44+len
//! | magic | ver | kind | conn id | len | counter | seq | ack | msg type | 0 | body | MAC (16) |
//! ```
//! All little-endian. `counter` grows by one with every frame a side sends on a link, across
//! reconnects, so a recorded frame played again is refused; `seq` numbers the messages (Data
//! frames) of one direction from 1, and `ack` is the last message sequence number the sender of
//! the frame has received. The MAC is HMAC-SHA256, keyed with the connection's 8-byte secret,
//! over a direction label, the header and the body, cut to 16 bytes and checked in constant
//! time. Bodies are at most [`MAX_BODY`] bytes.
//!
//! # Delivery
//!
//! Each side keeps the messages it sent until the peer acknowledges them (every frame carries
//! `ack`; an `Ack` frame goes out when there is nothing else to carry it). `Attach` and
//! `AttachOk` carry the acks too, so after a reconnect each side resends exactly the messages
//! the other has not received, with fresh counters; a message whose `seq` was already received
//! would be dropped, and a gap ends that TCP connection. Heartbeats keep an idle link's timer
//! fed; a link that hears nothing from its peer for [`PEER_TIMEOUT`], or whose reconnects are
//! refused [`LinkConfig::refusals`] times in a row (the peer process exited), is
//! [`LinkState::Gone`] for good.
//!
//! # Threads
//!
//! One thread per [`Hub`] ("tcpxshim-link") does the I/O, multiplexing every socket with mio;
//! [`Link`] calls only take short locks and wake it. The sockets and the links' state sit behind
//! one mutex, which the thread holds only while it works a round (not while it waits), so a
//! caller in a hurry does the work itself instead of waking the thread: [`Link::send`] writes
//! the message onto the link's socket when it gets that lock at once, and [`Link::recv_now`]
//! reads the socket. Waking the thread costs the caller an inter-processor interrupt and the
//! message the thread's wake-up, tens of microseconds on virtual machines; a write or read is
//! a system call.

use crate::config::{int, Setting, Vars};
use crate::error::{Error, ErrorKind, Result};
use crate::lock;
use hmac::{Hmac, Mac};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use sha2::Sha256;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind as IoKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a link may hear nothing from its peer before it is gone.
pub const PEER_TIMEOUT: Setting = Setting {
    name: "NCCL_TCPXSHIM_PEER_TIMEOUT",
    default: "5",
    doc: "Seconds a control link between two processes of a connection may hear nothing from its peer (heartbeats \
          go every second) before the peer counts as gone (1 to 3600); a peer whose process exited is found sooner, \
          when its control service refuses the reconnects.",
};

/// How long the links' thread keeps polling after traffic before it sleeps.
pub const LINK_SPIN: Setting = Setting {
    name: "NCCL_TCPXSHIM_LINK_SPIN",
    default: "0",
    doc: "Microseconds the control links' thread keeps polling after a message before it sleeps (0 to 100000): \
          while it polls, queuing a message (a recovery acknowledgement) wakes no thread, which on virtual machines \
          costs the caller several microseconds per message; it costs that thread's core while messages flow. 0: \
          sleep at once (under NCCL on the H200 machine, 200 made no difference beyond the run-to-run spread).",
};

/// "TXLK", little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"TXLK");
/// Frame layout version.
pub const VERSION: u16 = 1;
/// Bytes before the body.
pub const HEADER_LEN: usize = 44;
/// Bytes of the truncated MAC after the body.
pub const MAC_LEN: usize = 16;
/// Largest body a frame may carry.
pub const MAX_BODY: usize = 4096;
/// Largest frame on the wire.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_BODY + MAC_LEN;

/// What a frame is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Sender to receiver, first frame of every TCP connection of a link.
    Attach = 1,
    /// Receiver's answer to a valid `Attach`.
    AttachOk = 2,
    /// One application message.
    Data = 3,
    /// Carries only `ack`.
    Ack = 4,
    /// Keeps an idle link alive.
    Heartbeat = 5,
    /// The peer closed its end of the link for good.
    Close = 6,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        use Kind::*;
        [Attach, AttachOk, Data, Ack, Heartbeat, Close]
            .into_iter()
            .find(|k| *k as u16 == v)
    }
}

/// Which way a frame travels; part of what the MAC covers, so a frame cannot be reflected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// From the connecting process to the listening one.
    ToListener,
    /// From the listening process to the connecting one.
    ToConnector,
}

impl Dir {
    fn label(self) -> &'static [u8] {
        match self {
            Dir::ToListener => b"tcpxshim link to listener",
            Dir::ToConnector => b"tcpxshim link to connector",
        }
    }
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What it is for.
    pub kind: Kind,
    /// The NCCL connection's id (from the handle).
    pub conn_id: u32,
    /// Strictly increasing per direction per link.
    pub counter: u64,
    /// Data frames: the message's sequence number (from 1); others: 0.
    pub seq: u64,
    /// Last message sequence number the frame's sender has received.
    pub ack: u64,
    /// Data frames: the application's message type; others: 0.
    pub msg_type: u16,
    /// Data frames: the message.
    pub body: Vec<u8>,
}

/// What the decoder needs to know about the link a frame claims to belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    /// The per-connection secret.
    pub secret: u64,
    /// The direction the frame must travel.
    pub dir: Dir,
    /// The highest counter accepted so far in that direction.
    pub last_counter: u64,
}

/// Why bytes or a client were turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Not a whole frame yet (a stream waits for more; at its end, the frame was cut short).
    Truncated,
    /// The length field is over [`MAX_BODY`].
    Oversized,
    /// Not a link frame.
    BadMagic,
    /// Another layout version.
    BadVersion,
    /// No link is expected under that connection id.
    UnknownConn,
    /// The MAC does not match: forged, corrupted, or the wrong secret.
    BadMac,
    /// A counter not above the last one accepted: a recorded frame played again.
    Replayed,
    /// An authentic frame with fields that do not fit its kind.
    Malformed,
    /// A client whose first frame is not an `Attach`, or an out-of-place frame on a link.
    NotAttached,
    /// A message sequence number that skips ahead.
    OutOfOrder,
    /// A client that sent no valid `Attach` within [`LinkConfig::attach_timeout`].
    Slow,
    /// Over the cap of unattached clients.
    Busy,
}

impl Reject {
    /// Every kind, in counter order.
    pub const ALL: [Reject; 12] = [
        Reject::Truncated,
        Reject::Oversized,
        Reject::BadMagic,
        Reject::BadVersion,
        Reject::UnknownConn,
        Reject::BadMac,
        Reject::Replayed,
        Reject::Malformed,
        Reject::NotAttached,
        Reject::OutOfOrder,
        Reject::Slow,
        Reject::Busy,
    ];
    fn index(self) -> usize {
        Reject::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

fn mac_of(secret: u64, dir: Dir, header: &[u8], body: &[u8]) -> Hmac<Sha256> {
    // An HMAC takes a key of any length, so this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&secret.to_le_bytes()).unwrap_or_else(|_| unreachable!());
    m.update(dir.label());
    m.update(header);
    m.update(body);
    m
}

impl Frame {
    /// The frame on the wire, authenticated with `secret` for direction `dir`.
    pub fn encode(&self, secret: u64, dir: Dir) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.body.len() + MAC_LEN);
        self.encode_into(secret, dir, &mut out);
        out
    }

    /// Appends the frame to `out`.
    pub fn encode_into(&self, secret: u64, dir: Dir, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.kind as u16).to_le_bytes());
        out.extend_from_slice(&self.conn_id.to_le_bytes());
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.counter.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.ack.to_le_bytes());
        out.extend_from_slice(&self.msg_type.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.body);
        let tag = mac_of(secret, dir, &out[start..start + HEADER_LEN], &self.body).finalize();
        out.extend_from_slice(&tag.into_bytes()[..MAC_LEN]);
    }

    /// Decodes the frame at the start of `buf`: the frame and the bytes it used. `key` gives
    /// the secret, direction and last counter of the link named by the frame's connection id
    /// (`None`: no such link). Pure: the caller records the new counter.
    pub fn decode(buf: &[u8], key: impl FnOnce(u32) -> Option<Key>) -> std::result::Result<(Frame, usize), Reject> {
        let magic = MAGIC.to_le_bytes();
        let n = buf.len().min(4);
        if buf[..n] != magic[..n] {
            return Err(Reject::BadMagic);
        }
        if buf.len() >= 6 && u16::from_le_bytes([buf[4], buf[5]]) != VERSION {
            return Err(Reject::BadVersion);
        }
        if buf.len() < HEADER_LEN {
            return Err(Reject::Truncated);
        }
        let u16_at = |i: usize| u16::from_le_bytes([buf[i], buf[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let len = u32_at(12) as usize;
        if len > MAX_BODY {
            return Err(Reject::Oversized);
        }
        let used = HEADER_LEN + len + MAC_LEN;
        if buf.len() < used {
            return Err(Reject::Truncated);
        }
        let conn_id = u32_at(8);
        let key = key(conn_id).ok_or(Reject::UnknownConn)?;
        let body = &buf[HEADER_LEN..HEADER_LEN + len];
        mac_of(key.secret, key.dir, &buf[..HEADER_LEN], body)
            .verify_truncated_left(&buf[HEADER_LEN + len..used])
            .map_err(|_| Reject::BadMac)?;
        let kind = Kind::from_u16(u16_at(6)).ok_or(Reject::Malformed)?;
        let (seq, msg_type) = (u64_at(24), u16_at(40));
        let fits = match kind {
            Kind::Data => seq != 0,
            _ => seq == 0 && msg_type == 0 && len == 0,
        };
        if !fits || u16_at(42) != 0 {
            return Err(Reject::Malformed);
        }
        let counter = u64_at(16);
        if counter <= key.last_counter {
            return Err(Reject::Replayed);
        }
        let frame = Frame {
            kind,
            conn_id,
            counter,
            seq,
            ack: u64_at(32),
            msg_type,
            body: body.to_vec(),
        };
        Ok((frame, used))
    }
}

/// A link's settings and caps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    /// NCCL_TCPXSHIM_PEER_TIMEOUT: silence after which the peer is gone.
    pub peer_timeout: Duration,
    /// An idle link sends a heartbeat this often (at most a quarter of the peer timeout).
    pub heartbeat: Duration,
    /// A client must send a valid `Attach` within this time.
    pub attach_timeout: Duration,
    /// Refused or turned-away reconnects in a row after which the sender's link is gone.
    pub refusals: u32,
    /// Links a hub holds at once.
    pub max_links: usize,
    /// Accepted sockets not yet attached at once; more are closed at once.
    pub max_unattached: usize,
    /// Messages a link holds that the peer has not acknowledged (sent ones included), and
    /// messages received that the application has not taken; a full inbox stops reading.
    pub queue: usize,
    /// NCCL_TCPXSHIM_LINK_SPIN: how long the thread polls after traffic before it sleeps.
    pub spin: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig::from_vars(&|_| None).unwrap_or_else(|e| unreachable!("the built-in defaults parse: {e}"))
    }
}

impl LinkConfig {
    /// Reads NCCL_TCPXSHIM_PEER_TIMEOUT from `vars`; the caps are constants.
    pub fn from_vars(vars: Vars<'_>) -> Result<LinkConfig> {
        Ok(LinkConfig {
            peer_timeout: Duration::from_secs(int(vars, &PEER_TIMEOUT, 1, 3600)?),
            heartbeat: Duration::from_secs(1),
            attach_timeout: Duration::from_secs(5),
            refusals: 3,
            max_links: 4096,
            max_unattached: 64,
            queue: 1024,
            spin: Duration::from_micros(int(vars, &LINK_SPIN, 0, 100_000)?),
        })
    }
}

/// Where a link stands.
#[derive(Clone, Debug)]
pub enum LinkState {
    /// Not attached yet (the sender connecting; the receiver waiting for it).
    Connecting,
    /// Attached: messages flow.
    Up,
    /// The TCP connection broke; the sender is reconnecting (the receiver waits for it).
    Reconnecting,
    /// For good: the peer is gone, closed the link, or kept refusing.
    Gone(Error),
}

const S_CONNECTING: u8 = 0;
const S_UP: u8 = 1;
const S_RECONNECTING: u8 = 2;
const S_GONE: u8 = 3;

/// Counts of what a hub turned away, by [`Reject`] kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rejections([u64; Reject::ALL.len()]);

impl Rejections {
    /// How many of `kind`.
    pub fn get(&self, kind: Reject) -> u64 {
        self.0[kind.index()]
    }
    /// All kinds together.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

struct LinkShared {
    /// The hub's key of the link.
    id: u64,
    conn_id: u32,
    secret: u64,
    dir_out: Dir,
    /// The peer's address, once known (the sender knows it from the start).
    peer: Mutex<Option<SocketAddr>>,
    /// Messages the application queued: (type, body, replaceable: see `Link::send_lazy`).
    outq: Mutex<VecDeque<(u16, Vec<u8>, bool)>>,
    /// Messages queued or sent and not acknowledged.
    pending: AtomicUsize,
    inbox: Mutex<VecDeque<(u16, Vec<u8>)>>,
    inbox_len: AtomicUsize,
    state_tag: AtomicU8,
    gone: Mutex<Option<Error>>,
    dropped: AtomicBool,
    break_req: AtomicBool,
    attaches: AtomicU64,
    /// Answers some messages on the links' thread as they arrive (see [`Link::set_handler`]).
    handler: Mutex<Option<Handler>>,
    /// Its end logged at debug level, not as a WARN (an idle link nobody uses).
    quiet: AtomicBool,
}

/// What a link's handler did with a message.
pub enum Handled {
    /// Not its business: the message goes to the inbox.
    No,
    /// Taken.
    Yes,
    /// Taken, and this answer (type, body) goes back to the peer.
    Reply(u16, Vec<u8>),
}

/// A handler of a link's incoming messages, called on the links' thread (or a caller reading
/// the socket) with the links' state locked: it must not block, nor wait for a link.
pub type Handler = Box<dyn FnMut(u16, &[u8]) -> Handled + Send>;

impl LinkShared {
    fn peer_name(&self) -> String {
        lock(&self.peer).map_or_else(|| "(not attached yet)".to_string(), |a| a.to_string())
    }
    fn set_state(&self, tag: u8) {
        if self.state_tag.load(Ordering::Acquire) != S_GONE {
            self.state_tag.store(tag, Ordering::Release);
        }
    }
}

struct HubInner {
    cfg: LinkConfig,
    waker: Waker,
    cmds: Mutex<Vec<Cmd>>,
    counts: [AtomicU64; Reject::ALL.len()],
    links: AtomicUsize,
    expected: Mutex<HashSet<u32>>,
    stop: AtomicBool,
    /// Close everything without a word, as a process that exits does (tests).
    vanish: AtomicBool,
    next_id: AtomicU64,
    /// The thread looks at the queued messages again without a wake (it is in a round, or
    /// polling after traffic); false just before it sleeps.
    awake: AtomicBool,
    /// A message was queued since the thread last took the queued messages.
    queued: AtomicBool,
    /// Wake-ups of the thread so far (tests).
    wakes: AtomicU64,
}

impl HubInner {
    fn wake(&self) {
        self.wakes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.waker.wake() {
            log::warn!("control links: waking the I/O thread failed: {e}");
        }
    }

    /// A message was queued: wakes the thread only if it sleeps. (The thread clears `awake`
    /// before it checks `queued` and sleeps; this sets `queued` before it checks `awake`: one of
    /// the two sees the other.)
    fn nudge(&self) {
        self.queued.store(true, Ordering::SeqCst);
        if !self.awake.load(Ordering::SeqCst) {
            self.wake();
        }
    }
    fn count(&self, kind: Reject) {
        self.counts[kind.index()].fetch_add(1, Ordering::Relaxed);
    }
}

enum Cmd {
    Add(u64, Arc<LinkShared>, Option<SocketAddr>),
    Adopt(std::net::TcpStream),
}

struct HubOwner {
    inner: Arc<HubInner>,
    listen_addr: Option<SocketAddr>,
    /// The sockets and the links' I/O state.
    state: Arc<Mutex<Reactor>>,
}

impl Drop for HubOwner {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.wake();
    }
}

/// The links of one process and the thread that moves their bytes.
#[derive(Clone)]
pub struct Hub(Arc<HubOwner>);

/// One end of a control link. Dropping it closes the link (the peer sees it gone).
pub struct Link {
    shared: Arc<LinkShared>,
    hub: Hub,
}

impl Hub {
    /// Starts a hub and its I/O thread; with `listen`, also a listener of its own on that
    /// address (an ephemeral port). Receivers are reached through it or through the control
    /// service's port ([`Hub::adopt`]).
    pub fn start(cfg: LinkConfig, listen: Option<IpAddr>) -> Result<Hub> {
        let poll = Poll::new().map_err(|e| Error::io("control links: creating the poll", e))?;
        let waker =
            Waker::new(poll.registry(), WAKER).map_err(|e| Error::io("control links: creating the waker", e))?;
        let listener = match listen {
            None => None,
            Some(ip) => {
                let mut l = TcpListener::bind(SocketAddr::new(ip, 0))
                    .map_err(|e| Error::io(format!("control links: listening on {ip} (NCCL_TCPXSHIM_CTRL_ADDR)"), e))?;
                poll.registry()
                    .register(&mut l, LISTENER, Interest::READABLE)
                    .map_err(|e| Error::io("control links: registering the listener", e))?;
                Some(l)
            }
        };
        let listen_addr = match &listener {
            None => None,
            Some(l) => Some(
                l.local_addr()
                    .map_err(|e| Error::io("control links: local address", e))?,
            ),
        };
        let inner = Arc::new(HubInner {
            cfg,
            waker,
            cmds: Mutex::new(Vec::new()),
            counts: Default::default(),
            links: AtomicUsize::new(0),
            expected: Mutex::new(HashSet::new()),
            stop: AtomicBool::new(false),
            vanish: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            awake: AtomicBool::new(false),
            queued: AtomicBool::new(false),
            wakes: AtomicU64::new(0),
        });
        let registry = poll
            .registry()
            .try_clone()
            .map_err(|e| Error::io("control links: the poll's registry", e))?;
        let reactor = Reactor {
            registry,
            listener,
            inner: inner.clone(),
            links: HashMap::new(),
            by_conn: HashMap::new(),
            socks: HashMap::new(),
            next_token: FIRST_SOCK,
            rbuf: vec![0u8; 64 * 1024],
            more: false,
            traffic: false,
        };
        let state = Arc::new(Mutex::new(reactor));
        let (st, hub) = (state.clone(), inner.clone());
        std::thread::Builder::new()
            .name("tcpxshim-link".into())
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(poll, &st, &hub)));
                if r.is_err() {
                    log::error!("control links: the I/O thread panicked; every link of the process is gone");
                    lock(&st).fail_all("the control links' I/O thread panicked");
                }
            })
            .map_err(|e| Error::io("control links: starting the tcpxshim-link thread", e))?;
        Ok(Hub(Arc::new(HubOwner {
            inner,
            listen_addr,
            state,
        })))
    }

    /// The hub's own listener, if it has one.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.0.listen_addr
    }

    /// What the hub has turned away so far.
    pub fn rejections(&self) -> Rejections {
        let mut r = Rejections::default();
        for (i, c) in self.0.inner.counts.iter().enumerate() {
            r.0[i] = c.load(Ordering::Relaxed);
        }
        r
    }

    /// Hands the hub a socket accepted elsewhere (the control service, whose first bytes were
    /// a link frame's magic); it must attach within the attach timeout.
    pub fn adopt(&self, stream: std::net::TcpStream) {
        lock(&self.0.inner.cmds).push(Cmd::Adopt(stream));
        self.0.inner.wake();
    }

    fn add(&self, conn_id: u32, secret: u64, dir_out: Dir, connect_to: Option<SocketAddr>) -> Result<Link> {
        let inner = &self.0.inner;
        if inner.links.fetch_add(1, Ordering::AcqRel) >= inner.cfg.max_links {
            inner.links.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::invalid_usage(format!(
                "control link {conn_id}: this process already holds {} links, the most it may",
                inner.cfg.max_links
            )));
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(LinkShared {
            id,
            conn_id,
            secret,
            dir_out,
            peer: Mutex::new(connect_to),
            outq: Mutex::new(VecDeque::new()),
            pending: AtomicUsize::new(0),
            inbox: Mutex::new(VecDeque::new()),
            inbox_len: AtomicUsize::new(0),
            state_tag: AtomicU8::new(S_CONNECTING),
            gone: Mutex::new(None),
            dropped: AtomicBool::new(false),
            break_req: AtomicBool::new(false),
            attaches: AtomicU64::new(0),
            handler: Mutex::new(None),
            quiet: AtomicBool::new(false),
        });
        lock(&inner.cmds).push(Cmd::Add(id, shared.clone(), connect_to));
        // A sender's connect starts now. A receiver's link needs the thread only once its sender
        // attaches, and that wakes the thread, which takes the new links before the sockets.
        if connect_to.is_some() {
            inner.wake();
        }
        Ok(Link {
            shared,
            hub: self.clone(),
        })
    }

    /// Receiver side: the link the sender of connection `conn_id` will attach to with
    /// `secret`. Up once it has.
    pub fn expect(&self, conn_id: u32, secret: u64) -> Result<Link> {
        if !lock(&self.0.inner.expected).insert(conn_id) {
            return Err(Error::invalid_usage(format!(
                "control link {conn_id}: a link under that connection id is already expected"
            )));
        }
        self.add(conn_id, secret, Dir::ToConnector, None).inspect_err(|_| {
            lock(&self.0.inner.expected).remove(&conn_id);
        })
    }

    /// Sender side: a link to the receiver's control service at `addr`, for connection
    /// `conn_id` with `secret` (both from the handle). Connects in the background.
    pub fn connect(&self, addr: SocketAddr, conn_id: u32, secret: u64) -> Result<Link> {
        self.add(conn_id, secret, Dir::ToListener, Some(addr))
    }

    /// Wake-ups of the hub's thread so far (tests).
    #[doc(hidden)]
    pub fn wakes(&self) -> u64 {
        self.0.inner.wakes.load(Ordering::Relaxed)
    }

    /// Closes every socket and the listener without a word to the peers, as a process that
    /// exits does, and stops the thread (tests).
    #[doc(hidden)]
    pub fn vanish(&self) {
        self.0.inner.vanish.store(true, Ordering::Release);
        self.0.inner.stop.store(true, Ordering::Release);
        self.0.inner.wake();
    }
}

/// The process's hub, started with `cfg` when first needed (later calls get the same hub).
pub fn global(cfg: &LinkConfig) -> Result<Hub> {
    static HUB: OnceLock<std::result::Result<Hub, String>> = OnceLock::new();
    HUB.get_or_init(|| Hub::start(cfg.clone(), None).map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| Error::system(format!("control links: {e}")))
}

/// Whether the first bytes waiting on `stream` are a link frame's magic (waits for them up to
/// the stream's read timeout).
pub fn is_link_stream(stream: &std::net::TcpStream) -> bool {
    let mut b = [0u8; 4];
    let deadline = Instant::now() + ATTACH_PEEK;
    loop {
        match stream.peek(&mut b) {
            Ok(n) if n >= 4 => return u32::from_le_bytes(b) == MAGIC,
            Ok(0) | Err(_) => return false,
            Ok(n) if b[..n] != MAGIC.to_le_bytes()[..n] => return false,
            Ok(_) if Instant::now() >= deadline => return false,
            Ok(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

const ATTACH_PEEK: Duration = Duration::from_secs(5);

impl Link {
    /// Sender side over the process's hub (see [`Hub::connect`]).
    pub fn connect(cfg: &LinkConfig, addr: SocketAddr, conn_id: u32, secret: u64) -> Result<Link> {
        global(cfg)?.connect(addr, conn_id, secret)
    }

    /// The connection id.
    pub fn conn_id(&self) -> u32 {
        self.shared.conn_id
    }

    /// Queues a message for the peer; never blocks. Fails when the link is gone, the body is
    /// over [`MAX_BODY`], or [`LinkConfig::queue`] messages are already waiting for the peer's
    /// acknowledgement.
    pub fn send(&self, msg_type: u16, body: &[u8]) -> Result<()> {
        self.queue(msg_type, body, false)?;
        // Written here when the state is free and the link up; else by the thread.
        let pushed = self
            .hub
            .0
            .state
            .try_lock()
            .is_ok_and(|mut st| st.push_link(self.shared.id));
        if !pushed {
            self.hub.0.inner.nudge();
        }
        Ok(())
    }

    /// Queues a message that nobody waits for, without waking the link's thread: it goes out
    /// with the next message sent, or the thread's next round (within 50 ms). While it is still
    /// queued, the next `send_lazy` of the same type replaces it, so it suits messages that a
    /// later one makes redundant (cumulative acknowledgements). Messages keep their order.
    pub fn send_lazy(&self, msg_type: u16, body: &[u8]) -> Result<()> {
        if let LinkState::Gone(e) = self.state() {
            return Err(e.context(format!("control link {}: send", self.shared.conn_id)));
        }
        {
            let mut q = lock(&self.shared.outq);
            if let Some((ty, b, true)) = q.back_mut() {
                if *ty == msg_type && body.len() <= MAX_BODY {
                    b.clear();
                    b.extend_from_slice(body);
                    return Ok(());
                }
            }
        }
        self.queue(msg_type, body, true)
    }

    fn queue(&self, msg_type: u16, body: &[u8], replaceable: bool) -> Result<()> {
        let s = &self.shared;
        if let LinkState::Gone(e) = self.state() {
            return Err(e.context(format!("control link {}: send", s.conn_id)));
        }
        if body.len() > MAX_BODY {
            return Err(Error::invalid_argument(format!(
                "control link {}: a message of {} bytes is over the {MAX_BODY}-byte limit",
                s.conn_id,
                body.len()
            )));
        }
        let cap = self.hub.0.inner.cfg.queue;
        if s.pending.fetch_add(1, Ordering::AcqRel) >= cap {
            s.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::invalid_usage(format!(
                "control link {} with {}: {cap} messages already wait for the peer's acknowledgement",
                s.conn_id,
                s.peer_name()
            )));
        }
        lock(&s.outq).push_back((msg_type, body.to_vec(), replaceable));
        Ok(())
    }

    /// The next message from the peer, if one is there: an atomic load when none is.
    pub fn try_recv(&self) -> Option<(u16, Vec<u8>)> {
        let s = &self.shared;
        if s.inbox_len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let m = lock(&s.inbox).pop_front()?;
        if s.inbox_len.fetch_sub(1, Ordering::AcqRel) >= self.hub.0.inner.cfg.queue {
            // Reading stopped at a full inbox: let the thread go on.
            self.hub.0.inner.wake();
        }
        Some(m)
    }

    /// The next message from the peer, reading the link's socket here first when none is
    /// waiting and the links' state is free (for a caller waiting on an answer: a system call,
    /// where [`Link::try_recv`] is an atomic load).
    pub fn recv_now(&self) -> Option<(u16, Vec<u8>)> {
        if let Some(m) = self.try_recv() {
            return Some(m);
        }
        let more = match self.hub.0.state.try_lock() {
            Ok(mut st) => st.pull_link(self.shared.id),
            Err(_) => false,
        };
        if more {
            self.hub.0.inner.wake();
        }
        self.try_recv()
    }

    /// Has `handler` look at each message from the peer as it arrives, before the inbox (for
    /// requests that must be answered while nobody calls in: the pool's claims); `None` removes it.
    pub fn set_handler(&self, handler: Option<Handler>) {
        *lock(&self.shared.handler) = handler;
    }

    /// Whether the link's end is worth a WARN (false: logged at debug level; an idle link kept
    /// for later whose peer went away is no news).
    pub fn set_quiet(&self, quiet: bool) {
        self.shared.quiet.store(quiet, Ordering::Release);
    }

    /// Where the link stands.
    pub fn state(&self) -> LinkState {
        match self.shared.state_tag.load(Ordering::Acquire) {
            S_CONNECTING => LinkState::Connecting,
            S_UP => LinkState::Up,
            S_RECONNECTING => LinkState::Reconnecting,
            _ => LinkState::Gone(
                lock(&self.shared.gone)
                    .clone()
                    .unwrap_or_else(|| Error::internal("control link gone without a reason")),
            ),
        }
    }

    /// How many times the link has been attached (1 once up; one more per reconnect).
    pub fn attaches(&self) -> u64 {
        self.shared.attaches.load(Ordering::Acquire)
    }

    /// Shuts the link's current TCP connection down both ways (`shutdown(2)`), as a network
    /// failure would; the link reconnects (tests). Applies to the next connection if there is
    /// none right now.
    #[doc(hidden)]
    pub fn break_socket(&self) {
        self.shared.break_req.store(true, Ordering::Release);
        self.hub.0.inner.wake();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.dropped.store(true, Ordering::Release);
        // A link never attached has nobody to tell: the thread forgets it in its next round.
        if self.shared.attaches.load(Ordering::Acquire) > 0 || self.shared.dir_out == Dir::ToListener {
            self.hub.0.inner.wake();
        }
    }
}

const WAKER: Token = Token(0);
const LISTENER: Token = Token(1);
const FIRST_SOCK: usize = 2;
/// Bytes buffered for writing on one socket before no more messages are framed for it.
const WBUF_HIGH: usize = 64 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    Unattached,
    Link(u64),
}

struct Sock {
    stream: TcpStream,
    peer: SocketAddr,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    owner: Owner,
    since: Instant,
    /// The sender's connect is in progress.
    connecting: bool,
    /// Readable and not yet read to `WouldBlock`.
    readable: bool,
    /// Read to its end, or failed: close it.
    dead: Option<String>,
}

struct Msg {
    seq: u64,
    ty: u16,
    body: Vec<u8>,
}

struct LinkIo {
    shared: Arc<LinkShared>,
    connect_to: Option<SocketAddr>,
    sock: Option<Token>,
    /// The current socket finished its handshake.
    up: bool,
    tx_counter: u64,
    rx_counter: u64,
    next_seq: u64,
    unacked: VecDeque<Msg>,
    next_write: u64,
    max_written: u64,
    rx_seq: u64,
    ack_sent: u64,
    last_heard: Instant,
    last_sent: Instant,
    retry_at: Option<Instant>,
    backoff: Duration,
    refusals: u32,
    ever_up: bool,
    gone: bool,
}

impl LinkIo {
    fn is_sender(&self) -> bool {
        self.connect_to.is_some()
    }
    fn key(&self) -> Key {
        let dir = match self.shared.dir_out {
            Dir::ToListener => Dir::ToConnector,
            Dir::ToConnector => Dir::ToListener,
        };
        Key {
            secret: self.shared.secret,
            dir,
            last_counter: self.rx_counter,
        }
    }
    fn frame(&mut self, kind: Kind, seq: u64, msg_type: u16, body: Vec<u8>, out: &mut Vec<u8>) {
        self.tx_counter += 1;
        let f = Frame {
            kind,
            conn_id: self.shared.conn_id,
            counter: self.tx_counter,
            seq,
            ack: self.rx_seq,
            msg_type,
            body,
        };
        f.encode_into(self.shared.secret, self.shared.dir_out, out);
        self.ack_sent = self.rx_seq;
        self.last_sent = Instant::now();
    }
    /// Takes the messages the application queued into the ones to send; whether there were any.
    fn take_queued(&mut self) -> bool {
        let mut q = lock(&self.shared.outq);
        let any = !q.is_empty();
        while let Some((ty, body, _)) = q.pop_front() {
            self.next_seq += 1;
            self.unacked.push_back(Msg {
                seq: self.next_seq,
                ty,
                body,
            });
        }
        any
    }

    /// Frames the messages not yet written on the link's socket `s` into its buffer, and an Ack
    /// (messages received since the last frame) or, with `heartbeat`, a Heartbeat when nothing
    /// was sent for that long.
    fn write_unsent(&mut self, s: &mut Sock, now: Instant, heartbeat: Option<Duration>) {
        let mut out = std::mem::take(&mut s.wbuf);
        while out.len() < WBUF_HIGH {
            let Some(first) = self.unacked.front().map(|m| m.seq) else {
                break;
            };
            let i = self.next_write.saturating_sub(first) as usize;
            let Some(m) = self.unacked.get(i) else { break };
            let (seq, ty, body) = (m.seq, m.ty, m.body.clone());
            self.frame(Kind::Data, seq, ty, body, &mut out);
            self.next_write = seq + 1;
            self.max_written = self.max_written.max(seq);
        }
        let beat = heartbeat.is_some_and(|h| now.duration_since(self.last_sent) >= h);
        if self.rx_seq > self.ack_sent || beat {
            let kind = if self.rx_seq > self.ack_sent {
                Kind::Ack
            } else {
                Kind::Heartbeat
            };
            self.frame(kind, 0, 0, Vec::new(), &mut out);
        }
        s.wbuf = out;
    }

    /// Drops the messages the peer acknowledged; `false` for an ack of messages never sent.
    fn take_ack(&mut self, ack: u64) -> bool {
        if ack > self.max_written {
            return false;
        }
        let mut n = 0;
        while self.unacked.front().is_some_and(|m| m.seq <= ack) {
            self.unacked.pop_front();
            n += 1;
        }
        if n > 0 {
            self.shared.pending.fetch_sub(n, Ordering::AcqRel);
        }
        self.next_write = self.next_write.max(ack + 1);
        true
    }
    fn go(&mut self, err: Error) {
        self.go_logged(err, log::Level::Warn);
    }

    /// As [`LinkIo::go`], logged at `level` (a link the peer closed on purpose is no news: its
    /// comm closed, and whoever still uses this side hears of it from the link's state).
    fn go_logged(&mut self, err: Error, level: log::Level) {
        if self.gone {
            return;
        }
        self.gone = true;
        let level = if self.shared.quiet.load(Ordering::Acquire) {
            log::Level::Debug
        } else {
            level
        };
        log::log!(level, "{err}");
        *lock(&self.shared.gone) = Some(err);
        self.shared.state_tag.store(S_GONE, Ordering::Release);
    }
}

/// The links' I/O state: the thread works it in rounds, and callers may do a link's part of a
/// round themselves (see the module's Threads section).
struct Reactor {
    registry: Registry,
    listener: Option<TcpListener>,
    inner: Arc<HubInner>,
    links: HashMap<u64, LinkIo>,
    by_conn: HashMap<u32, u64>,
    socks: HashMap<Token, Sock>,
    next_token: usize,
    rbuf: Vec<u8>,
    /// A socket has more to read than one round takes.
    more: bool,
    /// A message was queued or delivered in this round.
    traffic: bool,
}

fn reject(inner: &HubInner, kind: Reject, peer: SocketAddr, what: &str) {
    inner.count(kind);
    log::warn!("control links: turned away the client at {peer}: {kind:?} ({what})");
}

/// The thread: waits for events, then works a round with the state locked.
fn run(mut poll: Poll, state: &Mutex<Reactor>, inner: &HubInner) {
    let mut events = Events::with_capacity(256);
    let (mut more, mut spin_until) = (false, None::<Instant>);
    while !inner.stop.load(Ordering::Acquire) {
        let spinning = spin_until.is_some_and(|t| Instant::now() < t);
        let mut wait = if more || spinning { Duration::ZERO } else { TICK };
        if wait > Duration::ZERO {
            inner.awake.store(false, Ordering::SeqCst);
            if inner.queued.load(Ordering::SeqCst) {
                wait = Duration::ZERO; // queued after the last round took the queue
            }
        } else if spinning {
            std::hint::spin_loop();
        }
        if let Err(e) = poll.poll(&mut events, Some(wait)) {
            if e.kind() != IoKind::Interrupted {
                log::error!("control links: poll failed: {e}");
                std::thread::sleep(TICK);
            }
            continue;
        }
        inner.awake.store(true, Ordering::SeqCst);
        let mut st = lock(state);
        st.take_cmds();
        for ev in events.iter() {
            match ev.token() {
                WAKER => {}
                LISTENER => st.accept(),
                t => {
                    if let Some(s) = st.socks.get_mut(&t) {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            s.readable = true;
                        }
                        if s.connecting && (ev.is_writable() || ev.is_error() || ev.is_write_closed()) {
                            st.finish_connect(t);
                        }
                    }
                }
            }
        }
        st.traffic = false;
        st.more = false;
        st.read_all();
        // Cleared before the queues are taken: a message queued after this wakes or is seen.
        inner.queued.store(false, Ordering::SeqCst);
        st.service_links();
        st.expire_unattached();
        st.reap_socks();
        more = st.more;
        let spin = inner.cfg.spin;
        if st.traffic && !spin.is_zero() {
            spin_until = Some(Instant::now() + spin);
        }
    }
    let mut st = lock(state);
    if inner.vanish.load(Ordering::Acquire) {
        st.fail_all("the process's control links were shut down");
    } else {
        st.fail_all("the process's control links were stopped");
    }
}

impl Reactor {
    /// A caller's part of a round for link `id`: its queued messages framed and written onto its
    /// socket. Whether that was done (false: the link is not up, or the socket could not take
    /// them all; the thread must do it).
    fn push_link(&mut self, id: u64) -> bool {
        self.take_cmds();
        let Some(l) = self.links.get_mut(&id) else { return false };
        if l.gone || !l.up {
            return false;
        }
        let Some(s) = l.sock.and_then(|t| self.socks.get_mut(&t)) else {
            return false;
        };
        if s.connecting || s.dead.is_some() {
            return false;
        }
        l.take_queued();
        l.write_unsent(s, Instant::now(), None);
        flush(s);
        s.dead.is_none() && s.wbuf.is_empty()
    }

    /// A caller's read of link `id`'s socket: the frames that came are handled as the thread
    /// would. Whether the thread must go on with it (more to read than one round takes).
    fn pull_link(&mut self, id: u64) -> bool {
        self.take_cmds();
        let Some(l) = self.links.get(&id) else { return false };
        let Some(t) = l.sock.filter(|_| l.up && !l.gone) else {
            return false;
        };
        if !self.socks.get(&t).is_some_and(|s| !s.connecting && s.dead.is_none()) {
            return false;
        }
        self.more = false;
        self.read_sock(t);
        self.more
    }

    fn fail_all(&mut self, why: &str) {
        for l in self.links.values_mut() {
            let e = Error::connection_lost(format!(
                "control link {} with {}: {why}",
                l.shared.conn_id,
                l.shared.peer_name()
            ));
            l.go(e);
        }
        for (_, mut s) in self.socks.drain() {
            let _ = self.registry.deregister(&mut s.stream);
        }
        self.listener = None;
    }

    fn token(&mut self) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        t
    }

    fn add_sock(&mut self, mut stream: TcpStream, peer: SocketAddr, owner: Owner, connecting: bool) -> Option<Token> {
        let t = self.token();
        let _ = stream.set_nodelay(true);
        if let Err(e) = self
            .registry
            .register(&mut stream, t, Interest::READABLE | Interest::WRITABLE)
        {
            log::warn!("control links: registering a socket with {peer} failed: {e}");
            return None;
        }
        self.socks.insert(
            t,
            Sock {
                stream,
                peer,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                wpos: 0,
                owner,
                since: Instant::now(),
                connecting,
                readable: true,
                dead: None,
            },
        );
        Some(t)
    }

    fn unattached(&self) -> usize {
        self.socks.values().filter(|s| s.owner == Owner::Unattached).count()
    }

    fn take_unattached(&mut self, stream: TcpStream, peer: SocketAddr) {
        if self.unattached() >= self.inner.cfg.max_unattached {
            reject(&self.inner, Reject::Busy, peer, "too many clients not attached yet");
            return;
        }
        self.add_sock(stream, peer, Owner::Unattached, false);
    }

    fn accept(&mut self) {
        // Bounded: at most this many accepts per wake-up (edge-triggered: the rest come next time
        // round, as the listener stays readable).
        for _ in 0..256 {
            let Some(l) = &self.listener else { return };
            match l.accept() {
                Ok((stream, peer)) => self.take_unattached(stream, peer),
                Err(e) if e.kind() == IoKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("control links: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn take_cmds(&mut self) {
        let cmds = std::mem::take(&mut *lock(&self.inner.cmds));
        for c in cmds {
            match c {
                Cmd::Add(id, shared, connect_to) => {
                    if connect_to.is_none() {
                        self.by_conn.insert(shared.conn_id, id);
                    }
                    let now = Instant::now();
                    self.links.insert(
                        id,
                        LinkIo {
                            shared,
                            connect_to,
                            sock: None,
                            up: false,
                            tx_counter: 0,
                            rx_counter: 0,
                            next_seq: 0,
                            unacked: VecDeque::new(),
                            next_write: 1,
                            max_written: 0,
                            rx_seq: 0,
                            ack_sent: 0,
                            last_heard: now,
                            last_sent: now,
                            retry_at: connect_to.map(|_| now),
                            backoff: BACKOFF_MIN,
                            refusals: 0,
                            ever_up: false,
                            gone: false,
                        },
                    );
                }
                Cmd::Adopt(std) => {
                    let Ok(peer) = std.peer_addr() else { continue };
                    if std.set_nonblocking(true).is_err() {
                        continue;
                    }
                    self.take_unattached(TcpStream::from_std(std), peer);
                }
            }
        }
    }

    fn finish_connect(&mut self, t: Token) {
        let Some(s) = self.socks.get_mut(&t) else { return };
        let err = match s.stream.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => match s.stream.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == IoKind::NotConnected => return,
                Err(e) => Some(e),
            },
        };
        s.connecting = false;
        let Owner::Link(id) = s.owner else { return };
        match err {
            Some(e) => {
                s.dead = Some(format!("connect: {e}"));
                if let Some(l) = self.links.get_mut(&id) {
                    l.sock = None;
                    let refused = e.kind() == IoKind::ConnectionRefused;
                    Self::attempt_failed(&self.inner.cfg, l, &e.to_string(), refused);
                }
            }
            None => {
                if let Some(l) = self.links.get_mut(&id) {
                    let mut out = std::mem::take(&mut s.wbuf);
                    l.frame(Kind::Attach, 0, 0, Vec::new(), &mut out);
                    s.wbuf = out;
                }
            }
        }
    }

    /// A sender's connect or attach did not work: back off, or give up after enough refusals.
    fn attempt_failed(cfg: &LinkConfig, l: &mut LinkIo, why: &str, refused: bool) {
        l.up = false;
        if refused {
            l.refusals += 1;
        }
        let addr = l.connect_to.map_or_else(String::new, |a| a.to_string());
        if l.refusals >= cfg.refusals {
            l.go(Error::new(
                ErrorKind::Refused,
                format!(
                    "control link {} to the listening process's control service at {addr}: refused {} times in a \
                     row (last: {why}); the peer process has exited or closed its connection (NCCL_TCPXSHIM_PEER_TIMEOUT \
                     bounds how long a silent peer is waited for)",
                    l.shared.conn_id, l.refusals
                ),
            ));
            return;
        }
        l.retry_at = Some(Instant::now() + l.backoff);
        l.backoff = (l.backoff * 2).min(BACKOFF_MAX);
        l.shared
            .set_state(if l.ever_up { S_RECONNECTING } else { S_CONNECTING });
    }

    fn read_all(&mut self) {
        let tokens: Vec<Token> = self
            .socks
            .iter()
            .filter(|(_, s)| s.readable && !s.connecting && s.dead.is_none())
            .map(|(t, _)| *t)
            .collect();
        for t in tokens {
            self.read_sock(t);
        }
    }

    fn read_sock(&mut self, t: Token) {
        // Bounded: a socket is read for at most this many buffers per round.
        for _ in 0..64 {
            let Some(s) = self.socks.get_mut(&t) else { return };
            if s.dead.is_some() {
                return;
            }
            if let Owner::Link(id) = s.owner {
                let full = self
                    .links
                    .get(&id)
                    .is_some_and(|l| l.shared.inbox_len.load(Ordering::Acquire) >= self.inner.cfg.queue);
                if full {
                    return;
                }
            }
            match s.stream.read(&mut self.rbuf) {
                Ok(0) => {
                    s.dead = Some("end of stream".into());
                    s.readable = false;
                    if s.owner == Owner::Unattached && !s.rbuf.is_empty() {
                        reject(
                            &self.inner,
                            Reject::Truncated,
                            s.peer,
                            "closed in the middle of a frame",
                        );
                    }
                    return;
                }
                Ok(n) => {
                    s.rbuf.extend_from_slice(&self.rbuf[..n]);
                    self.parse(t);
                }
                Err(e) if e.kind() == IoKind::WouldBlock => {
                    s.readable = false;
                    return;
                }
                Err(e) if e.kind() == IoKind::Interrupted => {}
                Err(e) => {
                    s.dead = Some(e.to_string());
                    s.readable = false;
                    return;
                }
            }
        }
        self.more = true;
    }

    /// Decodes and handles the whole frames in a socket's read buffer.
    fn parse(&mut self, t: Token) {
        let mut used_total = 0;
        // Bounded by the buffer: every round consumes a frame or stops.
        loop {
            let Some(s) = self.socks.get_mut(&t) else { return };
            if s.dead.is_some() {
                return;
            }
            let buf = &s.rbuf[used_total..];
            if buf.is_empty() {
                break;
            }
            let owner = s.owner;
            let peer = s.peer;
            let decoded = match owner {
                Owner::Unattached => {
                    let (links, by_conn) = (&self.links, &self.by_conn);
                    Frame::decode(buf, |c| {
                        by_conn
                            .get(&c)
                            .and_then(|id| links.get(id))
                            .filter(|l| !l.gone)
                            .map(|l| l.key())
                    })
                }
                Owner::Link(id) => {
                    let Some(l) = self.links.get(&id) else {
                        s.dead = Some("link closed".into());
                        return;
                    };
                    let (conn, key) = (l.shared.conn_id, l.key());
                    Frame::decode(buf, |c| (c == conn).then_some(key))
                }
            };
            match decoded {
                Err(Reject::Truncated) => break,
                Err(kind) => {
                    s.dead = Some(format!("{kind:?}"));
                    reject(&self.inner, kind, peer, "bad frame");
                    if let Owner::Link(id) = owner {
                        self.lose_sock(id, t, &format!("a bad frame ({kind:?})"));
                    }
                    return;
                }
                Ok((frame, used)) => {
                    used_total += used;
                    match owner {
                        Owner::Unattached => self.attach(t, frame),
                        Owner::Link(id) => self.on_frame(id, t, frame),
                    }
                }
            }
        }
        if let Some(s) = self.socks.get_mut(&t) {
            s.rbuf.drain(..used_total.min(s.rbuf.len()));
        }
    }

    /// Receiver: the first frame of an unattached socket.
    fn attach(&mut self, t: Token, frame: Frame) {
        let Some(s) = self.socks.get_mut(&t) else { return };
        let peer = s.peer;
        let id = self.by_conn.get(&frame.conn_id).copied();
        let Some(l) = id.and_then(|id| self.links.get_mut(&id)) else {
            return;
        };
        if frame.kind != Kind::Attach {
            s.dead = Some("first frame not an attach".into());
            reject(
                &self.inner,
                Reject::NotAttached,
                peer,
                "its first frame is not an Attach",
            );
            return;
        }
        l.rx_counter = frame.counter;
        if !l.take_ack(frame.ack) {
            s.dead = Some("ack of unsent messages".into());
            reject(
                &self.inner,
                Reject::Malformed,
                peer,
                "it acknowledges messages never sent",
            );
            return;
        }
        let id = id.unwrap_or_default();
        s.owner = Owner::Link(id);
        let old = l.sock.replace(t);
        l.up = true;
        l.ever_up = true;
        l.last_heard = Instant::now();
        l.next_write = frame.ack + 1;
        *lock(&l.shared.peer) = Some(peer);
        let mut out = std::mem::take(&mut s.wbuf);
        l.frame(Kind::AttachOk, 0, 0, Vec::new(), &mut out);
        s.wbuf = out;
        l.shared.attaches.fetch_add(1, Ordering::AcqRel);
        l.shared.set_state(S_UP);
        if let Some(old) = old.filter(|o| *o != t) {
            if let Some(o) = self.socks.get_mut(&old) {
                o.dead = Some("replaced by a new attach".into());
            }
        }
    }

    /// A frame on an attached (or attaching) link socket.
    fn on_frame(&mut self, id: u64, t: Token, frame: Frame) {
        let Some(l) = self.links.get_mut(&id) else { return };
        let Some(s) = self.socks.get_mut(&t) else { return };
        let peer = s.peer;
        l.rx_counter = frame.counter;
        l.last_heard = Instant::now();
        let bad = |s: &mut Sock, inner: &HubInner, kind: Reject, what: &str| {
            s.dead = Some(what.to_string());
            reject(inner, kind, peer, what);
        };
        if !l.up {
            // The sender waits for AttachOk and nothing else.
            if frame.kind != Kind::AttachOk || !l.take_ack(frame.ack) {
                bad(s, &self.inner, Reject::NotAttached, "expected AttachOk");
                return;
            }
            l.up = true;
            l.ever_up = true;
            l.next_write = frame.ack + 1;
            l.refusals = 0;
            l.backoff = BACKOFF_MIN;
            l.shared.attaches.fetch_add(1, Ordering::AcqRel);
            l.shared.set_state(S_UP);
            return;
        }
        if !l.take_ack(frame.ack) {
            bad(s, &self.inner, Reject::Malformed, "acknowledges messages never sent");
            return;
        }
        match frame.kind {
            Kind::Data => {
                if frame.seq <= l.rx_seq {
                    return; // Already delivered.
                }
                if frame.seq != l.rx_seq + 1 {
                    bad(s, &self.inner, Reject::OutOfOrder, "message sequence skips ahead");
                    return;
                }
                l.rx_seq = frame.seq;
                self.traffic = true;
                let handled = match lock(&l.shared.handler).as_mut() {
                    Some(h) => h(frame.msg_type, &frame.body),
                    None => Handled::No,
                };
                match handled {
                    Handled::No => {
                        lock(&l.shared.inbox).push_back((frame.msg_type, frame.body));
                        l.shared.inbox_len.fetch_add(1, Ordering::AcqRel);
                    }
                    Handled::Yes => {}
                    Handled::Reply(ty, body) => {
                        // Goes out with the thread's writes of this round (the links are serviced
                        // after reading) or, read by a caller, of the next.
                        l.shared.pending.fetch_add(1, Ordering::AcqRel);
                        lock(&l.shared.outq).push_back((ty, body, false));
                        self.inner.nudge();
                    }
                }
            }
            Kind::Ack | Kind::Heartbeat => {}
            Kind::Close => {
                s.dead = Some("closed by the peer".into());
                let e = Error::connection_lost(format!(
                    "control link {} with {peer}: the peer closed the link (its connection was closed)",
                    l.shared.conn_id
                ));
                l.go_logged(e, log::Level::Debug);
            }
            Kind::Attach | Kind::AttachOk => bad(s, &self.inner, Reject::NotAttached, "a second attach"),
        }
    }

    /// The link's socket broke or misbehaved: drop it; the sender reconnects.
    fn lose_sock(&mut self, id: u64, t: Token, why: &str) {
        let Some(l) = self.links.get_mut(&id) else { return };
        if l.sock != Some(t) {
            return;
        }
        l.sock = None;
        let was_up = l.up;
        l.up = false;
        if l.gone {
            return;
        }
        log::info!(
            "control link {} with {}: connection lost ({why}){}",
            l.shared.conn_id,
            l.shared.peer_name(),
            if l.is_sender() {
                "; reconnecting"
            } else {
                "; waiting for the peer to reconnect"
            }
        );
        if l.is_sender() {
            // A connection turned away before its AttachOk counts as a refusal.
            Self::attempt_failed(&self.inner.cfg, l, why, !was_up);
        } else {
            l.shared.set_state(S_RECONNECTING);
        }
    }

    fn service_links(&mut self) {
        let now = Instant::now();
        let cfg = self.inner.cfg.clone();
        // Several heartbeats per peer timeout, however short it is set.
        let heartbeat = cfg.heartbeat.min(cfg.peer_timeout / 4);
        let ids: Vec<u64> = self.links.keys().copied().collect();
        for id in ids {
            let Some(l) = self.links.get_mut(&id) else { continue };
            // Closed by the application: say so and forget it.
            if l.shared.dropped.load(Ordering::Acquire) {
                if let Some(s) = l.sock.and_then(|t| self.socks.get_mut(&t)) {
                    if l.up && !l.gone {
                        let mut out = std::mem::take(&mut s.wbuf);
                        l.frame(Kind::Close, 0, 0, Vec::new(), &mut out);
                        s.wbuf = out;
                        flush(s);
                    }
                    s.dead = Some("link closed".into());
                }
                if !l.is_sender() {
                    self.by_conn.remove(&l.shared.conn_id);
                    lock(&self.inner.expected).remove(&l.shared.conn_id);
                }
                self.links.remove(&id);
                self.inner.links.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            if l.gone {
                if let Some(s) = l.sock.take().and_then(|t| self.socks.get_mut(&t)) {
                    s.dead = Some("link gone".into());
                }
                continue;
            }
            // Sockets that ended.
            if let Some(t) = l.sock {
                let dead = self.socks.get(&t).map_or(Some("gone".to_string()), |s| s.dead.clone());
                if let Some(why) = dead {
                    self.lose_sock(id, t, &why);
                }
            }
            let Some(l) = self.links.get_mut(&id) else { continue };
            if l.gone {
                continue;
            }
            // Liveness.
            if (l.is_sender() || l.ever_up) && now.duration_since(l.last_heard) > cfg.peer_timeout {
                let paused = l.shared.inbox_len.load(Ordering::Acquire) >= cfg.queue;
                if paused {
                    l.last_heard = now;
                } else {
                    let e = Error::timeout(format!(
                        "control link {} with {}: nothing heard from the peer for {:?}: its process is gone or \
                         unreachable (NCCL_TCPXSHIM_PEER_TIMEOUT)",
                        l.shared.conn_id,
                        l.shared.peer_name(),
                        cfg.peer_timeout
                    ));
                    l.go(e);
                    continue;
                }
            }
            // New messages from the application.
            if l.take_queued() {
                self.traffic = true;
            }
            // Reconnect.
            if l.sock.is_none() && l.retry_at.is_some_and(|at| now >= at) {
                l.retry_at = None;
                let addr = l.connect_to.unwrap_or_else(|| unreachable!("only senders retry"));
                match TcpStream::connect(addr) {
                    Ok(stream) => {
                        let t = Token(self.next_token);
                        self.next_token += 1;
                        let mut stream = stream;
                        let _ = stream.set_nodelay(true);
                        match self
                            .registry
                            .register(&mut stream, t, Interest::READABLE | Interest::WRITABLE)
                        {
                            Ok(()) => {
                                self.socks.insert(
                                    t,
                                    Sock {
                                        stream,
                                        peer: addr,
                                        rbuf: Vec::new(),
                                        wbuf: Vec::new(),
                                        wpos: 0,
                                        owner: Owner::Link(id),
                                        since: now,
                                        connecting: true,
                                        readable: false,
                                        dead: None,
                                    },
                                );
                                l.sock = Some(t);
                            }
                            Err(e) => Self::attempt_failed(&cfg, l, &e.to_string(), false),
                        }
                    }
                    Err(e) => {
                        let refused = e.kind() == IoKind::ConnectionRefused;
                        Self::attempt_failed(&cfg, l, &e.to_string(), refused);
                    }
                }
                continue;
            }
            let Some(t) = l.sock else { continue };
            let Some(s) = self.socks.get_mut(&t) else { continue };
            if l.shared.break_req.load(Ordering::Acquire) && !s.connecting {
                l.shared.break_req.store(false, Ordering::Release);
                let _ = s.stream.shutdown(Shutdown::Both);
                s.readable = true;
                continue;
            }
            if !l.up || s.connecting {
                flush(s);
                continue;
            }
            l.write_unsent(s, now, Some(heartbeat));
            flush(s);
        }
    }

    fn expire_unattached(&mut self) {
        let now = Instant::now();
        for s in self.socks.values_mut() {
            if s.owner == Owner::Unattached
                && s.dead.is_none()
                && now.duration_since(s.since) > self.inner.cfg.attach_timeout
            {
                s.dead = Some("no attach in time".into());
                let kind = if s.rbuf.is_empty() {
                    Reject::Slow
                } else {
                    Reject::Truncated
                };
                reject(&self.inner, kind, s.peer, "no valid Attach within the attach timeout");
            }
        }
    }

    fn reap_socks(&mut self) {
        let dead: Vec<Token> = self
            .socks
            .iter()
            .filter(|(t, s)| {
                s.dead.is_some()
                    && !matches!(s.owner, Owner::Link(id) if self.links.get(&id).is_some_and(|l| l.sock == Some(**t)))
            })
            .map(|(t, _)| *t)
            .collect();
        for t in dead {
            if let Some(mut s) = self.socks.remove(&t) {
                let _ = self.registry.deregister(&mut s.stream);
            }
        }
    }
}

/// Writes what the socket has buffered, until the kernel takes no more.
fn flush(s: &mut Sock) {
    while s.wpos < s.wbuf.len() && s.dead.is_none() {
        match s.stream.write(&s.wbuf[s.wpos..]) {
            Ok(0) => s.dead = Some("write returned 0".into()),
            Ok(n) => s.wpos += n,
            Err(e) if e.kind() == IoKind::WouldBlock => break,
            Err(e) if e.kind() == IoKind::Interrupted => {}
            Err(e) => s.dead = Some(e.to_string()),
        }
    }
    if s.wpos == s.wbuf.len() {
        s.wbuf.clear();
        s.wpos = 0;
    } else if s.wpos > WBUF_HIGH {
        s.wbuf.drain(..s.wpos);
        s.wpos = 0;
    }
}

#[cfg(test)]
mod tests;
