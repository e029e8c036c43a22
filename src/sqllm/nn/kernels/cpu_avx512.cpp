// AVX-512 decode kernels (1..8 tokens) and the bf16 prefill. The loader appends this file to
// cpu_avx2.cpp (one translation unit: it uses that file's Weights, Activations and helpers) and matmul()
// there calls decode_avx512() or prefill_bf16() first. The code below is compiled for AVX-512 F/BW/VL
// by a target pragma while the rest of the unit stays AVX2, and decode_avx512() and prefill_bf16() run
// it only when the CPU reports those extensions, so the library still loads and runs on AVX2-only CPUs.
// set_isa("avx2") sends every call to the AVX2 kernels (tests compare both paths; benchmarks time both).
//
// One reader and one lookup serve every layout taken here (LUT codes of 1..4 bits; uniform codes of
// 1..4 bits whose groups are a multiple of 64 columns or cover the row):
// * Planar reader, 16 lanes: a super-chunk of 128 codes is 16*B bytes; lane l of a zmm register takes
//   the B bytes of codes [8l, 8l+8), so code 8l+k is (lane >> k*B). x is permuted once per call to
//   match (Order::kPlanar16: position 16k+l of a super-chunk holds column 8l+k), so step k of a
//   super-chunk is one 64-byte load of x per token.
// * Lookup in a 16-entry fp32 table held in a register, by vpermps (which reads an index's low 4 bits,
//   so the bits of the next codes above need no mask): entry i is the weight of code (i mod 2**B).
//   A LUT row's table holds its fp16 entries widened. A uniform group's table holds s * (c - z) for
//   each code c, the reference's own arithmetic, so no zero-point correction is needed. Where groups of
//   64 columns split a super-chunk, the table holds the codes themselves and each half's scale and
//   zero point apply once per super-chunk (with the half's sum of x), as the AVX2 kernels do.
// Each 16 weights thus cost a shift, a lookup and one fp32 FMA per token; R rows share each load of x.
// On 1..3-bit LUT codes that is 1.2-1.3x the AVX2 kernels' speed per core (two 512-bit ports on Intel
// against three 256-bit ones), on 4-bit LUT and uniform codes about 2x.
// Reads never pass the end of `qweight` (masked loads at its end); software prefetches run ahead of them.
//
// Prefill of bf16 x (9+ tokens; a bf16 model's activations) where the CPU also multiplies bf16 natively
// (AVX-512 BF16 or AMX): the weight is dequantized a tile of rows at a time (2 MiB, about an L2) into
// bf16 by the same planar reader, two of its steps interleaved into 32 16-bit indices for one vpermw
// lookup in a bf16 table, and each tile multiplied by torch's bf16 matmul (oneDNN: fp32 accumulation,
// AMX where present), its bf16 output widened to the op's fp32. The weights are those of the fp32 path
// rounded to nearest bf16 (each table entry rounded once), so the result is the reference's up to bf16
// round-off (tests/test_prefill.py states the bound). fp32 and fp16 x keep the fp32 path (fp16 x would
// lose bits in bf16). On a 2-core AMD EPYC (AVX-512 BF16, no AMX) the matmul runs at F.linear's speed
// and the dequantization adds about 5% to it: 256-token prefill of one-part layers at 0.94-0.96x bf16
// F.linear per core, from 0.15-0.2x with fp32 tiles (benchmarks/results/kernels-prefill.md).

#include <atomic>
#include <string>

#if defined(__GNUC__) && !defined(__clang__)
#define SQLLM_AVX512 1
#else
#define SQLLM_AVX512 0  // the target pragma below is GCC's; other compilers keep the AVX2 kernels
#endif

