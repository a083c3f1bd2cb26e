// Device helpers shared by the kernels: element conversion, vector loads, warp primitives,
// error checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <stdexcept>
#include <string>

namespace gradsae {

constexpr unsigned kFullMask = 0xffffffffu;

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("gradsae._C ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

inline void use_device(int device) { check_cuda(cudaSetDevice(device), "cudaSetDevice"); }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T zero_value() {
  return static_cast<T>(0.0f);
}

// 8 consecutive elements (16-byte aligned for 16-bit types, 16-byte aligned for float) as floats.
__device__ __forceinline__ void load8(const float* p, float* f) {
  float4 a = reinterpret_cast<const float4*>(p)[0];
  float4 b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
  f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ void load8(const __half* p, float* f) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* f) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

struct WarpSync {
  __device__ __forceinline__ void operator()() const { __syncwarp(); }
};
struct WarpBallot {
  __device__ __forceinline__ uint32_t operator()(bool p) const { return __ballot_sync(kFullMask, p); }
};

// Dispatch a runtime dtype code to a C++ element type.
#define GRADSAE_DISPATCH_DTYPE(code, T, ...)                                        \
  switch (code) {                                                                   \
    case kFloat32: { using T = float; __VA_ARGS__; break; }                         \
    case kFloat16: { using T = __half; __VA_ARGS__; break; }                        \
    case kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; }                \
    default: throw std::invalid_argument("gradsae._C: unknown dtype code " + std::to_string(code)); \
  }

}  // namespace gradsae
