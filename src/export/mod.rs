//! The C ABI boundary: the one exported symbol, `ncclNetPlugin_v7`, and its trampolines.
//!
//! Every entry point runs inside [`guard`]: arguments are checked here (NULL pointers, sizes,
//! counts), errors become `ncclResult_t` plus one WARN line naming the call, and a panic never
//! crosses into NCCL: it becomes ncclInternalError and poisons the comm it happened on.

#![allow(non_upper_case_globals)]

use crate::error::{panic_message, Error, Result};
use crate::ffi::*;
use crate::stack::{self, Shim};
use crate::transport::{Opaque, Properties, Transport};
use std::any::Any;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{addr_of, addr_of_mut, null_mut};
use std::sync::Mutex;

/// The plugin table NCCL looks up. `name` and `regMrDmaBuf` are settled in `init`, before NCCL
/// reads them, to mirror the inner transport.
#[no_mangle]
pub static mut ncclNetPlugin_v7: ncclNet_v7_t = ncclNet_v7_t {
    name: c"tcpxshim".as_ptr(),
    init: Some(init),
    devices: Some(devices),
    getProperties: Some(get_properties),
    listen: Some(listen),
    connect: Some(connect),
    accept: Some(accept),
    regMr: Some(reg_mr),
    regMrDmaBuf: Some(reg_mr_dmabuf),
    deregMr: Some(dereg_mr),
    isend: Some(isend),
    irecv: Some(irecv),
    iflush: Some(iflush),
    test: Some(test),
    closeSend: Some(close_send),
    closeRecv: Some(close_recv),
    closeListen: Some(close_listen),
    getDeviceMr: Some(get_device_mr),
    irecvConsumed: Some(irecv_consumed),
};

thread_local! {
    /// Where the last panic on this thread happened, recorded by the panic hook for the WARN line.
    static PANIC_AT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
    /// How many [`guard`]ed entry points are running on this thread.
    static GUARD_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Marks this thread as inside a guarded entry point while it lives.
struct Guarded;

impl Guarded {
    fn enter() -> Guarded {
        GUARD_DEPTH.with(|d| d.set(d.get() + 1));
        Guarded
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        GUARD_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// What the panic hook does. Inside a guarded entry point it only records the location, which the
/// guard's WARN line reports; anywhere else (an I/O worker, any thread the shim spawns) nothing
/// else will report the panic, so it logs one WARN naming the thread, the location and the message.
/// Returns whether the panic was inside a guarded call (and so is reported by the guard).
fn on_panic(location: Option<&std::panic::Location<'_>>, payload: &(dyn Any + Send)) -> bool {
    let at = location.map(|l| format!("{}:{}", l.file(), l.line()));
    // try_with: a panic while this thread's locals are being destroyed counts as unguarded.
    if GUARD_DEPTH.try_with(|d| d.get()).unwrap_or(0) > 0 {
        let _ = PANIC_AT.try_with(|p| *p.borrow_mut() = at);
        return true;
    }
    let thread = std::thread::current();
    log::warn!(
        "panic on thread {} at {}: {}",
        thread.name().unwrap_or("<unnamed>"),
        at.as_deref().unwrap_or("unknown location"),
        panic_message(payload)
    );
    false
}

/// Puts [`on_panic`] in front of the panic hook in this library's copy of std: a panic inside a
/// guarded call is reported by the guard through NCCL's logger (and not printed); any other panic
/// is logged as a WARN and then handed to the hook that was there before (the default one prints
/// it to stderr), so a program using this library as a crate keeps its own reports.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Unit tests keep the default report of guarded panics too, so a failing assertion
            // still says why.
            if !on_panic(info.location(), info.payload()) || cfg!(test) {
                previous(info);
            }
        }))
    });
}

