//! The shim over loaded plugins: the fixture plugin through its v7, v6 and v5 symbols, and the
//! TCPX look-alike, whose rules (same handle buffer on repeated connect, one accept per listen
//! comm, a valid device-handle pointer, FIFO test order, at most 16 outstanding, irecvConsumed in
//! order) it polices: any rule the shim breaks shows up in its violation counter. Also the
//! handles the shim serves from its control service (an inner handle with no room for the trailer,
//! or served mode forced), and its stall warning over a plugin that says nothing itself.
//!
//! Each test builds a stack of its own in this process, from a config naming a private copy of the
//! fixture, and drives it through the stack's Rust interface ([`StackNet`]).

mod common;

use common::*;
use std::ffi::c_void;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use tcpxshim::stack::handle::{HandleMode, Trailer, FLAG_SERVED, INNER_HANDLE_SIZE};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A stack of its own over a fresh fixture instance (a private copy), with knobs set before the
/// shim initialises it, built in this process from a config naming that copy.
fn shim_over(kind: Fixture, knobs: &[(&str, i64)]) -> (StackNet, FixtureCtl) {
    shim_with(kind, knobs, |_| {})
}

fn assert_clean(net: &StackNet, kind: Fixture, ctl: &FixtureCtl) {
    // The pool keeps cleanly closed connections open until it is drained.
    net.shim.drain_pool();
    assert_eq!(
        ctl.violations(),
        0,
        "{}: the shim broke a rule: {}",
        kind.net_name(),
        ctl.last_violation()
    );
    assert_eq!(
        ctl.live_objects(),
        0,
        "{}: comms, requests or registrations left open",
        kind.net_name()
    );
}

/// Posts `n` receives and then `n` sends of `size` bytes (each buffer registered on its own) and
/// completes them in posting order.
fn outstanding(net: &dyn Driver, send: Comm, recv: Comm, n: usize, size: usize) {
    let sbufs: Vec<AlignedBuf> = (0..n).map(|_| AlignedBuf::new(size)).collect();
    let rbufs: Vec<AlignedBuf> = (0..n).map(|_| AlignedBuf::new(size)).collect();
    let smrs: Vec<Mr> = sbufs.iter().map(|b| net.reg_buf(send, b, PTR_HOST).unwrap()).collect();
    let rmrs: Vec<Mr> = rbufs.iter().map(|b| net.reg_buf(recv, b, PTR_HOST).unwrap()).collect();
    let sz = size as i32;
    let r: Vec<Req> = rbufs
        .iter()
        .zip(&rmrs)
        .map(|(b, m)| net.post_recv(recv, b.as_ptr(), sz, 0, *m).unwrap())
        .collect();
    let s: Vec<Req> = sbufs
        .iter()
        .zip(&smrs)
        .map(|(b, m)| net.post_send(send, b.as_ptr(), sz, 0, *m).unwrap())
        .collect();
    for (a, b) in s.into_iter().zip(r) {
        assert_eq!(net.wait_both(a, b).unwrap(), (sz, sz));
        // NCCL releases every receive of a comm with a device handle (TCPX) once consumed.
        net.irecv_consumed(recv, b).unwrap();
    }
    for m in smrs {
        net.dereg_mr(send, m).unwrap();
    }
    for m in rmrs {
        net.dereg_mr(recv, m).unwrap();
    }
}

