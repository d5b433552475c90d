//! The shim's records of what NCCL holds: comms, their requests and their memory registrations.
//!
//! Each record keeps what is needed to describe the object in a log line and to make it again
//! on a new inner comm (a registration's buffer, size and type; a request's op, buffers, sizes,
//! tags, registrations and post time).
//!
//! Records are reused (see `table`), so every field a lookup can read is an atomic or behind a
//! lock. A request slot is owned through its state word: a poster owns a slot it moved from free
//! to posting, a tester owns it while it has moved the state from live to busy; only the owner
//! touches the request's fields. One compare-and-swap per post and per test, nothing else shared
//! is written on the data path.

use super::table::{CommKey, MrKey, Record, ReqKey, Table, MAX_MRS};
use crate::error::{Error, Result};
use crate::lock;
use crate::metrics::CommCounters;
use crate::recovery::engine::Engine;
use crate::transport::Opaque;
use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{
    fence, AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Requests per comm the shim can track (one bit each in a u64). NCCL keeps at most
/// NCCL_NET_MAX_REQUESTS (32) in flight.
pub const MAX_REQUESTS: usize = 64;
/// Most receives one irecv may group.
pub const MAX_RECVS: usize = 8;
static_assertions::const_assert_eq!(MAX_RECVS, crate::recovery::MAX_GROUP);
/// Completed UNPACK receives remembered for irecvConsumed.
const CONSUMED_BACKLOG: usize = 4096;

/// What a comm is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// From listen.
    Listen = 1,
    /// From connect.
    Send = 2,
    /// From accept.
    Recv = 3,
}

impl Kind {
    /// "listen", "send" or "recv".
    pub fn label(self) -> &'static str {
        match self {
            Kind::Listen => "listen",
            Kind::Send => "send",
            Kind::Recv => "recv",
        }
    }
    fn from_u8(v: u8) -> Kind {
        match v {
            1 => Kind::Listen,
            2 => Kind::Send,
            _ => Kind::Recv,
        }
    }
}

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// isend.
    Send,
    /// irecv.
    Recv,
    /// iflush.
    Flush,
}

impl Op {
    /// The call that posted it.
    pub fn call(self) -> &'static str {
        match self {
            Op::Send => "isend",
            Op::Recv => "irecv",
            Op::Flush => "iflush",
        }
    }
}

/// Everything a request was posted with.
#[derive(Clone, Copy, Debug)]
pub struct Posted {
    /// The operation.
    pub op: Op,
    /// Grouped receives (1 for sends).
    pub n: usize,
    /// Buffer addresses (only the first `n` are used).
    pub data: [usize; MAX_RECVS],
    /// Sizes.
    pub sizes: [i32; MAX_RECVS],
    /// Tags.
    pub tags: [i32; MAX_RECVS],
    /// The shim's registrations of the buffers.
    pub mrs: [Option<MrKey>; MAX_RECVS],
}

/// What a post gives: borrowed from the caller, written into the request slot in place.
pub struct PostArgs<'a> {
    /// The operation.
    pub op: Op,
    /// Buffers (one per grouped receive).
    pub data: &'a [*mut c_void],
    /// Sizes.
    pub sizes: &'a [i32],
    /// Tags (flushes have none).
    pub tags: &'a [i32],
    /// The shim's registrations of the buffers.
    pub mrs: &'a [Option<MrKey>],
}

impl Posted {
    const EMPTY: Posted = Posted {
        op: Op::Send,
        n: 0,
        data: [0; MAX_RECVS],
        sizes: [0; MAX_RECVS],
        tags: [0; MAX_RECVS],
        mrs: [None; MAX_RECVS],
    };

    /// Takes on `a` (entries past its length keep older values and are never read).
    #[inline]
    fn fill(&mut self, a: &PostArgs<'_>) {
        self.op = a.op;
        self.n = a.data.len().min(MAX_RECVS);
        for i in 0..self.n {
            self.data[i] = a.data[i] as usize;
            self.sizes[i] = a.sizes.get(i).copied().unwrap_or(0);
            self.tags[i] = a.tags.get(i).copied().unwrap_or(0);
            self.mrs[i] = a.mrs.get(i).copied().flatten();
        }
    }