/// Runs one entry point: maps errors to ncclResult_t with a WARN line, and panics to
/// ncclInternalError with the comm poisoned.
pub(crate) fn guard(call: &'static str, comm: *mut c_void, f: impl FnOnce() -> Result<()>) -> NcclResult {
    let guarded = Guarded::enter();
    let outcome = catch_unwind(AssertUnwindSafe(f));
    drop(guarded);
    match outcome {
        Ok(Ok(())) => ncclResult_t::ncclSuccess,
        Ok(Err(e)) => {
            let msg = e.to_string();
            let line = if msg.starts_with(call) {
                msg
            } else {
                format!("{call}: {msg}")
            };
            log::warn!("{line}");
            if ends_the_job(call, &e) && stack::try_global().is_some_and(Shim::abort_on_error) {
                end_process(&line);
            }
            e.code()
        }
        Err(p) => {
            let at = PANIC_AT
                .with(|a| a.borrow_mut().take())
                .unwrap_or_else(|| "unknown location".into());
            log::warn!(
                "{call}: internal error (panic at {at}: {}); the comm is now unusable. Please report this with the \
                 NCCL_DEBUG=INFO log",
                panic_message(&*p)
            );
            if let Some(s) = stack::try_global() {
                s.poison(comm);
            }
            ncclResult_t::ncclInternalError
        }
    }
}

/// Calls whose errors, when they are remote errors (a lost connection, the peer's error, a
/// timeout), end the job: NCCL cannot go on without the connection.
const JOB_CALLS: &[&str] = &["connect", "accept", "isend", "irecv", "iflush", "test", "irecvConsumed"];

fn ends_the_job(call: &str, e: &Error) -> bool {
    JOB_CALLS.contains(&call) && e.code() == ncclResult_t::ncclRemoteError
}

/// NCCL_TCPXSHIM_ABORT_ON_ERROR=1: says why on stderr and in the log, flushes, and ends the
/// process with status 1 through `_exit`. Not `std::process::exit`, which runs exit handlers and
/// C++ static destructors (CUDA's, NCCL's) on this thread, NCCL's proxy thread, while other
/// threads still use them; not `abort`, whose SIGABRT writes a core of a process that maps GPU
/// memory (slow, large) and whose status a launcher reports as a crash. `_exit` runs nothing.
fn end_process(line: &str) -> ! {
    let text = format!(
        "{} {line}; ending the process ({}=1)\n",
        crate::logging::PREFIX,
        crate::config::ABORT_ON_ERROR.name
    );
    log::error!("{}", text.trim_end());
    log::logger().flush();
    // SAFETY: write(2) of a valid buffer of `text.len()` bytes to the standard error descriptor.
    let _ = unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
    // SAFETY: fflush(NULL) flushes every C stdio output stream (NCCL's debug file among them).
    let _ = unsafe { libc::fflush(null_mut()) };
    // SAFETY: _exit ends the process at once; it runs no destructors or exit handlers.
    unsafe { libc::_exit(1) }
}

fn the_shim(call: &str) -> Result<&'static Shim> {
    stack::try_global().ok_or_else(|| Error::invalid_usage(format!("{call} called before init")))
}

fn non_null<T>(call: &str, what: &str, p: *mut T) -> Result<*mut T> {
    if p.is_null() {
        Err(Error::invalid_argument(format!("{call}: {what} is NULL")))
    } else {
        Ok(p)
    }
}

fn opaque(call: &str, what: &str, p: *mut c_void) -> Result<Opaque> {
    Opaque::from_ptr(p).ok_or_else(|| Error::invalid_argument(format!("{call}: {what} is NULL")))
}

fn handle_mut<'a>(call: &str, p: *mut c_void) -> Result<&'a mut [u8; HANDLE_SIZE]> {
    let p = non_null(call, "handle", p)?;
    // SAFETY: NCCL's handles are NCCL_NET_HANDLE_MAXSIZE-byte buffers it owns for the call.
    Ok(unsafe { &mut *(p as *mut [u8; HANDLE_SIZE]) })
}

