// Llama inference kernels. Activations are f32 (as in the CPU reference); weights stay in
// their storage dtype and are upcast as they are read. Row-major throughout; shapes are the
// ones the `Backend` trait documents.
#include "common.cuh"

#define THREADS 256

// out[r, :] = table[ids[r], :]. Ids were range-checked on the host.
#define EMBEDDING(NAME, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS)                                     \
        embedding_##NAME(float* __restrict__ out, const T* __restrict__ table,               \
                         const u32* __restrict__ ids, u32 dim) {                              \
        const u64 row = blockIdx.x;                                                           \
        const T* src = table + (u64)ids[row] * dim;                                           \
        for (u32 d = threadIdx.x; d < dim; d += blockDim.x) out[row * dim + d] = to_f32(src[d]); \
    }
FOR_EACH_DTYPE(EMBEDDING)

// One block per row: out = w · (x / sqrt(mean(x²) + eps)), as transformers' LlamaRMSNorm.
#define RMS_NORM(NAME, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(THREADS)                                     \
        rms_norm_##NAME(float* __restrict__ out, const float* __restrict__ x,                \
                        const T* __restrict__ w, u32 dim, float eps) {                        \
        const float* xr = x + (u64)blockIdx.x * dim;                                          \
        float ss = 0.0f;                                                                      \
        for (u32 d = threadIdx.x; d < dim; d += blockDim.x) ss += xr[d] * xr[d];              \
        ss = block_sum(ss);                                                                   \
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);                                \
        float* o = out + (u64)blockIdx.x * dim;                                               \
        for (u32 d = threadIdx.x; d < dim; d += blockDim.x) o[d] = to_f32(w[d]) * (xr[d] * inv); \
    }
FOR_EACH_DTYPE(RMS_NORM)

// Rotate-half RoPE in place on x [rows, heads, head_dim]; grid (rows, heads), head_dim/2
// threads. Angles in f32 with accurate sin/cos, as the CPU reference computes them.
extern "C" __global__ void rope(float* __restrict__ x, const u32* __restrict__ positions,
                                u32 heads, u32 head_dim, const float* __restrict__ inv_freq) {
    const u32 half = head_dim / 2, i = threadIdx.x;
    if (i >= half) return;
    float* h = x + ((u64)blockIdx.x * heads + blockIdx.y) * head_dim;
    float s, c;
    sincosf(inv_freq[i] * (float)positions[blockIdx.x], &s, &c);
    const float x1 = h[i], x2 = h[i + half];
    h[i] = x1 * c - x2 * s;
    h[i + half] = x2 * c + x1 * s;
}

// cache[slots[r], positions[r], :] = src[r, :]; one block per row.
extern "C" __global__ void __launch_bounds__(THREADS)
    kv_store(float* __restrict__ cache, const float* __restrict__ src, const u32* __restrict__ slots,
             const u32* __restrict__ positions, u32 max_seq, u32 width) {
    const u64 r = blockIdx.x;
    float* dst = cache + ((u64)slots[r] * max_seq + positions[r]) * width;
    for (u32 d = threadIdx.x; d < width; d += blockDim.x) dst[d] = src[r * width + d];
}

