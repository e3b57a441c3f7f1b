"""torch_ep.nn.MoE and the training example: expert parallelism changes nothing but where experts run.

CPU tests use two gloo ranks; GPU tests (marked `gpu`) skip without 2 GPUs.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import torch_ep
from multiprocess import Pool
from torch_ep.examples import train
from torch_ep.nn import GroupedExperts, MoE, grouped_mm_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2 and torch_ep._C.WITH_CUDA
needs_gpus = pytest.mark.skipif(not HAVE_GPUS, reason="needs 2 CUDA GPUs and a CUDA build")
SMALL_MODEL = ["--batch", "2", "--seq", "16", "--vocab", "64", "--dim", "32", "--heads", "2", "--ffn", "32",
               "--layers", "2", "--experts", "8", "--topk", "2"]


def _device(device: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


# -- worker functions (run on every rank of a Pool) --------------------------------------------------

def ep_matches_single_process(device, dtype, steps, tol, **moe_kwargs):
    """The EP layer and one holding all experts (a one-rank group) agree on loss, every gradient and the
    parameters after each SGD step, for the global batch split over the ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = _device(device)
    hidden, ffn, experts, k, tokens = 16, 24, 8, 2, 12
    solo = [dist.new_group([r]) for r in range(world)][rank]
    kwargs = dict(device=dev, dtype=dtype, **moe_kwargs)
    torch.manual_seed(0)
    ref = MoE(hidden, ffn, experts, k, group=solo, max_tokens_per_rank=tokens * world, **kwargs)
    ep = MoE(hidden, ffn, experts, k, max_tokens_per_rank=tokens, **kwargs)
    assert (ep.num_local_experts, ep.expert_offset) == (experts // world, rank * experts // world)
    mine = slice(ep.expert_offset, ep.expert_offset + ep.num_local_experts)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in ep.named_parameters():
            p.copy_(ref_params[name][mine] if name.startswith("experts.") else ref_params[name])
    opt_ref, opt_ep = (torch.optim.SGD(m.parameters(), lr=0.01) for m in (ref, ep))
    rows = slice(rank * tokens, (rank + 1) * tokens)
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randn(world * tokens, hidden, generator=g).to(dev, dtype)
        target = torch.randn(world * tokens, hidden, generator=g).to(dev, dtype)
        x_ref, x_ep = x.clone().requires_grad_(), x[rows].clone().requires_grad_()
        loss_ref = (ref(x_ref) - target).float().pow(2).sum()
        loss_ep = (ep(x_ep) - target[rows]).float().pow(2).sum()
        loss_ref.backward()
        loss_ep.backward()
        total = loss_ep.detach().clone()
        dist.all_reduce(total)
        for name, p in ep.named_parameters():
            if not name.startswith("experts."):
                dist.all_reduce(p.grad)  # replicated: sum the ranks' contributions; experts already hold theirs
        close = dict(rtol=tol, atol=tol)
        torch.testing.assert_close(total, loss_ref.detach(), rtol=tol, atol=0, msg=lambda m: f"step {step}: loss: {m}")
        torch.testing.assert_close(x_ep.grad, x_ref.grad[rows], **close, msg=lambda m: f"step {step}: grad of x: {m}")
        for name, p in ep.named_parameters():
            want = ref_params[name].grad[mine] if name.startswith("experts.") else ref_params[name].grad
            scale = want.abs().max().clamp(min=1)  # sums over many tokens: compare relative to their size
            torch.testing.assert_close(p.grad / scale, want / scale, **close,
                                       msg=lambda m: f"step {step}: grad of {name}: {m}")
        opt_ref.step()
        opt_ep.step()
        opt_ref.zero_grad()
        opt_ep.zero_grad()
    for name, p in ep.named_parameters():
        want = ref_params[name][mine] if name.startswith("experts.") else ref_params[name]
        torch.testing.assert_close(p, want, rtol=tol, atol=tol,
                                   msg=lambda m: f"parameter {name} after {steps} steps: {m}")
    ref.destroy()
    ep.destroy()


def compiled_moe_matches_eager(device, dtype, tol):
    """The layer compiles with fullgraph=True (no graph break) and gives eager's output and gradients."""
    from torch._dynamo.utils import counters
    dev = _device(device)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    moe = MoE(32, 32, 8, 2, max_tokens_per_rank=16, shared_ffn_hidden=16, aux_loss_coef=0.01, device=dev,
              dtype=dtype)
    x = torch.randn(2, 7 + dist.get_rank(), 32, generator=torch.Generator().manual_seed(dist.get_rank()))
    results = []
    for fn in (moe, torch.compile(moe, fullgraph=True)):
        xi = x.to(dev, dtype).requires_grad_()
        out = fn(xi)
        out.float().pow(2).sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad.clone() for p in moe.parameters()])
        moe.zero_grad(set_to_none=True)
    for eager, compiled in zip(*results):
        scale = eager.abs().max().float().clamp(min=1)  # bf16 rounds where inductor fuses: compare to the tensor's size
        torch.testing.assert_close(compiled.float() / scale, eager.float() / scale, rtol=tol, atol=tol)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    moe.destroy()


