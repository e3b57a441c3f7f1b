// NVLink kernels of one node: the per-op barrier, dispatch's notify and data
// kernels (also cached_dispatch), combine, and the peer-copy ceiling.
//
// Data kernels run buf.num_sms blocks. Chunk c (kChunkTokens consecutive tokens
// of its home rank) belongs to block c % num_sms on every rank. Each block has
// sender warps, which push rows to peers and then raise chunk_flag[me][c] on
// them (value: the op's epoch), and receiver warps, which wait for those flags
// in their own buffer and copy what landed into the outputs, so the copy-out
// overlaps the sends.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/cuda/CUDAException.h>

#include "kernels/api.cuh"
#include "kernels/utils.cuh"

namespace torch_ep {
namespace {

constexpr int kNotifyThreads = 1024;
constexpr int kSenderWarps = 8;
constexpr int kReceiverWarps = 8;
constexpr int kDataThreads = (kSenderWarps + kReceiverWarps) * kWarpSize;
constexpr int kReduceUnroll = 2;  // 16-byte columns per lane per step; each is loaded from up to kMaxRanks rows
constexpr int kPeerCopyThreads = 512;
constexpr int kPeerCopySegment = kWarpSize * kCopyUnroll * 4;  // 16-byte units a warp copies per task

// Starts a new round: every flag written from here on carries the new epoch.
__device__ uint64_t bump_epoch(const BufferRef& buf) {
  const uint64_t epoch = *buf.epoch + 1;
  *buf.epoch = epoch;
  return epoch;
}

// ---- barrier -----------------------------------------------------------------------------------

// One warp: lane r tells rank r that this rank has reached the new epoch, then
// waits until rank r has too. After it, no peer still reads regions of an
// earlier call that this call will overwrite.
__global__ void barrier_kernel(BufferRef buf) {
  const BufferLayout& layout = buf.layout;
  const int lane = lane_id();
  uint64_t epoch = 0;
  if (lane == 0) epoch = bump_epoch(buf);
  epoch = __shfl_sync(kFullMask, epoch, 0);
  if (lane < layout.num_ranks) {
    st_release_sys(layout.barrier(buf.peers[lane], buf.rank), epoch);
    wait_flag(layout.barrier(buf.peers[buf.rank], lane), epoch, buf, lane);
  }
}

// ---- dispatch: notify --------------------------------------------------------------------------

// Rows of this rank's chunks < c that go to rank d, from the scanned chunk_rows.
__device__ __forceinline__ int rows_before(const int* chunk_rows, int stride, int d, int c) {
  return chunk_rows[d * stride + c] - chunk_rows[d * stride];
}

// Entries per expert, and rows per (destination rank, chunk) of this rank's tokens.
__device__ void count_local_rows(const NotifyArgs& a, const BufferLayout& layout, int* expert_entries,
                                 int* chunk_rows, int stride) {
  const int num_entries = a.num_tokens * a.num_topk;
  for (int i = threadIdx.x; i < num_entries; i += blockDim.x) {
    const int64_t id = a.topk_idx[i];
    if (id >= 0 && id < layout.num_experts) atomicAdd(&expert_entries[id], 1);
  }
  const int lane = lane_id(), num_chunks = stride - 1;
  for (int c = warp_id(); c < num_chunks; c += kNotifyThreads / kWarpSize) {
    const int t = c * kChunkTokens + lane;
    const uint32_t mask = t < a.num_tokens ? token_rank_mask(a.topk_idx + static_cast<int64_t>(t) * a.num_topk,
                                                             a.num_topk, layout.num_experts,
                                                             layout.experts_per_rank())
                                           : 0;
    for (int d = 0; d < layout.num_ranks; ++d) {
      const unsigned rows = __ballot_sync(kFullMask, (mask >> d) & 1u);
      if (lane == 0) chunk_rows[d * stride + c] = __popc(rows);
    }
  }
}

// Writes this rank's notify record (see layout.h) into every rank's buffer, own included.
__device__ void publish_records(const NotifyArgs& a, const BufferLayout& layout, char* const* peers, int rank,
                                int parity, const int* expert_entries, const int* chunk_rows, int stride) {
  const int num_ranks = layout.num_ranks, num_chunks = stride - 1;
  const int expert_offset = layout.notify_expert_offset(), chunk_offset = layout.notify_chunk_offset();
  const int record_len = chunk_offset + num_chunks + 1;
  for (int i = threadIdx.x; i < num_ranks * record_len; i += blockDim.x) {
    const int d = i / record_len, field = i % record_len;
    int value;
    if (field < num_ranks) value = rows_before(chunk_rows, stride, field, num_chunks);
    else if (field == num_ranks) value = a.num_tokens;
    else if (field < chunk_offset) value = expert_entries[d * layout.experts_per_rank() + field - expert_offset];
    else value = rows_before(chunk_rows, stride, d, field - chunk_offset);
    layout.notify_record(peers[d], parity, rank)[field] = value;
  }
}

// From every source's record in this rank's buffer: rank_prefix (also kept in
// shared memory), entries per local expert (the total rounded up to
// expert_alignment), and each source's chunk prefix.
__device__ void read_records(const NotifyArgs& a, const BufferLayout& layout, char* own, int rank, int parity,
                             int* rank_prefix) {
  const int num_ranks = layout.num_ranks;
  if (threadIdx.x < num_ranks) {
    const int d = threadIdx.x;
    int running = 0;
    for (int s = 0; s <= num_ranks; ++s) {
      rank_prefix[s * num_ranks + d] = running;
      a.rank_prefix[s * num_ranks + d] = running;
      if (s < num_ranks) running += load_landed(layout.notify_record(own, parity, s) + d);
    }
  }
  for (int j = threadIdx.x; j < layout.experts_per_rank(); j += blockDim.x) {
    int sum = 0;
    for (int s = 0; s < num_ranks; ++s) {
      sum += load_landed(layout.notify_record(own, parity, s) + layout.notify_expert_offset() + j);
    }
    a.num_recv_per_expert[j] = static_cast<int>(align_up(sum, a.expert_alignment));
  }
  // Past a source's last chunk the prefix stays at its total, so those chunks are empty.
  const int stride = layout.max_chunks + 1;
  for (int i = threadIdx.x; i < num_ranks * stride; i += blockDim.x) {
    const int s = i / stride, c = i % stride;
    const int* record = layout.notify_record(own, parity, s);
    const int source_chunks = static_cast<int>(ceil_div(load_landed(record + num_ranks), kChunkTokens));
    a.recv_chunk_prefix[i] = load_landed(record + layout.notify_chunk_offset() + min(c, source_chunks));
  }
}

// send_pos[t, d]: the row token t gets on rank d (rows from this rank on d
// follow token order), or -1.
__device__ void write_send_pos(const NotifyArgs& a, const BufferLayout& layout, int rank, const int* rank_prefix,
                               const int* chunk_rows, int stride) {
  const int lane = lane_id(), num_ranks = layout.num_ranks, num_chunks = stride - 1;
  for (int c = warp_id(); c < num_chunks; c += kNotifyThreads / kWarpSize) {
    const int t = c * kChunkTokens + lane;
    const uint32_t mask = t < a.num_tokens ? token_rank_mask(a.topk_idx + static_cast<int64_t>(t) * a.num_topk,
                                                             a.num_topk, layout.num_experts,
                                                             layout.experts_per_rank())
                                           : 0;
    for (int d = 0; d < num_ranks; ++d) {
      const bool sent = (mask >> d) & 1u;
      const unsigned rows = __ballot_sync(kFullMask, sent);
      if (t < a.num_tokens) {
        a.send_pos[static_cast<int64_t>(t) * num_ranks + d] =
            sent ? rank_prefix[rank * num_ranks + d] + rows_before(chunk_rows, stride, d, c) +
                       __popc(rows & lanes_below(lane))
                 : -1;
      }
    }
  }
}

// Exact mode: hand the received row count to the host (which reads it once
// the kernel is done). Fixed capacity: refuse to truncate.
__device__ void publish_row_count(const NotifyArgs& a, int rank, int rows) {
  if (a.host_count != nullptr) {
    *a.host_count = rows;
  } else if (rows > a.num_worst_tokens) {
    printf("torch_ep: dispatch on rank %d receives %d rows but num_worst_tokens is %d\n", rank, rows,
           a.num_worst_tokens);
    __trap();
  }
}

// One block: counts what this rank sends, swaps notify records with every
// peer (the swap doubles as the op's barrier; records are double-buffered by
// epoch parity so a peer already in the next dispatch cannot overwrite one
// still being read), then derives the layout of this call.
__global__ void __launch_bounds__(kNotifyThreads, 1) notify_dispatch_kernel(BufferRef buf, NotifyArgs a) {
  const BufferLayout& layout = buf.layout;
  const int num_ranks = layout.num_ranks, rank = buf.rank;
  const int stride = static_cast<int>(ceil_div(a.num_tokens, kChunkTokens)) + 1;
  extern __shared__ int smem[];
  int* expert_entries = smem;                    // [E]
  int* chunk_rows = smem + layout.num_experts;   // [R][stride]: rows per (destination, chunk), then scanned
  __shared__ int warp_totals[kNotifyThreads / kWarpSize];
  __shared__ int rank_prefix[(kMaxRanks + 1) * kMaxRanks];
  __shared__ char* peers[kMaxRanks];
  __shared__ uint64_t epoch_shared;

  if (threadIdx.x == 0) epoch_shared = bump_epoch(buf);
  if (threadIdx.x < num_ranks) peers[threadIdx.x] = buf.peers[threadIdx.x];
  for (int i = threadIdx.x; i < layout.num_experts + num_ranks * stride; i += blockDim.x) smem[i] = 0;
  __syncthreads();
  const uint64_t epoch = epoch_shared;
  const int parity = static_cast<int>(epoch & 1);

  count_local_rows(a, layout, expert_entries, chunk_rows, stride);
  __syncthreads();
  block_exclusive_scan<kNotifyThreads>(chunk_rows, num_ranks * stride, warp_totals);
  publish_records(a, layout, peers, rank, parity, expert_entries, chunk_rows, stride);
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x < num_ranks) {
    st_release_sys(layout.notify_flag(peers[threadIdx.x], rank), epoch);
    wait_flag(layout.notify_flag(peers[rank], threadIdx.x), epoch, buf, threadIdx.x);
  }
  __syncthreads();
  read_records(a, layout, peers[rank], rank, parity, rank_prefix);
  __syncthreads();
  if (threadIdx.x == 0) publish_row_count(a, rank, rank_prefix[num_ranks * num_ranks + rank]);
  write_send_pos(a, layout, rank, rank_prefix, chunk_rows, stride);
}

// ---- data kernels: shared pieces ---------------------------------------------------------------

// Per-block copies of what every warp of a data kernel reads often.
struct DataShared {
  char* peers[kMaxRanks];
  int rank_prefix[(kMaxRanks + 1) * kMaxRanks];
  int progress[kSenderWarps];  // send steps each sender warp has finished
};

__device__ void load_data_shared(DataShared& sh, const BufferRef& buf, const int* rank_prefix) {
  const int num_ranks = buf.layout.num_ranks;
  for (int i = threadIdx.x; i < (num_ranks + 1) * num_ranks; i += blockDim.x) sh.rank_prefix[i] = rank_prefix[i];
  if (threadIdx.x < num_ranks) sh.peers[threadIdx.x] = buf.peers[threadIdx.x];
  if (threadIdx.x < kSenderWarps) sh.progress[threadIdx.x] = 0;
  __syncthreads();
}

__device__ __forceinline__ int prefix_of(const DataShared& sh, int num_ranks, int s, int d) {
  return sh.rank_prefix[s * num_ranks + d];
}

// A handle whose rank_prefix promises more rows than the tensors hold would
// make the kernel write out of bounds: trap instead.
__device__ void check_recv_rows(const DataShared& sh, const BufferRef& buf, int num_recv_rows) {
  const int num_ranks = buf.layout.num_ranks;
  const int rows = prefix_of(sh, num_ranks, num_ranks, buf.rank);
  if (threadIdx.x == 0 && rows > num_recv_rows) {
    printf("torch_ep: rank_prefix on rank %d says %d rows were received but recv_src_idx has %d\n", buf.rank,
           rows, num_recv_rows);
    __trap();
  }
}

// A sender warp reports that its stores for send step `step` are done; true
// for the warp that completes the step last, which then raises the flag(s).
// Each warp makes its stores system-visible before reporting, so the last
// warp's flag covers all of them. Several warps may see themselves last; the
// flag value is the same, so that is harmless.
__device__ bool finish_send_step(int* progress, int step) {
  __threadfence_system();
  __syncwarp();
  bool last = true;
  if (lane_id() == 0) {
    volatile int* done = progress;
    done[warp_id()] = step + 1;
    __threadfence_block();
    for (int w = 0; w < kSenderWarps; ++w) last = last && done[w] > step;
  }
  return __shfl_sync(kFullMask, last, 0);
}

struct RowRange {
  int begin, end;  // rows relative to the first row from their source
};

// Rows of source chunk c among one source's rows, found in their ascending
// source-token indices recv_src_idx[first, last).
__device__ RowRange find_chunk_rows(const int* recv_src_idx, int first, int last, int c) {
  const int lo = lower_bound(recv_src_idx, first, last, c * kChunkTokens);
  const int hi = lower_bound(recv_src_idx, lo, last, (c + 1) * kChunkTokens);
  return {lo - first, hi - first};
}

// ---- dispatch / cached_dispatch: data ----------------------------------------------------------

// Received-row metadata: local expert ids (-1 for experts of other ranks),
// their weights (0 elsewhere) and the source token index.
__device__ void store_recv_meta(const DispatchArgs& a, int64_t row, int src_token, int64_t global_id, float weight,
                                int rank, int experts_per_rank, int lane) {
  if (lane == 0) a.recv_src_idx[row] = src_token;
  if (lane < a.num_topk) {
    const int64_t local = local_expert(global_id, rank, experts_per_rank);
    a.recv_topk_idx[row * a.num_topk + lane] = local;
    a.recv_topk_weights[row * a.num_topk + lane] = local >= 0 ? weight : 0.0f;
  }
}

// Sends token t's row slice (and scales, metadata) to every rank that owns one
// of its experts: this rank's row straight into the outputs, other ranks' into
// their buffer, in this rank's block at the token's position among the rows it
// sends there.
__device__ void send_token(const BufferRef& buf, const DataShared& sh, const DispatchArgs& a, int t, int lane) {
  const BufferLayout& layout = buf.layout;
  const int num_ranks = layout.num_ranks, rank = buf.rank;
  const int lane_pos = lane < num_ranks ? a.send_pos[static_cast<int64_t>(t) * num_ranks + lane] : -1;
  int pos[kMaxRanks];  // output row on this rank; row within this rank's block elsewhere
  int4* dst[kMaxRanks];
#pragma unroll
  for (int r = 0; r < kMaxRanks; ++r) {
    pos[r] = __shfl_sync(kFullMask, lane_pos, r);
    dst[r] = nullptr;
    if (pos[r] < 0) continue;
    if (r == rank) {
      dst[r] = reinterpret_cast<int4*>(a.recv_x + pos[r] * a.row_bytes + a.col_offset);
    } else {
      pos[r] -= prefix_of(sh, num_ranks, rank, r);
      dst[r] = reinterpret_cast<int4*>(layout.data_slot(sh.peers[r], rank, pos[r]));
    }
  }
  warp_copy_to_ranks(dst, reinterpret_cast<const int4*>(a.x + t * a.row_bytes + a.col_offset), a.col_bytes / 16,
                     lane);

  if (a.x_scales != nullptr) {  // FP8: scales follow the row in the slot
    for (int i = lane; i < a.num_scales; i += kWarpSize) {
      const float scale = a.x_scales[static_cast<int64_t>(t) * a.num_scales + i];
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r) {
        if (pos[r] < 0) continue;
        float* out = r == rank ? a.recv_x_scales + static_cast<int64_t>(pos[r]) * a.num_scales
                               : reinterpret_cast<float*>(reinterpret_cast<char*>(dst[r]) + a.col_bytes);
        out[i] = scale;
      }
    }
  }

