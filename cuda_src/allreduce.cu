// One-shot all-reduce (sum) over the GPUs of one node, through memory they map from each other (CUDA IPC,
// NVLink / PCIe peer access). For the small messages of decode (a few tokens x hidden), NCCL's per-call
// latency, not bandwidth, is the cost; here one kernel does it with one barrier:
//   1. each block copies its slice of the input into this rank's shared buffer,
//   2. it raises its flag in every peer's signal array and waits for the peers' flags (block b only meets
//      block b of the other ranks, so blocks never wait on each other within a GPU),
//   3. it sums the slice over all ranks' buffers (fixed rank order: every rank gets the same bits) in fp32
//      and writes it back in place.
// Flags are per-block counters kept in device memory (a CUDA graph replays fixed arguments, so the kernel
// counts calls itself); two buffers alternate by the counter's parity, so a fast rank's next call never
// overwrites data a slow rank is still reading (it cannot pass the next barrier before the slow rank
// finished this call). Flags only grow, and waiting is `>=`: a peer one call ahead cannot be missed.
// Every call runs the same grid (AR_BLOCKS, whatever the size): then every block counts every call, all
// blocks agree on the parity, and block b covers the same slice each time, which the argument above needs.
//
// all_reduce_add_rms_norm_*: the same barrier, then residual += sum; out = rms_norm(residual) * weight for whole
// rows (the pre-norm of the next sub-layer, which would otherwise be its own kernel after the all-reduce). Block
// b owns rows b, b + AR_BLOCKS, ... of every call, so the argument above holds for any row count; it runs on
// its own buffers and signals (a second IpcAllReduce), since the plain kernel's blocks own other slices.
#include "norm.cuh"

#define AR_MAX_RANKS 8
#define AR_MAX_BLOCKS 64
#define AR_BLOCKS 32     // the grid of every call (kernels.py AR_BLOCKS)
#define AR_THREADS 256

struct ArSignal {  // mpillm/cuda/ipc_allreduce.py SIGNAL_BYTES is its size
    uint32_t start[AR_MAX_BLOCKS][AR_MAX_RANKS];  // start[b][r]: last call whose data rank r's block b published
    uint32_t counter[AR_MAX_BLOCKS];              // calls made by this rank's block b
};

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
// Peer data is re-read at the same addresses every other call: never from a (non-coherent) L1 line.
__device__ __forceinline__ uint4 ld_volatile16(const void* p) {
    uint4 v;
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
}

// table: [AR_MAX_RANKS] buffer base pointers (this process's mappings), then [AR_MAX_RANKS] ArSignal
// pointers. parity_bytes: offset of the second buffer.

// This call's flag for block b (its counter + 1); its parity picks the buffer.
__device__ __forceinline__ uint32_t ar_next_flag(const ArSignal* me, int b) {
    __shared__ uint32_t s_flag;
    if (threadIdx.x == 0) s_flag = me->counter[b] + 1;
    __syncthreads();
    return s_flag;
}

// After the block's copies into its own buffer: raise its flag in every peer's signals, wait for theirs.
__device__ __forceinline__ void ar_barrier(const unsigned long long* __restrict__ table, ArSignal* me, int b,
                                           int rank, int world, uint32_t flag) {
    __syncthreads();
    if (threadIdx.x < world) {
        __threadfence_system();  // this block's copies are visible to the peers before the flag is
        ArSignal* peer = reinterpret_cast<ArSignal*>(table[AR_MAX_RANKS + threadIdx.x]);
        st_release_sys(&peer->start[b][rank], flag);
        while (ld_acquire_sys(&me->start[b][threadIdx.x]) < flag) {
        }
    }
    __syncthreads();
}

// Vector i summed over the ranks' buffers in fp32, in rank order (every rank gets the same bits), rounded to T.
template <typename T, typename Index>
__device__ __forceinline__ uint4 ar_sum_vector(const unsigned long long* __restrict__ table, unsigned long long par,
                                               int world, Index i) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int r = 0; r < world; ++r) {
        float f[8];
        unpack8<T>(ld_volatile16(reinterpret_cast<const uint4*>(table[r] + par) + i), f);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] += f[e];
    }
    return pack8<T>(acc);
}

