//! The built library as NCCL sees it: its dynamic symbol table, and loading it under the file
//! name NCCL looks for.

mod common;

use common::Driver;

use object::{Object, ObjectSection, ObjectSymbol};

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
    assert_eq!(
        plugin_symbols,
        vec!["ncclNetPlugin_v7"],
        "plugin symbols in {}: {exported:?}",
        path.display()
    );
    // Nothing else of ours leaks into NCCL's namespace either.
    assert_eq!(exported, vec!["ncclNetPlugin_v7"], "every exported definition");
}

#[test]
fn loads_under_the_name_nccl_looks_for() {
    // NCCL_NET_PLUGIN=tcpxshim makes NCCL dlopen "libnccl-net-tcpxshim.so".
    let copy = common::private_copy(&common::shim_lib());
    let installed = copy.with_file_name("libnccl-net-tcpxshim.so");
    std::fs::rename(&copy, &installed).expect("rename the copy");
    let net = common::Net::open(&installed);
    assert_eq!(net.name(), "tcpxshim", "the name before init is the shim's own");
    let t = net.table();
    assert!(
        t.init.is_some() && t.isend.is_some() && t.irecvConsumed.is_some(),
        "the v7 table is complete"
    );
}

#[test]
fn carries_the_installed_name_as_its_soname() {
    let bytes = std::fs::read(common::shim_lib()).expect("read the built plugin");
    let file = object::File::parse(&*bytes).expect("parse the built plugin as ELF");
    let dynstr = file
        .section_by_name(".dynstr")
        .expect(".dynstr")
        .data()
        .expect("read .dynstr");
    assert!(
        dynstr.split(|&b| b == 0).any(|s| s == b"libnccl-net-tcpxshim.so"),
        "the dynamic string table names libnccl-net-tcpxshim.so (DT_SONAME)"
    );
}
