//! Tests of the connect retry layer over the built-in TCP transport on loopback: a connect made
//! before anybody listens at the handle's address succeeds once somebody does, the deadline gives
//! an error that says what happened, and the fault layer's refused connects are retried through
//! the whole stack. Every wait is bounded by [`DEADLINE`].

use super::{Cause, Retry};
use crate::config::Config;
use crate::error::{Error, ErrorKind};
use crate::ffi::{HANDLE_SIZE, NCCL_PTR_HOST};
use crate::logging::capture;
use crate::stack::LoadInfo;
use crate::tcp::wire::ListenHandle;
use crate::tcp::{TcpConfig, TcpTransport};
use crate::transport::{Opaque, Transport};
use std::ffi::c_void;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

fn tcp() -> TcpTransport {
    TcpTransport::new(&TcpConfig {
        ifname: Some("lo".into()),
        ..Default::default()
    })
    .expect("built-in TCP transport on lo")
}

/// A loopback port nobody listens on (bound once by the OS, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Points a built-in transport's handle at `port` of the same address.
fn retarget(h: &mut [u8; HANDLE_SIZE], port: u16) -> SocketAddr {
    let mut lh = ListenHandle::read(h).expect("a built-in handle");
    let real = lh.addr;
    lh.addr.set_port(port);
    lh.write(h).expect("rewrite the handle");
    real
}

/// Copies bytes from `a` to `b` until either side closes or errs.
fn pump(mut a: TcpStream, mut b: TcpStream) {
    let mut buf = [0u8; 65536];
    while let Ok(n) = a.read(&mut buf) {
        if n == 0 || b.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = b.shutdown(Shutdown::Write);
}

/// After `delay`, listens on `port` and forwards each of the first `conns` connections to `to`.
fn forward_later(port: u16, to: SocketAddr, delay: Duration, conns: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        let l = TcpListener::bind(("127.0.0.1", port)).expect("listen on the handle's port");
        for _ in 0..conns {
            let Ok((c, _)) = l.accept() else { return };
            let Ok(up) = TcpStream::connect(to) else { return };
            let (c2, up2) = (c.try_clone().expect("clone"), up.try_clone().expect("clone"));
            std::thread::spawn(move || pump(c, up));
            std::thread::spawn(move || pump(up2, c2));
        }
    })
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
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Tests `req` of `t` until done; returns the size.
fn finish(t: &dyn Transport, req: Opaque) -> i32 {
    let mut size = [-1i32];
    // SAFETY: `req` is an outstanding request of `t`, its buffer alive for the caller.
    wait("a request", || match unsafe { t.test(req, Some(&mut size)) } {
        Ok(true) => Some(size[0]),
        Ok(false) => None,
        Err(e) => panic!("test: {e}"),
    })
}

#[test]
fn a_connect_made_before_anybody_listens_succeeds_once_the_address_is_listened_on() {
    capture::start();
    let t = Retry::new(Box::new(tcp()), DEADLINE);
    let mut h = [0u8; HANDLE_SIZE];
    let l = t.listen(0, &mut h).expect("listen");
    let port = free_port();
    let real = retarget(&mut h, port);
    // 1 control socket and the default 4 data sockets, all through the late listener.
    let fwd = forward_later(port, real, Duration::from_millis(300), 1 + TcpConfig::default().streams);
    let start = Instant::now();
    let (mut sc, mut rc, mut waits) = (None, None, 0u32);
    wait("connect and accept", || {
        // SAFETY: the same handle buffer on every call; comms go back to this transport.
        unsafe {
            if sc.is_none() {
                sc = t
                    .connect(0, &mut h, null_mut())
                    .expect("connect is retried, never failed");
                waits += u32::from(sc.is_none());
            }
            if rc.is_none() {
                rc = t.accept(l, null_mut()).expect("accept");
            }
        }
        Some((sc?, rc?))
    });
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "nobody listened before then"
    );
    assert!(waits > 0, "connect answered try again while refused");
    assert_eq!(t.in_retry(), 0, "the connect's state is dropped once it succeeds");
    let needle = format!("127.0.0.1:{port}");
    let ok = capture::lines_containing("connect: connected after");
    assert!(
        ok.iter()
            .any(|(lvl, l)| *lvl == log::Level::Info && l.contains(&needle)),
        "one INFO line on success after retries: {ok:?}"
    );
    let retries = capture::lines_containing("failed (refused: ");
    let ours: Vec<_> = retries.iter().filter(|(_, l)| l.contains(&needle)).collect();
    assert!(!ours.is_empty(), "an INFO line for the retries: {retries:?}");
    assert!(
        ours.len() <= 2 + start.elapsed().as_secs() as usize,
        "at most one retry line a second: {ours:?}"
    );
    // The connection works through the late listener.
    let (sc, rc) = (sc.unwrap(), rc.unwrap());
    let mut out: Vec<u8> = (0..100u8).collect();
    let mut back = vec![0u8; 100];
    // SAFETY: the buffers outlive the requests, which complete before they are dropped.
    unsafe {
        let rmr = t
            .reg_mr(rc, back.as_mut_ptr().cast(), 100, NCCL_PTR_HOST as i32)
            .unwrap();
        let smr = t
            .reg_mr(sc, out.as_mut_ptr().cast(), 100, NCCL_PTR_HOST as i32)
            .unwrap();
        let d: [*mut c_void; 1] = [back.as_mut_ptr().cast()];
        let r = t.irecv(rc, &d, &[100], &[7], &[Some(rmr)]).unwrap().expect("irecv");
        let s = t
            .isend(sc, out.as_mut_ptr().cast(), 100, 7, Some(smr))
            .unwrap()
            .expect("isend");
        assert_eq!(finish(&t, s), 100);
        assert_eq!(finish(&t, r), 100);
        t.dereg_mr(sc, smr).unwrap();
        t.dereg_mr(rc, rmr).unwrap();
        t.close_send(sc).unwrap();
        t.close_recv(rc).unwrap();
        t.close_listen(l).unwrap();
    }
    assert_eq!(back, out);
    fwd.join().expect("forwarder");
}

