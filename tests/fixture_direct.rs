//! Exercises the C stand-in plugins (tests/fixtures/netfixture.c) and the harness (tests/common) directly,
//! without the shim: the fixtures must behave as specified and police every TCPX rule, so that the shim's
//! tests can rely on them.

mod common;

use common::*;
use std::ffi::c_void;
use tcpxshim::ffi::{ncclDebugLogLevel, ncclNetDeviceType, ncclResult_t, NCCL_NET_DEVICE_UNPACK_VERSION};

const SIZES: [usize; 4] = [0, 1, 4095, (1 << 20) + 3];

/// Closes both ends and checks that the fixture has no live object and saw no violation.
fn finish(net: &Net, ctl: &FixtureCtl, send: Comm, recv: Comm) {
    net.close_send(send).expect("closeSend");
    net.close_recv(recv).expect("closeRecv");
    assert_eq!(ctl.live_objects(), 0, "live objects after closing everything");
    assert_eq!(ctl.violations(), 0, "violations (last: {})", ctl.last_violation());
}

#[test]
fn builds_are_cached_and_export_one_symbol_each() {
    for kind in Fixture::ALL {
        let a = fixture_lib(kind);
        let b = fixture_lib(kind);
        assert_eq!(a, b);
        assert!(a.exists(), "{} missing", a.display());
        let lib = load_library(&a).unwrap();
        for sym in [
            "ncclNetPlugin_v5",
            "ncclNetPlugin_v6",
            "ncclNetPlugin_v7",
            "ncclNetPlugin_v8",
        ] {
            assert_eq!(
                symbol_addr(lib, sym).is_some(),
                sym == kind.symbol(),
                "{kind:?} and {sym}"
            );
        }
        // Every table starts with its name.
        let table = symbol_addr(lib, kind.symbol()).unwrap() as *const *const std::ffi::c_char;
        // SAFETY: the exported object is an ncclNet_vN_t whose first member is `const char* name`.
        let name = unsafe { std::ffi::CStr::from_ptr(*table) }
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(name, kind.net_name());
    }
    assert!(
        Net::try_open(fixture_lib(Fixture::V5)).is_err(),
        "v5 fixture must not export a v7 table"
    );
    assert!(logcapture_lib().exists());
    assert!(shim_lib().starts_with(target_dir()));
}

#[test]
fn v7_properties_and_init_log() {
    let (net, ctl) = fresh_fixture(Fixture::V7);
    assert_eq!(net.name(), "Fixture_v7");
    assert_eq!(ctl.init_count(), 1);
    let log = net.captured_log();
    assert!(
        log.iter().any(|l| l.starts_with("INFO 0x11 NET/FIXTURE Fixture_v7")),
        "init log line missing: {log:?}"
    );
    assert_eq!(net.devices().unwrap(), 2);
    for dev in 0..2 {
        let p = net.properties(dev).unwrap();
        assert_eq!(p.name, format!("fix{dev}"));
        assert_eq!(p.pci_path, None);
        assert_eq!(p.guid, dev as u64);
        assert_eq!(p.ptr_support, PTR_HOST);
        assert_eq!(p.speed, 100_000);
        assert_eq!(p.port, 0);
        assert_eq!(p.max_recvs, 1);
        assert_eq!(p.net_device_type, ncclNetDeviceType::NCCL_NET_DEVICE_HOST);
    }
    let t = net.table();
    assert!(t.regMrDmaBuf.is_some());
    assert!(t.getDeviceMr.is_none() && t.irecvConsumed.is_none());
    assert_ne!(t.closeSend.map(|f| f as usize), t.closeRecv.map(|f| f as usize));
    ctl.expect_violation("getProperties(2)", || net.properties(2));
    ctl.reset_violations();
    assert_eq!(ctl.live_objects(), 0);
}

#[test]
fn tcpx_properties_and_table() {
    let (net, ctl) = fresh_fixture(Fixture::Tcpx);
    assert_eq!(net.name(), "GPUDirectTCPX_v7");
    assert_eq!(net.devices().unwrap(), 4);
    for dev in 0..4 {
        let p = net.properties(dev).unwrap();
        assert_eq!(p.name, format!("eth{}", dev + 1));
        assert_eq!(p.guid, dev as u64);
        assert_eq!(p.ptr_support, PTR_HOST | PTR_CUDA);
        assert_eq!(p.port, 0);
        assert_eq!(p.latency, 0.0);
        assert_eq!(p.max_comms, 65536);
        assert_eq!(p.max_recvs, 1);
        assert_eq!(p.net_device_type, ncclNetDeviceType::NCCL_NET_DEVICE_UNPACK);
        assert_eq!(p.net_device_version, NCCL_NET_DEVICE_UNPACK_VERSION as i32);
    }
    let t = net.table();
    assert!(t.regMrDmaBuf.is_none());
    assert!(t.getDeviceMr.is_some() && t.irecvConsumed.is_some());
    assert_eq!(
        t.closeSend.map(|f| f as usize),
        t.closeRecv.map(|f| f as usize),
        "TCPX shares one close function"
    );
    assert!(net
        .captured_log()
        .iter()
        .any(|l| l.contains("NET/FIXTURE GPUDirectTCPX_v7")));
    assert_eq!(ctl.violations(), 0);
}

#[test]
fn v7_transfers() {
    let (net, ctl) = fresh_fixture(Fixture::V7);
    let (send, recv) = net.connect_pair(1);
    for size in SIZES {
        net.transfer(send, recv, size);
    }
    // A receive larger than the send reports the send's size and leaves the rest alone.
    net.transfer_opts(
        send,
        recv,
        &TransferOpts {
            recv_size: 5000,
            ..TransferOpts::new(1000)
        },
    );
    finish(&net, &ctl, send, recv);
}

