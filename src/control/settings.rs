//! GET_SETTINGS: the control service's second message. The listening side offers, under the
//! connection id and secret of its handle, the values of the settings that must agree between
//! peers (`stack::cfgcheck`); the connecting side asks for them and compares.
//!
//! ```text
//! request: magic "TXCT" | version 1 | type GET_SETTINGS | connection id (u32) | secret (u64)   20 B
//! reply:   magic "TXCT" | version 1 | status (u16) | body length (u16) | body (<= MAX_BODY)
//! body:    body version (u8) | count (u8) | count x [name length (u8) | name | value length (u16) | value]
//! ```
//! The request has the layout of GET_HANDLE (only the type differs), so an older service answers
//! it with a `Malformed` reply instead of hanging. The body is bounded, every length is checked
//! against what is left, and trailing bytes are refused, so a stray or hostile peer can make the
//! decoder return `None`, never panic or allocate more than [`MAX_BODY`].

use super::{same_secret, Rejections, Status, IO_TIMEOUT, MAGIC, REQUEST_LEN, VERSION};
use crate::error::{Error, ErrorKind, Result};
use crate::lock;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Message type of a settings request.
pub const GET_SETTINGS: u16 = 2;
/// magic, version, status, body length.
pub const REPLY_HEADER_LEN: usize = 4 + 2 + 2 + 2;
/// Largest body a reply may carry.
pub const MAX_BODY: usize = 4096;
/// Most settings in one body.
pub const MAX_ENTRIES: usize = 64;
/// Longest setting name.
pub const MAX_NAME: usize = 64;
/// Longest value (longer ones are cut by [`encode_body`]).
pub const MAX_VALUE: usize = 512;
/// Version of the body layout.
pub const BODY_VERSION: u8 = 1;

/// Settings as (name, value) pairs, in the order the offering side lists them.
pub type Entries = Vec<(String, String)>;

/// A request for the settings offered under `id`.
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
        super::encode_request(GET_SETTINGS, self.id, self.secret)
    }

    /// Parses a settings request; `None` for anything else (a GET_HANDLE request included).
    pub fn decode(b: &[u8]) -> Option<Request> {
        super::decode_request(b, GET_SETTINGS).map(|(id, secret)| Request { id, secret })
    }
}

/// The body for `entries`: names longer than [`MAX_NAME`] or entries past [`MAX_ENTRIES`] or
/// [`MAX_BODY`] are left out, values longer than [`MAX_VALUE`] are cut (at a character boundary).
pub fn encode_body(entries: &[(String, String)]) -> Vec<u8> {
    let mut b = vec![BODY_VERSION, 0];
    let mut count = 0u8;
    for (name, value) in entries {
        if count as usize == MAX_ENTRIES || name.is_empty() || name.len() > MAX_NAME {
            continue;
        }
        let mut end = value.len().min(MAX_VALUE);
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        let value = &value[..end];
        if b.len() + 1 + name.len() + 2 + value.len() > MAX_BODY {
            break;
        }
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&(value.len() as u16).to_le_bytes());
        b.extend_from_slice(value.as_bytes());
        count += 1;
    }
    b[1] = count;
    b
}

/// Parses a body; `None` unless it is exactly one well-formed body.
pub fn decode_body(b: &[u8]) -> Option<Entries> {
    if b.len() > MAX_BODY || *b.first()? != BODY_VERSION {
        return None;
    }
    let count = *b.get(1)? as usize;
    if count > MAX_ENTRIES {
        return None;
    }
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        *rest = tail;
        Some(head)
    }
    let mut rest = &b[2..];
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let name_len = take(&mut rest, 1)?[0] as usize;
        if name_len == 0 || name_len > MAX_NAME {
            return None;
        }
        let name = std::str::from_utf8(take(&mut rest, name_len)?).ok()?.to_string();
        let v = take(&mut rest, 2)?;
        let value_len = u16::from_le_bytes([v[0], v[1]]) as usize;
        if value_len > MAX_VALUE {
            return None;
        }
        let value = std::str::from_utf8(take(&mut rest, value_len)?).ok()?.to_string();
        out.push((name, value));
    }
    rest.is_empty().then_some(out)
}

