"""Calls that go wrong across ranks, as a table: ranks that disagree on a call, a rank that never makes
it, a rank that destroyed its Buffer. Every path must raise on the ranks that wait, naming the op and
the other rank, within timeout_s, and leave the process able to build a new Buffer.

`run_scenario(name, device, timeout_s)` runs one scenario on every rank of a 2-rank pool: on CPU
(gloo; test/test_contract.py) or CUDA (NVLink kernels; test/test_reliability_gpu.py). On CUDA an op
that fails on the device returns, and its error comes from Buffer.synchronize() or the next op, so
every failing call here is followed by synchronize(): both paths are held to the same check.
"""
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

import torch_ep
from cases import _device, dispatch_combine_roundtrip
from reference import make_routing

HIDDEN, EXPERTS, TOKENS, K = 256, 8, 16, 2


@dataclass(frozen=True)
class Scenario:
    name: str
    calls: Callable                 # (buffer, routing, rank) -> None: what this rank calls after the setup
    words: Dict[int, List[str]]     # rank -> substrings its error must hold; a rank not listed must not raise
    waits: bool = False             # the error comes from a wait for a rank that never calls: after timeout_s
    setup: str = "dispatch"         # "dispatch", "low_latency_dispatch" (every rank, before `calls`) or "none"
    destroy_early: List[int] = field(default_factory=list)  # ranks that destroy the buffer instead of calling


def _cached_or_combine(buffer, got, rank):
    """Rank 0 runs cached_dispatch, rank 1 combine: the same call number, another op."""
    if rank == 0:
        buffer.dispatch(got.x, handle=got.handle)
    else:
        buffer.combine(got.recv_x, got.handle)


def _low_latency_dispatch_or_combine(buffer, got, rank):
    """Rank 0 runs low_latency_dispatch again, rank 1 low_latency_combine."""
    if rank == 0:
        buffer.low_latency_dispatch(got.x, got.idx, got.w)
    else:
        buffer.low_latency_combine(got.recv_x, got.handle)


def _combine(y_of):
    """combine with rank 1's y made by y_of(y)."""
    def calls(buffer, got, rank):
        buffer.combine(y_of(got.recv_x) if rank == 1 else got.recv_x, got.handle)
    return calls


