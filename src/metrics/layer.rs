//! The metrics layer (`NCCL_TCPXSHIM_METRICS_DIR`): counts and times every connection's traffic
//! on the data path, for the Prometheus file ([`super::prom`]) and the end-of-run summary
//! ([`super::summary`]).
//!
//! Each send or receive comm the inner transport returns is wrapped in a [`Conn`] record, and the
//! comm NCCL (the shim above) holds is a pointer to it; each request is a pointer to one of the
//! record's slots, which holds the inner request and the time it was posted. The data path only
//! touches that record: relaxed loads and stores (the requests of one comm complete on the thread
//! driving it), no locks, no allocation. The records of every connection, closed ones included,
//! are also kept in a list the exporter reads, so a closed connection's final numbers stay in the
//! file until the process ends.
//!
//! Listen comms pass through unchanged; the layer only remembers their device.

use super::hist::{size_class, Hist, SIZE_CLASSES};
use crate::config::{Config, MetricsConfig};
use crate::error::{Error, Result};
use crate::ffi::{DevHandle, HANDLE_SIZE};
use crate::lock;
use crate::stack::{Layer, MAX_RECVS, MAX_REQUESTS};
use crate::transport::{DeviceType, Opaque, Transport};
use std::cell::UnsafeCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Now, in nanoseconds on the monotonic time line (see `clock`).
pub use super::clock::now_ns;

/// Comm numbers, unique in the process (over every stack it builds).
static NEXT_COMM: AtomicU64 = AtomicU64::new(0);

/// Direction of a connection: the `dir` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// A send comm (from connect).
    Send,
    /// A receive comm (from accept).
    Recv,
}

impl Dir {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Dir::Send => "send",
            Dir::Recv => "recv",
        }
    }
}

/// What a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Send,
    Recv,
    Flush,
    /// A completed receive of an UNPACK transport, kept until irecvConsumed releases it.
    Consume,
}

#[derive(Clone, Copy)]
struct SlotState {
    inner: Option<Opaque>,
    /// Posted bytes (sends).
    bytes: u64,
    /// Grouped receives.
    n: u8,
    op: Op,
}

/// One request of a comm. The request pointer NCCL holds points here.
struct Slot {
    conn: *const Conn,
    index: u8,
    /// Written and read only on the thread driving the comm.
    st: UnsafeCell<SlotState>,
    /// When the outstanding request was posted (ns, [`now_ns`]); 0: none outstanding. Also read
    /// by the exporter, for stalled requests.
    posted_ns: AtomicU64,
}

impl Slot {
    /// The slot's request state.
    #[inline]
    fn state(&self) -> SlotState {
        // SAFETY: only the thread driving this slot's comm touches `st` (see the Sync impl).
        unsafe { *self.st.get() }
    }
    #[inline]
    fn set(&self, s: SlotState) {
        // SAFETY: as in `state`.
        unsafe { *self.st.get() = s };
    }
    fn opaque(&self) -> Opaque {
        Opaque::from_nonnull(std::ptr::NonNull::from(self))
    }
}

/// Adds `d` to a counter only one thread writes: a load and a store, not a read-modify-write.
#[inline]
fn bump(a: &AtomicU64, d: u64) {
    a.store(a.load(Relaxed).wrapping_add(d), Relaxed);
}

/// One send or receive connection: its labels, counters and request slots.
pub struct Conn {
    /// The `comm` label: unique in the process.
    pub comm: u64,
    /// The `dir` label.
    pub dir: Dir,
    /// The `peer` label: the inner transport's description of the comm (commas made `;`), or
    /// "dev N".
    pub peer: String,
    /// The `dev` label.
    pub dev: i32,
    inner: Opaque,
    unpack: bool,
    /// When the connection was made (ns).
    pub opened_ns: u64,
    /// When it was closed (ns); 0 while open.
    pub closed_ns: AtomicU64,
    /// Completed send or receive requests.
    pub messages: AtomicU64,
    /// Their payload bytes (receives: the sizes the transport reported).
    pub bytes: AtomicU64,
    /// Requests posted and not completed.
    pub in_flight: AtomicU64,
    /// Failed posts, tests and closes.
    pub errors: AtomicU64,
    /// Connections recovered after a failure (the resilience layer counts them).
    pub recoveries: AtomicU64,
    /// Last post or completion (ns).
    pub last_progress_ns: AtomicU64,
    /// Post-to-completion latency per size class ([`SIZE_CLASSES`]).
    pub lat: [Hist; SIZE_CLASSES.len()],
    /// Bit i set: slot i is free. Only the thread driving the comm touches it.
    free: UnsafeCell<u64>,
    slots: [Slot; MAX_REQUESTS],
}

