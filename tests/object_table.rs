//! The shim's object table, through the exported C entry points: every comm, registration and
//! request NCCL holds is a generation-checked key, so a closed, completed, foreign or made-up one is
//! answered with ncclInvalidArgument and a WARN line naming the call, never a crash and never a
//! call into the inner plugin. The stack is this process's own (the exported table drives it), over
//! the TCPX look-alike, which counts as a violation anything wrong that reaches it.

mod common;

use common::*;
use std::ffi::c_void;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use tcpxshim::ffi::ncclResult_t::*;

struct Setup {
    net: Net,
    ctl: FixtureCtl,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let fixture = private_copy(&fixture_lib(Fixture::Tcpx));
        let ctl = FixtureCtl::open(&fixture);
        let cfg = Config {
            plugin: Some(fixture.to_string_lossy().into_owned()),
            ctrl_addr: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ..Config::default()
        };
        Setup {
            net: Net::in_process(&cfg),
            ctl,
        }
    })
}

fn net() -> &'static Net {
    &setup().net
}

/// Nothing wrong reached the inner plugin: the shim refused it first.
fn assert_inner_untouched() {
    let ctl = &setup().ctl;
    assert_eq!(ctl.violations(), 0, "reached TCPX: {}", ctl.last_violation());
}

/// `p` as the shim's WARN lines print it.
fn hex(p: *mut c_void) -> String {
    format!("{:#x}", p as usize)
}

/// The WARN lines logged since `mark` that contain every one of `words`.
fn warned(mark: usize, words: &[&str]) -> Vec<String> {
    net()
        .log
        .since(mark)
        .into_iter()
        .filter(|l| l.starts_with("WARN") && words.iter().all(|w| l.contains(w)))
        .collect()
}

fn assert_warned(mark: usize, words: &[&str]) {
    let lines = warned(mark, words);
    assert!(
        !lines.is_empty(),
        "expected a WARN line with {words:?}; logged since: {:?}",
        net().log.since(mark)
    );
}

/// A connected pair that has carried one message, so TCPX's background connect is done and its
/// isend/irecv no longer answer "try again".
fn ready_pair(dev: i32) -> (Comm, Comm) {
    let (send, recv) = net().connect_pair(dev);
    net().transfer(send, recv, 64);
    (send, recv)
}

fn close_pair((send, recv): (Comm, Comm)) {
    net().close_send(send).unwrap();
    net().close_recv(recv).unwrap();
}

/// One message posted from a send comm to a receive comm through registered buffers: its two
/// requests, and the buffers and registrations to release once they complete.
struct Message {
    sbuf: AlignedBuf,
    rbuf: AlignedBuf,
    smr: Mr,
    rmr: Mr,
    s: Req,
    r: Req,
}

fn post_message(send: Comm, recv: Comm, size: usize, seed: u64) -> Message {
    let net = net();
    let mut sbuf = AlignedBuf::new(size);
    sbuf.fill_pattern(seed);
    let rbuf = AlignedBuf::new(size);
    let smr = net.reg_buf(send, &sbuf, PTR_HOST).unwrap();
    let rmr = net.reg_buf(recv, &rbuf, PTR_HOST).unwrap();
    let r = net.post_recv(recv, rbuf.as_ptr(), size as i32, 0, rmr).unwrap();
    let s = net.post_send(send, sbuf.as_ptr(), size as i32, 0, smr).unwrap();
    Message {
        sbuf,
        rbuf,
        smr,
        rmr,
        s,
        r,
    }
}

impl Message {
    /// Completes both requests (checking sizes and bytes), consumes the receive, deregisters.
    fn finish(self, send: Comm, recv: Comm, seed: u64) {
        let net = net();
        let n = self.sbuf.len() as i32;
        assert_eq!(net.wait_both(self.s, self.r), Ok((n, n)));
        assert_eq!(
            self.rbuf.find_mismatch(seed, 0..self.sbuf.len()),
            None,
            "bytes arrived intact"
        );
        net.irecv_consumed(recv, self.r).unwrap();
        net.dereg_mr(send, self.smr).unwrap();
        net.dereg_mr(recv, self.rmr).unwrap();
    }
}

