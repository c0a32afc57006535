#!/bin/bash
# torchrun: run this on every node with the same MASTER_ADDR / MASTER_PORT and its own NODE_RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 HICOM_RUN_STAMP=<run name> bash scripts/cluster/torchrun.sh [overrides]
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
GPUS=${GPUS_PER_NODE:-8}
# Every process writes into one run folder, logs/train/runs/$HICOM_RUN_STAMP: on one node the time of this launch;
# on several, each node's script starts at its own time, so give all of them the same name.
if [ "$NNODES" -gt 1 ]; then
  : "${HICOM_RUN_STAMP:?set HICOM_RUN_STAMP to the same run name on every node}"
fi
export HICOM_RUN_STAMP=${HICOM_RUN_STAMP:-$(date +%Y-%m-%d_%H-%M-%S)_$$}
export HICOM_NUM_NODES=$NNODES HICOM_GPUS_PER_NODE=$GPUS
# torchrun passes a SIGTERM (a scheduler's) or Ctrl-C on to the training processes and kills them 30 s later by
# default: too soon for the fit to finish its step and write last.ckpt (a DeepSpeed checkpoint of stage 3 takes
# minutes). 15 minutes, as slurm.sbatch allows. A torchrun whose --help lists no --shutdown-timeout ignores this.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}
# exec: torchrun takes this script's process, so a SIGTERM sent to it (kill, timeout, a container's PID 1,
# SLURM's --signal=B:) reaches torchrun, where bash would exit and leave the fit running, never told to save
exec .venv/bin/python -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS" \
  --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" \
  train.py experiment=directg_local43_global32 trainer=multinode "$@"
