#!/usr/bin/env bash
# Runs every test of tcpxshim. Installs what the tests need when it is missing: a C compiler
# (the fixture plugins are C) and libclang (the check that the committed bindings match
# nccl_headers/ncclnet.h).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v cc >/dev/null 2>&1 || need+=(gcc)
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
