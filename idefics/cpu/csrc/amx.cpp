// y = x W^T (+ b) on AMX tiles, for bf16 (or widened int8) weights in matmul.cpp's panel layout, where the CPU
// has AMX.
//
// Why: with AMX, oneDNN's bf16 products (the reference's) run on tiles, ~3x faster than any AVX-512 kernel at
// prefill sizes, and they sum in the tiles' order, which no `vdpbf16ps` chunking reproduces (a sweep found ~0.03%
// of outputs 1 ulp apart). Running the same tile instruction over the same weight layout keeps the panels (one
// copy of each weight, read front to back by decoding) and gives oneDNN's prefill speed and its bits up to 32
// rows; beyond, oneDNN's result for a row changes with the row and thread count (ours does not), and the two
// differ by a rounding on ~0.03% of outputs.
//
// The panel layout is already what a tile product wants for its second operand: for 16 consecutive input pairs,
// the 64 outputs' pairs side by side (256 bytes per pair), so the B tile of outputs 16j..16j+15 is 16 rows of
// 64 bytes at stride 256. A tile is 16 rows of x x 32 input features. Each C tile (16 rows x 16 outputs, float32)
// accumulates the whole K in order, 32 features per `tdpbf16ps`, as oneDNN's brgemm does; then bias in float32 and
// one rounding to bf16. Features beyond K (x copied with zeros when K is not a multiple of 32), rows beyond M (a
// zero-padded copy of a last A tile of fewer than 16 rows) and a panel's pairs beyond K (a zero-padded copy of
// its short last step) are zeros, so they add nothing. The `chunk` of matmul.cpp does not apply here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "ops.h"

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int64_t kPanel = 64;      // outputs per weight panel (matmul.cpp's kBlockN)
constexpr int64_t kPairs = 16;      // input pairs per tile step (32 features, 64 bytes of a tile row)
constexpr int64_t kRowBlock = 32;   // rows of x per pass: two A tiles
constexpr int64_t kPairBytes = kPanel * 2 * 2;  // one input pair of a panel: 64 outputs x 2 bf16
constexpr int64_t kFetchAhead = 32768;  // bytes of a panel fetched ahead by a first pass: ~8 steps, past memory latency

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 64 bytes wide; A (4, and 5 in `half_panel`) and C (0-3) tiles `rows` high, B tiles 16.
TileConfig tile_config(int rows, bool short_rows) {
  TileConfig c;
  for (int t = 0; t < 8; t++) {
    c.rows[t] = t < 4 || t == 4 || (t == 5 && !short_rows) ? rows : 16;
    c.colsb[t] = 64;
  }
  return c;
}

// Linux hands out AMX state only to processes that ask (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA).
bool request_tiles() {
  constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

// One half panel (32 outputs) for 32 rows of x (two A tiles; `Two` false: 16 rows, the tail of M), the whole K.
// Memory: a panel is read from memory once, by the first pass over it, and from L2 by the others (the second
// half, later row blocks). Left to that first pass, the read does not overlap the tile work (cold weights cost
// their whole transfer time on top); so every pass over a panel also fetches its share of the thread's next panel
// into L2, `ahead` bytes from `fetch` per step, and only a thread's first panel is fetched by its own first pass.
template <bool Two>
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
void half_panel(const uint16_t* a, const uint16_t* a1, int64_t lda, const char* panel, int64_t steps,
                const char* last_step, int half, const char* fetch, int64_t ahead, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  if (Two) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; s++) {
    const char* b = (s == steps - 1 && last_step != nullptr ? last_step : panel + s * kPairs * kPairBytes) + half * 128;
    if (fetch != nullptr)
      for (int64_t line = 0; line < ahead; line += 64) _mm_prefetch(fetch + s * ahead + line, _MM_HINT_T1);
    _tile_loadd(4, a + s * 32, lda * 2);
    _tile_loadd(6, b, kPairBytes);
    _tile_loadd(7, b + 64, kPairBytes);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (Two) {
      _tile_loadd(5, a1 + s * 32, lda * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 32 * 4);  // c: [32 rows][32 outputs] float32
  _tile_stored(1, c + 16, 32 * 4);
  if (Two) {
    _tile_stored(2, c + 16 * 32, 32 * 4);
    _tile_stored(3, c + 16 * 32 + 16, 32 * 4);
  }
}

// At most 16 rows (decoding): one A tile of `rows` rows against the whole panel per step (four C tiles, B tiles
// in 5-7 with the fourth reusing 5), so the panel streams front to back once, 8 KiB of it fetched ahead.
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
void short_panel(const uint16_t* a, int64_t lda, const char* panel, int64_t steps, const char* last_step, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; s++) {
    const char* b = s == steps - 1 && last_step != nullptr ? last_step : panel + s * kPairs * kPairBytes;
    for (int line = 0; line < 4096; line += 64) _mm_prefetch(b + 8192 + line, _MM_HINT_T0);
    _tile_loadd(4, a + s * 32, lda * 2);
    _tile_loadd(5, b, kPairBytes);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, b + 64, kPairBytes);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(7, b + 128, kPairBytes);
    _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(5, b + 192, kPairBytes);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, c, 64 * 4);  // c: [16 rows][64 outputs] float32
  _tile_stored(1, c + 16, 64 * 4);
  _tile_stored(2, c + 32, 64 * 4);
  _tile_stored(3, c + 48, 64 * 4);
}

