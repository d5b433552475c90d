//! Listen, connect, accept, memory registration and transfers over one [`Transport`].
//!
//! Every wait here is bounded by a timeout. A transfer that fails or is abandoned while the
//! transport may still use its buffer closes the connection at once (so the transport stops
//! touching the buffer); later calls on that connection fail with a message saying why.

use crate::error::{Error, Result};
use crate::ffi::{DevHandle, HANDLE_SIZE, NCCL_PTR_HOST};
use crate::transport::{DeviceType, Opaque, Transport};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The 128-byte connection handle NCCL carries between ranks.
pub type Handle = [u8; HANDLE_SIZE];

/// Tag used for every message (TCPX ignores tags; the built-in transport matches in order).
const TAG: i32 = 0x7C5;

/// Most requests a stream keeps in flight on one comm (NCCL keeps NCCL_STEPS = 8).
pub const MAX_INFLIGHT: usize = 8;

/// Waits between polls: yields for the first millisecond (low latency), then sleeps a little
/// longer each time, up to half a millisecond (no core burnt on long waits).
pub(crate) struct Backoff {
    since: Option<Instant>,
    sleep: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff {
            since: None,
            sleep: Duration::from_micros(10),
        }
    }
    pub(crate) fn reset(&mut self) {
        self.since = None;
        self.sleep = Duration::from_micros(10);
    }
    pub(crate) fn snooze(&mut self) {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() < Duration::from_millis(1) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(self.sleep);
            self.sleep = (self.sleep * 2).min(Duration::from_micros(500));
        }
    }
}

/// "1.5 s" style durations for messages.
pub(crate) fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// A short hex digest of a handle for messages: its first 16 bytes.
pub fn handle_digest(handle: &Handle) -> String {
    let hex: String = handle[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("handle {hex}..")
}

/// Which kind of comm a [`Comm`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Send,
    Recv,
}

/// A send or receive comm, closed on drop. It can be closed early ("abandoned") when a
/// transfer fails, after which every call reports why. (Public only to the sealed trait.)
#[doc(hidden)]
pub struct Comm<'a> {
    net: &'a dyn Transport,
    comm: Cell<Option<Opaque>>,
    kind: Kind,
    label: String,
    why_closed: RefCell<Option<String>>,
}

impl<'a> Comm<'a> {
    fn new(net: &'a dyn Transport, comm: Opaque, kind: Kind, label: String) -> Comm<'a> {
        Comm {
            net,
            comm: Cell::new(Some(comm)),
            kind,
            label,
            why_closed: RefCell::new(None),
        }
    }

    /// The open comm, or an error saying why it was closed.
    fn get(&self) -> Result<Opaque> {
        self.comm.get().ok_or_else(|| {
            let why = self.why_closed.borrow().clone().unwrap_or_else(|| "closed".into());
            Error::invalid_usage(format!(
                "{}: connection was closed after an earlier failure ({why})",
                self.label
            ))
        })
    }

    fn close_now(&self) -> Result<()> {
        match self.comm.take() {
            Some(c) => match self.kind {
                // SAFETY: `c` was this connection's open comm, taken out so it is closed once.
                Kind::Send => unsafe { self.net.close_send(c) },
                // SAFETY: as above.
                Kind::Recv => unsafe { self.net.close_recv(c) },
            },
            None => Ok(()),
        }
    }

    /// Closes the comm because a request on it can no longer be waited for: the transport must
    /// stop using that request's buffer.
    fn abandon(&self, why: &str) {
        if self.comm.get().is_none() {
            return;
        }
        log::warn!("{}: closing the connection: {why}", self.label);
        *self.why_closed.borrow_mut() = Some(why.to_string());
        if let Err(e) = self.close_now() {
            log::warn!("{}: close failed: {e}", self.label);
        }
    }
}

impl Drop for Comm<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.close_now() {
            log::warn!("{}: close failed: {e}", self.label);
        }
    }
}

/// The device handle slot passed to connect/accept as `*mut *mut DevHandle`.
///
/// TCPX-like transports write through `*slot` during accept, so it points at real, stable
/// storage. Both live in boxes of atomics (same layout as the C types, checked in `ffi`), so the
/// connection objects stay `Send` without any unsafe code.
struct DevSlot {
    /// Storage for one `ncclNetDeviceHandle_v7_t` (32 bytes, 8-aligned).
    storage: Box<[AtomicU64; 4]>,
    /// The `ncclNetDeviceHandle_v7_t*` whose address the transport receives.
    ptr: Box<AtomicPtr<DevHandle>>,
}

