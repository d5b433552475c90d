//! Over an UNPACK-type inner plugin (the TCPX look-alike of tests/fixtures/netfixture.c) a broken
//! connection cannot be recovered under NCCL, so the shim fails fast: the first error of a comm's
//! data path becomes ncclRemoteError with the diagnosis, and every later call on that comm fails
//! at once the same way (closing still works). Over a HOST-type plugin the error passes as it was.

mod common;

use common::*;
use tcpxshim::ffi::ncclResult_t;
use tcpxshim::stack::failfast::DIAGNOSIS;

/// Calls `f` until it stops answering "try again" (bounded).
fn until_answer<T: std::fmt::Debug>(what: &str, mut f: impl FnMut() -> NetResult<Option<T>>) -> NetResult<T> {
    poll_until(what, || match f() {
        Ok(None) => None,
        Ok(Some(v)) => Some(Ok(v)),
        Err(e) => Some(Err(e)),
    })
}

#[test]
fn the_first_data_path_error_over_tcpx_is_a_remote_error_with_the_diagnosis_and_sticks() {
    let (net, ctl) = shim_with(Fixture::Tcpx, &[("connect_fail", 1)], |_| {});
    let (send, recv) = net.connect_pair(0);
    let label = net.label(send).expect("the send comm's label");
    let buf = AlignedBuf::new(64);
    let smr = net.reg_buf(send, &buf, PTR_HOST).unwrap();
    let rmr = net.reg_buf(recv, &buf, PTR_HOST).unwrap();
    let first = until_answer("isend", || net.isend(send, buf.as_ptr(), 64, 0, smr));
    assert_eq!(first.err(), Some(ncclResult_t::ncclRemoteError));
    let msg = net.last_error().unwrap();
    assert!(msg.starts_with(&format!("isend of 64 bytes on {label}: ")), "{msg}");
    assert!(msg.contains("inner plugin isend returned 2 (ncclSystemError)"), "{msg}");
    assert!(msg.ends_with(DIAGNOSIS), "{msg}");
    // Later calls on the comm fail at once, the same way, without reaching the plugin.
    for _ in 0..3 {
        assert_eq!(
            net.isend(send, buf.as_ptr(), 64, 0, smr).err(),
            Some(ncclResult_t::ncclRemoteError)
        );
        let again = net.last_error().unwrap();
        assert!(
            again.starts_with(&format!(
                "isend: {label} failed earlier: isend of 64 bytes on {label}: "
            )) && again.ends_with(DIAGNOSIS),
            "{again}"
        );
    }
    assert_eq!(
        net.reg_mr(send, buf.as_ptr(), 64, PTR_HOST).err(),
        Some(ncclResult_t::ncclRemoteError)
    );
    // The receive comm is a comm of its own: its first error gets the diagnosis too.
    let r = until_answer("irecv", || net.irecv(recv, buf.as_ptr(), 64, 0, rmr));
    assert_eq!(r.err(), Some(ncclResult_t::ncclRemoteError));
    assert!(net.last_error().unwrap().ends_with(DIAGNOSIS));
    net.dereg_mr(send, smr).unwrap();
    net.dereg_mr(recv, rmr).unwrap();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert_eq!(ctl.violations(), 0, "{}", ctl.last_violation());
    assert_eq!(ctl.live_objects(), 0);
}