const _: () = assert!(MAX_REQUESTS <= 64, "one bit per slot in a u64");

// SAFETY: the UnsafeCell fields (the free mask and the slots' states) are read and written only by
// the thread that drives the comm: NCCL, and the shim above, call a comm and its requests from
// one thread at a time (Transport's contract), and the exporter reads atomics only. `Slot::conn`
// points at the record that holds the slot, which lives as long as the slot does.
unsafe impl Send for Conn {}
// SAFETY: as above.
unsafe impl Sync for Conn {}

impl Conn {
    pub(crate) fn new(dir: Dir, peer: String, dev: i32, inner: Opaque, unpack: bool) -> Arc<Conn> {
        let now = now_ns();
        Arc::new_cyclic(|me| {
            let p = me.as_ptr();
            Conn {
                comm: NEXT_COMM.fetch_add(1, Relaxed),
                dir,
                peer,
                dev,
                inner,
                unpack,
                opened_ns: now,
                closed_ns: AtomicU64::new(0),
                messages: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                in_flight: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                recoveries: AtomicU64::new(0),
                last_progress_ns: AtomicU64::new(now),
                lat: Default::default(),
                free: UnsafeCell::new(if MAX_REQUESTS == 64 {
                    u64::MAX
                } else {
                    (1u64 << MAX_REQUESTS) - 1
                }),
                slots: std::array::from_fn(|i| Slot {
                    conn: p,
                    index: i as u8,
                    st: UnsafeCell::new(SlotState {
                        inner: None,
                        bytes: 0,
                        n: 0,
                        op: Op::Flush,
                    }),
                    posted_ns: AtomicU64::new(0),
                }),
            }
        })
    }

    #[inline]
    fn take_slot(&self) -> Result<&Slot> {
        // SAFETY: only the thread driving this comm touches the mask (see the Sync impl).
        let free = unsafe { &mut *self.free.get() };
        if *free == 0 {
            return Err(Error::invalid_usage(format!(
                "more than {MAX_REQUESTS} requests outstanding on one comm"
            )));
        }
        let i = free.trailing_zeros() as usize;
        *free &= !(1u64 << i);
        Ok(&self.slots[i])
    }

    #[inline]
    fn release(&self, s: &Slot) {
        s.set(SlotState {
            inner: None,
            ..s.state()
        });
        // SAFETY: as in take_slot.
        unsafe { *self.free.get() |= 1u64 << s.index };
    }

    /// Records the outcome of posting into slot `s` at `t`.
    #[inline]
    fn posted(
        &self,
        s: &Slot,
        t: u64,
        r: Result<Option<Opaque>>,
        op: Op,
        bytes: u64,
        n: usize,
    ) -> Result<Option<Opaque>> {
        match r {
            Ok(Some(ir)) => {
                s.set(SlotState {
                    inner: Some(ir),
                    bytes,
                    n: n as u8,
                    op,
                });
                s.posted_ns.store(t.max(1), Relaxed);
                bump(&self.in_flight, 1);
                self.last_progress_ns.store(t, Relaxed);
                Ok(Some(s.opaque()))
            }
            Ok(None) => {
                self.release(s);
                Ok(None)
            }
            Err(e) => {
                self.release(s);
                self.errors.fetch_add(1, Relaxed);
                Err(e)
            }
        }
    }

