//! Shared test harness: builds the C stand-in plugins (tests/fixtures/*.c), loads a net plugin and
//! drives it the way NCCL does, or builds the shim's stack inside the test process from a [`Config`].
//!
//! One API, [`Driver`], two ways to answer it:
//! - [`Net`]: a `ncclNetPlugin_v7` table, either of a loaded library (a fixture, or the built shim for
//!   the tests of the library file itself) or the table this test binary exports, over a stack built
//!   in-process and installed as the process's own ([`Net::in_process`]: the real C ABI trampolines,
//!   one config per test binary);
//! - [`StackNet`]: a stack built in-process and driven through its Rust interface, for files that need
//!   several configs in one process.
//!
//! Stacks built in-process log into [`in_process_log`]. Nothing here sets environment variables:
//! every stack is built from a `Config` value.
//!
//! Used by the integration tests (`mod common;`) and by benches/overhead.rs
//! (`#[path = "../tests/common/mod.rs"] mod common;`).
//!
//! Loaded libraries are never unloaded (a plugin may keep threads or our logger pointer), so every
//! table, symbol and logger pointer obtained here stays valid for the life of the process.
//! Pointers to comms, requests and registrations stay raw (`Comm`, `Req`, `Mr` wrap them): the
//! harness hands them to the plugin exactly as NCCL would and never dereferences them.

#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_long, c_ulong, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
pub use tcpxshim::config::Config;
use tcpxshim::ffi::{
    ncclDebugLogLevel, ncclDebugLogger_t, ncclNetDeviceHandle_v7_t, ncclNetProperties_v7_t, ncclNet_v7_t, ncclResult_t,
    HANDLE_SIZE, NCCL_PTR_CUDA, NCCL_PTR_HOST,
};
use tcpxshim::stack::Shim;
use tcpxshim::transport::{Opaque, Transport};

/// How long any polling loop of the harness waits before panicking.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// `ncclResult_t` as returned in `Err`.
pub type NetResult<T> = Result<T, u32>;

/// The 128-byte handle NCCL carries from the listener to the connector.
pub type Handle = [u8; HANDLE_SIZE];

/// The v7 device handle (filled by UNPACK-type plugins in accept).
pub type DevHandle = ncclNetDeviceHandle_v7_t;

pub const PTR_HOST: i32 = NCCL_PTR_HOST as i32;
pub const PTR_CUDA: i32 = NCCL_PTR_CUDA as i32;

pub use tcpxshim::error::result_name;

fn check(r: u32) -> NetResult<()> {
    if r == ncclResult_t::ncclSuccess {
        Ok(())
    } else {
        Err(r)
    }
}

/// Sleeps a little longer as a polling loop goes on (spins first, then yields, then sleeps up to 1 ms).
pub fn backoff(iteration: u32) {
    if iteration < 64 {
        std::hint::spin_loop();
    } else if iteration < 256 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(u64::from((iteration - 255).min(1000))));
    }
}

/// Polls `f` until it returns `Some`, panicking after [`DEADLINE`] with `what` in the message.
pub fn poll_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut i = 0u32;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > DEADLINE {
            panic!("timed out after {DEADLINE:?} waiting for {what}");
        }
        backoff(i);
        i = i.saturating_add(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Building the C fixtures
// ---------------------------------------------------------------------------------------------

/// The variants of tests/fixtures/netfixture.c.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fixture {
    /// Generic plugin exporting only `ncclNetPlugin_v5` ("Fixture_v5").
    V5,
    /// Generic plugin exporting only `ncclNetPlugin_v6` ("Fixture_v6").
    V6,
    /// Generic plugin exporting only `ncclNetPlugin_v7` ("Fixture_v7").
    V7,
    /// TCPX look-alike exporting only `ncclNetPlugin_v7` ("GPUDirectTCPX_v7").
    Tcpx,
}

impl Fixture {
    pub const ALL: [Fixture; 4] = [Fixture::V5, Fixture::V6, Fixture::V7, Fixture::Tcpx];

    /// Short name: "v5", "v6", "v7", "tcpx".
    pub fn short(self) -> &'static str {
        match self {
            Fixture::V5 => "v5",
            Fixture::V6 => "v6",
            Fixture::V7 => "v7",
            Fixture::Tcpx => "tcpx",
        }
    }

    /// The plugin's `name` field.
    pub fn net_name(self) -> &'static str {
        match self {
            Fixture::V5 => "Fixture_v5",
            Fixture::V6 => "Fixture_v6",
            Fixture::V7 => "Fixture_v7",
            Fixture::Tcpx => "GPUDirectTCPX_v7",
        }
    }

    /// The one `ncclNetPlugin_vN` symbol it exports.
    pub fn symbol(self) -> &'static str {
        match self {
            Fixture::V5 => "ncclNetPlugin_v5",
            Fixture::V6 => "ncclNetPlugin_v6",
            Fixture::V7 | Fixture::Tcpx => "ncclNetPlugin_v7",
        }
    }

    /// Number of devices it reports.
    pub fn ndev(self) -> i32 {
        if self == Fixture::Tcpx {
            4
        } else {
            2
        }
    }

    /// Most outstanding requests per comm before a violation.
    pub fn max_outstanding(self) -> usize {
        if self == Fixture::Tcpx {
            16
        } else {
            32
        }
    }

    /// The result a policed violation returns.
    pub fn violation_result(self) -> u32 {
        if self == Fixture::Tcpx {
            ncclResult_t::ncclInternalError
        } else {
            ncclResult_t::ncclInvalidUsage
        }
    }

    fn define(self) -> &'static str {
        match self {
            Fixture::V5 => "-DFIXTURE_NET_VERSION=5",
            Fixture::V6 => "-DFIXTURE_NET_VERSION=6",
            Fixture::V7 => "-DFIXTURE_NET_VERSION=7",
            Fixture::Tcpx => "-DFIXTURE_TCPX_LIKE=1",
        }
    }
}

/// The cargo profile directory this binary runs from (target/debug for tests, target/release for benches),
/// found from the executable's path (`<dir>/deps/<binary>`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("executable has a parent directory").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps" || n == "examples") {
        dir.pop();
    }
    dir
}

