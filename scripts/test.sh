#!/usr/bin/env bash
# The full test suite on a fresh machine: installs what is needed (CRIU included), checks
# formatting and lints, runs every test (the netns/CRIU ones need root) and each fuzz target
# briefly. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --bins --examples
# --no-fail-fast: one failing test binary must not hide the results of the others.
cargo test --workspace --all-targets --no-fail-fast
# Every fuzz target for 30 s from its committed corpus (stable toolchain; installs cargo-fuzz once).
bash scripts/fuzz.sh 30
