// SwiGLU: out[t, i] = silu(gate[t, i]) * up[t, i], with gate_up[t] = [gate | up] as the merged
// gate/up projection produces it, or (the GPU model's layout) with gate and up rows interleaved,
// gate_up[t] = [g0 u0 g1 u1 ...]. fp32 math, one rounding.
#include "common.cuh"

// grid-stride over rows x 8-element vectors (VEC: inter % 8 == 0) or over single elements.
template <typename T, bool VEC>
__device__ __forceinline__ void silu_mul_impl(T* out, const T* gate_up, int n_tokens, int inter) {
    const int width = VEC ? inter >> 3 : inter;
    const size_t total = (size_t)n_tokens * width;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const size_t t = idx / width;
        const int c = (int)(idx - t * width);
        const T* gate = gate_up + t * 2 * inter;
        if (VEC) {
            float g[8], u[8];
            unpack8<T>(reinterpret_cast<const uint4*>(gate)[c], g);
            unpack8<T>(reinterpret_cast<const uint4*>(gate + inter)[c], u);
#pragma unroll
            for (int i = 0; i < 8; ++i) g[i] = silu(g[i]) * u[i];
            reinterpret_cast<uint4*>(out + t * inter)[c] = pack8<T>(g);
        } else {
            out[t * inter + c] = from_float<T>(silu(to_float(gate[c])) * to_float(gate[inter + c]));
        }
    }
}

#define SILU_KERNELS(T, NAME)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) silu_mul_##NAME(T* out, const T* gate_up,          \
                                                                       int n_tokens, int inter, int vec) { \
        pdl_begin();                                                                                        \
        if (vec) silu_mul_impl<T, true>(out, gate_up, n_tokens, inter);                                    \
        else silu_mul_impl<T, false>(out, gate_up, n_tokens, inter);                                       \
    }

SILU_KERNELS(bf16, bf16)
SILU_KERNELS(f16, f16)

// Interleaved pairs: one 32-bit word (g_i, u_i) per output element. VEC (inter % 8 == 0, 16-byte aligned):
// eight outputs per thread from two 16-byte loads, one 16-byte store; one output per thread ran prefill-sized
// steps at two thirds of the bandwidth. Same per-element math either way.
template <typename T, bool VEC>
__device__ __forceinline__ void silu_mul_pairs_impl(T* out, const T* gate_up, int n_tokens, int inter) {
    const size_t total = (size_t)n_tokens * inter / (VEC ? 8 : 1);
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        if (VEC) {
            const uint4* src = reinterpret_cast<const uint4*>(gate_up) + 2 * idx;
            const uint4 a = src[0], b = src[1];
            const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            float f[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float2 gu = unpack2<T>(w[i]);
                f[i] = silu(gu.x) * gu.y;
            }
            reinterpret_cast<uint4*>(out)[idx] = pack8<T>(f);
        } else {
            const float2 gu = unpack2<T>(reinterpret_cast<const uint32_t*>(gate_up)[idx]);
            out[idx] = from_float<T>(silu(gu.x) * gu.y);
        }
    }
}
#define SILU_PAIRS_KERNELS(T, NAME)                                                                         \
    extern "C" __global__ void __launch_bounds__(256) silu_mul_pairs_##NAME(T* out, const T* gate_up,    \
                                                                             int n_tokens, int inter,     \
                                                                             int vec) {                   \
        pdl_begin();                                                                                        \
        if (vec) silu_mul_pairs_impl<T, true>(out, gate_up, n_tokens, inter);                              \
        else silu_mul_pairs_impl<T, false>(out, gate_up, n_tokens, inter);                                 \
    }
SILU_PAIRS_KERNELS(bf16, bf16)
SILU_PAIRS_KERNELS(f16, f16)
