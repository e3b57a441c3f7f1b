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

constexpr int kMaxRanks = 8;          // ranks of one NVLink domain; also the width of per-token rank masks
constexpr int kMaxTopk = 32;          // top-k entries a metadata row can carry
constexpr int kScaleBlock = 128;      // FP8 columns that share one fp32 scale
constexpr int kMaxDataBlocks = 256;   // blocks a data kernel may run (num_sms); sizes the per-block trace
constexpr int kChunkTokens = 32;      // tokens the notify kernel summarises with one warp ballot
constexpr int kSignatureWords = 4;    // what ranks must agree on for one op (see intranode.cuh)
constexpr int kWindowWords = 3;       // a notify record's receive window: rows at, scales at, capacity
constexpr int64_t kWindowUnit = 16;   // bytes of the window's offsets' unit
constexpr int64_t kRegionAlign = 128;

TORCH_EP_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
TORCH_EP_HOST_DEVICE int64_t align_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Byte offsets (from the buffer base) of every region. "src" is the rank that
// writes a slot; everything but the staging rows is indexed by it directly:
//   notify_flag [R] u64                        epoch of src's latest notify record here
//   arrive      [2 parities][R] {u64 epoch, u64 signature}: src has entered an op (its earlier ops are done)
//   opened      [R] u64                        (epoch << 32) | chunks: dispatch chunks src sends here
//   landed      [R][T_max] {u64 first row, u64 (epoch << 32) | rows}: src's chunk c (dispatch: of its tokens,
//               combine: of the rows it returns) has landed here; dispatch's are rows [first row, first row +
//               rows) of those src sends here
//   notify      [2 parities][R][notify_stride] int32  src's notify record (fields below)
//   meta        [R-1 peer slots][T_max][meta_stride]  per received row: src token, K expert ids, K weights
//   data        [R-1 peer slots][T_max][slot_bytes]   one received row (or one column slice of a wide row)
//   recv        [R * T_max][slot_bytes] bytes, only in buffers made with zero_copy_recv: the memory that
//               dispatch's outputs are taken from (RecvRegion, runtime/buffer.h); every rank stores the rows
//               at their final row of the window the receiver published in its notify record
//   inputs_read [R] u64                        epoch of the latest combine in which src read this rank's y
//               from its combine region
//   combine     [R * T_max][slot_bytes] bytes, only in buffers made with zero_copy_combine: combine's y
//               (Buffer.combine_input), whose rows the homes read from here themselves
// Staging rows are indexed by peer slot: a rank keeps no rows for itself.
// A notify record from src, as read by rank d, holds:
//   [0, R)          rows src sends to each rank
//   [R, R+E/R)      top-k entries of src's tokens naming each of d's experts
//   then            bad expert ids: count (-1: src refused its arguments on the host), first one;
//                   then kSignatureWords of signature;
//   then            src's receive window: its recv_x and recv_x_scales in 16-byte units from its buffer's
//                   base, and their rows (0: src takes the rows through staging)
struct BufferLayout {
  int num_ranks, num_experts, hidden, max_tokens;
  int notify_stride, meta_stride;
  int64_t slot_bytes;
  int64_t notify_flag_offset, arrive_offset, opened_offset, landed_offset, notify_offset, meta_offset, data_offset;
  int64_t recv_offset, recv_rows;  // recv_rows: 0 without zero_copy_recv
  int64_t inputs_read_offset, combine_offset, combine_rows;  // combine_rows: 0 without zero_copy_combine
  int64_t total_bytes;
  LowLatencyLayout low_latency;  // empty unless the buffer was made with low_latency

  TORCH_EP_HOST_DEVICE int experts_per_rank() const { return num_experts / num_ranks; }
  TORCH_EP_HOST_DEVICE int record_expert_offset() const { return num_ranks; }
  TORCH_EP_HOST_DEVICE int record_bad_id_offset() const { return num_ranks + experts_per_rank(); }
  TORCH_EP_HOST_DEVICE int record_signature_offset() const { return record_bad_id_offset() + 2; }
  TORCH_EP_HOST_DEVICE int record_window_offset() const { return record_signature_offset() + kSignatureWords; }
  TORCH_EP_HOST_DEVICE int record_length() const { return record_window_offset() + kWindowWords; }