def example_losses(argv):
    result = train.run(train.parse_args(argv + ["--quiet"]))
    return result["losses"], result.get("baseline", {}).get("losses")


# -- CPU tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("moe_kwargs", [
    dict(score_func="softmax", renormalize=False),
    dict(score_func="sigmoid", renormalize=True, shared_ffn_hidden=8, num_worst_tokens=30),
], ids=["softmax", "sigmoid-renorm-shared-static"])
def test_ep_layer_matches_single_process_layer_over_sgd_steps(world2, moe_kwargs):
    world2.run(ep_matches_single_process, "cpu", torch.float32, 3, 1e-4, **moe_kwargs)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_compiled_layer_matches_eager(world2, dtype, tol):
    world2.run(compiled_moe_matches_eager, "cpu", dtype, tol)


def test_grouped_mm_loop_matches_per_expert_matmuls():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(10, 4, generator=g, requires_grad=True), torch.randn(3, 4, 5, generator=g, requires_grad=True)
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)  # an empty group; rows 7.. belong to none
    out = grouped_mm_loop(x, w, offs)
    want = torch.cat([x[:2] @ w[0], x[2:7] @ w[2], torch.zeros(3, 5)])
    torch.testing.assert_close(out, want)
    grad = torch.randn(10, 5, generator=g)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    wx, ww = torch.autograd.grad(want, (x, w), grad)
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gw, ww)
    torch.library.opcheck(torch.ops.torch_ep.grouped_mm_loop.default, (x.detach(), w.detach(), offs))


@pytest.mark.skipif(not GroupedExperts(1, 8, 8, grouped_mm=None).grouped_mm_dtypes,
                    reason="no torch._grouped_mm on this torch/CPU")
def test_grouped_mm_experts_match_loop_experts():
    torch.manual_seed(0)
    grouped = GroupedExperts(3, 16, 8, grouped_mm=None, dtype=torch.bfloat16)
    dtype = next(iter(grouped.grouped_mm_dtypes))
    looped = GroupedExperts(3, 16, 8, grouped_mm=False)
    looped.load_state_dict(grouped.state_dict())
    x = torch.randn(12, 16)
    offs = torch.tensor([4, 4, 9], dtype=torch.int32)
    outs = []
    for experts in (grouped, looped):
        xi = x.to(dtype).requires_grad_()
        out = experts.to(dtype)(xi, offs)
        out.float().sum().backward()
        outs.append((out, xi.grad, experts.w13.grad, experts.w2.grad))
    assert torch.equal(outs[0][0][9:], torch.zeros(3, 16, dtype=dtype))  # rows past the last offset
    for a, b in zip(*outs):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_aux_loss_trains_the_router_without_the_caller_adding_it(world2):
    world2.run(aux_loss_reaches_router)


