//! Tests of the fault-injection layer: the parser, determinism (over a stub inner transport), and
//! each fault over the built-in TCP transport on loopback. Every wait is bounded by [`DEADLINE`].

use super::{Break, Delay, FaultSpec, Faults, Trigger};
use crate::config::Config;
use crate::error::{ErrorKind, Result};
use crate::ffi::{ncclResult_t, DevHandle, HANDLE_SIZE, NCCL_PTR_HOST};
use crate::logging::capture;
use crate::stack::LoadInfo;
use crate::tcp::TcpConfig;
use crate::tcp::TcpTransport;
use crate::transport::{Opaque, Properties, Transport};
use std::ffi::c_void;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

fn spec(text: &str) -> FaultSpec {
    FaultSpec::parse(text).unwrap_or_else(|e| panic!("{text:?} parses: {e}"))
}

fn parse_err(text: &str) -> String {
    match FaultSpec::parse(text) {
        Ok(s) => panic!("{text:?} should not parse, got {s:?}"),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
            e.to_string()
        }
    }
}

#[test]
fn good_specs_parse_to_what_they_say() {
    let s = spec("connect=fail:2");
    assert_eq!(s.seed, 1, "the default seed");
    assert_eq!(s.connect, Some(Trigger::First(2)));
    assert_eq!(
        (s.accept, s.regmr, s.breaks, s.delay, s.panic),
        (None, None, None, None, None)
    );

    let s = spec(" seed = 7 ; connect=p:0.25; accept=fail:1;regmr=p:1;break=after:100;delay=ms:5,p:0.5;panic=reg_mr ;");
    assert_eq!(s.seed, 7);
    assert_eq!(s.connect, Some(Trigger::Chance(0.25)));
    assert_eq!(s.accept, Some(Trigger::First(1)));
    assert_eq!(s.regmr, Some(Trigger::Chance(1.0)));
    assert_eq!(s.breaks, Some(Break::After(100)));
    assert_eq!(s.delay, Some(Delay { ms: 5, p: 0.5 }));
    assert_eq!(s.panic, Some("regMr"), "call names match ignoring case and underscores");
    assert_eq!(
        s.to_string(),
        "seed=7;connect=p:0.25;accept=fail:1;regmr=p:1;break=after:100;delay=ms:5,p:0.5;panic=regMr"
    );
    assert_eq!(
        spec(&s.to_string()),
        s,
        "the canonical form parses back to the same spec"
    );

    assert_eq!(spec("break=p:0.001").breaks, Some(Break::Chance(0.001)));
    assert_eq!(spec("delay=ms:50").delay, Some(Delay { ms: 50, p: 1.0 }));
    assert_eq!(spec("delay=ms:50").to_string(), "seed=1;delay=ms:50");
    assert_eq!(spec("panic=isend").panic, Some("isend"));
    assert_eq!(spec("panic=IRECVCONSUMED").panic, Some("irecvConsumed"));
    assert_eq!(spec("connect=fail:0").connect, Some(Trigger::First(0)));
}

#[test]
fn bad_specs_name_the_setting_and_the_bad_part() {
    let cases = [
        (
            "connect=fial:2",
            "in `connect=fial:2`: expected `fail:K` or `p:P`, got `fial:2`",
        ),
        (
            "connect=fail:-1",
            "in `connect=fail:-1`: count `-1` is not a non-negative integer",
        ),
        (
            "accept=p:1.5",
            "in `accept=p:1.5`: probability `1.5` is not a number from 0 to 1",
        ),
        ("regmr=p:NaN", "probability `NaN` is not a number from 0 to 1"),
        ("regmr=p:", "probability `` is not a number from 0 to 1"),
        ("break=after:0", "in `break=after:0`: message count must be at least 1"),
        (
            "break=fail:3",
            "in `break=fail:3`: expected `after:N` or `p:P`, got `fail:3`",
        ),
        ("delay=50", "in `delay=50`: expected `ms:D` or `ms:D,p:P`, got `50`"),
        ("delay=ms:50,q:1", "expected `ms:D` or `ms:D,p:P`, got `ms:50,q:1`"),
        ("delay=ms:3600001", "delay 3600001 ms is more than 3600000 (one hour)"),
        (
            "panic=isnd",
            "`isnd` is not a plugin call (expected one of devices, getProperties,",
        ),
        ("panic=init", "`init` is not a plugin call"),
        (
            "seed=x;connect=fail:1",
            "in `seed=x`: seed `x` is not a non-negative integer",
        ),
        (
            "connect=fail:1;connect=p:0.5",
            "in `connect=p:0.5`: `connect` is given twice",
        ),
        (
            "conect=fail:1",
            "unknown fault `conect` (expected seed, connect, accept, regmr, break, delay or panic)",
        ),
        ("connect", "in `connect`: expected KEY=VALUE"),
        ("seed=3", "names no fault"),
        (";", "names no fault"),
    ];
    for (text, want) in cases {
        let e = parse_err(text);
        assert!(
            e.starts_with(&format!("NCCL_TCPXSHIM_FAULTS={text:?}")),
            "the error names the setting and its value: {e}"
        );
        assert!(e.contains(want), "{text:?}: want {want:?} in {e:?}");
    }
}

