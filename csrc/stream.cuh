// Streaming selection (the chunked strategy): fold one chunk of pre-activations, written by
// the vendor GEMM, into each row's running top-k or threshold compaction, in one read.
//
//   v[c] = (P[row, c] + bias[c0 + c]) * scale[c0 + c]       (fp32; bias and scale optional)
//
// Plain __host__ __device__ code for `nlanes` cooperating workers, like select.cuh: a warp per
// row on the device, one worker (or an emulated warp) on the host, so the same logic is
// unit-tested without a GPU (select_host.cpp).
//
// A step covers nlanes * VW consecutive columns, VW per lane (one 16-byte load: 4 fp32 or 8
// 16-bit values), lane order = column order. Values are compared with the row's bar as fp32
// before anything is packed: top-k, the value of the k-th best key (at least 0: only positive
// values are ever selected); threshold, thr[j]. A step without a hit in the warp costs the
// load, VW compares and one ballot. Hits are placed in ascending column order (ballots give
// each lane the hits of the lanes before it). NaN never passes a compare, so it is never
// selected (the rule of every backend), and columns past the chunk read as -inf.
#pragma once

#include "select.cuh"

#if defined(__CUDACC__)
#define GS_UNROLL _Pragma("unroll")
#else
#define GS_UNROLL
#endif

namespace gradsae {

// ---------------------------------------------------------------------------- element loads
GS_HD float bf16_bits_to_float(uint16_t b) { return bits_as_float(static_cast<uint32_t>(b) << 16); }

GS_HD float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_as_float(sign | 0x7f800000u | (man << 13));  // inf, NaN
  if (exp == 0u) {                                                            // zero, subnormal
    const float f = static_cast<float>(man) * 5.9604644775390625e-8f;          // man * 2^-24
    return sign ? -f : f;
  }
  return bits_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// 16 bytes at p (16-byte aligned) as four 32-bit words.
GS_HD void load16(const void* p, uint32_t* w) {
#if defined(__CUDA_ARCH__)
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  w[0] = u.x; w[1] = u.y; w[2] = u.z; w[3] = u.w;
#else
  memcpy(w, p, 16);
#endif
}

enum StreamDType : int { kStreamF32 = 0, kStreamF16 = 1, kStreamBF16 = 2 };

template <int DT>
struct StreamElem {
  static constexpr int VW = DT == kStreamF32 ? 4 : 8;  // values per 16-byte load
  static constexpr int BYTES = DT == kStreamF32 ? 4 : 2;
  GS_HD static float at(const void* p, int64_t i) {
    if (DT == kStreamF32) return static_cast<const float*>(p)[i];
    const uint16_t b = static_cast<const uint16_t*>(p)[i];
    return DT == kStreamBF16 ? bf16_bits_to_float(b) : fp16_bits_to_float(b);
  }
  // VW values from a 16-byte aligned address
  GS_HD static void vec(const void* p, float* v) {
    uint32_t w[4];
    load16(p, w);
    if (DT == kStreamF32) {
      GS_UNROLL
      for (int s = 0; s < 4; ++s) v[s] = bits_as_float(w[s]);
    } else {
      GS_UNROLL
      for (int s = 0; s < 8; ++s) {
        const uint16_t b = static_cast<uint16_t>(w[s / 2] >> (16 * (s % 2)));
        v[s] = DT == kStreamBF16 ? bf16_bits_to_float(b) : fp16_bits_to_float(b);
      }
    }
  }
};

// VW fp32 values of a per-latent table (bias, scale, threshold) at column j, `fill` past n.
template <int VW>
GS_HD void table_values(const float* t, int64_t j, int valid, bool vec, float fill, float* out) {
  if (vec && valid >= VW) {
    GS_UNROLL
    for (int s = 0; s < VW; s += 4) {
      uint32_t w[4];
      load16(t + j + s, w);
      GS_UNROLL
      for (int i = 0; i < 4; ++i) out[s + i] = bits_as_float(w[i]);
    }
  } else {
    GS_UNROLL
    for (int s = 0; s < VW; ++s) out[s] = s < valid ? t[j + s] : fill;
  }
}

// One row of a chunk: the selection values of columns c .. c+VW-1 (relative to the chunk),
// -inf past the chunk's end. `vec`: 16-byte loads are legal (row, tables and c0 aligned).
template <int DT>
struct ChunkRow {
  static constexpr int VW = StreamElem<DT>::VW;
  const void* row;      // P + row * stride
  const float* bias;    // [d_sae] or nullptr
  const float* scale;   // [d_sae] or nullptr
  int64_t c0;           // latent index of the chunk's column 0
  int ncols;
  bool vec;

