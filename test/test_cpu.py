"""torch_ep on CPU tensors: multi-process ranks over gloo (2 and 3 ranks), against the reference."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import cases
import soak
import torch_ep
from multiprocess import Pool
from reference import expected_dispatch, make_routing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- layout (local, single process) ----------------------------------------------------------------

def test_layout_counts_tokens_per_rank_and_expert():
    r = make_routing(0, 37, 8, 16, 4, seed=3)
    per_rank, per_expert, in_rank = torch.ops.ep.get_dispatch_layout(r.topk_idx, 16, 4)
    owner = torch.where(r.topk_idx >= 0, r.topk_idx // 4, -1)
    want_in_rank = torch.stack([(owner == d).any(1) for d in range(4)], dim=1)
    assert torch.equal(in_rank, want_in_rank)
    assert torch.equal(per_rank, want_in_rank.sum(0).int())
    assert torch.equal(per_expert, torch.bincount(r.topk_idx[r.topk_idx >= 0], minlength=16).int())


def test_layout_rejects_expert_id_out_of_range():
    with pytest.raises(ValueError, match="topk_idx"):
        torch.ops.ep.get_dispatch_layout(torch.tensor([[0, 16]]), 16, 4)


# -- dispatch / combine ----------------------------------------------------------------------------

@pytest.mark.parametrize("tokens,hidden,experts,k", [
    ([13, 7, 1], 8, 6, 2),      # odd, different token counts per rank
    ([64, 33, 50], 32, 12, 3),
    ([5, 5, 5], 16, 24, 1),     # top-1
])
def test_dispatch_and_combine_match_reference(world, tokens, hidden, experts, k):
    world.run(cases.dispatch_combine_roundtrip, "cpu", tokens, hidden, experts, k)


def test_four_ranks(world4):
    world4.run(cases.dispatch_combine_roundtrip, "cpu", [9, 0, 14, 3], 16, 8, 3, 4)
    world4.run(cases.gradients_match_reference, "cpu", [5, 8, 1, 6], 8, 8, 2)


def test_eight_ranks():
    pool = Pool(8)
    try:
        pool.run(cases.dispatch_combine_roundtrip, "cpu", [13, 0, 40, 7, 1, 22, 9, 31], 32, 64, 8, 1)
        pool.run(cases.dispatch_combine_roundtrip, "cpu", [5, 5, 5, 5, 5, 5, 5, 5], 16, 64, 8, 2, hot_rank=7,
                 p_none=0.0)
    finally:
        pool.close()


def test_rank_with_no_tokens_and_rank_receiving_nothing(world):
    # every expert of every token lives on rank 0; rank 1 sends nothing at all
    world.run(cases.dispatch_combine_roundtrip, "cpu", [9, 0, 4], 8, 6, 2, 1, torch.bfloat16, 0, 1,
              hot_rank=0, p_none=0.0)


def test_tokens_routed_nowhere_combine_to_zero(world):
    world.run(cases.dispatch_combine_roundtrip, "cpu", [11, 6, 3], 8, 6, 2, 2, torch.bfloat16, 0, 1, p_none=0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_other_activation_dtypes(world2, dtype):
    world2.run(cases.dispatch_combine_roundtrip, "cpu", [10, 7], 8, 4, 2, 4, dtype)


def test_no_host_sync_mode_pads_to_capacity(world):
    world.run(cases.dispatch_combine_roundtrip, "cpu", [10, 7, 3], 8, 6, 2, 5, torch.bfloat16, 40)


def _full_capacity_worker(tokens):
    """num_worst_tokens = every token of every rank, all routed to rank 0: rank 0 receives exactly
    num_worst_tokens rows (no padding) while every other rank receives none (all padding). Combine, cached
    dispatch and backward must still pair up across ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = [make_routing(r, tokens[r], 8, 2 * world, 2, seed=9, dtype=torch.float32, hot_rank=0, p_none=0.0,
                           num_ranks=world) for r in range(world)]
    capacity = sum(tokens[:world])
    with torch_ep.Buffer(None, 2 * world, 8, max(tokens), device="cpu") as buffer:
        x = inputs[rank].x.clone().requires_grad_()
        got = buffer.dispatch(x, inputs[rank].topk_idx, inputs[rank].topk_weights, num_worst_tokens=capacity)
        out = buffer.combine(got.recv_x * 2, got.handle)
        again = buffer.dispatch(x.detach() * 3, handle=got.handle).recv_x
        out.sum().backward()
    assert got.handle.num_recv_tokens_int() == (capacity if rank == 0 else 0)
    assert torch.equal(out, x.detach() * 2)  # each token went to rank 0 only
    assert torch.equal(again, got.recv_x.detach() * 3)
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_no_host_sync_mode_with_a_rank_receiving_exactly_capacity(world):
    world.run(_full_capacity_worker, [5, 4, 3])


