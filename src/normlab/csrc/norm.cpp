// normlab's native CPU norm: forward, backward and the guarded running update in one C++ call per direction, with
// the autograd node in C++ too. What it saves is the Python around a small norm (module, autograd.Function, engine
// callbacks, a dozen tensor ops), which costs more than the arithmetic below some 10^5 values.
//
// Every norm is the spec's view (N, G, K, R) of x, c = g * K + k, stored (N, C, R) contiguous or, channels_last,
// (N, R, C) (the two loop families below):
//
//     a = x, or f(x) when ACT_FIRST                       (placement "after": a pass of its own before the loops)
//     mean = E[a],  var = E[(a - mean)^2],  rstd = (var + eps)^-1/2
//     xhat = (a - mean) * rstd,  z = xhat * w[c] + b[c],  y = f(z) unless ACT_FIRST
//
//     dz = dy * f'(z) unless ACT_FIRST, else dy;  dxhat = dz * w[c]      (sigmoid, tanh: f'(z) from the saved y)
//     db[c] = sum dz,  dw[c] = sum dz * xhat                               over n and r (and the statistics sharing c)
//     da = rstd * (dxhat - E[dxhat] - xhat * E[dxhat * xhat])              the input's own statistics
//     da = rstd * dxhat                                                    given statistics (constants)
//     dx = da * f'(x) when ACT_FIRST, else da
//
// A statistic is (n0, g) with n0 = 0 when it pools over the batch (batch norm). Its moments come from sums of
// d = a - shift with the shift near the mean, E[d^2] - E[d]^2: in x's own lanes, per block or tile, summed again
// centred where the shift is off, merged as (count, mean, M2) in float64 (block_moments, rows_moments); pooled
// planes (NCHW batch norm) sum in float64 with the statistic's first value as the shift (run_sums). Mean and rstd
// stay float64 inside the node, which both directions read. Double backward: the node's backward, when a graph of
// it is asked for, recomputes the forward from differentiable ATen ops and lets autograd differentiate that (slow,
// exact, rare).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/FuncTorchTLS.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <array>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::tensor_list;

enum Act : int64_t { NONE = 0, RELU, LEAKY_RELU, SIGMOID, TANH, SILU, GELU };

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

// The activation and its derivative at the pre-activation value v (torch's conventions: relu'(0) = 0,
// leaky_relu'(0) = slope; gelu is the exact erf form). A template argument, so that the loops without a
// transcendental vectorize.
// Branch-free where it can be (std::max/min, a 0/1 mask): a branch on the sign of random data is mispredicted
// half the time. NaN propagates as in torch: std::max(NaN, 0.0) is NaN.
template <int A>
inline double act_fn(double v, double slope) {
  if constexpr (A == RELU) return std::max(v, 0.0);
  else if constexpr (A == LEAKY_RELU) return std::max(v, 0.0) + slope * std::min(v, 0.0);
  else if constexpr (A == SIGMOID) return 1.0 / (1.0 + std::exp(-v));
  else if constexpr (A == TANH) return std::tanh(v);
  else if constexpr (A == SILU) return v / (1.0 + std::exp(-v));
  else if constexpr (A == GELU) return 0.5 * v * (1.0 + std::erf(v * kInvSqrt2));
  else return v;
}

template <int A>
inline double act_grad(double v, double slope) {
  if constexpr (A == RELU) return static_cast<double>(v > 0);
  else if constexpr (A == LEAKY_RELU) { const double pos = static_cast<double>(v > 0); return pos + (1.0 - pos) * slope; }
  else if constexpr (A == SIGMOID) { const double s = 1.0 / (1.0 + std::exp(-v)); return s * (1.0 - s); }
  else if constexpr (A == TANH) { const double t = std::tanh(v); return 1.0 - t * t; }
  else if constexpr (A == SILU) { const double s = 1.0 / (1.0 + std::exp(-v)); return s * (1.0 + v * (1.0 - s)); }
  else if constexpr (A == GELU) return 0.5 * (1.0 + std::erf(v * kInvSqrt2)) + v * std::exp(-0.5 * v * v) * kInvSqrt2Pi;
  else return 1.0;
}

// The same in float32 lanes, for float32 inputs (torch's float32 activations are float32 too): with glibc's vector
// math library (see normlab.native's flags) expf, tanhf and erff vectorize, 16 lanes a vector.
template <int A>
inline float act_fn_f(float v, float slope) {
  if constexpr (A == RELU) return std::max(v, 0.0f);
  else if constexpr (A == LEAKY_RELU) return std::max(v, 0.0f) + slope * std::min(v, 0.0f);
  else if constexpr (A == SIGMOID) return 1.0f / (1.0f + expf(-v));
  else if constexpr (A == TANH) return tanhf(v);
  else if constexpr (A == SILU) return v / (1.0f + expf(-v));
  else if constexpr (A == GELU) return 0.5f * v * (1.0f + erff(v * static_cast<float>(kInvSqrt2)));
  else return v;
}

template <int A>
inline float act_grad_f(float v, float slope) {
  if constexpr (A == RELU) return static_cast<float>(v > 0);
  else if constexpr (A == LEAKY_RELU) { const float pos = static_cast<float>(v > 0); return pos + (1.0f - pos) * slope; }
  else if constexpr (A == SIGMOID) { const float s = 1.0f / (1.0f + expf(-v)); return s * (1.0f - s); }
  else if constexpr (A == TANH) { const float t = tanhf(v); return 1.0f - t * t; }
  else if constexpr (A == SILU) { const float s = 1.0f / (1.0f + expf(-v)); return s * (1.0f + v * (1.0f - s)); }
  else if constexpr (A == GELU)
    return 0.5f * (1.0f + erff(v * static_cast<float>(kInvSqrt2))) +
           v * expf(-0.5f * v * v) * static_cast<float>(kInvSqrt2Pi);
  else return 1.0f;
}

// float32 inputs run the apply, the activation and the backward in float32 lanes (the mean as two floats, hi + lo,
// see run_apply; sums flushed into float64 ones every kFlush rows or kBlock values); float64 inputs in float64
template <typename T>
constexpr bool kFloatLanes = std::is_same_v<T, float>;

template <int A>
constexpr bool kTranscendental = A == SIGMOID || A == TANH || A == SILU || A == GELU;

// Calls fn(std::integral_constant<int, act>) for a run-time act.
template <typename F>
void with_act(int64_t act, F&& fn) {
  switch (act) {
    case RELU: return fn(std::integral_constant<int, RELU>{});
    case LEAKY_RELU: return fn(std::integral_constant<int, LEAKY_RELU>{});
    case SIGMOID: return fn(std::integral_constant<int, SIGMOID>{});
    case TANH: return fn(std::integral_constant<int, TANH>{});
    case SILU: return fn(std::integral_constant<int, SILU>{});
    case GELU: return fn(std::integral_constant<int, GELU>{});
    default: return fn(std::integral_constant<int, NONE>{});
  }
}

// The call, as every function here reads it: the view, strides, and what the norm does.
struct Geometry {
  int64_t N, G, K, R;      // the spec's view; C = G * K channels (layer norm: K normalized elements, G = R = 1)
  bool channels_last;      // x is (N, *S, C) in memory: rows of C contiguous channels; else (N, C, *S) contiguous
  bool pool;               // one statistic per group over the whole batch (batch norm), else per sample
  double eps;
  int64_t act;             // Act
  double slope;            // leaky_relu's negative slope
  bool act_first;          // y = norm(f(x)) (placement "after"), else y = f(norm(x))

  int64_t C() const { return G * K; }
  int64_t stats() const { return (pool ? 1 : N) * G; }
  int64_t m() const { return (pool ? N : 1) * K * R; }
  // Rows of contiguous channels, the loops' layout when channels are innermost: channels_last, or a pooled (N, C).
  bool rows() const { return channels_last || (pool && R == 1); }
};

// Work is split into chunks whose number depends on the shape only (never on the thread count), each with its own
// partial sums, merged in chunk order: the results are the same bits on any number of threads. A chunk holds about
// kGrain values; small inputs are one chunk, on the calling thread (a parallel region costs microseconds).
constexpr int64_t kGrain = int64_t{1} << 14;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kFlush = 16;  // float32 sums run over at most this many rows before they go into float64 ones
constexpr int64_t kTileRows = 32;  // rows per tile of rows_moments' float32 sums, and the least rows per chunk
constexpr int64_t kApplyGrain = int64_t{1} << 13;  // values per thread, at least, of an apply split over threads

inline int64_t chunks(int64_t items, int64_t values_per_item) {
  return std::max<int64_t>(1, std::min({items, kMaxChunks, items * values_per_item / kGrain}));
}

// Runs fn(chunk) for chunk in [0, n), in parallel when there is more than one.
template <typename F>
void each_chunk(int64_t n, F&& fn) {
  if (n == 1) return fn(int64_t{0});
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) fn(i);
  });
}


// ---- the loops: one contiguous run each, restrict pointers and scalars in registers, so that they vectorize -------
//
// A run is n contiguous values. "Per value" loops take one statistic (mu, rs) and one channel (wc, bc) for the whole
// run (a plane of R positions); "per channel" loops take arrays indexed like the run (a row of channels).

// sum and sum of squares of d = x - shift
template <typename T>
inline void run_sums(const T* __restrict x, int64_t n, double shift, double& sum, double& sumsq) {
  double s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(x[i]) - shift;
    s1 += d;
    s2 += d * d;
  }
  sum += s1;
  sumsq += s2;
}