#[test]
fn tcpx_transfers_host_and_cuda() {
    let (net, ctl) = fresh_fixture(Fixture::Tcpx);
    let pair = net.connect_pair_full(3);
    let dh = pair.dev_handle;
    assert_eq!(dh.netDeviceType, ncclNetDeviceType::NCCL_NET_DEVICE_UNPACK);
    assert_eq!(dh.netDeviceVersion, NCCL_NET_DEVICE_UNPACK_VERSION as i32);
    assert!(!dh.handle.is_null() && dh.size > 0);
    assert_eq!(dh.needsProxyProgress, 1);
    for size in SIZES {
        net.transfer(pair.send, pair.recv, size);
        net.transfer_opts(
            pair.send,
            pair.recv,
            &TransferOpts {
                recv_type: PTR_CUDA,
                ..TransferOpts::new(size)
            },
        );
    }
    finish(&net, &ctl, pair.send, pair.recv);
}

#[test]
fn v5_v6_fixtures_load_and_name() {
    for kind in [Fixture::V5, Fixture::V6] {
        let lib = load_library(&private_copy(&fixture_lib(kind))).unwrap();
        let ctl = FixtureCtl::from_lib(lib).unwrap();
        assert_eq!(ctl.violations(), 0);
        assert_eq!(ctl.init_count(), 0);
    }
}

#[test]
fn generic_connect_and_accept_need_retries() {
    let (net, ctl) = fresh_fixture(Fixture::V7);
    let (mut h, listen) = net.listen(0).unwrap();
    assert!(net.connect(0, &mut h).unwrap().is_none());
    assert!(net.connect(0, &mut h).unwrap().is_none());
    let send = net.connect(0, &mut h).unwrap().expect("third connect returns the comm");
    assert!(net.accept(listen).unwrap().is_none(), "first accept says try again");
    let (recv, _) = net.accept(listen).unwrap().expect("second accept returns the comm");
    // A generic listen comm may accept another connection.
    let (send2, (recv2, _)) = net.connect_accept(0, &mut h, listen);
    net.close_listen(listen).unwrap();
    net.transfer(send, recv, 100);
    net.transfer(send2, recv2, 100);
    net.close_send(send2).unwrap();
    net.close_recv(recv2).unwrap();
    finish(&net, &ctl, send, recv);
}

#[test]
fn v7_allows_32_outstanding_and_polices_the_33rd() {
    let (net, ctl) = fresh_fixture(Fixture::V7);
    let (send, recv) = net.connect_pair(0);
    const N: usize = 32;
    const MSG: usize = 100;
    let rbuf = AlignedBuf::new(N * MSG);
    let mut sbuf = AlignedBuf::new(N * MSG);
    sbuf.fill_pattern(7);
    let rmr = net.reg_buf(recv, &rbuf, PTR_HOST).unwrap();
    let smr = net.reg_buf(send, &sbuf, PTR_HOST).unwrap();
    let at = |b: &AlignedBuf, i: usize| b.as_ptr().cast::<u8>().wrapping_add(i * MSG).cast::<c_void>();
    let rreqs: Vec<Req> = (0..N)
        .map(|i| net.post_recv(recv, at(&rbuf, i), MSG as i32, 0, rmr).unwrap())
        .collect();
    let msg = ctl.expect_violation("33rd irecv", || net.irecv(recv, at(&rbuf, 0), MSG as i32, 0, rmr));
    assert!(msg.contains("33"), "{msg}");
    ctl.reset_violations();
    let sreqs: Vec<Req> = (0..N)
        .map(|i| net.post_send(send, at(&sbuf, i), MSG as i32, 0, smr).unwrap())
        .collect();
    // Generic mode allows testing in any order.
    for i in (0..N).rev() {
        assert_eq!(net.wait(rreqs[i]).unwrap(), MSG as i32);
        assert_eq!(net.wait(sreqs[i]).unwrap(), MSG as i32);
    }
    assert_eq!(rbuf.find_mismatch(7, 0..N * MSG), None);
    net.dereg_mr(recv, rmr).unwrap();
    net.dereg_mr(send, smr).unwrap();
    finish(&net, &ctl, send, recv);
}

#[test]
fn tcpx_allows_16_outstanding_and_polices_the_17th() {
    let (net, ctl) = fresh_fixture(Fixture::Tcpx);
    let (send, recv) = net.connect_pair(0);
    const MSG: usize = 64;
    let rbuf = AlignedBuf::new(17 * MSG);
    let mut sbuf = AlignedBuf::new(17 * MSG);
    sbuf.fill_pattern(3);
    let rmr = net.reg_buf(recv, &rbuf, PTR_CUDA).unwrap();
    let smr = net.reg_buf(send, &sbuf, PTR_HOST).unwrap();
    let at = |b: &AlignedBuf, i: usize| b.as_ptr().cast::<u8>().wrapping_add(i * MSG).cast::<c_void>();
    let rreqs: Vec<Req> = (0..16)
        .map(|i| net.post_recv(recv, at(&rbuf, i), MSG as i32, 0, rmr).unwrap())
        .collect();
    let msg = ctl.expect_violation("17th irecv", || net.irecv(recv, at(&rbuf, 16), MSG as i32, 0, rmr));
    assert!(msg.contains("17"), "{msg}");
    ctl.reset_violations();
    let sreqs: Vec<Req> = (0..16)
        .map(|i| net.post_send(send, at(&sbuf, i), MSG as i32, 0, smr).unwrap())
        .collect();
    for i in 0..16 {
        assert_eq!(net.wait(sreqs[i]).unwrap(), MSG as i32);
        assert_eq!(net.wait(rreqs[i]).unwrap(), MSG as i32);
    }
    // Completed receives still hold their slot until irecvConsumed.
    ctl.expect_violation("irecv before consuming", || {
        net.irecv(recv, at(&rbuf, 16), MSG as i32, 0, rmr)
    });
    ctl.reset_violations();
    for r in &rreqs {
        net.irecv_consumed(recv, *r).unwrap();
    }
    assert_eq!(rbuf.find_mismatch(3, 0..16 * MSG), None);
    net.dereg_mr(recv, rmr).unwrap();
    net.dereg_mr(send, smr).unwrap();
    finish(&net, &ctl, send, recv);
}

