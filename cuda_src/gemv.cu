// Small-M linear layer (decode): y[M, N] = x[M, K] @ w[N, K]^T (+ bias), M <= 8 * NT.
//
// Decode is bound by reading w once, so the kernel is shaped around that stream: every weight byte is
// read once per call with 16-byte loads that bypass L1, and all M rows of x are served from that read.
// The arithmetic runs on tensor cores with the roles swapped (16 weight rows are the mma's "M", the
// up-to-8 tokens its "N"), which costs a handful of instructions per 512 weight bytes instead of the
// per-element unpack + FMA of a scalar GEMV; that is what keeps M = 8..32 bandwidth-bound too.
//
// A dot product does not care in which order k is summed, so each lane loads 16-byte vectors straight
// into mma fragments: lane (g, t) owns k = 8t..8t+7 and 32+8t..32+8t+7 of every 64-wide k block, for
// both its weight rows (g, g+8) and its token (g). Both operands use the same assignment, so the
// products pair up exactly. The loads stay coalesced: one instruction covers 64 contiguous bytes of
// each of 8 rows.
//
// Block: WARPS warps on the same 16 weight rows, interleaved over k blocks (enough warps per SM even
// when N is only 4096); partial tiles are summed through shared memory.
//
// PRENORM (gemv_*_m1n, the q/k/v and gate/up projections at one token on one GPU): the add + RMSNorm before the
// projection folded into it (stage_prenorm below), one kernel fewer per norm.
//
// SEND (gemv_send_*, the row-parallel projections at tensor parallelism): each block also sends its finished
// tile into every peer's all-reduce buffer (ll.cuh), so that the fused all-reduce + norm after it only waits
// for the peers' parts: they cross NVLink while the rest of this kernel still streams weights, instead of
// after it, from the all-reduce's few blocks.
#include "ll.cuh"
#include "mma.cuh"
#include "norm.cuh"

// Production shape (the template below also serves benchmark variants).
#define GEMV_WARPS 8
#define GEMV_UNROLL 2          // k blocks per warp step
#define GEMV_L2_PREFETCH true
#define GEMV_PIPELINE true
#define GEMV_ROWS 16      // weight rows per block (the mma M dimension)
#define GEMV_KBLOCK 64    // k elements per warp step
static_assert(GEMV_ROWS == LL_SEND_ROWS, "SEND stages whole tiles");

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
// Pair p (0..7) of a lane's 16 elements: pairs 0-3 live in `lo`, 4-7 in `hi`.
__device__ __forceinline__ uint32_t pair_of(const uint4& lo, const uint4& hi, int p) {
    return p < 4 ? word_of(lo, p) : word_of(hi, p - 4);
}

// PRENORM's staging, right after the PDL wait (everything it reads was written by kernels that have finished): each
// warp stages the k blocks it alone reads (kb = warp mod WARPS, as the main loop), x' = r' w (norm.cuh fold_vec:
// r' = r + delta, which block 0 writes to resid_out) as bf16 into shared memory, and the block's sum of squares of
// r' gives rstd, which the caller multiplies into its fp32 sums at the end: sum_k W_k (r'_k rstd w_k) = rstd
// sum_k W_k x'_k. No reduction stands between the wait and the first weights, as in gemv_quant.cu's Q4_0 fold (which
// won 3.3% where a fold that normalised first had lost 2.6%). Not add_rms_norm's bits: x' is rounded once to bf16
// where that kernel rounds r' rstd w. Returns rstd.
template <int WARPS>
__device__ __forceinline__ float stage_prenorm(uint4* __restrict__ xs, const PreNorm& pn, int K, int n_kblocks,
                                               int warp, int lane) {
    constexpr int VPB = GEMV_KBLOCK / 8;  // 16-byte vectors per k block
    const int vecs = (n_kblocks - warp + WARPS - 1) / WARPS * VPB;
    float ss = 0.f;
    for (int v0 = lane; v0 < vecs; v0 += 64) {  // 2 vectors a lane in flight: 6 loads (K up to 4,096: one trip)
        uint4 d[2], r[2], wn[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int v = v0 + 32 * i, k = (warp + WARPS * (v / VPB)) * GEMV_KBLOCK + 8 * (v % VPB);
            fold_load(pn, k, v < vecs && k < K, d[i], r[i], wn[i]);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int v = v0 + 32 * i, k = (warp + WARPS * (v / VPB)) * GEMV_KBLOCK + 8 * (v % VPB);
            const uint4 xv = fold_vec(d[i], r[i], wn[i], ss, blockIdx.x == 0 && v < vecs && k < K, pn.resid_out, k);
            if (v < vecs && k < K) xs[k >> 3] = xv;
        }
    }
    return fold_rstd<WARPS>(ss, K, pn.eps, warp, lane);  // its barrier also orders the stores before the reads
}

