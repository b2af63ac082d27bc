#!/usr/bin/env bash
# Host-network benchmark: tether's netlink/libnftables path vs `ip`/`nft` processes, side by side
# in a private network namespace. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --examples
exec target/release/examples/bench_hostnet "$@"
