//! The settings check between peers (NCCL_TCPXSHIM_CONFIG_CHECK): two stacks built in this
//! process from different `Config::from_vars`, one listening and one connecting, over the
//! built-in transport on loopback and over the TCPX stand-in (tests/fixtures/netfixture.c), with
//! the inner handle inline and served.
//!
//! Tests of this file run in parallel and share the in-process log, so each picks its lines by
//! the address of its own listener's control service, which is unique to the stack.

mod common;

use common::*;
use std::collections::HashMap;
use std::time::Instant;
use tcpxshim::ffi::ncclResult_t;
use tcpxshim::stack::cfgcheck::CheckStats;
use tcpxshim::stack::handle::{Trailer, FLAG_POOL, FLAG_RECOVERY, FLAG_SERVED, FLAG_SETTINGS};

/// A config from these variables, with the control service on loopback.
fn cfg(vars: &[(&str, &str)]) -> Config {
    let mut m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    m.entry("NCCL_TCPXSHIM_CTRL_ADDR".into()).or_insert("127.0.0.1".into());
    Config::from_vars(&|k| m.get(k).cloned()).expect("config")
}

fn builtin(mode: &str, vars: &[(&str, &str)]) -> StackNet {
    let mut v = vec![
        ("NCCL_TCPXSHIM_PLUGIN", "builtin"),
        ("NCCL_TCPXSHIM_TCP_IFNAME", "lo"),
        ("NCCL_TCPXSHIM_HANDLE", mode),
    ];
    v.extend_from_slice(vars);
    StackNet::build(&cfg(&v))
}

/// A private copy of the TCPX stand-in, for the two stacks of one test to share.
fn tcpx_fixture() -> (String, FixtureCtl) {
    let path = private_copy(&fixture_lib(Fixture::Tcpx));
    let ctl = FixtureCtl::open(&path);
    (path.to_string_lossy().into_owned(), ctl)
}

fn over(plugin: &str, mode: &str, vars: &[(&str, &str)]) -> StackNet {
    let mut v = vec![("NCCL_TCPXSHIM_PLUGIN", plugin), ("NCCL_TCPXSHIM_HANDLE", mode)];
    v.extend_from_slice(vars);
    StackNet::build(&cfg(&v))
}

/// The listener's control service as its handle names it ("127.0.0.1:PORT").
fn ctrl_of(h: &Handle) -> String {
    Trailer::read(h)
        .unwrap()
        .ctrl_socket()
        .expect("the handle names a control service")
        .to_string()
}

/// The WARN lines since `mark` about the listener at `ctrl`.
fn warns(mark: usize, ctrl: &str) -> Vec<String> {
    in_process_log()
        .since(mark)
        .into_iter()
        .filter(|l| l.starts_with("WARN") && l.contains(ctrl))
        .collect()
}

/// Calls connect on `b` and accept on `a` until both are done (bounded); the first error of
/// connect is returned.
fn connect_accept(a: &StackNet, b: &StackNet, h: &mut Handle, listen: Comm) -> NetResult<(Comm, Comm)> {
    let (mut send, mut recv) = (None, None);
    let start = Instant::now();
    let mut i = 0;
    while send.is_none() || recv.is_none() {
        if send.is_none() {
            send = b.connect(0, h)?;
        }
        if recv.is_none() {
            recv = a.accept(listen).expect("accept").map(|(c, _)| c);
        }
        assert!(start.elapsed() < DEADLINE, "connect and accept within {DEADLINE:?}");
        backoff(i);
        i += 1;
    }
    Ok((send.unwrap(), recv.unwrap()))
}

/// Connects `b` to a listen of `a`, checks a transfer from `b` to `a` (driven by each side's own
/// stack), closes everything; returns the listener's control service.
fn connect_and_use(a: &StackNet, b: &StackNet) -> String {
    let (mut h, listen) = a.listen(0).unwrap();
    let ctrl = ctrl_of(&h);
    let (send, recv) = connect_accept(a, b, &mut h, listen)
        .unwrap_or_else(|e| panic!("connect failed: {} ({:?})", result_name(e), b.last_error()));
    transfer_between(b, send, a, recv, 3000);
    b.close_send(send).unwrap();
    a.close_recv(recv).unwrap();
    a.close_listen(listen).unwrap();
    ctrl
}