/// Property strings must outlive the call: NCCL keeps the pointers. Each distinct string is
/// kept once for the life of the process.
fn intern(s: &str) -> *mut c_char {
    static STRINGS: Mutex<Vec<&'static CStr>> = Mutex::new(Vec::new());
    let mut v = STRINGS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = v.iter().find(|c| c.to_bytes() == s.as_bytes()) {
        return c.as_ptr() as *mut c_char;
    }
    let c: &'static CStr = Box::leak(CString::new(s.replace('\0', "")).unwrap_or_default().into_boxed_c_str());
    v.push(c);
    c.as_ptr() as *mut c_char
}

fn to_v7(p: &Properties) -> ncclNetProperties_v7_t {
    ncclNetProperties_v7_t {
        name: intern(&p.name),
        pciPath: p.pci_path.as_deref().map_or(null_mut(), intern),
        guid: p.guid,
        ptrSupport: p.ptr_support,
        speed: p.speed_mbps,
        port: p.port,
        latency: p.latency_us,
        maxComms: p.max_comms,
        maxRecvs: p.max_recvs,
        netDeviceType: p.device_type.raw(),
        netDeviceVersion: p.device_version,
    }
}

extern "C" fn init(logger: ncclDebugLogger_t) -> NcclResult {
    crate::logging::install(logger);
    install_panic_hook();
    guard("init", null_mut(), || {
        stack::set_own_table(addr_of!(ncclNetPlugin_v7) as *const c_void);
        let s = stack::global()?;
        let name = intern(s.name());
        let dmabuf = s.has_dmabuf();
        // SAFETY: NCCL calls init once, before it reads the table's name or copies the function
        // pointers; writing two fields of our own static through a raw pointer forms no reference.
        unsafe {
            let t = addr_of_mut!(ncclNetPlugin_v7);
            (*t).name = name;
            if !dmabuf {
                (*t).regMrDmaBuf = None;
            }
        }
        Ok(())
    })
}

extern "C" fn devices(ndev: *mut c_int) -> NcclResult {
    guard("devices", null_mut(), || {
        let ndev = non_null("devices", "ndev", ndev)?;
        let n = the_shim("devices")?.devices()?;
        // SAFETY: non-NULL pointer to an int NCCL owns.
        unsafe { *ndev = n };
        Ok(())
    })
}

extern "C" fn get_properties(dev: c_int, props: *mut ncclNetProperties_v7_t) -> NcclResult {
    guard("getProperties", null_mut(), || {
        let props = non_null("getProperties", "props", props)?;
        let p = the_shim("getProperties")?.properties(dev)?;
        // SAFETY: non-NULL pointer to a v7 properties struct NCCL owns.
        unsafe { *props = to_v7(&p) };
        Ok(())
    })
}

extern "C" fn listen(dev: c_int, handle: *mut c_void, listen_comm: *mut *mut c_void) -> NcclResult {
    guard("listen", null_mut(), || {
        let out = non_null("listen", "listenComm", listen_comm)?;
        let h = handle_mut("listen", handle)?;
        let comm = the_shim("listen")?.listen(dev, h)?;
        // SAFETY: non-NULL out-pointer owned by NCCL.
        unsafe { *out = comm.as_ptr() };
        Ok(())
    })
}

extern "C" fn connect(
    dev: c_int,
    handle: *mut c_void,
    send_comm: *mut *mut c_void,
    send_dev_comm: *mut *mut ncclNetDeviceHandle_v7_t,
) -> NcclResult {
    guard("connect", null_mut(), || {
        let out = non_null("connect", "sendComm", send_comm)?;
        // SAFETY: non-NULL out-pointer owned by NCCL; NULL means "not connected yet".
        unsafe { *out = null_mut() };
        let h = handle_mut("connect", handle)?;
        // SAFETY: the shim finds NCCL's comms, registrations and requests through its object table
        // (a stale or foreign one is an error); data pointers are NCCL's buffers, valid as the ABI says.
        let comm = unsafe { the_shim("connect")?.connect(dev, h, send_dev_comm) }?;
        // SAFETY: as above.
        unsafe { *out = Opaque::opt_ptr(comm) };
        Ok(())
    })
}

