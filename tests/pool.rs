//! Connection pooling (NCCL_TCPXSHIM_POOL): communicators created again between the same two
//! stacks reuse their connections, with the data right, descriptors flat, and every way an idle
//! connection can go stale handled by a fresh connect. Two stacks stand for two processes: each
//! has its own control service, and the listener's is what a connector's pool is keyed by.

mod common;

use common::*;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};
use tcpxshim::stack::pool::PoolCounts;

/// The tests count the process's descriptors, so they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn builtin(f: impl FnOnce(&mut Config)) -> StackNet {
    let mut c = Config {
        plugin: Some("builtin".into()),
        ctrl_addr: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ..Config::default()
    };
    c.tcp.ifname = Some("lo".into());
    f(&mut c);
    StackNet::build(&c)
}

fn counts(n: &StackNet) -> PoolCounts {
    n.shim.pool_counts().expect("the stack pools")
}

/// One communicator's life between `a` (connecting) and `b` (listening): listen, connect and
/// accept, one checked transfer of `size` bytes, close.
fn cycle(a: &StackNet, b: &StackNet, size: usize, seed: u64) {
    let (mut handle, listen) = b.listen(0).unwrap();
    let (mut send, mut recv) = (None, None);
    let start = Instant::now();
    while send.is_none() || recv.is_none() {
        if send.is_none() {
            send = a.connect(0, &mut handle).unwrap();
        }
        if recv.is_none() {
            recv = b.accept(listen).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(20), "connect/accept timed out");
    }
    b.close_listen(listen).unwrap();
    let (send, recv) = (send.unwrap(), recv.unwrap().0);
    let mut o = TransferOpts::new(size);
    o.seed = seed;
    transfer_between(a, send, b, recv, &o);
    a.close_send(send).unwrap();
    b.close_recv(recv).unwrap();
}

/// A checked transfer from `send` of stack `a` to `recv` of stack `b`.
fn transfer_between(a: &StackNet, send: Comm, b: &StackNet, recv: Comm, o: &TransferOpts) {
    let mut sbuf = AlignedBuf::new(o.size.max(1));
    sbuf.fill_pattern(o.seed);
    let mut rbuf = AlignedBuf::new(o.size.max(1));
    rbuf.fill_pattern(o.seed ^ 0x5a5a);
    let smr = a.reg_buf(send, &sbuf, PTR_HOST).unwrap();
    let rmr = b.reg_buf(recv, &rbuf, PTR_HOST).unwrap();
    let size = o.size as i32;
    let rreq = poll_until("irecv", || b.irecv(recv, rbuf.as_ptr(), size, 0, rmr).unwrap());
    let sreq = poll_until("isend", || a.isend(send, sbuf.as_ptr(), size, 0, smr).unwrap());
    let (mut sd, mut rd) = (false, None);
    poll_until("the transfer", || {
        if !sd {
            sd = a.test(sreq).unwrap().is_some();
        }
        if rd.is_none() {
            rd = b.test(rreq).unwrap();
        }
        (sd && rd.is_some()).then_some(())
    });
    assert_eq!(rd, Some(size), "received size");
    assert_eq!(rbuf.find_mismatch(o.seed, 0..o.size), None, "data of {} bytes", o.size);
    a.dereg_mr(send, smr).unwrap();
    b.dereg_mr(recv, rmr).unwrap();
}

const SIZES: [usize; 6] = [0, 1, 4096, 65536, 1 << 20, 3 << 20];

