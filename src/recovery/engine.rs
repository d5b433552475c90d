//! The recovery engine: drives one comm's [`SendSide`] or [`RecvSide`] over the inner transport
//! and the control link to the peer.
//!
//! The engine owns the connection's current inner comm and its epoch, the inner requests of
//! NCCL's requests, the replay copies, the inner posts that got "try again", and the listen,
//! accept or connect of a recovery in progress. It never blocks: every NCCL call on the comm
//! (isend, irecv, test) makes a bounded amount of progress: it reads the control link, tests the
//! inner requests, retries pending posts, advances a listen, accept or connect, feeds the time to
//! the state machine and carries out the actions it asks for.
//!
//! Memory registrations NCCL makes on the comm are the engine's: NCCL's handle stands for an
//! entry of the engine's list, which holds the inner registration on the current inner comm and
//! is registered again on each new one.

use super::{
    Cause, Control, Epoch, Failure, RecoveryConfig, RecvAction, RecvEvent, RecvSide, ReqId, SendAction, SendEvent,
    SendSide, Seq, Sizes, Source, MAX_GROUP,
};
use crate::control::link::{Link, LinkState};
use crate::error::{Error, Result};
use crate::ffi::HANDLE_SIZE;
use crate::transport::{Opaque, Transport};
use std::collections::{HashSet, VecDeque};
use std::ffi::c_void;

/// The link message type that carries a [`Control`].
pub const MSG_CONTROL: u16 = 1;
/// The link message a parked engine sends (see [`Engine::park`]): its comm closed and the
/// connection waits in the pool. Its body is the count of messages the comm carried (8 bytes,
/// little-endian): sends posted (from the sender), sends received (from the receiver).
pub const MSG_CLOSED: u16 = 4;
/// Ticks (deadline checks, acknowledgements that wait for no count) at most this often: the
/// deadlines are seconds long, and an acknowledgement the policy does not ask for at once only
/// frees replay copies, so each tick that sends one costs the control link's thread a wake-up
/// for nothing urgent.
const TICK_NS: u64 = 10_000_000;
/// Inner requests tested per progress call at most.
const TESTS_PER_CALL: usize = 64;
/// Inner requests outstanding on one inner comm at most (NCCL's own limit, which inner
/// transports enforce): replays of copied sends come on top of NCCL's outstanding requests.
const MAX_INFLIGHT: usize = crate::ffi::NCCL_NET_MAX_REQUESTS as usize;
/// Control messages read per progress call at most.
const MSGS_PER_CALL: usize = 64;

/// One registration NCCL made on the comm, registered again on each new inner comm.
struct Reg {
    data: usize,
    size: usize,
    ptr_type: i32,
    dmabuf: Option<(u64, i32)>,
    inner: Option<Opaque>,
}

/// What a request has come to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Pending,
    Done,
    Failed,
}

struct SendReq {
    data: usize,
    size: i32,
    tag: i32,
    mr: Option<u64>,
    outcome: Outcome,
}

/// One irecv of `n` grouped buffers, held in place (no allocation per request).
struct RecvReq {
    n: usize,
    data: [usize; MAX_GROUP],
    sizes: [i32; MAX_GROUP],
    tags: [i32; MAX_GROUP],
    mrs: [Option<u64>; MAX_GROUP],
    got: [i32; MAX_GROUP],
    outcome: Outcome,
}

/// Values under ids handed out in increasing order (requests by id, copies by seq), in a ring
/// indexed by `id - base`: a lookup is an index, and the ring's memory is reused from one
/// request to the next.
struct Window<T> {
    base: u64,
    slots: VecDeque<Option<T>>,
}

impl<T> Window<T> {
    fn new() -> Window<T> {
        Window {
            base: 0,
            slots: VecDeque::new(),
        }
    }

    fn index(&self, id: u64) -> Option<usize> {
        let i = usize::try_from(id.checked_sub(self.base)?).ok()?;
        (i < self.slots.len()).then_some(i)
    }

    fn insert(&mut self, id: u64, v: T) {
        if self.slots.is_empty() {
            self.base = id;
        }
        while id < self.base {
            self.slots.push_front(None);
            self.base -= 1;
        }
        let i = (id - self.base) as usize;
        while self.slots.len() <= i {
            self.slots.push_back(None);
        }
        self.slots[i] = Some(v);
    }

    fn get(&self, id: u64) -> Option<&T> {
        self.index(id).and_then(|i| self.slots[i].as_ref())
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        self.index(id).and_then(|i| self.slots[i].as_mut())
    }

    fn remove(&mut self, id: u64) -> Option<T> {
        let v = self.index(id).and_then(|i| self.slots[i].take());
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
        v
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut T)> {
        let base = self.base;
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(move |(i, v)| v.as_mut().map(|v| (base + i as u64, v)))
    }
}

/// Copy buffers kept for reuse: at most this many bytes of them, none larger than
/// `SPARE_COPY_MAX`.
const SPARE_BYTES: usize = 1 << 20;
const SPARE_COPY_MAX: usize = 64 << 10;

/// A replay copy of one send, registered on an inner comm when a replay first needs it.
struct Copy {
    buf: Vec<u8>,
    len: usize,
    tag: i32,
    mr: Option<(Epoch, Opaque)>,
}

/// State shared by both directions.
struct Common {
    dev: i32,
    peer: String,
    link: Link,
    epoch: Epoch,
    comm: Option<Opaque>,
    /// Registrations by token - 1 (tokens start at 1: NCCL's handle is never NULL).
    regs: slab::Slab<Reg>,
    next_req: ReqId,
    /// When the engine started, on the metrics' clock (nanoseconds).
    origin: u64,
    /// Nanoseconds since `origin`, read at most once per test, and only when an event or a
    /// tick needs it (`now`): the protocol's deadlines are seconds long, and NCCL tests pending
    /// requests over and over.
    clock: std::cell::Cell<u64>,
    /// Whether `clock` was read in this test.
    fresh: std::cell::Cell<bool>,
    last_tick: u64,
    /// Tests so far (ticks are checked on every 16th).
    tests: u32,
    failure: Option<Failure>,
    /// The inner error that failed the connection for good, when it was its caller's.
    refused: Option<Error>,
    link_gone: bool,
    /// Recoveries completed (for the metrics' counter).
    pub recoveries: u64,
    /// Messages the connection carried before this engine (a pooled one reused).
    base: u64,
    /// The peer's comm closed with its connection parked, having carried this many messages.
    peer_closed: Option<u64>,
    /// The requests that can no longer complete because of that were failed.
    closed_failed: bool,
    /// Messages of other types read from the link (see `read_link`).
    stash: Vec<(u16, Vec<u8>)>,
}

