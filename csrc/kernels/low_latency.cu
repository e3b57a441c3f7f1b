// Low-latency (decode) kernels: one kernel per op, buf.num_sms blocks, no host sync,
// CUDA-graph capturable. Semantics and exact rounding: torch_ep/low_latency.py;
// buffer region: runtime/low_latency_layout.h.
//
// Every op runs in three steps:
//   1. send: blocks split this rank's work and write it into the peers' staging
//      slots of parity (epoch & 1);
//   2. signal: each block, after a barrier, adds 1 to arrive[me] on every rank
//      with a system-scope release, then waits until arrive[s] reaches
//      epoch * num_blocks for every source s (acquire);
//   3. receive: blocks split what landed and write this rank's outputs.
// The epoch is the LL op counter in this rank's region: every block reads it
// at the start and the last block to finish stores the new value, so CUDA
// graph replays advance it. All ranks must use the same num_sms.
// Dispatch's token counts and top-k ids are tagged words (the op's tag in the
// high half, written with one 8-byte store), so receivers build their expert
// masks between their own signal and the peers' signals (a word whose tag is
// not yet there is waited for, bounded; once a peer's signal is seen it reads as
// it is, and a peer running another op fails the signature check).
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <c10/cuda/CUDAException.h>

#include "kernels/api.cuh"
#include "kernels/utils.cuh"