namespace {

// Whether decode_avx512 may run: the CPU has AVX-512 F/BW/VL (and the OS saves zmm state, which
// __builtin_cpu_supports checks) and set_isa has not chosen AVX2.
bool cpu_has_avx512() {
#if SQLLM_AVX512
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
#else
  return false;
#endif
}

std::atomic<bool> avx512_chosen{true};

constexpr int64_t kSuper16 = 128;  // codes per super-chunk of the 16-lane planar reader
constexpr int64_t kBf16MinTokens = kMaxTokens + 1;  // bf16 x of this many tokens takes the bf16 prefill
// One bf16 tile of dequantized rows: 1 to 4 MiB ran fastest at 256 tokens on 4096-column rows (the whole
// weight at once ran 1.4x slower: every call faults in fresh pages and the tile leaves the caches).
constexpr int64_t kBf16TileBytes = int64_t{2} << 20;

enum class Kernel16 { kLut, kUniform, kUniformHalves };

}  // namespace

#if SQLLM_AVX512
// Only the functions defined up to pop_options may use AVX-512; decode_avx512 (after it) checks the CPU
// before it calls them.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
namespace {

// Bytes that the load of a super-chunk reads: its 16*B (B = 3: a whole register, 48 of them codes).
template <int B>
constexpr int64_t kLoad16 = B == 3 ? 64 : 16 * B;

// A super-chunk from its first byte p as 16 lanes, lane l holding codes [8l, 8l+8) in its low 8*B bits.
// kTail (the end of the buffer, where only `left` bytes exist): a masked load reads nothing past them.
template <int B, bool kTail = false>
inline __m512i planar16_lanes(const uint8_t* p, int64_t left = 0) {
  __m512i v;
  if constexpr (kTail) {
    v = _mm512_maskz_loadu_epi8(left >= 64 ? ~__mmask64{0} : (left <= 0 ? 0 : (__mmask64{1} << left) - 1), p);
  } else if constexpr (B == 1) {
    v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (B == 2) {
    v = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    v = _mm512_loadu_si512(p);
  }
  if constexpr (B == 1) {
    return _mm512_cvtepu8_epi32(_mm512_castsi512_si128(v));
  } else if constexpr (B == 2) {
    return _mm512_cvtepu16_epi32(_mm512_castsi512_si256(v));
  } else if constexpr (B == 3) {
    // 128-bit lane q takes dwords 3q..3q+3 (bytes 12q..12q+15), then lane l bytes 3l..3l+2.
    const __m512i d = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12), v);
    const __m512i ctl = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1));
    return _mm512_shuffle_epi8(d, ctl);
  } else {
    return v;
  }
}

// (i mod 2**B) for i = 0..15, as int32 lanes.
template <int B>
inline __m512i codes16() {
  return _mm512_and_si512(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                          _mm512_set1_epi32((1 << B) - 1));
}

// The table of a LUT row of 2**B fp16 entries: entry i = lut[i mod 2**B].
template <int B>
inline __m512 lut_table16(const at::Half* lut) {
  const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << (1 << B)) - 1), lut);
  return _mm512_permutexvar_ps(codes16<B>(), _mm512_cvtph_ps(h));
}

// The table of a uniform group of scale s and zero point z: entry i = s * ((i mod 2**B) - z).
template <int B>
inline __m512 group_table16(float s, float z) {
  return _mm512_mul_ps(_mm512_set1_ps(s), _mm512_sub_ps(_mm512_cvtepi32_ps(codes16<B>()), _mm512_set1_ps(z)));
}

// Scales and zero points of rows [r, r + R) in fp32, for every column of `scales`: a table then costs
// two broadcasts, where widening one fp16 value at a time for each group would cost more than the
// group's lookups (the groups of a mixed-width part are scattered over the columns, hence whole rows).
template <int R>
struct GroupParams {
  float* s;  // [R, n_groups_total]; z follows
  int64_t stride;

  GroupParams(const Weights& w, int64_t r, float* scratch) : s(scratch), stride(w.n_groups_total) {
    for (int i = 0; i < R; ++i) {
      widen(w.scales + (r + i) * stride, s + i * stride);
      widen(w.zeros + (r + i) * stride, s + (R + i) * stride);
    }
  }
  void widen(const at::Half* src, float* dst) const {
    for (int64_t g = 0; g < stride; g += 16) {
      const __mmask16 m = stride - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (stride - g)) - 1);
      _mm512_mask_storeu_ps(dst + g, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src + g)));
    }
  }
  float scale(const Weights& w, int i, int64_t g) const { return s[i * stride + w.gid[g]]; }
  float zero(const Weights& w, int i, int64_t g) const { return s[(R + i) * stride + w.gid[g]]; }
};

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

