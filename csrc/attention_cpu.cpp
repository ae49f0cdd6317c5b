// Fused CPU attention with causal mass (SPEC §2), flash style, no T x T buffer.
//
// Forward: one task per (batch, query head, block of BQ query rows), run with at::parallel_for. For each
// key block of BK columns left of the diagonal: S = scale Q K^T (BLAS), mask (causal, key padding),
// online softmax with running max m, sum l and mass accumulator macc (rescaled like l), O += P V (BLAS).
// At the end O /= l, mass = macc / l, LSE = m + log l (+inf and zeros on rows without keys).
//
// Packed sequences (seg_start, int32 (B, T), non-decreasing, seg_start[i] <= i): row i sees keys
// seg_start[i] <= j <= i only. A query block's key tiles start at its first row's segment start (rounded
// down to a packed word), and each key tile runs its GEMMs on the rows that can see one of its keys only
// (causal: i >= j0; segment: seg_start[i] < j0 + bk, a prefix of the block), so the work follows the sum of
// squared segment lengths instead of T^2. Masked entries give P = 0, so the skipped rows and tiles would
// have contributed nothing.
//
// Backward (issue 27): one of two decompositions, chosen from the shape alone (plan_backward), never from the
// thread count, so the result is bitwise the same at any thread count (every task owns its output rows: no
// atomics, no partial sums):
//   single pass (B * Hkv >= kSplitBelow): one task per (batch, kv head); for each query head of the GQA group
//           in order and each query block: delta, P, dS, then dV += P^T dO, dK += scale dS^T Q, dQ += scale dS K
//           (five tile GEMMs).
//   split (fewer (batch, kv head) pairs, e.g. a batch-1 sequence), three passes:
//     delta:  delta_i = rowsum(dO_i * O_i) + g_i * mass_i, per row.
//     dK/dV:  one task per (batch, kv head, block of `key_block` keys): for each query head of the GQA group
//             and each chunk of QC query rows at or below the block, recompute P = exp(S - LSE),
//             dS = P (dO V^T + g * A - delta), then dV += P^T dO, dK += scale dS^T Q.
//     dQ:     one task per (batch, query head, block of BQ query rows): per key tile recompute P and dS,
//             dQ += scale dS K. (P and dS twice: seven tile GEMMs, ~1.4x the single pass's work.)
//   The key block is chosen from the shape alone too, so a batch-1 sequence still yields many tasks.
//
// Inputs other than fp32 with unit last stride are converted to fp32 once; accumulation is fp32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <ctime>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gemm.h"
#include "row_ops.h"

namespace causal_attn_cpu {
namespace {

constexpr int64_t BQ = 64;   // query rows per tile
constexpr int64_t BK = 256;  // key columns per tile (multiple of 32: tiles start on packed-word bounds)

// fp32 view with unit stride along D and a row stride BLAS accepts as leading dimension (>= D; an
// expanded or overlapping T axis is copied); converts (copies) only when needed.
at::Tensor as_f32_rows(const at::Tensor& x) {
  at::Tensor y = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  return (y.stride(3) == 1 && y.stride(2) >= y.size(3)) ? y : y.contiguous();
}

// Strided fp32 matrix rows of one (batch, head): row t starts at base + t * ld.
struct Rows {
  const float* base;
  int64_t ld;
  const float* row(int64_t t) const { return base + t * ld; }
};

Rows head_rows(const at::Tensor& x, int64_t b, int64_t h) {
  return {x.data_ptr<float>() + b * x.stride(0) + h * x.stride(1), x.stride(2)};
}

struct Problem {
  int64_t B, Hq, Hkv, G, T, D, W;
  float scale;
  const int32_t* packed;  // (B, T, W) or nullptr
  const uint8_t* kpm;     // (B, T) or nullptr
  const int32_t* seg;     // (B, T) segment start of each row, or nullptr (one segment)
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& packed,
                     const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& seg_start,
                     double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "q and k must be (B, H, T, D)");
  Problem p{q.size(0), q.size(1), k.size(1), 0, q.size(2), q.size(3), (q.size(2) + 31) / 32,
            static_cast<float>(scale), nullptr, nullptr, nullptr};
  TORCH_CHECK(p.Hkv > 0 && p.Hq % p.Hkv == 0, "Hq must be a multiple of Hkv");
  p.G = p.Hq / p.Hkv;
  if (packed.has_value()) {
    const auto& a = *packed;
    TORCH_CHECK(a.scalar_type() == at::kInt && a.is_contiguous() && a.dim() == 3 && a.size(0) == p.B &&
                    a.size(1) == p.T && a.size(2) == p.W,
                "packed adjacency must be contiguous int32 (B, T, ceil(T/32))");
    p.packed = a.data_ptr<int32_t>();
  }
  if (kpm.has_value()) {
    const auto& m = *kpm;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.is_contiguous() && m.size(0) == p.B && m.size(1) == p.T,
                "key_padding_mask must be contiguous bool (B, T)");
    p.kpm = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  }
  if (seg_start.has_value()) {
    const auto& s = *seg_start;
    TORCH_CHECK(s.device().is_cpu(), "seg_start must be a CPU tensor, got one on ", s.device());
    TORCH_CHECK(s.scalar_type() == at::kInt, "seg_start must be int32, got ", s.scalar_type());
    TORCH_CHECK(s.dim() == 2 && s.size(0) == p.B && s.size(1) == p.T, "seg_start must have shape (B, T) = (", p.B,
                ", ", p.T, "), got ", s.sizes());
    TORCH_CHECK(s.is_contiguous(), "seg_start must be contiguous");
    p.seg = s.data_ptr<int32_t>();
    // The tiles below index keys from seg_start: an out-of-range value would read outside the inputs.
    for (int64_t b = 0; b < p.B; ++b) {
      const int32_t* row = p.seg + b * p.T;
      for (int64_t i = 0; i < p.T; ++i) {
        TORCH_CHECK(row[i] >= 0 && row[i] <= i && (i == 0 || row[i] >= row[i - 1]),
                    "seg_start must be non-decreasing along a row with 0 <= seg_start[b, i] <= i; row ", b,
                    " position ", i, " has ", row[i], i > 0 ? " after " : "", i > 0 ? std::to_string(row[i - 1]) : "");
      }
    }
  }
  return p;
}

