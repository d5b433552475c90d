//! The README documents every setting, and every setting the code reads is declared in
//! src/config.rs.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn readme_documents_every_setting_with_its_default() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    for s in tcpxshim::config::SETTINGS {
        let row = readme
            .lines()
            .find(|l| l.starts_with('|') && l.contains(&format!("`{}`", s.name)));
        let row = row.unwrap_or_else(|| panic!("README.md has no settings-table row for {}", s.name));
        assert!(
            row.contains(s.default),
            "README row for {} does not give the default {:?}: {row}",
            s.name,
            s.default
        );
    }
}

fn collect_names(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            collect_names(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("read source");
            let mut rest = text.as_str();
            while let Some(i) = rest.find("NCCL_TCPXSHIM_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                    .unwrap_or(tail.len());
                out.push(tail[..end].trim_end_matches('_').to_string());
                rest = &tail[end..];
            }
        }
    }
}

#[test]
fn every_setting_named_in_the_code_is_declared() {
    let mut names = Vec::new();
    collect_names(&root().join("src"), &mut names);
    assert!(
        names.iter().any(|n| n == "NCCL_TCPXSHIM_PLUGIN"),
        "scan found the settings"
    );
    let declared: Vec<&str> = tcpxshim::config::SETTINGS.iter().map(|s| s.name).collect();
    for n in names {
        if n == "NCCL_TCPXSHIM" {
            continue; // the prefix itself, in prose
        }
        assert!(
            declared.contains(&n.as_str()),
            "{n} is used in src/ but not declared in config::SETTINGS"
        );
    }
}
