//! The Rust bindings in src/ffi/bindings.rs are generated from nccl_headers/ncclnet.h.
//! This test regenerates them and fails when the committed copy has drifted.
//! Regenerate with: `TCPXSHIM_BLESS=1 cargo test --test bindings`.

use std::path::Path;

fn generate() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = root.join("nccl_headers/ncclnet.h");
    let bindings = bindgen::Builder::default()
        .header(header.to_str().expect("utf-8 path"))
        .raw_line("// Generated from nccl_headers/ncclnet.h by tests/bindings.rs; do not edit.")
        .raw_line("// Regenerate with: TCPXSHIM_BLESS=1 cargo test --test bindings")
        .allowlist_type("ncclNet_v[5-8]_t")
        .allowlist_type("ncclNetProperties_v[5-8]_t")
        .allowlist_type("ncclNetDeviceHandle_v[78]_t")
        .allowlist_type("ncclResult_t|ncclDebugLogLevel|ncclDebugLogSubSys|ncclNetDeviceType")
        .allowlist_var("NCCL_.*")
        .constified_enum_module("ncclResult_t|ncclDebugLogLevel|ncclDebugLogSubSys|ncclNetDeviceType")
        .derive_default(true)
        .derive_debug(true)
        .layout_tests(false)
        .generate_comments(false)
        .formatter(bindgen::Formatter::Prettyplease)
        .generate()
        .expect("bindgen failed: is libclang installed? (scripts/test installs it)");
    bindings.to_string()
}

#[test]
fn committed_bindings_match_the_header() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ffi/bindings.rs");
    let fresh = generate();
    if std::env::var_os("TCPXSHIM_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write bindings");
        return;
    }
    let committed = std::fs::read_to_string(&path).expect("read src/ffi/bindings.rs");
    assert!(
        committed == fresh,
        "src/ffi/bindings.rs differs from what nccl_headers/ncclnet.h generates; \
         run `TCPXSHIM_BLESS=1 cargo test --test bindings` and commit the result"
    );
}