def aux_loss_reaches_router():
    """With aux_loss_coef c, the router's gradient gains exactly c * d(load-balancing loss), computed here by hand."""
    torch.manual_seed(0)
    moe = MoE(16, 8, 4, 2, max_tokens_per_rank=9, aux_loss_coef=0.5)
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(dist.get_rank()))
    out, aux = moe(x, return_aux_loss=True)
    out.sum().backward()
    with_aux = moe.router.weight.grad.clone()
    moe.zero_grad()
    moe.router.aux_loss_coef = 0.0
    moe(x).sum().backward()
    without = moe.router.weight.grad.clone()

    weight = moe.router.weight.detach().requires_grad_()
    scores = (x @ weight.t()).softmax(dim=-1)
    picks = scores.topk(2, dim=-1).indices.flatten()
    fraction = torch.zeros(4).index_add(0, picks, torch.ones(picks.numel())) / picks.numel()
    by_hand = 0.5 * 4 * (fraction * scores.mean(0)).sum()
    torch.testing.assert_close(aux, by_hand.detach())
    (grad,) = torch.autograd.grad(by_hand, weight)
    assert grad.abs().max() > 0
    torch.testing.assert_close(with_aux - without, grad, rtol=1e-4, atol=1e-6)
    moe.destroy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_latency_mode_gives_the_normal_mode_output(world2, dtype):
    world2.run(low_latency_matches_normal_mode, "cpu", dtype)


def low_latency_matches_normal_mode(device, dtype):
    """In eval mode, low_latency=True moves tokens with the low-latency kernels: same layer, same output (a
    float32 layer's rows travel as bfloat16)."""
    torch.manual_seed(0)
    dev = _device(device)
    kwargs = dict(max_tokens_per_rank=8, shared_ffn_hidden=16, dtype=dtype, device=dev)
    normal = MoE(32, 16, 8, 3, **kwargs).eval()
    fast = MoE(32, 16, 8, 3, low_latency=True, **kwargs).eval()
    fast.load_state_dict(normal.state_dict())
    x = torch.randn(5 + 3 * dist.get_rank(), 32, generator=torch.Generator().manual_seed(dist.get_rank()))
    with torch.no_grad():
        got, want = fast(x.to(dev, dtype)), normal(x.to(dev, dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="low-latency"):
        MoE(32, 16, 8, 3, buffer=object(), low_latency=True)
    normal.destroy()
    fast.destroy()


def test_zero_copy_recv_buffer_gives_the_layer_the_same_output(world2):
    world2.run(zero_copy_layer_matches_normal, "cpu")


def zero_copy_layer_matches_normal(device):
    """A layer on a zero_copy_recv and zero_copy_combine buffer (on CUDA: rows in place, combine from the
    combine region) matches the same layer on a normal buffer: in inference over two forwards of different
    token counts, and in a training step (output, input and parameter gradients)."""
    dev, rank = _device(device), dist.get_rank()
    torch.manual_seed(0)
    kwargs = dict(max_tokens_per_rank=64, shared_ffn_hidden=16, dtype=torch.bfloat16, device=dev)
    normal = MoE(32, 16, 8, 3, **kwargs).eval()
    in_place = MoE(32, 16, 8, 3, buffer=torch_ep.Buffer(None, 8, 32, 64, device=dev.type, zero_copy_recv=True,
                                                        zero_copy_combine=True), **kwargs).eval()
    in_place.load_state_dict(normal.state_dict())
    with torch.no_grad():
        for step, tokens in enumerate((64 - 13 * rank, 7 + rank)):
            x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(10 * step + rank)).bfloat16().to(dev)
            assert torch.equal(in_place(x), normal(x)), f"forward {step}"
    x = torch.randn(9 + 5 * rank, 32, generator=torch.Generator().manual_seed(99 + rank)).bfloat16().to(dev)
    trained = []
    for layer in (normal, in_place):
        layer.train()
        leaf = x.clone().requires_grad_()
        out = layer(leaf)
        out.float().square().sum().backward()
        trained.append([out.detach(), leaf.grad] + [p.grad for p in layer.parameters()])
    for i, (a, b) in enumerate(zip(*trained)):
        torch.testing.assert_close(b, a, msg=lambda m: f"training, tensor {i}: {m}")
    normal.destroy()
    in_place.buffer.destroy()


