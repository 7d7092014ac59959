// Causal paged attention for prefill and mixed batches, FlashAttention-2 style on tensor cores.
//
// grid (n_heads, query tiles, n_seqs), 4 warps. A block owns 64 queries of one head of one sequence
// (16 per warp) and walks the sequence's KV in tiles of 64 keys, fetched through the block table into
// a double-buffered shared ring while the previous tile is being used. S = Q K^T and O += P V run as
// mma.m16n8k16 with fp32 accumulators; the softmax is the online one (running max and sum per row,
// exp2 with the scale folded into log2 units), so no S x S matrix ever exists. P is rounded to the
// model dtype to feed the second mma, as FlashAttention does.
//
// Scheduling: a query tile's work grows with its index (it sees every key up to its last query), so the
// grid hands out the last (heaviest) tiles of every head first and the light ones fill the tail: with the
// tiles in natural order the last wave was a row of the heaviest blocks. The Q tile is staged in the second
// V buffer (read into registers before that buffer's first refill), so a block needs 4 tiles of shared
// memory, not 5: three blocks fit an SM at head_dim 128 (register cap: launch bounds) instead of two.
//
// Query j (0-based within the sequence's n_q new tokens) sits at absolute position
// context_len - n_q + j and sees keys 0..position. Head h reads KV head (h + head_offset) / group.
#include "mma.cuh"

#define ATTN_BQ 64
#define ATTN_BKV 64
#define ATTN_WARPS 4
#define ATTN_MIN_BLOCKS 3   // blocks per SM the registers are capped for (shared memory allows 3 at hd 128)