__attribute__((target("amx-tile")))
void configure(const TileConfig& c) {
  asm volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

__attribute__((target("amx-tile")))
void release() { _tile_release(); }

}  // namespace

namespace idefics {

bool amx_usable() {  // IDEFICS_AMX=0 keeps the AVX-512 tiles (to compare them)
  static const bool ok = [] {
    const char* env = std::getenv("IDEFICS_AMX");
    const bool off = env != nullptr && std::string(env) == "0";
    return !off && __builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("amx-tile") && request_tiles();
  }();
  return ok;
}

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, const float* scale, const float* bias,
                      int64_t n) {
  const int64_t m = x.size(0), k = x.size(1), kg = packed.size(1), np = packed.size(0);
  const int64_t steps = (kg + kPairs - 1) / kPairs, kp = steps * kPairs * 2;  // features padded to whole steps
  const bool short_rows = m <= 16;  // `short_panel`, tiles of m rows; else `half_panel` on blocks of 32 rows
  const int64_t mp = short_rows ? m : (m + 15) / 16 * 16;  // a tail of at most 16 rows runs on one A tile
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr());
  // Tile loads must stay inside x: with K not a multiple of 32, x is copied with zero features and rows; else
  // only a last A tile of fewer than 16 rows is (`rows_at`).
  std::vector<uint16_t> padded, last_tile;
  if (kp != k) {
    padded.assign(static_cast<size_t>(mp * kp), 0);
    for (int64_t r = 0; r < m; r++) std::memcpy(&padded[r * kp], xs + r * k, k * 2);
    xs = padded.data();
  }
  const int64_t short_from = mp != m && kp == k ? m / 16 * 16 : mp;  // the rows `last_tile` holds from here
  if (short_from < m) {
    last_tile.assign(static_cast<size_t>(16 * kp), 0);
    std::memcpy(last_tile.data(), xs + short_from * kp, (m - short_from) * kp * 2);
  }
  auto rows_at = [&](int64_t r) { return r == short_from ? last_tile.data() : xs + r * kp; };
  at::Tensor out = at::empty({m, n}, x.options());
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr());
  const char* ws = reinterpret_cast<const char*>(packed.data_ptr());
  const bool int8 = packed.scalar_type() == at::kChar;  // each panel widened to bf16 first, in a buffer in L2
  const int64_t panel_bytes = kg * kPairBytes / (int8 ? 2 : 1), tail_pairs = kg - (steps - 1) * kPairs;
  // Tasks are (group of rows, panel), group-major: a thread keeps one group of x in L2 while panels stream past
  // it (`kRowGroupBytes`; here a multiple of 32 rows): beyond that x fell out of L2 between panels.
  const int64_t wanted = short_rows ? 1 : std::max<int64_t>(1, (m * kp * 2 + kRowGroupBytes - 1) / kRowGroupBytes);
  const int64_t group_rows = short_rows ? m : ((m + wanted - 1) / wanted + kRowBlock - 1) / kRowBlock * kRowBlock;
  const int64_t groups = (m + group_rows - 1) / group_rows;  // rounding group_rows up can leave fewer, none empty
  at::parallel_for(0, groups * np, 1, [&](int64_t t0, int64_t t1) {
    configure(tile_config(short_rows ? static_cast<int>(m) : 16, short_rows));
    alignas(64) float c[kRowBlock * 32];  // = 16 x 64: one block's sums, [rows][width]
    std::vector<char> last(tail_pairs < kPairs ? kPairs * kPairBytes : 0, 0);  // a short last step, zero-padded
    std::vector<uint16_t> widened(int8 ? static_cast<size_t>(kg) * kPanel * 2 : 0);
    // Sums of `rows` x `width` outputs from column col0 on: bias, one rounding to bf16, the valid columns stored.
    auto finish = [&](int64_t r0, int64_t rows, int64_t col0, int64_t width) {
      for (int64_t j = 0; j < width; j += 16) {
        const int64_t cols = std::clamp<int64_t>(n - col0 - j, 0, 16);
        if (cols == 0) break;
        const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1u);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + col0 + j) : _mm512_setzero_ps();
        const __m512 s = scale ? _mm512_maskz_loadu_ps(mask, scale + col0 + j) : _mm512_setzero_ps();
        for (int64_t r = 0; r < rows; r++) {
          __m512 v = _mm512_loadu_ps(c + r * width + j);
          if (scale) v = _mm512_mul_ps(v, s);
          if (bias) v = _mm512_add_ps(v, b);
          _mm256_mask_storeu_epi16(o + (r0 + r) * n + col0 + j, mask, (__m256i)_mm512_cvtneps_pbh(v));
        }
      }
    };
    for (int64_t t = t0; t < t1; t++) {
      const int64_t p = t % np, g0 = t / np * group_rows, g1 = std::min(m, g0 + group_rows);
      const char* panel = ws + p * panel_bytes;
      if (int8) {
        idefics::widen_int8(reinterpret_cast<const int8_t*>(panel), kg, widened.data());
        panel = reinterpret_cast<const char*>(widened.data());
      }
      if (!last.empty()) std::memcpy(last.data(), panel + (steps - 1) * kPairs * kPairBytes, tail_pairs * kPairBytes);
      const char* tail = last.empty() ? nullptr : last.data();
      if (short_rows) {
        short_panel(xs, kp, panel, steps, tail, c);
        finish(0, m, p * kPanel, kPanel);
        continue;
      }
      const int halves = p * kPanel + 32 < n ? 2 : 1;
      const int passes = static_cast<int>((g1 - g0 + kRowBlock - 1) / kRowBlock) * halves;
      // the next task's panel, spread over this task's passes
      const char* next = t + 1 < t1 ? ws + (t + 1) % np * panel_bytes : nullptr;
      const int64_t share = ((panel_bytes + passes - 1) / passes + steps - 1) / steps;
      int pass = 0;
      for (int64_t r0 = g0; r0 < g1; r0 += kRowBlock) {
        for (int half = 0; half < halves; half++, pass++) {
          const char* fetch = next != nullptr ? next + pass * steps * share : nullptr;
          int64_t ahead = (share + 63) / 64 * 64;
          if (t == t0 && pass == 0) {  // nothing fetched this panel: run ahead of this first pass
            fetch = ws + p * panel_bytes + kFetchAhead;
            ahead = kPairs * kPairBytes / (int8 ? 2 : 1);
          }
          if (g1 - r0 > 16) {
            half_panel<true>(rows_at(r0), rows_at(r0 + 16), kp, panel, steps, tail, half, fetch, ahead, c);
          } else {
            half_panel<false>(rows_at(r0), nullptr, kp, panel, steps, tail, half, fetch, ahead, c);
          }
          finish(r0, std::min(kRowBlock, g1 - r0), p * kPanel + half * 32, 32);
        }
      }
    }
    release();
  });
  return out;
}

}  // namespace idefics