namespace v512 {
#define SQLLM_VEC_WIDTH 512
#include "fma_sweep.h"
}  // namespace v512
template <int M, int R>
using Acc16 = v512::Acc<M, R>;

// Super-chunk `sc` of rows [r, r + R) against M tokens, into acc; `lookup(i, idx)` turns row i's lanes,
// shifted so that the current 16 columns' codes sit in the low bits, into 16 fp32 weights.
template <int B, int M, int R, class Lookup>
__attribute__((always_inline)) inline void sweep16(const Weights& w, const Activations& a, int64_t r, int64_t sc,
                                                   Acc16<M, R>& acc, Lookup lookup) {
  __m512i lanes[R];
  const int64_t at = sc * 16 * B;
  if (w.avail(r + R - 1) >= at + kLoad16<B>) {  // the last row has the fewest bytes after it
    for (int i = 0; i < R; ++i) {
      // The same bytes two row blocks ahead, into L2: the hardware prefetchers follow R short interleaved
      // row streams poorly (cold 3-bit weights were read at half the streaming rate without).
      const int64_t ahead = std::min(r + 2 * R + i, w.out - 1);  // addresses inside the buffer
      _mm_prefetch(reinterpret_cast<const char*>(w.row(ahead) + at), _MM_HINT_T1);
      lanes[i] = planar16_lanes<B>(w.row(r + i) + at);
    }
  } else {
    for (int i = 0; i < R; ++i) lanes[i] = planar16_lanes<B, true>(w.row(r + i) + at, w.avail(r + i) - at);
  }
  v512::fma_super_chunk<B>(lanes, a.x + sc * kSuper16, a.stride, acc, lookup);
}

// LUT rows [r, r + R), B-bit codes.
template <int B, int M, int R>
void lut_block16(const Weights& w, const Activations& a, float* y, int64_t r) {
  const int64_t n_sc = (w.n + kSuper16 - 1) / kSuper16;
  __m512 table[R];
  for (int i = 0; i < R; ++i) table[i] = lut_table16<B>(w.lut + (r + i) * (1 << B));
  Acc16<M, R> acc;
  for (int64_t sc = 0; sc < n_sc; ++sc)
    sweep16<B>(w, a, r, sc, acc, [&](int i, __m512i idx) { return _mm512_permutexvar_ps(idx, table[i]); });
  acc.store(y, w.out, r);
}

// Uniform rows [r, r + R), B-bit codes, groups a multiple of 128 columns (or one group per row): one
// table per row and group.
template <int B, int M, int R>
void uniform_block16(const Weights& w, const Activations& a, float* scratch, float* y, int64_t r) {
  const int64_t n_sc = (w.n + kSuper16 - 1) / kSuper16, n_seg = w.segments();
  const int64_t seg_sc = n_seg == 1 ? n_sc : w.group_size / kSuper16;
  const GroupParams<R> params(w, r, scratch);
  Acc16<M, R> acc;
  for (int64_t seg = 0; seg < n_seg; ++seg) {
    __m512 table[R];
    for (int i = 0; i < R; ++i) table[i] = group_table16<B>(params.scale(w, i, seg), params.zero(w, i, seg));
    const int64_t sc1 = std::min(n_sc, (seg + 1) * seg_sc);
    for (int64_t sc = seg * seg_sc; sc < sc1; ++sc)
      sweep16<B>(w, a, r, sc, acc, [&](int i, __m512i idx) { return _mm512_permutexvar_ps(idx, table[i]); });
  }
  acc.store(y, w.out, r);
}

