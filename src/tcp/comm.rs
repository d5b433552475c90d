//! Send and receive comms: request slots, the control-socket path and striping over data sockets.
//!
//! The control socket belongs to the calling (NCCL proxy) thread: headers and inline payloads are
//! written and read there, without any hand-off. Data sockets belong to workers. A comm's mutable
//! state sits behind a mutex that only the calling thread takes (workers never do), so it is never
//! contended; `try_lock` turns a caller that breaks NCCL's one-thread-per-comm rule into an error.

use super::liveness::{self, Liveness};
use super::shared::{Shared, MAX_REQUESTS};
use super::sys;
use super::wire::{self, Header, FLAG_INLINE, HEADER_LEN};
use super::worker::{Dir, Pool, Task};
use crate::error::{Error, Result};
use crate::transport::Opaque;
use socket2::Socket;
use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

const _: () = assert!(MAX_REQUESTS <= 32, "free-slot bitmask is a u32");

/// First word of every object this transport hands out, so a mixed-up pointer is caught.
pub const TAG_SEND: u64 = u64::from_le_bytes(*b"txsSEND\0");
/// Tag of a receive comm.
pub const TAG_RECV: u64 = u64::from_le_bytes(*b"txsRECV\0");
/// Tag of a request slot.
const TAG_REQ: u64 = u64::from_le_bytes(*b"txsREQ\0\0");

/// Control-socket staging buffer: headers and small payloads are read in bulk into it.
const STAGE_LEN: usize = 64 << 10;
/// Inline payload remainders at least this big are read straight into NCCL's buffer.
const DIRECT_READ_MIN: usize = 16 << 10;
/// Most test() calls skipped between two look-ahead reads of the control socket (see `RecvSide::skip`).
const LOOKAHEAD_MAX_SKIP: u32 = 64;
/// Most ranges (a header and an inline payload per message) gathered into one sendmsg.
const MAX_IOV: usize = sys::MAX_GATHER;

/// What NCCL holds as a request: a fixed slot of its comm.
#[repr(C)]
struct Slot {
    tag: u64,
    comm: *const Comm,
    index: u8,
}

/// A data socket as the comm knows it: which worker owns it, under which token.
struct DataSock {
    worker: usize,
    token: usize,
}

#[derive(Clone, Copy)]
struct SendReq {
    ptr: *const u8,
    size: usize,
    seq: u64,
    hdr: [u8; HEADER_LEN],
    /// Header plus inline payload bytes to write on the control socket.
    ctrl_len: usize,
    ctrl_done: usize,
}

