//! The recovery protocol: one state machine per side of a connection, with no I/O, no clock and
//! no threads. The engine feeds each side events with the current time ([`SendSide::handle`],
//! [`RecvSide::handle`]) and carries out the actions it polls afterwards ([`SendSide::poll_action`],
//! [`RecvSide::poll_action`]), in order. docs/design.md (Recovery protocol) describes the states,
//! the messages and the invariants; the simulator in `tests.rs` checks them.

use super::RecoveryConfig;
use crate::error::Error;
use std::collections::VecDeque;

/// Generation of a connection's inner comm: 0 for the first, one more for each one the receiving
/// side listens for.
pub type Epoch = u32;
/// Position of a send among all sends of a connection, from 0.
pub type Seq = u64;
/// The engine's name for one NCCL request (a send, or a grouped receive).
pub type ReqId = u64;
/// A time in nanoseconds, from any fixed origin the engine chooses.
pub type Nanos = u64;

/// Why an inner comm (or an attempt to make one) failed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    /// The inner comm reported an error: a reset, end of stream, a failed test, a keepalive
    /// timeout; the text says which.
    Inner(String),
    /// Listening for a new inner comm failed.
    Listen(String),
    /// Connecting to the peer's new inner comm failed.
    Connect(String),
    /// The peer reported that its inner comm of this epoch failed.
    PeerReported,
    /// The peer started a new inner comm before this side noticed a failure.
    PeerReplaced,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Inner(s) => write!(f, "inner comm failed: {s}"),
            Cause::Listen(s) => write!(f, "listen for a new inner comm failed: {s}"),
            Cause::Connect(s) => write!(f, "connect to the new inner comm failed: {s}"),
            Cause::PeerReported => f.write_str("the peer reported its inner comm failed"),
            Cause::PeerReplaced => f.write_str("the peer replaced the inner comm"),
        }
    }
}

/// Why a recovery gave up.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GiveUp {
    /// NCCL_TCPXSHIM_RECOVERY_TIMEOUT passed.
    Deadline,
    /// NCCL_TCPXSHIM_RECOVERY_ATTEMPTS new inner comms were tried.
    Attempts,
    /// Recovery is off (NCCL_TCPXSHIM_RECOVERY_TIMEOUT=0).
    Disabled,
    /// The control channel reports the peer gone.
    PeerGone(String),
    /// The peer gave up and said why.
    PeerAbort(String),
    /// The peer broke the protocol.
    Protocol(String),
    /// The inner transport refused a request as an error of its caller (a receive smaller than
    /// its message, an argument it does not take): not a broken connection, so nothing to
    /// make again.
    Refused(String),
}

impl std::fmt::Display for GiveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GiveUp::Deadline => f.write_str("not recovered within NCCL_TCPXSHIM_RECOVERY_TIMEOUT"),
            GiveUp::Attempts => f.write_str("not recovered within NCCL_TCPXSHIM_RECOVERY_ATTEMPTS attempts"),
            GiveUp::Disabled => f.write_str("recovery is off (NCCL_TCPXSHIM_RECOVERY_TIMEOUT=0)"),
            GiveUp::PeerGone(s) => write!(f, "the peer is gone: {s}"),
            GiveUp::PeerAbort(s) => write!(f, "the peer gave up: {s}"),
            GiveUp::Protocol(s) => write!(f, "protocol violation by the peer: {s}"),
            GiveUp::Refused(s) => write!(f, "the inner transport refused a request: {s}"),
        }
    }
}

/// The end of a connection: every outstanding request fails.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Failure {
    /// Why it gave up.
    pub reason: GiveUp,
    /// What broke the connection first (`None`: it failed while healthy, e.g. the peer went away).
    pub cause: Option<Cause>,
    /// The last failure seen during the recovery, if different from the first.
    pub last: Option<Cause>,
    /// New inner comms tried.
    pub attempts: u32,
    /// Time from the first failure to giving up.
    pub elapsed_ns: Nanos,
    /// The epoch of the last inner comm tried.
    pub epoch: Epoch,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.reason)?;
        if let Some(c) = &self.cause {
            write!(f, "; first failure: {c}")?;
        }
        if let Some(c) = &self.last {
            write!(f, "; last failure: {c}")?;
        }
        write!(
            f,
            "; tried {} new inner comm(s) over {} ms (last epoch {})",
            self.attempts,
            self.elapsed_ns / 1_000_000,
            self.epoch
        )
    }
}

impl Failure {
    /// The error NCCL sees for a request of this connection (`ncclRemoteError`), naming the call,
    /// the peer, what happened and what was tried, and the setting that bounds it.
    pub fn to_error(&self, call: &str, peer: &str) -> Error {
        let hint = match self.reason {
            GiveUp::Deadline | GiveUp::Attempts => {
                "; raise NCCL_TCPXSHIM_RECOVERY_TIMEOUT or NCCL_TCPXSHIM_RECOVERY_ATTEMPTS to wait longer"
            }
            _ => "",
        };
        Error::remote(format!("{call}: connection to {peer} lost: {self}{hint}"))
    }
}

/// A message on the control channel between the two sides of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Control {
    /// Sender to receiver: my inner comm of `epoch` failed; make a new one.
    Recover {
        /// The sender's failed epoch.
        epoch: Epoch,
    },
    /// Receiver to sender: connect to the inner comm of `epoch` with `handle`; every send before
    /// `completed` is complete in NCCL's buffers (an acknowledgement too).
    NewInner {
        /// The new epoch.
        epoch: Epoch,
        /// The inner transport's handle to connect with.
        handle: Vec<u8>,
        /// Sends complete at the receiver.
        completed: Seq,
    },
    /// Receiver to sender: every send before `completed` is complete in NCCL's buffers.
    Ack {
        /// Sends complete at the receiver.
        completed: Seq,
    },
    /// Either way: this side gave up; fail everything.
    Abort {
        /// Why, for the peer's WARN line.
        reason: String,
    },
}

const WIRE_VERSION: u8 = 1;

impl Control {
    /// The message's bytes: a version byte, a tag byte, then the fields, little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![WIRE_VERSION];
        match self {
            Control::Recover { epoch } => {
                out.push(1);
                out.extend_from_slice(&epoch.to_le_bytes());
            }
            Control::NewInner {
                epoch,
                handle,
                completed,
            } => {
                out.push(2);
                out.extend_from_slice(&epoch.to_le_bytes());
                out.extend_from_slice(&completed.to_le_bytes());
                out.extend_from_slice(&(handle.len().min(u16::MAX as usize) as u16).to_le_bytes());
                out.extend_from_slice(&handle[..handle.len().min(u16::MAX as usize)]);
            }
            Control::Ack { completed } => {
                out.push(3);
                out.extend_from_slice(&completed.to_le_bytes());
            }
            Control::Abort { reason } => {
                let r = &reason.as_bytes()[..reason.len().min(1024)];
                out.push(4);
                out.extend_from_slice(&(r.len() as u16).to_le_bytes());
                out.extend_from_slice(r);
            }
        }
        out
    }

    /// Reads a message written by [`Control::encode`]; malformed bytes are a remote-kind error.
    pub fn decode(bytes: &[u8]) -> crate::Result<Control> {
        let bad = |what: &str| Error::remote(format!("recovery control message from the peer: {what}"));
        let mut r = Reader(bytes);
        let version = r.u8().ok_or_else(|| bad("empty"))?;
        if version != WIRE_VERSION {
            return Err(bad(&format!("version {version}, expected {WIRE_VERSION}")));
        }
        let short = || bad("truncated");
        let msg = match r.u8().ok_or_else(short)? {
            1 => Control::Recover {
                epoch: r.u32().ok_or_else(short)?,
            },
            2 => {
                let epoch = r.u32().ok_or_else(short)?;
                let completed = r.u64().ok_or_else(short)?;
                let len = r.u16().ok_or_else(short)? as usize;
                Control::NewInner {
                    epoch,
                    completed,
                    handle: r.take(len).ok_or_else(short)?.to_vec(),
                }
            }
            3 => Control::Ack {
                completed: r.u64().ok_or_else(short)?,
            },
            4 => {
                let len = r.u16().ok_or_else(short)? as usize;
                Control::Abort {
                    reason: String::from_utf8_lossy(r.take(len).ok_or_else(short)?).into_owned(),
                }
            }
            t => return Err(bad(&format!("unknown tag {t}"))),
        };
        if !r.0.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(msg)
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
    }
}

