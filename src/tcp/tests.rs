//! Loopback tests of the built-in TCP transport. Every wait is bounded by [`DEADLINE`].

use super::*;
use crate::error::ErrorKind;
use std::collections::HashSet;
use std::ptr::null_mut;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

fn lo_cfg() -> TcpConfig {
    TcpConfig {
        ifname: Some("lo".into()),
        ..Default::default()
    }
}

fn transport() -> TcpTransport {
    TcpTransport::new(&lo_cfg()).expect("transport on lo")
}

/// Polls `f` until it yields a value; panics after [`DEADLINE`].
fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    for i in 0u64.. {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        if i < 200 {
            std::hint::spin_loop();
        } else if i < 2000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    unreachable!()
}

/// Listens on device 0 and drives connect/accept until both sides have a comm.
fn pair(t: &TcpTransport) -> (Opaque, Opaque, Opaque) {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let mut h = [0u8; 128];
        let l = t.listen(0, &mut h).expect("listen");
        let (mut s, mut r) = (None, None);
        wait("connect/accept", || {
            if s.is_none() {
                s = t.connect(0, &mut h, null_mut()).expect("connect");
            }
            if r.is_none() {
                r = t.accept(l, null_mut()).expect("accept");
            }
            (s.is_some() && r.is_some()).then_some(())
        });
        (s.unwrap(), r.unwrap(), l)
    }
}

fn close_pair(t: &TcpTransport, (s, r, l): (Opaque, Opaque, Opaque)) {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        t.close_send(s).unwrap();
        t.close_recv(r).unwrap();
        t.close_listen(l).unwrap();
    }
}

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// Tests `req` until done: Ok(size reported) or the error.
fn finish(t: &TcpTransport, req: Opaque, what: &str) -> Result<i32> {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let mut sz = [-1i32];
        wait(what, || match t.test(req, Some(&mut sz)) {
            Ok(true) => Some(Ok(sz[0])),
            Ok(false) => None,
            Err(e) => Some(Err(e)),
        })
    }
}

/// Tests a send and a receive together until both finished (either may fail).
fn finish_both(t: &TcpTransport, sreq: Opaque, rreq: Opaque) -> (Result<i32>, Result<i32>) {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let (mut so, mut ro) = (None, None);
        let step = |req: Opaque, out: &mut Option<Result<i32>>| {
            if out.is_none() {
                let mut sz = [-1i32];
                match t.test(req, Some(&mut sz)) {
                    Ok(true) => *out = Some(Ok(sz[0])),
                    Ok(false) => {}
                    Err(e) => *out = Some(Err(e)),
                }
            }
        };
        wait("send and receive to complete", || {
            step(sreq, &mut so);
            step(rreq, &mut ro);
            (so.is_some() && ro.is_some()).then_some(())
        });
        (so.unwrap(), ro.unwrap())
    }
}

/// Sends `send` and receives into a buffer of `cap` bytes; returns (send result, recv result, buffer).
fn transfer(
    t: &TcpTransport,
    s: Opaque,
    r: Opaque,
    send: &mut [u8],
    cap: usize,
) -> (Result<i32>, Result<i32>, Vec<u8>) {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let mut buf = vec![0xEEu8; cap];
        let rreq = t
            .irecv(r, &[buf.as_mut_ptr().cast()], &[cap as i32], &[0], &[None])
            .unwrap()
            .unwrap();
        let sreq = t
            .isend(s, send.as_mut_ptr().cast(), send.len() as i32, 0, None)
            .unwrap()
            .unwrap();
        let (a, b) = finish_both(t, sreq, rreq);
        (a, b, buf)
    }
}

fn check_transfer(t: &TcpTransport, s: Opaque, r: Opaque, size: usize, cap: usize) {
    let mut data = pattern(size, size as u32);
    let (sr, rr, buf) = transfer(t, s, r, &mut data, cap);
    assert_eq!(sr.unwrap(), size as i32, "send of {size} reports its size");
    assert_eq!(
        rr.unwrap(),
        size as i32,
        "receive of {size} (posted {cap}) reports the sent size"
    );
    assert!(buf[..size] == data[..], "payload of {size} bytes corrupted");
    assert!(
        buf[size..].iter().all(|&b| b == 0xEE),
        "receive of {size} wrote past the message"
    );
}

/// A sender made by hand: listens on `t`, connects raw sockets under connection id `id` and
/// accepts; returns the receive comm, the listen comm, the listen handle and the sender's control
/// and data sockets, so that a test can write whatever bytes it likes.
fn hand_made_sender(
    t: &TcpTransport,
    id: u64,
) -> (Opaque, Opaque, ListenHandle, socket2::Socket, Vec<socket2::Socket>) {
    let mut h = [0u8; 128];
    let l = t.listen(0, &mut h).unwrap();
    let lh = ListenHandle::read(&h).unwrap();
    let mut fake = conn::PendingConnect::start(
        lh.addr,
        lh.streams,
        lh.inline_max,
        lh.token,
        id,
        TcpConfig::default().liveness(),
    )
    .unwrap();
    let mut r = None;
    wait("hand-made sender to connect", || {
        let sent = fake.progress().unwrap();
        if r.is_none() {
            // SAFETY: `l` is the live listen comm made above; accept writes no handle pointer.
            r = unsafe { t.accept(l, null_mut()) }.unwrap();
        }
        (sent && r.is_some()).then_some(())
    });
    let (ctrl, data) = fake.into_sockets().unwrap();
    (r.unwrap(), l, lh, ctrl, data)
}

fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim_end().starts_with(prefix))
        .count()
}

fn worker_prefix(t: &TcpTransport) -> String {
    format!("txs{}-io", t.pool.id)
}

/// The "socket:[inode]" identities of fds, which stay unique while the sockets live.
fn socket_ids(fds: &[std::os::fd::RawFd]) -> Vec<String> {
    fds.iter()
        .map(|fd| {
            let l = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
            let l = l.to_string_lossy().into_owned();
            assert!(l.starts_with("socket:"), "fd {fd} is {l}");
            l
        })
        .collect()
}

fn open_fd_ids() -> HashSet<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn properties_and_devices_on_loopback() {
    let t = transport();
    assert_eq!(t.name(), "tcpxshim");
    assert_eq!(t.devices().unwrap(), 1);
    let p = t.properties(0).unwrap();
    assert_eq!(p.name, "lo");
    assert_eq!(p.pci_path, None);
    assert_eq!((p.guid, p.ptr_support, p.speed_mbps, p.max_recvs), (0, 1, 10_000, 1));
    assert_eq!(p.device_type, DeviceType::Host);
    assert_eq!(t.device_address(0), Some("127.0.0.1".parse().unwrap()));
    assert_eq!(t.device_address(1), None);
}

#[test]
fn bad_device_index_is_rejected() {
    let t = transport();
    for dev in [1, -1, 99] {
        let err = t.properties(dev).unwrap_err();
        assert!(err.kind() == ErrorKind::InvalidArgument, "{err}");
        let m = err.to_string();
        assert!(m.contains(&format!("device {dev}")) && m.contains("1 device"), "{m}");
        let mut h = [0u8; 128];
        assert_eq!(
            t.listen(dev, &mut h).map_err(|e| e.kind()).err(),
            Some(ErrorKind::InvalidArgument)
        );
    }
}

#[test]
fn no_matching_interface_names_the_settings() {
    let cfg = TcpConfig {
        ifname: Some("=no-such-if0".into()),
        ..Default::default()
    };
    let err = TcpTransport::new(&cfg).err().expect("no device").to_string();
    assert!(
        err.contains("NCCL_TCPXSHIM_TCP_IFNAME") && err.contains("lo (up"),
        "{err}"
    );
}

#[test]
fn connect_accept_and_describe() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        let p = pair(&t);
        let d = t.describe_comm(p.0).unwrap();
        assert!(d.starts_with("peer 127.0.0.1:") && d.ends_with(", 4 streams"), "{d}");
        let d = t.describe_comm(p.1).unwrap();
        assert!(d.starts_with("peer 127.0.0.1:"), "{d}");
        assert!(t.describe_comm(p.2).unwrap().starts_with("listening on 127.0.0.1:"));
        close_pair(&t, p);
    }
}

#[test]
fn transfers_of_all_sizes_arrive_intact() {
    let t = transport();
    let p = pair(&t);
    for size in [
        0,
        1,
        3,
        4095,
        4096,
        16384,
        16385,
        65537,
        (1 << 20) + 7,
        16 << 20,
        64 << 20,
    ] {
        check_transfer(&t, p.0, p.1, size, size + 64);
    }
    close_pair(&t, p);
}