def _cached_dispatch_narrow(buffer, got, rank):
    """cached_dispatch of rows half as wide on rank 1."""
    buffer.dispatch(got.x[:, :HIDDEN // 2] if rank == 1 else got.x, handle=got.handle)


def _rank0(call):
    """Only rank 0 calls; rank 1 skips the call."""
    def calls(buffer, got, rank):
        if rank == 0:
            call(buffer, got)
    return calls


SCENARIOS = [
    Scenario("combine_vs_cached_dispatch", _cached_or_combine,
             {0: ["disagree", "op", "ep.cached_dispatch", "ep.combine", "rank 1"],
              1: ["disagree", "op", "ep.cached_dispatch", "ep.combine", "rank 0"]}),
    Scenario("combine_row_width", _combine(lambda y: y[:, :HIDDEN // 2]),
             {0: ["ep.combine", "disagree", "row width", "rank 1"], 1: ["ep.combine", "disagree", "row width", "rank 0"]}),
    Scenario("combine_dtype", _combine(lambda y: y.float()),
             {0: ["ep.combine", "disagree", "dtype", "rank 1"], 1: ["ep.combine", "disagree", "dtype", "rank 0"]}),
    Scenario("cached_dispatch_row_width", _cached_dispatch_narrow,
             {0: ["ep.cached_dispatch", "disagree", "row width", "rank 1"],
              1: ["ep.cached_dispatch", "disagree", "row width", "rank 0"]}),
    Scenario("low_latency_dispatch_vs_combine", _low_latency_dispatch_or_combine,
             {0: ["disagree", "op", "ep.low_latency_dispatch", "ep.low_latency_combine", "rank 1"],
              1: ["disagree", "op", "ep.low_latency_dispatch", "ep.low_latency_combine", "rank 0"]},
             setup="low_latency_dispatch"),
    Scenario("rank_skips_combine", _rank0(lambda buffer, got: buffer.combine(got.recv_x, got.handle)),
             {0: ["ep.combine", "rank 1"]}, waits=True),
    Scenario("rank_skips_no_host_sync_dispatch",
             _rank0(lambda buffer, got: buffer.dispatch(got.x, got.idx, got.w, num_worst_tokens=2 * TOKENS)),
             {0: ["ep.dispatch", "rank 1"]}, waits=True, setup="none"),
    Scenario("rank_destroyed_its_buffer", _rank0(lambda buffer, got: buffer.dispatch(got.x, got.idx, got.w)),
             {0: ["ep.dispatch", "rank 1"]}, waits=True, setup="none", destroy_early=[1]),
    Scenario("rank_skips_low_latency_combine",
             _rank0(lambda buffer, got: buffer.low_latency_combine(got.recv_x, got.handle)),
             {0: ["ep.low_latency_combine", "rank 1"]}, waits=True, setup="low_latency_dispatch"),
]
BY_NAME = {s.name: s for s in SCENARIOS}


class _Call:
    """This rank's inputs on the device and, after the setup, the dispatch's outputs."""

    def __init__(self, dev):
        r = make_routing(dist.get_rank(), TOKENS, HIDDEN, EXPERTS, K, seed=3, num_ranks=dist.get_world_size())
        self.x, self.idx, self.w = r.x.to(dev), r.topk_idx.to(dev), r.topk_weights.to(dev)
        self.recv_x = self.handle = None

    def set_up(self, buffer, setup: str) -> None:
        if setup == "dispatch":
            got = buffer.dispatch(self.x, self.idx, self.w)
        elif setup == "low_latency_dispatch":
            got = buffer.low_latency_dispatch(self.x, self.idx, self.w)
        else:
            return
        self.recv_x, self.handle = got.recv_x, got.handle


def _expect_refusal(fn, name: str) -> None:
    try:
        fn()
    except (RuntimeError, ValueError):
        return
    raise AssertionError(f"{name}: the buffer accepted a call after it failed")


def run_scenario(name: str, device: str, timeout_s: float):
    """This rank's side of scenario `name`; returns (error type name or None, error text, seconds from the
    failing call to its error), then checks that a new Buffer works."""
    scenario, rank, dev = BY_NAME[name], dist.get_rank(), _device(device)
    buffer = torch_ep.Buffer(None, EXPERTS, HIDDEN, TOKENS, device=device, timeout_s=timeout_s,
                             low_latency=scenario.setup == "low_latency_dispatch")
    call = _Call(dev)
    call.set_up(buffer, scenario.setup)
    if device == "cuda":
        buffer.synchronize()  # the setup is done everywhere: the clock below times the failing call only
    outcome = (None, "", 0.0)
    if rank in scenario.destroy_early:
        buffer.destroy()
    else:
        start = time.monotonic()
        try:
            scenario.calls(buffer, call, rank)
            buffer.synchronize()
        except (RuntimeError, ValueError) as exc:
            outcome = (type(exc).__name__, str(exc), time.monotonic() - start)
        if outcome[0] is not None:  # the buffer refuses the call again; one a rank waited for stays failed
            _expect_refusal(lambda: (scenario.calls(buffer, call, rank), buffer.synchronize()), name)
            if scenario.waits:
                _expect_refusal(buffer.synchronize, name)
        buffer.destroy()
    dispatch_combine_roundtrip(device, [TOKENS, TOKENS // 2], HIDDEN, EXPERTS, K, seed=4)
    return outcome


def check_outcomes(name: str, outcomes, timeout_s: float, error_types) -> None:
    """Ranks in the scenario's `words` raised one of `error_types` holding every word, in time; the others
    did not raise."""
    scenario = BY_NAME[name]
    for rank, (kind, text, elapsed) in enumerate(outcomes):
        if rank not in scenario.words:
            assert kind is None, f"rank {rank} raised {kind}: {text}"
            continue
        assert kind in error_types, f"rank {rank}: {kind}: {text}"
        for word in scenario.words[rank]:
            assert word in text, f"rank {rank}: {text!r} lacks {word!r}"
        limit = 2 * timeout_s + 5.0 if scenario.waits else timeout_s
        assert elapsed < limit, f"rank {rank} raised after {elapsed:.1f} s (limit {limit} s): {text}"
