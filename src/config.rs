//! Every `NCCL_TCPXSHIM_*` setting, declared once: name, default and meaning.
//!
//! Values are read from the environment when the plugin initialises. README.md documents each
//! entry of [`SETTINGS`]; a test checks that it does.

use crate::error::{Error, Result};

/// One documented setting.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Environment variable.
    pub name: &'static str,
    /// Default, as text.
    pub default: &'static str,
    /// What it does.
    pub doc: &'static str,
}

/// Inner plugin to load.
pub const PLUGIN: Setting = Setting {
    name: "NCCL_TCPXSHIM_PLUGIN",
    default: "(auto)",
    doc: "Inner transport: a plugin library path or name (`tcpx` tries libnccl-net-tcpx.so), or `builtin` for the \
          built-in TCP transport. Unset: the known TCPX install paths, then the built-in transport.",
};
/// Name reported to NCCL.
pub const NAME: Setting = Setting {
    name: "NCCL_TCPXSHIM_NAME",
    default: "(inner transport's name)",
    doc: "Name reported to NCCL (matched by NCCL_NET). By default the inner transport's own name, so that \
          NCCL_NET=GPUDirectTCPX_v7 keeps working.",
};
/// Interfaces of the built-in transport.
pub const TCP_IFNAME: Setting = Setting {
    name: "NCCL_TCPXSHIM_TCP_IFNAME",
    default: "(NCCL_SOCKET_IFNAME, else all but lo and docker*)",
    doc: "Interfaces the built-in TCP transport uses, one device each, in NCCL_SOCKET_IFNAME syntax \
          (`eth`, `^docker`, `=eth0`, comma separated). Falls back to NCCL_SOCKET_IFNAME.",
};
/// Devices made from local addresses.
pub const TCP_ADDRS: Setting = Setting {
    name: "NCCL_TCPXSHIM_TCP_ADDRS",
    default: "(unset: devices from NCCL_TCPXSHIM_TCP_IFNAME)",
    doc: "One device per local address, in order: `ADDR[=PCI_PATH],...`. Any 127.0.0.0/8 address belongs to the \
          loopback interface, so one host can present several devices (`127.0.0.1,127.0.0.2,...`) the way an A3 \
          machine shows eth1 to eth4; a PCI path (a sysfs device directory, e.g. a GPU's) is reported to NCCL as the \
          device's place in the topology. Overrides NCCL_TCPXSHIM_TCP_IFNAME.",
};
/// Data sockets per connection.
pub const TCP_STREAMS: Setting = Setting {
    name: "NCCL_TCPXSHIM_TCP_STREAMS",
    default: "4",
    doc: "Data sockets per connection of the built-in transport (1 to 64); large messages are striped across them. \
          Must match on every rank.",
};
/// I/O worker threads.
pub const TCP_WORKERS: Setting = Setting {
    name: "NCCL_TCPXSHIM_TCP_WORKERS",
    default: "4",
    doc: "I/O worker threads of the built-in transport, shared by all connections of the process (1 to 64).",
};
/// Striping chunk.
pub const TCP_MIN_CHUNK: Setting = Setting {
    name: "NCCL_TCPXSHIM_TCP_MIN_CHUNK",
    default: "65536",
    doc: "Smallest piece of a message sent on one data socket, in bytes (4096 to 16777216).",
};
/// Inline threshold.
pub const TCP_INLINE: Setting = Setting {
    name: "NCCL_TCPXSHIM_TCP_INLINE",
    default: "16384",
    doc: "Messages up to this many bytes travel on the control socket, sent from the calling thread, for low \
          latency; larger ones are striped over the data sockets by the workers (0 to 1048576). Must match on every rank.",
};

/// GPU memory in the built-in transport.
pub const TCP_CUDA: Setting = Setting {
    name: "NCCL_TCPXSHIM_TCP_CUDA",
    default: "0",
    doc: "1: the built-in transport also accepts CUDA buffers (ptrSupport HOST|CUDA), so NCCL's GPU-direct path runs \
          through it: data is copied between GPU memory and pinned host buffers with the CUDA driver, loaded at run \
          time. Without a GPU driver it stays host-only and says why. 0: host memory only; NCCL stages through host.",
};