/// One message of `size` pattern bytes from `send` (of stack `s`) to `recv` (of stack `r`).
fn transfer_between(s: &StackNet, send: Comm, r: &StackNet, recv: Comm, size: usize) {
    let mut src = AlignedBuf::new(size);
    src.fill_pattern(7);
    let dst = AlignedBuf::new(size);
    let smr = s.reg_buf(send, &src, PTR_HOST).unwrap();
    let rmr = r.reg_buf(recv, &dst, PTR_HOST).unwrap();
    let rreq = r.post_recv(recv, dst.as_ptr(), size as i32, 1, rmr).unwrap();
    let sreq = s.post_send(send, src.as_ptr(), size as i32, 1, smr).unwrap();
    let start = Instant::now();
    let (mut sd, mut rd) = (None, None);
    let mut i = 0;
    while sd.is_none() || rd.is_none() {
        if sd.is_none() {
            sd = s.test(sreq).unwrap();
        }
        if rd.is_none() {
            rd = r.test(rreq).unwrap();
        }
        assert!(start.elapsed() < DEADLINE, "transfer within {DEADLINE:?}");
        backoff(i);
        i += 1;
    }
    assert_eq!(rd, Some(size as i32));
    r.irecv_consumed(recv, rreq).unwrap();
    assert_eq!(dst.find_mismatch(7, 0..size), None, "every byte arrived");
    s.dereg_mr(send, smr).unwrap();
    r.dereg_mr(recv, rmr).unwrap();
}

#[test]
fn the_same_settings_give_no_warning_in_both_handle_modes_over_the_builtin_transport() {
    for mode in ["auto", "served"] {
        let vars = [("NCCL_TCPXSHIM_TCP_STREAMS", "2")];
        let (a, b) = (builtin(mode, &vars), builtin(mode, &vars));
        let mark = in_process_log().mark();
        let ctrl = connect_and_use(&a, &b);
        assert_eq!(
            b.shim.check_stats(),
            CheckStats {
                compared: 1,
                ..CheckStats::default()
            },
            "{mode}: compared once, no difference"
        );
        assert_eq!(a.shim.settings_requests(), Some(1), "{mode}: one settings request");
        assert_eq!(warns(mark, &ctrl), Vec::<String>::new(), "{mode}: no WARN");
    }
}

#[test]
fn the_handle_offers_the_settings_in_both_modes() {
    for (mode, served) in [("auto", 0), ("served", FLAG_SERVED)] {
        let a = builtin(mode, &[]);
        let (h, listen) = a.listen(0).unwrap();
        let t = Trailer::read(&h).unwrap();
        // The recovery engine (on by default) also offers its control link in the trailer, and
        // the pool (on by default) takes claims for the listen comm.
        assert_eq!(
            t.flags,
            served | FLAG_SETTINGS | FLAG_RECOVERY | FLAG_POOL,
            "{mode}: {t:?}"
        );
        assert!(t.ctrl_socket().is_some(), "{mode}: names the service");
        a.close_listen(listen).unwrap();
    }
}

#[test]
fn different_stream_counts_are_named_with_both_values_before_the_builtin_transport_refuses() {
    for mode in ["auto", "served"] {
        let a = builtin(mode, &[("NCCL_TCPXSHIM_TCP_STREAMS", "4")]);
        let b = builtin(mode, &[("NCCL_TCPXSHIM_TCP_STREAMS", "8")]);
        let mark = in_process_log().mark();
        let (mut h, listen) = a.listen(0).unwrap();
        let ctrl = ctrl_of(&h);
        let res = poll_until("connect", || match b.connect(0, &mut h) {
            Ok(None) => None,
            other => Some(other),
        });
        assert!(res.is_err(), "{mode}: the transport refuses different stream counts");
        let err = b.last_error().unwrap();
        assert!(
            err.contains("expects 4 data streams but this rank uses 8"),
            "{mode}: {err}"
        );
        let w = warns(mark, &ctrl);
        assert_eq!(w.len(), 1, "{mode}: one WARN for the connection: {w:?}");
        assert!(
            w[0].contains("NCCL_TCPXSHIM_TCP_STREAMS: here 8, peer 4"),
            "{mode}: {}",
            w[0]
        );
        assert!(
            !w[0].contains("NCCL_TCPXSHIM_TCP_INLINE"),
            "only what differs: {}",
            w[0]
        );
        assert!(
            w[0].contains("NCCL_TCPXSHIM_CONFIG_CHECK=enforce"),
            "names the setting: {}",
            w[0]
        );
        assert_eq!(b.shim.check_stats().differed, 1);
        a.close_listen(listen).unwrap();
    }
}

