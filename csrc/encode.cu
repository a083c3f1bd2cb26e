// Fused encode GEMM + selection, and the merge over d_sae splits.
//
// Grid: (row blocks of BM rows, d_sae splits). A CTA walks its split in tiles of BN columns;
// for each tile it computes the BM x BN block of x @ W with tensor cores (WMMA m16n16k16,
// bf16/fp16 inputs, fp32 accumulate) or SIMT fp32 FMAs (fp32 inputs), adds the bias, applies
// the optional per-column scale, and hands each row of the block to the selection epilogue of
// select.cuh: a running per-row top-k in shared memory (packed keys, bitonic sort + merge), or
// an order-preserving compaction of the entries above threshold. The CTA writes its per-row
// partial results; a merge kernel (one warp per row) combines the splits.
//
// Concurrent CTAs share a split (blockIdx.x runs over row blocks first), so one split of W
// stays in L2 while every row block streams past it.

#include <mma.h>

#include "common.cuh"
#include "launch.h"
#include "select.cuh"

namespace gradsae {
namespace {

constexpr int BN = 128;       // tile columns
constexpr int BK = 32;        // depth per stage
constexpr int NT = 256;       // threads per CTA
constexpr int NWARPS = NT / 32;
constexpr int C_LD = BN + 4;  // fp32 C tile row stride (16-byte multiple)

template <typename T>
struct Tiles {
  static constexpr int V = 16 / sizeof(T);            // elements per 16-byte vector
  static constexpr int A_LD = BK + V;                 // padded, rows stay 16/32-byte aligned
  static constexpr int B_LD = BN + V;
};

template <typename T, int BM>
constexpr size_t stage_elems() {
  return (size_t)BM * Tiles<T>::A_LD + (size_t)BK * Tiles<T>::B_LD;
}

// 16-bit inputs use two stages (cp.async double buffering); fp32 one.
template <typename T>
constexpr int stages() {
  return sizeof(T) == 2 ? 2 : 1;
}

template <typename T, int BM>
constexpr size_t gemm_bytes() {
  size_t ab = stages<T>() * stage_elems<T, BM>() * sizeof(T);
  size_t c = (size_t)BM * C_LD * sizeof(float);
  size_t m = ab > c ? ab : c;
  return (m + 127) / 128 * 128;
}

template <typename T, int BM>
size_t smem_bytes(int mode, int kp) {
  size_t b = gemm_bytes<T, BM>();
  if (mode == kTopK) {
    int cp = kp > BN ? kp : BN;  // queue keys per row
    b += (size_t)BM * (kp + cp) * sizeof(uint64_t) + (size_t)BM * sizeof(int);
  } else {
    b += (size_t)BM * sizeof(int);
  }
  return b;
}

// Copy a ROWS x COLS tile (row-major, row stride ld) starting at (r0, c0) into shared memory,
// zero outside [0, rmax) x [0, cmax).
template <typename T, int ROWS, int COLS, int LD>
__device__ __forceinline__ void load_tile(T* dst, const T* __restrict__ src, int64_t ld, int r0, int rmax, int c0,
                                          int cmax, bool vec) {
  constexpr int V = Tiles<T>::V;
  constexpr int CH = COLS / V;
  for (int e = threadIdx.x; e < ROWS * CH; e += NT) {
    int r = e / CH, c = (e % CH) * V;
    int gr = r0 + r, gc = c0 + c;
    T* d = dst + r * LD + c;
    if (vec && gr < rmax && gc + V <= cmax) {
      *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(src + (int64_t)gr * ld + gc);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        d[v] = (gr < rmax && gc + v < cmax) ? src[(int64_t)gr * ld + gc + v] : zero_value<T>();
    }
  }
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// As load_tile, with the in-bounds aligned 16-byte chunks copied asynchronously (cp.async);
// the caller commits, waits and synchronises before reading.
template <typename T, int ROWS, int COLS, int LD>
__device__ __forceinline__ void load_tile_async(T* dst, const T* __restrict__ src, int64_t ld, int r0, int rmax,
                                                int c0, int cmax, bool vec) {
  constexpr int V = Tiles<T>::V;
  constexpr int CH = COLS / V;
  for (int e = threadIdx.x; e < ROWS * CH; e += NT) {
    int r = e / CH, c = (e % CH) * V;
    int gr = r0 + r, gc = c0 + c;
    T* d = dst + r * LD + c;
    if (vec && gr < rmax && gc + V <= cmax) {
      cp_async16(d, src + (int64_t)gr * ld + gc);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        d[v] = (gr < rmax && gc + v < cmax) ? src[(int64_t)gr * ld + gc + v] : zero_value<T>();
    }
  }
}

// C[BM x BN] (fp32, shared, aliasing the A/B stages) = x[row0:, :] @ W[:, col0:col0+ncols].
// 16-bit inputs: WMMA m16n16k16 on two shared-memory stages, the next depth slice copied
// (cp.async) while the tensor cores work on the current one.
template <typename T, int BM>
struct Gemm {
  static __device__ void tile(const EncodeArgs& p, unsigned char* smem, int row0, int col0, int ncols) {
    using namespace nvcuda;
    constexpr int WARPS_M = BM / 16;
    constexpr int WARPS_N = NWARPS / WARPS_M;
    constexpr int WN = BN / WARPS_N;
    constexpr int NF = WN / 16;
    constexpr size_t STAGE = stage_elems<T, BM>();
    T* const base = reinterpret_cast<T*>(smem);
    float* Cs = reinterpret_cast<float*>(smem);
    const int warp = threadIdx.x / 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const T* x = static_cast<const T*>(p.x);
    const T* w = static_cast<const T*>(p.w);
    auto load_stage = [&](int stage, int k0) {
      T* As = base + stage * STAGE;
      T* Bs = As + BM * Tiles<T>::A_LD;
      load_tile_async<T, BM, BK, Tiles<T>::A_LD>(As, x, p.x_stride, row0, p.n, k0, p.d_in, p.vec);
      load_tile_async<T, BK, BN, Tiles<T>::B_LD>(Bs, w, p.w_stride, k0, p.d_in, col0, col0 + ncols, p.vec);
      cp_async_commit();
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
    for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.0f);
    const int nk = (p.d_in + BK - 1) / BK;
    load_stage(0, 0);
    for (int it = 0; it < nk; ++it) {
      if (it + 1 < nk) {
        load_stage((it + 1) & 1, (it + 1) * BK);  // its buffer was last read before the previous barrier
        cp_async_wait<1>();                       // this iteration's stage has landed
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const T* As = base + (it & 1) * STAGE;
      const T* Bs = As + BM * Tiles<T>::A_LD;
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, As + (wm * 16) * Tiles<T>::A_LD + kk, Tiles<T>::A_LD);
#pragma unroll
        for (int f = 0; f < NF; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(b, Bs + kk * Tiles<T>::B_LD + wn * WN + f * 16, Tiles<T>::B_LD);
          wmma::mma_sync(acc[f], a, b, acc[f]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int f = 0; f < NF; ++f)
      wmma::store_matrix_sync(Cs + (wm * 16) * C_LD + wn * WN + f * 16, acc[f], C_LD, wmma::mem_row_major);
    __syncthreads();
  }
};

// fp32 inputs: SIMT FMAs (exact fp32 products, no tf32 rounding).
template <int BM>
struct Gemm<float, BM> {
  static __device__ void tile(const EncodeArgs& p, unsigned char* smem, int row0, int col0, int ncols) {
    constexpr int TM = BM / 16, TN = BN / 16;
    float* As = reinterpret_cast<float*>(smem);
    float* Bs = As + BM * Tiles<float>::A_LD;
    float* Cs = reinterpret_cast<float*>(smem);
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const float* x = static_cast<const float*>(p.x);
    const float* w = static_cast<const float*>(p.w);
    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < p.d_in; k0 += BK) {
      load_tile<float, BM, BK, Tiles<float>::A_LD>(As, x, p.x_stride, row0, p.n, k0, p.d_in, p.vec);
      load_tile<float, BK, BN, Tiles<float>::B_LD>(Bs, w, p.w_stride, k0, p.d_in, col0, col0 + ncols, p.vec);
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        float a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = As[(ty * TM + i) * Tiles<float>::A_LD + kk];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = Bs[kk * Tiles<float>::B_LD + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) Cs[(ty * TM + i) * C_LD + tx + 16 * j] = acc[i][j];
    __syncthreads();
  }
};

template <typename T, int BM>
__global__ void __launch_bounds__(NT) encode_select_kernel(const EncodeArgs p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row0 = blockIdx.x * BM;
  const int split = blockIdx.y;
  const int c_begin = split * p.split_cols;
  const int c_end = min(p.d_sae, c_begin + p.split_cols);
  const bool topk = p.mode == kTopK;
  const int cp = p.kp > BN ? p.kp : BN;

  float* Cs = reinterpret_cast<float*>(smem);
  unsigned char* rest = smem + gemm_bytes<T, BM>();
  uint64_t* state = reinterpret_cast<uint64_t*>(rest);  // top-k: [BM][kp] best keys
  uint64_t* queue = state + (size_t)BM * p.kp;           // top-k: [BM][cp] candidates
  int* qcount = reinterpret_cast<int*>(queue + (size_t)BM * cp);
  int* rcount = reinterpret_cast<int*>(rest);            // threshold: [BM] counts
  const T* bias = static_cast<const T*>(p.bias);

  if (topk) {
    for (int i = threadIdx.x; i < BM * p.kp; i += NT) state[i] = kEmptyKey;
    for (int i = threadIdx.x; i < BM; i += NT) qcount[i] = 0;
  } else {
    for (int i = threadIdx.x; i < BM; i += NT) rcount[i] = 0;
  }
  __syncthreads();

  for (int col0 = c_begin; col0 < c_end; col0 += BN) {
    const int ncols = min(BN, c_end - col0);
    Gemm<T, BM>::tile(p, smem, row0, col0, ncols);
    // selection values: (acc + bias) * scale
    for (int e = threadIdx.x; e < BM * BN; e += NT) {
      int r = e / BN, c = e % BN;
      if (c < ncols) {
        int gc = col0 + c;
        float v = Cs[r * C_LD + c] + to_float(bias[gc]);
        if (p.scale) v *= p.scale[gc];
        Cs[r * C_LD + c] = v;
      }
    }
    __syncthreads();
    const float* thr = p.thr ? p.thr + col0 : nullptr;
    for (int r = warp; r < BM; r += NWARPS) {
      const int gr = row0 + r;
      if (gr >= p.n) break;
      const float* vals = Cs + r * C_LD;
      if (topk) {
        int q = qcount[r];
        q = topk_tile_row(state + (size_t)r * p.kp, queue + (size_t)r * cp, q, vals, thr, (uint32_t)col0, ncols, p.k,
                          p.kp, cp, lane, 32, WarpSync{}, WarpBallot{});
        __syncwarp();
        if (lane == 0) qcount[r] = q;
      } else {
        uint64_t* out = p.parts + ((size_t)gr * p.n_splits + split) * p.cap;
        int cnt = rcount[r];
        cnt = threshold_tile_row(out, cnt, p.cap, vals, thr, (uint32_t)col0, ncols, lane, 32, WarpBallot{});
        __syncwarp();
        if (lane == 0) rcount[r] = cnt;
      }
      __syncwarp();
    }
    __syncthreads();  // the next tile's loads overwrite C
  }

  if (topk) {
    for (int r = warp; r < BM && row0 + r < p.n; r += NWARPS) {
      const int q = qcount[r];
      if (q > 0) topk_flush(state + (size_t)r * p.kp, queue + (size_t)r * cp, q, p.kp, cp, lane, 32, WarpSync{});
    }
    __syncthreads();
    for (int e = threadIdx.x; e < BM * p.kp; e += NT) {
      int r = e / p.kp, i = e % p.kp;
      int gr = row0 + r;
      if (gr < p.n) p.parts[((size_t)gr * p.n_splits + split) * p.kp + i] = state[e];
    }
  } else {
    for (int r = threadIdx.x; r < BM; r += NT) {
      int gr = row0 + r;
      if (gr < p.n) p.counts[(size_t)gr * p.n_splits + split] = rcount[r];
    }
  }
}

__global__ void __launch_bounds__(NT) merge_topk_kernel(const uint64_t* __restrict__ parts, int n, int n_splits,
                                                        int k, int kp, int64_t* __restrict__ idx,
                                                        float* __restrict__ acts) {
  __shared__ uint64_t sm[NWARPS][2 * kMaxK];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row = blockIdx.x * NWARPS + warp;
  if (row >= n) return;
  uint64_t* state = sm[warp];
  merge_split_topk(state, state + kp, parts + (size_t)row * n_splits * kp, n_splits, kp, lane, 32, WarpSync{});
  emit_topk_row(state, k, idx + (size_t)row * k, acts + (size_t)row * k, lane, 32);
}

__global__ void __launch_bounds__(NT) merge_threshold_kernel(const uint64_t* __restrict__ parts,
                                                             const int* __restrict__ counts, int n, int n_splits,
                                                             int cap, int cap_out, int64_t* __restrict__ idx,
                                                             float* __restrict__ acts, int* __restrict__ row_counts) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row = blockIdx.x * NWARPS + warp;
  if (row >= n) return;
  int total = merge_split_threshold(parts + (size_t)row * n_splits * cap, counts + (size_t)row * n_splits, n_splits,
                                    cap, cap_out, idx + (size_t)row * cap_out, acts + (size_t)row * cap_out, lane, 32);
  if (lane == 0) row_counts[row] = total;
}

template <typename T, int BM>
void launch_encode(const EncodeArgs& a, cudaStream_t stream) {
  size_t smem = smem_bytes<T, BM>(a.mode, a.kp);
  auto kernel = encode_select_kernel<T, BM>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
             "encode_select (shared memory)");
  dim3 grid((a.n + BM - 1) / BM, a.n_splits);
  kernel<<<grid, NT, smem, stream>>>(a);
  check_cuda(cudaGetLastError(), "encode_select");
}

}  // namespace

int encode_tile_cols() { return BN; }

size_t encode_smem_bytes(int dtype, int mode, int kp, int tile_rows) {
  if (tile_rows != 32 && tile_rows != 64) throw std::invalid_argument("gradsae._C: tile_rows must be 32 or 64");
  const bool small = tile_rows == 32;
  size_t out = 0;
  GRADSAE_DISPATCH_DTYPE(dtype, T, out = small ? smem_bytes<T, 32>(mode, kp) : smem_bytes<T, 64>(mode, kp));
  return out;
}

void encode_select(int device, uintptr_t stream, const EncodeArgs& a) {
  if (a.mode == kTopK && (a.k < 1 || a.k > a.kp || a.kp > kMaxK || a.kp != topk_pad(a.kp)))
    throw std::invalid_argument("gradsae._C.encode_select: need 1 <= k <= kp <= 256, kp = topk_pad(k)");
  if (a.mode == kThreshold && a.cap < 1) throw std::invalid_argument("gradsae._C.encode_select: cap must be >= 1");
  if (a.split_cols < BN || a.split_cols % BN != 0)
    throw std::invalid_argument("gradsae._C.encode_select: split_cols must be a positive multiple of 128");
  if ((int64_t)a.n_splits * a.split_cols < a.d_sae || (int64_t)(a.n_splits - 1) * a.split_cols >= a.d_sae)
    throw std::invalid_argument("gradsae._C.encode_select: n_splits must be ceil(d_sae / split_cols)");
  if (a.tile_rows != 32 && a.tile_rows != 64) throw std::invalid_argument("gradsae._C.encode_select: tile_rows must be 32 or 64");
  if (a.n <= 0) return;
  use_device(device);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const bool small = a.tile_rows == 32;
  GRADSAE_DISPATCH_DTYPE(a.dtype, T, small ? launch_encode<T, 32>(a, s) : launch_encode<T, 64>(a, s));
}

void merge_topk(int device, uintptr_t stream, const uint64_t* parts, int n, int n_splits, int k, int kp,
                int64_t* idx, float* acts) {
  if (k < 1 || k > kp || kp > kMaxK) throw std::invalid_argument("gradsae._C.merge_topk: need 1 <= k <= kp <= 256");
  if (n <= 0) return;
  use_device(device);
  merge_topk_kernel<<<(n + NWARPS - 1) / NWARPS, NT, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      parts, n, n_splits, k, kp, idx, acts);
  check_cuda(cudaGetLastError(), "merge_topk");
}

void merge_threshold(int device, uintptr_t stream, const uint64_t* parts, const int* counts, int n, int n_splits,
                     int cap, int cap_out, int64_t* idx, float* acts, int* row_counts) {
  if (n <= 0) return;
  use_device(device);
  merge_threshold_kernel<<<(n + NWARPS - 1) / NWARPS, NT, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      parts, counts, n, n_splits, cap, cap_out, idx, acts, row_counts);
  check_cuda(cudaGetLastError(), "merge_threshold");
}

}  // namespace gradsae
