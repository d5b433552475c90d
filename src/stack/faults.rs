//! Fault injection (`NCCL_TCPXSHIM_FAULTS`): a layer that makes connects, accepts and
//! registrations fail, breaks connections, delays completions and panics on purpose, all decided
//! from a seed, for tests now and chaos runs on real jobs.
//!
//! The layer is in the stack only when the setting is set ([`super::build_over`]), so nothing of
//! it is on the production path; it logs one WARN at build time naming the faults.
//!
//! # Grammar
//!
//! `;`-separated clauses, each given at most once (spaces around the parts are ignored):
//!
//! | clause | fault |
//! |---|---|
//! | `seed=N` | seed of every random decision (default 1) |
//! | `connect=fail:K` | the first K connection attempts fail with a refused-kind error |
//! | `connect=p:P` | each connection attempt fails so with probability P |
//! | `accept=fail:K`, `accept=p:P` | likewise for accepted connections: the inner comm is closed and accept fails (refused kind) |
//! | `regmr=fail:K`, `regmr=p:P` | likewise for registrations (regMr and regMrDmaBuf; system-kind error) |
//! | `break=after:N` | each connection breaks after its N-th completed message (N >= 1) |
//! | `break=p:P` | each completed message breaks its connection with probability P |
//! | `delay=ms:D`, `delay=ms:D,p:P` | a request (isend, irecv, iflush) completes no earlier than D ms after it was posted: every request, or each with probability P |
//! | `panic=CALL` | the named plugin call (`isend`, `regMr`, `test`, ... as in the ncclNet table) panics inside the layer |
//!
//! K, N, D and the seed are decimal integers (D at most 3600000), P a decimal in 0..=1. At least
//! one fault is required. Example: `seed=7;connect=p:0.1;break=after:1000;delay=ms:5,p:0.01`.
//!
//! A connection attempt is a connect call with a handle buffer that has no connect in progress
//! in this layer: an injected failure happens before the inner transport sees the handle, so
//! calling connect again with the same handle starts a new attempt. A completed message is a send
//! or receive request that test() reported done (flushes do not count).
//!
//! # Determinism
//!
//! Every decision is a pure function of the seed, the clause and the event's number: the n-th
//! connection attempt, the n-th accepted connection, the n-th registration, or the m-th completed
//! message (break) or posted request (delay) of the k-th comm opened through the layer. The same
//! seed and the same sequence of calls give the same faults; decisions on one comm do not depend
//! on how calls on other comms interleave with them.
//!
//! # Broken connections
//!
//! When a break triggers, the layer asks the inner transport to cut the connection
//! ([`Transport::break_comm`]): the built-in TCP transport shuts its sockets down, so this side
//! fails with a connection-lost error on its next I/O and the peer sees end of stream or a reset,
//! exactly as after a real network failure. An inner transport that cannot do that (a loaded
//! plugin) gets the comm marked broken here instead: every later call on it except deregMr and
//! close fails with a connection-lost error naming the fault.
//!
//! Every injected error and panic message says "injected fault" and names the setting and clause.

use crate::config::FAULTS;
use crate::error::{Error, ErrorKind, Result};
use crate::ffi::{DevHandle, HANDLE_SIZE};
use crate::stack::Layer;
use crate::transport::{Opaque, Properties, Transport};
use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The ncclNet calls `panic=CALL` may name, spelled as in the plugin table.
pub const CALLS: &[&str] = &[
    "devices",
    "getProperties",
    "listen",
    "connect",
    "accept",
    "regMr",
    "regMrDmaBuf",
    "deregMr",
    "isend",
    "irecv",
    "iflush",
    "test",
    "closeSend",
    "closeRecv",
    "closeListen",
    "getDeviceMr",
    "irecvConsumed",
];

/// Longest delay `delay=ms:D` accepts (one hour).
pub const MAX_DELAY_MS: u64 = 3_600_000;

/// Which events of a kind fail.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Trigger {
    /// `fail:K`: the first K.
    First(u64),
    /// `p:P`: each with probability P.
    Chance(f64),
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::First(k) => write!(f, "fail:{k}"),
            Trigger::Chance(p) => write!(f, "p:{p}"),
        }
    }
}

