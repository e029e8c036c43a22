// Exact weighted 1-D k-means of every row of a matrix (see kmeans.py for the math and the contract).
//
// Per row: sort the values (LSD radix sort of order-preserving 32-bit keys carrying the column index),
// merge equal values and drop weightless ones (neither changes any cluster's cost), prefix sums of
// (w, w x, w x^2) in double, then the dynamic program
//     D_m(i) = min_{j < i} D_{m-1}(j) + C(j, i),   C(j, i) = weighted SSE of sorted values [j, i),
// layer by layer. C satisfies the quadrangle inequality, so the leftmost argmin opt_m(i) is
// non-decreasing in i and never left of opt_{m-1}(i) (Knuth). Low layers divide and conquer over i
// with both bounds; high layers, whose candidate ranges opt_{m-1}(i) .. opt_m(i + 1) are short, sweep i
// downwards; either way, ranges of a few places are scored for eight i at once. The last layer is
// needed at N only, the one below it only right of opt_{k-1}(N - 1). An upper bound on the optimum
// (a cheap partition's cost) prunes every layer from the right: D_m is non-decreasing in i, and no
// optimal partition passes an i whose D_m(i) exceeds the bound (solve_dp). Ties and round-off can only
// swap partitions whose costs agree to rounding, so the objective is the optimum's to round-off.
//
// Plain C++ (no torch headers, so it builds in seconds), called through ctypes: see _native() in kmeans.py.
// With -mavx2 the scans run four candidates per vector; without, a scalar loop with the same tie rule.

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace {

// Layer m sweeps with Knuth's two-sided bound where N < KNUTH_T * m * (m - 1) (its ranges are then narrow),
// else divides and conquers; narrower candidate ranges than RECT_WIDTH are scored as rectangles.
#ifndef KNUTH_T
#define KNUTH_T 16
#endif
#ifndef RECT_WIDTH
#define RECT_WIDTH 8
#endif
#ifndef LLOYD_STEPS
#define LLOYD_STEPS 2
#endif
#ifndef KNUTH_BLOCK
#define KNUTH_BLOCK 8
#endif

// Order-preserving map of float bits to uint32 (negative values reversed, positive above them).
inline uint32_t float_key(float v) {
    uint32_t b;
    std::memcpy(&b, &v, 4);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

inline float key_float(uint32_t k) {
    uint32_t b = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    float v;
    std::memcpy(&v, &b, 4);
    return v;
}

// Sort ``items`` (key << 32 | column) ascending: by key, equal keys by column. LSD radix on the key's
// top three bytes, skipping bytes that all items share, then one insertion pass over the full items:
// the radix leaves out of order only items whose keys agree to 24 bits (2^-15 of a value apart), rare
// enough in a row of weights that the pass's branch is predicted, so it costs less than a fourth scatter.
void radix_sort(std::vector<uint64_t>& items, std::vector<uint64_t>& tmp) {
    const size_t n = items.size();
    uint32_t count[3][256];
    std::memset(count, 0, sizeof(count));
    for (uint64_t it : items) {
        count[0][(it >> 40) & 255]++;
        count[1][(it >> 48) & 255]++;
        count[2][it >> 56]++;
    }
    tmp.resize(n);
    for (int pass = 0; pass < 3; ++pass) {
        uint32_t* c = count[pass];
        const int shift = 40 + 8 * pass;
        if (c[(items[0] >> shift) & 255] == n) continue;  // one digit everywhere: the pass is identity
        uint32_t sum = 0;
        for (int d = 0; d < 256; ++d) {
            uint32_t t = c[d];
            c[d] = sum;
            sum += t;
        }
        for (uint64_t it : items) tmp[c[(it >> shift) & 255]++] = it;
        items.swap(tmp);
    }
    uint64_t* a = items.data();
    for (size_t i = 1; i < n; ++i) {
        if (a[i - 1] <= a[i]) continue;
        const uint64_t v = a[i];
        size_t j = i;
        for (; j > 0 && a[j - 1] > v; --j) a[j] = a[j - 1];
        a[j] = v;
    }
}

// Hides a value from the optimizer, which would otherwise turn arithmetic on a 0/1 flag back into the
// branch it replaces (a branch on whether a value is new mispredicts half the time).
inline void hide(int& v) {
#if defined(__GNUC__)
    asm("" : "+r"(v));
#endif
}

struct RowWork {
    std::vector<uint64_t> items, tmp;
    std::vector<double> xs, ws;    // distinct values with positive weight [N], and their weights
    std::vector<double> W, S, Q;   // prefix sums [N + 1] of (w, w x, w x^2)
    std::vector<double> A, D;      // A = D_{m-1} - Q, D = D_m [N + 1]
    std::vector<int32_t> opt;      // [k][N + 1] argmins
    std::vector<int32_t> bounds;   // [k + 1]
};

// The candidates of one DP layer: D_m(i) = Q[i] + min_j A[j] - (S[i] - S[j])^2 / (W[i] - W[j]), which is
// D_{m-1}(j) + C(j, i) with C(j, i) = dQ - dS^2 / dW. Every array holds 3 readable entries past the
// last index used (vector lanes that read them are masked out). W is strictly increasing.
struct Layer {
    const double *A, *W, *S, *Q;
    double* D;
    int32_t* opt;
    const int32_t* lower;  // Knuth's bound opt_{m-1}, or null
    int lower_hi;          // last index where ``lower`` is defined
    double cap;            // no i whose D_m(i) exceeds it lies on an optimal partition (see solve_dp)
};

#ifdef __AVX2__

inline __m256d candidate(__m256d a, __m256d wi, __m256d si, __m256d wj, __m256d sj) {
    const __m256d ds = _mm256_sub_pd(si, sj);
    return _mm256_sub_pd(a, _mm256_div_pd(_mm256_mul_pd(ds, ds), _mm256_sub_pd(wi, wj)));
}

// Leftmost argmin over j in [lo, hi] of the candidates for a single i; returns (D_m(i), j).
inline std::pair<double, int> scan(const Layer& L, int i, int lo, int hi) {
    const __m256d wi = _mm256_set1_pd(L.W[i]), si = _mm256_set1_pd(L.S[i]), four = _mm256_set1_pd(4.0);
    __m256d bv = _mm256_set1_pd(std::numeric_limits<double>::infinity());
    __m256d bj = _mm256_set1_pd(double(lo));
    __m256d jv = _mm256_setr_pd(lo, lo + 1, lo + 2, lo + 3);
    int j = lo;
    for (; j + 3 <= hi; j += 4) {
        __m256d v = candidate(_mm256_loadu_pd(L.A + j), wi, si, _mm256_loadu_pd(L.W + j), _mm256_loadu_pd(L.S + j));
        __m256d take = _mm256_cmp_pd(v, bv, _CMP_LT_OQ);  // strict: each lane keeps its first minimum
        bv = _mm256_blendv_pd(bv, v, take);
        bj = _mm256_blendv_pd(bj, jv, take);
        jv = _mm256_add_pd(jv, four);
    }
    if (j <= hi) {  // the tail, lanes past hi masked out
        __m256d v = candidate(_mm256_loadu_pd(L.A + j), wi, si, _mm256_loadu_pd(L.W + j), _mm256_loadu_pd(L.S + j));
        __m256d take = _mm256_and_pd(_mm256_cmp_pd(v, bv, _CMP_LT_OQ),
                                     _mm256_cmp_pd(jv, _mm256_set1_pd(double(hi)), _CMP_LE_OQ));
        bv = _mm256_blendv_pd(bv, v, take);
        bj = _mm256_blendv_pd(bj, jv, take);
    }
    // The least value over the lanes, then the least j among the lanes holding it, without branches
    // (comparing lane by lane mispredicted often enough to cost 7% of the solve). The value is read
    // from the chosen lane, so a -0.0 there is kept as the lane loop kept it.
    __m256d m = _mm256_min_pd(bv, _mm256_permute2f128_pd(bv, bv, 1));
    m = _mm256_min_pd(m, _mm256_permute_pd(m, 0b0101));
    const __m256d at_min = _mm256_cmp_pd(bv, m, _CMP_EQ_OQ);
    __m256d jm = _mm256_blendv_pd(_mm256_set1_pd(std::numeric_limits<double>::infinity()), bj, at_min);
    jm = _mm256_min_pd(jm, _mm256_permute2f128_pd(jm, jm, 1));
    jm = _mm256_min_pd(jm, _mm256_permute_pd(jm, 0b0101));
    const int lane = __builtin_ctz(unsigned(_mm256_movemask_pd(_mm256_and_pd(at_min, _mm256_cmp_pd(bj, jm, _CMP_EQ_OQ)))));
    alignas(32) double lv[4];
    _mm256_store_pd(lv, bv);
    return {lv[lane] + L.Q[i], int(_mm256_cvtsd_f64(jm))};
}

// 4V consecutive i from i0 against every j in [jlo, jhi] with j < i, one broadcast j per step for all
// of them: the V vectors give the steps independent work (a single one waits on its compare and blend
// chain), and share the loads of A, W and S at j. Lanes past ihi are scored (the arrays are padded)
// but not stored.
template <int V>
inline void rectangle_block(const Layer& L, int i0, int ihi, int jlo, int jhi) {
    __m256d wi[V], si[V], iv[V], bv[V], bj[V];
    for (int u = 0; u < V; ++u) {
        const int i = i0 + 4 * u;
        wi[u] = _mm256_loadu_pd(L.W + i);
        si[u] = _mm256_loadu_pd(L.S + i);
        iv[u] = _mm256_setr_pd(i, i + 1, i + 2, i + 3);
        bv[u] = _mm256_set1_pd(std::numeric_limits<double>::infinity());
        bj[u] = _mm256_set1_pd(double(jlo));
    }
    const __m256d one = _mm256_set1_pd(1.0);
    __m256d jv = _mm256_set1_pd(double(jlo));
    int j = jlo;
    for (const int free_end = std::min(jhi, i0 - 1); j <= free_end; ++j) {  // j < i for every lane
        const __m256d a = _mm256_set1_pd(L.A[j]), wj = _mm256_set1_pd(L.W[j]), sj = _mm256_set1_pd(L.S[j]);
        for (int u = 0; u < V; ++u) {
            const __m256d v = candidate(a, wi[u], si[u], wj, sj);
            const __m256d take = _mm256_cmp_pd(v, bv[u], _CMP_LT_OQ);
            bv[u] = _mm256_blendv_pd(bv[u], v, take);
            bj[u] = _mm256_blendv_pd(bj[u], jv, take);
        }
        jv = _mm256_add_pd(jv, one);
    }
    for (const int end = std::min(jhi, i0 + 4 * V - 2); j <= end; ++j) {  // only the lanes with j < i
        const __m256d a = _mm256_set1_pd(L.A[j]), wj = _mm256_set1_pd(L.W[j]), sj = _mm256_set1_pd(L.S[j]);
        for (int u = 0; u < V; ++u) {
            const __m256d v = candidate(a, wi[u], si[u], wj, sj);
            const __m256d take = _mm256_and_pd(_mm256_cmp_pd(v, bv[u], _CMP_LT_OQ), _mm256_cmp_pd(jv, iv[u], _CMP_LT_OQ));
            bv[u] = _mm256_blendv_pd(bv[u], v, take);
            bj[u] = _mm256_blendv_pd(bj[u], jv, take);
        }
        jv = _mm256_add_pd(jv, one);
    }
    for (int u = 0; u < V; ++u) {
        const int i = i0 + 4 * u;
        if (i > ihi) break;
        const __m256d dv = _mm256_add_pd(bv[u], _mm256_loadu_pd(L.Q + i));
        if (i + 3 <= ihi) {  // all four lanes: two stores (the argmins are small integers, exact in double)
            _mm256_storeu_pd(L.D + i, dv);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(L.opt + i), _mm256_cvttpd_epi32(bj[u]));
            continue;
        }
        alignas(32) double lv[4], lj[4];
        _mm256_store_pd(lv, dv);
        _mm256_store_pd(lj, bj[u]);
        for (int l = 0; i + l <= ihi; ++l) {
            L.D[i + l] = lv[l];
            L.opt[i + l] = int(lj[l]);
        }
    }
}

// Every i in [ilo, ihi] against every j in [jlo, jhi] (j < i), eight values of i at a time: where the
// candidate range is this narrow, one pass over it beats recursing (each level costs a scan per i).
void rectangle(const Layer& L, int ilo, int ihi, int jlo, int jhi) {
    int i = ilo;
    for (; i + 4 <= ihi; i += 8) rectangle_block<2>(L, i, ihi, jlo, jhi);
    if (i <= ihi) rectangle_block<1>(L, i, ihi, jlo, jhi);
}

#else  // scalar fallback for compilers without AVX2: the same candidates and the same tie rule

inline double candidate(const Layer& L, int i, int j) {
    const double ds = L.S[i] - L.S[j];
    return L.A[j] - ds * ds / (L.W[i] - L.W[j]);
}

inline std::pair<double, int> scan(const Layer& L, int i, int lo, int hi) {
    double best = std::numeric_limits<double>::infinity();
    int arg = lo;
    for (int j = lo; j <= hi; ++j) {
        const double v = candidate(L, i, j);
        if (v < best) {
            best = v;
            arg = j;
        }
    }
    return {best + L.Q[i], arg};
}

void rectangle(const Layer& L, int ilo, int ihi, int jlo, int jhi) {
    for (int i = ilo; i <= ihi; ++i) {
        auto [v, arg] = scan(L, i, jlo, std::min(jhi, i - 1));
        L.D[i] = v;
        L.opt[i] = arg;
    }
}

#endif

// D_m(i) for i in [ilo, min(ihi, limit)]. D_m is non-decreasing in i, so where it exceeds the cap at some
// i, nothing right of i is wanted: ``limit`` drops to that i.
void divide_and_conquer(const Layer& L, int ilo, int ihi, int jlo, int jhi, int& limit) {
    while (true) {
        ihi = std::min(ihi, limit);
        if (ilo > ihi) return;
        if (jhi - jlo < RECT_WIDTH) {
            rectangle(L, ilo, ihi, jlo, jhi);
            return;
        }
        const int mid = (ilo + ihi) >> 1;
        int lo = jlo;
        if (L.lower) lo = std::max(lo, L.lower[std::min(mid, L.lower_hi)]);
        const int hi = std::min(jhi, mid - 1);
        auto [v, arg] = scan(L, mid, std::min(lo, hi), hi);
        L.D[mid] = v;
        L.opt[mid] = arg;
        if (v > L.cap) limit = mid;
        divide_and_conquer(L, ilo, mid - 1, jlo, arg, limit);
        ilo = mid + 1;  // the right half as a loop: recursion depth stays log2(n)
        jlo = arg;
    }
}

// Knuth's two-sided bound opt_{m-1}(i) <= opt_m(i) <= opt_m(i + 1), from the top down, KNUTH_BLOCK values
// of i at a time: each block of i is scored as a rectangle against the places between the lower bound of
// its lowest i and the argmin of the i just above it (``upper`` for the first block).
void knuth_sweep(const Layer& L, int ilo, int ihi, int upper) {
    for (int i1 = ihi; i1 >= ilo; i1 -= KNUTH_BLOCK) {
        const int i0 = std::max(ilo, i1 - (KNUTH_BLOCK - 1));
        rectangle(L, i0, i1, std::min(L.lower[std::min(i0, L.lower_hi)], upper), upper);
        upper = L.opt[i0];
    }
}

// The last i in [lo, hi] with D_m(i) <= cap, given that D_m(lo) is (D_m is non-decreasing in i): a bisection
// whose probes are scored with Knuth's lower bound and the argmins of earlier probes. ``upper`` receives
// an upper bound on the argmins left of it: the argmin of the nearest probe right of it, else ``jtop``.
int last_within_cap(const Layer& L, int lo, int hi, int jbottom, int jtop, int& upper) {
    upper = jtop;
    int floor_j = jbottom;  // argmin of the nearest probe at or left of lo, at first the lowest place
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        const int jhi = std::min(upper, mid - 1);
        const int knuth = L.lower ? L.lower[std::min(mid, L.lower_hi)] : jbottom;
        const int jlo = std::min(std::max(floor_j, knuth), jhi);
        auto [v, arg] = scan(L, mid, jlo, jhi);
        if (v > L.cap) {
            hi = mid - 1;
            upper = arg;
        } else {
            lo = mid;
            floor_j = arg;
        }
    }
    return lo;
}