/// Counters of one side, for the INFO line at close and the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Stats {
    /// Recoveries that finished (a new inner comm carries the traffic).
    pub recoveries: u64,
    /// New inner comms tried, over all recoveries.
    pub attempts: u64,
    /// Sends posted again on a new inner comm (sending side only).
    pub replayed: u64,
    /// Bytes of those sends.
    pub replayed_bytes: u64,
    /// Receives posted again on a new inner comm (receiving side only).
    pub reposted: u64,
    /// What broke the connection last.
    pub last_cause: Option<Cause>,
    /// Time the last finished recovery took.
    pub last_recovery_ns: Option<Nanos>,
    /// Time all finished recoveries took.
    pub total_recovery_ns: Nanos,
}

/// A recovery in progress.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Recovery {
    since: Nanos,
    attempts: u32,
    cause: Cause,
    last: Option<Cause>,
}

impl Recovery {
    fn failure(&self, reason: GiveUp, now: Nanos, epoch: Epoch) -> Failure {
        Failure {
            reason,
            cause: Some(self.cause.clone()),
            last: self.last.clone(),
            attempts: self.attempts,
            elapsed_ns: now.saturating_sub(self.since),
            epoch,
        }
    }
}

/// How a side that gives up for `reason` failed: with the recovery in progress, if any, or
/// while healthy (the peer went away, a request was refused).
fn failure(rec: &Option<Recovery>, reason: GiveUp, now: Nanos, epoch: Epoch) -> Failure {
    match rec {
        Some(r) => r.failure(reason, now, epoch),
        None => Failure {
            reason,
            cause: None,
            last: None,
            attempts: 0,
            elapsed_ns: 0,
            epoch,
        },
    }
}

/// Common bookkeeping of both sides: the recovery in progress and its bounds.
fn begin(rec: &mut Option<Recovery>, stats: &mut Stats, now: Nanos, cause: Cause) {
    stats.last_cause = Some(cause.clone());
    match rec {
        Some(r) => r.last = Some(cause),
        None => {
            *rec = Some(Recovery {
                since: now,
                attempts: 0,
                cause,
                last: None,
            })
        }
    }
}

fn expired(cfg: &RecoveryConfig, rec: &Option<Recovery>, now: Nanos) -> bool {
    let limit = u64::try_from(cfg.timeout.as_nanos()).unwrap_or(u64::MAX);
    rec.as_ref().is_some_and(|r| now.saturating_sub(r.since) >= limit)
}

/// Where a replayed send's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// NCCL's own buffer, still intact: the send was not reported complete.
    Nccl,
    /// The engine's replay copy made at [`SendAction::CopyForReplay`].
    Copy,
}

/// What happens to the sending side.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SendEvent {
    /// NCCL posted a send (isend) of `size` bytes.
    Post {
        /// The engine's id for it.
        req: ReqId,
        /// Bytes.
        size: u64,
    },
    /// The inner send of `seq` on the inner comm of `epoch` is done.
    InnerDone {
        /// Epoch it was posted on.
        epoch: Epoch,
        /// Which send.
        seq: Seq,
    },
    /// The inner comm of `epoch` (or the connect to it) failed.
    InnerFailed {
        /// Which inner comm.
        epoch: Epoch,
        /// What happened.
        cause: Cause,
    },
    /// The inner comm of `epoch` refused a post or a test as an error of its caller: the
    /// connection fails for good (see [`GiveUp::Refused`]).
    InnerRefused {
        /// Which inner comm.
        epoch: Epoch,
        /// The inner transport's error.
        reason: String,
    },
    /// The connect of [`SendAction::Connect`] returned the inner comm of `epoch`.
    Connected {
        /// Which inner comm.
        epoch: Epoch,
    },
    /// A message from the receiving side.
    Control(Control),
    /// The control channel reports the peer gone.
    PeerGone(String),
    /// Time passes (checks the deadline).
    Tick,
}

/// What the sending side asks the engine to do, in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SendAction {
    /// Post a send of NCCL's request `req` on the inner comm of `epoch` (its first post).
    Post {
        /// Inner comm.
        epoch: Epoch,
        /// Position of the send.
        seq: Seq,
        /// The request.
        req: ReqId,
        /// Bytes.
        size: u64,
    },
    /// Post the send `seq` again on the new inner comm of `epoch`, from `source`.
    Replay {
        /// Inner comm.
        epoch: Epoch,
        /// Position of the send.
        seq: Seq,
        /// The request.
        req: ReqId,
        /// Bytes.
        size: u64,
        /// Where its bytes are.
        source: Source,
    },
    /// Copy the bytes of `req` (send `seq`) into a replay buffer now, before the completion that
    /// follows is reported.
    CopyForReplay {
        /// Position of the send.
        seq: Seq,
        /// The request.
        req: ReqId,
        /// Bytes.
        size: u64,
    },
    /// Free the replay copy of `seq`.
    ReleaseCopy {
        /// Position of the send.
        seq: Seq,
    },
    /// Report `req` complete to NCCL.
    Complete {
        /// The request.
        req: ReqId,
    },
    /// Report `req` failed to NCCL (after [`SendAction::Failed`]).
    FailRequest {
        /// The request.
        req: ReqId,
    },
    /// Close the inner comm of `epoch` (its requests are abandoned).
    CloseInner {
        /// Which one.
        epoch: Epoch,
    },
    /// Connect to the receiver's new inner comm; report [`SendEvent::Connected`] or
    /// [`SendEvent::InnerFailed`].
    Connect {
        /// Its epoch.
        epoch: Epoch,
        /// The handle the receiver's listen gave.
        handle: Vec<u8>,
    },
    /// Register NCCL's memory registrations again on the new inner comm, before any post on it.
    ReRegister {
        /// The new inner comm.
        epoch: Epoch,
    },
    /// Send a control message to the receiving side.
    SendControl(Control),
    /// The connection recovered: log it (INFO) and count it.
    Recovered {
        /// The new inner comm.
        epoch: Epoch,
        /// Sends replayed on it.
        replayed: u64,
        /// What broke the previous one.
        cause: Cause,
        /// Time from the failure to now.
        elapsed_ns: Nanos,
    },
    /// The connection is lost: log a WARN; [`SendAction::FailRequest`]s follow.
    Failed(Failure),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum SendPhase {
    /// The inner comm of `epoch` carries the traffic.
    Up,
    /// The inner comm of `epoch` failed; waiting for the receiver's NewInner.
    WaitNewInner,
    /// Connecting to the inner comm of `epoch`.
    Connecting,
    /// Given up.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SendEntry {
    seq: Seq,
    req: ReqId,
    size: u64,
    /// The epoch of its last inner post.
    posted: Option<Epoch>,
    /// That inner post is done.
    inner_done: bool,
    /// The engine holds a replay copy.
    copied: bool,
    /// Reported complete to NCCL.
    completed: bool,
}

