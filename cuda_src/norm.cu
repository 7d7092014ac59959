// RMSNorm and the fused pre-norm step (residual += x; out = rms_norm(residual)), fp32 math (norm.cuh).
// One block per row. A row of more vectors than threads is read twice (sum of squares, then scale; the second
// read hits L1/L2); at one vector per thread the vector stays in registers (norm.cuh rms_norm_row1).
#include "norm.cuh"

// A norm kernel's body (ADD: add_rms_norm's, residual += x first). One vector per thread (vec, hidden / 8 <= block
// size): rms_norm_row1, the weight loaded before the PDL wait and the residual's row prefetched into L2 (measured:
// docs/PERFORMANCE.md, eighteenth session); otherwise rms_norm_row after the wait.
template <typename T, bool ADD>
__device__ __forceinline__ void norm_kernel(T* out, const T* x, T* residual, const T* weight, int hidden, float eps,
                                            int vec) {
    if (vec && (hidden >> 3) <= (int)blockDim.x) {
        pdl_launch_dependents();
        const uint4 wv = norm_weight_early<T>(weight, hidden);
        if (ADD && (threadIdx.x & 7) == 0 && (int)threadIdx.x < (hidden >> 3))
            prefetch_l2(residual + (size_t)blockIdx.x * hidden + 8 * threadIdx.x);  // a hint: allowed before the wait
        pdl_wait();
        rms_norm_row1<T, ADD>(out, x, residual, wv, hidden, eps, blockIdx.x);
        return;
    }
    pdl_begin();
    if (vec) rms_norm_row<T, ADD, true>(out, x, residual, weight, hidden, eps, blockIdx.x);
    else rms_norm_row<T, ADD, false>(out, x, residual, weight, hidden, eps, blockIdx.x);
}

#define NORM_KERNELS(T, NAME)                                                                                  \
    extern "C" __global__ void __launch_bounds__(1024) rms_norm_##NAME(                                        \
        T* out, const T* x, const T* weight, int hidden, float eps, int vec) {                                 \
        norm_kernel<T, false>(out, x, nullptr, weight, hidden, eps, vec);                                      \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_##NAME(                                    \
        T* out, const T* x, T* residual, const T* weight, int hidden, float eps, int vec) {                    \
        norm_kernel<T, true>(out, x, residual, weight, hidden, eps, vec);                                      \
    }

// The first layer's input at one GPU: embedding lookup (embedding.cu's rule for fed ids < 0) and its RMSNorm in
// one kernel, one block per token at the norm's block size. Each thread reads back only the elements it
// copied, so the row function sees them without a barrier, and the bits are embedding + rms_norm's.
#define EMBED_NORM_KERNELS(T, NAME)                                                                            \
    extern "C" __global__ void __launch_bounds__(1024) embedding_rms_norm_##NAME(                              \
        T* out, T* residual, const int* ids, const int* fed, const T* table, const T* weight, int vocab,       \
        int hidden, float eps, int vec) {                                                                      \
        pdl_begin();                                                                                           \
        const int id = ids[blockIdx.x];                                                                        \
        const int tok = input_token(id, fed);                                                                  \
        const bool owned = tok >= 0 && tok < vocab;                                                            \
        const T* src = table + (size_t)(owned ? tok : 0) * hidden;                                             \
        T* dst = residual + (size_t)blockIdx.x * hidden;                                                       \
        if (vec) {                                                                                             \
            for (int v = threadIdx.x; v < (hidden >> 3); v += blockDim.x)                                      \
                reinterpret_cast<uint4*>(dst)[v] =                                                             \
                    owned ? reinterpret_cast<const uint4*>(src)[v] : make_uint4(0, 0, 0, 0);                   \
            rms_norm_row<T, false, true>(out, residual, nullptr, weight, hidden, eps, blockIdx.x);             \
        } else {                                                                                               \
            for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = owned ? src[i] : from_float<T>(0.f); \
            rms_norm_row<T, false, false>(out, residual, nullptr, weight, hidden, eps, blockIdx.x);            \
        }                                                                                                      \
    }

NORM_KERNELS(bf16, bf16)
NORM_KERNELS(f16, f16)
EMBED_NORM_KERNELS(bf16, bf16)
EMBED_NORM_KERNELS(f16, f16)