#[test]
fn tcpx_handle_layout_and_state_pointer() {
    let (net, ctl) = fresh_fixture(Fixture::Tcpx);
    assert_eq!(ctl.get("connect_nulls"), 3, "TCPX connects in stages by default");
    let mut h: Handle = [0xA5; 128];
    let listen = net.listen_into(0, &mut h).unwrap();
    assert!(h[88..].iter().all(|&b| b == 0xA5), "listen wrote past byte 88");
    assert!(h[80..88].iter().all(|&b| b == 0), "state slot must start zeroed");
    let listened = h;
    // The first call starts the connect and writes the state pointer; it returns no comm yet.
    assert!(
        net.connect(0, &mut h).unwrap().is_none(),
        "TCPX's first connect says call again"
    );
    let state: [u8; 8] = h[80..88].try_into().unwrap();
    assert_ne!(state, [0; 8], "first connect writes the state pointer at offset 80");
    assert_eq!(h[..80], listened[..80], "connect changed the handle before offset 80");
    // Later calls read it back from the same, unchanged buffer; the comm comes on the fourth call.
    assert!(net.connect(0, &mut h).unwrap().is_none());
    assert!(net.connect(0, &mut h).unwrap().is_none());
    let send = net
        .connect(0, &mut h)
        .unwrap()
        .expect("fourth connect returns the comm");
    assert_eq!(h[80..88], state, "the state pointer stays as the first call wrote it");
    assert!(h[88..].iter().all(|&b| b == 0xA5), "connect wrote past byte 88");
    assert_eq!(ctl.violations(), 0, "{}", ctl.last_violation());
    // Slow accept: the first two calls say "try again" even though the peer connected.
    assert!(net.accept(listen).unwrap().is_none());
    assert!(net.accept(listen).unwrap().is_none());
    let (recv, _) = net.accept(listen).unwrap().expect("third accept");
    net.close_listen(listen).unwrap();
    net.transfer(send, recv, 10);
    finish(&net, &ctl, send, recv);
}

#[test]
fn tcpx_background_connect_returns_null_requests() {
    let (net, ctl) = fresh_fixture(Fixture::Tcpx);
    let (mut h, listen) = net.listen(1).unwrap();
    let send = poll_until("connect", || net.connect(1, &mut h).unwrap());
    let buf = AlignedBuf::new(8);
    let smr = net.reg_buf(send, &buf, PTR_HOST).unwrap();
    // Before accept, the connection is not complete.
    for _ in 0..10 {
        assert!(net.isend(send, buf.as_ptr(), 8, 0, smr).unwrap().is_none());
    }
    let (recv, _) = poll_until("accept", || net.accept(listen).unwrap());
    net.close_listen(listen).unwrap();
    // A few more polls after accept, then requests come back.
    let mut nulls = 0;
    let req = poll_until("isend after accept", || {
        let r = net.isend(send, buf.as_ptr(), 8, 0, smr).unwrap();
        nulls += r.is_none() as u32;
        r
    });
    assert_eq!(nulls, 3);
    let rbuf = AlignedBuf::new(8);
    let rmr = net.reg_buf(recv, &rbuf, PTR_HOST).unwrap();
    let rreq = net.post_recv(recv, rbuf.as_ptr(), 8, 0, rmr).unwrap();
    assert_eq!(net.wait_both(req, rreq).unwrap(), (8, 8));
    net.irecv_consumed(recv, rreq).unwrap();
    net.dereg_mr(send, smr).unwrap();
    net.dereg_mr(recv, rmr).unwrap();
    finish(&net, &ctl, send, recv);
}

#[test]
fn tcpx_failed_background_connect_errors() {
    let (net, ctl) = fresh_fixture(Fixture::Tcpx);
    ctl.set("connect_fail", 1);
    let (send, recv) = net.connect_pair(0);
    let buf = AlignedBuf::new(8);
    let smr = net.reg_buf(send, &buf, PTR_HOST).unwrap();
    let r = poll_until("isend error", || match net.isend(send, buf.as_ptr(), 8, 0, smr) {
        Ok(None) => None,
        other => Some(other),
    });
    assert_eq!(r, Err(ncclResult_t::ncclSystemError));
    net.dereg_mr(send, smr).unwrap();
    finish(&net, &ctl, send, recv);
}

