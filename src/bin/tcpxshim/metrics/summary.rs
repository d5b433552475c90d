//! From metrics files to the rows of `tcpxshim stats` and `tcpxshim top`: per connection and per
//! rank, with throughput and latency quantiles over the interval between two versions of a file
//! or, where there is only one version, since the writing process started.

use super::File;
use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

/// What identifies a connection's series: the labels they all have.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey {
    /// The rank as a number, for ordering (`i64::MAX` when it is not one).
    pub rank_num: i64,
    /// Label `rank`.
    pub rank: String,
    /// Label `host`.
    pub host: String,
    /// Label `local_rank`.
    pub local_rank: String,
    /// Label `comm`.
    pub comm: String,
    /// Label `dir`: `send` or `recv`.
    pub dir: String,
    /// The peer as a number, for ordering.
    pub peer_num: i64,
    /// Label `peer`.
    pub peer: String,
    /// Label `dev`.
    pub dev: String,
    /// Label `transport`.
    pub transport: String,
}

/// What identifies a rank: the labels of the per-process series.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RankKey {
    /// The rank as a number, for ordering.
    pub rank_num: i64,
    /// Label `rank`.
    pub rank: String,
    /// Label `host`.
    pub host: String,
    /// Label `local_rank`.
    pub local_rank: String,
}

fn num(s: &str) -> i64 {
    s.parse().unwrap_or(i64::MAX)
}

fn label(s: &super::text::Sample, k: &str) -> String {
    s.label(k).unwrap_or("").to_string()
}

impl ConnKey {
    fn of(s: &super::text::Sample) -> ConnKey {
        ConnKey {
            rank_num: num(s.label("rank").unwrap_or("")),
            rank: label(s, "rank"),
            host: label(s, "host"),
            local_rank: label(s, "local_rank"),
            comm: label(s, "comm"),
            dir: label(s, "dir"),
            peer_num: num(s.label("peer").unwrap_or("")),
            peer: label(s, "peer"),
            dev: label(s, "dev"),
            transport: label(s, "transport"),
        }
    }

    /// The rank this connection belongs to.
    pub fn rank_key(&self) -> RankKey {
        RankKey {
            rank_num: self.rank_num,
            rank: self.rank.clone(),
            host: self.host.clone(),
            local_rank: self.local_rank.clone(),
        }
    }
}

impl RankKey {
    fn of(s: &super::text::Sample) -> RankKey {
        RankKey {
            rank_num: num(s.label("rank").unwrap_or("")),
            rank: label(s, "rank"),
            host: label(s, "host"),
            local_rank: label(s, "local_rank"),
        }
    }
}

/// A cumulative histogram: `(upper bound, count of observations <= bound)`, ascending.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hist {
    /// Buckets, `+Inf` last where present.
    pub buckets: Vec<(f64, f64)>,
    /// Sum of the observations.
    pub sum: f64,
    /// Number of observations.
    pub count: f64,
}

impl Hist {
    /// Adds `count` to the bucket bounded by `le` (buckets of several series with the same
    /// bounds add up).
    fn add_bucket(&mut self, le: f64, count: f64) {
        match self.buckets.iter_mut().find(|(b, _)| *b == le) {
            Some((_, c)) => *c += count,
            None => {
                self.buckets.push((le, count));
                self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
        }
    }

    /// The observations of `self` that `prev` (an earlier reading of the same series) lacks.
    pub fn since(&self, prev: &Hist) -> Hist {
        let before = |le: f64| prev.buckets.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, c)| *c);
        Hist {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, c)| (le, (c - before(le)).max(0.0)))
                .collect(),
            sum: (self.sum - prev.sum).max(0.0),
            count: (self.count - prev.count).max(0.0),
        }
    }

    /// The `q` quantile (0..=1), estimated as Prometheus' `histogram_quantile` does: linear
    /// interpolation inside the bucket that holds it, the first bucket starting at 0; a quantile
    /// in the `+Inf` bucket is the largest finite bound. `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last().map_or(0.0, |b| b.1).max(self.count);
        if total <= 0.0 || self.buckets.is_empty() {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let mut lower = 0.0;
        let mut below = 0.0;
        for &(le, cum) in &self.buckets {
            if cum >= rank && cum > below {
                if le.is_infinite() {
                    return Some(lower);
                }
                return Some(lower + (le - lower) * (rank - below) / (cum - below));
            }
            if le.is_finite() {
                lower = le;
            }
            below = cum;
        }
        // Observations above every bound but no `+Inf` bucket: the largest bound.
        Some(lower)
    }
}

