//! Build script: gives the plugin library the SONAME it is installed under, so that the loader,
//! `ldd` and NCCL's "Loaded net plugin" line all name it as NCCL looks for it
//! (`NCCL_NET_PLUGIN=tcpxshim` opens `libnccl-net-tcpxshim.so`), and compiles the C stand-in
//! logger (csrc/logger.c): ncclDebugLogger_t is variadic, which stable Rust cannot define.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/logger.c");
    println!("cargo:rerun-if-changed=nccl_headers/ncclnet.h");
    cc::Build::new()
        .file("csrc/logger.c")
        .include("nccl_headers")
        .compile("tcpxshim_logger");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnccl-net-tcpxshim.so");
    }
}