/// Where the compiled fixtures go: `<target dir>/tcpxshim-fixtures/`.
pub fn fixtures_dir() -> PathBuf {
    let dir = target_dir().join("tcpxshim-fixtures");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// The built shim: `<target dir>/libtcpxshim.so` (it may not exist: check before loading).
/// `cargo test` rebuilds the library under `deps/` without always refreshing the copy beside it,
/// so the newer of the two is the one that matches the code under test.
pub fn shim_lib() -> PathBuf {
    let top = target_dir().join("libtcpxshim.so");
    let deps = target_dir().join("deps").join("libtcpxshim.so");
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (mtime(&top), mtime(&deps)) {
        (Some(a), Some(b)) if b > a => deps,
        (None, Some(_)) => deps,
        _ => top,
    }
}

fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *hash ^= u64::from(b);
        *hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Separator, so that ("ab","c") and ("a","bc") differ.
    *hash ^= 0xff;
    *hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// Compiles tests/fixtures/`source` into a shared library named after `stem` and a hash of the compiler,
/// flags, source and header, so an existing file is always up to date. Several processes may race:
/// each compiles to a unique temporary name and renames it into place.
fn compile_c(source: &str, defines: &[&str], stem: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(stem) {
        return p.clone();
    }

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("tests/fixtures").join(source);
    let include = root.join("nccl_headers");
    let cc = std::env::var("CC")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "cc".to_string());
    let mut cc_words = cc.split_whitespace().map(str::to_string);
    let program = cc_words.next().expect("CC is empty");
    let mut args: Vec<String> = cc_words.collect();
    args.extend(["-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread"].map(String::from));
    args.push(format!("-I{}", include.display()));
    args.extend(defines.iter().map(|d| d.to_string()));

    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    fnv1a(&mut hash, program.as_bytes());
    for a in &args {
        fnv1a(&mut hash, a.as_bytes());
    }
    for file in [src.clone(), include.join("ncclnet.h")] {
        let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        fnv1a(&mut hash, &bytes);
    }

    let dir = fixtures_dir();
    let out = dir.join(format!("lib{stem}-{hash:016x}.so"));
    if !out.exists() {
        let tmp = dir.join(format!(
            ".{stem}-{hash:016x}.{}.{}.tmp.so",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        let output = Command::new(&program)
            .args(&args)
            .arg("-o")
            .arg(&tmp)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("cannot run the C compiler {program:?} (set CC to override): {e}"));
        if !output.status.success() {
            let _ = std::fs::remove_file(&tmp);
            panic!(
                "compiling {} failed ({}): {program} {} -o {} {}\n--- stderr ---\n{}",
                src.display(),
                output.status,
                args.join(" "),
                tmp.display(),
                src.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::fs::rename(&tmp, &out).unwrap_or_else(|e| panic!("rename {} -> {}: {e}", tmp.display(), out.display()));
    }
    built.insert(stem.to_string(), out.clone());
    out
}

/// Builds (once, reusing an up-to-date build) and returns the path of a fixture variant.
pub fn fixture_lib(kind: Fixture) -> PathBuf {
    compile_c(
        "netfixture.c",
        &[kind.define()],
        &format!("tcpxfixture_{}", kind.short()),
    )
}

/// Builds (once) and returns the path of tests/fixtures/logcapture.c as a library.
pub fn logcapture_lib() -> PathBuf {
    compile_c("logcapture.c", &[], "tcpxlogcapture")
}

/// Copies a library to a unique path, so that loading it gives a separate instance with its own globals
/// (dlopen shares one instance per file). Copies live in `<fixtures dir>/private-<pid>/`; directories
/// of processes that no longer run are removed on first use.
pub fn private_copy(lib: &Path) -> PathBuf {
    static CLEANED: OnceLock<()> = OnceLock::new();
    let base = fixtures_dir();
    CLEANED.get_or_init(|| {
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if let Some(pid) = name.strip_prefix("private-").and_then(|p| p.parse::<u32>().ok()) {
                    if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
    });
    let dir = base.join(format!("private-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let stem = lib
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "lib".into());
    let dst = dir.join(format!("{stem}-{}.so", UNIQUE.fetch_add(1, Ordering::Relaxed)));
    std::fs::copy(lib, &dst).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", lib.display(), dst.display()));
    dst
}

/// Loads a library for good (never unloaded): `dlopen(path, RTLD_NOW | RTLD_LOCAL)`.
pub fn load_library(path: &Path) -> Result<&'static Library, String> {
    // SAFETY: loading runs the library's initialisers; our fixtures and the shim are written to be
    // loaded this way (it is what NCCL does). The library is leaked, so it is never unloaded and every
    // pointer taken from it stays valid.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }
        .map_err(|e| format!("dlopen {}: {e}", path.display()))?;
    Ok(Box::leak(Box::new(lib)))
}

/// Looks up a symbol's address in a loaded library.
pub fn symbol_addr(lib: &Library, name: &str) -> Option<*mut c_void> {
    // SAFETY: we only take the address; whoever uses it must give it the right type.
    let sym = unsafe { lib.get::<*mut c_void>(name) }.ok()?;
    let p = sym.into_raw();
    (!p.is_null()).then_some(p)
}

// ---------------------------------------------------------------------------------------------
// Log capture
// ---------------------------------------------------------------------------------------------

/// The C logger type NCCL hands to `init` (the non-NULL function inside `ncclDebugLogger_t`).
pub type LoggerFn = unsafe extern "C" fn(ncclDebugLogLevel::Type, c_ulong, *const c_char, c_int, *const c_char, ...);

/// Lines read out of a capture's C buffer and kept for reading by position.
#[derive(Default)]
struct Seen {
    /// Lines logged before `lines[0]` that were taken or cleared already.
    base: usize,
    lines: Vec<String>,
}

/// One loaded copy of tests/fixtures/logcapture.c and its in-memory log buffer.
///
/// Read it destructively ([`LogCapture::take`], [`LogCapture::clear`]) when one test owns the capture,
/// or by position ([`LogCapture::mark`], [`LogCapture::since`], [`LogCapture::lines`]) when tests running
/// concurrently share it (the capture of stacks running in this process, [`in_process_log`]): each then
/// picks its own lines by something only it logs (a comm's address or label, an odd message size).
pub struct LogCapture {
    pub path: PathBuf,
    logger: LoggerFn,
    take: unsafe extern "C" fn(*mut c_char, usize) -> usize,
    clear: unsafe extern "C" fn(),
    seen: Mutex<Seen>,
}

impl LogCapture {
    fn load(path: PathBuf) -> LogCapture {
        let lib = load_library(&path).unwrap_or_else(|e| panic!("{e}"));
        let get = |name: &str| symbol_addr(lib, name).unwrap_or_else(|| panic!("{} lacks {name}", path.display()));
        let (logger, take, clear) = (get("capture_logger"), get("capture_take"), get("capture_clear"));
        // SAFETY: the symbols are functions defined in logcapture.c with exactly these C signatures
        // (capture_logger's int level is ABI-compatible with the ncclDebugLogLevel enum).
        unsafe {
            LogCapture {
                path,
                logger: std::mem::transmute::<*mut c_void, LoggerFn>(logger),
                take: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_char, usize) -> usize>(take),
                clear: std::mem::transmute::<*mut c_void, unsafe extern "C" fn()>(clear),
                seen: Mutex::new(Seen::default()),
            }
        }
    }

    /// A capture with its own buffer (a private copy of the library), alive for the whole process.
    pub fn private() -> &'static LogCapture {
        Box::leak(Box::new(LogCapture::load(private_copy(&logcapture_lib()))))
    }

    /// The process-wide capture (the library at its build path).
    pub fn shared() -> &'static LogCapture {
        static SHARED: OnceLock<LogCapture> = OnceLock::new();
        SHARED.get_or_init(|| LogCapture::load(logcapture_lib()))
    }

    /// The logger to pass to a plugin's init.
    pub fn logger(&self) -> ncclDebugLogger_t {
        Some(self.logger)
    }

    /// Empties the C buffer into lines.
    fn drain(&self) -> Vec<String> {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            // SAFETY: capture_take writes at most `len` bytes into `buf`.
            let n = unsafe { (self.take)(buf.as_mut_ptr().cast(), buf.len()) };
            if n <= buf.len() {
                buf.truncate(n);
                break;
            }
            buf.resize(n + 4096, 0);
        }
        String::from_utf8_lossy(&buf).lines().map(str::to_string).collect()
    }

    fn seen(&self) -> MutexGuard<'_, Seen> {
        let mut s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let new = self.drain();
        s.lines.extend(new);
        s
    }

    /// Takes (and clears) the captured lines, each "LEVEL 0xFLAGS message" (e.g. "INFO 0x11 NET/...").
    pub fn take(&self) -> Vec<String> {
        let mut s = self.seen();
        s.base += s.lines.len();
        std::mem::take(&mut s.lines)
    }

    /// Discards what was captured.
    pub fn clear(&self) {
        self.take();
    }

    /// A position in the log: [`LogCapture::since`] returns the lines logged after it.
    pub fn mark(&self) -> usize {
        let s = self.seen();
        s.base + s.lines.len()
    }

    /// The lines logged since `mark` (all kept lines if they were taken meanwhile), without removing them.
    pub fn since(&self, mark: usize) -> Vec<String> {
        let s = self.seen();
        let from = mark.saturating_sub(s.base).min(s.lines.len());
        s.lines[from..].to_vec()
    }

    /// Every line logged so far (and not taken), without removing them.
    pub fn lines(&self) -> Vec<String> {
        self.since(0)
    }

    /// The lines so far that contain every one of `words`.
    pub fn lines_with(&self, words: &[&str]) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| words.iter().all(|w| l.contains(w)))
            .collect()
    }

    /// Calls the logger from Rust (for tests of the capture itself), with a "%s" format.
    pub fn log(&self, level: ncclDebugLogLevel::Type, flags: u64, msg: &str) {
        let msg = CString::new(msg).expect("no NUL in message");
        // SAFETY: "%s" consumes exactly one C string argument, which we pass.
        unsafe {
            (self.logger)(
                level,
                flags as c_ulong,
                c"harness".as_ptr(),
                0,
                c"%s".as_ptr(),
                msg.as_ptr(),
            )
        }
    }
}

