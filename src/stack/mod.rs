//! The stack NCCL drives: the shim's own layer on top, the feature layers beneath it, the inner
//! transport at the bottom, all built in one place ([`build`]) from a [`Config`] value.
//!
//! ```text
//! Shim (objects NCCL holds, handle, stall warnings, poisoning,    src/stack/shim.rs
//!  |     metrics fed from its records when NCCL_TCPXSHIM_METRICS_DIR is set: src/metrics)
//!  | connect retry (NCCL_TCPXSHIM_CONNECT_TIMEOUT, unless 0)        src/stack/retry.rs
//!  | faults (NCCL_TCPXSHIM_FAULTS, only when set)                   src/stack/faults.rs
//!  v
//! inner transport: a loaded plugin (src/plugin) or the built-in TCP transport (src/tcp)
//! ```
//! A new feature is a [`Layer`] in a file of its own and one line in [`build_over`]; neither
//! `src/export` nor the other layers change.

pub mod cfgcheck;
pub mod failfast;
pub mod faults;
pub mod handle;
mod layer;
mod objects;
pub mod pool;
pub mod retry;
mod shim;
mod table;

pub use faults::{FaultSpec, Faults};
pub use layer::Layer;
pub use objects::{Kind, MAX_RECVS, MAX_REQUESTS};
pub use shim::Shim;

use crate::config::Config;
use crate::error::Result;
use crate::plugin::{PluginTransport, KNOWN_TCPX_PATHS};
use crate::tcp::TcpTransport;
use crate::transport::Transport;
use std::ffi::c_void;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Mutex, OnceLock};

/// What was loaded underneath, for the INFO line and the `devices` command.
#[derive(Clone, Debug)]
pub struct LoadInfo {
    /// The inner transport's own name.
    pub name: String,
    /// Library path, or "built-in".
    pub source: String,
    /// ncclNet ABI version of the inner plugin; 0 for the built-in transport.
    pub abi_version: u32,
    /// Number of devices.
    pub devices: i32,
}

/// Address of the exported table, so that loading tcpxshim under itself is detected.
static OWN_TABLE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// Records the address of the plugin table this library exports.
pub fn set_own_table(p: *const c_void) {
    OWN_TABLE.store(p as *mut c_void, Ordering::Relaxed);
}

fn plugin_info(t: &PluginTransport) -> LoadInfo {
    LoadInfo {
        name: t.name().to_string(),
        source: t.path().display().to_string(),
        abi_version: t.abi_version(),
        devices: 0,
    }
}

/// Loads the inner transport `cfg.plugin` asks for: a plugin, or the built-in transport.
pub fn load_inner(cfg: &Config) -> Result<(Box<dyn Transport>, LoadInfo)> {
    let own = OWN_TABLE.load(Ordering::Relaxed) as *const c_void;
    let logger = crate::logging::nccl_logger().or_else(crate::logging::fallback);
    let plugin = |t: PluginTransport| -> (Box<dyn Transport>, LoadInfo) {
        let info = plugin_info(&t);
        (Box::new(t), info)
    };
    match cfg.plugin.as_deref() {
        Some("builtin") => builtin(cfg),
        Some(value) => Ok(plugin(PluginTransport::load(value, own, logger)?)),
        None => {
            for path in KNOWN_TCPX_PATHS {
                if !std::path::Path::new(path).exists() {
                    continue;
                }
                match PluginTransport::load(path, own, logger) {
                    Ok(t) => return Ok(plugin(t)),
                    Err(e) => log::warn!("not using {path}: {e}; trying the next candidate"),
                }
            }
            builtin(cfg)
        }
    }
}

fn builtin(cfg: &Config) -> Result<(Box<dyn Transport>, LoadInfo)> {
    let t = TcpTransport::new(&cfg.tcp)?;
    let info = LoadInfo {
        name: t.name().to_string(),
        source: "built-in".into(),
        abi_version: 0,
        devices: 0,
    };
    Ok((Box::new(t), info))
}

/// Builds the whole stack `cfg` describes: loads the inner transport and stacks the layers.
pub fn build(cfg: &Config) -> Result<Shim> {
    let (inner, info) = load_inner(cfg)?;
    build_over(cfg, inner, info)
}

/// Stacks the layers `cfg` asks for over `inner`, with the shim's own layer on top.
pub fn build_over(cfg: &Config, inner: Box<dyn Transport>, info: LoadInfo) -> Result<Shim> {
    let t: Box<dyn Transport> = match &cfg.faults {
        Some(f) => Box::new(Faults::new(inner, f.clone())),
        None => inner,
    };
    let t: Box<dyn Transport> = match cfg.connect_timeout {
        Some(timeout) => Box::new(retry::Retry::new(t, timeout)),
        None => t,
    };
    Shim::over(t, info, cfg)
}

static GLOBAL: OnceLock<Shim> = OnceLock::new();
static GLOBAL_INIT: Mutex<()> = Mutex::new(());

/// The process-wide stack NCCL drives, built from the environment on first use. A failed build
/// is retried on the next call, so a later init can succeed once the setting is fixed.
pub fn global() -> Result<&'static Shim> {
    if let Some(s) = GLOBAL.get() {
        return Ok(s);
    }
    let _guard = crate::lock(&GLOBAL_INIT);
    if let Some(s) = GLOBAL.get() {
        return Ok(s);
    }
    let shim = build(&Config::from_env()?)?;
    log::info!("{}", shim.summary());
    Ok(GLOBAL.get_or_init(|| shim))
}

/// Makes `shim` the process-wide stack that the exported plugin table drives, instead of one
/// built from the environment at init (for programs and tests that build their stack from a
/// [`Config`] of their own). Fails if a stack is in place already.
pub fn install_global(shim: Shim) -> Result<&'static Shim> {
    let _guard = crate::lock(&GLOBAL_INIT);
    let mut placed = false;
    let s = GLOBAL.get_or_init(|| {
        placed = true;
        shim
    });
    if !placed {
        return Err(crate::error::Error::invalid_usage(
            "install_global: the process already has its stack (built at init or installed earlier)",
        ));
    }
    log::info!("{}", s.summary());
    Ok(s)
}

/// The process-wide stack, if it has been built.
pub fn try_global() -> Option<&'static Shim> {
    GLOBAL.get()
}
