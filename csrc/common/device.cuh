// Host and device helpers of the CUDA kernels: pointer validation and the
// device guard, launch sizing, 16-bit loads/stores, block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/check.h"
#include "common/cuda_check.cuh"
#include "common/dtype.h"

namespace opcm::cuda {

// ---------------------------------------------------------------- host side

inline cudaStream_t as_stream(addr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// The device that owns `p`; a bad-argument error naming `arg` of `fn` when `p`
// is not CUDA device (or managed) memory.
inline int device_of(addr_t p, const char* fn, const char* arg) {
  OPCM_CHECK_ARG(p != 0, fn, arg, "is a null address");
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(p));
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it
    OPCM_CHECK_ARG(false, fn, arg, "is not a CUDA pointer: ", cudaGetErrorString(err));
  }
  OPCM_CHECK_ARG(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged, fn, arg,
                 "is not CUDA device memory (host or unregistered memory)");
  return attr.device;
}

// Checks that every non-null pointer lives on the device of the first one and
// returns that device.
struct NamedPtr {
  addr_t p;
  const char* name;
};
template <std::size_t N>
inline int common_device(const char* fn, const NamedPtr (&ptrs)[N]) {
  int dev = -1;
  const char* first = nullptr;
  for (const NamedPtr& np : ptrs) {
    if (np.p == 0) continue;
    const int d = device_of(np.p, fn, np.name);
    if (dev < 0) {
      dev = d;
      first = np.name;
    } else {
      OPCM_CHECK_ARG(d == dev, fn, np.name, "is on cuda:", d, " but ", first, " is on cuda:", dev);
    }
  }
  OPCM_CHECK_ARG(dev >= 0, fn, ptrs[0].name, "is a null address (no device pointer given)");
  return dev;
}

// Makes `device` current for the scope (the caller's stream belongs to the
// tensors' device, which need not be the current one) and restores it.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    OPCM_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) {
      OPCM_CUDA_CHECK(cudaSetDevice(device));
      changed_ = true;
    }
    // Drop a stale non-sticky error left by someone else's failed call so the
    // launch checks below report only our own launches.
    (void)cudaGetLastError();
  }
  ~DeviceGuard() {
    if (changed_) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

// Multiprocessor count of the current device (queried each call: the
// attribute read is cheap and avoids a cache keyed by device).
inline int sm_count() {
  int dev = 0, sms = 0;
  OPCM_CUDA_CHECK(cudaGetDevice(&dev));
  OPCM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms > 0 ? sms : 1;
}

// Blocks for a grid-stride loop over `work_items` with `threads` per block:
// enough to fill the device a few times over, never more than the work.
inline unsigned grid_for(std::int64_t work_items, int threads, int blocks_per_sm = 8) {
  const std::int64_t needed = (work_items + threads - 1) / threads;
  const std::int64_t cap = static_cast<std::int64_t>(sm_count()) * blocks_per_sm;
  std::int64_t g = needed < cap ? needed : cap;
  if (g < 1) g = 1;
  return static_cast<unsigned>(g);
}

// -------------------------------------------------------------- device side

// One element of a stored fp32/fp16/bf16 array as float (exact widening).
__device__ __forceinline__ float load_as_float(const void* p, int dt, std::int64_t i) {
  if (dt == kFloat32) return static_cast<const float*>(p)[i];
  if (dt == kFloat16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

// Elements 4q .. 4q+3 as a float4; the caller guarantees that the address is
// aligned to 4 elements (16 bytes for fp32, 8 bytes for fp16/bf16).
__device__ __forceinline__ float4 load4_as_float(const void* p, int dt, std::int64_t q) {
  if (dt == kFloat32) return static_cast<const float4*>(p)[q];
  const uint2 raw = static_cast<const uint2*>(p)[q];  // 4 x 16 bit, element 0 in the low half
  const unsigned short e0 = static_cast<unsigned short>(raw.x & 0xffffu);
  const unsigned short e1 = static_cast<unsigned short>(raw.x >> 16);
  const unsigned short e2 = static_cast<unsigned short>(raw.y & 0xffffu);
  const unsigned short e3 = static_cast<unsigned short>(raw.y >> 16);
  if (dt == kFloat16) {
    return make_float4(__half2float(__ushort_as_half(e0)), __half2float(__ushort_as_half(e1)),
                       __half2float(__ushort_as_half(e2)), __half2float(__ushort_as_half(e3)));
  }
  return make_float4(__bfloat162float(__ushort_as_bfloat16(e0)),
                     __bfloat162float(__ushort_as_bfloat16(e1)),
                     __bfloat162float(__ushort_as_bfloat16(e2)),
                     __bfloat162float(__ushort_as_bfloat16(e3)));
}

// float -> stored dtype, round to nearest even.
__device__ __forceinline__ unsigned short float_to_16(float x, int dt) {
  return dt == kFloat16 ? __half_as_ushort(__float2half_rn(x))
                        : __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

__device__ __forceinline__ void store_from_float(void* p, int dt, std::int64_t i, float x) {
  if (dt == kFloat32) {
    static_cast<float*>(p)[i] = x;
  } else {
    static_cast<unsigned short*>(p)[i] = float_to_16(x, dt);
  }
}

__device__ __forceinline__ void store4_from_float(void* p, int dt, std::int64_t q, float4 x) {
  if (dt == kFloat32) {
    static_cast<float4*>(p)[q] = x;
    return;
  }
  uint2 raw;
  raw.x = static_cast<unsigned>(float_to_16(x.x, dt)) |
          (static_cast<unsigned>(float_to_16(x.y, dt)) << 16);
  raw.y = static_cast<unsigned>(float_to_16(x.z, dt)) |
          (static_cast<unsigned>(float_to_16(x.w, dt)) << 16);
  static_cast<uint2*>(p)[q] = raw;
}

__device__ __forceinline__ double sq4(float4 v) {
  const double x = v.x, y = v.y, z = v.z, w = v.w;
  return x * x + y * y + z * z + w * w;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum of `v` over the block; the result is valid in thread 0 only. Every
// thread of the block must call it (it synchronises). blockDim.x must be a
// multiple of 32 and at most 1024.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double partial[32];
  __syncthreads();  // a previous block_sum in the same kernel may still be reading `partial`
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  v = (threadIdx.x < nwarps) ? partial[threadIdx.x] : 0.0;
  if (warp == 0) v = warp_sum(v);
  return v;
}

}  // namespace opcm::cuda
