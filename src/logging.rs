//! Routes the `log` crate to the logger NCCL hands to `init`, as subsystem NET with the
//! "NET/TCPXSHIM" prefix, so the shim's lines appear among NCCL's under NCCL_DEBUG.

use crate::ffi::{ncclDebugLogLevel, ncclDebugLogSubSys, ncclDebugLogger_t};
use std::ffi::{c_char, c_int, c_ulong, CString};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Prefix of every line the shim logs.
pub const PREFIX: &str = "NET/TCPXSHIM";

type RawLogger = unsafe extern "C" fn(ncclDebugLogLevel::Type, c_ulong, *const c_char, c_int, *const c_char, ...);

/// The NCCL logger, stored as an address (0 = none).
static NCCL_LOGGER: AtomicUsize = AtomicUsize::new(0);

struct NcclLogger;

impl log::Log for NcclLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let addr = NCCL_LOGGER.load(Ordering::Acquire);
        if addr == 0 {
            return;
        }
        // SAFETY: the address was stored by `install` from a non-NULL ncclDebugLogger_t.
        let logger: RawLogger = unsafe { std::mem::transmute::<usize, RawLogger>(addr) };
        let level = match record.level() {
            log::Level::Error | log::Level::Warn => ncclDebugLogLevel::NCCL_LOG_WARN,
            log::Level::Info => ncclDebugLogLevel::NCCL_LOG_INFO,
            log::Level::Debug | log::Level::Trace => ncclDebugLogLevel::NCCL_LOG_TRACE,
        };
        let text = format!("{PREFIX} {}", record.args()).replace('\0', "\\0");
        let msg = CString::new(text).unwrap_or_default();
        let file = CString::new(record.file().unwrap_or("tcpxshim")).unwrap_or_default();
        let line = record.line().unwrap_or(0) as c_int;
        // SAFETY: NCCL's logger is a printf-style variadic function; "%s" with one valid C string
        // is a well-formed call, and every pointer outlives the call.
        unsafe {
            logger(
                level,
                ncclDebugLogSubSys::NCCL_NET as c_ulong,
                file.as_ptr(),
                line,
                c"%s".as_ptr(),
                msg.as_ptr(),
            )
        };
    }

    fn flush(&self) {}
}

static LOGGER: NcclLogger = NcclLogger;

/// The most verbose level NCCL will print, from NCCL_DEBUG (NCCL filters too; this only saves
/// formatting lines nobody will see).
fn level_from_env() -> log::LevelFilter {
    match std::env::var("NCCL_DEBUG").map(|v| v.to_ascii_uppercase()).as_deref() {
        Ok("TRACE") => log::LevelFilter::Trace,
        Ok("INFO") => log::LevelFilter::Info,
        Ok("WARN") | Ok("ABORT") | Ok("VERSION") => log::LevelFilter::Warn,
        _ => log::LevelFilter::Warn,
    }
}

/// Sends the `log` crate's records to NCCL's logger. Called from the plugin's `init`.
pub fn install(logger: ncclDebugLogger_t) {
    if let Some(f) = logger {
        NCCL_LOGGER.store(f as usize, Ordering::Release);
    }
    // Fails only when a logger is already installed in this copy of the crate (a second init).
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level_from_env());
}

/// The logger NCCL gave us, to hand on to an inner plugin.
pub fn nccl_logger() -> ncclDebugLogger_t {
    let addr = NCCL_LOGGER.load(Ordering::Acquire);
    if addr == 0 {
        return None;
    }
    // SAFETY: a non-zero address was stored from a valid ncclDebugLogger_t.
    Some(unsafe { std::mem::transmute::<usize, RawLogger>(addr) })
}

/// A stand-in logger for inner plugins when no NCCL logger exists (the `tcpxshim` command).
/// Stable Rust cannot read C variadic arguments, so it logs the unformatted format string; on
/// the C calling conventions of Linux the ignored variadic arguments are harmless.
///
/// # Safety
/// `fmt` is NULL or a NUL-terminated string, as every ncclDebugLogger_t caller passes.
pub unsafe extern "C" fn fallback_logger(
    level: ncclDebugLogLevel::Type,
    _flags: c_ulong,
    _file: *const c_char,
    _line: c_int,
    fmt: *const c_char,
) {
    if fmt.is_null() {
        return;
    }
    // SAFETY: the caller passes a NUL-terminated printf format string.
    let text = unsafe { std::ffi::CStr::from_ptr(fmt) }.to_string_lossy();
    let text = text.trim_end();
    match level {
        ncclDebugLogLevel::NCCL_LOG_WARN | ncclDebugLogLevel::NCCL_LOG_ABORT => log::warn!("inner plugin: {text}"),
        ncclDebugLogLevel::NCCL_LOG_INFO => log::info!("inner plugin: {text}"),
        _ => log::trace!("inner plugin: {text}"),
    }
}

/// [`fallback_logger`] as an `ncclDebugLogger_t`.
pub fn fallback() -> ncclDebugLogger_t {
    type Fixed = unsafe extern "C" fn(ncclDebugLogLevel::Type, c_ulong, *const c_char, c_int, *const c_char);
    // SAFETY: a function taking the fixed leading parameters of the variadic logger type; callers'
    // extra variadic arguments are passed in registers or caller-cleaned stack slots and ignored.
    Some(unsafe { std::mem::transmute::<Fixed, RawLogger>(fallback_logger as Fixed) })
}
