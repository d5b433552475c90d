//! `tcpxshim drop` and `sockdrop::drop_connections`: a child process holds two loopback TCP
//! connections to this test; dropping one from outside the child ends it on both sides (the
//! child reads the end of the stream, and so does the test's end) and leaves the other working.
//! Needs python3 (the child) and ptrace rights over the child (the tests run as root).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tcpxshim::sockdrop::drop_connections;

const BIN: &str = env!("CARGO_BIN_EXE_tcpxshim");
/// Generous bound for anything that should happen at once.
const LIMIT: Duration = Duration::from_secs(20);

/// Connects to both ports, says "ready", echoes what arrives, says "eof a"/"eof b" as each ends.
const CHILD: &str = r#"
import select, socket, sys
a = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
b = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
print("ready", flush=True)
names = {a: "a", b: "b"}
while names:
    r, _, _ = select.select(list(names), [], [], 60)
    if not r:
        print("idle", flush=True)
        break
    for s in r:
        try:
            d = s.recv(4096)
        except OSError:
            d = b""
        if d:
            s.sendall(d)
        else:
            print("eof", names.pop(s), flush=True)
"#;

struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The child's stdout, line by line, with a bound on each wait.
fn lines(out: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn expect_line(rx: &mpsc::Receiver<String>, want: &str) {
    let got = rx
        .recv_timeout(LIMIT)
        .unwrap_or_else(|e| panic!("child said nothing ({e}), expected {want:?}"));
    assert_eq!(got, want);
}

/// The test's end of a dropped connection reads the end of the stream (or a reset).
fn assert_ended(s: &mut TcpStream) {
    s.set_read_timeout(Some(LIMIT)).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("read {n} bytes from a dropped connection"),
        Err(e) => assert!(
            matches!(e.kind(), std::io::ErrorKind::ConnectionReset),
            "no end of stream within {LIMIT:?}: {e}"
        ),
    }
}

fn assert_echoes(s: &mut TcpStream) {
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
}

#[test]
fn dropping_a_childs_connection_ends_it_on_both_sides_and_leaves_the_others() {
    let (la, lb) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let (pa, pb) = (la.local_addr().unwrap().port(), lb.local_addr().unwrap().port());
    let mut child = Kid(Command::new("python3")
        .args(["-c", CHILD, &pa.to_string(), &pb.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the child"));
    let rx = lines(child.0.stdout.take().unwrap());
    let (mut sa, a_peer) = la.accept().unwrap();
    let (mut sb, b_peer) = lb.accept().unwrap();
    expect_line(&rx, "ready");
    let pid = child.0.id();

    // The library call: only the connection to port pa.
    let dropped = drop_connections(pid, &[pa]).unwrap();
    assert_eq!(dropped, vec![(a_peer, la.local_addr().unwrap())]);
    assert_ended(&mut sa);
    expect_line(&rx, "eof a");
    assert_echoes(&mut sb);
    assert_eq!(
        drop_connections(pid, &[pa]).unwrap(),
        vec![],
        "nothing left on port {pa}"
    );

    // The command: the rest, with no filter.
    let out = Command::new(BIN)
        .args(["drop", "--pid", &pid.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let lines_out: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("dropped ") && l.contains(" -> "))
        .collect();
    assert_eq!(
        lines_out,
        vec![format!("dropped {b_peer} -> {}", lb.local_addr().unwrap())],
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("round 1: dropped 1 connection(s) of process {pid}")),
        "{stdout}"
    );
    assert_ended(&mut sb);
    expect_line(&rx, "eof b");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "child: {status}");
}

#[test]
fn dropping_for_a_process_that_does_not_exist_names_it() {
    // Process ids are at most 2^22 on Linux: this one cannot exist.
    let err = drop_connections(1 << 30, &[]).unwrap_err().to_string();
    assert!(err.contains("is process 1073741824 running"), "{err}");
}
