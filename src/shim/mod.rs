//! The shim's own layer: wraps the inner transport, owns the comms and requests NCCL sees,
//! the handle trailer, per-connection counters and poisoning after an internal error.
//!
//! [`Shim`] is itself a [`Transport`], so the `tcpxshim` command and the Endpoint API drive
//! exactly the stack NCCL drives.

use crate::config;
use crate::error::{Error, Result};
use crate::ffi::{DevHandle, HANDLE_SIZE};
use crate::handle::{self, Trailer, INNER_HANDLE_SIZE};
use crate::metrics::{human_bytes, CommCounters};
use crate::plugin::{PluginTransport, KNOWN_TCPX_PATHS};
use crate::tcp::TcpTransport;
use crate::transport::{DeviceType, Opaque, Properties, Transport};
use std::collections::VecDeque;
use std::ffi::c_void;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicPtr, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// What was loaded underneath, for the INFO line and the `devices` command.
#[derive(Clone, Debug)]
pub struct LoadInfo {
    /// The inner transport's own name.
    pub name: String,
    /// Library path, or "built-in".
    pub source: String,
    /// ncclNet ABI version of the inner plugin; 0 for the built-in transport.
    pub abi_version: u32,
    /// Number of devices.
    pub devices: i32,
}

/// Requests per comm the shim can track (one bit each in a u64). NCCL keeps at most
/// NCCL_NET_MAX_REQUESTS (32) in flight.
pub const MAX_REQUESTS: usize = 64;

const COMM_MAGIC: u64 = 0x7463_7078_636f_6d6d; // "tcpxcomm"
const REQ_MAGIC: u64 = 0x7463_7078_7265_7173; // "tcpxreqs"
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
    fn label(self) -> &'static str {
        match self {
            Kind::Listen => "listen",
            Kind::Send => "send",
            Kind::Recv => "recv",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Send = 1,
    Recv = 2,
    Flush = 3,
}

/// One outstanding request; NCCL holds its address.
struct ReqSlot {
    magic: AtomicU64,
    comm: AtomicPtr<ShimComm>,
    index: usize,
    inner: AtomicPtr<c_void>,
    op: AtomicU8,
    n: AtomicI32,
    posted: AtomicI64,
}

/// A comm as NCCL sees it.
pub struct ShimComm {
    magic: AtomicU64,
    kind: Kind,
    inner: Opaque,
    dev: i32,
    id: u64,
    peer: String,
    unpack: bool,
    poisoned: AtomicBool,
    /// Per-connection counters.
    pub counters: CommCounters,
    slots: Box<[ReqSlot]>,
    /// Bit i set: slot i is free. Lock-free because every isend/irecv/test goes through it.
    free: AtomicU64,
    consumed: Mutex<VecDeque<(usize, Option<Opaque>)>>,
    opened: Instant,
}

impl ShimComm {
    fn new(kind: Kind, inner: Opaque, dev: i32, id: u64, peer: String, unpack: bool) -> Box<ShimComm> {
        let nslots = if kind == Kind::Listen { 0 } else { MAX_REQUESTS };
        let slots = (0..nslots)
            .map(|index| ReqSlot {
                magic: AtomicU64::new(0),
                comm: AtomicPtr::new(std::ptr::null_mut()),
                index,
                inner: AtomicPtr::new(std::ptr::null_mut()),
                op: AtomicU8::new(0),
                n: AtomicI32::new(0),
                posted: AtomicI64::new(0),
            })
            .collect();
        let mut comm = Box::new(ShimComm {
            magic: AtomicU64::new(COMM_MAGIC),
            kind,
            inner,
            dev,
            id,
            peer,
            unpack,
            poisoned: AtomicBool::new(false),
            counters: CommCounters::default(),
            slots,
            free: AtomicU64::new(if nslots == 0 { 0 } else { u64::MAX >> (64 - nslots) }),
            consumed: Mutex::new(VecDeque::new()),
            opened: Instant::now(),
        });
        let ptr: *mut ShimComm = &mut *comm;
        for s in comm.slots.iter() {
            s.comm.store(ptr, Ordering::Relaxed);
        }
        comm
    }

