#!/usr/bin/env bash
# Soak benchmark: 1,000 TCP and 200 QUIC clients through tether-proxy and as many direct, each
# verified byte for byte, while the example service moves src -> dst and back 20 times. Prints a
# row per move (downtime, the proxy's pause, stall p50/p99/max through the proxy and direct, the
# proxy's memory and CPU). Run as root; installs what it needs. Options: --tcp, --quic, --moves,
# --state-mb, --interval-ms, --json FILE (see --help). About 5 minutes with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bins --examples
exec target/release/examples/soak "$@"