#[test]
fn config_parses_the_setting_so_a_bad_spec_fails_init() {
    let with = |v: &'static str| Config::from_vars(&move |k| (k == "NCCL_TCPXSHIM_FAULTS").then(|| v.to_string()));
    let c = with(" break=after:3 ").expect("a good spec");
    assert_eq!(c.faults.map(|f| f.breaks), Some(Some(Break::After(3))));
    let e = with("break=after:x").expect_err("a bad spec fails");
    assert!(
        e.to_string()
            .contains("NCCL_TCPXSHIM_FAULTS=\"break=after:x\": in `break=after:x`"),
        "{e}"
    );
    assert!(Config::default().faults.is_none());
}

/// An inner transport that says yes to everything at once and cannot break connections.
#[derive(Default)]
struct Stub {
    next: AtomicUsize,
}

impl Stub {
    fn new_object(&self) -> Opaque {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Opaque::from_addr(0x1000 + 16 * n).expect("non-zero")
    }
}

impl Transport for Stub {
    fn name(&self) -> &str {
        "stub"
    }
    fn devices(&self) -> Result<i32> {
        Ok(1)
    }
    fn properties(&self, _dev: i32) -> Result<Properties> {
        Err(crate::error::Error::invalid_usage("stub has no properties"))
    }
    fn listen(&self, _dev: i32, _handle: &mut [u8; HANDLE_SIZE]) -> Result<Opaque> {
        Ok(self.new_object())
    }
    unsafe fn connect(
        &self,
        _dev: i32,
        _handle: &mut [u8; HANDLE_SIZE],
        _dev_handle: *mut *mut DevHandle,
    ) -> Result<Option<Opaque>> {
        Ok(Some(self.new_object()))
    }
    unsafe fn accept(&self, _listen: Opaque, _dev_handle: *mut *mut DevHandle) -> Result<Option<Opaque>> {
        Ok(Some(self.new_object()))
    }
    unsafe fn reg_mr(&self, _comm: Opaque, _data: *mut c_void, _size: usize, _ptr_type: i32) -> Result<Opaque> {
        Ok(self.new_object())
    }
    unsafe fn dereg_mr(&self, _comm: Opaque, _mr: Opaque) -> Result<()> {
        Ok(())
    }
    unsafe fn isend(
        &self,
        _comm: Opaque,
        _data: *mut c_void,
        _size: i32,
        _tag: i32,
        _mr: Option<Opaque>,
    ) -> Result<Option<Opaque>> {
        Ok(Some(self.new_object()))
    }
    unsafe fn irecv(
        &self,
        _comm: Opaque,
        _data: &[*mut c_void],
        _sizes: &[i32],
        _tags: &[i32],
        _mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        Ok(Some(self.new_object()))
    }
    unsafe fn iflush(
        &self,
        _comm: Opaque,
        _data: &[*mut c_void],
        _sizes: &[i32],
        _mrs: &[Option<Opaque>],
    ) -> Result<Option<Opaque>> {
        Ok(None)
    }
    unsafe fn test(&self, _req: Opaque, sizes: Option<&mut [i32]>) -> Result<bool> {
        if let Some(s) = sizes.and_then(|s| s.first_mut()) {
            *s = 8;
        }
        Ok(true)
    }
    unsafe fn close_send(&self, _comm: Opaque) -> Result<()> {
        Ok(())
    }
    unsafe fn close_recv(&self, _comm: Opaque) -> Result<()> {
        Ok(())
    }
    unsafe fn close_listen(&self, _comm: Opaque) -> Result<()> {
        Ok(())
    }
}

