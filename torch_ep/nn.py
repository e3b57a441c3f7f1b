"""`MoE`: a Mixture-of-Experts feed-forward layer whose experts are spread over an expert-parallel group.

Each rank routes its own tokens, sends them to the ranks holding their top-k experts with
`Buffer.dispatch`, runs the experts it holds on the rows it received (one grouped matmul per
projection), and sums the weighted outputs back home with `Buffer.combine`. See docs/training.md.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ._checks import COMBINE_INPUT_DTYPES
from .buffer import Buffer

SCORE_FUNCS = ("softmax", "sigmoid")


class Routing(NamedTuple):
    topk_idx: torch.Tensor      # [T, K] int64 global expert ids
    topk_weights: torch.Tensor  # [T, K] float32
    aux_loss: torch.Tensor      # 0-d float32 load-balancing loss (0 when disabled)


class Router(nn.Module):
    """Top-k gate: scores = score_func(x @ weight.T) in fp32; the k best experts per token and their weights.

    Args:
        hidden: channels H of a token.
        num_experts: E.
        top_k: K experts per token.
        score_func: "softmax" (over all experts) or "sigmoid" (independent per expert).
        renormalize: scale each token's K weights to sum to 1.
        aux_loss_coef: weight of the load-balancing loss E * sum_e f_e * p_e (f_e: fraction of the top-k
            picks naming expert e, p_e: its mean score); 0 disables it.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, *, score_func: str = "softmax",
                 renormalize: bool = True, aux_loss_coef: float = 0.0, device=None, dtype=None):
        super().__init__()
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"Router: score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"Router: top_k={top_k} must be in [1, num_experts={num_experts}]")
        if aux_loss_coef < 0:
            raise ValueError(f"Router: aux_loss_coef={aux_loss_coef} must be >= 0")
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.renormalize, self.aux_loss_coef = score_func, renormalize, aux_loss_coef
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)

    def forward(self, x: torch.Tensor) -> Routing:
        """x [T, H] -> Routing(topk_idx [T, K] int64, topk_weights [T, K] fp32, aux_loss 0-d fp32)."""
        logits = F.linear(x, self.weight).float()
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        weights, idx = scores.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-20)
        aux = _load_balancing_loss(scores, idx) * self.aux_loss_coef if self.aux_loss_coef > 0 \
            else scores.new_zeros(())
        return Routing(idx, weights, aux)


