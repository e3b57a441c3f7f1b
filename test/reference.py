"""Pure-torch reference of dispatch/combine, and the random inputs tests feed both.

Every rank can rebuild every other rank's inputs from (seed, rank), so references need no
communication.
"""
from dataclasses import dataclass
from typing import List

import torch


@dataclass
class Routing:
    x: torch.Tensor             # [T, H]
    topk_idx: torch.Tensor      # [T, K] int64, -1 = none
    topk_weights: torch.Tensor  # [T, K] float32


def make_routing(rank: int, num_tokens: int, hidden: int, num_experts: int, k: int, *, seed: int = 0,
                 dtype=torch.bfloat16, p_none: float = 0.1, hot_rank: int = -1, num_ranks: int = 1) -> Routing:
    """Random tokens with k distinct experts each; entries dropped (-1) with probability p_none.
    With hot_rank >= 0 every expert is drawn from that rank's experts (skewed routing)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    lo, hi = 0, num_experts
    if hot_rank >= 0:
        per_rank = num_experts // num_ranks
        lo, hi = hot_rank * per_rank, (hot_rank + 1) * per_rank
    k_eff = min(k, hi - lo)
    scores = torch.rand(num_tokens, hi - lo, generator=g)
    idx = scores.argsort(dim=1)[:, :k_eff] + lo
    if k_eff < k:
        idx = torch.cat([idx, idx.new_full((num_tokens, k - k_eff), -1)], dim=1)
    idx = torch.where(torch.rand(num_tokens, k, generator=g) < p_none, -1, idx)
    weights = torch.rand(num_tokens, k, generator=g)
    return Routing(x, idx, weights)


def owned(topk_idx: torch.Tensor, rank: int, experts_per_rank: int) -> torch.Tensor:
    """[T, K] bool: which entries name an expert of `rank`."""
    return (topk_idx >= 0) & (topk_idx.div(experts_per_rank, rounding_mode="floor") == rank)


@dataclass
class Received:
    x: torch.Tensor          # [N, H]
    topk_idx: torch.Tensor   # [N, K] local ids or -1
    weights: torch.Tensor    # [N, K]
    src_idx: torch.Tensor    # [N]
    per_expert: torch.Tensor  # [E/R]


def expected_dispatch(inputs: List[Routing], rank: int, num_experts: int, alignment: int = 1) -> Received:
    """What `rank` must receive: rows ordered by (source rank, token)."""
    per_rank = num_experts // len(inputs)
    xs, idxs, ws, srcs = [], [], [], []
    for routing in inputs:
        mine = owned(routing.topk_idx, rank, per_rank)
        rows = mine.any(dim=1)
        xs.append(routing.x[rows])
        idxs.append(torch.where(mine[rows], routing.topk_idx[rows] - rank * per_rank, -1))
        ws.append(torch.where(mine[rows], routing.topk_weights[rows], 0.0))
        srcs.append(rows.nonzero().squeeze(1))
    idx = torch.cat(idxs)
    counts = torch.bincount(idx[idx >= 0], minlength=per_rank)
    counts = (counts + alignment - 1) // alignment * alignment
    return Received(torch.cat(xs), idx, torch.cat(ws), torch.cat(srcs), counts)


def expert_output(recv_x: torch.Tensor, rank: int) -> torch.Tensor:
    """A stand-in expert computation with a rank-dependent result, so sums tell ranks apart."""
    return recv_x * (rank + 1)


def expected_combine(inputs: List[Routing], rank: int, num_experts: int) -> torch.Tensor:
    """out[t] = sum over ranks d (ascending) that received token t of expert_output(x[t], d), in fp32."""
    routing = inputs[rank]
    per_rank = num_experts // len(inputs)
    acc_dtype = torch.float64 if routing.x.dtype == torch.float64 else torch.float32
    out = torch.zeros(routing.x.shape, dtype=acc_dtype)
    for d in range(len(inputs)):
        rows = owned(routing.topk_idx, d, per_rank).any(dim=1)
        out[rows] += expert_output(routing.x[rows], d).to(acc_dtype)
    return out.to(routing.x.dtype)


def capture_graph(step):
    """Runs step() once on a side stream (warm-up: communicators, allocator), then captures it in a CUDA
    graph; returns (graph, what the captured step returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def replay_with(graph, static, routing):
    """Copies routing's x, topk_idx and topk_weights into the captured inputs `static`, replays the graph and
    waits for it."""
    for dst, src in zip(static, (routing.x, routing.topk_idx, routing.topk_weights)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