fn wraps(kind: Fixture, version: u32) {
    let (net, ctl) = shim_over(kind, &[]);
    assert_eq!(net.name(), kind.net_name(), "the inner transport's name is reported");
    // What install_global logs at INFO once a stack becomes the process's.
    let loaded = net.shim.summary();
    assert!(
        loaded.starts_with(&format!("loaded {} from {}", kind.net_name(), net.shim.info().source))
            && loaded.contains(&format!("(ncclNet v{version})"))
            && loaded.contains("2 device(s)"),
        "{loaded}"
    );
    assert_eq!(ctl.init_count(), 1, "the inner plugin is initialised once");
    assert_eq!(net.devices().unwrap(), 2);
    let p = net.properties(1).unwrap();
    assert_eq!(
        (p.name.as_str(), p.guid, p.ptr_support, p.max_recvs),
        ("fix1", 1, PTR_HOST, 1)
    );
    assert_eq!(
        net.has_reg_mr_dmabuf(),
        version >= 6,
        "regMrDmaBuf mirrors the inner table"
    );
    let (send, recv) = net.connect_pair(1);
    for size in [0, 1, 4095, (1 << 20) + 3] {
        net.transfer(send, recv, size);
    }
    outstanding(&net, send, recv, 32, 64);
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert_clean(&net, kind, &ctl);
}

#[test]
fn wraps_a_v7_plugin() {
    wraps(Fixture::V7, 7);
}

#[test]
fn wraps_a_v6_plugin() {
    wraps(Fixture::V6, 6);
}

#[test]
fn wraps_a_v5_plugin() {
    wraps(Fixture::V5, 5);
}

#[test]
fn tcpx_properties_and_name_pass_through() {
    let (net, ctl) = shim_over(Fixture::Tcpx, &[]);
    assert_eq!(
        net.name(),
        "GPUDirectTCPX_v7",
        "NCCL_NET=GPUDirectTCPX_v7 keeps working"
    );
    assert_eq!(net.devices().unwrap(), 4);
    for dev in 0..4 {
        let p = net.properties(dev).unwrap();
        assert_eq!(p.name, format!("eth{}", dev + 1));
        assert_eq!(p.ptr_support, PTR_HOST | PTR_CUDA);
        assert_eq!((p.net_device_type, p.net_device_version), (1, 7), "UNPACK, version 0x7");
        assert_eq!((p.guid, p.port, p.max_comms, p.max_recvs), (dev as u64, 0, 65536, 1));
        assert_eq!(
            (p.speed, p.latency),
            (200_000, 0.0),
            "speed and latency as TCPX reports them"
        );
    }
    assert!(
        !net.has_reg_mr_dmabuf(),
        "TCPX has no regMrDmaBuf, so neither does the shim"
    );
    assert_clean(&net, Fixture::Tcpx, &ctl);
}

#[test]
fn tcpx_quirks_are_respected_end_to_end() {
    let (net, ctl) = shim_over(Fixture::Tcpx, &[]);
    // connect is called repeatedly with the same handle buffer; accept gets a real device handle.
    let pair = net.connect_pair_full(2);
    assert_eq!(
        pair.dev_handle.netDeviceType, 1,
        "accept filled NCCL's device handle (UNPACK)"
    );
    assert_eq!(pair.dev_handle.netDeviceVersion, 7);
    let (send, recv) = (pair.send, pair.recv);
    // Receives into CUDA-registered memory need irecvConsumed, forwarded in order.
    for size in [1usize, 4096, 100_000, 1 << 20] {
        let mut o = TransferOpts::new(size);
        o.recv_type = PTR_CUDA;
        net.transfer_opts(send, recv, &o);
    }
    let buf = AlignedBuf::new(4096);
    let rmr = net.reg_buf(recv, &buf, PTR_CUDA).unwrap();
    assert!(
        !net.get_device_mr(recv, rmr).unwrap().is_null(),
        "getDeviceMr is forwarded"
    );
    net.dereg_mr(recv, rmr).unwrap();
    // 16 outstanding requests, tested in FIFO order.
    outstanding(&net, send, recv, 16, 256);
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert_clean(&net, Fixture::Tcpx, &ctl);
}

