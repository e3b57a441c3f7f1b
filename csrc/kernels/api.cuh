// Every host entry point of the CUDA kernels, with the argument structs they
// take. Plain C++ (no device code) so that ops_cuda.cpp and the runtime can
// include it.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "runtime/layout.h"

namespace torch_ep {

// The op a kernel runs for; named in timeout messages.
enum class Op : int {
  kDispatch, kCachedDispatch, kCombine, kPeerCopy,
  kLowLatencyDispatch, kLowLatencyCachedDispatch, kLowLatencyCombine
};

// Element type of the rows combine sums.
enum class FloatType : int { kBFloat16, kHalf, kFloat };

// What a kernel needs to reach every rank's buffer.
struct BufferRef {
  char* const* peers;   // device array [R]: base of each rank's buffer, own included
  uint64_t* epoch;      // device-local op counter, bumped by the first kernel of each op (and pass)
  BufferLayout layout;
  int rank;
  int num_sms;          // blocks of the data kernels
  uint64_t timeout_ns;  // spin-wait limit before a kernel traps
  Op op;
};

struct NotifyArgs {
  const int64_t* topk_idx;   // [T, K]
  int num_tokens, num_topk;
  int expert_alignment;
  int num_worst_tokens;      // 0: exact mode (publish the row count to host_count)
  int* host_count;           // device view of the host-mapped counter; exact mode only
  int* rank_prefix;          // out [R+1, R]
  int* num_recv_per_expert;  // out [E/R]
  int* send_pos;             // out [T, R]
  int* recv_chunk_prefix;    // out [R, max_chunks+1]: rows of each source's chunks < c on this rank
};

// One pass of dispatch or cached_dispatch over the column slice
// [col_offset, col_offset + col_bytes) of each row.
struct DispatchArgs {
  const char* x;                   // [T, row_bytes]
  int64_t row_bytes;
  int64_t col_offset;
  int col_bytes;                   // multiple of 16, <= slot_bytes
  const float* x_scales;           // [T, num_scales] (FP8 only; single pass) or nullptr
  int num_scales;
  const int64_t* topk_idx;         // [T, K] dispatch's first pass; nullptr otherwise (no metadata)
  const float* topk_weights;       // [T, K]
  int num_topk;
  int num_tokens;
  const int* send_pos;             // [T, R]
  const int* rank_prefix;          // [R+1, R]
  const int* recv_chunk_prefix;    // dispatch: from the notify kernel; cached_dispatch: nullptr
  int num_recv_rows;               // N, rows of every recv_* output
  char* recv_x;                    // [N, row_bytes]
  float* recv_x_scales;            // [N, num_scales]
  int* recv_src_idx;               // [N]: written with metadata, read by cached_dispatch
  int64_t* recv_topk_idx;          // [N, K]
  float* recv_topk_weights;        // [N, K]
};

// One pass of combine over the column slice [col_offset, col_offset + col_bytes).
struct CombineArgs {
  const char* y;          // [N, row_bytes]
  int64_t row_bytes;
  int64_t col_offset;
  int col_bytes;
  FloatType dtype;
  int num_tokens;         // T
  int num_recv_rows;      // N
  const int* send_pos;    // [T, R]
  const int* recv_src_idx;  // [N]
  const int* rank_prefix;   // [R+1, R]
  char* out;              // [T, row_bytes]
};

// layout.cu
void launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts,
                                int num_ranks, int* num_tokens_per_rank, int* num_tokens_per_expert,
                                bool* is_token_in_rank, cudaStream_t stream);

// intranode.cu
void launch_barrier(const BufferRef& buf, cudaStream_t stream);
void launch_notify_dispatch(const BufferRef& buf, const NotifyArgs& args, cudaStream_t stream);
void launch_dispatch(const BufferRef& buf, const DispatchArgs& args, cudaStream_t stream);
void launch_combine(const BufferRef& buf, const CombineArgs& args, cudaStream_t stream);
void launch_peer_copy(const BufferRef& buf, const void* src, int64_t num_bytes, int num_sms, cudaStream_t stream);

// ---- low-latency mode (low_latency.cu; semantics in torch_ep/low_latency.py) ----
// Handles: token_rows [R, T_ll, K] int32 (receiver side), dest_ranks [T] int32 bitmasks (home side).

struct LowLatencyDispatchArgs {
  const void* x;               // [T, H] bf16
  const int64_t* topk_idx;     // [T, K]
  const float* topk_weights;   // [T, K]
  int num_tokens, num_topk;
  bool use_fp8;
  void* recv_x;                // [M, H] bf16, or fp8 e4m3 with use_fp8
  float* recv_scales;          // [M, H/128] (use_fp8 only)
  float* recv_weights;         // [M]
  int* expert_offsets;         // [E/R] cumulative row ends
  int* expert_counts;          // [E/R]
  int* token_rows;             // out [R, T_ll, K]
  int* dest_ranks;             // out [T]
};

// Moves rows of width `cols` (bf16, cols <= H, a multiple of 8) along a dispatch's layout.
struct LowLatencyCachedDispatchArgs {
  const void* x;               // [T, cols] bf16
  int cols, num_tokens, num_topk;
  const int* token_rows;       // [R, T_ll, K]
  const int* dest_ranks;       // [T]
  void* out;                   // [M, cols] bf16, zero where no entry points (zeroed by the caller)
};

struct LowLatencyCombineArgs {
  const void* y;               // [M, cols] bf16
  const float* weights;        // [M]
  int cols, num_tokens, num_topk;
  const int* token_rows;       // [R, T_ll, K]
  const int* dest_ranks;       // [T]
  void* out;                   // [T, cols] bf16
};

void launch_low_latency_dispatch(const BufferRef& buf, const LowLatencyDispatchArgs& args, cudaStream_t stream);
void launch_low_latency_cached_dispatch(const BufferRef& buf, const LowLatencyCachedDispatchArgs& args,
                                        cudaStream_t stream);
void launch_low_latency_combine(const BufferRef& buf, const LowLatencyCombineArgs& args, cudaStream_t stream);

}  // namespace torch_ep
