// The buffer runtime functions that the `_C` Python module exposes
// (bound in csrc/python_module.cpp). Only buffer_bytes exists in the CPU-only
// build; the others are defined by the CUDA build (runtime/buffer.cpp,
// ops_cuda.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace torch_ep {

// Bytes of device memory one rank's buffer needs.
// low_latency adds the low-latency region (runtime/low_latency_layout.h).
int64_t buffer_bytes(int64_t num_ranks, int64_t num_experts, int64_t hidden, int64_t max_tokens_per_rank,
                     bool low_latency, bool zero_copy_recv, bool zero_copy_combine);

// Allocates and zeroes this rank's buffer on `device`, registers it as `name`;
// returns its CUDA IPC handle (raw bytes).
std::string create_buffer(const std::string& name, int64_t device, int64_t rank, int64_t num_ranks,
                          int64_t num_experts, int64_t hidden, int64_t max_tokens_per_rank, int64_t num_bytes,
                          int64_t num_sms, double timeout_s, bool low_latency, bool zero_copy_recv,
                          bool zero_copy_combine, int64_t low_latency_num_sms);

// Maps every peer's buffer from `handles` (one per rank, own included).
void open_buffer(const std::string& name, const std::vector<std::string>& handles);

// Unmaps the peers' buffers (after a barrier of all ranks).
void close_buffer(const std::string& name);

// Frees this rank's memory and forgets `name`.
void free_buffer(const std::string& name);

// Waits for the buffer's device, then raises the error of any op that failed on it (Buffer.synchronize).
void check_buffer(const std::string& name);

// Profiling: the phase timestamps the buffer's kernels recorded since the last call ([kMaxDataBlocks,
// kTraceEvents] int64 ns on the CPU, 0 where none; see TraceEvent), then clears them.
at::Tensor take_trace(const std::string& name);

// The first num_rows rows of 2-byte elements of this rank's combine region (a buffer made with
// zero_copy_combine), as uint8 [num_rows, 2 * hidden]; a combine whose y views them reads them there.
at::Tensor combine_input(const std::string& name, int64_t num_rows);

// Buffer.dispatch refused this rank's arguments before the op (exact: without num_worst_tokens): the call's
// notify still runs and tells every peer, which then rejects the call too (ops_cuda.cpp refuse_dispatch).
void refuse_dispatch(const std::string& name, bool exact);

// Bandwidth ceiling: writes all of `src` (uint8, CUDA) into every peer's data region.
void peer_copy(const std::string& name, const at::Tensor& src, int64_t num_sms);

}  // namespace torch_ep