/// When connections break.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Break {
    /// `after:N`: after each connection's N-th completed message.
    After(u64),
    /// `p:P`: each completed message breaks its connection with probability P.
    Chance(f64),
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Break::After(n) => write!(f, "after:{n}"),
            Break::Chance(p) => write!(f, "p:{p}"),
        }
    }
}

/// Late completions: `ms:D[,p:P]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Delay {
    /// Least time from posting to completion.
    pub ms: u64,
    /// Fraction of requests delayed (1: all).
    pub p: f64,
}

impl fmt::Display for Delay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ms:{}", self.ms)?;
        if self.p < 1.0 {
            write!(f, ",p:{}", self.p)?;
        }
        Ok(())
    }
}

/// The faults `NCCL_TCPXSHIM_FAULTS` asks for (grammar in the module documentation).
#[derive(Clone, Debug, PartialEq)]
pub struct FaultSpec {
    /// `seed=N`.
    pub seed: u64,
    /// `connect=`.
    pub connect: Option<Trigger>,
    /// `accept=`.
    pub accept: Option<Trigger>,
    /// `regmr=`.
    pub regmr: Option<Trigger>,
    /// `break=`.
    pub breaks: Option<Break>,
    /// `delay=`.
    pub delay: Option<Delay>,
    /// `panic=`: the call, spelled as in [`CALLS`].
    pub panic: Option<&'static str>,
}

impl fmt::Display for FaultSpec {
    /// The canonical form, e.g. `seed=7;connect=fail:2;break=after:5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed={}", self.seed)?;
        let mut clause = |key: &str, value: Option<String>| match value {
            Some(v) => write!(f, ";{key}={v}"),
            None => Ok(()),
        };
        clause("connect", self.connect.map(|t| t.to_string()))?;
        clause("accept", self.accept.map(|t| t.to_string()))?;
        clause("regmr", self.regmr.map(|t| t.to_string()))?;
        clause("break", self.breaks.map(|b| b.to_string()))?;
        clause("delay", self.delay.map(|d| d.to_string()))?;
        clause("panic", self.panic.map(str::to_string))
    }
}

fn parse_u64(what: &str, s: &str) -> std::result::Result<u64, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{what} `{}` is not a non-negative integer", s.trim()))
}

fn parse_p(s: &str) -> std::result::Result<f64, String> {
    let s = s.trim();
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("probability `{s}` is not a number from 0 to 1")),
    }
}

/// `fail:K` or `p:P`.
fn parse_trigger(v: &str) -> std::result::Result<Trigger, String> {
    match v.split_once(':').map(|(k, x)| (k.trim(), x)) {
        Some(("fail", k)) => Ok(Trigger::First(parse_u64("count", k)?)),
        Some(("p", p)) => Ok(Trigger::Chance(parse_p(p)?)),
        _ => Err(format!("expected `fail:K` or `p:P`, got `{v}`")),
    }
}

/// `after:N` or `p:P`.
fn parse_break(v: &str) -> std::result::Result<Break, String> {
    match v.split_once(':').map(|(k, x)| (k.trim(), x)) {
        Some(("after", n)) => match parse_u64("message count", n)? {
            0 => Err("message count must be at least 1 (`after:N` breaks after the N-th message)".into()),
            n => Ok(Break::After(n)),
        },
        Some(("p", p)) => Ok(Break::Chance(parse_p(p)?)),
        _ => Err(format!("expected `after:N` or `p:P`, got `{v}`")),
    }
}

/// `ms:D` or `ms:D,p:P`.
fn parse_delay(v: &str) -> std::result::Result<Delay, String> {
    let (d, p) = match v.split_once(',') {
        Some((d, p)) => (d, Some(p)),
        None => (v, None),
    };
    let ms = match d.split_once(':').map(|(k, x)| (k.trim(), x)) {
        Some(("ms", ms)) => parse_u64("delay", ms)?,
        _ => return Err(format!("expected `ms:D` or `ms:D,p:P`, got `{v}`")),
    };
    if ms > MAX_DELAY_MS {
        return Err(format!("delay {ms} ms is more than {MAX_DELAY_MS} (one hour)"));
    }
    let p = match p.map(|p| p.split_once(':').map(|(k, x)| (k.trim(), x))) {
        None => 1.0,
        Some(Some(("p", p))) => parse_p(p)?,
        Some(_) => return Err(format!("expected `ms:D` or `ms:D,p:P`, got `{v}`")),
    };
    Ok(Delay { ms, p })
}

