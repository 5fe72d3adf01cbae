// Decode attention on a CPU: one query position per row, the heads that share a KV head together.
//
// Built at run time by cpu_kernels.py (g++ -O3 -march=native -fopenmp) and called through ctypes by
// decode_attention.py with the tensors' pointers and strides. torch's CPU flash kernel makes each (row, KV head)
// pair a task with a few query rows and costs ~400 us a layer at 32 rows and 100 columns, where reading the keys
// and values takes ~40 us; here each pair reads its keys and values once, in fp32 arithmetic throughout (bf16
// scores with AVX512-BF16's dot product, whose products are exact), and rounds the output once; while a pair is
// scored, the next pair's keys and values are fetched (in a decode step they come from memory: a third of the
// kernel's time in the engine, measured). The OpenMP team is the calling thread's, the one torch's ops run on
// (torch loads the same libgomp.so.1, which the dynamic linker shares by its name).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "bf16_math.h"

namespace {

constexpr int kMaxHeadDim = 256;
constexpr int kMaxGroups = 16;

inline float to_float(float x) { return x; }

inline float to_float(uint16_t bf16) { return llava_queue::bf16_to_float(bf16); }

inline void store(float* out, float x) { *out = x; }

inline void store(uint16_t* out, float x) { *out = llava_queue::float_to_bf16(x); }

// e^x for x <= 0 (a score minus its row's largest; below -87, nothing beside the largest weight's 1).
inline float exp_nonpositive(float x) { return llava_queue::exp_approx(x); }

#if defined(__AVX512BF16__)
// q . k of bf16 vectors of kHeadDim elements (a multiple of 32) with AVX512-BF16's dot product: each pair's
// products exact, summed in fp32 as fused multiply-adds are, with no conversion of the keys to fp32 first.
template <int kHeadDim>
inline float dot_bf16(const __m512bh* query, const uint16_t* key) {
  __m512 sum = _mm512_setzero_ps();
  for (int i = 0; i < kHeadDim / 32; ++i)
    sum = _mm512_dpbf16_ps(sum, query[i], reinterpret_cast<__m512bh>(_mm512_loadu_si512(key + 32 * i)));
  return _mm512_reduce_add_ps(sum);
}
#endif

// kHeadDim: the head size, known when compiling (the loops over it then unroll: 64 made the kernel 1.3x
// faster), or 0 for any.
template <typename T, int kHeadDim>
void attend(const T* q, int64_t q_row, int64_t q_head, const T* k, int64_t k_row, int64_t k_head,
            const T* v, int64_t v_row, int64_t v_head, const T* mask, int64_t mask_row, T* out, int64_t rows,
            int64_t kv_heads, int64_t groups, int64_t width, int64_t any_head_dim, float scale, int threads) {
  const int64_t head_dim = kHeadDim ? kHeadDim : any_head_dim;
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores(static_cast<size_t>(groups * width));
#pragma omp for schedule(static)
    for (int64_t task = 0; task < rows * kv_heads; ++task) {
      const int64_t row = task / kv_heads, head = task % kv_heads;
      const T* qs = q + row * q_row + head * q_head;  // [groups, head_dim], contiguous
      const T* ks = k + row * k_row + head * k_head;  // [width, head_dim], contiguous
      const T* vs = v + row * v_row + head * v_head;
      const T* ms = mask + row * mask_row;
      float query[kMaxGroups][kMaxHeadDim];
      float acc[kMaxGroups][kMaxHeadDim];
      float top[kMaxGroups], total[kMaxGroups];
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t d = 0; d < head_dim; ++d) query[g][d] = to_float(qs[g * head_dim + d]);
        top[g] = neg_inf;
      }
      // Scores: (q . k) * scale + mask, as scaled_dot_product_attention with an additive mask.
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, uint16_t> && kHeadDim % 32 == 0 && kHeadDim != 0) {
        __m512bh query_bf16[kMaxGroups][kHeadDim / 32];
        for (int64_t g = 0; g < groups; ++g)
          for (int i = 0; i < kHeadDim / 32; ++i)
            query_bf16[g][i] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(qs + g * head_dim + 32 * i));
        // The next task's keys and values, fetched into L2 while this one's are scored (they come from memory).
        const int64_t next = task + 1 < rows * kv_heads ? task + 1 : task;
        const T* next_k = k + (next / kv_heads) * k_row + (next % kv_heads) * k_head;
        const T* next_v = v + (next / kv_heads) * v_row + (next % kv_heads) * v_head;
        for (int64_t col = 0; col < width; ++col) {
          for (int64_t line = 0; line < kHeadDim; line += 32) {
            __builtin_prefetch(next_k + col * kHeadDim + line, 0, 2);
            __builtin_prefetch(next_v + col * kHeadDim + line, 0, 2);
          }
          const float bias = to_float(ms[col]);
          for (int64_t g = 0; g < groups; ++g) {
            const float score =
                bias == neg_inf ? neg_inf : dot_bf16<kHeadDim>(query_bf16[g], ks + col * head_dim) * scale + bias;
            scores[g * width + col] = score;
            if (score > top[g]) top[g] = score;
          }
        }
      } else
