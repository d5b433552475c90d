//! Two endpoints that find each other over a plain TCP bootstrap socket.
//!
//! The bootstrap ("control") connection carries a versioned hello with each side's 128-byte
//! transport handle; each side listens on the transport, connects to the other's handle and
//! accepts the other's connection, so both end up with a [`SendConn`] and a [`RecvConn`]. The
//! control connection then stays open for small framed messages (test plans, results, errors).

use super::conn::{secs, Backoff, Connector, Handle, Listener, RecvConn, SendConn};
use crate::error::{Error, Result};
use crate::ffi::HANDLE_SIZE;
use crate::transport::Transport;
use std::cell::RefCell;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// First bytes of every bootstrap connection.
pub const MAGIC: [u8; 8] = *b"tcpxshim";
/// Version of the bootstrap protocol.
pub const PROTOCOL_VERSION: u16 = 1;
const NAME_LEN: usize = 32;
const HOST_LEN: usize = 64;
/// Bytes of the hello: magic, version, length, device count, device, pid, transport name, host name, handle.
pub const HELLO_LEN: usize = 8 + 2 + 2 + 4 + 4 + 4 + NAME_LEN + HOST_LEN + HANDLE_SIZE;
/// Largest control message accepted.
const MAX_FRAME: usize = 1 << 20;

const FRAME_DATA: u8 = 1;
const FRAME_ERROR: u8 = 2;
const FRAME_READY: u8 = 3;

/// What a peer said about itself in its hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Address of its end of the bootstrap connection.
    pub addr: SocketAddr,
    /// Its host name.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// Its transport's name.
    pub transport: String,
    /// How many devices its transport has.
    pub ndev: i32,
    /// The device it uses.
    pub dev: i32,
}

impl std::fmt::Display for PeerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} pid {}, {} device {})",
            self.addr, self.host, self.pid, self.transport, self.dev
        )
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Appends `s` as a fixed field of `len` bytes: at most `len - 1` bytes of it (cut at a
/// character boundary, and before any NUL), then zeros.
fn put_str(out: &mut Vec<u8>, s: &str, len: usize) {
    let s = s.split('\0').next().unwrap_or_default();
    let mut n = s.len().min(len - 1);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    out.extend_from_slice(&s.as_bytes()[..n]);
    out.resize(out.len() + (len - n), 0);
}

/// A fixed string field: UTF-8 up to the first NUL, zeros after it (a NUL is required).
fn get_str(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0)?;
    if b[end..].iter().any(|&c| c != 0) {
        return None;
    }
    std::str::from_utf8(&b[..end]).ok().map(str::to_string)
}

/// The hello each side sends first on the bootstrap connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HelloMsg {
    /// Devices of the sender's transport.
    pub ndev: i32,
    /// The device it uses.
    pub dev: i32,
    /// Its process id.
    pub pid: u32,
    /// Its transport's name (at most 31 bytes travel).
    pub transport: String,
    /// Its host name (at most 63 bytes travel).
    pub host: String,
    /// Its transport's listen handle.
    pub handle: Handle,
}

/// Why bytes are not (the start of) a hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HelloFault {
    /// The magic is wrong: not a tcpxshim endpoint.
    NotOurs,
    /// A tcpxshim endpoint of another protocol version.
    Version {
        /// Its protocol version.
        version: u16,
        /// Its hello length.
        len: usize,
    },
    /// A field that this version would never send.
    Field(&'static str),
}

impl HelloMsg {
    fn new(net: &dyn Transport, ndev: i32, dev: i32, handle: &Handle) -> HelloMsg {
        HelloMsg {
            ndev,
            dev,
            pid: std::process::id(),
            transport: net.name().to_string(),
            host: host_name(),
            handle: *handle,
        }
    }

