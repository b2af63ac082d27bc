#!/usr/bin/env bash
# A Podman container moved by tether (pre-copy, through tether-proxy) against what a Podman user
# does today (podman container checkpoint --export, the archive copied over the same link,
# podman container restore --import), on the same container in the same run: 64, 256 and 512 MiB
# of state rewritten at 1,000 pages/s over a 1 Gbit/s link. Prints both downtimes, their ratio
# and the clients' longest stalls. Run as root; installs what it needs. About 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bins --examples
exec target/release/examples/bench_container "$@"
