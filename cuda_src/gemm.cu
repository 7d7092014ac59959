// Prefill linear layer on tensor cores: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), fp32 accumulation.
// Both operands are K-major ("TN"), which is exactly mma.m16n8k16 row.col, so ldmatrix feeds A and B
// without transposes. Tiles stream through a STAGES-deep cp.async ring; shared rows are padded by
// 16 bytes so the 8 row addresses of an ldmatrix fall in 8 different bank groups. Edge tiles are
// zero-filled by cp.async, so any M and N work and K needs only K % 8 == 0 (16-byte chunks).
#include "mma.cuh"

template <typename T, typename OutT, int BM, int BN, int BK, int WM, int WN, int STAGES>
__device__ __forceinline__ void gemm_tn(OutT* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w,
                                        const T* __restrict__ bias, int M, int N, int K) {
    constexpr int THREADS = WM * WN * 32;
    constexpr int LDS = BK + 8;  // padded row, in elements
    constexpr int WTM = BM / WM, WTN = BN / WN;
    constexpr int MT = WTM / 16, NT = WTN / 8;
    constexpr int CHUNKS = BK / 8;  // 16-byte chunks per tile row
    static_assert(MT >= 1 && NT % 2 == 0 && BK % 16 == 0, "tile shape");

    extern __shared__ uint4 smem_u4[];
    T* s_a = reinterpret_cast<T*>(smem_u4);  // [STAGES][BM][LDS]
    T* s_b = s_a + STAGES * BM * LDS;       // [STAGES][BN][LDS]

    // Grouped tile order: consecutive blocks share a band of GROUP_M row tiles, so the weight tiles
    // they read are reused from L2 instead of being fetched once per row tile.
    constexpr int GROUP_M = 8;
    const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
    const int per_group = GROUP_M * tiles_n;
    const int first_m = (blockIdx.x / per_group) * GROUP_M;
    const int group_rows = min(tiles_m - first_m, GROUP_M);
    const int tile_m = first_m + (blockIdx.x % per_group) % group_rows;
    const int tile_n = (blockIdx.x % per_group) / group_rows;
    const int m0 = tile_m * BM, n0 = tile_n * BN;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = (warp / WN) * WTM, warp_n = (warp % WN) * WTN;

    auto load_stage = [&](int stage, int kt) {
        const int k0 = kt * BK;
        T* sa = s_a + stage * BM * LDS;
        T* sb = s_b + stage * BN * LDS;
#pragma unroll
        for (int c = tid; c < BM * CHUNKS; c += THREADS) {
            const int r = c / CHUNKS, k = k0 + (c % CHUNKS) * 8;
            const bool ok = m0 + r < M && k < K;
            cp_async16(sa + r * LDS + (c % CHUNKS) * 8, ok ? x + (size_t)(m0 + r) * K + k : x, ok);
        }
#pragma unroll
        for (int c = tid; c < BN * CHUNKS; c += THREADS) {
            const int r = c / CHUNKS, k = k0 + (c % CHUNKS) * 8;
            const bool ok = n0 + r < N && k < K;
            cp_async16(sb + r * LDS + (c % CHUNKS) * 8, ok ? w + (size_t)(n0 + r) * K + k : w, ok);
        }
    };

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

    const int k_tiles = (K + BK - 1) / BK;
    // Prologue: STAGES-1 tiles in flight. Every iteration commits exactly one group (possibly empty)
    // so that wait_group<STAGES-2> always means "the tile about to be used has landed".
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage(s, s);
        cp_async_commit();
    }

    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile kt visible to all warps; stage (kt-1) % STAGES no longer being read
        const int next = kt + STAGES - 1;
        if (next < k_tiles) load_stage(next % STAGES, next);
        cp_async_commit();

        const T* sa = s_a + (kt % STAGES) * BM * LDS;
        const T* sb = s_b + (kt % STAGES) * BN * LDS;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[MT][4], bfr[NT][2];
#pragma unroll
            for (int i = 0; i < MT; ++i)
                ldmatrix_x4(af[i], sa + (warp_m + i * 16 + (lane & 15)) * LDS + kk + (lane >> 4) * 8);
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                uint32_t r[4];
                ldmatrix_x4(r, sb + (warp_n + j * 8 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk +
                                   ((lane >> 3) & 1) * 8);
                bfr[j][0] = r[0]; bfr[j][1] = r[1]; bfr[j + 1][0] = r[2]; bfr[j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) mma_16816<T>(acc[i][j], af[i], bfr[j][0], bfr[j][1]);
        }
    }
    cp_async_wait<0>();

    // Epilogue straight from the C fragments: each lane owns column pairs (2t, 2t+1) of rows g, g+8.
    const int g = lane >> 2, t = lane & 3;
    const bool pair_aligned = (N & 1) == 0;  // a pair store needs (row * N + col) even
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int col = n0 + warp_n + j * 8 + 2 * t;
        const float b0 = bias && col < N ? to_float(bias[col]) : 0.f;
        const float b1 = bias && col + 1 < N ? to_float(bias[col + 1]) : 0.f;
#pragma unroll
        for (int i = 0; i < MT; ++i) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = m0 + warp_m + i * 16 + g + half * 8;
                if (row >= M) continue;
                const float v0 = acc[i][j][2 * half] + b0, v1 = acc[i][j][2 * half + 1] + b1;
                OutT* dst = y + (size_t)row * N + col;
                if (pair_aligned && col + 1 < N) {
                    if constexpr (sizeof(OutT) == 4) {
                        *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
                    } else {
                        *reinterpret_cast<uint32_t*>(dst) = pack2<OutT>(v0, v1);
                    }
                } else {
                    if (col < N) dst[0] = from_float<OutT>(v0);
                    if (col + 1 < N) dst[1] = from_float<OutT>(v1);
                }
            }
        }
    }
}

// Tile configurations; the launcher reads the same numbers (GEMM_CONFIGS in kernels.py) for grid,
// block and dynamic shared memory. large: 128x128x64 tiles, 8 warps of 64x32, 3 stages; small: 64x64x64,
// 4 warps of 32x32, 3 stages, for problems too small to give every SM a large tile. Measured on H200
// (bf16): large 304-318 TFLOP/s at 4096^3..8192^3 (128x128x32 x 4 stages: 253-259; 128x256x64: 285-300);
// BK = 64 beat BK = 32 for every tile shape tried.
#define GEMM_KERNEL(T, OUT_T, NAME, CFG, BM, BN, BK, WM, WN, STAGES, MIN_BLOCKS)                          \
    extern "C" __global__ void __launch_bounds__(WM * WN * 32, MIN_BLOCKS) gemm_##NAME##_##CFG(          \
        OUT_T* y, const T* x, const T* w, const T* bias, int M, int N, int K) {                            \
        pdl_begin();                                                                                       \
        gemm_tn<T, OUT_T, BM, BN, BK, WM, WN, STAGES>(y, x, w, bias, M, N, K);                             \
    }
#define GEMM_KERNELS(T, OUT_T, NAME)                                  \
    GEMM_KERNEL(T, OUT_T, NAME, large, 128, 128, 64, 2, 4, 3, 2)      \
    GEMM_KERNEL(T, OUT_T, NAME, small, 64, 64, 64, 2, 2, 3, 4)

GEMM_KERNELS(bf16, bf16, bf16_bf16)
GEMM_KERNELS(bf16, float, bf16_f32)
GEMM_KERNELS(f16, f16, f16_f16)
GEMM_KERNELS(f16, float, f16_f32)