// Lanes of a reduction: four vectors' worth of independent accumulators (16 float32 or 8 float64 per AVX-512
// vector), so that the adds of consecutive vectors do not wait on each other (one accumulator vector waits an add's
// latency, about 4 cycles, per vector). Summed at the end in a fixed order.
template <typename T>
constexpr int kAccLanes = 4 * 64 / static_cast<int>(sizeof(T));

template <typename T, int W>
inline T lanes_total(const T (&a)[W]) {
  T b[W / 2];
  for (int j = 0; j < W / 2; ++j) b[j] = a[j] + a[j + W / 2];
  if constexpr (W / 2 == 1) return b[0];
  else return lanes_total(b);
}

// Moments of values: their count, mean and M2 = sum (x - mean)^2; merge() adds two sets (Chan, Golub and LeVeque's
// pairwise update, in float64), in an order fixed by the caller.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(const Moments& o) {
    const double total = n + o.n, d = o.mean - mean;
    mean += d * (o.n / total);
    m2 += o.m2 + d * d * (n * o.n / total);
    n = total;
  }
};

// A block is at most kBlock contiguous values (64 KiB of float32 in two passes fit L2, a run of most shapes L1).
constexpr int64_t kBlock = 4096;

// sums of d = x - hi - lo and of d^2 over n values, kAccLanes accumulators each
template <typename T>
inline void centred_sums(const T* __restrict x, int64_t n, T hi, T lo, double& s1, double& s2) {
  constexpr int W = kAccLanes<T>;
  T a[W] = {}, b[W] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W) {
#pragma omp simd
    for (int j = 0; j < W; ++j) {
      const T d = x[i + j] - hi - lo;
      a[j] += d;
      b[j] += d * d;
    }
  }
  for (int64_t j = i; j < n; ++j) {
    const T d = x[j] - hi - lo;
    a[j - i] += d;
    b[j - i] += d * d;
  }
  s1 = static_cast<double>(lanes_total(a));
  s2 = static_cast<double>(lanes_total(b));
}

// The moments of one block in x's own lanes (16 float32 per AVX-512 vector; float64 for float64), no float32 sum
// running over more than kBlock / kAccLanes values: sums of d = x - x[0] and d^2, and m1 = x[0] + mean(d). When
// x[0] lies within about a standard deviation of the mean (E[d]^2 <= E[d^2] / 2), E[d^2] - E[d]^2 loses at most a
// bit and that is the variance; otherwise (x[0] an outlier) a second pass sums d = x - m1 (m1 as hi + lo, see
// run_apply), centred values whose sums give M2 and correct m1 (the corrected two-pass algorithm), so a large mean
// or an outlier loses no digits of the spread.
template <typename T>
inline Moments block_moments(const T* x, int64_t n) {
  double s1, s2;
  centred_sums(x, n, x[0], T(0), s1, s2);
  const double e1 = s1 / n, e2 = s2 / n, m1 = static_cast<double>(x[0]) + e1;
  if (std::is_same_v<T, double> || e1 * e1 <= 0.5 * e2)
    return {static_cast<double>(n), m1, std::max(e2 - e1 * e1, 0.0) * n};
  const T hi = static_cast<T>(m1), lo = static_cast<T>(m1 - static_cast<double>(hi));
  centred_sums(x, n, hi, lo, s1, s2);
  const double c = s1 / n;
  return {static_cast<double>(n), m1 + c, std::max(s2 - s1 * c, 0.0)};
}

// A statistic's var (biased), mean and rstd from its moments.
inline void finish_moments(const Moments& mo, double eps, double* mean, double* rstd, double* var) {
  *var = mo.m2 / mo.n;
  *mean = mo.mean;
  *rstd = 1.0 / std::sqrt(*var + eps);
}

// Moments::merge per channel, vectorized over the C channels: (mean, m2) over n values take (tm, tm2) over nt
// values (n = 0: they become tm, tm2).
inline void merge_channels(double* __restrict mean, double* __restrict m2, double n, const double* __restrict tm,
                           const double* __restrict tm2, double nt, int64_t C) {
  const double total = n + nt, f = nt / total, h = n * nt / total;
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const double base = n == 0 ? 0.0 : mean[c], d = tm[c] - base;
    m2[c] = (n == 0 ? 0.0 : m2[c]) + tm2[c] + d * d * h;
    mean[c] = base + d * f;
  }
}

// The moments of a contiguous run, block by block, merged in order.
template <typename T>
inline Moments run_moments(const T* x, int64_t n) {
  Moments acc = block_moments(x, std::min(n, kBlock));
  for (int64_t i = kBlock; i < n; i += kBlock) acc.merge(block_moments(x + i, std::min(kBlock, n - i)));
  return acc;
}

// per channel: s1[i] += x[i] - shift[i], s2[i] += (x[i] - shift[i])^2, over NR rows ld apart, in x's own lanes
// (the "row" loops below take NR rows at a time, so that each per-channel array is read and written once per NR
// rows)
template <int NR, typename T>
inline void row_sums(const T* __restrict x, int64_t n, int64_t ld, const T* __restrict shift, T* __restrict s1,
                     T* __restrict s2) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T a = 0, b = 0;
    for (int r = 0; r < NR; ++r) {
      const T d = x[r * ld + i] - shift[i];
      a += d;
      b += d * d;
    }
    s1[i] += a;
    s2[i] += b;
  }
}

// Calls fn(std::integral_constant<int, NR>{}, j) over rows lo .. hi - 1: NR = kRowGroup rows at a time, then one
// by one.
constexpr int kRowGroup = 4;

template <typename F>
inline void by_rows(int64_t lo, int64_t hi, F&& fn) {
  int64_t j = lo;
  for (; j + kRowGroup <= hi; j += kRowGroup) fn(std::integral_constant<int, kRowGroup>{}, j);
  for (; j < hi; ++j) fn(std::integral_constant<int, 1>{}, j);
}

// Loops along a row of n float32 values in whole vectors of kV lanes, so that no value takes a scalar path (a
// scalar expf in a loop's remainder costs what a vector of 16 does): block(i0, done) for i0 = 0, kV, ..., the last
// block moved back to end at n (it overlaps the one before; `done` is the first index not yet handled, for loops that
// accumulate and must skip the lanes below it); rows shorter than kV: one(i) per value.
constexpr int kV = 16;

template <typename Block, typename One>
inline void by_vectors(int64_t n, Block&& block, One&& one) {
  if (n < kV) {
    for (int64_t i = 0; i < n; ++i) one(i);
    return;
  }
  for (int64_t i = 0; i < n; i += kV) block(std::min(i, n - kV), i);
}

// y = f((x - mu) * sc + bc), one statistic and channel for the run. float32 runs in float32 lanes (twice as many):
// the float64 mean as a sum of two floats, mu = hi + lo, so that x - hi - lo keeps the digits x - mu has (x - hi is
// exact when x is near the mean, the case where they matter), then one rounding per operation, as torch's apply.
template <typename T, int A>
inline void run_apply(const T* __restrict x, T* __restrict y, int64_t n, double mu, double sc, double bc,
                      double slope) {
  if constexpr (kFloatLanes<T>) {
    const float hi = static_cast<float>(mu), lo = static_cast<float>(mu - hi), s = static_cast<float>(sc);
    const float c = static_cast<float>(bc), sl = static_cast<float>(slope);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = act_fn_f<A>((x[i] - hi - lo) * s + c, sl);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      y[i] = static_cast<T>(act_fn<A>((static_cast<double>(x[i]) - mu) * sc + bc, slope));
  }
}

// y = f((x - mu[i]) * sc[i] + bc[i]) over NR rows ld apart; row_apply_f: float32, mu as hi[i] + lo[i] (see
// run_apply), sc and bc as floats
template <int NR, typename T, int A>
inline void row_apply(const T* __restrict x, T* __restrict y, int64_t n, int64_t ld, const double* __restrict mu,
                      const double* __restrict sc, const double* __restrict bc, double slope) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    for (int r = 0; r < NR; ++r)
      y[r * ld + i] = static_cast<T>(act_fn<A>((static_cast<double>(x[r * ld + i]) - mu[i]) * sc[i] + bc[i], slope));
}

template <int NR, int A>
inline void row_apply_f(const float* __restrict x, float* __restrict y, int64_t n, int64_t ld,
                        const float* __restrict hi, const float* __restrict lo, const float* __restrict sc,
                        const float* __restrict bc, float slope) {
  by_vectors(n, [&](int64_t i0, int64_t) {
#pragma omp simd
    for (int j = 0; j < kV; ++j) {
      const int64_t i = i0 + j;
      for (int r = 0; r < NR; ++r) y[r * ld + i] = act_fn_f<A>((x[r * ld + i] - hi[i] - lo[i]) * sc[i] + bc[i], slope);
    }
  }, [&](int64_t i) {
    for (int r = 0; r < NR; ++r) y[r * ld + i] = act_fn_f<A>((x[r * ld + i] - hi[i] - lo[i]) * sc[i] + bc[i], slope);
  });
}

