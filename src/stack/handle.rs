//! The shim's 128-byte handle: the inner transport's handle first, then a trailer.
//!
//! ```text
//! 0                                   88                                   128
//! | inner transport's handle (88 B)    | magic | ver | flags | ctrl addr | port | family | conn id | secret |
//! ```
//! TCPX writes 88 bytes (including a process-local pointer at offset 80 on connect), so the inner
//! share is exactly that: the inner handle travels inline, and every repeated connect() hands the
//! inner plugin NCCL's own buffer, untouched.
//!
//! An inner plugin that writes (or zeroes) more than 88 bytes in listen() leaves no room for the
//! trailer. Then the handle is *served*: the shim offers the inner plugin's full 128 bytes on
//! its control service (`crate::control`) and NCCL's handle carries only the trailer, with the
//! service's address, an id and a secret. The connecting side fetches the inner handle into a
//! buffer of its own, kept for that connection, and hands the inner plugin that same buffer on
//! every repeated connect() (TCPX's quirk 1 holds in both modes). While the fetch and the inner
//! connect are in progress, the first bytes of NCCL's handle (unused in this mode) name the
//! pending connect, as TCPX keeps its own state in the handle.
//!
//! Unless `NCCL_TCPXSHIM_CONFIG_CHECK=off`, the listening side also offers the settings peers
//! must agree on (`stack::cfgcheck`) on its control service, in both modes: the trailer then
//! names the service, an id and a secret even when the inner handle is inline, and says so with
//! [`FLAG_SETTINGS`]. A handle without the flag (an older tcpxshim, or the check off there) is
//! connected as before.

use super::cfgcheck::{CheckStats, Checker};
use crate::config::Config;
use crate::control::{self, Service};
use crate::error::{Error, Result};
use crate::ffi::HANDLE_SIZE;
use crate::lock;
use crate::transport::Opaque;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

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

/// Trailer flag: the inner handle is served by the listener's control service.
pub const FLAG_SERVED: u16 = 1;
/// Trailer flag: the listener's control service offers its settings under `conn_id` (GET_SETTINGS).
pub const FLAG_SETTINGS: u16 = 2;
/// Trailer flag: the listener runs the recovery engine; its control links are served on the
/// control service under `conn_id` and `secret`.
pub const FLAG_RECOVERY: u16 = 4;
/// Trailer flag (with [`FLAG_RECOVERY`]): the listener takes claims of pooled connections for this
/// listen comm (`stack::pool`).
pub const FLAG_POOL: u16 = 8;