    /// Records the completion of the request in `s` at `end`, of `bytes` bytes.
    #[inline]
    fn completed(&self, s: &Slot, st: SlotState, end: u64, bytes: u64) {
        let posted = s.posted_ns.load(Relaxed);
        s.posted_ns.store(0, Relaxed);
        if st.op != Op::Flush {
            bump(&self.messages, 1);
            bump(&self.bytes, bytes);
            self.lat[size_class(bytes)].observe_single(end.saturating_sub(posted));
        }
        self.in_flight
            .store(self.in_flight.load(Relaxed).saturating_sub(1), Relaxed);
        self.last_progress_ns.store(end, Relaxed);
        if st.op == Op::Recv && self.unpack {
            s.set(SlotState { op: Op::Consume, ..st });
        } else {
            self.release(s);
        }
    }

    /// Records a failed test of the request in `s`: it is gone.
    fn failed(&self, s: &Slot) {
        s.posted_ns.store(0, Relaxed);
        self.in_flight
            .store(self.in_flight.load(Relaxed).saturating_sub(1), Relaxed);
        self.errors.fetch_add(1, Relaxed);
        self.release(s);
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.closed_ns.load(Relaxed) != 0
    }

    /// Requests outstanding for longer than `limit_ns` at `now`.
    pub fn stalled(&self, now: u64, limit_ns: u64) -> u64 {
        self.slots
            .iter()
            .map(|s| s.posted_ns.load(Relaxed))
            .filter(|&t| t != 0 && now.saturating_sub(t) > limit_ns)
            .count() as u64
    }

    /// Seconds since the last post or completion at `now` (frozen at the close of a closed
    /// connection).
    pub fn progress_age_secs(&self, now: u64) -> f64 {
        let end = match self.closed_ns.load(Relaxed) {
            0 => now,
            c => c,
        };
        end.saturating_sub(self.last_progress_ns.load(Relaxed)) as f64 / 1e9
    }

    /// Seconds the connection was (or has been) open at `now`.
    pub fn open_secs(&self, now: u64) -> f64 {
        let end = match self.closed_ns.load(Relaxed) {
            0 => now,
            c => c,
        };
        end.saturating_sub(self.opened_ns) as f64 / 1e9
    }
}

/// The comm record behind `comm`.
///
/// # Safety
/// `comm` was returned by this layer's connect or accept and is not closed.
#[inline]
unsafe fn conn<'a>(comm: Opaque) -> &'a Conn {
    // SAFETY: the caller's promise: it points at a live Conn (kept alive by the reference the
    // handle owns, released at close).
    unsafe { &*(comm.as_ptr() as *const Conn) }
}

/// The slot behind `req`.
///
/// # Safety
/// `req` was returned by this layer's isend, irecv or iflush, and its comm is not closed.
#[inline]
unsafe fn slot<'a>(req: Opaque) -> &'a Slot {
    // SAFETY: the caller's promise: it points at a slot of a live Conn.
    unsafe { &*(req.as_ptr() as *const Slot) }
}

/// State shared by the layer, its exporter thread and the encoder.
pub struct Shared {
    /// Rank, local rank, host, interval.
    pub labels: MetricsConfig,
    /// The `transport` label: the inner transport's name.
    pub transport: String,
    /// Where the file goes.
    pub dir: PathBuf,
    /// NCCL_TCPXSHIM_STALL_WARN in ns (0: requests are never counted stalled).
    pub stall_warn_ns: u64,
    /// Send and receive comms open now.
    pub open: AtomicU64,
    /// Send and receive comms opened so far.
    pub opened: AtomicU64,
    /// First connect() call to the one returning the comm.
    pub connect_hist: Hist,
    /// First accept() call on a listen comm to the one returning the comm.
    pub accept_hist: Hist,
    /// Every connection made, closed ones included.
    pub conns: Mutex<Vec<Arc<Conn>>>,
    /// Handle buffers with a connect in progress: when it started.
    connecting: Mutex<HashMap<usize, u64>>,
    /// Listen comms: device, and when the accept in progress started.
    listens: Mutex<HashMap<usize, (i32, Option<u64>)>>,
    /// Serialises writes of the file.
    pub(crate) write_lock: Mutex<()>,
    /// A failed write was reported already.
    pub(crate) warned: AtomicBool,
}