// First key column the query block starting at row i0 reads: its first row's segment start (the block's
// smallest, seg_start is non-decreasing) rounded down to a packed word; 0 without segments.
int64_t first_key(const Problem& P, int64_t b, int64_t i0) {
  return P.seg ? (static_cast<int64_t>(P.seg[b * P.T + i0]) & ~int64_t{31}) : 0;
}

// Rows [r0, r1) (relative to i0) of query block [i0, i1) that may see a key of tile [j0, j0 + bk): causal
// rows i >= j0, and rows whose segment starts before the tile ends (a prefix: seg_start is non-decreasing).
// Empty (r0 >= r1) when no row can.
std::pair<int64_t, int64_t> tile_rows(const Problem& P, int64_t b, int64_t i0, int64_t i1, int64_t j0, int64_t bk) {
  const int64_t r0 = std::max<int64_t>(0, j0 - i0);
  int64_t r1 = i1 - i0;
  if (P.seg) {
    const int32_t* seg = P.seg + b * P.T + i0;
    while (r1 > r0 && seg[r1 - 1] >= j0 + bk) --r1;
  }
  return {r0, r1};
}

// Query block of a task index: consecutive tasks alternate between short (early) and long (late) blocks
// so that the contiguous task ranges at::parallel_for hands each thread carry similar causal work.
int64_t balanced_block(int64_t t, int64_t nblocks) {
  return (t % 2 == 0) ? t / 2 : nblocks - 1 - t / 2;
}

// Row kernels work on whole 32-column groups (one packed word each); score rows have that room.
int64_t round_up32(int64_t n) { return (n + 31) & ~int64_t{31}; }

// 64-byte aligned fp32 scratch. MKL may choose its code path by the operands' alignment; a result that
// depended on where malloc put a thread's buffer would break the bitwise thread-count invariance.
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : p_(static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>((n * 4 + 63) & ~int64_t{63}))), &std::free) {
    TORCH_CHECK(p_ != nullptr, "out of memory allocating ", n, " floats of attention scratch");
  }
  float* data() const { return p_.get(); }

 private:
  std::unique_ptr<float, decltype(&std::free)> p_;
};

// CPU time of the calling thread: unlike wall time it leaves out the moments another process had the core.
double thread_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Runs task(t) for t in [0, n) with at::parallel_for (contiguous chunks, one per thread); state() makes the
// per-chunk scratch. With `seconds`, task t's thread CPU time is stored in seconds[t] (benchmarks/sim_threads.py).
template <class State, class Task>
void run_tasks(int64_t n, double* seconds, State state, Task task) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas one_thread;
    auto buf = state();
    for (int64_t t = begin; t < end; ++t) {
      if (seconds == nullptr) {
        task(t, buf);
        continue;
      }
      const double t0 = thread_seconds();
      task(t, buf);
      seconds[t] = thread_seconds() - t0;
    }
  });
}

