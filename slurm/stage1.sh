#!/bin/bash
# Stage 1 "align": the frozen image encoder against a BERT-style text encoder (ITC/ITM/ITG), one rank per GPU.
#
#   mkdir -p logs && sbatch slurm/stage1.sh                     # reference recipe: 1 node x 8 GPUs
#   JOB1=$(sbatch --parsable slurm/stage1.sh)
#   sbatch --dependency=afterok:$JOB1 slurm/stage2.sh           # stage 2 starts only if stage 1 succeeded
#
# More nodes: sbatch --nodes=4 slurm/stage1.sh (the global batch stays train.global_batch_size;
# gradient accumulation is recomputed from the world size).
#
# CPU smoke job on any Slurm cluster (2 ranks, gloo, the tiny twin config):
#   mkdir -p logs && DS_ACCELERATOR=cpu CONFIG=configs/tiny_align.yaml RUN_DIR=runs/smoke_align \
#     sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 --time=00:20:00 slurm/stage1.sh
#
# Settings (environment variables; see slurm/_launch.sh for the full list):
#   CONFIG (configs/align.yaml), RUN_DIR (runs/align), OVERRIDES ("key=value ..."), LAUNCH_MODE (srun|torchrun),
#   DS_ACCELERATOR, PYTHON, MMDIST_REPO, MASTER_ADDR/MASTER_PORT, OMP_NUM_THREADS, NCCL_*.
# The #SBATCH lines below are defaults; sbatch's command-line options (and SBATCH_* variables) override them.
# Output goes to logs/ under the submit folder, which must exist before the job starts.
# Time limit and preemption: SIGUSR1 300 s before the end (a longer lead: sbatch --signal=B:USR1@900 ...);
# the ranks checkpoint and the job requeues itself and resumes (REQUEUE=0 to just stop; docs/operations.md).
#
#SBATCH --job-name=mmdist-align
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append

CONFIG=${CONFIG:-configs/align.yaml}
RUN_DIR=${RUN_DIR:-runs/align}
STAGE_ARGS=()

# shellcheck source=slurm/_launch.sh
source "${MMDIST_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/_launch.sh"
