// RMSNorm of one row, optionally fused with the residual add (residual += x; out = rms_norm(residual)), fp32
// math: norm.cu's kernels and allreduce.cu's fused all-reduce + add + norm share it, so both give the same bits.
#pragma once
#include "common.cuh"

// ADD: residual += x first (stored rounded to T, as the model's own residual stream is), then the
// norm is taken over that rounded residual. out may alias x: every x element is read before the
// block-wide reduction that precedes the first write of out.
// The roundings are spelled out (fma for the sum of squares, then (a rstd) w), as the compiler chose them
// before: left implicit, its contraction choices can change with the shape of the code around them.
// Row `index` of [rows, hidden] arrays; the block's threads split it as the norm kernels launch them (a
// different block size would sum the squares in another order).
template <typename T, bool ADD, bool VEC>
__device__ __forceinline__ void rms_norm_row(T* out, const T* x, T* residual, const T* weight, int hidden,
                                             float eps, unsigned index) {
    __shared__ float scratch[32];
    const size_t row = (size_t)index * hidden;
    const T* src = ADD ? residual + row : x + row;
    float sum_sq = 0.f;
    if (VEC) {
        const int n_vec = hidden >> 3;
        for (int v = threadIdx.x; v < n_vec; v += blockDim.x) {
            float a[8];
            unpack8<T>(reinterpret_cast<const uint4*>(x + row)[v], a);
            if (ADD) {
                float r[8];
                unpack8<T>(reinterpret_cast<const uint4*>(residual + row)[v], r);
#pragma unroll
                for (int i = 0; i < 8; ++i) a[i] = to_float(from_float<T>(a[i] + r[i]));
                reinterpret_cast<uint4*>(residual + row)[v] = pack8<T>(a);
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) sum_sq = __fmaf_rn(a[i], a[i], sum_sq);
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            float a = to_float(x[row + i]);
            if (ADD) {
                T s = from_float<T>(a + to_float(residual[row + i]));
                residual[row + i] = s;
                a = to_float(s);
            }
            sum_sq = __fmaf_rn(a, a, sum_sq);
        }
    }
    const float rstd = rsqrtf(__fadd_rn(__fdiv_rn(block_sum(sum_sq, scratch), (float)hidden), eps));
    if (VEC) {
        const int n_vec = hidden >> 3;
        for (int v = threadIdx.x; v < n_vec; v += blockDim.x) {
            float a[8], w[8];
            unpack8<T>(reinterpret_cast<const uint4*>(src)[v], a);
            unpack8<T>(reinterpret_cast<const uint4*>(weight)[v], w);
#pragma unroll
            for (int i = 0; i < 8; ++i) a[i] = __fmul_rn(__fmul_rn(a[i], rstd), w[i]);
            reinterpret_cast<uint4*>(out + row)[v] = pack8<T>(a);
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x)
            out[row + i] = from_float<T>(__fmul_rn(__fmul_rn(to_float(src[i]), rstd), to_float(weight[i])));
    }
}
