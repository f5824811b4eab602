#!/usr/bin/env bash
# Rough publishes/s through one Redis into nudge nodes (docs/scaling-out.md, "Capacity").
#
# Starts a redis-server and NODES nudge nodes (release build) on free loopback ports, appends
# N entries to the bus stream with redis-benchmark (`XADD nudge:publish * m <publish>`,
# CLIENTS connections, PIPELINE deep, random topics user:0..99999), and times until every
# node has applied all of them
# (nudge_publishes_total{source="bus"}). BATCH > 1 sends arrays of BATCH publishes per
# message. Bounded: N messages, at most LIMIT seconds of waiting; everything it started is
# stopped at exit. Loopback only.
#
#   bash scripts/bus-throughput.sh                    # N=200000 NODES=2 CLIENTS=50 PIPELINE=16
#   N=50000 BATCH=10 bash scripts/bus-throughput.sh
#   BIN=/path/to/old/nudge MODE=pubsub bash scripts/bus-throughput.sh   # a build from before
#       the stream (commit 9a380cb and older), fed with PUBLISH, for a side-by-side run
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

N=${N:-200000}
NODES=${NODES:-2}
CLIENTS=${CLIENTS:-50}
PIPELINE=${PIPELINE:-16}
BATCH=${BATCH:-1}
LIMIT=${LIMIT:-120}
BIN=${BIN:-target/release/nudge}
MODE=${MODE:-stream}

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
    echo "needs redis-server and redis-benchmark: apt-get install redis-server" >&2
    exit 1
fi
[ -x "$BIN" ] || cargo build --release --locked
case "$MODE" in
    stream) send=(XADD nudge:publish '*' m) ;;
    pubsub) send=(PUBLISH nudge:publish) ;;
    *) echo "MODE is stream or pubsub" >&2; exit 1 ;;
esac

tmp=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
deadline() { [ "$(date +%s)" -lt "$1" ] || { echo "timed out: $2" >&2; exit 1; }; }

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
    --daemonize no --loglevel warning >/dev/null 2>&1 &
pids+=($!)
until=$(( $(date +%s) + 10 ))
until redis-cli -p "$rport" ping >/dev/null 2>&1; do deadline "$until" "redis-server"; sleep 0.05; done

internal=()
for i in $(seq 1 "$NODES"); do
    RUST_LOG=warn,nudge=info "$BIN" --listen 127.0.0.1:0 --internal-listen 127.0.0.1:0 \
        --redis-url "redis://127.0.0.1:$rport" 2>"$tmp/node$i.log" &
    pids+=($!)
    until=$(( $(date +%s) + 10 ))
    until addr=$(grep -o 'listening internal=[0-9.:]*' "$tmp/node$i.log" | cut -d= -f2) && [ -n "$addr" ]; do
        deadline "$until" "node $i address"; sleep 0.05
    done
    until curl -sf "http://$addr/readyz" >/dev/null; do deadline "$until" "node $i ready"; sleep 0.05; done
    internal+=("$addr")
done

applied() {
    curl -s "http://$1/metrics" | awk '/^nudge_publishes_total\{source="bus"\}/ {print $2}'
}

if [ "$BATCH" -eq 1 ]; then
    payload='{"topic":"user:__rand_int__"}'
else
    payload=$(printf '{"topic":"user:__rand_int__"},%.0s' $(seq 1 "$BATCH"))
    payload="[${payload%,}]"
fi
want=$(( N * BATCH ))
echo "redis-server 127.0.0.1:$rport, $NODES nodes ($MODE); $N messages of $BATCH publish(es), $CLIENTS clients, pipeline $PIPELINE"
start=$(date +%s.%N)
redis-benchmark -p "$rport" -n "$N" -c "$CLIENTS" -P "$PIPELINE" -r 100000 -q \
    "${send[@]}" "$payload" | tr '\r' '\n' | grep -v '^$' | tail -1
sent=$(date +%s.%N)
until=$(( $(date +%s) + LIMIT ))
for addr in "${internal[@]}"; do
    until [ "$(applied "$addr" | cut -d. -f1)" -ge "$want" ] 2>/dev/null; do
        deadline "$until" "node $addr applied $(applied "$addr") of $want"; sleep 0.05
    done
done
done_at=$(date +%s.%N)
for addr in "${internal[@]}"; do
    echo "node $addr: applied $(applied "$addr") publishes from the bus"
done
# What Redis did: calls and time per command (the readers' XREADs, the load's XADD/PUBLISH).
redis-cli -p "$rport" info commandstats | grep -E '^cmdstat_(xadd|xread|publish):' | tr -d '\r' |
    cut -d, -f1-3 || true
# CPU (user + system) each process spent, start-up included, from /proc/PID/stat (fields 14, 15).
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$1/stat"; }
echo "CPU: redis-server $(cpu "${pids[0]}") s; nodes$(for pid in "${pids[@]:1}"; do printf ' %s s' "$(cpu "$pid")"; done)"
python3 - "$start" "$sent" "$done_at" "$N" "$want" <<'EOF'
import sys
start, sent, done, n, want = map(float, sys.argv[1:])
print(f"sent {int(n)} messages in {sent-start:.2f} s ({n/(sent-start):,.0f} msg/s into Redis)")
print(f"every node applied all {int(want)} publishes {done-start:.2f} s after the start: "
      f"{want/(done-start):,.0f} publishes/s end to end")
EOF
