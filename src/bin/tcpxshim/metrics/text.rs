//! The Prometheus text exposition format (version 0.0.4), as far as the metrics files use it:
//! parsing one file into families and samples, and merging the families of many files into one
//! valid page (one `# HELP` and `# TYPE` per family, every file's series under it).

use std::collections::HashMap;

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The series name (for histograms: `<family>_bucket`, `_sum` or `_count`).
    pub name: String,
    /// Labels in the order written.
    pub labels: Vec<(String, String)>,
    /// The value (`+Inf`, `-Inf` and `NaN` included).
    pub value: f64,
    /// The line as written, trimmed: what a merged page repeats.
    pub line: String,
}

impl Sample {
    /// The value of label `key`, if the sample has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Name and labels: what identifies the series (the value and timestamp do not).
    fn series_key(&self) -> String {
        let mut k = self.name.clone();
        for (n, v) in &self.labels {
            k.push('\u{0}');
            k.push_str(n);
            k.push('=');
            k.push_str(v);
        }
        k
    }
}

/// One metric family: its `# HELP`, `# TYPE` and samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Family {
    /// The family name (a histogram's, without `_bucket`/`_sum`/`_count`).
    pub name: String,
    /// The help text as written (escapes kept).
    pub help: Option<String>,
    /// `counter`, `gauge`, `histogram`, `summary` or `untyped`.
    pub kind: Option<String>,
    /// The samples, in file order.
    pub samples: Vec<Sample>,
}

/// A parsed file: its families in order, and the lines that could not be parsed.
#[derive(Clone, Debug, Default)]
pub struct Parsed {
    /// Families in order of first appearance.
    pub families: Vec<Family>,
    /// `(line number, reason)` of each line skipped.
    pub skipped: Vec<(usize, String)>,
}

impl Parsed {
    /// Every sample of every family.
    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.families.iter().flat_map(|f| f.samples.iter())
    }
}

/// True for a valid metric or label name (`[a-zA-Z_:][a-zA-Z0-9_:]*`; labels take no `:`, which
/// is not checked here).
fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

/// Parses a sample value: a float, `+Inf`, `-Inf` or `NaN`.
fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok().filter(|v: &f64| v.is_finite()),
    }
}

/// Parses one sample line.
pub fn parse_sample(line: &str) -> Result<Sample, String> {
    let line = line.trim();
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).unwrap_or(line.len());
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut r = r;
        loop {
            r = r.trim_start();
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = r.find('=').ok_or("label without '='")?;
            let key = r[..eq].trim();
            if !valid_name(key) {
                return Err(format!("bad label name {key:?}"));
            }
            r = r[eq + 1..].trim_start();
            r = r.strip_prefix('"').ok_or("label value not quoted")?;
            let mut value = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err("unterminated label value".into()),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, c)) => {
                            value.push('\\');
                            value.push(c);
                        }
                        None => return Err("unterminated label value".into()),
                    },
                    Some((_, c)) => value.push(c),
                }
            };
            labels.push((key.to_string(), value));
            r = r[end + 1..].trim_start();
            if let Some(after) = r.strip_prefix(',') {
                r = after;
            } else if !r.starts_with('}') {
                return Err("expected ',' or '}' after a label".into());
            }
        }
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value = parse_value(value).ok_or_else(|| format!("bad value {value:?}"))?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing text after the timestamp".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
        line: line.to_string(),
    })
}

/// The family a sample named `name` belongs to, given the declared types.
fn family_of<'a>(name: &'a str, kinds: &HashMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count", "_created"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if matches!(kinds.get(base).map(String::as_str), Some("histogram" | "summary")) {
                return base;
            }
        }
    }
    name
}

/// Parses a whole file. Lines that do not parse are skipped and listed in [`Parsed::skipped`].
pub fn parse(text: &str) -> Parsed {
    let mut out = Parsed::default();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut kinds: HashMap<String, String> = HashMap::new();
    let mut family = |out: &mut Parsed, name: &str| -> usize {
        *index.entry(name.to_string()).or_insert_with(|| {
            out.families.push(Family {
                name: name.to_string(),
                ..Family::default()
            });
            out.families.len() - 1
        })
    };
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            let (what, name, rest) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
            match (what, name) {
                (Some("HELP"), Some(name)) if valid_name(name) => {
                    let f = family(&mut out, name);
                    out.families[f].help.get_or_insert_with(|| rest.to_string());
                }
                (Some("TYPE"), Some(name)) if valid_name(name) => {
                    let kind = rest.trim().to_string();
                    if !matches!(kind.as_str(), "counter" | "gauge" | "histogram" | "summary" | "untyped") {
                        out.skipped.push((n + 1, format!("unknown type {kind:?}")));
                        continue;
                    }
                    kinds.entry(name.to_string()).or_insert_with(|| kind.clone());
                    let f = family(&mut out, name);
                    out.families[f].kind.get_or_insert(kind);
                }
                _ => {} // Another comment.
            }
            continue;
        }
        match parse_sample(line) {
            Ok(s) => {
                let f = family(&mut out, family_of(&s.name, &kinds));
                out.families[f].samples.push(s);
            }
            Err(e) => out.skipped.push((n + 1, e)),
        }
    }
    out
}

