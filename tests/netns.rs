//! Dead-peer detection of the built-in TCP transport across a real link: two network namespaces
//! made by the test, joined by a veth pair, one rank in each (a thread that entered the
//! namespace; its sockets stay there). Taking one end of the link down makes the peer silent
//! (no reset, no error, packets vanish), the way a crashed host or a cut cable looks.
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and `ip` from iproute2, as CI has them; without
//! them every test fails and says why. Every wait is bounded.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};
use tcpxshim::error::{Error, ErrorKind};
use tcpxshim::ffi::HANDLE_SIZE;
use tcpxshim::tcp::{TcpConfig, TcpTransport};
use tcpxshim::transport::{Opaque, Transport};

/// The sending rank's address (namespace `a`, interface `va`).
const ADDR_A: &str = "10.231.7.1";
/// The receiving rank's address (namespace `b`, interface `vb`).
const ADDR_B: &str = "10.231.7.2";
/// Bytes of each message.
const MSG: usize = 4 << 20;
/// Size of the message that ends a transfer.
const END: usize = 8;
/// Longest any loop of these tests runs.
const DEADLINE: Duration = Duration::from_secs(40);

/// Runs `ip ARGS`, panicking with its output when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {}` ({e}): these tests need iproute2", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {} -- these tests need root (network namespaces and veth pairs)",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Two network namespaces joined by a veth pair (`va` with [`ADDR_A`] in `a`, `vb` with
/// [`ADDR_B`] in `b`); both are deleted when it is dropped, also when the test fails.
struct Link {
    a: String,
    b: String,
}

impl Link {
    fn new(case: &str) -> Link {
        let pid = std::process::id();
        let link = Link {
            a: format!("tcpxshim-{pid}-{case}-a"),
            b: format!("tcpxshim-{pid}-{case}-b"),
        };
        ip(&["netns", "add", &link.a]);
        ip(&["netns", "add", &link.b]);
        ip(&[
            "-n", &link.a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &link.b,
        ]);
        ip(&["-n", &link.a, "addr", "add", &format!("{ADDR_A}/24"), "dev", "va"]);
        ip(&["-n", &link.b, "addr", "add", &format!("{ADDR_B}/24"), "dev", "vb"]);
        ip(&["-n", &link.a, "link", "set", "va", "up"]);
        ip(&["-n", &link.b, "link", "set", "vb", "up"]);
        link
    }

    /// Takes side `a`'s (`true`) or `b`'s end of the link down or up.
    fn set(&self, a: bool, up: bool) {
        let (ns, dev) = if a { (&self.a, "va") } else { (&self.b, "vb") };
        ip(&["-n", ns, "link", "set", dev, if up { "up" } else { "down" }]);
    }

    /// Keepalive probes sent in namespace `ns` so far (TcpExt TCPKeepAlive of /proc/net/netstat).
    fn keepalives(ns: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "cat", "/proc/net/netstat"])
            .output()
            .expect("ip netns exec cat /proc/net/netstat");
        assert!(out.status.success(), "reading /proc/net/netstat in {ns}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
        assert_eq!(lines.len(), 2, "TcpExt names and values in {ns}: {text}");
        let names = lines[0].split_whitespace();
        let values = lines[1].split_whitespace();
        names
            .zip(values)
            .find(|(n, _)| *n == "TCPKeepAlive")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no TCPKeepAlive counter in {ns}: {text}"))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth pair, and with it the other end.
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Moves the calling thread into network namespace `ns`.
fn enter(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}")).unwrap_or_else(|e| panic!("opening namespace {ns}: {e}"));
    // SAFETY: setns only changes the calling thread's network namespace; the fd is open for the call.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns into {ns}: {}", std::io::Error::last_os_error());
}

/// The built-in transport on `addr` with `settings` (name, value) on top of the defaults.
fn transport(addr: &str, settings: &[(&str, &str)]) -> TcpTransport {
    let mut vars: Vec<(String, String)> = vec![
        ("NCCL_TCPXSHIM_TCP_ADDRS".into(), addr.into()),
        ("NCCL_TCPXSHIM_TCP_STREAMS".into(), "2".into()),
        ("NCCL_TCPXSHIM_TCP_WORKERS".into(), "1".into()),
    ];
    vars.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let cfg = TcpConfig::from_vars(&get).expect("settings parse");
    TcpTransport::new(&cfg).unwrap_or_else(|e| panic!("built-in transport on {addr}: {e}"))
}

/// What one side's loop saw.
#[derive(Debug)]
enum End {
    /// The transfer ended normally after this many messages (the end message not counted).
    Done(u64),
    /// A request failed, at that moment.
    Failed(Error, Instant),
    /// Told to stop (the test has what it needs) or out of time.
    Stopped,
}

