//! The plugin as NCCL drives it, over the built-in TCP transport on loopback: init, devices,
//! properties, non-blocking connect/accept, transfers with byte checks, outstanding requests,
//! closing with requests in flight, and bad inputs answered with errors and WARN lines. The stack is
//! built in this process from a config and driven through the C table this binary exports.

mod common;

use common::*;
use std::ffi::c_void;
use std::ptr::null_mut;
use std::sync::OnceLock;
use tcpxshim::ffi::ncclResult_t::*;

struct Setup {
    net: Net,
    init_log: Vec<String>,
}

/// The shim as NCCL drives it, through the exported table of this binary, over a stack built once
/// for this test binary: the built-in transport on `lo`, requests outstanding for a second reported
/// (stalled_requests_are_reported).
fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let mut cfg = Config {
            plugin: Some("builtin".into()),
            stall_warn: Some(std::time::Duration::from_secs(1)),
            ..Config::default()
        };
        cfg.tcp.ifname = Some("lo".into());
        let mark = in_process_log().mark();
        let net = Net::in_process(&cfg);
        let init_log = in_process_log().since(mark);
        Setup { net, init_log }
    })
}

fn net() -> &'static Net {
    &setup().net
}

/// Runs `f`, then returns the WARN lines logged meanwhile. Serialised with the other callers; tests
/// running concurrently may add lines of their own, so callers look for lines only they cause.
fn warns_of<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let log = net().log;
    let mark = log.mark();
    let out = f();
    let warns = log.since(mark).into_iter().filter(|l| l.starts_with("WARN")).collect();
    (out, warns)
}

fn assert_warned(warns: &[String], call: &str, words: &str) {
    assert!(
        warns
            .iter()
            .any(|l| l.contains("NET/TCPXSHIM") && l.contains(call) && l.contains(words)),
        "expected a WARN line naming {call} with {words:?}, got {warns:?}"
    );
}

#[test]
fn init_reports_the_builtin_transport_its_devices_and_properties() {
    let net = net();
    assert_eq!(net.name(), "tcpxshim");
    let info = setup()
        .init_log
        .iter()
        .find(|l| l.contains("NET/TCPXSHIM loaded"))
        .cloned();
    let info = info.unwrap_or_else(|| panic!("no INFO line about what was loaded: {:?}", setup().init_log));
    assert!(
        info.starts_with("INFO") && info.contains("built-in") && info.contains("1 device(s)"),
        "{info}"
    );
    assert_eq!(
        net.devices().unwrap(),
        1,
        "NCCL_TCPXSHIM_TCP_IFNAME=lo gives one device"
    );
    let p = net.properties(0).unwrap();
    assert_eq!(p.name, "lo");
    assert_eq!(p.ptr_support, PTR_HOST);
    assert_eq!(p.max_recvs, 1);
    assert_eq!(p.net_device_type, 0, "HOST device type");
    assert!(p.speed > 0, "speed in Mbps: {}", p.speed);
    assert!(
        net.table().regMrDmaBuf.is_none(),
        "no DMA-BUF: the built-in transport cannot register it"
    );
}

#[test]
fn connect_and_accept_do_not_block() {
    let net = net();
    let (mut handle, listen) = net.listen(0).unwrap();
    // Nothing has connected: accept must return at once with no comm.
    let t = std::time::Instant::now();
    assert!(net.accept(listen).unwrap().is_none());
    assert!(
        t.elapsed() < std::time::Duration::from_secs(1),
        "accept blocked for {:?}",
        t.elapsed()
    );
    let (send, (recv, _)) = net.connect_accept(0, &mut handle, listen);
    net.transfer(send, recv, 1000);
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    net.close_listen(listen).unwrap();
}

#[test]
fn transfers_of_every_size_arrive_intact() {
    let net = net();
    let (send, recv) = net.connect_pair(0);
    let mut sizes = vec![0usize, 1, 3, 7, 4095, 4096, 4097, 65535, 65537, (1 << 20) + 7];
    let mut s = 4096;
    while s <= 256 << 20 {
        sizes.push(s);
        s *= 4;
    }
    for size in sizes {
        net.transfer(send, recv, size);
    }
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
}

#[test]
fn a_receive_larger_than_the_send_reports_the_sent_size() {
    let net = net();
    let (send, recv) = net.connect_pair(0);
    let mut o = TransferOpts::new(1000);
    o.recv_size = 5000;
    net.transfer_opts(send, recv, &o);
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
}