#[test]
fn enforce_fails_the_connect_with_the_differences() {
    for mode in ["auto", "served"] {
        let a = builtin(mode, &[("NCCL_TCPXSHIM_TCP_INLINE", "100")]);
        let b = builtin(
            mode,
            &[
                ("NCCL_TCPXSHIM_TCP_INLINE", "200"),
                ("NCCL_TCPXSHIM_CONFIG_CHECK", "enforce"),
            ],
        );
        let (mut h, listen) = a.listen(0).unwrap();
        let ctrl = ctrl_of(&h);
        let res = poll_until("connect", || match b.connect(0, &mut h) {
            Ok(None) => None,
            other => Some(other),
        });
        assert_eq!(res.err(), Some(ncclResult_t::ncclInvalidUsage), "{mode}");
        let err = b.last_error().unwrap();
        assert!(
            err.contains("NCCL_TCPXSHIM_TCP_INLINE: here 200, peer 100"),
            "{mode}: {err}"
        );
        assert!(
            err.contains("NCCL_TCPXSHIM_CONFIG_CHECK=enforce refuses"),
            "{mode}: {err}"
        );
        assert!(err.contains(&ctrl), "names the peer: {err}");
        a.close_listen(listen).unwrap();
    }
}

#[test]
fn over_tcpx_its_own_settings_are_compared_and_the_connect_goes_on_where_tcpx_allows() {
    for mode in ["auto", "served"] {
        let (plugin, ctl) = tcpx_fixture();
        // The built-in transport's stream count does not matter over TCPX; TCPX's chunk size does.
        let a = over(&plugin, mode, &[("NCCL_TCPXSHIM_TCP_STREAMS", "2")]);
        let b = over(
            &plugin,
            mode,
            &[
                ("NCCL_TCPXSHIM_TCP_STREAMS", "8"),
                ("NCCL_DYNAMIC_CHUNK_SIZE", "524288"),
            ],
        );
        let mark = in_process_log().mark();
        let ctrl = connect_and_use(&a, &b);
        let w = warns(mark, &ctrl);
        assert_eq!(w.len(), 1, "{mode}: one WARN: {w:?}");
        assert!(
            w[0].contains("NCCL_DYNAMIC_CHUNK_SIZE: here 524288, peer (unset)"),
            "{mode}: {}",
            w[0]
        );
        assert!(
            !w[0].contains("NCCL_TCPXSHIM_TCP_STREAMS"),
            "{mode}: not a TCPX setting: {}",
            w[0]
        );
        assert_eq!(ctl.violations(), 0, "{}", ctl.last_violation());
        // The same settings over TCPX: compared, no WARN.
        let c = over(&plugin, mode, &[("NCCL_DYNAMIC_CHUNK_SIZE", "524288")]);
        let mark = in_process_log().mark();
        let ctrl = connect_and_use(&b, &c);
        assert_eq!(warns(mark, &ctrl), Vec::<String>::new(), "{mode}");
        assert_eq!(c.shim.check_stats().compared, 1, "{mode}");
        assert_eq!(ctl.violations(), 0, "{}", ctl.last_violation());
    }
}

#[test]
fn enforce_over_tcpx_closes_the_comm_tcpx_returned() {
    let (plugin, ctl) = tcpx_fixture();
    let a = over(&plugin, "auto", &[("NCCL_SOCKET_NTHREADS", "4")]);
    let b = over(
        &plugin,
        "auto",
        &[("NCCL_SOCKET_NTHREADS", "6"), ("NCCL_TCPXSHIM_CONFIG_CHECK", "enforce")],
    );
    let (mut h, listen) = a.listen(0).unwrap();
    let res = poll_until("connect", || match b.connect(0, &mut h) {
        Ok(None) => None,
        other => Some(other),
    });
    assert_eq!(res.err(), Some(ncclResult_t::ncclInvalidUsage));
    let err = b.last_error().unwrap();
    assert!(err.contains("NCCL_SOCKET_NTHREADS: here 6, peer 4"), "{err}");
    a.close_listen(listen).unwrap();
    assert_eq!(ctl.violations(), 0, "{}", ctl.last_violation());
    assert_eq!(ctl.live_objects(), 0, "the send comm TCPX returned was closed");
}

