//! GPU memory for the built-in transport (NCCL_TCPXSHIM_TCP_CUDA=1): each CUDA registration gets
//! a host shadow of the same size, and a message at offset `o` of the registration travels
//! through offset `o` of the shadow. Sends copy device -> shadow before the bytes go out; receives
//! land in the shadow and are copied shadow -> device before test() reports them done, so a
//! completed receive is already in GPU memory and iflush has nothing left to do.
//!
//! Shadows are carved out of one pinned pool allocated when the transport starts
//! (NCCL_TCPXSHIM_TCP_CUDA_POOL); once it is full they are ordinary host memory, whose copies
//! the driver stages itself. Pinned memory is never allocated later: a page-locked allocation
//! synchronises the device, and while NCCL has a kernel running that waits for this very
//! transport (a peer's connection being set up while the first ranks already run), that wait
//! never ends.
//!
//! Copies are made by the calling thread (NCCL's proxy thread, which has NCCL's CUDA context
//! current) on a non-blocking stream of the transport's own, and waited for; the I/O workers
//! only ever see host memory.

use super::cuda::{Cuda, Pinned, Stream};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Alignment of the shadows carved out of the pool.
const CARVE_ALIGN: usize = 4096;

/// First-fit allocation of byte ranges `[0, len)`, with neighbours merged when freed.
#[derive(Debug)]
pub(super) struct Carver {
    /// Free ranges (offset, length), sorted by offset, never adjacent.
    free: Vec<(usize, usize)>,
}

impl Carver {
    pub(super) fn new(len: usize) -> Carver {
        Carver {
            free: if len > 0 { vec![(0, len)] } else { Vec::new() },
        }
    }

    /// An offset for `size` bytes (rounded up to CARVE_ALIGN), if a free range holds them.
    pub(super) fn alloc(&mut self, size: usize) -> Option<usize> {
        let size = size.max(1).checked_next_multiple_of(CARVE_ALIGN)?;
        let i = self.free.iter().position(|&(_, len)| len >= size)?;
        let (off, len) = self.free[i];
        if len == size {
            self.free.remove(i);
        } else {
            self.free[i] = (off + size, len - size);
        }
        Some(off)
    }

    /// Returns what `alloc(size)` gave at `off`.
    pub(super) fn release(&mut self, off: usize, size: usize) {
        let size = size.max(1).next_multiple_of(CARVE_ALIGN);
        let i = self.free.partition_point(|&(o, _)| o < off);
        self.free.insert(i, (off, size));
        if i + 1 < self.free.len() && off + size == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == off {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }

    /// Free bytes.
    pub(super) fn available(&self) -> usize {
        self.free.iter().map(|&(_, l)| l).sum()
    }
}

/// The pinned pool and what of it is free.
pub(super) struct Pool {
    mem: Pinned,
    carver: Mutex<Carver>,
}

/// The host side of one CUDA registration.
pub(super) enum Shadow {
    /// A piece of the pinned pool, given back when dropped.
    Pinned { pool: Arc<Pool>, off: usize, size: usize },
    /// Ordinary host memory.
    Pageable(Box<[u8]>),
}

impl Shadow {
    /// Start of the shadow.
    pub(super) fn as_ptr(&self) -> *mut u8 {
        match self {
            // SAFETY: off + size lies within the pool (the carver's invariant).
            Shadow::Pinned { pool, off, .. } => unsafe { pool.mem.as_ptr().add(*off) },
            Shadow::Pageable(b) => b.as_ptr() as *mut u8,
        }
    }
}

impl Drop for Shadow {
    fn drop(&mut self) {
        if let Shadow::Pinned { pool, off, size } = self {
            pool.carver
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .release(*off, *size);
        }
    }
}

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
    /// The copy stream: made at start when a context is current, else by the first copy.
    stream: OnceLock<Stream>,
    /// The pinned pool, if one could be allocated at start.
    pool: Option<Arc<Pool>>,
    /// Whether the INFO line about a full pool was written.
    told_full: AtomicBool,
}