/// The capture that receives what stacks built in this process log ([`Net::in_process`], [`StackNet`]):
/// the shim logs through the `log` crate into the NCCL logger given to `tcpxshim::logging::install`,
/// here this capture's C logger, at INFO level. Installed once per process, on first use; tests share
/// it, so each reads it by position or by words only it logs.
pub fn in_process_log() -> &'static LogCapture {
    static LOG: OnceLock<&'static LogCapture> = OnceLock::new();
    LOG.get_or_init(|| {
        let cap = LogCapture::private();
        tcpxshim::logging::install(cap.logger());
        log::set_max_level(log::LevelFilter::Info);
        cap
    })
}

// ---------------------------------------------------------------------------------------------
// Fixture controls
// ---------------------------------------------------------------------------------------------

/// The fixture's extra exports (violation counter, live objects, knobs) for one loaded instance.
#[derive(Clone, Copy)]
pub struct FixtureCtl {
    violations: unsafe extern "C" fn() -> c_int,
    reset: unsafe extern "C" fn(),
    last: unsafe extern "C" fn(*mut c_char, c_int) -> c_int,
    live: unsafe extern "C" fn() -> c_int,
    inits: unsafe extern "C" fn() -> c_int,
    set: unsafe extern "C" fn(*const c_char, c_long) -> c_long,
    get: unsafe extern "C" fn(*const c_char) -> c_long,
}

impl FixtureCtl {
    /// Binds the controls of a loaded library; None if it is not a fixture.
    pub fn from_lib(lib: &'static Library) -> Option<FixtureCtl> {
        let g = |n: &str| symbol_addr(lib, n);
        let (v, r, l, lv, i, s, gt) = (
            g("fixture_violations")?,
            g("fixture_reset_violations")?,
            g("fixture_last_violation")?,
            g("fixture_live_objects")?,
            g("fixture_init_count")?,
            g("fixture_set")?,
            g("fixture_get")?,
        );
        // SAFETY: these are the functions of netfixture.c with exactly these C signatures; the library
        // is never unloaded.
        unsafe {
            Some(FixtureCtl {
                violations: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(v),
                reset: std::mem::transmute::<*mut c_void, unsafe extern "C" fn()>(r),
                last: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_char, c_int) -> c_int>(l),
                live: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(lv),
                inits: std::mem::transmute::<*mut c_void, unsafe extern "C" fn() -> c_int>(i),
                set: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*const c_char, c_long) -> c_long>(s),
                get: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*const c_char) -> c_long>(gt),
            })
        }
    }

    /// Opens the fixture at `path`: the same instance as any other load of that file in this process
    /// (for example the inner plugin the shim loaded from it).
    pub fn open(path: &Path) -> FixtureCtl {
        let lib = load_library(path).unwrap_or_else(|e| panic!("{e}"));
        FixtureCtl::from_lib(lib).unwrap_or_else(|| panic!("{} is not a net fixture", path.display()))
    }

    /// Rule violations reported so far ("FIXTURE VIOLATION: ..." lines on stderr).
    pub fn violations(&self) -> i32 {
        // SAFETY: no arguments; atomic read in C.
        unsafe { (self.violations)() }
    }

    /// Resets the violation counter and the last message.
    pub fn reset_violations(&self) {
        // SAFETY: no arguments.
        unsafe { (self.reset)() }
    }

    /// The last violation message ("" if none since the last reset).
    pub fn last_violation(&self) -> String {
        let mut buf = vec![0u8; 1100];
        // SAFETY: the C side writes at most len bytes, NUL-terminated.
        unsafe { (self.last)(buf.as_mut_ptr().cast(), buf.len() as c_int) };
        CStr::from_bytes_until_nul(&buf)
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default()
    }

    /// Comms + requests (posted, or completed but awaiting irecvConsumed) + registrations alive now.
    pub fn live_objects(&self) -> i32 {
        // SAFETY: no arguments.
        unsafe { (self.live)() }
    }

    /// How many times init was called.
    pub fn init_count(&self) -> i32 {
        // SAFETY: no arguments.
        unsafe { (self.inits)() }
    }

    /// Sets a behaviour knob and returns its previous value. Knobs: connect_nulls, accept_nulls,
    /// accept_delay_ms, bg_polls, connect_fail, connect_fail_first, connect_cost_ms, handle_bytes,
    /// handle_zero_all, complete_polls, init_result, ndev (semantics and defaults: the comment above
    /// `g_knobs` in netfixture.c). Panics on an unknown knob or a bad value.
    pub fn set(&self, knob: &str, value: i64) -> i64 {
        self.try_set(knob, value)
            .unwrap_or_else(|| panic!("fixture_set({knob:?}, {value}) rejected (unknown knob or bad value)"))
    }

    /// Like [`FixtureCtl::set`], returning `None` when the fixture rejects the knob or the value.
    pub fn try_set(&self, knob: &str, value: i64) -> Option<i64> {
        let k = CString::new(knob).expect("knob name");
        // SAFETY: k is a valid C string for the duration of the call.
        let old = unsafe { (self.set)(k.as_ptr(), value as c_long) };
        #[allow(clippy::unnecessary_cast)] // c_long is not i64 everywhere
        let old = old as i64;
        (old >= 0).then_some(old)
    }

    /// Reads a knob (panics on an unknown knob).
    pub fn get(&self, knob: &str) -> i64 {
        let k = CString::new(knob).expect("knob name");
        // SAFETY: k is a valid C string for the duration of the call.
        let v = unsafe { (self.get)(k.as_ptr()) };
        assert!(v >= 0, "fixture_get({knob:?}): unknown knob");
        #[allow(clippy::unnecessary_cast)] // c_long is not i64 everywhere
        let v = v as i64;
        v
    }

    /// Runs `f`, asserts that it failed and that it raised exactly one violation; returns the message.
    pub fn expect_violation<T: std::fmt::Debug>(&self, what: &str, f: impl FnOnce() -> NetResult<T>) -> String {
        let before = self.violations();
        let r = f();
        let after = self.violations();
        assert!(r.is_err(), "{what}: expected an error from the fixture, got {r:?}");
        assert_eq!(
            after,
            before + 1,
            "{what}: expected one FIXTURE VIOLATION, got {}",
            after - before
        );
        let msg = self.last_violation();
        assert!(!msg.is_empty(), "{what}: violation counted but no message");
        msg
    }
}

// ---------------------------------------------------------------------------------------------
// Buffers
// ---------------------------------------------------------------------------------------------

