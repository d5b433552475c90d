//! Layers: features stacked over the [`Transport`] trait, each forwarding what it does not change.
//!
//! This is tower's `Layer` idea for the ncclNet ABI: a layer owns the transport beneath it,
//! returns it from [`Layer::inner`], and overrides only the calls it changes; every other call
//! goes straight down (the defaults below). Every `Layer` is a `Transport` through the blanket
//! impl at the end, so layers stack in any order and the stack builder (`stack::build`) is the
//! only place that knows which ones there are.

use crate::error::Result;
use crate::ffi::{DevHandle, HANDLE_SIZE};
use crate::transport::{Opaque, Properties, Transport};
use std::ffi::c_void;

/// A feature over an inner transport. The safety contract of every `unsafe fn` is
/// [`Transport`]'s, and a layer that forwards a call passes its caller's promises on unchanged.
#[allow(clippy::missing_safety_doc)]
pub trait Layer: Send + Sync {
    /// The transport beneath this layer.
    fn inner(&self) -> &dyn Transport;

    /// See [`Transport::name`].
    fn name(&self) -> &str {
        self.inner().name()
    }
    /// See [`Transport::devices`].
    fn devices(&self) -> Result<i32> {
        self.inner().devices()
    }
    /// See [`Transport::properties`].
    fn properties(&self, dev: i32) -> Result<Properties> {
        self.inner().properties(dev)
    }
    /// See [`Transport::listen`].
    fn listen(&self, dev: i32, handle: &mut [u8; HANDLE_SIZE]) -> Result<Opaque> {
        self.inner().listen(dev, handle)
    }
    /// See [`Transport::connect`].
    unsafe fn connect(
        &self,
        dev: i32,
        handle: &mut [u8; HANDLE_SIZE],
        dev_handle: *mut *mut DevHandle,
    ) -> Result<Option<Opaque>> {
        // SAFETY: the caller keeps Transport::connect's contract, which this forwards unchanged.
        unsafe { self.inner().connect(dev, handle, dev_handle) }
    }
    /// See [`Transport::accept`].
    unsafe fn accept(&self, listen: Opaque, dev_handle: *mut *mut DevHandle) -> Result<Option<Opaque>> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().accept(listen, dev_handle) }
    }
    /// See [`Transport::reg_mr`].
    unsafe fn reg_mr(&self, comm: Opaque, data: *mut c_void, size: usize, ptr_type: i32) -> Result<Opaque> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().reg_mr(comm, data, size, ptr_type) }
    }
    /// See [`Transport::reg_mr_dmabuf`].
    unsafe fn reg_mr_dmabuf(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: usize,
        ptr_type: i32,
        offset: u64,
        fd: i32,
    ) -> Result<Opaque> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().reg_mr_dmabuf(comm, data, size, ptr_type, offset, fd) }
    }
    /// See [`Transport::has_dmabuf`].
    fn has_dmabuf(&self) -> bool {
        self.inner().has_dmabuf()
    }
    /// See [`Transport::dereg_mr`].
    unsafe fn dereg_mr(&self, comm: Opaque, mr: Opaque) -> Result<()> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().dereg_mr(comm, mr) }
    }
    /// See [`Transport::isend`].
    unsafe fn isend(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: i32,
        tag: i32,
        mr: Option<Opaque>,
    ) -> Result<Option<Opaque>> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().isend(comm, data, size, tag, mr) }
    }
    /// See [`Transport::irecv`].
    unsafe fn irecv(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        tags: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().irecv(comm, data, sizes, tags, mrs) }
    }
    /// See [`Transport::iflush`].
    unsafe fn iflush(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().iflush(comm, data, sizes, mrs) }
    }
    /// See [`Transport::test`].
    unsafe fn test(&self, req: Opaque, sizes: Option<&mut [i32]>) -> Result<bool> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().test(req, sizes) }
    }
    /// See [`Transport::close_send`].
    unsafe fn close_send(&self, comm: Opaque) -> Result<()> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().close_send(comm) }
    }
    /// See [`Transport::close_recv`].
    unsafe fn close_recv(&self, comm: Opaque) -> Result<()> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().close_recv(comm) }
    }
    /// See [`Transport::close_listen`].
    unsafe fn close_listen(&self, comm: Opaque) -> Result<()> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().close_listen(comm) }
    }
    /// See [`Transport::get_device_mr`].
    unsafe fn get_device_mr(&self, comm: Opaque, mr: Opaque) -> Result<Option<Opaque>> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().get_device_mr(comm, mr) }
    }
    /// See [`Transport::irecv_consumed`].
    unsafe fn irecv_consumed(&self, comm: Opaque, n: i32, req: Option<Opaque>) -> Result<()> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().irecv_consumed(comm, n, req) }
    }
    /// See [`Transport::describe_comm`].
    unsafe fn describe_comm(&self, comm: Opaque) -> Option<String> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().describe_comm(comm) }
    }
    /// See [`Transport::stall_detail`].
    unsafe fn stall_detail(&self, comm: Opaque, req: Opaque) -> Option<String> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().stall_detail(comm, req) }
    }
    /// See [`Transport::break_comm`].
    unsafe fn break_comm(&self, comm: Opaque) -> bool {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner().break_comm(comm) }
    }
}

