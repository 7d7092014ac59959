// Rotary embedding of q and k (HF rotate_half layout: element i pairs with i + head_dim/2) fused with
// the store of k and v into the paged KV cache.
//   qkv      [T, (n_heads + 2 n_kv) * head_dim]: q and k are rotated in place
//   k_cache, v_cache [num_blocks, block_size, n_kv, head_dim]: token t goes to flat slot slot_mapping[t]
//            (= block * block_size + offset, so the cache is indexed by slot alone); slot < 0 = padding.
#include "common.cuh"

#define ROPE_MAX_HALF 128  // head_dim <= 256

template <typename T>
__device__ __forceinline__ void rotate_pairs(T* head0, int n_heads, int head_dim, const float* cos_t,
                                             const float* sin_t) {
    const int half = head_dim >> 1;
    for (int p = threadIdx.x; p < n_heads * half; p += blockDim.x) {
        const int h = p / half, i = p - h * half;
        T* x = head0 + h * head_dim;
        const float x0 = to_float(x[i]), x1 = to_float(x[i + half]);
        x[i] = from_float<T>(x0 * cos_t[i] - x1 * sin_t[i]);
        x[i + half] = from_float<T>(x1 * cos_t[i] + x0 * sin_t[i]);
    }
}

// grid: one block per token.
template <typename T>
__device__ __forceinline__ void rope_store_kv_token(T* qkv, const int* positions, const float* inv_freq,
                                                    T* k_cache, T* v_cache, const int* slot_mapping,
                                                    int n_heads, int n_kv, int head_dim) {
    __shared__ float cos_t[ROPE_MAX_HALF], sin_t[ROPE_MAX_HALF];
    const int t = blockIdx.x;
    const int half = head_dim >> 1;
    const float pos = (float)positions[t];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        // Full-precision sincosf: arguments reach 1e5 rad at long positions, where __sinf is useless.
        sincosf(pos * inv_freq[i], &sin_t[i], &cos_t[i]);
    }
    __syncthreads();

    T* row = qkv + (size_t)t * (n_heads + 2 * n_kv) * head_dim;
    T* k = row + n_heads * head_dim;
    const T* v = k + n_kv * head_dim;
    rotate_pairs<T>(row, n_heads, head_dim, cos_t, sin_t);
    rotate_pairs<T>(k, n_kv, head_dim, cos_t, sin_t);

    const int slot = slot_mapping[t];
    if (slot < 0) return;
    __syncthreads();  // the rotated k written above by other threads is copied below
    const int kv_width = n_kv * head_dim;
    T* k_dst = k_cache + (size_t)slot * kv_width;
    T* v_dst = v_cache + (size_t)slot * kv_width;
    if ((head_dim & 7) == 0) {
        for (int c = threadIdx.x; c < kv_width >> 3; c += blockDim.x) {
            reinterpret_cast<uint4*>(k_dst)[c] = reinterpret_cast<const uint4*>(k)[c];
            reinterpret_cast<uint4*>(v_dst)[c] = reinterpret_cast<const uint4*>(v)[c];
        }
    } else {
        for (int c = threadIdx.x; c < kv_width; c += blockDim.x) {
            k_dst[c] = k[c];
            v_dst[c] = v[c];
        }
    }
}

#define ROPE_KERNELS(T, NAME)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) rope_store_kv_##NAME(                              \
        T* qkv, const int* positions, const float* inv_freq, T* k_cache, T* v_cache,                       \
        const int* slot_mapping, int n_heads, int n_kv, int head_dim) {                                    \
        pdl_begin();                                                                                       \
        rope_store_kv_token<T>(qkv, positions, inv_freq, k_cache, v_cache, slot_mapping, n_heads, n_kv,    \
                               head_dim);                                                                  \
    }

ROPE_KERNELS(bf16, bf16)
ROPE_KERNELS(f16, f16)
