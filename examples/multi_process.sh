#!/usr/bin/env bash
# Two training processes on CPU through accelerate (gloo): each rank sees its own shard of the data and the
# gradients are averaged, exactly as on two GPUs. `--multi_gpu` is what makes accelerate start the processes;
# ddpm.train picks the CPU backend itself when no GPU is present.
#   bash examples/multi_process.sh [OUTPUT_DIR] [extra ddpm.train flags...]
set -euo pipefail
out=${1:-ddpm-multi-process}
shift || true
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
  -m ddpm.train --output_dir "$out" --max_train_steps 200 "$@"
