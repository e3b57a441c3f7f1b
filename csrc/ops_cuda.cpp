// CUDA implementations of the `ep` ops (schemas in registration.cpp): input
// checks, output allocation and the kernel launches of each op, plus the
// peer-copy benchmark entry point. Bad arguments raise ValueError in Python
// (TORCH_CHECK_VALUE), as on the CPU path. A buffer with no NVLink state here
// belongs to the ProcessGroup transport: its ops go to ep.pg_* instead.
#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "contract.h"
#include "kernels/api.cuh"
#include "runtime/buffer.h"
#include "runtime/python_module.h"

namespace torch_ep {
namespace {

using at::Tensor;

using DispatchFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&, c10::string_view, int64_t, int64_t);
using CachedDispatchFn = std::tuple<Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&, const Tensor&,
                                                    const Tensor&, const Tensor&, c10::string_view);
using CombineFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::string_view);

// The ProcessGroup transport's version of an op (same schema, Python kernels).
template <typename Fn>
c10::TypedOperatorHandle<Fn> transport_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// ---- the op contract (torch_ep/_checks.py; test/contract_cases.py holds both to the same messages) ----

// A tensor's shape as the contract prints it: [a, b].
std::string shape_of(const Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

// "bfloat16, float16, float32 or float64" (and ", float8_e4m3fn" before "or" when FP8 is allowed).
std::string activation_names(bool with_fp8) {
  std::vector<std::string> names;
  for (const c10::ScalarType t : kActivationTypes) names.emplace_back(type_name(t));
  if (with_fp8) names.emplace_back(type_name(kFp8Type));
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) out += (i == 0 ? "" : i + 1 == names.size() ? " or " : ", ") + names[i];
  return out;
}

// CUDA only: where the tensor lives and how the kernels read it.
void check_device(const Tensor& t, const char* op, const char* name, int device) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.get_device() == device, op, ": ", name, " must be on cuda:", device, ", got ",
                    t.device());
}

// Kernels move rows in 16-byte vectors: a row a multiple of 16 bytes (kernel_input aligns its start).
int64_t check_row_bytes(const Tensor& t, const char* op, const char* name) {
  const int64_t row_bytes = t.size(1) * t.element_size();
  TORCH_CHECK_VALUE(row_bytes % 16 == 0, op, ": a row of ", name, " (", t.size(1), " x ", type_name(t.scalar_type()),
                    ") must be a multiple of 16 bytes");
  return row_bytes;
}

void check_num_experts(int64_t num_experts, int64_t num_ranks, const char* op) {
  TORCH_CHECK_VALUE(num_ranks >= 1, op, ": num_ranks=", num_ranks, " must be >= 1");
  TORCH_CHECK_VALUE(num_experts > 0 && num_experts % num_ranks == 0, op, ": num_experts=", num_experts,
                    " must be a positive multiple of num_ranks=", num_ranks);
}

void check_topk_idx(const Tensor& topk_idx, const char* op) {
  TORCH_CHECK_VALUE(topk_idx.scalar_type() == kTopkIdxType && topk_idx.dim() == 2, op,
                    ": topk_idx must be int64 [num_tokens, k], got ", type_name(topk_idx.scalar_type()), " ",
                    shape_of(topk_idx));
  TORCH_CHECK_VALUE(topk_idx.size(1) >= 1 && topk_idx.size(1) <= kMaxTopk, op, ": topk_idx has k=", topk_idx.size(1),
                    ", must be in [1, ", kMaxTopk, "]");
}

struct DispatchRows {
  int64_t row_bytes;
  Tensor scales;  // contiguous x_scales, undefined unless x is FP8
};

// x [num_tokens, hidden] in an activation dtype, or FP8 with x_scales [num_tokens, ceil(width/128)] fp32;
// hidden < 0: any width (cached_dispatch also moves gradients of other widths).
DispatchRows check_x(const Tensor& x, const std::optional<Tensor>& x_scales, const char* op, int64_t hidden,
                     int64_t max_tokens, int device) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [num_tokens, hidden], got shape ", shape_of(x));
  const auto dtype = x.scalar_type();
  const bool fp8 = dtype == kFp8Type;
  TORCH_CHECK_VALUE(fp8 || is_activation_type(dtype), op, ": x must be ", activation_names(true), ", got ",
                    type_name(dtype));
  TORCH_CHECK_VALUE(hidden < 0 || x.size(1) == hidden, op, ": x has hidden size ", x.size(1),
                    " but the buffer was built for hidden=", hidden);
  TORCH_CHECK_VALUE(x.size(0) <= max_tokens, op, ": x has ", x.size(0),
                    " tokens, more than the buffer's max_tokens_per_rank=", max_tokens);
  Tensor scales;
  if (!fp8) {
    TORCH_CHECK_VALUE(!x_scales.has_value(), op, ": x_scales is only accepted with float8_e4m3fn x");
  } else {
    TORCH_CHECK_VALUE(x_scales.has_value(), op, ": float8_e4m3fn x needs x_scales (pass x as (x, scales))");
    const int64_t want_cols = ceil_div(x.size(1), kScaleBlock);
    TORCH_CHECK_VALUE(x_scales->scalar_type() == kScaleType && x_scales->dim() == 2 &&
                          x_scales->size(0) == x.size(0) && x_scales->size(1) == want_cols,
                      op, ": x_scales must be float32 [", x.size(0), ", ", want_cols, "], got ",
                      type_name(x_scales->scalar_type()), " ", shape_of(*x_scales));
    scales = x_scales->contiguous();
    check_device(scales, op, "x_scales", device);
  }
  check_device(x, op, "x", device);
  return {check_row_bytes(x, op, "x"), scales};
}

