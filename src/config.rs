//! Every `NCCL_TCPXSHIM_*` setting, declared once: name, default and meaning.
//!
//! The plugin reads them into a [`Config`] once, when it initialises ([`Config::from_env`]); the
//! stack is built from that value, and tests build stacks from configs of their own
//! ([`Config::from_vars`] with a map, or a default config with fields set). Each default is
//! written once, in its [`Setting`]. README.md documents each entry of [`SETTINGS`]; a test
//! checks that it does.

pub use crate::control::link::{LinkConfig, LINK_SPIN, PEER_TIMEOUT};
use crate::error::{Error, Result};
pub use crate::recovery::{
    RecoveryConfig, RECOVERY, RECOVERY_ACK_EVERY, RECOVERY_ATTEMPTS, RECOVERY_COPY_MAX, RECOVERY_COPY_RING,
    RECOVERY_TIMEOUT,
};
pub use crate::stack::pool::{POOL, POOL_IDLE, POOL_MAX};
pub use crate::tcp::config::{
    TCP_ADDRS, TCP_CPUS, TCP_IFNAME, TCP_INLINE, TCP_KEEPALIVE, TCP_MIN_CHUNK, TCP_PORT_RANGE, TCP_SPIN, TCP_STREAMS,
    TCP_USER_TIMEOUT, TCP_WORKERS,
};
use crate::tcp::TcpConfig;

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

/// Warning about requests that do not complete.
pub const STALL_WARN: Setting = Setting {
    name: "NCCL_TCPXSHIM_STALL_WARN",
    default: "30",
    doc: "Seconds a request may stay outstanding while NCCL tests it before one WARN line per request names the comm, \
          the peer, the operation, its size and age, and what the inner transport says it waits for (the built-in \
          transport: bytes or chunks missing); works over every inner plugin, TCPX included. 0: never (0 to 86400).",
};

/// Address of the control service.
pub const CTRL_ADDR: Setting = Setting {
    name: "NCCL_TCPXSHIM_CTRL_ADDR",
    default: "(first address of NCCL_TCPXSHIM_TCP_IFNAME's choice)",
    doc: "Local IP address the shim's control service listens on and names in its handles (other ranks connect to \
          it). Started only when needed: for an inner plugin whose handle leaves no room for the shim's trailer, \
          and on the first listen for the settings check between peers (unless NCCL_TCPXSHIM_CONFIG_CHECK=off).",
};

/// How inner handles travel.
pub const HANDLE: Setting = Setting {
    name: "NCCL_TCPXSHIM_HANDLE",
    default: "auto",
    doc: "`auto`: the inner plugin's handle travels inline in NCCL's 128-byte handle when it leaves the shim 40 bytes \
          (TCPX does), else it is served by the control service; `served`: always served (for testing that mode).",
};

/// Fault injection.
pub const FAULTS: Setting = Setting {
    name: "NCCL_TCPXSHIM_FAULTS",
    default: "(unset: no faults)",
    doc: "Deterministic fault injection for tests and chaos runs: `;`-separated clauses `seed=N`, then `connect=`, \
          `accept=` and `regmr=` with `fail:K` (the first K fail) or `p:P` (each fails with probability P), \
          `break=after:N` or `break=p:P` (connections break), `delay=ms:D` or `delay=ms:D,p:P` (late completions), \
          `panic=CALL` (that plugin call panics); e.g. `seed=7;connect=fail:1;break=after:100`. A bad value fails \
          init. See docs/design.md (Fault injection). Never set it in production.",
};