def test_moe_rejects_bad_arguments(world2):
    world2.run(moe_rejects_bad_arguments)


def moe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_experts=3"):
        MoE(8, 8, 3, 1, max_tokens_per_rank=4)
    with pytest.raises(ValueError, match="score_func"):
        MoE(8, 8, 4, 1, max_tokens_per_rank=4, score_func="relu")
    with pytest.raises(ValueError, match="top_k=5"):
        MoE(8, 8, 4, 5, max_tokens_per_rank=4)
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        MoE(8, 8, 4, 1)
    with pytest.raises(ValueError, match="mesh_dim"):
        MoE(8, 8, 4, 1, max_tokens_per_rank=4, mesh_dim="ep")
    with torch_ep.Buffer(None, 4, 8, 4) as buffer:
        with pytest.raises(ValueError, match="hidden=16"):
            MoE(16, 8, 4, 1, buffer=buffer)


def test_moe_takes_the_ep_dimension_of_a_device_mesh(world2):
    world2.run(moe_on_mesh_dimension)


def moe_on_mesh_dimension():
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "ep"))
    with pytest.raises(ValueError, match="mesh_dim"):
        MoE(8, 8, 4, 1, group=mesh, max_tokens_per_rank=4)
    moe = MoE(8, 8, 4, 1, group=mesh, mesh_dim="ep", max_tokens_per_rank=4)
    assert moe.buffer.group is mesh.get_group("ep")
    assert (moe.num_local_experts, moe.expert_offset) == (2, 2 * dist.get_rank())
    assert moe(torch.randn(3, 8)).shape == (3, 8)
    moe.destroy()


def test_fsdp_ep_run_matches_data_parallel_run(world2, tmp_path):
    """dp 1 x ep 2 (experts split, FSDP2 on the rest) and dp 2 x ep 1 (every rank holds all experts)."""
    args = SMALL_MODEL + ["--steps", "4", "--no-compile", "--out", str(tmp_path)]
    (ep_losses, _), _ = world2.run(example_losses, args + ["--ep", "2"])
    (dp_losses, _), _ = world2.run(example_losses, args + ["--ep", "1"])
    assert len(ep_losses) == 4
    torch.testing.assert_close(torch.tensor(ep_losses), torch.tensor(dp_losses), rtol=1e-5, atol=0)
    assert ep_losses[-1] != ep_losses[0]  # it trained


