//! The Prometheus text file: a collector that reads the connections' atomics when it is encoded
//! (`prometheus-client` does the encoding), the write to a temporary name and the rename, and the
//! thread that writes every interval.

use super::conn::{now_ns, Conn, Shared};
use super::hist::{HistSnap, SIZE_CLASSES};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

type Labels = Vec<(&'static str, String)>;

/// Reads a [`Shared`] at encode time.
struct View(Arc<Shared>);

impl fmt::Debug for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("tcpxshim metrics")
    }
}

impl View {
    fn process_labels(&self) -> Labels {
        let m = &self.0.labels;
        vec![
            ("rank", m.rank.clone()),
            ("local_rank", m.local_rank.clone()),
            ("host", m.host.clone()),
        ]
    }

    fn conn_labels(&self, c: &Conn) -> Labels {
        let mut l = self.process_labels();
        l.extend([
            ("comm", c.comm.to_string()),
            ("dir", c.dir.label().to_string()),
            ("peer", c.peer.clone()),
            ("dev", c.dev.to_string()),
            ("transport", self.0.transport.clone()),
        ]);
        l
    }
}

fn histogram(
    enc: &mut prometheus_client::encoding::MetricEncoder<'_>,
    labels: &Labels,
    h: &HistSnap,
) -> Result<(), fmt::Error> {
    enc.encode_family(labels)?
        .encode_histogram::<NoLabelSet>(h.sum_secs(), h.count(), &h.buckets(), None)
}

impl Collector for View {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), fmt::Error> {
        let conns = self.0.conns();
        let labels: Vec<Labels> = conns.iter().map(|c| self.conn_labels(c)).collect();
        let now = now_ns();
        let per_conn = |e: &mut DescriptorEncoder,
                        name: &str,
                        help: &str,
                        ty: MetricType,
                        value: &dyn Fn(&Conn) -> f64|
         -> Result<(), fmt::Error> {
            let mut m = e.encode_descriptor(name, help, None, ty)?;
            for (c, l) in conns.iter().zip(&labels) {
                let v = value(c);
                match ty {
                    MetricType::Counter => ConstCounter::new(v as u64).encode(m.encode_family(l)?)?,
                    // Counts print as integers, ages as decimals.
                    _ if v.fract() == 0.0 && v.abs() < 9e15 => ConstGauge::new(v as i64).encode(m.encode_family(l)?)?,
                    _ => ConstGauge::new(v).encode(m.encode_family(l)?)?,
                }
            }
            Ok(())
        };
        per_conn(
            &mut e,
            "tcpxshim_bytes",
            "Payload bytes of completed send and receive requests",
            MetricType::Counter,
            &|c| c.bytes.load(Relaxed) as f64,
        )?;
        per_conn(
            &mut e,
            "tcpxshim_messages",
            "Completed send and receive requests",
            MetricType::Counter,
            &|c| c.messages.load(Relaxed) as f64,
        )?;
        per_conn(
            &mut e,
            "tcpxshim_requests_in_flight",
            "Requests posted and not completed",
            MetricType::Gauge,
            &|c| c.in_flight.load(Relaxed) as f64,
        )?;
        {
            let mut m = e.encode_descriptor(
                "tcpxshim_request_duration_seconds",
                "Time from posting a request to its completion, by message size",
                None,
                MetricType::Histogram,
            )?;
            for (c, l) in conns.iter().zip(&labels) {
                for (i, class) in SIZE_CLASSES.iter().enumerate() {
                    let h = c.lat[i].snapshot();
                    if h.count() == 0 {
                        continue;
                    }
                    let mut l = l.clone();
                    l.push(("size", class.to_string()));
                    histogram(&mut m, &l, &h)?;
                }
            }
        }
        per_conn(
            &mut e,
            "tcpxshim_errors",
            "Failed posts, tests and closes",
            MetricType::Counter,
            &|c| c.errors.load(Relaxed) as f64,
        )?;
        per_conn(
            &mut e,
            "tcpxshim_recoveries",
            "Connections recovered after a failure",
            MetricType::Counter,
            &|c| c.recoveries.load(Relaxed) as f64,
        )?;
        per_conn(
            &mut e,
            "tcpxshim_last_progress_age_seconds",
            "Seconds since the last post or completion (at close, for a closed connection)",
            MetricType::Gauge,
            &|c| c.progress_age_secs(now),
        )?;
        let limit = self.0.stall_warn_ns;
        per_conn(
            &mut e,
            "tcpxshim_stalled_requests",
            "Requests outstanding longer than NCCL_TCPXSHIM_STALL_WARN",
            MetricType::Gauge,
            &|c| if limit == 0 { 0.0 } else { c.stalled(now, limit) as f64 },
        )?;
        let pl = self.process_labels();
        ConstGauge::new(self.0.open.load(Relaxed) as i64).encode(
            e.encode_descriptor(
                "tcpxshim_connections",
                "Send and receive connections open",
                None,
                MetricType::Gauge,
            )?
            .encode_family(&pl)?,
        )?;
        ConstCounter::new(self.0.opened.load(Relaxed)).encode(
            e.encode_descriptor(
                "tcpxshim_connections_opened",
                "Send and receive connections opened",
                None,
                MetricType::Counter,
            )?
            .encode_family(&pl)?,
        )?;
        if let Some(p) = self.0.pool.get() {
            for (name, help, v) in [
                (
                    "tcpxshim_pool_hits",
                    "Connects that reused a pooled connection (NCCL_TCPXSHIM_POOL)",
                    &p.hits,
                ),
                (
                    "tcpxshim_pool_misses",
                    "Connects to a pooling peer that found no pooled connection to reuse, or whose claim was denied",
                    &p.misses,
                ),
                (
                    "tcpxshim_pool_evictions",
                    "Pooled connections closed: idle too long, over NCCL_TCPXSHIM_POOL_MAX, stale or denied",
                    &p.evictions,
                ),
            ] {
                ConstCounter::new(v.load(Relaxed)).encode(
                    e.encode_descriptor(name, help, None, MetricType::Counter)?
                        .encode_family(&pl)?,
                )?;
            }
        }
        let mut m = e.encode_descriptor(
            "tcpxshim_connect_duration_seconds",
            "Time from the first connect() or accept() call of a connection to the one returning it",
            None,
            MetricType::Histogram,
        )?;
        for (op, h) in [("connect", &self.0.connect_hist), ("accept", &self.0.accept_hist)] {
            let mut l = pl.clone();
            l.push(("op", op.to_string()));
            histogram(&mut m, &l, &h.snapshot())?;
        }
        Ok(())
    }
}

