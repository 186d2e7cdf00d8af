# shellcheck shell=bash
# Shared body of slurm/stage1.sh and slurm/stage2.sh: sourced (not run) inside the batch script.
#
# Every setting is an environment variable with a default, so the same scripts
# run the 8-GPU recipe and a 2-process CPU smoke job:
#
#   CONFIG          run config (YAML)                         stage default: configs/align.yaml / configs/fuse.yaml
#   RUN_DIR         run folder (checkpoints, logs, export)    stage default: runs/align / runs/fuse
#   OVERRIDES       extra dotted overrides, space-separated   e.g. "train.max_steps=20 engine.zero_stage=3"
#   LAUNCH_MODE     srun     : one task per GPU (default), each task is one rank
#                   torchrun : one task per node running `torchrun --nproc_per_node=NPROC_PER_NODE`
#   NPROC_PER_NODE  ranks per node for LAUNCH_MODE=torchrun   default: GPUs on the node, else SLURM_NTASKS_PER_NODE
#   TRAIN_SCRIPT    the entry point                            default: launch/train.py
#   PYTHON          interpreter                                default: python
#   MMDIST_REPO     repository root                            default: the folder sbatch was called from
#   DS_ACCELERATOR  set to `cpu` for a CPU job (gloo backend, no CUDA)
#   MASTER_ADDR / MASTER_PORT   rendezvous; default: first host of the allocation, port from the job id
#   OMP_NUM_THREADS, NCCL_DEBUG, NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE, MMDIST_DIST_TIMEOUT: passed through
#
# sbatch copies the batch script into its spool folder, so paths are taken
# relative to MMDIST_REPO (SLURM_SUBMIT_DIR), never to the script's own location.

set -euo pipefail

REPO=${MMDIST_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
PYTHON=${PYTHON:-python}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-launch/train.py}
LAUNCH_MODE=${LAUNCH_MODE:-srun}
OVERRIDES=${OVERRIDES:-}

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "error: not inside a Slurm job; submit with: sbatch $0 (or run launch/train.py with torchrun/deepspeed directly)" >&2
    exit 2
fi
if [[ ! -f "$CONFIG" ]]; then
    echo "error: CONFIG=$CONFIG not found under $REPO; set CONFIG=path/to/run.yaml" >&2
    exit 2
fi

# --- rendezvous: the first node of the allocation is the master ---------------------------------
# (mmdist.training.launch_env derives the same values itself; exporting them makes the log show them.)
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# --- knobs that matter ----------------------------------------------------------------------------
# One OpenMP/MKL thread pool per rank sized to its CPUs; the default (all cores per rank) oversubscribes.
OMP_FROM_USER=${OMP_NUM_THREADS:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# A failed or timed-out NCCL collective aborts the rank instead of hanging it (both spellings: torch >= 2.2 and older).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Collective timeout (s) of mmdist's process group: a dead peer ends the job within this bound.
export MMDIST_DIST_TIMEOUT=${MMDIST_DIST_TIMEOUT:-600}
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false

ARGS=(--config "$CONFIG" "run_dir=$RUN_DIR")
if declare -p STAGE_ARGS >/dev/null 2>&1; then ARGS+=("${STAGE_ARGS[@]}"); fi
# OVERRIDES is split on whitespace only (no glob expansion: values like [a,b] stay as written).
read -r -a EXTRA_OVERRIDES <<< "$OVERRIDES"
ARGS+=("${EXTRA_OVERRIDES[@]}")

echo "[mmdist] job $SLURM_JOB_ID on ${SLURM_JOB_NUM_NODES:-1} node(s) ($SLURM_JOB_NODELIST), tasks ${SLURM_NTASKS:-?}," \
     "mode $LAUNCH_MODE, master $MASTER_ADDR:$MASTER_PORT, OMP_NUM_THREADS=$OMP_NUM_THREADS, DS_ACCELERATOR=${DS_ACCELERATOR:-}"
echo "[mmdist] $PYTHON $TRAIN_SCRIPT ${ARGS[*]}"

# --kill-on-bad-exit=1: when one rank dies (OOM, SIGKILL, a crash) Slurm kills the others and the step
# fails, instead of the survivors waiting in a collective until the wall-clock limit.
case "$LAUNCH_MODE" in
    srun)
        srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
            "$PYTHON" "$TRAIN_SCRIPT" "${ARGS[@]}"
        ;;
    torchrun)
        # One torchrun agent per node; it starts NPROC_PER_NODE ranks and restarts nothing (--max-restarts=0):
        # a failure ends the step and the next submission resumes from the last checkpoint.
        NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}
        if [[ -z "$OMP_FROM_USER" ]]; then
            # The node's CPUs are shared by NPROC_PER_NODE ranks here, not one task each.
            OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-1} * ${SLURM_NTASKS_PER_NODE:-1} / NPROC_PER_NODE ))
            (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
            export OMP_NUM_THREADS
        fi
        srun --kill-on-bad-exit=1 --ntasks="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 \
            --cpus-per-task="$(( ${SLURM_CPUS_PER_TASK:-1} * ${SLURM_NTASKS_PER_NODE:-1} ))" \
            "$PYTHON" -m torch.distributed.run --nnodes="${SLURM_JOB_NUM_NODES:-1}" --nproc_per_node="$NPROC_PER_NODE" \
            --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --max-restarts=0 \
            "$TRAIN_SCRIPT" "${ARGS[@]}"
        ;;
    *)
        echo "error: LAUNCH_MODE=$LAUNCH_MODE; use srun or torchrun" >&2
        exit 2
        ;;
esac
echo "[mmdist] job $SLURM_JOB_ID finished: $RUN_DIR"
