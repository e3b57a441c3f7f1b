"""Checks that run on every rank of a pool, on CPU (gloo) or CUDA tensors.

Each function builds its buffer, runs the ops, and asserts against test/reference.py. Every
collective call comes before the first assertion, so a rank that fails never leaves its peers
waiting in a collective.
"""
import os

import torch
import torch.distributed as dist

import torch_ep
from reference import (capture_graph, expected_combine, expected_dispatch, expert_output, make_routing, owned,
                       replay_with)


def _device(device: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def _inputs(tokens, hidden, num_experts, k, seed, **kw):
    num_ranks = dist.get_world_size()
    return [make_routing(r, tokens[r % len(tokens)], hidden, num_experts, k, seed=seed, num_ranks=num_ranks, **kw)
            for r in range(num_ranks)]


def _on(routing, dev):
    return routing.x.to(dev), routing.topk_idx.to(dev), routing.topk_weights.to(dev)


def dispatch_combine_roundtrip(device, tokens, hidden, num_experts, k, seed=0, dtype=torch.bfloat16,
                               num_worst_tokens=0, alignment=1, num_sms=torch_ep.buffer.DEFAULT_NUM_SMS, **routing_kw):
    """dispatch matches the reference row for row; combine matches it bit for bit."""
    rank, dev = dist.get_rank(), _device(device)
    inputs = _inputs(tokens, hidden, num_experts, k, seed, dtype=dtype, **routing_kw)
    want = expected_dispatch(inputs, rank, num_experts, alignment)
    n = want.x.shape[0]
    with torch_ep.Buffer(None, num_experts, hidden, max(max(tokens), 1), device=device, num_sms=num_sms) as buffer:
        x, idx, w = _on(inputs[rank], dev)
        got = buffer.dispatch(x, idx, w, expert_alignment=alignment, num_worst_tokens=num_worst_tokens)
        out = buffer.combine(expert_output(got.recv_x, rank), got.handle)
        rows = num_worst_tokens or n
        assert got.recv_x.shape == (rows, hidden), got.recv_x.shape
        assert int(got.handle.num_recv_tokens) == n
        torch.testing.assert_close(got.recv_x[:n].cpu(), want.x, rtol=0, atol=0)
        assert torch.equal(got.recv_topk_idx[:n].cpu(), want.topk_idx)
        assert torch.equal(got.recv_topk_weights[:n].cpu(), want.weights)
        assert torch.equal(got.handle.recv_src_idx[:n].cpu().long(), want.src_idx)
        assert torch.equal(got.num_recv_tokens_per_expert.cpu().long(), want.per_expert)
        if rows > n:  # padding rows name no expert
            assert bool((got.recv_topk_idx[n:] == -1).all()) and bool((got.recv_topk_weights[n:] == 0).all())
            assert bool((got.handle.recv_src_idx[n:] == -1).all())
        torch.testing.assert_close(out.cpu(), expected_combine(inputs, rank, num_experts), rtol=0, atol=0)
    return n


def refused_buffer(device, common: dict, per_rank: dict = None) -> str:
    """Buffer(**common, **per_rank[rank]) must raise ValueError on this rank: its message."""
    rank = dist.get_rank()
    kwargs = {**common, **(per_rank or {}).get(rank, {})}
    try:
        torch_ep.Buffer(None, device=device, **kwargs)
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"rank {rank}: Buffer({kwargs}) was built")


