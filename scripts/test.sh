#!/usr/bin/env bash
# The one test command (README "Test"): installs what the tests need on a fresh Debian
# machine with only Rust present, then runs every suite. Safe to run again: installs are
# skipped when already there.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

step() { printf '\n== %s\n' "$*"; }

step "cargo test (unit and integration tests, real sockets)"
cargo test --locked --all-targets

if [ -f deploy/check.sh ]; then
    step "deploy/ checks"
    bash deploy/check.sh
fi
