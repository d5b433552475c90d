//! The shim's own layer, the top of the stack: every comm, registration and request NCCL holds
//! is a record of this layer, found through its object table; it also writes and reads the
//! handle trailer, keeps per-connection counters, warns about requests that do not complete,
//! and poisons a comm after an internal error.
//!
//! [`Shim`] is itself a [`Transport`], so the `tcpxshim` command and the Endpoint API drive
//! exactly the stack NCCL drives.

use super::handle::{self, Handles};
use super::objects::{CommRec, CommSpec, Kind, MrRec, Op, PostArgs, ReqRec, MAX_RECVS};
use super::table::{CommKey, MrKey, ReqKey, Table, MAX_COMMS};
use super::LoadInfo;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::ffi::{DevHandle, HANDLE_SIZE};
use crate::metrics::{conn::Dir, human_bytes, Metrics, Setup};
use crate::transport::{DeviceType, Opaque, Properties, Transport};
use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::pool::{self, ConnectStep, Entry, Listening, Pool, PoolMode};
use crate::control::link::{Link, LinkConfig};
use crate::recovery::engine::Engine;
use crate::recovery::RecoveryConfig;
use std::net::SocketAddr;

/// The control link each listen comm's connection will use, by NCCL's listen handle (the
/// engines themselves live in the comms' records), and what the pool keeps of comms.
#[derive(Default)]
struct Engines {
    listening: Mutex<HashMap<usize, Link>>,
    /// Listen comms that take pool claims: their handle's conn id, by NCCL's listen handle.
    pool_listens: Mutex<HashMap<usize, u32>>,
    /// Send and receive comms that may go to the pool: the listener's control service (send
    /// comms) and the times the connection was reused, by NCCL's comm handle.
    pooled: Mutex<HashMap<usize, (Option<SocketAddr>, u64)>>,
}

/// A comm found in the table, with the key it stands under.
struct Found<'a> {
    key: CommKey,
    rec: &'a CommRec,
}

impl std::ops::Deref for Found<'_> {
    type Target = CommRec;
    #[inline]
    fn deref(&self) -> &CommRec {
        self.rec
    }
}

/// Now on the coarse monotonic clock (a few milliseconds of resolution, a fraction of the cost of
/// a precise read), in nanoseconds: when requests were posted, for the stall warning.
#[inline]
fn coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The registrations of one post: the inner transport's and the shim's keys.
struct Mrs {
    inner: [Option<Opaque>; MAX_RECVS],
    keys: [Option<MrKey>; MAX_RECVS],
}

/// The registration key NCCL's memory handle `m` stands for.
#[inline]
fn mr_key(call: &str, m: Opaque) -> Result<MrKey> {
    MrKey::from_opaque(m).ok_or_else(|| {
        Error::invalid_argument(format!(
            "{call}: {:#x} is not a tcpxshim memory handle",
            m.as_ptr() as usize
        ))
    })
}

/// How often (in test() calls of one request) the stall clock is read.
const STALL_SAMPLE: u32 = 1024;

/// The shim over its inner transport (the layers beneath it included).
pub struct Shim {
    inner: Box<dyn Transport>,
    info: LoadInfo,
    name: String,
    unpack: Vec<bool>,
    /// Each device's maxRecvs (grouped receives one irecv may carry).
    max_recvs: Vec<i32>,
    comms: Table<CommRec>,
    next_id: AtomicU64,
    stall_warn: Option<Duration>,
    handles: Handles,
    /// Metrics (NCCL_TCPXSHIM_METRICS_DIR), fed from the shim's own records.
    metrics: Option<Metrics>,
    abort_on_error: bool,
    /// The recovery settings, when the engine runs (NCCL_TCPXSHIM_RECOVERY=1 and a timeout).
    recovery: Option<RecoveryConfig>,
    link_cfg: LinkConfig,
    engines: Engines,
    /// Idle connections for the next comm between the same processes (NCCL_TCPXSHIM_POOL).
    pool: Option<std::sync::Arc<Pool>>,
}