const _: () = assert!(std::mem::size_of::<DevHandle>() == std::mem::size_of::<[AtomicU64; 4]>());
const _: () = assert!(std::mem::align_of::<DevHandle>() <= std::mem::align_of::<[AtomicU64; 4]>());

impl DevSlot {
    /// A slot pointing at zeroed storage (what accept needs).
    fn with_storage() -> DevSlot {
        let storage: Box<[AtomicU64; 4]> = Box::default();
        let p = (&*storage as *const [AtomicU64; 4]).cast_mut().cast::<DevHandle>();
        DevSlot {
            storage,
            ptr: Box::new(AtomicPtr::new(p)),
        }
    }
    /// A slot holding NULL (what NCCL passes to connect).
    fn null() -> DevSlot {
        DevSlot {
            storage: Box::default(),
            ptr: Box::new(AtomicPtr::new(std::ptr::null_mut())),
        }
    }
    fn as_arg(&self) -> *mut *mut DevHandle {
        self.ptr.as_ptr()
    }
    /// What the transport left in the slot: the storage we gave it, or a handle of its own.
    fn info(&self) -> Option<DevHandleInfo> {
        let p = self.ptr.load(Ordering::Acquire);
        let ours = (&*self.storage as *const [AtomicU64; 4]).cast_mut().cast::<DevHandle>();
        if p.is_null() {
            return None;
        }
        if p != ours {
            // The transport replaced the pointer with its own object; we do not read foreign memory.
            return Some(DevHandleInfo {
                foreign: true,
                ..DevHandleInfo::default()
            });
        }
        let w: Vec<u64> = self.storage.iter().map(|a| a.load(Ordering::Acquire)).collect();
        let w0 = w[0].to_ne_bytes();
        let w3 = w[3].to_ne_bytes();
        let ty = u32::from_ne_bytes([w0[0], w0[1], w0[2], w0[3]]);
        Some(DevHandleInfo {
            foreign: false,
            device_type: DeviceType::from_raw(ty),
            version: i32::from_ne_bytes([w0[4], w0[5], w0[6], w0[7]]),
            handle: w[1] as usize,
            size: w[2] as usize,
            needs_proxy_progress: i32::from_ne_bytes([w3[0], w3[1], w3[2], w3[3]]) != 0,
        })
    }
}

/// What a transport wrote into the device handle of a receive connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevHandleInfo {
    /// The transport replaced our handle pointer with one of its own (contents not read).
    pub foreign: bool,
    /// netDeviceType.
    pub device_type: DeviceType,
    /// netDeviceVersion.
    pub version: i32,
    /// The device-side handle's address (0: none).
    pub handle: usize,
    /// Its size.
    pub size: usize,
    /// needsProxyProgress.
    pub needs_proxy_progress: bool,
}

impl Default for DevHandleInfo {
    fn default() -> Self {
        DevHandleInfo {
            foreign: false,
            device_type: DeviceType::Host,
            version: 0,
            handle: 0,
            size: 0,
            needs_proxy_progress: false,
        }
    }
}

/// A listening comm on one device and its handle; closed on drop. One accept per listener.
pub struct Listener<'a> {
    net: &'a dyn Transport,
    dev: i32,
    comm: Option<Opaque>,
    handle: Handle,
    slot: Option<DevSlot>,
    polls: u64,
}

