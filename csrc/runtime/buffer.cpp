// Buffer lifetime (create, open, close, free) and the registry ops find buffers in.
#include "runtime/buffer.h"

#include <chrono>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "runtime/python_module.h"

namespace torch_ep {
namespace {

constexpr double kHostTimeoutSlack_s = 5.0;

std::mutex registry_mutex;
std::unordered_map<std::string, std::shared_ptr<BufferState>>& registry() {
  static std::unordered_map<std::string, std::shared_ptr<BufferState>> buffers;
  return buffers;
}

// Frees whatever of `state` was allocated (also after a failed create).
void release_memory(BufferState& state) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(state.device));
  if (state.local != nullptr) C10_CUDA_CHECK(cudaFree(state.local));
  if (state.epoch != nullptr) C10_CUDA_CHECK(cudaFree(state.epoch));
  if (state.host_counter != nullptr) C10_CUDA_CHECK(cudaFreeHost(state.host_counter));
  if (state.notify_done != nullptr) C10_CUDA_CHECK(cudaEventDestroy(state.notify_done));
  state.local = nullptr;
  state.epoch = nullptr;
  state.host_counter = nullptr;
  state.host_counter_device = nullptr;
  state.notify_done = nullptr;
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

std::shared_ptr<BufferState> find_buffer(const std::string& name) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry().find(name);
  TORCH_CHECK(it != registry().end(), "torch_ep: no buffer named '", name, "' (created and not yet freed)");
  return it->second;
}

BufferRef BufferState::ref(Op op) const {
  TORCH_CHECK(is_open(), "torch_ep: buffer '", name, "' is not open (call open_buffer on every rank first)");
  BufferRef r{};
  r.peers = peer_table;
  r.epoch = epoch;
  r.layout = layout;
  r.rank = rank;
  r.num_sms = num_sms;
  r.timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
  r.op = op;
  return r;
}

int BufferState::wait_received_rows(cudaStream_t stream) const {
  // Polls an event behind the notify kernel, so that a kernel that trapped (a
  // peer did not answer in time) surfaces here as an error, then reads the
  // count the kernel left in mapped memory.
  C10_CUDA_CHECK(cudaEventRecord(notify_done, stream));
  // The kernel's own timeout (which names the silent peer) should fire first;
  // this one only catches a kernel that never ran.
  using clock = std::chrono::steady_clock;
  const auto deadline = clock::now() + std::chrono::duration<double>(timeout_s + kHostTimeoutSlack_s);
  while (true) {
    const cudaError_t status = cudaEventQuery(notify_done);
    if (status == cudaSuccess) return *host_counter;
    TORCH_CHECK(status == cudaErrorNotReady, "torch_ep: dispatch on rank ", rank,
                " timed out or failed waiting for its peers (timeout_s=", timeout_s,
                "; the kernel printed which peer): ", cudaGetErrorString(status));
    TORCH_CHECK(clock::now() < deadline, "torch_ep: dispatch on rank ", rank, " timed out after ", timeout_s,
                " s waiting for the received row count (the notify kernel did not finish)");
  }
}

std::string create_buffer(const std::string& name, int64_t device, int64_t rank, int64_t num_ranks,
                          int64_t num_experts, int64_t hidden, int64_t max_tokens_per_rank, int64_t num_bytes,
                          int64_t num_sms, double timeout_s, bool low_latency) {
  const BufferLayout layout = make_buffer_layout(num_ranks, num_experts, hidden, max_tokens_per_rank, low_latency);
  TORCH_CHECK(rank >= 0 && rank < num_ranks, "torch_ep: rank ", rank, " is outside [0, ", num_ranks, ")");
  TORCH_CHECK(num_bytes >= layout.total_bytes, "torch_ep: num_bytes (", num_bytes,
              ") is smaller than buffer_bytes(...) = ", layout.total_bytes);
  TORCH_CHECK(timeout_s > 0, "torch_ep: timeout_s must be positive, got ", timeout_s);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, static_cast<int>(device)));
  // Receivers spin on flags that senders of other blocks raise: all blocks must be resident at once.
  TORCH_CHECK(num_sms >= 1 && num_sms <= sm_count, "torch_ep: num_sms must be in [1, ", sm_count,
              "] on device ", device, ", got ", num_sms);

  auto state = std::make_shared<BufferState>();
  state->name = name;
  state->device = static_cast<int>(device);
  state->rank = static_cast<int>(rank);
  state->num_sms = static_cast<int>(num_sms);
  state->timeout_s = timeout_s;
  state->layout = layout;
  cudaIpcMemHandle_t handle;
  try {
    C10_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&state->local), num_bytes));
    C10_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&state->epoch), sizeof(uint64_t)));
    C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&state->host_counter), sizeof(int), cudaHostAllocMapped));
    C10_CUDA_CHECK(
        cudaHostGetDevicePointer(reinterpret_cast<void**>(&state->host_counter_device), state->host_counter, 0));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&state->notify_done, cudaEventDisableTiming));
    // Flags start below every epoch (the first op uses 1) before any peer can map the memory.
    C10_CUDA_CHECK(cudaMemset(state->local, 0, num_bytes));
    C10_CUDA_CHECK(cudaMemset(state->epoch, 0, sizeof(uint64_t)));
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

void close_buffer(const std::string& name) {
  auto state = find_buffer(name);
  unmap_peers(*state);
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
