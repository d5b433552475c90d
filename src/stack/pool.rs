//! Connection pooling: a send or receive comm that NCCL closes cleanly keeps its inner comm open,
//! idle, with its control link, and the next connect from this process to the same peer process
//! and device takes it over instead of making a new inner connection.
//!
//! ```text
//! connector (process C)                         listener (process L)
//! close(send): engine parks                     close(recv): engine parks
//!   idle: inner send comm, link, count N          idle: inner recv comm, link, count M
//! connect(handle of listen X of L):             listen X: handle names L's control service,
//!   an idle entry to L on this device?            X and its secret S (FLAG_POOL)
//!   Claim{X, S, N, digest} on its link  ------>  accept(X) reads its idle entries' links:
//!                                                 X listening here, S right, same device,
//!                                                 M == N (nothing left in flight), digest
//!                                                 of the settings equal: Grant, else Deny
//!   Grant: the send comm is the entry   <------  accept(X) returns the entry's recv comm
//!   Deny, a link gone or no answer in time: both ends close the entry; a fresh connect
//! ```
//!
//! An entry is used by one comm at a time (it is taken out of the pool under the pool's lock);
//! entries idle longer than NCCL_TCPXSHIM_POOL_IDLE, past NCCL_TCPXSHIM_POOL_MAX, or whose link is
//! gone are closed at the next pool operation. The link is ordered, so control messages of the
//! connection's previous comm (late acknowledgements) come before the Claim and before the Grant;
//! both ends drop everything else they find on an idle or claiming link.

use crate::config::{get, int, Setting, Vars};
use crate::control::link::{Handled, Link, LinkState};
use crate::error::{Error, Result};
use crate::lock;
use crate::transport::{Opaque, Transport};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether connections are pooled.
pub const POOL: Setting = Setting {
    name: "NCCL_TCPXSHIM_POOL",
    default: "1",
    doc: "1: a send or receive connection that NCCL closes with nothing outstanding stays open, idle, and the \
          next connect from this process to the same peer process and device reuses it (both ends agree over \
          the connection's control link), instead of making a new inner connection: for communicators created \
          again between the same ranks. Needs the recovery engine's control link (inner transports with \
          host-type receives, NCCL_TCPXSHIM_RECOVERY=1). `force`: also where the inner transport has UNPACK \
          receives (TCPX), where the shim has no control link yet, so nothing is pooled there and a WARN says \
          so. 0: off.",
};

/// The pool's bound.
pub const POOL_MAX: Setting = Setting {
    name: "NCCL_TCPXSHIM_POOL_MAX",
    default: "64",
    doc: "Idle connections the pool keeps, send and receive ones each (0 to 4096); past it the longest idle is \
          closed.",
};

/// How long an idle connection is kept.
pub const POOL_IDLE: Setting = Setting {
    name: "NCCL_TCPXSHIM_POOL_IDLE",
    default: "60",
    doc: "Seconds an idle connection is kept in the pool (1 to 86400); older ones are closed at the next \
          listen, connect, accept or close.",
};

/// How long a connector waits for the listener's answer to a claim before it makes a fresh
/// connection.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one connect() call waits for the answer to its claim before it returns no comm yet.
pub const CLAIM_SPIN: Duration = Duration::from_millis(2);
/// How long a connect waits for the link of an idle connection parked before its link attached.
const ATTACH_WAIT: Duration = Duration::from_secs(1);
/// A claim whose connect NCCL stopped calling is closed after this long.
const ABANDON_AFTER: Duration = Duration::from_secs(60);

/// Link message types of the pool (the recovery engine's are 1).
pub const MSG_CLAIM: u16 = 2;
/// The listener's answer to a claim.
pub const MSG_REPLY: u16 = 3;
const WIRE_VERSION: u8 = 1;

/// NCCL_TCPXSHIM_POOL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// No pooling.
    Off,
    /// Pooling where the inner transport's receives are host-type.
    On,
    /// Also asked for over UNPACK inners.
    Force,
}