/// What a parked engine leaves for the pool: see [`Engine::park`].
pub struct Parked {
    /// The open inner comm.
    pub comm: Opaque,
    /// The control link.
    pub link: Link,
    /// Messages the connection carried (sends posted; sends received).
    pub count: u64,
    /// Messages of the link that were not the engine's, and what the link still holds.
    pub stash: Vec<(u16, Vec<u8>)>,
}

impl Common {
    /// The time of the current test, read when first asked for (posts take the time of the
    /// last test: a post only queues).
    fn now(&self) -> u64 {
        if !self.fresh.get() {
            self.clock
                .set(crate::metrics::clock::now_ns().saturating_sub(self.origin));
            self.fresh.set(true);
        }
        self.clock.get()
    }

    /// A new test: the clock is read again when needed.
    fn refresh(&mut self) {
        self.fresh.set(false);
        self.tests = self.tests.wrapping_add(1);
    }

    fn send_control(&self, c: &Control) {
        if let Err(e) = self.link.send(MSG_CONTROL, &c.encode()) {
            log::warn!("recovery with {}: sending {c:?} failed: {e}", self.peer);
        }
    }

    /// Acknowledges `completed` sends: at once when the sender may be waiting for it, else
    /// queued for the control link's next round, where a later acknowledgement replaces it (so
    /// acknowledgements that only free replay copies wake no thread).
    fn send_ack(&self, completed: Seq, urgent: bool) {
        let body = Control::Ack { completed }.encode();
        let res = if urgent {
            self.link.send(MSG_CONTROL, &body)
        } else {
            self.link.send_lazy(MSG_CONTROL, &body)
        };
        if let Err(e) = res {
            log::warn!(
                "recovery with {}: acknowledging {completed} sends failed: {e}",
                self.peer
            );
        }
    }

    /// Registers every registration on the current inner comm.
    fn reregister(&mut self, inner: &dyn Transport) -> Result<()> {
        let Some(comm) = self.comm else { return Ok(()) };
        for (_, r) in self.regs.iter_mut() {
            r.inner = None;
            // SAFETY: `comm` is the open inner comm; NCCL keeps the buffer registered (it has not
            // deregistered it), so it is valid for `size` bytes.
            let m = unsafe {
                match r.dmabuf {
                    Some((off, fd)) => inner.reg_mr_dmabuf(comm, r.data as *mut c_void, r.size, r.ptr_type, off, fd),
                    None => inner.reg_mr(comm, r.data as *mut c_void, r.size, r.ptr_type),
                }
            }?;
            r.inner = Some(m);
        }
        Ok(())
    }

    /// The registration NCCL's handle `token` stands for.
    fn reg(&self, token: u64) -> Option<&Reg> {
        self.regs.get(usize::try_from(token).ok()?.checked_sub(1)?)
    }

    fn inner_mr(&self, token: Option<u64>) -> Option<Opaque> {
        token.and_then(|t| self.reg(t)).and_then(|r| r.inner)
    }

    /// The control messages waiting on the link, and whether the link is gone. `now`: a send
    /// waits for its acknowledgement, so the link's socket is read here when nothing is waiting
    /// (`Link::recv_now`) rather than left to the link's thread.
    fn read_link(&mut self, now: bool) -> (Vec<Control>, Option<String>) {
        let mut out = Vec::new();
        for i in 0..MSGS_PER_CALL {
            let m = if now && i == 0 {
                self.link.recv_now()
            } else {
                self.link.try_recv()
            };
            let Some((ty, body)) = m else { break };
            if ty == MSG_CLOSED {
                if let Ok(b) = <[u8; 8]>::try_from(body.as_slice()) {
                    self.peer_closed = Some(u64::from_le_bytes(b));
                }
                continue;
            }
            if ty != MSG_CONTROL {
                // Not the engine's: kept for whoever has the link next (a claim of the pool
                // that came before this comm closed), a few at most.
                if self.stash.len() < 4 {
                    self.stash.push((ty, body));
                }
                continue;
            }
            match Control::decode(&body) {
                Ok(c) => out.push(c),
                Err(e) => log::warn!("recovery with {}: undecodable control message: {e}", self.peer),
            }
        }
        let gone = match self.link.state() {
            LinkState::Gone(e) if !self.link_gone => {
                self.link_gone = true;
                Some(e.to_string())
            }
            _ => None,
        };
        (out, gone)
    }

    fn error(&self, call: &str) -> Error {
        if let Some(e) = &self.refused {
            return e.clone().context(format!("{call} with {}", self.peer));
        }
        match &self.failure {
            Some(f) => f.to_error(call, &self.peer),
            None => Error::remote(format!("{call}: connection to {} lost", self.peer)),
        }
    }
}

/// The engine of one send comm.
pub struct SendEngine {
    c: Common,
    side: SendSide,
    reqs: Window<SendReq>,
    /// Inner requests by seq, with their epoch.
    inflight: VecDeque<(Seq, ReqId, Epoch, Opaque)>,
    /// Posts that got "try again": (seq, req, from the copy).
    pending: VecDeque<(Seq, ReqId, bool)>,
    /// Replay copies by seq, with the send's tag.
    copies: Window<Copy>,
    /// Buffers of freed small copies, reused by the next copies, and their bytes.
    spare: Vec<Vec<u8>>,
    spare_bytes: usize,
    /// Copies released while an inner send may still read them: freed once it is done.
    retired: Vec<(Seq, Copy)>,
    connecting: Option<(Epoch, Box<[u8; HANDLE_SIZE]>)>,
}

