// CPU kernels for packed weights (x86-64 with AVX2, FMA and F16C): the CPU implementations of the
// torch.ops.sqllm ops (ops.py holds the contracts and the pure-torch reference).
//
// Packing (formats/bitpack.py): row r of `qweight` is a little-endian bit stream, code j in bits
// [j*b, (j+1)*b). Eight consecutive b-bit codes therefore fill exactly b bytes, whatever b is, and the
// kernels read the codes in place, in one of three ways:
//
// * Planar (b <= 3 LUT, b <= 4 uniform): a super-chunk of 64 codes is 8*b bytes; lane l of one AVX2
//   register takes the b bytes of codes [8l, 8l+8) (one zero-extending load or one byte shuffle), and
//   code 8l+k is then (lane >> k*b). x is permuted once per call to match: position 8k+l of a
//   super-chunk holds column 8l+k.
// * Nibbles (4-bit LUT): 16 bytes hold 32 codes; the low nibbles are the even codes, the high nibbles
//   the odd ones. x is permuted to match: each 16 columns become [8 even, 8 odd].
// * Chunks (uniform codes of any width, groups that do not span whole super-chunks; prefill): eight
//   codes from the b bytes at b*(j/8), with one byte shuffle and one variable shift. x stays in order.
//
// LUT lookups happen in registers. Up to 3 bits: vpermps on the 8-entry fp32 table, which reads only
// an index's low 3 bits, so no mask is needed (1- and 2-bit tables are repeated to fill 8 entries).
// 4 bits: the fp16 table split into its low and high bytes, two vpshufb per 32 codes, interleaved back
// into fp16 and widened with vcvtph2ps; on CPUs that split 256-bit permutes (AMD Zen 1) this is twice
// as fast as two vpermps and a blend. Uniform codes are converted to float and multiplied by x; a
// group's zero point is applied once per group through the group's sum of x, and its scale once per
// group: y = sum_g s_g (sum_j c_j x_j - z_g sum_j x_j). Every kernel accumulates in fp32 with FMA.
//
// Decode (1..8 tokens) keeps R rows x M tokens of accumulators in registers so one load of x serves R
// rows; prefill dequantizes tiles of rows with the chunk reader and multiplies them with torch's BLAS
// (in fp32; bf16 x on CPUs with AVX-512 and native bf16 takes the bf16 prefill of cpu_avx512.cpp).
// Rows are split over threads with at::parallel_for. Reads never pass the end of `qweight`: a read that
// would is served from a zeroed copy of the bytes left. Code positions past `n` meet zero-padded x.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int kMaxTokens = 8;
constexpr int64_t kSuper = 64;  // codes per super-chunk of the planar reader
constexpr int64_t kNibbles = 32;  // codes per 16-byte block of the 4-bit reader
constexpr int64_t kChunk = 8;   // codes per chunk of the chunk reader

inline float half_to_float(const at::Half* p) { return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(p)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// `len` bytes at `p`, or the `avail` of them that exist followed by zeros (reads at a buffer's end).
template <int len>
inline const uint8_t* safe_bytes(const uint8_t* p, int64_t avail, uint8_t* scratch) {
  if (avail >= len) return p;
  std::memset(scratch, 0, len);
  if (avail > 0) std::memcpy(scratch, p, avail);
  return scratch;
}

// ----------------------------------------------------------------------------------------------------
// What every kernel reads: the codes, where each row's table or scales come from, and how the columns
// form segments (a LUT row is one segment; each uniform group is one).

struct Weights {
  const uint8_t* q;
  int64_t row_bytes, out, n;
  int bits;
  const at::Half* lut = nullptr;  // LUT layers: [out, 2**bits]
  const at::Half* scales = nullptr;  // uniform parts: [out, n_groups_total]
  const at::Half* zeros = nullptr;
  const int64_t* gid = nullptr;  // [segments]: the column of scales/zeros of each group of this part
  int64_t n_groups_total = 0, group_size = 0;

  const uint8_t* row(int64_t r) const { return q + r * row_bytes; }
  int64_t avail(int64_t r) const { return (out - r) * row_bytes; }  // readable bytes from row r's start
  int64_t segments() const { return lut != nullptr ? 1 : (n + group_size - 1) / group_size; }
  float scale(int64_t r, int64_t g) const { return half_to_float(scales + r * n_groups_total + gid[g]); }
  float zero(int64_t r, int64_t g) const { return half_to_float(zeros + r * n_groups_total + gid[g]); }
};

// Tokens of x in fp32, zero-padded to `stride` columns, in the order the kernel reads the codes; for
// uniform parts also each token's sum of x over each group (`gsum` [m, segments]).
struct Activations {
  const float* x;
  int64_t stride;
  const float* gsum;
};

// kPlanar16: the AVX-512 decoders' planar order (cpu_avx512.cpp), super-chunks of 128 codes in 16 lanes.
enum class Order { kColumns, kPlanar, kNibbles, kPlanar16 };

inline int64_t position(Order order, int64_t j) {
  if (order == Order::kPlanar) return j / kSuper * kSuper + 8 * (j % 8) + (j % kSuper) / 8;
  if (order == Order::kPlanar16) return j / 128 * 128 + 16 * (j % 8) + (j % 128) / 8;
  if (order == Order::kNibbles) return j / 16 * 16 + 8 * (j % 2) + (j % 16) / 2;
  return j;
}

// ----------------------------------------------------------------------------------------------------
// Planar reader: super-chunk `sc` of a row (8*B bytes) as 8 lanes, lane l holding codes [8l, 8l+8).

template <int B>
inline __m256i planar_lanes(const uint8_t* row, int64_t avail, int64_t sc) {
  alignas(32) uint8_t scratch[32];
  const int64_t at = sc * 8 * B;
  const uint8_t* p = safe_bytes<8 * B>(row + at, avail - at, scratch);
  if constexpr (B == 1) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (B == 2) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (B == 3) {
    // bytes [0, 16) in the low half, [8, 24) in the high half; lane l takes bytes 3l..3l+2.
    const __m256i v = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(p + 8), reinterpret_cast<const __m128i*>(p));
    const __m256i ctl = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                         4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1);
    return _mm256_shuffle_epi8(v, ctl);
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
}