#[test]
fn tcpx_try_again_is_passed_through_while_the_background_connect_finishes() {
    let (net, ctl) = shim_over(Fixture::Tcpx, &[("bg_polls", 5)]);
    let (send, recv) = net.connect_pair(0);
    let buf = AlignedBuf::new(64);
    let rbuf = AlignedBuf::new(64);
    let smr = net.reg_buf(send, &buf, PTR_HOST).unwrap();
    assert!(
        net.isend(send, buf.as_ptr(), 64, 0, smr).unwrap().is_none(),
        "NULL request: try again"
    );
    let rmr = net.reg_buf(recv, &rbuf, PTR_HOST).unwrap();
    let r = net.post_recv(recv, rbuf.as_ptr(), 64, 0, rmr).unwrap();
    let s = net.post_send(send, buf.as_ptr(), 64, 0, smr).unwrap();
    assert_eq!(net.wait_both(s, r).unwrap(), (64, 64));
    net.irecv_consumed(recv, r).unwrap();
    net.dereg_mr(send, smr).unwrap();
    net.dereg_mr(recv, rmr).unwrap();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert_clean(&net, Fixture::Tcpx, &ctl);
}

#[test]
fn the_shim_does_not_hide_a_callers_broken_rule() {
    // The shim adds no reordering: a caller testing out of FIFO order is caught by TCPX itself.
    let (net, ctl) = shim_over(Fixture::Tcpx, &[("complete_polls", 1)]);
    let (send, recv) = net.connect_pair(0);
    let buf = AlignedBuf::new(128);
    let smr = net.reg_buf(send, &buf, PTR_HOST).unwrap();
    let second: *mut c_void = buf.as_slice()[64..].as_ptr() as *mut c_void;
    let s1 = net.post_send(send, buf.as_ptr(), 64, 0, smr).unwrap();
    let s2 = net.post_send(send, second, 64, 0, smr).unwrap();
    let out_of_order = net.test(s2);
    assert!(
        out_of_order.is_err(),
        "TCPX rejects test() out of FIFO order, and the shim passes that on"
    );
    assert!(
        ctl.violations() >= 1 && ctl.last_violation().contains("FIFO"),
        "{}",
        ctl.last_violation()
    );
    let _ = (s1, smr);
    ctl.reset_violations();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
}

/// Listens on `dev`, checks that the handle is served by a control service on 127.0.0.1 (the
/// configs' ctrl_addr), connects and accepts, and closes the listen comm. Returns the pair and the
/// service's address.
fn served_pair(net: &dyn Driver, dev: i32) -> (Comm, Comm, SocketAddr) {
    let (mut handle, listen) = net.listen(dev).unwrap();
    let t = Trailer::read(&handle).expect("a tcpxshim handle");
    assert_ne!(t.flags & FLAG_SERVED, 0, "the handle says it is served: {t:?}");
    let ctrl = t.ctrl_socket().expect("the handle names the control service");
    assert_eq!(ctrl.ip(), LOCALHOST, "the service listens on the configured ctrl_addr");
    assert!(
        handle[..INNER_HANDLE_SIZE].iter().all(|&b| b == 0),
        "a served handle carries only the trailer"
    );
    let (send, (recv, _)) = net.connect_accept(dev, &mut handle, listen);
    net.close_listen(listen).unwrap();
    (send, recv, ctrl)
}

#[test]
fn an_inner_handle_longer_than_its_share_is_served_and_carries_verified_traffic() {
    let (net, ctl) = shim_over(Fixture::V7, &[("handle_bytes", 100)]);
    let (send, recv, ctrl) = served_pair(&net, 0);
    outstanding(&net, send, recv, 4, 4096);
    let ctrl = ctrl.to_string();
    let lines = in_process_log().lines_with(&["writes past byte 88", "control service", &ctrl]);
    assert!(
        lines.len() == 1 && lines[0].starts_with("INFO"),
        "one INFO line says why the handle is served: {lines:?}"
    );
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert_clean(&net, Fixture::V7, &ctl);
}