  // Where rank `dst` keeps the rows that rank `src` (!= dst) sends it.
  TORCH_EP_HOST_DEVICE static int peer_slot(int src, int dst) { return src - (src > dst ? 1 : 0); }

  TORCH_EP_HOST_DEVICE uint64_t* notify_flag(char* base, int src) const {
    return reinterpret_cast<uint64_t*>(base + notify_flag_offset) + src;
  }
  TORCH_EP_HOST_DEVICE uint64_t* arrive(char* base, int parity, int src) const {
    return reinterpret_cast<uint64_t*>(base + arrive_offset) + 2 * (int64_t(parity) * num_ranks + src);
  }
  TORCH_EP_HOST_DEVICE uint64_t* opened(char* base, int src) const {
    return reinterpret_cast<uint64_t*>(base + opened_offset) + src;
  }
  TORCH_EP_HOST_DEVICE uint64_t* chunk_landed(char* base, int src, int chunk) const {
    return reinterpret_cast<uint64_t*>(base + landed_offset) + 2 * (int64_t(src) * max_tokens + chunk);
  }
  TORCH_EP_HOST_DEVICE int* notify_record(char* base, int parity, int src) const {
    return reinterpret_cast<int*>(base + notify_offset) + (int64_t(parity) * num_ranks + src) * notify_stride;
  }
  TORCH_EP_HOST_DEVICE char* meta_row(char* base, int slot, int64_t row) const {
    return base + meta_offset + (int64_t(slot) * max_tokens + row) * meta_stride;
  }
  TORCH_EP_HOST_DEVICE char* data_slot(char* base, int slot, int64_t row) const {
    return base + data_offset + (int64_t(slot) * max_tokens + row) * slot_bytes;
  }
  TORCH_EP_HOST_DEVICE uint64_t* inputs_read(char* base, int src) const {
    return reinterpret_cast<uint64_t*>(base + inputs_read_offset) + src;
  }
  // Row `row` of a combine's y with rows row_bytes wide, in the combine region.
  TORCH_EP_HOST_DEVICE char* combine_row(char* base, int64_t row, int64_t row_bytes) const {
    return base + combine_offset + row * row_bytes;
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
                                       bool low_latency = false, bool zero_copy_recv = false,
                                       bool zero_copy_combine = false) {
  check_buffer_shape(num_ranks, num_experts, hidden, max_tokens);
  BufferLayout l{};
  l.num_ranks = static_cast<int>(num_ranks);
  l.num_experts = static_cast<int>(num_experts);
  l.hidden = static_cast<int>(hidden);
  l.max_tokens = static_cast<int>(max_tokens);
  l.notify_stride = static_cast<int>(align_up(l.record_length(), 4));
  l.meta_stride = static_cast<int>(align_up(kMetaWeightOffset + 4 * kMaxTopk, 16));
  l.slot_bytes = align_up(hidden * 2, 16);  // one bf16 row; FP8 rows with their scales also fit
  const int64_t peer_slots = num_ranks - 1;
  int64_t offset = 0;
  auto take = [&offset](int64_t bytes) {
    const int64_t at = offset;
    offset = align_up(offset + bytes, kRegionAlign);
    return at;
  };
  l.notify_flag_offset = take(num_ranks * 8);
  l.arrive_offset = take(2 * num_ranks * 16);
  l.opened_offset = take(num_ranks * 8);
  l.landed_offset = take(num_ranks * max_tokens * 16);  // a chunk holds at least one token
  l.notify_offset = take(2 * num_ranks * l.notify_stride * 4);
  l.meta_offset = take(peer_slots * max_tokens * l.meta_stride);
  l.data_offset = take(peer_slots * max_tokens * l.slot_bytes);
  l.recv_rows = zero_copy_recv ? num_ranks * max_tokens : 0;
  l.recv_offset = take(l.recv_rows * l.slot_bytes);
  l.inputs_read_offset = take(num_ranks * 8);
  l.combine_rows = zero_copy_combine ? num_ranks * max_tokens : 0;
  l.combine_offset = take(l.combine_rows * l.slot_bytes);
  if (low_latency) {
    l.low_latency = make_low_latency_layout(num_ranks, hidden, max_tokens, offset);
    take(l.low_latency.total_bytes);
  }
  l.total_bytes = offset;
  return l;
}

}  // namespace torch_ep