    /// The comm's kind.
    pub fn kind(&self) -> Kind {
        self.kind
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

    fn check_live(&self, call: &str) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Internal(format!(
                "{call}: {} is unusable after an earlier internal error; see the first WARN line",
                self.label()
            )));
        }
        Ok(())
    }

    fn alloc(&self, call: &str, op: Op, n: i32, posted: i64) -> Result<&ReqSlot> {
        let mut cur = self.free.load(Ordering::Acquire);
        let idx = loop {
            if cur == 0 {
                return Err(Error::InvalidUsage(format!(
                    "{call}: more than {MAX_REQUESTS} outstanding requests on {}; NCCL keeps at most 32",
                    self.label()
                )));
            }
            let idx = cur.trailing_zeros() as usize;
            match self
                .free
                .compare_exchange_weak(cur, cur & !(1u64 << idx), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break idx,
                Err(now) => cur = now,
            }
        };
        let slot = &self.slots[idx];
        slot.op.store(op as u8, Ordering::Relaxed);
        slot.n.store(n, Ordering::Relaxed);
        slot.posted.store(posted, Ordering::Relaxed);
        slot.inner.store(std::ptr::null_mut(), Ordering::Relaxed);
        slot.magic.store(REQ_MAGIC, Ordering::Release);
        Ok(slot)
    }

    /// Posts one operation on the inner transport in a fresh request slot: the slot's address is
    /// the request NCCL sees; "try again" and errors give the slot back.
    fn post(
        &self,
        call: &str,
        op: Op,
        n: i32,
        posted: i64,
        inner: impl FnOnce() -> Result<Option<Opaque>>,
    ) -> Result<Option<Opaque>> {
        let slot = self.alloc(call, op, n, posted)?;
        match inner() {
            Ok(Some(r)) => {
                slot.inner.store(r.as_ptr(), Ordering::Relaxed);
                Ok(Opaque::from_ptr(slot as *const ReqSlot as *mut c_void))
            }
            Ok(None) => {
                self.release(slot);
                Ok(None)
            }
            Err(e) => {
                self.release(slot);
                self.counters.error();
                Err(e.context(format!("{call} of {posted} bytes on {}", self.label())))
            }
        }
    }

    fn release(&self, slot: &ReqSlot) {
        slot.magic.store(0, Ordering::Release);
        self.free.fetch_or(1u64 << slot.index, Ordering::Release);
    }

    /// Marks the comm unusable after a panic in a call on it.
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
    }
}

/// The shim over its inner transport.
pub struct Shim {
    inner: Box<dyn Transport>,
    info: LoadInfo,
    name: String,
    unpack: Vec<bool>,
    next_id: AtomicU64,
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos() ^ (std::process::id() as u128));
    h.finish()
}

/// Address of the exported table, so that loading tcpxshim under itself is detected.
static OWN_TABLE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// Records the address of the plugin table this library exports.
pub fn set_own_table(p: *const c_void) {
    OWN_TABLE.store(p as *mut c_void, Ordering::Relaxed);
}

/// Loads the inner transport that NCCL_TCPXSHIM_PLUGIN asks for.
fn load_inner() -> Result<(Box<dyn Transport>, LoadInfo)> {
    let own = OWN_TABLE.load(Ordering::Relaxed) as *const c_void;
    let logger = crate::logging::nccl_logger().or_else(crate::logging::fallback);
    let plugin = |t: PluginTransport| -> (Box<dyn Transport>, LoadInfo) {
        let info = LoadInfo {
            name: t.name().to_string(),
            source: t.path().display().to_string(),
            abi_version: t.abi_version(),
            devices: 0,
        };
        (Box::new(t), info)
    };
    match config::var(config::PLUGIN.name).as_deref() {
        Some("builtin") => builtin(),
        Some(value) => Ok(plugin(PluginTransport::load(value, own, logger)?)),
        None => {
            for path in KNOWN_TCPX_PATHS {
                if !std::path::Path::new(path).exists() {
                    continue;
                }
                match PluginTransport::load(path, own, logger) {
                    Ok(t) => return Ok(plugin(t)),
                    Err(e) => log::warn!("not using {path}: {e}; trying the next candidate"),
                }
            }
            builtin()
        }
    }
}

