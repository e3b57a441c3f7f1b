// combine's data kernel: rows that other ranks' tokens have here go back to
// their home rank, and each home sums, per token, the rows of every rank that
// received it (fp32, ascending rank: bitwise reproducible).
//
// Senders: block b of rank d owns the b-th even slice of the rows d received
// from each home h, pushes them into h's staging rows (at their index among
// those rows) and raises progress[d][b] on h after every step. Reducers:
// block b of a home owns the b-th even slice of its tokens; its warps claim
// them one at a time, in order, and for each wait until the block of every
// rank holding one of its rows reports that row landed (both sides know the
// other's split), then sum. Senders that are done join the reducers.
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

// Dynamic shared memory: one counter per send step of this block. A rank
// receives at most max_tokens rows from each source, which bounds the steps.
inline int max_combine_steps(const BufferLayout& layout, int num_blocks, int step_items) {
  const int64_t rows = static_cast<int64_t>(layout.num_ranks) * layout.max_tokens;
  return static_cast<int>(ceil_div(ceil_div(rows, num_blocks) + layout.num_ranks, step_items)) + layout.num_ranks;
}

// ---- senders -----------------------------------------------------------------------------------

__device__ void return_rows(const BufferRef& buf, const PeerShared& sh, const CombineArgs& a, uint64_t epoch,
                            int* step_counters, int max_steps) {
  const BufferLayout& layout = buf.layout;
  const int num_ranks = layout.num_ranks, rank = buf.rank, lane = lane_id(), warp = warp_id();
  for (int k = threadIdx.x; k < max_steps; k += kSenderWarps * kWarpSize) step_counters[k] = 0;
  sender_sync<kSenderWarps>();
  int step = 0;
  for (int i = 1; i < num_ranks; ++i) {
    const int home = (rank + i) % num_ranks;
    const int from_home = min(rows_between(sh, num_ranks, home, rank), layout.max_tokens);
    const Range rows = block_range(from_home, blockIdx.x, gridDim.x);
    if (rows.begin == rows.end) continue;
    if (__any_sync(kFullMask, !wait_arrival(buf, sh, epoch, home, a.signature))) return;  // the op failed
    if (i == 1) trace_last(buf, kTraceSendReady);
    const int64_t base = prefix_of(sh, num_ranks, home, rank);  // y row of the first row from home
    const int slot = BufferLayout::peer_slot(rank, home);
    const int num_steps = static_cast<int>(ceil_div(rows.end - rows.begin, buf.step_items));
    for (int k = 0; k < num_steps; ++k, ++step) {
      for (int i = warp; i < buf.step_items; i += kSenderWarps) {
        const int64_t j = rows.begin + static_cast<int64_t>(k) * buf.step_items + i;
        if (j < rows.end && base + j < a.num_recv_rows) {  // rows past capacity were never received
          warp_copy<false>(reinterpret_cast<int4*>(layout.data_slot(sh.peers[home], slot, j)),
                           reinterpret_cast<const int4*>(a.y + (base + j) * a.row_bytes + a.col_offset),
                           a.col_bytes / 16, lane);
        }
      }
      trace_last(buf, kTraceStoresIssued);
      if (finish_step<kSenderWarps>(step_counters, step) && lane == 0) {
        const int64_t done = min(rows.end - rows.begin, static_cast<int64_t>(k + 1) * buf.step_items);
        red_max_release_sys(layout.progress(sh.peers[home], rank, blockIdx.x), progress_value(epoch, done));
        if (step == 0) trace_at(buf, kTraceFirstStep);
      }
    }
  }
  trace_last(buf, kTraceSendDone);
}

// ---- reducers ----------------------------------------------------------------------------------

// Lane d waits until token t's row on rank d (if any, d != this rank) has landed here.
__device__ void wait_token_rows(const BufferRef& buf, const PeerShared& sh, const CombineArgs& a, uint64_t epoch,
                                int64_t t, int lane) {
  const int num_ranks = buf.layout.num_ranks, rank = buf.rank;
  if (lane < num_ranks && lane != rank) {
    const int pos = a.send_pos[t * num_ranks + lane];
    if (pos >= 0) {
      const int64_t j = pos - prefix_of(sh, num_ranks, rank, lane);
      const int64_t n = rows_between(sh, num_ranks, rank, lane);
      const int owner = block_of(j, n, gridDim.x);
      wait_rows(buf, sh, epoch, lane, owner, j - block_range(n, owner, gridDim.x).begin + 1);
    }
  }
  __syncwarp();
}

// out[t] = sum over ranks d ascending of token t's row on d (own row read
// from y, the others from this rank's staging rows).
template <typename T, int kRanks>
__device__ void reduce_token(const BufferRef& buf, const PeerShared& sh, const CombineArgs& a, int64_t t, int lane) {
  constexpr int kUnroll = kRanks >= 8 ? 1 : 8 / kRanks;  // 16-byte loads in flight per lane
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

// next_token: the block's shared count of claimed tokens.
template <typename T, int kRanks>
__device__ void reduce_tokens(const BufferRef& buf, const PeerShared& sh, const CombineArgs& a, uint64_t epoch,
                              int* next_token) {
  const int lane = lane_id();
  const Range tokens = block_range(a.num_tokens, blockIdx.x, gridDim.x);
  for (;;) {
    int claimed = 0;
    if (lane == 0) claimed = atomicAdd(next_token, 1);
    const int64_t t = tokens.begin + __shfl_sync(kFullMask, claimed, 0);
    if (t >= tokens.end) break;
    wait_token_rows(buf, sh, a, epoch, t, lane);
    if (t == tokens.begin && lane == 0) trace_at(buf, kTraceFirstLanded);
    reduce_token<T, kRanks>(buf, sh, a, t, lane);
  }
  trace_last(buf, kTraceReceiveDone);
}

// kRanks: the number of ranks rounded up to 2, 4 or 8 (sizes the per-lane load buffers).
template <typename T, int kRanks>
__global__ void __launch_bounds__(kDataThreads, 1) combine_kernel(BufferRef buf, CombineArgs a, int max_steps) {
  extern __shared__ int step_counters[];
  __shared__ PeerShared sh;
  __shared__ int next_token;
  const uint64_t epoch = op_epoch(buf);
  if (threadIdx.x == 0) trace_at(buf, kTraceStart);
  if (op_aborted(buf, epoch)) {  // an earlier op of this buffer failed
    finish_op(buf, epoch);
    return;
  }
  if (threadIdx.x == 0) next_token = 0;
  load_peer_shared(sh, buf, a.rank_prefix);
  if (warp_id() < kSenderWarps) {
    announce_arrival(buf, sh, epoch, a.signature);
    return_rows(buf, sh, a, epoch, step_counters, max_steps);
  }
  reduce_tokens<T, kRanks>(buf, sh, a, epoch, &next_token);
  finish_op(buf, epoch);
  if (threadIdx.x == 0) trace_at(buf, kTraceEnd);
}

template <typename T>
void launch_combine_typed(const BufferRef& buf, const CombineArgs& args, cudaStream_t stream) {
  const int steps = max_combine_steps(buf.layout, buf.num_sms, buf.step_items);
  const size_t smem = static_cast<size_t>(steps) * sizeof(int);
  const int num_ranks = buf.layout.num_ranks;
  auto kernel = num_ranks <= 2 ? combine_kernel<T, 2> : num_ranks <= 4 ? combine_kernel<T, 4> : combine_kernel<T, 8>;
  set_dynamic_smem(kernel, smem, "combine (progress steps of one block's rows)");
  kernel<<<buf.num_sms, kDataThreads, smem, stream>>>(buf, args, steps);
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
