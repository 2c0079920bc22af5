"""The CPU fast path for inference: the compiled C++ ops (`kernels`, sources in `csrc/`), packed and fused linears
(`packing`), weight-only int8/int4 quantization (`quantize`) and the compiled decoding steps of whole layers
(`steps`). The model layers import `ops` only, the few ops they call; loading (`checkpoint`, `pipeline`) packs and
quantizes through `packing` and `quantize`."""
