#!/usr/bin/env bash
# CI's fuzz step (run by .ci/run after the tests): builds every cargo-fuzz target (installing
# cargo-fuzz if missing) and runs each for FUZZ_SECONDS (default 30) on its committed corpus,
# niced, one job. Prints one line per target and exits non-zero if any target crashed (the
# crash input is in fuzz/artifacts/TARGET/, its log in fuzz/ci-logs/TARGET.log).
set -uo pipefail
cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-30}

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
else
    # libFuzzer needs -Z flags: let a stable toolchain take them.
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz || { echo "fuzz: cannot install cargo-fuzz"; exit 1; }
fi

started=$(date +%s)
if ! nice "${fuzz[@]}" build >ci-build.log 2>&1; then
    tail -40 ci-build.log
    echo "fuzz: build failed"
    exit 1
fi
echo "fuzz: targets built in $(( $(date +%s) - started )) s"

# cargo fuzz builds under $CARGO_TARGET_DIR when it is set (as .ci/run allows).
bin=${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release
mkdir -p ci-logs
failed=()
found=()
targets=$("${fuzz[@]}" list | grep -v -e '^make_seeds$')
for target in $targets; do
    rm -rf "artifacts/$target" "ci-corpus/$target" fuzz-0.log
    mkdir -p "artifacts/$target" "ci-corpus/$target"
    # Run on a scratch copy: new inputs found in CI are not committed.
    cp corpus/"$target"/* "ci-corpus/$target/" 2>/dev/null
    # First the committed corpus alone (regressions: deterministic, a crash fails CI).
    if ! nice -n 19 "$bin/$target" -runs=0 -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
        -artifact_prefix="artifacts/$target/" "ci-corpus/$target" >"ci-logs/$target.replay.log" 2>&1; then
        failed+=("$target")
        echo "fuzz $target: CORPUS REGRESSION"
        grep -m1 -E 'panicked at|ERROR: ' "ci-logs/$target.replay.log"
        continue
    fi
    # Then exploration: a crash found here is a new finding, printed and kept in
    # fuzz/artifacts/, and fails CI only with TAPIR_FUZZ_STRICT=1 (a 30 s random search must
    # not make CI a coin toss; findings go to docs/RELIABILITY.md).
    nice -n 19 "$bin/$target" -jobs=1 -workers=1 -max_total_time="$seconds" -timeout=10 \
        -rss_limit_mb=2048 -malloc_limit_mb=1024 -artifact_prefix="artifacts/$target/" \
        "ci-corpus/$target" >"ci-logs/$target.log" 2>&1
    rc=$?
    # -jobs=1 runs the fuzzer in a child that logs to fuzz-0.log.
    [ -f fuzz-0.log ] && mv fuzz-0.log "ci-logs/$target.log"
    stats=$(grep -E '^#[0-9]+' "ci-logs/$target.log" | tail -1 | cut -c1-100)
    crash=$(ls "artifacts/$target" | head -1)
    if [ "$rc" -ne 0 ] || [ -n "$crash" ]; then
        found+=("$target")
        [ "${TAPIR_FUZZ_STRICT:-0}" = 1 ] && failed+=("$target")
        echo "fuzz $target: NEW FINDING (exit $rc) ${crash:+artifacts/$target/$crash} | $stats"
        grep -m1 -E 'panicked at|ERROR: ' "ci-logs/$target.log"
    else
        echo "fuzz $target: ok | $stats"
    fi
done
echo "fuzz: ${#found[@]} new findings${found[*]:+: ${found[*]}} (see fuzz/artifacts/)"
echo "fuzz: ${#failed[@]} of $(echo "$targets" | wc -w) targets crashed${failed[*]:+: ${failed[*]}} ($(( $(date +%s) - started )) s in all)"
[ ${#failed[@]} -eq 0 ]