// How many of the ``len`` ascending values ``a`` are at most ``v``: a binary search whose steps are
// selects, not branches (they would mispredict half the time).
inline int count_at_most(const double* a, int len, double v) {
    if (len <= 0) return 0;
    const double* base = a;
    while (len > 1) {
        const int half = len / 2;
        base = base[half] <= v ? base + half : base;
        len -= half;
    }
    return int(base - a) + (*base <= v);
}

// An upper bound on the optimal cost, with a margin for round-off: the cost of the partition that a few
// Lloyd steps reach from runs of equally many distinct values (any partition bounds the optimum from
// above). On SmolLM2's rows with a real Fisher it lands within ~25% of the optimum after two steps;
// starting from weighted quantiles, which heavy weights crowd together, it stayed ~4x above.
// Empty clusters are allowed (fewer clusters still bound the optimum). The margin covers the DP's
// round-off, a few ulps of Q[N] per layer, far below 1e-11 of it for any k <= 256.
double partition_bound(const RowWork& r, int N, int k) {
    const double *W = r.W.data(), *S = r.S.data(), *Q = r.Q.data(), *xs = r.xs.data();
    int b[257];
    for (int m = 0; m <= k; ++m) b[m] = int(int64_t(N) * m / k);  // equal counts of distinct values
    for (int step = 0; step < LLOYD_STEPS; ++step) {
        double c[256];
        int used = 0;
        for (int m = 0; m < k; ++m)
            if (b[m + 1] > b[m]) c[used++] = (S[b[m + 1]] - S[b[m]]) / (W[b[m + 1]] - W[b[m]]);
        for (int m = 1; m < used; ++m)  // values above the midpoint of two centroids go to the upper one
            b[m] = b[m - 1] + count_at_most(xs + b[m - 1], N - b[m - 1], 0.5 * (c[m - 1] + c[m]));
        for (int m = used; m <= k; ++m) b[m] = N;
    }
    double cost = 0;
    for (int m = 0; m < k; ++m) {
        const int lo = b[m], hi = b[m + 1];
        if (hi > lo) {
            const double ds = S[hi] - S[lo];
            cost += (Q[hi] - Q[lo]) - ds * ds / (W[hi] - W[lo]);
        }
    }
    return cost + 1e-9 * std::fabs(cost) + 1e-11 * Q[N];
}