/// The engine of one receive comm.
pub struct RecvEngine {
    c: Common,
    side: RecvSide,
    reqs: Window<RecvReq>,
    inflight: VecDeque<(ReqId, Epoch, Opaque)>,
    pending: VecDeque<ReqId>,
    listen: Option<(Epoch, Opaque)>,
}

/// The engine of a comm, either direction.
pub enum Engine {
    /// A send comm's.
    Send(SendEngine),
    /// A receive comm's.
    Recv(RecvEngine),
}

fn common(dev: i32, peer: String, link: Link, comm: Opaque) -> Common {
    Common {
        dev,
        peer,
        link,
        epoch: 0,
        comm: Some(comm),
        regs: slab::Slab::new(),
        next_req: 1,
        origin: crate::metrics::clock::now_ns(),
        clock: std::cell::Cell::new(0),
        fresh: std::cell::Cell::new(false),
        last_tick: 0,
        tests: 0,
        failure: None,
        refused: None,
        link_gone: false,
        recoveries: 0,
        base: 0,
        peer_closed: None,
        closed_failed: false,
        stash: Vec::new(),
    }
}

fn req_opaque(id: ReqId) -> Opaque {
    Opaque::from_addr(id as usize).unwrap_or_else(|| unreachable!("request ids start at 1"))
}

/// Whether an inner error is its caller's (a receive smaller than its message, an argument the
/// inner transport does not take, a bug): making the connection again would meet it again.
fn refused(e: &Error) -> bool {
    use crate::ffi::ncclResult_t as r;
    matches!(
        e.code(),
        r::ncclInvalidArgument | r::ncclInvalidUsage | r::ncclInternalError
    )
}

impl Engine {
    /// The engine of a send comm connected to `peer` over the inner send comm `comm`.
    pub fn send(cfg: RecoveryConfig, dev: i32, peer: String, link: Link, comm: Opaque) -> Engine {
        Engine::Send(SendEngine {
            c: common(dev, peer, link, comm),
            side: SendSide::new(cfg),
            reqs: Window::new(),
            inflight: VecDeque::new(),
            pending: VecDeque::new(),
            copies: Window::new(),
            spare: Vec::new(),
            spare_bytes: 0,
            retired: Vec::new(),
            connecting: None,
        })
    }

    /// The engine of a receive comm accepted from `peer` as the inner receive comm `comm`.
    pub fn recv(cfg: RecoveryConfig, dev: i32, peer: String, link: Link, comm: Opaque) -> Engine {
        Engine::Recv(RecvEngine {
            c: common(dev, peer, link, comm),
            side: RecvSide::new(cfg),
            reqs: Window::new(),
            inflight: VecDeque::new(),
            pending: VecDeque::new(),
            listen: None,
        })
    }

    fn common(&mut self) -> &mut Common {
        match self {
            Engine::Send(s) => &mut s.c,
            Engine::Recv(r) => &mut r.c,
        }
    }

    fn common_ref(&self) -> &Common {
        match self {
            Engine::Send(s) => &s.c,
            Engine::Recv(r) => &r.c,
        }
    }

    /// Recoveries completed so far.
    pub fn recoveries(&self) -> u64 {
        self.common_ref().recoveries
    }

    /// The current inner comm (for a test hook that breaks it).
    pub fn inner_comm(&self) -> Option<Opaque> {
        self.common_ref().comm
    }

    /// What the inner transport says of request `req` (an id from isend or irecv) that NCCL
    /// has been testing for long, or where the connection's recovery stands.
    pub fn stall_detail(&self, inner: &dyn Transport, req: Opaque) -> Option<String> {
        let id = req.as_ptr() as u64;
        let (c, ireq) = match self {
            Engine::Send(s) => (
                &s.c,
                s.inflight
                    .iter()
                    .find(|&&(_, r, e, _)| r == id && e == s.c.epoch)
                    .map(|&(.., ir)| ir),
            ),
            Engine::Recv(r) => (
                &r.c,
                r.inflight
                    .iter()
                    .find(|&&(q, e, _)| q == id && e == r.c.epoch)
                    .map(|&(_, _, ir)| ir),
            ),
        };
        let recovering = match self {
            Engine::Send(s) => s.side.recovering(),
            Engine::Recv(r) => r.side.recovering(),
        };
        if recovering || c.comm.is_none() {
            return Some(format!(
                "the connection to {} is being re-established (inner comm #{})",
                c.peer, c.epoch
            ));
        }
        let (comm, ireq) = (c.comm?, ireq?);
        // SAFETY: `ireq` is outstanding on `comm`, the open inner comm of the current epoch
        // (requests leave `inflight` when they complete or their comm closes).
        unsafe { inner.stall_detail(comm, ireq) }
    }

    /// The device handle of registration `token` on the current inner comm.
    pub fn device_mr(&self, inner: &dyn Transport, token: Opaque) -> Result<Option<Opaque>> {
        let c = self.common_ref();
        let m = c
            .reg(token.as_ptr() as u64)
            .ok_or_else(|| Error::invalid_argument("getDeviceMr: not a registration of this comm"))?;
        match (c.comm, m.inner) {
            // SAFETY: `m` is registered on `comm`, the open current inner comm.
            (Some(comm), Some(mr)) => unsafe { inner.get_device_mr(comm, mr) },
            _ => Ok(None),
        }
    }

    /// Registers NCCL's buffer on the current inner comm; returns the engine's token for it.
    ///
    /// # Safety
    /// The buffer is valid for `size` bytes until [`Engine::dereg`].
    pub unsafe fn reg(
        &mut self,
        inner: &dyn Transport,
        data: *mut c_void,
        size: usize,
        ptr_type: i32,
        dmabuf: Option<(u64, i32)>,
    ) -> Result<Opaque> {
        let c = self.common();
        let m = match c.comm {
            // SAFETY: `comm` is the open inner comm; the caller vouches for the buffer.
            Some(comm) => Some(unsafe {
                match dmabuf {
                    Some((off, fd)) => inner.reg_mr_dmabuf(comm, data, size, ptr_type, off, fd),
                    None => inner.reg_mr(comm, data, size, ptr_type),
                }
            }?),
            None => None,
        };
        let index = c.regs.insert(Reg {
            data: data as usize,
            size,
            ptr_type,
            dmabuf,
            inner: m,
        });
        Ok(req_opaque(index as u64 + 1))
    }