/// Merges the families of several files into one page: families in order of first appearance,
/// each with one `# HELP` and one `# TYPE` (the first file's that has them), followed by the
/// series of every file. A series (name and labels) that several files hold is written once, with
/// the value of the last file that has it: pass files oldest first.
pub fn merge<'a>(files: impl IntoIterator<Item = &'a Parsed>) -> String {
    let mut families: Vec<Family> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut series: HashMap<String, (usize, usize)> = HashMap::new();
    for file in files {
        for fam in &file.families {
            let f = *index.entry(fam.name.clone()).or_insert_with(|| {
                families.push(Family {
                    name: fam.name.clone(),
                    ..Family::default()
                });
                families.len() - 1
            });
            let dst = &mut families[f];
            if dst.help.is_none() {
                dst.help.clone_from(&fam.help);
            }
            if dst.kind.is_none() {
                dst.kind.clone_from(&fam.kind);
            }
            for s in &fam.samples {
                match series.get(&s.series_key()) {
                    Some(&(sf, si)) => families[sf].samples[si] = s.clone(),
                    None => {
                        let dst = &mut families[f];
                        series.insert(s.series_key(), (f, dst.samples.len()));
                        dst.samples.push(s.clone());
                    }
                }
            }
        }
    }
    let mut out = String::new();
    for f in families.iter().filter(|f| !f.samples.is_empty()) {
        if let Some(help) = &f.help {
            out.push_str(&format!("# HELP {} {help}\n", f.name));
        }
        if let Some(kind) = &f.kind {
            out.push_str(&format!("# TYPE {} {kind}\n", f.name));
        }
        for s in &f.samples {
            out.push_str(&s.line);
            out.push('\n');
        }
    }
    out
}

/// Escapes a label value for the text format.
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = r#"# HELP tcpxshim_bytes_total Payload bytes completed.
# TYPE tcpxshim_bytes_total counter
tcpxshim_bytes_total{rank="0",dir="send",peer="1"} 1024
# HELP tcpxshim_request_duration_seconds Request durations.
# TYPE tcpxshim_request_duration_seconds histogram
tcpxshim_request_duration_seconds_bucket{rank="0",le="0.001"} 3
tcpxshim_request_duration_seconds_bucket{rank="0",le="+Inf"} 4
tcpxshim_request_duration_seconds_sum{rank="0"} 0.5
tcpxshim_request_duration_seconds_count{rank="0"} 4
"#;

    #[test]
    fn parses_samples_labels_and_special_values() {
        let s = parse_sample(r#"x_total{a="1",b="q\"uo\\te\n"} +Inf 1700000000000"#).unwrap();
        assert_eq!(s.name, "x_total");
        assert_eq!(s.label("a"), Some("1"));
        assert_eq!(s.label("b"), Some("q\"uo\\te\n"));
        assert_eq!(s.value, f64::INFINITY);
        let s = parse_sample("plain 2.5e3").unwrap();
        assert!(s.labels.is_empty());
        assert_eq!(s.value, 2500.0);
        assert_eq!(parse_sample(r#"y{a="1",} 7"#).unwrap().value, 7.0);
        assert!(parse_sample("y{a=1} 2").is_err());
        assert!(parse_sample(r#"y{a="1"}"#).is_err());
        assert!(parse_sample("9y 1").is_err());
        assert!(parse_sample("y 1 2 3").is_err());
    }

    #[test]
    fn groups_histogram_series_under_their_family() {
        let p = parse(A);
        assert!(p.skipped.is_empty(), "{:?}", p.skipped);
        let names: Vec<_> = p.families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["tcpxshim_bytes_total", "tcpxshim_request_duration_seconds"]);
        assert_eq!(p.families[1].kind.as_deref(), Some("histogram"));
        assert_eq!(p.families[1].samples.len(), 4);
    }

    #[test]
    fn skips_bad_lines_and_keeps_the_rest() {
        let p = parse("# TYPE a counter\na 1\na{ 2\nb 3\n# TYPE c bogus\n");
        assert_eq!(p.skipped.len(), 2, "{:?}", p.skipped);
        assert_eq!(p.skipped[0].0, 3);
        assert_eq!(p.samples().count(), 2);
    }

    #[test]
    fn merge_writes_each_family_once_with_all_series() {
        let b = A.replace("rank=\"0\"", "rank=\"1\"");
        let page = merge([&parse(A), &parse(&b)]);
        assert_eq!(page.matches("# TYPE tcpxshim_bytes_total counter").count(), 1);
        assert_eq!(page.matches("# HELP tcpxshim_request_duration_seconds ").count(), 1);
        assert_eq!(page.matches("tcpxshim_bytes_total{").count(), 2);
        // Series of one family stay together, after its header.
        let lines: Vec<&str> = page.lines().collect();
        let hist = lines
            .iter()
            .position(|l| l.starts_with("# TYPE tcpxshim_request_duration_seconds"))
            .unwrap();
        assert!(lines[..hist].iter().filter(|l| l.contains("_bucket")).count() == 0);
        assert_eq!(lines[hist + 1..].len(), 8);
        // The merged page parses back into the same families.
        let again = parse(&page);
        assert!(again.skipped.is_empty());
        assert_eq!(again.families.len(), 2);
        assert_eq!(again.samples().count(), 10);
    }

    #[test]
    fn merge_keeps_one_copy_of_a_repeated_series_the_last_value() {
        let newer = A.replace("} 1024", "} 2048");
        let page = merge([&parse(A), &parse(&newer)]);
        assert_eq!(page.matches("tcpxshim_bytes_total{").count(), 1);
        assert!(page.contains("} 2048"));
        assert_eq!(page.matches("_count{").count(), 1);
    }

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