impl Shared {
    pub(crate) fn new(labels: MetricsConfig, transport: String, dir: PathBuf, stall_warn_ns: u64) -> Shared {
        Shared {
            labels,
            transport,
            dir,
            stall_warn_ns,
            open: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            connect_hist: Hist::default(),
            accept_hist: Hist::default(),
            conns: Mutex::new(Vec::new()),
            connecting: Mutex::new(HashMap::new()),
            listens: Mutex::new(HashMap::new()),
            write_lock: Mutex::new(()),
            warned: AtomicBool::new(false),
        }
    }

    /// The file this process writes: `<dir>/<host>-<pid>.prom`.
    pub fn file(&self) -> PathBuf {
        self.dir
            .join(format!("{}-{}.prom", self.labels.host, std::process::id()))
    }

    /// The records of every connection so far.
    pub fn conns(&self) -> Vec<Arc<Conn>> {
        lock(&self.conns).clone()
    }
}

/// The metrics layer over an inner transport.
pub struct Metrics {
    inner: Box<dyn Transport>,
    shared: Arc<Shared>,
    exporter: Option<super::prom::Exporter>,
}

impl Metrics {
    /// Counts the traffic of `inner`, writing the file into `dir` every `cfg.metrics.interval`
    /// from a background thread.
    pub fn new(inner: Box<dyn Transport>, cfg: &Config, dir: PathBuf) -> Metrics {
        super::clock::calibrate();
        let shared = Arc::new(Shared::new(
            cfg.metrics.clone(),
            inner.name().to_string(),
            dir,
            cfg.stall_warn.map_or(0, |d| d.as_nanos() as u64),
        ));
        log::info!(
            "metrics: writing {} every {} s",
            shared.file().display(),
            cfg.metrics.interval.as_secs()
        );
        let exporter = super::prom::Exporter::start(shared.clone(), cfg.metrics.interval);
        Metrics {
            inner,
            shared,
            exporter: Some(exporter),
        }
    }

    /// What the exporter reads.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Records a new connection over the inner comm `ic` and returns the comm handed up.
    ///
    /// The `peer` label is the inner transport's description up to its first comma, without a
    /// leading "peer " ("peer 10.0.0.2:41234, 4 streams" gives "10.0.0.2:41234").
    fn wrap(&self, ic: Opaque, dir: Dir, dev: i32) -> Opaque {
        // SAFETY: `ic` was just returned by the inner transport and is open.
        let peer = unsafe { self.inner.describe_comm(ic) }.map_or_else(|| format!("dev {dev}"), |d| peer_label(&d));
        let unpack = self
            .inner
            .properties(dev)
            .is_ok_and(|p| p.device_type == DeviceType::Unpack);
        let c = Conn::new(dir, peer, dev, ic, unpack);
        lock(&self.shared.conns).push(c.clone());
        self.shared.open.fetch_add(1, Relaxed);
        self.shared.opened.fetch_add(1, Relaxed);
        let p = Arc::into_raw(c).cast_mut();
        // SAFETY: Arc::into_raw never returns NULL.
        Opaque::from_nonnull(unsafe { std::ptr::NonNull::new_unchecked(p) })
    }

