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
# AMX_PASS=1 adds a pass over the GEMM-bound configs with FUSEDRNN_ISA=amx (fusedrnn's products
# on AMX tiles instead of the FMA the peers run, which the default kernels run too; see
# bench/ISA_AB.md) into bench/RESULTS_amx.md: off by default, it makes the run about half as
# long again. (bench/RESULTS_avx512.md is the converse pass of an earlier session, when the
# tiles were the default on a CPU with AMX.)
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
if [ "${AMX_PASS:-0}" = 1 ]; then
    FUSEDRNN_ISA=amx PYTHONPATH="$snapshot" python -m fusedrnn.bench \
        --configs fastrnns,wide,deepbench-train --json bench/results_amx.json \
        --plot bench/speedups_amx.png 2>&1 | tee bench/out/amx_run.log
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    PYTHONPATH="$snapshot" python -m fusedrnn.bench.report bench/results_amx.json \
        bench/RESULTS_amx.md --plot-name speedups_amx.png \
        && echo "wrote bench/RESULTS_amx.md"
fi
exit "$status"
