"""The baseline torch_ep is measured against: dispatch/combine with the group's `all_to_all_single`.

`AllToAllTransport` has the `dispatch`/`combine` interface `torch_ep.nn.MoE` uses, so the same model can
run on either path. The routing rule is torch_ep's own (`torch_ep.cpu`); only the data movement differs:
permute rows by destination, one all_to_all_single per tensor (its split sizes need a host sync), and an
index_add to sum expert outputs back home.
"""
from typing import List, NamedTuple

import torch
import torch.distributed as dist

from ..buffer import BufferConfig
from ..cpu import local_expert_ids, token_in_rank


class AllToAllHandle(NamedTuple):
    src_token: torch.Tensor  # [S] int64: the local token of each row sent, ordered by destination rank
    send_counts: List[int]   # rows sent to each rank
    recv_counts: List[int]   # rows received from each rank
    num_tokens: int


class AllToAllDispatch(NamedTuple):
    recv_x: torch.Tensor             # [N, H], ordered by (source rank, source token)
    recv_topk_idx: torch.Tensor      # [N, K] int64 local expert ids, -1 elsewhere
    recv_topk_weights: torch.Tensor  # [N, K] float32, 0 elsewhere
    handle: AllToAllHandle


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows; its gradient is the exchange in reverse."""

    @staticmethod
    def forward(ctx, x, recv_counts: List[int], send_counts: List[int], group):
        ctx.counts, ctx.group = (recv_counts, send_counts), group
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        recv_counts, send_counts = ctx.counts
        return _AllToAll.apply(grad, send_counts, recv_counts, ctx.group), None, None, None


class AllToAllTransport:
    """Token exchange of an expert-parallel group through `all_to_all_single` (NCCL on GPUs, gloo on CPU)."""

    def __init__(self, group, num_experts: int, hidden: int):
        group = group if group is not None else dist.group.WORLD
        self.group = group
        self.config = BufferConfig(dist.get_rank(group), dist.get_world_size(group), num_experts, hidden, 0)

    def dispatch(self, x, topk_idx, topk_weights, *, num_worst_tokens: int = 0) -> AllToAllDispatch:
        if num_worst_tokens:
            raise ValueError("AllToAllTransport.dispatch: num_worst_tokens is not supported (split sizes need "
                             "a host sync)")
        cfg = self.config
        in_rank = token_in_rank(topk_idx, cfg.num_experts, cfg.num_ranks)
        _, src_token = in_rank.t().nonzero(as_tuple=True)  # grouped by destination, tokens ascending
        send = in_rank.sum(0)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_counts, recv_counts = send.tolist(), recv.tolist()

        def exchange(t):
            return _AllToAll.apply(t[src_token], recv_counts, send_counts, self.group)

        recv_idx = local_expert_ids(exchange(topk_idx), cfg)
        recv_weights = torch.where(recv_idx >= 0, exchange(topk_weights), 0.0)
        handle = AllToAllHandle(src_token, send_counts, recv_counts, x.shape[0])
        return AllToAllDispatch(exchange(x), recv_idx, recv_weights, handle)

    def combine(self, y: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        back = _AllToAll.apply(y, handle.send_counts, handle.recv_counts, self.group)
        out = torch.zeros(handle.num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
        return out.index_add(0, handle.src_token, back.float()).to(y.dtype)