#[test]
fn thirty_two_outstanding_requests_each_way() {
    let net = net();
    let (send, recv) = net.connect_pair(0);
    let n = 32;
    let size = 100_003;
    let mut sbufs: Vec<AlignedBuf> = (0..n).map(|_| AlignedBuf::new(size)).collect();
    let rbufs: Vec<AlignedBuf> = (0..n).map(|_| AlignedBuf::new(size)).collect();
    let mut rreqs = Vec::new();
    let mut sreqs = Vec::new();
    let mut mrs = Vec::new();
    for (i, (sb, rb)) in sbufs.iter_mut().zip(&rbufs).enumerate() {
        sb.fill_pattern(i as u64 + 1);
        let smr = net.reg_buf(send, sb, PTR_HOST).unwrap();
        let rmr = net.reg_buf(recv, rb, PTR_HOST).unwrap();
        mrs.push((smr, rmr));
        rreqs.push(net.post_recv(recv, rb.as_ptr(), size as i32, 0, rmr).unwrap());
    }
    for (sb, (smr, _)) in sbufs.iter().zip(&mrs) {
        sreqs.push(net.post_send(send, sb.as_ptr(), size as i32, 0, *smr).unwrap());
    }
    for (s, r) in sreqs.into_iter().zip(rreqs) {
        assert_eq!(net.wait_both(s, r).unwrap(), (size as i32, size as i32));
    }
    for (i, rb) in rbufs.iter().enumerate() {
        assert_eq!(
            rb.find_mismatch(i as u64 + 1, 0..size),
            None,
            "message {i} arrived intact and in order"
        );
    }
    for (smr, rmr) in mrs {
        net.dereg_mr(send, smr).unwrap();
        net.dereg_mr(recv, rmr).unwrap();
    }
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
}

#[test]
fn closing_with_requests_in_flight_is_safe() {
    let net = net();
    let (send, recv) = net.connect_pair(0);
    let size = 8 << 20;
    let sbuf = AlignedBuf::new(size);
    let rbuf = AlignedBuf::new(size);
    let smr = net.reg_buf(send, &sbuf, PTR_HOST).unwrap();
    let rmr = net.reg_buf(recv, &rbuf, PTR_HOST).unwrap();
    // A receive nobody sends to, and a large send nobody receives.
    let _r = net.post_recv(recv, rbuf.as_ptr(), size as i32, 0, rmr).unwrap();
    let s1 = net.post_send(send, sbuf.as_ptr(), size as i32, 0, smr).unwrap();
    let _s2 = net.post_send(send, sbuf.as_ptr(), size as i32, 0, smr).unwrap();
    let _ = net.test(s1);
    net.dereg_mr(recv, rmr).unwrap();
    net.close_recv(recv).unwrap();
    net.dereg_mr(send, smr).unwrap();
    net.close_send(send).unwrap();
    // Buffers are freed only after both closes returned: nothing may touch them afterwards.
    drop(sbuf);
    drop(rbuf);
    // The stack still works.
    let (send, recv) = net.connect_pair(0);
    net.transfer(send, recv, 12345);
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
}

/// Deregisters both memory registrations of a connected pair and closes it.
fn close_registered(net: &dyn Driver, (send, recv): (Comm, Comm), (smr, rmr): (Mr, Mr)) {
    net.dereg_mr(send, smr).unwrap();
    net.dereg_mr(recv, rmr).unwrap();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
}

