"""Speed and memory of this implementation against the reference (transformers), in one run.

    python benchmarks/bench_speed.py                      # 463M random IDEFICS, float32 + bfloat16, int8/int4
    python benchmarks/bench_speed.py --quick              # fewer cases and repetitions
    python benchmarks/bench_speed.py --nine-b /big/disk   # + idefics-9b architecture (random weights) in int8
    python benchmarks/bench_speed.py --model idefics2      # Idefics2 at the same scale (Mistral 1024 x 16, SigLIP)

Both implementations load the same random-weight checkpoint. Every measurement alternates ours / reference,
after a warm-up, and the table shows medians; ours/ref is the median of the ratios within each round (both
sides of a round run seconds apart, so a change in the machine's speed over minutes cancels). Prefill = time to the first
token (reference: `generate` with max_new_tokens=1; ours: the first step of `decode`). Decode = tokens/s
between consecutive generated tokens (reference: timestamps from a logits processor; ours: from the steps
`decode` yields), summed over the batch.
Peak memory = peak RSS of a fresh child process that loads the model and generates. The bandwidth bound is
(measured read bandwidth: the faster of a float32 `sum` and this project's one-row bf16 matmul over 1 GiB, since
at 2 threads `sum` reads slower than the memory allows) / (bytes a decode step must read: decoder and
cross-attention weights, output layer, KV cache), so `of bound` says how close decoding is to this machine's
limit. Prefill is compute-bound: its `of compute bound` is (matmul FLOPs of the prompt, counted by torch's
FlopCounterMode) / (the fastest matmul rate measured in the same run) / (measured time), for both
implementations. The reference needs the test
dependencies (`pip install -e .[test]`)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from idefics.checkpoint import load_model  # noqa: E402
from idefics.cpu.quantize import CpuLayout  # noqa: E402
from idefics.generation import GenerationParams, decode  # noqa: E402
from idefics.image_cache import ImageFeatureCache, with_cached_images  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Family:
    """What differs between IDEFICS and Idefics2 in the benchmark: the preset, the reference class, the inputs."""

    def __init__(self, name: str, image_size: int | None = None) -> None:
        if name not in ("idefics", "idefics2"):
            raise SystemExit(f"--model must be idefics or idefics2, got {name!r}")
        self.name = name
        self.preset = common.BENCH_IDEFICS2 if name == "idefics2" else common.BENCH_463M
        # Idefics2 images are as large as the processor makes them; IDEFICS takes its encoder's fixed size
        self.image_size = common.IDEFICS2_IMAGE_SIZE if name == "idefics2" else image_size or 224
        self.image_seq_len = self.preset["perceiver_config"]["resampler_n_latents"] if name == "idefics2" else 0

    @staticmethod
    def of(folder: Path | str) -> "Family":
        config = json.loads((Path(folder) / "config.json").read_text())
        return Family(config.get("model_type", "idefics"), config.get("vision_config", {}).get("image_size"))

    def inputs(self, batch: int, tokens: int, images: int, seed: int = 0) -> dict[str, torch.Tensor]:
        return common.prompt_inputs(batch, tokens, images, self.image_size, seed, image_seq_len=self.image_seq_len)

    def prefill_label(self, images: int, tokens: int) -> str:
        """Idefics2 prompts count their text: the image tokens come on top."""
        return f"prefill {images} img, {tokens}{' text' if self.image_seq_len else ''} tok"

    def context(self, tokens: int, images: int = 1) -> int:
        """Positions in the KV cache after a prompt of `tokens` (as `inputs` builds it)."""
        return tokens + (images * (self.image_seq_len + 1) + 2 if self.image_seq_len else 0)  # + <s>, last <fake>

    def reference(self, folder: Path | str, dtype: str):
        if self.name == "idefics2":
            from transformers import Idefics2ForConditionalGeneration as Reference
        else:
            from transformers import IdeficsForVisionText2Text as Reference
        return Reference.from_pretrained(folder, dtype=DTYPES[dtype]).eval()


# ---- running one measurement ------------------------------------------------------------------------------------

def ours_generate(model, inputs, new_tokens: int) -> tuple[list[float], torch.Tensor]:
    """Timestamps of each generated step (the first is the prefill's token) and the tokens."""
    stamps, tokens = [], []
    params = GenerationParams(max_new_tokens=new_tokens, stop_token_ids=[])
    for step in decode(model, inputs, params, pad_token_id=0):
        stamps.append(time.perf_counter())
        tokens.append(step.tokens)
    return stamps, torch.stack(tokens, 1)


def reference_generate(model, inputs, new_tokens: int) -> tuple[list[float], torch.Tensor]:
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):  # called once per step, right after that step's forward
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    stamp = Stamp()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([stamp]), pad_token_id=0, eos_token_id=None)
    return stamp.stamps, out[:, inputs["input_ids"].shape[1]:]