namespace torch_ep {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kSliceChannels = 1024;             // bf16 channels of one work item (a row is split into slices)
template <int kChannels>
constexpr int kStepsOf = kChannels / (kWarpSize * 8);  // a lane moves 8 channels (16 bytes) per step
constexpr int kSteps = kStepsOf<kSliceChannels>;
// Dispatch's send items: FP8 slices are half as wide, which spreads the quantisation (an exact division per
// channel) over twice as many warps.
template <bool kFp8>
constexpr int kSendChannels = kFp8 ? kSliceChannels / 2 : kSliceChannels;
constexpr float kFp8Max = 448.0f;
// Dispatch's signal: the last warp of a block publishes the block's writes (its system-scope release waits for
// them to land) while the other warps build the expert masks, in a group that never waits for the release.
constexpr int kMaskThreads = (kWarps - 1) * kWarpSize;
enum DispatchBarrier : int { kBarSent = 1, kBarMaskGroup = 2, kBarMasksBuilt = 3 };  // 0 is __syncthreads
static_assert(kLowLatencyMetaBytes >= 12 * kMaxTopk, "a metadata slot holds K tagged ids and K weights");
static_assert(kSendChannels<true> % kScaleBlock == 0, "FP8 scale blocks never straddle slices");
static_assert(kSliceChannels % (kWarpSize * 16) == 0, "a slice's fp8 bytes are whole 16-byte units per lane");

// ---- epoch and signalling ------------------------------------------------------------------------

struct Round {
  uint64_t epoch;
  int parity;
};

__device__ Round begin_round(const BufferRef& buf) {
  __shared__ uint64_t epoch;
  if (threadIdx.x == 0) {
    trace_at(buf, kTraceStart);
    epoch = *reinterpret_cast<volatile uint64_t*>(buf.layout.low_latency.op_counter(buf.peers[buf.rank])) + 1;
  }
  __syncthreads();
  return {epoch, static_cast<int>(epoch & 1)};
}

// A tagged word of this op: the tag differs from the op two epochs back (the last one to write a slot of
// this parity) and from zeroed memory; it repeats only after 2^31 ops.
__device__ __forceinline__ uint64_t tagged(const Round& round, int value) {
  const uint64_t tag = (round.epoch & 0x7fffffffu) | 0x80000000u;
  return (tag << 32) | static_cast<uint32_t>(value);
}

__device__ __forceinline__ bool has_tag(const Round& round, uint64_t word) {
  return (word >> 32) == (tagged(round, 0) >> 32);
}

__device__ __forceinline__ void red_add_release_sys(uint64_t* ptr, uint64_t value) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// Tells rank r that this block is done writing to it (block 0 first tells it what this op is). The caller has
// passed a barrier with every writer of the block: a release is cumulative (it orders, at system scope, what its
// thread observed through the barrier), so one release per rank publishes the whole block's writes, with no
// per-thread fence.
__device__ __forceinline__ void arrive_at(const BufferRef& buf, const Round& round, const Signature& sig, int r) {
  const LowLatencyLayout& ll = buf.layout.low_latency;
  if (blockIdx.x == 0) *ll.signature(buf.peers[r], round.parity, buf.rank) = signature_bits(sig);  // released below
  red_add_release_sys(ll.arrive(buf.peers[r], buf.rank), 1);
  if (r == 0) trace_at(buf, kTraceSendDone);
}

// After this block's writes to every peer: tell every rank.
__device__ void signal_peers(const BufferRef& buf, const Round& round, const Signature& sig) {
  trace_last(buf, kTraceStoresIssued);
  __syncthreads();
  if (threadIdx.x < buf.layout.low_latency.num_ranks) arrive_at(buf, round, sig, threadIdx.x);
}

// Waits for every rank's blocks and checks that every rank runs the same op on rows of the same shape.
// False (in every thread of the block) if the op failed: a rank stayed silent past timeout_s, runs another
// call, or another block failed the op; nothing that landed may then be read.
__device__ bool await_peers(const BufferRef& buf, const Round& round, const Signature& sig) {
  const LowLatencyLayout& ll = buf.layout.low_latency;
  const int r = threadIdx.x;
  if (r < ll.num_ranks) {
    char* own = buf.peers[buf.rank];
    const uint64_t target = round.epoch * gridDim.x;
    if (wait_flag(ll.arrive(own, r), target, buf, r) >= target) {  // every block of r signalled, block 0 too
      const uint64_t mine = signature_bits(sig);
      const uint64_t theirs = __ldcg(reinterpret_cast<const unsigned long long*>(ll.signature(own, round.parity, r)));
      if (theirs != mine) fail_on_signature(buf, r, mine, theirs);
    }
  }
  const bool failed = block_op_failed(buf);
  if (threadIdx.x == 0) trace_at(buf, kTraceFirstLanded);
  return !failed;
}

__device__ bool exchange_signals(const BufferRef& buf, const Round& round, const Signature& sig) {
  signal_peers(buf, round, sig);
  return await_peers(buf, round, sig);
}

// The value of a tagged word that `src` writes into this rank's region during this op, read before src's
// signal is awaited: spins until the tag is there, or until every block of src has signalled (then the
// word reads as it is), the op failed, or timeout_s passed (the op fails). Without the tag: `absent`.
__device__ int wait_tagged(const BufferRef& buf, const Round& round, const uint64_t* word, int src, int absent) {
  uint64_t value = load_volatile(word);
  if (has_tag(round, value)) return static_cast<int>(static_cast<uint32_t>(value));
  const uint64_t* arrive = buf.layout.low_latency.arrive(buf.peers[buf.rank], src);
  const uint64_t target = round.epoch * gridDim.x, start = global_timer_ns();
  while (!has_tag(round, value = load_volatile(word))) {
    if (ld_acquire_sys(arrive) >= target) {  // src's signal made the word visible if src runs this op
      value = load_volatile(word);
      break;
    }
    if (op_failed(buf)) break;
    if (global_timer_ns() - start > buf.timeout_ns) {
      fail_op(buf, kTimeout, src);
      break;
    }
    __nanosleep(32);
  }
  return has_tag(round, value) ? static_cast<int>(static_cast<uint32_t>(value)) : absent;
}

// The last block to finish publishes the epoch for the next op.
__device__ void end_round(const BufferRef& buf, const Round& round) {
  const LowLatencyLayout& ll = buf.layout.low_latency;
  __syncthreads();
  if (threadIdx.x == 0) {
    trace_at(buf, kTraceEnd);
    char* own = buf.peers[buf.rank];
    if (atomicAdd(ll.done_counter(own), 1u) == gridDim.x - 1) {
      *ll.done_counter(own) = 0;
      *reinterpret_cast<volatile uint64_t*>(ll.op_counter(own)) = round.epoch;
    }
  }
}

// ---- work items ------------------------------------------------------------------------------------

// This warp's index in the grid, numbered block-fastest (warp w of block b is w * blocks + b), so that a
// phase with fewer items than warps spreads them over every SM instead of filling the first SMs' warps.
__device__ __forceinline__ int grid_warp() { return warp_id() * static_cast<int>(gridDim.x) + blockIdx.x; }

// Items (row, slice) of num_rows rows of `cols` channels, spread over every warp of the grid.
struct SliceLoop {
  int slices, total, first, stride;
  __device__ SliceLoop(int num_rows, int cols, int channels = kSliceChannels) {
    slices = static_cast<int>(ceil_div(cols, channels));
    total = num_rows * slices;
    first = grid_warp();
    stride = gridDim.x * kWarps;
  }
};

// One warp's list of the local rows of a (source, token) pair, in k order, in shared memory so that
// lanes that finished their columns early need not take part in reading it.
struct RowList {
  int* rows;       // [kMaxTopk]
  float* weights;  // [kMaxTopk]
  int count;