#[test]
fn other_settings_transfer_correctly() {
    let cfgs = [
        TcpConfig {
            streams: 1,
            inline_max: 0,
            workers: Some(1),
            ..lo_cfg()
        },
        TcpConfig {
            streams: 7,
            min_chunk: Some(4096),
            inline_max: 1,
            workers: Some(3),
            ..lo_cfg()
        },
        TcpConfig {
            streams: 64,
            min_chunk: Some(4096),
            workers: Some(2),
            inline_max: 1 << 20,
            ..lo_cfg()
        },
        // No worker threads: test() drives the data sockets.
        TcpConfig {
            streams: 4,
            min_chunk: Some(4096),
            workers: Some(0),
            ..lo_cfg()
        },
    ];
    for cfg in cfgs {
        let t = TcpTransport::new(&cfg).unwrap();
        assert_eq!(threads_named(&worker_prefix(&t)), cfg.workers.unwrap());
        let p = pair(&t);
        for size in [0, 1, 4097, 100_000, (1 << 20) + 3, (3 << 20) + 1] {
            check_transfer(&t, p.0, p.1, size, size);
        }
        close_pair(&t, p);
    }
}

#[test]
fn larger_receive_reports_the_send_size() {
    let t = transport();
    let p = pair(&t);
    check_transfer(&t, p.0, p.1, 1000, 5000);
    check_transfer(&t, p.0, p.1, 300_000, 1 << 20);
    check_transfer(&t, p.0, p.1, 0, 4096);
    close_pair(&t, p);
}

#[test]
fn smaller_receive_is_an_error_naming_both_sizes() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        for (send, cap) in [(200usize, 100usize), (1 << 20, 65536)] {
            let p = pair(&t);
            // A good message first: the failure must hit exactly the oversized one.
            check_transfer(&t, p.0, p.1, 10, 10);
            let mut data = pattern(send, 1);
            let (_, rr, buf) = transfer_or_recv_error(&t, p.0, p.1, &mut data, cap);
            let err = rr.unwrap_err();
            assert!(err.kind() == ErrorKind::InvalidUsage, "{err}");
            let m = err.to_string();
            for want in [
                send.to_string(),
                cap.to_string(),
                "127.0.0.1:".to_string(),
                "message 1".to_string(),
            ] {
                assert!(m.contains(&want), "{want:?} missing from {m}");
            }
            assert!(
                buf.iter().all(|&b| b == 0xEE),
                "no payload may land in a too-small buffer"
            );
            let mut other = [0u8; 8];
            let later = t.irecv(p.1, &[other.as_mut_ptr().cast()], &[8], &[0], &[None]);
            assert!(later.is_err(), "the comm is failed after an oversized message");
            close_pair(&t, p);
        }
    }
}

/// Like `transfer`, but only waits for the receive (the send may never complete).
fn transfer_or_recv_error(
    t: &TcpTransport,
    s: Opaque,
    r: Opaque,
    send: &mut [u8],
    cap: usize,
) -> (Option<Opaque>, Result<i32>, Vec<u8>) {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let mut buf = vec![0xEEu8; cap];
        let rreq = t
            .irecv(r, &[buf.as_mut_ptr().cast()], &[cap as i32], &[0], &[None])
            .unwrap()
            .unwrap();
        let sreq = t
            .isend(s, send.as_mut_ptr().cast(), send.len() as i32, 0, None)
            .unwrap();
        let rr = finish(t, rreq, "oversized receive to fail");
        (sreq, rr, buf)
    }
}

#[test]
fn thirty_two_outstanding_requests_each_way() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        let a = pair(&t);
        let b = pair(&t);
        for (s, r) in [(a.0, a.1), (b.0, b.1)] {
            let sizes: Vec<usize> = (0..32).map(|i| [7, 20_000, 300_000, 0][i % 4] + i).collect();
            let mut sends: Vec<Vec<u8>> = sizes.iter().map(|&n| pattern(n, n as u32)).collect();
            let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0xEE; n]).collect();
            let rreqs: Vec<Opaque> = bufs
                .iter_mut()
                .map(|b| {
                    t.irecv(r, &[b.as_mut_ptr().cast()], &[b.len() as i32], &[0], &[None])
                        .unwrap()
                        .unwrap()
                })
                .collect();
            let sreqs: Vec<Opaque> = sends
                .iter_mut()
                .map(|d| {
                    t.isend(s, d.as_mut_ptr().cast(), d.len() as i32, 0, None)
                        .unwrap()
                        .unwrap()
                })
                .collect();
            // Complete in reverse order: completion must not depend on test order.
            for i in (0..32).rev() {
                let (sr, rr) = finish_both(&t, sreqs[i], rreqs[i]);
                assert_eq!(sr.unwrap(), sizes[i] as i32);
                assert_eq!(rr.unwrap(), sizes[i] as i32);
                assert!(bufs[i] == sends[i], "message {i} corrupted");
            }
        }
        close_pair(&t, a);
        close_pair(&t, b);
    }
}

#[test]
fn request_33_is_rejected() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        let p = pair(&t);
        let mut bufs = vec![[0u8; 16]; 33];
        for (i, b) in bufs.iter_mut().enumerate() {
            let r = t.irecv(p.1, &[b.as_mut_ptr().cast()], &[16], &[0], &[None]);
            if i < 32 {
                assert!(r.unwrap().is_some());
            } else {
                let err = r.unwrap_err();
                assert!(
                    err.kind() == ErrorKind::InvalidUsage && err.to_string().contains("32"),
                    "{err}"
                );
            }
        }
        let mut data = vec![1u8; 8];
        for i in 0..33 {
            let r = t.isend(p.0, data.as_mut_ptr().cast(), 8, 0, None);
            if i < 32 {
                assert!(r.unwrap().is_some());
            } else {
                let err = r.unwrap_err();
                assert!(
                    err.kind() == ErrorKind::InvalidUsage && err.to_string().contains("32"),
                    "{err}"
                );
            }
        }
        close_pair(&t, p);
    }
}

#[test]
fn irecv_rejects_grouped_receives() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        let p = pair(&t);
        let mut a = [0u8; 4];
        let mut b = [0u8; 4];
        let err = t
            .irecv(
                p.1,
                &[a.as_mut_ptr().cast(), b.as_mut_ptr().cast()],
                &[4, 4],
                &[0, 0],
                &[None, None],
            )
            .unwrap_err();
        assert!(
            err.kind() == ErrorKind::InvalidArgument && err.to_string().contains("maxRecvs 1"),
            "{err}"
        );
        close_pair(&t, p);
    }
}

#[test]
fn reg_mr_accepts_host_memory_only() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        let p = pair(&t);
        let mut buf = [0u8; 64];
        let mr = t
            .reg_mr(p.0, buf.as_mut_ptr().cast(), 64, crate::ffi::NCCL_PTR_HOST as i32)
            .unwrap();
        t.dereg_mr(p.0, mr).unwrap();
        let err = t
            .reg_mr(p.0, buf.as_mut_ptr().cast(), 64, crate::ffi::NCCL_PTR_CUDA as i32)
            .unwrap_err();
        assert!(
            err.kind() == ErrorKind::InvalidArgument && err.to_string().contains("NCCL_PTR_HOST"),
            "{err}"
        );
        assert!(t.iflush(p.1, &[], &[], &[]).unwrap().is_none());
        close_pair(&t, p);
    }
}

#[test]
fn sixty_four_connections_at_once_without_new_threads() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        let prefix = worker_prefix(&t);
        let workers = super::sys::affinity()
            .unwrap()
            .len()
            .saturating_sub(cpus::NCCL_BUSY_THREADS)
            .clamp(1, 4);
        assert_eq!(threads_named(&prefix), workers, "one thread per worker");
        let n = 64;
        let mut handles = vec![[0u8; 128]; n];
        let listens: Vec<Opaque> = handles.iter_mut().map(|h| t.listen(0, h).unwrap()).collect();
        let mut sends: Vec<Option<Opaque>> = vec![None; n];
        let mut recvs: Vec<Option<Opaque>> = vec![None; n];
        wait("64 connections", || {
            for i in 0..n {
                if sends[i].is_none() {
                    sends[i] = t.connect(0, &mut handles[i], null_mut()).unwrap();
                }
            }
            for i in 0..n {
                if recvs[i].is_none() {
                    recvs[i] = t.accept(listens[i], null_mut()).unwrap();
                }
            }
            (sends.iter().all(Option::is_some) && recvs.iter().all(Option::is_some)).then_some(())
        });
        assert_eq!(threads_named(&prefix), workers, "no thread per connection");
        let size = |i: usize| if i % 2 == 0 { 1000 + i } else { 256 << 10 };
        let mut data: Vec<Vec<u8>> = (0..n).map(|i| pattern(size(i), i as u32)).collect();
        let mut bufs: Vec<Vec<u8>> = (0..n).map(|i| vec![0u8; size(i)]).collect();
        let mut reqs = Vec::new();
        for i in 0..n {
            let r = t
                .irecv(
                    recvs[i].unwrap(),
                    &[bufs[i].as_mut_ptr().cast()],
                    &[size(i) as i32],
                    &[0],
                    &[None],
                )
                .unwrap()
                .unwrap();
            let s = t
                .isend(sends[i].unwrap(), data[i].as_mut_ptr().cast(), size(i) as i32, 0, None)
                .unwrap()
                .unwrap();
            reqs.push((s, r));
        }
        for (i, &(s, r)) in reqs.iter().enumerate() {
            let (a, b) = finish_both(&t, s, r);
            assert_eq!((a.unwrap(), b.unwrap()), (size(i) as i32, size(i) as i32));
            assert!(bufs[i] == data[i], "connection {i} corrupted its message");
        }
        assert_eq!(threads_named(&prefix), workers);
        let mut ids = Vec::new();
        for i in 0..n {
            ids.extend(socket_ids(&t.comm_fds(sends[i].unwrap())));
            ids.extend(socket_ids(&t.comm_fds(recvs[i].unwrap())));
            ids.extend(socket_ids(&t.comm_fds(listens[i])));
            close_pair(&t, (sends[i].unwrap(), recvs[i].unwrap(), listens[i]));
        }
        assert_eq!(ids.len(), n * (2 * 5 + 1));
        let open = open_fd_ids();
        assert!(ids.iter().all(|id| !open.contains(id)), "sockets left open after close");
        drop(t);
        assert_eq!(threads_named(&prefix), 0, "dropping the transport joins its workers");
    }
}