impl SendReq {
    /// What this outstanding send waits for, given its chunks still with the workers; `None` when
    /// nothing (the next test completes it).
    fn detail(&self, left: u32) -> Option<String> {
        if self.ctrl_done == self.ctrl_len && left == 0 {
            return None;
        }
        Some(format!(
            "message #{}: {} of {} control bytes written, {left} chunk(s) still with the I/O workers (the peer \
             is not reading: is its irecv posted?)",
            self.seq, self.ctrl_done, self.ctrl_len
        ))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the header of its message.
    Header,
    /// Reading the inline payload from the control socket.
    Inline { done: usize },
    /// Chunks are with the workers.
    Striped,
    /// All bytes are in.
    Done,
}

#[derive(Clone, Copy)]
struct RecvReq {
    ptr: *mut u8,
    cap: usize,
    size: usize,
    seq: u64,
    phase: Phase,
}

/// A FIFO of slot indices; never holds more than MAX_REQUESTS.
struct Ring {
    buf: [u8; MAX_REQUESTS],
    head: usize,
    len: usize,
}

impl Ring {
    fn new() -> Ring {
        Ring {
            buf: [0; MAX_REQUESTS],
            head: 0,
            len: 0,
        }
    }
    fn push(&mut self, v: u8) {
        debug_assert!(self.len < MAX_REQUESTS);
        self.buf[(self.head + self.len) % MAX_REQUESTS] = v;
        self.len += 1;
    }
    fn front(&self) -> Option<u8> {
        (self.len > 0).then(|| self.buf[self.head])
    }
    fn get(&self, i: usize) -> u8 {
        self.buf[(self.head + i) % MAX_REQUESTS]
    }
    fn pop(&mut self) {
        if self.len > 0 {
            self.head = (self.head + 1) % MAX_REQUESTS;
            self.len -= 1;
        }
    }
}

/// Free request slots, one bit each.
struct Slots(u32);

impl Slots {
    fn all_free() -> Slots {
        Slots(u32::MAX >> (32 - MAX_REQUESTS))
    }
    fn take(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let i = self.0.trailing_zeros() as usize;
        self.0 &= !(1 << i);
        Some(i)
    }
    fn release(&mut self, i: usize) {
        self.0 |= 1 << i;
    }
    fn is_busy(&self, i: usize) -> bool {
        self.0 & (1 << i) == 0
    }
}

struct SendSide {
    ctrl: Socket,
    next_seq: u64,
    slots: Slots,
    reqs: [SendReq; MAX_REQUESTS],
    /// Requests with control bytes still to write, in posting order.
    queue: Ring,
}

impl SendSide {
    /// A send side with every slot free, writing headers to `ctrl`.
    fn new(ctrl: Socket) -> SendSide {
        SendSide {
            ctrl,
            next_seq: 0,
            slots: Slots::all_free(),
            reqs: [SendReq {
                ptr: std::ptr::null(),
                size: 0,
                seq: 0,
                hdr: [0; HEADER_LEN],
                ctrl_len: 0,
                ctrl_done: 0,
            }; MAX_REQUESTS],
            queue: Ring::new(),
        }
    }
}

struct RecvSide {
    ctrl: Socket,
    next_seq: u64,
    slots: Slots,
    reqs: [RecvReq; MAX_REQUESTS],
    /// Requests waiting for a header, in posting order.
    waiting: Ring,
    /// The request whose inline payload is being read.
    cur: Option<usize>,
    stage: Box<[u8]>,
    lo: usize,
    hi: usize,
    /// Look-ahead reads (for receives behind the tested one) still to skip, and the current
    /// back-off: after a look-ahead read finds nothing, the next `backoff` (doubling up to
    /// [`LOOKAHEAD_MAX_SKIP`]) test() calls that only look ahead leave the socket alone. Any control
    /// bytes arriving reset both. Reads for the tested request itself are never skipped.
    skip: u32,
    backoff: u32,
    /// Control-socket reads that found nothing (tests check the hot path does not spin on them).
    #[cfg(test)]
    idle_reads: u64,
}

impl RecvSide {
    /// A receive side with every slot free, reading headers from `ctrl`.
    fn new(ctrl: Socket) -> RecvSide {
        RecvSide {
            ctrl,
            next_seq: 0,
            slots: Slots::all_free(),
            reqs: [RecvReq {
                ptr: std::ptr::null_mut(),
                cap: 0,
                size: 0,
                seq: 0,
                phase: Phase::Done,
            }; MAX_REQUESTS],
            waiting: Ring::new(),
            cur: None,
            stage: vec![0u8; STAGE_LEN].into_boxed_slice(),
            lo: 0,
            hi: 0,
            skip: 0,
            backoff: 0,
            #[cfg(test)]
            idle_reads: 0,
        }
    }

