//! Byte layouts of the built-in transport: the listen handle, the per-socket hello and the
//! per-message header, plus the striping plan both sides compute from a header.
//!
//! All integers are little-endian. Every layout starts with its own magic so that a handle or a
//! stream from something else is rejected before any field is trusted.

use crate::error::{Error, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// "TXTC": a listen handle of the built-in TCP transport.
pub const HANDLE_MAGIC: u32 = u32::from_le_bytes(*b"TXTC");
/// "TXHI": the first bytes on every socket of a connection.
pub const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"TXHI");
/// "TXMH": a message header on the control socket.
pub const HEADER_MAGIC: u32 = u32::from_le_bytes(*b"TXMH");
/// Layout version shared by handle, hello and header; bump on any change.
pub const WIRE_VERSION: u16 = 1;

/// Bytes of the listen handle (well under the 88 the shim leaves us).
pub const HANDLE_LEN: usize = 48;
/// Offset of the connect-state slot: connect stores its pending-connection id there.
const STATE_OFFSET: usize = 40;
/// Bytes of a hello.
pub const HELLO_LEN: usize = 32;
/// Bytes of a message header.
pub const HEADER_LEN: usize = 32;

const _: () = assert!(HANDLE_LEN <= crate::stack::handle::INNER_HANDLE_SIZE);

/// Striping chunks are rounded up to this, so chunk boundaries stay page aligned.
const CHUNK_ALIGN: usize = 4096;

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

/// The decoded listen handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenHandle {
    /// Where the listener accepts.
    pub addr: SocketAddr,
    /// Data sockets per connection the listener expects.
    pub streams: u16,
    /// Inline threshold of the listening rank.
    pub inline_max: u32,
    /// Random value identifying the listener; every hello repeats it.
    pub token: u64,
}

impl ListenHandle {
    /// Writes the handle, with a zeroed connect-state slot, into the first [`HANDLE_LEN`] bytes.
    pub fn write(&self, out: &mut [u8]) -> Result<()> {
        if out.len() < HANDLE_LEN {
            return Err(Error::invalid_argument(format!(
                "listen: handle buffer is {} bytes, the built-in TCP transport needs {HANDLE_LEN}",
                out.len()
            )));
        }
        let h = &mut out[..HANDLE_LEN];
        h.fill(0);
        h[0..4].copy_from_slice(&HANDLE_MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&WIRE_VERSION.to_le_bytes());
        let family: u16 = match self.addr.ip() {
            IpAddr::V4(a) => {
                h[8..12].copy_from_slice(&a.octets());
                4
            }
            IpAddr::V6(a) => {
                h[8..24].copy_from_slice(&a.octets());
                6
            }
        };
        h[6..8].copy_from_slice(&family.to_le_bytes());
        h[24..26].copy_from_slice(&self.addr.port().to_le_bytes());
        h[26..28].copy_from_slice(&self.streams.to_le_bytes());
        h[28..32].copy_from_slice(&self.inline_max.to_le_bytes());
        h[32..40].copy_from_slice(&self.token.to_le_bytes());
        Ok(())
    }

    /// Parses a handle received from a peer, checking everything that can be checked.
    pub fn read(h: &[u8]) -> Result<ListenHandle> {
        if h.len() < HANDLE_LEN {
            return Err(Error::invalid_argument(format!(
                "connect: handle is {} bytes, the built-in TCP transport needs {HANDLE_LEN}",
                h.len()
            )));
        }
        let magic = u32_at(h, 0);
        if magic != HANDLE_MAGIC {
            return Err(Error::invalid_argument(format!(
                "connect: handle was not made by the built-in TCP transport (magic {magic:#010x}, expected \
                 {HANDLE_MAGIC:#010x}); every rank must use the same NCCL_TCPXSHIM_PLUGIN"
            )));
        }
        let version = u16_at(h, 4);
        if version != WIRE_VERSION {
            return Err(Error::invalid_argument(format!(
                "connect: handle has wire version {version}, this build speaks {WIRE_VERSION}; run the same \
                 tcpxshim version on every rank"
            )));
        }
        let ip = match u16_at(h, 6) {
            4 if h[12..24].iter().any(|&b| b != 0) => {
                return Err(Error::invalid_argument(
                    "connect: handle has an IPv4 address with bytes set past it (corrupted handle)".to_string(),
                ))
            }
            4 => IpAddr::V4(Ipv4Addr::new(h[8], h[9], h[10], h[11])),
            6 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(&h[8..24]);
                IpAddr::V6(Ipv6Addr::from(o))
            }
            f => {
                return Err(Error::invalid_argument(format!(
                    "connect: handle has unknown address family {f} (corrupted handle)"
                )))
            }
        };
        let port = u16_at(h, 24);
        if port == 0 {
            return Err(Error::invalid_argument(
                "connect: handle has port 0 (corrupted handle)".to_string(),
            ));
        }
        Ok(ListenHandle {
            addr: SocketAddr::new(ip, port),
            streams: u16_at(h, 26),
            inline_max: u32_at(h, 28),
            token: u64_at(h, 32),
        })
    }
}

