//! The shim's 128-byte handle: the inner transport's handle first, then a trailer.
//!
//! ```text
//! 0                                   88                                   128
//! | inner transport's handle (88 B)    | magic | ver | flags | ctrl addr | port | family | conn id | secret |
//! ```
//! TCPX writes 88 bytes (including a process-local pointer at offset 80 on connect), so the inner
//! share is exactly that. The control address, connection id and secret are for recovery and
//! pooling; they are zero until those features fill them.

use crate::error::{Error, Result};
use crate::ffi::HANDLE_SIZE;

/// Bytes of the handle that belong to the inner transport.
pub const INNER_HANDLE_SIZE: usize = 88;
/// Bytes of the trailer.
pub const TRAILER_SIZE: usize = HANDLE_SIZE - INNER_HANDLE_SIZE;
/// Identifies a tcpxshim handle ("TXSH" little-endian).
pub const MAGIC: u32 = u32::from_le_bytes(*b"TXSH");
/// Trailer layout version.
pub const VERSION: u16 = 1;
/// Byte written into the trailer before the inner listen, to detect an inner handle that overflows its share.
pub const CANARY: u8 = 0xA5;

/// The decoded trailer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Trailer {
    /// Feature flags (none defined yet).
    pub flags: u16,
    /// Control-service address (IPv4-mapped or IPv6), zero when absent.
    pub ctrl_addr: [u8; 16],
    /// Control-service port, zero when absent.
    pub ctrl_port: u16,
    /// Address family of `ctrl_addr` (libc::AF_INET or AF_INET6), zero when absent.
    pub ctrl_family: u16,
    /// Connection id within the listening process.
    pub conn_id: u32,
    /// Per-connection secret.
    pub secret: u64,
}

impl Trailer {
    /// Writes the trailer into `handle[INNER_HANDLE_SIZE..]`.
    pub fn write(&self, handle: &mut [u8; HANDLE_SIZE]) {
        let t = &mut handle[INNER_HANDLE_SIZE..];
        t[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        t[4..6].copy_from_slice(&VERSION.to_le_bytes());
        t[6..8].copy_from_slice(&self.flags.to_le_bytes());
        t[8..24].copy_from_slice(&self.ctrl_addr);
        t[24..26].copy_from_slice(&self.ctrl_port.to_le_bytes());
        t[26..28].copy_from_slice(&self.ctrl_family.to_le_bytes());
        t[28..32].copy_from_slice(&self.conn_id.to_le_bytes());
        t[32..40].copy_from_slice(&self.secret.to_le_bytes());
    }

    /// Reads and validates the trailer of a handle received from a peer.
    pub fn read(handle: &[u8; HANDLE_SIZE]) -> Result<Trailer> {
        let t = &handle[INNER_HANDLE_SIZE..];
        let u16_at = |i: usize| u16::from_le_bytes([t[i], t[i + 1]]);
        let magic = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        if magic != MAGIC {
            return Err(Error::InvalidArgument(format!(
                "handle was not made by tcpxshim (trailer magic {magic:#010x}, expected {MAGIC:#010x}): \
                 every rank must load the same plugin (NCCL_NET_PLUGIN) with the same NCCL_TCPXSHIM_PLUGIN"
            )));
        }
        let version = u16_at(4);
        if version != VERSION {
            return Err(Error::InvalidArgument(format!(
                "handle trailer version {version} is not supported (this build speaks {VERSION}): \
                 run the same tcpxshim version on every rank"
            )));
        }
        let mut ctrl_addr = [0u8; 16];
        ctrl_addr.copy_from_slice(&t[8..24]);
        Ok(Trailer {
            flags: u16_at(6),
            ctrl_addr,
            ctrl_port: u16_at(24),
            ctrl_family: u16_at(26),
            conn_id: u32::from_le_bytes([t[28], t[29], t[30], t[31]]),
            secret: u64::from_le_bytes([t[32], t[33], t[34], t[35], t[36], t[37], t[38], t[39]]),
        })
    }
}

/// Fills the trailer area with [`CANARY`] before the inner transport writes its handle.
pub fn arm_canary(handle: &mut [u8; HANDLE_SIZE]) {
    handle[INNER_HANDLE_SIZE..].fill(CANARY);
}

/// Checks that the inner transport wrote nothing past its share.
pub fn check_canary(handle: &[u8; HANDLE_SIZE], transport: &str) -> Result<()> {
    if let Some(pos) = handle[INNER_HANDLE_SIZE..].iter().position(|&b| b != CANARY) {
        return Err(Error::Internal(format!(
            "listen: inner transport {transport} wrote its handle past byte {INNER_HANDLE_SIZE} (byte {} changed); \
             tcpxshim needs the last {TRAILER_SIZE} of the {HANDLE_SIZE} bytes for its trailer",
            INNER_HANDLE_SIZE + pos
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailer_round_trips() {
        let mut h = [7u8; HANDLE_SIZE];
        let t = Trailer {
            flags: 3,
            ctrl_addr: [9; 16],
            ctrl_port: 4242,
            ctrl_family: 10,
            conn_id: 77,
            secret: 0xdead_beef,
        };
        t.write(&mut h);
        assert_eq!(Trailer::read(&h).unwrap(), t);
        assert_eq!(
            &h[..INNER_HANDLE_SIZE],
            &[7u8; INNER_HANDLE_SIZE][..],
            "inner share untouched"
        );
    }

    #[test]
    fn garbage_handle_is_rejected_with_the_setting_to_check() {
        let h = [0x55u8; HANDLE_SIZE];
        let err = Trailer::read(&h).unwrap_err().to_string();
        assert!(
            err.contains("not made by tcpxshim") && err.contains("NCCL_TCPXSHIM_PLUGIN"),
            "{err}"
        );
    }

    #[test]
    fn canary_detects_an_overflowing_inner_handle() {
        let mut h = [0u8; HANDLE_SIZE];
        arm_canary(&mut h);
        assert!(check_canary(&h, "x").is_ok());
        h[INNER_HANDLE_SIZE + 2] = 0;
        let err = check_canary(&h, "x").unwrap_err().to_string();
        assert!(err.contains("byte 90"), "{err}");
    }
}
