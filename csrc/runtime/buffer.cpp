// Buffer lifetime (create, open, close, free) and the registry ops find buffers in.
#include "runtime/buffer.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "contract.h"
#include "runtime/python_module.h"

namespace torch_ep {
namespace {

constexpr double kHostTimeoutSlack_s = 5.0;
constexpr size_t kTraceBytes = sizeof(unsigned long long) * kMaxDataBlocks * kTraceEvents;
constexpr int kDefaultStepItems = 32;  // items a data-kernel block sends between progress signals

// TORCH_EP_STEP_ITEMS overrides the default, for tuning on new hardware.
int step_items() {
  static const int items = [] {
    const char* env = std::getenv("TORCH_EP_STEP_ITEMS");
    const int value = env != nullptr ? std::atoi(env) : 0;
    return value > 0 ? value : kDefaultStepItems;
  }();
  return items;
}

std::mutex registry_mutex;
std::unordered_map<std::string, std::shared_ptr<BufferState>>& registry() {
  static std::unordered_map<std::string, std::shared_ptr<BufferState>> buffers;
  return buffers;
}

// Frees whatever of `state` was allocated (also after a failed create).
void release_memory(BufferState& state) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(state.device));
  state.recv_region.reset();
  state.local_owner.reset();  // the memory goes with the last tensor over it
  if (state.control != nullptr) C10_CUDA_CHECK(cudaFree(state.control));
  if (state.host != nullptr) C10_CUDA_CHECK(cudaFreeHost(state.host));
  if (state.trace != nullptr) C10_CUDA_CHECK(cudaFree(state.trace));
  state.trace = nullptr;
  state.local = nullptr;
  state.control = nullptr;
  state.host = nullptr;
  state.host_device = nullptr;
}

// Unmaps the peers' memory; this rank's kernels that may still use it finish first.
void unmap_peers(BufferState& state) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(state.device));
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  for (int r = 0; r < static_cast<int>(state.peers.size()); ++r) {
    if (r != state.rank && state.peers[r] != nullptr) C10_CUDA_CHECK(cudaIpcCloseMemHandle(state.peers[r]));
  }
  state.peers.clear();
  if (state.peer_table != nullptr) C10_CUDA_CHECK(cudaFree(state.peer_table));
  state.peer_table = nullptr;
}

}  // namespace

RecvRegion::RecvRegion(std::shared_ptr<char> owner, char* base, int64_t bytes)
    : owner_(std::move(owner)), base_(base) {
  const int64_t usable = bytes / kAlign * kAlign;
  if (usable > 0) free_[0] = usable;
}

std::shared_ptr<RecvRegion::Block> RecvRegion::take(int64_t least, int64_t most) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto best = free_.end();
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (best == free_.end() || it->second > best->second) best = it;
  }
  if (best == free_.end() || best->second < least) return nullptr;
  const int64_t offset = best->first, bytes = std::min(best->second, align_up(most, kAlign));
  if (bytes < best->second) free_[offset + bytes] = best->second - bytes;
  free_.erase(best);
  return std::shared_ptr<Block>(new Block{shared_from_this(), base_ + offset, bytes});
}

void RecvRegion::give_back(int64_t offset, int64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto next = free_.lower_bound(offset);
  if (next != free_.end() && next->first == offset + bytes) {  // merge with the run after
    bytes += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {  // and with the run before
      prev->second += bytes;
      return;
    }
  }
  free_[offset] = bytes;
}

void RecvRegion::Block::shrink(int64_t keep) {
  const int64_t kept = align_up(keep, kAlign);
  if (kept >= bytes) return;
  region->give_back(data - region->base_ + kept, bytes - kept);
  bytes = kept;
}

RecvRegion::Block::~Block() {
  if (bytes > 0) region->give_back(data - region->base_, bytes);
}

std::shared_ptr<BufferState> lookup_buffer(const std::string& name) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry().find(name);
  return it == registry().end() ? nullptr : it->second;
}

std::shared_ptr<BufferState> find_buffer(const std::string& name) {
  auto state = lookup_buffer(name);
  TORCH_CHECK(state != nullptr, "torch_ep: no buffer named '", name, "' (created and not yet freed)");
  return state;
}