    /// The bytes on the wire ([`HELLO_LEN`]).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HELLO_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.extend_from_slice(&(HELLO_LEN as u16).to_le_bytes());
        out.extend_from_slice(&self.ndev.to_le_bytes());
        out.extend_from_slice(&self.dev.to_le_bytes());
        out.extend_from_slice(&self.pid.to_le_bytes());
        put_str(&mut out, &self.transport, NAME_LEN);
        put_str(&mut out, &self.host, HOST_LEN);
        out.extend_from_slice(&self.handle);
        debug_assert_eq!(out.len(), HELLO_LEN);
        out
    }

    /// Decodes the start of a bootstrap stream: `Ok(None)` while what arrived so far is a valid
    /// beginning of a hello (magic and version are checked as soon as their bytes are there),
    /// the hello once all of it is (bytes after it are not looked at).
    pub(crate) fn decode(b: &[u8]) -> std::result::Result<Option<HelloMsg>, HelloFault> {
        let n = b.len().min(MAGIC.len());
        if b[..n] != MAGIC[..n] {
            return Err(HelloFault::NotOurs);
        }
        if b.len() >= 12 {
            let version = u16::from_le_bytes([b[8], b[9]]);
            let len = u16::from_le_bytes([b[10], b[11]]) as usize;
            if version != PROTOCOL_VERSION || len != HELLO_LEN {
                return Err(HelloFault::Version { version, len });
            }
        }
        if b.len() < HELLO_LEN {
            return Ok(None);
        }
        let i32_at = |i: usize| i32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut off = 24;
        let transport = get_str(&b[off..off + NAME_LEN]).ok_or(HelloFault::Field("transport name"))?;
        off += NAME_LEN;
        let host = get_str(&b[off..off + HOST_LEN]).ok_or(HelloFault::Field("host name"))?;
        off += HOST_LEN;
        let mut handle = [0u8; HANDLE_SIZE];
        handle.copy_from_slice(&b[off..off + HANDLE_SIZE]);
        Ok(Some(HelloMsg {
            ndev: i32_at(12),
            dev: i32_at(16),
            pid: i32_at(20) as u32,
            transport,
            host,
            handle,
        }))
    }

    fn info(&self, addr: SocketAddr) -> PeerInfo {
        PeerInfo {
            addr,
            host: self.host.clone(),
            pid: self.pid,
            transport: self.transport.clone(),
            ndev: self.ndev,
            dev: self.dev,
        }
    }
}

/// Printable preview of bytes from a peer that is not a tcpxshim endpoint.
fn preview(b: &[u8]) -> String {
    let s: String = b
        .iter()
        .take(24)
        .map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { '.' })
        .collect();
    format!("{s:?}")
}

/// A control message after the hello: `kind u8, len u32 LE, payload`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A message for the caller.
    Data(Vec<u8>),
    /// The peer's transport connections stand.
    Ready,
    /// The peer failed, and says why.
    Error(Vec<u8>),
}

/// Why bytes are not a control message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameFault {
    /// Longer than [`MAX_FRAME`].
    TooLarge(usize),
    /// A type this version does not know.
    Kind(u8),
    /// A ready with a payload.
    ReadyPayload(usize),
}

impl Frame {
    /// The bytes on the wire.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let (kind, payload): (u8, &[u8]) = match self {
            Frame::Data(d) => (FRAME_DATA, d),
            Frame::Ready => (FRAME_READY, &[]),
            Frame::Error(e) => (FRAME_ERROR, e),
        };
        let mut f = Vec::with_capacity(5 + payload.len());
        f.push(kind);
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// The first complete frame of `b` and the bytes it took; `Ok(None)` while it is incomplete.
    pub(crate) fn decode(b: &[u8]) -> std::result::Result<Option<(Frame, usize)>, FrameFault> {
        if b.len() < 5 {
            return Ok(None);
        }
        let kind = b[0];
        if ![FRAME_DATA, FRAME_READY, FRAME_ERROR].contains(&kind) {
            return Err(FrameFault::Kind(kind));
        }
        let len = u32::from_le_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameFault::TooLarge(len));
        }
        if kind == FRAME_READY && len != 0 {
            return Err(FrameFault::ReadyPayload(len));
        }
        let Some(payload) = b.get(5..5 + len) else {
            return Ok(None);
        };
        let f = match kind {
            FRAME_DATA => Frame::Data(payload.to_vec()),
            FRAME_READY => Frame::Ready,
            _ => Frame::Error(payload.to_vec()),
        };
        Ok(Some((f, 5 + len)))
    }
}

/// The control connection: framed messages (`kind u8, len u32 LE, payload`) after the hello.
struct Ctrl {
    stream: TcpStream,
    peer: SocketAddr,
    rbuf: Vec<u8>,
    sent_hello: bool,
}

impl Ctrl {
    fn new(stream: TcpStream, peer: SocketAddr) -> Result<Ctrl> {
        stream
            .set_nodelay(true)
            .map_err(|e| Error::io(format!("control connection to {peer}: set TCP_NODELAY"), e))?;
        Ok(Ctrl {
            stream,
            peer,
            rbuf: Vec::new(),
            sent_hello: false,
        })
    }

    fn write(&mut self, bytes: &[u8], what: &str) -> Result<()> {
        self.stream
            .set_write_timeout(Some(Duration::from_secs(30)))
            .and_then(|()| self.stream.write_all(bytes))
            .map_err(|e| Error::io(format!("control connection to {}: send {what}", self.peer), e))
    }

    fn send_frame(&mut self, frame: &Frame, what: &str) -> Result<()> {
        self.write(&frame.encode(), what)
    }

