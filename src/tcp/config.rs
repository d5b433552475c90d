//! Settings of the built-in TCP transport: declared here, beside the transport that reads them,
//! and listed with every other setting in `crate::config::SETTINGS`.

use crate::config::{get, int, Setting, Vars};
use crate::error::Result;

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
    default: "(one per CPU of the rank's share beyond 2, 1 to 4)",
    doc: "I/O worker threads of the built-in transport, shared by all connections of the process (0 to 64; 0: no \
          threads, the data sockets are driven from the threads that call test, i.e. NCCL's proxy thread). Unset: \
          one per CPU of NCCL_TCPXSHIM_TCP_CPUS if that is set, else one per CPU of the rank's share beyond the two \
          NCCL's own threads keep busy, at least 1, at most 4. The share is what the process may use (its affinity \
          mask, e.g. mpirun's binding, and its cgroup's CPU quota), divided among the ranks of the host that run on \
          the same CPUs (the launcher's LOCAL_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_SIZE, MPI_LOCALNRANKS or \
          SLURM_NTASKS_PER_NODE against the online CPUs): 16 CPUs for 1 or 2 ranks, 4 workers; for 4 ranks, 2 each; \
          one core, 1. An INFO line at start says the plan.",
};

/// CPUs the I/O workers are pinned to.
pub const TCP_CPUS: Setting = Setting {
    name: "NCCL_TCPXSHIM_TCP_CPUS",
    default: "(unset: not pinned)",
    doc: "CPUs the built-in transport's I/O workers are pinned to, one each in turn (`0-3,8`), as TCPX's \
          NCCL_GPUDIRECTTCPX_TX_BINDINGS pins its threads: keep them on the cores nearest the NIC, away from the \
          training job's. CPUs outside the process's affinity mask are left out (the INFO line names them); none \
          left: not pinned.",
};

/// Worker polling after traffic.
pub const TCP_SPIN: Setting = Setting {
    name: "NCCL_TCPXSHIM_TCP_SPIN",
    default: "0",
    doc: "Microseconds an I/O worker of the built-in transport keeps polling its sockets after traffic before it \
          sleeps (0 to 100000; 0: it sleeps at once). A polling worker needs no wake-up for the next message (an \
          eventfd write by NCCL's proxy thread) and sees arriving data at once, but keeps a CPU busy while it polls: \
          for hosts with cores to spare. Measured under nccl-tests with 50: all-reduce within the spread between \
          runs at 2 ranks on 16 cores, send/recv slower at 4 ranks (README).",
};

/// Striping chunk.
pub const TCP_MIN_CHUNK: Setting = Setting {
    name: "NCCL_TCPXSHIM_TCP_MIN_CHUNK",
    default: "(65536; 524288 with a share of less than 2 CPUs)",
    doc: "Smallest piece of a message sent on one data socket, in bytes (4096 to 16777216). Unset: 65536, or \
          524288 where the rank's share of the CPUs (see NCCL_TCPXSHIM_TCP_WORKERS) is less than 2 (fewer, larger \
          writes: one core is busy enough with the kernel's copies). Each rank may choose its own: the receiver \
          follows the sender's.",
};

/// Inline threshold.
pub const TCP_INLINE: Setting = Setting {
    name: "NCCL_TCPXSHIM_TCP_INLINE",
    default: "16384",
    doc: "Messages up to this many bytes travel on the control socket, sent from the calling thread, for low \
          latency; larger ones are striped over the data sockets by the workers (0 to 1048576). Must match on every rank.",
};

/// Dead-peer detection on an idle connection.
pub const TCP_KEEPALIVE: Setting = Setting {
    name: "NCCL_TCPXSHIM_TCP_KEEPALIVE",
    default: "10",
    doc: "Seconds a socket of the built-in transport may stay idle (nothing sent and nothing in flight) before \
          TCP keepalive probes start (0: keepalive off; at most 32767). Probes follow every max(1, value/2) s; \
          after 4 unanswered ones the connection fails with a timeout, so with the default a peer that went silent \
          while nothing was in flight (a crashed host, a cut link) fails its requests after about 30 s. The peer's \
          kernel answers probes even while its process is busy or stopped, so a healthy idle link never fails.",
};

/// Dead-peer detection while data is in flight.
pub const TCP_USER_TIMEOUT: Setting = Setting {
    name: "NCCL_TCPXSHIM_TCP_USER_TIMEOUT",
    default: "0",
    doc: "TCP_USER_TIMEOUT of every socket of the built-in transport, in ms (0: the kernel's, i.e. retransmissions \
          until net.ipv4.tcp_retries2 gives up, about 15 minutes; at most 2147483647): how long sent data may stay \
          unacknowledged before the connection fails with a timeout, so a peer that went silent during a transfer \
          fails its requests after this long. With keepalive on it replaces the probe count: an idle connection fails \
          once this long has passed without a word from the peer and a probe went unanswered. Off by default because Linux applies it to a zero \
          window too: a live peer that stops reading for this long (a rank late to the next collective while \
          senders' data fills its buffers: a checkpoint, an evaluation) is cut as well. Set it (e.g. 30000) where \
          ranks never fall that far behind.",
};