// Chunk reader: codes [8c, 8c+8) of a row as 8 lanes, each code in its lane's low bits (garbage above).
struct ChunkReader {
  __m256i shuffle, shift;
  int bits;

  explicit ChunkReader(int b) : bits(b) {
    alignas(32) int8_t ctl[32];
    alignas(32) int32_t sh[8];
    for (int k = 0; k < 8; ++k) {
      const int first = k * b / 8;  // byte of the code's lowest bit; the code ends within first + 1
      const int at = (k < 4 ? 0 : 16) + 4 * (k % 4);
      ctl[at] = static_cast<int8_t>(first);
      ctl[at + 1] = static_cast<int8_t>(first + 1);
      ctl[at + 2] = ctl[at + 3] = -1;  // zero
      sh[k] = k * b % 8;
    }
    shuffle = _mm256_load_si256(reinterpret_cast<const __m256i*>(ctl));
    shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(sh));
  }

  inline __m256i load(const uint8_t* row, int64_t avail, int64_t c) const {
    alignas(16) uint8_t scratch[16];
    const int64_t at = c * bits;
    const uint8_t* p = safe_bytes<16>(row + at, avail - at, scratch);
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_srlv_epi32(_mm256_shuffle_epi8(v, shuffle), shift);
  }
};

// ----------------------------------------------------------------------------------------------------
// LUT tables.

// The 8-float table of a LUT row of 2**bits <= 8 fp16 entries, entry i holding lut[i mod 2**bits].
inline __m256 lut8_table(const at::Half* lut, int bits) {
  const auto* p = reinterpret_cast<const uint8_t*>(lut);
  __m128i h;  // load exactly the row's entries: the last row may end the buffer
  if (bits == 3) {
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else if (bits == 2) {
    h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  } else {
    int32_t v;
    std::memcpy(&v, p, 4);
    h = _mm_cvtsi32_si128(v);
  }
  const int m = (1 << bits) - 1;
  return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(h), _mm256_setr_epi32(0, 1 & m, 2 & m, 3 & m, 4 & m, 5 & m, 6 & m, 7 & m));
}

// A 16-entry fp16 LUT row as two byte tables (low bytes, high bytes), each in both 128-bit halves.
struct Lut16 {
  __m256i lo, hi;

  Lut16() = default;
  explicit Lut16(const at::Half* lut) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut));
    const __m256i ctl = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    // [lo e0..7, lo e8..15, hi e0..7, hi e8..15]
    const __m256i bytes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, ctl), 0xD8);
    lo = _mm256_permute2x128_si256(bytes, bytes, 0x00);
    hi = _mm256_permute2x128_si256(bytes, bytes, 0x11);
  }
};

// Eight LUT weights of 1..3-bit codes in the low bits of idx's lanes (bits above are ignored).
inline __m256 lookup8(__m256i idx, __m256 table) { return _mm256_permutevar8x32_ps(table, idx); }

// Eight LUT weights of 4-bit codes (prefill's chunk reader): two 8-entry halves, blended on bit 3.
inline __m256 lookup16(__m256i idx, __m256 lo, __m256 hi) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), sign);
}

// ----------------------------------------------------------------------------------------------------
// Decode kernels: rows [r, r + R) for M tokens; y[t * out + row].

namespace v256 {
#define SQLLM_VEC_WIDTH 256
#include "fma_sweep.h"
}  // namespace v256
using v256::Acc;

// Super-chunks [sc0, sc1) of planar codes of rows [r, r + R) against M tokens, into acc; `decode(i, lanes)`
// turns row i's code lanes, shifted so that the current 8 columns' codes sit in the low B bits, into
// 8 float weights (a table lookup for LUT rows, the integer code for uniform rows).
template <int B, int M, int R, class Decode>
__attribute__((always_inline)) inline void planar_sweep(const Weights& w, const Activations& a, int64_t r,
                                                        int64_t sc0, int64_t sc1, Acc<M, R>& acc, Decode decode) {
  for (int64_t sc = sc0; sc < sc1; ++sc) {
    __m256i lanes[R];
    for (int i = 0; i < R; ++i) lanes[i] = planar_lanes<B>(w.row(r + i), w.avail(r + i), sc);
    v256::fma_super_chunk<B>(lanes, a.x + sc * kSuper, a.stride, acc, decode);
  }
}

// LUT, 1..3-bit codes, planar reader.
template <int B, int M, int R>
inline void lut_planar_block(const Weights& w, const Activations& a, float* y, int64_t r) {
  const int64_t n_sc = (w.n + kSuper - 1) / kSuper;
  __m256 table[R];
  for (int i = 0; i < R; ++i) table[i] = lut8_table(w.lut + (r + i) * (1 << B), B);
  Acc<M, R> acc;
  planar_sweep<B>(w, a, r, 0, n_sc, acc, [&](int i, __m256i lanes) { return lookup8(lanes, table[i]); });
  acc.store(y, w.out, r);
}

