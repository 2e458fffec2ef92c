#!/usr/bin/env bash
# Issue 5's GPU checks in one go, on a machine with a CUDA device (about 5-8 minutes):
#   1. every test marked `gpu` (pinned snapshots, non-blocking copies, device tags, map_location="cuda"),
#   2. the benchmark with CUDA tensors: D2H snapshot rate against a pinned-memory copy, loads with
#      map_location="cuda", every contender as on the CPU.
# Needs a Python environment with a CUDA build of torch, deepspeed, safetensors and torchckpt
# (`./dev` keeps an installed CUDA torch). Results go to $OUT (default: benchmarks/):
#   gpu-tests.txt, gpu-bench.txt, results-cuda.json, results-cuda.png.
# Then, in the repository: copy results-cuda.json/.png into benchmarks/ and run
#   python benchmarks/bench_checkpoint.py --report-only     # rewrites BENCHMARKS.md's GPU section
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks}
mkdir -p "$out"
if [[ -z "${VIRTUAL_ENV:-}" && -z "${CONDA_PREFIX:-}" && -x .venv/bin/python ]]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! $py -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device here (torch $($py -c 'import torch; print(torch.__version__)'))" >&2
    exit 2
fi
status=0
timeout 240 $py -m pytest tests -m gpu -q -p no:cacheprovider -o addopts="--strict-markers -ra" 2>&1 | tee "$out/gpu-tests.txt"
[[ ${PIPESTATUS[0]} == 0 ]] || status=1
timeout 420 $py benchmarks/bench_checkpoint.py --device cuda --results-dir "$out" 2>&1 | tee "$out/gpu-bench.txt"
[[ ${PIPESTATUS[0]} == 0 ]] || status=1
exit $status
