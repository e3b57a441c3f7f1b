"""Low-latency mode (decode): result types, input checks, the CPU path over gloo, fake and autograd rules.

Semantics (docs/semantics.md, "Low-latency mode"), shared bit for bit by the CPU path and the CUDA kernels
(csrc/kernels/low_latency.cu):
- dispatch: with T_ll = max_tokens_per_rank, L = E/R local experts and M = R * T_ll * min(K, L) static rows,
  each (source rank, source token, local expert it names) gets one row; rows are sorted by local expert,
  then source rank, then source token. A token naming the same expert twice gets one row whose weight is the
  fp32 sum of those entries in k order. recv_weights[row] is that weight; rows past expert_offsets[-1] are
  unspecified (zero on the CPU path).
- FP8: per 128 channels, amax = max |x| (fp32), scale = amax / 448 (1 where amax is 0), q = e4m3(x / scale)
  rounded to nearest even, saturated to +-448.
- combine: on each expert rank, partial[t] = bf16(sum over t's local rows in k order of fp32(w * y)) (each
  product and sum rounded to fp32, no fused multiply-add); home: out[t] = bf16(sum over ranks d ascending
  of fp32(partial_d[t])); a token routed nowhere gets zeros.
"""
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ._checks import MAX_TOPK, SCALE_BLOCK, dtype_name, expert_id_error, shape as shape_of
from .buffer import BufferConfig, after, call_op, lookup
from .cpu import _exchange_counts, _first_error, token_in_rank

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_ROW_ALIGN = 8   # bf16 channels per 16 bytes: kernels move rows in 16-byte units


class LowLatencyHandle(NamedTuple):
    """Layout of one low-latency dispatch, for combine and both backward passes."""
    token_rows: torch.Tensor    # [R, T_ll, K] int32: row of (source, token, k-th entry) here, -1 if none or repeated
    dest_ranks: torch.Tensor    # [T] int32: bit d set if local token t went to rank d
    recv_weights: torch.Tensor  # [M] float32: combine's default weights