// LUT, 4-bit codes, nibble reader.
template <int M, int R>
inline void lut4_block(const Weights& w, const Activations& a, float* y, int64_t r) {
  const int64_t n_blk = (w.n + kNibbles - 1) / kNibbles;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  Lut16 table[R];
  for (int i = 0; i < R; ++i) table[i] = Lut16(w.lut + (r + i) * 16);
  Acc<M, R> acc;
  for (int64_t blk = 0; blk < n_blk; ++blk) {
    const float* xs = a.x + blk * kNibbles;
    for (int i = 0; i < R; ++i) {
      alignas(16) uint8_t scratch[16];
      const int64_t at = blk * 16;
      const uint8_t* p = safe_bytes<16>(w.row(r + i) + at, w.avail(r + i) - at, scratch);
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      const __m256i codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), low4);  // [even | odd]
      const __m256i lo = _mm256_shuffle_epi8(table[i].lo, codes), hi = _mm256_shuffle_epi8(table[i].hi, codes);
      const __m256i h0 = _mm256_unpacklo_epi8(lo, hi), h1 = _mm256_unpackhi_epi8(lo, hi);
      // columns: h0 = [0, 2, .., 14 | 1, 3, .., 15], h1 = [16, 18, .., 30 | 17, .., 31]
      const __m256 w0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h0));
      const __m256 w1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h0, 1));
      const __m256 w2 = _mm256_cvtph_ps(_mm256_castsi256_si128(h1));
      const __m256 w3 = _mm256_cvtph_ps(_mm256_extracti128_si256(h1, 1));
      for (int t = 0; t < M; ++t) {
        const float* xt = xs + t * a.stride;
        __m256 s = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt), acc.v[i][t]);
        s = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt + 8), s);
        s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xt + 16), s);
        acc.v[i][t] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xt + 24), s);
      }
    }
  }
  acc.store(y, w.out, r);
}

// Uniform, 1..4-bit codes, planar reader; each group spans `seg_sc` super-chunks.
template <int B, int M, int R>
inline void uniform_planar_block(const Weights& w, const Activations& a, int64_t seg_sc, float* y, int64_t r) {
  const int64_t n_sc = (w.n + kSuper - 1) / kSuper, n_seg = w.segments();
  const __m256i mask = _mm256_set1_epi32((1 << B) - 1);
  Acc<M, R> total;
  float zsum[R][M] = {};
  for (int64_t seg = 0; seg < n_seg; ++seg) {
    Acc<M, R> acc;
    const int64_t sc1 = std::min(n_sc, (seg + 1) * seg_sc);
    planar_sweep<B>(w, a, r, seg * seg_sc, sc1, acc,
                    [&](int, __m256i lanes) { return _mm256_cvtepi32_ps(_mm256_and_si256(lanes, mask)); });
    for (int i = 0; i < R; ++i) {
      const float s = w.scale(r + i, seg), sz = s * w.zero(r + i, seg);
      for (int t = 0; t < M; ++t) {
        total.v[i][t] = _mm256_fmadd_ps(acc.v[i][t], _mm256_set1_ps(s), total.v[i][t]);
        zsum[i][t] += sz * a.gsum[t * n_seg + seg];
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < M; ++t) y[t * w.out + r + i] = hsum(total.v[i][t]) - zsum[i][t];
}

// Uniform, any width, chunk reader (groups a multiple of 8 columns): one row.
template <int M>
inline void uniform_chunk_row(const Weights& w, const Activations& a, const ChunkReader& reader, float* y, int64_t r) {
  const int64_t n_ch = (w.n + kChunk - 1) / kChunk, n_seg = w.segments();
  const int64_t seg_ch = n_seg == 1 ? n_ch : w.group_size / kChunk;
  const __m256i mask = _mm256_set1_epi32((1 << w.bits) - 1);
  Acc<M, 1> total;
  float zsum[M] = {};
  for (int64_t seg = 0; seg < n_seg; ++seg) {
    Acc<M, 1> acc;
    const int64_t c1 = std::min(n_ch, (seg + 1) * seg_ch);
    for (int64_t c = seg * seg_ch; c < c1; ++c) {
      const __m256 codes = _mm256_cvtepi32_ps(_mm256_and_si256(reader.load(w.row(r), w.avail(r), c), mask));
      for (int t = 0; t < M; ++t)
        acc.v[0][t] = _mm256_fmadd_ps(codes, _mm256_loadu_ps(a.x + t * a.stride + c * kChunk), acc.v[0][t]);
    }
    const float s = w.scale(r, seg), sz = s * w.zero(r, seg);
    for (int t = 0; t < M; ++t) {
      total.v[0][t] = _mm256_fmadd_ps(acc.v[0][t], _mm256_set1_ps(s), total.v[0][t]);
      zsum[t] += sz * a.gsum[t * n_seg + seg];
    }
  }
  for (int t = 0; t < M; ++t) y[t * w.out + r] = hsum(total.v[0][t]) - zsum[t];
}

// The kernel of one packed tensor, as decided once per call.
enum class Kernel { kLutPlanar, kLut4, kUniformPlanar, kUniformChunks };

// Rows [r0, r1): blocks of R rows, then the rest one by one.
template <int R, typename Block, typename One>
void row_blocks(int64_t r0, int64_t r1, Block&& block, One&& one) {
  int64_t r = r0;
  for (; r + R <= r1; r += R) block(r);
  for (; r < r1; ++r) one(r);
}

template <int M>
void decode_rows(Kernel kernel, const Weights& w, const Activations& a, float* y, int64_t r0, int64_t r1) {
  constexpr int R = M <= 1 ? 4 : (M <= 2 ? 2 : 1);  // R x M accumulators stay in registers
  switch (kernel) {
    case Kernel::kLutPlanar: {
      auto run = [&](auto bits) {
        constexpr int B = decltype(bits)::value;
        row_blocks<R>(r0, r1, [&](int64_t r) { lut_planar_block<B, M, R>(w, a, y, r); },
                         [&](int64_t r) { lut_planar_block<B, M, 1>(w, a, y, r); });
      };
      if (w.bits == 1) run(std::integral_constant<int, 1>{});
      else if (w.bits == 2) run(std::integral_constant<int, 2>{});
      else run(std::integral_constant<int, 3>{});
      break;
    }
    case Kernel::kLut4: {
      constexpr int R4 = M <= 1 ? 2 : 1;  // two byte tables per row
      row_blocks<R4>(r0, r1, [&](int64_t r) { lut4_block<M, R4>(w, a, y, r); },
                        [&](int64_t r) { lut4_block<M, 1>(w, a, y, r); });
      break;
    }
    case Kernel::kUniformPlanar: {
      const int64_t n_sc = (w.n + kSuper - 1) / kSuper;
      const int64_t seg_sc = w.segments() == 1 ? n_sc : w.group_size / kSuper;
      auto run = [&](auto bits) {
        constexpr int B = decltype(bits)::value;
        row_blocks<R>(r0, r1, [&](int64_t r) { uniform_planar_block<B, M, R>(w, a, seg_sc, y, r); },
                         [&](int64_t r) { uniform_planar_block<B, M, 1>(w, a, seg_sc, y, r); });
      };
      if (w.bits == 1) run(std::integral_constant<int, 1>{});
      else if (w.bits == 2) run(std::integral_constant<int, 2>{});
      else if (w.bits == 3) run(std::integral_constant<int, 3>{});
      else run(std::integral_constant<int, 4>{});
      break;
    }
    case Kernel::kUniformChunks: {
      const ChunkReader reader(w.bits);
      for (int64_t r = r0; r < r1; ++r) uniform_chunk_row<M>(w, a, reader, y, r);
      break;
    }
  }
}

// ----------------------------------------------------------------------------------------------------
// Prefill: rows [r0, r1) dequantized into dst [r1 - r0, stride] fp32, column order.

void dequant_rows(const Weights& w, float* dst, int64_t stride, int64_t r0, int64_t r1) {
  const ChunkReader reader(w.bits);
  const int64_t n_ch = (w.n + kChunk - 1) / kChunk, n_seg = w.segments();
  const int64_t seg_ch = n_seg == 1 ? n_ch : w.group_size / kChunk;
  const __m256i mask = _mm256_set1_epi32((1 << w.bits) - 1);
  for (int64_t r = r0; r < r1; ++r) {
    float* out = dst + (r - r0) * stride;
    if (w.lut != nullptr) {
      const at::Half* lut = w.lut + r * (int64_t{1} << w.bits);
      const __m256 lo = w.bits == 4 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut)))
                                    : lut8_table(lut, w.bits);
      const __m256 hi = w.bits == 4 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut + 8))) : lo;
      for (int64_t c = 0; c < n_ch; ++c) {
        const __m256i idx = reader.load(w.row(r), w.avail(r), c);
        _mm256_storeu_ps(out + c * kChunk, w.bits == 4 ? lookup16(idx, lo, hi) : lookup8(idx, lo));
      }
      continue;
    }
    for (int64_t seg = 0; seg < n_seg; ++seg) {  // s * (c - z), exactly the reference's arithmetic
      const __m256 s = _mm256_set1_ps(w.scale(r, seg)), z = _mm256_set1_ps(w.zero(r, seg));
      const int64_t c1 = std::min(n_ch, (seg + 1) * seg_ch);
      for (int64_t c = seg * seg_ch; c < c1; ++c) {
        const __m256 codes = _mm256_cvtepi32_ps(_mm256_and_si256(reader.load(w.row(r), w.avail(r), c), mask));
        _mm256_storeu_ps(out + c * kChunk, _mm256_mul_ps(s, _mm256_sub_ps(codes, z)));
      }
    }
  }
}