// Uniform rows [r, r + R), B-bit codes, groups a multiple of 64 columns, so that each half super-chunk
// lies in one group. Tables would differ between the halves (an index bit to set per lookup), so here
// the lookup gives the code itself and the groups enter per super-chunk, as
// y = sum_h s_h (sum_j c_j x_j - z_h X_h) over halves h, X_h their sums of x (`a.gsum`: [m, n_sc, 16],
// lanes 0 and 8 of each super-chunk, the others zero).
template <int B, int M, int R>
void uniform_half_block16(const Weights& w, const Activations& a, float* scratch, float* y, int64_t r) {
  const int64_t n_sc = (w.n + kSuper16 - 1) / kSuper16, last = w.segments() - 1;
  const __m512 codes = _mm512_cvtepi32_ps(codes16<B>());
  const GroupParams<R> params(w, r, scratch);
  Acc16<M, R> total;
  for (int64_t sc = 0; sc < n_sc; ++sc) {
    Acc16<M, R> acc;
    sweep16<B>(w, a, r, sc, acc, [&](int, __m512i idx) { return _mm512_permutexvar_ps(idx, codes); });
    // A half past the last column (the upper half of a row's last super-chunk) has zero sums.
    const int64_t g0 = 2 * sc * 64 / w.group_size, g1 = std::min(last, (2 * sc + 1) * 64 / w.group_size);
    for (int i = 0; i < R; ++i) {
      const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(params.scale(w, i, g0)), 0xFF00,
                                          _mm512_set1_ps(params.scale(w, i, g1)));
      const __m512 z = _mm512_mask_mov_ps(_mm512_set1_ps(params.zero(w, i, g0)), 0xFF00,
                                          _mm512_set1_ps(params.zero(w, i, g1)));
      const __m512 sz = _mm512_mul_ps(s, z);
      for (int t = 0; t < M; ++t) {
        const __m512 sums = _mm512_loadu_ps(a.gsum + (t * n_sc + sc) * 16);
        total.v[i][t] = _mm512_fnmadd_ps(sz, sums, _mm512_fmadd_ps(acc.v[i][t], s, total.v[i][t]));
      }
    }
  }
  total.store(y, w.out, r);
}

template <int M, int B>
void decode16_rows(Kernel16 kernel, const Weights& w, const Activations& a, float* y, int64_t r0, int64_t r1) {
  constexpr int R = M <= 1 ? 8 : (M <= 4 ? 4 : 2);  // R x M accumulators, R tables and R lanes in registers
  switch (kernel) {
    case Kernel16::kLut:
      row_blocks<R>(r0, r1, [&](int64_t r) { lut_block16<B, M, R>(w, a, y, r); },
                    [&](int64_t r) { lut_block16<B, M, 1>(w, a, y, r); });
      break;
    case Kernel16::kUniform:
    case Kernel16::kUniformHalves: {
      std::vector<float> scratch(2 * R * w.n_groups_total);  // GroupParams of R rows
      float* p = scratch.data();
      if (kernel == Kernel16::kUniform) {
        row_blocks<R>(r0, r1, [&](int64_t r) { uniform_block16<B, M, R>(w, a, p, y, r); },
                      [&](int64_t r) { uniform_block16<B, M, 1>(w, a, p, y, r); });
      } else {
        row_blocks<R>(r0, r1, [&](int64_t r) { uniform_half_block16<B, M, R>(w, a, p, y, r); },
                      [&](int64_t r) { uniform_half_block16<B, M, 1>(w, a, p, y, r); });
      }
      break;
    }
  }
}

template <int M>
void decode16(Kernel16 kernel, const Weights& w, const Activations& a, float* y, int64_t r0, int64_t r1) {
  switch (w.bits) {
    case 1: decode16_rows<M, 1>(kernel, w, a, y, r0, r1); break;
    case 2: decode16_rows<M, 2>(kernel, w, a, y, r0, r1); break;
    case 3: decode16_rows<M, 3>(kernel, w, a, y, r0, r1); break;
    default: decode16_rows<M, 4>(kernel, w, a, y, r0, r1); break;
  }
}

