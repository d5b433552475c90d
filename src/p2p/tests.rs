//! p2p tests: each scenario runs over the TCPX-like mock transport and over the built-in TCP
//! transport on loopback.

use super::mock::MockNet;
use super::*;
use crate::error::Error;
use crate::transport::{DeviceType, Transport};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// listen / connect / accept / reg / send / recv, both message orders.
fn pair_round_trip(net: &dyn Transport) {
    let listener = Listener::listen(net, 0).unwrap();
    let handle = *listener.handle();
    // Connect and accept interleaved, as a single thread must with non-blocking calls.
    let mut connector = Connector::new(net, 0, handle).with_peer("test peer");
    let mut listener = listener;
    let (mut send, mut recv) = (None, None);
    let start = Instant::now();
    while send.is_none() || recv.is_none() {
        if send.is_none() {
            send = connector.try_connect().unwrap();
        }
        if recv.is_none() {
            recv = listener.try_accept().unwrap();
        }
        assert!(start.elapsed() < T, "connect/accept did not finish");
        std::thread::yield_now();
    }
    let (send, recv) = (send.unwrap(), recv.unwrap());
    assert!(listener
        .try_accept()
        .unwrap_err()
        .to_string()
        .contains("already accepted"));
    assert!(connector
        .try_connect()
        .unwrap_err()
        .to_string()
        .contains("already connected"));
    transfers(&send, &recv);
}

/// Messages both ways of posting, of 0 bytes, shared by two sends, and into a piece of a buffer.
fn transfers(send: &SendConn<'_>, recv: &RecvConn<'_>) {
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let a = reg(send, data.clone()).unwrap();
    let b = recv.alloc(100_000).unwrap();
    // Receive posted first.
    let pending = recv.irecv(b, 100_000, T).unwrap();
    let a = send.send(a, 100_000, T).unwrap();
    let (n, b) = pending.wait(T).unwrap();
    assert_eq!(n, 100_000);
    assert_eq!(&b[..], &data[..]);
    // Send posted first, a shorter message into the larger buffer.
    let ps = send.isend(a, 1000, T).unwrap();
    let (n, b) = recv.recv(b, 100_000, T).unwrap();
    assert_eq!(n, 1000);
    let (_, a) = ps.wait(T).unwrap();
    // Zero-byte message.
    let ps = send.isend(a, 0, T).unwrap();
    let (n, b) = recv.recv(b, 100_000, T).unwrap();
    assert_eq!(n, 0);
    let (_, a) = ps.wait(T).unwrap();
    // The same bytes in two sends at once, shared read-only.
    let shared = Rc::new(a);
    let p1 = send.isend(Rc::clone(&shared), 500, T).unwrap();
    let p2 = send.isend(Rc::clone(&shared), 700, T).unwrap();
    let (n1, b) = recv.recv(b, 100_000, T).unwrap();
    assert_eq!((n1, &b[..500]), (500, &data[..500]));
    let (n2, mut b) = recv.recv(b, 100_000, T).unwrap();
    assert_eq!((n2, &b[..700]), (700, &data[..700]));
    drop((p1.wait(T).unwrap(), p2.wait(T).unwrap()));
    let a = Rc::try_unwrap(shared).expect("every clone is back");
    // A piece of a buffer travels on its own; the pieces join again.
    let tail = b.split_off(60_000);
    let pending = recv.irecv(b, 60_000, T).unwrap();
    let _a = send.send(a, 64, T).unwrap();
    let (n, head) = pending.wait(T).unwrap();
    assert_eq!((n, head.len(), tail.len()), (64, 60_000, 40_000));
    let mut b = head;
    b.unsplit(tail).unwrap();
    assert_eq!(b.into_vec().unwrap().len(), 100_000);
}

/// Message `i`'s byte `k` in the stream tests: differs with the message and the position.
fn pattern(i: usize, k: usize) -> u8 {
    (i.wrapping_mul(131) ^ k.wrapping_mul(7) ^ (k >> 8)) as u8
}

