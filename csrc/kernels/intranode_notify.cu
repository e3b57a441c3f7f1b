// dispatch's notify kernel: its blocks count what this rank sends (each a
// slice of the tokens); the last block to finish counting sums their counts,
// swaps notify records with every peer (the op's handshake), checks that every
// rank's input is valid and that all ranks run the same op on rows of the same
// shape, and derives the layout of the call (rank_prefix, entries per local
// expert); then every block writes send_pos for its tokens. Records are
// double-buffered by epoch parity, so a peer already in the next dispatch
// cannot overwrite one still being read.
#include "kernels/intranode.cuh"

namespace torch_ep {
namespace {

constexpr int kNotifyThreads = 1024;
constexpr int kNotifyWarps = kNotifyThreads / kWarpSize;
constexpr int kMaskBatch = 4;  // chunks a warp summarises at once
static_assert(kMaxRanks <= 8, "a token's rank mask is kept in a byte");
// Fewest chunks worth a block of their own: below that the blocks' hand-over costs more than it saves.
constexpr int kMinChunksPerBlock = 8;

struct NotifyShared {
  char* peers[kMaxRanks];
  int rank_prefix[(kMaxRanks + 1) * kMaxRanks];
  int warp_totals[kNotifyThreads / kWarpSize];
  int bad_count;   // this block's top-k entries outside [-1, E) (the last block: this rank's)
  int bad_index;   // the first of them
  int error, error_rank, error_value;
  int first_bad;   // check_records: (source, field) of the first problem found
  int row_base[kMaxRanks];  // rows on each rank of this rank's tokens before this block's
  bool last;       // this block finishes the layout
};

// Chunks [begin, end) of this block; chunk_rows holds their rows per destination at [d][c - begin].
struct ChunkRange {
  int begin, end;
};

// Blocks of the notify kernel: at most num_sms, each with kMinChunksPerBlock chunks or more.
__host__ __device__ inline int notify_blocks(int num_tokens, int num_sms) {
  const int chunks = static_cast<int>(ceil_div(num_tokens, kChunkTokens));
  return max(1, min(num_sms, static_cast<int>(ceil_div(chunks, kMinChunksPerBlock))));
}

__host__ __device__ inline int chunks_per_block(int num_tokens, int num_blocks) {
  return static_cast<int>(ceil_div(ceil_div(num_tokens, kChunkTokens), num_blocks));
}

// Rows of this block's chunks before its c-th that go to rank d, from the scanned chunk_rows.
__device__ __forceinline__ int rows_before(const int* chunk_rows, int stride, int d, int c) {
  return chunk_rows[d * stride + c] - chunk_rows[d * stride];
}

__device__ __forceinline__ uint32_t mask_of_token(const NotifyArgs& a, const BufferLayout& layout, int t) {
  return t < a.num_tokens ? token_rank_mask(a.topk_idx + static_cast<int64_t>(t) * a.num_topk, a.num_topk,
                                            layout.num_experts, layout.experts_per_rank())
                          : 0u;
}

// Calls fn(c, mask) for each chunk c of this warp (begin + warp, + kNotifyWarps, ...) with the
// rank mask of this lane's token; the masks of kMaskBatch chunks are loaded before any is used, so
// that their loads overlap.
template <typename Fn>
__device__ __forceinline__ void for_each_chunk_mask(const NotifyArgs& a, const BufferLayout& layout, ChunkRange chunks,
                                                    Fn fn) {
  for (int first = chunks.begin + warp_id(); first < chunks.end; first += kNotifyWarps * kMaskBatch) {
    uint32_t masks[kMaskBatch];
#pragma unroll
    for (int u = 0; u < kMaskBatch; ++u) {
      const int c = first + u * kNotifyWarps;
      masks[u] = c < chunks.end ? mask_of_token(a, layout, c * kChunkTokens + lane_id()) : 0u;
    }
#pragma unroll
    for (int u = 0; u < kMaskBatch; ++u) {
      const int c = first + u * kNotifyWarps;
      if (c >= chunks.end) break;
      fn(c, masks[u]);
    }
  }
}

// Entries per expert, bad ids, and rows per (destination rank, chunk) of this block's tokens.
__device__ void count_local_rows(const NotifyArgs& a, const BufferLayout& layout, NotifyShared& sh,
                                 ChunkRange chunks, int* expert_entries, int* chunk_rows, int stride,
                                 uint8_t* token_masks) {
  const int64_t first_entry = static_cast<int64_t>(chunks.begin) * kChunkTokens * a.num_topk;
  const int64_t end_entry =
      min(static_cast<int64_t>(chunks.end) * kChunkTokens, static_cast<int64_t>(a.num_tokens)) * a.num_topk;
  constexpr int kLoads = 8;  // ids each thread loads before counting them: the loads overlap
  for (int64_t base = first_entry + threadIdx.x; base < end_entry;
       base += static_cast<int64_t>(blockDim.x) * kLoads) {
    int64_t ids[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
      ids[u] = i < end_entry ? a.topk_idx[i] : -1;
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int64_t id = ids[u];
      if (id >= 0 && id < layout.num_experts) {
        atomicAdd(&expert_entries[id], 1);
      } else if (id != -1) {
        atomicAdd(&sh.bad_count, 1);
        atomicMin(&sh.bad_index, static_cast<int>(base + static_cast<int64_t>(u) * blockDim.x));
      }
    }
  }
  for_each_chunk_mask(a, layout, chunks, [&](int c, uint32_t mask) {
    token_masks[(c - chunks.begin) * kChunkTokens + lane_id()] = static_cast<uint8_t>(mask);
    for (int d = 0; d < layout.num_ranks; ++d) {
      const unsigned rows = __ballot_sync(kFullMask, (mask >> d) & 1u);
      if (lane_id() == 0) chunk_rows[d * stride + c - chunks.begin] = __popc(rows);
    }
  });
}

// This block's counts, for the block that finishes the layout; true in every thread of that block
// (the last to arrive). Its own partial is read back like the others.
__device__ bool hand_over_counts(const BufferRef& buf, NotifyShared& sh, const int* expert_entries,
                                 const int* chunk_rows, int stride) {
  const BufferLayout& layout = buf.layout;
  int* partial = notify_scratch(buf) + blockIdx.x * notify_partial_ints(layout);
  for (int e = threadIdx.x; e < layout.num_experts; e += blockDim.x) partial[e] = expert_entries[e];
  if (threadIdx.x < layout.num_ranks) {
    partial[layout.num_experts + threadIdx.x] = rows_before(chunk_rows, stride, threadIdx.x, stride - 1);
  }
  if (threadIdx.x == 0) {
    partial[layout.num_experts + layout.num_ranks] = sh.bad_count;
    partial[layout.num_experts + layout.num_ranks + 1] = sh.bad_index;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    sh.last = atomicAdd(&buf.control->notify_counted, 1u) == gridDim.x - 1;
    if (sh.last) {
      buf.control->notify_counted = 0;  // for the next op: every block of this one has arrived
      __threadfence();
    }
  }
  __syncthreads();
  return sh.last;
}

// The last block: every block's counts summed (entries per expert, bad ids), and each block's
// rows per destination turned in place into the rows of the blocks before it.
__device__ void gather_counts(const BufferRef& buf, NotifyShared& sh, int* expert_entries) {
  const BufferLayout& layout = buf.layout;
  const int stride = notify_partial_ints(layout), num_ranks = layout.num_ranks;
  int* partials = notify_scratch(buf);
  for (int e = threadIdx.x; e < layout.num_experts; e += blockDim.x) {
    int sum = 0;
    for (int b = 0; b < gridDim.x; ++b) sum += load_landed(partials + b * stride + e);
    expert_entries[e] = sum;
  }
  if (threadIdx.x < num_ranks) {
    int running = 0;
    for (int b = 0; b < gridDim.x; ++b) {
      int* rows = partials + b * stride + layout.num_experts + threadIdx.x;
      const int mine = load_landed(rows);
      *rows = running;
      running += mine;
    }
    sh.row_base[threadIdx.x] = running;  // this rank's rows to each destination, for the records
  }
  if (threadIdx.x == kWarpSize) {
    int count = 0, first = INT_MAX;
    for (int b = 0; b < gridDim.x; ++b) {
      count += load_landed(partials + b * stride + layout.num_experts + num_ranks);
      first = min(first, load_landed(partials + b * stride + layout.num_experts + num_ranks + 1));
    }
    sh.bad_count = count;
    sh.bad_index = first;
  }
  __syncthreads();
}

// A record's bad-id count when its rank refused the call's arguments on the host (it sent no tokens).
constexpr int kRefusedCount = -1;

__device__ __forceinline__ int saturate_int(int64_t v) {
  return static_cast<int>(max(static_cast<int64_t>(INT_MIN), min(static_cast<int64_t>(INT_MAX), v)));
}

// Writes this rank's notify record (see layout.h) into every rank's buffer, own included.
__device__ void publish_records(const NotifyArgs& a, const BufferLayout& layout, const NotifyShared& sh, int rank,
                                int parity, const int* expert_entries) {
  const int num_ranks = layout.num_ranks, len = layout.record_length();
  const int bad_value = sh.bad_count > 0 ? saturate_int(a.topk_idx[sh.bad_index]) : 0;
  for (int i = threadIdx.x; i < num_ranks * len; i += blockDim.x) {
    const int d = i / len, field = i % len;
    int value;
    if (field < layout.record_expert_offset()) {
      value = sh.row_base[field];
    } else if (field < layout.record_bad_id_offset()) {
      value = expert_entries[d * layout.experts_per_rank() + field - layout.record_expert_offset()];
    } else if (field == layout.record_bad_id_offset()) {
      value = a.refused ? kRefusedCount : sh.bad_count;
    } else if (field == layout.record_bad_id_offset() + 1) {
      value = bad_value;
    } else if (field < layout.record_window_offset()) {
      value = a.signature.words[field - layout.record_signature_offset()];
    } else {
      const int w = field - layout.record_window_offset();
      value = w == 0 ? a.window.rows_at : w == 1 ? a.window.scales_at : a.window.capacity;
    }
    layout.notify_record(sh.peers[d], parity, rank)[field] = value;
  }
}

// Waits for peer's record; false if the op failed (the peer stayed silent
// past timeout_s, recorded for the host, or an earlier op of the buffer failed).
__device__ bool wait_record(const BufferRef& buf, const uint64_t* flag, uint64_t epoch, int peer) {
  return wait_flag(flag, epoch, buf, peer) >= epoch;
}

// The first problem, in rank order, that any rank's record reports; every rank
// reads the same records, so every rank reaches the same verdict. Thread
// (s, w) checks one field of one record, so the loads run in parallel.
__device__ void check_records(const BufferLayout& layout, NotifyShared& sh, char* own, int parity) {
  constexpr int kFields = 1 + kSignatureWords;  // bad ids, then each signature word
  if (threadIdx.x < layout.num_ranks * kFields) {
    const int s = threadIdx.x / kFields, field = threadIdx.x % kFields;
    const int* record = layout.notify_record(own, parity, s);
    bool bad;
    if (field == 0) {
      bad = load_landed(record + layout.record_bad_id_offset()) != 0;
    } else {
      const int offset = layout.record_signature_offset() + field - 1;
      bad = load_landed(record + offset) != load_landed(layout.notify_record(own, parity, 0) + offset);
    }
    if (bad) atomicMin(&sh.first_bad, s * kFields + field);
  }
  __syncthreads();
  if (threadIdx.x == 0 && sh.first_bad != INT_MAX) {
    const int s = sh.first_bad / kFields, field = sh.first_bad % kFields;
    const int* record = layout.notify_record(own, parity, s);
    sh.error = field != 0                                               ? kSignatureMismatch
               : load_landed(record + layout.record_bad_id_offset()) > 0 ? kBadExpertId
                                                                          : kRefused;
    sh.error_rank = s;
    sh.error_value = field == 0 ? load_landed(record + layout.record_bad_id_offset() + 1) : field - 1;
  }
}

// rank_prefix (also kept in shared memory) and entries per local expert (each
// rounded up to expert_alignment), from every source's record.
__device__ void read_records(const NotifyArgs& a, const BufferLayout& layout, NotifyShared& sh, char* own,
                             int parity) {
  const int num_ranks = layout.num_ranks;
  if (threadIdx.x < num_ranks) {
    const int d = threadIdx.x;
    int running = 0;
    for (int s = 0; s <= num_ranks; ++s) {
      sh.rank_prefix[s * num_ranks + d] = running;
      a.rank_prefix[s * num_ranks + d] = running;
      if (s < num_ranks) running += load_landed(layout.notify_record(own, parity, s) + d);
    }
  }
  for (int j = threadIdx.x; j < layout.experts_per_rank(); j += blockDim.x) {
    int sum = 0;
    for (int s = 0; s < num_ranks; ++s) {
      sum += load_landed(layout.notify_record(own, parity, s) + layout.record_expert_offset() + j);
    }
    a.num_recv_per_expert[j] = static_cast<int>(align_up(sum, a.expert_alignment));
  }
}

// send_pos[t, d] for this block's tokens: the row token t gets on rank d (rows from this rank on d
// follow token order), or -1. The rank masks are the ones count_local_rows kept.
__device__ void write_send_pos(const NotifyArgs& a, const BufferLayout& layout, const NotifyShared& sh,
                               ChunkRange chunks, const int* chunk_rows, int stride, const uint8_t* token_masks) {
  const int lane = lane_id(), num_ranks = layout.num_ranks;
  for (int c = chunks.begin + warp_id(); c < chunks.end; c += kNotifyWarps) {
    const uint32_t mask = token_masks[(c - chunks.begin) * kChunkTokens + lane];
    const int t = c * kChunkTokens + lane;
    for (int d = 0; d < num_ranks; ++d) {
      const bool sent = (mask >> d) & 1u;
      const unsigned rows = __ballot_sync(kFullMask, sent);
      if (t < a.num_tokens) {
        a.send_pos[static_cast<int64_t>(t) * num_ranks + d] =
            sent ? sh.row_base[d] + rows_before(chunk_rows, stride, d, c - chunks.begin) +
                       __popc(rows & lanes_below(lane))
                 : -1;
      }
    }
  }
}

// Every rank's record says it refused its arguments (the host of each raised its error).
__device__ bool every_rank_refused(const BufferRef& buf, uint64_t epoch) {
  const BufferLayout& layout = buf.layout;
  char* own = buf.peers[buf.rank];
  bool all = true;
  for (int s = 0; s < layout.num_ranks; ++s) {
    const int* record = layout.notify_record(own, static_cast<int>(epoch & 1), s);
    all = all && load_landed(record + layout.record_bad_id_offset()) == kRefusedCount;
  }
  return all;
}

// Records the verdict for the host: in the answer it waits for (exact mode; or
// in the device copy that the data kernel queued behind relays, so that this
// kernel ends without a fence over PCIe before the data kernel starts), or by
// failing the op (raised at the buffer's next op; the handle's tensors
// are not written, so no later kernel of the buffer may read them; unless every
// rank refused the call on the host: then none holds a handle of it). A rejected
// call moves no data (every rank reaches the same verdict). A timeout was
// recorded by the wait that ran out.
__device__ void report_outcome(const BufferRef& buf, const NotifyArgs& a, const NotifyShared& sh, uint64_t epoch) {
  const BufferLayout& layout = buf.layout;
  const int rows = sh.rank_prefix[layout.num_ranks * layout.num_ranks + buf.rank];
  if (sh.error != kNoError) *reinterpret_cast<volatile uint64_t*>(&buf.control->abort_epoch) = epoch;
  if (a.result != nullptr) {
    a.result->num_recv_rows = rows;
    a.result->error = sh.error;
    a.result->error_rank = sh.error_rank;
    a.result->error_value = sh.error_value;
    a.result->own_bad_ids = sh.bad_count;
    a.result->own_bad_id = sh.bad_count > 0 ? saturate_int(a.topk_idx[sh.bad_index]) : 0;
    if (a.result_tag != 0) st_release_sys(&a.result->tag, a.result_tag);  // orders the fields before the tag
    return;
  }
  if (sh.error == kRefused && every_rank_refused(buf, epoch)) return;  // each raised its error; no handle went out
  if (sh.error == kBadExpertId || sh.error == kRefused) {
    fail_op(buf, static_cast<ErrorCode>(sh.error), sh.error_rank, 0, sh.error_value, layout.num_experts);
  } else if (sh.error == kSignatureMismatch) {
    // rank error_rank differs from rank 0: name the one this rank differs from
    char* own = buf.peers[buf.rank];
    const int parity = static_cast<int>(epoch & 1), offset = layout.record_signature_offset() + sh.error_value;
    const int peer = sh.error_rank == buf.rank ? 0 : sh.error_rank;
    fail_op(buf, kSignatureMismatch, peer, sh.error_value,
            load_landed(layout.notify_record(own, parity, buf.rank) + offset),
            load_landed(layout.notify_record(own, parity, peer) + offset));
  } else if (sh.error == kNoError && rows > a.num_worst_tokens) {
    report_deferred(buf, kCapacityExceeded, rows, a.num_worst_tokens);
  }
}

// The last block to count: the layout of the call from every block's counts and every peer's record;
// then the verdict for the other blocks.
__device__ void finish_layout(const BufferRef& buf, const NotifyArgs& a, NotifyShared& sh, uint64_t epoch,
                              int* expert_entries, const int* chunk_rows, int stride) {
  const BufferLayout& layout = buf.layout;
  const int rank = buf.rank, parity = static_cast<int>(epoch & 1);
  if (gridDim.x > 1) {
    gather_counts(buf, sh, expert_entries);
  } else {  // a single block holds every count already (the hand-over's round trip cost 4-6 us at 128 tokens)
    if (threadIdx.x < layout.num_ranks) {
      sh.row_base[threadIdx.x] = rows_before(chunk_rows, stride, threadIdx.x, stride - 1);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) trace_at(buf, kTraceNotifyCounted);
  publish_records(a, layout, sh, rank, parity, expert_entries);
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) trace_at(buf, kTraceNotifyPublished);
  if (threadIdx.x < layout.num_ranks) {
    st_release_sys(layout.notify_flag(sh.peers[threadIdx.x], rank), epoch);
    if (!wait_record(buf, layout.notify_flag(sh.peers[rank], threadIdx.x), epoch, threadIdx.x)) {
      atomicCAS(&sh.error, kNoError, kTimeout);
      sh.error_rank = threadIdx.x;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) trace_at(buf, kTraceNotifyArrived);
  if (sh.error == kNoError) {
    read_records(a, layout, sh, sh.peers[rank], parity);
    check_records(layout, sh, sh.peers[rank], parity);
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  // The other blocks hear the verdict first: they write send_pos while the host's answer (a write
  // over PCIe behind a system fence) is on its way. rank_prefix, written above by other threads of
  // this block, is released with it (the barrier orders it before this thread's release).
  if (gridDim.x > 1) {
    buf.control->notify_verdict = sh.error;
    st_release_gpu(&buf.control->notify_ready, epoch);
  }
  report_outcome(buf, a, sh, epoch);
}

// The other blocks: wait for the last one's verdict (it waits on peers with a time limit, so this
// wait ends too).
__device__ void await_layout(const BufferRef& buf, NotifyShared& sh, uint64_t epoch) {
  if (threadIdx.x == 0) {
    while (ld_acquire_gpu(&buf.control->notify_ready) < epoch) __nanosleep(64);
    sh.error = *reinterpret_cast<volatile int*>(&buf.control->notify_verdict);
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_dispatch_kernel(BufferRef buf, NotifyArgs a) {
  const BufferLayout& layout = buf.layout;
  const int num_ranks = layout.num_ranks, rank = buf.rank;
  const int num_chunks = static_cast<int>(ceil_div(a.num_tokens, kChunkTokens));
  const int per_block = chunks_per_block(a.num_tokens, gridDim.x);
  const ChunkRange chunks{min(num_chunks, static_cast<int>(blockIdx.x) * per_block),
                          min(num_chunks, static_cast<int>(blockIdx.x + 1) * per_block)};
  const int stride = per_block + 1;
  extern __shared__ int smem[];
  int* expert_entries = smem;                    // [E]
  int* chunk_rows = smem + layout.num_experts;   // [R][stride]: rows per (destination, chunk), then scanned
  // [stride - 1][kChunkTokens]: the rank mask of each of this block's tokens (kMaxRanks bits)
  uint8_t* token_masks = reinterpret_cast<uint8_t*>(chunk_rows + num_ranks * stride);
  __shared__ NotifyShared sh;
  start_next_kernel();  // the data kernel's blocks may take their SMs now; they wait for this kernel's end

  const uint64_t epoch = op_epoch(buf);
  if (threadIdx.x < num_ranks) sh.peers[threadIdx.x] = buf.peers[threadIdx.x];
  if (threadIdx.x == 0) {
    if (blockIdx.x == 0) trace_at(buf, kTraceNotifyStart);
    sh.bad_count = 0;
    sh.bad_index = INT_MAX;
    sh.error = kNoError;
    sh.error_rank = sh.error_value = 0;
    sh.first_bad = INT_MAX;
  }
  for (int i = threadIdx.x; i < layout.num_experts + num_ranks * stride; i += blockDim.x) smem[i] = 0;
  __syncthreads();

  count_local_rows(a, layout, sh, chunks, expert_entries, chunk_rows, stride, token_masks);
  __syncthreads();
  block_exclusive_scan<kNotifyThreads>(chunk_rows, num_ranks * stride, sh.warp_totals);
  const bool alone = gridDim.x == 1;
  if (alone || hand_over_counts(buf, sh, expert_entries, chunk_rows, stride)) {
    finish_layout(buf, a, sh, epoch, expert_entries, chunk_rows, stride);
  } else {
    await_layout(buf, sh, epoch);
  }
  __syncthreads();
  if (sh.error != kNoError) return;  // the same in every thread
  if (threadIdx.x < num_ranks) {
    const int d = threadIdx.x;
    sh.row_base[d] = alone ? sh.rank_prefix[rank * num_ranks + d]
                           : load_landed(a.rank_prefix + rank * num_ranks + d) +
                                 load_landed(notify_scratch(buf) + blockIdx.x * notify_partial_ints(layout) +
                                             layout.num_experts + d);
  }
  __syncthreads();
  write_send_pos(a, layout, sh, chunks, chunk_rows, stride, token_masks);
  if (buf.trace != nullptr) {  // the same in every thread: a barrier only when tracing
    __syncthreads();
    if (threadIdx.x == 0) trace_at(buf, kTraceNotifyEnd);
  }
}

}  // namespace

void launch_notify_dispatch(const BufferRef& buf, const NotifyArgs& args, cudaStream_t stream) {
  const int blocks = notify_blocks(args.num_tokens, buf.num_sms);
  const int64_t stride = chunks_per_block(args.num_tokens, blocks) + 1;
  const size_t smem = static_cast<size_t>(buf.layout.num_experts + buf.layout.num_ranks * stride) * sizeof(int) +
                      static_cast<size_t>(stride - 1) * kChunkTokens;
  set_dynamic_smem(notify_dispatch_kernel, smem, "dispatch's notify kernel (counters for experts and chunks)");
  notify_dispatch_kernel<<<blocks, kNotifyThreads, smem, stream>>>(buf, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace torch_ep