fn over_stub(text: &str) -> Faults {
    Faults::new(Box::new(Stub::default()), spec(text))
}

/// Which of `n` connects through a fresh layer with `text` fail (each succeeding one is closed).
fn connect_failures(text: &str, n: usize) -> Vec<bool> {
    let f = over_stub(text);
    let t: &dyn Transport = &f;
    let mut h = [0u8; HANDLE_SIZE];
    (0..n)
        .map(|_| {
            // SAFETY: the stub dereferences nothing; comms go back to the layer that made them.
            match unsafe { t.connect(0, &mut h, null_mut()) } {
                Ok(Some(c)) => {
                    // SAFETY: as above.
                    unsafe { t.close_send(c) }.expect("close");
                    false
                }
                Ok(None) => panic!("the stub connects at once"),
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
                    true
                }
            }
        })
        .collect()
}

#[test]
fn the_same_seed_fails_the_same_connects_and_another_seed_others() {
    let a = connect_failures("seed=7;connect=p:0.3", 1000);
    let b = connect_failures("seed=7;connect=p:0.3", 1000);
    let c = connect_failures("seed=8;connect=p:0.3", 1000);
    assert_eq!(a, b, "same seed, same failures");
    assert_ne!(a, c, "another seed, other failures");
    for (seed, v) in [(7, &a), (8, &c)] {
        let n = v.iter().filter(|&&f| f).count();
        assert!((240..=360).contains(&n), "seed {seed}: {n} of 1000 failed with p:0.3");
    }
    let first = connect_failures("seed=7;connect=fail:3", 10);
    assert_eq!(
        first,
        [true, true, true, false, false, false, false, false, false, false]
    );
    assert!(connect_failures("connect=p:0", 100).iter().all(|&f| !f));
    assert!(connect_failures("connect=p:1", 100).iter().all(|&f| f));
}

/// Sends on `comm` of `t` until a send fails; returns how many completed before.
fn messages_until_broken(t: &dyn Transport, comm: Opaque, limit: usize) -> usize {
    let mut buf = [0u8; 8];
    for i in 0..limit {
        // SAFETY: the stub dereferences nothing; objects go back to the layer that made them.
        match unsafe { t.isend(comm, buf.as_mut_ptr().cast(), 8, 0, None) } {
            Ok(Some(r)) => {
                // SAFETY: as above.
                assert!(unsafe { t.test(r, None) }.expect("the stub completes sends"));
            }
            Ok(None) => panic!("the stub never says try again"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::ConnectionLost, "{e}");
                return i;
            }
        }
    }
    limit
}

#[test]
fn random_breaks_depend_on_the_comm_not_on_how_calls_interleave() {
    let run = |interleave: bool| {
        let f = over_stub("seed=11;break=p:0.05");
        let t: &dyn Transport = &f;
        let mut h = [0u8; HANDLE_SIZE];
        // SAFETY: the stub dereferences nothing.
        let (a, b) = unsafe {
            (
                t.connect(0, &mut h, null_mut()).unwrap().unwrap(),
                t.connect(0, &mut h, null_mut()).unwrap().unwrap(),
            )
        };
        if interleave {
            let mut out = [0, 0];
            let mut live = [true, true];
            for _ in 0..1000 {
                for (k, c) in [a, b].into_iter().enumerate() {
                    if live[k] {
                        if messages_until_broken(t, c, 1) == 1 {
                            out[k] += 1;
                        } else {
                            live[k] = false;
                        }
                    }
                }
            }
            (out[0], out[1])
        } else {
            (messages_until_broken(t, a, 1000), messages_until_broken(t, b, 1000))
        }
    };
    let (x, y) = run(false);
    assert!(x < 1000 && y < 1000, "p:0.05 breaks within 1000 messages: {x}, {y}");
    assert_eq!(run(true), (x, y), "each comm breaks at the same message either way");
}

