//! `tcpxshim drop`: shuts down another process's established TCP connections from outside it
//! (see `tcpxshim::sockdrop`), once or every few seconds, printing one line per connection.

use std::io::Write;
use std::time::{Duration, Instant};
use tcpxshim::Result;

/// Drops the connections of `pid` (those with a port in `filter`, when given): once, or every
/// `every` for `count` rounds (without a count, until the process is gone).
pub fn run(pid: u32, every: Option<Duration>, count: Option<u64>, filter: &[u16]) -> Result<()> {
    let rounds = match every {
        None => 1,
        Some(_) => count.unwrap_or(u64::MAX),
    };
    let start = Instant::now();
    let mut total = 0usize;
    for round in 1..=rounds {
        let dropped = match tcpxshim::sockdrop::drop_connections(pid, filter) {
            Ok(d) => d,
            // The process ended between rounds: the run is over.
            Err(_) if round > 1 && !std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                println!("process {pid} has exited");
                break;
            }
            Err(e) => return Err(e),
        };
        let mut out = std::io::stdout().lock();
        for (local, remote) in &dropped {
            let _ = writeln!(out, "dropped {local} -> {remote}");
        }
        total += dropped.len();
        let _ = writeln!(
            out,
            "round {round}: dropped {} connection(s) of process {pid} at {:.1} s",
            dropped.len(),
            start.elapsed().as_secs_f64()
        );
        let _ = out.flush();
        if let (Some(d), true) = (every, round < rounds) {
            std::thread::sleep(d);
        }
    }
    println!("dropped {total} connection(s) in all");
    Ok(())
}