/// What the two ends of a pooled connection must agree on: the settings peers compare, and the
/// recovery settings both engines assume to match.
fn pool_settings(handles: &Handles, cfg: &Config) -> Vec<u8> {
    let mut b = handles.settings_body().to_vec();
    let r = &cfg.recovery;
    for v in [r.copy_max, r.copy_ring, u64::from(r.ack_every)] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

impl Drop for Shim {
    fn drop(&mut self) {
        if let Some(p) = &self.pool {
            let c = p.counts();
            if c.parked > 0 || c.hits > 0 {
                log::info!(
                    "pool: {} connections reused, {} misses, {} closed idle or stale, {} send and {} receive idle at the end",
                    c.hits,
                    c.misses,
                    c.evictions,
                    c.idle_send,
                    c.idle_recv
                );
            }
            p.drain().close(self.inner.as_ref());
        }
    }
}

impl Shim {
    /// The top of a stack over `inner` (the other layers already applied).
    pub fn over(inner: Box<dyn Transport>, mut info: LoadInfo, cfg: &Config) -> Result<Shim> {
        let devices = inner.devices()?;
        info.devices = devices;
        let (mut unpack, mut max_recvs) = (Vec::new(), Vec::new());
        for d in 0..devices {
            let p = inner.properties(d)?;
            unpack.push(p.device_type == DeviceType::Unpack);
            max_recvs.push(p.max_recvs);
        }
        let name = cfg.name.clone().unwrap_or_else(|| inner.name().to_string());
        let metrics = cfg
            .metrics_dir
            .as_ref()
            .map(|dir| Metrics::new(cfg, inner.name(), dir.clone()));
        let handles = Handles::new(cfg, inner.name());
        let recovery = (cfg.recovery_engine && cfg.recovery.enabled()).then(|| cfg.recovery.clone());
        let pool = match (cfg.pool.mode, &recovery) {
            (PoolMode::Off, _) => None,
            (mode, None) => {
                if mode == PoolMode::Force {
                    log::warn!(
                        "{}=force: connections are not pooled, because pooling needs the recovery engine's control \
                         link and {} is 0",
                        pool::POOL.name,
                        crate::config::RECOVERY.name
                    );
                }
                None
            }
            (mode, Some(_)) => {
                if mode == PoolMode::Force && unpack.iter().any(|&u| u) {
                    log::warn!(
                        "{}=force: connections over {} (UNPACK receives) are not pooled: the shim has no control link \
                         for them; connections over host-type devices are",
                        pool::POOL.name,
                        inner.name()
                    );
                }
                Some(std::sync::Arc::new(Pool::new(
                    cfg.pool.clone(),
                    pool::digest(&pool_settings(&handles, cfg)),
                )))
            }
        };
        if let (Some(m), Some(p)) = (&metrics, &pool) {
            m.shared().set_pool(p.stats.clone());
        }
        Ok(Shim {
            inner,
            info,
            name,
            unpack,
            max_recvs,
            comms: Table::new(MAX_COMMS),
            next_id: AtomicU64::new(1),
            stall_warn: cfg.stall_warn,
            handles,
            metrics,
            abort_on_error: cfg.abort_on_error,
            recovery,
            link_cfg: cfg.link.clone(),
            engines: Engines::default(),
            pool,
        })
    }

    /// Counts of the settings checks between peers made by connects so far.
    pub fn check_stats(&self) -> super::cfgcheck::CheckStats {
        self.handles.check_stats()
    }

    /// Settings requests this stack's control service received; `None` while it is not running.
    pub fn settings_requests(&self) -> Option<u64> {
        self.handles.settings_requests()
    }

    /// The metrics, when on.
    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_ref()
    }

    /// The metrics record of comm `c`, when metrics are on.
    #[inline]
    fn mconn(&self, c: &CommRec) -> Option<&crate::metrics::conn::Conn> {
        self.metrics.as_ref()?;
        let p = c.metrics_ptr();
        // SAFETY: the records of `self.comms` are written only by `wrap` (the table is private to
        // the shim), which puts there NULL or a pointer to an entry of `self.metrics`' list;
        // entries of that append-only list are never moved or freed while the list lives, and it
        // lives as long as `self.metrics`, which the returned reference borrows.
        unsafe { p.as_ref() }
    }

    /// Now, for a request's post time: the metrics' precise clock (raw ticks) when metrics time
    /// requests, else the coarse clock (enough for the stall warning).
    #[inline]
    fn stamp(&self) -> u64 {
        if self.metrics.is_some() {
            crate::metrics::clock::ticks()
        } else {
            coarse_ns()
        }
    }

    /// Nanoseconds since `stamp` (a [`Shim::stamp`]).
    fn age_ns(&self, stamp: u64) -> u64 {
        if self.metrics.is_some() {
            crate::metrics::clock::now_ns().saturating_sub(crate::metrics::clock::ticks_to_time(stamp))
        } else {
            coarse_ns().saturating_sub(stamp)
        }
    }

    /// Gives the new comm `comm` its recovery engine.
    fn add_engine(&self, comm: Opaque, e: Engine) {
        if let Ok(c) = self.lookup("", comm) {
            c.set_engine(c.key, e);
        }
    }

    /// The connection pool's counts; `None` when the stack does not pool.
    pub fn pool_counts(&self) -> Option<pool::PoolCounts> {
        self.pool.as_deref().map(Pool::counts)
    }

    /// Closes every idle connection of the pool at once, as the process's end would (tests).
    #[doc(hidden)]
    pub fn drain_pool(&self) {
        if let Some(p) = &self.pool {
            p.drain().close(self.inner.as_ref());
        }
    }

    /// Recoveries the engines of open comms made so far (tests).
    pub fn recoveries(&self) -> u64 {
        self.comms.live().map(CommRec::recoveries).sum()
    }

    /// Whether NCCL_TCPXSHIM_ABORT_ON_ERROR asks to end the process on an error that ends the job.
    pub fn abort_on_error(&self) -> bool {
        self.abort_on_error
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
            return Err(Error::invalid_argument(format!(
                "{call}: device {dev} does not exist ({} has {} device(s))",
                self.info.name, self.info.devices
            )));
        }
        Ok(())
    }

    /// Records a new comm over the inner comm `inner` and returns the key NCCL sees.
    fn wrap(&self, kind: Kind, inner: Opaque, dev: i32, served: Option<u32>) -> Result<Opaque> {
        // SAFETY: `inner` was just returned by the inner transport and is open.
        let peer =
            unsafe { self.inner.describe_comm(inner) }.unwrap_or_else(|| format!("{} dev {dev}", self.info.name));
        let metrics: Option<&crate::metrics::conn::Conn> = match (&self.metrics, kind) {
            (Some(m), Kind::Send) => m.conn(m.open(Dir::Send, Some(&peer), dev)),
            (Some(m), Kind::Recv) => m.conn(m.open(Dir::Recv, Some(&peer), dev)),
            _ => None,
        };
        let spec = CommSpec {
            kind,
            inner,
            dev,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            unpack: self.unpack.get(dev as usize).copied().unwrap_or(false),
            served: served.unwrap_or(0),
            metrics: metrics.map_or(std::ptr::null(), |c| c as *const _),
        };
        let Some((key, rec)) = self.comms.insert(spec) else {
            if let (Some(m), Some(c)) = (&self.metrics, metrics) {
                m.close(c, false);
            }
            if kind != Kind::Listen {
                // SAFETY: `inner` was just made and nobody else has it; the caller of a failed
                // listen closes its own.
                let _ = unsafe {
                    match kind {
                        Kind::Send => self.inner.close_send(inner),
                        _ => self.inner.close_recv(inner),
                    }
                };
            }
            return Err(Error::invalid_usage(format!(
                "{}: this process already has {MAX_COMMS} comms open through tcpxshim",
                kind.label()
            )));
        };
        if kind != Kind::Listen {
            log::info!("opened {}", rec.label());
        }
        Ok(key.to_opaque())
    }

    /// The open comm NCCL's `comm` stands for, of kind `kind` (any data kind when `None`).
    #[inline]
    fn comm(&self, call: &str, comm: Opaque, kind: Option<Kind>) -> Result<Found<'_>> {
        let c = self.lookup(call, comm)?;
        match kind {
            Some(k) if c.kind() != k => Err(Error::invalid_usage(format!(
                "{call}: expected a {} comm, got {}",
                k.label(),
                c.label()
            ))),
            None if c.kind() == Kind::Listen => Err(Error::invalid_usage(format!(
                "{call}: expected a send or receive comm, got {}",
                c.label()
            ))),
            _ => Ok(c),
        }
    }

    /// Like [`Shim::comm`] without the kind check and without refusing a poisoned comm.
    #[inline]
    fn lookup(&self, call: &str, comm: Opaque) -> Result<Found<'_>> {
        CommKey::from_opaque(comm)
            .and_then(|key| self.comms.get(key).map(|rec| Found { key, rec }))
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "{call}: {:#x} is not an open tcpxshim comm (closed already, or never returned by this plugin)",
                    comm.as_ptr() as usize
                ))
            })
    }

    #[inline]
    fn live_comm(&self, call: &str, comm: Opaque, kind: Option<Kind>) -> Result<Found<'_>> {
        let c = self.comm(call, comm, kind)?;
        c.check_live(call)?;
        Ok(c)
    }

    fn close(&self, call: &str, comm: Opaque, kind: Kind) -> Result<()> {
        let c = self.comm(call, comm, Some(kind))?;
        let (removed, mut engine) = c.remove_with_engine(&self.comms, c.key);
        if !removed {
            return Err(Error::invalid_argument(format!(
                "{call}: {} is being closed already",
                c.label()
            )));
        }
        let key = comm.as_ptr() as usize;
        if kind == Kind::Listen {
            crate::lock(&self.engines.listening).remove(&key);
            let id = crate::lock(&self.engines.pool_listens).remove(&key);
            if let (Some(p), Some(id)) = (&self.pool, id) {
                p.unlisten(id).close(self.inner.as_ref());
            }
        }
        let pooled = crate::lock(&self.engines.pooled).remove(&key);
        let mut parked = false;
        if let (Some(p), Some((peer_ctrl, reuses)), true) = (&self.pool, pooled, engine.is_some()) {
            let e = engine.take().unwrap_or_else(|| unreachable!("checked above"));
            match e.park(self.inner.as_ref()) {
                Ok(k) => {
                    let entry = Entry {
                        id: 0,
                        comm: k.comm,
                        link: k.link,
                        count: k.count,
                        dev: c.dev(),
                        peer: c.label(),
                        peer_ctrl,
                        since: std::time::Instant::now(),
                        reuses,
                    };
                    p.park(entry, kind == Kind::Send, k.stash).close(self.inner.as_ref());
                    parked = true;
                }
                Err(e) => engine = Some(e),
            }
        }
        // SAFETY: the record was live in the table, so its inner comm is open, and removing it
        // made this the only close.
        let result = unsafe {
            if parked {
                Ok(())
            } else if let Some(e) = engine.as_mut() {
                e.close(self.inner.as_ref())
            } else {
                match kind {
                    Kind::Send => self.inner.close_send(c.inner()),
                    Kind::Recv => self.inner.close_recv(c.inner()),
                    Kind::Listen => self.inner.close_listen(c.inner()),
                }
            }
        };
        if let Some(id) = c.served() {
            self.handles.withdraw(id);
        }
        if let (Some(m), Some(mc)) = (&self.metrics, self.mconn(&c)) {
            m.close(mc, result.is_ok());
        }
        if kind != Kind::Listen {
            c.counters.retire();
            let s = c.counters.snapshot();
            log::info!(
                "closed {}: {} messages, {}, {} errors, open {:.1} s{}",
                c.label(),
                s.messages,
                human_bytes(s.bytes),
                s.errors,
                c.age_secs(),
                if parked {
                    "; its connection is kept for reuse (NCCL_TCPXSHIM_POOL)"
                } else {
                    ""
                }
            );
        }
        result.map_err(|e| e.context(call))
    }

    /// The inner registrations behind NCCL's memory handles (NULL stays NULL), each checked to
    /// cover its buffer.
    #[inline]
    fn inner_mrs(
        &self,
        call: &str,
        c: &Found<'_>,
        mrs: &[Option<Opaque>],
        data: &[*mut c_void],
        sizes: &[i32],
    ) -> Result<Mrs> {
        let mut out = Mrs {
            inner: [None; MAX_RECVS],
            keys: [None; MAX_RECVS],
        };
        for (i, m) in mrs.iter().enumerate().take(MAX_RECVS) {
            if let Some(m) = *m {
                let (inner, key) = self.inner_mr(call, c, m, data[i], sizes[i])?;
                out.inner[i] = Some(inner);
                out.keys[i] = Some(key);
            }
        }
        Ok(out)
    }

    /// The inner registration behind NCCL's memory handle `m`, checked to cover its buffer.
    #[inline]
    fn inner_mr(&self, call: &str, c: &Found<'_>, m: Opaque, data: *mut c_void, size: i32) -> Result<(Opaque, MrKey)> {
        let key = mr_key(call, m)?;
        Ok((c.mr_for(call, c.key, key, data as usize, size)?, key))
    }

    /// [`Transport::test`] for a caller that has room for one size per grouped receive of the
    /// request at `sizes` (or NULL), as NCCL's test() does.
    ///
    /// # Safety
    /// `sizes` is NULL or valid for writing as many `i32`s as the request has grouped receives.
    pub unsafe fn test_into(&self, req: Opaque, sizes: *mut i32) -> Result<bool> {
        let Some((local, n)) = self.test_request(req)? else {
            return Ok(false);
        };
        if !sizes.is_null() {
            // SAFETY: the caller gives room for `n` sizes (one per grouped receive).
            unsafe { std::ptr::copy_nonoverlapping(local.as_ptr(), sizes, n) };
        }
        Ok(true)
    }

    /// NCCL's test() of `req`: its comm found, refused if poisoned, the request tested.
    #[inline]
    fn test_request(&self, req: Opaque) -> Result<Option<([i32; MAX_RECVS], usize)>> {
        let (c, key) = self.request_comm("test", req)?;
        c.check_live("test")?;
        self.finish(&c, key)
    }

    #[inline]
    fn request_comm(&self, call: &str, req: Opaque) -> Result<(Found<'_>, ReqKey)> {
        let key = ReqKey::from_opaque(req).ok_or_else(|| {
            Error::invalid_argument(format!(
                "{call}: {:#x} is not a tcpxshim request",
                req.as_ptr() as usize
            ))
        })?;
        let (ckey, rec) = self.comms.get16(key.comm, key.comm_gen).ok_or_else(|| {
            Error::invalid_argument(format!(
                "{call}: request {:#x} belongs to a comm that is closed",
                req.as_ptr() as usize
            ))
        })?;
        Ok((Found { key: ckey, rec }, key))
    }

    /// Marks unusable the comm NCCL's `obj` stands for, or the comm of the request it stands for
    /// (nothing if it is neither).
    pub fn poison(&self, obj: *mut c_void) {
        let Some(o) = Opaque::from_ptr(obj) else { return };
        if let Ok(c) = self.lookup("", o) {
            c.poison();
        } else if let Ok((c, _)) = self.request_comm("", o) {
            c.poison();
        }
    }

    /// Open comms (for tests and the end-of-run summary).
    pub fn open_comms(&self) -> usize {
        self.comms.live_count()
    }

    fn warn_stalled(&self, c: &CommRec, key: CommKey, r: &mut ReqRec, limit: Duration) {
        let age = Duration::from_nanos(self.age_ns(r.at_ns));
        if age < limit {
            return;
        }
        r.warned = true;
        let p = &r.posted;
        let what = if p.n > 1 {
            format!("{} of {} grouped receives ({} bytes)", p.op.call(), p.n, p.bytes())
        } else {
            format!("{} of {} bytes (tag {})", p.op.call(), p.bytes(), p.tags[0])
        };
        let detail = r.inner.and_then(|ir| {
            // The engine's request ids are not the inner transport's: it asks for its own.
            match c.with_engine(key, |e| e.stall_detail(self.inner.as_ref(), ir)) {
                Ok(Some(d)) => d,
                Err(_) => None,
                // SAFETY: the comm is open and the request outstanding (the caller holds its slot).
                Ok(None) => unsafe { self.inner.stall_detail(c.inner(), ir) },
            }
        });
        let side = match p.op {
            Op::Send => "the peer is not receiving",
            _ => "the peer has not sent",
        };
        log::warn!(
            "test: {what} on {} has been outstanding for {:.1} s while NCCL keeps testing it ({}); look at that peer \
             (warned once per request after {}={} s)",
            c.label(),
            age.as_secs_f64(),
            detail.unwrap_or_else(|| side.to_string()),
            crate::config::STALL_WARN.name,
            limit.as_secs_f64()
        );
    }

    /// Tests request `key` of `c` on the inner transport: `None` while not done, else the sizes
    /// (one per grouped receive) and how many there are.
    #[inline]
    fn finish(&self, c: &Found<'_>, key: ReqKey) -> Result<Option<([i32; MAX_RECVS], usize)>> {
        let mut g = c.request("test", key)?;
        let r = g.rec();
        let n = r.posted.n.clamp(1, MAX_RECVS);
        let mut local = [0i32; MAX_RECVS];
        let ireq = r
            .inner
            .ok_or_else(|| Error::internal("test: a live request has no inner request"))?;
        let by_engine = c.with_engine(c.key, |e| {
            let r = e.test(self.inner.as_ref(), ireq, &mut local[..n]);
            if let Some(m) = self.mconn(c) {
                m.recoveries.fetch_max(e.recoveries(), Ordering::Relaxed);
            }
            r
        });
        let tested = match by_engine {
            Ok(Some(r)) => r,
            Err(e) => Err(e),
            // SAFETY: the inner request is outstanding (its record is live and this call holds
            // it), and `local` has one entry per grouped receive.
            Ok(None) => unsafe { self.inner.test(ireq, Some(&mut local[..n])) },
        };
        let done = match tested {
            Ok(d) => d,
            Err(e) => {
                c.counters.error();
                if let Some(m) = self.mconn(c) {
                    m.failed(key.slot as usize);
                }
                g.retire();
                return Err(self.data_error(c, e.context(format!("test on {}", c.label()))));
            }
        };
        if !done {
            r.tests = r.tests.wrapping_add(1);
            if let Some(limit) = self.stall_warn {
                if !r.warned && r.tests % STALL_SAMPLE == 0 {
                    self.warn_stalled(c, c.key, r, limit);
                }
            }
            return Ok(None);
        }
        let op = r.posted.op;
        let bytes = match op {
            Op::Send => r.posted.bytes(),
            _ => local[..n].iter().map(|&s| s.max(0) as i64).sum(),
        };
        if op != Op::Flush {
            c.counters.complete(bytes as u64);
        }
        if let Some(m) = self.mconn(c) {
            let b = (op != Op::Flush).then_some(bytes as u64);
            m.completed(key.slot as usize, r.at_ns, crate::metrics::clock::ticks(), b);
        }
        if c.unpack() && op == Op::Recv {
            c.completed_unpack(key, ireq);
        }
        g.retire();
        Ok(Some((local, n)))
    }

    /// Posts `args` on comm `c` (`inner` posts it on the inner transport) and returns the request
    /// NCCL sees.
    #[inline]
    fn post(
        &self,
        c: &Found<'_>,
        args: &PostArgs<'_>,
        inner: impl FnOnce() -> Result<Option<Opaque>>,
    ) -> Result<Option<Opaque>> {
        let t = self.stamp();
        let mut inner_failed = false;
        let r = c.post(c.key, args, t, || {
            let r = inner();
            inner_failed = r.is_err();
            r
        });
        if let Some(m) = self.mconn(c) {
            match &r {
                Ok(Some(k)) => m.posted(k.slot as usize, t),
                Ok(None) => {}
                Err(_) => m.error(),
            }
        }
        match r {
            Ok(k) => Ok(k.map(ReqKey::to_opaque)),
            Err(e) if inner_failed => Err(self.data_error(c, e)),
            Err(e) => Err(e),
        }
    }

    /// An error of the inner transport on `c`'s data path (`e` names the call and the comm): over
    /// an UNPACK-type inner the comm fails for good ([`super::failfast`]); otherwise `e` as it is.
    #[cold]
    fn data_error(&self, c: &CommRec, e: Error) -> Error {
        if !c.unpack() {
            return e;
        }
        let (err, why) = super::failfast::unrecoverable(&e);
        c.fail(why);
        err
    }

    /// Whether connections on `dev` get a recovery engine.
    fn recoverable(&self, dev: i32) -> bool {
        self.recovery.is_some() && !self.unpack.get(dev as usize).copied().unwrap_or(true)
    }

    /// At listen: names the control link in NCCL's handle and keeps the link for the accept;
    /// whether it did.
    fn offer_recovery(&self, dev: i32, listen: Opaque, handle: &mut [u8; HANDLE_SIZE]) -> bool {
        if !self.recoverable(dev) {
            return false;
        }
        let res =
            crate::control::link::global(&self.link_cfg).and_then(|hub| self.handles.offer_recovery(handle, &hub));
        match res {
            Ok(link) => {
                crate::lock(&self.engines.listening).insert(listen.as_ptr() as usize, link);
                true
            }
            Err(e) => {
                log::warn!(
                "listen on dev {dev}: connections from this listen will not recover from a broken inner connection: \
                 {e} (set {} or {}=0)",
                    crate::config::CTRL_ADDR.name,
                    crate::config::RECOVERY.name
                );
                false
            }
        }
    }

    /// At listen, with the control link offered: says in NCCL's handle that connections may be
    /// claimed for this listen comm from the connector's pool.
    fn offer_pool(&self, dev: i32, listen: Opaque, handle: &mut [u8; HANDLE_SIZE]) {
        let Some(p) = &self.pool else { return };
        let Ok(mut t) = handle::Trailer::read(handle) else {
            return;
        };
        t.flags |= handle::FLAG_POOL;
        t.write(handle);
        crate::lock(&self.engines.pool_listens).insert(listen.as_ptr() as usize, t.conn_id);
        p.listen(t.conn_id, Listening { secret: t.secret, dev })
            .close(self.inner.as_ref());
    }

    /// At connect, when the listener pools: takes over an idle connection to its process, if
    /// the listener grants one. `None`: connect afresh.
    fn connect_pooled(&self, dev: i32, handle: &[u8; HANDLE_SIZE]) -> Option<Result<Option<Opaque>>> {
        let p = self.pool.as_ref().filter(|_| self.recoverable(dev))?;
        let cfg = self.recovery.as_ref()?;
        let t = handle::Trailer::read(handle).ok()?;
        if t.flags & handle::FLAG_POOL == 0 {
            return None;
        }
        let ctrl = t.ctrl_socket()?;
        let key = handle.as_ptr() as usize;
        // The listener's links' thread answers within a round trip: wait that long here rather
        // than make NCCL call again (NCCL retries a connect that returned no comm on a slower path).
        let until = std::time::Instant::now() + pool::CLAIM_SPIN;
        loop {
            let (step, doomed) = p.connect_step(key, t.conn_id, t.secret, ctrl, dev);
            doomed.close(self.inner.as_ref());
            match step {
                ConnectStep::Fresh => return None,
                ConnectStep::Waiting if std::time::Instant::now() < until => std::thread::yield_now(),
                ConnectStep::Waiting => return Some(Ok(None)),
                ConnectStep::Reuse(e) => return Some(self.adopt(Kind::Send, e, dev, Some(ctrl), cfg)),
            }
        }
    }

    /// Makes a comm over the pooled connection `e`, with its engine.
    fn adopt(
        &self,
        kind: Kind,
        e: Entry,
        dev: i32,
        peer_ctrl: Option<SocketAddr>,
        cfg: &RecoveryConfig,
    ) -> Result<Option<Opaque>> {
        let Entry {
            comm,
            link,
            count,
            reuses,
            ..
        } = e;
        link.set_handler(None);
        link.set_quiet(false);
        let c = self.wrap(kind, comm, dev, None)?;
        let peer = self.lookup("", c).map(|r| r.label()).unwrap_or_default();
        let mut engine = match kind {
            Kind::Send => Engine::send(cfg.clone(), dev, peer, link, comm),
            _ => Engine::recv(cfg.clone(), dev, peer, link, comm),
        };
        engine.set_base(count);
        self.add_engine(c, engine);
        crate::lock(&self.engines.pooled).insert(c.as_ptr() as usize, (peer_ctrl, reuses));
        Ok(Some(c))
    }

    /// After a connect: the recovery engine of the new send comm when the peer offers one.
    fn engine_for_connect(&self, dev: i32, comm: Opaque, inner: Opaque, handle: &[u8; HANDLE_SIZE]) {
        let Some(cfg) = self.recovery.as_ref().filter(|_| self.recoverable(dev)) else {
            return;
        };
        let Ok(t) = handle::Trailer::read(handle) else { return };
        if t.flags & handle::FLAG_RECOVERY == 0 {
            return;
        }
        let Some(addr) = t.ctrl_socket() else { return };
        let peer = self.lookup("", comm).map(|c| c.label()).unwrap_or_default();
        match Link::connect(&self.link_cfg, addr, t.conn_id, t.secret) {
            Ok(link) => {
                self.add_engine(comm, Engine::send(cfg.clone(), dev, peer, link, inner));
                if self.pool.is_some() && t.flags & handle::FLAG_POOL != 0 {
                    crate::lock(&self.engines.pooled).insert(comm.as_ptr() as usize, (Some(addr), 0));
                }
            }
            Err(e) => log::warn!("connect on dev {dev}: {peer} will not recover from a broken inner connection: {e}"),
        }
    }

    /// Registers on the inner comm and records the registration.
    fn register(
        &self,
        call: &str,
        comm: Opaque,
        rec: MrRec,
        inner: impl FnOnce(Opaque) -> Result<Opaque>,
    ) -> Result<Opaque> {
        let c = self.live_comm(call, comm, None)?;
        let by_engine = c.with_engine(c.key, |e| {
            // SAFETY: the caller of regMr vouches for the buffer until deregMr.
            unsafe {
                e.reg(
                    self.inner.as_ref(),
                    rec.data as *mut c_void,
                    rec.size,
                    rec.ptr_type,
                    rec.dmabuf,
                )
            }
        });
        if let Some(token) = by_engine? {
            let token = token.map_err(|e| e.context(format!("{call} on {}", c.label())))?;
            return c.add_mr(c.key, MrRec { inner: token, ..rec }).map(|k| k.to_opaque());
        }
        let imr = inner(c.inner()).map_err(|e| e.context(format!("{call} on {}", c.label())))?;
        match c.add_mr(c.key, MrRec { inner: imr, ..rec }) {
            Ok(k) => Ok(k.to_opaque()),
            Err(e) => {
                // SAFETY: `imr` was just registered on the open inner comm and nobody else has it.
                let _ = unsafe { self.inner.dereg_mr(c.inner(), imr) };
                Err(e)
            }
        }
    }
}

