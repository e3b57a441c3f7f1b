// The protocol the intranode kernels share (notify, dispatch, combine).
//
// Epochs. control->epoch counts the ops completed on a buffer; every kernel of
// the running op reads epoch + 1 at its start, and the last block of the op's
// data kernel to finish advances it. CUDA graph replays therefore advance it
// too, and every flag of an op carries its epoch, so no kernel clears flags.
//
// Handshake. Before a rank writes into a peer's staging rows it knows that the
// peer has entered the same op, hence finished reading the rows of the last
// one: dispatch learns it from the peer's notify record, cached_dispatch and
// combine from the peer's arrive flag (which also carries the op's signature).
//
// Progress. The sender blocks of a data kernel claim chunks of up to
// buf.step_items items (dispatch: tokens, combine: rows) from a counter and,
// once a chunk is stored, the block's signal warp marks it landed on the
// receiving rank with (epoch << 32) | rows behind a system fence (one per
// chunk, so chunks are not tiny), so the receiver copies rows out while the
// rest are still on the link. The fence waits until the block's stores have
// landed; in a warp of its own it does not hold up the senders.
//
// Failure. A wait that runs past timeout_s, or a peer that entered another
// call, fails the op (utils.cuh fail_op): every other wait then gives up, a
// warp whose wait failed stores and reads nothing more of its peers', and the
// kernel ends as usual (finish_op). Later kernels of the failed buffer move
// nothing (op_aborted); the host raises the recorded error.
#pragma once

#include "kernels/api.cuh"
#include "kernels/utils.cuh"

namespace torch_ep {

// Every data kernel runs kDataWarps warps per block: the first kSenders (a template argument: dispatch
// and combine split them differently) send, the last (kSignalWarp) signals what they stored, the others
// receive (dispatch) or reduce (combine); combine's senders and signal warp join its reducers when done.
constexpr int kDataWarps = 24;
constexpr int kDataThreads = kDataWarps * kWarpSize;
constexpr int kSignalWarp = kDataWarps - 1;
constexpr int kSenderBarrier = 1;         // named barrier of the sender warps (0 is __syncthreads)

template <int kSenders>
__device__ __forceinline__ void sender_sync() {
  bar_sync(kSenderBarrier, kSenders * kWarpSize);
}

// ---- epochs ------------------------------------------------------------------------------------

__device__ __forceinline__ uint64_t op_epoch(const BufferRef& buf) { return load_volatile(&buf.control->epoch) + 1; }

// The notify kernel's per-block partial counts, after the Control words (see api.cuh).
__device__ __forceinline__ int* notify_scratch(const BufferRef& buf) { return reinterpret_cast<int*>(buf.control + 1); }

// The op must move no data: its notify kernel rejected it, or an op of this buffer failed. Every
// thread of the block calls it and gets the same answer (the failed word may rise meanwhile).
__device__ __forceinline__ bool op_aborted(const BufferRef& buf, uint64_t epoch) {
  const bool rejected = load_volatile(&buf.control->abort_epoch) == epoch;  // the same in every thread
  return block_op_failed(buf) || rejected;
}

// Every block calls this last; the last one to arrive resets the claim
// counters and advances the epoch (all blocks read it at their start, so
// none reads it after).
__device__ __forceinline__ void finish_op(const BufferRef& buf, uint64_t epoch) {
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(&buf.control->blocks_done, 1u) == gridDim.x - 1) {
    buf.control->blocks_done = 0;
    buf.control->send_units = 0;
    buf.control->receive_units = 0;
    *reinterpret_cast<volatile uint64_t*>(&buf.control->epoch) = epoch;
  }
}

// ---- per-block copies of what every warp reads often --------------------------------------------

struct PeerShared {
  char* peers[kMaxRanks];
  int rank_prefix[(kMaxRanks + 1) * kMaxRanks];  // [s, d]: rows that sources < s send to d
};

__device__ __forceinline__ void load_peer_shared(PeerShared& sh, const BufferRef& buf, const int* rank_prefix) {
  const int num_ranks = buf.layout.num_ranks;
  for (int i = threadIdx.x; i < (num_ranks + 1) * num_ranks; i += blockDim.x) sh.rank_prefix[i] = rank_prefix[i];
  if (threadIdx.x < num_ranks) sh.peers[threadIdx.x] = buf.peers[threadIdx.x];
  __syncthreads();
}

__device__ __forceinline__ int prefix_of(const PeerShared& sh, int num_ranks, int s, int d) {
  return sh.rank_prefix[s * num_ranks + d];
}

// Rows that source s sends to rank d.
__device__ __forceinline__ int rows_between(const PeerShared& sh, int num_ranks, int s, int d) {
  return prefix_of(sh, num_ranks, s + 1, d) - prefix_of(sh, num_ranks, s, d);
}

// ---- the arrive handshake (ops without a notify kernel) ----------------------------------------

// True once peer d has entered this op with the same signature: then, and only then, may a sender
// store into d's buffer. False if the op failed (d silent past timeout_s, or running another call).
__device__ __forceinline__ bool wait_arrival(const BufferRef& buf, const PeerShared& sh, uint64_t epoch, int d,
                                             const Signature& sig) {
  const uint64_t* theirs = buf.layout.arrive(sh.peers[buf.rank], static_cast<int>(epoch & 1), d);
  if (wait_flag(theirs, epoch, buf, d) < epoch) return false;
  const uint64_t their_sig = __ldcg(reinterpret_cast<const unsigned long long*>(theirs + 1));
  if (their_sig == signature_bits(sig)) return true;
  fail_on_signature(buf, d, signature_bits(sig), their_sig);
  return false;
}

