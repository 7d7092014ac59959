// Shared device helpers: dtype conversion, 16-byte vectors of 8 elements, warp/block reductions.
// Every kernel computes in fp32 and rounds once on store; bf16 and fp16 differ only in these helpers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef __half f16;

#define FULL_MASK 0xffffffffu

// Programmatic dependent launch (sm_90+). The decode CUDA graph links consecutive kernels of ours with
// programmatic edges (mpillm/cuda/graphs.py), so a kernel's blocks may be scheduled while the kernel before
// it is still running: its launch latency and its first weight loads then hide behind that one.
// The contract every __global__ in cuda_src keeps:
//   - pdl_wait() comes before the kernel's first access to memory that another kernel writes or reads
//     (activations, KV cache, scratch, flags). Once it returns, every kernel before this one has finished (each
//     finished only after its own wait). Only weights, which no kernel writes, and the step's metadata (ids,
//     positions, slots, block tables: the host uploads them before the graph's first kernel starts) may be read
//     before it. One exception, gemv_quant.cu's PreNormStage: data written two or more kernels back, read
//     through L2, never written by this kernel or the one just before it. That holds only because the kernel
//     just before it is a gemv_quant.cu kernel that lets its dependents start late (pdl_begin_late), once its
//     own wait has returned: every one but Q4_0's and Q4_1's one-token x1_linear kernels (the model folds such a
//     pre-norm only after one: Kernels.starts_dependents_late).
//   - Every block reaches it, also blocks with no work: a kernel that could finish without waiting would let
//     the next one start before the one before it had finished (the chain of waits is what orders them).
//   - pdl_launch_dependents() lets the next kernel's blocks be scheduled; it comes first (pdl_begin), so that
//     they can be placed, and load their first weights, while this kernel waits and runs. (With it after the
//     wait, a kernel's dependents could start only once the kernel before it had finished: measured on an H100,
//     the bf16 8B step at one token ran 3% slower.)
// Without a programmatic edge (eager launches, prefill, sm_80) both are no-ops.
//
// MPILLM_TRACE (scripts/bench.py --timeline only; mpillm/cuda/trace.py): every block's thread 0 records when it
// reached pdl_wait and when the wait returned, and the kernels with a trace_end() when they ended, so that a decode
// graph's timeline can be read back (the lent machines have no nsys). Without the define none of it is compiled.
#ifdef MPILLM_TRACE
// Records of 4 u64: %gridid, kind << 63 | %smid << 32 | block, two %globaltimer ns (kind 0: wait entered, returned;
// kind 1: the block's end, twice). Thread 0 claims a pair of slots from the counter as it reaches the wait
// (pdl_wait); the end record (trace_end, or TraceEndAtExit: the projection, decode attention and sampling kernels)
// takes the second. Past cap nothing is written.
// recs null: off. In constant memory (one copy per module; the host sets it between graph launches), so that
// reading it before the wait is no trip to memory. (%gridid names a graph node, the same on every replay, so it
// cannot place records by itself.)
struct TraceBuf {
    unsigned long long* recs;
    unsigned int* count;
    unsigned int cap, pad;
};
extern "C" {
__constant__ TraceBuf mpillm_trace;
}
__device__ __forceinline__ unsigned long long trace_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned int& trace_pair() {
    __shared__ unsigned int pair;  // thread 0's: claimed at the wait, its second slot used by trace_end
    return pair;
}
// The slot pair's index, or ~0 (off). atom.inc (wrapping at 2^31, past any cap), not an add: ptxas turns an add
// (and an inc that cannot wrap) into a warp-aggregated add whose result is shuffled at once, before the wait.
__device__ __forceinline__ unsigned int trace_claim() {
    if (threadIdx.x != 0 || mpillm_trace.recs == nullptr) return 0xffffffffu;
    unsigned int pair;
    asm volatile("atom.global.inc.u32 %0, [%1], 0x7fffffff;" : "=r"(pair) : "l"(mpillm_trace.count));
    return pair;
}
__device__ __forceinline__ void trace_put(unsigned int pair, unsigned int second, unsigned long long a,
                                          unsigned long long b) {
    const TraceBuf tb = mpillm_trace;
    const unsigned long long slot = 2ull * pair + second;
    if (tb.recs == nullptr || pair == 0xffffffffu || slot >= tb.cap) return;
    unsigned long long grid;
    unsigned int smid;
    asm volatile("mov.u64 %0, %%gridid;" : "=l"(grid));
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    const unsigned int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    ulonglong2* r = reinterpret_cast<ulonglong2*>(tb.recs + 4 * slot);
    r[0] = make_ulonglong2(grid, (unsigned long long)second << 63 | (unsigned long long)smid << 32 | block);
    r[1] = make_ulonglong2(a, b);
}
__device__ __forceinline__ void trace_end() {
    if (threadIdx.x != 0) return;
    const unsigned long long t = trace_now();
    trace_put(trace_pair(), 1, t, t);
}
#else
__device__ __forceinline__ void trace_end() {}
#endif
// Declared first in a kernel's body: stamps the block's end at whichever return it leaves by (trace builds only).
struct TraceEndAtExit {
    __device__ __forceinline__ ~TraceEndAtExit() { trace_end(); }
};