#[test]
fn tcpx_polices_repeated_connect_with_copied_or_altered_handle() {
    // Default settings: the first connect says "call again", so later calls are legitimate and checked.
    let (net, ctl) = fresh_fixture(Fixture::Tcpx);
    let (mut h, listen) = net.listen(0).unwrap();
    let listened = h;
    assert!(net.connect(0, &mut h).unwrap().is_none());

    // A copy of the buffer the first call wrote its state into, at another address.
    let mut copy = h;
    let msg = ctl.expect_violation("connect with a copied handle buffer", || net.connect(0, &mut copy));
    assert!(msg.contains("same buffer") && msg.contains("quirk 1"), "{msg}");

    // A fresh copy of the handle as listen() wrote it (no state pointer).
    let mut fresh = listened;
    let msg = ctl.expect_violation("connect with a fresh copy of the listen handle", || {
        net.connect(0, &mut fresh)
    });
    assert!(msg.contains("in progress") && msg.contains("fresh copy"), "{msg}");

    h[40] ^= 0xff;
    let msg = ctl.expect_violation("connect with altered handle bytes", || net.connect(0, &mut h));
    assert!(msg.contains("byte 40"), "{msg}");
    h[40] ^= 0xff;

    let mut bogus = h;
    bogus[80..88].copy_from_slice(&0x1234_5678u64.to_le_bytes());
    ctl.expect_violation("connect with a state pointer nobody wrote", || {
        net.connect(0, &mut bogus)
    });

    let mut zeros: Handle = [0; 128];
    let msg = ctl.expect_violation("connect with a handle of wrong magic", || net.connect(0, &mut zeros));
    assert!(msg.contains("magic"), "{msg}");

    ctl.reset_violations();
    // Calls that raised a violation did not advance the connect: two more NULLs, then the comm.
    let mut nulls = 0;
    let send = poll_until("connect with the same buffer", || {
        let c = net.connect(0, &mut h).unwrap();
        nulls += c.is_none() as u32;
        c
    });
    assert_eq!(nulls, 2);
    assert_eq!(ctl.violations(), 0, "{}", ctl.last_violation());
    let msg = ctl.expect_violation("reusing a handle", || net.connect(0, &mut h));
    assert!(msg.contains("reuse"), "{msg}");
    let mut fresh = listened;
    let msg = ctl.expect_violation("reusing a fresh copy of a used handle", || net.connect(0, &mut fresh));
    assert!(msg.contains("reuse"), "{msg}");
    ctl.reset_violations();

    let (recv, _) = poll_until("accept", || net.accept(listen).unwrap());
    net.close_listen(listen).unwrap();
    net.transfer(send, recv, 1000);
    finish(&net, &ctl, send, recv);
}

/// A wrapper that hands the plugin a fresh copy of NCCL's handle on every connect(), in its two forms:
/// copying the state back to NCCL's buffer after each call, or not.
#[test]
fn tcpx_catches_a_wrapper_that_copies_the_handle_on_every_connect() {
    let (net, ctl) = fresh_fixture(Fixture::Tcpx);

    // Copies NCCL's buffer in, calls connect on the copy, copies the result back.
    let (mut nccl, listen) = net.listen(0).unwrap();
    let mut first = nccl;
    assert!(net.connect(0, &mut first).unwrap().is_none());
    nccl = first;
    let mut second = nccl;
    let msg = ctl.expect_violation("second connect on a copy with the state pointer", || {
        net.connect(0, &mut second)
    });
    assert!(
        msg.contains("same buffer") && msg.contains(&format!("{:p}", first.as_ptr())),
        "names the first call's buffer: {msg}"
    );
    net.close_listen(listen).unwrap();

    // Copies NCCL's buffer in and never copies back: every call looks like a first call.
    let (nccl, listen) = net.listen(1).unwrap();
    let mut first = nccl;
    assert!(net.connect(1, &mut first).unwrap().is_none());
    assert_eq!(nccl[80..88], [0; 8], "NCCL's buffer never got the state pointer");
    let mut second = nccl;
    let msg = ctl.expect_violation("second connect on a fresh copy of the listen handle", || {
        net.connect(1, &mut second)
    });
    assert!(msg.contains("in progress") && msg.contains("quirk 1"), "{msg}");
    assert_eq!(ctl.violations(), 2);
    ctl.reset_violations();
    net.close_listen(listen).unwrap();
    assert_eq!(ctl.live_objects(), 0);

    // The generic plugin keeps no state in the handle: copying it is harmless there.
    let (net, ctl) = fresh_fixture(Fixture::V7);
    let (nccl, listen) = net.listen(0).unwrap();
    let send = poll_until("connect on fresh copies", || {
        let mut copy = nccl;
        net.connect(0, &mut copy).unwrap()
    });
    let (recv, _) = poll_until("accept", || net.accept(listen).unwrap());
    net.close_listen(listen).unwrap();
    net.transfer(send, recv, 64);
    finish(&net, &ctl, send, recv);
}

#[test]
fn new_knobs_default_off() {
    for kind in [Fixture::V7, Fixture::Tcpx] {
        let (_net, ctl) = fresh_fixture(kind);
        for knob in ["connect_fail_first", "connect_cost_ms", "handle_zero_all"] {
            assert_eq!(ctl.get(knob), 0, "{kind:?} {knob}");
        }
        assert_eq!(ctl.get("connect_nulls"), if kind == Fixture::Tcpx { 3 } else { 2 });
        assert_eq!(ctl.try_set("handle_zero_all", 2), None, "handle_zero_all is 0 or 1");
        assert_eq!(ctl.try_set("connect_cost_ms", -1), None);
        assert_eq!(ctl.try_set("no_such_knob", 1), None);
    }
}

