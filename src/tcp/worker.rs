//! The fixed pool of I/O worker threads that move striped chunks over data sockets.
//!
//! Each data socket belongs to one worker for its whole life. A worker keeps a FIFO of chunk
//! tasks per socket and moves bytes straight between the socket and NCCL's buffer. Comms talk to
//! workers only through a command channel; adding and removing sockets is acknowledged, so a comm
//! knows when no worker will touch its sockets or buffers again. Those waits have no time limit:
//! returning early could let a worker write into a buffer NCCL has freed; a slow acknowledgement
//! is logged every [`ACK_WARN_EVERY`] instead.
//!
//! A worker that stops (transport dropped, or a panic) fails every request it still had chunks
//! for, so test() reports an error instead of "not done" forever.

use super::shared::{Shared, MAX_REQUESTS};
use super::sys;
use crate::error::{Error, Result};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Token of the waker; socket tokens are slab indices, far below it.
const WAKER: Token = Token(usize::MAX);
/// Bytes moved on one socket before the worker turns to its other sockets.
const BUDGET: usize = 8 << 20;
/// How long a new transport waits for each worker thread to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// While a comm waits for a worker's acknowledgement, a WARN this often says so.
const ACK_WARN_EVERY: Duration = Duration::from_secs(10);
/// While a comm waits for a worker's acknowledgement, it wakes the worker again this often (in case
/// the wake-up after queueing the command failed; a spurious one costs the worker one loop).
const ACK_REWAKE_EVERY: Duration = Duration::from_secs(1);

/// Which way a data socket carries bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Bytes go from NCCL's buffer to the socket.
    Send,
    /// Bytes go from the socket to NCCL's buffer.
    Recv,
}

/// One chunk of one message on one socket.
pub struct Task {
    /// Start of the chunk in NCCL's buffer.
    pub ptr: *mut u8,
    /// Chunk length (never 0).
    pub len: usize,
    /// Bytes already moved.
    pub done: usize,
    /// Request slot whose pending count drops when the chunk is done.
    pub slot: u8,
    /// Message number, for error messages.
    pub seq: u64,
}

// SAFETY: the pointer is NCCL's buffer, which stays valid until the request completes or the comm
// is closed; closing first removes the socket and its tasks from the worker and waits for the
// acknowledgement (or for the worker to have stopped, dropping every task it had).
unsafe impl Send for Task {}

enum Cmd {
    Add {
        stream: mio::net::TcpStream,
        dir: Dir,
        index: usize,
        shared: Arc<Shared>,
        ack: Sender<io::Result<usize>>,
    },
    Task {
        token: usize,
        task: Task,
    },
    Remove {
        tokens: Vec<usize>,
        ack: Sender<()>,
    },
    Stop,
}

struct WorkerRef {
    tx: Sender<Cmd>,
    waker: Waker,
    sleeping: Arc<AtomicBool>,
    /// Set by the worker before it drains its last commands and exits.
    stopped: Arc<AtomicBool>,
}

/// The workers of one transport.
pub struct Pool {
    workers: Vec<WorkerRef>,
    /// With no worker threads (NCCL_TCPXSHIM_TCP_WORKERS=0): the one worker, whose I/O the
    /// callers run themselves ([`Pool::drive`]) instead of a thread.
    driven: Option<Mutex<Worker>>,
    next: AtomicUsize,
    /// Wake-ups of sleeping workers by [`Pool::send`] (an eventfd write each, on the caller's thread).
    wakes: AtomicU64,
    joins: Mutex<Vec<JoinHandle<()>>>,
    /// Distinguishes this pool's thread names ("txs<id>-io<n>") from other transports'.
    pub id: u64,
}

