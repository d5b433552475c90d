//! The built-in kernel-TCP transport.
//!
//! One device per selected network interface. A connection is one control socket plus
//! `NCCL_TCPXSHIM_TCP_STREAMS` data sockets, all opened by the sending rank to the receiving
//! rank's listener; each socket starts with a 32-byte hello (magic, socket index, stream count,
//! inline threshold, a per-connection nonce and the listener's token) so the acceptor can group
//! sockets into connections without any reply.
//!
//! Every message starts with a 32-byte header on the control socket (magic, flags, sequence
//! number, size, striping chunk, check word). Messages up to `NCCL_TCPXSHIM_TCP_INLINE` bytes
//! follow their header on the control socket and are written and read by the calling thread:
//! no hand-off, no wake-up, one `sendmsg` for header and payload. Larger messages are cut into at
//! most one chunk per data socket (chunk = max(min chunk, size / streams), page aligned), the
//! first chunk on stream `seq % streams`; both sides derive the layout from the header. The
//! receiver queues chunk reads only after it matched the header to a posted receive, so a send
//! larger than its receive is caught before any payload is read.
//!
//! Data sockets are driven by a fixed pool of I/O worker threads (mio/epoll), created once per
//! transport, which move bytes straight between the sockets and NCCL's buffers; how many, and on
//! which CPUs, follows the CPUs the process may use (`cpus`: `NCCL_TCPXSHIM_TCP_WORKERS`,
//! `NCCL_TCPXSHIM_TCP_CPUS`). With no worker threads the callers of `test` drive the sockets.
//!
//! Half-made connections (a connect NCCL stopped polling, accepted sockets that never send a
//! complete hello, connections missing sockets) are dropped by the next connect or accept once
//! they have been idle for a minute, so abandoned attempts and stray connections do not pile up.
//!
//! Every socket gets TCP keepalive and, when set, TCP_USER_TIMEOUT (see `liveness`), so a peer
//! that goes silent fails the requests waiting on it with a timeout instead of leaving them waiting.

mod comm;
pub mod config;
mod conn;
pub mod cpus;
mod iface;
mod liveness;
mod shared;
mod sys;
#[cfg(test)]
mod tests;
pub(crate) mod wire;
mod worker;

use crate::error::{Error, Result};
use crate::ffi::{DevHandle, HANDLE_SIZE, NCCL_PTR_HOST};
use crate::transport::{DeviceType, Opaque, Properties, Transport};
use comm::{Comm, CommParams, TAG_RECV, TAG_SEND};
pub use config::TcpConfig;
use conn::{ListenComm, ListenParams, PendingConnect, ABANDON_AFTER, TAG_LISTEN};
use iface::Device;
use std::collections::HashMap;
use std::ffi::c_void;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use wire::{ListenHandle, HANDLE_LEN};
use worker::{Dir, Pool};

/// Tag of a memory registration (first word, like every object this transport hands out).
const TAG_MR: u64 = u64::from_le_bytes(*b"txsMR\0\0\0");

/// Distinguishes transports of one process (thread names, tests).
static NEXT_TRANSPORT_ID: AtomicU64 = AtomicU64::new(1);

/// A memory registration: host memory needs nothing, but NCCL wants a handle.
#[repr(C)]
struct Mr {
    tag: u64,
    data: usize,
    size: usize,
}

/// The built-in kernel-TCP transport.
pub struct TcpTransport {
    cfg: TcpConfig,
    devices: Vec<Device>,
    pool: Arc<Pool>,
    /// Smallest striping chunk: NCCL_TCPXSHIM_TCP_MIN_CHUNK, else as the CPU plan says.
    min_chunk: usize,
    pending: Mutex<HashMap<u64, PendingConnect>>,
    next_pending: AtomicU64,
    /// Idle time after which half-made connections are dropped ([`ABANDON_AFTER`]; tests shorten it).
    abandon_after: Duration,
}

/// A random 64-bit value (connection nonces, listener tokens); unique, not secret.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.finish()
}

/// The address the built-in transport would use first with interface selection `ifname`
/// (NCCL_SOCKET_IFNAME syntax; `None`: the default choice), for services that must be reachable
/// where the data goes.
pub(crate) fn default_address(ifname: Option<&str>) -> Result<IpAddr> {
    let seen = iface::list_interfaces()?;
    let first = |spec: Option<&str>| iface::select(spec, &seen).ok().and_then(|d| d.first().map(|d| d.addr));
    // A machine with nothing but loopback talks to itself.
    first(ifname)
        .or_else(|| ifname.is_none().then(|| first(Some("lo"))).flatten())
        .ok_or_else(|| {
            Error::system(format!(
                "no usable network interface matches {}",
                ifname.unwrap_or("the default choice")
            ))
        })
}