// The layout handle from dispatch: send_pos [T, R], recv_src_idx [N], rank_prefix [R+1, R], all int32.
void check_handle(const Tensor& send_pos, const Tensor& recv_src_idx, const Tensor& rank_prefix, int64_t num_ranks,
                  const char* op, int device) {
  TORCH_CHECK_VALUE(send_pos.scalar_type() == at::kInt && send_pos.dim() == 2 && send_pos.size(1) == num_ranks, op,
                    ": send_pos must be int32 [num_tokens, ", num_ranks, "], got ", type_name(send_pos.scalar_type()),
                    " ", shape_of(send_pos));
  TORCH_CHECK_VALUE(recv_src_idx.scalar_type() == at::kInt && recv_src_idx.dim() == 1, op,
                    ": recv_src_idx must be int32 [num_recv], got ", type_name(recv_src_idx.scalar_type()), " ",
                    shape_of(recv_src_idx));
  TORCH_CHECK_VALUE(rank_prefix.scalar_type() == at::kInt && rank_prefix.dim() == 2 &&
                        rank_prefix.size(0) == num_ranks + 1 && rank_prefix.size(1) == num_ranks,
                    op, ": rank_prefix must be int32 [", num_ranks + 1, ", ", num_ranks, "], got ",
                    type_name(rank_prefix.scalar_type()), " ", shape_of(rank_prefix));
  TORCH_CHECK_VALUE(recv_src_idx.size(0) <= std::numeric_limits<int>::max(), op, ": recv_src_idx has too many rows");
  check_device(send_pos, op, "send_pos", device);
  check_device(recv_src_idx, op, "recv_src_idx", device);
  check_device(rank_prefix, op, "rank_prefix", device);
}

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

Tensor empty_scales(int64_t rows, const Tensor& x, const Tensor& x_scales) {
  const int64_t cols = x_scales.defined() ? x_scales.size(1) : 0;
  return at::empty({rows, cols}, x.options().dtype(at::kFloat));
}

// Runs pass(col_offset, col_bytes) for each column slice of a row that fits a
// staging slot; every pass is a complete op (its own epoch and handshake).
template <typename Pass>
void for_each_pass(const BufferLayout& layout, int64_t row_bytes, Pass pass) {
  for (int64_t offset = 0; offset < row_bytes; offset += layout.slot_bytes) {
    pass(offset, static_cast<int>(std::min(layout.slot_bytes, row_bytes - offset)));
  }
}

// The fields of one column pass that dispatch and cached_dispatch share.
DispatchArgs row_pass_args(const Tensor& x, const DispatchRows& rows, const Tensor& send_pos, const Tensor& rank_prefix,
                           int64_t col_offset, int col_bytes, const Signature& sig) {
  DispatchArgs a{};
  a.x = static_cast<const char*>(x.data_ptr());
  a.row_bytes = rows.row_bytes;
  a.col_offset = col_offset;
  a.col_bytes = col_bytes;
  a.x_scales = rows.scales.defined() ? rows.scales.data_ptr<float>() : nullptr;
  a.num_scales = rows.scales.defined() ? static_cast<int>(rows.scales.size(1)) : 0;
  a.num_tokens = static_cast<int>(x.size(0));
  a.send_pos = send_pos.data_ptr<int>();
  a.rank_prefix = rank_prefix.data_ptr<int>();
  a.handshake = col_offset > 0;  // dispatch's first pass follows its notify kernel
  a.signature = sig;
  return a;
}

// This rank's receive window for one dispatch (zero_copy_recv): a block of the recv region holding the FP8
// scales of `capacity` rows, then the rows, where the peers store them in place. Empty: none.
struct Window {
  std::shared_ptr<RecvRegion::Block> block;
  int64_t capacity = 0, scales_bytes = 0;

