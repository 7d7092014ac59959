// Paged attention for decode (one new query per sequence), split-K over the context.
//
// attention_decode_*: grid (P, n_kv, n_seqs), 256 threads. A block takes one partition of a sequence's keys
// for one KV head and serves all query heads of that head's GQA group, so each K and V row is read from
// memory once per group rather than once per query head. Decode is bound by reading the cache, so this is
// plain fp32 FMA: scores go to shared memory, the partition's max and sum are computed per head, then P V.
//
// The partition length is chosen per sequence on the device (decode_part_len): the host fixes only the
// grid's P (so one CUDA graph serves every context up to its bound), and each sequence spreads its keys over
// as many of the P blocks as keeps partitions >= min_part keys. At batch 1 the host asks for enough P to
// fill the GPU: one block per KV head would leave almost every SM idle while each block walks its whole
// context through a chain of dependent memory round trips. A sequence that fits one partition has its block
// write the final normalised output; otherwise its blocks write unnormalised partial outputs with their max
// and sum to caller-provided scratch, and the last of them to finish merges them (an arrival counter per
// sequence and kv head, in the scratch).
// Scores are in log2 units (q pre-scaled by scale * log2 e) so that exp2f applies directly.
#include "common.cuh"

__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

#define DECODE_THREADS 256
#define DECODE_PARTITION 512
#define DECODE_LANES_PER_KEY 8   // QK^T: 8 lanes share one key row, so a warp reads 4 rows at once
#define DECODE_QK_KEYS 4         // keys per 8-lane group and step (loads issued together)
#define DECODE_PV_UNROLL 8       // V rows in flight per thread in P V
#define DECODE_PART_ALIGN 16     // partition lengths are multiples of this
// Blocks per SM of the grids larger than a wave ("_occ" kernels). A block's phases (table lookups, K, softmax,
// V from L2, the reductions) each wait on memory in turn, so more resident blocks overlap more of them: at 4
// blocks per SM (64 registers) 256 sequences of ~150 keys read their cache 17-20% faster than at 2 (90
// registers), 512 of 531 keys 13% (H100). A grid that fits one wave gains nothing from room for more blocks and
// loses a little to the register cap (1 us of 12 at batch 1), so it keeps 2. Group 8 holds more accumulators:
// 3 blocks keep it free of spills; group 16 has no such variant.
#define DECODE_OCC_MIN_BLOCKS(MAXG) ((MAXG) <= 4 ? 4 : 3)

// Keys per partition for a sequence of ctx keys spread over at most P partitions of at least min_part keys
// (at most DECODE_PARTITION: the host sizes P so that P * DECODE_PARTITION covers every context). The decode
// kernel and the merge kernel both derive their bounds from it.
__device__ __forceinline__ int decode_part_len(int ctx, int P, int min_part) {
    const int even = (ctx + P - 1) / P;
    const int len = max(min_part, (even + DECODE_PART_ALIGN - 1) / DECODE_PART_ALIGN * DECODE_PART_ALIGN);
    return min(len, DECODE_PARTITION);
}