def repeated_roundtrips(device, hidden, num_experts, k, steps, seed=100):
    """Back-to-back dispatch / combine / cached dispatch on one buffer with fresh routing and token counts
    (zero included) every step: the ops' handshakes must keep consecutive calls apart."""
    rank, world, dev = dist.get_rank(), dist.get_world_size(), _device(device)
    max_tokens = 257
    with torch_ep.Buffer(None, num_experts, hidden, max_tokens, device=device) as buffer:
        for step in range(steps):
            g = torch.Generator().manual_seed(seed + step)
            tokens = [int(v) for v in torch.randint(0, max_tokens + 1, (world,), generator=g)]
            tokens[step % world] = step % 3  # a rank with no or almost no tokens
            inputs = _inputs(tokens, hidden, num_experts, k, seed + step, hot_rank=step % (world + 1) - 1)
            want = expected_dispatch(inputs, rank, num_experts)
            x, idx, w = _on(inputs[rank], dev)
            got = buffer.dispatch(x, idx, w)
            again = buffer.dispatch(x, handle=got.handle).recv_x
            out = buffer.combine(expert_output(got.recv_x, rank), got.handle)
            assert torch.equal(got.recv_x.cpu(), want.x), f"step {step}: dispatch"
            assert torch.equal(got.recv_topk_idx.cpu(), want.topk_idx), f"step {step}: recv_topk_idx"
            assert torch.equal(again.cpu(), want.x), f"step {step}: cached dispatch"
            assert torch.equal(out.cpu(), expected_combine(inputs, rank, num_experts)), f"step {step}: combine"


