#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (docs/ARCHITECTURE.md, "Fuzzing") for SECONDS each
# (default 600), starting from their committed seed corpora, and prints each target's executions.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      all targets when none is named
#
# Works with the stable toolchain alone: the targets are built without a sanitizer
# (`--sanitizer none`, which needs no nightly); Rust's own checks (bounds, and overflow, as the
# build keeps debug assertions) and the targets' assertions are what catch bugs. It installs what
# it needs if missing: a C++ compiler (libFuzzer is built from source; apt-get, as root) and
# cargo-fuzz (`cargo install --locked`, once). With CI=true a tool that cannot be had is an
# error; otherwise the run is skipped with a message.
#
# Environment: FUZZ_JOBS (targets run at once; default: the number of CPUs), FUZZ_FEATURES
# (cargo features of the fuzz crate, if any). New corpus entries go to a temporary directory (the
# committed corpus stays as it is; it holds the inputs of bugs found, as regressions); crashing
# inputs go to fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-600}
[ $# -gt 0 ] && shift
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;; esac
jobs=${FUZZ_JOBS:-$(nproc)}
CARGO_FUZZ_VERSION=0.13.2

log() { printf 'fuzz: %s\n' "$*" >&2; }
missing() {
    if [ "${CI:-}" = true ]; then
        log "error: $*"
        exit 1
    fi
    log "$*; skipping the fuzz targets"
    exit 0
}

if ! command -v c++ >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "installing g++ (libFuzzer is built from source)"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >/dev/null
    fi
    command -v c++ >/dev/null || missing "no C++ compiler (install g++)"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install --locked --version "$CARGO_FUZZ_VERSION" cargo-fuzz >&2 ||
        missing "cannot install cargo-fuzz"
fi

all=$(cargo fuzz list)
if [ $# -eq 0 ]; then
    set -- $all
fi
for t in "$@"; do
    grep -qx "$t" <<<"$all" || { log "no fuzz target $t (targets: $(echo $all))"; exit 2; }
done

build=(--sanitizer none)
[ -n "${FUZZ_FEATURES:-}" ] && build+=(--features "$FUZZ_FEATURES")
started=$(date +%s)
cargo fuzz build "${build[@]}" >&2
log "built in $(($(date +%s) - started)) s"
bin=fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release

work=$(mktemp -d "${TMPDIR:-/tmp}/tether-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

run_one() {
    local t=$1
    mkdir -p "$work/$t" "fuzz/artifacts/$t"
    # A run ends by its time limit; the timeout is a backstop for a hung target.
    timeout $((secs + 120)) "$bin/$t" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 \
        -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" "$work/$t" "fuzz/corpus/$t" \
        >"$work/$t.log" 2>&1
}

log "running $# target(s) for $secs s each, $jobs at a time"
running=0
for t in "$@"; do
    if [ "$running" -ge "$jobs" ]; then
        wait -n || true
        running=$((running - 1))
    fi
    (run_one "$t"; echo $? >"$work/$t.rc") &
    running=$((running + 1))
done
wait

failed=()
printf '%-18s %14s %10s  %s\n' target executions exec/s result
for t in "$@"; do
    rc=$(cat "$work/$t.rc" 2>/dev/null || echo 1)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/$t.log" | tail -1)
    if [ "$rc" = 0 ]; then
        result=ok
    else
        result="FAILED (exit $rc)"
        failed+=("$t")
    fi
    printf '%-18s %14s %10s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "$result"
done
for t in "${failed[@]}"; do
    log "$t failed; the end of its log:"
    tail -40 "$work/$t.log" >&2
done
[ ${#failed[@]} -eq 0 ]
