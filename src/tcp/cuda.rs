//! The CUDA driver API, loaded at run time with dlopen: tcpxshim has no link-time CUDA
//! dependency, and on a machine without a GPU driver this module simply reports "unavailable".
//!
//! Only what the built-in transport's GPU-memory mode needs: pinned host buffers, and copies
//! between device memory and them, issued from the calling thread (NCCL's proxy thread, which has
//! NCCL's CUDA context current) on a stream of their own that does not synchronise with other
//! streams. A copy on the legacy default stream would wait for NCCL's running kernel, which waits
//! for the very data being copied: a deadlock.

use crate::error::{Error, Result};
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

type CuResult = c_int;
type CuDevicePtr = u64;

const CUDA_SUCCESS: CuResult = 0;
const CU_MEMHOSTALLOC_PORTABLE: c_uint = 0x01;
const CU_STREAM_NON_BLOCKING: c_uint = 0x01;

/// A CUstream, kept as an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stream(usize);

/// The driver entry points tcpxshim uses.
pub struct Cuda {
    mem_host_alloc: unsafe extern "C" fn(*mut *mut c_void, usize, c_uint) -> CuResult,
    mem_free_host: unsafe extern "C" fn(*mut c_void) -> CuResult,
    memcpy_dtoh: unsafe extern "C" fn(*mut c_void, CuDevicePtr, usize, *mut c_void) -> CuResult,
    memcpy_htod: unsafe extern "C" fn(CuDevicePtr, *const c_void, usize, *mut c_void) -> CuResult,
    stream_create: unsafe extern "C" fn(*mut *mut c_void, c_uint) -> CuResult,
    stream_synchronize: unsafe extern "C" fn(*mut c_void) -> CuResult,
    ctx_get_current: unsafe extern "C" fn(*mut *mut c_void) -> CuResult,
    get_error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    /// Number of CUDA devices the driver sees.
    pub devices: i32,
    // Never unloaded: pinned buffers and NCCL's context outlive any one comm.
    _lib: Library,
}