#[test]
fn a_served_handle_of_a_plugin_that_zeroes_and_writes_all_128_bytes_carries_verified_traffic() {
    let (net, ctl) = shim_over(Fixture::V7, &[("handle_bytes", 128), ("handle_zero_all", 1)]);
    let (send, recv, _) = served_pair(&net, 1);
    for size in [0, 1, 4097, (1 << 20) + 5] {
        net.transfer(send, recv, size);
    }
    outstanding(&net, send, recv, 8, 1000);
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert_eq!(net.shim.open_comms(), 0);
    assert_clean(&net, Fixture::V7, &ctl);
}

#[test]
fn a_served_tcpx_handle_of_all_128_bytes_keeps_the_tcpx_quirks() {
    // The fixture polices quirk 1 (its connect returns a NULL comm 3 times and checks that every
    // call gets the buffer its first call wrote its state into, unchanged), quirk 2 (one accept per
    // listen comm) and quirk 3 (accept gets a valid device-handle pointer).
    let (net, ctl) = shim_over(Fixture::Tcpx, &[("handle_bytes", 128), ("handle_zero_all", 1)]);
    assert_eq!(ctl.get("connect_nulls"), 3);
    let mut pairs = Vec::new();
    for dev in 0..2 {
        let (send, recv, _) = served_pair(&net, dev);
        pairs.push((send, recv));
    }
    for &(send, recv) in &pairs {
        for size in [1usize, 4096, 100_003] {
            let mut o = TransferOpts::new(size);
            o.recv_type = PTR_CUDA;
            net.transfer_opts(send, recv, &o);
        }
        outstanding(&net, send, recv, 16, 512);
    }
    for (send, recv) in pairs {
        net.close_send(send).unwrap();
        net.close_recv(recv).unwrap();
    }
    assert_clean(&net, Fixture::Tcpx, &ctl);
}

#[test]
fn forced_served_mode_carries_traffic_over_the_builtin_transport() {
    let mut cfg = Config {
        plugin: Some("builtin".into()),
        handle_mode: HandleMode::Served,
        ctrl_addr: Some(LOCALHOST),
        ..Config::default()
    };
    cfg.tcp.ifname = Some("lo".into());
    let net = StackNet::build(&cfg);
    let (send, recv, _) = served_pair(&net, 0);
    for size in [0, 3, 65537, (4 << 20) + 1] {
        net.transfer(send, recv, size);
    }
    outstanding(&net, send, recv, 8, 70_001);
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert_eq!(net.shim.open_comms(), 0);
}

#[test]
fn forced_served_mode_over_tcpx_keeps_its_quirks() {
    // TCPX's 88 bytes fit inline; forced served mode moves them to the control service, and the
    // fixture's quirk checks still see one unchanged buffer per connection.
    let (net, ctl) = shim_with(Fixture::Tcpx, &[], |c| c.handle_mode = HandleMode::Served);
    let (send, recv, _) = served_pair(&net, 3);
    let mut o = TransferOpts::new(1 << 20);
    o.recv_type = PTR_CUDA;
    net.transfer_opts(send, recv, &o);
    outstanding(&net, send, recv, 16, 64);
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert_clean(&net, Fixture::Tcpx, &ctl);
}

