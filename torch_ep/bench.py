"""Benchmark: torch_ep dispatch/combine against the NVLink ceiling and the NCCL all-to-all path.

    torchrun --nproc-per-node 2 -m torch_ep.bench [--tokens 4096 16384] [--json out.json] [--plot out.png]
    (--device cpu, --transports: the ProcessGroup transport, see torch_ep/bench_transport.py)

For each config, in one run on the same GPUs, with outputs checked equal before timing:
  - torch_ep dispatch (exact and no-host-sync; "in_place": exact, on a zero_copy_recv buffer) and combine
    ("combine_zc": its y in the combine region of a zero_copy_combine buffer, Buffer.combine_input);
  - the ceiling: a peer-copy kernel in which every rank writes to every other rank at once;
  - the NCCL path: permute + all_to_all_single (+ the count exchange it needs), and for combine
    all_to_all_single + a rank-ordered fp32 scatter-add.
NVLink GB/s = bytes of rows that move between different ranks / time (per rank, averaged); the
"logical" figure also counts the rows a rank keeps for itself, as DeepEP reports it.
Times are device times: medians over many iterations, timed with CUDA events after the ranks are lined up
and while the host enqueue is hidden (see median_us), the slowest rank's median; `--profile` shows the host
cost per call and the kernels' own times.

    torchrun --nproc-per-node 2 -m torch_ep.bench --mode low-latency [--ll-tokens 1 128 256]

Low-latency mode: us per low_latency_dispatch (bf16, FP8) and low_latency_combine, each the median of
CUDA-graph replays (of a graph holding one call, and per call of a graph holding 10, as a decode step's graph
holds every layer's), next to NCCL all_to_all_single and torch.ops.symm_mem.all_to_all_vdev moving the same
rows (one per token and destination rank) on the same routing, in the same run.
"""
import argparse
import json
import os
import statistics
import warnings

import torch
import torch.distributed as dist

import torch_ep
from torch_ep import bench_transport


SPIN_CYCLES = 1_000_000  # ~500 us of GPU time: longer than any rank's host takes to enqueue an op here


def median_us(fn, warmup: int, iters: int) -> float:
    """Median device time of fn() in microseconds, the slowest rank's. Before each call the GPU spins while the
    host enqueues (so host overhead that a busy GPU would hide is not counted; host waits inside fn, such as the
    exact mode's, are) and an all-reduce lines the ranks up, so no rank's time includes waiting for another's host.
    fn's outputs live until the end event is recorded: a caller uses them, and freeing them is not fn's time;
    nor is creating the timing events (timing_events)."""
    for _ in range(warmup):
        fn()
    align = torch.zeros(1, device="cuda")
    start, end = bench_transport.timing_events()
    times = []
    for _ in range(iters):
        torch.cuda._sleep(SPIN_CYCLES)
        dist.all_reduce(align)
        start.record()
        outputs = fn()
        end.record()
        end.synchronize()
        del outputs
        times.append(start.elapsed_time(end) * 1e3)
    slowest = torch.tensor([statistics.median(times)], device="cuda")
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest)


def random_routing(num_tokens, num_experts, k, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, device="cuda", generator=g)
    weights, idx = scores.topk(k, dim=1)
    return idx, weights.float()


class NcclPath:
    """The same dispatch/combine with torch's all_to_all_single and the permutes it needs."""

    def __init__(self, layout, rank, world):
        in_rank = layout.is_token_in_rank
        self.order = torch.cat([in_rank[:, d].nonzero().squeeze(1) for d in range(world)])
        self.send_counts = in_rank.sum(0).tolist()
        counts = torch.tensor(self.send_counts, device="cuda")
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts)
        self.recv_counts = recv.tolist()
        self.tokens = [in_rank[:, d].nonzero().squeeze(1) for d in range(world)]

    def dispatch(self, x):
        counts = torch.tensor(self.send_counts, device="cuda")  # a real caller exchanges counts every step
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts)
        recv_counts = recv_counts.tolist()
        out = x.new_empty((sum(recv_counts), x.shape[1]))
        dist.all_to_all_single(out, x[self.order], recv_counts, self.send_counts)
        return out

    def combine(self, y, num_tokens):
        back = y.new_empty((sum(self.send_counts), y.shape[1]))
        dist.all_to_all_single(back, y, self.send_counts, self.recv_counts)
        out = torch.zeros(num_tokens, y.shape[1], device="cuda", dtype=torch.float32)
        for tokens, rows in zip(self.tokens, back.split(self.send_counts)):
            out.index_add_(0, tokens, rows.float())  # ascending rank, as torch_ep sums
        return out.to(y.dtype)


