// dispatch's (and cached_dispatch's) data kernel.
//
// Block b of every rank owns the b-th even slice of its rank's tokens. Its
// sender warps read each token's row once and store it (with FP8 scales and,
// in dispatch's first pass, the metadata) into this rank's own output row and
// into the staging rows of every peer that owns one of its experts, at the
// token's final position among the rows this rank sends there; they raise
// progress after every step. Its receiver warps copy out the rows that peer
// block b has landed here, step by step, into their final rows
// (rank_prefix[s] + row), so the copy-out overlaps the transfer.
#include "kernels/intranode.cuh"

namespace torch_ep {
namespace {

// Senders read x once and store to two places; receivers only copy rows that already landed.
constexpr int kSenderWarps = 16;
constexpr int kReceiverWarps = kDataWarps - kSenderWarps;

struct DispatchShared {
  PeerShared peer;
  int first_row[kMaxRanks];    // senders: row (among this rank's rows on d) of this block's first row to d
};

// Dynamic shared memory of the kernel: [R][steps + 1] rows per (destination,
// step) then scanned, and [steps] step counters.
inline int max_steps(int num_tokens, int num_blocks, int step_items) {
  return static_cast<int>(ceil_div(ceil_div(num_tokens, num_blocks), step_items));
}

// ---- senders -----------------------------------------------------------------------------------

// Received-row metadata: local expert ids (-1 for experts of other ranks),
// their weights (0 elsewhere) and the source token index.
__device__ void store_recv_meta(const DispatchOutputs& out, int num_topk, int64_t row, int src_token,
                                int64_t global_id, float weight, int rank, int experts_per_rank, int lane) {
  if (lane == 0) out.recv_src_idx[row] = src_token;
  if (lane < num_topk) {
    const int64_t local = local_expert(global_id, rank, experts_per_rank);
    out.recv_topk_idx[row * num_topk + lane] = local;
    out.recv_topk_weights[row * num_topk + lane] = local >= 0 ? weight : 0.0f;
  }
}


// Rows per (destination, step) of this block's tokens, scanned; the first row to each destination.
__device__ void plan_sends(const BufferRef& buf, DispatchShared& sh, const DispatchArgs& a, Range tokens,
                           int num_steps, int* step_rows, int* step_counters) {
  const int num_ranks = buf.layout.num_ranks, rank = buf.rank, lane = lane_id(), warp = warp_id();
  const int stride = num_steps + 1;
  for (int k = warp; k < num_steps; k += kSenderWarps) {
    if (lane == 0) {  // lane 0 alone touches the counts: no write by one lane races another's read
      for (int d = 0; d < num_ranks; ++d) step_rows[d * stride + k + 1] = 0;
    }
    for (int base = 0; base < buf.step_items; base += kWarpSize) {
      const int64_t t = tokens.begin + static_cast<int64_t>(k) * buf.step_items + base + lane;
      const bool valid = base + lane < buf.step_items && t < tokens.end;
      for (int d = 0; d < num_ranks; ++d) {
        const int pos = valid ? a.send_pos[t * num_ranks + d] : -1;
        const unsigned rows = __ballot_sync(kFullMask, pos >= 0);
        if (lane == 0) step_rows[d * stride + k + 1] += __popc(rows);
        if (rows != 0 && lane == __ffs(rows) - 1) {
          atomicMin(&sh.first_row[d], pos - prefix_of(sh.peer, num_ranks, rank, d));
        }
      }
    }
    if (lane == 0) step_counters[k] = 0;
  }
  sender_sync<kSenderWarps>();
  if (warp == 0 && lane < num_ranks) {
    int running = 0;
    step_rows[lane * stride] = 0;
    for (int k = 1; k <= num_steps; ++k) {
      running += step_rows[lane * stride + k];
      step_rows[lane * stride + k] = running;
    }
  }
  sender_sync<kSenderWarps>();
}

// Tells every peer which of its rows this block sends (header) and that none
// has landed yet; waits first, where no notify kernel did, until the peer
// has entered this op (a peer that never does gets nothing).
__device__ void open_sends(const BufferRef& buf, const DispatchShared& sh, const DispatchArgs& a, uint64_t epoch,
                           const int* step_rows, int num_steps) {
  const BufferLayout& layout = buf.layout;
  const int d = lane_id(), rank = buf.rank;
  if (warp_id() == 0 && d < layout.num_ranks && d != rank &&
      (!a.handshake || wait_arrival(buf, sh.peer, epoch, d, a.signature))) {
    const int total = step_rows[d * (num_steps + 1) + num_steps];
    const uint64_t first = total > 0 ? static_cast<uint64_t>(sh.first_row[d]) : 0;
    *layout.header(sh.peer.peers[d], static_cast<int>(epoch & 1), rank, blockIdx.x) = (first << 32) | total;
    red_max_release_sys(layout.progress(sh.peer.peers[d], rank, blockIdx.x), progress_value(epoch, 0));
  }
  sender_sync<kSenderWarps>();
}

// Stores token t's row slice (and scales, metadata) into this rank's output
// row, if it has one, and into the staging rows of every peer that owns one of
// its experts, reading the row once. kRanks >= R sizes the per-lane arrays.
template <int kRanks>
__device__ void send_token(const BufferRef& buf, const DispatchShared& sh, const DispatchArgs& a, int64_t t,
                           int lane) {
  const BufferLayout& layout = buf.layout;
  const int num_ranks = layout.num_ranks, rank = buf.rank;
  const DispatchOutputs& out = a.out;
  int lane_pos = lane < num_ranks ? a.send_pos[t * num_ranks + lane] : -1;
  if (lane == rank && lane_pos >= out.num_recv_rows) lane_pos = -1;  // past capacity: reported by notify
  int row[kRanks];
  int4* dst[kRanks];
  bool any = false;
#pragma unroll
  for (int r = 0; r < kRanks; ++r) {
    row[r] = __shfl_sync(kFullMask, lane_pos, r);
    dst[r] = nullptr;
    if (row[r] < 0) continue;
    any = true;
    if (r == rank) {
      dst[r] = reinterpret_cast<int4*>(out.recv_x + static_cast<int64_t>(row[r]) * a.row_bytes + a.col_offset);
      continue;
    }
    row[r] -= prefix_of(sh.peer, num_ranks, rank, r);
    dst[r] = reinterpret_cast<int4*>(layout.data_slot(sh.peer.peers[r], BufferLayout::peer_slot(rank, r), row[r]));
  }
  if (!any) return;
  warp_copy_to_ranks(dst, reinterpret_cast<const int4*>(a.x + t * a.row_bytes + a.col_offset), a.col_bytes / 16,
                     lane);
  if (a.x_scales != nullptr) {  // FP8: the scales follow the row in its staging slot
    for (int i = lane; i < a.num_scales; i += kWarpSize) {
      const float scale = a.x_scales[t * a.num_scales + i];
#pragma unroll
      for (int r = 0; r < kRanks; ++r) {
        if (dst[r] == nullptr) continue;
        float* scales = r == rank ? out.recv_x_scales + static_cast<int64_t>(row[r]) * a.num_scales
                                  : reinterpret_cast<float*>(reinterpret_cast<char*>(dst[r]) + a.col_bytes);
        scales[i] = scale;
      }
    }
  }
  if (a.with_meta) {
    const bool entry_lane = lane < a.num_topk;
    const int64_t id = entry_lane ? a.topk_idx[t * a.num_topk + lane] : -1;
    const float weight = entry_lane ? a.topk_weights[t * a.num_topk + lane] : 0.0f;
    const int wire_id = (id >= 0 && id < layout.num_experts) ? static_cast<int>(id) : -1;
#pragma unroll
    for (int r = 0; r < kRanks; ++r) {
      if (dst[r] == nullptr) continue;
      if (r == rank) {
        store_recv_meta(out, a.num_topk, row[r], static_cast<int>(t), id, weight, rank, layout.experts_per_rank(),
                        lane);
        continue;
      }
      char* meta = layout.meta_row(sh.peer.peers[r], BufferLayout::peer_slot(rank, r), row[r]);
      if (lane == 0) *reinterpret_cast<int*>(meta + kMetaSrcOffset) = static_cast<int>(t);
      if (entry_lane) {
        reinterpret_cast<int*>(meta + kMetaIdxOffset)[lane] = wire_id;
        reinterpret_cast<float*>(meta + kMetaWeightOffset)[lane] = weight;
      }
    }
  }
}

template <int kRanks>
__device__ void send_rows(const BufferRef& buf, DispatchShared& sh, const DispatchArgs& a, uint64_t epoch,
                          Range tokens, int num_steps, int* step_rows, int* step_counters) {
  const BufferLayout& layout = buf.layout;
  const int lane = lane_id(), warp = warp_id(), rank = buf.rank;
  plan_sends(buf, sh, a, tokens, num_steps, step_rows, step_counters);
  open_sends(buf, sh, a, epoch, step_rows, num_steps);
  if (threadIdx.x == 0) trace_at(buf, kTraceSendReady);
  if (__any_sync(kFullMask, op_failed(buf))) return;  // a peer is silent or runs another call: send nothing
  for (int k = 0; k < num_steps; ++k) {
    for (int i = warp; i < buf.step_items; i += kSenderWarps) {
      const int64_t t = tokens.begin + static_cast<int64_t>(k) * buf.step_items + i;
      if (t < tokens.end) send_token<kRanks>(buf, sh, a, t, lane);
    }
    trace_last(buf, kTraceStoresIssued);
    if (finish_step<kSenderWarps>(step_counters, k)) {
      if (lane < layout.num_ranks && lane != rank) {
        red_max_release_sys(layout.progress(sh.peer.peers[lane], rank, blockIdx.x),
                            progress_value(epoch, step_rows[lane * (num_steps + 1) + k + 1]));
      }
      if (k == 0 && lane == 0) trace_at(buf, kTraceFirstStep);
    }
  }
  trace_last(buf, kTraceSendDone);
}

// ---- receivers ---------------------------------------------------------------------------------

// Copies staged row `row` of source s into output row out_row.
__device__ void receive_row(const BufferRef& buf, const DispatchShared& sh, const DispatchArgs& a, int s, int row,
                            int64_t out_row, int lane) {
  const BufferLayout& layout = buf.layout;
  const DispatchOutputs& out = a.out;
  char* own = sh.peer.peers[buf.rank];
  const int slot = BufferLayout::peer_slot(s, buf.rank);
  const char* data = layout.data_slot(own, slot, row);
  warp_copy<true>(reinterpret_cast<int4*>(out.recv_x + out_row * a.row_bytes + a.col_offset),
                  reinterpret_cast<const int4*>(data), a.col_bytes / 16, lane);
  if (a.x_scales != nullptr) {
    const float* scales = reinterpret_cast<const float*>(data + a.col_bytes);
    for (int i = lane; i < a.num_scales; i += kWarpSize) {
      out.recv_x_scales[out_row * a.num_scales + i] = load_landed(scales + i);
    }
  }
  if (a.with_meta) {
    const char* meta = layout.meta_row(own, slot, row);
    const int src_token = load_landed(reinterpret_cast<const int*>(meta + kMetaSrcOffset));
    const bool entry_lane = lane < a.num_topk;
    const int id = entry_lane ? load_landed(reinterpret_cast<const int*>(meta + kMetaIdxOffset) + lane) : -1;
    const float weight =
        entry_lane ? load_landed(reinterpret_cast<const float*>(meta + kMetaWeightOffset) + lane) : 0.0f;
    store_recv_meta(out, a.num_topk, out_row, src_token, id, weight, buf.rank, layout.experts_per_rank(), lane);
  }
}

// Rows that peer block blockIdx.x of every source lands here, copied out as they land.
__device__ void receive_peer_rows(const BufferRef& buf, const DispatchShared& sh, const DispatchArgs& a,
                                  uint64_t epoch, int receiver, int lane) {
  const BufferLayout& layout = buf.layout;
  const int num_ranks = layout.num_ranks, rank = buf.rank;
  char* own = sh.peer.peers[rank];
  for (int i = 1; i < num_ranks; ++i) {
    const int s = (rank + i) % num_ranks;  // staggered so that ranks do not all drain source 0 first
    const uint64_t opened = wait_flag(layout.progress(own, s, blockIdx.x), progress_value(epoch, 0), buf, s);
    if (opened < progress_value(epoch, 0)) return;  // the op failed: the header is not this op's
    int64_t landed = static_cast<uint32_t>(opened);
    if (i == 1 && receiver == 0 && lane == 0) trace_at(buf, kTraceFirstLanded);
    const uint64_t header = __ldcg(reinterpret_cast<const unsigned long long*>(
        layout.header(own, static_cast<int>(epoch & 1), s, blockIdx.x)));
    const int first = static_cast<int>(header >> 32), total = static_cast<int>(header & 0xffffffffu);
    const int64_t out_base = prefix_of(sh.peer, num_ranks, s, rank) + first;
    for (int j = receiver; j < total; j += kReceiverWarps) {
      if (j >= landed) {
        const uint64_t seen = wait_flag(layout.progress(own, s, blockIdx.x), progress_value(epoch, j + 1), buf, s);
        if (seen < progress_value(epoch, j + 1)) return;  // the op failed
        landed = static_cast<uint32_t>(seen);
      }
      if (out_base + j < a.out.num_recv_rows) receive_row(buf, sh, a, s, first + j, out_base + j, lane);
    }
  }
}

// Rows past the received ones (fixed-capacity outputs): metadata that says "no
// token"; cached_dispatch also zeroes them so padding rows get zero gradients.
__device__ void fill_padding_rows(const BufferRef& buf, const DispatchShared& sh, const DispatchArgs& a,
                                  int receiver, int lane) {
  const int num_ranks = buf.layout.num_ranks;
  const DispatchOutputs& out = a.out;
  const int step = gridDim.x * kReceiverWarps;
  for (int64_t row = prefix_of(sh.peer, num_ranks, num_ranks, buf.rank) + blockIdx.x * kReceiverWarps + receiver;
       row < out.num_recv_rows; row += step) {
    if (a.with_meta) {
      store_recv_meta(out, a.num_topk, row, -1, -1, 0.0f, buf.rank, buf.layout.experts_per_rank(), lane);
    }
    if (a.zero_padding) {
      warp_zero(reinterpret_cast<int4*>(out.recv_x + row * a.row_bytes + a.col_offset), a.col_bytes / 16, lane);
      for (int i = lane; i < a.num_scales && a.x_scales != nullptr; i += kWarpSize) {
        out.recv_x_scales[row * a.num_scales + i] = 0.0f;
      }
    }
  }
}

__device__ void receive_rows(const BufferRef& buf, const DispatchShared& sh, const DispatchArgs& a, uint64_t epoch) {
  const int receiver = warp_id() - kSenderWarps, lane = lane_id();
  receive_peer_rows(buf, sh, a, epoch, receiver, lane);
  fill_padding_rows(buf, sh, a, receiver, lane);
  trace_last(buf, kTraceReceiveDone);
}

// kRanks: the number of ranks rounded up to 2, 4 or 8.
template <int kRanks>
__global__ void __launch_bounds__(kDataThreads, 1) dispatch_kernel(BufferRef buf, DispatchArgs a) {
  extern __shared__ int smem[];
  __shared__ DispatchShared sh;
  const uint64_t epoch = op_epoch(buf);
  if (threadIdx.x == 0) trace_at(buf, kTraceStart);
  if (op_aborted(buf, epoch)) {
    finish_op(buf, epoch);
    return;
  }
  if (threadIdx.x < kMaxRanks) sh.first_row[threadIdx.x] = INT_MAX;
  load_peer_shared(sh.peer, buf, a.rank_prefix);
  const Range tokens = block_range(a.num_tokens, blockIdx.x, gridDim.x);
  const int num_steps = static_cast<int>(ceil_div(tokens.end - tokens.begin, buf.step_items));
  if (warp_id() < kSenderWarps) {
    if (a.handshake) announce_arrival(buf, sh.peer, epoch, a.signature);
    int* step_rows = smem;
    send_rows<kRanks>(buf, sh, a, epoch, tokens, num_steps, step_rows, step_rows + buf.layout.num_ranks * (num_steps + 1));
  } else {
    receive_rows(buf, sh, a, epoch);
  }
  finish_op(buf, epoch);
  if (threadIdx.x == 0) trace_at(buf, kTraceEnd);
}

}  // namespace

void launch_dispatch(const BufferRef& buf, const DispatchArgs& args, cudaStream_t stream) {
  const int steps = max_steps(args.num_tokens, buf.num_sms, buf.step_items);
  const size_t smem = static_cast<size_t>(buf.layout.num_ranks * (steps + 1) + steps) * sizeof(int);
  const int num_ranks = buf.layout.num_ranks;
  auto kernel = num_ranks <= 2 ? dispatch_kernel<2> : num_ranks <= 4 ? dispatch_kernel<4> : dispatch_kernel<8>;
  set_dynamic_smem(kernel, smem, "dispatch (progress steps of one block's tokens)");
  kernel<<<buf.num_sms, kDataThreads, smem, stream>>>(buf, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace torch_ep