#[test]
fn a_pending_served_connect_copied_to_a_fresh_buffer_leaves_the_stale_buffer_an_error() {
    // In served mode the first bytes of NCCL's handle name the shim's pending connect. NCCL should
    // keep calling with one buffer; here the bytes are copied into a fresh buffer after the first
    // call, the copy finishes the connection, and the original is used again.
    let (net, ctl) = shim_with(Fixture::Tcpx, &[], |c| c.handle_mode = HandleMode::Served);
    let (mut original, listen) = net.listen(0).unwrap();
    assert_eq!(
        net.connect(0, &mut original),
        Ok(None),
        "TCPX's connect takes several calls"
    );
    assert_eq!(&original[..8], b"TXSHPEND", "the handle names the pending connect");
    let mut copy: Handle = original;
    let (send, (recv, _)) = net.connect_accept(0, &mut copy, listen);
    let t = std::time::Instant::now();
    let stale = net.connect(0, &mut original);
    assert_eq!(stale, Err(tcpxshim::ffi::ncclResult_t::ncclInvalidArgument));
    assert!(
        t.elapsed() < std::time::Duration::from_secs(1),
        "answered at once, not after a wait"
    );
    let msg = net.last_error().unwrap();
    assert!(
        msg.contains("names connect #") && msg.contains("which this process does not have"),
        "{msg}"
    );
    // Again: still an error, and no second connection was made from the handle.
    assert!(net.connect(0, &mut original).is_err());
    assert_eq!(net.shim.open_comms(), 3, "listen, send and recv comm only");
    net.transfer(send, recv, 4096);
    net.close_listen(listen).unwrap();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert_clean(&net, Fixture::Tcpx, &ctl);
}

/// The "outstanding for X s" age a stall warning gives.
fn warned_age(line: &str) -> f64 {
    let rest = line
        .split("outstanding for ")
        .nth(1)
        .unwrap_or_else(|| panic!("no age: {line}"));
    rest.split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no age: {line}"))
}

