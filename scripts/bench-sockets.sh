#!/usr/bin/env bash
# How the frozen phase grows with the service's connections: the example service with 100,
# 1,000 and 10,000 idle TCP connections (half through tether-proxy, half direct) and a tenth as
# many QUIC ones moves src -> dst -> src; prints downtime, dump, restore and the proxy's pause per
# move as a Markdown table, then the per-socket cost K for the model's profile
# (frozen_per_socket_ms). Run as root; installs what it needs. About 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bins --examples
exec target/release/examples/bench_sockets "$@"