/// Shared by the two ranks and the test thread.
struct Progress {
    /// Messages received intact.
    received: AtomicU64,
    /// While true the sender keeps sending full messages; then one end message.
    more: AtomicBool,
    /// Full messages the sender may send before it waits (for `more` to end, or for more budget).
    budget: AtomicU64,
    /// Both loops give up (the test has decided).
    stop: AtomicBool,
    /// Whether the sender's and the receiver's loop ended.
    ended: [AtomicBool; 2],
}

/// Index of the sender in [`Progress::ended`].
const SENDER: usize = 0;
/// Index of the receiver in [`Progress::ended`].
const RECEIVER: usize = 1;

impl Progress {
    fn new() -> Progress {
        Progress {
            received: AtomicU64::new(0),
            more: AtomicBool::new(true),
            budget: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
            ended: [AtomicBool::new(false), AtomicBool::new(false)],
        }
    }

    /// Waits until the loops of `sides` ended (panics after [`DEADLINE`]).
    fn wait_ended(&self, sides: &[usize]) {
        let start = Instant::now();
        while !sides.iter().all(|&i| self.ended[i].load(Ordering::SeqCst)) {
            assert!(start.elapsed() < DEADLINE, "the ranks did not finish in {DEADLINE:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until at least `n` messages arrived (panics after [`DEADLINE`]).
    fn wait_received(&self, n: u64) {
        let start = Instant::now();
        while self.received.load(Ordering::SeqCst) < n {
            assert!(
                start.elapsed() < DEADLINE,
                "fewer than {n} messages arrived in {DEADLINE:?}"
            );
            assert!(
                !self.ended.iter().any(|e| e.load(Ordering::SeqCst)),
                "a rank ended before {n} messages arrived"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Tests `req` until it completes (Ok(size)), fails, or the test stops or runs out of time (Ok(None)).
fn complete(t: &TcpTransport, req: Opaque, p: &Progress, start: Instant) -> Result<Option<i32>, Error> {
    loop {
        let mut size = [-1i32];
        // SAFETY: `req` was returned by isend/irecv on a comm of `t` that is still open.
        if unsafe { t.test(req, Some(&mut size)) }? {
            return Ok(Some(size[0]));
        }
        if p.stop.load(Ordering::SeqCst) || start.elapsed() > DEADLINE {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The payload of message `i`: its number in the first 8 bytes, then a fixed pattern.
fn fill(buf: &mut [u8], i: u64) {
    buf[..8].copy_from_slice(&i.to_le_bytes());
    for (k, b) in buf[8..].iter_mut().enumerate() {
        *b = (k as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8;
    }
}

/// Sends messages of [`MSG`] bytes while `p.more`, then one of [`END`] bytes.
fn send_loop(t: &TcpTransport, s: Opaque, p: &Progress) -> End {
    let start = Instant::now();
    let mut buf = vec![0u8; MSG];
    fill(&mut buf, 0);
    for i in 0u64.. {
        // The test may hold the stream back (an idle link).
        while i >= p.budget.load(Ordering::SeqCst) && p.more.load(Ordering::SeqCst) {
            if p.stop.load(Ordering::SeqCst) || start.elapsed() > DEADLINE {
                return End::Stopped;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let last = !p.more.load(Ordering::SeqCst);
        let size = if last { END } else { MSG };
        buf[..8].copy_from_slice(&i.to_le_bytes());
        // SAFETY: `s` is an open send comm of `t`; `buf` outlives the request (completed or failed
        // below before the next isend or the comm's close).
        let req = match unsafe { t.isend(s, buf.as_mut_ptr().cast(), size as i32, 0, None) } {
            Ok(Some(r)) => r,
            Ok(None) => panic!("isend refused a request with none outstanding"),
            Err(e) => return End::Failed(e, Instant::now()),
        };
        match complete(t, req, p, start) {
            Ok(Some(_)) if last => return End::Done(i),
            Ok(Some(_)) => {}
            Ok(None) => return End::Stopped,
            Err(e) => return End::Failed(e, Instant::now()),
        }
    }
    unreachable!()
}

/// Receives messages, checking every byte, until the end message.
fn recv_loop(t: &TcpTransport, r: Opaque, p: &Progress) -> End {
    let start = Instant::now();
    let mut want = vec![0u8; MSG];
    fill(&mut want, 0);
    let mut buf = vec![0u8; MSG];
    for i in 0u64.. {
        buf.fill(0xEE);
        // SAFETY: `r` is an open receive comm of `t`; `buf` outlives the request.
        let req = match unsafe { t.irecv(r, &[buf.as_mut_ptr().cast()], &[MSG as i32], &[0], &[None]) } {
            Ok(Some(q)) => q,
            Ok(None) => panic!("irecv refused a request with none outstanding"),
            Err(e) => return End::Failed(e, Instant::now()),
        };
        match complete(t, req, p, start) {
            Ok(Some(n)) if n as usize == END => {
                assert_eq!(buf[..8], i.to_le_bytes(), "end message out of order");
                return End::Done(i);
            }
            Ok(Some(n)) => {
                assert_eq!(n as usize, MSG, "size of message {i}");
                want[..8].copy_from_slice(&i.to_le_bytes());
                assert!(buf == want, "message {i} arrived corrupted");
                p.received.fetch_add(1, Ordering::SeqCst);
            }
            Ok(None) => return End::Stopped,
            Err(e) => return End::Failed(e, Instant::now()),
        }
    }
    unreachable!()
}

/// Connects a rank in `link.a` (sending, on [`ADDR_A`]) to one in `link.b` (receiving, on
/// [`ADDR_B`]), both with `settings`, and runs their loops (the sender holding back after
/// `budget` full messages until `more` ends) while `control` runs in this thread.
/// Returns what the sender, the receiver and `control` ended with.
fn run<C: Send>(
    link: &Link,
    settings: &[(&str, &str)],
    budget: u64,
    control: impl FnOnce(&Progress) -> C,
) -> (End, End, C) {
    let p = Progress::new();
    p.budget.store(budget, Ordering::SeqCst);
    let (tx, rx) = mpsc::channel::<[u8; HANDLE_SIZE]>();
    let rx = Mutex::new(rx);
    std::thread::scope(|sc| {
        let recv = sc.spawn(|| {
            enter(&link.b);
            let t = transport(ADDR_B, settings);
            let mut h = [0u8; HANDLE_SIZE];
            let l = t.listen(0, &mut h).expect("listen");
            tx.send(h).expect("handle to the sender");
            let start = Instant::now();
            let r = loop {
                // SAFETY: `l` is the listen comm just made on `t`.
                if let Some(r) = unsafe { t.accept(l, null_mut()) }.expect("accept") {
                    break r;
                }
                assert!(start.elapsed() < DEADLINE, "accept did not complete");
                std::thread::sleep(Duration::from_millis(1));
            };
            let end = recv_loop(&t, r, &p);
            p.ended[RECEIVER].store(true, Ordering::SeqCst);
            // SAFETY: comms of `t`, closed once; no request of them is tested any more.
            unsafe {
                t.close_recv(r).expect("closeRecv");
                t.close_listen(l).expect("closeListen");
            }
            end
        });
        let send = sc.spawn(|| {
            enter(&link.a);
            let t = transport(ADDR_A, settings);
            let mut h = rx.lock().unwrap().recv().expect("handle from the receiver");
            let start = Instant::now();
            let s = loop {
                // SAFETY: `h` is the receiver's handle, kept unchanged between the calls.
                if let Some(s) = unsafe { t.connect(0, &mut h, null_mut()) }.expect("connect") {
                    break s;
                }
                assert!(start.elapsed() < DEADLINE, "connect did not complete");
                std::thread::sleep(Duration::from_millis(1));
            };
            let end = send_loop(&t, s, &p);
            p.ended[SENDER].store(true, Ordering::SeqCst);
            // SAFETY: a send comm of `t`, closed once; its requests are no longer tested.
            unsafe { t.close_send(s).expect("closeSend") };
            end
        });
        let c = control(&p);
        p.stop.store(true, Ordering::SeqCst);
        let s = send.join().expect("sending rank");
        let r = recv.join().expect("receiving rank");
        (s, r, c)
    })
}

/// Checks that `end` is a failure of a silent peer at `peer`, within `bound` of `since`, naming
/// `setting`.
fn assert_silent_peer_failure(side: &str, end: &End, since: Instant, bound: Duration, peer: &str, setting: &str) {
    let End::Failed(e, at) = end else {
        panic!("the {side} did not fail after its peer went silent: {end:?}")
    };
    let took = at.saturating_duration_since(since);
    let msg = e.to_string();
    assert!(
        matches!(e.kind(), ErrorKind::Timeout | ErrorKind::ConnectionLost),
        "{side}: kind {:?}: {msg}",
        e.kind()
    );
    assert!(
        took < bound,
        "{side} failed {took:?} after the link went down (bound {bound:?}): {msg}"
    );
    assert!(
        msg.contains(peer),
        "{side}'s error does not name the peer {peer}: {msg}"
    );
    assert!(msg.contains(setting), "{side}'s error does not name {setting}: {msg}");
    eprintln!("{side} failed {took:?} after the link went down: {msg}");
}

/// The receiver's end of the link goes down in the middle of a stream of messages: its data stays
/// unacknowledged, and the sender's request fails within the user timeout (plus slack), as a
/// timeout naming the receiver and the setting.
#[test]
fn a_silent_receiver_fails_the_senders_requests_within_the_user_timeout() {
    let link = Link::new("rx");
    let settings = [
        ("NCCL_TCPXSHIM_TCP_USER_TIMEOUT", "2000"),
        ("NCCL_TCPXSHIM_TCP_KEEPALIVE", "1"),
    ];
    let (send, _recv, down) = run(&link, &settings, u64::MAX, |p| {
        p.wait_received(2);
        link.set(false, false);
        let down = Instant::now();
        p.wait_ended(&[SENDER]);
        down
    });
    let bound = Duration::from_secs(2 + 10);
    assert_silent_peer_failure(
        "sender",
        &send,
        down,
        bound,
        ADDR_B,
        "NCCL_TCPXSHIM_TCP_USER_TIMEOUT=2000",
    );
}

/// The sender's end of the link goes down while the receiver waits for the rest of the stream:
/// nothing more arrives, keepalive probes go unanswered, and the receiver's request fails within
/// the user timeout (plus slack), naming the sender and the settings.
#[test]
fn a_silent_sender_fails_the_receivers_requests_through_keepalive() {
    let link = Link::new("tx");
    let settings = [
        ("NCCL_TCPXSHIM_TCP_USER_TIMEOUT", "2000"),
        ("NCCL_TCPXSHIM_TCP_KEEPALIVE", "1"),
    ];
    let (_send, recv, down) = run(&link, &settings, u64::MAX, |p| {
        p.wait_received(2);
        link.set(true, false);
        let down = Instant::now();
        p.wait_ended(&[RECEIVER]);
        down
    });
    let bound = Duration::from_secs(2 + 10);
    assert_silent_peer_failure("receiver", &recv, down, bound, ADDR_A, "NCCL_TCPXSHIM_TCP_KEEPALIVE=1");
}

/// The link goes down for a second in the middle of a stream of messages and comes back, well
/// within the user timeout: every message arrives intact and neither side sees an error.
#[test]
fn a_link_back_within_the_user_timeout_loses_nothing() {
    let link = Link::new("flap");
    let settings = [("NCCL_TCPXSHIM_TCP_USER_TIMEOUT", "5000")];
    let (send, recv, (before, after)) = run(&link, &settings, u64::MAX, |p| {
        p.wait_received(2);
        link.set(true, false);
        let before = p.received.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_secs(1));
        link.set(true, true);
        // The stream goes on after the outage, then ends.
        p.wait_received(before + 3);
        p.more.store(false, Ordering::SeqCst);
        p.wait_ended(&[SENDER, RECEIVER]);
        (before, p.received.load(Ordering::SeqCst))
    });
    let (End::Done(sent), End::Done(got)) = (&send, &recv) else {
        panic!("the transfer did not survive a 1 s outage: sender {send:?}, receiver {recv:?}")
    };
    assert_eq!(sent, got, "messages sent and received");
    assert!(
        after >= before + 3,
        "{before} messages before the outage, {after} in all"
    );
}

/// An idle healthy link with short keepalive settings and a user timeout shorter than the idle
/// time: probes flow (the kernel's counters grow) and are answered, and the connection still
/// carries messages afterwards.
#[test]
fn an_idle_healthy_link_with_keepalive_stays_up() {
    let link = Link::new("idle");
    let settings = [
        ("NCCL_TCPXSHIM_TCP_USER_TIMEOUT", "2000"),
        ("NCCL_TCPXSHIM_TCP_KEEPALIVE", "1"),
    ];
    let (send, recv, probes) = run(&link, &settings, 1, |p| {
        p.wait_received(1);
        // The sender has used its budget of one message; the receiver waits for the next.
        let before = Link::keepalives(&link.a) + Link::keepalives(&link.b);
        std::thread::sleep(Duration::from_secs(6));
        let probes = Link::keepalives(&link.a) + Link::keepalives(&link.b) - before;
        p.more.store(false, Ordering::SeqCst);
        p.wait_ended(&[SENDER, RECEIVER]);
        probes
    });
    assert!(
        probes >= 2,
        "only {probes} keepalive probes in 6 s idle with NCCL_TCPXSHIM_TCP_KEEPALIVE=1"
    );
    let (End::Done(sent), End::Done(got)) = (&send, &recv) else {
        panic!("the idle link did not stay up: sender {send:?}, receiver {recv:?}")
    };
    assert_eq!(sent, got);
}
