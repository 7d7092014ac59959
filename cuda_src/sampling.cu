// Token selection from fp32 logits [B, V]: greedy argmax, and sampling with per-row temperature,
// top-k, top-p and min-p. One block per row; nothing but the chosen ids leaves the GPU.
//
// Filtering never sorts. All three filters keep a superlevel set {i : z_i >= threshold} of the scaled
// logits z = logits / temperature, so each becomes a threshold on an order-preserving 32-bit key of z,
// and the kept set is the one above the largest threshold:
//   top-k  the k-th largest key, found by a 4-pass radix select on 8-bit digits (ties are all kept);
//   top-p  over the top-k survivors, the largest key whose superlevel set holds >= top_p of the
//          probability mass: the same radix select with bins weighted by exp(z - max) in 2^-40 fixed
//          point, so the sums are integers and independent of the order atomics land in;
//   min-p  z >= max + log(min_p), i.e. p >= min_p * p_max.
// The survivor is drawn by Gumbel-max (argmax of z_i + Gumbel noise), an exact draw from the
// renormalised softmax that needs no prefix sum. The noise comes from Philox-4x32-10 keyed by the
// request's seed with counter (token index / 4, step), so a draw depends on (seed, step) alone and
// never on the row's place in the batch.
//
// Speed: radix passes over a whole 128K vocabulary pile their atomics onto the few bins that hold the
// bulk of the logits. So one counting pass first measures, with per-thread counters and no atomics,
// how many tokens (and how much mass) lie within 2^(j-2) of the max for j = 0..11; the smallest such
// band that is guaranteed to contain the kept set and fits in shared memory is compacted there, and
// the selections and the draw run on it. Both routes pick the same thresholds and the same noise per
// token, hence the same token; the full-vocabulary route remains for kept sets that do not fit.
#include "common.cuh"

#define SAMPLE_THREADS 1024
#define RADIX_BINS 256
#define MASS_ONE 1099511627776.0f  // 2^40: probability 1 in fixed point
#define N_BANDS 12                 // band b holds tokens with z_max - z < 2^(b - 2): 0.25 .. 512
#define CANDIDATE_CAP 4096         // tokens the shared-memory route can hold

struct Best {
    float value;
    int index;
};
// Larger value wins; equal values go to the smaller index (numpy's argmax); NaN never wins.
__device__ __forceinline__ Best better(Best a, Best b) {
    return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}