class LowLatencyDispatchResult(NamedTuple):
    recv_x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]  # [M, H] bf16, or (fp8 [M, H], fp32 [M, H/128])
    recv_weights: torch.Tensor                # [M] float32: weight of each row's (token, expert)
    expert_offsets: torch.Tensor              # [E/R] int32: cumulative row ends (torch._grouped_mm's offs)
    num_recv_tokens_per_expert: torch.Tensor  # [E/R] int32
    handle: LowLatencyHandle


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[n, c] of any dtype -> [n, c * itemsize] uint8 view of the same bytes."""
    return t.contiguous().view(torch.uint8)


def _agree(buf, op: str, rows: torch.Tensor, topk: int, error) -> None:
    """Before any data moves, every rank learns whether a rank rejected its input or the ranks make
    different calls (the count exchange of the ProcessGroup transport, with no counts to carry)."""
    width = rows.shape[-1] if rows.dim() == 2 else -1
    _exchange_counts(buf.pg_transport, buf.config, op, rows.dtype, topk, width, False, error, None, True,
                     rows.device)


def num_rows(cfg: BufferConfig, num_topk: int) -> int:
    """M, the static row count of a low-latency dispatch with top-`num_topk` routing."""
    return cfg.num_ranks * cfg.max_tokens_per_rank * min(num_topk, cfg.experts_per_rank)


# -- input checks (fake and CPU) -----------------------------------------------------------------

def _check_enabled(cfg: BufferConfig, op: str) -> None:
    torch._check_value(cfg.low_latency, lambda: f"{op}: the Buffer was created without low_latency=True")


def check_dispatch_inputs(x, topk_idx, topk_weights, use_fp8: bool, cfg: BufferConfig) -> None:
    op = "ep.low_latency_dispatch"
    _check_enabled(cfg, op)
    torch._check_value(x.dim() == 2 and x.dtype == torch.bfloat16 and x.shape[1] == cfg.hidden,
                       lambda: f"{op}: x must be bfloat16 [num_tokens, hidden={cfg.hidden}], got "
                               f"{dtype_name(x.dtype)} {shape_of(x)}")
    torch._check_value(x.shape[0] <= cfg.max_tokens_per_rank,
                       lambda: f"{op}: x has {x.shape[0]} tokens, more than the buffer's "
                               f"max_tokens_per_rank={cfg.max_tokens_per_rank}")
    torch._check_value(not use_fp8 or cfg.hidden % SCALE_BLOCK == 0,
                       lambda: f"{op}: use_fp8 needs hidden to be a multiple of {SCALE_BLOCK}, got {cfg.hidden}")
    torch._check_value(topk_idx.dim() == 2 and topk_idx.dtype == torch.int64 and topk_idx.shape[0] == x.shape[0]
                       and 1 <= topk_idx.shape[1] <= MAX_TOPK,
                       lambda: f"{op}: topk_idx must be int64 [num_tokens={x.shape[0]}, k] with 1 <= k <= "
                               f"{MAX_TOPK}, got {dtype_name(topk_idx.dtype)} {shape_of(topk_idx)}")
    torch._check_value(topk_weights.dtype == torch.float32 and topk_weights.shape == topk_idx.shape,
                       lambda: f"{op}: topk_weights must be float32 of shape {tuple(topk_idx.shape)}, got "
                               f"{dtype_name(topk_weights.dtype)} {shape_of(topk_weights)}")


def check_handle(token_rows, dest_ranks, cfg: BufferConfig, op: str) -> None:
    _check_enabled(cfg, op)
    shape = (cfg.num_ranks, cfg.max_tokens_per_rank)
    torch._check_value(token_rows.dtype == torch.int32 and token_rows.dim() == 3
                       and tuple(token_rows.shape[:2]) == shape and 1 <= token_rows.shape[2] <= MAX_TOPK,
                       lambda: f"{op}: token_rows must be int32 [{shape[0]}, {shape[1]}, k], got "
                               f"{dtype_name(token_rows.dtype)} {shape_of(token_rows)}")
    torch._check_value(dest_ranks.dtype == torch.int32 and dest_ranks.dim() == 1
                       and dest_ranks.shape[0] <= cfg.max_tokens_per_rank,
                       lambda: f"{op}: dest_ranks must be int32 [num_tokens <= {cfg.max_tokens_per_rank}], got "
                               f"{dtype_name(dest_ranks.dtype)} {shape_of(dest_ranks)}")


def _check_rows(t, num_rows_: int, cfg: BufferConfig, name: str, op: str) -> None:
    torch._check_value(t.dim() == 2 and t.dtype == torch.bfloat16 and t.shape[0] == num_rows_
                       and t.shape[1] <= cfg.hidden and t.shape[1] % _ROW_ALIGN == 0,
                       lambda: f"{op}: {name} must be bfloat16 [{num_rows_}, C] with C <= hidden={cfg.hidden} and "
                               f"C a multiple of {_ROW_ALIGN}, got {dtype_name(t.dtype)} {shape_of(t)}")


def check_combine_inputs(y, weights, token_rows, dest_ranks, cfg: BufferConfig) -> None:
    op = "ep.low_latency_combine"
    check_handle(token_rows, dest_ranks, cfg, op)
    m = num_rows(cfg, token_rows.shape[2])
    _check_rows(y, m, cfg, "y", op)
    torch._check_value(weights.dtype == torch.float32 and tuple(weights.shape) == (m,),
                       lambda: f"{op}: weights must be float32 [{m}], got {dtype_name(weights.dtype)} {shape_of(weights)}")


def check_cached_dispatch_inputs(x, token_rows, dest_ranks, cfg: BufferConfig) -> None:
    op = "ep.low_latency_cached_dispatch"
    check_handle(token_rows, dest_ranks, cfg, op)
    _check_rows(x, dest_ranks.shape[0], cfg, "x", op)


# -- the CPU path --------------------------------------------------------------------------------

def quantize_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """bf16 [T, H] -> (float8_e4m3fn [T, H], float32 scales [T, H/128]), the kernel's exact rule."""
    blocks = x.float().unflatten(1, (-1, SCALE_BLOCK))
    amax = blocks.abs().amax(dim=2)
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scales.unsqueeze(2)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(1), scales


def _gather_padded(t: torch.Tensor, rows: int, fill, group) -> torch.Tensor:
    """Every rank's `t` [n <= rows, ...], padded with `fill` to `rows`: [R, rows, ...]."""
    padded = t.new_full((rows, *t.shape[1:]), fill)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, padded, group=group)
    return torch.stack(parts)


def _local_ids(topk_idx: torch.Tensor, cfg: BufferConfig) -> torch.Tensor:
    """Global expert ids -> this rank's local ids, -1 for other ranks' experts and for -1."""
    local = topk_idx - cfg.rank * cfg.experts_per_rank
    return torch.where((topk_idx >= 0) & (local >= 0) & (local < cfg.experts_per_rank), local, -1)


