#!/usr/bin/env bash
# The prepared GPU check of issues 18 and 19: run as is on a machine with one CUDA GPU, from the repository root.
#   bash bench/gpu.sh            # everything, full size (configs/model/fcn3.yaml, 721x1440)
#   bash bench/gpu.sh --check    # only the DISCO kernel check
#   bash bench/gpu.sh --small    # everything at 33x64 (configs/model/fcn3_small.yaml); runs on the CPU too
# Prints every figure (JSON lines from bench/gpu_check.py). A training step that runs out of memory prints the
# exact error and the script goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SIZE=()
case "${1:-}" in
  --small) SIZE=(--small) ;;
  --check) "$PY" bench/gpu_check.py kernels; exit 0 ;;
  "") ;;
  *) echo "usage: bash bench/gpu.sh [--small | --check]" >&2; exit 2 ;;
esac
set -x
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: not available"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
# 1. the DISCO CUDA kernels are installed and in use (stops with the install commands if not)
"$PY" bench/gpu_check.py kernels "${SIZE[@]}"
# 2. forward time per step, bf16 and fp32 (batch 1, one member)
"$PY" bench/gpu_check.py forward --dtype bf16 --steps 5 "${SIZE[@]}"
"$PY" bench/gpu_check.py forward --dtype fp32 --steps 5 "${SIZE[@]}"
# 3. one training step in bf16 with activation checkpointing (2 members, 1 step): peak memory and time, or the OOM
"$PY" bench/gpu_check.py train-step --dtype bf16 --checkpointing blocks --members 2 --rollout 1 "${SIZE[@]}"
# 4. a 60-step (15-day) ensemble forecast, time per member (bf16; the paper: ~60 s per member on one H100)
"$PY" bench/gpu_check.py forecast --dtype bf16 --steps 60 --members 4 "${SIZE[@]}"
# 5. issue 19: the DISCO layers in Fourier space vs torch-harmonics' kernels (whichever build is installed), same
#    weights, fp32 forward and forward+backward alternating, medians / mins / ratio and saved-activation memory
if [ "${SIZE[*]:-}" = "--small" ]; then
  "$PY" bench/model_step.py --compare-kernels --batch 1 --repeats 3 --warmup 1
else
  "$PY" bench/model_step.py --compare-kernels --config configs/model/fcn3.yaml --device cuda --batch 1 --repeats 5 --warmup 2
fi
