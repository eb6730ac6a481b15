// One activation row times a matrix of 4-bit codes in groups, plus an optional
// sparse table of corrections: the decode-step product of int4, GPTQ and SpQR
// layers on x86 CPUs with AVX2 and FMA (gemma_lite/native.py builds this file).
//
//   out[o] = sum_g scale[o, g] * sum_j code[o, g, j] * x[g, j]      (codes)
//          + sum_g offset[o, g] * sum_j x[g, j]                     (offsets)
//          + sum_k values[k] * x[cols[k]],  k in ptr[o] .. ptr[o+1] (corrections, CSR)
//
// packed (O, I/G, G/2) uint8: byte j of a group holds code j in its low nibble
// and code j + G/2 in its high one (kernels.pack_int4). scale, offset (O, I/G)
// fp16. Rows are shared among the OpenMP threads. A group's codes are
// multiplied by x in 8-wide fp32 vectors, and the group's dot product is scaled
// into the row's vector accumulator: the only horizontal sum is one per row.
#include <immintrin.h>
#include <torch/extension.h>

namespace {

constexpr int64_t kMaxGroups = 1024;

inline __m256 group_dot(const uint8_t* bytes, const float* x, int64_t half) {
  const __m256i low_nibble = _mm256_set1_epi32(15);
  __m256 dot = _mm256_setzero_ps();
  for (int64_t j = 0; j < half; j += 8) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + j)));
    __m256 low = _mm256_cvtepi32_ps(_mm256_and_si256(b, low_nibble));
    __m256 high = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
    dot = _mm256_fmadd_ps(low, _mm256_loadu_ps(x + j), dot);
    dot = _mm256_fmadd_ps(high, _mm256_loadu_ps(x + half + j), dot);
  }
  return dot;
}

inline float horizontal_sum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_hadd_ps(r, r);
  r = _mm_hadd_ps(r, r);
  return _mm_cvtss_f32(r);
}

// fp16 (n,) -> fp32, 8 at a time, the last n % 8 one by one.
inline void halves_to_floats(const at::Half* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  for (; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

}  // namespace

torch::Tensor grouped_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor offset,
                           torch::Tensor ptr, torch::Tensor cols, torch::Tensor values) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be (I,) fp32");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(),
              "packed must be (O, I/G, G/2) uint8");
  const int64_t rows = packed.size(0), groups = packed.size(1), half = packed.size(2);
  TORCH_CHECK(half % 8 == 0, "the group size must be a multiple of 16");
  TORCH_CHECK(groups <= kMaxGroups, "at most ", kMaxGroups, " groups per row");
  TORCH_CHECK(x.size(0) == groups * 2 * half, "x has ", x.size(0), " entries, the matrix ", groups * 2 * half);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat16 && offset.scalar_type() == torch::kFloat16 &&
                  scale.is_contiguous() && offset.is_contiguous(),
              "scale and offset must be contiguous fp16");
  const bool sparse = ptr.numel() > 0;
  if (sparse) {
    TORCH_CHECK(ptr.scalar_type() == torch::kInt32 && ptr.numel() == rows + 1, "ptr must be (O + 1,) int32");
    TORCH_CHECK(cols.scalar_type() == torch::kInt16 && values.scalar_type() == torch::kFloat16,
                "cols must be int16 and values fp16");
  }
  auto sums = x.view({groups, 2 * half}).sum(1).contiguous();  // (I/G,) sum of x per group
  auto out = torch::empty({rows}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* xsum = sums.data_ptr<float>();
  const uint8_t* codes = packed.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* mp = offset.data_ptr<at::Half>();
  const int32_t* pp = sparse ? ptr.data_ptr<int32_t>() : nullptr;
  const int16_t* cp = sparse ? cols.data_ptr<int16_t>() : nullptr;
  const at::Half* vp = sparse ? values.data_ptr<at::Half>() : nullptr;
  float* op = out.data_ptr<float>();

#pragma omp parallel for schedule(static, 256)
  for (int64_t o = 0; o < rows; ++o) {
    float s[kMaxGroups], m[kMaxGroups];
    halves_to_floats(sp + o * groups, s, groups);
    halves_to_floats(mp + o * groups, m, groups);
    const uint8_t* row = codes + o * groups * half;
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();  // two chains for two groups in flight
    int64_t g = 0;
    for (; g + 1 < groups; g += 2) {
      even = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), group_dot(row + g * half, xp + g * 2 * half, half), even);
      odd = _mm256_fmadd_ps(_mm256_set1_ps(s[g + 1]),
                            group_dot(row + (g + 1) * half, xp + (g + 1) * 2 * half, half), odd);
    }
    if (g < groups)
      even = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), group_dot(row + g * half, xp + g * 2 * half, half), even);
    __m256 bias = _mm256_setzero_ps();
    float total = 0;
    g = 0;
    for (; g + 8 <= groups; g += 8)
      bias = _mm256_fmadd_ps(_mm256_loadu_ps(m + g), _mm256_loadu_ps(xsum + g), bias);
    for (; g < groups; ++g) total += m[g] * xsum[g];
    total += horizontal_sum(_mm256_add_ps(_mm256_add_ps(even, odd), bias));
    if (sparse)
      for (int32_t k = pp[o]; k < pp[o + 1]; ++k) total += static_cast<float>(vp[k]) * xp[cp[k]];
    op[o] = total;
  }
  return out;
}

torch::Tensor few_rows_gemm(torch::Tensor x, torch::Tensor weight);  // few_rows_gemm.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_gemv", &grouped_gemv, "grouped 4-bit codes @ x");
  m.def("few_rows_gemm", &few_rows_gemm, "a few fp32 rows @ a tall fp32 matrix^T");
}
