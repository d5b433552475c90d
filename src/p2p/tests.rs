//! p2p tests: each scenario runs over the TCPX-like mock transport and over the built-in TCP
//! transport on loopback.

use super::bench::{self, check_pattern, fill_pattern, pattern_seed, Event, Plan};
use super::mock::MockNet;
use super::*;
use crate::error::Error;
use crate::transport::{DeviceType, Transport};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
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

    let mut a: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut b = vec![0u8; 100_000];
    let mr_a = reg(&send, &mut a).unwrap();
    let mr_b = reg(&recv, &mut b).unwrap();
    // Receive posted first.
    let pending = recv.irecv(&mut b[..], &mr_b, T).unwrap();
    send.send(&a, &mr_a, T).unwrap();
    let (n, data) = pending.wait(T).unwrap();
    assert_eq!(n, 100_000);
    assert_eq!(&data[..], &a[..]);
    // Send posted first, a shorter message into the larger buffer.
    let ps = send.isend(&a[..1000], &mr_a, T).unwrap();
    assert_eq!(recv.recv(&mut b, &mr_b, T).unwrap(), 1000);
    ps.wait(T).unwrap();
    // Zero-byte message.
    let ps = send.isend(&a[..0], &mr_a, T).unwrap();
    assert_eq!(recv.recv(&mut b, &mr_b, T).unwrap(), 0);
    ps.wait(T).unwrap();
}

/// Pipelined streams with per-message fill and verification.
fn streams(net: &dyn Transport) {
    let listener = Listener::listen(net, 0).unwrap();
    let handle = *listener.handle();
    std::thread::scope(|s| {
        let rx = s.spawn(move || {
            let recv = listener.accept(T).unwrap();
            let mut buf = vec![0u8; 8 * 70_000];
            let mr = reg(&recv, &mut buf).unwrap();
            let mut seen = Vec::new();
            recv.recv_stream(&mut buf, 70_000, 50, 8, &mr, T, &mut |i, d| {
                seen.push(i);
                match check_pattern(d, pattern_seed(70_000, i, 0)) {
                    None => Ok(()),
                    Some(m) => Err(Error::remote(format!("message {i}: {m:?}"))),
                }
            })
            .unwrap();
            assert_eq!(seen, (0..50).collect::<Vec<_>>());
            // Unfilled stream: sizes only.
            recv.recv_stream(&mut buf, 4096, 200, 8, &mr, T, &mut |_, _| Ok(()))
                .unwrap();
        });
        let send = connect(net, 0, handle, T).unwrap();
        let mut buf = vec![0u8; 3 * 70_000];
        let mr = reg(&send, &mut buf).unwrap();
        let mut fill = |i: usize, slot: &mut [u8]| fill_pattern(slot, pattern_seed(70_000, i, 0));
        send.send_stream(&mut buf, 70_000, 50, 8, &mr, T, Some(&mut fill))
            .unwrap();
        send.send_stream(&mut buf, 4096, 200, 8, &mr, T, None).unwrap();
        rx.join().unwrap();
    });
}

/// Both sides of the bootstrap in one process, then the bench with a small plan.
fn endpoints_and_bench(net: &dyn Transport) {
    let server = Server::bind(loopback()).unwrap();
    let addr = server.local_addr().to_string();
    let plan = Plan::new(8, 256 << 10, 5, 1 << 20, 4, 2).unwrap();
    std::thread::scope(|s| {
        let srv = s.spawn(|| {
            let ep = server.accept(net, 0, T).unwrap();
            let mut rows = 0;
            let report = bench::run_server(&ep, T, &mut |e| {
                if let Event::Row(_) = e {
                    rows += 1
                }
            })
            .unwrap();
            assert_eq!(rows, report.rows.len());
            report
        });
        let ep = connect_to(net, 1.min(net.devices().unwrap() - 1), &addr, T).unwrap();
        assert_eq!(ep.peer().transport, net.name());
        assert_eq!(ep.peer().pid, std::process::id());
        let report = bench::run_client(&ep, &plan, T, &mut |_| {}).unwrap();
        let server_report = srv.join().unwrap();
        assert_eq!(report, server_report, "the server prints the client's results");
        assert_eq!(report.rows.len(), plan.sizes.len());
        assert_eq!(report.verified.sizes, plan.verify_sizes.len());
        for r in &report.rows {
            assert!(r.lat_us > 0.0 && r.gbps > 0.0, "{r:?}");
        }
    });
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
fn mock_endpoints_and_bench() {
    let net = MockNet::default();
    endpoints_and_bench(&net);
    assert_eq!(net.open_comms(), (0, 0, 0));
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
fn registration_must_cover_the_buffer_and_belong_to_the_connection() {
    let net = MockNet::default();
    let listener = Listener::listen(&net, 0).unwrap();
    let send = connect(&net, 0, *listener.handle(), T).unwrap();
    let recv = listener.accept(T).unwrap();
    let mut a = vec![0u8; 64];
    let mut other = vec![0u8; 64];
    let mr = reg(&send, &mut a).unwrap();
    let err = send.send(&other, &mr, T).unwrap_err().to_string();
    assert!(err.contains("outside the registered region"), "{err}");
    let mr_r = reg(&recv, &mut other).unwrap();
    let err = send.send(&a, &mr_r, T).unwrap_err().to_string();
    assert!(err.contains("belongs to another connection"), "{err}");
}

#[test]
fn dropping_a_pending_receive_closes_the_connection() {
    let net = MockNet::default();
    let listener = Listener::listen(&net, 0).unwrap();
    let _send = connect(&net, 0, *listener.handle(), T).unwrap();
    let recv = listener.accept(T).unwrap();
    let mut b = vec![0u8; 64];
    let mr = reg(&recv, &mut b).unwrap();
    {
        let pending = recv.irecv(&mut b[..], &mr, T).unwrap();
        let err = pending.wait(Duration::from_millis(100)).unwrap_err().to_string();
        assert!(err.contains("did not complete within 0.1 s"), "{err}");
    }
    assert!(recv.is_closed());
    let err = recv.recv(&mut b, &mr, T).unwrap_err().to_string();
    assert!(
        err.contains("closed after an earlier failure") && err.contains("dropped before it completed"),
        "{err}"
    );
    drop(mr); // no dereg on a closed comm
    assert_eq!(net.open_comms().1, 0);
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
    use crate::config::TcpConfig;
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
    fn endpoints_and_bench() {
        super::endpoints_and_bench(&tcp());
    }

    #[test]
    fn peer_failure_is_reported() {
        super::peer_failure_is_reported(&tcp());
    }
}