// Exact boundaries (sorted positions, [k + 1]) of the optimal k-partition of N sorted values, N > k.
//
// Pruning: every prefix value D_m(b_m) of an optimal partition is at most the optimum, hence at most the
// bound U of partition_bound, and D_m is non-decreasing in i. So layer m is wanted only up to the last i
// with D_m(i) <= U (``prev_hi`` for the layer above): candidates j beyond it cannot start the last cluster
// of any prefix that an optimal partition passes through. Restricting a layer's candidates to a range of
// j keeps the argmins monotone (a column range of a Monge matrix), so the bounds below still hold.
void solve_dp(RowWork& r, int N, int k) {
    const double *W = r.W.data(), *S = r.S.data(), *Q = r.Q.data();
    r.A.resize(N + 4);  // scans read up to 3 entries past their range
    r.D.resize(N + 4);
    r.opt.assign(size_t(k) * (N + 1), 0);
    const double cap = partition_bound(r, N, k);
    int prev_hi = N - (k - 1);
    for (int i = 1; i <= prev_hi; ++i) r.D[i] = Q[i] - S[i] * S[i] / W[i];  // layer 1: one cluster [0, i)
    while (prev_hi > 1 && r.D[prev_hi] > cap) --prev_hi;
    for (int m = 2; m <= k; ++m) {
        for (int j = m - 1; j <= prev_hi; ++j) r.A[j] = r.D[j] - Q[j];
        // D_m is needed for i in [m, N - (k - m)]: every later cluster keeps at least one value.
        const int hi = N - (k - m), jtop = std::min(hi - 1, prev_hi);
        Layer L{r.A.data(), W, S, Q, r.D.data(), r.opt.data() + size_t(m - 1) * (N + 1),
                m > 2 ? r.opt.data() + size_t(m - 2) * (N + 1) : nullptr, prev_hi, cap};
        int limit = hi;
        if (m == k) {  // only D_k(N) matters, and opt_k(N) >= opt_{k-1}(N - 1), the place where layer k - 1 began
            L.opt[N] = scan(L, N, std::min(L.lower ? std::max(m - 1, L.lower[N - 1]) : m - 1, jtop), jtop).second;
            break;
        } else if (m == k - 1) {
            // The last layer looks only right of opt_{k-1}(N - 1) (Knuth), so this one starts there.
            const int lo = std::min(L.lower ? std::max(m - 1, L.lower[prev_hi]) : m - 1, jtop);
            auto [v, arg] = scan(L, hi, lo, jtop);
            L.D[hi] = v;
            L.opt[hi] = arg;
            limit = hi - 1;
            if (L.lower && N < KNUTH_T * m * (m - 1))
                knuth_sweep(L, std::max(m, arg), hi - 1, arg);
            else
                divide_and_conquer(L, std::max(m, arg), hi - 1, m - 1, arg, limit);
            // D_m(hi) was computed, and opt_m(hi) bounds the last layer from below.
            if (limit == hi - 1) limit = hi;
        } else if (L.lower && N < KNUTH_T * m * (m - 1)) {
            int upper;
            limit = last_within_cap(L, std::max(m, prev_hi), hi, m - 1, jtop, upper);
            knuth_sweep(L, m, limit, upper);
        } else {
            divide_and_conquer(L, m, hi, m - 1, jtop, limit);
        }
        prev_hi = limit;
        if (m < k - 1)
            while (prev_hi > m && r.D[prev_hi] > cap) --prev_hi;
    }
    r.bounds.resize(k + 1);
    r.bounds[k] = N;
    for (int m = k; m >= 2; --m) r.bounds[m - 1] = r.opt[size_t(m - 1) * (N + 1) + r.bounds[m]];
    r.bounds[0] = 0;
}

