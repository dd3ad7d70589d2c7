// Shared by every kernel file. Included textually (build.rs passes -I kernels to nvcc; the
// NVRTC fallback splices this file in place of its #include line), so it needs no other header
// than the CUDA half-precision ones.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned int u32;
typedef unsigned long long u64;

// -∞ without <math.h>'s INFINITY, which NVRTC does not provide.
#define NEG_INF __int_as_float(0xff800000)

// Storage dtypes: weights stay in their checkpoint dtype, arithmetic is f32.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even, as the host's `half` crate rounds: CPU and GPU outputs agree bit for
// bit whenever their f32 values do. (Overloads on a tag rather than explicit specialisations,
// so every helper here can be an internal-linkage function when the kernels are compiled as
// host C++ by the software device.)
__device__ __forceinline__ float round_to(float v, const float*) { return v; }
__device__ __forceinline__ __half round_to(float v, const __half*) { return __float2half_rn(v); }
__device__ __forceinline__ __nv_bfloat16 round_to(float v, const __nv_bfloat16*) {
    return __float2bfloat16_rn(v);
}
template <typename T> __device__ __forceinline__ T from_f32(float v) {
    return round_to(v, static_cast<const T*>(nullptr));
}

// One 16-byte vector of T: 4 f32 or 8 f16/bf16. Loads of weights go through these so every
// memory transaction is a full 128-bit one.
template <typename T> struct Vec16 {
    static constexpr int N = 16 / sizeof(T);
};

// The halves of a 32-bit word as f32: bit operations only, so the loaded vector stays in
// registers (taking its address would put it on the stack).
__device__ __forceinline__ void unpack2(u32 w, float* v, const __half*) {
    v[0] = __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
    v[1] = __half2float(__ushort_as_half((unsigned short)(w >> 16)));
}
__device__ __forceinline__ void unpack2(u32 w, float* v, const __nv_bfloat16*) {
    v[0] = __uint_as_float(w << 16);
    v[1] = __uint_as_float(w & 0xffff0000u);
}

__device__ __forceinline__ void load16(const float* __restrict__ p, float (&v)[4]) {
    const float4 x = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = x.x;
    v[1] = x.y;
    v[2] = x.z;
    v[3] = x.w;
}

template <typename T>
__device__ __forceinline__ void load16(const T* __restrict__ p, float (&v)[8]) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    unpack2(raw.x, v, p);
    unpack2(raw.y, v + 2, p);
    unpack2(raw.z, v + 4, p);
    unpack2(raw.w, v + 6, p);
}

template <typename T>
__device__ __forceinline__ void store16(T* __restrict__ p, const float (&v)[Vec16<T>::N]) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < Vec16<T>::N; ++k) e[k] = from_f32<T>(v[k]);
    *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<u64>(p) & 15) == 0;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = (lane < warps) ? partial[lane] : 0.0f;
    return warp_sum(v);
}

// Instantiates an extern "C" kernel per storage dtype: NAME_f32, NAME_f16, NAME_bf16.
#define FOR_EACH_DTYPE(INSTANTIATE) \
    INSTANTIATE(f32, float)         \
    INSTANTIATE(f16, __half)        \
    INSTANTIATE(bf16, __nv_bfloat16)