#[test]
fn off_checks_nothing_and_asks_no_service() {
    // Inline and off on both sides, and no recovery engine (whose control links would start
    // the service): the trailer is as before, and no control service runs.
    let (a, b) = (
        builtin(
            "auto",
            &[("NCCL_TCPXSHIM_CONFIG_CHECK", "off"), ("NCCL_TCPXSHIM_RECOVERY", "0")],
        ),
        builtin(
            "auto",
            &[
                ("NCCL_TCPXSHIM_CONFIG_CHECK", "off"),
                ("NCCL_TCPXSHIM_RECOVERY", "0"),
                ("NCCL_TCPXSHIM_TCP_STREAMS", "4"),
            ],
        ),
    );
    let (h, listen) = a.listen(0).unwrap();
    assert_eq!(Trailer::read(&h).unwrap().flags, 0);
    assert_eq!(Trailer::read(&h).unwrap().ctrl_socket(), None);
    a.close_listen(listen).unwrap();
    let (mut h, listen) = a.listen(0).unwrap();
    let (send, recv) = connect_accept(&a, &b, &mut h, listen).unwrap();
    assert_eq!(a.shim.settings_requests(), None, "no control service started");
    assert_eq!(b.shim.check_stats(), CheckStats::default());
    b.close_send(send).unwrap();
    a.close_recv(recv).unwrap();
    a.close_listen(listen).unwrap();

    // Served, off on both sides: the service serves the handle, no settings.
    let vars = [("NCCL_TCPXSHIM_CONFIG_CHECK", "off")];
    let (a, b) = (builtin("served", &vars), builtin("served", &vars));
    connect_and_use(&a, &b);
    assert_eq!(a.shim.settings_requests(), Some(0), "served, but no settings request");

    // The listener offers, the connecting side is off: it does not ask.
    let (a, b) = (builtin("auto", &[]), builtin("auto", &vars));
    connect_and_use(&a, &b);
    assert_eq!(a.shim.settings_requests(), Some(0), "off does not ask");
    assert_eq!(b.shim.check_stats(), CheckStats::default());
}

#[test]
fn a_peer_whose_service_is_gone_is_reported_once_and_the_connects_go_on() {
    let a = builtin("auto", &[]);
    let b = builtin("auto", &[]);
    // A port nobody listens on: bound, then closed.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mark = in_process_log().mark();
    for _ in 0..2 {
        let (mut h, listen) = a.listen(0).unwrap();
        let mut t = Trailer::read(&h).unwrap();
        t.set_ctrl_socket(dead);
        t.write(&mut h);
        let (send, recv) = connect_accept(&a, &b, &mut h, listen).expect("the connect goes on");
        transfer_between(&b, send, &a, recv, 100);
        b.close_send(send).unwrap();
        a.close_recv(recv).unwrap();
        a.close_listen(listen).unwrap();
    }
    // (The recovery engine's control link to that address reports its own failure too.)
    let w: Vec<String> = warns(mark, &dead.to_string())
        .into_iter()
        .filter(|l| l.contains("settings"))
        .collect();
    assert_eq!(w.len(), 1, "reported once for the peer: {w:?}");
    assert!(w[0].contains("settings not compared"), "{}", w[0]);
    assert_eq!(b.shim.check_stats().unchecked, 2);
}

#[test]
fn a_peer_that_offers_no_settings_is_connected_as_before() {
    // What an older tcpxshim writes: no FLAG_SETTINGS.
    let (a, b) = (builtin("auto", &[]), builtin("auto", &[]));
    let (mut h, listen) = a.listen(0).unwrap();
    let mut t = Trailer::read(&h).unwrap();
    t.flags &= !FLAG_SETTINGS;
    t.write(&mut h);
    let (send, recv) = connect_accept(&a, &b, &mut h, listen).unwrap();
    transfer_between(&b, send, &a, recv, 100);
    assert_eq!(b.shim.check_stats().not_offered, 1);
    assert_eq!(a.shim.settings_requests(), Some(0));
    b.close_send(send).unwrap();
    a.close_recv(recv).unwrap();
    a.close_listen(listen).unwrap();
}

#[test]
fn many_connections_to_one_peer_cost_one_fetch() {
    // Fresh connections each (a reused one is checked by the pool's digest of the settings).
    let no_pool = [("NCCL_TCPXSHIM_POOL", "0")];
    let (a, b) = (builtin("auto", &no_pool), builtin("auto", &no_pool));
    for _ in 0..5 {
        connect_and_use(&a, &b);
    }
    assert_eq!(a.shim.settings_requests(), Some(1), "the peer's verdict is kept");
    assert_eq!(b.shim.check_stats().compared, 5, "every connection checked");
}
