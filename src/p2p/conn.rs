//! Listen, connect and accept over one [`Transport`], and the connections they give.
//!
//! Every wait here is bounded by a timeout. A transfer that fails or is abandoned while the
//! transport may still use its buffer closes the connection at once (so the transport stops
//! touching the buffer); later calls on that connection fail with a message saying why.
//! Registered memory is in `buf`, transfers in `xfer`.

use super::buf::{reg_on, RegBuf};
use crate::error::{Error, Result};
use crate::ffi::{DevHandle, HANDLE_SIZE};
use crate::transport::{DeviceType, Opaque, Transport};
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The 128-byte connection handle NCCL carries between ranks.
pub type Handle = [u8; HANDLE_SIZE];

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
pub(super) enum Kind {
    Send,
    Recv,
}

/// A send or receive comm, closed on drop. It can be closed early ("abandoned") when a
/// transfer fails, after which every call reports why. (Public only to the sealed trait.)
#[doc(hidden)]
pub struct Comm<'a> {
    pub(super) net: &'a dyn Transport,
    comm: Cell<Option<Opaque>>,
    pub(super) kind: Kind,
    pub(super) label: String,
    why_closed: RefCell<Option<String>>,
    /// Closing failed (or has not returned yet): the transport may still use what it was given
    /// on this comm, so buffers of requests outstanding then, and registered memory, are never
    /// freed.
    close_failed: Cell<bool>,
}

impl<'a> Comm<'a> {
    fn new(net: &'a dyn Transport, comm: Opaque, kind: Kind, label: String) -> Comm<'a> {
        Comm {
            net,
            comm: Cell::new(Some(comm)),
            kind,
            label,
            why_closed: RefCell::new(None),
            close_failed: Cell::new(false),
        }
    }

    /// The open comm, or an error saying why it was closed.
    pub(super) fn get(&self) -> Result<Opaque> {
        self.comm.get().ok_or_else(|| {
            let why = self.why_closed.borrow().clone().unwrap_or_else(|| "closed".into());
            Error::invalid_usage(format!(
                "{}: connection was closed after an earlier failure ({why})",
                self.label
            ))
        })
    }

    /// The open comm, if it is open.
    pub(super) fn open(&self) -> Option<Opaque> {
        self.comm.get()
    }

    /// Whether the comm was closed and closing succeeded: the transport then uses nothing it was
    /// given on it any more (the trait's contract), so those buffers may be freed or handed back.
    pub(super) fn released(&self) -> bool {
        self.comm.get().is_none() && !self.close_failed.get()
    }

    fn close_now(&self) -> Result<()> {
        let Some(c) = self.comm.take() else { return Ok(()) };
        // Until the transport reports the comm closed, what it was given on it may still be in
        // use; this holds too should the close panic.
        self.close_failed.set(true);
        let res = match self.kind {
            // SAFETY: `c` was this connection's open comm, taken out so it is closed once.
            Kind::Send => unsafe { self.net.close_send(c) },
            // SAFETY: as above.
            Kind::Recv => unsafe { self.net.close_recv(c) },
        };
        self.close_failed.set(res.is_err());
        res
    }

    /// Closes the comm because a request on it can no longer be waited for: the transport must
    /// stop using that request's buffer.
    pub(super) fn abandon(&self, why: &str) {
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
    /// Gives the connection's comm to the provided methods of `Conn`.
    pub trait HasComm {
        fn comm_state(&self) -> &super::Comm<'_>;
    }
}

/// A send or receive connection (something memory can be registered on).
pub trait Conn: sealed::HasComm {
    /// Registers `mem` (host memory) for transfers on this connection and takes it over: the
    /// [`RegBuf`] owns it, and deregisters, then frees it when dropped. Failing, `mem` is freed.
    fn reg(&self, mem: Vec<u8>) -> Result<RegBuf<'_>> {
        reg_on(self.comm_state(), mem)
    }

    /// Allocates `len` zeroed bytes and registers them on this connection.
    fn alloc(&self, len: usize) -> Result<RegBuf<'_>> {
        self.reg(vec![0u8; len])
    }

    /// A short description of the connection for messages.
    fn label(&self) -> &str {
        &self.comm_state().label
    }

    /// Whether the connection was closed after a failure.
    fn is_closed(&self) -> bool {
        self.comm_state().open().is_none()
    }
}

/// Registers `mem` (NCCL_PTR_HOST) on `conn`, handing it over to the [`RegBuf`]: see [`Conn::reg`].
pub fn reg<C: Conn>(conn: &C, mem: Vec<u8>) -> Result<RegBuf<'_>> {
    conn.reg(mem)
}

/// The sending side of a connection; closed on drop.
pub struct SendConn<'a> {
    pub(super) c: Comm<'a>,
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

impl SendConn<'_> {
    /// The local device.
    pub fn dev(&self) -> i32 {
        self.dev
    }
}

/// The receiving side of a connection; closed on drop.
pub struct RecvConn<'a> {
    pub(super) c: Comm<'a>,
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

impl RecvConn<'_> {
    /// The local device.
    pub fn dev(&self) -> i32 {
        self.dev
    }

    /// What the transport wrote into the device handle at accept time (`None`: nothing).
    pub fn dev_handle(&self) -> Option<DevHandleInfo> {
        self.slot.info()
    }
}