__device__ __forceinline__ void pdl_wait() {
#ifdef MPILLM_TRACE
    // The slot's atomic goes out before the wait, its result is needed only after the second stamp: the wait and
    // its stamps never queue behind the counter (hundreds of blocks placed at once serialise on it).
    const unsigned long long t0 = trace_now();
    const unsigned int pair = trace_claim();
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
#ifdef MPILLM_TRACE
    if (threadIdx.x == 0) {
        const unsigned long long t1 = trace_now();
        trace_pair() = pair;
        trace_put(pair, 0, t0, t1);
    }
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// A hint, not a read: the line holding p into L2 (the point of coherence, where later writes land too), so a
// load after the PDL wait finds it there instead of in HBM. Allowed before the wait on any address.
__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}
// The usual kernel prologue: let the next kernel be scheduled, then wait for the kernels before.
__device__ __forceinline__ void pdl_begin() {
    pdl_launch_dependents();
    pdl_wait();
}
// The other order: the next kernel is scheduled only once the kernels before this one have finished, so it may
// read what they wrote before its own wait (gemv_quant.cu's PreNormStage, after a quantized projection).
__device__ __forceinline__ void pdl_begin_late() {
    pdl_wait();
    pdl_launch_dependents();
}

// The token an input id stands for: itself, or for a fed id (< 0) row -1 - id of `fed`, the ids the previous
// step sampled on the device (the host launches a decode step before reading them back); -1, no token, for a
// fed id without `fed`. embedding.cu and norm.cu's fused first-layer kernel read ids through it.
__device__ __forceinline__ int input_token(int id, const int* fed) {
    return id >= 0 ? id : fed != nullptr ? fed[-1 - id] : -1;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(f16 x) { return __half2float(x); }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ f16 from_float<f16>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16_rn(x); }

// Two packed 16-bit values (one 32-bit word) <-> two floats.
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t w);
template <> __device__ __forceinline__ float2 unpack2<bf16>(uint32_t w) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
}
template <> __device__ __forceinline__ float2 unpack2<f16>(uint32_t w) {
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
}
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<bf16>(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<f16>(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
}

// 16 bytes = 8 elements of a 16-bit type: the unit of every vectorised load in this project.
template <typename T> __device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
    float2 a = unpack2<T>(v.x), b = unpack2<T>(v.y), c = unpack2<T>(v.z), d = unpack2<T>(v.w);
    f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y; f[4] = c.x; f[5] = c.y; f[6] = d.x; f[7] = d.y;
}
template <typename T> __device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    uint4 v;
    v.x = pack2<T>(f[0], f[1]); v.y = pack2<T>(f[2], f[3]);
    v.z = pack2<T>(f[4], f[5]); v.w = pack2<T>(f[6], f[7]);
    return v;
}

// SiLU in fp32, one expression for every kernel that applies it (so fused and unfused paths agree bitwise).
__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the whole block (any blockDim.x that is a multiple of 32, up to 1024); every thread gets it.
// `scratch` holds 32 floats; the leading barrier lets callers reuse it back to back.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}