    /// What outstanding receive `i` waits for, given its chunks still with the workers; `None`
    /// when nothing (the next test completes it).
    fn detail(&self, i: usize, left: u32) -> Option<String> {
        let q = &self.reqs[i];
        match q.phase {
            Phase::Header => {
                let ahead = (0..self.waiting.len)
                    .take_while(|&k| self.waiting.get(k) as usize != i)
                    .count();
                Some(format!(
                    "no message from the sender yet ({ahead} earlier receive(s) of this connection waiting too; is \
                     the peer's isend posted?)"
                ))
            }
            Phase::Inline { done } => Some(format!("message #{} inline, {done} of {} bytes in", q.seq, q.size)),
            Phase::Striped if left > 0 => Some(format!(
                "message #{} of {} bytes, {left} chunk(s) still to arrive",
                q.seq, q.size
            )),
            Phase::Striped | Phase::Done => None,
        }
    }
}

// The comm is boxed already; boxing a variant too would only add a pointer chase per call.
#[allow(clippy::large_enum_variant)]
enum Side {
    Send(SendSide),
    Recv(RecvSide),
}

/// A send or receive comm.
#[repr(C)]
pub struct Comm {
    tag: u64,
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    data: Vec<DataSock>,
    streams: usize,
    inline_max: usize,
    min_chunk: usize,
    fds: Vec<RawFd>,
    state: Mutex<Side>,
    slots: [Slot; MAX_REQUESTS],
}

/// Settings a comm needs from the transport.
#[derive(Clone, Copy)]
pub struct CommParams {
    /// Data sockets.
    pub streams: usize,
    /// Inline threshold.
    pub inline_max: usize,
    /// Smallest striping chunk.
    pub min_chunk: usize,
    /// Keepalive and user timeout of the sockets.
    pub liveness: Liveness,
}

impl Comm {
    /// Builds a comm from connected sockets (hellos already exchanged), handing data sockets to workers.
    pub fn create(
        dir: Dir,
        pool: &Arc<Pool>,
        peer: SocketAddr,
        ctrl: Socket,
        data: Vec<Socket>,
        p: CommParams,
    ) -> Result<Opaque> {
        let shared = Arc::new(Shared::new(peer, p.liveness));
        let mut fds = vec![ctrl.as_raw_fd()];
        let mut socks: Vec<DataSock> = Vec::with_capacity(data.len());
        let call = if dir == Dir::Send { "connect" } else { "accept" };
        let who = format!("{call}: connection to {peer}");
        for (i, s) in data.into_iter().enumerate() {
            fds.push(s.as_raw_fd());
            let stream = mio::net::TcpStream::from_std(std::net::TcpStream::from(s));
            let w = pool.pick();
            match pool.add(w, stream, dir, i, shared.clone(), &who) {
                Ok(token) => socks.push(DataSock { worker: w, token }),
                Err(e) => {
                    remove_all(pool, &socks, &who);
                    return Err(e.context(who));
                }
            }
        }
        let side = match dir {
            Dir::Send => Side::Send(SendSide::new(ctrl)),
            Dir::Recv => Side::Recv(RecvSide::new(ctrl)),
        };
        let comm = Box::new(Comm {
            tag: if dir == Dir::Send { TAG_SEND } else { TAG_RECV },
            shared,
            pool: pool.clone(),
            data: socks,
            streams: p.streams,
            inline_max: p.inline_max,
            min_chunk: p.min_chunk,
            fds,
            state: Mutex::new(side),
            slots: std::array::from_fn(|i| Slot {
                tag: TAG_REQ,
                comm: std::ptr::null(),
                index: i as u8,
            }),
        });
        let raw = Box::into_raw(comm);
        for i in 0..MAX_REQUESTS {
            // SAFETY: `raw` is the live, uniquely owned allocation just made; the back pointers are
            // written through it so they stay valid for as long as the comm is.
            unsafe { std::ptr::addr_of_mut!((*raw).slots[i].comm).write(raw) };
        }
        Opaque::from_ptr(raw.cast()).ok_or_else(|| Error::internal(format!("{call}: comm allocation returned NULL")))
    }

    /// The comm behind `o`, checking that it is one of ours of the expected kind.
    ///
    /// # Safety
    /// `o` must be a pointer this transport returned (a comm, listen comm, memory handle or
    /// request) that has not been closed or freed.
    pub unsafe fn from_opaque<'a>(o: Opaque, tag: u64, call: &str) -> Result<&'a Comm> {
        // SAFETY: every object this transport hands out is #[repr(C)] with a u64 tag first.
        let t = unsafe { *(o.as_ptr() as *const u64) };
        if t != tag {
            let want = if tag == TAG_SEND { "send" } else { "receive" };
            return Err(Error::invalid_argument(format!(
                "{call}: {:p} is not a {want} comm of the built-in TCP transport",
                o.as_ptr()
            )));
        }
        // SAFETY: the tag says this is a live Comm (caller's contract).
        Ok(unsafe { &*(o.as_ptr() as *const Comm) })
    }

    /// "peer 10.0.0.2:41234, 4 streams".
    pub fn describe(&self) -> String {
        format!("peer {}, {} streams", self.shared.peer, self.streams)
    }

    /// Shuts down (`SHUT_RDWR`) the control and data sockets, as a network failure would cut
    /// them: this side's next read or write fails (end of stream, broken pipe), the peer reads
    /// end of stream and its writes are reset. The fds stay open until the comm is closed, so
    /// this is safe from any thread, while other threads use the comm.
    pub fn cut(&self) {
        log::debug!("cutting the connection to {} (fds {:?})", self.shared.peer, self.fds);
        for &fd in &self.fds {
            // SAFETY: shutdown only changes the state of the socket behind `fd`, which stays
            // open (owned by this comm and its workers) until the comm is closed.
            let r = unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            if r != 0 {
                // ENOTCONN: the connection has already ended, which is what was asked for.
                log::debug!("shutdown of fd {fd}: {}", std::io::Error::last_os_error());
            }
        }
    }

    /// Raw fds of the control and data sockets (tests check they get closed).
    #[cfg(test)]
    pub fn fds(&self) -> &[RawFd] {
        &self.fds
    }

    /// Control-socket reads of a receive comm that found nothing so far.
    #[cfg(test)]
    pub fn ctrl_idle_reads(&self) -> u64 {
        match &*self.state.lock().unwrap() {
            Side::Recv(r) => r.idle_reads,
            Side::Send(_) => 0,
        }
    }

