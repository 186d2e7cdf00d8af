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
#   MASTER_ADDR / MASTER_PORT   rendezvous; default: first node of the allocation (its NodeAddr when the
#                   name does not resolve), port from the job id
#   OMP_NUM_THREADS, NCCL_DEBUG, NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE, MMDIST_DIST_TIMEOUT: passed through
#   REQUEUE         1 (default): requeue the job when the trainer stopped on the warning signal; 0: just end
#   MAX_REQUEUES    stop requeueing after this many restarts (SLURM_RESTART_COUNT)  default: 50
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  LAUNCH_MODE=torchrun: seconds torchrun gives the ranks to checkpoint
#                   after it forwards SIGTERM, before SIGKILL (recent torch reads it, 2.13 does; older: 30 s)  default: 240
#
# Preemption and time limits (docs/operations.md): the stage scripts ask for `--signal=B:USR1@300`, so
# Slurm sends SIGUSR1 to this batch shell 300 s before the time limit (`sbatch --signal=B:USR1@900 ...`
# for a longer lead; #SBATCH lines cannot read variables). The shell runs the job step in the background
# and forwards the signal to it: SIGUSR1 to srun (which relays it to every task) in srun mode, SIGTERM
# in torchrun mode (torchrun relays SIGTERM to its ranks; SIGUSR1 would end the agent itself). SIGTERM
# to this shell (preemption, scancel) is forwarded the same way. The ranks agree on a step, checkpoint,
# rank 0 writes RUN_DIR/preempted.json, and they exit with PREEMPTED_EXIT. On that code or that file the
# shell runs `scontrol requeue`; the requeued job resumes from RUN_DIR's latest checkpoint
# (checkpoint.resume=auto). Any other failure is not requeued (a crash would only repeat).
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
# (mmdist.launch_env.master_address derives the same values itself; exporting them makes the log
# show them.) Its name when that resolves; otherwise (node names that are aliases, not host names) the
# address Slurm reaches the node by, NodeAddr from `scontrol show node`; failing both, the name.
if [[ -z "${MASTER_ADDR:-}" ]]; then
    MASTER_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    MASTER_ADDR=$MASTER_NODE
    if ! getent hosts "$MASTER_NODE" >/dev/null 2>&1; then
        NODE_ADDR=$(scontrol show node -o "$MASTER_NODE" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n1 | cut -d= -f2) || NODE_ADDR=
        if [[ -n "$NODE_ADDR" ]]; then
            echo "[mmdist] master node $MASTER_NODE does not resolve here; using its NodeAddr $NODE_ADDR"
            MASTER_ADDR=$NODE_ADDR
        fi
    fi
fi
export MASTER_ADDR
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

# What the trainer leaves when it stops on the warning signal (mmdist/training/preemption.py repeats both).
PREEMPTED_EXIT=75
PREEMPTED_MARKER="$RUN_DIR/preempted.json"
REQUEUE=${REQUEUE:-1}
MAX_REQUEUES=${MAX_REQUEUES:-50}

# --kill-on-bad-exit=1: when one rank dies (OOM, SIGKILL, a crash) Slurm kills the others and the step
# fails, instead of the survivors waiting in a collective until the wall-clock limit.
case "$LAUNCH_MODE" in
    srun)
        STEP_SIGNAL=USR1
        STEP=(srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}"
              "$PYTHON" "$TRAIN_SCRIPT" "${ARGS[@]}")
        ;;
    torchrun)
        # One torchrun agent per node; it starts NPROC_PER_NODE ranks and restarts nothing (--max-restarts=0):
        # a failure ends the step and the next submission resumes from the last checkpoint.
        STEP_SIGNAL=TERM
        export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}
        NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}
        if [[ -z "$OMP_FROM_USER" ]]; then
            # The node's CPUs are shared by NPROC_PER_NODE ranks here, not one task each.
            OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-1} * ${SLURM_NTASKS_PER_NODE:-1} / NPROC_PER_NODE ))
            (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
            export OMP_NUM_THREADS
        fi
        STEP=(srun --kill-on-bad-exit=1 --ntasks="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1
              --cpus-per-task="$(( ${SLURM_CPUS_PER_TASK:-1} * ${SLURM_NTASKS_PER_NODE:-1} ))"
              "$PYTHON" -m torch.distributed.run --nnodes="${SLURM_JOB_NUM_NODES:-1}" --nproc_per_node="$NPROC_PER_NODE"
              --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --max-restarts=0
              "$TRAIN_SCRIPT" "${ARGS[@]}")
        ;;
    *)
        echo "error: LAUNCH_MODE=$LAUNCH_MODE; use srun or torchrun" >&2
        exit 2
        ;;
esac

echo "[mmdist] step: ${STEP[*]}"

# The step runs in the background: bash runs a trap only between commands, so a foreground srun would
# hold the warning signal until the job is over.
STEP_PID=
forward_signal() {
    echo "[mmdist] job $SLURM_JOB_ID: SIG$1 received; asking the ranks to checkpoint and stop (SIG$STEP_SIGNAL to the job step)"
    if [[ -n "$STEP_PID" ]]; then kill -s "$STEP_SIGNAL" "$STEP_PID" 2>/dev/null || true; fi
}
trap 'forward_signal USR1' USR1
trap 'forward_signal TERM' TERM
rm -f "$PREEMPTED_MARKER"  # only a marker this step writes counts
"${STEP[@]}" &
STEP_PID=$!
while true; do
    rc=0
    wait "$STEP_PID" || rc=$?
    kill -0 "$STEP_PID" 2>/dev/null || break  # still running: a trapped signal interrupted the wait
done
if (( rc > 128 )); then
    rc=0
    wait "$STEP_PID" || rc=$?  # the step's own status (the last wait may have been cut short by a trap)
fi

if [[ "$rc" -eq "$PREEMPTED_EXIT" || -f "$PREEMPTED_MARKER" ]]; then
    restarts=${SLURM_RESTART_COUNT:-0}
    left=""
    if [[ -f "$PREEMPTED_MARKER" ]]; then left=", $PREEMPTED_MARKER written"; fi
    echo "[mmdist] job $SLURM_JOB_ID: the ranks stopped with a checkpoint (exit $rc$left)"
    if [[ "$REQUEUE" != 1 ]]; then
        echo "[mmdist] REQUEUE=$REQUEUE: not requeueing; resubmit the same command to resume from $RUN_DIR"
    elif (( restarts >= MAX_REQUEUES )); then
        echo "[mmdist] job $SLURM_JOB_ID was already requeued $restarts time(s) (MAX_REQUEUES=$MAX_REQUEUES): not again" >&2
    elif scontrol requeue "$SLURM_JOB_ID"; then
        echo "[mmdist] job $SLURM_JOB_ID requeued (restart $((restarts + 1))); it resumes from $RUN_DIR's latest checkpoint"
    else
        echo "[mmdist] scontrol requeue $SLURM_JOB_ID failed (is the partition requeue-able?); resubmit to resume from $RUN_DIR" >&2
    fi
    exit "$PREEMPTED_EXIT"
fi
if (( rc != 0 )); then
    echo "[mmdist] job $SLURM_JOB_ID: the job step failed (exit $rc); not requeued" >&2
    exit "$rc"
fi
echo "[mmdist] job $SLURM_JOB_ID finished: $RUN_DIR"