fn builtin() -> Result<(Box<dyn Transport>, LoadInfo)> {
    let cfg = config::TcpConfig::from_env()?;
    let t = TcpTransport::new(&cfg)?;
    let info = LoadInfo {
        name: t.name().to_string(),
        source: "built-in".into(),
        abi_version: 0,
        devices: 0,
    };
    Ok((Box::new(t), info))
}

impl Shim {
    /// Builds the stack from the NCCL_TCPXSHIM_* environment.
    pub fn from_env() -> Result<Shim> {
        let (inner, info) = load_inner()?;
        Shim::over(inner, info)
    }

    /// Builds the stack over a given inner transport.
    pub fn over(inner: Box<dyn Transport>, mut info: LoadInfo) -> Result<Shim> {
        if inner.handle_size() > INNER_HANDLE_SIZE {
            return Err(Error::Internal(format!(
                "inner transport {} needs a {}-byte handle; tcpxshim leaves it {INNER_HANDLE_SIZE} bytes",
                inner.name(),
                inner.handle_size()
            )));
        }
        let devices = inner.devices()?;
        info.devices = devices;
        let mut unpack = Vec::new();
        for d in 0..devices {
            unpack.push(inner.properties(d)?.device_type == DeviceType::Unpack);
        }
        let name = config::var(config::NAME.name).unwrap_or_else(|| inner.name().to_string());
        Ok(Shim {
            inner,
            info,
            name,
            unpack,
            next_id: AtomicU64::new(1),
        })
    }

    /// What was loaded.
    pub fn info(&self) -> &LoadInfo {
        &self.info
    }

    /// The one-line summary logged at init.
    pub fn summary(&self) -> String {
        let mut s = format!("loaded {} from {}", self.info.name, self.info.source);
        if self.info.abi_version > 0 {
            let _ = write!(s, " (ncclNet v{})", self.info.abi_version);
        }
        let _ = write!(s, ", {} device(s), reporting name {}", self.info.devices, self.name);
        s
    }

    fn check_dev(&self, call: &str, dev: i32) -> Result<()> {
        if dev < 0 || dev >= self.info.devices {
            return Err(Error::InvalidArgument(format!(
                "{call}: device {dev} does not exist ({} has {} device(s))",
                self.info.name, self.info.devices
            )));
        }
        Ok(())
    }

    fn wrap(&self, kind: Kind, inner: Opaque, dev: i32) -> Opaque {
        let peer = self
            .inner
            .describe_comm(inner)
            .unwrap_or_else(|| format!("{} dev {dev}", self.info.name));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let unpack = self.unpack.get(dev as usize).copied().unwrap_or(false);
        let comm = ShimComm::new(kind, inner, dev, id, peer, unpack);
        if kind != Kind::Listen {
            log::info!("opened {}", comm.label());
        }
        Opaque::from_box(comm)
    }

    fn close(&self, call: &str, comm: Opaque, kind: Kind) -> Result<()> {
        let c = open_comm_ref(call, comm, kind)?;
        let result = match kind {
            Kind::Send => self.inner.close_send(c.inner),
            Kind::Recv => self.inner.close_recv(c.inner),
            Kind::Listen => self.inner.close_listen(c.inner),
        };
        if kind != Kind::Listen {
            c.counters.retire();
            let s = c.counters.snapshot();
            log::info!(
                "closed {}: {} messages, {}, {} errors, open {:.1} s",
                c.label(),
                s.messages,
                human_bytes(s.bytes),
                s.errors,
                c.opened.elapsed().as_secs_f64()
            );
        }
        c.magic.store(0, Ordering::Release);
        // SAFETY: `comm` came from Opaque::from_box in `wrap` and its magic was live, so this is
        // its only release; NCCL does not use a comm after closing it.
        drop(unsafe { Box::from_raw(comm.as_ptr() as *mut ShimComm) });
        result.map_err(|e| e.context(call))
    }