/// The reply: header, then the body when `status` is `Ok`.
pub fn encode_reply(status: Status, body: &[u8]) -> Vec<u8> {
    let body = if status == Status::Ok { body } else { &[] };
    let mut b = Vec::with_capacity(REPLY_HEADER_LEN + body.len());
    b.extend_from_slice(&MAGIC.to_le_bytes());
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(status as u16).to_le_bytes());
    b.extend_from_slice(&(body.len().min(MAX_BODY) as u16).to_le_bytes());
    b.extend_from_slice(&body[..body.len().min(MAX_BODY)]);
    b
}

/// The body length a reply header announces; `None` for a header that is not one.
fn header(b: &[u8]) -> Option<(Status, usize)> {
    let b: &[u8; REPLY_HEADER_LEN] = b.get(..REPLY_HEADER_LEN)?.try_into().ok()?;
    if u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != MAGIC || u16::from_le_bytes([b[4], b[5]]) != VERSION {
        return None;
    }
    let status = Status::from_u16(u16::from_le_bytes([b[6], b[7]]))?;
    let len = u16::from_le_bytes([b[8], b[9]]) as usize;
    (len <= MAX_BODY).then_some((status, len))
}

/// Parses a whole reply: the settings, or the status that refused them; `None` for garbage,
/// a truncated reply or trailing bytes.
pub fn decode_reply(b: &[u8]) -> Option<std::result::Result<Entries, Status>> {
    let (status, len) = header(b)?;
    let body = &b[REPLY_HEADER_LEN..];
    if body.len() != len {
        return None;
    }
    match status {
        Status::Ok => decode_body(body).map(Ok),
        s => Some(Err(s)),
    }
}

struct Offer {
    secret: u64,
    body: Arc<Vec<u8>>,
}

/// The settings a service offers, by connection id.
#[derive(Default)]
pub struct Offers {
    offers: Mutex<HashMap<u32, Offer>>,
    /// Settings requests answered or turned away.
    pub requests: AtomicU64,
}

impl Offers {
    /// Offers `body` under `id`, guarded by `secret`.
    pub fn offer(&self, id: u32, secret: u64, body: Arc<Vec<u8>>) {
        lock(&self.offers).insert(id, Offer { secret, body });
    }

    /// Withdraws the offer `id`.
    pub fn withdraw(&self, id: u32) {
        lock(&self.offers).remove(&id);
    }
}

/// Answers one settings request on `stream` (read by the caller).
pub fn answer(stream: &mut TcpStream, req: Request, offers: &Offers, rejected: &Rejections, peer: &str) {
    offers.requests.fetch_add(1, Ordering::Relaxed);
    let found = lock(&offers.offers)
        .get(&req.id)
        .map(|o| (same_secret(o.secret, req.secret), o.body.clone()));
    let status = match found {
        Some((true, body)) => {
            let _ = stream.write_all(&encode_reply(Status::Ok, &body));
            return;
        }
        Some((false, _)) => {
            rejected.denied.fetch_add(1, Ordering::Relaxed);
            Status::Denied
        }
        None => {
            rejected.unknown.fetch_add(1, Ordering::Relaxed);
            Status::Unknown
        }
    };
    log::warn!("control service: turned away a settings request from {peer}: {status:?}");
    let _ = stream.write_all(&encode_reply(status, &[]));
}

/// Asks the service at `addr` for the settings offered under `req` (blocking, each step within
/// `timeout`).
pub fn fetch(addr: SocketAddr, req: Request, timeout: Duration) -> Result<Entries> {
    let what = format!("fetching the peer's settings from its control service at {addr}");
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| Error::io(&what, e))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| Error::io(&what, e))?;
    s.set_write_timeout(Some(timeout)).map_err(|e| Error::io(&what, e))?;
    s.write_all(&req.encode()).map_err(|e| Error::io(&what, e))?;
    let mut buf = vec![0u8; REPLY_HEADER_LEN];
    s.read_exact(&mut buf)
        .map_err(|e| Error::io_as(ErrorKind::ConnectionLost, &what, e))?;
    let Some((_, len)) = header(&buf) else {
        return Err(Error::remote(format!(
            "{what}: the reply is not a tcpxshim control reply"
        )));
    };
    buf.resize(REPLY_HEADER_LEN + len, 0);
    s.read_exact(&mut buf[REPLY_HEADER_LEN..])
        .map_err(|e| Error::io_as(ErrorKind::ConnectionLost, &what, e))?;
    match decode_reply(&buf) {
        Some(Ok(entries)) => Ok(entries),
        Some(Err(Status::Unknown)) => Err(Error::invalid_argument(format!(
            "{what}: it offers no settings under id {} (its listen comm is closed)",
            req.id
        ))),
        Some(Err(s)) => Err(Error::remote(format!("{what}: request refused ({s:?})"))),
        None => Err(Error::remote(format!("{what}: the reply's settings are malformed"))),
    }
}