// The nearest float16 value (ties to even; beyond the float16 range, infinity), as a float.
inline float to_fp16_grid(float v) {
#ifdef __F16C__
    return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
#else
    if (!std::isfinite(v) || v == 0) return v;
    int e;
    std::frexp(v, &e);                                    // |v| in [2^(e-1), 2^e)
    const double ulp = std::ldexp(1.0, std::max(e - 1, -14) - 10);  // 10 fraction bits; subnormals below 2^-14
    const double r = std::nearbyint(double(v) / ulp) * ulp;          // the default rounding: ties to even
    return std::fabs(r) > 65504.0 ? std::copysign(std::numeric_limits<float>::infinity(), v) : float(r);
#endif
}

// One row: centroids [k] (sorted) and codes [n] (nearest centroid, ties to the lower one).
void kmeans_row(const float* x, const float* w, int n, int k, bool fp16, float* centroids, uint8_t* codes,
                RowWork& r) {
    r.items.resize(n);
    bool weighted = false;
    for (int j = 0; j < n; ++j) {
        r.items[j] = (uint64_t(float_key(x[j])) << 32) | uint32_t(j);
        weighted |= w[j] > 0;
    }
    radix_sort(r.items, r.tmp);
    // Distinct values with weight (an all-zero row counts every value once: unweighted), and their
    // prefix sums. A weight too small to change the running total (below 1e-16 of it) is dropped with
    // its value: it changes no cost beyond round-off, and W strictly increasing keeps dS^2 / dW finite.
    r.xs.resize(n + 1);
    r.ws.resize(n);
    r.W.resize(n + 4);  // scans read up to 3 entries past their range
    r.S.resize(n + 4);
    r.Q.resize(n + 4);
    r.W[0] = r.S[0] = r.Q[0] = 0;
    // One pass in (value, column) order with the running sums in registers and no branch on whether a
    // value is new (about half are, at random: a branch would mispredict half the time). A value is new
    // when it differs from the last one kept (-0.0 after 0.0 is not new): no chain through earlier
    // selects. The first value of a run is the one stored (later ones go to the scratch slot xs[n]), and
    // the weights of a run are summed from 0 (a product by 0 or 1: weights are finite).
    int N = 0;
    double prev = std::numeric_limits<double>::quiet_NaN(), cur_w = 0, cur_W = 0, cur_S = 0, cur_Q = 0;
    double *xs = r.xs.data(), *ws = r.ws.data(), *W = r.W.data(), *S = r.S.data(), *Q = r.Q.data();
    const uint64_t* items = r.items.data();
    for (int p = 0; p < n; ++p) {
        const double v = key_float(uint32_t(items[p] >> 32));
        const double wt = weighted ? double(w[uint32_t(items[p])]) : 1.0;
        const double total = cur_W + wt;
        if (total == cur_W) continue;
        int fresh = v != prev;
        hide(fresh);
        prev = v;
        N += fresh;
        xs[n + (N - 1 - n) * fresh] = v;
        cur_w = cur_w * double(1 - fresh) + wt;  // the same value again: one point of the summed weight
        cur_W = total;
        cur_S += wt * v;
        cur_Q += wt * v * v;
        ws[N - 1] = cur_w;
        W[N] = cur_W;
        S[N] = cur_S;
        Q[N] = cur_Q;
    }
    double c[256];
    if (N <= k) {
        // Every distinct value is its own centroid; spare centroids repeat the largest one.
        for (int m = 0; m < k; ++m) c[m] = r.xs[std::min(m, N - 1)];
    } else {
        solve_dp(r, N, k);
        // Means summed afresh, not from prefix differences, which may have lost a tiny cluster's weight.
        for (int m = 0; m < k; ++m) {
            double sw = 0, swx = 0;
            for (int i = r.bounds[m]; i < r.bounds[m + 1]; ++i) {
                sw += r.ws[i];
                swx += r.ws[i] * r.xs[i];
            }
            c[m] = swx / sw;
        }
    }
    for (int m = 0; m < k; ++m) {
        float f = float(c[m]);
        centroids[m] = fp16 ? to_fp16_grid(f) : f;
    }
    for (int m = 1; m < k; ++m) centroids[m] = std::max(centroids[m], centroids[m - 1]);  // exact order
    // Codes: how many midpoints lie below each value (exact in double for float centroids), so ties go to
    // the lower centroid; four columns per vector, in column order (no scattered stores).
    double mid[255];
    for (int m = 0; m + 1 < k; ++m) mid[m] = (double(centroids[m]) + double(centroids[m + 1])) * 0.5;
    int j = 0;
#ifdef __AVX2__
    const __m256d one = _mm256_set1_pd(1.0);
    for (; j + 4 <= n; j += 4) {
        const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x + j));
        __m256d below = _mm256_setzero_pd();
        for (int m = 0; m + 1 < k; ++m)
            below = _mm256_add_pd(below, _mm256_and_pd(_mm256_cmp_pd(_mm256_set1_pd(mid[m]), v, _CMP_LT_OQ), one));
        const __m128i c = _mm256_cvttpd_epi32(below);
        const uint32_t packed = uint32_t(_mm_cvtsi128_si32(_mm_packus_epi16(_mm_packus_epi32(c, c), _mm_setzero_si128())));
        std::memcpy(codes + j, &packed, 4);
    }