/// A 128-byte handle: connect() checks every byte listen() wrote, so a caller that keeps only 88 bytes
/// (or changes any) is caught, and told which byte differed.
#[test]
fn a_128_byte_handle_is_checked_byte_for_byte() {
    for kind in [Fixture::V7, Fixture::Tcpx] {
        let (net, ctl) = fresh_fixture(kind);
        ctl.set("handle_bytes", 128);
        let mut h: Handle = [0xA5; 128];
        let listen = net.listen_into(0, &mut h).unwrap();
        assert!(
            h[88..].iter().all(|&b| b != 0),
            "{kind:?}: filler bytes are never zero: {:?}",
            &h[88..]
        );
        assert!(
            h[88..].iter().any(|&b| b != 0xA5),
            "{kind:?}: listen wrote bytes 88..128"
        );
        if kind == Fixture::Tcpx {
            assert_eq!(
                h[80..88],
                [0; 8],
                "the TCPX state slot stays at offset 80 and starts zeroed"
            );
        }
        let listened = h;

        // Truncated to 88 bytes (the rest zero, or a wrapper's own trailer).
        for fill in [0u8, 0xA5] {
            let mut t: Handle = [fill; 128];
            t[..88].copy_from_slice(&h[..88]);
            let msg = ctl.expect_violation("connect with a truncated handle", || net.connect(0, &mut t));
            assert!(
                msg.contains(&format!("byte 88 is {fill:#04x}, but listen() wrote {:#04x}", h[88]))
                    && msg.contains("128 handle bytes"),
                "{kind:?}: {msg}"
            );
            if kind == Fixture::Tcpx {
                assert_eq!(t[80..88], [0; 8], "no state written into a refused handle");
            }
        }
        // Any other byte.
        for i in [40, 100, 127] {
            let mut t = h;
            t[i] ^= 0x01;
            let msg = ctl.expect_violation("connect with one handle byte changed", || net.connect(0, &mut t));
            assert!(msg.contains(&format!("byte {i} is")), "{kind:?}: {msg}");
        }
        assert_eq!(h, listened);
        ctl.reset_violations();

        // The intact handle connects; TCPX writes its state at offset 80 and leaves bytes 88..128 alone.
        let (send, (recv, _)) = net.connect_accept(0, &mut h, listen);
        if kind == Fixture::Tcpx {
            assert_ne!(h[80..88], [0; 8], "state pointer at offset 80");
            assert_eq!(h[..80], listened[..80]);
        }
        assert_eq!(h[88..], listened[88..]);
        net.close_listen(listen).unwrap();
        net.transfer(send, recv, 100);
        finish(&net, &ctl, send, recv);
    }
}

#[test]
fn handle_bytes_past_the_plugins_share_are_not_checked() {
    // With the default sizes (generic 32, TCPX 88), a wrapper may use the rest of the 128 bytes.
    for kind in [Fixture::V7, Fixture::Tcpx] {
        let (net, ctl) = fresh_fixture(kind);
        let used = ctl.get("handle_bytes") as usize;
        let (mut h, listen) = net.listen(0).unwrap();
        h[used..].fill(0x77);
        let (send, (recv, _)) = net.connect_accept(0, &mut h, listen);
        assert!(
            h[used..].iter().all(|&b| b == 0x77),
            "{kind:?}: connect left the caller's bytes alone"
        );
        net.close_listen(listen).unwrap();
        finish(&net, &ctl, send, recv);
    }
}

#[test]
fn handle_zero_all_zeroes_the_whole_handle_in_listen() {
    for kind in [Fixture::V7, Fixture::Tcpx] {
        let (net, ctl) = fresh_fixture(kind);
        let used = ctl.get("handle_bytes") as usize;
        // Default: bytes past handle_bytes are left as the caller had them.
        let mut h: Handle = [0xA5; 128];
        let l = net.listen_into(0, &mut h).unwrap();
        assert!(h[used..].iter().all(|&b| b == 0xA5), "{kind:?}");
        let written = h;
        net.close_listen(l).unwrap();

        assert_eq!(ctl.set("handle_zero_all", 1), 0);
        let mut h: Handle = [0xA5; 128];
        let listen = net.listen_into(0, &mut h).unwrap();
        assert!(
            h[used..].iter().all(|&b| b == 0),
            "{kind:?}: all 128 bytes zeroed: {:?}",
            &h[used..]
        );
        assert_eq!(
            h[..8],
            written[..8],
            "{kind:?}: the plugin's own fields are still written"
        );
        assert!(
            h[32..used].iter().any(|&b| b != 0) || used == 32,
            "{kind:?}: filler written"
        );
        let (send, (recv, _)) = net.connect_accept(0, &mut h, listen);
        net.close_listen(listen).unwrap();
        net.transfer(send, recv, 10);

        // With 128-byte handles every byte is the plugin's either way.
        ctl.set("handle_bytes", 128);
        let mut h: Handle = [0xA5; 128];
        let l = net.listen_into(0, &mut h).unwrap();
        assert!(
            h[88..].iter().all(|&b| b != 0),
            "{kind:?}: bytes 88..128 are the plugin's filler"
        );
        net.close_listen(l).unwrap();
        finish(&net, &ctl, send, recv);
    }
}

