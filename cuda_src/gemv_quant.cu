// Weight-only quantized linear layers (W8A16, W4A16): y[M, N] = x[M, K] @ deq(w)[N, K]^T (+ bias).
//
// Same plan as gemv.cu (decode is bound by the weight stream: 16-byte loads that bypass L1, tensor-core
// mma with 16 weight rows as "M" and up to 8 tokens per tile as "N"), with the weight bytes halved (int8)
// or quartered (4-bit). Dequantization must cost no bandwidth and little issue:
//   - The codes go into the mma as they are: int8 and 4-bit integers are exact in bf16 and fp16, and the
//     conversion is a few integer ops per pair (magic-number tricks, no cvt chains).
//   - Each mma covers one 32-element chunk of each row, so its fp32 result is multiplied by that chunk's
//     scale once, after the mma: sum_k d q_k x_k = d * sum_k q_k x_k. No weight is rounded to bf16, so
//     the result is the exact dequantized product up to fp32 summation order (the NumPy reference).
//   - Q4_1's min: sum_k (d q_k + m) x_k = d * sum q x + m * sum x; the chunk sums of x come from one
//     more mma with an all-ones A fragment, which lands them in the accumulator layout. The 4-bit codes
//     enter the mma with the magic number's bias still on (B + q), which the min term takes back.
//   - Q4_0 (SYM, no min: x = d (q - 8)) has no use for sum x: one packed subtraction per pair takes the bias
//     and the 8 off at once, which costs less issue than the second mma pair and its fp32 work, and its
//     scales are 8 bytes per row per super-block instead of 16 (4.5 bits per weight instead of 5).
// The byte order that makes a lane's 16-byte load hold 8 elements of each chunk of a super-block is
// mpillm/quant.py's PackedLinear (packed on the host at load time; no value is re-quantized).
// Q4_0's codes and scales are stored in tiles of rows (Q4_0_TILES below; kernels.py q4_0_tiles): a warp step reads
// one 1 KB run of codes and one 128-byte run of scales.
//
// Block: WARPS warps on the same 16 weight rows, interleaved over super-blocks, two register
// stages so the next loads are in flight during this step's mma work; partials summed in shared memory.
// Most shipped kernels instead stream the weights through a per-warp shared-memory ring of STAGES cp.async
// stages, which keeps more bytes in flight without holding them in registers; some of those (PERSIST) launch
// fewer blocks than tiles and loop over them, the ring streaming on from one tile into the next. One token of bf16 x
// (the _x1 kernels) runs x1_linear, a loop of its own.
#include "ll.cuh"
#include "mma.cuh"
#include "norm.cuh"

#define QGEMV_ROWS 16
static_assert(QGEMV_ROWS == LL_SEND_ROWS, "SEND stages whole tiles");
#define QGEMV_SB_BYTES 64   // bytes per row per super-block (int8: 2 chunks of 32; 4-bit: 4 chunks)

// Q4_0_TILES (the "4s" format, SYM): the codes in tiles of QGEMV_ROWS rows (N padded to whole tiles), each tile's
// super-block sb one contiguous run of its 16 rows' 64 bytes (1 KB) in row order: row r's super-block sb at byte
// ((r / 16) n_sb + sb) 1024 + (r % 16) 64. A warp step (one super-block of 16 rows) reads one 1 KB run instead of 16
// runs of 64 bytes a row apart. The scales likewise, 8 bytes a row, each tile's super-block one 128-byte run with
// rows r and r + 8 side by side (a lane's two rows: one 16-byte load): row r's super-block sb at byte
// ((r / 16) n_sb + sb) 128 + (r % 8) 16 + (r % 16 / 8) 8 (q4_0_scales_at). The ring kernels copy a step's scales
// into shared memory with its codes (x1_linear, quant_linear's ring). int8 and Q4_1 are row-major.
__device__ __forceinline__ size_t q4_0_tile_offset(int row, int n_sb) {  // row's super-block 0, in 64-byte units
    return (size_t)(row / QGEMV_ROWS) * n_sb * QGEMV_ROWS + row % QGEMV_ROWS;
}
#define Q4_0_SB_STRIDE QGEMV_ROWS  // from one super-block of a row to the next, in 64-byte units
// Rows g and g + 8 of a tile's super-block sb: their 16 bytes of scales (Q4_0_TILES), in 16-byte units.
__device__ __forceinline__ size_t q4_0_scales_at(int tile, int sb, int n_sb, int g) {
    return ((size_t)tile * n_sb + sb) * (QGEMV_ROWS / 2) + g;
}

// 4-bit scale loads (read-only, through L1: the 4 lanes of a quad and, for Q4_1, the warps on neighbouring
// super-blocks share their sectors) with L2::256B: L2 fetches the whole 256-byte segment around a miss, as for the
// weights, instead of each 32-byte sector of a row's scales on its own (Q4_0 b=1 +2.5%, Llama-3-8B, H100,
// docs/PERFORMANCE.md, sixteenth session; int8's scales, 2 bytes per 128 weights, showed nothing then: see
// ld_scale8 below for groups of 32).
// The scale slots of quant_linear's ring (SCALE_RING, Q4_0 only: the other kernels never instantiate it, so their
// shared memory is as it was).
template <int N> __device__ __forceinline__ uint4* q4_0_scale_ring() {
    __shared__ __align__(16) uint4 slots[N];
    return slots;
}
__device__ __forceinline__ uint4 ld_scales16(const void* p) {
    uint4 v;
    asm("ld.global.nc.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// int8's group scales in the one-token kernels (x1_linear): L2::256B, so that a miss brings the 256-byte segment
// around it (a row's 256 bytes of scales at K = 4,096 in groups of 32, GGUF Q8_0's) instead of one 32-byte sector,
// which a warp's next steps and the neighbouring rows then find in L2. Llama-3-8B b=1, H200: groups of 32 352.5 /
// 353.0 tok/s against 346.4 / 346.1, groups of 128 407.1 against 406.3 (docs/PERFORMANCE.md, twenty-sixth session).
__device__ __forceinline__ unsigned short ld_scale8(const unsigned short* p) {
    unsigned short v;
    asm("ld.global.nc.L2::256B.u16 %0, [%1];\n" : "=h"(v) : "l"(p));
    return v;
}

// Q4_0's scales into the one-token kernels' ring (x1_linear): L2::256B as for the weights, without their
// evict-first policy (the scales' lines are read by the next warps too; evict-first on Q4_0's scale loads lost
// half of the weights' gain, twenty-first session). Zero-filled when !valid.
__device__ __forceinline__ void cp_async16_scales(void* smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
// The deepest Q4_0 ring among the _x1 kernels (the _x1d kernel's), which sizes the scale ring that the launcher
// reserves for every Q4_0 _x1 launch (kernels.py Q4_0_X1_SCALE_RING = this x 8 warps x 128 bytes; Q4_1's steps
// take 256 bytes: Q4_1_X1_SCALE_RING).
#define Q4_0_X1_MAX_STAGES 5

__device__ __forceinline__ uint32_t word_at(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Four signed bytes e0..e3 -> packed pairs (e0, e1), (e2, e3) of T, exact.
template <typename T> __device__ __forceinline__ void s8x4_pairs(uint32_t w, uint32_t& p01, uint32_t& p23);
template <>
__device__ __forceinline__ void s8x4_pairs<bf16>(uint32_t w, uint32_t& p01, uint32_t& p23) {
    // bf16 has 8 significant bits, too few for the magic-number trick on 0..255: go through fp32, where
    // 0x4B000000 | u is 2^23 + u exactly; subtracting 2^23 + 128 leaves the signed value, whose bf16 is
    // its fp32 bits' upper half (small integers: truncation is exact).
    const uint32_t u = w ^ 0x80808080u;  // bytes + 128, as unsigned
    const float f0 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540)) - 8388736.f;
    const float f1 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541)) - 8388736.f;
    const float f2 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7542)) - 8388736.f;
    const float f3 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7543)) - 8388736.f;
    p01 = __byte_perm(__float_as_uint(f0), __float_as_uint(f1), 0x7632);
    p23 = __byte_perm(__float_as_uint(f2), __float_as_uint(f3), 0x7632);
}
template <>
__device__ __forceinline__ void s8x4_pairs<f16>(uint32_t w, uint32_t& p01, uint32_t& p23) {
    // fp16 0x6400 | u is 1024 + u exactly for u < 1024; subtract 1024 + 128.
    const uint32_t u = w ^ 0x80808080u;
    const uint32_t bias = 0x64806480u, lo = __byte_perm(u, 0x64646464u, 0x5140), hi = __byte_perm(u, 0x64646464u, 0x5342);
    __half2 a = __hsub2(*reinterpret_cast<const __half2*>(&lo), *reinterpret_cast<const __half2*>(&bias));
    __half2 b = __hsub2(*reinterpret_cast<const __half2*>(&hi), *reinterpret_cast<const __half2*>(&bias));
    p01 = *reinterpret_cast<uint32_t*>(&a);
    p23 = *reinterpret_cast<uint32_t*>(&b);
}

// (a & mask) | bits in one LOP3. Written as C++ (a & mask) | bits with both constants, ptxas emits two (LOP3 has
// one immediate operand, and it does not move the other constant into a register of its own): one instruction
// more per pair of weights, 14% of the Q4_0 one-token kernel's loop (Q4_0 b=1 +3.9% on an H100 with this).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t bits) {
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(mask), "r"(bits));  // 0xEA: (a & b) | c
    return r;
}

// Pair p (0..3) of a 4-bit word with nibbles e0 e2 e4 e6 e1 e3 e5 e7: (B + e_2p, B + e_2p+1) as T, exact, with
// B = U4_BIAS<T>: 0x4300 (bf16 128) and 0x6400 (fp16 1024) have a mantissa step of 1, so OR-ing in the code is
// the whole conversion (one shift and one LOP3). The bias is not subtracted per weight: sum_k (B + q_k) x_k =
// sum_k q_k x_k + B sum_k x_k, and the chunk sums of x are at hand for Q4_1's min anyway, so the kernel folds
// -B d into the min once per chunk (d q + m = d (B + q) + (m - B d)).
template <typename T> struct U4Bias;
template <> struct U4Bias<bf16> { static constexpr uint32_t pair = 0x43004300u; static constexpr float value = 128.f; };
template <> struct U4Bias<f16> { static constexpr uint32_t pair = 0x64006400u; static constexpr float value = 1024.f; };
template <typename T> __device__ __forceinline__ uint32_t u4_pair_biased(uint32_t w, int p) {
    return and_or(w >> (4 * p), 0x000F000Fu, U4Bias<T>::pair);
}

// Q4_0: (B + q) - (B + 8) = q - 8 for both halves of a pair, exact (small integers); B + 8 is 0x4308 (bf16 136)
// and 0x6408 (fp16 1032).
template <typename T> __device__ __forceinline__ uint32_t u4_pair_signed(uint32_t w, int p);
template <> __device__ __forceinline__ uint32_t u4_pair_signed<bf16>(uint32_t w, int p) {
    const uint32_t v = u4_pair_biased<bf16>(w, p), off = 0x43084308u;
    const __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&v),
                                     *reinterpret_cast<const __nv_bfloat162*>(&off));
    return *reinterpret_cast<const uint32_t*>(&r);
}
template <> __device__ __forceinline__ uint32_t u4_pair_signed<f16>(uint32_t w, int p) {
    const uint32_t v = u4_pair_biased<f16>(w, p), off = 0x64086408u;
    const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&v), *reinterpret_cast<const __half2*>(&off));
    return *reinterpret_cast<const uint32_t*>(&r);
}

// One token with Q4_0 (x1_linear, x staged as fp16): pair p of a 4-bit word as fp16 (1024 + q, 1024 + q') for
// p = 0, 2 and (1024 + 16 q, 1024 + 16 q') for p = 1, 3. fp16's mantissa step at 1024 is 1, so a code in bits 0-3 or
// 4-7 of each half goes in with one LOP3, where it lies, and one shift (w8 = w >> 8) serves pairs 2 and 3: 5
// instructions per 8 weights against u4_pair_signed's 11. Elements 2, 3, 6 and 7 of each 8 thus enter the mma 16
// times too large, which stage_x_half takes back by staging x / 16 there, and the 1024 and the 8 of every code come
// off the chunk's sum at once: the mma starts from -sum_k (1024 + 8 s_k) x'_k (x'_k the staged x, s_k its 1 or 16),
// stage_x_half's chunk bias.
__device__ __forceinline__ uint32_t u4_pair_x16(uint32_t w, uint32_t w8, int p) {
    return and_or(p & 2 ? w8 : w, p & 1 ? 0x00F000F0u : 0x000F000Fu, 0x64006400u);
}

template <typename T> __device__ __forceinline__ uint32_t ones_pair();
template <> __device__ __forceinline__ uint32_t ones_pair<bf16>() { return 0x3F803F80u; }
template <> __device__ __forceinline__ uint32_t ones_pair<f16>() { return 0x3C003C00u; }

__device__ __forceinline__ float half_bits_to_float(uint32_t h) { return __half2float(__ushort_as_half((unsigned short)h)); }