  GS_HD void operator()(int c, float* v) const {
    const int valid = ncols - c < VW ? ncols - c : VW;
    if (valid <= 0) {
      GS_UNROLL
      for (int s = 0; s < VW; ++s) v[s] = -__builtin_huge_valf();
      return;
    }
    if (vec && valid == VW) {
      StreamElem<DT>::vec(static_cast<const char*>(row) + static_cast<int64_t>(c) * StreamElem<DT>::BYTES, v);
    } else {
      GS_UNROLL
      for (int s = 0; s < VW; ++s) v[s] = s < valid ? StreamElem<DT>::at(row, c + s) : 0.0f;
    }
    if (bias) {
      float b[VW];
      table_values<VW>(bias, c0 + c, valid, vec, 0.0f, b);
      GS_UNROLL
      for (int s = 0; s < VW; ++s) v[s] += b[s];
    }
    if (scale) {
      float m[VW];
      table_values<VW>(scale, c0 + c, valid, vec, 1.0f, m);
      GS_UNROLL
      for (int s = 0; s < VW; ++s) v[s] *= m[s];
    }
    GS_UNROLL
    for (int s = 0; s < VW; ++s)
      if (s >= valid) v[s] = -__builtin_huge_valf();
  }
};

// ---------------------------------------------------------------------------- top-k
// The bar of a row: the value of its k-th best key (`best` descending), at least 0.
GS_HD float kth_bar(const uint64_t* best, int k) {
  const uint64_t key = best[k - 1];
  if (key == kEmptyKey) return 0.0f;
  const float v = key_value(key);
  return v > 0.0f ? v : 0.0f;
}

// Keys of a row's candidate queue: a power of two that holds a whole step after a merge.
GS_HD int stream_queue_keys(int kp) { return kp > 256 ? kp : 256; }

// Per step, the lanes' hit masks -> (hits of the lanes before this one, hits of the warp).
template <int VW, class Ballot>
GS_HD_TEMPLATE void hit_positions(unsigned hits, uint32_t below, Ballot ballot, int& before, int& total) {
  before = 0;
  total = 0;
  GS_UNROLL
  for (int s = 0; s < VW; ++s) {
    const uint32_t m = ballot(((hits >> s) & 1u) != 0u);
    before += static_cast<int>(popcount32(m & below));
    total += static_cast<int>(popcount32(m));
  }
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// Fold one row of a chunk into the row's top-k: `best` (kp keys, descending) and the bar are
// the row's state, `queue` (cp = stream_queue_keys(kp) keys) scratch. Returns with every
// candidate merged (the queue empty) and `bar` raised to the new k-th best value.
template <class Load, class Sync, class Ballot>
GS_HD_TEMPLATE void stream_topk_row(uint64_t* best, uint64_t* queue, float& bar, const Load& load, int k, int kp,
                                    int lane, int nlanes, Sync sync, Ballot ballot) {
  constexpr int VW = Load::VW;
  const int cp = stream_queue_keys(kp);
  const uint32_t below = (lane >= 32) ? 0xffffffffu : ((1u << lane) - 1u);
  int qcount = 0;
  for (int base = 0; base < load.ncols; base += nlanes * VW) {
    const int c = base + lane * VW;
    float v[VW];
    load(c, v);
    unsigned hits = 0;
    GS_UNROLL
    for (int s = 0; s < VW; ++s) hits |= static_cast<unsigned>(v[s] > bar) << s;
    if (ballot(hits != 0u) == 0u) continue;  // the common case: nothing beats the bar
    int before, total;
    hit_positions<VW>(hits, below, ballot, before, total);
    if (qcount + total > cp) {  // merge the queue first, which raises the bar
      qcount = topk_flush(best, queue, qcount, kp, cp, lane, nlanes, sync);
      bar = kth_bar(best, k);
      hits = 0;
      GS_UNROLL
      for (int s = 0; s < VW; ++s) hits |= static_cast<unsigned>(v[s] > bar) << s;
      hit_positions<VW>(hits, below, ballot, before, total);
    }
    int pos = qcount + before;
    GS_UNROLL
    for (int s = 0; s < VW; ++s)
      if ((hits >> s) & 1u) queue[pos++] = pack_key(v[s], static_cast<uint32_t>(load.c0 + c + s));
    qcount += total;
    sync();
  }
  if (qcount > 0) {
    topk_flush(best, queue, qcount, kp, cp, lane, nlanes, sync);
    bar = kth_bar(best, k);
  }
}

// ---------------------------------------------------------------------------- threshold
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
// Fold one row of a chunk into the row's compaction: columns with v > thr[j] (strict) go to
// slots count, count+1, ... (ascending latent order) while they are below `cap`; returns the
// new count, which keeps counting past cap so an overflow is exact.
template <class Load, class Ballot>
GS_HD_TEMPLATE int stream_threshold_row(int64_t* idx, float* val, int count, int cap, const float* thr,
                                        const Load& load, int lane, int nlanes, Ballot ballot) {
  constexpr int VW = Load::VW;
  const uint32_t below = (lane >= 32) ? 0xffffffffu : ((1u << lane) - 1u);
  for (int base = 0; base < load.ncols; base += nlanes * VW) {
    const int c = base + lane * VW;
    float v[VW], t[VW];
    load(c, v);
    const int valid = load.ncols - c < VW ? load.ncols - c : VW;
    table_values<VW>(thr, load.c0 + c, valid, load.vec, __builtin_huge_valf(), t);
    unsigned hits = 0;
    GS_UNROLL
    for (int s = 0; s < VW; ++s) hits |= static_cast<unsigned>(s < valid && v[s] > t[s]) << s;
    if (ballot(hits != 0u) == 0u) continue;
    int before, total;
    hit_positions<VW>(hits, below, ballot, before, total);
    int pos = count + before;
    GS_UNROLL
    for (int s = 0; s < VW; ++s) {
      if ((hits >> s) & 1u) {
        if (pos < cap) {
          idx[pos] = load.c0 + c + s;
          val[pos] = v[s];
        }
        ++pos;
      }
    }
    count += total;
  }
  return count;
}

}  // namespace gradsae
