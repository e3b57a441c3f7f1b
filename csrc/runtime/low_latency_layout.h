// The low-latency region of a rank's buffer (Buffer(low_latency=True)): its
// size formula and the offset of every field. layout.h appends it after the
// normal-mode regions; offsets here are from the buffer base.
//
// Receive side of rank d; every array indexed by source s is written by s:
//   control  [2] uint64                    this rank's LL op counter and the blocks-done counter (local only)
//   arrive   [R] uint64                    arrive[s] += 1 per block of s per LL op (counters only grow)
//   count    [2 parities][R] uint64        tokens s passed to the dispatch of that parity (tagged, see below)
//   signature [2 parities][R] uint64       what s's op of that parity runs (kernels/utils.cuh signature_bits)
//   dispatch [2][R][T_ll] slots            per token: meta (K tagged ids uint64, K weights fp32), then the row:
//                                          bf16 [H], or fp8 [H] followed by fp32 scales [H/128]
//   combine  [2][R][T_ll][H] bf16          partial sum of d's experts' rows for token t of rank s
// Parity = op counter & 1: a peer can be at most one LL op ahead (every op
// waits for every peer), so it never writes slots still being read.
// Tagged words (count, ids) hold the op's tag (kernels/low_latency.cu) in their high 32 bits and the
// value in the low 32: receivers may read them before the sender's signal.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define TORCH_EP_LL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TORCH_EP_LL_HOST_DEVICE inline
#endif

namespace torch_ep {

constexpr int64_t kLowLatencyMetaBytes = 384;  // K <= 32 tagged ids (uint64) + K weights (fp32)
constexpr int64_t kLowLatencyAlign = 128;

struct LowLatencyLayout {
  int num_ranks = 0, hidden = 0, max_tokens = 0;
  int64_t dispatch_slot_bytes = 0, combine_slot_bytes = 0;
  int64_t control_offset = 0, arrive_offset = 0, count_offset = 0, signature_offset = 0, dispatch_offset = 0,
          combine_offset = 0;
  int64_t total_bytes = 0;  // of the region

  TORCH_EP_LL_HOST_DEVICE bool enabled() const { return total_bytes > 0; }
  TORCH_EP_LL_HOST_DEVICE uint64_t* op_counter(char* base) const {
    return reinterpret_cast<uint64_t*>(base + control_offset);
  }
  TORCH_EP_LL_HOST_DEVICE unsigned int* done_counter(char* base) const {
    return reinterpret_cast<unsigned int*>(base + control_offset + 8);
  }
  TORCH_EP_LL_HOST_DEVICE uint64_t* arrive(char* base, int src) const {
    return reinterpret_cast<uint64_t*>(base + arrive_offset) + src;
  }
  TORCH_EP_LL_HOST_DEVICE uint64_t* count(char* base, int parity, int src) const {
    return reinterpret_cast<uint64_t*>(base + count_offset) + parity * num_ranks + src;
  }
  TORCH_EP_LL_HOST_DEVICE uint64_t* signature(char* base, int parity, int src) const {
    return reinterpret_cast<uint64_t*>(base + signature_offset) + parity * num_ranks + src;
  }
  TORCH_EP_LL_HOST_DEVICE char* dispatch_slot(char* base, int parity, int src, int token) const {
    return base + dispatch_offset +
           ((int64_t(parity) * num_ranks + src) * max_tokens + token) * dispatch_slot_bytes;
  }
  TORCH_EP_LL_HOST_DEVICE char* combine_slot(char* base, int parity, int src, int token) const {
    return base + combine_offset + ((int64_t(parity) * num_ranks + src) * max_tokens + token) * combine_slot_bytes;
  }
};

inline int64_t ll_align(int64_t bytes, int64_t to) { return (bytes + to - 1) / to * to; }

// The region for R ranks, hidden H and T_ll tokens per rank, placed at `offset`.
inline LowLatencyLayout make_low_latency_layout(int64_t num_ranks, int64_t hidden, int64_t max_tokens,
                                                int64_t offset) {
  LowLatencyLayout l;
  l.num_ranks = static_cast<int>(num_ranks);
  l.hidden = static_cast<int>(hidden);
  l.max_tokens = static_cast<int>(max_tokens);
  const int64_t row_bytes = ll_align(hidden * 2, 16);  // bf16; an fp8 row with its scales is never larger
  l.dispatch_slot_bytes = kLowLatencyMetaBytes + row_bytes;
  l.combine_slot_bytes = row_bytes;
  int64_t at = offset;
  auto take = [&at](int64_t bytes) {
    const int64_t start = at;
    at = ll_align(at + bytes, kLowLatencyAlign);
    return start;
  };
  l.control_offset = take(16);
  l.arrive_offset = take(num_ranks * 8);
  l.count_offset = take(2 * num_ranks * 8);
  l.signature_offset = take(2 * num_ranks * 8);
  l.dispatch_offset = take(2 * num_ranks * max_tokens * l.dispatch_slot_bytes);
  l.combine_offset = take(2 * num_ranks * max_tokens * l.combine_slot_bytes);
  l.total_bytes = at - offset;
  return l;
}

}  // namespace torch_ep