  if (a.topk_idx != nullptr) {
    const bool entry_lane = lane < a.num_topk;
    const int64_t id = entry_lane ? a.topk_idx[static_cast<int64_t>(t) * a.num_topk + lane] : -1;
    const float weight = entry_lane ? a.topk_weights[static_cast<int64_t>(t) * a.num_topk + lane] : 0.0f;
    const int wire_id = (id >= 0 && id < layout.num_experts) ? static_cast<int>(id) : -1;
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      if (pos[r] < 0) continue;
      if (r == rank) {
        store_recv_meta(a, pos[r], t, id, weight, rank, layout.experts_per_rank(), lane);
        continue;
      }
      char* meta = layout.meta_row(sh.peers[r], rank, pos[r]);
      if (lane == 0) *reinterpret_cast<int*>(meta + kMetaSrcOffset) = t;
      if (entry_lane) {
        reinterpret_cast<int*>(meta + kMetaIdxOffset)[lane] = wire_id;
        reinterpret_cast<float*>(meta + kMetaWeightOffset)[lane] = weight;
      }
    }
  }
}

// Sender warps: the tokens of each chunk of this block are shared out over
// the warps; after a chunk every peer's chunk_flag[me][c] is raised (also when
// no row went there, which no receiver waits for).
__device__ void send_chunks(const BufferRef& buf, DataShared& sh, const DispatchArgs& a, uint64_t epoch) {
  const BufferLayout& layout = buf.layout;
  const int lane = lane_id(), warp = warp_id();
  const int num_chunks = static_cast<int>(ceil_div(a.num_tokens, kChunkTokens));
  int step = 0;
  for (int c = blockIdx.x; c < num_chunks; c += gridDim.x, ++step) {
    for (int j = warp; j < kChunkTokens; j += kSenderWarps) {
      const int t = c * kChunkTokens + j;
      if (t < a.num_tokens) send_token(buf, sh, a, t, lane);
    }
    if (finish_send_step(sh.progress, step) && lane < layout.num_ranks && lane != buf.rank) {
      st_release_sys(layout.chunk_flag(sh.peers[lane], buf.rank, c), epoch);
    }
  }
}