def make_payload(x, fp8):
    """What dispatch moves: bf16 rows, or FP8 rows with their scales; and its bytes per row."""
    if not fp8:
        return x, x.shape[1] * 2
    scales = torch.rand(x.shape[0], x.shape[1] // 128, device="cuda") + 0.5
    return (x.to(torch.float8_e4m3fn), scales), x.shape[1] + scales.shape[1] * 4


def bench_config(args, num_tokens, fp8):
    """One (tokens, dtype) config: torch_ep at every SM budget, the NCCL path and the ceilings, side by side."""
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, experts, k = args.hidden, args.experts, args.topk
    idx, weights = random_routing(num_tokens, experts, k, seed=rank)
    x = torch.randn(num_tokens, hidden, device="cuda").to(torch.bfloat16)
    payload, row_bytes = make_payload(x, fp8)
    wire = payload[0].view(torch.uint8) if fp8 else x  # what the NCCL path moves
    w, n = args.warmup, args.iters
    t, per_sms = {}, {}
    as_bytes = (lambda recv: recv[0].view(torch.uint8)) if fp8 else (lambda recv: recv)
    for num_sms in args.num_sms:
        with torch_ep.Buffer(None, experts, hidden, num_tokens, num_sms=num_sms) as buffer, \
                torch_ep.Buffer(None, experts, hidden, num_tokens, num_sms=num_sms, zero_copy_recv=True,
                                zero_copy_combine=True) as in_place:
            got = buffer.dispatch(payload, idx, weights)
            if num_sms == args.num_sms[0]:
                layout = buffer.get_dispatch_layout(idx)
                nccl = NcclPath(layout, rank, world)
                want_rows = nccl.dispatch(wire)
                y = torch.randn(want_rows.shape, device="cuda").to(torch.bfloat16)
                want_out = nccl.combine(y, num_tokens)
                sent = layout.num_tokens_per_rank.long()
                stats = torch.tensor([float(sent.sum() - sent[rank]), float(sent.sum())], device="cuda")
                dist.all_reduce(stats)
                cross_bytes, logical_bytes = (float(v) / world * row_bytes for v in stats)
                t["nccl_dispatch"] = median_us(lambda: nccl.dispatch(wire), w, n)
                if not fp8:
                    t["nccl_combine"] = median_us(lambda: nccl.combine(y, num_tokens), w, n)
                per_peer = int(cross_bytes) // max(world - 1, 1) // 16 * 16
                src = torch.randint(0, 255, (per_peer,), dtype=torch.uint8, device="cuda")
                props = torch.cuda.get_device_properties(torch.cuda.current_device())
                t["ceiling"] = median_us(
                    lambda: torch_ep._C.peer_copy(buffer.name, src, props.multi_processor_count), w, n)
                t["ceiling_24"] = median_us(lambda: torch_ep._C.peer_copy(buffer.name, src, 24), w, n)
            # correctness first, at every SM budget: torch_ep gives exactly what the NCCL path gives
            got_in_place = in_place.dispatch(payload, idx, weights)
            y_region = in_place.combine_input(y.shape[0])
            y_region.copy_(y)
            for what, ok in (("dispatch", torch.equal(as_bytes(got.recv_x), want_rows)),
                             ("dispatch with rows in place", torch.equal(as_bytes(got_in_place.recv_x), want_rows)),
                             ("combine", torch.equal(buffer.combine(y, got.handle), want_out)),
                             ("combine from the combine region",
                              torch.equal(in_place.combine(y_region, got_in_place.handle), want_out))):
                assert ok, f"{what} differs from the NCCL path ({num_tokens} tokens, {num_sms} SMs)"
            in_place_handle = got_in_place.handle
            del got_in_place  # its rows would keep the recv region taken, and the timed calls would stage theirs
            worst = int(got.handle.rank_prefix[-1].max())
            s = {
                "dispatch": median_us(lambda: buffer.dispatch(payload, idx, weights), w, n),
                "dispatch_no_sync": median_us(
                    lambda: buffer.dispatch(payload, idx, weights, num_worst_tokens=worst), w, n),
                "in_place": median_us(lambda: in_place.dispatch(payload, idx, weights), w, n),
                "ceiling_same_sms": median_us(lambda: torch_ep._C.peer_copy(buffer.name, src, num_sms), w, n),
            }
            if not fp8:
                s["combine"] = median_us(lambda: buffer.combine(y, got.handle), w, n)
                s["combine_zc"] = median_us(lambda: in_place.combine(y_region, in_place_handle), w, n)
            per_sms[num_sms] = s
    ops = ("dispatch", "in_place") if fp8 else ("dispatch", "in_place", "combine", "combine_zc")
    gbps = lambda us: cross_bytes / us / 1e3
    return {
        "tokens": num_tokens, "hidden": hidden, "experts": experts, "topk": k, "ranks": world,
        "dtype": "fp8" if fp8 else "bf16", "cross_MB": cross_bytes / 1e6, "logical_MB": logical_bytes / 1e6,
        "us": t, "ops": ops,
        "by_sms": {sms: {"us": s, "nvlink_GBps": {op: gbps(s[op]) for op in ops},
                         "vs_ceiling_24": {op: t["ceiling_24"] / s[op] for op in ops},
                         "vs_ceiling_same_sms": {op: s["ceiling_same_sms"] / s[op] for op in ops},
                         "vs_nccl": {op: t[nccl_key(op)] / s[op] for op in ops},
                         "exact_minus_no_sync_us": s["dispatch"] - s["dispatch_no_sync"]}
                   for sms, s in per_sms.items()},
        "ceiling_GBps": {"all_sms": gbps(t["ceiling"]), "24_sms": gbps(t["ceiling_24"])},
    }


def nccl_key(op):
    """The NCCL path's time an op is compared with: its combine for combine, its dispatch for every dispatch (in
    the low-latency ops too; in_place: dispatch on a zero_copy_recv buffer; combine_zc: combine from the
    combine region)."""
    return "nccl_combine" if op.startswith("combine") else "nccl_dispatch"


def normal_calls(buffer, x, idx, weights):
    """The normal-mode ops on one routing, by name: dispatch (exact, no-host-sync; bf16 and FP8) and combine."""
    got = buffer.dispatch(x, idx, weights)
    worst = int(got.handle.rank_prefix[-1].max())
    y = torch.randn(got.recv_x.shape, device="cuda").to(torch.bfloat16)
    fp8, _ = make_payload(x, fp8=True)
    return {"dispatch": lambda: buffer.dispatch(x, idx, weights),
            "dispatch_no_sync": lambda: buffer.dispatch(x, idx, weights, num_worst_tokens=worst),
            "dispatch_fp8": lambda: buffer.dispatch(fp8, idx, weights),
            "combine": lambda: buffer.combine(y, got.handle)}


def profile_ops(args, num_tokens):
    """Where the time goes: per-kernel device time (torch.profiler) and per-call host time of each op."""
    import time
    from torch.profiler import ProfilerActivity, profile, record_function
    rank = dist.get_rank()
    idx, weights = random_routing(num_tokens, args.experts, args.topk, seed=rank)
    x = torch.randn(num_tokens, args.hidden, device="cuda").to(torch.bfloat16)
    with torch_ep.Buffer(None, args.experts, args.hidden, num_tokens, num_sms=args.num_sms[0]) as buffer:
        calls = normal_calls(buffer, x, idx, weights)
        host_us = {}
        for name, fn in calls.items():
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(20):
                fn()
            host_us[name] = (time.perf_counter() - start) / 20 * 1e6  # enqueue cost (the GPU may lag)
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for name, fn in calls.items():
                for _ in range(10):
                    with record_function(name):
                        fn()
                    torch.cuda.synchronize()
    if rank == 0:
        print(f"\n== profile: {num_tokens} tokens/rank, {args.num_sms[0]} SMs; host us per call (enqueue): " +
              ", ".join(f"{k} {v:.1f}" for k, v in host_us.items()))
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        if args.json:
            prof.export_chrome_trace(os.path.join(os.path.dirname(args.json) or ".", f"trace_{num_tokens}.json"))


# Phase names of csrc/kernels/api.cuh's TraceEvent, in order (recorded with TORCH_EP_TRACE=1).
TRACE_EVENTS = ("start", "send_ready", "first_step", "stores_issued", "send_done", "first_landed", "receive_done",
                "end", "notify_start", "notify_counted", "notify_published", "notify_arrived", "notify_end",
                "masks_built")


def traced_phases(buffer_name, fn, reps=5):
    """fn() run alone `reps` times with the ranks lined up; per phase, the median over reps of the min, median
    and max over blocks of its time (us) since the op's first kernel started (TORCH_EP_TRACE)."""
    align = torch.zeros(1, device="cuda")
    per_rep = []
    for _ in range(reps):
        torch_ep._C.take_trace(buffer_name)
        torch.cuda._sleep(SPIN_CYCLES)
        dist.all_reduce(align)
        fn()
        trace = torch_ep._C.take_trace(buffer_name).double()
        t0 = trace[trace > 0].min()
        phases = {}
        for i, name in enumerate(TRACE_EVENTS):
            times = trace[:, i][trace[:, i] > 0]
            if times.numel():
                rel = (times - t0) / 1e3
                phases[name] = (float(rel.min()), float(rel.median()), float(rel.max()))
        per_rep.append(phases)
    return {name: tuple(statistics.median(p[name][j] for p in per_rep if name in p) for j in range(3))
            for name in per_rep[0]}


def print_traces(title, traces):
    """traces: {op: phases} of this rank; rank 0 prints every rank's."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, traces)
    if dist.get_rank() != 0:
        return
    print(f"\n== trace: {title} (us since the op's first kernel started; min / median / max over blocks)")
    for rank, by_op in enumerate(gathered):
        for op, phases in by_op.items():
            print(f"rank {rank} {op:<18}" + "  ".join(f"{n} {lo:.1f}/{m:.1f}/{x:.1f}"
                                                      for n, (lo, m, x) in phases.items()))


def trace_ops(args, num_tokens):
    """Per-phase timestamps of each op's kernels at num_tokens tokens/rank (normal mode; in_place: dispatch on a
    zero_copy_recv buffer; combine_zc: combine from the combine region), each SM budget."""
    os.environ["TORCH_EP_TRACE"] = "1"
    rank = dist.get_rank()
    idx, weights = random_routing(num_tokens, args.experts, args.topk, seed=rank)
    x = torch.randn(num_tokens, args.hidden, device="cuda").to(torch.bfloat16)
    for num_sms in args.num_sms:
        with torch_ep.Buffer(None, args.experts, args.hidden, num_tokens, num_sms=num_sms) as buffer, \
                torch_ep.Buffer(None, args.experts, args.hidden, num_tokens, num_sms=num_sms,
                                zero_copy_recv=True, zero_copy_combine=True) as in_place:
            calls = {name: (buffer, fn) for name, fn in normal_calls(buffer, x, idx, weights).items()}
            calls["in_place"] = (in_place, lambda: in_place.dispatch(x, idx, weights))
            got = in_place.dispatch(x, idx, weights)
            y = in_place.combine_input(got.recv_x.shape[0])
            y.copy_(got.recv_x)
            handle = got.handle
            del got  # its rows would keep the recv region taken
            calls["combine_zc"] = (in_place, lambda: in_place.combine(y, handle))
            traces = {}
            for name, (owner, fn) in calls.items():
                for _ in range(5):
                    fn()
                traces[name] = traced_phases(owner.name, fn)
        print_traces(f"{num_tokens} tokens/rank, {num_sms} SMs", traces)


def trace_low_latency(args, num_tokens, num_sms):
    os.environ["TORCH_EP_TRACE"] = "1"
    idx, weights = random_routing(num_tokens, args.experts, args.topk, seed=dist.get_rank())
    x = torch.randn(num_tokens, args.hidden, device="cuda").to(torch.bfloat16)
    with torch_ep.Buffer(None, args.experts, args.hidden, num_tokens, low_latency=True,
                         low_latency_num_sms=num_sms) as buffer:
        got = buffer.low_latency_dispatch(x, idx, weights)
        y = got.recv_x.clone()
        calls = {"ll_dispatch_bf16": lambda: buffer.low_latency_dispatch(x, idx, weights),
                 "ll_dispatch_fp8": lambda: buffer.low_latency_dispatch(x, idx, weights, use_fp8=True),
                 "ll_combine": lambda: buffer.low_latency_combine(y, got.handle)}
        traces = {}
        for name, fn in calls.items():
            for _ in range(5):
                fn()
            traces[name] = traced_phases(buffer.name, fn)
    print_traces(f"low-latency, {num_tokens} tokens/rank, {num_sms} SMs", traces)


def print_table(results):
    print(f"\n{'config':<22}{'SMs':>4} {'op':<11}{'us':>9}{'GB/s':>8}{'x ceil24':>9}{'x ceil(SMs)':>12}"
          f"{'NCCL us':>9}{'x NCCL':>8}")
    for r in results:
        name = f"{r['tokens']}tok {r['dtype']} R={r['ranks']}"
        for sms, s in r["by_sms"].items():
            for op in r["ops"]:
                print(f"{name:<22}{sms:>4} {op:<11}{s['us'][op]:>9.1f}{s['nvlink_GBps'][op]:>8.1f}"
                      f"{s['vs_ceiling_24'][op]:>9.2f}{s['vs_ceiling_same_sms'][op]:>12.2f}"
                      f"{r['us'][nccl_key(op)]:>9.1f}{s['vs_nccl'][op]:>8.2f}")
            print(f"{name:<22}{sms:>4} {'no-sync':<11}{s['us']['dispatch_no_sync']:>9.1f}"
                  f"{'':>8}{'':>9}{'':>12}{'':>9}{'':>8}  exact - no-sync = {s['exact_minus_no_sync_us']:.1f} us")
        print(f"{name:<22} ceiling: 24 SMs {r['us']['ceiling_24']:.1f} us ({r['ceiling_GBps']['24_sms']:.0f} GB/s), "
              f"all SMs {r['us']['ceiling']:.1f} us ({r['ceiling_GBps']['all_sms']:.0f} GB/s)")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, ours, ceiling, nccl = [], [], [], []
    for r in results:
        sms = max(r["by_sms"])
        for op in r["ops"]:
            labels.append(f"{op}\n{r['tokens']} {r['dtype']}")
            ours.append(r["by_sms"][sms]["nvlink_GBps"][op])
            ceiling.append(r["ceiling_GBps"]["24_sms"])
            nccl.append(r["cross_MB"] * 1e6 / r["us"][nccl_key(op)] / 1e3)
    pos = range(len(labels))
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.2), 4))
    ax.bar([p - 0.25 for p in pos], ours, 0.25, label="torch_ep")
    ax.bar(list(pos), ceiling, 0.25, label="peer-copy ceiling (24 SMs)")
    ax.bar([p + 0.25 for p in pos], nccl, 0.25, label="NCCL all_to_all path")
    ax.set_xticks(list(pos), labels, fontsize=7)
    ax.set_ylabel("NVLink GB/s per rank (cross-rank bytes / time)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- low-latency mode ------------------------------------------------------------------------------

GRAPH_CALLS = 10  # ops per graph of the low-latency "_of_10" columns


def graph_replay_us(fn, warmup: int, iters: int, calls: int = 1) -> float:
    """Median device time of one replay of a CUDA graph holding `calls` back-to-back fn(), over calls (the
    slowest rank's)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    dist.barrier()
    return median_us(graph.replay, warmup, iters) / calls


def expected_ll_combine(x, idx, weights, num_experts, world):
    """low_latency_combine of y = the received rows, computed at home (each rank's partial rounded to bf16)."""
    owner = torch.where(idx >= 0, idx // (num_experts // world), -1)
    out = torch.zeros(x.shape, device=x.device)
    for d in range(world):
        partial = torch.zeros(x.shape, device=x.device)
        for j in range(idx.shape[1]):
            partial = torch.where((owner[:, j] == d).unsqueeze(1), partial + weights[:, j:j + 1] * x.float(), partial)
        out = torch.where((owner == d).any(1, keepdim=True), out + partial.to(torch.bfloat16).float(), out)
    return out.to(torch.bfloat16)


class SymmMemPath:
    """The same rows moved by torch.ops.symm_mem.all_to_all_vdev (splits exchanged on the device)."""

    def __init__(self, rows, send_counts, hidden, max_rows):
        import torch.distributed._symmetric_memory as symm_mem
        symm_mem.set_backend("NVSHMEM")
        self.group_name = dist.group.WORLD.group_name
        with warnings.catch_warnings():  # deprecated since torch 2.11 (rendezvous sets the group up): harmless
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(self.group_name)
        world = dist.get_world_size()
        # An explicit index: NVSHMEM's team manager keeps the device it first saw and refuses any other,
        # and "cuda" (index -1) is another device to it than the inputs' cuda:<rank>.
        device = torch.device("cuda", torch.cuda.current_device())
        self.input = symm_mem.empty(max_rows * hidden, dtype=torch.bfloat16, device=device)
        self.out = symm_mem.empty(max_rows * hidden, dtype=torch.bfloat16, device=device)
        self.in_splits = symm_mem.empty(world, dtype=torch.int64, device=device)
        self.out_splits_offsets = symm_mem.empty((2, world), dtype=torch.int64, device=device)
        for t in (self.input, self.out, self.in_splits, self.out_splits_offsets):
            symm_mem.rendezvous(t, group=self.group_name)
        self.input[: rows.numel()].copy_(rows.flatten())
        self.in_splits.copy_(torch.tensor(send_counts, device="cuda") * hidden)

    def run(self):
        torch.ops.symm_mem.all_to_all_vdev(self.input, self.out, self.in_splits, self.out_splits_offsets,
                                           self.group_name)


def bench_low_latency_config(args, num_tokens, num_sms):
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, experts, k = args.hidden, args.experts, args.topk
    idx, weights = random_routing(num_tokens, experts, k, seed=rank)
    x = torch.randn(num_tokens, hidden, device="cuda").to(torch.bfloat16)
    w, n = args.warmup, args.iters
    t, notes = {}, []
    buffer_tokens = max(num_tokens, args.ll_buffer_tokens)
    with torch_ep.Buffer(None, experts, hidden, buffer_tokens, low_latency=True,
                         low_latency_num_sms=num_sms) as buffer:
        got = buffer.low_latency_dispatch(x, idx, weights)
        out = buffer.low_latency_combine(got.recv_x, got.handle)
        # correctness first: the received rows, expert-weighted and summed home, must be exact
        assert torch.equal(out, expected_ll_combine(x, idx, weights, experts, world)), "low-latency combine is wrong"
        y = got.recv_x.clone()
        ops = {"dispatch_bf16": lambda: buffer.low_latency_dispatch(x, idx, weights),
               "dispatch_fp8": lambda: buffer.low_latency_dispatch(x, idx, weights, use_fp8=True),
               "combine": lambda: buffer.low_latency_combine(y, got.handle)}
        for name, op in ops.items():
            t[name] = graph_replay_us(op, w, n)
        for name, op in ops.items():  # a decode step's graph holds every layer's ops and pays one launch
            t[f"{name}_of_{GRAPH_CALLS}"] = graph_replay_us(op, w, n, calls=GRAPH_CALLS)
        scratch = torch.zeros(1, device="cuda")
        t["one_kernel_graph"] = graph_replay_us(lambda: scratch.add_(1), w, n)  # what any replay costs here
        layout = buffer.get_dispatch_layout(idx)
    nccl = NcclPath(layout, rank, world)
    t["nccl_dispatch"] = median_us(lambda: nccl.dispatch(x), w, n)
    recv = nccl.dispatch(x)
    t["nccl_combine"] = median_us(lambda: nccl.combine(recv, num_tokens), w, n)
    try:
        symm = SymmMemPath(x[nccl.order], nccl.send_counts, hidden, num_tokens * world)
        t["symm_mem_all_to_all_vdev"] = median_us(symm.run, w, n)
    except Exception as exc:  # torch without NVSHMEM (or without symmetric memory)
        notes.append(f"symm_mem.all_to_all_vdev skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return {"tokens": num_tokens, "buffer_tokens": buffer_tokens, "hidden": hidden, "experts": experts, "topk": k,
            "ranks": world, "num_sms": num_sms, "us": t, "speedup": low_latency_speedups(t), "notes": notes}


LL_OPS = ("dispatch_bf16", "dispatch_fp8", "combine")


def low_latency_speedups(us):
    """How many times faster than NCCL (dispatch ops against its dispatch, combine against its combine) and
    than symm_mem.all_to_all_vdev (when it ran) each low-latency op is, per replay of one call and of 10."""
    peers = {"nccl": lambda op: us[nccl_key(op)]}
    if "symm_mem_all_to_all_vdev" in us:
        peers["symm_mem"] = lambda op: us["symm_mem_all_to_all_vdev"]
    return {f"{name}_vs_{peer}": theirs(op) / us[name]
            for peer, theirs in peers.items() for op in LL_OPS for name in (op, f"{op}_of_{GRAPH_CALLS}")}


def print_low_latency_table(results):
    print(f"\n{'tokens/rank':<12}{'buffer':>7}{'SMs':>5}" + "".join(f"{name:>26}" for name in results[0]["us"]))
    for r in results:
        print(f"{r['tokens']:<12}{r['buffer_tokens']:>7}{r['num_sms']:>5}"
              + "".join(f"{us:>26.1f}" for us in r["us"].values()))
        for note in r["notes"]:
            print(f"  note: {note}")
    for r in results:
        for peer in ("nccl", "symm_mem"):
            if f"combine_vs_{peer}" not in r["speedup"]:
                continue
            ratios = "; ".join(f"{op} {r['speedup'][f'{op}_vs_{peer}']:.2f} "
                               f"({r['speedup'][f'{op}_of_{GRAPH_CALLS}_vs_{peer}']:.2f} of {GRAPH_CALLS})"
                               for op in LL_OPS)
            print(f"{r['tokens']} tokens, {r['num_sms']} SMs: x {peer}: {ratios}")
    print("(us; buffer: the tokens/rank the low-latency buffer is sized for; torch_ep rows: median of CUDA-graph "
          f"replays; X_of_{GRAPH_CALLS}: a replay of a graph of {GRAPH_CALLS} back-to-back X, over {GRAPH_CALLS}; "
          "one_kernel_graph: a graph of one tiny kernel, the harness's floor; NCCL and "
          "symm_mem: eager, the same rows: one per token and destination rank; x peer: its time over torch_ep's)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["normal", "low-latency"], default="normal")
    parser.add_argument("--ll-tokens", type=int, nargs="+", default=[1, 128, 256],
                        help="tokens per rank of the low-latency mode")
    parser.add_argument("--ll-buffer-tokens", type=int, default=0,
                        help="size the low-latency buffer for this many tokens per rank when more than are sent "
                             "(a serving buffer sized for the largest decode step)")
    parser.add_argument("--ll-num-sms", type=int, nargs="+", default=[torch_ep.buffer.DEFAULT_NUM_SMS, 0],
                        help="blocks (SMs) of the low-latency kernels, one run each (0: every SM)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 4096, 16384])
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--num-sms", type=int, nargs="+", default=[24, 16, 12, 8],
                        help="SM budgets of torch_ep's kernels (the first also checks correctness)")
    parser.add_argument("--no-fp8", action="store_true")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: per-kernel device time and per-call host time of each op")
    parser.add_argument("--trace", action="store_true",
                        help="instead of timing: per-phase timestamps inside the kernels (TORCH_EP_TRACE)")
    parser.add_argument("--plot", help="write a PNG bar chart here")
    bench_transport.add_arguments(parser)
    args = parser.parse_args()
    if args.device == "cpu" or args.transports:
        bench_transport.main(args)
        return
    if not (torch.cuda.is_available() and torch_ep._C.WITH_CUDA):
        raise SystemExit("torch_ep.bench needs CUDA GPUs and a CUDA build of torch_ep")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)  # also pins NVSHMEM's device (SymmMemPath)
    every_sm = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    if args.profile or args.trace:
        if args.trace and args.mode == "low-latency":
            for tokens in args.ll_tokens:
                for num_sms in args.ll_num_sms:
                    trace_low_latency(args, tokens, num_sms or every_sm)
        else:
            for tokens in args.tokens:
                (trace_ops if args.trace else profile_ops)(args, tokens)
        dist.destroy_process_group()
        return
    if args.mode == "low-latency":
        results = [bench_low_latency_config(args, tokens, num_sms or every_sm)
                   for tokens in args.ll_tokens for num_sms in args.ll_num_sms]
        if dist.get_rank() == 0:
            print_low_latency_table(results)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
        dist.destroy_process_group()
        return
    results = []
    for tokens in args.tokens:
        for fp8 in ((False,) if args.no_fp8 else (False, True)):
            results.append(bench_config(args, tokens, fp8))
            if fp8:  # FP8 dispatch moves about half the bytes of bf16: compare their times
                results[-1]["fp8_over_bf16_dispatch"] = {
                    sms: results[-1]["by_sms"][sms]["us"]["dispatch"] / results[-2]["by_sms"][sms]["us"]["dispatch"]
                    for sms in args.num_sms}
    if dist.get_rank() == 0:
        print_table(results)
        for r in results:
            if "fp8_over_bf16_dispatch" in r:
                print(f"{r['tokens']} tokens: FP8 dispatch time / bf16 = " +
                      ", ".join(f"{v:.2f} ({sms} SMs)" for sms, v in r["fp8_over_bf16_dispatch"].items()))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        if args.plot:
            plot(results, args.plot)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