#[test]
fn the_deadline_ends_the_retries_with_the_attempts_the_cause_and_the_setting() {
    let t = Retry::new(Box::new(tcp()), Duration::from_secs(1));
    let mut h = [0u8; HANDLE_SIZE];
    let l = t.listen(0, &mut h).expect("listen");
    let port = free_port();
    retarget(&mut h, port);
    let start = Instant::now();
    let mut polls = 0u32;
    let e: Error = wait("the deadline", || {
        polls += 1;
        // SAFETY: the same handle buffer on every call; nothing connects.
        match unsafe { t.connect(0, &mut h, null_mut()) } {
            Ok(None) => None,
            Ok(Some(_)) => panic!("nobody listens on port {port}"),
            Err(e) => Some(e),
        }
    });
    assert!(polls > 1, "retried before giving up");
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "gave up at the deadline, not at once"
    );
    let msg = e.to_string();
    assert_eq!(e.kind(), ErrorKind::Refused, "{msg}");
    assert!(msg.starts_with("gave up after "), "{msg}");
    assert!(msg.contains("NCCL_TCPXSHIM_CONNECT_TIMEOUT=1 s"), "{msg}");
    assert!(
        msg.contains("last cause (refused)") && msg.contains(&format!("127.0.0.1:{port}")),
        "{msg}"
    );
    let n: u32 = msg["gave up after ".len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the number of attempts in {msg}"));
    assert!(n >= 3, "10, 20, 40 ms... fit several attempts in 1 s: {msg}");
    assert_eq!(t.in_retry(), 0, "the connect's state is dropped when it finally fails");
    // SAFETY: the listen comm is this transport's.
    unsafe { t.close_listen(l).unwrap() };
}

#[test]
fn errors_are_retried_by_cause() {
    let os = |n| Error::io("connect", std::io::Error::from_raw_os_error(n));
    assert_eq!(Cause::of(&os(libc::ECONNREFUSED)), Some(Cause::Refused));
    assert_eq!(Cause::of(&os(libc::EHOSTUNREACH)), Some(Cause::Unreachable));
    assert_eq!(Cause::of(&os(libc::ENETUNREACH)), Some(Cause::Unreachable));
    assert_eq!(Cause::of(&os(libc::ETIMEDOUT)), Some(Cause::TimedOut));
    assert_eq!(Cause::of(&os(libc::EACCES)), None);
    assert_eq!(Cause::of(&Error::invalid_usage("connect: streams differ")), None);
    let inner = Error::inner("connect", crate::ffi::ncclResult_t::ncclSystemError);
    assert_eq!(Cause::of(&inner), None, "a plugin's bare error code says nothing");
    let with = inner.with_cause(std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
    assert_eq!(Cause::of(&with), Some(Cause::Refused));
    assert_eq!(
        Cause::of(&Error::new(ErrorKind::Refused, "injected")),
        Some(Cause::Refused)
    );
    assert!(super::is_tcpx("GPUDirectTCPX_v7") && !super::is_tcpx("tcpxshim") && !super::is_tcpx("Fixture_v7"));
}

#[test]
fn injected_refused_connects_are_retried_through_the_stack() {
    capture::start();
    let cfg = Config {
        faults: Some(crate::stack::FaultSpec::parse("seed=11;connect=fail:2").unwrap()),
        ..Config::default()
    };
    let info = LoadInfo {
        name: "tcpxshim".into(),
        source: "built-in".into(),
        abi_version: 0,
        devices: 0,
    };
    let shim = crate::stack::build_over(&cfg, Box::new(tcp()), info).expect("stack");
    let t: &dyn Transport = &shim;
    let mut h = [0u8; HANDLE_SIZE];
    let l = t.listen(0, &mut h).expect("listen");
    let (mut sc, mut rc) = (None, None);
    wait("connect and accept", || {
        // SAFETY: the same handle buffer on every call; comms go back to the stack.
        unsafe {
            if sc.is_none() {
                sc = t.connect(0, &mut h, null_mut()).expect("injected refusals are retried");
            }
            if rc.is_none() {
                rc = t.accept(l, null_mut()).expect("accept");
            }
        }
        Some((sc?, rc?))
    });
    let lines = capture::lines_containing("(NCCL_TCPXSHIM_FAULTS connect=fail:2)");
    assert!(
        lines
            .iter()
            .any(|(_, l)| l.contains("connect: connected after 2 failed attempt(s)")),
        "{lines:?}"
    );
    // SAFETY: the comms are the stack's, closed once.
    unsafe {
        t.close_send(sc.unwrap()).unwrap();
        t.close_recv(rc.unwrap()).unwrap();
        t.close_listen(l).unwrap();
    }
}
