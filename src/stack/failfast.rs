//! Fail fast over UNPACK-type inner plugins (TCPX).
//!
//! TCPX's receive side hands NCCL a device handle at accept, which NCCL copies into GPU state
//! once; its unpack kernel then reads TCPX's device queue. A broken TCPX connection can therefore
//! not be replaced or its messages replayed under NCCL. What the shim can do is make the failure
//! clear and final: the first error of a comm's data path (isend, irecv, iflush, test) marks the
//! comm failed and becomes `ncclRemoteError` with the diagnosis below; every later call on that
//! comm (but deregMr and close) fails at once the same way, so NCCL reports the error instead of
//! a proxy thread polling a dead connection. Connect retry and the other layers still apply.

use crate::error::Error;

/// What the error says after the cause.
pub const DIAGNOSIS: &str =
    "TCPX connections cannot be recovered by the shim (NCCL holds TCPX's device queue); the job must restart";

/// The error for the first data-path failure `e` (its message already names the call and the
/// comm) of a comm over an UNPACK-type inner plugin, and the reason its later calls repeat.
pub fn unrecoverable(e: &Error) -> (Error, String) {
    let why = format!("{e}; {DIAGNOSIS}");
    (Error::remote(why.clone()), why)
}