/// The pool's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// NCCL_TCPXSHIM_POOL.
    pub mode: PoolMode,
    /// NCCL_TCPXSHIM_POOL_MAX.
    pub max: usize,
    /// NCCL_TCPXSHIM_POOL_IDLE.
    pub idle: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig::from_vars(&|_| None).unwrap_or_else(|e| unreachable!("the pool's defaults parse: {e}"))
    }
}

impl PoolConfig {
    /// Reads the pool's settings.
    pub fn from_vars(vars: Vars<'_>) -> Result<PoolConfig> {
        let mode = match get(vars, POOL.name).as_deref().unwrap_or(POOL.default) {
            "0" => PoolMode::Off,
            "1" => PoolMode::On,
            "force" => PoolMode::Force,
            v => {
                return Err(Error::invalid_argument(format!(
                    "{}={v:?} is not 0, 1 or `force`",
                    POOL.name
                )))
            }
        };
        Ok(PoolConfig {
            mode,
            max: int(vars, &POOL_MAX, 0, 4096)? as usize,
            idle: Duration::from_secs(int(vars, &POOL_IDLE, 1, 86400)?),
        })
    }
}

/// A connector's request to take over an idle connection for the listen comm `listen`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The listen comm's id in the listening process (the handle's conn id).
    pub listen: u32,
    /// The secret of that listen comm's handle: the claimer was given the handle.
    pub secret: u64,
    /// Messages the connection carried so far, by the connector's count.
    pub count: u64,
    /// Digest of the connector's settings that peers compare.
    pub digest: u64,
}

const CLAIM_LEN: usize = 1 + 4 + 8 + 8 + 8;
const REPLY_LEN: usize = 1 + 4 + 1;

impl Claim {
    /// The message body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(CLAIM_LEN);
        b.push(WIRE_VERSION);
        b.extend_from_slice(&self.listen.to_le_bytes());
        b.extend_from_slice(&self.secret.to_le_bytes());
        b.extend_from_slice(&self.count.to_le_bytes());
        b.extend_from_slice(&self.digest.to_le_bytes());
        b
    }

    /// Parses a body; `None` for anything else.
    pub fn decode(b: &[u8]) -> Option<Claim> {
        if b.len() != CLAIM_LEN || b[0] != WIRE_VERSION {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        Some(Claim {
            listen: u32::from_le_bytes(b[1..5].try_into().ok()?),
            secret: u64_at(5),
            count: u64_at(13),
            digest: u64_at(21),
        })
    }
}

/// The listener's answer: whether the claim for `listen` was granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The listen comm the claim named.
    pub listen: u32,
    /// Granted, or denied (both ends close the connection).
    pub granted: bool,
}

impl Reply {
    /// The message body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(REPLY_LEN);
        b.push(WIRE_VERSION);
        b.extend_from_slice(&self.listen.to_le_bytes());
        b.push(u8::from(self.granted));
        b
    }

    /// Parses a body; `None` for anything else.
    pub fn decode(b: &[u8]) -> Option<Reply> {
        if b.len() != REPLY_LEN || b[0] != WIRE_VERSION || b[5] > 1 {
            return None;
        }
        Some(Reply {
            listen: u32::from_le_bytes(b[1..5].try_into().ok()?),
            granted: b[5] == 1,
        })
    }
}

/// Why a listener turns a claim down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    /// No listen comm of this process has that id (closed, or never here).
    UnknownListen,
    /// The secret is not that listen comm's.
    WrongSecret,
    /// The listen comm is on another device than the idle connection.
    OtherDevice,
    /// The two ends counted different numbers of messages: something was left in flight.
    CountsDiffer,
    /// The settings peers compare differ.
    SettingsDiffer,
    /// The listen comm has a connection already.
    Taken,
}