#[test]
fn a_closed_comm_is_refused_and_closing_twice_is_an_error() {
    let net = net();
    let (send, recv) = ready_pair(0);
    let buf = AlignedBuf::new(64);
    let mr = net.reg_buf(send, &buf, PTR_HOST).unwrap();
    net.dereg_mr(send, mr).unwrap();
    net.close_send(send).unwrap();

    let mark = net.log.mark();
    assert_eq!(
        net.isend(send, buf.as_ptr(), 64, 0, mr).err(),
        Some(ncclInvalidArgument),
        "isend on a closed send comm"
    );
    assert_warned(mark, &["isend", &hex(send.0), "not an open tcpxshim comm"]);
    assert_eq!(net.reg_buf(send, &buf, PTR_HOST).err(), Some(ncclInvalidArgument));
    assert_warned(mark, &["regMr", &hex(send.0)]);

    assert_eq!(
        net.close_send(send).err(),
        Some(ncclInvalidArgument),
        "second closeSend"
    );
    assert_warned(mark, &["closeSend", &hex(send.0)]);
    net.close_recv(recv).unwrap();
    assert_eq!(
        net.close_recv(recv).err(),
        Some(ncclInvalidArgument),
        "second closeRecv"
    );
    assert_warned(mark, &["closeRecv", &hex(recv.0)]);
    let (_, listen) = net.listen(1).unwrap();
    net.close_listen(listen).unwrap();
    assert_eq!(
        net.close_listen(listen).err(),
        Some(ncclInvalidArgument),
        "second closeListen"
    );
    assert_warned(mark, &["closeListen", &hex(listen.0)]);
    assert_inner_untouched();
}

/// The request slot a shim request key names (bits 48 to 55, src/stack/table.rs).
fn req_slot(r: Req) -> usize {
    (r.0 as usize >> 48) & 0xff
}

#[test]
fn a_completed_request_tested_again_is_an_error_and_takes_nothing_from_the_next() {
    let net = net();
    let (send, recv) = ready_pair(1);
    let a = post_message(send, recv, 1000, 1);
    let (stale_s, stale_r) = (a.s, a.r);
    a.finish(send, recv, 1);

    // B, posted right after A on the same comms.
    let b = post_message(send, recv, 1001, 2);
    let mark = net.log.mark();
    assert_eq!(net.test(stale_s), Err(ncclInvalidArgument), "A's send tested again");
    assert_eq!(net.test(stale_r), Err(ncclInvalidArgument), "A's receive tested again");
    assert_warned(mark, &["test", &hex(stale_s.0), "not an outstanding request"]);
    assert_warned(mark, &["test", &hex(stale_r.0), "not an outstanding request"]);
    b.finish(send, recv, 2);

    // Later requests until one lands in the very slot A had (the shim hands its 64 slots out in
    // turn): then only the generation tells A's key from the live one, and A's must still not see
    // its completion.
    let mut reused = (false, false);
    for i in 0..MAX_SLOTS_ROUND {
        let seed = 10 + i as u64;
        let m = post_message(send, recv, 64 + i, seed);
        for (stale, live, seen) in [(stale_s, m.s, &mut reused.0), (stale_r, m.r, &mut reused.1)] {
            if req_slot(live) == req_slot(stale) {
                assert_ne!(live, stale, "a newer generation in the same slot");
                let mark = net.log.mark();
                for _ in 0..3 {
                    assert_eq!(
                        net.test(stale),
                        Err(ncclInvalidArgument),
                        "A's key with a live request in its slot"
                    );
                }
                assert_warned(mark, &["test", &hex(stale.0), "not an outstanding request"]);
                *seen = true;
            }
        }
        m.finish(send, recv, seed);
        if reused == (true, true) {
            break;
        }
    }
    assert_eq!(
        reused,
        (true, true),
        "A's slots were reused within {MAX_SLOTS_ROUND} messages"
    );
    close_pair((send, recv));
    assert_inner_untouched();
}

/// More than enough posts for the request slots of a comm to come round once.
const MAX_SLOTS_ROUND: usize = 70;

