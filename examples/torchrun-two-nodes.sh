#!/bin/bash
# lmforge on two machines with torchrun, no scheduler: run this script on each machine, with the
# same HEAD (an address of the first machine that the other can reach) and the same RUN_ID.
#
#   machine A:  HEAD=10.0.0.1 bash examples/torchrun-two-nodes.sh
#   machine B:  HEAD=10.0.0.1 bash examples/torchrun-two-nodes.sh
#
# The model, the data and the output directory must be on a file system both machines mount, at
# the same path (NFS, Lustre, ...): rank 0 writes the result, every process writes its own shards
# of each checkpoint, and a restarted or resumed run reads them back from any machine.

set -euo pipefail

HEAD=${HEAD:?set HEAD to an address of the first machine}
PORT=${PORT:-29500}
RUN_ID=${RUN_ID:-lmforge-sft}          # names this job at the rendezvous: the same on both machines
SHARED=${SHARED:-/shared/project}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}

torchrun \
    --nnodes 2 \
    --nproc-per-node "$GPUS" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD:$PORT" \
    --rdzv-id "$RUN_ID" \
    --max-restarts 2 \
    "$(which lmforge)" train sft -m "$SHARED/models/base" -d "$SHARED/data/sft.packed" -o "$SHARED/runs/sft" \
        --method full --fsdp full --precision bf16 --save-steps 200
