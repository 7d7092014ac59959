// Rotary embedding of q and k (HF rotate_half layout: element i pairs with i + head_dim/2) fused with
// the store of k and v into the paged KV cache.
//   qkv      [T, (n_heads + 2 n_kv) * head_dim]: q and k are rotated in place
//   k_cache, v_cache [num_blocks, block_size, n_kv, head_dim]: token t goes to flat slot slot_mapping[t]
//            (= block * block_size + offset, so the cache is indexed by slot alone); slot < 0 = padding.
#include "rope.cuh"

// One thread per rotation pair: item p of token t (grid (T, ceil(items / blockDim))) is pair i of head
// h = p / (head_dim / 2) in qkv's own head order (q heads, k heads, v heads). q and k pairs are rotated in
// place; k and v pairs also go to the cache. No loop and no barrier: an earlier version looped one block
// per token over all heads, and since the in-place stores may alias the next loads, every iteration waited
// out a memory round trip (13 us per layer for the 8B shape under ncu, nearly its o projection's 12 us).
// INTERLEAVED: the pairs are read from src, a projection whose weight rows were interleaved per head (row 2i =
// element i, row 2i + 1 = element i + head_dim/2; mpillm/cuda/model.py), and every element is written to qkv in
// the natural order, v included. (In place would race: a pair's natural slots are other pairs' sources.)
template <typename T, bool INTERLEAVED = false>
__device__ __forceinline__ void rope_store_kv_pair(T* qkv, const int* positions, const float* inv_freq,
                                                   T* k_cache, T* v_cache, const int* slot_mapping, int n_heads,
                                                   int n_kv, int head_dim, const T* src = nullptr) {
    const int t = blockIdx.x;
    const int half = head_dim >> 1;
    const int p = blockIdx.y * blockDim.x + threadIdx.x;
    const bool active = p < (n_heads + 2 * n_kv) * half;
    const int h = p / half, i = p - h * half;
    const bool rotate = active && h < n_heads + n_kv;
    // The angle and the slot depend only on the step's metadata and the constant frequencies: computed before
    // the wait, while the projection before may still be finishing.
    float sin_i = 0.f, cos_i = 1.f;
    if (rotate) rope_angle(positions[t], inv_freq[i], sin_i, cos_i);
    const int slot = active ? slot_mapping[t] : -1;
    pdl_begin();
    if (!active) return;
    T* x = qkv + ((size_t)t * (n_heads + 2 * n_kv) + h) * head_dim;
    T lo, hi;
    if constexpr (INTERLEAVED) {
        const T* pair = src + ((size_t)t * (n_heads + 2 * n_kv) + h) * head_dim + 2 * i;
        lo = pair[0], hi = pair[1];
        if (rotate) rope_rotate(to_float(lo), to_float(hi), cos_i, sin_i, lo, hi);
        x[i] = lo;
        x[i + half] = hi;
    } else {
        lo = x[i], hi = x[i + half];
        if (rotate) {
            rope_rotate(to_float(lo), to_float(hi), cos_i, sin_i, lo, hi);
            x[i] = lo;
            x[i + half] = hi;
        }
    }
    if (h >= n_heads && slot >= 0) {
        const int kv = h - n_heads;  // k heads 0..n_kv-1, then v heads
        T* dst = (kv < n_kv ? k_cache : v_cache) + ((size_t)slot * n_kv + kv % n_kv) * head_dim;
        dst[i] = lo;
        dst[i + half] = hi;
    }
}

#define ROPE_KERNELS(T, NAME)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) rope_store_kv_##NAME(                              \
        T* qkv, const int* positions, const float* inv_freq, T* k_cache, T* v_cache,                       \
        const int* slot_mapping, int n_heads, int n_kv, int head_dim) {                                    \
        rope_store_kv_pair<T>(qkv, positions, inv_freq, k_cache, v_cache, slot_mapping, n_heads, n_kv,     \
                              head_dim);                                                                   \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) rope_store_kv_interleaved_##NAME(                  \
        T* qkv, const T* src, const int* positions, const float* inv_freq, T* k_cache, T* v_cache,         \
        const int* slot_mapping, int n_heads, int n_kv, int head_dim) {                                    \
        rope_store_kv_pair<T, true>(qkv, positions, inv_freq, k_cache, v_cache, slot_mapping, n_heads,     \
                                    n_kv, head_dim, src);                                                  \
    }

ROPE_KERNELS(bf16, bf16)
ROPE_KERNELS(f16, f16)
