//! The CUDA driver API, loaded at run time with dlopen: tcpxshim has no link-time CUDA
//! dependency, and on a machine without a GPU driver this module simply reports "unavailable".
//!
//! Only what the built-in transport's GPU-memory mode needs: pinned host buffers, and synchronous
//! copies between device memory and them, issued from the calling thread (NCCL's proxy thread,
//! which has NCCL's CUDA context current).

use crate::error::{Error, Result};
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

type CuResult = c_int;
type CuDevicePtr = u64;

const CUDA_SUCCESS: CuResult = 0;
const CU_MEMHOSTALLOC_PORTABLE: c_uint = 0x01;

/// The driver entry points tcpxshim uses.
pub struct Cuda {
    mem_host_alloc: unsafe extern "C" fn(*mut *mut c_void, usize, c_uint) -> CuResult,
    mem_free_host: unsafe extern "C" fn(*mut c_void) -> CuResult,
    memcpy_dtoh: unsafe extern "C" fn(*mut c_void, CuDevicePtr, usize) -> CuResult,
    memcpy_htod: unsafe extern "C" fn(CuDevicePtr, *const c_void, usize) -> CuResult,
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
            .map_err(|e| Error::System(format!("the CUDA driver (libcuda.so.1) cannot be loaded: {e}")))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol is the CUDA driver function of that name; the type written at
                // the use site is its documented C prototype.
                *unsafe { lib.get($name) }.map_err(|e| {
                    Error::System(format!(
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
            memcpy_dtoh: sym!(b"cuMemcpyDtoH_v2\0"),
            memcpy_htod: sym!(b"cuMemcpyHtoD_v2\0"),
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
            return Err(Error::System("the CUDA driver sees no GPU".into()));
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
        Err(Error::System(format!("{call} failed: CUDA error {r} ({text})")))
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

    /// Copies `len` bytes from device address `src` to host memory at `dst`.
    ///
    /// # Safety
    /// `src..src+len` is device memory of the current context and `dst..dst+len` writable host memory.
    pub unsafe fn copy_to_host(&self, dst: *mut u8, src: *const c_void, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: guaranteed by the caller.
        self.check("cuMemcpyDtoH", unsafe {
            (self.memcpy_dtoh)(dst as *mut c_void, src as CuDevicePtr, len)
        })
    }

    /// Copies `len` bytes from host memory at `src` to device address `dst`.
    ///
    /// # Safety
    /// `dst..dst+len` is device memory of the current context and `src..src+len` readable host memory.
    pub unsafe fn copy_to_device(&self, dst: *mut c_void, src: *const u8, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: guaranteed by the caller.
        self.check("cuMemcpyHtoD", unsafe {
            (self.memcpy_htod)(dst as CuDevicePtr, src as *const c_void, len)
        })
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
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.size == 0
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
        .map_err(|e| Error::System(e.clone()))
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
