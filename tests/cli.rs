//! The `tcpxshim` command: devices, demo, serve + connect as two processes, and its failures.
//! Everything runs on loopback with bounded waits; children are killed if a test fails.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tcpxshim");
/// Upper bound for any one command (debug build, 2 shared cores).
const LIMIT: Duration = Duration::from_secs(120);

/// A command with a clean, loopback-only environment.
fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("NCCL_SOCKET_IFNAME")
        .env_remove("NCCL_DEBUG")
        .env("NCCL_TCPXSHIM_PLUGIN", "builtin")
        .env("NCCL_TCPXSHIM_TCP_IFNAME", "lo");
    c
}

/// A child process that is killed when the test ends before it does.
struct Guard(Option<Child>);

impl Guard {
    fn spawn(mut c: Command) -> Guard {
        Guard(Some(
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start tcpxshim"),
        ))
    }

    /// Waits up to `limit` for the exit, then returns status and output.
    fn wait(mut self, limit: Duration) -> Output {
        let mut child = self.0.take().expect("child");
        let start = Instant::now();
        loop {
            if child.try_wait().expect("try_wait").is_some() {
                return child.wait_with_output().expect("output");
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!("tcpxshim did not finish within {limit:?}:\n{}", text(&out));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(c: Command) -> Output {
    Guard::spawn(c).wait(LIMIT)
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Checks a sweep table: `rows` size lines and the PASS summary.
fn assert_sweep(stdout: &str, rows: usize, all: &str) {
    assert!(
        stdout.contains("verified: ") && stdout.contains("both directions: OK"),
        "{all}"
    );
    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("size"))
        .skip(1)
        .take_while(|l| !l.starts_with("PASS"))
        .collect();
    assert_eq!(table.len(), rows, "one row per size:\n{all}");
    for l in &table {
        let cols: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(cols.len(), 7, "size unit lat iters GB/s msgs depth: {l:?}\n{all}");
        let lat: f64 = cols[2].parse().unwrap();
        let bw: f64 = cols[4].parse().unwrap();
        assert!(lat > 0.0 && bw > 0.0, "{l}");
    }
    assert!(stdout.lines().any(|l| l.starts_with("PASS: ")), "{all}");
}

#[test]
fn demo_verifies_and_sweeps() {
    let start = Instant::now();
    let out = run(cmd(&["demo", "--max-size", "4M"]));
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // devices table, then the test: 8 B, 32 B, ... 1 MiB, 4 MiB = 11 sizes
    assert!(
        stdout.contains("transport tcpxshim (built-in)") && stdout.contains(" lo "),
        "{all}"
    );
    assert_sweep(&stdout, 11, &all);
    assert!(stdout.contains("demo took"), "{all}");
    eprintln!("demo --max-size 4M took {:?}", start.elapsed());
}

#[test]
fn demo_picks_loopback_by_itself() {
    let mut c = cmd(&["demo", "--max-size", "64K", "--iters", "10"]);
    c.env_remove("NCCL_TCPXSHIM_TCP_IFNAME");
    let out = run(c);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(" lo "), "{all}");
}

#[test]
fn devices_lists_loopback() {
    let out = run(cmd(&["devices"]));
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("transport tcpxshim (built-in): 1 device(s)"),
        "{all}"
    );
    let header = lines.next().unwrap();
    for col in [
        "dev",
        "name",
        "pciPath",
        "guid",
        "ptrSupport",
        "speed",
        "latency",
        "maxComms",
        "maxRecvs",
        "type",
    ] {
        assert!(header.contains(col), "{col} missing: {all}");
    }
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..2], &["0", "lo"], "{all}");
    assert!(row.contains(&"HOST"), "{all}");
}

#[test]
fn bad_interface_setting_fails_clearly() {
    let mut c = cmd(&["devices"]);
    c.env("NCCL_TCPXSHIM_TCP_IFNAME", "nosuchif0");
    let out = run(c);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tcpxshim: error:") && stderr.contains("nosuchif0"),
        "{all}"
    );
    assert!(stderr.contains("NCCL_TCPXSHIM_TCP_IFNAME"), "names the setting: {all}");
    // The same for a test command.
    let mut c = cmd(&["demo"]);
    c.env("NCCL_TCPXSHIM_TCP_IFNAME", "nosuchif0");
    let out = run(c);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("nosuchif0"),
        "{}",
        text(&out)
    );
}

/// Starts `serve` on a free port and returns it with the port it printed.
fn start_server(extra: &[&str]) -> (Guard, mpsc::Receiver<String>, u16) {
    let mut args = vec!["serve", "--bind", "127.0.0.1:0", "--wait", "60", "--timeout", "30"];
    args.extend_from_slice(extra);
    start_server_with(&args)
}

/// Starts `tcpxshim ARGS` (a serve) and returns it with the port it printed.
fn start_server_with(args: &[&str]) -> (Guard, mpsc::Receiver<String>, u16) {
    let mut c = cmd(args);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().expect("start serve");
    let stdout = child.stdout.take().unwrap();
    let guard = Guard(Some(child));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("listening on 127.0.0.1:") {
                    let port: u16 = rest.split_whitespace().next().unwrap().parse().unwrap();
                    return (guard, rx, port);
                }
                seen.push(line);
            }
            Err(_) => panic!("serve printed no \"listening on\" line within 30 s; saw: {seen:?}"),
        }
    }
}