// One token of int8 weights and bf16 activations (x1_linear): bf16 has too few significant bits for int8 codes to
// become bf16 pairs with a magic number (s8x4_pairs<bf16> goes through fp32: 11 instructions per 4 weights), fp16
// has enough (5). So the kernel takes x to fp16 once, into shared memory, and runs the fp16 mma. Each warp stages the
// super-blocks it alone reads (sb = warp mod WARPS, below n_sb; zeros past K; no block barrier), times 2^s, s
// chosen from the warp's max |x| so that the largest lands in [2^15, 2^16): no overflow, and every element down
// to 2^-33 of the largest keeps its bf16 bits exactly (8 significant bits; fp16 subnormals reach 2^-24). The
// warp's fp32 sums are multiplied back by 2^-s before the block adds them: power-of-two scalings are exact in
// fp32, so the result has the bf16 path's bits unless some x was below 2^-33 of its warp's max (then it is
// rounded on that grid: an error far below fp32 summation's).
// Returns 2^-s (FOLD below: 2^-s rstd).
// PRENORM (x1_linear's _x1n kernels: the q/k/v and gate/up projections at one token on one GPU): the pre-norm before
// them (add_rms_norm: r' = r + delta, rounded; x = rms_norm(r') * weight) computed in the prologue instead of by a
// kernel of its own, whose launch, wait and drain cost more than its arithmetic (skipping the norms saves 3.5 us
// each, 64 per 8B step, H100). Every block reads r, delta and the weight (8 KB each for Llama-3-8B, from L2);
// block 0 writes r' to resid_out, a buffer no block reads here (the model alternates two residual buffers). x
// lands in shared memory, where stage_x_half takes it. The bits are norm.cu's: the block replays that kernel's
// threads (block size ceil(hidden / 8 / 32) * 32 <= 1024, one 8-element vector each: kernels.py _norm_threads),
// each thread of ours taking the virtual threads tid, tid + THREADS, ...: the same fma chains, warp trees and
// cross-warp sum.
// Only delta is read after the PDL wait: the weight is never written, and r was written at least two kernels
// back (by the pre-norm before the previous projection, or the norm kernel), which is complete and visible once
// this kernel runs at all: the kernel just before ours is a quantized projection (the model folds int8's pre-norm
// only after one: Kernels.prenorm_reads_early), which lets it start only after its own wait for that one
// (pdl_begin_late: wait, then launch_dependents; common.cuh). r is read through L2 (__ldcg), never a stale L1 line.
// (PreNorm itself: norm.cuh.)

template <int THREADS>
struct PreNormStage {
    static constexpr int MAXV = 1024 / THREADS;  // vectors (virtual threads) per thread
    uint4 r[MAXV], w[MAXV];

    // Before the wait: r and the weight into registers.
    __device__ __forceinline__ void load(const PreNorm& pn, int hidden) {
        const int n_vec = hidden >> 3;
#pragma unroll
        for (int i = 0; i < MAXV; ++i) {
            const int v = threadIdx.x + THREADS * i;
            r[i] = v < n_vec ? __ldcg(reinterpret_cast<const uint4*>(pn.resid_in) + v) : make_uint4(0, 0, 0, 0);
            w[i] = v < n_vec ? __ldg(reinterpret_cast<const uint4*>(pn.weight) + v) : make_uint4(0, 0, 0, 0);
        }
    }

    // After it: delta, then r' (to resid_out by block 0), the norm, and x into xs (bf16, natural order).
    __device__ __forceinline__ void finish(uint4* __restrict__ xs, const PreNorm& pn, int hidden) {
        __shared__ float scratch[32];
        const int n_vec = hidden >> 3, nt = (n_vec + 31) / 32 * 32;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        uint4 d[MAXV];
#pragma unroll
        for (int i = 0; i < MAXV; ++i) {
            const int v = threadIdx.x + THREADS * i;
            d[i] = v < n_vec ? __ldcg(reinterpret_cast<const uint4*>(pn.delta) + v) : make_uint4(0, 0, 0, 0);
        }
        float a[MAXV][8], sum[MAXV];
#pragma unroll
        for (int i = 0; i < MAXV; ++i) {
            const int v = threadIdx.x + THREADS * i;
            float rr[8];
            unpack8<bf16>(d[i], a[i]);
            unpack8<bf16>(r[i], rr);
#pragma unroll
            for (int e = 0; e < 8; ++e) a[i][e] = to_float(from_float<bf16>(a[i][e] + rr[e]));
            sum[i] = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) sum[i] = __fmaf_rn(a[i][e], a[i][e], sum[i]);
            if (v < n_vec && blockIdx.x == 0) reinterpret_cast<uint4*>(pn.resid_out)[v] = pack8<bf16>(a[i]);
            const int vt0 = THREADS * i + 32 * warp;  // virtual warp vt0 / 32: block_sum's first step
            if (vt0 < nt) {
                const float s = warp_sum(sum[i]);
                if (lane == 0) scratch[vt0 >> 5] = s;
            }
        }
        __syncthreads();
        const float total = warp_sum(lane < (nt >> 5) ? scratch[lane] : 0.f);  // block_sum's second step
        const float rstd = rsqrtf(__fadd_rn(__fdiv_rn(total, (float)hidden), pn.eps));
#pragma unroll
        for (int i = 0; i < MAXV; ++i) {
            const int v = threadIdx.x + THREADS * i;
            float ww[8];
            unpack8<bf16>(w[i], ww);
#pragma unroll
            for (int e = 0; e < 8; ++e) a[i][e] = __fmul_rn(__fmul_rn(a[i][e], rstd), ww[e]);
            if (v < n_vec) xs[v] = pack8<bf16>(a[i]);
        }
        __syncthreads();  // stage_x_half's warps take other threads' vectors
    }
};

// Q4 (Q4_0's one-token kernels, x1_linear): super-blocks of 128 elements; the elements 2, 3, 6, 7 of every 8
// staged as x 2^s / 16 (u4_pair_x16 feeds their codes 16 times too large), and after the n_sb * 128 fp16 values,
// each 32-element chunk's bias -sum_k (1024 + 8 s_k) x'_k in fp32 (s_k = 1 or 16, x'_k the staged value), four
// times (16 bytes: the mma's accumulator input as it is loaded).
// FOLD (Q4_0's and Q4_1's _x1n kernels): the pre-norm folded in with its scale left to the end. x is not read: each lane
// stages r' w (r' = r + delta, rounded to bf16 as add_rms_norm does; block 0 writes r' to resid_out) for its own
// vectors, and the block's sum of squares of r' gives rstd, by which the returned factor is multiplied: rstd is one
// number per token, so sum_k W_k (r'_k rstd w_k) = rstd sum_k W_k (r'_k w_k); the warps' sums of squares meet at
// one block barrier after the staging, in warp order (every block the same rstd). No block-wide reduction stands
// between the wait and the first step (int8's PreNormStage, replayed for its bits, has one: folded that way, Q4_0
// ran 2.6% slower than with the norm kernel of its own; docs/PERFORMANCE.md, seventeenth session). Not
// add_rms_norm's bits: r' w is rounded once to bf16 where that kernel rounds r' rstd w.
// FROM_SMEM: x is already in xs as bf16 (PreNormStage).
// ASYM (Q4_1's one-token kernels, Q4 too): the chunk biases take off the 1024s alone, -sum_k 1024 x'_k, so the mma
// leaves sum_k q_k x_k 2^s; after a super-block's 4 biases, its 4 chunks' sums sum_k x_k 2^s (= sum_k s_k x'_k) in
// fp32 (a fifth float4), for the min: sum_k (d q_k + m) x_k = d sum_k q_k x_k + m sum_k x_k.
template <int WARPS, bool FROM_SMEM = false, bool Q4 = false, bool FOLD = false, bool ASYM = false>
__device__ __forceinline__ float stage_x_half(uint4* __restrict__ xs, const bf16* __restrict__ x, int K, int n_sb,
                                              int warp, int lane, const PreNorm& pn = PreNorm{}) {
    static_assert(!(FOLD && FROM_SMEM), "one source of x");
    static_assert(!ASYM || Q4, "ASYM: Q4_1's 4-bit codes");
    // loads in flight per lane: one round trip for K up to 16,384 (FOLD: 3 loads a vector, so 2 vectors, K up to 4,096
    // in one trip; at 4 the Q4_0 kernels spilled 100 bytes)
    constexpr int BATCH = FOLD ? 2 : 8;
    constexpr int SBE = Q4 ? 128 : 64;     // elements per super-block
    constexpr int VPS = SBE / 8;           // 16-byte vectors per super-block
    const int vecs = ((n_sb - warp + WARPS - 1) / WARPS) * VPS;  // 16-byte vectors of this warp's super-blocks
    auto at = [&](int v) { return (warp + WARPS * (v / VPS)) * SBE + 8 * (v % VPS); };  // element index of vector v
    uint32_t dyn;  // the launcher sizes the dynamic shared memory (kernels.py qgemv_x1_bytes): never write past it
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < (uint32_t)n_sb * (2u * SBE + (Q4 ? 64u : 0u) + (ASYM ? 16u : 0u))) __trap();
    // Pass 1: x as it is into shared memory (zeros past K), and the max of |x| as bf16 bits (monotone in |x|: NaN
    // above inf above every finite).
    uint32_t mbits = 0;
    float ss = 0.f;  // FOLD: this lane's sum of squares of r'
    for (int v0 = lane; v0 < vecs; v0 += 32 * BATCH) {
        uint4 q[BATCH];
        if constexpr (FOLD) {
            uint4 d[BATCH], r[BATCH], wn[BATCH];
#pragma unroll
            for (int i = 0; i < BATCH; ++i) {
                const int v = v0 + 32 * i, k = at(v);
                fold_load(pn, k, v < vecs && k < K, d[i], r[i], wn[i]);
            }
#pragma unroll
            for (int i = 0; i < BATCH; ++i) {
                const int v = v0 + 32 * i, k = at(v);
                // zeros past K (d, r, w loaded as zeros)
                q[i] = fold_vec(d[i], r[i], wn[i], ss, blockIdx.x == 0 && v < vecs && k < K, pn.resid_out, k);
            }
        } else {
#pragma unroll
            for (int i = 0; i < BATCH; ++i) {
                const int v = v0 + 32 * i, k = at(v);
                q[i] = v < vecs && k < K ? (FROM_SMEM ? xs[k >> 3] : __ldg(reinterpret_cast<const uint4*>(x + k)))
                                         : make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int i = 0; i < BATCH; ++i) {
            const int v = v0 + 32 * i;
            if (v < vecs) xs[at(v) >> 3] = q[i];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t a = word_at(q[i], j) & 0x7FFF7FFFu;
                mbits = max(mbits, max(a & 0xFFFFu, a >> 16));
            }
        }
    }
    mbits = __reduce_max_sync(0xFFFFFFFFu, mbits);
    const int e = (int)(mbits >> 7);  // biased exponent: 0 zero / subnormal, 255 inf / NaN (left unscaled)
    const int s = (mbits == 0 || e == 255) ? 0 : min(max(142 - e, -100), 100);
    const float up = __int_as_float((127 + s) << 23), up16 = __int_as_float((123 + s) << 23);  // 2^s, 2^s / 16
    // Pass 2, in place (each lane its own vectors): fp16 of x 2^s (Q4: / 16 at elements 2, 3, 6, 7 of each 8, and
    // the chunk biases: a chunk is 4 vectors, those of lanes 4c .. 4c + 3). convert(v) converts vector v and returns
    // its share of its chunk's bias (Q4; ASYM: its share of the chunk's sum of x into csum).
    float csum = 0.f;
    auto convert = [&](int v) {
        uint4& h = xs[at(v) >> 3];
        const uint4 q = h;
        uint32_t o[4];
        float part = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint32_t w = word_at(q, i);
            const float f = Q4 && (i & 1) ? up16 : up;
            const __half2 p = __floats2half2_rn(__uint_as_float(w << 16) * f, __uint_as_float(w & 0xFFFF0000u) * f);
            o[i] = *reinterpret_cast<const uint32_t*>(&p);
            if (Q4) {
                const float2 r = __half22float2(p);
                if constexpr (ASYM) {
                    part = fmaf(1024.f, r.y, fmaf(1024.f, r.x, part));
                    const float sk = i & 1 ? 16.f : 1.f;
                    csum = fmaf(sk, r.y, fmaf(sk, r.x, csum));
                } else {
                    const float c = i & 1 ? 1152.f : 1032.f;  // 1024 + 8 s_k
                    part = fmaf(c, r.y, fmaf(c, r.x, part));
                }
            }
        }
        h = make_uint4(o[0], o[1], o[2], o[3]);
        return part;
    };
    if constexpr (Q4) {
        float* const bias = reinterpret_cast<float*>(xs + n_sb * VPS);
        for (int v0 = 0; v0 < vecs; v0 += 32) {  // a uniform bound for the shuffles
            const int v = v0 + lane;
            csum = 0.f;
            float part = v < vecs ? convert(v) : 0.f;
            part += __shfl_xor_sync(0xFFFFFFFFu, part, 1);
            part += __shfl_xor_sync(0xFFFFFFFFu, part, 2);
            const int c = at(v) >> 5;                                 // the chunk
            const int at4 = ASYM ? (c >> 2) * 5 + (c & 3) : c;        // its bias's float4
            if (v < vecs && (lane & 3) == 0)
                reinterpret_cast<float4*>(bias)[at4] = make_float4(-part, -part, -part, -part);
            if constexpr (ASYM) {  // the chunk sums: the fifth float4 of the super-block's
                csum += __shfl_xor_sync(0xFFFFFFFFu, csum, 1);
                csum += __shfl_xor_sync(0xFFFFFFFFu, csum, 2);
                if (v < vecs && (lane & 3) == 0) bias[((c >> 2) * 5 + 4) * 4 + (c & 3)] = csum;
            }
        }
    } else {
        for (int v = lane; v < vecs; v += 32) convert(v);
    }
    __syncwarp();  // lanes read each other's vectors
    float down = __int_as_float((127 - s) << 23);
    if constexpr (FOLD) down *= fold_rstd<WARPS>(ss, K, pn.eps, warp, lane);
    return down;
}