impl<'a> Listener<'a> {
    /// Starts listening on device `dev`.
    pub fn listen(net: &'a dyn Transport, dev: i32) -> Result<Listener<'a>> {
        let mut handle = [0u8; HANDLE_SIZE];
        let comm = net
            .listen(dev, &mut handle)
            .map_err(|e| e.context(format!("listen on {} device {dev}", net.name())))?;
        Ok(Listener {
            net,
            dev,
            comm: Some(comm),
            handle,
            slot: Some(DevSlot::with_storage()),
            polls: 0,
        })
    }

    /// The handle a peer passes to [`connect`].
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The device listened on.
    pub fn dev(&self) -> i32 {
        self.dev
    }

    fn what(&self) -> String {
        format!("accept on {} device {}", self.net.name(), self.dev)
    }

    /// One non-blocking accept attempt: `Ok(None)` means "not yet".
    pub fn try_accept(&mut self) -> Result<Option<RecvConn<'a>>> {
        let (Some(listen), Some(slot)) = (self.comm, self.slot.as_ref()) else {
            return Err(Error::invalid_usage(format!(
                "{}: this listener already accepted its connection",
                self.what()
            )));
        };
        self.polls += 1;
        // SAFETY: `listen` is this listener's open comm; the slot is a valid device-handle pointer.
        let accepted = unsafe { self.net.accept(listen, slot.as_arg()) }.map_err(|e| e.context(self.what()))?;
        let Some(comm) = accepted else { return Ok(None) };
        let slot = self.slot.take().expect("checked above");
        // SAFETY: `comm` was just accepted and is open.
        let label = match unsafe { self.net.describe_comm(comm) } {
            Some(d) => format!("receive connection on {} device {} ({d})", self.net.name(), self.dev),
            None => format!("receive connection on {} device {}", self.net.name(), self.dev),
        };
        log::debug!("{label}: accepted after {} polls", self.polls);
        // One accept per listen comm: it has no further use.
        self.close();
        Ok(Some(RecvConn {
            c: Comm::new(self.net, comm, Kind::Recv, label),
            dev: self.dev,
            slot,
        }))
    }

    /// Accepts one connection, polling until `timeout` has passed.
    pub fn accept(mut self, timeout: Duration) -> Result<RecvConn<'a>> {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            if let Some(conn) = self.try_accept()? {
                return Ok(conn);
            }
            if start.elapsed() >= timeout {
                return Err(Error::remote(format!(
                    "{}: no connection arrived within {} ({} polls); the peer must connect with this listener's {}",
                    self.what(),
                    secs(timeout),
                    self.polls,
                    handle_digest(&self.handle)
                )));
            }
            backoff.snooze();
        }
    }

    fn close(&mut self) {
        if let Some(c) = self.comm.take() {
            // SAFETY: `c` was the open listen comm, taken out so it is closed once.
            if let Err(e) = unsafe { self.net.close_listen(c) } {
                log::warn!("close listen comm on {} device {}: {e}", self.net.name(), self.dev);
            }
        }
    }
}

impl std::fmt::Debug for Listener<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Listener({} device {}, {})",
            self.net.name(),
            self.dev,
            handle_digest(&self.handle)
        )
    }
}

impl Drop for Listener<'_> {
    fn drop(&mut self) {
        self.close();
    }
}

/// A connection attempt in progress. It owns the one handle buffer that every connect call gets
/// (boxed: its address and contents stay as the transport left them, as TCPX requires).
pub struct Connector<'a> {
    net: &'a dyn Transport,
    dev: i32,
    handle: Box<Handle>,
    slot: DevSlot,
    peer: String,
    polls: u64,
    done: bool,
}

impl<'a> Connector<'a> {
    /// Prepares to connect from device `dev` to the listener that made `handle`.
    pub fn new(net: &'a dyn Transport, dev: i32, handle: Handle) -> Connector<'a> {
        let peer = handle_digest(&handle);
        Connector {
            net,
            dev,
            handle: Box::new(handle),
            slot: DevSlot::null(),
            peer,
            polls: 0,
            done: false,
        }
    }

    /// Names the peer in messages (default: a digest of the handle).
    pub fn with_peer(mut self, peer: impl Into<String>) -> Connector<'a> {
        self.peer = format!("{} ({})", peer.into(), handle_digest(&self.handle));
        self
    }

    fn what(&self) -> String {
        format!("connect from {} device {} to {}", self.net.name(), self.dev, self.peer)
    }

