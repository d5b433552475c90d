//! The per-process control service: a small TCP server through which shim instances talk to
//! each other, and its client.
//!
//! It serves two things. GET_HANDLE: the full 128-byte handle of an inner plugin that leaves no room
//! for the shim's trailer (see `stack::handle`). The listening side offers the handle under a
//! connection id and a random secret, both carried in the shim's own handle; the connecting
//! side asks for it with that id and secret. GET_SETTINGS (`settings`): the values of the
//! settings that must agree between peers, offered under the id and secret of a handle, for the
//! connecting side to compare with its own (`stack::cfgcheck`). Every message is versioned and of fixed length, the
//! secret is compared in constant time, every connection has a deadline, and the number of
//! connections served at once is capped, so a stray or hostile client can neither crash the
//! service nor hold it up.

use crate::error::{Error, ErrorKind, Result};
use crate::ffi::HANDLE_SIZE;
use crate::lock;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub mod link;
pub mod settings;

/// "TXCT", little-endian.
const MAGIC: u32 = u32::from_le_bytes(*b"TXCT");
const VERSION: u16 = 1;
const GET_HANDLE: u16 = 1;
/// magic, version, type, connection id, secret.
pub const REQUEST_LEN: usize = 4 + 2 + 2 + 4 + 8;
/// magic, version, status, handle.
pub const REPLY_LEN: usize = 4 + 2 + 2 + HANDLE_SIZE;
/// Connections served at once; more are closed at once.
const MAX_CLIENTS: usize = 64;
/// A client must send its request and take the reply within this time.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request was not answered with a handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Status {
    /// The handle follows.
    Ok = 0,
    /// No handle is offered under that id (never, or its listen comm closed).
    Unknown = 1,
    /// The secret does not match.
    Denied = 2,
    /// Not a request this version understands.
    Malformed = 3,
}

impl Status {
    fn from_u16(v: u16) -> Option<Status> {
        [Status::Ok, Status::Unknown, Status::Denied, Status::Malformed]
            .into_iter()
            .find(|s| *s as u16 == v)
    }
}

/// A request for the handle offered under `id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Connection id from the shim's handle.
    pub id: u32,
    /// Secret from the shim's handle.
    pub secret: u64,
}

impl Request {
    /// The bytes on the wire.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        encode_request(GET_HANDLE, self.id, self.secret)
    }
    /// Parses a request; `None` for anything else.
    pub fn decode(b: &[u8]) -> Option<Request> {
        decode_request(b, GET_HANDLE).map(|(id, secret)| Request { id, secret })
    }
}

/// A request of type `kind` for what is offered under `id`, with `secret`: magic, version, type,
/// id, secret.
pub(crate) fn encode_request(kind: u16, id: u32, secret: u64) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[6..8].copy_from_slice(&kind.to_le_bytes());
    b[8..12].copy_from_slice(&id.to_le_bytes());
    b[12..20].copy_from_slice(&secret.to_le_bytes());
    b
}

/// The id and secret of a request of type `kind`; `None` for anything else.
pub(crate) fn decode_request(b: &[u8], kind: u16) -> Option<(u32, u64)> {
    let b: &[u8; REQUEST_LEN] = b.try_into().ok()?;
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    if u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != MAGIC || u16_at(4) != VERSION || u16_at(6) != kind {
        return None;
    }
    Some((
        u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        u64::from_le_bytes(b[12..20].try_into().ok()?),
    ))
}

fn encode_reply(status: Status, handle: &[u8; HANDLE_SIZE]) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[6..8].copy_from_slice(&(status as u16).to_le_bytes());
    if status == Status::Ok {
        b[8..].copy_from_slice(handle);
    }
    b
}

/// Parses a reply: the handle, or the status that refused it; `None` for garbage (a refusal
/// carries no handle: its handle bytes are zero).
pub fn decode_reply(b: &[u8]) -> Option<std::result::Result<[u8; HANDLE_SIZE], Status>> {
    let b: &[u8; REPLY_LEN] = b.try_into().ok()?;
    if u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != MAGIC || u16::from_le_bytes([b[4], b[5]]) != VERSION {
        return None;
    }
    match Status::from_u16(u16::from_le_bytes([b[6], b[7]]))? {
        Status::Ok => b[8..].try_into().ok().map(Ok),
        _ if b[8..].iter().any(|&x| x != 0) => None,
        s => Some(Err(s)),
    }
}

