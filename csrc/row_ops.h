// Row-wise elementwise kernels of the fused attention: masked online softmax, mass from packed bits,
// backward dS. Written as plain loops that the compiler vectorises (reductions through
// `#pragma omp simd reduction`, which needs -fopenmp-simd only, no OpenMP runtime); on x86-64 each entry point is
// compiled for AVX-512, AVX2+FMA and baseline SSE2 and picked at load time (target_clones), so the
// library carries no -march flag and still runs on any x86-64 CPU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CA_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CA_MULTIVERSION
#endif

namespace causal_attn_cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for float, Cephes-style: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial,
// 2^n assembled in the exponent bits. Relative error ~2 ulp; x < -87.3 (including -inf) gives 0.
static inline float fast_exp(float x) {
  const float lo = -87.33654f, hi = 88.3762626647949f;
  float xc = x < lo ? lo : (x > hi ? hi : x);
  // round-to-nearest of x / ln2 with the 1.5 * 2^23 trick (valid for |x / ln2| < 2^22)
  const float magic = 12582912.0f;
  float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  float y = p * two_n;
  return x < lo ? 0.0f : y;
}

// Masks one score row in place: columns < n_lo (before the row's segment), columns >= n_causal and
// padded keys (kpm[c] == 0) become -inf (0 <= n_lo <= n_causal <= n_total). Returns the row maximum over
// the remaining columns (-inf if none).
CA_MULTIVERSION
float mask_and_max(float* s, int64_t n_lo, int64_t n_causal, int64_t n_total, const uint8_t* kpm) {
  for (int64_t c = 0; c < n_lo; ++c) s[c] = kNegInf;
  if (kpm != nullptr) {
    for (int64_t c = n_lo; c < n_causal; ++c) s[c] = kpm[c] ? s[c] : kNegInf;
  }
  for (int64_t c = n_causal; c < n_total; ++c) s[c] = kNegInf;
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t c = n_lo; c < n_causal; ++c) m = s[c] > m ? s[c] : m;
  return m;
}

// s[c] <- exp(s[c] - shift) over n32 columns (a multiple of 32; masked -inf columns give 0). Returns the
// row sum; with ``words`` (the packed adjacency row, column 0 of s at bit 0 of words[0]) also stores
// sum of s[c] * A[c] in *mass_sum.
CA_MULTIVERSION
float exp_shift_sum(float* s, int64_t n32, float shift, const int32_t* words, float* mass_sum) {
  // 32 lane-wise partial sums, reduced once at the end (a reduction per 32-column word costs as much
  // as its exponentials)
  float acc[32] = {}, macc[32] = {};
  for (int64_t base = 0; base < n32; base += 32) {
    const uint32_t word = words ? static_cast<uint32_t>(words[base >> 5]) : 0u;
    float* x = s + base;
#pragma omp simd
    for (int c = 0; c < 32; ++c) {
      const float e = fast_exp(x[c] - shift);
      x[c] = e;
      acc[c] += e;
      macc[c] += ((word >> c) & 1u) ? e : 0.0f;
    }
  }
  float sum = 0.0f, msum = 0.0f;
#pragma omp simd reduction(+ : sum, msum)
  for (int c = 0; c < 32; ++c) {
    sum += acc[c];
    msum += macc[c];
  }
  if (words) *mass_sum = msum;
  return sum;
}

// x[c] *= a over n columns.
CA_MULTIVERSION
void scale_row(float* x, int64_t n, float a) {
  for (int64_t c = 0; c < n; ++c) x[c] *= a;
}

// x[c] += y[c] over n columns.
CA_MULTIVERSION
void add_row(float* x, const float* y, int64_t n) {
  for (int64_t c = 0; c < n; ++c) x[c] += y[c];
}

// sum over c < n of a[c] * b[c] (fp32 accumulation).
CA_MULTIVERSION
float dot_row(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += a[c] * b[c];
  return sum;
}

// Backward, in place: dp[c] <- p[c] * (dp[c] + g * A[c] - delta) over n32 columns (a multiple of 32);
// ``words`` is the packed adjacency row aligned with column 0, or nullptr (no mass term).
CA_MULTIVERSION
void softmax_grad_row(const float* p, float* dp, int64_t n32, float delta, float g, const int32_t* words) {
  for (int64_t base = 0; base < n32; base += 32) {
    const uint32_t word = words ? static_cast<uint32_t>(words[base >> 5]) : 0u;
    float* d = dp + base;
    const float* pp = p + base;
#pragma omp simd
    for (int c = 0; c < 32; ++c) {
      const float a = ((word >> c) & 1u) ? g : 0.0f;
      d[c] = pp[c] * (d[c] + a - delta);
    }
  }
}

}  // namespace causal_attn_cpu
