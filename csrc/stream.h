// Host-side entry points of the streaming selection kernels (the chunked strategy), called by
// the pybind11 binding. Plain C++ types; pointers are raw device addresses; `stream` is a
// cudaStream_t. See stream.cuh for what a fold computes.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace gradsae {

struct StreamArgs {
  const void* p;        // the chunk [n, ncols]: row stride p_stride (elements), unit column stride
  int64_t p_stride;
  int dtype;            // 0 float32, 1 float16, 2 bfloat16
  int n, ncols;
  int64_t c0;           // latent index of the chunk's first column
  const float* bias;    // [d_sae] or nullptr
  const float* scale;   // [d_sae] or nullptr
  // top-k: the running state, [n, kp] keys (descending; 0 = empty), read and written
  int k, kp;
  uint64_t* best;
  // threshold: thr [d_sae]; slots idx [n, cap] (int64), val [n, cap]; counts [n] (read, written)
  const float* thr;
  int cap;
  int64_t* idx;
  float* val;
  int* counts;
  bool vec;             // 16-byte loads are legal (rows, tables and c0 aligned)
};

void stream_topk(int device, uintptr_t stream, const StreamArgs& a);
void stream_threshold(int device, uintptr_t stream, const StreamArgs& a);
// Bytes of dynamic shared memory one block of the top-k fold uses for a given kp.
size_t stream_topk_smem_bytes(int kp);

}  // namespace gradsae
