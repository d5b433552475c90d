//! Settings of connection recovery: declared here, beside the protocol that reads them, and
//! listed with every other setting in `crate::config::SETTINGS`.

use crate::config::{int, Setting, Vars};
use crate::error::Result;
use std::time::Duration;

/// How long one recovery may take.
pub const RECOVERY_TIMEOUT: Setting = Setting {
    name: "NCCL_TCPXSHIM_RECOVERY_TIMEOUT",
    default: "30",
    doc: "Seconds a broken inner connection may take to be re-established (every attempt included) before its \
          requests fail with ncclRemoteError and a WARN naming the peer, the cause and the attempts made; 0 turns \
          recovery off, so a failure is reported at once (0 to 86400). Applies to inner transports with host-type \
          receives (the built-in transport, plugins reporting NCCL_NET_DEVICE_HOST).",
};

/// Whether the recovery engine runs.
pub const RECOVERY: Setting = Setting {
    name: "NCCL_TCPXSHIM_RECOVERY",
    default: "1",
    doc: "1: run the recovery engine on connections over inner transports with host-type receives, so a broken \
          inner connection is re-established and its messages replayed (within NCCL_TCPXSHIM_RECOVERY_TIMEOUT); \
          0: a broken inner connection fails its requests at once, and the data path is the inner transport's \
          alone (the engine costs about half a microsecond per small message; see the README's Resilience).",
};

/// How many inner connections one recovery may try.
pub const RECOVERY_ATTEMPTS: Setting = Setting {
    name: "NCCL_TCPXSHIM_RECOVERY_ATTEMPTS",
    default: "10",
    doc: "New inner connections one recovery may try (listens on the receiving side, connects on the sending side) \
          before it gives up, within NCCL_TCPXSHIM_RECOVERY_TIMEOUT (1 to 1000).",
};

/// Largest send copied for replay.
pub const RECOVERY_COPY_MAX: Setting = Setting {
    name: "NCCL_TCPXSHIM_RECOVERY_COPY_MAX",
    default: "65536",
    doc: "Sends up to this many bytes are copied into a replay buffer when the inner transport finishes them, so \
          NCCL gets their completion without waiting for the receiver's acknowledgement; larger sends complete once \
          the receiver acknowledges them (one control-channel message later). 0: never copy (0 to 16777216). Must \
          match on every rank (the receiver acknowledges larger ones at once).",
};

/// Replay memory per send connection.
pub const RECOVERY_COPY_RING: Setting = Setting {
    name: "NCCL_TCPXSHIM_RECOVERY_COPY_RING",
    default: "2097152",
    doc: "Bytes of replay copies one send connection may hold (0 to 1073741824); a small send that finds it full \
          completes on the receiver's acknowledgement instead. Must match on every rank.",
};

/// Acknowledgement batching.
pub const RECOVERY_ACK_EVERY: Setting = Setting {
    name: "NCCL_TCPXSHIM_RECOVERY_ACK_EVERY",
    default: "256",
    doc: "The receiving side acknowledges completed receives after this many (1 to 1024), at once after one larger \
          than NCCL_TCPXSHIM_RECOVERY_COPY_MAX or once half of NCCL_TCPXSHIM_RECOVERY_COPY_RING is unacknowledged, \
          and on its next timer tick (every 10 ms while NCCL tests requests) otherwise.",
};

/// The recovery protocol's settings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RecoveryConfig {
    /// NCCL_TCPXSHIM_RECOVERY_TIMEOUT; zero: recovery off.
    pub timeout: Duration,
    /// NCCL_TCPXSHIM_RECOVERY_ATTEMPTS.
    pub attempts: u32,
    /// NCCL_TCPXSHIM_RECOVERY_COPY_MAX, bytes.
    pub copy_max: u64,
    /// NCCL_TCPXSHIM_RECOVERY_COPY_RING, bytes.
    pub copy_ring: u64,
    /// NCCL_TCPXSHIM_RECOVERY_ACK_EVERY.
    pub ack_every: u32,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig::from_vars(&|_| None).unwrap_or_else(|e| unreachable!("the built-in defaults parse: {e}"))
    }
}

impl RecoveryConfig {
    /// Reads the settings from `vars` (unset names give the defaults).
    pub fn from_vars(vars: Vars<'_>) -> Result<RecoveryConfig> {
        Ok(RecoveryConfig {
            timeout: Duration::from_secs(int(vars, &RECOVERY_TIMEOUT, 0, 86400)?),
            attempts: int(vars, &RECOVERY_ATTEMPTS, 1, 1000)? as u32,
            copy_max: int(vars, &RECOVERY_COPY_MAX, 0, 16 << 20)?,
            copy_ring: int(vars, &RECOVERY_COPY_RING, 0, 1 << 30)?,
            ack_every: int(vars, &RECOVERY_ACK_EVERY, 1, 1024)? as u32,
        })
    }

    /// Whether recovery is on (a non-zero timeout).
    pub fn enabled(&self) -> bool {
        !self.timeout.is_zero()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<RecoveryConfig> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        RecoveryConfig::from_vars(&|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_come_from_the_settings_and_values_are_checked() {
        let c = RecoveryConfig::default();
        assert_eq!(c.timeout.as_secs().to_string(), RECOVERY_TIMEOUT.default);
        assert_eq!(c.attempts.to_string(), RECOVERY_ATTEMPTS.default);
        assert_eq!(c.copy_max.to_string(), RECOVERY_COPY_MAX.default);
        assert_eq!(c.copy_ring.to_string(), RECOVERY_COPY_RING.default);
        assert_eq!(c.ack_every.to_string(), RECOVERY_ACK_EVERY.default);
        assert!(c.enabled());
        let c = from(&[
            ("NCCL_TCPXSHIM_RECOVERY_TIMEOUT", "0"),
            ("NCCL_TCPXSHIM_RECOVERY_COPY_MAX", "0"),
        ])
        .unwrap();
        assert!(!c.enabled());
        assert_eq!(c.copy_max, 0);
        let bad = from(&[("NCCL_TCPXSHIM_RECOVERY_ACK_EVERY", "0")])
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("NCCL_TCPXSHIM_RECOVERY_ACK_EVERY=0 is out of range"),
            "{bad}"
        );
        let bad = from(&[("NCCL_TCPXSHIM_RECOVERY_TIMEOUT", "soon")])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("NCCL_TCPXSHIM_RECOVERY_TIMEOUT"), "{bad}");
    }
}
