#!/usr/bin/env bash
# The one test command (README "Test"): installs what the tests need on a fresh Debian
# machine with only Rust present, then runs every suite. Safe to run again: installs are
# skipped when already there.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

step() { printf '\n== %s\n' "$*"; }

# The bus tests (tests/it/bus.rs) start real redis-server processes of their own.
if ! command -v redis-server >/dev/null; then
    step "installing redis-server (Debian package) for the bus tests"
    export DEBIAN_FRONTEND=noninteractive
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi

step "cargo test (unit and integration tests, real sockets)"
cargo test --locked --all-targets

if [ -f deploy/check.sh ]; then
    step "deploy/ checks"
    bash deploy/check.sh
fi
