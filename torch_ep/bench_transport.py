"""Benchmark of the ProcessGroup transport, run through `python -m torch_ep.bench`:

    torchrun --nproc-per-node 2 -m torch_ep.bench --device cpu                 # CPU path over gloo
    torchrun --nproc-per-node 2 -m torch_ep.bench --transports                 # GPUs: each transport

`--device cpu`: torch_ep's dispatch and combine (exact and fixed-capacity modes) against a naive
all_to_all_single implementation of the same (count exchange + permute + all-to-all; all-to-all
back + rank-ordered fp32 index_add_), outputs checked equal first, in one run.
`--transports` (CUDA): the same dispatch + combine with transport="process_group" (NCCL),
against the plain NCCL path and against the NVLink kernels (transport="nvlink").
Times: wall clock (CPU) or CUDA events (GPU), median over iterations, the slowest rank's.
"""
import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import torch_ep

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def timing_events():
    """A (start, end) pair of timing events to record again and again. torch creates an event's CUDA event at
    its first record, which took 17-37 us of host time on the device's hosts (2026-11-27): recorded there
    after a call that waits on the host (the exact-mode dispatch), it added that to the call's time."""
    events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for event in events:
        event.record()
    events[1].synchronize()
    return events


def _elapsed_ms(fn, device: torch.device, events) -> float:
    if device.type == "cuda":
        start, end = events
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def median_ms(fns: dict, warmup: int, iters: int, device: torch.device) -> dict:
    """Median time in ms of each fn, the slowest rank's. The fns take turns within every iteration, so a
    busy machine slows them alike; ranks start each call together."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    events = timing_events() if device.type == "cuda" else None
    for _ in range(iters):
        for name, fn in fns.items():
            dist.barrier()
            times[name].append(_elapsed_ms(fn, device, events))
    medians = torch.tensor([statistics.median(t) for t in times.values()], device=device)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    return dict(zip(fns, medians.tolist()))


def routing(num_tokens, num_experts, k, seed, device):
    g = torch.Generator().manual_seed(seed)
    weights, idx = torch.rand(num_tokens, num_experts, generator=g).topk(k, dim=1)
    return idx.to(device), weights.float().to(device)


class NaivePath:
    """dispatch + combine with all_to_all_single and the permutes it needs, nothing else."""

    def __init__(self, topk_idx, num_experts, world):
        owner = topk_idx // (num_experts // world)
        in_rank = torch.stack([(owner == d).any(1) for d in range(world)], dim=1)
        self.tokens = [in_rank[:, d].nonzero().squeeze(1) for d in range(world)]
        self.order = torch.cat(self.tokens)
        self.send_counts = in_rank.sum(0).tolist()

    def dispatch(self, x):
        counts = torch.tensor(self.send_counts, device=x.device)  # a real caller exchanges counts every step
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts)
        self.recv_counts = recv_counts.tolist()
        out = x.new_empty((sum(self.recv_counts), x.shape[1]))
        dist.all_to_all_single(out, x[self.order], self.recv_counts, self.send_counts)
        return out

    def combine(self, y, num_tokens):
        back = y.new_empty((sum(self.send_counts), y.shape[1]))
        dist.all_to_all_single(back, y, self.send_counts, self.recv_counts)
        out = torch.zeros(num_tokens, y.shape[1], device=y.device, dtype=torch.float32)
        for tokens, rows in zip(self.tokens, back.split(self.send_counts)):
            out.index_add_(0, tokens, rows.float())  # ascending rank, as torch_ep sums
        return out.to(y.dtype)


def _timed_pair(buffer, naive, x, idx, weights, warmup, iters, num_worst_tokens=0):
    """ms of (dispatch, combine, both) for torch_ep and for the naive path, outputs checked equal first."""
    device = x.device
    got = buffer.dispatch(x, idx, weights, num_worst_tokens=num_worst_tokens)
    n = int(got.handle.num_recv_tokens)
    assert torch.equal(got.recv_x[:n], naive.dispatch(x)), "dispatch differs from the naive path"
    y = got.recv_x * 2
    assert torch.equal(buffer.combine(y, got.handle), naive.combine(y[:n], x.shape[0])), \
        "combine differs from the naive path"

    def ours():
        r = buffer.dispatch(x, idx, weights, num_worst_tokens=num_worst_tokens)
        buffer.combine(r.recv_x, r.handle)

    def theirs():
        naive.combine(naive.dispatch(x), x.shape[0])

    return median_ms({
        "dispatch": lambda: buffer.dispatch(x, idx, weights, num_worst_tokens=num_worst_tokens),
        "naive_dispatch": lambda: naive.dispatch(x),
        "combine": lambda: buffer.combine(y, got.handle),
        "naive_combine": lambda: naive.combine(y[:n], x.shape[0]),
        "both": ours,
        "naive_both": theirs,
    }, warmup, iters, device)


def bench_cpu(args):
    """CPU path against the naive all_to_all_single version; prints one table (rank 0)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    rows = []
    for tokens in args.tokens:
        idx, weights = routing(tokens, args.experts, args.topk, seed=rank, device=device)
        naive = NaivePath(idx, args.experts, world)
        for name in args.dtypes:
            x = torch.randn(tokens, args.hidden, generator=torch.Generator().manual_seed(rank)).to(DTYPES[name])
            with torch_ep.Buffer(None, args.experts, args.hidden, tokens, device="cpu") as buffer:
                exact = _timed_pair(buffer, naive, x, idx, weights, args.warmup, args.iters)
                fixed = _timed_pair(buffer, naive, x, idx, weights, args.warmup, args.iters,
                                    num_worst_tokens=tokens * world + 8)  # + 8: always padded
            rows.append((tokens, name, exact, fixed))
    if rank == 0:
        print(f"\nCPU path vs naive all_to_all_single: {world} ranks, hidden {args.hidden}, top-{args.topk} of "
              f"{args.experts}, torch {torch.__version__}, {torch.get_num_threads()} threads/rank")
        print(f"{'tokens':>7} {'dtype':<5} {'op':<9}{'torch_ep ms':>12}{'naive ms':>10}{'naive/ours':>11}"
              f"{'fixed-cap ms':>13}")
        for tokens, name, exact, fixed in rows:
            for op in ("dispatch", "combine", "both"):
                print(f"{tokens:>7} {name:<5} {op:<9}{exact[op]:>12.2f}{exact['naive_' + op]:>10.2f}"
                      f"{exact['naive_' + op] / exact[op]:>11.2f}{fixed[op]:>13.2f}")
    return rows


