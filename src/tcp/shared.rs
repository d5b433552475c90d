//! The part of a comm that its I/O workers see: per-request chunk counts and the comm's first
//! failure. Comms create it and workers update it, so it lives apart from both.

use super::liveness::Liveness;
use crate::error::Error;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

/// Outstanding requests per comm (NCCL_NET_MAX_REQUESTS).
pub const MAX_REQUESTS: usize = crate::ffi::NCCL_NET_MAX_REQUESTS as usize;

/// The part of a comm that workers see.
pub struct Shared {
    /// The remote end of the connection.
    pub peer: SocketAddr,
    /// Keepalive and user timeout of the connection's sockets (for the words of a timeout).
    pub liveness: Liveness,
    /// Chunks of each request slot still with the workers.
    pending: [AtomicU32; MAX_REQUESTS],
    failed: AtomicBool,
    failure: Mutex<Option<Error>>,
}

impl Shared {
    /// A fresh shared part for a connection to `peer` whose sockets have `liveness`.
    pub fn new(peer: SocketAddr, liveness: Liveness) -> Shared {
        Shared {
            peer,
            liveness,
            pending: std::array::from_fn(|_| AtomicU32::new(0)),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
        }
    }

    /// The request in `slot` now has `n` chunks with the workers (set before they are posted).
    pub fn set_chunks(&self, slot: usize, n: u32) {
        self.pending[slot].store(n, Ordering::Release);
    }

    /// Chunks of the request in `slot` the workers have not finished yet.
    pub fn chunks_left(&self, slot: usize) -> u32 {
        // Acquire: pairs with `chunk_done`, so a count of 0 means the bytes are in place.
        self.pending[slot].load(Ordering::Acquire)
    }

    /// A worker finished one chunk of the request in `slot`.
    pub fn chunk_done(&self, slot: u8) {
        // Release: the chunk's bytes are in place before the count says so.
        self.pending[slot as usize].fetch_sub(1, Ordering::Release);
    }

    /// Records the first failure; the comm is unusable afterwards.
    pub fn fail(&self, err: Error) {
        let mut f = match self.failure.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if f.is_none() {
            *f = Some(err);
        }
        self.failed.store(true, Ordering::Release);
    }

    /// The recorded failure, if any.
    pub fn failure(&self) -> Option<Error> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        let f = match self.failure.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f.clone()
    }

    /// Whether a failure has been recorded.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}
