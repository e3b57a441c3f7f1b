"""Benchmark: torch_ep dispatch/combine against the NVLink ceiling and the NCCL all-to-all path.

    torchrun --nproc-per-node 2 -m torch_ep.bench [--tokens 4096 16384] [--json out.json] [--plot out.png]
    (--device cpu, --transports: the ProcessGroup transport, see torch_ep/bench_transport.py)

For each config, in one run on the same GPUs, with outputs checked equal before timing:
  - torch_ep dispatch (exact and no-host-sync) and combine;
  - the ceiling: a peer-copy kernel in which every rank writes to every other rank at once;
  - the NCCL path: permute + all_to_all_single (+ the count exchange it needs), and for combine
    all_to_all_single + a rank-ordered fp32 scatter-add.
NVLink GB/s = bytes of rows that move between different ranks / time (per rank, averaged); the
"logical" figure also counts the rows a rank keeps for itself, as DeepEP reports it.
Times are medians over many iterations, timed with CUDA events, the slowest rank's median.
"""
import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist

import torch_ep
from torch_ep import bench_transport


def median_us(fn, warmup: int, iters: int) -> float:
    """Median device time of fn() in microseconds, the slowest rank's."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
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


def bench_config(args, num_tokens, fp8):
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, experts, k = args.hidden, args.experts, args.topk
    idx, weights = random_routing(num_tokens, experts, k, seed=rank)
    x = torch.randn(num_tokens, hidden, device="cuda").to(torch.bfloat16)
    with torch_ep.Buffer(None, experts, hidden, num_tokens, num_sms=args.num_sms) as buffer:
        layout = buffer.get_dispatch_layout(idx)
        nccl = NcclPath(layout, rank, world)
        if fp8:
            scales = torch.rand(num_tokens, hidden // 128, device="cuda") + 0.5
            payload = (x.to(torch.float8_e4m3fn), scales)
            row_bytes = hidden + scales.shape[1] * 4
        else:
            payload, row_bytes = x, hidden * 2
        wire = payload[0].view(torch.uint8) if fp8 else x  # what the NCCL path moves
        got = buffer.dispatch(payload, idx, weights)
        recv_x = got.recv_x[0].view(torch.uint8) if fp8 else got.recv_x
        # correctness first: torch_ep must give exactly what the NCCL path gives
        assert torch.equal(recv_x, nccl.dispatch(wire)), "dispatch differs from the NCCL path"
        y = (torch.randn(recv_x.shape, device="cuda")).to(torch.bfloat16)
        assert torch.equal(buffer.combine(y, got.handle), nccl.combine(y, num_tokens)), \
            "combine differs from the NCCL path"

        sent = layout.num_tokens_per_rank.long()
        stats = torch.tensor([float(sent.sum() - sent[rank]), float(sent.sum())], device="cuda")
        dist.all_reduce(stats)
        cross_bytes, logical_bytes = (float(v) / world * row_bytes for v in stats)
        worst = int(got.handle.rank_prefix[-1].max())

        w, n = args.warmup, args.iters
        t = {
            "dispatch": median_us(lambda: buffer.dispatch(payload, idx, weights), w, n),
            "dispatch_no_sync": median_us(
                lambda: buffer.dispatch(payload, idx, weights, num_worst_tokens=worst), w, n),
            "nccl_dispatch": median_us(lambda: nccl.dispatch(wire), w, n),
        }
        if not fp8:
            t["combine"] = median_us(lambda: buffer.combine(y, got.handle), w, n)
            t["nccl_combine"] = median_us(lambda: nccl.combine(y, num_tokens), w, n)
        per_peer = int(cross_bytes) // max(world - 1, 1) // 16 * 16
        src = torch.randint(0, 255, (per_peer,), dtype=torch.uint8, device="cuda")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        t["ceiling"] = median_us(lambda: torch_ep._C.peer_copy(buffer.name, src, props.multi_processor_count), w, n)
        t["ceiling_same_sms"] = median_us(lambda: torch_ep._C.peer_copy(buffer.name, src, args.num_sms), w, n)
    gbps = {name: cross_bytes / us / 1e3 for name, us in t.items()}
    ceiling = gbps["ceiling"]
    ops = ("dispatch",) if fp8 else ("dispatch", "combine")
    return {
        "tokens": num_tokens, "hidden": hidden, "experts": experts, "topk": k, "ranks": world,
        "dtype": "fp8" if fp8 else "bf16", "num_sms": args.num_sms, "cross_MB": cross_bytes / 1e6,
        "us": t, "nvlink_GBps": gbps,
        "logical_GBps": {op: logical_bytes / t[op] / 1e3 for op in ops},
        "vs_ceiling": {op: gbps[op] / ceiling for op in ops},
        "vs_nccl": {op: t["nccl_" + op] / t[op] for op in ops},
    }


def print_table(results):
    print(f"\n{'config':<26}{'op':<10}{'us':>9}{'NVLink GB/s':>13}{'logical':>9}{'ceiling GB/s':>14}"
          f"{'x ceiling':>11}{'NCCL us':>9}{'x NCCL':>8}")
    for r in results:
        name = f"{r['tokens']}tok {r['dtype']} R={r['ranks']}"
        for op in r["vs_ceiling"]:
            print(f"{name:<26}{op:<10}{r['us'][op]:>9.1f}{r['nvlink_GBps'][op]:>13.1f}"
                  f"{r['logical_GBps'][op]:>9.1f}{r['nvlink_GBps']['ceiling']:>14.1f}"
                  f"{r['vs_ceiling'][op]:>11.2f}{r['us']['nccl_' + op]:>9.1f}{r['vs_nccl'][op]:>8.2f}")
        print(f"{name:<26}{'no-sync':<10}{r['us']['dispatch_no_sync']:>9.1f}"
              f"{r['nvlink_GBps']['dispatch_no_sync']:>13.1f}")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, ours, ceiling, nccl = [], [], [], []
    for r in results:
        for op in r["vs_ceiling"]:
            labels.append(f"{op}\n{r['tokens']} {r['dtype']}")
            ours.append(r["nvlink_GBps"][op])
            ceiling.append(r["nvlink_GBps"]["ceiling"])
            nccl.append(r["nvlink_GBps"]["nccl_" + op])
    pos = range(len(labels))
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.2), 4))
    ax.bar([p - 0.25 for p in pos], ours, 0.25, label="torch_ep")
    ax.bar(list(pos), ceiling, 0.25, label="peer-copy ceiling")
    ax.bar([p + 0.25 for p in pos], nccl, 0.25, label="NCCL all_to_all path")
    ax.set_xticks(list(pos), labels, fontsize=7)
    ax.set_ylabel("NVLink GB/s per rank (cross-rank bytes / time)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--num-sms", type=int, default=torch_ep.buffer.DEFAULT_NUM_SMS)
    parser.add_argument("--no-fp8", action="store_true")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a PNG bar chart here")
    bench_transport.add_arguments(parser)
    args = parser.parse_args()
    if args.device == "cpu" or args.transports:
        bench_transport.main(args)
        return
    if not (torch.cuda.is_available() and torch_ep._C.WITH_CUDA):
        raise SystemExit("torch_ep.bench needs CUDA GPUs and a CUDA build of torch_ep")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    results = []
    for tokens in args.tokens:
        for fp8 in ((False,) if args.no_fp8 else (False, True)):
            results.append(bench_config(args, tokens, fp8))
            if fp8:  # FP8 dispatch moves about half the bytes of bf16: compare their times
                results[-1]["fp8_over_bf16_dispatch"] = results[-1]["us"]["dispatch"] / results[-2]["us"]["dispatch"]
    if dist.get_rank() == 0:
        print_table(results)
        for r in results:
            if "fp8_over_bf16_dispatch" in r:
                print(f"{r['tokens']} tokens: FP8 dispatch time / bf16 = {r['fp8_over_bf16_dispatch']:.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        if args.plot:
            plot(results, args.plot)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
