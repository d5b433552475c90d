//! Transfers over a connection: posting sends and receives of registered buffers and waiting
//! for them.
//!
//! Every transfer takes its buffer by value ([`SendBuf`], [`RecvBuf`]) and hands it back: on
//! completion, on "try again" ([`Posted::Busy`]) and on failure ([`OpError`]). A [`Pending`]
//! transfer owns its buffer until then. Dropped early, it closes the connection (so the transport
//! stops using the buffer) before the buffer is freed; leaked, it leaks the buffer too.

use super::buf::{piece, RecvBuf, SendBuf};
use super::conn::{secs, Backoff, Comm, Kind, RecvConn, SendConn};
use crate::error::{Error, Result};
use crate::transport::Opaque;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Tag used for every message (TCPX ignores tags; the built-in transport matches in order).
const TAG: i32 = 0x7C5;

/// Most requests a stream keeps in flight on one comm (NCCL keeps NCCL_STEPS = 8).
pub const MAX_INFLIGHT: usize = 8;

/// Request numbers, for messages.
static NEXT_INDEX: AtomicU64 = AtomicU64::new(1);

/// A failed transfer, with its buffer handed back. `?` turns it into a plain [`Error`] (the
/// buffer is then freed, which is safe: the transport no longer uses it).
pub struct OpError<B> {
    error: Error,
    buf: Option<B>,
}

impl<B> OpError<B> {
    pub(super) fn new(error: Error, buf: Option<B>) -> OpError<B> {
        OpError { error, buf }
    }

    /// What went wrong.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The buffer; `None` only where closing the connection failed, so the transport may still
    /// use the buffer: it then stays allocated for good.
    pub fn into_buf(self) -> Option<B> {
        self.buf
    }

    /// The error and the buffer.
    pub fn into_parts(self) -> (Error, Option<B>) {
        (self.error, self.buf)
    }
}

impl<B> From<OpError<B>> for Error {
    fn from(e: OpError<B>) -> Error {
        e.error
    }
}

impl<B> std::fmt::Debug for OpError<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OpError({:?}, buffer {})",
            self.error,
            if self.buf.is_some() { "back" } else { "kept" }
        )
    }
}

impl<B> std::fmt::Display for OpError<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl<B> std::error::Error for OpError<B> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// The outcome of a non-blocking post.
pub enum Posted<P, B> {
    /// The request is in flight.
    Posted(P),
    /// The transport said "try again"; here is the buffer back.
    Busy(B),
}

enum State {
    /// The transport's request, not completed yet.
    InFlight(Opaque),
    /// Completed with this many bytes.
    Done(usize),
    /// Given up; the connection was closed.
    Failed(Error),
}

/// A transfer in flight, owning its buffer until it completes. Test the transfers of one
/// connection in the order they were posted (TCPX requires it). Dropping one before it completes
/// closes the connection (so that the transport stops using the buffer), then frees the buffer;
/// leaking one (`std::mem::forget`) leaks the buffer, which the transport may still use.
pub struct Pending<'c, B> {
    c: &'c Comm<'c>,
    state: State,
    /// `None` once handed back.
    buf: Option<B>,
    /// The connection was closed while the request was outstanding, and closing failed: the
    /// transport may still use the buffer, which is therefore never freed.
    leak: bool,
    size: usize,
    index: u64,
}

/// A send in flight.
pub type PendingSend<'c, B> = Pending<'c, B>;
/// A receive in flight.
pub type PendingRecv<'c, B> = Pending<'c, B>;

impl<'c, B> Pending<'c, B> {
    fn new(c: &'c Comm<'c>, req: Opaque, buf: B, size: usize) -> Pending<'c, B> {
        Pending {
            c,
            state: State::InFlight(req),
            buf: Some(buf),
            leak: false,
            size,
            index: NEXT_INDEX.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn what(&self) -> String {
        match self.c.kind {
            Kind::Send => format!("{}: send #{} ({} B)", self.c.label, self.index, self.size),
            Kind::Recv => format!("{}: receive #{} ({} B posted)", self.c.label, self.index, self.size),
        }
    }

    fn kind(&self) -> &'static str {
        match self.c.kind {
            Kind::Send => "send",
            Kind::Recv => "receive",
        }
    }

    /// Gives the request up: closes the connection if the request is still outstanding, so the
    /// transport stops using the buffer (unless closing fails: then the buffer is kept for good).
    fn give_up(&mut self, err: Error) -> Error {
        if matches!(self.state, State::InFlight(_)) {
            self.c.abandon(&err.to_string());
            self.leak = !self.c.released();
        }
        self.state = State::Failed(err.clone());
        err
    }

