#!/bin/bash
# One node's part of a multi-node job: `accelerate launch` with this node's rank. srun runs it once per node,
# where SLURM_NODEID is that node's rank; train_multinode.sbatch sets the rest. DRY_RUN=1 prints the command.
set -euo pipefail
RECIPE=$1
shift
CMD=(accelerate launch --config_file configs/accelerate/multinode.yaml
     --num_machines "$SLURM_NNODES" --num_processes "$((SLURM_NNODES * GPUS_PER_NODE))"
     --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
     train.py --config "$RECIPE" "$@")
if [ -n "${DRY_RUN:-}" ]; then
  printf 'node %s:' "$SLURM_NODEID"
  printf ' %q' "${CMD[@]}"
  printf '\n'
else
  exec "${CMD[@]}"
fi