  char* scales() const { return block->data; }
  char* rows() const { return block->data + scales_bytes; }
  // The window as the peers read it from this rank's notify record.
  RecvWindow published(const char* base) const {
    if (capacity == 0) return {};
    return {static_cast<int>((rows() - base) / kWindowUnit), static_cast<int>((scales() - base) / kWindowUnit),
            static_cast<int>(capacity)};
  }
};

// A window of `least` to `most` rows from the largest free run of the recv region (b has one), or none.
Window take_window(const BufferState& b, int64_t least, int64_t most, int64_t row_bytes, int num_scales) {
  Window w;
  if (most <= 0) return w;
  const auto bytes_for = [&](int64_t rows) {
    return align_up(rows * 4 * num_scales, RecvRegion::kAlign) + rows * row_bytes;
  };
  w.block = b.recv_region->take(bytes_for(least), bytes_for(most));
  if (w.block == nullptr) return w;
  w.capacity = std::min(most, w.block->bytes / (row_bytes + 4 * int64_t(num_scales)));
  while (bytes_for(w.capacity) > w.block->bytes) --w.capacity;  // the scales' alignment
  if (w.capacity <= 0) return {};
  w.scales_bytes = align_up(w.capacity * 4 * num_scales, RecvRegion::kAlign);
  return w;
}

// Outputs of dispatch with `rows` rows: recv_x and recv_x_scales in `window` if it has one (the tensors keep
// its block taken), else fresh like the others.
struct DispatchTensors {
  Tensor recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx;

  DispatchTensors(int64_t rows, const Tensor& x, const Tensor& x_scales, const Tensor& topk_idx,
                  const Tensor& topk_weights, const Window& window = {})
      : recv_x(window.capacity == 0 ? at::empty({rows, x.size(1)}, x.options())
                                    : region_view(window.block, window.rows(), {rows, x.size(1)}, x.options())),
        recv_x_scales(window.capacity == 0 || !x_scales.defined()
                          ? empty_scales(rows, x, x_scales)
                          : region_view(window.block, window.scales(), {rows, x_scales.size(1)},
                                        x.options().dtype(at::kFloat))),
        recv_topk_idx(at::empty({rows, topk_idx.size(1)}, topk_idx.options())),
        recv_topk_weights(at::empty({rows, topk_idx.size(1)}, topk_weights.options())),
        recv_src_idx(at::empty({rows}, x.options().dtype(at::kInt))) {}

  // Shrinks every output to its first `rows` rows in place (the storage stays): the tensors are this op's
  // own and not yet returned, and no dispatcher call is made (five narrows cost the host several us while
  // the caller waits for the exact mode's answer).
  void keep_first_rows(int64_t rows) {
    if (recv_x.size(0) == rows) return;
    for (Tensor* out : all()) {
      at::DimVector sizes(out->sizes());
      sizes[0] = rows;
      out->unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
    }
  }

  std::array<Tensor*, 5> all() { return {&recv_x, &recv_x_scales, &recv_topk_idx, &recv_topk_weights, &recv_src_idx}; }

  DispatchOutputs view() const {
    DispatchOutputs o{};
    o.recv_x = static_cast<char*>(recv_x.data_ptr());
    o.recv_x_scales = recv_x_scales.numel() > 0 ? recv_x_scales.data_ptr<float>() : nullptr;
    o.recv_topk_idx = recv_topk_idx.data_ptr<int64_t>();
    o.recv_topk_weights = recv_topk_weights.data_ptr<float>();
    o.recv_src_idx = recv_src_idx.data_ptr<int>();
    o.num_recv_rows = static_cast<int>(recv_x.size(0));
    return o;
  }
};

// One pass of dispatch: metadata travels with the first pass only.
DispatchArgs dispatch_pass_args(const Tensor& x, const DispatchRows& rows, const Tensor& send_pos,
                                const Tensor& rank_prefix, int64_t col_offset, int col_bytes, const Signature& sig,
                                const Tensor& topk_idx, const Tensor& topk_weights) {
  DispatchArgs a = row_pass_args(x, rows, send_pos, rank_prefix, col_offset, col_bytes, sig);
  if (col_offset == 0) {
    a.with_meta = true;
    a.topk_idx = topk_idx.data_ptr<int64_t>();
    a.topk_weights = topk_weights.data_ptr<float>();
    a.num_topk = static_cast<int>(topk_idx.size(1));
  }
  return a;
}

using DispatchResults = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

