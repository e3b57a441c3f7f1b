// get_dispatch_layout: from topk_idx, how many tokens go to each rank and each
// expert, and which ranks each token goes to. Needs no buffer.
#include <c10/cuda/CUDAException.h>

#include "kernels/api.cuh"
#include "kernels/utils.cuh"

namespace torch_ep {
namespace {

constexpr int kLayoutThreads = 256;

// One thread per token; block-local counts in shared memory, then one global
// atomic per non-zero counter. is_token_in_rank arrives zeroed.
__global__ void __launch_bounds__(kLayoutThreads) dispatch_layout_kernel(
    const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
    int* num_tokens_per_rank, int* num_tokens_per_expert, bool* is_token_in_rank,
    unsigned long long* first_bad_entry) {
  extern __shared__ int counts[];  // [R] tokens per rank, then [E] entries per expert
  int* rank_counts = counts;
  int* expert_counts = counts + num_ranks;
  for (int i = threadIdx.x; i < num_ranks + num_experts; i += blockDim.x) counts[i] = 0;
  __syncthreads();

  const int experts_per_rank = num_experts / num_ranks;
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < num_tokens) {
    const int64_t* row = topk_idx + static_cast<int64_t>(t) * num_topk;
    for (int k = 0; k < num_topk; ++k) {
      const int64_t id = row[k];
      if (id >= 0 && id < num_experts) {
        atomicAdd(&expert_counts[id], 1);
      } else if (id != -1) {
        atomicMin(first_bad_entry, static_cast<unsigned long long>(t) * num_topk + k);
      }
    }
    const uint32_t mask = token_rank_mask(row, num_topk, num_experts, experts_per_rank);
    for (int rank = 0; rank < num_ranks; ++rank) {
      if (((mask >> rank) & 1u) == 0) continue;
      atomicAdd(&rank_counts[rank], 1);
      is_token_in_rank[static_cast<int64_t>(t) * num_ranks + rank] = true;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < num_ranks; i += blockDim.x) {
    if (rank_counts[i] > 0) atomicAdd(&num_tokens_per_rank[i], rank_counts[i]);
  }
  for (int i = threadIdx.x; i < num_experts; i += blockDim.x) {
    if (expert_counts[i] > 0) atomicAdd(&num_tokens_per_expert[i], expert_counts[i]);
  }
}

}  // namespace

void launch_get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts,
                                int num_ranks, int* num_tokens_per_rank, int* num_tokens_per_expert,
                                bool* is_token_in_rank, unsigned long long* first_bad_entry, cudaStream_t stream) {
  if (num_tokens == 0) return;
  const size_t smem = static_cast<size_t>(num_ranks + num_experts) * sizeof(int);
  set_dynamic_smem(dispatch_layout_kernel, smem, "get_dispatch_layout (counters for num_ranks + num_experts)");
  const int blocks = static_cast<int>(ceil_div(num_tokens, kLayoutThreads));
  dispatch_layout_kernel<<<blocks, kLayoutThreads, smem, stream>>>(topk_idx, num_tokens, num_topk, num_experts,
                                                                  num_ranks, num_tokens_per_rank,
                                                                  num_tokens_per_expert, is_token_in_rank,
                                                                  first_bad_entry);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace torch_ep