    /// Reads what is available. `deadline: None` does not wait. Returns false on nothing new.
    fn read_some(&mut self, deadline: Option<Instant>, what: &str) -> Result<bool> {
        let mut tmp = [0u8; 4096];
        let res = match deadline {
            None => {
                self.stream
                    .set_nonblocking(true)
                    .map_err(|e| Error::io("control connection: set non-blocking", e))?;
                let r = self.stream.read(&mut tmp);
                self.stream
                    .set_nonblocking(false)
                    .map_err(|e| Error::io("control connection: set blocking", e))?;
                r
            }
            Some(d) => {
                let left = d
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                self.stream
                    .set_read_timeout(Some(left))
                    .map_err(|e| Error::io("control connection: set read timeout", e))?;
                self.stream.read(&mut tmp)
            }
        };
        match res {
            Ok(0) => Err(Error::connection_lost(format!(
                "peer at {} closed the control connection while we waited for {what} (it failed or exited: see its output)",
                self.peer
            ))),
            Ok(n) => {
                self.rbuf.extend_from_slice(&tmp[..n]);
                Ok(true)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                Ok(false)
            }
            Err(e) => Err(Error::io(format!("control connection to {}: receive {what}", self.peer), e)),
        }
    }

    /// Reads the peer's hello, checking magic and version as soon as their bytes arrive.
    fn read_hello(&mut self, deadline: Instant, timeout: Duration) -> Result<HelloMsg> {
        let peer = self.peer;
        loop {
            if let Some(h) = self.check_hello()? {
                self.rbuf.drain(..HELLO_LEN);
                return Ok(h);
            }
            if Instant::now() >= deadline {
                return Err(Error::remote(format!(
                    "peer at {peer} sent no tcpxshim hello within {} (got {} of {HELLO_LEN} bytes); is it a tcpxshim \
                     endpoint?",
                    secs(timeout),
                    self.rbuf.len()
                )));
            }
            if let Err(e) = self.read_some(Some(deadline), "its hello") {
                return Err(self.hello_read_error(e));
            }
        }
    }

    /// Checks what has arrived of the hello so far; the hello once all of it is there.
    fn check_hello(&self) -> Result<Option<HelloMsg>> {
        HelloMsg::decode(&self.rbuf).map_err(|f| self.hello_fault(&f))
    }

    /// The error for a [`HelloFault`].
    fn hello_fault(&self, f: &HelloFault) -> Error {
        let peer = self.peer;
        match f {
            HelloFault::NotOurs => self.not_ours(),
            HelloFault::Version { version, len } => Error::remote(format!(
                "peer at {peer} speaks tcpxshim bootstrap protocol version {version} ({len}-byte hello); this \
                 build speaks version {PROTOCOL_VERSION} ({HELLO_LEN}-byte hello): run the same tcpxshim \
                 version on both sides"
            )),
            HelloFault::Field(what) => Error::remote(format!(
                "peer at {peer} sent a malformed tcpxshim hello: its {what} field is not a NUL-terminated UTF-8 \
                 string padded with zeros"
            )),
        }
    }

    /// The error for bytes that do not start a tcpxshim hello.
    fn not_ours(&self) -> Error {
        Error::remote(format!(
            "peer at {} is not a tcpxshim endpoint (it sent {}, expected a tcpxshim hello)",
            self.peer,
            preview(&self.rbuf)
        ))
    }

    /// What a failed read while waiting for the hello means, given what arrived before it.
    fn hello_read_error(&self, e: Error) -> Error {
        if self.rbuf.is_empty() {
            let how = match e.kind() {
                crate::error::ErrorKind::ConnectionLost => String::new(), // plain end of stream
                _ => format!(" ({e})"),
            };
            return Error::connection_lost(format!(
                "peer at {} closed the connection without a word{how}: not a tcpxshim endpoint, or it refused this \
                 connection (see its output)",
                self.peer
            ));
        }
        if self.rbuf.len() < MAGIC.len() {
            return Error::remote(format!("{} (then: {e})", self.not_ours()));
        }
        e
    }

    /// A complete frame from the buffer, if there is one (a peer's error report is an error).
    fn take_frame(&mut self) -> Result<Option<Frame>> {
        let peer = self.peer;
        let (frame, n) = match Frame::decode(&self.rbuf) {
            Ok(Some(x)) => x,
            Ok(None) => return Ok(None),
            Err(FrameFault::TooLarge(len)) => {
                return Err(Error::remote(format!(
                    "peer at {peer}: control message of {len} B is too large"
                )))
            }
            Err(FrameFault::Kind(k)) => {
                return Err(Error::remote(format!(
                    "peer at {peer}: unknown control message type {k}"
                )))
            }
            Err(FrameFault::ReadyPayload(len)) => {
                return Err(Error::remote(format!(
                    "peer at {peer}: malformed control message (a ready with {len} B of payload)"
                )))
            }
        };
        self.rbuf.drain(..n);
        match frame {
            Frame::Error(e) => Err(Error::remote(format!(
                "peer at {peer} failed: {}",
                String::from_utf8_lossy(&e)
            ))),
            f => Ok(Some(f)),
        }
    }

