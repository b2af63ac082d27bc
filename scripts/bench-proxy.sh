#!/usr/bin/env bash
# Proxy data-path benchmark: direct vs tether-proxy vs HAProxy (TCP) / socat (UDP), side by side
# on the same netns path. Run as root. Installs haproxy and socat if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for p in haproxy socat; do
    command -v "$p" >/dev/null || { apt-get update -qq >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy socat >/dev/null; break; }
done
cargo build --release --bins --examples
exec target/release/examples/bench_proxy "$@"
