//! NCCL_TCPXSHIM_ABORT_ON_ERROR=1 ends the process when an error that ends the job (here a
//! connection broken by the fault layer) is returned to NCCL from a data-path call, with the
//! message on stderr and exit status 1; unset, the same error goes to the caller and the process
//! carries on. The process that ends is a child: this test binary run again, in child mode, on the
//! shim's exported table with its settings from the child's environment.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set in the child's environment: run the child's part instead of spawning.
const CHILD: &str = "TCPXSHIM_TEST_ABORT_CHILD";
const TEST: &str = "abort_on_error_ends_the_process_with_the_message";

/// The child: a connection over the built-in transport on loopback whose send comm breaks after
/// its first message, then a send on the broken comm.
fn child() {
    let cfg = Config::from_env().expect("settings from the environment");
    let net = Net::in_process(&cfg);
    let (send, recv) = net.connect_pair(0);
    let sbuf = AlignedBuf::new(64);
    let rbuf = AlignedBuf::new(64);
    let smr = net.reg_buf(send, &sbuf, PTR_HOST).unwrap();
    let rmr = net.reg_buf(recv, &rbuf, PTR_HOST).unwrap();
    let r = net.post_recv(recv, rbuf.as_ptr(), 64, 0, rmr).unwrap();
    let s = net.post_send(send, sbuf.as_ptr(), 64, 0, smr).unwrap();
    assert_eq!(net.wait(s), Ok(64));
    assert_eq!(net.wait(r), Ok(64));
    // The fault layer shut the sockets down: the send fails when posted or when tested.
    let err = net
        .post_send(send, sbuf.as_ptr(), 64, 0, smr)
        .and_then(|s| net.wait(s))
        .err();
    println!("CHILD: the broken send returned {err:?} to the caller");
}

fn run_child(abort: &str) -> (Option<i32>, String, String) {
    let mut c = Command::new(std::env::current_exe().unwrap())
        .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("NCCL_TCPXSHIM_PLUGIN", "builtin")
        .env("NCCL_TCPXSHIM_TCP_IFNAME", "lo")
        .env("NCCL_TCPXSHIM_FAULTS", "break=after:1")
        // Without recovery the broken connection is an error that ends the job (with it, the
        // connection is made again: tests/recovery.rs).
        .env("NCCL_TCPXSHIM_RECOVERY", "0")
        .env("NCCL_TCPXSHIM_ABORT_ON_ERROR", abort)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let start = Instant::now();
    while c.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(120) {
            let _ = c.kill();
            panic!("the child did not end within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = c.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn abort_on_error_ends_the_process_with_the_message() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    let (code, out, err) = run_child("1");
    assert_eq!(code, Some(1), "exit status 1\nstdout:\n{out}\nstderr:\n{err}");
    let line = err
        .lines()
        .find(|l| l.contains("ending the process (NCCL_TCPXSHIM_ABORT_ON_ERROR=1)"))
        .unwrap_or_else(|| panic!("the message on stderr:\n{err}"));
    assert!(
        line.starts_with("NET/TCPXSHIM isend") || line.starts_with("NET/TCPXSHIM test"),
        "{line}"
    );
    assert!(line.contains("send comm #"), "names the comm: {line}");
    assert!(
        !out.contains("CHILD: the broken send returned"),
        "ended before returning:\n{out}"
    );

    let (code, out, err) = run_child("0");
    assert_eq!(
        code,
        Some(0),
        "unset, the process carries on\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(
        out.contains("CHILD: the broken send returned Some(6)"),
        "ncclRemoteError to the caller:\n{out}"
    );
    assert!(!err.contains("ending the process"), "{err}");
}