    fn finish(&self, c: &ShimComm, slot: &ReqSlot, sizes: Option<&mut [i32]>) -> Result<bool> {
        let n = slot.n.load(Ordering::Relaxed).max(1) as usize;
        let mut local = [0i32; 8];
        let inner_req = Opaque::from_ptr(slot.inner.load(Ordering::Relaxed))
            .ok_or_else(|| Error::Internal("test: request has no inner request".into()))?;
        let done = match self.inner.test(inner_req, Some(&mut local[..n.min(8)])) {
            Ok(d) => d,
            Err(e) => {
                c.counters.error();
                c.release(slot);
                return Err(e.context(format!("test on {}", c.label())));
            }
        };
        if !done {
            return Ok(false);
        }
        let op = slot.op.load(Ordering::Relaxed);
        let bytes: i64 = if op == Op::Send as u8 {
            slot.posted.load(Ordering::Relaxed)
        } else {
            local[..n.min(8)].iter().map(|&s| s.max(0) as i64).sum()
        };
        if op != Op::Flush as u8 {
            c.counters.complete(bytes as u64);
        }
        if let Some(out) = sizes {
            let k = out.len().min(n.min(8));
            out[..k].copy_from_slice(&local[..k]);
        }
        if c.unpack && op == Op::Recv as u8 {
            let mut q = c.consumed.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= CONSUMED_BACKLOG {
                q.pop_front();
            }
            q.push_back((slot as *const ReqSlot as usize, Some(inner_req)));
        }
        c.release(slot);
        Ok(true)
    }
}

/// Looks up a comm NCCL handed back, checking that it is live, of the expected kind, and not
/// poisoned.
fn comm_ref<'a>(call: &str, comm: Opaque, kind: Kind) -> Result<&'a ShimComm> {
    let c = open_comm_ref(call, comm, kind)?;
    c.check_live(call)?;
    Ok(c)
}

/// Like [`comm_ref`], but also accepts a poisoned comm (closing one must still release it).
fn open_comm_ref<'a>(call: &str, comm: Opaque, kind: Kind) -> Result<&'a ShimComm> {
    // SAFETY: NCCL passes back pointers the shim returned; the magic tells a live ShimComm from a
    // closed or foreign one before any other field is trusted.
    let c = unsafe { &*(comm.as_ptr() as *const ShimComm) };
    if c.magic.load(Ordering::Acquire) != COMM_MAGIC {
        return Err(Error::InvalidArgument(format!(
            "{call}: {:p} is not an open tcpxshim comm",
            comm.as_ptr()
        )));
    }
    if c.kind != kind {
        return Err(Error::InvalidUsage(format!(
            "{call}: expected a {} comm, got {}",
            kind.label(),
            c.label()
        )));
    }
    Ok(c)
}

/// A comm of either data kind (regMr and deregMr take both).
fn data_comm_ref<'a>(call: &str, comm: Opaque) -> Result<&'a ShimComm> {
    // SAFETY: as in comm_ref.
    let kind = unsafe { &*(comm.as_ptr() as *const ShimComm) };
    if kind.magic.load(Ordering::Acquire) == COMM_MAGIC && kind.kind == Kind::Recv {
        comm_ref(call, comm, Kind::Recv)
    } else {
        comm_ref(call, comm, Kind::Send)
    }
}

fn slot_ref<'a>(req: Opaque) -> Result<(&'a ShimComm, &'a ReqSlot)> {
    // SAFETY: request pointers are addresses of slots inside a live ShimComm; the magic is
    // checked before the back pointer is followed.
    let slot = unsafe { &*(req.as_ptr() as *const ReqSlot) };
    if slot.magic.load(Ordering::Acquire) != REQ_MAGIC {
        return Err(Error::InvalidArgument(format!(
            "test: {:p} is not an outstanding tcpxshim request (already completed, or never issued)",
            req.as_ptr()
        )));
    }
    // SAFETY: a live slot's back pointer points at its owning comm, which outlives the slot.
    let comm = unsafe { &*slot.comm.load(Ordering::Relaxed) };
    Ok((comm, slot))
}

/// How many grouped receives a request covers (the length of test()'s sizes array).
pub fn request_len(req: Opaque) -> Result<usize> {
    let (_, slot) = slot_ref(req)?;
    Ok(slot.n.load(Ordering::Relaxed).clamp(1, 8) as usize)
}

