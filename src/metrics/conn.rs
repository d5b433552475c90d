//! The metrics of `NCCL_TCPXSHIM_METRICS_DIR`: every connection's traffic, counted and timed on
//! the data path, for the Prometheus file ([`super::prom`]) and the end-of-run summary
//! ([`super::summary`]).
//!
//! The shim's own layer (`crate::stack::Shim`) feeds them: it already holds a record per comm and
//! per request (with the time the request was posted), so metrics cost no layer of their own on
//! the data path, and a connection keeps one record of counters for its whole life, even when
//! the inner comm beneath it is replaced. The data path touches only its comm's [`Conn`]: relaxed
//! loads and stores (the requests of one comm complete on the thread driving it), no locks, no
//! allocation. The records of every connection, closed ones included, are also kept in a list the
//! exporter reads, so a closed connection's final numbers stay in the file until the process ends.

use super::hist::{size_class, Hist, SIZE_CLASSES};
use crate::config::{Config, MetricsConfig};
use crate::lock;
use crate::stack::MAX_REQUESTS;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Now, in nanoseconds on the monotonic time line (see `clock`).
pub use super::clock::now_ns;
use super::clock::{ticks, ticks_to_ns, ticks_to_time};

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

/// Adds `d` to a counter only one thread writes: a load and a store, not a read-modify-write.
#[inline]
fn bump(a: &AtomicU64, d: u64) {
    a.store(a.load(Relaxed).wrapping_add(d), Relaxed);
}

/// One send or receive connection: its labels and counters.
pub struct Conn {
    /// The `comm` label: unique in the process.
    pub comm: u64,
    /// The `dir` label.
    pub dir: Dir,
    /// The `peer` label: the inner transport's description of the comm up to its first comma
    /// (commas made `;`), or "dev N".
    pub peer: String,
    /// The `dev` label.
    pub dev: i32,
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
    /// Connections recovered after a failure.
    pub recoveries: AtomicU64,
    /// Last post or completion ([`super::clock::ticks`]).
    last_progress: AtomicU64,
    /// Post-to-completion latency per size class ([`SIZE_CLASSES`]).
    pub lat: [Hist; SIZE_CLASSES.len()],
    /// When each of the comm's request slots was posted ([`super::clock::ticks`]); 0: none
    /// outstanding. Read by the exporter, for stalled requests.
    posted: [AtomicU64; MAX_REQUESTS],
}