// Any layout the vector readers do not take (LUT codes wider than 4 bits, uniform groups that are not
// a multiple of 8 columns): one code at a time from the 16 bits that hold it.
void generic_rows(const Weights& w, float* dst, int64_t stride, int64_t r0, int64_t r1) {
  const uint32_t mask = (1u << w.bits) - 1;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w.row(r);
    float* out = dst + (r - r0) * stride;
    for (int64_t j = 0; j < w.n; ++j) {
      const int64_t bit = j * w.bits, byte = bit / 8;
      const uint32_t pair = row[byte] | (byte + 1 < w.row_bytes ? uint32_t{row[byte + 1]} << 8 : 0u);
      const uint32_t code = (pair >> (bit % 8)) & mask;
      if (w.lut != nullptr) {
        out[j] = half_to_float(w.lut + r * (int64_t{1} << w.bits) + code);
      } else {
        const int64_t g = j / w.group_size;
        out[j] = w.scale(r, g) * (static_cast<float>(code) - w.zero(r, g));
      }
    }
  }
}

// Whether the vector readers take `w` (otherwise generic_rows serves it, through the prefill path).
bool vector_layout(const Weights& w) {
  return w.lut != nullptr ? w.bits <= 4 : (w.group_size % kChunk == 0 || w.segments() == 1);
}

// Rows [r0, r1) of the weight, dequantized into dst [r1 - r0, stride] fp32.
void weight_rows(const Weights& w, float* dst, int64_t stride, int64_t r0, int64_t r1) {
  if (vector_layout(w)) {
    dequant_rows(w, dst, stride, r0, r1);
  } else {
    generic_rows(w, dst, stride, r0, r1);
  }
}

// ----------------------------------------------------------------------------------------------------
// Dispatch.

template <typename F>
void with_tokens(int64_t m, F&& f) {
  switch (m) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "decode kernels take 1..", kMaxTokens, " tokens, got ", m);
  }
}

int64_t row_grain(int64_t n) { return std::max<int64_t>(8, 32768 / std::max<int64_t>(n, 1)); }

// x [m, n] (any float dtype) in fp32 [m, stride], zero-padded, in `order`; plus [m, segments] group sums
// of x (column order) when `w` is uniform and `group_sums` is set.
std::pair<torch::Tensor, torch::Tensor> activations(const torch::Tensor& x, const Weights& w, int64_t stride,
                                                     Order order, bool group_sums = true) {
  const int64_t m = x.size(0), n = x.size(1);
  const auto xf = x.to(torch::kFloat32).contiguous();
  auto xp = torch::zeros({m, stride}, xf.options());
  const float* src = xf.data_ptr<float>();
  float* dst = xp.data_ptr<float>();
  for (int64_t t = 0; t < m; ++t) {
    if (order == Order::kColumns) {
      std::memcpy(dst + t * stride, src + t * n, n * sizeof(float));
    } else {
      for (int64_t j = 0; j < n; ++j) dst[t * stride + position(order, j)] = src[t * n + j];
    }
  }
  torch::Tensor gsum;
  if (w.lut == nullptr && group_sums) {
    const int64_t n_seg = w.segments();
    gsum = torch::zeros({m, n_seg}, xf.options());
    float* g = gsum.data_ptr<float>();
    for (int64_t t = 0; t < m; ++t)
      for (int64_t j = 0; j < n; ++j) g[t * n_seg + j / w.group_size] += src[t * n + j];
  }
  return {xp, gsum};
}