def dest_rank_bits(topk_idx: torch.Tensor, cfg: BufferConfig) -> torch.Tensor:
    """[T] int32: bit d set if the token names an expert of rank d."""
    in_rank = token_in_rank(topk_idx, cfg.num_experts, cfg.num_ranks).int()
    return (in_rank << torch.arange(cfg.num_ranks, dtype=torch.int32)).sum(1, dtype=torch.int32)


def dispatch(x, topk_idx, topk_weights, buffer, use_fp8=False):
    buf = lookup(buffer)
    cfg = buf.config
    error = _first_error(lambda: check_dispatch_inputs(x, topk_idx, topk_weights, use_fp8, cfg),
                         lambda: expert_id_error(topk_idx, cfg.num_experts, "ep.low_latency_dispatch"))
    _agree(buf, "ep.low_latency_dispatch", x, topk_idx.shape[-1], error)
    num_ranks, tokens, local_experts, k = cfg.num_ranks, cfg.max_tokens_per_rank, cfg.experts_per_rank, topk_idx.shape[1]
    # What crosses the link: each token's row as its source encodes it, and its top-k ids and weights.
    scales = None
    if use_fp8:
        q, scales = quantize_fp8(x)
        payload = torch.cat([_as_bytes(q), _as_bytes(scales)], dim=1)
    else:
        payload = _as_bytes(x)
    rows_in = _gather_padded(payload, tokens, 0, buf.group).flatten(0, 1)              # [R*T_ll, bytes]
    ids = _local_ids(_gather_padded(topk_idx, tokens, -1, buf.group), cfg).flatten(0, 1)  # [R*T_ll, K]
    wts = _gather_padded(topk_weights, tokens, 0.0, buf.group).flatten(0, 1)

    slot = torch.where(ids >= 0, ids, local_experts)  # column L collects the entries that are not local
    pairs = torch.arange(ids.shape[0])
    hit = torch.zeros(ids.shape[0], local_experts + 1, dtype=torch.bool).scatter_(1, slot, True)[:, :local_experts]
    weight_sum = torch.zeros(ids.shape[0], local_experts + 1)
    for j in range(k):  # k order: the kernel's summation order
        weight_sum[pairs, slot[:, j]] = weight_sum[pairs, slot[:, j]] + torch.where(ids[:, j] >= 0, wts[:, j], 0.0)
    expert, pair = hit.t().nonzero(as_tuple=True)  # expert-major, then (source, token)
    valid = expert.shape[0]
    row_of = torch.full((ids.shape[0], local_experts + 1), -1, dtype=torch.int32)
    row_of[pair, expert] = torch.arange(valid, dtype=torch.int32)
    seen = torch.zeros_like(hit[:, :1].expand(-1, local_experts + 1)).clone()
    token_rows = torch.full_like(ids, -1, dtype=torch.int32)
    for j in range(k):  # a repeated expert keeps only its first entry's row
        first = (ids[:, j] >= 0) & ~seen[pairs, slot[:, j]]
        token_rows[:, j] = torch.where(first, row_of[pairs, slot[:, j]], -1)
        seen[pairs, slot[:, j]] = True

    m = num_rows(cfg, k)
    recv = payload.new_zeros((m, payload.shape[1]))
    recv[:valid] = rows_in[pair]
    recv_weights = torch.zeros(m)
    recv_weights[:valid] = weight_sum[pair, expert]
    counts = hit.sum(0, dtype=torch.int32)
    if use_fp8:
        recv_x = recv[:, : cfg.hidden].contiguous().view(torch.float8_e4m3fn)
        recv_scales = recv[:, cfg.hidden:].contiguous().view(torch.float32)
    else:
        recv_x = recv.view(torch.bfloat16)
        recv_scales = torch.zeros(m, 0)
    return (recv_x, recv_scales, recv_weights, counts.cumsum(0, dtype=torch.int32), counts,
            token_rows.view(num_ranks, tokens, k), dest_rank_bits(topk_idx, cfg))


def cached_dispatch(x, token_rows, dest_ranks, buffer):
    buf = lookup(buffer)
    cfg = buf.config
    error = _first_error(lambda: check_cached_dispatch_inputs(x, token_rows, dest_ranks, cfg))
    _agree(buf, "ep.low_latency_cached_dispatch", x, -1, error)
    m = num_rows(cfg, token_rows.shape[2])
    rows_in = _gather_padded(x, cfg.max_tokens_per_rank, 0, buf.group).flatten(0, 1)
    rows = token_rows.flatten(0, 1).long()
    out = x.new_zeros((m + 1, x.shape[1]))  # row m absorbs the entries that have no row
    for j in range(rows.shape[1]):
        out[torch.where(rows[:, j] >= 0, rows[:, j], m)] = rows_in
    return out[:m].clone()