    /// One non-blocking connect attempt: `Ok(None)` means "not yet".
    pub fn try_connect(&mut self) -> Result<Option<SendConn<'a>>> {
        if self.done {
            return Err(Error::invalid_usage(format!(
                "{}: already connected; a handle serves one connection",
                self.what()
            )));
        }
        self.polls += 1;
        // SAFETY: the handle lives in this connector and is passed, unchanged, on every call; the
        // slot is a valid device-handle pointer.
        let res = unsafe { self.net.connect(self.dev, &mut self.handle, self.slot.as_arg()) };
        let Some(comm) = res.map_err(|e| e.context(self.what()))? else {
            return Ok(None);
        };
        self.done = true;
        // SAFETY: `comm` was just connected and is open.
        let label = match unsafe { self.net.describe_comm(comm) } {
            Some(d) => format!("send connection from {} device {} ({d})", self.net.name(), self.dev),
            None => format!(
                "send connection from {} device {} to {}",
                self.net.name(),
                self.dev,
                self.peer
            ),
        };
        log::debug!("{label}: connected after {} polls", self.polls);
        Ok(Some(SendConn {
            c: Comm::new(self.net, comm, Kind::Send, label),
            dev: self.dev,
        }))
    }

    /// Connects, polling until `timeout` has passed.
    pub fn connect(mut self, timeout: Duration) -> Result<SendConn<'a>> {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            if let Some(conn) = self.try_connect()? {
                return Ok(conn);
            }
            if start.elapsed() >= timeout {
                return Err(self.timeout_error(timeout));
            }
            backoff.snooze();
        }
    }

    pub(crate) fn timeout_error(&self, timeout: Duration) -> Error {
        Error::remote(format!(
            "{}: not connected within {} ({} attempts); is the peer still listening and reachable?",
            self.what(),
            secs(timeout),
            self.polls
        ))
    }
}

/// Connects from device `dev` to the listener that made `handle`, within `timeout`.
pub fn connect<'a>(net: &'a dyn Transport, dev: i32, handle: Handle, timeout: Duration) -> Result<SendConn<'a>> {
    Connector::new(net, dev, handle).connect(timeout)
}

mod sealed {
    /// Implemented by this module's types only.
    pub trait Sealed {}
    /// Gives the connection's comm to the provided methods of `Conn`.
    pub trait HasComm {
        fn comm_state(&self) -> &super::Comm<'_>;
    }
}

/// A send or receive connection (something memory can be registered on).
pub trait Conn: sealed::HasComm {
    /// Registers `buf` (host memory) for transfers on this connection.
    fn reg(&self, buf: &mut [u8]) -> Result<Mr<'_>> {
        reg_on(self.comm_state(), buf)
    }

    /// A short description of the connection for messages.
    fn label(&self) -> &str {
        &self.comm_state().label
    }

    /// Whether the connection was closed after a failure.
    fn is_closed(&self) -> bool {
        self.comm_state().comm.get().is_none()
    }
}

/// Registers `buf` (NCCL_PTR_HOST) on `conn`; deregistered when the [`Mr`] is dropped.
pub fn reg<'c, C: Conn>(conn: &'c C, buf: &mut [u8]) -> Result<Mr<'c>> {
    conn.reg(buf)
}

fn reg_on<'c>(c: &'c Comm<'_>, buf: &mut [u8]) -> Result<Mr<'c>> {
    let comm = c.get()?;
    // SAFETY: the comm is open and `buf` is host memory of that length; the transport only
    // records the range (data moves with requests, which own their buffers).
    let mr = unsafe {
        c.net
            .reg_mr(comm, buf.as_mut_ptr().cast::<c_void>(), buf.len(), NCCL_PTR_HOST as i32)
    }
    .map_err(|e| e.context(format!("{}: register {} B of host memory", c.label, buf.len())))?;
    // Shorten the lifetime of the transport borrow to 'c ("&'c Comm<'c>") so Mr has one lifetime.
    let c: &'c Comm<'c> = c;
    Ok(Mr {
        c,
        mr,
        base: buf.as_ptr() as usize,
        len: buf.len(),
    })
}

/// A memory registration; deregistered on drop (it cannot outlive its connection).
pub struct Mr<'c> {
    c: &'c Comm<'c>,
    mr: Opaque,
    base: usize,
    len: usize,
}

impl Mr<'_> {
    /// The registered length.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the registration is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that `buf` lies inside this registration, made on `c`.
    fn check(&self, c: &Comm<'_>, buf: &[u8]) -> Result<Opaque> {
        if !std::ptr::eq(
            self.c as *const Comm<'_> as *const u8,
            c as *const Comm<'_> as *const u8,
        ) {
            return Err(Error::invalid_usage(format!(
                "{}: memory registration belongs to another connection ({})",
                c.label, self.c.label
            )));
        }
        let start = buf.as_ptr() as usize;
        if start < self.base || start + buf.len() > self.base + self.len {
            return Err(Error::invalid_usage(format!(
                "{}: buffer {start:#x}+{} is outside the registered region {:#x}+{}",
                c.label,
                buf.len(),
                self.base,
                self.len
            )));
        }
        Ok(self.mr)
    }
}