/// The pending-connection id stored in a handle by `connect` (0: none yet).
pub fn connect_state(h: &[u8]) -> u64 {
    if h.len() < HANDLE_LEN {
        return 0;
    }
    u64_at(h, STATE_OFFSET)
}

/// Stores a pending-connection id into a handle (0 clears it).
pub fn set_connect_state(h: &mut [u8], id: u64) {
    if h.len() >= HANDLE_LEN {
        h[STATE_OFFSET..STATE_OFFSET + 8].copy_from_slice(&id.to_le_bytes());
    }
}

/// The first bytes on each socket of a connection, so the acceptor can group sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// 0 for the control socket, 1..=streams for data sockets.
    pub index: u16,
    /// Data sockets of the connection.
    pub streams: u16,
    /// Inline threshold of the connecting rank.
    pub inline_max: u32,
    /// Random value shared by all sockets of one connection.
    pub nonce: u64,
    /// The listener's token from the handle.
    pub token: u64,
}

impl Hello {
    /// Encodes the hello.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&WIRE_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.index.to_le_bytes());
        b[8..10].copy_from_slice(&self.streams.to_le_bytes());
        b[12..16].copy_from_slice(&self.inline_max.to_le_bytes());
        b[16..24].copy_from_slice(&self.nonce.to_le_bytes());
        b[24..32].copy_from_slice(&self.token.to_le_bytes());
        b
    }

    /// Decodes a hello; `None` when it is not one of ours (a stray connection), the unused
    /// bytes 10 and 11 included.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Option<Hello> {
        if u32_at(b, 0) != HELLO_MAGIC || u16_at(b, 4) != WIRE_VERSION || u16_at(b, 10) != 0 {
            return None;
        }
        Some(Hello {
            index: u16_at(b, 6),
            streams: u16_at(b, 8),
            inline_max: u32_at(b, 12),
            nonce: u64_at(b, 16),
            token: u64_at(b, 24),
        })
    }
}

/// Header flag: the payload follows the header on the control socket.
pub const FLAG_INLINE: u32 = 1;

/// The header that precedes every message on the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Position of the message on its connection, from 0.
    pub seq: u64,
    /// Payload bytes.
    pub size: u64,
    /// Striping chunk in bytes (0 for inline messages).
    pub chunk: u32,
    /// [`FLAG_INLINE`] or 0.
    pub flags: u32,
}

impl Header {
    /// Encodes the header; the last word is a check over the others.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..28].copy_from_slice(&self.chunk.to_le_bytes());
        let check = check_word(&b);
        b[28..32].copy_from_slice(&check.to_le_bytes());
        b
    }

    /// Decodes a header, `None` when the magic or check word is wrong (a corrupted stream).
    pub fn decode(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN || u32_at(b, 0) != HEADER_MAGIC || u32_at(b, 28) != check_word(b) {
            return None;
        }
        Some(Header {
            flags: u32_at(b, 4),
            seq: u64_at(b, 8),
            size: u64_at(b, 16),
            chunk: u32_at(b, 24),
        })
    }
}

/// A cheap mix of the first 28 header bytes, enough to catch a desynchronised stream.
fn check_word(b: &[u8]) -> u32 {
    let mut x: u32 = 0x9e37_79b9;
    for i in (0..28).step_by(4) {
        x = (x ^ u32_at(b, i)).rotate_left(5).wrapping_mul(0x0100_0193);
    }
    x
}

/// The striping chunk for a message: at least `min_chunk`, at most one chunk per stream.
pub fn chunk_size(size: usize, streams: usize, min_chunk: usize) -> usize {
    let per_stream = size.div_ceil(streams.max(1));
    let chunk = per_stream.max(min_chunk).max(1);
    // Rounding up keeps chunks page aligned and can only reduce the chunk count.
    chunk.div_ceil(CHUNK_ALIGN).saturating_mul(CHUNK_ALIGN)
}