// Block 0: tells every peer this rank has entered the op; then checks that
// every peer runs the same op on rows of the same shape (each rank compares
// itself with every peer, so all ranks of a mismatched call fail the op, even
// those with nothing to send).
__device__ inline void announce_arrival(const BufferRef& buf, const PeerShared& sh, uint64_t epoch, const Signature& sig) {
  const BufferLayout& layout = buf.layout;
  const int lane = lane_id(), parity = static_cast<int>(epoch & 1);
  if (blockIdx.x != 0 || warp_id() != 0 || lane >= layout.num_ranks || lane == buf.rank) return;
  uint64_t* slot = layout.arrive(sh.peers[lane], parity, buf.rank);
  slot[1] = signature_bits(sig);
  st_release_sys(slot, epoch);
  wait_arrival(buf, sh, epoch, lane, sig);
}

// ---- progress ----------------------------------------------------------------------------------

__device__ __forceinline__ uint64_t progress_value(uint64_t epoch, int64_t rows) {
  return (epoch << 32) | static_cast<uint64_t>(rows);
}

// ---- units of work the sender blocks claim ------------------------------------------------------

// Items per chunk when n items are cut into chunks for the sender blocks to claim: step_items, or
// fewer so that every block gets a chunk. Dispatch cuts tokens, combine the rows returned to a home
// (which the home derives too).
__device__ __forceinline__ int chunk_items(int n, int num_blocks, int step_items) {
  return max(1, min(step_items, static_cast<int>(ceil_div(n, num_blocks))));
}

// A block's sender warps send one claimed unit (a chunk) per step k; its slot is k & 1. Thread 0
// claims step k + 1's unit while step k is sent, and a barrier per step publishes it. The warp that
// stores a step's unit last hands it to the signal warp, which frees the slot once it has signalled it.
struct ClaimedSteps {
  int unit[2];         // the claimed unit
  int stored[2];       // sender warps done with it
  int stored_unit[2];  // the unit of the step stored in the slot, for the signal warp
  int ready;           // steps stored (the signal warp's queue)
  int signalled;       // steps signalled: a slot is free again once its step is
  int steps;           // steps the senders took, once they are done (INT_MAX before)
};

// Thread 0, before a barrier of the whole block: nothing stored or signalled yet; no steps at all if the
// block will send nothing.
__device__ __forceinline__ void init_steps(ClaimedSteps& cs, bool sends) {
  cs.ready = cs.signalled = 0;
  cs.steps = sends ? INT_MAX : 0;
}

// Thread 0, before a barrier of the sender warps: the block's first unit, or none if `sends_nothing`.
__device__ __forceinline__ void claim_first_unit(ClaimedSteps& cs, unsigned* counter, bool sends_nothing) {
  cs.stored[0] = cs.stored[1] = 0;
  cs.unit[0] = sends_nothing ? INT_MAX : static_cast<int>(atomicAdd(counter, 1u));
}

// Every sender warp: false once the units run out (then the signal warp learns how many steps there
// were); else `unit` is step k's (and thread 0 claims the next).
template <int kSenders>
__device__ __forceinline__ bool next_unit(ClaimedSteps& cs, unsigned* counter, int k, int num_units, int& unit) {
  if (k > 0) {
    // slot k & 1 held step k - 2, whose counts the signal warp clears once it has signalled them
    if (threadIdx.x == 0 && k >= 2) {
      while (ld_acquire_cta(&cs.signalled) < k - 1) __nanosleep(32);
    }
    sender_sync<kSenders>();  // the unit of step k was claimed during step k - 1
  }
  unit = cs.unit[k & 1];
  if (unit >= num_units) {
    if (threadIdx.x == 0) st_release_cta(&cs.steps, k);
    return false;
  }
  if (threadIdx.x == 0) cs.unit[(k + 1) & 1] = static_cast<int>(atomicAdd(counter, 1u));
  return true;
}

// A sender warp has stored its part of step k's unit; the warp that does so last queues the step for the
// signal warp. Its CTA-scope acquire sees every other warp's release, so the signal warp's system fence
// covers their stores to peers as well. The slot's count is free again at step k + 2, two barriers later.
template <int kSenders>
__device__ __forceinline__ void finish_unit(ClaimedSteps& cs, int k, int unit) {
  __syncwarp();
  if (lane_id() != 0 || atomic_add_acq_rel_cta(&cs.stored[k & 1], 1) + 1 < kSenders) return;
  cs.stored[k & 1] = 0;
  cs.stored_unit[k & 1] = unit;
  st_release_cta(&cs.ready, k + 1);
}

// The signal warp: for every step the senders stored, in order, a system fence (the unit's rows, stored by
// every sender warp, land before what follows it) and signal(unit, slot, k); then the slot is free again.
// Returns once the senders are done and every step is signalled.
template <typename Signal>
__device__ void signal_steps(ClaimedSteps& cs, Signal signal) {
  for (int k = 0;; ++k) {
    while (ld_acquire_cta(&cs.ready) <= k) {
      if (ld_acquire_cta(&cs.steps) <= k) return;  // they took k steps: all signalled
      __nanosleep(32);
    }
    fence_acq_rel_sys();
    signal(cs.stored_unit[k & 1], k & 1, k);
    __syncwarp();
    if (lane_id() == 0) st_release_cta(&cs.signalled, k + 1);
  }
}

}  // namespace torch_ep
