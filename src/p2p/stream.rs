//! Pipelined streams: many messages over one connection with up to [`MAX_INFLIGHT`] in flight,
//! each from (or into) its own slot of one registered buffer. The slots are pieces split off the
//! buffer ([`RegBuf::split_off`]), so every request owns its slot like any other transfer; the
//! buffer is joined again and handed back at the end.

use super::buf::{RegBuf, SendBuf};
use super::conn::{secs, Backoff, Comm, Kind, RecvConn, SendConn};
use super::xfer::{OpError, Pending, PostResult, Posted, MAX_INFLIGHT};
use crate::error::{Error, Result};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Rewrites slot contents before message `i` goes out: `fill(i, slot)`.
pub type FillFn<'f> = &'f mut dyn FnMut(usize, &mut [u8]);

/// The outcome of a stream: the buffer back, whole; or the error, with the buffer whole where
/// every part of it could be taken back from the transport.
pub type StreamResult<'b> = std::result::Result<RegBuf<'b>, OpError<RegBuf<'b>>>;

impl SendConn<'_> {
    /// Sends `count` messages of `size` bytes with up to `depth` (at most [`MAX_INFLIGHT`]) in
    /// flight, message `i` from slot `i % (buf.len() / size)` of `buf`.
    ///
    /// With `fill`, each slot is rewritten by `fill(i, slot)` just before message `i` goes out
    /// (never while in flight, so fewer slots limit the depth); without it, the first `size`
    /// bytes go out every time, shared by up to `depth` sends at once. Fails when nothing
    /// completes for `timeout`. Hands the buffer back, on failure inside the error.
    pub fn send_stream<'b>(
        &self,
        buf: RegBuf<'b>,
        size: usize,
        count: usize,
        depth: usize,
        timeout: Duration,
        fill: Option<FillFn<'_>>,
    ) -> StreamResult<'b> {
        let nslots = match slots_of(&self.c, buf.len(), size) {
            Ok(n) => n,
            Err(e) => return Err(OpError::new(e, Some(buf))),
        };
        let depth = depth.clamp(1, MAX_INFLIGHT);
        let Some(fill) = fill else {
            return self.send_repeated(buf, size, count, depth, timeout);
        };
        let (slots, rest) = split_slots(buf, size, nslots);
        let mut s = Stream::new(&self.c, slots);
        let res = s.run(
            Plan { count, depth, timeout },
            |i, b: &mut RegBuf<'b>| fill(i, b),
            |b| self.try_isend(b, size),
            |_, _, _| Ok(()),
        );
        rejoin(s.into_slots(), rest, res)
    }

    /// The unfilled stream: the first `size` bytes of `buf`, shared read-only by the sends.
    fn send_repeated<'b>(
        &self,
        mut buf: RegBuf<'b>,
        size: usize,
        count: usize,
        depth: usize,
        timeout: Duration,
    ) -> StreamResult<'b> {
        let rest = buf.split_off(size);
        let one = Rc::new(buf);
        let mut s = Stream::new(&self.c, vec![Rc::clone(&one); depth]);
        let res = s.run(
            Plan { count, depth, timeout },
            |_, _| {},
            |b| self.try_isend(b, size),
            |_, _, _| Ok(()),
        );
        drop(s.into_slots());
        // Unique again unless a send had to keep its clone (closing the connection failed).
        let head = Rc::try_unwrap(one).ok();
        rejoin(vec![head], rest, res)
    }
}