impl Drop for Mr<'_> {
    fn drop(&mut self) {
        // A comm closed after a failure took its registrations with it.
        if let Some(comm) = self.c.comm.get() {
            // SAFETY: the registration was made on this open comm and is released once, here.
            if let Err(e) = unsafe { self.c.net.dereg_mr(comm, self.mr) } {
                log::warn!("{}: deregister memory: {e}", self.c.label);
            }
        }
    }
}

/// Buffers a send may use while in flight: their bytes stay put when the owner moves.
pub trait SendBuf: sealed::Sealed + std::ops::Deref<Target = [u8]> {}
/// Buffers a receive may use while in flight: their bytes stay put when the owner moves.
pub trait RecvBuf: SendBuf + std::ops::DerefMut {}
impl sealed::Sealed for &[u8] {}
impl SendBuf for &[u8] {}
impl sealed::Sealed for &mut [u8] {}
impl SendBuf for &mut [u8] {}
impl RecvBuf for &mut [u8] {}
impl sealed::Sealed for Vec<u8> {}
impl SendBuf for Vec<u8> {}
impl RecvBuf for Vec<u8> {}
impl sealed::Sealed for Box<[u8]> {}
impl SendBuf for Box<[u8]> {}
impl RecvBuf for Box<[u8]> {}

/// The outcome of a non-blocking post.
pub enum Posted<P, B> {
    /// The request is in flight.
    Posted(P),
    /// The transport said "try again"; here is the buffer back.
    Busy(B),
}

fn size_i32(c: &Comm<'_>, len: usize) -> Result<i32> {
    i32::try_from(len).map_err(|_| {
        Error::invalid_argument(format!(
            "{}: message of {len} B is larger than the v7 limit of 2^31-1 B",
            c.label
        ))
    })
}

/// A request in flight, holding its buffer until completion. Test requests of one connection in
/// the order they were posted (TCPX requires it). Dropping one before it completes closes the
/// connection, so that the transport stops using the buffer.
pub struct Pending<'c, B> {
    c: &'c Comm<'c>,
    req: Option<Opaque>,
    buf: Option<B>,
    size: usize,
    done: Option<usize>,
    index: u64,
}

/// A send in flight.
pub type PendingSend<'c, B> = Pending<'c, B>;
/// A receive in flight.
pub type PendingRecv<'c, B> = Pending<'c, B>;

impl<'c, B> Pending<'c, B> {
    /// Tests once: `Some(bytes)` once complete (sent size, or received size).
    pub fn poll(&mut self) -> Result<Option<usize>> {
        if let Some(n) = self.done {
            return Ok(Some(n));
        }
        let req = self.req.expect("a pending request has a request until done");
        let mut sizes = [0i32; 1];
        let what = |c: &Comm<'_>| match c.kind {
            Kind::Send => format!("{}: send #{} ({} B)", c.label, self.index, self.size),
            Kind::Recv => format!("{}: receive #{} ({} B posted)", c.label, self.index, self.size),
        };
        // SAFETY: `req` is outstanding on this connection's open comm.
        let done = match unsafe { self.c.net.test(req, Some(&mut sizes)) } {
            Ok(d) => d,
            Err(e) => {
                let msg = format!("{}: {e}", what(self.c));
                self.c.abandon(&msg);
                self.req = None;
                self.done = Some(0);
                return Err(e.context(what(self.c)));
            }
        };
        if !done {
            return Ok(None);
        }
        self.req = None;
        let n = usize::try_from(sizes[0]).unwrap_or(0);
        self.done = Some(n);
        if self.c.kind == Kind::Recv && n > self.size {
            let msg = format!("{}: received {n} B into a {} B buffer", what(self.c), self.size);
            self.c.abandon(&msg);
            return Err(Error::remote(msg));
        }
        Ok(Some(n))
    }

    /// Whether the request completed.
    pub fn is_done(&self) -> bool {
        self.done.is_some()
    }

    /// Waits until complete, failing if no completion comes within `timeout`. Returns the byte
    /// count and the buffer.
    pub fn wait(mut self, timeout: Duration) -> Result<(usize, B)> {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            if let Some(n) = self.poll()? {
                let buf = self.buf.take().expect("buffer held until completion");
                return Ok((n, buf));
            }
            if start.elapsed() >= timeout {
                let kind = if self.c.kind == Kind::Send { "send" } else { "receive" };
                return Err(Error::remote(format!(
                    "{}: {kind} #{} of {} B did not complete within {}; the peer stopped {}",
                    self.c.label,
                    self.index,
                    self.size,
                    secs(timeout),
                    if self.c.kind == Kind::Send {
                        "receiving"
                    } else {
                        "sending"
                    }
                )));
            }
            backoff.snooze();
        }
    }
}