/// A call name as in [`CALLS`], matched ignoring case and underscores (`regMr`, `regmr`, `reg_mr`).
fn parse_call(v: &str) -> std::result::Result<&'static str, String> {
    let want: String = v.chars().filter(|&c| c != '_').flat_map(char::to_lowercase).collect();
    CALLS
        .iter()
        .copied()
        .find(|c| c.to_lowercase() == want)
        .ok_or_else(|| format!("`{v}` is not a plugin call (expected one of {})", CALLS.join(", ")))
}

impl FaultSpec {
    /// Parses the setting's text; errors name the setting, the clause and what is wrong with it.
    pub fn parse(text: &str) -> Result<FaultSpec> {
        let mut spec = FaultSpec {
            seed: 1,
            connect: None,
            accept: None,
            regmr: None,
            breaks: None,
            delay: None,
            panic: None,
        };
        let mut seen: Vec<&str> = Vec::new();
        for clause in text.split(';').map(str::trim).filter(|c| !c.is_empty()) {
            let bad = |why: String| Error::invalid_argument(format!("{}={text:?}: in `{clause}`: {why}", FAULTS.name));
            let Some((key, value)) = clause.split_once('=').map(|(k, v)| (k.trim(), v.trim())) else {
                return Err(bad("expected KEY=VALUE".into()));
            };
            if seen.contains(&key) {
                return Err(bad(format!("`{key}` is given twice")));
            }
            match key {
                "seed" => spec.seed = parse_u64("seed", value).map_err(bad)?,
                "connect" => spec.connect = Some(parse_trigger(value).map_err(bad)?),
                "accept" => spec.accept = Some(parse_trigger(value).map_err(bad)?),
                "regmr" => spec.regmr = Some(parse_trigger(value).map_err(bad)?),
                "break" => spec.breaks = Some(parse_break(value).map_err(bad)?),
                "delay" => spec.delay = Some(parse_delay(value).map_err(bad)?),
                "panic" => spec.panic = Some(parse_call(value).map_err(bad)?),
                _ => {
                    return Err(bad(format!(
                        "unknown fault `{key}` (expected seed, connect, accept, regmr, break, delay or panic)"
                    )))
                }
            }
            seen.push(key);
        }
        if !seen.iter().any(|&k| k != "seed") {
            return Err(Error::invalid_argument(format!(
                "{}={text:?} names no fault (expected connect=, accept=, regmr=, break=, delay= or panic=)",
                FAULTS.name
            )));
        }
        Ok(spec)
    }
}

/// Decision streams, one per clause, so that clauses draw independently.
const CONNECT: u64 = 1;
const ACCEPT: u64 = 2;
const REGMR: u64 = 3;
const BREAK: u64 = 4;
const DELAY: u64 = 5;

