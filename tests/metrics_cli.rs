//! `tcpxshim metrics serve`, `tcpxshim stats` and `tcpxshim top` against metrics files written
//! here in the plugin's format: served over loopback to a real HTTP client and parsed as
//! Prometheus text; tables read from stdout; the live view run in a detached tmux session and read
//! from its screen. All waits are bounded; children are killed if a test fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

const BIN: &str = env!("CARGO_BIN_EXE_tcpxshim");
/// Upper bound for any one wait (debug build, 2 shared cores).
const LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The files: a generator of the plugin's format.

/// The numbers of one connection.
#[derive(Clone)]
struct Conn {
    dir: &'static str,
    peer: u32,
    bytes: u64,
    messages: u64,
    in_flight: u32,
    errors: u32,
    stalled: u32,
    /// Cumulative request counts per bucket bound (`BOUNDS`), the `+Inf` bucket being `messages`.
    buckets: [u64; 7],
}

/// The histogram's bucket bounds, 1e-5 .. 10 s.
const BOUNDS: [&str; 7] = ["1e-05", "0.0001", "0.001", "0.01", "0.1", "1", "10"];
const SIZES: [&str; 5] = ["le4KiB", "le64KiB", "le1MiB", "le16MiB", "gt16MiB"];

/// One process's file (`rank` on host `host`), as the shim writes it.
fn prom(host: &str, rank: u32, start: Option<f64>, conns: &[Conn]) -> String {
    let base = format!("rank=\"{rank}\",local_rank=\"{rank}\",host=\"{host}\"");
    let conn_labels = |c: &Conn| {
        format!(
            "{base},comm=\"0x5a{rank}\",dir=\"{}\",peer=\"{}\",dev=\"0\",transport=\"tcpx\"",
            c.dir, c.peer
        )
    };
    let mut s = String::new();
    if let Some(t) = start {
        s.push_str(&format!(
            "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n\
             # TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {t}\n"
        ));
    }
    let mut family = |name: &str, kind: &str, help: &str, value: &dyn Fn(&Conn) -> String| {
        s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for c in conns {
            s.push_str(&format!("{name}{{{}}} {}\n", conn_labels(c), value(c)));
        }
    };
    family("tcpxshim_bytes_total", "counter", "Payload bytes completed.", &|c| {
        c.bytes.to_string()
    });
    family("tcpxshim_messages_total", "counter", "Messages completed.", &|c| {
        c.messages.to_string()
    });
    family(
        "tcpxshim_requests_in_flight",
        "gauge",
        "Requests posted, not yet complete.",
        &|c| c.in_flight.to_string(),
    );
    family("tcpxshim_errors_total", "counter", "Failed calls and requests.", &|c| {
        c.errors.to_string()
    });
    family("tcpxshim_recoveries_total", "counter", "Recovered failures.", &|_| {
        "0".into()
    });
    family(
        "tcpxshim_last_progress_age_seconds",
        "gauge",
        "Seconds since a request last progressed.",
        &|_| "0.25".into(),
    );
    family(
        "tcpxshim_stalled_requests",
        "gauge",
        "Requests without progress.",
        &|c| c.stalled.to_string(),
    );
    s.push_str(
        "# HELP tcpxshim_request_duration_seconds Request durations.\n\
         # TYPE tcpxshim_request_duration_seconds histogram\n",
    );
    for c in conns {
        let l = conn_labels(c);
        // All requests in the first size class; the others empty.
        for (i, size) in SIZES.iter().enumerate() {
            let n = |v: u64| if i == 0 { v } else { 0 };
            for (b, le) in BOUNDS.iter().enumerate() {
                s.push_str(&format!(
                    "tcpxshim_request_duration_seconds_bucket{{{l},size=\"{size}\",le=\"{le}\"}} {}\n",
                    n(c.buckets[b])
                ));
            }
            s.push_str(&format!(
                "tcpxshim_request_duration_seconds_bucket{{{l},size=\"{size}\",le=\"+Inf\"}} {}\n\
                 tcpxshim_request_duration_seconds_sum{{{l},size=\"{size}\"}} {}\n\
                 tcpxshim_request_duration_seconds_count{{{l},size=\"{size}\"}} {}\n",
                n(c.messages),
                if i == 0 { 0.001 * c.messages as f64 } else { 0.0 },
                n(c.messages)
            ));
        }
    }
    s.push_str(&format!(
        "# HELP tcpxshim_connections Open connections.\n# TYPE tcpxshim_connections gauge\n\
         tcpxshim_connections{{{base}}} {}\n\
         # HELP tcpxshim_connections_opened_total Connections opened.\n\
         # TYPE tcpxshim_connections_opened_total counter\ntcpxshim_connections_opened_total{{{base}}} {}\n\
         # HELP tcpxshim_connect_duration_seconds Connection setup durations.\n\
         # TYPE tcpxshim_connect_duration_seconds histogram\n",
        conns.len(),
        conns.len()
    ));
    for op in ["connect", "accept"] {
        for le in BOUNDS.iter().chain(&["+Inf"]) {
            s.push_str(&format!(
                "tcpxshim_connect_duration_seconds_bucket{{{base},op=\"{op}\",le=\"{le}\"}} 1\n"
            ));
        }
        s.push_str(&format!(
            "tcpxshim_connect_duration_seconds_sum{{{base},op=\"{op}\"}} 0.000005\n\
             tcpxshim_connect_duration_seconds_count{{{base},op=\"{op}\"}} 1\n"
        ));
    }
    s
}