#[test]
fn a_registration_of_another_comm_is_refused_naming_it() {
    let net = net();
    let x = ready_pair(2);
    let y = ready_pair(3);
    let buf = AlignedBuf::new(256);
    let mr_x = net.reg_buf(x.0, &buf, PTR_HOST).unwrap();
    // Y has a live registration of the same buffer in the same entry: only the comm named in X's
    // key tells them apart (bits 0 to 31 of a registration key name its comm, src/stack/table.rs).
    let mr_y = net.reg_buf(y.0, &buf, PTR_HOST).unwrap();
    assert_eq!(
        mr_x.0 as usize >> 32,
        mr_y.0 as usize >> 32,
        "precondition: the same entry and generation on both comms"
    );
    let mark = net.log.mark();
    assert_eq!(
        net.isend(y.0, buf.as_ptr(), 256, 0, mr_x).err(),
        Some(ncclInvalidArgument),
        "isend on Y with X's registration"
    );
    assert_warned(
        mark,
        &["isend", "memory handle", &hex(mr_x.0), "not a live registration"],
    );
    assert_eq!(
        net.dereg_mr(y.0, mr_x).err(),
        Some(ncclInvalidArgument),
        "deregMr on the wrong comm"
    );
    assert_warned(mark, &["deregMr", &hex(mr_x.0)]);
    // Each is still its own comm's.
    let s = net.post_send(y.0, buf.as_ptr(), 256, 0, mr_y).unwrap();
    let rbuf = AlignedBuf::new(256);
    let rmr = net.reg_buf(y.1, &rbuf, PTR_HOST).unwrap();
    let r = net.post_recv(y.1, rbuf.as_ptr(), 256, 0, rmr).unwrap();
    assert_eq!(net.wait_both(s, r), Ok((256, 256)));
    net.irecv_consumed(y.1, r).unwrap();
    net.dereg_mr(y.1, rmr).unwrap();
    net.dereg_mr(y.0, mr_y).unwrap();
    net.dereg_mr(x.0, mr_x).unwrap();
    assert_eq!(
        net.dereg_mr(x.0, mr_x).err(),
        Some(ncclInvalidArgument),
        "deregistered twice"
    );
    net.transfer(y.0, y.1, 256);
    close_pair(x);
    close_pair(y);
    assert_inner_untouched();
}

#[test]
fn irecv_consumed_with_a_request_of_another_comm_is_an_error() {
    let net = net();
    let p = ready_pair(0);
    let q = ready_pair(1);
    let m = post_message(p.0, p.1, 4096, 7);
    let n = m.sbuf.len() as i32;
    assert_eq!(net.wait_both(m.s, m.r), Ok((n, n)));
    let mark = net.log.mark();
    assert_eq!(
        net.irecv_consumed(q.1, m.r),
        Err(ncclInvalidArgument),
        "P's completed receive named on Q's recv comm"
    );
    assert_warned(mark, &["irecvConsumed", &hex(m.r.0)]);
    assert!(
        net.irecv_consumed(p.1, m.s).is_err(),
        "P's send request named as a receive"
    );
    // It is still P's to consume, once.
    net.irecv_consumed(p.1, m.r).unwrap();
    assert!(net.irecv_consumed(p.1, m.r).is_err(), "consumed twice");
    net.dereg_mr(p.0, m.smr).unwrap();
    net.dereg_mr(p.1, m.rmr).unwrap();
    drop(m);
    net.transfer(q.0, q.1, 100);
    close_pair(p);
    close_pair(q);
    assert_inner_untouched();
}

