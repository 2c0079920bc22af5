#!/usr/bin/env bash
# Reproduces idefics-mini from scratch: data → pretraining → instruction tuning → the embedded model folder.
# Resumable: run it again after an interruption and every stage continues where it stopped.
# Measured on the 2-core development machine: see reports/idefics-mini.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=data/mini
[[ -f $DATA/manifest.json ]] || idefics data make-mini $DATA --seed 0
[[ -f runs/mini_pretrain/export/config.json ]] || idefics train configs/mini_pretrain.yaml --resume "$@"
[[ -f runs/mini_instruct/export/config.json ]] || idefics train configs/mini_instruct.yaml --resume "$@"
python -m idefics.mini_export runs/mini_instruct/export idefics/assets/idefics-mini
