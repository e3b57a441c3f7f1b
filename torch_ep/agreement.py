"""What the ranks of one op call must agree on, carried in the count exchange the op does anyway.

Each rank all-gathers one int64 row: a header describing its call (below), then its counts.
From the gathered rows every rank reaches the same verdict before any data moves: a rank that
rejected its own input, or ranks that disagree (a different op, dtype, top-k, hidden size, buffer
shape, capacity mode, or call number), make every rank raise ValueError naming field and ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

OPS = ("ep.dispatch", "ep.cached_dispatch", "ep.combine", "ep.low_latency_dispatch", "ep.low_latency_cached_dispatch",
       "ep.low_latency_combine")
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn)

# Header columns after the error flag, checked in this order (the buffer's shape before the call's
# arguments, as a different buffer explains different arguments).
FIELDS = ("op", "call number", "num_experts", "buffer hidden", "max_tokens_per_rank", "dtype", "top-k",
          "row width", "fixed capacity")
HEADER = 1 + len(FIELDS)


@dataclass(frozen=True)
class Call:
    """One rank's description of the op call it is making."""
    op: str
    number: int
    dtype: torch.dtype
    topk: int            # -1 where the op takes no top-k
    width: int           # columns of the rows moved (x's hidden, y's width)
    num_experts: int
    hidden: int
    max_tokens_per_rank: int
    fixed_capacity: bool

    def values(self):
        dtype = DTYPES.index(self.dtype) if self.dtype in DTYPES else -1
        return (OPS.index(self.op), self.number, self.num_experts, self.hidden, self.max_tokens_per_rank, dtype,
                self.topk, self.width, int(self.fixed_capacity))


def make_row(call: Call, error: Optional[str], counts: torch.Tensor,
             flagged: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The int64 row this rank contributes: [error flag, header..., counts...], on counts' device.

    `flagged`: a 0-d count, computed on the device, of input entries this rank rejects (bad expert
    ids); it is added to the error flag, so the check travels in this row and is read with it instead
    of costing a host read of its own."""
    values = (int(error is not None),) + call.values()
    row = torch.empty(HEADER + counts.shape[0], dtype=torch.int64, device=counts.device)
    if counts.is_cuda and torch.cuda.is_current_stream_capturing():
        for column, value in enumerate(values):  # fill kernels: a graph cannot capture a copy from the host
            row[column].fill_(value)
    else:  # one asynchronous copy from pinned memory instead of a kernel per column
        header = torch.tensor(values, dtype=torch.int64)
        row[:HEADER].copy_(header.pin_memory() if counts.is_cuda else header, non_blocking=True)
    row[HEADER:] = counts
    if flagged is not None:
        row[0] += flagged
    return row


def _shown(field: str, value: int) -> str:
    if field == "op":
        return OPS[value]
    if field == "dtype":
        return str(DTYPES[value]) if 0 <= value < len(DTYPES) else "unsupported"
    if field == "fixed capacity":
        return "num_worst_tokens > 0" if value else "num_worst_tokens = 0"
    return str(value)


def verdict(rows: List[List[int]], error: Optional[str], op: str) -> Optional[str]:
    """The message every rank raises for these gathered rows (read on the host), or None if the call may
    proceed."""
    if error is not None:
        return error
    bad = [r for r, row in enumerate(rows) if row[0]]
    if bad:
        return f"{op}: rank {bad[0]} rejected its input (its own error names the argument)"
    for column, field in enumerate(FIELDS, start=1):
        values = [row[column] for row in rows]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {r}: {_shown(field, v)}" for r, v in enumerate(values))
            return f"{op}: ranks disagree on the {field} of this call ({per_rank})"
    return None


def check(gathered: torch.Tensor, error: Optional[str], op: str, rank: int,
          flagged_message: Optional[Callable[[], Optional[str]]] = None) -> List[List[int]]:
    """Raise ValueError on every rank if any rank rejected its input or the calls disagree; else the
    gathered counts, read on the host with the header in one read. `flagged_message()` names this rank's
    flagged entries (called only when make_row's `flagged` was non-zero here)."""
    rows = gathered.tolist()
    if error is None and rows[rank][0] and flagged_message is not None:
        error = flagged_message()
    message = verdict(rows, error, op)
    if message is not None:
        raise ValueError(message)
    return [row[HEADER:] for row in rows]
