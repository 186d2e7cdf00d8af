#!/bin/bash
# Stage 2 "fuse": stage-1 module -> trainable projector -> frozen LLM, ZeRO-3, one rank per GPU.
#
#   mkdir -p logs && sbatch slurm/stage2.sh                     # reads stage 1's export from runs/align/export
#   STAGE1_EXPORT=/path/to/align_run/export sbatch slurm/stage2.sh
#   JOB1=$(sbatch --parsable slurm/stage1.sh) && sbatch --dependency=afterok:$JOB1 slurm/stage2.sh
#
# STAGE1_EXPORT is the stage-1 export folder (model.safetensors + manifest.json); it becomes
# model.connector.stage1_weights. Default: runs/align/export (stage1.sh's default RUN_DIR). Set it to the
# empty string (STAGE1_EXPORT=) for a projector that starts from scratch (linear/mlp connectors only).
# It is checked when the job starts, not at submission, so a dependent job can name a folder stage 1
# has yet to write. A resubmitted job resumes from RUN_DIR's latest checkpoint (checkpoint.resume=auto).
#
# CPU smoke job (2 ranks, gloo, the tiny twin config):
#   mkdir -p logs && DS_ACCELERATOR=cpu CONFIG=configs/tiny_fuse.yaml RUN_DIR=runs/smoke_fuse STAGE1_EXPORT= \
#     sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 --time=00:20:00 slurm/stage2.sh
#
# Torchrun per node instead of one srun task per GPU (e.g. where srun cannot bind GPUs per task):
#   LAUNCH_MODE=torchrun sbatch --ntasks-per-node=1 slurm/stage2.sh    (NPROC_PER_NODE defaults to the GPUs)
#
# Settings (environment variables; see slurm/_launch.sh for the full list):
#   CONFIG (configs/fuse.yaml), RUN_DIR (runs/fuse), STAGE1_EXPORT, OVERRIDES ("key=value ..."),
#   LAUNCH_MODE (srun|torchrun), DS_ACCELERATOR, PYTHON, MMDIST_REPO, MASTER_ADDR/PORT, OMP_NUM_THREADS, NCCL_*.
# The #SBATCH lines below are defaults; sbatch's command-line options (and SBATCH_* variables) override them.
# Output goes to logs/ under the submit folder, which must exist before the job starts.
# Time limit and preemption: SIGUSR1 300 s before the end (a longer lead: sbatch --signal=B:USR1@900 ...);
# the ranks checkpoint and the job requeues itself and resumes (REQUEUE=0 to just stop; docs/operations.md).
#
#SBATCH --job-name=mmdist-fuse
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append

CONFIG=${CONFIG:-configs/fuse.yaml}
RUN_DIR=${RUN_DIR:-runs/fuse}
STAGE1_EXPORT=${STAGE1_EXPORT-runs/align/export}
STAGE_ARGS=()
if [[ -n "$STAGE1_EXPORT" ]]; then
    if [[ ! -e "${MMDIST_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/$STAGE1_EXPORT" && ! -e "$STAGE1_EXPORT" ]]; then
        echo "error: STAGE1_EXPORT=$STAGE1_EXPORT does not exist: run slurm/stage1.sh first (chain with" \
             "--dependency=afterok:JOBID), point STAGE1_EXPORT at a stage-1 export folder, or set STAGE1_EXPORT= to skip" >&2
        exit 2
    fi
    STAGE_ARGS+=("model.connector.stage1_weights=$STAGE1_EXPORT")
fi

# shellcheck source=slurm/_launch.sh
source "${MMDIST_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/_launch.sh"