/// Writes `text` as `dir/name` the way the shim does: a temporary name, then a rename;
/// with the given modification time where one is given.
fn write_file(dir: &Path, name: &str, text: &str, mtime: Option<SystemTime>) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    if let Some(t) = mtime {
        std::fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// Rank 0 sends to rank 1: `bytes` bytes in `fast` requests of (10 us, 100 us] and `slow` of
/// (1 ms, 10 ms].
fn send_conn(bytes: u64, fast: u64, slow: u64) -> Conn {
    Conn {
        dir: "send",
        peer: 1,
        bytes,
        messages: fast + slow,
        in_flight: 0,
        errors: 0,
        stalled: 0,
        buckets: [0, fast, fast, fast + slow, fast + slow, fast + slow, fast + slow],
    }
}

/// Rank 1 receives from rank 0, with 3 requests in flight, 2 errors and 1 stalled request.
fn recv_conn(bytes: u64) -> Conn {
    Conn {
        dir: "recv",
        peer: 0,
        bytes,
        messages: 4,
        in_flight: 3,
        errors: 2,
        stalled: 1,
        buckets: [0, 0, 4, 4, 4, 4, 4],
    }
}

/// A fresh directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("tcpxshim-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("metrics")).unwrap();
        TempDir(d)
    }
    fn metrics(&self) -> PathBuf {
        self.0.join("metrics")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const HOST: &str = "node-a";
const MIB: u64 = 1 << 20;

/// Two ranks' first files: rank 0 started 10 s before `t`, 1 MiB sent in 10 fast requests.
fn write_first(dir: &Path, t: SystemTime) {
    let start = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64() - 10.0;
    write_file(
        dir,
        "node-a-100.prom",
        &prom(HOST, 0, Some(start), &[send_conn(MIB, 10, 0)]),
        Some(t),
    );
    write_file(dir, "node-a-101.prom", &prom(HOST, 1, None, &[recv_conn(MIB)]), Some(t));
}

/// Rank 0's next version, 2 s later: 2 MiB more, in 10 slow requests.
fn write_second(dir: &Path, t: SystemTime) {
    let start = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64() - 10.0;
    write_file(
        dir,
        "node-a-100.prom",
        &prom(HOST, 0, Some(start), &[send_conn(3 * MIB, 10, 10)]),
        Some(t + Duration::from_secs(2)),
    );
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// A child process killed when the test ends before it does.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to LIMIT for `cond`, polling.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < LIMIT, "timed out after {LIMIT:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `tcpxshim metrics serve DIR --listen 127.0.0.1:0`; returns it and its base URL.
fn start_serve(dir: &Path) -> (Guard, String) {
    let mut child = Command::new(BIN)
        .args(["metrics", "serve"])
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tcpxshim metrics serve");
    let stdout = child.stdout.take().unwrap();
    let guard = Guard(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(LIMIT).expect("serve printed its address");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .trim_end_matches("/metrics")
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    (guard, url)
}

fn get(url: &str) -> (u16, String, String) {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(20)).build();
    match agent.get(url).call() {
        Ok(r) => {
            let ct = r.header("Content-Type").unwrap_or("").to_string();
            (r.status(), ct, r.into_string().unwrap())
        }
        Err(ureq::Error::Status(code, r)) => (code, String::new(), r.into_string().unwrap_or_default()),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

/// Checks the structure that Prometheus requires and `prometheus-parse` does not: each family's
/// `# HELP` and `# TYPE` once, and its series together, right after them.
fn check_families(page: &str) {
    let mut seen = std::collections::HashSet::new();
    let mut current = String::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(seen.insert(name.clone()), "# TYPE {name} twice:\n{page}");
            current = name;
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(!seen.contains(name), "# HELP {name} after its # TYPE or twice:\n{page}");
        } else if !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| *b == current))
                .unwrap_or(name);
            assert_eq!(family, current, "series {name} outside its family:\n{page}");
        }
    }
}