#[test]
fn reused_connections_carry_the_right_data_and_descriptors_stay_flat() {
    let _serial = serial();
    let (a, b) = (builtin(|_| {}), builtin(|_| {}));
    for i in 0..5 {
        cycle(&a, &b, SIZES[i % SIZES.len()], i as u64);
    }
    let fds = count_fds();
    let before = counts(&a);
    let n = 60;
    for i in 0..n {
        cycle(&a, &b, SIZES[i % SIZES.len()], 100 + i as u64);
    }
    let after = counts(&a);
    assert_eq!(
        after.hits - before.hits,
        n as u64,
        "every cycle reused the connection: {after:?}"
    );
    assert_eq!(counts(&b).idle_recv, 1, "one idle receive connection: {:?}", counts(&b));
    assert_eq!(after.idle_send, 1);
    let grown = count_fds() as i64 - fds as i64;
    assert!(grown.abs() <= 2, "descriptors grew by {grown} over {n} cycles");
    assert!(
        a.errors().is_empty() && b.errors().is_empty(),
        "{:?} {:?}",
        a.errors(),
        b.errors()
    );
}

#[test]
fn a_loaded_host_type_plugin_pools_too() {
    let _serial = serial();
    // One stack connecting to itself (a fixture's connections stay within its own instance).
    let (a, _ctl) = shim_with(Fixture::V7, &[], |_| {});
    for i in 0..20 {
        cycle(&a, &a, SIZES[i % SIZES.len()], i as u64);
    }
    let c = counts(&a);
    assert_eq!(c.hits, 19, "every cycle but the first reused the connection: {c:?}");
}

#[test]
fn without_the_pool_every_communicator_connects_afresh() {
    let _serial = serial();
    let off = |c: &mut Config| c.pool.mode = tcpxshim::stack::pool::PoolMode::Off;
    let (a, b) = (builtin(off), builtin(off));
    let fds = {
        cycle(&a, &b, 64, 0);
        count_fds()
    };
    for i in 0..10 {
        cycle(&a, &b, SIZES[i % SIZES.len()], i as u64);
    }
    assert!(a.shim.pool_counts().is_none());
    let grown = count_fds() as i64 - fds as i64;
    assert!(grown.abs() <= 2, "descriptors grew by {grown}");
}

#[test]
fn concurrent_communicators_never_share_a_connection() {
    let _serial = serial();
    let (a, b) = (builtin(|_| {}), builtin(|_| {}));
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (a, b) = (&a, &b);
            s.spawn(move || {
                for i in 0..25 {
                    cycle(a, b, SIZES[(i + t as usize) % SIZES.len()], t * 1000 + i as u64);
                }
            });
        }
    });
    let c = counts(&a);
    assert!(c.hits >= 60, "most cycles reused a connection: {c:?}");
    assert!(c.idle_send <= 3 && counts(&b).idle_recv <= 3, "{c:?}");
}

#[test]
fn the_pool_keeps_at_most_its_bound_and_closes_what_idles_too_long() {
    let _serial = serial();
    let cfg = |c: &mut Config| {
        c.pool.max = 2;
        c.pool.idle = Duration::from_millis(1500);
    };
    let (a, b) = (builtin(cfg), builtin(cfg));
    cycle(&a, &b, 64, 0);
    let fds = count_fds();
    // Three communicators at once, then all closed: one connection each way is over the bound.
    let mut pairs = Vec::new();
    for _ in 0..3 {
        let (mut handle, listen) = b.listen(0).unwrap();
        let (s, (r, _)) = connect_accept_between(&a, &b, &mut handle, listen);
        b.close_listen(listen).unwrap();
        pairs.push((s, r));
    }
    for (i, (s, r)) in pairs.iter().enumerate() {
        transfer_between(&a, *s, &b, *r, &TransferOpts::new(1000 + i));
    }
    for (s, r) in pairs {
        a.close_send(s).unwrap();
        b.close_recv(r).unwrap();
    }
    let (ca, cb) = (counts(&a), counts(&b));
    assert_eq!((ca.idle_send, cb.idle_recv), (2, 2), "{ca:?} {cb:?}");
    assert_eq!((ca.evictions, cb.evictions), (1, 1), "{ca:?} {cb:?}");
    // Idle past the limit: closed at the next pool operation, and their descriptors with them.
    std::thread::sleep(Duration::from_millis(1600));
    let (_, l) = a.listen(0).unwrap();
    let (_, l2) = b.listen(0).unwrap();
    a.close_listen(l).unwrap();
    b.close_listen(l2).unwrap();
    let (ca, cb) = (counts(&a), counts(&b));
    assert_eq!((ca.idle_send, cb.idle_recv), (0, 0), "{ca:?} {cb:?}");
    assert_eq!((ca.evictions, cb.evictions), (3, 3), "{ca:?} {cb:?}");
    assert!(count_fds() < fds, "the idle connections' descriptors were closed");
    cycle(&a, &b, 4096, 9);
}