impl<B> Drop for Pending<'_, B> {
    fn drop(&mut self) {
        if self.req.is_some() {
            let msg = format!("a request of {} B was dropped before it completed", self.size);
            self.c.abandon(&msg);
        }
    }
}

/// Posts with retries on "try again" until `timeout`.
fn post_retry<P, B>(
    timeout: Duration,
    what: impl Fn() -> String,
    mut buf: B,
    mut try_post: impl FnMut(B) -> Result<Posted<P, B>>,
) -> Result<P> {
    let start = Instant::now();
    let mut backoff = Backoff::new();
    loop {
        match try_post(buf)? {
            Posted::Posted(p) => return Ok(p),
            Posted::Busy(b) => buf = b,
        }
        if start.elapsed() >= timeout {
            return Err(Error::remote(format!(
                "{}: the transport kept answering \"try again\" for {} (connection not ready?)",
                what(),
                secs(timeout)
            )));
        }
        backoff.snooze();
    }
}

/// The sending side of a connection; closed on drop.
pub struct SendConn<'a> {
    c: Comm<'a>,
    dev: i32,
}

impl std::fmt::Debug for SendConn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SendConn({})", self.c.label)
    }
}

impl sealed::HasComm for SendConn<'_> {
    fn comm_state(&self) -> &Comm<'_> {
        &self.c
    }
}
impl Conn for SendConn<'_> {}

/// Per-comm request counters, for messages.
static NEXT_INDEX: AtomicU64 = AtomicU64::new(1);

impl<'a> SendConn<'a> {
    /// The local device.
    pub fn dev(&self) -> i32 {
        self.dev
    }

    /// Posts a send of `buf` (inside `mr`) once; `Busy` gives the buffer back on "try again".
    pub fn try_isend<'c, B: SendBuf>(&'c self, buf: B, mr: &Mr<'_>) -> Result<Posted<PendingSend<'c, B>, B>> {
        let c: &'c Comm<'c> = &self.c;
        let mrh = mr.check(c, &buf)?;
        let size = size_i32(c, buf.len())?;
        let comm = c.get()?;
        let ptr = buf.as_ptr().cast_mut().cast::<c_void>();
        // SAFETY: the comm is open, `mrh` its registration covering the buffer, which the pending
        // send owns until the request completes or the connection is closed.
        match unsafe { self.c.net.isend(comm, ptr, size, TAG, Some(mrh)) } {
            Ok(Some(req)) => Ok(Posted::Posted(Pending {
                c,
                req: Some(req),
                size: buf.len(),
                buf: Some(buf),
                done: None,
                index: NEXT_INDEX.fetch_add(1, Ordering::Relaxed),
            })),
            Ok(None) => Ok(Posted::Busy(buf)),
            Err(e) => Err(e.context(format!("{}: isend of {} B", c.label, buf.len()))),
        }
    }

    /// Posts a send, retrying "try again" until `timeout`.
    pub fn isend<'c, B: SendBuf>(&'c self, buf: B, mr: &Mr<'_>, timeout: Duration) -> Result<PendingSend<'c, B>> {
        let len = buf.len();
        post_retry(
            timeout,
            || format!("{}: isend of {len} B", self.c.label),
            buf,
            |b| self.try_isend(b, mr),
        )
    }

    /// Sends `buf` and waits for completion (no completion or progress for `timeout`: error).
    pub fn send(&self, buf: &[u8], mr: &Mr<'_>, timeout: Duration) -> Result<()> {
        self.isend(buf, mr, timeout)?.wait(timeout).map(|_| ())
    }