    /// Releases the registration `token`.
    pub fn dereg(&mut self, inner: &dyn Transport, token: Opaque) -> Result<()> {
        let c = self.common();
        let r = (token.as_ptr() as usize)
            .checked_sub(1)
            .and_then(|i| c.regs.try_remove(i))
            .ok_or_else(|| Error::invalid_argument("deregMr: not a registration of this comm"))?;
        match (c.comm, r.inner) {
            // SAFETY: `m` was registered on the open inner comm `comm` and is released once.
            (Some(comm), Some(m)) => unsafe { inner.dereg_mr(comm, m) },
            _ => Ok(()),
        }
    }

    /// NCCL's isend: returns the request's id as NCCL's inner request.
    pub fn isend(
        &mut self,
        inner: &dyn Transport,
        data: usize,
        size: i32,
        tag: i32,
        mr: Option<Opaque>,
    ) -> Result<Opaque> {
        let Engine::Send(s) = self else {
            return Err(Error::internal("isend on a receiving engine"));
        };
        let id = s.c.next_req;
        s.c.next_req += 1;
        s.reqs.insert(
            id,
            SendReq {
                data,
                size,
                tag,
                mr: mr.map(|m| m.as_ptr() as u64),
                outcome: Outcome::Pending,
            },
        );
        let now = s.c.now();
        s.side.handle(
            now,
            SendEvent::Post {
                req: id,
                size: size.max(0) as u64,
            },
        );
        s.run(inner);
        if s.reqs.get(id).is_some_and(|r| r.outcome == Outcome::Failed) {
            // Refused (or the connection lost for good) while posting: say so now.
            s.reqs.remove(id);
            return Err(s.c.error("isend"));
        }
        Ok(req_opaque(id))
    }