// Copies row `row` of source s from this rank's buffer to output row out_row.
__device__ void receive_row(const BufferRef& buf, const DataShared& sh, const DispatchArgs& a, int s, int row,
                            int64_t out_row, int lane) {
  const BufferLayout& layout = buf.layout;
  char* own = sh.peers[buf.rank];
  const char* slot = layout.data_slot(own, s, row);
  warp_copy<true>(reinterpret_cast<int4*>(a.recv_x + out_row * a.row_bytes + a.col_offset),
                  reinterpret_cast<const int4*>(slot), a.col_bytes / 16, lane);
  if (a.x_scales != nullptr) {
    const float* scales = reinterpret_cast<const float*>(slot + a.col_bytes);
    for (int i = lane; i < a.num_scales; i += kWarpSize) {
      a.recv_x_scales[out_row * a.num_scales + i] = load_landed(scales + i);
    }
  }
  if (a.topk_idx != nullptr) {
    const char* meta = layout.meta_row(own, s, row);
    const int src_token = load_landed(reinterpret_cast<const int*>(meta + kMetaSrcOffset));
    const bool entry_lane = lane < a.num_topk;
    const int id = entry_lane ? load_landed(reinterpret_cast<const int*>(meta + kMetaIdxOffset) + lane) : -1;
    const float weight =
        entry_lane ? load_landed(reinterpret_cast<const float*>(meta + kMetaWeightOffset) + lane) : 0.0f;
    store_recv_meta(a, out_row, src_token, id, weight, buf.rank, layout.experts_per_rank(), lane);
  }
}