def test_expert_alignment_rounds_counts_up(world2):
    world2.run(cases.dispatch_combine_roundtrip, "cpu", [10, 7], 8, 8, 2, 6, torch.bfloat16, 0, 4)


def test_fp8_dispatch_carries_scales(world2):
    world2.run(cases.fp8_dispatch_carries_scales, "cpu", [10, 7], 256, 4, 2)


def test_exact_mode_row_count_grows_and_shrinks(world2):
    world2.run(cases.exact_row_counts_change, "cpu", 256, 16, 4)


def test_zero_copy_recv_buffer_gives_the_same_results(world):
    world.run(cases.zero_copy_roundtrips, "cpu", 2048, 48, 8)


def test_zero_copy_recv_region_overflow_gives_the_same_results(world2):
    world2.run(cases.zero_copy_region_overflow, "cpu", 256, 8, 2)


def test_rejected_call_leaves_buffer_usable(world2):
    world2.run(cases.rejected_call_between_good_ones, "cpu", 256, 16, 4)


def test_gradients_match_dense_reference(world):
    world.run(cases.gradients_match_reference, "cpu", [9, 4, 6], 8, 6, 2)


def test_compiled_layer_matches_eager(world2):
    world2.run(cases.compiled_matches_eager, "cpu", [12, 5], 16, 4, 2)


def test_compiled_layer_no_host_sync(world2):
    world2.run(cases.compiled_matches_eager, "cpu", [12, 5], 16, 4, 2, 3, 32)


