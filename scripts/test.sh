#!/usr/bin/env bash
# Runs every test of tcpxshim: the crate's (cargo test) and the GPU suite's own, which need no
# GPU (python3 gpu/tests/test_suite.py). Arguments go to cargo test, and then only cargo's tests
# run. Installs what the tests need when it is missing: a C compiler (the fixture plugins are C),
# libclang (the check that the committed bindings match nccl_headers/ncclnet.h), python3, tmux
# (tests/metrics_cli.rs runs `tcpxshim top` in it and reads its screen), node_exporter
# (tests/metrics.rs has it read the metrics files, as users collect them) and iproute2 (tests/netns.rs
# joins two network namespaces with a veth pair and takes the link down; it needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v tmux >/dev/null 2>&1 || need+=(tmux)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v prometheus-node-exporter >/dev/null 2>&1 || command -v node_exporter >/dev/null 2>&1 || need+=(prometheus-node-exporter)
if ! ldconfig -p 2>/dev/null | grep -qE 'libclang(-[0-9.]+)?\.so' && ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1; then
  need+=(libclang-dev)
fi
if ((${#need[@]})); then
  echo "scripts/test.sh: installing ${need[*]} (needed by the tests)"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo test "$@"
if [ $# -eq 0 ]; then
  echo "scripts/test.sh: the GPU suite's own tests (no GPU needed)"
  python3 gpu/tests/test_suite.py
fi
