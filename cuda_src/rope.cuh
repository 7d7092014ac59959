// The rotation of one rotary-embedding pair, shared by rope_kv.cu and the projection epilogue that fuses it
// (mma.cuh finish_small_m_tile_rope), so both give the same bits.
#pragma once
#include "common.cuh"

// Angle pos * inv_freq[i]. Full-precision sincosf: arguments reach 1e5 rad at long positions, where __sinf is
// useless.
__device__ __forceinline__ void rope_angle(int position, float inv_freq, float& sin_i, float& cos_i) {
    sincosf((float)position * inv_freq, &sin_i, &cos_i);
}

// (x0, x1) -> (x0 c - x1 s, x1 c + x0 s), rounded to T. Roundings spelled out: left to itself the compiler picks
// which product to fuse into an fma from the shape of the surrounding code, and a one-ulp change here flips
// bf16 roundings downstream (the default model's first greedy step is a near tie). These are the ones ptxas
// chose for rope_kv.cu's first version (read off its SASS): the x0 c and x1 c products fused, the other two
// rounded.
template <typename T>
__device__ __forceinline__ void rope_rotate(float x0, float x1, float cos_i, float sin_i, T& lo, T& hi) {
    lo = from_float<T>(__fmaf_rn(x0, cos_i, -__fmul_rn(x1, sin_i)));
    hi = from_float<T>(__fmaf_rn(x1, cos_i, __fmul_rn(x0, sin_i)));
}

// Where the projection epilogue puts what rope_kv.cu would: positions [M], slots [M] (< 0: no store), the
// caches [num_blocks, block_size, n_kv, head_dim], and the frequencies [head_dim / 2].
template <typename T>
struct RopeArgs {
    const int* positions;
    const float* inv_freq;
    const int* slots;
    T* k_cache;
    T* v_cache;
    int n_heads, n_kv, head_dim;
};