/// One connection as a file reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Conn {
    /// `tcpxshim_bytes_total`.
    pub bytes: f64,
    /// `tcpxshim_messages_total`.
    pub messages: f64,
    /// `tcpxshim_requests_in_flight`.
    pub in_flight: f64,
    /// `tcpxshim_errors_total`.
    pub errors: f64,
    /// `tcpxshim_recoveries_total`.
    pub recoveries: f64,
    /// `tcpxshim_last_progress_age_seconds`.
    pub progress_age: Option<f64>,
    /// `tcpxshim_stalled_requests`.
    pub stalled: f64,
    /// `tcpxshim_request_duration_seconds`, all sizes together.
    pub latency: Hist,
}

/// One rank's per-process numbers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rank {
    /// `tcpxshim_connections`.
    pub connections: Option<f64>,
    /// `tcpxshim_connections_opened_total`.
    pub opened: Option<f64>,
    /// `tcpxshim_connect_duration_seconds`, connect and accept together.
    pub connect: Hist,
}

/// The numbers of one file.
#[derive(Clone, Debug)]
pub struct FileSummary {
    /// File name.
    pub name: String,
    /// The writer's pid (from the name).
    pub pid: Option<u32>,
    /// When it was written.
    pub mtime: SystemTime,
    /// When the writer started (`process_start_time_seconds` in the file, or /proc where the
    /// process runs on this host), if known.
    pub started: Option<SystemTime>,
    /// Its connections.
    pub conns: BTreeMap<ConnKey, Conn>,
    /// Its ranks (normally one).
    pub ranks: BTreeMap<RankKey, Rank>,
}

impl FileSummary {
    /// Summarises one file.
    pub fn of(file: &File) -> FileSummary {
        let mut conns: BTreeMap<ConnKey, Conn> = BTreeMap::new();
        let mut ranks: BTreeMap<RankKey, Rank> = BTreeMap::new();
        let mut started = None;
        for s in file.parsed.samples() {
            let v = s.value;
            let name = s.name.as_str();
            if name == "process_start_time_seconds" && v.is_finite() && v > 0.0 {
                started = Some(UNIX_EPOCH + std::time::Duration::from_secs_f64(v));
                continue;
            }
            let Some(metric) = name.strip_prefix("tcpxshim_") else {
                continue;
            };
            match metric {
                "connections" => ranks.entry(RankKey::of(s)).or_default().connections = Some(v),
                "connections_opened_total" => ranks.entry(RankKey::of(s)).or_default().opened = Some(v),
                "connect_duration_seconds_bucket" => {
                    if let Some(le) = s.label("le").and_then(le_value) {
                        ranks.entry(RankKey::of(s)).or_default().connect.add_bucket(le, v);
                    }
                }
                "connect_duration_seconds_sum" => ranks.entry(RankKey::of(s)).or_default().connect.sum += v,
                "connect_duration_seconds_count" => ranks.entry(RankKey::of(s)).or_default().connect.count += v,
                _ => {
                    let c = || ConnKey::of(s);
                    match metric {
                        "bytes_total" => conns.entry(c()).or_default().bytes = v,
                        "messages_total" => conns.entry(c()).or_default().messages = v,
                        "requests_in_flight" => conns.entry(c()).or_default().in_flight = v,
                        "errors_total" => conns.entry(c()).or_default().errors = v,
                        "recoveries_total" => conns.entry(c()).or_default().recoveries = v,
                        "last_progress_age_seconds" => conns.entry(c()).or_default().progress_age = Some(v),
                        "stalled_requests" => conns.entry(c()).or_default().stalled = v,
                        "request_duration_seconds_bucket" => {
                            if let Some(le) = s.label("le").and_then(le_value) {
                                conns.entry(c()).or_default().latency.add_bucket(le, v);
                            }
                        }
                        "request_duration_seconds_sum" => conns.entry(c()).or_default().latency.sum += v,
                        "request_duration_seconds_count" => conns.entry(c()).or_default().latency.count += v,
                        _ => {}
                    }
                }
            }
        }
        for k in conns.keys() {
            ranks.entry(k.rank_key()).or_default();
        }
        let started = started.or_else(|| match (&file.host, file.pid) {
            (Some(h), Some(pid)) if is_this_host(h) => proc_start(pid),
            _ => None,
        });
        FileSummary {
            name: file.name.clone(),
            pid: file.pid,
            mtime: file.mtime,
            started: started.filter(|s| *s <= file.mtime),
            conns,
            ranks,
        }
    }
}

