// CUDA implementations of the `ep` ops (schemas in registration.cpp): input
// checks, output allocation and the kernel launches of each op, plus the
// peer-copy benchmark entry point. Bad arguments raise ValueError in Python
// (TORCH_CHECK_VALUE), as on the CPU path. A buffer with no NVLink state here
// belongs to the ProcessGroup transport: its ops go to ep.pg_* instead.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

void check_device(const Tensor& t, const char* name, int device) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.get_device() == device, "torch_ep: ", name, " must be on cuda:", device,
                    ", got ", t.device());
}

void check_matrix(const Tensor& t, const char* name, int64_t rows, int64_t cols, at::ScalarType dtype,
                  const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.scalar_type() == dtype,
                    "torch_ep: ", name, " must be ", shape, " = [", rows, ", ", cols, "] ", dtype, ", got ",
                    t.sizes(), " ", t.scalar_type());
}

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

int64_t num_scales_of(int64_t hidden) { return ceil_div(hidden, kScaleBlock); }

// Kernels move data in 16-byte vectors.
void check_aligned(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "torch_ep: ", name,
                    " must start at a 16-byte aligned address (a view at an odd offset is not)");
}

// Bytes of one row of a 2-D tensor that kernels move in 16-byte units.
int64_t check_row_bytes(const Tensor& t, const char* name) {
  const int64_t row_bytes = t.size(1) * t.element_size();
  TORCH_CHECK_VALUE(row_bytes % 16 == 0, "torch_ep: a row of ", name, " (", t.size(1), " x ", t.scalar_type(),
                    ") must be a multiple of 16 bytes");
  check_aligned(t, name);
  return row_bytes;
}

bool is_row_dtype(at::ScalarType dtype) {
  return dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat || dtype == at::kDouble;
}

// What every rank must agree on for one op (see intranode.cuh).
Signature make_signature(Op op, at::ScalarType dtype, int64_t row_bytes, int64_t num_topk) {
  Signature sig{};
  sig.words[0] = static_cast<int>(op);
  sig.words[1] = static_cast<int>(dtype);
  sig.words[2] = static_cast<int>(row_bytes);
  sig.words[3] = static_cast<int>(num_topk);
  return sig;
}

struct DispatchRows {
  int64_t row_bytes;
  Tensor scales;  // contiguous x_scales, undefined unless x is FP8
};

// Rows that dispatch moves: x [T, hidden] in bf16/fp16/fp32/fp64, or FP8 e4m3
// with x_scales [T, ceil(hidden/128)] fp32. cached_dispatch (any_width) also
// moves non-FP8 rows of another width, such as gradients of a narrower tensor.
DispatchRows check_dispatch_rows(const Tensor& x, const std::optional<Tensor>& x_scales, const BufferState& b,
                                 bool any_width) {
  const BufferLayout& layout = b.layout;
  check_device(x, "x", b.device);
  const auto dtype = x.scalar_type();
  const bool fp8 = dtype == at::kFloat8_e4m3fn;
  TORCH_CHECK_VALUE(fp8 || is_row_dtype(dtype),
                    "torch_ep: x must be bfloat16, float16, float32, float64 or float8_e4m3fn, got ", dtype);
  TORCH_CHECK_VALUE(x.dim() == 2, "torch_ep: x must be 2-D [T, C], got ", x.sizes());
  TORCH_CHECK_VALUE((any_width && !fp8) || x.size(1) == layout.hidden, "torch_ep: x must be [T, hidden=",
                    layout.hidden, "], got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) <= layout.max_tokens, "torch_ep: x has ", x.size(0),
                    " tokens, more than the buffer's max_tokens_per_rank=", layout.max_tokens);
  const int64_t row_bytes = check_row_bytes(x, "x");
  if (!fp8) {
    TORCH_CHECK_VALUE(!x_scales.has_value(), "torch_ep: x_scales is only for float8_e4m3fn x, got x ", dtype);
    return {row_bytes, Tensor()};
  }
  TORCH_CHECK_VALUE(x_scales.has_value(), "torch_ep: float8_e4m3fn x needs x_scales [T, ceil(hidden/128)] float32");
  const Tensor scales = x_scales->contiguous();
  check_device(scales, "x_scales", b.device);
  check_matrix(scales, "x_scales", x.size(0), num_scales_of(layout.hidden), at::kFloat, "[T, ceil(hidden/128)]");
  return {row_bytes, scales};
}

