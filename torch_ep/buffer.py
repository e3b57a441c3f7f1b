"""`Buffer`: the communication state of one expert-parallel group, and the public API."""
from __future__ import annotations

import atexit
import itertools
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import _C
from .transport import ProcessGroupTransport, TransportError, host_layout, local_peer_info, select_transport
from ._checks import (COMBINE_INPUT_DTYPES, MAX_CUDA_RANKS, ROUTER_WEIGHT_DTYPES, TOPK_WEIGHT_DTYPE, check_capability,
                      names, shape)

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
    zero_copy_recv: bool = False  # dispatch returns rows in place (Buffer(zero_copy_recv=True))
    zero_copy_combine: bool = False  # combine_input returns views of the combine region

    @property
    def regions(self) -> tuple:
        """The optional regions of the CUDA buffer, as _C.buffer_bytes and _C.create_buffer take them."""
        return self.low_latency, self.zero_copy_recv, self.zero_copy_combine

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
    """What Buffer.get_dispatch_layout returns; Buffer.dispatch(..., layout=) takes it back."""
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
        """0-d int32 tensor on the op's device: valid received rows (the rest, in no-host-sync mode, is
        padding). Reading it on the host syncs: use num_recv_tokens_int() for a Python int."""
        return self.rank_prefix[-1, self.rank]

    def num_recv_tokens_int(self) -> int:
        """Valid received rows as a Python int (waits for the device)."""
        return int(self.num_recv_tokens)


class DispatchResult(NamedTuple):
    """What Buffer.dispatch returns; unpacks positionally. After dispatch(x, handle=h) only recv_x is new:
    recv_topk_idx, recv_topk_weights and num_recv_tokens_per_expert are None and handle is h."""
    recv_x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]  # [N, H], or (fp8 [N, H], fp32 scales)
    recv_topk_idx: Optional[torch.Tensor]               # [N, K] int64: local expert ids, -1 elsewhere
    recv_topk_weights: Optional[torch.Tensor]           # [N, K] float32: weights of local entries, 0 elsewhere
    num_recv_tokens_per_expert: Optional[torch.Tensor]  # [E/R] int32 on the op's device, rounded up to alignment
    handle: DispatchHandle

    def num_recv_tokens_per_expert_list(self) -> list:
        """num_recv_tokens_per_expert as a list of Python ints (waits for the device)."""
        return self.num_recv_tokens_per_expert.tolist()