#endif
    for (; j < n; ++j) {
        const double v = x[j];
        int below = 0;
        for (int m = 0; m + 1 < k; ++m) below += mid[m] < v;
        codes[j] = uint8_t(below);
    }
}

}  // namespace

// Which of ``count`` values of x and w break the contract: bit 0 set where x holds a NaN or an infinity,
// bit 1 where w holds a NaN, an infinity or a value below 0 (-0.0 is fine). One pass over the bits, which
// vectorizes, instead of the four passes torch would make.
extern "C" int32_t kmeans_check(const float* x, const float* w, int64_t count) {
    uint32_t bad_x = 0, bad_w = 0;
    for (int64_t i = 0; i < count; ++i) {
        uint32_t b;
        std::memcpy(&b, x + i, 4);
        bad_x |= (b & 0x7f800000u) == 0x7f800000u;  // all exponent bits set: NaN or infinity
    }
    if (w)
        for (int64_t i = 0; i < count; ++i) {
            uint32_t b;
            std::memcpy(&b, w + i, 4);
            bad_w |= (b > 0x7f7fffffu) & (b != 0x80000000u);  // above the largest finite float, or negative
        }
    return int32_t(bad_x | (bad_w << 1));
}

// Runs ``row_fn(begin, end)`` over ``rows`` rows split evenly over at most ``threads`` threads (at least 16
// rows a thread: below that, starting a thread costs more than it saves).
template <class F>
void over_rows(int64_t rows, int32_t threads, F row_fn) {
    threads = int32_t(std::max<int64_t>(1, std::min<int64_t>(threads, rows / 16)));
    if (threads == 1) {
        row_fn(int64_t(0), rows);
        return;
    }
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back(row_fn, rows * t / threads, rows * (t + 1) / threads);
    for (auto& th : pool) th.join();
}