  // Lane j holds entry j's row (-1: none) and its weight; keeps the rows in lane (= k) order.
  __device__ void gather(int row, float weight) {
    const int lane = lane_id();
    const unsigned valid = __ballot_sync(kFullMask, row >= 0);
    __syncwarp();  // every lane is done with the previous pair's list
    if (row >= 0) {
      const int at = __popc(valid & lanes_below(lane));
      rows[at] = row;
      weights[at] = weight;
    }
    __syncwarp();
    count = __popc(valid);
  }
};

// Lane j < K: entry j's row in a handle's token_rows (-1 for none and for lanes >= K).
__device__ __forceinline__ int handle_row(const int* token_rows, int pair, int num_topk) {
  const int lane = lane_id();
  return lane < num_topk ? token_rows[int64_t(pair) * num_topk + lane] : -1;
}

// This warp's RowList, backed by per-warp shared arrays.
__device__ RowList warp_row_list() {
  __shared__ int rows[kWarps][kMaxTopk];
  __shared__ float weights[kWarps][kMaxTopk];
  return {rows[warp_id()], weights[warp_id()], 0};
}

__device__ __forceinline__ void bf16x8_to_float(const int4& v, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

__device__ __forceinline__ int4 float_to_bf16x8(const float (&f)[8]) {
  int4 v;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return v;
}

// ---- dispatch: send ----------------------------------------------------------------------------------

// Entry k of this rank's token t as its dispatch sends it: the expert id, -1 for ids outside [0, E).
__device__ __forceinline__ int own_id(const LowLatencyDispatchArgs& a, int num_experts, int t, int k) {
  const int64_t id = a.topk_idx[int64_t(t) * a.num_topk + k];
  return id >= 0 && id < num_experts ? static_cast<int>(id) : -1;
}

// Ranks owning one of token t's experts; lanes j < K read entry j's id (-1 for none and for lanes >= K).
__device__ __forceinline__ uint32_t dest_mask(const LowLatencyDispatchArgs& a, const BufferLayout& layout, int t,
                                              int lane, int* id) {
  *id = lane < a.num_topk ? own_id(a, layout.num_experts, t, lane) : -1;
  return __reduce_or_sync(kFullMask, *id >= 0 ? 1u << (*id / layout.experts_per_rank()) : 0u);
}

// Token t's top-k ids (tagged) and weights into its metadata slot on every rank in `ranks` (receivers learn
// validity from them).
__device__ void send_meta(const BufferRef& buf, const LowLatencyDispatchArgs& a, const Round& round, int t, int lane,
                          int id, uint32_t ranks) {
  const LowLatencyLayout& ll = buf.layout.low_latency;
  if (lane >= a.num_topk) return;
  const float weight = a.topk_weights[static_cast<int64_t>(t) * a.num_topk + lane];
  for (uint32_t m = ranks; m != 0; m &= m - 1) {
    char* slot = ll.dispatch_slot(buf.peers[__ffs(m) - 1], round.parity, buf.rank, t);
    reinterpret_cast<volatile uint64_t*>(slot)[lane] = tagged(round, id);
    reinterpret_cast<float*>(slot + 8 * kMaxTopk)[lane] = weight;
  }
}

// The 16-byte unit (of a bf16 row) that `lane` moves in step `step` of slice `slice` (of kChannels channels).
template <int kChannels>
__device__ __forceinline__ int slice_unit(int slice, int step, int lane) {
  return (slice * kChannels) / 8 + step * kWarpSize + lane;
}

// Lane's 16-byte units of one slice of token t's bf16 row, all loaded before any is used (one memory
// latency per slice, and the loads overlap the routing lookup that follows); past the row: zeros.
template <int kChannels>
__device__ __forceinline__ void load_slice(const void* x, int hidden, int t, int slice, int lane,
                                           int4 (&v)[kStepsOf<kChannels>]) {
  const int4* src = reinterpret_cast<const int4*>(static_cast<const char*>(x) + int64_t(t) * hidden * 2);
#pragma unroll
  for (int step = 0; step < kStepsOf<kChannels>; ++step) {
    const int unit = slice_unit<kChannels>(slice, step, lane);
    v[step] = unit * 8 < hidden ? load_input16(src + unit) : make_int4(0, 0, 0, 0);
  }
}

// One loaded slice of token t's bf16 row to every rank in `mask`.
template <int kChannels>
__device__ void send_bf16_slice(const BufferRef& buf, const Round& round, int t, int slice, uint32_t mask, int lane,
                                const int4 (&v)[kStepsOf<kChannels>]) {
  const LowLatencyLayout& ll = buf.layout.low_latency;
  for (uint32_t m = mask; m != 0; m &= m - 1) {
    const int d = __ffs(m) - 1;
    int4* dst = reinterpret_cast<int4*>(ll.dispatch_slot(buf.peers[d], round.parity, buf.rank, t) +
                                        kLowLatencyMetaBytes);
#pragma unroll
    for (int step = 0; step < kStepsOf<kChannels>; ++step) {
      const int unit = slice_unit<kChannels>(slice, step, lane);
      if (unit * 8 < ll.hidden) dst[unit] = v[step];
    }
  }
}

// One loaded slice of token t quantised to FP8 (per 128 channels: scale = amax / 448, q = e4m3(x / scale),
// RNE, saturated) to every rank in `mask`. A half-warp covers one 128-channel block per step.
template <int kChannels>
__device__ void send_fp8_slice(const BufferRef& buf, const Round& round, int t, int slice, uint32_t mask, int lane,
                               const int4 (&v)[kStepsOf<kChannels>]) {
  const LowLatencyLayout& ll = buf.layout.low_latency;
  const int hidden = ll.hidden;
#pragma unroll
  for (int step = 0; step < kStepsOf<kChannels>; ++step) {
    const int unit = slice_unit<kChannels>(slice, step, lane);
    const bool active = unit * 8 < hidden;
    if (__all_sync(kFullMask, !active)) break;
    float f[8];
    bf16x8_to_float(v[step], f);  // zeros past the row
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(f[i]));
#pragma unroll
    for (int offset = 8; offset >= 1; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, offset));
    const float scale = amax > 0.0f ? __fdiv_rn(amax, kFp8Max) : 1.0f;
    uint2 q;
    uint8_t* bytes = reinterpret_cast<uint8_t*>(&q);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      bytes[i] = __nv_cvt_float_to_fp8(__fdiv_rn(f[i], scale), __NV_SATFINITE, __NV_E4M3);
    }
    if (!active) continue;
    for (uint32_t m = mask; m != 0; m &= m - 1) {
      const int d = __ffs(m) - 1;
      char* row = ll.dispatch_slot(buf.peers[d], round.parity, buf.rank, t) + kLowLatencyMetaBytes;
      reinterpret_cast<uint2*>(row)[unit] = q;
      if (lane % 16 == 0) reinterpret_cast<float*>(row + hidden)[unit * 8 / kScaleBlock] = scale;
    }
  }
}

