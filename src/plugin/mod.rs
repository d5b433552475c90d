//! A plugin library loaded underneath the shim (TCPX, or any v5/v6/v7 net plugin), adapted to
//! the [`Transport`] trait. Pointers pass through untouched.

// Data, handle and out pointers are opaque here (they may be GPU memory): this module only hands
// them to the plugin, which is exactly what NCCL would do with them.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use crate::error::{check, Error, Result};
use crate::ffi::*;

use crate::transport::{DeviceType, Opaque, Properties, Transport};
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use std::ffi::{c_void, CStr};
use std::path::{Path, PathBuf};
use std::ptr::null_mut;

/// Bytes that appear in every build of tcpxshim and in nothing else: finding them in a library
/// file means it is tcpxshim itself, whatever the file is called.
#[used]
pub static SELF_MARKER: [u8; 37] = *b"tcpxshim-self-marker-6c1d0e9a4f37b2d8";

/// Where TCPX is installed on A3 machines (tcpx-plugin-facts.md), tried in order when
/// NCCL_TCPXSHIM_PLUGIN is unset.
pub const KNOWN_TCPX_PATHS: &[&str] = &[
    "/usr/local/tcpx/lib64/libnccl-net.so",
    "/usr/local/nvidia/lib64/libnccl-net.so",
];