// BITS = 8: CH = 2 chunks per super-block, scales fp16 [N, n_groups] (group = 32 << gshift elements).
// BITS = 4: CH = 4, scales (d, m) fp16 pairs [N, n_sb, 4]: one 16-byte load per row per super-block;
//           SYM (Q4_0): d alone, fp16 [N, n_sb, 4]: one 8-byte load.
template <int BITS, int UNROLL, int NT>
struct QStage {
    static constexpr int CH = BITS == 8 ? 2 : 4;
    uint4 wa[UNROLL], wb[UNROLL];          // rows g and g + 8
    uint32_t sa[UNROLL][CH], sb[UNROLL][CH];  // their chunk scales (int8, Q4_0: fp16 bits; Q4_1: (d, m) half2)
    uint4 xv[UNROLL][NT][CH];              // 8 elements of each chunk for token g of each token tile
};

// L2_HINT: weight loads with the L2::256B segment prefetch. STAGES: 0 = two register stages (production);
// >= 2 = the weight ring described above, STAGES - 1 steps ahead.
// ROPE: the q/k/v projection's epilogue with rotary embedding and the KV store (mma.cuh).
// SYM: BITS = 4 without the min (Q4_0 layout). PERSIST (ring only): blocks loop over tiles (see below).
template <typename T, typename OutT, int BITS, int NT, int WARPS, int UNROLL, bool SWIGLU = false,
          bool L2_HINT = false, int STAGES = 0, bool ROPE = false, bool SYM = false, bool PERSIST = false>
__device__ __forceinline__ void quant_linear(OutT* __restrict__ y, const T* __restrict__ x,
                                             const uint8_t* __restrict__ w, const void* __restrict__ scales,
                                             const T* __restrict__ bias, int M, int N, int K, int n_sb,
                                             int n_groups, int gshift, const RopeArgs<T>& rope = RopeArgs<T>{}) {
    static_assert(STAGES == 0 || STAGES >= 2, "STAGES: 0 (register stages) or a ring of at least 2");
    static_assert(!SYM || BITS == 4, "SYM is a 4-bit layout");
    static_assert(!PERSIST || STAGES > 0, "PERSIST: the ring shapes");
    constexpr int CH = BITS == 8 ? 2 : 4, SB_ELEMS = CH * 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const size_t row_bytes = (size_t)n_sb * QGEMV_SB_BYTES;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    constexpr int STEP = WARPS * UNROLL;
    // Q4_0's scales through the ring (ring_copy) where it has one, but for 4 token tiles (bench.py --qgemv's ring
    // variants only), whose ring and partial sums already fill the 48 KB of static shared memory: registers there.
    constexpr bool SCALE_RING = SYM && STAGES > 0 && NT <= 2;
    // Row r's codes (its super-block 0, lane t's 16 bytes), and the distance from one super-block to the next:
    // SYM (Q4_0) in tiles (Q4_0_TILES), the others row-major.
    auto row_codes = [&](int r) {
        return w + (SYM ? q4_0_tile_offset(r, n_sb) * QGEMV_SB_BYTES : r * row_bytes) + 16 * t;
    };
    constexpr int SB_STRIDE = (SYM ? Q4_0_SB_STRIDE : 1) * QGEMV_SB_BYTES;

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

    // Weights and scales (never written by a kernel, so the first ones may load before pdl_wait()), then x.
    // With the ring (STAGES > 0) only the scales: the weights arrive through shared memory.
    auto load_weight = [&](const uint8_t* p) { return L2_HINT ? ld_stream16_l2_256(p) : ld_stream16(p); };
    // Rows past N are clamped onto row N-1 (row_of): loads stay in bounds, results are never stored.
    auto row_of = [&](int tile, int r) { return min(tile * QGEMV_ROWS + r, N - 1); };
    auto load_w = [&](QStage<BITS, UNROLL, NT>& st, int sb0, int row_a, int row_b) {
        const uint8_t* w_a = row_codes(row_a);
        const uint8_t* w_b = row_codes(row_b);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int sb = sb0 + u * WARPS;
            const bool ok = sb < n_sb;
            if (STAGES == 0) {
                st.wa[u] = ok ? load_weight(w_a + (size_t)sb * SB_STRIDE) : zero;
                st.wb[u] = ok ? load_weight(w_b + (size_t)sb * SB_STRIDE) : zero;
            }
            if (BITS == 8) {
                const unsigned short* s = reinterpret_cast<const unsigned short*>(scales);
#pragma unroll
                for (int j = 0; j < CH; ++j) {
                    const int chunk = sb * CH + j;
                    const bool in = ok && chunk * 32 < K;  // padded chunks: scale 0
                    st.sa[u][j] = in ? __ldg(s + (size_t)row_a * n_groups + (chunk >> gshift)) : 0u;
                    st.sb[u][j] = in ? __ldg(s + (size_t)row_b * n_groups + (chunk >> gshift)) : 0u;
                }
            } else if (SYM) {
                // rows g and g + 8 in one load (Q4_0_TILES; row_a and row_b, clamped or not, are in one tile,
                // whose rows past N hold zeros); SCALE_RING kernels take them from the ring instead (ring_copy).
                // Llama-3-8B b=32 (this path) 5,815.9 tok/s against 5,261.4 with the two rows' 8-byte loads, and
                // b=8 (the ring's) 3,074.9 against 2,971.7 (H200, docs/PERFORMANCE.md, twenty-second session).
                if constexpr (!SCALE_RING) {
                    const uint4 v = ok ? ld_scales16(reinterpret_cast<const uint4*>(scales) +
                                                     q4_0_scales_at(row_a / QGEMV_ROWS, sb, n_sb, g))
                                       : zero;
                    st.sa[u][0] = v.x, st.sa[u][1] = v.y;  // chunks (0, 1) and (2, 3), unpacked at use
                    st.sb[u][0] = v.z, st.sb[u][1] = v.w;
                }
            } else {
                const uint4* s = reinterpret_cast<const uint4*>(scales);
                const uint4 a = ok ? ld_scales16(s + (size_t)row_a * n_sb + sb) : zero;
                const uint4 b = ok ? ld_scales16(s + (size_t)row_b * n_sb + sb) : zero;
#pragma unroll
                for (int j = 0; j < CH; ++j) st.sa[u][j] = word_at(a, j), st.sb[u][j] = word_at(b, j);
            }
        }
    };
    auto load_x = [&](QStage<BITS, UNROLL, NT>& st, int sb0) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int sb = sb0 + u * WARPS;
            const bool ok = sb < n_sb;
