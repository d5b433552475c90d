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

/// Most ranges [`send_gather`] passes to one `sendmsg` (well under the kernel's IOV_MAX).
pub const MAX_GATHER: usize = 64;

/// Gathers `(ptr, len)` ranges into one `sendmsg` without raising SIGPIPE; returns the bytes sent
/// (possibly fewer than asked, like any send). Ranges past the first [`MAX_GATHER`] are ignored.
///
/// The ranges stay raw pointers all the way to the kernel (no `IoSlice`, which would need a
/// `&[u8]` over NCCL's buffer).
///
/// # Safety
/// Every range `ptr..ptr+len` in `iov` must be readable for the duration of the call.
pub unsafe fn send_gather(fd: RawFd, iov: &[(*const u8, usize)]) -> io::Result<usize> {
    let mut v = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_GATHER];
    let n = iov.len().min(MAX_GATHER);
    for (dst, &(ptr, len)) in v.iter_mut().zip(&iov[..n]) {
        // sendmsg only reads through iov_base; the cast to *mut is what the C struct wants.
        dst.iov_base = ptr as *mut libc::c_void;
        dst.iov_len = len;
    }
    // SAFETY: an all-zero msghdr is valid (no address, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = v.as_mut_ptr();
    msg.msg_iovlen = n as _;
    // SAFETY: msg points at `n` initialised iovecs that outlive the call; each names a range the
    // caller guarantees readable, and sendmsg only reads them.
    let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
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

/// The CPUs this thread may run on (its affinity mask), in ascending order.
pub fn affinity() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all zeroes is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `set`, which the kernel fills.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&c| {
            // SAFETY: CPU_ISSET reads `set` at an index below CPU_SETSIZE.
            unsafe { libc::CPU_ISSET(c, &set) }
        })
        .collect())
}

/// Pins the calling thread to `cpu`.
pub fn pin_to(cpu: usize) -> io::Result<()> {
    set_affinity(&[cpu])
}

/// Sets the calling thread's affinity mask to `cpus`.
pub fn set_affinity(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all zeroes is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE (checked above); CPU_SET writes inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: the pointer and size describe `set`, which the kernel only reads.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
