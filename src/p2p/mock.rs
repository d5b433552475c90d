//! An in-process transport for the p2p tests that behaves like TCPX where callers can get it
//! wrong: connect writes a process-local token into the handle buffer on its first call and
//! needs it back unchanged (quirk 1), accept writes through the device-handle pointer (quirk 3),
//! connect and the first isend/irecv of a comm say "not yet" (quirks 4, 5), tests must come in
//! FIFO order and at most 16 requests may be outstanding per comm (quirk 6).

use crate::error::{Error, Result};
use crate::ffi::{ncclNetDeviceType, DevHandle, HANDLE_SIZE};
use crate::transport::{DeviceType, Opaque, Properties, Transport};
use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::sync::Mutex;

const TOKEN_AT: usize = 80;
const MAX_REQS: usize = 16;

#[derive(Default)]
struct St {
    next: usize,
    listens: HashMap<usize, VecDeque<usize>>,
    /// token -> listen id, for connects in progress.
    connecting: HashMap<u64, usize>,
    /// send comm -> (pipe, isend calls)
    sends: HashMap<usize, (usize, u32)>,
    /// recv comm -> (pipe, posted requests, irecv calls)
    recvs: HashMap<usize, (usize, VecDeque<usize>, u32)>,
    pipes: HashMap<usize, VecDeque<Vec<u8>>>,
    /// request -> (recv comm or 0 for sends, destination, capacity, sent size)
    reqs: HashMap<usize, (usize, usize, usize, usize)>,
    mrs: HashMap<usize, usize>,
    /// total isend/irecv "try again" answers, for the tests
    pub busy: u32,
    /// close_send/close_recv fail (a transport that cannot tell whether it let go of buffers)
    fail_close: bool,
}

/// The stand-in transport.
#[derive(Default)]
pub(crate) struct MockNet {
    st: Mutex<St>,
}

fn op(id: usize) -> Opaque {
    Opaque::from_ptr(id as *mut c_void).expect("ids are non-zero")
}

fn id(o: Opaque) -> usize {
    o.as_ptr() as usize
}

impl MockNet {
    fn st(&self) -> std::sync::MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn new_id(st: &mut St) -> usize {
        st.next += 1;
        0x1000 + st.next * 16
    }
    /// How many "try again" answers isend/irecv gave.
    pub(crate) fn busy_answers(&self) -> u32 {
        self.st().busy
    }
    /// Makes every later close_send/close_recv fail.
    pub(crate) fn fail_closes(&self) {
        self.st().fail_close = true;
    }
    /// Open comms (send, recv, listen), to check that everything gets closed.
    pub(crate) fn open_comms(&self) -> (usize, usize, usize) {
        let st = self.st();
        (st.sends.len(), st.recvs.len(), st.listens.len())
    }
}

