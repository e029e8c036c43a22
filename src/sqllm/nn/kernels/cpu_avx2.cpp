// CPU kernels for packed weights (x86-64 with AVX2, FMA and F16C): the CPU implementations of the
// torch.ops.sqllm ops (ops.py holds the contracts and the pure-torch reference).
//
// Packing (formats/bitpack.py): row r of `qweight` is a little-endian bit stream, code j in bits
// [j*b, (j+1)*b). Eight consecutive b-bit codes therefore fill exactly b bytes, whatever b is, and the
// kernels read codes eight at a time without ever re-packing them:
//
// * Planar reader (b <= 4, the hot path): a super-chunk of 64 codes is 8*b bytes; lane l of one AVX2
//   register takes the b bytes of codes [8l, 8l+8) (one zero-extending load or one byte shuffle), and
//   code 8l+k is then (lane >> k*b). `x` is permuted once per call to match: position 8k+l of a
//   super-chunk holds column 8l+k. Eight codes thus cost one shift and one lookup.
// * Chunk reader (any b, and groups that do not span whole super-chunks): eight codes from b bytes at
//   b*(j/8) with one byte shuffle and one variable shift; `x` stays in column order.
//
// Lookups: a code indexes an 8-float register with vpermps, which reads only an index's low 3 bits, so
// no mask is needed (1- and 2-bit tables are repeated to fill 8 entries). 4-bit codes look up two
// 8-entry halves and blend on bit 3, moved to the sign bit. The tables are the LUT row (LUT layers)
// or, for uniform groups, s * (i - z) for every code i (computed exactly as the reference
// dequantization does), rebuilt once per group of a row. Uniform codes of 5..8 bits are converted and
// dequantized arithmetically. Every kernel accumulates in fp32 with FMA.
//
// Decode (1..8 tokens) keeps R rows x M tokens of accumulators in registers so one load of x serves R
// rows; prefill dequantizes tiles of rows with the chunk reader and multiplies them with torch's BLAS.
// Rows are split over threads with at::parallel_for. Reads never pass the end of `qweight`: a chunk
// whose load would is first copied into a zeroed buffer. Code positions past `n` meet zero-padded x.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int kMaxTokens = 8;
constexpr int64_t kSuper = 64;  // codes per super-chunk of the planar reader
constexpr int64_t kChunk = 8;   // codes per chunk of the chunk reader

inline float half_to_float(const at::Half* p) { return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(p)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// `len` bytes at `p`, or those of them before `limit` followed by zeros (for reads at a buffer's end).
template <int len>
inline const uint8_t* safe_bytes(const uint8_t* p, int64_t avail, uint8_t* scratch) {
  if (avail >= len) return p;
  std::memset(scratch, 0, len);
  if (avail > 0) std::memcpy(scratch, p, avail);
  return scratch;
}

// ----------------------------------------------------------------------------------------------------
// Lookup tables: 8 or 16 fp32 entries in registers.

struct Table {
  __m256 lo, hi;  // entries 0..7, 8..15 (hi is used only by 4-bit codes)
};

// Entries i -> i mod 2**bits, so that an 8-entry register serves 1- and 2-bit codes without masking.
inline __m256i repeat_index(int bits) {
  const int m = bits >= 3 ? 7 : (1 << bits) - 1;
  return _mm256_setr_epi32(0 & m, 1 & m, 2 & m, 3 & m, 4 & m, 5 & m, 6 & m, 7 & m);
}

// LUT row `lut` (2**bits fp16 entries, bits <= 4) as a Table.
inline Table lut_table(const at::Half* lut, int bits, __m256i repeat) {
  const auto* p = reinterpret_cast<const uint8_t*>(lut);
  Table t;
  if (bits == 4) {
    t.lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    t.hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
    return t;
  }
  __m128i h;  // load exactly the row's 2**bits entries: the last row may end the buffer
  if (bits == 3) {
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else if (bits == 2) {
    h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  } else {
    int32_t v;
    std::memcpy(&v, p, 4);
    h = _mm_cvtsi32_si128(v);
  }
  t.lo = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(h), repeat);
  t.hi = t.lo;
  return t;
}

// s * (i - z) for the codes i of one uniform group (bits <= 4): exactly the reference's fp32 arithmetic.
inline Table uniform_table(float s, float z, __m256 codes_lo, __m256 codes_hi) {
  const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z);
  return {_mm256_mul_ps(sv, _mm256_sub_ps(codes_lo, zv)), _mm256_mul_ps(sv, _mm256_sub_ps(codes_hi, zv))};
}