/// A listen comm connections may be claimed for.
#[derive(Clone, Copy, Debug)]
pub struct Listening {
    /// Its handle's secret.
    pub secret: u64,
    /// Its device.
    pub dev: i32,
}

/// Compares two secrets without an early exit.
fn same_secret(a: u64, b: u64) -> bool {
    std::hint::black_box(a ^ b) == 0
}

/// The listener's verdict on `claim` for an idle receive connection on `dev` that carried `count`
/// messages, with this side's settings `digest`.
pub fn judge(
    claim: &Claim,
    listening: Option<&Listening>,
    taken: bool,
    dev: i32,
    count: u64,
    digest: u64,
) -> std::result::Result<(), Denial> {
    let l = listening.ok_or(Denial::UnknownListen)?;
    if !same_secret(l.secret, claim.secret) {
        return Err(Denial::WrongSecret);
    }
    if l.dev != dev {
        return Err(Denial::OtherDevice);
    }
    if claim.count != count {
        return Err(Denial::CountsDiffer);
    }
    if claim.digest != digest {
        return Err(Denial::SettingsDiffer);
    }
    if taken {
        return Err(Denial::Taken);
    }
    Ok(())
}

/// An idle connection, or one being handed over.
pub struct Entry {
    /// The pool's number for it (set when parked).
    pub id: u64,
    /// The open inner comm.
    pub comm: Opaque,
    /// Its control link.
    pub link: Link,
    /// Messages it carried over all its comms so far.
    pub count: u64,
    /// The device.
    pub dev: i32,
    /// Who is at the other end (for the log).
    pub peer: String,
    /// Connector side: the listening process's control service.
    pub peer_ctrl: Option<SocketAddr>,
    /// Idle since.
    pub since: Instant,
    /// Times it was reused.
    pub reuses: u64,
}

/// Counts, for the metrics and tests.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Connects that took over an idle connection.
    pub hits: AtomicU64,
    /// Connects to a peer that pools that found no idle connection to take, or whose claim was denied
    /// or not answered.
    pub misses: AtomicU64,
    /// Idle connections closed: idle too long, over the bound, their link gone, denied.
    pub evictions: AtomicU64,
    /// Connections put in the pool.
    pub parked: AtomicU64,
}

/// A snapshot of [`PoolStats`] and the idle counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// See [`PoolStats::hits`].
    pub hits: u64,
    /// See [`PoolStats::misses`].
    pub misses: u64,
    /// See [`PoolStats::evictions`].
    pub evictions: u64,
    /// See [`PoolStats::parked`].
    pub parked: u64,
    /// Idle send connections now.
    pub idle_send: usize,
    /// Idle receive connections now.
    pub idle_recv: usize,
}

/// A claim sent, waiting for its answer.
struct Pending {
    entry: Entry,
    listen: u32,
    sent: Instant,
}

#[derive(Default)]
struct State {
    /// Idle send connections, the longest idle first.
    send: Vec<Entry>,
    /// Idle receive connections, the longest idle first.
    recv: Vec<Entry>,
    /// Connector: claims waiting for their answer, by NCCL's handle buffer.
    claims: HashMap<usize, Pending>,
    /// Connector: connects that went the fresh way, by NCCL's handle buffer (a connect in
    /// progress must not start a claim half-way).
    fresh: HashMap<usize, u32>,
    /// Listener: listen comms connections may be claimed for, by id.
    listening: HashMap<u32, Listening>,
    /// Listener: connections granted to a listen comm, for its next accept.
    granted: HashMap<u32, Entry>,
    /// Denied on the links' thread: closed by the next pool operation.
    dead: Vec<Entry>,
}

/// What a connect() call does about the pool.
pub enum ConnectStep {
    /// Make a fresh connection.
    Fresh,
    /// A claim is waiting for its answer: call again.
    Waiting,
    /// The listener granted this connection: it is the new send comm's.
    Reuse(Entry),
}