def _compiled_backward_collectives_worker(low_latency):
    """The backward graph torch.compile builds for dispatch + combine: its ep collective calls must form one chain
    of data dependencies. Inductor orders independent nodes by a peak-memory heuristic that depends on the
    (per-rank) sizes, so two independent calls could run in different orders on different ranks and pair up
    wrongly (dispatch's backward makes two: the gradients of x and of topk_weights)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    rank, world = dist.get_rank(), dist.get_world_size()
    backward_graphs = []

    def keep_backward(gm, example_inputs):
        backward_graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=keep_backward)
    r = make_routing(rank, 5 + rank, 16, 4, 2, seed=8, dtype=torch.bfloat16 if low_latency else torch.float32,
                     num_ranks=world)
    with torch_ep.Buffer(None, 4, 16, 8, device="cpu", low_latency=low_latency) as buffer:
        def layer(x, w):
            if low_latency:
                got = buffer.low_latency_dispatch(x, r.topk_idx, w)
                return buffer.low_latency_combine(got.recv_x * 2, got.handle, weights=got.recv_weights)
            got = buffer.dispatch(x, r.topk_idx, w)
            return buffer.combine(got.recv_x * got.recv_topk_weights.sum(1, keepdim=True), got.handle)

        torch._dynamo.reset()
        x, w = r.x.clone().requires_grad_(), r.topk_weights.clone().requires_grad_()
        torch.compile(layer, fullgraph=True, backend=backend)(x, w).float().sum().backward()
    (graph,) = [gm.graph for gm in backward_graphs]
    calls = [n for n in graph.nodes if n.op == "call_function" and getattr(n.target, "namespace", None) == "ep"]

    def ancestors(node):
        seen, todo = set(), list(node.all_input_nodes)
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(n.all_input_nodes)
        return seen

    assert len(calls) == 3, calls  # combine's (or cached dispatch's) backward, and dispatch's two
    for first, second in zip(calls, calls[1:]):
        assert first in ancestors(second), f"{second} does not depend on {first}"
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize("low_latency", [False, True], ids=["normal", "low_latency"])
def test_compiled_backward_chains_its_collectives(world2, low_latency):
    world2.run(_compiled_backward_collectives_worker, low_latency)


# -- gradcheck and opcheck ------------------------------------------------------------------------

class _Replicated(torch.autograd.Function):
    """Forward: this rank's slice of an input every rank holds whole. Backward: every rank's
    slice gradient, gathered, so each rank sees the gradient of the one global function."""

    @staticmethod
    def forward(ctx, full, rank, world):
        ctx.world = world
        return full.chunk(world)[rank].clone()

    @staticmethod
    def backward(ctx, grad):
        parts = [torch.empty_like(grad) for _ in range(ctx.world)]
        dist.all_gather(parts, grad.contiguous())
        return torch.cat(parts), None, None


class _Gathered(torch.autograd.Function):
    """Forward: every rank's output, concatenated. Backward: this rank's slice (all ranks hold the
    same upstream gradient, so no sum)."""

    @staticmethod
    def forward(ctx, part, rank, world):
        ctx.rank, ctx.world = rank, world
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.world)[ctx.rank].contiguous(), None, None


def _gradcheck_worker(num_tokens, hidden, experts, k):
    rank, world = dist.get_rank(), dist.get_world_size()
    routes = [make_routing(r, num_tokens, hidden, experts, k, seed=11, dtype=torch.float64, num_ranks=world)
              for r in range(world)]
    x = torch.cat([r.x for r in routes]).requires_grad_()
    w = torch.cat([r.topk_weights for r in routes]).double().requires_grad_()
    idx = routes[rank].topk_idx
    with torch_ep.Buffer(None, experts, hidden, num_tokens, device="cpu") as buffer:
        def layer(x_all, w_all):
            my_x = _Replicated.apply(x_all, rank, world)
            my_w = _Replicated.apply(w_all, rank, world).float()
            got = buffer.dispatch(my_x, idx, my_w)
            y = got.recv_x * (got.recv_topk_weights.sum(1, keepdim=True).double() + rank + 1)
            return _Gathered.apply(buffer.combine(y, got.handle), rank, world)

        # topk_weights travel as float32: the layer is linear in each input, so a large eps keeps the
        # finite differences exact while the float32 rounding of w stays far below the tolerance.
        assert torch.autograd.gradcheck(layer, (x, w), eps=1e-3, atol=1e-4, rtol=1e-3)


def test_gradcheck_float64(world):
    world.run(_gradcheck_worker, 3, 4, 6, 2)


def _opcheck_worker():
    rank = dist.get_rank()
    r = make_routing(rank, 6, 8, 4, 2, seed=5, dtype=torch.float32, num_ranks=dist.get_world_size())
    with torch_ep.Buffer(None, 4, 8, 8, device="cpu") as buffer:
        x = r.x.requires_grad_()
        torch.library.opcheck(torch.ops.ep.get_dispatch_layout.default, (r.topk_idx, 4, dist.get_world_size()))
        for worst in (0, 16):
            torch.library.opcheck(torch.ops.ep.dispatch.default,
                                  (x, None, r.topk_idx, r.topk_weights, buffer.name, 1, worst))
        handle = buffer.dispatch(x, r.topk_idx, r.topk_weights).handle
        y = torch.randn(handle.recv_src_idx.shape[0], 8, requires_grad=True)
        torch.library.opcheck(torch.ops.ep.combine.default, (y, *handle[:3], buffer.name))
        torch.library.opcheck(torch.ops.ep.cached_dispatch.default, (x, None, *handle[:3], buffer.name))


def test_opcheck_every_op(world2):
    world2.run(_opcheck_worker)


# -- bad input ------------------------------------------------------------------------------------

def _bad_dispatch_worker(case):
    """Rank 0 passes one bad argument; every rank must raise, rank 0 naming the argument."""
    rank = dist.get_rank()
    r = make_routing(rank, 6, 8, 4, 2, seed=1, num_ranks=dist.get_world_size())
    x, idx, w, kw = r.x, r.topk_idx, r.topk_weights, {}
    if rank == 0:
        if case == "x_dtype":
            x = x.to(torch.int32)
        elif case == "x_rank":
            x = x.reshape(-1)
        elif case == "hidden":
            x = torch.randn(6, 4)
        elif case == "too_many_tokens":
            x, idx, w = torch.randn(20, 8), torch.zeros(20, 2, dtype=torch.long), torch.rand(20, 2)
        elif case == "expert_too_large":
            idx = idx.clone()
            idx[0, 0] = 4
        elif case == "expert_below_minus_one":
            idx = idx.clone()
            idx[1, 1] = -2
        elif case == "topk_dtype":
            idx = idx.int()
        elif case == "weights_shape":
            w = w[:, :1]
        elif case == "fp8_without_scales":
            x = x.to(torch.float8_e4m3fn)
        elif case == "alignment":
            kw = {"expert_alignment": 0}
        elif case == "int_weights":  # refused by Buffer.dispatch itself, before the op
            w = idx
        elif case == "other_layout":
            kw = {"layout": torch_ep.DispatchLayout(*torch.ops.ep.get_dispatch_layout(idx[:3], 4, dist.get_world_size()))}
        elif case == "no_weights":
            w = None
        elif case == "x_tuple":
            x = (x,)
    with torch_ep.Buffer(None, 4, 8, 8, device="cpu") as buffer:
        try:
            buffer.dispatch(x, idx, w, **kw)
        except ValueError as exc:
            message = str(exc)
        else:
            raise AssertionError("dispatch accepted bad input")
        # the ranks' next calls pair up: each rank receives what the reference says
        want = expected_dispatch([make_routing(s, 6, 8, 4, 2, seed=1, num_ranks=dist.get_world_size())
                                  for s in range(dist.get_world_size())], rank, 4)
        got = buffer.dispatch(r.x, r.topk_idx, r.topk_weights)
        assert torch.equal(got.recv_x, want.x) and torch.equal(got.handle.recv_src_idx.long(), want.src_idx)
    return message


@pytest.mark.parametrize("case,name", [
    ("x_dtype", "x must be"), ("x_rank", "x must be 2-D"), ("hidden", "hidden"),
    ("too_many_tokens", "max_tokens_per_rank"), ("expert_too_large", "topk_idx"),
    ("expert_below_minus_one", "topk_idx"), ("topk_dtype", "topk_idx"), ("weights_shape", "topk_weights"),
    ("fp8_without_scales", "x_scales"), ("alignment", "expert_alignment"),
    ("int_weights", "Buffer.dispatch: topk_weights must be"), ("other_layout", "layout.is_token_in_rank"),
    ("no_weights", "topk_idx and topk_weights are required"), ("x_tuple", "got a tuple of 1"),
])
def test_bad_dispatch_input_raises_on_every_rank(world2, case, name):
    errors = world2.run(_bad_dispatch_worker, case)
    assert name in errors[0], errors[0]
    assert "rank 0 rejected" in errors[1], errors[1]


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_experts=5, hidden=8, max_tokens_per_rank=4), "num_experts"),
    (dict(num_experts=4, hidden=0, max_tokens_per_rank=4), "hidden"),
    (dict(num_experts=4, hidden=8), "max_tokens_per_rank or num_bytes"),
    (dict(num_experts=4, hidden=8, max_tokens_per_rank=64, num_bytes=1000), "num_bytes"),
])
def test_bad_buffer_arguments(world2, kwargs, name):
    for message in world2.run(cases.refused_buffer, "cpu", kwargs):
        assert name in message, message


SMALL_BUFFER = dict(num_experts=4, hidden=8, max_tokens_per_rank=4)


@pytest.mark.parametrize("kwargs,name", [(dict(num_sms=0), "num_sms"), (dict(timeout_s=-1.0), "timeout_s"),
                                         (dict(num_experts=3), "num_experts")])
def test_arguments_refused_on_one_rank_raise_on_every_rank(world2, kwargs, name):
    # the other rank must raise too, not wait for rank 1 in the next collective
    errors = world2.run(cases.refused_buffer, "cpu", SMALL_BUFFER, {1: kwargs})
    assert name in errors[1], errors[1]
    assert "rank 1 failed to build its buffer" in errors[0] and name in errors[0], errors[0]
    world2.run(cases.dispatch_combine_roundtrip, "cpu", [5, 3], 8, 4, 2)  # the ranks' next Buffer works


def test_buffers_that_would_differ_are_refused_on_every_rank(world2):
    for message in world2.run(cases.refused_buffer, "cpu", SMALL_BUFFER, {1: {"transport": "process_group"}}):
        assert "ranks disagree on transport (rank 0: None, rank 1: process_group)" in message, message


def test_combine_input_is_a_plain_tensor_on_cpu(world2):
    world2.run(cases.combine_input_roundtrips, "cpu", 64, 8, 2, max_tokens=16)


def _bad_combine_input_worker():
    with torch_ep.Buffer(None, 4, 8, 4, device="cpu", zero_copy_combine=True) as buffer:
        messages = []
        for args in ((-1,), (3, torch.float32)):
            try:
                buffer.combine_input(*args)
            except ValueError as exc:
                messages.append(str(exc))
        return messages


def test_combine_input_refuses_bad_arguments(world2):
    for messages in world2.run(_bad_combine_input_worker):
        assert len(messages) == 2 and "num_rows=-1" in messages[0] and "dtype" in messages[1], messages


def _combine_wrong_rows_worker():
    rank = dist.get_rank()
    r = make_routing(rank, 6, 8, 4, 2, seed=2, num_ranks=2)
    with torch_ep.Buffer(None, 4, 8, 8, device="cpu") as buffer:
        got = buffer.dispatch(r.x, r.topk_idx, r.topk_weights)
        y = got.recv_x if rank else got.recv_x[1:]
        try:
            buffer.combine(y, got.handle)
        except ValueError as exc:
            return str(exc)
    raise AssertionError("combine accepted y with the wrong number of rows")


def test_combine_rejects_wrong_row_count(world2):
    errors = world2.run(_combine_wrong_rows_worker)
    assert "ep.combine: y must be" in errors[0] and "rank 0 rejected" in errors[1]


# -- the Buffer object ----------------------------------------------------------------------------

def _destroyed_buffer_worker():
    buffer = torch_ep.Buffer(num_experts=4, hidden=8, max_tokens_per_rank=8, device="cpu")
    assert buffer.group is dist.group.WORLD and buffer.config.num_ranks == dist.get_world_size()
    buffer.destroy()
    r = make_routing(0, 2, 8, 4, 1)
    try:
        buffer.dispatch(r.x, r.topk_idx, r.topk_weights)
    except RuntimeError as exc:
        return str(exc)
    raise AssertionError("a destroyed buffer still dispatched")


def test_destroyed_buffer_raises(world2):
    for message in world2.run(_destroyed_buffer_worker):
        assert "no live Buffer" in message


def _num_bytes_worker():
    need = torch_ep._C.buffer_bytes(2, 4, 8, 100)
    with torch_ep.Buffer(None, 4, 8, num_bytes=need, device="cpu") as buffer:
        return buffer.config.max_tokens_per_rank


def test_num_bytes_sizes_max_tokens(world2):
    assert world2.run(_num_bytes_worker) == [100, 100]


# -- the demo -------------------------------------------------------------------------------------

def test_demo_runs_under_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "torch_ep.demo",
           "--tokens", "64", "--hidden", "64", "--experts", "8", "--topk", "2"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK: output and gradients match the single-process reference" in run.stdout, run.stdout


# -- reliability: leaks, soak, compile cache, exit ---------------------------------------------------

def test_buffer_cycles_and_steps_leak_nothing(world2):
    cycles, steps = (200, 10_000) if soak.LONG else (200, 300)
    world2.run(soak.leak_check, "cpu", cycles, steps)


def test_soak_random_routing_matches_reference(world):
    iterations, check_every = (10_000, 10) if soak.LONG else (150, 1)
    for result in world.run(soak.soak, "cpu", iterations, check_every):
        assert result["mismatches"] == 0 and result["checked"] == -(-iterations // check_every), result


def test_rank_receiving_nothing_with_odd_topk(world2):
    # every expert lives on rank 0, so rank 1 receives no rows; 3 fp32 weights make the packed row
    # a width no 8-byte dtype can view without a copy
    world2.run(cases.dispatch_combine_roundtrip, "cpu", [5, 4], 8, 4, 3, 0, torch.bfloat16, hot_rank=0, p_none=0.0)


def _compiled_dispatch_combine(num_experts):
    """Compile dispatch+combine with inputs whose shapes do not depend on the group (12 tokens, top-2):
    only the buffer tells the fake kernels R and E."""
    rank, world = dist.get_rank(), dist.get_world_size()
    r = make_routing(rank, 12, 16, num_experts, 2, seed=1, dtype=torch.float32, num_ranks=world)
    with torch_ep.Buffer(None, num_experts, 16, 12, device="cpu") as buffer:
        def layer(x, idx, w):
            got = buffer.dispatch(x, idx, w)
            return buffer.combine(got.recv_x * 2, got.handle), got.num_recv_tokens_per_expert

        eager = layer(r.x, r.topk_idx, r.topk_weights)
        compiled = torch.compile(layer, fullgraph=True)(r.x, r.topk_idx, r.topk_weights)
    for want, got in zip(eager, compiled):
        assert torch.equal(want, got)


def test_compile_cache_is_not_reused_across_world_sizes_or_expert_counts(tmp_path, monkeypatch):
    # Jobs keep their inductor cache between runs: a graph compiled for another group shape must not be
    # reused, although every input has the same shape in the three runs.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    for world_size, num_experts in ((3, 6), (2, 4), (2, 8)):
        pool = Pool(world_size)
        try:
            pool.run(_compiled_dispatch_combine, num_experts)
        finally:
            pool.close()
    assert any(tmp_path.iterdir())  # the runs did share a cache


def _buffer_name_worker(num_experts):
    with torch_ep.Buffer(None, num_experts, 16, 8, device="cpu") as buffer:
        return buffer.name


def test_buffer_name_encodes_the_config(world2):
    four, eight = world2.run(_buffer_name_worker, 4)[0], world2.run(_buffer_name_worker, 8)[0]
    assert "_r2_e4_h16_t8_" in four and "_r2_e8_h16_t8_" in eight
    assert world2.run(_buffer_name_worker, 4)[0] != four  # the counter tells live buffers apart


def _destroy_twice_worker():
    buffer = torch_ep.Buffer(None, 4, 8, 8, device="cpu")
    buffer.destroy()
    buffer.destroy()
    with torch_ep.Buffer(None, 4, 8, 8, device="cpu") as other:
        other.destroy()  # leaving the with block destroys it again
    return True


def test_destroy_is_idempotent(world2):
    assert world2.run(_destroy_twice_worker) == [True, True]


EXIT_SCRIPT = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
import torch_ep
buffer = torch_ep.Buffer(None, 4, 8, 8, device="cpu")
got = buffer.dispatch(torch.randn(6, 8), torch.randint(0, 4, (6, 2)), torch.rand(6, 2))
buffer.combine(got.recv_x, got.handle)
{ending}
print("reached the end", flush=True)
"""


