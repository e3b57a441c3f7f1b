// Every host entry point of the CUDA kernels, with the argument structs they
// take. Plain C++ (no device code) so that ops_cuda.cpp and the runtime can
// include it.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "runtime/layout.h"

namespace torch_ep {

// The op a kernel runs for; named in error messages and part of the signature ranks compare.
enum class Op : int {
  kDispatch = 1, kCachedDispatch, kCombine, kPeerCopy,
  kLowLatencyDispatch, kLowLatencyCachedDispatch, kLowLatencyCombine,
  kCombineFromRegion  // combine whose y is Buffer.combine_input (every rank's must be)
};

inline bool is_low_latency(Op op) {
  return op == Op::kLowLatencyDispatch || op == Op::kLowLatencyCachedDispatch || op == Op::kLowLatencyCombine;
}

// Element type of the rows combine sums.
enum class FloatType : int { kBFloat16, kHalf, kFloat, kDouble };

// What a kernel found wrong, reported to the host.
enum ErrorCode : int { kNoError = 0, kBadExpertId, kSignatureMismatch, kCapacityExceeded, kTimeout, kRefused };

// The exact-mode notify kernel's answer, in host-mapped memory, where the host waits for `tag`.
struct NotifyResult {
  int num_recv_rows;
  int error;        // ErrorCode
  int error_rank;   // the rank whose input was rejected, or the silent peer (timeout)
  int error_value;  // the bad expert id, or the index of the signature word that differs
  int own_bad_ids;  // this rank's top-k entries outside [-1, E)
  int own_bad_id;   // the first of them
  uint64_t tag;     // written last: the host's sequence number of this dispatch
};

// Device words of one buffer that only its own rank touches.
struct Control {
  uint64_t epoch;        // ops completed on this buffer; the running op's epoch is epoch + 1
  uint64_t abort_epoch;  // set to an op's epoch by its notify kernel when ranks must not move data
  uint32_t blocks_done;  // blocks of the running data kernel that have finished
  uint32_t send_units;     // data kernels: chunks the sender blocks have claimed
  uint32_t receive_units;  // data kernels: what the receivers have claimed (dispatch: (chunk, part) units of
                           // landed rows; combine: tokens to reduce)
  uint32_t failed;       // set, never cleared, when an op failed (fail_op): every wait of every kernel gives up;
                         // its setter alone writes the failure record
  uint64_t notify_ready; // epoch whose layout the notify kernel's last block has finished (the others then
                         // write send_pos)
  uint32_t notify_counted; // notify blocks that have counted their tokens; the last one finishes the layout
  int notify_verdict;    // ErrorCode of that layout
  NotifyResult answer;   // the exact-mode answer, when the data kernel queued behind notify relays it to the host
  uint32_t read_blocks;  // combine from the combine region: blocks done reading the peers' y
  // followed by the notify kernel's per-block partial counts: notify_scratch_ints() int32
};

// Per notify block: entries per expert [E], rows per rank [R], bad ids (count, first index).
TORCH_EP_HOST_DEVICE int notify_partial_ints(const BufferLayout& layout) { return layout.num_experts + layout.num_ranks + 2; }
inline size_t notify_scratch_ints(const BufferLayout& layout, int num_sms) {
  return static_cast<size_t>(num_sms) * notify_partial_ints(layout);
}

// Where a dispatch writes what it receives.
struct DispatchOutputs {
  char* recv_x;               // [N, row_bytes]
  float* recv_x_scales;       // [N, num_scales] (FP8) or nullptr
  int64_t* recv_topk_idx;     // [N, K] (first pass of dispatch) or nullptr
  float* recv_topk_weights;   // [N, K]
  int* recv_src_idx;          // [N]
  int num_recv_rows;          // N (capacity in the no-host-sync mode)
};

// Host-mapped: an error a kernel found with no host waiting to hear it. A
// buffer has two: `deferred` for errors that leave it usable (the host raises
// and clears it at the next op), `failure` for the one that failed it
// (fail_op; never cleared). `code` is written last.
struct DeferredError {
  int code;       // ErrorCode, 0 while none
  int op;         // Op
  int peer;       // kTimeout: the silent rank; kSignatureMismatch: the rank that differs; kBadExpertId: its holder;
                  // kRefused: the rank that refused its arguments
  int field;      // kSignatureMismatch: the SignatureWord that differs
  int64_t value;  // kCapacityExceeded: rows received; kSignatureMismatch: this rank's word; kBadExpertId: the id
  int64_t other;  // kCapacityExceeded: num_worst_tokens; kSignatureMismatch: the peer's word;
                  // kBadExpertId: num_experts
};

// The op's name in error messages.
inline const char* op_name(Op op) {
  switch (op) {
    case Op::kDispatch: return "ep.dispatch";
    case Op::kCachedDispatch: return "ep.cached_dispatch";
    case Op::kCombine: return "ep.combine";
    case Op::kLowLatencyDispatch: return "ep.low_latency_dispatch";
    case Op::kLowLatencyCachedDispatch: return "ep.low_latency_cached_dispatch";
    case Op::kLowLatencyCombine: return "ep.low_latency_combine";
    case Op::kCombineFromRegion: return "ep.combine (y from Buffer.combine_input)";
    default: return "peer_copy";
  }
}

// Phase timestamps a kernel records when the buffer was made with TORCH_EP_TRACE set (profiling):
// trace[block][event] = %globaltimer ns. "last" events keep the latest warp's time.
enum TraceEvent : int {
  kTraceStart = 0,      // data kernel: entered
  kTraceSendReady,      // senders: planned and allowed to write into peers
  kTraceFirstStep,      // senders: first progress raised
  kTraceStoresIssued,   // senders (last): every row stored
  kTraceSendDone,       // senders (last): final progress raised
  kTraceFirstLanded,    // receivers: first row seen landed (low-latency: every peer's signal seen)
  kTraceReceiveDone,    // receivers (last): every row copied out or reduced
  kTraceEnd,            // data kernel: leaving
  kTraceNotifyStart,    // notify kernel (block 0): entered
  kTraceNotifyCounted,  //   local counts scanned
  kTraceNotifyPublished,//   records written to every peer
  kTraceNotifyArrived,  //   every peer's record here
  kTraceNotifyEnd,      //   leaving
  kTraceMasksBuilt,     // low-latency dispatch: expert masks of what landed built
  kTraceEvents = 16
};

// What a kernel needs to reach every rank's buffer.
struct BufferRef {
  char* const* peers;      // device array [R]: base of each rank's buffer, own included
  Control* control;        // device-local words of this buffer
  DeferredError* deferred; // device view of the host-mapped error that leaves the buffer usable
  DeferredError* failure;  // device view of the host-mapped error that failed the buffer
  BufferLayout layout;
  int rank;
  int num_sms;             // blocks of the data kernels (<= kMaxDataBlocks)
  int step_items;          // tokens (dispatch) or rows (combine) a block sends between progress signals
  uint64_t timeout_ns;     // spin-wait limit before a kernel fails the op
  Op op;
  unsigned long long* trace; // [kMaxDataBlocks][kTraceEvents] phase timestamps, or nullptr (see TraceEvent)
};

// What ranks must agree on for one op; compared across ranks before data moves.
enum SignatureWord : int { kSigOp = 0, kSigDtype, kSigRowBytes, kSigTopk };
struct Signature {
  int words[kSignatureWords];  // by SignatureWord: Op, at::ScalarType, row bytes, top-k (dispatch) or 0
};

// What a signature word is, in error messages.
inline const char* signature_word_name(int word) {
  static const char* const kNames[kSignatureWords] = {"op", "dtype", "row width", "top-k"};
  return kNames[word >= 0 && word < kSignatureWords ? word : 0];
}

// Where a rank wants the rows of a dispatch (zero_copy_recv): its recv_x and recv_x_scales, in kWindowUnit bytes
// from its buffer's base, and their rows; capacity 0: every row goes through its staging rows.
struct RecvWindow {
  int rows_at, scales_at, capacity;
};

struct NotifyArgs {
  const int64_t* topk_idx;   // [T, K]
  int num_tokens, num_topk;
  int expert_alignment;
  int num_worst_tokens;      // 0: exact mode
  NotifyResult* result;      // exact mode: device view of the host-mapped answer, or &control->answer when the
                             // data kernel relays it; nullptr otherwise
  uint64_t result_tag;       // the host's tag, or 0 for the device copy
  Signature signature;
  RecvWindow window;         // this rank's, published with its record
  int* rank_prefix;          // out [R+1, R]
  int* num_recv_per_expert;  // out [E/R]
  int* send_pos;             // out [T, R]
  bool refused;              // the host refused this rank's arguments: its record says so (every rank then rejects
                             // the call) and it has no tokens
};

// One pass of dispatch or cached_dispatch over the column slice
// [col_offset, col_offset + col_bytes) of each row.
struct DispatchArgs {
  const char* x;               // [T, row_bytes]
  int64_t row_bytes;
  int64_t col_offset;
  int col_bytes;               // multiple of 16, <= slot_bytes
  const float* x_scales;       // [T, num_scales] (FP8 only; single pass) or nullptr
  int num_scales;
  bool with_meta;              // dispatch's first pass: top-k ids and weights travel with the rows
  const int64_t* topk_idx;     // [T, K]
  const float* topk_weights;   // [T, K]
  int num_topk;
  int num_tokens;
  const int* send_pos;         // [T, R]
  const int* rank_prefix;      // [R+1, R]
  DispatchOutputs out;
  bool handshake;              // no notify kernel ran first: exchange arrive flags (and signatures)
  bool zero_padding;           // cached_dispatch: padding rows get zeros (their gradient)
  bool rows_in_place;          // this rank published a window (out.recv_x and out.recv_x_scales): the peers store
                               // the rows and scales there, at their final row; only metadata is staged
  bool peer_windows;           // dispatch after its notify kernel: a peer's rows below its window's capacity go
                               // there, the others to its staging rows
  int fill_from;               // dispatch_fill: the output rows from here on are the ones to fill
  NotifyResult* relay;         // exact mode: copy control->answer here (host-mapped) with relay_tag, or nullptr
  uint64_t relay_tag;
  Signature signature;
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
  const int* rank_prefix; // [R+1, R]
  char* out;              // [T, row_bytes]
  bool from_region;       // every rank's y is in its combine region: homes read the peers' rows there
  Signature signature;
};

// layout.cu; first_bad_entry (preset to the largest value) receives the flat index of the first
// expert id outside [-1, num_experts).
void launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts,
                                int num_ranks, int* num_tokens_per_rank, int* num_tokens_per_expert,
                                bool* is_token_in_rank, unsigned long long* first_bad_entry, cudaStream_t stream);