/// The decoded trailer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Trailer {
    /// Feature flags ([`FLAG_SERVED`], [`FLAG_SETTINGS`]).
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
            return Err(Error::invalid_argument(format!(
                "handle was not made by tcpxshim (trailer magic {magic:#010x}, expected {MAGIC:#010x}): \
                 every rank must load the same plugin (NCCL_NET_PLUGIN) with the same NCCL_TCPXSHIM_PLUGIN"
            )));
        }
        let version = u16_at(4);
        if version != VERSION {
            return Err(Error::invalid_argument(format!(
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

impl Trailer {
    /// The control service's address, if the trailer names one.
    pub fn ctrl_socket(&self) -> Option<SocketAddr> {
        let ip = match self.ctrl_family as i32 {
            libc::AF_INET => IpAddr::V4(Ipv6Addr::from(self.ctrl_addr).to_ipv4_mapped()?),
            libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(self.ctrl_addr)),
            _ => return None,
        };
        Some(SocketAddr::new(ip, self.ctrl_port))
    }

    /// Names `addr` as the control service's address.
    pub fn set_ctrl_socket(&mut self, addr: SocketAddr) {
        let (family, v6) = match addr.ip() {
            IpAddr::V4(v4) => (libc::AF_INET, v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => (libc::AF_INET6, v6),
        };
        self.ctrl_family = family as u16;
        self.ctrl_addr = v6.octets();
        self.ctrl_port = addr.port();
    }
}

/// What a handle received from a peer asks connect() to do, read from its bytes alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// The inner handle is inline, in the first [`INNER_HANDLE_SIZE`] bytes.
    Inline(Trailer),
    /// Served, and no connect of this process has started on it: fetch the inner handle from
    /// the control service at `ctrl`.
    Fetch {
        /// The trailer.
        trailer: Trailer,
        /// The listener's control service.
        ctrl: SocketAddr,
    },
    /// Served, and the first bytes name the connect `id` of this process in progress.
    Pending {
        /// The trailer.
        trailer: Trailer,
        /// The pending connect.
        id: u64,
    },
}

impl Received {
    /// Reads NCCL's handle as connect() finds it.
    pub fn parse(handle: &[u8; HANDLE_SIZE]) -> Result<Received> {
        let trailer = Trailer::read(handle)?;
        if trailer.flags & FLAG_SERVED == 0 {
            return Ok(Received::Inline(trailer));
        }
        let word = |i: usize| u64::from_le_bytes(handle[i..i + 8].try_into().unwrap_or_default());
        if word(0) == PENDING_MAGIC {
            return Ok(Received::Pending { trailer, id: word(8) });
        }
        let ctrl = trailer.ctrl_socket().ok_or_else(|| {
            Error::invalid_argument(format!(
                "the handle says it is served but names no control service (address family {}): a corrupted handle",
                trailer.ctrl_family
            ))
        })?;
        Ok(Received::Fetch { trailer, ctrl })
    }
}

/// A random 64-bit value from the operating system (connection ids and secrets).
pub fn random_u64() -> Result<u64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| {
        Error::system(format!(
            "no random numbers from the operating system for a handle secret: {e}"
        ))
    })?;
    Ok(u64::from_le_bytes(b))
}

/// How the shim carries inner handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandleMode {
    /// Inline when the inner handle fits in its 88 bytes, served otherwise.
    Auto,
    /// Always served (to exercise that mode over any inner transport).
    Served,
}

/// A connect in progress in served mode.
struct Pending {
    /// The inner handle once fetched, in a buffer of this connection's own: the inner plugin gets
    /// this same buffer on every repeated connect().
    scratch: Box<[u8; HANDLE_SIZE]>,
    /// The fetch under way; `None` once the inner handle is in `scratch`.
    fetch: Option<std::sync::mpsc::Receiver<Result<[u8; HANDLE_SIZE]>>>,
    touched: Instant,
}

/// Marks the first bytes of NCCL's handle as naming a pending connect ("TXSHPEND").
const PENDING_MAGIC: u64 = u64::from_le_bytes(*b"TXSHPEND");
/// A pending connect nobody polled for this long is dropped.
const ABANDON_AFTER: Duration = Duration::from_secs(60);

/// The two handle modes: writing handles in listen, reading them in connect.
pub struct Handles {
    mode: HandleMode,
    ctrl_addr: Option<IpAddr>,
    ctrl_ifname: Option<String>,
    service: OnceLock<std::result::Result<Service, String>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_pending: AtomicU64,
    checker: Checker,
    warned_no_service: std::sync::atomic::AtomicBool,
}

impl Handles {
    /// The handle settings of `cfg`, over the inner transport named `inner`.
    pub fn new(cfg: &Config, inner: &str) -> Handles {
        Handles {
            mode: cfg.handle_mode,
            ctrl_addr: cfg.ctrl_addr,
            ctrl_ifname: cfg.tcp.ifname.clone(),
            service: OnceLock::new(),
            pending: Mutex::new(HashMap::new()),
            next_pending: AtomicU64::new(1),
            checker: Checker::new(cfg, inner),
            warned_no_service: Default::default(),
        }
    }

    /// The encoded settings this side compares with its peers'.
    pub fn settings_body(&self) -> std::sync::Arc<Vec<u8>> {
        self.checker.body()
    }

    /// Counts of the settings checks of connects so far.
    pub fn check_stats(&self) -> CheckStats {
        self.checker.stats()
    }

