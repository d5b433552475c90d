//! One error type for the whole crate, mapped to `ncclResult_t` in exactly one place.
//!
//! Every error has a [`ErrorKind`] that says what went wrong in terms a retry can use (timeout,
//! connection lost, refused, invalid argument, ...), a message that names the call, the peer and,
//! where one helps, the setting to change, and the operating-system error it came from, if any.

use crate::ffi::{ncclResult_t, NcclResult};
use std::sync::Arc;

/// Result alias used throughout tcpxshim.
pub type Result<T> = std::result::Result<T, Error>;

/// What kind of failure an [`Error`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A NULL pointer, a bad device index, a malformed handle, a stale or foreign object.
    InvalidArgument,
    /// A call that is legal in isolation but not in this state (receive smaller than send, too
    /// many requests).
    InvalidUsage,
    /// Something did not happen within its time limit.
    Timeout,
    /// An established connection broke: reset, end of stream, broken pipe.
    ConnectionLost,
    /// The peer refused a connection (nobody listening, or it said no).
    Refused,
    /// The peer misbehaved: a protocol violation, an unexpected message.
    Remote,
    /// Any other operating-system failure: socket, file, thread, memory.
    System,
    /// A bug or a poisoned object.
    Internal,
    /// The inner plugin returned this `ncclResult_t` (passed on to NCCL unchanged).
    Inner(NcclResult),
}

impl ErrorKind {
    /// The kind an operating-system error belongs to.
    pub fn of_io(e: &std::io::Error) -> ErrorKind {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => ErrorKind::Refused,
            K::TimedOut | K::WouldBlock => ErrorKind::Timeout,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof | K::NotConnected => {
                ErrorKind::ConnectionLost
            }
            K::InvalidInput => ErrorKind::InvalidArgument,
            _ => match e.raw_os_error() {
                Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) | Some(libc::EHOSTDOWN) => ErrorKind::Refused,
                Some(libc::ETIMEDOUT) => ErrorKind::Timeout,
                _ => ErrorKind::System,
            },
        }
    }

    /// The `ncclResult_t` NCCL sees for this kind.
    pub fn code(self) -> NcclResult {
        match self {
            ErrorKind::InvalidArgument => ncclResult_t::ncclInvalidArgument,
            ErrorKind::InvalidUsage => ncclResult_t::ncclInvalidUsage,
            ErrorKind::Timeout | ErrorKind::ConnectionLost | ErrorKind::Remote => ncclResult_t::ncclRemoteError,
            ErrorKind::Refused | ErrorKind::System => ncclResult_t::ncclSystemError,
            ErrorKind::Internal => ncclResult_t::ncclInternalError,
            ErrorKind::Inner(code) => code,
        }
    }
}

