//! The metrics (`NCCL_TCPXSHIM_METRICS_DIR`) over the built-in TCP transport on loopback, in
//! stacks built from configs: exact counters after known transfers, histogram counts, requests in
//! flight and stalled, the final write at the last close, the file read back with a Prometheus
//! text parser, and the summary lines in the log.

mod common;

use common::*;
use prometheus_parse::{Sample, Scrape, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A fresh directory for one test's metrics files.
fn fresh_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tcpxshim-metrics-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The built-in transport on lo with metrics into `dir`, every `interval_s` seconds.
fn config(dir: &Path, interval_s: u64) -> Config {
    let mut c = Config {
        plugin: Some("builtin".into()),
        metrics_dir: Some(dir.to_path_buf()),
        stall_warn: Some(Duration::from_secs(1)),
        ..Config::default()
    };
    c.tcp.ifname = Some("lo".into());
    c.metrics.interval = Duration::from_secs(interval_s);
    c.metrics.rank = "3".into();
    c.metrics.local_rank = "1".into();
    c.metrics.host = "testhost".into();
    c
}

fn file_of(dir: &Path) -> PathBuf {
    dir.join(format!("testhost-{}.prom", std::process::id()))
}

fn scrape(file: &Path) -> Option<Scrape> {
    let text = std::fs::read_to_string(file).ok()?;
    assert!(
        text.contains("# TYPE tcpxshim_bytes_total counter") && !text.contains("# EOF") && text.ends_with('\n'),
        "Prometheus text format, counters' families named as their samples:\n{text}"
    );
    Some(Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("the file parses"))
}

fn number(v: &Value) -> f64 {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => *x,
        other => panic!("not a number: {other:?}"),
    }
}

/// The samples named `name` whose labels include `labels`.
fn find<'a>(s: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    s.samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect()
}

/// The value of the one sample named `name` with `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let f = find(s, name, labels);
    assert_eq!(f.len(), 1, "one {name} {labels:?} sample, got {f:?}");
    number(&f[0].value)
}

/// The value of the one sample named `name` with `labels`, if there is one.
fn try_value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    match find(s, name, labels)[..] {
        [one] => Some(number(&one.value)),
        _ => None,
    }
}

