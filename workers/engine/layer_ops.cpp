// The small operations between a decoder layer's products, in bf16, for the engine's decode steps on a CPU.
//
// Built with decode_attention.cpp by cpu_kernels.py and called through ctypes by layer_ops.py. At 32 rows
// and a hidden size of 576, each of torch's operations here (RMSNorm's five, the rotary embedding's five, SiLU
// and its product, the residual sums) costs its dispatch from Python, not its arithmetic: about 300 us a layer,
// a fifth of a decode step. Each function rounds to bf16 exactly where torch's operations do (torch computes a
// bf16 operation in fp32 and rounds its result), and RMSNorm sums its squares in the order torch's CPU sum
// does, so the outputs have torch's bits but for the last fp32 bit of SiLU's exponential.

// The sums here keep the order written (the library's flags let the compiler reorder sums elsewhere).
#pragma GCC optimize("no-associative-math")

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16_math.h"

namespace {

inline float to_float(uint16_t bf16) { return llava_queue::bf16_to_float(bf16); }

inline uint16_t to_bf16(float x) { return llava_queue::float_to_bf16(x); }

// x rounded to bf16, as an fp32: the value a bf16 operation leaves for the next.
inline float rounded(float x) { return to_float(to_bf16(x)); }

// The sum of x[0..n) in the order of torch's CPU sum of a contiguous row of fp32 (vectorized_inner_sum in
// aten/src/ATen/native/cpu/SumKernel.cpp) with vectors of kLanes floats (8 in torch 2.13 on x86, whether it runs
// its AVX512, AVX2 or default code: layer_ops.py finds the width by comparing sums): the row's whole vectors
// summed lane-wise in 4 interleaved accumulators, in a cascade of levels of 16 steps each, the 4 added together;
// then the elements past the last whole vector, then the lanes, one by one.
template <int kLanes>
float torch_row_sum(const float* x, int64_t n) {
  constexpr int kIlp = 4, kLevels = 4;
  const int64_t vectors = n / kLanes, steps = vectors / kIlp;
  // multi_row_sum: level_power = max(4, CeilLog2(steps) / 4), 4 below 2^20 steps (vectors of 64 floats each).
  int64_t ceil_log2 = 1;
  if (steps > 2) {
    ceil_log2 = 0;
    for (uint64_t v = static_cast<uint64_t>(steps - 1); v != 0; v >>= 1) ++ceil_log2;
  }
  const int64_t level_power = std::max<int64_t>(4, ceil_log2 / kLevels);
  const int64_t level_step = int64_t{1} << level_power, level_mask = level_step - 1;
  float acc[kLevels][kIlp][kLanes] = {};
  auto add_step = [&](int64_t i) {
    for (int k = 0; k < kIlp; ++k)
      for (int lane = 0; lane < kLanes; ++lane) acc[0][k][lane] += x[(i * kIlp + k) * kLanes + lane];
  };
  int64_t i = 0;
  while (i + level_step <= steps) {
    for (int64_t j = 0; j < level_step; ++j, ++i) add_step(i);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < kIlp; ++k)
        for (int lane = 0; lane < kLanes; ++lane) {
          acc[j][k][lane] += acc[j - 1][k][lane];
          acc[j - 1][k][lane] = 0.0f;
        }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < steps; ++i) add_step(i);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < kIlp; ++k)
      for (int lane = 0; lane < kLanes; ++lane) acc[0][k][lane] += acc[j][k][lane];
  // row_sum: the vectors past the last whole step go to the first accumulator, then the 4 are added in turn.
  float* sum = acc[0][0];
  for (int64_t v = steps * kIlp; v < vectors; ++v)
    for (int lane = 0; lane < kLanes; ++lane) sum[lane] += x[v * kLanes + lane];
  for (int k = 1; k < kIlp; ++k)
    for (int lane = 0; lane < kLanes; ++lane) sum[lane] += acc[0][k][lane];
  float total = 0.0f;
  for (int64_t e = vectors * kLanes; e < n; ++e) total += x[e];
  for (int lane = 0; lane < kLanes; ++lane) total += sum[lane];
  return total;
}

float row_sum(const float* x, int64_t n, int lanes) {
  switch (lanes) {
    case 4: return torch_row_sum<4>(x, n);
    case 8: return torch_row_sum<8>(x, n);
    case 32: return torch_row_sum<32>(x, n);
    default: return torch_row_sum<16>(x, n);
  }
}