extern "C" fn accept(
    listen_comm: *mut c_void,
    recv_comm: *mut *mut c_void,
    recv_dev_comm: *mut *mut ncclNetDeviceHandle_v7_t,
) -> NcclResult {
    guard("accept", null_mut(), || {
        let out = non_null("accept", "recvComm", recv_comm)?;
        // SAFETY: non-NULL out-pointer owned by NCCL; NULL means "nothing accepted yet".
        unsafe { *out = null_mut() };
        let l = opaque("accept", "listenComm", listen_comm)?;
        // SAFETY: the shim finds NCCL's comms, registrations and requests through its object table
        // (a stale or foreign one is an error); data pointers are NCCL's buffers, valid as the ABI says.
        let comm = unsafe { the_shim("accept")?.accept(l, recv_dev_comm) }?;
        // SAFETY: as above.
        unsafe { *out = Opaque::opt_ptr(comm) };
        Ok(())
    })
}

fn check_ptr_type(call: &str, ptr_type: c_int) -> Result<()> {
    let known = (NCCL_PTR_HOST | NCCL_PTR_CUDA | NCCL_PTR_DMABUF) as c_int;
    if ptr_type == 0 || ptr_type & !known != 0 {
        return Err(Error::invalid_argument(format!(
            "{call}: memory type {ptr_type:#x} is not NCCL_PTR_HOST (1), NCCL_PTR_CUDA (2) or NCCL_PTR_DMABUF (4)"
        )));
    }
    Ok(())
}

extern "C" fn reg_mr(
    comm: *mut c_void,
    data: *mut c_void,
    size: c_int,
    ptr_type: c_int,
    mhandle: *mut *mut c_void,
) -> NcclResult {
    guard("regMr", comm, || {
        let out = non_null("regMr", "mhandle", mhandle)?;
        let c = opaque("regMr", "comm", comm)?;
        if size < 0 {
            return Err(Error::invalid_argument(format!("regMr: negative size {size}")));
        }
        if data.is_null() && size > 0 {
            return Err(Error::invalid_argument(format!("regMr: data is NULL for {size} bytes")));
        }
        check_ptr_type("regMr", ptr_type)?;
        // SAFETY: the shim finds NCCL's comms, registrations and requests through its object table
        // (a stale or foreign one is an error); data pointers are NCCL's buffers, valid as the ABI says.
        let mr = unsafe { the_shim("regMr")?.reg_mr(c, data, size as usize, ptr_type) }?;
        // SAFETY: non-NULL out-pointer owned by NCCL.
        unsafe { *out = mr.as_ptr() };
        Ok(())
    })
}

extern "C" fn reg_mr_dmabuf(
    comm: *mut c_void,
    data: *mut c_void,
    size: usize,
    ptr_type: c_int,
    offset: u64,
    fd: c_int,
    mhandle: *mut *mut c_void,
) -> NcclResult {
    guard("regMrDmaBuf", comm, || {
        let out = non_null("regMrDmaBuf", "mhandle", mhandle)?;
        let c = opaque("regMrDmaBuf", "comm", comm)?;
        check_ptr_type("regMrDmaBuf", ptr_type)?;
        // SAFETY: the shim finds NCCL's comms, registrations and requests through its object table
        // (a stale or foreign one is an error); data pointers are NCCL's buffers, valid as the ABI says.
        let mr = unsafe { the_shim("regMrDmaBuf")?.reg_mr_dmabuf(c, data, size, ptr_type, offset, fd) }?;
        // SAFETY: non-NULL out-pointer owned by NCCL.
        unsafe { *out = mr.as_ptr() };
        Ok(())
    })
}

extern "C" fn dereg_mr(comm: *mut c_void, mhandle: *mut c_void) -> NcclResult {
    guard("deregMr", comm, || {
        let c = opaque("deregMr", "comm", comm)?;
        let m = opaque("deregMr", "mhandle", mhandle)?;
        // SAFETY: the shim finds NCCL's comms, registrations and requests through its object table
        // (a stale or foreign one is an error); data pointers are NCCL's buffers, valid as the ABI says.
        unsafe { the_shim("deregMr")?.dereg_mr(c, m) }
    })
}

