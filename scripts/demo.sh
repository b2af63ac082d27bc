#!/usr/bin/env bash
# The handover demo on a fresh machine: installs what is needed (CRIU included), builds, and moves
# a stateful service with live TCP and QUIC clients src -> dst -> src. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bins --examples
exec target/release/examples/demo "$@"