impl Transport for Shim {
    fn name(&self) -> &str {
        &self.name
    }

    fn devices(&self) -> Result<i32> {
        Ok(self.info.devices)
    }

    fn properties(&self, dev: i32) -> Result<Properties> {
        self.check_dev("getProperties", dev)?;
        self.inner.properties(dev)
    }

    fn listen(&self, dev: i32, handle: &mut [u8; HANDLE_SIZE]) -> Result<Opaque> {
        self.check_dev("listen", dev)?;
        let mut scratch = [handle::CANARY; HANDLE_SIZE];
        let inner = self.inner.listen(dev, &mut scratch)?;
        match self.handles.publish(&scratch, handle, self.inner.name()) {
            Ok(served) => {
                let l = self.wrap(Kind::Listen, inner, dev, served).inspect_err(|_| {
                    if let Some(id) = served {
                        self.handles.withdraw(id);
                    }
                    // SAFETY: `inner` is the listen comm just made; nothing else has it.
                    let _ = unsafe { self.inner.close_listen(inner) };
                })?;
                if self.offer_recovery(dev, l, handle) {
                    self.offer_pool(dev, l, handle);
                }
                Ok(l)
            }
            Err(e) => {
                // SAFETY: as above.
                let _ = unsafe { self.inner.close_listen(inner) };
                Err(e)
            }
        }
    }