/// The sending side of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SendSide {
    cfg: RecoveryConfig,
    epoch: Epoch,
    phase: SendPhase,
    rec: Option<Recovery>,
    next_seq: Seq,
    acked: Seq,
    /// Every entry before this seq holds no copy (see `progress`).
    released_to: Seq,
    /// Every entry before this seq is complete (see `progress`).
    open_from: Seq,
    queue: VecDeque<SendEntry>,
    ring_used: u64,
    stats: Stats,
    out: VecDeque<SendAction>,
}

impl SendSide {
    /// A sending side whose inner comm of epoch 0 is connected.
    pub fn new(cfg: RecoveryConfig) -> SendSide {
        SendSide {
            cfg,
            epoch: 0,
            phase: SendPhase::Up,
            rec: None,
            next_seq: 0,
            acked: 0,
            released_to: 0,
            open_from: 0,
            queue: VecDeque::new(),
            ring_used: 0,
            stats: Stats::default(),
            out: VecDeque::new(),
        }
    }

    /// The next action for the engine, in order.
    pub fn poll_action(&mut self) -> Option<SendAction> {
        self.out.pop_front()
    }

    /// The epoch of the inner comm in use (or being connected to, or that failed last).
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    /// Whether a recovery is in progress.
    pub fn recovering(&self) -> bool {
        matches!(self.phase, SendPhase::WaitNewInner | SendPhase::Connecting)
    }
    /// Whether the connection is lost for good.
    pub fn failed(&self) -> bool {
        self.phase == SendPhase::Failed
    }
    /// Sends posted so far.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }
    /// Sends acknowledged by the receiver.
    pub fn acked(&self) -> Seq {
        self.acked
    }
    /// Bytes of replay copies held.
    pub fn ring_used(&self) -> u64 {
        self.ring_used
    }
    /// Sends not yet acknowledged and released.
    pub fn outstanding(&self) -> usize {
        self.queue.len()
    }
    /// Whether the first send not yet complete went out (its inner send is done) and waits only
    /// for the receiver's acknowledgement.
    pub fn awaiting_ack(&self) -> bool {
        let Some(front) = self.queue.front().map(|e| e.seq) else {
            return false;
        };
        let i = usize::try_from(self.open_from.saturating_sub(front)).unwrap_or(usize::MAX);
        self.queue
            .get(i)
            .is_some_and(|e| !e.completed && e.inner_done && e.seq >= self.acked)
    }
    /// Whether the connection is up with every send reported complete to NCCL and its inner send
    /// done: this side leaves nothing on the inner comm (it may be pooled).
    pub fn quiet(&self) -> bool {
        self.phase == SendPhase::Up && self.out.is_empty() && self.queue.iter().all(|e| e.completed && e.inner_done)
    }
    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Feeds one event at time `now`; poll the actions it causes with [`SendSide::poll_action`].
    pub fn handle(&mut self, now: Nanos, ev: SendEvent) {
        match ev {
            SendEvent::Post { req, size } => self.post(req, size),
            SendEvent::InnerDone { epoch, seq } => {
                if self.phase == SendPhase::Up && epoch == self.epoch {
                    if let Some(e) = self.entry_mut(seq).filter(|e| e.posted == Some(epoch)) {
                        e.inner_done = true;
                    }
                }
            }
            SendEvent::InnerFailed { epoch, cause } => {
                if epoch == self.epoch && matches!(self.phase, SendPhase::Up | SendPhase::Connecting) {
                    self.lose_epoch(now, cause);
                }
            }
            SendEvent::InnerRefused { epoch, reason } => {
                if epoch == self.epoch {
                    self.fail(now, GiveUp::Refused(reason), true);
                }
            }
            SendEvent::Connected { epoch } => {
                if self.phase == SendPhase::Connecting && epoch == self.epoch {
                    self.resume(now);
                }
            }
            SendEvent::Control(Control::Ack { completed }) => {
                if self.phase != SendPhase::Failed {
                    self.ack(now, completed);
                }
            }
            SendEvent::Control(Control::NewInner {
                epoch,
                handle,
                completed,
            }) => self.new_inner(now, epoch, handle, completed),
            SendEvent::Control(Control::Recover { epoch }) => self.fail(
                now,
                GiveUp::Protocol(format!("a Recover message (epoch {epoch}) sent to the sending side")),
                true,
            ),
            SendEvent::Control(Control::Abort { reason }) => self.fail(now, GiveUp::PeerAbort(reason), false),
            SendEvent::PeerGone(detail) => self.fail(now, GiveUp::PeerGone(detail), false),
            SendEvent::Tick => {
                if self.recovering() && expired(&self.cfg, &self.rec, now) {
                    self.fail(now, GiveUp::Deadline, true);
                }
            }
        }
        self.progress();
    }

    fn entry_mut(&mut self, seq: Seq) -> Option<&mut SendEntry> {
        let front = self.queue.front()?.seq;
        let i = usize::try_from(seq.checked_sub(front)?).ok()?;
        self.queue.get_mut(i)
    }