/// Pinned host memory for GPU-memory staging.
pub const TCP_CUDA_POOL: Setting = Setting {
    name: "NCCL_TCPXSHIM_TCP_CUDA_POOL",
    default: "256",
    doc: "With NCCL_TCPXSHIM_TCP_CUDA=1: MiB of pinned host memory allocated when the transport starts (0 to 65536); \
          the staging buffers of CUDA registrations are carved out of it, and ordinary host memory (slower copies) is \
          used once it is full. Pinned memory is never allocated later: that would synchronise the GPU and can \
          deadlock with NCCL's running kernels.",
};

/// Warning about requests that do not complete.
pub const STALL_WARN: Setting = Setting {
    name: "NCCL_TCPXSHIM_STALL_WARN",
    default: "30",
    doc: "Seconds a request of the built-in transport may stay outstanding while NCCL tests it before one WARN line \
          per request says what it waits for (which peer, which message, how many bytes are in); 0: never (0 to \
          86400).",
};

/// Deliberate panic, to exercise the panic guard.
pub const DEBUG_PANIC: Setting = Setting {
    name: "NCCL_TCPXSHIM_DEBUG_PANIC",
    default: "(unset)",
    doc: "Testing aid: the plugin call named here (e.g. `isend`) panics inside the shim, to show that the panic \
          guard turns it into ncclInternalError and poisons the comm. Never set it in production.",
};

/// All settings, in documentation order.
pub const SETTINGS: &[Setting] = &[
    PLUGIN,
    NAME,
    TCP_IFNAME,
    TCP_ADDRS,
    TCP_STREAMS,
    TCP_WORKERS,
    TCP_MIN_CHUNK,
    TCP_INLINE,
    TCP_CUDA,
    TCP_CUDA_POOL,
    STALL_WARN,
    DEBUG_PANIC,
];

/// The value of a variable, if set and not empty.
pub fn var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.trim().to_string())
}

/// An integer setting within `[min, max]`, or its default when unset.
pub fn int(setting: &Setting, min: u64, max: u64) -> Result<u64> {
    let text = var(setting.name);
    let raw = text.as_deref().unwrap_or(setting.default);
    let value: u64 = raw.parse().map_err(|_| {
        Error::InvalidArgument(format!(
            "{}={raw:?} is not a number (expected {min} to {max})",
            setting.name
        ))
    })?;
    if value < min || value > max {
        return Err(Error::InvalidArgument(format!(
            "{}={value} is out of range (expected {min} to {max})",
            setting.name
        )));
    }
    Ok(value)
}

/// Settings of the built-in TCP transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpConfig {
    /// Interface selection, NCCL_SOCKET_IFNAME syntax; `None` means the default choice.
    pub ifname: Option<String>,
    /// Devices from local addresses (`ADDR[=PCI_PATH],...`), instead of interfaces.
    pub addrs: Option<String>,
    /// Data sockets per connection.
    pub streams: usize,
    /// I/O worker threads.
    pub workers: usize,
    /// Smallest striping chunk in bytes.
    pub min_chunk: usize,
    /// Largest message sent inline on the control socket.
    pub inline_max: usize,
    /// Accept CUDA buffers (staged through pinned host memory).
    pub cuda: bool,
    /// Bytes of pinned staging memory allocated at start when `cuda` is on.
    pub cuda_pool: usize,
    /// Outstanding time after which a tested request is reported once; `None`: never.
    pub stall_warn: Option<std::time::Duration>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            ifname: None,
            addrs: None,
            streams: 4,
            workers: 4,
            min_chunk: 65536,
            inline_max: 16384,
            cuda: false,
            cuda_pool: 256 << 20,
            stall_warn: Some(std::time::Duration::from_secs(30)),
        }
    }
}

impl TcpConfig {
    /// Reads the settings from the environment.
    pub fn from_env() -> Result<TcpConfig> {
        Ok(TcpConfig {
            ifname: var(TCP_IFNAME.name).or_else(|| var("NCCL_SOCKET_IFNAME")),
            addrs: var(TCP_ADDRS.name),
            streams: int(&TCP_STREAMS, 1, 64)? as usize,
            workers: int(&TCP_WORKERS, 1, 64)? as usize,
            min_chunk: int(&TCP_MIN_CHUNK, 4096, 16 << 20)? as usize,
            inline_max: int(&TCP_INLINE, 0, 1 << 20)? as usize,
            cuda: int(&TCP_CUDA, 0, 1)? == 1,
            cuda_pool: (int(&TCP_CUDA_POOL, 0, 65536)? as usize) << 20,
            stall_warn: match int(&STALL_WARN, 0, 86400)? {
                0 => None,
                s => Some(std::time::Duration::from_secs(s)),
            },
        })
    }
}
