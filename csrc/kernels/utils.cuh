// Device helpers shared by the kernels: cross-GPU memory ordering, bounded
// spin-waits, warp-wide 16-byte copies and block scans.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "kernels/api.cuh"
#include "runtime/layout.h"

namespace torch_ep {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kCopyUnroll = 8;  // 16-byte loads each lane keeps in flight while copying a row

static_assert(kChunkTokens == kWarpSize, "a chunk's tokens are summarised by one warp ballot");
static_assert(kMaxRanks <= kWarpSize, "per-rank work is spread over the lanes of one warp");

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) % kWarpSize; }
__device__ __forceinline__ int warp_id() { return static_cast<int>(threadIdx.x) / kWarpSize; }
__device__ __forceinline__ unsigned lanes_below(int lane) { return (1u << lane) - 1u; }

// Lets `kernel` take `bytes` of dynamic shared memory (beyond the 48 KiB
// default where needed); raises if the device cannot. What a (kernel, device)
// was granted is remembered: the driver calls cost the host microseconds a launch.
template <typename Kernel>
inline void set_dynamic_smem(Kernel kernel, size_t bytes, const char* what) {
  if (bytes <= 48 * 1024) return;  // every device allows this much without asking
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> granted;
  std::lock_guard<std::mutex> lock(mutex);
  size_t& have = granted[{reinterpret_cast<const void*>(kernel), device}];
  if (bytes <= have) return;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "torch_ep: ", what, " needs ", bytes,
              " bytes of shared memory per block, the device allows ", limit);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  have = bytes;
}

// Programmatic dependent launch (sm_90 and newer) hides the gap between two kernels of a stream: the
// second, launched with launch_overlapping, gets its blocks resident once every block of the first has
// called start_next_kernel, and its wait_prior_kernel (its first statement) returns when the first has
// finished and its writes are visible. Older GPUs launch it the ordinary way.
__device__ __forceinline__ void start_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_prior_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Whether the current device launches kernels overlapping (sm_90 and newer). The driver is asked once per
// device: the query cost the host ~1.5 us a launch.
inline bool overlap_supported() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<int, bool> known;
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(device);
  if (found != known.end()) return found->second;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return known[device] = major >= 9;
}

template <typename... Params, typename... Args>
inline void launch_overlapping(void (*kernel)(Params...), int blocks, int threads, cudaStream_t stream,
                               const Args&... args) {
  cudaLaunchAttribute overlap{};
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.stream = stream;
  config.attrs = &overlap;
  config.numAttrs = overlap_supported() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
}

// ---- memory ordering across GPUs -------------------------------------------------------------

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* ptr) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  return value;
}

__device__ __forceinline__ void st_release_sys(uint64_t* ptr, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// The same between blocks of one GPU: no wait for writes to other GPUs or the host to land.
__device__ __forceinline__ uint64_t ld_acquire_gpu(const uint64_t* ptr) {
  uint64_t value;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  return value;
}

__device__ __forceinline__ void st_release_gpu(uint64_t* ptr, uint64_t value) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// Orders everything this thread has observed (other warps' stores included,
// through a CTA-scope acquire) before its later stores, for every GPU.
__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

// Named barrier `id` (0 is __syncthreads) of `threads` threads: bar_sync waits for all of them, bar_arrive
// counts this thread in without waiting (what it wrote before is visible to those that wait).
__device__ __forceinline__ void bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Adds to a shared-memory counter with acquire-release semantics among the block's threads.
__device__ __forceinline__ int atomic_add_acq_rel_cta(int* shared_counter, int value) {
  int old;
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(shared_counter));
  asm volatile("atom.acq_rel.cta.shared::cta.add.u32 %0, [%1], %2;" : "=r"(old) : "r"(addr), "r"(value) : "memory");
  return old;
}

// A shared-memory word handed between warps of a block.
__device__ __forceinline__ void st_release_cta(int* shared_word, int value) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(shared_word));
  asm volatile("st.release.cta.shared::cta.u32 [%0], %1;" ::"r"(addr), "r"(value) : "memory");
}