// The AVX-512 decoders (cpu_avx512.cpp, appended to this unit by the loader): y [m, out] for m <= 8
// tokens; false, with y untouched, when the CPU or the layout rules them out (or set_isa chose AVX2).
bool decode_avx512(const torch::Tensor& x, const Weights& w, float* y);

// The bf16 prefill (cpu_avx512.cpp): y [m, out] fp32 for bf16 x of enough tokens, through bf16 tiles
// of the weight and torch's bf16 matmul; undefined where the CPU, the dtype or set_isa rule it out.
torch::Tensor prefill_bf16(const torch::Tensor& x, const Weights& w);

// Decode or prefill for one packed tensor: [m, out] fp32.
torch::Tensor matmul(const torch::Tensor& x, const Weights& w) {
  const int64_t m = x.size(0), out = w.out;
  auto y = torch::empty({m, out}, x.options().dtype(torch::kFloat32));
  if (m == 0 || out == 0) return y;
  if (m <= kMaxTokens && decode_avx512(x, w, y.data_ptr<float>())) return y;
  if (m > kMaxTokens) {
    auto yb = prefill_bf16(x, w);
    if (yb.defined()) return yb;
  }
  const bool lut = w.lut != nullptr;
  if (m <= kMaxTokens && vector_layout(w)) {
    Kernel kernel;
    Order order;
    int64_t block;
    if (lut) {
      kernel = w.bits == 4 ? Kernel::kLut4 : Kernel::kLutPlanar;
      order = w.bits == 4 ? Order::kNibbles : Order::kPlanar;
      block = w.bits == 4 ? kNibbles : kSuper;
    } else if (w.bits <= 4 && (w.segments() == 1 || w.group_size % kSuper == 0)) {
      kernel = Kernel::kUniformPlanar, order = Order::kPlanar, block = kSuper;
    } else {
      kernel = Kernel::kUniformChunks, order = Order::kColumns, block = kChunk;
    }
    const int64_t stride = (w.n + block - 1) / block * block;
    const auto [xp, gsum] = activations(x, w, stride, order);
    const Activations a{xp.data_ptr<float>(), stride, gsum.defined() ? gsum.data_ptr<float>() : nullptr};
    float* y_p = y.data_ptr<float>();
    with_tokens(m, [&](auto tokens) {
      constexpr int M = decltype(tokens)::value;
      at::parallel_for(0, out, row_grain(w.n), [&](int64_t r0, int64_t r1) { decode_rows<M>(kernel, w, a, y_p, r0, r1); });
    });
    return y;
  }
  // Prefill (and layouts without a decode kernel): row tiles dequantized in fp32, multiplied by BLAS into
  // y^T [out, m].
  const int64_t stride = (w.n + kChunk - 1) / kChunk * kChunk;
  const auto xt = x.to(torch::kFloat32).t();  // [n, m]
  auto yt = torch::empty({out, m}, y.options());
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 20) / stride);
  auto tile = torch::empty({std::min(rows, out), stride}, y.options());
  for (int64_t start = 0; start < out; start += rows) {
    const int64_t stop = std::min(out, start + rows);
    float* dst = tile.data_ptr<float>();
    at::parallel_for(start, stop, row_grain(w.n), [&](int64_t r0, int64_t r1) {
      weight_rows(w, dst + (r0 - start) * stride, stride, r0, r1);
    });
    auto dst_rows = yt.narrow(0, start, stop - start);
    at::mm_out(dst_rows, tile.narrow(0, 0, stop - start).narrow(1, 0, w.n), xt);
  }
  return yt.t().contiguous();
}

// The whole weight [out, n] fp32 (backward: dL/dx = dL/dy @ W).
torch::Tensor dequantize(const Weights& w) {
  const int64_t stride = (w.n + kChunk - 1) / kChunk * kChunk;
  auto full = torch::empty({w.out, stride}, torch::dtype(torch::kFloat32));
  float* dst = full.data_ptr<float>();
  at::parallel_for(0, w.out, row_grain(w.n), [&](int64_t r0, int64_t r1) {
    weight_rows(w, dst + r0 * stride, stride, r0, r1);
  });
  return full.narrow(1, 0, w.n);
}

Weights codes_of(const torch::Tensor& qweight, int64_t bits, int64_t n) {
  return Weights{reinterpret_cast<const uint8_t*>(qweight.data_ptr<int32_t>()), qweight.size(1) * 4, qweight.size(0), n,
                 static_cast<int>(bits)};
}

// Rows [r0, r1) of the CSR outliers times xt [in, m] into yt [out, m].
template <typename V>
void csr_rows(const int32_t* crow, const int32_t* col, const V* val, const float* xt, int64_t m, float* yt,
              int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* dst = yt + r * m;
    std::fill(dst, dst + m, 0.f);
    for (int32_t k = crow[r]; k < crow[r + 1]; ++k) {
      const float v = static_cast<float>(val[k]);
      const float* src = xt + static_cast<int64_t>(col[k]) * m;
      for (int64_t t = 0; t < m; ++t) dst[t] += v * src[t];
    }
  }
}

// The same for M <= 8 tokens (decode), the M sums in registers: summing into yt, which xt may alias as
// far as the compiler knows, puts a store and a reload in the chain of every addition (3x slower).
template <int M, typename V>
void csr_rows_decode(const int32_t* crow, const int32_t* col, const V* val, const float* xt, float* yt, int64_t r0,
                     int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc[M] = {};
    for (int32_t k = crow[r]; k < crow[r + 1]; ++k) {
      const float v = static_cast<float>(val[k]);
      const float* src = xt + static_cast<int64_t>(col[k]) * M;
      for (int t = 0; t < M; ++t) acc[t] += v * src[t];
    }
    std::copy(acc, acc + M, yt + r * M);
  }
}

