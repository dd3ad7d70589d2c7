// Kernels that exist only to show the software device keeps its promises (tests/soft_device.rs
// launches them; they are not part of the engine).
#include <cuda_fp16.h>

// A 16-byte load from wherever `in` points: misaligned pointers must be reported.
extern "C" __global__ void softcuda_selftest_vector_load(float* out, const float* in) {
    const float4 v = *reinterpret_cast<const float4*>(in);
    out[0] = v.x + v.y + v.z + v.w;
}

// Reads shared memory before anything wrote it: the poison (all bits set) shows.
extern "C" __global__ void softcuda_selftest_shared_poison(unsigned int* out) {
    __shared__ unsigned int never_written[4];
    if (threadIdx.x == 0) out[blockIdx.x] = never_written[blockIdx.x % 4];
}

// Records the order blocks ran in (blocks run one at a time, so the counter needs no atomics).
extern "C" __global__ void softcuda_selftest_block_order(unsigned int* out, unsigned int* next) {
    if (threadIdx.x == 0) out[(*next)++] = blockIdx.x;
}
