// Thin wrappers over the sm_80+ tensor-core and async-copy instructions shared by gemm.cu, gemv.cu and
// attention_prefill.cu. Fragment layouts are those of PTX mma.m16n8k16 (lane = 4*g + t):
//   A (16x16, row-major) a0:(g, 2t..2t+1) a1:(g+8, 2t..) a2:(g, 2t+8..) a3:(g+8, 2t+8..)
//   B (16x8, "col")      b0:(k=2t..2t+1, n=g) b1:(k=2t+8.., n=g)
//   C (16x8, fp32)       c0,c1:(g, 2t..2t+1)  c2,c3:(g+8, 2t..2t+1)
#pragma once
#include "rope.cuh"

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that bypasses registers and L1. When `valid` is false the destination
// is zero-filled (src-size 0) and nothing is read, which is how edge tiles get their zero padding.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// The L2 policy of the weight streams below: evict first. A decode step reads every weight once, gigabytes
// through an L2 of tens of megabytes, so a weight line is never read from L2 again; kept at the normal priority it
// pushes out what is read again: the activations, the KV cache, the scales' lines that the next warps share, and
// the kernels' code, which each layer's launches fetch anew. Llama-3-8B b=1, H200, one call (docs/PERFORMANCE.md,
// twenty-first session): Q4_0 521.8 / 520.2 tok/s against 517.6 / 516.6, int8 386.9 against 381.8; Q4_0's scale
// loads evict-first too gave back half of it (519.0 / 518.2).
__device__ __forceinline__ uint64_t l2_evict_first() {
    uint64_t policy;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    return policy;
}
// cp_async16 for weights: L2::256B (L2 fetches the whole 256-byte segment around a miss, for weight streams whose
// neighbouring pieces other warps ask for next, as gemv.cu's ld_weight16<true>), and evict first.
__device__ __forceinline__ void cp_async16_l2_256(void* smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, %2, %3;\n" ::"r"(smem_addr(smem)),
                 "l"(gmem), "r"(valid ? 16 : 0), "l"(l2_evict_first())
                 : "memory");
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem))
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem))
                 : "memory");
}

// d += a * b with fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<bf16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<f16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Streaming 16-byte load for data read exactly once (weights): read-only path, no L1 allocation, so
// L1 stays free for the small operands that every warp re-reads.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

// ld_stream16 with the L2::256B segment prefetch and the weights' evict-first policy (cp_async16_l2_256).
__device__ __forceinline__ uint4 ld_stream16_l2_256(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::cache_hint.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4], %5;\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "l"(l2_evict_first()));
    return v;
}

// acc += a * c for the rows g (c0, c1) and b * c for the rows g + 8 (c2, c3) of a C fragment.
__device__ __forceinline__ void add_scaled(float (&acc)[4], float a, float b, const float (&c)[4]) {
    acc[0] += a * c[0];
    acc[1] += a * c[1];
    acc[2] += b * c[2];
    acc[3] += b * c[3];
}

// The end of the small-M kernels (gemv.cu, gemv_quant.cu): each warp's 16-row x 8 NT-token accumulators (mma
// C fragments: c0,c1 row g, tokens 2t, 2t+1; c2,c3 row g + 8) go to shared memory (partial[warp][tile * 4 +
// c][lane]), are summed over the WARPS warps and stored as y[M, N] (+ bias).
// SWIGLU: rows come in (gate, up) pairs (row 2i = gate_i, 2i + 1 = up_i; the GPU model interleaves the
// merged gate/up weight that way), and the tile stores act[M, N / 2] = silu(gate) * up instead, each of
// gate and up first rounded to the model dtype T as the unfused path rounds them (so both agree bitwise).
// Every warp's accumulators into partial[warp][tile * 4 + c][lane], then a barrier: the tile epilogues below
// sum them over the warps.
template <int NT>
__device__ __forceinline__ void small_m_tile_to_shared(float (*partial)[NT * 4][32], const float (&acc)[NT][4]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) partial[warp][j * 4 + c][lane] = acc[j][c];
    __syncthreads();
}

// The pair epilogues (SWIGLU's gate/up, rope's rotation pairs): entry idx of NT * 4 * 16 is the pair on lane l
// (even g) and lane l + 4 (g + 1, same t), i.e. rows `row` and row + 1 of token `tok`; a and b are their sums over
// the warps. False (nothing summed) where the pair is past N or the token past M.
template <int WARPS, int NT>
__device__ __forceinline__ bool small_m_pair(float (*partial)[NT * 4][32], int idx, int n0, int M, int N, int& row,
                                             int& tok, float& a, float& b) {
    const int jc = idx >> 4, q = idx & 15, j = jc >> 2, c = jc & 3;
    const int l = (q >> 2) * 8 + (q & 3);
    row = n0 + (l >> 2) + (c >= 2 ? 8 : 0);
    tok = j * 8 + 2 * (l & 3) + (c & 1);
    if (row + 1 >= N || tok >= M) return false;
    a = 0.f, b = 0.f;
#pragma unroll
    for (int wi = 0; wi < WARPS; ++wi) a += partial[wi][jc][l], b += partial[wi][jc][l + 4];
    return true;
}