impl Conn {
    /// A new record, open from now.
    pub fn new(dir: Dir, peer: String, dev: i32) -> Conn {
        let now = now_ns();
        Conn {
            comm: NEXT_COMM.fetch_add(1, Relaxed),
            dir,
            peer: peer.replace(',', ";"),
            dev,
            opened_ns: now,
            closed_ns: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
            last_progress: AtomicU64::new(ticks()),
            lat: Default::default(),
            posted: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Request slot `slot` was posted at `t` ([`super::clock::ticks`]).
    #[inline]
    pub fn posted(&self, slot: usize, t: u64) {
        if let Some(p) = self.posted.get(slot) {
            p.store(t.max(1), Relaxed);
        }
        bump(&self.in_flight, 1);
        self.last_progress.store(t, Relaxed);
    }

    /// The request in `slot`, posted at `posted`, completed at `end` (both
    /// [`super::clock::ticks`]); `bytes` is its payload (`None` for a flush, which is no message).
    #[inline]
    pub fn completed(&self, slot: usize, posted: u64, end: u64, bytes: Option<u64>) {
        if let Some(p) = self.posted.get(slot) {
            p.store(0, Relaxed);
        }
        if let Some(b) = bytes {
            bump(&self.messages, 1);
            bump(&self.bytes, b);
            self.lat[size_class(b)].observe_single(ticks_to_ns(end.saturating_sub(posted)));
        }
        self.in_flight
            .store(self.in_flight.load(Relaxed).saturating_sub(1), Relaxed);
        self.last_progress.store(end, Relaxed);
    }

    /// The request in `slot` failed: it is gone.
    pub fn failed(&self, slot: usize) {
        if let Some(p) = self.posted.get(slot) {
            p.store(0, Relaxed);
        }
        self.in_flight
            .store(self.in_flight.load(Relaxed).saturating_sub(1), Relaxed);
        self.error();
    }

    /// A call on the connection failed.
    pub fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.closed_ns.load(Relaxed) != 0
    }

    /// Requests outstanding for longer than `limit_ns` at `now` (ns, [`now_ns`]).
    pub fn stalled(&self, now: u64, limit_ns: u64) -> u64 {
        self.posted
            .iter()
            .map(|s| s.load(Relaxed))
            .filter(|&t| t != 0 && now.saturating_sub(ticks_to_time(t)) > limit_ns)
            .count() as u64
    }

    /// Seconds since the last post or completion at `now` (frozen at the close of a closed
    /// connection).
    pub fn progress_age_secs(&self, now: u64) -> f64 {
        let end = match self.closed_ns.load(Relaxed) {
            0 => now,
            c => c,
        };
        end.saturating_sub(ticks_to_time(self.last_progress.load(Relaxed))) as f64 / 1e9
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

/// State shared by the shim, the exporter thread and the encoder.
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
    /// Every connection made, closed ones included, by number: an append-only list (entries
    /// are never removed or moved), so the shim finds a connection's record by its number with
    /// two loads and no lock.
    pub conns: boxcar::Vec<Conn>,
    /// Connects and accepts in progress (by handle buffer or listen comm): when they started.
    pending: Mutex<HashMap<usize, u64>>,
    /// Serialises writes of the file.
    pub(crate) write_lock: Mutex<()>,
    /// A failed write was reported already.
    pub(crate) warned: AtomicBool,
    /// The connection pool's counts, when the stack pools.
    pub pool: std::sync::OnceLock<Arc<crate::stack::pool::PoolStats>>,
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
            conns: boxcar::Vec::new(),
            pending: Mutex::new(HashMap::new()),
            write_lock: Mutex::new(()),
            warned: AtomicBool::new(false),
            pool: std::sync::OnceLock::new(),
        }
    }

    /// Exports the pool's counts from now on.
    pub fn set_pool(&self, stats: Arc<crate::stack::pool::PoolStats>) {
        let _ = self.pool.set(stats);
    }

    /// The file this process writes: `<dir>/<host>-<pid>.prom`.
    pub fn file(&self) -> PathBuf {
        self.dir
            .join(format!("{}-{}.prom", self.labels.host, std::process::id()))
    }

    /// The records of every connection so far.
    pub fn conns(&self) -> Vec<&Conn> {
        self.conns.iter().map(|(_, c)| c).collect()
    }
}

/// Whether a pending connect or accept is timed: connects are known by NCCL's handle buffer,
/// accepts by their listen comm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    /// A connect() in progress on this handle buffer address.
    Connect(usize),
    /// An accept() in progress on this listen comm.
    Accept(usize),
}

impl Setup {
    fn key(self) -> usize {
        // Handle buffers and listen keys never collide in practice, but tell them apart anyway.
        match self {
            Setup::Connect(a) => a << 1,
            Setup::Accept(a) => a << 1 | 1,
        }
    }
}

/// The metrics of one stack: what the shim calls, and the exporter thread that writes the file.
pub struct Metrics {
    shared: Arc<Shared>,
    exporter: Option<super::prom::Exporter>,
}

