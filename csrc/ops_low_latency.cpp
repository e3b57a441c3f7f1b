// CUDA implementations of the low-latency ops (schemas in registration.cpp,
// semantics in torch_ep/low_latency.py): input checks, static-shape outputs and
// one kernel launch each. Nothing here reads device data or waits on the host,
// so every op can be captured in a CUDA graph. Bad arguments raise ValueError.
#include <algorithm>
#include <cstdint>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "contract.h"
#include "kernels/api.cuh"
#include "runtime/buffer.h"

namespace torch_ep {
namespace {

using at::Tensor;

void check_on(const Tensor& t, const char* name, const BufferState& b) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.get_device() == b.device, "torch_ep: ", name, " must be on cuda:", b.device,
                    ", got ", t.device());
}

// The buffer of a low-latency op; raises an earlier op's error first.
BufferState& ll_buffer(const std::shared_ptr<BufferState>& state, const char* op) {
  TORCH_CHECK_VALUE(state->layout.low_latency.enabled(), "torch_ep: ", op,
                    ": the Buffer was created without low_latency=True");
  state->raise_deferred_error();
  return *state;
}

int64_t local_experts(const BufferState& b) { return b.layout.experts_per_rank(); }

// M = R * T_ll * min(K, E/R): the static row count of a dispatch with top-K routing.
int64_t num_rows(const BufferState& b, int64_t num_topk) {
  const LowLatencyLayout& ll = b.layout.low_latency;
  return int64_t(ll.num_ranks) * ll.max_tokens * std::min(num_topk, local_experts(b));
}

// token_rows [R, T_ll, K] int32 and dest_ranks [T] int32 from a dispatch on this buffer.
void check_handle(const Tensor& token_rows, const Tensor& dest_ranks, const BufferState& b) {
  const LowLatencyLayout& ll = b.layout.low_latency;
  check_on(token_rows, "token_rows", b);
  check_on(dest_ranks, "dest_ranks", b);
  TORCH_CHECK_VALUE(token_rows.scalar_type() == at::kInt && token_rows.dim() == 3 &&
                        token_rows.size(0) == ll.num_ranks && token_rows.size(1) == ll.max_tokens &&
                        token_rows.size(2) >= 1 && token_rows.size(2) <= kMaxTopk,
                    "torch_ep: token_rows must be int32 [R=", ll.num_ranks, ", T_ll=", ll.max_tokens, ", K], got ",
                    type_name(token_rows.scalar_type()), " ", token_rows.sizes());
  TORCH_CHECK_VALUE(dest_ranks.scalar_type() == at::kInt && dest_ranks.dim() == 1 &&
                        dest_ranks.size(0) <= ll.max_tokens,
                    "torch_ep: dest_ranks must be int32 [T <= ", ll.max_tokens, "], got ",
                    type_name(dest_ranks.scalar_type()), " ", dest_ranks.sizes());
}