def _load_balancing_loss(scores: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * p_e over this rank's tokens; 1 when the load is uniform."""
    num_experts = scores.shape[1]
    picks = torch.zeros_like(scores).scatter_add_(1, topk_idx, torch.ones_like(topk_idx, dtype=scores.dtype))
    fraction = picks.sum(0) / max(topk_idx.numel(), 1)
    probs = scores / scores.sum(dim=-1, keepdim=True).clamp(min=1e-20)
    return num_experts * (fraction * probs.sum(0) / max(scores.shape[0], 1)).sum()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on `out` whose backward also feeds d(aux)/d(aux) = 1 into the aux loss, so the loss trains
    the router without the caller adding it to theirs."""

    @staticmethod
    def forward(ctx, out, aux):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, torch.ones((), dtype=torch.float32, device=grad_out.device)


class SwiGLU(nn.Module):
    """A dense SwiGLU FFN: w2(silu(w1 x) * w3 x); used as the shared expert and as the dense FFN of examples."""

    def __init__(self, hidden: int, ffn_hidden: int, *, device=None, dtype=None):
        super().__init__()
        self.w13 = nn.Linear(hidden, 2 * ffn_hidden, bias=False, device=device, dtype=dtype)
        self.w2 = nn.Linear(ffn_hidden, hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class GroupedExperts(nn.Module):
    """The SwiGLU experts one rank holds, stacked: w13 [E_local, 2F, H] (gate; up), w2 [E_local, H, F].

    `forward(x, offsets)` takes rows sorted by local expert, `offsets` [E_local] int32 the cumulative
    end row of each expert; rows past offsets[-1] are ignored and come out as zeros.

    Args:
        grouped_mm: True: torch._grouped_mm (error if this torch/device lacks it); False: `grouped_mm_loop`, one
            matmul per local expert; None: torch._grouped_mm for each dtype where a probe on `device` (and on
            meta tensors, what torch.compile traces) succeeds, the loop for the others.
    """

    def __init__(self, num_local_experts: int, hidden: int, ffn_hidden: int, *, grouped_mm: Optional[bool] = None,
                 device=None, dtype=None):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_local_experts, 2 * ffn_hidden, hidden, device=device, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, hidden, ffn_hidden, device=device, dtype=dtype))
        self.grouped_mm_dtypes = _grouped_mm_dtypes(device, grouped_mm)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w13, std=self.w13.shape[2] ** -0.5)
        nn.init.normal_(self.w2, std=self.w2.shape[2] ** -0.5)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x [M, H] sorted by local expert, offsets [E_local] int32 -> [M, H] in x's dtype."""
        w13, w2 = self.w13.to(x.dtype), self.w2.to(x.dtype)
        valid = (torch.arange(x.shape[0], device=x.device) < offsets[-1]).unsqueeze(1)
        # rows past the last offset are never written by a grouped matmul (nor by its backward): keep
        # their garbage out of both directions with where(), whose gradient is a select, not a product
        x = torch.where(valid, x, 0)
        matmul = torch._grouped_mm if x.dtype in self.grouped_mm_dtypes else grouped_mm_loop
        gate, up = matmul(x, w13.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
        y = matmul(F.silu(gate) * up, w2.transpose(-2, -1), offs=offsets)
        return torch.where(valid, y, 0)


# -- the grouped matmul without torch._grouped_mm: a loop over the groups, opaque to torch.compile ------

@torch.library.custom_op("torch_ep::grouped_mm_loop", mutates_args=())
def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[g] [K, N] for the rows of each group g (ending at offs[g]); rows past offs[-1] are 0."""
    out = x.new_zeros(x.shape[0], w.shape[2])
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ w[g]
        start = end
    return out


@torch.library.custom_op("torch_ep::grouped_mm_loop_weight_grad", mutates_args=())
def _grouped_mm_loop_weight_grad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[G, K, N]: x_g^T @ grad_g for each group's rows."""
    out = x.new_zeros(offs.shape[0], x.shape[1], grad.shape[1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[g] = x[start:end].t() @ grad[start:end]
        start = end
    return out


@grouped_mm_loop.register_fake
def _grouped_mm_loop_fake(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[2])


@_grouped_mm_loop_weight_grad.register_fake
def _grouped_mm_loop_weight_grad_fake(x, grad, offs):
    return x.new_empty(offs.shape[0], x.shape[1], grad.shape[1])


def _grouped_mm_loop_setup(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _grouped_mm_loop_backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    grad_x = grouped_mm_loop(grad, w.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    grad_w = _grouped_mm_loop_weight_grad(x, grad, offs) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


grouped_mm_loop.register_autograd(_grouped_mm_loop_backward, setup_context=_grouped_mm_loop_setup)


def _grouped_mm_dtypes(device, grouped_mm: Optional[bool]) -> frozenset:
    """The activation dtypes for which torch._grouped_mm runs on `device` (probed once, outside compile)."""
    if grouped_mm is False:
        return frozenset()
    device = torch.device(device if device is not None else torch.get_default_device())
    dtypes = frozenset(d for d in (torch.bfloat16, torch.float16, torch.float32) if _grouped_mm_runs(device, d))
    if grouped_mm and not dtypes:
        raise ValueError(f"GroupedExperts: grouped_mm=True but torch {torch.__version__} has no torch._grouped_mm "
                         f"that runs on {device}")
    return dtypes


def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Does torch._grouped_mm run on `device` in `dtype`, and on meta tensors (what torch.compile traces)?"""
    if not hasattr(torch, "_grouped_mm") or device.type == "meta":
        return False
    try:
        for dev in (device, torch.device("meta")):
            a = torch.ones(16, 16, device=dev, dtype=dtype)
            b = torch.ones(2, 16, 16, device=dev, dtype=dtype)
            torch._grouped_mm(a, b.transpose(-2, -1), offs=torch.tensor([8, 16], device=dev, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


class MoE(nn.Module):
    """Mixture-of-Experts SwiGLU layer with expert parallelism through torch_ep.

    Rank r of the expert-parallel group holds experts [r*E/R, (r+1)*E/R). Without a `buffer`, construction
    is collective over that group (it builds the layer's `Buffer` on the parameters' device type).

    Args:
        hidden: H, channels of a token.
        ffn_hidden: F, inner width of each expert.
        num_experts: E, a multiple of the group size.
        top_k: K experts per token.
        group: the expert-parallel ProcessGroup (None: the default group), or a DeviceMesh with `mesh_dim`.
        mesh_dim: name or index of the expert-parallel dimension when `group` is a DeviceMesh.
        max_tokens_per_rank: most tokens one forward passes in on a rank (sizes the Buffer it builds).
        buffer: use this Buffer (e.g. one shared by all layers) instead of building one; group, mesh_dim and
            max_tokens_per_rank are then not needed.
        score_func, renormalize, aux_loss_coef: the router's (see `Router`).
        shared_ffn_hidden: width of an always-on shared SwiGLU expert added to the output; 0 for none.
        grouped_mm: see `GroupedExperts`.
        num_worst_tokens: if > 0, dispatch pads to this many received rows (static shapes, no host sync).
        low_latency: in eval mode, move tokens with the buffer's low-latency kernels (decode; rows travel as
            bfloat16 whatever the layer's dtype); needs a Buffer built with low_latency=True.
    Forward: x [..., H] (bfloat16 or float32) -> [..., H]. With aux_loss_coef > 0 the load-balancing loss
    reaches the router through backward on its own; `forward(x, return_aux_loss=True)` also returns it.
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int, *,
                 group: Union[dist.ProcessGroup, "torch.distributed.device_mesh.DeviceMesh", None] = None,
                 mesh_dim: Union[str, int, None] = None, max_tokens_per_rank: Optional[int] = None,
                 buffer: Optional[Buffer] = None, score_func: str = "softmax", renormalize: bool = True,
                 aux_loss_coef: float = 0.0, shared_ffn_hidden: int = 0, grouped_mm: Optional[bool] = None,
                 num_worst_tokens: int = 0, low_latency: bool = False, device=None, dtype=None):
        super().__init__()
        if low_latency and not hasattr(buffer or Buffer, "low_latency_dispatch"):
            raise ValueError("MoE: low_latency=True needs a torch_ep.Buffer with the low-latency mode")
        self.owns_buffer = buffer is None
        if buffer is None:
            if max_tokens_per_rank is None:
                raise ValueError("MoE: pass max_tokens_per_rank (or a ready buffer)")
            extra = {"low_latency": True} if low_latency else {}
            buffer_device = torch.device(device if device is not None else torch.get_default_device()).type
            buffer = Buffer(_resolve_group(group, mesh_dim), num_experts, hidden, max_tokens_per_rank,
                            device=buffer_device, **extra)
        cfg = buffer.config
        if (cfg.num_experts, cfg.hidden) != (num_experts, hidden):
            raise ValueError(f"MoE: buffer was built for num_experts={cfg.num_experts}, hidden={cfg.hidden}; the "
                             f"layer has num_experts={num_experts}, hidden={hidden}")
        self.buffer = buffer
        self.hidden, self.num_experts, self.top_k = hidden, num_experts, top_k
        self.num_local_experts = cfg.experts_per_rank
        self.expert_offset = cfg.rank * cfg.experts_per_rank  # global id of local expert 0
        self.num_worst_tokens, self.low_latency = num_worst_tokens, low_latency
        self.router = Router(hidden, num_experts, top_k, score_func=score_func, renormalize=renormalize,
                             aux_loss_coef=aux_loss_coef, device=device, dtype=dtype)
        self.experts = GroupedExperts(self.num_local_experts, hidden, ffn_hidden, grouped_mm=grouped_mm,
                                      device=device, dtype=dtype)
        self.shared_expert = SwiGLU(hidden, shared_ffn_hidden, device=device, dtype=dtype) \
            if shared_ffn_hidden > 0 else None

    def forward(self, x: torch.Tensor, return_aux_loss: bool = False):
        shape = x.shape
        x = x.reshape(-1, self.hidden)
        routing = self.router(x)
        if self.low_latency and not self.training:
            out = self._low_latency_experts(x, routing)
        else:
            out = self._routed_experts(x, routing)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        if self.router.aux_loss_coef > 0 and torch.is_grad_enabled():
            out = _AttachAuxLoss.apply(out, routing.aux_loss)
        out = out.reshape(shape)
        return (out, routing.aux_loss.detach()) if return_aux_loss else out

    def _routed_experts(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Normal mode: received rows come ordered by (source rank, token), each with K local ids (-1 elsewhere)."""
        got = self.buffer.dispatch(x, routing.topk_idx, routing.topk_weights, num_worst_tokens=self.num_worst_tokens)
        recv_idx, k = got.recv_topk_idx, got.recv_topk_idx.shape[1]
        # one (row, slot) pair per top-k entry; pairs naming other ranks' experts sort last, past offsets[-1]
        key = torch.where(recv_idx >= 0, recv_idx, self.num_local_experts).flatten()
        order = torch.argsort(key, stable=True)
        rows = order // k
        offsets = _expert_offsets(key, self.num_local_experts)
        y = self.experts(got.recv_x[rows], offsets)
        weighted = y.float() * got.recv_topk_weights.flatten()[order].unsqueeze(1)
        per_row = torch.zeros(got.recv_x.shape[0], self.hidden, dtype=torch.float32, device=x.device)
        per_row = per_row.index_add(0, rows, weighted)  # sum each received row's local experts
        return self.buffer.combine(self._combine_input(per_row, x.dtype), got.handle)

    def _combine_input(self, per_row: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """per_row in dtype as combine takes it: written into the buffer's combine region where it has one (the
        peers then read the rows there; docs/semantics.md), else converted; torch.compile traces the conversion."""
        if dtype not in COMBINE_INPUT_DTYPES or not self.buffer.config.zero_copy_combine \
                or torch.compiler.is_compiling():
            return per_row.to(dtype)
        return self.buffer.combine_input(per_row.shape[0], dtype).copy_(per_row)

    def _low_latency_experts(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Low-latency mode: rows arrive already sorted by local expert with cumulative `expert_offsets`;
        combine applies `recv_weights` and reduces a token's local experts before sending it home. Its kernels
        move bfloat16 rows: a layer of another dtype sends its tokens and expert outputs as bfloat16."""
        wire = torch.bfloat16
        got = self.buffer.low_latency_dispatch(x.to(wire), routing.topk_idx, routing.topk_weights, use_fp8=False)
        y = self.experts(got.recv_x.to(x.dtype), got.expert_offsets)
        return self.buffer.low_latency_combine(y.to(wire), got.handle, weights=got.recv_weights).to(x.dtype)

    def load_experts(self, w13_all: torch.Tensor, w2_all: torch.Tensor) -> None:
        """Copy this rank's slice of full expert weights w13_all [E, 2F, H], w2_all [E, H, F]."""
        mine = slice(self.expert_offset, self.expert_offset + self.num_local_experts)
        with torch.no_grad():
            self.experts.w13.copy_(w13_all[mine])
            self.experts.w2.copy_(w2_all[mine])

    def destroy(self) -> None:
        """Release the Buffer this layer built (collective); a buffer passed in stays its owner's."""
        if self.owns_buffer:
            self.buffer.destroy()


def _expert_offsets(key: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """[E_local] int32 cumulative end of each local expert's rows in `key`'s sorted order (static shape)."""
    counts = torch.zeros(num_local_experts + 1, dtype=torch.int64, device=key.device)
    counts = counts.scatter_add(0, key, torch.ones_like(key))
    return counts[:num_local_experts].cumsum(0).int()


def _resolve_group(group, mesh_dim) -> dist.ProcessGroup:
    from torch.distributed.device_mesh import DeviceMesh
    if isinstance(group, DeviceMesh):
        if mesh_dim is None and group.ndim != 1:
            raise ValueError(f"MoE: group is a {group.ndim}-D DeviceMesh: pass mesh_dim, the expert-parallel dimension")
        return group.get_group(mesh_dim if mesh_dim is not None else 0)
    if mesh_dim is not None:
        raise ValueError("MoE: mesh_dim is only meaningful when group is a DeviceMesh")
    return group if group is not None else dist.group.WORLD
