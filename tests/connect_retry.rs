//! Connect retry through the whole shim over the stand-in plugins (tests/fixtures/netfixture.c):
//! connects whose first attempts fail with an errno that says refused, unreachable or timed out
//! succeed after the failures, with the handle bytes the plugin changed on a failed attempt put
//! back before the next one; the deadline ends the retries with an error that says why; and over
//! TCPX a refused connect is not retried (TCPX retries those itself).
//!
//! Each test builds a stack of its own in this process over a private copy of the fixture.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tcpxshim::ffi::ncclResult_t;
use tcpxshim::stack::handle::HandleMode;

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
    assert_eq!(ctl.live_objects(), 0, "{}: objects left open", kind.net_name());
}

/// Connects (retries included) and accepts, checks a transfer, closes everything.
fn connect_transfer_close(net: &StackNet) {
    let (send, recv) = net.connect_pair(0);
    net.transfer(send, recv, 4096);
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
}

#[test]
fn connects_whose_first_attempts_fail_succeed_after_the_failures_in_both_handle_modes() {
    let log = in_process_log();
    for kind in [Fixture::V5, Fixture::V6, Fixture::V7, Fixture::Tcpx] {
        for (errno, mode) in [
            (libc::ECONNREFUSED, HandleMode::Auto),
            (libc::ETIMEDOUT, HandleMode::Auto),
            (libc::EHOSTUNREACH, HandleMode::Served),
        ] {
            if kind == Fixture::Tcpx && errno == libc::ECONNREFUSED {
                continue; // not retried over TCPX: see the test below
            }
            let mark = log.mark();
            let knobs = [
                ("connect_fail_first", 3),
                ("connect_fail_errno", errno as i64),
                ("connect_fail_scribble", 1),
            ];
            let (net, ctl) = shim_with(kind, &knobs, |c| c.handle_mode = mode);
            connect_transfer_close(&net);
            assert_clean(&net, kind, &ctl);
            let os = std::io::Error::from_raw_os_error(errno).to_string();
            let ok: Vec<String> = log
                .since(mark)
                .into_iter()
                .filter(|l| l.contains("connect: connected after 3 failed attempt(s)") && l.contains(&os))
                .collect();
            assert!(
                !ok.is_empty(),
                "{kind:?} {mode:?} errno {errno}: one INFO line on success"
            );
        }
    }
}

#[test]
fn a_failed_attempt_really_leaves_junk_at_offset_80_which_tcpx_would_trip_over() {
    // The scribble knob is what the restore is tested against: without retry the caller gets the
    // handle back with junk at TCPX's state slot, and passing that on is a violation.
    let knobs = [("connect_fail_first", 1), ("connect_fail_scribble", 1)];
    let (net, ctl) = shim_with(Fixture::Tcpx, &knobs, |c| c.connect_timeout = None);
    let (mut h, listen) = net.listen(0).unwrap();
    let before = h;
    assert_eq!(net.connect(0, &mut h), Err(ncclResult_t::ncclSystemError));
    assert_eq!(&h[80..88], &0x5eed5eed5eed5eedu64.to_ne_bytes());
    assert_eq!(&h[..80], &before[..80]);
    assert!(net.connect(0, &mut h).is_err());
    assert!(ctl.violations() > 0, "the junk state pointer is caught");
    net.close_listen(listen).unwrap();
}

#[test]
fn the_deadline_gives_an_error_naming_attempts_cause_and_setting() {
    let knobs = [
        ("connect_fail_first", 1_000_000),
        ("connect_fail_errno", libc::EHOSTUNREACH as i64),
    ];
    let (net, ctl) = shim_with(Fixture::V7, &knobs, |c| {
        c.connect_timeout = Some(Duration::from_secs(1))
    });
    let (mut h, listen) = net.listen(0).unwrap();
    let start = Instant::now();
    let res = poll_until("the deadline", || match net.connect(0, &mut h) {
        Ok(None) => None,
        other => Some(other),
    });
    assert_eq!(res.err(), Some(ncclResult_t::ncclSystemError), "the plugin's own code");
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "retried until the deadline"
    );
    let msg = net.last_error().unwrap();
    assert!(msg.starts_with("connect on dev 0: gave up after "), "{msg}");
    assert!(msg.contains("NCCL_TCPXSHIM_CONNECT_TIMEOUT=1 s"), "{msg}");
    assert!(msg.contains("last cause (unreachable)"), "{msg}");
    assert!(
        msg.contains("inner plugin connect returned 2 (ncclSystemError)"),
        "{msg}"
    );
    assert!(
        msg.contains(&std::io::Error::from_raw_os_error(libc::EHOSTUNREACH).to_string()),
        "{msg}"
    );
    net.close_listen(listen).unwrap();
    assert_eq!(ctl.violations(), 0, "{}", ctl.last_violation());
}

#[test]
fn over_tcpx_a_refused_connect_is_not_retried_but_over_other_plugins_it_is() {
    let knobs = [
        ("connect_fail_first", 1),
        ("connect_fail_errno", libc::ECONNREFUSED as i64),
    ];
    let (tcpx, tctl) = shim_with(Fixture::Tcpx, &knobs, |_| {});
    let (mut h, listen) = tcpx.listen(0).unwrap();
    assert_eq!(
        tcpx.connect(0, &mut h),
        Err(ncclResult_t::ncclSystemError),
        "TCPX's refusal goes to NCCL at once"
    );
    let msg = tcpx.last_error().unwrap();
    assert!(!msg.contains("gave up"), "{msg}");
    tcpx.close_listen(listen).unwrap();
    assert_eq!(tctl.violations(), 0, "{}", tctl.last_violation());

    let (v7, vctl) = shim_with(Fixture::V7, &knobs, |_| {});
    let (mut h, listen) = v7.listen(0).unwrap();
    assert_eq!(v7.connect(0, &mut h), Ok(None), "retried: try again");
    v7.close_listen(listen).unwrap();
    assert_eq!(vctl.violations(), 0, "{}", vctl.last_violation());
}

#[test]
fn a_failure_without_a_retryable_errno_goes_to_nccl_at_once() {
    let (net, ctl) = shim_with(Fixture::V7, &[("connect_fail_first", 1)], |_| {});
    let (mut h, listen) = net.listen(0).unwrap();
    assert_eq!(net.connect(0, &mut h), Err(ncclResult_t::ncclSystemError));
    // The plugin counts the refusal; NCCL's next call (same handle) is a fresh attempt.
    let send = poll_until("connect", || net.connect(0, &mut h).unwrap());
    let recv = poll_until("accept", || net.accept(listen).unwrap());
    net.close_listen(listen).unwrap();
    net.close_send(send).unwrap();
    net.close_recv(recv.0).unwrap();
    assert_clean(&net, Fixture::V7, &ctl);
}
