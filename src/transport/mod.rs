//! The Transport trait: what every layer of the shim and every inner transport implements.
//!
//! It mirrors the v7 net ABI with Rust types. Comms, memory registrations and requests are
//! [`Opaque`] pointers owned by the transport that made them: a loaded plugin passes its own
//! pointers through untouched, the built-in TCP transport hands out pointers to its own objects.
//! Data pointers stay raw (`*mut c_void`): they may point at GPU memory.

use crate::error::Result;
use crate::ffi::{DevHandle, HANDLE_SIZE};
use std::ffi::c_void;
use std::ptr::NonNull;

/// An object owned by a transport (comm, memory handle, request), opaque to everyone else.
/// `Option<Opaque>` has the layout of a C pointer, with `None` as NULL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Opaque(NonNull<c_void>);

// SAFETY: an Opaque is only an address; the transport that created it is responsible for
// synchronising access to what it points at (NCCL drives each comm from one thread at a time).
unsafe impl Send for Opaque {}
// SAFETY: as above, sharing the address itself is harmless.
unsafe impl Sync for Opaque {}

impl Opaque {
    /// Wraps a non-NULL pointer; NULL gives `None`.
    pub fn from_ptr(p: *mut c_void) -> Option<Opaque> {
        NonNull::new(p).map(Opaque)
    }
    /// An address-sized value that is never dereferenced (a table key); 0 gives `None`.
    pub fn from_addr(a: usize) -> Option<Opaque> {
        NonNull::new(a as *mut c_void).map(Opaque)
    }
    /// Wraps a pointer to a transport's own object.
    pub fn from_box<T>(b: Box<T>) -> Opaque {
        Opaque(NonNull::from(Box::leak(b)).cast())
    }
    /// Wraps a pointer to a transport's own object (which it keeps alive itself).
    pub fn from_nonnull<T>(p: NonNull<T>) -> Opaque {
        Opaque(p.cast())
    }
    /// The raw address.
    pub fn as_ptr(self) -> *mut c_void {
        self.0.as_ptr()
    }
    /// A `Option<Opaque>` as the C pointer it stands for.
    pub fn opt_ptr(o: Option<Opaque>) -> *mut c_void {
        o.map_or(std::ptr::null_mut(), Opaque::as_ptr)
    }
}

/// What NCCL's device-side code needs to know about received data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceType {
    /// Data lands in the destination buffer (kernel sockets, RDMA).
    Host,
    /// Data lands in bounce buffers that NCCL's unpack kernel copies out (TCPX).
    Unpack,
    /// A value this build does not know; passed through unchanged.
    Other(u32),
}

impl DeviceType {
    /// The ABI value.
    pub fn raw(self) -> u32 {
        match self {
            DeviceType::Host => crate::ffi::ncclNetDeviceType::NCCL_NET_DEVICE_HOST,
            DeviceType::Unpack => crate::ffi::ncclNetDeviceType::NCCL_NET_DEVICE_UNPACK,
            DeviceType::Other(v) => v,
        }
    }
    /// From the ABI value.
    pub fn from_raw(v: u32) -> DeviceType {
        match v {
            crate::ffi::ncclNetDeviceType::NCCL_NET_DEVICE_HOST => DeviceType::Host,
            crate::ffi::ncclNetDeviceType::NCCL_NET_DEVICE_UNPACK => DeviceType::Unpack,
            v => DeviceType::Other(v),
        }
    }
}

/// A device's properties (v7 fields) in Rust form.
#[derive(Clone, Debug, PartialEq)]
pub struct Properties {
    /// Device name, e.g. the interface name.
    pub name: String,
    /// Path of the NIC's PCI device in /sys, if it has one.
    pub pci_path: Option<String>,
    /// Identifier of the NIC chip; devices with equal guid and port share bandwidth.
    pub guid: u64,
    /// NCCL_PTR_HOST | NCCL_PTR_CUDA | NCCL_PTR_DMABUF.
    pub ptr_support: i32,
    /// Port speed in Mbps.
    pub speed_mbps: i32,
    /// Port number.
    pub port: i32,
    /// Latency in microseconds.
    pub latency_us: f32,
    /// Maximum number of comms.
    pub max_comms: i32,
    /// Maximum number of grouped receives.
    pub max_recvs: i32,
    /// Device-side data path.
    pub device_type: DeviceType,
    /// Device-side data path version.
    pub device_version: i32,
}

