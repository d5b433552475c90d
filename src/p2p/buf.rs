//! Registered memory that the API owns: the only kind of buffer a transfer can have in flight.
//!
//! A [`RegBuf`] is host memory registered on one connection. It owns its bytes: a transfer takes
//! the buffer by value and hands it back when it completes or fails. A pending transfer that is
//! dropped closes the connection first (the transport then stops using the buffer), and only then
//! frees the buffer; one that is leaked (`std::mem::forget`) leaks its buffer with it, so memory
//! the transport may still write into is never freed. A registration lives exactly as long as the
//! memory it covers: it is released, and the memory freed, when the last piece of it goes.

use super::conn::Comm;
use crate::error::{Error, Result};
use crate::ffi::NCCL_PTR_HOST;
use crate::transport::Opaque;
use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::rc::Rc;

/// One registration and the allocation it covers. Shared (`Rc`) by the disjoint pieces of it; the
/// last one to go deregisters it and then frees the memory.
struct Region<'c> {
    c: &'c Comm<'c>,
    mr: Opaque,
    /// A `Vec<u8>` taken apart (`ptr`, `len`, `cap`), rebuilt to free it or hand it back.
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

impl Region<'_> {
    /// Releases the registration; true when the memory may then be freed: the transport no
    /// longer knows it. (Called once: by drop, or by `into_vec` on a region it keeps from drop.)
    fn release(&self) -> bool {
        let Some(comm) = self.c.open() else {
            // A comm closed after a failure took its registrations with it, unless closing failed.
            return self.c.released();
        };
        // SAFETY: `mr` was registered on this comm, which is open, and is released once, here.
        // No request uses the memory: every piece of the region is gone (a piece in flight is
        // owned by its pending request, and a leaked one keeps the region alive for good).
        match unsafe { self.c.net.dereg_mr(comm, self.mr) } {
            Ok(()) => true,
            Err(e) => {
                log::warn!(
                    "{}: deregister memory: {e}; its {} B stay allocated",
                    self.c.label,
                    self.len
                );
                false
            }
        }
    }

    /// The memory as the `Vec` it came from.
    ///
    /// # Safety
    /// Only once, after a successful [`Region::release`], with no piece of the region left.
    unsafe fn take_vec(&self) -> Vec<u8> {
        // SAFETY: the parts come from a `Vec<u8>` that nothing else owns (caller's contract).
        unsafe { Vec::from_raw_parts(self.ptr.as_ptr(), self.len, self.cap) }
    }
}

impl Drop for Region<'_> {
    fn drop(&mut self) {
        if self.release() {
            // SAFETY: released just now; the region is being dropped, so no piece of it is left.
            drop(unsafe { self.take_vec() });
        }
    }
}

/// Host memory registered on one connection, owned by this value (or a piece of such memory:
/// see [`RegBuf::split_off`]). It dereferences to its bytes; a transfer takes it by value and
/// hands it back, so nothing can read or write the bytes while the transport does. It cannot
/// outlive its connection. Made by [`Conn::reg`](super::Conn::reg) and
/// [`Conn::alloc`](super::Conn::alloc).
pub struct RegBuf<'c> {
    region: Rc<Region<'c>>,
    // Invariant: the pieces of one region cover disjoint ranges `off..off + len` of it.
    off: usize,
    len: usize,
}

/// Registers `mem` on `c`; the returned buffer owns it.
pub(super) fn reg_on<'c>(c: &'c Comm<'_>, mem: Vec<u8>) -> Result<RegBuf<'c>> {
    let comm = c.get()?;
    let mut mem = ManuallyDrop::new(mem);
    let (len, cap) = (mem.len(), mem.capacity());
    let ptr = NonNull::new(mem.as_mut_ptr()).expect("a Vec's pointer is never null");
    // SAFETY: the comm is open; `ptr` addresses `len` bytes of host memory that the region made
    // below owns from here on and frees only once the registration is released (never, when the
    // transport might still use it).
    let res = unsafe {
        c.net
            .reg_mr(comm, ptr.as_ptr().cast::<c_void>(), len, NCCL_PTR_HOST as i32)
    };
    let mr = match res {
        Ok(mr) => mr,
        Err(e) => {
            // Not registered: the transport holds nothing of it.
            drop(ManuallyDrop::into_inner(mem));
            return Err(e.context(format!("{}: register {len} B of host memory", c.label)));
        }
    };
    // Shorten the transport borrow to 'c ("&'c Comm<'c>") so the buffer has one lifetime.
    let c: &'c Comm<'c> = c;
    let region = Region { c, mr, ptr, len, cap };
    Ok(RegBuf {
        region: Rc::new(region),
        off: 0,
        len,
    })
}