    fn lock(&self, call: &str) -> Result<MutexGuard<'_, Side>> {
        match self.state.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::WouldBlock) => Err(Error::invalid_usage(format!(
                "{call}: comm to {} is in use by another thread (NCCL drives each comm from one thread at a time)",
                self.shared.peer
            ))),
            Err(TryLockError::Poisoned(_)) => Err(Error::internal(format!(
                "{call}: comm to {} is poisoned by an earlier panic",
                self.shared.peer
            ))),
        }
    }

    fn check_failed(&self, call: &str) -> Result<()> {
        match self.shared.failure() {
            Some(e) => Err(e.context(format!("{call}: comm already failed"))),
            None => Ok(()),
        }
    }

    fn slot_opaque(&self, i: usize) -> Result<Opaque> {
        Opaque::from_ptr(&self.slots[i] as *const Slot as *mut std::ffi::c_void)
            .ok_or_else(|| Error::internal("request slot address is NULL"))
    }

    fn too_many(&self, call: &str) -> Error {
        Error::invalid_usage(format!(
            "{call}: {MAX_REQUESTS} requests already outstanding on the connection to {} \
             (NCCL_NET_MAX_REQUESTS is {MAX_REQUESTS}; test() completed requests before posting more)",
            self.shared.peer
        ))
    }

    /// Posts a send of `size` bytes at `data`.
    pub fn isend(&self, data: *const u8, size: i32) -> Result<Opaque> {
        let peer = self.shared.peer;
        let size = usize::try_from(size)
            .map_err(|_| Error::invalid_argument(format!("isend: negative size {size} (connection to {peer})")))?;
        if size > 0 && data.is_null() {
            return Err(Error::invalid_argument(format!(
                "isend: NULL buffer for {size} bytes (connection to {peer})"
            )));
        }
        self.check_failed("isend")?;
        let mut g = self.lock("isend")?;
        let Side::Send(s) = &mut *g else {
            return Err(Error::internal("isend: comm state is not a send side"));
        };
        let i = s.slots.take().ok_or_else(|| self.too_many("isend"))?;
        let seq = s.next_seq;
        s.next_seq += 1;
        let inline = size <= self.inline_max;
        let chunk = if inline {
            0
        } else {
            wire::chunk_size(size, self.streams, self.min_chunk)
        };
        let hdr = Header {
            seq,
            size: size as u64,
            chunk: chunk as u32,
            flags: if inline { FLAG_INLINE } else { 0 },
        };
        s.reqs[i] = SendReq {
            ptr: data,
            size,
            seq,
            hdr: hdr.encode(),
            ctrl_len: HEADER_LEN + if inline { size } else { 0 },
            ctrl_done: 0,
        };
        if inline {
            self.shared.set_chunks(i, 0);
        } else {
            // Post chunks before writing the header: workers start moving data while we write it.
            // SAFETY: NCCL's send buffer holds `size` bytes until the request completes; send
            // chunks only read it.
            if let Err(e) = unsafe { self.post_chunks(i, seq, size, chunk, data as *mut u8) } {
                let e = e.context(format!("isend: connection to {peer}"));
                self.shared.fail(e.clone());
                s.slots.release(i);
                return Err(e);
            }
        }
        s.queue.push(i as u8);
        self.flush_ctrl(s);
        drop(g);
        self.slot_opaque(i)
    }

    /// Writes as much queued control data (headers, inline payloads) as the socket takes.
    fn flush_ctrl(&self, s: &mut SendSide) {
        while s.queue.len > 0 && !self.shared.is_failed() {
            let mut iov = [(std::ptr::null::<u8>(), 0usize); MAX_IOV];
            let mut k = 0;
            for q in 0..s.queue.len {
                if k + 2 > MAX_IOV {
                    break;
                }
                let r = &s.reqs[s.queue.get(q) as usize];
                if r.ctrl_done < HEADER_LEN {
                    iov[k] = (r.hdr[r.ctrl_done..].as_ptr(), HEADER_LEN - r.ctrl_done);
                    k += 1;
                }
                let inline_len = r.ctrl_len - HEADER_LEN;
                let from = r.ctrl_done.saturating_sub(HEADER_LEN);
                if from < inline_len {
                    // A raw range, never a slice: NCCL's memory is not turned into Rust references.
                    // SAFETY: from < inline_len = size, so the pointer stays inside NCCL's send buffer.
                    iov[k] = (unsafe { r.ptr.add(from) }, inline_len - from);
                    k += 1;
                }
            }
            // SAFETY: the header ranges lie in `s.reqs`, which nothing moves or writes during the call
            // (we hold `s` mutably); the payload ranges lie in NCCL's send buffers, which hold `size`
            // readable bytes until their requests complete.
            let sent = unsafe { sys::send_gather(s.ctrl.as_raw_fd(), &iov[..k]) };
            match sent {
                Ok(0) => return,
                Ok(mut n) => {
                    while n > 0 {
                        let Some(q) = s.queue.front() else { break };
                        let r = &mut s.reqs[q as usize];
                        let left = r.ctrl_len - r.ctrl_done;
                        if n >= left {
                            r.ctrl_done = r.ctrl_len;
                            n -= left;
                            s.queue.pop();
                        } else {
                            r.ctrl_done += n;
                            n = 0;
                        }
                    }
                }
                Err(e) if sys::is_would_block(&e) => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let seq = s.queue.front().map_or(s.next_seq, |q| s.reqs[q as usize].seq);
                    let what = format!(
                        "isend: connection to {} failed while sending message {seq} on the control socket",
                        self.shared.peer
                    );
                    self.shared.fail(liveness::socket_error(what, e, &self.shared.liveness));
                    return;
                }
            }
        }
    }

    /// Posts a receive into `cap` bytes at `data`.
    pub fn irecv(&self, data: *mut u8, cap: i32) -> Result<Opaque> {
        let peer = self.shared.peer;
        let cap = usize::try_from(cap)
            .map_err(|_| Error::invalid_argument(format!("irecv: negative size {cap} (connection to {peer})")))?;
        if cap > 0 && data.is_null() {
            return Err(Error::invalid_argument(format!(
                "irecv: NULL buffer for {cap} bytes (connection to {peer})"
            )));
        }
        self.check_failed("irecv")?;
        let mut g = self.lock("irecv")?;
        let Side::Recv(r) = &mut *g else {
            return Err(Error::internal("irecv: comm state is not a receive side"));
        };
        let i = r.slots.take().ok_or_else(|| self.too_many("irecv"))?;
        r.reqs[i] = RecvReq {
            ptr: data,
            cap,
            size: 0,
            seq: 0,
            phase: Phase::Header,
        };
        r.waiting.push(i as u8);
        self.progress_recv(r, None);
        drop(g);
        self.slot_opaque(i)
    }

    /// Reads more control bytes into the staging buffer. Ok(false): nothing available now.
    fn fill_stage(&self, r: &mut RecvSide, seq: u64) -> bool {
        // Callers consume the stage before refilling it, so at most a partial header moves here.
        if r.lo > 0 {
            r.stage.copy_within(r.lo..r.hi, 0);
            r.hi -= r.lo;
            r.lo = 0;
        }
        if r.hi == r.stage.len() {
            return true;
        }
        loop {
            match (&r.ctrl).read(&mut r.stage[r.hi..]) {
                Ok(0) => {
                    self.shared.fail(Error::connection_lost(format!(
                        "irecv: connection to {} closed while receiving message {seq}",
                        self.shared.peer
                    )));
                    return false;
                }
                Ok(n) => {
                    r.hi += n;
                    r.backoff = 0;
                    return true;
                }
                Err(e) if sys::is_would_block(&e) => {
                    #[cfg(test)]
                    {
                        r.idle_reads += 1;
                    }
                    return false;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail_io(e, seq);
                    return false;
                }
            }
        }
    }

    fn fail_io(&self, e: std::io::Error, seq: u64) {
        let what = format!(
            "irecv: connection to {} failed while receiving message {seq}",
            self.shared.peer
        );
        self.shared.fail(liveness::socket_error(what, e, &self.shared.liveness));
    }

    /// Reads headers and inline payloads for posted receives, in order, and hands striped
    /// messages' chunks to the workers. Failures are recorded on the comm for test() to report.
    ///
    /// Once receive `tested` (the one the caller is testing) is complete and the stage holds no
    /// further header, it returns without reading the socket again: that read would most likely
    /// find nothing (the sender has just finished a message) and cost the caller a syscall before
    /// test reports the message done; the next test (of the next receive) reads.
    fn progress_recv(&self, r: &mut RecvSide, tested: Option<usize>) {
        while !self.shared.is_failed() {
            let more = match r.cur {
                Some(i) => {
                    let more = self.read_inline(r, i);
                    if more && r.cur.is_none() && Some(i) == tested && r.hi - r.lo < HEADER_LEN {
                        return;
                    }
                    more
                }
                None => self.next_header(r),
            };
            if !more {
                return;
            }
        }
    }

    /// Moves the inline payload of receive `i` (the current one) from the stage into its buffer,
    /// reading more from the control socket. False when the socket has nothing more for now or
    /// the comm failed.
    fn read_inline(&self, r: &mut RecvSide, i: usize) -> bool {
        let req = &mut r.reqs[i];
        let Phase::Inline { mut done } = req.phase else {
            r.cur = None;
            return true;
        };
        let take = (req.size - done).min(r.hi - r.lo);
        if take > 0 {
            // SAFETY: done + take <= size <= cap, the posted buffer's length; the stage range is
            // initialised bytes of our own buffer, which cannot overlap NCCL's.
            unsafe { std::ptr::copy_nonoverlapping(r.stage[r.lo..].as_ptr(), req.ptr.add(done), take) };
            done += take;
            r.lo += take;
            req.phase = Phase::Inline { done };
        }
        let left = req.size - done;
        if left == 0 {
            req.phase = Phase::Done;
            r.cur = None;
            return true;
        }
        let seq = req.seq;
        if left >= DIRECT_READ_MIN {
            self.read_inline_direct(r, i, done, left)
        } else {
            self.fill_stage(r, seq)
        }
    }

    /// Reads the `left` bytes of receive `i`'s inline payload after the first `done` straight from
    /// the control socket into its buffer. False when the socket has nothing for now or failed.
    fn read_inline_direct(&self, r: &mut RecvSide, i: usize, done: usize, left: usize) -> bool {
        let req = &mut r.reqs[i];
        let seq = req.seq;
        // SAFETY: the range lies in the posted buffer (done + left = size <= cap), which only this
        // comm writes while the request is outstanding.
        match unsafe { sys::recv_raw(r.ctrl.as_raw_fd(), req.ptr.add(done), left) } {
            Ok(0) => {
                self.shared.fail(Error::connection_lost(format!(
                    "irecv: connection to {} closed while receiving message {seq}",
                    self.shared.peer
                )));
                false
            }
            Ok(n) => {
                req.phase = Phase::Inline { done: done + n };
                r.backoff = 0;
                true
            }
            Err(e) if sys::is_would_block(&e) => {
                #[cfg(test)]
                {
                    r.idle_reads += 1;
                }
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
            Err(e) => {
                self.fail_io(e, seq);
                false
            }
        }
    }

    /// Matches the next header on the control socket to the oldest waiting receive: an inline
    /// message becomes the current one, a striped message's chunks go to the workers. False when
    /// no receive waits, the socket has nothing for now, or the comm failed.
    fn next_header(&self, r: &mut RecvSide) -> bool {
        let peer = self.shared.peer;
        let Some(i) = r.waiting.front() else { return false };
        let i = i as usize;
        if r.hi - r.lo < HEADER_LEN {
            return self.fill_stage(r, r.next_seq);
        }
        let Some(h) = Header::decode(&r.stage[r.lo..r.hi]) else {
            self.shared.fail(Error::remote(format!(
                "irecv: malformed message header {} from {peer} (stream out of sync: does the peer run \
                 the same tcpxshim version?)",
                r.next_seq
            )));
            return false;
        };
        if let Err(e) = self.check_header(&h, r.next_seq, r.reqs[i].cap) {
            self.shared.fail(e);
            return false;
        }
        r.lo += HEADER_LEN;
        r.waiting.pop();
        r.next_seq += 1;
        let size = h.size as usize;
        let req = &mut r.reqs[i];
        req.seq = h.seq;
        req.size = size;
        if h.flags & FLAG_INLINE != 0 {
            req.phase = Phase::Inline { done: 0 };
            r.cur = Some(i);
            return true;
        }
        req.phase = Phase::Striped;
        // SAFETY: size <= cap (checked with the header), the length of the posted buffer, which
        // stays valid until the request completes or the comm is closed.
        if let Err(e) = unsafe { self.post_chunks(i, h.seq, size, h.chunk as usize, req.ptr) } {
            self.shared.fail(e.context(format!("irecv: connection to {peer}")));
            return false;
        }
        true
    }

    /// Sets the pending count of request slot `slot` and hands the chunks of message `seq`
    /// (`size` bytes at `base`, striped by `chunk`) to the workers of their streams.
    ///
    /// # Safety
    /// `base` points at `size` bytes of NCCL's buffer for the request, valid until the request
    /// completes or the comm is closed; a receive's buffer is written by no one else meanwhile.
    unsafe fn post_chunks(&self, slot: usize, seq: u64, size: usize, chunk: usize, base: *mut u8) -> Result<()> {
        let n = wire::chunks(seq, size, chunk, self.streams).count() as u32;
        self.shared.set_chunks(slot, n);
        for (stream, off, len) in wire::chunks(seq, size, chunk, self.streams) {
            let d = &self.data[stream];
            let task = Task {
                // SAFETY: off < size, so the pointer stays inside the buffer (caller's contract).
                ptr: unsafe { base.add(off) },
                len,
                done: 0,
                slot: slot as u8,
                seq,
            };
            self.pool.post(d.worker, d.token, task)?;
        }
        Ok(())
    }

    /// Progress for receives behind the tested one, with the back-off described at `RecvSide::skip`.
    fn look_ahead(&self, r: &mut RecvSide) {
        if r.skip > 0 {
            r.skip -= 1;
            return;
        }
        r.backoff = r.backoff.max(1);
        self.progress_recv(r, None);
        // A read that returned bytes has set the back-off to 0; otherwise back off further.
        r.skip = r.backoff;
        if r.backoff > 0 {
            r.backoff = (r.backoff * 2).min(LOOKAHEAD_MAX_SKIP);
        }
    }

    fn check_header(&self, h: &Header, want_seq: u64, cap: usize) -> Result<()> {
        let peer = self.shared.peer;
        if h.seq != want_seq {
            return Err(Error::remote(format!(
                "irecv: header from {peer} is for message {} but message {want_seq} was expected (stream out of sync)",
                h.seq
            )));
        }
        if h.size > i32::MAX as u64 {
            return Err(Error::remote(format!(
                "irecv: header of message {want_seq} from {peer} announces {} bytes, more than the 2^31-1 NCCL allows",
                h.size
            )));
        }
        let size = h.size as usize;
        if h.flags & FLAG_INLINE != 0 {
            if size > self.inline_max {
                return Err(Error::invalid_usage(format!(
                    "irecv: message {want_seq} from {peer} is sent inline with {size} bytes but this rank inlines at \
                     most {} (NCCL_TCPXSHIM_TCP_INLINE must match on every rank)",
                    self.inline_max
                )));
            }
        } else {
            let chunk = h.chunk as usize;
            if chunk == 0 || size == 0 || size.div_ceil(chunk) > self.streams {
                return Err(Error::remote(format!(
                    "irecv: message {want_seq} from {peer} has {size} bytes in chunks of {chunk}, which does not fit \
                     {} data streams (NCCL_TCPXSHIM_TCP_STREAMS must match on every rank)",
                    self.streams
                )));
            }
        }
        if size > cap {
            return Err(Error::invalid_usage(format!(
                "irecv: message {want_seq} from {peer} is {size} bytes but the posted receive buffer is only {cap} \
                 bytes (a send larger than its matching receive)"
            )));
        }
        Ok(())
    }

    /// Tests request slot `i`; true (and the slot freed) when complete.
    fn test_slot(&self, i: usize, sizes: Option<&mut [i32]>) -> Result<bool> {
        let mut g = self.lock("test")?;
        if self.pool.is_driven() {
            // No worker threads: this call moves the data sockets' bytes (every comm's).
            self.pool.drive();
        }
        let done_size = match &mut *g {
            Side::Send(s) => {
                if !s.slots.is_busy(i) {
                    return Err(self.not_outstanding());
                }
                if s.queue.len > 0 {
                    self.flush_ctrl(s);
                }
                let left = self.shared.chunks_left(i);
                let r = &s.reqs[i];
                let done = r.ctrl_done == r.ctrl_len && left == 0;
                let size = r.size;
                done.then(|| {
                    s.slots.release(i);
                    size
                })
            }
            Side::Recv(r) => {
                if !r.slots.is_busy(i) {
                    return Err(self.not_outstanding());
                }
                if matches!(r.reqs[i].phase, Phase::Header | Phase::Inline { .. }) {
                    // The tested request (or one before it) needs the control socket: read it now.
                    self.progress_recv(r, Some(i));
                } else if r.cur.is_some() || r.waiting.len > 0 {
                    // The tested request waits for workers only; reading ahead for later receives
                    // lets their chunks start early, but need not cost a syscall on every poll.
                    self.look_ahead(r);
                }
                let left = self.shared.chunks_left(i);
                let q = &r.reqs[i];
                let done = match q.phase {
                    Phase::Done => true,
                    Phase::Striped => left == 0,
                    _ => false,
                };
                let size = q.size;
                done.then(|| {
                    r.slots.release(i);
                    size
                })
            }
        };
        match done_size {
            Some(n) => {
                if let Some(first) = sizes.and_then(|s| s.first_mut()) {
                    *first = n as i32;
                }
                Ok(true)
            }
            None => match self.shared.failure() {
                Some(e) => Err(e),
                None => Ok(false),
            },
        }
    }

    /// What request slot `i` still waits for (see [`stall_detail`]). Reads no socket and moves
    /// nothing forward; never waits for the comm's lock.
    fn slot_detail(&self, i: usize) -> Option<String> {
        let g = match self.state.try_lock() {
            Ok(g) => g,
            // Only reads follow; a panic elsewhere cannot make them unsafe.
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            // Another thread drives the comm right now.
            Err(TryLockError::WouldBlock) => return None,
        };
        let left = self.shared.chunks_left(i);
        match &*g {
            Side::Send(s) if s.slots.is_busy(i) => s.reqs[i].detail(left),
            Side::Recv(r) if r.slots.is_busy(i) => r.detail(i, left),
            _ => None,
        }
    }

    fn not_outstanding(&self) -> Error {
        Error::invalid_argument(format!(
            "test: request on the connection to {} is not outstanding (tested again after completion?)",
            self.shared.peer
        ))
    }

    /// Takes the comm's data sockets away from the workers (waiting until they let go), then frees it.
    ///
    /// The wait has no time limit: NCCL frees its buffers once close returns, so returning (or
    /// leaking the comm and returning an error) while a worker may still read into them would risk
    /// memory corruption. A hang is the lesser evil, and a WARN every 10 s names the comm and peer.
    ///
    /// # Safety
    /// `o` must be a live comm of this transport; it is freed and must not be used afterwards.
    pub unsafe fn close(o: Opaque, tag: u64, call: &str) -> Result<()> {
        // SAFETY: forwarded caller contract.
        let c = unsafe { Comm::from_opaque(o, tag, call)? };
        log::debug!("{call}: closing {} (fds {:?})", c.describe(), c.fds);
        remove_all(&c.pool, &c.data, &format!("{call}: comm {:p} ({})", c, c.describe()));
        // SAFETY: the comm came from Box::into_raw in `create`, every worker has acknowledged letting go
        // of its sockets (or has stopped), so none refers to it or to NCCL's buffers any more, and NCCL
        // does not use a comm after closing it.
        drop(unsafe { Box::from_raw(o.as_ptr() as *mut Comm) });
        Ok(())
    }
}