fn scrape(url: &str) -> (String, prometheus_parse::Scrape) {
    let (code, ct, body) = get(&format!("{url}/metrics"));
    assert_eq!(code, 200, "{body}");
    assert!(ct.starts_with("text/plain; version=0.0.4"), "Content-Type {ct:?}");
    check_families(&body);
    let parsed =
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text");
    (body, parsed)
}

/// The value of series `metric` of rank `rank`.
fn value(s: &prometheus_parse::Scrape, metric: &str, rank: &str) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == metric && x.labels.get("rank") == Some(rank))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

// ---------------------------------------------------------------------------------------------
// serve

#[test]
fn serve_merges_every_rank_into_one_page() {
    let tmp = TempDir::new("serve");
    let dir = tmp.metrics();
    write_first(&dir, SystemTime::now());
    let (_serve, url) = start_serve(&dir);
    let (body, s) = scrape(&url);
    assert_eq!(body.matches("# TYPE tcpxshim_bytes_total counter").count(), 1, "{body}");
    assert_eq!(body.matches("# HELP tcpxshim_request_duration_seconds ").count(), 1);
    assert_eq!(value(&s, "tcpxshim_bytes_total", "0"), Some(MIB as f64));
    assert_eq!(value(&s, "tcpxshim_bytes_total", "1"), Some(MIB as f64));
    assert_eq!(value(&s, "tcpxshim_stalled_requests", "1"), Some(1.0));
    assert_eq!(value(&s, "tcpxshim_connections", "0"), Some(1.0));
    // Histograms of both ranks, all five size classes, with their 8 buckets.
    let hists: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.metric == "tcpxshim_request_duration_seconds")
        .collect();
    assert_eq!(hists.len(), 10);
    for h in &hists {
        let prometheus_parse::Value::Histogram(b) = &h.value else {
            panic!("not a histogram: {h:?}")
        };
        assert_eq!(b.len(), 8);
    }
    let connect = s
        .samples
        .iter()
        .filter(|x| x.metric == "tcpxshim_connect_duration_seconds")
        .count();
    assert_eq!(connect, 4, "connect and accept of 2 ranks");
    // The age of each file.
    assert!(body.contains("tcpxshim_metrics_file_age_seconds{file=\"node-a-100.prom\"}"));
    // Other paths.
    assert_eq!(get(&format!("{url}/")).0, 404);
    assert_eq!(get(&format!("{url}/metricsx")).0, 404);
    assert_eq!(get(&format!("{url}/metrics?x=1")).0, 200);
    match ureq::post(&format!("{url}/metrics")).call() {
        Err(ureq::Error::Status(code, _)) => assert_eq!(code, 405),
        other => panic!("POST /metrics: {other:?}"),
    }
}