/// The pieces of a striped message: (stream, offset, length), one per stream at most.
/// The first chunk goes to stream `seq % streams`, so consecutive messages spread over streams.
pub fn chunks(seq: u64, size: usize, chunk: usize, streams: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let n = if chunk == 0 { 0 } else { size.div_ceil(chunk) };
    let start = (seq % streams.max(1) as u64) as usize;
    (0..n).map(move |i| {
        let off = i * chunk;
        ((start + i) % streams, off, chunk.min(size - off))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn handle_round_trips_v4_and_v6_and_keeps_state_slot() {
        for addr in ["127.0.0.1:4242", "[::1]:4243"] {
            let lh = ListenHandle {
                addr: addr.parse().unwrap(),
                streams: 4,
                inline_max: 16384,
                token: 0x1234_5678_9abc_def0,
            };
            let mut buf = [0xffu8; 88];
            lh.write(&mut buf).unwrap();
            assert_eq!(connect_state(&buf), 0, "state slot zeroed by listen");
            assert_eq!(ListenHandle::read(&buf).unwrap(), lh);
            set_connect_state(&mut buf, 77);
            assert_eq!(connect_state(&buf), 77);
            assert_eq!(
                ListenHandle::read(&buf).unwrap(),
                lh,
                "state slot does not disturb the rest"
            );
            assert_eq!(
                &buf[HANDLE_LEN..],
                &[0xffu8; 88 - HANDLE_LEN][..],
                "nothing past HANDLE_LEN written"
            );
        }
    }

    #[test]
    fn garbage_handles_are_rejected() {
        let err = ListenHandle::read(&[0x55u8; 88]).unwrap_err();
        assert!(err.kind() == ErrorKind::InvalidArgument, "{err}");
        assert!(ListenHandle::read(&[0u8; 10]).is_err());
        let mut buf = [0u8; 88];
        ListenHandle {
            addr: "127.0.0.1:1".parse().unwrap(),
            streams: 1,
            inline_max: 0,
            token: 1,
        }
        .write(&mut buf)
        .unwrap();
        buf[6] = 9;
        assert!(ListenHandle::read(&buf).unwrap_err().to_string().contains("family"));
    }

    #[test]
    fn header_and_hello_round_trip_and_detect_corruption() {
        let h = Header {
            seq: 5,
            size: (1 << 31) - 1,
            chunk: 65536,
            flags: 0,
        };
        let mut b = h.encode();
        assert_eq!(Header::decode(&b), Some(h));
        b[17] ^= 1;
        assert_eq!(Header::decode(&b), None);
        let hi = Hello {
            index: 3,
            streams: 4,
            inline_max: 100,
            nonce: 9,
            token: 10,
        };
        assert_eq!(Hello::decode(&hi.encode()), Some(hi));
        assert_eq!(Hello::decode(&[0u8; HELLO_LEN]), None);
    }

    /// Found by the fuzz module: bytes a decoder skipped, so two encodings meant one value.
    #[test]
    fn unused_bytes_must_be_zero() {
        let hi = Hello {
            index: 0,
            streams: 1,
            inline_max: 0,
            nonce: 1,
            token: 2,
        };
        let mut b = hi.encode();
        b[10] = 1;
        assert_eq!(Hello::decode(&b), None, "padding of the hello");
        let mut h = [0u8; HANDLE_LEN];
        ListenHandle {
            addr: "127.0.0.1:9".parse().unwrap(),
            streams: 1,
            inline_max: 0,
            token: 1,
        }
        .write(&mut h)
        .unwrap();
        h[12] = 1;
        let err = ListenHandle::read(&h).unwrap_err().to_string();
        assert!(err.contains("IPv4 address with bytes set past it"), "{err}");
    }

    #[test]
    fn chunks_cover_the_message_once_with_at_most_one_per_stream() {
        for &(size, streams, min) in &[
            (1usize, 4usize, 65536usize),
            (65537, 4, 65536),
            (1 << 20, 4, 65536),
            ((1 << 20) + 7, 3, 4096),
            ((1 << 31) - 1, 1, 65536),
            ((1 << 31) - 1, 64, 4096),
        ] {
            let c = chunk_size(size, streams, min);
            for seq in 0..5u64 {
                let mut covered = 0;
                let mut used = vec![false; streams];
                for (s, off, len) in chunks(seq, size, c, streams) {
                    assert_eq!(off, covered);
                    assert!(len > 0 && !used[s], "size {size}: stream {s} used twice");
                    used[s] = true;
                    covered += len;
                }
                assert_eq!(covered, size);
            }
        }
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzzing::{check_mutations, config};
    use proptest::prelude::*;

    /// The bytes `read` accepted, written again (with the connect-state slot they carried).
    fn handle_canon(b: &[u8]) -> Option<Vec<u8>> {
        let lh = ListenHandle::read(b).ok()?;
        let mut out = vec![0u8; HANDLE_LEN];
        lh.write(&mut out).expect("48 bytes suffice");
        set_connect_state(&mut out, connect_state(b));
        Some(out)
    }

    fn any_handle() -> impl Strategy<Value = ListenHandle> {
        (any::<SocketAddr>(), 1u16.., any::<u16>(), any::<u32>(), any::<u64>()).prop_map(
            |(addr, port, streams, inline_max, token)| ListenHandle {
                addr: SocketAddr::new(addr.ip(), port),
                streams,
                inline_max,
                token,
            },
        )
    }

    fn any_hello() -> impl Strategy<Value = Hello> {
        (any::<u16>(), any::<u16>(), any::<u32>(), any::<u64>(), any::<u64>()).prop_map(
            |(index, streams, inline_max, nonce, token)| Hello {
                index,
                streams,
                inline_max,
                nonce,
                token,
            },
        )
    }

    fn any_header() -> impl Strategy<Value = Header> {
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(seq, size, chunk, flags)| Header {
            seq,
            size,
            chunk,
            flags,
        })
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn listen_handle_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Some(again) = handle_canon(&b) {
                prop_assert_eq!(&again[..], &b[..HANDLE_LEN]);
            }
        }

        #[test]
        fn listen_handle_with_valid_magic_and_version(
            family in prop_oneof![Just(4u16), Just(6u16), any::<u16>()],
            rest in proptest::collection::vec(any::<u8>(), HANDLE_LEN - 8),
        ) {
            // Past the magic, so that the field checks are what the bytes meet.
            let mut b = HANDLE_MAGIC.to_le_bytes().to_vec();
            b.extend_from_slice(&WIRE_VERSION.to_le_bytes());
            b.extend_from_slice(&family.to_le_bytes());
            b.extend_from_slice(&rest);
            if let Some(again) = handle_canon(&b) {
                prop_assert_eq!(again, b);
            }
        }

        #[test]
        fn listen_handle_mutations(lh in any_handle(), state in any::<u64>(), masks in proptest::collection::vec(1u8.., 1..64)) {
            let mut b = vec![0u8; HANDLE_LEN];
            lh.write(&mut b).unwrap();
            set_connect_state(&mut b, state);
            prop_assert_eq!(ListenHandle::read(&b).unwrap(), lh);
            prop_assert_eq!(connect_state(&b), state);
            check_mutations(&b, &masks, true, handle_canon)?;
        }

        #[test]
        fn hello_arbitrary_bytes(b in any::<[u8; HELLO_LEN]>()) {
            if let Some(h) = Hello::decode(&b) {
                prop_assert_eq!(h.encode(), b);
            }
        }

        #[test]
        fn hello_mutations(h in any_hello(), masks in proptest::collection::vec(1u8.., 1..64)) {
            prop_assert_eq!(Hello::decode(&h.encode()), Some(h));
            check_mutations(&h.encode(), &masks, false, |b| {
                Hello::decode(b.try_into().ok()?).map(|h| h.encode().to_vec())
            })?;
        }

        #[test]
        fn header_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Some(h) = Header::decode(&b) {
                prop_assert_eq!(&h.encode()[..], &b[..HEADER_LEN]);
            }
        }

        #[test]
        fn header_mutations(h in any_header(), masks in proptest::collection::vec(1u8.., 1..64)) {
            prop_assert_eq!(Header::decode(&h.encode()), Some(h));
            check_mutations(&h.encode(), &masks, true, |b| Header::decode(b).map(|h| h.encode().to_vec()))?;
        }

        /// The striping plan of any header the receiver accepts (its checks: at most 2^31-1
        /// bytes, a non-zero chunk, no more chunks than streams) covers the message exactly once,
        /// in bounds, one chunk per stream at most.
        #[test]
        fn striping_plan_of_accepted_headers(
            seq in any::<u64>(),
            size in 1usize..=i32::MAX as usize,
            streams in 1usize..=64,
            extra in 0usize..=i32::MAX as usize,
        ) {
            let chunk = size.div_ceil(streams) + extra;
            prop_assert!(chunk <= u32::MAX as usize && size.div_ceil(chunk) <= streams);
            let mut used = vec![false; streams];
            let mut covered = 0usize;
            for (s, off, len) in chunks(seq, size, chunk, streams) {
                prop_assert!(s < streams && !used[s], "stream {} twice or out of range", s);
                used[s] = true;
                prop_assert_eq!(off, covered);
                prop_assert!(len > 0 && off + len <= size);
                covered += len;
            }
            prop_assert_eq!(covered, size);
        }
    }
}