/// The pool of one stack.
pub struct Pool {
    cfg: PoolConfig,
    /// Digest of the settings peers compare.
    digest: u64,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Counts (the metrics hold them too).
    pub stats: std::sync::Arc<PoolStats>,
}

/// Entries taken out under the lock, closed after it is released (a close may take a while).
#[must_use]
pub struct Doomed(Vec<(Entry, bool)>);

impl Doomed {
    /// Closes them on `inner`.
    pub fn close(self, inner: &dyn Transport) {
        for (e, send) in self.0 {
            close_entry(inner, e, send);
        }
    }
}

fn close_entry(inner: &dyn Transport, e: Entry, send: bool) {
    // SAFETY: the entry's inner comm is open and owned by the entry alone (taken out of the pool
    // under its lock), closed once here; nothing is outstanding on it.
    let _ = unsafe {
        if send {
            inner.close_send(e.comm)
        } else {
            inner.close_recv(e.comm)
        }
    };
    drop(e.link);
}

/// A digest of `settings` (the encoded settings peers compare): the first 8 bytes of its SHA-256.
pub fn digest(settings: &[u8]) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(settings);
    u64::from_le_bytes(d[..8].try_into().unwrap_or_default())
}

impl Pool {
    /// An empty pool.
    pub fn new(cfg: PoolConfig, digest: u64) -> Pool {
        Pool {
            cfg,
            digest,
            state: Mutex::new(State::default()),
            next_id: AtomicU64::new(0),
            stats: Default::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// Counts and idle connections now.
    pub fn counts(&self) -> PoolCounts {
        let st = lock(&self.state);
        PoolCounts {
            hits: self.stats.hits.load(Ordering::Relaxed),
            misses: self.stats.misses.load(Ordering::Relaxed),
            evictions: self.stats.evictions.load(Ordering::Relaxed),
            parked: self.stats.parked.load(Ordering::Relaxed),
            idle_send: st.send.len(),
            idle_recv: st.recv.len(),
        }
    }

    /// Takes out what is due to close: idle too long, links gone, claims not answered in time.
    fn expire(&self, st: &mut State, now: Instant) -> Doomed {
        let mut out: Vec<(Entry, bool)> = st.dead.drain(..).map(|e| (e, false)).collect();
        let stale = |e: &Entry| {
            now.saturating_duration_since(e.since) > self.cfg.idle || matches!(e.link.state(), LinkState::Gone(_))
        };
        for (list, send) in [(&mut st.send, true), (&mut st.recv, false)] {
            let mut i = 0;
            while i < list.len() {
                if stale(&list[i]) {
                    let e = list.remove(i);
                    log::debug!("pool: closed the idle connection with {} (idle or gone)", e.peer);
                    out.push((e, send));
                } else {
                    i += 1;
                }
            }
        }
        let late: Vec<usize> = st
            .claims
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.sent) > ABANDON_AFTER)
            .map(|(k, _)| *k)
            .collect();
        for k in late {
            if let Some(p) = st.claims.remove(&k) {
                out.push((p.entry, true));
            }
        }
        self.stats.evictions.fetch_add(out.len() as u64, Ordering::Relaxed);
        Doomed(out)
    }

    /// Closes idle connections that are due (any pool operation does this too).
    pub fn tidy(&self) -> Doomed {
        let mut st = lock(&self.state);
        self.expire(&mut st, Instant::now())
    }

