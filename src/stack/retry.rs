//! Connect retry: a connect that was refused, found the peer unreachable or timed out is tried
//! again with backoff until `NCCL_TCPXSHIM_CONNECT_TIMEOUT`, over any inner transport.
//!
//! NCCL calls connect() again and again with the same handle buffer until it returns a comm, so
//! the layer never blocks: after a failure it answers "not yet" (`Ok(None)`) until the backoff has
//! passed (10 ms, doubling up to 1 s), then makes a fresh attempt. Before that attempt it puts
//! back the handle bytes as they were at the first call: an inner plugin may keep state in the
//! buffer (TCPX writes a process-local pointer at offset 80 on its first connect), and a fresh
//! attempt must start from the handle the listener made. The state of a connect is keyed by the
//! handle buffer's address and dropped when the connect succeeds or finally fails; if the buffer
//! no longer holds what the failed attempt left in it, it is another connection's handle, and
//! the old state is dropped too.
//!
//! TCPX retries a refused connect itself (up to 20,000 times, 1 ms apart), so over an inner
//! plugin named `GPUDirectTCPX*` a refused connect is not retried again here (that would
//! multiply TCPX's 20 s by the shim's attempts); its timeouts and unreachable peers are.
//!
//! An error is retried when its kind is `Refused` or `Timeout` (the built-in transport and the
//! fault layer), or when the OS error behind it says refused, unreachable or timed out (what
//! errno a loaded plugin's failed connect left, see `src/plugin`).

use crate::config::CONNECT_TIMEOUT;
use crate::error::{Error, ErrorKind, Result};
use crate::ffi::{DevHandle, HANDLE_SIZE};
use crate::lock;
use crate::stack::Layer;
use crate::transport::{Opaque, Transport};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The first wait after a failed attempt.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Connects in retry at once; beyond this, new failures go to the caller unretried.
const MAX_TRACKED: usize = 4096;
/// A connect in retry that nobody polled for this long is forgotten.
const ABANDON_AFTER: Duration = Duration::from_secs(60);
/// At most one INFO line per connect in this interval.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Why a connect attempt failed, as far as retrying goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Nobody listens at the peer's address (ECONNREFUSED).
    Refused,
    /// No route to the peer (EHOSTUNREACH, ENETUNREACH, EHOSTDOWN).
    Unreachable,
    /// The attempt timed out.
    TimedOut,
}

impl Cause {
    /// The cause of a connect error, if retrying can help.
    pub fn of(e: &Error) -> Option<Cause> {
        if let Some(os) = e.io_source() {
            match os.raw_os_error() {
                Some(libc::ECONNREFUSED) => return Some(Cause::Refused),
                Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN) => return Some(Cause::Unreachable),
                Some(libc::ETIMEDOUT) => return Some(Cause::TimedOut),
                _ => {}
            }
            match os.kind() {
                std::io::ErrorKind::ConnectionRefused => return Some(Cause::Refused),
                std::io::ErrorKind::TimedOut => return Some(Cause::TimedOut),
                _ => {}
            }
        }
        match e.kind() {
            ErrorKind::Refused => Some(Cause::Refused),
            ErrorKind::Timeout => Some(Cause::TimedOut),
            _ => None,
        }
    }
}

/// One connect in retry.
struct Attempt {
    /// The handle as the first call gave it.
    saved: [u8; HANDLE_SIZE],
    /// The handle as the last failed attempt left it, while waiting for the next one.
    left: Option<[u8; HANDLE_SIZE]>,
    started: Instant,
    next_at: Instant,
    backoff: Duration,
    failures: u32,
    last: Option<Error>,
    logged: Option<Instant>,
    touched: Instant,
}

impl Attempt {
    fn new(handle: &[u8; HANDLE_SIZE], now: Instant) -> Attempt {
        Attempt {
            saved: *handle,
            left: None,
            started: now,
            next_at: now,
            backoff: FIRST_BACKOFF,
            failures: 0,
            last: None,
            logged: None,
            touched: now,
        }
    }
}

/// The connect retry layer.
pub struct Retry {
    inner: Box<dyn Transport>,
    timeout: Duration,
    /// The inner plugin is TCPX, which retries refused connects itself.
    tcpx: bool,
    attempts: Mutex<HashMap<usize, Attempt>>,
}

/// Whether an inner transport's name is TCPX's (`GPUDirectTCPX_v7` and its relatives).
pub fn is_tcpx(name: &str) -> bool {
    name.to_ascii_lowercase().starts_with("gpudirecttcpx")
}