// Look up the code in the low `B` bits of every lane of idx (bits above are ignored).
template <int B>
inline __m256 lookup(__m256i idx, const Table& t) {
  if constexpr (B == 4) {
    const __m256 sign = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 -> sign
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx), _mm256_permutevar8x32_ps(t.hi, idx), sign);
  } else {
    return _mm256_permutevar8x32_ps(t.lo, idx);
  }
}

// ----------------------------------------------------------------------------------------------------
// Readers.

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
// What every kernel reads: the codes, where each row's table comes from, and how columns form segments
// (the LUT row is one segment; each uniform group is one).

struct Weights {
  const uint8_t* q;
  int64_t row_bytes, out, n;
  int bits;
  // LUT layers
  const at::Half* lut = nullptr;
  // uniform parts: scales/zeros [out, n_groups_total], gid [groups of this part]
  const at::Half* scales = nullptr;
  const at::Half* zeros = nullptr;
  const int64_t* gid = nullptr;
  int64_t n_groups_total = 0, group_size = 0;

  const uint8_t* row(int64_t r) const { return q + r * row_bytes; }
  int64_t avail(int64_t r) const { return (out - r) * row_bytes; }  // readable bytes from row r's start
  int64_t segments() const { return lut != nullptr ? 1 : (n + group_size - 1) / group_size; }
  float scale(int64_t r, int64_t g) const { return half_to_float(scales + r * n_groups_total + gid[g]); }
  float zero(int64_t r, int64_t g) const { return half_to_float(zeros + r * n_groups_total + gid[g]); }
};

struct TableMaker {
  __m256i repeat;
  __m256 codes_lo, codes_hi;  // i mod 2**bits for entries 0..7, and 8..15

  explicit TableMaker(int bits) : repeat(repeat_index(bits)) {
    codes_lo = _mm256_cvtepi32_ps(repeat);
    codes_hi = _mm256_add_ps(codes_lo, _mm256_set1_ps(8.f));
  }

  Table operator()(const Weights& w, int64_t r, int64_t seg) const {
    if (w.lut != nullptr) return lut_table(w.lut + r * (int64_t{1} << w.bits), w.bits, repeat);
    return uniform_table(w.scale(r, seg), w.zero(r, seg), codes_lo, codes_hi);
  }
};

// Tokens of x, fp32, zero-padded to `stride` columns (planar or column order).
struct Activations {
  const float* x;
  int64_t stride;
};

// ----------------------------------------------------------------------------------------------------
// Decode, planar reader: rows [r, r + R), M tokens, segments of whole super-chunks.

template <int B, int M, int R>
inline void planar_block(const Weights& w, const Activations& a, const TableMaker& tables, int64_t seg_sc,
                         int64_t n_sc, float* y, int64_t r) {
  __m256 acc[R][M];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < M; ++t) acc[i][t] = _mm256_setzero_ps();
  const int64_t n_seg = w.segments();
  for (int64_t seg = 0; seg < n_seg; ++seg) {
    Table tab[R];
    for (int i = 0; i < R; ++i) tab[i] = tables(w, r + i, seg);
    const int64_t sc1 = std::min(n_sc, (seg + 1) * seg_sc);
    for (int64_t sc = seg * seg_sc; sc < sc1; ++sc) {
      __m256i lanes[R];
      for (int i = 0; i < R; ++i) lanes[i] = planar_lanes<B>(w.row(r + i), w.avail(r + i), sc);
      const float* xs = a.x + sc * kSuper;
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        __m256 xv[M];
        for (int t = 0; t < M; ++t) xv[t] = _mm256_loadu_ps(xs + t * a.stride + 8 * k);
        for (int i = 0; i < R; ++i) {
          const __m256 wv = lookup<B>(_mm256_srli_epi32(lanes[i], k * B), tab[i]);
          for (int t = 0; t < M; ++t) acc[i][t] = _mm256_fmadd_ps(wv, xv[t], acc[i][t]);
        }
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < M; ++t) y[t * w.out + r + i] = hsum(acc[i][t]);
}

