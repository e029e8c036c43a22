// CPU kernels for packed weights (AVX-512): matrix-vector products for decode and row dequantization
// for prefill, reading the packed codes directly.
//
// Packing (formats/bitpack.py): row r of `q` is a little-endian bit stream, code j in bits
// [j*b, (j+1)*b). Sixteen b-bit codes (b <= 4) therefore span 2*b whole bytes starting at byte
// 2*b*(j/16): one unaligned 64-bit load holds them, and two variable shifts of that load broadcast to
// eight 64-bit lanes put each code at the bottom of its own lane. A LUT row of at most 16 floats fits one
// register, so a lookup is one in-register permute; uniform codes are converted and offset by the
// group's zero, then scaled once per group.
//
// Every kernel accumulates in fp32 and works on rows [r0, r1) so at::parallel_for can split them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>

namespace {

constexpr int64_t kLanes = 16;
constexpr int kMaxTokens = 8;

struct CodeReader {
  __m512i shift_lo, shift_hi, mask;
  int bits;

  explicit CodeReader(int b) : bits(b) {
    shift_lo = _mm512_setr_epi64(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
    shift_hi = _mm512_add_epi64(shift_lo, _mm512_set1_epi64(8 * b));
    mask = _mm512_set1_epi32((1 << b) - 1);
  }

  // Codes [j, j + 16) of a row of `row_bytes` bytes as 16 int32 lanes (j a multiple of 16). Past the
  // row's end the bytes read as zero, never from the next row or beyond the buffer.
  inline __m512i load(const uint8_t* row, int64_t row_bytes, int64_t j) const {
    const int64_t at = j / 8 * bits;
    uint64_t u = 0;
    if (at + 8 <= row_bytes) {
      std::memcpy(&u, row + at, 8);
    } else if (at < row_bytes) {
      std::memcpy(&u, row + at, row_bytes - at);
    }
    const __m512i v = _mm512_set1_epi64(static_cast<long long>(u));
    const __m256i lo = _mm512_cvtepi64_epi32(_mm512_srlv_epi64(v, shift_lo));
    const __m256i hi = _mm512_cvtepi64_epi32(_mm512_srlv_epi64(v, shift_hi));
    return _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), mask);
  }
};

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1);
}

inline __m512 load_lut(const at::Half* lut, int entries) {
  const __mmask16 m = static_cast<__mmask16>((1u << entries) - 1);
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, lut));
}

inline float as_float(const at::Half* p) { return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(p)); }

template <typename V>
inline float sparse_dot(const int32_t* crow, const int32_t* col, const V* val, const float* x, int64_t r) {
  float s = 0.f;
  for (int32_t k = crow[r]; k < crow[r + 1]; ++k) s += static_cast<float>(val[k]) * x[col[k]];
  return s;
}

// y[t, r] = sum_j lut[r, code(r, j)] * x[t, j] (+ the row's sparse outliers) for M tokens.
template <int M, typename V>
void lut_gemv_rows(const float* x, int64_t n, const uint8_t* q, int64_t row_bytes, const at::Half* lut, int bits,
                   const int32_t* crow, const int32_t* col, const V* val, float* y, int64_t out, int64_t r0,
                   int64_t r1) {
  const CodeReader reader(bits);
  const int entries = 1 << bits;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = q + r * row_bytes;
    const __m512 table = load_lut(lut + r * entries, entries);
    __m512 acc[M];
    for (int t = 0; t < M; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += kLanes) {
      const __m512 w = _mm512_permutexvar_ps(reader.load(row, row_bytes, j), table);
      const __mmask16 m = tail_mask(n - j);
      for (int t = 0; t < M; ++t) acc[t] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + t * n + j), acc[t]);
    }
    for (int t = 0; t < M; ++t) {
      float s = _mm512_reduce_add_ps(acc[t]);
      if (crow != nullptr) s += sparse_dot(crow, col, val, x + t * n, r);
      y[t * out + r] = s;
    }
  }
}