    /// Sends `count` messages of `size` bytes with up to `depth` (at most [`MAX_INFLIGHT`]) in
    /// flight, message `i` from slot `i % (buf.len() / size)` of `buf`.
    ///
    /// With `fill`, each slot is rewritten by `fill(i, slot)` just before message `i` goes out
    /// (never while in flight, so fewer slots limit the depth); without it, the same bytes may be
    /// in flight several times at once. Fails when nothing completes for `timeout`.
    #[allow(clippy::too_many_arguments)]
    pub fn send_stream(
        &self,
        buf: &mut [u8],
        size: usize,
        count: usize,
        depth: usize,
        mr: &Mr<'_>,
        timeout: Duration,
        fill: Option<FillFn<'_>>,
    ) -> Result<()> {
        let nslots = slots_of(&self.c, buf.len(), size)?;
        let depth = depth.clamp(1, MAX_INFLIGHT);
        match fill {
            Some(fill) => {
                let slots = mut_slots(buf, size, nslots);
                stream(
                    &self.c,
                    count,
                    depth.min(nslots),
                    timeout,
                    slots,
                    |i, s| fill(i, s),
                    |b| self.try_isend(b, mr),
                    |_, _, _| Ok(()),
                )
            }
            None => {
                let one: &[u8] = &buf[..size];
                let slots: Vec<Option<&[u8]>> = vec![Some(one); depth];
                stream(
                    &self.c,
                    count,
                    depth,
                    timeout,
                    slots,
                    |_, _| {},
                    |b| self.try_isend(b, mr),
                    |_, _, _| Ok(()),
                )
            }
        }
    }
}

/// Rewrites slot contents before message `i` goes out: `fill(i, slot)`.
pub type FillFn<'f> = &'f mut dyn FnMut(usize, &mut [u8]);

/// The number of `size`-byte slots in a buffer of `len` bytes (one for empty messages).
fn slots_of(c: &Comm<'_>, len: usize, size: usize) -> Result<usize> {
    if size == 0 {
        return Ok(1);
    }
    if len < size {
        return Err(Error::invalid_argument(format!(
            "{}: buffer of {len} B is smaller than the message size {size} B",
            c.label
        )));
    }
    Ok(len / size)
}

/// `nslots` disjoint `size`-byte slots of `buf` (one empty slot at its start for 0-byte messages).
fn mut_slots(buf: &mut [u8], size: usize, nslots: usize) -> Vec<Option<&mut [u8]>> {
    if size == 0 {
        return vec![Some(&mut buf[..0])];
    }
    buf.chunks_exact_mut(size).take(nslots).map(Some).collect()
}

/// The pipeline loop shared by both directions: keeps up to `depth` requests in flight, tests
/// the oldest (FIFO), hands completed slots to `done` and reuses them.
#[allow(clippy::too_many_arguments)]
fn stream<'c, B: SendBuf>(
    c: &Comm<'_>,
    count: usize,
    depth: usize,
    timeout: Duration,
    mut slots: Vec<Option<B>>,
    mut fill: impl FnMut(usize, &mut B),
    mut try_post: impl FnMut(B) -> Result<Posted<Pending<'c, B>, B>>,
    mut done: impl FnMut(usize, usize, &B) -> Result<()>,
) -> Result<()> {
    let nslots = slots.len();
    let depth = depth.min(nslots).max(1);
    let mut inflight: VecDeque<(usize, Pending<'c, B>)> = VecDeque::with_capacity(depth);
    let (mut posted, mut completed) = (0usize, 0usize);
    let mut filled = false;
    let mut last_progress = Instant::now();
    let mut backoff = Backoff::new();
    while completed < count {
        let mut progressed = false;
        if posted < count && inflight.len() < depth {
            let slot = posted % nslots;
            let mut b = slots[slot]
                .take()
                .expect("a slot is free once its previous message completed");
            if !filled {
                fill(posted, &mut b);
                filled = true;
            }
            match try_post(b)? {
                Posted::Posted(p) => {
                    inflight.push_back((posted, p));
                    posted += 1;
                    filled = false;
                    progressed = true;
                }
                Posted::Busy(b) => slots[slot] = Some(b),
            }
        }
        if let Some((i, front)) = inflight.front_mut() {
            if let Some(n) = front.poll()? {
                let i = *i;
                let (_, p) = inflight.pop_front().expect("front exists");
                let (_, b) = p.wait(Duration::ZERO)?;
                done(i, n, &b)?;
                slots[i % nslots] = Some(b);
                completed += 1;
                progressed = true;
            }
        }
        if progressed {
            last_progress = Instant::now();
            backoff.reset();
            continue;
        }
        if last_progress.elapsed() >= timeout {
            let state = if inflight.is_empty() {
                "the transport kept answering \"try again\" to new requests".to_string()
            } else {
                format!("{} in flight", inflight.len())
            };
            return Err(Error::remote(format!(
                "{}: no progress for {} at message {} of {count} ({state}); the peer stopped {}",
                c.label,
                secs(timeout),
                completed + 1,
                if c.kind == Kind::Send { "receiving" } else { "sending" }
            )));
        }
        backoff.snooze();
    }
    Ok(())
}

/// The receiving side of a connection; closed on drop.
pub struct RecvConn<'a> {
    c: Comm<'a>,
    dev: i32,
    // Declared after `c`: the device handle outlives the comm that may point at it.
    slot: DevSlot,
}

