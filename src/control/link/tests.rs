use super::*;
use proptest::prelude::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream as StdStream};

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const SECRET: u64 = 0x5eed_1234_abcd_0042;

/// Short timers, so the tests of timeouts take a second or two.
fn cfg() -> LinkConfig {
    LinkConfig {
        peer_timeout: Duration::from_secs(1),
        attach_timeout: Duration::from_millis(400),
        ..LinkConfig::default()
    }
}

/// Polls `f` every few milliseconds until it holds or `limit` passes.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    f()
}

fn is_up(l: &Link) -> bool {
    matches!(l.state(), LinkState::Up)
}

fn gone(l: &Link) -> Option<Error> {
    match l.state() {
        LinkState::Gone(e) => Some(e),
        _ => None,
    }
}

/// A receiving hub with a listener, a sending hub, and a link between them, up.
fn pair(cfg: LinkConfig, conn_id: u32) -> (Hub, Link, Hub, Link) {
    let rx_hub = Hub::start(cfg.clone(), Some(LO)).unwrap();
    let tx_hub = Hub::start(cfg, None).unwrap();
    let rx = rx_hub.expect(conn_id, SECRET).unwrap();
    let tx = tx_hub.connect(rx_hub.listen_addr().unwrap(), conn_id, SECRET).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || is_up(&tx) && is_up(&rx)),
        "link up"
    );
    (rx_hub, rx, tx_hub, tx)
}

/// Receives `n` messages (bounded by `limit`).
fn recv_n(l: &Link, n: usize, limit: Duration) -> Vec<(u16, Vec<u8>)> {
    let mut got = Vec::new();
    wait_until(limit, || {
        while let Some(m) = l.try_recv() {
            got.push(m);
        }
        got.len() >= n
    });
    got
}

fn numbered(i: u32) -> Vec<u8> {
    format!("message {i}").into_bytes()
}

/// Sends `n` numbered messages of type 9, waiting (bounded) whenever the queue is full.
fn send_numbered(l: &Link, from: u32, to: u32) {
    for i in from..to {
        let ok = wait_until(Duration::from_secs(5), || l.send(9, &numbered(i)).is_ok());
        assert!(ok, "message {i} queued: {:?}", l.send(9, &numbered(i)));
    }
}

fn assert_numbered(got: &[(u16, Vec<u8>)], n: u32) {
    assert_eq!(got.len(), n as usize, "exactly {n} messages");
    for (i, (ty, body)) in got.iter().enumerate() {
        assert_eq!(
            (*ty, body.as_slice()),
            (9, numbered(i as u32).as_slice()),
            "message {i} in order"
        );
    }
}

fn key(last_counter: u64) -> impl Fn(u32) -> Option<Key> {
    move |c| {
        (c == 7).then_some(Key {
            secret: SECRET,
            dir: Dir::ToListener,
            last_counter,
        })
    }
}

fn data(counter: u64, body: Vec<u8>) -> Frame {
    Frame {
        kind: Kind::Data,
        conn_id: 7,
        counter,
        seq: 1,
        ack: 0,
        msg_type: 3,
        body,
    }
}

fn attach(conn_id: u32, counter: u64) -> Frame {
    Frame {
        kind: Kind::Attach,
        conn_id,
        counter,
        seq: 0,
        ack: 0,
        msg_type: 0,
        body: Vec::new(),
    }
}