// x, w: [rows, n] float32 row-major (w >= 0, finite); writes centroids [rows, k] float32 and codes
// [rows, n] uint8. Rows are split evenly over ``threads`` threads.
extern "C" void kmeans_rows(const float* x, const float* w, int64_t rows, int64_t n, int32_t k, int32_t fp16,
                            int32_t threads, float* centroids, uint8_t* codes) {
    over_rows(rows, threads, [=](int64_t begin, int64_t end) {
        RowWork r;
        for (int64_t i = begin; i < end; ++i)
            kmeans_row(x + i * n, w + i * n, int(n), k, fp16 != 0, centroids + i * k, codes + i * n, r);
    });
}

// The weighted k-means objective of every row: out[i] = sum_j w[i, j] (x[i, j] - centroids[i, codes[i, j]])^2,
// each term and the row's sum in double, in column order (so the result does not depend on ``threads``);
// w null means weight 1. x, w: [rows, n] float32; centroids: [rows, k] float32; codes: [rows, n] uint8.
// Returns 1 if a code is k or more (its term then reads entry 0; the caller raises), else 0.
extern "C" int32_t kmeans_objective(const float* x, const float* w, const float* centroids, const uint8_t* codes,
                                    int64_t rows, int64_t n, int32_t k, int32_t threads, double* out) {
    std::atomic<int32_t> bad{0};
    over_rows(rows, threads, [&](int64_t begin, int64_t end) {
        int32_t row_bad = 0;
        for (int64_t i = begin; i < end; ++i) {
            const float *xi = x + i * n, *ci = centroids + i * k, *wi = w ? w + i * n : nullptr;
            const uint8_t* qi = codes + i * n;
            double sum = 0;
            for (int64_t j = 0; j < n; ++j) {
                row_bad |= qi[j] >= k;
                const double d = double(xi[j]) - double(ci[qi[j] < k ? qi[j] : 0]);
                sum += wi ? double(wi[j]) * (d * d) : d * d;
            }
            out[i] = sum;
        }
        if (row_bad) bad.store(1, std::memory_order_relaxed);
    });
    return bad.load();
}