#[test]
fn closing_the_receiver_with_requests_in_flight_fails_the_sender() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        let p = pair(&t);
        let size = 64 << 20;
        let mut data = pattern(size, 3);
        let mut buf = vec![0u8; size];
        let _rreq = t
            .irecv(p.1, &[buf.as_mut_ptr().cast()], &[size as i32], &[0], &[None])
            .unwrap()
            .unwrap();
        let sreq = t
            .isend(p.0, data.as_mut_ptr().cast(), size as i32, 0, None)
            .unwrap()
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        t.close_recv(p.1).unwrap();
        // The workers no longer write into `buf`: changing it now is safe, and must stay as we leave it.
        buf.fill(0x11);
        let err = finish(&t, sreq, "the send to fail after the receiver closed").unwrap_err();
        assert!(err.kind() == ErrorKind::ConnectionLost && err.retryable(), "{err}");
        assert!(err.to_string().contains("127.0.0.1:"), "{err}");
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            buf.iter().all(|&b| b == 0x11),
            "a worker wrote into a closed comm's buffer"
        );
        t.close_send(p.0).unwrap();
        t.close_listen(p.2).unwrap();
    }
}

#[test]
fn closing_the_sender_with_requests_in_flight_fails_the_receiver() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        let p = pair(&t);
        let size = 64 << 20;
        let mut data = pattern(size, 4);
        let mut buf = vec![0u8; size];
        let rreq = t
            .irecv(p.1, &[buf.as_mut_ptr().cast()], &[size as i32], &[0], &[None])
            .unwrap()
            .unwrap();
        let _sreq = t
            .isend(p.0, data.as_mut_ptr().cast(), size as i32, 0, None)
            .unwrap()
            .unwrap();
        // The receiver has not read anything yet, so at most the socket buffers' worth (a few MiB) can have
        // left: the 64 MiB send is certainly in flight when it is closed.
        t.close_send(p.0).unwrap();
        data.fill(0); // the send side's workers have let go of it
        let err = finish(&t, rreq, "the receive to fail after the sender closed").unwrap_err();
        assert!(err.kind() == ErrorKind::ConnectionLost && err.retryable(), "{err}");
        assert!(err.to_string().contains("closed while receiving message 0"), "{err}");
        t.close_recv(p.1).unwrap();
        t.close_listen(p.2).unwrap();
    }
}

#[test]
fn closing_a_receiver_while_workers_fill_its_buffer_is_safe() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        // A hand-made sender that announces 1 MiB but delivers only half of each chunk.
        let (r, l, lh, ctrl, data) = hand_made_sender(&t, 42);
        let size = 1usize << 20;
        let chunk = wire::chunk_size(size, lh.streams as usize, 65536);
        let send_all = |s: &socket2::Socket, mut b: &[u8]| {
            s.set_nonblocking(false).unwrap();
            while !b.is_empty() {
                let n = s.send(b).unwrap();
                b = &b[n..];
            }
        };
        let header = wire::Header {
            seq: 0,
            size: size as u64,
            chunk: chunk as u32,
            flags: 0,
        };
        send_all(&ctrl, &header.encode());
        for (stream, _, len) in wire::chunks(0, size, chunk, lh.streams as usize) {
            send_all(&data[stream], &vec![7u8; len / 2]);
        }
        let mut buf = vec![0u8; size];
        let rq = t
            .irecv(r, &[buf.as_mut_ptr().cast()], &[size as i32], &[0], &[None])
            .unwrap()
            .unwrap();
        for _ in 0..50 {
            assert!(!t.test(rq, None).unwrap(), "only half the message was sent");
            std::thread::sleep(Duration::from_millis(1));
        }
        let ids = socket_ids(&t.comm_fds(r));
        t.close_recv(r).unwrap();
        // From here on no worker may touch `buf`, even when the rest of the data turns up.
        buf.fill(0x11);
        for (stream, _, len) in wire::chunks(0, size, chunk, lh.streams as usize) {
            let _ = data[stream].send(&vec![7u8; len - len / 2]);
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            buf.iter().all(|&b| b == 0x11),
            "a worker wrote into a closed comm's buffer"
        );
        let open = open_fd_ids();
        assert!(ids.iter().all(|id| !open.contains(id)), "closeRecv left sockets open");
        t.close_listen(l).unwrap();
    }
}

#[test]
fn zero_byte_messages_may_use_null_buffers() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        let p = pair(&t);
        for _ in 0..3 {
            let rq = t.irecv(p.1, &[null_mut()], &[0], &[0], &[None]).unwrap().unwrap();
            let sq = t.isend(p.0, null_mut(), 0, 0, None).unwrap().unwrap();
            let (a, b) = finish_both(&t, sq, rq);
            assert_eq!((a.unwrap(), b.unwrap()), (0, 0));
        }
        let err = t.isend(p.0, null_mut(), 5, 0, None).unwrap_err();
        assert!(err.kind() == ErrorKind::InvalidArgument, "{err}");
        let err = t.irecv(p.1, &[null_mut()], &[-1], &[0], &[None]).unwrap_err();
        assert!(err.kind() == ErrorKind::InvalidArgument, "{err}");
        close_pair(&t, p);
    }
}

#[test]
fn peer_close_is_an_error_not_a_hang() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        let p = pair(&t);
        check_transfer(&t, p.0, p.1, 100, 100);
        t.close_send(p.0).unwrap();
        for size in [64, 1 << 20] {
            let mut buf = vec![0u8; size];
            let r = t.irecv(p.1, &[buf.as_mut_ptr().cast()], &[size as i32], &[0], &[None]);
            let err = match r {
                Ok(Some(req)) => finish(&t, req, "receive from a closed peer to fail").unwrap_err(),
                Ok(None) => panic!("irecv returned no request"),
                Err(e) => e,
            };
            assert!(err.kind() == ErrorKind::ConnectionLost && err.retryable(), "{err}");
            assert!(err.to_string().contains("closed while receiving message 1"), "{err}");
        }
        t.close_recv(p.1).unwrap();
        t.close_listen(p.2).unwrap();

        // And the other way round: sending to a closed receiver.
        let p = pair(&t);
        t.close_recv(p.1).unwrap();
        let size = 16 << 20;
        let mut data = pattern(size, 5);
        let err = wait("sends to a closed receiver to fail", || {
            match t.isend(p.0, data.as_mut_ptr().cast(), size as i32, 0, None) {
                Err(e) => Some(e),
                Ok(Some(req)) => finish(&t, req, "send to a closed receiver").err(),
                Ok(None) => None,
            }
        });
        assert!(err.kind() == ErrorKind::ConnectionLost && err.retryable(), "{err}");
        t.close_send(p.0).unwrap();
        t.close_listen(p.2).unwrap();
    }
}

#[test]
fn break_comm_cuts_the_connection_for_both_ends() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        // The sender's side cut: its next send fails, the receiver reads end of stream (inline
        // and striped messages).
        for size in [64usize, 1 << 20] {
            let p = pair(&t);
            check_transfer(&t, p.0, p.1, 100, 100);
            assert!(t.break_comm(p.0));
            assert!(!t.break_comm(p.2), "a listen comm has no connection to cut");
            let mut data = pattern(size, 9);
            let (sr, rr, _) = transfer(&t, p.0, p.1, &mut data, size);
            for e in [sr.unwrap_err(), rr.unwrap_err()] {
                assert!(e.kind() == ErrorKind::ConnectionLost && e.retryable(), "{size}: {e}");
            }
            close_pair(&t, p);
        }

        // The receiver's side cut: it fails at once, and the peer's sends are reset.
        let p = pair(&t);
        check_transfer(&t, p.0, p.1, 100, 100);
        assert!(t.break_comm(p.1));
        let mut buf = vec![0u8; 64];
        let req = t
            .irecv(p.1, &[buf.as_mut_ptr().cast()], &[64], &[0], &[None])
            .unwrap()
            .unwrap();
        let e = finish(&t, req, "a receive on a cut connection to fail").unwrap_err();
        assert!(e.kind() == ErrorKind::ConnectionLost, "{e}");
        let mut data = pattern(64, 3);
        let e = wait("sends to a cut receiver to fail", || {
            match t.isend(p.0, data.as_mut_ptr().cast(), 64, 0, None) {
                Err(e) => Some(e),
                Ok(Some(req)) => finish(&t, req, "send to a cut receiver").err(),
                Ok(None) => None,
            }
        });
        assert!(e.kind() == ErrorKind::ConnectionLost, "{e}");
        close_pair(&t, p);
    }
}