    /// Bytes posted, over every grouped receive.
    pub fn bytes(&self) -> i64 {
        self.sizes[..self.n].iter().map(|&s| s.max(0) as i64).sum()
    }
}

/// An outstanding request.
pub struct ReqRec {
    /// What was posted.
    pub posted: Posted,
    /// The inner transport's request (`None` in a slot never used).
    pub inner: Option<Opaque>,
    /// When it was posted (the shim's stamp: coarse monotonic nanoseconds, or the metrics' ticks).
    pub at_ns: u64,
    /// test() calls that found it not done.
    pub tests: u32,
    /// Whether the stall warning was given.
    pub warned: bool,
}

const FREE: u32 = 0;
const LIVE: u32 = 1;
const BUSY: u32 = 2;
const POSTING: u32 = 3;

fn req_state(gen: u16, phase: u32) -> u32 {
    (gen as u32) << 16 | phase
}

struct ReqSlot {
    /// `generation << 16 | phase` (FREE, POSTING, LIVE, BUSY).
    state: AtomicU32,
    rec: UnsafeCell<ReqRec>,
}

// SAFETY: `rec` is only touched by the slot's owner: the poster that moved the state from FREE to
// POSTING (until it stores LIVE or FREE), or the tester that moved it from LIVE to BUSY (until it
// stores LIVE or FREE again). The state word's Release stores and Acquire CAS order those
// accesses, so no two threads touch `rec` at once.
unsafe impl Sync for ReqSlot {}

/// A memory registration NCCL holds.
#[derive(Clone, Copy, Debug)]
pub struct MrRec {
    /// Start of the buffer.
    pub data: usize,
    /// Bytes.
    pub size: usize,
    /// NCCL_PTR_HOST / NCCL_PTR_CUDA / NCCL_PTR_DMABUF.
    pub ptr_type: i32,
    /// DMA-BUF offset and file descriptor, when registered that way.
    pub dmabuf: Option<(u64, i32)>,
    /// The inner transport's registration.
    pub inner: Opaque,
}

impl MrRec {
    /// Checks that `size` bytes at `data` lie inside the registered range.
    #[inline]
    pub fn covers(&self, call: &str, data: usize, size: i32) -> Result<()> {
        if inside(self.data, self.size, data, size) {
            return Ok(());
        }
        let kind = match (self.ptr_type, self.dmabuf) {
            (_, Some((off, fd))) => format!("DMA-BUF fd {fd} offset {off}"),
            (2, None) => "CUDA".to_string(),
            _ => "host".to_string(),
        };
        Err(Error::invalid_argument(format!(
            "{call}: buffer {data:#x}+{size} is outside its memory handle's {kind} registration {:#x}+{}",
            self.data, self.size
        )))
    }
}

/// Whether `size` bytes at `data` lie inside `len` bytes at `start` (nothing to check for no bytes).
#[inline]
fn inside(start: usize, len: usize, data: usize, size: i32) -> bool {
    size <= 0 || (data >= start && data.saturating_add(size as usize) <= start.saturating_add(len))
}

/// One registration slot: read without a lock (a state word checked before and after reading the
/// fields), written under the comm's registration lock.
#[derive(Default)]
struct MrSlot {
    /// `generation << 1 | live`.
    state: AtomicU32,
    data: AtomicUsize,
    size: AtomicUsize,
    ptr_type: AtomicI32,
    dmabuf_offset: AtomicU64,
    /// -1: not a DMA-BUF registration.
    dmabuf_fd: AtomicI32,
    inner: AtomicPtr<c_void>,
}

const MR_CHUNK: usize = 64;

#[derive(Default)]
struct MrAlloc {
    used: usize,
    free: VecDeque<u16>,
}