    /// A comm closed cleanly: keeps its connection. `send` says which side this is. A receive
    /// connection's link answers claims on the links' thread from now on, so that a connector
    /// does not wait for this process's next accept to be told.
    /// `stash`: the messages the connection's last comm found on its link that were the pool's
    /// (a claim that came before this side's comm closed).
    pub fn park(self: &Arc<Self>, mut entry: Entry, send: bool, stash: Vec<(u16, Vec<u8>)>) -> Doomed {
        // (The handler is set before the pool's lock is taken: the links' thread calls it with
        // the handler's lock held, and it takes the pool's.)
        entry.id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        entry.link.set_quiet(true);
        if !send {
            let (pool, id) = (Arc::downgrade(self), entry.id);
            entry.link.set_handler(Some(Box::new(move |ty, body| {
                let Some(pool) = pool.upgrade() else {
                    return Handled::No;
                };
                let claim = (ty == MSG_CLAIM).then(|| Claim::decode(body)).flatten();
                let Some(claim) = claim else {
                    // The last comm's late messages while idle; once handed over, the new comm's.
                    return if pool.is_idle(id) { Handled::Yes } else { Handled::No };
                };
                match pool.on_claim(id, &claim, false) {
                    None => Handled::No,
                    Some(ok) => Handled::Reply(
                        MSG_REPLY,
                        Reply {
                            listen: claim.listen,
                            granted: ok,
                        }
                        .encode(),
                    ),
                }
            })));
        }
        let mut st = lock(&self.state);
        let mut doomed = self.expire(&mut st, Instant::now());
        self.stats.parked.fetch_add(1, Ordering::Relaxed);
        let id = entry.id;
        let list = if send { &mut st.send } else { &mut st.recv };
        list.push(entry);
        while list.len() > self.cfg.max {
            let e = list.remove(0);
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            log::debug!(
                "pool: closed the idle connection with {} ({} is full)",
                e.peer,
                POOL_MAX.name
            );
            doomed.0.push((e, send));
        }
        drop(st);
        for (ty, body) in stash {
            if let (false, MSG_CLAIM, Some(c)) = (send, ty, Claim::decode(&body)) {
                self.on_claim(id, &c, true);
            }
        }
        doomed
    }

    /// Listener: the listen comm `id` (its handle's secret and its device) takes claims.
    pub fn listen(&self, id: u32, l: Listening) -> Doomed {
        let mut st = lock(&self.state);
        st.listening.insert(id, l);
        self.expire(&mut st, Instant::now())
    }

    /// Listener: the listen comm `id` closed; a connection granted to it and never accepted
    /// closes too.
    pub fn unlisten(&self, id: u32) -> Doomed {
        let mut st = lock(&self.state);
        st.listening.remove(&id);
        Doomed(st.granted.remove(&id).map(|e| (e, false)).into_iter().collect())
    }