def combine(y, weights, token_rows, dest_ranks, buffer):
    buf = lookup(buffer)
    cfg = buf.config
    error = _first_error(lambda: check_combine_inputs(y, weights, token_rows, dest_ranks, cfg))
    _agree(buf, "ep.low_latency_combine", y, -1, error)
    rows = token_rows.flatten(0, 1).long()
    acc = torch.zeros(rows.shape[0], y.shape[1])
    for j in range(rows.shape[1]):  # k order, fp32, product and sum each rounded
        row = rows[:, j].clamp(min=0)
        term = weights[row].unsqueeze(1) * y[row].float()
        acc = torch.where((rows[:, j] >= 0).unsqueeze(1), acc + term, acc)
    partials = acc.to(torch.bfloat16)  # what crosses the link: [source rank s, token t] -> back to s
    back = torch.empty_like(partials)
    dist.all_to_all_single(_as_bytes(back), _as_bytes(partials), group=buf.group)
    back = back.view(cfg.num_ranks, cfg.max_tokens_per_rank, -1)[:, : dest_ranks.shape[0]]
    out = torch.zeros(dest_ranks.shape[0], y.shape[1])
    for d in range(cfg.num_ranks):  # ascending rank: a fixed summation order
        held = ((dest_ranks >> d) & 1).bool().unsqueeze(1)
        out = torch.where(held, out + back[d].float(), out)
    return out.to(torch.bfloat16)


for _name, _fn in (("low_latency_dispatch", dispatch), ("low_latency_cached_dispatch", cached_dispatch),
                   ("low_latency_combine", combine)):
    torch.library.impl(f"ep::{_name}", "cpu", _fn)  # not register_kernel: see cpu.py


# -- fake implementations ------------------------------------------------------------------------

