#!/bin/bash
# One node's share of a multi-node run (srun starts this once per node; see umarvel.sbatch): torchrun
# with GPUS_PER_NODE processes, meeting the other nodes at MASTER_ADDR:MASTER_PORT (c10d). The same
# script runs two "nodes" on one CPU machine in tests/test_distributed.py.
set -euo pipefail
UMARVEL="${UMARVEL:-$(command -v umarvel)}"
exec "${TORCHRUN:-torchrun}" \
  --nnodes "$SLURM_NNODES" \
  --node_rank "$SLURM_NODEID" \
  --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_id "$SLURM_JOB_ID" \
  --rdzv_backend c10d \
  --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  "$UMARVEL" "$@"
