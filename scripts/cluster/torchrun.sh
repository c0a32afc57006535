#!/bin/bash
# torchrun: run this on every node with the same MASTER_ADDR / MASTER_PORT and its own NODE_RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash scripts/cluster/torchrun.sh [extra overrides]
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
GPUS=${GPUS_PER_NODE:-8}
export HICOM_NUM_NODES=$NNODES HICOM_GPUS_PER_NODE=$GPUS
.venv/bin/python -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS" \
  --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" \
  train.py experiment=directg_local43_global32 trainer=multinode strategy=deepspeed_zero2 "$@"
