//! `tcpxshim stats DIR`: the connections and ranks of a host's metrics files as tables.

use super::summary::{self, Basis, ConnRow, FileSummary, RankRow, View};
use super::{fmt_bytes, fmt_count, fmt_rate, fmt_secs};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};
use tcpxshim::{Error, Result};

/// Marks a number measured since the writer started rather than over an interval.
fn mark(s: String, basis: Basis) -> String {
    match basis {
        Basis::SinceStart if s != "-" => format!("{s}*"),
        _ => s,
    }
}

/// Header of the connection table.
pub const CONN_HEADER: [&str; 13] = [
    "rank", "dir", "peer", "comm", "dev", "bytes", "msgs", "thruput", "p50", "p99", "inflight", "errors", "stalled",
];
/// Right-aligned columns of the connection table.
pub const CONN_RIGHT: [bool; 13] = [
    true, false, true, false, true, true, true, true, true, true, true, true, true,
];

/// The cells of one connection row.
pub fn conn_cells(c: &ConnRow) -> Vec<String> {
    vec![
        c.key.rank.clone(),
        c.key.dir.clone(),
        c.key.peer.clone(),
        c.key.comm.clone(),
        c.key.dev.clone(),
        fmt_bytes(c.now.bytes),
        fmt_count(c.now.messages),
        mark(fmt_rate(c.rate), c.basis),
        mark(fmt_secs(c.p50), c.basis),
        mark(fmt_secs(c.p99), c.basis),
        fmt_count(c.now.in_flight),
        fmt_count(c.now.errors),
        fmt_count(c.now.stalled),
    ]
}

/// Header of the rank table.
pub const RANK_HEADER: [&str; 13] = [
    "rank", "local", "host", "pid", "conns", "opened", "sent", "recvd", "send/s", "recv/s", "inflight", "errors",
    "stalled",
];
/// Right-aligned columns of the rank table.
pub const RANK_RIGHT: [bool; 13] = [
    true, true, false, true, true, true, true, true, true, true, true, true, true,
];

/// The cells of one rank row.
pub fn rank_cells(r: &RankRow) -> Vec<String> {
    let opt = |v: Option<f64>| v.map_or("-".into(), fmt_count);
    vec![
        r.key.rank.clone(),
        r.key.local_rank.clone(),
        r.key.host.clone(),
        r.pid.map_or("-".into(), |p| p.to_string()),
        opt(r.rank.connections),
        opt(r.rank.opened),
        fmt_bytes(r.bytes[0]),
        fmt_bytes(r.bytes[1]),
        mark(fmt_rate(r.rate[0]), r.basis),
        mark(fmt_rate(r.rate[1]), r.basis),
        fmt_count(r.in_flight),
        fmt_count(r.errors),
        fmt_count(r.stalled),
    ]
}

/// Says how the numbers marked and unmarked were measured.
pub fn legend(v: &View, interval: Option<f64>) -> String {
    let since = v.conns.iter().any(|c| c.basis == Basis::SinceStart);
    let over = v.conns.iter().any(|c| c.basis == Basis::Interval);
    let mut parts = Vec::new();
    if over {
        parts.push(match interval {
            Some(s) => {
                format!("throughput and p50/p99 over the interval between two versions of each file ({s:.1} s apart)")
            }
            None => "throughput and p50/p99 over the interval between the last two versions of each file".into(),
        });
    }
    if since {
        parts.push(
            "* = one read only: throughput is bytes / time since the process started (- when unknown), p50/p99 \
             over all its requests"
                .into(),
        );
    }
    parts.join("; ")
}

/// Prints the tables of `v`.
pub fn print(out: &mut dyn Write, dir: &Path, v: &View, interval: Option<f64>) -> std::io::Result<()> {
    writeln!(
        out,
        "{}: {} file(s), {} rank(s), {} connection(s)",
        dir.display(),
        v.files,
        v.ranks.len(),
        v.conns.len()
    )?;
    let legend = legend(v, interval);
    if !legend.is_empty() {
        writeln!(out, "{legend}")?;
    }
    writeln!(out)?;
    let mut rows = vec![CONN_HEADER.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    rows.extend(v.conns.iter().map(conn_cells));
    crate::print_table(out, &rows, &CONN_RIGHT)?;
    writeln!(out)?;
    writeln!(out, "per rank:")?;
    let mut rows = vec![RANK_HEADER.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    rows.extend(v.ranks.iter().map(rank_cells));
    crate::print_table(out, &rows, &RANK_RIGHT)?;
    for r in v.ranks.iter().filter(|r| r.age > 30.0) {
        writeln!(
            out,
            "note: {} (rank {}) was last written {:.0} s ago (its process may have stopped: final numbers)",
            r.file, r.key.rank, r.age
        )?;
    }
    Ok(())
}

/// Reads and summarises the files of `dir`.
pub fn read(dir: &Path) -> Result<Vec<FileSummary>> {
    Ok(super::read_dir(dir)?.iter().map(FileSummary::of).collect())
}

/// `tcpxshim stats DIR [--once] [--interval SECS]`.
pub fn run(dir: &Path, once: bool, interval: Duration) -> Result<()> {
    let first = read(dir)?;
    if first.is_empty() {
        return Err(Error::invalid_argument(format!(
            "{} holds no metrics files (*.prom): is it the directory the plugin writes its metrics to?",
            dir.display()
        )));
    }
    let (v, shown) = if once {
        (summary::view(&first, &HashMap::new(), SystemTime::now()), None)
    } else {
        std::thread::sleep(interval);
        let second = read(dir)?;
        let prev: HashMap<String, FileSummary> = first.into_iter().map(|f| (f.name.clone(), f)).collect();
        (
            summary::view(&second, &prev, SystemTime::now()),
            Some(interval.as_secs_f64()),
        )
    };
    print(&mut std::io::stdout().lock(), dir, &v, shown).map_err(|e| Error::io("write to stdout", e))
}