def prefill_seconds(run, model, inputs) -> float:
    start = time.perf_counter()
    stamps, _ = run(model, inputs, 1)
    return stamps[0] - start


def cached_prefill_seconds(model, inputs, cache) -> float:
    """Prefill of a prompt whose image was seen before (the next turn of a chat): the image-feature cache
    replaces the vision encoder and perceiver; hashing the pixels is included in the time."""
    start = time.perf_counter()
    stamps, _ = ours_generate(model, with_cached_images(model, inputs, cache), 1)
    return stamps[0] - start


def decode_rate(run, model, inputs, new_tokens: int) -> tuple[float, torch.Tensor]:
    stamps, tokens = run(model, inputs, new_tokens)
    batch = inputs["input_ids"].shape[0]
    return batch * (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens


def paired_ratio(results: dict[str, list[float]]) -> float:
    """Median over rounds of ours/reference within the same round: the two ran seconds apart, so a slowdown
    of the machine slows both and cancels, where the ratio of the two medians would not."""
    return common.median([a / b for a, b in zip(results["ours"], results["reference"])])


def interleaved(runs: dict, repeats: int) -> dict[str, list]:
    """Call each runner once to warm up, then `repeats` rounds alternating between them."""
    for fn in runs.values():
        fn()
    results = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            results[name].append(fn())
    return results


# ---- what a decode step must read --------------------------------------------------------------------------------

def decode_bytes(model, batch: int, context: int) -> int:
    """Weights read per decode step (not the per-prompt image projections k/v, vision, perceiver, embeddings)
    plus the self-attention cache read at `context` positions and the cached image keys/values."""
    inner, c = model.model, model.config
    if hasattr(inner, "text_model"):  # Idefics2: the image tokens are ordinary positions of the KV cache
        t = c.text_config
        parts, skip = (inner.text_model.layers, inner.text_model.norm, model.lm_head), set()
        kv_layers, kv_heads, head_dim, cross = t.num_hidden_layers, t.num_key_value_heads, c.head_dim, 0
    else:
        parts = (inner.layers, inner.gated_cross_attn_layers, inner.norm, model.lm_head)
        skip = {id(t) for layer in inner.gated_cross_attn_layers
                for t in list(layer.cross_attn.k_proj.parameters()) + list(layer.cross_attn.k_proj.buffers())
                + list(layer.cross_attn.v_proj.parameters()) + list(layer.cross_attn.v_proj.buffers())}
        kv_layers, kv_heads, head_dim = c.num_hidden_layers, c.kv_heads, c.head_dim
        cross = 2 * c.num_cross_layers * batch * (c.image_latents or 0) * c.hidden_size
    tensors = {}
    for part in parts:
        for t in list(part.parameters()) + list(part.buffers()):
            if id(t) not in skip:
                tensors[id(t)] = t
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    element = torch.finfo(model.dtype).bits // 8
    kv = 2 * kv_layers * batch * kv_heads * context * head_dim * element
    return weights + kv + cross * element


def prefill_flops(folder: Path, family: "Family", cases: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """Matmul FLOPs of one prefill per (images, tokens) case (vision encoder, perceiver, decoder and
    cross-attention, logits of the last position), counted by torch's FlopCounterMode on the plain model.
    Attention score/value products inside the fused CPU kernel are not counted (a few percent), so the
    compute bound derived from this is slightly low and `of compute bound` slightly understated."""
    from torch.utils.flop_counter import FlopCounterMode

    model = load_model(folder, dtype="bfloat16").requires_grad_(False)  # plain layers: the counter sees aten matmuls
    out = {}
    for images, tokens in cases:
        inputs = family.inputs(1, tokens, images)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(inputs["input_ids"], inputs["attention_mask"], logits_to_keep=1, **model.prefill_inputs(inputs))
        out[images, tokens] = float(counter.get_total_flops())
    return out


# ---- quality of the quantized models ----------------------------------------------------------------------------

def quality(float_model, quantized_model, prompts: list[dict]) -> dict[str, float]:
    """Teacher-forced over every position of a fixed prompt set: top-1 agreement with the float model, the max
    and mean absolute logit difference, and the float logits' max magnitude for scale."""
    agree = total = 0
    max_diff = mean_diff = scale = 0.0
    def logits(model, inputs):
        return model(inputs["input_ids"], inputs["attention_mask"], **model.prefill_inputs(inputs)).logits.float()

    with torch.inference_mode():
        for inputs in prompts:
            a, b = logits(float_model, inputs), logits(quantized_model, inputs)
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[0] * a.shape[1]
            max_diff = max(max_diff, float((a - b).abs().max()))
            mean_diff += float((a - b).abs().mean()) / len(prompts)
            scale = max(scale, float(a.abs().max()))
    return {"top1": agree / total, "max_diff": max_diff, "mean_diff": mean_diff, "scale": scale}


def quality_prompts(family: Family) -> list[dict]:
    """A fixed set: different lengths, 0-3 images, fixed seeds."""
    shapes = [(1, 48, 1), (1, 96, 2), (1, 64, 0), (1, 128, 3), (1, 80, 1), (1, 32, 1)]
    return [family.inputs(b, t, n, seed=100 + i) for i, (b, t, n) in enumerate(shapes)]


# ---- peak memory in a child process -----------------------------------------------------------------------------

def child_memory(impl: str, folder: str, dtype: str, quantize: str | None, threads: int) -> dict:
    """Runs in a fresh process: load, prefill 1 image + 128 tokens, decode 16 tokens, report peak RSS."""
    torch.set_num_threads(threads)
    family = Family.of(folder)
    inputs = family.inputs(1, 128, 1)
    start = time.perf_counter()
    if impl == "reference":
        model = family.reference(folder, dtype)
        run = reference_generate
    else:
        model = load_model(folder, dtype=dtype, convert=CpuLayout(quantize, pack=True))  # as idefics.load does
        run = ours_generate
    loaded = time.perf_counter() - start
    load_peak = common.peak_rss_bytes()
    stamps, _ = run(model, inputs, 16)
    return {"peak_rss": common.peak_rss_bytes(), "load_peak_rss": load_peak, "load_s": loaded,
            "prefill_s": stamps[0] - start - loaded,
            "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "decode_bytes": decode_bytes(model, 1, 144) if impl == "ours" else None}


def memory_of(impl: str, folder: Path, dtype: str, quantize: str | None, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([impl, str(folder), dtype, quantize, threads])]
    # Large allocations straight from mmap, returned on free: glibc's adaptive threshold otherwise lets tens of
    # MB temporaries fragment the heap while the 9B model is quantized tensor by tensor.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the table ---------------------------------------------------------------------------------------------------

class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def add(self, dtype: str, what: str, ours: float, theirs: float | None, unit: str, higher_is_better: bool,
            note: str = "", ratio: float | None = None) -> None:
        """`ratio`: ours/reference when measured pairwise (see `paired_ratio`); else the ratio of the values."""
        if theirs is None:
            self.rows.append((dtype, what, f"{ours:.3g} {unit}", "-", "-", "-", note))
            return
        ratio = ours / theirs if ratio is None else ratio
        speedup = ratio if higher_is_better else 1 / ratio
        self.rows.append((dtype, what, f"{ours:.3g} {unit}", f"{theirs:.3g} {unit}", f"{ratio:.2f}",
                          f"{speedup:.2f}x", note))

    def render(self) -> str:
        head = ("dtype", "measure", "ours", "reference", "ours/ref", "better by", "note")
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def bench_dtype(dtype: str, folder: Path, args, table: Table, bandwidth: list[float]) -> None:
    family = Family.of(folder)
    ours = load_model(folder, dtype=dtype, convert=CpuLayout(pack=True))
    ref = family.reference(folder, dtype)
    runs = (("ours", ours_generate, ours), ("reference", reference_generate, ref))
    cases = [(1, 128), (4, 128)] + ([] if args.quick else [(1, 512), (4, 512)])
    flops, peak = prefill_flops(folder, family, cases), common.matmul_peak(DTYPES[dtype])
    for images, tokens in cases:
        inputs = family.inputs(1, tokens, images)
        res = interleaved({name: (lambda r=run, m=model: prefill_seconds(r, m, inputs)) for name, run, model in runs},
                          args.repeats)
        mine, theirs = common.median(res["ours"]), common.median(res["reference"])
        bound = flops[images, tokens] / peak  # seconds if every FLOP ran at the matmul peak
        table.add(dtype, family.prefill_label(images, tokens), mine, theirs, "s", higher_is_better=False,
                  ratio=paired_ratio(res), note=f"{bound / mine:.0%} of compute bound (ref {bound / theirs:.0%}; "
                       f"{flops[images, tokens] / 1e9:.0f} GFLOP at {peak / 1e9:.0f} GFLOP/s = {bound:.3g} s)")
        print(table.rows[-1], flush=True)
    if family.name == "idefics":  # the image-feature cache serves IDEFICS v1 (cross-attention) models
        inputs = family.inputs(1, 128, 1)
        cache = ImageFeatureCache()
        with_cached_images(ours, inputs, cache)  # the first turn saw the image
        res = interleaved({"ours": lambda: cached_prefill_seconds(ours, inputs, cache),
                           "reference": lambda: prefill_seconds(reference_generate, ref, inputs)}, args.repeats)
        table.add(dtype, "prefill 1 img, 128 tok, image seen before", common.median(res["ours"]),
                  common.median(res["reference"]), "s", higher_is_better=False, ratio=paired_ratio(res),
                  note="ours: image-feature cache")
        print(table.rows[-1], flush=True)
    for batch, new in ((1, args.new_tokens), (8, max(8, args.new_tokens // 2))):
        inputs = family.inputs(batch, 128, 1)
        tokens = {}

        def measure(name, run, model):
            rate, tokens[name] = decode_rate(run, model, inputs, new)
            return rate

        bandwidth.append(common.memory_bandwidth(kernel=True))
        res = interleaved({name: (lambda n=name, r=run, m=model: measure(n, r, m)) for name, run, model in runs},
                          args.repeats)
        bandwidth.append(common.memory_bandwidth(kernel=True))
        # the bandwidth measured right before and after these rounds: this machine's speed varies over minutes
        bound = batch * common.median(bandwidth[-2:]) / decode_bytes(ours, batch, family.context(128) + new // 2)
        same = bool(torch.equal(tokens["ours"], tokens["reference"]))
        rate = common.median(res["ours"])
        table.add(dtype, f"decode batch {batch}", rate, common.median(res["reference"]), "tok/s",
                  higher_is_better=True, ratio=paired_ratio(res),
                  note=f"{rate / bound:.0%} of bound ({bound:.3g} tok/s); "
                       f"greedy tokens {'equal' if same else 'DIFFER'}")
        print(table.rows[-1], flush=True)
    del ref


def bench_quantized(folder: Path, args, table: Table, bandwidth: list[float]) -> None:
    """int8/int4 against our bf16 model: speed (ours only, vs the reference's bf16 rate) and quality."""
    family = Family.of(folder)
    base = load_model(folder, dtype="bfloat16", convert=CpuLayout(pack=True))
    prompts = quality_prompts(family)
    bf16_rates = {row[1]: float(row[3].split()[0]) for row in table.rows if row[0] == "bfloat16" and row[3] != "-"}
    for mode in args.quantize:
        model = load_model(folder, dtype="bfloat16", convert=CpuLayout(mode, pack=True))
        q = quality(base, model, prompts)
        note = (f"top-1 agreement with bf16 {q['top1']:.1%}, max |logit diff| {q['max_diff']:.3g} "
                f"(mean {q['mean_diff']:.2g}, logits up to {q['scale']:.3g})")
        inputs = family.inputs(1, 128, 1)
        res = interleaved({"q": lambda: prefill_seconds(ours_generate, model, inputs)}, args.repeats)
        what = family.prefill_label(1, 128)
        table.add(f"bf16+{mode}", what, common.median(res["q"]), bf16_rates.get(what), "s", higher_is_better=False,
                  note="reference in bf16")
        for batch, new in ((1, args.new_tokens), (8, max(8, args.new_tokens // 2))):
            inputs = family.inputs(batch, 128, 1)
            bandwidth.append(common.memory_bandwidth(kernel=True))
            res = interleaved({"q": lambda: decode_rate(ours_generate, model, inputs, new)[0]}, args.repeats)
            bandwidth.append(common.memory_bandwidth(kernel=True))
            bound = batch * common.median(bandwidth[-2:]) / decode_bytes(model, batch, family.context(128) + new // 2)
            rate = common.median(res["q"])
            table.add(f"bf16+{mode}", f"decode batch {batch}", rate, bf16_rates.get(f"decode batch {batch}"),
                      "tok/s", higher_is_better=True,
                      note=f"{rate / bound:.0%} of bound ({bound:.3g} tok/s); reference in bf16"
                      + (f"; {note}" if batch == 1 else ""))
            print(table.rows[-1], flush=True)


def run_nine_b(args, threads: int) -> list[str]:
    """Write idefics-9b (random bf16 weights) shard by shard, load it in a child process with int8 (and bf16
    when the machine has room), report peak memory and speed, delete the shards."""
    folder = Path(args.nine_b) / "idefics-9b-random"
    lines = []
    try:
        start = time.perf_counter()
        reused = (folder / "config.json").exists()  # --keep leaves a checkpoint to reuse
        if not reused:
            common.write_random_checkpoint(folder, common.IDEFICS_9B, torch.bfloat16, shard_bytes=2**30)
        lines.append(f"9B checkpoint {'reused' if reused else 'written'} in {time.perf_counter() - start:.0f} s "
                     f"({sum(f.stat().st_size for f in folder.glob('*.safetensors')) / 2**30:.1f} GiB)")
        print(lines[-1], flush=True)
        modes = ["int8"] + (["int4"] if "int4" in args.quantize else []) + (["none"] if args.nine_b_bf16 else [])
        for mode in modes:
            r = memory_of("ours", folder, "bfloat16", None if mode == "none" else mode, threads)
            bw = common.memory_bandwidth(kernel=True)
            bound = bw / r["decode_bytes"]
            lines.append(f"9B bf16{'' if mode == 'none' else '+' + mode}: peak RSS {r['peak_rss'] / 2**30:.2f} GiB "
                         f"({r['load_peak_rss'] / 2**30:.2f} GiB after loading), "
                         f"load {r['load_s']:.0f} s, prefill (1 img, 128 tok) {r['prefill_s']:.1f} s, "
                         f"decode {r['decode_tps']:.2f} tok/s = {r['decode_tps'] / bound:.0%} of bound "
                         f"({bound:.2f} tok/s at {bw / 1e9:.1f} GB/s)")
            print(lines[-1], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="idefics", help="idefics (the 463M IDEFICS) or idefics2 (same scale)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--quantize", default="int8,int4", help="quantized modes to measure ('' for none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per decode measurement (batch 1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="128-token prefills only, 2 repeats")
    parser.add_argument("--workdir", default=None, help="where the random checkpoints go (default: a temp dir)")
    parser.add_argument("--nine-b", default=None, metavar="DIR", help="also run idefics-9b (writes ~17 GiB to DIR)")
    parser.add_argument("--nine-b-bf16", action="store_true", help="with --nine-b: also try bf16 (needs ~19 GiB)")
    parser.add_argument("--nine-b-only", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory rows")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_memory(*json.loads(args.child))))
        return
    torch.set_num_threads(args.threads)
    args.quantize = [m for m in args.quantize.split(",") if m]
    if args.quick:
        args.repeats = min(args.repeats, 2)
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}", flush=True)
    extra = []
    if args.nine_b and args.nine_b_only:
        extra = run_nine_b(args, args.threads)
        print("\n".join(extra))
        return
    table, bandwidth = Table(), [common.memory_bandwidth(kernel=True)]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="idefics-bench-"))
    try:
        for dtype in args.dtypes.split(","):
            folder = work / dtype
            if not (folder / "config.json").exists():  # --keep / --workdir reuse a written checkpoint
                common.write_random_checkpoint(folder, Family(args.model).preset, DTYPES[dtype])
            if not args.memory_only:
                bench_dtype(dtype, folder, args, table, bandwidth)
            mem = {impl: memory_of(impl, folder, dtype, None, args.threads) for impl in ("ours", "reference")}
            table.add(dtype, "peak memory (load + generate)", mem["ours"]["peak_rss"] / 2**20,
                      mem["reference"]["peak_rss"] / 2**20, "MiB", higher_is_better=False)
            if dtype == "bfloat16":
                if not args.memory_only:
                    bench_quantized(folder, args, table, bandwidth)
                for mode in args.quantize:
                    m = memory_of("ours", folder, dtype, mode, args.threads)
                    table.add(f"bf16+{mode}", "peak memory (load + generate)", m["peak_rss"] / 2**20,
                              mem["reference"]["peak_rss"] / 2**20, "MiB", higher_is_better=False,
                              note="reference in bf16")
        if args.nine_b:
            extra = run_nine_b(args, args.threads)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nmemory read bandwidth: median {common.median(bandwidth) / 1e9:.1f} GB/s "
          f"over {len(bandwidth)} measurements (the faster of a float32 sum and our one-row bf16 matmul over 1 GiB, "
          f"{args.threads} threads)\n")
    print(table.render())
    for line in extra:
        print(line)


if __name__ == "__main__":
    main()