    /// Connector: one connect() call with NCCL's handle at `key` for listen comm `listen` of the
    /// process whose control service is `ctrl` (the handle's secret `secret`), on `dev`.
    pub fn connect_step(
        &self,
        key: usize,
        listen: u32,
        secret: u64,
        ctrl: SocketAddr,
        dev: i32,
    ) -> (ConnectStep, Doomed) {
        let now = Instant::now();
        let mut st = lock(&self.state);
        let mut doomed = self.expire(&mut st, now);
        if st.fresh.get(&key) == Some(&listen) {
            return (ConnectStep::Fresh, doomed);
        }
        if let Some(p) = st.claims.get_mut(&key) {
            if p.listen == listen {
                match answer(&p.entry.link, listen) {
                    Some(true) => {
                        let Some(p) = st.claims.remove(&key) else {
                            return (ConnectStep::Waiting, doomed);
                        };
                        self.stats.hits.fetch_add(1, Ordering::Relaxed);
                        let mut e = p.entry;
                        e.reuses += 1;
                        log::trace!(
                            "pool: connect on dev {dev} reuses the connection to {} (reuse {}, {} messages so far, \
                             answered in {} us)",
                            e.peer,
                            e.reuses,
                            e.count,
                            now.saturating_duration_since(p.sent).as_micros()
                        );
                        return (ConnectStep::Reuse(e), doomed);
                    }
                    None if now.saturating_duration_since(p.sent) < CLAIM_TIMEOUT
                        && !matches!(p.entry.link.state(), LinkState::Gone(_)) =>
                    {
                        return (ConnectStep::Waiting, doomed);
                    }
                    verdict => {
                        let Some(p) = st.claims.remove(&key) else {
                            return (ConnectStep::Waiting, doomed);
                        };
                        log::debug!(
                            "pool: the claim of the connection to {} was {}; connecting afresh",
                            p.entry.peer,
                            if verdict.is_some() { "denied" } else { "not answered" }
                        );
                        self.stats.misses.fetch_add(1, Ordering::Relaxed);
                        self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                        doomed.0.push((p.entry, true));
                        st.fresh.insert(key, listen);
                        return (ConnectStep::Fresh, doomed);
                    }
                }
            }
            // The buffer now holds another connection's handle: the old claim is abandoned.
            if let Some(p) = st.claims.remove(&key) {
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                doomed.0.push((p.entry, true));
            }
        }
        // The newest idle connection to that process on this device whose link is up; those to it
        // whose link is not (the peer closed it, or the network between broke) are stale.
        let mut found = None;
        let mut i = st.send.len();
        while i > 0 && found.is_none() {
            i -= 1;
            let e = &st.send[i];
            if e.dev != dev || e.peer_ctrl != Some(ctrl) {
                continue;
            }
            match e.link.state() {
                LinkState::Up => found = Some(i),
                // Parked while its link was still attaching (a comm closed right after its
                // connect): wait for it a little.
                LinkState::Connecting if now.saturating_duration_since(e.since) < ATTACH_WAIT => {
                    return (ConnectStep::Waiting, doomed);
                }
                _ => {
                    let e = st.send.remove(i);
                    log::debug!(
                        "pool: closed the idle connection to {}: its control link is down",
                        e.peer
                    );
                    self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                    doomed.0.push((e, true));
                }
            }
        }
        let Some(i) = found else {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            st.fresh.insert(key, listen);
            return (ConnectStep::Fresh, doomed);
        };
        let entry = st.send.remove(i);
        // Late messages of the connection's last comm are of no use now.
        while entry.link.try_recv().is_some() {}
        let claim = Claim {
            listen,
            secret,
            count: entry.count,
            digest: self.digest,
        };
        if let Err(e) = entry.link.send(MSG_CLAIM, &claim.encode()) {
            log::debug!("pool: claiming the connection to {} failed: {e}", entry.peer);
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            doomed.0.push((entry, true));
            st.fresh.insert(key, listen);
            return (ConnectStep::Fresh, doomed);
        }
        st.claims.insert(
            key,
            Pending {
                entry,
                listen,
                sent: now,
            },
        );
        (ConnectStep::Waiting, doomed)
    }

    /// Connector: the connect with NCCL's handle at `key` is over (returned a comm or failed).
    pub fn connect_done(&self, key: usize) {
        lock(&self.state).fresh.remove(&key);
    }

    /// Listener, on the links' thread: `claim` came on the link of idle receive connection `id`.
    /// `None` when that connection is no longer idle here; else whether it was granted (it waits
    /// for the listen comm's accept) or denied (it closes).
    /// `reply`: send the answer here (else the caller does).
    fn on_claim(&self, id: u64, claim: &Claim, reply: bool) -> Option<bool> {
        let mut st = lock(&self.state);
        let i = st.recv.iter().position(|e| e.id == id)?;
        let e = &st.recv[i];
        let verdict = judge(
            claim,
            st.listening.get(&claim.listen),
            st.granted.contains_key(&claim.listen),
            e.dev,
            e.count,
            self.digest,
        );
        let mut e = st.recv.remove(i);
        if reply {
            let r = Reply {
                listen: claim.listen,
                granted: verdict.is_ok(),
            };
            if let Err(err) = e.link.send(MSG_REPLY, &r.encode()) {
                log::debug!("pool: answering a claim failed: {err}");
            }
        }
        match verdict {
            Ok(()) => {
                e.reuses += 1;
                log::trace!(
                    "pool: listen {} gets the idle connection from {} (reuse {}, {} messages so far)",
                    claim.listen,
                    e.peer,
                    e.reuses,
                    e.count
                );
                st.granted.insert(claim.listen, e);
                Some(true)
            }
            Err(why) => {
                log::debug!(
                    "pool: denied a claim from {} for listen {}: {why:?}",
                    e.peer,
                    claim.listen
                );
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                st.dead.push(e);
                Some(false)
            }
        }
    }