/// Polls the file (bounded) until `f` gives a value.
fn poll_file<T>(file: &Path, what: &str, mut f: impl FnMut(&Scrape) -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = scrape(file).as_ref().and_then(&mut f) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Tests that read the shared log run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn counters_and_histograms_are_exact_and_the_last_close_writes_them() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = fresh_dir("exact");
    let file = file_of(&dir);
    let net = StackNet::build(&config(&dir, 3600));
    let (send, recv) = net.connect_pair(0);
    // The writer thread's first write, when it starts; the next one is an hour away.
    poll_file(&file, "the first write", |_| Some(()));
    let sizes = [100usize, 5000, 70_000, 2 << 20];
    for &n in &sizes {
        net.transfer(send, recv, n);
    }
    let total: usize = sizes.iter().sum();
    let first = std::fs::read_to_string(&file).unwrap();
    let s = scrape(&file).unwrap();
    assert!(
        find(&s, "tcpxshim_messages_total", &[])
            .iter()
            .all(|x| number(&x.value) == 0.0),
        "nothing is written between intervals while comms are open: {first}"
    );

    let mark = in_process_log().mark();
    net.close_send(send).unwrap();
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        first,
        "not written at a close that leaves a comm open"
    );
    net.close_recv(recv).unwrap();
    let log = in_process_log().since(mark);

    let s = scrape(&file).expect("the file is there after the last close");
    let common = [("rank", "3"), ("local_rank", "1"), ("host", "testhost")];
    assert_eq!(value(&s, "tcpxshim_connections", &common), 0.0);
    assert_eq!(value(&s, "tcpxshim_connections_opened_total", &common), 2.0);
    for dir in ["send", "recv"] {
        let l = [
            common[0],
            common[1],
            common[2],
            ("dir", dir),
            ("dev", "0"),
            ("transport", "tcpxshim"),
        ];
        assert_eq!(value(&s, "tcpxshim_bytes_total", &l), total as f64, "{dir} bytes");
        assert_eq!(
            value(&s, "tcpxshim_messages_total", &l),
            sizes.len() as f64,
            "{dir} messages"
        );
        assert_eq!(value(&s, "tcpxshim_requests_in_flight", &l), 0.0);
        assert_eq!(value(&s, "tcpxshim_errors_total", &l), 0.0);
        assert_eq!(value(&s, "tcpxshim_recoveries_total", &l), 0.0);
        assert_eq!(value(&s, "tcpxshim_stalled_requests", &l), 0.0);
        assert!(value(&s, "tcpxshim_last_progress_age_seconds", &l) >= 0.0);
        let b = find(&s, "tcpxshim_bytes_total", &l);
        assert!(
            b[0].labels.get("peer").is_some_and(|p| p.contains("127.0.0.1")),
            "{b:?}"
        );
        // One message per size class; each histogram's count is its class's message count.
        let mut counted = 0.0;
        for class in ["le4KiB", "le64KiB", "le1MiB", "le16MiB"] {
            let mut lc = l.to_vec();
            lc.push(("size", class));
            let n = value(&s, "tcpxshim_request_duration_seconds_count", &lc);
            assert_eq!(n, 1.0, "{dir} {class}");
            counted += n;
            let h = find(&s, "tcpxshim_request_duration_seconds", &lc);
            let Value::Histogram(buckets) = &h[0].value else {
                panic!("{h:?}")
            };
            assert_eq!(buckets.len(), 14, "13 bounds and +Inf");
            assert_eq!(buckets.last().unwrap().count, 1.0);
            assert_eq!(buckets[0].less_than, 1e-5);
            assert_eq!(buckets[12].less_than, 10.0);
        }
        assert_eq!(
            counted,
            sizes.len() as f64,
            "{dir}: histogram counts equal message counts"
        );
        let mut lc = l.to_vec();
        lc.push(("size", "gt16MiB"));
        assert!(find(&s, "tcpxshim_request_duration_seconds_count", &lc).is_empty());
    }
    let comms: std::collections::HashSet<&str> = find(&s, "tcpxshim_bytes_total", &[])
        .iter()
        .filter_map(|x| x.labels.get("comm"))
        .collect();
    assert_eq!(comms.len(), 2, "a comm number per connection");
    for op in ["connect", "accept"] {
        assert_eq!(
            value(&s, "tcpxshim_connect_duration_seconds_count", &[("op", op)]),
            1.0,
            "{op}"
        );
    }
    assert!(
        !std::fs::read_dir(&dir)
            .unwrap()
            .any(|e| e.unwrap().file_name() != file.file_name().unwrap()),
        "only the file itself is left in the directory"
    );

    let summary: Vec<&String> = log.iter().filter(|l| l.contains("metrics summary:")).collect();
    assert_eq!(summary.len(), 2, "a peer line and the total line: {log:?}");
    let human = tcpxshim::metrics::human_bytes(total as u64);
    for l in &summary {
        assert!(
            l.starts_with("INFO") && l.contains("NET/TCPXSHIM"),
            "prefixed as other shim lines: {l}"
        );
        assert!(
            l.contains(&format!("sent {human}")) && l.contains(&format!("received {human}")),
            "{l}"
        );
        assert!(
            l.contains("8 messages on 2 connection(s)") && l.contains("0 errors") && l.contains("p99 <="),
            "{l}"
        );
    }
    assert!(summary[0].contains("peer 127.0.0.1"), "{}", summary[0]);
    assert!(summary[1].contains("total"), "{}", summary[1]);
}