fn fill_pattern(i: usize, slot: &mut [u8]) {
    for (k, b) in slot.iter_mut().enumerate() {
        *b = pattern(i, k);
    }
}

fn check_pattern(i: usize, data: &[u8]) -> crate::Result<()> {
    match data.iter().enumerate().find(|&(k, &b)| b != pattern(i, k)) {
        None => Ok(()),
        Some((k, &b)) => Err(Error::remote(format!(
            "message {i}: byte {k} is {b:#04x}, expected {:#04x}",
            pattern(i, k)
        ))),
    }
}

/// Pipelined streams with per-message fill and verification; the buffers come back whole.
fn streams(net: &dyn Transport) {
    let listener = Listener::listen(net, 0).unwrap();
    let handle = *listener.handle();
    std::thread::scope(|s| {
        let rx = s.spawn(move || {
            let recv = listener.accept(T).unwrap();
            let buf = recv.alloc(8 * 70_000).unwrap();
            let mut seen = Vec::new();
            let buf = recv
                .recv_stream(buf, 70_000, 50, 8, T, &mut |i, d| {
                    seen.push(i);
                    check_pattern(i, d)
                })
                .unwrap();
            assert_eq!(seen, (0..50).collect::<Vec<_>>());
            // Unfilled stream: sizes only.
            let buf = recv.recv_stream(buf, 4096, 200, 8, T, &mut |_, _| Ok(())).unwrap();
            assert_eq!(buf.into_vec().unwrap().len(), 8 * 70_000, "whole again");
        });
        let send = connect(net, 0, handle, T).unwrap();
        let buf = send.alloc(3 * 70_000).unwrap();
        let mut fill = |i: usize, slot: &mut [u8]| fill_pattern(i, slot);
        let buf = send.send_stream(buf, 70_000, 50, 8, T, Some(&mut fill)).unwrap();
        let buf = send.send_stream(buf, 4096, 200, 8, T, None).unwrap();
        assert_eq!(buf.into_vec().unwrap().len(), 3 * 70_000, "whole again");
        rx.join().unwrap();
    });
}

/// Both sides of the bootstrap in one process: control messages, then a verified stream each way.
fn endpoints(net: &dyn Transport) {
    let server = Server::bind(loopback()).unwrap();
    let addr = server.local_addr().to_string();
    std::thread::scope(|s| {
        let srv = s.spawn(|| {
            let ep = server.accept(net, 0, T).unwrap();
            assert_eq!(ep.recv_ctrl(T, "a greeting").unwrap(), b"hello");
            let buf = ep.recv_conn().alloc(4 * 8192).unwrap();
            ep.recv_conn()
                .recv_stream(buf, 8192, 20, 4, T, &mut check_pattern)
                .unwrap();
            ep.send_ctrl(b"got it").unwrap();
            let buf = ep.send_conn().alloc(8192).unwrap();
            let mut fill = |i: usize, slot: &mut [u8]| fill_pattern(i, slot);
            ep.send_conn()
                .send_stream(buf, 8192, 20, 4, T, Some(&mut fill))
                .unwrap();
            ep.peer().dev
        });
        let ep = connect_to(net, 1.min(net.devices().unwrap() - 1), &addr, T).unwrap();
        assert_eq!(ep.peer().transport, net.name());
        assert_eq!(ep.peer().pid, std::process::id());
        ep.send_ctrl(b"hello").unwrap();
        let buf = ep.send_conn().alloc(2 * 8192).unwrap();
        let mut fill = |i: usize, slot: &mut [u8]| fill_pattern(i, slot);
        ep.send_conn()
            .send_stream(buf, 8192, 20, 4, T, Some(&mut fill))
            .unwrap();
        assert_eq!(ep.recv_ctrl(T, "the peer's receipt").unwrap(), b"got it");
        let buf = ep.recv_conn().alloc(8 * 8192).unwrap();
        ep.recv_conn()
            .recv_stream(buf, 8192, 20, 8, T, &mut check_pattern)
            .unwrap();
        assert_eq!(srv.join().unwrap(), ep.send_conn().dev());
    });
}