#[test]
fn connect_cost_ms_delays_the_completing_connect() {
    const COST: u64 = 30;
    for kind in [Fixture::V7, Fixture::Tcpx] {
        let (net, ctl) = fresh_fixture(kind);
        assert_eq!(ctl.set("connect_cost_ms", COST as i64), 0);
        let (mut h, listen) = net.listen(0).unwrap();
        let mut calls = 0;
        let (send, took) = poll_until("connect", || {
            calls += 1;
            let t = std::time::Instant::now();
            net.connect(0, &mut h).unwrap().map(|c| (c, t.elapsed()))
        });
        assert_eq!(
            calls,
            ctl.get("connect_nulls") + 1,
            "{kind:?}: the cost does not change the stages"
        );
        assert!(
            took >= std::time::Duration::from_millis(COST),
            "{kind:?}: the completing connect took {took:?}, less than {COST} ms"
        );
        let (recv, _) = poll_until("accept", || net.accept(listen).unwrap());
        net.close_listen(listen).unwrap();
        net.transfer(send, recv, 10);
        finish(&net, &ctl, send, recv);
    }
}

#[test]
fn generic_connect_fail_first_refuses_the_first_attempts_of_each_connection() {
    let (net, ctl) = fresh_fixture(Fixture::V7);
    assert_eq!(ctl.set("connect_fail_first", 2), 0);
    let (mut h, listen) = net.listen(0).unwrap();
    let mut pairs = Vec::new();
    for conn in 0..2 {
        for attempt in 0..2 {
            assert_eq!(
                net.connect(0, &mut h),
                Err(ncclResult_t::ncclSystemError),
                "connection {conn}, attempt {attempt}"
            );
        }
        // Then the usual two "call again" answers and the comm.
        assert!(net.connect(0, &mut h).unwrap().is_none());
        assert!(net.connect(0, &mut h).unwrap().is_none());
        let send = net.connect(0, &mut h).unwrap().expect("comm after the refusals");
        let (recv, _) = poll_until("accept", || net.accept(listen).unwrap());
        pairs.push((send, recv));
    }
    assert_eq!(ctl.violations(), 0, "a refused connect is not a rule violation");
    net.close_listen(listen).unwrap();
    let (last, rest) = pairs.split_last().unwrap();
    for &(send, recv) in rest {
        net.transfer(send, recv, 50);
        net.close_send(send).unwrap();
        net.close_recv(recv).unwrap();
    }
    net.transfer(last.0, last.1, 50);
    finish(&net, &ctl, last.0, last.1);
}

#[test]
fn tcpx_connect_fail_first_refuses_before_writing_state() {
    let (net, ctl) = fresh_fixture(Fixture::Tcpx);
    ctl.set("connect_fail_first", 2);
    let (mut h, listen) = net.listen(0).unwrap();
    let listened = h;
    // Refused first calls write nothing, so a retry may even use another copy of the handle.
    let mut copy = h;
    assert_eq!(net.connect(0, &mut copy), Err(ncclResult_t::ncclSystemError));
    assert_eq!(
        copy, listened,
        "a refused first call leaves the handle as listen() wrote it"
    );
    assert_eq!(net.connect(0, &mut h), Err(ncclResult_t::ncclSystemError));
    assert_eq!(h, listened);
    // The third attempt starts the staged connect: state at offset 80, then three NULLs in all, then the comm.
    assert!(net.connect(0, &mut h).unwrap().is_none());
    assert_ne!(h[80..88], [0; 8]);
    assert!(net.connect(0, &mut h).unwrap().is_none());
    assert!(net.connect(0, &mut h).unwrap().is_none());
    let send = net
        .connect(0, &mut h)
        .unwrap()
        .expect("comm on the fourth call of the attempt");
    assert_eq!(ctl.violations(), 0, "{}", ctl.last_violation());
    let (recv, _) = poll_until("accept", || net.accept(listen).unwrap());
    net.close_listen(listen).unwrap();
    net.transfer(send, recv, 10);
    finish(&net, &ctl, send, recv);
}

#[test]
fn tcpx_polices_accept_rules() {
    let (net, ctl) = fresh_fixture(Fixture::Tcpx);
    let (mut h, listen) = net.listen(2).unwrap();
    let send = poll_until("connect", || net.connect(2, &mut h).unwrap());
    // SAFETY: a NULL recvDevComm, or a pointer to a NULL device-handle pointer, are what we are testing.
    let msg = ctl.expect_violation("accept(recvDevComm = NULL)", || unsafe {
        net.accept_raw(listen, std::ptr::null_mut())
    });
    assert!(msg.contains("recvDevComm"), "{msg}");
    let mut null_dh: *mut DevHandle = std::ptr::null_mut();
    // SAFETY: as above.
    ctl.expect_violation("accept(*recvDevComm = NULL)", || unsafe {
        net.accept_raw(listen, &mut null_dh)
    });
    ctl.reset_violations();
    let (recv, _) = poll_until("accept", || net.accept(listen).unwrap());
    let msg = ctl.expect_violation("second accept", || net.accept(listen));
    assert!(msg.contains("second accept"), "{msg}");
    ctl.reset_violations();
    net.close_listen(listen).unwrap();
    ctl.expect_violation("accept on a closed listen comm", || net.accept(listen));
    ctl.reset_violations();
    finish(&net, &ctl, send, recv);
}