#[test]
fn listen_comm_accepts_several_connections_and_closes_leftovers() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        let mut h = [0u8; 128];
        let l = t.listen(0, &mut h).unwrap();
        let mut h1 = h;
        let mut h2 = h;
        let (mut s1, mut s2) = (None, None);
        let mut recvs = Vec::new();
        wait("two connections on one listen comm", || {
            if s1.is_none() {
                s1 = t.connect(0, &mut h1, null_mut()).unwrap();
            }
            if s2.is_none() {
                s2 = t.connect(0, &mut h2, null_mut()).unwrap();
            }
            if let Some(r) = t.accept(l, null_mut()).unwrap() {
                recvs.push(r);
            }
            (s1.is_some() && s2.is_some() && recvs.len() == 2).then_some(())
        });
        // A third connection left half-accepted, then the listen comm closed under it.
        let mut h3 = h;
        let s3 = wait("third connect", || t.connect(0, &mut h3, null_mut()).unwrap());
        let _ = t.accept(l, null_mut()).unwrap();
        let mut ids = socket_ids(&t.comm_fds(l));
        t.close_listen(l).unwrap();
        ids.retain(|id| open_fd_ids().contains(id));
        assert!(ids.is_empty(), "closeListen left sockets open: {ids:?}");
        // Each accepted comm pairs with one of the two send comms (which one is up to the network).
        let mut x = [pattern(10, 7), pattern(10, 8)];
        let mut b = [vec![0u8; 10], vec![0u8; 10]];
        let rq: Vec<Opaque> = (0..2)
            .map(|i| {
                t.irecv(recvs[i], &[b[i].as_mut_ptr().cast()], &[10], &[0], &[None])
                    .unwrap()
                    .unwrap()
            })
            .collect();
        let sq: Vec<Opaque> = [s1.unwrap(), s2.unwrap()]
            .iter()
            .zip(x.iter_mut())
            .map(|(&s, x)| t.isend(s, x.as_mut_ptr().cast(), 10, 0, None).unwrap().unwrap())
            .collect();
        for i in 0..2 {
            let (a, c) = finish_both(&t, sq[i], rq[i]);
            assert_eq!((a.unwrap(), c.unwrap()), (10, 10));
        }
        assert!(
            (b[0] == x[0] && b[1] == x[1]) || (b[0] == x[1] && b[1] == x[0]),
            "the two connections' messages got mixed up"
        );
        for s in [s1.unwrap(), s2.unwrap(), s3] {
            t.close_send(s).unwrap();
        }
        for r in recvs {
            t.close_recv(r).unwrap();
        }
    }
}

#[test]
fn connect_to_a_closed_listener_fails_naming_the_address() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        let mut h = [0u8; 128];
        let l = t.listen(0, &mut h).unwrap();
        let addr = ListenHandle::read(&h).unwrap().addr;
        t.close_listen(l).unwrap();
        let err = wait("connect to a closed port to fail", || {
            t.connect(0, &mut h, null_mut()).err()
        });
        // Refused (the kind the OS error gives), so the connect retry layer can retry it.
        assert!(err.kind() == ErrorKind::Refused && err.retryable(), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        assert_eq!(wire::connect_state(&h), 0, "a failed connect clears its state");
    }
}

#[test]
fn bad_handles_are_rejected() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t = transport();
        let mut garbage = [0x5Au8; 128];
        let err = t.connect(0, &mut garbage, null_mut()).unwrap_err();
        assert!(err.kind() == ErrorKind::InvalidArgument, "{err}");

        let mut h = [0u8; 128];
        let l = t.listen(0, &mut h).unwrap();
        wire::set_connect_state(&mut h, 0xdead_beef_0bad_f00d);
        let err = t.connect(0, &mut h, null_mut()).unwrap_err();
        assert!(
            err.kind() == ErrorKind::InvalidArgument && err.to_string().contains("connect state"),
            "{err}"
        );
        t.close_listen(l).unwrap();
    }
}

#[test]
fn mismatched_settings_give_clear_errors_on_both_sides() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let t4 = transport();
        let t2 = TcpTransport::new(&TcpConfig { streams: 2, ..lo_cfg() }).unwrap();
        let mut h = [0u8; 128];
        let l = t4.listen(0, &mut h).unwrap();
        let err = t2.connect(0, &mut h, null_mut()).unwrap_err();
        assert!(err.to_string().contains("NCCL_TCPXSHIM_TCP_STREAMS"), "{err}");

        // Forge the handle so the connecting side goes ahead: the acceptor must catch it from the hello.
        h[26..28].copy_from_slice(&2u16.to_le_bytes());
        let mut s = None;
        let err = wait("accept to notice the stream mismatch", || {
            if s.is_none() {
                s = t2.connect(0, &mut h, null_mut()).unwrap();
            }
            t4.accept(l, null_mut()).err()
        });
        assert!(err.kind() == ErrorKind::InvalidUsage, "{err}");
        assert!(err.to_string().contains("NCCL_TCPXSHIM_TCP_STREAMS"), "{err}");
        let t_inline = TcpTransport::new(&TcpConfig {
            inline_max: 5,
            ..lo_cfg()
        })
        .unwrap();
        let mut h2 = [0u8; 128];
        let l2 = t4.listen(0, &mut h2).unwrap();
        let err = t_inline.connect(0, &mut h2, null_mut()).unwrap_err();
        assert!(err.to_string().contains("NCCL_TCPXSHIM_TCP_INLINE"), "{err}");
        if let Some(s) = s {
            t2.close_send(s).unwrap();
        }
        t4.close_listen(l).unwrap();
        t4.close_listen(l2).unwrap();
    }
}

#[test]
fn ipv6_loopback_works() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let dev = Device::interface("lo", "::1".parse().unwrap());
        let t = TcpTransport::with_devices(&lo_cfg(), vec![dev]).unwrap();
        let mut h = [0u8; 128];
        let l = match t.listen(0, &mut h) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skipping: no IPv6 loopback here ({e})");
                return;
            }
        };
        t.close_listen(l).unwrap();
        let p = pair(&t);
        assert!(t.describe_comm(p.0).unwrap().starts_with("peer [::1]:"));
        for size in [5, 200_000] {
            check_transfer(&t, p.0, p.1, size, size);
        }
        close_pair(&t, p);
    }
}

#[test]
fn comms_are_driven_from_several_threads_at_once() {
    let t = transport();
    std::thread::scope(|sc| {
        for k in 0..4u32 {
            let t = &t;
            sc.spawn(move || {
                let p = pair(t);
                for i in 0..20 {
                    let size = [0, 33, 17_000, 250_000, 1 << 20][(i + k as usize) % 5];
                    check_transfer(t, p.0, p.1, size, size + 1);
                }
                close_pair(t, p);
            });
        }
    });
}

#[test]
fn polling_workers_need_no_wake_up_between_messages() {
    // 64 KiB messages go to the workers (above the inline threshold), one after the other; a
    // worker that keeps polling for 100 ms after traffic is still awake for the next one, so only
    // the first posts (and any after a stall of the test thread longer than that) wake it.
    let t = TcpTransport::new(&TcpConfig {
        workers: Some(1),
        spin_us: Some(100_000),
        ..lo_cfg()
    })
    .unwrap();
    let p = pair(&t);
    let before = t.pool.wakes();
    let n = 200u64;
    for i in 0..n as usize {
        check_transfer(&t, p.0, p.1, 65_536 + i, 65_536 + i);
    }
    let wakes = t.pool.wakes() - before;
    assert!(
        wakes <= n / 4,
        "{wakes} wake-ups for {n} messages with a polling worker"
    );
    // After the polling time the worker sleeps again: the next message must wake it.
    std::thread::sleep(Duration::from_millis(300));
    let before = t.pool.wakes();
    check_transfer(&t, p.0, p.1, 70_000, 70_000);
    assert!(t.pool.wakes() > before, "a worker idle for 300 ms was not asleep");
    close_pair(&t, p);
}

