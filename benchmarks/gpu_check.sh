#!/usr/bin/env bash
# Everything this repo checks on a CUDA GPU, in one run of at most 10 minutes on an H200 (README
# "Measured": On a GPU): the tests marked gpu, then the sparse-vs-dense benchmark per model in the
# CUDA-graph and compiled modes (the compiled rows are what the README still lacks) and the kernels
# each kind of DiT-XL/2 step launches. Each part has its own time limit and writes its results as
# soon as it ends, so a run cut short keeps what finished.
#
#     bash benchmarks/gpu_check.sh out/gpu-check      # from the repo root, diffsparse installed
set -uo pipefail
out=${1:-out/gpu-check}
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv 2>&1 | tee "$log"
# -P: the repo root is not put on sys.path (its diffsparse/ folder is not the installed package)
timeout 90 python3 -P -m pytest -q -p no:cacheprovider -m gpu tests/runtime 2>&1 | tail -8 | tee -a "$log"
# the refresh-step rule's models first (mnist-dit, DiT-XL/2), then the kernels a DiT-XL/2 step of
# each kind launches with its buffer writes (refresh vs dense: what the grouped copies of
# 2026-12-04 night should have cut), then PixArt-alpha with the time left; the limits add up to
# under 10 minutes. The compiled mode's first generation compiles each distinct step graph
# (3 sparse + 1 dense per model): first_run_ms in the JSON
for spec in mnist-dit:80 dit-xl-2:250; do
    model=${spec%%:*}
    timeout "${spec##*:}" python3 benchmarks/gpu_sparse_vs_dense.py --models "$model" --modes graphed compiled \
        --out "$out/$model" 2>&1 | grep -v Warning | tail -6 | tee -a "$log"
done
timeout 70 python3 benchmarks/gpu_mode_agreement.py --model dit-xl-2 --dtypes float16 --kernels-only \
    --out "$out/kernels" 2>&1 | grep -v Warning | tail -8 | tee -a "$log"
timeout 85 python3 benchmarks/gpu_sparse_vs_dense.py --models pixart-alpha-256 --modes graphed compiled \
    --out "$out/pixart-alpha-256" 2>&1 | grep -v Warning | tail -6 | tee -a "$log"
# next, in a second call if time is left: where a step's GEMMs are less latency-bound
#   python3 benchmarks/gpu_sparse_vs_dense.py --models dit-xl-2 --batch 8 --modes graphed compiled --out OUT