#[test]
fn a_connection_the_inner_cannot_break_fails_every_later_call_here() {
    capture::start();
    let f = over_stub("break=after:2");
    let t: &dyn Transport = &f;
    let mut h = [0u8; HANDLE_SIZE];
    // SAFETY: the stub dereferences nothing.
    unsafe {
        let c = t.connect(0, &mut h, null_mut()).unwrap().unwrap();
        let other = t.connect(0, &mut h, null_mut()).unwrap().unwrap();
        let mut buf = [0u8; 8];
        let mr = t.reg_mr(c, buf.as_mut_ptr().cast(), 8, NCCL_PTR_HOST as i32).unwrap();
        assert_eq!(messages_until_broken(t, c, 10), 2, "exactly two messages go through");
        let want = "injected fault: connection broken after 2 messages (NCCL_TCPXSHIM_FAULTS break=after:2)";
        let e = t.isend(c, buf.as_mut_ptr().cast(), 8, 0, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionLost);
        assert_eq!(e.to_string(), format!("isend: {want}"));
        let e = t
            .reg_mr(c, buf.as_mut_ptr().cast(), 8, NCCL_PTR_HOST as i32)
            .unwrap_err();
        assert_eq!(e.to_string(), format!("regMr: {want}"));
        assert!(e.retryable());
        assert_eq!(messages_until_broken(t, other, 1), 1, "other comms are unaffected");
        t.dereg_mr(c, mr).expect("deregMr still releases");
        t.close_send(c).expect("close still releases");
        t.close_send(other).unwrap();
    }
    let warned = capture::lines_containing("the transport cannot cut connections");
    assert!(
        warned
            .iter()
            .any(|(l, s)| *l == log::Level::Warn && s.contains("connection broken after 2 messages")),
        "{warned:?}"
    );
}

#[test]
fn panic_names_the_fault_and_the_guard_turns_it_into_an_internal_error() {
    capture::start();
    let f = over_stub("panic=isend");
    let t: &dyn Transport = &f;
    let mut h = [0u8; HANDLE_SIZE];
    // SAFETY: the stub dereferences nothing.
    let c = unsafe { t.connect(0, &mut h, null_mut()) }.unwrap().unwrap();
    let mut buf = [0u8; 8];
    let data: *mut c_void = buf.as_mut_ptr().cast();
    let r = crate::export::guard("isend", null_mut(), || {
        // SAFETY: as above.
        unsafe { t.isend(c, data, 8, 0, None) }.map(|_| ())
    });
    assert_eq!(r, ncclResult_t::ncclInternalError);
    let lines = capture::lines_containing("isend: injected fault: panic (NCCL_TCPXSHIM_FAULTS panic=isend)");
    assert!(
        lines
            .iter()
            .any(|(l, s)| *l == log::Level::Warn && s.contains("isend: internal error (panic at")),
        "the guard's WARN carries the panic message naming the fault: {lines:?}"
    );
    // Only the named call panics.
    let r = crate::export::guard("irecv", null_mut(), || {
        // SAFETY: as above.
        unsafe { t.irecv(c, &[data], &[8], &[0], &[None]) }.map(|_| ())
    });
    assert_eq!(r, ncclResult_t::ncclSuccess);
    // SAFETY: as above.
    unsafe { t.close_send(c) }.unwrap();
}

// ---- over the built-in TCP transport on loopback ----

fn tcp() -> TcpTransport {
    TcpTransport::new(&TcpConfig {
        ifname: Some("lo".into()),
        ..Default::default()
    })
    .expect("built-in TCP transport on lo")
}

/// Polls `f` until it yields a value; panics after [`DEADLINE`].
fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// Connects through `s` to a listener of `r` until both sides have a comm: (send, recv, listen).
fn pair(s: &dyn Transport, r: &dyn Transport) -> (Opaque, Opaque, Opaque) {
    let mut h = [0u8; HANDLE_SIZE];
    let l = r.listen(0, &mut h).expect("listen");
    let (mut sc, mut rc) = (None, None);
    wait("connect and accept", || {
        // SAFETY: the handle is the listener's, unchanged between calls; comms go back to their transports.
        unsafe {
            if sc.is_none() {
                sc = s.connect(0, &mut h, null_mut()).expect("connect");
            }
            if rc.is_none() {
                rc = r.accept(l, null_mut()).expect("accept");
            }
        }
        Some((sc?, rc?))
    });
    (sc.unwrap(), rc.unwrap(), l)
}