#[test]
fn a_request_the_inner_plugin_never_finishes_is_warned_about_once() {
    // The shim's own stall warning, over a loaded plugin that says nothing about its requests:
    // the fixture reports a matched send and receive "not done" for 20000 tests.
    const SIZE: i32 = 12_347; // no other test uses it
    let limit = std::time::Duration::from_millis(300);
    let (net, ctl) = shim_with(Fixture::V7, &[("complete_polls", 20_000)], |c| {
        c.stall_warn = Some(limit)
    });
    let (send, recv) = net.connect_pair(0);
    let sbuf = AlignedBuf::new(SIZE as usize);
    let rbuf = AlignedBuf::new(SIZE as usize);
    let smr = net.reg_buf(send, &sbuf, PTR_HOST).unwrap();
    let rmr = net.reg_buf(recv, &rbuf, PTR_HOST).unwrap();
    let r = net.post_recv(recv, rbuf.as_ptr(), SIZE, 0, rmr).unwrap();
    let s = net.post_send(send, sbuf.as_ptr(), SIZE, 0, smr).unwrap();
    let posted = std::time::Instant::now();
    // Until the limit, slowly: each pass sleeps, so fewer than 20000 tests happen before it.
    while posted.elapsed() < limit {
        assert_eq!(net.test(r), Ok(None));
        assert_eq!(net.test(s), Ok(None));
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    // Past it, as fast as NCCL's proxy: thousands of tests each (the clock is read every 1024).
    let (mut sdone, mut rdone) = (None, None);
    let mut tests_after = 0u32;
    while sdone.is_none() || rdone.is_none() {
        assert!(posted.elapsed() < DEADLINE, "the fixture completes after 20000 tests");
        if rdone.is_none() {
            rdone = net.test(r).unwrap();
            tests_after += 1;
        }
        if sdone.is_none() {
            sdone = net.test(s).unwrap();
        }
    }
    assert!(tests_after > 2048, "{tests_after} tests past the limit");
    assert_eq!((sdone, rdone), (Some(SIZE), Some(SIZE)), "both still complete normally");
    let stalls = in_process_log().lines_with(&["12347 bytes", "outstanding for"]);
    for (op, comm) in [("isend", send), ("irecv", recv)] {
        let label = net.label(comm).unwrap();
        let mine: Vec<&String> = stalls.iter().filter(|l| l.contains(op)).collect();
        assert_eq!(mine.len(), 1, "one warning per stalled request: {stalls:?}");
        let l = mine[0];
        assert!(l.starts_with("WARN") && l.contains("NET/TCPXSHIM test: "), "{l}");
        assert!(
            l.contains(&format!("{op} of 12347 bytes (tag 0) on {label}")),
            "names op, size and comm: {l}"
        );
        assert!(l.contains("Fixture_v7 dev 0"), "names the peer: {l}");
        assert!(l.contains("NCCL_TCPXSHIM_STALL_WARN=0.3 s"), "names the setting: {l}");
        let age = warned_age(l);
        assert!(age >= 0.3 && age < DEADLINE.as_secs_f64(), "age {age} s: {l}");
    }
    net.dereg_mr(send, smr).unwrap();
    net.dereg_mr(recv, rmr).unwrap();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert_clean(&net, Fixture::V7, &ctl);
}

#[test]
fn a_null_device_handle_pointer_is_passed_as_nccl_gave_it() {
    // NCCL always passes a valid recvDevComm; the shim must hand the same pointer on, so the
    // TCPX look-alike sees what NCCL gave. A NULL one is a caller error TCPX catches.
    let (net, ctl) = shim_over(Fixture::Tcpx, &[]);
    let (mut handle, listen) = net.listen(0).unwrap();
    let _ = net.connect(0, &mut handle).unwrap();
    let res = poll_until("accept to answer", || {
        // SAFETY: NULL recvDevComm on purpose: the fixture checks it and reports a violation.
        match unsafe { net.accept_raw(listen, std::ptr::null_mut()) } {
            Ok(None) => None,
            other => Some(other),
        }
    });
    assert!(res.is_err(), "accept without a device handle is an error");
    assert!(ctl.violations() >= 1);
    ctl.reset_violations();
    net.close_listen(listen).unwrap();
}

#[test]
fn a_tcpx_handle_travels_inline_with_its_state_slot_as_tcpx_left_it() {
    // Quirk 1: TCPX's 88 bytes fit the inner share, so the handle is inline (NCCL's own buffer
    // reaches TCPX on every connect), and bytes 80..88, where TCPX's first connect() stores its
    // state pointer, are exactly what TCPX's listen() left there (zero), whatever NCCL's buffer
    // held before. A non-zero slot would make TCPX dereference garbage.
    let (net, ctl) = shim_over(Fixture::Tcpx, &[]);
    let mut handle: Handle = [0xEE; tcpxshim::ffi::HANDLE_SIZE];
    let listen = net.listen_into(0, &mut handle).unwrap();
    let t = Trailer::read(&handle).expect("a tcpxshim handle");
    assert_eq!(t.flags & FLAG_SERVED, 0, "TCPX's handle fits inline: {t:?}");
    assert_eq!(INNER_HANDLE_SIZE, 88, "the inner share is TCPX's 88 bytes");
    assert!(
        handle[80..INNER_HANDLE_SIZE].iter().all(|&b| b == 0),
        "TCPX's state slot as its listen() left it: {:02x?}",
        &handle[80..INNER_HANDLE_SIZE]
    );
    // Every inner byte is TCPX's own, not NCCL's 0xEE: the fixture's header (magic and instance
    // nonce, the same in every handle of this instance; listen id; device; version) and its filler,
    // a function of the listen id (netfixture.c); compared against a second listen whose buffer
    // held 0x11.
    let mut other: Handle = [0x11; tcpxshim::ffi::HANDLE_SIZE];
    let other_listen = net.listen_into(0, &mut other).unwrap();
    assert_eq!(handle[..8], other[..8], "the fixture's magic");
    assert_eq!(handle[16..24], other[16..24], "the fixture instance's nonce");
    let id = u64::from_le_bytes(handle[8..16].try_into().unwrap());
    assert_ne!(id, u64::from_le_bytes([0xEE; 8]), "the listen id is TCPX's");
    assert_eq!(handle[24..32], [0, 0, 0, 0, 7, 0, 0, 0], "device 0, version 7");
    for (i, &b) in handle.iter().enumerate().take(80).skip(32) {
        let f = 0x5c ^ (i as u8).wrapping_mul(7) ^ id as u8;
        assert_eq!(b, if f != 0 { f } else { 0xff }, "byte {i} is TCPX's filler");
    }
    net.close_listen(other_listen).unwrap();
    let (send, (recv, dh)) = net.connect_accept(0, &mut handle, listen);
    assert_eq!((dh.netDeviceType, dh.netDeviceVersion), (1, 7));
    net.close_listen(listen).unwrap();
    net.transfer(send, recv, 4096);
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert_clean(&net, Fixture::Tcpx, &ctl);
}

#[test]
fn a_failed_tcpx_background_connect_is_an_error_through_the_shim() {
    // Quirk 4: isend/irecv answer "try again" until the background connect ends; when it failed,
    // they return an error, which the shim passes on (never as another "try again"), as the
    // remote error of a connection that cannot be recovered (tests/unpack_failfast.rs).
    let (net, ctl) = shim_over(Fixture::Tcpx, &[("connect_fail", 1)]);
    let (send, recv) = net.connect_pair(0);
    let buf = AlignedBuf::new(64);
    let smr = net.reg_buf(send, &buf, PTR_HOST).unwrap();
    let rmr = net.reg_buf(recv, &buf, PTR_HOST).unwrap();
    let start = std::time::Instant::now();
    let s = loop {
        assert!(start.elapsed() < DEADLINE, "isend kept answering try again");
        match net.isend(send, buf.as_ptr(), 64, 0, smr) {
            Ok(None) => continue,
            other => break other,
        }
    };
    assert_eq!(s, Err(tcpxshim::ffi::ncclResult_t::ncclRemoteError));
    let r = loop {
        assert!(start.elapsed() < DEADLINE, "irecv kept answering try again");
        match net.irecv(recv, buf.as_ptr(), 64, 0, rmr) {
            Ok(None) => continue,
            other => break other,
        }
    };
    assert_eq!(r, Err(tcpxshim::ffi::ncclResult_t::ncclRemoteError));
    net.dereg_mr(send, smr).unwrap();
    net.dereg_mr(recv, rmr).unwrap();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert_clean(&net, Fixture::Tcpx, &ctl);
}

#[test]
fn repeated_tcpx_connects_from_another_thread_still_reach_it_with_nccls_buffer() {
    // Quirk 1 is about the buffer, not the call site: the first connect() on this thread, the
    // later ones on another thread with the same NCCL buffer. A shim that hands TCPX a copy of the
    // handle on its own stack (even one copied back) gives TCPX another address there.
    let (net, ctl) = shim_over(Fixture::Tcpx, &[]);
    let (mut handle, listen) = net.listen(0).unwrap();
    assert_eq!(
        net.connect(0, &mut handle),
        Ok(None),
        "TCPX's connect takes several calls"
    );
    let addr = handle.as_mut_ptr() as usize;
    let net = &net;
    let send = std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: `handle` outlives the scope and nothing else touches it meanwhile.
            let h = unsafe { &mut *(addr as *mut Handle) };
            poll_until("connect on the second thread", || net.connect(0, h).unwrap())
        })
        .join()
        .unwrap()
    });
    let recv = poll_until("accept", || net.accept(listen).unwrap());
    net.close_listen(listen).unwrap();
    net.transfer(send, recv.0, 4096);
    net.close_send(send).unwrap();
    net.close_recv(recv.0).unwrap();
    assert_clean(net, Fixture::Tcpx, &ctl);
}