    /// NCCL's irecv of `data.len()` grouped buffers.
    pub fn irecv(
        &mut self,
        inner: &dyn Transport,
        data: &[*mut c_void],
        sizes: &[i32],
        tags: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Opaque> {
        let Engine::Recv(r) = self else {
            return Err(Error::internal("irecv on a sending engine"));
        };
        let n = data.len();
        if n > MAX_GROUP || sizes.len() < n || tags.len() < n || mrs.len() < n {
            return Err(Error::invalid_argument(format!(
                "irecv: n={n} is over {MAX_GROUP} or the arrays are shorter"
            )));
        }
        let id = r.c.next_req;
        r.c.next_req += 1;
        let mut q = RecvReq {
            n,
            data: [0; MAX_GROUP],
            sizes: [0; MAX_GROUP],
            tags: [0; MAX_GROUP],
            mrs: [None; MAX_GROUP],
            got: [0; MAX_GROUP],
            outcome: Outcome::Pending,
        };
        for i in 0..n {
            q.data[i] = data[i] as usize;
            q.sizes[i] = sizes[i];
            q.tags[i] = tags[i];
            q.mrs[i] = mrs[i].map(|m| m.as_ptr() as u64);
        }
        r.reqs.insert(id, q);
        let now = r.c.now();
        r.side.handle(now, RecvEvent::Post { req: id, n: n as u32 });
        r.run(inner);
        if r.reqs.get(id).is_some_and(|q| q.outcome == Outcome::Failed) {
            r.reqs.remove(id);
            return Err(r.c.error("irecv"));
        }
        Ok(req_opaque(id))
    }

    /// NCCL's test of request `req` (an id from isend or irecv): makes progress, then reports
    /// whether it is done, with the received sizes in `sizes`.
    pub fn test(&mut self, inner: &dyn Transport, req: Opaque, sizes: &mut [i32]) -> Result<bool> {
        let id = req.as_ptr() as u64;
        match self {
            Engine::Send(s) => {
                s.c.refresh();
                s.progress(inner);
                let o = s.reqs.get(id).map(|r| r.outcome);
                match o {
                    Some(Outcome::Pending) => Ok(false),
                    Some(Outcome::Done) => {
                        let r = s.reqs.remove(id);
                        if let (Some(r), Some(out)) = (r, sizes.first_mut()) {
                            *out = r.size;
                        }
                        Ok(true)
                    }
                    Some(Outcome::Failed) => {
                        s.reqs.remove(id);
                        Err(s.c.error("test"))
                    }
                    None => Err(Error::internal("test: the engine has no such request")),
                }
            }
            Engine::Recv(r) => {
                r.c.refresh();
                r.progress(inner);
                let o = r.reqs.get(id).map(|q| q.outcome);
                match o {
                    Some(Outcome::Pending) => Ok(false),
                    Some(Outcome::Done) => {
                        if let Some(q) = r.reqs.remove(id) {
                            let k = sizes.len().min(q.n);
                            sizes[..k].copy_from_slice(&q.got[..k]);
                        }
                        Ok(true)
                    }
                    Some(Outcome::Failed) => {
                        r.reqs.remove(id);
                        Err(r.c.error("test"))
                    }
                    None => Err(Error::internal("test: the engine has no such request")),
                }
            }
        }
    }

    /// Instead of a close, for the pool: when the connection is up on its current inner comm
    /// with nothing outstanding or in flight, releases the registrations on it and hands over the
    /// open inner comm, the control link and the messages the connection carried (counted from
    /// [`Engine::set_base`]). Otherwise gives the engine back, to be closed.
    pub fn park(self, inner: &dyn Transport) -> std::result::Result<Parked, Box<Engine>> {
        let clean = |c: &Common| {
            c.comm.is_some()
                && c.failure.is_none()
                && c.refused.is_none()
                && !c.link_gone
                // A link still attaching (a comm closed right after its connect) will do.
                && matches!(c.link.state(), LinkState::Up | LinkState::Connecting)
        };
        let ok = match &self {
            Engine::Send(s) => {
                clean(&s.c) && s.side.quiet() && s.inflight.is_empty() && s.pending.is_empty() && s.connecting.is_none()
            }
            Engine::Recv(r) => {
                clean(&r.c) && r.side.quiet() && r.inflight.is_empty() && r.pending.is_empty() && r.listen.is_none()
            }
        };
        if !ok {
            return Err(Box::new(self));
        }
        let count = match &self {
            Engine::Send(s) => s.side.next_seq(),
            Engine::Recv(r) => r.side.completed(),
        };
        // The peer's comm, if still open, learns that nothing more comes from this one (with the
        // link's next round: nobody waits for it).
        if let Err(e) = self.common_ref().link.send_lazy(MSG_CLOSED, &count.to_le_bytes()) {
            log::debug!(
                "recovery with {}: telling the peer of the close failed: {e}",
                self.common_ref().peer
            );
        }
        let mut c = match self {
            Engine::Send(mut s) => {
                s.drop_copy_regs(inner, &HashSet::new());
                s.c
            }
            Engine::Recv(r) => r.c,
        };
        let comm = c.comm.take().unwrap_or_else(|| unreachable!("checked above"));
        for (_, r) in c.regs.iter_mut() {
            if let Some(m) = r.inner.take() {
                // SAFETY: registered on this open comm, which nothing else uses now; released once (taken).
                let _ = unsafe { inner.dereg_mr(comm, m) };
            }
        }
        let mut stash = std::mem::take(&mut c.stash);
        while let Some(m) = c.link.try_recv() {
            if m.0 != MSG_CONTROL && m.0 != MSG_CLOSED && stash.len() < 4 {
                stash.push(m);
            }
        }
        Ok(Parked {
            comm,
            link: c.link,
            count: c.base + count,
            stash,
        })
    }

    /// The messages the connection carried before this engine (its comm reuses a pooled one).
    pub fn set_base(&mut self, base: u64) {
        self.common().base = base;
    }

    /// Closes everything the engine holds on the inner transport.
    pub fn close(&mut self, inner: &dyn Transport) -> Result<()> {
        match self {
            Engine::Send(s) => {
                s.connecting = None;
                let res = s.close_current(inner);
                s.retired.clear();
                res
            }
            Engine::Recv(r) => {
                if let Some((_, l)) = r.listen.take() {
                    // SAFETY: the engine's listen comm, closed once (taken).
                    let _ = unsafe { inner.close_listen(l) };
                }
                r.close_current(inner)
            }
        }
    }
}

/// Closes the current inner comm, releasing its registrations first, except those in `busy`
/// (used by requests abandoned with the comm: a plugin may refuse to release a registration an
/// outstanding request uses, and closing the comm ends those requests).
fn close_comm(c: &mut Common, inner: &dyn Transport, send: bool, busy: &HashSet<u64>) -> Result<()> {
    let Some(comm) = c.comm.take() else { return Ok(()) };
    for (index, r) in c.regs.iter_mut() {
        if let Some(m) = r.inner.take() {
            if busy.contains(&(index as u64 + 1)) {
                continue;
            }
            // SAFETY: registered on this open comm, released once (taken).
            let _ = unsafe { inner.dereg_mr(comm, m) };
        }
    }
    // SAFETY: the current inner comm, taken so it is closed once; its requests are abandoned and
    // never tested again.
    unsafe {
        if send {
            inner.close_send(comm)
        } else {
            inner.close_recv(comm)
        }
    }
}

fn closed_why(count: u64, kind: &str) -> String {
    format!(
        "its {kind} comm closed after {count} messages (its connection is kept for reuse, NCCL_TCPXSHIM_POOL), \
         so the requests posted here since can never complete"
    )
}

fn tick_due(c: &mut Common) -> Option<u64> {
    if c.tests % 16 != 0 && !c.fresh.get() {
        return None;
    }
    let now = c.now();
    if now.saturating_sub(c.last_tick) >= TICK_NS {
        c.last_tick = now;
        Some(now)
    } else {
        None
    }
}

impl SendEngine {
    /// An inner post, test or registration on the comm of `epoch` failed with `e`.
    fn inner_failed(&mut self, epoch: Epoch, e: Error) {
        let now = self.c.now();
        let ev = if refused(&e) {
            let reason = e.to_string();
            self.c.refused.get_or_insert(e);
            SendEvent::InnerRefused { epoch, reason }
        } else {
            SendEvent::InnerFailed {
                epoch,
                cause: Cause::Inner(e.to_string()),
            }
        };
        self.side.handle(now, ev);
    }

    /// Frees the retired copies no inner send reads any more.
    fn free_retired(&mut self, inner: &dyn Transport) {
        let inflight = &self.inflight;
        let (comm, epoch) = (self.c.comm, self.c.epoch);
        let (spare, spare_bytes) = (&mut self.spare, &mut self.spare_bytes);
        self.retired.retain_mut(|(seq, cp)| {
            if inflight.iter().any(|&(s, ..)| s == *seq) {
                return true;
            }
            if let (Some(comm), Some((e, m))) = (comm, cp.mr) {
                if e == epoch {
                    // SAFETY: registered on the open current comm; no inner send uses it.
                    let _ = unsafe { inner.dereg_mr(comm, m) };
                }
            }
            // No inner send reads the buffer and its registration is gone: the next copy may
            // reuse it.
            let cap = cp.buf.capacity();
            if cap <= SPARE_COPY_MAX && *spare_bytes + cap <= SPARE_BYTES {
                *spare_bytes += cap;
                spare.push(std::mem::take(&mut cp.buf));
            }
            false
        });
    }

    /// Closes the current inner comm; its requests are abandoned.
    fn close_current(&mut self, inner: &dyn Transport) -> Result<()> {
        let busy_seqs: HashSet<Seq> = self.inflight.iter().map(|&(seq, ..)| seq).collect();
        let busy: HashSet<u64> = self
            .inflight
            .iter()
            .filter_map(|&(_, req, ..)| self.reqs.get(req).and_then(|r| r.mr))
            .collect();
        self.inflight.clear();
        self.pending.clear();
        self.drop_copy_regs(inner, &busy_seqs);
        close_comm(&mut self.c, inner, true, &busy)
    }

