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

template <typename T> __device__ __forceinline__ T bits_as(unsigned short b);
template <> __device__ __forceinline__ bf16 bits_as<bf16>(unsigned short b) { return __ushort_as_bfloat16(b); }
template <> __device__ __forceinline__ f16 bits_as<f16>(unsigned short b) { return __ushort_as_half(b); }
__device__ __forceinline__ unsigned short as_bits(bf16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ unsigned short as_bits(f16 v) { return __half_as_ushort(v); }

// The interleaved path for prefill-sized steps: four adjacent pairs per thread (head_dim % 8 == 0), so every
// access is 8 or 16 bytes instead of 2. One element per thread made a 2,048-token step of the 8B shape take
// 64 us for ~60 MB of traffic. Same per-pair math as rope_store_kv_pair, so the same bits.
template <typename T>
__device__ __forceinline__ void rope_store_kv_quad(T* qkv, const T* src, const int* positions, const float* inv_freq,
                                                   T* k_cache, T* v_cache, const int* slot_mapping, int n_heads,
                                                   int n_kv, int head_dim) {
    const int t = blockIdx.x;
    const int half = head_dim >> 1, quads = half >> 2;
    const int p = blockIdx.y * blockDim.x + threadIdx.x;   // quad p of the token
    const bool active = p < (n_heads + 2 * n_kv) * quads;
    const int h = p / quads, i = (p - h * quads) * 4;     // pairs i .. i + 3 of head h
    const bool rotate = active && h < n_heads + n_kv;
    float sin_i[4] = {0.f, 0.f, 0.f, 0.f}, cos_i[4] = {1.f, 1.f, 1.f, 1.f};
    if (rotate) {
#pragma unroll
        for (int e = 0; e < 4; ++e) rope_angle(positions[t], inv_freq[i + e], sin_i[e], cos_i[e]);
    }
    const int slot = active ? slot_mapping[t] : -1;
    pdl_begin();
    if (!active) return;
    const size_t head_base = ((size_t)t * (n_heads + 2 * n_kv) + h) * head_dim;
    const uint4 pairs = *reinterpret_cast<const uint4*>(src + head_base + 2 * i);  // (lo, hi) of pairs i .. i + 3
    const uint32_t w[4] = {pairs.x, pairs.y, pairs.z, pairs.w};
    uint32_t lo_w[2] = {0u, 0u}, hi_w[2] = {0u, 0u};   // the four rotated lo and hi halves, packed
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        T lo = bits_as<T>((unsigned short)(w[e] & 0xFFFFu)), hi = bits_as<T>((unsigned short)(w[e] >> 16));
        if (rotate) rope_rotate(to_float(lo), to_float(hi), cos_i[e], sin_i[e], lo, hi);
        lo_w[e >> 1] |= (uint32_t)as_bits(lo) << (16 * (e & 1));
        hi_w[e >> 1] |= (uint32_t)as_bits(hi) << (16 * (e & 1));
    }
    const uint2 lo4 = make_uint2(lo_w[0], lo_w[1]), hi4 = make_uint2(hi_w[0], hi_w[1]);
    T* x = qkv + head_base;
    *reinterpret_cast<uint2*>(x + i) = lo4;
    *reinterpret_cast<uint2*>(x + i + half) = hi4;
    if (h >= n_heads && slot >= 0) {
        const int kv = h - n_heads;  // k heads 0..n_kv-1, then v heads
        T* dst = (kv < n_kv ? k_cache : v_cache) + ((size_t)slot * n_kv + kv % n_kv) * head_dim;
        *reinterpret_cast<uint2*>(dst + i) = lo4;
        *reinterpret_cast<uint2*>(dst + i + half) = hi4;
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
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(256) rope_store_kv_interleaved_quad_##NAME(             \
        T* qkv, const T* src, const int* positions, const float* inv_freq, T* k_cache, T* v_cache,         \
        const int* slot_mapping, int n_heads, int n_kv, int head_dim) {                                    \
        rope_store_kv_quad<T>(qkv, src, positions, inv_freq, k_cache, v_cache, slot_mapping, n_heads, n_kv, \
                              head_dim);                                                                   \
    }

ROPE_KERNELS(bf16, bf16)
ROPE_KERNELS(f16, f16)