/// A comm as NCCL sees it.
pub struct CommRec {
    state: AtomicU64,
    kind: AtomicU8,
    inner: AtomicPtr<c_void>,
    dev: AtomicI32,
    id: AtomicU64,
    unpack: AtomicBool,
    served: AtomicU32,
    poisoned: AtomicBool,
    /// Why the comm failed for good, when that was an error of its connection (not a panic).
    failed: Mutex<Option<String>>,
    peer: Mutex<String>,
    opened: Mutex<Instant>,
    /// Per-connection counters.
    pub counters: CommCounters,
    /// The connection's metrics record (NULL: none): an entry of the shim's append-only metrics
    /// list, never moved or freed while that list lives.
    metrics: AtomicPtr<crate::metrics::conn::Conn>,
    cursor: AtomicU32,
    slots: Box<[ReqSlot]>,
    mr_chunks: Box<[OnceLock<Box<[MrSlot]>>]>,
    mr_alloc: Mutex<MrAlloc>,
    consumed: Mutex<VecDeque<(ReqKey, Opaque)>>,
    /// Whether the comm of the record's current generation has a recovery engine (set once,
    /// after the comm is made and before NCCL has it).
    has_engine: AtomicBool,
    /// That engine, with the generation of the comm it belongs to: a close takes it out under
    /// this lock after removing the comm from the table, so a comm that reuses the record waits
    /// for that before putting its own here.
    engine: Mutex<Option<(u32, Box<Engine>)>>,
}

/// What a new comm is made of.
pub struct CommSpec {
    /// What it is for.
    pub kind: Kind,
    /// The inner comm.
    pub inner: Opaque,
    /// Device.
    pub dev: i32,
    /// Number for log lines.
    pub id: u64,
    /// Peer description.
    pub peer: String,
    /// UNPACK-type device.
    pub unpack: bool,
    /// Control-service entry of a listen comm (0: none).
    pub served: u32,
    /// The connection's metrics record, when metrics are on (see `CommRec::metrics`).
    pub metrics: *const crate::metrics::conn::Conn,
}

impl Record for CommRec {
    type Spec = CommSpec;

    fn empty() -> CommRec {
        CommRec {
            state: AtomicU64::new(0),
            kind: AtomicU8::new(0),
            inner: AtomicPtr::new(std::ptr::null_mut()),
            dev: AtomicI32::new(0),
            id: AtomicU64::new(0),
            unpack: AtomicBool::new(false),
            served: AtomicU32::new(0),
            poisoned: AtomicBool::new(false),
            failed: Mutex::new(None),
            peer: Mutex::new(String::new()),
            opened: Mutex::new(Instant::now()),
            counters: CommCounters::default(),
            metrics: AtomicPtr::new(std::ptr::null_mut()),
            cursor: AtomicU32::new(0),
            slots: (0..MAX_REQUESTS)
                .map(|_| ReqSlot {
                    state: AtomicU32::new(req_state(0, FREE)),
                    rec: UnsafeCell::new(ReqRec {
                        posted: Posted::EMPTY,
                        inner: None,
                        at_ns: 0,
                        tests: 0,
                        warned: false,
                    }),
                })
                .collect(),
            mr_chunks: (0..MAX_MRS / MR_CHUNK).map(|_| OnceLock::new()).collect(),
            mr_alloc: Mutex::new(MrAlloc::default()),
            consumed: Mutex::new(VecDeque::new()),
            has_engine: AtomicBool::new(false),
            engine: Mutex::new(None),
        }
    }

    fn state(&self) -> &AtomicU64 {
        &self.state
    }

    fn reset(&self, _key: CommKey, spec: CommSpec) {
        self.kind.store(spec.kind as u8, Ordering::Relaxed);
        self.inner.store(spec.inner.as_ptr(), Ordering::Relaxed);
        self.dev.store(spec.dev, Ordering::Relaxed);
        self.id.store(spec.id, Ordering::Relaxed);
        self.unpack.store(spec.unpack, Ordering::Relaxed);
        self.served.store(spec.served, Ordering::Relaxed);
        self.poisoned.store(false, Ordering::Relaxed);
        *lock(&self.failed) = None;
        *lock(&self.peer) = spec.peer;
        *lock(&self.opened) = Instant::now();
        self.counters.reset();
        self.metrics.store(spec.metrics.cast_mut(), Ordering::Relaxed);
        lock(&self.consumed).clear();
        self.has_engine.store(false, Ordering::Release);
        // Requests and registrations of the comm that used this record before are unreachable:
        // their keys carry its generation. Their slots start over, except one a caller still
        // holds (only a caller breaking the close contract can be there): it is left to that
        // caller, who frees it when done.
        for s in self.slots.iter() {
            let cur = s.state.load(Ordering::Acquire);
            if cur & 0xffff == LIVE {
                let _ = s
                    .state
                    .compare_exchange(cur, cur & !0xffff | FREE, Ordering::AcqRel, Ordering::Acquire);
            }
        }
        let mut a = lock(&self.mr_alloc);
        for chunk in self.mr_chunks.iter().filter_map(|c| c.get()) {
            for m in chunk.iter() {
                m.state.fetch_and(!1, Ordering::AcqRel);
            }
        }
        a.free = (0..a.used as u16).collect();
    }
}

