// dispatch's (and cached_dispatch's) data kernel.
//
// Senders: a rank's tokens are cut into chunks (up to buf.step_items tokens,
// fewer when there are too few tokens to give every block one) that blocks
// claim from a counter, so blocks the link serves faster send more. A block's
// sender warps read each token's row once and store it (with FP8 scales and,
// in dispatch's first pass, the metadata) into this rank's own output row and
// into the staging rows of every peer that owns one of its experts, at the
// token's final position among the rows this rank sends there; once the
// chunk is stored they tell each peer which of its rows the chunk holds.
// Receivers of every block claim (chunk, part) units in order and copy a
// landed chunk's rows into their final rows (rank_prefix[s] + row), so the
// copy-out overlaps the transfer. A peer that published a receive window (a
// zero_copy_recv buffer: its outputs are in its buffer) gets the rows that
// fit it straight at their final row, and its receivers copy only the
// metadata.
#include "kernels/intranode.cuh"

namespace torch_ep {
namespace {

// Senders read x once and store to two places; receivers only copy rows that already landed. Eight
// receivers keep the copy-out's tail short (seven left it ~15 us longer at 4096 tokens; the signal warp
// came from the senders instead). With rows in place the receivers copy only metadata, and on grids of
// up to 16 blocks the senders' stores bound the kernel: 17 senders are faster there (12 SMs: 4096
// tokens 254 against 282 us, 16384 tokens 893 against 1009 us; 19 were slower again). Staged rows keep
// 15 at every grid size: 17 won at 4096 tokens (347 against 368 us) but lost at 16384 (1330 against
// 1291 us; FP8 906 against 791 us) and, on 24 blocks, at 4096 (258 against 224 us).
// Staged FP8 rows are half as wide: per byte on the link the receivers copy out twice as many rows, and a
// row costs them its memory latencies whatever its width. 12 senders (11 receivers) beat 15 there (2xH200,
// 4096 / 16384 tokens, 24 SMs: 140.4 / 423.4 against 147.5 / 448.2 us; 14: 142.8 / 429.7; 13: 141.5 / 428.2).
constexpr int kSenderWarps = 15;
constexpr int kInPlaceFewBlocksSenderWarps = 17;
constexpr int kStagedFp8SenderWarps = 12;
constexpr int kMostFewBlocks = 16;
template <int kSenders>
constexpr int kReceiverWarps = kSignalWarp - kSenders;  // also the parts that share one landed chunk's rows

// Units (16 bytes a lane) of a token's row loaded with its send_pos (more would spill registers; with
// more ranks the per-rank destinations take them).
template <int kRanks>
constexpr int kPrefetchUnits = kRanks <= 2 ? 4 : 1;

struct DispatchShared {
  PeerShared peer;
  ClaimedSteps claims;       // the chunk of step k, in slot k & 1
  int first[2][kMaxRanks];   // per slot: the chunk's first row among this rank's rows to d (INT_MAX: none yet)
  int rows[2][kMaxRanks];    // per slot: its rows to d
  // Peer d's receive window: its rows below window_capacity[d] (0: none) go to window_rows[d], window_scales[d].
  char* window_rows[kMaxRanks];
  float* window_scales[kMaxRanks];
  int window_capacity[kMaxRanks];
};

// How a rank's tokens are cut into the chunks sender blocks claim: chunks of `size` (chunk_items)
// tokens, except that, with at least two rounds of chunks (one chunk per block), the last round is
// cut kTailSplit times finer. A block's last chunk then ends sooner after the others' (blocks claim
// dynamically, so they finish within about one chunk of each other), and so does the receivers'
// copy-out after the last chunk lands.
constexpr int kTailSplit = 2;

struct TokenChunks {
  int size, big, small, num_chunks;  // big: chunks of `size` tokens, then chunks of `small`