def test_fsdp_ep_run_matches_single_process_run(world2, tmp_path):
    """Two ranks with 2 sequences each, experts split, against one process with all 4 sequences. No
    load-balancing loss: it counts the tokens of each rank, so it differs when the ranks hold other tokens."""
    args = SMALL_MODEL + ["--steps", "3", "--no-compile", "--aux-loss-coef", "0", "--out", str(tmp_path)]
    (ep_losses, _), _ = world2.run(example_losses, args + ["--ep", "2"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "torch_ep.examples.train",
           *args, "--batch", "4"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stdout + run.stderr
    single = [float(line.split("| loss ")[1].split()[0])
              for line in run.stdout.splitlines() if line.startswith("step ")]
    assert "1 ranks (dp 1 x ep 1)" in run.stdout
    torch.testing.assert_close(torch.tensor(ep_losses), torch.tensor(single), rtol=1e-4, atol=0)


def test_all_to_all_baseline_trains_the_same_model(world2, tmp_path):
    args = SMALL_MODEL + ["--steps", "3", "--no-compile", "--compare-nccl", "--out", str(tmp_path)]
    (losses, baseline), _ = world2.run(example_losses, args)
    torch.testing.assert_close(torch.tensor(baseline), torch.tensor(losses), rtol=1e-5, atol=0)


def test_checkpoint_resume_continues_identically(world2, tmp_path):
    args = SMALL_MODEL + ["--no-compile", "--out", str(tmp_path)]
    (straight, _), _ = world2.run(example_losses, args + ["--steps", "4"])
    world2.run(example_losses, args + ["--steps", "2", "--ckpt", str(tmp_path / "ckpt")])
    (resumed, _), _ = world2.run(example_losses, args + ["--steps", "4", "--resume", str(tmp_path / "ckpt")])
    assert len(resumed) == 2
    assert resumed == straight[2:]


def test_two_dimensional_mesh_and_a_checkpoint_resharded_to_another_ep_size(world4, tmp_path):
    """dp 2 x ep 2 for two steps, saved; resumed as dp 1 x ep 4: the losses of dp 4 x ep 1 throughout."""
    args = SMALL_MODEL + ["--no-compile", "--out", str(tmp_path)]
    (reference, _), *_ = world4.run(example_losses, args + ["--steps", "4", "--ep", "1"])
    ckpt = str(tmp_path / "ckpt")
    (first, _), *_ = world4.run(example_losses, args + ["--steps", "2", "--ep", "2", "--ckpt", ckpt])
    (second, _), *_ = world4.run(example_losses, args + ["--steps", "4", "--ep", "4", "--resume", ckpt])
    torch.testing.assert_close(torch.tensor(first + second), torch.tensor(reference), rtol=1e-5, atol=0)


def test_example_trains_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "torch_ep.examples.train",
           *SMALL_MODEL, "--layers", "1", "--steps", "3", "--ac", "--out", str(tmp_path),
           "--ckpt", str(tmp_path / "ckpt")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stdout + run.stderr
    steps = [line for line in run.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 3 and all("loss" in s and "tok/s" in s for s in steps), run.stdout
    assert "compile=True" in run.stdout
    with open(tmp_path / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "ckpt" / ".metadata").exists()


# -- GPU tests (the lead runs them on 2 GPUs) ---------------------------------------------------------

@pytest.fixture(scope="module")
def gpus():
    pool = Pool(2, backend="nccl", use_cuda=True)
    yield pool
    pool.close()


@pytest.mark.gpu
@needs_gpus
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_gpu_ep_layer_matches_single_process_layer(gpus, dtype, tol):
    gpus.run(ep_matches_single_process, "cuda", dtype, 3 if dtype == torch.float32 else 1, tol,
             score_func="softmax", renormalize=True, shared_ffn_hidden=64)


@pytest.mark.gpu
@needs_gpus
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_low_latency_layer_matches_normal_mode(gpus, dtype):
    gpus.run(low_latency_matches_normal_mode, "cuda", dtype)


@pytest.mark.gpu
@needs_gpus
def test_gpu_zero_copy_recv_layer_matches_normal(gpus):
    gpus.run(zero_copy_layer_matches_normal, "cuda")


@pytest.mark.gpu
@needs_gpus
def test_gpu_compiled_layer_matches_eager(gpus):
    gpus.run(compiled_moe_matches_eager, "cuda", torch.bfloat16, 3e-2)


@pytest.mark.gpu
@needs_gpus
def test_gpu_example_trains_and_benchmarks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "torch_ep.examples.train",
           "--steps", "20", "--compare-nccl", "--out", str(tmp_path), "--ckpt", str(tmp_path / "ckpt")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "bench: torch_ep" in run.stdout, run.stdout
    print(run.stdout)