    /// Closes the comm `comm` of direction `dir`.
    ///
    /// # Safety
    /// `comm` is an open comm of this layer, and this is its only close.
    unsafe fn close(&self, comm: Opaque, dir: Dir) -> Result<()> {
        // SAFETY: the caller's promise: `comm` came from Arc::into_raw in wrap and is closed once,
        // so this takes back the reference the handle owned.
        let c = unsafe { Arc::from_raw(comm.as_ptr() as *const Conn) };
        // SAFETY: the inner comm is open, and this is its only close.
        let r = unsafe {
            match dir {
                Dir::Send => self.inner.close_send(c.inner),
                Dir::Recv => self.inner.close_recv(c.inner),
            }
        };
        if r.is_err() {
            c.errors.fetch_add(1, Relaxed);
        }
        for s in &c.slots {
            s.posted_ns.store(0, Relaxed);
        }
        c.in_flight.store(0, Relaxed);
        c.closed_ns.store(now_ns().max(1), Relaxed);
        drop(c);
        if self.shared.open.fetch_sub(1, Relaxed) == 1 {
            super::prom::write_logged(&self.shared);
            super::summary::log(&self.shared);
        }
        r
    }
}

impl Drop for Metrics {
    fn drop(&mut self) {
        // Stops the thread (and waits for it) before the layer goes.
        self.exporter.take();
    }
}

impl Layer for Metrics {
    fn inner(&self) -> &dyn Transport {
        &*self.inner
    }

    fn listen(&self, dev: i32, handle: &mut [u8; HANDLE_SIZE]) -> Result<Opaque> {
        let l = self.inner.listen(dev, handle)?;
        lock(&self.shared.listens).insert(l.as_ptr() as usize, (dev, None));
        Ok(l)
    }

    unsafe fn connect(
        &self,
        dev: i32,
        handle: &mut [u8; HANDLE_SIZE],
        dev_handle: *mut *mut DevHandle,
    ) -> Result<Option<Opaque>> {
        let key = handle.as_ptr() as usize;
        let start = *lock(&self.shared.connecting).entry(key).or_insert_with(now_ns);
        // SAFETY: forwarded under the caller's contract.
        let r = unsafe { self.inner.connect(dev, handle, dev_handle) };
        match r {
            Ok(None) => Ok(None),
            Ok(Some(ic)) => {
                lock(&self.shared.connecting).remove(&key);
                self.shared.connect_hist.observe(now_ns().saturating_sub(start));
                Ok(Some(self.wrap(ic, Dir::Send, dev)))
            }
            Err(e) => {
                lock(&self.shared.connecting).remove(&key);
                Err(e)
            }
        }
    }

    unsafe fn accept(&self, listen: Opaque, dev_handle: *mut *mut DevHandle) -> Result<Option<Opaque>> {
        let key = listen.as_ptr() as usize;
        let (dev, start) = {
            let mut l = lock(&self.shared.listens);
            let e = l.entry(key).or_insert((0, None));
            let start = *e.1.get_or_insert_with(now_ns);
            (e.0, start)
        };
        // SAFETY: forwarded under the caller's contract (listen comms pass through unchanged).
        let r = unsafe { self.inner.accept(listen, dev_handle) };
        let done = |l: &mut HashMap<usize, (i32, Option<u64>)>| {
            if let Some(e) = l.get_mut(&key) {
                e.1 = None;
            }
        };
        match r {
            Ok(None) => Ok(None),
            Ok(Some(ic)) => {
                done(&mut lock(&self.shared.listens));
                self.shared.accept_hist.observe(now_ns().saturating_sub(start));
                Ok(Some(self.wrap(ic, Dir::Recv, dev)))
            }
            Err(e) => {
                done(&mut lock(&self.shared.listens));
                Err(e)
            }
        }
    }