/// SplitMix64's output function: a bijective mix of a 64-bit value.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1), a pure function of the seed, the stream and the event `(a, b)`.
fn draw(seed: u64, stream: u64, a: u64, b: u64) -> f64 {
    let h = mix(mix(mix(mix(seed) ^ stream) ^ a) ^ b);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

impl Trigger {
    /// Whether event number `n` (from 0) of `stream` fails.
    fn fires(self, seed: u64, stream: u64, n: u64) -> bool {
        match self {
            Trigger::First(k) => n < k,
            Trigger::Chance(p) => draw(seed, stream, n, 0) < p,
        }
    }
}

/// How a comm was broken.
enum Broken {
    /// The inner transport cut the connection; its own errors follow.
    Cut,
    /// The inner could not: this layer fails the comm's calls with this text.
    Marked(String),
}

struct CommState {
    /// Order in which the comm was opened through this layer.
    ordinal: u64,
    /// Send or receive requests posted.
    posted: u64,
    /// Send or receive requests completed.
    completed: u64,
    broken: Option<Broken>,
}

struct ReqState {
    comm: usize,
    /// A send or receive (a flush is not a message).
    message: bool,
    /// Not tested on the inner transport (so not done) before this.
    due: Option<Instant>,
}

#[derive(Default)]
struct State {
    connects: u64,
    accepts: u64,
    regmrs: u64,
    next_comm: u64,
    /// Handle buffers with a connect in progress (the inner said "call again").
    connecting: HashSet<usize>,
    comms: HashMap<usize, CommState>,
    reqs: HashMap<usize, ReqState>,
}

impl State {
    fn open(&mut self, comm: Opaque) {
        let ordinal = self.next_comm;
        self.next_comm += 1;
        self.comms.insert(
            comm.as_ptr() as usize,
            CommState {
                ordinal,
                posted: 0,
                completed: 0,
                broken: None,
            },
        );
    }
}

/// The fault-injection layer over an inner transport.
pub struct Faults {
    inner: Box<dyn Transport>,
    spec: FaultSpec,
    st: Mutex<State>,
}

impl Faults {
    /// Injects the faults of `spec` into calls to `inner`; logs one WARN saying so.
    pub fn new(inner: Box<dyn Transport>, spec: FaultSpec) -> Faults {
        log::warn!(
            "{} is set: injecting faults {spec} into {} (for tests and chaos runs, never for production)",
            FAULTS.name,
            inner.name()
        );
        Faults {
            inner,
            spec,
            st: Mutex::new(State::default()),
        }
    }

    /// The faults injected.
    pub fn spec(&self) -> &FaultSpec {
        &self.spec
    }

    fn st(&self) -> MutexGuard<'_, State> {
        // Counters and maps only; a panic elsewhere leaves nothing half-updated that matters.
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Panics if `panic=` names `call`.
    fn panic_if(&self, call: &'static str) {
        if self.spec.panic == Some(call) {
            panic!("{call}: injected fault: panic ({} panic={call})", FAULTS.name);
        }
    }

    fn injected(call: &str, kind: ErrorKind, what: String, clause: String) -> Error {
        Error::new(
            kind,
            format!("{call}: injected fault: {what} ({} {clause})", FAULTS.name),
        )
    }

    /// Fails calls on a comm this layer marked broken.
    fn check_comm(&self, call: &str, comm: Opaque) -> Result<()> {
        match self.st().comms.get(&(comm.as_ptr() as usize)).map(|c| &c.broken) {
            Some(Some(Broken::Marked(why))) => Err(Error::connection_lost(format!("{call}: {why}"))),
            _ => Ok(()),
        }
    }

    /// Fails a registration if `regmr=` says so.
    fn check_regmr(&self, call: &str) -> Result<()> {
        let Some(t) = self.spec.regmr else { return Ok(()) };
        let n = {
            let mut st = self.st();
            st.regmrs += 1;
            st.regmrs - 1
        };
        if t.fires(self.spec.seed, REGMR, n) {
            return Err(Faults::injected(
                call,
                ErrorKind::System,
                format!("registration #{} failed", n + 1),
                format!("regmr={t}"),
            ));
        }
        Ok(())
    }

    /// Records a request just posted on `comm`, with its delay if `delay=` picks it.
    fn posted(&self, comm: Opaque, req: Opaque, message: bool) {
        let mut st = self.st();
        let key = comm.as_ptr() as usize;
        let Some(c) = st.comms.get_mut(&key) else { return };
        let m = c.posted;
        c.posted += 1;
        let ordinal = c.ordinal;
        let due = self
            .spec
            .delay
            .filter(|d| d.p >= 1.0 || draw(self.spec.seed, DELAY, ordinal, m) < d.p)
            .map(|d| Instant::now() + Duration::from_millis(d.ms));
        st.reqs.insert(
            req.as_ptr() as usize,
            ReqState {
                comm: key,
                message,
                due,
            },
        );
    }

    /// Forgets a completed request; breaks its comm if `break=` says this message does.
    fn completed(&self, req: Opaque) {
        let cut = {
            let mut st = self.st();
            let Some(r) = st.reqs.remove(&(req.as_ptr() as usize)) else {
                return;
            };
            if !r.message {
                return;
            }
            let Some(c) = st.comms.get_mut(&r.comm) else { return };
            c.completed += 1;
            let fire = c.broken.is_none()
                && match self.spec.breaks {
                    None => false,
                    Some(Break::After(n)) => c.completed >= n,
                    Some(Break::Chance(p)) => draw(self.spec.seed, BREAK, c.ordinal, c.completed - 1) < p,
                };
            fire.then_some((r.comm, c.completed))
        };
        if let Some((comm, n)) = cut {
            let clause = self.spec.breaks.map_or_else(String::new, |b| format!("break={b}"));
            let why = format!(
                "injected fault: connection broken after {n} messages ({} {clause})",
                FAULTS.name
            );
            if let Some(comm) = Opaque::from_addr(comm) {
                // SAFETY: the comm is open: `req` was an outstanding request of it (the caller's
                // promise) and this layer forgets comms when they are closed.
                unsafe { self.cut(comm, why) };
            }
        }
    }

    /// Breaks `comm`: through the inner transport if it can, else by marking it here;
    /// `why` says what broke it, for the WARN and the errors.
    ///
    /// # Safety
    /// `comm` is an open send or receive comm of the inner transport.
    unsafe fn cut(&self, comm: Opaque, why: String) {
        // SAFETY: the caller's promise.
        let label = unsafe { self.inner.describe_comm(comm) }.unwrap_or_else(|| format!("comm {:p}", comm.as_ptr()));
        // SAFETY: as above.
        let cut = unsafe { self.inner.break_comm(comm) };
        log::warn!(
            "{why}: {label}: {}",
            if cut {
                "the transport cut the connection"
            } else {
                "the transport cannot cut connections, so later calls on this comm fail here"
            }
        );
        if let Some(c) = self.st().comms.get_mut(&(comm.as_ptr() as usize)) {
            c.broken = Some(if cut { Broken::Cut } else { Broken::Marked(why) });
        }
    }

    /// Forgets a comm being closed, and its requests.
    fn closing(&self, comm: Opaque) {
        let key = comm.as_ptr() as usize;
        let mut st = self.st();
        st.comms.remove(&key);
        st.reqs.retain(|_, r| r.comm != key);
    }
}

impl Layer for Faults {
    fn inner(&self) -> &dyn Transport {
        &*self.inner
    }

    fn devices(&self) -> Result<i32> {
        self.panic_if("devices");
        self.inner.devices()
    }

    fn properties(&self, dev: i32) -> Result<Properties> {
        self.panic_if("getProperties");
        self.inner.properties(dev)
    }

    fn listen(&self, dev: i32, handle: &mut [u8; HANDLE_SIZE]) -> Result<Opaque> {
        self.panic_if("listen");
        self.inner.listen(dev, handle)
    }

    unsafe fn connect(
        &self,
        dev: i32,
        handle: &mut [u8; HANDLE_SIZE],
        dev_handle: *mut *mut DevHandle,
    ) -> Result<Option<Opaque>> {
        self.panic_if("connect");
        let key = handle.as_ptr() as usize;
        {
            let mut st = self.st();
            if !st.connecting.contains(&key) {
                let n = st.connects;
                st.connects += 1;
                if let Some(t) = self.spec.connect.filter(|t| t.fires(self.spec.seed, CONNECT, n)) {
                    return Err(Faults::injected(
                        "connect",
                        ErrorKind::Refused,
                        format!("connection attempt #{} refused", n + 1),
                        format!("connect={t}"),
                    ));
                }
            }
        }
        // SAFETY: forwarded under the caller's contract.
        let r = unsafe { self.inner.connect(dev, handle, dev_handle) };
        let mut st = self.st();
        match &r {
            Ok(None) => {
                st.connecting.insert(key);
            }
            Ok(Some(c)) => {
                st.connecting.remove(&key);
                st.open(*c);
            }
            Err(_) => {
                st.connecting.remove(&key);
            }
        }
        r
    }

    unsafe fn accept(&self, listen: Opaque, dev_handle: *mut *mut DevHandle) -> Result<Option<Opaque>> {
        self.panic_if("accept");
        // SAFETY: forwarded under the caller's contract.
        let Some(c) = (unsafe { self.inner.accept(listen, dev_handle) })? else {
            return Ok(None);
        };
        let n = {
            let mut st = self.st();
            st.accepts += 1;
            st.accepts - 1
        };
        if let Some(t) = self.spec.accept.filter(|t| t.fires(self.spec.seed, ACCEPT, n)) {
            // SAFETY: `c` was just accepted and nobody else has it.
            if let Err(e) = unsafe { self.inner.close_recv(c) } {
                log::warn!("accept: closing the connection refused by an injected fault: {e}");
            }
            return Err(Faults::injected(
                "accept",
                ErrorKind::Refused,
                format!("accepted connection #{} refused and closed", n + 1),
                format!("accept={t}"),
            ));
        }
        self.st().open(c);
        Ok(Some(c))
    }

    unsafe fn reg_mr(&self, comm: Opaque, data: *mut c_void, size: usize, ptr_type: i32) -> Result<Opaque> {
        self.panic_if("regMr");
        self.check_comm("regMr", comm)?;
        self.check_regmr("regMr")?;
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner.reg_mr(comm, data, size, ptr_type) }
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
        self.panic_if("regMrDmaBuf");
        self.check_comm("regMrDmaBuf", comm)?;
        self.check_regmr("regMrDmaBuf")?;
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner.reg_mr_dmabuf(comm, data, size, ptr_type, offset, fd) }
    }

    unsafe fn dereg_mr(&self, comm: Opaque, mr: Opaque) -> Result<()> {
        self.panic_if("deregMr");
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner.dereg_mr(comm, mr) }
    }

    unsafe fn isend(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: i32,
        tag: i32,
        mr: Option<Opaque>,
    ) -> Result<Option<Opaque>> {
        self.panic_if("isend");
        self.check_comm("isend", comm)?;
        // SAFETY: forwarded under the caller's contract.
        let r = unsafe { self.inner.isend(comm, data, size, tag, mr) }?;
        if let Some(req) = r {
            self.posted(comm, req, true);
        }
        Ok(r)
    }

    unsafe fn irecv(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        tags: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        self.panic_if("irecv");
        self.check_comm("irecv", comm)?;
        // SAFETY: forwarded under the caller's contract.
        let r = unsafe { self.inner.irecv(comm, data, sizes, tags, mrs) }?;
        if let Some(req) = r {
            self.posted(comm, req, true);
        }
        Ok(r)
    }

    unsafe fn iflush(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        self.panic_if("iflush");
        self.check_comm("iflush", comm)?;
        // SAFETY: forwarded under the caller's contract.
        let r = unsafe { self.inner.iflush(comm, data, sizes, mrs) }?;
        if let Some(req) = r {
            self.posted(comm, req, false);
        }
        Ok(r)
    }

    unsafe fn test(&self, req: Opaque, sizes: Option<&mut [i32]>) -> Result<bool> {
        self.panic_if("test");
        let known = self.st().reqs.get(&(req.as_ptr() as usize)).map(|r| (r.comm, r.due));
        let Some((comm, due)) = known else {
            // SAFETY: forwarded under the caller's contract.
            return unsafe { self.inner.test(req, sizes) };
        };
        if let Some(comm) = Opaque::from_addr(comm) {
            self.check_comm("test", comm)?;
        }
        if due.is_some_and(|due| Instant::now() < due) {
            // Not due yet: the inner request is left alone, so it stays outstanding in the inner
            // transport and its handle cannot be reused for another request meanwhile.
            return Ok(false);
        }
        // SAFETY: forwarded under the caller's contract.
        let done = unsafe { self.inner.test(req, sizes) }?;
        if done {
            self.completed(req);
        }
        Ok(done)
    }

    unsafe fn close_send(&self, comm: Opaque) -> Result<()> {
        self.panic_if("closeSend");
        self.closing(comm);
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner.close_send(comm) }
    }

    unsafe fn close_recv(&self, comm: Opaque) -> Result<()> {
        self.panic_if("closeRecv");
        self.closing(comm);
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner.close_recv(comm) }
    }

    unsafe fn close_listen(&self, comm: Opaque) -> Result<()> {
        self.panic_if("closeListen");
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner.close_listen(comm) }
    }

    unsafe fn get_device_mr(&self, comm: Opaque, mr: Opaque) -> Result<Option<Opaque>> {
        self.panic_if("getDeviceMr");
        self.check_comm("getDeviceMr", comm)?;
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner.get_device_mr(comm, mr) }
    }

    unsafe fn irecv_consumed(&self, comm: Opaque, n: i32, req: Option<Opaque>) -> Result<()> {
        self.panic_if("irecvConsumed");
        self.check_comm("irecvConsumed", comm)?;
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner.irecv_consumed(comm, n, req) }
    }
}

#[cfg(test)]
mod tests;