/// Metrics files.
pub const METRICS_DIR: Setting = Setting {
    name: "NCCL_TCPXSHIM_METRICS_DIR",
    default: "(unset: no metrics)",
    doc: "Directory each process writes its metrics to, as a Prometheus text file `<host>-<pid>.prom` (written to a \
          temporary name, then renamed), every NCCL_TCPXSHIM_METRICS_INTERVAL seconds and when its last connection \
          closes; point node_exporter's textfile collector at it. Unset: no metrics. See \
          README.md (Metrics).",
};
/// How often the metrics file is written.
pub const METRICS_INTERVAL: Setting = Setting {
    name: "NCCL_TCPXSHIM_METRICS_INTERVAL",
    default: "10",
    doc: "Seconds between two writes of the metrics file (1 to 3600); used only with NCCL_TCPXSHIM_METRICS_DIR.",
};

/// Deadline of connect retries.
pub const CONNECT_TIMEOUT: Setting = Setting {
    name: "NCCL_TCPXSHIM_CONNECT_TIMEOUT",
    default: "60",
    doc: "Seconds the shim keeps retrying a connect that was refused, found the peer unreachable or timed out, \
          with backoff from 10 ms doubling to 1 s, before connect fails with the peer, the attempts and the last \
          cause (0 to 86400; 0: no retries, the first failure goes to NCCL). Over TCPX the shim does not retry a \
          refused connect (TCPX retries those itself, NCCL_GPUDIRECTTCPX_CONNECTION_RETRY); its other failures \
          are retried within this deadline, which bounds the whole connect.",
};

/// Ending the process on job-ending errors.
pub const ABORT_ON_ERROR: Setting = Setting {
    name: "NCCL_TCPXSHIM_ABORT_ON_ERROR",
    default: "0",
    doc: "1: when a connect, accept or data-path call returns an error that ends the job (connection lost, the \
          peer's error, a timeout), the shim logs it, writes it to stderr and ends the process at once with exit \
          status 1 (`_exit`: no destructors or exit handlers run on NCCL's thread), for frameworks that would \
          otherwise wait for their own watchdog. 0: the error goes to NCCL.",
};

/// The settings check between peers.
pub const CONFIG_CHECK: Setting = Setting {
    name: "NCCL_TCPXSHIM_CONFIG_CHECK",
    default: "warn",
    doc: "At connect, compare with the peer the settings both ends must agree on (the tcpxshim version, the inner \
          transport, and its settings the wire protocol depends on: NCCL_TCPXSHIM_TCP_STREAMS and \
          NCCL_TCPXSHIM_TCP_INLINE for the built-in transport; NCCL_GPUDIRECTTCPX_SOCKET_IFNAME, \
          NCCL_SOCKET_NTHREADS, NCCL_NSOCKS_PERTHREAD, NCCL_DYNAMIC_CHUNK_SIZE and NCCL_GPUDIRECTTCPX_RECV_SYNC \
          over TCPX), fetched from the listener's control service. `warn`: one WARN line per connection names \
          each difference with both values (`NCCL_TCPXSHIM_TCP_STREAMS: here 4, peer 8`); `enforce`: the \
          connect fails with that text (ncclInvalidUsage); `off`: no check, and no control service for it. A \
          peer that cannot be asked is reported once and the connect goes on.",
};

/// All settings, in documentation order.
pub const SETTINGS: &[Setting] = &[
    PLUGIN,
    NAME,
    TCP_IFNAME,
    TCP_ADDRS,
    TCP_STREAMS,
    TCP_WORKERS,
    TCP_CPUS,
    TCP_MIN_CHUNK,
    TCP_SPIN,
    TCP_INLINE,
    TCP_KEEPALIVE,
    TCP_USER_TIMEOUT,
    TCP_PORT_RANGE,
    STALL_WARN,
    CTRL_ADDR,
    PEER_TIMEOUT,
    LINK_SPIN,
    HANDLE,
    FAULTS,
    METRICS_DIR,
    METRICS_INTERVAL,
    CONNECT_TIMEOUT,
    ABORT_ON_ERROR,
    RECOVERY,
    RECOVERY_TIMEOUT,
    RECOVERY_ATTEMPTS,
    RECOVERY_COPY_MAX,
    RECOVERY_COPY_RING,
    RECOVERY_ACK_EVERY,
    CONFIG_CHECK,
    POOL,
    POOL_MAX,
    POOL_IDLE,
];