/// Tests `req` of `t` until it completes or fails: the size reported, or the error.
fn finish(t: &dyn Transport, req: Opaque, what: &str) -> Result<i32> {
    let mut size = [-1i32];
    // SAFETY: `req` is an outstanding request of `t`, its buffer alive for the caller.
    wait(what, || match unsafe { t.test(req, Some(&mut size)) } {
        Ok(true) => Some(Ok(size[0])),
        Ok(false) => None,
        Err(e) => Some(Err(e)),
    })
}

/// The outcome of a request: the posting call's error, or the request's.
fn outcome(t: &dyn Transport, posted: Result<Option<Opaque>>, what: &str) -> Result<i32> {
    match posted? {
        Some(req) => finish(t, req, what),
        None => panic!("{what}: the built-in transport never says try again"),
    }
}

#[test]
fn connect_fail_2_refuses_two_connects_through_the_stack_and_the_third_succeeds() {
    capture::start();
    let cfg = Config {
        faults: Some(spec("seed=5;connect=fail:2")),
        // Without connect retry, so the injected refusals reach the caller (src/stack/retry.rs
        // tests them retried).
        connect_timeout: None,
        ..Config::default()
    };
    let info = LoadInfo {
        name: "tcpxshim".into(),
        source: "built-in".into(),
        abi_version: 0,
        devices: 0,
    };
    let shim = crate::stack::build_over(&cfg, Box::new(tcp()), info).expect("stack");
    assert_eq!(
        capture::lines_containing("injecting faults seed=5;connect=fail:2 into tcpxshim"),
        vec![(
            log::Level::Warn,
            format!(
                "{} NCCL_TCPXSHIM_FAULTS is set: injecting faults seed=5;connect=fail:2 into tcpxshim (for tests and \
                 chaos runs, never for production)",
                crate::logging::PREFIX
            )
        )],
        "one WARN at build time"
    );
    let t: &dyn Transport = &shim;
    let mut h = [0u8; HANDLE_SIZE];
    let l = t.listen(0, &mut h).expect("listen");
    for i in 1..=2 {
        // SAFETY: the listener's handle; nothing is dereferenced on the failing path.
        let e = unsafe { t.connect(0, &mut h, null_mut()) }.expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
        assert!(e.retryable());
        assert!(
            e.to_string().ends_with(&format!(
                "connect: injected fault: connection attempt #{i} refused (NCCL_TCPXSHIM_FAULTS connect=fail:2)"
            )),
            "{e}"
        );
    }
    let (mut sc, mut rc) = (None, None);
    wait("the third connect", || {
        // SAFETY: the same, unchanged handle on every call of this attempt.
        unsafe {
            if sc.is_none() {
                sc = t.connect(0, &mut h, null_mut()).expect("the third connect succeeds");
            }
            if rc.is_none() {
                rc = t.accept(l, null_mut()).expect("accept");
            }
        }
        Some((sc?, rc?))
    });
    let (sc, rc) = (sc.unwrap(), rc.unwrap());
    let mut data = pattern(3000, 1);
    let mut buf = vec![0u8; 3000];
    // SAFETY: the buffers outlive the requests, which complete before they are dropped.
    unsafe {
        let rr = t.irecv(rc, &[buf.as_mut_ptr().cast()], &[3000], &[0], &[None]);
        let sr = t.isend(sc, data.as_mut_ptr().cast(), 3000, 0, None);
        assert_eq!(outcome(t, sr, "send").unwrap(), 3000);
        assert_eq!(outcome(t, rr, "receive").unwrap(), 3000);
        assert!(
            buf == data,
            "the bytes arrive over the connection made on the third attempt"
        );
        t.close_send(sc).unwrap();
        t.close_recv(rc).unwrap();
        t.close_listen(l).unwrap();
    }
}

