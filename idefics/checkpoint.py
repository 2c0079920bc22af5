"""Reading and writing checkpoints in the Hugging Face folder format: `config.json` plus `model.safetensors`
or shards listed in `model.safetensors.index.json`.

Loading builds the model on the `meta` device (no memory), then streams tensors one at a time from the
memory-mapped safetensors files into their final dtype, so peak memory stays close to the model's size.
Every missing, unexpected or mis-shaped tensor is reported by name in one error."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .family import family_of, read_config

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# Buffers some checkpoints carry that the model recomputes.
IGNORED_KEYS = ("model.vision_model.embeddings.position_ids", "rotary_emb.inv_freq")
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded: the message names every offending file or tensor."""


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: the shards named by the index, or `*.safetensors`."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{index}: not a valid safetensors index ({error})") from None
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(f.name) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shards that are not in {folder}: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {folder}")
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Callable[[], torch.Tensor], list[int]]]:
    """(name, loader, shape) for every tensor; the loader reads the tensor only when called."""
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as error:  # safetensors raises its own exception types for corrupt headers
            raise CheckpointError(f"{path}: cannot read safetensors file ({error})") from None
        for name in handle.keys():
            shape = list(handle.get_slice(name).get_shape())
            yield name, (lambda h=handle, n=name: h.get_tensor(n)), shape


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_tensors(files: list[Path]) -> Iterator[tuple[str, Callable[[], torch.Tensor], list[int]]]:
    """Like `iter_tensors`, but each loader reads its bytes with plain file reads instead of a memory map:
    the tensor owns its memory and nothing of the file stays resident after it is freed (used when quantizing
    while loading, where the float weights must not accumulate)."""
    for path in files:
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{path}: cannot read safetensors header ({error})") from None
        base = 8 + size
        for name, info in header.items():
            if name == "__metadata__":
                continue

            def load(path=path, info=info) -> torch.Tensor:
                begin, end = info["data_offsets"]
                buffer = bytearray(end - begin)
                with open(path, "rb") as f:
                    f.seek(base + begin)
                    f.readinto(buffer)
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                if not buffer:
                    return torch.empty(info["shape"], dtype=dtype)
                return torch.frombuffer(buffer, dtype=dtype).view(info["shape"])

            yield name, load, list(info["shape"])


def check_and_load(model: nn.Module, tensors: dict[str, tuple[Callable[[], torch.Tensor], list[int]]],
                   dtype: torch.dtype, device: torch.device | str, source: str,
                   allow_missing: tuple[str, ...] = (), converters: dict | None = None) -> None:
    """Assign checkpoint tensors to a (meta-device) model after checking names and shapes. `converters` (weight
    name → (module name, build(weight) → module)) turn some weights into other layers one by one as they are read
    (quantized or packed CPU layers: `cpu.quantize.CpuLayout`)."""
    expected = {k: list(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    tied = {"lm_head.weight"} if getattr(model, "config", None) is not None and getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(k for k in expected if k not in tensors and k not in tied and not k.startswith(allow_missing))
    unexpected = sorted(k for k in tensors if k not in expected and not k.endswith(IGNORED_KEYS))
    misshaped = sorted(f"{k}: checkpoint {tensors[k][1]} vs model {expected[k]}"
                       for k in tensors if k in expected and tensors[k][1] != expected[k])
    problems = []
    for title, names in (("missing tensors", missing), ("unexpected tensors", unexpected),
                         ("mis-shaped tensors", misshaped)):
        if names:
            problems.append(f"{len(names)} {title}:\n  " + "\n  ".join(names))
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match the model built from its config.json:\n"
                              + "\n".join(problems))
    if converters:
        load_converting(model, tensors, expected, dtype, device, converters)
        return
    state = {}
    for name, (load, _) in tensors.items():
        if name in expected:
            tensor = load()
            state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(state, strict=False, assign=True)


def load_converting(model: nn.Module, tensors: dict, expected: dict, dtype: torch.dtype,
                    device: torch.device | str, converters: dict) -> None:
    """Load with some weights turned into other modules as they are read (`converters`: weight name →
    (module name, build(weight) → module); quantized or packed layers, see cpu/quantize.py). Each float weight is
    dropped right after conversion, so peak memory is the converted model plus one weight (their loaders come
    from `read_tensors`: no memory map keeps their pages resident)."""
    state = {}
    for name in list(tensors):
        load, _ = tensors.pop(name)
        if name not in expected:
            continue
        tensor = load()
        tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if name in converters:
            module_name, build = converters[name]
            module = build(tensor)
            if module is not None:
                parent, _, leaf = module_name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, module)
        else:
            state[name] = tensor
        del tensor, load
    model.load_state_dict(state, strict=False, assign=True)