impl CommRec {
    /// Gives the comm `key` its recovery engine.
    pub fn set_engine(&self, key: CommKey, e: Engine) {
        *lock(&self.engine) = Some((key.gen, Box::new(e)));
        self.has_engine.store(true, Ordering::Release);
    }

    /// Whether the comm has a recovery engine.
    #[inline]
    pub fn has_engine(&self) -> bool {
        self.has_engine.load(Ordering::Acquire)
    }

    /// Runs `f` on the recovery engine of comm `key`: `Ok(None)` when the comm has none, an error
    /// when it had one and is closed (a call racing its close).
    #[inline]
    pub fn with_engine<R>(&self, key: CommKey, f: impl FnOnce(&mut Engine) -> R) -> Result<Option<R>> {
        if !self.has_engine.load(Ordering::Acquire) {
            return Ok(None);
        }
        match lock(&self.engine).as_mut() {
            Some((gen, e)) if *gen == key.gen => Ok(Some(f(e))),
            _ => Err(Error::invalid_usage(format!("{} is closed", self.label()))),
        }
    }

    /// Removes comm `key` from `table` (`false`: it was not live) and takes out its recovery
    /// engine, if it has one, in one step (see `engine`).
    pub fn remove_with_engine(&self, table: &Table<CommRec>, key: CommKey) -> (bool, Option<Box<Engine>>) {
        let mut g = lock(&self.engine);
        if !table.remove(key) {
            return (false, None);
        }
        let e = match g.take() {
            Some((gen, e)) if gen == key.gen => Some(e),
            other => {
                *g = other;
                None
            }
        };
        (true, e)
    }

    /// The recoveries of the comm's engine so far (0 without one).
    pub fn recoveries(&self) -> u64 {
        lock(&self.engine).as_ref().map_or(0, |(_, e)| e.recoveries())
    }

    /// The connection's metrics record as the shim put it there (NULL: none). Only the shim
    /// that owns the record's table may dereference it (see `Shim::mconn`).
    #[inline]
    pub fn metrics_ptr(&self) -> *const crate::metrics::conn::Conn {
        self.metrics.load(Ordering::Relaxed)
    }

    /// What it is for.
    #[inline]
    pub fn kind(&self) -> Kind {
        Kind::from_u8(self.kind.load(Ordering::Relaxed))
    }

    /// The inner transport's comm.
    #[inline]
    pub fn inner(&self) -> Opaque {
        Opaque::from_ptr(self.inner.load(Ordering::Relaxed))
            .unwrap_or_else(|| unreachable!("live comms have an inner comm"))
    }

    /// Device.
    pub fn dev(&self) -> i32 {
        self.dev.load(Ordering::Relaxed)
    }

    /// Whether the device is UNPACK-type (TCPX).
    #[inline]
    pub fn unpack(&self) -> bool {
        self.unpack.load(Ordering::Relaxed)
    }

    /// The control-service entry of a listen comm whose inner handle is served.
    pub fn served(&self) -> Option<u32> {
        Some(self.served.load(Ordering::Relaxed)).filter(|&v| v != 0)
    }

    /// Seconds since the comm opened.
    pub fn age_secs(&self) -> f64 {
        lock(&self.opened).elapsed().as_secs_f64()
    }

    /// "send comm #3 (dev 0, peer 127.0.0.1:5000)", for messages.
    pub fn label(&self) -> String {
        format!(
            "{} comm #{} (dev {}, {})",
            self.kind().label(),
            self.id.load(Ordering::Relaxed),
            self.dev(),
            lock(&self.peer)
        )
    }

