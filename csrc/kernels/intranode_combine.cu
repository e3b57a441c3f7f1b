// combine's data kernel: rows that other ranks' tokens have here go back to
// their home rank, and each home sums, per token, the rows of every rank that
// received it (fp32, ascending rank: bitwise reproducible).
//
// Senders: the rows rank d received from each home h are cut into chunks
// (sizes both sides derive from the row count) that d's blocks claim from a
// counter, so blocks the link serves faster send more; a block pushes a
// chunk into h's staging rows (at their index among those rows) and marks it
// landed on h. Reducers: every block's warps claim the home's tokens one at
// a time, in order (the order their rows land in), and for each wait until
// the chunk holding each of its rows has landed, then sum. Senders that are
// done join the reducers.
//
// From the combine region (every rank's y is its Buffer.combine_input): no
// rows are sent; every warp reduces, reading the peers' rows in their regions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels/intranode.cuh"

namespace torch_ep {
namespace {

// A few sender warps keep the link busy; reducers read two or more rows per token (latency-bound
// loads), so they get most warps.
constexpr int kSenderWarps = 8;

// ---- element types -------------------------------------------------------------------------------

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;  // fp64 sums in fp64, all else in fp32

__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(Acc<T> v);
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename T>
constexpr int kElemsPer16 = 16 / static_cast<int>(sizeof(T));

// acc += the elements packed in 16 bytes, one plain add each (no FMA), so that
// the order of the sum alone fixes the result.
template <typename T>
__device__ __forceinline__ void accumulate(Acc<T> (&acc)[kElemsPer16<T>], const int4& packed) {
  const T* elems = reinterpret_cast<const T*>(&packed);
#pragma unroll
  for (int i = 0; i < kElemsPer16<T>; ++i) acc[i] = add_rn(acc[i], to_acc(elems[i]));
}

template <typename T>
__device__ __forceinline__ int4 pack(const Acc<T> (&acc)[kElemsPer16<T>]) {
  int4 packed;
  T* elems = reinterpret_cast<T*>(&packed);
#pragma unroll
  for (int i = 0; i < kElemsPer16<T>; ++i) elems[i] = from_acc<T>(acc[i]);
  return packed;
}

// Rows this rank received from `home` (rows past max_tokens were never staged).
__device__ __forceinline__ int rows_from_home(const BufferRef& buf, const PeerShared& sh, int home, int rank) {
  return min(rows_between(sh, buf.layout.num_ranks, home, rank), buf.layout.max_tokens);
}

// ---- senders -----------------------------------------------------------------------------------

// Unit u of the claims: chunk u / (R - 1) of the rows from home (rank + 1 + u % (R - 1)) % R.
__device__ void return_rows(const BufferRef& buf, const PeerShared& sh, ClaimedSteps& cs, const CombineArgs& a,
                            uint64_t epoch) {
  const BufferLayout& layout = buf.layout;
  const int num_ranks = layout.num_ranks, rank = buf.rank, lane = lane_id(), warp = warp_id();
  const int peers = num_ranks - 1;
  // lane i - 1 of every warp: home (rank + i) % R, its rows, chunk size and chunk count
  const int home = (rank + 1 + lane) % num_ranks;
  const int from_home = lane < peers ? rows_from_home(buf, sh, home, rank) : 0;
  const int per_chunk = chunk_items(from_home, gridDim.x, buf.step_items);
  const int chunks = static_cast<int>(ceil_div(from_home, per_chunk));
  const int most = __reduce_max_sync(kFullMask, chunks);
  unsigned* claims = &buf.control->send_units;
  if (peers == 0) return;
  bool failed = false;  // a home is silent or runs another call: the block sends nothing
  if (warp == 0) failed = __any_sync(kFullMask, lane < peers && !wait_arrival(buf, sh, epoch, home, a.signature));
  if (threadIdx.x == 0) claim_first_unit(cs, claims, failed);
  sender_sync<kSenderWarps>();
  trace_last(buf, kTraceSendReady);
  int unit;
  for (int k = 0; next_unit<kSenderWarps>(cs, claims, k, most * peers, unit); ++k) {
    const int chunk = unit / peers, i = unit % peers;
    const int to = __shfl_sync(kFullMask, home, i), rows = __shfl_sync(kFullMask, from_home, i);
    const int chunk_rows = __shfl_sync(kFullMask, per_chunk, i);
    const bool exists = chunk < __shfl_sync(kFullMask, chunks, i);  // the same in every warp
    const int64_t base = prefix_of(sh, num_ranks, to, rank);  // y row of the first row from home
    const int peer_slot = BufferLayout::peer_slot(rank, to);
    for (int r = warp; exists && r < chunk_rows; r += kSenderWarps) {
      const int64_t j = static_cast<int64_t>(chunk) * chunk_rows + r;
      if (j < rows && base + j < a.num_recv_rows) {  // rows past capacity were never received
        warp_copy<false>(reinterpret_cast<int4*>(layout.data_slot(sh.peers[to], peer_slot, j)),
                         reinterpret_cast<const int4*>(a.y + (base + j) * a.row_bytes + a.col_offset),
                         a.col_bytes / 16, lane);
      }
    }
    trace_last(buf, kTraceStoresIssued);
    finish_unit<kSenderWarps>(cs, k, exists ? unit : -1);
  }
}

// The signal warp: marks each unit the senders stored (-1: none) landed on its home.
__device__ void signal_rows(const BufferRef& buf, const PeerShared& sh, ClaimedSteps& cs, uint64_t epoch) {
  const int num_ranks = buf.layout.num_ranks, rank = buf.rank, peers = num_ranks - 1;
  signal_steps(cs, [&](int unit, int, int k) {
    if (unit < 0 || lane_id() != 0) return;
    const int to = (rank + 1 + unit % peers) % num_ranks;
    st_release_sys(buf.layout.chunk_landed(sh.peers[to], rank, unit / peers) + 1, progress_value(epoch, 0));
    if (k == 0) trace_at(buf, kTraceFirstStep);
  });
  trace_last(buf, kTraceSendDone);
}

// ---- reducers ----------------------------------------------------------------------------------

// Lane d waits until the chunk holding token t's row on rank d (if any, d != this rank) has landed here.
__device__ void wait_token_rows(const BufferRef& buf, const PeerShared& sh, const CombineArgs& a, uint64_t epoch,
                                int64_t t, int lane) {
  const int num_ranks = buf.layout.num_ranks, rank = buf.rank;
  if (lane < num_ranks && lane != rank) {
    const int pos = a.send_pos[t * num_ranks + lane];
    if (pos >= 0) {
      const int64_t j = pos - prefix_of(sh, num_ranks, rank, lane);
      const int per_chunk = chunk_items(rows_from_home(buf, sh, rank, lane), gridDim.x, buf.step_items);
      const uint64_t* landed = buf.layout.chunk_landed(sh.peers[rank], lane, static_cast<int>(j / per_chunk)) + 1;
      wait_flag(landed, progress_value(epoch, 0), buf, lane);
    }
  }
  __syncwarp();
}

// out[t] = sum over ranks d ascending of token t's row on d (own row read
// from y, the others from this rank's staging rows, or from d's combine region).
template <typename T, int kRanks, bool kFromRegion>
__device__ void reduce_token(const BufferRef& buf, const PeerShared& sh, const CombineArgs& a, int64_t t, int lane) {
  // 16-byte loads in flight per lane; rows read from peers wait a round trip over the link, so more of them
  // (16 / kRanks spills registers)
  constexpr int kUnroll = kRanks >= 8 ? 1 : (kFromRegion ? 12 : 8) / kRanks;
  const BufferLayout& layout = buf.layout;
  const int num_ranks = layout.num_ranks, rank = buf.rank;
  const int lane_pos = lane < num_ranks ? a.send_pos[t * num_ranks + lane] : -1;
  const int4* src[kRanks];
#pragma unroll
  for (int r = 0; r < kRanks; ++r) {
    const int pos = __shfl_sync(kFullMask, lane_pos, r);
    src[r] = nullptr;
    if (pos < 0) continue;
    if (r == rank) {
      if (pos < a.num_recv_rows) src[r] = reinterpret_cast<const int4*>(a.y + pos * a.row_bytes + a.col_offset);
    } else if (kFromRegion) {
      src[r] = reinterpret_cast<const int4*>(layout.combine_row(sh.peers[r], pos, a.row_bytes) + a.col_offset);
    } else {
      src[r] = reinterpret_cast<const int4*>(layout.data_slot(sh.peers[rank], BufferLayout::peer_slot(r, rank),
                                                              pos - prefix_of(sh, num_ranks, rank, r)));
    }
  }
  int4* dst = reinterpret_cast<int4*>(a.out + t * a.row_bytes + a.col_offset);
  const int n16 = a.col_bytes / 16;
  for (int base = lane; base < n16; base += kWarpSize * kUnroll) {
    int4 v[kRanks][kUnroll];
#pragma unroll
    for (int r = 0; r < kRanks; ++r) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kWarpSize;
        if (src[r] != nullptr && i < n16) v[r][u] = r == rank ? load_input16(src[r] + i) : load_landed16(src[r] + i);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kWarpSize;
      if (i >= n16) continue;
      Acc<T> acc[kElemsPer16<T>];
#pragma unroll
      for (int e = 0; e < kElemsPer16<T>; ++e) acc[e] = 0;
#pragma unroll
      for (int r = 0; r < kRanks; ++r) {
        if (src[r] != nullptr) accumulate<T>(acc, v[r][u]);
      }
      dst[i] = pack<T>(acc);
    }
  }
}

// Warps of every block claim the tokens one at a time, in order.
template <typename T, int kRanks, bool kFromRegion>
__device__ void reduce_tokens(const BufferRef& buf, const PeerShared& sh, const CombineArgs& a, uint64_t epoch) {
  const int lane = lane_id();
  for (;;) {
    unsigned claimed = 0;
    if (lane == 0) claimed = atomicAdd(&buf.control->receive_units, 1u);
    const int64_t t = __shfl_sync(kFullMask, claimed, 0);
    if (t >= a.num_tokens) break;
    if (!kFromRegion) wait_token_rows(buf, sh, a, epoch, t, lane);
    if (t == 0 && lane == 0) trace_at(buf, kTraceFirstLanded);
    reduce_token<T, kRanks, kFromRegion>(buf, sh, a, t, lane);
  }
  trace_last(buf, kTraceReceiveDone);
}

// ---- from the combine region ------------------------------------------------------------------

// The last block to finish reading tells every peer that its region has been read, then waits until
// every peer has read this rank's: once the kernel ends, the caller may write the region again.
__device__ void release_regions(const BufferRef& buf, const PeerShared& sh, uint64_t epoch) {
  const BufferLayout& layout = buf.layout;
  __shared__ bool last;
  __syncthreads();  // the block's reads are done (their values are summed)
  if (threadIdx.x == 0) {
    last = atomicAdd(&buf.control->read_blocks, 1u) == gridDim.x - 1;
    if (last) buf.control->read_blocks = 0;
  }
  __syncthreads();
  const int d = threadIdx.x;
  if (!last || d >= layout.num_ranks || d == buf.rank) return;
  st_release_sys(layout.inputs_read(sh.peers[d], buf.rank), epoch);
  wait_flag(layout.inputs_read(sh.peers[buf.rank], d), epoch, buf, d);
}

// Every warp reduces once every peer has entered the op (its y is written) with the same signature.
template <typename T, int kRanks>
__device__ void reduce_from_regions(const BufferRef& buf, const PeerShared& sh, const CombineArgs& a, uint64_t epoch) {
  const int lane = lane_id();
  announce_arrival(buf, sh, epoch, a.signature);
  __shared__ bool entered;
  if (warp_id() == 0) {
    const bool ok = lane >= buf.layout.num_ranks || lane == buf.rank || wait_arrival(buf, sh, epoch, lane, a.signature);
    const bool all = __all_sync(kFullMask, ok);
    if (lane == 0) entered = all;
  }
  __syncthreads();
  if (entered) reduce_tokens<T, kRanks, true>(buf, sh, a, epoch);
  release_regions(buf, sh, epoch);
}

// kRanks: the number of ranks rounded up to 2, 4 or 8 (sizes the per-lane load buffers).
template <typename T, int kRanks>
__global__ void __launch_bounds__(kDataThreads, 1) combine_kernel(BufferRef buf, CombineArgs a) {
  __shared__ PeerShared sh;
  __shared__ ClaimedSteps cs;
  const uint64_t epoch = op_epoch(buf);
  if (threadIdx.x == 0) trace_at(buf, kTraceStart);
  if (op_aborted(buf, epoch)) {  // an earlier op of this buffer failed
    finish_op(buf, epoch);
    return;
  }
  if (threadIdx.x == 0) init_steps(cs, buf.layout.num_ranks > 1);
  load_peer_shared(sh, buf, a.rank_prefix);
  if (a.from_region) {
    reduce_from_regions<T, kRanks>(buf, sh, a, epoch);
  } else {
    if (warp_id() < kSenderWarps) {
      announce_arrival(buf, sh, epoch, a.signature);
      return_rows(buf, sh, cs, a, epoch);
    } else if (warp_id() == kSignalWarp) {
      signal_rows(buf, sh, cs, epoch);
    }
    reduce_tokens<T, kRanks, false>(buf, sh, a, epoch);
  }
  finish_op(buf, epoch);
  if (threadIdx.x == 0) trace_at(buf, kTraceEnd);
}

template <typename T>
void launch_combine_typed(const BufferRef& buf, const CombineArgs& args, cudaStream_t stream) {
  const int num_ranks = buf.layout.num_ranks;
  auto kernel = num_ranks <= 2 ? combine_kernel<T, 2> : num_ranks <= 4 ? combine_kernel<T, 4> : combine_kernel<T, 8>;
  kernel<<<buf.num_sms, kDataThreads, 0, stream>>>(buf, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_combine(const BufferRef& buf, const CombineArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case FloatType::kBFloat16: launch_combine_typed<__nv_bfloat16>(buf, args, stream); break;
    case FloatType::kHalf: launch_combine_typed<__half>(buf, args, stream); break;
    case FloatType::kFloat: launch_combine_typed<float>(buf, args, stream); break;
    case FloatType::kDouble: launch_combine_typed<double>(buf, args, stream); break;
  }
}

}  // namespace torch_ep