#[test]
fn stopping_the_workers_fails_requests_in_flight() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        for workers in [None, Some(0)] {
            let t = TcpTransport::new(&TcpConfig { workers, ..lo_cfg() }).unwrap();
            // A striped send nobody receives: most of it is still queued with the send side's workers.
            let p = pair(&t);
            let size = 64 << 20;
            let data = vec![7u8; size];
            let sq = t
                .isend(p.0, data.as_ptr() as *mut _, size as i32, 0, None)
                .unwrap()
                .unwrap();
            // A striped receive whose header arrived but whose data never comes (a hand-made sender).
            let (r, l, lh, ctrl, _data_socks) = hand_made_sender(&t, 43);
            let rsize = 1usize << 20;
            let header = wire::Header {
                seq: 0,
                size: rsize as u64,
                chunk: wire::chunk_size(rsize, lh.streams as usize, 65536) as u32,
                flags: 0,
            };
            assert_eq!(ctrl.send(&header.encode()).unwrap(), wire::HEADER_LEN);
            let mut buf = vec![0u8; rsize];
            let rq = t
                .irecv(r, &[buf.as_mut_ptr().cast()], &[rsize as i32], &[0], &[None])
                .unwrap()
                .unwrap();
            for _ in 0..20 {
                assert!(!t.test(sq, None).unwrap() && !t.test(rq, None).unwrap());
                std::thread::sleep(Duration::from_millis(1));
            }
            t.pool.stop();
            for (req, what) in [(sq, "send"), (rq, "receive")] {
                let start = Instant::now();
                let err = loop {
                    match t.test(req, None) {
                        Ok(false) => assert!(
                            start.elapsed() < Duration::from_secs(5),
                            "the {what} still reports \"not done\" 5 s after the workers stopped"
                        ),
                        Ok(true) => panic!("the {what} cannot have completed"),
                        Err(e) => break e,
                    }
                    std::thread::sleep(Duration::from_micros(100));
                };
                assert!(err.kind() == ErrorKind::Internal, "{err}");
                assert!(err.to_string().contains("I/O worker stopped"), "{err}");
            }
            // Closing after the workers stopped does not wait for acknowledgements nobody will send.
            let start = Instant::now();
            close_pair(&t, p);
            t.close_recv(r).unwrap();
            t.close_listen(l).unwrap();
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "close after stop took {:?}",
                start.elapsed()
            );
        }
    }
}

#[test]
fn waiting_for_workers_does_not_poll_the_control_socket_every_test() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        // NCCL posts several receives and tests the oldest, which waits for workers; reading ahead for
        // the next header must not cost a recv syscall on every one of those tests.
        let t = transport();
        let p = pair(&t);
        let size = 4 << 20;
        let data = pattern(size, 11);
        let mut bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; size]).collect();
        let rq: Vec<Opaque> = bufs
            .iter_mut()
            .map(|b| {
                t.irecv(p.1, &[b.as_mut_ptr().cast()], &[size as i32], &[0], &[None])
                    .unwrap()
                    .unwrap()
            })
            .collect();
        let comm = Comm::from_opaque(p.1, TAG_RECV, "test").unwrap();
        let idle0 = comm.ctrl_idle_reads();
        let mut tests = 0u64;
        let start = Instant::now();
        for &r in &rq {
            let s = t
                .isend(p.0, data.as_ptr() as *mut _, size as i32, 0, None)
                .unwrap()
                .unwrap();
            let (mut sdone, mut rdone) = (false, false);
            while !(sdone && rdone) {
                assert!(start.elapsed() < DEADLINE, "transfers stuck");
                sdone = sdone || t.test(s, None).unwrap();
                if !rdone {
                    tests += 1;
                    rdone = t.test(r, None).unwrap();
                }
            }
        }
        let idle = comm.ctrl_idle_reads() - idle0;
        assert!(bufs.iter().all(|b| *b == data), "payload corrupted");
        // Before the fix this was about one idle read per test.
        assert!(
            idle <= tests / 4 + 8 * 16,
            "{idle} control-socket reads found nothing during {tests} tests"
        );
        eprintln!("{tests} tests, {idle} idle control-socket reads");
        close_pair(&t, p);
    }
}

#[test]
fn inline_messages_behind_a_striped_one_arrive() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        // The receive tested first waits for workers while inline messages queue behind it; testing a
        // later request must still read its header and payload at once.
        let t = transport();
        let p = pair(&t);
        let big = 8 << 20;
        let mut bufs = [vec![0u8; big], vec![0u8; 100], vec![0u8; 3000]];
        let mut sends = [pattern(big, 1), pattern(100, 2), pattern(3000, 3)];
        let rq: Vec<Opaque> = bufs
            .iter_mut()
            .map(|b| {
                t.irecv(p.1, &[b.as_mut_ptr().cast()], &[b.len() as i32], &[0], &[None])
                    .unwrap()
                    .unwrap()
            })
            .collect();
        let sq: Vec<Opaque> = sends
            .iter_mut()
            .map(|d| {
                t.isend(p.0, d.as_mut_ptr().cast(), d.len() as i32, 0, None)
                    .unwrap()
                    .unwrap()
            })
            .collect();
        // Many look-ahead tests on the big one first (pushing the back-off to its limit), then the last.
        // The send may finish meanwhile: a completed request must not be tested again.
        let mut big_sent = false;
        for _ in 0..200 {
            if t.test(sq[0], None).unwrap() {
                big_sent = true;
                break;
            }
        }
        let (a, b) = finish_both(&t, sq[2], rq[2]);
        assert_eq!((a.unwrap(), b.unwrap()), (3000, 3000));
        let (a, b) = finish_both(&t, sq[1], rq[1]);
        assert_eq!(a.unwrap(), b.unwrap());
        if big_sent {
            assert_eq!(finish(&t, rq[0], "the big receive").unwrap(), big as i32);
        } else {
            let (a, b) = finish_both(&t, sq[0], rq[0]);
            assert_eq!(a.unwrap(), b.unwrap());
        }
        assert!(bufs.iter().zip(&sends).all(|(b, s)| b == s), "payload corrupted");
        close_pair(&t, p);
    }
}

#[test]
fn abandoned_and_stray_connections_are_dropped() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let mut t = transport();
        t.abandon_after = Duration::from_millis(500);
        let mut h = [0u8; 128];
        let l = t.listen(0, &mut h).unwrap();
        let lh = ListenHandle::read(&h).unwrap();
        // A connect NCCL polled once and then gave up on: its sockets never send a hello.
        let pend = conn::PendingConnect::start(
            lh.addr,
            lh.streams,
            lh.inline_max,
            lh.token,
            7,
            TcpConfig::default().liveness(),
        )
        .unwrap();
        let pend_ids = socket_ids(&pend.fds());
        t.pending().insert(0x77, pend);
        // A stray connection that sends nothing, one with half a hello, one connection missing its
        // data sockets.
        use std::io::{Read, Write};
        let hello = |index| {
            wire::Hello {
                index,
                streams: lh.streams,
                inline_max: lh.inline_max,
                nonce: 99,
                token: lh.token,
            }
            .encode()
        };
        let mut raw: Vec<std::net::TcpStream> =
            (0..3).map(|_| std::net::TcpStream::connect(lh.addr).unwrap()).collect();
        raw[1].write_all(&hello(0)[..10]).unwrap();
        raw[2].write_all(&hello(0)).unwrap();
        let want = 1 + (1 + lh.streams as usize) + 3;
        wait("the listener to hold every socket", || {
            assert!(t.accept(l, null_mut()).unwrap().is_none());
            (t.comm_fds(l).len() == want).then_some(())
        });
        assert_eq!(t.pending().len(), 1, "a connect idle for less than the limit is kept");
        std::thread::sleep(Duration::from_millis(600));
        assert!(t.accept(l, null_mut()).unwrap().is_none());
        assert_eq!(t.comm_fds(l).len(), 1, "only the listener itself is left");
        assert!(t.pending().is_empty(), "the abandoned connect is dropped");
        let open = open_fd_ids();
        assert!(pend_ids.iter().all(|id| !open.contains(id)), "its sockets are closed");
        for (i, s) in raw.iter_mut().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let r = s.read(&mut [0u8; 8]);
            assert!(
                matches!(r, Ok(0)) || r.is_err(),
                "stray connection {i} is still open: {r:?}"
            );
        }
        let mut stale = h;
        wire::set_connect_state(&mut stale, 0x77);
        let err = t.connect(0, &mut stale, null_mut()).unwrap_err();
        assert!(err.to_string().contains("abandoned"), "{err}");
        // The listener still works.
        let (mut s, mut r) = (None, None);
        wait("connect/accept after the clean-up", || {
            if s.is_none() {
                s = t.connect(0, &mut h, null_mut()).unwrap();
            }
            if r.is_none() {
                r = t.accept(l, null_mut()).unwrap();
            }
            (s.is_some() && r.is_some()).then_some(())
        });
        let p = (s.unwrap(), r.unwrap(), l);
        check_transfer(&t, p.0, p.1, 100_000, 100_000);
        close_pair(&t, p);
    }
}

