// AVX-512 decode kernels (1..8 tokens). The loader appends this file to cpu_avx2.cpp (one translation
// unit: it uses that file's Weights, Activations and helpers) and matmul() there calls decode_avx512()
// first. The code below is compiled for AVX-512 F/BW/VL by a target pragma while the rest of the unit
// stays AVX2, and decode_avx512() runs it only when the CPU reports those extensions, so the library
// still loads and runs on AVX2-only CPUs. set_isa("avx2") sends every call to the AVX2 kernels (tests
// compare both paths; benchmarks time both).
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
//   each code c, the reference's own arithmetic, so no zero-point correction is needed. Groups of 64
//   columns cover half a super-chunk: the two halves' tables are looked up together by vpermt2ps on
//   32 entries, the index's bit 4 set in the upper eight lanes.
// Each 16 weights thus cost a shift, a lookup and one fp32 FMA per token; R rows share each load of x.
// Reads never pass the end of `qweight` (masked loads at its end).

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

enum class Kernel16 { kLut, kUniform, kUniformHalves };

}  // namespace

#if SQLLM_AVX512
// Only the functions defined up to pop_options may use AVX-512; decode_avx512 (after it) checks the CPU
// before it calls them.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
namespace {

// Super-chunk `sc` of a row as 16 lanes, lane l holding codes [8l, 8l+8) in its low 8*B bits.
template <int B>
inline __m512i planar16_lanes(const uint8_t* row, int64_t avail, int64_t sc) {
  const int64_t at = sc * 16 * B, left = avail - at;
  const uint8_t* p = row + at;
  constexpr int64_t len = 16 * B;
  // Whole loads except at the end of the buffer, where a mask keeps the load inside it.
  const __mmask64 mask = left >= len ? ~__mmask64{0} : (left <= 0 ? 0 : (__mmask64{1} << left) - 1);
  if constexpr (B == 1) {
    return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>(mask), p));
  } else if constexpr (B == 2) {
    return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi8(static_cast<__mmask32>(mask), p));
  } else if constexpr (B == 3) {
    // 48 bytes; 128-bit lane q takes dwords 3q..3q+3 (bytes 12q..12q+15), then lane l bytes 3l..3l+2.
    const __m512i v = _mm512_maskz_loadu_epi8(mask & ((__mmask64{1} << 48) - 1), p);
    const __m512i d = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12), v);
    const __m512i ctl = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1));
    return _mm512_shuffle_epi8(d, ctl);
  } else {
    return _mm512_maskz_loadu_epi8(mask, p);
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

// The table of a uniform group of scale s and zero point z: entry i = s * ((i mod 2**B) - z). With
// `split`, entries 8..15 belong to a second group (s2, z2) instead (B <= 3: both fit one table).
template <int B>
inline __m512 group_table16(float s, float z, __mmask16 split = 0, float s2 = 0.f, float z2 = 0.f) {
  const __m512 sv = _mm512_mask_mov_ps(_mm512_set1_ps(s), split, _mm512_set1_ps(s2));
  const __m512 zv = _mm512_mask_mov_ps(_mm512_set1_ps(z), split, _mm512_set1_ps(z2));
  return _mm512_mul_ps(sv, _mm512_sub_ps(_mm512_cvtepi32_ps(codes16<B>()), zv));
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

template <int M, int R>
struct Acc16 {
  __m512 v[R][M];
  Acc16() {
    for (int i = 0; i < R; ++i)
      for (int t = 0; t < M; ++t) v[i][t] = _mm512_setzero_ps();
  }
  void store(float* y, int64_t out, int64_t r) const {
    for (int i = 0; i < R; ++i)
      for (int t = 0; t < M; ++t) y[t * out + r + i] = _mm512_reduce_add_ps(v[i][t]);
  }
};

// Super-chunk `sc` of rows [r, r + R) against M tokens, into acc; `lookup(i, idx)` turns row i's lanes,
// shifted so that the current 16 columns' codes sit in the low bits, into 16 fp32 weights.
template <int B, int M, int R, class Lookup>
__attribute__((always_inline)) inline void sweep16(const Weights& w, const Activations& a, int64_t r, int64_t sc,
                                                   Acc16<M, R>& acc, Lookup lookup) {
  __m512i lanes[R];
  for (int i = 0; i < R; ++i) lanes[i] = planar16_lanes<B>(w.row(r + i), w.avail(r + i), sc);
  const float* xs = a.x + sc * kSuper16;
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) {
    __m512 xv[M];
    for (int t = 0; t < M; ++t) xv[t] = _mm512_loadu_ps(xs + t * a.stride + 16 * k);
    for (int i = 0; i < R; ++i) {
      const __m512 wv = lookup(i, _mm512_srli_epi32(lanes[i], k * B));
      for (int t = 0; t < M; ++t) acc.v[i][t] = _mm512_fmadd_ps(wv, xv[t], acc.v[i][t]);
    }
  }
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

// Uniform rows [r, r + R), B-bit codes, groups a multiple of 64 columns: each half super-chunk lies in
// one group. The lookup index is the code with a bit set in the upper eight lanes, which picks the
// second group's entries: bit 3 of one 16-entry table for B <= 3, bit 4 of two tables (vpermt2ps) for
// B = 4.
template <int B, int M, int R>
void uniform_half_block16(const Weights& w, const Activations& a, float* scratch, float* y, int64_t r) {
  const int64_t n_sc = (w.n + kSuper16 - 1) / kSuper16, last = w.segments() - 1;
  constexpr int kHalf = B <= 3 ? 8 : 16;
  const __m512i code_bits = _mm512_set1_epi32(kHalf - 1);
  const __m512i upper = _mm512_mask_set1_epi32(_mm512_setzero_si512(), 0xFF00, kHalf);
  const GroupParams<R> params(w, r, scratch);
  Acc16<M, R> acc;
  for (int64_t sc = 0; sc < n_sc; ++sc) {
    // A half past the last column (the upper half of a row's last super-chunk) meets zero x.
    const int64_t g0 = 2 * sc * 64 / w.group_size, g1 = std::min(last, (2 * sc + 1) * 64 / w.group_size);
    __m512 lo[R], hi[R];
    for (int i = 0; i < R; ++i) {
      const float s0 = params.scale(w, i, g0), z0 = params.zero(w, i, g0);
      const float s1 = params.scale(w, i, g1), z1 = params.zero(w, i, g1);
      if constexpr (B <= 3) {
        lo[i] = group_table16<B>(s0, z0, 0xFF00, s1, z1);
      } else {
        lo[i] = group_table16<B>(s0, z0);
        hi[i] = group_table16<B>(s1, z1);
      }
    }
    sweep16<B>(w, a, r, sc, acc, [&](int i, __m512i idx) {
      // (idx & code_bits) | upper: ternary-logic function 0xEA is (A & B) | C.
      const __m512i at = _mm512_ternarylogic_epi32(idx, code_bits, upper, 0xEA);
      if constexpr (B <= 3) return _mm512_permutexvar_ps(at, lo[i]);
      else return _mm512_permutex2var_ps(lo[i], at, hi[i]);
    });
  }
  acc.store(y, w.out, r);
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
  const int64_t stride = (w.n + kSuper16 - 1) / kSuper16 * kSuper16;
  const auto xp = activations(x, w, stride, Order::kPlanar16, /*group_sums=*/false).first;
  decode16_call(kernel, w, Activations{xp.data_ptr<float>(), stride, nullptr}, x.size(0), y);
  return true;
#else
  (void)x, (void)w, (void)y;
  return false;
#endif
}

}  // namespace

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