__device__ __forceinline__ int ld_acquire_cta(const int* shared_word) {
  int value;
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(shared_word));
  asm volatile("ld.acquire.cta.shared::cta.u32 %0, [%1];" : "=r"(value) : "r"(addr) : "memory");
  return value;
}

// Reads a word another kernel of this stream wrote (never a stale L1 line).
__device__ __forceinline__ uint64_t load_volatile(const uint64_t* ptr) {
  return *reinterpret_cast<const volatile uint64_t*>(ptr);
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}

// Phase timestamps (TORCH_EP_TRACE): trace_at from one thread, trace_last from every warp of a role.
__device__ __forceinline__ void trace_at(const BufferRef& buf, int event) {
  if (buf.trace != nullptr) buf.trace[blockIdx.x * kTraceEvents + event] = global_timer_ns();
}
__device__ __forceinline__ void trace_last(const BufferRef& buf, int event) {
  if (buf.trace != nullptr && lane_id() == 0) atomicMax(&buf.trace[blockIdx.x * kTraceEvents + event], global_timer_ns());
}

// Input rows never change during a kernel: read them past L1 without polluting it.
__device__ __forceinline__ int4 load_input16(const int4* ptr) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

// Data that peers wrote into this rank's buffer lands in L2; read it there so
// that no stale L1 line can be returned.
__device__ __forceinline__ int4 load_landed16(const int4* ptr) { return __ldcg(ptr); }
__device__ __forceinline__ int load_landed(const int* ptr) { return __ldcg(ptr); }
__device__ __forceinline__ float load_landed(const float* ptr) { return __ldcg(ptr); }

// ---- bounded waits and failed ops --------------------------------------------------------------

// An op has failed on this buffer (this kernel or an earlier one): its waits give up at once.
__device__ __forceinline__ bool op_failed(const BufferRef& buf) {
  return *reinterpret_cast<const volatile uint32_t*>(&buf.control->failed) != 0;
}

// op_failed as one answer for the whole block; every thread of the block must call it (a barrier).
__device__ __forceinline__ bool block_op_failed(const BufferRef& buf) {
  return __syncthreads_or(threadIdx.x == 0 && op_failed(buf));
}

// Writes an error into the host-mapped `slot` (one writer at a time: see callers). Fields are
// written before `code`, which the host polls.
__device__ __forceinline__ void write_error(DeferredError* slot, ErrorCode code, Op op, int peer, int field,
                                            int64_t value, int64_t other) {
  slot->op = static_cast<int>(op);
  slot->peer = peer;
  slot->field = field;
  slot->value = value;
  slot->other = other;
  __threadfence_system();
  *reinterpret_cast<volatile int*>(&slot->code) = code;
}

// An error that leaves the buffer usable (rows past capacity), raised and cleared at the next op;
// an earlier one the host has not raised yet is kept. One thread of one kernel calls it.
__device__ __forceinline__ void report_deferred(const BufferRef& buf, ErrorCode code, int64_t value, int64_t limit) {
  if (*reinterpret_cast<volatile int*>(&buf.deferred->code) == kNoError) {
    write_error(buf.deferred, code, buf.op, buf.rank, 0, value, limit);
  }
}

// Fails the running op instead of trapping (which would kill the CUDA context): raises the buffer's
// failed word, which every wait polls, so that every warp of every block leaves its waits and the
// kernel ends normally; the first warp to raise it records why (the host raises that at the next
// op and at Buffer.synchronize()). The buffer stays failed: later kernels on it move nothing.
// Takes scalars, not the BufferRef, so that callers keep no local copy of it.
static __device__ __noinline__ void fail_op(Control* control, DeferredError* failure, Op op, ErrorCode code, int peer,
                                            int field = 0, int64_t value = 0, int64_t other = 0) {
  if (atomicCAS(&control->failed, 0u, 1u) == 0u) write_error(failure, code, op, peer, field, value, other);
}

__device__ __forceinline__ void fail_op(const BufferRef& buf, ErrorCode code, int peer, int field = 0,
                                        int64_t value = 0, int64_t other = 0) {
  fail_op(buf.control, buf.failure, buf.op, code, peer, field, value, other);
}