// Rows past the received ones (fixed-capacity outputs): metadata that says "no
// token"; cached_dispatch also zeroes the row so padding rows get zero gradients.
template <bool kCached>
__device__ void fill_padding_rows(const BufferRef& buf, const DataShared& sh, const DispatchArgs& a, int lane) {
  if (a.topk_idx == nullptr && !kCached) return;  // later passes of dispatch: metadata went with the first
  const int num_ranks = buf.layout.num_ranks;
  const int step = gridDim.x * kReceiverWarps;
  const int first = prefix_of(sh, num_ranks, num_ranks, buf.rank) + blockIdx.x * kReceiverWarps +
                    (warp_id() - kSenderWarps);
  for (int64_t row = first; row < a.num_recv_rows; row += step) {
    if (a.topk_idx != nullptr) store_recv_meta(a, row, -1, -1, 0.0f, buf.rank, buf.layout.experts_per_rank(), lane);
    if (kCached) {
      warp_zero(reinterpret_cast<int4*>(a.recv_x + row * a.row_bytes + a.col_offset), a.col_bytes / 16, lane);
      for (int i = lane; i < a.num_scales; i += kWarpSize) a.recv_x_scales[row * a.num_scales + i] = 0.0f;
    }
  }
}

// Receiver warps: for each (chunk of this block, source) the rows are shared
// out over the warps; a warp waits for the chunk's flag only if it has a row.
template <bool kCached>
__device__ void receive_chunks(const BufferRef& buf, const DataShared& sh, const DispatchArgs& a, uint64_t epoch) {
  const BufferLayout& layout = buf.layout;
  const int num_ranks = layout.num_ranks, rank = buf.rank;
  const int lane = lane_id(), receiver = warp_id() - kSenderWarps;
  char* own = sh.peers[rank];
  for (int c = blockIdx.x; c < layout.max_chunks; c += gridDim.x) {
    for (int i = 1; i < num_ranks; ++i) {
      const int s = (rank + i) % num_ranks;  // staggered so that ranks do not all drain source 0 first
      const int first = prefix_of(sh, num_ranks, s, rank);
      const RowRange rows =
          kCached ? find_chunk_rows(a.recv_src_idx, first, prefix_of(sh, num_ranks, s + 1, rank), c)
                  : RowRange{a.recv_chunk_prefix[s * (layout.max_chunks + 1) + c],
                             a.recv_chunk_prefix[s * (layout.max_chunks + 1) + c + 1]};
      if (rows.end - rows.begin <= receiver) continue;
      wait_flag(layout.chunk_flag(own, s, c), epoch, buf, s);
      for (int row = rows.begin + receiver; row < rows.end; row += kReceiverWarps) {
        receive_row(buf, sh, a, s, row, first + row, lane);
      }
    }
  }
  fill_padding_rows<kCached>(buf, sh, a, lane);
}