/// Compares two secrets without an early exit, so timing tells nothing about the match.
fn same_secret(a: u64, b: u64) -> bool {
    let d = a ^ b;
    std::hint::black_box(d) == 0
}

struct Offer {
    secret: u64,
    handle: [u8; HANDLE_SIZE],
}

/// Requests turned away, by reason (for tests and the log).
#[derive(Debug, Default)]
pub struct Rejections {
    /// Not a well-formed request, or too slow.
    pub malformed: AtomicU64,
    /// Unknown id.
    pub unknown: AtomicU64,
    /// Wrong secret.
    pub denied: AtomicU64,
    /// Over the connection cap.
    pub busy: AtomicU64,
}

struct Shared {
    offers: Mutex<HashMap<u32, Offer>>,
    clients: AtomicUsize,
    rejected: Rejections,
    /// Control links arriving on this port are handed to this hub.
    links: OnceLock<link::Hub>,
    /// The settings offered for the check between peers.
    settings: settings::Offers,
}

/// A running control service.
pub struct Service {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

/// Offer ids, unique in the process (below 2^31; inline handles without an offer draw random ids
/// above): the control links of every stack in the process share one hub, which tells links
/// apart by this id.
static NEXT_ID: AtomicU32 = AtomicU32::new(1);

fn next_id() -> u32 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff
}

