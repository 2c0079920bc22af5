"""This project's one compiled piece: a bf16 matmul for CPUs with AVX-512 BF16 (`csrc/bf16_matmul.cpp`), used
by `packing.PackedLinear` for bf16 inference. Decoding streams every decoder weight once per token; this kernel
reads its own weight layout at close to the machine's streaming rate, where oneDNN's prepacked kernel reaches
~80% of it, and it matches oneDNN on prefill-sized products (`benchmarks/bench_kernels.py` measures both).

It is compiled on first use with the C++ compiler torch's extension builder finds (~25 s, cached under
`TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions; `scripts/setup.sh` builds it ahead). Where the CPU
lacks AVX-512 BF16, no compiler is found or `IDEFICS_CPU_KERNELS=0` is set, `available()` is False and bf16
layers use oneDNN: same results to the last bit almost everywhere, a little slower.

    python -m idefics.cpu_kernels     # build now and check the kernel against float32 arithmetic
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "bf16_matmul.cpp"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]
_state: dict[str, object] = {}


def cpu_has_avx512_bf16() -> bool:
    """The CPU flags the kernel is compiled for (checked before loading: code built for them would fault on
    a CPU without them). Linux reports them in /proc/cpuinfo; elsewhere the kernel is not used."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    have = set(flags.split(":", 1)[1].split())
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= have


def disabled() -> bool:
    return os.environ.get("IDEFICS_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


def build(verbose: bool = False) -> None:
    """Compile (or load the cached build of) the kernel; registers `torch.ops.idefics.*`. Raises on failure."""
    from torch.utils.cpp_extension import load

    if not hasattr(torch.ops.idefics, "bf16_linear"):
        print("idefics: compiling the bf16 CPU kernel (once per machine, ~25 s)...", file=sys.stderr, flush=True) \
            if not _cached() else None
        load(name="idefics_bf16_matmul", sources=[str(SOURCE)], extra_cflags=FLAGS, is_python_module=False,
             verbose=verbose)
        torch.library.register_fake("idefics::bf16_linear")(_linear_shape)


def _cached() -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    try:
        return (Path(_get_build_directory("idefics_bf16_matmul", False)) / "idefics_bf16_matmul.so").exists()
    except Exception:  # noqa: BLE001 - only decides whether to print the compiling message
        return False


def _linear_shape(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int, chunk: int,
                  ) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], n)


def available() -> bool:
    """True when bf16 layers can use the kernel here (decided once per process; a failed build warns once)."""
    if "ok" not in _state:
        ok = cpu_has_avx512_bf16() and not disabled() and torch.backends.cpu.get_cpu_capability() == "AVX512"
        if ok:
            try:
                build()
            except Exception as exc:  # noqa: BLE001 - any build problem means: use oneDNN
                warnings.warn(f"idefics: the bf16 CPU kernel could not be built ({type(exc).__name__}: "
                              f"{str(exc).strip()[-300:]}); bf16 layers use oneDNN instead", stacklevel=2)
                ok = False
        _state["ok"] = ok
    return bool(_state["ok"])


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bf16 weight → the kernel's layout [ceil(N/64), ceil(K/2), 64, 2]."""
    build()
    return torch.ops.idefics.bf16_pack(weight.detach())


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return torch.ops.idefics.bf16_unpack(packed, n, k)


def onednn_chunk(rows: int, k: int) -> int:
    """Input features oneDNN's bf16 matmul sums separately before adding the partial sums (its K block), as
    measured on AVX-512 BF16 without AMX: 512 for one row or K <= 1024, else 1024. Summing the same way makes
    every output bit-identical to oneDNN's (tests/test_cpu_kernels.py sweeps the shapes)."""
    return 512 if rows == 1 or k <= 1024 else 1024


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    k = x.shape[-1]
    return torch.ops.idefics.bf16_linear(x, packed, bias, n, onednn_chunk(x.numel() // max(k, 1), k))


def self_check() -> float:
    """Max error of the kernel against float32 arithmetic on bf16 inputs, in units of the output's bf16 spacing
    (≤ 1 means within one rounding of the exact result)."""
    torch.manual_seed(0)
    worst = 0.0
    for m, n, k in [(1, 200, 4097 * 2 + 1), (7, 64, 96), (13, 130, 33)]:
        w, x, b = (torch.randn(n, k).bfloat16(), torch.randn(m, k).bfloat16(), torch.randn(n).bfloat16())
        exact = torch.nn.functional.linear(x.float(), w.float(), b.float())
        got = linear(x, pack(w), b, n).float()
        spacing = torch.finfo(torch.bfloat16).eps * exact.abs().clamp(min=1e-3)
        worst = max(worst, float(((got - exact).abs() / spacing).max()))
    return worst


if __name__ == "__main__":
    if not cpu_has_avx512_bf16():
        raise SystemExit("this CPU has no AVX-512 BF16: bf16 layers use oneDNN (nothing to build)")
    build(verbose="-v" in sys.argv)
    print(f"bf16 CPU kernel ready; max error vs float32 arithmetic: {self_check():.2f} bf16 spacings")
