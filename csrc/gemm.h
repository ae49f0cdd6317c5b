// Row-major fp32 tile GEMM on top of the BLAS that libtorch already carries (MKL or OpenBLAS export the
// Fortran symbol sgemm_). The symbol is declared weak: when a torch build does not export it, the
// wrapper falls back to at::addmm_out on tensors viewing the same memory (correct, slower per call).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// C entry of mkl_set_num_threads_local (mkl_service.h maps the lowercase name, a Fortran by-pointer entry, here)
extern "C" int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));

namespace causal_attn_cpu {

inline bool have_blas() { return sgemm_ != nullptr; }

// Inside an at::parallel_for task every tile GEMM must run on the calling thread. MKL does not notice
// that it is called from an OpenMP team and opens a nested one per call (measured: 2 threads ran 5-15x
// slower than 1 on a busy machine); this guard pins MKL to one thread for the task's scope.
struct SingleThreadedBlas {
  int previous = 0;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
};

// C (M x N, leading dim ldc) = alpha * op(A) op(B) + beta * C, all row-major;
// op(A) is M x K (A stored K x M when trans_a), op(B) is K x N (B stored N x K when trans_b).
inline void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                    int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (sgemm_ != nullptr) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto view = [&](const float* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    at::Tensor x = at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, opts);
    return t ? x.t() : x;
  };
  at::Tensor a = view(A, trans_a ? K : M, trans_a ? M : K, lda, trans_a);
  at::Tensor b = view(B, trans_b ? N : K, trans_b ? K : N, ldb, trans_b);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == 0.0f) c.zero_();
  at::addmm_out(c, c, a, b, beta == 0.0f ? 1.0f : beta, alpha);
}

}  // namespace causal_attn_cpu