template <typename T, int HD, int MAXG>
__device__ __forceinline__ void attention_decode_partition(
    T* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_max, float* __restrict__ part_sum,
    int* __restrict__ counters, const T* __restrict__ qkv, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ query_start, const int* __restrict__ context_lens,
    int max_blocks, int n_heads, int n_kv, int block_size, float scale_log2, int min_part, int group_size,
    int head_offset) {
    constexpr int VECS = HD / 8;                                      // 16-byte vectors per head row
    constexpr int VECS_PER_LANE = (VECS + DECODE_LANES_PER_KEY - 1) / DECODE_LANES_PER_KEY;
    constexpr int N_WARPS = DECODE_THREADS / 32;
    constexpr int GROUPS_PER_WARP = 32 / DECODE_LANES_PER_KEY;
    constexpr int KEYS_PER_WARP_STEP = GROUPS_PER_WARP * DECODE_QK_KEYS;
    constexpr int QUADS = HD / 4;                        // P V: a thread owns 4 columns (8-byte loads) ...
    constexpr int KEY_LANES = DECODE_THREADS / QUADS;    // ... of every KEY_LANES-th key
    constexpr int SLABS = DECODE_PARTITION / HD;         // [MAXG][HD] partial-output slabs s_work holds
    static_assert(HD % 8 == 0 && KEY_LANES >= SLABS, "head_dim");

    __shared__ float s_q[MAXG][HD];
    // Scores [MAXG][PARTITION]; after P V the same space holds partial outputs, SLABS at a time.
    __shared__ __align__(16) float s_work[MAXG * DECODE_PARTITION];
    __shared__ int s_slot[DECODE_PARTITION];  // cache slot of every key of the partition
    __shared__ float s_max[MAXG], s_sum[MAXG];

    const int part = blockIdx.x, kv_head = blockIdx.y, seq = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // Query heads h with (h + head_offset) / group_size == kv_head: a tensor-parallel shard may start or end
    // inside a GQA group, so the first and last kv heads can serve fewer than group_size query heads.
    const int head0 = max(0, kv_head * group_size - head_offset);
    const int group = min(n_heads, (kv_head + 1) * group_size - head_offset) - head0;
    // Sequence bounds and block-table lookups come from the step's metadata: done before the wait (PDL), while
    // the kernel before (rope) may still be finishing.
    const int q_row = query_start[seq];
    const int ctx = context_lens[seq];
    const int P = gridDim.x;
    const int part_len = decode_part_len(ctx, P, min_part);
    const bool direct = ctx <= part_len;  // one partition: no merge for this sequence
    const int k0 = part * part_len;
    if (k0 >= ctx) {
        pdl_begin();
        if (ctx == 0 && part == 0 && direct) {  // empty (padding) sequence: defined zeros, not garbage
            for (int i = tid; i < group * HD; i += DECODE_THREADS)
                out[((size_t)q_row * n_heads + head0) * HD + i] = from_float<T>(0.f);
        }
        return;
    }
    const int n = min(part_len, ctx - k0);
    const int* table = block_tables + (size_t)seq * max_blocks;
    const size_t row_stride = (size_t)n_kv * HD;  // between consecutive cache slots
    const size_t kv_offset = (size_t)kv_head * HD;

    // Block-table lookups once, up front: afterwards every K/V load has its address ready, instead of
    // waiting on a dependent table read.
    for (int j = tid; j < n; j += DECODE_THREADS) {
        const int key = k0 + j;
        s_slot[j] = table[key / block_size] * block_size + key % block_size;
    }
    pdl_begin();
    const T* q = qkv + (size_t)q_row * (n_heads + 2 * n_kv) * HD + (size_t)head0 * HD;
    for (int i = tid; i < group * HD; i += DECODE_THREADS) s_q[i / HD][i % HD] = to_float(q[i]) * scale_log2;
    __syncthreads();

    // Scores: each 8-lane group takes DECODE_QK_KEYS keys per step, all loads issued before the math.
    // The loop bound is uniform per warp so every lane reaches the shuffles. Each key's V row is
    // prefetched into L2 here, so the P V phase below reads it from L2 instead of waiting on HBM.
    const int sub = lane / DECODE_LANES_PER_KEY, l8 = lane % DECODE_LANES_PER_KEY;
    for (int jb = warp * KEYS_PER_WARP_STEP; jb < n; jb += N_WARPS * KEYS_PER_WARP_STEP) {
        uint4 raw[DECODE_QK_KEYS][VECS_PER_LANE];
#pragma unroll
        for (int u = 0; u < DECODE_QK_KEYS; ++u) {
            const int j = jb + u * GROUPS_PER_WARP + sub;
            const size_t row = (size_t)s_slot[min(j, n - 1)] * row_stride + kv_offset;
            const T* k_row = k_cache + row;
#pragma unroll
            for (int vv = 0; vv < VECS_PER_LANE; ++vv) {
                const int v = l8 + vv * DECODE_LANES_PER_KEY;
                raw[u][vv] = j < n && v < VECS ? reinterpret_cast<const uint4*>(k_row)[v] : make_uint4(0, 0, 0, 0);
            }
            if (j < n && l8 * 64 < HD * 2) prefetch_l2(v_cache + row + l8 * 32);  // 64-byte steps
        }
#pragma unroll
        for (int u = 0; u < DECODE_QK_KEYS; ++u) {
            const int j = jb + u * GROUPS_PER_WARP + sub;
            float kf[VECS_PER_LANE][8];
#pragma unroll
            for (int vv = 0; vv < VECS_PER_LANE; ++vv) unpack8<T>(raw[u][vv], kf[vv]);
#pragma unroll
            for (int gi = 0; gi < MAXG; ++gi) {
                if (gi >= group) break;
                float dot = 0.f;
#pragma unroll
                for (int vv = 0; vv < VECS_PER_LANE; ++vv) {
                    const int v = min(l8 + vv * DECODE_LANES_PER_KEY, VECS - 1);  // kf is 0 where v >= VECS
#pragma unroll
                    for (int e = 0; e < 8; ++e) dot += s_q[gi][v * 8 + e] * kf[vv][e];
                }
#pragma unroll
                for (int o = DECODE_LANES_PER_KEY / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(FULL_MASK, dot, o);
                if (j < n && l8 == 0) s_work[gi * DECODE_PARTITION + j] = dot;
            }
        }
    }
    __syncthreads();

    // Softmax statistics of this partition, one warp per head; scores become unnormalised p.
    for (int gi = warp; gi < group; gi += N_WARPS) {
        float* sc = s_work + gi * DECODE_PARTITION;
        float mx = -INFINITY;
        for (int j = lane; j < n; j += 32) mx = fmaxf(mx, sc[j]);
        mx = warp_max(mx);
        float sum = 0.f;
        for (int j = lane; j < n; j += 32) {
            const float p = exp2f(sc[j] - mx);
            sc[j] = p;
            sum += p;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
            s_max[gi] = mx;
            s_sum[gi] = sum;
        }
    }
    __syncthreads();

    // P V: thread (key_lane, quad) accumulates columns 4 quad .. 4 quad + 3 over keys key_lane,
    // key_lane + KEY_LANES, ..., DECODE_PV_UNROLL rows in flight.
    const int quad = tid % QUADS, key_lane = tid / QUADS;
    const bool pv_thread = key_lane < KEY_LANES;
    float acc[MAXG][4];
#pragma unroll
    for (int gi = 0; gi < MAXG; ++gi) acc[gi][0] = acc[gi][1] = acc[gi][2] = acc[gi][3] = 0.f;
    if (pv_thread) {
        const T* v_base = v_cache + kv_offset + 4 * quad;
        for (int jb = key_lane; jb < n; jb += KEY_LANES * DECODE_PV_UNROLL) {
            uint2 raw[DECODE_PV_UNROLL];
#pragma unroll
            for (int u = 0; u < DECODE_PV_UNROLL; ++u) {
                const int j = jb + u * KEY_LANES;
                raw[u] = j < n ? *reinterpret_cast<const uint2*>(v_base + (size_t)s_slot[j] * row_stride)
                               : make_uint2(0, 0);
            }
#pragma unroll
            for (int u = 0; u < DECODE_PV_UNROLL; ++u) {
                const int j = min(jb + u * KEY_LANES, n - 1);  // raw is 0 past n
                const float2 v01 = unpack2<T>(raw[u].x), v23 = unpack2<T>(raw[u].y);
#pragma unroll
                for (int gi = 0; gi < MAXG; ++gi) {
                    if (gi >= group) break;
                    const float p = s_work[gi * DECODE_PARTITION + j];
                    acc[gi][0] += p * v01.x;
                    acc[gi][1] += p * v01.y;
                    acc[gi][2] += p * v23.x;
                    acc[gi][3] += p * v23.y;
                }
            }
        }
    }
    __syncthreads();  // all scores consumed: s_work now carries partial outputs

    // Key lanes [0, SLABS) keep running sums; the others hand theirs over, SLABS lanes per round.
    auto slab = [&](int slot, int gi) { return s_work + (slot * MAXG + gi) * HD + 4 * quad; };
    for (int base = SLABS; base < KEY_LANES; base += SLABS) {
        if (pv_thread && key_lane >= base && key_lane < base + SLABS) {
#pragma unroll
            for (int gi = 0; gi < MAXG; ++gi) {
                if (gi >= group) break;
                *reinterpret_cast<float4*>(slab(key_lane - base, gi)) =
                    make_float4(acc[gi][0], acc[gi][1], acc[gi][2], acc[gi][3]);
            }
        }
        __syncthreads();
        if (key_lane < SLABS && key_lane + base < KEY_LANES) {
#pragma unroll
            for (int gi = 0; gi < MAXG; ++gi) {
                if (gi >= group) break;
                const float4 o = *reinterpret_cast<const float4*>(slab(key_lane, gi));
                acc[gi][0] += o.x; acc[gi][1] += o.y; acc[gi][2] += o.z; acc[gi][3] += o.w;
            }
        }
        __syncthreads();
    }
    if (key_lane < SLABS) {
#pragma unroll
        for (int gi = 0; gi < MAXG; ++gi) {
            if (gi >= group) break;
            *reinterpret_cast<float4*>(slab(key_lane, gi)) = make_float4(acc[gi][0], acc[gi][1], acc[gi][2], acc[gi][3]);
        }
    }
    __syncthreads();
    for (int i = tid; i < group * HD; i += DECODE_THREADS) {
        const int gi = i / HD, d = i % HD;
        float o = 0.f;
#pragma unroll
        for (int s = 0; s < SLABS; ++s) o += s_work[(s * MAXG + gi) * HD + d];
        const int head = head0 + gi;
        if (direct) {
            out[((size_t)q_row * n_heads + head) * HD + d] = from_float<T>(o / s_sum[gi]);
        } else {
            const size_t idx = ((size_t)seq * n_heads + head) * P + part;
            part_out[idx * HD + d] = o;
            if (d == 0) {
                part_max[idx] = s_max[gi];
                part_sum[idx] = s_sum[gi];
            }
        }
    }
    if (direct) return;

    // The last block of this (sequence, kv head) to finish merges all its partitions, weighting each by
    // exp2(max_p - max): no second kernel, whose launch and drain cost more than the merge at small batch.
    // Publish the partials before counting (threadfence), and read the others' through L2 (__ldcg).
    __shared__ int s_last;
    __threadfence();
    __syncthreads();
    const int n_parts = (ctx + part_len - 1) / part_len;
    if (tid == 0) {
        int* counter = counters + (size_t)seq * n_kv + kv_head;
        s_last = atomicAdd(counter, 1) == n_parts - 1;
        if (s_last) *counter = 0;  // ready for the next launch (graphs replay this kernel)
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    for (int gi = warp; gi < group; gi += N_WARPS) {  // softmax statistics over the partitions, a warp per head
        const size_t base = ((size_t)seq * n_heads + head0 + gi) * P;
        float mx = -INFINITY;
        for (int p = lane; p < n_parts; p += 32) mx = fmaxf(mx, __ldcg(part_max + base + p));
        mx = warp_max(mx);
        float sum = 0.f;
        for (int p = lane; p < n_parts; p += 32) sum += exp2f(__ldcg(part_max + base + p) - mx) * __ldcg(part_sum + base + p);
        sum = warp_sum(sum);
        if (lane == 0) {
            s_max[gi] = mx;
            s_sum[gi] = sum;
        }
    }
    __syncthreads();
    for (int i = tid; i < group * HD; i += DECODE_THREADS) {
        const int gi = i / HD, d = i % HD;
        const size_t base = ((size_t)seq * n_heads + head0 + gi) * P;
        float o = 0.f;
        for (int p = 0; p < n_parts; ++p)
            o += exp2f(__ldcg(part_max + base + p) - s_max[gi]) * __ldcg(part_out + (base + p) * HD + d);
        out[((size_t)q_row * n_heads + head0 + gi) * HD + d] = from_float<T>(o / s_sum[gi]);
    }
}

#define DECODE_ENTRY(T, FNAME, HD, MAXG, MINB)                                                             \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS, MINB) FNAME(                              \
        T* out, float* part_out, float* part_max, float* part_sum, int* counters, const T* qkv,             \
        const T* k_cache, const T* v_cache, const int* block_tables, const int* query_start,               \
        const int* context_lens, int max_blocks, int n_heads, int n_kv, int block_size, float scale_log2,  \
        int min_part, int group_size, int head_offset) {                                                   \
        attention_decode_partition<T, HD, MAXG>(out, part_out, part_max, part_sum, counters, qkv, k_cache, \
                                                v_cache,                                                   \
                                                block_tables, query_start, context_lens, max_blocks,       \
                                                n_heads, n_kv, block_size, scale_log2, min_part,           \
                                                group_size, head_offset);                                  \
    }
#define DECODE_KERNEL(T, NAME, HD, MAXG) DECODE_ENTRY(T, attention_decode_##NAME##_hd##HD##_g##MAXG, HD, MAXG, 2)
// The same kernel for grids of more than a wave (kernels.py picks it).
#define DECODE_KERNEL_OCC(T, NAME, HD, MAXG)                                                               \
    DECODE_KERNEL(T, NAME, HD, MAXG)                                                                       \
    DECODE_ENTRY(T, attention_decode_##NAME##_hd##HD##_g##MAXG##_occ, HD, MAXG, DECODE_OCC_MIN_BLOCKS(MAXG))
// GQA group sizes are served by the smallest MAXG >= group (1, 4, 8 or 16).
#define DECODE_KERNELS_HD(T, NAME, HD)                                                                     \
    DECODE_KERNEL_OCC(T, NAME, HD, 1) DECODE_KERNEL_OCC(T, NAME, HD, 4) DECODE_KERNEL_OCC(T, NAME, HD, 8)  \
    DECODE_KERNEL(T, NAME, HD, 16)
#define DECODE_KERNELS(T, NAME)                                                                            \
    DECODE_KERNELS_HD(T, NAME, 64) DECODE_KERNELS_HD(T, NAME, 80) DECODE_KERNELS_HD(T, NAME, 96)           \
    DECODE_KERNELS_HD(T, NAME, 128)

DECODE_KERNELS(bf16, bf16)
DECODE_KERNELS(f16, f16)
