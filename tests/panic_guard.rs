//! A panic inside the shim never crosses into NCCL: it becomes ncclInternalError with a WARN
//! line, and the comm it happened on refuses further use. The config's fault `panic=isend` (NCCL_TCPXSHIM_FAULTS)
//! makes the named call panic on purpose. The calls go through the
//! exported C entry points of this binary, whose guard catches the panic, so the stack is the
//! process's own: this file is a process of its own.

mod common;

use common::*;
use tcpxshim::ffi::ncclResult_t::*;

#[test]
fn a_panic_becomes_an_internal_error_and_poisons_the_comm() {
    let mut cfg = Config {
        plugin: Some("builtin".into()),
        faults: Some(tcpxshim::stack::FaultSpec::parse("panic=isend").expect("a valid fault spec")),
        ..Config::default()
    };
    cfg.tcp.ifname = Some("lo".into());
    let net = Net::in_process(&cfg);
    let (send, recv) = net.connect_pair(0);
    let buf = AlignedBuf::new(64);
    let mr = net.reg_buf(send, &buf, PTR_HOST).unwrap();
    net.captured_log();

    assert_eq!(net.isend(send, buf.as_ptr(), 64, 0, mr).err(), Some(ncclInternalError));
    let log = net.captured_log();
    assert!(
        log.iter()
            .any(|l| l.starts_with("WARN") && l.contains("isend: internal error (panic")),
        "the panic is reported as a WARN line naming the call: {log:?}"
    );

    // The comm is poisoned: other calls on it fail cleanly instead of running on broken state.
    let again = net.reg_buf(send, &buf, PTR_HOST);
    assert_eq!(again.err(), Some(ncclInternalError));
    let log = net.captured_log();
    assert!(
        log.iter()
            .any(|l| l.contains("unusable after an earlier internal error")),
        "{log:?}"
    );

    // Other comms are unaffected, and the poisoned one can still be closed.
    let rbuf = AlignedBuf::new(64);
    let rmr = net.reg_buf(recv, &rbuf, PTR_HOST).unwrap();
    net.dereg_mr(recv, rmr).unwrap();
    net.close_recv(recv).unwrap();
    net.close_send(send)
        .expect("a poisoned comm can still be closed, releasing its resources");
}
