"""This project's compiled CPU ops (`csrc/`, one extension), for inference on AVX-512 BF16:
- a matmul (`csrc/matmul.cpp`) with bf16, int8 (weight-only, per-row scales) or float32 weights, used by
  `packing.PackedLinear` and `quantize.Int8Linear`. Decoding streams every decoder weight once per token; this
  kernel reads its own weight layout at close to the machine's streaming rate, where oneDNN's prepacked kernels
  (and `torch._weight_int8pack_mm`) reach much less of it; it matches oneDNN's speed on prefill-sized products and
  gives oneDNN's (and so the reference's) bf16 results bit for bit. Where the CPU has AMX, bf16 (and several-row
  int8) products run on AMX tiles over the same layout (`csrc/amx.cpp`), as oneDNN's do there: equal to oneDNN's
  up to 32 rows, and beyond that within a rounding on ~0.03% of outputs (oneDNN's own results there change with
  the row and thread count; ours do not). `benchmarks/bench_kernels.py` measures it.
- RMSNorm and rotary embeddings written into the KV cache (`csrc/norm_rope.cpp`), bit-identical to the eager ops;
  attention of one query over the KV cache as it lies (`csrc/attention.cpp`, float32 arithmetic); and the decoding
  steps of a LLaMA decoder layer and of a gated cross-attention layer (`csrc/decoder_layer.cpp`, the Python
  layers' operations from C++, same bits).
  `applies()` says when they may stand in for the eager code (CPU, float32/bf16, no gradients); the model layers
  reach them through `ops.py` only.

It is compiled on first use with the C++ compiler torch's extension builder finds (~30 s, cached under
`TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions; `scripts/setup.sh` builds it ahead). Where the CPU
lacks AVX-512 BF16, no compiler is found or `IDEFICS_CPU_KERNELS=0` is set, `available()` is False
and the layers use oneDNN's prepacked kernels (int8: `torch._weight_int8pack_mm`): bf16 results identical, float32
and int8 ones equal to rounding, a little slower. On CPUs with AVX2 but no AVX-512 (where oneDNN has no bf16
matmul either) bf16 weights stay plain and are computed in float32 (`packing.layout` "widened"), on a second
extension (`widening_available()`): `csrc/avx2.cpp`'s bf16/float32/int8 products (float32 weights stay plain
there too, `packing.layout` "plain"), and the norm, rotary, attention and
decoding-step ops above compiled for AVX2 (8-lane vectors, `csrc/vec.h`; the same bits where they are bit-exact).
Only one of the two extensions is ever loaded in a process (they register the same op names).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("matmul.cpp", "amx.cpp", "norm_rope.cpp", "attention.cpp", "decoder_layer.cpp")]
# -fopenmp: `at::parallel_for` is inlined from ATen's headers, and without it the pragma is dropped and every op
# runs on one thread whatever `torch.set_num_threads` says. Linking -fopenmp records libgomp.so.1, the soname of the
# libgomp torch ships and has already loaded, so the process keeps a single OpenMP runtime (one thread pool).
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-ffp-contract=off", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
_state: dict[str, object] = {}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them in /proc/cpuinfo (empty elsewhere: no kernel is used)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(flags.split(":", 1)[1].split())


def cpu_supported() -> bool:
    """The CPU has the flags the kernel is compiled for (checked before loading: code built for them would fault
    on a CPU without them). With AMX as well, bf16 products run on its tiles (`csrc/amx.cpp`), as oneDNN's do."""
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= cpu_flags()


def onednn_has_bf16() -> bool:
    """oneDNN has bf16 matmuls here (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT): it packs bf16 weights."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def disabled() -> bool:
    return os.environ.get("IDEFICS_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")


def build(verbose: bool = False) -> None:
    """Compile (or load the cached build of) the kernel; registers `torch.ops.idefics.*`. Raises on failure."""
    from torch.utils.cpp_extension import load

    if not hasattr(torch.ops.idefics, "linear"):
        if not _cached():
            print("idefics: compiling the CPU kernels (once per machine, ~30 s)...", file=sys.stderr, flush=True)
        load(name="idefics_cpu_kernels", sources=[str(p) for p in SOURCES], extra_cflags=FLAGS, extra_ldflags=LDFLAGS,
             is_python_module=False, verbose=verbose)
        torch.library.register_fake("idefics::linear")(_linear_shape)


def _cached(name: str = "idefics_cpu_kernels") -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    try:
        return (Path(_get_build_directory(name, False)) / f"{name}.so").exists()
    except Exception:  # noqa: BLE001 - only decides whether to print the compiling message
        return False


def _linear_shape(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                  n: int, chunk: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], n)


def available() -> bool:
    """True when bf16 layers can use the kernel here (decided once per process; a failed build warns once)."""
    if "ok" not in _state:
        ok = cpu_supported() and not disabled() and torch.backends.cpu.get_cpu_capability() == "AVX512"
        if ok:
            try:
                build()
            except Exception as exc:  # noqa: BLE001 - any build problem means: use oneDNN
                warnings.warn(f"idefics: the CPU kernels could not be built ({type(exc).__name__}: "
                              f"{str(exc).strip()[-300:]}); the layers use oneDNN instead", stacklevel=2)
                ok = False
        _state["ok"] = ok
    return bool(_state["ok"])


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] weight → the kernel's layout, same dtype: [ceil(N/64), ceil(K/2), 64, 2] for bf16 and int8 (pairs of
    input features side by side), [ceil(N/64), K, 64, 1] for float32."""
    build()
    return torch.ops.idefics.pack(weight.detach())