#[test]
fn tcpx_polices_fifo_test_irecv_n_and_irecv_consumed() {
    let (net, ctl) = fresh_fixture(Fixture::Tcpx);
    let (send, recv) = net.connect_pair(0);
    let rbuf = AlignedBuf::new(8192);
    let sbuf = AlignedBuf::new(8192);
    let rmr = net.reg_buf(recv, &rbuf, PTR_CUDA).unwrap();
    let smr = net.reg_buf(send, &sbuf, PTR_HOST).unwrap();
    let at = |b: &AlignedBuf, i: usize| b.as_ptr().cast::<u8>().wrapping_add(i * 4096).cast::<c_void>();

    // irecv with n = 2.
    let mut d = [at(&rbuf, 0), at(&rbuf, 1)];
    let mut s = [4096, 4096];
    let mut t = [0, 1];
    let mut m = [rmr.0, rmr.0];
    let msg = ctl.expect_violation("irecv n=2", || net.irecv_n(recv, &mut d, &mut s, &mut t, &mut m));
    assert!(msg.contains("n = 2"), "{msg}");

    let r0 = net.post_recv(recv, at(&rbuf, 0), 4096, 0, rmr).unwrap();
    let r1 = net.post_recv(recv, at(&rbuf, 1), 4096, 0, rmr).unwrap();
    let msg = ctl.expect_violation("test out of FIFO order", || net.test(r1));
    assert!(msg.contains("FIFO"), "{msg}");

    let s0 = net.post_send(send, at(&sbuf, 0), 4096, 0, smr).unwrap();
    let s1 = net.post_send(send, at(&sbuf, 1), 4096, 0, smr).unwrap();
    assert_eq!(net.wait(s0).unwrap(), 4096);
    assert_eq!(net.wait(s1).unwrap(), 4096);
    assert_eq!(net.wait(r0).unwrap(), 4096);
    assert_eq!(net.wait(r1).unwrap(), 4096);
    ctl.expect_violation("test of a completed request", || net.test(r0));

    let msg = ctl.expect_violation("irecvConsumed out of order", || net.irecv_consumed(recv, r1));
    assert!(msg.contains("order"), "{msg}");
    ctl.expect_violation("irecvConsumed n=2", || net.irecv_consumed_n(recv, 2, r0));
    net.irecv_consumed(recv, r0).unwrap();
    net.irecv_consumed(recv, r1).unwrap();
    ctl.expect_violation("irecvConsumed twice", || net.irecv_consumed(recv, r1));

    // getDeviceMr hands out a device pointer for registered memory.
    assert!(!net.get_device_mr(recv, rmr).unwrap().is_null());

    // A receive that completes but is never consumed is reported when the comm closes.
    let r2 = net.post_recv(recv, at(&rbuf, 0), 4096, 0, rmr).unwrap();
    let s2 = net.post_send(send, at(&sbuf, 0), 4096, 0, smr).unwrap();
    net.wait(s2).unwrap();
    net.wait(r2).unwrap();
    net.dereg_mr(send, smr).unwrap();
    ctl.expect_violation("deregMr while a request uses it", || net.dereg_mr(recv, rmr));
    ctl.reset_violations();
    let msg = ctl.expect_violation("closeRecv with an unconsumed receive", || net.close_recv(recv));
    assert!(msg.contains("irecvConsumed"), "{msg}");
    ctl.expect_violation("deregMr on a closed comm", || net.dereg_mr(recv, rmr));
    ctl.reset_violations();
    net.close_send(send).unwrap();
    // The registration is still counted: its comm was closed under it.
    assert_eq!(ctl.live_objects(), 1);
}

#[test]
fn polices_calls_on_closed_comms_and_bad_pointers() {
    for kind in [Fixture::V7, Fixture::Tcpx] {
        let (net, ctl) = fresh_fixture(kind);
        let (send, recv) = net.connect_pair(0);
        let buf = AlignedBuf::new(64);
        let smr = net.reg_buf(send, &buf, PTR_HOST).unwrap();
        let rmr = net.reg_buf(recv, &buf, PTR_HOST).unwrap();
        ctl.expect_violation("isend with another comm's mhandle", || {
            net.isend(send, buf.as_ptr(), 8, 0, rmr)
        });
        ctl.expect_violation("isend outside the registration", || {
            net.isend(send, buf.as_ptr(), 8192, 0, smr)
        });
        ctl.expect_violation("isend on a recv comm", || net.isend(recv, buf.as_ptr(), 8, 0, rmr));
        net.dereg_mr(send, smr).unwrap();
        ctl.expect_violation("isend with a deregistered mhandle", || {
            net.isend(send, buf.as_ptr(), 8, 0, smr)
        });
        net.dereg_mr(recv, rmr).unwrap();
        net.close_send(send).unwrap();
        let msg = ctl.expect_violation("isend on a closed comm", || net.isend(send, buf.as_ptr(), 8, 0, smr));
        assert!(msg.contains("closed"), "{msg}");
        ctl.expect_violation("closeSend twice", || net.close_send(send));
        net.close_recv(recv).unwrap();
        assert_eq!(ctl.violations(), 6, "{kind:?}");
        assert_eq!(ctl.live_objects(), 0, "{kind:?}");
        assert!(kind.violation_result() != 0);
    }
}

#[test]
fn generic_truncation_is_an_error_not_a_violation() {
    let (net, ctl) = fresh_fixture(Fixture::V7);
    let (send, recv) = net.connect_pair(0);
    let sbuf = AlignedBuf::new(100);
    let rbuf = AlignedBuf::new(100);
    let smr = net.reg_buf(send, &sbuf, PTR_HOST).unwrap();
    let rmr = net.reg_buf(recv, &rbuf, PTR_HOST).unwrap();
    let r = net.post_recv(recv, rbuf.as_ptr(), 50, 0, rmr).unwrap();
    let s = net.post_send(send, sbuf.as_ptr(), 100, 0, smr).unwrap();
    assert_eq!(net.wait(s).unwrap(), 100);
    assert_eq!(net.wait(r), Err(ncclResult_t::ncclInvalidUsage));
    net.dereg_mr(send, smr).unwrap();
    net.dereg_mr(recv, rmr).unwrap();
    finish(&net, &ctl, send, recv);
}

