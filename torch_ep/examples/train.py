"""Train a small decoder-only MoE transformer with expert parallelism through torch_ep.

    torchrun --nproc-per-node 2 -m torch_ep.examples.train --steps 200

The ranks form a 2-D DeviceMesh (dp x ep). Each MoE layer's experts are split over the "ep" dimension
(rank e of it holds experts [e*E/ep, (e+1)*E/ep)) and replicated over "dp", where their gradients are
all-reduced; every other parameter is sharded over all ranks by FSDP2. Each block is compiled with
fullgraph=True. Data: a synthetic language (a fixed random Markov chain over the vocabulary), so the
loss has a known floor. GPUs (NCCL + NVLink kernels) when CUDA is available, else CPU (gloo).
"""
from __future__ import annotations

import argparse
import os
import time
import zlib
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import torch_ep
from torch_ep.nn import MoE

from .all_to_all import AllToAllTransport
from .plot import write_curve_png

try:  # torch >= 2.6 exports FSDP2 here
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # older: the composable API
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--ffn", type=int, default=256, help="inner width of each expert")
    p.add_argument("--shared-ffn", type=int, default=0, help="inner width of a shared expert (0: none)")
    p.add_argument("--score-func", choices=("softmax", "sigmoid"), default="softmax")
    p.add_argument("--aux-loss-coef", type=float, default=0.01)
    p.add_argument("--num-worst-tokens", type=int, default=0,
                   help="> 0: dispatch pads to this many received rows per rank (static shapes, no host sync)")
    p.add_argument("--ep", type=int, default=0, help="expert-parallel size (default: all ranks); dp = world / ep")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="run the blocks eagerly")
    p.add_argument("--ac", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--out", default="out/train", help="directory of the loss curve (loss.png)")
    p.add_argument("--ckpt", default=None, help="directory to save a torch.distributed.checkpoint in at the end")
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    p.add_argument("--compare-nccl", action="store_true",
                   help="then train the same model with all_to_all_single dispatch/combine and print both timings")
    p.add_argument("--quiet", action="store_true", help="no per-step log lines")
    return p.parse_args(argv)


# -- data ----------------------------------------------------------------------------------------

class SyntheticText:
    """Sequences from a fixed random Markov chain: each token has 4 possible successors (entropy <= ln 4 nats).

    `batch(step, rank, batch, world)` is this rank's slice of the step's global batch, so a run on any
    number of ranks sees the same global batches, and a resumed run sees the batches it would have seen.
    """

    def __init__(self, vocab: int, seq: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.seq, self.seed = seq, seed
        logits = torch.full((vocab, vocab), -1e9)
        logits.scatter_(1, torch.randint(vocab, (vocab, 4), generator=g), torch.randn(vocab, 4, generator=g))
        self.transition = logits.softmax(dim=-1)

    def batch(self, step: int, rank: int, batch: int, world: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        tokens = torch.empty(batch * world, self.seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(self.transition.shape[0], (batch * world,), generator=g)
        for t in range(self.seq):
            tokens[:, t + 1] = torch.multinomial(self.transition[tokens[:, t]], 1, generator=g).squeeze(1)
        mine = tokens[rank * batch:(rank + 1) * batch]
        return mine[:, :-1], mine[:, 1:]


# -- model ---------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: nn.Module):
        super().__init__()
        self.attn_norm, self.attn = nn.RMSNorm(dim), Attention(dim, heads)
        self.ffn_norm, self.ffn = nn.RMSNorm(dim), ffn

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """Token + learned position embeddings, `blocks`, a final norm and an untied output head."""

    def __init__(self, vocab: int, seq: int, dim: int, blocks: List[Block]):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq, dim))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_model(args, transport, device) -> Transformer:
    def moe():
        return MoE(args.dim, args.ffn, args.experts, args.topk, buffer=transport, score_func=args.score_func,
                   aux_loss_coef=args.aux_loss_coef, shared_ffn_hidden=args.shared_ffn,
                   num_worst_tokens=args.num_worst_tokens, device=device)
    blocks = [Block(args.dim, args.heads, moe()) for _ in range(args.layers)]
    return Transformer(args.vocab, args.seq, args.dim, blocks).to(device)


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Initialise every parameter from (seed, its name) alone: the same model whatever the ep size.

    Expert weights are drawn whole ([E, ...]) and each rank keeps the slice of the experts it holds.
    """
    owner = {p: m for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()}
    for name, p in model.named_parameters():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if "norm" in name:
            p.fill_(1.0)
        elif p in owner:
            moe = owner[p]
            full = torch.randn((moe.num_experts, *p.shape[1:]), generator=g) * p.shape[-1] ** -0.5
            p.copy_(full[moe.expert_offset:moe.expert_offset + moe.num_local_experts])
        else:
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


def expert_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()]


# -- parallelism ---------------------------------------------------------------------------------

class Parallel:
    """The 2-D mesh (dp x ep) and the 1-D mesh of all ranks that FSDP2 shards dense parameters over."""

    def __init__(self, device_type: str, ep: int):
        world = dist.get_world_size()
        ep = ep or world
        if world % ep:
            raise ValueError(f"--ep={ep} must divide the world size {world}")
        self.world, self.ep, self.dp = world, ep, world // ep
        self.mesh = init_device_mesh(device_type, (self.dp, ep), mesh_dim_names=("dp", "ep"))
        self.dense_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("fsdp",))
        self.rank = dist.get_rank()


def parallelize(model: Transformer, par: Parallel, args, dtype: torch.dtype, fullgraph: bool = True) -> None:
    """Activation checkpointing (optional), then torch.compile, then FSDP2, block by block.

    Expert weights stay out of FSDP (`ignored_params`): each rank computes with its own experts, and
    `sync_expert_grads` reduces their gradients over the dp dimension after backward.
    """
    experts = set(expert_parameters(model))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for i, block in enumerate(model.blocks):
        if args.ac:
            block = checkpoint_wrapper(block)
        if args.compile:
            block.compile(fullgraph=fullgraph)
        fully_shard(block, mesh=par.dense_mesh, mp_policy=mp, ignored_params=experts)
        model.blocks[i] = block
    fully_shard(model, mesh=par.dense_mesh, mp_policy=mp, ignored_params=experts)


def sync_expert_grads(model: nn.Module, par: Parallel) -> None:
    """Expert gradients hold the sum over the ep group's tokens; make them the world mean, as FSDP's are."""
    for p in expert_parameters(model):
        if p.grad is None:
            continue
        if par.dp > 1:
            dist.all_reduce(p.grad, group=par.mesh.get_group("dp"))
        p.grad.div_(par.world)


# -- checkpoints -----------------------------------------------------------------------------------

def _with_global_experts(state: dict, model: nn.Module, par: Parallel) -> dict:
    """Expert tensors (weights, optimizer moments) as DTensors over the 2-D mesh: Shard(0) over ep,
    Replicate over dp, so a checkpoint holds each expert once, at its global index."""
    # found by storage: state-dict names drop wrapper prefixes (activation checkpointing) that parameter names keep
    storage = {p.data_ptr() for p in expert_parameters(model)}
    names = [name for name, t in state["model"].items() if not isinstance(t, DTensor) and t.data_ptr() in storage]

    def wrap(t):
        return DTensor.from_local(t, par.mesh, [Replicate(), Shard(0)], run_check=False)

    for name in names:
        state["model"][name] = wrap(state["model"][name])
        for key, value in state["optim"]["state"].get(name, {}).items():
            if torch.is_tensor(value) and value.dim() > 0:
                state["optim"]["state"][name][key] = wrap(value)
    return state


def _local(state):
    if isinstance(state, dict):
        return {k: _local(v) for k, v in state.items()}
    return state.to_local() if isinstance(state, DTensor) and state.device_mesh.ndim == 2 else state


def save_checkpoint(path: str, model, optim, step: int, par: Parallel) -> None:
    model_sd, optim_sd = get_state_dict(model, optim)
    state = _with_global_experts({"model": model_sd, "optim": optim_sd}, model, par)
    state["step"] = torch.tensor(step)
    dcp.save(state, checkpoint_id=path)


def load_checkpoint(path: str, model, optim, par: Parallel) -> int:
    """Load in place; return the step the checkpoint was taken after."""
    model_sd, optim_sd = get_state_dict(model, optim)
    state = _with_global_experts({"model": model_sd, "optim": optim_sd}, model, par)
    state["step"] = torch.tensor(0)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optim, model_state_dict=_local(state["model"]), optim_state_dict=_local(state["optim"]))
    return int(state["step"])


# -- training ------------------------------------------------------------------------------------

def train(args, transport, par: Parallel, device, dtype, log=print) -> dict:
    """Build, parallelise and train one model on `transport`; returns losses and step timings."""
    torch.manual_seed(args.seed)
    model = build_model(args, transport, device)
    init_weights(model, args.seed)
    # the all_to_all_single baseline reads split sizes on the host: a graph break its design can't avoid
    parallelize(model, par, args, dtype, fullgraph=isinstance(transport, torch_ep.Buffer))
    dense = [p for p in model.parameters() if p not in set(expert_parameters(model))]
    # two groups: foreach kernels run per group, and the groups hold different tensor kinds
    optim = torch.optim.AdamW([{"params": dense}, {"params": expert_parameters(model)}], lr=args.lr,
                              weight_decay=0.0)
    data = SyntheticText(args.vocab, args.seq, args.seed)
    start_step = load_checkpoint(args.resume, model, optim, par) if args.resume else 0
    tokens_per_step = args.batch * args.seq * par.world
    losses, times = [], []
    for step in range(start_step, args.steps):
        inputs, targets = (t.to(device) for t in data.batch(step, par.rank, args.batch, par.world))
        begin = time.perf_counter()
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        sync_expert_grads(model, par)
        optim.step()
        optim.zero_grad(set_to_none=True)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)  # also waits for the step on every rank
        elapsed = time.perf_counter() - begin
        losses.append(float(mean_loss) / par.world)
        times.append(elapsed)
        if not args.quiet:
            log(f"step {step + 1}/{args.steps} | loss {losses[-1]:.4f} | {tokens_per_step / elapsed:,.0f} tok/s | "
                f"{elapsed * 1e3:.1f} ms")
    if args.ckpt:
        save_checkpoint(args.ckpt, model, optim, args.steps, par)
    return {"losses": losses, "times": times, "tokens_per_step": tokens_per_step}


def _timing(result: dict) -> str:
    times = result["times"][1:] or result["times"]  # the first step compiles
    step = sorted(times)[len(times) // 2]
    return f"{step * 1e3:.1f} ms/step, {result['tokens_per_step'] / step:,.0f} tok/s"


def run(args) -> dict:
    """Train on an initialised default process group; rank 0 logs and writes the loss curve."""
    use_cuda = torch.cuda.is_available() and torch_ep._C.WITH_CUDA
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if use_cuda else "fp32")]
    par = Parallel(device.type, args.ep)
    log = print if par.rank == 0 else (lambda *_: None)
    log(f"torch_ep train: {par.world} ranks (dp {par.dp} x ep {par.ep}) on {device.type}, {args.layers} layers, "
        f"{args.experts} experts top-{args.topk}, {dtype}, compile={args.compile}, ac={args.ac}")
    buffer = torch_ep.Buffer(par.mesh.get_group("ep"), args.experts, args.dim, args.batch * args.seq,
                             device=device.type)
    try:
        result = train(args, buffer, par, device, dtype, log)
    finally:
        buffer.destroy()
    if par.rank == 0 and result["losses"]:
        os.makedirs(args.out, exist_ok=True)
        write_curve_png(os.path.join(args.out, "loss.png"), result["losses"])
        log(f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}; curve: {args.out}/loss.png")
    if args.compare_nccl:
        baseline_args = argparse.Namespace(**{**vars(args), "ckpt": None})  # the checkpoint is torch_ep's run's
        baseline = train(baseline_args, AllToAllTransport(par.mesh.get_group("ep"), args.experts, args.dim), par,
                         device, dtype, lambda *_: None)
        log(f"bench: torch_ep {_timing(result)} | all_to_all_single {_timing(baseline)} "
            f"({par.world} ranks, {result['tokens_per_step']} tokens/step)")
        result["baseline"] = baseline
    return result


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    use_cuda = torch.cuda.is_available() and torch_ep._C.WITH_CUDA
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        run(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