    /// Fails if an earlier panic made the comm unusable.
    #[inline]
    pub fn check_live(&self, call: &str) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            if let Some(why) = lock(&self.failed).as_ref() {
                return Err(Error::remote(format!("{call}: {} failed earlier: {why}", self.label())));
            }
            return Err(Error::internal(format!(
                "{call}: {} is unusable after an earlier internal error; see the first WARN line",
                self.label()
            )));
        }
        Ok(())
    }

    /// Marks the comm unusable after a panic in a call on it.
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
    }

    /// Marks the comm failed for good because of `why` (an error of its connection): every later
    /// call on it but deregMr and close fails with a remote error repeating it. The first reason
    /// stays.
    pub fn fail(&self, why: String) {
        lock(&self.failed).get_or_insert(why);
        self.poisoned.store(true, Ordering::Release);
    }

    /// Takes a free request slot, starting after the last one taken (so a completed request's
    /// key stays invalid as long as possible), and returns it with its new generation.
    #[inline]
    fn take_slot(&self, call: &str) -> Result<(usize, u16)> {
        let start = self.cursor.load(Ordering::Relaxed) as usize;
        for k in 0..MAX_REQUESTS {
            let idx = (start + k) % MAX_REQUESTS;
            let state = &self.slots[idx].state;
            let cur = state.load(Ordering::Relaxed);
            if cur & 0xffff != FREE {
                continue;
            }
            let gen = ((cur >> 16) as u16).wrapping_add(1);
            if state
                .compare_exchange(cur, req_state(gen, POSTING), Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                self.cursor.store(idx as u32 + 1, Ordering::Relaxed);
                return Ok((idx, gen));
            }
        }
        Err(Error::invalid_usage(format!(
            "{call}: more than {MAX_REQUESTS} outstanding requests on {}; NCCL keeps at most 32",
            self.label()
        )))
    }

    /// Posts one operation in a fresh request slot of the comm under `key`: `inner` posts it on
    /// the inner transport. Returns the request key NCCL sees; "try again" and errors give the
    /// slot back.
    #[inline]
    pub fn post(
        &self,
        key: CommKey,
        args: &PostArgs<'_>,
        at_ns: u64,
        inner: impl FnOnce() -> Result<Option<Opaque>>,
    ) -> Result<Option<ReqKey>> {
        let call = args.op.call();
        let (idx, gen) = self.take_slot(call)?;
        let slot = &self.slots[idx];
        match inner() {
            Ok(Some(ireq)) => {
                // SAFETY: this poster moved the slot from FREE to POSTING, so it owns `rec`; no
                // tester can take it before the Release store below says LIVE.
                let r = unsafe { &mut *slot.rec.get() };
                r.posted.fill(args);
                r.inner = Some(ireq);
                r.at_ns = at_ns;
                r.tests = 0;
                r.warned = false;
                slot.state.store(req_state(gen, LIVE), Ordering::Release);
                Ok(Some(ReqKey::new(key, idx, gen)))
            }
            done => {
                // The generation is spent: no key was handed out under it.
                slot.state.store(req_state(gen, FREE), Ordering::Release);
                match done {
                    Ok(_) => Ok(None),
                    Err(e) => {
                        self.counters.error();
                        let bytes: i64 = args.sizes.iter().map(|&s| s.max(0) as i64).sum();
                        Err(e.context(format!("{call} of {bytes} bytes on {}", self.label())))
                    }
                }
            }
        }
    }

    /// Takes the outstanding request `key` for testing, or says why there is none.
    #[inline]
    pub fn request(&self, call: &str, key: ReqKey) -> Result<ReqGuard<'_>> {
        let stale = |why: &str| {
            Error::invalid_argument(format!(
                "{call}: {:#x} is not an outstanding request of {} ({why})",
                key.to_opaque().as_ptr() as usize,
                self.label()
            ))
        };
        let slot = self
            .slots
            .get(key.slot as usize)
            .ok_or_else(|| stale("no such request slot"))?;
        match slot.state.compare_exchange(
            req_state(key.gen, LIVE),
            req_state(key.gen, BUSY),
            Ordering::Acquire,
            Ordering::Relaxed,
        ) {
            Ok(_) => Ok(ReqGuard {
                slot,
                gen: key.gen,
                done: false,
            }),
            Err(s) if s == req_state(key.gen, BUSY) => Err(Error::invalid_usage(format!(
                "{call}: request {:#x} of {} is being tested on another thread at the same time",
                key.to_opaque().as_ptr() as usize,
                self.label()
            ))),
            Err(_) => Err(stale("already completed, or never issued")),
        }
    }

    /// Records a registration and returns its key.
    pub fn add_mr(&self, key: CommKey, rec: MrRec) -> Result<MrKey> {
        let mut a = lock(&self.mr_alloc);
        let index = match a.free.pop_front() {
            Some(i) => i as usize,
            None if a.used < MAX_MRS => {
                a.used += 1;
                a.used - 1
            }
            None => {
                return Err(Error::invalid_usage(format!(
                    "regMr: {} already has {MAX_MRS} registrations; deregister some first",
                    self.label()
                )))
            }
        };
        let chunk = self.mr_chunks[index / MR_CHUNK].get_or_init(|| (0..MR_CHUNK).map(|_| MrSlot::default()).collect());
        let m = &chunk[index % MR_CHUNK];
        let gen = ((m.state.load(Ordering::Acquire) >> 1) as u16).wrapping_add(1) & 0xfff;
        m.data.store(rec.data, Ordering::Relaxed);
        m.size.store(rec.size, Ordering::Relaxed);
        m.ptr_type.store(rec.ptr_type, Ordering::Relaxed);
        let (off, fd) = rec.dmabuf.unwrap_or((0, -1));
        m.dmabuf_offset.store(off, Ordering::Relaxed);
        m.dmabuf_fd.store(fd, Ordering::Relaxed);
        m.inner.store(rec.inner.as_ptr(), Ordering::Relaxed);
        m.state.store((gen as u32) << 1 | 1, Ordering::Release);
        Ok(MrKey::new(key, index, gen))
    }

    #[inline]
    fn mr_slot(&self, key: MrKey) -> Option<&MrSlot> {
        let i = key.index as usize;
        self.mr_chunks.get(i / MR_CHUNK)?.get().map(|c| &c[i % MR_CHUNK])
    }

    #[inline]
    fn read_mr(m: &MrSlot) -> Option<MrRec> {
        let fd = m.dmabuf_fd.load(Ordering::Relaxed);
        Some(MrRec {
            data: m.data.load(Ordering::Relaxed),
            size: m.size.load(Ordering::Relaxed),
            ptr_type: m.ptr_type.load(Ordering::Relaxed),
            dmabuf: (fd >= 0).then(|| (m.dmabuf_offset.load(Ordering::Relaxed), fd)),
            inner: Opaque::from_ptr(m.inner.load(Ordering::Relaxed))?,
        })
    }

    /// The inner registration behind `key` of this comm (standing under `comm`), checked to cover
    /// `size` bytes at `data`: the data path's lookup, reading only what it needs.
    #[inline]
    pub fn mr_for(&self, call: &str, comm: CommKey, key: MrKey, data: usize, size: i32) -> Result<Opaque> {
        let found = self.read_live_mr(comm, key, |m| {
            let (start, len) = (m.data.load(Ordering::Relaxed), m.size.load(Ordering::Relaxed));
            Some((start, len, m.inner.load(Ordering::Relaxed)))
        });
        let Some((start, len, inner)) = found else {
            return Err(self.foreign_mr(call, key));
        };
        if let Some(o) = Opaque::from_ptr(inner).filter(|_| inside(start, len, data, size)) {
            return Ok(o);
        }
        // The slow path, for the message: the whole record says what is wrong.
        let rec = self.mr(call, comm, key)?;
        Err(rec
            .covers(call, data, size)
            .err()
            .unwrap_or_else(|| self.foreign_mr(call, key)))
    }

    /// Reads the live registration `key` of this comm (standing under `comm`) with `read`, which
    /// runs between two looks at the slot's state: unchanged means the fields read are consistent.
    #[inline]
    fn read_live_mr<T>(&self, comm: CommKey, key: MrKey, read: impl FnOnce(&MrSlot) -> Option<T>) -> Option<T> {
        let live = (key.gen as u32) << 1 | 1;
        let m = self.mr_slot(key).filter(|_| key.of(comm))?;
        if m.state.load(Ordering::Acquire) != live {
            return None;
        }
        let got = read(m);
        fence(Ordering::Acquire);
        got.filter(|_| m.state.load(Ordering::Relaxed) == live)
    }

    /// The registration `key` of this comm (the comm standing under `comm`).
    #[inline]
    pub fn mr(&self, call: &str, comm: CommKey, key: MrKey) -> Result<MrRec> {
        self.read_live_mr(comm, key, Self::read_mr)
            .ok_or_else(|| self.foreign_mr(call, key))
    }

    fn foreign_mr(&self, call: &str, key: MrKey) -> Error {
        Error::invalid_argument(format!(
            "{call}: memory handle {:#x} is not a live registration of {} (deregistered, or made on another comm)",
            key.to_opaque().as_ptr() as usize,
            self.label()
        ))
    }

    /// Removes the registration `key` and returns it.
    pub fn remove_mr(&self, call: &str, comm: CommKey, key: MrKey) -> Result<MrRec> {
        let mut a = lock(&self.mr_alloc);
        let live = (key.gen as u32) << 1 | 1;
        let m = self.mr_slot(key).filter(|_| key.of(comm));
        let rec = m.and_then(|m| {
            m.state
                .compare_exchange(live, live - 1, Ordering::AcqRel, Ordering::Acquire)
                .ok()
                .and_then(|_| Self::read_mr(m))
        });
        match rec {
            Some(r) => {
                a.free.push_back(key.index);
                Ok(r)
            }
            None => Err(self.foreign_mr(call, key)),
        }
    }

    /// Remembers a completed UNPACK receive until irecvConsumed names it.
    pub fn completed_unpack(&self, key: ReqKey, inner: Opaque) {
        let mut q = lock(&self.consumed);
        if q.len() >= CONSUMED_BACKLOG {
            q.pop_front();
        }
        q.push_back((key, inner));
    }

    /// The inner request of the completed UNPACK receive `key` (still remembered: see
    /// [`CommRec::forget_consumed`]).
    pub fn consumed_inner(&self, key: ReqKey) -> Result<Opaque> {
        let q = lock(&self.consumed);
        let pos = q.iter().position(|(k, _)| *k == key).ok_or_else(|| {
            Error::invalid_usage(format!(
                "irecvConsumed: request {:#x} is not a completed receive of {}",
                key.to_opaque().as_ptr() as usize,
                self.label()
            ))
        })?;
        Ok(q[pos].1)
    }

    /// Forgets the completed UNPACK receive `key` once the inner plugin has released it (a refused
    /// release leaves it to be released again).
    pub fn forget_consumed(&self, key: ReqKey) {
        lock(&self.consumed).retain(|(k, _)| *k != key);
    }
}

/// A request taken for testing; given back when dropped, or ended with [`ReqGuard::retire`].
pub struct ReqGuard<'a> {
    slot: &'a ReqSlot,
    gen: u16,
    done: bool,
}

impl ReqGuard<'_> {
    /// The request.
    #[inline]
    pub fn rec(&mut self) -> &mut ReqRec {
        // SAFETY: this guard moved the slot from LIVE to BUSY, so it owns `rec` until it stores
        // LIVE or FREE again (in retire or drop).
        unsafe { &mut *self.slot.rec.get() }
    }

    /// Ends the request (completed or failed): its slot is free again.
    #[inline]
    pub fn retire(mut self) {
        self.done = true;
        // SAFETY: as in rec(): this guard owns the slot until the store below.
        unsafe { (*self.slot.rec.get()).inner = None };
        self.slot.state.store(req_state(self.gen, FREE), Ordering::Release);
    }
}

impl Drop for ReqGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if !self.done {
            self.slot.state.store(req_state(self.gen, LIVE), Ordering::Release);
        }
    }
}