// kCached: cached_dispatch, which finds each chunk's rows from recv_src_idx
// instead of the notify kernel's chunk prefix.
template <bool kCached>
__global__ void __launch_bounds__(kDataThreads, 1) dispatch_kernel(BufferRef buf, DispatchArgs a) {
  __shared__ DataShared sh;
  load_data_shared(sh, buf, a.rank_prefix);
  check_recv_rows(sh, buf, a.num_recv_rows);
  const uint64_t epoch = *buf.epoch;
  if (warp_id() < kSenderWarps) send_chunks(buf, sh, a, epoch);
  else receive_chunks<kCached>(buf, sh, a, epoch);
}

// ---- combine -----------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }

template <typename T>
constexpr int kElemsPer16 = 16 / static_cast<int>(sizeof(T));

// acc += the elements packed in 16 bytes, one plain fp32 add each (no FMA), so
// that the order of the sum alone fixes the result.
template <typename T>
__device__ __forceinline__ void accumulate(float (&acc)[kElemsPer16<T>], const int4& packed) {
  const T* elems = reinterpret_cast<const T*>(&packed);
#pragma unroll
  for (int i = 0; i < kElemsPer16<T>; ++i) acc[i] = __fadd_rn(acc[i], to_float(elems[i]));
}

template <typename T>
__device__ __forceinline__ int4 pack(const float (&acc)[kElemsPer16<T>]) {
  int4 packed;
  T* elems = reinterpret_cast<T*>(&packed);
#pragma unroll
  for (int i = 0; i < kElemsPer16<T>; ++i) elems[i] = from_float<T>(acc[i]);
  return packed;
}