// The layout handle from dispatch: send_pos [T, R], recv_src_idx [N],
// rank_prefix [R+1, R], all int32.
void check_handle(const Tensor& send_pos, const Tensor& recv_src_idx, const Tensor& rank_prefix, int64_t num_tokens,
                  const BufferState& b) {
  const int64_t num_ranks = b.layout.num_ranks;
  check_device(send_pos, "send_pos", b.device);
  check_device(recv_src_idx, "recv_src_idx", b.device);
  check_device(rank_prefix, "rank_prefix", b.device);
  check_matrix(send_pos, "send_pos", num_tokens, num_ranks, at::kInt, "[T, R]");
  check_matrix(rank_prefix, "rank_prefix", num_ranks + 1, num_ranks, at::kInt, "[R+1, R]");
  TORCH_CHECK_VALUE(recv_src_idx.dim() == 1 && recv_src_idx.scalar_type() == at::kInt,
                    "torch_ep: recv_src_idx must be [N] int32, got ", recv_src_idx.sizes(), " ",
                    recv_src_idx.scalar_type());
  TORCH_CHECK_VALUE(recv_src_idx.size(0) <= std::numeric_limits<int>::max(),
                    "torch_ep: recv_src_idx has too many rows");
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

// Outputs of dispatch with `rows` rows.
struct DispatchTensors {
  Tensor recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx;

  DispatchTensors(int64_t rows, const Tensor& x, const Tensor& x_scales, const Tensor& topk_idx,
                  const Tensor& topk_weights)
      : recv_x(at::empty({rows, x.size(1)}, x.options())),
        recv_x_scales(empty_scales(rows, x, x_scales)),
        recv_topk_idx(at::empty({rows, topk_idx.size(1)}, topk_idx.options())),
        recv_topk_weights(at::empty({rows, topk_idx.size(1)}, topk_weights.options())),
        recv_src_idx(at::empty({rows}, x.options().dtype(at::kInt))) {}

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

// Turns the exact-mode notify kernel's verdict into the error every rank raises.
void raise_notify_error(const NotifyResult& r, const BufferState& b) {
  if (r.error == kTimeout) {
    TORCH_CHECK(false, "torch_ep: ep.dispatch on rank ", b.rank, " timed out after ", b.timeout_s,
                " s waiting for rank ", r.error_rank, " (it never called the op, or died)");
  }
  if (r.error_rank != b.rank) {
    TORCH_CHECK_VALUE(false, "ep.dispatch: rank ", r.error_rank,
                      " rejected its input (its own error names the argument)");
  }
  TORCH_CHECK_VALUE(r.error != kBadExpertId, "ep.dispatch: topk_idx holds expert id ", r.error_value,
                    ", outside [-1, num_experts=", b.layout.num_experts, ")");
  static const char* kWhat[kSignatureWords] = {"the op", "the dtype of x", "the width of x", "top-k (K)"};
  TORCH_CHECK_VALUE(false, "ep.dispatch: ranks disagree on ", kWhat[std::clamp(r.error_value, 0, kSignatureWords - 1)],
                    " (rank ", r.error_rank, " differs from rank 0)");
}

std::tuple<Tensor, Tensor, Tensor> get_dispatch_layout(const Tensor& topk_idx_in, int64_t num_experts,
                                                       int64_t num_ranks) {
  TORCH_CHECK_VALUE(num_ranks >= 1 && num_ranks <= 32 && num_experts > 0 && num_experts % num_ranks == 0,
                    "torch_ep: num_experts (", num_experts, ") must be a positive multiple of num_ranks (", num_ranks,
                    "), and num_ranks at most 32");
  TORCH_CHECK_VALUE(topk_idx_in.dim() == 2 && topk_idx_in.scalar_type() == at::kLong,
                    "torch_ep: topk_idx must be [T, K] int64, got ", topk_idx_in.sizes(), " ",
                    topk_idx_in.scalar_type());
  TORCH_CHECK_VALUE(topk_idx_in.size(0) <= std::numeric_limits<int>::max(), "torch_ep: topk_idx has too many tokens");
  const Tensor topk_idx = topk_idx_in.contiguous();
  c10::cuda::CUDAGuard guard(topk_idx.device());
  const auto i32 = topk_idx.options().dtype(at::kInt);
  Tensor num_tokens_per_rank = at::zeros({num_ranks}, i32);
  Tensor num_tokens_per_expert = at::zeros({num_experts}, i32);
  Tensor is_token_in_rank = at::zeros({topk_idx.size(0), num_ranks}, topk_idx.options().dtype(at::kBool));
  launch_get_dispatch_layout(topk_idx.data_ptr<int64_t>(), static_cast<int>(topk_idx.size(0)),
                             static_cast<int>(topk_idx.size(1)), static_cast<int>(num_experts),
                             static_cast<int>(num_ranks), num_tokens_per_rank.data_ptr<int>(),
                             num_tokens_per_expert.data_ptr<int>(), is_token_in_rank.data_ptr<bool>(),
                             at::cuda::getCurrentCUDAStream());
  return {num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dispatch(
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
  const Tensor x = x_in.contiguous();
  const DispatchRows rows = check_dispatch_rows(x, x_scales_in, b, /*any_width=*/false);
  const int64_t num_tokens = x.size(0), num_ranks = layout.num_ranks;
  TORCH_CHECK_VALUE(topk_idx_in.dim() == 2 && topk_idx_in.size(1) >= 1 && topk_idx_in.size(1) <= kMaxTopk,
                    "torch_ep: topk_idx must be [T, K] with 1 <= K <= ", kMaxTopk, ", got ", topk_idx_in.sizes());
  const int64_t num_topk = topk_idx_in.size(1);
  const Tensor topk_idx = topk_idx_in.contiguous();
  const Tensor topk_weights = topk_weights_in.contiguous();
  check_device(topk_idx, "topk_idx", b.device);
  check_device(topk_weights, "topk_weights", b.device);
  check_matrix(topk_idx, "topk_idx", num_tokens, num_topk, at::kLong, "[T, K]");
  check_matrix(topk_weights, "topk_weights", num_tokens, num_topk, at::kFloat, "[T, K]");
  TORCH_CHECK_VALUE(expert_alignment >= 1, "torch_ep: expert_alignment must be >= 1, got ", expert_alignment);
  TORCH_CHECK_VALUE(num_worst_tokens >= 0 && num_worst_tokens <= std::numeric_limits<int>::max(),
                    "torch_ep: num_worst_tokens must be in [0, 2^31), got ", num_worst_tokens);

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

  NotifyArgs notify{};
  notify.topk_idx = topk_idx.data_ptr<int64_t>();
  notify.num_tokens = static_cast<int>(num_tokens);
  notify.num_topk = static_cast<int>(num_topk);
  notify.expert_alignment = static_cast<int>(expert_alignment);
  notify.num_worst_tokens = static_cast<int>(num_worst_tokens);
  notify.result = exact ? &b.host_device->result : nullptr;
  notify.result_tag = exact ? ++b.host_seq : 0;
  notify.signature = sig;
  notify.rank_prefix = rank_prefix.data_ptr<int>();
  notify.num_recv_per_expert = num_recv_per_expert.data_ptr<int>();
  notify.send_pos = send_pos.data_ptr<int>();
  launch_notify_dispatch(ref, notify, stream);

  int64_t num_rows = num_worst_tokens;
  if (exact) {
    const NotifyResult result = b.wait_notify(notify.result_tag, stream);
    if (result.error != kNoError) {
      // Every rank saw the same records and stops here; the data kernel of the
      // rejected op does nothing but close it, so the next op starts clean.
      DispatchArgs a = row_pass_args(x, rows, send_pos, rank_prefix, 0, 0, sig);
      launch_dispatch(ref, a, stream);
      raise_notify_error(result, b);
    }
    num_rows = result.num_recv_rows;
  }
  const DispatchTensors out(num_rows, x, rows.scales, topk_idx, topk_weights);
  for_each_pass(layout, rows.row_bytes, [&](int64_t col_offset, int col_bytes) {
    DispatchArgs a = row_pass_args(x, rows, send_pos, rank_prefix, col_offset, col_bytes, sig);
    a.out = out.view();
    if (col_offset == 0) {  // metadata travels with the first pass only
      a.with_meta = true;
      a.topk_idx = topk_idx.data_ptr<int64_t>();
      a.topk_weights = topk_weights.data_ptr<float>();
      a.num_topk = static_cast<int>(num_topk);
    }
    launch_dispatch(b.ref(Op::kDispatch), a, stream);
  });
  return {out.recv_x, out.recv_x_scales, out.recv_topk_idx, out.recv_topk_weights, num_recv_per_expert, send_pos,
          out.recv_src_idx, rank_prefix};
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
  const Tensor x = x_in.contiguous();
  const DispatchRows rows = check_dispatch_rows(x, x_scales_in, b, /*any_width=*/true);
  const Tensor send_pos = send_pos_in.contiguous();
  const Tensor recv_src_idx = recv_src_idx_in.contiguous();
  const Tensor rank_prefix = rank_prefix_in.contiguous();
  check_handle(send_pos, recv_src_idx, rank_prefix, x.size(0), b);

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
  const Tensor y = y_in.contiguous();
  const Tensor send_pos = send_pos_in.contiguous();
  const Tensor recv_src_idx = recv_src_idx_in.contiguous();
  const Tensor rank_prefix = rank_prefix_in.contiguous();
  check_device(y, "y", b.device);
  TORCH_CHECK_VALUE(y.dim() == 2 && y.size(0) == recv_src_idx.size(0),
                    "torch_ep: y must be [N=recv_src_idx.size(0)=", recv_src_idx.size(0), ", C], got ", y.sizes());
  const auto dtype = y.scalar_type();
  TORCH_CHECK_VALUE(is_row_dtype(dtype), "torch_ep: y must be bfloat16, float16, float32 or float64, got ", dtype);
  const int64_t row_bytes = check_row_bytes(y, "y");
  const int64_t num_tokens = send_pos.size(0);
  TORCH_CHECK_VALUE(num_tokens <= layout.max_tokens, "torch_ep: send_pos has ", num_tokens,
                    " tokens, more than the buffer's max_tokens_per_rank=", layout.max_tokens);
  check_handle(send_pos, recv_src_idx, rank_prefix, num_tokens, b);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(b.device);
  const Signature sig = make_signature(Op::kCombine, dtype, row_bytes, 0);
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
    a.signature = sig;
    launch_combine(b.ref(Op::kCombine), a, stream);
  });
  return out;
}

}  // namespace

void peer_copy(const std::string& name, const at::Tensor& src, int64_t num_sms) {
  const auto state = find_buffer(name);
  const BufferState& b = *state;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(b.device));
  check_device(src, "src", b.device);
  TORCH_CHECK_VALUE(src.scalar_type() == at::kByte && src.is_contiguous(),
                    "torch_ep: src must be a contiguous uint8 tensor, got ", src.scalar_type());
  check_aligned(src, "src");
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