#[test]
fn break_after_5_lets_five_messages_through_then_both_sides_lose_the_connection() {
    capture::start();
    // The sender's stack injects faults; the receiver is a plain transport that only sees the wire.
    let f = Faults::new(Box::new(tcp()), spec("break=after:5"));
    let plain = tcp();
    let (s, r): (&dyn Transport, &dyn Transport) = (&f, &plain);
    let (sc, rc, l) = pair(s, r);
    // Inline and striped messages (the inline threshold is 16 KiB).
    let sizes = [1000usize, 100_000, 0, 20_000, 4096];
    let mut keep = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let mut data = pattern(n, i as u32);
        let mut buf = vec![0xEEu8; n];
        // SAFETY: the buffers outlive the requests (they complete here).
        unsafe {
            let rr = r.irecv(rc, &[buf.as_mut_ptr().cast()], &[n as i32], &[0], &[None]);
            let sr = s.isend(sc, data.as_mut_ptr().cast(), n as i32, 0, None);
            assert_eq!(outcome(s, sr, "send").expect("messages 1 to 5 are sent"), n as i32);
            assert_eq!(outcome(r, rr, "receive").expect("messages 1 to 5 arrive"), n as i32);
        }
        assert!(buf == data, "message {} arrives intact", i + 1);
        keep.push((data, buf));
    }
    // The sixth: the sender's own socket is shut down, and the receiver reads end of stream.
    let mut data = pattern(64, 6);
    let mut buf = vec![0u8; 64];
    // SAFETY: the buffers outlive the requests (kept until after the comms are closed).
    let (se, re) = unsafe {
        let rr = r.irecv(rc, &[buf.as_mut_ptr().cast()], &[64], &[0], &[None]);
        let sr = s.isend(sc, data.as_mut_ptr().cast(), 64, 0, None);
        (
            outcome(s, sr, "the sixth send").expect_err("the sixth send fails"),
            outcome(r, rr, "the sixth receive").expect_err("the sixth receive fails"),
        )
    };
    assert_eq!(se.kind(), ErrorKind::ConnectionLost, "sender: {se}");
    assert_eq!(re.kind(), ErrorKind::ConnectionLost, "receiver: {re}");
    assert!(re.to_string().contains("closed while receiving message 5"), "{re}");
    assert!(buf.iter().all(|&b| b == 0), "nothing of the sixth message arrived");
    let warned = capture::lines_containing(
        "injected fault: connection broken after 5 messages (NCCL_TCPXSHIM_FAULTS break=after:5)",
    );
    assert_eq!(warned.len(), 1, "one WARN for one break: {warned:?}");
    assert!(warned[0].1.ends_with("the transport cut the connection"), "{warned:?}");
    // SAFETY: the comms are open; closing abandons the failed requests.
    unsafe {
        s.close_send(sc).unwrap();
        r.close_recv(rc).unwrap();
        r.close_listen(l).unwrap();
    }
    drop((data, buf, keep));
}

#[test]
fn delay_50_ms_holds_completions_back_then_reports_the_right_sizes_and_bytes() {
    let f = Faults::new(Box::new(tcp()), spec("delay=ms:50"));
    let t: &dyn Transport = &f;
    let (sc, rc, l) = pair(t, t);
    for (i, n) in [1000usize, 200_000].into_iter().enumerate() {
        let mut data = pattern(n, 40 + i as u32);
        let mut buf = vec![0u8; n];
        // SAFETY: the buffers outlive the requests, which complete before they are dropped.
        let (rr, r_at, sr, s_at) = unsafe {
            let r_at = Instant::now();
            let rr = t
                .irecv(rc, &[buf.as_mut_ptr().cast()], &[n as i32], &[0], &[None])
                .unwrap()
                .unwrap();
            let s_at = Instant::now();
            let sr = t
                .isend(sc, data.as_mut_ptr().cast(), n as i32, 0, None)
                .unwrap()
                .unwrap();
            (rr, r_at, sr, s_at)
        };
        let (mut s_done, mut r_done) = (None, None);
        let mut not_done = 0u32;
        wait("delayed send and receive", || {
            for (req, posted, done) in [(sr, s_at, &mut s_done), (rr, r_at, &mut r_done)] {
                if done.is_some() {
                    continue;
                }
                let mut size = [-1i32];
                // SAFETY: outstanding requests of `t`, their buffers alive.
                if unsafe { t.test(req, Some(&mut size)) }.expect("test") {
                    *done = Some((posted.elapsed(), size[0]));
                } else {
                    not_done += 1;
                }
            }
            Some((s_done?, r_done?))
        });
        let ((s_after, s_size), (r_after, r_size)) = (s_done.unwrap(), r_done.unwrap());
        assert!(s_after >= Duration::from_millis(50), "send done after {s_after:?}");
        assert!(r_after >= Duration::from_millis(50), "receive done after {r_after:?}");
        assert!(s_after < Duration::from_secs(10) && r_after < Duration::from_secs(10));
        assert!(not_done > 0);
        assert_eq!((s_size, r_size), (n as i32, n as i32));
        assert!(buf == data, "{n} bytes arrive intact");
    }
    // SAFETY: open comms of `t`, nothing outstanding.
    unsafe {
        t.close_send(sc).unwrap();
        t.close_recv(rc).unwrap();
        t.close_listen(l).unwrap();
    }
}