@pytest.mark.parametrize("ending", ["", "dist.destroy_process_group()"], ids=["live_buffer", "destroyed_group"])
def test_interpreter_exit_with_live_buffer_is_clean(tmp_path, ending):
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT.format(ending=ending))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("reached the end") == 2
    assert "terminate called" not in run.stderr, run.stderr


# -- API ---------------------------------------------------------------------------------------------

def _api_worker():
    rank, world = dist.get_rank(), dist.get_world_size()
    r = make_routing(rank, 7, 8, 4, 2, seed=4, dtype=torch.float32, num_ranks=world)
    with torch_ep.Buffer(None, 4, 8, 8, device="cpu") as buffer:
        layout = buffer.get_dispatch_layout(r.topk_idx)
        fp32 = buffer.dispatch(r.x, r.topk_idx, r.topk_weights, layout=layout)
        bf16_weights = r.topk_weights.bfloat16()
        bf16 = buffer.dispatch(r.x, r.topk_idx, bf16_weights)
        again = buffer.dispatch(r.x * 2, handle=fp32.handle)
        errors = {}
        for name, call in {
            "int_weights": lambda: buffer.dispatch(r.x, r.topk_idx, r.topk_idx),
            "other_layout": lambda: buffer.dispatch(r.x, r.topk_idx, r.topk_weights,
                                                    layout=buffer.get_dispatch_layout(r.topk_idx[:3])),
        }.items():
            try:
                call()
            except ValueError as exc:
                errors[name] = str(exc)
    assert isinstance(again, torch_ep.DispatchResult) and again.handle is fp32.handle
    assert again.recv_topk_idx is None and again.recv_topk_weights is None
    assert again.num_recv_tokens_per_expert is None
    assert torch.equal(again.recv_x, fp32.recv_x * 2)
    assert bf16.recv_topk_weights.dtype == torch.float32
    assert torch.equal(bf16.recv_topk_weights, torch.where(fp32.recv_topk_idx >= 0,
                                                           fp32.recv_topk_weights.bfloat16().float(), 0.0))
    assert fp32.handle.num_recv_tokens_int() == fp32.recv_x.shape[0]
    counts = fp32.num_recv_tokens_per_expert_list()
    assert counts == fp32.num_recv_tokens_per_expert.tolist() and all(isinstance(c, int) for c in counts)
    assert "Buffer.dispatch: topk_weights must be bfloat16, float16 or float32, got int64" in errors["int_weights"]
    assert "Buffer.dispatch: layout.is_token_in_rank must be bool [7, 2]" in errors["other_layout"]