DispatchResults dispatch_results(const DispatchTensors& out, const Tensor& num_recv_per_expert, const Tensor& send_pos,
                                 const Tensor& rank_prefix) {
  return {out.recv_x, out.recv_x_scales, out.recv_topk_idx, out.recv_topk_weights, num_recv_per_expert, send_pos,
          out.recv_src_idx, rank_prefix};
}

// Rows the next exact-mode dispatch of a buffer allocates before it learns its count: the last
// count with 1/8 headroom, or the earlier guess decayed by 1/16 a call, whichever is larger (so
// that alternating counts, e.g. of different layers, both fit, and a spike does not last).
int64_t next_rows_guess(int64_t guess, int64_t rows) {
  const int64_t most = std::numeric_limits<int>::max();  // DispatchOutputs counts rows in an int
  return std::min(most, std::max(rows + rows / 8 + 1, guess - guess / 16));
}

// Turns the exact-mode notify kernel's verdict on the input into the error
// every rank raises (a timeout failed the buffer: raise_if_failed names it).
void raise_notify_error(const NotifyResult& r, const BufferState& b) {
  const char* op = "ep.dispatch";
  // As on the ProcessGroup path: a rank names its own bad argument, the others name that rank.
  TORCH_CHECK_VALUE(r.own_bad_ids == 0, op, ": topk_idx holds expert id ", r.own_bad_id, ", outside [-1, num_experts=",
                    b.layout.num_experts, ")");
  TORCH_CHECK_VALUE(r.error != kBadExpertId && r.error != kRefused, op, ": rank ", r.error_rank, kRejectedInput);
  TORCH_CHECK_VALUE(false, op, ": ranks disagree on the ", signature_word_name(r.error_value),
                    " of this call (rank ", r.error_rank, " differs from rank 0)");
}

std::tuple<Tensor, Tensor, Tensor> get_dispatch_layout(const Tensor& topk_idx_in, int64_t num_experts,
                                                       int64_t num_ranks) {
  const char* op = "ep.get_dispatch_layout";
  check_num_experts(num_experts, num_ranks, op);
  check_topk_idx(topk_idx_in, op);
  TORCH_CHECK_VALUE(num_ranks <= 32, op, ": num_ranks=", num_ranks, " must be at most 32 on CUDA");
  TORCH_CHECK_VALUE(topk_idx_in.size(0) <= std::numeric_limits<int>::max(), op, ": topk_idx has too many tokens");
  const Tensor topk_idx = topk_idx_in.contiguous();
  c10::cuda::CUDAGuard guard(topk_idx.device());
  const auto i32 = topk_idx.options().dtype(at::kInt);
  Tensor num_tokens_per_rank = at::zeros({num_ranks}, i32);
  Tensor num_tokens_per_expert = at::zeros({num_experts}, i32);
  Tensor is_token_in_rank = at::zeros({topk_idx.size(0), num_ranks}, topk_idx.options().dtype(at::kBool));
  Tensor first_bad = at::full({1}, -1, topk_idx.options());  // all bits set: no bad entry
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  launch_get_dispatch_layout(topk_idx.data_ptr<int64_t>(), static_cast<int>(topk_idx.size(0)),
                             static_cast<int>(topk_idx.size(1)), static_cast<int>(num_experts),
                             static_cast<int>(num_ranks), num_tokens_per_rank.data_ptr<int>(),
                             num_tokens_per_expert.data_ptr<int>(), is_token_in_rank.data_ptr<bool>(),
                             reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>()), stream);
  // The contract rejects bad ids, which takes a host read; a graph capture cannot wait for one, and
  // there (as in the no-host-sync dispatch) bad ids count as no expert.
  if (!is_capturing(stream)) {
    const int64_t entry = first_bad.item<int64_t>();
    TORCH_CHECK_VALUE(entry < 0, op, ": topk_idx holds expert id ", topk_idx.view(-1)[entry].item<int64_t>(),
                      ", outside [-1, num_experts=", num_experts, ")");
  }
  return {num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank};
}

// An exact-mode dispatch whose data kernel ran with `guessed` rows while the call has num_rows
// more: outputs of num_rows rows, the data kernel's rows copied over and the rows it dropped
// filled from where they still are (one pass: rows fit a staging slot).
DispatchTensors fill_dropped_rows(BufferState& b, DispatchTensors guessed, int64_t num_rows, const Tensor& x,
                                  const DispatchRows& rows, const Tensor& send_pos, const Tensor& rank_prefix,
                                  const Signature& sig, const Tensor& topk_idx, const Tensor& topk_weights,
                                  cudaStream_t stream) {
  DispatchTensors full(num_rows, x, rows.scales, topk_idx, topk_weights);
  const auto kept = guessed.all();
  auto dst = full.all();
  for (size_t i = 0; i < kept.size(); ++i) dst[i]->narrow(0, 0, kept[i]->size(0)).copy_(*kept[i]);
  DispatchArgs a = dispatch_pass_args(x, rows, send_pos, rank_prefix, 0, static_cast<int>(rows.row_bytes), sig,
                                      topk_idx, topk_weights);
  a.out = full.view();
  a.fill_from = guessed.recv_x.size(0);
  launch_dispatch_fill(b.ref(Op::kDispatch), a, stream);
  return full;
}