// Rows of this many elements in all, or more, are shared among the OpenMP team (a decode step's are not).
constexpr int64_t kParallelElements = 1 << 15;

}  // namespace

extern "C" {

// The sum of x[0..n) as RMSNorm here sums (torch_row_sum), for finding the vector width torch's sum uses.
float llava_queue_row_sum(const float* x, int64_t n, int lanes) { return row_sum(x, n, lanes); }

// hidden [rows, dim] += delta [rows, dim] (when delta is not null), rounded to bf16 as torch's sum; then
// out [rows, dim] = RMSNorm(hidden) * weight as transformers' LlamaRMSNorm in bf16: normalized in fp32 (the mean
// of the squares summed as torch sums, with vectors of `lanes` floats), rounded, times the weight, rounded. Row
// strides in elements; each row contiguous.
void llava_queue_add_rms_norm(uint16_t* hidden, int64_t hidden_row, const uint16_t* delta, int64_t delta_row,
                              const uint16_t* weight, float eps, uint16_t* out, int64_t out_row, int64_t rows,
                              int64_t dim, int lanes, int threads) {
#pragma omp parallel num_threads(threads) if (rows * dim >= kParallelElements)
  {
    std::vector<float> squares(dim);
#pragma omp for
    for (int64_t r = 0; r < rows; ++r) {
      uint16_t* h = hidden + r * hidden_row;
      const uint16_t* d = delta == nullptr ? nullptr : delta + r * delta_row;
      for (int64_t i = 0; i < dim; ++i) {
        // The sum is exact once rounded (both are bf16); a square of a bf16 is exact in fp32.
        const float value = d == nullptr ? to_float(h[i]) : rounded(to_float(h[i]) + to_float(d[i]));
        h[i] = to_bf16(value);
        squares[i] = value * value;
      }
      const float scale = 1.0f / std::sqrt(row_sum(squares.data(), dim, lanes) / static_cast<float>(dim) + eps);
      uint16_t* o = out + r * out_row;
      for (int64_t i = 0; i < dim; ++i) o[i] = to_bf16(rounded(to_float(h[i]) * scale) * to_float(weight[i]));
    }
  }
}

// Rotary embedding of `heads` adjacent heads per row: x [rows, heads, head_dim] (row stride x_row, each head
// contiguous), cos and sin [rows, head_dim] (row stride table_row); out [rows, heads, head_dim] contiguous =
// x * cos + rotate_half(x) * sin, each product and the sum rounded to bf16 as torch's.
void llava_queue_rotate(const uint16_t* x, int64_t x_row, const uint16_t* cos, const uint16_t* sin,
                        int64_t table_row, uint16_t* out, int64_t rows, int64_t heads, int64_t head_dim,
                        int threads) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(threads) if (rows * heads * head_dim >= kParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* __restrict c = cos + r * table_row;
    const uint16_t* __restrict s = sin + r * table_row;
    for (int64_t h = 0; h < heads; ++h) {
      const uint16_t* __restrict v = x + r * x_row + h * head_dim;
      uint16_t* __restrict o = out + (r * heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i)
        o[i] = to_bf16(rounded(to_float(v[i]) * to_float(c[i])) + rounded(-to_float(v[i + half]) * to_float(s[i])));
      for (int64_t i = half; i < head_dim; ++i)
        o[i] = to_bf16(rounded(to_float(v[i]) * to_float(c[i])) + rounded(to_float(v[i - half]) * to_float(s[i])));
    }
  }
}

// gate_up [rows, 2 * width] (the gate, then the up projection; row stride gate_up_row); out [rows, width]
// (row stride out_row) = SiLU(gate) * up, SiLU and the product each rounded to bf16 as torch's.
void llava_queue_silu_mul(const uint16_t* gate_up, int64_t gate_up_row, uint16_t* out, int64_t out_row,
                          int64_t rows, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * width >= kParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* __restrict gate = gate_up + r * gate_up_row;
    const uint16_t* __restrict up = gate + width;
    uint16_t* __restrict o = out + r * out_row;
    for (int64_t i = 0; i < width; ++i) {
      const float x = to_float(gate[i]);
      o[i] = to_bf16(rounded(x / (1.0f + llava_queue::exp_approx(-x))) * to_float(up[i]));
    }
  }
}

}  // extern "C"