// The float32 rows' backward, NR rows ld apart, in float32 lanes (the mean as hi + lo, as in run_apply):
// row_grad_sums_f adds each row's dz and dz * xhat into the per-channel sums pz, pzx, row after row (in registers
// across the NR rows), and keeps dz in dz_out where given; row_dx_f writes dx = rs * (dz * w - c1 - xhat * c2),
// dz read back from dx where kept.
template <int NR, int A>
inline void row_grad_sums_f(const float* __restrict x, const float* __restrict dy, float* __restrict dz_out, int64_t n,
                            int64_t ld, const float* __restrict hi, const float* __restrict lo,
                            const float* __restrict rs, const float* __restrict wc, const float* __restrict bc, float sl,
                            float* __restrict pz, float* __restrict pzx) {
  auto at = [&](int64_t c, bool use) {  // use: false for the lanes an overlapping last vector has already added
    float az = pz[c], azx = pzx[c];
    for (int r = 0; r < NR; ++r) {
      const float xhat = (x[r * ld + c] - hi[c] - lo[c]) * rs[c];
      const float dz = dy[r * ld + c] * act_grad_f<A>(xhat * wc[c] + bc[c], sl);
      if constexpr (kTranscendental<A>) if (dz_out) dz_out[r * ld + c] = dz;
      az += use ? dz : 0.0f;
      azx += use ? dz * xhat : 0.0f;
    }
    pz[c] = az;
    pzx[c] = azx;
  };
  by_vectors(n, [&](int64_t c0, int64_t done) {
#pragma omp simd
    for (int k = 0; k < kV; ++k) at(c0 + k, c0 + k >= done);
  }, [&](int64_t c) { at(c, true); });
}

template <int NR, int A>
inline void row_dx_f(const float* __restrict x, const float* __restrict dy, float* __restrict dx, int64_t n, int64_t ld,
                     const float* __restrict hi, const float* __restrict lo, const float* __restrict rs,
                     const float* __restrict wc, const float* __restrict bc, const float* __restrict c1,
                     const float* __restrict c2, float sl, bool dz_in_dx) {
  if (dz_in_dx) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c)
      for (int r = 0; r < NR; ++r) {
        const float xhat = (x[r * ld + c] - hi[c] - lo[c]) * rs[c];
        dx[r * ld + c] = rs[c] * (dx[r * ld + c] * wc[c] - c1[c] - xhat * c2[c]);
      }
    return;
  }
#pragma omp simd
  for (int64_t c = 0; c < n; ++c)
    for (int r = 0; r < NR; ++r) {
      const float xhat = (x[r * ld + c] - hi[c] - lo[c]) * rs[c];
      const float dz = dy[r * ld + c] * act_grad_f<A>(xhat * wc[c] + bc[c], sl);
      dx[r * ld + c] = rs[c] * (dz * wc[c] - c1[c] - xhat * c2[c]);
    }
}

// xhat = (x - mu) * rs, z = xhat * wc + bc, dz = dy * f'(z)
template <int A>
inline double dz_at(double x, double dy, double mu, double rs, double wc, double bc, double slope, double& xhat) {
  xhat = (x - mu) * rs;
  if constexpr (A == NONE) return dy;
  else return dy * act_grad<A>(xhat * wc + bc, slope);
}

// sums over the run of dz and dz * xhat, one statistic and channel; float32 in float32 lanes, kAccLanes accumulators
// each, block by block (kBlock values) into the float64 sums
template <typename T, int A>
inline void run_grad_sums(const T* __restrict x, const T* __restrict dy, int64_t n, double mu, double rs, double wc,
                          double bc, double slope, double& sdz, double& sdzx) {
  if constexpr (kFloatLanes<T>) {
    constexpr int W = kAccLanes<float>;
    const float hi = static_cast<float>(mu), lo = static_cast<float>(mu - hi), r = static_cast<float>(rs);
    const float w = static_cast<float>(wc), b = static_cast<float>(bc), sl = static_cast<float>(slope);
    for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
      const int64_t i1 = std::min(n, i0 + kBlock);
      float a[W] = {}, c[W] = {};
      int64_t i = i0;
      for (; i + W <= i1; i += W) {
#pragma omp simd
        for (int j = 0; j < W; ++j) {
          const float xhat = (x[i + j] - hi - lo) * r;
          const float dz = dy[i + j] * act_grad_f<A>(xhat * w + b, sl);
          a[j] += dz;
          c[j] += dz * xhat;
        }
      }
      for (int64_t j = i; j < i1; ++j) {
        const float xhat = (x[j] - hi - lo) * r;
        const float dz = dy[j] * act_grad_f<A>(xhat * w + b, sl);
        a[j - i] += dz;
        c[j - i] += dz * xhat;
      }
      sdz += lanes_total(a);
      sdzx += lanes_total(c);
    }
  } else {
    double s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = 0; i < n; ++i) {
      double xhat;
      const double dz = dz_at<A>(x[i], dy[i], mu, rs, wc, bc, slope, xhat);
      s1 += dz;
      s2 += dz * xhat;
    }
    sdz += s1;
    sdzx += s2;
  }
}

// per channel: sdz[i] += dz, sdzx[i] += dz * xhat, over NR rows ld apart
template <int NR, typename T, int A>
inline void row_grad_sums(const T* __restrict x, const T* __restrict dy, int64_t n, int64_t ld,
                          const double* __restrict mu, const double* __restrict rs, const double* __restrict wc,
                          const double* __restrict bc, double slope, double* __restrict sdz,
                          double* __restrict sdzx) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    double s1 = 0, s2 = 0;
    for (int r = 0; r < NR; ++r) {
      double xhat;
      const double dz = dz_at<A>(x[r * ld + i], dy[r * ld + i], mu[i], rs[i], wc[i], bc[i], slope, xhat);
      s1 += dz;
      s2 += dz * xhat;
    }
    sdz[i] += s1;
    sdzx[i] += s2;
  }
}

// dx = rs * (dz * wc - c1 - xhat * c2), one statistic and channel (c1 = c2 = 0: given statistics)
template <typename T, int A>
inline void run_dx(const T* __restrict x, const T* __restrict dy, T* __restrict dx, int64_t n, double mu, double rs,
                   double wc, double bc, double c1, double c2, double slope) {
  if constexpr (kFloatLanes<T>) {
    const float hi = static_cast<float>(mu), lo = static_cast<float>(mu - hi), r = static_cast<float>(rs);
    const float w = static_cast<float>(wc), b = static_cast<float>(bc), sl = static_cast<float>(slope);
    const float f1 = static_cast<float>(c1), f2 = static_cast<float>(c2);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float xhat = (x[i] - hi - lo) * r;
      const float dz = dy[i] * act_grad_f<A>(xhat * w + b, sl);
      dx[i] = r * (dz * w - f1 - xhat * f2);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      double xhat;
      const double dz = dz_at<A>(x[i], dy[i], mu, rs, wc, bc, slope, xhat);
      dx[i] = static_cast<T>(rs * (dz * wc - c1 - xhat * c2));
    }
  }
}

// dx per channel, over NR rows ld apart
template <int NR, typename T, int A>
inline void row_dx(const T* __restrict x, const T* __restrict dy, T* __restrict dx, int64_t n, int64_t ld,
                   const double* __restrict mu, const double* __restrict rs, const double* __restrict wc,
                   const double* __restrict bc, const double* __restrict c1, const double* __restrict c2,
                   double slope) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    for (int r = 0; r < NR; ++r) {
      double xhat;
      const double dz = dz_at<A>(x[r * ld + i], dy[r * ld + i], mu[i], rs[i], wc[i], bc[i], slope, xhat);
      dx[r * ld + i] = static_cast<T>(rs[i] * (dz * wc[i] - c1[i] - xhat * c2[i]));
    }
}

// w and b as float64 arrays (C,): 1 and 0 when absent, so that the loops never test for them
template <typename T>
void affine(const T* w, const T* b, int64_t C, std::vector<double>& wd, std::vector<double>& bd) {
  wd.assign(C, 1.0);
  bd.assign(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    if (w) wd[c] = w[c];
    if (b) bd[c] = b[c];
  }
}

// a float64 array's float32 copy
inline std::vector<float> as_float(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }

// db and dw from the chunks' partial sums (per chunk: C sums of dz, then C of dz * xhat), in chunk order.
inline void add_partials(const std::vector<double>& part, int64_t chunks, int64_t C, double* dw, double* db) {
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int64_t c = 0; c < C; ++c) {
      if (db) db[c] += part[ch * 2 * C + c];
      if (dw) dw[c] += part[ch * 2 * C + C + c];
    }
}

// The statistics of one group from its sums of d = a - shift over m values.
inline void finish_stat(double shift, double sum, double sumsq, int64_t m, double eps, double* mean, double* rstd,
                        double* var) {
  const double md = sum / m, v = std::max(sumsq / m - md * md, 0.0);
  *var = v;
  *mean = shift + md;
  *rstd = 1.0 / std::sqrt(v + eps);
}

// ---- rows of contiguous channels (channels_last, or a pooled (N, C)) ------------------------------------------------
//
// Block b (the batch when pooled, else sample b) is RB rows of C contiguous channels, row j at (b * RB + j) * C.
// Statistic b * G + g (g when pooled) reduces channels g*K .. g*K+K-1 over the block's rows. The loops run along the
// channels, accumulating per channel; groups sum their channels at the merge.