#[test]
fn serve_follows_files_replaced_while_serving() {
    let tmp = TempDir::new("serve-replace");
    let dir = tmp.metrics();
    write_first(&dir, SystemTime::now());
    let (_serve, url) = start_serve(&dir);
    assert_eq!(value(&scrape(&url).1, "tcpxshim_bytes_total", "0"), Some(MIB as f64));
    write_second(&dir, SystemTime::now());
    assert_eq!(
        value(&scrape(&url).1, "tcpxshim_bytes_total", "0"),
        Some(3.0 * MIB as f64)
    );

    // Rank 1's file replaced over and over while scrapes run: every page is whole and valid.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dir, stop) = (dir.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 5000 {
                n += 1;
                write_file(
                    &dir,
                    "node-a-101.prom",
                    &prom(HOST, 1, None, &[recv_conn(MIB + n)]),
                    None,
                );
            }
            n
        })
    };
    let mut last = 0.0;
    for _ in 0..20 {
        let (_, s) = scrape(&url);
        let v = value(&s, "tcpxshim_bytes_total", "1").expect("rank 1 on every page");
        assert!(v >= last, "went back from {last} to {v}");
        last = v;
        assert_eq!(value(&s, "tcpxshim_bytes_total", "0"), Some(3.0 * MIB as f64));
    }
    stop.store(true, Ordering::Relaxed);
    let n = writer.join().unwrap();
    assert!(n > 0);
    assert_eq!(
        value(&scrape(&url).1, "tcpxshim_bytes_total", "1"),
        Some((MIB + n) as f64)
    );

    // A process that stopped writing: its file stays, and so do its numbers.
    std::thread::sleep(Duration::from_millis(1100));
    let (body, s) = scrape(&url);
    assert_eq!(value(&s, "tcpxshim_bytes_total", "1"), Some((MIB + n) as f64));
    let age = body
        .lines()
        .find(|l| l.starts_with("tcpxshim_metrics_file_age_seconds{file=\"node-a-101.prom\"}"))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("age of rank 1's file");
    assert!(age >= 1.0, "{age}");
}

// ---------------------------------------------------------------------------------------------
// stats

fn stats(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("stats")
        .arg(dir)
        .args(args)
        .output()
        .expect("run tcpxshim stats");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The whitespace-separated cells of the first line whose cells start with `prefix`.
fn row<'a>(text: &'a str, prefix: &[&str]) -> Vec<&'a str> {
    text.lines()
        .map(|l| {
            l.split_whitespace()
                .map(|c| c.trim_matches('│'))
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
        })
        .find(|cells| cells.starts_with(prefix))
        .unwrap_or_else(|| panic!("no row starting {prefix:?} in:\n{text}"))
}

#[test]
fn stats_once_shows_connections_and_ranks() {
    let tmp = TempDir::new("stats-once");
    let dir = tmp.metrics();
    write_first(&dir, SystemTime::now());
    let out = stats(&dir, &["--once"]);
    assert!(out.contains("2 file(s), 2 rank(s), 2 connection(s)"), "{out}");
    assert!(out.contains("* = one read only"), "{out}");
    // rank dir peer comm dev bytes msgs thruput p50 p99 inflight errors stalled
    let r0 = row(&out, &["0", "send", "1", "0x5a0", "0"]);
    assert_eq!(
        r0[5..],
        ["1.00", "MiB", "10", "104.86", "kB/s*", "55.0us*", "99.1us*", "0", "0", "0"],
        "{out}"
    );
    let r1 = row(&out, &["1", "recv", "0", "0x5a1", "0"]);
    assert_eq!(
        r1[5..],
        ["1.00", "MiB", "4", "-", "550.0us*", "991.0us*", "3", "2", "1"],
        "{out}"
    );
    // Per rank: rank local host pid conns opened sent recvd send/s recv/s inflight errors stalled
    let t1 = row(&out, &["1", "1", "node-a", "101"]);
    assert_eq!(
        t1[4..],
        ["1", "1", "0", "B", "1.00", "MiB", "0", "B/s*", "-", "3", "2", "1"],
        "{out}"
    );
}