/// The value of a variable, if set and not empty.
pub fn var(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.trim().to_string())
}

/// Where settings come from: the environment in production, a map in tests.
pub type Vars<'a> = &'a dyn Fn(&str) -> Option<String>;

pub(crate) fn get(vars: Vars<'_>, name: &str) -> Option<String> {
    vars(name)
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.trim().to_string())
}

/// An integer setting within `[min, max]`, or its default when unset.
pub fn int(vars: Vars<'_>, setting: &Setting, min: u64, max: u64) -> Result<u64> {
    let text = get(vars, setting.name);
    let raw = text.as_deref().unwrap_or(setting.default);
    let value: u64 = raw.parse().map_err(|_| {
        Error::invalid_argument(format!(
            "{}={raw:?} is not a number (expected {min} to {max})",
            setting.name
        ))
    })?;
    if value < min || value > max {
        return Err(Error::invalid_argument(format!(
            "{}={value} is out of range (expected {min} to {max})",
            setting.name
        )));
    }
    Ok(value)
}

/// Everything the stack is built from.
#[derive(Clone, Debug)]
pub struct Config {
    /// NCCL_TCPXSHIM_PLUGIN: `builtin`, a path or a name; `None`: TCPX if installed, else built-in.
    pub plugin: Option<String>,
    /// NCCL_TCPXSHIM_NAME: the name reported to NCCL; `None`: the inner transport's.
    pub name: Option<String>,
    /// NCCL_TCPXSHIM_STALL_WARN: outstanding time after which a tested request is reported once.
    pub stall_warn: Option<std::time::Duration>,
    /// NCCL_TCPXSHIM_HANDLE.
    pub handle_mode: crate::stack::handle::HandleMode,
    /// NCCL_TCPXSHIM_CTRL_ADDR.
    pub ctrl_addr: Option<std::net::IpAddr>,
    /// The control links' settings (NCCL_TCPXSHIM_PEER_TIMEOUT, NCCL_TCPXSHIM_LINK_SPIN).
    pub link: LinkConfig,
    /// NCCL_TCPXSHIM_FAULTS: the faults to inject; `None`: none (the layer is not stacked).
    pub faults: Option<crate::stack::FaultSpec>,
    /// NCCL_TCPXSHIM_METRICS_DIR: where the metrics file goes; `None`: no metrics.
    pub metrics_dir: Option<std::path::PathBuf>,
    /// The metrics' other settings and the labels it puts on every series.
    pub metrics: MetricsConfig,
    /// The built-in transport's settings.
    pub tcp: TcpConfig,
    /// NCCL_TCPXSHIM_CONNECT_TIMEOUT: how long failed connects are retried; `None`: not at all (the
    /// retry layer is not stacked).
    pub connect_timeout: Option<std::time::Duration>,
    /// NCCL_TCPXSHIM_ABORT_ON_ERROR: end the process on an error that ends the job.
    pub abort_on_error: bool,
    /// The recovery protocol's settings (src/recovery/config.rs).
    pub recovery: RecoveryConfig,
    /// NCCL_TCPXSHIM_RECOVERY: whether the recovery engine runs.
    pub recovery_engine: bool,
    /// NCCL_TCPXSHIM_CONFIG_CHECK.
    pub config_check: crate::stack::cfgcheck::CheckMode,
    /// The values of the settings compared with the peer's at connect.
    pub peer_settings: crate::stack::cfgcheck::PeerSettings,
    /// Connection pooling (NCCL_TCPXSHIM_POOL, _MAX, _IDLE).
    pub pool: crate::stack::pool::PoolConfig,
}