// bf16 rows [rows, C], C <= hidden and a multiple of 8 (kernels move 16-byte units).
void check_rows(const Tensor& t, const char* name, int64_t rows, const BufferState& b) {
  check_on(t, name, b);
  TORCH_CHECK_VALUE(t.scalar_type() == at::kBFloat16 && t.dim() == 2 && t.size(0) == rows &&
                        t.size(1) <= b.layout.hidden && t.size(1) % 8 == 0,
                    "torch_ep: ", name, " must be bfloat16 [", rows, ", C] with C <= hidden=", b.layout.hidden,
                    " and C a multiple of 8, got ", type_name(t.scalar_type()), " ", t.sizes());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> low_latency_dispatch(
    const Tensor& x_in, const Tensor& topk_idx_in, const Tensor& topk_weights_in, c10::string_view buffer,
    bool use_fp8) {
  const auto state = find_buffer(std::string(buffer));
  const BufferState& b = ll_buffer(state, "low_latency_dispatch");
  const int64_t hidden = b.layout.hidden;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(b.device));
  const Tensor x = kernel_input(x_in);
  const Tensor topk_idx = topk_idx_in.contiguous();
  const Tensor topk_weights = topk_weights_in.contiguous();
  check_on(x, "x", b);
  check_on(topk_idx, "topk_idx", b);
  check_on(topk_weights, "topk_weights", b);
  TORCH_CHECK_VALUE(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == hidden,
                    "torch_ep: x must be bfloat16 [T, hidden=", hidden, "], got ", type_name(x.scalar_type()), " ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.size(0) <= b.layout.max_tokens, "torch_ep: x has ", x.size(0),
                    " tokens, more than the buffer's max_tokens_per_rank=", b.layout.max_tokens);
  TORCH_CHECK_VALUE(hidden % 8 == 0, "torch_ep: low-latency rows need hidden to be a multiple of 8, got ", hidden);
  TORCH_CHECK_VALUE(!use_fp8 || hidden % kScaleBlock == 0, "torch_ep: use_fp8 needs hidden to be a multiple of ",
                    kScaleBlock, ", got ", hidden);
  TORCH_CHECK_VALUE(topk_idx.scalar_type() == at::kLong && topk_idx.dim() == 2 && topk_idx.size(0) == x.size(0) &&
                        topk_idx.size(1) >= 1 && topk_idx.size(1) <= kMaxTopk,
                    "torch_ep: topk_idx must be int64 [T=", x.size(0), ", K] with 1 <= K <= ", kMaxTopk, ", got ",
                    type_name(topk_idx.scalar_type()), " ", topk_idx.sizes());
  TORCH_CHECK_VALUE(topk_weights.scalar_type() == at::kFloat && topk_weights.sizes() == topk_idx.sizes(),
                    "torch_ep: topk_weights must be float32 ", topk_idx.sizes(), ", got ",
                    type_name(topk_weights.scalar_type()), " ", topk_weights.sizes());

  const int64_t num_topk = topk_idx.size(1), m = num_rows(b, num_topk);
  const auto i32 = x.options().dtype(at::kInt);
  Tensor recv_x = at::empty({m, hidden}, x.options().dtype(use_fp8 ? at::kFloat8_e4m3fn : at::kBFloat16));
  Tensor recv_scales = at::empty({m, use_fp8 ? hidden / kScaleBlock : 0}, x.options().dtype(at::kFloat));
  Tensor recv_weights = at::empty({m}, x.options().dtype(at::kFloat));
  Tensor expert_offsets = at::empty({local_experts(b)}, i32);
  Tensor expert_counts = at::empty({local_experts(b)}, i32);
  Tensor token_rows = at::empty({b.layout.num_ranks, b.layout.max_tokens, num_topk}, i32);
  Tensor dest_ranks = at::empty({x.size(0)}, i32);

  LowLatencyDispatchArgs a{};
  a.x = x.data_ptr();
  a.topk_idx = topk_idx.data_ptr<int64_t>();
  a.topk_weights = topk_weights.data_ptr<float>();
  a.num_tokens = static_cast<int>(x.size(0));
  a.num_topk = static_cast<int>(num_topk);
  a.use_fp8 = use_fp8;
  a.recv_x = recv_x.data_ptr();
  a.recv_scales = recv_scales.data_ptr<float>();
  a.recv_weights = recv_weights.data_ptr<float>();
  a.expert_offsets = expert_offsets.data_ptr<int>();
  a.expert_counts = expert_counts.data_ptr<int>();
  a.token_rows = token_rows.data_ptr<int>();
  a.dest_ranks = dest_ranks.data_ptr<int>();
  a.signature =  // rows as they cross the link: bf16, or fp8 (with scales)
      make_signature(Op::kLowLatencyDispatch, recv_x.scalar_type(), hidden * recv_x.element_size(), num_topk);
  launch_low_latency_dispatch(b.ref(Op::kLowLatencyDispatch), a, at::cuda::getCurrentCUDAStream(b.device));
  return {recv_x, recv_scales, recv_weights, expert_offsets, expert_counts, token_rows, dest_ranks};
}