#pragma unroll
            for (int j = 0; j < CH; ++j) {
                const int k = sb * SB_ELEMS + 32 * j + 8 * t;
                const bool in = ok && k < K;       // K % 32 == 0: a chunk is all in or all out
#pragma unroll
                for (int jt = 0; jt < NT; ++jt) {
                    const int tok = jt * 8 + g;
                    st.xv[u][jt][j] = in && tok < M ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)tok * K + k))
                                                    : zero;
                }
            }
        }
    };

    auto compute = [&](const QStage<BITS, UNROLL, NT>& st) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
            for (int j = 0; j < CH; ++j) {
                uint32_t pa[4], pb[4];  // pairs (e0,e1) (e2,e3) (e4,e5) (e6,e7) of rows g and g + 8
                if (BITS == 8) {
                    s8x4_pairs<T>(word_at(st.wa[u], 2 * j), pa[0], pa[1]);
                    s8x4_pairs<T>(word_at(st.wa[u], 2 * j + 1), pa[2], pa[3]);
                    s8x4_pairs<T>(word_at(st.wb[u], 2 * j), pb[0], pb[1]);
                    s8x4_pairs<T>(word_at(st.wb[u], 2 * j + 1), pb[2], pb[3]);
                } else if (SYM) {
#pragma unroll
                    for (int p = 0; p < 4; ++p) {
                        pa[p] = u4_pair_signed<T>(word_at(st.wa[u], j), p);
                        pb[p] = u4_pair_signed<T>(word_at(st.wb[u], j), p);
                    }
                } else {
#pragma unroll
                    for (int p = 0; p < 4; ++p) {
                        pa[p] = u4_pair_biased<T>(word_at(st.wa[u], j), p);
                        pb[p] = u4_pair_biased<T>(word_at(st.wb[u], j), p);
                    }
                }
                const uint32_t a0[4] = {pa[0], pb[0], pa[1], pb[1]};
                const uint32_t a1[4] = {pa[2], pb[2], pa[3], pb[3]};
                float da, db, ma = 0.f, mb = 0.f;
                if (BITS == 8) {
                    da = half_bits_to_float(st.sa[u][j]);
                    db = half_bits_to_float(st.sb[u][j]);
                } else if (SYM) {
                    da = half_bits_to_float(st.sa[u][j >> 1] >> (16 * (j & 1)));
                    db = half_bits_to_float(st.sb[u][j >> 1] >> (16 * (j & 1)));
                } else {
                    const float2 fa = __half22float2(*reinterpret_cast<const __half2*>(&st.sa[u][j]));
                    const float2 fb = __half22float2(*reinterpret_cast<const __half2*>(&st.sb[u][j]));
                    da = fa.x, db = fb.x;
                    ma = fmaf(-U4Bias<T>::value, da, fa.y);  // the codes carry the bias B (u4_pair_biased)
                    mb = fmaf(-U4Bias<T>::value, db, fb.y);
                }
#pragma unroll
                for (int jt = 0; jt < NT; ++jt) {
                    const uint4& xv = st.xv[u][jt][j];
                    float c[4] = {0.f, 0.f, 0.f, 0.f};
                    mma_16816<T>(c, a0, xv.x, xv.y);
                    mma_16816<T>(c, a1, xv.z, xv.w);
                    add_scaled(acc[jt], da, db, c);
                    if (BITS == 4 && !SYM) {
                        const uint32_t one = ones_pair<T>();
                        const uint32_t ones[4] = {one, one, one, one};
                        float s[4] = {0.f, 0.f, 0.f, 0.f};  // chunk sums of x for tokens 2t, 2t + 1
                        mma_16816<T>(s, ones, xv.x, xv.y);
                        mma_16816<T>(s, ones, xv.z, xv.w);
                        add_scaled(acc[jt], ma, mb, s);
                    }
                }
            }
        }
    };

    // The ring's copy of one step into `slot` (rows w_a / w_b from super-block sb0; nothing real past n_sb or
    // when !live: zero-filled), then its commit group. SCALE_RING: the step's scales too, 128 bytes a super-block
    // from the tile's (s_t, in 16-byte units; lanes 0-7) into sslots, as x1_linear does.
    auto ring_copy = [&](uint4 (*slots)[UNROLL][2][32], uint4 (*sslots)[UNROLL][8], int slot, const uint8_t* w_a,
                         const uint8_t* w_b, const uint4* s_t, int sb0, bool live) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int sb = sb0 + u * WARPS;
            const bool ok = live && sb < n_sb;
            const size_t off = ok ? (size_t)sb * SB_STRIDE : 0;
            if (L2_HINT) {
                cp_async16_l2_256(&slots[slot][u][0][lane], w_a + off, ok);
                cp_async16_l2_256(&slots[slot][u][1][lane], w_b + off, ok);
            } else {
                cp_async16(&slots[slot][u][0][lane], w_a + off, ok);
                cp_async16(&slots[slot][u][1][lane], w_b + off, ok);
            }
            if constexpr (SCALE_RING)
                if (lane < 8) cp_async16_scales(&sslots[slot][u][lane], s_t + (ok ? sb : 0) * 8 + lane, ok);
        }
        cp_async_commit();
    };
    // SCALE_RING: the ring's scale slots, [STAGES][UNROLL][8] a warp (q4_0_scale_ring: shared memory only there)
    auto scale_ring = [&](int wp) -> uint4(*)[UNROLL][8] {
        if constexpr (SCALE_RING)
            return reinterpret_cast<uint4(*)[UNROLL][8]>(q4_0_scale_ring<WARPS * STAGES * UNROLL * 8>()) + wp * STAGES;
        else
            return nullptr;
    };
    // The tile's scales (SCALE_RING) for ring_copy, from a row of it (row_of's rows are in bounds)
    auto tile_scales = [&](int row) {
        return reinterpret_cast<const uint4*>(scales) + q4_0_scales_at(row / QGEMV_ROWS, 0, n_sb, 0);
    };
    // The step's scales from the ring into a stage (SCALE_RING), rows g and g + 8 in one 16-byte read
    auto ring_scales = [&](QStage<BITS, UNROLL, NT>& st, uint4 (*sslots)[UNROLL][8], int slot) {
        if constexpr (SCALE_RING) {
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const uint4 v = sslots[slot][u][g];
                st.sa[u][0] = v.x, st.sa[u][1] = v.y, st.sb[u][0] = v.z, st.sb[u][1] = v.w;
            }
        }
    };

    auto finish = [&](float(*partial)[NT * 4][32], int n0) {
        if constexpr (ROPE)
            finish_small_m_tile_rope<T, WARPS, NT>(partial, acc, y, bias, n0, M, N, rope);
        else
            finish_small_m_tile<T, OutT, WARPS, NT, SWIGLU>(partial, acc, y, bias, n0, M, N);
    };

    QStage<BITS, UNROLL, NT> front, back;
    // Every shape's start: the first step's weights or scales (never written by a kernel: before the PDL wait),
    // the wait, the first step's x.
    auto start = [&](int row_a, int row_b) {
        load_w(front, warp, row_a, row_b);
        pdl_begin_late();  // the next kernel may be a PRENORM one: it reads r before its wait (PreNorm above)
        load_x(front, warp);
    };
    if constexpr (STAGES == 0) {  // one tile per block: the grid is ceil(N / 16)
        __shared__ float partial[WARPS][NT * 4][32];
        const int row_a = row_of(blockIdx.x, g), row_b = row_of(blockIdx.x, g + 8);
        auto load = [&](QStage<BITS, UNROLL, NT>& st, int sb0) {
            load_w(st, sb0, row_a, row_b);
            load_x(st, sb0);
        };
        start(row_a, row_b);
        for (int sb0 = warp; sb0 < n_sb; sb0 += 2 * STEP) {
            load(back, sb0 + STEP);
            compute(front);
            load(front, sb0 + 2 * STEP);
            compute(back);
        }
        finish(partial, blockIdx.x * QGEMV_ROWS);
    } else if constexpr (!PERSIST) {  // one tile per block: the grid is ceil(N / 16)
        // Slot [warp][s][u][row a / b][lane]: 1 KB per super-block, so WARPS * STAGES * UNROLL KB. Every lane
        // copies only its own 16-byte pieces and reads back only those, and cp.async.wait_group makes a
        // thread's own copies visible to it: no barrier inside the loop.
        __shared__ __align__(16) uint4 ring[WARPS][STAGES][UNROLL][2][32];
        uint4(*slots)[UNROLL][2][32] = ring[warp];
        uint4(*sslots)[UNROLL][8] = scale_ring(warp);
        const int row_a = row_of(blockIdx.x, g), row_b = row_of(blockIdx.x, g + 8);
        const uint8_t* w_a = row_codes(row_a);
        const uint8_t* w_b = row_codes(row_b);
        const uint4* s_t = tile_scales(row_a);
        // One commit group per step, also for steps past the end (zero-filled), so that the group of the
        // step being read is always the (STAGES - 1)-th most recent.
        auto issue = [&](int slot, int sb0) { ring_copy(slots, sslots, slot, w_a, w_b, s_t, sb0, true); };
        int slot = 0;  // the step being computed; the one STAGES - 1 ahead goes into the slot freed before it
        // Scales (but SCALE_RING's, through the ring) and x (small, cache-resident) stay in registers, loaded one step
        // ahead.
        auto step = [&](QStage<BITS, UNROLL, NT>& cur, QStage<BITS, UNROLL, NT>& next, int sb0) {
            cp_async_wait<STAGES - 2>();
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) cur.wa[u] = slots[slot][u][0][lane], cur.wb[u] = slots[slot][u][1][lane];
            ring_scales(cur, sslots, slot);
            issue(slot == 0 ? STAGES - 1 : slot - 1, sb0 + (STAGES - 1) * STEP);
            slot = slot + 1 == STAGES ? 0 : slot + 1;
            load_w(next, sb0 + STEP, row_a, row_b);
            load_x(next, sb0 + STEP);
            compute(cur);
        };
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) issue(s, warp + s * STEP);
        start(row_a, row_b);
        for (int sb0 = warp; sb0 < n_sb; sb0 += 2 * STEP) {
            step(front, back, sb0);
            step(back, front, sb0 + STEP);
        }
        // The ring becomes `partial` (it is always large enough): the trailing zero-fill copies must have
        // landed and every warp must be done reading its slots first.
        cp_async_wait<0>();
        __syncthreads();
        finish(reinterpret_cast<float(*)[NT * 4][32]>(&ring[0][0][0][0][0]), blockIdx.x * QGEMV_ROWS);
    } else {
        // The ring as above, and `partial` of its own: the ring is still streaming the next tile.
        __shared__ __align__(16) uint4 ring[WARPS][STAGES][UNROLL][2][32];
        __shared__ float partial[WARPS][NT * 4][32];
        uint4(*slots)[UNROLL][2][32] = ring[warp];
        uint4(*sslots)[UNROLL][8] = scale_ring(warp);
        // PERSIST: block b takes the 16-row tiles b, b + gridDim.x, ... (the launcher sizes the grid so that every
        // block gets the same count where it can), and the ring runs on through them: while a tile's last steps are
        // computed and its sums stored, the first super-blocks of the block's next tile are already in flight.
        // Every warp makes the same even number of steps per tile (steps past n_sb read zeros), so the tile-end
        // barriers line up across the block. Within a tile the loop is the one-tile loop's, but for the ahead
        // cursor, and a tile's sums come in the same order as there, whatever the grid: the same bits.
        const int n_tiles = (N + QGEMV_ROWS - 1) / QGEMV_ROWS;
        const int sb_end = warp + 2 * STEP * ((n_sb + 2 * STEP - 1) / (2 * STEP));  // this warp's steps end here
        // The cursor STAGES - 1 steps ahead: its tile's row pointers move only when it crosses into the next tile.
        int a_tile = blockIdx.x, a_sb = warp;
        bool a_live = a_tile < n_tiles;
        const uint8_t* a_wa = row_codes(row_of(a_tile, g));
        const uint8_t* a_wb = row_codes(row_of(a_tile, g + 8));
        const uint4* a_st = tile_scales(row_of(a_tile, g));
        // One commit group per step, also for steps past the end (zero-filled), so that the group of the
        // step being read is always the (STAGES - 1)-th most recent.
        auto issue = [&](int slot) {
            ring_copy(slots, sslots, slot, a_wa, a_wb, a_st, a_sb, a_live);
            a_sb += STEP;
            if (a_sb >= sb_end) {
                a_sb = warp;
                a_tile += gridDim.x;
                a_live = a_tile < n_tiles;
                a_wa = row_codes(row_of(a_tile, g));
                a_wb = row_codes(row_of(a_tile, g + 8));
                a_st = tile_scales(row_of(a_tile, g));
            }
        };
        int slot = 0;  // the step being computed; the one STAGES - 1 ahead goes into the slot freed before it
        // Scales (but SCALE_RING's, through the ring) and x (small, cache-resident) stay in registers, loaded one step
        // ahead: next_sb0 and the rows of the step after this one (the next tile's first step at a tile's end; n_sb
        // past the last tile).
        auto step = [&](QStage<BITS, UNROLL, NT>& cur, QStage<BITS, UNROLL, NT>& next, int next_sb0, int next_a,
                        int next_b) {
            cp_async_wait<STAGES - 2>();
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) cur.wa[u] = slots[slot][u][0][lane], cur.wb[u] = slots[slot][u][1][lane];
            ring_scales(cur, sslots, slot);
            issue(slot == 0 ? STAGES - 1 : slot - 1);
            slot = slot + 1 == STAGES ? 0 : slot + 1;
            load_w(next, next_sb0, next_a, next_b);
            load_x(next, next_sb0);
            compute(cur);
        };
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) issue(s);
        int tile = blockIdx.x, row_a = row_of(tile, g), row_b = row_of(tile, g + 8);
        start(row_a, row_b);
        while (tile < n_tiles) {
            const int next_tile = tile + gridDim.x;
            const int next_a = row_of(next_tile, g), next_b = row_of(next_tile, g + 8);
            const int next_first = next_tile < n_tiles ? warp : n_sb;
            for (int sb0 = warp; sb0 < sb_end; sb0 += 2 * STEP) {
                step(front, back, sb0 + STEP, row_a, row_b);
                const bool last = sb0 + 2 * STEP >= sb_end;
                step(back, front, last ? next_first : sb0 + 2 * STEP, last ? next_a : row_a, last ? next_b : row_b);
            }
            finish(partial, tile * QGEMV_ROWS);
            __syncthreads();  // every thread has read `partial` before the next tile writes it
#pragma unroll
            for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
            tile = next_tile, row_a = next_a, row_b = next_b;
        }
        cp_async_wait<0>();  // the trailing zero-fill copies land before the block exits
    }
    trace_end();
}

// Small M with RT row tiles per block (quant_linear_rt; int8 and Q4_0, 9 to 32 tokens). quant_linear's one tile
// per block reads all of x (M K 2 bytes) for 16 rows' weights: at 32 tokens that is 8 bytes of x per byte of Q4_0
// weight, and its two register stages of x (64 registers each) held the kernel at 255 registers, spilling, at 2
// blocks of 4 warps per SM (ncu, H200: 871 GB/s on Llama-3-8B's gate/up at M = 32; docs/PERFORMANCE.md,
// twenty-fifth session). Here a warp's x of a step (one super-block, NT token tiles) serves RT tiles of 16 rows,
// whose codes (and Q4_0's scales) arrive through a cp.async ring as in quant_linear, and x is loaded once per step
// at its start, not a step ahead. Per tile the sums run in quant_linear's order (warp w: super-blocks w, w +
// WARPS, ..., whatever quant_linear's UNROLL), so with as many warps as a quant_linear kernel the outputs have its
// bits.
template <typename T, typename OutT, int BITS, int NT, int WARPS, int RT, int STAGES, bool SWIGLU = false,
          bool ROPE = false>
__device__ __forceinline__ void quant_linear_rt(OutT* __restrict__ y, const T* __restrict__ x,
                                                const uint8_t* __restrict__ w, const void* __restrict__ scales,
                                                const T* __restrict__ bias, int M, int N, int K, int n_sb,
                                                int n_groups, int gshift, const RopeArgs<T>& rope = RopeArgs<T>{}) {
    static_assert(STAGES >= 2 && (BITS == 8 || BITS == 4), "int8 or Q4_0 (the 4s layout), a ring of 2+ stages");
    constexpr bool Q4 = BITS == 4;
    constexpr int CH = Q4 ? 4 : 2, SB_ELEMS = CH * 32;
    constexpr int SB_STRIDE = (Q4 ? Q4_0_SB_STRIDE : 1) * QGEMV_SB_BYTES;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int tile0 = blockIdx.x * RT;
    const size_t row_bytes = (size_t)n_sb * QGEMV_SB_BYTES;
    // Slot [warp][s][tile][row a / b][lane], as quant_linear's ring; Q4_0's scales: [warp][s][tile][lanes 0-7].
    __shared__ __align__(16) uint4 ring_w[WARPS][STAGES][RT][2][32];
    __shared__ __align__(16) uint4 ring_s[WARPS][Q4 ? STAGES : 1][RT][8];
    static_assert(STAGES * RT * 1024 >= NT * 4 * 32 * 4, "the ring becomes `partial`");
    const uint8_t* wa[RT];
    const uint8_t* wb[RT];
    int ra[RT], rb[RT];
#pragma unroll
    for (int r = 0; r < RT; ++r) {  // rows past N clamped onto N - 1: loads stay in bounds, never stored
        ra[r] = min((tile0 + r) * QGEMV_ROWS + g, N - 1), rb[r] = min((tile0 + r) * QGEMV_ROWS + g + 8, N - 1);
        wa[r] = w + (Q4 ? q4_0_tile_offset(ra[r], n_sb) * QGEMV_SB_BYTES : ra[r] * row_bytes) + 16 * t;
        wb[r] = w + (Q4 ? q4_0_tile_offset(rb[r], n_sb) * QGEMV_SB_BYTES : rb[r] * row_bytes) + 16 * t;
    }
    // One commit group per step, also past the end (zero-filled): the step read is always STAGES - 2 back.
    auto issue = [&](int slot, int sb) {
        const bool ok = sb < n_sb;
        const uint32_t off = ok ? (uint32_t)sb * SB_STRIDE : 0u;
#pragma unroll
        for (int r = 0; r < RT; ++r) {
            cp_async16_l2_256(&ring_w[warp][slot][r][0][lane], wa[r] + off, ok);
            cp_async16_l2_256(&ring_w[warp][slot][r][1][lane], wb[r] + off, ok);
            if constexpr (Q4)
                if (lane < 8)
                    cp_async16_scales(&ring_s[warp][slot][r][lane],
                                      reinterpret_cast<const uint4*>(scales) +
                                          q4_0_scales_at(ra[r] / QGEMV_ROWS, ok ? sb : 0, n_sb, lane),
                                      ok);
        }
        cp_async_commit();
    };
    float acc[RT][NT][4];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[r][j][0] = acc[r][j][1] = acc[r][j][2] = acc[r][j][3] = 0.f;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s, warp + s * WARPS);  // weights: before the PDL wait
    pdl_begin_late();  // the next kernel may be a PRENORM one: it reads r before its wait
    int slot = 0;
    for (int sb = warp; sb < n_sb; sb += WARPS) {
        // x and int8's scales of this step first: their latency runs under the ring's wait
        uint4 xv[NT][CH];
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            const int k = sb * SB_ELEMS + 32 * j + 8 * t;
            const bool in = k < K;  // K % 32 == 0: a chunk is all in or all out
#pragma unroll
            for (int jt = 0; jt < NT; ++jt) {
                const int tok = jt * 8 + g;
                xv[jt][j] = in && tok < M ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)tok * K + k))
                                          : make_uint4(0, 0, 0, 0);
            }
        }
        uint32_t s8a[Q4 ? 1 : RT][CH], s8b[Q4 ? 1 : RT][CH];
        if constexpr (!Q4) {
            const unsigned short* s = reinterpret_cast<const unsigned short*>(scales);
#pragma unroll
            for (int r = 0; r < RT; ++r)
#pragma unroll
                for (int j = 0; j < CH; ++j) {
                    const int chunk = sb * CH + j;
                    const bool in = chunk * 32 < K;  // padded chunks: scale 0
                    s8a[r][j] = in ? __ldg(s + (size_t)ra[r] * n_groups + (chunk >> gshift)) : 0u;
                    s8b[r][j] = in ? __ldg(s + (size_t)rb[r] * n_groups + (chunk >> gshift)) : 0u;
                }
        }
        cp_async_wait<STAGES - 2>();
        // Q4_0: each lane reads the scales lane g copied (the wait covers only a lane's own copies), and lanes 0-7
        // refill the slot read one step ago below: a warp barrier orders both.
        if constexpr (Q4) __syncwarp();
        uint4 cw[RT][2], cs[RT];