/// Bytes of the messages in the leak tests: large enough to be in flight across many socket
/// reads and writes when the pending transfer is forgotten.
const BIG: usize = 4 << 20;

/// Allocates and writes memory the size of the forgotten buffers, checking that nothing else
/// writes into it: had the forgotten buffer been freed, these allocations would reuse it while
/// the transport might still write there (the old API's use-after-free).
fn churn_memory() {
    for round in 0..32u8 {
        let mut v = vec![round; BIG];
        v[BIG / 2] = round.wrapping_add(1);
        std::thread::sleep(Duration::from_millis(2));
        v[BIG / 2] = round;
        assert!(
            v.iter().all(|&b| b == round),
            "memory changed under us in round {round}"
        );
    }
}

/// A receive forgotten with its peer still sending: the buffer is leaked, never freed, so the
/// transport can keep writing into it until the connection is closed; then everything goes on.
fn forgotten_receive(net: &dyn Transport) {
    let listener = Listener::listen(net, 0).unwrap();
    let handle = *listener.handle();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let tx = s.spawn(|| {
            let send = connect(net, 0, handle, T).unwrap();
            let mut buf = reg(&send, vec![0xAB; BIG]).unwrap();
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                // Once the receiver is gone, a send fails or stops progressing.
                match send.send(buf, BIG, Duration::from_secs(2)) {
                    Ok(b) => buf = b,
                    Err(_) => break,
                }
                sent += 1;
            }
            sent
        });
        let recv = listener.accept(T).unwrap();
        let (n, b) = recv.recv(recv.alloc(BIG).unwrap(), BIG, T).unwrap();
        assert_eq!((n, b[BIG - 1]), (BIG, 0xAB), "data flows");
        let pending = recv.irecv(b, BIG, T).unwrap();
        std::mem::forget(pending);
        std::thread::sleep(Duration::from_millis(20)); // data lands in the forgotten buffer
        let again = recv.alloc(BIG).unwrap(); // registering and posting more still works
        drop(again);
        drop(recv); // the transport stops writing: its comm is closed
        stop.store(true, Ordering::Relaxed);
        churn_memory();
        assert!(tx.join().unwrap() >= 1);
    });
    churn_memory();
}

/// A send forgotten while the peer receives: its buffer is leaked, never freed while the
/// transport reads it; the connection and endpoint go away and everything goes on.
fn forgotten_send(net: &dyn Transport) {
    let server = Server::bind(loopback()).unwrap();
    let addr = server.local_addr().to_string();
    std::thread::scope(|s| {
        let rx = s.spawn(|| {
            let ep = server.accept(net, 0, T).unwrap();
            let mut buf = ep.recv_conn().alloc(BIG).unwrap();
            let mut got = 0;
            // Receives until the sender is gone (its close ends the stream or stalls it).
            loop {
                match ep.recv_conn().recv(buf, BIG, Duration::from_secs(2)) {
                    Ok((_, b)) => buf = b,
                    Err(_) => break,
                }
                got += 1;
            }
            got
        });
        let ep = connect_to(net, 0, &addr, T).unwrap();
        let send = ep.send_conn();
        let buf = send.send(send.alloc(BIG).unwrap(), BIG, T).unwrap();
        let pending = send.isend(buf, BIG, T).unwrap();
        std::mem::forget(pending);
        drop(ep); // closes both connections while the send may still be reading its buffer
        churn_memory();
        assert!(rx.join().unwrap() >= 1);
    });
    churn_memory();
}