// Per channel, the mean and M2 of `rows` rows of C contiguous channels, tile by tile (kTileRows), in x's own
// lanes: a tile's sums of d = x - shift and d^2 give its moments (E[d^2] - E[d]^2, see block_moments), merged into
// the running ones per channel. `shift` (C,) is near each channel's mean (the mean of the block's first rows), so d
// stays near 0 and E[d^2] - E[d]^2 loses nothing; a tile where some channel's shift lies more than about a standard
// deviation from the tile's mean is summed again, shifted by its own mean.
template <typename T>
void rows_moments(const T* x, int64_t rows, int64_t C, const T* shift0, double* mean, double* m2) {
  std::vector<T> shift(shift0, shift0 + C), s1(C), s2(C);
  std::vector<double> tm(C), tm2(C);  // per channel: the tile's mean and M2
  double n = 0;
  for (int64_t t0 = 0; t0 < rows; t0 += kTileRows) {
    const int64_t nt = std::min(kTileRows, rows - t0);
    const T* xt = x + t0 * C;
    for (int pass = 0; pass < 2; ++pass) {
      std::fill(s1.begin(), s1.end(), T(0));
      std::fill(s2.begin(), s2.end(), T(0));
      by_rows(0, nt, [&](auto NR, int64_t j) { row_sums<NR>(xt + j * C, C, C, shift.data(), s1.data(), s2.data()); });
      int64_t off_centre = 0;  // channels whose E[d]^2 > E[d^2] / 2
#pragma omp simd reduction(+ : off_centre)
      for (int64_t c = 0; c < C; ++c)
        off_centre += static_cast<double>(s1[c]) * s1[c] > 0.5 * nt * static_cast<double>(s2[c]);
      if (off_centre == 0 || pass == 1) break;
      for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<T>(shift[c] + static_cast<double>(s1[c]) / nt);
    }
    const double inv = 1.0 / nt;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double e1 = static_cast<double>(s1[c]) * inv;
      tm[c] = static_cast<double>(shift[c]) + e1;
      tm2[c] = std::max(static_cast<double>(s2[c]) - e1 * e1 * nt, 0.0);
      shift[c] = shift0[c];
    }
    merge_channels(mean, m2, n, tm.data(), tm2.data(), static_cast<double>(nt), C);
    n += nt;
  }
}

struct Rows {
  int64_t B, RB, P;  // blocks, rows per block, chunks per block (at least kTileRows rows each, where there are)
  explicit Rows(const Geometry& q)
      : B(q.pool ? 1 : q.N), RB(q.pool ? q.N * q.R : q.R),
        P(std::max<int64_t>(1, std::min(chunks(RB, q.C()), RB / kTileRows))) {}
  int64_t lo(int64_t p) const { return p * RB / P; }
  int64_t hi(int64_t p) const { return (p + 1) * RB / P; }
};

// Per block and channel (C each): mu, rs (its group's statistic), then sc = rs * w, bc = b
void block_coefficients(const Geometry& q, int64_t B, bool given, const double* mean, const double* rstd,
                        const std::vector<double>& wd, const std::vector<double>& bd, std::vector<double>& coef) {
  const int64_t C = q.C();
  coef.resize(B * 4 * C);
  for (int64_t bl = 0; bl < B; ++bl)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t s = (given ? 0 : bl * q.G) + c / q.K;
      double* cf = coef.data() + bl * 4 * C;
      cf[c] = mean[s];
      cf[C + c] = rstd[s];
      cf[2 * C + c] = rstd[s] * wd[c];
      cf[3 * C + c] = bd[c];
    }
}

template <typename T, int A>
void forward_rows(const Geometry& q, bool given, const T* x, const T* w, const T* b, T* y, double* mean, double* rstd,
                  double* var) {
  const double slope = q.slope;
  const Rows L(q);
  const int64_t C = q.C(), G = q.G, K = q.K;
  if (!given) {
    // per chunk and channel: mean, M2 of the chunk's rows (rows_moments writes every value: no zeros first)
    const std::unique_ptr<double[]> part(new double[L.B * L.P * 2 * C]);
    std::vector<T> shift(L.B * C);  // per block and channel: the mean of its first kFlush rows
    std::vector<double> a(C);
    for (int64_t bl = 0; bl < L.B; ++bl) {
      const int64_t nr = std::min(kFlush, L.RB);
      std::fill(a.begin(), a.end(), 0.0);
      for (int64_t j = 0; j < nr; ++j) {  // row by row, so the loop runs along contiguous channels
        const T* __restrict xr = x + (bl * L.RB + j) * C;
        double* __restrict ap = a.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) ap[c] += xr[c];
      }
      for (int64_t c = 0; c < C; ++c) shift[bl * C + c] = static_cast<T>(a[c] / nr);
    }
    each_chunk(L.B * L.P, [&](int64_t ch) {
      const int64_t bl = ch / L.P, p = ch % L.P;
      rows_moments(x + (bl * L.RB + L.lo(p)) * C, L.hi(p) - L.lo(p), C, shift.data() + bl * C,
                   part.get() + ch * 2 * C, part.get() + ch * 2 * C + C);
    });
    std::vector<double> am(C), am2(C);  // per channel: the merged chunks' mean and M2, over `an` rows
    for (int64_t bl = 0; bl < L.B; ++bl) {
      double an = 0;
      for (int64_t p = 0; p < L.P; ++p) {  // chunk by chunk, in order
        const double* pm = part.get() + (bl * L.P + p) * 2 * C;
        const double nt = static_cast<double>(L.hi(p) - L.lo(p));
        merge_channels(am.data(), am2.data(), an, pm, pm + C, nt, C);
        an += nt;
      }
      for (int64_t g = 0; g < G; ++g) {
        Moments acc;
        for (int64_t c = g * K; c < g * K + K; ++c) acc.merge({an, am[c], am2[c]});
        const int64_t s = bl * G + g;
        finish_moments(acc, q.eps, mean + s, rstd + s, var + s);
      }
    }
  }
  std::vector<double> wd, bd, coef;
  affine(w, b, C, wd, bd);
  const int64_t CB = given ? 1 : L.B;  // coefficient blocks: given statistics are the same for every block
  block_coefficients(q, CB, given, mean, rstd, wd, bd, coef);
  constexpr bool f32 = kFloatLanes<T>;
  std::vector<float> cf32(f32 ? CB * 4 * C : 0);  // per block: hi, lo, sc, bc (see run_apply)
  for (int64_t i = 0; i < (f32 ? CB : 0); ++i)
    for (int64_t c = 0; c < C; ++c) {
      const double* cf = coef.data() + i * 4 * C;
      float* f = cf32.data() + i * 4 * C;
      f[c] = static_cast<float>(cf[c]);
      f[C + c] = static_cast<float>(cf[c] - f[c]);
      f[2 * C + c] = static_cast<float>(cf[2 * C + c]);
      f[3 * C + c] = static_cast<float>(cf[3 * C + c]);
    }
  // NR rows from global row j, with block bl's coefficients
  auto rows = [&, slope](auto NR, int64_t j, int64_t bl) {
    const int64_t off = j * C;
    if constexpr (f32) {
      const float* f = cf32.data() + bl * 4 * C;
      row_apply_f<NR, A>(x + off, y + off, C, C, f, f + C, f + 2 * C, f + 3 * C, static_cast<float>(slope));
    } else {
      const double* cf = coef.data() + bl * 4 * C;
      row_apply<NR, T, A>(x + off, y + off, C, C, cf, cf + 2 * C, cf + 3 * C, slope);
    }
  };
  // Given statistics: the apply alone, elementwise, split over the threads (a row's bits depend only on whether it
  // is in a group of kRowGroup rows or in the remainder, so the split is in whole groups)
  if (given) {
    const int64_t total = L.B * L.RB, groups = (total + kRowGroup - 1) / kRowGroup;
    at::parallel_for(0, groups, std::max<int64_t>(1, kApplyGrain / (kRowGroup * C)), [&](int64_t lo, int64_t hi) {
      by_rows(lo * kRowGroup, std::min(hi * kRowGroup, total), [&](auto NR, int64_t j) { rows(NR, j, 0); });
    });
    return;
  }
  each_chunk(L.B * L.P, [&](int64_t ch) {
    const int64_t bl = ch / L.P, p = ch % L.P;
    by_rows(L.lo(p), L.hi(p), [&](auto NR, int64_t j) { rows(NR, bl * L.RB + j, bl); });
  });
}