    unsafe fn connect(
        &self,
        dev: i32,
        handle: &mut [u8; HANDLE_SIZE],
        dev_handle: *mut *mut DevHandle,
    ) -> Result<Option<Opaque>> {
        self.check_dev("connect", dev)?;
        let setup = Setup::Connect(handle.as_ptr() as usize);
        if let Some(m) = &self.metrics {
            m.setup_call(setup);
        }
        if let Some(res) = self.connect_pooled(dev, handle) {
            if let (Some(m), Ok(Some(_)) | Err(_)) = (&self.metrics, &res) {
                m.setup_done(setup, res.is_ok());
            }
            return res.map_err(|e| e.context(format!("connect on dev {dev}")));
        }
        let res = self.handles.connect(
            handle,
            |inner_handle| {
                // SAFETY: `inner_handle` is the same buffer, unchanged, on every call for this
                // connection (NCCL's own in inline mode, the pending connect's in served mode), and
                // the caller passes a valid or NULL dev_handle.
                unsafe { self.inner.connect(dev, inner_handle, dev_handle) }
            },
            |c| {
                // SAFETY: `c` is the send comm the inner connect just returned; nothing else has it.
                let _ = unsafe { self.inner.close_send(c) };
            },
        );
        if let (Some(m), Ok(Some(_)) | Err(_)) = (&self.metrics, &res) {
            m.setup_done(setup, res.is_ok());
        }
        if let (Some(p), Ok(Some(_)) | Err(_)) = (&self.pool, &res) {
            p.connect_done(handle.as_ptr() as usize);
        }
        match res.map_err(|e| e.context(format!("connect on dev {dev}")))? {
            Some(c) => {
                let s = self.wrap(Kind::Send, c, dev, None)?;
                self.engine_for_connect(dev, s, c, handle);
                Ok(Some(s))
            }
            None => Ok(None),
        }
    }