/// The request slot behind `req`, checking that it is one.
///
/// # Safety
/// `req` must be a pointer this transport returned that has not been freed; if it is a request,
/// its comm must still be open.
unsafe fn request_slot<'a>(req: Opaque, call: &str) -> Result<&'a Slot> {
    // SAFETY: every object this transport hands out is #[repr(C)] with a u64 tag first (caller's
    // contract for liveness).
    let tag = unsafe { *(req.as_ptr() as *const u64) };
    if tag != TAG_REQ {
        return Err(Error::invalid_argument(format!(
            "{call}: {:p} is not a request of the built-in TCP transport",
            req.as_ptr()
        )));
    }
    // SAFETY: the tag identifies a Slot inside a live comm; its back pointer was set at creation.
    Ok(unsafe { &*(req.as_ptr() as *const Slot) })
}

/// Tests the request `req` (a slot of some comm).
///
/// # Safety
/// `req` must be a request returned by isend/irecv of a comm that is still open.
pub unsafe fn test_request(req: Opaque, sizes: Option<&mut [i32]>) -> Result<bool> {
    // SAFETY: forwarded caller contract.
    let slot = unsafe { request_slot(req, "test")? };
    // SAFETY: slots live inside their comm, so the comm is live too.
    let comm = unsafe { &*slot.comm };
    comm.test_slot(slot.index as usize, sizes)
}