    /// Releases the copies' registrations on the current inner comm (before it closes), but
    /// those of sends in `busy`.
    fn drop_copy_regs(&mut self, inner: &dyn Transport, busy: &HashSet<Seq>) {
        let Some(comm) = self.c.comm else { return };
        let epoch = self.c.epoch;
        let all = self
            .copies
            .iter_mut()
            .chain(self.retired.iter_mut().map(|(s, c)| (*s, c)));
        for (seq, cp) in all {
            if let Some((e, m)) = cp.mr.take() {
                if e == epoch && !busy.contains(&seq) {
                    // SAFETY: registered on the open current comm, released once (taken).
                    let _ = unsafe { inner.dereg_mr(comm, m) };
                }
            }
        }
    }

    fn progress(&mut self, inner: &dyn Transport) {
        let (msgs, gone) = self.c.read_link(self.side.awaiting_ack());
        for m in msgs {
            let now = self.c.now();
            self.side.handle(now, SendEvent::Control(m));
            self.run(inner);
        }
        if let Some(g) = gone {
            let now = self.c.now();
            self.side.handle(now, SendEvent::PeerGone(g));
            self.run(inner);
        }
        // Inner requests, in order.
        let mut i = 0;
        let mut tested = 0;
        while i < self.inflight.len() && tested < TESTS_PER_CALL {
            let (seq, _req, epoch, ireq) = self.inflight[i];
            tested += 1;
            let mut sz = [0i32; 1];
            // SAFETY: `ireq` is outstanding on the open inner comm of `epoch` (requests of closed
            // comms are removed from `inflight` when they close).
            match unsafe { inner.test(ireq, Some(&mut sz)) } {
                Ok(true) => {
                    self.inflight.remove(i);
                    let now = self.c.now();
                    self.side.handle(now, SendEvent::InnerDone { epoch, seq });
                    self.run(inner);
                }
                Ok(false) => i += 1,
                Err(e) => {
                    self.inner_failed(epoch, e);
                    self.run(inner);
                    break;
                }
            }
        }
        if !self.retired.is_empty() {
            self.free_retired(inner);
        }
        self.retry_pending(inner);
        if let Some((epoch, mut h)) = self.connecting.take() {
            // SAFETY: `h` is this connect's own handle buffer, the same on every call.
            match unsafe { inner.connect(self.c.dev, &mut h, std::ptr::null_mut()) } {
                Ok(Some(comm)) => {
                    self.c.comm = Some(comm);
                    self.c.epoch = epoch;
                    let now = self.c.now();
                    self.side.handle(now, SendEvent::Connected { epoch });
                    self.run(inner);
                }
                Ok(None) => self.connecting = Some((epoch, h)),
                Err(e) => {
                    let now = self.c.now();
                    let cause = Cause::Connect(e.to_string());
                    self.side.handle(now, SendEvent::InnerFailed { epoch, cause });
                    self.run(inner);
                }
            }
        }
        if let Some(now) = tick_due(&mut self.c) {
            self.side.handle(now, SendEvent::Tick);
            self.run(inner);
        }
        // The receiving comm closed: what it did not receive never will be.
        if let (Some(received), false) = (self.c.peer_closed, self.c.closed_failed) {
            if !self.side.quiet() {
                self.c.closed_failed = true;
                let now = self.c.now();
                let why = closed_why(received, "receive");
                self.side.handle(now, SendEvent::PeerGone(why));
                self.run(inner);
            }
        }
    }

    fn retry_pending(&mut self, inner: &dyn Transport) {
        while let Some(&(seq, req, copy)) = self.pending.front() {
            if self.c.comm.is_none() {
                return;
            }
            match self.post(inner, seq, req, copy) {
                Ok(true) => {
                    self.pending.pop_front();
                }
                Ok(false) => return,
                Err(e) => {
                    self.inner_failed(self.c.epoch, e);
                    self.run(inner);
                    return;
                }
            }
        }
    }