template <typename T, int A>
void backward_rows(const Geometry& q, bool input_stats, const T* dy, const T* x, const T* w, const T* b,
                   const double* mean, const double* rstd, T* dx, double* dw, double* db) {
  const double slope = q.slope;
  const Rows L(q);
  const int64_t C = q.C(), G = q.G, K = q.K, m = q.m();
  std::vector<double> wd, bd, coef;
  affine(w, b, C, wd, bd);
  block_coefficients(q, L.B, !input_stats, mean, rstd, wd, bd, coef);
  // Per chunk and channel: sum dz, sum dz * xhat (db and dw; times w, the statistics' sums of dxhat, dxhat * xhat).
  std::vector<double> part(L.B * L.P * 2 * C, 0.0);
  constexpr bool f32 = kFloatLanes<T>;
  // float32: per block and channel hi, lo (the mean as two floats), rs, w, b; sums in float32 lanes, flushed to the
  // float64 partials every kFlush rows (as in rows_grad_sums_f32)
  std::vector<float> cf32(f32 ? L.B * 5 * C : 0);
  for (int64_t bl = 0; bl < (f32 ? L.B : 0); ++bl)
    for (int64_t c = 0; c < C; ++c) {
      const double* cf = coef.data() + bl * 4 * C;
      float* f = cf32.data() + bl * 5 * C;
      f[c] = static_cast<float>(cf[c]);
      f[C + c] = static_cast<float>(cf[c] - f[c]);
      f[2 * C + c] = static_cast<float>(cf[C + c]);
      f[3 * C + c] = static_cast<float>(wd[c]);
      f[4 * C + c] = static_cast<float>(bd[c]);
    }
  const float sl = static_cast<float>(slope);
  // a transcendental activation's dz = dy f'(z) is kept in dx by the sums' pass and read back by dx's, so that
  // f'(z) is computed once per value
  const bool keep_dz = f32 && kTranscendental<A> && dx && (input_stats || dw || db);
  if constexpr (f32) {
    if (input_stats || dw || db) {
      each_chunk(L.B * L.P, [&, sl](int64_t ch) {
        const int64_t bl = ch / L.P, p = ch % L.P;
        const float *hi = cf32.data() + bl * 5 * C, *lo = hi + C, *rs = hi + 2 * C, *wc = hi + 3 * C, *bc = hi + 4 * C;
        double* sdz = part.data() + ch * 2 * C;
        std::vector<float> fz(C, 0.0f), fzx(C, 0.0f);
        for (int64_t w0 = L.lo(p); w0 < L.hi(p); w0 += kFlush) {  // kFlush rows into float32 sums, then flushed
          by_rows(w0, std::min(w0 + kFlush, L.hi(p)), [&](auto NR, int64_t j) {
            const int64_t off = (bl * L.RB + j) * C;
            row_grad_sums_f<NR, A>(x + off, dy + off, keep_dz ? dx + off : nullptr, C, C, hi, lo, rs, wc, bc, sl,
                                   fz.data(), fzx.data());
          });
          for (int64_t c = 0; c < C; ++c) {
            sdz[c] += fz[c];
            sdz[C + c] += fzx[c];
            fz[c] = fzx[c] = 0.0f;
          }
        }
      });
      add_partials(part, L.B * L.P, C, dw, db);
    }
  } else if (input_stats || dw || db) {
    each_chunk(L.B * L.P, [&, slope](int64_t ch) {
      const int64_t bl = ch / L.P, p = ch % L.P;
      const double* cf = coef.data() + bl * 4 * C;
      double* sdz = part.data() + ch * 2 * C;
      by_rows(L.lo(p), L.hi(p), [&](auto NR, int64_t j) {
        const int64_t off = (bl * L.RB + j) * C;
        row_grad_sums<NR, T, A>(x + off, dy + off, C, C, cf, cf + C, wd.data(), bd.data(), slope, sdz, sdz + C);
      });
    });
    add_partials(part, L.B * L.P, C, dw, db);
  }
  if (!dx) return;
  // dx = rs * (dz * w - c1 - xhat * c2) with the statistic's c1 = E[dxhat], c2 = E[dxhat * xhat] (0: given ones)
  std::vector<double> cx(L.B * 2 * C, 0.0);
  if (input_stats) {
    for (int64_t bl = 0; bl < L.B; ++bl)
      for (int64_t g = 0; g < G; ++g) {
        double sdx = 0, sdxx = 0;
        for (int64_t p = 0; p < L.P; ++p)
          for (int64_t c = g * K; c < g * K + K; ++c) {
            sdx += wd[c] * part[(bl * L.P + p) * 2 * C + c];
            sdxx += wd[c] * part[(bl * L.P + p) * 2 * C + C + c];
          }
        for (int64_t c = g * K; c < g * K + K; ++c) {
          cx[bl * 2 * C + c] = sdx / m;
          cx[bl * 2 * C + C + c] = sdxx / m;
        }
      }
  }
  if constexpr (f32) {
    std::vector<float> cx32(cx.begin(), cx.end());
    each_chunk(L.B * L.P, [&, sl](int64_t ch) {
      const int64_t bl = ch / L.P, p = ch % L.P;
      const float *hi = cf32.data() + bl * 5 * C, *lo = hi + C, *rs = hi + 2 * C, *wc = hi + 3 * C, *bc = hi + 4 * C;
      const float *c1 = cx32.data() + bl * 2 * C, *c2 = c1 + C;
      by_rows(L.lo(p), L.hi(p), [&](auto NR, int64_t j) {
        const int64_t off = (bl * L.RB + j) * C;
        row_dx_f<NR, A>(x + off, dy + off, dx + off, C, C, hi, lo, rs, wc, bc, c1, c2, sl, keep_dz);
      });
    });
    return;
  }
  each_chunk(L.B * L.P, [&, slope](int64_t ch) {
    const int64_t bl = ch / L.P, p = ch % L.P;
    const double *cf = coef.data() + bl * 4 * C, *c1 = cx.data() + bl * 2 * C;
    by_rows(L.lo(p), L.hi(p), [&](auto NR, int64_t j) {
      const int64_t off = (bl * L.RB + j) * C;
      row_dx<NR, T, A>(x + off, dy + off, dx + off, C, C, cf, cf + C, wd.data(), bd.data(), c1, c1 + C, slope);
    });
  });
}

// ---- planes: contiguous (N, C, R) -----------------------------------------------------------------------------------
//
// Unit (n, g) is the K runs of R contiguous values x[n, g*K .. g*K+K-1, :]. Statistic n * G + g (g when pooled)
// reduces its units. When R == 1 (layer norm's rows) a unit is one row of K channels, run along the channels.

struct Planes {
  int64_t U, P;  // units (N * G), chunks
  explicit Planes(const Geometry& q) : U(q.N * q.G), P(chunks(q.N * q.G, q.K * q.R)) {}
  int64_t lo(int64_t p) const { return p * U / P; }
  int64_t hi(int64_t p) const { return (p + 1) * U / P; }
};

template <typename T, int A>
void forward_planes(const Geometry& q, bool given, const T* x, const T* w, const T* b, T* y, double* mean,
                    double* rstd, double* var) {
  const double slope = q.slope;
  const Planes L(q);
  const int64_t G = q.G, K = q.K, R = q.R, KR = K * R, C = q.C(), S = q.stats();
  const bool pool = q.pool;
  auto stat = [G, given, pool](int64_t u) { return given || pool ? u % G : u; };
  // The input's own per-sample statistics (layer, group, instance norm): a unit is its statistic's values, so each
  // unit's moments are taken and applied at once, while the unit is in cache. Pooled ones (batch norm) need every
  // sample's sums first: sums of d = x - shift per unit, then the merge, then the apply.
  const bool per_unit = !given && !pool;
  if (!given && pool) {
    std::vector<double> part(L.U * 2), shift(S);  // per unit: sum, sumsq; per statistic: its first value
    for (int64_t s = 0; s < S; ++s) shift[s] = x[s * KR];  // s = g (n = 0)
    each_chunk(L.P, [&](int64_t p) {
      for (int64_t u = L.lo(p); u < L.hi(p); ++u) {
        part[2 * u] = part[2 * u + 1] = 0;
        run_sums(x + u * KR, KR, shift[stat(u)], part[2 * u], part[2 * u + 1]);
      }
    });
    std::vector<double> acc(2 * S, 0.0);
    for (int64_t u = 0; u < L.U; ++u) {
      acc[2 * stat(u)] += part[2 * u];
      acc[2 * stat(u) + 1] += part[2 * u + 1];
    }
    for (int64_t s = 0; s < S; ++s)
      finish_stat(shift[s], acc[2 * s], acc[2 * s + 1], q.m(), q.eps, mean + s, rstd + s, var + s);
  }
  std::vector<double> wd, bd;
  affine(w, b, C, wd, bd);
  constexpr bool f32 = kFloatLanes<T>;
  // float32 copies for the float32 lanes of layer norm's rows (R == 1)
  const std::vector<float> wf = f32 && R == 1 ? as_float(wd) : std::vector<float>();
  const std::vector<float> bf = f32 && R == 1 ? as_float(bd) : std::vector<float>();
  const double eps = q.eps;
  each_chunk(L.P, [&, slope, eps](int64_t p) {
    for (int64_t u = L.lo(p); u < L.hi(p); ++u) {
      const int64_t s = stat(u), g = u % G;
      if (per_unit) finish_moments(run_moments(x + u * KR, KR), eps, mean + s, rstd + s, var + s);
      if (R == 1) {  // a row of K channels
        const T* __restrict xs = x + u * K;
        T* __restrict ys = y + u * K;
        if constexpr (f32) {  // float32 lanes, as run_apply
          const float hi = static_cast<float>(mean[s]), lo = static_cast<float>(mean[s] - hi);
          const float rs = static_cast<float>(rstd[s]), sl = static_cast<float>(slope);
          const float *wc = wf.data() + g * K, *bc = bf.data() + g * K;
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) ys[k] = act_fn_f<A>((xs[k] - hi - lo) * rs * wc[k] + bc[k], sl);
        } else {
          const double *wc = wd.data() + g * K, *bc = bd.data() + g * K, mu = mean[s], rs = rstd[s];
#pragma omp simd
          for (int64_t k = 0; k < K; ++k)
            ys[k] = static_cast<T>(act_fn<A>((static_cast<double>(xs[k]) - mu) * rs * wc[k] + bc[k], slope));
        }
        continue;
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = g * K + k, off = u * KR + k * R;
        run_apply<T, A>(x + off, y + off, R, mean[s], rstd[s] * wd[c], bd[c], slope);
      }
    }
  });
}

