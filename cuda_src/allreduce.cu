// One-shot all-reduce (sum) over the GPUs of one node, through memory they map from each other (CUDA IPC,
// NVLink / PCIe peer access). For the small messages of decode (a few tokens x hidden), latency, not bandwidth,
// is the cost: NCCL's per call, and in a kernel of our own every round trip between GPUs. So the data carries
// its own flag (NCCL's LL protocol): each 4-byte word travels next to the call's flag in an 8-byte pair, two
// pairs per 16-byte store, and a store of 8 aligned bytes arrives whole. One kernel:
//   1. each block sends its slice of the input into its slot of every peer's buffer, (word, flag) pairs, with
//      no fence and no separate flag: a one-way trip;
//   2. it polls its own buffer, where the peers' slices land, until every pair carries this call's flag
//      (block b only meets block b of the other ranks, so blocks never wait on each other within a GPU);
//   3. it sums the slice over the ranks in fp32, in rank order (every rank gets the same bits), and writes it
//      back in place.
// The one-shot kernel this replaced copied into its own buffer, fenced, raised a flag in each peer and then read
// the peers' buffers: two crossings more on the critical path (a write acknowledged, a read round trip).
// The flag is the call's number, counted per block in device memory (a CUDA graph replays fixed arguments, so
// the kernel counts calls itself; buffers start zeroed and the first call is 1). Two regions alternate by the
// call's parity: a fast peer cannot send call n + 2 into the region of call n before this rank sent it its
// part of call n + 1, which a later kernel does, after this one has read everything. Every call of the plain
// all-reduce runs the same grid (AR_BLOCKS, whatever the size): then every block counts every call, all blocks
// agree on the parity, and block b covers the same slice each time, which the argument above needs.
//
// all_reduce_add_rms_norm_*: the same exchange, then residual += sum; out = rms_norm(residual) * weight for
// whole rows (the pre-norm of the next sub-layer, which would otherwise be its own kernel after the
// all-reduce). Block b owns rows b, b + AR_BLOCKS, ... of every call, so the argument above holds for any row
// count; it runs on its own buffers and counters (a second IpcAllReduce), since the plain kernel's blocks own
// other slices. Its grid is min(rows, AR_BLOCKS) (a 512-thread block that needs an SM of its own is placed
// sooner alone than 32 of them); the blocks it leaves out count the call all the same (ar_done), so every block
// numbers every call as above.
//
// sent (the fused kernel): this rank's part was already sent by the kernel that computed it (the row-parallel
// GEMV's epilogue, gemv.cu), with the same flag: this kernel only receives. That GEMV reads the counters after its
// own PDL wait, this kernel writes them after its wait, so both see the same call number.
//
// all_gather_cols_f32: the same exchange without a sum, for the logits of decode: every rank's local columns
// [rows, width_r] laid side by side into out [rows, out_cols] on every rank (each a vocab shard of the LM
// head). A sender's message is its local block, row-major; its AG_BLOCKS blocks cover the same lines every
// call, and so do the receivers', so the argument above holds for it too (on buffers and counters of its own).
//
// The LL helpers and the table's layout are in ll.cuh.
#include "ll.cuh"
#include "norm.cuh"

#define AR_THREADS 256
#define AR_GROUP 4       // peers whose lines are read before any is checked
#define AG_BLOCKS 64     // the gather's grid (ipc_allreduce.py AG_BLOCKS; at most AR_MAX_BLOCKS counters)

// This call's flag for block b (its counter + 1) and region.
__device__ __forceinline__ ArCall ar_call(const unsigned long long* __restrict__ table, int world,
                                          unsigned long long slot_bytes) {
    __shared__ ArCall s_call;
    if (threadIdx.x == 0) s_call = ar_call_of(table, world, slot_bytes, blockIdx.x);
    __syncthreads();
    return s_call;
}

// At the block's end: this call's number becomes its counter, which the next call (a later kernel) reads. The
// grid's last block also writes it into the counters of the blocks up to AR_BLOCKS that this grid did not launch
// (the fused kernel's grid follows the rows): every counter then stays the call count, so a line's flag names
// one call whichever block wrote it (a row's lines move with the row length, so rows of different calls share
// lines). No block of this grid reads those counters.
__device__ __forceinline__ void ar_done(const unsigned long long* __restrict__ table, ArCall c) {
    if (threadIdx.x == 0) {
        uint32_t* counters = ar_counters(table);
        counters[blockIdx.x] = c.flag;
        if (blockIdx.x == gridDim.x - 1)
            for (int b = gridDim.x; b < AR_BLOCKS; ++b) counters[b] = c.flag;
    }
}

// Vector i of this rank's message (16 bytes) into every peer's slot for this rank: two LL lines.
__device__ __forceinline__ void ar_send(const unsigned long long* __restrict__ table, ArCall c,
                                        unsigned long long slot_bytes, int rank, int world, size_t i, uint4 v) {
    ar_send_line(table, c, slot_bytes, rank, world, 2 * i, v.x, v.y);
    ar_send_line(table, c, slot_bytes, rank, world, 2 * i + 1, v.z, v.w);
}