// y [m, out] for the m tokens of `a`, rows split over threads.
void decode16_call(Kernel16 kernel, const Weights& w, const Activations& a, int64_t m, float* y) {
  with_tokens(m, [&](auto tokens) {
    constexpr int M = decltype(tokens)::value;
    at::parallel_for(0, w.out, row_grain(w.n), [&](int64_t r0, int64_t r1) { decode16<M>(kernel, w, a, y, r0, r1); });
  });
}

// ----------------------------------------------------------------------------------------------------
// Prefill in bf16: rows of the weight dequantized into bf16 tiles for torch's bf16 matmul.

// The bf16 bits (rounded to nearest even, as torch rounds) of 16 finite or infinite fp32 values, in
// the low 16 bits of each 32-bit lane.
inline __m512i bf16_lanes(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
}

// The bf16 table of 16 fp32 entries (entry i for code i mod 2**B) as 32 16-bit lanes, entry i in lanes
// i and 16 + i: vpermw reads an index's low 5 bits, and bit 4 belongs to the next code.
inline __m512i bf16_table32(__m512 table16) {
  const __m256i h = _mm512_cvtepi32_epi16(bf16_lanes(table16));
  return _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
}

// x [m, n] bf16 in the column order of bf16_planar_rows' tiles: xp [m, n_sc * 128], zero past column n.
// In its super-chunk, the store of steps k and k + 1 (k even) holds column 8l + k in 16-bit lane 2l and
// 8l + k + 1 in lane 2l + 1: as dwords (column pairs), output dword 16(k/2) + l is input dword 4l + k/2,
// a 16 x 4 transpose (two two-register permutes and a blend per 16 dwords; a torch gather or strided
// copy took 4% of a 256-token prefill).
torch::Tensor pair16_activations(const torch::Tensor& x, int64_t n_sc) {
  const int64_t m = x.size(0), n = x.size(1), stride = n_sc * kSuper16;
  const auto xc = x.contiguous();
  auto xp = torch::empty({m, stride}, xc.options());
  const auto* src = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(xp.data_ptr<at::BFloat16>());
  __m512i idx[4];
  for (int kk = 0; kk < 4; ++kk) {
    alignas(64) int32_t v[16];
    for (int l = 0; l < 16; ++l) v[l] = (4 * l + kk) % 32;  // lanes 8..15 read the second register pair
    idx[kk] = _mm512_load_si512(v);
  }
  for (int64_t t = 0; t < m; ++t) {
    for (int64_t sc = 0; sc < n_sc; ++sc) {
      const uint16_t* in = src + t * n + sc * kSuper16;
      const int64_t valid = n - sc * kSuper16;
      __m512i r[4];
      for (int q = 0; q < 4; ++q) {
        const int64_t left = std::clamp<int64_t>(valid - 32 * q, 0, 32);
        const __mmask32 mask = left == 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << left) - 1);
        r[q] = _mm512_maskz_loadu_epi16(mask, in + 32 * q);
      }
      uint16_t* o = dst + t * stride + sc * kSuper16;
      for (int kk = 0; kk < 4; ++kk) {
        const __m512i lo = _mm512_permutex2var_epi32(r[0], idx[kk], r[1]);
        const __m512i hi = _mm512_permutex2var_epi32(r[2], idx[kk], r[3]);
        _mm512_storeu_si512(o + 32 * kk, _mm512_mask_blend_epi32(0xFF00, lo, hi));
      }
    }
  }
  return xp;
}