impl RecvConn<'_> {
    /// Receives `count` messages of exactly `size` bytes with up to `depth` (at most
    /// [`MAX_INFLIGHT`], and at most `buf.len() / size`) in flight, message `i` into slot
    /// `i % (buf.len() / size)`. `check(i, data)` sees each message once it has arrived; an error
    /// from it stops the stream. Fails when nothing completes for `timeout`. Hands the buffer
    /// back, on failure inside the error.
    pub fn recv_stream<'b>(
        &self,
        buf: RegBuf<'b>,
        size: usize,
        count: usize,
        depth: usize,
        timeout: Duration,
        check: &mut dyn FnMut(usize, &[u8]) -> Result<()>,
    ) -> StreamResult<'b> {
        let nslots = match slots_of(&self.c, buf.len(), size) {
            Ok(n) => n,
            Err(e) => return Err(OpError::new(e, Some(buf))),
        };
        let depth = depth.clamp(1, MAX_INFLIGHT).min(nslots);
        let (slots, rest) = split_slots(buf, size, nslots);
        let label = &self.c.label;
        let mut s = Stream::new(&self.c, slots);
        let res = s.run(
            Plan { count, depth, timeout },
            |_, _| {},
            |b| self.try_irecv(b, size),
            |i, n, b: &RegBuf<'b>| {
                if n != size {
                    return Err(Error::remote(format!(
                        "{label}: message {i} has {n} B, expected {size} B"
                    )));
                }
                check(i, &b[..n])
            },
        );
        rejoin(s.into_slots(), rest, res)
    }
}

/// The number of `size`-byte slots in a buffer of `len` bytes (one for empty messages).
fn slots_of(c: &Comm<'_>, len: usize, size: usize) -> Result<usize> {
    if size == 0 {
        return Ok(1);
    }
    if len < size {
        return Err(Error::invalid_argument(format!(
            "{}: buffer of {len} B is smaller than the message size {size} B",
            c.label
        )));
    }
    Ok(len / size)
}

/// `nslots` pieces of `size` bytes split off the start of `buf` (one empty piece for 0-byte
/// messages), and the rest.
fn split_slots(mut buf: RegBuf<'_>, size: usize, nslots: usize) -> (Vec<RegBuf<'_>>, RegBuf<'_>) {
    let mut slots = Vec::with_capacity(nslots);
    for _ in 0..nslots {
        let rest = buf.split_off(size);
        slots.push(buf);
        buf = rest;
    }
    (slots, buf)
}

/// The buffer joined from its slots and the rest, if every part came back.
fn join<'b>(slots: Vec<Option<RegBuf<'b>>>, rest: RegBuf<'b>) -> Option<RegBuf<'b>> {
    let mut whole: Option<RegBuf<'b>> = None;
    for part in slots.into_iter().chain(std::iter::once(Some(rest))) {
        let part = part?;
        match whole.as_mut() {
            None => whole = Some(part),
            Some(w) => w.unsplit(part).ok()?,
        }
    }
    whole
}

/// The stream's outcome with the buffer joined again.
fn rejoin<'b>(slots: Vec<Option<RegBuf<'b>>>, rest: RegBuf<'b>, res: Result<()>) -> StreamResult<'b> {
    match (res, join(slots, rest)) {
        (Ok(()), Some(buf)) => Ok(buf),
        (Ok(()), None) => Err(OpError::new(
            Error::internal("stream: a slot did not come back after the last completion"),
            None,
        )),
        (Err(e), buf) => Err(OpError::new(e, buf)),
    }
}

/// How many messages a stream moves, how many at once, and how long it may make no progress.
#[derive(Clone, Copy)]
struct Plan {
    count: usize,
    depth: usize,
    timeout: Duration,
}

/// The pipeline shared by both directions: free slots, and requests in flight (oldest first).
struct Stream<'c, B> {
    c: &'c Comm<'c>,
    slots: Vec<Option<B>>,
    inflight: VecDeque<(usize, Pending<'c, B>)>,
}