    fn post(&mut self, req: ReqId, size: u64) {
        if self.phase == SendPhase::Failed {
            self.out.push_back(SendAction::FailRequest { req });
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let posted = (self.phase == SendPhase::Up).then_some(self.epoch);
        if let Some(epoch) = posted {
            self.out.push_back(SendAction::Post { epoch, seq, req, size });
        }
        self.queue.push_back(SendEntry {
            seq,
            req,
            size,
            posted,
            inner_done: false,
            copied: false,
            completed: false,
        });
    }

    /// The inner comm of the current epoch is lost: close it, tell the receiver, wait.
    fn lose_epoch(&mut self, now: Nanos, cause: Cause) {
        self.out.push_back(SendAction::CloseInner { epoch: self.epoch });
        self.phase = SendPhase::WaitNewInner;
        begin(&mut self.rec, &mut self.stats, now, cause);
        if !self.cfg.enabled() {
            return self.fail(now, GiveUp::Disabled, true);
        }
        self.out
            .push_back(SendAction::SendControl(Control::Recover { epoch: self.epoch }));
    }

    fn new_inner(&mut self, now: Nanos, epoch: Epoch, handle: Vec<u8>, completed: Seq) {
        if self.phase == SendPhase::Failed || epoch <= self.epoch {
            return; // stale: an inner comm this side already used or gave up
        }
        self.ack(now, completed);
        if self.phase == SendPhase::Failed {
            return;
        }
        match self.phase {
            SendPhase::Up => {
                // The receiver noticed a failure first.
                self.out.push_back(SendAction::CloseInner { epoch: self.epoch });
                self.phase = SendPhase::WaitNewInner;
                begin(&mut self.rec, &mut self.stats, now, Cause::PeerReplaced);
                if !self.cfg.enabled() {
                    return self.fail(now, GiveUp::Disabled, true);
                }
            }
            SendPhase::Connecting => {
                // A newer inner comm replaces the one being connected to.
                self.out.push_back(SendAction::CloseInner { epoch: self.epoch });
            }
            SendPhase::WaitNewInner | SendPhase::Failed => {}
        }
        let rec = self.rec.get_or_insert(Recovery {
            since: now,
            attempts: 0,
            cause: Cause::PeerReplaced,
            last: None,
        });
        rec.attempts += 1;
        self.stats.attempts += 1;
        self.epoch = epoch;
        self.phase = SendPhase::WaitNewInner;
        if rec.attempts > self.cfg.attempts {
            return self.fail(now, GiveUp::Attempts, true);
        }
        self.phase = SendPhase::Connecting;
        self.out.push_back(SendAction::Connect { epoch, handle });
    }

    /// Connected to the new inner comm: register again, replay, then post what waited.
    fn resume(&mut self, now: Nanos) {
        // Sends acknowledged while their inner comm died are complete now: release them first.
        self.phase = SendPhase::WaitNewInner;
        self.progress();
        self.phase = SendPhase::Up;
        let epoch = self.epoch;
        self.out.push_back(SendAction::ReRegister { epoch });
        let mut replayed = 0;
        for e in self.queue.iter_mut().filter(|e| e.seq >= self.acked) {
            let again = e.posted.is_some();
            e.posted = Some(epoch);
            e.inner_done = false;
            let (seq, req, size) = (e.seq, e.req, e.size);
            if again {
                let source = if e.copied { Source::Copy } else { Source::Nccl };
                replayed += 1;
                self.stats.replayed_bytes += size;
                self.out.push_back(SendAction::Replay {
                    epoch,
                    seq,
                    req,
                    size,
                    source,
                });
            } else {
                self.out.push_back(SendAction::Post { epoch, seq, req, size });
            }
        }
        self.stats.replayed += replayed;
        if let Some(rec) = self.rec.take() {
            let elapsed_ns = now.saturating_sub(rec.since);
            self.stats.recoveries += 1;
            self.stats.last_recovery_ns = Some(elapsed_ns);
            self.stats.total_recovery_ns += elapsed_ns;
            self.out.push_back(SendAction::Recovered {
                epoch,
                replayed,
                cause: rec.last.unwrap_or(rec.cause),
                elapsed_ns,
            });
        }
    }

    fn ack(&mut self, now: Nanos, completed: Seq) {
        if completed > self.next_seq {
            return self.fail(
                now,
                GiveUp::Protocol(format!(
                    "acknowledged {completed} sends, only {} were posted",
                    self.next_seq
                )),
                true,
            );
        }
        self.acked = self.acked.max(completed);
    }

    /// Completes what can be completed and releases what is acknowledged.
    ///
    /// Looks only at the entries that can change: those acknowledged since the last call (their
    /// copies are released; an acknowledged entry is never copied again) and those from the first
    /// one not yet complete (`completed` never goes back to false). So a call costs what it does,
    /// not the number of sends waiting for their acknowledgement.
    fn progress(&mut self) {
        if self.phase == SendPhase::Failed {
            return;
        }
        let Some(front) = self.queue.front().map(|e| e.seq) else {
            return;
        };
        let index = |seq: Seq| usize::try_from(seq.saturating_sub(front)).unwrap_or(usize::MAX);
        let end = self.queue.len();
        for i in index(self.released_to)..index(self.acked).min(end) {
            let e = &mut self.queue[i];
            if e.copied {
                e.copied = false;
                self.ring_used -= e.size;
                self.out.push_back(SendAction::ReleaseCopy { seq: e.seq });
            }
        }
        self.released_to = self.released_to.max(self.acked);
        let live = |e: &SendEntry, phase: SendPhase, epoch: Epoch| phase == SendPhase::Up && e.posted == Some(epoch);
        let mut open_from = None;
        for i in index(self.open_from).min(end)..end {
            let e = &mut self.queue[i];
            if e.completed {
                continue;
            }
            // NCCL's buffer is the inner transport's until its send is done or its comm closed.
            let inner_free = e.inner_done || !live(e, self.phase, self.epoch);
            if e.seq < self.acked && inner_free {
                e.completed = true;
                self.out.push_back(SendAction::Complete { req: e.req });
            } else if e.inner_done && e.size <= self.cfg.copy_max && self.ring_used + e.size <= self.cfg.copy_ring {
                e.copied = true;
                e.completed = true;
                self.ring_used += e.size;
                self.out.push_back(SendAction::CopyForReplay {
                    seq: e.seq,
                    req: e.req,
                    size: e.size,
                });
                self.out.push_back(SendAction::Complete { req: e.req });
            } else if open_from.is_none() {
                open_from = Some(e.seq);
            }
        }
        self.open_from = open_from.unwrap_or(self.next_seq);
        while self.queue.front().is_some_and(|e| e.completed && e.seq < self.acked) {
            self.queue.pop_front();
        }
    }

    fn fail(&mut self, now: Nanos, reason: GiveUp, tell_peer: bool) {
        if self.phase == SendPhase::Failed {
            return;
        }
        if matches!(self.phase, SendPhase::Up | SendPhase::Connecting) {
            self.out.push_back(SendAction::CloseInner { epoch: self.epoch });
        }
        self.phase = SendPhase::Failed;
        let failure = failure(&self.rec, reason, now, self.epoch);
        if tell_peer {
            self.out.push_back(SendAction::SendControl(Control::Abort {
                reason: failure.to_string(),
            }));
        }
        self.out.push_back(SendAction::Failed(failure));
        for e in std::mem::take(&mut self.queue) {
            if e.copied {
                self.out.push_back(SendAction::ReleaseCopy { seq: e.seq });
            }
            if !e.completed {
                self.out.push_back(SendAction::FailRequest { req: e.req });
            }
        }
        self.ring_used = 0;
    }
}

/// What happens to the receiving side.
/// Grouped buffers of one receive at most (NCCL's NCCL_NET_MAX_RECVS; the shim refuses more).
pub const MAX_GROUP: usize = 8;

/// The bytes received into each buffer of one grouped receive, held in place (no allocation
/// per receive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sizes {
    n: u8,
    v: [u64; MAX_GROUP],
}

impl Sizes {
    /// The first [`MAX_GROUP`] of `sizes`.
    pub fn new(sizes: &[u64]) -> Sizes {
        let n = sizes.len().min(MAX_GROUP);
        let mut v = [0; MAX_GROUP];
        v[..n].copy_from_slice(&sizes[..n]);
        Sizes { n: n as u8, v }
    }