// Layer norm's backward sums for float32 rows (R == 1), in float32 lanes: per
// row its sums of w dz and w dz xhat (K values, 16 lanes), handed to done(u, sum w dz, sum w dz xhat) at once, and
// per channel its sums of dz and dz xhat over the rows, kept in float32 for at most kFlush rows and then added to
// the chunk's float64 partials, so that no float32 sum runs over more than kFlush values. The mean as hi + lo
// floats, as in run_apply.
template <int A, typename Stat, typename Done>
void rows_grad_sums_f32(const Planes& L, Stat stat, int64_t G, int64_t K, const float* x, const float* dy,
                        const double* mean, const double* rstd, const std::vector<float>& wf,
                        const std::vector<float>& bf, double slope, std::vector<double>& part, Done done) {
  const int64_t C = G * K;
  const float sl = static_cast<float>(slope);
  each_chunk(L.P, [&, sl](int64_t p) {
    double* sdz = part.data() + p * 2 * C;
    double* sdzx = sdz + C;
    std::vector<float> fz(C, 0.0f), fzx(C, 0.0f);
    int64_t rows = 0;
    for (int64_t u = L.lo(p); u < L.hi(p); ++u) {
      const int64_t s = stat(u), g = u % G;
      const float hi = static_cast<float>(mean[s]), lo = static_cast<float>(mean[s] - hi);
      const float r = static_cast<float>(rstd[s]);
      const float* __restrict xs = x + u * K;
      const float* __restrict dys = dy + u * K;
      const float* __restrict wc = wf.data() + g * K;
      const float* __restrict bc = bf.data() + g * K;
      float* __restrict pz = fz.data() + g * K;
      float* __restrict pzx = fzx.data() + g * K;
      float a = 0, c = 0;
#pragma omp simd reduction(+ : a, c)
      for (int64_t k = 0; k < K; ++k) {
        const float xhat = (xs[k] - hi - lo) * r;
        const float dz = dys[k] * act_grad_f<A>(xhat * wc[k] + bc[k], sl);
        pz[k] += dz;
        pzx[k] += dz * xhat;
        a += wc[k] * dz;
        c += wc[k] * dz * xhat;
      }
      done(u, a, c);
      if (++rows == kFlush || u + 1 == L.hi(p)) {
        for (int64_t i = 0; i < C; ++i) {
          sdz[i] += fz[i];
          sdzx[i] += fzx[i];
          fz[i] = fzx[i] = 0.0f;
        }
        rows = 0;
      }
    }
  });
}

template <typename T, int A>
void backward_planes(const Geometry& q, bool input_stats, const T* dy, const T* x, const T* w, const T* b,
                     const double* mean, const double* rstd, T* dx, double* dw, double* db) {
  const double slope = q.slope;
  const Planes L(q);
  const int64_t G = q.G, K = q.K, R = q.R, KR = K * R, C = q.C(), m = q.m();
  const int64_t S = input_stats ? q.stats() : G;
  const bool pool = q.pool;
  auto stat = [G, input_stats, pool](int64_t u) { return !input_stats || pool ? u % G : u; };
  std::vector<double> wd, bd;
  affine(w, b, C, wd, bd);
  constexpr bool f32 = kFloatLanes<T>;
  // float32 copies for the float32 lanes of layer norm's rows (R == 1)
  const std::vector<float> wf = f32 && R == 1 ? as_float(wd) : std::vector<float>();
  const std::vector<float> bf = f32 && R == 1 ? as_float(bd) : std::vector<float>();
  // dx of unit u from its statistic's c1 = E[dxhat], c2 = E[dxhat * xhat] (0 for given statistics)
  auto dx_unit = [&, slope](int64_t u, double c1, double c2) {
    const int64_t s = stat(u), g = u % G;
    const double mu = mean[s], rs = rstd[s];
    if (R == 1) {
      const T* __restrict xs = x + u * K;
      const T* __restrict dys = dy + u * K;
      T* __restrict dxs = dx + u * K;
      if constexpr (f32) {  // float32 lanes (the mean as hi + lo, as in run_apply)
        const float hi = static_cast<float>(mu), lo = static_cast<float>(mu - hi), r = static_cast<float>(rs);
        const float f1 = static_cast<float>(c1), f2 = static_cast<float>(c2), sl = static_cast<float>(slope);
        const float *wc = wf.data() + g * K, *bc = bf.data() + g * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          const float xhat = (xs[k] - hi - lo) * r;
          const float dz = dys[k] * act_grad_f<A>(xhat * wc[k] + bc[k], sl);
          dxs[k] = r * (dz * wc[k] - f1 - xhat * f2);
        }
      } else {
        const double *wc = wd.data() + g * K, *bc = bd.data() + g * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          double xhat;
          const double dz = dz_at<A>(xs[k], dys[k], mu, rs, wc[k], bc[k], slope, xhat);
          dxs[k] = static_cast<T>(rs * (dz * wc[k] - c1 - xhat * c2));
        }
      }
      return;
    }
    for (int64_t k = 0; k < K; ++k) {
      const int64_t c = g * K + k, off = u * KR + k * R;
      run_dx<T, A>(x + off, dy + off, dx + off, R, mu, rs, wd[c], bd[c], c1, c2, slope);
    }
  };
  // The input's own per-sample statistics (layer, group, instance norm): a unit is one statistic, so its dx follows
  // its sums at once, while the unit is in cache. Otherwise the units' sums are merged per statistic first.
  const bool per_unit = input_stats && !pool;
  std::vector<double> unit(per_unit ? 0 : L.U * 2, 0.0);  // per unit: sum dxhat, sum dxhat * xhat
  auto done = [&](int64_t u, double sdx, double sdxx) {
    if (!per_unit) {
      unit[2 * u] = sdx;
      unit[2 * u + 1] = sdxx;
    } else if (dx) {
      dx_unit(u, sdx / m, sdxx / m);
    }
  };
  // per chunk and channel: sum dz, sum dz * xhat
  std::vector<double> part(L.P * 2 * C, 0.0);
  if (input_stats || dw || db) {
    bool summed = false;
    if constexpr (f32) {
      if (R == 1) {  // float32 rows of K channels (layer norm): the sums in float32 lanes, see rows_grad_sums_f32
        rows_grad_sums_f32<A>(L, stat, G, K, x, dy, mean, rstd, wf, bf, slope, part, done);
        summed = true;
      }
    }
    if (!summed) each_chunk(L.P, [&, slope](int64_t p) {
      double* sdz = part.data() + p * 2 * C;
      double* sdzx = sdz + C;
      for (int64_t u = L.lo(p); u < L.hi(p); ++u) {
        const int64_t s = stat(u), g = u % G;
        const double mu = mean[s], rs = rstd[s];
        double sdx = 0, sdxx = 0;
        if (R == 1) {  // a row of K channels: per channel sums and the row's weighted ones in one loop
          const T *xs = x + u * K, *dys = dy + u * K;
          const double *wc = wd.data() + g * K, *bc = bd.data() + g * K;
          double *pz = sdz + g * K, *pzx = sdzx + g * K;
#pragma omp simd reduction(+ : sdx, sdxx)
          for (int64_t k = 0; k < K; ++k) {
            double xhat;
            const double dz = dz_at<A>(xs[k], dys[k], mu, rs, wc[k], bc[k], slope, xhat);
            pz[k] += dz;
            pzx[k] += dz * xhat;
            sdx += wc[k] * dz;
            sdxx += wc[k] * dz * xhat;
          }
        } else {
          for (int64_t k = 0; k < K; ++k) {
            const int64_t c = g * K + k, off = u * KR + k * R;
            double a1 = 0, a2 = 0;
            run_grad_sums<T, A>(x + off, dy + off, R, mu, rs, wd[c], bd[c], slope, a1, a2);
            sdz[c] += a1;
            sdzx[c] += a2;
            sdx += wd[c] * a1;
            sdxx += wd[c] * a2;
          }
        }
        done(u, sdx, sdxx);
      }
    });
    add_partials(part, L.P, C, dw, db);
  }
  if (!dx || per_unit) return;
  std::vector<double> cx(2 * S, 0.0);
  if (input_stats) {
    for (int64_t u = 0; u < L.U; ++u) {
      cx[2 * stat(u)] += unit[2 * u];
      cx[2 * stat(u) + 1] += unit[2 * u + 1];
    }
    for (int64_t i = 0; i < 2 * S; ++i) cx[i] /= m;
  }
  each_chunk(L.P, [&](int64_t p) {
    for (int64_t u = L.lo(p); u < L.hi(p); ++u) dx_unit(u, cx[2 * stat(u)], cx[2 * stat(u) + 1]);
  });
}

// Fold the batch's statistics into the running buffers (G,), in place, unless they are not finite: per-sample
// statistics averaged over the batch first, the variance made unbiased (m / (m - 1)), factor = momentum, or
// 1 / (num_batches_tracked + 1) when momentum < 0 (the cumulative average).
template <typename U>
void running_update(const Geometry& q, const double* mean, const double* var, U* rm, U* rv, int64_t* nbt,
                    int64_t* nskipped, double momentum) {
  const int64_t rows = q.pool ? 1 : q.N, m = q.m();
  const double unbias = static_cast<double>(m) / static_cast<double>(std::max<int64_t>(m - 1, 1));
  std::vector<double> bm(q.G), bv(q.G);
  bool finite = true;
  for (int64_t g = 0; g < q.G; ++g) {
    double sm = 0, sv = 0;
    for (int64_t n = 0; n < rows; ++n) {
      sm += mean[n * q.G + g];
      sv += var[n * q.G + g];
    }
    bm[g] = sm / rows;
    bv[g] = sv / rows * unbias;
    // in the buffers' dtype: a finite variance whose float32 rounding overflows is kept out too
    finite = finite && std::isfinite(static_cast<U>(bm[g])) && std::isfinite(static_cast<U>(bv[g]));
  }
  if (!finite) {
    if (nskipped != nullptr) *nskipped += 1;
    return;
  }
  const double f = momentum >= 0 ? momentum : 1.0 / static_cast<double>(*nbt + 1);
  if (nbt != nullptr) *nbt += 1;
  for (int64_t g = 0; g < q.G; ++g) {  // in float64: a float32 (batch - old) would round away a small variance
    const double old_mean = rm[g], old_var = rv[g];
    rm[g] = static_cast<U>(old_mean + f * (bm[g] - old_mean));
    rv[g] = static_cast<U>(old_var + f * (bv[g] - old_var));
  }
}