    /// Waits for the next frame until `timeout`.
    fn next_frame(&mut self, timeout: Duration, what: &str) -> Result<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.take_frame()? {
                return Ok(f);
            }
            if Instant::now() >= deadline {
                return Err(Error::remote(format!(
                    "peer at {}: no {what} within {} on the control connection",
                    self.peer,
                    secs(timeout)
                )));
            }
            self.read_some(Some(deadline), what)?;
        }
    }

    /// Returns a frame if one is complete without waiting (errors and EOF included).
    fn poll_frame(&mut self, what: &str) -> Result<Option<Frame>> {
        if let Some(f) = self.take_frame()? {
            return Ok(Some(f));
        }
        self.read_some(None, what)?;
        self.take_frame()
    }
}

/// One side of a two-way connection: a send and a receive connection to the same peer, plus
/// the bootstrap connection for small control messages.
pub struct Endpoint<'a> {
    send: SendConn<'a>,
    recv: RecvConn<'a>,
    peer: PeerInfo,
    ctrl: RefCell<Ctrl>,
    ndev: i32,
}

impl std::fmt::Debug for Endpoint<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Endpoint(peer {}, {:?}, {:?})", self.peer, self.send, self.recv)
    }
}

impl<'a> Endpoint<'a> {
    /// The connection this side sends on.
    pub fn send_conn(&self) -> &SendConn<'a> {
        &self.send
    }
    /// The connection this side receives on.
    pub fn recv_conn(&self) -> &RecvConn<'a> {
        &self.recv
    }
    /// Who the peer is.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }
    /// The number of devices of the local transport.
    pub fn local_devices(&self) -> i32 {
        self.ndev
    }

    /// Sends a control message (at most 1 MiB).
    pub fn send_ctrl(&self, msg: &[u8]) -> Result<()> {
        if msg.len() > MAX_FRAME {
            return Err(Error::invalid_argument(format!(
                "control message of {} B is too large",
                msg.len()
            )));
        }
        self.ctrl
            .borrow_mut()
            .send_frame(&Frame::Data(msg.to_vec()), "a control message")
    }

    /// Waits up to `timeout` for the next control message; `what` names it in errors. An error
    /// reported by the peer ([`Endpoint::report_error`]) comes back as an error naming the peer.
    pub fn recv_ctrl(&self, timeout: Duration, what: &str) -> Result<Vec<u8>> {
        match self.ctrl.borrow_mut().next_frame(timeout, what)? {
            Frame::Data(d) => Ok(d),
            Frame::Ready | Frame::Error(_) => Err(Error::remote(format!(
                "peer at {}: unexpected control message while waiting for {what}",
                self.peer.addr
            ))),
        }
    }

    /// The peer's error, if it has reported one (or closed the control connection); never waits.
    pub fn peer_error(&self) -> Option<Error> {
        self.ctrl.borrow_mut().poll_frame("a control message").err()
    }

    /// Tells the peer this side failed (best effort).
    pub fn report_error(&self, msg: &str) {
        if let Err(e) = self
            .ctrl
            .borrow_mut()
            .send_frame(&Frame::Error(msg.as_bytes().to_vec()), "an error report")
        {
            log::debug!("could not report the error to the peer: {e}");
        }
    }
}

