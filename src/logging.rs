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
        let text = format!("{PREFIX} {}", record.args()).replace('\0', "\\0");
        #[cfg(test)]
        capture::push(record.level(), &text);
        let addr = NCCL_LOGGER.load(Ordering::Acquire);
        if addr == 0 {
            return;
        }
        // SAFETY: a non-zero address was stored by `install` from a non-NULL ncclDebugLogger_t,
        // so it is the address of a function of exactly the type RawLogger names.
        let logger: RawLogger = unsafe { std::mem::transmute::<usize, RawLogger>(addr) };
        let level = match record.level() {
            log::Level::Error | log::Level::Warn => ncclDebugLogLevel::NCCL_LOG_WARN,
            log::Level::Info => ncclDebugLogLevel::NCCL_LOG_INFO,
            log::Level::Debug | log::Level::Trace => ncclDebugLogLevel::NCCL_LOG_TRACE,
        };
        let msg = CString::new(text).unwrap_or_default();
        let file = CString::new(record.file().unwrap_or("tcpxshim")).unwrap_or_default();
        let line = record.line().unwrap_or(0) as c_int;
        // SAFETY: `logger` is NCCL's ncclDebugLogger_t, a C variadic function defined with the
        // parameters RawLogger declares, so calling it from Rust with variadic arguments is a
        // well-formed C call. It formats printf-style: "%s" with one valid NUL-terminated string
        // matches its format, and every pointer outlives the call.
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

extern "C" {
    /// The stand-in logger for inner plugins when no NCCL logger exists (the `tcpxshim` command),
    /// defined in csrc/logger.c: a real C variadic function that formats the line with vsnprintf
    /// and passes the text to the sink set by [`tcpxshim_set_log_sink`].
    fn tcpxshim_fallback_logger(
        level: ncclDebugLogLevel::Type,
        flags: c_ulong,
        file: *const c_char,
        line: c_int,
        fmt: *const c_char,
        ...
    );

    /// Sets the function [`tcpxshim_fallback_logger`] passes its formatted lines to. Passed as a
    /// pointer rather than linked by name, so that the sink needs no exported symbol.
    fn tcpxshim_set_log_sink(sink: extern "C" fn(c_int, *const c_char));
}

/// Where the C stand-in logger sends each formatted line: to the `log` crate, as from an inner
/// plugin.
extern "C" fn log_line(level: c_int, msg: *const c_char) {
    if msg.is_null() {
        return;
    }
    // Called from C: a panic must not unwind out of it.
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: csrc/logger.c passes a NUL-terminated buffer that lives for the call.
        let text = unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy();
        let text = text.trim_end();
        match level as ncclDebugLogLevel::Type {
            ncclDebugLogLevel::NCCL_LOG_WARN | ncclDebugLogLevel::NCCL_LOG_ABORT => log::warn!("inner plugin: {text}"),
            ncclDebugLogLevel::NCCL_LOG_INFO => log::info!("inner plugin: {text}"),
            _ => log::trace!("inner plugin: {text}"),
        }
    });
}

/// A stand-in `ncclDebugLogger_t` for inner plugins when no NCCL logger exists: it formats each
/// line as NCCL's own would and logs it through the `log` crate as "inner plugin: ...".
pub fn fallback() -> ncclDebugLogger_t {
    // SAFETY: stores a function pointer (an atomic store in csrc/logger.c); the sink is a plain
    // `extern "C"` function that lives for the whole process.
    unsafe { tcpxshim_set_log_sink(log_line) };
    Some(tcpxshim_fallback_logger)
}

/// Test-only view of what the shim logs: every record that reaches the shim's logger is also kept
/// here (the newest [`capture::KEEP`] lines), so unit tests can check a line was really logged.
#[cfg(test)]
pub(crate) mod capture {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// Lines kept; older ones are dropped first.
    pub(crate) const KEEP: usize = 4096;

    static LINES: Mutex<VecDeque<(log::Level, String)>> = Mutex::new(VecDeque::new());

    pub(super) fn push(level: log::Level, text: &str) {
        let mut lines = LINES.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == KEEP {
            lines.pop_front();
        }
        lines.push_back((level, text.to_string()));
    }