#endif
      for (int64_t col = 0; col < width; ++col) {
        const float bias = to_float(ms[col]);
        if (bias == neg_inf) {
          for (int64_t g = 0; g < groups; ++g) scores[g * width + col] = neg_inf;
          continue;
        }
        float key[kMaxHeadDim];
        for (int64_t d = 0; d < head_dim; ++d) key[d] = to_float(ks[col * head_dim + d]);
        for (int64_t g = 0; g < groups; ++g) {
          float dot = 0.0f;
          for (int64_t d = 0; d < head_dim; ++d) dot += query[g][d] * key[d];
          const float score = dot * scale + bias;
          scores[g * width + col] = score;
          if (score > top[g]) top[g] = score;
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        total[g] = 0.0f;
        for (int64_t d = 0; d < head_dim; ++d) acc[g][d] = 0.0f;
        for (int64_t col = 0; col < width; ++col) {
          float& s = scores[g * width + col];
          s = s == neg_inf ? 0.0f : exp_nonpositive(s - top[g]);
          total[g] += s;
        }
      }
      for (int64_t col = 0; col < width; ++col) {
        if (to_float(ms[col]) == neg_inf) continue;
        float value[kMaxHeadDim];
        for (int64_t d = 0; d < head_dim; ++d) value[d] = to_float(vs[col * head_dim + d]);
        for (int64_t g = 0; g < groups; ++g) {
          const float p = scores[g * width + col];
          for (int64_t d = 0; d < head_dim; ++d) acc[g][d] += p * value[d];
        }
      }
      T* os = out + (row * kv_heads + head) * groups * head_dim;
      for (int64_t g = 0; g < groups; ++g) {
        // Every column masked (no row is, in the engine): NaN, as the flash kernel gives.
        const float inverse = total[g] > 0.0f ? 1.0f / total[g] : std::numeric_limits<float>::quiet_NaN();
        for (int64_t d = 0; d < head_dim; ++d) store(os + g * head_dim + d, acc[g][d] * inverse);
      }
    }
  }
}

template <typename T>
void dispatch(const T* q, int64_t q_row, int64_t q_head, const T* k, int64_t k_row, int64_t k_head, const T* v,
              int64_t v_row, int64_t v_head, const T* mask, int64_t mask_row, T* out, int64_t rows, int64_t kv_heads,
              int64_t groups, int64_t width, int64_t head_dim, float scale, int threads) {
  auto* kernel = head_dim == 64 ? attend<T, 64> : head_dim == 128 ? attend<T, 128> : attend<T, 0>;
  kernel(q, q_row, q_head, k, k_row, k_head, v, v_row, v_head, mask, mask_row, out, rows, kv_heads, groups, width,
         head_dim, scale, threads);
}

}  // namespace

extern "C" {

int llava_queue_max_head_dim() { return kMaxHeadDim; }
int llava_queue_max_groups() { return kMaxGroups; }

// dtype 0: fp32, 1: bf16. Strides in elements; within a head, q is [groups, head_dim] and k, v are
// [width, head_dim], each contiguous; the mask is [rows, width] with a row stride, contiguous in a row;
// out is [rows, kv_heads, groups, head_dim], contiguous. threads: the OpenMP team's size (torch's own).
void llava_queue_decode_attention(int dtype, const void* q, int64_t q_row, int64_t q_head, const void* k,
                                  int64_t k_row, int64_t k_head, const void* v, int64_t v_row, int64_t v_head,
                                  const void* mask, int64_t mask_row, void* out, int64_t rows, int64_t kv_heads,
                                  int64_t groups, int64_t width, int64_t head_dim, float scale, int threads) {
  if (dtype == 1) {
    dispatch(static_cast<const uint16_t*>(q), q_row, q_head, static_cast<const uint16_t*>(k), k_row, k_head,
             static_cast<const uint16_t*>(v), v_row, v_head, static_cast<const uint16_t*>(mask), mask_row,
             static_cast<uint16_t*>(out), rows, kv_heads, groups, width, head_dim, scale, threads);
  } else {
    dispatch(static_cast<const float*>(q), q_row, q_head, static_cast<const float*>(k), k_row, k_head,
             static_cast<const float*>(v), v_row, v_head, static_cast<const float*>(mask), mask_row,
             static_cast<float*>(out), rows, kv_heads, groups, width, head_dim, scale, threads);
  }
}

}  // extern "C"