// stage (not SWIGLU): each stored value also into stage[tok * 16 + row - n0] (shared memory), for an epilogue that
// reads the tile back (gemv.cu's SEND).
template <typename T, typename OutT, int WARPS, int NT, bool SWIGLU>
__device__ __forceinline__ void finish_small_m_tile(float (*partial)[NT * 4][32], const float (&acc)[NT][4],
                                                    OutT* __restrict__ y, const T* __restrict__ bias, int n0,
                                                    int M, int N, OutT* stage = nullptr) {
    small_m_tile_to_shared<NT>(partial, acc);
    if constexpr (!SWIGLU) {
        for (int idx = threadIdx.x; idx < NT * 4 * 32; idx += blockDim.x) {
            const int jc = idx >> 5, l = idx & 31, j = jc >> 2, c = jc & 3;
            const int row = n0 + (l >> 2) + (c >= 2 ? 8 : 0);
            const int tok = j * 8 + 2 * (l & 3) + (c & 1);
            if (row >= N || tok >= M) continue;
            float v = 0.f;
#pragma unroll
            for (int wi = 0; wi < WARPS; ++wi) v += partial[wi][jc][l];
            if (bias) v += to_float(bias[row]);
            const OutT o = from_float<OutT>(v);
            y[(size_t)tok * N + row] = o;
            if (stage) stage[tok * 16 + row - n0] = o;
        }
    } else {
        // Lanes with an even g hold the gate rows; lane + 4 (g + 1, same t) holds the matching up row.
        for (int idx = threadIdx.x; idx < NT * 4 * 16; idx += blockDim.x) {
            int row, tok;
            float g, u;
            if (!small_m_pair<WARPS, NT>(partial, idx, n0, M, N, row, tok, g, u)) continue;
            g = to_float(from_float<T>(g));
            u = to_float(from_float<T>(u));
            y[(size_t)tok * (N >> 1) + (row >> 1)] = from_float<OutT>(silu(g) * u);
        }
    }
}

// The decode q/k/v projection fused with rope_kv.cu's work: rotary embedding of q and k, and the store of k and
// v into the paged cache. The weight rows of every head come interleaved (row 2i = element i, row 2i + 1 =
// element i + head_dim/2; mpillm/cuda/model.py), so lane l and lane l + 4 hold a rotation pair, as SWIGLU's
// gate/up rows. Each element is first rounded to T as the plain projection stores it, and the rotation is
// rope_rotate: the bits of the projection followed by rope_store_kv. y [M, N] receives q, k and v in the
// natural order (attention reads q there).
template <typename T, int WARPS, int NT>
__device__ __forceinline__ void finish_small_m_tile_rope(float (*partial)[NT * 4][32], const float (&acc)[NT][4],
                                                         T* __restrict__ y, const T* __restrict__ bias, int n0,
                                                         int M, int N, const RopeArgs<T>& ra) {
    small_m_tile_to_shared<NT>(partial, acc);
    const int half = ra.head_dim >> 1;
    for (int idx = threadIdx.x; idx < NT * 4 * 16; idx += blockDim.x) {
        int row, tok;
        float a, b;
        if (!small_m_pair<WARPS, NT>(partial, idx, n0, M, N, row, tok, a, b)) continue;
        if (bias) a += to_float(bias[row]), b += to_float(bias[row + 1]);
        T lo = from_float<T>(a), hi = from_float<T>(b);
        const int h = row / ra.head_dim, i = (row - h * ra.head_dim) >> 1;
        if (h < ra.n_heads + ra.n_kv) {
            float sin_i, cos_i;
            rope_angle(ra.positions[tok], ra.inv_freq[i], sin_i, cos_i);
            rope_rotate(to_float(lo), to_float(hi), cos_i, sin_i, lo, hi);
        }
        T* x = y + (size_t)tok * N + (size_t)h * ra.head_dim;
        x[i] = lo;
        x[i + half] = hi;
        if (h >= ra.n_heads) {
            const int slot = ra.slots[tok];
            if (slot >= 0) {
                const int kv = h - ra.n_heads;  // k heads 0..n_kv-1, then v heads
                T* dst = (kv < ra.n_kv ? ra.k_cache : ra.v_cache) + ((size_t)slot * ra.n_kv + kv % ra.n_kv) * ra.head_dim;
                dst[i] = lo;
                dst[i + half] = hi;
            }
        }
    }
}