    unsafe fn accept(&self, listen: Opaque, dev_handle: *mut *mut DevHandle) -> Result<Option<Opaque>> {
        let l = self.live_comm("accept", listen, Some(Kind::Listen))?;
        let setup = Setup::Accept(listen.as_ptr() as usize);
        if let Some(m) = &self.metrics {
            m.setup_call(setup);
        }
        let pool_id = self.pool.as_ref().and_then(|_| {
            crate::lock(&self.engines.pool_listens)
                .get(&(listen.as_ptr() as usize))
                .copied()
        });
        if let (Some(p), Some(id), Some(cfg)) = (&self.pool, pool_id, &self.recovery) {
            let (granted, doomed) = p.accept_step(id);
            doomed.close(self.inner.as_ref());
            if let Some(e) = granted {
                // The link the listen offered is not needed: the pooled connection has its own.
                crate::lock(&self.engines.listening).remove(&(listen.as_ptr() as usize));
                let res = self.adopt(Kind::Recv, e, l.dev(), None, cfg);
                if let Some(m) = &self.metrics {
                    m.setup_done(setup, res.is_ok());
                }
                return res.map_err(|e| e.context(format!("accept on dev {}", l.dev())));
            }
        }
        // SAFETY: the listen comm is open; dev_handle is passed as the caller gave it.
        let inner = unsafe { self.inner.accept(l.inner(), dev_handle) };
        if let (Some(m), Ok(Some(_)) | Err(_)) = (&self.metrics, &inner) {
            m.setup_done(setup, inner.is_ok());
        }
        let inner = inner.map_err(|e| e.context(format!("accept on dev {}", l.dev())))?;
        match inner {
            Some(c) => {
                let r = self.wrap(Kind::Recv, c, l.dev(), None)?;
                let link = crate::lock(&self.engines.listening).remove(&(listen.as_ptr() as usize));
                if let (Some(cfg), Some(link)) = (&self.recovery, link) {
                    let peer = self.lookup("", r).map(|c| c.label()).unwrap_or_default();
                    self.add_engine(r, Engine::recv(cfg.clone(), l.dev(), peer, link, c));
                    if pool_id.is_some() {
                        crate::lock(&self.engines.pooled).insert(r.as_ptr() as usize, (None, 0));
                    }
                }
                Ok(Some(r))
            }
            None => Ok(None),
        }
    }

