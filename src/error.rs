//! One error type for the whole crate, mapped to `ncclResult_t` in exactly one place.

use crate::ffi::{ncclResult_t, NcclResult};

/// Result alias used throughout tcpxshim.
pub type Result<T> = std::result::Result<T, Error>;

/// Every failure tcpxshim reports. The message names the call, the peer and, where one
/// helps, the setting to change.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A NULL pointer, a bad device index, a malformed handle.
    #[error("{0}")]
    InvalidArgument(String),
    /// A call that is legal in isolation but not in this state (receive smaller than send, too many requests).
    #[error("{0}")]
    InvalidUsage(String),
    /// An operating-system failure: socket, file, thread.
    #[error("{0}")]
    System(String),
    /// The remote side closed or misbehaved.
    #[error("{0}")]
    Remote(String),
    /// A bug or a poisoned object.
    #[error("{0}")]
    Internal(String),
    /// The inner plugin returned an error code (passed on to NCCL unchanged).
    #[error("{context}inner plugin {call} returned {code} ({})", result_name(*.code))]
    Inner {
        /// What the shim was doing, ending in ": " (or empty).
        context: String,
        /// Which plugin function failed.
        call: &'static str,
        /// The ncclResult_t it returned.
        code: NcclResult,
    },
}

impl Error {
    /// The `ncclResult_t` NCCL sees for this error.
    pub fn code(&self) -> NcclResult {
        match self {
            Error::InvalidArgument(_) => ncclResult_t::ncclInvalidArgument,
            Error::InvalidUsage(_) => ncclResult_t::ncclInvalidUsage,
            Error::System(_) => ncclResult_t::ncclSystemError,
            Error::Remote(_) => ncclResult_t::ncclRemoteError,
            Error::Internal(_) => ncclResult_t::ncclInternalError,
            Error::Inner { code, .. } => *code,
        }
    }

    /// Wraps an I/O error with the context it happened in.
    pub fn io(context: impl std::fmt::Display, err: std::io::Error) -> Self {
        Error::System(format!("{context}: {err}"))
    }

    /// Prefixes the message with more context, keeping the kind.
    pub fn context(self, ctx: impl std::fmt::Display) -> Self {
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{ctx}: {m}")),
            Error::InvalidUsage(m) => Error::InvalidUsage(format!("{ctx}: {m}")),
            Error::System(m) => Error::System(format!("{ctx}: {m}")),
            Error::Remote(m) => Error::Remote(format!("{ctx}: {m}")),
            Error::Internal(m) => Error::Internal(format!("{ctx}: {m}")),
            Error::Inner { context, call, code } => Error::Inner {
                context: format!("{ctx}: {context}"),
                call,
                code,
            },
        }
    }
}

/// The symbolic name of an `ncclResult_t` value.
pub fn result_name(code: NcclResult) -> &'static str {
    match code {
        ncclResult_t::ncclSuccess => "ncclSuccess",
        ncclResult_t::ncclUnhandledCudaError => "ncclUnhandledCudaError",
        ncclResult_t::ncclSystemError => "ncclSystemError",
        ncclResult_t::ncclInternalError => "ncclInternalError",
        ncclResult_t::ncclInvalidArgument => "ncclInvalidArgument",
        ncclResult_t::ncclInvalidUsage => "ncclInvalidUsage",
        ncclResult_t::ncclRemoteError => "ncclRemoteError",
        ncclResult_t::ncclInProgress => "ncclInProgress",
        _ => "unknown ncclResult_t",
    }
}

/// Turns an inner plugin's return code into a Result.
pub fn check(call: &'static str, code: NcclResult) -> Result<()> {
    if code == ncclResult_t::ncclSuccess {
        Ok(())
    } else {
        Err(Error::Inner {
            context: String::new(),
            call,
            code,
        })
    }
}

/// The message a panic carried (the text of `panic!`), for log lines.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