/// A bootstrap listener: `tcpxshim serve`'s side.
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Server {
    /// Listens on `bind` (port 0: any free port).
    pub fn bind(bind: SocketAddr) -> Result<Server> {
        let listener = TcpListener::bind(bind).map_err(|e| Error::io(format!("listen on {bind}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io(format!("listen on {bind}: local address"), e))?;
        Ok(Server { listener, addr })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits up to `timeout` for a peer ([`connect_to`]), then sets up both connections with it
    /// on transport device `dev`, each step within `timeout`.
    pub fn accept<'a>(&self, net: &'a dyn Transport, dev: i32, timeout: Duration) -> Result<Endpoint<'a>> {
        self.accept_within(net, dev, timeout, timeout)
    }

    /// As [`Server::accept`], waiting up to `wait` for the peer to appear.
    ///
    /// A client that is not a tcpxshim endpoint (it sends something else than a hello, closes
    /// the connection before its hello is complete, or sends nothing for `timeout`) is logged
    /// with one WARN line and dropped, and the server keeps waiting. At most [`MAX_PENDING`]
    /// clients are read at once; more wait in the listen backlog.
    pub fn accept_within<'a>(
        &self,
        net: &'a dyn Transport,
        dev: i32,
        wait: Duration,
        timeout: Duration,
    ) -> Result<Endpoint<'a>> {
        let start = Instant::now();
        check_device(net, dev)?;
        self.listener
            .set_nonblocking(true)
            .map_err(|e| Error::io(format!("listen on {}", self.addr), e))?;
        let mut pending: Vec<Candidate> = Vec::new();
        loop {
            while pending.len() < MAX_PENDING {
                match self.listener.accept() {
                    Ok((stream, peer)) => {
                        log::info!("bootstrap connection from {peer}");
                        match Ctrl::new(stream, peer) {
                            Ok(ctrl) => pending.push(Candidate {
                                ctrl,
                                since: Instant::now(),
                            }),
                            Err(e) => self.ignore(peer, &e.to_string()),
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(Error::io(format!("accept on {}", self.addr), e)),
                }
            }
            let mut i = 0;
            while i < pending.len() {
                match pending[i].poll(timeout) {
                    Poll::Waiting => i += 1,
                    Poll::Stray(why) => {
                        let c = pending.swap_remove(i);
                        self.ignore(c.ctrl.peer, &why);
                    }
                    Poll::Hello(hello) => {
                        let mut ctrl = pending.swap_remove(i).ctrl;
                        // The others were not the peer: they are dropped with the server's wait.
                        for c in pending.drain(..) {
                            self.ignore(c.ctrl.peer, "another client's hello came first");
                        }
                        ctrl.rbuf.drain(..HELLO_LEN);
                        return establish(net, dev, ctrl, Some(hello), timeout);
                    }
                }
            }
            if start.elapsed() >= wait {
                return Err(Error::remote(format!(
                    "serve on {}: no peer connected within {}; run `tcpxshim connect HOST:{}` on the other node",
                    self.addr,
                    secs(wait),
                    self.addr.port()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Logs a dropped bootstrap client.
    fn ignore(&self, peer: SocketAddr, why: &str) {
        log::warn!(
            "serve on {}: ignored a bootstrap connection from {peer}: {why}; still waiting for the peer",
            self.addr
        );
    }
}

/// Bootstrap clients read at once by [`Server::accept_within`] before their hello is complete.
pub const MAX_PENDING: usize = 4;

/// A bootstrap client whose hello is not complete yet.
struct Candidate {
    ctrl: Ctrl,
    since: Instant,
}

enum Poll {
    Waiting,
    /// Not the peer: why.
    Stray(String),
    Hello(HelloMsg),
}

impl Candidate {
    /// Reads what the client sent (without waiting) and judges it.
    fn poll(&mut self, timeout: Duration) -> Poll {
        let c = &mut self.ctrl;
        let read = loop {
            match c.read_some(None, "its hello") {
                Ok(true) if c.rbuf.len() < HELLO_LEN => {}
                Ok(_) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        match HelloMsg::decode(&c.rbuf) {
            Ok(Some(h)) => return Poll::Hello(h),
            Err(f @ HelloFault::Version { .. }) => {
                // The start of our hello, so that the client can say which versions differ.
                let mut ours = MAGIC.to_vec();
                ours.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                ours.extend_from_slice(&(HELLO_LEN as u16).to_le_bytes());
                let _ = c.write(&ours, "our protocol version");
                return Poll::Stray(c.hello_fault(&f).to_string());
            }
            Err(f) => return Poll::Stray(c.hello_fault(&f).to_string()),
            Ok(None) => {}
        }
        let got = c.rbuf.len();
        if let Err(e) = read {
            return Poll::Stray(match e.kind() {
                crate::error::ErrorKind::ConnectionLost => {
                    format!("it closed the connection after {got} of the {HELLO_LEN} bytes of a hello")
                }
                _ => format!("reading its hello after {got} of {HELLO_LEN} bytes: {e}"),
            });
        }
        if self.since.elapsed() >= timeout {
            return Poll::Stray(format!(
                "it sent {got} of the {HELLO_LEN} bytes of a hello within {} (the step timeout, --timeout)",
                secs(timeout)
            ));
        }
        Poll::Waiting
    }
}

/// Listens on `bind` and sets up an [`Endpoint`] with the first peer, each step (the peer's
/// arrival, the hello exchange, the transport connections) within `timeout`.
pub fn serve<'a>(net: &'a dyn Transport, dev: i32, bind: SocketAddr, timeout: Duration) -> Result<Endpoint<'a>> {
    Server::bind(bind)?.accept(net, dev, timeout)
}

/// Connects to a [`Server`] at `addr` ("host:port"), retrying while nothing listens there yet,
/// and sets up an [`Endpoint`] on transport device `dev`; each step (reaching the server, the
/// hello exchange, the transport connections) within `timeout`.
pub fn connect_to<'a>(net: &'a dyn Transport, dev: i32, addr: &str, timeout: Duration) -> Result<Endpoint<'a>> {
    let start = Instant::now();
    check_device(net, dev)?;
    let addrs = resolve(addr)?;
    let stream = dial(addr, &addrs, start, timeout)?;
    let peer = stream
        .peer_addr()
        .map_err(|e| Error::io(format!("connect to {addr}: peer address"), e))?;
    log::info!("bootstrap connection to {peer}");
    establish(net, dev, Ctrl::new(stream, peer)?, None, timeout)
}

/// The addresses of "host:port".
fn resolve(addr: &str) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| {
            Error::invalid_argument(format!(
                "connect to {addr}: cannot resolve the address ({e}); expected HOST:PORT"
            ))
        })?
        .collect();
    if addrs.is_empty() {
        return Err(Error::invalid_argument(format!(
            "connect to {addr}: the name resolves to no address"
        )));
    }
    Ok(addrs)
}

/// Connects to one of `addrs`, retrying transient failures until `timeout` after `start`.
fn dial(addr: &str, addrs: &[SocketAddr], start: Instant, timeout: Duration) -> Result<TcpStream> {
    let mut attempts = 0u32;
    let mut last: Option<std::io::Error> = None;
    loop {
        for sa in addrs {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            attempts += 1;
            match TcpStream::connect_timeout(sa, left.min(Duration::from_secs(3))) {
                Ok(s) => return Ok(s),
                Err(e) if is_transient(&e) => {
                    log::debug!("connect to {sa}: {e}; retrying");
                    last = Some(e);
                }
                Err(e) => return Err(Error::io(format!("connect to {addr} ({sa})"), e)),
            }
        }
        if start.elapsed() >= timeout {
            return Err(unreachable_error(addr, attempts, last.as_ref(), timeout));
        }
        std::thread::sleep(Duration::from_millis(100).min(timeout.saturating_sub(start.elapsed())));
    }
}

/// Connect errors worth retrying: nothing listens yet, or the attempt was cut short.
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused
            | ErrorKind::TimedOut
            | ErrorKind::WouldBlock
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::Interrupted
    )
}

fn unreachable_error(addr: &str, attempts: u32, last: Option<&std::io::Error>, timeout: Duration) -> Error {
    let why = match last {
        Some(e) if e.kind() == ErrorKind::ConnectionRefused => "connection refused: nothing listens there".to_string(),
        Some(e) => e.to_string(),
        None => "no attempt finished".to_string(),
    };
    Error::remote(format!(
        "connect to {addr}: no tcpxshim server reachable within {} ({attempts} attempts; last error: {why}); is \
         `tcpxshim serve` running on that host and port?",
        secs(timeout)
    ))
}

/// Checks that `dev` exists; returns the device count.
fn check_device(net: &dyn Transport, dev: i32) -> Result<i32> {
    let ndev = net
        .devices()
        .map_err(|e| e.context(format!("{}: devices", net.name())))?;
    if ndev <= 0 {
        return Err(Error::invalid_argument(format!(
            "transport {} has no devices",
            net.name()
        )));
    }
    if dev < 0 || dev >= ndev {
        return Err(Error::invalid_argument(format!(
            "device {dev} does not exist: transport {} has {ndev} device(s) (0 to {})",
            net.name(),
            ndev - 1
        )));
    }
    Ok(ndev)
}

/// Both sides, once the bootstrap connection stands: hello exchange, then connect + accept.
/// The server has read the client's hello (`peer_hello`) before it sends its own.
fn establish<'a>(
    net: &'a dyn Transport,
    dev: i32,
    mut ctrl: Ctrl,
    peer_hello: Option<HelloMsg>,
    timeout: Duration,
) -> Result<Endpoint<'a>> {
    match establish_inner(net, dev, &mut ctrl, peer_hello, timeout) {
        Ok((send, recv, info, ndev)) => Ok(Endpoint {
            send,
            recv,
            peer: info,
            ctrl: RefCell::new(ctrl),
            ndev,
        }),
        Err(e) => {
            // Best effort: tell the peer why, so it fails with our reason instead of a timeout.
            // Before our hello the peer would take a frame for a foreign protocol: just close.
            if ctrl.sent_hello {
                let _ = ctrl.send_frame(&Frame::Error(e.to_string().into_bytes()), "an error report");
            }
            Err(e)
        }
    }
}

