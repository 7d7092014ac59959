// RMSNorm and the fused pre-norm step (residual += x; out = rms_norm(residual)), fp32 math (norm.cuh).
// One block per row; the row is read twice (sum of squares, then scale), the second read hits L1/L2.
#include "norm.cuh"

#define NORM_KERNELS(T, NAME)                                                                                  \
    extern "C" __global__ void __launch_bounds__(1024) rms_norm_##NAME(                                        \
        T* out, const T* x, const T* weight, int hidden, float eps, int vec) {                                 \
        pdl_begin();                                                                                           \
        if (vec) rms_norm_row<T, false, true>(out, x, nullptr, weight, hidden, eps, blockIdx.x);               \
        else rms_norm_row<T, false, false>(out, x, nullptr, weight, hidden, eps, blockIdx.x);                  \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_##NAME(                                    \
        T* out, const T* x, T* residual, const T* weight, int hidden, float eps, int vec) {                    \
        pdl_begin();                                                                                           \
        if (vec) rms_norm_row<T, true, true>(out, x, residual, weight, hidden, eps, blockIdx.x);               \
        else rms_norm_row<T, true, false>(out, x, residual, weight, hidden, eps, blockIdx.x);                  \
    }

NORM_KERNELS(bf16, bf16)
NORM_KERNELS(f16, f16)