// ---- dispatch: layout of what landed ------------------------------------------------------------------

// Shared memory of the receive step: per local expert, a bitmask over pairs p = source * T_ll + token,
// the exclusive prefix of set bits before each word, and each expert's first row; tokens per source.
struct ExpertMasks {
  unsigned* bits;    // [L][words]
  int* word_prefix;  // [L][words]
  int* first_row;    // [L]
  int* landed;       // [R] tokens each source passed
  int words;

  static __host__ __device__ int num_words(const LowLatencyLayout& ll) {
    return static_cast<int>(ceil_div(int64_t(ll.num_ranks) * ll.max_tokens, 32));
  }
  static __host__ __device__ size_t bytes(const LowLatencyLayout& ll, int local_experts) {
    return (2 * size_t(local_experts) * num_words(ll) + local_experts) * 4;
  }
  __device__ int row_of(int e, int pair) const {
    const int w = pair / 32;
    return first_row[e] + word_prefix[e * words + w] + __popc(bits[e * words + w] & lanes_below(pair % 32));
  }
  // The landed (source, token) pairs, numbered source-major: how many, and pair i < that (as source, token).
  __device__ int num_landed(int num_ranks) const {
    int n = 0;
    for (int s = 0; s < num_ranks; ++s) n += landed[s];
    return n;
  }
  __device__ int2 landed_pair(int i) const {
    int s = 0;
    for (; i >= landed[s]; ++s) i -= landed[s];
    return make_int2(s, i);
  }
};

__device__ __forceinline__ int local_id(int id, int rank, int experts_per_rank) {
  const int e = id - rank * experts_per_rank;
  return (id >= 0 && e >= 0 && e < experts_per_rank) ? e : -1;
}

// Entry k's tagged id word in the slot of (src, t) of this rank's region.
__device__ __forceinline__ const uint64_t* id_word(const BufferRef& buf, const Round& round, int src, int t, int k) {
  return reinterpret_cast<const uint64_t*>(
             buf.layout.low_latency.dispatch_slot(buf.peers[buf.rank], round.parity, src, t)) + k;
}

__device__ __forceinline__ uint32_t peer_ranks(const BufferRef& buf) {
  return ((1u << buf.layout.low_latency.num_ranks) - 1) & ~(1u << buf.rank);
}

