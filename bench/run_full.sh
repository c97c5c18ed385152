#!/usr/bin/env bash
# Regenerate bench/RESULTS.md: the full benchmark matrix against every installed peer, then the
# training peak memory of every config and cell (--memory, a fresh process per measurement), then
# the Markdown rendered from bench/results.json (with bench/speedups.png embedded). The progress
# log goes to bench/out/full_run.log. Takes 7-8 minutes on 2 cores (6.9-8.2 in the recorded runs,
# memory included): run it on an idle machine.
#
# It runs a snapshot of python/fusedrnn (the package built in the tree) copied to a temporary
# folder, so rebuilding the extension during the run cannot pull _C*.so from under it.
# Extra arguments go to the benchmark (e.g. --threads 1).
#
# AVX512_PASS=1 adds a pass over the GEMM-bound configs with FUSEDRNN_ISA=avx512 (fusedrnn on
# the same FMA as the peers instead of AMX tiles) into bench/RESULTS_avx512.md: off by default,
# it makes the run about half as long again.
set -uo pipefail
cd "$(dirname "$0")/.."
snapshot="$(mktemp -d)"
trap 'rm -rf "$snapshot"' EXIT
cp -r python/fusedrnn "$snapshot/"
mkdir -p bench/out
PYTHONPATH="$snapshot" python -m fusedrnn.bench --json bench/results.json \
    --plot bench/speedups.png --memory "$@" 2>&1 | tee bench/out/full_run.log
status=${PIPESTATUS[0]}           # 1 when a case failed its check: still render the results
if [ -f bench/results.json ]; then
    PYTHONPATH="$snapshot" python -m fusedrnn.bench.report bench/results.json bench/RESULTS.md \
        && echo "wrote bench/RESULTS.md"
fi
if [ "${AVX512_PASS:-0}" = 1 ]; then
    FUSEDRNN_ISA=avx512 PYTHONPATH="$snapshot" python -m fusedrnn.bench \
        --configs fastrnns,wide,deepbench-train --json bench/results_avx512.json \
        --plot bench/speedups_avx512.png 2>&1 | tee bench/out/avx512_run.log
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    PYTHONPATH="$snapshot" python -m fusedrnn.bench.report bench/results_avx512.json \
        bench/RESULTS_avx512.md --plot-name speedups_avx512.png \
        && echo "wrote bench/RESULTS_avx512.md"
fi
exit "$status"