    /// Tests once: `Some(bytes)` once complete (sent size, or received size).
    pub fn poll(&mut self) -> Result<Option<usize>> {
        let req = match &self.state {
            State::Done(n) => return Ok(Some(*n)),
            State::Failed(e) => return Err(e.clone()),
            State::InFlight(req) => *req,
        };
        // The request exists only while its comm is open; another request's failure may have
        // closed it.
        if let Err(e) = self.c.get() {
            return Err(self.give_up(e));
        }
        let mut sizes = [0i32; 1];
        // SAFETY: `req` was returned by isend/irecv on this connection's comm, which is open
        // (checked just above), and has not completed (its state is InFlight).
        match unsafe { self.c.net.test(req, Some(&mut sizes)) } {
            Err(e) => Err(self.give_up(e.context(self.what()))),
            Ok(false) => Ok(None),
            Ok(true) => self.completed(sizes[0]),
        }
    }

    /// Records a completion of `n` bytes (the transport's request is gone).
    fn completed(&mut self, n: i32) -> Result<Option<usize>> {
        let n = usize::try_from(n).unwrap_or(0);
        if self.c.kind == Kind::Recv && n > self.size {
            let e = Error::remote(format!("{}: received {n} B into a {} B buffer", self.what(), self.size));
            self.c.abandon(&e.to_string());
            self.state = State::Failed(e.clone());
            return Err(e);
        }
        self.state = State::Done(n);
        Ok(Some(n))
    }

    /// Whether the request completed.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done(_))
    }

    /// Waits until complete, failing if no completion comes within `timeout` (the connection is
    /// then closed). Returns the byte count and the buffer; a failure hands the buffer back too.
    pub fn wait(mut self, timeout: Duration) -> std::result::Result<(usize, B), OpError<B>> {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            match self.poll() {
                Ok(Some(n)) => return Ok((n, self.buf.take().expect("the buffer is held until handed back"))),
                Ok(None) => {}
                Err(e) => return Err(OpError::new(e, self.take_buf())),
            }
            if start.elapsed() >= timeout {
                let e = self.give_up(self.timeout_error(timeout));
                return Err(OpError::new(e, self.take_buf()));
            }
            backoff.snooze();
        }
    }

    fn timeout_error(&self, timeout: Duration) -> Error {
        Error::remote(format!(
            "{}: {} #{} of {} B did not complete within {}; the peer stopped {}",
            self.c.label,
            self.kind(),
            self.index,
            self.size,
            secs(timeout),
            if self.c.kind == Kind::Send {
                "receiving"
            } else {
                "sending"
            }
        ))
    }

    /// Hands the buffer back. A request still in flight is given up first: the connection is
    /// closed, so the transport stops using the buffer. `None` where closing failed: the buffer
    /// then stays allocated for good.
    pub fn into_buf(mut self) -> Option<B> {
        if matches!(self.state, State::InFlight(_)) {
            let why = format!(
                "{} #{} of {} B was given up before it completed",
                self.kind(),
                self.index,
                self.size
            );
            self.give_up(Error::invalid_usage(why));
        }
        self.take_buf()
    }

    /// The buffer, unless the transport may still use it: then it is leaked (never freed).
    fn take_buf(&mut self) -> Option<B> {
        let buf = self.buf.take();
        if self.leak {
            std::mem::forget(buf);
            return None;
        }
        buf
    }
}

impl<B> Drop for Pending<'_, B> {
    fn drop(&mut self) {
        // Held aside while giving up: should closing panic, the buffer is leaked, not freed.
        let buf = ManuallyDrop::new(self.buf.take());
        if matches!(self.state, State::InFlight(_)) {
            let why = format!(
                "{} #{} of {} B was dropped before it completed",
                self.kind(),
                self.index,
                self.size
            );
            self.give_up(Error::invalid_usage(why));
        }
        // The connection is closed by now if the request was outstanding: the buffer can go,
        // unless closing failed and the transport may still use it.
        if !self.leak {
            drop(ManuallyDrop::into_inner(buf));
        }
    }
}

/// Posts with retries on "try again" until `timeout`.
fn post_retry<P, B>(
    timeout: Duration,
    what: impl Fn() -> String,
    mut buf: B,
    mut try_post: impl FnMut(B) -> std::result::Result<Posted<P, B>, OpError<B>>,
) -> std::result::Result<P, OpError<B>> {
    let start = Instant::now();
    let mut backoff = Backoff::new();
    loop {
        match try_post(buf)? {
            Posted::Posted(p) => return Ok(p),
            Posted::Busy(b) => buf = b,
        }
        if start.elapsed() >= timeout {
            let e = Error::remote(format!(
                "{}: the transport kept answering \"try again\" for {} (connection not ready?)",
                what(),
                secs(timeout)
            ));
            return Err(OpError::new(e, Some(buf)));
        }
        backoff.snooze();
    }
}