extern "C" fn isend(
    comm: *mut c_void,
    data: *mut c_void,
    size: c_int,
    tag: c_int,
    mhandle: *mut c_void,
    request: *mut *mut c_void,
) -> NcclResult {
    guard("isend", comm, || {
        let out = non_null("isend", "request", request)?;
        // SAFETY: non-NULL out-pointer owned by NCCL; NULL means "try again".
        unsafe { *out = null_mut() };
        let c = opaque("isend", "sendComm", comm)?;
        if size < 0 {
            return Err(Error::invalid_argument(format!("isend: negative size {size}")));
        }
        if data.is_null() && size > 0 {
            return Err(Error::invalid_argument(format!("isend: data is NULL for {size} bytes")));
        }
        // SAFETY: the shim finds NCCL's comms, registrations and requests through its object table
        // (a stale or foreign one is an error); data pointers are NCCL's buffers, valid as the ABI says.
        let r = unsafe { the_shim("isend")?.isend(c, data, size, tag, Opaque::from_ptr(mhandle)) }?;
        // SAFETY: as above.
        unsafe { *out = Opaque::opt_ptr(r) };
        Ok(())
    })
}

/// NCCL's grouped-receive arrays, borrowed for the call and checked.
struct RecvArgs<'a> {
    data: &'a [*mut c_void],
    sizes: &'a [i32],
    tags: &'a [i32],
    mrs: &'a [Option<Opaque>],
}

const NO_TAGS: [i32; 8] = [0; 8];
const NO_MRS: [Option<Opaque>; 8] = [None; 8];

/// Borrows NCCL's grouped-receive arrays (no copies on this hot path), checking every pointer and count.
fn recv_args<'a>(
    call: &str,
    n: c_int,
    data: *mut *mut c_void,
    sizes: *mut c_int,
    tags: *mut c_int,
    mhandles: *mut *mut c_void,
) -> Result<RecvArgs<'a>> {
    if !(1..=8).contains(&n) {
        return Err(Error::invalid_argument(format!(
            "{call}: n={n} is out of range (1 to 8)"
        )));
    }
    let n = n as usize;
    let data = non_null(call, "data", data)?;
    let sizes = non_null(call, "sizes", sizes)?;
    // SAFETY: NCCL passes arrays of n entries for data and sizes (and tags and mhandles when
    // non-NULL), valid and unchanged for the duration of the call.
    let (data, sizes) = unsafe {
        (
            std::slice::from_raw_parts(data, n),
            std::slice::from_raw_parts(sizes, n),
        )
    };
    let tags = if tags.is_null() {
        &NO_TAGS[..n]
    } else {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts(tags, n) }
    };
    let mrs = if mhandles.is_null() {
        &NO_MRS[..n]
    } else {
        // SAFETY: as above; Option<Opaque> has the layout of a C pointer (repr(transparent) over
        // NonNull, NULL as None), so an array of void* is an array of Option<Opaque>.
        unsafe { std::slice::from_raw_parts(mhandles as *const Option<Opaque>, n) }
    };
    for (i, (&p, &sz)) in data.iter().zip(sizes).enumerate() {
        if sz < 0 {
            return Err(Error::invalid_argument(format!(
                "{call}: sizes[{i}] is negative ({sz})"
            )));
        }
        if p.is_null() && sz > 0 {
            return Err(Error::invalid_argument(format!(
                "{call}: data[{i}] is NULL for {sz} bytes"
            )));
        }
    }
    Ok(RecvArgs { data, sizes, tags, mrs })
}

