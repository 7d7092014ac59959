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
#include <cooperative_groups.h>

#include "mma.cuh"

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

// QK^T with 8 lanes per key: query head gi (pre-scaled, s_q) against the key whose 16-byte vectors l8, l8 + 8, ...
// this lane holds unpacked in kf (zeros past the row), summed over the 8 lanes; every lane of the group gets it.
template <int HD, int MAXG, int VECS = HD / 8,
          int VECS_PER_LANE = (VECS + DECODE_LANES_PER_KEY - 1) / DECODE_LANES_PER_KEY>
__device__ __forceinline__ float qk_dot(const float (&s_q)[MAXG][HD], const float (&kf)[VECS_PER_LANE][8], int gi,
                                        int l8) {
    float dot = 0.f;
#pragma unroll
    for (int vv = 0; vv < VECS_PER_LANE; ++vv) {
        const int v = min(l8 + vv * DECODE_LANES_PER_KEY, VECS - 1);  // kf is 0 where v >= VECS
#pragma unroll
        for (int e = 0; e < 8; ++e) dot += s_q[gi][v * 8 + e] * kf[vv][e];
    }
#pragma unroll
    for (int o = DECODE_LANES_PER_KEY / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(FULL_MASK, dot, o);
    return dot;
}

template <typename T, int HD, int MAXG>
__device__ __forceinline__ void attention_decode_partition(
    T* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_max, float* __restrict__ part_sum,
    int* __restrict__ counters, const T* __restrict__ qkv, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ query_start, const int* __restrict__ context_lens,
    int max_blocks, int n_heads, int n_kv, int block_size, float scale_log2, int min_part, int group_size,
    int head_offset) {
    const TraceEndAtExit trace_at_exit;  // bench.py --timeline
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
                const float dot = qk_dot<HD, MAXG>(s_q, kf, gi, l8);
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

// ---------------------------------------------------------------------------------------------------
// Small batches on sm_90+: attention_decode_cluster_*, grid (DC_CLUSTER, n_kv, n_seqs), one thread-block
// cluster of DC_CLUSTER blocks per (sequence, kv head). At batch 1 the split-K kernel above spends most of its
// ~10 us (Llama-3-8B, 195 keys, H100) in a chain of dependent round trips: K from memory, then V (from L2), then
// the partial outputs out to memory, a fence, the arrival counter, and the last block reading every partial
// back. Here each block takes an even share of the sequence's keys (at most DC_MAX_KEYS), copies all its K and V
// rows into shared memory at once (cp.async: one round trip), keeps an online softmax over stages of DC_CHUNK
// keys, and the blocks of the cluster merge their (max, sum, unnormalised output) through distributed shared
// memory: each pushes its sums to the block that finishes them, and one cluster barrier replaces the trip
// through global memory. No scratch, no counters, no second pass. Every element of the output is written by
// exactly one block of the cluster (zeros for an empty sequence).
// The host picks it (kernels.decode_uses_cluster) for few (sequence, kv head) pairs, GQA groups up to 8 and
// contexts up to DC_CLUSTER * DC_MAX_KEYS (one split-K partition): there Llama-3-8B int8 gains 4.6% end to end at
// batch 1 and 2.6% at batch 4 (H100); at batch 8 it loses 0.7%. Pushing the merge's inputs (one barrier) beat
// reading them from the other blocks (two barriers, two rounds of remote loads) by 0.8% at batch 1 and 4. A first
// version streaming up to 512 keys a block through a ring only matched split-K at 1,024 keys (half the SMs busy),
// lost at 4,000, and lost 1.5% at batch 4 (docs/PERFORMANCE.md, ninth session).
// Clusters are sm_90+: the sm_80 build has none of this (the launcher never asks for it there).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define DC_CLUSTER 8     // blocks per (sequence, kv head): one cluster (the portable maximum)
#define DC_CHUNK 32      // keys per stage: the online softmax gives each lane of a warp one key
#define DC_MAX_KEYS 64   // keys per block at most (s_slot, the K/V buffer); the launcher bounds contexts accordingly

template <typename T, int HD, int MAXG>
__device__ __forceinline__ void attention_decode_cluster_body(
    T* __restrict__ out, const T* __restrict__ qkv, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ query_start, const int* __restrict__ context_lens,
    int max_blocks, int n_heads, int n_kv, int block_size, float scale_log2, int group_size, int head_offset) {
    const TraceEndAtExit trace_at_exit;  // bench.py --timeline
    namespace cg = cooperative_groups;
    constexpr int VECS = HD / 8;                        // 16-byte vectors per head row
    constexpr int VECS_PER_LANE = (VECS + DECODE_LANES_PER_KEY - 1) / DECODE_LANES_PER_KEY;
    constexpr int QUADS = HD / 4;                       // P V: a thread owns 4 columns ...
    constexpr int KEY_LANES = DECODE_THREADS / QUADS;   // ... of every KEY_LANES-th key of a stage
    constexpr int N_WARPS = DECODE_THREADS / 32;
    static_assert(MAXG <= N_WARPS, "the softmax takes one warp per query head");
    static_assert(DC_CHUNK == 32 && N_WARPS * 32 / DECODE_LANES_PER_KEY == DC_CHUNK, "one key per 8-lane group");

    // K [DC_MAX_KEYS][VECS] then V [DC_MAX_KEYS][VECS]; after the last stage, the P V sums [KEY_LANES][MAXG][HD]
    // (fp32). The launcher sizes it for both (kernels.decode_cluster_bytes).
    extern __shared__ __align__(16) uint4 dc_kv[];
    __shared__ float s_q[MAXG][HD];
    __shared__ float s_p[MAXG][DC_CHUNK];  // a stage's scores, then its unnormalised probabilities
    __shared__ float s_alpha[MAXG];        // the factor the running sums take at this stage's new max
    // The merge's inputs, pushed here by every block of the cluster (source b's row): the P V sums of this block's
    // slice of the output, and each head's max and sum.
    constexpr int SLICE = (MAXG * HD + DC_CLUSTER - 1) / DC_CLUSTER;
    __shared__ float s_in[DC_CLUSTER][SLICE], s_m[DC_CLUSTER][MAXG], s_l[DC_CLUSTER][MAXG];
    __shared__ int s_slot[DC_MAX_KEYS];

    constexpr uint32_t KV_BYTES = 2 * DC_MAX_KEYS * VECS * 16, SUM_BYTES = KEY_LANES * MAXG * HD * 4;
    uint32_t dyn;  // the launcher sizes the dynamic shared memory (kernels.decode_cluster_bytes): never write past it
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < (KV_BYTES > SUM_BYTES ? KV_BYTES : SUM_BYTES)) __trap();
    cg::cluster_group cluster = cg::this_cluster();
    // Shared memory of another block may be written only once that block runs: arrive now, wait before the
    // first push (by then every block has long arrived).
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
    const int rank = (int)cluster.block_rank(), kv_head = blockIdx.y, seq = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // Query heads served by this kv head (a tensor-parallel shard may start or end inside a GQA group).
    const int head0 = max(0, kv_head * group_size - head_offset);
    const int group = min(n_heads, (kv_head + 1) * group_size - head_offset) - head0;
    // Metadata (sequence bounds, block tables) before the wait: the host wrote it before the step began.
    const int q_row = query_start[seq];
    const int ctx = context_lens[seq];
    const int per = (ctx + DC_CLUSTER - 1) / DC_CLUSTER;
    if (per > DC_MAX_KEYS) __trap();  // the launcher never sends a longer context
    const int k0 = min(ctx, rank * per);
    const int n = min(ctx, k0 + per) - k0;  // this block's keys (none for the tail blocks of a short context)
    const int* table = block_tables + (size_t)seq * max_blocks;
    for (int j = tid; j < n; j += DECODE_THREADS) {
        const int key = k0 + j;
        s_slot[j] = table[key / block_size] * block_size + key % block_size;
    }
    __syncthreads();

    // Every K and V row of the block at once (one round trip), zeros past n up to a whole stage. The keys before
    // the step's own (position ctx - 1: one query per sequence here) were written by earlier steps, so their copies
    // go out before the PDL wait, while the q/k/v projection that writes the newest key still runs; that key's
    // row (the block holding it: index `newest`) is copied after the wait. It is skipped, not zero-filled, before:
    // two copies into one place would land in either order.
    const int n_stages = (n + DC_CHUNK - 1) / DC_CHUNK, rows = n_stages * DC_CHUNK;
    const size_t row_stride = (size_t)n_kv * HD;  // between consecutive cache slots
    const T* k_head = k_cache + (size_t)kv_head * HD;
    const T* v_head = v_cache + (size_t)kv_head * HD;
    uint4* const k_smem = dc_kv;
    uint4* const v_smem = dc_kv + DC_MAX_KEYS * VECS;
    const int newest = ctx - 1 - k0 < n ? ctx - 1 - k0 : -1;  // -1: not this block's (its rows past n: zeros)
    auto copy = [&](int j, int part) {  // 16-byte part `part` of row j: K's parts, then V's (part - VECS)
        const bool is_v = part >= VECS, ok = j < n;
        const int v = is_v ? part - VECS : part;
        const T* src = (is_v ? v_head : k_head) + (ok ? (size_t)s_slot[j] * row_stride : 0) + 8 * v;
        cp_async16((is_v ? v_smem : k_smem) + j * VECS + v, src, ok);
    };
    for (int i = tid; i < 2 * rows * VECS; i += DECODE_THREADS) {
        const int j = i / VECS % rows;
        if (j != newest) copy(j, i % VECS + (i < rows * VECS ? 0 : VECS));
    }
    cp_async_commit();
    pdl_begin();
    if (newest >= 0) {
        for (int part = tid; part < 2 * VECS; part += DECODE_THREADS) copy(newest, part);
        cp_async_commit();
    }

    const T* q = qkv + (size_t)q_row * (n_heads + 2 * n_kv) * HD + (size_t)head0 * HD;
    for (int i = tid; i < MAXG * HD; i += DECODE_THREADS)
        s_q[i / HD][i % HD] = i / HD < group ? to_float(q[i]) * scale_log2 : 0.f;
    cp_async_wait<0>();

    float m_run = -INFINITY, l_run = 0.f;  // query head `warp`'s running max and sum (warps below group)
    float acc[MAXG][4];
#pragma unroll
    for (int gi = 0; gi < MAXG; ++gi) acc[gi][0] = acc[gi][1] = acc[gi][2] = acc[gi][3] = 0.f;
    const int l8 = lane % DECODE_LANES_PER_KEY;
    const int kq = tid / DECODE_LANES_PER_KEY;  // QK^T: the stage's key of this 8-lane group
    const int quad = tid % QUADS, key_lane = tid / QUADS;
    const bool pv_thread = key_lane < KEY_LANES;

    for (int c = 0; c < n_stages; ++c) {
        __syncthreads();  // K and V landed (every thread's copies), s_q is written, the last stage's s_p is consumed
        const uint4* ks = k_smem + c * DC_CHUNK * VECS;
        const uint4* vs = v_smem + c * DC_CHUNK * VECS;

        // Scores: 8 lanes per key, one key per group.
        {
            float kf[VECS_PER_LANE][8];
#pragma unroll
            for (int vv = 0; vv < VECS_PER_LANE; ++vv) {
                const int v = l8 + vv * DECODE_LANES_PER_KEY;
                if (v < VECS) {
                    unpack8<T>(ks[kq * VECS + v], kf[vv]);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; ++e) kf[vv][e] = 0.f;
                }
            }
            const bool live = c * DC_CHUNK + kq < n;
#pragma unroll
            for (int gi = 0; gi < MAXG; ++gi) {
                if (gi >= group) break;
                const float dot = qk_dot<HD, MAXG>(s_q, kf, gi, l8);
                if (l8 == 0) s_p[gi][kq] = live ? dot : -INFINITY;
            }
        }
        __syncthreads();

        // Online softmax, a warp per query head and a lane per key: the stage has at least one live key, so the
        // new max is finite; on the first stage alpha = exp2(-inf) = 0.
        if (warp < group) {
            const float s = s_p[warp][lane];
            const float m_new = fmaxf(m_run, warp_max(s));
            const float alpha = exp2f(m_run - m_new);
            const float p = exp2f(s - m_new);
            l_run = l_run * alpha + warp_sum(p);
            m_run = m_new;
            s_p[warp][lane] = p;
            if (lane == 0) s_alpha[warp] = alpha;
        }
        __syncthreads();

        // P V: thread (key_lane, quad) rescales its sums, then adds columns 4 quad .. 4 quad + 3 of keys key_lane,
        // key_lane + KEY_LANES, ... (dead keys: p = 0 and V zero-filled).
        if (pv_thread) {
#pragma unroll
            for (int gi = 0; gi < MAXG; ++gi) {
                if (gi >= group) break;
                const float a = s_alpha[gi];
                acc[gi][0] *= a, acc[gi][1] *= a, acc[gi][2] *= a, acc[gi][3] *= a;
            }
#pragma unroll
            for (int jj = key_lane; jj < DC_CHUNK; jj += KEY_LANES) {
                const uint2 raw = reinterpret_cast<const uint2*>(vs)[jj * QUADS + quad];
                const float2 v01 = unpack2<T>(raw.x), v23 = unpack2<T>(raw.y);
#pragma unroll
                for (int gi = 0; gi < MAXG; ++gi) {
                    if (gi >= group) break;
                    const float p = s_p[gi][jj];
                    acc[gi][0] += p * v01.x;
                    acc[gi][1] += p * v01.y;
                    acc[gi][2] += p * v23.x;
                    acc[gi][3] += p * v23.y;
                }
            }
        }
    }

    // This block's share: the P V sums over the key lanes (through the K/V buffer, once every stage is
    // consumed), and each head's max and sum.
    __syncthreads();
    float* red = reinterpret_cast<float*>(dc_kv);
    if (pv_thread) {
#pragma unroll
        for (int gi = 0; gi < MAXG; ++gi) {
            if (gi >= group) break;
            *reinterpret_cast<float4*>(red + (key_lane * MAXG + gi) * HD + 4 * quad) =
                make_float4(acc[gi][0], acc[gi][1], acc[gi][2], acc[gi][3]);
        }
    }
    __syncthreads();

    // The merge: block `rank` of the cluster finishes elements [rank slice, (rank + 1) slice) of the group's
    // output. Every block pushes each element's sum, and each head's max and sum (-inf and 0 for a block without
    // keys: it weighs nothing), into the shared memory of the block that finishes it; one cluster barrier
    // (release / acquire) publishes them, and after it each block reads only its own shared memory.
    asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
    const int total = group * HD, slice = (total + DC_CLUSTER - 1) / DC_CLUSTER;
    if (warp < group && lane < DC_CLUSTER) {  // m_run and l_run are the same in every lane of the warp
        *cluster.map_shared_rank(&s_m[rank][warp], lane) = m_run;
        *cluster.map_shared_rank(&s_l[rank][warp], lane) = l_run;
    }
    for (int e = tid; e < total; e += DECODE_THREADS) {
        const int gi = e / HD, d = e % HD;
        float o = 0.f;
#pragma unroll
        for (int kl = 0; kl < KEY_LANES; ++kl) o += red[(kl * MAXG + gi) * HD + d];
        *cluster.map_shared_rank(&s_in[rank][e % slice], e / slice) = o;
    }
    cluster.sync();
    for (int i = tid; i < slice; i += DECODE_THREADS) {
        const int e = rank * slice + i;
        if (e >= total) break;
        const int gi = e / HD, d = e % HD;
        float mx = -INFINITY;
#pragma unroll
        for (int b = 0; b < DC_CLUSTER; ++b) mx = fmaxf(mx, s_m[b][gi]);
        float sum = 0.f, o = 0.f;
        if (mx != -INFINITY) {  // else an empty sequence: defined zeros
#pragma unroll
            for (int b = 0; b < DC_CLUSTER; ++b) {
                const float w = exp2f(s_m[b][gi] - mx);
                sum += w * s_l[b][gi];
                o += w * s_in[b][i];
            }
        }
        out[((size_t)q_row * n_heads + head0 + gi) * HD + d] = from_float<T>(sum > 0.f ? o / sum : 0.f);
    }
}