/// A failure on one side (a verification mismatch here) reaches the other side as the peer's error.
fn peer_failure_is_reported(net: &dyn Transport) {
    let server = Server::bind(loopback()).unwrap();
    let addr = server.local_addr().to_string();
    std::thread::scope(|s| {
        let srv = s.spawn(|| {
            let ep = server.accept(net, 0, T).unwrap();
            ep.recv_ctrl(T, "a plan").unwrap();
            ep.report_error("data mismatch at offset 12");
        });
        let ep = connect_to(net, 0, &addr, T).unwrap();
        ep.send_ctrl(b"hello").unwrap();
        let err = ep.recv_ctrl(T, "a reply").unwrap_err().to_string();
        assert!(
            err.contains("failed: data mismatch at offset 12") && err.contains("127.0.0.1"),
            "{err}"
        );
        srv.join().unwrap();
    });
}

#[test]
fn mock_pair_round_trip() {
    let net = MockNet::default();
    pair_round_trip(&net);
    assert!(net.busy_answers() > 0, "the \"try again\" path was exercised");
    assert_eq!(net.open_comms(), (0, 0, 0), "everything closed on drop");
}

#[test]
fn mock_streams() {
    let net = MockNet::default();
    streams(&net);
    assert_eq!(net.open_comms(), (0, 0, 0));
}

#[test]
fn mock_endpoints() {
    let net = MockNet::default();
    endpoints(&net);
    assert_eq!(net.open_comms(), (0, 0, 0));
}

#[test]
fn mock_forgotten_receive() {
    forgotten_receive(&MockNet::default());
}

#[test]
fn mock_forgotten_send() {
    forgotten_send(&MockNet::default());
}

#[test]
fn mock_peer_failure_is_reported() {
    peer_failure_is_reported(&MockNet::default());
}

#[test]
fn accept_device_handle_is_real_storage() {
    let net = MockNet::default();
    let listener = Listener::listen(&net, 0).unwrap();
    let send = connect(&net, 0, *listener.handle(), T);
    let recv = listener.accept(T).unwrap();
    let info = recv.dev_handle().unwrap();
    assert_eq!((info.device_type, info.version, info.size), (DeviceType::Unpack, 7, 64));
    assert!(info.needs_proxy_progress && !info.foreign);
    drop(send);
}

#[test]
fn accept_timeout_names_the_device_and_the_wait() {
    let net = MockNet::default();
    let listener = Listener::listen(&net, 1).unwrap();
    let start = Instant::now();
    let err = listener.accept(Duration::from_millis(300)).unwrap_err().to_string();
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(
        err.contains("accept on mock device 1") && err.contains("0.3 s") && err.contains("handle"),
        "{err}"
    );
    assert_eq!(net.open_comms(), (0, 0, 0), "listen comm closed");
}

#[test]
fn connect_timeout_names_the_peer() {
    let net = MockNet::default();
    let listener = Listener::listen(&net, 0).unwrap();
    let mut handle = *listener.handle();
    drop(listener);
    handle[0] ^= 0xff; // a listener that does not exist: connect never completes or fails
    let err = match Connector::new(&net, 0, handle)
        .with_peer("10.1.2.3 device 0")
        .connect(Duration::from_millis(300))
    {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("10.1.2.3 device 0") && err.contains("handle"), "{err}");
}