// The mask group of every block (kMaskThreads threads, this one `tid` of them) builds the same masks from this
// rank's own ids and every peer's tagged counts and ids while its last warp publishes the block's writes; block
// 0's group also writes offsets and counts.
__device__ void build_masks(const BufferRef& buf, const LowLatencyDispatchArgs& a, const Round& round,
                            ExpertMasks& m, int tid) {
  const LowLatencyLayout& ll = buf.layout.low_latency;
  const int local_experts = buf.layout.experts_per_rank();
  const auto sync = [] { bar_sync(kBarMaskGroup, kMaskThreads); };
  if (tid < ll.num_ranks) {
    m.landed[tid] = tid == buf.rank
                        ? a.num_tokens
                        : wait_tagged(buf, round, ll.count(buf.peers[buf.rank], round.parity, tid), tid, 0);
  }
  for (int i = tid; i < local_experts * m.words; i += kMaskThreads) m.bits[i] = 0;
  sync();
  // kLoads ids in flight per thread: the loads are independent, the mask updates wait for all of them (and
  // spin only on a word whose tag is not there yet).
  constexpr int kLoads = 4;
  const int entries = m.num_landed(ll.num_ranks) * a.num_topk;
  for (int base = tid; base < entries; base += kLoads * kMaskThreads) {
    uint64_t words[kLoads];
    int2 pairs[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = base + u * kMaskThreads, k = i % a.num_topk;
      pairs[u] = i < entries ? m.landed_pair(i / a.num_topk) : make_int2(buf.rank, 0);
      words[u] = i >= entries                 ? tagged(round, -1)
                 : pairs[u].x == buf.rank ? tagged(round, own_id(a, buf.layout.num_experts, pairs[u].y, k))
                                          : load_volatile(id_word(buf, round, pairs[u].x, pairs[u].y, k));
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = base + u * kMaskThreads, src = pairs[u].x, t = pairs[u].y;
      const int id = has_tag(round, words[u])
                         ? static_cast<int>(static_cast<uint32_t>(words[u]))
                         : wait_tagged(buf, round, id_word(buf, round, src, t, i % a.num_topk), src, -1);
      const int e = local_id(id, buf.rank, local_experts);
      const int pair = src * ll.max_tokens + t;
      if (e >= 0) atomicOr(&m.bits[e * m.words + pair / 32], 1u << (pair % 32));
    }
  }
  sync();
  for (int e = tid; e < local_experts; e += kMaskThreads) {
    int running = 0;
    for (int w = 0; w < m.words; ++w) {
      m.word_prefix[e * m.words + w] = running;
      running += __popc(m.bits[e * m.words + w]);
    }
    m.first_row[e] = running;  // the count, until the scan below
  }
  sync();
  __shared__ int warp_totals[kMaskThreads / kWarpSize];
  if (blockIdx.x == 0) {
    for (int e = tid; e < local_experts; e += kMaskThreads) a.expert_counts[e] = m.first_row[e];
  }
  group_exclusive_scan<kMaskThreads>(m.first_row, local_experts, tid, warp_totals, sync);
  if (blockIdx.x == 0) {
    for (int e = tid; e < local_experts; e += kMaskThreads) a.expert_offsets[e] = m.first_row[e] + a.expert_counts[e];
  }
}

// token_rows of the pairs that did not land: no rows.
__device__ void clear_unlanded(const LowLatencyLayout& ll, const LowLatencyDispatchArgs& a, const ExpertMasks& m) {
  const int64_t n = int64_t(ll.num_ranks) * ll.max_tokens * a.num_topk;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int pair = static_cast<int>(i / a.num_topk);
    if (pair % ll.max_tokens >= m.landed[pair / ll.max_tokens]) a.token_rows[i] = -1;
  }
}

// Lane j < K: the row of entry j of the landed pair (src, t), -1 if it names no local expert or repeats an
// earlier entry's expert; *weight: for a row, the weights of the entries naming its expert summed in k order.
// This rank's own entries come from the inputs, a peer's from its slot (read after its signal).
__device__ int entry_row(const BufferRef& buf, const LowLatencyDispatchArgs& a, const Round& round,
                         const ExpertMasks& m, int src, int t, float* weight) {
  const int lane = lane_id();
  int id = -1;
  float w = 0.0f;
  if (lane < a.num_topk && src == buf.rank) {
    id = own_id(a, buf.layout.num_experts, t, lane);
    w = a.topk_weights[int64_t(t) * a.num_topk + lane];
  } else if (lane < a.num_topk) {
    const char* slot = buf.layout.low_latency.dispatch_slot(buf.peers[buf.rank], round.parity, src, t);
    id = static_cast<int>(__ldcg(reinterpret_cast<const unsigned long long*>(slot) + lane));
    w = load_landed(reinterpret_cast<const float*>(slot + 8 * kMaxTopk) + lane);
  }
  const int e = local_id(id, buf.rank, buf.layout.experts_per_rank());
  if (e < 0) w = 0.0f;
  bool first = e >= 0;
  float sum = 0.0f;
  for (int j = 0; j < a.num_topk; ++j) {  // k order
    const int ej = __shfl_sync(kFullMask, e, j);
    const float wj = __shfl_sync(kFullMask, w, j);
    if (e >= 0 && ej == e) {
      if (j < lane) first = false;
      sum = __fadd_rn(sum, wj);
    }
  }
  *weight = sum;
  return first ? m.row_of(e, src * buf.layout.low_latency.max_tokens + t) : -1;
}

// Ranks that get a staged copy of a token's row: all of `mask` for FP8 (quantised once, by the sender); for
// bf16 only the peers, as this rank expands its own bf16 rows straight from x.
template <bool kFp8>
__device__ __forceinline__ uint32_t staged_ranks(uint32_t mask, int rank) {
  return kFp8 ? mask : mask & ~(1u << rank);
}