struct DispatchInputs {
  Tensor x, topk_idx, topk_weights;  // as the kernels read them
  DispatchRows rows;
};

DispatchInputs check_dispatch_inputs(const BufferState& b, const Tensor& x_in, const std::optional<Tensor>& x_scales_in,
                                     const Tensor& topk_idx_in, const Tensor& topk_weights_in,
                                     int64_t expert_alignment, int64_t num_worst_tokens) {
  const char* op = "ep.dispatch";
  DispatchInputs in;
  in.x = kernel_input(x_in);
  in.rows = check_x(in.x, x_scales_in, op, b.layout.hidden, b.layout.max_tokens, b.device);
  check_topk_idx(topk_idx_in, op);
  TORCH_CHECK_VALUE(topk_idx_in.size(0) == in.x.size(0), op, ": topk_idx has ", topk_idx_in.size(0),
                    " rows but x has ", in.x.size(0), " tokens");
  TORCH_CHECK_VALUE(topk_weights_in.scalar_type() == kTopkWeightType && topk_weights_in.sizes() == topk_idx_in.sizes(),
                    op, ": topk_weights must be float32 ", shape_of(topk_idx_in), ", got ",
                    type_name(topk_weights_in.scalar_type()), " ", shape_of(topk_weights_in));
  TORCH_CHECK_VALUE(expert_alignment >= 1, op, ": expert_alignment=", expert_alignment, " must be >= 1");
  TORCH_CHECK_VALUE(num_worst_tokens >= 0, op, ": num_worst_tokens=", num_worst_tokens, " must be >= 0");
  TORCH_CHECK_VALUE(num_worst_tokens <= std::numeric_limits<int>::max(), op, ": num_worst_tokens=",
                    num_worst_tokens, " must be below 2^31");
  in.topk_idx = topk_idx_in.contiguous();
  in.topk_weights = topk_weights_in.contiguous();
  check_device(in.topk_idx, op, "topk_idx", b.device);
  check_device(in.topk_weights, op, "topk_weights", b.device);
  return in;
}

// This rank refused a dispatch's arguments (its caller raises the ValueError). The call still runs its notify
// kernel, whose record says so, and the data kernel that closes the op: every peer then rejects the call too,
// naming this rank (a ValueError in the exact mode; a failed op otherwise, as a bad expert id), instead of
// waiting for this rank or pairing its call with this rank's next one. Nothing is launched while a graph is
// captured (the capture fails anyway); if the launch fails, the ValueError is still what the caller raises.
void refuse_dispatch(BufferState& b, bool exact) noexcept {
  try {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(b.device));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream(b.device);
    if (is_capturing(stream)) return;
    const BufferRef ref = b.ref(Op::kDispatch);
    const auto i32 = at::TensorOptions().device(at::kCUDA, b.device).dtype(at::kInt);
    const Tensor rank_prefix = at::empty({b.layout.num_ranks + 1, b.layout.num_ranks}, i32);
    const Tensor num_recv_per_expert = at::empty({b.layout.experts_per_rank()}, i32);
    NotifyArgs notify{};
    notify.expert_alignment = 1;
    notify.result = exact ? &b.control->answer : nullptr;  // exact: every rank raises; else the op fails
    notify.refused = true;
    notify.rank_prefix = rank_prefix.data_ptr<int>();
    notify.num_recv_per_expert = num_recv_per_expert.data_ptr<int>();
    launch_notify_dispatch(ref, notify, stream);
    launch_dispatch(ref, DispatchArgs{}, stream);
  } catch (...) {
  }
}