// A signature packed in one word (the arrive slots carry it): op, dtype and top-k 8 bits each, row bytes 40.
__device__ __forceinline__ uint64_t signature_bits(const Signature& sig) {
  return (static_cast<uint64_t>(sig.words[kSigOp] & 0xff) << 56) |
         (static_cast<uint64_t>(sig.words[kSigDtype] & 0xff) << 48) |
         (static_cast<uint64_t>(sig.words[kSigTopk] & 0xff) << 40) |
         static_cast<uint64_t>(sig.words[kSigRowBytes] & 0xffffffffffll);
}

__device__ __forceinline__ int64_t signature_word(uint64_t bits, int word) {
  switch (word) {
    case kSigOp: return static_cast<int64_t>(bits >> 56);
    case kSigDtype: return static_cast<int64_t>((bits >> 48) & 0xff);
    case kSigTopk: return static_cast<int64_t>((bits >> 40) & 0xff);
    default: return static_cast<int64_t>(bits & 0xffffffffffull);
  }
}

// Fails the op naming the first signature word in which peer's call differs from this rank's.
__device__ __forceinline__ void fail_on_signature(const BufferRef& buf, int peer, uint64_t mine, uint64_t theirs) {
  int word = 0;
  while (word < kSignatureWords - 1 && signature_word(mine, word) == signature_word(theirs, word)) ++word;
  fail_op(buf, kSignatureMismatch, peer, word, signature_word(mine, word), signature_word(theirs, word));
}

// Spins until the flag that `peer` writes reaches `target` (flags only grow) and returns the value
// seen. A value below target means the op failed (this wait ran past timeout_ns, or another warp
// failed the op): the caller must stop and read nothing the peer would have written.
__device__ __forceinline__ uint64_t wait_flag(const uint64_t* flag, uint64_t target, const BufferRef& buf, int peer) {
  uint64_t value = ld_acquire_sys(flag);
  if (value >= target) return value;
  const uint64_t start = global_timer_ns();
  while ((value = ld_acquire_sys(flag)) < target) {
    if (op_failed(buf)) return value;
    if (global_timer_ns() - start > buf.timeout_ns) {
      fail_op(buf, kTimeout, peer);
      return value;
    }
    __nanosleep(32);  // spinning warps would otherwise flood L2 with the data kernels' traffic in flight
  }
  return value;
}

// ---- warp copies -------------------------------------------------------------------------------

template <bool kLanded>
__device__ __forceinline__ int4 load16(const int4* ptr) {
  return kLanded ? load_landed16(ptr) : load_input16(ptr);
}

// Copies n16 16-byte units from src to dst, lane-strided so each warp access
// is 512 contiguous bytes, with kCopyUnroll loads in flight per lane.
template <bool kSrcLanded>
__device__ __forceinline__ void warp_copy(int4* dst, const int4* src, int n16, int lane) {
  for (int base = lane; base < n16; base += kWarpSize * kCopyUnroll) {
    int4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int i = base + u * kWarpSize;
      if (i < n16) v[u] = load16<kSrcLanded>(src + i);
    }
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int i = base + u * kWarpSize;
      if (i < n16) dst[i] = v[u];
    }
  }
}

// A lane's units base, base + 32, ... (kUnits of them, those below n16) of src.
template <int kUnits>
__device__ __forceinline__ void load_batch(int4 (&v)[kUnits], const int4* src, int base, int n16) {
#pragma unroll
  for (int u = 0; u < kUnits; ++u) {
    const int i = base + u * kWarpSize;
    if (i < n16) v[u] = load_input16(src + i);
  }
}

template <int kDsts, int kUnits>
__device__ __forceinline__ void store_batch(int4* const (&dst)[kDsts], const int4 (&v)[kUnits], int base, int n16) {
#pragma unroll
  for (int r = 0; r < kDsts; ++r) {
    if (dst[r] == nullptr) continue;
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const int i = base + u * kWarpSize;
      if (i < n16) dst[r][i] = v[u];
    }
  }
}