impl Metrics {
    /// Metrics of a stack over the transport named `transport`, writing the file into `dir`
    /// every `cfg.metrics.interval` from a background thread.
    pub fn new(cfg: &Config, transport: &str, dir: PathBuf) -> Metrics {
        super::clock::calibrate();
        let shared = Arc::new(Shared::new(
            cfg.metrics.clone(),
            transport.to_string(),
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
            shared,
            exporter: Some(exporter),
        }
    }

    /// What the exporter reads.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// A connect or accept call of `s` begins (the first call starts its clock).
    pub fn setup_call(&self, s: Setup) {
        lock(&self.shared.pending).entry(s.key()).or_insert_with(now_ns);
    }

    /// The connect or accept `s` ended: with a connection (timed) or with an error.
    pub fn setup_done(&self, s: Setup, made: bool) {
        let Some(start) = lock(&self.shared.pending).remove(&s.key()) else {
            return;
        };
        if made {
            let h = match s {
                Setup::Connect(_) => &self.shared.connect_hist,
                Setup::Accept(_) => &self.shared.accept_hist,
            };
            h.observe(now_ns().saturating_sub(start));
        }
    }

    /// Records a new connection; `description` is the inner transport's description of it.
    /// Returns its number, for [`Metrics::conn`].
    pub fn open(&self, dir: Dir, description: Option<&str>, dev: i32) -> usize {
        let peer = description.map_or_else(|| format!("dev {dev}"), peer_label);
        let n = self.shared.conns.push(Conn::new(dir, peer, dev));
        self.shared.open.fetch_add(1, Relaxed);
        self.shared.opened.fetch_add(1, Relaxed);
        n
    }

    /// The record of connection number `n`.
    #[inline]
    pub fn conn(&self, n: usize) -> Option<&Conn> {
        self.shared.conns.get(n)
    }

    /// The connection `c` was closed (`ok`: without error). The last one to close writes the
    /// file and logs the summary, so the final numbers are on disk when the job ends.
    pub fn close(&self, c: &Conn, ok: bool) {
        if !ok {
            c.error();
        }
        for s in &c.posted {
            s.store(0, Relaxed);
        }
        c.in_flight.store(0, Relaxed);
        c.closed_ns.store(now_ns().max(1), Relaxed);
        if self.shared.open.fetch_sub(1, Relaxed) == 1 {
            super::prom::write_logged(&self.shared);
            super::summary::log(&self.shared);
        }
    }
}

impl Drop for Metrics {
    fn drop(&mut self) {
        // Stops the thread (and waits for it) before the metrics go.
        self.exporter.take();
    }
}

/// The `peer` label from a transport's description of a comm: up to its first comma, without a
/// leading "peer " ("peer 10.0.0.2:41234, 4 streams" gives "10.0.0.2:41234").
fn peer_label(description: &str) -> String {
    let d = description.strip_prefix("peer ").unwrap_or(description);
    d.split(',').next().unwrap_or(d).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_label_is_the_address() {
        assert_eq!(peer_label("peer 10.0.0.2:41234, 4 streams"), "10.0.0.2:41234");
        assert_eq!(peer_label("GPUDirectTCPX_v7 dev 1"), "GPUDirectTCPX_v7 dev 1");
    }

    #[test]
    fn a_request_counts_once_and_a_flush_is_no_message() {
        let c = Conn::new(Dir::Recv, "p".into(), 0);
        let t = ticks();
        c.posted(3, t);
        c.posted(4, t);
        assert_eq!(c.in_flight.load(Relaxed), 2);
        let later = ticks_to_time(t) + 10_000_000_000;
        assert_eq!(
            c.stalled(later, 5_000_000_000),
            2,
            "outstanding for 10 s, stalled after 5 s"
        );
        assert_eq!(c.stalled(later, 20_000_000_000), 0);
        c.completed(3, t, t, Some(100));
        c.completed(4, t, t, None);
        assert_eq!(c.in_flight.load(Relaxed), 0);
        assert_eq!(c.messages.load(Relaxed), 1);
        assert_eq!(c.bytes.load(Relaxed), 100);
        assert_eq!(c.stalled(later, 5_000_000_000), 0);
        let h = c.lat[size_class(100)].snapshot();
        assert_eq!(h.count(), 1);
        c.posted(5, t);
        c.failed(5);
        assert_eq!((c.in_flight.load(Relaxed), c.errors.load(Relaxed)), (0, 1));
    }
}
