#!/usr/bin/env bash
# Idempotent machine setup for tether: makes sure a working CRIU (>= 4.2, `criu check` passes),
# libnftables1 (loaded by tether at run time), nftables, iproute2 and Podman (for containers)
# are present. Run as root.
# Safe to run again: a machine that already has everything costs one `criu check`.
#
# When no working CRIU is found, it is built from Debian's source package of the newest suite that
# carries one (sid first). The sid source list lives in a temporary directory handed to apt-get with
# -o options: the machine's own apt sources are never changed. The version is not pinned, so a newer
# CRIU in sid is simply built instead; it only has to pass the same check.
set -euo pipefail

MIN_MAJOR=4
MIN_MINOR=2
PREFIX=${TETHER_CRIU_PREFIX:-/usr/local/sbin}

log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and runs criu check)"

apt_updated=0
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ $apt_updated = 0 ]; then
        log "apt-get update"
        apt-get update -qq >/dev/null
        apt_updated=1
    fi
    log "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Prints the path of a CRIU that is new enough and passes its check, or nothing.
working_criu() {
    local c v major minor
    for c in "$PREFIX/criu" "$(command -v criu 2>/dev/null || true)"; do
        [ -n "$c" ] && [ -x "$c" ] || continue
        v=$("$c" --version 2>/dev/null | sed -n 's/^Version: *\([0-9][0-9.]*\).*/\1/p' | head -1)
        [ -n "$v" ] || continue
        major=${v%%.*}; minor=${v#*.}; minor=${minor%%.*}
        if [ "$major" -lt $MIN_MAJOR ] || { [ "$major" -eq $MIN_MAJOR ] && [ "$minor" -lt $MIN_MINOR ]; }; then
            log "$c is CRIU $v, older than $MIN_MAJOR.$MIN_MINOR"
            continue
        fi
        if ! "$c" check >/dev/null 2>&1; then
            log "$c (CRIU $v) fails 'criu check'"
            continue
        fi
        echo "$c"
        return 0
    done
}

# Runtime tools tether and its tests need (python3: the interpreted example service).
apt_install nftables libnftables1 iproute2 util-linux procps ca-certificates python3

# Containers (`tether migrate --container`, tests/container.rs): rootful Podman with runc, which
# restores with the CRIU found first in PATH (tether puts its own first). Podman 4.3's netavark
# has no nftables driver and fails without the iptables binary (Debian's is nft-based); a
# macvlan network gets no rules from it.
apt_install podman runc conmon netavark aardvark-dns iptables golang-github-containers-common

if c=$(working_criu) && [ -n "$c" ]; then
    log "CRIU ok: $c ($("$c" --version | head -1))"
    exit 0
fi

log "no working CRIU >= $MIN_MAJOR.$MIN_MINOR; building it from Debian's source package"
apt_install build-essential dpkg-dev debian-archive-keyring \
    libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev libnl-3-dev \
    libprotobuf-c-dev libprotobuf-dev pkgconf protobuf-c-compiler protobuf-compiler uuid-dev \
    python3-protobuf

work=$(mktemp -d /var/tmp/tether-criu-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/parts"
built=""
for suite in sid testing; do
    cat >"$work/sources.list" <<SRC
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main
SRC
    aptopts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=$work/parts"
             -o "Dir::State::Lists=$work/lists" -o "APT::Sandbox::User=root")
    log "fetching the criu source package from Debian $suite"
    if ! apt-get "${aptopts[@]}" update -qq >/dev/null 2>"$work/update.err"; then
        log "apt-get update for $suite failed: $(tail -2 "$work/update.err")"
        continue
    fi
    rm -rf "$work/src"; mkdir "$work/src"
    # --download-only: apt verifies every file it fetches against the signed index. Some mirrors
    # lack the small Debian packaging tarball; the upstream orig tarball is all `make criu` needs,
    # so a missing .debian.tar.* is tolerated and the orig tarball is unpacked directly.
    (cd "$work/src" && apt-get "${aptopts[@]}" source --download-only -qq criu >/dev/null 2>"$work/source.err") || true
    orig=$(find "$work/src" -maxdepth 1 -name 'criu_*.orig.tar.*' | head -1)
    if [ -z "$orig" ]; then
        log "could not fetch the criu source from $suite: $(tail -2 "$work/source.err")"
        continue
    fi
    dsc=$(find "$work/src" -maxdepth 1 -name 'criu_*.dsc' | head -1)
    if [ -n "$dsc" ] && ls "$work/src"/criu_*.debian.tar.* >/dev/null 2>&1 && command -v dpkg-source >/dev/null; then
        (cd "$work/src" && dpkg-source --no-check -x "$dsc" >/dev/null 2>&1) || true
    fi
    dir=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name 'criu-*' | head -1)
    if [ -z "$dir" ]; then
        log "unpacking $(basename "$orig") (no Debian packaging tarball on this mirror)"
        tar -C "$work/src" -xf "$orig"
        dir=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name 'criu-*' | head -1)
    fi
    [ -n "$dir" ] || { log "no source tree unpacked from $suite"; continue; }
    log "building $(basename "$dir") (make criu)"
    if ! make -C "$dir" -j"$(nproc)" criu >"$work/build.log" 2>&1; then
        log "build of $(basename "$dir") failed; last lines:"; tail -20 "$work/build.log" >&2
        continue
    fi
    install -D -m 0755 "$dir/criu/criu" "$PREFIX/criu"
    built=$(basename "$dir")
    break
done
[ -n "$built" ] || die "could not build CRIU from Debian sources (see messages above)"

c=$(working_criu) || true
[ -n "$c" ] || die "built $built into $PREFIX/criu, but it is not a working CRIU >= $MIN_MAJOR.$MIN_MINOR ('$PREFIX/criu check' fails)"
log "CRIU ok: $c ($("$c" --version | head -1))"
