#!/usr/bin/env bash
# Multi-node clipkit training under Slurm: one task per node; each runs `accelerate launch` for its GPUs.
#   sbatch scripts/slurm_train.sh experiment=my-run output_dir=/shared/runs/my-run
# Preemption and time limits: 300 s before the end Slurm signals this script (B:USR1); it passes SIGTERM
# to the training processes, which save a checkpoint and exit, and then requeues the job. The requeued job
# runs the same command, so it finds the same output_dir (set it, or let clipkit derive a stable one from
# the settings) and resumes there (train.resume=auto is the default). output_dir must be on shared storage.
# Use ACCELERATE_CONFIG=conf/accelerate/fsdp.yaml-style configs with their multi-node keys for FSDP2.
#SBATCH --job-name=clipkit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-conf/accelerate/multi-node.yaml}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
requeue=0

stop_and_requeue() {
  echo "slurm_train.sh: time limit or preemption near; asking training to checkpoint and stop"
  requeue=1
  kill -TERM "$training" 2>/dev/null || true  # srun forwards SIGTERM to every task
}
trap stop_and_requeue USR1 TERM

# srun starts one launcher per node; --kill-on-bad-exit stops the others if one fails. In the background,
# so that the trap above runs while training does.
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --config_file $ACCELERATE_CONFIG \
  --num_machines $SLURM_NNODES \
  --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID \
  --main_process_ip $MASTER_ADDR \
  --main_process_port $MASTER_PORT \
  -m clipkit.train $*" &
training=$!
status=0
wait "$training" || status=$?
if [ "$requeue" = 1 ]; then
  wait "$training" || status=$?  # the first wait returns when the signal arrives; this one when training exits
  echo "slurm_train.sh: requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