// Copies the landed rows to each of their expert rows: this rank's bf16 rows from x, the others from their
// staging slots (L2-hot); slices of one pair share its row list. The warp of a pair's first slice also writes
// the pair's token_rows and its rows' recv_weights.
template <bool kFp8>
__device__ void expand_rows(const BufferRef& buf, const LowLatencyDispatchArgs& a, const Round& round,
                            const ExpertMasks& m) {
  const LowLatencyLayout& ll = buf.layout.low_latency;
  char* own = buf.peers[buf.rank];
  const int lane = lane_id(), hidden = ll.hidden;
  constexpr int kBytesPerChannel = kFp8 ? 1 : 2;
  constexpr int kLoads = kSliceChannels * kBytesPerChannel / 16 / kWarpSize;  // a lane's 16-byte units of a slice
  const int units = hidden * kBytesPerChannel / 16;
  const SliceLoop loop(m.num_landed(ll.num_ranks), hidden);
  RowList list = warp_row_list();
  for (int item = loop.first; item < loop.total; item += loop.stride) {
    const int2 st = m.landed_pair(item / loop.slices);
    const int src = st.x, t = st.y, slice = item % loop.slices;
    const bool from_x = !kFp8 && src == buf.rank;
    const char* staged = from_x ? static_cast<const char*>(a.x) + int64_t(t) * hidden * 2
                                : ll.dispatch_slot(own, round.parity, src, t) + kLowLatencyMetaBytes;
    const int begin = slice * kLoads * kWarpSize;
    // The whole slice is loaded first: one memory latency, which overlaps the metadata loads of entry_row,
    // instead of one per unit in series.
    int4 v[kLoads];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int u = begin + i * kWarpSize + lane;
      const int4* p = reinterpret_cast<const int4*>(staged) + u;
      v[i] = u >= units ? make_int4(0, 0, 0, 0) : from_x ? load_input16(p) : load_landed16(p);
    }
    float weight;
    const int row = entry_row(buf, a, round, m, src, t, &weight);
    if (slice == 0) {
      const int64_t pair = int64_t(src) * ll.max_tokens + t;
      if (lane < a.num_topk) a.token_rows[pair * a.num_topk + lane] = row;
      if (row >= 0) a.recv_weights[row] = weight;
    }
    list.gather(row, weight);
    if (list.count == 0) continue;
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int u = begin + i * kWarpSize + lane;
      if (u >= units) continue;
      for (int r = 0; r < list.count; ++r) {
        reinterpret_cast<int4*>(static_cast<char*>(a.recv_x) + int64_t(list.rows[r]) * hidden * kBytesPerChannel)[u] =
            v[i];
      }
    }
    if (kFp8 && slice == 0) {
      const int num_scales = hidden / kScaleBlock;
      const float* scales = reinterpret_cast<const float*>(staged + hidden);
      for (int c = lane; c < num_scales; c += kWarpSize) {
        const float s = load_landed(scales + c);
        for (int i = 0; i < list.count; ++i) a.recv_scales[int64_t(list.rows[i]) * num_scales + c] = s;
      }
    }
  }
}

template <bool kFp8>
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(BufferRef buf, LowLatencyDispatchArgs a) {
  const LowLatencyLayout& ll = buf.layout.low_latency;
  const Round round = begin_round(buf);
  const int lane = lane_id();
  if (block_op_failed(buf)) return end_round(buf, round);  // an earlier op of this buffer failed
  // 1. send: the token count and every token's metadata to every peer (this rank's own are read from the
  //    inputs), its row once to each rank that stages it.
  const uint32_t peers = peer_ranks(buf);
  if (blockIdx.x == 0 && threadIdx.x < ll.num_ranks && threadIdx.x != buf.rank) {
    *reinterpret_cast<volatile uint64_t*>(ll.count(buf.peers[threadIdx.x], round.parity, buf.rank)) =
        tagged(round, a.num_tokens);
  }
  constexpr int kChannels = kSendChannels<kFp8>;
  const SliceLoop send(a.num_tokens, ll.hidden, kChannels);
  for (int item = send.first; item < send.total; item += send.stride) {
    const int t = item / send.slices, slice = item % send.slices;
    int4 v[kStepsOf<kChannels>];
    load_slice<kChannels>(a.x, ll.hidden, t, slice, lane, v);
    int id;
    const uint32_t mask = dest_mask(a, buf.layout, t, lane, &id);
    if (slice == 0) {
      send_meta(buf, a, round, t, lane, id, peers);
      if (lane == 0) a.dest_ranks[t] = static_cast<int>(mask);
    }
    const uint32_t staged = staged_ranks<kFp8>(mask, buf.rank);
    if (kFp8) send_fp8_slice<kChannels>(buf, round, t, slice, staged, lane, v);
    else send_bf16_slice<kChannels>(buf, round, t, slice, staged, lane, v);
  }
  // 2. signal: the last warp publishes the block's writes while the others build the masks.
  __shared__ int landed[kMaxRanks];
  extern __shared__ unsigned smem[];
  const int local_experts = buf.layout.experts_per_rank();
  ExpertMasks m;
  m.words = ExpertMasks::num_words(ll);
  m.bits = smem;
  m.word_prefix = reinterpret_cast<int*>(smem) + local_experts * m.words;
  m.first_row = m.word_prefix + local_experts * m.words;
  m.landed = landed;
  trace_last(buf, kTraceStoresIssued);
  if (threadIdx.x >= kMaskThreads) {
    bar_sync(kBarSent, kThreads);
    if (lane < ll.num_ranks) arrive_at(buf, round, a.signature, lane);
    bar_sync(kBarMasksBuilt, kThreads);
  } else {
    bar_arrive(kBarSent, kThreads);
    build_masks(buf, a, round, m, threadIdx.x);
    if (threadIdx.x == 0) trace_at(buf, kTraceMasksBuilt);
    bar_arrive(kBarMasksBuilt, kThreads);
  }
  clear_unlanded(ll, a, m);
  if (!await_peers(buf, round, a.signature)) return end_round(buf, round);
  // 3. receive: the rows that landed, expanded to their experts.
  expand_rows<kFp8>(buf, a, round, m);
  trace_last(buf, kTraceReceiveDone);
  end_round(buf, round);
}