    unsafe fn close_listen(&self, comm: Opaque) -> Result<()> {
        lock(&self.shared.listens).remove(&(comm.as_ptr() as usize));
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner.close_listen(comm) }
    }

    unsafe fn reg_mr(&self, comm: Opaque, data: *mut c_void, size: usize, ptr_type: i32) -> Result<Opaque> {
        // SAFETY: the caller's contract: `comm` is an open comm of this layer, so its record is
        // live and its inner comm open.
        unsafe { self.inner.reg_mr(conn(comm).inner, data, size, ptr_type) }
    }

    unsafe fn reg_mr_dmabuf(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: usize,
        ptr_type: i32,
        offset: u64,
        fd: i32,
    ) -> Result<Opaque> {
        // SAFETY: as in reg_mr.
        unsafe {
            self.inner
                .reg_mr_dmabuf(conn(comm).inner, data, size, ptr_type, offset, fd)
        }
    }

    unsafe fn dereg_mr(&self, comm: Opaque, mr: Opaque) -> Result<()> {
        // SAFETY: as in reg_mr; registrations pass through unchanged.
        unsafe { self.inner.dereg_mr(conn(comm).inner, mr) }
    }

    unsafe fn isend(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: i32,
        tag: i32,
        mr: Option<Opaque>,
    ) -> Result<Option<Opaque>> {
        // SAFETY: as in reg_mr.
        let c = unsafe { conn(comm) };
        let s = c.take_slot()?;
        let t = now_ns();
        // SAFETY: forwarded to the open inner comm under the caller's contract.
        let r = unsafe { self.inner.isend(c.inner, data, size, tag, mr) };
        c.posted(s, t, r, Op::Send, size.max(0) as u64, 1)
    }

    unsafe fn irecv(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        tags: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        // SAFETY: as in reg_mr.
        let c = unsafe { conn(comm) };
        let s = c.take_slot()?;
        let t = now_ns();
        // SAFETY: as in isend.
        let r = unsafe { self.inner.irecv(c.inner, data, sizes, tags, mrs) };
        c.posted(s, t, r, Op::Recv, 0, data.len().clamp(1, MAX_RECVS))
    }

    unsafe fn iflush(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        // SAFETY: as in reg_mr.
        let c = unsafe { conn(comm) };
        let s = c.take_slot()?;
        let t = now_ns();
        // SAFETY: as in isend.
        let r = unsafe { self.inner.iflush(c.inner, data, sizes, mrs) };
        c.posted(s, t, r, Op::Flush, 0, data.len().clamp(1, MAX_RECVS))
    }

    unsafe fn test(&self, req: Opaque, sizes: Option<&mut [i32]>) -> Result<bool> {
        // SAFETY: the caller's contract: `req` is an outstanding request of this layer on an
        // open comm, so the slot and its record are live.
        let s = unsafe { slot(req) };
        // SAFETY: as above: the slot's record is live.
        let c = unsafe { &*s.conn };
        let st = s.state();
        let (Some(ir), false) = (st.inner, st.op == Op::Consume) else {
            return Err(Error::invalid_usage("test: the request is not outstanding"));
        };
        let n = (st.n as usize).clamp(1, MAX_RECVS);
        let mut local = [0i32; MAX_RECVS];
        // The caller's sizes when it has room for one per grouped receive (the shim always does),
        // else ours, copied out after.
        let (out, copy) = match sizes {
            Some(out) if out.len() >= n => (&mut out[..n], None),
            other => (&mut local[..n], other),
        };
        // SAFETY: the inner request is outstanding on the open inner comm, and `out` has one
        // entry per grouped receive.
        match unsafe { self.inner.test(ir, Some(&mut *out)) } {
            Ok(false) => Ok(false),
            Ok(true) => {
                let end = now_ns();
                let bytes = match st.op {
                    Op::Send => st.bytes,
                    _ => out.iter().map(|&b| b.max(0) as u64).sum(),
                };
                c.completed(s, st, end, bytes);
                if let Some(dst) = copy {
                    let k = dst.len().min(n);
                    dst[..k].copy_from_slice(&out[..k]);
                }
                Ok(true)
            }
            Err(e) => {
                c.failed(s);
                Err(e)
            }
        }
    }

    unsafe fn close_send(&self, comm: Opaque) -> Result<()> {
        // SAFETY: the caller's contract: an open send comm of this layer, closed once.
        unsafe { self.close(comm, Dir::Send) }
    }

    unsafe fn close_recv(&self, comm: Opaque) -> Result<()> {
        // SAFETY: as in close_send.
        unsafe { self.close(comm, Dir::Recv) }
    }

    unsafe fn get_device_mr(&self, comm: Opaque, mr: Opaque) -> Result<Option<Opaque>> {
        // SAFETY: as in reg_mr.
        unsafe { self.inner.get_device_mr(conn(comm).inner, mr) }
    }

    unsafe fn irecv_consumed(&self, comm: Opaque, n: i32, req: Option<Opaque>) -> Result<()> {
        // SAFETY: as in reg_mr.
        let c = unsafe { conn(comm) };
        let ir = match req {
            Some(r) => {
                // SAFETY: the caller's contract: a completed receive of this open comm.
                let s = unsafe { slot(r) };
                let st = s.state();
                if st.op != Op::Consume {
                    return Err(Error::invalid_usage(
                        "irecvConsumed: the request is not a completed receive waiting to be consumed",
                    ));
                }
                c.release(s);
                st.inner
            }
            None => None,
        };
        // SAFETY: forwarded to the open inner comm; `ir` is its completed receive.
        unsafe { self.inner.irecv_consumed(c.inner, n, ir) }
    }

    unsafe fn describe_comm(&self, comm: Opaque) -> Option<String> {
        // Listen comms pass through this layer unwrapped (and are known by their address), and
        // the caller may ask about one: forward it as it is.
        if lock(&self.shared.listens).contains_key(&(comm.as_ptr() as usize)) {
            // SAFETY: forwarded under the caller's contract: it is the inner transport's comm.
            return unsafe { self.inner.describe_comm(comm) };
        }
        // SAFETY: as in reg_mr: a live record of this layer.
        unsafe { self.inner.describe_comm(conn(comm).inner) }
    }

    unsafe fn stall_detail(&self, comm: Opaque, req: Opaque) -> Option<String> {
        // SAFETY: the caller's contract: an open comm and an outstanding request of it.
        let (c, s) = unsafe { (conn(comm), slot(req)) };
        let ir = s.state().inner?;
        // SAFETY: forwarded with the inner comm and request.
        unsafe { self.inner.stall_detail(c.inner, ir) }
    }

    unsafe fn break_comm(&self, comm: Opaque) -> bool {
        // SAFETY: as in reg_mr.
        unsafe { self.inner.break_comm(conn(comm).inner) }
    }
}

