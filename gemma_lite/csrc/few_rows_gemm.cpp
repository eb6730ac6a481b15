// A few fp32 activation rows times a tall fp32 matrix, reading the matrix once:
//
//   out[n, o] = sum_i x[n, i] * weight[o, i]      x (N, I), weight (O, I), N <= 16
//
// The products of a speculative round's verification pass (gemma_lite/kernels.py,
// few_rows_product). The CPU's sgemm reads a matrix at a third of the memory's
// bandwidth for 2-16 rows, the 262,144-row head worst; here each weight row
// is loaded once and multiplied by all N activation rows, which stay in L1. Rows
// are shared among the OpenMP threads (gemma_lite/native.py builds this file).
#include <immintrin.h>
#include <torch/extension.h>

#include <array>
#include <utility>

namespace {

constexpr int64_t kMaxRows = 16;

inline float lane_sum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_hadd_ps(r, r);
  r = _mm_hadd_ps(r, r);
  return _mm_cvtss_f32(r);
}

// N is a template parameter so that the N accumulators live in registers.
template <int N>
void rows_times_matrix(const float* xp, const float* wp, float* op, int64_t I, int64_t O) {
#pragma omp parallel for schedule(static, 64)
  for (int64_t o = 0; o < O; ++o) {
    const float* w = wp + o * I;
    __m256 acc[N];
    for (int n = 0; n < N; ++n) acc[n] = _mm256_setzero_ps();
    for (int64_t i = 0; i < I; i += 8) {
      const __m256 wv = _mm256_loadu_ps(w + i);
      for (int n = 0; n < N; ++n) acc[n] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp + n * I + i), acc[n]);
    }
    for (int n = 0; n < N; ++n) op[n * O + o] = lane_sum(acc[n]);
  }
}

using Kernel = void (*)(const float*, const float*, float*, int64_t, int64_t);

template <int... Ns>
constexpr std::array<Kernel, sizeof...(Ns)> kernels_for(std::integer_sequence<int, Ns...>) {
  return {&rows_times_matrix<Ns + 1>...};
}

constexpr auto kKernels = kernels_for(std::make_integer_sequence<int, kMaxRows>{});  // N = 1 .. 16

}  // namespace

torch::Tensor few_rows_gemm(torch::Tensor x, torch::Tensor weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be (N, I) fp32");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32 && weight.is_contiguous(),
              "weight must be a contiguous (O, I) fp32 matrix");
  const int64_t N = x.size(0), I = x.size(1), O = weight.size(0);
  TORCH_CHECK(N >= 1 && N <= kMaxRows, "at most ", kMaxRows, " rows, got ", N);
  TORCH_CHECK(weight.size(1) == I, "x has ", I, " columns, the weight ", weight.size(1));
  TORCH_CHECK(I % 8 == 0, "the number of columns must be a multiple of 8");
  auto xc = x.contiguous();
  auto out = torch::empty({N, O}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();

  kKernels[N - 1](xp, wp, op, I, O);
  return out;
}
