//! Recovery of broken inner connections (NCCL_TCPXSHIM_RECOVERY=1) through the whole shim over
//! the built-in transport on loopback: a checksummed stream of messages of varied sizes with 8
//! requests in flight each way arrives intact through the engine, and a peer that goes away
//! fails the other side within a few seconds.
//!
//! Each test builds a stack of its own in this process; both ends of a connection are in it.

mod common;

use common::*;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};
use tcpxshim::stack::FaultSpec;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const DEPTH: usize = 8;
const MAX_SIZE: usize = 4 << 20;

/// One stack at a time: the process has one hub of control links (and, in production, one
/// stack), and these tests count what that hub's links carry for their stack alone.
static ONE_STACK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn stack(faults: Option<&str>) -> StackNet {
    stack_with(faults, |_| {})
}

/// [`stack`] with `adjust` applied to its config.
fn stack_with(faults: Option<&str>, adjust: impl FnOnce(&mut Config)) -> StackNet {
    let dir = std::env::temp_dir().join(format!("tcpxshim-recovery-test-{}", std::process::id()));
    let mut c = Config {
        metrics_dir: Some(dir),
        plugin: Some("builtin".into()),
        ctrl_addr: Some(LOCALHOST),
        recovery_engine: true,
        faults: faults.map(|f| FaultSpec::parse(f).unwrap()),
        ..Config::default()
    };
    c.tcp.ifname = Some("lo".into());
    // A comm that breaks after a few messages may break again before the receiving side has
    // accepted it (the sender's messages complete into socket buffers): allow many tries.
    c.recovery.attempts = 200;
    adjust(&mut c);
    StackNet::build(&c)
}

/// Size of message `i`: mostly small, some empty, some of several MiB.
fn size_of(i: usize) -> usize {
    let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    match i % 64 {
        0 | 32 => 0,
        1 => MAX_SIZE - (h as usize % 4096),
        2..=9 => (h as usize) % (256 << 10),
        _ => (h as usize) % 8192,
    }
}

struct Slot {
    buf: AlignedBuf,
    mr: Mr,
    req: Option<(Req, usize)>,
}

/// Sends `count` messages from `send` to `recv` with DEPTH requests in flight each way, checks
/// every received byte and size; returns the error of the first failure.
fn stream(net: &StackNet, send: Comm, recv: Comm, count: usize, limit: Duration) -> Result<(), String> {
    let mk = |comm: Comm| -> Vec<Slot> {
        (0..DEPTH)
            .map(|_| {
                let buf = AlignedBuf::new(MAX_SIZE);
                let mr = net
                    .reg_mr(comm, buf.as_ptr(), MAX_SIZE, 1)
                    .unwrap_or_else(|_| panic!("regMr: {:?}", net.last_error()));
                Slot { buf, mr, req: None }
            })
            .collect()
    };
    let mut sends = mk(send);
    let mut recvs = mk(recv);
    let (mut posted_s, mut posted_r, mut done_r) = (0usize, 0usize, 0usize);
    let start = Instant::now();
    let mut result = Ok(());
    'outer: while done_r < count {
        if start.elapsed() > limit {
            result = Err(format!("{done_r} of {count} messages received after {limit:?}"));
            break;
        }
        for (k, s) in sends.iter_mut().enumerate() {
            if s.req.is_none() && posted_s < count && posted_s % DEPTH == k {
                let n = size_of(posted_s);
                s.buf.fill_pattern(posted_s as u64);
                match net.isend(send, s.buf.as_ptr(), n as i32, 1, s.mr) {
                    Ok(Some(r)) => {
                        s.req = Some((r, posted_s));
                        posted_s += 1;
                    }
                    Ok(None) => {}
                    Err(_) => {
                        result = Err(format!("isend {posted_s}: {:?}", net.last_error()));
                        break 'outer;
                    }
                }
            }
            if let Some((r, i)) = s.req {
                match net.test_sizes(r, None) {
                    Ok(true) => s.req = None,
                    Ok(false) => {}
                    Err(_) => {
                        result = Err(format!("test of send {i}: {:?}", net.last_error()));
                        break 'outer;
                    }
                }
            }
        }
        for (k, s) in recvs.iter_mut().enumerate() {
            if s.req.is_none() && posted_r < count && posted_r % DEPTH == k {
                let mut data = [s.buf.as_ptr()];
                let mut sizes = [MAX_SIZE as i32];
                let mut tags = [1];
                let mut mrs = [s.mr.0];
                match net.irecv_n(recv, &mut data, &mut sizes, &mut tags, &mut mrs) {
                    Ok(Some(r)) => {
                        s.req = Some((r, posted_r));
                        posted_r += 1;
                    }
                    Ok(None) => {}
                    Err(_) => {
                        result = Err(format!("irecv {posted_r}: {:?}", net.last_error()));
                        break 'outer;
                    }
                }
            }
            if let Some((r, i)) = s.req {
                let mut got = [0i32];
                match net.test_sizes(r, Some(&mut got)) {
                    Ok(true) => {
                        s.req = None;
                        let n = size_of(i);
                        if got[0] as usize != n {
                            result = Err(format!("message {i}: {} bytes received, {n} sent", got[0]));
                            break 'outer;
                        }
                        if let Some(at) = s.buf.find_mismatch(i as u64, 0..n) {
                            result = Err(format!("message {i} ({n} bytes): byte {at} differs"));
                            break 'outer;
                        }
                        done_r += 1;
                    }
                    Ok(false) => {}
                    Err(_) => {
                        result = Err(format!("test of receive {i}: {:?}", net.last_error()));
                        break 'outer;
                    }
                }
            }
        }
    }
    // Let the last sends complete (their acknowledgements) before deregistering.
    let t = Instant::now();
    while result.is_ok() && sends.iter().any(|s| s.req.is_some()) && t.elapsed() < Duration::from_secs(10) {
        for s in sends.iter_mut() {
            if let Some((r, _)) = s.req {
                if net.test_sizes(r, None) == Ok(true) {
                    s.req = None;
                }
            }
        }
        // Receives are all done; keep the receiving side's acknowledgements flowing.
        std::thread::sleep(Duration::from_millis(1));
        let mut data = [recvs[0].buf.as_ptr()];
        let _ = &mut data;
    }
    if result.is_ok() && sends.iter().any(|s| s.req.is_some()) {
        result = Err("sends not complete 10 s after every receive".into());
    }
    for s in sends.iter().chain(recvs.iter()) {
        let comm = if sends.iter().any(|x| std::ptr::eq(x, s)) {
            send
        } else {
            recv
        };
        let _ = net.dereg_mr(comm, s.mr);
    }
    result
}

