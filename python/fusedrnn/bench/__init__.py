"""Benchmark fusedrnn against torch.nn, ONNX Runtime and the NumPy reference.

Run ``python -m fusedrnn.bench --help``. The modules, one job each:

- cli.py       arguments and the run (peaks, then every case)
- cases.py     the DESIGN.md matrix, the --quick subset, FLOP counts and each case's arrays
- peers/       fusedrnn itself and the peers (torch.nn, ONNX Runtime, NumPy reference)
- check.py     fusedrnn against the reference, and each peer against fusedrnn, before timing
- timing.py    interleaved blocks of repetitions with a time budget
- peak.py      this machine's float32 GEMM peak (our GEMM and NumPy's matmul)
- machine.py   CPU, ISA, versions, NumPy's BLAS
- runner.py    one case: check, warm up, compare, time
- memory.py    training peak memory beside torch's, each in a fresh process (``--memory``)
- outputs.py   the --json and --plot files, checked writable before anything is timed
- report.py    text table, JSON, plot, Markdown (``python -m fusedrnn.bench.report``)
"""