/// What request `req` of comm `comm` still waits for, in words (see
/// `TcpTransport::stall_detail_of`); `None` when `req` is not an outstanding request of `comm`,
/// has everything it waits for, or when another thread holds the comm at this moment.
///
/// # Safety
/// `comm` must be an open comm of this transport and `req` a request isend/irecv returned on it.
pub unsafe fn stall_detail(comm: Opaque, req: Opaque) -> Option<String> {
    // SAFETY: forwarded caller contract.
    let slot = unsafe { request_slot(req, "stall detail") }.ok()?;
    if !std::ptr::eq(slot.comm, comm.as_ptr() as *const Comm) {
        return None;
    }
    // SAFETY: slots live inside their comm, which the caller keeps open.
    unsafe { &*slot.comm }.slot_detail(slot.index as usize)
}

/// Takes `socks` away from their workers, waiting until every worker has let go (see `Pool::remove`).
fn remove_all(pool: &Pool, socks: &[DataSock], who: &str) {
    let mut by_worker: Vec<Vec<usize>> = Vec::new();
    for d in socks {
        if by_worker.len() <= d.worker {
            by_worker.resize_with(d.worker + 1, Vec::new);
        }
        by_worker[d.worker].push(d.token);
    }
    for (w, tokens) in by_worker.into_iter().enumerate() {
        if !tokens.is_empty() {
            pool.remove(w, tokens, who);
        }
    }
}
