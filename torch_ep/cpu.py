"""The ep ops over a ProcessGroup's collectives: the CPU path, and the transport across hosts.

CPU tensors run over gloo, CUDA tensors over NCCL (the Buffer's ProcessGroupTransport picks the
backend); the same code serves both. These functions define the semantics (DESIGN.md) and are
the oracle the NVLink kernels are tested against.

Every op starts with one all-gather of a row per rank: a header describing the call (see
torch_ep/agreement.py) and the counts the op needs, so that bad input on one rank, or ranks that
disagree, make every rank raise before any data moves.

Rows move in one of three ways (torch_ep/transport.py decides the host layout):
  flat:         one all_to_all_single from each source rank to each destination rank;
  hierarchical: a token crosses to each destination *host* once, to the rank with the sender's
                local index, which forwards it to the ranks of its host that need it
                (docs/multinode.md); the output is bitwise that of flat;
  fixed:        num_worst_tokens > 0: every rank sends max_tokens_per_rank rows to every rank
                (to every host, hierarchically), static splits, so nothing reads a count on the
                host and a CUDA graph can capture it.
"""
from typing import Callable, List, NamedTuple, Optional

import torch

from . import agreement
from ._checks import (check_cached_dispatch_inputs, check_combine_inputs, check_dispatch_inputs, check_expert_ids,
                      check_layout_inputs, expert_id_error)
from .buffer import BufferConfig, lookup


