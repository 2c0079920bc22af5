"""Helpers for the speed benchmark: model presets, a random-weight checkpoint writer that streams shard by shard
(so the 9B model is never in memory at once), prompt inputs, memory bandwidth, and robust timing."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from idefics.checkpoint import empty_model
from idefics.config import IdeficsConfig
from idefics.idefics2.config import Idefics2Config
from idefics.processor import image_attention_mask

BOS, EOS, FAKE, IMAGE = 1, 2, 32000, 32001

# The 463M model: LLaMA 1024 x 16 layers, CLIP ViT 768 x 12, perceiver 6 blocks x 64 latents, xattn every 4.
BENCH_463M = dict(
    vocab_size=32000, additional_vocab_size=2, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
    num_attention_heads=16, rms_norm_eps=1e-6, max_position_embeddings=2048, cross_layer_interval=4,
    qk_layer_norms=True, alpha_initializer="zeros", alpha_type="float", use_resampler=True,
    perceiver_config=dict(use_resampler=True, resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                          resampler_head_dim=96, qk_layer_norms_perceiver=True),
    vision_config=dict(embed_dim=768, image_size=224, intermediate_size=3072, patch_size=14, num_hidden_layers=12,
                       num_attention_heads=12, hidden_act="gelu"),
)

# idefics-9b exactly (its config.json): LLaMA-7B + CLIP ViT-H/14 + perceiver, xattn every 4 layers.
IDEFICS_9B = dict(
    vocab_size=32000, additional_vocab_size=2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048, cross_layer_interval=4,
    qk_layer_norms=True, alpha_initializer="zeros", alpha_type="float", use_resampler=True,
    perceiver_config=dict(use_resampler=True, resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                          resampler_head_dim=96, qk_layer_norms_perceiver=True),
    vision_config=dict(embed_dim=1280, image_size=224, intermediate_size=5120, patch_size=14, num_hidden_layers=32,
                       num_attention_heads=16, hidden_act="gelu"),
)


# Idefics2 at the same scale: Mistral 1024 x 16 layers (GQA 16/4 heads, sliding window), SigLIP 768 x 12 with
# the 980 px position grid of idefics2-8b (images of 378 px: 729 patches), connector perceiver 3 x 64 latents.
BENCH_IDEFICS2 = dict(
    model_type="idefics2", image_token_id=IMAGE, tie_word_embeddings=False,
    text_config=dict(vocab_size=32003, hidden_size=1024, intermediate_size=3584, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
                     pad_token_id=0, rope_theta=10000.0, sliding_window=4096),
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=980, patch_size=14),
    perceiver_config=dict(resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16, resampler_head_dim=64,
                          num_key_value_heads=4),
)
IDEFICS2_IMAGE_SIZE = 378  # the processor's shortest edge: the size of a square image


def model_config(config: dict) -> IdeficsConfig | Idefics2Config:
    if config.get("model_type") == "idefics2":
        return Idefics2Config.from_dict(config)
    return IdeficsConfig.from_dict(config)


def random_tensor(name: str, shape: list[int], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic per-name random values at scales that keep activations sane through many layers
    (the gates are non-zero so cross-attention changes the output)."""
    digest = int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16)
    gen = torch.Generator().manual_seed(digest)
    if "alpha" in name:
        out = 0.5 + 0.1 * torch.randn(shape, generator=gen)
    elif len(shape) == 1 and name.endswith("weight"):  # norms
        out = 1 + 0.05 * torch.randn(shape, generator=gen)
    elif name.endswith("bias"):
        out = 0.01 * torch.randn(shape, generator=gen)
    elif "latents" in name or "embedding" in name or "embed_tokens" in name:
        out = 0.5 * torch.randn(shape, generator=gen)
    else:
        fan_in = shape[-1] if len(shape) == 2 else max(1, int(torch.tensor(shape[1:]).prod()))
        out = torch.randn(shape, generator=gen) / fan_in**0.5
    return out.to(dtype)


