//! The recovery protocol against a model of everything around it, on every schedule.
//!
//! The model: NCCL on both sides (posting sends and grouped receives, testing them, reusing a
//! send buffer as soon as its completion is reported), one inner link per epoch (a FIFO of the
//! messages in flight; a break drops what was not delivered yet and fails the pending operations
//! of both ends, each end noticing at a time of its own), the engine's replay copies, and the
//! control channel (a FIFO each way, delivered at any time relative to the data). Every step of a
//! schedule is a choice among what can happen next; [`explore`] follows every choice from every
//! state, depth first, and checks the invariants after each step and at each end:
//!
//! - the receiver's buffers hold exactly the bytes sent, in order, when a receive completes;
//! - every NCCL request completes (or fails) exactly once;
//! - no send completes before its data is complete at the receiver or copied for replay, and
//!   never while the inner transport still owns its buffer;
//! - the replay copies never exceed the copy ring;
//! - every schedule ends with everything complete and both sides on one epoch (no deadlock),
//!   unless the deadline passed, and then with both sides failed and no request left pending.
//!
//! States are remembered by a hash of the whole model, so a state reached by many schedules is
//! explored once; the number of schedules (paths from the start to an end) is counted through
//! the memo and checked against a plain enumeration without it.

use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::Duration;

const T0: Nanos = 1_000;

#[derive(Clone, Debug)]
struct Scenario {
    /// Size of each send, in order.
    sizes: Vec<u64>,
    /// Buffers of each grouped receive, in order (they add up to the number of sends).
    groups: Vec<u32>,
    /// Breaks of an inner link the schedule may choose.
    breaks: u32,
    /// Whether the schedule may let the deadline pass during a recovery.
    deadline: bool,
    cfg: RecoveryConfig,
}

fn cfg(copy_max: u64, copy_ring: u64, ack_every: u32) -> RecoveryConfig {
    RecoveryConfig {
        timeout: Duration::from_secs(5),
        attempts: 20,
        copy_max,
        copy_ring,
        ack_every,
    }
}

impl Scenario {
    fn new(sizes: &[u64], groups: &[u32], breaks: u32, deadline: bool, cfg: RecoveryConfig) -> Scenario {
        assert_eq!(
            groups.iter().sum::<u32>() as usize,
            sizes.len(),
            "groups cover the sends"
        );
        Scenario {
            sizes: sizes.to_vec(),
            groups: groups.to_vec(),
            breaks,
            deadline,
            cfg,
        }
    }
    fn first_of(&self, group: usize) -> u64 {
        self.groups[..group].iter().map(|&n| u64::from(n)).sum()
    }
}

/// Message `i`'s bytes: its first byte is unique to it.
fn payload(i: usize, size: u64) -> Vec<u8> {
    (0..size)
        .map(|j| (i as u8 + 1).wrapping_add((j as u8).wrapping_mul(41)))
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum LinkState {
    Listening,
    Up,
    Down,
}

/// The inner comm of one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Link {
    state: LinkState,
    /// Sent and not yet delivered: (seq the sender gave it, bytes).
    inflight: VecDeque<(Seq, Vec<u8>)>,
    /// Inner sends whose completion the sender has not been told.
    send_posts: VecDeque<Seq>,
    /// Inner receives posted: (request, sizes received so far).
    recv_posts: VecDeque<(ReqId, Vec<u64>)>,
    /// Inner receives done whose completion the receiver has not been told (in any order).
    recv_done: Vec<(ReqId, Vec<u64>)>,
    connected_pending: bool,
    accepted_pending: bool,
    /// A failure the sending (receiving) side has not noticed yet.
    fail_s: bool,
    fail_r: bool,
    closed_s: bool,
    closed_r: bool,
}

