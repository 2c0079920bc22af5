"""The `idefics` command: generate, info, and the verbs other modules register (serve, train, eval, data)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from .family import family_of
from .model_options import add_model_options, load_from_args

# Modules that add a sub-command through `register(subparsers)`; a missing one is skipped, not fatal.
EXTENSIONS = ("idefics.serving.server", "idefics.training.cli", "idefics.eval.cli", "idefics.data.synthetic",
              "idefics.mini.demo")

GENERATE_EPILOG = """\
Items are the prompt, in order. Plain arguments are text; mark images with the prefix `image:` (a file path,
an http(s) URL or a data: URI). Write `text:` in front of text that itself starts with `image:`.

examples:
  idefics generate image:cat.jpg "Question: what animal is this? Answer:"
  idefics generate --model ./idefics-9b-instruct --chat image:photo.png "What is in this image?"
  idefics generate --model ./ckpt "User:" image:a.png image:b.png "Which one is red?<end_of_utterance>" \\
      "\\nAssistant:" --max-new-tokens 40 --do-sample --top-p 0.9 --seed 0
"""

INFO_EPILOG = """\
examples:
  idefics info                       # the embedded default model
  idefics info --model ./idefics-9b --dtype bfloat16
"""


def parse_items(raw: list[str]) -> list[Any]:
    """Command-line items → prompt items: `image:X` is an image (path, URL or data URI), the rest is text."""
    items: list[Any] = []
    for value in raw:
        if value.startswith("image:"):
            target = value[len("image:"):]
            if not target:
                raise SystemExit("error: `image:` needs a file path, an http(s) URL or a data: URI after it")
            if target.startswith(("http://", "https://", "data:")):
                items.append(target)
            else:
                path = Path(target).expanduser()
                if not path.exists():
                    raise SystemExit(f"error: image file not found: {path}")
                items.append(path)
        else:
            text = value[len("text:"):] if value.startswith("text:") else value
            items.append(text.replace("\\n", "\n"))
    return items


def chat_prompt(items: list[Any]) -> list[Any]:
    """Wrap items as one IDEFICS instruct user turn: `User:` … `<end_of_utterance>\\nAssistant:`."""
    return ["User:", *items, "<end_of_utterance>", "\nAssistant:"]


def run_generate(args: argparse.Namespace) -> int:
    items = parse_items(args.items)
    if not items:
        raise SystemExit("error: give at least one prompt item (text, or image:PATH)")
    if args.chat:
        items = chat_prompt(items)
    pipe = load_from_args(args)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                   stop_sequences=args.stop, add_end_of_utterance_token=False if args.chat else None)
    if args.no_stream:
        print(pipe.generate(items, **options)[0])
        return 0
    for piece in pipe.stream(items, **options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def count(module) -> int:
    """Parameters, each quantized layer counted by the weights it stands for (its int8/int4 values are buffers)."""
    if module is None:
        return 0
    from .cpu.quantize import Int4Linear, Int8Linear

    quantized = sum(m.in_features * m.out_features for m in module.modules()
                    if isinstance(m, (Int8Linear, Int4Linear)))
    return sum(p.numel() for p in module.parameters()) + quantized


def run_info(args: argparse.Namespace) -> int:
    pipe = load_from_args(args)
    model, config, tok = pipe.model, pipe.config, pipe.tokenizer
    print(f"model: {pipe.name}  ({config.model_type}, {str(model.dtype).removeprefix('torch.')}, {model.device})")
    lines = family_of(config).describe(config, model)
    print("\n".join(lines))
    print("parameters:")
    parts = {name: count(child) for name, child in model.model.named_children()}
    if not config.tie_word_embeddings:
        parts["lm_head"] = count(model.lm_head)
    for name, n in parts.items():
        print(f"  {name:32s} {n / 1e6:10.2f} M")
    print(f"  {'total':32s} {count(model) / 1e6:10.2f} M")
    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
    tokens = ", ".join(f"{t}={tok.token_to_id(t)}" for t in [tok.bos_token, tok.eos_token, tok.pad_token] + specials
                       if t and tok.token_to_id(t) is not None)
    print(f"vocabulary: {config.vocab_size} + {config.additional_vocab_size} additional; tokens: {tokens}")
    print(f"instruct format (<end_of_utterance>): {tok.has_end_of_utterance}")
    print(f"matmul kernels: {matmul_kernels(model)}")
    return 0


def matmul_kernels(model) -> str:
    """Which CPU matmul kernels the loaded model's linear layers run on (a fast path a user can check)."""
    import torch
    from torch import nn

    from .cpu import kernels
    from .cpu.packing import PackedLinear
    from .cpu.quantize import Int4Linear, Int8Linear

    kinds: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, PackedLinear):
            kind = ("oneDNN (prepacked)" if module.weight.is_mkldnn else "idefics AVX-512 BF16 kernel"
                    if module.weight.dim() != 2 else "bf16 widened to float32 (AVX2)"
                    if module.weight.dtype == torch.bfloat16 else "float32 on the AVX2 kernel")
        elif isinstance(module, Int8Linear):
            kind = ("idefics AVX-512 BF16 kernel" if module.packed else "int8 on the AVX2 kernel"
                    if kernels.widening_available() else "torch int8")
        elif isinstance(module, Int4Linear):
            kind = "torch int4"
        elif type(module) is nn.Linear:
            kind = "torch F.linear"
        else:
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
    used = ", ".join(f"{name} x{count}" for name, count in kinds.items()) or "none"
    if kernels.available():
        tiles = ", bf16 on AMX tiles" if kernels.uses_amx() else ""
        return f"{used} (compiled ops on {kernels.parallel_threads()} threads{tiles})"
    if kernels.widening_available():
        return used + " (no AVX-512 BF16: the AVX2 extension runs few-row products and the decoding steps)"
    return used + " (this project's kernel is not used here: no AVX-512 BF16, or off)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idefics", description="IDEFICS vision-language models in plain "
                                     "PyTorch: generate, serve, train and evaluate.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="continue a prompt of text and images", epilog=GENERATE_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(gen)
    gen.add_argument("items", nargs="*", metavar="ITEM", help="prompt items in order (text, or image:PATH/URL)")
    gen.add_argument("--chat", action="store_true", help="wrap the items as one instruct turn "
                     "(User: ... <end_of_utterance>\\nAssistant:)")
    gen.add_argument("--max-new-tokens", type=int, default=50)
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    gen.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of streaming")
    gen.set_defaults(func=run_generate)

    info = sub.add_parser("info", help="architecture, parameter counts, dtype and special tokens",
                          epilog=INFO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(info)
    info.set_defaults(func=run_info)

    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name and name.startswith(error.name):
                continue  # that part of the project is not installed/built
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
