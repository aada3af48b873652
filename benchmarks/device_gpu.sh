#!/usr/bin/env bash
# Issue 7's GPU check in one device call: the CUDA-only tests (full assertion messages kept), then the
# bench_gpu.py table. The device image has torch, transformers, peft and triton; this installs only the repo.
# From the repo root on the device (no payload to carry: the models and experts are random):
#     bash benchmarks/device_gpu.sh [BENCH_ARGS...]     # default: --experts 8,64 --skip plain
# Writes $OUT/cuda_tests.log, $OUT/bench.log and bench_gpu's md/json in $OUT; prints the summaries.
set -uo pipefail
out=${OUT:-/tmp/device-gpu-out}; mkdir -p "$out"
site=/tmp/spectr-site
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target "$site" . || exit 1
export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Only the tests that need a GPU (they skip on a CPU); -rfE keeps each failure's reason in the log's summary.
# -P and --import-mode=append: the repo root must not shadow the installed package (its spectr/ has no
# runtime/); the import-hygiene test deselected runs python -c from the repo root, so it cannot pass here.
timeout "${TEST_LIMIT:-200}" python3 -P -m pytest -q -rfE --no-header -p no:cacheprovider --import-mode=append \
    --deselect tests/runtime/test_model.py::test_runtime_imports_no_heavy_packages \
    tests/runtime/test_kernels.py tests/runtime/test_fused.py tests/runtime/test_group_gemm.py \
    tests/runtime/test_model.py tests/runtime/test_token_top_k.py > "$out/cuda_tests.log" 2>&1
echo "cuda tests: exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$out/cuda_tests.log" | tail -15
args=("$@"); [ ${#args[@]} -eq 0 ] && args=(--experts 8,64 --skip plain)
timeout "${BENCH_LIMIT:-330}" python3 benchmarks/bench_gpu.py "${args[@]}" --out "$out" > "$out/bench.log" 2>&1
echo "bench: exit $?"; tail -40 "$out/bench.log"