    unsafe fn reg_mr(&self, comm: Opaque, data: *mut c_void, size: usize, ptr_type: i32) -> Result<Opaque> {
        let rec = MrRec {
            data: data as usize,
            size,
            ptr_type,
            dmabuf: None,
            inner: comm,
        };
        self.register("regMr", comm, rec, |ic| {
            // SAFETY: `ic` is the open inner comm; the caller vouches for the buffer.
            unsafe { self.inner.reg_mr(ic, data, size, ptr_type) }
        })
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
        let rec = MrRec {
            data: data as usize,
            size,
            ptr_type,
            dmabuf: Some((offset, fd)),
            inner: comm,
        };
        self.register("regMrDmaBuf", comm, rec, |ic| {
            // SAFETY: as in reg_mr.
            unsafe { self.inner.reg_mr_dmabuf(ic, data, size, ptr_type, offset, fd) }
        })
    }

    fn has_dmabuf(&self) -> bool {
        self.inner.has_dmabuf()
    }

    unsafe fn dereg_mr(&self, comm: Opaque, mr: Opaque) -> Result<()> {
        let c = self.comm("deregMr", comm, None)?;
        let key = mr_key("deregMr", mr)?;
        let rec = c.remove_mr("deregMr", c.key, key)?;
        if let Some(r) = c.with_engine(c.key, |e| e.dereg(self.inner.as_ref(), rec.inner))? {
            return r.map_err(|e| e.context(format!("deregMr on {}", c.label())));
        }
        // SAFETY: the registration was live on this open comm and is now removed from the
        // record, so this is its only release.
        unsafe { self.inner.dereg_mr(c.inner(), rec.inner) }.map_err(|e| e.context(format!("deregMr on {}", c.label())))
    }