/// The file's text now, in the Prometheus text format (0.0.4) that node_exporter's textfile
/// collector and `tcpxshim metrics serve` read.
pub fn encode(shared: &Arc<Shared>) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(View(shared.clone())));
    let mut text = String::new();
    // Writing into a String cannot fail, and the collector only fails when its writer does.
    let _ = prometheus_client::encoding::text::encode(&mut text, &reg);
    to_text_format(&text)
}

/// prometheus-client writes OpenMetrics: a counter family is named without `_total` in its HELP
/// and TYPE lines while its samples carry it, and the text ends with `# EOF`. The Prometheus text
/// format wants the family named as its samples and has no end marker, so counters' HELP and
/// TYPE lines get the `_total` name and `# EOF` goes.
fn to_text_format(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 64);
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Writes the file: to a temporary name in the same directory, then renamed over the file, so
/// that a reader sees the previous whole file or the new one. Returns the file's path.
pub fn write(shared: &Arc<Shared>) -> std::io::Result<std::path::PathBuf> {
    let text = encode(shared);
    let file = shared.file();
    let mut tmp = file.clone().into_os_string();
    tmp.push(".tmp");
    let _g = crate::lock(&shared.write_lock);
    std::fs::create_dir_all(&shared.dir)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &file)?;
    Ok(file)
}

/// [`write`], with a failure reported once as a WARN (later ones at debug level).
pub fn write_logged(shared: &Arc<Shared>) {
    if let Err(e) = write(shared) {
        let msg = format!("metrics: cannot write {}: {e}", shared.file().display());
        if shared.warned.swap(true, Relaxed) {
            log::debug!("{msg}");
        } else {
            log::warn!("{msg} (reported once)");
        }
    }
}

/// The thread that writes the file every interval (named tcpxshim-metrics); stopped and joined
/// when dropped.
pub struct Exporter {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Exporter {
    /// Writes the file now, then every `interval`, from a new thread.
    pub fn start(shared: Arc<Shared>, interval: Duration) -> Exporter {
        let (tx, rx) = crossbeam_channel::bounded::<()>(0);
        let spawned = std::thread::Builder::new()
            .name("tcpxshim-metrics".into())
            .spawn(move || {
                write_logged(&shared);
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = rx.recv_timeout(interval) {
                    write_logged(&shared);
                }
            });
        match spawned {
            Ok(t) => Exporter {
                stop: Some(tx),
                thread: Some(t),
            },
            Err(e) => {
                log::warn!("metrics: cannot start the writer thread ({e}); the file is written only at the last close");
                Exporter {
                    stop: None,
                    thread: None,
                }
            }
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::conn::{Conn, Dir};
    use super::*;

    /// A reader never sees half a file: every read while the file is rewritten is a whole one.
    #[test]
    fn readers_see_whole_files_only() {
        let dir = std::env::temp_dir().join(format!("tcpxshim-prom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut labels = crate::config::Config::default().metrics;
        labels.host = "unit".into();
        let shared = Arc::new(Shared::new(labels, "test".into(), dir.clone(), 0));
        const CONNS: usize = 300;
        for i in 0..CONNS {
            shared.conns.push(Conn::new(Dir::Send, format!("peer {i}"), 0));
        }
        let file = write(&shared).unwrap();
        // Every write has the same lines (only values change), so a whole file has this many.
        let lines = std::fs::read_to_string(&file).unwrap().lines().count();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let reads = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut reads = 0u32;
                while !stop.load(Relaxed) {
                    let text = std::fs::read_to_string(&file).expect("the file is always there");
                    assert!(
                        text.ends_with('\n') && text.lines().count() == lines,
                        "a partial file was read ({} bytes, {} of {lines} lines)",
                        text.len(),
                        text.lines().count()
                    );
                    assert_eq!(text.matches("tcpxshim_bytes_total{").count(), CONNS);
                    reads += 1;
                }
                reads
            });
            for round in 0..200u64 {
                for c in shared.conns() {
                    c.bytes.store(round * 1_000_000_007, Relaxed);
                }
                write(&shared).unwrap();
            }
            stop.store(true, Relaxed);
            reader.join().unwrap()
        });
        assert!(
            reads > 10,
            "the reader read while the file was rewritten ({reads} reads)"
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            [file.file_name().unwrap().to_owned()],
            "no temporary file is left"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