extern "C" fn irecv(
    comm: *mut c_void,
    n: c_int,
    data: *mut *mut c_void,
    sizes: *mut c_int,
    tags: *mut c_int,
    mhandles: *mut *mut c_void,
    request: *mut *mut c_void,
) -> NcclResult {
    guard("irecv", comm, || {
        let out = non_null("irecv", "request", request)?;
        // SAFETY: non-NULL out-pointer owned by NCCL (it may hold NCCL_NET_OPTIONAL_RECV_COMPLETION
        // on entry, which is only a hint); NULL means "try again".
        unsafe { *out = null_mut() };
        let c = opaque("irecv", "recvComm", comm)?;
        let a = recv_args("irecv", n, data, sizes, tags, mhandles)?;
        // SAFETY: the shim finds NCCL's comms, registrations and requests through its object table
        // (a stale or foreign one is an error); data pointers are NCCL's buffers, valid as the ABI says.
        let r = unsafe { the_shim("irecv")?.irecv(c, a.data, a.sizes, a.tags, a.mrs) }?;
        // SAFETY: as above.
        unsafe { *out = Opaque::opt_ptr(r) };
        Ok(())
    })
}

extern "C" fn iflush(
    comm: *mut c_void,
    n: c_int,
    data: *mut *mut c_void,
    sizes: *mut c_int,
    mhandles: *mut *mut c_void,
    request: *mut *mut c_void,
) -> NcclResult {
    guard("iflush", comm, || {
        let out = non_null("iflush", "request", request)?;
        // SAFETY: non-NULL out-pointer owned by NCCL.
        unsafe { *out = null_mut() };
        let c = opaque("iflush", "recvComm", comm)?;
        let a = recv_args("iflush", n, data, sizes, null_mut(), mhandles)?;
        // SAFETY: the shim finds NCCL's comms, registrations and requests through its object table
        // (a stale or foreign one is an error); data pointers are NCCL's buffers, valid as the ABI says.
        let r = unsafe { the_shim("iflush")?.iflush(c, a.data, a.sizes, a.mrs) }?;
        // SAFETY: as above.
        unsafe { *out = Opaque::opt_ptr(r) };
        Ok(())
    })
}

extern "C" fn test(request: *mut c_void, done: *mut c_int, sizes: *mut c_int) -> NcclResult {
    // A panic poisons the request's comm: the shim resolves request keys too.
    guard("test", request, || {
        let done = non_null("test", "done", done)?;
        // SAFETY: non-NULL pointer to an int NCCL owns.
        unsafe { *done = 0 };
        let r = opaque("test", "request", request)?;
        // SAFETY: NCCL passes room for one size per grouped receive of this request, or NULL.
        let finished = unsafe { the_shim("test")?.test_into(r, sizes) }?;
        // SAFETY: as above.
        unsafe { *done = finished as c_int };
        Ok(())
    })
}

extern "C" fn close_send(comm: *mut c_void) -> NcclResult {
    guard("closeSend", comm, || {
        // SAFETY: the shim finds NCCL's comms, registrations and requests through its object table
        // (a stale or foreign one is an error); data pointers are NCCL's buffers, valid as the ABI says.
        unsafe { the_shim("closeSend")?.close_send(opaque("closeSend", "sendComm", comm)?) }
    })
}

extern "C" fn close_recv(comm: *mut c_void) -> NcclResult {
    guard("closeRecv", comm, || {
        // SAFETY: the shim finds NCCL's comms, registrations and requests through its object table
        // (a stale or foreign one is an error); data pointers are NCCL's buffers, valid as the ABI says.
        unsafe { the_shim("closeRecv")?.close_recv(opaque("closeRecv", "recvComm", comm)?) }
    })
}

extern "C" fn close_listen(comm: *mut c_void) -> NcclResult {
    guard("closeListen", comm, || {
        // SAFETY: the shim finds NCCL's comms, registrations and requests through its object table
        // (a stale or foreign one is an error); data pointers are NCCL's buffers, valid as the ABI says.
        unsafe { the_shim("closeListen")?.close_listen(opaque("closeListen", "listenComm", comm)?) }
    })
}