impl std::fmt::Debug for RecvConn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecvConn({})", self.c.label)
    }
}

impl sealed::HasComm for RecvConn<'_> {
    fn comm_state(&self) -> &Comm<'_> {
        &self.c
    }
}
impl Conn for RecvConn<'_> {}

impl<'a> RecvConn<'a> {
    /// The local device.
    pub fn dev(&self) -> i32 {
        self.dev
    }

    /// What the transport wrote into the device handle at accept time (`None`: nothing).
    pub fn dev_handle(&self) -> Option<DevHandleInfo> {
        self.slot.info()
    }

    /// Posts a receive into `buf` (inside `mr`) once; `Busy` gives the buffer back on "try again".
    pub fn try_irecv<'c, B: RecvBuf>(&'c self, mut buf: B, mr: &Mr<'_>) -> Result<Posted<PendingRecv<'c, B>, B>> {
        let c: &'c Comm<'c> = &self.c;
        let mrh = mr.check(c, &buf)?;
        let size = size_i32(c, buf.len())?;
        let comm = c.get()?;
        let ptr = buf.as_mut_ptr().cast::<c_void>();
        // SAFETY: as in try_isend; the pending receive owns the buffer meanwhile.
        match unsafe { self.c.net.irecv(comm, &[ptr], &[size], &[TAG], &[Some(mrh)]) } {
            Ok(Some(req)) => Ok(Posted::Posted(Pending {
                c,
                req: Some(req),
                size: buf.len(),
                buf: Some(buf),
                done: None,
                index: NEXT_INDEX.fetch_add(1, Ordering::Relaxed),
            })),
            Ok(None) => Ok(Posted::Busy(buf)),
            Err(e) => Err(e.context(format!("{}: irecv of {} B", c.label, buf.len()))),
        }
    }

    /// Posts a receive, retrying "try again" until `timeout`.
    pub fn irecv<'c, B: RecvBuf>(&'c self, buf: B, mr: &Mr<'_>, timeout: Duration) -> Result<PendingRecv<'c, B>> {
        let len = buf.len();
        post_retry(
            timeout,
            || format!("{}: irecv of {len} B", self.c.label),
            buf,
            |b| self.try_irecv(b, mr),
        )
    }

    /// Receives one message into `buf`, returning its size (no completion for `timeout`: error).
    pub fn recv(&self, buf: &mut [u8], mr: &Mr<'_>, timeout: Duration) -> Result<usize> {
        self.irecv(buf, mr, timeout)?.wait(timeout).map(|(n, _)| n)
    }

    /// Receives `count` messages of exactly `size` bytes with up to `depth` (at most
    /// [`MAX_INFLIGHT`], and at most `buf.len() / size`) in flight, message `i` into slot
    /// `i % (buf.len() / size)`. `check(i, data)` sees each message once it has arrived; an error
    /// from it stops the stream. Fails when nothing completes for `timeout`.
    #[allow(clippy::too_many_arguments)]
    pub fn recv_stream(
        &self,
        buf: &mut [u8],
        size: usize,
        count: usize,
        depth: usize,
        mr: &Mr<'_>,
        timeout: Duration,
        check: &mut dyn FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let nslots = slots_of(&self.c, buf.len(), size)?;
        let depth = depth.clamp(1, MAX_INFLIGHT).min(nslots);
        let slots = mut_slots(buf, size, nslots);
        let label = &self.c.label;
        stream(
            &self.c,
            count,
            depth,
            timeout,
            slots,
            |_, _| {},
            |b| self.try_irecv(b, mr),
            |i, n, b| {
                if n != size {
                    return Err(Error::remote(format!(
                        "{label}: message {i} has {n} B, expected {size} B"
                    )));
                }
                check(i, b)
            },
        )
    }
}