#[test]
fn a_stream_survives_many_injected_breaks_with_every_byte_intact() {
    let _one = ONE_STACK.lock().unwrap_or_else(|e| e.into_inner());
    let log = in_process_log();
    let net = stack(Some("seed=3;break=after:5"));
    let (send, recv) = net.connect_pair(0);
    let mark = log.mark();
    let count = 5000;
    let r = stream(&net, send, recv, count, Duration::from_secs(90));
    let recoveries = net.shim.recoveries();
    let counted: Vec<u64> = net
        .shim
        .metrics()
        .unwrap()
        .shared()
        .conns()
        .iter()
        .map(|c| c.recoveries.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    r.unwrap();
    let breaks = log
        .since(mark)
        .iter()
        .filter(|l| l.contains("injected fault: connection broken"))
        .count();
    assert!(breaks >= 1000, "only {breaks} injected breaks");
    // The metrics' counters of the two comms hold what their engines counted.
    assert_eq!(counted.len(), 2, "{counted:?}");
    assert_eq!(counted.iter().sum::<u64>(), recoveries, "{counted:?}");
    assert!(
        counted.iter().all(|&n| n >= 400),
        "{counted:?} recoveries (send, receive) for {count} messages with a break every 5"
    );
    eprintln!("{breaks} injected breaks, {counted:?} recoveries (send, receive) over {count} messages");
}

#[test]
fn a_stream_over_served_handles_survives_injected_breaks() {
    // NCCL_TCPXSHIM_HANDLE=served: the listen handle NCCL carries names the control service
    // alone, under an offer id that the recovery link shares.
    let _one = ONE_STACK.lock().unwrap_or_else(|e| e.into_inner());
    assert!(Config::default().recovery_engine, "recovery is on by default");
    let net = stack_with(Some("seed=11;break=after:9"), |c| {
        c.handle_mode = tcpxshim::stack::handle::HandleMode::Served;
    });
    let (h, listen) = net.listen(0).unwrap();
    let flags = tcpxshim::stack::handle::Trailer::read(&h).unwrap().flags;
    use tcpxshim::stack::handle::{FLAG_RECOVERY, FLAG_SERVED};
    assert_eq!(
        flags & (FLAG_SERVED | FLAG_RECOVERY),
        FLAG_SERVED | FLAG_RECOVERY,
        "{flags:#x}"
    );
    net.close_listen(listen).unwrap();
    let (send, recv) = net.connect_pair(0);
    let r = stream(&net, send, recv, 600, Duration::from_secs(60));
    let recoveries = net.shim.recoveries();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    r.unwrap();
    assert!(
        recoveries >= 40,
        "{recoveries} recoveries over 600 messages with a break every 9"
    );
}

#[test]
fn without_faults_the_stream_is_intact_and_nothing_recovers() {
    let _one = ONE_STACK.lock().unwrap_or_else(|e| e.into_inner());
    let net = stack(None);
    let (send, recv) = net.connect_pair(0);
    let r = stream(&net, send, recv, 300, Duration::from_secs(60));
    let recoveries = net.shim.recoveries();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    r.unwrap();
    assert_eq!(recoveries, 0);
}

#[test]
fn a_peer_that_goes_away_fails_the_other_side_naming_it() {
    let _one = ONE_STACK.lock().unwrap_or_else(|e| e.into_inner());
    let net = stack(None);
    let (send, recv) = net.connect_pair(0);
    let label = net.label(send).unwrap();
    // Break the inner comm, then close the receiving side so nobody answers the recovery.
    let buf = AlignedBuf::new(4096);
    let mr = net.reg_mr(send, buf.as_ptr(), 4096, 1).unwrap();
    net.close_recv(recv).unwrap();
    let start = Instant::now();
    let mut err = None;
    while start.elapsed() < Duration::from_secs(20) && err.is_none() {
        match net.isend(send, buf.as_ptr(), 4096, 1, mr) {
            Ok(Some(r)) => loop {
                match net.test_sizes(r, None) {
                    Ok(true) => break,
                    Ok(false) if start.elapsed() < Duration::from_secs(20) => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Ok(false) => break,
                    Err(_) => {
                        err = net.last_error();
                        break;
                    }
                }
            },
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(_) => err = net.last_error(),
        }
    }
    let err = err.expect("the send side fails once its peer is gone");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "failed only after {:?}",
        start.elapsed()
    );
    assert!(err.contains(&format!("connection to {label} lost")), "{err} ({label})");
    assert!(err.contains("peer is gone") || err.contains("gave up"), "{err}");
    let _ = net.dereg_mr(send, mr);
    net.close_send(send).unwrap();
}