def write_random_checkpoint(folder: str | Path, config: dict, dtype: torch.dtype, seed: int = 0,
                            shard_bytes: int = 2 * 2**30) -> Path:
    """config.json + sharded safetensors with random weights. Only one shard is in memory at a time: the model
    is built on the meta device just to list names and shapes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model_config(config)
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in empty_model(cfg).state_dict().items()}
    names, shard, size, weight_map, total = [], {}, 0, {}, 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        names.append(name)
        shard, size = {}, 0

    for key, shape in shapes.items():
        tensor = random_tensor(key, shape, seed, dtype)
        if shard and size + tensor.nbytes > shard_bytes:
            flush()
        shard[key] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    data = cfg.to_dict()
    data["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return folder


def prompt_inputs(batch: int, tokens: int, images: int, image_size: int, seed: int = 0,
                  image_seq_len: int = 0) -> dict[str, torch.Tensor]:
    """`batch` rows of `tokens` tokens: <s>, the images (<fake><image>...<fake>), then random text.
    `image_seq_len` > 0: Idefics2 inputs (<fake> + that many <image> per image, pixel_attention_mask), with
    `tokens` counting the text after the images."""
    gen = torch.Generator().manual_seed(seed)
    if image_seq_len:
        layout = [t for _ in range(images) for t in [FAKE] + [IMAGE] * image_seq_len]
        head = [BOS] + layout + ([FAKE] if images else [])
        text = torch.randint(3, 32000, (batch, tokens), generator=gen)
        ids = torch.cat([torch.tensor(head).expand(batch, -1), text], 1)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if images:
            out["pixel_values"] = torch.randn(batch, images, 3, image_size, image_size, generator=gen)
            out["pixel_attention_mask"] = torch.ones(batch, images, image_size, image_size, dtype=torch.long)
        return out
    head = [BOS] + [t for _ in range(images) for t in (FAKE, IMAGE)] + ([FAKE] if images else [])
    text = torch.randint(3, 32000, (batch, tokens - len(head)), generator=gen)
    ids = torch.cat([torch.tensor(head).expand(batch, -1), text], 1)
    n = max(images, 1)
    mask = image_attention_mask(ids, IMAGE, EOS, n) if images else torch.zeros(batch, tokens, 1, dtype=torch.long)
    pixels = torch.randn(batch, n, 3, image_size, image_size, generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
            "image_attention_mask": mask}


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bandwidth(size_bytes: int = 2**30, repeats: int = 7, kernel: bool = False) -> float:
    """Read bandwidth in bytes/s: median time to sum a float32 buffer much larger than the caches. With `kernel`,
    the faster of that and this project's one-row bf16 matmul over a weight of the same size (at 2 threads
    ATen's `sum` reads slower than the memory allows: 44 GB/s while 9B int8 decoding read ~60), so a bound made
    from it is the fastest read seen on this machine, not one our own decoding could beat."""
    x = torch.ones(size_bytes // 4)
    best = size_bytes / median_seconds(x.sum, repeats)
    del x
    from idefics.cpu import kernels

    if kernel and kernels.available():
        rows = size_bytes // (2 * 1024)
        # a matrix of ones packed is ones in the packed shape ([rows / 64, 1024 / 2, 64, 2]): built directly, no
        # 1 GiB float matrix and pack pass per probe (the kernel checks the shape)
        packed = torch.ones(rows // 64, 512, 64, 2, dtype=torch.bfloat16)
        v = torch.ones(1, 1024, dtype=torch.bfloat16)
        best = max(best, size_bytes / median_seconds(lambda: kernels.linear(v, packed, None, rows), repeats))
    elif kernel and kernels.widening_available():  # AVX2: the plain bf16 weight, two rows in flight per thread
        weight = torch.ones(size_bytes // (2 * 1024), 1024, dtype=torch.bfloat16)
        v = torch.ones(1, 1024, dtype=torch.bfloat16)
        best = max(best, size_bytes / median_seconds(lambda: kernels.widening_linear(v, weight, None), repeats))
    return best


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest CPU matmul path for `dtype` (plain `F.linear`, oneDNN with a prepacked weight, this
    project's bf16 kernel, or bf16 widened to float32 where the CPU has no bf16 arithmetic) on a square product
    large enough to be compute-bound: the ceiling for prefill, which is almost all matmuls."""
    from idefics.cpu import kernels, packing

    x, w = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    paths = [lambda: torch.nn.functional.linear(x, w)]
    if torch.backends.mkldnn.is_available() and (dtype != torch.bfloat16 or kernels.onednn_has_bf16()):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        paths.append(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
    if dtype == torch.bfloat16 and kernels.available():
        panels = kernels.pack(w)
        paths.append(lambda: kernels.linear(x, panels, None, size))
    if dtype == torch.bfloat16 and packing.layout(dtype) == "widened":
        paths.append(lambda: packing.widened_linear(x, w, None))
    return max(2 * size ** 3 / median_seconds(path, repeats) for path in paths)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM. (Not getrusage's ru_maxrss, which Linux carries over
    from the parent across fork + exec, so a child would report its parent's peak.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