// Rows [r0, r1) of a B-bit weight the planar reader takes (LUT rows; uniform groups of a multiple of
// 64 columns or one per row), in bf16, into dst [r1 - r0, stride] in pair16_activations' order (stride =
// the super-chunks' columns). Two steps of the planar reader's lanes (codes 8l + k and 8l + k + 1)
// interleave into 32 16-bit indices, so 32 weights cost two shifts, a blend, one vpermw lookup in a bf16
// table held in a register, and one store. A uniform row takes one table per half super-chunk (64
// columns, inside one group; lanes 16..31), rebuilt only where the group changes.
template <int B>
void bf16_planar_rows(const Weights& w, uint16_t* dst, int64_t stride, int64_t r0, int64_t r1) {
  const int64_t n_sc = (w.n + kSuper16 - 1) / kSuper16, last = w.segments() - 1;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.row(r);
    const int64_t avail = w.avail(r);
    uint16_t* out = dst + (r - r0) * stride;
    auto sweep = [&](int64_t sc, __m512i t0, __m512i t1, auto halves) {
      const int64_t at = sc * 16 * B;
      const __m512i lanes = avail >= at + kLoad16<B> ? planar16_lanes<B>(row + at)
                                                     : planar16_lanes<B, true>(row + at, avail - at);
#pragma GCC unroll 4
      for (int k = 0; k < 8; k += 2) {
        const int up = (k + 1) * B;  // code 8l + k + 1 moves to bit 16 of lane l
        const __m512i hi = up <= 16 ? _mm512_slli_epi32(lanes, 16 - up) : _mm512_srli_epi32(lanes, up - 16);
        const __m512i idx = _mm512_mask_blend_epi16(0xAAAAAAAA, _mm512_srli_epi32(lanes, k * B), hi);
        __m512i v = _mm512_permutexvar_epi16(idx, t0);
        if constexpr (decltype(halves)::value) v = _mm512_mask_permutexvar_epi16(v, 0xFFFF0000, idx, t1);
        _mm512_storeu_si512(out + sc * kSuper16 + 16 * k, v);
      }
    };
    if (w.lut != nullptr) {
      const __m512i table = bf16_table32(lut_table16<B>(w.lut + r * (1 << B)));
      for (int64_t sc = 0; sc < n_sc; ++sc) sweep(sc, table, table, std::false_type{});
      continue;
    }
    int64_t g0 = -1, g1 = -1;
    __m512i t0 = _mm512_setzero_si512(), t1 = t0;
    for (int64_t sc = 0; sc < n_sc; ++sc) {
      // A half past the last column (the upper half of a row's last super-chunk) meets zero x.
      const int64_t h0 = sc * kSuper16 / w.group_size, h1 = std::min(last, (sc * kSuper16 + 64) / w.group_size);
      if (h0 != g0) t0 = bf16_table32(group_table16<B>(w.scale(r, h0), w.zero(r, h0))), g0 = h0;
      if (h1 != g1) t1 = bf16_table32(group_table16<B>(w.scale(r, h1), w.zero(r, h1))), g1 = h1;
      if (g0 == g1) {
        sweep(sc, t0, t0, std::false_type{});
      } else {
        sweep(sc, t0, t1, std::true_type{});
      }
    }
  }
}

// Rows [r0, r1) of any other layout in bf16, column order, into dst [r1 - r0, stride]: each row
// dequantized in fp32 by the AVX2 readers (weight_rows) into `row32` [stride], then rounded.
void bf16_column_rows(const Weights& w, uint16_t* dst, int64_t stride, int64_t r0, int64_t r1, float* row32) {
  for (int64_t r = r0; r < r1; ++r) {
    weight_rows(w, row32, stride, r, r + 1);
    uint16_t* out = dst + (r - r0) * stride;
    for (int64_t j = 0; j < w.n; j += 16) {
      const __mmask16 m = w.n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (w.n - j)) - 1);
      _mm256_mask_storeu_epi16(out + j, m, _mm512_cvtepi32_epi16(bf16_lanes(_mm512_maskz_loadu_ps(m, row32 + j))));
    }
  }
}

// Whether bf16_planar_rows takes `w`.
bool bf16_planar_layout(const Weights& w) {
  if (w.bits > 4) return false;
  return w.lut != nullptr || w.segments() == 1 || w.group_size % 64 == 0;
}