template <int B, int M>
void planar_rows(const Weights& w, const Activations& a, float* y, int64_t r0, int64_t r1) {
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  const TableMaker tables(B);
  const int64_t n_sc = (w.n + kSuper - 1) / kSuper;
  const int64_t seg_sc = w.segments() == 1 ? n_sc : w.group_size / kSuper;
  int64_t r = r0;
  for (; r + R <= r1; r += R) planar_block<B, M, R>(w, a, tables, seg_sc, n_sc, y, r);
  for (; r < r1; ++r) planar_block<B, M, 1>(w, a, tables, seg_sc, n_sc, y, r);
}

// ----------------------------------------------------------------------------------------------------
// Decode, chunk reader: one row at a time, segments of whole chunks (groups a multiple of 8 columns).

template <int B>  // B in 1..4: table lookup; B == 0: arithmetic dequantization of uniform codes
inline __m256 chunk_weights(__m256i raw, const Table& t, __m256i mask, __m256 s, __m256 z) {
  if constexpr (B == 0) {
    return _mm256_mul_ps(s, _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(raw, mask)), z));
  } else {
    return lookup<B>(raw, t);
  }
}

template <int B>
struct SegmentWeights {  // what chunk_weights needs for one (row, segment)
  Table t;
  __m256 s, z;

  SegmentWeights(const Weights& w, const TableMaker& tables, int64_t r, int64_t seg) {
    if constexpr (B == 0) {
      s = _mm256_set1_ps(w.scale(r, seg));
      z = _mm256_set1_ps(w.zero(r, seg));
    } else {
      t = tables(w, r, seg);
    }
  }
};

template <int B, int M>
void chunk_rows(const Weights& w, const Activations& a, float* y, int64_t r0, int64_t r1) {
  const ChunkReader reader(w.bits);
  const TableMaker tables(B == 0 ? 4 : B);
  const __m256i mask = _mm256_set1_epi32((1 << w.bits) - 1);
  const int64_t n_ch = (w.n + kChunk - 1) / kChunk;
  const int64_t seg_ch = w.segments() == 1 ? n_ch : w.group_size / kChunk;
  const int64_t n_seg = w.segments();
  for (int64_t r = r0; r < r1; ++r) {
    __m256 acc[M];
    for (int t = 0; t < M; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t seg = 0; seg < n_seg; ++seg) {
      const SegmentWeights<B> sw(w, tables, r, seg);
      const int64_t c1 = std::min(n_ch, (seg + 1) * seg_ch);
      for (int64_t c = seg * seg_ch; c < c1; ++c) {
        const __m256 wv = chunk_weights<B>(reader.load(w.row(r), w.avail(r), c), sw.t, mask, sw.s, sw.z);
        for (int t = 0; t < M; ++t) acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a.x + t * a.stride + c * kChunk), acc[t]);
      }
    }
    for (int t = 0; t < M; ++t) y[t * w.out + r] = hsum(acc[t]);
  }
}

