//! The built library as NCCL sees it: its dynamic symbol table, and loading it under the file
//! name NCCL looks for.

mod common;

use object::{Object, ObjectSymbol};

#[test]
fn exports_ncclnetplugin_v7_as_its_only_plugin_symbol() {
    let path = common::shim_lib();
    let bytes = std::fs::read(&path).expect("read the built plugin");
    let file = object::File::parse(&*bytes).expect("parse the built plugin as ELF");
    let exported: Vec<String> = file
        .dynamic_symbols()
        .filter(|s| s.is_definition() && s.is_global())
        .filter_map(|s| s.name().ok().map(str::to_string))
        .collect();
    let plugin_symbols: Vec<&String> = exported.iter().filter(|n| n.starts_with("ncclNet")).collect();
    assert_eq!(plugin_symbols, vec!["ncclNetPlugin_v7"], "plugin symbols in {}: {exported:?}", path.display());
    // Nothing else of ours leaks into NCCL's namespace either.
    let ours: Vec<&String> = exported.iter().filter(|n| n.contains("tcpxshim") || n.starts_with("_ZN")).collect();
    assert!(ours.is_empty(), "unexpected exported symbols: {ours:?}");
}

#[test]
fn loads_under_the_name_nccl_looks_for() {
    let dir = common::scratch_dir("abi-name");
    let installed = dir.join("libnccl-net-tcpxshim.so");
    std::fs::copy(common::shim_lib(), &installed).expect("copy the plugin");
    let net = common::Net::load(&installed);
    let name = net.name();
    assert_eq!(name, "tcpxshim", "name before init is the shim's own");
}