#[test]
fn stats_measures_over_the_interval() {
    let tmp = TempDir::new("stats-interval");
    let dir = tmp.metrics();
    let t = SystemTime::now();
    write_first(&dir, t);
    let child = Command::new(BIN)
        .arg("stats")
        .arg(&dir)
        .args(["--interval", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    write_second(&dir, t);
    let out = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.contains("over the interval"), "{out}");
    // 2 MiB in the 2 s between the versions; the 10 slow requests of the interval only.
    let r0 = row(&out, &["0", "send", "1"]);
    assert_eq!(
        r0[5..],
        ["3.00", "MiB", "20", "1.05", "MB/s", "5.50ms", "9.91ms", "0", "0", "0"],
        "{out}"
    );
    // Rank 1's file did not change: measured since start, marked.
    let r1 = row(&out, &["1", "recv", "0"]);
    assert_eq!(r1[8], "-", "{out}");
}

// ---------------------------------------------------------------------------------------------
// top, in tmux

/// A tmux server of its own (socket name), killed at the end.
struct Tmux(String);

impl Tmux {
    fn new(tag: &str) -> Tmux {
        let ok = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "tmux is not installed: the tests of `tcpxshim top` run it in tmux (scripts/test.sh installs it; or \
             apt-get install tmux)"
        );
        Tmux(format!("tcpxshim-{tag}-{}", std::process::id()))
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.0)
            .args(args)
            .env("TERM", "xterm-256color")
            .output()
            .expect("run tmux")
    }

    fn ok(&self, args: &[&str]) {
        let o = self.cmd(args);
        assert!(
            o.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    /// Waits for a screen that satisfies `cond`; returns it.
    fn wait_screen(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if cond(&s) {
                return s;
            }
            assert!(
                start.elapsed() < LIMIT,
                "timed out waiting for {what}; the screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

/// Starts `tcpxshim top DIR` in a detached 150x30 session `top`; its exit status goes to
/// `exit_file`, and the pane stays after the exit so that the screen it left can be read.
fn start_top(tmux: &Tmux, dir: &Path, exit_file: &Path) {
    let sh = format!(
        "echo before-top; '{BIN}' top '{}' --interval 0.3; echo exit=$? > '{}'; sleep 60",
        dir.display(),
        exit_file.display()
    );
    tmux.ok(&["new-session", "-d", "-s", "top", "-x", "150", "-y", "30", &sh]);
}

#[test]
fn top_shows_live_numbers_in_tmux_and_quits_on_q() {
    let tmux = Tmux::new("top");
    let tmp = TempDir::new("top");
    let dir = tmp.metrics();
    let exit_file = tmp.0.join("top.exit");
    let t = SystemTime::now();
    write_first(&dir, t);
    start_top(&tmux, &dir, &exit_file);

    let first = tmux.wait_screen("both ranks' rows", |s| s.contains("recv") && s.contains("send"));
    assert!(first.contains("2 file(s), 2 rank(s), 2 connection(s)"), "{first}");
    let r0 = row(&first, &["0", "send", "1", "0x5a0", "0"]);
    assert_eq!(
        r0[5..],
        ["1.00", "MiB", "10", "104.86", "kB/s*", "55.0us*", "99.1us*", "0", "0", "0"],
        "{first}"
    );
    let r1 = row(&first, &["1", "recv", "0", "0x5a1", "0"]);
    assert_eq!(
        r1[r1.len() - 3..],
        ["3", "2", "1"],
        "in flight, errors, stalled:\n{first}"
    );
    let t0 = row(&first, &["0", "0", "node-a", "100"]);
    assert_eq!(t0[6..8], ["1.00", "MiB"], "{first}");

    // A new version of rank 0's file: the numbers of the interval.
    write_second(&dir, t);
    let second = tmux.wait_screen("rank 0's new numbers", |s| s.contains("3.00 MiB"));
    let r0 = row(&second, &["0", "send", "1", "0x5a0", "0"]);
    assert_eq!(
        r0[5..],
        ["3.00", "MiB", "20", "1.05", "MB/s", "5.50ms", "9.91ms", "0", "0", "0"],
        "{second}"
    );
    let t0 = row(&second, &["0", "0", "node-a", "100"]);
    assert_eq!(t0[6..11], ["3.00", "MiB", "0", "B", "1.05"], "{second}");

    // q quits, with status 0, and the terminal is back to the screen from before.
    tmux.ok(&["send-keys", "-t", "top", "q"]);
    wait_for("top to exit after q", || exit_file.exists());
    assert_eq!(std::fs::read_to_string(&exit_file).unwrap().trim(), "exit=0");
    let after = tmux.screen();
    assert!(after.contains("before-top"), "{after}");
    assert!(
        !after.contains("connections"),
        "the view is still on the screen:\n{after}"
    );
}

#[test]
fn top_quits_on_ctrl_c_in_tmux() {
    let tmux = Tmux::new("top-ctrl-c");
    let tmp = TempDir::new("top-ctrl-c");
    let dir = tmp.metrics();
    let exit_file = tmp.0.join("top.exit");
    write_first(&dir, SystemTime::now());
    start_top(&tmux, &dir, &exit_file);
    tmux.wait_screen("the view", |s| s.contains("recv"));
    tmux.ok(&["send-keys", "-t", "top", "C-c"]);
    wait_for("top to exit after Ctrl-C", || exit_file.exists());
    assert_eq!(std::fs::read_to_string(&exit_file).unwrap().trim(), "exit=0");
    assert!(tmux.screen().contains("before-top"));
}