type Established<'a> = (SendConn<'a>, RecvConn<'a>, PeerInfo, i32);

fn establish_inner<'a>(
    net: &'a dyn Transport,
    dev: i32,
    ctrl: &mut Ctrl,
    peer_hello: Option<HelloMsg>,
    timeout: Duration,
) -> Result<Established<'a>> {
    let start = Instant::now();
    let deadline = start + timeout;
    let ndev = check_device(net, dev)?;
    let listener = Listener::listen(net, dev)?;
    ctrl.write(&HelloMsg::new(net, ndev, dev, listener.handle()).encode(), "our hello")?;
    ctrl.sent_hello = true;
    let hello = match peer_hello {
        Some(h) => h,
        None => ctrl.read_hello(deadline, timeout)?,
    };
    let (info, handle) = (hello.info(ctrl.peer), hello.handle);
    log::info!("peer {info} (it has {} device(s))", info.ndev);
    if !info.transport.eq_ignore_ascii_case(net.name()) {
        return Err(Error::invalid_usage(format!(
            "peer {info} uses transport {:?}, this side uses {:?}: both sides must load the same transport",
            info.transport,
            net.name()
        )));
    }
    let connector = Connector::new(net, dev, handle).with_peer(format!("{} device {}", info.addr, info.dev));
    let mut setup = Setup {
        ctrl,
        info: &info,
        net,
        dev,
        deadline,
        timeout,
    };
    let (send, recv, peer_ready) = setup.connect_both(connector, listener)?;
    setup.confirm_ready(peer_ready)?;
    log::info!("connected to {info} in {:.0} ms", start.elapsed().as_secs_f64() * 1e3);
    Ok((send, recv, info, ndev))
}