BufferRef BufferState::ref(Op op) const {
  TORCH_CHECK(is_open(), "torch_ep: buffer '", name, "' is not open (call open_buffer on every rank first)");
  check_not_broken();
  BufferRef r{};
  r.peers = peer_table;
  r.control = control;
  r.deferred = &host_device->deferred;
  r.failure = &host_device->failure;
  r.layout = layout;
  r.rank = rank;
  r.num_sms = is_low_latency(op) ? low_latency_num_sms : num_sms;
  r.step_items = step_items();
  r.timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
  r.op = op;
  r.trace = trace;
  return r;
}

namespace {

// A signature word as the message names it (an op, a dtype, bytes or a count).
std::string signature_value(int word, int64_t value) {
  switch (word) {
    case kSigOp: return op_name(static_cast<Op>(value));
    case kSigDtype: return type_name(static_cast<c10::ScalarType>(value));
    case kSigRowBytes: return std::to_string(value) + " bytes";
    default: return std::to_string(value);
  }
}

// e's rank as this rank's message names it.
std::string who(const DeferredError& e, const BufferState& b) {
  return e.peer == b.rank ? std::string("this rank") : "rank " + std::to_string(e.peer);
}

// What a kernel recorded, as the error names it.
std::string describe(const DeferredError& e, const BufferState& b) {
  const char* op = op_name(static_cast<Op>(e.op));
  std::ostringstream out;
  out << op << " on rank " << b.rank;
  switch (e.code) {
    case kTimeout:
      out << " timed out after " << b.timeout_s << " s waiting for rank " << e.peer << " (it never called " << op
          << ", called another op, destroyed its Buffer, or died)";
      break;
    case kSignatureMismatch:
      out << ": ranks disagree on the " << signature_word_name(e.field) << " of this call: rank " << e.peer
          << " has " << signature_value(e.field, e.other) << ", this rank " << signature_value(e.field, e.value);
      break;
    case kBadExpertId:
      out << ": " << who(e, b) << "'s topk_idx holds expert id " << e.value << ", outside [-1, num_experts="
          << e.other << ")";
      break;
    case kRefused:
      out << ": " << who(e, b) << kRejectedInput;
      break;
    case kCapacityExceeded:
      out << " received " << e.value << " rows but num_worst_tokens was " << e.other
          << "; rows past capacity were dropped (raise num_worst_tokens)";
      break;
    default:
      out << " failed on the device (code " << e.code << ")";
  }
  return out.str();
}

// The record in `slot`, or code kNoError; `clear` lets the next error be recorded.
DeferredError take_record(DeferredError* slot, bool clear) {
  volatile DeferredError* d = slot;
  DeferredError e{};
  e.code = d->code;
  if (e.code == kNoError) return e;
  std::atomic_thread_fence(std::memory_order_acquire);
  e.op = d->op;
  e.peer = d->peer;
  e.field = d->field;
  e.value = d->value;
  e.other = d->other;
  if (clear) d->code = kNoError;
  return e;
}

}  // namespace

void BufferState::raise_if_failed() {
  if (broken.empty()) {
    const DeferredError failure = take_record(&host->failure, /*clear=*/false);
    if (failure.code != kNoError) broken = "torch_ep: " + describe(failure, *this);
  }
  check_not_broken();
}

void BufferState::check_not_broken() const {
  TORCH_CHECK(broken.empty(), broken, "; this Buffer ('", name,
              "') can no longer be used: destroy it and build a new Buffer");
}

void BufferState::raise_deferred_error() {
  raise_if_failed();
  const DeferredError e = take_record(&host->deferred, /*clear=*/true);
  TORCH_CHECK(e.code == kNoError, "torch_ep: an earlier ", describe(e, *this));
}