// Sender warps: rows that other ranks' tokens have here go back to their home
// rank, chunk by chunk of the home rank's tokens, into the home rank's buffer
// at this rank's block (row index relative to the first row from that home).
__device__ void return_rows(const BufferRef& buf, DataShared& sh, const CombineArgs& a, uint64_t epoch) {
  const BufferLayout& layout = buf.layout;
  const int num_ranks = layout.num_ranks, rank = buf.rank;
  const int lane = lane_id(), warp = warp_id();
  int step = 0;
  for (int c = blockIdx.x; c < layout.max_chunks; c += gridDim.x) {
    for (int i = 1; i < num_ranks; ++i) {
      const int home = (rank + i) % num_ranks;
      const int first = prefix_of(sh, num_ranks, home, rank);
      const RowRange rows = find_chunk_rows(a.recv_src_idx, first, prefix_of(sh, num_ranks, home + 1, rank), c);
      if (rows.begin == rows.end) continue;
      for (int row = rows.begin + warp; row < rows.end; row += kSenderWarps) {
        warp_copy<false>(reinterpret_cast<int4*>(layout.data_slot(sh.peers[home], rank, row)),
                         reinterpret_cast<const int4*>(a.y + (first + row) * a.row_bytes + a.col_offset),
                         a.col_bytes / 16, lane);
      }
      if (finish_send_step(sh.progress, step++) && lane == 0) {
        st_release_sys(layout.chunk_flag(sh.peers[home], rank, c), epoch);
      }
    }
  }
}