// Rows [r0, r1) dequantized into dst [r1 - r0, n_pad8] fp32, column order (prefill tiles).
template <int B>
void dequant_rows(const Weights& w, float* dst, int64_t stride, int64_t r0, int64_t r1) {
  const ChunkReader reader(w.bits);
  const TableMaker tables(B == 0 ? 4 : B);
  const __m256i mask = _mm256_set1_epi32((1 << w.bits) - 1);
  const int64_t n_ch = (w.n + kChunk - 1) / kChunk;
  const int64_t seg_ch = w.segments() == 1 ? n_ch : w.group_size / kChunk;
  const int64_t n_seg = w.segments();
  for (int64_t r = r0; r < r1; ++r) {
    float* out = dst + (r - r0) * stride;
    for (int64_t seg = 0; seg < n_seg; ++seg) {
      const SegmentWeights<B> sw(w, tables, r, seg);
      const int64_t c1 = std::min(n_ch, (seg + 1) * seg_ch);
      for (int64_t c = seg * seg_ch; c < c1; ++c)
        _mm256_storeu_ps(out + c * kChunk, chunk_weights<B>(reader.load(w.row(r), w.avail(r), c), sw.t, mask, sw.s, sw.z));
    }
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

// B = bits for table lookups (1..4), 0 for arithmetic uniform codes (5..8 bits).
template <typename F>
void with_lookup(int bits, bool lut, F&& f) {
  if (bits > 4) {
    TORCH_CHECK(!lut, "LUT kernels take 1..4-bit codes, got ", bits);
    f(std::integral_constant<int, 0>{});
    return;
  }
  switch (bits) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

int64_t row_grain(int64_t n) { return std::max<int64_t>(4, 32768 / std::max<int64_t>(n, 1)); }

// x [m, n] (any float dtype) -> fp32 [m, stride], zero-padded; planar order per 64 columns if asked.
torch::Tensor activations(const torch::Tensor& x, int64_t stride, bool planar) {
  const int64_t m = x.size(0), n = x.size(1);
  auto xf = x.to(torch::kFloat32).contiguous();
  auto xp = torch::zeros({m, stride}, xf.options());
  const float* src = xf.data_ptr<float>();
  float* dst = xp.data_ptr<float>();
  for (int64_t t = 0; t < m; ++t) {
    if (!planar) {
      std::memcpy(dst + t * stride, src + t * n, n * sizeof(float));
      continue;
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t base = j / kSuper * kSuper, l = (j % kSuper) / 8, k = j % 8;
      dst[t * stride + base + 8 * k + l] = src[t * n + j];
    }
  }
  return xp;
}

void check_inputs(const torch::Tensor& x, const torch::Tensor& q, int64_t bits, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == n && x.is_floating_point(), "x must be a float [m, ", n, "] tensor");
  TORCH_CHECK(q.dtype() == torch::kInt32 && q.dim() == 2 && q.is_contiguous(), "qweight must be contiguous int32 [out, words]");
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must lie in 1..8, got ", bits);
  TORCH_CHECK(q.size(1) == (n * bits + 31) / 32, "qweight holds ", q.size(1), " words; ", n, " codes of ", bits,
              " bits need ", (n * bits + 31) / 32);
}

// Decode or prefill for one packed tensor whose reading `w` describes: [m, out] fp32.
torch::Tensor matmul(const torch::Tensor& x, const Weights& w, bool planar) {
  const int64_t m = x.size(0), out = w.out;
  auto y = torch::empty({m, out}, x.options().dtype(torch::kFloat32));
  if (m == 0 || out == 0) return y;
  const bool lut = w.lut != nullptr;
  if (m <= kMaxTokens) {
    const int64_t stride = planar ? (w.n + kSuper - 1) / kSuper * kSuper : (w.n + kChunk - 1) / kChunk * kChunk;
    const auto xp = activations(x, stride, planar);
    const Activations a{xp.data_ptr<float>(), stride};
    float* y_p = y.data_ptr<float>();
    with_tokens(m, [&](auto tokens) {
      constexpr int M = decltype(tokens)::value;
      with_lookup(w.bits, lut, [&](auto lookup_bits) {
        constexpr int B = decltype(lookup_bits)::value;
        at::parallel_for(0, out, row_grain(w.n), [&](int64_t r0, int64_t r1) {
          if constexpr (B >= 1) {
            if (planar) {
              planar_rows<B, M>(w, a, y_p, r0, r1);
              return;
            }
          }
          chunk_rows<B, M>(w, a, y_p, r0, r1);
        });
      });
    });
    return y;
  }
  // Prefill: row tiles dequantized in fp32, multiplied by BLAS into y^T [out, m].
  const int64_t stride = (w.n + kChunk - 1) / kChunk * kChunk;
  const auto xt = x.to(torch::kFloat32).t();  // [n, m]
  auto yt = torch::empty({out, m}, y.options());
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 20) / stride);
  auto tile = torch::empty({std::min(rows, out), stride}, y.options());
  for (int64_t start = 0; start < out; start += rows) {
    const int64_t stop = std::min(out, start + rows);
    float* dst = tile.data_ptr<float>();
    with_lookup(w.bits, lut, [&](auto lookup_bits) {
      constexpr int B = decltype(lookup_bits)::value;
      at::parallel_for(start, stop, row_grain(w.n), [&](int64_t r0, int64_t r1) {
        dequant_rows<B>(w, dst + (r0 - start) * stride, stride, r0, r1);
      });
    });
    auto wt = tile.narrow(0, 0, stop - start).narrow(1, 0, w.n);
    auto dst_rows = yt.narrow(0, start, stop - start);
    at::mm_out(dst_rows, wt, xt);
  }
  return yt.t().contiguous();
}

}  // namespace