template <typename T, int HD>
__device__ __forceinline__ void attention_prefill_tile(
    T* __restrict__ out, const T* __restrict__ qkv, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ query_start, const int* __restrict__ context_lens,
    int max_blocks, int n_heads, int n_kv, int block_size, float scale_log2, int group, int head_offset) {
    constexpr int LDS = HD + 8;      // padded shared row (elements): conflict-free ldmatrix
    constexpr int CHUNKS = HD / 8;   // 16-byte chunks per head row
    constexpr int DK = HD / 16;      // k16 steps of Q K^T
    constexpr int DN = HD / 8;       // n8 tiles of O
    constexpr int THREADS = ATTN_WARPS * 32;
    static_assert(HD % 16 == 0, "head_dim must be a multiple of 16");

    static_assert(ATTN_BQ == ATTN_BKV, "the Q tile is staged in a V buffer");
    extern __shared__ uint4 smem_u4[];
    T* s_k = reinterpret_cast<T*>(smem_u4);  // [2][BKV][LDS]
    T* s_v = s_k + 2 * ATTN_BKV * LDS;       // [2][BKV][LDS]
    T* s_q = s_v + ATTN_BKV * LDS;           // [BQ][LDS], = V buffer 1 until KV tile 1 is fetched

    const int seq = blockIdx.z, head = blockIdx.x;
    const int q_begin = query_start[seq];
    const int n_q = query_start[seq + 1] - q_begin;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * ATTN_BQ;  // heaviest tiles first (see the top)
    if (q0 >= n_q) return;
    const int first_pos = context_lens[seq] - n_q;
    const int kv_head = (head + head_offset) / group;  // see attention() in kernels.py for head_offset
    const size_t row_stride = (size_t)(n_heads + 2 * n_kv) * HD;
    const int* table = block_tables + (size_t)seq * max_blocks;
    // The last valid query of this tile sees keys up to first_pos + min(n_q, q0 + BQ) - 1.
    const int n_keys = first_pos + min(n_q, q0 + ATTN_BQ);
    const int n_tiles = (n_keys + ATTN_BKV - 1) / ATTN_BKV;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;

    for (int c = tid; c < ATTN_BQ * CHUNKS; c += THREADS) {
        const int r = c / CHUNKS, ch = c % CHUNKS;
        const bool ok = q0 + r < n_q;
        const T* src = qkv + (size_t)(q_begin + q0 + r) * row_stride + head * HD + ch * 8;
        cp_async16(s_q + r * LDS + ch * 8, ok ? src : qkv, ok);
    }
    // Block sizes are powers of two in practice: a shift instead of a division per row and tile, which was
    // a fifth of the loop's instructions.
    const bool bs_pow2 = (block_size & (block_size - 1)) == 0;
    const int bs_shift = __ffs(block_size) - 1;
    auto load_kv_tile = [&](int buf, int tile) {
        for (int c = tid; c < ATTN_BKV * CHUNKS; c += THREADS) {
            const int r = c / CHUNKS, ch = c % CHUNKS;
            const int key = tile * ATTN_BKV + r;
            const bool ok = key < n_keys;
            const int blk = bs_pow2 ? key >> bs_shift : key / block_size;
            const size_t slot = ok ? (size_t)table[blk] * block_size + (key - blk * block_size) : 0;
            const size_t off = (slot * n_kv + kv_head) * HD + ch * 8;
            cp_async16(s_k + (buf * ATTN_BKV + r) * LDS + ch * 8, ok ? k_cache + off : k_cache, ok);
            cp_async16(s_v + (buf * ATTN_BKV + r) * LDS + ch * 8, ok ? v_cache + off : v_cache, ok);
        }
    };
    load_kv_tile(0, 0);
    cp_async_commit();  // group 0 = Q + KV tile 0

    uint32_t q_frag[DK][4];
    float o[DN][4];
#pragma unroll
    for (int d = 0; d < DN; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // rows g and g + 8
    const int pos_lo = first_pos + q0 + warp * 16 + g;
    const int pos_of_half[2] = {pos_lo, pos_lo + 8};

    // Q into registers before V buffer 1 (its staging area) is refilled with KV tile 1.
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < DK; ++kk)
        ldmatrix_x4(q_frag[kk], s_q + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
    __syncthreads();
    // Keys below every query of this warp need no causal mask (warp-uniform test).
    const int warp_first_pos = first_pos + q0 + warp * 16;

    for (int tile = 0; tile < n_tiles; ++tile) {
        if (tile + 1 < n_tiles) load_kv_tile((tile + 1) & 1, tile + 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const T* sk = s_k + (tile & 1) * ATTN_BKV * LDS;
        const T* sv = s_v + (tile & 1) * ATTN_BKV * LDS;

        float s[ATTN_BKV / 8][4];
#pragma unroll
        for (int j = 0; j < ATTN_BKV / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DK; ++kk) {
#pragma unroll
            for (int jp = 0; jp < ATTN_BKV / 16; ++jp) {
                uint32_t r[4];
                ldmatrix_x4(r, sk + (jp * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + kk * 16 +
                                   ((lane >> 3) & 1) * 8);
                mma_16816<T>(s[2 * jp], q_frag[kk], r[0], r[1]);
                mma_16816<T>(s[2 * jp + 1], q_frag[kk], r[2], r[3]);
            }
        }

        // Causal mask and online softmax. Queries past n_q (tile padding) compute on zero keys and
        // are never stored; zero-filled keys past n_keys are masked for every valid query.
        const int key0 = tile * ATTN_BKV + 2 * t;
        const bool unmasked = (tile + 1) * ATTN_BKV - 1 <= warp_first_pos;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < ATTN_BKV / 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = key0 + j * 8 + e;
                    float& v = s[j][2 * h + e];
                    if (!(unmasked || key <= pos_of_half[h])) v = -INFINITY;
                    mx = fmaxf(mx, v);
                }
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
            // Raw scores until the exponent, where one fma scales and subtracts (scale_log2 > 0 keeps the max).
            const float new_max = fmaxf(row_max[h], mx * scale_log2);
            // A row with every key masked so far keeps max -inf; subtracting 0 instead avoids inf - inf.
            const float ref = new_max == -INFINITY ? 0.f : new_max;
            const float alpha = exp2f(row_max[h] - ref);
            row_max[h] = new_max;
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < ATTN_BKV / 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float& v = s[j][2 * h + e];
                    v = exp2f(fmaf(v, scale_log2, -ref));
                    sum += v;
                }
            row_sum[h] = row_sum[h] * alpha + sum;  // per-lane partial; the quad is summed at the end
#pragma unroll
            for (int d = 0; d < DN; ++d) {
                o[d][2 * h] *= alpha;
                o[d][2 * h + 1] *= alpha;
            }
        }

        // O += P V. The S accumulators of key tiles 2kk, 2kk+1 are exactly the A fragment of keys
        // 16kk..16kk+15; V is row-major [key][d], so ldmatrix.trans yields its "col" B fragments.
#pragma unroll
        for (int kk = 0; kk < ATTN_BKV / 16; ++kk) {
            const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                   pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dp = 0; dp < DN / 2; ++dp) {
                uint32_t r[4];
                ldmatrix_x4_trans(r, sv + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + dp * 16 +
                                         (lane >> 4) * 8);
                mma_16816<T>(o[2 * dp], a, r[0], r[1]);
                mma_16816<T>(o[2 * dp + 1], a, r[2], r[3]);
            }
        }
        __syncthreads();  // this tile's buffer is refilled by the next iteration's prefetch
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float sum = row_sum[h];
        sum += __shfl_xor_sync(FULL_MASK, sum, 1);
        sum += __shfl_xor_sync(FULL_MASK, sum, 2);
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const int q = q0 + warp * 16 + g + 8 * h;
        if (q >= n_q) continue;
        T* dst = out + ((size_t)(q_begin + q) * n_heads + head) * HD + 2 * t;
#pragma unroll
        for (int d = 0; d < DN; ++d)
            *reinterpret_cast<uint32_t*>(dst + d * 8) = pack2<T>(o[d][2 * h] * inv, o[d][2 * h + 1] * inv);
    }
}

#define PREFILL_KERNEL(T, NAME, HD)                                                                        \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32, ATTN_MIN_BLOCKS) attention_prefill_##NAME##_hd##HD(     \
        T* out, const T* qkv, const T* k_cache, const T* v_cache, const int* block_tables,                  \
        const int* query_start, const int* context_lens, int max_blocks, int n_heads, int n_kv,            \
        int block_size, float scale_log2, int group, int head_offset) {                                    \
        pdl_begin();                                                                                       \
        attention_prefill_tile<T, HD>(out, qkv, k_cache, v_cache, block_tables, query_start, context_lens, \
                                      max_blocks, n_heads, n_kv, block_size, scale_log2, group,            \
                                      head_offset);                                                        \
    }
#define PREFILL_KERNELS(T, NAME) \
    PREFILL_KERNEL(T, NAME, 64) PREFILL_KERNEL(T, NAME, 80) PREFILL_KERNEL(T, NAME, 96) PREFILL_KERNEL(T, NAME, 128)

PREFILL_KERNELS(bf16, bf16)
PREFILL_KERNELS(f16, f16)