// Causal GQA attention over a slot-indexed cache, one block of ATT_WARPS warps per
// (query row, head). Each warp takes every ATT_WARPS-th key position with an online softmax;
// lanes split head_dim (≤ 32·ATT_PER_LANE). The warps' (max, sum, acc) merge in shared memory.
#define ATT_WARPS 4
#define ATT_PER_LANE 8
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
    attention(float* __restrict__ out, const float* __restrict__ q, const float* __restrict__ k_cache,
              const float* __restrict__ v_cache, const u32* __restrict__ slots,
              const u32* __restrict__ positions, u32 num_heads, u32 num_kv_heads, u32 head_dim,
              u32 max_seq) {
    __shared__ float sm_max[ATT_WARPS], sm_sum[ATT_WARPS];
    __shared__ float sm_acc[ATT_WARPS][32 * ATT_PER_LANE];
    const u32 row = blockIdx.x, head = blockIdx.y;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 kvh = head / (num_heads / num_kv_heads);
    const u64 kv_width = (u64)num_kv_heads * head_dim;
    const u32 pos = positions[row];
    const float* qh = q + ((u64)row * num_heads + head) * head_dim;
    const u64 base = (u64)slots[row] * max_seq * kv_width + (u64)kvh * head_dim;
    const float scale = 1.0f / sqrtf((float)head_dim);  // correctly rounded, as on the host

    float qv[ATT_PER_LANE], acc[ATT_PER_LANE];
#pragma unroll
    for (int i = 0; i < ATT_PER_LANE; ++i) {
        const u32 d = lane + 32 * i;
        qv[i] = d < head_dim ? qh[d] : 0.0f;
        acc[i] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (u32 t = warp; t <= pos; t += ATT_WARPS) {
        const float* kt = k_cache + base + (u64)t * kv_width;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_PER_LANE; ++i) {
            const u32 d = lane + 32 * i;
            if (d < head_dim) s += qv[i] * kt[d];
        }
        s = warp_sum(s) * scale;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new), p = expf(s - m_new);
        l = l * corr + p;
        const float* vt = v_cache + base + (u64)t * kv_width;
#pragma unroll
        for (int i = 0; i < ATT_PER_LANE; ++i) {
            const u32 d = lane + 32 * i;
            acc[i] = acc[i] * corr + (d < head_dim ? p * vt[d] : 0.0f);
        }
        m = m_new;
    }
    if (lane == 0) {
        sm_max[warp] = m;
        sm_sum[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < ATT_PER_LANE; ++i) sm_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    if (warp != 0) return;
    // Warp 0 always saw position 0, so the merged maximum is finite; idle warps weigh 0.
    float gmax = sm_max[0];
    for (int w = 1; w < ATT_WARPS; ++w) gmax = fmaxf(gmax, sm_max[w]);
    float weight[ATT_WARPS], total = 0.0f;
    for (int w = 0; w < ATT_WARPS; ++w) {
        weight[w] = sm_sum[w] > 0.0f ? expf(sm_max[w] - gmax) : 0.0f;
        total += sm_sum[w] * weight[w];
    }
    float* o = out + ((u64)row * num_heads + head) * head_dim;
    for (int i = 0; i < ATT_PER_LANE; ++i) {
        const u32 d = lane + 32 * i;
        if (d >= head_dim) continue;
        float v = 0.0f;
        for (int w = 0; w < ATT_WARPS; ++w) v += sm_acc[w][d] * weight[w];
        o[d] = v / total;
    }
}

// gate = silu(gate) · up.
extern "C" __global__ void __launch_bounds__(THREADS)
    swiglu(float* __restrict__ gate, const float* __restrict__ up, u64 len) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// x += y.
extern "C" __global__ void __launch_bounds__(THREADS)
    add_assign(float* __restrict__ x, const float* __restrict__ y, u64 len) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x)
        x[i] += y[i];
}

// out[r, :] = x[rows[r], :].
extern "C" __global__ void __launch_bounds__(THREADS)
    gather_rows(float* __restrict__ out, const float* __restrict__ x, const u32* __restrict__ rows,
                u32 width) {
    const u64 r = blockIdx.x;
    for (u32 d = threadIdx.x; d < width; d += blockDim.x) out[r * width + d] = x[(u64)rows[r] * width + d];
}

// out[r, j] = Σ_k x[r, k]·w[j, k] for up to MATVEC_ROWS rows: one warp per output column j,
// its lanes streaming 16-byte vectors of w's row j, so w is read once per call. Decode (a few
// rows) is bound by exactly that read; larger batches go to cuBLAS.
#define MATVEC_ROWS 8
template <typename T>
__device__ __forceinline__ void matvec_rows(float* __restrict__ out, const float* __restrict__ x,
                                            const T* __restrict__ w, u32 rows, u32 n, u32 k) {
    constexpr int N = Vec16<T>::N;
    const u32 lane = threadIdx.x & 31;
    const u32 j = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (j >= n) return;
    const T* wr = w + (u64)j * k;
    float acc[MATVEC_ROWS];
#pragma unroll
    for (int r = 0; r < MATVEC_ROWS; ++r) acc[r] = 0.0f;
    if (aligned16(wr) && aligned16(x) && k % N == 0) {
        for (u32 c = lane * N; c < k; c += 32 * N) {
            float wv[N];
            load16(wr + c, wv);
#pragma unroll
            for (int r = 0; r < MATVEC_ROWS; ++r) {
                if (r < rows) {
                    const float* xr = x + (u64)r * k + c;
#pragma unroll
                    for (int t = 0; t < N; t += 4) {
                        const float4 xv = *reinterpret_cast<const float4*>(xr + t);
                        acc[r] += wv[t] * xv.x + wv[t + 1] * xv.y + wv[t + 2] * xv.z + wv[t + 3] * xv.w;
                    }
                }
            }
        }
    } else {
        for (u32 c = lane; c < k; c += 32) {
            const float wv = to_f32(wr[c]);
#pragma unroll
            for (int r = 0; r < MATVEC_ROWS; ++r)
                if (r < rows) acc[r] += wv * x[(u64)r * k + c];
        }
    }
#pragma unroll
    for (int r = 0; r < MATVEC_ROWS; ++r) {
        if (r < rows) {
            const float s = warp_sum(acc[r]);
            if (lane == 0) out[(u64)r * n + j] = s;
        }
    }
}