// ---- cached dispatch (combine's backward) ---------------------------------------------------------------

__global__ void __launch_bounds__(kThreads, 1) cached_dispatch_kernel(BufferRef buf, LowLatencyCachedDispatchArgs a) {
  const LowLatencyLayout& ll = buf.layout.low_latency;
  const Round round = begin_round(buf);
  const int lane = lane_id(), units_per_row = a.cols / 8;
  if (block_op_failed(buf)) return end_round(buf, round);  // an earlier op of this buffer failed
  const SliceLoop send(a.num_tokens, a.cols);
  for (int item = send.first; item < send.total; item += send.stride) {
    const int t = item / send.slices, slice = item % send.slices;
    const uint32_t mask = static_cast<uint32_t>(a.dest_ranks[t]);
    const int4* src = reinterpret_cast<const int4*>(static_cast<const char*>(a.x) + int64_t(t) * a.cols * 2);
    const int begin = slice * kSliceChannels / 8, end = min(units_per_row, begin + kSliceChannels / 8);
    for (int u = begin + lane; u < end; u += kWarpSize) {
      const int4 v = load_input16(src + u);
      for (uint32_t m = mask; m != 0; m &= m - 1) {
        const int d = __ffs(m) - 1;
        reinterpret_cast<int4*>(ll.dispatch_slot(buf.peers[d], round.parity, buf.rank, t) + kLowLatencyMetaBytes)[u] =
            v;
      }
    }
  }
  if (!exchange_signals(buf, round, a.signature)) return end_round(buf, round);
  char* own = buf.peers[buf.rank];
  const SliceLoop recv(ll.num_ranks * ll.max_tokens, a.cols);
  RowList list = warp_row_list();
  for (int item = recv.first; item < recv.total; item += recv.stride) {
    const int pair = item / recv.slices, slice = item % recv.slices;
    list.gather(handle_row(a.token_rows, pair, a.num_topk), 0.0f);
    if (list.count == 0) continue;
    const int4* staged = reinterpret_cast<const int4*>(
        ll.dispatch_slot(own, round.parity, pair / ll.max_tokens, pair % ll.max_tokens) + kLowLatencyMetaBytes);
    const int begin = slice * kSliceChannels / 8, end = min(units_per_row, begin + kSliceChannels / 8);
    for (int u = begin + lane; u < end; u += kWarpSize) {
      const int4 v = load_landed16(staged + u);
      for (int i = 0; i < list.count; ++i) {
        reinterpret_cast<int4*>(static_cast<char*>(a.out) + int64_t(list.rows[i]) * a.cols * 2)[u] = v;
      }
    }
  }
  end_round(buf, round);
}

// ---- combine --------------------------------------------------------------------------------------------

constexpr int kRowsInFlight = 2;  // combine: rows whose slices a warp loads before it adds the first

// For j < n (<= kRowsInFlight), in j order: acc[step] += w[j] * (the bf16 units [begin, end) of src[j] that
// `lane` moves in step `step`), each product and sum rounded in fp32 (w = 1, exact: the plain sum). Every load
// of the n slices is issued before the first add: one memory latency for n rows.
template <bool kLanded>
__device__ __forceinline__ void accumulate_slices(const int4* const (&src)[kRowsInFlight],
                                                  const float (&w)[kRowsInFlight], int n, int begin, int end,
                                                  int lane, float (&acc)[kSteps][8]) {
  int4 v[kRowsInFlight][kSteps];
#pragma unroll
  for (int j = 0; j < kRowsInFlight; ++j) {
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int u = begin + step * kWarpSize + lane;
      v[j][step] = j < n && u < end ? load16<kLanded>(src[j] + u) : make_int4(0, 0, 0, 0);
    }
  }
#pragma unroll
  for (int j = 0; j < kRowsInFlight; ++j) {
    if (j >= n) break;
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      float f[8];
      bf16x8_to_float(v[j][step], f);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[step][i] = __fadd_rn(acc[step][i], __fmul_rn(w[j], f[i]));
    }
  }
}