// Vector i summed over the ranks in fp32, in rank order (every rank gets the same bits), rounded to T; `mine`
// is this rank's own vector. The lines of AR_GROUP peers are all read before the first is checked: when the
// data is there, that is one round trip to L2 instead of one per line.
template <typename T>
__device__ __forceinline__ uint4 ar_sum(const unsigned long long* __restrict__ table, ArCall c,
                                        unsigned long long slot_bytes, int rank, int world, size_t i, uint4 mine) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int r0 = 0; r0 < world; r0 += AR_GROUP) {
        uint4 lo[AR_GROUP], hi[AR_GROUP];
#pragma unroll
        for (int g = 0; g < AR_GROUP; ++g) {
            const int r = r0 + g;
            if (r < world && r != rank) {
                lo[g] = ld_volatile16(ar_line(table, c, slot_bytes, rank, r, 2 * i));
                hi[g] = ld_volatile16(ar_line(table, c, slot_bytes, rank, r, 2 * i + 1));
            }
        }
#pragma unroll
        for (int g = 0; g < AR_GROUP; ++g) {
            const int r = r0 + g;
            if (r >= world) continue;
            uint4 x = mine;
            if (r != rank) {
                while (!ar_arrived(lo[g], c)) lo[g] = ld_volatile16(ar_line(table, c, slot_bytes, rank, r, 2 * i));
                while (!ar_arrived(hi[g], c)) hi[g] = ld_volatile16(ar_line(table, c, slot_bytes, rank, r, 2 * i + 1));
                x = make_uint4(lo[g].x, lo[g].z, hi[g].x, hi[g].z);
            }
            float f[8];
            unpack8<T>(x, f);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] += f[e];
        }
    }
    return pack8<T>(acc);
}

// data: n_vec vectors of 8 elements, reduced in place.
template <typename T>
__device__ __forceinline__ void one_shot_all_reduce(T* data, int n_vec, int rank, int world,
                                                    const unsigned long long* __restrict__ table,
                                                    unsigned long long slot_bytes) {
    const ArCall c = ar_call(table, world, slot_bytes);
    const int stride = gridDim.x * blockDim.x;
    uint4* v = reinterpret_cast<uint4*>(data);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_vec; i += stride)
        ar_send(table, c, slot_bytes, rank, world, i, v[i]);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_vec; i += stride)
        v[i] = ar_sum<T>(table, c, slot_bytes, rank, world, i, v[i]);
    ar_done(table, c);
}

// data [rows, hidden]: this rank's partial sums, replaced by the total (rounded to T, as the plain kernel
// leaves it); then norm.cu's add_rms_norm on each row, launched with its block size: the same bits as the two
// kernels in sequence.
template <typename T>
__device__ __forceinline__ void one_shot_all_reduce_add_rms_norm(T* data, T* residual, T* out, const T* weight,
                                                                 int rows, int hidden, float eps, int rank,
                                                                 int world,
                                                                 const unsigned long long* __restrict__ table,
                                                                 unsigned long long slot_bytes, bool sent) {
    const int n_vec = hidden >> 3;
    uint4* v = reinterpret_cast<uint4*>(data);
    if (rows <= (int)gridDim.x && n_vec <= (int)blockDim.x) {
        // Decode: a row per block, a vector of it per thread. This rank's part, the residual and the weight
        // load while the call's number comes back, and the row stays in registers through the norm:
        // rms_norm_row's arithmetic on its split, without its trips back to memory.
        const int row = blockIdx.x, j = threadIdx.x;
        const bool mine = row < rows && j < n_vec;
        const size_t i = (size_t)row * n_vec + j;
        uint4* r = reinterpret_cast<uint4*>(residual);
        uint4 own = make_uint4(0, 0, 0, 0), res = own, w = own;
        if (mine) {
            own = v[i];
            res = r[i];
            w = reinterpret_cast<const uint4*>(weight)[j];
        }
        // Each thread reads the call's number itself (no barrier for the loads above to wait behind); thread 0
        // overwrites it only after norm_rstd's barriers, which blocks that sum or send anything reach.
        const ArCall c = ar_call_of(table, world, slot_bytes, blockIdx.x);
        if (mine && !sent) ar_send(table, c, slot_bytes, rank, world, i, own);
        if (row < rows) {
            float sum_sq = 0.f;
            if (mine) {
                const uint4 sum = ar_sum<T>(table, c, slot_bytes, rank, world, i, own);
                v[i] = sum;
                res = add_vec<T>(sum, res, sum_sq);
                r[i] = res;
            }
            const float rstd = norm_rstd(sum_sq, hidden, eps);
            if (mine) reinterpret_cast<uint4*>(out)[i] = scale_vec<T>(res, w, rstd);
        }
        ar_done(table, c);
        return;
    }
    const ArCall c = ar_call(table, world, slot_bytes);
    if (!sent)
        for (int row = blockIdx.x; row < rows; row += gridDim.x)
            for (int j = threadIdx.x; j < n_vec; j += blockDim.x) {
                const size_t i = (size_t)row * n_vec + j;
                ar_send(table, c, slot_bytes, rank, world, i, v[i]);
            }
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        // Each thread sums, and then normalises, the same vectors of the row (rms_norm_row's split), so it
        // reads back only what it wrote.
        for (int j = threadIdx.x; j < n_vec; j += blockDim.x) {
            const size_t i = (size_t)row * n_vec + j;
            v[i] = ar_sum<T>(table, c, slot_bytes, rank, world, i, v[i]);
        }
        rms_norm_row<T, true, true>(out, data, residual, weight, hidden, eps, row);
    }
    ar_done(table, c);
}