class Buffer:
    """Communication buffer of an expert-parallel group; creating and destroying it are collective.

    Args:
        group: the ProcessGroup of the expert-parallel ranks (None: the default group).
        num_experts: total experts E; rank r owns experts [r*E/R, (r+1)*E/R).
        hidden: channels H of a token row.
        max_tokens_per_rank: most tokens any rank passes to one dispatch (sizes the NVLink buffer).
        num_bytes: device bytes to allocate instead; max_tokens_per_rank is then derived if not given.
        num_sms: thread blocks (one per SM) the CUDA dispatch and combine kernels use.
        timeout_s: how long an op waits for a peer before failing with an error naming it.
        device: "cuda" (default when CUDA is available and built) or "cpu" (ops run over the group's
            all-to-all; also what CPU tensors always use).
        low_latency: also allocate the low-latency region (low_latency_dispatch/combine, for decoding) for
            max_tokens_per_rank tokens per rank.
        low_latency_num_sms: thread blocks of the low-latency kernels (default: one per SM of the device, at
            most MAX_DATA_BLOCKS; they are short and on a decode step's critical path: 22 against 34 us with 24
            blocks at 128 tokens on 2xH100, docs/performance.md). The same on every rank.
        zero_copy_recv: also allocate a receive region (R * max_tokens_per_rank rows of a bf16 row's size:
            the staging rows' size plus one rank's share) that dispatch takes recv_x (and FP8 scales) from,
            so that every rank stores the rows there at their final row and no rank copies them again. The
            outputs are ordinary tensors (the region's memory stays theirs while they live); a call whose rows
            do not fit what is free, a CUDA-graph capture, rows wider than a bf16 row (float32, float64) and the
            ProcessGroup transport take the staging path, with the same results. Work on other streams than
            the buffer's must finish before recv_x is freed (record_stream does not apply); docs/semantics.md.
        zero_copy_combine: also allocate a combine region (as large as zero_copy_recv's) from which the
            other ranks read combine's rows themselves: a combine whose y is `combine_input(...)` on every
            rank sends no rows and reduces with every SM (docs/semantics.md).
        transport: None (NVLink kernels when every rank is a CUDA-IPC peer on one host, else the
            ProcessGroup's collectives), "nvlink" or "process_group" (NCCL for CUDA tensors, gloo for
            CPU); see `self.transport` for the choice made (torch_ep/transport.py).
        ranks_per_host: ProcessGroup transport only: forward through hosts of this many consecutive
            ranks (default: from the hostnames, or TORCH_EP_SIMULATE_HOSTS); see docs/multinode.md.
    An NVLink buffer holds at most MAX_CUDA_RANKS ranks (one NVLink domain); a ProcessGroup one any number.
    Every rank raises if any rank's arguments are refused or the ranks' buffers would differ.
    Ops name the buffer by `name`, which encodes its configuration: torch.compile bakes the name into
    a graph, so a cached graph is reused only for a buffer of the same shape.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, num_experts: int = 0, hidden: int = 0,
                 max_tokens_per_rank: Optional[int] = None, *, num_bytes: Optional[int] = None,
                 num_sms: int = DEFAULT_NUM_SMS, timeout_s: float = 100.0,
                 device: Optional[Union[str, torch.device]] = None, low_latency: bool = False,
                 zero_copy_recv: bool = False, transport: Optional[str] = None,
                 ranks_per_host: Optional[int] = None, low_latency_num_sms: Optional[int] = None,
                 zero_copy_combine: bool = False):
        self.group = group if group is not None else dist.group.WORLD
        # A rank that refused its arguments alone would leave the others waiting in the next collective:
        # every step that can fail on one rank is followed by a gather in which all ranks learn of it.
        per_rank = _gather_or_raise(self.group, lambda: self._configure(
            num_experts, hidden, max_tokens_per_rank, num_bytes, num_sms, timeout_s, device, low_latency,
            zero_copy_recv, zero_copy_combine, transport, low_latency_num_sms))
        _check_same_layout([setup for setup, _, _ in per_rank])  # what the transport is chosen by
        self.name = self._unique_name()  # only once every rank took its arguments: the count stays the same
        peers = [peer for _, _, peer in per_rank]
        self.transport = select_transport(peers, transport, self.device)
        self.pg_transport = None
        cfg = self.config
        if self.transport == "process_group":
            if cfg.low_latency and self.device.type == "cuda":
                raise ValueError("torch_ep.Buffer: low_latency=True on CUDA needs the NVLink transport (every "
                                 "rank a CUDA-IPC peer on one host); this group uses the ProcessGroup's")
            self.pg_transport = ProcessGroupTransport(self.group, self.device, self.timeout_s,
                                                      host_layout(peers, ranks_per_host), self.name)
            dist.barrier(group=self.group)
        else:
            _check_nvlink_group(cfg.num_ranks)
            _check_same_layout([layout for _, layout, _ in per_rank])  # (the ProcessGroup's ops check each call)
            size = max(num_bytes or 0, _C.buffer_bytes(cfg.num_ranks, cfg.num_experts, cfg.hidden,
                                                       cfg.max_tokens_per_rank, *cfg.regions))
            handles = _gather_or_raise(self.group, lambda: _C.create_buffer(
                self.name, self.device.index, cfg.rank, cfg.num_ranks, cfg.num_experts, cfg.hidden,
                cfg.max_tokens_per_rank, size, self.num_sms, self.timeout_s, *cfg.regions, self.low_latency_num_sms),
                undo=lambda: _C.free_buffer(self.name))
            try:  # the gather after opening is also the barrier before any op may store into a peer
                _gather_or_raise(self.group, lambda: _C.open_buffer(self.name, handles))
            except (ValueError, RuntimeError):
                _C.free_buffer(self.name)  # whichever rank failed to open, this rank's memory goes
                raise
        _REGISTRY[self.name] = self

    def _configure(self, num_experts, hidden, max_tokens_per_rank, num_bytes, num_sms, timeout_s, device,
                   low_latency, zero_copy_recv, zero_copy_combine, transport, low_latency_num_sms):
        """This rank's checks of its arguments and its configuration (local, no communication); returns what
        the ranks must agree on (for any transport, for the NVLink one) and what the transport is chosen from."""
        rank, num_ranks = dist.get_rank(self.group), dist.get_world_size(self.group)
        if num_experts <= 0 or num_experts % num_ranks != 0:
            raise ValueError(f"torch_ep.Buffer: num_experts={num_experts} must be a positive multiple of the "
                             f"group size {num_ranks}")
        if hidden <= 0:
            raise ValueError(f"torch_ep.Buffer: hidden={hidden} must be positive")
        if num_sms <= 0:
            raise ValueError(f"torch_ep.Buffer: num_sms={num_sms} must be positive")
        if low_latency_num_sms is not None and low_latency_num_sms <= 0:
            raise ValueError(f"torch_ep.Buffer: low_latency_num_sms={low_latency_num_sms} must be positive")
        if not timeout_s > 0:
            raise ValueError(f"torch_ep.Buffer: timeout_s={timeout_s} must be positive")
        self.device = _resolve_device(device)
        if self.device.type == "cuda":  # the kernels must exist for this GPU, whatever the transport
            check_capability(torch.cuda.get_device_capability(self.device), _C.CUDA_ARCHS, _C.CUDA_PTX_ARCH,
                             self.device)
        regions = (low_latency, zero_copy_recv, zero_copy_combine)  # as BufferConfig.regions orders them
        max_tokens_per_rank = _resolve_max_tokens(num_ranks, num_experts, hidden, max_tokens_per_rank, num_bytes,
                                                  regions)
        self.config = BufferConfig(rank, num_ranks, num_experts, hidden, max_tokens_per_rank, *regions)
        self.num_sms = num_sms
        self.low_latency_num_sms = _low_latency_blocks(low_latency, low_latency_num_sms, self.device)
        self.timeout_s = float(timeout_s)
        return ({"device type": self.device.type, "transport": transport}, self._layout_fields(),
                local_peer_info(self.device))

    def _unique_name(self) -> str:
        """The same on every rank: a rank-independent config and the count of buffers made before."""
        cfg = self.config
        return (f"ep_buffer_{self.device.type}_r{cfg.num_ranks}_e{cfg.num_experts}_h{cfg.hidden}"
                f"_t{cfg.max_tokens_per_rank}{'_ll' if cfg.low_latency else ''}{'_zc' if cfg.zero_copy_recv else ''}"
                f"{'_zcc' if cfg.zero_copy_combine else ''}_{next(_NAMES)}")

    def _layout_fields(self) -> dict:
        """What the NVLink kernels assume every rank's buffer shares."""
        cfg = self.config
        return {"num_experts": cfg.num_experts, "hidden": cfg.hidden, "max_tokens_per_rank": cfg.max_tokens_per_rank,
                "low_latency": cfg.low_latency, "zero_copy_recv": cfg.zero_copy_recv,
                "zero_copy_combine": cfg.zero_copy_combine, "num_sms": self.num_sms,
                "low_latency_num_sms": self.low_latency_num_sms}

    # -- the public API -------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: torch.Tensor) -> DispatchLayout:
        """Counts for `topk_idx` [T, K] int64 (-1 = no expert): see DispatchLayout. Local, no communication."""
        return DispatchLayout(*torch.ops.ep.get_dispatch_layout(
            topk_idx, self.config.num_experts, self.config.num_ranks))

    def dispatch(self, x, topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 *, handle: Optional[DispatchHandle] = None, layout: Optional[DispatchLayout] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0) -> DispatchResult:
        """Send every token to each rank that owns one of its experts.

        Args:
            x: [T, H] bfloat16/float16/float32/float64, or a tuple (float8_e4m3fn [T, H], float32 scales
                [T, ceil(H/128)]).
            topk_idx: [T, K] int64 expert ids in [-1, E), -1 for none; 1 <= K <= 32.
            topk_weights: [T, K] float32, bfloat16 or float16 (converted to float32, which the op computes in;
                the gradient flows back in the given dtype).
            handle: a previous dispatch's handle: move `x` again with that layout (topk arguments omitted).
            layout: this topk_idx's DispatchLayout from get_dispatch_layout, checked against topk_idx's shape
                and the buffer (the op counts rows again while it exchanges them, so passing it is optional).
            expert_alignment: round each per-expert count up to a multiple of this.
            num_worst_tokens: if > 0, outputs have exactly this many rows (padding after the valid
                `handle.num_recv_tokens`), nothing waits on the host, and the call can be CUDA-graph captured.
        Returns:
            DispatchResult(recv_x [N, H] (or the fp8 tuple), recv_topk_idx [N, K] int64 local ids,
            recv_topk_weights [N, K] float32, num_recv_tokens_per_expert [E/R] int32, handle);
            rows are ordered by (source rank, source token index). With `handle`, only recv_x is new: the
            three middle fields are None and `handle` is the one given.
        """
        try:  # refused here, the call still reaches the other ranks (see _refuse)
            x, x_scales = _split_x(x)
            if handle is None:
                if topk_idx is None or topk_weights is None:
                    raise ValueError("Buffer.dispatch: topk_idx and topk_weights are required without a handle")
                if layout is not None:
                    self._check_layout(layout, topk_idx)
                topk_weights = _op_weights(topk_weights)
        except ValueError as exc:
            self._refuse("ep.dispatch" if handle is None else "ep.cached_dispatch", exc, num_worst_tokens > 0)
            raise
        if handle is not None:
            recv_x, recv_scales = call_op(torch.ops.ep.cached_dispatch.default, (x,),
                                          x, x_scales, handle.send_pos, handle.recv_src_idx, handle.rank_prefix,
                                          self.name)
            recv = (recv_x, recv_scales) if x_scales is not None else recv_x
            return DispatchResult(recv, None, None, None, handle)
        (recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert,
         send_pos, recv_src_idx, rank_prefix) = call_op(
            torch.ops.ep.dispatch.default, (x, topk_weights),
            x, x_scales, topk_idx, topk_weights, self.name, expert_alignment, num_worst_tokens)
        handle = DispatchHandle(send_pos, recv_src_idx, rank_prefix, self.config.rank)
        recv = (recv_x, recv_scales) if x_scales is not None else recv_x
        return DispatchResult(recv, recv_topk_idx, recv_topk_weights, per_expert, handle)

    def combine_input(self, num_rows: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """A [num_rows, hidden] tensor to write combine's y into (e.g. the expert layer's output): on a
        zero_copy_combine NVLink buffer a view of this rank's combine region, which the other ranks read
        the rows from themselves when every rank passes its view to combine (a rank that passes another
        tensor while others pass theirs fails the op). It is the same memory every call: work queued after
        combine on the buffer's stream may write it again (combine's kernel ends once every rank has read
        it). Elsewhere, and for more rows than the region holds (R * max_tokens_per_rank: a larger
        num_worst_tokens), a new tensor."""
        if dtype not in COMBINE_INPUT_DTYPES:
            raise ValueError(f"Buffer.combine_input: dtype must be {names(COMBINE_INPUT_DTYPES)}, got {names([dtype])}")
        if num_rows < 0:
            raise ValueError(f"Buffer.combine_input: num_rows={num_rows} must be >= 0")
        cfg = self.config
        fits = num_rows <= cfg.num_ranks * cfg.max_tokens_per_rank
        if not (cfg.zero_copy_combine and self.pg_transport is None and fits):
            return torch.empty(num_rows, cfg.hidden, dtype=dtype, device=self.device)
        return _C.combine_input(self.name, num_rows).view(dtype)

    def combine(self, y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Sum expert outputs back home: y [N, H] (one row per received row) -> [T, H] in y's dtype, summed in
        float32 (float64 for float64) in ascending rank order."""
        return call_op(torch.ops.ep.combine.default, (y,),
                       y, handle.send_pos, handle.recv_src_idx, handle.rank_prefix, self.name)

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

    def _refuse(self, op: str, error: ValueError, fixed: bool) -> None:
        """Buffer.dispatch refused its arguments before calling `op`. This rank still takes part in the op's
        exchange of counts, carrying the error, so that every other rank raises too (naming this rank) instead
        of waiting for it or pairing its call with this rank's next one. That exchange is the count exchange on
        the ProcessGroup transport and dispatch's notify kernel on NVLink (where cached_dispatch has none: the
        other ranks time out)."""
        if self.name not in _REGISTRY or torch.compiler.is_compiling():
            return
        if self.pg_transport is None:
            if op == "ep.dispatch":
                _C.refuse_dispatch(self.name, not fixed)
            return
        from . import cpu  # it imports this module
        try:
            cpu.refuse_call(self, op, str(error), fixed)
        except ValueError:  # the error itself, raised by the exchange: the caller raises it
            pass

    def _check_layout(self, layout: DispatchLayout, topk_idx: torch.Tensor) -> None:
        cfg = self.config
        want = {"num_tokens_per_rank": ([cfg.num_ranks], torch.int32),
                "num_tokens_per_expert": ([cfg.num_experts], torch.int32),
                "is_token_in_rank": ([topk_idx.shape[0], cfg.num_ranks], torch.bool)}
        if not isinstance(layout, DispatchLayout):
            raise ValueError(f"Buffer.dispatch: layout must be the DispatchLayout of get_dispatch_layout, "
                             f"got {type(layout).__name__}")
        for field, (size, dtype) in want.items():
            t = getattr(layout, field)
            if list(t.shape) != size or t.dtype != dtype:
                raise ValueError(f"Buffer.dispatch: layout.{field} must be {names([dtype])} {size} for this "
                                 f"topk_idx and buffer, got {names([t.dtype])} {shape(t)} (a layout of other "
                                 f"routing?)")

    def synchronize(self) -> None:
        """Wait until this rank's ops on the buffer have finished, and raise (RuntimeError) the error of any
        that failed. On CUDA an op returns before its kernels run, so an op that fails on the device (a peer
        silent for timeout_s, ranks that disagree on the call) is raised here or at the buffer's next op,
        like NCCL's asynchronous errors; its outputs are unspecified and the buffer can no longer be used
        (destroy() still works). The ProcessGroup transport raises such errors in the op itself, and here
        again (TransportError) once its buffer failed."""
        if self.name not in _REGISTRY:
            raise RuntimeError(f"torch_ep: Buffer {self.name!r} was destroyed")
        if self.pg_transport is None:
            _C.check_buffer(self.name)
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.pg_transport.failure is not None:
            raise TransportError(f"torch_ep: this Buffer failed earlier and cannot be used: "
                                 f"{self.pg_transport.failure}")

    def destroy(self) -> None:
        """Release the buffer on every rank (collective); later ops on it raise. Idempotent; also run at
        interpreter exit for buffers still alive, before the process group is torn down."""
        if _REGISTRY.pop(self.name, None) is None:
            return
        group, self.group = self.group, None  # a destroyed buffer must not keep the ProcessGroup alive
        if self.pg_transport is not None:
            self.pg_transport.destroy()
        else:
            torch.cuda.synchronize(self.device)
            _C.close_buffer(self.name)
            if dist.is_initialized():
                dist.barrier(group=group)
            _C.free_buffer(self.name)

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()


def _low_latency_blocks(low_latency: bool, asked: Optional[int], device: torch.device) -> int:
    """Blocks of the low-latency kernels: `asked`, else one per SM (at most MAX_DATA_BLOCKS); 0 without them."""
    if not low_latency or device.type != "cuda":
        return 0
    if asked is not None:
        return asked
    return min(torch.cuda.get_device_properties(device).multi_processor_count, _C.MAX_DATA_BLOCKS)


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


def call_op(op, differentiable: tuple, *args):
    """op(*args), below the autograd layer when no tensor in `differentiable` needs a gradient (in eager mode,
    for plain tensors): the ops' Python autograd kernel would only redispatch there, at ~5 us of host time a
    call (measured on 2xH100 hosts), which an exact-mode dispatch waits through. Traced code (torch.compile,
    export) and tensor subclasses take the op as it is."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and _autograd_sees(differentiable)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def after(dep: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`index` (an int32 tensor of a handle) with its values unchanged, made to depend on `dep`.

    A backward that makes two collective calls whose inputs do not depend on each other leaves their order to
    the compiler: inductor's peak-memory reordering (on by default) orders independent nodes by the sizes of
    their buffers, which differ from rank to rank, so the ranks could issue the two calls in different orders
    and pair one rank's call with another's (wrong results, or 'ranks disagree' errors). Traced code (only
    there: eager mode runs the calls in program order) makes the second call take its handle through this."""
    if not torch.compiler.is_compiling():
        return index
    zero = (dep.sum() * 0).nan_to_num(0.0, 0.0, 0.0)  # 0 whatever dep holds; not foldable by the compiler
    return index + zero.to(index.dtype)


def _autograd_sees(tensors: tuple) -> bool:
    """Whether a tensor needs a gradient or is a subclass (a loop: ~1 us less host time than any() over a
    generator)."""
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or t.requires_grad):
            return True
    return False


def _split_x(x) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Buffer.dispatch's x: a tensor, or an (x, scales) pair (FP8) -> (x, scales or None)."""
    if isinstance(x, torch.Tensor):
        return x, None
    if isinstance(x, tuple) and len(x) == 2:
        return x
    got = f"a tuple of {len(x)}" if isinstance(x, tuple) else type(x).__name__
    raise ValueError(f"Buffer.dispatch: x must be a tensor or a pair (float8_e4m3fn x, float32 scales), got {got}")


def _op_weights(topk_weights: torch.Tensor) -> torch.Tensor:
    """topk_weights as the ops take them: float32 (router outputs are often bfloat16). Already float32: as
    given, without the ~1.5 us of host time a no-op `.to` costs, which an exact-mode dispatch waits through."""
    if topk_weights.dtype == TOPK_WEIGHT_DTYPE:
        return topk_weights
    if topk_weights.dtype not in ROUTER_WEIGHT_DTYPES:
        raise ValueError(f"Buffer.dispatch: topk_weights must be {names(ROUTER_WEIGHT_DTYPES)}, got "
                         f"{names([topk_weights.dtype])}")
    return topk_weights.to(TOPK_WEIGHT_DTYPE)


def _gather_or_raise(group, step: Callable[[], object], undo: Optional[Callable[[], None]] = None) -> list:
    """step() on every rank, gathered. Where it raised on any rank, every rank raises: that rank its own
    error, the others one naming it (after `undo`, which reverts their step)."""
    try:
        value, failure = step(), None
    except (ValueError, RuntimeError, TypeError) as exc:
        value, failure = None, exc
    shown = None if failure is None else (isinstance(failure, ValueError), str(failure))
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (shown, value), group=group)
    if failure is not None:
        raise failure
    for r, (error, _) in enumerate(gathered):
        if error is not None:
            if undo is not None:
                undo()
            is_value_error, message = error
            raise (ValueError if is_value_error else RuntimeError)(
                f"torch_ep.Buffer: rank {r} failed to build its buffer: {message}")
    return [v for _, v in gathered]