#[test]
fn an_error_from_test_fails_the_tcpx_comm_for_good() {
    // break=after:1: the send comm breaks when its first message completes; the plugin cannot
    // break connections, so the fault layer fails every later call on the comm.
    let faults = tcpxshim::stack::FaultSpec::parse("break=after:1").unwrap();
    let (net, ctl) = shim_with(Fixture::Tcpx, &[], |c| c.faults = Some(faults));
    let (send, recv) = net.connect_pair(0);
    let label = net.label(send).unwrap();
    let sb = [AlignedBuf::new(64), AlignedBuf::new(64)];
    let rb = [AlignedBuf::new(64), AlignedBuf::new(64)];
    let smr: Vec<Mr> = sb.iter().map(|b| net.reg_buf(send, b, PTR_HOST).unwrap()).collect();
    let rmr: Vec<Mr> = rb.iter().map(|b| net.reg_buf(recv, b, PTR_HOST).unwrap()).collect();
    let r: Vec<Req> = (0..2)
        .map(|i| net.post_recv(recv, rb[i].as_ptr(), 64, 0, rmr[i]).unwrap())
        .collect();
    let s: Vec<Req> = (0..2)
        .map(|i| net.post_send(send, sb[i].as_ptr(), 64, 0, smr[i]).unwrap())
        .collect();
    assert_eq!(net.wait(s[0]), Ok(64), "the first message completes");
    assert_eq!(net.test(s[1]).err(), Some(ncclResult_t::ncclRemoteError));
    let msg = net.last_error().unwrap();
    assert!(msg.starts_with(&format!("test on {label}: ")), "{msg}");
    assert!(
        msg.contains("injected fault: connection broken after 1 messages"),
        "{msg}"
    );
    assert!(msg.ends_with(DIAGNOSIS), "{msg}");
    assert_eq!(
        net.isend(send, sb[0].as_ptr(), 64, 0, smr[0]).err(),
        Some(ncclResult_t::ncclRemoteError)
    );
    assert!(net.last_error().unwrap().contains("failed earlier"));
    // The receive comm breaks when its first message completes; the fault layer refuses the
    // irecvConsumed that follows (passed on as it is: TCPX refuses one out of order, the caller's
    // mistake), and the next test fails the comm for good.
    assert_eq!(net.wait(r[0]), Ok(64));
    assert_eq!(
        net.irecv_consumed(recv, r[0]).err(),
        Some(ncclResult_t::ncclRemoteError)
    );
    assert!(!net.last_error().unwrap().contains(DIAGNOSIS));
    assert_eq!(net.test(r[1]).err(), Some(ncclResult_t::ncclRemoteError));
    let msg = net.last_error().unwrap();
    assert!(
        msg.starts_with("test on recv comm") && msg.ends_with(DIAGNOSIS),
        "{msg}"
    );
    let again = net.irecv(recv, rb[0].as_ptr(), 64, 0, rmr[0]).err();
    assert_eq!(again, Some(ncclResult_t::ncclRemoteError));
    assert!(net.last_error().unwrap().contains("failed earlier"));
    // As NCCL does after such an error: the comms are closed (their registrations and the
    // requests the plugin never finished go with them).
    net.close_send(send).unwrap();
    // The fixture reports one rule broken at the receive comm's close: the completed receive
    // whose irecvConsumed the injected break stopped never reached it. Nothing else.
    assert_eq!(net.close_recv(recv).err(), Some(Fixture::Tcpx.violation_result()));
    assert_eq!(ctl.violations(), 1, "{}", ctl.last_violation());
    assert!(ctl.last_violation().contains("never passed to irecvConsumed"));
}

#[test]
fn over_a_host_type_plugin_the_error_passes_as_it_was() {
    let faults = tcpxshim::stack::FaultSpec::parse("break=after:1").unwrap();
    let (net, _ctl) = shim_with(Fixture::V7, &[], |c| c.faults = Some(faults));
    let (send, recv) = net.connect_pair(0);
    net.transfer(send, recv, 64);
    let buf = AlignedBuf::new(64);
    let smr = net.reg_buf(send, &buf, PTR_HOST);
    // The comm is broken: its registration or send fails with the fault's own error.
    let err = match smr {
        Ok(m) => {
            let e = net.isend(send, buf.as_ptr(), 64, 0, m).err();
            let _ = net.dereg_mr(send, m);
            e
        }
        Err(e) => Some(e),
    };
    assert_eq!(err, Some(ncclResult_t::ncclRemoteError), "connection lost");
    let msg = net.last_error().unwrap();
    assert!(msg.contains("injected fault") && !msg.contains(DIAGNOSIS), "{msg}");
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
}