/// xorshift64: with a fixed seed a failure replays exactly (sizes, depths, test order).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `msgs` messages of random sizes (0 to 3 MiB, many within 3 bytes of the inline threshold) over a
/// new pair of `t`, with random depths of up to 32 outstanding requests each way; each side tests
/// its oldest request (as NCCL does), and every payload and the bytes after it are checked.
fn pipelined(t: &TcpTransport, msgs: usize, seed: u64) {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        const MAX: usize = 3 << 20;
        const SLACK: usize = 8;
        let p = pair(t);
        let mut rng = Rng(seed);
        let inline = t.cfg.inline_max;
        let sizes: Vec<usize> = (0..msgs)
            .map(|_| match rng.below(4) {
                0 => rng.below(64),
                1 => (inline + rng.below(7)).saturating_sub(3),
                2 => rng.below(80_000),
                _ => rng.below(MAX + 1),
            })
            .collect();
        // Payloads are windows of one random source at random offsets: no copies, every message differs.
        let src: Vec<u8> = (0..(MAX + 65536) / 8).flat_map(|_| rng.next().to_le_bytes()).collect();
        let offs: Vec<usize> = (0..msgs).map(|_| rng.below(65536)).collect();
        let caps: Vec<usize> = sizes.iter().map(|&n| n + rng.below(SLACK)).collect();
        // At most 32 receives are outstanding, so message n can always use buffer n % 32.
        let mut bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; MAX + SLACK]).collect();
        let (mut sq, mut rq) = (std::collections::VecDeque::new(), std::collections::VecDeque::new());
        let (mut posted_s, mut posted_r, mut done_s, mut done_r) = (0, 0, 0, 0);
        let start = Instant::now();
        while done_s < msgs || done_r < msgs {
            assert!(
                start.elapsed() < DEADLINE,
                "seed {seed:#x}: stuck after {done_s} sends and {done_r} receives"
            );
            let depth = 1 + rng.below(32);
            while posted_s < msgs && sq.len() < depth {
                let n = posted_s;
                let data = src[offs[n]..].as_ptr() as *mut c_void;
                sq.push_back((n, t.isend(p.0, data, sizes[n] as i32, 0, None).unwrap().unwrap()));
                posted_s += 1;
            }
            let depth = 1 + rng.below(32);
            while posted_r < msgs && rq.len() < depth {
                let n = posted_r;
                let b = &mut bufs[n % 32];
                b[sizes[n]..caps[n]].fill(0xEE);
                let req = t
                    .irecv(p.1, &[b.as_mut_ptr().cast()], &[caps[n] as i32], &[0], &[None])
                    .unwrap()
                    .unwrap();
                rq.push_back((n, req));
                posted_r += 1;
            }
            let mut sz = [-1i32];
            if let Some(&(n, req)) = sq.front() {
                if t.test(req, Some(&mut sz)).unwrap() {
                    assert_eq!(sz[0] as usize, sizes[n], "seed {seed:#x}: size of send {n}");
                    sq.pop_front();
                    done_s += 1;
                }
            }
            if let Some(&(n, req)) = rq.front() {
                if t.test(req, Some(&mut sz)).unwrap() {
                    let (size, b) = (sizes[n], &bufs[n % 32]);
                    assert_eq!(sz[0] as usize, size, "seed {seed:#x}: size of receive {n}");
                    assert!(
                        b[..size] == src[offs[n]..offs[n] + size],
                        "seed {seed:#x}: message {n} ({size} bytes) corrupted"
                    );
                    assert!(
                        b[size..caps[n]].iter().all(|&x| x == 0xEE),
                        "seed {seed:#x}: message {n} ({size} bytes) written past its end"
                    );
                    rq.pop_front();
                    done_r += 1;
                }
            }
        }
        close_pair(t, p);
    }
}

#[test]
fn pipelined_random_sizes_default_settings() {
    pipelined(&transport(), 2000, 0x5eed_0001);
}

#[test]
fn pipelined_random_sizes_big_inline_three_streams() {
    let cfg = TcpConfig {
        streams: 3,
        min_chunk: Some(4096),
        inline_max: 1 << 20,
        ..lo_cfg()
    };
    pipelined(&TcpTransport::new(&cfg).unwrap(), 2000, 0x5eed_0002);
}

#[test]
fn pipelined_random_sizes_sixteen_streams_one_worker() {
    let cfg = TcpConfig {
        streams: 16,
        workers: Some(1),
        min_chunk: Some(4096),
        inline_max: 0,
        ..lo_cfg()
    };
    pipelined(&TcpTransport::new(&cfg).unwrap(), 2000, 0x5eed_0003);
}

#[test]
fn pipelined_random_sizes_three_threads_share_a_transport() {
    let t = transport();
    std::thread::scope(|sc| {
        for k in 0..3 {
            let t = &t;
            sc.spawn(move || pipelined(t, 2000, 0x5eed_0010 + k));
        }
    });
}

#[test]
fn loopback_addresses_make_separate_devices_that_nccl_can_tell_apart() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let cfg = TcpConfig {
            addrs: Some("127.0.0.1,127.0.0.2,127.0.0.3=/sys".into()),
            ..lo_cfg()
        };
        let t = TcpTransport::new(&cfg).expect("three loopback devices");
        assert_eq!(t.devices().unwrap(), 3);
        let props: Vec<Properties> = (0..3).map(|d| t.properties(d).unwrap()).collect();
        let names: Vec<&str> = props.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["lo/127.0.0.1", "lo/127.0.0.2", "lo/127.0.0.3"]);
        let guids: std::collections::HashSet<u64> = props.iter().map(|p| p.guid).collect();
        assert_eq!(guids.len(), 3, "NCCL tells devices apart by guid");
        assert_eq!(
            props[2].pci_path.as_deref(),
            Some("/sys"),
            "the given PCI path places the device"
        );
        assert_eq!(props[0].pci_path, iface::pci_path("lo"));
        // Each device listens on its own address, and traffic flows on each.
        for dev in 0..3 {
            let mut h = [0u8; 128];
            let l = t.listen(dev, &mut h).expect("listen");
            let want = format!("listening on 127.0.0.{}:", dev + 1);
            let desc = t.describe_comm(l).unwrap();
            assert!(desc.starts_with(&want), "device {dev}: {desc}");
            let (mut s, mut r) = (None, None);
            wait("connect/accept", || {
                if s.is_none() {
                    s = t.connect(dev, &mut h, null_mut()).expect("connect");
                }
                if r.is_none() {
                    r = t.accept(l, null_mut()).expect("accept");
                }
                (s.is_some() && r.is_some()).then_some(())
            });
            let p = (s.unwrap(), r.unwrap(), l);
            check_transfer(&t, p.0, p.1, 100_000 + dev as usize, 200_000);
            close_pair(&t, p);
        }
        assert!(t.properties(3).is_err());
    }
}

/// [`TcpTransport::stall_detail_of`] for request `req` of comm `comm` of `t`.
fn stall_detail(t: &TcpTransport, comm: Opaque, req: Opaque) -> Option<String> {
    // SAFETY: the tests pass open comms of `t` and requests posted on them.
    unsafe { t.stall_detail_of(comm, req) }
}

/// Posts a send of `data` that nobody receives and tests it for a while, so that the workers and
/// the control socket have written all that the socket buffers take; returns the request.
fn stuck_send(t: &TcpTransport, send: Opaque, data: &[u8]) -> Opaque {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let req = t
            .isend(send, data.as_ptr() as *mut _, data.len() as i32, 0, None)
            .unwrap()
            .unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(300) {
            assert!(!t.test(req, None).unwrap(), "a send nobody receives cannot complete");
            std::thread::sleep(Duration::from_millis(1));
        }
        req
    }
}

/// Receives `data` on `recv` for the stuck send `sreq`, then checks that the completed send has no
/// stall detail any more.
fn unstick_send(t: &TcpTransport, (send, recv): (Opaque, Opaque), sreq: Opaque, data: &[u8]) {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let mut buf = vec![0u8; data.len()];
        let rreq = t
            .irecv(recv, &[buf.as_mut_ptr().cast()], &[data.len() as i32], &[0], &[None])
            .unwrap()
            .unwrap();
        let (s, r) = finish_both(t, sreq, rreq);
        assert_eq!((s.unwrap(), r.unwrap()), (data.len() as i32, data.len() as i32));
        assert!(buf == data, "payload corrupted");
        assert_eq!(stall_detail(t, send, sreq), None, "a completed send waits for nothing");
        assert_eq!(
            stall_detail(t, recv, rreq),
            None,
            "a completed receive waits for nothing"
        );
    }
}

#[test]
fn a_stuck_striped_send_says_its_chunks_are_with_the_workers() {
    // Two streams: chunks of 32 MiB, far more than loopback socket buffers take without a reader.
    let t = TcpTransport::new(&TcpConfig { streams: 2, ..lo_cfg() }).unwrap();
    let p = pair(&t);
    let data = pattern(64 << 20, 5);
    let sreq = stuck_send(&t, p.0, &data);
    let d = stall_detail(&t, p.0, sreq).expect("an outstanding send has a detail");
    let head = format!("message #0: {0} of {0} control bytes written, ", wire::HEADER_LEN);
    let left = d.strip_prefix(&head).unwrap_or_else(|| panic!("{d}"));
    assert!(
        left == "1 chunk(s) still with the I/O workers (the peer is not reading: is its irecv posted?)"
            || left == "2 chunk(s) still with the I/O workers (the peer is not reading: is its irecv posted?)",
        "{d}"
    );
    assert_eq!(stall_detail(&t, p.1, sreq), None, "not a request of the receive comm");
    unstick_send(&t, (p.0, p.1), sreq, &data);
    close_pair(&t, p);
}