    /// Whether receive connection `id` is idle here still.
    fn is_idle(&self, id: u64) -> bool {
        lock(&self.state).recv.iter().any(|e| e.id == id)
    }

    /// Listener: one accept() call on listen comm `listen`: answers the claims that came in on
    /// idle connections, and returns the connection granted to `listen`, if any.
    pub fn accept_step(&self, listen: u32) -> (Option<Entry>, Doomed) {
        let now = Instant::now();
        let mut st = lock(&self.state);
        let mut doomed = self.expire(&mut st, now);
        let mut i = 0;
        while i < st.recv.len() {
            let Some(claim) = claim_on(&st.recv[i].link) else {
                i += 1;
                continue;
            };
            let e = &st.recv[i];
            let verdict = judge(
                &claim,
                st.listening.get(&claim.listen),
                st.granted.contains_key(&claim.listen),
                e.dev,
                e.count,
                self.digest,
            );
            let granted = verdict.is_ok();
            if let Err(e) = e.link.send(
                MSG_REPLY,
                &Reply {
                    listen: claim.listen,
                    granted,
                }
                .encode(),
            ) {
                log::debug!("pool: answering a claim failed: {e}");
            }
            let mut e = st.recv.remove(i);
            match verdict {
                Ok(()) => {
                    e.reuses += 1;
                    log::trace!(
                        "pool: listen {} gets the idle connection from {} (reuse {}, {} messages so far)",
                        claim.listen,
                        e.peer,
                        e.reuses,
                        e.count
                    );
                    st.granted.insert(claim.listen, e);
                }
                Err(why) => {
                    log::debug!(
                        "pool: denied a claim from {} for listen {}: {why:?}",
                        e.peer,
                        claim.listen
                    );
                    self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                    doomed.0.push((e, false));
                }
            }
        }
        (st.granted.remove(&listen), doomed)
    }

    /// Takes every connection out (the stack is going away).
    pub fn drain(&self) -> Doomed {
        let mut st = lock(&self.state);
        let mut out: Vec<(Entry, bool)> = st.send.drain(..).map(|e| (e, true)).collect();
        out.extend(st.recv.drain(..).map(|e| (e, false)));
        out.extend(st.claims.drain().map(|(_, p)| (p.entry, true)));
        out.extend(st.granted.drain().map(|(_, e)| (e, false)));
        out.extend(st.dead.drain(..).map(|e| (e, false)));
        Doomed(out)
    }
}

/// The answer to a claim for `listen` waiting on `link`, if it came; other messages are dropped.
/// (`link` is a send connection's, which has no handler: reading its socket here, under the
/// pool's lock, takes no other lock of the pool.)
fn answer(link: &Link, listen: u32) -> Option<bool> {
    for _ in 0..64 {
        let (ty, body) = link.recv_now()?;
        if ty != MSG_REPLY {
            continue;
        }
        match Reply::decode(&body) {
            Some(r) if r.listen == listen => return Some(r.granted),
            _ => continue,
        }
    }
    None
}