// L2::256B asks L2 to fetch the whole 256-byte segment around each miss: the other half of a row's
// 128 bytes is requested by the next instruction anyway.
template <bool L2_PREFETCH>
__device__ __forceinline__ uint4 ld_weight16(const void* p) {
    if (!L2_PREFETCH) return ld_stream16(p);
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

// One warp step's registers: UNROLL k blocks of both weight rows (lo/hi halves of the lane's k) and of
// the lane's token in each of the NT token tiles.
template <int UNROLL, int NT>
struct GemvStage {
    uint4 wa[UNROLL][2], wb[UNROLL][2];
    uint4 xv[UNROLL][NT][2];
};

// PIPELINE: two register stages, so the next step's loads are issued before this step's mma work and
// each warp keeps weight bytes in flight without a gap.
// ROPE: the epilogue of the q/k/v projection with rotary embedding and the KV store (finish_small_m_tile_rope).
template <typename T, typename OutT, int NT, int WARPS = GEMV_WARPS, int UNROLL = GEMV_UNROLL,
          bool L2_PREFETCH = GEMV_L2_PREFETCH, bool PIPELINE = GEMV_PIPELINE, bool SWIGLU = false, bool ROPE = false,
          bool SEND = false, bool PRENORM = false>
__device__ __forceinline__ void small_m_linear(OutT* __restrict__ y, const T* __restrict__ x,
                                               const T* __restrict__ w, const T* __restrict__ bias, int M,
                                               int N, int K, const RopeArgs<T>& rope = RopeArgs<T>{},
                                               const LlSend& send = LlSend{}, const PreNorm& prenorm = PreNorm{}) {
    static_assert(!PRENORM || (NT == 1 && PIPELINE && !SEND), "the fold: one token, the pipelined loop, no send");
    extern __shared__ __align__(16) uint4 gemv_xs[];  // PRENORM: x' (kernels.py sizes it: whole k blocks)
    __shared__ float partial[WARPS][NT * 4][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * GEMV_ROWS;
    // Rows past N are clamped onto row N-1: loads stay in bounds, results are never stored.
    const T* w_lo = w + (size_t)min(n0 + g, N - 1) * K;
    const T* w_hi = w + (size_t)min(n0 + g + 8, N - 1) * K;
    const int n_kblocks = (K + GEMV_KBLOCK - 1) / GEMV_KBLOCK;
    constexpr int STEP = WARPS * UNROLL;  // k blocks per block-wide step
    const uint4 zero = make_uint4(0, 0, 0, 0);

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

    // Loads of k blocks kb0, kb0 + WARPS, ...; blocks past the end load nothing and read as zeros. The
    // weight half and the activation half are separate so the first weights can load before pdl_wait().
    // (One lambda with weights/acts flags compiles to differently scheduled SASS for every kernel here; these
    // two loops are the code that was measured.)
    auto load_w = [&](GemvStage<UNROLL, NT>& st, int kb0) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int kb = kb0 + u * WARPS;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int k = kb * GEMV_KBLOCK + h * 32 + t * 8;
                const bool ok = kb < n_kblocks && k < K;  // K % 8 == 0: a vector is all in or all out
                st.wa[u][h] = ok ? ld_weight16<L2_PREFETCH>(w_lo + k) : zero;
                st.wb[u][h] = ok ? ld_weight16<L2_PREFETCH>(w_hi + k) : zero;
            }
        }
    };
    auto load_x = [&](GemvStage<UNROLL, NT>& st, int kb0) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int kb = kb0 + u * WARPS;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int k = kb * GEMV_KBLOCK + h * 32 + t * 8;
                const bool ok = kb < n_kblocks && k < K;
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    const int tok = j * 8 + g;
                    if constexpr (PRENORM)
                        st.xv[u][j][h] = ok && tok < M ? gemv_xs[k >> 3] : zero;
                    else
                        st.xv[u][j][h] = ok && tok < M
                                             ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)tok * K + k))
                                             : zero;
                }
            }
        }
    };
    auto load = [&](GemvStage<UNROLL, NT>& st, int kb0) {
        load_w(st, kb0);
        load_x(st, kb0);
    };
    auto compute = [&](const GemvStage<UNROLL, NT>& st) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                const uint32_t a[4] = {pair_of(st.wa[u][0], st.wa[u][1], 2 * s),
                                       pair_of(st.wb[u][0], st.wb[u][1], 2 * s),
                                       pair_of(st.wa[u][0], st.wa[u][1], 2 * s + 1),
                                       pair_of(st.wb[u][0], st.wb[u][1], 2 * s + 1)};