    /// The sizes, one per buffer.
    pub fn as_slice(&self) -> &[u64] {
        &self.v[..usize::from(self.n)]
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RecvEvent {
    /// NCCL posted a receive (irecv) of `n` grouped buffers.
    Post {
        /// The engine's id for it.
        req: ReqId,
        /// Buffers in the group (1 or more).
        n: u32,
    },
    /// The inner receive of `req` on the inner comm of `epoch` is done: every buffer of the group
    /// holds its message, of these sizes.
    InnerDone {
        /// Epoch it was posted on.
        epoch: Epoch,
        /// The request.
        req: ReqId,
        /// Bytes received into each buffer.
        sizes: Sizes,
    },
    /// The inner comm of `epoch` (or the listen or accept for it) failed.
    InnerFailed {
        /// Which inner comm.
        epoch: Epoch,
        /// What happened.
        cause: Cause,
    },
    /// The inner comm of `epoch` refused a post or a test as an error of its caller: the
    /// connection fails for good (see [`GiveUp::Refused`]).
    InnerRefused {
        /// Which inner comm.
        epoch: Epoch,
        /// The inner transport's error.
        reason: String,
    },
    /// The listen of [`RecvAction::Listen`] is ready; the sender connects with `handle`.
    Listening {
        /// Its epoch.
        epoch: Epoch,
        /// The inner transport's handle.
        handle: Vec<u8>,
    },
    /// The sender's connection to the inner comm of `epoch` was accepted.
    Accepted {
        /// Which inner comm.
        epoch: Epoch,
    },
    /// A message from the sending side.
    Control(Control),
    /// The control channel reports the peer gone.
    PeerGone(String),
    /// Time passes (checks the deadline, sends an acknowledgement that is due).
    Tick,
}

/// What the receiving side asks the engine to do, in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RecvAction {
    /// Post NCCL's receive `req` on the inner comm of `epoch` (its first post).
    Post {
        /// Inner comm.
        epoch: Epoch,
        /// The request.
        req: ReqId,
    },
    /// Post the receive `req` again, into the same buffers, on the new inner comm of `epoch`.
    Repost {
        /// Inner comm.
        epoch: Epoch,
        /// The request.
        req: ReqId,
    },
    /// Report `req` complete to NCCL.
    Complete {
        /// The request.
        req: ReqId,
    },
    /// Report `req` failed to NCCL (after [`RecvAction::Failed`]).
    FailRequest {
        /// The request.
        req: ReqId,
    },
    /// Close the inner comm of `epoch` (and its listen comm).
    CloseInner {
        /// Which one.
        epoch: Epoch,
    },
    /// Listen for a new inner comm; report [`RecvEvent::Listening`], then accept and report
    /// [`RecvEvent::Accepted`] (or [`RecvEvent::InnerFailed`]).
    Listen {
        /// Its epoch.
        epoch: Epoch,
    },
    /// Register NCCL's memory registrations again on the new inner comm, before any post on it.
    ReRegister {
        /// The new inner comm.
        epoch: Epoch,
    },
    /// Send a control message to the sending side.
    SendControl(Control),
    /// Send `Control::Ack { completed }` to the sending side. `urgent`: the sender may be waiting
    /// for it (a send it could not copy, or its copy ring nearly full); otherwise it only frees
    /// replay copies, and may go out later, replaced by a later acknowledgement.
    SendAck {
        /// Sends complete in NCCL's buffers.
        completed: Seq,
        /// Whether the sender may be waiting for it.
        urgent: bool,
    },
    /// The connection recovered: log it (INFO) and count it.
    Recovered {
        /// The new inner comm.
        epoch: Epoch,
        /// Receives posted again on it.
        reposted: u64,
        /// What broke the previous one.
        cause: Cause,
        /// Time from the failure to now.
        elapsed_ns: Nanos,
    },
    /// The connection is lost: log a WARN; [`RecvAction::FailRequest`]s follow.
    Failed(Failure),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum RecvPhase {
    /// The inner comm of `epoch` carries the traffic.
    Up,
    /// Listening for the inner comm of `epoch`; its handle is not known yet.
    Listening,
    /// NewInner of `epoch` sent; waiting for the accept.
    Announced,
    /// Given up.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RecvEntry {
    req: ReqId,
    n: u32,
    first: Seq,
    posted: Option<Epoch>,
    /// Done on the inner comm; `true` if a message in it was larger than copy_max.
    done: Option<bool>,
}

/// The receiving side of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RecvSide {
    cfg: RecoveryConfig,
    epoch: Epoch,
    phase: RecvPhase,
    rec: Option<Recovery>,
    completed: Seq,
    next_seq: Seq,
    queue: VecDeque<RecvEntry>,
    acked_sent: Seq,
    unacked_bytes: u64,
    urgent: bool,
    stats: Stats,
    out: VecDeque<RecvAction>,
}

impl RecvSide {
    /// A receiving side whose inner comm of epoch 0 is accepted.
    pub fn new(cfg: RecoveryConfig) -> RecvSide {
        RecvSide {
            cfg,
            epoch: 0,
            phase: RecvPhase::Up,
            rec: None,
            completed: 0,
            next_seq: 0,
            queue: VecDeque::new(),
            acked_sent: 0,
            unacked_bytes: 0,
            urgent: false,
            stats: Stats::default(),
            out: VecDeque::new(),
        }
    }

    /// The next action for the engine, in order.
    pub fn poll_action(&mut self) -> Option<RecvAction> {
        self.out.pop_front()
    }

    /// The epoch of the inner comm in use (or listened for).
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    /// Whether a recovery is in progress.
    pub fn recovering(&self) -> bool {
        matches!(self.phase, RecvPhase::Listening | RecvPhase::Announced)
    }
    /// Whether the connection is lost for good.
    pub fn failed(&self) -> bool {
        self.phase == RecvPhase::Failed
    }
    /// Sends complete in NCCL's buffers (and reported complete).
    pub fn completed(&self) -> Seq {
        self.completed
    }
    /// Receives posted and not yet complete.
    pub fn outstanding(&self) -> usize {
        self.queue.len()
    }
    /// Whether the connection is up with no receive outstanding: this side leaves nothing on the
    /// inner comm (it may be pooled).
    pub fn quiet(&self) -> bool {
        self.phase == RecvPhase::Up && self.out.is_empty() && self.queue.is_empty()
    }
    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The acknowledgement the policy wants sent now, if any: after a receive with a message the
    /// sender cannot copy (larger than copy_max), after `ack_every` sends, or once half the
    /// sender's copy ring is unacknowledged. An engine that sends one on its own (piggybacked)
    /// calls [`RecvSide::ack_sent`].
    pub fn ack_due(&self) -> Option<Seq> {
        let pending = self.completed - self.acked_sent;
        let due = self.ack_urgent();
        (self.phase == RecvPhase::Up && pending > 0 && due).then_some(self.completed)
    }

    /// Whether the next acknowledgement should go out at once: the sender may be waiting for it
    /// (a send it could not copy, larger than copy_max, is complete, or half its copy ring, with
    /// no ring any part, holds copies of sends complete here), or `ack_every` sends wait for it
    /// (which bounds the copies the sender holds). Otherwise (the timer's) it only frees copies.
    pub fn ack_urgent(&self) -> bool {
        self.urgent
            || self.unacked_bytes.saturating_mul(2) >= self.cfg.copy_ring
            || self.completed - self.acked_sent >= u64::from(self.cfg.ack_every)
    }

    /// Records that an acknowledgement of `completed` sends went out.
    pub fn ack_sent(&mut self, completed: Seq) {
        if completed >= self.completed {
            self.unacked_bytes = 0;
            self.urgent = false;
        }
        self.acked_sent = self.acked_sent.max(completed.min(self.completed));
    }

    fn send_ack(&mut self) {
        let completed = self.completed;
        let urgent = self.ack_urgent();
        self.ack_sent(completed);
        self.out.push_back(RecvAction::SendAck { completed, urgent });
    }