impl Pool {
    /// Starts `n` worker threads, pinned and polling after traffic as `plan` says; with `n` 0,
    /// none: the callers drive the I/O from their own threads ([`Pool::drive`]).
    pub fn new(n: usize, id: u64, plan: &super::cpus::CpuPlan) -> Result<Pool> {
        let spin = Duration::from_micros(plan.spin_us());
        let mut pool = Pool {
            workers: Vec::with_capacity(n),
            driven: None,
            next: AtomicUsize::new(0),
            wakes: AtomicU64::new(0),
            joins: Mutex::new(Vec::with_capacity(n)),
            id,
        };
        if n == 0 {
            let poll = Poll::new().map_err(|e| Error::io("built-in TCP transport: creating epoll instance", e))?;
            // Nothing is ever sent on this channel: commands run at once under the mutex.
            let (_tx, rx) = crossbeam_channel::bounded(1);
            let w = Worker::new(
                poll,
                rx,
                Arc::new(AtomicBool::new(false)),
                Arc::new(AtomicBool::new(false)),
                Duration::ZERO,
            );
            pool.driven = Some(Mutex::new(w));
            return Ok(pool);
        }
        for i in 0..n {
            let poll = Poll::new().map_err(|e| Error::io("built-in TCP transport: creating epoll instance", e))?;
            let waker = Waker::new(poll.registry(), WAKER)
                .map_err(|e| Error::io("built-in TCP transport: creating worker waker", e))?;
            let (tx, rx) = crossbeam_channel::unbounded();
            let sleeping = Arc::new(AtomicBool::new(false));
            let stopped = Arc::new(AtomicBool::new(false));
            let (sl, st) = (sleeping.clone(), stopped.clone());
            let (started_tx, started) = crossbeam_channel::bounded(1);
            let pin = plan.pin_of(i);
            let join = std::thread::Builder::new()
                .name(format!("txs{id}-io{i}"))
                .spawn(move || {
                    if let Some(cpu) = pin {
                        if let Err(e) = sys::pin_to(cpu) {
                            log::warn!(
                                "built-in TCP transport: pinning I/O worker {i} to CPU {cpu} (NCCL_TCPXSHIM_TCP_CPUS): {e}"
                            );
                        }
                    }
                    let _ = started_tx.send(());
                    Worker::new(poll, rx, sl, st, spin).run()
                })
                .map_err(|e| {
                    Error::io(
                        format!("built-in TCP transport: starting I/O worker {i} (NCCL_TCPXSHIM_TCP_WORKERS)"),
                        e,
                    )
                })?;
            pool.workers.push(WorkerRef {
                tx,
                waker,
                sleeping,
                stopped,
            });
            if let Ok(mut j) = pool.joins.lock() {
                j.push(join);
            }
            // Wait until the thread runs, so a transport that exists has all its workers (and thread names).
            started.recv_timeout(START_TIMEOUT).map_err(|_| {
                Error::internal(format!(
                    "built-in TCP transport: I/O worker {i} did not start within {START_TIMEOUT:?}"
                ))
            })?;
        }
        Ok(pool)
    }

    /// The worker the next socket goes to (round robin over the whole transport).
    pub fn pick(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len().max(1)
    }

    /// True when no worker thread runs: the callers move the bytes ([`Pool::drive`]).
    pub fn is_driven(&self) -> bool {
        self.driven.is_some()
    }

