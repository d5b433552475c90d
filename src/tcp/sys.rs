//! Thin wrappers over send/recv on raw buffers, so NCCL's memory is never turned into Rust slices
//! (it may be uninitialised from Rust's point of view and is written by the kernel).

use std::io;
use std::os::fd::RawFd;

/// Largest single send/recv; the kernel caps transfers near 2 GiB anyway.
const MAX_IO: usize = 1 << 30;

/// Sends up to `len` bytes from `ptr` without raising SIGPIPE.
///
/// # Safety
/// `ptr..ptr+len` must be readable for the duration of the call.
pub unsafe fn send_raw(fd: RawFd, ptr: *const u8, len: usize) -> io::Result<usize> {
    // SAFETY: the caller guarantees the range is readable; send reads at most `len` bytes.
    let n = unsafe { libc::send(fd, ptr.cast(), len.min(MAX_IO), libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Receives up to `len` bytes into `ptr`; `Ok(0)` means the peer closed.
///
/// # Safety
/// `ptr..ptr+len` must be writable and not accessed by anyone else during the call.
pub unsafe fn recv_raw(fd: RawFd, ptr: *mut u8, len: usize) -> io::Result<usize> {
    // SAFETY: the caller guarantees the range is writable and exclusively ours; recv writes at most `len` bytes.
    let n = unsafe { libc::recv(fd, ptr.cast(), len.min(MAX_IO), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Whether an error means "try again later" rather than a failure.
pub fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Whether an error is the peer going away (reported as a remote error, not a local one).
pub fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
    )
}