// The activation applied before the norm (placement "after"): a = f(x) is one elementwise pass before the norm's
// loops (which then run without an activation), and dx = da * f'(x) one after the backward's. Both elementwise in
// x's dtype, as torch's activation followed by its norm.
template <typename T>
Tensor activation_of(const Tensor& x, int64_t act, double slope) {
  Tensor a = at::empty_like(x);
  const T* xp = x.data_ptr<T>();
  T* ap = a.data_ptr<T>();
  with_act(act, [&](auto A) {
    at::parallel_for(0, x.numel(), kGrain, [&, slope](int64_t lo, int64_t hi) {
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) {
        if constexpr (kFloatLanes<T>) ap[i] = act_fn_f<A>(xp[i], static_cast<float>(slope));
        else ap[i] = static_cast<T>(act_fn<A>(xp[i], slope));
      }
    });
  });
  return a;
}

template <typename T>
void times_activation_grad(Tensor& dx, const Tensor& x, int64_t act, double slope) {
  const T* xp = x.data_ptr<T>();
  T* dp = dx.data_ptr<T>();
  with_act(act, [&](auto A) {
    at::parallel_for(0, x.numel(), kGrain, [&, slope](int64_t lo, int64_t hi) {
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) {
        if constexpr (kFloatLanes<T>) dp[i] *= act_grad_f<A>(xp[i], static_cast<float>(slope));
        else dp[i] = static_cast<T>(dp[i] * act_grad<A>(xp[i], slope));
      }
    });
  });
}

// The forward as ATen's differentiable ops on the (N, G, K, R) view, for double backward.
Tensor composite(const Geometry& q, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& given_mean,
                 const Tensor& given_var) {
  auto f = [&](const Tensor& v) -> Tensor {
    switch (q.act) {
      case RELU: return at::relu(v);
      case LEAKY_RELU: return at::leaky_relu(v, q.slope);
      case SIGMOID: return at::sigmoid(v);
      case TANH: return at::tanh(v);
      case SILU: return at::silu(v);
      case GELU: return at::gelu(v);
      default: return v;
    }
  };
  const Tensor a = q.act_first ? f(x) : x;
  const Tensor a4 = a.reshape({q.N, q.G, q.K, q.R});
  Tensor xhat;
  if (given_mean.defined()) {
    xhat = (a4 - given_mean.reshape({1, q.G, 1, 1})) * at::rsqrt(given_var.reshape({1, q.G, 1, 1}) + q.eps);
  } else {
    Tensor shift = a4.detach().narrow(2, 0, 1).narrow(3, 0, 1);
    if (q.pool) shift = shift.narrow(0, 0, 1);
    const std::vector<int64_t> dims = q.pool ? std::vector<int64_t>{0, 2, 3} : std::vector<int64_t>{2, 3};
    const Tensor d = a4 - shift;
    const Tensor dc = d - d.mean(dims, true);
    xhat = dc * at::rsqrt((dc * dc).mean(dims, true) + q.eps);
  }
  Tensor z = xhat;
  if (w.defined()) z = z * w.reshape({1, q.G, q.K, 1});
  if (b.defined()) z = z + b.reshape({1, q.G, q.K, 1});
  return (q.act_first ? z : f(z)).reshape(x.sizes());
}

Geometry geometry(const std::vector<int64_t>& view, bool pool, bool channels_last, double eps, int64_t act,
                  double slope, bool act_first) {
  return Geometry{view[0], view[1], view[2], view[3], channels_last, pool, eps, act, slope, act_first};
}

using Opt = c10::optional<Tensor>;

Tensor get(const Opt& t) { return t.has_value() ? *t : Tensor(); }

// The forward: y, and the float64 mean and rstd (the statistics', or the given ones) the backward reads.
// x: (N, C, *S) contiguous or channels_last (channels_last), or (*B, *D) contiguous (layer norm's view);
// w, b: (G*K,) or undefined; given_mean, given_var: (G,) or undefined (then the input's own statistics, folded into
// running_mean, running_var (G,) when defined); num_batches_tracked, num_skipped: scalar long or undefined.
std::tuple<Tensor, Tensor, Tensor> forward_all(const Tensor& x, const Tensor& w, const Tensor& b,
                                               const Tensor& given_mean, const Tensor& given_var,
                                               const Tensor& running_mean, const Tensor& running_var,
                                               const Tensor& num_batches_tracked, const Tensor& num_skipped,
                                               const std::vector<int64_t>& view, bool pool, bool channels_last,
                                               double eps, double momentum, int64_t act, double slope,
                                               bool act_first) {
  const Geometry q = geometry(view, pool, channels_last, eps, act, slope, act_first);
  const bool input_stats = !given_mean.defined();
  TORCH_CHECK(!running_mean.defined() || momentum >= 0 || num_batches_tracked.defined(),
              "momentum=None (cumulative average) needs num_batches_tracked");
  TORCH_CHECK(view.size() == 4 && view[0] * view[1] * view[2] * view[3] == x.numel(), "view ", view,
              " does not match an input of ", x.numel(), " values");
  for (const Tensor* t : {&w, &b})
    TORCH_CHECK(!t->defined() || t->numel() == q.C(), "weight and bias need ", q.C(), " values, got ", t->numel());
  for (const Tensor* t : {&given_mean, &given_var, &running_mean, &running_var})
    TORCH_CHECK(!t->defined() || t->numel() == q.G, "statistics need ", q.G, " values, got ", t->numel());
  const int64_t S = input_stats ? q.stats() : q.G;
  Tensor y = at::empty_like(x);
  // float64 statistics: they never leave this node, and the apply and the backward subtract the mean unrounded
  Tensor mean = at::empty({S}, x.options().dtype(at::kDouble)), rstd = at::empty({S}, x.options().dtype(at::kDouble));
  std::vector<double> var(input_stats ? S : 0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normlab_native_forward", [&] {
    using T = scalar_t;
    double *mp = mean.data_ptr<double>(), *rp = rstd.data_ptr<double>();
    if (!input_stats) {  // given statistics (G,): mean as given, rstd from the given variance
      const T *gm = given_mean.data_ptr<T>(), *gv = given_var.data_ptr<T>();
      for (int64_t g = 0; g < q.G; ++g) {
        mp[g] = gm[g];
        rp[g] = 1.0 / std::sqrt(static_cast<double>(gv[g]) + q.eps);
      }
    }
    const T* wp = w.defined() ? w.data_ptr<T>() : nullptr;
    const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
    const Tensor a = act_first ? activation_of<T>(x, act, slope) : x;
    with_act(act_first ? NONE : act, [&](auto A) {
      if (q.rows())
        forward_rows<T, A>(q, !input_stats, a.data_ptr<T>(), wp, bp, y.data_ptr<T>(), mp, rp, var.data());
      else
        forward_planes<T, A>(q, !input_stats, a.data_ptr<T>(), wp, bp, y.data_ptr<T>(), mp, rp, var.data());
    });
    if (input_stats && running_mean.defined()) {
      int64_t* nbt = num_batches_tracked.defined() ? num_batches_tracked.data_ptr<int64_t>() : nullptr;
      int64_t* skipped = num_skipped.defined() ? num_skipped.data_ptr<int64_t>() : nullptr;
      AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "normlab_native_running", [&] {
        running_update<scalar_t>(q, mp, var.data(), running_mean.data_ptr<scalar_t>(),
                                    running_var.data_ptr<scalar_t>(), nbt, skipped, momentum);
      });
    }
  });
  return {y, mean, rstd};
}

// Whether the node saves y = f(z) for the backward: sigmoid and tanh placed after the norm, whose f'(z) is a
// function of y (as torch's sigmoid and tanh save their output), so the backward takes no exp or tanh; z itself is
// never saved.
inline bool saves_output(int64_t act, bool act_first) { return !act_first && (act == SIGMOID || act == TANH); }

// dz = dy * f'(z) from y = f(z), in torch's order: sigmoid dy * (1 - y) * y, tanh dy * (1 - y * y). dy and y: the
// same layout.
template <typename T>
Tensor grad_from_output(const Tensor& dy, const Tensor& y, int64_t act) {
  Tensor dz = at::empty_like(dy);
  const T *g = dy.data_ptr<T>(), *yp = y.data_ptr<T>();
  T* d = dz.data_ptr<T>();
  at::parallel_for(0, dy.numel(), kGrain, [&](int64_t lo, int64_t hi) {
    if (act == SIGMOID) {
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) d[i] = g[i] * (T(1) - yp[i]) * yp[i];
    } else {
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) d[i] = g[i] * (T(1) - yp[i] * yp[i]);
    }
  });
  return dz;
}