// The 4-bit case of lut_gemv_rows, twice as fast: 16 bytes hold 32 codes, byte k holding code 2k in its
// low nibble and code 2k+1 in its high one. Widening the bytes to 16 lanes gives the even codes as the
// lanes' low nibbles (the permute reads only the low 4 bits of an index) and the odd codes after one
// shift; `xp` holds x with each 32-column chunk reordered to [even columns, odd columns] to match.
template <int M, typename V>
void lut4_gemv_rows(const float* x, const float* xp, int64_t n, int64_t n32, const uint8_t* q, int64_t row_bytes,
                    const at::Half* lut, const int32_t* crow, const int32_t* col, const V* val, float* y, int64_t out,
                    int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = q + r * row_bytes;
    const __m512 table = load_lut(lut + r * 16, 16);
    __m512 acc[M];
    for (int t = 0; t < M; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n32; j += 2 * kLanes) {
      const int64_t at = j / 2;
      __m128i bytes;
      if (at + 16 <= row_bytes) {
        bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + at));
      } else {  // the row's last chunk: codes past n read as zero and meet zero padding in xp
        alignas(16) uint8_t tail[16] = {0};
        std::memcpy(tail, row + at, row_bytes - at);
        bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
      }
      const __m512i wide = _mm512_cvtepu8_epi32(bytes);
      const __m512 even = _mm512_permutexvar_ps(wide, table);
      const __m512 odd = _mm512_permutexvar_ps(_mm512_srli_epi32(wide, 4), table);
      for (int t = 0; t < M; ++t) {
        acc[t] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xp + t * n32 + j), acc[t]);
        acc[t] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xp + t * n32 + j + kLanes), acc[t]);
      }
    }
    for (int t = 0; t < M; ++t) {
      float s = _mm512_reduce_add_ps(acc[t]);
      if (crow != nullptr) s += sparse_dot(crow, col, val, x + t * n, r);
      y[t * out + r] = s;
    }
  }
}

// x [m, n] -> [m, n32] with every chunk of 32 columns as [its 16 even columns, its 16 odd ones], zero-padded.
torch::Tensor even_odd_chunks(const torch::Tensor& x, int64_t n32) {
  const int64_t m = x.size(0), n = x.size(1);
  auto xp = torch::zeros({m, n32}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = xp.data_ptr<float>();
  for (int64_t t = 0; t < m; ++t) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t chunk = j / 32, k = j % 32;
      dst[t * n32 + chunk * 32 + (k % 2) * 16 + k / 2] = src[t * n + j];
    }
  }
  return xp;
}

// y[t, r] += sum over the part's groups g of scale[r, gid[g]] * sum_j (code - zero[r, gid[g]]) * x[t, j],
// for the part's columns: x holds them contiguously, group g being columns [g*G, (g+1)*G).
template <int M>
void uniform_gemv_rows(const float* x, int64_t n, const uint8_t* q, int64_t row_bytes, const at::Half* scales,
                       const at::Half* zeros, int64_t n_groups_total, const int64_t* gid, int64_t groups, int64_t G,
                       int bits, float* y, int64_t out, int64_t r0, int64_t r1) {
  const CodeReader reader(bits);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = q + r * row_bytes;
    __m512 total[M];
    for (int t = 0; t < M; ++t) total[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t at = r * n_groups_total + gid[g];
      const __m512 scale = _mm512_set1_ps(as_float(scales + at));
      const __m512 zero = _mm512_set1_ps(as_float(zeros + at));
      __m512 acc[M];
      for (int t = 0; t < M; ++t) acc[t] = _mm512_setzero_ps();
      const int64_t stop = std::min(n, (g + 1) * G);
      for (int64_t j = g * G; j < stop; j += kLanes) {
        const __m512 w = _mm512_sub_ps(_mm512_cvtepi32_ps(reader.load(row, row_bytes, j)), zero);
        const __mmask16 m = tail_mask(stop - j);
        for (int t = 0; t < M; ++t) acc[t] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + t * n + j), acc[t]);
      }
      for (int t = 0; t < M; ++t) total[t] = _mm512_fmadd_ps(acc[t], scale, total[t]);
    }
    for (int t = 0; t < M; ++t) y[t * out + r] += _mm512_reduce_add_ps(total[t]);
  }
}

template <typename F>
void dispatch_tokens(int64_t m, F&& f) {
  switch (m) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "the gemv kernels take 1..", kMaxTokens, " tokens, got ", m);
  }
}