impl Retry {
    /// Retries failed connects over `inner` for up to `timeout`.
    pub fn new(inner: Box<dyn Transport>, timeout: Duration) -> Retry {
        let tcpx = is_tcpx(inner.name());
        Retry {
            inner,
            timeout,
            tcpx,
            attempts: Mutex::new(HashMap::new()),
        }
    }

    /// Connects in retry now (for tests).
    pub fn in_retry(&self) -> usize {
        lock(&self.attempts).len()
    }

    fn retries(&self, cause: Cause) -> bool {
        !(self.tcpx && cause == Cause::Refused)
    }

    /// What happens after a failed attempt of the connect at `key`: `Ok(None)` to wait and try
    /// again, or the error for the caller.
    fn failed(&self, key: usize, handle: &[u8; HANDLE_SIZE], e: Error) -> Result<Option<Opaque>> {
        let now = Instant::now();
        let mut map = lock(&self.attempts);
        let cause = Cause::of(&e).filter(|c| self.retries(*c));
        let Some(cause) = cause else {
            map.remove(&key);
            return Err(e);
        };
        let Some(a) = map.get_mut(&key) else {
            return Err(e);
        };
        a.failures += 1;
        let elapsed = now.duration_since(a.started);
        if elapsed + a.backoff > self.timeout {
            let a = map
                .remove(&key)
                .unwrap_or_else(|| unreachable!("the entry was just found"));
            drop(map);
            return Err(e.context(format!(
                "gave up after {} failed attempt(s) in {:.1} s ({}={} s; check that the peer rank is alive and \
                 reachable, or raise it); last cause ({})",
                a.failures,
                elapsed.as_secs_f64(),
                CONNECT_TIMEOUT.name,
                self.timeout.as_secs(),
                cause_text(cause),
            )));
        }
        let wait = a.backoff;
        a.next_at = now + wait;
        a.backoff = (a.backoff * 2).min(MAX_BACKOFF);
        a.left = Some(*handle);
        a.touched = now;
        if a.logged.map_or(true, |t| now.duration_since(t) >= LOG_EVERY) {
            a.logged = Some(now);
            log::info!(
                "connect: attempt {} failed ({}: {e}); retrying in {} ms, for up to {} s in all ({})",
                a.failures,
                cause_text(cause),
                wait.as_millis(),
                self.timeout.as_secs(),
                CONNECT_TIMEOUT.name
            );
        }
        a.last = Some(e);
        Ok(None)
    }
}

fn cause_text(c: Cause) -> &'static str {
    match c {
        Cause::Refused => "refused",
        Cause::Unreachable => "unreachable",
        Cause::TimedOut => "timed out",
    }
}

impl Layer for Retry {
    fn inner(&self) -> &dyn Transport {
        &*self.inner
    }

    unsafe fn connect(
        &self,
        dev: i32,
        handle: &mut [u8; HANDLE_SIZE],
        dev_handle: *mut *mut DevHandle,
    ) -> Result<Option<Opaque>> {
        let key = handle.as_ptr() as usize;
        let now = Instant::now();
        {
            let mut map = lock(&self.attempts);
            let mut fresh = true;
            if let Some(a) = map.get_mut(&key) {
                match a.left {
                    // The inner connect is in progress: nothing to do here.
                    None => fresh = false,
                    // Another connection's handle in the same buffer: start over.
                    Some(left) if left != *handle => {}
                    Some(_) if now < a.next_at => {
                        a.touched = now;
                        return Ok(None);
                    }
                    Some(_) => {
                        // A fresh attempt, from the handle as the listener made it.
                        handle.copy_from_slice(&a.saved);
                        a.left = None;
                        fresh = false;
                    }
                }
                a.touched = now;
            }
            if fresh {
                map.retain(|_, a| now.duration_since(a.touched) < ABANDON_AFTER);
                if map.len() < MAX_TRACKED {
                    map.insert(key, Attempt::new(handle, now));
                } else {
                    map.remove(&key);
                }
            }
        }
        // SAFETY: forwarded under the caller's contract; the handle holds what the listener made
        // (restored above) or what the inner transport left in it during this attempt.
        match unsafe { self.inner.connect(dev, handle, dev_handle) } {
            Ok(Some(c)) => {
                if let Some(a) = lock(&self.attempts).remove(&key) {
                    if a.failures > 0 {
                        log::info!(
                            "connect: connected after {} failed attempt(s) in {:.1} s (last: {})",
                            a.failures,
                            now.duration_since(a.started).as_secs_f64(),
                            a.last.map(|e| e.to_string()).unwrap_or_default()
                        );
                    }
                }
                Ok(Some(c))
            }
            Ok(None) => Ok(None),
            Err(e) => self.failed(key, handle, e),
        }
    }
}

#[cfg(test)]
mod tests;