DispatchResults dispatch(
    const Tensor& x_in, const std::optional<Tensor>& x_scales_in, const Tensor& topk_idx_in,
    const Tensor& topk_weights_in, c10::string_view buffer, int64_t expert_alignment, int64_t num_worst_tokens) {
  const auto state = lookup_buffer(std::string(buffer));
  if (state == nullptr) {
    static const auto op = transport_op<DispatchFn>("ep::pg_dispatch");
    return op.call(x_in, x_scales_in, topk_idx_in, topk_weights_in, buffer, expert_alignment, num_worst_tokens);
  }
  BufferState& b = *state;
  const BufferLayout& layout = b.layout;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(b.device));
  b.raise_deferred_error();
  DispatchInputs in;
  try {
    in = check_dispatch_inputs(b, x_in, x_scales_in, topk_idx_in, topk_weights_in, expert_alignment, num_worst_tokens);
  } catch (const c10::ValueError&) {
    refuse_dispatch(b, num_worst_tokens == 0);
    throw;
  }
  const Tensor &x = in.x, &topk_idx = in.topk_idx, &topk_weights = in.topk_weights;
  const DispatchRows& rows = in.rows;
  const int64_t num_tokens = x.size(0), num_ranks = layout.num_ranks, num_topk = topk_idx.size(1);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(b.device);
  const bool exact = num_worst_tokens == 0;
  TORCH_CHECK(!(exact && is_capturing(stream)),
              "torch_ep: dispatch without num_worst_tokens waits on the host for the received row count, which "
              "a CUDA graph cannot capture; pass num_worst_tokens > 0");
  const BufferRef ref = b.ref(Op::kDispatch);
  const Signature sig = make_signature(Op::kDispatch, x.scalar_type(), rows.row_bytes, num_topk);
  const auto i32 = x.options().dtype(at::kInt);
  Tensor rank_prefix = at::empty({num_ranks + 1, num_ranks}, i32);
  Tensor num_recv_per_expert = at::empty({layout.experts_per_rank()}, i32);
  Tensor send_pos = at::empty({num_tokens, num_ranks}, i32);

  // The data kernel goes right behind notify when the row count is known or guessed: then the host's
  // wait for the exact count overlaps it instead of leaving the GPU idle, and it relays notify's
  // answer to the host. Rows past a guess that proves too small are filled afterwards
  // (fill_dropped_rows). Wide rows (several passes, each its own op) always wait: a rejected call
  // must launch no pass but the one that closes it.
  const bool one_pass = rows.row_bytes <= layout.slot_bytes;
  // zero_copy_recv: the outputs come from the recv region and the peers store the rows there. The exact mode
  // takes the largest free run if it holds about the last call's rows (its guess less the headroom); what the
  // call does not fill goes back once the count is known. A capture takes none: its replays would write a block
  // that eager calls take meanwhile.
  const int num_scales = rows.scales.defined() ? static_cast<int>(rows.scales.size(1)) : 0;
  const int64_t most_rows = exact ? layout.recv_rows : num_worst_tokens;
  const int64_t least_rows = exact ? std::min(most_rows, std::max<int64_t>(1, b.exact_rows_guess * 8 / 9)) : most_rows;
  const bool may_take = one_pass && b.recv_region != nullptr && (exact || !is_capturing(stream));  // exact: checked
  const Window window = may_take ? take_window(b, least_rows, most_rows, rows.row_bytes, num_scales) : Window{};
  const bool in_place = window.capacity > 0;
  const int64_t capacity =
      exact ? (in_place ? window.capacity : one_pass ? b.exact_rows_guess : 0) : num_worst_tokens;
  const bool relay = exact && capacity > 0;
  const uint64_t tag = exact ? ++b.host_seq : 0;

  NotifyArgs notify{};
  notify.topk_idx = topk_idx.data_ptr<int64_t>();
  notify.num_tokens = static_cast<int>(num_tokens);
  notify.num_topk = static_cast<int>(num_topk);
  notify.expert_alignment = static_cast<int>(expert_alignment);
  notify.num_worst_tokens = static_cast<int>(num_worst_tokens);
  notify.result = relay ? &b.control->answer : exact ? &b.host_device->result : nullptr;
  notify.result_tag = relay ? 0 : tag;
  notify.signature = sig;
  notify.window = window.published(b.local);
  notify.rank_prefix = rank_prefix.data_ptr<int>();
  notify.num_recv_per_expert = num_recv_per_expert.data_ptr<int>();
  notify.send_pos = send_pos.data_ptr<int>();
  launch_notify_dispatch(ref, notify, stream);

  std::optional<DispatchTensors> out;
  auto launch_passes = [&](const DispatchTensors& o, bool relays) {
    for_each_pass(layout, rows.row_bytes, [&](int64_t col_offset, int col_bytes) {
      DispatchArgs a = dispatch_pass_args(x, rows, send_pos, rank_prefix, col_offset, col_bytes, sig, topk_idx,
                                          topk_weights);
      if (relays) {  // one pass
        a.relay = &b.host_device->result;
        a.relay_tag = tag;
      }
      a.rows_in_place = in_place;
      a.peer_windows = col_offset == 0;  // the first pass follows notify
      a.out = o.view();
      launch_dispatch(b.ref(Op::kDispatch), a, stream);
    });
  };
  if (capacity > 0 || !exact) {
    out.emplace(capacity, x, rows.scales, topk_idx, topk_weights, window);
    launch_passes(*out, relay);
  }
  if (!exact) return dispatch_results(*out, num_recv_per_expert, send_pos, rank_prefix);

  const NotifyResult result = b.wait_notify(tag, stream);
  b.raise_if_failed();  // a silent peer (this op), or an earlier op that failed after it was issued
  if (result.error != kNoError) {
    // Every rank saw the same records and stops here; the data kernel of the
    // rejected op does nothing but close it, so the next op starts clean.
    if (!out) launch_dispatch(ref, row_pass_args(x, rows, send_pos, rank_prefix, 0, 0, sig), stream);
    raise_notify_error(result, b);
  }
  const int64_t num_rows = result.num_recv_rows;
  b.exact_rows_guess = next_rows_guess(b.exact_rows_guess, num_rows);
  if (!out) {
    out.emplace(num_rows, x, rows.scales, topk_idx, topk_weights);
    launch_passes(*out, false);
  } else if (num_rows > capacity) {
    out = fill_dropped_rows(b, *out, num_rows, x, rows, send_pos, rank_prefix, sig, topk_idx, topk_weights, stream);
  } else if (in_place) {  // the window's rows past the count go back to the region
    window.block->shrink(window.scales_bytes + num_rows * rows.row_bytes);
    out->recv_x.unsafeGetTensorImpl()->unsafe_storage().set_nbytes(num_rows * rows.row_bytes);
  }
  out->keep_first_rows(num_rows);
  return dispatch_results(*out, num_recv_per_expert, send_pos, rank_prefix);
}