#[test]
fn regmr_fail_1_fails_the_first_registration_only() {
    let f = Faults::new(Box::new(tcp()), spec("regmr=fail:1"));
    let t: &dyn Transport = &f;
    let (sc, rc, l) = pair(t, t);
    let mut buf = vec![0u8; 4096];
    let p: *mut c_void = buf.as_mut_ptr().cast();
    // SAFETY: open comms of `t`; the buffer outlives its registrations.
    unsafe {
        let e = t
            .reg_mr(sc, p, 4096, NCCL_PTR_HOST as i32)
            .expect_err("the first regMr fails");
        assert_eq!(e.kind(), ErrorKind::System);
        assert_eq!(
            e.to_string(),
            "regMr: injected fault: registration #1 failed (NCCL_TCPXSHIM_FAULTS regmr=fail:1)"
        );
        let a = t
            .reg_mr(sc, p, 4096, NCCL_PTR_HOST as i32)
            .expect("the second succeeds");
        let b = t.reg_mr(rc, p, 4096, NCCL_PTR_HOST as i32).expect("and the third");
        t.dereg_mr(sc, a).unwrap();
        t.dereg_mr(rc, b).unwrap();
        t.close_send(sc).unwrap();
        t.close_recv(rc).unwrap();
        t.close_listen(l).unwrap();
    }
}

/// A delayed request whose data has long arrived must not lose its identity to the next request
/// the inner transport hands out (the built-in transport reuses request slots at once): several
/// small messages back to back, each delayed, all arrive complete and in order.
#[test]
fn delayed_requests_back_to_back_keep_their_own_completions() {
    let f = Faults::new(Box::new(tcp()), spec("delay=ms:20"));
    let t: &dyn Transport = &f;
    let (sc, rc, l) = pair(t, t);
    let n = 64usize;
    let sends: Vec<Vec<u8>> = (0..6).map(|i| pattern(n + i, 70 + i as u32)).collect();
    let mut bufs: Vec<Vec<u8>> = (0..6).map(|_| vec![0u8; n + 8]).collect();
    let mut reqs = Vec::new();
    for (i, (s, b)) in sends.iter().zip(bufs.iter_mut()).enumerate() {
        // SAFETY: the buffers outlive the requests, which complete before they are dropped.
        let (rr, sr) = unsafe {
            let rr = t
                .irecv(rc, &[b.as_mut_ptr().cast()], &[b.len() as i32], &[0], &[None])
                .unwrap()
                .unwrap();
            let sr = t
                .isend(sc, s.as_ptr() as *mut _, s.len() as i32, 0, None)
                .unwrap()
                .unwrap();
            (rr, sr)
        };
        // Test both a while inside their delay, as NCCL's proxy does, so the inner transport has
        // long finished them when the next pair is posted.
        let until = Instant::now() + Duration::from_millis(5);
        while Instant::now() < until {
            // SAFETY: outstanding requests of `t`.
            unsafe {
                assert!(!t.test(sr, None).unwrap(), "send {i} reported before its delay");
                assert!(!t.test(rr, None).unwrap(), "receive {i} reported before its delay");
            }
        }
        reqs.push((sr, rr, s.len() as i32));
    }
    for (i, (sr, rr, len)) in reqs.into_iter().enumerate() {
        assert_eq!(finish(t, sr, "delayed send").unwrap(), len, "send {i}");
        assert_eq!(
            finish(t, rr, "delayed receive").unwrap(),
            len,
            "receive {i}: its own size"
        );
    }
    for (i, (s, b)) in sends.iter().zip(&bufs).enumerate() {
        assert_eq!(&b[..s.len()], &s[..], "message {i} arrived intact and in order");
    }
    // SAFETY: the pair's comms, nothing outstanding.
    unsafe {
        t.close_send(sc).unwrap();
        t.close_recv(rc).unwrap();
        t.close_listen(l).unwrap();
    }
}
