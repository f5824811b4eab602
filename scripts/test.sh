#!/usr/bin/env bash
# The one test command (README "Run and test"): installs what the tests need on a fresh Debian
# machine with only Rust present, then runs every suite. Safe to run again: installs are
# skipped when already there.
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

step() { printf '\n== %s\n' "$*"; }

# What the tests start for real, from Debian's packages: redis-server (the bus tests in
# tests/it/bus.rs start their own on free ports), promtool and the Prometheus server (the
# metrics tests in tests/it/ops.rs check a real scrape and have Prometheus scrape a node),
# nginx (the tier in tests/tier/ runs deploy/compose/nginx.conf), chromium (tests/browser/
# loads nudge.js in it, headless) and nodejs (nudge.js's own tests, the Node Box SDKs).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || missing+=(prometheus)
{ command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || missing+=(nginx)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "scripts/test.sh: the tests need ${missing[*]} (Debian packages); run as root once to install them" >&2
        exit 2
    fi
    step "installing ${missing[*]} (Debian packages)"
    # Both packages start a daemon on install; a policy-rc.d that says no (honoured by
    # invoke-rc.d and deb-systemd-invoke) keeps them from running: the tests start their own.
    # An existing policy is left as it is.
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    rc=0
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null || rc=$?
    if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
    # On a booted systemd the packages also enabled their services for the next boot: here
    # they are test tools, not services.
    if [ -d /run/systemd/system ]; then
        systemctl disable --quiet prometheus redis-server nginx 2>/dev/null || true
    fi
    if [ "$rc" -ne 0 ]; then
        echo "scripts/test.sh: apt-get install ${missing[*]} failed" >&2
        exit 2
    fi
fi
# Tests that need an external tool fail without it here (a bare `cargo test` skips them).
export NUDGE_REQUIRE_TOOLS=1

step "cargo test (unit and integration tests, real sockets, the real binary)"
cargo test --locked --all-targets

step "churn soak, short mode (examples/soak: lost changes, leaks, memory; docs/reliability.md)"
cargo build --locked --bin nudge --example soak
# Two nodes on a Redis bus with the fault drills (Redis killed, a node drained, a burst of
# clients), then the leak and memory checks.
target/debug/examples/soak --duration 40s --clients 300 --burst 500 --topics 100 --nodes 2 --drills

if [ -f tests/sdk/run.sh ]; then
    step "Box SDK compatibility: the shipped Box SDKs, unchanged, against nudge (tests/sdk)"
    # The debug binary `cargo test` just built serves these tests as well as a release one,
    # and saves CI a second full build.
    NUDGE_BIN="$PWD/target/debug/nudge" bash tests/sdk/run.sh
fi

step "nudge.js: its logic under node:test (clients/js/test)"
node --test clients/js/test/

step "nudge.js in headless Chromium against a node with --cors-origin (tests/browser)"
NUDGE_BIN="$PWD/target/debug/nudge" node --test tests/browser/

if [ -x tests/sdk/.venv/bin/python ]; then
    step "the tier for real: nginx with deploy/compose/nginx.conf, three nodes, Redis, the Box SDKs (tests/tier)"
    # Reuses the SDK suite's venv and clients, which tests/sdk/run.sh just installed.
    (cd tests/tier && NUDGE_BIN="$PWD/../../target/debug/nudge" ../sdk/.venv/bin/python -m pytest -q -p no:cacheprovider test_tier.py)
fi

if [ -f deploy/check.sh ]; then
    step "deploy/ checks"
    bash deploy/check.sh
fi

step "docs: every relative Markdown link and anchor resolves"
python3 scripts/check-doc-links.py
