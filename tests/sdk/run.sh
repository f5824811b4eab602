#!/usr/bin/env bash
# Runs the Box SDK compatibility tests: the shipped Box SDKs, unchanged, against nudge.
#
# Installs what they need on a fresh machine (Rust, python3 and node present):
#   tests/sdk/.venv          pytest + Python boxsdk 10.x (box_sdk_gen)   requirements.txt
#   tests/sdk/.venv-boxsdk3  Python boxsdk 3.x                            requirements-boxsdk3.txt
#   tests/sdk/node           box-node-sdk 3.x and 10.x                    npm ci (package-lock.json)
# builds nudge (cargo build --release), runs pytest and exits with its status.
# Extra arguments go to pytest, e.g. tests/sdk/run.sh -k steady -n 0
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORKERS="${SDK_TEST_WORKERS:-4}"

log() { printf '[sdk-tests] %s\n' "$*" >&2; }

make_venv() { # dir requirements
  local dir="$1" req="$2" stamp
  stamp="$(sha256sum "$req" | cut -d' ' -f1)"
  if [[ -x "$dir/bin/python" && -f "$dir/.stamp" && "$(cat "$dir/.stamp")" == "$stamp" ]]; then
    return 0
  fi
  log "creating $dir from $(basename "$req")"
  rm -rf "$dir"
  if ! "$PYTHON" -m venv "$dir" 2>/dev/null; then
    # Debian's python3 keeps venv (ensurepip) in a separate package.
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
      log "python3 -m venv failed: installing python3-venv"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$dir"
      "$PYTHON" -m venv "$dir"
    else
      log "python3 -m venv failed and python3-venv cannot be installed here"; exit 2
    fi
  fi
  "$dir/bin/python" -m pip install --disable-pip-version-check -q -r "$req"
  echo "$stamp" >"$dir/.stamp"
}

make_venv "$HERE/.venv" "$HERE/requirements.txt"
make_venv "$HERE/.venv-boxsdk3" "$HERE/requirements-boxsdk3.txt"

NODE_STAMP="$(sha256sum "$HERE/node/package-lock.json" | cut -d' ' -f1)"
if [[ ! -f "$HERE/node/node_modules/.stamp" || "$(cat "$HERE/node/node_modules/.stamp")" != "$NODE_STAMP" ]]; then
  log "npm ci in tests/sdk/node"
  (cd "$HERE/node" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$NODE_STAMP" >"$HERE/node/node_modules/.stamp"
fi

if [[ -z "${NUDGE_BIN:-}" ]]; then
  log "cargo build --release"
  (cd "$REPO" && cargo build --release --quiet)
  export NUDGE_BIN="$REPO/target/release/nudge"
fi

cd "$HERE"
set +e
"$HERE/.venv/bin/python" -m pytest -n "$WORKERS" "$@" test_box_sdks.py
status=$?
set -e
exit "$status"
