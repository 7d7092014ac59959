// RMSNorm of one row, optionally fused with the residual add (residual += x; out = rms_norm(residual)), fp32
// math: norm.cu's kernels and allreduce.cu's fused all-reduce + add + norm share it, so both give the same bits.
#pragma once
#include "common.cuh"

// One vector of the residual add: round(x + r) to T, as the residual stream is stored, its squares added to
// sum_sq in element order. Returns the new residual vector.
template <typename T>
__device__ __forceinline__ uint4 add_vec(const uint4& x, const uint4& r, float& sum_sq) {
    float a[8], b[8];
    unpack8<T>(x, a);
    unpack8<T>(r, b);
#pragma unroll
    for (int i = 0; i < 8; ++i) a[i] = to_float(from_float<T>(a[i] + b[i]));
#pragma unroll
    for (int i = 0; i < 8; ++i) sum_sq = __fmaf_rn(a[i], a[i], sum_sq);
    return pack8<T>(a);
}

// 1 / rms of the row from the block's threads' sums of squares (every thread of the block calls it).
__device__ __forceinline__ float norm_rstd(float sum_sq, int hidden, float eps) {
    __shared__ float scratch[32];
    return rsqrtf(__fadd_rn(__fdiv_rn(block_sum(sum_sq, scratch), (float)hidden), eps));
}

// One vector of the output: (a rstd) w.
template <typename T>
__device__ __forceinline__ uint4 scale_vec(const uint4& x, const uint4& weight, float rstd) {
    float a[8], w[8];
    unpack8<T>(x, a);
    unpack8<T>(weight, w);
#pragma unroll
    for (int i = 0; i < 8; ++i) a[i] = __fmul_rn(__fmul_rn(a[i], rstd), w[i]);
    return pack8<T>(a);
}

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
    const size_t row = (size_t)index * hidden;
    const T* src = ADD ? residual + row : x + row;
    float sum_sq = 0.f;
    if (VEC) {
        const int n_vec = hidden >> 3;
        for (int v = threadIdx.x; v < n_vec; v += blockDim.x) {
            const uint4 xv = reinterpret_cast<const uint4*>(x + row)[v];
            if (ADD) {
                reinterpret_cast<uint4*>(residual + row)[v] =
                    add_vec<T>(xv, reinterpret_cast<const uint4*>(residual + row)[v], sum_sq);
            } else {
                float a[8];
                unpack8<T>(xv, a);
#pragma unroll
                for (int i = 0; i < 8; ++i) sum_sq = __fmaf_rn(a[i], a[i], sum_sq);
            }
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
    const float rstd = norm_rstd(sum_sq, hidden, eps);
    if (VEC) {
        const int n_vec = hidden >> 3;
        for (int v = threadIdx.x; v < n_vec; v += blockDim.x)
            reinterpret_cast<uint4*>(out + row)[v] = scale_vec<T>(reinterpret_cast<const uint4*>(src)[v],
                                                                  reinterpret_cast<const uint4*>(weight)[v], rstd);
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x)
            out[row + i] = from_float<T>(__fmul_rn(__fmul_rn(to_float(src[i]), rstd), to_float(weight[i])));
    }
}