def bench_transports(args):
    """CUDA: dispatch + combine over the NCCL transport, against the plain NCCL path and the NVLink kernels."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    for tokens in args.tokens:
        idx, weights = routing(tokens, args.experts, args.topk, seed=rank, device=device)
        naive = NaivePath(idx, args.experts, world)
        x = torch.randn(tokens, args.hidden, device=device).to(torch.bfloat16)
        t = {}
        layouts = [("process_group", None), ("nvlink", None)]
        if args.ranks_per_host:
            layouts.append(("process_group", args.ranks_per_host))
        for transport, per_host in layouts:
            start = time.perf_counter()
            with torch_ep.Buffer(None, args.experts, args.hidden, tokens, transport=transport,
                                 ranks_per_host=per_host) as buffer:
                t[transport, per_host] = _timed_pair(buffer, naive, x, idx, weights, args.warmup, args.iters)
            if rank == 0:  # where a slow row spends its time, even if a step limit cuts the run short
                print(f"[{tokens} tokens, {transport}{f' ({per_host} ranks/host)' if per_host else ''}: "
                      f"{time.perf_counter() - start:.1f} s with buffer setup]", flush=True)
        if rank == 0:
            nv = t["nvlink", None]
            print(f"\n{tokens} tokens bf16, hidden {args.hidden}, top-{args.topk} of {args.experts}, R={world}")
            print(f"{'transport':<28}{'op':<9}{'ms':>9}{'nccl ms':>9}{'nvlink ms':>10}{'nccl/this':>10}"
                  f"{'nvlink/this':>12}")
            for (transport, per_host), pg in t.items():
                if transport == "nvlink":
                    continue
                name = transport + (f" ({per_host} ranks/host)" if per_host else "")
                for op in ("dispatch", "combine", "both"):
                    print(f"{name:<28}{op:<9}{pg[op]:>9.3f}{pg['naive_' + op]:>9.3f}{nv[op]:>10.3f}"
                          f"{pg['naive_' + op] / pg[op]:>10.2f}{nv[op] / pg[op]:>12.2f}")



CPU_DEFAULTS = dict(tokens=[4096], hidden=1024, experts=64, topk=8, warmup=3, iters=20)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --transports, --dtypes; with --device cpu the shape defaults become CPU_DEFAULTS."""
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: time the CPU path (gloo) against naive all_to_all_single; defaults become "
                             + ", ".join(f"{k}={v}" for k, v in CPU_DEFAULTS.items()))
    parser.add_argument("--transports", action="store_true",
                        help="CUDA: time transport='process_group' against plain NCCL and the NVLink kernels")
    parser.add_argument("--ranks-per-host", type=int,
                        help="--transports: also time the process_group transport with simulated hosts of this size")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES), help="--device cpu only")
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device")
    if device.parse_known_args()[0].device == "cpu":
        parser.set_defaults(**CPU_DEFAULTS)


def main(args) -> None:
    """Entry from torch_ep.bench for --device cpu and --transports."""
    if args.device == "cpu":
        dist.init_process_group("gloo")
        bench_cpu(args)
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
        bench_transports(args)
    dist.destroy_process_group()