// S (bq x bk, row stride ld >= round_up32(bk)) = scale Q[i0:i1] K[j0:j0+bk]^T with the keys a row may not
// see (past the diagonal, before its segment, padded) and the tail up to whole 32-column words set to -inf;
// rowmax[r] gets row r's max.
void masked_scores(const Problem& P, const Rows& Q, const Rows& K, int64_t b, int64_t i0, int64_t i1, int64_t j0,
                   int64_t bk, float* S, int64_t ld, float* rowmax) {
  const uint8_t* kpm = P.kpm ? P.kpm + b * P.T + j0 : nullptr;
  const int32_t* seg = P.seg ? P.seg + b * P.T : nullptr;
  gemm_rm(false, true, i1 - i0, bk, P.D, P.scale, Q.row(i0), Q.ld, K.row(j0), K.ld, 0.0f, S, ld);
  for (int64_t r = 0; r < i1 - i0; ++r) {
    const int64_t n = std::clamp<int64_t>(i0 + r - j0 + 1, 0, bk);
    const int64_t lo = seg ? std::clamp<int64_t>(seg[i0 + r] - j0, 0, n) : 0;
    rowmax[r] = mask_and_max(S + r * ld, lo, n, round_up32(bk), kpm);
  }
}

// P = exp(S - LSE) in place on a tile from masked_scores (rows without keys have LSE = +inf: P = 0).
void probabilities(float* S, int64_t ld, int64_t bq, int64_t bk, const float* lse) {
  for (int64_t r = 0; r < bq; ++r) exp_shift_sum(S + r * ld, round_up32(bk), lse[r], nullptr, nullptr);
}

// ------------------------------------------------------------------------------------------- forward
struct ForwardBuffers {
  Scratch S, m, l, macc, rowmax;
  ForwardBuffers() : S(BQ * BK), m(BQ), l(BQ), macc(BQ), rowmax(BQ) {}
};

void forward_task(const Problem& P, const Rows& Q, const Rows& K, const Rows& V, float* O, float* lse,
                  float* mass, int64_t b, int64_t i0, int64_t i1, ForwardBuffers& buf) {
  const int64_t bq = i1 - i0, D = P.D;
  float *S = buf.S.data(), *m = buf.m.data(), *l = buf.l.data(), *macc = buf.macc.data();
  const int32_t* adj = P.packed ? P.packed + b * P.T * P.W : nullptr;
  std::fill(O, O + bq * D, 0.0f);
  std::fill(m, m + bq, kNegInf);
  std::fill(l, l + bq, 0.0f);
  std::fill(macc, macc + bq, 0.0f);
  for (int64_t j0 = first_key(P, b, i0); j0 < i1; j0 += BK) {
    const int64_t bk = std::min(BK, i1 - j0);
    const auto [r0, r1] = tile_rows(P, b, i0, i1, j0, bk);  // the other rows see no key of this tile
    if (r0 >= r1) continue;
    masked_scores(P, Q, K, b, i0 + r0, i0 + r1, j0, bk, S + r0 * BK, BK, buf.rowmax.data() + r0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = i0 + r;
      float* s = S + r * BK;
      const float m_new = std::max(m[r], buf.rowmax.data()[r]);
      if (m_new == kNegInf) {  // no key for this row yet: P row is zero, nothing to rescale
        std::fill(s, s + bk, 0.0f);
        continue;
      }
      const float alpha = fast_exp(m[r] - m_new);
      float msum = 0.0f;
      const float rowsum = exp_shift_sum(s, round_up32(bk), m_new, adj ? adj + i * P.W + j0 / 32 : nullptr, &msum);
      if (alpha != 1.0f) scale_row(O + r * D, D, alpha);
      l[r] = l[r] * alpha + rowsum;
      macc[r] = macc[r] * alpha + msum;
      m[r] = m_new;
    }
    gemm_rm(false, false, r1 - r0, D, bk, 1.0f, S + r0 * BK, BK, V.row(j0), V.ld, 1.0f, O + r0 * D, D);
  }
  for (int64_t r = 0; r < bq; ++r) {
    if (l[r] > 0.0f) {
      scale_row(O + r * D, D, 1.0f / l[r]);
      lse[r] = m[r] + std::log(l[r]);
      if (mass) mass[r] = macc[r] / l[r];
    } else {
      std::fill(O + r * D, O + (r + 1) * D, 0.0f);
      lse[r] = std::numeric_limits<float>::infinity();
      if (mass) mass[r] = 0.0f;
    }
  }
}

// attn_map[b, i, :] += weight * sum over heads of P[b, h, i, :], one task per (batch, query block) so
// that no two threads write the same map rows. P is recomputed from the saved LSE.
void accumulate_map(const Problem& P, const at::Tensor& q, const at::Tensor& k, const float* lse,
                    at::Tensor& attn_map, float weight) {
  const int64_t nqb = (P.T + BQ - 1) / BQ;
  float* map = attn_map.data_ptr<float>();
  run_tasks(P.B * nqb, nullptr, [] { return std::pair<Scratch, Scratch>(BQ * BK, BQ); }, [&](int64_t t, auto& buf) {
    float *S = buf.first.data(), *rowmax = buf.second.data();
    const int64_t b = t / nqb, i0 = (t % nqb) * BQ, i1 = std::min(P.T, i0 + BQ);
    for (int64_t h = 0; h < P.Hq; ++h) {
      const float* L = lse + (b * P.Hq + h) * P.T + i0;
      for (int64_t j0 = first_key(P, b, i0); j0 < i1; j0 += BK) {
        const int64_t bk = std::min(BK, i1 - j0);
        const auto [r0, r1] = tile_rows(P, b, i0, i1, j0, bk);
        if (r0 >= r1) continue;
        masked_scores(P, head_rows(q, b, h), head_rows(k, b, h / P.G), b, i0 + r0, i0 + r1, j0, bk, S + r0 * BK, BK,
                      rowmax + r0);
        probabilities(S + r0 * BK, BK, r1 - r0, bk, L + r0);
        for (int64_t r = r0; r < r1; ++r) {
          float* s = S + r * BK;
          const int64_t n = std::clamp<int64_t>(i0 + r - j0 + 1, 0, bk);
          scale_row(s, n, weight);
          float* dst = map + (b * P.T + i0 + r) * P.T + j0;
          for (int64_t c = 0; c < n; ++c) dst[c] += s[c];
        }
      }
    }
  });
}