fn connect_accept_between(a: &StackNet, b: &StackNet, handle: &mut Handle, listen: Comm) -> (Comm, (Comm, ())) {
    let (mut send, mut recv) = (None, None);
    let start = Instant::now();
    while send.is_none() || recv.is_none() {
        if send.is_none() {
            send = a.connect(0, handle).unwrap();
        }
        if recv.is_none() {
            recv = b.accept(listen).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(20), "connect/accept timed out");
    }
    (send.unwrap(), (recv.unwrap().0, ()))
}

#[test]
fn a_peer_that_goes_away_while_its_connection_is_pooled_costs_a_fresh_connect() {
    let _serial = serial();
    let (a, b) = (builtin(|_| {}), builtin(|_| {}));
    cycle(&a, &b, 64, 0);
    // The peer's side of the idle connection closes (its process ending closes it the same way).
    b.shim.drain_pool();
    assert_eq!(counts(&b).idle_recv, 0);
    let before = counts(&a);
    cycle(&a, &b, 1 << 20, 1);
    let after = counts(&a);
    assert_eq!(after.hits, before.hits, "the dead connection was not reused: {after:?}");
    assert!(after.evictions > before.evictions, "it was dropped: {after:?}");
    // The new connection is pooled and reused as usual.
    cycle(&a, &b, 4096, 2);
    assert_eq!(counts(&a).hits, after.hits + 1);
    assert!(
        a.errors().is_empty() && b.errors().is_empty(),
        "{:?} {:?}",
        a.errors(),
        b.errors()
    );
}

#[test]
fn a_peer_whose_settings_differ_gets_no_reused_connection() {
    let _serial = serial();
    let small = |c: &mut Config| c.recovery.copy_max = 16 << 10;
    let (a, b) = (builtin(|_| {}), builtin(small));
    cycle(&a, &b, 64, 0);
    assert_eq!(counts(&a).idle_send, 1);
    cycle(&a, &b, 100_000, 1);
    let c = counts(&a);
    assert_eq!(c.hits, 0, "denied: {c:?}");
    assert!(
        counts(&b).evictions >= 1,
        "the listener closed its side: {:?}",
        counts(&b)
    );
    // Between stacks whose settings agree, reuse works.
    let b2 = builtin(|_| {});
    cycle(&a, &b2, 64, 2);
    cycle(&a, &b2, 64, 3);
    assert_eq!(counts(&a).hits, 1);
}

#[test]
fn connects_racing_the_listeners_eviction_always_end_with_a_working_connection() {
    let _serial = serial();
    let idle = Duration::from_millis(150);
    let (a, b) = (
        builtin(|c| c.pool.idle = Duration::from_secs(10)),
        builtin(|c| c.pool.idle = idle),
    );
    cycle(&a, &b, 64, 0);
    let fds = count_fds();
    // Each claim arrives around the time the listener closes the idle connection.
    for i in 0..16u64 {
        std::thread::sleep(idle - Duration::from_millis(40) + Duration::from_millis(5 * i));
        cycle(&a, &b, SIZES[i as usize % SIZES.len()], 10 + i);
    }
    let (ca, cb) = (counts(&a), counts(&b));
    assert!(
        ca.hits > 0 && cb.evictions > 0,
        "some reused, some evicted: {ca:?} {cb:?}"
    );
    let grown = count_fds() as i64 - fds as i64;
    assert!(grown.abs() <= 4, "descriptors grew by {grown}");
    assert!(
        a.errors().is_empty() && b.errors().is_empty(),
        "{:?} {:?}",
        a.errors(),
        b.errors()
    );
}

