#!/usr/bin/env bash
# Fuzzes nudge's parsers with cargo fuzz (libFuzzer), each target for a bounded time:
#   bash scripts/fuzz.sh            # every target, 60 s each
#   bash scripts/fuzz.sh 300 publish_body
# Targets: subscribe_query, publish_body, register_body, fast_classify, both_paths (fuzz/fuzz_targets/). Seeds come
# from fuzz/corpus/<target>/ (committed) and are never written to; what libFuzzer finds goes
# to fuzz/target/work-corpus/<target>/. A crash leaves its input in fuzz/artifacts/<target>/:
# fix it, copy the input to fuzz/regressions/<target>/ (replayed by `cargo test`, see
# tests/it/fuzz_corpus.rs) and add a unit test beside the code it broke.
#
# cargo fuzz wants a nightly compiler for `-Z` flags; with only stable Rust here,
# RUSTC_BOOTSTRAP=1 lets stable accept them (AddressSanitizer included).
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(subscribe_query publish_body register_body fast_classify both_paths)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
status=0
for target in "${targets[@]}"; do
    echo "== fuzzing $target for ${seconds}s"
    work="fuzz/target/work-corpus/$target"
    mkdir -p "$work"
    if ! cargo fuzz run --fuzz-dir fuzz "$target" "$work" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
        echo "!! $target found a crash: see fuzz/artifacts/$target/"
        status=1
    fi
done
exit $status