    /// Feeds one event at time `now`; poll the actions it causes with [`RecvSide::poll_action`].
    pub fn handle(&mut self, now: Nanos, ev: RecvEvent) {
        match ev {
            RecvEvent::Post { req, n } => self.post(req, n),
            RecvEvent::InnerDone { epoch, req, sizes } => {
                if self.phase == RecvPhase::Up && epoch == self.epoch {
                    self.inner_done(req, epoch, sizes.as_slice());
                }
            }
            RecvEvent::InnerFailed { epoch, cause } => {
                if epoch == self.epoch && self.phase != RecvPhase::Failed {
                    self.restart(now, cause);
                }
            }
            RecvEvent::InnerRefused { epoch, reason } => {
                if epoch == self.epoch {
                    self.fail(now, GiveUp::Refused(reason), true);
                }
            }
            RecvEvent::Listening { epoch, handle } => {
                if self.phase == RecvPhase::Listening && epoch == self.epoch {
                    let completed = self.completed;
                    self.ack_sent(completed);
                    self.phase = RecvPhase::Announced;
                    self.out.push_back(RecvAction::SendControl(Control::NewInner {
                        epoch,
                        handle,
                        completed,
                    }));
                }
            }
            RecvEvent::Accepted { epoch } => {
                if self.phase == RecvPhase::Announced && epoch == self.epoch {
                    self.resume(now);
                }
            }
            RecvEvent::Control(Control::Recover { epoch }) => {
                if epoch == self.epoch && matches!(self.phase, RecvPhase::Up | RecvPhase::Announced) {
                    self.restart(now, Cause::PeerReported);
                }
            }
            RecvEvent::Control(Control::Abort { reason }) => self.fail(now, GiveUp::PeerAbort(reason), false),
            RecvEvent::Control(c @ (Control::Ack { .. } | Control::NewInner { .. })) => {
                self.fail(now, GiveUp::Protocol(format!("{c:?} sent to the receiving side")), true)
            }
            RecvEvent::PeerGone(detail) => self.fail(now, GiveUp::PeerGone(detail), false),
            RecvEvent::Tick => {
                if self.recovering() && expired(&self.cfg, &self.rec, now) {
                    self.fail(now, GiveUp::Deadline, true);
                } else if self.phase == RecvPhase::Up && self.completed > self.acked_sent {
                    self.send_ack();
                }
            }
        }
    }

    fn post(&mut self, req: ReqId, n: u32) {
        if self.phase == RecvPhase::Failed || n == 0 {
            self.out.push_back(RecvAction::FailRequest { req });
            return;
        }
        let posted = (self.phase == RecvPhase::Up).then_some(self.epoch);
        if let Some(epoch) = posted {
            self.out.push_back(RecvAction::Post { epoch, req });
        }
        self.queue.push_back(RecvEntry {
            req,
            n,
            first: self.next_seq,
            posted,
            done: None,
        });
        self.next_seq += u64::from(n);
    }

    fn inner_done(&mut self, req: ReqId, epoch: Epoch, sizes: &[u64]) {
        let copy_max = self.cfg.copy_max;
        let Some(e) = self
            .queue
            .iter_mut()
            .find(|e| e.req == req && e.posted == Some(epoch) && e.done.is_none())
        else {
            return;
        };
        let big = sizes.iter().any(|&s| s > copy_max);
        e.done = Some(big);
        // Completions reach NCCL in posting order, so that `completed` counts a prefix of the
        // sends: a later receive the inner comm finished first waits for the earlier ones.
        while let Some(&RecvEntry {
            req,
            n,
            done: Some(big),
            ..
        }) = self.queue.front()
        {
            self.queue.pop_front();
            self.completed += u64::from(n);
            self.urgent |= big;
            self.out.push_back(RecvAction::Complete { req });
        }
        self.unacked_bytes += sizes.iter().filter(|&&s| s <= copy_max).sum::<u64>();
        if self.ack_due().is_some() {
            self.send_ack();
        }
    }

    /// The inner comm of the current epoch is lost: close it and listen for the next one.
    fn restart(&mut self, now: Nanos, cause: Cause) {
        self.out.push_back(RecvAction::CloseInner { epoch: self.epoch });
        begin(&mut self.rec, &mut self.stats, now, cause);
        if !self.cfg.enabled() {
            return self.fail_with(now, GiveUp::Disabled, true, false);
        }
        self.epoch += 1;
        self.phase = RecvPhase::Listening;
        for e in self.queue.iter_mut() {
            e.done = None; // finished on the old inner comm, not reported: received again
        }
        let attempts = match self.rec.as_mut() {
            Some(r) => {
                r.attempts += 1;
                r.attempts
            }
            None => 1,
        };
        self.stats.attempts += 1;
        if attempts > self.cfg.attempts {
            return self.fail_with(now, GiveUp::Attempts, true, false);
        }
        self.out.push_back(RecvAction::Listen { epoch: self.epoch });
    }

    fn resume(&mut self, now: Nanos) {
        let epoch = self.epoch;
        self.phase = RecvPhase::Up;
        self.out.push_back(RecvAction::ReRegister { epoch });
        let mut reposted = 0;
        for e in self.queue.iter_mut() {
            let again = e.posted.is_some();
            e.posted = Some(epoch);
            if again {
                reposted += 1;
                self.out.push_back(RecvAction::Repost { epoch, req: e.req });
            } else {
                self.out.push_back(RecvAction::Post { epoch, req: e.req });
            }
        }
        self.stats.reposted += reposted;
        if let Some(rec) = self.rec.take() {
            let elapsed_ns = now.saturating_sub(rec.since);
            self.stats.recoveries += 1;
            self.stats.last_recovery_ns = Some(elapsed_ns);
            self.stats.total_recovery_ns += elapsed_ns;
            self.out.push_back(RecvAction::Recovered {
                epoch,
                reposted,
                cause: rec.last.unwrap_or(rec.cause),
                elapsed_ns,
            });
        }
    }

    fn fail(&mut self, now: Nanos, reason: GiveUp, tell_peer: bool) {
        self.fail_with(now, reason, tell_peer, true)
    }

