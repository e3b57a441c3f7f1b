"""`Buffer`: the communication state of one expert-parallel group, and the public API."""
from __future__ import annotations

import atexit
import itertools
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import _C
from .transport import ProcessGroupTransport, gather_peer_info, host_layout, select_transport

_REGISTRY: dict[str, "Buffer"] = {}
_NAMES = itertools.count()
DEFAULT_NUM_SMS = 24


@dataclass(frozen=True)
class BufferConfig:
    """What every op on a buffer needs to know about its group and its sizes."""
    rank: int
    num_ranks: int
    num_experts: int
    hidden: int
    max_tokens_per_rank: int
    low_latency: bool = False  # the low-latency region exists (Buffer(low_latency=True))

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.num_ranks


def lookup(name: str) -> "Buffer":
    """The live buffer registered under `name` (ops carry buffers by name so torch.compile can trace them)."""
    buffer = _REGISTRY.get(name)
    if buffer is None:
        raise RuntimeError(f"torch_ep: no live Buffer named {name!r} (was it destroyed?)")
    return buffer


class DispatchLayout(NamedTuple):
    num_tokens_per_rank: torch.Tensor    # [R] int32: tokens this rank sends to each rank
    num_tokens_per_expert: torch.Tensor  # [E] int32: top-k entries naming each expert
    is_token_in_rank: torch.Tensor       # [T, R] bool


class DispatchHandle(NamedTuple):
    """Layout of one dispatch, reused by combine and by both backward passes."""
    send_pos: torch.Tensor      # [T, R] int32: row on each rank where a local token landed, -1 if not sent
    recv_src_idx: torch.Tensor  # [N] int32: source token index of each received row, -1 for padding
    rank_prefix: torch.Tensor   # [R+1, R] int32: rows sent to each rank by lower ranks; row R: totals
    rank: int

    @property
    def num_recv_tokens(self) -> torch.Tensor:
        """0-d int32 tensor: valid received rows (the rest, in no-host-sync mode, is padding)."""
        return self.rank_prefix[-1, self.rank]


class DispatchResult(NamedTuple):
    recv_x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]  # [N, H], or (fp8 [N, H], fp32 scales)
    recv_topk_idx: torch.Tensor               # [N, K] int64: local expert ids, -1 for other ranks' experts
    recv_topk_weights: torch.Tensor           # [N, K] float32: weights of local entries, 0 elsewhere
    num_recv_tokens_per_expert: torch.Tensor  # [E/R] int32, each rounded up to expert_alignment
    handle: DispatchHandle