// Ranks (bit d) that hold a row of at least one token of chunk c.
__device__ uint32_t ranks_with_rows(const CombineArgs& a, int num_ranks, int c, int lane) {
  const int t = c * kChunkTokens + lane;
  uint32_t ranks = 0;
  for (int d = 0; d < num_ranks; ++d) {
    const bool has_row = t < a.num_tokens && a.send_pos[static_cast<int64_t>(t) * num_ranks + d] >= 0;
    if (__any_sync(kFullMask, has_row)) ranks |= 1u << d;
  }
  return ranks;
}

// out[t] = sum over ranks d ascending of token t's row on d (own rows read
// from y, others from this rank's buffer), in fp32.
template <typename T>
__device__ void reduce_token(const BufferRef& buf, const DataShared& sh, const CombineArgs& a, int t, int lane) {
  const BufferLayout& layout = buf.layout;
  const int num_ranks = layout.num_ranks, rank = buf.rank;
  const int lane_pos = lane < num_ranks ? a.send_pos[static_cast<int64_t>(t) * num_ranks + lane] : -1;
  const int4* src[kMaxRanks];
#pragma unroll
  for (int r = 0; r < kMaxRanks; ++r) {
    const int pos = __shfl_sync(kFullMask, lane_pos, r);
    src[r] = nullptr;
    if (pos < 0) continue;
    src[r] = r == rank ? reinterpret_cast<const int4*>(a.y + pos * a.row_bytes + a.col_offset)
                       : reinterpret_cast<const int4*>(
                             layout.data_slot(sh.peers[rank], r, pos - prefix_of(sh, num_ranks, rank, r)));
  }
  int4* dst = reinterpret_cast<int4*>(a.out + t * a.row_bytes + a.col_offset);
  const int n16 = a.col_bytes / 16;
  for (int base = lane; base < n16; base += kWarpSize * kReduceUnroll) {
    int4 v[kMaxRanks][kReduceUnroll];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u) {
        const int i = base + u * kWarpSize;
        if (src[r] != nullptr && i < n16) v[r][u] = r == rank ? load_input16(src[r] + i) : load_landed16(src[r] + i);
      }
    }
#pragma unroll
    for (int u = 0; u < kReduceUnroll; ++u) {
      const int i = base + u * kWarpSize;
      if (i >= n16) continue;
      float acc[kElemsPer16<T>];
#pragma unroll
      for (int e = 0; e < kElemsPer16<T>; ++e) acc[e] = 0.0f;
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r) {
        if (src[r] != nullptr) accumulate<T>(acc, v[r][u]);
      }
      dst[i] = pack<T>(acc);
    }
  }
}