#pragma unroll
        for (int r = 0; r < RT; ++r) {
            cw[r][0] = ring_w[warp][slot][r][0][lane], cw[r][1] = ring_w[warp][slot][r][1][lane];
            if constexpr (Q4) cs[r] = ring_s[warp][slot][r][g];
        }
        issue(slot == 0 ? STAGES - 1 : slot - 1, sb + (STAGES - 1) * WARPS);  // the slot read one step ago
        slot = slot + 1 == STAGES ? 0 : slot + 1;
#pragma unroll
        for (int j = 0; j < CH; ++j) {
#pragma unroll
            for (int r = 0; r < RT; ++r) {
                uint32_t pa[4], pb[4];  // pairs (e0,e1) (e2,e3) (e4,e5) (e6,e7) of rows g and g + 8
                float da, db;
                if constexpr (Q4) {
#pragma unroll
                    for (int p = 0; p < 4; ++p) {
                        pa[p] = u4_pair_signed<T>(word_at(cw[r][0], j), p);
                        pb[p] = u4_pair_signed<T>(word_at(cw[r][1], j), p);
                    }
                    // rows g and g + 8's fp16 d: chunks (0, 1) in .x / .z, (2, 3) in .y / .w
                    da = half_bits_to_float((j < 2 ? cs[r].x : cs[r].y) >> (16 * (j & 1)));
                    db = half_bits_to_float((j < 2 ? cs[r].z : cs[r].w) >> (16 * (j & 1)));
                } else {
                    s8x4_pairs<T>(word_at(cw[r][0], 2 * j), pa[0], pa[1]);
                    s8x4_pairs<T>(word_at(cw[r][0], 2 * j + 1), pa[2], pa[3]);
                    s8x4_pairs<T>(word_at(cw[r][1], 2 * j), pb[0], pb[1]);
                    s8x4_pairs<T>(word_at(cw[r][1], 2 * j + 1), pb[2], pb[3]);
                    da = half_bits_to_float(s8a[r][j]);
                    db = half_bits_to_float(s8b[r][j]);
                }
                const uint32_t a0[4] = {pa[0], pb[0], pa[1], pb[1]};
                const uint32_t a1[4] = {pa[2], pb[2], pa[3], pb[3]};
#pragma unroll
                for (int jt = 0; jt < NT; ++jt) {
                    float c[4] = {0.f, 0.f, 0.f, 0.f};
                    mma_16816<T>(c, a0, xv[jt][j].x, xv[jt][j].y);
                    mma_16816<T>(c, a1, xv[jt][j].z, xv[jt][j].w);
                    add_scaled(acc[r][jt], da, db, c);
                }
            }
        }
    }
    // The ring becomes `partial`: the trailing zero-fill copies must have landed and every warp must be done
    // reading its slots first.
    cp_async_wait<0>();
    __syncthreads();
    float(*partial)[NT * 4][32] = reinterpret_cast<float(*)[NT * 4][32]>(&ring_w[0][0][0][0][0]);
#pragma unroll
    for (int r = 0; r < RT; ++r) {
        if constexpr (ROPE)
            finish_small_m_tile_rope<T, WARPS, NT>(partial, acc[r], y, bias, (tile0 + r) * QGEMV_ROWS, M, N, rope);
        else
            finish_small_m_tile<T, OutT, WARPS, NT, SWIGLU>(partial, acc[r], y, bias, (tile0 + r) * QGEMV_ROWS, M,
                                                            N);
        if (r + 1 < RT) __syncthreads();  // every thread has read `partial` before the next tile writes it
    }
    trace_end();
}

// A tile's end in x1_linear (8 warps, one token tile): the warps' sums through `partial`, then the epilogue.
// stage (SEND): the tile's outputs also into shared memory, for send_tile.
template <typename OutT, bool SWIGLU, bool ROPE>
__device__ __forceinline__ void x1_finish(float (*partial)[4][32], float acc_a, float acc_b, OutT* __restrict__ y,
                                             const bf16* __restrict__ bias, int n0, int M, int N,
                                             const RopeArgs<bf16>& rope, OutT* stage = nullptr) {
    const float acc[1][4] = {{acc_a, 0.f, acc_b, 0.f}};
    if constexpr (ROPE)
        finish_small_m_tile_rope<bf16, 8, 1>(partial, acc, y, bias, n0, M, N, rope);
    else
        finish_small_m_tile<bf16, OutT, 8, 1, SWIGLU>(partial, acc, y, bias, n0, M, N, stage);
    __syncthreads();  // every thread has read `partial` before the next tile writes it
}

// One token of bf16 x against int8 or Q4_0 weights (the _x1 and _x1n kernels): x staged as fp16 in shared memory
// (stage_x_half; Q4_0 through u4_pair_x16, each chunk's mma started from its bias) and a loop of its own, with about
// 110 instructions per 1 KB warp step where quant_linear's general shape took about 180, and at most 80 registers:
// Q4_0 runs 3 blocks per SM (24 warps) to cover the weight stream's latency, which quant_linear's 103 registers did
// not allow. (The fewer instructions alone gained 0.2% at 2 blocks per SM: the loop waits on memory, not on issue.)
//   - The block's tiles are one flat run of steps (int8: unrolled by STAGES so that every ring slot is a constant;
//     Q4_0: rolled, smaller code); the ahead cursor and the compute cursor each move on to their next tile in a
//     branch taken once per tile.
//   - The scales: Q4_0's through the ring with the codes (a step's 128 bytes, in tiles); in registers loaded
//     STAGES - 1 steps ahead (8-byte loads, row-major) the kernels ran 6% slower, and an earlier ring of 8-byte copies
//     of row-major scales, which go through L1, 8% slower. int8's go into registers (reg_s[slot]) when the ahead
//     cursor issues the slot's copy.
//   - x is staged as zeros up to a whole number of steps per warp (n_sb rounded up to WARPS), so no step tests K
//     or n_sb on the compute side; the ring zero-fills a step past n_sb (scale 0: d * finite = 0).
//   - Every lane reads x (lanes g != 0 feed the mma's columns 1..7, whose results are never read); Q4_0's chunk
//     biases are stored four times so that one 16-byte load is the mma's accumulator input.
//   - PRENORM (int8): the pre-norm folded into the prologue (PreNormStage above).
//   - ASYM (BITS = 4): Q4_1 (and Q4_K, which loads in Q4_1's form) in its row-major layout (the m kernels' and the
//     prefill's; int8's addressing): Q4_0's loop with the mins added, x's chunk biases taking off only the 1024s and
//     each chunk's sum of x after them (stage_x_half's ASYM), a step's scales 16 rows of 4 (d, m) pairs (256 bytes)
//     through the ring, lanes 0-15 copying a row each; d times the mma's sum plus m times the chunk's sum of x. Before
//     it, one token of Q4_1 ran quant_linear's m1 kernel: Llama-3-8B b=1 400 tok/s where Q4_0 ran 566 (H200,
//     docs/PERFORMANCE.md, twenty-eighth session).
// The arithmetic is quant_linear's one-token path's, step for step: the same fp32 sums in the same order (Q4_0:
// the same bits, checked on an H100 against that kernel on six shapes; int8: the m1 kernels' bits, the GPU tests).
template <int BITS, typename OutT, bool SWIGLU, bool ROPE, int STAGES, bool PRENORM = false, bool SEND = false,
          bool ASYM = false>