    /// Posts send `seq` on the current inner comm; `false`: try again.
    fn post(&mut self, inner: &dyn Transport, seq: Seq, req: ReqId, copy: bool) -> Result<bool> {
        if self.inflight.len() >= MAX_INFLIGHT {
            return Ok(false);
        }
        let comm = self
            .c
            .comm
            .ok_or_else(|| Error::internal("post without an inner comm"))?;
        // A copied send may be complete to NCCL already (its request gone): the copy has all.
        let epoch = self.c.epoch;
        let (data, size, tag, mr) = match (copy, self.copies.get_mut(seq)) {
            (true, Some(cp)) => {
                let mr = match cp.mr {
                    Some((e, m)) if e == epoch => m,
                    _ => {
                        // SAFETY: `comm` is open; the copy's buffer lives (at least one byte) until
                        // it is deregistered, before it is freed.
                        let m = unsafe {
                            inner.reg_mr(
                                comm,
                                cp.buf.as_mut_ptr().cast(),
                                cp.buf.len(),
                                crate::ffi::NCCL_PTR_HOST as i32,
                            )
                        }?;
                        cp.mr = Some((epoch, m));
                        m
                    }
                };
                (cp.buf.as_mut_ptr() as usize, cp.len as i32, cp.tag, Some(mr))
            }
            _ => {
                let r = self
                    .reqs
                    .get(req)
                    .ok_or_else(|| Error::internal("post of an unknown request"))?;
                (r.data, r.size, r.tag, self.c.inner_mr(r.mr))
            }
        };
        // SAFETY: `comm` is open; the bytes are NCCL's buffer (kept intact until the send is
        // reported complete) or the engine's copy (kept until released, after the acknowledgement);
        // `mr` is the registration of NCCL's buffer on this comm.
        match unsafe { inner.isend(comm, data as *mut c_void, size, tag, mr) }? {
            Some(ir) => {
                self.inflight.push_back((seq, req, self.c.epoch, ir));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn run(&mut self, inner: &dyn Transport) {
        while let Some(a) = self.side.poll_action() {
            match a {
                SendAction::Post { epoch, seq, req, .. }
                | SendAction::Replay {
                    epoch,
                    seq,
                    req,
                    source: Source::Nccl,
                    ..
                } => self.queue_post(inner, epoch, seq, req, false),
                SendAction::Replay { epoch, seq, req, .. } => self.queue_post(inner, epoch, seq, req, true),
                SendAction::CopyForReplay { seq, req, size } => {
                    if let Some(r) = self.reqs.get(req) {
                        let len = size as usize;
                        let mut buf = self.spare.pop().unwrap_or_default();
                        self.spare_bytes -= buf.capacity();
                        buf.clear();
                        if len > 0 {
                            // SAFETY: NCCL's buffer holds `size` bytes until the send is reported
                            // complete, which comes after this copy.
                            buf.extend_from_slice(unsafe { std::slice::from_raw_parts(r.data as *const u8, len) });
                        } else {
                            buf.push(0); // a registration covers at least one byte
                        }
                        let tag = r.tag;
                        self.copies.insert(
                            seq,
                            Copy {
                                buf,
                                len,
                                tag,
                                mr: None,
                            },
                        );
                    }
                }
                SendAction::ReleaseCopy { seq } => {
                    if let Some(cp) = self.copies.remove(seq) {
                        self.retired.push((seq, cp));
                    }
                    self.free_retired(inner);
                }
                SendAction::Complete { req } => {
                    if let Some(r) = self.reqs.get_mut(req) {
                        r.outcome = Outcome::Done;
                    }
                }
                SendAction::FailRequest { req } => {
                    if let Some(r) = self.reqs.get_mut(req) {
                        r.outcome = Outcome::Failed;
                    }
                }
                SendAction::CloseInner { epoch } => {
                    if epoch == self.c.epoch {
                        // A comm that failed may fail its close too; nothing more to do about it.
                        let _ = self.close_current(inner);
                        // The comm's requests are abandoned with it: nothing reads these now.
                        self.retired.clear();
                    }
                }
                SendAction::Connect { epoch, handle } => {
                    let mut h = Box::new([0u8; HANDLE_SIZE]);
                    let k = handle.len().min(HANDLE_SIZE);
                    h[..k].copy_from_slice(&handle[..k]);
                    self.connecting = Some((epoch, h));
                }
                SendAction::ReRegister { epoch } => {
                    if let Err(e) = self.c.reregister(inner) {
                        self.inner_failed(epoch, e);
                    }
                }
                SendAction::SendControl(m) => self.c.send_control(&m),
                SendAction::Recovered {
                    epoch,
                    replayed,
                    cause,
                    elapsed_ns,
                } => {
                    self.c.recoveries += 1;
                    log::info!(
                        "recovered send connection to {} on inner comm #{epoch} after {:.1} ms: {cause}; {replayed} \
                         message(s) replayed",
                        self.c.peer,
                        elapsed_ns as f64 / 1e6
                    );
                }
                SendAction::Failed(f) => {
                    log::warn!("{}", f.to_error("send", &self.c.peer));
                    self.c.failure = Some(f);
                }
            }
        }
    }

    fn queue_post(&mut self, inner: &dyn Transport, epoch: Epoch, seq: Seq, req: ReqId, copy: bool) {
        if epoch != self.c.epoch || self.c.comm.is_none() {
            return;
        }
        if !self.pending.is_empty() {
            self.pending.push_back((seq, req, copy));
            return;
        }
        match self.post(inner, seq, req, copy) {
            Ok(true) => {}
            Ok(false) => self.pending.push_back((seq, req, copy)),
            Err(e) => {
                self.inner_failed(epoch, e);
            }
        }
    }
}

impl RecvEngine {
    /// An inner post, test or registration on the comm of `epoch` failed with `e`.
    fn inner_failed(&mut self, epoch: Epoch, e: Error) {
        let now = self.c.now();
        let ev = if refused(&e) {
            let reason = e.to_string();
            self.c.refused.get_or_insert(e);
            RecvEvent::InnerRefused { epoch, reason }
        } else {
            RecvEvent::InnerFailed {
                epoch,
                cause: Cause::Inner(e.to_string()),
            }
        };
        self.side.handle(now, ev);
    }

    /// Closes the current inner comm; its requests are abandoned.
    fn close_current(&mut self, inner: &dyn Transport) -> Result<()> {
        let busy: HashSet<u64> = self
            .inflight
            .iter()
            .filter_map(|&(req, ..)| self.reqs.get(req))
            .flat_map(|q| q.mrs[..q.n].iter().flatten().copied())
            .collect();
        self.inflight.clear();
        self.pending.clear();
        close_comm(&mut self.c, inner, false, &busy)
    }

    fn progress(&mut self, inner: &dyn Transport) {
        let (msgs, gone) = self.c.read_link(false);
        for m in msgs {
            let now = self.c.now();
            self.side.handle(now, RecvEvent::Control(m));
            self.run(inner);
        }
        if let Some(g) = gone {
            let now = self.c.now();
            self.side.handle(now, RecvEvent::PeerGone(g));
            self.run(inner);
        }
        let mut i = 0;
        let mut tested = 0;
        while i < self.inflight.len() && tested < TESTS_PER_CALL {
            let (req, epoch, ireq) = self.inflight[i];
            tested += 1;
            let n = self.reqs.get(req).map_or(1, |q| q.n).min(MAX_GROUP);
            let mut buf = [0i32; MAX_GROUP];
            let sz = &mut buf[..n];
            // SAFETY: `ireq` is outstanding on the open inner comm of `epoch`; `sz` has one entry
            // per grouped receive.
            match unsafe { inner.test(ireq, Some(sz)) } {
                Ok(true) => {
                    self.inflight.remove(i);
                    if let Some(q) = self.reqs.get_mut(req) {
                        q.got[..n].copy_from_slice(sz);
                    }
                    let mut got = [0u64; MAX_GROUP];
                    for (g, &s) in got.iter_mut().zip(sz.iter()) {
                        *g = s.max(0) as u64;
                    }
                    let sizes = Sizes::new(&got[..n]);
                    let now = self.c.now();
                    self.side.handle(now, RecvEvent::InnerDone { epoch, req, sizes });
                    self.run(inner);
                }
                Ok(false) => i += 1,
                Err(e) => {
                    self.inner_failed(epoch, e);
                    self.run(inner);
                    break;
                }
            }
        }
        self.retry_pending(inner);
        if let Some((epoch, l)) = self.listen {
            if self.c.comm.is_none() {
                // SAFETY: `l` is the engine's open listen comm.
                match unsafe { inner.accept(l, std::ptr::null_mut()) } {
                    Ok(Some(comm)) => {
                        self.listen = None;
                        // SAFETY: the listen comm has given its one connection; closed once.
                        let _ = unsafe { inner.close_listen(l) };
                        self.c.comm = Some(comm);
                        self.c.epoch = epoch;
                        let now = self.c.now();
                        self.side.handle(now, RecvEvent::Accepted { epoch });
                        self.run(inner);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let now = self.c.now();
                        let cause = Cause::Listen(e.to_string());
                        self.side.handle(now, RecvEvent::InnerFailed { epoch, cause });
                        self.run(inner);
                    }
                }
            }
        }
        if let Some(now) = tick_due(&mut self.c) {
            self.side.handle(now, RecvEvent::Tick);
            self.run(inner);
        }
        if let Some(completed) = self.side.ack_due() {
            let urgent = self.side.ack_urgent();
            self.side.ack_sent(completed);
            self.c.send_ack(completed, urgent);
        }
        // The sending comm closed: once everything it sent is in, the receives left wait for
        // nothing.
        if let (Some(sent), false) = (self.c.peer_closed, self.c.closed_failed) {
            if self.side.completed() >= sent && !self.side.quiet() {
                self.c.closed_failed = true;
                let now = self.c.now();
                self.side.handle(now, RecvEvent::PeerGone(closed_why(sent, "send")));
                self.run(inner);
            }
        }
    }

    fn retry_pending(&mut self, inner: &dyn Transport) {
        while let Some(&req) = self.pending.front() {
            if self.c.comm.is_none() {
                return;
            }
            match self.post(inner, req) {
                Ok(true) => {
                    self.pending.pop_front();
                }
                Ok(false) => return,
                Err(e) => {
                    self.inner_failed(self.c.epoch, e);
                    self.run(inner);
                    return;
                }
            }
        }
    }

    fn post(&mut self, inner: &dyn Transport, req: ReqId) -> Result<bool> {
        if self.inflight.len() >= MAX_INFLIGHT {
            return Ok(false);
        }
        let comm = self
            .c
            .comm
            .ok_or_else(|| Error::internal("post without an inner comm"))?;
        let q = self
            .reqs
            .get(req)
            .ok_or_else(|| Error::internal("post of an unknown request"))?;
        let n = q.n;
        let mut data = [std::ptr::null_mut::<c_void>(); MAX_GROUP];
        let mut mrs = [None; MAX_GROUP];
        for i in 0..n {
            data[i] = q.data[i] as *mut c_void;
            mrs[i] = self.c.inner_mr(q.mrs[i]);
        }
        let (data, mrs) = (&data[..n], &mrs[..n]);
        // SAFETY: `comm` is open; NCCL's buffers stay valid until the receive is reported done;
        // the registrations are this comm's.
        match unsafe { inner.irecv(comm, data, &q.sizes[..n], &q.tags[..n], mrs) }? {
            Some(ir) => {
                self.inflight.push_back((req, self.c.epoch, ir));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn run(&mut self, inner: &dyn Transport) {
        while let Some(a) = self.side.poll_action() {
            match a {
                RecvAction::Post { epoch, req } | RecvAction::Repost { epoch, req } => {
                    if epoch != self.c.epoch || self.c.comm.is_none() {
                        continue;
                    }
                    if !self.pending.is_empty() {
                        self.pending.push_back(req);
                        continue;
                    }
                    match self.post(inner, req) {
                        Ok(true) => {}
                        Ok(false) => self.pending.push_back(req),
                        Err(e) => {
                            self.inner_failed(epoch, e);
                        }
                    }
                }
                RecvAction::Complete { req } => {
                    if let Some(q) = self.reqs.get_mut(req) {
                        q.outcome = Outcome::Done;
                    }
                }
                RecvAction::FailRequest { req } => {
                    if let Some(q) = self.reqs.get_mut(req) {
                        q.outcome = Outcome::Failed;
                    }
                }
                RecvAction::CloseInner { epoch } => {
                    if epoch == self.c.epoch {
                        // A comm that failed may fail its close too; nothing more to do about it.
                        let _ = self.close_current(inner);
                    }
                    if let Some((_, l)) = self.listen.take() {
                        // SAFETY: the engine's listen comm, closed once (taken).
                        let _ = unsafe { inner.close_listen(l) };
                    }
                }
                RecvAction::Listen { epoch } => {
                    if let Some((_, l)) = self.listen.take() {
                        // SAFETY: as above.
                        let _ = unsafe { inner.close_listen(l) };
                    }
                    let mut h = [0u8; HANDLE_SIZE];
                    match inner.listen(self.c.dev, &mut h) {
                        Ok(l) => {
                            self.listen = Some((epoch, l));
                            let now = self.c.now();
                            self.side.handle(
                                now,
                                RecvEvent::Listening {
                                    epoch,
                                    handle: h.to_vec(),
                                },
                            );
                        }
                        Err(e) => {
                            let now = self.c.now();
                            let cause = Cause::Listen(e.to_string());
                            self.side.handle(now, RecvEvent::InnerFailed { epoch, cause });
                        }
                    }
                }
                RecvAction::ReRegister { epoch } => {
                    if let Err(e) = self.c.reregister(inner) {
                        self.inner_failed(epoch, e);
                    }
                }
                RecvAction::SendControl(m) => self.c.send_control(&m),
                RecvAction::SendAck { completed, urgent } => self.c.send_ack(completed, urgent),
                RecvAction::Recovered {
                    epoch,
                    reposted,
                    cause,
                    elapsed_ns,
                } => {
                    self.c.recoveries += 1;
                    log::info!(
                        "recovered receive connection from {} on inner comm #{epoch} after {:.1} ms: {cause}; \
                         {reposted} receive(s) posted again",
                        self.c.peer,
                        elapsed_ns as f64 / 1e6
                    );
                }
                RecvAction::Failed(f) => {
                    log::warn!("{}", f.to_error("receive", &self.c.peer));
                    self.c.failure = Some(f);
                }
            }
        }
    }
}
