// Vocab-parallel embedding lookup: each rank holds rows [vocab_start, vocab_start + vocab_local) of the
// table and writes zeros for ids it does not own, so the all-reduce over ranks yields the full lookup.
#include "common.cuh"

// grid: one block per token. Rows are copied as raw 16-bit words, so one kernel serves bf16 and fp16.
// An id < 0 is fed: -1 - j names row j of `fed`, the ids the previous step sampled on the device, so the
// host can launch a decode step before it has read the tokens it continues from. Without `fed` (null) a
// negative id owns no row, like any id outside the shard.
// zero (null: none): a buffer of out's shape set to zeros, the residual stream that the tensor-parallel step's
// first all-reduce then adds the sum into (the all-reduce fused with the residual add and the first norm).
extern "C" __global__ void __launch_bounds__(256)
embedding_b16(uint16_t* __restrict__ out, uint16_t* __restrict__ zero, const int* __restrict__ ids,
              const int* __restrict__ fed, const uint16_t* __restrict__ table, int vocab_start, int vocab_local,
              int hidden) {
    pdl_begin();
    const int t = blockIdx.x;
    const int id = ids[t];
    const int local = input_token(id, fed) - vocab_start;
    const bool owned = local >= 0 && local < vocab_local && (id >= 0 || fed != nullptr);
    uint16_t* dst = out + (size_t)t * hidden;
    const uint16_t* src = table + (size_t)(owned ? local : 0) * hidden;
    if ((hidden & 7) == 0) {  // rows are 16-byte aligned: copy 8 elements per access
        const int n_vec = hidden >> 3;
        for (int v = threadIdx.x; v < n_vec; v += blockDim.x) {
            uint4 x = owned ? reinterpret_cast<const uint4*>(src)[v] : make_uint4(0, 0, 0, 0);
            reinterpret_cast<uint4*>(dst)[v] = x;
            if (zero) reinterpret_cast<uint4*>(zero + (size_t)t * hidden)[v] = make_uint4(0, 0, 0, 0);
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            dst[i] = owned ? src[i] : 0;
            if (zero) zero[(size_t)t * hidden + i] = 0;
        }
    }
}