fn le_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        _ => s.parse().ok(),
    }
}

/// This machine's host name.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
}

/// True when `host` (from a file name) names this machine, in full or by its first label.
fn is_this_host(host: &str) -> bool {
    hostname().is_some_and(|h| h == host || h.split('.').next() == Some(host) || host.split('.').next() == Some(&h))
}

/// When process `pid` started, from /proc (`starttime` in clock ticks of 1/100 s after boot).
fn proc_start(pid: u32) -> Option<SystemTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields after the command: state is field 3 of the line, starttime field 22.
    let ticks: u64 = after_comm.split_whitespace().nth(19)?.parse().ok()?;
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok()))?;
    Some(UNIX_EPOCH + std::time::Duration::from_secs(btime) + std::time::Duration::from_millis(ticks * 10))
}

/// How a row's throughput and latency were measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    /// Between two versions of the file: the numbers of that interval.
    Interval,
    /// One version only: since the writing process started (throughput) and all requests ever
    /// (latency).
    SinceStart,
}

/// One row of the connection table.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnRow {
    /// The connection.
    pub key: ConnKey,
    /// Its latest numbers.
    pub now: Conn,
    /// Bytes per second, if known.
    pub rate: Option<f64>,
    /// Latency quantiles of the requests measured.
    pub p50: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// How `rate` and the quantiles were measured.
    pub basis: Basis,
}

/// Totals of one rank.
#[derive(Clone, Debug, PartialEq)]
pub struct RankRow {
    /// The rank.
    pub key: RankKey,
    /// Its process's numbers.
    pub rank: Rank,
    /// The file it came from.
    pub file: String,
    /// The writer's pid.
    pub pid: Option<u32>,
    /// Seconds since the file was written.
    pub age: f64,
    /// Connections (rows) and their totals per direction.
    pub conns: usize,
    /// Bytes sent and received.
    pub bytes: [f64; 2],
    /// Send and receive throughput, if known for every connection.
    pub rate: [Option<f64>; 2],
    /// Requests in flight, errors and stalled requests over all connections.
    pub in_flight: f64,
    /// Errors.
    pub errors: f64,
    /// Stalled requests.
    pub stalled: f64,
    /// SinceStart when any connection's numbers are.
    pub basis: Basis,
}

/// The tables of a set of files.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// One row per connection, by rank.
    pub conns: Vec<ConnRow>,
    /// One row per rank.
    pub ranks: Vec<RankRow>,
    /// Files summarised.
    pub files: usize,
}

fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    b.duration_since(a).map_or(0.0, |d| d.as_secs_f64())
}