Tensor low_latency_cached_dispatch(const Tensor& x_in, const Tensor& token_rows_in, const Tensor& dest_ranks_in,
                                   c10::string_view buffer) {
  const auto state = find_buffer(std::string(buffer));
  const BufferState& b = ll_buffer(state, "low_latency_cached_dispatch");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(b.device));
  const Tensor x = kernel_input(x_in);
  const Tensor token_rows = token_rows_in.contiguous();
  const Tensor dest_ranks = dest_ranks_in.contiguous();
  check_handle(token_rows, dest_ranks, b);
  check_rows(x, "x", dest_ranks.size(0), b);
  Tensor out = at::zeros({num_rows(b, token_rows.size(2)), x.size(1)}, x.options());

  LowLatencyCachedDispatchArgs a{};
  a.x = x.data_ptr();
  a.cols = static_cast<int>(x.size(1));
  a.num_tokens = static_cast<int>(x.size(0));
  a.num_topk = static_cast<int>(token_rows.size(2));
  a.token_rows = token_rows.data_ptr<int>();
  a.dest_ranks = dest_ranks.data_ptr<int>();
  a.out = out.data_ptr();
  a.signature = make_signature(Op::kLowLatencyCachedDispatch, x.scalar_type(), x.size(1) * x.element_size(),
                               a.num_topk);
  launch_low_latency_cached_dispatch(b.ref(Op::kLowLatencyCachedDispatch), a,
                                     at::cuda::getCurrentCUDAStream(b.device));
  return out;
}

Tensor low_latency_combine(const Tensor& y_in, const Tensor& weights_in, const Tensor& token_rows_in,
                           const Tensor& dest_ranks_in, c10::string_view buffer) {
  const auto state = find_buffer(std::string(buffer));
  const BufferState& b = ll_buffer(state, "low_latency_combine");
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(b.device));
  const Tensor y = kernel_input(y_in);
  const Tensor weights = weights_in.contiguous();
  const Tensor token_rows = token_rows_in.contiguous();
  const Tensor dest_ranks = dest_ranks_in.contiguous();
  check_handle(token_rows, dest_ranks, b);
  const int64_t m = num_rows(b, token_rows.size(2));
  check_rows(y, "y", m, b);
  check_on(weights, "weights", b);
  TORCH_CHECK_VALUE(weights.scalar_type() == at::kFloat && weights.dim() == 1 && weights.size(0) == m,
                    "torch_ep: weights must be float32 [M=", m, "], got ", type_name(weights.scalar_type()), " ",
                    weights.sizes());
  Tensor out = at::empty({dest_ranks.size(0), y.size(1)}, y.options());

  LowLatencyCombineArgs a{};
  a.y = y.data_ptr();
  a.weights = weights.data_ptr<float>();
  a.cols = static_cast<int>(y.size(1));
  a.num_tokens = static_cast<int>(dest_ranks.size(0));
  a.num_topk = static_cast<int>(token_rows.size(2));
  a.token_rows = token_rows.data_ptr<int>();
  a.dest_ranks = dest_ranks.data_ptr<int>();
  a.out = out.data_ptr();
  a.signature = make_signature(Op::kLowLatencyCombine, y.scalar_type(), y.size(1) * y.element_size(), a.num_topk);
  launch_low_latency_combine(b.ref(Op::kLowLatencyCombine), a, at::cuda::getCurrentCUDAStream(b.device));
  return out;
}

}  // namespace
}  // namespace torch_ep

TORCH_LIBRARY_IMPL(ep, CUDA, m) {
  m.impl("low_latency_dispatch", &torch_ep::low_latency_dispatch);
  m.impl("low_latency_cached_dispatch", &torch_ep::low_latency_cached_dispatch);
  m.impl("low_latency_combine", &torch_ep::low_latency_combine);
}
