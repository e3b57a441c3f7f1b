"""CPU implementations of the ep ops over the ProcessGroup's own collectives (gloo).

They define the semantics (DESIGN.md) and are the oracle the CUDA kernels are tested against.
Every op first exchanges an "input ok" flag with its counts, so one rank's bad input makes every
rank raise instead of leaving the others waiting in a collective.
"""
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from ._checks import (check_cached_dispatch_inputs, check_combine_inputs, check_dispatch_inputs, check_expert_ids,
                      check_layout_inputs, expert_id_error)
from .buffer import BufferConfig, lookup


def token_in_rank(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """[T, R] bool: does token t name at least one expert owned by rank r (-1 ids name none)."""
    dest = torch.where(topk_idx >= 0, topk_idx.div(num_experts // num_ranks, rounding_mode="floor"), num_ranks)
    hit = torch.zeros(topk_idx.shape[0], num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    return hit.scatter_(1, dest, True)[:, :num_ranks].contiguous()


def local_expert_ids(topk_idx: torch.Tensor, cfg: BufferConfig) -> torch.Tensor:
    """Global expert ids -> this rank's local ids, -1 for experts other ranks own."""
    local = topk_idx - cfg.rank * cfg.experts_per_rank
    return torch.where((local >= 0) & (local < cfg.experts_per_rank) & (topk_idx >= 0), local, -1)


def get_dispatch_layout(topk_idx, num_experts, num_ranks):
    check_layout_inputs(topk_idx, num_experts, num_ranks)
    error = expert_id_error(topk_idx, num_experts, "ep.get_dispatch_layout")
    if error:
        raise ValueError(error)
    per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).int()
    in_rank = token_in_rank(topk_idx, num_experts, num_ranks)
    return in_rank.sum(0, dtype=torch.int32), per_expert, in_rank


def dispatch(x, x_scales, topk_idx, topk_weights, buffer, expert_alignment=1, num_worst_tokens=0):
    buf = lookup(buffer)
    cfg = buf.config
    error = _first_error(
        lambda: check_dispatch_inputs(x, x_scales, topk_idx, topk_weights, cfg, expert_alignment, num_worst_tokens),
        lambda: check_expert_ids(topk_idx, cfg.num_experts))
    in_rank = token_in_rank(topk_idx, cfg.num_experts, cfg.num_ranks) if error is None else None
    counts = in_rank.sum(0) if error is None else torch.zeros(cfg.num_ranks, dtype=torch.int64)
    counts = _all_gather_checked(counts, error, buf.group, "ep.dispatch")  # [src, dst]
    rank_prefix = torch.cat([counts.new_zeros(1, cfg.num_ranks), counts.cumsum(0)]).int()
    received = int(rank_prefix[-1].max())
    if num_worst_tokens and received > num_worst_tokens:
        raise ValueError(f"ep.dispatch: a rank receives {received} rows, more than num_worst_tokens={num_worst_tokens}")
    send_pos = torch.where(in_rank, in_rank.cumsum(0) - 1 + rank_prefix[cfg.rank], -1).int()

    parts = [x, topk_idx, topk_weights, torch.arange(x.shape[0]).unsqueeze(1)]
    if x_scales is not None:
        parts.append(x_scales)
    num_rows = num_worst_tokens or int(rank_prefix[-1, cfg.rank])
    recv = _send_rows(parts, send_pos, rank_prefix, num_rows, buf)
    recv_x, recv_global_idx, recv_weights, recv_src = recv[:4]
    valid = torch.arange(num_rows) < rank_prefix[-1, cfg.rank]  # the rest is padding
    recv_topk_idx = torch.where(valid.unsqueeze(1), local_expert_ids(recv_global_idx, cfg), -1)
    recv_topk_weights = torch.where(recv_topk_idx >= 0, recv_weights, 0.0)
    recv_src_idx = torch.where(valid, recv_src.squeeze(1), -1).int()
    per_expert = torch.bincount(recv_topk_idx[recv_topk_idx >= 0], minlength=cfg.experts_per_rank)
    per_expert = ((per_expert + expert_alignment - 1) // expert_alignment * expert_alignment).int()
    recv_scales = recv[4] if x_scales is not None else x.new_empty((num_rows, 0), dtype=torch.float32)
    return (recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert, send_pos, recv_src_idx,
            rank_prefix)


def cached_dispatch(x, x_scales, send_pos, recv_src_idx, rank_prefix, buffer):
    buf = lookup(buffer)
    cfg = buf.config
    error = _first_error(
        lambda: check_cached_dispatch_inputs(x, x_scales, send_pos, recv_src_idx, rank_prefix, cfg))
    _all_gather_checked(torch.zeros(0, dtype=torch.int64), error, buf.group, "ep.cached_dispatch")
    parts = [x] if x_scales is None else [x, x_scales]
    recv = _send_rows(parts, send_pos, rank_prefix, recv_src_idx.shape[0], buf)
    recv_scales = recv[1] if x_scales is not None else x.new_empty((recv_src_idx.shape[0], 0), dtype=torch.float32)
    return recv[0], recv_scales


def combine(y, send_pos, recv_src_idx, rank_prefix, buffer):
    buf = lookup(buffer)
    cfg = buf.config
    error = _first_error(
        lambda: check_combine_inputs(y, send_pos, recv_src_idx, rank_prefix, cfg))
    _all_gather_checked(torch.zeros(0, dtype=torch.int64), error, buf.group, "ep.combine")
    me = cfg.rank
    send_counts = (rank_prefix[1:, me] - rank_prefix[:-1, me]).tolist()
    back_counts = (send_pos >= 0).sum(0).tolist()
    rows = y[: int(rank_prefix[-1, me])]
    back = _all_to_all(_as_bytes(rows), send_counts, back_counts, buf.group).view(y.dtype)
    acc_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    out = torch.zeros(send_pos.shape[0], y.shape[1], dtype=acc_dtype)
    for d, chunk in enumerate(back.split(back_counts)):  # ascending rank: a fixed summation order
        out[send_pos[:, d] >= 0] += chunk.to(acc_dtype)
    return out.to(y.dtype)


# -- helpers ------------------------------------------------------------------------------------

def _first_error(*checks: Callable[[], Optional[str]]) -> Optional[str]:
    """The message of the first failing check (checks return a message or raise ValueError)."""
    for check in checks:
        try:
            message = check()
        except ValueError as exc:
            return str(exc)
        if message:
            return message
    return None


def _all_gather_checked(row: torch.Tensor, error: Optional[str], group, op: str) -> torch.Tensor:
    """All-gather one int64 row per rank; raise on every rank if any rank's input was rejected."""
    flagged = torch.cat([torch.tensor([int(error is not None)]), row.long()])
    gathered = [torch.empty_like(flagged) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, flagged, group=group)
    matrix = torch.stack(gathered)
    if error is not None:
        raise ValueError(error)
    bad = matrix[:, 0].nonzero()
    if bad.numel():
        raise ValueError(f"{op}: rank {int(bad[0])} rejected its input (its own error names the argument)")
    return matrix[:, 1:]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[n, c] of any dtype -> [n, c * itemsize] uint8 view of the same bytes."""
    if t.numel() == 0:  # an empty tensor may carry strides (0, or a packed row's) that no byte view accepts
        return t.new_empty((t.shape[0], t.shape[1] * t.element_size()), dtype=torch.uint8)
    return t.contiguous().view(torch.uint8)


def _all_to_all(rows: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], group) -> torch.Tensor:
    out = rows.new_empty((sum(recv_counts), rows.shape[1]))
    dist.all_to_all_single(out, rows, list(recv_counts), list(send_counts), group=group)
    return out


def _send_rows(parts: List[torch.Tensor], send_pos, rank_prefix, num_rows: int, buf) -> List[torch.Tensor]:
    """Send row t of every part to each rank d with send_pos[t, d] >= 0; return the parts as received,
    ordered by (source rank, token), padded with zeros to `num_rows` rows."""
    me = buf.config.rank
    order = torch.cat([(send_pos[:, d] >= 0).nonzero().squeeze(1) for d in range(send_pos.shape[1])])
    packed = torch.cat([_as_bytes(p)[order] for p in parts], dim=1)
    send_counts = (send_pos >= 0).sum(0).tolist()
    recv_counts = (rank_prefix[1:, me] - rank_prefix[:-1, me]).tolist()
    received = _all_to_all(packed, send_counts, recv_counts, buf.group)
    padded = received.new_zeros((num_rows, packed.shape[1]))
    padded[: received.shape[0]] = received
    widths = [p.shape[1] * p.element_size() for p in parts]
    # Copy each column slice into its own rows: with 0 or 1 rows, contiguous() would keep the packed row
    # stride, which a wider dtype cannot view.
    return [chunk.new_empty(chunk.shape).copy_(chunk).view(p.dtype)
            for chunk, p in zip(padded.split(widths, dim=1), parts)]


for _name, _fn in (("get_dispatch_layout", get_dispatch_layout), ("dispatch", dispatch),
                   ("cached_dispatch", cached_dispatch), ("combine", combine)):
    # torch.library.impl, not register_kernel: the latter wraps the kernel in dynamo.disable, whose first
    # call imports torch._dynamo (~1.5 s). Compiled graphs already call kernels with dynamo off.
    torch.library.impl(f"ep::{_name}", "cpu", _fn)