def _check_same_layout(per_rank: list) -> None:
    """Raise ValueError (on every rank: all see the same list) naming the first field ranks disagree on."""
    for field in per_rank[0]:
        values = [fields[field] for fields in per_rank]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"torch_ep.Buffer: ranks disagree on {field} ({shown})")


def _check_nvlink_group(num_ranks: int) -> None:
    """Refuse what the NVLink kernels cannot serve before any memory is allocated."""
    if num_ranks > MAX_CUDA_RANKS:
        raise ValueError(f"torch_ep.Buffer: an NVLink buffer spans at most {MAX_CUDA_RANKS} ranks (one NVLink "
                         f"domain), the group has {num_ranks}; use transport='process_group' or a smaller group")


def _resolve_max_tokens(num_ranks, num_experts, hidden, max_tokens_per_rank, num_bytes, regions) -> int:
    """max_tokens_per_rank as given, or the largest that `num_bytes` holds (by the CUDA buffer formula with the
    optional `regions` (BufferConfig.regions), which a CPU buffer needs only for num_bytes)."""
    if num_bytes is not None and num_ranks > MAX_CUDA_RANKS:
        raise ValueError(f"torch_ep.Buffer: num_bytes sizes a CUDA buffer, which spans at most {MAX_CUDA_RANKS} "
                         f"ranks; with {num_ranks} ranks pass max_tokens_per_rank")
    if max_tokens_per_rank is not None:
        if max_tokens_per_rank <= 0:
            raise ValueError(f"torch_ep.Buffer: max_tokens_per_rank={max_tokens_per_rank} must be positive")
        if num_bytes is None:
            return max_tokens_per_rank
        need = _C.buffer_bytes(num_ranks, num_experts, hidden, max_tokens_per_rank, *regions)
        if num_bytes < need:
            raise ValueError(f"torch_ep.Buffer: num_bytes={num_bytes} is smaller than the {need} bytes "
                             f"max_tokens_per_rank={max_tokens_per_rank} needs")
        return max_tokens_per_rank
    if num_bytes is None:
        raise ValueError("torch_ep.Buffer: pass max_tokens_per_rank or num_bytes")
    lo, hi = 0, 1
    while _C.buffer_bytes(num_ranks, num_experts, hidden, hi, *regions) <= num_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _C.buffer_bytes(num_ranks, num_experts, hidden, mid, *regions) <= num_bytes else (lo, mid)
    if lo == 0:
        raise ValueError(f"torch_ep.Buffer: num_bytes={num_bytes} holds not even one token")
    return lo


@atexit.register
def _shut_down_at_exit() -> None:
    """Destroy live buffers, then the process groups, while the interpreter is still whole.

    A gloo group left for interpreter finalization can abort the process ("terminate called without
    an active exception"): its worker threads release the last collective's tensors after Python is
    gone. torch_ep is imported after torch.distributed, so this runs before any exit hook of torch's.
    """
    for buffer in list(_REGISTRY.values()):
        buffer.destroy()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