    unsafe fn isend(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: i32,
        tag: i32,
        mr: Option<Opaque>,
    ) -> Result<Option<Opaque>> {
        let c = self.live_comm("isend", comm, Some(Kind::Send))?;
        let (imr, key) = match mr {
            Some(m) => self
                .inner_mr("isend", &c, m, data, size)
                .map(|(i, k)| (Some(i), Some(k)))?,
            None => (None, None),
        };
        let args = PostArgs {
            op: Op::Send,
            data: &[data],
            sizes: &[size],
            tags: &[tag],
            mrs: &[key],
        };
        if c.has_engine() {
            return self.post(&c, &args, || {
                c.with_engine(c.key, |e| e.isend(self.inner.as_ref(), data as usize, size, tag, imr))?
                    .ok_or_else(|| Error::internal("isend: the comm's recovery engine is gone"))?
                    .map(Some)
            });
        }
        // SAFETY: the inner comm is open, `imr` is its registration, and the caller vouches for
        // the buffer until the request completes.
        self.post(&c, &args, || unsafe {
            self.inner.isend(c.inner(), data, size, tag, imr)
        })
    }

    unsafe fn irecv(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        tags: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        let c = self.live_comm("irecv", comm, Some(Kind::Recv))?;
        let n = data.len();
        if n == 0 || n > MAX_RECVS || sizes.len() < n || tags.len() < n || mrs.len() < n {
            return Err(Error::invalid_argument(format!(
                "irecv: n={n} is out of range (1 to {MAX_RECVS}) or the arrays are shorter"
            )));
        }
        let max = self.max_recvs.get(c.dev() as usize).copied().unwrap_or(1).max(1);
        if n > max as usize {
            // Said here rather than by the inner transport, so that a recovery engine, which
            // posts later, does not take it for a broken connection.
            return Err(Error::invalid_argument(format!(
                "irecv: n={n} grouped receives on {}, whose inner transport takes at most {max} (maxRecvs)",
                c.label()
            )));
        }
        let m = self.inner_mrs("irecv", &c, &mrs[..n], data, sizes)?;
        let imrs = m.inner;
        let args = PostArgs {
            op: Op::Recv,
            data: &data[..n],
            sizes: &sizes[..n],
            tags: &tags[..n],
            mrs: &m.keys[..n],
        };
        if c.has_engine() {
            return self.post(&c, &args, || {
                c.with_engine(c.key, |e| {
                    e.irecv(self.inner.as_ref(), &data[..n], &sizes[..n], &tags[..n], &imrs[..n])
                })?
                .ok_or_else(|| Error::internal("irecv: the comm's recovery engine is gone"))?
                .map(Some)
            });
        }
        // SAFETY: as in isend; the inner registrations are this comm's.
        self.post(&c, &args, || unsafe {
            self.inner.irecv(c.inner(), data, &sizes[..n], &tags[..n], &imrs[..n])
        })
    }