Weights lut_weights(const torch::Tensor& qweight, const torch::Tensor& lut, int64_t bits, int64_t n) {
  TORCH_CHECK(qweight.dtype() == torch::kInt32 && qweight.dim() == 2 && qweight.is_contiguous(),
              "qweight must be contiguous int32 [out, words]");
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must lie in 1..8, got ", bits);
  TORCH_CHECK(qweight.size(1) == (n * bits + 31) / 32, "qweight holds ", qweight.size(1), " words; ", n,
              " codes of ", bits, " bits need ", (n * bits + 31) / 32);
  TORCH_CHECK(lut.dtype() == torch::kFloat16 && lut.is_contiguous() && lut.dim() == 2 &&
                  lut.size(0) == qweight.size(0) && lut.size(1) == (1 << bits),
              "lut must be contiguous float16 [", qweight.size(0), ", ", 1 << bits, "]");
  Weights w = codes_of(qweight, bits, n);
  w.lut = lut.data_ptr<at::Half>();
  return w;
}

Weights uniform_weights(const torch::Tensor& qweight, const torch::Tensor& scales, const torch::Tensor& zeros,
                        const torch::Tensor& group_ids, int64_t group_size, int64_t bits, int64_t n) {
  TORCH_CHECK(qweight.dtype() == torch::kInt32 && qweight.dim() == 2 && qweight.is_contiguous(),
              "qweight must be contiguous int32 [out, words]");
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must lie in 1..8, got ", bits);
  TORCH_CHECK(qweight.size(1) == (n * bits + 31) / 32, "qweight holds ", qweight.size(1), " words; ", n,
              " codes of ", bits, " bits need ", (n * bits + 31) / 32);
  TORCH_CHECK(group_size > 0, "group_size must be positive, got ", group_size);
  TORCH_CHECK(scales.dtype() == torch::kFloat16 && zeros.dtype() == torch::kFloat16 && scales.is_contiguous() &&
                  zeros.is_contiguous() && scales.dim() == 2 && scales.sizes() == zeros.sizes() &&
                  scales.size(0) == qweight.size(0), "scales and zeros must be contiguous float16 [out, n_groups]");
  TORCH_CHECK(group_ids.dtype() == torch::kInt64 && group_ids.is_contiguous() && group_ids.dim() == 1 &&
                  group_ids.size(0) == (n + group_size - 1) / group_size,
              "group_ids must be int64 [", (n + group_size - 1) / group_size, "]");
  if (group_ids.numel()) {
    TORCH_CHECK(group_ids.min().item<int64_t>() >= 0 && group_ids.max().item<int64_t>() < scales.size(1),
                "group_ids must index the ", scales.size(1), " columns of scales");
  }
  Weights w = codes_of(qweight, bits, n);
  w.scales = scales.data_ptr<at::Half>();
  w.zeros = zeros.data_ptr<at::Half>();
  w.gid = group_ids.data_ptr<int64_t>();
  w.n_groups_total = scales.size(1);
  w.group_size = std::min(group_size, n);  // one group covering the row
  return w;
}

void check_x(const torch::Tensor& x, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == n && x.is_floating_point(), "x must be a float [m, ", n, "] tensor, got ",
              x.sizes());
}

void check_csr(const torch::Tensor& x, const torch::Tensor& crow, const torch::Tensor& col, const torch::Tensor& val) {
  TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), "x must be a float [m, in] tensor");
  TORCH_CHECK(crow.dtype() == torch::kInt32 && col.dtype() == torch::kInt32 && crow.is_contiguous() &&
                  col.is_contiguous() && val.is_contiguous() && crow.dim() == 1 && crow.numel() >= 1 &&
                  col.numel() == val.numel(), "CSR tensors must be contiguous int32 crow, col and values");
}

// The sqllm ops, called through the dispatcher below autograd (so a torch_path() override is honoured).
using LutOp = torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, c10::SymInt, c10::SymInt);
using UniformOp = torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                const torch::Tensor&, c10::SymInt, c10::SymInt, c10::SymInt);
using CsrOp = torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&);

const c10::TypedOperatorHandle<LutOp>& lut_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("sqllm::lut_mm", "").typed<LutOp>();
  return op;
}

const c10::TypedOperatorHandle<UniformOp>& uniform_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("sqllm::uniform_mm", "").typed<UniformOp>();
  return op;
}

const c10::TypedOperatorHandle<CsrOp>& csr_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("sqllm::csr_mm", "").typed<CsrOp>();
  return op;
}

torch::Tensor as_dtype(const torch::Tensor& t, int64_t dtype) { return t.to(static_cast<at::ScalarType>(dtype)); }

// Gradients reach x only: dL/dx = dL/dy @ W, W dequantized by the same readers.
struct LutMM : public torch::autograd::Function<LutMM> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& q,
                               const torch::Tensor& lut, int64_t bits, int64_t n) {
    ctx->save_for_backward({q, lut});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["n"] = n;
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    at::AutoDispatchBelowADInplaceOrView guard;
    return lut_op().call(x, q, lut, c10::SymInt(bits), c10::SymInt(n));
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Weights w = lut_weights(saved[0], saved[1], ctx->saved_data["bits"].toInt(), ctx->saved_data["n"].toInt());
    const auto gx = as_dtype(grads[0].to(torch::kFloat32).mm(dequantize(w)), ctx->saved_data["dtype"].toInt());
    return {gx, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

struct UniformMM : public torch::autograd::Function<UniformMM> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& q,
                               const torch::Tensor& scales, const torch::Tensor& zeros, const torch::Tensor& group_ids,
                               int64_t group_size, int64_t bits, int64_t n) {
    ctx->save_for_backward({q, scales, zeros, group_ids});
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["n"] = n;
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    at::AutoDispatchBelowADInplaceOrView guard;
    return uniform_op()
        .call(x, q, scales, zeros, group_ids, c10::SymInt(group_size), c10::SymInt(bits), c10::SymInt(n));
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto s = ctx->get_saved_variables();
    const Weights w = uniform_weights(s[0], s[1], s[2], s[3], ctx->saved_data["group_size"].toInt(),
                                      ctx->saved_data["bits"].toInt(), ctx->saved_data["n"].toInt());
    const auto gx = as_dtype(grads[0].to(torch::kFloat32).mm(dequantize(w)), ctx->saved_data["dtype"].toInt());
    torch::autograd::tensor_list out(8);
    out[0] = gx;
    return out;
  }
};