/// The default time limit of [`fetch`].
pub const FETCH_TIMEOUT: Duration = IO_TIMEOUT;

#[cfg(test)]
mod tests {
    use super::super::Service;
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn entries() -> impl Strategy<Value = Entries> {
        proptest::collection::vec(("[A-Z_]{1,40}", "[ -~]{0,60}"), 0..20)
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_reply(&b);
            let _ = decode_body(&b);
            let _ = Request::decode(&b);
        }

        #[test]
        fn valid_replies_round_trip(e in entries()) {
            let body = encode_body(&e);
            prop_assert_eq!(decode_body(&body), Some(e.clone()));
            prop_assert_eq!(decode_reply(&encode_reply(Status::Ok, &body)), Some(Ok(e)));
        }

        #[test]
        fn truncated_or_extended_replies_are_rejected(e in entries(), cut in any::<prop::sample::Index>(), extra in 1u8..) {
            let reply = encode_reply(Status::Ok, &encode_body(&e));
            let n = cut.index(reply.len());
            prop_assert_eq!(decode_reply(&reply[..n]), None);
            let mut longer = reply.clone();
            longer.push(extra);
            prop_assert_eq!(decode_reply(&longer), None);
        }

        #[test]
        fn a_valid_header_with_a_corrupt_body_is_rejected_or_decodes_within_bounds(
            e in entries(), at in any::<prop::sample::Index>(), byte in any::<u8>()
        ) {
            let mut reply = encode_reply(Status::Ok, &encode_body(&e));
            let i = REPLY_HEADER_LEN + at.index(reply.len() - REPLY_HEADER_LEN);
            reply[i] = byte;
            if let Some(Ok(got)) = decode_reply(&reply) {
                prop_assert!(got.len() <= MAX_ENTRIES);
                prop_assert!(got.iter().all(|(n, v)| !n.is_empty() && n.len() <= MAX_NAME && v.len() <= MAX_VALUE));
            }
        }
    }

    #[test]
    fn long_values_are_cut_and_extra_entries_left_out() {
        let long = "é".repeat(MAX_VALUE);
        let mut e: Entries = vec![("A".into(), long.clone())];
        e.extend((0..100).map(|i| (format!("N{i}"), "1".to_string())));
        let got = decode_body(&encode_body(&e)).unwrap();
        assert_eq!(got.len(), MAX_ENTRIES);
        assert!(
            got[0].1.len() <= MAX_VALUE && long.starts_with(&got[0].1),
            "cut at a character boundary"
        );
        assert_eq!(got[1], ("N0".to_string(), "1".to_string()));
    }

    #[test]
    fn requests_round_trip_and_are_not_handle_requests() {
        let r = Request { id: 9, secret: 77 };
        assert_eq!(Request::decode(&r.encode()), Some(r));
        assert_eq!(super::super::Request::decode(&r.encode()), None, "not a GET_HANDLE");
        let h = super::super::Request { id: 9, secret: 77 }.encode();
        assert_eq!(Request::decode(&h), None, "a GET_HANDLE is not a settings request");
    }

    #[test]
    fn the_service_answers_the_right_secret_only_and_counts_requests() {
        let svc = Service::start(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let e: Entries = vec![("NCCL_TCPXSHIM_TCP_STREAMS".into(), "4".into())];
        let id = svc.offer_settings(None, 5, Arc::new(encode_body(&e)));
        let t = Duration::from_secs(5);
        assert_eq!(fetch(svc.addr(), Request { id, secret: 5 }, t).unwrap(), e);
        let denied = fetch(svc.addr(), Request { id, secret: 6 }, t).unwrap_err();
        assert!(denied.to_string().contains("Denied"), "{denied}");
        svc.withdraw(id);
        let gone = fetch(svc.addr(), Request { id, secret: 5 }, t).unwrap_err();
        assert!(gone.to_string().contains("offers no settings"), "{gone}");
        assert_eq!(svc.settings_requests(), 3);
        // A handle request under a settings-only id finds nothing.
        assert!(super::super::fetch(svc.addr(), super::super::Request { id, secret: 5 }, t).is_err());
        assert_eq!(svc.settings_requests(), 3, "handle requests are not settings requests");
    }
}
