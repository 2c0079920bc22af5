"""The model-loading options every command shares (`generate`, `info`, `serve`, `eval`, `demo`, the idefics-mini
report), defined once: `--model --dtype --quantize --device --threads`, and loading from them."""

from __future__ import annotations

import argparse

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("int8", "int4")
DEFAULT_DEVICE = "cpu"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, metavar="DIR",
                       help="checkpoint folder (Hugging Face layout); default: the embedded idefics-mini")
    group.add_argument("--dtype", default=None, choices=DTYPES,
                       help="weights dtype (default: the checkpoint's; float32 for idefics-mini)")
    group.add_argument("--quantize", default=None, choices=QUANTIZATIONS,
                       help="weight-only quantization of the decoder and cross-attention at load time "
                       "(int8: ~2x smaller and faster than bf16; int4: ~4x smaller, coarser)")
    group.add_argument("--device", default=DEFAULT_DEVICE, help="torch device, e.g. cpu or cuda "
                       "(default: %(default)s)")
    group.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch threads (default: torch's choice; fewer can be faster on a busy machine)")


def load_from_args(args: argparse.Namespace, device: str | None = None):
    """`idefics.load` with the options above (`device` overrides `--device`, e.g. one GPU per process)."""
    import torch

    import idefics

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"error: --threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return idefics.load(args.model, dtype=args.dtype, device=device or args.device, quantize=args.quantize)