impl TcpTransport {
    /// Discovers devices and starts the I/O workers.
    pub fn new(cfg: &TcpConfig) -> Result<TcpTransport> {
        let seen = iface::list_interfaces()?;
        let devices = match cfg.addrs.as_deref() {
            Some(a) => iface::from_addrs(a, &seen)?,
            None => iface::select(cfg.ifname.as_deref(), &seen)?,
        };
        TcpTransport::with_devices(cfg, devices)
    }

    fn with_devices(cfg: &TcpConfig, devices: Vec<Device>) -> Result<TcpTransport> {
        TcpTransport::check_settings(cfg)?;
        let id = NEXT_TRANSPORT_ID.fetch_add(1, Ordering::Relaxed);
        let (allowed, quota) = cpus::discover();
        let plan = cpus::CpuPlan::new(allowed, quota, cfg.workers, cfg.cpus.as_deref())
            .with_spin(cfg.spin_us)
            .with_host(cfg.local_ranks.clone(), cpus::online_cpus());
        let pool = Arc::new(Pool::new(plan.workers, id, &plan)?);
        let min_chunk = cfg.min_chunk.unwrap_or_else(|| plan.min_chunk());
        TcpTransport::log_start(cfg, &devices, &plan);
        Ok(TcpTransport {
            cfg: cfg.clone(),
            devices,
            pool,
            min_chunk,
            pending: Mutex::new(HashMap::new()),
            next_pending: AtomicU64::new(1),
            abandon_after: ABANDON_AFTER,
        })
    }

