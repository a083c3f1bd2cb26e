// Host-side entry points of the CUDA kernels (plain C++ types, no CUDA headers), called by
// the pybind11 binding. Pointers are raw device addresses; `stream` is a cudaStream_t; every
// launcher selects `device` first and throws std::runtime_error on a CUDA error.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <string>

#include "stats_fields.h"

namespace gradsae {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum SelectMode : int { kTopK = 0, kThreshold = 1 };

// Fused encode + selection over the d_sae splits:
//   v[r, j] = ((x[r] . W[:, j]) + bias[j]) * scale[j]   (scale optional)
//   top-k mode: parts[r, s, 0:kp] = the split's best kp keys (descending) with v > 0
//   threshold mode: parts[r, s, 0:cap] = keys with v > thr[j], ascending j; counts[r, s] = how many
struct EncodeArgs {
  const void* x;       // [n, d_in], row stride x_stride, unit column stride
  int64_t x_stride;
  const void* w;       // [d_in, d_sae], row stride w_stride, unit column stride
  int64_t w_stride;
  const void* bias;    // [d_sae], same dtype as x and w
  const float* scale;  // [d_sae] float32 or nullptr
  const float* thr;    // [d_sae] float32 (threshold mode) or nullptr (compare with 0)
  int dtype;           // DType of x, w, bias
  int n, d_in, d_sae;
  int mode;            // SelectMode
  int k, kp;           // top-k: k <= kp, kp = topk_pad(k)
  int cap;             // threshold: slots per (row, split)
  int split_cols;      // columns per split (a multiple of the tile width)
  int n_splits;
  int tile_rows;       // rows per CTA: 64, or 32 where shared memory is short
  uint64_t* parts;     // [n, n_splits, kp or cap]
  int* counts;         // [n, n_splits] (threshold mode)
  bool vec;            // 16-byte vector loads are legal (aligned pointers and strides)
};

void encode_select(int device, uintptr_t stream, const EncodeArgs& a);
size_t encode_smem_bytes(int dtype, int mode, int kp, int tile_rows);
int encode_tile_cols();

void merge_topk(int device, uintptr_t stream, const uint64_t* parts, int n, int n_splits, int k, int kp,
                int64_t* idx, float* acts);
void merge_threshold(int device, uintptr_t stream, const uint64_t* parts, const int* counts, int n, int n_splits,
                     int cap, int cap_out, int64_t* idx, float* acts, int* row_counts);

// g[r, s] = row_scale[r] * col_scale[j] * (W[j] . D[r]) for j = idx[r, s] >= 0, else 0.
// With stats tables set, also adds the active (and unmasked) slots into the LatentStats
// tables with atomics (count int64, sums float64, score_max float64).
struct GatherArgs {
  const void* w;        // [d_sae, d_in]
  int64_t w_stride;
  int w_dtype;
  const void* d;        // [n, d_in]
  int64_t d_stride;
  int d_dtype;
  const int64_t* idx;   // [n, K] contiguous
  int64_t n;
  int K, d_in;
  const float* row_scale;  // [n] or nullptr
  const float* col_scale;  // [d_sae] or nullptr
  float* out;              // [n, K] or nullptr
  bool vec;
  // fused statistics (stats.count == nullptr = off)
  const float* acts;       // [n, K]
  const bool* mask;        // [n] or nullptr
  StatsTables stats;
};

void gather_dot(int device, uintptr_t stream, const GatherArgs& a);

// Deterministic statistics: entries sorted by latent (j ascending, ties in input order) are
// reduced per latent in that order by one thread each, then added to the tables.
void segment_stats(int device, uintptr_t stream, const int64_t* j, const float* acts, const float* scores, int64_t m,
                   const StatsTables& t);

std::string compiled_archs();
int cuda_runtime_version();

}  // namespace gradsae