std::tuple<Tensor, Tensor> cached_dispatch(const Tensor& x_in, const std::optional<Tensor>& x_scales_in,
                                           const Tensor& send_pos_in, const Tensor& recv_src_idx_in,
                                           const Tensor& rank_prefix_in, c10::string_view buffer) {
  const auto state = lookup_buffer(std::string(buffer));
  if (state == nullptr) {
    static const auto op = transport_op<CachedDispatchFn>("ep::pg_cached_dispatch");
    return op.call(x_in, x_scales_in, send_pos_in, recv_src_idx_in, rank_prefix_in, buffer);
  }
  BufferState& b = *state;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(b.device));
  b.raise_deferred_error();
  const char* op = "ep.cached_dispatch";
  const Tensor send_pos = send_pos_in.contiguous();
  const Tensor recv_src_idx = recv_src_idx_in.contiguous();
  const Tensor rank_prefix = rank_prefix_in.contiguous();
  check_handle(send_pos, recv_src_idx, rank_prefix, b.layout.num_ranks, op, b.device);
  const Tensor x = kernel_input(x_in);
  const DispatchRows rows = check_x(x, x_scales_in, op, /*hidden=*/-1, b.layout.max_tokens, b.device);
  TORCH_CHECK_VALUE(x.size(0) == send_pos.size(0), op, ": x has ", x.size(0), " tokens but the handle's send_pos has ",
                    send_pos.size(0));

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(b.device);
  const Signature sig = make_signature(Op::kCachedDispatch, x.scalar_type(), rows.row_bytes, 0);
  const int64_t num_recv = recv_src_idx.size(0);
  Tensor recv_x = at::empty({num_recv, x.size(1)}, x.options());
  Tensor recv_x_scales = empty_scales(num_recv, x, rows.scales);
  for_each_pass(b.layout, rows.row_bytes, [&](int64_t col_offset, int col_bytes) {
    DispatchArgs a = row_pass_args(x, rows, send_pos, rank_prefix, col_offset, col_bytes, sig);
    a.handshake = true;
    a.zero_padding = true;
    a.out.recv_x = static_cast<char*>(recv_x.data_ptr());
    a.out.recv_x_scales = recv_x_scales.numel() > 0 ? recv_x_scales.data_ptr<float>() : nullptr;
    a.out.num_recv_rows = static_cast<int>(num_recv);
    launch_dispatch(b.ref(Op::kCachedDispatch), a, stream);
  });
  return {recv_x, recv_x_scales};
}

FloatType float_type_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kHalf: return FloatType::kHalf;
    case at::kDouble: return FloatType::kDouble;
    default: return FloatType::kFloat;
  }
}