// Rounds acc to bf16 into the units [begin, end) of dst that `lane` moves.
__device__ __forceinline__ void store_slice(int4* dst, int begin, int end, int lane, const float (&acc)[kSteps][8]) {
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int u = begin + step * kWarpSize + lane;
    if (u < end) dst[u] = float_to_bf16x8(acc[step]);
  }
}

__global__ void __launch_bounds__(kThreads, 1) combine_kernel(BufferRef buf, LowLatencyCombineArgs a) {
  const LowLatencyLayout& ll = buf.layout.low_latency;
  const Round round = begin_round(buf);
  const int lane = lane_id(), units_per_row = a.cols / 8;
  if (block_op_failed(buf)) return end_round(buf, round);  // an earlier op of this buffer failed
  // 1. each (source, token) with local rows: fp32 sum of weight * y over its rows in k order, rounded to
  //    bf16 once, into the home's combine slot [me][token].
  const SliceLoop reduce(ll.num_ranks * ll.max_tokens, a.cols);
  RowList list = warp_row_list();
  for (int item = reduce.first; item < reduce.total; item += reduce.stride) {
    const int pair = item / reduce.slices, slice = item % reduce.slices;
    const int row = handle_row(a.token_rows, pair, a.num_topk);
    list.gather(row, row >= 0 ? a.weights[row] : 0.0f);
    if (list.count == 0) continue;
    int4* dst = reinterpret_cast<int4*>(
        ll.combine_slot(buf.peers[pair / ll.max_tokens], round.parity, buf.rank, pair % ll.max_tokens));
    const int begin = slice * kSliceChannels / 8, end = min(units_per_row, begin + kSliceChannels / 8);
    float acc[kSteps][8] = {};
    for (int r = 0; r < list.count; r += kRowsInFlight) {  // k order
      const int4* y[kRowsInFlight];
      float w[kRowsInFlight];
#pragma unroll
      for (int j = 0; j < kRowsInFlight; ++j) {
        const int i = min(r + j, list.count - 1);
        y[j] = reinterpret_cast<const int4*>(static_cast<const char*>(a.y) + int64_t(list.rows[i]) * a.cols * 2);
        w[j] = list.weights[i];
      }
      accumulate_slices<false>(y, w, min(kRowsInFlight, list.count - r), begin, end, lane, acc);
    }
    store_slice(dst, begin, end, lane, acc);
  }
  if (!exchange_signals(buf, round, a.signature)) return end_round(buf, round);
  // 2. home: per token, the partials of the ranks that hold it, summed in ascending rank order.
  char* own = buf.peers[buf.rank];
  const SliceLoop sum(a.num_tokens, a.cols);
  for (int item = sum.first; item < sum.total; item += sum.stride) {
    const int t = item / sum.slices, slice = item % sum.slices;
    const uint32_t mask = static_cast<uint32_t>(a.dest_ranks[t]);
    const int begin = slice * kSliceChannels / 8, end = min(units_per_row, begin + kSliceChannels / 8);
    float acc[kSteps][8] = {};
    for (uint32_t m = mask; m != 0;) {  // ascending rank
      const int4* partial[kRowsInFlight];
      float w[kRowsInFlight];
      int n = 0;
#pragma unroll
      for (int j = 0; j < kRowsInFlight; ++j) {
        partial[j] = m != 0 ? reinterpret_cast<const int4*>(ll.combine_slot(own, round.parity, __ffs(m) - 1, t))
                            : nullptr;
        w[j] = 1.0f;
        n += m != 0;
        m &= m - 1;
      }
      accumulate_slices<true>(partial, w, n, begin, end, lane, acc);
    }
    store_slice(reinterpret_cast<int4*>(static_cast<char*>(a.out) + int64_t(t) * a.cols * 2), begin, end, lane,
                acc);
  }
  end_round(buf, round);
}

}  // namespace

void launch_low_latency_dispatch(const BufferRef& buf, const LowLatencyDispatchArgs& args, cudaStream_t stream) {
  const size_t smem = ExpertMasks::bytes(buf.layout.low_latency, buf.layout.experts_per_rank());
  if (args.use_fp8) {
    set_dynamic_smem(dispatch_kernel<true>, smem, "low_latency_dispatch");
    dispatch_kernel<true><<<buf.num_sms, kThreads, smem, stream>>>(buf, args);
  } else {
    set_dynamic_smem(dispatch_kernel<false>, smem, "low_latency_dispatch");
    dispatch_kernel<false><<<buf.num_sms, kThreads, smem, stream>>>(buf, args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_low_latency_cached_dispatch(const BufferRef& buf, const LowLatencyCachedDispatchArgs& args,
                                        cudaStream_t stream) {
  cached_dispatch_kernel<<<buf.num_sms, kThreads, 0, stream>>>(buf, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_low_latency_combine(const BufferRef& buf, const LowLatencyCombineArgs& args, cudaStream_t stream) {
  combine_kernel<<<buf.num_sms, kThreads, 0, stream>>>(buf, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace torch_ep
