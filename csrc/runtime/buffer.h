// One rank's communication buffer: its device memory, the peers' memory mapped
// through CUDA IPC, and the process-wide registry that ops look buffers up in
// by name (the value torch.compile carries through the graph).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/ScalarType.h>

#include "kernels/api.cuh"
#include "runtime/layout.h"

namespace torch_ep {

// `t` as the kernels read it: contiguous and 16-byte aligned (they move 16-byte vectors); a copy only
// where it is neither (a view at an odd element offset is not aligned).
inline at::Tensor kernel_input(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

// A tensor over `data`, memory of a buffer that `keep` holds: the tensor keeps it (the buffer's memory, or a
// block of its recv region) until the tensor is freed, also after the buffer is destroyed. options names the
// device with its index, so that from_blob does not ask the driver where `data` lives (~3 us of host time).
inline at::Tensor region_view(std::shared_ptr<const void> keep, void* data, at::IntArrayRef sizes,
                              const at::TensorOptions& options) {
  return at::from_blob(data, sizes, [keep = std::move(keep)](void*) {}, options, options.device());
}

// The recv region of a zero_copy_recv buffer, which dispatch takes its outputs from: a block stays taken
// while a tensor over it lives (the tensors' deleters free it, on any thread), so the outputs are ordinary
// tensors whose rows the peers store in place. Blocks start and end on kAlign bytes.
class RecvRegion : public std::enable_shared_from_this<RecvRegion> {
 public:
  static constexpr int64_t kAlign = 256;

  struct Block {
    std::shared_ptr<RecvRegion> region;
    char* data;
    int64_t bytes;
    // Gives back all but the first `keep` bytes.
    void shrink(int64_t keep);
    ~Block();
  };

  RecvRegion(std::shared_ptr<char> owner, char* base, int64_t bytes);
  // The largest free run if it holds `least` bytes, cut to `most`; null otherwise.
  std::shared_ptr<Block> take(int64_t least, int64_t most);

 private:
  void give_back(int64_t offset, int64_t bytes);

  std::shared_ptr<char> owner_;  // the buffer's memory, kept while a block is taken
  char* base_;
  std::mutex mutex_;
  std::map<int64_t, int64_t> free_;  // offset -> bytes of each free run; runs never touch
};

// What every rank must agree on for one op: rows of `dtype` (as they cross the link), `row_bytes`
// wide, top-k (0 where the op takes none). Kernels compare it across ranks before data moves.
inline Signature make_signature(Op op, c10::ScalarType dtype, int64_t row_bytes, int64_t num_topk) {
  Signature sig{};
  sig.words[kSigOp] = static_cast<int>(op);
  sig.words[kSigDtype] = static_cast<int>(dtype);
  sig.words[kSigRowBytes] = static_cast<int>(row_bytes);
  sig.words[kSigTopk] = static_cast<int>(num_topk);
  return sig;
}

// The host-mapped words of one buffer.
struct HostWords {
  NotifyResult result;
  DeferredError deferred;  // raised and cleared at the next op
  DeferredError failure;   // why an op failed the buffer (never cleared)
};

struct BufferState {
  std::string name;
  int device = 0;
  int rank = 0;
  int num_sms = 0;                          // blocks of the normal-mode data kernels
  int low_latency_num_sms = 0;              // blocks of the low-latency kernels
  double timeout_s = 0;
  BufferLayout layout{};

  char* local = nullptr;                   // this rank's buffer (layout.total_bytes or more)
  std::shared_ptr<char> local_owner;       // frees `local`; combine_input's views and recv_region share it
  std::shared_ptr<RecvRegion> recv_region; // zero_copy_recv: where dispatch takes its outputs, else null
  Control* control = nullptr;              // device words only this rank touches (epoch, ...)
  HostWords* host = nullptr;               // host-mapped words the kernels and the host share
  HostWords* host_device = nullptr;        // the same memory as the device sees it
  uint64_t host_seq = 0;                   // tags exact-mode dispatches
  int64_t exact_rows_guess = 0;            // output rows an exact-mode dispatch allocates up front (0: none yet)
  std::string broken;                      // why the buffer can no longer be used (seen by the host)
  std::vector<char*> peers;                // base pointer of every rank's buffer (own = local); empty until opened
  char** peer_table = nullptr;             // device copy of `peers`
  unsigned long long* trace = nullptr;     // phase timestamps (TORCH_EP_TRACE set at creation), else null

  bool is_open() const { return peer_table != nullptr; }

  // What kernels need to reach every rank's buffer; the buffer must be open and usable.
  BufferRef ref(Op op) const;

  // Raises (RuntimeError) if the buffer is known to be broken (see raise_if_failed).
  void check_not_broken() const;

  // Raises (RuntimeError) if an op failed this buffer: a kernel recorded a
  // failure (a silent peer, ranks that disagree) or the host saw one. Every
  // later call raises too: the buffer must be destroyed and built again.
  void raise_if_failed();

  // raise_if_failed, then raises the error an earlier op recorded that left
  // the buffer usable (and clears it). Called before every op is issued.
  void raise_deferred_error();

  // Waits on the host for the answer of the exact-mode notify kernel tagged
  // `tag` on `stream`; raises (and marks the buffer broken) on timeout or a
  // kernel error instead of hanging.
  NotifyResult wait_notify(uint64_t tag, cudaStream_t stream);
};

// How every rank but the one at fault names a call that rank rejected ("rank 1" + this).
constexpr const char* kRejectedInput = " rejected its input (its own error names the argument)";

// The registered buffer called `name`; raises if there is none.
std::shared_ptr<BufferState> find_buffer(const std::string& name);

// The registered buffer called `name`, or null (a buffer of another transport).
std::shared_ptr<BufferState> lookup_buffer(const std::string& name);

}  // namespace torch_ep