#[test]
fn the_shim_does_not_hide_a_callers_out_of_order_irecv_consumed() {
    // Quirk 7: irecvConsumed in completion order. The shim forwards the very receive NCCL names,
    // so a caller releasing the second completed receive first is caught by TCPX itself.
    let (net, ctl) = shim_over(Fixture::Tcpx, &[]);
    let (send, recv) = net.connect_pair(0);
    net.transfer(send, recv, 64); // the background connect is done
    let sbuf = AlignedBuf::new(128);
    let rbuf = AlignedBuf::new(128);
    let smr = net.reg_buf(send, &sbuf, PTR_HOST).unwrap();
    let rmr = net.reg_buf(recv, &rbuf, PTR_CUDA).unwrap();
    let half = |b: &AlignedBuf| b.as_slice()[64..].as_ptr() as *mut c_void;
    let r1 = net.post_recv(recv, rbuf.as_ptr(), 64, 0, rmr).unwrap();
    let r2 = net.post_recv(recv, half(&rbuf), 64, 0, rmr).unwrap();
    let s1 = net.post_send(send, sbuf.as_ptr(), 64, 0, smr).unwrap();
    let s2 = net.post_send(send, half(&sbuf), 64, 0, smr).unwrap();
    assert_eq!(net.wait_both(s1, r1).unwrap(), (64, 64));
    assert_eq!(net.wait_both(s2, r2).unwrap(), (64, 64));
    assert!(
        net.irecv_consumed(recv, r2).is_err(),
        "TCPX refuses the second receive first"
    );
    assert!(
        ctl.violations() >= 1 && ctl.last_violation().contains("out of completion order"),
        "{}",
        ctl.last_violation()
    );
    ctl.reset_violations();
    net.irecv_consumed(recv, r1).unwrap();
    net.irecv_consumed(recv, r2).unwrap();
    net.dereg_mr(send, smr).unwrap();
    net.dereg_mr(recv, rmr).unwrap();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert_clean(&net, Fixture::Tcpx, &ctl);
}