#[test]
fn buffers_must_belong_to_the_connection_and_fit_the_message() {
    let net = MockNet::default();
    let listener = Listener::listen(&net, 0).unwrap();
    let send = connect(&net, 0, *listener.handle(), T).unwrap();
    let recv = listener.accept(T).unwrap();
    let a = send.alloc(64).unwrap();
    let other = recv.alloc(64).unwrap();
    let err = send.send(other, 64, T).unwrap_err();
    assert!(err.to_string().contains("registered on another connection"), "{err}");
    let other = err.into_buf().expect("a refused buffer comes back");
    let err = send.send(a, 65, T).unwrap_err();
    assert!(err.to_string().contains("does not fit the 64 B buffer"), "{err}");
    assert!(err.into_buf().is_some());
    // A piece joins only its neighbours of the same registration.
    let mut left = recv.alloc(16).unwrap();
    let right = left.split_off(8);
    let other = left.unsplit(other).unwrap_err();
    left.unsplit(right).unwrap();
    assert_eq!(left.len(), 16);
    let mut whole = other;
    let piece = whole.split_off(32);
    let whole = whole.into_vec().expect_err("not all of it");
    drop(piece);
    assert_eq!(whole.into_vec().expect_err("still not all of it").len(), 32);
}

#[test]
fn a_timed_out_receive_closes_the_connection_and_hands_the_buffer_back() {
    let net = MockNet::default();
    let listener = Listener::listen(&net, 0).unwrap();
    let _send = connect(&net, 0, *listener.handle(), T).unwrap();
    let recv = listener.accept(T).unwrap();
    let pending = recv.irecv(recv.alloc(64).unwrap(), 64, T).unwrap();
    let err = pending.wait(Duration::from_millis(100)).unwrap_err();
    assert!(err.to_string().contains("did not complete within 0.1 s"), "{err}");
    let b = err.into_buf().expect("handed back once the connection is closed");
    assert!(recv.is_closed());
    let err = recv.recv(b, 64, T).unwrap_err().to_string();
    assert!(
        err.contains("closed after an earlier failure") && err.contains("did not complete within"),
        "{err}"
    );
    assert_eq!(net.open_comms().1, 0);
}

#[test]
fn dropping_a_pending_receive_closes_the_connection_before_the_next_is_tested() {
    let net = MockNet::default();
    let listener = Listener::listen(&net, 0).unwrap();
    let _send = connect(&net, 0, *listener.handle(), T).unwrap();
    let recv = listener.accept(T).unwrap();
    let first = recv.irecv(recv.alloc(64).unwrap(), 64, T).unwrap();
    let mut second = recv.irecv(recv.alloc(64).unwrap(), 64, T).unwrap();
    drop(first);
    assert!(recv.is_closed());
    // The second request went with the comm: it is not tested on the closed comm.
    let err = second.poll().unwrap_err().to_string();
    assert!(
        err.contains("closed after an earlier failure") && err.contains("dropped before it completed"),
        "{err}"
    );
    assert!(second.into_buf().is_some());
    assert_eq!(net.open_comms().1, 0);
}

#[test]
fn buffers_stay_allocated_when_closing_fails() {
    let net = MockNet::default();
    let listener = Listener::listen(&net, 0).unwrap();
    let send = connect(&net, 0, *listener.handle(), T).unwrap();
    let recv = listener.accept(T).unwrap();
    let spare = recv.alloc(64).unwrap();
    let pending = recv.irecv(recv.alloc(64).unwrap(), 64, T).unwrap();
    net.fail_closes();
    let err = pending.wait(Duration::from_millis(50)).unwrap_err();
    assert!(recv.is_closed());
    assert!(
        err.into_buf().is_none(),
        "the transport may still write into it: kept for good"
    );
    // A buffer that was not in flight is registered memory all the same: it is not freed either,
    // and into_vec hands back a copy.
    assert_eq!(spare.into_vec().unwrap(), vec![0u8; 64]);
    let ps = send.isend(send.alloc(8).unwrap(), 8, T).unwrap();
    drop(ps); // closing fails here too: the buffer is leaked, not freed
    assert!(send.is_closed());
}

#[test]
fn connect_to_nothing_fails_within_the_timeout() {
    // A port that was free a moment ago.
    let port = TcpListener::bind(loopback()).unwrap().local_addr().unwrap().port();
    let net = MockNet::default();
    let start = Instant::now();
    let err = match connect_to(&net, 0, &format!("127.0.0.1:{port}"), Duration::from_millis(700)) {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => e.to_string(),
    };
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("connection refused"),
        "{err}"
    );
    assert!(err.contains("attempts"), "retried: {err}");
}