extern "C" fn get_device_mr(comm: *mut c_void, mhandle: *mut c_void, dptr_mhandle: *mut *mut c_void) -> NcclResult {
    guard("getDeviceMr", comm, || {
        let out = non_null("getDeviceMr", "dptr_mhandle", dptr_mhandle)?;
        let c = opaque("getDeviceMr", "comm", comm)?;
        let m = opaque("getDeviceMr", "mhandle", mhandle)?;
        // SAFETY: the shim finds NCCL's comms, registrations and requests through its object table
        // (a stale or foreign one is an error); data pointers are NCCL's buffers, valid as the ABI says.
        let d = unsafe { the_shim("getDeviceMr")?.get_device_mr(c, m) }?;
        // SAFETY: non-NULL out-pointer owned by NCCL.
        unsafe { *out = Opaque::opt_ptr(d) };
        Ok(())
    })
}

extern "C" fn irecv_consumed(comm: *mut c_void, n: c_int, request: *mut c_void) -> NcclResult {
    guard("irecvConsumed", comm, || {
        let c = opaque("irecvConsumed", "recvComm", comm)?;
        // SAFETY: the shim finds NCCL's comms, registrations and requests through its object table
        // (a stale or foreign one is an error); data pointers are NCCL's buffers, valid as the ABI says.
        unsafe { the_shim("irecvConsumed")?.irecv_consumed(c, n, Opaque::from_ptr(request)) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::capture;

    /// The line number a panic message of the form "... on line N" names.
    fn line_named(msg: &str) -> u32 {
        msg.rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a line number")
    }

    #[test]
    fn a_panic_on_a_thread_of_its_own_is_logged_with_thread_and_location() {
        capture::start();
        install_panic_hook();
        let t = std::thread::Builder::new()
            .name("tcpxshim-test-io-7".into())
            .spawn(|| panic!("own-thread test panic on line {}", line!()))
            .expect("spawn");
        assert!(t.join().is_err(), "the thread panicked");
        let lines = capture::lines_containing("own-thread test panic on line");
        assert_eq!(lines.len(), 1, "one line for one panic: {lines:?}");
        let (level, line) = &lines[0];
        let n = line_named(line);
        assert_eq!(*level, log::Level::Warn);
        assert_eq!(
            *line,
            format!(
                "{} panic on thread tcpxshim-test-io-7 at {}:{n}: own-thread test panic on line {n}",
                crate::logging::PREFIX,
                file!()
            )
        );
    }

    #[test]
    fn a_panic_inside_a_guarded_call_is_left_to_the_guard() {
        capture::start();
        install_panic_hook();
        let t = std::thread::Builder::new()
            .name("tcpxshim-test-guarded".into())
            .spawn(|| {
                let r = guard("testCall", null_mut(), || {
                    panic!("inside-guard test panic on line {}", line!())
                });
                // Out of the guard again: a panic here is this thread's own and is logged.
                let _ = catch_unwind(|| panic!("after-guard test panic on line {}", line!()));
                r
            })
            .expect("spawn");
        assert_eq!(t.join().ok(), Some(ncclResult_t::ncclInternalError));

        let guarded = capture::lines_containing("inside-guard test panic on line");
        assert_eq!(guarded.len(), 1, "only the guard's line: {guarded:?}");
        let n = line_named(
            guarded[0]
                .1
                .trim_end_matches("); the comm is now unusable. Please report this with the NCCL_DEBUG=INFO log"),
        );
        assert!(
            guarded[0].1.contains(&format!(
                "testCall: internal error (panic at {}:{n}: inside-guard test panic on line {n})",
                file!()
            )),
            "the guard's WARN names the location: {guarded:?}"
        );

        let after = capture::lines_containing("after-guard test panic on line");
        assert_eq!(after.len(), 1, "{after:?}");
        let n = line_named(&after[0].1);
        assert_eq!(
            after[0].1,
            format!(
                "{} panic on thread tcpxshim-test-guarded at {}:{n}: after-guard test panic on line {n}",
                crate::logging::PREFIX,
                file!()
            )
        );
    }
}