def _fp8_scales(inputs, hidden, rank, num_experts, seed=0):
    """Every rank's FP8 scales (seeded, so each rank knows all of them) and the ones `rank` receives."""
    scales = [torch.rand(r.x.shape[0], (hidden + 127) // 128, generator=torch.Generator().manual_seed(seed + s)) + 0.5
              for s, r in enumerate(inputs)]
    per_rank = num_experts // len(inputs)
    return scales, torch.cat([sc[owned(r.topk_idx, rank, per_rank).any(1)] for sc, r in zip(scales, inputs)])


def exact_row_counts_change(device, hidden, num_experts, k, seed=300, num_sms=torch_ep.buffer.DEFAULT_NUM_SMS):
    """The exact mode on one buffer while the received row count grows past what earlier calls received and
    shrinks again (bf16 and FP8 rows in turn): every call returns exactly its rows, equal to the reference."""
    rank, dev = dist.get_rank(), _device(device)
    counts = [3, 250, 250, 1, 240, 0, 256]
    with torch_ep.Buffer(None, num_experts, hidden, max(counts), device=device, num_sms=num_sms) as buffer:
        for step, tokens in enumerate(counts):
            inputs = _inputs([tokens], hidden, num_experts, k, seed + step, dtype=torch.float32)
            want = expected_dispatch(inputs, rank, num_experts)
            x, idx, w = _on(inputs[rank], dev)
            fp8 = step % 2 == 1
            if fp8:
                scales, want_scales = _fp8_scales(inputs, hidden, rank, num_experts, seed + step)
                got = buffer.dispatch((x.to(torch.float8_e4m3fn), scales[rank].to(dev)), idx, w)
                recv_x, recv_scales = got.recv_x
                assert torch.equal(recv_scales.cpu(), want_scales), f"step {step}: scales"
                assert torch.equal(recv_x.cpu().view(torch.uint8),
                                   want.x.to(torch.float8_e4m3fn).view(torch.uint8)), f"step {step}: FP8 rows"
            else:
                got = buffer.dispatch(x.to(torch.bfloat16), idx, w)
                assert torch.equal(got.recv_x.cpu(), want.x.to(torch.bfloat16)), f"step {step}: rows"
            assert int(got.handle.num_recv_tokens) == want.x.shape[0]
            assert torch.equal(got.recv_topk_idx.cpu(), want.topk_idx), f"step {step}: recv_topk_idx"
            assert torch.equal(got.recv_topk_weights.cpu(), want.weights), f"step {step}: recv_topk_weights"
            assert torch.equal(got.handle.recv_src_idx.cpu().long(), want.src_idx), f"step {step}: recv_src_idx"


def combine_input_roundtrips(device, hidden, num_experts, k, seed=700, num_sms=torch_ep.buffer.DEFAULT_NUM_SMS,
                             max_tokens=256, graph=False):
    """combine with y written into Buffer.combine_input on every rank (a zero_copy_combine buffer): token counts
    that change (zero, odd, a rank receiving nothing, a hot rank), bf16 and fp16, exact and fixed-capacity
    dispatches; every combine equals the reference bit for bit and, on CUDA, y is the combine region (the same
    address every call). graph: also a captured dispatch + combine, replayed with fresh routing."""
    rank, world, dev = dist.get_rank(), dist.get_world_size(), _device(device)
    steps = [  # (tokens per rank, dtype, num_worst_tokens, routing)
        ([3, max_tokens], torch.bfloat16, 0, {}), ([max_tokens, 0], torch.float16, world * max_tokens, {}),
        ([0, 0], torch.bfloat16, 0, {}), ([max_tokens - 1, max_tokens // 2 + 1], torch.bfloat16, 0, {"hot_rank": 1}),
        ([1, max_tokens], torch.bfloat16, 0, {"hot_rank": 0, "p_none": 0.0}), ([max_tokens] * 2, torch.bfloat16, 0, {}),
    ]
    addresses = set()
    with torch_ep.Buffer(None, num_experts, hidden, max_tokens, device=device, zero_copy_combine=True,
                         num_sms=num_sms) as buffer:
        for step, (tokens, dtype, worst, routing) in enumerate(steps):
            inputs = _inputs(tokens, hidden, num_experts, k, seed + step, dtype=dtype, **routing)
            x, idx, w = _on(inputs[rank], dev)
            got = buffer.dispatch(x, idx, w, num_worst_tokens=worst)
            y = buffer.combine_input(got.recv_x.shape[0], dtype)
            y.copy_(expert_output(got.recv_x, rank))
            out = buffer.combine(y, got.handle)
            buffer.synchronize()  # a device-side error (ranks that disagree on the mode) is raised, not summed
            addresses.add(y.untyped_storage().data_ptr())  # y.data_ptr() is 0 without rows
            assert y.shape == got.recv_x.shape and y.dtype == dtype
            assert torch.equal(out.cpu(), expected_combine(inputs, rank, num_experts)), f"step {step}: combine"
        if graph:
            y = buffer.combine_input(world * max_tokens)
            _captured_roundtrip(buffer, hidden, num_experts, k, seed + len(steps), max_tokens,
                                lambda got: y.copy_(expert_output(got.recv_x, rank)))
    assert device == "cpu" or len(addresses) == 1, addresses


def _captured_roundtrip(buffer, hidden, num_experts, k, seed, max_tokens, expert):
    """dispatch -> y = expert(result) -> combine(y), captured once, replayed with new routing."""
    rank, world, dev = dist.get_rank(), dist.get_world_size(), _device("cuda")
    first = _inputs([max_tokens], hidden, num_experts, k, seed)[rank]
    static = list(_on(first, dev))

    def step():
        got = buffer.dispatch(*static, num_worst_tokens=world * max_tokens)
        return buffer.combine(expert(got), got.handle)

    graph, out = capture_graph(step)
    for replay in range(1, 4):
        inputs = _inputs([max_tokens], hidden, num_experts, k, seed + replay, hot_rank=replay % world)
        replay_with(graph, static, inputs[rank])
        assert torch.equal(out.cpu(), expected_combine(inputs, rank, num_experts)), f"replay {replay}"


def zero_copy_roundtrips(device, hidden, num_experts, k, seed=500, num_sms=torch_ep.buffer.DEFAULT_NUM_SMS,
                         graph=False):
    """A zero_copy_recv buffer: bf16, FP8 and float32 rows, exact and fixed-capacity calls, token counts that
    change (zero, odd, a rank receiving nothing, a hot rank): every call equals the reference. Rank 0 keeps
    every output, so its recv region fills and its later calls take their rows through staging while its
    peers' land in place; what it keeps never changes. On CUDA the other ranks get every bf16 recv_x at one
    address (the region's start: each output is freed before the next call). Inputs that need a gradient get
    it (dispatch's backward is a combine). graph: also a captured dispatch + combine, replayed with new
    routing. With more ranks the token counts repeat over them."""
    rank, dev = dist.get_rank(), _device(device)
    steps = [  # (tokens per rank, dtype, num_worst_tokens, routing)
        ([3, 250], torch.bfloat16, 0, {}), ([250, 0], torch.bfloat16, 500, {}),
        ([177, 31], "fp8", 0, {}), ([0, 0], torch.bfloat16, 0, {}), ([256, 255], torch.float32, 0, {}),
        ([200, 101], torch.bfloat16, 0, {"hot_rank": 1}), ([64, 129], "fp8", 512, {"hot_rank": 0, "p_none": 0.0}),
        ([256, 256], torch.bfloat16, 0, {}), ([100, 7], torch.bfloat16, 300, {}),
    ]
    kept, addresses = [], set()
    with torch_ep.Buffer(None, num_experts, hidden, 256, device=device, zero_copy_recv=True, num_sms=num_sms) as buffer:
        for step, (tokens, dtype, worst, routing) in enumerate(steps):
            rows, want = _zero_copy_step(buffer, dev, tokens, dtype, worst, routing, hidden, num_experts, k,
                                         seed + step, f"step {step}")
            if rank == 0:
                kept.append((rows, want, step))
            elif dtype == torch.bfloat16 and rows.shape[0] > 0:
                addresses.add(rows.data_ptr())
            del rows, want  # rank 0 keeps them in `kept`; the others free them before the next call
        grad, want_grad = _zero_copy_gradient(buffer, dev, hidden, num_experts, k, seed)
        if graph:
            _captured_roundtrip(buffer, hidden, num_experts, k, seed + len(steps), 256,
                                lambda got: expert_output(got.recv_x, rank))
    for rows, want, step in kept:  # after every later call and the buffer's destruction
        assert torch.equal(rows.cpu().view(torch.uint8), want.view(torch.uint8)), f"step {step}: kept rows changed"
    assert torch.equal(grad.cpu(), want_grad), "x.grad"
    # Under compute-sanitizer the frames of each op call stay referenced after it returns (gc.get_referrers of a
    # freed call's recv_x shows them), so its outputs live on and fill the region: only the results count there.
    if dev.type == "cuda" and buffer.transport == "nvlink" and not os.environ.get("TORCH_EP_EXPECT_SANITIZER"):
        assert rank == 0 or len(addresses) == 1, f"rows not in the recv region: {len(addresses)} addresses"


def zero_copy_region_overflow(device, hidden, num_experts, k, seed=800, max_tokens=64):
    """Rank 0 keeps a fixed-capacity output that takes all but 16 rows of its recv region; then an exact call
    receives more rows than those: the first ones land in place, the rest through staging (the exact mode's
    dropped rows). Every call equals the reference, and the kept rows do not change."""
    rank, world, dev = dist.get_rank(), dist.get_world_size(), _device(device)
    region_rows = world * max_tokens
    with torch_ep.Buffer(None, num_experts, hidden, max_tokens, device=device, zero_copy_recv=True) as buffer:
        kept = _zero_copy_step(buffer, dev, [(region_rows - 16) // world], torch.bfloat16, region_rows - 16,
                               {"p_none": 0.0}, hidden, num_experts, k, seed, "fixed capacity")
        if rank != 0:
            kept = None
        for step in range(2):
            _zero_copy_step(buffer, dev, [max_tokens], torch.bfloat16, 0, {"p_none": 0.0}, hidden, num_experts, k,
                            seed + 1 + step, f"exact call {step}")
            if kept is not None:
                rows, want = kept
                assert torch.equal(rows.cpu(), want), "kept rows changed"
            kept = None  # the second call has the whole region


def _zero_copy_step(buffer, dev, tokens, dtype, worst, routing, hidden, num_experts, k, seed, what):
    """One dispatch (and, for bf16 and fp32, its combine) checked against the reference: (the received rows as
    returned, what they must hold)."""
    rank, fp8 = dist.get_rank(), dtype == "fp8"
    inputs = _inputs(tokens, hidden, num_experts, k, seed, dtype=torch.float32 if fp8 else dtype, **routing)
    want = expected_dispatch(inputs, rank, num_experts)
    n = want.x.shape[0]
    x, idx, w = _on(inputs[rank], dev)
    if fp8:
        scales, want_scales = _fp8_scales(inputs, hidden, rank, num_experts, seed)
        got = buffer.dispatch((x.to(torch.float8_e4m3fn), scales[rank].to(dev)), idx, w, num_worst_tokens=worst)
        recv_x, recv_scales = got.recv_x
        want_x = want.x.to(torch.float8_e4m3fn)
        assert torch.equal(recv_scales[:n].cpu(), want_scales), f"{what}: scales"
    else:
        got = buffer.dispatch(x, idx, w, num_worst_tokens=worst)
        recv_x, want_x = got.recv_x, want.x
        out = buffer.combine(expert_output(recv_x, rank), got.handle)
        assert torch.equal(out.cpu(), expected_combine(inputs, rank, num_experts)), f"{what}: combine"
    assert recv_x.shape[0] == (worst or n), f"{what}: {recv_x.shape}"
    assert torch.equal(recv_x[:n].cpu().view(torch.uint8), want_x.view(torch.uint8)), f"{what}: rows"
    assert int(got.handle.num_recv_tokens) == n
    assert torch.equal(got.recv_topk_idx[:n].cpu(), want.topk_idx), f"{what}: recv_topk_idx"
    assert torch.equal(got.recv_topk_weights[:n].cpu(), want.weights), f"{what}: recv_topk_weights"
    return recv_x[:n], want_x


def _zero_copy_gradient(buffer, dev, hidden, num_experts, k, seed):
    """x.grad of sum(recv_x): each token's row counts once per rank that received it."""
    inputs = _inputs([40, 9], hidden, num_experts, k, seed, dtype=torch.bfloat16)
    x, idx, w = _on(inputs[dist.get_rank()], dev)
    x.requires_grad_()
    buffer.dispatch(x, idx, w).recv_x.float().sum().backward()
    per_rank = num_experts // dist.get_world_size()
    owners = torch.where(idx >= 0, idx // per_rank, -1).cpu()
    receivers = torch.stack([(owners == d).any(1) for d in range(dist.get_world_size())]).sum(0)
    return x.grad, receivers.to(torch.bfloat16).unsqueeze(1).expand(-1, hidden)


def rejected_call_between_good_ones(device, hidden, num_experts, k, seed=400):
    """A call that every rank rejects (an expert id out of range), after calls that set the exact mode's
    guess: it raises ValueError naming topk_idx, and the buffer's next dispatch and combine are exact."""
    rank, dev = dist.get_rank(), _device(device)
    with torch_ep.Buffer(None, num_experts, hidden, 64, device=device) as buffer:
        for step, bad in enumerate((False, True, False)):
            inputs = _inputs([64], hidden, num_experts, k, seed + step)
            x, idx, w = _on(inputs[rank], dev)
            if bad:
                idx = idx.clone()
                idx[5, 0] = num_experts
                try:
                    buffer.dispatch(x, idx, w)
                except ValueError as err:
                    assert "topk_idx" in str(err), str(err)
                else:
                    raise AssertionError("dispatch with an expert id out of range returned")
                continue
            got = buffer.dispatch(x, idx, w)
            out = buffer.combine(expert_output(got.recv_x, rank), got.handle)
            assert torch.equal(got.recv_x.cpu(), expected_dispatch(inputs, rank, num_experts).x), f"step {step}"
            assert torch.equal(out.cpu(), expected_combine(inputs, rank, num_experts)), f"step {step}"


def fp8_dispatch_carries_scales(device, tokens, hidden, num_experts, k, seed=0):
    rank, dev = dist.get_rank(), _device(device)
    inputs = _inputs(tokens, hidden, num_experts, k, seed, dtype=torch.float32)
    want = expected_dispatch(inputs, rank, num_experts)
    scales, want_scales = _fp8_scales(inputs, hidden, rank, num_experts)
    with torch_ep.Buffer(None, num_experts, hidden, max(max(tokens), 1), device=device) as buffer:
        x8 = inputs[rank].x.to(torch.float8_e4m3fn).to(dev)
        _, idx, w = _on(inputs[rank], dev)
        got = buffer.dispatch((x8, scales[rank].to(dev)), idx, w)
        recv_x, recv_scales = got.recv_x
        again, again_scales = buffer.dispatch((x8, scales[rank].to(dev)), handle=got.handle).recv_x
        assert recv_x.dtype == torch.float8_e4m3fn
        assert torch.equal(recv_x.cpu().view(torch.uint8), want.x.to(torch.float8_e4m3fn).view(torch.uint8))
        assert torch.equal(recv_scales.cpu(), want_scales)
        assert torch.equal(again.view(torch.uint8), recv_x.view(torch.uint8))
        assert torch.equal(again_scales, recv_scales)


def moe_layer(buffer, x, topk_idx, topk_weights, weight, num_worst_tokens=0):
    """A small MoE layer: dispatch -> per-local-expert scaling by `weight` [E/R, H] -> weighted combine."""
    got = buffer.dispatch(x, topk_idx, topk_weights, num_worst_tokens=num_worst_tokens)
    local = got.recv_topk_idx.clamp(min=0)
    expert_scale = weight[local] * got.recv_topk_weights.unsqueeze(-1).to(weight.dtype)  # [N, K, H]
    y = (got.recv_x.unsqueeze(1) * expert_scale).sum(1)
    return buffer.combine(y.to(x.dtype), got.handle)


def gradients_match_reference(device, tokens, hidden, num_experts, k, seed=0, dtype=torch.float32):
    """Autograd through dispatch/combine equals autograd of the same layer computed densely."""
    rank, world, dev = dist.get_rank(), dist.get_world_size(), _device(device)
    inputs = _inputs(tokens, hidden, num_experts, k, seed, dtype=dtype)
    per_rank = num_experts // world
    weights = torch.randn(num_experts, hidden, generator=torch.Generator().manual_seed(seed + 99), dtype=dtype)
    with torch_ep.Buffer(None, num_experts, hidden, max(max(tokens), 1), device=device) as buffer:
        x, idx, w = (t.clone().requires_grad_(t.is_floating_point()) for t in _on(inputs[rank], dev))
        my_w = weights[rank * per_rank:(rank + 1) * per_rank].to(dev).requires_grad_()
        out = moe_layer(buffer, x, idx, w, my_w)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + rank), dtype=dtype)
        out.backward(upstream.to(dev))
    # Dense reference on this rank's tokens: every expert's weight is known everywhere.
    rx, ridx, rw = (t.clone().requires_grad_(t.is_floating_point()) for t in _on(inputs[rank], "cpu"))
    all_w = weights.clone().requires_grad_()
    scale = all_w[ridx.clamp(min=0)] * (rw * (ridx >= 0)).unsqueeze(-1)
    ref = (rx.unsqueeze(1) * scale).sum(1)
    ref.backward(upstream)
    # Expert weights receive gradients from every rank's tokens: compare after summing over ranks.
    full = torch.zeros_like(weights)
    full[rank * per_rank:(rank + 1) * per_rank] = my_w.grad.cpu()
    ref_grad = all_w.grad.clone()
    dist.all_reduce(full)
    dist.all_reduce(ref_grad)
    # float32 sums run in another order than the dense reference's (and on another device)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.detach().cpu(), ref.detach(), **tol)
    torch.testing.assert_close(x.grad.cpu(), rx.grad, **tol)
    torch.testing.assert_close(w.grad.cpu(), rw.grad, **tol)
    torch.testing.assert_close(full, ref_grad, **tol)


def compiled_matches_eager(device, tokens, hidden, num_experts, k, seed=0, num_worst_tokens=0):
    """The MoE layer compiles with fullgraph=True and gives eager's output and gradients."""
    rank, dev = dist.get_rank(), _device(device)
    inputs = _inputs(tokens, hidden, num_experts, k, seed, dtype=torch.float32)
    weight = torch.randn(num_experts // dist.get_world_size(), hidden, generator=torch.Generator().manual_seed(7))
    torch._dynamo.reset()
    with torch_ep.Buffer(None, num_experts, hidden, max(max(tokens), 1), device=device) as buffer:
        results = []
        for fn in (moe_layer, torch.compile(moe_layer, fullgraph=True)):
            x, idx, w = _on(inputs[rank], dev)
            x.requires_grad_()
            out = fn(buffer, x, idx, w, weight.to(dev), num_worst_tokens)
            out.sum().backward()
            results.append((out.detach().cpu(), x.grad.cpu()))
    (eager_out, eager_grad), (comp_out, comp_grad) = results
    torch.testing.assert_close(comp_out, eager_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(comp_grad, eager_grad, rtol=1e-4, atol=1e-4)