    /// Settings requests this side's control service received; `None` while it is not running.
    pub fn settings_requests(&self) -> Option<u64> {
        match self.service.get() {
            Some(Ok(svc)) => Some(svc.settings_requests()),
            _ => None,
        }
    }

    fn service(&self) -> Result<&Service> {
        let s = self.start_service();
        s.map_err(|e| {
            Error::system(format!(
                "the inner plugin's handle needs the control service, which could not start: {e} (set {})",
                crate::config::CTRL_ADDR.name
            ))
        })
    }

    fn start_service(&self) -> std::result::Result<&Service, &str> {
        let s = self.service.get_or_init(|| {
            let ip = match self.ctrl_addr {
                Some(ip) => ip,
                None => crate::tcp::default_address(self.ctrl_ifname.as_deref()).map_err(|e| e.to_string())?,
            };
            Service::start(ip).map_err(|e| e.to_string())
        });
        s.as_ref().map_err(String::as_str)
    }

    /// Offers this side's settings for the check between peers, in an inline handle's trailer.
    fn offer_settings_inline(&self, t: &mut Trailer, inner: &str) -> Option<u32> {
        if !self.checker.on() {
            return None;
        }
        match self.start_service() {
            Ok(svc) => {
                let id = svc.offer_settings(None, t.secret, self.checker.body());
                t.flags |= FLAG_SETTINGS;
                t.conn_id = id;
                t.set_ctrl_socket(svc.addr());
                Some(id)
            }
            Err(e) => {
                if !self.warned_no_service.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "listen over {inner}: the settings check between peers needs the control service, which could \
                         not start: {e}; peers connecting here cannot check their settings (set {} or {}=off)",
                        crate::config::CTRL_ADDR.name,
                        crate::config::CONFIG_CHECK.name
                    );
                }
                None
            }
        }
    }

    /// Writes NCCL's `handle` for the inner handle in `scratch` (filled with [`CANARY`] before the
    /// inner listen): inline when it fits, else served. Returns the id of the control service's
    /// offer (the served handle, the settings or both) to withdraw when the listen comm closes.
    pub fn publish(
        &self,
        scratch: &[u8; HANDLE_SIZE],
        handle: &mut [u8; HANDLE_SIZE],
        inner: &str,
    ) -> Result<Option<u32>> {
        let fits = scratch[INNER_HANDLE_SIZE..].iter().all(|&b| b == CANARY);
        let mut t = Trailer {
            secret: random_u64()?,
            ..Trailer::default()
        };
        if fits && self.mode == HandleMode::Auto {
            handle[..INNER_HANDLE_SIZE].copy_from_slice(&scratch[..INNER_HANDLE_SIZE]);
            // Above the control service's offer ids (see `control::next_id`).
            t.conn_id = random_u64()? as u32 | 0x8000_0000;
            let offered = self.offer_settings_inline(&mut t, inner);
            t.write(handle);
            return Ok(offered);
        }
        let svc = self.service().map_err(|e| e.context(format!("listen over {inner}")))?;
        let id = svc.offer(t.secret, scratch);
        t.flags = FLAG_SERVED;
        if self.checker.on() {
            svc.offer_settings(Some(id), t.secret, self.checker.body());
            t.flags |= FLAG_SETTINGS;
        }
        t.conn_id = id;
        t.set_ctrl_socket(svc.addr());
        handle.fill(0);
        t.write(handle);
        if !fits {
            log::info!(
                "listen: inner transport {inner} writes past byte {INNER_HANDLE_SIZE} of its handle; serving it from the \
                 control service at {}",
                svc.addr()
            );
        }
        Ok(Some(id))
    }

    /// Marks the handle `publish` wrote as recoverable: makes sure its trailer names the control
    /// service (inline handles included), has the service hand control links to `hub`, and
    /// returns the link the connecting side will attach to.
    pub fn offer_recovery(
        &self,
        handle: &mut [u8; HANDLE_SIZE],
        hub: &crate::control::link::Hub,
    ) -> Result<crate::control::link::Link> {
        let svc = self.service().map_err(|e| e.context("listen: recovery"))?;
        svc.serve_links(hub);
        let mut t = Trailer::read(handle)?;
        let mut link = hub.expect(t.conn_id, t.secret);
        // An id of its own (no offer of the service stands under it) may be drawn again when
        // another link of the process has it.
        for _ in 0..4 {
            if link.is_ok() || t.flags & (FLAG_SERVED | FLAG_SETTINGS) != 0 {
                break;
            }
            t.conn_id = random_u64()? as u32 | 0x8000_0000;
            link = hub.expect(t.conn_id, t.secret);
        }
        // The flag goes into the handle only with the link expected, so a peer never connects
        // a link nobody waits for.
        let link = link?;
        t.set_ctrl_socket(svc.addr());
        t.flags |= FLAG_RECOVERY;
        t.write(handle);
        Ok(link)
    }

    /// Withdraws a served handle (its listen comm closed).
    pub fn withdraw(&self, id: u32) {
        if let Some(Ok(svc)) = self.service.get() {
            svc.withdraw(id);
        }
    }

    /// One connect() call for NCCL's `handle`: `inner` is called with the inner handle buffer
    /// (NCCL's own when inline, the pending connect's when served), the same one every call.
    /// The settings check runs beside it; when it fails the connect (`enforce`), a comm the
    /// inner transport returned is given to `close`.
    pub fn connect(
        &self,
        handle: &mut [u8; HANDLE_SIZE],
        inner: impl FnOnce(&mut [u8; HANDLE_SIZE]) -> Result<Option<Opaque>>,
        close: impl FnOnce(Opaque),
    ) -> Result<Option<Opaque>> {
        let t = Trailer::read(handle)?;
        let key = handle.as_ptr() as usize;
        self.checker.begin(key, &t);
        let res = self.connect_inner(handle, inner);
        if matches!(res, Ok(None)) {
            return res;
        }
        match (self.checker.finish(key, &t), res) {
            (Ok(()), res) => res,
            (Err(e), Ok(Some(c))) => {
                close(c);
                Err(e)
            }
            (Err(e), Err(inner_err)) => Err(Error::invalid_usage(format!(
                "{e}; the inner connect failed as well: {inner_err}"
            ))),
            (Err(e), Ok(None)) => Err(e),
        }
    }

    fn connect_inner(
        &self,
        handle: &mut [u8; HANDLE_SIZE],
        inner: impl FnOnce(&mut [u8; HANDLE_SIZE]) -> Result<Option<Opaque>>,
    ) -> Result<Option<Opaque>> {
        let received = Received::parse(handle)?;
        let t = match received {
            // The same buffer, unchanged, on every call: TCPX keeps connect state inside it.
            Received::Inline(_) => return inner(handle),
            Received::Fetch { trailer, .. } | Received::Pending { trailer, .. } => trailer,
        };
        self.drop_abandoned();
        let (id, mut p) = self.take_pending(handle, received)?;
        let res = self.progress(&mut p, &t).and_then(|ready| match ready {
            true => inner(&mut p.scratch),
            false => Ok(None),
        });
        match res {
            Ok(None) => {
                p.touched = Instant::now();
                lock(&self.pending).insert(id, p);
                Ok(None)
            }
            done => {
                handle[..16].fill(0);
                done
            }
        }
    }

    /// The pending connect NCCL's handle names, or a new one (writing its id into the handle).
    fn take_pending(&self, handle: &mut [u8; HANDLE_SIZE], received: Received) -> Result<(u64, Pending)> {
        let id = match received {
            Received::Pending { id, .. } => id,
            Received::Fetch { trailer, ctrl } => {
                let fetch = self.start_fetch(ctrl, &trailer)?;
                let id = self.next_pending.fetch_add(1, Ordering::Relaxed);
                handle[..8].copy_from_slice(&PENDING_MAGIC.to_le_bytes());
                handle[8..16].copy_from_slice(&id.to_le_bytes());
                let p = Pending {
                    scratch: Box::new([0; HANDLE_SIZE]),
                    fetch: Some(fetch),
                    touched: Instant::now(),
                };
                return Ok((id, p));
            }
            Received::Inline(_) => return Err(Error::internal("connect: an inline handle has no pending connect")),
        };
        let p = lock(&self.pending).remove(&id).ok_or_else(|| {
            Error::invalid_argument(format!(
                "the handle names connect #{id} in progress, which this process does not have (a handle copied between \
                 connect() calls, reused after its connect finished, or not polled for {} s)",
                ABANDON_AFTER.as_secs()
            ))
        })?;
        Ok((id, p))
    }

    fn start_fetch(
        &self,
        addr: SocketAddr,
        t: &Trailer,
    ) -> Result<std::sync::mpsc::Receiver<Result<[u8; HANDLE_SIZE]>>> {
        let req = control::Request {
            id: t.conn_id,
            secret: t.secret,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let timeout = control::IO_TIMEOUT;
        std::thread::Builder::new()
            .name("tcpxshim-fetch".into())
            .spawn(move || {
                let _ = tx.send(control::fetch(addr, req, timeout));
            })
            .map_err(|e| Error::io("connect: starting the handle fetch", e))?;
        Ok(rx)
    }

    /// Whether the inner handle is in `p.scratch` yet.
    fn progress(&self, p: &mut Pending, t: &Trailer) -> Result<bool> {
        let Some(rx) = p.fetch.as_ref() else {
            return Ok(true);
        };
        match rx.try_recv() {
            Ok(Ok(h)) => {
                *p.scratch = h;
                p.fetch = None;
                Ok(true)
            }
            Ok(Err(e)) => Err(e),
            Err(std::sync::mpsc::TryRecvError::Empty) => Ok(false),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Err(Error::internal(format!(
                "connect: the fetch of served handle {} ended without an answer",
                t.conn_id
            ))),
        }
    }

    fn drop_abandoned(&self) {
        lock(&self.pending).retain(|_, p| p.touched.elapsed() < ABANDON_AFTER);
    }
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
    fn control_addresses_round_trip_in_the_trailer() {
        for a in ["127.0.0.1:4000", "[::1]:5000", "10.1.2.3:65535"] {
            let addr: SocketAddr = a.parse().unwrap();
            let mut t = Trailer::default();
            t.set_ctrl_socket(addr);
            let mut h = [0u8; HANDLE_SIZE];
            t.write(&mut h);
            assert_eq!(Trailer::read(&h).unwrap().ctrl_socket(), Some(addr));
        }
        assert_eq!(Trailer::default().ctrl_socket(), None);
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
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzzing::{check_mutations, config};
    use proptest::prelude::*;

    fn any_trailer() -> impl Strategy<Value = Trailer> {
        (
            any::<u16>(),
            any::<[u8; 16]>(),
            any::<u16>(),
            prop_oneof![Just(libc::AF_INET as u16), Just(libc::AF_INET6 as u16), any::<u16>()],
            any::<u32>(),
            any::<u64>(),
        )
            .prop_map(|(flags, ctrl_addr, ctrl_port, ctrl_family, conn_id, secret)| Trailer {
                flags,
                ctrl_addr,
                ctrl_port,
                ctrl_family,
                conn_id,
                secret,
            })
    }

    /// The handle with the trailer `read` found written back: the bytes themselves, if `read`
    /// used every trailer byte as what it says.
    fn trailer_canon(b: &[u8]) -> Option<Vec<u8>> {
        let h: &[u8; HANDLE_SIZE] = b.try_into().ok()?;
        let t = Trailer::read(h).ok()?;
        let mut out = *h;
        t.write(&mut out);
        Some(out.to_vec())
    }

    /// What connect() would make of the handle, checked against its bytes field by field.
    fn check_received(h: &[u8; HANDLE_SIZE]) -> std::result::Result<(), TestCaseError> {
        let Ok(r) = Received::parse(h) else { return Ok(()) };
        let t = Trailer::read(h).expect("parse accepted the trailer");
        match r {
            Received::Inline(rt) => prop_assert!(rt == t && t.flags & FLAG_SERVED == 0),
            Received::Pending { trailer, id } => {
                prop_assert!(trailer == t && t.flags & FLAG_SERVED != 0);
                prop_assert_eq!(&h[..8], &PENDING_MAGIC.to_le_bytes()[..]);
                prop_assert_eq!(&h[8..16], &id.to_le_bytes()[..]);
            }
            Received::Fetch { trailer, ctrl } => {
                prop_assert!(trailer == t && t.flags & FLAG_SERVED != 0);
                prop_assert_ne!(&h[..8], &PENDING_MAGIC.to_le_bytes()[..]);
                prop_assert_eq!(ctrl.port(), t.ctrl_port);
                let (family, octets) = match ctrl.ip() {
                    IpAddr::V4(v4) => (libc::AF_INET, v4.to_ipv6_mapped().octets()),
                    IpAddr::V6(v6) => (libc::AF_INET6, v6.octets()),
                };
                prop_assert_eq!(family as u16, t.ctrl_family);
                prop_assert_eq!(octets, t.ctrl_addr);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn trailer_arbitrary_bytes(b in any::<[u8; HANDLE_SIZE]>(), ours in any::<bool>()) {
            let mut h = b;
            if ours {
                // A valid magic and version, so the fields behind them are what is fuzzed.
                h[INNER_HANDLE_SIZE..INNER_HANDLE_SIZE + 4].copy_from_slice(&MAGIC.to_le_bytes());
                h[INNER_HANDLE_SIZE + 4..INNER_HANDLE_SIZE + 6].copy_from_slice(&VERSION.to_le_bytes());
            }
            if let Some(again) = trailer_canon(&h) {
                prop_assert_eq!(&again[..], &h[..]);
            }
            check_received(&h)?;
        }

        #[test]
        fn trailer_mutations(t in any_trailer(), inner in any::<[u8; HANDLE_SIZE]>(), masks in proptest::collection::vec(1u8.., 1..64)) {
            let mut h = inner;
            t.write(&mut h);
            prop_assert_eq!(Trailer::read(&h).unwrap(), t);
            // The handle is a fixed 128 bytes: there is no truncated one.
            check_mutations(&h, &masks, false, trailer_canon)?;
            let mut m = h;
            for i in 0..HANDLE_SIZE {
                m[i] ^= masks[i % masks.len()];
                check_received(&m)?;
                m[i] = h[i];
            }
        }

        /// Served handles as a listener writes them (zeroed inner share) and as connect leaves
        /// them while pending (its magic and id in front).
        #[test]
        fn served_handles(t in any_trailer(), addr in any::<SocketAddr>(), pending in proptest::option::of(any::<u64>()), masks in proptest::collection::vec(1u8.., 1..64)) {
            let mut t = t;
            t.flags |= FLAG_SERVED;
            t.set_ctrl_socket(addr);
            let mut h = [0u8; HANDLE_SIZE];
            t.write(&mut h);
            if let Some(id) = pending {
                h[..8].copy_from_slice(&PENDING_MAGIC.to_le_bytes());
                h[8..16].copy_from_slice(&id.to_le_bytes());
                prop_assert_eq!(Received::parse(&h).unwrap(), Received::Pending { trailer: t, id });
            } else {
                let ctrl = SocketAddr::new(addr.ip(), addr.port());
                prop_assert_eq!(Received::parse(&h).unwrap(), Received::Fetch { trailer: t, ctrl });
            }
            let mut m = h;
            for i in 0..HANDLE_SIZE {
                m[i] ^= masks[i % masks.len()];
                check_received(&m)?;
                m[i] = h[i];
            }
        }
    }
}