#define MATVEC(NAME, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS)                                    \
        matvec_##NAME(float* out, const float* x, const T* w, u32 rows, u32 n, u32 k) {      \
        matvec_rows<T>(out, x, w, rows, n, k);                                               \
    }
FOR_EACH_DTYPE(MATVEC)

// Activations rounded to the weights' dtype for a cuBLAS GEMM.
#define CAST(NAME, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS)                                    \
        cast_from_f32_##NAME(T* __restrict__ out, const float* __restrict__ x, u64 len) {    \
        for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len;                    \
             i += (u64)gridDim.x * blockDim.x)                                               \
            out[i] = from_f32<T>(x[i]);                                                      \
    }
FOR_EACH_DTYPE(CAST)

// Whether (v, i) beats (best, bi) in an argmax: NaN counts as the largest value, and among
// equals the lower index wins (torch's and numpy's rule; the host's `argmax` is the same).
__device__ __forceinline__ bool argmax_better(float v, u32 i, float best, u32 bi) {
    if (bi == 0xffffffffu) return true;
    const bool vn = v != v, bn = best != best;
    if (vn || bn) return vn && (!bn || i < bi);
    return v > best || (v == best && i < bi);
}

// The warp's (max, first index of the max) in every lane.
__device__ __forceinline__ void warp_argmax(float& best, u32& idx) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const u32 oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (oi != 0xffffffffu && argmax_better(ov, oi, best, idx)) {
            best = ov;
            idx = oi;
        }
    }
}

// out[r] = argmax_j logits[r, j] (see argmax_better). One block of 1024 threads per row.
extern "C" __global__ void __launch_bounds__(1024)
    argmax_rows(u32* __restrict__ out, const float* __restrict__ logits, u32 vocab) {
    __shared__ float sm_val[32];
    __shared__ u32 sm_idx[32];
    const float* lr = logits + (u64)blockIdx.x * vocab;
    float best = NEG_INF;
    u32 idx = 0xffffffffu;
    for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float v = lr[j];
        if (argmax_better(v, j, best, idx)) {
            best = v;
            idx = j;
        }
    }
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    warp_argmax(best, idx);
    if (lane == 0) {
        sm_val[warp] = best;
        sm_idx[warp] = idx;
    }
    __syncthreads();
    if (warp != 0) return;
    const u32 warps = blockDim.x >> 5;
    best = lane < warps ? sm_val[lane] : NEG_INF;
    idx = lane < warps ? sm_idx[lane] : 0xffffffffu;
    warp_argmax(best, idx);
    if (lane == 0) out[blockIdx.x] = idx;
}

// Deterministic pseudo-random weights, uniform in [-scale, scale): element i of a tensor is a
// SplitMix64 hash of (seed, i), so the host reproduces any element (bench shapes are generated
// on the device without files).
__device__ __forceinline__ float hash_uniform(u64 seed, u64 i) {
    u64 z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);  // 24 bits: exact in f32
}

#define FILL_RANDOM(NAME, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS)                                    \
        fill_random_##NAME(T* __restrict__ out, u64 len, u64 seed, float scale) {            \
        for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len;                    \
             i += (u64)gridDim.x * blockDim.x)                                               \
            out[i] = from_f32<T>((2.0f * hash_uniform(seed, i) - 1.0f) * scale);             \
    }
FOR_EACH_DTYPE(FILL_RANDOM)
