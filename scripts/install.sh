#!/usr/bin/env bash
# Builds tcpxshim in release mode and installs it under PREFIX (default /usr/local):
#   PREFIX/lib/libnccl-net-tcpxshim.so   the plugin, named as NCCL looks for NCCL_NET_PLUGIN=tcpxshim
#   PREFIX/bin/tcpxshim                  the command
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:-/usr/local}"
cargo build --release --lib --bin tcpxshim
install -d "$prefix/lib" "$prefix/bin"
install -m 0755 target/release/libtcpxshim.so "$prefix/lib/libnccl-net-tcpxshim.so"
install -m 0755 target/release/tcpxshim "$prefix/bin/tcpxshim"
echo "installed $prefix/lib/libnccl-net-tcpxshim.so and $prefix/bin/tcpxshim"
echo "use it with: LD_LIBRARY_PATH=$prefix/lib:\$LD_LIBRARY_PATH NCCL_NET_PLUGIN=tcpxshim"
echo "         or: NCCL_NET_PLUGIN=$prefix/lib/libnccl-net-tcpxshim.so"