/// Ports the listeners bind to.
pub const TCP_PORT_RANGE: Setting = Setting {
    name: "NCCL_TCPXSHIM_TCP_PORT_RANGE",
    default: "(unset: any free port)",
    doc: "Ports the built-in transport's listeners bind to, `BEGIN-END` inclusive (1 to 65535), as TCPX's           NCCL_GPUDIRECTTCPX_PORT_BEGIN/END: for firewalls that open only a range, and to tell the transport's           connections apart from the job's other sockets (every data and control connection has a port of the           range at its accepting end). A listen fails, naming this setting, when every port of the range is taken.",
};

/// Settings of the built-in TCP transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpConfig {
    /// Interface selection, NCCL_SOCKET_IFNAME syntax; `None` means the default choice.
    pub ifname: Option<String>,
    /// Devices from local addresses (`ADDR[=PCI_PATH],...`), instead of interfaces.
    pub addrs: Option<String>,
    /// Data sockets per connection.
    pub streams: usize,
    /// I/O worker threads; `None`: planned from the usable CPUs (see `cpus`).
    pub workers: Option<usize>,
    /// CPUs the workers are pinned to, in turn; `None`: not pinned.
    pub cpus: Option<Vec<usize>>,
    /// Smallest striping chunk in bytes; `None`: planned from the usable CPUs (see `cpus`).
    pub min_chunk: Option<usize>,
    /// Microseconds the workers poll after traffic; `None`: 0.
    pub spin_us: Option<u64>,
    /// The job's ranks on this host, as the launcher's variables say (see `cpus::LocalRanks`).
    pub local_ranks: Option<super::cpus::LocalRanks>,
    /// Largest message sent inline on the control socket.
    pub inline_max: usize,
    /// Idle seconds before keepalive probes (0: keepalive off).
    pub keepalive_s: u32,
    /// TCP_USER_TIMEOUT in ms (0: the kernel's default).
    pub user_timeout_ms: u32,
    /// Ports listeners bind to (inclusive); `None`: any free port.
    pub ports: Option<(u16, u16)>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig::from_vars(&|_| None).unwrap_or_else(|e| unreachable!("the built-in defaults parse: {e}"))
    }
}

impl TcpConfig {
    /// Reads the settings from the environment.
    pub fn from_env() -> Result<TcpConfig> {
        TcpConfig::from_vars(&|k| std::env::var(k).ok())
    }

    /// Reads the settings from `vars`.
    pub fn from_vars(vars: Vars<'_>) -> Result<TcpConfig> {
        Ok(TcpConfig {
            ifname: get(vars, TCP_IFNAME.name).or_else(|| get(vars, "NCCL_SOCKET_IFNAME")),
            addrs: get(vars, TCP_ADDRS.name),
            streams: int(vars, &TCP_STREAMS, 1, 64)? as usize,
            workers: match get(vars, TCP_WORKERS.name) {
                Some(_) => Some(int(vars, &TCP_WORKERS, 0, 64)? as usize),
                None => None,
            },
            cpus: get(vars, TCP_CPUS.name)
                .map(|v| super::cpus::parse_cpu_list(TCP_CPUS.name, &v))
                .transpose()?,
            min_chunk: match get(vars, TCP_MIN_CHUNK.name) {
                Some(_) => Some(int(vars, &TCP_MIN_CHUNK, 4096, 16 << 20)? as usize),
                None => None,
            },
            spin_us: match get(vars, TCP_SPIN.name) {
                Some(_) => Some(int(vars, &TCP_SPIN, 0, 100_000)?),
                None => None,
            },
            local_ranks: super::cpus::LocalRanks::from_vars(vars),
            inline_max: int(vars, &TCP_INLINE, 0, 1 << 20)? as usize,
            keepalive_s: int(vars, &TCP_KEEPALIVE, 0, 32767)? as u32,
            user_timeout_ms: int(vars, &TCP_USER_TIMEOUT, 0, i32::MAX as u64)? as u32,
            ports: port_range(get(vars, TCP_PORT_RANGE.name))?,
        })
    }

    /// The dead-peer detection every socket of a connection gets.
    pub fn liveness(&self) -> super::liveness::Liveness {
        super::liveness::Liveness {
            keepalive_s: self.keepalive_s,
            user_timeout_ms: self.user_timeout_ms,
        }
    }
}

/// Parses NCCL_TCPXSHIM_TCP_PORT_RANGE (`BEGIN-END`).
fn port_range(v: Option<String>) -> Result<Option<(u16, u16)>> {
    let Some(v) = v else { return Ok(None) };
    let bad = || {
        crate::error::Error::invalid_argument(format!(
            "{}={v:?}: expected BEGIN-END, two ports from 1 to 65535 with BEGIN <= END (e.g. 50000-50999)",
            TCP_PORT_RANGE.name
        ))
    };
    let (a, b) = v.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok(Some((a, b)))
}

#[cfg(test)]
mod port_range_tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_bad_ones_name_the_setting() {
        assert_eq!(port_range(None).unwrap(), None);
        assert_eq!(port_range(Some("50000-50010".into())).unwrap(), Some((50000, 50010)));
        assert_eq!(port_range(Some(" 7 - 7 ".into())).unwrap(), Some((7, 7)));
        for bad in ["50010-50000", "0-10", "5", "a-b", "1-70000", ""] {
            let e = port_range(Some(bad.into())).unwrap_err().to_string();
            assert!(e.contains("NCCL_TCPXSHIM_TCP_PORT_RANGE"), "{bad}: {e}");
        }
    }
}