/// Builds the view of `cur` (each file's latest version). `prev` holds, for files that have one,
/// an earlier version (older `mtime`): their rows are measured over the interval between the two.
/// Other files' rows are measured since their writer started.
pub fn view(cur: &[FileSummary], prev: &HashMap<String, FileSummary>, now: SystemTime) -> View {
    let mut out = View {
        files: cur.len(),
        ..View::default()
    };
    for f in cur {
        let before = prev.get(&f.name).filter(|p| p.mtime < f.mtime);
        let mut rows = Vec::new();
        for (key, c) in &f.conns {
            let (rate, hist, basis) = match before {
                Some(p) => {
                    let dt = secs_between(p.mtime, f.mtime);
                    let old = p.conns.get(key).cloned().unwrap_or_default();
                    let rate = (dt > 0.0).then(|| (c.bytes - old.bytes).max(0.0) / dt);
                    (rate, c.latency.since(&old.latency), Basis::Interval)
                }
                None => {
                    let rate = f
                        .started
                        .map(|s| secs_between(s, f.mtime))
                        .filter(|&dt| dt > 0.0)
                        .map(|dt| c.bytes / dt);
                    (rate, c.latency.clone(), Basis::SinceStart)
                }
            };
            rows.push(ConnRow {
                key: key.clone(),
                now: c.clone(),
                rate,
                p50: hist.quantile(0.5),
                p99: hist.quantile(0.99),
                basis,
            });
        }
        for (key, r) in &f.ranks {
            let mine: Vec<&ConnRow> = rows.iter().filter(|c| c.key.rank_key() == *key).collect();
            let mut row = RankRow {
                key: key.clone(),
                rank: r.clone(),
                file: f.name.clone(),
                pid: f.pid,
                age: secs_between(f.mtime, now),
                conns: mine.len(),
                bytes: [0.0; 2],
                rate: [Some(0.0); 2],
                in_flight: 0.0,
                errors: 0.0,
                stalled: 0.0,
                basis: if before.is_some() {
                    Basis::Interval
                } else {
                    Basis::SinceStart
                },
            };
            for c in mine {
                let d = usize::from(c.key.dir == "recv");
                row.bytes[d] += c.now.bytes;
                row.rate[d] = row.rate[d].zip(c.rate).map(|(a, b)| a + b);
                row.in_flight += c.now.in_flight;
                row.errors += c.now.errors;
                row.stalled += c.now.stalled;
            }
            out.ranks.push(row);
        }
        out.conns.extend(rows);
    }
    out.conns.sort_by(|a, b| a.key.cmp(&b.key));
    out.ranks.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// The earlier versions to measure the latest against: for each file of `cur` a version of
/// `prev` or `kept` (the one before that) that is older. Used by `top`, which keeps, per file, the
/// last version that differs from the current one.
pub fn advance(kept: &mut HashMap<String, (Option<FileSummary>, FileSummary)>, cur: Vec<FileSummary>) {
    let names: std::collections::HashSet<String> = cur.iter().map(|f| f.name.clone()).collect();
    kept.retain(|n, _| names.contains(n));
    for f in cur {
        match kept.remove(&f.name) {
            Some((old, last)) if last.mtime == f.mtime => {
                kept.insert(f.name.clone(), (old, f));
            }
            Some((_, last)) => {
                kept.insert(f.name.clone(), (Some(last), f));
            }
            None => {
                kept.insert(f.name.clone(), (None, f));
            }
        }
    }
}

/// The view of what [`advance`] kept.
pub fn view_kept(kept: &HashMap<String, (Option<FileSummary>, FileSummary)>, now: SystemTime) -> View {
    let cur: Vec<FileSummary> = kept.values().map(|(_, c)| c.clone()).collect();
    let prev: HashMap<String, FileSummary> = kept
        .iter()
        .filter_map(|(n, (p, _))| p.clone().map(|p| (n.clone(), p)))
        .collect();
    view(&cur, &prev, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::text;
    use std::time::Duration;

    fn hist(b: &[(f64, f64)]) -> Hist {
        Hist {
            buckets: b.to_vec(),
            sum: 0.0,
            count: b.last().map_or(0.0, |x| x.1),
        }
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let h = hist(&[(0.001, 50.0), (0.01, 90.0), (0.1, 100.0), (f64::INFINITY, 100.0)]);
        assert!((h.quantile(0.5).unwrap() - 0.001).abs() < 1e-12);
        assert!((h.quantile(0.25).unwrap() - 0.0005).abs() < 1e-12);
        // 70th percentile: 20 of the 40 observations in (0.001, 0.01].
        assert!((h.quantile(0.7).unwrap() - 0.0055).abs() < 1e-12);
        assert!((h.quantile(0.99).unwrap() - 0.091).abs() < 1e-12);
        assert_eq!(hist(&[(0.001, 0.0), (f64::INFINITY, 0.0)]).quantile(0.5), None);
        // In the +Inf bucket: the largest finite bound.
        assert_eq!(hist(&[(1.0, 0.0), (f64::INFINITY, 3.0)]).quantile(0.5), Some(1.0));
    }

    #[test]
    fn since_subtracts_an_earlier_reading() {
        let a = hist(&[(0.001, 5.0), (f64::INFINITY, 6.0)]);
        let b = hist(&[(0.001, 5.0), (f64::INFINITY, 10.0)]);
        let d = b.since(&a);
        assert_eq!(d.buckets, vec![(0.001, 0.0), (f64::INFINITY, 4.0)]);
        assert_eq!(d.count, 4.0);
    }

    const L: &str = r#"rank="3",local_rank="1",host="h",comm="0xc",dir="send",peer="4",dev="0",transport="tcpx""#;

    fn file(text: &str, mtime: SystemTime) -> File {
        File {
            name: "h-1.prom".into(),
            host: Some("elsewhere-not-this-host".into()),
            pid: Some(1),
            mtime,
            parsed: text::parse(text),
        }
    }

    fn body(bytes: u64, fast: u64, slow: u64) -> String {
        let mut s = format!(
            "# TYPE tcpxshim_bytes_total counter\ntcpxshim_bytes_total{{{L}}} {bytes}\n\
             tcpxshim_messages_total{{{L}}} {}\ntcpxshim_requests_in_flight{{{L}}} 2\n\
             tcpxshim_errors_total{{{L}}} 1\ntcpxshim_stalled_requests{{{L}}} 0\n\
             tcpxshim_connections{{rank=\"3\",local_rank=\"1\",host=\"h\"}} 2\n\
             # TYPE tcpxshim_request_duration_seconds histogram\n",
            fast + slow
        );
        // Two size classes: their buckets add up.
        for (size, n) in [("le4KiB", fast), ("gt16MiB", slow)] {
            let (a, b) = if size == "le4KiB" { (n, n) } else { (0, n) };
            s.push_str(&format!(
                "tcpxshim_request_duration_seconds_bucket{{{L},size=\"{size}\",le=\"0.0001\"}} {a}\n\
                 tcpxshim_request_duration_seconds_bucket{{{L},size=\"{size}\",le=\"0.1\"}} {b}\n\
                 tcpxshim_request_duration_seconds_bucket{{{L},size=\"{size}\",le=\"+Inf\"}} {b}\n\
                 tcpxshim_request_duration_seconds_count{{{L},size=\"{size}\"}} {n}\n"
            ));
        }
        s
    }

    #[test]
    fn summarises_a_file() {
        let t = UNIX_EPOCH + Duration::from_secs(1000);
        let f = FileSummary::of(&file(
            &format!("process_start_time_seconds 990\n{}", body(4096, 10, 0)),
            t,
        ));
        assert_eq!(f.conns.len(), 1);
        let (k, c) = f.conns.iter().next().unwrap();
        assert_eq!((k.rank.as_str(), k.dir.as_str(), k.peer.as_str()), ("3", "send", "4"));
        assert_eq!((c.bytes, c.messages, c.in_flight, c.errors), (4096.0, 10.0, 2.0, 1.0));
        assert_eq!(c.latency.count, 10.0);
        assert_eq!(f.ranks.len(), 1);
        assert_eq!(f.ranks.values().next().unwrap().connections, Some(2.0));
        let v = view(&[f], &HashMap::new(), t + Duration::from_secs(2));
        assert_eq!(v.conns[0].basis, Basis::SinceStart);
        assert_eq!(v.conns[0].rate, Some(409.6));
        assert!(v.conns[0].p50.unwrap() <= 0.0001);
        assert_eq!(v.ranks[0].conns, 1);
        assert_eq!(v.ranks[0].bytes, [4096.0, 0.0]);
        assert_eq!(v.ranks[0].age, 2.0);
    }

    #[test]
    fn measures_between_two_versions() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1000);
        let t1 = t0 + Duration::from_secs(2);
        let a = FileSummary::of(&file(&body(1000, 10, 0), t0));
        let b = FileSummary::of(&file(&body(5000, 10, 4), t1));
        let mut kept = HashMap::new();
        advance(&mut kept, vec![a]);
        let v = view_kept(&kept, t1);
        assert_eq!(v.conns[0].basis, Basis::SinceStart);
        assert_eq!(v.conns[0].rate, None, "no start time known");
        advance(&mut kept, vec![b.clone()]);
        advance(&mut kept, vec![b]); // The same version again: the interval stays.
        let v = view_kept(&kept, t1);
        let c = &v.conns[0];
        assert_eq!(c.basis, Basis::Interval);
        assert_eq!(c.rate, Some(2000.0));
        // Only the 4 slow requests of the interval count: p50 in (0.0001, 0.1].
        assert!(c.p50.unwrap() > 0.0001, "{:?}", c.p50);
        assert_eq!(v.ranks[0].rate, [Some(2000.0), Some(0.0)]);
        advance(&mut kept, vec![]);
        assert!(kept.is_empty());
    }
}
