#!/usr/bin/env bash
# Multi-node clipkit training under Slurm: one task per node; each runs `accelerate launch` for its GPUs.
#   sbatch scripts/slurm_train.sh experiment=my-run output_dir=/shared/runs/my-run
# Preemption: Slurm sends SIGTERM (--signal below); clipkit saves a checkpoint and exits, and the requeued
# job resumes from it (train.resume=auto is the default). output_dir must be on shared storage.
#SBATCH --job-name=clipkit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}

# srun starts one launcher per node; --kill-on-bad-exit stops the others if one fails.
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --config_file conf/accelerate/multi-node.yaml \
  --num_machines $SLURM_NNODES \
  --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID \
  --main_process_ip $MASTER_ADDR \
  --main_process_port $MASTER_PORT \
  -m clipkit.train $*"
