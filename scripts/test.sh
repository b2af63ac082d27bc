#!/usr/bin/env bash
# The full test suite on a fresh machine: installs what is needed (CRIU included), checks
# formatting and lints, and runs every test (the netns/CRIU ones need root). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo build --bins --examples
# --no-fail-fast: one failing test binary must not hide the results of the others.
cargo test --workspace --all-targets --no-fail-fast