    /// The driven worker, locked (a panic while it was held left nothing half-done that matters
    /// more than stopping: its entries are consistent between calls).
    fn driven_worker(&self) -> Option<std::sync::MutexGuard<'_, Worker>> {
        self.driven
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Moves bytes on every socket of a driven pool until each blocks or its budget is spent;
    /// returns at once when another thread is doing so, and does nothing with worker threads.
    pub fn drive(&self) {
        let Some(m) = self.driven.as_ref() else { return };
        let mut w = match m.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::WouldBlock) => return,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        w.drive_once();
    }

    /// Wake-ups of sleeping workers so far (each one an eventfd write by the thread that posted).
    #[cfg(test)]
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    /// Queues a command for worker `w` and wakes it if it sleeps.
    ///
    /// An error means the command may not run: the worker has stopped (the command was dropped,
    /// acknowledgement sender included) or could not be woken (the command is queued and runs
    /// once the worker wakes for another reason). Commands with an acknowledgement must wait for
    /// it either way ([`Pool::wait_ack`]).
    fn send(&self, w: usize, cmd: Cmd) -> Result<()> {
        if let Some(mut d) = self.driven_worker() {
            if d.stopped.load(Ordering::SeqCst) {
                // Dropping the command answers nothing: waiters see the worker gone.
                return Err(Error::internal(
                    "built-in TCP transport: the transport's I/O has stopped",
                ));
            }
            d.command(cmd);
            return Ok(());
        }
        let wr = &self.workers[w];
        let stopped = || Error::internal(format!("built-in TCP transport: I/O worker {w} has stopped"));
        wr.tx.send(cmd).map_err(|_| stopped())?;
        // Pairs with the fence in the worker: either it sees the command before sleeping, or we see it asleep.
        fence(Ordering::SeqCst);
        if wr.stopped.load(Ordering::SeqCst) {
            // The worker may have drained its queue for the last time before our command arrived.
            return Err(stopped());
        }
        if wr.sleeping.load(Ordering::SeqCst) {
            self.wakes.fetch_add(1, Ordering::Relaxed);
            wr.waker
                .wake()
                .map_err(|e| Error::io(format!("built-in TCP transport: waking I/O worker {w}"), e))?;
        }
        Ok(())
    }

    /// Waits, without a time limit, for worker `w` to acknowledge a command; `None` when the worker
    /// dropped the command unanswered (it had stopped). `who` and `doing` name the wait in the WARN
    /// logged every [`ACK_WARN_EVERY`].
    fn wait_ack<T>(&self, w: usize, done: &Receiver<T>, who: &str, doing: &str) -> Option<T> {
        let start = Instant::now();
        let mut next_warn = ACK_WARN_EVERY;
        loop {
            match done.recv_timeout(ACK_REWAKE_EVERY) {
                Ok(v) => return Some(v),
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    if start.elapsed() >= next_warn {
                        next_warn += ACK_WARN_EVERY;
                        log::warn!(
                            "built-in TCP transport: {who}: still waiting after {}s for I/O worker txs{}-io{w} to \
                             {doing}",
                            start.elapsed().as_secs(),
                            self.id
                        );
                    }
                    if let Some(wr) = self.workers.get(w) {
                        if let Err(e) = wr.waker.wake() {
                            log::warn!("built-in TCP transport: waking I/O worker {w}: {e}");
                        }
                    }
                }
            }
        }
    }

    /// Hands a data socket to worker `w`; returns its token there. `who` names the connection.
    pub fn add(
        &self,
        w: usize,
        stream: mio::net::TcpStream,
        dir: Dir,
        index: usize,
        shared: Arc<Shared>,
        who: &str,
    ) -> Result<usize> {
        let (ack, done) = crossbeam_channel::bounded(1);
        let cmd = Cmd::Add {
            stream,
            dir,
            index,
            shared,
            ack,
        };
        if let Err(e) = self.send(w, cmd) {
            // Still wait: a queued command may yet register the socket, which must not be left behind.
            log::debug!("{who}: {e}");
        }
        match self.wait_ack(w, &done, who, "register a data socket") {
            Some(r) => r.map_err(|e| {
                Error::io(
                    format!("built-in TCP transport: registering data socket with worker {w}"),
                    e,
                )
            }),
            None => Err(Error::internal(format!(
                "built-in TCP transport: I/O worker {w} has stopped (transport shut down?)"
            ))),
        }
    }

    /// Queues a chunk on a socket of worker `w`.
    pub fn post(&self, w: usize, token: usize, task: Task) -> Result<()> {
        self.send(w, Cmd::Task { token, task })
    }

    /// Removes sockets (and their queued tasks) from worker `w` and closes them; returns once the
    /// worker has let go of them, so their buffers and comm may be freed. Waits as long as that
    /// takes (see [`Pool::wait_ack`]); `who` names the connection in the WARN a slow worker causes.
    pub fn remove(&self, w: usize, tokens: Vec<usize>, who: &str) {
        let (ack, done) = crossbeam_channel::bounded(1);
        if let Err(e) = self.send(w, Cmd::Remove { tokens, ack }) {
            log::debug!("{who}: {e}");
        }
        // None: the worker stopped and dropped the command; a stopped worker has closed every
        // socket it had and touches no buffer any more.
        let _ = self.wait_ack(w, &done, who, "release its data sockets");
    }

    /// Stops and joins all workers; they close every socket they still own. Idempotent.
    pub fn stop(&self) {
        log::debug!("built-in TCP transport: stopping I/O workers txs{}-io*", self.id);
        if let Some(mut d) = self.driven_worker() {
            if !d.stopped.load(Ordering::SeqCst) {
                d.shutdown();
            }
            return;
        }
        for w in 0..self.workers.len() {
            let _ = self.send(w, Cmd::Stop);
        }
        let joins = match self.joins.lock() {
            Ok(mut j) => std::mem::take(&mut *j),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        for j in joins {
            let name = j.thread().name().unwrap_or("?").to_string();
            if let Err(p) = j.join() {
                // Where it panicked was logged when it did (see export::on_panic).
                log::error!(
                    "built-in TCP transport: I/O worker {name} panicked: {}",
                    crate::error::panic_message(&*p)
                );
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Entry {
    stream: mio::net::TcpStream,
    fd: RawFd,
    dir: Dir,
    index: usize,
    shared: Arc<Shared>,
    tasks: VecDeque<Task>,
    /// False after an I/O call returned EWOULDBLOCK, until the next readiness event.
    ready: bool,
    /// In the worker's active list.
    queued: bool,
    /// Failed; its tasks are dropped and the comm reports the error.
    dead: bool,
}

impl Entry {
    /// Moves bytes for queued tasks until the socket blocks, the queue empties or the budget is spent.
    fn progress(&mut self) {
        let mut moved = 0usize;
        while let Some(t) = self.tasks.front_mut() {
            // SAFETY: the task's range lies inside NCCL's buffer for an outstanding request (see `Task`);
            // on the receive side no one else touches it until the request completes.
            let r = unsafe {
                let p = t.ptr.add(t.done);
                match self.dir {
                    Dir::Send => sys::send_raw(self.fd, p, t.len - t.done),
                    Dir::Recv => sys::recv_raw(self.fd, p, t.len - t.done),
                }
            };
            match r {
                Ok(0) => {
                    let (seq, peer, i) = (t.seq, self.shared.peer, self.index);
                    let what = if self.dir == Dir::Recv { "receiving" } else { "sending" };
                    self.fail(Error::connection_lost(format!(
                        "connection to {peer} closed while {what} message {seq} (data stream {i})"
                    )));
                    return;
                }
                Ok(n) => {
                    t.done += n;
                    moved += n;
                    if t.done == t.len {
                        let slot = t.slot;
                        self.tasks.pop_front();
                        self.shared.chunk_done(slot);
                    }
                    if moved >= BUDGET {
                        return;
                    }
                }
                Err(e) if sys::is_would_block(&e) => {
                    self.ready = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let (seq, peer, i) = (t.seq, self.shared.peer, self.index);
                    let what = if self.dir == Dir::Recv { "receiving" } else { "sending" };
                    let msg = format!("connection to {peer} failed while {what} message {seq} (data stream {i})");
                    let err = super::liveness::socket_error(msg, e, &self.shared.liveness);
                    self.fail(err);
                    return;
                }
            }
        }
    }

    fn fail(&mut self, err: Error) {
        // The error reaches the caller through the comm's next call, which reports it (or the
        // shim's recovery replaces the connection, and nothing is wrong): INFO here, not WARN.
        log::info!("built-in TCP transport: {err}");
        self.shared.fail(err);
        self.dead = true;
        self.tasks.clear();
    }
}

struct Worker {
    poll: Poll,
    rx: Receiver<Cmd>,
    sleeping: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    active: VecDeque<usize>,
    /// The readiness buffer of a driven pool's rounds (a worker thread has its own in `run`).
    events: Option<Events>,
    /// How long the thread keeps polling after its last traffic before it sleeps.
    spin: Duration,
}

impl Worker {
    fn new(
        poll: Poll,
        rx: Receiver<Cmd>,
        sleeping: Arc<AtomicBool>,
        stopped: Arc<AtomicBool>,
        spin: Duration,
    ) -> Worker {
        Worker {
            poll,
            rx,
            sleeping,
            stopped,
            entries: Vec::new(),
            free: Vec::new(),
            active: VecDeque::new(),
            events: None,
            spin,
        }
    }

    fn activate(&mut self, token: usize) {
        if let Some(Some(e)) = self.entries.get_mut(token) {
            if e.ready && !e.queued && !e.dead && !e.tasks.is_empty() {
                e.queued = true;
                self.active.push_back(token);
            }
        }
    }

    /// Handles one command; false on Stop.
    fn command(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Add {
                mut stream,
                dir,
                index,
                shared,
                ack,
            } => {
                let token = self.free.pop().unwrap_or(self.entries.len());
                let interest = match dir {
                    Dir::Send => Interest::WRITABLE,
                    Dir::Recv => Interest::READABLE,
                };
                let r = self.poll.registry().register(&mut stream, Token(token), interest);
                let reply = r.map(|()| {
                    let entry = Entry {
                        fd: stream.as_raw_fd(),
                        stream,
                        dir,
                        index,
                        shared,
                        tasks: VecDeque::with_capacity(MAX_REQUESTS),
                        ready: true,
                        queued: false,
                        dead: false,
                    };
                    if token == self.entries.len() {
                        self.entries.push(Some(entry));
                    } else {
                        self.entries[token] = Some(entry);
                    }
                    token
                });
                if reply.is_err() && token != self.entries.len() {
                    self.free.push(token);
                }
                let _ = ack.send(reply);
            }
            Cmd::Task { token, task } => match self.entries.get_mut(token) {
                Some(Some(e)) if !e.dead => {
                    e.tasks.push_back(task);
                    self.activate(token);
                }
                Some(Some(_)) => {}
                _ => log::error!("built-in TCP transport: I/O worker got a chunk for unknown socket {token}"),
            },
            Cmd::Remove { tokens, ack } => {
                for &t in &tokens {
                    if let Some(slot) = self.entries.get_mut(t) {
                        if let Some(mut e) = slot.take() {
                            let _ = self.poll.registry().deregister(&mut e.stream);
                            self.free.push(t);
                        }
                    }
                }
                self.active.retain(|t| !tokens.contains(t));
                let _ = ack.send(());
            }
            Cmd::Stop => return false,
        }
        true
    }

    /// Gives every active socket one turn.
    fn progress_active(&mut self) {
        for _ in 0..self.active.len() {
            let Some(token) = self.active.pop_front() else { break };
            if let Some(Some(e)) = self.entries.get_mut(token) {
                e.queued = false;
                e.progress();
            }
            self.activate(token);
        }
    }

    /// One round of a driven pool, on the caller's thread: the sockets that can move bytes, then
    /// the readiness the kernel reports now (without waiting), then those sockets.
    fn drive_once(&mut self) {
        self.progress_active();
        let mut events = self.events.take().unwrap_or_else(|| Events::with_capacity(64));
        match self.poll.poll(&mut events, Some(Duration::ZERO)) {
            Ok(()) => {
                for ev in events.iter() {
                    let token = ev.token().0;
                    if let Some(Some(e)) = self.entries.get_mut(token) {
                        e.ready = true;
                    }
                    self.activate(token);
                }
                self.progress_active();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => log::error!("built-in TCP transport: polling the data sockets failed: {e}"),
        }
        self.events = Some(events);
    }

    /// Runs until Stop or until the pool goes away; dropping the worker then fails what it still had.
    ///
    /// With nothing left to do it sleeps in epoll until a socket is ready or [`Pool::send`] wakes
    /// it; with a spin time it first keeps polling (epoll without waiting, no `sleeping` flag, so
    /// posts need no wake-up) until that long has passed since its last traffic (a command, a
    /// ready socket, bytes moved).
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let mut last_traffic: Option<Instant> = None;
        loop {
            let mut traffic = false;
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => {
                        traffic = true;
                        if !self.command(cmd) {
                            return;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            traffic |= !self.active.is_empty();
            self.progress_active();
            if !self.spin.is_zero() && traffic {
                last_traffic = Some(Instant::now());
            }
            let spinning = self.active.is_empty() && last_traffic.is_some_and(|t| t.elapsed() < self.spin);
            let timeout = if self.active.is_empty() && !spinning {
                last_traffic = None;
                self.sleeping.store(true, Ordering::SeqCst);
                // Pairs with the fence in Pool::send (store-buffering pattern).
                fence(Ordering::SeqCst);
                if !self.rx.is_empty() {
                    self.sleeping.store(false, Ordering::SeqCst);
                    continue;
                }
                None
            } else {
                Some(Duration::ZERO)
            };
            let r = self.poll.poll(&mut events, timeout);
            self.sleeping.store(false, Ordering::SeqCst);
            if let Err(e) = r {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("built-in TCP transport: I/O worker poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
                continue;
            }
            for ev in events.iter() {
                let token = ev.token().0;
                if ev.token() == WAKER {
                    continue;
                }
                if let Some(Some(e)) = self.entries.get_mut(token) {
                    e.ready = true;
                    if !self.spin.is_zero() {
                        last_traffic = Some(Instant::now());
                    }
                }
                self.activate(token);
            }
        }
    }
}

impl Drop for Worker {
    /// The worker is exiting (Stop, the pool gone, or a panic): answers the commands still queued and
    /// fails every request it still had chunks for, so test() reports an error instead of waiting
    /// forever, then closes its sockets.
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Worker {
    /// What a stopping worker does (see `Drop`); a driven pool's stop calls it directly.
    fn shutdown(&mut self) {
        // Pairs with the fence in Pool::send: a command this drain misses, its sender sees `stopped`.
        self.stopped.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Add { ack, .. } => {
                    // Dropping the command closes the socket.
                    let _ = ack.send(Err(io::Error::other("the I/O worker is stopping")));
                }
                Cmd::Task { .. } | Cmd::Remove { .. } => {
                    self.command(cmd);
                }
                Cmd::Stop => {}
            }
        }
        for e in self.entries.iter().flatten() {
            let Some(t) = e.tasks.front() else { continue };
            let what = if e.dir == Dir::Recv { "receiving" } else { "sending" };
            let err = Error::internal(format!(
                "I/O worker stopped while {what} message {} on data stream {} of the connection to {} (built-in \
                 TCP transport shut down with the comm still in use)",
                t.seq, e.index, e.shared.peer
            ));
            log::warn!("built-in TCP transport: {err}");
            e.shared.fail(err);
        }
        // Close the sockets now, before the command channel goes (which answers waiting removes).
        self.entries.clear();
        self.active.clear();
    }
}