// intranode_notify.cu
void launch_notify_dispatch(const BufferRef& buf, const NotifyArgs& args, cudaStream_t stream);
// intranode_dispatch.cu
void launch_dispatch(const BufferRef& buf, const DispatchArgs& args, cudaStream_t stream);
// Exact-mode dispatch after a data kernel that had too few output rows: writes output rows
// [fill_from, N) from x (this rank's rows) and from this rank's staging rows (peers' rows).
void launch_dispatch_fill(const BufferRef& buf, const DispatchArgs& args, cudaStream_t stream);
// intranode_combine.cu
void launch_combine(const BufferRef& buf, const CombineArgs& args, cudaStream_t stream);
// peer_copy.cu
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
  Signature signature;
};

// Moves rows of width `cols` (bf16, cols <= H, a multiple of 8) along a dispatch's layout.
struct LowLatencyCachedDispatchArgs {
  const void* x;               // [T, cols] bf16
  int cols, num_tokens, num_topk;
  const int* token_rows;       // [R, T_ll, K]
  const int* dest_ranks;       // [T]
  void* out;                   // [M, cols] bf16, zero where no entry points (zeroed by the caller)
  Signature signature;
};

struct LowLatencyCombineArgs {
  const void* y;               // [M, cols] bf16
  const float* weights;        // [M]
  int cols, num_tokens, num_topk;
  const int* token_rows;       // [R, T_ll, K]
  const int* dest_ranks;       // [T]
  void* out;                   // [T, cols] bf16
  Signature signature;
};

void launch_low_latency_dispatch(const BufferRef& buf, const LowLatencyDispatchArgs& args, cudaStream_t stream);
void launch_low_latency_cached_dispatch(const BufferRef& buf, const LowLatencyCachedDispatchArgs& args,
                                        cudaStream_t stream);
void launch_low_latency_combine(const BufferRef& buf, const LowLatencyCombineArgs& args, cudaStream_t stream);

}  // namespace torch_ep
