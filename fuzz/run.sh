#!/usr/bin/env bash
# Runs every fuzz target for SECONDS seconds each (default 60) and exits
# non-zero if any of them crashed (panic, hang over 5 s, over 512 MB RSS).
#
#   fuzz/run.sh [SECONDS]            # all targets
#   TARGETS="framer auth" fuzz/run.sh 30
#   FUZZ_ARGS="-runs=10000000" fuzz/run.sh 0   # a fixed number of runs instead
#
# The seeds in fuzz/corpus/<target> are read, never written: what libFuzzer
# finds goes to fuzz/target/corpus/<target>, crashes to fuzz/artifacts/<target>.
# Needs a nightly toolchain and `cargo install cargo-fuzz --locked`.
set -uo pipefail
cd "$(dirname "$0")"

seconds=${1:-60}
targets=(${TARGETS:-startup framer auth messages config})
toolchain=${FUZZ_TOOLCHAIN:-nightly}
read -r -a extra <<< "${FUZZ_ARGS:-}"

cargo "+$toolchain" fuzz build || exit 2

failed=()
for t in "${targets[@]}"; do
    mkdir -p "target/corpus/$t"
    args=(-rss_limit_mb=512 -timeout=5 -print_final_stats=1 "${extra[@]}")
    if [ "$seconds" != 0 ]; then
        args+=("-max_total_time=$seconds")
    fi
    echo "=== $t: ${args[*]}"
    if ! cargo "+$toolchain" fuzz run "$t" "target/corpus/$t" "corpus/$t" -- "${args[@]}"; then
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz/run.sh: crashes in: ${failed[*]} (see fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz/run.sh: no crashes in ${targets[*]}"