void check_codes(const torch::Tensor& q, int64_t bits, int64_t n) {
  TORCH_CHECK(q.dtype() == torch::kInt32 && q.dim() == 2 && q.is_contiguous(), "codes must be contiguous int32 [out, words]");
  TORCH_CHECK(bits >= 1 && bits <= 4, "the kernels take 1..4-bit codes, got ", bits);
  TORCH_CHECK(q.size(1) == (n * bits + 31) / 32, "codes hold ", q.size(1), " words, ", n, " ", bits, "-bit codes need ",
              (n * bits + 31) / 32);
}

int64_t grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

}  // namespace

// x: [m, n] float32, q: [out, words] int32, lut: [out, 2**bits] float16; optional CSR outliers.
torch::Tensor lut_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor lut, int64_t bits,
                       c10::optional<torch::Tensor> crow, c10::optional<torch::Tensor> col,
                       c10::optional<torch::Tensor> val) {
  const int64_t m = x.size(0), n = x.size(1), out = q.size(0);
  check_codes(q, bits, n);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous float32 [m, n]");
  TORCH_CHECK(lut.dtype() == torch::kFloat16 && lut.is_contiguous() && lut.size(0) == out && lut.size(1) == (1 << bits),
              "lut must be contiguous float16 [out, 2**bits]");
  auto y = torch::empty({m, out}, x.options());
  const bool sparse = crow.has_value();
  const int32_t* crow_p = sparse ? crow->data_ptr<int32_t>() : nullptr;
  const int32_t* col_p = sparse ? col->data_ptr<int32_t>() : nullptr;
  const auto* q_p = reinterpret_cast<const uint8_t*>(q.data_ptr<int32_t>());
  const int64_t row_bytes = q.size(1) * 4;
  const int64_t n32 = (n + 31) / 32 * 32;
  const torch::Tensor xp = bits == 4 ? even_odd_chunks(x, n32) : x;
  auto run = [&](auto tokens, const auto* val_p) {
    constexpr int M = decltype(tokens)::value;
    at::parallel_for(0, out, grain(n), [&](int64_t r0, int64_t r1) {
      if (bits == 4) {
        lut4_gemv_rows<M>(x.data_ptr<float>(), xp.data_ptr<float>(), n, n32, q_p, row_bytes, lut.data_ptr<at::Half>(),
                          crow_p, col_p, val_p, y.data_ptr<float>(), out, r0, r1);
      } else {
        lut_gemv_rows<M>(x.data_ptr<float>(), n, q_p, row_bytes, lut.data_ptr<at::Half>(), static_cast<int>(bits), crow_p,
                         col_p, val_p, y.data_ptr<float>(), out, r0, r1);
      }
    });
  };
  dispatch_tokens(m, [&](auto tokens) {
    if (!sparse) {
      run(tokens, static_cast<const float*>(nullptr));
    } else if (val->dtype() == torch::kFloat16) {
      run(tokens, val->data_ptr<at::Half>());
    } else if (val->dtype() == torch::kBFloat16) {
      run(tokens, val->data_ptr<at::BFloat16>());
    } else {
      TORCH_CHECK(val->dtype() == torch::kFloat32, "outlier values must be float16, bfloat16 or float32");
      run(tokens, val->data_ptr<float>());
    }
  });
  return y;
}