#[test]
fn requests_in_flight_go_up_and_down_and_stalled_ones_are_counted() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = fresh_dir("inflight");
    let file = file_of(&dir);
    let net = StackNet::build(&config(&dir, 1));
    let (send, recv) = net.connect_pair(0);
    let sbuf = AlignedBuf::new(4096);
    let rbuf = AlignedBuf::new(4096);
    let smr = net.reg_buf(send, &sbuf, PTR_HOST).unwrap();
    let rmr = net.reg_buf(recv, &rbuf, PTR_HOST).unwrap();
    let rreq = net.post_recv(recv, rbuf.as_ptr(), 4096, 7, rmr).unwrap();
    let recv_l = [("dir", "recv")];
    poll_file(&file, "a receive in flight, stalled after 1 s", |s| {
        let stalled = try_value(s, "tcpxshim_stalled_requests", &recv_l)?;
        (try_value(s, "tcpxshim_requests_in_flight", &recv_l)? == 1.0 && stalled == 1.0).then_some(())
    });
    let sreq = net.post_send(send, sbuf.as_ptr(), 4096, 7, smr).unwrap();
    let (a, b) = net.wait_both(sreq, rreq).unwrap();
    assert_eq!((a, b), (4096, 4096));
    net.irecv_consumed(recv, rreq).unwrap();
    poll_file(&file, "nothing in flight, one message each way", |s| {
        let done = ["send", "recv"].iter().all(|d| {
            let l = [("dir", *d)];
            try_value(s, "tcpxshim_requests_in_flight", &l) == Some(0.0)
                && try_value(s, "tcpxshim_messages_total", &l) == Some(1.0)
                && try_value(s, "tcpxshim_bytes_total", &l) == Some(4096.0)
                && try_value(s, "tcpxshim_stalled_requests", &l) == Some(0.0)
        });
        done.then_some(())
    });
    net.dereg_mr(send, smr).unwrap();
    net.dereg_mr(recv, rmr).unwrap();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    let s = scrape(&file).unwrap();
    assert_eq!(value(&s, "tcpxshim_connections", &[]), 0.0);
}

#[test]
fn no_metrics_dir_means_no_layer_and_no_file() {
    let dir = fresh_dir("off");
    let mut cfg = config(&dir, 1);
    cfg.metrics_dir = None;
    let net = StackNet::build(&cfg);
    let (send, recv) = net.connect_pair(0);
    net.transfer(send, recv, 1000);
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert!(!dir.exists(), "nothing written without NCCL_TCPXSHIM_METRICS_DIR");
}

#[test]
fn errors_beneath_are_counted_and_summed_up() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = fresh_dir("errors");
    let file = file_of(&dir);
    let mut cfg = config(&dir, 3600);
    cfg.faults = Some(tcpxshim::stack::FaultSpec::parse("break=after:2").unwrap());
    // Without recovery, so that the break reaches the caller (with it: the next test).
    cfg.recovery_engine = false;
    let net = StackNet::build(&cfg);
    let (send, recv) = net.connect_pair(0);
    net.transfer(send, recv, 1000);
    net.transfer(send, recv, 1000);
    assert!(
        net.try_transfer(send, recv, &TransferOpts::new(1000)).is_err(),
        "the third message fails on the broken connection"
    );
    let mark = in_process_log().mark();
    let _ = net.close_send(send);
    let _ = net.close_recv(recv);
    let log = in_process_log().since(mark);
    let s = scrape(&file).unwrap();
    let errors: f64 = ["send", "recv"]
        .iter()
        .map(|d| value(&s, "tcpxshim_errors_total", &[("dir", d)]))
        .sum();
    assert!(errors >= 1.0, "the failed request is counted");
    for d in ["send", "recv"] {
        assert_eq!(value(&s, "tcpxshim_messages_total", &[("dir", d)]), 2.0, "{d}");
        assert_eq!(value(&s, "tcpxshim_bytes_total", &[("dir", d)]), 2000.0, "{d}");
        assert_eq!(value(&s, "tcpxshim_requests_in_flight", &[("dir", d)]), 0.0, "{d}");
    }
    let total = log
        .iter()
        .find(|l| l.contains("metrics summary: total"))
        .unwrap_or_else(|| panic!("no total line in {log:?}"));
    assert!(total.contains(&format!("{errors} errors")), "{total}");
}

