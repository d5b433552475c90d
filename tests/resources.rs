//! Resources come back: after many connections are opened, used and closed, the process has the
//! file descriptors and threads it had before, and the I/O thread count never grew with them.
//! Alone in its binary so that no other test opens descriptors or threads meanwhile; the stack is
//! built in this process over the built-in transport on lo and driven through the exported table.

mod common;

use common::*;

#[test]
fn descriptors_and_threads_return_to_where_they_started() {
    let mut cfg = Config {
        plugin: Some("builtin".into()),
        ..Config::default()
    };
    cfg.tcp.ifname = Some("lo".into());
    // Every connection closes for good (the pool's own descriptor checks are in tests/pool.rs).
    cfg.pool.mode = tcpxshim::stack::pool::PoolMode::Off;
    let net = Net::in_process(&cfg);
    // Warm up once so that lazily created process-wide state exists before the baseline.
    let (s, r) = net.connect_pair(0);
    net.transfer(s, r, 100);
    net.close_send(s).unwrap();
    net.close_recv(r).unwrap();

    let fds = count_fds();
    let threads = count_threads();
    let pairs: Vec<(Comm, Comm)> = (0..64).map(|_| net.connect_pair(0)).collect();
    assert!(count_fds() > fds + 64, "64 connections hold sockets");
    assert_eq!(count_threads(), threads, "no thread per connection");
    for (i, (s, r)) in pairs.iter().enumerate() {
        net.transfer(*s, *r, 1000 + i * 997);
    }
    // Half of them close with a request still in flight.
    let bufs: Vec<AlignedBuf> = (0..32).map(|_| AlignedBuf::new(1 << 20)).collect();
    for ((_, r), b) in pairs.iter().zip(&bufs) {
        let mr = net.reg_buf(*r, b, PTR_HOST).unwrap();
        net.post_recv(*r, b.as_ptr(), 1 << 20, 0, mr).unwrap();
        net.dereg_mr(*r, mr).unwrap();
    }
    for (s, r) in pairs {
        net.close_send(s).unwrap();
        net.close_recv(r).unwrap();
    }
    drop(bufs);
    assert_eq!(count_fds(), fds, "every socket closed");
    assert_eq!(count_threads(), threads, "no thread left behind");
}