#[test]
fn client_started_first_waits_for_the_server() {
    let port = TcpListener::bind(loopback()).unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let net = MockNet::default();
    std::thread::scope(|s| {
        let client = s.spawn(|| connect_to(&net, 0, &addr.to_string(), T).map(|ep| ep.peer().dev));
        std::thread::sleep(Duration::from_millis(400));
        let ep = serve(&net, 1, addr, T).unwrap();
        assert_eq!(ep.peer().dev, 0);
        assert_eq!(client.join().unwrap().unwrap(), 1);
    });
}

#[test]
fn wrong_peer_is_named() {
    let l = TcpListener::bind(loopback()).unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        std::thread::sleep(Duration::from_millis(200));
    });
    let net = MockNet::default();
    let err = match connect_to(&net, 0, &addr.to_string(), T) {
        Ok(_) => panic!("accepted a web server"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("peer at {addr} is not a tcpxshim endpoint")) && err.contains("HTTP/1.1"),
        "{err}"
    );
    t.join().unwrap();
}

#[test]
fn silent_peer_times_out_waiting_for_the_hello() {
    let l = TcpListener::bind(loopback()).unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let conn = l.accept().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        drop(conn);
    });
    let net = MockNet::default();
    let err = match connect_to(&net, 0, &addr.to_string(), Duration::from_millis(300)) {
        Ok(_) => panic!("no hello"),
        Err(e) => e.to_string(),
    };
    // Timeouts are at least 1 s once the bootstrap connection stands.
    assert!(err.contains("sent no tcpxshim hello"), "{err}");
    t.join().unwrap();
}

#[test]
fn version_mismatch_is_explained() {
    let l = TcpListener::bind(loopback()).unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&99u16.to_le_bytes());
        hello.extend_from_slice(&300u16.to_le_bytes());
        let _ = s.write_all(&hello);
        std::thread::sleep(Duration::from_millis(200));
    });
    let net = MockNet::default();
    let err = match connect_to(&net, 0, &addr.to_string(), T) {
        Ok(_) => panic!("accepted version 99"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("protocol version 99") && err.contains("same tcpxshim version"),
        "{err}"
    );
    t.join().unwrap();
}

/// Reads `s` until end of stream or `limit`; what arrived, and whether the stream ended.
fn read_to_end_within(s: &mut std::net::TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    use std::io::Read;
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while start.elapsed() < limit {
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return (got, true),
        }
    }
    (got, false)
}

