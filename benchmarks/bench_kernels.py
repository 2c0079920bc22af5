"""The matmul kernels alone, at the model's layer shapes: this project's CPU kernel (`idefics/cpu/kernels.py`)
against what it replaces, in one run, interleaved, medians, with the ratio.

    python benchmarks/bench_kernels.py              # 463M benchmark model's shapes, 1 thread
    python benchmarks/bench_kernels.py --nine-b     # idefics-9b's shapes
    python benchmarks/bench_kernels.py --threads 2  # as the decoding benchmark runs

On AVX-512 BF16 CPUs (the main kernel), bf16 and float32 weights: ours vs oneDNN with a prepacked weight (the
fastest path PyTorch has there; bf16 `F.linear` goes through oneDNN too, float32 through MKL, slower). On CPUs
with AVX2 but no AVX-512 (the AVX2 row kernel, `csrc/avx2.cpp`, weights kept plain): bf16 ours vs ATen's bf16
`F.linear` (what a bf16 layer runs there: oneDNN has no bf16 matmul), float32 ours vs oneDNN prepacked. int8
weights (per-row scales, bf16 activations): ours vs `torch._weight_int8pack_mm`. One row of x is a decoding step
(memory-bound: GB/s of weights read, against the streaming rate measured in the same run); 8 rows a batched
decoding step and 128 a prefill (compute-bound: GFLOP/s). Each layer is timed over enough copies of its weight
to be far larger than the caches, so every call streams from memory as in a real step."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from idefics.cpu import kernels  # noqa: E402

SHAPES = {"463M": [(3072, 1024, "q/k/v"), (5632, 1024, "gate/up"), (1024, 2816, "down"), (1024, 1024, "o"),
                   (32000, 1024, "output")],
          "9B": [(12288, 4096, "q/k/v"), (22016, 4096, "gate/up"), (4096, 11008, "down"), (4096, 4096, "o")]}


def paired(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, measured in alternating rounds."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(common.median_seconds(fn, 3))
    return {name: common.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nine-b", action="store_true", help="idefics-9b's layer shapes instead of the 463M model's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", type=int, default=256, help="MiB of weight copies per layer (defeats caches)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main_kernel = kernels.available()
    if not main_kernel and not kernels.widening_available():
        raise SystemExit("this CPU has neither AVX-512 BF16 nor AVX2 + FMA (or the kernels are switched off): "
                         "nothing to compare")
    bandwidth = common.memory_bandwidth()
    print(f"torch {torch.__version__}, {args.threads} threads, "
          f"{'main (AVX-512) kernel' if main_kernel else 'AVX2 row kernel'}; streaming read "
          f"{bandwidth / 1e9:.1f} GB/s (float32 sum of 1 GiB)\n")
    print("| weights | layer (out x in) | rows | ours | theirs | ours/theirs (speed) |")
    print("|---|---|---|---|---|---|")
    for n, k, name in SHAPES["9B" if args.nine_b else "463M"]:
        copies = max(1, args.memory * 2**20 // (2 * n * k))
        ours, theirs = {}, {}
        for dtype in (torch.bfloat16, torch.float32):
            weights = [torch.randn(n, k).to(dtype) for _ in range(copies)]
            ours[dtype] = [kernels.pack(w) for w in weights] if main_kernel else weights
            theirs[dtype] = (weights if dtype == torch.bfloat16 and not main_kernel
                             else [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights])
        q = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(copies)]
        ours_q = [kernels.pack(w) for w in q] if main_kernel else q
        scales = torch.rand(n) / 100
        for rows in (1, 8, 128):
            x = torch.randn(rows, k).bfloat16()
            cases = {dtype: {"ours": lambda d=dtype: [ours_linear(x.to(d), w, n, main_kernel) for w in ours[d]],
                             "theirs": lambda d=dtype: [their_linear(x.to(d), w, main_kernel) for w in theirs[d]]}
                     for dtype in (torch.bfloat16, torch.float32)}
            cases["int8"] = {"ours": lambda: [ours_linear(x, w, n, main_kernel, scales) for w in ours_q],
                             "theirs": lambda: [torch._weight_int8pack_mm(x, w, scales.bfloat16()) for w in q]}
            for kind, fns in cases.items():
                t = paired(fns, args.repeats)
                size = copies * n * k * {torch.bfloat16: 2, torch.float32: 4, "int8": 1}[kind]
                kind = str(kind).removeprefix("torch.")

                def rate(seconds: float) -> str:
                    if rows == 1:
                        return f"{size / seconds / 1e9:.1f} GB/s ({size / seconds / bandwidth:.0%} of streaming)"
                    return f"{2 * rows * copies * n * k / seconds / 1e9:.0f} GFLOP/s"

                print(f"| {kind} | {name} {n} x {k} | {rows} | {rate(t['ours'])} | {rate(t['theirs'])} | "
                      f"{t['theirs'] / t['ours']:.2f}x |", flush=True)


def ours_linear(x: torch.Tensor, weight: torch.Tensor, n: int, main_kernel: bool,
                scales: torch.Tensor | None = None) -> torch.Tensor:
    """The main kernel on its packed weight, or the AVX2 row kernel on the plain one."""
    if main_kernel:
        return kernels.linear(x, weight, None, n, scales)
    return kernels.widening_linear(x, weight, None, scales)


def their_linear(x: torch.Tensor, weight: torch.Tensor, main_kernel: bool) -> torch.Tensor:
    """oneDNN on its prepacked weight; for bf16 on an AVX2 CPU, ATen's bf16 `F.linear` on the plain one."""
    if weight.dim() == 2 and weight.dtype == torch.bfloat16 and not main_kernel:
        return torch.nn.functional.linear(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")

if __name__ == "__main__":
    main()