def materialize(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Give real storage to what the checkpoint does not hold: non-persistent buffers and tied weights."""
    from .layers import RotaryEmbedding

    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = module.frequencies(device)
    if hasattr(model, "tie_weights"):  # models that know where their embedding lives (Idefics2)
        model.tie_weights()
    elif getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise CheckpointError(f"tensors left without values after loading: {', '.join(leftovers)}")


def empty_model(config) -> nn.Module:
    return family_of(config).build(config)


def load_model(folder: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               extra_tensors: dict[str, torch.Tensor] | None = None, convert=None):
    """Build an `Idefics` or `Idefics2` model (per config.json `model_type`) from a checkpoint folder.
    `extra_tensors` supplies tensors that live outside the folder (the frozen backbones of idefics-mini).
    `convert` (e.g. `cpu.quantize.CpuLayout(quantize="int8", pack=True)`, as `idefics.load` passes it) turns
    weights into other layers while streaming them in (`converters(model, dtype, device)`); its `quantize`, if
    any, is recorded as `model.quantization`."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json (is this a checkpoint folder?)")
    config = read_config(folder / "config.json")
    target = resolve_dtype(dtype, DTYPES.get(config.torch_dtype or "", torch.float32))
    with torch.device("meta"):
        model = empty_model(config)
    files = safetensors_files(folder)
    tensors = {name: (load, shape) for name, load, shape in iter_tensors(files)}
    converters = convert.converters(model, target, device) if convert is not None else {}
    if converters:
        # Weights to convert are read with plain file reads (nothing of them stays mapped and resident once
        # converted); the rest stays memory-mapped, as in the plain path.
        tensors.update({name: (load, shape) for name, load, shape in read_tensors(files) if name in converters})
    for name, tensor in (extra_tensors or {}).items():
        tensors.setdefault(name, (lambda t=tensor: t, list(tensor.shape)))
    check_and_load(model, tensors, target, device, str(folder), converters=converters)
    if getattr(convert, "quantize", None) is not None:
        model.quantization = convert.quantize
    materialize(model, device, target)
    model.eval()
    return model


def save_model(model: nn.Module, folder: str | Path, max_shard_bytes: int = 5 * 2**30,
               skip_prefixes: tuple[str, ...] = ()) -> None:
    """Write `config.json` and safetensors (sharded above `max_shard_bytes`, with an index) in the format
    `load_model` and the reference read. Files are written under temporary names and renamed at the end."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.startswith(skip_prefixes)}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # shared with the embedding; safetensors refuses aliases
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    written = []
    for name, shard in zip(names, shards):
        tmp = folder / (name + ".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        written.append((tmp, folder / name))
    config = model.config.to_dict()
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.") if state else None
    tmp_config = folder / "config.json.tmp"
    tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    written.append((tmp_config, folder / "config.json"))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
        tmp_index = folder / (INDEX_FILE + ".tmp")
        tmp_index.write_text(json.dumps(index, indent=2) + "\n")
        written.append((tmp_index, folder / INDEX_FILE))
    for tmp, final in written:
        os.replace(tmp, final)