#[test]
fn a_comm_whose_peer_closed_into_the_pool_fails_what_can_never_complete() {
    let _serial = serial();
    let (a, b) = (builtin(|_| {}), builtin(|_| {}));
    // The sender closes first, after its last send was received: the receive posted after that
    // fails, naming the closed peer, instead of waiting for ever.
    let (mut handle, listen) = b.listen(0).unwrap();
    let (send, (recv, _)) = connect_accept_between(&a, &b, &mut handle, listen);
    b.close_listen(listen).unwrap();
    transfer_between(&a, send, &b, recv, &TransferOpts::new(512));
    a.close_send(send).unwrap();
    let buf = AlignedBuf::new(4096);
    let mr = b.reg_buf(recv, &buf, PTR_HOST).unwrap();
    let req = poll_until("irecv", || b.irecv(recv, buf.as_ptr(), 4096, 0, mr).unwrap());
    let start = Instant::now();
    let failed = loop {
        match b.test(req) {
            Ok(None) if start.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(1)),
            Ok(None) => break false,
            Ok(Some(_)) => panic!("a receive completed with nothing sent"),
            Err(_) => break true,
        }
    };
    assert!(failed, "the receive is still waiting after {:?}", start.elapsed());
    let err = b.last_error().unwrap_or_default();
    assert!(err.contains("send comm closed after 1 messages"), "{err}");
    let _ = b.dereg_mr(recv, mr);
    b.close_recv(recv).unwrap();
    // The failed side's connection is not pooled; the next communicator connects afresh and works.
    cycle(&a, &b, 4096, 5);
    assert!(a.errors().is_empty(), "{:?}", a.errors());
}

#[test]
fn a_claim_is_answered_without_waiting_for_the_listeners_accept() {
    let _serial = serial();
    let (a, b) = (builtin(|_| {}), builtin(|_| {}));
    cycle(&a, &b, 64, 0);
    let (mut handle, listen) = b.listen(0).unwrap();
    // The connector gets its comm while the listening side makes no call at all (its NCCL may be
    // busy elsewhere in its set-up): the links' thread answered the claim.
    let send = poll_until("the pooled connect", || a.connect(0, &mut handle).unwrap());
    assert_eq!(counts(&a).hits, 1, "{:?}", counts(&a));
    // The first accept returns the connection granted to this listen comm.
    let (recv, _) = b
        .accept(listen)
        .unwrap()
        .expect("the granted connection, at the first accept");
    b.close_listen(listen).unwrap();
    transfer_between(&a, send, &b, recv, &TransferOpts::new(70_000));
    a.close_send(send).unwrap();
    b.close_recv(recv).unwrap();
}

#[test]
fn a_claim_that_comes_before_the_listeners_comm_closes_is_answered_when_it_does() {
    let _serial = serial();
    let (a, b) = (builtin(|_| {}), builtin(|_| {}));
    let (mut handle, listen) = b.listen(0).unwrap();
    let (send, (recv, _)) = connect_accept_between(&a, &b, &mut handle, listen);
    b.close_listen(listen).unwrap();
    transfer_between(&a, send, &b, recv, &TransferOpts::new(300));
    // The connector's side closes and claims its connection for a new communicator at once,
    // while the listener's old comm is still open: the claim waits on that comm's link.
    a.close_send(send).unwrap();
    let (mut handle, listen) = b.listen(0).unwrap();
    assert_eq!(
        a.connect(0, &mut handle).unwrap(),
        None,
        "no answer while the old comm is open"
    );
    b.close_recv(recv).unwrap();
    let send = poll_until("the pooled connect", || a.connect(0, &mut handle).unwrap());
    let recv = poll_until("the accept", || b.accept(listen).unwrap()).0;
    b.close_listen(listen).unwrap();
    assert_eq!(counts(&a).hits, 1, "{:?}", counts(&a));
    transfer_between(&a, send, &b, recv, &TransferOpts::new(1 << 20));
    a.close_send(send).unwrap();
    b.close_recv(recv).unwrap();
}