/// The outcome of a post: the request, "try again" with the buffer, or an error with it.
pub type PostResult<P, B> = std::result::Result<Posted<P, B>, OpError<B>>;

impl SendConn<'_> {
    /// Posts a send of the first `len` bytes of `buf` once; `Busy` gives the buffer back on
    /// "try again".
    pub fn try_isend<'c, B: SendBuf>(&'c self, buf: B, len: usize) -> PostResult<PendingSend<'c, B>, B> {
        let c: &'c Comm<'c> = &self.c;
        let (comm, mr, ptr, size) = match piece(&buf).post_args(c, len) {
            Ok(args) => args,
            Err(e) => return Err(OpError::new(e, Some(buf))),
        };
        // SAFETY: `comm` is this connection's open comm and `mr` the registration of `buf` on it,
        // covering the `len` bytes at `ptr` (post_args checked all three). If the transport
        // takes the request, the pending send owns `buf` from here on: the bytes stay allocated
        // and unwritten (RegBuf gives write access only to its unique owner) until the request
        // completes or the connection is closed, and for good if the pending send is leaked.
        match unsafe { c.net.isend(comm, ptr, size, TAG, Some(mr)) } {
            Ok(Some(req)) => Ok(Posted::Posted(Pending::new(c, req, buf, len))),
            Ok(None) => Ok(Posted::Busy(buf)),
            Err(e) => Err(OpError::new(
                e.context(format!("{}: isend of {len} B", c.label)),
                Some(buf),
            )),
        }
    }

    /// Posts a send of the first `len` bytes of `buf`, retrying "try again" until `timeout`.
    pub fn isend<'c, B: SendBuf>(
        &'c self,
        buf: B,
        len: usize,
        timeout: Duration,
    ) -> std::result::Result<PendingSend<'c, B>, OpError<B>> {
        let what = || format!("{}: isend of {len} B", self.c.label);
        post_retry(timeout, what, buf, |b| self.try_isend(b, len))
    }

    /// Sends the first `len` bytes of `buf` and waits for completion (none within `timeout`:
    /// error); hands the buffer back.
    pub fn send<B: SendBuf>(&self, buf: B, len: usize, timeout: Duration) -> std::result::Result<B, OpError<B>> {
        self.isend(buf, len, timeout)?.wait(timeout).map(|(_, b)| b)
    }
}

impl RecvConn<'_> {
    /// Posts a receive of at most `len` bytes into the start of `buf` once; `Busy` gives the
    /// buffer back on "try again".
    pub fn try_irecv<'c, B: RecvBuf>(&'c self, buf: B, len: usize) -> PostResult<PendingRecv<'c, B>, B> {
        let c: &'c Comm<'c> = &self.c;
        let (comm, mr, ptr, size) = match piece(&buf).post_args(c, len) {
            Ok(args) => args,
            Err(e) => return Err(OpError::new(e, Some(buf))),
        };
        // SAFETY: `comm` is this connection's open comm and `mr` the registration of `buf` on it,
        // covering the `len` bytes at `ptr` (post_args checked all three). If the transport
        // takes the request, the pending receive owns `buf` (a RecvBuf is a unique RegBuf) from
        // here on, so nothing else reads or writes the bytes, and they stay allocated, until the
        // request completes or the connection is closed, and for good if it is leaked.
        match unsafe { c.net.irecv(comm, &[ptr], &[size], &[TAG], &[Some(mr)]) } {
            Ok(Some(req)) => Ok(Posted::Posted(Pending::new(c, req, buf, len))),
            Ok(None) => Ok(Posted::Busy(buf)),
            Err(e) => Err(OpError::new(
                e.context(format!("{}: irecv of {len} B", c.label)),
                Some(buf),
            )),
        }
    }

    /// Posts a receive of at most `len` bytes into `buf`, retrying "try again" until `timeout`.
    pub fn irecv<'c, B: RecvBuf>(
        &'c self,
        buf: B,
        len: usize,
        timeout: Duration,
    ) -> std::result::Result<PendingRecv<'c, B>, OpError<B>> {
        let what = || format!("{}: irecv of {len} B", self.c.label);
        post_retry(timeout, what, buf, |b| self.try_irecv(b, len))
    }

    /// Receives one message of at most `len` bytes into `buf`, returning its size and the buffer
    /// (no completion within `timeout`: error).
    pub fn recv<B: RecvBuf>(
        &self,
        buf: B,
        len: usize,
        timeout: Duration,
    ) -> std::result::Result<(usize, B), OpError<B>> {
        self.irecv(buf, len, timeout)?.wait(timeout)
    }
}