// torch.ops.sqllm.lut_mm on CPU: x [m, n], qweight [out, words(n, bits)] int32, lut [out, 2**bits] fp16.
torch::Tensor lut_mm(torch::Tensor x, torch::Tensor qweight, torch::Tensor lut, int64_t bits, int64_t n) {
  check_inputs(x, qweight, bits, n);
  TORCH_CHECK(bits <= 4, "LUT kernels take 1..4-bit codes, got ", bits);
  TORCH_CHECK(lut.dtype() == torch::kFloat16 && lut.is_contiguous() && lut.size(0) == qweight.size(0) &&
                  lut.size(1) == (1 << bits), "lut must be contiguous float16 [out, 2**bits]");
  Weights w{reinterpret_cast<const uint8_t*>(qweight.data_ptr<int32_t>()), qweight.size(1) * 4, qweight.size(0), n,
            static_cast<int>(bits)};
  w.lut = lut.data_ptr<at::Half>();
  return matmul(x, w, true);
}

// torch.ops.sqllm.uniform_mm on CPU: one part's columns x [m, n]; scales, zeros [out, n_groups_total] fp16;
// group_ids [ceil(n / group_size)] int64. Needs group_size % 8 == 0 or a single group (group_size >= n).
torch::Tensor uniform_mm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                         torch::Tensor group_ids, int64_t group_size, int64_t bits, int64_t n) {
  check_inputs(x, qweight, bits, n);
  TORCH_CHECK(group_size % kChunk == 0 || group_size >= n, "uniform kernels need a group size that is a multiple of ",
              kChunk, " or covers the row, got ", group_size, " for ", n, " columns");
  TORCH_CHECK(scales.dtype() == torch::kFloat16 && zeros.dtype() == torch::kFloat16 && scales.is_contiguous() &&
                  zeros.is_contiguous() && scales.sizes() == zeros.sizes() && scales.size(0) == qweight.size(0),
              "scales and zeros must be contiguous float16 [out, n_groups]");
  TORCH_CHECK(group_ids.dtype() == torch::kInt64 && group_ids.is_contiguous() &&
                  group_ids.size(0) == (n + group_size - 1) / group_size, "group_ids must be int64 [ceil(n / group_size)]");
  if (group_ids.numel()) {
    TORCH_CHECK(group_ids.min().item<int64_t>() >= 0 && group_ids.max().item<int64_t>() < scales.size(1),
                "group_ids must index the ", scales.size(1), " columns of scales");
  }
  Weights w{reinterpret_cast<const uint8_t*>(qweight.data_ptr<int32_t>()), qweight.size(1) * 4, qweight.size(0), n,
            static_cast<int>(bits)};
  w.scales = scales.data_ptr<at::Half>();
  w.zeros = zeros.data_ptr<at::Half>();
  w.gid = group_ids.data_ptr<int64_t>();
  w.n_groups_total = scales.size(1);
  w.group_size = std::min(group_size, n);  // one group covering the row: the same as group_size >= n
  const bool planar = bits <= 4 && (w.group_size == n || w.group_size % kSuper == 0);
  return matmul(x, w, planar);
}

// torch.ops.sqllm.csr_mm on CPU: CSR outliers [out, in] (crow int32 [out + 1], col int32 [nnz], val fp16/bf16/fp32)
// times x [m, in]: [m, out] fp32.
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

torch::Tensor csr_mm(torch::Tensor x, torch::Tensor crow, torch::Tensor col, torch::Tensor val) {
  TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), "x must be a float [m, in] tensor");
  TORCH_CHECK(crow.dtype() == torch::kInt32 && col.dtype() == torch::kInt32 && crow.is_contiguous() && col.is_contiguous() &&
                  val.is_contiguous() && col.numel() == val.numel(), "CSR tensors must be contiguous int32 crow, col and values");
  const int64_t m = x.size(0), out = crow.numel() - 1;
  const auto xt = x.to(torch::kFloat32).t().contiguous();  // [in, m]: one outlier reads m adjacent floats
  auto yt = torch::empty({out, m}, xt.options());
  const int32_t* crow_p = crow.data_ptr<int32_t>();
  const int32_t* col_p = col.data_ptr<int32_t>();
  auto run = [&](const auto* val_p) {
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

// Sum of a float32 tensor read once with AVX2 over the torch threads: a streaming read whose time gives
// the machine's read bandwidth (benchmarks compare the kernels' achieved bandwidth with it).
double stream_sum(torch::Tensor t) {
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous(), "stream_sum reads a contiguous float32 tensor");
  const float* p = t.data_ptr<float>();
  const int64_t blocks = t.numel() / 32;
  std::vector<double> partial(at::get_num_threads() * 16, 0.0);
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