/// The `peer` label from a transport's description of a comm (see `wrap`).
fn peer_label(description: &str) -> String {
    let d = description.strip_prefix("peer ").unwrap_or(description);
    d.split(',').next().unwrap_or(d).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::HANDLE_SIZE;
    use crate::tcp::{TcpConfig, TcpTransport};

    #[test]
    fn the_peer_label_is_the_address() {
        assert_eq!(peer_label("peer 10.0.0.2:41234, 4 streams"), "10.0.0.2:41234");
        assert_eq!(peer_label("GPUDirectTCPX_v7 dev 1"), "GPUDirectTCPX_v7 dev 1");
    }

    /// A listen comm passes through the layer unwrapped; asking the layer about it must ask the
    /// transport beneath about that same comm, not read it as one of the layer's records.
    #[test]
    fn a_listen_comm_is_described_by_the_transport_beneath() {
        let tcp = TcpTransport::new(&TcpConfig {
            ifname: Some("lo".into()),
            ..TcpConfig::default()
        })
        .expect("transport on lo");
        let dir = std::env::temp_dir().join(format!("tcpxshim-metrics-describe-{}", std::process::id()));
        let m = Metrics::new(Box::new(tcp), &Config::default(), dir);
        let mut h = [0u8; HANDLE_SIZE];
        let l = Transport::listen(&m, 0, &mut h).unwrap();
        // SAFETY: `l` is the open listen comm just made, closed below.
        let (through, beneath) = unsafe { (Transport::describe_comm(&m, l), m.inner.describe_comm(l)) };
        assert!(
            beneath.as_deref().is_some_and(|d| d.starts_with("listening on")),
            "{beneath:?}"
        );
        assert_eq!(through, beneath);
        // SAFETY: as above.
        unsafe { Transport::close_listen(&m, l) }.unwrap();
    }
}
