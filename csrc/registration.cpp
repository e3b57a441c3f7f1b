// The `ep` operator schemas (the single definition of each op's signature) and
// the `_C` Python module, whose import runs these static registrations.
//
// Implementations: CUDA in csrc/ops_cuda.cpp (TORCH_LIBRARY_IMPL(ep, CUDA)); CPU and the
// ProcessGroup transport (pg_*, CPU and CUDA) in torch_ep/cpu.py; fake and autograd rules in
// torch_ep/ops.py.
//
// Handle tensors shared by dispatch, cached_dispatch and combine:
//   send_pos    [T, R] int32   row on rank d where local token t landed, -1 if not sent
//   recv_src_idx [N] int32     source token index of each received row, -1 for padding
//   rank_prefix [R+1, R] int32 rank_prefix[s, d] = rows that sources < s sent to d;
//                              row R holds the total rows each rank received
//
// Low-latency handle (torch_ep/low_latency.py), M = R * T_ll * min(K, E/R) static rows:
//   token_rows [R, T_ll, K] int32  receiver side: row of (source, source token, k-th entry), -1 if
//                                  the entry names no local expert or repeats an earlier entry's expert
//   dest_ranks [T] int32           home side: bit d set if local token t went to rank d
#include <torch/library.h>

// Signatures of the ops that move rows. Each is written once and defined under two names: the op
// users call (`dispatch`, ...) and its ProcessGroup-transport twin (`pg_dispatch`, ...), which the
// CUDA kernels call for a buffer without NVLink state (torch_ep/cpu.py registers their kernels).
#define EP_DISPATCH_SIGNATURE                                                                          \
  "(Tensor x, Tensor? x_scales, Tensor topk_idx, Tensor topk_weights, str buffer, "                   \
  "int expert_alignment=1, int num_worst_tokens=0) -> "                                               \
  "(Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_idx, Tensor recv_topk_weights, "             \
  "Tensor num_recv_tokens_per_expert, Tensor send_pos, Tensor recv_src_idx, Tensor rank_prefix)"
#define EP_CACHED_DISPATCH_SIGNATURE                                                                   \
  "(Tensor x, Tensor? x_scales, Tensor send_pos, Tensor recv_src_idx, Tensor rank_prefix, str buffer) " \
  "-> (Tensor recv_x, Tensor recv_x_scales)"
#define EP_COMBINE_SIGNATURE \
  "(Tensor y, Tensor send_pos, Tensor recv_src_idx, Tensor rank_prefix, str buffer) -> Tensor"

TORCH_LIBRARY(ep, m) {
  m.def(
      "get_dispatch_layout(Tensor topk_idx, int num_experts, int num_ranks) -> "
      "(Tensor num_tokens_per_rank, Tensor num_tokens_per_expert, Tensor is_token_in_rank)");
  m.def("dispatch" EP_DISPATCH_SIGNATURE);
  m.def("cached_dispatch" EP_CACHED_DISPATCH_SIGNATURE);
  m.def("combine" EP_COMBINE_SIGNATURE);
  m.def("pg_dispatch" EP_DISPATCH_SIGNATURE);
  m.def("pg_cached_dispatch" EP_CACHED_DISPATCH_SIGNATURE);
  m.def("pg_combine" EP_COMBINE_SIGNATURE);
  m.def(
      "low_latency_dispatch(Tensor x, Tensor topk_idx, Tensor topk_weights, str buffer, bool use_fp8=False) -> "
      "(Tensor recv_x, Tensor recv_x_scales, Tensor recv_weights, Tensor expert_offsets, "
      "Tensor num_recv_tokens_per_expert, Tensor token_rows, Tensor dest_ranks)");
  m.def("low_latency_cached_dispatch(Tensor x, Tensor token_rows, Tensor dest_ranks, str buffer) -> Tensor");
  m.def(
      "low_latency_combine(Tensor y, Tensor weights, Tensor token_rows, Tensor dest_ranks, str buffer) -> Tensor");
}