# The AVX2 extension: its own products (avx2.cpp) and the main extension's norm, rotary, attention and decoding-step
# ops, compiled to 8-lane code (vec.h); -ffp-contract=off as above (norm_rope.cpp's bits need it).
AVX2_SOURCES = [Path(__file__).parent / "csrc" / name
                for name in ("avx2.cpp", "norm_rope.cpp", "attention.cpp", "decoder_layer.cpp")]
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]


def widening_available() -> bool:
    """True where neither the main kernel nor oneDNN has bf16 arithmetic but the CPU has AVX2 and FMA (most
    laptops, AMD Zen 2/3): bf16, float32 and int8 products run on `csrc/avx2.cpp` (a separate extension built for
    AVX2 only; few rows: weights widened to float32 in registers), and so do the fused ops below (`applies`). Decided once per
    process; a failed build warns once."""
    if "widening" not in _state:
        ok = (not cpu_supported() and {"avx2", "fma"} <= cpu_flags() and not disabled()
              and not onednn_has_bf16()
              and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))
        if ok:
            try:
                _build_avx2()
            except Exception as exc:  # noqa: BLE001 - any build problem means: ATen's own bf16 path
                warnings.warn(f"idefics: the AVX2 kernel could not be built ({type(exc).__name__}: "
                              f"{str(exc).strip()[-300:]}); bf16 layers use ATen's path", stacklevel=2)
                ok = False
        _state["widening"] = ok
    return bool(_state["widening"])


def _build_avx2() -> None:
    from torch.utils.cpp_extension import load

    if not hasattr(torch.ops.idefics, "widening_linear"):
        if not _cached("idefics_avx2_kernels"):
            print("idefics: compiling the AVX2 kernel (once per machine, ~15 s)...", file=sys.stderr, flush=True)
        load(name="idefics_avx2_kernels", sources=[str(p) for p in AVX2_SOURCES], extra_cflags=AVX2_FLAGS,
             extra_ldflags=LDFLAGS, is_python_module=False)
        torch.library.register_fake("idefics::widening_linear")(
            lambda x, w, b, s=None: x.new_empty(*x.shape[:-1], w.shape[0]))