// data: n_vec vectors of 8 elements, reduced in place.
template <typename T>
__device__ __forceinline__ void one_shot_all_reduce(T* data, int n_vec, int rank, int world,
                                                    const unsigned long long* __restrict__ table,
                                                    unsigned long long parity_bytes) {
    ArSignal* me = reinterpret_cast<ArSignal*>(table[AR_MAX_RANKS + rank]);
    const int b = blockIdx.x;
    const uint32_t flag = ar_next_flag(me, b);
    const unsigned long long par = (flag & 1) ? parity_bytes : 0ull;
    const int stride = gridDim.x * blockDim.x;

    uint4* mine = reinterpret_cast<uint4*>(table[rank] + par);
    for (int i = b * blockDim.x + threadIdx.x; i < n_vec; i += stride) mine[i] = reinterpret_cast<const uint4*>(data)[i];
    ar_barrier(table, me, b, rank, world, flag);
    for (int i = b * blockDim.x + threadIdx.x; i < n_vec; i += stride)
        reinterpret_cast<uint4*>(data)[i] = ar_sum_vector<T>(table, par, world, i);
    if (threadIdx.x == 0) me->counter[b] = flag;
}

// data [rows, hidden]: this rank's partial sums, replaced by the total (rounded to T, as the plain kernel
// leaves it); then norm.cu's add_rms_norm on each row, launched with its block size: the same bits as the two
// kernels in sequence.
template <typename T>
__device__ __forceinline__ void one_shot_all_reduce_add_rms_norm(T* data, T* residual, T* out, const T* weight,
                                                                 int rows, int hidden, float eps, int rank,
                                                                 int world,
                                                                 const unsigned long long* __restrict__ table,
                                                                 unsigned long long parity_bytes) {
    ArSignal* me = reinterpret_cast<ArSignal*>(table[AR_MAX_RANKS + rank]);
    const int b = blockIdx.x, n_vec = hidden >> 3;
    const uint32_t flag = ar_next_flag(me, b);
    const unsigned long long par = (flag & 1) ? parity_bytes : 0ull;

    uint4* mine = reinterpret_cast<uint4*>(table[rank] + par);
    for (int row = b; row < rows; row += gridDim.x)
        for (int v = threadIdx.x; v < n_vec; v += blockDim.x)
            mine[(size_t)row * n_vec + v] = reinterpret_cast<const uint4*>(data)[(size_t)row * n_vec + v];
    ar_barrier(table, me, b, rank, world, flag);
    for (int row = b; row < rows; row += gridDim.x) {
        // Each thread sums, and then normalises, the same vectors of the row (rms_norm_row's split), so it
        // reads back only what it wrote. The sum is ar_sum_vector's loop written out: through the helper the
        // compiler unrolls the rank loop another way (the same sums); this is the code that was measured.
        for (int v = threadIdx.x; v < n_vec; v += blockDim.x) {
            const size_t i = (size_t)row * n_vec + v;
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            for (int r = 0; r < world; ++r) {
                float f[8];
                unpack8<T>(ld_volatile16(reinterpret_cast<const uint4*>(table[r] + par) + i), f);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[e] += f[e];
            }
            reinterpret_cast<uint4*>(data)[i] = pack8<T>(acc);
        }
        rms_norm_row<T, true, true>(out, data, residual, weight, hidden, eps, row);
    }
    if (threadIdx.x == 0) me->counter[b] = flag;
}

#define AR_KERNEL(T, NAME)                                                                                   \
    extern "C" __global__ void __launch_bounds__(AR_THREADS) all_reduce_##NAME(                              \
        T* data, int n_vec, int rank, int world, const unsigned long long* table, unsigned long long parity) { \
        pdl_begin();                                                                                          \
        one_shot_all_reduce<T>(data, n_vec, rank, world, table, parity);                                     \
    }
#define AR_NORM_KERNEL(T, NAME)                                                                              \
    extern "C" __global__ void __launch_bounds__(1024) all_reduce_add_rms_norm_##NAME(                       \
        T* data, T* residual, T* out, const T* weight, int rows, int hidden, float eps, int rank, int world, \
        const unsigned long long* table, unsigned long long parity) {                                        \
        pdl_begin();                                                                                          \
        one_shot_all_reduce_add_rms_norm<T>(data, residual, out, weight, rows, hidden, eps, rank, world, table, \
                                            parity);                                                          \
    }
AR_KERNEL(bf16, bf16)
AR_KERNEL(f16, f16)
AR_NORM_KERNEL(bf16, bf16)
AR_NORM_KERNEL(f16, f16)