// x [m, n] bf16 times the weight, through bf16 tiles of `tile_rows` rows: y [m, out] fp32 (the bf16
// products, fp32-accumulated by torch's matmul, widened). The weight's columns keep the reader's order
// (x is permuted to match once), so no reader has to restore column order.
torch::Tensor prefill_bf16_call(const torch::Tensor& x, const Weights& w, int64_t tile_rows) {
  const int64_t m = x.size(0), out = w.out;
  const bool planar = bf16_planar_layout(w);
  const int64_t stride = planar ? (w.n + kSuper16 - 1) / kSuper16 * kSuper16 : (w.n + kChunk - 1) / kChunk * kChunk;
  const auto bf16 = x.options().dtype(torch::kBFloat16);
  // [m, stride] in the tile's column order, zero in the padding
  const torch::Tensor xp = planar ? pair16_activations(x, stride / kSuper16) : x.contiguous();
  const int64_t k = planar ? stride : w.n;  // the columns the matmul sums over
  auto y = torch::empty({m, out}, x.options().dtype(torch::kFloat32));
  const int64_t rows = std::max<int64_t>(1, std::min(tile_rows, out)), n_tiles = (out + rows - 1) / rows;
  // Each thread takes whole tiles, dequantizes one into its own buffer, multiplies it (torch's matmul
  // runs single-threaded inside the region) and widens the product into y's columns: the threads meet
  // once per call, as F.linear's do. With a
  // barrier per tile instead (dequantize in parallel, then a parallel matmul), a thread preempted on a
  // loaded machine stalled the other at every tile: 2 threads ran 6x slower than 1.
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView guard;  // as in the calling thread: no autograd for the matmuls
    auto tile = torch::empty({rows, stride}, bf16);
    auto yt = torch::empty({m, rows}, bf16);
    auto* tile_p = reinterpret_cast<uint16_t*>(tile.data_ptr<at::BFloat16>());
    std::vector<float> row32(planar ? 0 : stride);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t start = t * rows, stop = std::min(out, start + rows);
      if (!planar) {
        bf16_column_rows(w, tile_p, stride, start, stop, row32.data());
      } else {
        switch (w.bits) {
          case 1: bf16_planar_rows<1>(w, tile_p, stride, start, stop); break;
          case 2: bf16_planar_rows<2>(w, tile_p, stride, start, stop); break;
          case 3: bf16_planar_rows<3>(w, tile_p, stride, start, stop); break;
          default: bf16_planar_rows<4>(w, tile_p, stride, start, stop); break;
        }
      }
      // x tile^T: this orientation ran faster than tile x^T for every token count measured (at 9 tokens
      // over 2x).
      auto yt_cols = yt.narrow(1, 0, stop - start);
      at::mm_out(yt_cols, xp.narrow(1, 0, k), tile.narrow(0, 0, stop - start).narrow(1, 0, k).t());
      y.narrow(1, start, stop - start).copy_(yt_cols);
    }
  });
  return y;
}

}  // namespace
#pragma GCC pop_options
#endif  // SQLLM_AVX512