/// A zeroed, 4 KiB-aligned heap buffer (TCPX wants CUDA buffers 4 KiB-aligned; we treat them as host memory).
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub const ALIGN: usize = 4096;

    pub fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN).expect("layout");
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocating {len} bytes failed");
        AlignedBuf { ptr, len, layout }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated (at least 1, so a 0-byte buffer still has a registrable address).
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    pub fn as_ptr(&self) -> *mut c_void {
        self.ptr.cast()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    pub fn fill_pattern(&mut self, seed: u64) {
        for (i, b) in self.as_mut_slice().iter_mut().enumerate() {
            *b = pattern_byte(seed, i);
        }
    }

    /// Index of the first byte in `range` that differs from the pattern, if any.
    pub fn find_mismatch(&self, seed: u64, range: std::ops::Range<usize>) -> Option<usize> {
        let s = self.as_slice();
        range.into_iter().find(|&i| s[i] != pattern_byte(seed, i))
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Test pattern byte `i` for `seed` (not periodic at any small power of two).
pub fn pattern_byte(seed: u64, i: usize) -> u8 {
    let x = (i as u64).wrapping_add(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
    (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 ^ (x >> 13) as u8
}

// ---------------------------------------------------------------------------------------------
// Plugin wrapper
// ---------------------------------------------------------------------------------------------

/// An opaque comm pointer (listen, send or recv) returned by the plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Comm(pub *mut c_void);
/// An opaque request pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Req(pub *mut c_void);
/// An opaque memory registration (mhandle).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mr(pub *mut c_void);

// SAFETY: these are opaque tokens the harness never dereferences; which threads may use them is the
// plugin's contract (NCCL uses one comm from one proxy thread at a time, as should tests).
unsafe impl Send for Comm {}
// SAFETY: as above.
unsafe impl Sync for Comm {}
// SAFETY: as above.
unsafe impl Send for Req {}
// SAFETY: as above.
unsafe impl Sync for Req {}
// SAFETY: as above.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

/// Device properties, copied out of `ncclNetProperties_v7_t`.
#[derive(Clone, Debug, PartialEq)]
pub struct Props {
    pub name: String,
    pub pci_path: Option<String>,
    pub guid: u64,
    pub ptr_support: i32,
    pub speed: i32,
    pub port: i32,
    pub latency: f32,
    pub max_comms: i32,
    pub max_recvs: i32,
    pub net_device_type: u32,
    pub net_device_version: i32,
}

/// Both ends of a connection made by [`Driver::connect_pair_full`].
#[derive(Clone, Copy, Debug)]
pub struct Pair {
    pub send: Comm,
    pub recv: Comm,
    /// The device handle accept filled (all zero for HOST-type plugins).
    pub dev_handle: DevHandle,
}

/// Options of [`Driver::transfer_opts`].
#[derive(Clone, Debug)]
pub struct TransferOpts {
    /// Bytes sent.
    pub size: usize,
    /// Bytes the receive is posted with (>= size; bytes past `size` must stay untouched).
    pub recv_size: usize,
    /// Registration type of the send buffer (PTR_HOST or PTR_CUDA).
    pub send_type: i32,
    /// Registration type of the receive buffer.
    pub recv_type: i32,
    pub tag: i32,
    pub seed: u64,
}

impl TransferOpts {
    pub fn new(size: usize) -> TransferOpts {
        TransferOpts {
            size,
            recv_size: size,
            send_type: PTR_HOST,
            recv_type: PTR_HOST,
            tag: 0,
            seed: size as u64,
        }
    }
}

/// The calls of the v7 net ABI as NCCL makes them, whoever answers them: a `ncclNetPlugin_v7` table
/// ([`Net`]: a loaded library, or the shim's own exported table in this process) or a stack built in
/// this process and driven through its Rust interface ([`StackNet`]). The required methods are the
/// plugin's calls; the provided ones are the polling helpers tests are written with (connect until
/// done, post until accepted, test until complete, checked transfers), bounded by [`DEADLINE`].
///
/// Every call returns the plugin's `ncclResult_t` as `Err(code)` when it is not ncclSuccess.
pub trait Driver: Sync {
    /// The name the plugin reports (NCCL_NET matches it).
    fn name(&self) -> String;

    fn devices(&self) -> NetResult<i32>;

    fn properties(&self, dev: i32) -> NetResult<Props>;

    /// listen writing into a caller's handle buffer (e.g. pre-filled with a canary).
    fn listen_into(&self, dev: i32, handle: &mut Handle) -> NetResult<Comm>;

    /// connect with raw arguments.
    ///
    /// # Safety
    /// `handle` must point at 128 writable bytes and `send_dev_comm` must be NULL or valid for writes.
    unsafe fn connect_raw(
        &self,
        dev: i32,
        handle: *mut c_void,
        send_dev_comm: *mut *mut DevHandle,
    ) -> NetResult<Option<Comm>>;

    /// accept with a raw recvDevComm.
    ///
    /// # Safety
    /// `recv_dev_comm` must be NULL or point at a pointer that is NULL or valid for writes.
    unsafe fn accept_raw(&self, listen: Comm, recv_dev_comm: *mut *mut DevHandle) -> NetResult<Option<Comm>>;

    fn reg_mr(&self, comm: Comm, data: *mut c_void, size: usize, ty: i32) -> NetResult<Mr>;

    /// Whether the plugin has regMrDmaBuf (TCPX: no).
    fn has_reg_mr_dmabuf(&self) -> bool;

    fn reg_mr_dmabuf(&self, comm: Comm, data: *mut c_void, size: usize, ty: i32, offset: u64, fd: i32)
        -> NetResult<Mr>;

    fn dereg_mr(&self, comm: Comm, mr: Mr) -> NetResult<()>;

    fn has_get_device_mr(&self) -> bool;

    fn get_device_mr(&self, comm: Comm, mr: Mr) -> NetResult<*mut c_void>;

    /// One isend call. `None` means "try again later".
    fn isend(&self, comm: Comm, data: *mut c_void, size: i32, tag: i32, mr: Mr) -> NetResult<Option<Req>>;

    /// irecv with n = data.len() (all slices must have the same length).
    fn irecv_n(
        &self,
        comm: Comm,
        data: &mut [*mut c_void],
        sizes: &mut [i32],
        tags: &mut [i32],
        mrs: &mut [*mut c_void],
    ) -> NetResult<Option<Req>>;

    /// One iflush call (n == 1). `None` means nothing to wait for.
    fn iflush(&self, comm: Comm, data: *mut c_void, size: i32, mr: Mr) -> NetResult<Option<Req>>;

    /// One test call with a caller's sizes array (or NULL, as NCCL does for flushes). Returns `done`.
    fn test_sizes(&self, req: Req, sizes: Option<&mut [i32]>) -> NetResult<bool>;

    fn has_irecv_consumed(&self) -> bool;

    /// irecvConsumed(comm, n, req); like NCCL, does nothing when the plugin has none.
    fn irecv_consumed_n(&self, comm: Comm, n: i32, req: Req) -> NetResult<()>;

    fn close_send(&self, comm: Comm) -> NetResult<()>;

    fn close_recv(&self, comm: Comm) -> NetResult<()>;

    fn close_listen(&self, comm: Comm) -> NetResult<()>;

    /// listen on `dev`: the handle (zeroed before the call) and the listen comm.
    fn listen(&self, dev: i32) -> NetResult<(Handle, Comm)> {
        let mut h: Handle = [0; HANDLE_SIZE];
        let c = self.listen_into(dev, &mut h)?;
        Ok((h, c))
    }

    /// One connect call, as NCCL makes it (sendDevComm points at a NULL device-handle pointer).
    /// `None` means "call again with the same handle buffer".
    fn connect(&self, dev: i32, handle: &mut Handle) -> NetResult<Option<Comm>> {
        let mut dh: *mut DevHandle = std::ptr::null_mut();
        // SAFETY: handle is a 128-byte buffer we hold mutably; dh a valid out-pointer.
        unsafe { self.connect_raw(dev, handle.as_mut_ptr().cast(), &mut dh) }
    }

    /// One accept call, as NCCL makes it: recvDevComm points at a pointer to a zeroed device handle,
    /// which is returned (copied) with the comm. `None` means "call again".
    fn accept(&self, listen: Comm) -> NetResult<Option<(Comm, DevHandle)>> {
        let mut storage = Box::<DevHandle>::default();
        let mut dh: *mut DevHandle = &mut *storage;
        // SAFETY: dh points at a live, writable device handle.
        let c = unsafe { self.accept_raw(listen, &mut dh) }?;
        Ok(c.map(|c| (c, *storage)))
    }

    /// Listens on `dev`, then calls connect and accept until both return a comm (bounded by [`DEADLINE`]),
    /// then closes the listen comm. Panics on any error.
    fn connect_pair(&self, dev: i32) -> (Comm, Comm) {
        let p = self.connect_pair_full(dev);
        (p.send, p.recv)
    }

    /// [`Driver::connect_pair`], also returning the device handle accept filled.
    fn connect_pair_full(&self, dev: i32) -> Pair {
        let (mut handle, listen) = self
            .listen(dev)
            .unwrap_or_else(|e| panic!("connect_pair: listen(dev {dev}) failed: {}", result_name(e)));
        let (send, (recv, dev_handle)) = self.connect_accept(dev, &mut handle, listen);
        self.close_listen(listen)
            .unwrap_or_else(|e| panic!("connect_pair: closeListen failed: {}", result_name(e)));
        Pair { send, recv, dev_handle }
    }

    /// Calls connect (always with `handle`, the same buffer) and accept until both are done. Panics on errors.
    fn connect_accept(&self, dev: i32, handle: &mut Handle, listen: Comm) -> (Comm, (Comm, DevHandle)) {
        let mut send = None;
        let mut recv = None;
        let start = Instant::now();
        let mut i = 0u32;
        while send.is_none() || recv.is_none() {
            if send.is_none() {
                send = self
                    .connect(dev, handle)
                    .unwrap_or_else(|e| panic!("connect(dev {dev}) failed: {}", result_name(e)));
            }
            if recv.is_none() {
                recv = self
                    .accept(listen)
                    .unwrap_or_else(|e| panic!("accept failed: {}", result_name(e)));
            }
            if start.elapsed() > DEADLINE {
                panic!(
                    "timed out after {DEADLINE:?} waiting for connect (done: {}) and accept (done: {}) on dev {dev}",
                    send.is_some(),
                    recv.is_some()
                );
            }
            backoff(i);
            i = i.saturating_add(1);
        }
        (send.unwrap(), recv.unwrap())
    }

    /// Registers a whole buffer (its capacity, at least 1 byte).
    fn reg_buf(&self, comm: Comm, buf: &AlignedBuf, ty: i32) -> NetResult<Mr> {
        self.reg_mr(comm, buf.as_ptr(), buf.capacity(), ty)
    }

    /// One irecv call with n == 1. `None` means "try again later".
    fn irecv(&self, comm: Comm, data: *mut c_void, size: i32, tag: i32, mr: Mr) -> NetResult<Option<Req>> {
        let mut d = [data];
        let mut s = [size];
        let mut t = [tag];
        let mut m = [mr.0];
        self.irecv_n(comm, &mut d, &mut s, &mut t, &mut m)
    }

    /// One test call: `Some(size)` when done (size of the first/only buffer).
    fn test(&self, req: Req) -> NetResult<Option<i32>> {
        let mut sizes = [-1 as c_int; 8];
        Ok(self.test_sizes(req, Some(&mut sizes))?.then_some(sizes[0]))
    }

    /// Tests until done (bounded by [`DEADLINE`]); returns the reported size.
    fn wait(&self, req: Req) -> NetResult<i32> {
        let start = Instant::now();
        let mut i = 0u32;
        loop {
            if let Some(size) = self.test(req)? {
                return Ok(size);
            }
            if start.elapsed() > DEADLINE {
                panic!(
                    "timed out after {DEADLINE:?} waiting for request {:p} to complete",
                    req.0
                );
            }
            backoff(i);
            i = i.saturating_add(1);
        }
    }

    /// irecvConsumed(comm, 1, req); like NCCL, does nothing when the plugin has none.
    fn irecv_consumed(&self, comm: Comm, req: Req) -> NetResult<()> {
        self.irecv_consumed_n(comm, 1, req)
    }

    /// isend, retrying while the plugin says "try again" (bounded). Errors are returned.
    fn post_send(&self, comm: Comm, data: *mut c_void, size: i32, tag: i32, mr: Mr) -> NetResult<Req> {
        let start = Instant::now();
        let mut i = 0u32;
        loop {
            if let Some(r) = self.isend(comm, data, size, tag, mr)? {
                return Ok(r);
            }
            if start.elapsed() > DEADLINE {
                panic!("timed out after {DEADLINE:?} waiting for isend of {size} bytes to be accepted");
            }
            backoff(i);
            i = i.saturating_add(1);
        }
    }

    /// irecv (n == 1), retrying while the plugin says "try again" (bounded). Errors are returned.
    fn post_recv(&self, comm: Comm, data: *mut c_void, size: i32, tag: i32, mr: Mr) -> NetResult<Req> {
        let start = Instant::now();
        let mut i = 0u32;
        loop {
            if let Some(r) = self.irecv(comm, data, size, tag, mr)? {
                return Ok(r);
            }
            if start.elapsed() > DEADLINE {
                panic!("timed out after {DEADLINE:?} waiting for irecv of {size} bytes to be accepted");
            }
            backoff(i);
            i = i.saturating_add(1);
        }
    }

    /// Tests two requests alternately until both are done (bounded); returns their sizes.
    fn wait_both(&self, a: Req, b: Req) -> NetResult<(i32, i32)> {
        let (mut ra, mut rb) = (None, None);
        let start = Instant::now();
        let mut i = 0u32;
        while ra.is_none() || rb.is_none() {
            if ra.is_none() {
                ra = self.test(a)?;
            }
            if rb.is_none() {
                rb = self.test(b)?;
            }
            if start.elapsed() > DEADLINE {
                panic!(
                    "timed out after {DEADLINE:?} waiting for requests {:p} (done: {}) and {:p} (done: {})",
                    a.0,
                    ra.is_some(),
                    b.0,
                    rb.is_some()
                );
            }
            if ra.is_none() || rb.is_none() {
                backoff(i);
                i = i.saturating_add(1);
            }
        }
        Ok((ra.unwrap(), rb.unwrap()))
    }

    /// Sends `size` pattern bytes from `send` to `recv` (fresh registered buffers), waits, and checks every byte
    /// and the sizes both sides report; calls irecvConsumed when the plugin has it. Panics on any failure.
    fn transfer(&self, send: Comm, recv: Comm, size: usize) {
        self.transfer_opts(send, recv, &TransferOpts::new(size))
    }

    /// [`Driver::transfer`] with options. Panics on any failure.
    fn transfer_opts(&self, send: Comm, recv: Comm, o: &TransferOpts) {
        self.try_transfer(send, recv, o)
            .unwrap_or_else(|e| panic!("transfer of {} bytes: {e}", o.size))
    }

    /// [`Driver::transfer_opts`] returning failures as messages instead of panicking (deadlines still panic).
    fn try_transfer(&self, send: Comm, recv: Comm, o: &TransferOpts) -> Result<(), String> {
        assert!(o.recv_size >= o.size, "recv_size must be >= size");
        let size = i32::try_from(o.size).expect("size fits in an int");
        let rsize = i32::try_from(o.recv_size).expect("recv_size fits in an int");
        let e = |what: &'static str| move |r: u32| format!("{what} failed: {}", result_name(r));
        let mut sbuf = AlignedBuf::new(o.size);
        sbuf.fill_pattern(o.seed);
        let mut rbuf = AlignedBuf::new(o.recv_size);
        let guard_seed = o.seed ^ 0x5a5a_5a5a;
        rbuf.fill_pattern(guard_seed);
        let smr = self.reg_buf(send, &sbuf, o.send_type).map_err(e("regMr (send)"))?;
        let rmr = self.reg_buf(recv, &rbuf, o.recv_type).map_err(e("regMr (recv)"))?;
        let rreq = self
            .post_recv(recv, rbuf.as_ptr(), rsize, o.tag, rmr)
            .map_err(e("irecv"))?;
        let sreq = self
            .post_send(send, sbuf.as_ptr(), size, o.tag, smr)
            .map_err(e("isend"))?;
        let (ssz, rsz) = self.wait_both(sreq, rreq).map_err(e("test"))?;
        self.irecv_consumed(recv, rreq).map_err(e("irecvConsumed"))?;
        self.dereg_mr(send, smr).map_err(e("deregMr (send)"))?;
        self.dereg_mr(recv, rmr).map_err(e("deregMr (recv)"))?;
        if ssz != size {
            return Err(format!("send side reported {ssz} bytes, expected {size}"));
        }
        if rsz != size {
            return Err(format!("receive side reported {rsz} bytes, expected {size}"));
        }
        if let Some(i) = rbuf.find_mismatch(o.seed, 0..o.size) {
            return Err(format!(
                "received byte {i} is {:#04x}, expected {:#04x}",
                rbuf.as_slice()[i],
                pattern_byte(o.seed, i)
            ));
        }
        if let Some(i) = rbuf.find_mismatch(guard_seed, o.size..o.recv_size) {
            return Err(format!("byte {i} past the {} sent bytes was overwritten", o.size));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// A v7 table: a loaded plugin, or the shim's own table in this process
// ---------------------------------------------------------------------------------------------

/// A net plugin called through its `ncclNetPlugin_v7` table: a loaded library ([`Net::open`]) or the
/// table this test binary itself exports, over a stack built in-process ([`Net::in_process`]).
pub struct Net {
    pub path: PathBuf,
    /// The library the table comes from; `None` for the in-process table.
    pub lib: Option<&'static Library>,
    table: *const ncclNet_v7_t,
    /// The log capture whose logger [`Net::init`] passes.
    pub log: &'static LogCapture,
}

// SAFETY: the table is static data of a library that is never unloaded (or of this binary), written
// only by the plugin's own init; the plugin's functions are meant to be called from several threads
// (NCCL does).
unsafe impl Send for Net {}
// SAFETY: as above.
unsafe impl Sync for Net {}

/// Reads one function pointer of the table, panicking if it is NULL.
macro_rules! func {
    ($self:ident, $field:ident) => {
        $self.opt_fn(
            // SAFETY: `table` points at the plugin's exported ncclNet_v7_t, which stays mapped for the life of
            // the process (the library is never unloaded); we read one field without forming a reference.
            unsafe { std::ptr::addr_of!((*$self.table).$field).read() },
            stringify!($field),
        )
    };
}

impl Net {
    /// Loads `path` and takes its `ncclNetPlugin_v7`; panics with the reason if that fails.
    /// The plugin gets a private log capture.
    pub fn open(path: impl AsRef<Path>) -> Net {
        Net::try_open(path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Net::open`], returning the reason on failure.
    pub fn try_open(path: impl AsRef<Path>) -> Result<Net, String> {
        let path = path.as_ref().to_path_buf();
        let lib = load_library(&path)?;
        let table = symbol_addr(lib, "ncclNetPlugin_v7")
            .ok_or_else(|| format!("{} does not export ncclNetPlugin_v7", path.display()))?
            as *const ncclNet_v7_t;
        Ok(Net {
            path,
            lib: Some(lib),
            table,
            log: LogCapture::private(),
        })
    }

    /// Loads a private copy of `path` (its own globals: counters, knobs, state).
    pub fn open_private(path: impl AsRef<Path>) -> Net {
        Net::open(private_copy(path.as_ref()))
    }

    /// The shim as NCCL drives it, inside this process: builds the stack `cfg` describes, makes it the
    /// one the exported `tcpxshim::export::ncclNetPlugin_v7` table drives (`stack::install_global`) and
    /// initialises that table, with [`in_process_log`] as NCCL's logger. Every call then goes through
    /// the real C ABI trampolines. Once per process (each tests/*.rs file is a process of its own);
    /// panics if the stack cannot be built or a stack is in place already.
    pub fn in_process(cfg: &Config) -> Net {
        let log = in_process_log();
        let shim = tcpxshim::stack::build(cfg).unwrap_or_else(|e| panic!("building the stack of {cfg:?}: {e}"));
        tcpxshim::stack::install_global(shim).unwrap_or_else(|e| panic!("Net::in_process (once per process): {e}"));
        let net = Net {
            path: PathBuf::from("(this process's ncclNetPlugin_v7)"),
            lib: None,
            table: std::ptr::addr_of!(tcpxshim::export::ncclNetPlugin_v7),
            log,
        };
        // init installs the shim's panic hook, which reports panics through NCCL's logger only; keep it
        // (the panic guard's WARN lines name the location it records) and still print test failures.
        let before = std::panic::take_hook();
        let res = net.init();
        let shim_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            shim_hook(info);
            before(info);
        }));
        // init set the level from NCCL_DEBUG; tests read INFO lines.
        log::set_max_level(log::LevelFilter::Info);
        res.unwrap_or_else(|e| panic!("init of the in-process table failed: {}", result_name(e)));
        net
    }

    /// The fixture controls of this library (panics if it is not a fixture).
    pub fn fixture(&self) -> FixtureCtl {
        self.lib
            .and_then(FixtureCtl::from_lib)
            .unwrap_or_else(|| panic!("{} is not a net fixture", self.path.display()))
    }

    /// A copy of the whole table (function pointers may be compared, e.g. closeSend == closeRecv).
    pub fn table(&self) -> ncclNet_v7_t {
        // SAFETY: see `func!`; the table is plain old data.
        unsafe { std::ptr::read(self.table) }
    }

    fn opt_fn<F>(&self, f: Option<F>, name: &str) -> F {
        f.unwrap_or_else(|| panic!("{}: ncclNet_v7_t.{name} is NULL", self.path.display()))
    }

    /// init with this Net's log capture.
    pub fn init(&self) -> NetResult<()> {
        self.init_with(self.log.logger())
    }

    pub fn init_with(&self, logger: ncclDebugLogger_t) -> NetResult<()> {
        let f = func!(self, init);
        // SAFETY: a valid (or NULL) logger that lives for the whole process.
        check(unsafe { f(logger) })
    }

    /// Takes the lines logged so far through this Net's capture (see [`LogCapture::take`]).
    pub fn captured_log(&self) -> Vec<String> {
        self.log.take()
    }

    pub fn properties_raw(&self, dev: i32) -> NetResult<ncclNetProperties_v7_t> {
        let f = func!(self, getProperties);
        let mut p = ncclNetProperties_v7_t::default();
        // SAFETY: p is a valid, writable v7 properties struct.
        check(unsafe { f(dev, &mut p) })?;
        Ok(p)
    }
}

impl Driver for Net {
    fn name(&self) -> String {
        // SAFETY: see `func!`.
        let p = unsafe { std::ptr::addr_of!((*self.table).name).read() };
        assert!(!p.is_null(), "{}: ncclNet_v7_t.name is NULL", self.path.display());
        // SAFETY: the plugin's name is a NUL-terminated static string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().to_string()
    }

    fn devices(&self) -> NetResult<i32> {
        let f = func!(self, devices);
        let mut n: c_int = -1;
        // SAFETY: n is a valid out-pointer.
        check(unsafe { f(&mut n) })?;
        Ok(n)
    }

    fn properties(&self, dev: i32) -> NetResult<Props> {
        let p = self.properties_raw(dev)?;
        let s = |c: *mut c_char| {
            // SAFETY: plugins return NUL-terminated strings that outlive the call (static or per device).
            (!c.is_null()).then(|| unsafe { CStr::from_ptr(c) }.to_string_lossy().to_string())
        };
        Ok(Props {
            name: s(p.name).unwrap_or_default(),
            pci_path: s(p.pciPath),
            guid: p.guid,
            ptr_support: p.ptrSupport,
            speed: p.speed,
            port: p.port,
            latency: p.latency,
            max_comms: p.maxComms,
            max_recvs: p.maxRecvs,
            net_device_type: p.netDeviceType,
            net_device_version: p.netDeviceVersion,
        })
    }

    fn listen_into(&self, dev: i32, handle: &mut Handle) -> NetResult<Comm> {
        let f = func!(self, listen);
        let mut c: *mut c_void = std::ptr::null_mut();
        // SAFETY: handle is a writable 128-byte buffer; c a valid out-pointer.
        check(unsafe { f(dev, handle.as_mut_ptr().cast(), &mut c) })?;
        Ok(Comm(c))
    }

    unsafe fn connect_raw(
        &self,
        dev: i32,
        handle: *mut c_void,
        send_dev_comm: *mut *mut DevHandle,
    ) -> NetResult<Option<Comm>> {
        let f = func!(self, connect);
        let mut c: *mut c_void = std::ptr::null_mut();
        // SAFETY: forwarded from the caller's contract; c is a valid out-pointer.
        check(unsafe { f(dev, handle, &mut c, send_dev_comm) })?;
        Ok((!c.is_null()).then_some(Comm(c)))
    }

    unsafe fn accept_raw(&self, listen: Comm, recv_dev_comm: *mut *mut DevHandle) -> NetResult<Option<Comm>> {
        let f = func!(self, accept);
        let mut c: *mut c_void = std::ptr::null_mut();
        // SAFETY: forwarded from the caller's contract; c is a valid out-pointer.
        check(unsafe { f(listen.0, &mut c, recv_dev_comm) })?;
        Ok((!c.is_null()).then_some(Comm(c)))
    }

    fn reg_mr(&self, comm: Comm, data: *mut c_void, size: usize, ty: i32) -> NetResult<Mr> {
        let f = func!(self, regMr);
        let size = c_int::try_from(size).expect("regMr size must fit in an int");
        let mut m: *mut c_void = std::ptr::null_mut();
        // SAFETY: the plugin only records data/size; m is a valid out-pointer.
        check(unsafe { f(comm.0, data, size, ty, &mut m) })?;
        Ok(Mr(m))
    }

    fn has_reg_mr_dmabuf(&self) -> bool {
        self.table().regMrDmaBuf.is_some()
    }

    fn reg_mr_dmabuf(
        &self,
        comm: Comm,
        data: *mut c_void,
        size: usize,
        ty: i32,
        offset: u64,
        fd: i32,
    ) -> NetResult<Mr> {
        let f = func!(self, regMrDmaBuf);
        let mut m: *mut c_void = std::ptr::null_mut();
        // SAFETY: as reg_mr; the fd is only passed through.
        check(unsafe { f(comm.0, data, size, ty, offset, fd, &mut m) })?;
        Ok(Mr(m))
    }

    fn dereg_mr(&self, comm: Comm, mr: Mr) -> NetResult<()> {
        let f = func!(self, deregMr);
        // SAFETY: opaque pointers handed back to the plugin.
        check(unsafe { f(comm.0, mr.0) })
    }

    fn has_get_device_mr(&self) -> bool {
        self.table().getDeviceMr.is_some()
    }

    fn get_device_mr(&self, comm: Comm, mr: Mr) -> NetResult<*mut c_void> {
        let f = func!(self, getDeviceMr);
        let mut d: *mut c_void = std::ptr::null_mut();
        // SAFETY: d is a valid out-pointer.
        check(unsafe { f(comm.0, mr.0, &mut d) })?;
        Ok(d)
    }

    fn isend(&self, comm: Comm, data: *mut c_void, size: i32, tag: i32, mr: Mr) -> NetResult<Option<Req>> {
        let f = func!(self, isend);
        let mut r: *mut c_void = std::ptr::null_mut();
        // SAFETY: data must stay valid until the request completes: callers keep their buffers alive.
        check(unsafe { f(comm.0, data, size, tag, mr.0, &mut r) })?;
        Ok((!r.is_null()).then_some(Req(r)))
    }

    fn irecv_n(
        &self,
        comm: Comm,
        data: &mut [*mut c_void],
        sizes: &mut [i32],
        tags: &mut [i32],
        mrs: &mut [*mut c_void],
    ) -> NetResult<Option<Req>> {
        assert!(sizes.len() == data.len() && tags.len() == data.len() && mrs.len() == data.len());
        let f = func!(self, irecv);
        let mut r: *mut c_void = std::ptr::null_mut();
        // SAFETY: the arrays hold n entries each; buffers stay alive until the request completes.
        check(unsafe {
            f(
                comm.0,
                data.len() as c_int,
                data.as_mut_ptr(),
                sizes.as_mut_ptr(),
                tags.as_mut_ptr(),
                mrs.as_mut_ptr(),
                &mut r,
            )
        })?;
        Ok((!r.is_null()).then_some(Req(r)))
    }

    fn iflush(&self, comm: Comm, data: *mut c_void, size: i32, mr: Mr) -> NetResult<Option<Req>> {
        let f = func!(self, iflush);
        let mut d = [data];
        let mut s = [size];
        let mut m = [mr.0];
        let mut r: *mut c_void = std::ptr::null_mut();
        // SAFETY: one-entry arrays; r is a valid out-pointer.
        check(unsafe { f(comm.0, 1, d.as_mut_ptr(), s.as_mut_ptr(), m.as_mut_ptr(), &mut r) })?;
        Ok((!r.is_null()).then_some(Req(r)))
    }

    fn test_sizes(&self, req: Req, sizes: Option<&mut [i32]>) -> NetResult<bool> {
        let f = func!(self, test);
        let mut done: c_int = 0;
        let sp = sizes.map_or(std::ptr::null_mut(), |s| s.as_mut_ptr());
        // SAFETY: done is a valid out-pointer; sizes is NULL or has room for the request's n entries.
        check(unsafe { f(req.0, &mut done, sp) })?;
        Ok(done != 0)
    }

    fn has_irecv_consumed(&self) -> bool {
        self.table().irecvConsumed.is_some()
    }

    fn irecv_consumed_n(&self, comm: Comm, n: i32, req: Req) -> NetResult<()> {
        // SAFETY: see `func!`.
        let Some(f) = (unsafe { std::ptr::addr_of!((*self.table).irecvConsumed).read() }) else {
            return Ok(());
        };
        // SAFETY: opaque pointers handed back to the plugin.
        check(unsafe { f(comm.0, n, req.0) })
    }

    fn close_send(&self, comm: Comm) -> NetResult<()> {
        let f = func!(self, closeSend);
        // SAFETY: opaque pointer handed back to the plugin.
        check(unsafe { f(comm.0) })
    }

    fn close_recv(&self, comm: Comm) -> NetResult<()> {
        let f = func!(self, closeRecv);
        // SAFETY: opaque pointer handed back to the plugin.
        check(unsafe { f(comm.0) })
    }

    fn close_listen(&self, comm: Comm) -> NetResult<()> {
        let f = func!(self, closeListen);
        // SAFETY: opaque pointer handed back to the plugin.
        check(unsafe { f(comm.0) })
    }
}

// ---------------------------------------------------------------------------------------------
// A stack built in this process, driven through its Rust interface
// ---------------------------------------------------------------------------------------------

/// A stack built in this process from a [`Config`] (`tcpxshim::stack::build`), driven through the
/// `Transport` interface of its top layer, the `Shim`: the methods the exported table's trampolines
/// call, without the trampolines. Any number of them, each with a config of its own, can live in one
/// test binary. Errors come back as their `ncclResult_t`; their messages are kept
/// ([`StackNet::errors`]), since no trampoline logs them.
///
/// Every unsafe call below relies on the same two facts. The shim finds each comm, registration and
/// request it is handed through its object table, so a stale, foreign or made-up one is an error, not
/// a dereference. The data pointers and the handle buffer are the caller's, valid as the v7 ABI says
/// (the harness's callers keep buffers alive until their requests complete), and the inner transports
/// tests build stacks over (the fixtures, the built-in transport) check every handle byte they read.
pub struct StackNet {
    /// The stack (leaked: like a loaded plugin it lives until the process ends).
    pub shim: &'static Shim,
    errors: Mutex<Vec<String>>,
}

impl StackNet {
    /// Builds the stack `cfg` describes, logging into [`in_process_log`]; panics if that fails.
    pub fn build(cfg: &Config) -> StackNet {
        StackNet::try_build(cfg).unwrap_or_else(|e| panic!("building the stack of {cfg:?}: {e}"))
    }

    /// Like [`StackNet::build`], returning the error.
    pub fn try_build(cfg: &Config) -> tcpxshim::Result<StackNet> {
        in_process_log();
        let shim = tcpxshim::stack::build(cfg)?;
        Ok(StackNet {
            shim: Box::leak(Box::new(shim)),
            errors: Mutex::new(Vec::new()),
        })
    }

    /// The messages of the errors returned so far, oldest first.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The message of the last error returned.
    pub fn last_error(&self) -> Option<String> {
        self.errors().pop()
    }

    /// The shim's description of a comm ("send comm #3 (dev 0, ...)"), as its log lines name it.
    pub fn label(&self, comm: Comm) -> Option<String> {
        let c = Opaque::from_ptr(comm.0)?;
        // SAFETY: the shim looks the comm up in its object table (see the type's documentation).
        unsafe { self.shim.describe_comm(c) }
    }

    fn fail(&self, e: tcpxshim::Error) -> u32 {
        let code = e.code();
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e.to_string());
        code
    }

    fn res<T>(&self, r: tcpxshim::Result<T>) -> NetResult<T> {
        r.map_err(|e| self.fail(e))
    }

    /// A comm or request the call needs (NULL is an error, as at the C boundary).
    fn obj(&self, call: &str, what: &str, p: *mut c_void) -> NetResult<Opaque> {
        Opaque::from_ptr(p)
            .ok_or_else(|| self.fail(tcpxshim::Error::invalid_argument(format!("{call}: {what} is NULL"))))
    }
}

fn comm_of(o: Opaque) -> Comm {
    Comm(o.as_ptr())
}

fn req_of(o: Option<Opaque>) -> Option<Req> {
    o.map(|o| Req(o.as_ptr()))
}

impl Driver for StackNet {
    fn name(&self) -> String {
        self.shim.name().to_string()
    }

    fn devices(&self) -> NetResult<i32> {
        self.res(self.shim.devices())
    }

    fn properties(&self, dev: i32) -> NetResult<Props> {
        let p = self.res(self.shim.properties(dev))?;
        Ok(Props {
            name: p.name,
            pci_path: p.pci_path,
            guid: p.guid,
            ptr_support: p.ptr_support,
            speed: p.speed_mbps,
            port: p.port,
            latency: p.latency_us,
            max_comms: p.max_comms,
            max_recvs: p.max_recvs,
            net_device_type: p.device_type.raw(),
            net_device_version: p.device_version,
        })
    }

    fn listen_into(&self, dev: i32, handle: &mut Handle) -> NetResult<Comm> {
        self.res(self.shim.listen(dev, handle)).map(comm_of)
    }

    unsafe fn connect_raw(
        &self,
        dev: i32,
        handle: *mut c_void,
        send_dev_comm: *mut *mut DevHandle,
    ) -> NetResult<Option<Comm>> {
        if handle.is_null() {
            return Err(self.fail(tcpxshim::Error::invalid_argument("connect: handle is NULL")));
        }
        // SAFETY: the caller promises 128 writable bytes at `handle`, not touched by anyone else during the call.
        let h = unsafe { &mut *(handle as *mut Handle) };
        // SAFETY: see the type's documentation; send_dev_comm is NULL or valid, from the caller's contract.
        let c = self.res(unsafe { self.shim.connect(dev, h, send_dev_comm) })?;
        Ok(c.map(comm_of))
    }

    unsafe fn accept_raw(&self, listen: Comm, recv_dev_comm: *mut *mut DevHandle) -> NetResult<Option<Comm>> {
        let l = self.obj("accept", "listenComm", listen.0)?;
        // SAFETY: see the type's documentation; recv_dev_comm as the caller's contract says.
        let c = self.res(unsafe { self.shim.accept(l, recv_dev_comm) })?;
        Ok(c.map(comm_of))
    }

    fn reg_mr(&self, comm: Comm, data: *mut c_void, size: usize, ty: i32) -> NetResult<Mr> {
        let c = self.obj("regMr", "comm", comm.0)?;
        // SAFETY: see the type's documentation.
        let m = self.res(unsafe { self.shim.reg_mr(c, data, size, ty) })?;
        Ok(Mr(m.as_ptr()))
    }

    fn has_reg_mr_dmabuf(&self) -> bool {
        self.shim.has_dmabuf()
    }

    fn reg_mr_dmabuf(
        &self,
        comm: Comm,
        data: *mut c_void,
        size: usize,
        ty: i32,
        offset: u64,
        fd: i32,
    ) -> NetResult<Mr> {
        let c = self.obj("regMrDmaBuf", "comm", comm.0)?;
        // SAFETY: see the type's documentation; the fd is only passed through.
        let m = self.res(unsafe { self.shim.reg_mr_dmabuf(c, data, size, ty, offset, fd) })?;
        Ok(Mr(m.as_ptr()))
    }

    fn dereg_mr(&self, comm: Comm, mr: Mr) -> NetResult<()> {
        let c = self.obj("deregMr", "comm", comm.0)?;
        let m = self.obj("deregMr", "mhandle", mr.0)?;
        // SAFETY: see the type's documentation.
        self.res(unsafe { self.shim.dereg_mr(c, m) })
    }

    fn has_get_device_mr(&self) -> bool {
        true
    }

    fn get_device_mr(&self, comm: Comm, mr: Mr) -> NetResult<*mut c_void> {
        let c = self.obj("getDeviceMr", "comm", comm.0)?;
        let m = self.obj("getDeviceMr", "mhandle", mr.0)?;
        // SAFETY: see the type's documentation.
        let d = self.res(unsafe { self.shim.get_device_mr(c, m) })?;
        Ok(Opaque::opt_ptr(d))
    }

    fn isend(&self, comm: Comm, data: *mut c_void, size: i32, tag: i32, mr: Mr) -> NetResult<Option<Req>> {
        let c = self.obj("isend", "sendComm", comm.0)?;
        // SAFETY: see the type's documentation.
        let r = self.res(unsafe { self.shim.isend(c, data, size, tag, Opaque::from_ptr(mr.0)) })?;
        Ok(req_of(r))
    }

    fn irecv_n(
        &self,
        comm: Comm,
        data: &mut [*mut c_void],
        sizes: &mut [i32],
        tags: &mut [i32],
        mrs: &mut [*mut c_void],
    ) -> NetResult<Option<Req>> {
        assert!(sizes.len() == data.len() && tags.len() == data.len() && mrs.len() == data.len());
        let c = self.obj("irecv", "recvComm", comm.0)?;
        let m: Vec<Option<Opaque>> = mrs.iter().map(|&p| Opaque::from_ptr(p)).collect();
        // SAFETY: see the type's documentation.
        let r = self.res(unsafe { self.shim.irecv(c, data, sizes, tags, &m) })?;
        Ok(req_of(r))
    }

    fn iflush(&self, comm: Comm, data: *mut c_void, size: i32, mr: Mr) -> NetResult<Option<Req>> {
        let c = self.obj("iflush", "recvComm", comm.0)?;
        // SAFETY: see the type's documentation.
        let r = self.res(unsafe { self.shim.iflush(c, &[data], &[size], &[Opaque::from_ptr(mr.0)]) })?;
        Ok(req_of(r))
    }

    fn test_sizes(&self, req: Req, sizes: Option<&mut [i32]>) -> NetResult<bool> {
        let r = self.obj("test", "request", req.0)?;
        // The shim fills as many sizes as both the request and the slice have.
        // SAFETY: see the type's documentation.
        self.res(unsafe { self.shim.test(r, sizes) })
    }

    fn has_irecv_consumed(&self) -> bool {
        true
    }

    fn irecv_consumed_n(&self, comm: Comm, n: i32, req: Req) -> NetResult<()> {
        let c = self.obj("irecvConsumed", "recvComm", comm.0)?;
        // SAFETY: see the type's documentation.
        self.res(unsafe { self.shim.irecv_consumed(c, n, Opaque::from_ptr(req.0)) })
    }

    fn close_send(&self, comm: Comm) -> NetResult<()> {
        let c = self.obj("closeSend", "sendComm", comm.0)?;
        // SAFETY: see the type's documentation.
        self.res(unsafe { self.shim.close_send(c) })
    }

    fn close_recv(&self, comm: Comm) -> NetResult<()> {
        let c = self.obj("closeRecv", "recvComm", comm.0)?;
        // SAFETY: see the type's documentation.
        self.res(unsafe { self.shim.close_recv(c) })
    }

    fn close_listen(&self, comm: Comm) -> NetResult<()> {
        let c = self.obj("closeListen", "listenComm", comm.0)?;
        // SAFETY: see the type's documentation.
        self.res(unsafe { self.shim.close_listen(c) })
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Loads a private instance of a fixture, initialises it with a private log capture and returns it with
/// its controls. Its counters and knobs are its own, so tests using it may run in parallel.
pub fn fresh_fixture(kind: Fixture) -> (Net, FixtureCtl) {
    let net = Net::open_private(fixture_lib(kind));
    let ctl = net.fixture();
    net.init()
        .unwrap_or_else(|e| panic!("{} init failed: {}", kind.net_name(), result_name(e)));
    (net, ctl)
}

/// Open file descriptors of this process (entries of /proc/self/fd, including the one used to read it).
pub fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("read /proc/self/fd").count()
}

/// Threads of this process (entries of /proc/self/task).
pub fn count_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .count()
}

/// A stack over a private copy of fixture `kind` (its control service on loopback), with the
/// fixture's `knobs` set first and `cfg` applied to the config; and the fixture's controls.
pub fn shim_with(kind: Fixture, knobs: &[(&str, i64)], cfg: impl FnOnce(&mut Config)) -> (StackNet, FixtureCtl) {
    let fixture = private_copy(&fixture_lib(kind));
    let ctl = FixtureCtl::open(&fixture);
    for (k, v) in knobs {
        assert!(ctl.try_set(k, *v).is_some(), "the fixture has no knob {k}");
    }
    let mut c = Config {
        plugin: Some(fixture.to_string_lossy().into_owned()),
        ctrl_addr: Some(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        ..Config::default()
    };
    cfg(&mut c);
    let net = StackNet::try_build(&c).unwrap_or_else(|e| {
        panic!(
            "stack over {} failed: {e} (result {})",
            kind.net_name(),
            result_name(e.code())
        )
    });
    (net, ctl)
}
