// Selection and merge logic of the fused encode (top-k and threshold compaction).
//
// Everything here is plain __host__ __device__ code over arrays, written for `nlanes`
// cooperating workers (a warp on the device, one worker on the host) that synchronise through
// a `Sync` functor between steps. The device kernels call it with lane = threadIdx.x % 32,
// nlanes = 32 and __syncwarp(); a host-only build calls it with lane = 0, nlanes = 1, so the
// same logic is unit-tested without a GPU.
//
// Keys. A candidate (value v, latent j) is packed into one 64-bit key: an order-preserving
// image of the float in the high 32 bits, ~j in the low 32 bits. Sorting keys in descending
// order sorts values in descending order and, among equal values, latents in ascending
// order. NaN maps to the empty key 0, which sorts below every real value and is never
// selected.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define GS_HD __host__ __device__ __forceinline__
#define GS_HD_TEMPLATE __host__ __device__
#else
#define GS_HD inline
#define GS_HD_TEMPLATE inline
#endif

namespace gradsae {

constexpr int kMaxK = 256;          // largest k the top-k path keeps per row
constexpr uint64_t kEmptyKey = 0;   // empty slot (also the image of NaN)

GS_HD uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

GS_HD float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

GS_HD bool is_nan_bits(uint32_t u) { return (u & 0x7fffffffu) > 0x7f800000u; }

// Order-preserving map: for non-NaN a, b: a < b  <=>  ordered(a) < ordered(b) (with -0 < +0).
// Every non-NaN float maps to a nonzero code, so 0 is free for "empty".
GS_HD uint32_t ordered_bits(float f) {
  uint32_t u = float_as_bits(f);
  if (is_nan_bits(u)) return 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

GS_HD float ordered_to_float(uint32_t o) {
  return bits_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

GS_HD uint64_t pack_key(float v, uint32_t index) {
  uint32_t o = ordered_bits(v);
  if (o == 0u) return kEmptyKey;
  return (static_cast<uint64_t>(o) << 32) | static_cast<uint64_t>(~index);
}

GS_HD float key_value(uint64_t key) { return ordered_to_float(static_cast<uint32_t>(key >> 32)); }

GS_HD uint32_t key_index(uint64_t key) { return ~static_cast<uint32_t>(key); }

// The key of column `col` if it passes the selection (v > thr, strict; NaN never passes),
// else the empty key.
GS_HD uint64_t candidate_key(float v, float thr, uint32_t col) {
  return (v > thr) ? pack_key(v, col) : kEmptyKey;
}

GS_HD unsigned popcount32(uint32_t m) {
#if defined(__CUDA_ARCH__)
  return __popc(m);
#else
  return static_cast<unsigned>(__builtin_popcount(m));
#endif
}

GS_HD bool is_pow2(int n) { return n > 0 && (n & (n - 1)) == 0; }

GS_HD int next_pow2(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Keys kept per row for top-k: k rounded up to a power of two, at least one per lane.
GS_HD int topk_pad(int k) {
  int p = next_pow2(k);
  return p < 32 ? 32 : p;
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// One compare-exchange step of a descending bitonic sort: `a` has n (power of two) keys;
// `size` is the length of the sequences being merged, `stride` the compare distance.
template <class Sync>
GS_HD_TEMPLATE void bitonic_step_desc(uint64_t* a, int n, int size, int stride, int lane, int nlanes,
                                      Sync sync) {
  for (int t = lane; t < n / 2; t += nlanes) {
    int i = 2 * stride * (t / stride) + (t % stride);
    int j = i + stride;
    uint64_t x = a[i], y = a[j];
    bool desc = (i & size) == 0;  // blocks alternate direction; the last pass is all descending
    if (desc ? (x < y) : (x > y)) {
      a[i] = y;
      a[j] = x;
    }
  }
  sync();
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// Sort n (power of two) keys in descending order.
template <class Sync>
GS_HD_TEMPLATE void bitonic_sort_desc(uint64_t* a, int n, int lane, int nlanes, Sync sync) {
  for (int size = 2; size <= n; size <<= 1)
    for (int stride = size / 2; stride > 0; stride >>= 1) bitonic_step_desc(a, n, size, stride, lane, nlanes, sync);
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// Sort a bitonic sequence of n (power of two) keys into descending order (half-cleaners).
template <class Sync>
GS_HD_TEMPLATE void bitonic_merge_desc(uint64_t* a, int n, int lane, int nlanes, Sync sync) {
  for (int stride = n / 2; stride > 0; stride >>= 1) bitonic_step_desc(a, n, 2 * n, stride, lane, nlanes, sync);
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// state (n keys, descending) <- the n largest keys of state U other (other: n keys, descending).
// max(state[i], other[n-1-i]) holds exactly the n largest of the union as a bitonic sequence,
// which one merge pass sorts.
template <class Sync>
GS_HD_TEMPLATE void merge_sorted_desc(uint64_t* state, const uint64_t* other, int n, int lane, int nlanes,
                                      Sync sync) {
  for (int i = lane; i < n; i += nlanes) {
    uint64_t o = other[n - 1 - i];
    if (o > state[i]) state[i] = o;
  }
  sync();
  bitonic_merge_desc(state, n, lane, nlanes, sync);
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// Merge a row's candidate queue (qcount keys in queue[0, cp)) into its state (kp keys,
// descending): pad with empty keys, sort, keep the kp best of state U queue. Returns 0, the
// new queue length.
template <class Sync>
GS_HD_TEMPLATE int topk_flush(uint64_t* state, uint64_t* queue, int qcount, int kp, int cp, int lane, int nlanes,
                              Sync sync) {
  for (int i = qcount + lane; i < cp; i += nlanes) queue[i] = kEmptyKey;
  sync();
  bitonic_sort_desc(queue, cp, lane, nlanes, sync);
  merge_sorted_desc(state, queue, kp, lane, nlanes, sync);
  return 0;
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// Top-k epilogue of one row of one tile (a per-row candidate queue, WarpSelect style).
//
//   state:  kp keys (descending), the row's best keys merged so far;
//   queue:  cp >= max(kp, ncols) keys (cp a power of two) of candidates not merged yet,
//           qcount of them in use;
//   vals:   ncols selection values of columns col0 .. col0+ncols-1;
//   thr:    per-column thresholds (indexed by column - col0) or nullptr for 0.
//
// Only keys above the current k-th best of the state can enter the top k; they are appended
// to the queue (ascending column order). A full queue is first merged into the state (one
// sort of cp keys for many tiles), which also raises the bar the tile is filtered against.
// Returns the new queue length. `ballot` gives the mask of lanes whose flag is set (the flag
// itself on the host).
template <class Sync, class Ballot>
GS_HD_TEMPLATE int topk_tile_row(uint64_t* state, uint64_t* queue, int qcount, const float* vals, const float* thr,
                                 uint32_t col0, int ncols, int k, int kp, int cp, int lane, int nlanes, Sync sync,
                                 Ballot ballot) {
  const uint32_t below = (lane >= 32) ? 0xffffffffu : ((1u << lane) - 1u);
  uint64_t floor_key = state[k - 1];
  int fresh = 0;
  for (int base = 0; base < ncols; base += nlanes) {
    int c = base + lane;
    uint64_t key = c < ncols ? candidate_key(vals[c], thr ? thr[c] : 0.0f, col0 + static_cast<uint32_t>(c)) : kEmptyKey;
    fresh += static_cast<int>(popcount32(ballot(key > floor_key)));
  }
  if (fresh == 0) return qcount;
  if (qcount + fresh > cp) {
    qcount = topk_flush(state, queue, qcount, kp, cp, lane, nlanes, sync);
    floor_key = state[k - 1];
  }
  for (int base = 0; base < ncols; base += nlanes) {
    int c = base + lane;
    uint64_t key = c < ncols ? candidate_key(vals[c], thr ? thr[c] : 0.0f, col0 + static_cast<uint32_t>(c)) : kEmptyKey;
    bool pass = key > floor_key;
    uint32_t mask = ballot(pass);
    if (pass) queue[qcount + static_cast<int>(popcount32(mask & below))] = key;
    qcount += static_cast<int>(popcount32(mask));
  }
  sync();
  return qcount;
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// Threshold epilogue of one row of one tile: append the columns with v > thr (ascending
// column order) to `out` (capacity `cap`) from position `count`; returns the new count, which
// keeps counting past the capacity so overflow is detected. `ballot` gives the mask of lanes
// whose flag is set (the flag itself on the host).
template <class Ballot>
GS_HD_TEMPLATE int threshold_tile_row(uint64_t* out, int count, int cap, const float* vals, const float* thr,
                                      uint32_t col0, int ncols, int lane, int nlanes, Ballot ballot) {
  const uint32_t below = (lane >= 32) ? 0xffffffffu : ((1u << lane) - 1u);
  for (int base = 0; base < ncols; base += nlanes) {
    int c = base + lane;
    uint64_t key = kEmptyKey;
    if (c < ncols) key = candidate_key(vals[c], thr ? thr[c] : 0.0f, col0 + static_cast<uint32_t>(c));
    bool pass = key != kEmptyKey;
    uint32_t mask = ballot(pass);
    int pos = count + static_cast<int>(popcount32(mask & below));
    if (pass && pos < cap) out[pos] = key;
    count += static_cast<int>(popcount32(mask));
  }
  return count;
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// Merge a row's per-split top-kp lists (n_splits lists of kp keys, each descending, stored
// one after the other in `parts`) into `state` (kp keys, descending). `scratch`: kp keys.
template <class Sync>
GS_HD_TEMPLATE void merge_split_topk(uint64_t* state, uint64_t* scratch, const uint64_t* parts, int n_splits,
                                     int kp, int lane, int nlanes, Sync sync) {
  for (int i = lane; i < kp; i += nlanes) state[i] = parts[i];
  sync();
  for (int s = 1; s < n_splits; ++s) {
    for (int i = lane; i < kp; i += nlanes) scratch[i] = parts[static_cast<size_t>(s) * kp + i];
    sync();
    merge_sorted_desc(state, scratch, kp, lane, nlanes, sync);
  }
}

// Write the first k keys of a sorted state as (index, value) slots; empty -> (-1, 0).
GS_HD void emit_topk_row(const uint64_t* state, int k, int64_t* idx, float* acts, int lane, int nlanes) {
  for (int i = lane; i < k; i += nlanes) {
    uint64_t key = state[i];
    idx[i] = key == kEmptyKey ? -1 : static_cast<int64_t>(key_index(key));
    acts[i] = key == kEmptyKey ? 0.0f : key_value(key);
  }
}

// Concatenate a row's per-split compacted lists (split s holds min(counts[s], cap) keys at
// parts + s*cap, ascending latent order) into cap_out output slots; the rest are (-1, 0).
// Returns the row's total number of active latents (may exceed cap_out: overflow).
GS_HD int merge_split_threshold(const uint64_t* parts, const int* counts, int n_splits, int cap, int cap_out,
                                int64_t* idx, float* acts, int lane, int nlanes) {
  int total = 0;
  for (int s = 0; s < n_splits; ++s) {
    int n = counts[s] < cap ? counts[s] : cap;
    for (int i = lane; i < n; i += nlanes) {
      int o = total + i;
      if (o < cap_out) {
        uint64_t key = parts[static_cast<size_t>(s) * cap + i];
        idx[o] = static_cast<int64_t>(key_index(key));
        acts[o] = key_value(key);
      }
    }
    total += counts[s];
  }
  for (int o = total + lane; o < cap_out; o += nlanes) {
    idx[o] = -1;
    acts[o] = 0.0f;
  }
  return total;
}

}  // namespace gradsae