#[test]
fn closing_a_peer_fails_its_pending_requests() {
    let (net, ctl) = fresh_fixture(Fixture::V7);
    let (send, recv) = net.connect_pair(0);
    let buf = AlignedBuf::new(64);
    let rmr = net.reg_buf(recv, &buf, PTR_HOST).unwrap();
    let r = net.post_recv(recv, buf.as_ptr(), 64, 0, rmr).unwrap();
    assert_eq!(ctl.live_objects(), 4); // 2 comms, 1 request, 1 registration
    net.close_send(send).unwrap();
    assert_eq!(net.wait(r), Err(ncclResult_t::ncclRemoteError));
    assert_eq!(
        net.irecv(recv, buf.as_ptr(), 64, 0, rmr),
        Err(ncclResult_t::ncclRemoteError)
    );
    net.dereg_mr(recv, rmr).unwrap();
    net.close_recv(recv).unwrap();
    assert_eq!(ctl.live_objects(), 0);
    assert_eq!(ctl.violations(), 0);
}

#[test]
fn instances_are_independent_and_handles_do_not_cross() {
    let (a, actl) = fresh_fixture(Fixture::V7);
    let (b, bctl) = fresh_fixture(Fixture::V7);
    let (mut h, listen) = a.listen(0).unwrap();
    let msg = bctl.expect_violation("connect with another instance's handle", || b.connect(0, &mut h));
    assert!(msg.contains("instance"), "{msg}");
    assert_eq!(actl.violations(), 0);
    assert_eq!(actl.live_objects(), 1);
    assert_eq!(bctl.live_objects(), 0);
    a.close_listen(listen).unwrap();
    assert_eq!(actl.live_objects(), 0);
}

#[test]
fn knobs_shape_behaviour() {
    let (net, ctl) = fresh_fixture(Fixture::V7);
    assert_eq!(ctl.set("ndev", 0), 2);
    assert_eq!(net.devices().unwrap(), 0);
    ctl.set("ndev", 2);
    ctl.set("init_result", ncclResult_t::ncclSystemError as i64);
    assert_eq!(net.init(), Err(ncclResult_t::ncclSystemError));
    assert_eq!(ctl.init_count(), 2);
    ctl.set("init_result", 0);
    ctl.set("complete_polls", 3);
    ctl.set("connect_nulls", 0);
    ctl.set("accept_nulls", 0);
    let (mut h, listen) = net.listen(0).unwrap();
    let send = net
        .connect(0, &mut h)
        .unwrap()
        .expect("connect at once with connect_nulls 0");
    let (recv, _) = net.accept(listen).unwrap().expect("accept at once with accept_nulls 0");
    net.close_listen(listen).unwrap();
    net.transfer(send, recv, 33);
    ctl.set("handle_bytes", 100);
    let mut h2: Handle = [0xA5; 128];
    let l2 = net.listen_into(0, &mut h2).unwrap();
    assert!(h2[88..100].iter().any(|&b| b != 0xA5) && h2[100..].iter().all(|&b| b == 0xA5));
    net.close_listen(l2).unwrap();
    assert_eq!(ctl.get("handle_bytes"), 100);
    finish(&net, &ctl, send, recv);
}

#[test]
fn log_capture_formats_lines() {
    let cap = LogCapture::private();
    cap.log(ncclDebugLogLevel::NCCL_LOG_WARN, 16, "hello\nworld");
    cap.log(ncclDebugLogLevel::NCCL_LOG_TRACE, 0x11, "second");
    assert_eq!(
        cap.take(),
        vec!["WARN 0x10 hello world".to_string(), "TRACE 0x11 second".to_string()]
    );
    assert!(cap.take().is_empty());
    let long = "x".repeat(5000);
    cap.log(ncclDebugLogLevel::NCCL_LOG_INFO, 1, &long);
    assert_eq!(cap.take(), vec![format!("INFO 0x1 {long}")]);
}

#[test]
fn threads_can_drive_both_ends() {
    let (net, ctl) = fresh_fixture(Fixture::Tcpx);
    let (send, recv) = net.connect_pair(0);
    const ROUNDS: usize = 500;
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut buf = AlignedBuf::new(256);
            let mr = net.reg_buf(send, &buf, PTR_HOST).unwrap();
            for i in 0..ROUNDS {
                buf.fill_pattern(i as u64);
                let r = net.post_send(send, buf.as_ptr(), 256, 0, mr).unwrap();
                assert_eq!(net.wait(r).unwrap(), 256);
            }
            net.dereg_mr(send, mr).unwrap();
        });
        s.spawn(|| {
            let buf = AlignedBuf::new(256);
            let mr = net.reg_buf(recv, &buf, PTR_CUDA).unwrap();
            for i in 0..ROUNDS {
                let r = net.post_recv(recv, buf.as_ptr(), 256, 0, mr).unwrap();
                assert_eq!(net.wait(r).unwrap(), 256);
                assert_eq!(buf.find_mismatch(i as u64, 0..256), None, "round {i}");
                net.irecv_consumed(recv, r).unwrap();
            }
            net.dereg_mr(recv, mr).unwrap();
        });
    });
    finish(&net, &ctl, send, recv);
}

#[test]
fn process_counters_work() {
    assert!(count_fds() >= 3);
    std::thread::scope(|s| {
        s.spawn(|| assert!(count_threads() >= 2));
    });
}