NotifyResult BufferState::wait_notify(uint64_t tag, cudaStream_t stream) {
  // The notify kernel names a silent peer itself (after timeout_s); the host
  // deadline only catches a kernel that never ran, and a kernel that crashed
  // shows up through the stream's status.
  using clock = std::chrono::steady_clock;
  const auto deadline = clock::now() + std::chrono::duration<double>(timeout_s + kHostTimeoutSlack_s);
  auto next_status_check = clock::now();
  volatile NotifyResult* result = &host->result;
  while (result->tag != tag) {
    const auto now = clock::now();
    if (now < next_status_check) continue;
    next_status_check = now + std::chrono::microseconds(200);
    const cudaError_t status = cudaStreamQuery(stream);
    if (status != cudaSuccess && status != cudaErrorNotReady) {
      broken = std::string("torch_ep: a kernel failed: ") + cudaGetErrorString(status);
      TORCH_CHECK(false, "torch_ep: dispatch on rank ", rank, " failed on the device: ", cudaGetErrorString(status));
    }
    if (now > deadline) {
      broken = "torch_ep: a dispatch timed out on the host";
      TORCH_CHECK(false, "torch_ep: dispatch on rank ", rank, " timed out after ", timeout_s,
                  " s (its notify kernel never finished)");
    }
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  NotifyResult out{};
  out.num_recv_rows = result->num_recv_rows;
  out.error = result->error;
  out.error_rank = result->error_rank;
  out.error_value = result->error_value;
  out.own_bad_ids = result->own_bad_ids;
  out.own_bad_id = result->own_bad_id;
  out.tag = tag;
  return out;
}

std::string create_buffer(const std::string& name, int64_t device, int64_t rank, int64_t num_ranks,
                          int64_t num_experts, int64_t hidden, int64_t max_tokens_per_rank, int64_t num_bytes,
                          int64_t num_sms, double timeout_s, bool low_latency, bool zero_copy_recv,
                          bool zero_copy_combine, int64_t low_latency_num_sms) {
  const BufferLayout layout = make_buffer_layout(num_ranks, num_experts, hidden, max_tokens_per_rank, low_latency,
                                                 zero_copy_recv, zero_copy_combine);
  TORCH_CHECK(rank >= 0 && rank < num_ranks, "torch_ep: rank ", rank, " is outside [0, ", num_ranks, ")");
  TORCH_CHECK(num_bytes >= layout.total_bytes, "torch_ep: num_bytes (", num_bytes,
              ") is smaller than buffer_bytes(...) = ", layout.total_bytes);
  TORCH_CHECK(timeout_s > 0, "torch_ep: timeout_s must be positive, got ", timeout_s);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, static_cast<int>(device)));
  // Receivers spin on flags that senders of other blocks raise: all blocks must be resident at once.
  const int max_blocks = std::min(sm_count, kMaxDataBlocks);
  TORCH_CHECK_VALUE(num_sms >= 1 && num_sms <= max_blocks, "torch_ep: num_sms must be in [1, ", max_blocks,
                    "] on device ", device, ", got ", num_sms);
  TORCH_CHECK_VALUE(!low_latency || (low_latency_num_sms >= 1 && low_latency_num_sms <= max_blocks),
                    "torch_ep: low_latency_num_sms must be in [1, ", max_blocks, "] on device ", device, ", got ",
                    low_latency_num_sms);

  auto state = std::make_shared<BufferState>();
  state->name = name;
  state->device = static_cast<int>(device);
  state->rank = static_cast<int>(rank);
  state->num_sms = static_cast<int>(num_sms);
  state->low_latency_num_sms = static_cast<int>(low_latency_num_sms);
  state->timeout_s = timeout_s;
  state->layout = layout;
  cudaIpcMemHandle_t handle;
  try {
    C10_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&state->local), num_bytes));
    state->local_owner = std::shared_ptr<char>(state->local, [device = state->device](char* p) {
      c10::cuda::CUDAGuard on(static_cast<c10::DeviceIndex>(device));
      C10_CUDA_CHECK_WARN(cudaFree(p));
    });
    const size_t control_bytes = sizeof(Control) + notify_scratch_ints(layout, state->num_sms) * sizeof(int);
    if (layout.recv_rows > 0) {
      state->recv_region = std::make_shared<RecvRegion>(state->local_owner, state->local + layout.recv_offset,
                                                        layout.recv_rows * layout.slot_bytes);
    }
    C10_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&state->control), control_bytes));
    C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&state->host), sizeof(HostWords), cudaHostAllocMapped));
    C10_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&state->host_device), state->host, 0));
    std::memset(state->host, 0, sizeof(HostWords));
    // Flags start below every epoch (the first op uses 1) before any peer can map the memory.
    C10_CUDA_CHECK(cudaMemset(state->local, 0, num_bytes));
    C10_CUDA_CHECK(cudaMemset(state->control, 0, control_bytes));
    if (std::getenv("TORCH_EP_TRACE") != nullptr) {
      C10_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&state->trace), kTraceBytes));
      C10_CUDA_CHECK(cudaMemset(state->trace, 0, kTraceBytes));
    }
    C10_CUDA_CHECK(cudaDeviceSynchronize());
    C10_CUDA_CHECK(cudaIpcGetMemHandle(&handle, state->local));
    std::lock_guard<std::mutex> lock(registry_mutex);
    TORCH_CHECK(registry().count(name) == 0, "torch_ep: a buffer named '", name, "' already exists");
    registry()[name] = state;
  } catch (...) {
    release_memory(*state);
    throw;
  }
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void open_buffer(const std::string& name, const std::vector<std::string>& handles) {
  auto state = find_buffer(name);
  const int num_ranks = state->layout.num_ranks;
  TORCH_CHECK(!state->is_open(), "torch_ep: buffer '", name, "' is already open");
  TORCH_CHECK(static_cast<int>(handles.size()) == num_ranks, "torch_ep: open_buffer needs one handle per rank (",
              num_ranks, "), got ", handles.size());
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(state->device));
  state->peers.assign(num_ranks, nullptr);
  try {
    for (int r = 0; r < num_ranks; ++r) {
      TORCH_CHECK(handles[r].size() == sizeof(cudaIpcMemHandle_t), "torch_ep: handles[", r, "] has ",
                  handles[r].size(), " bytes, a CUDA IPC handle has ", sizeof(cudaIpcMemHandle_t));
      if (r == state->rank) {
        state->peers[r] = state->local;
        continue;
      }
      cudaIpcMemHandle_t handle;
      std::memcpy(&handle, handles[r].data(), sizeof(handle));
      void* peer = nullptr;
      C10_CUDA_CHECK(cudaIpcOpenMemHandle(&peer, handle, cudaIpcMemLazyEnablePeerAccess));
      state->peers[r] = static_cast<char*>(peer);
    }
    C10_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&state->peer_table), num_ranks * sizeof(char*)));
    C10_CUDA_CHECK(
        cudaMemcpy(state->peer_table, state->peers.data(), num_ranks * sizeof(char*), cudaMemcpyHostToDevice));
  } catch (...) {
    unmap_peers(*state);
    throw;
  }
}