#[derive(Clone, Copy)]
enum Table {
    V7(&'static ncclNet_v7_t),
    V6(&'static ncclNet_v6_t),
    V5(&'static ncclNet_v5_t),
}

/// A loaded plugin.
pub struct PluginTransport {
    table: Table,
    name: String,
    path: PathBuf,
    // Kept for the life of the process: the plugin's threads and pointers outlive any one comm.
    _lib: Library,
}

/// Calls a required function of the table, mapping a NULL entry to an error.
macro_rules! call {
    ($t:expr, $f:ident, $name:literal $(, $arg:expr)* $(,)?) => {{
        match $t.$f {
            // SAFETY: the function comes from the plugin's exported table; the arguments follow
            // the ABI of that table version and are valid for the call.
            Some(f) => check($name, unsafe { f($($arg),*) }),
            None => Err(Error::internal(format!("inner plugin has no {} function", $name))),
        }
    }};
}

/// Dispatches one call over the table versions.
macro_rules! each {
    ($table:expr, $t:ident => $body:expr) => {
        match $table {
            Table::V7($t) => $body,
            Table::V6($t) => $body,
            Table::V5($t) => $body,
        }
    };
}

/// Sets this thread's errno.
fn set_errno(v: i32) {
    // SAFETY: __errno_location returns the calling thread's errno, valid for the thread's life.
    unsafe { *libc::__errno_location() = v };
}

/// A plugin's connect returns only an `ncclResult_t`; the errno its failing socket call left
/// behind (cleared before the call) says whether the peer refused, was unreachable or timed out,
/// which the connect retry layer needs. Other errno values, and none, add nothing.
fn with_connect_errno(e: Error) -> Error {
    let os = std::io::Error::last_os_error();
    match os.raw_os_error() {
        Some(libc::ECONNREFUSED | libc::ETIMEDOUT | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN) => {
            let msg = format!("errno after the call: {os}");
            e.context_after(msg).with_cause(os)
        }
        _ => e,
    }
}

/// Resolves a NCCL_TCPXSHIM_PLUGIN value into what to hand to dlopen, in order of preference.
pub fn candidates(value: &str) -> Vec<String> {
    if value.contains('/') || value.ends_with(".so") || value.contains(".so.") {
        vec![value.to_string()]
    } else {
        vec![format!("libnccl-net-{value}.so"), value.to_string()]
    }
}

fn file_is_tcpxshim(path: &Path) -> bool {
    std::fs::read(path)
        .map(|bytes| memchr::memmem::find(&bytes, &SELF_MARKER).is_some())
        .unwrap_or(false)
}

/// The file a symbol was loaded from.
fn symbol_file(addr: *const c_void) -> Option<PathBuf> {
    // SAFETY: Dl_info is plain C data (pointers and integers); all-zero is a valid value.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the address and fills `info`.
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the loader.
    let name = unsafe { CStr::from_ptr(info.dli_fname) }.to_string_lossy().into_owned();
    Some(PathBuf::from(name))
}

// SAFETY: the table is immutable data and code of the plugin; net plugins are called from
// several threads by NCCL itself (one proxy thread per comm), so they are thread-safe by contract.
unsafe impl Send for PluginTransport {}
// SAFETY: as above.
unsafe impl Sync for PluginTransport {}

impl PluginTransport {
    /// Loads `value` (a path, a file name on the loader path, or a short name `X` for
    /// `libnccl-net-X.so`) with RTLD_NOW|RTLD_LOCAL, takes its newest table among v7, v6, v5,
    /// and initialises it with `logger`.
    pub fn load(value: &str, own_table: *const c_void, logger: ncclDebugLogger_t) -> Result<PluginTransport> {
        let mut errors = Vec::new();
        for cand in candidates(value) {
            if cand.contains('/') && file_is_tcpxshim(Path::new(&cand)) {
                return Err(self_load_error(value, Path::new(&cand)));
            }
            // SAFETY: loading a library runs its constructors; that is what naming a plugin asks for.
            match unsafe { Library::open(Some(&cand), RTLD_NOW | RTLD_LOCAL) } {
                Ok(lib) => return Self::from_library(value, lib, own_table, logger),
                Err(e) => errors.push(format!("{cand}: {e}")),
            }
        }
        Err(Error::system(format!(
            "NCCL_TCPXSHIM_PLUGIN={value}: cannot load the plugin ({}); give a full path, a library on \
             LD_LIBRARY_PATH, or `builtin`",
            errors.join("; ")
        )))
    }

    fn from_library(value: &str, lib: Library, own_table: *const c_void, logger: ncclDebugLogger_t) -> Result<Self> {
        // SAFETY: the symbols are const structs of the named ABI version (a plugin exporting one
        // under that name promises that layout), and the library is never unloaded.
        let table = unsafe {
            if let Ok(s) = lib.get::<*const ncclNet_v7_t>(b"ncclNetPlugin_v7\0") {
                Table::V7(&**s)
            } else if let Ok(s) = lib.get::<*const ncclNet_v6_t>(b"ncclNetPlugin_v6\0") {
                Table::V6(&**s)
            } else if let Ok(s) = lib.get::<*const ncclNet_v5_t>(b"ncclNetPlugin_v5\0") {
                Table::V5(&**s)
            } else {
                return Err(Error::invalid_argument(format!(
                    "NCCL_TCPXSHIM_PLUGIN={value}: the library exports none of ncclNetPlugin_v7, _v6, _v5"
                )));
            }
        };
        let table_addr: *const c_void = each!(table, t => t as *const _ as *const c_void);
        let path = symbol_file(table_addr).unwrap_or_else(|| PathBuf::from(value));
        if table_addr == own_table || file_is_tcpxshim(&path) {
            return Err(self_load_error(value, &path));
        }
        let name_ptr = each!(table, t => t.name);
        let name = if name_ptr.is_null() {
            "unnamed".to_string()
        } else {
            // SAFETY: the plugin's name is a NUL-terminated string in its static data.
            unsafe { CStr::from_ptr(name_ptr) }.to_string_lossy().into_owned()
        };
        let plugin = PluginTransport {
            table,
            name,
            path,
            _lib: lib,
        };
        each!(plugin.table, t => call!(t, init, "init", logger))
            .map_err(|e| e.context(format!("inner plugin {} ({})", plugin.name, plugin.path.display())))?;
        Ok(plugin)
    }

    /// The ABI version of the table in use.
    pub fn abi_version(&self) -> u32 {
        match self.table {
            Table::V7(_) => 7,
            Table::V6(_) => 6,
            Table::V5(_) => 5,
        }
    }

    /// The library file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn self_load_error(value: &str, path: &Path) -> Error {
    Error::invalid_argument(format!(
        "NCCL_TCPXSHIM_PLUGIN={value} is tcpxshim itself ({}); name the real plugin underneath, e.g. \
         /usr/local/tcpx/lib64/libnccl-net.so, or `builtin`",
        path.display()
    ))
}

fn c_string(p: *const std::ffi::c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        // SAFETY: property strings are NUL-terminated and owned by the plugin.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

fn int_size(call: &str, size: usize) -> Result<i32> {
    i32::try_from(size).map_err(|_| {
        Error::invalid_argument(format!(
            "{call}: size {size} does not fit the plugin ABI (at most 2^31-1 bytes)"
        ))
    })
}

impl Transport for PluginTransport {
    fn name(&self) -> &str {
        &self.name
    }

    fn devices(&self) -> Result<i32> {
        let mut n = 0;
        each!(self.table, t => call!(t, devices, "devices", &mut n))?;
        Ok(n)
    }

    fn properties(&self, dev: i32) -> Result<Properties> {
        let (v6, ty, ver) = match self.table {
            Table::V7(t) => {
                let mut p = ncclNetProperties_v7_t::default();
                call!(t, getProperties, "getProperties", dev, &mut p)?;
                let v6 = ncclNetProperties_v6_t {
                    name: p.name,
                    pciPath: p.pciPath,
                    guid: p.guid,
                    ptrSupport: p.ptrSupport,
                    speed: p.speed,
                    port: p.port,
                    latency: p.latency,
                    maxComms: p.maxComms,
                    maxRecvs: p.maxRecvs,
                };
                (v6, DeviceType::from_raw(p.netDeviceType), p.netDeviceVersion)
            }
            Table::V6(t) => {
                let mut p = ncclNetProperties_v6_t::default();
                call!(t, getProperties, "getProperties", dev, &mut p)?;
                (p, DeviceType::Host, 0)
            }
            Table::V5(t) => {
                let mut p = ncclNetProperties_v6_t::default();
                call!(t, getProperties, "getProperties", dev, &mut p)?;
                (p, DeviceType::Host, 0)
            }
        };
        Ok(Properties {
            name: c_string(v6.name).unwrap_or_else(|| format!("dev{dev}")),
            pci_path: c_string(v6.pciPath),
            guid: v6.guid,
            ptr_support: v6.ptrSupport,
            speed_mbps: v6.speed,
            port: v6.port,
            latency_us: v6.latency,
            max_comms: v6.maxComms,
            max_recvs: v6.maxRecvs,
            device_type: ty,
            device_version: ver,
        })
    }

    fn listen(&self, dev: i32, handle: &mut [u8; HANDLE_SIZE]) -> Result<Opaque> {
        let mut comm = null_mut();
        let h = handle.as_mut_ptr() as *mut c_void;
        each!(self.table, t => call!(t, listen, "listen", dev, h, &mut comm))?;
        Opaque::from_ptr(comm).ok_or_else(|| Error::internal("inner plugin listen returned a NULL listen comm"))
    }

    unsafe fn connect(
        &self,
        dev: i32,
        handle: &mut [u8; HANDLE_SIZE],
        dev_handle: *mut *mut DevHandle,
    ) -> Result<Option<Opaque>> {
        let mut comm = null_mut();
        let h = handle.as_mut_ptr() as *mut c_void;
        set_errno(0);
        let res = match self.table {
            Table::V7(t) => call!(t, connect, "connect", dev, h, &mut comm, dev_handle),
            Table::V6(t) => call!(t, connect, "connect", dev, h, &mut comm),
            Table::V5(t) => call!(t, connect, "connect", dev, h, &mut comm),
        };
        res.map_err(with_connect_errno)?;
        Ok(Opaque::from_ptr(comm))
    }

    unsafe fn accept(&self, listen: Opaque, dev_handle: *mut *mut DevHandle) -> Result<Option<Opaque>> {
        let mut comm = null_mut();
        let l = listen.as_ptr();
        match self.table {
            Table::V7(t) => call!(t, accept, "accept", l, &mut comm, dev_handle)?,
            Table::V6(t) => call!(t, accept, "accept", l, &mut comm)?,
            Table::V5(t) => call!(t, accept, "accept", l, &mut comm)?,
        }
        Ok(Opaque::from_ptr(comm))
    }

    unsafe fn reg_mr(&self, comm: Opaque, data: *mut c_void, size: usize, ptr_type: i32) -> Result<Opaque> {
        let size = int_size("regMr", size)?;
        let mut mh = null_mut();
        each!(self.table, t => call!(t, regMr, "regMr", comm.as_ptr(), data, size, ptr_type, &mut mh))?;
        Opaque::from_ptr(mh).ok_or_else(|| Error::internal("inner plugin regMr returned a NULL handle"))
    }

    unsafe fn reg_mr_dmabuf(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: usize,
        ptr_type: i32,
        offset: u64,
        fd: i32,
    ) -> Result<Opaque> {
        let mut mh = null_mut();
        let c = comm.as_ptr();
        match self.table {
            Table::V7(t) => call!(
                t,
                regMrDmaBuf,
                "regMrDmaBuf",
                c,
                data,
                size,
                ptr_type,
                offset,
                fd,
                &mut mh
            )?,
            Table::V6(t) => call!(
                t,
                regMrDmaBuf,
                "regMrDmaBuf",
                c,
                data,
                size,
                ptr_type,
                offset,
                fd,
                &mut mh
            )?,
            Table::V5(_) => return Err(Error::invalid_usage("regMrDmaBuf: the inner plugin is v5 (no DMA-BUF)")),
        }
        Opaque::from_ptr(mh).ok_or_else(|| Error::internal("inner plugin regMrDmaBuf returned a NULL handle"))
    }

    fn has_dmabuf(&self) -> bool {
        match self.table {
            Table::V7(t) => t.regMrDmaBuf.is_some(),
            Table::V6(t) => t.regMrDmaBuf.is_some(),
            Table::V5(_) => false,
        }
    }

    unsafe fn dereg_mr(&self, comm: Opaque, mr: Opaque) -> Result<()> {
        each!(self.table, t => call!(t, deregMr, "deregMr", comm.as_ptr(), mr.as_ptr()))
    }

    unsafe fn isend(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: i32,
        tag: i32,
        mr: Option<Opaque>,
    ) -> Result<Option<Opaque>> {
        let mut req = null_mut();
        let m = Opaque::opt_ptr(mr);
        each!(self.table, t => call!(t, isend, "isend", comm.as_ptr(), data, size, tag, m, &mut req))?;
        Ok(Opaque::from_ptr(req))
    }

    unsafe fn irecv(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        tags: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        let mut req = null_mut();
        let n = data.len() as i32;
        // The plugin's prototype takes mutable pointers but only reads these arrays.
        let d = data.as_ptr() as *mut *mut c_void;
        let s = sizes.as_ptr() as *mut i32;
        let tg = tags.as_ptr() as *mut i32;
        let m = mrs.as_ptr() as *mut *mut c_void;
        each!(self.table, t => call!(t, irecv, "irecv", comm.as_ptr(), n, d, s, tg, m, &mut req))?;
        Ok(Opaque::from_ptr(req))
    }

    unsafe fn iflush(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        let mut req = null_mut();
        let n = data.len() as i32;
        let d = data.as_ptr() as *mut *mut c_void;
        let s = sizes.as_ptr() as *mut i32;
        let m = mrs.as_ptr() as *mut *mut c_void;
        each!(self.table, t => call!(t, iflush, "iflush", comm.as_ptr(), n, d, s, m, &mut req))?;
        Ok(Opaque::from_ptr(req))
    }

    unsafe fn test(&self, req: Opaque, sizes: Option<&mut [i32]>) -> Result<bool> {
        let mut done = 0;
        let s = sizes.map_or(null_mut(), |s| s.as_mut_ptr());
        each!(self.table, t => call!(t, test, "test", req.as_ptr(), &mut done, s))?;
        Ok(done != 0)
    }

    unsafe fn close_send(&self, comm: Opaque) -> Result<()> {
        each!(self.table, t => call!(t, closeSend, "closeSend", comm.as_ptr()))
    }

    unsafe fn close_recv(&self, comm: Opaque) -> Result<()> {
        each!(self.table, t => call!(t, closeRecv, "closeRecv", comm.as_ptr()))
    }

    unsafe fn close_listen(&self, comm: Opaque) -> Result<()> {
        each!(self.table, t => call!(t, closeListen, "closeListen", comm.as_ptr()))
    }

    unsafe fn get_device_mr(&self, comm: Opaque, mr: Opaque) -> Result<Option<Opaque>> {
        match self.table {
            Table::V7(t) if t.getDeviceMr.is_some() => {
                let mut d = null_mut();
                call!(t, getDeviceMr, "getDeviceMr", comm.as_ptr(), mr.as_ptr(), &mut d)?;
                Ok(Opaque::from_ptr(d))
            }
            _ => Ok(None),
        }
    }

    unsafe fn irecv_consumed(&self, comm: Opaque, n: i32, req: Option<Opaque>) -> Result<()> {
        match self.table {
            Table::V7(t) if t.irecvConsumed.is_some() => {
                call!(
                    t,
                    irecvConsumed,
                    "irecvConsumed",
                    comm.as_ptr(),
                    n,
                    Opaque::opt_ptr(req)
                )
            }
            _ => Ok(()),
        }
    }
}