  __device__ TokenChunks(int num_tokens, int num_blocks, int step_items, int senders) {
    size = chunk_items(num_tokens, num_blocks, step_items);
    const int round = num_blocks * size;
    // small chunks keep every sender warp busy (one token each) where the size allows
    small = num_tokens >= 2 * round ? max(size / kTailSplit, min(size, senders)) : size;
    big = small < size ? (num_tokens - round) / size : 0;
    num_chunks = big + static_cast<int>(ceil_div(num_tokens - big * size, small));
  }
  __device__ int first_token(int chunk) const {
    return chunk < big ? chunk * size : big * size + (chunk - big) * small;
  }
  __device__ int tokens(int chunk) const { return chunk < big ? size : small; }
};

// ---- senders -----------------------------------------------------------------------------------

// Peer d's receive window for this dispatch, from the record its notify kernel left in this rank's buffer
// (which this op's notify kernel waited for); none unless the call has one.
__device__ void load_window(const BufferRef& buf, DispatchShared& sh, const DispatchArgs& a, uint64_t epoch, int d) {
  const BufferLayout& layout = buf.layout;
  int capacity = 0;
  if (a.peer_windows && d < layout.num_ranks && d != buf.rank) {
    const int* window = layout.notify_record(buf.peers[buf.rank], static_cast<int>(epoch & 1), d) +
                        layout.record_window_offset();
    char* base = buf.peers[d];
    sh.window_rows[d] = base + load_landed(window) * kWindowUnit;
    sh.window_scales[d] = reinterpret_cast<float*>(base + load_landed(window + 1) * kWindowUnit);
    capacity = load_landed(window + 2);
  }
  sh.window_capacity[d] = capacity;
}

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

// Tells every peer how many chunks this rank sends it; waits first, where no
// notify kernel did, until the peer has entered this op (a peer that never
// does gets nothing). Every block waits; block 0 tells. Then the block
// claims its first chunk, or none if it finds the op failed (one answer for
// all its sender warps).
template <int kSenders>
__device__ void open_sends(const BufferRef& buf, DispatchShared& sh, const DispatchArgs& a, uint64_t epoch,
                           int num_chunks) {
  const BufferLayout& layout = buf.layout;
  const int d = lane_id(), rank = buf.rank;
  if (warp_id() == 0) {
    const bool peer = d < layout.num_ranks && d != rank;
    const bool arrived = !peer || !a.handshake || wait_arrival(buf, sh.peer, epoch, d, a.signature);
    if (peer && arrived && blockIdx.x == 0) {
      st_release_sys(layout.opened(sh.peer.peers[d], rank), progress_value(epoch, num_chunks));
    }
    const bool failed = !__all_sync(kFullMask, arrived) || op_failed(buf);
    if (d == 0) claim_first_unit(sh.claims, &buf.control->send_units, failed);
  }
  sender_sync<kSenders>();
}

// Stores token t's row slice (and scales, metadata) into this rank's output
// row, if it has one, and into every peer that owns one of its experts (its
// window, or its staging rows), reading the row once; counts the peers' rows
// in `slot`.
// kRanks >= R sizes the per-lane arrays.
template <int kRanks>
__device__ void send_token(const BufferRef& buf, DispatchShared& sh, const DispatchArgs& a, int64_t t, int slot,
                           int lane) {
  const BufferLayout& layout = buf.layout;
  const int num_ranks = layout.num_ranks, rank = buf.rank;
  const DispatchOutputs& out = a.out;
  // Every load that does not depend on another is issued first: the row's stores wait on send_pos only.
  const bool entry_lane = a.with_meta && lane < a.num_topk;
  const int64_t id = entry_lane ? a.topk_idx[t * a.num_topk + lane] : -1;
  const float weight = entry_lane ? a.topk_weights[t * a.num_topk + lane] : 0.0f;
  constexpr int kScalesPerLane = 2;  // 64 scales: rows up to 8192 wide (a wider FP8 row loads the rest later)
  float scale[kScalesPerLane];
#pragma unroll
  for (int j = 0; j < kScalesPerLane; ++j) {
    const int i = lane + j * kWarpSize;
    scale[j] = a.x_scales != nullptr && i < a.num_scales ? a.x_scales[t * a.num_scales + i] : 0.0f;
  }
  int lane_pos = lane < num_ranks ? a.send_pos[t * num_ranks + lane] : -1;
  const int4* src = reinterpret_cast<const int4*>(a.x + t * a.row_bytes + a.col_offset);
  int4 first[kPrefetchUnits<kRanks>];  // the row's first units, in flight with send_pos
  load_batch(first, src, lane, a.col_bytes / 16);
  if (lane == rank && lane_pos >= out.num_recv_rows) lane_pos = -1;  // past capacity: reported by notify
  if (lane < num_ranks && lane != rank && lane_pos >= 0) {
    atomicAdd(&sh.rows[slot][lane], 1);
    atomicMin(&sh.first[slot][lane], lane_pos - prefix_of(sh.peer, num_ranks, rank, lane));
  }
  int row[kRanks];
  int4* dst[kRanks];
  unsigned placed = 0;  // ranks whose window takes the row
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
    const int at = row[r];  // among r's outputs
    row[r] -= prefix_of(sh.peer, num_ranks, rank, r);
    if (at < sh.window_capacity[r]) {
      placed |= 1u << r;
      dst[r] = reinterpret_cast<int4*>(sh.window_rows[r] + static_cast<int64_t>(at) * a.row_bytes);
    } else {
      dst[r] = reinterpret_cast<int4*>(layout.data_slot(sh.peer.peers[r], BufferLayout::peer_slot(rank, r), row[r]));
    }
  }
  if (!any) return;
  warp_copy_to_ranks(dst, src, a.col_bytes / 16, lane, first);
  if (a.x_scales != nullptr) {  // FP8: the scales go to the window's scales, or after the row in its staging slot
    auto store_scale = [&](int i, float value) {
#pragma unroll
      for (int r = 0; r < kRanks; ++r) {
        if (dst[r] == nullptr) continue;
        const int64_t at = row[r] + (r == rank ? 0 : prefix_of(sh.peer, num_ranks, rank, r));  // among r's rows
        float* scales = r == rank              ? out.recv_x_scales + at * a.num_scales
                        : (placed >> r) & 1u ? sh.window_scales[r] + at * a.num_scales
                                             : reinterpret_cast<float*>(reinterpret_cast<char*>(dst[r]) + a.col_bytes);
        scales[i] = value;
      }
    };
#pragma unroll
    for (int j = 0; j < kScalesPerLane; ++j) {
      if (lane + j * kWarpSize < a.num_scales) store_scale(lane + j * kWarpSize, scale[j]);
    }
    for (int i = lane + kScalesPerLane * kWarpSize; i < a.num_scales; i += kWarpSize) {
      store_scale(i, a.x_scales[t * a.num_scales + i]);
    }
  }
  if (a.with_meta) {
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

// The signal warp, after its system fence: lane d tells peer d where chunk `chunk`'s rows are; then the
// slot's counts are cleared.
__device__ void signal_chunk(const BufferRef& buf, DispatchShared& sh, uint64_t epoch, int chunk, int slot, int lane) {
  const BufferLayout& layout = buf.layout;
  if (lane < layout.num_ranks && lane != buf.rank) {
    const int rows = sh.rows[slot][lane];
    uint64_t* landed = layout.chunk_landed(sh.peer.peers[lane], buf.rank, chunk);
    landed[0] = rows > 0 ? static_cast<uint64_t>(sh.first[slot][lane]) : 0;
    st_release_sys(landed + 1, progress_value(epoch, rows));
  }
  if (lane < kMaxRanks) {
    sh.rows[slot][lane] = 0;
    sh.first[slot][lane] = INT_MAX;
  }
}

template <int kRanks, int kSenders>
__device__ void send_rows(const BufferRef& buf, DispatchShared& sh, const DispatchArgs& a, uint64_t epoch) {
  const int lane = lane_id(), warp = warp_id();
  const TokenChunks chunks(a.num_tokens, gridDim.x, buf.step_items, kSenders);
  open_sends<kSenders>(buf, sh, a, epoch, chunks.num_chunks);
  if (threadIdx.x == 0) trace_at(buf, kTraceSendReady);
  int chunk;
  for (int k = 0; next_unit<kSenders>(sh.claims, &buf.control->send_units, k, chunks.num_chunks, chunk); ++k) {
    const int slot = k & 1;
    const int first = chunks.first_token(chunk), end = min(a.num_tokens, first + chunks.tokens(chunk));
    for (int t = first + warp; t < end; t += kSenders) send_token<kRanks>(buf, sh, a, t, slot, lane);
    trace_last(buf, kTraceStoresIssued);
    finish_unit<kSenders>(sh.claims, k, chunk);
  }
}

__device__ void signal_chunks(const BufferRef& buf, DispatchShared& sh, uint64_t epoch) {
  const int lane = lane_id();
  signal_steps(sh.claims, [&](int chunk, int slot, int k) {
    signal_chunk(buf, sh, epoch, chunk, slot, lane);
    if (k == 0 && lane == 0) trace_at(buf, kTraceFirstStep);
  });
  trace_last(buf, kTraceSendDone);
}

// ---- receivers ---------------------------------------------------------------------------------

// Copies staged row `row` of source s into output row out_row (only its metadata when the row and its
// scales landed in place).
__device__ void receive_row(const BufferRef& buf, const PeerShared& peer, const DispatchArgs& a, int s, int row,
                            int64_t out_row, int lane) {
  const BufferLayout& layout = buf.layout;
  const DispatchOutputs& out = a.out;
  char* own = peer.peers[buf.rank];
  const int slot = BufferLayout::peer_slot(s, buf.rank);
  const char* data = layout.data_slot(own, slot, row);
  if (!a.rows_in_place) {
    warp_copy<true>(reinterpret_cast<int4*>(out.recv_x + out_row * a.row_bytes + a.col_offset),
                    reinterpret_cast<const int4*>(data), a.col_bytes / 16, lane);
  }
  if (a.x_scales != nullptr && !a.rows_in_place) {  // two scales a lane in flight (one latency for H <= 8192)
    const float* scales = reinterpret_cast<const float*>(data + a.col_bytes);
    for (int i = lane; i < a.num_scales; i += 2 * kWarpSize) {
      const int j = i + kWarpSize;
      const float first = load_landed(scales + i), second = j < a.num_scales ? load_landed(scales + j) : 0.0f;
      out.recv_x_scales[out_row * a.num_scales + i] = first;
      if (j < a.num_scales) out.recv_x_scales[out_row * a.num_scales + j] = second;
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

// Rows that peers land here, copied out as their chunks land. Units are
// (chunk, part), claimed in order across every block's receivers: chunk c of
// each peer in turn, part p copying rows p, p + kParts, ... of it (kParts: the receiver warps of a block).
template <int kParts>
__device__ void receive_peer_rows(const BufferRef& buf, const DispatchShared& sh, const DispatchArgs& a,
                                  uint64_t epoch, int lane) {
  const BufferLayout& layout = buf.layout;
  const int num_ranks = layout.num_ranks, rank = buf.rank, peers = num_ranks - 1;
  char* own = sh.peer.peers[rank];
  int chunks = 0;  // lane s: chunks peer s sends here
  bool failed = false;
  if (lane < num_ranks && lane != rank) {
    const uint64_t opened = wait_flag(layout.opened(own, lane), progress_value(epoch, 0), buf, lane);
    failed = opened < progress_value(epoch, 0);
    chunks = static_cast<int>(static_cast<uint32_t>(opened));
  }
  if (peers == 0 || __any_sync(kFullMask, failed)) return;  // alone, or the op failed (the counts are not this op's)
  const int most = __reduce_max_sync(kFullMask, chunks);
  for (;;) {
    unsigned claimed = 0;
    if (lane == 0) claimed = atomicAdd(&buf.control->receive_units, 1u);
    claimed = __shfl_sync(kFullMask, claimed, 0);
    const int unit = static_cast<int>(claimed / kParts), part = static_cast<int>(claimed % kParts);
    const int chunk = unit / peers, s = (rank + 1 + unit % peers) % num_ranks;
    if (chunk >= most) break;
    if (chunk >= __shfl_sync(kFullMask, chunks, s)) continue;
    uint64_t* landed = layout.chunk_landed(own, s, chunk);
    const uint64_t seen = wait_flag(landed + 1, progress_value(epoch, 0), buf, s);
    if (seen < progress_value(epoch, 0)) return;  // the op failed
    if (claimed == 0 && lane == 0) trace_at(buf, kTraceFirstLanded);
    const int rows = static_cast<int>(static_cast<uint32_t>(seen));
    const int first = static_cast<int>(__ldcg(reinterpret_cast<const unsigned long long*>(landed)));
    const int64_t out_base = prefix_of(sh.peer, num_ranks, s, rank) + first;
    for (int j = part; j < rows; j += kParts) {
      if (out_base + j < a.out.num_recv_rows) receive_row(buf, sh.peer, a, s, first + j, out_base + j, lane);
    }
  }
}

// Rows past the received ones (fixed-capacity outputs): metadata that says "no
// token"; cached_dispatch also zeroes them so padding rows get zero gradients.
template <int kReceivers>
__device__ void fill_padding_rows(const BufferRef& buf, const DispatchShared& sh, const DispatchArgs& a,
                                  int receiver, int lane) {
  const int num_ranks = buf.layout.num_ranks;
  const DispatchOutputs& out = a.out;
  const int step = gridDim.x * kReceivers;
  for (int64_t row = prefix_of(sh.peer, num_ranks, num_ranks, buf.rank) + blockIdx.x * kReceivers + receiver;
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

template <int kSenders>
__device__ void receive_rows(const BufferRef& buf, const DispatchShared& sh, const DispatchArgs& a, uint64_t epoch) {
  const int receiver = warp_id() - kSenders, lane = lane_id();
  receive_peer_rows<kReceiverWarps<kSenders>>(buf, sh, a, epoch, lane);
  fill_padding_rows<kReceiverWarps<kSenders>>(buf, sh, a, receiver, lane);
  trace_last(buf, kTraceReceiveDone);
}

// Exact mode: notify's answer (control->answer, written by the kernel before this one) to the host
// that waits for it, even when the op was rejected or failed.
__device__ void relay_answer(const BufferRef& buf, const DispatchArgs& a) {
  const NotifyResult* from = &buf.control->answer;
  a.relay->num_recv_rows = load_landed(&from->num_recv_rows);
  a.relay->error = load_landed(&from->error);
  a.relay->error_rank = load_landed(&from->error_rank);
  a.relay->error_value = load_landed(&from->error_value);
  a.relay->own_bad_ids = load_landed(&from->own_bad_ids);
  a.relay->own_bad_id = load_landed(&from->own_bad_id);
  st_release_sys(&a.relay->tag, a.relay_tag);  // orders the fields before the tag
}

// kRanks: the number of ranks rounded up to 2, 4 or 8; kSenders: sender warps of a block.
template <int kRanks, int kSenders>
__global__ void __launch_bounds__(kDataThreads, 1) dispatch_kernel(BufferRef buf, DispatchArgs a) {
  __shared__ DispatchShared sh;
  wait_prior_kernel();  // launched to overlap its notify kernel's end
  const uint64_t epoch = op_epoch(buf);
  if (threadIdx.x == 0) trace_at(buf, kTraceStart);
  // a receiver thread: receivers wait for the first chunk anyway
  if (a.relay != nullptr && blockIdx.x == 0 && threadIdx.x == kSenders * kWarpSize) relay_answer(buf, a);
  if (op_aborted(buf, epoch)) {
    finish_op(buf, epoch);
    return;
  }
  if (threadIdx.x < 2 * kMaxRanks) {
    (&sh.first[0][0])[threadIdx.x] = INT_MAX;
    (&sh.rows[0][0])[threadIdx.x] = 0;
  }
  if (threadIdx.x == 0) init_steps(sh.claims, true);
  if (threadIdx.x < kMaxRanks) load_window(buf, sh, a, epoch, threadIdx.x);
  load_peer_shared(sh.peer, buf, a.rank_prefix);
  if (warp_id() < kSenders) {
    if (a.handshake) announce_arrival(buf, sh.peer, epoch, a.signature);
    send_rows<kRanks, kSenders>(buf, sh, a, epoch);
  } else if (warp_id() == kSignalWarp) {
    signal_chunks(buf, sh, epoch);
  } else {
    receive_rows<kSenders>(buf, sh, a, epoch);
  }
  finish_op(buf, epoch);
  if (threadIdx.x == 0) trace_at(buf, kTraceEnd);
}

// Exact-mode dispatch whose data kernel had a.fill_from output rows while the call has more: the
// rows it dropped, rebuilt from where they still are. This rank's own rows from x; peers' rows from
// this rank's staging, which no peer writes again before this rank enters its next op (handshake).
__global__ void __launch_bounds__(kDataThreads, 1) dispatch_fill_kernel(BufferRef buf, DispatchArgs a) {
  __shared__ PeerShared sh;
  load_peer_shared(sh, buf, a.rank_prefix);
  if (block_op_failed(buf)) return;  // the staging rows may not have landed
  const int num_ranks = buf.layout.num_ranks, rank = buf.rank, lane = lane_id();
  const DispatchOutputs& out = a.out;
  const int64_t first_warp = static_cast<int64_t>(blockIdx.x) * kDataWarps + warp_id(), warps = gridDim.x * kDataWarps;
  for (int64_t t = first_warp; t < a.num_tokens; t += warps) {
    const int64_t row = a.send_pos[t * num_ranks + rank];
    if (row < a.fill_from || row >= out.num_recv_rows) continue;
    warp_copy<false>(reinterpret_cast<int4*>(out.recv_x + row * a.row_bytes),
                     reinterpret_cast<const int4*>(a.x + t * a.row_bytes), a.col_bytes / 16, lane);
    for (int i = lane; i < a.num_scales && a.x_scales != nullptr; i += kWarpSize) {
      out.recv_x_scales[row * a.num_scales + i] = a.x_scales[t * a.num_scales + i];
    }
    const bool entry_lane = lane < a.num_topk;
    const int64_t id = entry_lane ? a.topk_idx[t * a.num_topk + lane] : -1;
    const float weight = entry_lane ? a.topk_weights[t * a.num_topk + lane] : 0.0f;
    store_recv_meta(out, a.num_topk, row, static_cast<int>(t), id, weight, rank, buf.layout.experts_per_rank(),
                    lane);
  }
  for (int64_t row = a.fill_from + first_warp; row < out.num_recv_rows; row += warps) {
    int s = 0;
    while (s < num_ranks - 1 && prefix_of(sh, num_ranks, s + 1, rank) <= row) ++s;
    if (s != rank) receive_row(buf, sh, a, s, static_cast<int>(row - prefix_of(sh, num_ranks, s, rank)), row, lane);
  }
}

template <int kSenders>
auto dispatch_kernel_for(int num_ranks) {
  return num_ranks <= 2 ? dispatch_kernel<2, kSenders> : num_ranks <= 4 ? dispatch_kernel<4, kSenders>
                                                                        : dispatch_kernel<8, kSenders>;
}

}  // namespace

void launch_dispatch_fill(const BufferRef& buf, const DispatchArgs& args, cudaStream_t stream) {
  dispatch_fill_kernel<<<buf.num_sms, kDataThreads, 0, stream>>>(buf, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_dispatch(const BufferRef& buf, const DispatchArgs& args, cudaStream_t stream) {
  const int num_ranks = buf.layout.num_ranks;
  const bool staged_fp8 = args.x_scales != nullptr && !args.rows_in_place;
  auto kernel = args.rows_in_place && buf.num_sms <= kMostFewBlocks
                    ? dispatch_kernel_for<kInPlaceFewBlocksSenderWarps>(num_ranks)
                : staged_fp8 ? dispatch_kernel_for<kStagedFp8SenderWarps>(num_ranks)
                             : dispatch_kernel_for<kSenderWarps>(num_ranks);
  launch_overlapping(kernel, buf.num_sms, kDataThreads, stream, buf, args);
}

}  // namespace torch_ep