class Buffer:
    """Communication buffer of an expert-parallel group; creating and destroying it are collective.

    Args:
        group: the ProcessGroup of the expert-parallel ranks (None: the default group).
        num_experts: total experts E; rank r owns experts [r*E/R, (r+1)*E/R).
        hidden: channels H of a token row.
        max_tokens_per_rank: most tokens any rank passes to one dispatch (sizes the NVLink buffer).
        num_bytes: device bytes to allocate instead; max_tokens_per_rank is then derived if not given.
        num_sms: thread blocks (one per SM) the CUDA communication kernels use.
        timeout_s: how long an op waits for a peer before failing with an error naming it.
        device: "cuda" (default when CUDA is available and built) or "cpu" (ops run over the group's
            all-to-all; also what CPU tensors always use).
        low_latency: also allocate the low-latency region (low_latency_dispatch/combine, for decoding) for
            max_tokens_per_rank tokens per rank.
        transport: None (NVLink kernels when every rank is a CUDA-IPC peer on one host, else the
            ProcessGroup's collectives), "nvlink" or "process_group" (NCCL for CUDA tensors, gloo for
            CPU); see `self.transport` for the choice made (torch_ep/transport.py).
        ranks_per_host: ProcessGroup transport only: forward through hosts of this many consecutive
            ranks (default: from the hostnames, or TORCH_EP_SIMULATE_HOSTS); see docs/multinode.md.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, num_experts: int = 0, hidden: int = 0,
                 max_tokens_per_rank: Optional[int] = None, *, num_bytes: Optional[int] = None,
                 num_sms: int = DEFAULT_NUM_SMS, timeout_s: float = 100.0,
                 device: Optional[Union[str, torch.device]] = None, low_latency: bool = False,
                 transport: Optional[str] = None, ranks_per_host: Optional[int] = None):
        self.group = group if group is not None else dist.group.WORLD
        rank, num_ranks = dist.get_rank(self.group), dist.get_world_size(self.group)
        if num_experts <= 0 or num_experts % num_ranks != 0:
            raise ValueError(f"torch_ep.Buffer: num_experts={num_experts} must be a positive multiple of the "
                             f"group size {num_ranks}")
        if hidden <= 0:
            raise ValueError(f"torch_ep.Buffer: hidden={hidden} must be positive")
        if num_sms <= 0:
            raise ValueError(f"torch_ep.Buffer: num_sms={num_sms} must be positive")
        self.device = _resolve_device(device)
        max_tokens_per_rank = _resolve_max_tokens(num_ranks, num_experts, hidden, max_tokens_per_rank, num_bytes,
                                                  low_latency)
        self.config = BufferConfig(rank, num_ranks, num_experts, hidden, max_tokens_per_rank, low_latency)
        self.num_sms = num_sms
        self.name = f"ep_buffer_{next(_NAMES)}"
        self.timeout_s = float(timeout_s)
        peers = gather_peer_info(self.group, self.device)
        self.transport = select_transport(peers, transport, self.device)
        self.pg_transport = None
        if self.transport == "process_group":
            if low_latency and self.device.type == "cuda":
                raise ValueError("torch_ep.Buffer: low_latency=True on CUDA needs the NVLink transport (every "
                                 "rank a CUDA-IPC peer on one host); this group uses the ProcessGroup's")
            self.pg_transport = ProcessGroupTransport(self.group, self.device, self.timeout_s,
                                                      host_layout(peers, ranks_per_host))
        else:
            size = max(num_bytes or 0, _C.buffer_bytes(num_ranks, num_experts, hidden, max_tokens_per_rank,
                                                   low_latency))
            own = _C.create_buffer(self.name, self.device.index, rank, num_ranks, num_experts, hidden,
                                   max_tokens_per_rank, size, num_sms, float(timeout_s), low_latency)
            handles = [None] * num_ranks
            dist.all_gather_object(handles, own, group=self.group)
            _C.open_buffer(self.name, handles)
        dist.barrier(group=self.group)
        _REGISTRY[self.name] = self

    # -- the public API -------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: torch.Tensor) -> DispatchLayout:
        """Counts for `topk_idx` [T, K] int64 (-1 = no expert): see DispatchLayout. Local, no communication."""
        return DispatchLayout(*torch.ops.ep.get_dispatch_layout(
            topk_idx, self.config.num_experts, self.config.num_ranks))

    def dispatch(self, x, topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 *, handle: Optional[DispatchHandle] = None, expert_alignment: int = 1,
                 num_worst_tokens: int = 0):
        """Send every token to each rank that owns one of its experts.

        Args:
            x: [T, H] bfloat16/float16/float32, or a tuple (float8_e4m3fn [T, H], float32 scales [T, ceil(H/128)]).
            topk_idx: [T, K] int64 expert ids, -1 for none.
            topk_weights: [T, K] float32.
            handle: a previous dispatch's handle: move `x` again with that layout (topk arguments omitted);
                returns only recv_x.
            expert_alignment: round each per-expert count up to a multiple of this.
            num_worst_tokens: if > 0, outputs have exactly this many rows (padding after the valid
                `handle.num_recv_tokens`), nothing waits on the host, and the call can be CUDA-graph captured.
        Returns:
            DispatchResult(recv_x [N, H] (or the fp8 tuple), recv_topk_idx [N, K] int64 local ids,
            recv_topk_weights [N, K] float32, num_recv_tokens_per_expert [E/R] int32, handle);
            rows are ordered by (source rank, source token index).
        """
        x, x_scales = x if isinstance(x, tuple) else (x, None)
        if handle is not None:
            recv_x, recv_scales = torch.ops.ep.cached_dispatch(
                x, x_scales, handle.send_pos, handle.recv_src_idx, handle.rank_prefix, self.name)
            return (recv_x, recv_scales) if x_scales is not None else recv_x
        if topk_idx is None or topk_weights is None:
            raise ValueError("Buffer.dispatch: topk_idx and topk_weights are required without a handle")
        (recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert,
         send_pos, recv_src_idx, rank_prefix) = torch.ops.ep.dispatch(
            x, x_scales, topk_idx, topk_weights, self.name, expert_alignment, num_worst_tokens)
        handle = DispatchHandle(send_pos, recv_src_idx, rank_prefix, self.config.rank)
        recv = (recv_x, recv_scales) if x_scales is not None else recv_x
        return DispatchResult(recv, recv_topk_idx, recv_topk_weights, per_expert, handle)

    def combine(self, y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Sum expert outputs back home: y [N, H] (one row per received row) -> [T, H], fp32 sum in rank order."""
        return torch.ops.ep.combine(y, handle.send_pos, handle.recv_src_idx, handle.rank_prefix, self.name)

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *,
                             use_fp8: bool = False):
        """Decode-time dispatch: static shapes, no host sync, CUDA-graph capturable (needs low_latency=True).

        Args:
            x: [T, H] bfloat16, T <= max_tokens_per_rank (padding tokens: all topk_idx -1).
            topk_idx: [T, K] int64 expert ids, -1 for none.
            topk_weights: [T, K] float32.
            use_fp8: send float8_e4m3fn rows with per-128-channel float32 scales computed by the kernel.
        Returns:
            LowLatencyDispatchResult(recv_x [M, H] bfloat16 (or (float8_e4m3fn [M, H], float32 [M, H/128])),
            recv_weights [M] float32, expert_offsets [E/R] int32, num_recv_tokens_per_expert [E/R] int32, handle),
            M = R * max_tokens_per_rank * min(K, E/R); rows sorted by local expert, then (source rank, token);
            rows past expert_offsets[-1] are unspecified.
        """
        from . import low_latency  # it imports this module
        return low_latency.buffer_dispatch(self.name, x, topk_idx, topk_weights, use_fp8)

    def low_latency_combine(self, y: torch.Tensor, handle, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y [M, H] bfloat16 (one row per dispatched row) -> [T, H] bfloat16:
        out[t] = sum over t's rows of weight * y, weights [M] float32 (default: the dispatch's recv_weights)."""
        from . import low_latency  # it imports this module
        return low_latency.buffer_combine(self.name, y, handle, weights)

    def destroy(self) -> None:
        """Release the buffer on every rank (collective); later ops on it raise."""
        if self.name not in _REGISTRY:
            return
        del _REGISTRY[self.name]
        if self.pg_transport is not None:
            self.pg_transport.destroy()
        else:
            torch.cuda.synchronize(self.device)
            _C.close_buffer(self.name)
            if dist.is_initialized():
                dist.barrier(group=self.group)
            _C.free_buffer(self.name)

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()


def _resolve_device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() and _C.WITH_CUDA else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not _C.WITH_CUDA:
            raise RuntimeError("torch_ep.Buffer: device='cuda' but torch_ep was built without CUDA")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    elif device.type != "cpu":
        raise ValueError(f"torch_ep.Buffer: device must be 'cuda' or 'cpu', got {device}")
    return device


def _resolve_max_tokens(num_ranks, num_experts, hidden, max_tokens_per_rank, num_bytes, low_latency) -> int:
    """max_tokens_per_rank as given, or the largest that `num_bytes` holds."""
    if max_tokens_per_rank is not None:
        if max_tokens_per_rank <= 0:
            raise ValueError(f"torch_ep.Buffer: max_tokens_per_rank={max_tokens_per_rank} must be positive")
        need = _C.buffer_bytes(num_ranks, num_experts, hidden, max_tokens_per_rank, low_latency)
        if num_bytes is not None and num_bytes < need:
            raise ValueError(f"torch_ep.Buffer: num_bytes={num_bytes} is smaller than the {need} bytes "
                             f"max_tokens_per_rank={max_tokens_per_rank} needs")
        return max_tokens_per_rank
    if num_bytes is None:
        raise ValueError("torch_ep.Buffer: pass max_tokens_per_rank or num_bytes")
    lo, hi = 0, 1
    while _C.buffer_bytes(num_ranks, num_experts, hidden, hi, low_latency) <= num_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _C.buffer_bytes(num_ranks, num_experts, hidden, mid, low_latency) <= num_bytes else (lo, mid)
    if lo == 0:
        raise ValueError(f"torch_ep.Buffer: num_bytes={num_bytes} holds not even one token")
    return lo


@atexit.register
def _destroy_live_buffers() -> None:
    for buffer in list(_REGISTRY.values()):
        buffer.destroy()