/// A claim waiting on an idle connection's link, if one came; other messages are dropped.
/// (From the inbox only: reading the socket here would run the link's handler, which takes the
/// pool's lock, held by the caller.)
fn claim_on(link: &Link) -> Option<Claim> {
    for _ in 0..64 {
        let (ty, body) = link.try_recv()?;
        if ty != MSG_CLAIM {
            continue;
        }
        if let Some(c) = Claim::decode(&body) {
            return Some(c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_refuse_other_bytes() {
        let c = Claim {
            listen: 7,
            secret: u64::MAX - 3,
            count: 12345,
            digest: 99,
        };
        assert_eq!(Claim::decode(&c.encode()), Some(c));
        let mut bad = c.encode();
        bad[0] = 2;
        assert_eq!(Claim::decode(&bad), None, "another version");
        assert_eq!(Claim::decode(&c.encode()[..CLAIM_LEN - 1]), None, "truncated");
        let r = Reply {
            listen: 7,
            granted: true,
        };
        assert_eq!(Reply::decode(&r.encode()), Some(r));
        let mut bad = r.encode();
        bad[5] = 2;
        assert_eq!(Reply::decode(&bad), None);
    }

    #[test]
    fn a_claim_is_granted_only_when_everything_agrees() {
        let l = Listening { secret: 5, dev: 1 };
        let c = Claim {
            listen: 3,
            secret: 5,
            count: 10,
            digest: 42,
        };
        assert_eq!(judge(&c, Some(&l), false, 1, 10, 42), Ok(()));
        assert_eq!(judge(&c, None, false, 1, 10, 42), Err(Denial::UnknownListen));
        let wrong = Claim { secret: 6, ..c };
        assert_eq!(judge(&wrong, Some(&l), false, 1, 10, 42), Err(Denial::WrongSecret));
        assert_eq!(judge(&c, Some(&l), false, 0, 10, 42), Err(Denial::OtherDevice));
        assert_eq!(judge(&c, Some(&l), false, 1, 9, 42), Err(Denial::CountsDiffer));
        assert_eq!(judge(&c, Some(&l), false, 1, 10, 43), Err(Denial::SettingsDiffer));
        assert_eq!(judge(&c, Some(&l), true, 1, 10, 42), Err(Denial::Taken));
    }

    #[test]
    fn settings_are_read_and_checked() {
        let c = PoolConfig::default();
        assert_eq!(c.mode, PoolMode::On);
        assert_eq!(c.max.to_string(), POOL_MAX.default);
        assert_eq!(c.idle.as_secs().to_string(), POOL_IDLE.default);
        let m: HashMap<&str, &str> = [(POOL.name, "force"), (POOL_MAX.name, "3"), (POOL_IDLE.name, "5")].into();
        let c = PoolConfig::from_vars(&|k| m.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!((c.mode, c.max, c.idle), (PoolMode::Force, 3, Duration::from_secs(5)));
        let bad = PoolConfig::from_vars(&|k| (k == POOL.name).then(|| "yes".to_string()))
            .unwrap_err()
            .to_string();
        assert!(bad.contains("NCCL_TCPXSHIM_POOL=\"yes\""), "{bad}");
        assert_ne!(digest(b"a"), digest(b"b"));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzzing::{check_mutations, config};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn claim_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Some(c) = Claim::decode(&b) {
                prop_assert_eq!(c.encode(), b);
            }
        }

        #[test]
        fn claim_mutations(listen in any::<u32>(), secret in any::<u64>(), count in any::<u64>(), digest in any::<u64>(),
                           masks in proptest::collection::vec(1u8.., 1..40)) {
            let c = Claim { listen, secret, count, digest };
            check_mutations(&c.encode(), &masks, true, |b| Claim::decode(b).map(|c| c.encode()))?;
        }

        #[test]
        fn reply_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..8)) {
            if let Some(r) = Reply::decode(&b) {
                prop_assert_eq!(r.encode(), b);
            }
        }

        #[test]
        fn reply_mutations(listen in any::<u32>(), granted in any::<bool>(), masks in proptest::collection::vec(1u8.., 1..8)) {
            let r = Reply { listen, granted };
            check_mutations(&r.encode(), &masks, true, |b| Reply::decode(b).map(|r| r.encode()))?;
        }
    }
}