// SAFETY (for every call below): each method keeps Transport's contract by handing its caller's
// arguments, under the same promises, to the Layer method of the same name.
impl<L: Layer> Transport for L {
    fn name(&self) -> &str {
        Layer::name(self)
    }
    fn devices(&self) -> Result<i32> {
        Layer::devices(self)
    }
    fn properties(&self, dev: i32) -> Result<Properties> {
        Layer::properties(self, dev)
    }
    fn listen(&self, dev: i32, handle: &mut [u8; HANDLE_SIZE]) -> Result<Opaque> {
        Layer::listen(self, dev, handle)
    }
    unsafe fn connect(
        &self,
        dev: i32,
        handle: &mut [u8; HANDLE_SIZE],
        dev_handle: *mut *mut DevHandle,
    ) -> Result<Option<Opaque>> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::connect(self, dev, handle, dev_handle) }
    }
    unsafe fn accept(&self, listen: Opaque, dev_handle: *mut *mut DevHandle) -> Result<Option<Opaque>> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::accept(self, listen, dev_handle) }
    }
    unsafe fn reg_mr(&self, comm: Opaque, data: *mut c_void, size: usize, ptr_type: i32) -> Result<Opaque> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::reg_mr(self, comm, data, size, ptr_type) }
    }
    unsafe fn reg_mr_dmabuf(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: usize,
        ptr_type: i32,
        offset: u64,
        fd: i32,
    ) -> Result<Opaque> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::reg_mr_dmabuf(self, comm, data, size, ptr_type, offset, fd) }
    }
    fn has_dmabuf(&self) -> bool {
        Layer::has_dmabuf(self)
    }
    unsafe fn dereg_mr(&self, comm: Opaque, mr: Opaque) -> Result<()> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::dereg_mr(self, comm, mr) }
    }
    unsafe fn isend(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: i32,
        tag: i32,
        mr: Option<Opaque>,
    ) -> Result<Option<Opaque>> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::isend(self, comm, data, size, tag, mr) }
    }
    unsafe fn irecv(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        tags: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::irecv(self, comm, data, sizes, tags, mrs) }
    }
    unsafe fn iflush(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::iflush(self, comm, data, sizes, mrs) }
    }
    unsafe fn test(&self, req: Opaque, sizes: Option<&mut [i32]>) -> Result<bool> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::test(self, req, sizes) }
    }
    unsafe fn close_send(&self, comm: Opaque) -> Result<()> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::close_send(self, comm) }
    }
    unsafe fn close_recv(&self, comm: Opaque) -> Result<()> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::close_recv(self, comm) }
    }
    unsafe fn close_listen(&self, comm: Opaque) -> Result<()> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::close_listen(self, comm) }
    }
    unsafe fn get_device_mr(&self, comm: Opaque, mr: Opaque) -> Result<Option<Opaque>> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::get_device_mr(self, comm, mr) }
    }
    unsafe fn irecv_consumed(&self, comm: Opaque, n: i32, req: Option<Opaque>) -> Result<()> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::irecv_consumed(self, comm, n, req) }
    }
    unsafe fn describe_comm(&self, comm: Opaque) -> Option<String> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::describe_comm(self, comm) }
    }
    unsafe fn stall_detail(&self, comm: Opaque, req: Opaque) -> Option<String> {
        // SAFETY: see the note on this impl.
        unsafe { Layer::stall_detail(self, comm, req) }
    }
    unsafe fn break_comm(&self, comm: Opaque) -> bool {
        // SAFETY: see the note on this impl.
        unsafe { Layer::break_comm(self, comm) }
    }
}