/// The rest of a child's output once it has exited.
fn finish(mut guard: Guard, rx: mpsc::Receiver<String>) -> (bool, String) {
    let mut child = guard.0.take().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("serve did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let stdout: Vec<String> = rx.iter().collect();
    (
        status.success(),
        format!("status {status}\n{}\n--- stderr\n{stderr}", stdout.join("\n")),
    )
}

#[test]
fn serve_and_connect_as_two_processes() {
    let (server, rx, port) = start_server(&[]);
    let addr = format!("127.0.0.1:{port}");
    let out = run(cmd(&[
        "connect",
        &addr,
        "--max-size",
        "256K",
        "--iters",
        "20",
        "--timeout",
        "30",
    ]));
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("connected to {addr}")), "{all}");
    // 8 B .. 128 KiB by powers of 4, then 256 KiB: 9 sizes
    assert_sweep(&stdout, 9, &all);
    let (ok, serve_out) = finish(server, rx);
    assert!(ok, "{serve_out}");
    assert!(
        serve_out.contains("connected to 127.0.0.1:") && serve_out.contains("PASS: "),
        "{serve_out}"
    );
    // The server prints the client's results too.
    assert_sweep(&serve_out, 9, &serve_out);
}

/// Reads `s` until end of stream (or a reset) or `limit`: what arrived, and whether it ended.
fn read_until_closed(s: &mut std::net::TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return (got, true),
        }
    }
    (got, false)
}

#[test]
fn serve_ignores_stray_clients_and_serves_the_real_peer() {
    use std::io::Write;
    use std::net::TcpStream;
    let (server, rx, port) = start_server_with(&["serve", "--bind", "127.0.0.1:0", "--wait", "60", "--timeout", "3"]);
    let addr = format!("127.0.0.1:{port}");
    let mut garbage = TcpStream::connect(&addr).unwrap();
    garbage.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut half = TcpStream::connect(&addr).unwrap();
    half.write_all(b"tcpxshim\x01\x00").unwrap();
    let mut silent = TcpStream::connect(&addr).unwrap();
    let strays = [&garbage, &half, &silent].map(|s| s.local_addr().unwrap());
    let (got, ended) = read_until_closed(&mut garbage, Duration::from_secs(30));
    assert!(ended && got.is_empty(), "garbage client: {got:?}, closed {ended}");
    drop(half);
    let start = Instant::now();
    let (got, ended) = read_until_closed(&mut silent, Duration::from_secs(30));
    assert!(ended && got.is_empty(), "silent client: {got:?}, closed {ended}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "silent client held {:?}",
        start.elapsed()
    );
    let out = run(cmd(&[
        "connect",
        &addr,
        "--max-size",
        "4K",
        "--iters",
        "5",
        "--timeout",
        "30",
    ]));
    assert!(out.status.success(), "{}", text(&out));
    let (ok, serve_out) = finish(server, rx);
    assert!(ok, "{serve_out}");
    assert!(serve_out.contains("PASS: "), "{serve_out}");
    let warns: Vec<&str> = serve_out
        .lines()
        .filter(|l| l.contains("ignored a bootstrap connection"))
        .collect();
    assert_eq!(warns.len(), 3, "one WARN per stray client: {serve_out}");
    for (who, why) in strays
        .iter()
        .zip(["not a tcpxshim endpoint", "closed the connection after 10", "sent 0 of"])
    {
        assert!(
            warns
                .iter()
                .any(|w| w.contains(&format!("from {who}:")) && w.contains(why) && w.contains("WARN")),
            "no WARN for {who} ({why}): {warns:?}"
        );
    }
}

#[test]
fn connect_started_before_serve_waits_for_it() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let client = Guard::spawn(cmd(&[
        "connect",
        &addr,
        "--max-size",
        "4K",
        "--iters",
        "5",
        "--timeout",
        "30",
    ]));
    std::thread::sleep(Duration::from_millis(700));
    let bind = addr.clone();
    let server = Guard::spawn(cmd(&["serve", "--bind", &bind, "--wait", "30", "--timeout", "30"]));
    let out = client.wait(LIMIT);
    assert!(out.status.success(), "{}", text(&out));
    let sout = server.wait(LIMIT);
    assert!(sout.status.success(), "{}", text(&sout));
}

#[test]
fn connect_to_nothing_fails_within_the_timeout() {
    let port = free_port();
    let start = Instant::now();
    let out = run(cmd(&["connect", &format!("127.0.0.1:{port}"), "--timeout", "2"]));
    let took = start.elapsed();
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(took < Duration::from_secs(20), "took {took:?}: {all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("connect to 127.0.0.1:{port}")), "{all}");
    assert!(
        stderr.contains("connection refused") && stderr.contains("tcpxshim serve"),
        "{all}"
    );
    assert!(stderr.contains("2.0 s"), "names the timeout: {all}");
}

#[test]
fn connect_to_a_foreign_server_is_named() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        use std::io::Write;
        if let Ok((mut s, _)) = l.accept() {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n");
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let out = run(cmd(&["connect", &addr.to_string(), "--timeout", "10"]));
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a tcpxshim endpoint"),
        "{all}"
    );
    t.join().unwrap();
}

#[test]
fn bad_arguments_are_rejected() {
    let out = run(cmd(&["connect", "127.0.0.1:1", "--max-size", "12Q"]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown unit"),
        "{}",
        text(&out)
    );
    let out = run(cmd(&["demo", "--depth", "9"]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("depth 9 is out of range"),
        "{}",
        text(&out)
    );
}