namespace {

bool decode_avx512(const torch::Tensor& x, const Weights& w, float* y) {
#if SQLLM_AVX512
  if (!avx512_chosen.load(std::memory_order_relaxed) || !cpu_has_avx512() || w.bits > 4) return false;
  Kernel16 kernel;
  if (w.lut != nullptr) {
    kernel = Kernel16::kLut;
  } else if (w.segments() == 1 || w.group_size % kSuper16 == 0) {
    kernel = Kernel16::kUniform;
  } else if (w.group_size % 64 == 0) {
    kernel = Kernel16::kUniformHalves;
  } else {
    return false;
  }
  const int64_t m = x.size(0), n_sc = (w.n + kSuper16 - 1) / kSuper16, stride = n_sc * kSuper16;
  const auto xp = activations(x, w, stride, Order::kPlanar16, /*group_sums=*/false).first;
  torch::Tensor halves;  // kUniformHalves: [m, n_sc, 16], lanes 0 and 8 the sums of x over each half
  if (kernel == Kernel16::kUniformHalves) {
    halves = torch::zeros({m, n_sc, 16}, xp.options());
    const float* src = xp.data_ptr<float>();
    float* dst = halves.data_ptr<float>();
    for (int64_t i = 0; i < m * stride; ++i) dst[i / kSuper16 * 16 + i % 16 / 8 * 8] += src[i];  // lane l = i % 16
  }
  const Activations a{xp.data_ptr<float>(), stride, halves.defined() ? halves.data_ptr<float>() : nullptr};
  decode16_call(kernel, w, a, m, y);
  return true;
#else
  (void)x, (void)w, (void)y;
  return false;
#endif
}

// Whether the CPU multiplies bf16 natively (AVX-512 BF16 or AMX), so that torch's bf16 matmul beats
// its fp32 one; elsewhere prefill keeps fp32.
bool cpu_has_bf16() {
#if SQLLM_AVX512
  static const bool has = __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
  return has;
#else
  return false;
#endif
}

std::atomic<int64_t> bf16_min_tokens{kBf16MinTokens};
std::atomic<int64_t> bf16_tile_bytes{kBf16TileBytes};

// Prefill of bf16 x [m, n] (m >= bf16_min_tokens) in bf16 where the CPU has AVX-512 and native bf16
// and set_isa has not chosen AVX2: y [m, out] fp32; undefined where those rule it out.
torch::Tensor prefill_bf16(const torch::Tensor& x, const Weights& w) {
#if SQLLM_AVX512
  if (x.scalar_type() != torch::kBFloat16 || x.size(0) < bf16_min_tokens.load() ||
      !avx512_chosen.load(std::memory_order_relaxed) || !cpu_has_avx512() || !cpu_has_bf16()) {
    return torch::Tensor();
  }
  // The rows that fill the tile's bytes, rounded up to a multiple of 64 (the matmul's blocks divide
  // them) where there are that many (smaller tiles only where tests ask for them).
  const int64_t row_bytes = 2 * ((w.n + kSuper16 - 1) / kSuper16 * kSuper16);
  const int64_t rows = std::max<int64_t>(1, bf16_tile_bytes.load() / row_bytes);
  return prefill_bf16_call(x, w, rows < 64 ? rows : (rows + 63) / 64 * 64);
#else
  (void)x, (void)w;
  return torch::Tensor();
#endif
}

}  // namespace

// The bf16 prefill's settings (tests and benchmarks tune them): the fewest tokens that take it and the
// bytes of one bf16 tile; a value <= 0 leaves a setting unchanged. Returns the previous settings.
std::vector<int64_t> set_prefill(int64_t min_tokens, int64_t tile_bytes) {
  std::vector<int64_t> previous{bf16_min_tokens.load(), bf16_tile_bytes.load()};
  if (min_tokens > 0) bf16_min_tokens.store(std::max<int64_t>(min_tokens, kMaxTokens + 1));
  if (tile_bytes > 0) bf16_tile_bytes.store(tile_bytes);
  return previous;
}

// Whether bf16 x of enough tokens takes the bf16 prefill here (AVX-512 chosen, native bf16).
bool prefill_in_bf16() { return avx512_chosen.load() && cpu_has_avx512() && cpu_has_bf16(); }

// The instruction set of the decode kernels: "avx512" where the CPU has AVX-512 F/BW/VL, else "avx2".
std::string isa() { return avx512_chosen.load() && cpu_has_avx512() ? "avx512" : "avx2"; }

// Chooses the decode kernels ("avx2", or "avx512" where the CPU has it) for every later call, in every
// thread; returns the previous choice. Tests and benchmarks use it to compare the two paths.
std::string set_isa(const std::string& name) {
  TORCH_CHECK(name == "avx2" || name == "avx512", "isa must be 'avx2' or 'avx512', got '", name, "'");
  TORCH_CHECK(name == "avx2" || cpu_has_avx512(), "this CPU (or compiler) has no AVX-512 F/BW/VL");
  const std::string previous = isa();
  avx512_chosen.store(name == "avx512");
  return previous;
}