impl Cuda {
    fn load() -> Result<Cuda> {
        // SAFETY: loading the CUDA driver runs its initialisers, which is what using CUDA means.
        let lib = unsafe { Library::open(Some("libcuda.so.1"), RTLD_NOW | RTLD_LOCAL) }
            .map_err(|e| Error::system(format!("the CUDA driver (libcuda.so.1) cannot be loaded: {e}")))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol is the CUDA driver function of that name; the type written at
                // the use site is its documented C prototype.
                *unsafe { lib.get($name) }.map_err(|e| {
                    Error::system(format!(
                        "libcuda.so.1 lacks {}: {e}",
                        String::from_utf8_lossy($name)
                    ))
                })?
            };
        }
        let init: unsafe extern "C" fn(c_uint) -> CuResult = sym!(b"cuInit\0");
        let device_get_count: unsafe extern "C" fn(*mut c_int) -> CuResult = sym!(b"cuDeviceGetCount\0");
        let cuda = Cuda {
            mem_host_alloc: sym!(b"cuMemHostAlloc\0"),
            mem_free_host: sym!(b"cuMemFreeHost\0"),
            memcpy_dtoh: sym!(b"cuMemcpyDtoHAsync_v2\0"),
            memcpy_htod: sym!(b"cuMemcpyHtoDAsync_v2\0"),
            stream_create: sym!(b"cuStreamCreate\0"),
            stream_synchronize: sym!(b"cuStreamSynchronize\0"),
            ctx_get_current: sym!(b"cuCtxGetCurrent\0"),
            get_error_string: sym!(b"cuGetErrorString\0"),
            devices: 0,
            _lib: lib,
        };
        // SAFETY: cuInit takes flags (must be 0); cuDeviceGetCount writes one int.
        cuda.check("cuInit", unsafe { init(0) })?;
        let mut n = 0;
        // SAFETY: as above.
        cuda.check("cuDeviceGetCount", unsafe { device_get_count(&mut n) })?;
        if n <= 0 {
            return Err(Error::system("the CUDA driver sees no GPU"));
        }
        Ok(Cuda { devices: n, ..cuda })
    }

    fn check(&self, call: &str, r: CuResult) -> Result<()> {
        if r == CUDA_SUCCESS {
            return Ok(());
        }
        let mut s: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorString writes a pointer to a static string, or leaves it NULL.
        unsafe { (self.get_error_string)(r, &mut s) };
        let text = if s.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: a NUL-terminated static string owned by the driver.
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        };
        Err(Error::system(format!("{call} failed: CUDA error {r} ({text})")))
    }

    /// A pinned host buffer of `size` bytes.
    pub fn pinned(&'static self, size: usize) -> Result<Pinned> {
        let mut p = std::ptr::null_mut();
        // SAFETY: cuMemHostAlloc writes the new buffer's address into `p`.
        self.check("cuMemHostAlloc", unsafe {
            (self.mem_host_alloc)(&mut p, size.max(1), CU_MEMHOSTALLOC_PORTABLE)
        })?;
        Ok(Pinned {
            cuda: self,
            ptr: p as *mut u8,
            size,
        })
    }

    /// A new non-blocking stream in the calling thread's current context.
    pub fn stream(&self) -> Result<Stream> {
        let mut ctx = std::ptr::null_mut();
        // SAFETY: cuCtxGetCurrent writes the current context (or NULL) into `ctx`.
        self.check("cuCtxGetCurrent", unsafe { (self.ctx_get_current)(&mut ctx) })?;
        if ctx.is_null() {
            return Err(Error::system(
                "no CUDA context is current in the calling thread (NCCL's proxy thread normally has one)",
            ));
        }
        let mut s = std::ptr::null_mut();
        // SAFETY: cuStreamCreate writes the new stream into `s`.
        self.check("cuStreamCreate", unsafe {
            (self.stream_create)(&mut s, CU_STREAM_NON_BLOCKING)
        })?;
        Ok(Stream(s as usize))
    }

    /// Copies `len` bytes from device address `src` to host memory at `dst` on `stream`, and waits.
    ///
    /// # Safety
    /// `src..src+len` is device memory of the stream's context and `dst..dst+len` writable
    /// host memory.
    pub unsafe fn copy_to_host(&self, stream: Stream, dst: *mut u8, src: *const c_void, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let st = stream.0 as *mut c_void;
        // SAFETY: guaranteed by the caller; the stream came from `Cuda::stream`.
        self.check("cuMemcpyDtoHAsync", unsafe {
            (self.memcpy_dtoh)(dst as *mut c_void, src as CuDevicePtr, len, st)
        })?;
        // SAFETY: as above.
        self.check("cuStreamSynchronize", unsafe { (self.stream_synchronize)(st) })
    }

    /// Copies `len` bytes from host memory at `src` to device address `dst` on `stream`, and waits.
    ///
    /// # Safety
    /// `dst..dst+len` is device memory of the stream's context and `src..src+len` readable
    /// host memory.
    pub unsafe fn copy_to_device(&self, stream: Stream, dst: *mut c_void, src: *const u8, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let st = stream.0 as *mut c_void;
        // SAFETY: guaranteed by the caller; the stream came from `Cuda::stream`.
        self.check("cuMemcpyHtoDAsync", unsafe {
            (self.memcpy_htod)(dst as CuDevicePtr, src as *const c_void, len, st)
        })?;
        // SAFETY: as above.
        self.check("cuStreamSynchronize", unsafe { (self.stream_synchronize)(st) })
    }
}

/// A pinned host buffer, freed on drop.
pub struct Pinned {
    cuda: &'static Cuda,
    ptr: *mut u8,
    size: usize,
}

// SAFETY: a plain host allocation; whoever uses it synchronises access.
unsafe impl Send for Pinned {}
// SAFETY: as above.
unsafe impl Sync for Pinned {}

impl Pinned {
    /// Start of the buffer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.size
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: the pointer came from cuMemHostAlloc and is freed once.
        let _ = unsafe { (self.cuda.mem_free_host)(self.ptr as *mut c_void) };
    }
}

/// The driver, loaded once per process; the error says why it is unavailable.
pub fn driver() -> Result<&'static Cuda> {
    static CUDA: OnceLock<std::result::Result<Cuda, String>> = OnceLock::new();
    CUDA.get_or_init(|| Cuda::load().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::system(e.clone()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_a_driver_the_reason_is_given() {
        // The development and CI machines have no GPU driver; a GPU machine has one with a device.
        match super::driver() {
            Ok(c) => assert!(c.devices > 0),
            Err(e) => {
                let m = e.to_string();
                assert!(
                    m.contains("libcuda.so.1") || m.contains("no GPU") || m.contains("cuInit"),
                    "{m}"
                );
            }
        }
    }
}