    /// Rejects settings out of the ranges the wire format and the worker pool allow.
    fn check_settings(cfg: &TcpConfig) -> Result<()> {
        let check = |ok: bool, setting: &str, value: usize, range: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::invalid_argument(format!(
                    "built-in TCP transport: {setting}={value} is out of range (expected {range})"
                )))
            }
        };
        check(
            (1..=64).contains(&cfg.streams),
            "NCCL_TCPXSHIM_TCP_STREAMS",
            cfg.streams,
            "1 to 64",
        )?;
        if let Some(w) = cfg.workers {
            check(w <= 64, "NCCL_TCPXSHIM_TCP_WORKERS", w, "0 to 64")?;
        }
        if let Some(c) = cfg.min_chunk {
            check(
                (1..=i32::MAX as usize).contains(&c),
                "NCCL_TCPXSHIM_TCP_MIN_CHUNK",
                c,
                "1 to 2147483647",
            )?;
        }
        check(
            cfg.inline_max <= i32::MAX as usize,
            "NCCL_TCPXSHIM_TCP_INLINE",
            cfg.inline_max,
            "0 to 2147483647",
        )?;
        Ok(())
    }

    /// The INFO line saying what the transport runs with.
    fn log_start(cfg: &TcpConfig, devices: &[Device], plan: &cpus::CpuPlan) {
        log::info!(
            "built-in TCP transport: devices [{}], {} streams, {} workers, inline up to {} bytes",
            devices
                .iter()
                .map(|d| if d.name == d.ifname {
                    format!("{} {}", d.name, d.addr)
                } else {
                    d.name.clone()
                })
                .collect::<Vec<_>>()
                .join(", "),
            cfg.streams,
            plan.workers,
            cfg.inline_max
        );
        log::info!("built-in TCP transport: {}", plan.describe());
    }

    /// The address device `dev` listens on.
    pub fn device_address(&self, dev: i32) -> Option<IpAddr> {
        usize::try_from(dev)
            .ok()
            .and_then(|d| self.devices.get(d))
            .map(|d| d.addr)
    }

    fn device(&self, dev: i32, call: &str) -> Result<&Device> {
        usize::try_from(dev)
            .ok()
            .and_then(|d| self.devices.get(d))
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "{call}: device {dev} does not exist (the built-in TCP transport has {} device(s): {})",
                    self.devices.len(),
                    self.devices
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    fn params(&self) -> CommParams {
        CommParams {
            streams: self.cfg.streams,
            inline_max: self.cfg.inline_max,
            min_chunk: self.min_chunk,
            liveness: self.cfg.liveness(),
        }
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<u64, PendingConnect>> {
        // The map holds no invariant a panic could break half-way.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops (closing their sockets) pending connects that `connect` has not polled for
    /// `abandon_after`: NCCL gave up on them (an error elsewhere, an abort) and will not come back.
    fn drop_abandoned_connects(&self, call: &str) {
        let max = self.abandon_after;
        self.pending().retain(|id, p| {
            let idle = p.touched.elapsed();
            let keep = idle < max;
            if !keep {
                log::info!(
                    "{call}: dropping abandoned connection attempt {id:#x} to {} (not polled for {}s)",
                    p.peer,
                    idle.as_secs()
                );
            }
            keep
        });
    }

    /// The tag word of an object this transport handed out.
    ///
    /// # Safety
    /// `o` must point at a live object of this transport.
    unsafe fn tag(o: Opaque) -> u64 {
        // SAFETY: all our objects are #[repr(C)] with a u64 tag first (caller's contract for liveness).
        unsafe { *(o.as_ptr() as *const u64) }
    }

    fn listen_comm<'a>(o: Opaque, call: &str) -> Result<&'a ListenComm> {
        // SAFETY: NCCL passes back the listen comm this transport returned and has not closed it.
        if unsafe { TcpTransport::tag(o) } != TAG_LISTEN {
            return Err(Error::invalid_argument(format!(
                "{call}: {:p} is not a listen comm of the built-in TCP transport",
                o.as_ptr()
            )));
        }
        // SAFETY: the tag identifies a live ListenComm.
        Ok(unsafe { &*(o.as_ptr() as *const ListenComm) })
    }

    /// What request `req` of comm `comm` still waits for, in this transport's own words; the shim's
    /// stall warning asks for it (and says comm, peer, operation, size and age itself). A send:
    /// "message #3: 32 of 32 control bytes written, 2 chunk(s) still with the I/O workers (the peer
    /// is not reading: is its irecv posted?)". A receive: "no message from the sender yet (1 earlier
    /// receive(s) of this connection waiting too; is the peer's isend posted?)", "message #3 inline,
    /// 400 of 1000 bytes in" or "message #3 of 4194304 bytes, 3 chunk(s) still to arrive".
    ///
    /// A pure query: it reads no socket and moves no request forward. `None` when `req` is not an
    /// outstanding request of `comm` (already completed, or another comm's), when it waits for
    /// nothing any more (the next test completes it), or when another thread is using the comm at
    /// that moment (the query never waits for it).
    ///
    /// # Safety
    /// `comm` and `req` are live objects of this transport: `comm` a send or receive comm not yet
    /// closed, `req` a request that isend or irecv returned on it (completed or not).
    pub(crate) unsafe fn stall_detail_of(&self, comm: Opaque, req: Opaque) -> Option<String> {
        // SAFETY: forwarded caller contract.
        unsafe { comm::stall_detail(comm, req) }
    }

    /// Raw fds a comm or listen comm holds (tests check they are all closed afterwards).
    #[cfg(test)]
    fn comm_fds(&self, o: Opaque) -> Vec<std::os::fd::RawFd> {
        // SAFETY: tests pass live objects of this transport.
        match unsafe { TcpTransport::tag(o) } {
            // SAFETY: as above.
            TAG_SEND | TAG_RECV => unsafe { &*(o.as_ptr() as *const Comm) }.fds().to_vec(),
            // SAFETY: as above.
            TAG_LISTEN => unsafe { &*(o.as_ptr() as *const ListenComm) }.fds(),
            _ => Vec::new(),
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.pool.stop();
        self.pending().clear();
    }
}

impl Transport for TcpTransport {
    fn name(&self) -> &str {
        "tcpxshim"
    }

    fn devices(&self) -> Result<i32> {
        Ok(self.devices.len() as i32)
    }

    fn properties(&self, dev: i32) -> Result<Properties> {
        let d = self.device(dev, "getProperties")?;
        Ok(Properties {
            name: d.name.clone(),
            pci_path: d.pci.clone().or_else(|| iface::pci_path(&d.ifname)),
            guid: dev as u64,
            ptr_support: NCCL_PTR_HOST as i32,
            speed_mbps: iface::speed_mbps(&d.ifname),
            port: 0,
            latency_us: 0.0,
            max_comms: 65536,
            max_recvs: 1,
            device_type: DeviceType::Host,
            device_version: 0,
        })
    }

    fn listen(&self, dev: i32, handle: &mut [u8; HANDLE_SIZE]) -> Result<Opaque> {
        let d = self.device(dev, "listen")?;
        if handle.len() < HANDLE_LEN {
            return Err(Error::invalid_argument(format!(
                "listen: handle buffer is {} bytes, the built-in TCP transport needs {HANDLE_LEN}",
                handle.len()
            )));
        }
        let params = ListenParams {
            streams: self.cfg.streams as u16,
            inline_max: self.cfg.inline_max as u32,
            token: random_u64(),
            abandon_after: self.abandon_after,
            liveness: self.cfg.liveness(),
            ports: self.cfg.ports,
        };
        // Room for many peers connecting at once, each with 1 + streams sockets.
        let backlog = (128 * (1 + self.cfg.streams)).min(65535) as i32;
        let lc =
            ListenComm::bind(d.addr, backlog, params).map_err(|e| e.context(format!("device {dev} ({})", d.name)))?;
        ListenHandle {
            addr: lc.addr,
            streams: params.streams,
            inline_max: params.inline_max,
            token: params.token,
        }
        .write(handle)?;
        Ok(Opaque::from_box(Box::new(lc)))
    }

    unsafe fn connect(
        &self,
        dev: i32,
        handle: &mut [u8; HANDLE_SIZE],
        _dev_handle: *mut *mut DevHandle,
    ) -> Result<Option<Opaque>> {
        self.drop_abandoned_connects("connect");
        self.device(dev, "connect")?;
        let lh = ListenHandle::read(handle)?;
        if lh.streams as usize != self.cfg.streams {
            return Err(Error::invalid_usage(format!(
                "connect: peer {} expects {} data streams but this rank uses {}; NCCL_TCPXSHIM_TCP_STREAMS must \
                 match on every rank",
                lh.addr, lh.streams, self.cfg.streams
            )));
        }
        if lh.inline_max as usize != self.cfg.inline_max {
            return Err(Error::invalid_usage(format!(
                "connect: peer {} inlines messages up to {} bytes but this rank up to {}; NCCL_TCPXSHIM_TCP_INLINE \
                 must match on every rank",
                lh.addr, lh.inline_max, self.cfg.inline_max
            )));
        }
        let mut id = wire::connect_state(handle);
        let mut pend = if id == 0 {
            id = self.next_pending.fetch_add(1, Ordering::Relaxed);
            let p = PendingConnect::start(
                lh.addr,
                lh.streams,
                lh.inline_max,
                lh.token,
                random_u64(),
                self.cfg.liveness(),
            )?;
            wire::set_connect_state(handle, id);
            p
        } else {
            self.pending().remove(&id).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "connect: the handle's connect state ({id:#x}) names no connection to {} in progress in this \
                     process (corrupted handle, one reused after its connect finished or failed, or a connect not \
                     polled for {}s and dropped as abandoned)",
                    lh.addr,
                    self.abandon_after.as_secs()
                ))
            })?
        };
        match pend.progress() {
            Err(e) => {
                wire::set_connect_state(handle, 0);
                Err(e)
            }
            Ok(false) => {
                pend.touched = Instant::now();
                self.pending().insert(id, pend);
                Ok(None)
            }
            Ok(true) => {
                wire::set_connect_state(handle, 0);
                let peer = pend.peer;
                let (ctrl, data) = pend.into_sockets()?;
                Comm::create(Dir::Send, &self.pool, peer, ctrl, data, self.params()).map(Some)
            }
        }
    }

    unsafe fn accept(&self, listen: Opaque, _dev_handle: *mut *mut DevHandle) -> Result<Option<Opaque>> {
        self.drop_abandoned_connects("accept");
        let lc = TcpTransport::listen_comm(listen, "accept")?;
        match lc.poll_accept()? {
            None => Ok(None),
            Some(a) => Comm::create(Dir::Recv, &self.pool, a.peer, a.ctrl, a.data, self.params()).map(Some),
        }
    }

    unsafe fn reg_mr(&self, _comm: Opaque, data: *mut c_void, size: usize, ptr_type: i32) -> Result<Opaque> {
        if ptr_type != NCCL_PTR_HOST as i32 {
            return Err(Error::invalid_argument(format!(
                "regMr: the built-in TCP transport takes host memory only (ptrSupport NCCL_PTR_HOST); got pointer \
                 type {ptr_type}"
            )));
        }
        Ok(Opaque::from_box(Box::new(Mr {
            tag: TAG_MR,
            data: data as usize,
            size,
        })))
    }

    unsafe fn dereg_mr(&self, _comm: Opaque, mr: Opaque) -> Result<()> {
        // SAFETY: NCCL passes back a registration this transport returned and has not deregistered.
        if unsafe { TcpTransport::tag(mr) } != TAG_MR {
            return Err(Error::invalid_argument(format!(
                "deregMr: {:p} is not a memory handle of the built-in TCP transport",
                mr.as_ptr()
            )));
        }
        // SAFETY: the tag identifies an Mr made by Opaque::from_box in reg_mr; NCCL frees it once.
        let m = unsafe { Box::from_raw(mr.as_ptr() as *mut Mr) };
        log::trace!("deregMr: {:#x} ({} bytes)", m.data, m.size);
        Ok(())
    }

    unsafe fn isend(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: i32,
        _tag: i32,
        _mr: Option<Opaque>,
    ) -> Result<Option<Opaque>> {
        // SAFETY: NCCL passes back a send comm this transport returned and has not closed.
        let c = unsafe { Comm::from_opaque(comm, TAG_SEND, "isend")? };
        c.isend(data as *const u8, size).map(Some)
    }

    unsafe fn irecv(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        _tags: &[i32],
        _mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        // SAFETY: NCCL passes back a receive comm this transport returned and has not closed.
        let c = unsafe { Comm::from_opaque(comm, TAG_RECV, "irecv")? };
        if data.len() != 1 || sizes.len() != 1 {
            return Err(Error::invalid_argument(format!(
                "irecv: {} grouped receives requested ({} sizes), but the built-in TCP transport reports maxRecvs 1 \
                 ({})",
                data.len(),
                sizes.len(),
                c.describe()
            )));
        }
        c.irecv(data[0] as *mut u8, sizes[0]).map(Some)
    }

    unsafe fn iflush(
        &self,
        _comm: Opaque,
        _data: &[*mut c_void],
        _sizes: &[i32],
        _mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        Ok(None)
    }

    unsafe fn test(&self, req: Opaque, sizes: Option<&mut [i32]>) -> Result<bool> {
        // SAFETY: NCCL passes back a request this transport returned, not yet completed, on an open comm.
        unsafe { comm::test_request(req, sizes) }
    }

    unsafe fn close_send(&self, comm: Opaque) -> Result<()> {
        // SAFETY: NCCL closes a send comm this transport returned, once.
        unsafe { Comm::close(comm, TAG_SEND, "closeSend") }
    }

    unsafe fn close_recv(&self, comm: Opaque) -> Result<()> {
        // SAFETY: NCCL closes a receive comm this transport returned, once.
        unsafe { Comm::close(comm, TAG_RECV, "closeRecv") }
    }

    unsafe fn close_listen(&self, comm: Opaque) -> Result<()> {
        TcpTransport::listen_comm(comm, "closeListen")?;
        // SAFETY: the tag identifies a ListenComm made by Opaque::from_box in listen; NCCL closes it once.
        drop(unsafe { Box::from_raw(comm.as_ptr() as *mut ListenComm) });
        Ok(())
    }

    unsafe fn stall_detail(&self, comm: Opaque, req: Opaque) -> Option<String> {
        // SAFETY: the caller passes a live comm of this transport and a request posted on it.
        unsafe { self.stall_detail_of(comm, req) }
    }

    unsafe fn break_comm(&self, comm: Opaque) -> bool {
        // SAFETY: the caller passes an open comm of this transport.
        match unsafe { TcpTransport::tag(comm) } {
            TAG_SEND | TAG_RECV => {
                // SAFETY: the tag identifies a live Comm.
                unsafe { &*(comm.as_ptr() as *const Comm) }.cut();
                true
            }
            _ => false,
        }
    }

    unsafe fn describe_comm(&self, comm: Opaque) -> Option<String> {
        // SAFETY: NCCL (or the shim) passes a live comm of this transport.
        match unsafe { TcpTransport::tag(comm) } {
            // SAFETY: the tag identifies a live Comm.
            TAG_SEND | TAG_RECV => Some(unsafe { &*(comm.as_ptr() as *const Comm) }.describe()),
            TAG_LISTEN => {
                // SAFETY: the tag identifies a live ListenComm.
                let lc = unsafe { &*(comm.as_ptr() as *const ListenComm) };
                Some(format!("listening on {}, {} streams", lc.addr, self.cfg.streams))
            }
            _ => None,
        }
    }
}