#[test]
fn frames_round_trip_and_every_kind_of_bad_frame_is_named() {
    let f = data(5, b"hello".to_vec());
    let mut wire = f.encode(SECRET, Dir::ToListener);
    wire.extend_from_slice(b"next");
    assert_eq!(Frame::decode(&wire, key(4)), Ok((f.clone(), wire.len() - 4)));
    let wire = f.encode(SECRET, Dir::ToListener);
    assert_eq!(Frame::decode(&wire, key(5)), Err(Reject::Replayed));
    assert_eq!(Frame::decode(&wire[..wire.len() - 1], key(0)), Err(Reject::Truncated));
    assert_eq!(Frame::decode(&wire[..3], key(0)), Err(Reject::Truncated));
    assert_eq!(Frame::decode(b"TXCT", key(0)), Err(Reject::BadMagic));
    let mut v = wire.clone();
    v[4] = 2;
    assert_eq!(Frame::decode(&v, key(0)), Err(Reject::BadVersion));
    assert_eq!(Frame::decode(&wire, |_| None), Err(Reject::UnknownConn));
    let other = |c| {
        key(0)(c).map(|k| Key {
            secret: SECRET + 1,
            ..k
        })
    };
    assert_eq!(Frame::decode(&wire, other), Err(Reject::BadMac));
    let reflected = |c| {
        key(0)(c).map(|k| Key {
            dir: Dir::ToConnector,
            ..k
        })
    };
    assert_eq!(Frame::decode(&wire, reflected), Err(Reject::BadMac));
    let mut big = wire.clone();
    big[12..16].copy_from_slice(&(MAX_BODY as u32 + 1).to_le_bytes());
    assert_eq!(Frame::decode(&big, key(0)), Err(Reject::Oversized));
    let full = data(1, vec![1; MAX_BODY]).encode(SECRET, Dir::ToListener);
    assert_eq!(full.len(), MAX_FRAME);
    assert!(Frame::decode(&full, key(0)).is_ok());
    // Authentic but ill-formed: a heartbeat with a body, a data frame without a sequence number.
    let hb = Frame {
        kind: Kind::Heartbeat,
        seq: 0,
        msg_type: 0,
        ..data(1, vec![1])
    };
    assert_eq!(
        Frame::decode(&hb.encode(SECRET, Dir::ToListener), key(0)),
        Err(Reject::Malformed)
    );
    let noseq = Frame {
        seq: 0,
        ..data(1, vec![])
    };
    assert_eq!(
        Frame::decode(&noseq.encode(SECRET, Dir::ToListener), key(0)),
        Err(Reject::Malformed)
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), magic in any::<bool>()) {
        let mut b = bytes;
        if magic && b.len() >= 6 {
            b[..4].copy_from_slice(&MAGIC.to_le_bytes());
            b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        }
        let _ = Frame::decode(&b, key(0));
    }

    #[test]
    fn valid_frames_round_trip_and_any_changed_byte_is_rejected(
        kind in 0usize..6,
        counter in 1u64..u64::MAX,
        seq in 1u64..u64::MAX,
        ack in any::<u64>(),
        msg_type in any::<u16>(),
        body in proptest::collection::vec(any::<u8>(), 0..300),
        at in any::<proptest::sample::Index>(),
        flip in 1u8..=255,
    ) {
        use Kind::*;
        let kind = [Attach, AttachOk, Data, Ack, Heartbeat, Close][kind];
        let data = kind == Data;
        let f = Frame {
            kind,
            conn_id: 7,
            counter,
            seq: if data { seq } else { 0 },
            ack,
            msg_type: if data { msg_type } else { 0 },
            body: if data { body } else { Vec::new() },
        };
        let wire = f.encode(SECRET, Dir::ToListener);
        prop_assert_eq!(Frame::decode(&wire, key(counter - 1)), Ok((f.clone(), wire.len())));
        prop_assert_eq!(Frame::decode(&wire, key(counter)), Err(Reject::Replayed));
        let mut bad = wire.clone();
        bad[at.index(wire.len())] ^= flip;
        prop_assert!(Frame::decode(&bad, key(counter - 1)).is_err());
    }
}