def widening_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (bf16 or float32) times a plain bf16 or float32 weight [N, K] (+ bias), or an int8 one times its
    per-output `scale`, in float32, rounded once to x's dtype (`csrc/avx2.cpp`). Up to 16 rows each re-reads the
    weight rows from L1; more rows run float32 GEMM (ATen's, MKL, on float32 weights and widened bf16 ones; oneDNN's on
    int8 ones widened block by block, then scaled)."""
    return _op("widening_linear")(x, weight, bias, scale)


def uses_amx() -> bool:
    """bf16 products run on AMX tiles here (`csrc/amx.cpp`; `IDEFICS_AMX=0` keeps the AVX-512 ones)."""
    build()
    return bool(torch.ops.idefics.amx_usable())


def parallel_threads() -> int:
    """Threads the compiled ops actually run on (torch's thread count; 1 if the build lacks OpenMP)."""
    build()
    return int(torch.ops.idefics.parallel_threads(64))


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return torch.ops.idefics.unpack(packed, n, k)


def fused_ops_available() -> bool:
    """The fused ops below are compiled here: in the main extension (AVX-512 BF16) or in the AVX2 one."""
    return available() or widening_available()


def applies(*tensors: torch.Tensor) -> bool:
    """The fused ops below can stand in for the eager code: kernels available, every tensor float32 or bf16 on the
    CPU, and no gradient wanted (they have no backward; training keeps the eager ops)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    for t in tensors:
        if t.dtype not in _FUSED_DTYPES or not t.is_cpu:
            return False
    return fused_ops_available()


def takes_step_weight(weight: torch.Tensor) -> bool:
    """The decoding steps' products (`decoder_layer_step`, `gated_cross_attention_step`) take this weight as it is
    stored: the main kernel's panels ([N/64, K/2, 64, 2] or [N/64, K, 64, 1]: `pack`), or, on the AVX2
    extension, a plain bf16, float32 or int8 [N, K] (`packing.layout` "widened" / "plain")."""
    if weight.is_mkldnn:
        return False
    if available():
        return weight.dim() == 4
    return weight.dim() == 2 and weight.dtype in _STEP_WEIGHT_DTYPES and widening_available()


_STEP_WEIGHT_DTYPES = (torch.bfloat16, torch.float32, torch.int8)


_FUSED_DTYPES = (torch.float32, torch.bfloat16)
_ops: dict[str, object] = {}


def _op(name: str):
    """`torch.ops.idefics.<name>.default`, looked up once (building the kernels if needed)."""
    op = _ops.get(name)
    if op is None:
        build() if available() or not widening_available() else _build_avx2()
        op = _ops[name] = getattr(torch.ops.idefics, name).default
    return op


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`layers.RMSNorm` in one op, bit for bit (csrc/norm_rope.cpp): float32 statistics summed in ATen's order;
    the result in the weight's dtype. Needs at least 8 features (ATen sums shorter rows another way)."""
    return _op("rms_norm")(x, weight, eps)


def rotary_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                      keys: torch.Tensor, values: torch.Tensor, layer: int, start: int) -> torch.Tensor:
    """`layers.apply_rotary` on q and k plus the KV-cache write, in one op, bit for bit: q, k, v [B, T, heads * d]
    (views of one fused projection are fine), cos/signed_sin as `RotaryEmbedding` returns them; rotated k and v
    go to positions start.. of `layer` in the position-major keys/values [layers, B, max_len, kv_heads, d]; returns
    rotated q as [B, heads, T, d]."""
    return _op("rotary_into_cache")(q, k, v, cos, signed_sin, keys, values, layer, start)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per row (csrc/attention.cpp), reading k/v as they lie in the cache: q [B, H, 1, d],
    k/v [B, G, L, d] (G divides H: grouped-query attention), mask [B or 1, 1, 1, L] boolean (true = visible) or
    additive, or None. Float32 arithmetic, equal to float32 `scaled_dot_product_attention` up to rounding."""
    return _op("decode_attention")(q, k, v, mask)


def decode_attention_takes(head_dim: int, mask: torch.Tensor | None) -> bool:
    """The shapes `decode_attention` (and the decoding steps' attention) handles: head_dim a multiple of 16, a mask
    shared by the heads."""
    return head_dim % 16 == 0 and (mask is None or (mask.dim() == 4 and mask.shape[1:3] == (1, 1)))


def decoder_layer_step(x: torch.Tensor, input_norm: torch.Tensor, post_norm: torch.Tensor, eps: float,
                       qkv: torch.Tensor, o: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, heads: int,
                       kv_heads: int, hidden: int, cos: torch.Tensor, signed_sin: torch.Tensor, keys: torch.Tensor,
                       values: torch.Tensor, layer: int, start: int, mask: torch.Tensor | None,
                       scales: tuple[torch.Tensor | None, ...] = (None,) * 4) -> torch.Tensor:
    """One decoding step of a LLaMA decoder layer (csrc/decoder_layer.cpp): x [B, 1, D] → [B, 1, D], the same
    operations as `language_model.DecoderLayer.forward` with fused packed weights, bit for bit; writes the new
    position (`start`) of `layer` into the position-major cache keys/values. int8 weights come with their
    per-output `scales` (qkv, o, gate_up, down), x in bf16."""
    return _op("decoder_layer_step")(x, input_norm, post_norm, eps, qkv, o, gate_up, down, heads, kv_heads, hidden,
                                     cos, signed_sin, keys, values, layer, start, mask, *scales)


def gated_cross_attention_step(x: torch.Tensor, input_norm: torch.Tensor, post_norm: torch.Tensor, eps: float,
                               q: torch.Tensor, o: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, heads: int,
                               hidden: int, q_norm: torch.Tensor | None, q_norm_eps: float, k: torch.Tensor | None,
                               v: torch.Tensor | None, mask: torch.Tensor | None, gate: torch.Tensor | None,
                               alpha_attn: torch.Tensor, alpha_dense: torch.Tensor,
                               scales: tuple[torch.Tensor | None, ...] = (None,) * 4) -> torch.Tensor:
    """One decoding step of a gated cross-attention layer (csrc/decoder_layer.cpp): x [B, 1, D] → [B, 1, D], the
    operations of `cross_attention.GatedCrossAttentionLayer.forward` with packed weights, bit for bit; k/v the image
    keys/values [B, heads, L, d] (None: no row sees an image), mask additive [B, 1, 1, L], gate [B, 1]."""
    return _op("gated_cross_attention_step")(x, input_norm, post_norm, eps, q, o, gate_up, down, heads, hidden, q_norm,
                                             q_norm_eps, k, v, mask, gate, alpha_attn, alpha_dense, *scales)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int,
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] times the packed weight's transpose → [..., n], in x's dtype: bf16 for bf16 and int8 weights,
    float32 for float32 ones. int8 weights need `scale` (float32 per output: y = scale * (x . q) + bias)."""
    return _op("linear")(x, packed, scale, bias, n, 0)  # 0: oneDNN's summation blocks (matmul.cpp, default_chunk)
