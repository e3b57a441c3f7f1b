// dispatch's notify kernel: one block counts what this rank sends, swaps
// notify records with every peer (the op's handshake), checks that every
// rank's input is valid and that all ranks run the same op on rows of the same
// shape, then derives the layout of the call: rank_prefix, entries per local
// expert and send_pos. Records are double-buffered by epoch parity, so a peer
// already in the next dispatch cannot overwrite one still being read.
#include "kernels/intranode.cuh"

namespace torch_ep {
namespace {

constexpr int kNotifyThreads = 1024;
constexpr int kNotifyWarps = kNotifyThreads / kWarpSize;
constexpr int kMaskBatch = 4;  // chunks a warp summarises at once

struct NotifyShared {
  char* peers[kMaxRanks];
  int rank_prefix[(kMaxRanks + 1) * kMaxRanks];
  int warp_totals[kNotifyThreads / kWarpSize];
  int bad_count;   // this rank's top-k entries outside [-1, E)
  int bad_index;   // the first of them
  int error, error_rank, error_value;
  int first_bad;   // check_records: (source, field) of the first problem found
};

// Rows of this rank's chunks < c that go to rank d, from the scanned chunk_rows.
__device__ __forceinline__ int rows_before(const int* chunk_rows, int stride, int d, int c) {
  return chunk_rows[d * stride + c] - chunk_rows[d * stride];
}

__device__ __forceinline__ uint32_t mask_of_token(const NotifyArgs& a, const BufferLayout& layout, int t) {
  return t < a.num_tokens ? token_rank_mask(a.topk_idx + static_cast<int64_t>(t) * a.num_topk, a.num_topk,
                                            layout.num_experts, layout.experts_per_rank())
                          : 0u;
}

// Calls fn(c, mask) for each chunk c of this warp (c = warp, warp + kNotifyWarps, ...) with the
// rank mask of this lane's token; the masks of kMaskBatch chunks are loaded before any is used, so
// that their loads overlap.
template <typename Fn>
__device__ __forceinline__ void for_each_chunk_mask(const NotifyArgs& a, const BufferLayout& layout, int num_chunks,
                                                    Fn fn) {
  for (int first = warp_id(); first < num_chunks; first += kNotifyWarps * kMaskBatch) {
    uint32_t masks[kMaskBatch];
#pragma unroll
    for (int u = 0; u < kMaskBatch; ++u) {
      masks[u] = mask_of_token(a, layout, (first + u * kNotifyWarps) * kChunkTokens + lane_id());
    }
#pragma unroll
    for (int u = 0; u < kMaskBatch; ++u) {
      const int c = first + u * kNotifyWarps;
      if (c >= num_chunks) break;
      fn(c, masks[u]);
    }
  }
}

// Entries per expert, bad ids, and rows per (destination rank, chunk) of this rank's tokens.
__device__ void count_local_rows(const NotifyArgs& a, const BufferLayout& layout, NotifyShared& sh,
                                 int* expert_entries, int* chunk_rows, int stride) {
  const int64_t num_entries = static_cast<int64_t>(a.num_tokens) * a.num_topk;
  constexpr int kLoads = 8;  // ids each thread loads before counting them: the loads overlap
  for (int64_t base = threadIdx.x; base < num_entries; base += static_cast<int64_t>(blockDim.x) * kLoads) {
    int64_t ids[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
      ids[u] = i < num_entries ? a.topk_idx[i] : -1;
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
  for_each_chunk_mask(a, layout, stride - 1, [&](int c, uint32_t mask) {
    for (int d = 0; d < layout.num_ranks; ++d) {
      const unsigned rows = __ballot_sync(kFullMask, (mask >> d) & 1u);
      if (lane_id() == 0) chunk_rows[d * stride + c] = __popc(rows);
    }
  });
}

__device__ __forceinline__ int saturate_int(int64_t v) {
  return static_cast<int>(max(static_cast<int64_t>(INT_MIN), min(static_cast<int64_t>(INT_MAX), v)));
}

// Writes this rank's notify record (see layout.h) into every rank's buffer, own included.
__device__ void publish_records(const NotifyArgs& a, const BufferLayout& layout, const NotifyShared& sh, int rank,
                                int parity, const int* expert_entries, const int* chunk_rows, int stride) {
  const int num_ranks = layout.num_ranks, num_chunks = stride - 1, len = layout.record_length();
  const int bad_value = sh.bad_count > 0 ? saturate_int(a.topk_idx[sh.bad_index]) : 0;
  for (int i = threadIdx.x; i < num_ranks * len; i += blockDim.x) {
    const int d = i / len, field = i % len;
    int value;
    if (field < layout.record_expert_offset()) {
      value = rows_before(chunk_rows, stride, field, num_chunks);
    } else if (field < layout.record_bad_id_offset()) {
      value = expert_entries[d * layout.experts_per_rank() + field - layout.record_expert_offset()];
    } else if (field == layout.record_bad_id_offset()) {
      value = sh.bad_count;
    } else if (field == layout.record_bad_id_offset() + 1) {
      value = bad_value;
    } else {
      value = a.signature.words[field - layout.record_signature_offset()];
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
      bad = load_landed(record + layout.record_bad_id_offset()) > 0;
    } else {
      const int offset = layout.record_signature_offset() + field - 1;
      bad = load_landed(record + offset) != load_landed(layout.notify_record(own, parity, 0) + offset);
    }
    if (bad) atomicMin(&sh.first_bad, s * kFields + field);
  }
  __syncthreads();
  if (threadIdx.x == 0 && sh.first_bad != INT_MAX) {
    const int s = sh.first_bad / kFields, field = sh.first_bad % kFields;
    sh.error = field == 0 ? kBadExpertId : kSignatureMismatch;
    sh.error_rank = s;
    sh.error_value = field == 0 ? load_landed(layout.notify_record(own, parity, s) + layout.record_bad_id_offset() + 1)
                                : field - 1;
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

// send_pos[t, d]: the row token t gets on rank d (rows from this rank on d
// follow token order), or -1.
__device__ void write_send_pos(const NotifyArgs& a, const BufferLayout& layout, const NotifyShared& sh, int rank,
                               const int* chunk_rows, int stride) {
  const int lane = lane_id(), num_ranks = layout.num_ranks;
  for_each_chunk_mask(a, layout, stride - 1, [&](int c, uint32_t mask) {
    const int t = c * kChunkTokens + lane;
    for (int d = 0; d < num_ranks; ++d) {
      const bool sent = (mask >> d) & 1u;
      const unsigned rows = __ballot_sync(kFullMask, sent);
      if (t < a.num_tokens) {
        a.send_pos[static_cast<int64_t>(t) * num_ranks + d] =
            sent ? sh.rank_prefix[rank * num_ranks + d] + rows_before(chunk_rows, stride, d, c) +
                       __popc(rows & lanes_below(lane))
                 : -1;
      }
    }
  });
}

// Records the verdict for the host: in the answer it waits for (exact mode),
// or by failing the op (raised at the buffer's next op; the handle's tensors
// are not written, so no later kernel of the buffer may read them). A rejected
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
    __threadfence_system();
    st_release_sys(&a.result->tag, a.result_tag);
    return;
  }
  if (sh.error == kBadExpertId) {
    fail_op(buf, kBadExpertId, sh.error_rank, 0, sh.error_value, layout.num_experts);
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

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_dispatch_kernel(BufferRef buf, NotifyArgs a) {
  const BufferLayout& layout = buf.layout;
  const int num_ranks = layout.num_ranks, rank = buf.rank;
  const int stride = static_cast<int>(ceil_div(a.num_tokens, kChunkTokens)) + 1;
  extern __shared__ int smem[];
  int* expert_entries = smem;                    // [E]
  int* chunk_rows = smem + layout.num_experts;   // [R][stride]: rows per (destination, chunk), then scanned
  __shared__ NotifyShared sh;

  const uint64_t epoch = op_epoch(buf);
  const int parity = static_cast<int>(epoch & 1);
  if (threadIdx.x < num_ranks) sh.peers[threadIdx.x] = buf.peers[threadIdx.x];
  if (threadIdx.x == 0) {
    trace_at(buf, kTraceNotifyStart);
    sh.bad_count = 0;
    sh.bad_index = INT_MAX;
    sh.error = kNoError;
    sh.error_rank = sh.error_value = 0;
    sh.first_bad = INT_MAX;
  }
  for (int i = threadIdx.x; i < layout.num_experts + num_ranks * stride; i += blockDim.x) smem[i] = 0;
  __syncthreads();

  count_local_rows(a, layout, sh, expert_entries, chunk_rows, stride);
  __syncthreads();
  block_exclusive_scan<kNotifyThreads>(chunk_rows, num_ranks * stride, sh.warp_totals);
  if (threadIdx.x == 0) trace_at(buf, kTraceNotifyCounted);
  publish_records(a, layout, sh, rank, parity, expert_entries, chunk_rows, stride);
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) trace_at(buf, kTraceNotifyPublished);
  if (threadIdx.x < num_ranks) {
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
  if (threadIdx.x == 0) report_outcome(buf, a, sh, epoch);
  if (sh.error == kNoError) write_send_pos(a, layout, sh, rank, chunk_rows, stride);
  if (buf.trace != nullptr) {  // the same in every thread: a barrier only when tracing
    __syncthreads();
    if (threadIdx.x == 0) trace_at(buf, kTraceNotifyEnd);
  }
}

}  // namespace

void launch_notify_dispatch(const BufferRef& buf, const NotifyArgs& args, cudaStream_t stream) {
  const int64_t stride = ceil_div(args.num_tokens, kChunkTokens) + 1;
  const size_t smem = static_cast<size_t>(buf.layout.num_experts + buf.layout.num_ranks * stride) * sizeof(int);
  set_dynamic_smem(notify_dispatch_kernel, smem, "dispatch's notify kernel (counters for experts and chunks)");
  notify_dispatch_kernel<<<1, kNotifyThreads, smem, stream>>>(buf, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace torch_ep
