// The device memory layout of one rank's communication buffer: the constants
// that bound it and the single formula for every region's size and offset.
// Plain C++ so that the CPU-only build can answer buffer_bytes() too; the
// accessors are usable from host and device code alike.
#pragma once

#include <cstddef>
#include <cstdint>

#include <c10/util/Exception.h>

#include "low_latency_layout.h"  // same folder: the CPU-only build has no csrc include path

#ifdef __CUDACC__
#define TORCH_EP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TORCH_EP_HOST_DEVICE inline
#endif

namespace torch_ep {

constexpr int kMaxRanks = 8;        // ranks of one NVLink domain; also the width of per-token rank masks
constexpr int kMaxTopk = 32;        // top-k entries a metadata row can carry
constexpr int kChunkTokens = 32;    // tokens per chunk, the unit of send/receive signalling (one warp ballot)
constexpr int kScaleBlock = 128;    // FP8 columns that share one fp32 scale
constexpr int64_t kRegionAlign = 128;

TORCH_EP_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
TORCH_EP_HOST_DEVICE int64_t align_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Byte offsets (from the buffer base) and strides of every region:
//   barrier      [R] uint64                      slot s written by rank s at each op's start
//   notify_flag  [R] uint64                      slot s written by rank s once its notify record is in place
//   chunk_flag   [R sources][max_chunks] uint64  epoch of the call whose chunk has landed
//   notify       [2 parities][R sources][notify_stride] int32
//   meta         [R sources][T_max][meta_stride] bytes: src token int32, K expert ids int32, K weights fp32
//   data         [R sources][T_max][slot_bytes]  one row (or one column slice of a wide row)
// A notify record from source s holds, for the receiving rank d:
//   [0, R)            rows s sends to each rank
//   [R]               tokens on s
//   [R+1, R+1+E/R)    entries of s's tokens for each of d's experts
//   [.., +max_chunks+1) exclusive prefix over s's chunks of rows sent to d
struct BufferLayout {
  int num_ranks, num_experts, hidden, max_tokens;
  int max_chunks, notify_stride, meta_stride;
  int64_t slot_bytes;
  int64_t barrier_offset, notify_flag_offset, chunk_flag_offset, notify_offset, meta_offset, data_offset;
  int64_t total_bytes;
  LowLatencyLayout low_latency;  // empty unless the buffer was made with low_latency

  TORCH_EP_HOST_DEVICE int experts_per_rank() const { return num_experts / num_ranks; }
  TORCH_EP_HOST_DEVICE int notify_expert_offset() const { return num_ranks + 1; }
  TORCH_EP_HOST_DEVICE int notify_chunk_offset() const { return num_ranks + 1 + experts_per_rank(); }

  TORCH_EP_HOST_DEVICE uint64_t* barrier(char* base, int src) const {
    return reinterpret_cast<uint64_t*>(base + barrier_offset) + src;
  }
  TORCH_EP_HOST_DEVICE uint64_t* notify_flag(char* base, int src) const {
    return reinterpret_cast<uint64_t*>(base + notify_flag_offset) + src;
  }
  TORCH_EP_HOST_DEVICE uint64_t* chunk_flag(char* base, int src, int chunk) const {
    return reinterpret_cast<uint64_t*>(base + chunk_flag_offset) + int64_t(src) * max_chunks + chunk;
  }
  TORCH_EP_HOST_DEVICE int* notify_record(char* base, int parity, int src) const {
    return reinterpret_cast<int*>(base + notify_offset) + (int64_t(parity) * num_ranks + src) * notify_stride;
  }
  TORCH_EP_HOST_DEVICE char* meta_row(char* base, int src, int64_t row) const {
    return base + meta_offset + (int64_t(src) * max_tokens + row) * meta_stride;
  }
  TORCH_EP_HOST_DEVICE char* data_slot(char* base, int src, int64_t row) const {
    return base + data_offset + (int64_t(src) * max_tokens + row) * slot_bytes;
  }
};

// Offsets of the fields inside one metadata row.
constexpr int kMetaSrcOffset = 0;
constexpr int kMetaIdxOffset = 4;
constexpr int kMetaWeightOffset = kMetaIdxOffset + 4 * kMaxTopk;

inline void check_buffer_shape(int64_t num_ranks, int64_t num_experts, int64_t hidden, int64_t max_tokens) {
  TORCH_CHECK(num_ranks >= 1 && num_ranks <= kMaxRanks, "torch_ep: num_ranks must be in [1, ", kMaxRanks,
              "], got ", num_ranks);
  TORCH_CHECK(num_experts > 0 && num_experts % num_ranks == 0, "torch_ep: num_experts (", num_experts,
              ") must be a positive multiple of num_ranks (", num_ranks, ")");
  TORCH_CHECK(hidden > 0, "torch_ep: hidden must be positive, got ", hidden);
  TORCH_CHECK(max_tokens > 0, "torch_ep: max_tokens_per_rank must be positive, got ", max_tokens);
}

inline BufferLayout make_buffer_layout(int64_t num_ranks, int64_t num_experts, int64_t hidden, int64_t max_tokens,
                                       bool low_latency = false) {
  check_buffer_shape(num_ranks, num_experts, hidden, max_tokens);
  BufferLayout l{};
  l.num_ranks = static_cast<int>(num_ranks);
  l.num_experts = static_cast<int>(num_experts);
  l.hidden = static_cast<int>(hidden);
  l.max_tokens = static_cast<int>(max_tokens);
  l.max_chunks = static_cast<int>(ceil_div(max_tokens, kChunkTokens));
  l.notify_stride = static_cast<int>(align_up(l.notify_chunk_offset() + l.max_chunks + 1, 4));
  l.meta_stride = static_cast<int>(align_up(kMetaWeightOffset + 4 * kMaxTopk, 16));
  l.slot_bytes = align_up(hidden * 2, 16);  // one bf16 row; FP8 rows with their scales also fit
  int64_t offset = 0;
  auto take = [&offset](int64_t bytes) {
    const int64_t at = offset;
    offset = align_up(offset + bytes, kRegionAlign);
    return at;
  };
  l.barrier_offset = take(num_ranks * 8);
  l.notify_flag_offset = take(num_ranks * 8);
  l.chunk_flag_offset = take(num_ranks * l.max_chunks * 8);
  l.notify_offset = take(2 * num_ranks * l.notify_stride * 4);
  l.meta_offset = take(num_ranks * max_tokens * l.meta_stride);
  l.data_offset = take(num_ranks * max_tokens * l.slot_bytes);
  if (low_latency) {
    l.low_latency = make_low_latency_layout(num_ranks, hidden, max_tokens, offset);
    take(l.low_latency.total_bytes);
  }
  l.total_bytes = offset;
  return l;
}

}  // namespace torch_ep
