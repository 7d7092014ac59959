// The LL ("low latency", after NCCL's protocol) exchange of the one-shot all-reduce (allreduce.cu), shared with
// the decode GEMV (gemv.cu), whose epilogue can send its output tile itself. Each 4-byte word travels next to the
// call's flag in an 8-byte pair, two pairs per 16-byte line, and a store of 8 aligned bytes arrives whole, so a
// receiver that sees the flag in a pair has the word next to it.
//
// table (mpillm/cuda/ipc_allreduce.py): [AR_MAX_RANKS] buffer base pointers, this process's mappings of every
// rank's buffer, then this rank's call counters. A buffer holds [2 parities][world senders][slot_bytes]; a
// sender's slot holds 2 bytes for each byte of the message: message bytes 8v..8v+7 (word pair v) in line v.
#pragma once
#include "common.cuh"

#define AR_MAX_RANKS 8
#define AR_MAX_BLOCKS 64
// The plain all-reduce's grid and the fused one's largest (kernels.py AR_BLOCKS); block b owns rows b, b + 32, ...
#define AR_BLOCKS 32

// Peer data is re-read at the same addresses every other call: never from a (non-coherent) L1 line.
__device__ __forceinline__ uint4 ld_volatile16(const void* p) {
    uint4 v;
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
}
__device__ __forceinline__ void st_volatile16(void* p, uint4 v) {
    asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w)
                 : "memory");
}

struct ArCall {
    uint32_t flag;                 // this call's number
    unsigned long long region;     // byte offset of this call's parity region in every buffer
};

__device__ __forceinline__ uint32_t* ar_counters(const unsigned long long* __restrict__ table) {
    return reinterpret_cast<uint32_t*>(table[AR_MAX_RANKS]);
}

// The call numbered `flag`: odd numbers use the second parity region.
__device__ __forceinline__ ArCall ar_call_numbered(uint32_t flag, int world, unsigned long long slot_bytes) {
    return ArCall{flag, (flag & 1) ? (unsigned long long)world * slot_bytes : 0ull};
}

// The call whose number is counter `b` + 1 (the all-reduce block b's next call).
__device__ __forceinline__ ArCall ar_call_of(const unsigned long long* __restrict__ table, int world,
                                             unsigned long long slot_bytes, int b) {
    return ar_call_numbered(ar_counters(table)[b] + 1, world, slot_bytes);
}

// Before the PDL wait: block b's counter line into L2. Its value is written by the previous call (another kernel,
// maybe still running), so it is read only after the wait (ar_call_of); but the weights streamed between two calls
// may evict it, and after the wait the table, then the counter, are loaded one after the other. The table itself is
// written once by the host, before any graph runs, so it may be read here. (TP 2 b=1 +0.2% on 2 x H200.)
__device__ __forceinline__ void ar_prefetch(const unsigned long long* __restrict__ table, int b) {
    if (threadIdx.x == 0) prefetch_l2(ar_counters(table) + b);
}
// The collective kernels' prologue: pdl_begin with this block's ar_prefetch between its two halves.
__device__ __forceinline__ void ar_pdl_begin(const unsigned long long* __restrict__ table) {
    pdl_launch_dependents();
    ar_prefetch(table, blockIdx.x);
    pdl_wait();
}

// Line `line` (16 bytes: message words 2 line, 2 line + 1) of sender `from`'s slot in rank `to`'s buffer.
__device__ __forceinline__ uint4* ar_line(const unsigned long long* __restrict__ table, ArCall c,
                                          unsigned long long slot_bytes, int to, int from, size_t line) {
    return reinterpret_cast<uint4*>(table[to] + c.region + (unsigned long long)from * slot_bytes) + line;
}

// Message words a and b (line `line`) of this rank into every peer's slot for it. `table` may also be a copy of the
// table's buffer pointers in shared memory (gemv.cu's SendStage).
__device__ __forceinline__ void ar_send_line(const unsigned long long* __restrict__ table, ArCall c,
                                             unsigned long long slot_bytes, int rank, int world, size_t line,
                                             uint32_t a, uint32_t b) {
    const uint4 v = make_uint4(a, c.flag, b, c.flag);
    for (int r = 0; r < world; ++r)
        if (r != rank) st_volatile16(ar_line(table, c, slot_bytes, r, rank, line), v);
}

// Whether a line read back carries this call's flag in both its pairs.
__device__ __forceinline__ bool ar_arrived(const uint4& v, ArCall c) { return v.y == c.flag && v.w == c.flag; }

// A decode projection that sends its own output tiles (gemv.cu's SEND GEMV, gemv_quant.cu's one-token kernels): the
// fused all-reduce's buffers it writes into (mpillm/cuda/ipc_allreduce.py), and what it stages for that.
struct LlSend {
    const unsigned long long* table;
    unsigned long long slot_bytes;
    int rank, world;
};
#define LL_SEND_ROWS 16  // output rows of a tile: the projections' (GEMV_ROWS, QGEMV_ROWS)

// SEND's state, in shared memory, gathered early so that the tile's end makes no trip to memory: the peers' buffer
// bases (the table's pointers, which the host writes once: read before the PDL wait), the call number of each
// token's all-reduce block (token m's row is all-reduce block m % AR_BLOCKS's, whose counter numbers the call: read
// right after the wait, long before the end), and the tile's outputs as stored in y, sent from here. (It used to
// read y and the counters back at the end: a trip to L2 and a chain of two loads on every block's last step.)
// The counters were last written by the previous all-reduce, which finished before this kernel passed its PDL
// wait; the all-reduce this tile is for writes them only after its own wait, once this kernel has finished.
template <typename T, int NT>
struct SendStage {
    unsigned long long base[AR_MAX_RANKS];
    uint32_t flag[NT * 8];
    T out[NT * 8][LL_SEND_ROWS];  // [token][row - n0]
    static_assert(LL_SEND_ROWS == 16, "finish_small_m_tile stages a tile's outputs as [token][16 rows]");
};

template <typename T, int NT>
__device__ __forceinline__ void send_stage_bases(SendStage<T, NT>& st, const LlSend& s) {
    if (threadIdx.x < s.world) st.base[threadIdx.x] = s.table[threadIdx.x];
}
template <typename T, int NT>
__device__ __forceinline__ void send_stage_flags(SendStage<T, NT>& st, const LlSend& s, int M) {
    if (threadIdx.x < M) st.flag[threadIdx.x] = ar_counters(s.table)[threadIdx.x % AR_BLOCKS] + 1;
}

// y's columns n0..n0+15 of every token (st.out) into every peer's slot for this rank, as the fused all-reduce would
// have sent them: 4 elements (N % 8 == 0) per line of the slot.
template <typename T, int NT>
__device__ __noinline__ void send_tile(const SendStage<T, NT>& st, int n0, int M, int N, const LlSend& s) {
    __syncthreads();  // the stage's outputs, bases and flags are visible to the whole block
    for (int idx = threadIdx.x; idx < M * 4; idx += blockDim.x) {
        const int tok = idx >> 2, c4 = 4 * (idx & 3);
        if (n0 + c4 >= N) continue;
        const uint2 v = *reinterpret_cast<const uint2*>(&st.out[tok][c4]);
        const ArCall c = ar_call_numbered(st.flag[tok], s.world, s.slot_bytes);
        ar_send_line(st.base, c, s.slot_bytes, s.rank, s.world, ((size_t)tok * N + n0 + c4) / 4, v.x, v.y);
    }
}