__device__ __forceinline__ void x1_linear(OutT* __restrict__ y, const bf16* __restrict__ x,
                                          const uint8_t* __restrict__ w, const void* __restrict__ scales,
                                          const bf16* __restrict__ bias, int M, int N, int K, int n_sb, int n_groups,
                                          int gshift, const RopeArgs<bf16>& rope = RopeArgs<bf16>{},
                                          const PreNorm& prenorm = PreNorm{}, const LlSend& send = LlSend{}) {
    static_assert(STAGES >= 2, "a ring of at least 2 stages");
    static_assert(!SEND || (!SWIGLU && !ROPE && !PRENORM && sizeof(OutT) == 2), "SEND: a plain projection into bf16");
    static_assert(BITS == 8 || BITS == 4, "int8, or Q4_0 (the 4s layout)");
    static_assert(!ASYM || BITS == 4, "ASYM: Q4_1, row-major");
    constexpr bool Q4 = BITS == 4;
    constexpr int WARPS = 8, STEP_SB = WARPS;  // a warp step: one super-block (1 KB of 16 rows), sb = warp + 8 i
    constexpr int VPS = Q4 ? 16 : 8;           // x vectors (8 elements) per super-block: 128 or 64 elements
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n_sbp = (n_sb + WARPS - 1) / WARPS * WARPS;  // x staged (zeros past K) up to here
    const int steps = n_sbp / WARPS;                          // per warp per tile, the same for every warp
    const int n_tiles = (N + QGEMV_ROWS - 1) / QGEMV_ROWS;
    const int my_tiles = blockIdx.x < n_tiles ? (n_tiles - 1 - blockIdx.x) / gridDim.x + 1 : 0;
    const int total = my_tiles * steps;
    const size_t row_bytes = (size_t)n_sb * QGEMV_SB_BYTES;

    static_assert(!Q4 || STAGES <= Q4_0_X1_MAX_STAGES, "Q4_0's scale ring: kernels.py Q4_0_X1_SCALE_RING");
    // Slot [warp][s][row a / b][lane]: each lane copies and reads back only its own pieces (no barrier).
    __shared__ __align__(16) uint4 ring_w[WARPS][STAGES][2][32];
    // Their scales. int8: in registers (slot s is a constant in the unrolled loop below), rows g and g + 8, each of
    // the 2 chunks' group scale (fp16 bits). Q4_0: the step's 128 bytes (16 rows' 4 fp16 d, Q4_0_TILES) through the
    // ring with the codes, lanes 0-7 copying 16 bytes each: ring_s (dynamic shared memory, after x). Llama-3-8B b=1
    // 552.8 tok/s against 518.2 / 521.1 with them in registers as int8's (H200, docs/PERFORMANCE.md, twenty-second
    // session).
    uint2 reg_s[Q4 ? 1 : STAGES][2];
    __shared__ float partial[WARPS][4][32];
    __shared__ __align__(16) SendStage<bf16, 1> send_st;  // SEND only (unused shared memory is not allocated)
    extern __shared__ __align__(16) uint4 qgemv_xs[];
    // ASYM: each super-block's chunk biases followed by its chunk sums of x (a fifth 16-byte vector); ring_s's step
    // holds 16 rows' 16 bytes of (d, m).
    constexpr int BIAS_VECS = ASYM ? 5 : 4, X_VECS = VPS + BIAS_VECS, SCALE_VECS = ASYM ? 16 : 8;
    uint4 (*const ring_s)[STAGES][SCALE_VECS] =
        reinterpret_cast<uint4 (*)[STAGES][SCALE_VECS]>(qgemv_xs + n_sbp * X_VECS);
    if constexpr (Q4) {  // x, its chunk biases (stage_x_half checks those) and ring_s: qgemv_x1_bytes
        uint32_t dyn;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
        if (dyn < (uint32_t)n_sbp * X_VECS * 16u + Q4_0_X1_MAX_STAGES * WARPS * 16u * SCALE_VECS) __trap();
    }

    // The cursor STAGES - 1 steps ahead: its tile's row pointers move only when it crosses into the next tile.
    // Each format's code below is the one measured (docs/PERFORMANCE.md, sixteenth session): the Q4_0 and int8
    // branches differ in form where a common form compiled to a slower Q4_0 kernel (405.9 against 414.9 tok/s).
    int a_tile = blockIdx.x, a_sb = warp;
    const uint8_t *a_wa, *a_wb;           // rows g and g + 8: codes
    const uint8_t* a_s = nullptr;         // Q4_0: the tile's scales, lane (lanes 0-7) 16 bytes of each step's 128
    const unsigned short *a_ga, *a_gb;    // int8: their group scales
    auto aim = [&]() {
        if constexpr (ASYM) {  // row-major: rows g and g + 8, and lanes 0-15 row (lane & 15)'s (d, m), clamped to N - 1
            const int r0 = a_tile * QGEMV_ROWS;
            a_wa = w + (size_t)min(r0 + g, N - 1) * row_bytes + 16 * t;
            a_wb = w + (size_t)min(r0 + g + 8, N - 1) * row_bytes + 16 * t;
            a_s = static_cast<const uint8_t*>(scales) + (size_t)min(r0 + (lane & 15), N - 1) * n_sb * 16;
        } else if constexpr (Q4) {  // codes in tiles (Q4_0_TILES): the tile's rows g and g + 8, the last tile past the end
            const size_t r0 = (size_t)min(a_tile, n_tiles - 1) * QGEMV_ROWS;
            a_wa = w + r0 * row_bytes + g * QGEMV_SB_BYTES + 16 * t, a_wb = a_wa + 8 * QGEMV_SB_BYTES;
            // q4_0_scales_at(r0 / 16, 0, n_sb, lane & 7) in bytes, written out: through the helper (other address
            // arithmetic, once per tile) b=1 ran 552 tok/s against 564 (H200, docs/PERFORMANCE.md, 23rd session)
            a_s = static_cast<const uint8_t*>(scales) + r0 * n_sb * 8 + 16 * (lane & 7);
        } else {
            const size_t ra = min(a_tile * QGEMV_ROWS + g, N - 1), rb = min(a_tile * QGEMV_ROWS + g + 8, N - 1);
            a_wa = w + ra * row_bytes + 16 * t, a_wb = w + rb * row_bytes + 16 * t;
            a_ga = static_cast<const unsigned short*>(scales) + ra * n_groups;
            a_gb = static_cast<const unsigned short*>(scales) + rb * n_groups;
        }
    };
    aim();
    // Addresses stay in bounds where nothing is read (super-block 0): the loads may be issued either way.
    auto issue = [&](int slot) {
        const bool ok = a_tile < n_tiles && a_sb < n_sb;
        if constexpr (ASYM) {  // the rows' super-block: 64 bytes a row, and its 16 bytes of (d, m) (zeros past n_sb)
            const uint32_t off = ok ? (uint32_t)a_sb * QGEMV_SB_BYTES : 0u;
            cp_async16_l2_256(&ring_w[warp][slot][0][lane], a_wa + off, ok);
            cp_async16_l2_256(&ring_w[warp][slot][1][lane], a_wb + off, ok);
            if (lane < 16) cp_async16_scales(&ring_s[warp][slot][lane], a_s + (off >> 2), ok);
        } else if constexpr (Q4) {  // the tile's super-block: 1 KB of codes and 128 bytes of scales (zeros past n_sb)
            const uint32_t off = ok ? (uint32_t)a_sb * Q4_0_SB_STRIDE * QGEMV_SB_BYTES : 0u;
            cp_async16_l2_256(&ring_w[warp][slot][0][lane], a_wa + off, ok);
            cp_async16_l2_256(&ring_w[warp][slot][1][lane], a_wb + off, ok);
            if (lane < 8) cp_async16_scales(&ring_s[warp][slot][lane], a_s + (off >> 3), ok);
        } else {  // chunks 2 sb and 2 sb + 1; a chunk past K (K % 64 == 32) has scale 0
            const int sbi = ok ? a_sb : 0;
            const uint32_t off = (uint32_t)sbi * QGEMV_SB_BYTES;
            cp_async16_l2_256(&ring_w[warp][slot][0][lane], a_wa + off, ok);
            cp_async16_l2_256(&ring_w[warp][slot][1][lane], a_wb + off, ok);
            const int c0 = 2 * sbi;
            const bool in1 = ok && (c0 + 1) * 32 < K;
            const int g0 = c0 >> gshift, g1 = in1 ? (c0 + 1) >> gshift : g0;
            reg_s[slot][0] = make_uint2(ok ? ld_scale8(a_ga + g0) : 0u, in1 ? ld_scale8(a_ga + g1) : 0u);
            reg_s[slot][1] = make_uint2(ok ? ld_scale8(a_gb + g0) : 0u, in1 ? ld_scale8(a_gb + g1) : 0u);
        }
        cp_async_commit();  // one group per step, also past the end: the step read is always STAGES - 2 back
        a_sb += STEP_SB;
        if (a_sb >= n_sbp) a_sb = warp, a_tile += gridDim.x, aim();
    };
    // PRENORM: int8 replays add_rms_norm (PreNormStage: r and the norm weight loaded before the PDL wait); Q4_0
    // stages r' w and applies rstd to the sums (stage_x_half's FOLD), all of it after the wait.
    constexpr bool REPLAY = PRENORM && !Q4, FOLD = PRENORM && Q4;
    PreNormStage<WARPS * 32> pre;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s);  // weights and scales: before the PDL wait
    if constexpr (REPLAY) pre.load(prenorm, K);
    if constexpr (SEND) send_stage_bases(send_st, send);
    // int8: the next kernel may be a replaying one, which reads r before its wait, so it may start only once this
    // kernel's wait has returned. Q4_0: the model folds no replay after these kernels (Kernels.starts_dependents_late),
    // so the next kernel's blocks may be placed, and issue their weights, while the kernel before this one still
    // runs: Llama-3-8B b=1 +0.6% (H200, docs/PERFORMANCE.md, twentieth session).
    if constexpr (Q4)
        pdl_begin();
    else
        pdl_begin_late();
    if constexpr (SEND) send_stage_flags(send_st, send, M);
    if constexpr (REPLAY) pre.finish(qgemv_xs, prenorm, K);
    const float x_down = stage_x_half<WARPS, REPLAY, Q4, FOLD, ASYM>(qgemv_xs, x, K, n_sbp, warp, lane, prenorm);

    // The compute cursor: x (vector sb * VPS + 4 j + t: lane t's 8 elements of chunk j) and, for Q4_0, the chunk
    // biases (float4 sb * 4 + j, after the n_sbp * 16 vectors of x; ASYM: sb * 5 + j, and the chunk sums of x at
    // float4 sb * 5 + 4).
    const uint4* const x0 = qgemv_xs + warp * VPS + t;
    const float4* const b0 = reinterpret_cast<const float4*>(qgemv_xs + n_sbp * VPS) + warp * BIAS_VECS;
    const uint4* xp = x0;
    const float4* bp = b0;
    int c_step = 0, tile = blockIdx.x;
    float acc_a = 0.f, acc_b = 0.f;  // token 0 of rows g and g + 8 (lanes t = 0; the others' are never read)
    auto step = [&](int slot) {
        cp_async_wait<STAGES - 2>();
        const uint4 wa = ring_w[warp][slot][0][lane], wb = ring_w[warp][slot][1][lane];
        uint2 sa, sb;  // rows g and g + 8
        uint4 dma, dmb;  // ASYM: their (d, m) pairs
        if constexpr (ASYM) {
            dma = ring_s[warp][slot][g], dmb = ring_s[warp][slot][g + 8];
        } else if constexpr (Q4) {
            const uint4 v = ring_s[warp][slot][g];
            sa = make_uint2(v.x, v.y), sb = make_uint2(v.z, v.w);
        } else {
            sa = reg_s[slot][0], sb = reg_s[slot][1];
        }
        issue(slot == 0 ? STAGES - 1 : slot - 1);  // the slot read one step ago
        // Chunk j: pairs (e0,e1) (e2,e3) (e4,e5) (e6,e7) of rows g and g + 8 as fp16 in a0 / a1, the fp32 sum from the
        // mma, times the chunk's scale (fp16 bits da / db).
        if constexpr (Q4) {  // ASYM too: the same codes and mma; the scales apply with the min
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t ua = word_at(wa, j), ub = word_at(wb, j), ua8 = ua >> 8, ub8 = ub >> 8;
                const uint32_t a0[4] = {u4_pair_x16(ua, ua8, 0), u4_pair_x16(ub, ub8, 0), u4_pair_x16(ua, ua8, 1),
                                        u4_pair_x16(ub, ub8, 1)};
                const uint32_t a1[4] = {u4_pair_x16(ua, ua8, 2), u4_pair_x16(ub, ub8, 2), u4_pair_x16(ua, ua8, 3),
                                        u4_pair_x16(ub, ub8, 3)};
                const uint4 xv = xp[4 * j];
                const float4 bj = bp[j];
                float c[4] = {bj.x, bj.y, bj.z, bj.w};
                mma_16816<f16>(c, a0, xv.x, xv.y);
                mma_16816<f16>(c, a1, xv.z, xv.w);
                if constexpr (ASYM) {  // d sum q x + m sum x
                    const uint32_t pa = word_at(dma, j), pb = word_at(dmb, j);
                    const float xsum = reinterpret_cast<const float*>(bp + 4)[j];  // the chunk's sum of x
                    acc_a = fmaf(half_bits_to_float(pa >> 16), xsum, fmaf(half_bits_to_float(pa), c[0], acc_a));
                    acc_b = fmaf(half_bits_to_float(pb >> 16), xsum, fmaf(half_bits_to_float(pb), c[2], acc_b));
                } else {
                    const uint32_t da = (j < 2 ? sa.x : sa.y) >> (16 * (j & 1)),
                                   db = (j < 2 ? sb.x : sb.y) >> (16 * (j & 1));
                    acc_a = fmaf(half_bits_to_float(da), c[0], acc_a);
                    acc_b = fmaf(half_bits_to_float(db), c[2], acc_b);
                }
            }
        } else {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                uint32_t a0[4], a1[4];
                float c[4] = {0.f, 0.f, 0.f, 0.f};
                s8x4_pairs<f16>(word_at(wa, 2 * j), a0[0], a0[2]);
                s8x4_pairs<f16>(word_at(wa, 2 * j + 1), a1[0], a1[2]);
                s8x4_pairs<f16>(word_at(wb, 2 * j), a0[1], a0[3]);
                s8x4_pairs<f16>(word_at(wb, 2 * j + 1), a1[1], a1[3]);
                const uint32_t da = j == 0 ? sa.x : sa.y, db = j == 0 ? sb.x : sb.y;
                const uint4 xv = xp[4 * j];
                mma_16816<f16>(c, a0, xv.x, xv.y);
                mma_16816<f16>(c, a1, xv.z, xv.w);
                acc_a = fmaf(half_bits_to_float(da), c[0], acc_a);
                acc_b = fmaf(half_bits_to_float(db), c[2], acc_b);
            }
        }
        xp += WARPS * VPS;
        if constexpr (Q4) bp += WARPS * BIAS_VECS;
        if (++c_step == steps) {  // the tile's last step: its sums, then the next tile from its first super-block
            x1_finish<OutT, SWIGLU, ROPE>(partial, acc_a * x_down, acc_b * x_down, y, bias, tile * QGEMV_ROWS, M, N,
                                          rope, SEND ? reinterpret_cast<OutT*>(&send_st.out[0][0]) : nullptr);
            if constexpr (SEND) send_tile<bf16, 1>(send_st, tile * QGEMV_ROWS, M, N, send);
            acc_a = acc_b = 0.f, c_step = 0, tile += gridDim.x, xp = x0, bp = b0;
        }
    };
    if constexpr (Q4) {
        // Q4_0: one copy of the step (and of x1_finish) in a rolled loop, the ring slot a runtime index (nothing of
        // the step is in registers per slot). Unrolled by STAGES as int8's, a layer's three kernels held 96 KB of
        // code against 56 KB rolled: Llama-3-8B b=1 563.1 tok/s against 555.9 (H200, docs/PERFORMANCE.md,
        // twenty-third session). The likely reason is the code itself: a layer's kernels seem to fetch theirs again
        // at each launch (twenty-first session).
        int slot = 0;
#pragma unroll 1
        for (int i = 0; i < total; ++i) {
            step(slot);
            slot = slot + 1 == STAGES ? 0 : slot + 1;
        }
    } else {  // int8: reg_s[slot] needs a constant slot (rolled, with reg_s a queue shifted each step, int8 ran 3%
              // slower: its rope kernel spilled more)
        for (int i = 0; i < total; i += STAGES) {
#pragma unroll
            for (int s = 0; s < STAGES; ++s)
                if (i + s < total) step(s);
        }
    }
    cp_async_wait<0>();  // the trailing zero-fill copies land before the block exits
    trace_end();
}

// Dequantize the whole packed weight into out[N, K] (model dtype) for the prefill GEMM; one thread per
// lane-load unit (16 bytes of one row's super-block). The fp32 value d q (+ m), or d (q - 8) (SYM), is
// rounded once to T.
template <typename T, int BITS, bool SYM = false>
__device__ __forceinline__ void dequantize_packed(T* __restrict__ out, const uint8_t* __restrict__ w,
                                                  const void* __restrict__ scales, int N, int K, int n_sb,
                                                  int n_groups, int gshift) {
    pdl_begin();
    constexpr int CH = BITS == 8 ? 2 : 4, SB_ELEMS = CH * 32;
    if constexpr (SYM) {
        // Q4_0's codes are in tiles (Q4_0_TILES): a block takes SBB super-blocks of a tile, 8 KB read in storage
        // order, and writes its 16 rows out through shared memory, 2 KB of bf16 a row. (Read in (row, sb) order, 64
        // bytes 1 KB apart, or written 256 bytes a row, prefill ran 1.5-3.7% slower than with row-major codes.)
        constexpr int SBB = 8, VEC = SBB * SB_ELEMS / 8;  // 16-byte vectors of T per row per item
        __shared__ __align__(16) uint4 stage[QGEMV_ROWS][VEC];
        const int n_tiles = (N + QGEMV_ROWS - 1) / QGEMV_ROWS, groups = (n_sb + SBB - 1) / SBB;
        for (int item = blockIdx.x; item < n_tiles * groups; item += gridDim.x) {
            const int tile = item / groups, sb0 = item % groups * SBB;
            for (int u = threadIdx.x; u < SBB * QGEMV_ROWS * 4; u += blockDim.x) {  // (sb, row, t): storage order
                const int t = u & 3, r = (u >> 2) % QGEMV_ROWS, sl = u / (4 * QGEMV_ROWS), sb = sb0 + sl;
                const int row = tile * QGEMV_ROWS + r;
                if (sb >= n_sb || row >= N) continue;
                // q4_0_tile_offset(row, n_sb) + sb Q4_0_SB_STRIDE, from the tile and r at hand
                const uint4 v =
                    ld_stream16(w + (((size_t)tile * n_sb + sb) * QGEMV_ROWS + r) * QGEMV_SB_BYTES + 16 * t);
                const unsigned short* d4 = static_cast<const unsigned short*>(scales) +  // 8 bytes a row
                                           q4_0_scales_at(tile, sb, n_sb, r % 8) * 8 + r / 8 * 4;
#pragma unroll
                for (int j = 0; j < CH; ++j) {
                    if (sb * SB_ELEMS + 32 * j + 8 * t >= K) continue;
                    const float d = half_bits_to_float(d4[j]);
                    const uint32_t wd = word_at(v, j);
                    float f[8];
#pragma unroll
                    for (int p = 0; p < 4; ++p) {
                        f[2 * p] = d * (float)((int)((wd >> (4 * p)) & 0xF) - 8);
                        f[2 * p + 1] = d * (float)((int)((wd >> (4 * p + 16)) & 0xF) - 8);
                    }
                    stage[r][sl * (SB_ELEMS / 8) + 4 * j + t] = pack8<T>(f);  // element (sb0 + sl) 128 + 32 j + 8 t
                }
            }
            __syncthreads();
            for (int u = threadIdx.x; u < QGEMV_ROWS * VEC; u += blockDim.x) {  // row by row
                const int c = u % VEC, r = u / VEC, row = tile * QGEMV_ROWS + r, k = sb0 * SB_ELEMS + 8 * c;
                if (row < N && k < K) *reinterpret_cast<uint4*>(out + (size_t)row * K + k) = stage[r][c];
            }
            __syncthreads();
        }
        return;
    }
    const size_t units = (size_t)N * n_sb * 4;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < units;
         idx += (size_t)gridDim.x * blockDim.x) {
        const int t = (int)(idx & 3);
        const size_t rs = idx >> 2;
        const int sb = (int)(rs % n_sb);
        const size_t row = rs / n_sb;
        const uint4 v = *reinterpret_cast<const uint4*>(w + (row * n_sb + sb) * QGEMV_SB_BYTES + 16 * t);
        uint4 sm = make_uint4(0, 0, 0, 0);
        if (BITS == 4) sm = reinterpret_cast<const uint4*>(scales)[row * n_sb + sb];
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            const int k = sb * SB_ELEMS + 32 * j + 8 * t;
            if (k >= K) continue;
            float f[8];
            if (BITS == 8) {
                const float d = half_bits_to_float(
                    reinterpret_cast<const unsigned short*>(scales)[row * n_groups + ((sb * CH + j) >> gshift)]);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const uint32_t wd = word_at(v, 2 * j + h);
#pragma unroll
                    for (int e = 0; e < 4; ++e) f[4 * h + e] = d * (float)(int8_t)(wd >> (8 * e));
                }
            } else {
                const uint32_t dm_bits = word_at(sm, j);
                const float2 dm = __half22float2(*reinterpret_cast<const __half2*>(&dm_bits));
                const uint32_t wd = word_at(v, j);
#pragma unroll
                for (int p = 0; p < 4; ++p) {
                    f[2 * p] = dm.x * (float)((wd >> (4 * p)) & 0xF) + dm.y;
                    f[2 * p + 1] = dm.x * (float)((wd >> (4 * p + 16)) & 0xF) + dm.y;
                }
            }
            *reinterpret_cast<uint4*>(out + row * K + k) = pack8<T>(f);
        }
    }
}