#[test]
fn a_stuck_inline_send_says_how_much_of_it_is_written() {
    let size = 64 << 20;
    let t = TcpTransport::new(&TcpConfig {
        inline_max: size,
        ..lo_cfg()
    })
    .unwrap();
    let p = pair(&t);
    let data = pattern(size, 6);
    let sreq = stuck_send(&t, p.0, &data);
    let d = stall_detail(&t, p.0, sreq).expect("an outstanding send has a detail");
    let written: usize = d
        .strip_prefix("message #0: ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{d}"));
    let ctrl = size + wire::HEADER_LEN;
    assert!(written < ctrl, "{d}");
    assert!(
        d.ends_with(&format!(
            " of {ctrl} control bytes written, 0 chunk(s) still with the I/O workers (the peer is not reading: \
             is its irecv posted?)"
        )),
        "{d}"
    );
    unstick_send(&t, (p.0, p.1), sreq, &data);
    close_pair(&t, p);
}

/// A receive comm of `t` (and its listen comm) whose sender is the test itself, through raw
/// sockets: the control socket first, then one per data stream.
fn fake_sender(t: &TcpTransport) -> (Opaque, Opaque, Vec<std::net::TcpStream>) {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        use std::io::Write;
        let mut h = [0u8; 128];
        let l = t.listen(0, &mut h).unwrap();
        let lh = ListenHandle::read(&h).unwrap();
        let socks: Vec<std::net::TcpStream> = (0..=lh.streams)
            .map(|index| {
                let mut s = std::net::TcpStream::connect(lh.addr).unwrap();
                s.set_nodelay(true).unwrap();
                let hello = wire::Hello {
                    index,
                    streams: lh.streams,
                    inline_max: lh.inline_max,
                    nonce: 42,
                    token: lh.token,
                };
                s.write_all(&hello.encode()).unwrap();
                s
            })
            .collect();
        let r = wait("the fake sender's connection", || t.accept(l, null_mut()).unwrap());
        (r, l, socks)
    }
}

/// Tests `req` (which must not complete) until its stall detail is `want`.
fn wait_for_detail(t: &TcpTransport, comm: Opaque, req: Opaque, want: &str) {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        let mut last = None;
        wait(want, || {
            assert!(!t.test(req, None).unwrap(), "{want}: the request completed");
            last = stall_detail(t, comm, req);
            (last.as_deref() == Some(want)).then_some(())
        });
    }
}

#[test]
fn stuck_receives_say_what_they_wait_for() {
    // SAFETY: the test hands the transport only its own live comms, registrations and requests, and buffers that outlive the requests using them.
    unsafe {
        use std::io::Write;
        let t = transport();
        let (r, l, mut socks) = fake_sender(&t);
        let (small, big) = (1000, 1 << 20);
        let mut a = vec![0u8; small];
        let mut b = vec![0u8; big];
        let post = |buf: &mut Vec<u8>| {
            t.irecv(r, &[buf.as_mut_ptr().cast()], &[buf.len() as i32], &[0], &[None])
                .unwrap()
                .unwrap()
        };
        let (ra, rb) = (post(&mut a), post(&mut b));
        let no_header = |ahead: usize| {
            format!(
                "no message from the sender yet ({ahead} earlier receive(s) of this connection waiting too; is the \
             peer's isend posted?)"
            )
        };
        wait_for_detail(&t, r, ra, &no_header(0));
        assert_eq!(stall_detail(&t, r, rb), Some(no_header(1)));

        // Message 0, inline: its header and 400 of its 1000 bytes.
        let inline = pattern(small, 1);
        let hdr = wire::Header {
            seq: 0,
            size: small as u64,
            chunk: 0,
            flags: wire::FLAG_INLINE,
        };
        socks[0].write_all(&hdr.encode()).unwrap();
        socks[0].write_all(&inline[..400]).unwrap();
        wait_for_detail(&t, r, ra, "message #0 inline, 400 of 1000 bytes in");
        assert_eq!(stall_detail(&t, r, rb), Some(no_header(0)));
        socks[0].write_all(&inline[400..]).unwrap();
        assert_eq!(finish(&t, ra, "the inline receive").unwrap(), small as i32);
        assert!(a == inline, "inline payload corrupted");
        assert_eq!(stall_detail(&t, r, ra), None, "a completed receive waits for nothing");

        // Message 1, striped: its header first (the receiver queues chunk reads only then), then all
        // chunks but the last.
        let (streams, min_chunk) = (lo_cfg().streams, t.min_chunk);
        let chunk = wire::chunk_size(big, streams, min_chunk);
        let chunks: Vec<(usize, usize, usize)> = wire::chunks(1, big, chunk, streams).collect();
        assert!(chunks.len() > 1, "the test needs a message of several chunks");
        let hdr = wire::Header {
            seq: 1,
            size: big as u64,
            chunk: chunk as u32,
            flags: 0,
        };
        socks[0].write_all(&hdr.encode()).unwrap();
        let striped = |n: usize| format!("message #1 of {big} bytes, {n} chunk(s) still to arrive");
        wait_for_detail(&t, r, rb, &striped(chunks.len()));
        let data = pattern(big, 2);
        let (last, first) = chunks.split_last().unwrap();
        for &(stream, off, len) in first {
            socks[1 + stream].write_all(&data[off..off + len]).unwrap();
        }
        wait_for_detail(&t, r, rb, &striped(1));
        let &(stream, off, len) = last;
        socks[1 + stream].write_all(&data[off..off + len]).unwrap();
        assert_eq!(finish(&t, rb, "the striped receive").unwrap(), big as i32);
        assert!(b == data, "striped payload corrupted");
        assert_eq!(stall_detail(&t, r, rb), None, "a completed receive waits for nothing");

        t.close_recv(r).unwrap();
        t.close_listen(l).unwrap();
    }
}

/// Keepalive and TCP_USER_TIMEOUT as the kernel reports them on every socket of both ends of a
/// loopback connection (control and data sockets, connecting and accepting side).
#[test]
fn every_socket_of_a_connection_has_keepalive_and_the_user_timeout() {
    use socket2::SockRef;
    use std::os::fd::BorrowedFd;
    let vars = |k: &str| match k {
        "NCCL_TCPXSHIM_TCP_IFNAME" => Some("lo".to_string()),
        "NCCL_TCPXSHIM_TCP_STREAMS" => Some("3".to_string()),
        "NCCL_TCPXSHIM_TCP_KEEPALIVE" => Some("7".to_string()),
        "NCCL_TCPXSHIM_TCP_USER_TIMEOUT" => Some("4321".to_string()),
        _ => None,
    };
    let off = |k: &str| match k {
        "NCCL_TCPXSHIM_TCP_IFNAME" => Some("lo".to_string()),
        "NCCL_TCPXSHIM_TCP_KEEPALIVE" => Some("0".to_string()),
        _ => None,
    };
    // (settings, keepalive (idle, interval) expected, user timeout expected)
    let cases = [
        (
            TcpConfig::from_vars(&vars).unwrap(),
            Some((7, 3)),
            Some(Duration::from_millis(4321)),
        ),
        (TcpConfig::from_vars(&off).unwrap(), None, None),
        (lo_cfg(), Some((10, 5)), None),
    ];
    for (cfg, keepalive, user_timeout) in cases {
        let t = TcpTransport::new(&cfg).unwrap();
        let p = pair(&t);
        let (s, r) = (p.0, p.1);
        let mut fds = t.comm_fds(s);
        let send_side = fds.len();
        fds.extend(t.comm_fds(r));
        assert_eq!(
            fds.len(),
            2 * (1 + cfg.streams),
            "control and data sockets on both sides"
        );
        assert_eq!(send_side, 1 + cfg.streams);
        for fd in fds {
            // SAFETY: `fd` is a socket of a comm that stays open until close_pair below.
            let b = unsafe { BorrowedFd::borrow_raw(fd) };
            let sock = SockRef::from(&b);
            let ctx = format!("fd {fd} with {cfg:?}");
            match keepalive {
                Some((idle, intvl)) => {
                    assert!(sock.keepalive().unwrap(), "SO_KEEPALIVE on {ctx}");
                    assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(idle), "{ctx}");
                    assert_eq!(
                        sock.tcp_keepalive_interval().unwrap(),
                        Duration::from_secs(intvl),
                        "{ctx}"
                    );
                    assert_eq!(
                        sock.tcp_keepalive_retries().unwrap(),
                        liveness::KEEPALIVE_PROBES,
                        "{ctx}"
                    );
                }
                None => assert!(!sock.keepalive().unwrap(), "no SO_KEEPALIVE on {ctx}"),
            }
            assert_eq!(
                sock.tcp_user_timeout().unwrap(),
                user_timeout,
                "TCP_USER_TIMEOUT on {ctx}"
            );
        }
        close_pair(&t, p);
    }
}

