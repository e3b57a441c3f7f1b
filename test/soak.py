"""Reliability checks run on every rank of a pool, on CPU (gloo) or CUDA tensors: no leaks across many
Buffer lifetimes and steps, and a soak of random routing checked against test/reference.py.

Short counts run in CI; TORCH_EP_SOAK=1 selects the long ones (test_cpu.py). The lead runs the same
functions on GPUs with device="cuda".
"""
import os
import random

import torch
import torch.distributed as dist

import torch_ep
from reference import capture_graph, expected_combine, expected_dispatch, expert_output, make_routing, replay_with

LONG = os.environ.get("TORCH_EP_SOAK") == "1"


def _device(device: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def process_footprint(device: str) -> dict:
    """Resident host memory (bytes), open file descriptors, and on CUDA the device memory in use."""
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    out = {"rss": rss, "fds": len(os.listdir("/proc/self/fd"))}
    if device == "cuda":
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        out.update(cuda_allocated=torch.cuda.memory_allocated(), cuda_used=total - free)
    return out


def _steps(buffer, dev, num_steps, tokens, hidden, num_experts, k):
    rank = dist.get_rank()
    r = make_routing(rank, tokens, hidden, num_experts, k, seed=3, num_ranks=dist.get_world_size())
    x, idx, w = r.x.to(dev), r.topk_idx.to(dev), r.topk_weights.to(dev)
    for _ in range(num_steps):
        got = buffer.dispatch(x, idx, w)
        buffer.combine(got.recv_x, got.handle)


def leak_check(device: str, cycles: int, steps: int, hidden=64, experts_per_rank=4, tokens=32, k=2,
               rss_slack=8 << 20) -> dict:
    """`cycles` Buffer create/use/destroy rounds, then `steps` dispatch+combine on one buffer; the
    footprint must return to where it was after a warm-up round (host memory within rss_slack, which
    allocator caching takes; file descriptors and device memory exactly)."""
    dev = _device(device)
    num_experts = experts_per_rank * dist.get_world_size()

    def cycle(num_steps):
        with torch_ep.Buffer(None, num_experts, hidden, tokens, device=device) as buffer:
            _steps(buffer, dev, num_steps, tokens, hidden, num_experts, k)

    cycle(5)  # warm-up: lazy imports, allocator pools, gloo's buffers
    start = process_footprint(device)
    for _ in range(cycles):
        cycle(1)
    cycle(steps)
    end = process_footprint(device)
    assert end["fds"] == start["fds"], f"open file descriptors: {start['fds']} -> {end['fds']}"
    assert end["rss"] - start["rss"] <= rss_slack, f"host memory grew by {(end['rss'] - start['rss']) >> 20} MiB"
    if device == "cuda":
        assert end["cuda_allocated"] == start["cuda_allocated"], (start, end)
        assert end["cuda_used"] <= start["cuda_used"], (start, end)
    return {"start": start, "end": end}


def _iteration_inputs(it: int, seed: int, num_ranks: int, max_tokens: int, hidden: int, num_experts: int,
                      max_k: int, graphs: bool):
    """The random routing and mode of iteration `it`, the same on every rank (every rank rebuilds every
    rank's). Modes: "exact", "no_host_sync" (fixed capacity) and, with `graphs`, "graph": a replay of the
    captured step, whose static inputs are max_tokens rows of bf16 with max_k ids, so a rank's token count
    there is the number of rows with ids (the rest are -1)."""
    rng = random.Random(seed * 100_003 + it)
    mode = rng.choice(["exact", "exact", "no_host_sync", "graph" if graphs else "no_host_sync"])
    k = max_k if mode == "graph" else rng.randint(1, max_k)
    dtype = torch.bfloat16 if mode == "graph" else rng.choice([torch.bfloat16, torch.float32])
    hot = rng.choice([-1, -1, rng.randrange(num_ranks)])        # a third of the time: every token to one rank
    p_none = rng.choice([0.0, 0.1, 0.5, 1.0])                   # 1.0: nothing routed anywhere
    tokens = [rng.choice([0, 1, rng.randint(0, max_tokens), max_tokens]) for _ in range(num_ranks)]
    inputs = [make_routing(r, max_tokens if mode == "graph" else tokens[r], hidden, num_experts, k,
                           seed=seed * 7919 + it, dtype=dtype, p_none=p_none, hot_rank=hot, num_ranks=num_ranks)
              for r in range(num_ranks)]
    if mode == "graph":
        for r, routing in enumerate(inputs):
            routing.topk_idx[tokens[r]:] = -1
    return inputs, mode


def _captured_step(buffer, dev, max_tokens: int, hidden: int, k: int, capacity: int):
    """A fixed-capacity dispatch + combine captured in a CUDA graph: (graph, static inputs, (dispatch result,
    combine output))."""
    rank = dist.get_rank()
    static = [torch.zeros(max_tokens, hidden, dtype=torch.bfloat16, device=dev),
              torch.full((max_tokens, k), -1, dtype=torch.int64, device=dev),
              torch.zeros(max_tokens, k, dtype=torch.float32, device=dev)]

    def step():
        got = buffer.dispatch(*static, num_worst_tokens=capacity)
        return got, buffer.combine(expert_output(got.recv_x, rank), got.handle)

    graph, outputs = capture_graph(step)
    return graph, static, outputs


def soak(device: str, iterations: int, check_every: int = 1, seed: int = 0, max_tokens: int = 48,
         hidden: int = 32, experts_per_rank: int = 4, max_k: int = 4) -> dict:
    """Random routing for `iterations` steps (skewed, -1 ids, ranks with no tokens, varying token counts,
    exact and no-host-sync modes, and on CUDA replays of a captured step); every `check_every`-th step is
    compared with the reference."""
    rank, world, dev = dist.get_rank(), dist.get_world_size(), _device(device)
    num_experts = experts_per_rank * world
    capacity = world * max_tokens  # no rank can receive more
    checked = mismatches = replays = 0
    captured = None
    with torch_ep.Buffer(None, num_experts, hidden, max_tokens, device=device) as buffer:
        for it in range(iterations):
            inputs, mode = _iteration_inputs(it, seed, world, max_tokens, hidden, num_experts, max_k,
                                             graphs=device == "cuda")
            mine = inputs[rank]
            if mode == "graph":
                if captured is None:
                    captured = _captured_step(buffer, dev, max_tokens, hidden, max_k, capacity)
                graph, static, (got, out) = captured
                replay_with(graph, static, mine)
                replays += 1
            else:
                got = buffer.dispatch(mine.x.to(dev), mine.topk_idx.to(dev), mine.topk_weights.to(dev),
                                      num_worst_tokens=capacity if mode == "no_host_sync" else 0)
                out = buffer.combine(expert_output(got.recv_x, rank), got.handle)
            if it % check_every:
                continue
            checked += 1
            want = expected_dispatch(inputs, rank, num_experts)
            n = want.x.shape[0]
            ok = (got.handle.num_recv_tokens_int() == n
                  and torch.equal(got.recv_x[:n].cpu(), want.x)
                  and torch.equal(got.recv_topk_idx[:n].cpu(), want.topk_idx)
                  and torch.equal(got.recv_topk_weights[:n].cpu(), want.weights)
                  and torch.equal(got.handle.recv_src_idx[:n].cpu().long(), want.src_idx)
                  and torch.equal(got.num_recv_tokens_per_expert.cpu().long(), want.per_expert)
                  and torch.equal(out.cpu(), expected_combine(inputs, rank, num_experts)))
            mismatches += not ok
        del captured  # the graph before the buffer
    assert mismatches == 0, f"rank {rank}: {mismatches} of {checked} checked iterations differ from the reference"
    return {"iterations": iterations, "checked": checked, "mismatches": mismatches, "graph_replays": replays}