impl<'c> RegBuf<'c> {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Splits it in two at `at`, as `Vec::split_off` does: `self` keeps bytes `..at` and the
    /// returned piece has the rest. Both stay in the same registration, which lives until both
    /// are gone. Panics if `at > len`.
    pub fn split_off(&mut self, at: usize) -> RegBuf<'c> {
        assert!(at <= self.len, "split_off at {at} of a {} B buffer", self.len);
        let rest = RegBuf {
            region: Rc::clone(&self.region),
            off: self.off + at,
            len: self.len - at,
        };
        self.len = at;
        rest
    }

    /// Joins `other` back on, if it is the piece of the same registration just after or just
    /// before this one; otherwise gives it back.
    pub fn unsplit(&mut self, other: RegBuf<'c>) -> std::result::Result<(), RegBuf<'c>> {
        if !Rc::ptr_eq(&self.region, &other.region) {
            return Err(other);
        }
        if self.off + self.len == other.off {
            self.len += other.len;
        } else if other.off + other.len == self.off {
            self.off = other.off;
            self.len += other.len;
        } else {
            return Err(other);
        }
        Ok(())
    }

    /// Deregisters the memory and hands it back, if this is all of it (no other piece exists);
    /// otherwise gives the buffer back. Where the transport cannot release the memory (closing or
    /// deregistering failed), the memory stays allocated for good and a copy comes back.
    pub fn into_vec(self) -> std::result::Result<Vec<u8>, RegBuf<'c>> {
        let RegBuf { region, off, len } = self;
        if off != 0 || len != region.len {
            return Err(RegBuf { region, off, len });
        }
        let region = match Rc::try_unwrap(region) {
            Ok(r) => ManuallyDrop::new(r),
            Err(region) => return Err(RegBuf { region, off, len }),
        };
        if region.release() {
            // SAFETY: released just now; the region was the only owner (try_unwrap) and is kept
            // from its drop, so the memory is handed back once.
            Ok(unsafe { region.take_vec() })
        } else {
            // SAFETY: the region's `len` bytes are initialised and no request uses them (no piece
            // of the region was left to be in flight).
            Ok(unsafe { std::slice::from_raw_parts(region.ptr.as_ptr(), region.len) }.to_vec())
        }
    }

    /// What a transfer of its first `len` bytes on `c` passes to the transport: the open comm,
    /// the registration and the data pointer (no reference to the bytes is made), after checking
    /// that the buffer belongs to `c` and has `len` bytes.
    pub(super) fn post_args(&self, c: &Comm<'_>, len: usize) -> Result<(Opaque, Opaque, *mut c_void, i32)> {
        let mine: *const Comm<'_> = self.region.c;
        if !std::ptr::eq(mine.cast::<u8>(), (c as *const Comm<'_>).cast::<u8>()) {
            return Err(Error::invalid_usage(format!(
                "{}: the buffer is registered on another connection ({})",
                c.label, self.region.c.label
            )));
        }
        if len > self.len {
            return Err(Error::invalid_argument(format!(
                "{}: message of {len} B does not fit the {} B buffer",
                c.label, self.len
            )));
        }
        let size = i32::try_from(len).map_err(|_| {
            Error::invalid_argument(format!(
                "{}: message of {len} B is larger than the v7 limit of 2^31-1 B",
                c.label
            ))
        })?;
        let comm = c.get()?;
        // `off <= region.len`, so this stays inside the allocation (or one past its end).
        let ptr = self.region.ptr.as_ptr().wrapping_add(self.off).cast::<c_void>();
        Ok((comm, self.region.mr, ptr, size))
    }
}

