"""`idefics train CONFIG`: the training command (also `python -m idefics.training.cli CONFIG`, which is what
torchrun starts)."""

from __future__ import annotations

import argparse
import sys

HELP = """\
Train an IDEFICS model: pretraining (frozen backbones, new perceiver + gated cross-attention + new token rows,
next-token loss on a mixture of image-text pairs and interleaved documents) or instruction tuning (chat data,
loss on assistant turns only; all parameters, or LoRA adapters).

CONFIG is a YAML or TOML file with the sections out_dir, model, data, train and lora; every key and its
default is documented in idefics/training/config.py, and configs/ has examples. Any key can be overridden
with --set section.key=value (values are read as YAML).

Writes to out_dir: metrics.jsonl (one line per step: loss, ce, z, lr, grad_norm, tokens/s; val lines),
loss.png, checkpoints/step-NNNNNN/ (written atomically; the newest `train.keep_checkpoints` are kept),
tokenizer/, and at the end export/ (a folder idefics.load() reads).

examples:
  idefics train configs/mini_pretrain.yaml
  idefics train configs/mini_pretrain.yaml --set train.steps=2000 --set train.lr=3e-4
  idefics train configs/mini_pretrain.yaml --resume          # continue after a crash or kill -9
  idefics train configs/mini_photos.yaml --set init_from=runs/mini_pretrain/export
  idefics train configs/tiny.yaml --set model.tokenizer=TOKENIZER --set 'data.train=[{shards: DATA}]'

  # several processes (DDP; FSDP shards parameters, gradients and optimizer state):
  torchrun --nproc-per-node 2 -m idefics.training.cli configs/mini_pretrain.yaml
  torchrun --nproc-per-node 8 -m idefics.training.cli big.yaml --set train.distributed=fsdp
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML (.yaml/.yml) or TOML (.toml) config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in out_dir (start fresh if there is none)")
    parser.add_argument("--out-dir", help="shorthand for --set out_dir=...")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.set_defaults(func=run)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` sub-command to the project's command line."""
    parser = subparsers.add_parser("train", help="train or instruction-tune a model from a config file",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import json

    from .config import load_config

    overrides = list(args.overrides) + ([f"out_dir={args.out_dir}"] if args.out_dir else [])
    try:
        config = load_config(args.config, overrides)
    except ValueError as error:
        print(f"idefics train: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1))
        return 0
    from .checkpoints import ResumeError
    from .trainer import train

    try:
        summary = train(config, resume=args.resume)
    except (ResumeError, FileNotFoundError, ValueError) as error:  # bad data, config, checkpoint, backbone
        if getattr(args, "debug", False):
            raise
        print(f"idefics train: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    if summary.get("rank", 0) == 0:
        print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="idefics train", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