at::Tensor take_trace(const std::string& name) {
  auto state = find_buffer(name);
  TORCH_CHECK(state->trace != nullptr, "torch_ep: buffer '", name, "' records no trace (set TORCH_EP_TRACE=1 before "
              "building it)");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(state->device));
  at::Tensor out = at::empty({kMaxDataBlocks, kTraceEvents}, at::kLong);
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  C10_CUDA_CHECK(cudaMemcpy(out.data_ptr(), state->trace, kTraceBytes, cudaMemcpyDeviceToHost));
  C10_CUDA_CHECK(cudaMemset(state->trace, 0, kTraceBytes));
  return out;
}

void close_buffer(const std::string& name) {
  auto state = find_buffer(name);
  unmap_peers(*state);
}

void check_buffer(const std::string& name) {
  auto state = find_buffer(name);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(state->device));
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  state->raise_deferred_error();
}

at::Tensor combine_input(const std::string& name, int64_t num_rows) {
  auto state = find_buffer(name);
  const BufferLayout& layout = state->layout;
  TORCH_CHECK_VALUE(layout.combine_rows > 0, "torch_ep: Buffer.combine_input needs a buffer made with "
                    "zero_copy_combine=True");
  TORCH_CHECK_VALUE(num_rows >= 0 && num_rows <= layout.combine_rows, "Buffer.combine_input: num_rows=", num_rows,
                    " must be in [0, ", layout.combine_rows, "] (num_ranks * max_tokens_per_rank)");
  const int64_t row_bytes = 2 * int64_t(layout.hidden);
  return region_view(state->local_owner, layout.combine_row(state->local, 0, row_bytes), {num_rows, row_bytes},
                     at::TensorOptions().dtype(at::kByte).device(at::kCUDA, state->device));
}

void free_buffer(const std::string& name) {
  std::shared_ptr<BufferState> state;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto it = registry().find(name);
    TORCH_CHECK(it != registry().end(), "torch_ep: no buffer named '", name, "' to free");
    state = it->second;
    registry().erase(it);
  }
  unmap_peers(*state);
  release_memory(*state);
}

}  // namespace torch_ep