impl Deref for RegBuf<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `off..off + len` lies inside the region's initialised allocation, which lives as
        // long as this piece (it holds the `Rc`); no other piece overlaps it, and while a transfer
        // may use the bytes the piece is owned by that transfer (a receive owns it outright; a
        // send may share it through an `Rc`, but then the transport only reads).
        unsafe { std::slice::from_raw_parts(self.region.ptr.as_ptr().add(self.off), self.len) }
    }
}

impl DerefMut for RegBuf<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` is unique and a piece in flight is not reachable
        // (owned by its transfer, or shared read-only through an `Rc`).
        unsafe { std::slice::from_raw_parts_mut(self.region.ptr.as_ptr().add(self.off), self.len) }
    }
}

impl std::fmt::Debug for RegBuf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RegBuf({} B at offset {} of {} B registered on {})",
            self.len, self.off, self.region.len, self.region.c.label
        )
    }
}

mod sealed {
    /// Implemented by this module's buffer types only.
    pub trait Sealed {
        /// The registered bytes a transfer uses.
        fn piece(&self) -> &super::RegBuf<'_>;
    }
}

/// Buffers a send can have in flight: a [`RegBuf`], or one shared as `Rc<RegBuf>` (the same bytes
/// in several sends at once; the transport only reads them, and nothing can write them until
/// every clone is back). Only owned buffers qualify: a borrowed slice cannot be posted, since
/// leaking the pending send would end the borrow while the transport still reads.
///
/// ```compile_fail,E0277
/// # fn f(send: &tcpxshim::p2p::SendConn<'_>) -> tcpxshim::Result<()> {
/// let data = vec![1u8; 64];
/// let pending = send.isend(&data[..], 64, std::time::Duration::from_secs(1))?;
/// std::mem::forget(pending);
/// drop(data); // would free memory the transport still reads
/// # Ok(()) }
/// ```
pub trait SendBuf: sealed::Sealed {}

/// Buffers a receive can have in flight: a [`RegBuf`] only. A borrowed slice cannot be posted:
/// leaking the pending receive would end the borrow while the transport still writes into it.
///
/// ```compile_fail,E0277
/// # fn f(recv: &tcpxshim::p2p::RecvConn<'_>) -> tcpxshim::Result<()> {
/// let mut b = vec![0u8; 64];
/// let pending = recv.irecv(&mut b[..], 64, std::time::Duration::from_secs(1))?;
/// std::mem::forget(pending);
/// drop(b); // would free memory the transport still writes into
/// # Ok(()) }
/// ```
///
/// The same with a registered buffer compiles, and is sound: the forgotten receive leaks the
/// buffer, which is then never freed.
///
/// ```no_run
/// # fn f(recv: &tcpxshim::p2p::RecvConn<'_>) -> tcpxshim::Result<()> {
/// use tcpxshim::p2p::Conn;
/// let b = recv.alloc(64)?;
/// let pending = recv.irecv(b, 64, std::time::Duration::from_secs(1))?;
/// std::mem::forget(pending);
/// # Ok(()) }
/// ```
pub trait RecvBuf: SendBuf {}

impl sealed::Sealed for RegBuf<'_> {
    fn piece(&self) -> &RegBuf<'_> {
        self
    }
}
impl SendBuf for RegBuf<'_> {}
impl RecvBuf for RegBuf<'_> {}

impl sealed::Sealed for Rc<RegBuf<'_>> {
    fn piece(&self) -> &RegBuf<'_> {
        self
    }
}
impl SendBuf for Rc<RegBuf<'_>> {}

/// The registered bytes behind a buffer (for the transfer code).
pub(super) fn piece<B: SendBuf>(b: &B) -> &RegBuf<'_> {
    b.piece()
}
