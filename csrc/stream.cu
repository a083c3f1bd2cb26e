// Streaming selection kernels of the chunked strategy: one warp per row folds the row's part of
// a chunk (the vendor GEMM's output) into its running top-k or threshold compaction
// (stream.cuh). Top-k state lives in global memory between chunks, [n, kp] packed keys; a
// warp stages it, and its candidate queue, in shared memory while it folds.

#include "common.cuh"
#include "stream.cuh"
#include "stream.h"

namespace gradsae {
namespace {

constexpr int NT = 256;
constexpr int NWARPS = NT / 32;

template <int DT>
__device__ __forceinline__ ChunkRow<DT> chunk_row(const StreamArgs& a, int row) {
  ChunkRow<DT> r;
  r.row = static_cast<const char*>(a.p) + static_cast<int64_t>(row) * a.p_stride * StreamElem<DT>::BYTES;
  r.bias = a.bias;
  r.scale = a.scale;
  r.c0 = a.c0;
  r.ncols = a.ncols;
  r.vec = a.vec;
  return r;
}

template <int DT>
__global__ void __launch_bounds__(NT) stream_topk_kernel(const StreamArgs a) {
  extern __shared__ __align__(16) uint64_t smem_keys[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row = blockIdx.x * NWARPS + warp;
  if (row >= a.n) return;  // warps only synchronise among themselves
  const int cp = stream_queue_keys(a.kp);
  uint64_t* best = smem_keys + static_cast<size_t>(warp) * (a.kp + cp);
  uint64_t* queue = best + a.kp;
  uint64_t* g = a.best + static_cast<size_t>(row) * a.kp;
  for (int i = lane; i < a.kp; i += 32) best[i] = g[i];
  __syncwarp();
  float bar = kth_bar(best, a.k);
  const ChunkRow<DT> load = chunk_row<DT>(a, row);
  stream_topk_row(best, queue, bar, load, a.k, a.kp, lane, 32, WarpSync{}, WarpBallot{});
  __syncwarp();
  for (int i = lane; i < a.kp; i += 32) g[i] = best[i];
}

template <int DT>
__global__ void __launch_bounds__(NT) stream_threshold_kernel(const StreamArgs a) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row = blockIdx.x * NWARPS + warp;
  if (row >= a.n) return;
  const ChunkRow<DT> load = chunk_row<DT>(a, row);
  const size_t slot0 = static_cast<size_t>(row) * a.cap;
  int count = a.counts[row];
  count = stream_threshold_row(a.idx + slot0, a.val + slot0, count, a.cap, a.thr, load, lane, 32, WarpBallot{});
  if (lane == 0) a.counts[row] = count;
}

#define GRADSAE_STREAM_DTYPE(code, DT, ...)                                                   \
  switch (code) {                                                                             \
    case kStreamF32: { constexpr int DT = kStreamF32; __VA_ARGS__; break; }                   \
    case kStreamF16: { constexpr int DT = kStreamF16; __VA_ARGS__; break; }                   \
    case kStreamBF16: { constexpr int DT = kStreamBF16; __VA_ARGS__; break; }                 \
    default: throw std::invalid_argument("gradsae._C: unknown dtype code " + std::to_string(code)); \
  }

void check_common(const StreamArgs& a, const char* who) {
  if (a.ncols < 0 || a.n < 0) throw std::invalid_argument(std::string("gradsae._C.") + who + ": negative size");
  if (a.ncols > 0 && a.p_stride < a.ncols)
    throw std::invalid_argument(std::string("gradsae._C.") + who + ": p_stride is smaller than ncols");
  if (a.c0 < 0 || a.c0 + a.ncols > 0x7fffffffLL)
    throw std::invalid_argument(std::string("gradsae._C.") + who + ": latent indices must stay below 2**31 - 1");
}

}  // namespace

size_t stream_topk_smem_bytes(int kp) {
  return static_cast<size_t>(NWARPS) * (kp + stream_queue_keys(kp)) * sizeof(uint64_t);
}

void stream_topk(int device, uintptr_t stream, const StreamArgs& a) {
  check_common(a, "stream_topk");
  if (a.k < 1 || a.k > a.kp || a.kp > kMaxK || a.kp != topk_pad(a.kp))
    throw std::invalid_argument("gradsae._C.stream_topk: need 1 <= k <= kp <= 256, kp = topk_pad(k)");
  if (a.n == 0 || a.ncols == 0) return;
  use_device(device);
  const size_t smem = stream_topk_smem_bytes(a.kp);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned blocks = static_cast<unsigned>((a.n + NWARPS - 1) / NWARPS);
  GRADSAE_STREAM_DTYPE(a.dtype, DT, {
    auto kernel = stream_topk_kernel<DT>;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "stream_topk (shared memory)");
    kernel<<<blocks, NT, smem, s>>>(a);
  });
  check_cuda(cudaGetLastError(), "stream_topk");
}

void stream_threshold(int device, uintptr_t stream, const StreamArgs& a) {
  check_common(a, "stream_threshold");
  if (a.cap < 1) throw std::invalid_argument("gradsae._C.stream_threshold: cap must be >= 1");
  if (a.n == 0 || a.ncols == 0) return;
  use_device(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned blocks = static_cast<unsigned>((a.n + NWARPS - 1) / NWARPS);
  GRADSAE_STREAM_DTYPE(a.dtype, DT, stream_threshold_kernel<DT><<<blocks, NT, 0, s>>>(a));
  check_cuda(cudaGetLastError(), "stream_threshold");
}

}  // namespace gradsae