// Like warp_copy, but reads each unit once and stores it to every non-null dst[r]. `first` is the lane's
// first kFirst units (load_batch at base = lane), loaded by the caller so that their latency overlaps
// the caller's other loads.
template <int kDsts, int kFirst>
__device__ __forceinline__ void warp_copy_to_ranks(int4* const (&dst)[kDsts], const int4* src, int n16, int lane,
                                                   const int4 (&first)[kFirst]) {
  store_batch(dst, first, lane, n16);
  for (int base = lane + kWarpSize * kFirst; base < n16; base += kWarpSize * kCopyUnroll) {
    int4 v[kCopyUnroll];
    load_batch(v, src, base, n16);
    store_batch(dst, v, base, n16);
  }
}

template <int kDsts>
__device__ __forceinline__ void warp_copy_to_ranks(int4* const (&dst)[kDsts], const int4* src, int n16, int lane) {
  int4 first[kCopyUnroll];
  load_batch(first, src, lane, n16);
  warp_copy_to_ranks(dst, src, n16, lane, first);
}

__device__ __forceinline__ void warp_zero(int4* dst, int n16, int lane) {
  for (int i = lane; i < n16; i += kWarpSize) dst[i] = make_int4(0, 0, 0, 0);
}

// ---- scans -------------------------------------------------------------------------------------

__device__ __forceinline__ int warp_inclusive_scan(int value, int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const int other = __shfl_up_sync(kFullMask, value, offset);
    if (lane >= offset) value += other;
  }
  return value;
}

// Exclusive prefix sum of data[0, n) in place by a group of kThreads threads (this one is `tid` of them, each
// scans a contiguous segment) that sync() brings together; returns the total.
template <int kThreads, typename Sync>
__device__ int group_exclusive_scan(int* data, int n, int tid, int* warp_totals /* shared [kThreads / 32] */,
                                    Sync sync) {
  constexpr int kWarps = kThreads / kWarpSize;
  static_assert(kWarps <= kWarpSize, "warp totals are scanned by one warp");
  const int lane = lane_id(), warp = tid / kWarpSize;
  const int per_thread = static_cast<int>(ceil_div(n, kThreads));
  const int begin = min(n, tid * per_thread);
  const int end = min(n, begin + per_thread);
  int local = 0;
  for (int i = begin; i < end; ++i) local += data[i];
  const int inclusive = warp_inclusive_scan(local, lane);
  if (lane == kWarpSize - 1) warp_totals[warp] = inclusive;
  sync();
  if (warp == 0) {
    const int total = warp_inclusive_scan(lane < kWarps ? warp_totals[lane] : 0, lane);
    if (lane < kWarps) warp_totals[lane] = total;
  }
  sync();
  int running = inclusive - local + (warp > 0 ? warp_totals[warp - 1] : 0);
  for (int i = begin; i < end; ++i) {
    const int v = data[i];
    data[i] = running;
    running += v;
  }
  const int total = warp_totals[kWarps - 1];
  sync();
  return total;
}

// group_exclusive_scan by all kThreads threads of the block.
template <int kThreads>
__device__ int block_exclusive_scan(int* data, int n, int* warp_totals /* shared [kThreads / 32] */) {
  return group_exclusive_scan<kThreads>(data, n, static_cast<int>(threadIdx.x), warp_totals,
                                        [] { __syncthreads(); });
}

// Local id of a global expert this rank owns, -1 for any other id (invalid ones included).
__device__ __forceinline__ int64_t local_expert(int64_t global_id, int rank, int experts_per_rank) {
  const int64_t first = static_cast<int64_t>(rank) * experts_per_rank;
  return (global_id >= first && global_id < first + experts_per_rank) ? global_id - first : -1;
}

// Ranks owning at least one of a token's experts; ids outside [0, E) mean no expert.
__device__ __forceinline__ uint32_t token_rank_mask(const int64_t* topk_row, int num_topk, int num_experts,
                                                    int experts_per_rank) {
  uint32_t mask = 0;
  for (int k = 0; k < num_topk; ++k) {
    const int64_t id = topk_row[k];
    // a valid id fits in 32 bits: divide in 32 bits (a 64-bit division is a long software routine)
    if (id >= 0 && id < num_experts) mask |= 1u << (static_cast<int>(id) / experts_per_rank);
  }
  return mask;
}

}  // namespace torch_ep