impl Transport for MockNet {
    fn name(&self) -> &str {
        "mock"
    }
    fn devices(&self) -> Result<i32> {
        Ok(2)
    }
    fn properties(&self, dev: i32) -> Result<Properties> {
        Ok(Properties {
            name: format!("mock{dev}"),
            pci_path: None,
            guid: dev as u64,
            ptr_support: 1,
            speed_mbps: 100_000,
            port: 0,
            latency_us: 0.0,
            max_comms: 65536,
            max_recvs: 1,
            device_type: DeviceType::Unpack,
            device_version: 7,
        })
    }
    fn listen(&self, dev: i32, handle: &mut [u8; HANDLE_SIZE]) -> Result<Opaque> {
        if !(0..2).contains(&dev) {
            return Err(Error::invalid_argument(format!("mock: no device {dev}")));
        }
        let mut st = self.st();
        let l = Self::new_id(&mut st);
        st.listens.insert(l, VecDeque::new());
        handle[..8].copy_from_slice(&(l as u64).to_le_bytes());
        handle[8..16].copy_from_slice(b"MOCKNET\0");
        Ok(op(l))
    }
    unsafe fn connect(
        &self,
        _dev: i32,
        handle: &mut [u8; HANDLE_SIZE],
        _dev_handle: *mut *mut DevHandle,
    ) -> Result<Option<Opaque>> {
        if &handle[8..16] != b"MOCKNET\0" {
            return Err(Error::invalid_argument("mock connect: not a mock handle"));
        }
        let l = u64::from_le_bytes(handle[..8].try_into().expect("8 bytes")) as usize;
        let token = u64::from_le_bytes(handle[TOKEN_AT..TOKEN_AT + 8].try_into().expect("8 bytes"));
        let mut st = self.st();
        if token == 0 {
            // First call: remember our state in the caller's buffer, like TCPX.
            let t = Self::new_id(&mut st) as u64;
            handle[TOKEN_AT..TOKEN_AT + 8].copy_from_slice(&t.to_le_bytes());
            st.connecting.insert(t, l);
            return Ok(None);
        }
        match st.connecting.remove(&token) {
            Some(l2) if l2 == l => {}
            _ => {
                return Err(Error::internal(
                    "mock connect: handle buffer changed between calls (quirk 1)",
                ))
            }
        }
        let Some(q) = st.listens.get(&l) else {
            return Err(Error::remote("mock connect: nobody listens for this handle"));
        };
        let _ = q;
        let pipe = Self::new_id(&mut st);
        st.pipes.insert(pipe, VecDeque::new());
        st.listens.get_mut(&l).expect("checked").push_back(pipe);
        let s = Self::new_id(&mut st);
        st.sends.insert(s, (pipe, 0));
        Ok(Some(op(s)))
    }
    unsafe fn accept(&self, listen: Opaque, dev_handle: *mut *mut DevHandle) -> Result<Option<Opaque>> {
        if dev_handle.is_null() {
            return Err(Error::invalid_argument(
                "mock accept: NULL device handle slot (quirk 3)",
            ));
        }
        // SAFETY: the caller passes a valid pointer to a device-handle pointer (that is what is tested).
        let dh = unsafe { *dev_handle };
        if dh.is_null() {
            return Err(Error::invalid_argument(
                "mock accept: device handle pointer is NULL (quirk 3)",
            ));
        }
        let mut st = self.st();
        let Some(q) = st.listens.get_mut(&id(listen)) else {
            return Err(Error::invalid_argument("mock accept: unknown listen comm"));
        };
        let Some(pipe) = q.pop_front() else { return Ok(None) };
        // SAFETY: `dh` points at caller-owned storage for one DevHandle, as accept requires.
        unsafe {
            (*dh).netDeviceType = ncclNetDeviceType::NCCL_NET_DEVICE_UNPACK;
            (*dh).netDeviceVersion = 7;
            (*dh).size = 64;
            (*dh).needsProxyProgress = 1;
        }
        let r = Self::new_id(&mut st);
        st.recvs.insert(r, (pipe, VecDeque::new(), 0));
        Ok(Some(op(r)))
    }
    unsafe fn reg_mr(&self, _comm: Opaque, _data: *mut c_void, size: usize, ptr_type: i32) -> Result<Opaque> {
        if ptr_type != 1 {
            return Err(Error::invalid_argument("mock: host memory only"));
        }
        let mut st = self.st();
        let m = Self::new_id(&mut st);
        st.mrs.insert(m, size);
        Ok(op(m))
    }
    unsafe fn dereg_mr(&self, _comm: Opaque, mr: Opaque) -> Result<()> {
        self.st()
            .mrs
            .remove(&id(mr))
            .map(|_| ())
            .ok_or_else(|| Error::invalid_argument("mock: unknown mr"))
    }
    unsafe fn isend(
        &self,
        comm: Opaque,
        data: *mut c_void,
        size: i32,
        _tag: i32,
        _mr: Option<Opaque>,
    ) -> Result<Option<Opaque>> {
        let mut st = self.st();
        let Some((pipe, calls)) = st.sends.get_mut(&id(comm)) else {
            return Err(Error::invalid_argument("mock isend: unknown comm"));
        };
        *calls += 1;
        let (pipe, first) = (*pipe, *calls == 1);
        if first {
            st.busy += 1;
            return Ok(None);
        }
        let mut bytes = vec![0u8; size as usize];
        if size > 0 {
            // SAFETY: the caller's buffer holds `size` readable bytes (registered host memory).
            let src = unsafe { std::slice::from_raw_parts(data as *const u8, size as usize) };
            bytes.copy_from_slice(src);
        }
        st.pipes.get_mut(&pipe).expect("pipe of a live comm").push_back(bytes);
        let r = Self::new_id(&mut st);
        st.reqs.insert(r, (0, 0, 0, size as usize));
        Ok(Some(op(r)))
    }
    unsafe fn irecv(
        &self,
        comm: Opaque,
        data: &[*mut c_void],
        sizes: &[i32],
        _tags: &[i32],
        _mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        if data.len() != 1 {
            return Err(Error::invalid_argument("mock irecv: n must be 1"));
        }
        let mut st = self.st();
        let c = id(comm);
        let Some((_, posted, calls)) = st.recvs.get_mut(&c) else {
            return Err(Error::invalid_argument("mock irecv: unknown comm"));
        };
        *calls += 1;
        if *calls == 1 || posted.len() >= MAX_REQS {
            st.busy += 1;
            return Ok(None);
        }
        let r = Self::new_id(&mut st);
        st.recvs.get_mut(&c).expect("checked").1.push_back(r);
        st.reqs.insert(r, (c, data[0] as usize, sizes[0] as usize, 0));
        Ok(Some(op(r)))
    }
    unsafe fn iflush(&self, _: Opaque, _: &[*mut c_void], _: &[i32], _: &[Option<Opaque>]) -> Result<Option<Opaque>> {
        Ok(None)
    }
    unsafe fn test(&self, req: Opaque, sizes: Option<&mut [i32]>) -> Result<bool> {
        let mut st = self.st();
        let r = id(req);
        let Some(&(c, dst, cap, sent)) = st.reqs.get(&r) else {
            return Err(Error::invalid_argument("mock test: invalid request"));
        };
        if c == 0 {
            st.reqs.remove(&r);
            if let Some(s) = sizes {
                s[0] = sent as i32;
            }
            return Ok(true);
        }
        let (pipe, posted, _) = st.recvs.get(&c).expect("request of a live comm");
        if posted.front() != Some(&r) {
            return Err(Error::invalid_usage(
                "mock test: requests must be tested in FIFO order (quirk 6)",
            ));
        }
        let pipe = *pipe;
        let Some(msg) = st.pipes.get_mut(&pipe).expect("pipe").pop_front() else {
            return Ok(false);
        };
        if msg.len() > cap {
            return Err(Error::invalid_usage(format!(
                "mock: message of {} B into {cap} B",
                msg.len()
            )));
        }
        if !msg.is_empty() {
            // SAFETY: the receive was posted with `cap` writable bytes at `dst`, still owned by the caller.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, msg.len()) };
            dst.copy_from_slice(&msg);
        }
        st.recvs.get_mut(&c).expect("live").1.pop_front();
        st.reqs.remove(&r);
        if let Some(s) = sizes {
            s[0] = msg.len() as i32;
        }
        Ok(true)
    }
    unsafe fn close_send(&self, comm: Opaque) -> Result<()> {
        if self.st().fail_close {
            return Err(Error::internal("mock: close fails (test)"));
        }
        self.st()
            .sends
            .remove(&id(comm))
            .map(|_| ())
            .ok_or_else(|| Error::invalid_argument("mock: bad send comm"))
    }
    unsafe fn close_recv(&self, comm: Opaque) -> Result<()> {
        let mut st = self.st();
        if st.fail_close {
            return Err(Error::internal("mock: close fails (test)"));
        }
        let (_, posted, _) = st
            .recvs
            .remove(&id(comm))
            .ok_or_else(|| Error::invalid_argument("mock: bad recv comm"))?;
        for r in posted {
            st.reqs.remove(&r);
        }
        Ok(())
    }
    unsafe fn close_listen(&self, comm: Opaque) -> Result<()> {
        self.st()
            .listens
            .remove(&id(comm))
            .map(|_| ())
            .ok_or_else(|| Error::invalid_argument("mock: bad listen"))
    }
}