// One kernel per (bits, token tiles NT): WARPS per block, UNROLL super-blocks per warp step, at least MINB
// blocks per SM (caps registers), L2 hint and weight ring STAGES as in quant_linear. kernels.py QGEMV_CONFIGS
// mirrors WARPS. QGEMV_ENTRY is one entry point (bench variants); QGEMV_KERNEL_EX the linear and its SwiGLU twin.
// FMT names the weight format in the kernel names: 8 (int8), 4 (Q4_1 layout), 4s (Q4_0 layout, SYM).
#define QGEMV_ENTRY(T, OUT_T, FNAME, BITS, NT, WARPS, UNROLL, MINB, L2, STAGES, SWIGLU, SYM, PERSIST)            \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB) FNAME(                                        \
        OUT_T* y, const T* x, const uint8_t* w, const void* scales, const T* bias, int M, int N, int K,          \
        int n_sb, int n_groups, int gshift) {                                                                   \
        quant_linear<T, OUT_T, BITS, NT, WARPS, UNROLL, SWIGLU, L2, STAGES, false, SYM, PERSIST>(               \
            y, x, w, scales, bias, M, N, K, n_sb, n_groups, gshift);                                            \
    }
// quant_linear_rt's entry point (int8: BITS 8; Q4_0: BITS 4, the 4s layout).
#define QGEMV_RT_ENTRY(T, OUT_T, FNAME, BITS, NT, WARPS, RT, STAGES, MINB, SWIGLU)                               \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB) FNAME(                                        \
        OUT_T* y, const T* x, const uint8_t* w, const void* scales, const T* bias, int M, int N, int K,          \
        int n_sb, int n_groups, int gshift) {                                                                   \
        quant_linear_rt<T, OUT_T, BITS, NT, WARPS, RT, STAGES, SWIGLU>(y, x, w, scales, bias, M, N, K, n_sb,     \
                                                                      n_groups, gshift);                        \
    }
#define QGEMV_KERNEL_EX(T, OUT_T, NAME, FMT, BITS, SYM, NT, WARPS, UNROLL, MINB, L2, STAGES, PERSIST)             \
    QGEMV_ENTRY(T, OUT_T, qgemv##FMT##_##NAME##_m##NT, BITS, NT, WARPS, UNROLL, MINB, L2, STAGES, false, SYM,     \
                PERSIST)                                                                                        \
    QGEMV_ENTRY(T, OUT_T, qgemv##FMT##_swiglu_##NAME##_m##NT, BITS, NT, WARPS, UNROLL, MINB, L2, STAGES, true,    \
                SYM, PERSIST)
#define QGEMV_KERNEL(T, OUT_T, NAME, FMT, BITS, SYM, NT, WARPS, UNROLL, MINB) \
    QGEMV_KERNEL_EX(T, OUT_T, NAME, FMT, BITS, SYM, NT, WARPS, UNROLL, MINB, false, 0, false)
// The q/k/v projection with rotary embedding and the KV store (output in T).
#define QGEMV_ROPE_KERNEL(T, NAME, FMT, BITS, SYM, NT, WARPS, UNROLL, MINB, L2, STAGES, PERSIST)                \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB) qgemv##FMT##_rope_##NAME##_m##NT(             \
        T* y, const T* x, const uint8_t* w, const void* scales, const T* bias, int M, int N, int K, int n_sb,   \
        int n_groups, int gshift, const int* positions, const float* inv_freq, const int* slots, T* k_cache,    \
        T* v_cache, int n_heads, int n_kv, int head_dim) {                                                      \
        quant_linear<T, T, BITS, NT, WARPS, UNROLL, false, L2, STAGES, true, SYM, PERSIST>(                     \
            y, x, w, scales, bias, M, N, K, n_sb, n_groups, gshift,                                             \
            RopeArgs<T>{positions, inv_freq, slots, k_cache, v_cache, n_heads, n_kv, head_dim});                \
    }
