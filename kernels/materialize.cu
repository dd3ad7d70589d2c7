// Child materialisation: the fused weighted sum of base and experts plus the low-rank term,
// `θ = (1 − Σ a_e)·θ_b + Σ a_e·θ_e + U·diag(c)·Vᵀ`, accumulated in f32 and rounded once into
// the inference weights. The low-rank product is a GEMM (cuBLAS, tensor cores) into an f32
// tile of a few rows that the weighted-sum pass reads back while it is still in L2; this file
// holds the bandwidth-bound part and the coefficient scaling that feeds the GEMM.
#include "common.cuh"

#define MAX_SOURCES 16

// Source 0 is the base with coefficient 1 − Σ a_e; sources 1.. are the experts with a_e.
// Passed by value: the pointers and coefficients live in the kernel's parameter space.
struct Sources {
    const void* ptr[MAX_SOURCES];
    float coef[MAX_SOURCES];
    int count;
};

template <typename T>
__device__ __forceinline__ void materialize_chunk(T* __restrict__ out, const Sources& src,
                                                  const float* __restrict__ low_rank, u64 len) {
    constexpr int N = Vec16<T>::N;
    const u64 tid = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    const u64 threads = (u64)gridDim.x * blockDim.x;
    bool vec_ok = aligned16(out) && (low_rank == nullptr || aligned16(low_rank));
    for (int s = 0; s < src.count; ++s) vec_ok = vec_ok && aligned16(src.ptr[s]);
    const u64 vec_len = vec_ok ? len / N * N : 0;

    for (u64 i = tid * N; i < vec_len; i += threads * N) {
        float acc[N];
        load16(static_cast<const T*>(src.ptr[0]) + i, acc);
#pragma unroll
        for (int k = 0; k < N; ++k) acc[k] *= src.coef[0];
        for (int s = 1; s < src.count; ++s) {
            float x[N];
            load16(static_cast<const T*>(src.ptr[s]) + i, x);
#pragma unroll
            for (int k = 0; k < N; ++k) acc[k] += src.coef[s] * x[k];
        }
        if (low_rank != nullptr) {
#pragma unroll
            for (int k = 0; k < N; k += 4) {
                const float4 lr = *reinterpret_cast<const float4*>(low_rank + i + k);
                acc[k] += lr.x;
                acc[k + 1] += lr.y;
                acc[k + 2] += lr.z;
                acc[k + 3] += lr.w;
            }
        }
        store16(out + i, acc);
    }
    // Tail (and unaligned chunks): one element per thread.
    for (u64 i = vec_len + tid; i < len; i += threads) {
        float acc = to_f32(static_cast<const T*>(src.ptr[0])[i]) * src.coef[0];
        for (int s = 1; s < src.count; ++s) acc += src.coef[s] * to_f32(static_cast<const T*>(src.ptr[s])[i]);
        if (low_rank != nullptr) acc += low_rank[i];
        out[i] = from_f32<T>(acc);
    }
}

#define MATERIALIZE(NAME, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                        \
        materialize_##NAME(T* out, Sources src, const float* low_rank, u64 len) {            \
        materialize_chunk<T>(out, src, low_rank, len);                                       \
    }
FOR_EACH_DTYPE(MATERIALIZE)

// out[i, k] = u[i, k] · coef[k] for a row-major [rows, cols] matrix: U·diag(c), the left
// factor of the low-rank GEMM (c = γ − a·S, concatenated over experts).
extern "C" __global__ void __launch_bounds__(256)
    scale_columns(float* __restrict__ out, const float* __restrict__ u, const float* __restrict__ coef,
                  u64 rows, u32 cols) {
    const u64 len = rows * cols;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x)
        out[i] = u[i] * coef[i % cols];
}