// y: [m, out] float32, accumulated into. x: [m, n] the part's columns; gid: [groups] int64 global group
// of each of the part's groups; scales, zeros: [out, n_groups_total] float16.
void uniform_gemv_(torch::Tensor y, torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor zeros,
                   torch::Tensor gid, int64_t group_size, int64_t bits) {
  const int64_t m = x.size(0), n = x.size(1), out = q.size(0);
  check_codes(q, bits, n);
  TORCH_CHECK(group_size % kLanes == 0, "group size must be a multiple of 16, got ", group_size);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && y.dtype() == torch::kFloat32 && y.is_contiguous(),
              "x and y must be contiguous float32");
  TORCH_CHECK(scales.dtype() == torch::kFloat16 && zeros.dtype() == torch::kFloat16 && scales.is_contiguous() &&
                  zeros.is_contiguous(), "scales and zeros must be contiguous float16");
  TORCH_CHECK(gid.dtype() == torch::kInt64 && gid.size(0) == (n + group_size - 1) / group_size, "gid must be int64 [groups]");
  const auto* q_p = reinterpret_cast<const uint8_t*>(q.data_ptr<int32_t>());
  const int64_t row_bytes = q.size(1) * 4;
  dispatch_tokens(m, [&](auto tokens) {
    constexpr int M = decltype(tokens)::value;
    at::parallel_for(0, out, grain(n), [&](int64_t r0, int64_t r1) {
      uniform_gemv_rows<M>(x.data_ptr<float>(), n, q_p, row_bytes, scales.data_ptr<at::Half>(), zeros.data_ptr<at::Half>(),
                           scales.size(1), gid.data_ptr<int64_t>(), gid.size(0), group_size, static_cast<int>(bits),
                           y.data_ptr<float>(), out, r0, r1);
    });
  });
}

// Rows [r0, r1) of the dense LUT weight: [r1 - r0, n] float32.
torch::Tensor lut_dequant(torch::Tensor q, torch::Tensor lut, int64_t bits, int64_t n, int64_t r0, int64_t r1) {
  check_codes(q, bits, n);
  auto w = torch::empty({r1 - r0, n}, torch::dtype(torch::kFloat32));
  const auto* q_p = reinterpret_cast<const uint8_t*>(q.data_ptr<int32_t>());
  const int64_t row_bytes = q.size(1) * 4;
  const int entries = 1 << bits;
  at::parallel_for(r0, r1, grain(n), [&](int64_t a, int64_t b) {
    const CodeReader reader(static_cast<int>(bits));
    for (int64_t r = a; r < b; ++r) {
      const __m512 table = load_lut(lut.data_ptr<at::Half>() + r * entries, entries);
      float* dst = w.data_ptr<float>() + (r - r0) * n;
      for (int64_t j = 0; j < n; j += kLanes) {
        const __m512 v = _mm512_permutexvar_ps(reader.load(q_p + r * row_bytes, row_bytes, j), table);
        _mm512_mask_storeu_ps(dst + j, tail_mask(n - j), v);
      }
    }
  });
  return w;
}

// Rows [r0, r1) of one uniform part, its columns in order: [r1 - r0, n] float32, (code - zero) * scale.
torch::Tensor uniform_dequant(torch::Tensor q, torch::Tensor scales, torch::Tensor zeros, torch::Tensor gid,
                              int64_t group_size, int64_t bits, int64_t n, int64_t r0, int64_t r1) {
  check_codes(q, bits, n);
  TORCH_CHECK(group_size % kLanes == 0, "group size must be a multiple of 16, got ", group_size);
  auto w = torch::empty({r1 - r0, n}, torch::dtype(torch::kFloat32));
  const auto* q_p = reinterpret_cast<const uint8_t*>(q.data_ptr<int32_t>());
  const int64_t row_bytes = q.size(1) * 4, n_groups_total = scales.size(1);
  const int64_t* gid_p = gid.data_ptr<int64_t>();
  at::parallel_for(r0, r1, grain(n), [&](int64_t a, int64_t b) {
    const CodeReader reader(static_cast<int>(bits));
    for (int64_t r = a; r < b; ++r) {
      float* dst = w.data_ptr<float>() + (r - r0) * n;
      for (int64_t g = 0; g * group_size < n; ++g) {
        const int64_t at = r * n_groups_total + gid_p[g];
        const __m512 scale = _mm512_set1_ps(as_float(scales.data_ptr<at::Half>() + at));
        const __m512 zero = _mm512_set1_ps(as_float(zeros.data_ptr<at::Half>() + at));
        const int64_t stop = std::min(n, (g + 1) * group_size);
        for (int64_t j = g * group_size; j < stop; j += kLanes) {
          const __m512 c = _mm512_cvtepi32_ps(reader.load(q_p + r * row_bytes, row_bytes, j));
          _mm512_mask_storeu_ps(dst + j, tail_mask(stop - j), _mm512_mul_ps(_mm512_sub_ps(c, zero), scale));
        }
      }
    }
  });
  return w;
}