    /// Gives up; `close`: the inner comm (Up) or the listen (recovering) of the epoch is open.
    fn fail_with(&mut self, now: Nanos, reason: GiveUp, tell_peer: bool, close: bool) {
        if self.phase == RecvPhase::Failed {
            return;
        }
        if close {
            self.out.push_back(RecvAction::CloseInner { epoch: self.epoch });
        }
        self.phase = RecvPhase::Failed;
        let failure = failure(&self.rec, reason, now, self.epoch);
        if tell_peer {
            self.out.push_back(RecvAction::SendControl(Control::Abort {
                reason: failure.to_string(),
            }));
        }
        self.out.push_back(RecvAction::Failed(failure));
        for e in std::mem::take(&mut self.queue) {
            self.out.push_back(RecvAction::FailRequest { req: e.req });
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use std::time::Duration;

    fn cfg() -> RecoveryConfig {
        RecoveryConfig {
            timeout: Duration::from_secs(10),
            attempts: 3,
            copy_max: 4,
            copy_ring: 8,
            ack_every: 4,
        }
    }

    fn drain_s(s: &mut SendSide) -> Vec<SendAction> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }
    fn drain_r(r: &mut RecvSide) -> Vec<RecvAction> {
        std::iter::from_fn(|| r.poll_action()).collect()
    }

    #[test]
    fn control_messages_round_trip_and_malformed_ones_are_errors() {
        let msgs = [
            Control::Recover { epoch: 7 },
            Control::NewInner {
                epoch: u32::MAX,
                handle: vec![1, 2, 3],
                completed: u64::MAX,
            },
            Control::Ack { completed: 42 },
            Control::Abort { reason: "gone".into() },
        ];
        for m in msgs {
            let b = m.encode();
            assert_eq!(Control::decode(&b).unwrap(), m);
            for cut in 0..b.len() {
                let e = Control::decode(&b[..cut]).unwrap_err();
                assert_eq!(e.kind(), crate::error::ErrorKind::Remote, "{e}");
            }
            let mut long = b.clone();
            long.push(0);
            assert!(Control::decode(&long).unwrap_err().to_string().contains("trailing"));
        }
        assert!(Control::decode(&[9, 1]).unwrap_err().to_string().contains("version 9"));
        assert!(Control::decode(&[1, 99])
            .unwrap_err()
            .to_string()
            .contains("unknown tag 99"));
    }

    #[test]
    fn a_refused_request_fails_the_connection_at_once_and_tells_the_peer() {
        let mut s = SendSide::new(cfg());
        s.handle(0, SendEvent::Post { req: 1, size: 4 });
        s.handle(0, SendEvent::Post { req: 2, size: 9 });
        drain_s(&mut s);
        s.handle(
            5,
            SendEvent::InnerRefused {
                epoch: 1,
                reason: "stale".into(),
            },
        );
        assert_eq!(drain_s(&mut s), vec![], "a refusal of another epoch is stale");
        s.handle(
            5,
            SendEvent::InnerRefused {
                epoch: 0,
                reason: "bad tag".into(),
            },
        );
        let a = drain_s(&mut s);
        assert!(s.failed());
        assert_eq!(a[0], SendAction::CloseInner { epoch: 0 });
        assert!(
            matches!(&a[1], SendAction::SendControl(Control::Abort { reason }) if reason.contains("bad tag")),
            "{a:?}"
        );
        assert!(
            matches!(&a[2], SendAction::Failed(f) if f.reason == GiveUp::Refused("bad tag".into()) && f.attempts == 0),
            "no recovery is tried: {a:?}"
        );
        assert_eq!(
            &a[3..],
            &[SendAction::FailRequest { req: 1 }, SendAction::FailRequest { req: 2 }]
        );

        let mut r = RecvSide::new(cfg());
        r.handle(0, RecvEvent::Post { req: 1, n: 1 });
        drain_r(&mut r);
        r.handle(
            1,
            RecvEvent::InnerRefused {
                epoch: 0,
                reason: "receive smaller than the message".into(),
            },
        );
        let a = drain_r(&mut r);
        assert_eq!(a[0], RecvAction::CloseInner { epoch: 0 });
        assert!(matches!(&a[1], RecvAction::SendControl(Control::Abort { .. })), "{a:?}");
        assert!(
            matches!(&a[2], RecvAction::Failed(f) if matches!(f.reason, GiveUp::Refused(_))),
            "{a:?}"
        );
        assert_eq!(&a[3..], &[RecvAction::FailRequest { req: 1 }]);
        assert!(!r.recovering());
    }

    #[test]
    fn small_sends_complete_on_copy_large_ones_on_ack_and_copies_are_released() {
        let mut s = SendSide::new(cfg());
        s.handle(0, SendEvent::Post { req: 10, size: 4 });
        s.handle(0, SendEvent::Post { req: 11, size: 5 });
        s.handle(0, SendEvent::Post { req: 12, size: 4 });
        s.handle(0, SendEvent::Post { req: 13, size: 1 });
        assert_eq!(drain_s(&mut s).len(), 4);
        for seq in 0..4 {
            s.handle(0, SendEvent::InnerDone { epoch: 0, seq });
        }
        // 10 and 12 fill the ring (8 bytes); 11 is too large; 13 finds no room.
        assert_eq!(
            drain_s(&mut s),
            vec![
                SendAction::CopyForReplay {
                    seq: 0,
                    req: 10,
                    size: 4
                },
                SendAction::Complete { req: 10 },
                SendAction::CopyForReplay {
                    seq: 2,
                    req: 12,
                    size: 4
                },
                SendAction::Complete { req: 12 },
            ]
        );
        assert_eq!(s.ring_used(), 8);
        s.handle(0, SendEvent::Control(Control::Ack { completed: 2 }));
        assert_eq!(
            drain_s(&mut s),
            vec![
                SendAction::ReleaseCopy { seq: 0 },
                SendAction::Complete { req: 11 },
                SendAction::CopyForReplay {
                    seq: 3,
                    req: 13,
                    size: 1
                },
                SendAction::Complete { req: 13 },
            ]
        );
        assert_eq!((s.ring_used(), s.outstanding()), (5, 2));
        s.handle(0, SendEvent::Control(Control::Ack { completed: 4 }));
        assert_eq!(
            drain_s(&mut s),
            vec![SendAction::ReleaseCopy { seq: 2 }, SendAction::ReleaseCopy { seq: 3 }]
        );
        assert_eq!((s.ring_used(), s.outstanding()), (0, 0));
        // An acknowledgement of sends never posted is a protocol violation.
        s.handle(1, SendEvent::Control(Control::Ack { completed: 5 }));
        let a = drain_s(&mut s);
        assert!(matches!(&a[1], SendAction::SendControl(Control::Abort { .. })), "{a:?}");
        assert!(
            matches!(
                &a[2],
                SendAction::Failed(Failure {
                    reason: GiveUp::Protocol(_),
                    ..
                })
            ),
            "{a:?}"
        );
    }

    #[test]
    fn an_acked_send_waits_for_its_live_inner_send_before_completing() {
        let mut s = SendSide::new(cfg());
        s.handle(0, SendEvent::Post { req: 1, size: 9 });
        drain_s(&mut s);
        s.handle(0, SendEvent::Control(Control::Ack { completed: 1 }));
        assert_eq!(drain_s(&mut s), vec![], "the inner transport still owns the buffer");
        s.handle(0, SendEvent::InnerDone { epoch: 0, seq: 0 });
        assert_eq!(drain_s(&mut s), vec![SendAction::Complete { req: 1 }]);
    }

    #[test]
    fn the_sender_recovers_replays_in_order_and_ignores_stale_events() {
        let mut s = SendSide::new(cfg());
        s.handle(0, SendEvent::Post { req: 1, size: 2 });
        s.handle(0, SendEvent::Post { req: 2, size: 9 });
        s.handle(0, SendEvent::InnerDone { epoch: 0, seq: 0 });
        drain_s(&mut s);
        s.handle(
            100,
            SendEvent::InnerFailed {
                epoch: 0,
                cause: Cause::Inner("reset".into()),
            },
        );
        assert_eq!(
            drain_s(&mut s),
            vec![
                SendAction::CloseInner { epoch: 0 },
                SendAction::SendControl(Control::Recover { epoch: 0 })
            ]
        );
        assert!(s.recovering());
        // Stale: a second failure report of epoch 0, a late completion of epoch 0.
        s.handle(
            110,
            SendEvent::InnerFailed {
                epoch: 0,
                cause: Cause::Inner("eof".into()),
            },
        );
        s.handle(110, SendEvent::InnerDone { epoch: 0, seq: 1 });
        s.handle(120, SendEvent::Post { req: 3, size: 1 });
        assert_eq!(drain_s(&mut s), vec![], "posts wait while recovering");
        s.handle(
            130,
            SendEvent::Control(Control::NewInner {
                epoch: 1,
                handle: vec![7],
                completed: 0,
            }),
        );
        assert_eq!(
            drain_s(&mut s),
            vec![SendAction::Connect {
                epoch: 1,
                handle: vec![7]
            }]
        );
        s.handle(
            135,
            SendEvent::Control(Control::NewInner {
                epoch: 1,
                handle: vec![8],
                completed: 0,
            }),
        );
        assert_eq!(
            drain_s(&mut s),
            vec![],
            "a NewInner not newer than the current epoch is stale"
        );
        s.handle(140, SendEvent::Connected { epoch: 1 });
        assert_eq!(
            drain_s(&mut s),
            vec![
                SendAction::ReRegister { epoch: 1 },
                SendAction::Replay {
                    epoch: 1,
                    seq: 0,
                    req: 1,
                    size: 2,
                    source: Source::Copy
                },
                SendAction::Replay {
                    epoch: 1,
                    seq: 1,
                    req: 2,
                    size: 9,
                    source: Source::Nccl
                },
                SendAction::Post {
                    epoch: 1,
                    seq: 2,
                    req: 3,
                    size: 1
                },
                SendAction::Recovered {
                    epoch: 1,
                    replayed: 2,
                    cause: Cause::Inner("reset".into()),
                    elapsed_ns: 40
                },
            ]
        );
        let st = s.stats();
        assert_eq!(
            (st.recoveries, st.replayed, st.replayed_bytes, st.attempts),
            (1, 2, 11, 1)
        );
        assert_eq!(st.last_recovery_ns, Some(40));
    }

    #[test]
    fn the_receiver_completes_in_order_acks_by_policy_and_reposts_after_recovery() {
        let mut r = RecvSide::new(cfg());
        r.handle(0, RecvEvent::Post { req: 1, n: 2 });
        r.handle(0, RecvEvent::Post { req: 2, n: 1 });
        r.handle(0, RecvEvent::Post { req: 3, n: 1 });
        assert_eq!(drain_r(&mut r).len(), 3);
        // req 2 finishes first: held until req 1 completes.
        r.handle(
            0,
            RecvEvent::InnerDone {
                epoch: 0,
                req: 2,
                sizes: Sizes::new(&[1]),
            },
        );
        assert_eq!(drain_r(&mut r), vec![]);
        r.handle(
            0,
            RecvEvent::InnerDone {
                epoch: 0,
                req: 1,
                sizes: Sizes::new(&[1, 1]),
            },
        );
        assert_eq!(
            drain_r(&mut r),
            vec![RecvAction::Complete { req: 1 }, RecvAction::Complete { req: 2 }]
        );
        assert_eq!(r.completed(), 3);
        assert_eq!(r.ack_due(), None, "3 small sends: below ack_every and half the ring");
        r.handle(1, RecvEvent::Tick);
        assert_eq!(
            drain_r(&mut r),
            vec![RecvAction::SendAck {
                completed: 3,
                urgent: false
            }]
        );
        r.handle(2, RecvEvent::Control(Control::Recover { epoch: 0 }));
        assert_eq!(
            drain_r(&mut r),
            vec![RecvAction::CloseInner { epoch: 0 }, RecvAction::Listen { epoch: 1 }]
        );
        r.handle(3, RecvEvent::Control(Control::Recover { epoch: 0 }));
        r.handle(
            3,
            RecvEvent::InnerDone {
                epoch: 0,
                req: 3,
                sizes: Sizes::new(&[9]),
            },
        );
        r.handle(3, RecvEvent::Post { req: 4, n: 1 });
        assert_eq!(drain_r(&mut r), vec![], "stale events ignored, posts wait");
        r.handle(
            4,
            RecvEvent::Listening {
                epoch: 1,
                handle: vec![5],
            },
        );
        assert_eq!(
            drain_r(&mut r),
            vec![RecvAction::SendControl(Control::NewInner {
                epoch: 1,
                handle: vec![5],
                completed: 3
            })]
        );
        r.handle(5, RecvEvent::Accepted { epoch: 1 });
        let a = drain_r(&mut r);
        assert_eq!(
            &a[..3],
            &[
                RecvAction::ReRegister { epoch: 1 },
                RecvAction::Repost { epoch: 1, req: 3 },
                RecvAction::Post { epoch: 1, req: 4 }
            ]
        );
        // A message larger than copy_max is acknowledged at once.
        r.handle(
            6,
            RecvEvent::InnerDone {
                epoch: 1,
                req: 3,
                sizes: Sizes::new(&[9]),
            },
        );
        assert_eq!(
            drain_r(&mut r),
            vec![
                RecvAction::Complete { req: 3 },
                RecvAction::SendAck {
                    completed: 4,
                    urgent: true
                }
            ]
        );
    }

    #[test]
    fn deadline_attempts_and_peer_loss_fail_everything_with_a_useful_error() {
        // The deadline, checked on ticks.
        let mut r = RecvSide::new(cfg());
        r.handle(0, RecvEvent::Post { req: 1, n: 1 });
        r.handle(
            1_000,
            RecvEvent::InnerFailed {
                epoch: 0,
                cause: Cause::Inner("keepalive timeout".into()),
            },
        );
        drain_r(&mut r);
        r.handle(1_000 + 9_999_999_999, RecvEvent::Tick);
        assert_eq!(drain_r(&mut r), vec![]);
        r.handle(1_000 + 10_000_000_000, RecvEvent::Tick);
        let a = drain_r(&mut r);
        let f = match &a[..] {
            [RecvAction::CloseInner { epoch: 1 }, RecvAction::SendControl(Control::Abort { .. }), RecvAction::Failed(f), RecvAction::FailRequest { req: 1 }] => {
                f.clone()
            }
            _ => panic!("{a:?}"),
        };
        assert_eq!(
            (f.reason.clone(), f.attempts, f.elapsed_ns),
            (GiveUp::Deadline, 1, 10_000_000_000)
        );
        let e = f.to_error("test", "10.0.0.2:4000").to_string();
        for want in [
            "test: connection to 10.0.0.2:4000 lost",
            "keepalive timeout",
            "NCCL_TCPXSHIM_RECOVERY_TIMEOUT",
            "tried 1",
        ] {
            assert!(e.contains(want), "{want:?} not in {e}");
        }
        assert_eq!(
            f.to_error("test", "p").code(),
            crate::ffi::ncclResult_t::ncclRemoteError
        );
        r.handle(2, RecvEvent::Post { req: 2, n: 1 });
        assert_eq!(drain_r(&mut r), vec![RecvAction::FailRequest { req: 2 }]);

        // Attempts: each failed listen uses one.
        let mut r = RecvSide::new(cfg());
        for epoch in 0..3 {
            r.handle(
                0,
                RecvEvent::InnerFailed {
                    epoch,
                    cause: Cause::Listen("EADDRINUSE".into()),
                },
            );
        }
        assert!(!r.failed());
        r.handle(
            0,
            RecvEvent::InnerFailed {
                epoch: 3,
                cause: Cause::Listen("EADDRINUSE".into()),
            },
        );
        assert!(r.failed());
        let a = drain_r(&mut r);
        assert!(
            a.iter().any(|a| matches!(
                a,
                RecvAction::Failed(Failure {
                    reason: GiveUp::Attempts,
                    attempts: 4,
                    ..
                })
            )),
            "{a:?}"
        );

        // The peer gone fails at once, without waiting for the deadline.
        let mut s = SendSide::new(cfg());
        s.handle(0, SendEvent::Post { req: 1, size: 1 });
        drain_s(&mut s);
        s.handle(5, SendEvent::PeerGone("control channel closed".into()));
        let a = drain_s(&mut s);
        assert!(
            matches!(
                &a[1],
                SendAction::Failed(Failure {
                    reason: GiveUp::PeerGone(_),
                    ..
                })
            ),
            "{a:?}"
        );
        assert_eq!(a.last(), Some(&SendAction::FailRequest { req: 1 }));

        // Recovery off: the first failure is final.
        let mut s = SendSide::new(RecoveryConfig {
            timeout: Duration::ZERO,
            ..cfg()
        });
        s.handle(0, SendEvent::Post { req: 1, size: 1 });
        s.handle(
            0,
            SendEvent::InnerFailed {
                epoch: 0,
                cause: Cause::Inner("reset".into()),
            },
        );
        assert!(s.failed());
        let a = drain_s(&mut s);
        assert!(
            a.iter().any(|a| matches!(
                a,
                SendAction::Failed(Failure {
                    reason: GiveUp::Disabled,
                    ..
                })
            )),
            "{a:?}"
        );
    }
}