__device__ __forceinline__ Best warp_best(Best b) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        Best other{__shfl_xor_sync(FULL_MASK, b.value, o), __shfl_xor_sync(FULL_MASK, b.index, o)};
        b = better(b, other);
    }
    return b;
}
__device__ __forceinline__ Best block_best(Best b) {
    __shared__ float s_value[32];
    __shared__ int s_index[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    b = warp_best(b);
    __syncthreads();
    if (lane == 0) {
        s_value[warp] = b.value;
        s_index[warp] = b.index;
    }
    __syncthreads();
    b = lane < (int)(blockDim.x >> 5) ? Best{s_value[lane], s_index[lane]} : Best{-INFINITY, INT_MAX};
    return warp_best(b);
}

__device__ __forceinline__ uint32_t order_key(float f) {
    const uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
// exp(z - z_max) in 2^-40 fixed point. Every mass in this file is a sum of these integers.
__device__ __forceinline__ unsigned long long mass_of(float z, float z_max) {
    return (unsigned long long)(expf(z - z_max) * MASS_ONE);
}
// Band of a token at distance d = z_max - z >= 0: the smallest b with d < 2^(b - 2), read off the
// float exponent (d < 0.25 -> 0; >= N_BANDS means outside every band).
__device__ __forceinline__ int band_of(float d) {
    return max((int)((__float_as_uint(d) >> 23) & 0xff) - 127 + 3, 0);
}

// Lower edge and width of band b (b = 0 is [0, 0.25), band b > 0 is [2^(b-3), 2^(b-2))).
__device__ __forceinline__ float band_low(int b) { return b == 0 ? 0.f : ldexpf(1.f, b - 3); }
__device__ __forceinline__ float band_width(int b) { return b == 0 ? 0.25f : ldexpf(1.f, b - 3); }
// Slice 0..15 of d within its band; exact: d - lo is exact for d in [lo, 2 lo] and scale a power of 2.
__device__ __forceinline__ int sub_band_of(float d, float lo, float scale) {
    return min((int)((d - lo) * scale), 15);
}

// Block sums of per-thread 8-bit counters packed into registers: bands 0..7 in lo, 8..11 in hi.
__device__ __forceinline__ void block_sum_packed(unsigned long long lo, uint32_t hi, uint32_t* s_count) {
    __syncthreads();  // earlier readers of s_count are done
    if (threadIdx.x < 16) s_count[threadIdx.x] = 0;
    __syncthreads();
#pragma unroll
    for (int b = 0; b < N_BANDS; ++b) {
        uint32_t c = b < 8 ? (uint32_t)(lo >> (8 * b)) & 0xff : (hi >> (8 * (b - 8))) & 0xff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(FULL_MASK, c, o);
        if ((threadIdx.x & 31) == 0 && c) atomicAdd(&s_count[b], c);
    }
    __syncthreads();
}
__device__ __forceinline__ void block_sum_packed16(unsigned long long lo, unsigned long long hi, uint32_t* s_count) {
    __syncthreads();  // earlier readers of s_count are done
    if (threadIdx.x < 16) s_count[threadIdx.x] = 0;
    __syncthreads();
#pragma unroll
    for (int b = 0; b < 16; ++b) {
        uint32_t c = (uint32_t)((b < 8 ? lo : hi) >> (8 * (b & 7))) & 0xff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(FULL_MASK, c, o);
        if ((threadIdx.x & 31) == 0 && c) atomicAdd(&s_count[b], c);
    }
    __syncthreads();
}

// Philox-4x32-10 (Salmon et al., SC'11): 10 rounds of multiply-xor over a 128-bit counter.
__device__ __forceinline__ uint4 philox4x32(uint4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        const uint32_t hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        const uint32_t hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return c;
}
struct Rng {
    uint32_t seed_lo, seed_hi;
    int step;
    // One Philox call serves tokens 4q..4q+3 (counter (q, step)); word i & 3 belongs to token i.
    __device__ __forceinline__ uint4 block4(int q) const {
        return philox4x32(make_uint4((uint32_t)q, (uint32_t)step, 0u, 0u), seed_lo, seed_hi);
    }
};
__device__ __forceinline__ float gumbel_of(uint32_t bits) {
    const float u = ((bits >> 8) + 0.5f) * (1.0f / 16777216.0f);  // in (0, 1): both logs stay finite
    return -logf(-logf(u));
}
__device__ __forceinline__ uint32_t word_of(const uint4& r, int i) {
    return i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w;
}

// Calls f(value, index) for every logit of a row: 16-byte loads, four in flight per thread, when the
// row allows (vec), single floats otherwise. Every consumer is order-independent.
template <typename F>
__device__ __forceinline__ void for_each_logit(const float* lg, int vocab, bool vec, F&& f) {
    const int bd = blockDim.x;
    if (vec) {
        const float4* v4 = reinterpret_cast<const float4*>(lg);
        const int n4 = vocab >> 2;
        int i = threadIdx.x;
        for (; i + 3 * bd < n4; i += 4 * bd) {
            float4 q[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) q[u] = v4[i + u * bd];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int base = 4 * (i + u * bd);
                f(q[u].x, base); f(q[u].y, base + 1); f(q[u].z, base + 2); f(q[u].w, base + 3);
            }
        }
        for (; i < n4; i += bd) {
            const float4 q = v4[i];
            f(q.x, 4 * i); f(q.y, 4 * i + 1); f(q.z, 4 * i + 2); f(q.w, 4 * i + 3);
        }
    } else {
        for (int i = threadIdx.x; i < vocab; i += bd) f(lg[i], i);
    }
}

__device__ __forceinline__ Best row_argmax(const float* lg, int vocab, bool vec) {
    Best b{-INFINITY, INT_MAX};
    for_each_logit(lg, vocab, vec, [&](float v, int i) { b = better(b, Best{v, i}); });
    b = block_best(b);
    if (b.index == INT_MAX) b.index = 0;  // all NaN
    return b;
}

// Key of the element where the weight accumulated from the top first reaches `target`: counts
// (MASS = false, weight 1 each: the target-th largest key) or fixed-point probability mass of the
// elements with key >= floor_key (MASS = true), over z_of(0..n-1). Four passes, one 8-bit digit each,
// most significant first. Returns 0 (keep everything) when the elements hold less than `target`.
template <bool MASS, typename ZOf>
__device__ uint32_t radix_select(ZOf z_of, int n, float z_max, uint32_t floor_key, unsigned long long target,
                                 unsigned long long* s_hist) {
    __shared__ uint32_t s_bin;
    __shared__ unsigned long long s_target;
    __shared__ int s_found;
    uint32_t prefix = 0, mask = 0;
    const int lane = threadIdx.x & 31;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < RADIX_BINS; b += blockDim.x) s_hist[b] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float z = z_of(i);
            const uint32_t key = order_key(z);
            const uint32_t bin = (key >> shift) & (RADIX_BINS - 1);
            // Most tokens share a handful of bins (early digits above all), so lanes of a warp that hit
            // the same bin pool their weights first: one atomic per distinct bin and warp, not per token.
            const unsigned long long w = MASS ? mass_of(z, z_max) : 1ull;
            const bool take = (key & mask) == prefix && (!MASS || (key >= floor_key && w != 0));
            const uint32_t active = __activemask();
            const uint32_t peers = __match_any_sync(active, take ? bin : RADIX_BINS);
            if (!take) continue;
            unsigned long long pooled = __popc(peers);
            if (MASS) {  // w <= 2^40: two 20-bit halves, each summed over <= 32 lanes, fit in 32 bits
                const uint32_t lo = __reduce_add_sync(peers, (uint32_t)(w & 0xFFFFFu));
                const uint32_t hi = __reduce_add_sync(peers, (uint32_t)(w >> 20));
                pooled = ((unsigned long long)hi << 20) + lo;
            }
            if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&s_hist[bin], pooled);
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            // Lane l owns bins 8l..8l+7; suffix sums over lanes find the lane holding the crossing bin.
            unsigned long long own = 0;