#[test]
fn dead_peer_settings_parse_with_their_ranges() {
    let d = TcpConfig::default();
    assert_eq!((d.keepalive_s, d.user_timeout_ms), (10, 0));
    let with = |k: &'static str, v: &'static str| TcpConfig::from_vars(&move |n| (n == k).then(|| v.to_string()));
    assert_eq!(
        with("NCCL_TCPXSHIM_TCP_USER_TIMEOUT", "30000").unwrap().user_timeout_ms,
        30000
    );
    assert_eq!(with("NCCL_TCPXSHIM_TCP_KEEPALIVE", "0").unwrap().keepalive_s, 0);
    for (k, v) in [
        ("NCCL_TCPXSHIM_TCP_KEEPALIVE", "32768"),
        ("NCCL_TCPXSHIM_TCP_KEEPALIVE", "-1"),
        ("NCCL_TCPXSHIM_TCP_USER_TIMEOUT", "2147483648"),
        ("NCCL_TCPXSHIM_TCP_USER_TIMEOUT", "soon"),
    ] {
        let e = with(k, v).unwrap_err();
        assert!(e.to_string().contains(k), "{k}={v}: {e}");
    }
}

/// A socket failing with ETIMEDOUT (the kernel gave up on a silent peer) fails its request as a
/// timeout whose message names the settings that bounded the wait; a route gone mid-connection
/// is a lost connection, not a refused one.
#[test]
fn a_silent_peer_error_is_a_timeout_naming_the_settings() {
    let live = liveness::Liveness {
        keepalive_s: 6,
        user_timeout_ms: 2500,
    };
    let e = liveness::socket_error(
        "connection to 10.0.0.2:4000 failed while sending message 3 (data stream 1)".into(),
        std::io::Error::from_raw_os_error(libc::ETIMEDOUT),
        &live,
    );
    assert_eq!(e.kind(), ErrorKind::Timeout);
    let m = e.to_string();
    for want in [
        "10.0.0.2:4000",
        "message 3",
        "NCCL_TCPXSHIM_TCP_USER_TIMEOUT=2500",
        "NCCL_TCPXSHIM_TCP_KEEPALIVE=6",
        "every 3 s",
    ] {
        assert!(m.contains(want), "{want:?} missing from {m}");
    }
    assert_eq!(e.io_source().and_then(|s| s.raw_os_error()), Some(libc::ETIMEDOUT));
    let off = liveness::Liveness {
        keepalive_s: 0,
        user_timeout_ms: 0,
    };
    let e = liveness::socket_error(
        "irecv: connection to 10.0.0.2:4000 failed while receiving message 0".into(),
        std::io::Error::from_raw_os_error(libc::EHOSTUNREACH),
        &off,
    );
    assert_eq!(e.kind(), ErrorKind::ConnectionLost);
    let m = e.to_string();
    assert!(
        m.contains("net.ipv4.tcp_retries2") && m.contains("NCCL_TCPXSHIM_TCP_KEEPALIVE=0"),
        "{m}"
    );
    let reset = liveness::socket_error(
        "x".into(),
        std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        &live,
    );
    assert_eq!(reset.kind(), ErrorKind::ConnectionLost);
    assert!(!reset.to_string().contains("NCCL_TCPXSHIM_TCP_USER_TIMEOUT"), "{reset}");
}

/// NCCL_TCPXSHIM_TCP_PORT_RANGE: listeners bind inside the range, connections work there, and a
/// listen finding every port taken fails naming the setting.
#[test]
fn listeners_bind_inside_the_port_range_and_say_so_when_it_is_full() {
    // A range of 3 ports, away from the ephemeral range, different per process.
    let base = 20000 + (std::process::id() % 2000) as u16 * 3;
    let t = TcpTransport::new(&TcpConfig {
        ports: Some((base, base + 2)),
        ..lo_cfg()
    })
    .expect("transport on lo");
    let p = pair(&t);
    let mut msg: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let (sent, got, buf) = transfer(&t, p.0, p.1, &mut msg, 4096);
    assert_eq!((sent.unwrap(), got.unwrap()), (4096, 4096));
    assert_eq!(&buf[..4096], &msg[..], "the bytes arrive intact over the range's port");
    // SAFETY: the test hands the transport only its own live comms.
    let d = unsafe { t.describe_comm(p.2) }.unwrap();
    let after = d.split_once("127.0.0.1:").map(|x| x.1).unwrap_or_default();
    let port: u16 = after
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|e| panic!("no port in {d:?}: {e}"));
    assert!((base..=base + 2).contains(&port), "{d}");
    let mut held = vec![];
    let mut h = [0u8; 128];
    let full = loop {
        match t.listen(0, &mut h) {
            Ok(l) => held.push(l),
            Err(e) => break e.to_string(),
        }
        assert!(held.len() <= 3, "more listeners than ports in the range");
    };
    // The range's two other ports, unless another process holds one of them.
    assert!(held.len() <= 2, "more listeners than free ports in the range");
    assert!(
        full.contains("NCCL_TCPXSHIM_TCP_PORT_RANGE") && full.contains(&format!("{base}-{}", base + 2)),
        "{full}"
    );
    for l in held {
        // SAFETY: `l` is an open listen comm of `t`, closed once.
        unsafe { t.close_listen(l) }.unwrap();
    }
    close_pair(&t, p);
}

/// `Cpus_allowed_list` of every thread of this process whose name starts with `prefix`.
fn allowed_cpus_of(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| {
            let dir = e.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            if !comm.trim_end().starts_with(prefix) {
                return None;
            }
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .collect()
}

#[test]
fn workers_follow_the_cpu_plan_and_pin_where_asked() {
    let allowed = super::sys::affinity().unwrap();
    // Unset: one per usable CPU beyond NCCL's two busy threads, 1 to 4.
    let t = TcpTransport::new(&lo_cfg()).unwrap();
    let want = allowed
        .len()
        .saturating_sub(super::cpus::NCCL_BUSY_THREADS)
        .clamp(1, super::cpus::MAX_DEFAULT_WORKERS);
    assert_eq!(threads_named(&worker_prefix(&t)), want);
    drop(t);
    // 64 ranks on this host, as the launcher says: each rank's share of the CPUs is small, one worker.
    let t = TcpTransport::new(&TcpConfig {
        local_ranks: Some(super::cpus::LocalRanks {
            count: 64,
            var: "OMPI_COMM_WORLD_LOCAL_SIZE",
        }),
        ..lo_cfg()
    })
    .unwrap();
    assert_eq!(threads_named(&worker_prefix(&t)), 1);
    assert_eq!(t.min_chunk, super::cpus::ONE_CPU_MIN_CHUNK);
    drop(t);
    // Pinned to the first allowed CPU (twice: two workers on it), and data still moves.
    let first = allowed[0];
    let cfg = TcpConfig {
        cpus: Some(vec![first, 4000 % 1024]),
        workers: Some(2),
        ..lo_cfg()
    };
    let t = TcpTransport::new(&cfg).unwrap();
    let prefix = worker_prefix(&t);
    let mut pins = allowed_cpus_of(&prefix);
    pins.sort();
    let refused_is_allowed = allowed.contains(&(4000 % 1024));
    let expect: Vec<String> = if refused_is_allowed {
        let mut v = vec![first.to_string(), (4000 % 1024).to_string()];
        v.sort();
        v
    } else {
        vec![first.to_string(), first.to_string()]
    };
    assert_eq!(pins, expect);
    let p = pair(&t);
    let mut data: Vec<u8> = (0..(1 << 20) + 7).map(|i| (i % 251) as u8).collect();
    let want = data.clone();
    let (a, b, got) = transfer(&t, p.0, p.1, &mut data, want.len());
    assert_eq!((a.unwrap(), b.unwrap()), (want.len() as i32, want.len() as i32));
    assert!(got == want, "data differ after the transfer");
    close_pair(&t, p);
}

#[test]
fn a_thread_confined_to_one_cpu_gets_the_one_cpu_plan() {
    let allowed = super::sys::affinity().unwrap();
    // Confine this test's thread (the affinity mask is per thread) as mpirun's binding would.
    super::sys::pin_to(allowed[0]).unwrap();
    let t = TcpTransport::new(&lo_cfg());
    let set = TcpTransport::new(&TcpConfig {
        min_chunk: Some(65536),
        workers: Some(3),
        ..lo_cfg()
    });
    // Back to the whole mask before anything can fail.
    super::sys::set_affinity(&allowed).unwrap();
    let (t, set) = (t.unwrap(), set.unwrap());
    assert_eq!(threads_named(&worker_prefix(&t)), 1);
    assert_eq!(t.min_chunk, super::cpus::ONE_CPU_MIN_CHUNK);
    assert_eq!(threads_named(&worker_prefix(&set)), 3, "the settings win over the plan");
    assert_eq!(set.min_chunk, 65536);
    let p = pair(&t);
    let mut data: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i % 253) as u8).collect();
    let want = data.clone();
    let (a, b, got) = transfer(&t, p.0, p.1, &mut data, want.len());
    assert_eq!((a.unwrap(), b.unwrap()), (want.len() as i32, want.len() as i32));
    assert!(got == want, "data differ after the transfer");
    close_pair(&t, p);
}