/// The operations of an NCCL network transport, v7 semantics.
///
/// Calls on one comm come from one thread at a time (NCCL's proxy thread); different comms may
/// be driven from different threads concurrently.
///
/// # Safety
///
/// Every `unsafe fn` here may dereference what it is given, so its caller promises:
/// - each `Opaque` comm, registration or request was returned by this same transport (a comm by
///   `listen`, `connect` or `accept`; a registration by `reg_mr` on that comm; a request by
///   `isend`, `irecv` or `iflush` on that comm) and has not been closed, deregistered or
///   completed since;
/// - each data pointer addresses memory of the given size and of the registered type that stays
///   valid until the request completes or its comm is closed, and a receive buffer is not read or
///   written by anyone else meanwhile;
/// - repeated `connect` calls for one connection pass the same handle buffer, unchanged since
///   the previous call (an inner plugin may keep a pointer in it), and a handle is never used for
///   a second connection;
/// - `dev_handle` is NULL or valid for reading and writing one `*mut DevHandle`;
/// - calls on one comm, its registrations and its requests do not run on two threads at once,
///   and a comm is not closed while another call on it runs (NCCL drives each comm from one
///   thread at a time). Layers beneath the shim's own may rely on this; the shim's own layer
///   stays sound without it.
///
/// A transport that validates its objects (the shim's own layer does, through its object table)
/// still keeps these signatures: the data pointers cannot be checked.
pub trait Transport: Send + Sync {
    /// The transport's name as NCCL's `NCCL_NET` matches it.
    fn name(&self) -> &str;
    /// Number of devices.
    fn devices(&self) -> Result<i32>;
    /// Properties of device `dev`.
    fn properties(&self, dev: i32) -> Result<Properties>;
    /// Starts listening on `dev`, writing the connection handle into `handle`.
    fn listen(&self, dev: i32, handle: &mut [u8; HANDLE_SIZE]) -> Result<Opaque>;
    /// Connects to the peer described by `handle`. Never blocks: `Ok(None)` means "call again
    /// with the same, unchanged handle buffer".
    ///
    /// # Safety
    /// See the trait's safety section.
    unsafe fn connect(
        &self,
        dev: i32,
        handle: &mut [u8; HANDLE_SIZE],
        dev_handle: *mut *mut DevHandle,
    ) -> Result<Option<Opaque>>;
    /// Accepts one connection on `listen`. Never blocks: `Ok(None)` means "call again".
    ///
    /// # Safety
    /// See the trait's safety section.
    unsafe fn accept(&self, listen: Opaque, dev_handle: *mut *mut DevHandle) -> Result<Option<Opaque>>;
    /// Registers `size` bytes at `data` (NCCL_PTR_HOST or NCCL_PTR_CUDA) for use on `comm`.
    ///
    /// # Safety
    /// See the trait's safety section.
    unsafe fn reg_mr(&self, comm: Opaque, data: *mut c_void, size: usize, ptr_type: i32) -> Result<Opaque>;
    /// Registers a DMA-BUF region; transports without DMA-BUF support return an error.
    ///
    /// # Safety
    /// See the trait's safety section; `fd` is a DMA-BUF file descriptor for the region.
    unsafe fn reg_mr_dmabuf(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: usize,
        ptr_type: i32,
        offset: u64,
        fd: i32,
    ) -> Result<Opaque> {
        let _ = (comm, data, size, ptr_type, offset, fd);
        Err(crate::error::Error::invalid_usage(format!(
            "regMrDmaBuf: transport {} does not support DMA-BUF",
            self.name()
        )))
    }
    /// Whether `reg_mr_dmabuf` is implemented.
    fn has_dmabuf(&self) -> bool {
        false
    }
    /// Releases a registration.
    ///
    /// # Safety
    /// See the trait's safety section.
    unsafe fn dereg_mr(&self, comm: Opaque, mr: Opaque) -> Result<()>;
    /// Posts a send. `Ok(None)`: not possible now, try again.
    ///
    /// # Safety
    /// See the trait's safety section.
    unsafe fn isend(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: i32,
        tag: i32,
        mr: Option<Opaque>,
    ) -> Result<Option<Opaque>>;
    /// Posts `data.len()` grouped receives. `Ok(None)`: not possible now, try again.
    ///
    /// # Safety
    /// See the trait's safety section.
    unsafe fn irecv(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        tags: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>>;
    /// Makes received GPU data visible; `Ok(None)` when there is nothing to flush.
    ///
    /// # Safety
    /// See the trait's safety section.
    unsafe fn iflush(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>>;
    /// Tests a request. On completion returns true, fills `sizes` (one per grouped receive, or the
    /// sent size) when given, and the request is gone.
    ///
    /// # Safety
    /// See the trait's safety section.
    unsafe fn test(&self, req: Opaque, sizes: Option<&mut [i32]>) -> Result<bool>;
    /// Closes a send comm; outstanding requests are abandoned.
    ///
    /// # Safety
    /// See the trait's safety section.
    unsafe fn close_send(&self, comm: Opaque) -> Result<()>;
    /// Closes a receive comm; outstanding requests are abandoned.
    ///
    /// # Safety
    /// See the trait's safety section.
    unsafe fn close_recv(&self, comm: Opaque) -> Result<()>;
    /// Closes a listen comm.
    ///
    /// # Safety
    /// See the trait's safety section.
    unsafe fn close_listen(&self, comm: Opaque) -> Result<()>;
    /// The device-side handle of a registration (UNPACK transports); `None` for host transports.
    ///
    /// # Safety
    /// See the trait's safety section.
    unsafe fn get_device_mr(&self, comm: Opaque, mr: Opaque) -> Result<Option<Opaque>> {
        let _ = (comm, mr);
        Ok(None)
    }
    /// Tells the transport that the GPU consumed a completed receive (UNPACK transports).
    ///
    /// # Safety
    /// See the trait's safety section; `req`, when given, is a completed receive of `comm`.
    unsafe fn irecv_consumed(&self, comm: Opaque, n: i32, req: Option<Opaque>) -> Result<()> {
        let _ = (comm, n, req);
        Ok(())
    }
    /// A short description of a comm's peer for log lines ("peer 10.0.0.2:41234, 4 streams").
    ///
    /// # Safety
    /// See the trait's safety section.
    unsafe fn describe_comm(&self, comm: Opaque) -> Option<String> {
        let _ = comm;
        None
    }
    /// What an outstanding request still waits for, in the transport's own terms ("no header
    /// yet", "3 of 4 chunks missing"), for the stall warning; `None` when it has nothing to add.
    ///
    /// # Safety
    /// See the trait's safety section; `req` is an outstanding request of `comm`.
    unsafe fn stall_detail(&self, comm: Opaque, req: Opaque) -> Option<String> {
        let _ = (comm, req);
        None
    }
    /// Cuts the connection of `comm` as a network failure would: later calls on it fail with a
    /// connection-lost error, and the peer sees the connection end (EOF or reset). Returns whether
    /// this transport could; the default cannot. The comm stays open and must still be closed.
    /// Used by fault injection (`NCCL_TCPXSHIM_FAULTS`).
    ///
    /// # Safety
    /// See the trait's safety section; `comm` is an open send or receive comm. It may be called
    /// while another thread drives the comm.
    unsafe fn break_comm(&self, comm: Opaque) -> bool {
        let _ = comm;
        false
    }
}