#pragma unroll
            for (int b = 0; b < 8; ++b) own += s_hist[lane * 8 + b];
            unsigned long long suffix = own;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned long long v = __shfl_down_sync(FULL_MASK, suffix, o);
                if (lane + o < 32) suffix += v;
            }
            const uint32_t hits = __ballot_sync(FULL_MASK, suffix >= target);
            if (lane == 0) s_found = hits != 0;
            const int owner = hits ? 31 - __clz(hits) : 0;
            if (lane == owner) {
                unsigned long long above = suffix - own;
                int bin = lane * 8;
                for (int b = lane * 8 + 7; b >= lane * 8; --b) {
                    if (above + s_hist[b] >= target) {
                        bin = b;
                        break;
                    }
                    above += s_hist[b];
                }
                s_bin = (uint32_t)bin;
                s_target = target - above;
            }
        }
        __syncthreads();
        if (!s_found) return 0;  // uniform: read after the barrier by every thread
        prefix |= s_bin << shift;
        mask |= (uint32_t)(RADIX_BINS - 1) << shift;
        target = s_target;
        __syncthreads();  // s_bin / s_target / s_hist are rewritten by the next pass
    }
    return prefix;
}

// Sum over the block of a 64-bit integer (exact, so independent of the order of the partial sums).
__device__ __forceinline__ unsigned long long block_sum_u64(unsigned long long v, unsigned long long* s_acc) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    __syncthreads();
    if (threadIdx.x == 0) *s_acc = 0;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) atomicAdd(s_acc, v);
    __syncthreads();
    return *s_acc;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) argmax_f32(int* out_ids, const float* logits,
                                                                          int vocab) {
    const TraceEndAtExit trace_at_exit;  // bench.py --timeline
    pdl_begin();
    const bool vec = (vocab & 3) == 0;  // rows 16-byte aligned (the launcher checks the base)
    const Best b = row_argmax(logits + (size_t)blockIdx.x * vocab, vocab, vec);
    if (threadIdx.x == 0) out_ids[blockIdx.x] = b.index;
}