impl Link {
    fn new(state: LinkState) -> Link {
        Link {
            state,
            inflight: VecDeque::new(),
            send_posts: VecDeque::new(),
            recv_posts: VecDeque::new(),
            recv_done: Vec::new(),
            connected_pending: false,
            accepted_pending: false,
            fail_s: false,
            fail_r: false,
            closed_s: false,
            closed_r: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Req {
    Unposted,
    Pending,
    Done,
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Choice {
    PostSend,
    PostRecv,
    Deliver(usize),
    SendDone(usize),
    RecvDone(usize, usize),
    Break(usize),
    NotifyS(usize),
    NotifyR(usize),
    Connected(usize),
    Accepted(usize),
    CtrlToR,
    CtrlToS,
    Deadline,
}

/// How often each kind of situation was met (over distinct states), so a test can check that
/// the exploration reached them.
#[derive(Clone, Debug, Default)]
struct Coverage {
    sender_noticed_first: u64,
    receiver_noticed_first: u64,
    stale_notices: u64,
    posts_while_recovering: u64,
    replays_from_copy: u64,
    replays_from_nccl: u64,
    completions_by_copy: u64,
    completions_by_ack: u64,
    recoveries: u64,
    deadline_failures: u64,
    refused_connects: u64,
    max_epoch: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct World {
    s: SendSide,
    r: RecvSide,
    links: Vec<Link>,
    to_r: VecDeque<Control>,
    to_s: VecDeque<Control>,
    sends: Vec<Req>,
    recvs: Vec<Req>,
    /// NCCL's send buffers; overwritten once their completion is reported.
    send_bufs: Vec<Vec<u8>>,
    /// NCCL's receive buffers, per group and slot.
    recv_bufs: Vec<Vec<Vec<u8>>>,
    copies: BTreeMap<Seq, Vec<u8>>,
    copy_bytes: u64,
    /// Sends complete at the receiver, as NCCL there was told.
    delivered: u64,
    breaks_left: u32,
    now: Nanos,
    deadline_used: bool,
    s_reg: Epoch,
    r_reg: Epoch,
    s_failed: bool,
    r_failed: bool,
}

type Check = std::result::Result<(), String>;

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Check {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

impl World {
    fn new(sc: &Scenario) -> World {
        World {
            s: SendSide::new(sc.cfg.clone()),
            r: RecvSide::new(sc.cfg.clone()),
            links: vec![Link::new(LinkState::Up)],
            to_r: VecDeque::new(),
            to_s: VecDeque::new(),
            sends: vec![Req::Unposted; sc.sizes.len()],
            recvs: vec![Req::Unposted; sc.groups.len()],
            send_bufs: sc.sizes.iter().enumerate().map(|(i, &n)| payload(i, n)).collect(),
            recv_bufs: sc.groups.iter().map(|&n| vec![Vec::new(); n as usize]).collect(),
            copies: BTreeMap::new(),
            copy_bytes: 0,
            delivered: 0,
            breaks_left: sc.breaks,
            now: T0,
            deadline_used: false,
            s_reg: 0,
            r_reg: 0,
            s_failed: false,
            r_failed: false,
        }
    }

    fn key(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }

    fn enabled(&self, sc: &Scenario) -> Vec<Choice> {
        let mut c = Vec::new();
        if self.sends.contains(&Req::Unposted) {
            c.push(Choice::PostSend);
        }
        if self.recvs.contains(&Req::Unposted) {
            c.push(Choice::PostRecv);
        }
        for (k, l) in self.links.iter().enumerate() {
            let up = l.state == LinkState::Up;
            if up && !l.inflight.is_empty() && !l.recv_posts.is_empty() {
                c.push(Choice::Deliver(k));
            }
            if !l.send_posts.is_empty() {
                c.push(Choice::SendDone(k)); // on a broken or closed link too: a late report
            }
            for i in 0..l.recv_done.len() {
                c.push(Choice::RecvDone(k, i));
            }
            if l.state != LinkState::Down && self.breaks_left > 0 {
                c.push(Choice::Break(k)); // of a listen too: the sender's connect is refused
            }
            if l.fail_s {
                c.push(Choice::NotifyS(k));
            }
            if l.fail_r {
                c.push(Choice::NotifyR(k));
            }
            if l.connected_pending {
                c.push(Choice::Connected(k));
            }
            if l.accepted_pending {
                c.push(Choice::Accepted(k));
            }
        }
        if !self.to_r.is_empty() {
            c.push(Choice::CtrlToR);
        }
        if !self.to_s.is_empty() {
            c.push(Choice::CtrlToS);
        }
        if sc.deadline && !self.deadline_used && (self.s.recovering() || self.r.recovering()) {
            c.push(Choice::Deadline);
        }
        c
    }

    fn step(&mut self, sc: &Scenario, choice: Choice, cov: &mut Coverage) -> Check {
        match choice {
            Choice::PostSend => {
                let i = self.sends.iter().position(|&r| r == Req::Unposted).unwrap_or(0);
                self.sends[i] = Req::Pending;
                cov.posts_while_recovering += u64::from(self.s.recovering());
                self.send(
                    sc,
                    SendEvent::Post {
                        req: i as ReqId,
                        size: sc.sizes[i],
                    },
                    cov,
                )?;
            }
            Choice::PostRecv => {
                let g = self.recvs.iter().position(|&r| r == Req::Unposted).unwrap_or(0);
                self.recvs[g] = Req::Pending;
                cov.posts_while_recovering += u64::from(self.r.recovering());
                self.recv(
                    sc,
                    RecvEvent::Post {
                        req: g as ReqId,
                        n: sc.groups[g],
                    },
                    cov,
                )?;
            }
            Choice::Deliver(k) => {
                let l = &mut self.links[k];
                let (_, bytes) = l.inflight.pop_front().ok_or("nothing in flight")?;
                let (req, got) = l.recv_posts.front_mut().ok_or("no receive posted")?;
                let (req, slot) = (*req, got.len());
                got.push(bytes.len() as u64);
                let n = sc.groups[req as usize] as usize;
                let done = (got.len() == n).then(|| got.clone());
                let cap = sc.sizes.iter().copied().max().unwrap_or(0) as usize;
                ensure(bytes.len() <= cap, || {
                    format!("a {}-byte message truncated", bytes.len())
                })?;
                self.recv_bufs[req as usize][slot] = bytes;
                if let Some(sizes) = done {
                    let l = &mut self.links[k];
                    l.recv_posts.pop_front();
                    l.recv_done.push((req, sizes));
                }
            }
            Choice::RecvDone(k, i) => {
                let (req, sizes) = self.links[k].recv_done.remove(i);
                cov.stale_notices += u64::from(self.r.epoch() != k as Epoch);
                self.recv(
                    sc,
                    RecvEvent::InnerDone {
                        epoch: k as Epoch,
                        req,
                        sizes: Sizes::new(&sizes),
                    },
                    cov,
                )?;
            }
            Choice::SendDone(k) => {
                let seq = self.links[k].send_posts.pop_front().ok_or("no send posted")?;
                cov.stale_notices += u64::from(self.s.epoch() != k as Epoch);
                self.send(sc, SendEvent::InnerDone { epoch: k as Epoch, seq }, cov)?;
            }
            Choice::Break(k) => {
                self.breaks_left -= 1;
                let l = &mut self.links[k];
                l.inflight.clear(); // inner sends already reported done stay so: their data is lost
                l.recv_posts.clear();
                l.connected_pending = false;
                l.accepted_pending = false;
                l.fail_s = !l.closed_s && l.state != LinkState::Listening;
                l.fail_r = !l.closed_r;
                l.state = LinkState::Down;
            }
            Choice::NotifyS(k) => {
                self.links[k].fail_s = false;
                if self.s.epoch() != k as Epoch || self.s.failed() {
                    cov.stale_notices += 1;
                } else if self.r.epoch() == k as Epoch && !self.r.recovering() {
                    cov.sender_noticed_first += 1;
                }
                let cause = Cause::Inner("connection reset by peer".into());
                self.send(
                    sc,
                    SendEvent::InnerFailed {
                        epoch: k as Epoch,
                        cause,
                    },
                    cov,
                )?;
            }
            Choice::NotifyR(k) => {
                self.links[k].fail_r = false;
                if self.r.epoch() != k as Epoch {
                    cov.stale_notices += 1;
                } else if self.s.epoch() == k as Epoch && !self.s.recovering() {
                    cov.receiver_noticed_first += 1;
                }
                let cause = Cause::Inner("end of stream".into());
                self.recv(
                    sc,
                    RecvEvent::InnerFailed {
                        epoch: k as Epoch,
                        cause,
                    },
                    cov,
                )?;
            }
            Choice::Connected(k) => {
                self.links[k].connected_pending = false;
                self.send(sc, SendEvent::Connected { epoch: k as Epoch }, cov)?;
            }
            Choice::Accepted(k) => {
                self.links[k].accepted_pending = false;
                self.recv(sc, RecvEvent::Accepted { epoch: k as Epoch }, cov)?;
            }
            Choice::CtrlToR => {
                let m = self.to_r.pop_front().ok_or("no message")?;
                self.recv(sc, RecvEvent::Control(m), cov)?;
            }
            Choice::CtrlToS => {
                let m = self.to_s.pop_front().ok_or("no message")?;
                self.send(sc, SendEvent::Control(m), cov)?;
            }
            Choice::Deadline => {
                self.deadline_used = true;
                self.now = T0 + sc.cfg.timeout.as_nanos() as u64 + 1;
                self.tick(sc, cov)?;
            }
        }
        self.check_always(sc)
    }

    fn tick(&mut self, sc: &Scenario, cov: &mut Coverage) -> Check {
        self.send(sc, SendEvent::Tick, cov)?;
        self.recv(sc, RecvEvent::Tick, cov)
    }

    fn check_always(&self, sc: &Scenario) -> Check {
        ensure(self.copy_bytes <= sc.cfg.copy_ring, || {
            format!("copies hold {} bytes, ring is {}", self.copy_bytes, sc.cfg.copy_ring)
        })?;
        ensure(self.s.ring_used() == self.copy_bytes, || {
            format!(
                "the sender counts {} copied bytes, the engine holds {}",
                self.s.ring_used(),
                self.copy_bytes
            )
        })
    }

    /// Closes the inner comm `k` from one side; the other side's pending operations fail.
    fn close(&mut self, k: usize, by_sender: bool) {
        let l = &mut self.links[k];
        // What the closing side's engine had already noticed (a failure, a completion) may still
        // reach its state machine: stale events.
        if by_sender {
            l.closed_s = true;
            l.connected_pending = false;
        } else {
            l.closed_r = true;
            l.accepted_pending = false;
        }
        match l.state {
            LinkState::Down => {}
            LinkState::Listening if by_sender => {}
            LinkState::Listening => l.state = LinkState::Down,
            LinkState::Up => {
                l.state = LinkState::Down;
                l.inflight.clear();
                l.recv_posts.clear();
                if by_sender {
                    l.fail_r = !l.closed_r;
                    l.accepted_pending = false;
                } else {
                    l.fail_s = !l.closed_s;
                    l.connected_pending = false;
                }
            }
        }
    }

    fn send(&mut self, sc: &Scenario, ev: SendEvent, cov: &mut Coverage) -> Check {
        self.s.handle(self.now, ev);
        while let Some(a) = self.s.poll_action() {
            self.send_action(sc, a, cov).map_err(|e| format!("sending side: {e}"))?;
        }
        Ok(())
    }

    fn send_action(&mut self, sc: &Scenario, a: SendAction, cov: &mut Coverage) -> Check {
        match a {
            SendAction::Post { epoch, seq, req, size }
            | SendAction::Replay {
                epoch, seq, req, size, ..
            } => {
                ensure(seq == req && size == sc.sizes[req as usize], || {
                    format!("{a:?} is not send {req}")
                })?;
                ensure(epoch == 0 || self.s_reg == epoch, || format!("{a:?} before ReRegister"))?;
                let bytes = match a {
                    SendAction::Replay {
                        source: Source::Copy, ..
                    } => {
                        cov.replays_from_copy += 1;
                        self.copies
                            .get(&seq)
                            .cloned()
                            .ok_or_else(|| format!("{a:?}: no copy"))?
                    }
                    SendAction::Replay { .. } => {
                        cov.replays_from_nccl += 1;
                        self.send_bufs[req as usize].clone()
                    }
                    _ => self.send_bufs[req as usize].clone(),
                };
                let l = &mut self.links[epoch as usize];
                ensure(!l.closed_s, || format!("{a:?} on a closed inner comm"))?;
                if l.state == LinkState::Up {
                    l.inflight.push_back((seq, bytes));
                    l.send_posts.push_back(seq);
                }
            }
            SendAction::CopyForReplay { seq, req, size } => {
                ensure(self.sends[req as usize] == Req::Pending, || {
                    format!("{a:?} of a finished send")
                })?;
                ensure(size <= sc.cfg.copy_max, || format!("{a:?} above copy_max"))?;
                let old = self.copies.insert(seq, self.send_bufs[req as usize].clone());
                ensure(old.is_none(), || format!("{a:?}: copied twice"))?;
                self.copy_bytes += size;
            }
            SendAction::ReleaseCopy { seq } => {
                let c = self.copies.remove(&seq).ok_or_else(|| format!("{a:?}: no copy"))?;
                self.copy_bytes -= c.len() as u64;
            }
            SendAction::Complete { req } => {
                let i = req as usize;
                ensure(self.sends[i] == Req::Pending, || format!("send {req} completed twice"))?;
                let safe = self.delivered > req || self.copies.contains_key(&req);
                ensure(safe, || {
                    format!("send {req} completed before it was received or copied")
                })?;
                let busy = self
                    .links
                    .iter()
                    .any(|l| l.state == LinkState::Up && l.send_posts.contains(&req));
                ensure(!busy, || {
                    format!("send {req} completed while the inner transport owns it")
                })?;
                if self.copies.contains_key(&req) {
                    cov.completions_by_copy += 1;
                } else {
                    cov.completions_by_ack += 1;
                }
                self.sends[i] = Req::Done;
                self.send_bufs[i].iter_mut().for_each(|b| *b = 0xEE); // NCCL reuses it
            }
            SendAction::FailRequest { req } => {
                let i = req as usize;
                ensure(self.sends[i] == Req::Pending, || {
                    format!("send {req} failed after it ended")
                })?;
                self.sends[i] = Req::Failed;
            }
            SendAction::CloseInner { epoch } => self.close(epoch as usize, true),
            SendAction::Connect { epoch, handle } => {
                ensure(handle == epoch.to_le_bytes(), || format!("{:?}: wrong handle", handle))?;
                let l = self
                    .links
                    .get_mut(epoch as usize)
                    .ok_or("connect to an epoch never listened")?;
                if l.state == LinkState::Listening && !l.closed_r {
                    l.state = LinkState::Up;
                    l.connected_pending = true;
                    l.accepted_pending = true;
                } else {
                    cov.refused_connects += 1;
                    l.fail_s = true;
                }
            }
            SendAction::ReRegister { epoch } => self.s_reg = epoch,
            SendAction::SendControl(c) => self.to_r.push_back(c),
            SendAction::Recovered { epoch, .. } => {
                cov.recoveries += 1;
                cov.max_epoch = cov.max_epoch.max(epoch);
            }
            SendAction::Failed(f) => {
                ensure(!self.s_failed, || "failed twice".into())?;
                cov.deadline_failures += u64::from(f.reason == GiveUp::Deadline);
                self.s_failed = true;
            }
        }
        Ok(())
    }

    fn recv(&mut self, sc: &Scenario, ev: RecvEvent, cov: &mut Coverage) -> Check {
        self.r.handle(self.now, ev);
        while let Some(a) = self.r.poll_action() {
            self.recv_action(sc, a, cov)
                .map_err(|e| format!("receiving side: {e}"))?;
        }
        Ok(())
    }

    fn recv_action(&mut self, sc: &Scenario, a: RecvAction, cov: &mut Coverage) -> Check {
        match a {
            RecvAction::Post { epoch, req } | RecvAction::Repost { epoch, req } => {
                ensure(epoch == 0 || self.r_reg == epoch, || format!("{a:?} before ReRegister"))?;
                for b in self.recv_bufs[req as usize].iter_mut() {
                    *b = vec![0xDD]; // whatever was there must be received again
                }
                let l = &mut self.links[epoch as usize];
                ensure(!l.closed_r, || format!("{a:?} on a closed inner comm"))?;
                if l.state == LinkState::Up {
                    l.recv_posts.push_back((req, Vec::new()));
                }
            }
            RecvAction::Complete { req } => {
                let g = req as usize;
                ensure(self.recvs[g] == Req::Pending, || {
                    format!("receive {req} completed twice")
                })?;
                let first = sc.first_of(g);
                ensure(self.delivered == first, || {
                    format!("receive {req} completed out of order")
                })?;
                for (j, got) in self.recv_bufs[g].iter().enumerate() {
                    let i = first as usize + j;
                    let want = payload(i, sc.sizes[i]);
                    ensure(*got == want, || {
                        format!("receive {req} buffer {j} holds {got:?}, sent {want:?}")
                    })?;
                }
                self.delivered += u64::from(sc.groups[g]);
                self.recvs[g] = Req::Done;
            }
            RecvAction::FailRequest { req } => {
                let g = req as usize;
                ensure(self.recvs[g] == Req::Pending, || {
                    format!("receive {req} failed after it ended")
                })?;
                self.recvs[g] = Req::Failed;
            }
            RecvAction::CloseInner { epoch } => self.close(epoch as usize, false),
            RecvAction::Listen { epoch } => {
                ensure(epoch as usize == self.links.len(), || {
                    format!("{a:?}: epochs not consecutive")
                })?;
                self.links.push(Link::new(LinkState::Listening));
                self.r.handle(
                    self.now,
                    RecvEvent::Listening {
                        epoch,
                        handle: epoch.to_le_bytes().to_vec(),
                    },
                );
            }
            RecvAction::ReRegister { epoch } => self.r_reg = epoch,
            RecvAction::SendControl(c) => self.to_s.push_back(c),
            RecvAction::SendAck { completed, .. } => self.to_s.push_back(Control::Ack { completed }),
            RecvAction::Recovered { .. } => {}
            RecvAction::Failed(f) => {
                ensure(!self.r_failed, || "failed twice".into())?;
                cov.deadline_failures += u64::from(f.reason == GiveUp::Deadline);
                self.r_failed = true;
            }
        }
        Ok(())
    }

    /// At the end of a schedule (nothing can happen, and a tick changes nothing).
    fn check_end(&self, sc: &Scenario) -> Check {
        let pending = |v: &[Req]| v.iter().any(|&r| r == Req::Pending || r == Req::Unposted);
        ensure(!pending(&self.sends) && !pending(&self.recvs), || {
            format!("deadlock: sends {:?}, receives {:?}", self.sends, self.recvs)
        })?;
        ensure(self.copies.is_empty(), || {
            format!("copies left: {:?}", self.copies.keys())
        })?;
        if self.deadline_used {
            ensure(self.s_failed && self.r_failed, || {
                "the deadline passed and a side did not fail".into()
            })
        } else {
            ensure(!self.s_failed && !self.r_failed, || {
                "failed without the deadline passing".into()
            })?;
            ensure(self.delivered == sc.sizes.len() as u64, || {
                "not everything delivered".into()
            })?;
            ensure(self.sends.iter().chain(&self.recvs).all(|&r| r == Req::Done), || {
                "a request failed".into()
            })?;
            ensure(
                self.s.outstanding() == 0 && self.r.outstanding() == 0 && self.s.epoch() == self.r.epoch(),
                || format!("sides disagree: epochs {} and {}", self.s.epoch(), self.r.epoch()),
            )
        }
    }
}

#[derive(Debug, Default)]
struct Explored {
    states: u64,
    transitions: u64,
    ends: u64,
    cov: Coverage,
}

/// Explores every schedule from `w`; returns the number of schedules (paths to an end).
/// `memo`: `None` enumerates every path without remembering states.
fn explore(
    sc: &Scenario,
    w: &World,
    memo: &mut Option<HashMap<u64, u128>>,
    ex: &mut Explored,
    depth: u32,
) -> std::result::Result<u128, String> {
    ensure(depth < 400, || "schedule longer than 400 steps".into())?;
    let key = w.key();
    if let Some(n) = memo.as_ref().and_then(|m| m.get(&key)) {
        return Ok(*n);
    }
    ex.states += 1;
    let choices = w.enabled(sc);
    let total = if choices.is_empty() {
        let mut next = w.clone();
        next.tick(sc, &mut ex.cov)?;
        next.check_always(sc)?;
        if next.key() == key {
            w.check_end(sc)?;
            ex.ends += 1;
            1
        } else {
            ex.transitions += 1;
            explore(sc, &next, memo, ex, depth + 1).map_err(|e| format!("Tick, {e}"))?
        }
    } else {
        let mut total = 0u128;
        for c in choices {
            let mut next = w.clone();
            ex.transitions += 1;
            next.step(sc, c, &mut ex.cov).map_err(|e| format!("{c:?}: {e}"))?;
            total += explore(sc, &next, memo, ex, depth + 1).map_err(|e| format!("{c:?}, {e}"))?;
        }
        total
    };
    if let Some(m) = memo.as_mut() {
        m.insert(key, total);
    }
    Ok(total)
}

fn explore_all(sc: &Scenario) -> (u128, Explored) {
    let mut ex = Explored::default();
    let mut memo = Some(HashMap::new());
    match explore(sc, &World::new(sc), &mut memo, &mut ex, 0) {
        Ok(n) => (n, ex),
        Err(e) => panic!("{sc:?}\nschedule: {e}"),
    }
}

fn run(sc: &Scenario, label: &str) -> (u128, Explored) {
    let t = std::time::Instant::now();
    let (n, ex) = explore_all(sc);
    println!(
        "{label}: {n} schedules, {} states, {} transitions, {} ends in {:.2?}",
        ex.states,
        ex.transitions,
        ex.ends,
        t.elapsed()
    );
    (n, ex)
}

#[test]
fn one_send_has_the_schedules_counted_by_hand() {
    // Post send (S), post receive (R), delivery (D, after S and R), the inner receive's
    // completion reported (RD, after D), the inner send's (SD, after S), the acknowledgement's
    // arrival (A, after RD). Acknowledging every receive: the orders of S, R, D, RD, A with S
    // and R before D (2), SD anywhere after S (5 or 4 places): 9.
    let (n, ex) = run(
        &Scenario::new(&[2], &[1], 0, false, cfg(4, 8, 1)),
        "1 small, ack every 1",
    );
    assert_eq!(
        (n, ex.cov.completions_by_copy + ex.cov.completions_by_ack > 0),
        (9, true)
    );
    // A large one is acknowledged at once too, and completes only by that acknowledgement.
    let (n, ex) = run(
        &Scenario::new(&[9], &[1], 0, false, cfg(4, 8, 8)),
        "1 large, ack every 8",
    );
    assert_eq!((n, ex.cov.completions_by_copy), (9, 0));
    // Batched acknowledgements: nothing is acknowledged until the tick at the end, after S, R, D,
    // RD and SD in any allowed order (4 + 3), and the send completes by its copy.
    let (n, ex) = run(
        &Scenario::new(&[2], &[1], 0, false, cfg(4, 8, 8)),
        "1 small, ack every 8",
    );
    assert_eq!((n, ex.cov.completions_by_ack), (7, 0));
}

#[test]
fn the_memo_counts_the_same_schedules_as_plain_enumeration() {
    for sc in [
        Scenario::new(&[2], &[1], 1, false, cfg(4, 8, 1)),
        Scenario::new(&[9, 2], &[2], 0, false, cfg(4, 2, 8)),
        Scenario::new(&[2], &[1], 1, true, cfg(4, 8, 1)),
    ] {
        let (memo, _) = run(&sc, "memo");
        let mut ex = Explored::default();
        let plain = explore(&sc, &World::new(&sc), &mut None, &mut ex, 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(memo, plain, "{sc:?}");
        assert_eq!(
            u128::from(ex.ends),
            plain,
            "without the memo every schedule reaches its own end"
        );
    }
}

#[test]
fn every_schedule_of_small_cases_with_up_to_two_breaks_recovers() {
    let t = std::time::Instant::now();
    let (mut total, mut states) = (0u128, 0u64);
    let mut cov = Coverage::default();
    // (sends, receive groups, most breaks, settings: copy_max, copy ring, ack_every)
    let cases: &[(&[u64], &[u32], u32, RecoveryConfig)] = &[
        (&[2], &[1], 2, cfg(4, 8, 1)),
        (&[9], &[1], 2, cfg(4, 8, 8)),
        (&[9, 2], &[2], 2, cfg(4, 8, 8)),
        (&[2, 9], &[1, 1], 1, cfg(4, 8, 1)),
        (&[3, 3], &[1, 1], 1, cfg(4, 3, 8)),
        (&[3, 9, 3], &[1, 2], 1, cfg(4, 6, 1)),
        (&[3, 9, 3, 2], &[1, 2, 1], 1, cfg(4, 6, 2)),
    ];
    for (sizes, groups, most, c) in cases {
        for breaks in 0..=*most {
            let sc = Scenario::new(sizes, groups, breaks, false, c.clone());
            let (n, ex) = run(&sc, &format!("{sizes:?} in {groups:?}, {breaks} breaks"));
            assert!(ex.ends > 0 && n >= u128::from(ex.ends), "{sc:?}");
            if breaks > 0 {
                assert!(
                    ex.cov.recoveries > 0 && ex.cov.replays_from_nccl > 0,
                    "{sc:?}: {:?}",
                    ex.cov
                );
            }
            total += n;
            states += ex.states;
            merge(&mut cov, &ex.cov);
        }
    }
    println!(
        "all: {total} schedules, {states} states in {:.2?}; {cov:?}",
        t.elapsed()
    );
    // Each situation the protocol must survive was met.
    let c = &cov;
    for (what, n) in [
        ("the sender noticing a break first", c.sender_noticed_first),
        ("the receiver noticing a break first", c.receiver_noticed_first),
        ("stale events", c.stale_notices),
        ("posts while recovering", c.posts_while_recovering),
        ("replays from a copy", c.replays_from_copy),
        ("replays from NCCL's buffer", c.replays_from_nccl),
        ("completions by copy", c.completions_by_copy),
        ("completions by acknowledgement", c.completions_by_ack),
        ("refused connects", c.refused_connects),
    ] {
        assert!(n > 0, "no schedule had {what}");
    }
    assert_eq!(
        (c.max_epoch, c.deadline_failures),
        (2, 0),
        "two recoveries in a row; no failure"
    );
    // The number of schedules of this model: it changes only when the model or the protocol's
    // choices do (a new choice point, a message more or less).
    assert_eq!(total, GOLDEN_SCHEDULES, "schedules explored");
}

/// Schedules of the cases above, as counted when they were written.
const GOLDEN_SCHEDULES: u128 = 6_584_887_067_953_974_076;

fn merge(a: &mut Coverage, b: &Coverage) {
    a.sender_noticed_first += b.sender_noticed_first;
    a.receiver_noticed_first += b.receiver_noticed_first;
    a.stale_notices += b.stale_notices;
    a.posts_while_recovering += b.posts_while_recovering;
    a.replays_from_copy += b.replays_from_copy;
    a.replays_from_nccl += b.replays_from_nccl;
    a.completions_by_copy += b.completions_by_copy;
    a.completions_by_ack += b.completions_by_ack;
    a.recoveries += b.recoveries;
    a.deadline_failures += b.deadline_failures;
    a.refused_connects += b.refused_connects;
    a.max_epoch = a.max_epoch.max(b.max_epoch);
}

#[test]
fn every_schedule_where_the_deadline_passes_during_a_recovery_fails_everything() {
    let t = std::time::Instant::now();
    let mut total = 0u128;
    let mut cov = Coverage::default();
    let cases: &[(&[u64], &[u32], u32, RecoveryConfig)] = &[
        (&[2], &[1], 1, cfg(4, 8, 1)),
        (&[2, 9], &[1, 1], 1, cfg(4, 8, 1)),
        (&[9, 2], &[2], 1, cfg(4, 2, 8)),
        (&[3, 9, 3], &[1, 2], 1, cfg(4, 6, 1)),
    ];
    for (sizes, groups, breaks, c) in cases {
        let sc = Scenario::new(sizes, groups, *breaks, true, c.clone());
        let (n, ex) = run(&sc, &format!("deadline, {sizes:?} in {groups:?}, {breaks} breaks"));
        assert!(
            ex.cov.deadline_failures > 0 && ex.cov.recoveries > 0,
            "{sc:?}: {:?}",
            ex.cov
        );
        total += n;
        merge(&mut cov, &ex.cov);
    }
    println!("all: {total} schedules in {:.2?}; {cov:?}", t.elapsed());
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let sizes = prop::collection::vec(prop_oneof![1u64..=4, 5u64..=12], 1..=10);
    (
        sizes,
        any::<u64>(),
        0u32..=4,
        any::<bool>(),
        0u64..=6,
        0u64..=16,
        1u32..=4,
    )
        .prop_map(|(sizes, mut split, breaks, deadline, copy_max, ring, ack)| {
            let mut groups = Vec::new();
            let mut left = sizes.len() as u32;
            while left > 0 {
                let n = (1 + (split % 3) as u32).min(left);
                split /= 3;
                groups.push(n);
                left -= n;
            }
            Scenario::new(&sizes, &groups, breaks, deadline, cfg(copy_max, ring, ack))
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn random_long_schedules_keep_every_invariant(
        sc in scenario(),
        picks in prop::collection::vec(any::<u32>(), 0..800),
    ) {
        let mut w = World::new(&sc);
        let mut cov = Coverage::default();
        let mut ended = false;
        for step in 0..10_000 {
            let choices = w.enabled(&sc);
            if choices.is_empty() {
                let before = w.key();
                w.tick(&sc, &mut cov).map_err(TestCaseError::fail)?;
                if w.key() == before {
                    w.check_end(&sc).map_err(TestCaseError::fail)?;
                    ended = true;
                    break;
                }
                continue;
            }
            let c = choices[picks.get(step).copied().unwrap_or(0) as usize % choices.len()];
            w.step(&sc, c, &mut cov).map_err(|e| TestCaseError::fail(format!("step {step}, {c:?}: {e}")))?;
        }
        prop_assert!(ended, "no end after 10000 steps");
    }

    #[test]
    fn control_messages_decode_what_they_encode_and_nothing_else_panics(
        epoch in any::<u32>(),
        completed in any::<u64>(),
        handle in prop::collection::vec(any::<u8>(), 0..200),
        junk in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        for m in [
            Control::Recover { epoch },
            Control::NewInner { epoch, handle: handle.clone(), completed },
            Control::Ack { completed },
            Control::Abort { reason: String::from_utf8_lossy(&handle).into_owned() },
        ] {
            prop_assert_eq!(Control::decode(&m.encode()).map_err(|e| TestCaseError::fail(e.to_string()))?, m);
        }
        if let Ok(m) = Control::decode(&junk) {
            prop_assert_eq!(m.encode(), junk);
        }
    }
}