#pragma unroll
                for (int j = 0; j < NT; ++j)
                    mma_16816<T>(acc[j], a, pair_of(st.xv[u][j][0], st.xv[u][j][1], 2 * s),
                                 pair_of(st.xv[u][j][0], st.xv[u][j][1], 2 * s + 1));
            }
        }
    };

    __shared__ __align__(16) SendStage<T, NT> send_st;  // SEND only (unused shared memory is not allocated)
    float rstd = 1.f;  // PRENORM: the norm's scale, applied to the sums
    if (PIPELINE) {
        GemvStage<UNROLL, NT> front, back;
        load_w(front, warp);  // weights are never written by a kernel: safe before the wait
        if constexpr (SEND) send_stage_bases(send_st, send);
        pdl_begin();
        if constexpr (SEND) send_stage_flags(send_st, send, M);
        if constexpr (PRENORM) rstd = stage_prenorm<WARPS>(gemv_xs, prenorm, K, n_kblocks, warp, lane);
        load_x(front, warp);
        for (int kb0 = warp; kb0 < n_kblocks; kb0 += 2 * STEP) {
            load(back, kb0 + STEP);
            compute(front);
            load(front, kb0 + 2 * STEP);
            compute(back);
        }
    } else {
        if constexpr (SEND) send_stage_bases(send_st, send);
        pdl_begin();
        if constexpr (SEND) send_stage_flags(send_st, send, M);
        for (int kb0 = warp; kb0 < n_kblocks; kb0 += STEP) {
            GemvStage<UNROLL, NT> st;
            load(st, kb0);
            compute(st);
        }
    }

    if constexpr (PRENORM)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[0][i] *= rstd;
    if constexpr (ROPE)
        finish_small_m_tile_rope<T, WARPS, NT>(partial, acc, y, bias, n0, M, N, rope);
    else if constexpr (SEND)
        finish_small_m_tile<T, OutT, WARPS, NT, SWIGLU>(partial, acc, y, bias, n0, M, N, &send_st.out[0][0]);
    else
        finish_small_m_tile<T, OutT, WARPS, NT, SWIGLU>(partial, acc, y, bias, n0, M, N);
    if constexpr (SEND) send_tile<T, NT>(send_st, n0, M, N, send);
    trace_end();
}

// Per token-tile shape: WARPS, UNROLL, L2 prefetch, pipelining; kernels.py GEMV_THREADS and GEMV_WIDE_THREADS
// mirror WARPS.
// SHAPE names the kernel: m<NT>, or m1w for the wide block at M <= 8: 16 warps on a tile instead of 8, twice the
// weight bytes in flight per block, for launches with no more tiles than SMs, where a block per SM is all the
// parallelism there is (kernels.py GEMV_WIDE_THREADS: the q/k/v projection at TP 4).
#define GEMV_KERNEL(T, OUT_T, NAME, SHAPE, NT, WARPS, UNROLL, L2, PIPE)                                    \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) gemv_##NAME##_##SHAPE(                       \
        OUT_T* y, const T* x, const T* w, const T* bias, int M, int N, int K) {                            \
        small_m_linear<T, OUT_T, NT, WARPS, UNROLL, L2, PIPE>(y, x, w, bias, M, N, K);                     \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) gemv_swiglu_##NAME##_##SHAPE(                \
        OUT_T* y, const T* x, const T* w, const T* bias, int M, int N, int K) {                            \
        small_m_linear<T, OUT_T, NT, WARPS, UNROLL, L2, PIPE, true>(y, x, w, bias, M, N, K);               \
    }
#define GEMV_KERNELS(T, OUT_T, NAME)                      \
    GEMV_KERNEL(T, OUT_T, NAME, m1, 1, 8, 2, true, true)  \
    GEMV_KERNEL(T, OUT_T, NAME, m2, 2, 8, 2, true, true)  \
    GEMV_KERNEL(T, OUT_T, NAME, m4, 4, 8, 1, true, true)  \
    GEMV_KERNEL(T, OUT_T, NAME, m1w, 1, 16, 2, true, true)
