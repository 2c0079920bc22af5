#!/usr/bin/env bash
# Reproduces idefics-mini from scratch: data → stage 1 (pretraining) → stage 2 (real images) → the embedded
# model folder, printing how long each stage took.
# Resumable: run it again after an interruption and every stage continues where it stopped.
# Needs Debian's openclipart-png, fonts-noto-color-emoji and dataset-fashion-mnist (installed here if missing).
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
stage() {  # stage NAME COMMAND...: run it and say how long it took
  local name=$1 start=$SECONDS
  shift
  "$@"
  echo "== $name: $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
}
if ! [[ -d /usr/share/openclipart/png && -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf \
        && -d /usr/share/datasets/fashion-mnist ]]; then
  apt-get update -q && apt-get install -y -q openclipart-png fonts-noto-color-emoji dataset-fashion-mnist
fi
[[ -f $DATA/manifest.json ]] || stage "synthetic data" idefics data make-mini $DATA --seed 0
[[ -f $DATA/photos.json ]] || stage "real-image data" idefics data make-photos $DATA --seed 0
[[ -f runs/mini_pretrain/export/config.json ]] || stage "stage 1, pretraining" train configs/mini_pretrain.yaml --resume
[[ -f runs/mini_photos/export/config.json ]] || stage "stage 2, real images" train configs/mini_photos.yaml --resume
python -m idefics.mini.export runs/mini_photos/export idefics/assets/idefics-mini
mkdir -p reports
cp runs/mini_pretrain/loss.png reports/idefics-mini-pretrain-loss.png
cp runs/mini_photos/loss.png reports/idefics-mini-photos-loss.png