#[test]
fn breaks_beneath_that_recovery_mends_are_counted_as_recoveries_not_errors() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = fresh_dir("recoveries");
    let file = file_of(&dir);
    let mut cfg = config(&dir, 3600);
    // Each inner connection breaks after its 2nd message; the recovery engine (on by default)
    // makes it again each time.
    cfg.faults = Some(tcpxshim::stack::FaultSpec::parse("break=after:2").unwrap());
    cfg.ctrl_addr = Some(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    assert!(cfg.recovery_engine, "recovery is on by default");
    let net = StackNet::build(&cfg);
    let (send, recv) = net.connect_pair(0);
    for i in 0..6 {
        net.transfer(send, recv, 1000 + i);
    }
    let recovered = net.shim.recoveries();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    let s = scrape(&file).unwrap();
    let sum = |name: &str| -> f64 { ["send", "recv"].iter().map(|d| value(&s, name, &[("dir", d)])).sum() };
    assert!(recovered >= 2, "the engines recovered {recovered} times");
    assert_eq!(
        sum("tcpxshim_recoveries_total"),
        recovered as f64,
        "the counters follow the engines"
    );
    assert_eq!(sum("tcpxshim_errors_total"), 0.0, "no error reached the caller");
    for d in ["send", "recv"] {
        assert_eq!(value(&s, "tcpxshim_messages_total", &[("dir", d)]), 6.0, "{d}");
        assert_eq!(
            value(&s, "tcpxshim_bytes_total", &[("dir", d)]),
            (0..6).map(|i| 1000.0 + i as f64).sum::<f64>(),
            "{d}"
        );
    }
}

/// The files as node_exporter's textfile collector reads them (the way the README tells users to
/// collect them): no scrape error, counters and histograms typed as such, the exact byte counts.
/// scripts/test.sh installs Debian's prometheus-node-exporter for this test.
#[test]
fn node_exporter_reads_the_files_as_typed_metrics() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = fresh_dir("node-exporter");
    let net = StackNet::build(&config(&dir, 3600));
    let (send, recv) = net.connect_pair(0);
    net.transfer(send, recv, 12_345);
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    assert!(file_of(&dir).exists(), "the last close wrote the file");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let exe = ["prometheus-node-exporter", "node_exporter"]
        .into_iter()
        .find(|e| std::process::Command::new(e).arg("--version").output().is_ok())
        .expect("node_exporter is not installed (scripts/test.sh installs prometheus-node-exporter)");
    let mut child = std::process::Command::new(exe)
        .args(["--collector.disable-defaults", "--collector.textfile"])
        .arg(format!("--collector.textfile.directory={}", dir.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start node_exporter");
    let url = format!("http://127.0.0.1:{port}/metrics");
    let start = Instant::now();
    let page = loop {
        match ureq::get(&url).timeout(Duration::from_secs(2)).call() {
            Ok(r) => break r.into_string().expect("a text page"),
            Err(_) if start.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                let _ = child.kill();
                panic!("node_exporter did not answer on {url}: {e}");
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        page.contains("node_textfile_scrape_error 0"),
        "node_exporter read the file without error:\n{page}"
    );
    for (family, kind) in [
        ("tcpxshim_bytes_total", "counter"),
        ("tcpxshim_messages_total", "counter"),
        ("tcpxshim_connections_opened_total", "counter"),
        ("tcpxshim_request_duration_seconds", "histogram"),
        ("tcpxshim_requests_in_flight", "gauge"),
    ] {
        assert!(
            page.contains(&format!("# TYPE {family} {kind}")),
            "{family} is a {kind}:\n{page}"
        );
    }
    let s = Scrape::parse(page.lines().map(|l| Ok(l.to_string()))).expect("node_exporter's page parses");
    for d in ["send", "recv"] {
        assert_eq!(
            value(&s, "tcpxshim_bytes_total", &[("dir", d)]),
            12_345.0,
            "{d} bytes through node_exporter"
        );
    }
}
