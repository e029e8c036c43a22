// The register-blocked inner loop of the planar decode kernels, written once for any vector width.
//
// This file is included twice, without an include guard: once by cpu_avx2.cpp inside namespace
// `v256`, once by cpu_avx512.cpp inside namespace `v512` under its AVX-512 target pragma. GCC gives a
// function the target options in force where it is defined, and an always-inline function cannot
// inline intrinsics of a wider target than its own; so one template defined in either place could not
// serve both widths (the AVX-512 code would not compile, or the AVX2 code could emit EVEX instructions
// that AVX2-only CPUs lack). The includer defines SQLLM_VEC_WIDTH (256 or 512), which names the
// intrinsics below, and an overload `float hsum(F)` that sums a vector's lanes.

#define SQLLM_PASTE3(a, b, c) a##b##c
#define SQLLM_EXPAND3(a, b, c) SQLLM_PASTE3(a, b, c)
#define SQLLM_MM(op) SQLLM_EXPAND3(_mm, SQLLM_VEC_WIDTH, op)

// The width's float and int32 vectors and the few operations the loop needs.
struct Vec {
  using F = SQLLM_EXPAND3(__m, SQLLM_VEC_WIDTH, );
  using I = SQLLM_EXPAND3(__m, SQLLM_VEC_WIDTH, i);
  static constexpr int kLanes = SQLLM_VEC_WIDTH / 32;
  static F zero() { return SQLLM_MM(_setzero_ps)(); }
  static F load(const float* p) { return SQLLM_MM(_loadu_ps)(p); }
  static I srli(I v, int n) { return SQLLM_MM(_srli_epi32)(v, n); }
  static F fmadd(F a, F b, F c) { return SQLLM_MM(_fmadd_ps)(a, b, c); }
};

// R rows x M tokens of accumulators, kept in registers by the kernels' unrolled loops.
template <int M, int R>
struct Acc {
  typename Vec::F v[R][M];
  Acc() {
    for (int i = 0; i < R; ++i)
      for (int t = 0; t < M; ++t) v[i][t] = Vec::zero();
  }
  // y[t * out + r + i] = the lanes of row i, token t, summed.
  void store(float* y, int64_t out, int64_t r) const {
    for (int i = 0; i < R; ++i)
      for (int t = 0; t < M; ++t) y[t * out + r + i] = hsum(v[i][t]);
  }
};

// One super-chunk of 8 * kLanes planar codes of R rows against M tokens: `lanes[i]` holds row i's
// codes, lane l carrying codes [8l, 8l + 8) in its low 8 * B bits; `xs` is the super-chunk's x,
// permuted so that step k reads columns 8l + k at xs[kLanes * k + l] (token t at xs + t * stride).
// `decode(i, idx)` turns row i's lanes, shifted so that step k's codes sit in the low B bits, into
// kLanes fp32 weights (a table lookup, or the integer code itself).
template <int B, int M, int R, class Decode>
__attribute__((always_inline)) inline void fma_super_chunk(const typename Vec::I (&lanes)[R], const float* xs,
                                                           int64_t stride, Acc<M, R>& acc, Decode decode) {
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) {
    typename Vec::F xv[M];
    for (int t = 0; t < M; ++t) xv[t] = Vec::load(xs + t * stride + Vec::kLanes * k);
    for (int i = 0; i < R; ++i) {
      const typename Vec::F wv = decode(i, Vec::srli(lanes[i], k * B));
      for (int t = 0; t < M; ++t) acc.v[i][t] = Vec::fmadd(wv, xv[t], acc.v[i][t]);
    }
  }
}

#undef SQLLM_MM
#undef SQLLM_EXPAND3
#undef SQLLM_PASTE3
#undef SQLLM_VEC_WIDTH