#[test]
fn a_stream_survives_its_sockets_shut_down_from_outside_while_in_use() {
    let _one = ONE_STACK.lock().unwrap_or_else(|e| e.into_inner());
    let net = stack(None);
    let (mut handle, listen) = net.listen(0).unwrap();
    let ctrl = tcpxshim::stack::handle::Trailer::read(&handle)
        .unwrap()
        .ctrl_socket()
        .expect("the handle names the control service")
        .port();
    let (send, (recv, _)) = net.connect_accept(0, &mut handle, listen);
    net.close_listen(listen).unwrap();
    let pid = std::process::id();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (r, dropped) = std::thread::scope(|s| {
        let dropper = s.spawn(|| {
            let mut dropped = 0;
            for _ in 0..40 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
                // The data connections: every established one of this process but the control
                // links (to or from the control service's port).
                let data: Vec<u16> = tcpxshim::sockdrop::established(pid, &[])
                    .unwrap()
                    .into_iter()
                    .filter(|(_, l, r)| l.port() != ctrl && r.port() != ctrl)
                    .map(|(_, l, _)| l.port())
                    .collect();
                if !data.is_empty() {
                    dropped += tcpxshim::sockdrop::drop_connections(pid, &data).unwrap().len();
                }
            }
            dropped
        });
        let r = stream(&net, send, recv, 3000, Duration::from_secs(90));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (r, dropper.join().unwrap())
    });
    let recoveries = net.shim.recoveries();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    r.unwrap();
    assert!(dropped > 0, "no data connection was found to shut down");
    assert!(recoveries > 0, "{dropped} sockets shut down, no recovery");
    eprintln!("{dropped} sockets shut down from outside, {recoveries} recoveries (both sides)");
}

#[test]
fn a_stream_over_a_loaded_host_plugin_survives_injected_breaks() {
    let _one = ONE_STACK.lock().unwrap_or_else(|e| e.into_inner());
    let fixture = private_copy(&fixture_lib(Fixture::V7));
    let ctl = FixtureCtl::open(&fixture);
    let mut c = Config {
        plugin: Some(fixture.to_string_lossy().into_owned()),
        ctrl_addr: Some(LOCALHOST),
        recovery_engine: true,
        // The fixture cannot cut a connection: the faults layer fails the comm's later calls.
        faults: Some(FaultSpec::parse("seed=5;break=after:7").unwrap()),
        ..Config::default()
    };
    c.recovery.attempts = 200;
    let net = StackNet::build(&c);
    let log = in_process_log();
    let (send, recv) = net.connect_pair(0);
    let mark = log.mark();
    let r = stream(&net, send, recv, 1500, Duration::from_secs(60));
    let recoveries = net.shim.recoveries();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    r.unwrap();
    let breaks = log
        .since(mark)
        .iter()
        .filter(|l| l.contains("injected fault: connection broken"))
        .count();
    assert!(breaks >= 100, "only {breaks} injected breaks");
    assert!(recoveries >= 100, "{recoveries} recoveries for {breaks} breaks");
    assert_eq!(
        ctl.violations(),
        0,
        "the shim broke a rule of the plugin: {}",
        ctl.last_violation()
    );
    // Every comm is closed; what stays are registrations that requests abandoned with a broken
    // inner comm still used (this plugin refuses to release those, and closing the comm ends the
    // requests): at most one per buffer of the stream (DEPTH each way) per break.
    let live = ctl.live_objects();
    assert!(
        live as usize <= 2 * DEPTH * breaks,
        "{live} objects left open in the plugin after {breaks} breaks"
    );
    eprintln!(
        "over {}: {breaks} injected breaks, {recoveries} recoveries (both sides), {live} registrations left",
        Fixture::V7.net_name()
    );
}
