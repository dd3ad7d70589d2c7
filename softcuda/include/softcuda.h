// softcuda: the CUDA built-ins the project's kernels use, for host C++. Each CUDA thread of a
// block is one host thread (threadIdx & co. are thread-locals); __syncthreads is a barrier over
// the block's threads, the warp shuffles exchange values through a per-warp slot array between
// two warp barriers, and __shared__ variables are static storage in one linker section that the
// runtime poisons before every block (blocks run one at a time, in any order). 16-bit floats
// round to nearest even as the CUDA intrinsics do, and vector types carry CUDA's alignment, so a
// misaligned 16-byte access is caught by UBSan. Included first in every kernel translation unit
// (the runtime compiles `kernels/*.cu` as C++ with it), never by the GPU build.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
// Internal linkage: a __shared__ variable in a helper is then a plain static of its translation
// unit, which the one poisoned section can hold (a COMDAT one could not).
#define __forceinline__ static inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("softcuda_shared")))

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
typedef dim3 uint3;

extern thread_local uint3 threadIdx;
extern thread_local dim3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};

namespace softcuda {
void syncthreads();
// Exchanges a 32-bit value with lane `lane ^ xor_mask` of this thread's warp.
uint32_t shfl_xor(uint32_t mask, uint32_t bits, int xor_mask);
[[noreturn]] void fail(const char* what);

template <typename T> T bits_as(uint32_t b) {
    T v;
    std::memcpy(&v, &b, sizeof v);
    return v;
}
template <typename T> uint32_t as_bits(T v) {
    uint32_t b = 0;
    std::memcpy(&b, &v, sizeof v);
    return b;
}
}  // namespace softcuda

inline void __syncthreads() { softcuda::syncthreads(); }

template <typename T> inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask) {
    static_assert(sizeof(T) == 4, "softcuda shuffles 32-bit values");
    return softcuda::bits_as<T>(softcuda::shfl_xor(mask, softcuda::as_bits(v), lane_mask));
}

template <typename T> inline T __ldg(const T* p) { return *p; }

inline float __int_as_float(int i) { return softcuda::bits_as<float>(static_cast<uint32_t>(i)); }
inline float __uint_as_float(unsigned int u) { return softcuda::bits_as<float>(u); }
inline unsigned int __float_as_uint(float f) { return softcuda::as_bits(f); }
inline int __float_as_int(float f) { return static_cast<int>(softcuda::as_bits(f)); }

// ---- 16-bit floats: storage types and the CUDA conversions (round to nearest even) ----
struct __half {
    unsigned short bits;
};
struct __nv_bfloat16 {
    unsigned short bits;
};

inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }

inline float __half2float(__half h) {
    const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
    uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
    if (exp == 0x1f) return softcuda::bits_as<float>(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return softcuda::bits_as<float>(sign);
        // Subnormal: normalise.
        int e = -1;
        do {
            man <<= 1;
            ++e;
        } while ((man & 0x400u) == 0);
        man &= 0x3ffu;
        return softcuda::bits_as<float>(sign | ((uint32_t)(112 - e) << 23) | (man << 13));
    }
    return softcuda::bits_as<float>(sign | ((exp + 112) << 23) | (man << 13));
}

inline __half __float2half_rn(float f) {
    const uint32_t x = softcuda::as_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)  // Inf or NaN (quiet NaN kept a NaN)
        return __half{(unsigned short)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0))};
    if (ax >= 0x477ff000u) return __half{(unsigned short)(sign | 0x7c00u)};  // rounds to Inf
    if (ax < 0x38800000u) {  // subnormal half (or zero)
        if (ax < 0x33000000u) return __half{(unsigned short)sign};  // below half of the least
        const uint32_t e = ax >> 23, man = (ax & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126 - e;  // man >> shift is the subnormal mantissa (of 2^-24)
        uint32_t h = man >> shift;
        const uint32_t rem = man & ((1u << shift) - 1), half_ulp = 1u << (shift - 1);
        if (rem > half_ulp || (rem == half_ulp && (h & 1))) ++h;
        return __half{(unsigned short)(sign | h)};
    }
    uint32_t h = ((ax >> 13) - (112u << 10));
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
    return __half{(unsigned short)(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return softcuda::bits_as<float>((uint32_t)b.bits << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const uint32_t x = softcuda::as_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(unsigned short)((x >> 16) | 0x40u)};
    const uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
    return __nv_bfloat16{(unsigned short)(rounded >> 16)};
}

inline __half __float2half(float f) { return __float2half_rn(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