// The norm kernels' shape for rows of at most blockDim.x vectors (every hidden size up to 8,192: kernels.py sizes the
// block by the row), one vector per thread: rms_norm_row's arithmetic and bits, with the thread's vector kept in
// registers between the two passes instead of read back, and the norm weight's vector `wv` loaded by the caller
// before its PDL wait (norm_weight_early): the pass after the block's reduction then waits on no memory. ADD as
// rms_norm_row's; out may alias x.
template <typename T>
__device__ __forceinline__ uint4 norm_weight_early(const T* weight, int hidden) {
    const unsigned v = threadIdx.x;
    return (int)v < (hidden >> 3) ? reinterpret_cast<const uint4*>(weight)[v] : make_uint4(0, 0, 0, 0);
}
template <typename T, bool ADD>
__device__ __forceinline__ void rms_norm_row1(T* out, const T* x, T* residual, uint4 wv, int hidden, float eps,
                                              unsigned index) {
    const size_t row = (size_t)index * hidden;
    const int v = threadIdx.x;
    const bool mine = v < (hidden >> 3);
    float sum_sq = 0.f;
    uint4 a = make_uint4(0, 0, 0, 0);
    if (mine) {
        const uint4 xv = reinterpret_cast<const uint4*>(x + row)[v];
        if (ADD) {
            a = add_vec<T>(xv, reinterpret_cast<const uint4*>(residual + row)[v], sum_sq);
            reinterpret_cast<uint4*>(residual + row)[v] = a;
        } else {
            a = xv;
            float f[8];
            unpack8<T>(xv, f);
#pragma unroll
            for (int i = 0; i < 8; ++i) sum_sq = __fmaf_rn(f[i], f[i], sum_sq);
        }
    }
    const float rstd = norm_rstd(sum_sq, hidden, eps);
    if (mine) reinterpret_cast<uint4*>(out + row)[v] = scale_vec<T>(a, wv, rstd);
}

// A pre-norm folded into the projection that reads its output (one token on one GPU: gemv_quant.cu's _x1n kernels,
// gemv.cu's _m1n): r' = resid_in + delta goes to resid_out (block 0 writes it; every block reads resid_in), and the
// projection's x is rms_norm(r') * weight. All bf16.
struct PreNorm {
    const bf16* delta;
    const bf16* resid_in;
    bf16* resid_out;
    const bf16* weight;
    float eps;
};

// The fold's three loads for the vector at element k (zeros where !in): delta and r through L2 (written by earlier
// kernels), the norm weight read-only.
__device__ __forceinline__ void fold_load(const PreNorm& pn, int k, bool in, uint4& d, uint4& r, uint4& w) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
    d = in ? __ldcg(reinterpret_cast<const uint4*>(pn.delta + k)) : zero;
    r = in ? __ldcg(reinterpret_cast<const uint4*>(pn.resid_in + k)) : zero;
    w = in ? __ldg(reinterpret_cast<const uint4*>(pn.weight + k)) : zero;
}

// The folds that leave rstd to the end (Q4_0's and Q4_1's _x1n, bf16's _m1n): one vector of r' (d + r rounded to bf16, as
// add_vec; written to out[k..k+7] where `write`), its squares added to sum_sq, and r' * w rounded to bf16 (no
// rstd: the projection multiplies its sums by it, one number per token).
__device__ __forceinline__ uint4 fold_vec(const uint4& d, const uint4& r, const uint4& w, float& sum_sq, bool write,
                                          bf16* out, int k) {
    float a[8], rr[8], ww[8];
    unpack8<bf16>(d, a);
    unpack8<bf16>(r, rr);
    unpack8<bf16>(w, ww);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        a[e] = to_float(from_float<bf16>(a[e] + rr[e]));
        sum_sq = __fmaf_rn(a[e], a[e], sum_sq);
    }
    if (write) reinterpret_cast<uint4*>(out)[k >> 3] = pack8<bf16>(a);
#pragma unroll
    for (int e = 0; e < 8; ++e) a[e] = __fmul_rn(a[e], ww[e]);
    return pack8<bf16>(a);
}

// rstd from each warp's sum of squares (lane values, any order within the warp), added in warp order after one block
// barrier: every block of a launch computes the same number. All threads of the block call it.
template <int WARPS>
__device__ __forceinline__ float fold_rstd(float sum_sq, int hidden, float eps, int warp, int lane) {
    __shared__ float fold_ss[WARPS];
    sum_sq = warp_sum(sum_sq);
    if (lane == 0) fold_ss[warp] = sum_sq;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < WARPS; ++i) total += fold_ss[i];
    return rsqrtf(__fadd_rn(__fdiv_rn(total, (float)hidden), eps));
}
