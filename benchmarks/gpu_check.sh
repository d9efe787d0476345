#!/usr/bin/env bash
# Everything this repo checks on a CUDA GPU, in one run of at most 10 minutes on an H200 (README
# "Measured": On a GPU): the tests marked gpu, then the sparse-vs-dense benchmark per model in the
# CUDA-graph and compiled modes (the one row the README still lacks), then DiT-XL/2 at batch 8,
# where a step's GEMMs are less latency-bound. Each part has its own time limit and writes its
# results as soon as it ends, so a run cut short keeps what finished.
#
#     bash benchmarks/gpu_check.sh out/gpu-check      # from the repo root, diffsparse installed
set -uo pipefail
out=${1:-out/gpu-check}
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv 2>&1 | tee "$log"
# -P: the repo root is not put on sys.path (its diffsparse/ folder is not the installed package)
timeout 60 python3 -P -m pytest -q -p no:cacheprovider -m gpu tests/runtime 2>&1 | tail -8 | tee -a "$log"
# most telling first; the limits add up to under 10 minutes
for spec in dit-xl-2:200 mnist-dit:90 pixart-alpha-256:130; do
    model=${spec%%:*}
    timeout "${spec##*:}" python3 benchmarks/gpu_sparse_vs_dense.py --models "$model" --modes graphed compiled \
        --out "$out/$model" 2>&1 | grep -v Warning | tail -6 | tee -a "$log"
done
timeout 80 python3 benchmarks/gpu_sparse_vs_dense.py --models dit-xl-2 --batch 8 --modes graphed \
    --out "$out/dit-xl-2-batch8" 2>&1 | grep -v Warning | tail -4 | tee -a "$log"