/// Connection setup once the hellos are exchanged.
struct Setup<'s> {
    ctrl: &'s mut Ctrl,
    info: &'s PeerInfo,
    net: &'s dyn Transport,
    dev: i32,
    deadline: Instant,
    timeout: Duration,
}

impl Setup<'_> {
    /// Connects to the peer's listener and accepts its connection, interleaved (each call is
    /// non-blocking), watching the control connection for the peer's ready or failure. Returns
    /// both connections and whether the peer said ready.
    fn connect_both<'a>(
        &mut self,
        mut connector: Connector<'a>,
        mut listener: Listener<'a>,
    ) -> Result<(SendConn<'a>, RecvConn<'a>, bool)> {
        let (mut send, mut recv) = (None, None);
        let mut backoff = Backoff::new();
        let mut last_ctrl_poll = Instant::now();
        let mut peer_ready = false;
        while send.is_none() || recv.is_none() {
            let mut progressed = false;
            if send.is_none() {
                send = connector.try_connect()?;
                progressed |= send.is_some();
            }
            if recv.is_none() {
                recv = listener.try_accept()?;
                progressed |= recv.is_some();
            }
            if last_ctrl_poll.elapsed() >= Duration::from_millis(50) {
                last_ctrl_poll = Instant::now();
                peer_ready |= self.peer_said_ready()?;
            }
            if Instant::now() >= self.deadline {
                return Err(match send {
                    None => connector.timeout_error(self.timeout),
                    Some(_) => Error::remote(format!(
                        "accept on {} device {}: peer {} did not connect within {}",
                        self.net.name(),
                        self.dev,
                        self.info,
                        secs(self.timeout)
                    )),
                });
            }
            if progressed {
                backoff.reset();
            } else {
                backoff.snooze();
            }
        }
        let (send, recv) = (send.expect("the loop ends when connected"), recv.expect("and accepted"));
        Ok((send, recv, peer_ready))
    }

    /// Whether the peer's ready has arrived (without waiting).
    fn peer_said_ready(&mut self) -> Result<bool> {
        match self.ctrl.poll_frame("the transport connections")? {
            Some(Frame::Ready) => Ok(true),
            Some(Frame::Data(_) | Frame::Error(_)) => Err(Error::remote(format!(
                "peer {}: unexpected control message during connection setup",
                self.info
            ))),
            None => Ok(false),
        }
    }

    /// Both sides confirm, so neither starts transfers before the other is fully connected.
    fn confirm_ready(&mut self, peer_ready: bool) -> Result<()> {
        let ctrl = &mut *self.ctrl;
        ctrl.send_frame(&Frame::Ready, "ready")?;
        if peer_ready {
            return Ok(());
        }
        let left = self
            .deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        match ctrl.next_frame(left, "the peer's ready")? {
            Frame::Ready => Ok(()),
            Frame::Data(_) | Frame::Error(_) => Err(Error::remote(format!(
                "peer {}: expected ready, got a data message",
                self.info
            ))),
        }
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzzing::{check_mutations, config};
    use proptest::prelude::*;

    /// A string that travels whole in a field of `len` bytes.
    fn field(len: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>().prop_map(|c| if c == '\0' { '0' } else { c }), 0..len).prop_map(
            move |v| {
                let mut s = String::new();
                for c in v {
                    if s.len() + c.len_utf8() < len {
                        s.push(c);
                    }
                }
                s
            },
        )
    }

    fn any_hello() -> impl Strategy<Value = HelloMsg> {
        (
            any::<i32>(),
            any::<i32>(),
            any::<u32>(),
            field(NAME_LEN),
            field(HOST_LEN),
            any::<[u8; HANDLE_SIZE]>(),
        )
            .prop_map(|(ndev, dev, pid, transport, host, handle)| HelloMsg {
                ndev,
                dev,
                pid,
                transport,
                host,
                handle,
            })
    }

    fn hello_canon(b: &[u8]) -> Option<Vec<u8>> {
        match HelloMsg::decode(b) {
            Ok(Some(h)) if b.len() == HELLO_LEN => Some(h.encode()),
            _ => None,
        }
    }

    fn any_frame() -> impl Strategy<Value = Frame> {
        let payload = || proptest::collection::vec(any::<u8>(), 0..64);
        prop_oneof![
            payload().prop_map(Frame::Data),
            Just(Frame::Ready),
            payload().prop_map(Frame::Error)
        ]
    }

    fn frame_canon(b: &[u8]) -> Option<Vec<u8>> {
        match Frame::decode(b) {
            Ok(Some((f, n))) if n == b.len() => Some(f.encode()),
            _ => None,
        }
    }

    /// Bytes that start like a hello of this version, so that the fields behind are reached.
    fn hello_like() -> impl Strategy<Value = Vec<u8>> {
        (0..=HELLO_LEN + 8, any::<u8>()).prop_flat_map(|(n, fill)| {
            proptest::collection::vec(prop_oneof![Just(0u8), Just(fill), any::<u8>()], n).prop_map(|mut b| {
                let mut head = MAGIC.to_vec();
                head.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                head.extend_from_slice(&(HELLO_LEN as u16).to_le_bytes());
                let k = head.len().min(b.len());
                b[..k].copy_from_slice(&head[..k]);
                b
            })
        })
    }

    /// Found by the fuzz module: a name longer than its field was cut inside a character, and
    /// the peer read a replacement character (now: the hello would be malformed).
    #[test]
    fn regression_long_names_are_cut_at_a_character_boundary() {
        let host = "\u{e9}".repeat(40); // 80 bytes, 2 each
        let h = HelloMsg {
            ndev: 1,
            dev: 0,
            pid: 7,
            transport: "mock".into(),
            host,
            handle: [0; HANDLE_SIZE],
        };
        let back = HelloMsg::decode(&h.encode()).unwrap().unwrap();
        assert_eq!(back.host, "\u{e9}".repeat(31), "62 of the 63 bytes the field holds");
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn hello_arbitrary_bytes(b in prop_oneof![proptest::collection::vec(any::<u8>(), 0..HELLO_LEN + 8), hello_like()]) {
            match HelloMsg::decode(&b) {
                Ok(Some(h)) => prop_assert_eq!(h.encode(), b[..HELLO_LEN].to_vec()),
                Ok(None) => prop_assert!(b.len() < HELLO_LEN),
                Err(_) => {}
            }
        }

        #[test]
        fn hello_mutations(h in any_hello(), masks in proptest::collection::vec(1u8.., 1..64)) {
            let b = h.encode();
            prop_assert_eq!(b.len(), HELLO_LEN);
            prop_assert_eq!(HelloMsg::decode(&b), Ok(Some(h)));
            // Every beginning of a hello is one: the server waits for the rest.
            for n in 0..HELLO_LEN {
                prop_assert_eq!(HelloMsg::decode(&b[..n]), Ok(None));
            }
            check_mutations(&b, &masks, true, hello_canon)?;
        }

        /// Any name travels as its longest prefix that fits, cut at a character boundary.
        #[test]
        fn hello_names_are_cut_whole(transport in any::<String>(), host in any::<String>()) {
            let h = HelloMsg { ndev: 1, dev: 0, pid: 1, transport: transport.clone(), host: host.clone(), handle: [0; HANDLE_SIZE] };
            let back = HelloMsg::decode(&h.encode()).unwrap().unwrap();
            for (sent, got, len) in [(&transport, &back.transport, NAME_LEN), (&host, &back.host, HOST_LEN)] {
                prop_assert!(sent.starts_with(got.as_str()) && got.len() < len && !got.contains('\0'));
                let next = sent[got.len()..].chars().next();
                let fitted = matches!(next, Some(c) if c != '\0' && got.len() + c.len_utf8() < len);
                prop_assert!(!fitted, "{:?} cut short to {:?}", sent, got);
            }
        }

        #[test]
        fn frame_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..80), kind in 0u8..5, len in 0u32..80) {
            for b in [b.clone(), [&[kind][..], &len.to_le_bytes(), &b].concat()] {
                match Frame::decode(&b) {
                    Ok(Some((f, n))) => prop_assert_eq!(f.encode(), b[..n].to_vec()),
                    Ok(None) => prop_assert!(b.len() < 5 || b.len() < 5 + u32::from_le_bytes([b[1], b[2], b[3], b[4]]) as usize),
                    Err(_) => {}
                }
            }
        }

        #[test]
        fn frame_mutations(f in any_frame(), masks in proptest::collection::vec(1u8.., 1..64)) {
            let b = f.encode();
            prop_assert_eq!(Frame::decode(&b), Ok(Some((f, b.len()))));
            check_mutations(&b, &masks, true, frame_canon)?;
        }
    }
}