#ifndef QGEMV_VARIANTS_ONLY
// Chosen with `scripts/bench.py --qgemv` (docs/PERFORMANCE.md). Two blocks per SM (registers capped at 128)
// beat one fatter block by 10-40%: the kernel waits on memory latency. The weight ring with the L2::256B hint
// keeps more bytes in flight than registers can: int8 +13-17% at M <= 8 on every Llama-3-8B projection and
// +4-9% at M = 32 (H200, commit 9f6da13); 4-bit gains 0-5% at M <= 8 and nothing at M = 32 (its dequantisation
// issue, not latency, is the limit there), so its M > 16 kernel keeps the register stages.
// Q4_0 (4s) takes Q4_1's shapes. The last argument, PERSIST, is kernels.py QGEMV_PERSIST: blocks that loop over
// tiles won on an H100 (docs/PERFORMANCE.md, seventh session) for int8 at M <= 8 (8B b=8 +3.6%, b=1 even) and
// Q4_0 (b=1 +3.5%), and M <= 16 takes them alike; int8 at M = 17..32 was even, and Q4_1's kernels as they were
// beat the tile loop by 6% at b=1, so they stay one tile per block. Q4_0's SwiGLU twin at M <= 8 (the gate/up
// projection alone) takes the register stages instead: the sweep had them 4.8% faster on Llama-3-8B's 28,672
// gate/up rows (and 10% slower on down, so the plain kernel keeps the ring).
// The small-M kernels with row tiles (quant_linear_rt): 8 warps, 2 tiles a block, a 2-stage ring, 2 blocks per SM
// (the "_m2r" / "_m4r" kernels). kernels.py takes them where a launch has at least QGEMV_RT_TILES_PER_SM tiles per SM
// (there each SM still gets a block): on Llama-3-8B's gate/up (28,672 rows) and q/k/v (6,144), not its o and down
// (4,096), where the halved grid lost. Q4_0 over at least QGEMV_RT_WIDE_TILES_PER_SM tiles per SM (gate/up) takes
// 4 warps on a 3-stage ring at 4 blocks per SM instead (the "_m2rw" / "_m4rw" kernels, rope too, so that the
// fused q/k/v projection keeps the plain one's sums): 1,458 GB/s against 1,212 at M = 32, where on q/k/v (384
// tiles) it had 786 against 993. Q4_0 below QGEMV_RT_TILES_PER_SM (o and down: 256 tiles) takes one tile a block
// on 8 warps and a 4-stage ring (the "_m2r1" / "_m4r1" kernels) instead of quant_linear: 931 against 811 GB/s on o
// and 1,154 against 1,051 on down at M = 32, 1,387 against 1,209 and 1,890 against 1,734 at M = 16 (H200,
// docs/PERFORMANCE.md, twenty-fifth session).
#define QGEMV_RT_KERNEL(T, OUT_T, NAME, FMT, SUFFIX, BITS, NT, WARPS, RT, STAGES, MINB)                          \
    QGEMV_RT_ENTRY(T, OUT_T, qgemv##FMT##_##NAME##_m##NT##SUFFIX, BITS, NT, WARPS, RT, STAGES, MINB, false)    \
    QGEMV_RT_ENTRY(T, OUT_T, qgemv##FMT##_swiglu_##NAME##_m##NT##SUFFIX, BITS, NT, WARPS, RT, STAGES, MINB, true)
#define QGEMV_RT_ROPE_KERNEL(T, NAME, FMT, SUFFIX, BITS, NT, WARPS, RT, STAGES, MINB)                           \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB) qgemv##FMT##_rope_##NAME##_m##NT##SUFFIX(    \
        T* y, const T* x, const uint8_t* w, const void* scales, const T* bias, int M, int N, int K, int n_sb,   \
        int n_groups, int gshift, const int* positions, const float* inv_freq, const int* slots, T* k_cache,    \
        T* v_cache, int n_heads, int n_kv, int head_dim) {                                                      \
        quant_linear_rt<T, T, BITS, NT, WARPS, RT, STAGES, false, true>(                                        \
            y, x, w, scales, bias, M, N, K, n_sb, n_groups, gshift,                                             \
            RopeArgs<T>{positions, inv_freq, slots, k_cache, v_cache, n_heads, n_kv, head_dim});                \
    }
#define QGEMV_KERNELS(T, OUT_T, NAME)                                            \
    QGEMV_KERNEL_EX(T, OUT_T, NAME, 8, 8, false, 1, 8, 1, 2, true, 4, true)      \
    QGEMV_KERNEL_EX(T, OUT_T, NAME, 8, 8, false, 2, 8, 1, 2, true, 4, true)      \
    QGEMV_KERNEL_EX(T, OUT_T, NAME, 8, 8, false, 4, 8, 1, 2, true, 3, false)     \
    QGEMV_KERNEL_EX(T, OUT_T, NAME, 4, 4, false, 1, 8, 1, 2, true, 4, false)     \
    QGEMV_KERNEL_EX(T, OUT_T, NAME, 4, 4, false, 2, 8, 1, 2, true, 4, false)     \
    QGEMV_KERNEL(T, OUT_T, NAME, 4, 4, false, 4, 4, 2, 2)                        \
    QGEMV_ENTRY(T, OUT_T, qgemv4s_##NAME##_m1, 4, 1, 8, 1, 2, true, 4, false, true, true)                      \
    QGEMV_ENTRY(T, OUT_T, qgemv4s_swiglu_##NAME##_m1, 4, 1, 8, 2, 2, false, 0, true, true, false)             \
    QGEMV_KERNEL_EX(T, OUT_T, NAME, 4s, 4, true, 2, 8, 1, 2, true, 4, true)      \
    QGEMV_KERNEL(T, OUT_T, NAME, 4s, 4, true, 4, 4, 2, 2)                        \
    QGEMV_RT_KERNEL(T, OUT_T, NAME, 8, r, 8, 2, 8, 2, 2, 2)                      \
    QGEMV_RT_KERNEL(T, OUT_T, NAME, 8, r, 8, 4, 8, 2, 2, 2)                      \
    QGEMV_RT_KERNEL(T, OUT_T, NAME, 4s, r, 4, 2, 8, 2, 2, 2)                     \
    QGEMV_RT_KERNEL(T, OUT_T, NAME, 4s, r, 4, 4, 8, 2, 2, 2)                     \
    QGEMV_RT_KERNEL(T, OUT_T, NAME, 4s, rw, 4, 2, 4, 2, 3, 4)                    \
    QGEMV_RT_KERNEL(T, OUT_T, NAME, 4s, rw, 4, 4, 4, 2, 3, 4)                    \
    QGEMV_RT_KERNEL(T, OUT_T, NAME, 4s, r1, 4, 2, 8, 1, 4, 2)                    \
    QGEMV_RT_KERNEL(T, OUT_T, NAME, 4s, r1, 4, 4, 8, 1, 4, 2)

// The same shapes, for the q/k/v projection with rotary embedding (kernels.py QGEMV_THREADS serves both), but
// int8 at M <= 8 with 3 blocks per SM (80 registers, no spills): on Llama-3-8B's 6,144 q/k/v rows the sweep's
// (8,1,3) streamed 2,136 GB/s against 1,800 for (8,1,2) (H100); on o, gate/up and down it lost, so only here.
// Q4_0 at M <= 8 takes the register stages (8 warps, unroll 2): 1,557 GB/s against 1,379 on those rows.
#define QGEMV_ROPE_KERNELS(T, NAME)                                              \
    QGEMV_ROPE_KERNEL(T, NAME, 8, 8, false, 1, 8, 1, 3, true, 4, true)           \
    QGEMV_ROPE_KERNEL(T, NAME, 8, 8, false, 2, 8, 1, 2, true, 4, true)           \
    QGEMV_ROPE_KERNEL(T, NAME, 8, 8, false, 4, 8, 1, 2, true, 3, false)          \
    QGEMV_ROPE_KERNEL(T, NAME, 4, 4, false, 1, 8, 1, 2, true, 4, false)          \
    QGEMV_ROPE_KERNEL(T, NAME, 4, 4, false, 2, 8, 1, 2, true, 4, false)          \
    QGEMV_ROPE_KERNEL(T, NAME, 4, 4, false, 4, 4, 2, 2, false, 0, false)         \
    QGEMV_ROPE_KERNEL(T, NAME, 4s, 4, true, 1, 8, 2, 2, false, 0, false)         \
    QGEMV_ROPE_KERNEL(T, NAME, 4s, 4, true, 2, 8, 1, 2, true, 4, true)           \
    QGEMV_ROPE_KERNEL(T, NAME, 4s, 4, true, 4, 4, 2, 2, false, 0, false)         \
    QGEMV_RT_ROPE_KERNEL(T, NAME, 8, r, 8, 2, 8, 2, 2, 2)                        \
    QGEMV_RT_ROPE_KERNEL(T, NAME, 8, r, 8, 4, 8, 2, 2, 2)                        \
    QGEMV_RT_ROPE_KERNEL(T, NAME, 4s, r, 4, 2, 8, 2, 2, 2)                       \
    QGEMV_RT_ROPE_KERNEL(T, NAME, 4s, r, 4, 4, 8, 2, 2, 2)                       \
    QGEMV_RT_ROPE_KERNEL(T, NAME, 4s, rw, 4, 2, 4, 2, 3, 4)                      \
    QGEMV_RT_ROPE_KERNEL(T, NAME, 4s, rw, 4, 4, 4, 2, 3, 4)                      \
    QGEMV_RT_ROPE_KERNEL(T, NAME, 4s, r1, 4, 2, 8, 1, 4, 2)                      \
    QGEMV_RT_ROPE_KERNEL(T, NAME, 4s, r1, 4, 4, 8, 1, 4, 2)

// One token, bf16 activations (the _x1 kernels): x1_linear's loop, x staged in shared memory as fp16 (stage_x_half;
// dynamic shared memory: kernels.py qgemv_x1_bytes(K, format)). Blocks per SM (kernels.py QGEMV_X1_PERSIST) and
// ring depth:
//   - Q4_0: 3 blocks (80 registers, no spills) and 3 stages, for every projection (also where a block gets one
//     tile). Llama-3-8B b=1, H100, one call (docs/PERFORMANCE.md, sixteenth session): 413.7 / 413.9 tok/s against
//     406.1 / 406.6 with 2 blocks per SM and the o and down projections on m1, 410.6-411.0 with 2 blocks and 5
//     stages, 413.3-413.6 with 3 blocks and 4 stages.
//   - int8: 2 blocks, 4 stages (3 lost 0.8% in the tenth session's shape); rope 3 blocks. At 3 blocks the _x1n
//     SwiGLU kernel spills: 289.7 tok/s against 308.5 (H100, sixteenth session).
//   - Q4_0's plain projections whose tiles fit 2 blocks per SM, one tile each (Llama-3-8B's o and down: 256 tiles):
//     the _x1d kernel, 5 stages at 2 blocks (104 registers). Each warp then has 4 steps of weights in flight
//     instead of 2, from before its PDL wait: all of an o projection's tile (K = 4,096: 4 steps a warp), issued
//     while decode attention runs; and twice the bytes in flight for the down projection's 14 steps (with 2 a
//     warp at 2 blocks per SM, HBM was not kept busy). Llama-3-8B b=1, H200, one call: 514.6 / 515.0 tok/s against
//     484.3 / 482.8 (docs/PERFORMANCE.md, twentieth session); 6 and 8 stages no better or worse, 80 registers
//     (3 blocks' bounds, 4 bytes spilled) 495.
#define QGEMV_X1_ARGS                                                                                            \
    const bf16 *x, const uint8_t *w, const void *scales, const bf16 *bias, int M, int N, int K, int n_sb,        \
        int n_groups, int gshift
#define QGEMV_X1_ROPE_ARGS                                                                                       \
    const int *positions, const float *inv_freq, const int *slots, bf16 *k_cache, bf16 *v_cache, int n_heads,    \
        int n_kv, int head_dim
#define QGEMV_X1_ROPE RopeArgs<bf16>{positions, inv_freq, slots, k_cache, v_cache, n_heads, n_kv, head_dim}
// ASYM (the last argument): Q4_1's row-major layout (x1_linear).
#define QGEMV_X1_ENTRY(OUT_T, FNAME, BITS, SWIGLU, MINB, STAGES, ASYM)                                           \
    extern "C" __global__ void __launch_bounds__(256, MINB) FNAME(OUT_T* y, QGEMV_X1_ARGS) {                     \
        x1_linear<BITS, OUT_T, SWIGLU, false, STAGES, false, false, ASYM>(                                       \
            y, x, w, scales, bias, M, N, K, n_sb, n_groups, gshift);                                             \
    }
#define QGEMV_X1_ROPE_ENTRY(FNAME, BITS, MINB, STAGES, ASYM)                                                     \
    extern "C" __global__ void __launch_bounds__(256, MINB) FNAME(bf16* y, QGEMV_X1_ARGS, QGEMV_X1_ROPE_ARGS) {  \
        x1_linear<BITS, bf16, false, true, STAGES, false, false, ASYM>(                                          \
            y, x, w, scales, bias, M, N, K, n_sb, n_groups, gshift, QGEMV_X1_ROPE);                              \
    }
QGEMV_X1_ENTRY(bf16, qgemv8_bf16_bf16_x1, 8, false, 2, 4, false)
QGEMV_X1_ENTRY(bf16, qgemv8_swiglu_bf16_bf16_x1, 8, true, 2, 4, false)
QGEMV_X1_ENTRY(float, qgemv8_bf16_f32_x1, 8, false, 2, 4, false)
QGEMV_X1_ENTRY(float, qgemv8_swiglu_bf16_f32_x1, 8, true, 2, 4, false)
QGEMV_X1_ROPE_ENTRY(qgemv8_rope_bf16_x1, 8, 3, 4, false)
QGEMV_X1_ENTRY(bf16, qgemv4s_bf16_bf16_x1, 4, false, 3, 3, false)
QGEMV_X1_ENTRY(bf16, qgemv4s_bf16_bf16_x1d, 4, false, 2, 5, false)
QGEMV_X1_ENTRY(bf16, qgemv4s_swiglu_bf16_bf16_x1, 4, true, 3, 3, false)
QGEMV_X1_ENTRY(float, qgemv4s_bf16_f32_x1, 4, false, 3, 3, false)
QGEMV_X1_ENTRY(float, qgemv4s_swiglu_bf16_f32_x1, 4, true, 3, 3, false)
QGEMV_X1_ROPE_ENTRY(qgemv4s_rope_bf16_x1, 4, 3, 3, false)
// Q4_1 (ASYM): Q4_0's shapes, 3 blocks per SM and 3 stages; no deep-ring twin.
QGEMV_X1_ENTRY(bf16, qgemv4_bf16_bf16_x1, 4, false, 3, 3, true)
QGEMV_X1_ENTRY(bf16, qgemv4_swiglu_bf16_bf16_x1, 4, true, 3, 3, true)
QGEMV_X1_ENTRY(float, qgemv4_bf16_f32_x1, 4, false, 3, 3, true)
QGEMV_X1_ENTRY(float, qgemv4_swiglu_bf16_f32_x1, 4, true, 3, 3, true)
QGEMV_X1_ROPE_ENTRY(qgemv4_rope_bf16_x1, 4, 3, 3, true)
// SEND (_send_): the row-parallel o and down projections of a TP group, which also send their output tiles into the
// fused all-reduce's buffers (ll.cuh send_tile, as gemv.cu's SEND GEMV), so that the all-reduce + norm kernel only
// receives. The same shapes as the plain kernels above. Q4_1 has no send twin yet (not run on two GPUs: its TP
// decode leaves the sending to the all-reduce, Kernels.gemv_sends).
#define QGEMV_X1_SEND_ENTRY(FNAME, BITS, MINB, STAGES, ASYM)                                                     \
    extern "C" __global__ void __launch_bounds__(256, MINB)                                                      \
        FNAME(bf16* y, QGEMV_X1_ARGS, const unsigned long long* table, unsigned long long slot_bytes, int rank,  \
              int world) {                                                                                       \
        x1_linear<BITS, bf16, false, false, STAGES, false, true, ASYM>(                                          \
            y, x, w, scales, bias, M, N, K, n_sb, n_groups, gshift, RopeArgs<bf16>{}, PreNorm{},                 \
            LlSend{table, slot_bytes, rank, world});                                                             \
    }
QGEMV_X1_SEND_ENTRY(qgemv8_send_bf16_x1, 8, 2, 4, false)
QGEMV_X1_SEND_ENTRY(qgemv4s_send_bf16_x1, 4, 3, 3, false)
QGEMV_X1_SEND_ENTRY(qgemv4s_send_bf16_x1d, 4, 2, 5, false)
// The pre-norm folded in (PRENORM, _x1n): x is not read; the five arguments after the usual ones are PreNorm's
// (delta, resid_in, resid_out, weight, eps), and K is the hidden size. int8 replays add_rms_norm (PreNormStage);
// Q4_0 applies rstd to its sums (stage_x_half's FOLD): Llama-3-8B b=1 436.2-436.3 tok/s against 421.9-423.1 with
// the norm kernel of its own, where the replay had lost 2.6% (H100, docs/PERFORMANCE.md, nineteenth and
// seventeenth sessions).
#define QGEMV_X1N_ARGS const bf16 *delta, const bf16 *resid_in, bf16 *resid_out, const bf16 *norm_w, float eps
#define QGEMV_X1N PreNorm{delta, resid_in, resid_out, norm_w, eps}
#define QGEMV_X1N_ENTRY(FNAME, BITS, MINB, STAGES, ASYM)                                                         \
    extern "C" __global__ void __launch_bounds__(256, MINB) FNAME(bf16* y, QGEMV_X1_ARGS, QGEMV_X1N_ARGS) {      \
        x1_linear<BITS, bf16, true, false, STAGES, true, false, ASYM>(                                           \
            y, x, w, scales, bias, M, N, K, n_sb, n_groups, gshift, RopeArgs<bf16>{}, QGEMV_X1N);                \
    }
#define QGEMV_X1N_ROPE_ENTRY(FNAME, BITS, MINB, STAGES, ASYM)                                                    \
    extern "C" __global__ void __launch_bounds__(256, MINB) FNAME(bf16* y, QGEMV_X1_ARGS, QGEMV_X1_ROPE_ARGS,    \
                                                                  QGEMV_X1N_ARGS) {                              \
        x1_linear<BITS, bf16, false, true, STAGES, true, false, ASYM>(                                           \
            y, x, w, scales, bias, M, N, K, n_sb, n_groups, gshift, QGEMV_X1_ROPE, QGEMV_X1N);                   \
    }
QGEMV_X1N_ENTRY(qgemv8_swiglu_bf16_bf16_x1n, 8, 2, 4, false)  // the SwiGLU (gate/up) projection
QGEMV_X1N_ROPE_ENTRY(qgemv8_rope_bf16_x1n, 8, 3, 4, false)
QGEMV_X1N_ENTRY(qgemv4s_swiglu_bf16_bf16_x1n, 4, 3, 3, false)
QGEMV_X1N_ROPE_ENTRY(qgemv4s_rope_bf16_x1n, 4, 3, 3, false)
QGEMV_X1N_ENTRY(qgemv4_swiglu_bf16_bf16_x1n, 4, 3, 3, true)
QGEMV_X1N_ROPE_ENTRY(qgemv4_rope_bf16_x1n, 4, 3, 3, true)

// NAME = <activation dtype>_<output dtype>
QGEMV_KERNELS(bf16, bf16, bf16_bf16)
QGEMV_KERNELS(bf16, float, bf16_f32)
QGEMV_KERNELS(f16, f16, f16_f16)
QGEMV_KERNELS(f16, float, f16_f32)
QGEMV_ROPE_KERNELS(bf16, bf16)
QGEMV_ROPE_KERNELS(f16, f16)
#endif

#define DEQUANT_KERNEL(T, NAME, FMT, BITS, SYM)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) dequantize##FMT##_##NAME(                                  \
        T* out, const uint8_t* w, const void* scales, int N, int K, int n_sb, int n_groups, int gshift) {        \
        dequantize_packed<T, BITS, SYM>(out, w, scales, N, K, n_sb, n_groups, gshift);                           \
    }
DEQUANT_KERNEL(bf16, bf16, 8, 8, false)
DEQUANT_KERNEL(bf16, bf16, 4, 4, false)
DEQUANT_KERNEL(bf16, bf16, 4s, 4, true)
DEQUANT_KERNEL(f16, f16, 8, 8, false)
DEQUANT_KERNEL(f16, f16, 4, 4, false)
DEQUANT_KERNEL(f16, f16, 4s, 4, true)