// The backward: (dx, dw, db), each undefined where not needed (w, b: undefined when absent). y: the output, where
// saves_output (else undefined).
tensor_list backward_all(const Geometry& q, const Tensor& dy_, const Tensor& x, const Tensor& w, const Tensor& b,
                         const Tensor& mean, const Tensor& rstd, const Tensor& given_mean, const Tensor& given_var,
                         const Tensor& y, bool need_x, bool need_w, bool need_b) {
  tensor_list out(3);
  need_w = need_w && w.defined();
  need_b = need_b && b.defined();
  if (torch::autograd::GradMode::is_enabled()) {  // a graph of the gradient is wanted: differentiate ATen's ops
    tensor_list inputs;
    if (need_x) inputs.push_back(x);
    if (need_w) inputs.push_back(w);
    if (need_b) inputs.push_back(b);
    const Tensor recomputed = composite(q, x, w, b, given_mean, given_var);
    auto g = torch::autograd::grad({recomputed}, inputs, {dy_}, true, true, true);
    size_t i = 0;
    if (need_x) out[0] = g[i++];
    if (need_w) out[1] = g[i++];
    if (need_b) out[2] = g[i++];
    return out;
  }
  const auto format = x.suggest_memory_format();
  const Tensor dy = dy_.contiguous(format);
  const int64_t C = q.C();
  Tensor dx = need_x ? at::empty_like(x) : Tensor();
  Tensor dw = need_w ? at::empty_like(w) : Tensor(), db = need_b ? at::empty_like(b) : Tensor();
  std::vector<double> dwv(need_w ? C : 0, 0.0), dbv(need_b ? C : 0, 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normlab_native_backward", [&] {
    using T = scalar_t;
    const T* wp = w.defined() ? w.data_ptr<T>() : nullptr;
    const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
    T* dxp = need_x ? dx.data_ptr<T>() : nullptr;
    double *dwp = need_w ? dwv.data() : nullptr, *dbp = need_b ? dbv.data() : nullptr;
    const Tensor a = q.act_first ? activation_of<T>(x, q.act, q.slope) : x;
    // with y saved, the loops see dz (and no activation)
    const Tensor dz = y.defined() ? grad_from_output<T>(dy, y.contiguous(format), q.act) : dy;
    with_act(q.act_first || y.defined() ? NONE : q.act, [&](auto A) {
      if (q.rows())
        backward_rows<T, A>(q, !given_mean.defined(), dz.data_ptr<T>(), a.data_ptr<T>(), wp, bp,
                            mean.data_ptr<double>(), rstd.data_ptr<double>(), dxp, dwp, dbp);
      else
        backward_planes<T, A>(q, !given_mean.defined(), dz.data_ptr<T>(), a.data_ptr<T>(), wp, bp,
                              mean.data_ptr<double>(), rstd.data_ptr<double>(), dxp, dwp, dbp);
    });
    if (q.act_first && need_x) times_activation_grad<T>(dx, x, q.act, q.slope);
    for (int64_t c = 0; c < (need_w ? C : 0); ++c) dw.data_ptr<T>()[c] = static_cast<T>(dwv[c]);
    for (int64_t c = 0; c < (need_b ? C : 0); ++c) db.data_ptr<T>()[c] = static_cast<T>(dbv[c]);
  });
  out[0] = dx;
  out[1] = dw;
  out[2] = db;
  return out;
}

// The autograd node, written as ATen's generated nodes are: the saved variables and the geometry are members. (A
// torch::autograd::Function keeps them in a map of names to IValues and wraps each of the 17 arguments: 4-5 µs more
// per step on a (60, 100) batch.) Its inputs are x, w, b; given statistics are constants of the backward. Under
// compiled autograd it is one opaque call in the graph, as a C++ Function is.
struct NormBackward : public torch::autograd::Node {
  using Saved = torch::autograd::SavedVariable;
  Saved x_, w_, b_, mean_, rstd_, given_mean_, given_var_, y_;  // y_: where saves_output
  Geometry q;

  std::string name() const override { return "NormBackward"; }

  std::array<Saved*, 7> saved() { return {&x_, &w_, &b_, &mean_, &rstd_, &given_mean_, &given_var_}; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (Saved* v : saved()) v->reset_data();
    y_.reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined()) return tensor_list(3);  // no gradient reached y: none leaves
    return backward_all(q, grads[0], x_.unpack(), w_.unpack(), b_.unpack(), mean_.unpack(), rstd_.unpack(),
                        given_mean_.unpack(), given_var_.unpack(), y_.unpack(getptr()), task_should_compute_output(0),
                        task_should_compute_output(1), task_should_compute_output(2));
  }

  // ---- compiled autograd: the cache key, and the node as a function of its saved values (as CppNode does)
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(name());
    for (const Saved* v : {&x_, &w_, &b_, &mean_, &rstd_, &given_mean_, &given_var_}) args.collect(*v, false);
    args.collect(y_, true);
    for (int64_t v : {q.N, q.G, q.K, q.R, q.act}) args.collect(v);
    for (bool v : {q.channels_last, q.pool, q.act_first}) args.collect(v);
    for (double v : {q.eps, q.slope}) args.collect(v);
  }

  torch::autograd::variable_list apply_with_saved(const torch::autograd::variable_list& inputs,
                                                  torch::dynamo::autograd::SwapSavedVariables& swap) override {
    namespace ca = torch::dynamo::autograd;
    for (Saved* v : saved()) swap.before(*v);
    swap.before(y_);
    ca::PackedArgs packed;
    for (Saved* v : saved()) packed.pack(v->unpack());
    packed.pack(y_.unpack(getptr()));
    packed.pack(std::vector<bool>{task_should_compute_output(0), task_should_compute_output(1),
                                  task_should_compute_output(2)});
    packed.pack(std::vector<int64_t>{q.N, q.G, q.K, q.R, q.channels_last, q.pool, q.act, q.act_first});
    packed.pack(std::vector<double>{q.eps, q.slope});
    const auto args = std::move(packed).vec();
    std::vector<at::TypePtr> schema;
    for (const auto& a : args) schema.push_back(a.isTensor() ? at::TensorType::get() : a.type());
    const auto& py = ca::getPyCompilerInterface();
    const auto fn = py->bind_function(swap.get_py_compiler(), name(), &functional, schema, true, false);
    const auto meta = ca::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
        ca::get_input_metadata(next_edges()));
    auto out = py->call_function(swap.get_py_compiler(), "apply_functional", fn, inputs, args, meta);
    for (Saved* v : saved()) swap.after(*v);
    swap.after(y_);
    return out;
  }

  static torch::autograd::variable_list functional(const torch::autograd::variable_list& grads,
                                                   const std::vector<c10::IValue>& args) {
    namespace ca = torch::dynamo::autograd;
    ca::PackedArgs packed(args);
    std::array<Tensor, 8> t;
    for (Tensor& v : t) v = packed.unpack<Tensor>();
    const auto need = packed.unpack<std::vector<bool>>();
    const auto i = packed.unpack<std::vector<int64_t>>();
    const auto d = packed.unpack<std::vector<double>>();
    const Geometry g{i[0], i[1], i[2], i[3], i[4] != 0, i[5] != 0, d[0], i[6], d[1], i[7] != 0};
    if (!grads[0].defined()) return tensor_list(3);
    return backward_all(g, grads[0], t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], need[0], need[1], need[2]);
  }
};

// A read-only argument on the CPU, contiguous (a copy, differentiable, only where it is not).
Opt cpu_contiguous(const Opt& t, const char* name) {
  if (!t) return t;
  TORCH_CHECK(t->is_cpu(), "normlab's native CPU norm: expected ", name, " on the CPU (as the input), got it on ",
              t->device());
  return t->contiguous();
}

Tensor norm(const Tensor& x, const Opt& w_, const Opt& b_, const Opt& given_mean_, const Opt& given_var_,
            const Opt& running_mean, const Opt& running_var, const Opt& num_batches_tracked, const Opt& num_skipped,
            std::vector<int64_t> view, bool pool, bool channels_last, double eps, double momentum, int64_t act,
            double slope, bool act_first) {
  const Opt w = cpu_contiguous(w_, "weight"), b = cpu_contiguous(b_, "bias");
  const Opt given_mean = cpu_contiguous(given_mean_, "the given mean");
  const Opt given_var = cpu_contiguous(given_var_, "the given variance");
  for (const Opt* t : {&running_mean, &running_var, &num_batches_tracked, &num_skipped})  // updated in place
    TORCH_CHECK(!*t || ((*t)->is_cpu() && (*t)->is_contiguous()),
                "normlab's native CPU norm: expected contiguous running buffers on the CPU, got one on ",
                (*t)->device());
  const bool grad = torch::autograd::GradMode::is_enabled() &&
                    (x.requires_grad() || (w && w->requires_grad()) || (b && b->requires_grad()));
  if (!grad)  // nothing to differentiate: no node, nothing saved
    return std::get<0>(forward_all(x, get(w), get(b), get(given_mean), get(given_var), get(running_mean),
                                   get(running_var), get(num_batches_tracked), get(num_skipped), view, pool,
                                   channels_last, eps, momentum, act, slope, act_first));
  // as torch::autograd::Function::apply does: no torch.func transform, no forward-mode AD
  if (const auto& functorch = at::functorch::functorchTLSAccessor()) functorch->checkSupportsCppAutogradFunction();
  for (const Tensor* t : {&x, w ? &*w : nullptr, b ? &*b : nullptr})
    TORCH_CHECK(!t || !t->_fw_grad(0).defined(), "normlab's native CPU norm has no forward-mode AD (jvp)");
  Tensor y, mean, rstd;
  {
    torch::autograd::AutoGradMode no_grad(false);
    std::tie(y, mean, rstd) = forward_all(x, get(w), get(b), get(given_mean), get(given_var), get(running_mean),
                                          get(running_var), get(num_batches_tracked), get(num_skipped), view, pool,
                                          channels_last, eps, momentum, act, slope, act_first);
  }
  auto node = c10::make_intrusive<NormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, w, b));
  node->x_ = torch::autograd::SavedVariable(x, false);
  node->w_ = torch::autograd::SavedVariable(get(w), false);
  node->b_ = torch::autograd::SavedVariable(get(b), false);
  node->mean_ = torch::autograd::SavedVariable(mean, false);
  node->rstd_ = torch::autograd::SavedVariable(rstd, false);
  node->given_mean_ = torch::autograd::SavedVariable(get(given_mean), false);
  node->given_var_ = torch::autograd::SavedVariable(get(given_var), false);
  node->q = geometry(view, pool, channels_last, eps, act, slope, act_first);
  torch::autograd::set_history(y, node);
  if (saves_output(act, act_first)) node->y_ = torch::autograd::SavedVariable(y, true);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("norm", &norm, "normlab's native CPU norm (see normlab.native)");
}