#define DECODE_CLUSTER_KERNEL(T, NAME, HD, MAXG)                                                           \
    extern "C" __global__ void __cluster_dims__(DC_CLUSTER, 1, 1) __launch_bounds__(DECODE_THREADS, 2)     \
        attention_decode_cluster_##NAME##_hd##HD##_g##MAXG(                                                \
            T* out, const T* qkv, const T* k_cache, const T* v_cache, const int* block_tables,              \
            const int* query_start, const int* context_lens, int max_blocks, int n_heads, int n_kv,        \
            int block_size, float scale_log2, int group_size, int head_offset) {                           \
        attention_decode_cluster_body<T, HD, MAXG>(out, qkv, k_cache, v_cache, block_tables, query_start,  \
                                                   context_lens, max_blocks, n_heads, n_kv, block_size,    \
                                                   scale_log2, group_size, head_offset);                   \
    }
#define DECODE_CLUSTER_KERNELS_HD(T, NAME, HD)                                                             \
    DECODE_CLUSTER_KERNEL(T, NAME, HD, 1) DECODE_CLUSTER_KERNEL(T, NAME, HD, 4)                            \
    DECODE_CLUSTER_KERNEL(T, NAME, HD, 8)
#define DECODE_CLUSTER_KERNELS(T, NAME)                                                                    \
    DECODE_CLUSTER_KERNELS_HD(T, NAME, 64) DECODE_CLUSTER_KERNELS_HD(T, NAME, 80)                          \
    DECODE_CLUSTER_KERNELS_HD(T, NAME, 96) DECODE_CLUSTER_KERNELS_HD(T, NAME, 128)

DECODE_CLUSTER_KERNELS(bf16, bf16)
DECODE_CLUSTER_KERNELS(f16, f16)
#endif
