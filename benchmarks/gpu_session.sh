#!/usr/bin/env bash
# The checks of a new GPU node in one run of under 8 minutes on one H100/H200 (on a node without internet access,
# benchmarks/gpu_wheels.sh gives the wheels and the install line that precede this script). Each step has its own
# time limit, cut to what is left of BUDGET_S (default 460 s), so one slow step cannot take the others' figures with
# it; a step cut below 30 s by the budget is skipped and said so. Everything lands in $OUT (default gpu_out/):
#   machine.txt                  nvidia-smi and the versions;
#   pytest_gpu.txt               the GPU tier, `pytest -m gpu` (tests/gpu/);
#   gpu_system_plan_flex.{txt,json}
#                                benchmarks/gpu_system.py --plan at the Qwen-14B + CLIP-L/336 shape: the micro-batch,
#                                checkpointing and ZeRO stage `mmdist plan` recommends for this card (a global batch
#                                of 16 samples), FlexAttention over the packed rows: the trainer against its bare model
#                                (tokens/s ratio, steady MFU/HFU, peak memory against the plan's, the phases);
#   gpu_system_z{1,3}_{sdpa_per_sample,flex}.{txt,json}
#                                the same at 16 samples a step with checkpointing, the trainer at ZeRO-1 and ZeRO-3,
#                                with each packed-attention kernel on both sides;
#   step_time_model.txt, calibration/
#                                benchmarks/step_time_model.py --gpu: `mmdist plan --calibrate` on this GPU (the
#                                rates file calibration/calibration-1.json, for `mmdist plan --calibration`), then
#                                another shape's ZeRO-1/2/3 step times predicted against the trainer's;
#   session.txt                  each step's command, limit, exit code and seconds.
# DRY_RUN=1 prints the steps and their limits, as if each took its whole limit, and runs nothing. ORDER lists the
# steps to run, in order (default: machine, the plan's settings with flex, the GPU tests, ZeRO-3 with flex, the
# calibration, then the other system runs; a step the budget cannot start is skipped and said so); a system run is
# named z{stage}_{kernel}, or plan_{kernel} for the plan's settings. On one H100 a system run took 61-68 s, the GPU tests over 165 s, the calibration over 150 s. SMOKE_S, SYSTEM_S and CALIBRATE_S set the per-step limits, SYSTEM_STEPS the steps of each
# gpu_system run (warm-up included), CALIBRATE_STEPS the steps of each calibration and prediction run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
budget=${BUDGET_S:-460}
start=$SECONDS
spent=0  # DRY_RUN: the seconds the steps before would take at their limits
order=${ORDER:-machine plan_flex pytest_gpu z3_flex calibrate z1_flex z1_sdpa_per_sample z3_sdpa_per_sample}

# step NAME LIMIT_S LOG COMMAND...: COMMAND under min(LIMIT_S, what is left), its output to the terminal and LOG.
step() {
    local name=$1 asked=$2 limit=$2 log=$3 left
    shift 3
    left=$((budget - (SECONDS - start) - spent - 5))
    (( limit > left )) && limit=$left
    if (( limit < 30 && limit < asked )); then  # cut below 30 s by the budget: not worth starting
        echo "${DRY_RUN:+[dry run] }$name skipped: ${left} s of the ${budget} s budget left" | tee -a "$out/session.txt"
        return 0
    fi
    if [[ -n "${DRY_RUN:-}" ]]; then
        echo "[dry run] $name: limit ${limit} s: $* > $log"
        spent=$((spent + limit))
        return 0
    fi
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    echo "$name exit $rc after $((SECONDS - t0)) s (limit $limit s): $*" | tee -a "$out/session.txt" "$log"
}

: > "$out/session.txt"
for name in $order; do
    case $name in
    machine)
        step machine 20 "$out/machine.txt" bash -c 'nvidia-smi; nproc; python3 -c "import torch, transformers, \
deepspeed; print(torch.__version__, torch.version.cuda, transformers.__version__, deepspeed.__version__)"' ;;
    pytest_gpu)
        # each test under its own limit where pytest-timeout is installed, so that one slow test cannot hide
        # the others' failures (pytest prints them only at the end)
        per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=90")
        step pytest_gpu "${SMOKE_S:-200}" "$out/pytest_gpu.txt" \
            python3 -m pytest -m gpu -q -rfEs --tb=short --durations=10 -p no:cacheprovider $per_test ;;
    calibrate)
        step calibrate "${CALIBRATE_S:-120}" "$out/step_time_model.txt" python3 benchmarks/step_time_model.py --gpu \
            --steps "${CALIBRATE_STEPS:-6}" --out "$out/calibration" ;;
    z[0-3]_* | plan_*)
        stage=${name%%_*}; kernel=${name#*_}
        if [[ $stage == plan ]]; then how=(--plan); else how=(--zero-stage "${stage#z}"); fi
        step "gpu_system_$name" "${SYSTEM_S:-120}" "$out/gpu_system_$name.txt" python3 benchmarks/gpu_system.py \
            "${how[@]}" --packed-attention "$kernel" --steps "${SYSTEM_STEPS:-4}" \
            --workdir "/tmp/gpu_system_$name" --json "$out/gpu_system_$name.json" ;;
    *) echo "unknown step $name (ORDER)" | tee -a "$out/session.txt" ;;
    esac
done
echo "session: $((SECONDS - start)) s of the ${budget} s budget" | tee -a "$out/session.txt"