/// What the metrics need besides its directory: the write interval and the process's
/// labels, resolved once when the settings are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// NCCL_TCPXSHIM_METRICS_INTERVAL.
    pub interval: std::time::Duration,
    /// The global rank: RANK, else OMPI_COMM_WORLD_RANK, else SLURM_PROCID; empty when none is set.
    pub rank: String,
    /// The rank on this host: LOCAL_RANK, else OMPI_COMM_WORLD_LOCAL_RANK, else SLURM_LOCALID; empty
    /// when none is set.
    pub local_rank: String,
    /// This host's name.
    pub host: String,
}

/// Variables naming the global rank, in the order they are tried.
pub const RANK_VARS: &[&str] = &["RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"];
/// Variables naming the local rank, in the order they are tried.
pub const LOCAL_RANK_VARS: &[&str] = &["LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"];

/// The host's name (`gethostname`), or "localhost" if it cannot be read.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer it is given.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(h) if rc == 0 && !h.is_empty() => h.to_string(),
        _ => "localhost".to_string(),
    }
}

impl MetricsConfig {
    /// Reads the interval and the rank variables from `vars`; the host name from the system.
    pub fn from_vars(vars: Vars<'_>) -> Result<MetricsConfig> {
        let first = |names: &[&str]| names.iter().find_map(|n| get(vars, n)).unwrap_or_default();
        Ok(MetricsConfig {
            interval: std::time::Duration::from_secs(int(vars, &METRICS_INTERVAL, 1, 3600)?),
            rank: first(RANK_VARS),
            local_rank: first(LOCAL_RANK_VARS),
            host: hostname(),
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::from_vars(&|_| None).unwrap_or_else(|e| unreachable!("the built-in defaults parse: {e}"))
    }
}

impl Config {
    /// Reads the settings from the environment.
    pub fn from_env() -> Result<Config> {
        Config::from_vars(&|k| std::env::var(k).ok())
    }

    /// Reads the settings from `vars` (unset names give the defaults).
    pub fn from_vars(vars: Vars<'_>) -> Result<Config> {
        use crate::stack::handle::HandleMode;
        let handle_mode = match get(vars, HANDLE.name).as_deref().unwrap_or(HANDLE.default) {
            "auto" => HandleMode::Auto,
            "served" => HandleMode::Served,
            v => {
                return Err(Error::invalid_argument(format!(
                    "{}={v:?} is not `auto` or `served`",
                    HANDLE.name
                )))
            }
        };
        let ctrl_addr = match get(vars, CTRL_ADDR.name) {
            None => None,
            Some(v) => Some(
                v.parse()
                    .map_err(|_| Error::invalid_argument(format!("{}={v:?} is not an IP address", CTRL_ADDR.name)))?,
            ),
        };
        Ok(Config {
            plugin: get(vars, PLUGIN.name),
            name: get(vars, NAME.name),
            stall_warn: match int(vars, &STALL_WARN, 0, 86400)? {
                0 => None,
                s => Some(std::time::Duration::from_secs(s)),
            },
            handle_mode,
            ctrl_addr,
            link: LinkConfig::from_vars(vars)?,
            faults: get(vars, FAULTS.name)
                .map(|t| crate::stack::FaultSpec::parse(&t))
                .transpose()?,
            metrics_dir: get(vars, METRICS_DIR.name).map(std::path::PathBuf::from),
            metrics: MetricsConfig::from_vars(vars)?,
            peer_settings: crate::stack::cfgcheck::PeerSettings::from_vars(vars),
            tcp: TcpConfig::from_vars(vars)?,
            connect_timeout: match int(vars, &CONNECT_TIMEOUT, 0, 86400)? {
                0 => None,
                s => Some(std::time::Duration::from_secs(s)),
            },
            abort_on_error: int(vars, &ABORT_ON_ERROR, 0, 1)? == 1,
            recovery: RecoveryConfig::from_vars(vars)?,
            recovery_engine: int(vars, &RECOVERY, 0, 1)? == 1,
            config_check: crate::stack::cfgcheck::CheckMode::from_vars(vars)?,
            pool: crate::stack::pool::PoolConfig::from_vars(vars)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<Config> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_vars(&|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_come_from_the_setting_table() {
        let c = Config::default();
        assert_eq!(c.tcp.streams.to_string(), TCP_STREAMS.default);
        assert_eq!(c.tcp.workers, None, "planned from the CPUs");
        assert_eq!(c.tcp.cpus, None);
        assert_eq!(c.tcp.inline_max.to_string(), TCP_INLINE.default);
        assert_eq!(
            c.stall_warn.map(|d| d.as_secs().to_string()).as_deref(),
            Some(STALL_WARN.default)
        );
        assert!(c.plugin.is_none() && c.faults.is_none() && c.ctrl_addr.is_none());
        assert!(c.metrics_dir.is_none(), "no metrics by default");
        assert_eq!(c.metrics.interval.as_secs().to_string(), METRICS_INTERVAL.default);
    }

    #[test]
    fn metrics_labels_come_from_the_first_rank_variable_set() {
        let c = from(&[
            ("NCCL_TCPXSHIM_METRICS_DIR", "/tmp/m"),
            ("NCCL_TCPXSHIM_METRICS_INTERVAL", "2"),
            ("OMPI_COMM_WORLD_RANK", "5"),
            ("SLURM_PROCID", "9"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap();
        assert_eq!(c.metrics_dir.as_deref(), Some(std::path::Path::new("/tmp/m")));
        assert_eq!(c.metrics.interval, std::time::Duration::from_secs(2));
        assert_eq!((c.metrics.rank.as_str(), c.metrics.local_rank.as_str()), ("5", "1"));
        assert!(!c.metrics.host.is_empty());
        let c = from(&[("RANK", "3"), ("OMPI_COMM_WORLD_RANK", "5")]).unwrap();
        assert_eq!((c.metrics.rank.as_str(), c.metrics.local_rank.as_str()), ("3", ""));
        let bad = from(&[("NCCL_TCPXSHIM_METRICS_INTERVAL", "0")])
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("NCCL_TCPXSHIM_METRICS_INTERVAL=0 is out of range"),
            "{bad}"
        );
    }

    #[test]
    fn values_are_read_and_checked() {
        let c = from(&[
            ("NCCL_TCPXSHIM_PLUGIN", " builtin "),
            ("NCCL_TCPXSHIM_TCP_STREAMS", "8"),
            ("NCCL_TCPXSHIM_STALL_WARN", "0"),
            ("NCCL_TCPXSHIM_HANDLE", "served"),
            ("NCCL_TCPXSHIM_CTRL_ADDR", "127.0.0.1"),
            ("NCCL_SOCKET_IFNAME", "lo"),
        ])
        .unwrap();
        assert_eq!(c.plugin.as_deref(), Some("builtin"));
        assert_eq!(c.tcp.streams, 8);
        assert_eq!(c.tcp.ifname.as_deref(), Some("lo"));
        assert!(c.stall_warn.is_none());
        assert_eq!(c.handle_mode, crate::stack::handle::HandleMode::Served);
        let bad = from(&[("NCCL_TCPXSHIM_TCP_STREAMS", "65")]).unwrap_err().to_string();
        assert!(bad.contains("NCCL_TCPXSHIM_TCP_STREAMS=65 is out of range"), "{bad}");
        let bad = from(&[("NCCL_TCPXSHIM_HANDLE", "big")]).unwrap_err().to_string();
        assert!(bad.contains("NCCL_TCPXSHIM_HANDLE"), "{bad}");
        let bad = from(&[("NCCL_TCPXSHIM_CTRL_ADDR", "nowhere")]).unwrap_err().to_string();
        assert!(bad.contains("not an IP address"), "{bad}");
    }
}