// Reducer warps: per chunk of this rank's tokens, wait for the ranks that
// hold rows of it, then share the tokens out over the warps.
template <typename T>
__device__ void reduce_chunks(const BufferRef& buf, const DataShared& sh, const CombineArgs& a, uint64_t epoch) {
  const BufferLayout& layout = buf.layout;
  const int num_ranks = layout.num_ranks, rank = buf.rank;
  const int lane = lane_id(), reducer = warp_id() - kSenderWarps;
  const int num_chunks = static_cast<int>(ceil_div(a.num_tokens, kChunkTokens));
  for (int c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const uint32_t ranks = ranks_with_rows(a, num_ranks, c, lane);
    if (lane < num_ranks && lane != rank && ((ranks >> lane) & 1u)) {
      wait_flag(layout.chunk_flag(sh.peers[rank], lane, c), epoch, buf, lane);
    }
    __syncwarp();
    for (int j = reducer; j < kChunkTokens; j += kReceiverWarps) {
      const int t = c * kChunkTokens + j;
      if (t < a.num_tokens) reduce_token<T>(buf, sh, a, t, lane);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kDataThreads, 1) combine_kernel(BufferRef buf, CombineArgs a) {
  __shared__ DataShared sh;
  load_data_shared(sh, buf, a.rank_prefix);
  check_recv_rows(sh, buf, a.num_recv_rows);
  const uint64_t epoch = *buf.epoch;
  if (warp_id() < kSenderWarps) return_rows(buf, sh, a, epoch);
  else reduce_chunks<T>(buf, sh, a, epoch);
}

// ---- peer copy ---------------------------------------------------------------------------------

// Writes all of src into this rank's block of every peer's data region; each
// warp task reads a segment once and stores it to all peers.
__global__ void __launch_bounds__(kPeerCopyThreads) peer_copy_kernel(BufferRef buf, const int4* src, int64_t n16) {
  const BufferLayout& layout = buf.layout;
  int4* peer_data[kMaxRanks];
#pragma unroll
  for (int r = 0; r < kMaxRanks; ++r) {
    peer_data[r] = (r < layout.num_ranks && r != buf.rank)
                       ? reinterpret_cast<int4*>(layout.data_slot(buf.peers[r], buf.rank, 0))
                       : nullptr;
  }
  const int warps_per_block = kPeerCopyThreads / kWarpSize;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t seg = (static_cast<int64_t>(blockIdx.x) * warps_per_block + warp_id()) * kPeerCopySegment; seg < n16;
       seg += num_warps * kPeerCopySegment) {
    int4* dst[kMaxRanks];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) dst[r] = peer_data[r] != nullptr ? peer_data[r] + seg : nullptr;
    const int64_t left = n16 - seg;
    warp_copy_to_ranks(dst, src + seg, left < kPeerCopySegment ? static_cast<int>(left) : kPeerCopySegment, lane_id());
  }
}

}  // namespace

void launch_barrier(const BufferRef& buf, cudaStream_t stream) {
  barrier_kernel<<<1, kWarpSize, 0, stream>>>(buf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_notify_dispatch(const BufferRef& buf, const NotifyArgs& args, cudaStream_t stream) {
  const int64_t stride = ceil_div(args.num_tokens, kChunkTokens) + 1;
  const size_t smem = static_cast<size_t>(buf.layout.num_experts + buf.layout.num_ranks * stride) * sizeof(int);
  set_dynamic_smem(notify_dispatch_kernel, smem, "dispatch's notify kernel (counters for experts and chunks)");
  notify_dispatch_kernel<<<1, kNotifyThreads, smem, stream>>>(buf, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_dispatch(const BufferRef& buf, const DispatchArgs& args, cudaStream_t stream) {
  if (args.recv_chunk_prefix != nullptr) {
    dispatch_kernel<false><<<buf.num_sms, kDataThreads, 0, stream>>>(buf, args);
  } else {
    dispatch_kernel<true><<<buf.num_sms, kDataThreads, 0, stream>>>(buf, args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_combine(const BufferRef& buf, const CombineArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case FloatType::kBFloat16:
      combine_kernel<__nv_bfloat16><<<buf.num_sms, kDataThreads, 0, stream>>>(buf, args);
      break;
    case FloatType::kHalf:
      combine_kernel<__half><<<buf.num_sms, kDataThreads, 0, stream>>>(buf, args);
      break;
    case FloatType::kFloat:
      combine_kernel<float><<<buf.num_sms, kDataThreads, 0, stream>>>(buf, args);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_peer_copy(const BufferRef& buf, const void* src, int64_t num_bytes, int num_sms, cudaStream_t stream) {
  peer_copy_kernel<<<num_sms, kPeerCopyThreads, 0, stream>>>(buf, static_cast<const int4*>(src), num_bytes / 16);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace torch_ep