#[test]
fn stray_bootstrap_clients_are_dropped_and_the_server_keeps_waiting() {
    use std::net::TcpStream;
    let server = Server::bind(loopback()).unwrap();
    let addr = server.local_addr();
    let net = MockNet::default();
    let step = Duration::from_secs(1);
    std::thread::scope(|s| {
        let srv = s.spawn(|| {
            server
                .accept_within(&net, 0, Duration::from_secs(60), step)
                .map(|ep| ep.peer().dev)
        });
        // Garbage: dropped at once, without a reply.
        let mut garbage = TcpStream::connect(addr).unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let (got, ended) = read_to_end_within(&mut garbage, T);
        assert!(ended && got.is_empty(), "garbage client: {got:?}, ended {ended}");
        // Half a hello, then the client goes away.
        let mut half = TcpStream::connect(addr).unwrap();
        half.write_all(&MAGIC).unwrap();
        half.write_all(&PROTOCOL_VERSION.to_le_bytes()).unwrap();
        half.write_all(&(HELLO_LEN as u16).to_le_bytes()).unwrap();
        half.write_all(&[0u8; 40]).unwrap();
        drop(half);
        // Another version: told ours, then dropped.
        let mut old = TcpStream::connect(addr).unwrap();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&99u16.to_le_bytes());
        hello.extend_from_slice(&300u16.to_le_bytes());
        old.write_all(&hello).unwrap();
        let (got, ended) = read_to_end_within(&mut old, T);
        assert!(ended, "the other version's client was not dropped");
        assert_eq!(got.len(), 12, "{got:?}");
        assert_eq!(&got[..8], &MAGIC);
        assert_eq!(u16::from_le_bytes([got[8], got[9]]), PROTOCOL_VERSION);
        // More silent clients than the server reads at once: each is dropped after the step
        // timeout, the ones in the backlog once they get their turn.
        let mut silent: Vec<TcpStream> = (0..MAX_PENDING + 1)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let start = Instant::now();
        for (i, c) in silent.iter_mut().enumerate() {
            let (got, ended) = read_to_end_within(c, T);
            assert!(ended && got.is_empty(), "silent client {i}: {got:?}, ended {ended}");
        }
        assert!(
            start.elapsed() >= step,
            "dropped before the step timeout: {:?}",
            start.elapsed()
        );
        assert!(!srv.is_finished(), "the server gave up");
        // The real peer is served.
        let ep = connect_to(&net, 1, &addr.to_string(), T).unwrap();
        assert_eq!(ep.peer().dev, 0);
        assert_eq!(srv.join().unwrap().unwrap(), 1);
    });
}

#[test]
fn bad_device_is_rejected_before_any_network_activity() {
    let net = MockNet::default();
    let start = Instant::now();
    let err = match connect_to(&net, 5, "127.0.0.1:9", T) {
        Ok(_) => panic!("device 5 does not exist"),
        Err(e) => e.to_string(),
    };
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(
        err.contains("device 5 does not exist") && err.contains("2 device(s)"),
        "{err}"
    );
    let server = Server::bind(loopback()).unwrap();
    assert!(server.accept(&net, -1, T).is_err());
}

#[test]
fn transport_mismatch_is_reported_on_both_sides() {
    // A layer that changes only the name: everything else is forwarded by Layer's defaults.
    struct Renamed(MockNet);
    impl crate::stack::Layer for Renamed {
        fn inner(&self) -> &dyn Transport {
            &self.0
        }
        fn name(&self) -> &str {
            "other"
        }
    }
    let server = Server::bind(loopback()).unwrap();
    let addr = server.local_addr().to_string();
    let (a, b) = (MockNet::default(), Renamed(MockNet::default()));
    std::thread::scope(|s| {
        let srv = s.spawn(|| match server.accept(&a, 0, T) {
            Ok(_) => panic!("transports differ"),
            Err(e) => e.to_string(),
        });
        let err = match connect_to(&b, 0, &addr, T) {
            Ok(_) => panic!("transports differ"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("uses transport \"mock\", this side uses \"other\""),
            "{err}"
        );
        let serr = srv.join().unwrap();
        assert!(serr.contains("uses transport"), "{serr}");
    });
}

/// The same scenarios over the built-in TCP transport on loopback.
mod over_tcp {
    use crate::tcp::TcpConfig;
    use crate::tcp::TcpTransport;

    fn tcp() -> TcpTransport {
        let cfg = TcpConfig {
            ifname: Some("lo".into()),
            ..Default::default()
        };
        TcpTransport::new(&cfg).expect("built-in TCP transport on lo")
    }

    #[test]
    fn pair_round_trip() {
        super::pair_round_trip(&tcp());
    }

    #[test]
    fn streams() {
        super::streams(&tcp());
    }

    #[test]
    fn endpoints() {
        super::endpoints(&tcp());
    }

    #[test]
    fn forgotten_receive() {
        super::forgotten_receive(&tcp());
    }

    #[test]
    fn forgotten_send() {
        super::forgotten_send(&tcp());
    }

    #[test]
    fn peer_failure_is_reported() {
        super::peer_failure_is_reported(&tcp());
    }
}