int64_t forward_tasks(const Problem& P) { return P.B * P.Hq * ((P.T + BQ - 1) / BQ); }

// out, lse, mass (allocated by the caller); with `seconds` (forward_tasks(P) doubles) each task's time.
void forward_pass(const Problem& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, float* out_p,
                  float* lse_p, float* mass_p, double* seconds) {
  const int64_t nqb = (P.T + BQ - 1) / BQ;
  run_tasks(forward_tasks(P), seconds, [] { return ForwardBuffers(); }, [&](int64_t t, ForwardBuffers& buf) {
    const int64_t bh = t / nqb, b = bh / P.Hq, h = bh % P.Hq;
    const int64_t i0 = balanced_block(t % nqb, nqb) * BQ, i1 = std::min(P.T, i0 + BQ);
    const int64_t row0 = bh * P.T + i0;
    forward_task(P, head_rows(q, b, h), head_rows(k, b, h / P.G), head_rows(v, b, h / P.G), out_p + row0 * P.D,
                 lse_p + row0, mass_p ? mass_p + row0 : nullptr, b, i0, i1, buf);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& packed,
    const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& seg_start, double scale,
    const std::optional<at::Tensor>& attn_map, double attn_map_weight) {
  const at::Tensor q = as_f32_rows(q_in), k = as_f32_rows(k_in), v = as_f32_rows(v_in);
  const Problem P = make_problem(q, k, packed, kpm, seg_start, scale);
  TORCH_CHECK(P.D <= 1024, "head dim above 1024 is not supported by the C++ backend");
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({P.B, P.Hq, P.T, P.D}, f32);
  at::Tensor lse = at::empty({P.B, P.Hq, P.T}, f32);
  at::Tensor mass = P.packed ? at::empty({P.B, P.Hq, P.T}, f32) : at::empty({0}, f32);
  forward_pass(P, q, k, v, out.data_ptr<float>(), lse.data_ptr<float>(), P.packed ? mass.data_ptr<float>() : nullptr,
               nullptr);
  if (attn_map.has_value()) {
    at::Tensor map = *attn_map;
    TORCH_CHECK(map.scalar_type() == at::kFloat && map.is_contiguous() && map.numel() == P.B * P.T * P.T,
                "attn_map must be a contiguous float32 (B, T, T) tensor");
    accumulate_map(P, q, k, lse.data_ptr<float>(), map, static_cast<float>(attn_map_weight));
  }
  if (q_in.scalar_type() != at::kFloat) out = out.to(q_in.scalar_type());
  return {out, lse, mass};
}

// ------------------------------------------------------------------------------------------ backward
constexpr int64_t QC = 256;          // query rows per tile of the dK/dV pass
constexpr int64_t kMinTasks = 256;   // dK/dV tasks the key block is chosen to reach (8 per thread at 32 threads)
// (batch, kv head) pairs from which the single-pass backward is used. It is the cheapest per FLOP (five tile
// GEMMs against the split's seven) but has only B * Hkv tasks; 8 keep a laptop or small workstation busy
// (a batch of 4 with 2 kv heads, or SmolLM2's 3 kv heads from batch 3). Below it, e.g. a batch-1 SmolLM2
// sequence (3 tasks), the split's many small tasks win from a few threads on. A function of the shape only:
// choosing by thread count would make dK, dV depend on it.
constexpr int64_t kSplitBelow = 8;

// The backward's task decomposition, a function of the shape only (never of the thread count).
struct BackwardPlan {
  bool split;          // three-pass split; otherwise single pass, one task per (batch, kv head)
  int64_t key_block;   // keys per dK/dV task: 128, 64 or 32, the largest giving kMinTasks tasks (else 32)
  int64_t key_blocks;  // per (batch, kv head)
  int64_t dkdv_tasks;  // B * Hkv * key_blocks
  int64_t query_blocks;
  int64_t dq_tasks;    // B * Hq * query_blocks (BQ rows each)
};

BackwardPlan plan_backward(int64_t B, int64_t Hq, int64_t Hkv, int64_t T) {
  BackwardPlan p{};
  p.split = B * Hkv < kSplitBelow;
  for (int64_t kb : {128, 64, 32}) {
    p.key_block = kb;
    if (B * Hkv * ((T + kb - 1) / kb) >= kMinTasks) break;
  }
  p.key_blocks = (T + p.key_block - 1) / p.key_block;
  p.dkdv_tasks = B * Hkv * p.key_blocks;
  p.query_blocks = (T + BQ - 1) / BQ;
  p.dq_tasks = B * Hq * p.query_blocks;
  return p;
}

// One (batch, query head) of the backward's inputs.
struct HeadGrad {
  Rows Q, K, V, dO;
  const float *lse, *delta, *gmass;  // (T,) each; gmass nullptr without the mass term
};

// P and dS of query rows [a0, a1) against keys [j0, j0 + bk) into S and dS (row stride ld):
// P = exp(S - LSE), dS = P (dO V^T + g * A - delta).
void probs_and_grad(const Problem& P, const HeadGrad& H, int64_t b, int64_t a0, int64_t a1, int64_t j0, int64_t bk,
                    float* S, float* dS, int64_t ld, float* rowmax) {
  const int64_t n = a1 - a0;
  const int32_t* adj = (P.packed && H.gmass) ? P.packed + b * P.T * P.W : nullptr;
  masked_scores(P, H.Q, H.K, b, a0, a1, j0, bk, S, ld, rowmax);
  probabilities(S, ld, n, bk, H.lse + a0);
  gemm_rm(false, true, n, bk, P.D, 1.0f, H.dO.row(a0), H.dO.ld, H.V.row(j0), H.V.ld, 0.0f, dS, ld);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t i = a0 + r;
    softmax_grad_row(S + r * ld, dS + r * ld, round_up32(bk), H.delta[i], adj ? H.gmass[i] : 0.0f,
                     adj ? adj + i * P.W + j0 / 32 : nullptr);
  }
}

// End of the query rows that can see a key of [j0, j0 + bk): rows i >= j0 whose segment starts before the
// block ends (seg_start is non-decreasing, so they form a range).
int64_t last_query_row(const Problem& P, int64_t b, int64_t j0, int64_t bk) {
  if (!P.seg) return P.T;
  const int32_t* seg = P.seg + b * P.T;
  return std::lower_bound(seg + j0, seg + P.T, static_cast<int32_t>(j0 + bk)) - seg;
}

struct GradBuffers {
  Scratch S, dS, rowmax;
  GradBuffers(int64_t rows, int64_t cols) : S(rows * cols), dS(rows * cols), rowmax(rows) {}
};

// dK, dV rows [j0, j0 + bk) of kv head hk: every query head of the group, every query row that sees them.
void dkdv_task(const Problem& P, const BackwardPlan& plan, const std::vector<HeadGrad>& heads, int64_t b, int64_t hk,
               int64_t j0, int64_t bk, float* dK, float* dV, GradBuffers& buf) {
  const int64_t ld = plan.key_block, D = P.D;
  std::fill(dK, dK + bk * D, 0.0f);
  std::fill(dV, dV + bk * D, 0.0f);
  const int64_t i_end = last_query_row(P, b, j0, bk);
  for (int64_t h = hk * P.G; h < (hk + 1) * P.G; ++h) {
    const HeadGrad& H = heads[b * P.Hq + h];
    for (int64_t a0 = j0; a0 < i_end; a0 += QC) {
      const int64_t n = std::min(QC, i_end - a0);
      probs_and_grad(P, H, b, a0, a0 + n, j0, bk, buf.S.data(), buf.dS.data(), ld, buf.rowmax.data());
      gemm_rm(true, false, bk, D, n, 1.0f, buf.S.data(), ld, H.dO.row(a0), H.dO.ld, 1.0f, dV, D);
      gemm_rm(true, false, bk, D, n, P.scale, buf.dS.data(), ld, H.Q.row(a0), H.Q.ld, 1.0f, dK, D);
    }
  }
}

// dQ rows [i0, i1) of one query head: every key tile left of the diagonal.
void dq_task(const Problem& P, const HeadGrad& H, int64_t b, int64_t i0, int64_t i1, float* dQ, GradBuffers& buf) {
  std::fill(dQ, dQ + (i1 - i0) * P.D, 0.0f);
  for (int64_t j0 = first_key(P, b, i0); j0 < i1; j0 += BK) {
    const int64_t bk = std::min(BK, i1 - j0);
    const auto [r0, r1] = tile_rows(P, b, i0, i1, j0, bk);  // the other rows have P = 0 on this tile
    if (r0 >= r1) continue;
    float *S = buf.S.data() + r0 * BK, *dS = buf.dS.data() + r0 * BK;
    probs_and_grad(P, H, b, i0 + r0, i0 + r1, j0, bk, S, dS, BK, buf.rowmax.data() + r0);
    gemm_rm(false, false, r1 - r0, P.D, bk, P.scale, dS, BK, H.K.row(j0), H.K.ld, 1.0f, dQ + r0 * P.D, P.D);
  }
}

// Single-pass backward of one query block [i0, i1) of one query head: delta, then per key tile P, dS and
// dQ rows (zeroed here), adding into the kv head's whole dK, dV (T x D).
void single_pass_block(const Problem& P, const HeadGrad& H, const Rows& O, const float* mass, int64_t b, int64_t i0,
                       int64_t i1, float* dQ, float* dK, float* dV, GradBuffers& buf, float* delta) {
  const int64_t D = P.D;
  for (int64_t i = i0; i < i1; ++i) {
    delta[i] = dot_row(H.dO.row(i), O.row(i), D) + (H.gmass ? H.gmass[i] * mass[i] : 0.0f);
  }
  std::fill(dQ, dQ + (i1 - i0) * D, 0.0f);
  for (int64_t j0 = first_key(P, b, i0); j0 < i1; j0 += BK) {
    const int64_t bk = std::min(BK, i1 - j0);
    const auto [r0, r1] = tile_rows(P, b, i0, i1, j0, bk);  // the other rows have P = 0 on this tile
    if (r0 >= r1) continue;
    const int64_t n = r1 - r0, a0 = i0 + r0;
    float *S = buf.S.data() + r0 * BK, *dS = buf.dS.data() + r0 * BK;
    probs_and_grad(P, H, b, a0, i0 + r1, j0, bk, S, dS, BK, buf.rowmax.data() + r0);
    gemm_rm(true, false, bk, D, n, 1.0f, S, BK, H.dO.row(a0), H.dO.ld, 1.0f, dV + j0 * D, D);
    gemm_rm(false, false, n, D, bk, P.scale, dS, BK, H.K.row(j0), H.K.ld, 1.0f, dQ + r0 * D, D);
    gemm_rm(true, false, bk, D, n, P.scale, dS, BK, H.Q.row(a0), H.Q.ld, 1.0f, dK + j0 * D, D);
  }
}

// Per-task seconds of the backward's passes (benchmarks/sim_threads.py); all nullptr in training.
struct BackwardTimes {
  double *delta = nullptr, *dkdv = nullptr, *dq = nullptr;  // split
  double* single = nullptr;                                  // single pass
};

void backward_passes(const Problem& P, const BackwardPlan& plan, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& o, const at::Tensor& dout, const float* lse,
                     const float* mass, const float* gmass, float* dq, float* dk, float* dv, BackwardTimes times) {
  std::vector<float> delta(P.B * P.Hq * P.T);
  std::vector<HeadGrad> heads;
  for (int64_t bh = 0; bh < P.B * P.Hq; ++bh) {
    const int64_t b = bh / P.Hq, h = bh % P.Hq;
    heads.push_back({head_rows(q, b, h), head_rows(k, b, h / P.G), head_rows(v, b, h / P.G), head_rows(dout, b, h),
                     lse + bh * P.T, delta.data() + bh * P.T, gmass ? gmass + bh * P.T : nullptr});
  }
  const int64_t nqb = plan.query_blocks;
  if (!plan.split) {  // one task per (batch, kv head): the group's query heads in order, query blocks in order
    run_tasks(P.B * P.Hkv, times.single, [] { return GradBuffers(BQ, BK); }, [&](int64_t t, GradBuffers& buf) {
      const int64_t b = t / P.Hkv, hk = t % P.Hkv;
      float *dK = dk + t * P.T * P.D, *dV = dv + t * P.T * P.D;
      std::fill(dK, dK + P.T * P.D, 0.0f);
      std::fill(dV, dV + P.T * P.D, 0.0f);
      for (int64_t bh = b * P.Hq + hk * P.G; bh < b * P.Hq + (hk + 1) * P.G; ++bh) {
        for (int64_t i0 = 0; i0 < P.T; i0 += BQ) {
          single_pass_block(P, heads[bh], head_rows(o, b, bh % P.Hq), mass ? mass + bh * P.T : nullptr, b, i0,
                            std::min(P.T, i0 + BQ), dq + (bh * P.T + i0) * P.D, dK, dV, buf, delta.data() + bh * P.T);
        }
      }
    });
    return;
  }
  // delta = rowsum(dO * O) + g * mass: one task per (batch, query head, query block)
  run_tasks(P.B * P.Hq * nqb, times.delta, [] { return 0; }, [&](int64_t t, int) {
    const int64_t bh = t / nqb, b = bh / P.Hq, h = bh % P.Hq;
    const Rows O = head_rows(o, b, h), dO = heads[bh].dO;
    for (int64_t i = (t % nqb) * BQ; i < std::min(P.T, (t % nqb + 1) * BQ); ++i) {
      delta[bh * P.T + i] = dot_row(dO.row(i), O.row(i), P.D) + (gmass ? gmass[bh * P.T + i] * mass[bh * P.T + i] : 0.0f);
    }
  });
  // dK, dV: consecutive tasks alternate short (late) and long (early) key blocks, as the forward does
  const int64_t nkb = plan.key_blocks;
  run_tasks(plan.dkdv_tasks, times.dkdv, [&] { return GradBuffers(QC, plan.key_block); },
            [&](int64_t t, GradBuffers& buf) {
              const int64_t bhk = t / nkb, b = bhk / P.Hkv, hk = bhk % P.Hkv;
              const int64_t j0 = balanced_block(t % nkb, nkb) * plan.key_block, bk = std::min(plan.key_block, P.T - j0);
              const int64_t row0 = bhk * P.T + j0;
              dkdv_task(P, plan, heads, b, hk, j0, bk, dk + row0 * P.D, dv + row0 * P.D, buf);
            });
  run_tasks(plan.dq_tasks, times.dq, [] { return GradBuffers(BQ, BK); }, [&](int64_t t, GradBuffers& buf) {
    const int64_t bh = t / nqb, b = bh / P.Hq;
    const int64_t i0 = balanced_block(t % nqb, nqb) * BQ, i1 = std::min(P.T, i0 + BQ);
    dq_task(P, heads[bh], b, i0, i1, dq + (bh * P.T + i0) * P.D, buf);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, const at::Tensor& mass_in, const at::Tensor& dout_in,
    const std::optional<at::Tensor>& dmass_in, const std::optional<at::Tensor>& packed,
    const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& seg_start, double scale) {
  const at::Tensor q = as_f32_rows(q_in), k = as_f32_rows(k_in), v = as_f32_rows(v_in);
  const at::Tensor o = as_f32_rows(out_in), dout = as_f32_rows(dout_in);
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  const Problem P = make_problem(q, k, packed, kpm, seg_start, scale);
  const bool use_mass = P.packed != nullptr && dmass_in.has_value() && mass_in.numel() > 0;
  at::Tensor mass, gmass;
  if (use_mass) {
    mass = mass_in.to(at::kFloat).contiguous();
    gmass = dmass_in->to(at::kFloat).contiguous();
  }
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty({P.B, P.Hq, P.T, P.D}, f32);
  at::Tensor dk = at::empty({P.B, P.Hkv, P.T, P.D}, f32);  // every row is written by one task
  at::Tensor dv = at::empty({P.B, P.Hkv, P.T, P.D}, f32);
  backward_passes(P, plan_backward(P.B, P.Hq, P.Hkv, P.T), q, k, v, o, dout, lse.data_ptr<float>(), use_mass ? mass.data_ptr<float>() : nullptr,
                  use_mass ? gmass.data_ptr<float>() : nullptr, dq.data_ptr<float>(), dk.data_ptr<float>(),
                  dv.data_ptr<float>(), {});
  auto cast = [](const at::Tensor& x, const at::Tensor& like) {
    return like.scalar_type() == at::kFloat ? x : x.to(like.scalar_type());
  };
  return {cast(dq, q_in), cast(dk, k_in), cast(dv, v_in)};
}

// The backward chosen for a shape, the task counts of the kernel's parallel passes (forward, then the
// backward's: split [delta, dK/dV, dQ], single pass [one per (batch, kv head)]) and the keys per dK/dV task
// (T for the single pass, whose tasks cover every key).
std::tuple<std::string, std::vector<int64_t>, int64_t> plan_tasks(int64_t B, int64_t Hq, int64_t Hkv, int64_t T) {
  TORCH_CHECK(B > 0 && Hkv > 0 && Hq % Hkv == 0 && T > 0, "plan needs B, T > 0 and Hq a multiple of Hkv > 0");
  const BackwardPlan p = plan_backward(B, Hq, Hkv, T);
  const int64_t fwd = B * Hq * ((T + BQ - 1) / BQ);
  if (!p.split) return {"single", {fwd, B * Hkv}, T};
  return {"split", {fwd, B * Hq * p.query_blocks, p.dkdv_tasks, p.dq_tasks}, p.key_block};
}

// Forward then backward (the path plan_tasks chooses), serially timed per task, in the order at::parallel_for
// hands the tasks out: forward seconds and one float64 tensor per backward pass, as plan_tasks counts them.
// For benchmarks/sim_threads.py (run it at 1 thread). `backward` = "auto" (the shape's choice), "split" or
// "single" forces one, so the simulation can compare both on any shape; the kernel itself never does.
std::tuple<at::Tensor, std::vector<at::Tensor>> task_seconds(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& dout_in,
    const std::optional<at::Tensor>& dmass_in, const std::optional<at::Tensor>& packed,
    const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& seg_start, double scale,
    c10::string_view backward) {
  const at::Tensor q = as_f32_rows(q_in), k = as_f32_rows(k_in), v = as_f32_rows(v_in), dout = as_f32_rows(dout_in);
  const Problem P = make_problem(q, k, packed, kpm, seg_start, scale);
  TORCH_CHECK(v.sizes() == k.sizes() && dout.sizes() == q.sizes(), "task_seconds: v must have k's shape ",
              k.sizes(), " and dout q's shape ", q.sizes(), "; got ", v.sizes(), " and ", dout.sizes());
  TORCH_CHECK(!dmass_in.has_value() || dmass_in->sizes() == at::IntArrayRef({P.B, P.Hq, P.T}),
              "task_seconds: dmass must have shape (B, Hq, T) = (", P.B, ", ", P.Hq, ", ", P.T, ")");
  TORCH_CHECK(backward == "auto" || backward == "split" || backward == "single",
              "task_seconds: backward must be \"auto\", \"split\" or \"single\", got \"", backward, "\"");
  BackwardPlan plan = plan_backward(P.B, P.Hq, P.Hkv, P.T);
  if (backward != "auto") plan.split = backward == "split";
  auto f32 = q.options().dtype(at::kFloat), f64 = q.options().dtype(at::kDouble);
  at::Tensor out = at::empty({P.B, P.Hq, P.T, P.D}, f32), lse = at::empty({P.B, P.Hq, P.T}, f32);
  at::Tensor mass = at::empty({P.B, P.Hq, P.T}, f32);
  at::Tensor gmass = (P.packed && dmass_in.has_value()) ? dmass_in->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor fwd = at::empty({forward_tasks(P)}, f64);
  std::vector<at::Tensor> passes;
  BackwardTimes times;
  if (plan.split) {
    passes = {at::empty({P.B * P.Hq * plan.query_blocks}, f64), at::empty({plan.dkdv_tasks}, f64),
              at::empty({plan.dq_tasks}, f64)};
    times = {passes[0].data_ptr<double>(), passes[1].data_ptr<double>(), passes[2].data_ptr<double>(), nullptr};
  } else {
    passes = {at::empty({P.B * P.Hkv}, f64)};
    times.single = passes[0].data_ptr<double>();
  }
  forward_pass(P, q, k, v, out.data_ptr<float>(), lse.data_ptr<float>(), mass.data_ptr<float>(),
               fwd.data_ptr<double>());
  at::Tensor dq = at::empty_like(out), dk = at::empty({P.B, P.Hkv, P.T, P.D}, f32), dv = at::empty_like(dk);
  backward_passes(P, plan, q, k, v, out, dout, lse.data_ptr<float>(), mass.data_ptr<float>(),
                  gmass.defined() ? gmass.data_ptr<float>() : nullptr, dq.data_ptr<float>(), dk.data_ptr<float>(),
                  dv.data_ptr<float>(), times);
  return {fwd, passes};
}

}  // namespace
}  // namespace causal_attn_cpu

// Read from the file, without loading it, by causal_attn/cpp_build.py (built_with_torch, built_from_sources):
// a library built against another torch, or from other sources than the ones installed beside it (an old
// prebuilt with an old operator schema), is rebuilt instead of loaded. CAUSAL_ATTN_SOURCES is the hash of
// csrc/ that cpp_build.compile_args passes as -DCAUSAL_ATTN_SOURCES=<hash>.
#ifndef CAUSAL_ATTN_SOURCES
#define CAUSAL_ATTN_SOURCES unknown
#endif
#define CAUSAL_ATTN_STR2(x) #x
#define CAUSAL_ATTN_STR(x) CAUSAL_ATTN_STR2(x)
extern "C" __attribute__((used, visibility("default"))) const char causal_attn_cpp_build_info[] =
    "causal_attn_cpp built with torch " TORCH_VERSION "; sources " CAUSAL_ATTN_STR(CAUSAL_ATTN_SOURCES) ";";

TORCH_LIBRARY(causal_attn_cpp, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor? packed, Tensor? key_padding_mask, "
        "Tensor? seg_start, float scale, Tensor(a!)? attn_map, float attn_map_weight) -> (Tensor, Tensor, Tensor)");
  m.def("backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor mass, Tensor dout, "
        "Tensor? dmass, Tensor? packed, Tensor? key_padding_mask, Tensor? seg_start, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("has_blas() -> bool", []() { return causal_attn_cpu::have_blas(); });
  m.def("plan(int batch, int q_heads, int kv_heads, int seq_len) -> (str, int[], int)", &causal_attn_cpu::plan_tasks);
  m.def("task_seconds(Tensor q, Tensor k, Tensor v, Tensor dout, Tensor? dmass, Tensor? packed, "
        "Tensor? key_padding_mask, Tensor? seg_start, float scale, str backward=\"auto\") -> (Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(causal_attn_cpp, CPU, m) {
  m.impl("forward", &causal_attn_cpu::attention_forward);
  m.impl("backward", &causal_attn_cpu::attention_backward);
  m.impl("task_seconds", &causal_attn_cpu::task_seconds);
}