@torch.library.register_fake("ep::low_latency_dispatch")
def _dispatch_fake(x, topk_idx, topk_weights, buffer, use_fp8=False):
    cfg = lookup(buffer).config
    check_dispatch_inputs(x, topk_idx, topk_weights, use_fp8, cfg)
    m, local_experts = num_rows(cfg, topk_idx.shape[1]), cfg.experts_per_rank
    i32 = dict(dtype=torch.int32)
    return (x.new_empty((m, cfg.hidden), dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16),
            x.new_empty((m, cfg.hidden // SCALE_BLOCK if use_fp8 else 0), dtype=torch.float32),
            x.new_empty((m,), dtype=torch.float32),
            x.new_empty((local_experts,), **i32),
            x.new_empty((local_experts,), **i32),
            x.new_empty((cfg.num_ranks, cfg.max_tokens_per_rank, topk_idx.shape[1]), **i32),
            x.new_empty((x.shape[0],), **i32))


@torch.library.register_fake("ep::low_latency_cached_dispatch")
def _cached_dispatch_fake(x, token_rows, dest_ranks, buffer):
    cfg = lookup(buffer).config
    check_cached_dispatch_inputs(x, token_rows, dest_ranks, cfg)
    return x.new_empty((num_rows(cfg, token_rows.shape[2]), x.shape[1]))


@torch.library.register_fake("ep::low_latency_combine")
def _combine_fake(y, weights, token_rows, dest_ranks, buffer):
    cfg = lookup(buffer).config
    check_combine_inputs(y, weights, token_rows, dest_ranks, cfg)
    return y.new_empty((dest_ranks.shape[0], y.shape[1]))


# -- autograd ------------------------------------------------------------------------------------

def _covered_rows(token_rows: torch.Tensor, m: int) -> torch.Tensor:
    """[M] bool: rows some (source, token, k) entry points at (the others hold no data)."""
    rows = token_rows.flatten().long()
    return torch.zeros(m + 1, dtype=torch.bool, device=rows.device).index_fill_(
        0, torch.where(rows >= 0, rows, m), True)[:m]


def _weights_back_home(grad_rows, token_rows, dest_ranks, topk_idx, buffer):
    """Gradient of topk_weights [T, K] from the per-row gradient [M] on the experts' ranks.

    Row r's gradient goes to column k of its token when r is that token's k-th entry; combine moves those
    columns home (each column of a token is nonzero in exactly one row, so its sums are exact). fp32 travels
    as two bf16 halves (hi + lo), about 16 significant bits."""
    m, k = grad_rows.shape[0], topk_idx.shape[1]
    hi = grad_rows.to(torch.bfloat16)
    lo = (grad_rows - hi.float()).to(torch.bfloat16)
    width = -(-2 * k // _ROW_ALIGN) * _ROW_ALIGN
    cols = torch.zeros(m + 1, width, dtype=torch.bfloat16, device=grad_rows.device)  # row m: entries without a row
    rows = token_rows.flatten(0, 1).long()
    for j in range(k):
        row = torch.where(rows[:, j] >= 0, rows[:, j], m)
        cols[row, j] = hi[row.clamp(max=m - 1)]
        cols[row, k + j] = lo[row.clamp(max=m - 1)]
    ones = torch.ones(m, device=grad_rows.device)
    home = torch.ops.ep.low_latency_combine(cols[:m].contiguous(), ones, token_rows, dest_ranks, buffer).float()
    grad = home[:, :k] + home[:, k:2 * k]
    # A repeated expert's entries share one row: each gets that row's gradient.
    first = (topk_idx.unsqueeze(2) == topk_idx.unsqueeze(1)).int().argmax(dim=2)
    return torch.where(topk_idx >= 0, grad.gather(1, first), 0.0)


def _dispatch_setup(ctx, inputs, output):
    topk_idx, ctx.buffer = inputs[1], inputs[3]
    ctx.use_fp8 = len(inputs) > 4 and inputs[4]
    ctx.save_for_backward(topk_idx, output[5], output[6])


def _dispatch_backward(ctx, grad_recv_x, _grad_scales, grad_recv_weights, *_rest):
    topk_idx, token_rows, dest_ranks = ctx.saved_tensors
    grad_x = grad_weights = None
    # the weights' combine first, x's after it, ordered under torch.compile too (see buffer.after)
    if ctx.needs_input_grad[2]:
        grad_weights = _weights_back_home(grad_recv_weights.float(), token_rows, dest_ranks, topk_idx, ctx.buffer)
        dest_ranks = after(grad_weights, dest_ranks)
    if ctx.needs_input_grad[0] and not ctx.use_fp8:
        ones = torch.ones(grad_recv_x.shape[0], device=grad_recv_x.device)
        grad_x = torch.ops.ep.low_latency_combine(grad_recv_x.to(torch.bfloat16).contiguous(), ones, token_rows,
                                                  dest_ranks, ctx.buffer)
    return grad_x, None, grad_weights, None, None


def _combine_setup(ctx, inputs, output):
    y, weights, token_rows, dest_ranks, ctx.buffer = inputs
    ctx.save_for_backward(y, weights, token_rows, dest_ranks)


def _combine_backward(ctx, grad_out):
    y, weights, token_rows, dest_ranks = ctx.saved_tensors
    grad_rows = torch.ops.ep.low_latency_cached_dispatch(grad_out.to(torch.bfloat16).contiguous(), token_rows,
                                                         dest_ranks, ctx.buffer).float()
    covered = _covered_rows(token_rows, y.shape[0]).unsqueeze(1)  # rows past the valid ones may hold anything
    grad_y = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_y = torch.where(covered, grad_rows * weights.unsqueeze(1), 0.0).to(y.dtype)
    if ctx.needs_input_grad[1]:
        grad_weights = torch.where(covered, grad_rows * y.float(), 0.0).sum(1)
    return grad_y, grad_weights, None, None, None


torch.library.register_autograd("ep::low_latency_dispatch", _dispatch_backward, setup_context=_dispatch_setup)
torch.library.register_autograd("ep::low_latency_combine", _combine_backward, setup_context=_combine_setup)


def buffer_dispatch(buffer_name: str, x, topk_idx, topk_weights, use_fp8: bool) -> LowLatencyDispatchResult:
    """Buffer.low_latency_dispatch: the op, its outputs named."""
    recv_x, recv_scales, recv_weights, offsets, counts, token_rows, dest_ranks = call_op(
        torch.ops.ep.low_latency_dispatch.default, (x, topk_weights), x, topk_idx, topk_weights, buffer_name, use_fp8)
    handle = LowLatencyHandle(token_rows, dest_ranks, recv_weights)
    return LowLatencyDispatchResult((recv_x, recv_scales) if use_fp8 else recv_x, recv_weights, offsets, counts,
                                    handle)


def buffer_combine(buffer_name: str, y, handle: LowLatencyHandle, weights: Optional[torch.Tensor]):
    """Buffer.low_latency_combine: weights default to the dispatch's recv_weights."""
    weights = handle.recv_weights if weights is None else weights
    return call_op(torch.ops.ep.low_latency_combine.default, (y, weights),
                   y, weights, handle.token_rows, handle.dest_ranks, buffer_name)