impl Service {
    /// Starts the service on `ip` (an ephemeral port), with its accept loop on a thread of its own.
    pub fn start(ip: IpAddr) -> Result<Service> {
        let listener = TcpListener::bind((ip, 0)).map_err(|e| {
            Error::io(
                format!("control service: listening on {ip} (NCCL_TCPXSHIM_CTRL_ADDR)"),
                e,
            )
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("control service: local address", e))?;
        let shared = Arc::new(Shared {
            offers: Mutex::new(HashMap::new()),
            clients: AtomicUsize::new(0),
            rejected: Rejections::default(),
            links: OnceLock::new(),
            settings: settings::Offers::default(),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("tcpxshim-ctrl".into())
            .spawn(move || accept_loop(listener, s))
            .map_err(|e| Error::io("control service: starting its thread", e))?;
        log::info!("control service listening on {addr}");
        Ok(Service { addr, shared })
    }

    /// Where the service listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Offers `handle` under a new id, guarded by `secret`; returns the id.
    pub fn offer(&self, secret: u64, handle: &[u8; HANDLE_SIZE]) -> u32 {
        let id = next_id();
        lock(&self.shared.offers).insert(
            id,
            Offer {
                secret,
                handle: *handle,
            },
        );
        id
    }

    /// Withdraws the offer `id` (its listen comm closed), its settings included.
    pub fn withdraw(&self, id: u32) {
        lock(&self.shared.offers).remove(&id);
        self.shared.settings.withdraw(id);
    }

    /// Offers the settings `body` under `id` (the id of a handle offered with [`Service::offer`])
    /// or, when `None`, under a new id; guarded by `secret`. Returns the id.
    pub fn offer_settings(&self, id: Option<u32>, secret: u64, body: Arc<Vec<u8>>) -> u32 {
        let id = id.unwrap_or_else(next_id);
        self.shared.settings.offer(id, secret, body);
        id
    }

    /// Settings requests received so far (answered or turned away).
    pub fn settings_requests(&self) -> u64 {
        self.shared.settings.requests.load(Ordering::Relaxed)
    }

    /// Hands the control links that connect to this port to `hub` (the first hub given stays).
    pub fn serve_links(&self, hub: &link::Hub) {
        let _ = self.shared.links.set(hub.clone());
    }

    /// Requests turned away so far.
    #[cfg(test)]
    pub fn rejected(&self) -> &Rejections {
        &self.shared.rejected
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        if shared.clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            shared.clients.fetch_sub(1, Ordering::AcqRel);
            shared.rejected.busy.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("tcpxshim-ctrl-c".into())
            .spawn(move || {
                serve(stream, &s);
                s.clients.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            shared.clients.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Answers one client: one request, one reply, within [`IO_TIMEOUT`] each.
fn serve(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    if let Some(hub) = shared.links.get().filter(|_| link::is_link_stream(&stream)) {
        return hub.adopt(stream);
    }
    let peer = stream.peer_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
    let mut buf = [0u8; REQUEST_LEN];
    let read = stream.read_exact(&mut buf).is_ok();
    if let Some(req) = settings::Request::decode(&buf).filter(|_| read) {
        return settings::answer(&mut stream, req, &shared.settings, &shared.rejected, &peer);
    }
    let status = match read.then(|| Request::decode(&buf)).flatten() {
        None => Status::Malformed,
        Some(req) => match lock(&shared.offers).get(&req.id) {
            None => Status::Unknown,
            Some(o) if !same_secret(o.secret, req.secret) => Status::Denied,
            Some(o) => {
                let reply = encode_reply(Status::Ok, &o.handle);
                let _ = stream.write_all(&reply);
                return;
            }
        },
    };
    let counter = match status {
        Status::Unknown => &shared.rejected.unknown,
        Status::Denied => &shared.rejected.denied,
        _ => &shared.rejected.malformed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    log::warn!("control service: turned away a request from {peer}: {status:?}");
    let _ = stream.write_all(&encode_reply(status, &[0; HANDLE_SIZE]));
}

/// Asks the service at `addr` for the handle offered under `req` (blocking, with timeouts).
pub fn fetch(addr: SocketAddr, req: Request, timeout: Duration) -> Result<[u8; HANDLE_SIZE]> {
    let what = format!("fetching the inner handle from the listener's control service at {addr}");
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| Error::io(&what, e))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| Error::io(&what, e))?;
    s.set_write_timeout(Some(timeout)).map_err(|e| Error::io(&what, e))?;
    s.write_all(&req.encode()).map_err(|e| Error::io(&what, e))?;
    let mut buf = [0u8; REPLY_LEN];
    s.read_exact(&mut buf)
        .map_err(|e| Error::io_as(ErrorKind::ConnectionLost, &what, e))?;
    match decode_reply(&buf) {
        Some(Ok(h)) => Ok(h),
        Some(Err(Status::Unknown)) => Err(Error::invalid_argument(format!(
            "{what}: it offers no handle under id {} (its listen comm is closed, or the handle is from another job)",
            req.id
        ))),
        Some(Err(s)) => Err(Error::remote(format!("{what}: request refused ({s:?})"))),
        None => Err(Error::remote(format!(
            "{what}: the reply is not a tcpxshim control reply"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn service() -> Service {
        Service::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap()
    }

    #[test]
    fn serves_an_offered_handle_to_the_right_secret_only() {
        let svc = service();
        let mut h = [0u8; HANDLE_SIZE];
        h.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        let id = svc.offer(42, &h);
        let t = Duration::from_secs(5);
        assert_eq!(fetch(svc.addr(), Request { id, secret: 42 }, t).unwrap(), h);
        let denied = fetch(svc.addr(), Request { id, secret: 43 }, t).unwrap_err();
        assert!(denied.to_string().contains("Denied"), "{denied}");
        let unknown = fetch(
            svc.addr(),
            Request {
                id: id + 100,
                secret: 42,
            },
            t,
        )
        .unwrap_err();
        assert!(unknown.to_string().contains("offers no handle"), "{unknown}");
        svc.withdraw(id);
        assert!(fetch(svc.addr(), Request { id, secret: 42 }, t).is_err(), "withdrawn");
        assert_eq!(svc.rejected().denied.load(Ordering::Relaxed), 1);
        assert_eq!(svc.rejected().unknown.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn garbage_truncated_and_silent_clients_are_turned_away_and_the_service_keeps_serving() {
        let svc = service();
        let h = [7u8; HANDLE_SIZE];
        let id = svc.offer(9, &h);
        // Garbage of the right length.
        let mut g = TcpStream::connect(svc.addr()).unwrap();
        g.write_all(&[0x55; REQUEST_LEN]).unwrap();
        let mut reply = [0u8; REPLY_LEN];
        g.read_exact(&mut reply).unwrap();
        assert_eq!(decode_reply(&reply), Some(Err(Status::Malformed)));
        // Truncated: half a request, then the client goes away.
        let mut t = TcpStream::connect(svc.addr()).unwrap();
        t.write_all(&Request { id, secret: 9 }.encode()[..7]).unwrap();
        drop(t);
        // A client that connects and says nothing does not hold up the others.
        let _silent = TcpStream::connect(svc.addr()).unwrap();
        assert_eq!(
            fetch(svc.addr(), Request { id, secret: 9 }, Duration::from_secs(5)).unwrap(),
            h
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while svc.rejected().malformed.load(Ordering::Relaxed) < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(svc.rejected().malformed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn messages_round_trip_and_reject_other_versions() {
        let r = Request {
            id: 7,
            secret: u64::MAX,
        };
        assert_eq!(Request::decode(&r.encode()), Some(r));
        let mut bad = r.encode();
        bad[4] = 9;
        assert_eq!(Request::decode(&bad), None);
        assert_eq!(Request::decode(&r.encode()[..10]), None);
        let h = [3u8; HANDLE_SIZE];
        assert_eq!(decode_reply(&encode_reply(Status::Ok, &h)), Some(Ok(h)));
        assert_eq!(
            decode_reply(&encode_reply(Status::Denied, &h)),
            Some(Err(Status::Denied))
        );
        assert!(same_secret(5, 5) && !same_secret(5, 6));
    }

    /// Found by the fuzz module: a refusal with handle bytes set decoded as the bare refusal.
    #[test]
    fn a_refusal_with_handle_bytes_is_garbage() {
        let mut b = encode_reply(Status::Denied, &[0; HANDLE_SIZE]);
        b[REPLY_LEN - 1] = 1;
        assert_eq!(decode_reply(&b), None);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzzing::{check_mutations, config};
    use proptest::prelude::*;

    fn reply_canon(b: &[u8]) -> Option<Vec<u8>> {
        Some(match decode_reply(b)? {
            Ok(h) => encode_reply(Status::Ok, &h).to_vec(),
            Err(s) => encode_reply(s, &[0; HANDLE_SIZE]).to_vec(),
        })
    }

    fn request_canon(b: &[u8]) -> Option<Vec<u8>> {
        Request::decode(b).map(|r| r.encode().to_vec())
    }

    fn any_status() -> impl Strategy<Value = Status> {
        prop_oneof![
            Just(Status::Ok),
            Just(Status::Unknown),
            Just(Status::Denied),
            Just(Status::Malformed)
        ]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn request_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..32)) {
            if let Some(again) = request_canon(&b) {
                prop_assert_eq!(again, b);
            }
        }

        #[test]
        fn request_mutations(id in any::<u32>(), secret in any::<u64>(), masks in proptest::collection::vec(1u8.., 1..32)) {
            let r = Request { id, secret };
            prop_assert_eq!(Request::decode(&r.encode()), Some(r));
            check_mutations(&r.encode(), &masks, true, request_canon)?;
        }

        #[test]
        fn reply_arbitrary_bytes(
            status in any::<u16>(),
            body in prop_oneof![Just(REPLY_LEN - 8), 0..REPLY_LEN]
                .prop_flat_map(|n| proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], n)),
            magic in any::<bool>(),
        ) {
            // With or without a valid magic and version, so the status and body checks are reached.
            let mut b = if magic { MAGIC.to_le_bytes().to_vec() } else { vec![] };
            if magic {
                b.extend_from_slice(&VERSION.to_le_bytes());
                b.extend_from_slice(&status.to_le_bytes());
            }
            b.extend_from_slice(&body);
            if let Some(again) = reply_canon(&b) {
                prop_assert_eq!(again, b);
            }
        }

        #[test]
        fn reply_mutations(status in any_status(), handle in any::<[u8; HANDLE_SIZE]>(), masks in proptest::collection::vec(1u8.., 1..64)) {
            let handle = if status == Status::Ok { handle } else { [0; HANDLE_SIZE] };
            let b = encode_reply(status, &handle);
            let want = if status == Status::Ok { Ok(handle) } else { Err(status) };
            prop_assert_eq!(decode_reply(&b), Some(want));
            check_mutations(&b, &masks, true, reply_canon)?;
        }
    }
}
