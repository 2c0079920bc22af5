#!/usr/bin/env bash
# Reproduces idefics-mini from scratch: data → pretraining → instruction tuning → the embedded model folder.
# Resumable: run it again after an interruption and every stage continues where it stopped.
# NPROC=2 (default) trains with 2 processes of 1 thread each (DDP over gloo), which on a 2-core CPU is faster
# than one process with 2 threads; NPROC=1 trains in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=data/mini
NPROC=${NPROC:-2}
train() {
  if [[ $NPROC -gt 1 ]]; then
    torchrun --standalone --nproc-per-node "$NPROC" -m idefics.training.cli "$@"
  else
    idefics train "$@"
  fi
}
[[ -f $DATA/manifest.json ]] || idefics data make-mini $DATA --seed 0
[[ -f runs/mini_pretrain/export/config.json ]] || train configs/mini_pretrain.yaml --resume
[[ -f runs/mini_instruct/export/config.json ]] || train configs/mini_instruct.yaml --resume
python -m idefics.mini.export runs/mini_instruct/export idefics/assets/idefics-mini
mkdir -p reports
cp runs/mini_pretrain/loss.png reports/idefics-mini-pretrain-loss.png
cp runs/mini_instruct/loss.png reports/idefics-mini-instruct-loss.png
