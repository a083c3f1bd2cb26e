// Gather-dot g = row_scale * col_scale * (W_dec[idx] . D), with the LatentStats accumulation
// fused (atomics) or deterministic (per-latent segments of a sorted list).

#include "common.cuh"
#include "launch.h"

namespace gradsae {
namespace {

constexpr int NT = 256;
constexpr int NWARPS = NT / 32;

__device__ __forceinline__ void atomic_max_double(double* addr, double val) {
  unsigned long long* a = reinterpret_cast<unsigned long long*>(addr);
  unsigned long long old = *a;
  while (__longlong_as_double((long long)old) < val) {
    unsigned long long assumed = old;
    old = atomicCAS(a, assumed, (unsigned long long)__double_as_longlong(val));
    if (old == assumed) break;
  }
}

// One warp per (row, slot): lanes stride over d_in with 8-element vector loads when legal.
template <typename TW, typename TD>
__global__ void __launch_bounds__(NT) gather_dot_kernel(const GatherArgs p) {
  const int lane = threadIdx.x % 32;
  const int64_t gw = (int64_t)blockIdx.x * NWARPS + threadIdx.x / 32;
  if (gw >= p.n * p.K) return;
  const int64_t row = gw / p.K;
  const int64_t j = p.idx[gw];
  float g = 0.0f;
  if (j >= 0) {
    const TW* w = static_cast<const TW*>(p.w) + j * p.w_stride;
    const TD* d = static_cast<const TD*>(p.d) + row * p.d_stride;
    float acc = 0.0f;
    int tail = 0;
    if (p.vec) {
      const int nv = p.d_in / 8 * 8;
      for (int c = lane * 8; c < nv; c += 32 * 8) {
        float a[8], b[8];
        load8(w + c, a);
        load8(d + c, b);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc = fmaf(a[i], b[i], acc);
      }
      tail = nv;
    }
    for (int c = tail + lane; c < p.d_in; c += 32) acc = fmaf(to_float(w[c]), to_float(d[c]), acc);
    g = warp_sum(acc);
    if (p.row_scale) g *= p.row_scale[row];
    if (p.col_scale) g *= p.col_scale[j];
  }
  if (lane != 0) return;
  if (p.out) p.out[gw] = g;
  const StatsTables& t = p.stats;
  if (t.count && j >= 0 && (!p.mask || p.mask[row])) {
    const float a32 = p.acts[gw];
    const double a = a32;
    const double s = (double)(a32 * g);  // the float32 score, as Influence.scores holds it
    atomicAdd(reinterpret_cast<unsigned long long*>(t.count + j), 1ull);
    atomicAdd(t.act_sum + j, a);
    atomicAdd(t.score_sum + j, s);
    atomicAdd(t.relu_sum + j, s > 0.0 ? s : 0.0);
    atomicAdd(t.abs_sum + j, fabs(s));
    atomic_max_double(t.score_max + j, s);
  }
}

__global__ void __launch_bounds__(NT) segment_stats_kernel(const int64_t* __restrict__ j, const float* __restrict__ acts,
                                                           const float* __restrict__ scores, int64_t m,
                                                           const StatsTables t) {
  const int64_t i = (int64_t)blockIdx.x * NT + threadIdx.x;
  if (i >= m || (i > 0 && j[i] == j[i - 1])) return;  // one thread per segment start
  const int64_t jj = j[i];
  long long c = 0;
  double sa = 0.0, ss = 0.0, sr = 0.0, sb = 0.0, mx = t.score_max[jj];
  for (int64_t e = i; e < m && j[e] == jj; ++e) {
    const double s = scores[e];
    ++c;
    sa += (double)acts[e];
    ss += s;
    sr += s > 0.0 ? s : 0.0;
    sb += fabs(s);
    mx = s > mx ? s : mx;
  }
  t.count[jj] += c;
  t.act_sum[jj] += sa;
  t.score_sum[jj] += ss;
  t.relu_sum[jj] += sr;
  t.abs_sum[jj] += sb;
  t.score_max[jj] = mx;
}

template <typename TW, typename TD>
void launch_gather(const GatherArgs& a, cudaStream_t s) {
  const int64_t warps = a.n * a.K;
  const int64_t blocks = (warps + NWARPS - 1) / NWARPS;
  gather_dot_kernel<TW, TD><<<(unsigned)blocks, NT, 0, s>>>(a);
  check_cuda(cudaGetLastError(), "gather_dot");
}

}  // namespace

void gather_dot(int device, uintptr_t stream, const GatherArgs& a) {
  if (a.n * a.K == 0) return;
  const StatsTables& t = a.stats;
  if (t.count && !(a.acts && t.act_sum && t.score_sum && t.relu_sum && t.abs_sum && t.score_max))
    throw std::invalid_argument("gradsae._C.gather_dot: fused statistics need acts and every stats table");
  if ((a.n * a.K + NWARPS - 1) / NWARPS > 0x7fffffffLL)
    throw std::invalid_argument("gradsae._C.gather_dot: too many slots for one launch");
  use_device(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  GRADSAE_DISPATCH_DTYPE(a.w_dtype, TW, GRADSAE_DISPATCH_DTYPE(a.d_dtype, TD, launch_gather<TW, TD>(a, s)));
}

void segment_stats(int device, uintptr_t stream, const int64_t* j, const float* acts, const float* scores, int64_t m,
                   const StatsTables& t) {
  if (m <= 0) return;
  if (!(t.count && t.act_sum && t.score_sum && t.relu_sum && t.abs_sum && t.score_max))
    throw std::invalid_argument("gradsae._C.segment_stats: needs every stats table");
  use_device(device);
  const int64_t blocks = (m + NT - 1) / NT;
  segment_stats_kernel<<<(unsigned)blocks, NT, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      j, acts, scores, m, t);
  check_cuda(cudaGetLastError(), "segment_stats");
}

}  // namespace gradsae
