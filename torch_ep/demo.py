"""The main job: one MoE layer, forward and backward, through torch_ep, checked against a dense
single-process reference.

    torchrun --nproc-per-node 2 -m torch_ep.demo

Runs on GPUs (NCCL group, NVLink kernels) when CUDA is available, else on CPU through gloo.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import torch_ep


def expert_mlp(x, w_in, w_out):
    """A SiLU MLP: x [n, H] @ w_in [H, F] -> silu -> @ w_out [F, H]."""
    return F.silu(x @ w_in) @ w_out


def moe_forward(buffer, x, gate, w_in, w_out, k):
    """Route x [T, H] to its top-k experts through torch_ep; experts [E/R, H, F] live on this rank."""
    scores = (x @ gate).softmax(dim=-1)
    topk_weights, topk_idx = scores.topk(k, dim=-1)
    got = buffer.dispatch(x, topk_idx, topk_weights.float())
    y = torch.zeros_like(got.recv_x)
    for e in range(w_in.shape[0]):
        rows, slot = (got.recv_topk_idx == e).nonzero(as_tuple=True)
        weight = got.recv_topk_weights[rows, slot].unsqueeze(1).to(x.dtype)
        y = y.index_add(0, rows, weight * expert_mlp(got.recv_x[rows], w_in[e], w_out[e]))
    return buffer.combine(y, got.handle), got


def dense_reference(x, gate, w_in_all, w_out_all, k):
    """The same layer with every expert on this process."""
    scores = (x @ gate).softmax(dim=-1)
    topk_weights, topk_idx = scores.topk(k, dim=-1)
    out = torch.zeros_like(x)
    for slot in range(k):
        for e in topk_idx[:, slot].unique().tolist():
            rows = (topk_idx[:, slot] == e).nonzero().squeeze(1)
            w = topk_weights[rows, slot].unsqueeze(1)
            out = out.index_add(0, rows, w * expert_mlp(x[rows], w_in_all[e], w_out_all[e]))
    return out


def sum_over_ranks(tensors, device):
    """all_reduce on the group's device (NCCL takes only CUDA tensors); results come back on the CPU."""
    on_device = [t.to(device) for t in tensors]
    for t in on_device:
        dist.all_reduce(t)
    return [t.cpu() for t in on_device]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available() and torch_ep._C.WITH_CUDA
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = torch.float32
    per_rank = args.experts // world

    g = torch.Generator().manual_seed(0)  # same weights on every rank: each keeps its own experts
    gate = torch.randn(args.hidden, args.experts, generator=g) / args.hidden ** 0.5
    w_in_all = torch.randn(args.experts, args.hidden, args.ffn, generator=g) / args.hidden ** 0.5
    w_out_all = torch.randn(args.experts, args.ffn, args.hidden, generator=g) / args.ffn ** 0.5
    x = torch.randn(args.tokens + rank, args.hidden, generator=torch.Generator().manual_seed(rank + 1))

    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    params = [t.to(device, dtype, copy=True).requires_grad_() for t in (x, gate, w_in_all[mine], w_out_all[mine])]
    with torch_ep.Buffer(None, args.experts, args.hidden, args.tokens + world) as buffer:
        start = time.perf_counter()
        out, got = moe_forward(buffer, *params, args.topk)
        out.pow(2).sum().backward()
        if use_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start

    ref_params = [t.to(dtype, copy=True).requires_grad_() for t in (x, gate, w_in_all, w_out_all)]
    ref = dense_reference(*ref_params, args.topk)
    ref.pow(2).sum().backward()
    expert_grads = [torch.zeros_like(w) for w in (w_in_all, w_out_all)]
    for full, local in zip(expert_grads, params[2:]):
        full[mine] = local.grad.cpu()
    # expert and gate gradients gather every rank's tokens
    expert_grads[0], expert_grads[1], gate_grad, *ref_grads = sum_over_ranks(
        expert_grads + [params[1].grad] + [p.grad for p in ref_params[1:]], device)

    checks = {"output": (out.detach().cpu(), ref.detach()), "grad x": (params[0].grad.cpu(), ref_params[0].grad),
              "grad gate": (gate_grad, ref_grads[0]), "grad w_in": (expert_grads[0], ref_grads[1]),
              "grad w_out": (expert_grads[1], ref_grads[2])}
    worst = {name: float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for name, a, b in
             ((n, *pair) for n, pair in checks.items())}
    for name, (a, b) in checks.items():
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"rank {rank}: {name} differs")
    report = torch.tensor([x.shape[0], got.handle.num_recv_tokens_int()], device=device)
    counts = [torch.zeros_like(report) for _ in range(world)]
    dist.all_gather(counts, report)
    if rank == 0:
        print(f"torch_ep demo: {world} ranks on {device.type} ({'NVLink kernels' if use_cuda else 'gloo'}), "
              f"{args.experts} experts, top-{args.topk}, hidden {args.hidden}")
        for r, (sent, recv) in enumerate(c.tolist() for c in counts):
            print(f"  rank {r}: {sent} tokens in, {recv} rows received for its {per_rank} experts")
        print(f"  forward + backward took {elapsed * 1e3:.1f} ms on rank 0")
        print("  largest relative error: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
        print("OK: output and gradients match the single-process reference")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