def routable_ids(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """topk_idx with ids outside [-1, num_experts) replaced by -1: where they are not rejected (no host
    reads, as under CUDA-graph capture) they count as no expert, as in the NVLink kernels."""
    return torch.where((topk_idx >= 0) & (topk_idx < num_experts), topk_idx, -1)


def token_in_rank(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """[T, R] bool: does token t name at least one expert owned by rank r (-1 ids, and ids outside
    [-1, num_experts), name none)."""
    return _in_rank(routable_ids(topk_idx, num_experts), num_experts // num_ranks, num_ranks)


def _in_rank(ids: torch.Tensor, experts_per_rank: int, num_ranks: int) -> torch.Tensor:
    """token_in_rank of ids already in [-1, num_experts)."""
    dest = torch.where(ids >= 0, ids.div(experts_per_rank, rounding_mode="floor"), num_ranks)
    hit = torch.zeros(ids.shape[0], num_ranks + 1, dtype=torch.bool, device=ids.device)
    return hit.scatter_(1, dest, True)[:, :num_ranks].contiguous()


def local_expert_ids(ids: torch.Tensor, cfg: BufferConfig) -> torch.Tensor:
    """Global expert ids in [-1, num_experts) -> this rank's local ids, -1 for experts other ranks own."""
    local = ids - cfg.rank * cfg.experts_per_rank
    return torch.where((local >= 0) & (local < cfg.experts_per_rank), local, -1)


def get_dispatch_layout(topk_idx, num_experts, num_ranks):
    check_layout_inputs(topk_idx, num_experts, num_ranks)
    error = expert_id_error(topk_idx, num_experts, "ep.get_dispatch_layout")
    if error:
        raise ValueError(error)
    per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).int()
    in_rank = token_in_rank(topk_idx, num_experts, num_ranks)
    return in_rank.sum(0, dtype=torch.int32), per_expert, in_rank


# -- the ops ----------------------------------------------------------------------------------------

def dispatch(x, x_scales, topk_idx, topk_weights, buffer, expert_alignment=1, num_worst_tokens=0):
    op = "ep.dispatch"
    buf = lookup(buffer)
    cfg, tp = buf.config, buf.pg_transport
    fixed = num_worst_tokens > 0
    if not fixed and _capturing(x):
        raise RuntimeError(f"{op}: without num_worst_tokens the ProcessGroup transport reads the received row "
                           "counts on the host, which a CUDA graph cannot capture; pass num_worst_tokens > 0")
    host_reads = _may_read_on_host(x, fixed)
    error = _first_error(
        lambda: check_dispatch_inputs(x, x_scales, topk_idx, topk_weights, cfg, expert_alignment, num_worst_tokens))
    ids = in_rank = sent = flagged = None
    if error is None:
        ids = routable_ids(topk_idx, cfg.num_experts)
        in_rank = _in_rank(ids, cfg.experts_per_rank, cfg.num_ranks)
        sent = _sent_counts(in_rank, tp.hosts)
        flagged = (ids != topk_idx).sum() if host_reads else None  # bad ids, rejected with the count exchange
    topk = topk_idx.shape[1] if topk_idx.dim() == 2 else -1
    width = x.shape[-1] if x.dim() else -1
    exchanged = _exchange_counts(tp, cfg, op, x.dtype, topk, width, fixed, error, sent, host_reads, x.device,
                                 flagged, lambda: check_expert_ids(topk_idx, cfg.num_experts))
    rank_prefix = _rank_prefix(exchanged.counts[:, :cfg.num_ranks])
    if host_reads and fixed:
        received = max(sum(row[d] for row in exchanged.host) for d in range(cfg.num_ranks))
        if received > num_worst_tokens:  # every rank sees the same matrix: all raise together
            raise ValueError(f"{op}: a rank receives {received} rows, more than num_worst_tokens={num_worst_tokens}")
    send_pos = torch.where(in_rank, in_rank.cumsum(0, dtype=torch.int32) + (rank_prefix[cfg.rank] - 1), -1)

    # Everything but x travels as one int32 block per row: global expert ids, weight bits, token index, scales.
    num_tokens = x.shape[0]
    meta = [ids.int(), topk_weights.view(torch.int32),
            torch.arange(num_tokens, dtype=torch.int32, device=x.device).unsqueeze(1)]
    if x_scales is not None:
        meta.append(x_scales.view(torch.int32))
    parts = [_as_movable(x), torch.cat(meta, dim=1)]
    if fixed:
        recv_x, recv_meta = _route_fixed(parts, send_pos, rank_prefix, exchanged.counts, num_worst_tokens, cfg, tp,
                                         op)
    else:
        recv_x, recv_meta = _route_exact(parts, send_pos, exchanged.host, None, tp, op)
    recv_x = recv_x.view(x.dtype)
    num_rows = recv_x.shape[0]

    recv_topk_idx = local_expert_ids(recv_meta[:, :topk].long(), cfg)
    recv_src_idx = recv_meta[:, 2 * topk]
    if fixed:  # rows past the valid ones are padding
        valid = torch.arange(num_rows, device=x.device) < rank_prefix[-1, cfg.rank]
        recv_topk_idx = torch.where(valid.unsqueeze(1), recv_topk_idx, -1)
        recv_src_idx = torch.where(valid, recv_src_idx, -1)
    else:
        recv_src_idx = recv_src_idx.contiguous()
    recv_weights = recv_meta[:, topk:2 * topk].view(torch.float32)
    recv_topk_weights = torch.where(recv_topk_idx >= 0, recv_weights, 0.0)
    if x_scales is not None:
        recv_scales = recv_meta[:, 2 * topk + 1:].contiguous().view(torch.float32)
    else:
        recv_scales = x.new_empty((num_rows, 0), dtype=torch.float32)
    per_expert = _tokens_per_local_expert(recv_topk_idx, cfg.experts_per_rank, expert_alignment)
    return (recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert, send_pos, recv_src_idx,
            rank_prefix)


def cached_dispatch(x, x_scales, send_pos, recv_src_idx, rank_prefix, buffer):
    op = "ep.cached_dispatch"
    buf = lookup(buffer)
    cfg, tp = buf.config, buf.pg_transport
    fixed = _takes_static_path(recv_src_idx)
    host_reads = _may_read_on_host(x, fixed)
    error = _first_error(
        lambda: check_cached_dispatch_inputs(x, x_scales, send_pos, recv_src_idx, rank_prefix, cfg))
    sent = _sent_counts(send_pos >= 0, tp.hosts) if error is None else None
    exchanged = _exchange_counts(tp, cfg, op, x.dtype, -1, x.shape[-1] if x.dim() else -1, fixed, error, sent,
                                 host_reads, x.device)
    parts = [_as_movable(x)] if x_scales is None else [_as_movable(x), x_scales]
    num_rows = recv_src_idx.shape[0]
    if fixed:
        recv = _route_fixed(parts, send_pos, rank_prefix, exchanged.counts, num_rows, cfg, tp, op)
    else:
        recv = _route_exact(parts, send_pos, exchanged.host, num_rows, tp, op)
    recv_scales = recv[1] if x_scales is not None else x.new_empty((num_rows, 0), dtype=torch.float32)
    return recv[0].view(x.dtype), recv_scales


def combine(y, send_pos, recv_src_idx, rank_prefix, buffer):
    op = "ep.combine"
    buf = lookup(buffer)
    cfg, tp = buf.config, buf.pg_transport
    fixed = _takes_static_path(recv_src_idx)
    host_reads = _may_read_on_host(y, fixed)
    error = _first_error(
        lambda: check_combine_inputs(y, send_pos, recv_src_idx, rank_prefix, cfg))
    # The handle's counts travel in the exchange, so exact combine reads them on the host with it.
    sent = _handle_counts(rank_prefix, cfg.rank, tp.hosts) if error is None else None
    exchanged = _exchange_counts(tp, cfg, op, y.dtype, -1, y.shape[-1] if y.dim() else -1, fixed, error, sent,
                                 host_reads, y.device)
    y = y.contiguous()
    acc_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    out = torch.zeros(send_pos.shape[0], y.shape[1], dtype=acc_dtype, device=y.device)
    if fixed:
        back = _return_fixed(y, rank_prefix, cfg, tp, op)
        _sum_fixed(out, back, send_pos, rank_prefix, cfg)
    else:
        _combine_exact(out, y, send_pos, [row[:cfg.num_ranks] for row in exchanged.host], tp, op)
    return out.to(y.dtype)


# -- checks and the count exchange ------------------------------------------------------------------

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


def _capturing(t: torch.Tensor) -> bool:
    """Whether `t`'s stream is being captured into a CUDA graph: then nothing may be read on the host,
    and only the fixed-capacity mode's static exchanges run (test_transport simulates it on CPU)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _may_read_on_host(t: torch.Tensor, fixed: bool) -> bool:
    """Host reads of device values are free on CPU; on CUDA the fixed-capacity mode must make none."""
    return not fixed or (t.device.type == "cpu" and not _capturing(t))


def _takes_static_path(recv_src_idx) -> bool:
    """Whether combine and cached dispatch take the static exchange: only while a graph is being captured (it
    serves any handle and reads nothing on the host). Otherwise the exact exchange gives the same output from
    fewer rows, for a fixed-capacity handle too. (Whether a handle is padded cannot decide it: a rank that
    received exactly num_worst_tokens rows holds no padding while its peers do, and the ranks must agree.)"""
    return _capturing(recv_src_idx)


class Exchanged(NamedTuple):
    """What the count exchange gathered: row s is what rank s sends to each rank, then to each host."""
    counts: torch.Tensor                 # [R, R + H] int64 on the op's device
    host: Optional[List[List[int]]]      # the same read on the host, where the op may read (else None)


def _sent_counts(in_rank: torch.Tensor, hosts) -> torch.Tensor:
    """[R + H] int64: tokens this rank sends to each rank, then to each host."""
    per_host = in_rank.view(in_rank.shape[0], hosts.num_hosts, hosts.ranks_per_host).any(2)
    return torch.cat([in_rank.sum(0), per_host.sum(0)])


def _handle_counts(rank_prefix: torch.Tensor, rank: int, hosts) -> torch.Tensor:
    """[R + H] int64: what this rank sent to each rank in the handle's dispatch (row `rank` of the count
    matrix); the host columns, which combine does not use, are zero."""
    sent = (rank_prefix[rank + 1] - rank_prefix[rank]).long()
    return torch.cat([sent, sent.new_zeros(hosts.num_hosts)])


def _exchange_counts(tp, cfg, op, dtype, topk, width, fixed, error, sent, host_reads, device, flagged=None,
                     flagged_message=None) -> Exchanged:
    """All-gather [error, call header, `sent` (R + H counts; None: zeros)] and, with host_reads, check
    agreement: the op's one host read. `flagged`/`flagged_message`: see agreement.make_row/check."""
    if sent is None:
        sent = torch.zeros(cfg.num_ranks + tp.hosts.num_hosts, dtype=torch.int64, device=device)
    tp.arrive(op)
    call = agreement.Call(op, tp.calls, dtype, topk, width, cfg.num_experts, cfg.hidden, cfg.max_tokens_per_rank,
                          fixed)
    gathered = tp.all_gather(agreement.make_row(call, error, sent, flagged), op, host_reads)
    counts = gathered[:, agreement.HEADER:]
    if host_reads:
        return Exchanged(counts, agreement.check(gathered, error, op, cfg.rank, flagged_message))
    if error is not None:
        raise ValueError(error)
    return Exchanged(counts, None)


def refuse_call(buf, op: str, error: str, fixed: bool) -> None:
    """This rank's side of an `op` call that the Buffer refused before calling the op: the op's count exchange,
    carrying `error`, so every rank raises ValueError (this one `error`, the others naming this rank) and the
    ranks' call numbers stay in step."""
    cfg, tp = buf.config, buf.pg_transport
    _exchange_counts(tp, cfg, op, torch.float32, -1, -1, fixed, error, None, True, buf.device)


def _rank_prefix(counts: torch.Tensor) -> torch.Tensor:
    """[R+1, R] int32: rows that sources < s send to each rank; the last row holds the totals."""
    return torch.cat([counts.new_zeros(1, counts.shape[1]), counts.cumsum(0)]).int()


def _tokens_per_local_expert(recv_topk_idx, experts_per_rank: int, alignment: int) -> torch.Tensor:
    """[E/R] int32 entries per local expert, rounded up to `alignment` (no host read)."""
    bins = (recv_topk_idx + 1).flatten()  # bin 0 collects the -1 entries
    per_expert = torch.zeros(experts_per_rank + 1, dtype=torch.int64, device=recv_topk_idx.device)
    per_expert.index_add_(0, bins, torch.ones(bins.numel(), dtype=torch.int64, device=bins.device))
    per_expert = per_expert[1:]
    if alignment > 1:
        per_expert = (per_expert + alignment - 1) // alignment * alignment
    return per_expert.int()


# -- moving rows: exact splits (flat or hierarchical) -----------------------------------------------

def _as_movable(x: torch.Tensor) -> torch.Tensor:
    """FP8 rows travel as bytes: gloo and several CPU copy kernels have no float8 types."""
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def _ranges(starts: List[int], lengths: List[int], device) -> torch.Tensor:
    """The concatenation of arange(s, s + n) for each (s, n)."""
    total = sum(lengths)
    if total == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    lengths_t = torch.tensor(lengths, device=device)
    offsets = torch.tensor(starts, device=device) - (torch.cumsum(lengths_t, 0) - lengths_t)
    return torch.repeat_interleave(offsets, lengths_t, output_size=total) + torch.arange(total, device=device)


def _exchange(parts: List[torch.Tensor], send_counts: List[int], recv_counts: List[int], tp, op,
              out_rows: Optional[int] = None) -> List[torch.Tensor]:
    """Each part's rows, grouped by destination rank by `send_counts`, to their ranks (all parts in flight
    at once); returns the parts as received, grouped by source rank, padded with zero rows to `out_rows`."""
    received = sum(recv_counts)
    outs, works = [], []
    for part in parts:
        out = part.new_empty((max(out_rows or 0, received), part.shape[1]))
        out[received:].zero_()
        works.append(tp.start_all_to_all(out[:received], part, recv_counts, send_counts))
        outs.append(out)
    tp.wait(works, op)
    return outs


def _nonzero(mask: torch.Tensor, total: int) -> torch.Tensor:
    """mask.nonzero() [total, 2] where `total`, the number of set entries, is known from the count exchange:
    nonzero_static, which unlike nonzero() does not sync with the host to size its output."""
    if total == 0:  # (nonzero_static of an empty CUDA tensor crashes in some torch releases)
        return torch.zeros(0, 2, dtype=torch.int64, device=mask.device)
    return torch.nonzero_static(mask, size=total)


def _grouped_by_destination(sent: torch.Tensor, total: int) -> torch.Tensor:
    """[total] int64: the rows r with sent[r, d], grouped by column d ascending, ascending within a group
    (`total` set entries)."""
    return _nonzero(sent.t(), total)[:, 1]


def _route_exact(parts, send_pos, counts, out_rows, tp, op) -> List[torch.Tensor]:
    """Deliver row t of every part to each rank d with send_pos[t, d] >= 0, in (source rank, token) order.
    `counts`: the exchanged count matrix, read on the host."""
    if tp.hosts.hierarchical:
        return _route_hierarchical(parts, send_pos, counts, out_rows, tp, op)
    me, num_ranks = tp.rank, tp.num_ranks
    send_counts, recv_counts = counts[me][:num_ranks], [row[me] for row in counts]
    order = _grouped_by_destination(send_pos >= 0, sum(send_counts))  # tokens grouped by destination
    if not _own_block_at_an_end(me, num_ranks):
        return _exchange([p.index_select(0, order) for p in parts], send_counts, recv_counts, tp, op, out_rows)
    # The rows for this rank stay out of the all-to-all: gathered straight into their place in the output
    # while the other rows travel. They lead (rank 0) or end (last rank) both the send and receive orders.
    received, own = sum(recv_counts), recv_counts[me]
    own_tokens = order[:own] if me == 0 else order[order.shape[0] - own:]
    others = order[own:] if me == 0 else order[:order.shape[0] - own]
    own_rows = slice(0, own) if me == 0 else slice(received - own, received)
    travel_rows = slice(own, received) if me == 0 else slice(0, received - own)
    send_counts, recv_counts = _without(send_counts, me), _without(recv_counts, me)
    outs, works = [], []
    for part in parts:
        out = part.new_empty((max(out_rows or 0, received), part.shape[1]))
        out[received:].zero_()
        works.append(tp.start_all_to_all(out[travel_rows], part.index_select(0, others), recv_counts, send_counts))
        torch.index_select(part, 0, own_tokens, out=out[own_rows])
        outs.append(out)
    tp.wait(works, op)
    return outs


def _own_block_at_an_end(me: int, num_ranks: int) -> bool:
    """Whether this rank's own rows sit at the start or end of what it receives (and of what it returns in
    combine), so the all-to-all can skip them and still read and write one contiguous span."""
    return num_ranks > 1 and me in (0, num_ranks - 1)


def _without(counts: List[int], me: int) -> List[int]:
    return [0 if r == me else c for r, c in enumerate(counts)]


def _route_hierarchical(parts, send_pos, counts, out_rows, tp, op) -> List[torch.Tensor]:
    """Stage 1: one copy per destination host, to the rank there with our local index, carrying the
    token's final row on each rank of that host. Stage 2: that rank forwards it inside the host."""
    hosts, me, num_ranks = tp.hosts, tp.rank, tp.num_ranks
    num_hosts, per_host = hosts.num_hosts, hosts.ranks_per_host
    my_host, my_local = hosts.host(me), hosts.local(me)
    final_pos = send_pos.view(send_pos.shape[0], num_hosts, per_host)

    hits = _nonzero((final_pos >= 0).any(2).t(), sum(counts[me][num_ranks:]))  # (destination host, token)
    tokens, dest_hosts = hits[:, 1], hits[:, 0]
    stage1 = [p.index_select(0, tokens) for p in parts] + [final_pos[tokens, dest_hosts]]
    send1, recv1 = [0] * num_ranks, [0] * num_ranks
    for h in range(num_hosts):
        peer = h * per_host + my_local
        send1[peer] = counts[me][num_ranks + h]
        recv1[peer] = counts[peer][num_ranks + my_host]
    *arrived, forward_pos = _exchange(stage1, send1, recv1, tp, op)

    # What this forwarder passes to local rank l: the tokens its sources (h, my_local) send to (my_host, l).
    send2, recv2 = [0] * num_ranks, [0] * num_ranks
    for local in range(per_host):
        peer = my_host * per_host + local
        send2[peer] = sum(counts[h * per_host + my_local][peer] for h in range(num_hosts))
        recv2[peer] = sum(counts[h * per_host + local][me] for h in range(num_hosts))
    hits = _nonzero((forward_pos >= 0).t(), sum(send2))  # (local destination, arrived row)
    rows, dest_locals = hits[:, 1], hits[:, 0]
    stage2 = [p.index_select(0, rows) for p in arrived] + [forward_pos[rows, dest_locals].unsqueeze(1)]
    *delivered, positions = _exchange(stage2, send2, recv2, tp, op)

    # Rows from one forwarder come ordered by (source host, token); put them at their final rows.
    received = positions.shape[0]
    positions = positions.squeeze(1).long()
    outs = []
    for part in delivered:
        out = part.new_zeros((max(out_rows or 0, received), part.shape[1]))
        out.index_copy_(0, positions, part)
        outs.append(out)
    return outs


def _return_hierarchical(y, counts, tp, op) -> torch.Tensor:
    """Combine's way back, through the same forwarders: rows go first to the rank of this host with the
    source's local index, then across hosts to the source. Rows are not summed on the way, so the
    source sums them in the same order as flat and the result is bitwise the same."""
    hosts, me = tp.hosts, tp.rank
    num_hosts, per_host = hosts.num_hosts, hosts.ranks_per_host
    my_host, my_local = hosts.host(me), hosts.local(me)
    num_ranks = tp.num_ranks
    prefix = [0]
    for s in range(num_ranks):
        prefix.append(prefix[-1] + counts[s][me])

    # Stage A (inside the host): to forwarder l go the rows of sources (h, l), h ascending.
    sources = [h * per_host + local for local in range(per_host) for h in range(num_hosts)]
    order = _ranges([prefix[s] for s in sources], [counts[s][me] for s in sources], y.device)
    send_a, recv_a = [0] * num_ranks, [0] * num_ranks
    for local in range(per_host):
        peer = my_host * per_host + local
        send_a[peer] = sum(counts[h * per_host + local][me] for h in range(num_hosts))
        recv_a[peer] = sum(counts[h * per_host + my_local][peer] for h in range(num_hosts))
    (arrived,) = _exchange([y.index_select(0, order)], send_a, recv_a, tp, op)

    # Stage B (between hosts): to source (h, my_local) go its rows from each local rank l', l' ascending.
    block = {}  # (sender local l', source host h) -> (start, length) in `arrived`
    start = 0
    for sender in range(per_host):
        for h in range(num_hosts):
            length = counts[h * per_host + my_local][my_host * per_host + sender]
            block[sender, h] = (start, length)
            start += length
    spans = [block[sender, h] for h in range(num_hosts) for sender in range(per_host)]
    order = _ranges([s for s, _ in spans], [n for _, n in spans], y.device)
    send_b, recv_b = [0] * num_ranks, [0] * num_ranks
    for h in range(num_hosts):
        peer = h * per_host + my_local
        send_b[peer] = sum(block[sender, h][1] for sender in range(per_host))
        recv_b[peer] = sum(counts[me][h * per_host + local] for local in range(per_host))
    return _exchange([arrived.index_select(0, order)], send_b, recv_b, tp, op)[0]


def _combine_exact(out, y, send_pos, counts, tp, op) -> None:
    """out[t] += each row coming back for t, one destination rank at a time in ascending order (the
    contract's fixed fp32 summation order). Flat, on a rank whose own rows lie at an end of y, those rows
    skip the all-to-all and are added (rank 0) or converted to fp32 (last rank) while the others travel."""
    me, num_ranks = tp.rank, tp.num_ranks
    back_counts = counts[me]
    tokens = _grouped_by_destination(send_pos >= 0, sum(back_counts)).split(back_counts)
    from_src = [counts[s][me] for s in range(num_ranks)]
    if tp.hosts.hierarchical or not _own_block_at_an_end(me, num_ranks):
        back = _return_hierarchical(y, counts, tp, op) if tp.hosts.hierarchical else \
            _exchange([y[:sum(from_src)]], from_src, back_counts, tp, op)[0]
        chunks = back.split(back_counts)
        for d in range(num_ranks):
            _add_rows(out, tokens[d], chunks[d])
        return
    start = sum(from_src[:me])
    own = y[start:start + from_src[me]]
    travel = y[from_src[me]:sum(from_src)] if me == 0 else y[:start]
    back = y.new_empty((sum(back_counts) - back_counts[me], y.shape[1]))
    work = tp.start_all_to_all(back, travel, _without(back_counts, me), _without(from_src, me))
    if me == 0:
        _add_rows(out, tokens[0], own)
        tp.wait([work], op)
        for d, rows in enumerate(back.split(back_counts[1:]), start=1):
            _add_rows(out, tokens[d], rows)
    else:
        own = own.to(out.dtype)
        tp.wait([work], op)
        for d, rows in enumerate(back.split(back_counts[:-1])):
            _add_rows(out, tokens[d], rows)
        _add_rows(out, tokens[me], own)


def _add_rows(out, tokens, rows) -> None:
    if rows.shape[0]:
        out.index_add_(0, tokens, rows.to(out.dtype))


# -- moving rows: fixed capacity (static splits, no host reads) -------------------------------------

def _route_fixed(parts, send_pos, rank_prefix, counts, num_rows, cfg, tp, op) -> List[torch.Tensor]:
    """Like _route_exact, but every rank sends a block of max_tokens_per_rank rows to every rank (rows
    past a rank's count are padding), and the receiver compacts the valid rows into `num_rows`."""
    if tp.hosts.hierarchical:
        return _route_fixed_hierarchical(parts, send_pos, counts, num_rows, cfg, tp, op)
    num_ranks, slot, me = cfg.num_ranks, cfg.max_tokens_per_rank, cfg.rank
    device = send_pos.device
    sent = send_pos >= 0
    # sender: token t goes to row (its place among the tokens for d) of block d; unsent tokens to a spare row
    place = send_pos.long() - rank_prefix[me].long()
    block_start = torch.arange(num_ranks, device=device) * slot
    dest_row = torch.where(sent, block_start + place, num_ranks * slot)
    # receiver: row j of block s is valid if j < count(s -> me); it belongs at rank_prefix[s, me] + j
    j = torch.arange(slot, device=device)
    incoming = (rank_prefix[1:, me] - rank_prefix[:-1, me]).unsqueeze(1)
    final = rank_prefix[:-1, me].unsqueeze(1).long() + j
    final = torch.where((j < incoming) & (final < num_rows), final, num_rows).flatten()
    outs = []
    for part in parts:
        send = _static_blocks(lambda d: part, dest_row, slot)
        recv = torch.empty_like(send)
        tp.all_to_all(recv, send, None, None, op)
        out = part.new_zeros((num_rows + 1, part.shape[1]))
        out.index_copy_(0, final, recv)
        outs.append(out[:num_rows])
    return outs


def _static_blocks(rows_for_block: Callable[[int], torch.Tensor], dest_row, slot: int) -> torch.Tensor:
    """[B * slot, C]: row t of rows_for_block(b) at dest_row[t, b] for each of the B blocks; a dest_row of
    B * slot drops the row, and unfilled rows hold garbage the receiver never reads."""
    num_blocks = dest_row.shape[1]
    first = rows_for_block(0)
    send = first.new_empty((num_blocks * slot + 1, first.shape[1]))
    for b in range(num_blocks):
        send.index_copy_(0, dest_row[:, b], rows_for_block(b))
    return send[:-1]


def _route_fixed_hierarchical(parts, send_pos, counts, num_rows, cfg, tp, op) -> List[torch.Tensor]:
    """_route_hierarchical with static splits. Stage 1: a block of max_tokens_per_rank rows to the rank
    with our local index on every host, each token at its place among our tokens for that host. Stage 2:
    the forwarder passes every arrived row (padding marked by position -1) to each rank of its host with
    that rank's final position; receivers write the rows with a position there. Nothing is read on the
    host, and the rows land where the exact path puts them."""
    hosts, me, slot = tp.hosts, cfg.rank, cfg.max_tokens_per_rank
    num_hosts, per_host = hosts.num_hosts, hosts.ranks_per_host
    my_host, my_local = hosts.host(me), hosts.local(me)
    device = send_pos.device
    final_pos = send_pos.view(send_pos.shape[0], num_hosts, per_host)
    host_hit = (final_pos >= 0).any(2)  # [T, H]
    place = host_hit.long().cumsum(0) - 1
    dest_row = torch.where(host_hit, torch.arange(num_hosts, device=device) * slot + place, num_hosts * slot)
    # stage 1: a block to (h, my_local) for every host h, ascending; positions travel as one more part
    blocks = [_static_blocks(lambda h, p=p: p, dest_row, slot) for p in parts]
    blocks.append(_static_blocks(lambda h: final_pos[:, h], dest_row, slot))
    peers1 = [slot if hosts.local(r) == my_local else 0 for r in range(cfg.num_ranks)]
    arrived = []
    for block in blocks:
        recv = torch.empty_like(block)
        tp.all_to_all(recv, block, peers1, peers1, op)
        arrived.append(recv)
    *arrived, forward_pos = arrived
    sources = torch.arange(num_hosts, device=device) * per_host + my_local
    valid = torch.arange(slot, device=device) < counts[sources, cfg.num_ranks + my_host].unsqueeze(1)
    forward_pos = torch.where(valid.flatten().unsqueeze(1), forward_pos, -1)  # [H * slot, L]

    # stage 2: every arrived row to every rank of this host, with that rank's final position (or -1)
    peers2 = [num_hosts * slot if hosts.host(r) == my_host else 0 for r in range(cfg.num_ranks)]
    positions = torch.empty(per_host * num_hosts * slot, 1, dtype=forward_pos.dtype, device=device)
    tp.all_to_all(positions, forward_pos.t().reshape(-1, 1).contiguous(), peers2, peers2, op)
    positions = positions.squeeze(1).long()
    final = torch.where((positions >= 0) & (positions < num_rows), positions, num_rows)
    outs = []
    for part in arrived:
        recv = part.new_empty((per_host * num_hosts * slot, part.shape[1]))
        tp.all_to_all(recv, part.repeat(per_host, 1), peers2, peers2, op)
        out = part.new_zeros((num_rows + 1, part.shape[1]))
        out.index_copy_(0, final, recv)
        outs.append(out[:num_rows])
    return outs


def _return_fixed(y, rank_prefix, cfg, tp, op) -> torch.Tensor:
    """[R * max_tokens_per_rank + 1, H]: block d holds, in token order, the rows rank d returns to this rank;
    the last row is zeros."""
    num_ranks, slot, me = cfg.num_ranks, cfg.max_tokens_per_rank, cfg.rank
    j = torch.arange(slot, device=y.device)
    incoming = (rank_prefix[1:, me] - rank_prefix[:-1, me]).unsqueeze(1)
    rows = rank_prefix[:-1, me].unsqueeze(1).long() + j
    rows = torch.where(j < incoming, rows, 0).flatten()  # past the count: any row, the source never reads it
    back = y.new_empty((num_ranks * slot + 1, y.shape[1]))
    back[-1].zero_()  # the row _sum_fixed adds where a rank holds no copy of a token
    # (an exact handle of a rank that received nothing, captured in a graph: y has no row to point at)
    send = y.index_select(0, rows) if y.shape[0] else y.new_zeros((num_ranks * slot, y.shape[1]))
    tp.all_to_all(back[:-1], send, None, None, op)
    return back


def _sum_fixed(out, back, send_pos, rank_prefix, cfg) -> None:
    """As _combine_exact from the static blocks; adding a zero row where d holds no copy of t leaves out[t]
    bitwise unchanged (out starts at +0.0), so the sums equal the exact mode's."""
    num_ranks, slot, me = cfg.num_ranks, cfg.max_tokens_per_rank, cfg.rank
    for d in range(num_ranks):
        rows = torch.where(send_pos[:, d] >= 0, d * slot + send_pos[:, d].long() - rank_prefix[me, d].long(),
                           num_ranks * slot)
        out += back.index_select(0, rows).to(out.dtype)


# -- registration -------------------------------------------------------------------------------------

# The ProcessGroup transport's ops: ep.* on CPU tensors, and pg_* (which the CUDA kernels of ep.dispatch,
# ep.cached_dispatch and ep.combine call for a buffer without NVLink state) on CPU and CUDA tensors.
# torch.library.impl, not register_kernel: the latter wraps the kernel in dynamo.disable, whose first call
# imports torch._dynamo (~1.5 s). Compiled graphs already call kernels with dynamo off.
torch.library.impl("ep::get_dispatch_layout", "cpu", get_dispatch_layout)
for _name, _fn in (("dispatch", dispatch), ("cached_dispatch", cached_dispatch), ("combine", combine)):
    torch.library.impl(f"ep::{_name}", "cpu", _fn)
    torch.library.impl(f"ep::pg_{_name}", ("cpu", "cuda"), _fn)