// candidate_cap: tokens the shared-memory route may take (CANDIDATE_CAP; 0 forces the full route).
// host_ids (may be null): mapped pinned host memory that also receives the ids, at row host_slot[0] * stride,
// so the host reads them once the step is done without a copy queued behind it (host_slot is step metadata:
// the host alternates slots so that a step launched ahead does not overwrite ids not yet read).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_f32(
    int* out_ids, const float* logits, const float* temperature, const int* top_k, const float* top_p,
    const float* min_p, const uint32_t* seeds, const int* steps, int vocab, int candidate_cap, int* host_ids,
    const int* host_slot, int host_stride) {
    __shared__ float s_cand_z[CANDIDATE_CAP];
    __shared__ int s_cand_index[CANDIDATE_CAP];
    __shared__ unsigned long long s_hist[RADIX_BINS];
    __shared__ unsigned long long s_acc;
    __shared__ uint32_t s_band_count[16];
    __shared__ float s_scratch_f[32];
    __shared__ int s_n_cand;
    const TraceEndAtExit trace_at_exit;  // bench.py --timeline
    pdl_begin();

    const int row = blockIdx.x;
    const auto store_id = [&](int r, int id) {
        out_ids[r] = id;
        if (host_ids != nullptr) host_ids[(size_t)host_slot[0] * host_stride + r] = id;
    };
    const float* lg = logits + (size_t)row * vocab;
    const bool vec = (vocab & 3) == 0;
    const float temp = temperature[row];
    const int k = top_k[row];
    const Best greedy = row_argmax(lg, vocab, vec);
    if (!(temp > 0.f) || k == 1) {
        if (threadIdx.x == 0) store_id(row, greedy.index);
        return;
    }
    const float inv_temp = 1.f / temp;
    const float z_max = greedy.value * inv_temp;
    const float p = top_p[row], mp = min_p[row];
    const bool use_k = k > 0 && k < vocab, use_p = p < 1.f, use_m = mp > 0.f;
    const Rng rng{seeds[2 * row], seeds[2 * row + 1], steps[row]};
    const auto z_global = [&](int i) { return lg[i] * inv_temp; };

    Best drawn{-INFINITY, INT_MAX};
    if (!use_k && !use_p && !use_m) {  // plain temperature sampling: a draw over the whole row
        if (vec) {
            const float4* v4 = reinterpret_cast<const float4*>(lg);
            for (int q = threadIdx.x; q < (vocab >> 2); q += blockDim.x) {
                const float4 l = v4[q];
                const uint4 r = rng.block4(q);
                drawn = better(drawn, Best{l.x * inv_temp + gumbel_of(r.x), 4 * q});
                drawn = better(drawn, Best{l.y * inv_temp + gumbel_of(r.y), 4 * q + 1});
                drawn = better(drawn, Best{l.z * inv_temp + gumbel_of(r.z), 4 * q + 2});
                drawn = better(drawn, Best{l.w * inv_temp + gumbel_of(r.w), 4 * q + 3});
            }
        } else {
            for (int i = threadIdx.x; i < vocab; i += blockDim.x)
                drawn = better(drawn, Best{z_global(i) + gumbel_of(word_of(rng.block4(i >> 2), i & 3)), i});
        }
        drawn = block_best(drawn);
        if (threadIdx.x == 0) store_id(row, drawn.index == INT_MAX ? greedy.index : drawn.index);
        return;
    }

    // Counting pass: tokens per band (8-bit counters packed in two registers: a thread sees at most
    // 255 tokens, checked below) and, for top-p, the total mass.
    const bool fits_counters = vocab <= 255 * (int)blockDim.x && candidate_cap > 0;
    unsigned long long packed_lo = 0, mass_all = 0;
    uint32_t packed_hi = 0;
    if (fits_counters) {
        for_each_logit(lg, vocab, vec, [&](float l, int) {
            const float z = l * inv_temp;
            const int b = band_of(z_max - z);
            if (b < 8) packed_lo += 1ull << (8 * b);
            else if (b < N_BANDS) packed_hi += 1u << (8 * (b - 8));
            if (use_p) mass_all += mass_of(z, z_max);
        });
        if (use_p) mass_all = block_sum_u64(mass_all, &s_acc);
        block_sum_packed(packed_lo, packed_hi, s_band_count);
    }

    // Candidates: every band below `cut_band`, plus sub-bands 0..cut_sub of band cut_band (split into 16
    // equal slices, each counted exactly): the largest such superlevel set that fits in shared memory.
    int cut_band = -1, cut_sub = -1;
    if (fits_counters) {
        uint32_t below = 0;
        cut_band = N_BANDS;
        for (int b = 0; b < N_BANDS; ++b) {
            if (below + s_band_count[b] > (uint32_t)candidate_cap) {
                cut_band = b;
                break;
            }
            below += s_band_count[b];
        }
        if (cut_band < N_BANDS) {
            const float lo = band_low(cut_band), scale = 16.f / band_width(cut_band);
            unsigned long long sub_lo = 0, sub_hi = 0;
            for_each_logit(lg, vocab, vec, [&](float l, int) {
                const float d = z_max - l * inv_temp;
                if (band_of(d) != cut_band) return;
                const int sb = sub_band_of(d, lo, scale);
                if (sb < 8) sub_lo += 1ull << (8 * sb);
                else sub_hi += 1ull << (8 * (sb - 8));
            });
            block_sum_packed16(sub_lo, sub_hi, s_band_count);
            for (int sb = 0; sb < 16 && below + s_band_count[sb] <= (uint32_t)candidate_cap; ++sb) {
                below += s_band_count[sb];
                cut_sub = sb;
            }
        }
        if (use_k && below < (uint32_t)k) cut_band = -1;  // the top-k set does not fit: full route
    }

    uint32_t threshold = 0;  // keep key(z) >= threshold
    bool fast = false;
    if (cut_band >= 0) {
        // Compact the candidates into shared memory, one atomic per warp and step; on the way, measure
        // what the containment checks need: the candidates' mass and the largest z left outside.
        if (threadIdx.x == 0) s_n_cand = 0;
        __syncthreads();
        const float lo = cut_band < N_BANDS ? band_low(cut_band) : 0.f;
        const float scale = cut_band < N_BANDS ? 16.f / band_width(cut_band) : 0.f;
        unsigned long long mass_in = 0;
        float max_out = -INFINITY;
        for_each_logit(lg, vocab, vec, [&](float l, int i) {
            const float z = l * inv_temp;
            const float d = z_max - z;
            const int b = band_of(d);
            const bool in = b < cut_band || (b == cut_band && sub_band_of(d, lo, scale) <= cut_sub);
            const uint32_t active = __activemask();
            const uint32_t votes = __ballot_sync(active, in);
            const int leader = __ffs(active) - 1;
            int base = 0;
            if ((threadIdx.x & 31) == leader && votes) base = atomicAdd(&s_n_cand, __popc(votes));
            base = __shfl_sync(active, base, leader);
            if (in) {
                const int slot = base + __popc(votes & ((1u << (threadIdx.x & 31)) - 1));
                if (slot < CANDIDATE_CAP) {  // always true: the counts above used the same predicate
                    s_cand_z[slot] = z;
                    s_cand_index[slot] = i;
                }
                if (use_p) mass_in += mass_of(z, z_max);
            } else {
                max_out = fmaxf(max_out, z);
            }
        });
        if (use_p) mass_in = block_sum_u64(mass_in, &s_acc);
        max_out = block_max(max_out, s_scratch_f);
        const int n = s_n_cand;
        // The kept set lies inside the candidates if any active filter's own set does.
        const unsigned long long target_all = (unsigned long long)ceil((double)fmaxf(p, 0.f) * (double)mass_all);
        const float min_p_z = z_max + logf(fminf(mp, 1.f));
        fast = n <= candidate_cap &&
               (use_k || (use_p && mass_in >= target_all) || (use_m && min_p_z > max_out));
        if (fast) {
            const auto z_cand = [&](int i) { return s_cand_z[i]; };
            if (use_k) threshold = radix_select<false>(z_cand, n, z_max, 0u, (unsigned long long)k, s_hist);
            if (use_p) {
                unsigned long long mass = mass_all;
                if (use_k) {  // the top-k set lies inside the candidates: its mass is a sum over them
                    mass = 0;
                    for (int i = threadIdx.x; i < n; i += blockDim.x)
                        if (order_key(s_cand_z[i]) >= threshold) mass += mass_of(s_cand_z[i], z_max);
                    mass = block_sum_u64(mass, &s_acc);
                }
                // Returns 0 when the top-p set reaches below the candidates (then another filter binds).
                const unsigned long long target = (unsigned long long)ceil((double)fmaxf(p, 0.f) * (double)mass);
                threshold = max(threshold, radix_select<true>(z_cand, n, z_max, threshold, target ? target : 1, s_hist));
            }
            if (use_m) threshold = max(threshold, order_key(min_p_z));
            for (int i = threadIdx.x; i < n; i += blockDim.x) {
                const float z = s_cand_z[i];
                const int t = s_cand_index[i];
                if (order_key(z) >= threshold)
                    drawn = better(drawn, Best{z + gumbel_of(word_of(rng.block4(t >> 2), t & 3)), t});
            }
        }
    }
    if (!fast) {
        // Full-vocabulary route: the same selections over the row in global memory.
        if (use_k) threshold = radix_select<false>(z_global, vocab, z_max, 0u, (unsigned long long)k, s_hist);
        if (use_p) {
            unsigned long long mass = 0;
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
                const float z = z_global(i);
                if (order_key(z) >= threshold) mass += mass_of(z, z_max);
            }
            mass = block_sum_u64(mass, &s_acc);
            unsigned long long target = (unsigned long long)ceil((double)fmaxf(p, 0.f) * (double)mass);
            threshold = max(threshold, radix_select<true>(z_global, vocab, z_max, threshold, target ? target : 1, s_hist));
        }
        if (use_m) threshold = max(threshold, order_key(z_max + logf(fminf(mp, 1.f))));
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float z = z_global(i);
            if (order_key(z) >= threshold)
                drawn = better(drawn, Best{z + gumbel_of(word_of(rng.block4(i >> 2), i & 3)), i});
        }
    }
    drawn = block_best(drawn);
    if (threadIdx.x == 0) store_id(row, drawn.index == INT_MAX ? greedy.index : drawn.index);
}
