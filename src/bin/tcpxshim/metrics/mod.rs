//! `tcpxshim metrics serve`, `tcpxshim stats` and `tcpxshim top`: reading the metrics files that
//! the plugin's processes write into the metrics directory (`<host>-<pid>.prom`, Prometheus
//! text, replaced by a rename at each write), serving them as one page, and summarising them.

pub mod serve;
pub mod stats;
pub mod summary;
pub mod text;
pub mod top;

use std::path::{Path, PathBuf};
use std::time::SystemTime;
use tcpxshim::{Error, Result};

/// One metrics file as read.
#[derive(Clone, Debug)]
pub struct File {
    /// The file name, `<host>-<pid>.prom`.
    pub name: String,
    /// Host and pid from the name (`None` where the name does not have that form).
    pub host: Option<String>,
    /// The writer's pid from the name.
    pub pid: Option<u32>,
    /// When the file was last written: the time of its numbers.
    pub mtime: SystemTime,
    /// Its contents.
    pub parsed: text::Parsed,
}

/// Splits `<host>-<pid>.prom` (the host may contain `-`).
pub fn split_name(name: &str) -> (Option<String>, Option<u32>) {
    let Some(stem) = name.strip_suffix(".prom") else {
        return (None, None);
    };
    match stem.rsplit_once('-') {
        Some((host, pid)) if !host.is_empty() => match pid.parse() {
            Ok(pid) => (Some(host.to_string()), Some(pid)),
            Err(_) => (None, None),
        },
        _ => (None, None),
    }
}

/// The metrics files of `dir`: every `*.prom` not starting with `.` (temporary names are skipped
/// that way, or by not ending in `.prom`), oldest first, then by name. A file that disappears
/// between listing and reading is left out; other read errors are returned.
pub fn read_dir(dir: &Path) -> Result<Vec<File>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(format!("read directory {}", dir.display()), e))?;
    let mut paths: Vec<(String, PathBuf)> = Vec::new();
    for e in entries {
        let e = e.map_err(|e| Error::io(format!("read directory {}", dir.display()), e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".prom") && !name.starts_with('.') {
            paths.push((name, e.path()));
        }
    }
    let mut files = Vec::with_capacity(paths.len());
    for (name, path) in paths {
        // Open first, then stat the open file: the numbers and the time are those of one version.
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
        };
        let mtime = f
            .metadata()
            .and_then(|m| m.modified())
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut f, &mut text)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        let parsed = text::parse(&text);
        for (line, why) in &parsed.skipped {
            log::warn!("{}:{line}: skipped: {why}", path.display());
        }
        let (host, pid) = split_name(&name);
        files.push(File {
            name,
            host,
            pid,
            mtime,
            parsed,
        });
    }
    files.sort_by(|a, b| a.mtime.cmp(&b.mtime).then_with(|| a.name.cmp(&b.name)));
    Ok(files)
}

/// Bytes with a binary unit: `17 B`, `1.50 KiB`.
pub fn fmt_bytes(b: f64) -> String {
    tcpxshim::metrics::human_bytes(b.max(0.0) as u64)
}

/// A rate in bytes per second, decimal units: `1.25 GB/s`.
pub fn fmt_rate(r: Option<f64>) -> String {
    let Some(r) = r else { return "-".into() };
    let (v, u) = if r >= 1e9 {
        (r / 1e9, "GB/s")
    } else if r >= 1e6 {
        (r / 1e6, "MB/s")
    } else if r >= 1e3 {
        (r / 1e3, "kB/s")
    } else {
        (r, "B/s")
    };
    if u == "B/s" {
        format!("{v:.0} {u}")
    } else {
        format!("{v:.2} {u}")
    }
}

/// A duration in seconds: `8.0us`, `1.25ms`, `2.50s`.
pub fn fmt_secs(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 1e-3 => format!("{:.1}us", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.2}ms", s * 1e3),
        Some(s) => format!("{s:.2}s"),
    }
}

/// A count (counter or gauge value).
pub fn fmt_count(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_host_and_pid() {
        assert_eq!(split_name("node-a-12.prom"), (Some("node-a".into()), Some(12)));
        assert_eq!(split_name("h-1.prom.tmp"), (None, None));
        assert_eq!(split_name("-1.prom"), (None, None));
        assert_eq!(split_name("h-x.prom"), (None, None));
    }

    #[test]
    fn reads_only_prom_files() {
        let dir = std::env::temp_dir().join(format!("tcpxshim-readdir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("h-1.prom"), "a 1\n").unwrap();
        std::fs::write(dir.join(".h-2.prom"), "a 2\n").unwrap();
        std::fs::write(dir.join("h-3.prom.tmp"), "a 3\n").unwrap();
        let files = read_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].name, "h-1.prom");
        assert_eq!(files[0].pid, Some(1));
        assert_eq!(files[0].parsed.samples().count(), 1);
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(fmt_rate(Some(1.25e9)), "1.25 GB/s");
        assert_eq!(fmt_rate(Some(12.0)), "12 B/s");
        assert_eq!(fmt_rate(None), "-");
        assert_eq!(fmt_secs(Some(8e-6)), "8.0us");
        assert_eq!(fmt_secs(Some(0.00125)), "1.25ms");
        assert_eq!(fmt_secs(Some(2.5)), "2.50s");
        assert_eq!(fmt_count(3.0), "3");
    }
}
