// One rank's communication buffer: its device memory, the peers' memory mapped
// through CUDA IPC, and the process-wide registry that ops look buffers up in
// by name (the value torch.compile carries through the graph).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/api.cuh"
#include "runtime/layout.h"

namespace torch_ep {

struct BufferState {
  std::string name;
  int device = 0;
  int rank = 0;
  int num_sms = 0;
  double timeout_s = 0;
  BufferLayout layout{};

  char* local = nullptr;                   // this rank's buffer (layout.total_bytes or more)
  uint64_t* epoch = nullptr;               // device-local op counter, never touched by peers
  int* host_counter = nullptr;             // host-mapped: received row count of an exact-mode dispatch
  int* host_counter_device = nullptr;      // the same memory as the device sees it
  cudaEvent_t notify_done = nullptr;       // recorded after an exact-mode notify kernel
  std::vector<char*> peers;                // base pointer of every rank's buffer (own = local); empty until opened
  char** peer_table = nullptr;             // device copy of `peers`

  bool is_open() const { return peer_table != nullptr; }

  // What kernels need to reach every rank's buffer; the buffer must be open.
  BufferRef ref(Op op) const;

  // Waits on the host for the row count that the notify kernel just launched
  // on `stream` publishes; raises (instead of hanging) on timeout or a kernel error.
  int wait_received_rows(cudaStream_t stream) const;
};

// The registered buffer called `name`; raises if there is none.
std::shared_ptr<BufferState> find_buffer(const std::string& name);

}  // namespace torch_ep