impl<'c, B: SendBuf> Stream<'c, B> {
    fn new(c: &'c Comm<'c>, slots: Vec<B>) -> Stream<'c, B> {
        let inflight = VecDeque::with_capacity(slots.len().min(MAX_INFLIGHT));
        Stream {
            c,
            slots: slots.into_iter().map(Some).collect(),
            inflight,
        }
    }

    /// Keeps up to `depth` requests in flight, tests the oldest (FIFO), hands completed slots to
    /// `done` and reuses them, until `count` messages have completed.
    fn run(
        &mut self,
        plan: Plan,
        mut fill: impl FnMut(usize, &mut B),
        mut try_post: impl FnMut(B) -> PostResult<Pending<'c, B>, B>,
        mut done: impl FnMut(usize, usize, &B) -> Result<()>,
    ) -> Result<()> {
        let depth = plan.depth.min(self.slots.len()).max(1);
        let (mut posted, mut completed, mut filled) = (0usize, 0usize, false);
        let mut last_progress = Instant::now();
        let mut backoff = Backoff::new();
        while completed < plan.count {
            let mut progressed = false;
            if posted < plan.count
                && self.inflight.len() < depth
                && self.post(posted, &mut filled, &mut fill, &mut try_post)?
            {
                posted += 1;
                progressed = true;
            }
            if self.complete_front(&mut done)? {
                completed += 1;
                progressed = true;
            }
            if progressed {
                last_progress = Instant::now();
                backoff.reset();
                continue;
            }
            if last_progress.elapsed() >= plan.timeout {
                return Err(self.stall_error(plan, completed));
            }
            backoff.snooze();
        }
        Ok(())
    }

    /// Tries to post message `i` from its slot (filled once, before its first attempt); true
    /// when it is in flight.
    fn post(
        &mut self,
        i: usize,
        filled: &mut bool,
        fill: &mut impl FnMut(usize, &mut B),
        try_post: &mut impl FnMut(B) -> PostResult<Pending<'c, B>, B>,
    ) -> Result<bool> {
        let slot = i % self.slots.len();
        let mut b = self.slots[slot]
            .take()
            .expect("a slot is free once its previous message completed");
        if !*filled {
            fill(i, &mut b);
            *filled = true;
        }
        match try_post(b) {
            Ok(Posted::Posted(p)) => {
                self.inflight.push_back((i, p));
                *filled = false;
                Ok(true)
            }
            Ok(Posted::Busy(b)) => {
                self.slots[slot] = Some(b);
                Ok(false)
            }
            Err(e) => {
                let (e, b) = e.into_parts();
                self.slots[slot] = b;
                Err(e)
            }
        }
    }

    /// Tests the oldest request; true when it completed (its slot is then free again).
    fn complete_front(&mut self, done: &mut impl FnMut(usize, usize, &B) -> Result<()>) -> Result<bool> {
        let Some((_, front)) = self.inflight.front_mut() else {
            return Ok(false);
        };
        let Some(n) = front.poll()? else {
            return Ok(false);
        };
        let (i, p) = self.inflight.pop_front().expect("the front exists");
        let b = p.into_buf().expect("a completed request hands its buffer back");
        let res = done(i, n, &b);
        let nslots = self.slots.len();
        self.slots[i % nslots] = Some(b);
        res.map(|()| true)
    }

    fn stall_error(&self, plan: Plan, completed: usize) -> Error {
        let state = if self.inflight.is_empty() {
            "the transport kept answering \"try again\" to new requests".to_string()
        } else {
            format!("{} in flight", self.inflight.len())
        };
        Error::remote(format!(
            "{}: no progress for {} at message {} of {} ({state}); the peer stopped {}",
            self.c.label,
            secs(plan.timeout),
            completed + 1,
            plan.count,
            if self.c.kind == Kind::Send {
                "receiving"
            } else {
                "sending"
            }
        ))
    }

    /// The slots back: requests still in flight (after a failure) are given up, which closes the
    /// connection first; a slot stays empty where the transport may still use it.
    fn into_slots(mut self) -> Vec<Option<B>> {
        let n = self.slots.len();
        while let Some((i, p)) = self.inflight.pop_front() {
            self.slots[i % n] = p.into_buf();
        }
        self.slots
    }
}