Tensor combine(const Tensor& y_in, const Tensor& send_pos_in, const Tensor& recv_src_idx_in,
               const Tensor& rank_prefix_in, c10::string_view buffer) {
  const auto state = lookup_buffer(std::string(buffer));
  if (state == nullptr) {
    static const auto op = transport_op<CombineFn>("ep::pg_combine");
    return op.call(y_in, send_pos_in, recv_src_idx_in, rank_prefix_in, buffer);
  }
  BufferState& b = *state;
  const BufferLayout& layout = b.layout;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(b.device));
  b.raise_deferred_error();
  const char* op = "ep.combine";
  const Tensor send_pos = send_pos_in.contiguous();
  const Tensor recv_src_idx = recv_src_idx_in.contiguous();
  const Tensor rank_prefix = rank_prefix_in.contiguous();
  check_handle(send_pos, recv_src_idx, rank_prefix, layout.num_ranks, op, b.device);
  const Tensor y = kernel_input(y_in);
  TORCH_CHECK_VALUE(y.dim() == 2 && y.size(0) == recv_src_idx.size(0), op, ": y must be [num_recv=",
                    recv_src_idx.size(0), ", hidden], got shape ", shape_of(y));
  const auto dtype = y.scalar_type();
  TORCH_CHECK_VALUE(is_activation_type(dtype), op, ": y must be ", activation_names(false), ", got ", type_name(dtype));
  check_device(y, op, "y", b.device);
  const int64_t row_bytes = check_row_bytes(y, op, "y");
  const int64_t num_tokens = send_pos.size(0);
  TORCH_CHECK_VALUE(num_tokens <= layout.max_tokens, op, ": send_pos has ", num_tokens,
                    " tokens, more than the buffer's max_tokens_per_rank=", layout.max_tokens);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(b.device);
  // y in this rank's combine region (Buffer.combine_input): the homes read the rows there, and every rank's
  // must be (the op is part of the signature the ranks compare).
  // (A y of no rows has no data pointer: its storage's tells.)
  const bool from_region =
      layout.combine_rows > 0 && row_bytes <= layout.slot_bytes && y.size(0) <= layout.combine_rows &&
      y.has_storage() && y.storage_offset() == 0 &&
      y.storage().data() == static_cast<const void*>(layout.combine_row(b.local, 0, row_bytes));
  const Op kind = from_region ? Op::kCombineFromRegion : Op::kCombine;
  const Signature sig = make_signature(kind, dtype, row_bytes, 0);
  Tensor out = at::empty({num_tokens, y.size(1)}, y.options());
  for_each_pass(layout, row_bytes, [&](int64_t col_offset, int col_bytes) {
    CombineArgs a{};
    a.y = static_cast<const char*>(y.data_ptr());
    a.row_bytes = row_bytes;
    a.col_offset = col_offset;
    a.col_bytes = col_bytes;
    a.dtype = float_type_of(dtype);
    a.num_tokens = static_cast<int>(num_tokens);
    a.num_recv_rows = static_cast<int>(y.size(0));
    a.send_pos = send_pos.data_ptr<int>();
    a.rank_prefix = rank_prefix.data_ptr<int>();
    a.out = static_cast<char*>(out.data_ptr());
    a.from_region = from_region;
    a.signature = sig;
    launch_combine(b.ref(kind), a, stream);
  });
  return out;
}

}  // namespace

void refuse_dispatch(const std::string& name, bool exact) {
  const auto state = lookup_buffer(name);
  if (state != nullptr) refuse_dispatch(*state, exact);
}

void peer_copy(const std::string& name, const at::Tensor& src, int64_t num_sms) {
  const auto state = find_buffer(name);
  const BufferState& b = *state;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(b.device));
  check_device(src, "peer_copy", "src", b.device);
  TORCH_CHECK_VALUE(src.scalar_type() == at::kByte && src.is_contiguous() &&
                        reinterpret_cast<uintptr_t>(src.data_ptr()) % 16 == 0,
                    "peer_copy: src must be a contiguous, 16-byte aligned uint8 tensor, got ", src.scalar_type());
  const int64_t capacity = b.layout.max_tokens * b.layout.slot_bytes;
  TORCH_CHECK_VALUE(src.numel() % 16 == 0 && src.numel() <= capacity,
                    "torch_ep: src must be a multiple of 16 bytes and at most ", capacity,
                    " bytes (this rank's block of a peer's data region), got ", src.numel());
  TORCH_CHECK_VALUE(num_sms >= 1, "torch_ep: num_sms must be >= 1, got ", num_sms);
  launch_peer_copy(b.ref(Op::kPeerCopy), src.data_ptr(), src.numel(), static_cast<int>(num_sms),
                   at::cuda::getCurrentCUDAStream(b.device));
}

}  // namespace torch_ep

TORCH_LIBRARY_IMPL(ep, CUDA, m) {
  m.impl("get_dispatch_layout", &torch_ep::get_dispatch_layout);
  m.impl("dispatch", &torch_ep::dispatch);
  m.impl("cached_dispatch", &torch_ep::cached_dispatch);
  m.impl("combine", &torch_ep::combine);
}
