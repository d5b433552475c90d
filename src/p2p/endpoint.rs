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

fn put_str(out: &mut Vec<u8>, s: &str, len: usize) {
    let b = s.as_bytes();
    let n = b.len().min(len - 1);
    out.extend_from_slice(&b[..n]);
    out.resize(out.len() + (len - n), 0);
}

fn get_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn encode_hello(net: &dyn Transport, ndev: i32, dev: i32, handle: &Handle) -> Vec<u8> {
    let mut out = Vec::with_capacity(HELLO_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&(HELLO_LEN as u16).to_le_bytes());
    out.extend_from_slice(&ndev.to_le_bytes());
    out.extend_from_slice(&dev.to_le_bytes());
    out.extend_from_slice(&std::process::id().to_le_bytes());
    put_str(&mut out, net.name(), NAME_LEN);
    put_str(&mut out, &host_name(), HOST_LEN);
    out.extend_from_slice(handle);
    debug_assert_eq!(out.len(), HELLO_LEN);
    out
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

/// The peer's details and handle from a complete hello (`HELLO_LEN` bytes, already checked).
fn parse_hello(peer: SocketAddr, h: &[u8]) -> (PeerInfo, Handle) {
    let i32_at = |i: usize| i32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let mut off = 24;
    let transport = get_str(&h[off..off + NAME_LEN]);
    off += NAME_LEN;
    let host = get_str(&h[off..off + HOST_LEN]);
    off += HOST_LEN;
    let mut handle = [0u8; HANDLE_SIZE];
    handle.copy_from_slice(&h[off..off + HANDLE_SIZE]);
    let info = PeerInfo {
        addr: peer,
        host,
        pid: i32_at(20) as u32,
        transport,
        ndev: i32_at(12),
        dev: i32_at(16),
    };
    (info, handle)
}

/// The control connection: framed messages (`kind u8, len u32 LE, payload`) after the hello.
struct Ctrl {
    stream: TcpStream,
    peer: SocketAddr,
    rbuf: Vec<u8>,
    sent_hello: bool,
}

enum Frame {
    Data(Vec<u8>),
    Ready,
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

    fn send_frame(&mut self, kind: u8, payload: &[u8], what: &str) -> Result<()> {
        let mut f = Vec::with_capacity(5 + payload.len());
        f.push(kind);
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        self.write(&f, what)
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
    fn read_hello(&mut self, deadline: Instant, timeout: Duration) -> Result<(PeerInfo, Handle)> {
        let peer = self.peer;
        loop {
            if self.check_hello_start()? {
                break;
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
        let h: Vec<u8> = self.rbuf.drain(..HELLO_LEN).collect();
        Ok(parse_hello(peer, &h))
    }

    /// Checks what has arrived of the hello so far; true once all of it is there.
    fn check_hello_start(&self) -> Result<bool> {
        let peer = self.peer;
        let n = self.rbuf.len().min(MAGIC.len());
        if self.rbuf[..n] != MAGIC[..n] {
            return Err(self.not_ours());
        }
        if self.rbuf.len() >= 12 {
            let version = u16::from_le_bytes([self.rbuf[8], self.rbuf[9]]);
            let len = u16::from_le_bytes([self.rbuf[10], self.rbuf[11]]) as usize;
            if version != PROTOCOL_VERSION || len != HELLO_LEN {
                return Err(Error::remote(format!(
                    "peer at {peer} speaks tcpxshim bootstrap protocol version {version} ({len}-byte hello); this \
                     build speaks version {PROTOCOL_VERSION} ({HELLO_LEN}-byte hello): run the same tcpxshim \
                     version on both sides"
                )));
            }
        }
        Ok(self.rbuf.len() >= HELLO_LEN)
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

    /// A complete frame from the buffer, if there is one.
    fn take_frame(&mut self) -> Result<Option<Frame>> {
        if self.rbuf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]) as usize;
        if len > MAX_FRAME {
            return Err(Error::remote(format!(
                "peer at {}: control message of {len} B is too large",
                self.peer
            )));
        }
        if self.rbuf.len() < 5 + len {
            return Ok(None);
        }
        let kind = self.rbuf[0];
        let payload: Vec<u8> = self.rbuf.drain(..5 + len).skip(5).collect();
        match kind {
            FRAME_DATA => Ok(Some(Frame::Data(payload))),
            FRAME_READY => Ok(Some(Frame::Ready)),
            FRAME_ERROR => Err(Error::remote(format!(
                "peer at {} failed: {}",
                self.peer,
                String::from_utf8_lossy(&payload)
            ))),
            k => Err(Error::remote(format!(
                "peer at {}: unknown control message type {k}",
                self.peer
            ))),
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
        self.ctrl.borrow_mut().send_frame(FRAME_DATA, msg, "a control message")
    }

    /// Waits up to `timeout` for the next control message; `what` names it in errors. An error
    /// reported by the peer ([`Endpoint::report_error`]) comes back as an error naming the peer.
    pub fn recv_ctrl(&self, timeout: Duration, what: &str) -> Result<Vec<u8>> {
        match self.ctrl.borrow_mut().next_frame(timeout, what)? {
            Frame::Data(d) => Ok(d),
            Frame::Ready => Err(Error::remote(format!(
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
            .send_frame(FRAME_ERROR, msg.as_bytes(), "an error report")
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
        let (stream, peer) = loop {
            match self.listener.accept() {
                Ok(x) => break x,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return Err(Error::io(format!("accept on {}", self.addr), e)),
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
        };
        stream
            .set_nonblocking(false)
            .map_err(|e| Error::io(format!("connection from {peer}"), e))?;
        log::info!("bootstrap connection from {peer}");
        establish(net, dev, stream, peer, timeout)
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
    establish(net, dev, stream, peer, timeout)
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
fn establish<'a>(
    net: &'a dyn Transport,
    dev: i32,
    stream: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<Endpoint<'a>> {
    let mut ctrl = Ctrl::new(stream, peer)?;
    match establish_inner(net, dev, &mut ctrl, timeout) {
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
                let _ = ctrl.send_frame(FRAME_ERROR, e.to_string().as_bytes(), "an error report");
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
    timeout: Duration,
) -> Result<Established<'a>> {
    let start = Instant::now();
    let deadline = start + timeout;
    let ndev = check_device(net, dev)?;
    let listener = Listener::listen(net, dev)?;
    ctrl.write(&encode_hello(net, ndev, dev, listener.handle()), "our hello")?;
    ctrl.sent_hello = true;
    let (info, handle) = ctrl.read_hello(deadline, timeout)?;
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
            Some(Frame::Data(_)) => Err(Error::remote(format!(
                "peer {}: unexpected control message during connection setup",
                self.info
            ))),
            None => Ok(false),
        }
    }

    /// Both sides confirm, so neither starts transfers before the other is fully connected.
    fn confirm_ready(&mut self, peer_ready: bool) -> Result<()> {
        let ctrl = &mut *self.ctrl;
        ctrl.send_frame(FRAME_READY, &[], "ready")?;
        if peer_ready {
            return Ok(());
        }
        let left = self
            .deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        match ctrl.next_frame(left, "the peer's ready")? {
            Frame::Ready => Ok(()),
            Frame::Data(_) => Err(Error::remote(format!(
                "peer {}: expected ready, got a data message",
                self.info
            ))),
        }
    }
}