/// One transfer of `size` bytes on a fresh connection whose first side (the send when
/// `send_first`, else the receive) is posted alone and tested the way NCCL's proxy tests it for
/// 1.6 s, past NCCL_TCPXSHIM_STALL_WARN=1; then the other side is posted and both must complete.
/// Returns the WARN lines logged while the first side waited.
fn warns_while_one_side_waits(size: usize, send_first: bool) -> Vec<String> {
    let net = net();
    let (send, recv) = net.connect_pair(0);
    let sbuf = AlignedBuf::new(size);
    let rbuf = AlignedBuf::new(size);
    let smr = net.reg_buf(send, &sbuf, PTR_HOST).unwrap();
    let rmr = net.reg_buf(recv, &rbuf, PTR_HOST).unwrap();
    let post_send = || net.post_send(send, sbuf.as_ptr(), size as i32, 0, smr).unwrap();
    let post_recv = || net.post_recv(recv, rbuf.as_ptr(), size as i32, 0, rmr).unwrap();
    let (first, warns) = warns_of(|| {
        let req = if send_first { post_send() } else { post_recv() };
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_millis(1600) {
            assert_eq!(net.test(req), Ok(None), "the other side is not posted yet");
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        req
    });
    // The request still completes normally once the other side comes.
    let (s, r) = if send_first {
        (first, post_recv())
    } else {
        (post_send(), first)
    };
    assert_eq!(net.wait_both(s, r), Ok((size as i32, size as i32)));
    close_registered(net, (send, recv), (smr, rmr));
    warns
}

#[test]
fn stalled_requests_are_reported_once_with_what_they_wait_for() {
    // An odd size no other test uses: their own slow requests may be reported meanwhile.
    let warns = warns_while_one_side_waits((1 << 20) - 3, false);
    let stalls: Vec<_> = warns
        .iter()
        .filter(|l| l.contains("irecv of 1048573 bytes") && l.contains("outstanding for"))
        .collect();
    assert_eq!(stalls.len(), 1, "one line per stalled request: {warns:?}");
    assert_warned(
        &warns,
        "test: irecv of 1048573 bytes (tag 0) on recv comm",
        "peer 127.0.0.1:",
    );
    assert_warned(&warns, "test: irecv of 1048573 bytes", "no message from the sender yet");
    assert_warned(&warns, "test", "NCCL_TCPXSHIM_STALL_WARN");
}

#[test]
fn a_send_nobody_receives_is_reported_as_stalled() {
    // Far more than the sockets' buffers hold: without a receive, chunks stay with the workers.
    let warns = warns_while_one_side_waits(64 << 20, true);
    assert_warned(
        &warns,
        "test: isend of 67108864 bytes (tag 0) on send comm",
        "peer 127.0.0.1:",
    );
    assert_warned(&warns, "test: isend of 67108864 bytes", "still with the I/O workers");
}

#[test]
fn a_receive_smaller_than_the_send_is_an_error() {
    let net = net();
    let (send, recv) = net.connect_pair(0);
    let sbuf = AlignedBuf::new(4096);
    let rbuf = AlignedBuf::new(100);
    let smr = net.reg_buf(send, &sbuf, PTR_HOST).unwrap();
    let rmr = net.reg_buf(recv, &rbuf, PTR_HOST).unwrap();
    let (res, warns) = warns_of(|| {
        let r = net.post_recv(recv, rbuf.as_ptr(), 100, 0, rmr).unwrap();
        let _s = net.post_send(send, sbuf.as_ptr(), 4096, 0, smr).unwrap();
        poll_until("the undersized receive to fail", || match net.test(r) {
            Ok(None) => None,
            Ok(Some(n)) => Some(Ok(n)),
            Err(e) => Some(Err(e)),
        })
    });
    assert_eq!(res, Err(ncclInvalidUsage), "receive of 100 bytes for a 4096-byte send");
    assert_warned(&warns, "test", "4096");
    close_registered(net, (send, recv), (smr, rmr));
}

#[test]
fn a_garbage_handle_is_rejected_with_a_clear_error() {
    let net = net();
    let mut garbage = [0x5au8; 128];
    let (res, warns) = warns_of(|| net.connect(0, &mut garbage));
    assert_eq!(res.err(), Some(ncclInvalidArgument));
    assert_warned(&warns, "connect", "not made by tcpxshim");
}

#[test]
fn bad_devices_are_rejected() {
    let net = net();
    let (res, warns) = warns_of(|| net.properties(7));
    assert_eq!(res.err(), Some(ncclInvalidArgument));
    assert_warned(&warns, "getProperties", "device 7 does not exist");
    assert_eq!(net.listen(-1).err(), Some(ncclInvalidArgument));
    let (mut handle, listen) = net.listen(0).unwrap();
    assert_eq!(net.connect(3, &mut handle).err(), Some(ncclInvalidArgument));
    net.close_listen(listen).unwrap();
}

#[test]
fn null_pointers_and_bad_arguments_give_errors_not_crashes() {
    let net = net();
    let t = net.table();
    let (send, recv) = net.connect_pair(0);
    let mut buf = AlignedBuf::new(64);
    let smr = net.reg_buf(send, &buf, PTR_HOST).unwrap();
    let mut req: *mut c_void = null_mut();
    let mut out: *mut c_void = null_mut();
    let mut done = 0;
    let (results, warns) = warns_of(|| {
        // SAFETY: each call passes a NULL or invalid argument on purpose; the plugin must check it
        // before touching anything. All other pointers are valid.
        unsafe {
            vec![
                ("devices", (t.devices.unwrap())(null_mut()), ncclInvalidArgument),
                (
                    "getProperties",
                    (t.getProperties.unwrap())(0, null_mut()),
                    ncclInvalidArgument,
                ),
                (
                    "listen",
                    (t.listen.unwrap())(0, null_mut(), &mut out),
                    ncclInvalidArgument,
                ),
                (
                    "connect",
                    (t.connect.unwrap())(0, null_mut(), &mut out, null_mut()),
                    ncclInvalidArgument,
                ),
                (
                    "accept",
                    (t.accept.unwrap())(null_mut(), &mut out, null_mut()),
                    ncclInvalidArgument,
                ),
                (
                    "regMr",
                    (t.regMr.unwrap())(null_mut(), buf.as_ptr(), 64, PTR_HOST, &mut out),
                    ncclInvalidArgument,
                ),
                (
                    "regMr",
                    (t.regMr.unwrap())(send.0, buf.as_ptr(), -1, PTR_HOST, &mut out),
                    ncclInvalidArgument,
                ),
                (
                    "regMr",
                    (t.regMr.unwrap())(send.0, buf.as_ptr(), 64, 0x40, &mut out),
                    ncclInvalidArgument,
                ),
                (
                    "regMr",
                    (t.regMr.unwrap())(send.0, buf.as_ptr(), 64, PTR_CUDA, &mut out),
                    ncclInvalidArgument,
                ),
                (
                    "isend",
                    (t.isend.unwrap())(send.0, buf.as_ptr(), 64, 0, smr.0, null_mut()),
                    ncclInvalidArgument,
                ),
                (
                    "isend",
                    (t.isend.unwrap())(null_mut(), buf.as_ptr(), 64, 0, smr.0, &mut req),
                    ncclInvalidArgument,
                ),
                (
                    "isend",
                    (t.isend.unwrap())(send.0, null_mut(), 64, 0, smr.0, &mut req),
                    ncclInvalidArgument,
                ),
                (
                    "isend",
                    (t.isend.unwrap())(recv.0, buf.as_ptr(), 64, 0, smr.0, &mut req),
                    ncclInvalidUsage,
                ),
                (
                    "irecv",
                    (t.irecv.unwrap())(recv.0, 1, null_mut(), null_mut(), null_mut(), null_mut(), &mut req),
                    ncclInvalidArgument,
                ),
                (
                    "test",
                    (t.test.unwrap())(null_mut(), &mut done, null_mut()),
                    ncclInvalidArgument,
                ),
                ("deregMr", (t.deregMr.unwrap())(send.0, null_mut()), ncclInvalidArgument),
                ("closeSend", (t.closeSend.unwrap())(null_mut()), ncclInvalidArgument),
                ("closeRecv", (t.closeRecv.unwrap())(null_mut()), ncclInvalidArgument),
                ("closeListen", (t.closeListen.unwrap())(null_mut()), ncclInvalidArgument),
            ]
        }
    });
    for (call, got, want) in &results {
        assert_eq!(
            got,
            want,
            "{call} returned {} instead of {}",
            result_name(*got),
            result_name(*want)
        );
    }
    for call in [
        "devices",
        "getProperties",
        "listen",
        "connect",
        "accept",
        "regMr",
        "isend",
        "irecv",
        "test",
    ] {
        assert_warned(&warns, call, "");
    }
    // Two grouped receives are more than maxRecvs=1.
    let rmr = net.reg_buf(recv, &buf, PTR_HOST).unwrap();
    let second: *mut c_void = buf.as_mut_slice()[32..].as_mut_ptr().cast();
    let r = net.irecv_n(
        recv,
        &mut [buf.as_ptr(), second],
        &mut [32, 32],
        &mut [0, 0],
        &mut [rmr.0, rmr.0],
    );
    assert!(r.is_err(), "irecv with n=2 on a maxRecvs=1 transport must fail");
    // The comms still work after all that.
    net.transfer(send, recv, 333);
    close_registered(net, (send, recv), (smr, rmr));
}

#[test]
fn closing_a_connection_logs_its_counters() {
    let net = net();
    let mark = net.log.mark();
    let (send, recv) = net.connect_pair(0);
    net.transfer(send, recv, 1000);
    net.transfer(send, recv, 23);
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    let lines = net.log.since(mark);
    let closed: Vec<&String> = lines.iter().filter(|l| l.contains("NET/TCPXSHIM closed")).collect();
    assert!(
        closed.iter().any(|l| l.starts_with("INFO")
            && l.contains("send comm")
            && l.contains("2 messages")
            && l.contains("1023 B")),
        "{lines:?}"
    );
    assert!(
        closed
            .iter()
            .any(|l| l.contains("recv comm") && l.contains("2 messages") && l.contains("1023 B")),
        "{lines:?}"
    );
}
