// The bandwidth ceiling the benchmark compares against: every rank writes one
// contiguous source into its staging rows on every peer at once, with as many
// blocks as asked, and nothing else (no layout, no signalling).
#include "kernels/api.cuh"
#include "kernels/utils.cuh"

namespace torch_ep {
namespace {

constexpr int kPeerCopyThreads = 512;
constexpr int kPeerCopySegment = kWarpSize * kCopyUnroll * 4;  // 16-byte units a warp copies per task

// Each warp task reads a segment of src once and stores it to every peer.
__global__ void __launch_bounds__(kPeerCopyThreads) peer_copy_kernel(BufferRef buf, const int4* src, int64_t n16) {
  const BufferLayout& layout = buf.layout;
  int4* peer_data[kMaxRanks];
#pragma unroll
  for (int r = 0; r < kMaxRanks; ++r) {
    peer_data[r] = (r < layout.num_ranks && r != buf.rank)
                       ? reinterpret_cast<int4*>(layout.data_slot(buf.peers[r], BufferLayout::peer_slot(buf.rank, r), 0))
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

void launch_peer_copy(const BufferRef& buf, const void* src, int64_t num_bytes, int num_sms, cudaStream_t stream) {
  peer_copy_kernel<<<num_sms, kPeerCopyThreads, 0, stream>>>(buf, static_cast<const int4*>(src), num_bytes / 16);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace torch_ep