/// Metrics on, over TCPX: its quirks still hold (repeated connects with one
/// handle buffer, NULL requests meaning try again, UNPACK receives released by irecvConsumed with
/// the inner request), the fixture sees no broken rule, and the file counts every message.
#[test]
fn the_metrics_layer_keeps_the_tcpx_quirks_and_counts_every_message() {
    let dir = std::env::temp_dir().join(format!("tcpxshim-metrics-inner-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (net, ctl) = shim_with(Fixture::Tcpx, &[("bg_polls", 5)], |c| {
        c.metrics_dir = Some(dir.clone());
        c.metrics.host = "inner".into();
    });
    let pair = net.connect_pair_full(1);
    let (send, recv) = (pair.send, pair.recv);
    let buf = AlignedBuf::new(64);
    let smr = net.reg_buf(send, &buf, PTR_HOST).unwrap();
    assert!(
        net.isend(send, buf.as_ptr(), 64, 0, smr).unwrap().is_none(),
        "NULL request: try again, with metrics on too"
    );
    net.dereg_mr(send, smr).unwrap();
    for size in [1usize, 4096, 100_000, 1 << 20] {
        let mut o = TransferOpts::new(size);
        o.recv_type = PTR_CUDA;
        net.transfer_opts(send, recv, &o);
    }
    // As many requests outstanding at once as TCPX allows, each slot reused many times over.
    let n = Fixture::Tcpx.max_outstanding();
    for _ in 0..8 {
        outstanding(&net, send, recv, n, 256);
    }
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert_clean(&net, Fixture::Tcpx, &ctl);
    let text = std::fs::read_to_string(dir.join(format!("inner-{}.prom", std::process::id()))).unwrap();
    let messages = 4 + 8 * n;
    for d in ["send", "recv"] {
        let line = text
            .lines()
            .find(|l| l.starts_with("tcpxshim_messages_total{") && l.contains(&format!("dir=\"{d}\"")))
            .unwrap_or_else(|| panic!("no {d} messages line in\n{text}"));
        assert!(line.ends_with(&format!(" {messages}")), "{line}");
        assert!(
            line.contains("transport=\"GPUDirectTCPX_v7\"") && line.contains("dev=\"1\""),
            "{line}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