def test_dispatch_api_results_layout_and_router_weights(world2):
    world2.run(_api_worker)


_CALLS_LIB = torch.library.Library("ep_test_calls", "DEF")
_CALLS_LIB.define("double(Tensor x) -> Tensor")
_CALLS_LIB.impl("double", lambda x: x * 2, "CPU")
_autograd_calls = []  # the op's autograd kernel, per call: whether its input needed a gradient


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.ep_test_calls.double.default(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def _double_autograd(x):
    _autograd_calls.append(x.requires_grad)
    return _Double.apply(x)


_CALLS_LIB.impl("double", _double_autograd, "Autograd")


def test_ops_skip_the_autograd_layer_only_when_no_gradient_is_needed():
    op = torch.ops.ep_test_calls.double.default
    x = torch.randn(3)
    _autograd_calls.clear()
    assert torch.equal(torch_ep.buffer.call_op(op, (x,), x), x * 2)
    w = x.clone().requires_grad_()
    out = torch_ep.buffer.call_op(op, (None, w), w)
    out.sum().backward()
    assert torch.equal(w.grad, torch.full((3,), 2.0))
    with torch.no_grad():
        assert torch_ep.buffer.call_op(op, (w,), w).grad_fn is None
    assert torch.equal(op(x), x * 2)
    assert _autograd_calls == [True, False]  # the plain call goes through it, call_op only for w's gradient


def _bf16_weights_gradient_worker():
    rank = dist.get_rank()
    r = make_routing(rank, 5, 8, 4, 2, seed=6, dtype=torch.float32, num_ranks=2)
    with torch_ep.Buffer(None, 4, 8, 8, device="cpu") as buffer:
        w = r.topk_weights.bfloat16().requires_grad_()
        got = buffer.dispatch(r.x, r.topk_idx, w)
        buffer.combine(got.recv_x * got.recv_topk_weights.sum(1, keepdim=True), got.handle).sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.bfloat16 and bool(w.grad[r.topk_idx >= 0].ne(0).any())


def test_bf16_topk_weights_get_bf16_gradients(world2):
    world2.run(_bf16_weights_gradient_worker)


def _more_ranks_than_cuda_worker():
    torch_ep.buffer.MAX_CUDA_RANKS = 1  # as if the group were wider than one NVLink domain
    try:
        with torch_ep.Buffer(None, 4, 8, 8, device="cpu") as buffer:
            got = buffer.dispatch(torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
            rows = got.recv_x.shape[0]
        try:
            torch_ep.Buffer(None, 4, 8, num_bytes=1 << 20, device="cpu")
        except ValueError as exc:
            return rows, str(exc)
    finally:
        torch_ep.buffer.MAX_CUDA_RANKS = torch_ep._C.MAX_RANKS
    raise AssertionError("num_bytes was accepted for a group wider than a CUDA buffer")


def test_cpu_buffer_has_no_cuda_rank_limit(world2):
    (rows0, msg), (rows1, _) = world2.run(_more_ranks_than_cuda_worker)
    assert (rows0, rows1) == (6, 0)
    assert "pass max_tokens_per_rank" in msg


@pytest.mark.parametrize("capability,archs,ptx,runs", [
    ((9, 0), (90,), 0, True), ((8, 6), (80,), 0, True), ((12, 0), (80, 90, 100), 100, True),
    ((8, 0), (90,), 0, False), ((9, 0), (80, 100), 0, False), ((7, 5), (80, 90, 100), 100, False),
])
def test_capability_rule(capability, archs, ptx, runs):
    try:
        torch_ep._checks.check_capability(capability, archs, ptx, "cuda:0")
        assert runs
    except RuntimeError as exc:
        assert not runs
        assert f"compute capability {capability[0]}.{capability[1]}" in str(exc)
        assert f'TORCH_CUDA_ARCH_LIST="{capability[0]}.{capability[1]}"' in str(exc)


def _unsupported_gpu_worker():
    import unittest.mock as mock
    with mock.patch.object(torch_ep._C, "WITH_CUDA", True), \
            mock.patch.object(torch_ep._C, "CUDA_ARCHS", (90,)), mock.patch.object(torch_ep._C, "CUDA_PTX_ARCH", 0), \
            mock.patch("torch.cuda.get_device_capability", return_value=(8, 0)):
        try:
            torch_ep.Buffer(None, 4, 8, 8, device="cuda:0")
        except RuntimeError as exc:
            return str(exc)
    raise AssertionError("a Buffer was built for a GPU the kernels were not compiled for")


def test_buffer_on_unsupported_gpu_says_how_to_rebuild(world2):
    for message in world2.run(_unsupported_gpu_worker):
        assert "compute capability 8.0" in message and "built for 9.0" in message and "TORCH_CUDA_ARCH_LIST" in message


FIRST_CALL_SCRIPT = """
import sys, time
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
start = time.perf_counter()
import torch_ep
with torch_ep.Buffer(None, 4, 8, 8, device="cpu") as buffer:
    got = buffer.dispatch(torch.randn(6, 8), torch.randint(0, 4, (6, 2)), torch.rand(6, 2))
    buffer.combine(got.recv_x, got.handle)
print(time.perf_counter() - start, "torch._dynamo" in sys.modules)
"""


def test_import_and_first_call_cost_well_under_a_second():
    from multiprocess import _free_port
    run = subprocess.run([sys.executable, "-c", FIRST_CALL_SCRIPT.format(port=_free_port())], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr
    seconds, dynamo = run.stdout.split()
    assert dynamo == "False", "the first op call imported torch._dynamo"
    assert float(seconds) < 1.0, f"import torch_ep + first dispatch/combine took {seconds} s"
    assert "NumPy" not in run.stderr, run.stderr