/// Marks the comm behind `comm` (if it is one) unusable.
pub fn poison(comm: *mut c_void) {
    if let Some(o) = Opaque::from_ptr(comm) {
        // SAFETY: checked by magic before use, as in comm_ref.
        let c = unsafe { &*(o.as_ptr() as *const ShimComm) };
        if c.magic.load(Ordering::Acquire) == COMM_MAGIC {
            c.poison();
        }
    }
}

/// Whether `p` is the address of a live request slot; used to poison a request's comm.
pub fn comm_of_request(req: *mut c_void) -> *mut c_void {
    Opaque::from_ptr(req)
        .and_then(|r| slot_ref(r).ok())
        .map_or(std::ptr::null_mut(), |(c, _)| c as *const ShimComm as *mut c_void)
}

impl Transport for Shim {
    fn name(&self) -> &str {
        &self.name
    }

    fn handle_size(&self) -> usize {
        HANDLE_SIZE
    }

    fn devices(&self) -> Result<i32> {
        Ok(self.info.devices)
    }

    fn properties(&self, dev: i32) -> Result<Properties> {
        self.check_dev("getProperties", dev)?;
        self.inner.properties(dev)
    }

    fn listen(&self, dev: i32, handle: &mut [u8]) -> Result<Opaque> {
        self.check_dev("listen", dev)?;
        let handle: &mut [u8; HANDLE_SIZE] = handle
            .try_into()
            .map_err(|_| Error::InvalidArgument(format!("listen: handle must be {HANDLE_SIZE} bytes")))?;
        handle.fill(0);
        handle::arm_canary(handle);
        let inner = self.inner.listen(dev, &mut handle[..INNER_HANDLE_SIZE])?;
        if let Err(e) = handle::check_canary(handle, self.inner.name()) {
            let _ = self.inner.close_listen(inner);
            return Err(e);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Trailer {
            conn_id: id as u32,
            secret: random_u64(),
            ..Trailer::default()
        }
        .write(handle);
        Ok(self.wrap(Kind::Listen, inner, dev))
    }

    fn connect(&self, dev: i32, handle: &mut [u8], dev_handle: *mut *mut DevHandle) -> Result<Option<Opaque>> {
        self.check_dev("connect", dev)?;
        let handle: &mut [u8; HANDLE_SIZE] = handle
            .try_into()
            .map_err(|_| Error::InvalidArgument(format!("connect: handle must be {HANDLE_SIZE} bytes")))?;
        Trailer::read(handle).map_err(|e| e.context(format!("connect on dev {dev}")))?;
        // The same buffer, unchanged, on every call: TCPX keeps connect state inside it.
        let inner = self.inner.connect(dev, &mut handle[..INNER_HANDLE_SIZE], dev_handle)?;
        Ok(inner.map(|c| self.wrap(Kind::Send, c, dev)))
    }

    fn accept(&self, listen: Opaque, dev_handle: *mut *mut DevHandle) -> Result<Option<Opaque>> {
        let l = comm_ref("accept", listen, Kind::Listen)?;
        let inner = self
            .inner
            .accept(l.inner, dev_handle)
            .map_err(|e| e.context(format!("accept on dev {}", l.dev)))?;
        Ok(inner.map(|c| self.wrap(Kind::Recv, c, l.dev)))
    }

    fn reg_mr(&self, comm: Opaque, data: *mut c_void, size: usize, ptr_type: i32) -> Result<Opaque> {
        let c = data_comm_ref("regMr", comm)?;
        self.inner
            .reg_mr(c.inner, data, size, ptr_type)
            .map_err(|e| e.context(format!("regMr on {}", c.label())))
    }

    fn reg_mr_dmabuf(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: usize,
        ptr_type: i32,
        offset: u64,
        fd: i32,
    ) -> Result<Opaque> {
        let c = data_comm_ref("regMrDmaBuf", comm)?;
        self.inner
            .reg_mr_dmabuf(c.inner, data, size, ptr_type, offset, fd)
            .map_err(|e| e.context(format!("regMrDmaBuf on {}", c.label())))
    }

    fn has_dmabuf(&self) -> bool {
        self.inner.has_dmabuf()
    }

    fn dereg_mr(&self, comm: Opaque, mr: Opaque) -> Result<()> {
        let c = data_comm_ref("deregMr", comm)?;
        self.inner.dereg_mr(c.inner, mr)
    }

    fn isend(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: i32,
        tag: i32,
        mr: Option<Opaque>,
    ) -> Result<Option<Opaque>> {
        let c = comm_ref("isend", comm, Kind::Send)?;
        c.post("isend", Op::Send, 1, size as i64, || {
            self.inner.isend(c.inner, data, size, tag, mr)
        })
    }

    fn irecv(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        tags: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        let c = comm_ref("irecv", comm, Kind::Recv)?;
        if data.is_empty() || data.len() > 8 {
            return Err(Error::InvalidArgument(format!(
                "irecv: n={} is out of range (1 to 8)",
                data.len()
            )));
        }
        let posted = sizes.iter().map(|&s| s as i64).sum();
        c.post("irecv", Op::Recv, data.len() as i32, posted, || {
            self.inner.irecv(c.inner, data, sizes, tags, mrs)
        })
    }

    fn iflush(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        let c = comm_ref("iflush", comm, Kind::Recv)?;
        c.post("iflush", Op::Flush, data.len() as i32, 0, || {
            self.inner.iflush(c.inner, data, sizes, mrs)
        })
    }

    fn test(&self, req: Opaque, sizes: Option<&mut [i32]>) -> Result<bool> {
        let (c, slot) = slot_ref(req)?;
        c.check_live("test")?;
        self.finish(c, slot, sizes)
    }

    fn close_send(&self, comm: Opaque) -> Result<()> {
        self.close("closeSend", comm, Kind::Send)
    }

    fn close_recv(&self, comm: Opaque) -> Result<()> {
        self.close("closeRecv", comm, Kind::Recv)
    }

    fn close_listen(&self, comm: Opaque) -> Result<()> {
        self.close("closeListen", comm, Kind::Listen)
    }

    fn get_device_mr(&self, comm: Opaque, mr: Opaque) -> Result<Option<Opaque>> {
        let c = data_comm_ref("getDeviceMr", comm)?;
        self.inner.get_device_mr(c.inner, mr)
    }

    fn irecv_consumed(&self, comm: Opaque, n: i32, req: Option<Opaque>) -> Result<()> {
        let c = comm_ref("irecvConsumed", comm, Kind::Recv)?;
        if !c.unpack {
            // Host-type transports deliver into the destination buffer: nothing to release.
            return Ok(());
        }
        let inner_req = match req {
            Some(r) => {
                let mut q = c.consumed.lock().unwrap_or_else(|e| e.into_inner());
                let pos = q
                    .iter()
                    .position(|(addr, _)| *addr == r.as_ptr() as usize)
                    .ok_or_else(|| {
                        Error::InvalidUsage(format!(
                            "irecvConsumed: request {:p} is not a completed receive of {}",
                            r.as_ptr(),
                            c.label()
                        ))
                    })?;
                q.remove(pos).and_then(|(_, inner)| inner)
            }
            None => None,
        };
        self.inner.irecv_consumed(c.inner, n, inner_req)
    }

    fn describe_comm(&self, comm: Opaque) -> Option<String> {
        // SAFETY: as in comm_ref.
        let c = unsafe { &*(comm.as_ptr() as *const ShimComm) };
        (c.magic.load(Ordering::Acquire) == COMM_MAGIC).then(|| c.label())
    }
}

static GLOBAL: OnceLock<Shim> = OnceLock::new();
static GLOBAL_INIT: Mutex<()> = Mutex::new(());

/// The process-wide stack, built from the environment on first use. A failed build is retried
/// on the next call, so a later init can succeed once the setting is fixed.
pub fn global() -> Result<&'static Shim> {
    if let Some(s) = GLOBAL.get() {
        return Ok(s);
    }
    let _guard = GLOBAL_INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = GLOBAL.get() {
        return Ok(s);
    }
    let shim = Shim::from_env()?;
    log::info!("{}", shim.summary());
    Ok(GLOBAL.get_or_init(|| shim))
}

/// The stack, if it has been built.
pub fn try_global() -> Option<&'static Shim> {
    GLOBAL.get()
}