#[test]
fn made_up_pointers_are_invalid_arguments_never_crashes() {
    let net = net();
    let t = net.table();
    let (send, recv) = ready_pair(2);
    let buf = AlignedBuf::new(64);
    let smr = net.reg_buf(send, &buf, PTR_HOST).unwrap();
    let rmr = net.reg_buf(recv, &buf, PTR_HOST).unwrap();
    let mut on_stack = 0u64;
    let stack_addr: *mut c_void = (&mut on_stack as *mut u64).cast();
    // Values shaped like the shim's comm, request and registration keys, naming nothing live.
    let forged_comm = (0xC0usize << 56 | 0xdead_beef << 16 | 7) as *mut c_void;
    let forged_req = (0xE0usize << 56 | 5 << 48 | 0xbeef << 32 | 0xffff) as *mut c_void;
    let forged_mr = (0xA0usize << 56 | 0xfff << 44 | 0xabc << 32 | 0xffff) as *mut c_void;
    let mark = net.log.mark();
    for bogus in [0x1234 as *mut c_void, stack_addr, forged_comm, forged_req, forged_mr] {
        let mut req: *mut c_void = std::ptr::null_mut();
        let mut out: *mut c_void = std::ptr::null_mut();
        let mut done = 0;
        let mut sizes = [0i32; 8];
        let mut data = [buf.as_ptr()];
        let mut len = [64i32];
        let mut tag = [0i32];
        let mut mrs = [rmr.0];
        // SAFETY: every pointer argument but the made-up one is valid; the made-up one is exactly what
        // the plugin must refuse without dereferencing it.
        let results = unsafe {
            [
                (
                    "isend comm",
                    (t.isend.unwrap())(bogus, buf.as_ptr(), 64, 0, smr.0, &mut req),
                ),
                (
                    "isend mhandle",
                    (t.isend.unwrap())(send.0, buf.as_ptr(), 64, 0, bogus, &mut req),
                ),
                (
                    "irecv comm",
                    (t.irecv.unwrap())(
                        bogus,
                        1,
                        data.as_mut_ptr(),
                        len.as_mut_ptr(),
                        tag.as_mut_ptr(),
                        mrs.as_mut_ptr(),
                        &mut req,
                    ),
                ),
                ("test", (t.test.unwrap())(bogus, &mut done, sizes.as_mut_ptr())),
                ("regMr", (t.regMr.unwrap())(bogus, buf.as_ptr(), 64, PTR_HOST, &mut out)),
                ("deregMr comm", (t.deregMr.unwrap())(bogus, smr.0)),
                ("deregMr mhandle", (t.deregMr.unwrap())(send.0, bogus)),
                ("getDeviceMr", (t.getDeviceMr.unwrap())(recv.0, bogus, &mut out)),
                ("accept", (t.accept.unwrap())(bogus, &mut out, std::ptr::null_mut())),
                (
                    "irecvConsumed comm",
                    (t.irecvConsumed.unwrap())(bogus, 1, std::ptr::null_mut()),
                ),
                ("irecvConsumed request", (t.irecvConsumed.unwrap())(recv.0, 1, bogus)),
                ("closeSend", (t.closeSend.unwrap())(bogus)),
                ("closeRecv", (t.closeRecv.unwrap())(bogus)),
                ("closeListen", (t.closeListen.unwrap())(bogus)),
            ]
        };
        for (what, got) in results {
            assert_eq!(
                got,
                ncclInvalidArgument,
                "{what} with {bogus:p} returned {}",
                result_name(got)
            );
        }
        assert!(req.is_null() && done == 0, "no request made, nothing reported done");
    }
    for call in [
        "isend",
        "irecv",
        "test",
        "regMr",
        "deregMr",
        "accept",
        "irecvConsumed",
        "closeSend",
    ] {
        assert_warned(mark, &[call, &hex(stack_addr)]);
    }
    // The real comms still work.
    net.dereg_mr(send, smr).unwrap();
    net.dereg_mr(recv, rmr).unwrap();
    net.transfer(send, recv, 777);
    close_pair((send, recv));
    assert_inner_untouched();
}

#[test]
fn the_exported_table_shows_what_tcpx_shows() {
    // What NCCL reads from the shim's own ncclNetPlugin_v7 over TCPX: the name NCCL_NET selects,
    // no regMrDmaBuf, and TCPX's properties field by field (tcpx-plugin-facts.md, "Interface").
    let net = net();
    assert_eq!(
        net.name(),
        "GPUDirectTCPX_v7",
        "NCCL_NET=GPUDirectTCPX_v7 keeps working"
    );
    let t = net.table();
    assert!(
        t.regMrDmaBuf.is_none(),
        "TCPX's regMrDmaBuf is NULL, so the shim's is too"
    );
    assert!(t.getDeviceMr.is_some() && t.irecvConsumed.is_some());
    assert_eq!(net.devices().unwrap(), 4);
    for dev in 0..4 {
        let p = net.properties(dev).unwrap();
        assert_eq!(p.name, format!("eth{}", dev + 1));
        assert_eq!((p.net_device_type, p.net_device_version), (1, 7), "UNPACK, version 0x7");
        assert_eq!(p.ptr_support, PTR_HOST | PTR_CUDA);
        assert_eq!(
            (p.speed, p.latency),
            (200_000, 0.0),
            "speed and latency as TCPX reports them"
        );
        assert_eq!((p.guid, p.port, p.max_comms, p.max_recvs), (dev as u64, 0, 65536, 1));
    }
    let (send, recv) = ready_pair(0);
    let buf = AlignedBuf::new(4096);
    let mr = net.reg_buf(recv, &buf, PTR_CUDA).unwrap();
    assert!(
        !net.get_device_mr(recv, mr).unwrap().is_null(),
        "getDeviceMr reaches TCPX through the exported table"
    );
    net.dereg_mr(recv, mr).unwrap();
    close_pair((send, recv));
    assert_inner_untouched();
}