    /// Routes the `log` crate to the shim's logger at every level. The logger is the one
    /// `install` sets, so either may come first in a test process.
    pub(crate) fn start() {
        let _ = log::set_logger(&super::LOGGER);
        log::set_max_level(log::LevelFilter::Trace);
    }

    /// The captured lines that contain `needle`, oldest first.
    pub(crate) fn lines_containing(needle: &str) -> Vec<(log::Level, String)> {
        let lines = LINES.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().filter(|(_, l)| l.contains(needle)).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::ncclDebugLogSubSys::NCCL_NET;

    fn logged(needle: &str) -> Vec<(log::Level, String)> {
        capture::lines_containing(needle)
    }

    #[test]
    fn the_fallback_logger_formats_its_variadic_arguments() {
        capture::start();
        let logger = fallback().expect("the fallback logger");
        // SAFETY: a printf-style call whose arguments match its format: an int and a C string.
        unsafe {
            logger(
                ncclDebugLogLevel::NCCL_LOG_WARN,
                NCCL_NET as c_ulong,
                c"inner.c".as_ptr(),
                12,
                c"fallback-format-test: %d streams to %s (%lu bytes)\n".as_ptr(),
                42 as c_int,
                c"peer-7".as_ptr(),
                1_048_576 as c_ulong,
            )
        };
        assert_eq!(
            logged("fallback-format-test"),
            vec![(
                log::Level::Warn,
                format!("{PREFIX} inner plugin: fallback-format-test: 42 streams to peer-7 (1048576 bytes)")
            )],
            "the formatted line, trailing newline trimmed, logged once at WARN"
        );
    }

    #[test]
    fn the_fallback_logger_keeps_nccl_levels() {
        capture::start();
        let logger = fallback().expect("the fallback logger");
        for (level, n) in [
            (ncclDebugLogLevel::NCCL_LOG_INFO, 1),
            (ncclDebugLogLevel::NCCL_LOG_TRACE, 2),
            (ncclDebugLogLevel::NCCL_LOG_ABORT, 3),
        ] {
            // SAFETY: a printf-style call with one int for its one %d.
            unsafe {
                logger(
                    level,
                    0,
                    c"inner.c".as_ptr(),
                    1,
                    c"fallback-level-test %d".as_ptr(),
                    n as c_int,
                )
            };
        }
        let levels: Vec<(log::Level, String)> = logged("fallback-level-test");
        assert_eq!(
            levels,
            vec![
                (
                    log::Level::Info,
                    format!("{PREFIX} inner plugin: fallback-level-test 1")
                ),
                (
                    log::Level::Trace,
                    format!("{PREFIX} inner plugin: fallback-level-test 2")
                ),
                (
                    log::Level::Warn,
                    format!("{PREFIX} inner plugin: fallback-level-test 3")
                ),
            ]
        );
    }

    #[test]
    fn the_fallback_logger_logs_lines_longer_than_its_buffer_whole() {
        capture::start();
        let logger = fallback().expect("the fallback logger");
        let long = "x".repeat(5000);
        let arg = CString::new(long.clone()).unwrap();
        // SAFETY: a printf-style call with one C string for its one %s.
        unsafe {
            logger(
                ncclDebugLogLevel::NCCL_LOG_WARN,
                0,
                c"inner.c".as_ptr(),
                1,
                c"fallback-long-test %s end".as_ptr(),
                arg.as_ptr(),
            )
        };
        let lines = logged("fallback-long-test");
        assert_eq!(lines.len(), 1, "one line");
        assert_eq!(
            lines[0].1,
            format!("{PREFIX} inner plugin: fallback-long-test {long} end")
        );
    }

    #[test]
    fn the_fallback_logger_ignores_a_null_format() {
        capture::start();
        let logger = fallback().expect("the fallback logger");
        // SAFETY: the logger checks for a NULL format before using it (a NULL file is never read).
        unsafe {
            logger(
                ncclDebugLogLevel::NCCL_LOG_WARN,
                0,
                std::ptr::null(),
                0,
                std::ptr::null(),
            )
        };
        // Other tests log "inner plugin:" lines concurrently; none of theirs is empty.
        let empty = format!("{PREFIX} inner plugin: ");
        assert!(
            logged("inner plugin:").iter().all(|(_, l)| l != &empty),
            "a NULL format logs nothing"
        );
    }
}