/// Every failure tcpxshim reports.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    msg: String,
    source: Option<Arc<std::io::Error>>,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl Error {
    /// An error of `kind` with message `msg`.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Error {
        Error {
            kind,
            msg: msg.into(),
            source: None,
        }
    }
    /// A NULL pointer, a bad index, a malformed or stale object.
    pub fn invalid_argument(msg: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument, msg)
    }
    /// A call not allowed in this state.
    pub fn invalid_usage(msg: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidUsage, msg)
    }
    /// An operating-system failure without an `io::Error` at hand.
    pub fn system(msg: impl Into<String>) -> Error {
        Error::new(ErrorKind::System, msg)
    }
    /// The peer misbehaved.
    pub fn remote(msg: impl Into<String>) -> Error {
        Error::new(ErrorKind::Remote, msg)
    }
    /// A connection that broke.
    pub fn connection_lost(msg: impl Into<String>) -> Error {
        Error::new(ErrorKind::ConnectionLost, msg)
    }
    /// A time limit that passed.
    pub fn timeout(msg: impl Into<String>) -> Error {
        Error::new(ErrorKind::Timeout, msg)
    }
    /// A bug or a poisoned object.
    pub fn internal(msg: impl Into<String>) -> Error {
        Error::new(ErrorKind::Internal, msg)
    }
    /// The inner plugin's function `call` returned `code`.
    pub fn inner(call: &str, code: NcclResult) -> Error {
        Error::new(
            ErrorKind::Inner(code),
            format!("inner plugin {call} returned {code} ({})", result_name(code)),
        )
    }

    /// Wraps an I/O error with the context it happened in; the kind follows from the error.
    pub fn io(context: impl std::fmt::Display, err: std::io::Error) -> Self {
        Error {
            kind: ErrorKind::of_io(&err),
            msg: format!("{context}: {err}"),
            source: Some(Arc::new(err)),
        }
    }

    /// An error whose message already describes `err` (which stays its source).
    pub fn with_io(msg: impl Into<String>, err: std::io::Error) -> Self {
        Error {
            kind: ErrorKind::of_io(&err),
            msg: msg.into(),
            source: Some(Arc::new(err)),
        }
    }

    /// Like [`Error::with_io`], with the kind chosen by the caller.
    pub fn with_io_as(kind: ErrorKind, msg: impl Into<String>, err: std::io::Error) -> Self {
        Error {
            kind,
            ..Error::with_io(msg, err)
        }
    }

    /// Like [`Error::io`], with the kind chosen by the caller (a read that ended early in a
    /// protocol is a connection lost even when the OS calls it something else).
    pub fn io_as(kind: ErrorKind, context: impl std::fmt::Display, err: std::io::Error) -> Self {
        Error {
            kind,
            ..Error::io(context, err)
        }
    }

    /// Keeps kind and message, and records `err` as the operating-system error behind it (an
    /// inner plugin's failed call that left errno set).
    pub fn with_cause(mut self, err: std::io::Error) -> Self {
        self.source = Some(Arc::new(err));
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The operating-system error this came from, if any.
    pub fn io_source(&self) -> Option<&std::io::Error> {
        self.source.as_deref()
    }

    /// Whether trying the same operation again (a new connection, a later attempt) can succeed:
    /// timeouts, lost connections and refused connects are; bad arguments, bugs and the inner
    /// plugin's own errors are not.
    pub fn retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Timeout | ErrorKind::ConnectionLost | ErrorKind::Refused
        )
    }

    /// The `ncclResult_t` NCCL sees for this error.
    pub fn code(&self) -> NcclResult {
        self.kind.code()
    }

    /// Appends `detail` to the message in parentheses, keeping the kind and the source.
    pub fn context_after(mut self, detail: impl std::fmt::Display) -> Self {
        self.msg = format!("{} ({detail})", self.msg);
        self
    }

    /// Prefixes the message with more context, keeping the kind and the source.
    pub fn context(mut self, ctx: impl std::fmt::Display) -> Self {
        self.msg = format!("{ctx}: {}", self.msg);
        self
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
        Err(Error::inner(call, code))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn io_errors_get_a_kind_and_keep_their_source() {
        let cases = [
            (io::ErrorKind::ConnectionRefused, ErrorKind::Refused, true),
            (io::ErrorKind::TimedOut, ErrorKind::Timeout, true),
            (io::ErrorKind::ConnectionReset, ErrorKind::ConnectionLost, true),
            (io::ErrorKind::UnexpectedEof, ErrorKind::ConnectionLost, true),
            (io::ErrorKind::BrokenPipe, ErrorKind::ConnectionLost, true),
            (io::ErrorKind::PermissionDenied, ErrorKind::System, false),
        ];
        for (io_kind, kind, retry) in cases {
            let e = Error::io("connect to 127.0.0.1:1", io::Error::from(io_kind));
            assert_eq!(e.kind(), kind, "{io_kind:?}");
            assert_eq!(e.retryable(), retry, "{io_kind:?}");
            assert_eq!(e.io_source().map(io::Error::kind), Some(io_kind));
            assert!(std::error::Error::source(&e).is_some());
            assert!(e.to_string().starts_with("connect to 127.0.0.1:1: "), "{e}");
        }
        let unreachable = Error::io("connect", io::Error::from_raw_os_error(libc::EHOSTUNREACH));
        assert_eq!(unreachable.kind(), ErrorKind::Refused);
    }

    #[test]
    fn context_keeps_kind_and_source_and_codes_follow_kinds() {
        let e = Error::io("read", io::Error::from(io::ErrorKind::ConnectionReset)).context("irecv on comm #3");
        assert_eq!(e.kind(), ErrorKind::ConnectionLost);
        assert!(e.io_source().is_some());
        assert_eq!(
            e.to_string(),
            format!(
                "irecv on comm #3: read: {}",
                io::Error::from(io::ErrorKind::ConnectionReset)
            )
        );
        assert_eq!(e.code(), ncclResult_t::ncclRemoteError);
        assert_eq!(Error::invalid_argument("x").code(), ncclResult_t::ncclInvalidArgument);
        assert_eq!(Error::invalid_usage("x").code(), ncclResult_t::ncclInvalidUsage);
        assert_eq!(Error::internal("x").code(), ncclResult_t::ncclInternalError);
        assert_eq!(Error::system("x").code(), ncclResult_t::ncclSystemError);
        assert!(!Error::internal("x").retryable() && !Error::invalid_argument("x").retryable());
    }

    #[test]
    fn inner_codes_pass_through_and_are_not_retried() {
        let e = check("isend", ncclResult_t::ncclSystemError).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Inner(ncclResult_t::ncclSystemError));
        assert_eq!(e.code(), ncclResult_t::ncclSystemError);
        assert!(!e.retryable());
        assert!(
            e.to_string()
                .contains("inner plugin isend returned 2 (ncclSystemError)"),
            "{e}"
        );
        assert!(check("test", ncclResult_t::ncclSuccess).is_ok());
    }
}