struct CsrMM : public torch::autograd::Function<CsrMM> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& crow,
                               const torch::Tensor& col, const torch::Tensor& val) {
    ctx->save_for_backward({crow, col, val});
    ctx->saved_data["n"] = x.size(1);
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    at::AutoDispatchBelowADInplaceOrView guard;
    return csr_op().call(x, crow, col, val);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto counts = (s[0].narrow(0, 1, s[0].numel() - 1) - s[0].narrow(0, 0, s[0].numel() - 1)).to(torch::kLong);
    const auto rows = torch::repeat_interleave(torch::arange(counts.numel(), counts.options()), counts);
    const auto g = grads[0].to(torch::kFloat32);  // [m, out]
    const auto contrib = g.index_select(1, rows) * s[2].to(torch::kFloat32);  // [m, nnz]
    const auto gx = torch::zeros({g.size(0), ctx->saved_data["n"].toInt()}, g.options()).index_add_(1, s[1].to(torch::kLong), contrib);
    return {as_dtype(gx, ctx->saved_data["dtype"].toInt()), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

// Direct entry points (tests and benchmarks call the kernels without the dispatcher); the dispatcher
// registrations at the end call the same code.

// torch.ops.sqllm.lut_mm on CPU: x [m, n], qweight [out, words(n, bits)] int32, lut [out, 2**bits] fp16.
torch::Tensor lut_mm(torch::Tensor x, torch::Tensor qweight, torch::Tensor lut, int64_t bits, int64_t n) {
  check_x(x, n);
  return matmul(x, lut_weights(qweight, lut, bits, n));
}

// torch.ops.sqllm.uniform_mm on CPU: one part's columns x [m, n]; scales, zeros [out, n_groups_total] fp16;
// group_ids [ceil(n / group_size)] int64.
torch::Tensor uniform_mm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                         torch::Tensor group_ids, int64_t group_size, int64_t bits, int64_t n) {
  check_x(x, n);
  return matmul(x, uniform_weights(qweight, scales, zeros, group_ids, group_size, bits, n));
}

// torch.ops.sqllm.csr_mm on CPU: CSR outliers [out, in] (crow int32 [out + 1], col int32 [nnz], val
// fp16/bf16/fp32) times x [m, in]: [m, out] fp32.
torch::Tensor csr_mm(torch::Tensor x, torch::Tensor crow, torch::Tensor col, torch::Tensor val) {
  check_csr(x, crow, col, val);
  const int64_t m = x.size(0), out = crow.numel() - 1;
  const auto xt = x.to(torch::kFloat32).t().contiguous();  // [in, m]: one outlier reads m adjacent floats
  auto yt = torch::empty({out, m}, xt.options());
  const int32_t* crow_p = crow.data_ptr<int32_t>();
  const int32_t* col_p = col.data_ptr<int32_t>();
  auto run = [&](const auto* val_p) {
    if (m >= 1 && m <= kMaxTokens) {
      with_tokens(m, [&](auto tokens) {
        at::parallel_for(0, out, 256, [&](int64_t r0, int64_t r1) {
          constexpr int M = decltype(tokens)::value;
          csr_rows_decode<M>(crow_p, col_p, val_p, xt.data_ptr<float>(), yt.data_ptr<float>(), r0, r1);
        });
      });
      return;
    }
    at::parallel_for(0, out, 256, [&](int64_t r0, int64_t r1) {
      csr_rows(crow_p, col_p, val_p, xt.data_ptr<float>(), m, yt.data_ptr<float>(), r0, r1);
    });
  };
  if (val.dtype() == torch::kFloat16) {
    run(val.data_ptr<at::Half>());
  } else if (val.dtype() == torch::kBFloat16) {
    run(val.data_ptr<at::BFloat16>());
  } else {
    TORCH_CHECK(val.dtype() == torch::kFloat32, "outlier values must be float16, bfloat16 or float32");
    run(val.data_ptr<float>());
  }
  return yt.t().contiguous();
}

// 16-bit dense weights (the embeddings and head a packed checkpoint keeps in fp16/bf16) times x [m, n]
// for m <= 8 tokens: [m, out] fp32. Each weight is widened in registers (vcvtph2ps, or a 16-bit shift
// for bf16) and read once; the fp32 copy that torch's matmul would need never exists. Made per call, that
// copy took longer than the product itself: on SmolLM2's head (49152 x 576) 4.6 ms against 2.7 ms.
namespace {

template <typename W>
inline __m256 widen8(const W* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<W, at::Half>) {
    return _mm256_cvtph_ps(h);
  } else {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <typename W>
inline float widen1(const W* p) {
  return static_cast<float>(*p);
}

// Rows [r, r + R) against M tokens of x [M, n] (row stride n): y[t * out + r + i].
template <int M, int R, typename W>
void dense16_block(const W* w, const float* x, int64_t n, int64_t out, float* y, int64_t r) {
  Acc<M, R> acc;
  const int64_t n8 = n / 8 * 8;
  for (int64_t k = 0; k < n8; k += 8) {
    __m256 xv[M];
    for (int t = 0; t < M; ++t) xv[t] = _mm256_loadu_ps(x + t * n + k);
    for (int i = 0; i < R; ++i) {
      const __m256 wv = widen8(w + (r + i) * n + k);
      for (int t = 0; t < M; ++t) acc.v[i][t] = _mm256_fmadd_ps(wv, xv[t], acc.v[i][t]);
    }
  }
  acc.store(y, out, r);
  for (int64_t k = n8; k < n; ++k)
    for (int i = 0; i < R; ++i)
      for (int t = 0; t < M; ++t) y[t * out + r + i] += widen1(w + (r + i) * n + k) * x[t * n + k];
}

}  // namespace

// x [m, n] (any float dtype, m <= 8) @ w^T for a contiguous fp16 or bf16 w [out, n]: [m, out] fp32.
torch::Tensor dense16_mm(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && (w.dtype() == torch::kFloat16 || w.dtype() == torch::kBFloat16),
              "w must be a contiguous float16 or bfloat16 [out, n] tensor, got ", w.dtype(), " ", w.sizes());
  check_x(x, w.size(1));
  const int64_t m = x.size(0), out = w.size(0), n = w.size(1);
  TORCH_CHECK(m >= 1 && m <= kMaxTokens, "dense16_mm takes 1..", kMaxTokens, " tokens, got ", m);
  const auto xf = x.to(torch::kFloat32).contiguous();
  auto y = torch::empty({m, out}, xf.options());
  const float* x_p = xf.data_ptr<float>();
  float* y_p = y.data_ptr<float>();
  auto run = [&](const auto* w_p) {
    with_tokens(m, [&](auto tokens) {
      constexpr int M = decltype(tokens)::value;
      constexpr int R = M <= 1 ? 4 : (M <= 2 ? 2 : 1);
      at::parallel_for(0, out, row_grain(n), [&](int64_t r0, int64_t r1) {
        row_blocks<R>(r0, r1, [&](int64_t r) { dense16_block<M, R>(w_p, x_p, n, out, y_p, r); },
                      [&](int64_t r) { dense16_block<M, 1>(w_p, x_p, n, out, y_p, r); });
      });
    });
  };
  if (w.dtype() == torch::kFloat16) {
    run(w.data_ptr<at::Half>());
  } else {
    run(w.data_ptr<at::BFloat16>());
  }
  return y;
}

namespace {

bool wants_grad(const torch::Tensor& x) { return c10::GradMode::is_enabled() && x.requires_grad(); }

torch::Tensor lut_mm_autograd(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& lut, c10::SymInt bits,
                              c10::SymInt n) {
  if (wants_grad(x)) return LutMM::apply(x, q, lut, bits.expect_int(), n.expect_int());
  at::AutoDispatchBelowADInplaceOrView guard;
  return lut_op().call(x, q, lut, bits, n);
}

torch::Tensor uniform_mm_autograd(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                                  const torch::Tensor& zeros, const torch::Tensor& group_ids, c10::SymInt group_size,
                                  c10::SymInt bits, c10::SymInt n) {
  if (wants_grad(x)) {
    return UniformMM::apply(x, q, scales, zeros, group_ids, group_size.expect_int(), bits.expect_int(), n.expect_int());
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return uniform_op().call(x, q, scales, zeros, group_ids, group_size, bits, n);
}

torch::Tensor csr_mm_autograd(const torch::Tensor& x, const torch::Tensor& crow, const torch::Tensor& col,
                              const torch::Tensor& val) {
  if (wants_grad(x)) return CsrMM::apply(x, crow, col, val);
  at::AutoDispatchBelowADInplaceOrView guard;
  return csr_op().call(x, crow, col, val);
}

torch::Tensor lut_mm_cpu(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& lut, c10::SymInt bits,
                         c10::SymInt n) {
  return lut_mm(x, q, lut, bits.expect_int(), n.expect_int());
}

torch::Tensor uniform_mm_cpu(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                             const torch::Tensor& zeros, const torch::Tensor& group_ids, c10::SymInt group_size,
                             c10::SymInt bits, c10::SymInt n) {
  return uniform_mm(x, q, scales, zeros, group_ids, group_size.expect_int(), bits.expect_int(), n.expect_int());
}

torch::Tensor csr_mm_cpu(const torch::Tensor& x, const torch::Tensor& crow, const torch::Tensor& col,
                         const torch::Tensor& val) {
  return csr_mm(x, crow, col, val);
}

}  // namespace

// Loading this library makes these the ops' CPU implementations (the schemas come from ops.py). The
// C++ autograd entry keeps the Python-level cost of a call at that of a native op.
TORCH_LIBRARY_IMPL(sqllm, CPU, m) {
  m.impl("lut_mm", &lut_mm_cpu);
  m.impl("uniform_mm", &uniform_mm_cpu);
  m.impl("csr_mm", &csr_mm_cpu);
}

TORCH_LIBRARY_IMPL(sqllm, AutogradCPU, m) {
  m.impl("lut_mm", &lut_mm_autograd);
  m.impl("uniform_mm", &uniform_mm_autograd);
  m.impl("csr_mm", &csr_mm_autograd);
}

// Sum of a float32 tensor read once with AVX2 over the torch threads: a streaming read whose time gives
// the machine's read bandwidth (benchmarks compare the kernels' achieved bandwidth with it).
double stream_sum(torch::Tensor t) {
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous(), "stream_sum reads a contiguous float32 tensor");
  const float* p = t.data_ptr<float>();
  const int64_t blocks = t.numel() / 32;
  std::vector<double> partial(at::get_num_threads() * 16, 0.0);  // one cache line apart
  at::parallel_for(0, blocks, 4096, [&](int64_t b0, int64_t b1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t b = b0; b < b1; ++b) {
      const float* s = p + b * 32;
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(s));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(s + 8));
      a2 = _mm256_add_ps(a2, _mm256_loadu_ps(s + 16));
      a3 = _mm256_add_ps(a3, _mm256_loadu_ps(s + 24));
    }
    partial[at::get_thread_num() * 16] += hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  });
  double s = 0;
  for (double v : partial) s += v;
  for (int64_t i = blocks * 32; i < t.numel(); ++i) s += p[i];
  return s;
}