// The q/k/v projection with rotary embedding and the KV store (same shapes as GEMV_KERNELS; output in T).
#define GEMV_ROPE_KERNEL(T, NAME, SHAPE, NT, WARPS, UNROLL, L2, PIPE)                                       \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) gemv_rope_##NAME##_##SHAPE(                   \
        T* y, const T* x, const T* w, const T* bias, int M, int N, int K, const int* positions,            \
        const float* inv_freq, const int* slots, T* k_cache, T* v_cache, int n_heads, int n_kv,             \
        int head_dim) {                                                                                     \
        small_m_linear<T, T, NT, WARPS, UNROLL, L2, PIPE, false, true>(                                     \
            y, x, w, bias, M, N, K,                                                                         \
            RopeArgs<T>{positions, inv_freq, slots, k_cache, v_cache, n_heads, n_kv, head_dim});            \
    }
#define GEMV_ROPE_KERNELS(T, NAME)                      \
    GEMV_ROPE_KERNEL(T, NAME, m1, 1, 8, 2, true, true)  \
    GEMV_ROPE_KERNEL(T, NAME, m2, 2, 8, 2, true, true)  \
    GEMV_ROPE_KERNEL(T, NAME, m4, 4, 8, 1, true, true)  \
    GEMV_ROPE_KERNEL(T, NAME, m1w, 1, 16, 2, true, true)

// The row-parallel projection that sends its tiles (SEND; output in T, the all-reduce's dtype).
#define GEMV_SEND_KERNEL(T, NAME, SHAPE, NT, WARPS, UNROLL, L2, PIPE)                                       \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) gemv_send_##NAME##_##SHAPE(                   \
        T* y, const T* x, const T* w, const T* bias, int M, int N, int K, const unsigned long long* table, \
        unsigned long long slot_bytes, int rank, int world) {                                               \
        small_m_linear<T, T, NT, WARPS, UNROLL, L2, PIPE, false, false, true>(                              \
            y, x, w, bias, M, N, K, RopeArgs<T>{}, LlSend{table, slot_bytes, rank, world});                \
    }
#define GEMV_SEND_KERNELS(T, NAME)                      \
    GEMV_SEND_KERNEL(T, NAME, m1, 1, 8, 2, true, true)  \
    GEMV_SEND_KERNEL(T, NAME, m2, 2, 8, 2, true, true)  \
    GEMV_SEND_KERNEL(T, NAME, m4, 4, 8, 1, true, true)  \
    GEMV_SEND_KERNEL(T, NAME, m1w, 1, 16, 2, true, true)

// The q/k/v and gate/up projections with the pre-norm folded in (PRENORM, _m1n: one token, bf16, 8 warps): x is not
// read; the five arguments after the usual ones are PreNorm's, and K is the hidden size. Dynamic shared memory: K
// rounded up to whole k blocks, as bf16 (kernels.py gemv_prenorm_bytes).
#define GEMV_PRENORM_ARGS const bf16 *delta, const bf16 *resid_in, bf16 *resid_out, const bf16 *norm_w, float eps
extern "C" __global__ void __launch_bounds__(256, 3) gemv_swiglu_bf16_bf16_m1n(bf16* y, const bf16* x, const bf16* w,
                                                                         const bf16* bias, int M, int N, int K,
                                                                         GEMV_PRENORM_ARGS) {
    small_m_linear<bf16, bf16, 1, 8, 2, true, true, true, false, false, true>(
        y, x, w, bias, M, N, K, RopeArgs<bf16>{}, LlSend{}, PreNorm{delta, resid_in, resid_out, norm_w, eps});
}
extern "C" __global__ void __launch_bounds__(256, 3) gemv_rope_bf16_m1n(
    bf16* y, const bf16* x, const bf16* w, const bf16* bias, int M, int N, int K, const int* positions,
    const float* inv_freq, const int* slots, bf16* k_cache, bf16* v_cache, int n_heads, int n_kv, int head_dim,
    GEMV_PRENORM_ARGS) {
    small_m_linear<bf16, bf16, 1, 8, 2, true, true, false, true, false, true>(
        y, x, w, bias, M, N, K, RopeArgs<bf16>{positions, inv_freq, slots, k_cache, v_cache, n_heads, n_kv, head_dim},
        LlSend{}, PreNorm{delta, resid_in, resid_out, norm_w, eps});
}

// NAME = <input dtype>_<output dtype>
GEMV_KERNELS(bf16, bf16, bf16_bf16)
GEMV_KERNELS(bf16, float, bf16_f32)
GEMV_KERNELS(f16, f16, f16_f16)
GEMV_KERNELS(f16, float, f16_f32)
GEMV_ROPE_KERNELS(bf16, bf16)
GEMV_ROPE_KERNELS(f16, f16)
GEMV_SEND_KERNELS(bf16, bf16)
GEMV_SEND_KERNELS(f16, f16)