#[test]
fn messages_flow_both_ways_in_order() {
    let (_rh, rx, _th, tx) = pair(cfg(), 7);
    send_numbered(&tx, 0, 200);
    send_numbered(&rx, 0, 150);
    assert_numbered(&recv_n(&rx, 200, Duration::from_secs(10)), 200);
    assert_numbered(&recv_n(&tx, 150, Duration::from_secs(10)), 150);
    assert!(rx.try_recv().is_none() && tx.try_recv().is_none());
    assert_eq!((tx.attaches(), rx.attaches()), (1, 1));
    let big = vec![0xab; MAX_BODY];
    tx.send(1, &big).unwrap();
    assert_eq!(recv_n(&rx, 1, Duration::from_secs(5)), vec![(1, big)]);
    let e = tx.send(1, &[0; MAX_BODY + 1]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
}

#[test]
fn lazy_messages_go_out_unwoken_in_order_and_a_queued_one_is_replaced() {
    let (_rh, rx, _th, tx) = pair(cfg(), 8);
    // Nothing wakes the link's thread: its next round sends it.
    tx.send_lazy(5, b"alone").unwrap();
    assert_eq!(recv_n(&rx, 1, Duration::from_secs(2)), vec![(5, b"alone".to_vec())]);
    // Replaced while queued, never reordered around other messages.
    let mut sent = 0;
    for round in 0..20u32 {
        for i in 0..50u32 {
            tx.send_lazy(5, format!("ack {round} {i}").as_bytes()).unwrap();
        }
        tx.send(9, &numbered(round)).unwrap();
        sent += 1;
    }
    tx.send_lazy(5, b"last").unwrap();
    let mut got = Vec::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            while let Some(m) = rx.try_recv() {
                got.push(m);
            }
            got.last().is_some_and(|m| m.1 == b"last")
        }),
        "the last lazy message arrives: {got:?}"
    );
    let numbered_got: Vec<_> = got.iter().filter(|m| m.0 == 9).cloned().collect();
    assert_numbered(&numbered_got, sent);
    // Each round's lazy messages arrive before its numbered one, in order, ending with the last.
    let mut round = 0u32;
    let mut last_lazy: Option<(u32, u32)> = None;
    for (ty, body) in &got {
        if *ty == 9 {
            assert_eq!(last_lazy, Some((round, 49)), "round {round} ends with its last ack");
            round += 1;
            continue;
        }
        let text = String::from_utf8(body.clone()).unwrap();
        if text == "last" {
            continue;
        }
        let mut w = text.split(' ').skip(1).map(|x| x.parse::<u32>().unwrap());
        let (r, i) = (w.next().unwrap(), w.next().unwrap());
        assert_eq!(r, round, "{text} in round {round}");
        assert!(last_lazy.is_none_or(|l| (r, i) > l), "{text} after {last_lazy:?}");
        last_lazy = Some((r, i));
    }
    assert!(
        got.len() < 20 * 50,
        "replaced messages were not all sent: {} messages",
        got.len()
    );
}