impl Gpu {
    /// Allocates the pinned pool of `pool_bytes` and the copy stream now, while no NCCL kernel
    /// can be waiting for this transport (the caller is NCCL's init).
    pub(super) fn new(cuda: &'static Cuda, pool_bytes: usize) -> Gpu {
        let pool = if pool_bytes == 0 {
            None
        } else {
            match cuda.pinned(pool_bytes) {
                Ok(mem) => Some(Arc::new(Pool {
                    mem,
                    carver: Mutex::new(Carver::new(pool_bytes)),
                })),
                Err(e) => {
                    log::info!(
                        "built-in TCP transport: no pinned staging pool of {} MiB ({e}); GPU copies go through \
                         ordinary host memory",
                        pool_bytes >> 20
                    );
                    None
                }
            }
        };
        let stream = OnceLock::new();
        if let Ok(s) = cuda.stream() {
            let _ = stream.set(s);
        }
        Gpu {
            cuda,
            pending: Mutex::new(HashMap::new()),
            npending: AtomicUsize::new(0),
            stream,
            pool,
            told_full: AtomicBool::new(false),
        }
    }

    /// Bytes of the pinned pool (0: none).
    pub(super) fn pool_size(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.mem.len())
    }

    fn stream(&self) -> Result<Stream> {
        if let Some(s) = self.stream.get() {
            return Ok(*s);
        }
        let s = self.cuda.stream()?;
        // Two threads racing here each made a stream; one is kept, the other left to the context.
        Ok(*self.stream.get_or_init(|| s))
    }

    /// A shadow for a registration of `size` bytes: from the pinned pool while it has room.
    pub(super) fn shadow(&self, size: usize) -> Result<Shadow> {
        if let Some(pool) = &self.pool {
            let mut c = pool.carver.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(off) = c.alloc(size) {
                drop(c);
                return Ok(Shadow::Pinned {
                    pool: Arc::clone(pool),
                    off,
                    size,
                });
            }
            let free = c.available();
            drop(c);
            if !self.told_full.swap(true, Ordering::Relaxed) {
                log::info!(
                    "regMr: the pinned staging pool ({} MiB, {free} bytes free) has no room for {size} bytes; this and \
                     further registrations use ordinary host memory (slower copies; raise NCCL_TCPXSHIM_TCP_CUDA_POOL)",
                    pool.mem.len() >> 20
                );
            }
        }
        let mut v = Vec::new();
        v.try_reserve_exact(size)
            .map_err(|_| Error::system(format!("regMr: no host memory for a {size}-byte staging buffer")))?;
        v.resize(size, 0u8);
        Ok(Shadow::Pageable(v.into_boxed_slice()))
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
        _ => Err(Error::invalid_argument(format!(
            "{call}: buffer [{d:#x}, +{size}) lies outside its memory registration [{base:#x}, +{len})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::{offset_in, Carver, CARVE_ALIGN};

    #[test]
    fn the_carver_hands_out_disjoint_aligned_ranges_and_merges_them_back() {
        let mut c = Carver::new(10 * CARVE_ALIGN);
        let a = c.alloc(1).unwrap();
        let b = c.alloc(3 * CARVE_ALIGN).unwrap();
        let d = c.alloc(CARVE_ALIGN + 1).unwrap();
        assert_eq!((a, b, d), (0, CARVE_ALIGN, 4 * CARVE_ALIGN));
        assert_eq!(c.available(), 4 * CARVE_ALIGN);
        assert_eq!(c.alloc(5 * CARVE_ALIGN), None, "only 4 pages are left");
        c.release(b, 3 * CARVE_ALIGN);
        // first fit: the hole b left
        assert_eq!(c.alloc(2 * CARVE_ALIGN), Some(CARVE_ALIGN));
        c.release(CARVE_ALIGN, 2 * CARVE_ALIGN);
        c.release(a, 1);
        c.release(d, CARVE_ALIGN + 1);
        assert_eq!(
            c.free,
            vec![(0, 10 * CARVE_ALIGN)],
            "everything merged back into one range"
        );
        assert_eq!(c.alloc(10 * CARVE_ALIGN), Some(0));
        assert_eq!(c.alloc(1), None);
        assert_eq!(Carver::new(0).alloc(1), None);
        assert_eq!(Carver::new(CARVE_ALIGN).alloc(usize::MAX), None);
    }

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
