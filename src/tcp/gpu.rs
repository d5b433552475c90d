//! GPU memory for the built-in transport (NCCL_TCPXSHIM_TCP_CUDA=1): each CUDA registration gets
//! a pinned host shadow of the same size, and a message at offset `o` of the registration travels
//! through offset `o` of the shadow. Sends copy device -> shadow before the bytes go out; receives
//! land in the shadow and are copied shadow -> device before test() reports them done, so a
//! completed receive is already in GPU memory and iflush has nothing left to do.
//!
//! Copies are made by the calling thread (NCCL's proxy thread, which has NCCL's CUDA context
//! current) on a non-blocking stream of the transport's own, created on first use, and waited
//! for; the I/O workers only ever see host memory.

use crate::cuda::{Cuda, Pinned, Stream};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// A receive into GPU memory waiting for its copy from the shadow.
struct PendingCopy {
    comm: usize,
    device: *mut c_void,
    host: *mut u8,
}

// SAFETY: addresses only; the copy is made by whichever thread tests the request, as NCCL does.
unsafe impl Send for PendingCopy {}

/// The GPU side of the transport.
pub(super) struct Gpu {
    cuda: &'static Cuda,
    pending: Mutex<HashMap<usize, PendingCopy>>,
    /// Entries in `pending`, read without the lock so host-only traffic pays nothing.
    npending: AtomicUsize,
    /// The copy stream, created by the first thread that copies (it needs a current context).
    stream: OnceLock<Stream>,
}

impl Gpu {
    pub(super) fn new(cuda: &'static Cuda) -> Gpu {
        Gpu {
            cuda,
            pending: Mutex::new(HashMap::new()),
            npending: AtomicUsize::new(0),
            stream: OnceLock::new(),
        }
    }

    fn stream(&self) -> Result<Stream> {
        if let Some(s) = self.stream.get() {
            return Ok(*s);
        }
        let s = self.cuda.stream()?;
        // Two threads racing here each made a stream; one is kept, the other left to the context.
        Ok(*self.stream.get_or_init(|| s))
    }

    /// A pinned shadow for a registration of `size` bytes.
    pub(super) fn shadow(&self, size: usize) -> Result<Pinned> {
        self.cuda
            .pinned(size)
            .map_err(|e| e.context(format!("regMr: pinned host buffer of {size} bytes")))
    }

    /// Copies a message about to be sent from GPU memory into its place in the shadow.
    ///
    /// # Safety
    /// `device..device+size` is GPU memory of the current context; `host..host+size` lies in a
    /// live shadow.
    pub(super) unsafe fn stage_send(&self, host: *mut u8, device: *const c_void, size: usize) -> Result<()> {
        let stream = self.stream().map_err(|e| e.context("isend from GPU memory"))?;
        // SAFETY: the caller's contract.
        unsafe { self.cuda.copy_to_host(stream, host, device, size) }.map_err(|e| e.context("isend from GPU memory"))
    }

    /// Remembers that request `req` of comm `comm` receives into the shadow at `host` for `device`.
    pub(super) fn expect(&self, req: usize, comm: usize, device: *mut c_void, host: *mut u8) {
        let mut p = self.lock();
        if p.insert(req, PendingCopy { comm, device, host }).is_none() {
            self.npending.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forgets whatever was expected of request address `req` (it now belongs to a host receive).
    pub(super) fn forget(&self, req: usize) {
        if self.npending.load(Ordering::Relaxed) == 0 {
            return;
        }
        if self.lock().remove(&req).is_some() {
            self.npending.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Whether any receive into GPU memory is outstanding.
    pub(super) fn busy(&self) -> bool {
        self.npending.load(Ordering::Relaxed) > 0
    }

    /// After request `req` completed with `received` bytes: copies them to GPU memory if it was a
    /// receive into GPU memory.
    pub(super) fn complete(&self, req: usize, received: usize) -> Result<()> {
        let Some(pc) = self.take(req) else { return Ok(()) };
        let stream = self.stream().map_err(|e| e.context("test: receive into GPU memory"))?;
        // SAFETY: `host` lies in the shadow of the registration the receive was posted with and
        // `device` in the GPU buffer it mirrors; both stay registered until NCCL saw the receive
        // complete, and `received` is at most the posted size.
        unsafe { self.cuda.copy_to_device(stream, pc.device, pc.host, received) }
            .map_err(|e| e.context("test: receive into GPU memory"))
    }

    /// Drops the bookkeeping of a failed request.
    pub(super) fn fail(&self, req: usize) {
        let _ = self.take(req);
    }

    /// Drops the bookkeeping of every request of a closing comm.
    pub(super) fn close(&self, comm: usize) {
        if !self.busy() {
            return;
        }
        let mut p = self.lock();
        p.retain(|_, pc| pc.comm != comm);
        self.npending.store(p.len(), Ordering::Relaxed);
    }

    fn take(&self, req: usize) -> Option<PendingCopy> {
        if !self.busy() {
            return None;
        }
        let pc = self.lock().remove(&req);
        if pc.is_some() {
            self.npending.fetch_sub(1, Ordering::Relaxed);
        }
        pc
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, PendingCopy>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where `data..data+size` falls in a registration starting at `base` of `len` bytes.
pub(super) fn offset_in(call: &str, base: usize, len: usize, data: *const c_void, size: usize) -> Result<usize> {
    let d = data as usize;
    match d.checked_sub(base) {
        Some(off) if off.checked_add(size).is_some_and(|end| end <= len) => Ok(off),
        _ => Err(Error::InvalidArgument(format!(
            "{call}: buffer [{d:#x}, +{size}) lies outside its memory registration [{base:#x}, +{len})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::offset_in;

    #[test]
    fn offsets_inside_the_registration_only() {
        let base = 0x1000;
        assert_eq!(offset_in("isend", base, 100, 0x1000 as *const _, 100).unwrap(), 0);
        assert_eq!(offset_in("isend", base, 100, 0x1010 as *const _, 10).unwrap(), 0x10);
        assert!(offset_in("isend", base, 100, 0x1010 as *const _, 100).is_err());
        assert!(offset_in("isend", base, 100, 0x0fff as *const _, 1).is_err());
        let e = offset_in("irecv", base, 100, usize::MAX as *const _, 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("irecv") && e.contains("outside its memory registration"),
            "{e}"
        );
    }
}