    unsafe fn iflush(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        let c = self.live_comm("iflush", comm, Some(Kind::Recv))?;
        if c.has_engine() {
            // Host-type receives land in host memory: nothing to flush.
            return Ok(None);
        }
        let n = data.len().min(MAX_RECVS);
        if sizes.len() < n || mrs.len() < n {
            return Err(Error::invalid_argument("iflush: the arrays are shorter than n"));
        }
        let m = self.inner_mrs("iflush", &c, &mrs[..n], data, sizes)?;
        let imrs = m.inner;
        let args = PostArgs {
            op: Op::Flush,
            data: &data[..n],
            sizes: &sizes[..n],
            tags: &[],
            mrs: &m.keys[..n],
        };
        // SAFETY: as in irecv.
        self.post(&c, &args, || unsafe {
            self.inner.iflush(c.inner(), &data[..n], &sizes[..n], &imrs[..n])
        })
    }

    unsafe fn test(&self, req: Opaque, sizes: Option<&mut [i32]>) -> Result<bool> {
        let Some((local, n)) = self.test_request(req)? else {
            return Ok(false);
        };
        if let Some(out) = sizes {
            let k = out.len().min(n);
            out[..k].copy_from_slice(&local[..k]);
        }
        Ok(true)
    }

    unsafe fn close_send(&self, comm: Opaque) -> Result<()> {
        self.close("closeSend", comm, Kind::Send)
    }

    unsafe fn close_recv(&self, comm: Opaque) -> Result<()> {
        self.close("closeRecv", comm, Kind::Recv)
    }

    unsafe fn close_listen(&self, comm: Opaque) -> Result<()> {
        self.close("closeListen", comm, Kind::Listen)
    }

    unsafe fn get_device_mr(&self, comm: Opaque, mr: Opaque) -> Result<Option<Opaque>> {
        let c = self.live_comm("getDeviceMr", comm, None)?;
        let key = mr_key("getDeviceMr", mr)?;
        let rec = c.mr("getDeviceMr", c.key, key)?;
        if let Some(r) = c.with_engine(c.key, |e| e.device_mr(self.inner.as_ref(), rec.inner))? {
            return r;
        }
        // SAFETY: the registration is live on this open comm.
        unsafe { self.inner.get_device_mr(c.inner(), rec.inner) }
    }

    unsafe fn irecv_consumed(&self, comm: Opaque, n: i32, req: Option<Opaque>) -> Result<()> {
        let c = self.live_comm("irecvConsumed", comm, Some(Kind::Recv))?;
        if !c.unpack() {
            // Host-type transports deliver into the destination buffer: nothing to release.
            return Ok(());
        }
        let inner_req = match req {
            Some(r) => {
                let key = ReqKey::from_opaque(r).filter(|k| k.of(c.key)).ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "irecvConsumed: {:#x} is not a request of {}",
                        r.as_ptr() as usize,
                        c.label()
                    ))
                })?;
                Some((key, c.consumed_inner(key)?))
            }
            None => None,
        };
        // SAFETY: the inner request completed on this open comm and was not released yet.
        let res = unsafe { self.inner.irecv_consumed(c.inner(), n, inner_req.map(|(_, r)| r)) };
        if let (Ok(()), Some((key, _))) = (&res, inner_req) {
            c.forget_consumed(key);
        }
        // Not a failure of the comm: TCPX refuses an irecvConsumed out of order, a caller's error.
        res
    }

    unsafe fn describe_comm(&self, comm: Opaque) -> Option<String> {
        self.lookup("", comm).ok().map(|c| c.label())
    }

    unsafe fn break_comm(&self, comm: Opaque) -> bool {
        match self.lookup("", comm) {
            // SAFETY: the record is in the table, so its inner comm is open.
            Ok(c) if c.kind() != Kind::Listen => {
                let inner = match c.with_engine(c.key, |e| e.inner_comm()) {
                    Ok(Some(i)) => i,
                    Ok(None) => Some(c.inner()),
                    Err(_) => None,
                };
                // SAFETY: the engine's current inner comm, or the record's, is open.
                inner.is_some_and(|i| unsafe { self.inner.break_comm(i) })
            }
            _ => false,
        }
    }
}
