//! The shim's records of what NCCL holds: comms, their requests and their memory registrations.
//!
//! Each record keeps what is needed to describe the object in a log line and to make it again
//! on a new inner comm (a registration's buffer, size and type; a request's op, buffers, sizes,
//! tags, registrations and post time).

use super::table::{CommKey, Keyed, MrKey, ReqKey, MAX_MRS};
use crate::error::{Error, Result};
use crate::metrics::CommCounters;
use crate::transport::Opaque;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// Requests per comm the shim can track (one bit each in a u64). NCCL keeps at most
/// NCCL_NET_MAX_REQUESTS (32) in flight.
pub const MAX_REQUESTS: usize = 64;
/// Most receives one irecv may group.
pub const MAX_RECVS: usize = 8;
/// Completed UNPACK receives remembered for irecvConsumed.
const CONSUMED_BACKLOG: usize = 4096;

/// What a comm is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// From listen.
    Listen,
    /// From connect.
    Send,
    /// From accept.
    Recv,
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

impl MrRec {
    /// Checks that `size` bytes at `data` lie inside the registered range.
    pub fn covers(&self, call: &str, data: usize, size: i32) -> Result<()> {
        let end = self.data.saturating_add(self.size);
        if size <= 0 || (data >= self.data && data.saturating_add(size as usize) <= end) {
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

impl Posted {
    /// A request of `op` over the first `data.len()` entries of each array.
    pub fn new(op: Op, data: &[*mut c_void], sizes: &[i32], tags: &[i32], mrs: &[Option<MrKey>]) -> Posted {
        let mut p = Posted {
            op,
            n: data.len().min(MAX_RECVS),
            data: [0; MAX_RECVS],
            sizes: [0; MAX_RECVS],
            tags: [0; MAX_RECVS],
            mrs: [None; MAX_RECVS],
        };
        for (i, &d) in data.iter().take(p.n).enumerate() {
            p.data[i] = d as usize;
            p.sizes[i] = sizes.get(i).copied().unwrap_or(0);
            p.tags[i] = tags.get(i).copied().unwrap_or(0);
            p.mrs[i] = mrs.get(i).copied().flatten();
        }
        p
    }
    /// Bytes posted, over every grouped receive.
    pub fn bytes(&self) -> i64 {
        self.sizes[..self.n].iter().map(|&s| s.max(0) as i64).sum()
    }
}

/// One request slot of a comm.
pub struct ReqRec {
    /// Generation; the key NCCL holds carries it.
    pub gen: u16,
    /// Whether the slot holds an outstanding request.
    pub live: bool,
    /// What was posted.
    pub posted: Posted,
    /// The inner transport's request.
    pub inner: Option<Opaque>,
    /// When it was posted.
    pub at: Instant,
    /// test() calls that found it not done.
    pub tests: u32,
    /// Whether the stall warning was given.
    pub warned: bool,
}

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

struct MrEntry {
    gen: u16,
    rec: Option<MrRec>,
}

#[derive(Default)]
struct Mrs {
    entries: Vec<MrEntry>,
    free: VecDeque<u16>,
}

/// A comm as NCCL sees it.
pub struct CommRec {
    key: CommKey,
    /// What it is for.
    pub kind: Kind,
    /// The inner transport's comm.
    pub inner: Opaque,
    /// Device.
    pub dev: i32,
    /// Process-wide number, for log lines.
    pub id: u64,
    /// The peer, as the inner transport describes it.
    pub peer: String,
    /// Whether the device is UNPACK-type (TCPX).
    pub unpack: bool,
    /// For a listen comm whose inner handle the control service serves: its entry there.
    pub served: Option<u32>,
    poisoned: AtomicBool,
    /// Per-connection counters.
    pub counters: CommCounters,
    free: AtomicU64,
    cursor: AtomicU32,
    slots: Box<[Mutex<ReqRec>]>,
    mrs: Mutex<Mrs>,
    consumed: Mutex<VecDeque<(ReqKey, Option<Opaque>)>>,
    /// When it was opened.
    pub opened: Instant,
}

impl Keyed for CommRec {
    fn key(&self) -> CommKey {
        self.key
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a new comm record is made of.
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
    /// Control-service entry of a listen comm.
    pub served: Option<u32>,
}

impl CommRec {
    /// A record for `spec` stored under `key`.
    pub fn new(key: CommKey, spec: CommSpec) -> CommRec {
        let nslots = if spec.kind == Kind::Listen { 0 } else { MAX_REQUESTS };
        let slots = (0..nslots)
            .map(|_| {
                Mutex::new(ReqRec {
                    gen: 0,
                    live: false,
                    posted: Posted::new(Op::Send, &[], &[], &[], &[]),
                    inner: None,
                    at: Instant::now(),
                    tests: 0,
                    warned: false,
                })
            })
            .collect();
        CommRec {
            key,
            kind: spec.kind,
            inner: spec.inner,
            dev: spec.dev,
            id: spec.id,
            peer: spec.peer,
            unpack: spec.unpack,
            served: spec.served,
            poisoned: AtomicBool::new(false),
            counters: CommCounters::default(),
            free: AtomicU64::new(if nslots == 0 { 0 } else { u64::MAX >> (64 - nslots) }),
            cursor: AtomicU32::new(0),
            slots,
            mrs: Mutex::new(Mrs::default()),
            consumed: Mutex::new(VecDeque::new()),
            opened: Instant::now(),
        }
    }

    /// "send comm #3 (dev 0, peer 127.0.0.1:5000)", for messages.
    pub fn label(&self) -> String {
        format!(
            "{} comm #{} (dev {}, {})",
            self.kind.label(),
            self.id,
            self.dev,
            self.peer
        )
    }

    /// Fails if an earlier panic made the comm unusable.
    pub fn check_live(&self, call: &str) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
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

    /// Takes a free request slot, preferring the one after the last taken, so a completed
    /// request's key stays invalid as long as possible.
    fn take_slot(&self, call: &str) -> Result<usize> {
        let mut cur = self.free.load(Ordering::Acquire);
        loop {
            if cur == 0 {
                return Err(Error::invalid_usage(format!(
                    "{call}: more than {MAX_REQUESTS} outstanding requests on {}; NCCL keeps at most 32",
                    self.label()
                )));
            }
            let start = self.cursor.load(Ordering::Relaxed) % MAX_REQUESTS as u32;
            let idx = (cur.rotate_right(start).trailing_zeros() + start) as usize % MAX_REQUESTS;
            match self
                .free
                .compare_exchange_weak(cur, cur & !(1u64 << idx), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.cursor.store(idx as u32 + 1, Ordering::Relaxed);
                    return Ok(idx);
                }
                Err(now) => cur = now,
            }
        }
    }

    fn give_back(&self, idx: usize) {
        self.free.fetch_or(1u64 << idx, Ordering::Release);
    }

    /// Posts one operation in a fresh request slot: `inner` posts it on the inner transport.
    /// Returns the key NCCL sees; "try again" and errors give the slot back.
    pub fn post(&self, posted: Posted, inner: impl FnOnce() -> Result<Option<Opaque>>) -> Result<Option<ReqKey>> {
        let call = posted.op.call();
        let idx = self.take_slot(call)?;
        let mut r = lock(&self.slots[idx]);
        let res = inner();
        match res {
            Ok(Some(ireq)) => {
                r.gen = r.gen.wrapping_add(1);
                r.live = true;
                r.posted = posted;
                r.inner = Some(ireq);
                r.at = Instant::now();
                r.tests = 0;
                r.warned = false;
                Ok(Some(ReqKey::new(self.key, idx, r.gen)))
            }
            Ok(None) => {
                drop(r);
                self.give_back(idx);
                Ok(None)
            }
            Err(e) => {
                drop(r);
                self.give_back(idx);
                self.counters.error();
                Err(e.context(format!("{call} of {} bytes on {}", posted.bytes(), self.label())))
            }
        }
    }

    /// The outstanding request `key` (locked), or an error saying why there is none.
    pub fn request(&self, call: &str, key: ReqKey) -> Result<MutexGuard<'_, ReqRec>> {
        let stale = || {
            Error::invalid_argument(format!(
                "{call}: {:#x} is not an outstanding request of {} (already completed, or never issued)",
                key.to_opaque().as_ptr() as usize,
                self.label()
            ))
        };
        let slot = self.slots.get(key.slot as usize).ok_or_else(stale)?;
        let r = lock(slot);
        if !r.live || r.gen != key.gen || !key.of(self.key) {
            return Err(stale());
        }
        Ok(r)
    }

    /// Ends the request held in `r` (completed or failed): its slot is free again.
    pub fn retire(&self, key: ReqKey, mut r: MutexGuard<'_, ReqRec>) {
        r.live = false;
        r.inner = None;
        drop(r);
        self.give_back(key.slot as usize);
    }

    /// Records a registration and returns its key.
    pub fn add_mr(&self, rec: MrRec) -> Result<MrKey> {
        let mut m = lock(&self.mrs);
        let index = match m.free.pop_front() {
            Some(i) => i as usize,
            None if m.entries.len() < MAX_MRS => {
                m.entries.push(MrEntry { gen: 0, rec: None });
                m.entries.len() - 1
            }
            None => {
                return Err(Error::invalid_usage(format!(
                    "regMr: {} already has {MAX_MRS} registrations; deregister some first",
                    self.label()
                )))
            }
        };
        let e = &mut m.entries[index];
        e.gen = e.gen.wrapping_add(1) & 0xfff;
        e.rec = Some(rec);
        Ok(MrKey::new(self.key, index, e.gen))
    }

    /// The registration `key` of this comm.
    pub fn mr(&self, call: &str, key: MrKey) -> Result<MrRec> {
        let m = lock(&self.mrs);
        match m.entries.get(key.index as usize) {
            Some(MrEntry { gen, rec: Some(r) }) if *gen == key.gen && key.of(self.key) => Ok(*r),
            _ => Err(self.foreign_mr(call, key)),
        }
    }

    fn foreign_mr(&self, call: &str, key: MrKey) -> Error {
        Error::invalid_argument(format!(
            "{call}: memory handle {:#x} is not a live registration of {} (deregistered, or made on another comm)",
            key.to_opaque().as_ptr() as usize,
            self.label()
        ))
    }

    /// Removes the registration `key` and returns it.
    pub fn remove_mr(&self, call: &str, key: MrKey) -> Result<MrRec> {
        let mut m = lock(&self.mrs);
        let found = match m.entries.get_mut(key.index as usize) {
            Some(e) if e.gen == key.gen && key.of(self.key) => e.rec.take(),
            _ => None,
        };
        match found {
            Some(r) => {
                m.free.push_back(key.index);
                Ok(r)
            }
            None => Err(self.foreign_mr(call, key)),
        }
    }

    /// Remembers a completed UNPACK receive until irecvConsumed names it.
    pub fn completed_unpack(&self, key: ReqKey, inner: Option<Opaque>) {
        let mut q = lock(&self.consumed);
        if q.len() >= CONSUMED_BACKLOG {
            q.pop_front();
        }
        q.push_back((key, inner));
    }

    /// The inner request of the completed UNPACK receive `key`, forgotten from now on.
    pub fn take_consumed(&self, key: ReqKey) -> Result<Option<Opaque>> {
        let mut q = lock(&self.consumed);
        let pos = q.iter().position(|(k, _)| *k == key).ok_or_else(|| {
            Error::invalid_usage(format!(
                "irecvConsumed: request {:#x} is not a completed receive of {}",
                key.to_opaque().as_ptr() as usize,
                self.label()
            ))
        })?;
        Ok(q.remove(pos).and_then(|(_, inner)| inner))
    }
}