#define AR_KERNEL(T, NAME)                                                                                   \
    extern "C" __global__ void __launch_bounds__(AR_THREADS)                                                 \
        all_reduce_##NAME(T* data, int n_vec, int rank, int world, const unsigned long long* table,          \
                          unsigned long long slot_bytes) {                                                   \
        ar_pdl_begin(table);                                                                                  \
        one_shot_all_reduce<T>(data, n_vec, rank, world, table, slot_bytes);                                 \
    }
// _t512: the same for blocks of up to 512 threads (hidden <= 4,096), which may hold twice the registers: the
// 1,024-thread build spills some of the exchange's state.
#define AR_NORM_KERNEL(T, NAME, THREADS, SUFFIX)                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS) all_reduce_add_rms_norm_##NAME##SUFFIX(            \
        T* data, T* residual, T* out, const T* weight, int rows, int hidden, float eps, int rank, int world, \
        const unsigned long long* table, unsigned long long slot_bytes, int sent) {                          \
        ar_pdl_begin(table);                                                                                  \
        one_shot_all_reduce_add_rms_norm<T>(data, residual, out, weight, rows, hidden, eps, rank, world, table, \
                                            slot_bytes, sent != 0);                                           \
    }
AR_KERNEL(bf16, bf16)
AR_KERNEL(f16, f16)
AR_NORM_KERNEL(bf16, bf16, 1024, )
AR_NORM_KERNEL(f16, f16, 1024, )
AR_NORM_KERNEL(bf16, bf16, 512, _t512)
AR_NORM_KERNEL(f16, f16, 512, _t512)

// out [rows, out_cols] f32: columns [starts[r], starts[r + 1]) from rank r's local [rows, width_r] (width_r =
// starts[r + 1] - starts[r] <= widest), this rank's own copied from `local`. Word w of a message (row w / width_r,
// column w % width_r) travels in line w / 2; an odd last word shares its line with a zero. Messages are small
// (a few rows of a vocab shard: the host checks they fit the slots), so 32-bit indices.
extern "C" __global__ void __launch_bounds__(AR_THREADS)
    all_gather_cols_f32(float* __restrict__ out, const float* __restrict__ local, const int* __restrict__ starts,
                        int rows, int widest, int out_cols, int rank, int world,
                        const unsigned long long* __restrict__ table, unsigned long long slot_bytes) {
    ar_pdl_begin(table);
    const ArCall c = ar_call(table, world, slot_bytes);
    const int stride = gridDim.x * blockDim.x, first = blockIdx.x * blockDim.x + threadIdx.x;
    {
        const int lo = starts[rank], width = starts[rank + 1] - lo, n = rows * width;
        for (int l = first; 2 * l < n; l += stride) {
            const int w = 2 * l;
            const float a = local[w], b = w + 1 < n ? local[w + 1] : 0.f;
            ar_send_line(table, c, slot_bytes, rank, world, l, __float_as_uint(a), __float_as_uint(b));
            out[(size_t)(w / width) * out_cols + lo + w % width] = a;
            if (w + 1 < n) out[(size_t)((w + 1) / width) * out_cols + lo + (w + 1) % width] = b;
        }
    }
    // Every thread reads its line l of every peer before it checks any (one round trip, not one per peer).
    for (int l = first; 2 * l < rows * widest; l += stride) {
        uint4 line[AR_MAX_RANKS];
#pragma unroll
        for (int r = 0; r < AR_MAX_RANKS; ++r)
            if (r < world && r != rank && 2 * l < rows * (starts[r + 1] - starts[r]))
                line[r] = ld_volatile16(ar_line(table, c, slot_bytes, rank, r, l));
#pragma unroll
        for (int r = 0; r < AR_MAX_RANKS; ++r) {
            if (r >= world || r == rank) continue;
            const int lo = starts[r], width = starts[r + 1] - lo, n = rows * width, w = 2 * l;
            if (w >= n) continue;
            while (!ar_arrived(line[r], c)) line[r] = ld_volatile16(ar_line(table, c, slot_bytes, rank, r, l));
            const uint4 v = line[r];
            out[(size_t)(w / width) * out_cols + lo + w % width] = __uint_as_float(v.x);
            if (w + 1 < n) out[(size_t)((w + 1) / width) * out_cols + lo + (w + 1) % width] = __uint_as_float(v.z);
        }
    }
    ar_done(table, c);
}