#[test]
fn connections_shut_down_mid_stream_lose_and_repeat_nothing() {
    let (_rh, rx, _th, tx) = pair(cfg(), 7);
    // Sender to receiver, the sender's socket shut down after 300 messages; back the other way,
    // the receiver's shut down after 600.
    // (A break happens in the thread's next round, while the senders go on writing.)
    send_numbered(&tx, 0, 300);
    tx.break_socket();
    send_numbered(&tx, 300, 1000);
    assert!(wait_until(Duration::from_secs(10), || tx.attaches() >= 2 && is_up(&rx)));
    send_numbered(&rx, 0, 600);
    let first = recv_n(&tx, 600, Duration::from_secs(20));
    rx.break_socket();
    send_numbered(&rx, 600, 1000);
    assert_numbered(&recv_n(&rx, 1000, Duration::from_secs(20)), 1000);
    let mut back = first;
    back.extend(recv_n(&tx, 400, Duration::from_secs(20)));
    assert_numbered(&back, 1000);
    assert!(
        wait_until(Duration::from_secs(10), || tx.attaches() >= 3
            && is_up(&tx)
            && is_up(&rx)),
        "two reconnects, {} attaches",
        tx.attaches()
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(rx.try_recv().is_none() && tx.try_recv().is_none(), "nothing twice");
}

/// Relays one client to `to`, recording what the client sends.
fn recording_relay(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let l = std::net::TcpListener::bind((LO, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    std::thread::spawn(move || {
        let (client, _) = l.accept().unwrap();
        let server = StdStream::connect(to).unwrap();
        let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
            let _ = c2.shutdown(Shutdown::Both);
        });
        let (mut c, mut s) = (client, server);
        let mut buf = [0u8; 4096];
        // Ends when either side closes.
        while let Ok(n @ 1..) = c.read(&mut buf) {
            lock(&rec).extend_from_slice(&buf[..n]);
            if s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s.shutdown(Shutdown::Both);
    });
    (addr, seen)
}

/// Sends `bytes` to `addr` as a client of its own and checks the hub closes the connection.
fn send_and_expect_close(addr: SocketAddr, bytes: &[u8], half_close: bool) {
    let mut s = StdStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    if half_close {
        s.shutdown(Shutdown::Write).unwrap();
    }
    let mut b = [0u8; 256];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == IoKind::ConnectionReset => {}
        other => panic!("expected the hub to close the connection, got {other:?}"),
    }
}

#[test]
fn forged_replayed_truncated_oversized_and_unauthenticated_clients_are_rejected_and_counted() {
    let rx_hub = Hub::start(cfg(), Some(LO)).unwrap();
    let tx_hub = Hub::start(cfg(), None).unwrap();
    let addr = rx_hub.listen_addr().unwrap();
    let rx = rx_hub.expect(7, SECRET).unwrap();
    let (relay, seen) = recording_relay(addr);
    let tx = tx_hub.connect(relay, 7, SECRET).unwrap();
    assert!(wait_until(Duration::from_secs(5), || is_up(&tx) && is_up(&rx)));
    send_numbered(&tx, 0, 10);
    assert_numbered(&recv_n(&rx, 10, Duration::from_secs(5)), 10);
    let captured = lock(&seen).clone();
    assert!(captured.len() > HEADER_LEN + MAC_LEN, "the relay saw the attach");

    let count = |k| rx_hub.rejections().get(k);
    let expect = |k: Reject, n: u64| {
        assert!(
            wait_until(Duration::from_secs(5), || count(k) == n),
            "{k:?}: {} (all: {:?})",
            count(k),
            rx_hub.rejections()
        );
    };
    // The sender's own bytes, played again on a connection of their own.
    send_and_expect_close(addr, &captured, false);
    expect(Reject::Replayed, 1);
    // Its attach with one bit of the MAC changed.
    let mut forged = captured[..HEADER_LEN + MAC_LEN].to_vec();
    forged[HEADER_LEN] ^= 1;
    send_and_expect_close(addr, &forged, false);
    expect(Reject::BadMac, 1);
    // A fresh attach made with the wrong secret.
    send_and_expect_close(addr, &attach(7, 1 << 40).encode(SECRET ^ 1, Dir::ToListener), false);
    expect(Reject::BadMac, 2);
    // Under an id nobody expects.
    send_and_expect_close(addr, &attach(8, 1 << 40).encode(SECRET, Dir::ToListener), false);
    expect(Reject::UnknownConn, 1);
    // A valid frame, but not an attach, as the first frame.
    let d = data(1 << 40, b"x".to_vec()).encode(SECRET, Dir::ToListener);
    send_and_expect_close(addr, &d, false);
    expect(Reject::NotAttached, 1);
    // Half an attach, then the client stops sending.
    send_and_expect_close(addr, &captured[..20], true);
    expect(Reject::Truncated, 1);
    // A length over the cap.
    let mut big = attach(7, 1 << 40).encode(SECRET, Dir::ToListener);
    big[12..16].copy_from_slice(&(1u32 << 20).to_le_bytes());
    send_and_expect_close(addr, &big[..HEADER_LEN], false);
    expect(Reject::Oversized, 1);
    // Garbage, and another version.
    send_and_expect_close(addr, b"GET / HTTP/1.0\r\n\r\n", false);
    expect(Reject::BadMagic, 1);
    let mut v2 = captured[..HEADER_LEN + MAC_LEN].to_vec();
    v2[4] = 2;
    send_and_expect_close(addr, &v2, false);
    expect(Reject::BadVersion, 1);
    // A client that says nothing is dropped after the attach timeout.
    send_and_expect_close(addr, &[], false);
    expect(Reject::Slow, 1);
    assert_eq!(rx_hub.rejections().total(), 10, "{:?}", rx_hub.rejections());

    // The link was not disturbed: same attach, messages still flow both ways.
    assert!(is_up(&tx) && is_up(&rx));
    assert_eq!((tx.attaches(), rx.attaches()), (1, 1));
    send_numbered(&tx, 10, 20);
    send_numbered(&rx, 0, 5);
    assert_eq!(recv_n(&rx, 10, Duration::from_secs(5)).len(), 10);
    assert_numbered(&recv_n(&tx, 5, Duration::from_secs(5)), 5);
}

#[test]
fn a_link_with_the_wrong_secret_is_refused_and_gone() {
    let rx_hub = Hub::start(cfg(), Some(LO)).unwrap();
    let tx_hub = Hub::start(cfg(), None).unwrap();
    let _rx = rx_hub.expect(7, SECRET).unwrap();
    let tx = tx_hub.connect(rx_hub.listen_addr().unwrap(), 7, SECRET ^ 0xff).unwrap();
    assert!(wait_until(Duration::from_secs(10), || gone(&tx).is_some()));
    let e = gone(&tx).unwrap();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(
        e.to_string().contains(&rx_hub.listen_addr().unwrap().to_string()),
        "{e}"
    );
    assert_eq!(rx_hub.rejections().get(Reject::BadMac), u64::from(cfg().refusals));
    assert!(tx.send(1, b"x").is_err(), "a gone link takes no messages");
}

#[test]
fn a_peer_process_that_exits_is_gone_fast_and_named() {
    let (rh, rx, th, tx) = pair(cfg(), 7);
    let raddr = rh.listen_addr().unwrap().to_string();
    let t0 = Instant::now();
    rh.vanish();
    assert!(
        wait_until(Duration::from_secs(5), || gone(&tx).is_some()),
        "sender sees it gone"
    );
    let e = gone(&tx).unwrap();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(
        e.to_string().contains(&raddr) && e.to_string().contains("NCCL_TCPXSHIM_PEER_TIMEOUT"),
        "{e}"
    );
    assert!(
        t0.elapsed() < cfg().peer_timeout + Duration::from_secs(2),
        "{:?}",
        t0.elapsed()
    );
    drop((rx, th));
}

#[test]
fn a_sender_that_vanishes_is_gone_on_the_receiver_after_the_peer_timeout() {
    let (rh, rx, th, tx) = pair(cfg(), 7);
    let t0 = Instant::now();
    th.vanish();
    assert!(wait_until(cfg().peer_timeout + Duration::from_secs(3), || gone(&rx).is_some()));
    let e = gone(&rx).unwrap();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(
        e.to_string().contains("127.0.0.1:") && e.to_string().contains("NCCL_TCPXSHIM_PEER_TIMEOUT"),
        "{e}"
    );
    assert!(t0.elapsed() < cfg().peer_timeout + Duration::from_secs(3));
    drop((rh, tx));
}

#[test]
fn a_silent_peer_is_gone_within_the_peer_timeout_and_an_idle_link_stays_up() {
    // An idle real link outlives several peer timeouts: heartbeats.
    let (_rh, rx, _th, tx) = pair(cfg(), 7);
    std::thread::sleep(cfg().peer_timeout * 3);
    assert!(
        is_up(&tx) && is_up(&rx),
        "idle link up: {:?} {:?}",
        tx.state(),
        rx.state()
    );

    // A peer that attaches, then says nothing more (its socket stays open).
    let l = std::net::TcpListener::bind((LO, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let hub = Hub::start(cfg(), None).unwrap();
    let link = hub.connect(addr, 7, SECRET).unwrap();
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = vec![0u8; HEADER_LEN + MAC_LEN];
    s.read_exact(&mut b).unwrap();
    let key = |_| {
        Some(Key {
            secret: SECRET,
            dir: Dir::ToListener,
            last_counter: 0,
        })
    };
    let (f, _) = Frame::decode(&b, key).unwrap();
    assert_eq!((f.kind, f.conn_id), (Kind::Attach, 7));
    let ok = Frame {
        kind: Kind::AttachOk,
        ..attach(7, 1)
    };
    s.write_all(&ok.encode(SECRET, Dir::ToConnector)).unwrap();
    assert!(wait_until(Duration::from_secs(5), || is_up(&link)));
    let t0 = Instant::now();
    assert!(wait_until(cfg().peer_timeout + Duration::from_secs(3), || gone(&link).is_some()));
    let e = gone(&link).unwrap();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
    assert!(t0.elapsed() < cfg().peer_timeout + Duration::from_secs(3));
}

#[test]
fn senders_write_messages_themselves_and_wake_a_sleeping_thread_only_when_they_cannot() {
    for spin in [Duration::ZERO, Duration::from_secs(2)] {
        let (_rh, rx, th, tx) = pair(LinkConfig { spin, ..cfg() }, 9);
        // Sleeping threads on both sides first (no traffic for longer than any spin would last
        // without the first message below).
        std::thread::sleep(Duration::from_millis(100));
        let before = th.wakes();
        let n = 200;
        for i in 0..n {
            tx.send(9, &numbered(i)).unwrap();
            if i % 20 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert_numbered(&recv_n(&rx, n as usize, Duration::from_secs(10)), n);
        // The links' state was free (or briefly held by the thread, then awake): the messages
        // went onto the socket from the sending thread.
        let wakes = th.wakes() - before;
        assert!(
            wakes <= 3,
            "{wakes} wake-ups for messages the sender wrote (spin {spin:?})"
        );
    }
    // With the state held (the thread in a round, for all the sender knows), a message waits
    // for the thread, and a sleeping thread is woken for it.
    let (_rh, rx, th, tx) = pair(cfg(), 9);
    std::thread::sleep(Duration::from_millis(100));
    let before = th.wakes();
    {
        let _held = lock(&th.0.state);
        tx.send(9, &numbered(0)).unwrap();
        assert!(th.wakes() > before, "the sleeping thread was not woken");
    }
    assert_numbered(&recv_n(&rx, 1, Duration::from_secs(10)), 1);
}

#[test]
fn a_caller_waiting_for_an_answer_reads_it_from_the_socket() {
    let (_rh, rx, _th, tx) = pair(cfg(), 9);
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..100 {
        tx.send(9, &numbered(i)).unwrap();
        let got = loop {
            if let Some(m) = rx.recv_now() {
                break m;
            }
            assert!(Instant::now() < deadline, "message {i} did not come");
        };
        assert_eq!(got, (9, numbered(i)));
    }
}

#[test]
fn a_closed_link_is_gone_on_the_other_side() {
    let (_rh, rx, _th, tx) = pair(cfg(), 7);
    drop(rx);
    assert!(wait_until(Duration::from_secs(5), || gone(&tx).is_some()));
    let e = gone(&tx).unwrap();
    assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e}");
    assert!(e.to_string().contains("closed the link"), "{e}");
}

#[test]
fn queues_links_and_unattached_clients_are_capped() {
    let small = LinkConfig {
        queue: 8,
        max_links: 2,
        max_unattached: 2,
        ..cfg()
    };
    // A receiver that never attaches: the sender's queue fills.
    let rx_hub = Hub::start(small.clone(), Some(LO)).unwrap();
    let addr = rx_hub.listen_addr().unwrap();
    let l = std::net::TcpListener::bind((LO, 0)).unwrap();
    let tx_hub = Hub::start(small.clone(), None).unwrap();
    let tx = tx_hub.connect(l.local_addr().unwrap(), 7, SECRET).unwrap();
    for i in 0..8 {
        tx.send(1, &[i]).unwrap();
    }
    let e = tx.send(1, b"one too many").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidUsage, "{e}");
    // Links per hub.
    let _a = rx_hub.expect(1, SECRET).unwrap();
    let e = rx_hub.expect(1, SECRET).err().unwrap();
    assert!(e.to_string().contains("already expected"), "{e}");
    let _b = rx_hub.expect(2, SECRET).unwrap();
    let e = rx_hub.expect(3, SECRET).err().unwrap();
    assert!(e.to_string().contains("most it may"), "{e}");
    // Unattached clients: two are held, the third turned away at once.
    let _s1 = StdStream::connect(addr).unwrap();
    let _s2 = StdStream::connect(addr).unwrap();
    assert!(wait_until(Duration::from_secs(5), || rx_hub.rejections().total() == 0));
    std::thread::sleep(Duration::from_millis(100));
    send_and_expect_close(addr, &[], false);
    assert_eq!(rx_hub.rejections().get(Reject::Busy), 1, "{:?}", rx_hub.rejections());
}

#[test]
fn links_attach_through_the_control_service_port_which_still_serves_handles() {
    let svc = super::super::Service::start(LO).unwrap();
    let rx_hub = Hub::start(cfg(), None).unwrap();
    svc.serve_links(&rx_hub);
    let tx_hub = Hub::start(cfg(), None).unwrap();
    let rx = rx_hub.expect(7, SECRET).unwrap();
    let tx = tx_hub.connect(svc.addr(), 7, SECRET).unwrap();
    assert!(wait_until(Duration::from_secs(5), || is_up(&tx) && is_up(&rx)));
    send_numbered(&tx, 0, 50);
    assert_numbered(&recv_n(&rx, 50, Duration::from_secs(5)), 50);
    tx.break_socket();
    send_numbered(&rx, 0, 50);
    assert_numbered(&recv_n(&tx, 50, Duration::from_secs(10)), 50);
    let h = [5u8; crate::ffi::HANDLE_SIZE];
    let id = svc.offer(11, &h);
    let req = super::super::Request { id, secret: 11 };
    assert_eq!(super::super::fetch(svc.addr(), req, Duration::from_secs(5)).unwrap(), h);
}

#[test]
fn the_peer_timeout_is_a_setting() {
    assert_eq!(LinkConfig::default().peer_timeout, Duration::from_secs(5));
    let c = LinkConfig::from_vars(&|k| (k == PEER_TIMEOUT.name).then(|| "2".to_string())).unwrap();
    assert_eq!(c.peer_timeout, Duration::from_secs(2));
    let e = LinkConfig::from_vars(&|k| (k == PEER_TIMEOUT.name).then(|| "0".to_string())).unwrap_err();
    assert!(
        e.to_string().contains("NCCL_TCPXSHIM_PEER_TIMEOUT=0 is out of range"),
        "{e}"
    );
}
