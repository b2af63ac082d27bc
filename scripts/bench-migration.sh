#!/usr/bin/env bash
# Migration benchmark: stop-and-copy vs pre-copy, side by side in one run, on a tbf-limited
# src-dst link (100 Mbit/s and 1 Gbit/s), for 64/256/512/1024/2048 MiB of service state (cells
# whose stop-and-copy would send for over 60 s left out) rewritten at 0/1,000/10,000 pages/s.
# First calibrates the migration model per link (short synthetic migrations), then scores every
# move's prediction, runs a held-out check and writes SVG figures (target/bench-migration-figures).
# Prints Markdown tables to stdout, progress to stderr, and writes target/bench-migration.json.
# Run as root. The full grid takes 20-30 minutes; `--quick`
# (64 MiB, dirty 0 and 1000) about 5, 2-3 of them calibrating. Other options: --links, --states,
# --dirty, --json, --figures, --rescore (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bins --examples
exec target/release/examples/bench_migration "$@"
