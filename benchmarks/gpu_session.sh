#!/usr/bin/env bash
# The checks of a new GPU node in one run (on a node without internet access, benchmarks/gpu_wheels.sh gives the
# wheels and the install line that precede this script). Each step has its own time limit so one slow step
# cannot take the others' figures with it; everything lands in $OUT (or gpu_out/ when $OUT is unset):
#   1. nvidia-smi and the versions;
#   2. the single-GPU smoke tier, `pytest -m gpu` (tests/gpu/);
#   3. benchmarks/gpu_system.py: the trainer against its own model at the Qwen-14B + CLIP-L/336 shape
#      (tokens/s ratio, steady MFU/HFU, peak memory, the per-phase breakdown), as JSON and text.
#      PACKED=sdpa_per_sample|flex|auto passes --packed-attention $PACKED (both sides, bare rows packed) and
#      names the files gpu_system_$PACKED.{json,txt}; unset (the default): no flag, gpu_system.{json,txt}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
{ nvidia-smi; python3 -c 'import torch, transformers, deepspeed; print(torch.__version__, torch.version.cuda, transformers.__version__, deepspeed.__version__)'; } \
    > "$out/machine.txt" 2>&1
timeout "${SMOKE_S:-200}" python3 -m pytest -m gpu -q -rs --durations=10 2>&1 | tee "$out/pytest_gpu.txt"
echo "pytest -m gpu exit ${PIPESTATUS[0]}" | tee -a "$out/pytest_gpu.txt"
packed_args=()
[ -n "${PACKED:-}" ] && packed_args=(--packed-attention "$PACKED")
system=gpu_system${PACKED:+_$PACKED}
timeout "${SYSTEM_S:-330}" python3 benchmarks/gpu_system.py ${packed_args[@]+"${packed_args[@]}"} --json "$out/$system.json" 2>&1 \
    | tee "$out/$system.txt"
echo "gpu_system${PACKED:+ --packed-attention $PACKED} exit ${PIPESTATUS[0]}" | tee -a "$out/$system.txt"
