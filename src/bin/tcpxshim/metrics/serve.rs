//! `tcpxshim metrics serve DIR --listen ADDR`: every rank's metrics file of a host on one
//! Prometheus endpoint, `/metrics`, merged by family at each scrape.

use super::text;
use std::path::Path;
use std::time::SystemTime;
use tcpxshim::{Error, Result};

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The page for the files of `dir` now: their families merged, plus the age of each file
/// (`tcpxshim_metrics_file_age_seconds{file}`), so that a scrape tells files still written from
/// those of processes that stopped (which stay, holding their final numbers).
pub fn page(dir: &Path) -> Result<String> {
    let files = super::read_dir(dir)?;
    let mut page = text::merge(files.iter().map(|f| &f.parsed));
    if !files.is_empty() {
        let now = SystemTime::now();
        page.push_str(
            "# HELP tcpxshim_metrics_file_age_seconds Seconds since the metrics file was last written.\n\
             # TYPE tcpxshim_metrics_file_age_seconds gauge\n",
        );
        for f in &files {
            let age = now.duration_since(f.mtime).map_or(0.0, |d| d.as_secs_f64());
            page.push_str(&format!(
                "tcpxshim_metrics_file_age_seconds{{file=\"{}\"}} {age:.3}\n",
                text::escape_label(&f.name)
            ));
        }
    }
    Ok(page)
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}

/// Answers one request.
fn answer(dir: &Path, req: tiny_http::Request) {
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let method = req.method().clone();
    let text = |s: String, code: u16| {
        tiny_http::Response::from_string(s)
            .with_status_code(code)
            .with_header(header("Content-Type", "text/plain; charset=utf-8"))
    };
    let resp = match (&method, path.as_str()) {
        (tiny_http::Method::Get | tiny_http::Method::Head, "/metrics") => match page(dir) {
            Ok(p) => tiny_http::Response::from_string(p).with_header(header("Content-Type", CONTENT_TYPE)),
            Err(e) => {
                log::warn!("GET /metrics: {e}");
                text(format!("cannot read the metrics files: {e}\n"), 500)
            }
        },
        (_, "/metrics") => text("only GET and HEAD\n".into(), 405),
        _ => text("not found: the metrics are at /metrics\n".into(), 404),
    };
    if let Err(e) = req.respond(resp) {
        log::debug!("{method} {path}: reply not sent: {e}");
    }
}

/// Serves until killed. Prints the address it listens on (port 0: the one chosen).
pub fn run(dir: &Path, listen: &str) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::invalid_argument(format!("{} is not a directory", dir.display())));
    }
    let server =
        tiny_http::Server::http(listen).map_err(|e| Error::system(format!("cannot listen on {listen}: {e}")))?;
    let addr = server
        .server_addr()
        .to_ip()
        .map_or_else(|| listen.to_string(), |a| a.to_string());
    println!(
        "serving the metrics files of {} on http://{addr}/metrics",
        dir.display()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // A few threads answer, so that one slow client does not hold up the others' scrapes.
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| {
                for req in server.incoming_requests() {
                    answer(dir, req);
                }
            });
        }
    });
    Ok(())
}

/// Threads answering requests.
const WORKERS: usize = 4;
