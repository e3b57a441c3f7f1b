"""Low-latency mode (Buffer(low_latency=True)): CPU path over gloo, and CUDA on 2 GPUs, against a pure-torch
reference written entry by entry (the op implementations are vectorised; the reference is plain loops).

GPU tests skip without 2 GPUs (TORCH_EP_SHARED_GPU=1 runs both ranks on one). CPU == CUDA bitwise follows from
both matching the same bitwise reference, and is also checked directly.
"""
import os

import pytest
import torch
import torch.distributed as dist

import torch_ep
from multiprocess import Pool
from reference import make_routing

FP8_MAX = 448.0
SHARED_GPU = os.environ.get("TORCH_EP_SHARED_GPU") == "1"
HAVE_GPUS = torch.cuda.is_available() and (torch.cuda.device_count() >= 2 or SHARED_GPU)


# -- the reference ---------------------------------------------------------------------------------

def ref_quantize(x):
    """Per 128 channels: scale = amax / 448 (1 if amax is 0); q = e4m3(x / scale), saturated."""
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    scales = torch.empty(x.shape[0], x.shape[1] // 128)
    for t in range(x.shape[0]):
        for b in range(x.shape[1] // 128):
            block = x[t, b * 128:(b + 1) * 128].float()
            amax = block.abs().max()
            scale = amax / FP8_MAX if amax > 0 else torch.tensor(1.0)
            scales[t, b] = scale
            q[t, b * 128:(b + 1) * 128] = (block / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scales


def ref_rows(inputs, rank, num_experts):
    """[(source, token, local expert, weight)] that `rank` receives, in row order."""
    num_ranks = len(inputs)
    per_rank = num_experts // num_ranks
    rows = []
    ids = [r.topk_idx.tolist() for r in inputs]
    for e in range(per_rank):
        for s, r in enumerate(inputs):
            for t, token_ids in enumerate(ids[s]):
                if rank * per_rank + e not in token_ids:
                    continue
                weight = torch.tensor(0.0)  # fp32, summed in k order
                for j, gid in enumerate(token_ids):
                    if gid == rank * per_rank + e:
                        weight = weight + r.topk_weights[t, j]
                rows.append((s, t, e, weight))
    return rows


def expert_y(x_row, rank, e):
    """A stand-in expert output, different per (rank, expert) so sums tell them apart."""
    return (x_row.float() * (1 + rank + 0.25 * e)).to(torch.bfloat16)


def ref_combine(inputs, rank, num_experts, weight_of=None, expert=expert_y):
    """out[t] = bf16(sum over ranks d ascending of bf16(sum over t's experts on d, k order, of w * y)),
    y = expert(x[t], d, local expert id)."""
    num_ranks = len(inputs)
    per_rank = num_experts // num_ranks
    r = inputs[rank]
    out = torch.zeros(r.x.shape, dtype=torch.float32)
    for t in range(r.x.shape[0]):
        for d in range(num_ranks):
            partial, seen = torch.zeros(r.x.shape[1]), set()
            for j in range(r.topk_idx.shape[1]):
                gid = int(r.topk_idx[t, j])
                if gid < 0 or gid // per_rank != d or gid in seen:
                    continue
                seen.add(gid)
                w = sum((r.topk_weights[t, i] for i in range(j, r.topk_idx.shape[1])
                         if int(r.topk_idx[t, i]) == gid), torch.tensor(0.0)) if weight_of is None else weight_of
                partial = partial + w * expert(r.x[t], d, gid - d * per_rank).float()
            if seen:
                out[t] = out[t] + partial.to(torch.bfloat16).float()
    return out.to(torch.bfloat16)


# -- checks run on every rank ----------------------------------------------------------------------

def _device(device):
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def _routing(tokens, hidden, experts, k, seed, hot_expert=-1, duplicate=False, **kw):
    world = dist.get_world_size()
    inputs = [make_routing(r, tokens[r], hidden, experts, k, seed=seed, num_ranks=world, **kw)
              for r in range(world)]
    for r in inputs:
        if hot_expert >= 0 and r.topk_idx.shape[0]:
            r.topk_idx[:, 0] = hot_expert  # every token names it (possibly twice: merged)
        if duplicate and r.topk_idx.shape[0]:
            r.topk_idx[::2, -1] = r.topk_idx[::2, 0]
    return inputs


def _expert_outputs(recv_x, offsets, rank):
    """y for every valid row: expert_y of the row with its expert's index."""
    y = torch.zeros_like(recv_x)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        for row in range(start, end):
            y[row] = expert_y(recv_x[row].cpu(), rank, e).to(recv_x.device)
        start = end
    return y


def roundtrip(device, tokens, hidden, experts, k, seed=0, max_tokens=None, use_fp8=False, num_blocks=None, **kw):
    """dispatch matches the reference row for row (bytes and scales with FP8); combine bit for bit.
    num_blocks: the buffer's low_latency_num_sms (default: one block per SM)."""
    rank, world, dev = dist.get_rank(), dist.get_world_size(), _device(device)
    inputs = _routing(tokens, hidden, experts, k, seed, **kw)
    t_ll = max_tokens or max(max(tokens), 1)
    with torch_ep.Buffer(None, experts, hidden, t_ll, device=device, low_latency=True,
                         low_latency_num_sms=num_blocks) as buffer:
        r = inputs[rank]
        got = buffer.low_latency_dispatch(r.x.to(dev), r.topk_idx.to(dev), r.topk_weights.to(dev), use_fp8=use_fp8)
        recv_x = got.recv_x[0] if use_fp8 else got.recv_x
        n = int(got.expert_offsets[-1])
        bf16_rows = got.recv_x[0][:n].float().view(n, hidden // 128, 128) * got.recv_x[1][:n].unsqueeze(2) if use_fp8 \
            else recv_x[:n].float()
        y = _expert_outputs(bf16_rows.reshape(n, hidden).to(torch.bfloat16), got.expert_offsets.cpu(), rank)
        y = torch.cat([y, torch.zeros(recv_x.shape[0] - n, hidden, dtype=torch.bfloat16, device=dev)])
        out = buffer.low_latency_combine(y, got.handle)
    rows = ref_rows(inputs, rank, experts)
    per_rank = experts // world
    m = world * t_ll * min(k, per_rank)
    assert recv_x.shape == (m, hidden) and got.recv_weights.shape == (m,), (recv_x.shape, m)
    assert n == len(rows), (n, len(rows))
    counts = torch.bincount(torch.tensor([e for _, _, e, _ in rows], dtype=torch.long), minlength=per_rank)
    assert torch.equal(got.num_recv_tokens_per_expert.cpu(), counts.int())
    assert torch.equal(got.expert_offsets.cpu(), counts.cumsum(0).int())
    for row, (s, t, e, w) in enumerate(rows):
        assert float(got.recv_weights[row]) == float(w), (row, s, t, e)
    if use_fp8:
        quantized = [ref_quantize(r.x) for r in inputs]
        want_q = torch.stack([quantized[s][0][t] for s, t, _, _ in rows]) if rows else None
        want_s = torch.stack([quantized[s][1][t] for s, t, _, _ in rows]) if rows else None
        if rows:
            assert torch.equal(recv_x[:n].cpu().view(torch.uint8), want_q.view(torch.uint8))
            assert torch.equal(got.recv_x[1][:n].cpu(), want_s)
    elif rows:
        assert torch.equal(recv_x[:n].cpu(), torch.stack([inputs[s].x[t] for s, t, _, _ in rows]))
    # combine with the received rows (dequantised with FP8) as each expert's input
    if use_fp8:
        for r, (q, s) in zip(inputs, [ref_quantize(r.x) for r in inputs]):
            r.x = (q.float().view(q.shape[0], hidden // 128, 128) * s.unsqueeze(2)).reshape(q.shape).to(torch.bfloat16)
    assert torch.equal(out.cpu(), ref_combine(inputs, rank, experts)), (out.cpu() - ref_combine(inputs, rank, experts)).abs().max()
    return n


def low_latency_grid_error(device, blocks_of_rank):
    """The ValueError of a low-latency Buffer for which rank r asks for blocks_of_rank[r] blocks, or "built"."""
    try:
        buffer = torch_ep.Buffer(None, 8, 128, 4, device=device, low_latency=True,
                                 low_latency_num_sms=blocks_of_rank[dist.get_rank()])
    except ValueError as e:
        return str(e)
    buffer.destroy()
    return "built"


def gradients_match_dense(device, tokens, hidden, experts, k, seed=0):
    """Autograd through dispatch -> per-expert scaling -> combine equals the same layer computed densely."""
    rank, world, dev = dist.get_rank(), dist.get_world_size(), _device(device)
    inputs = _routing(tokens, hidden, experts, k, seed, duplicate=True)
    per_rank = experts // world
    scale = torch.randn(experts, hidden, generator=torch.Generator().manual_seed(seed + 5))
    r = inputs[rank]
    with torch_ep.Buffer(None, experts, hidden, max(tokens), device=device, low_latency=True) as buffer:
        x = r.x.to(dev).requires_grad_()
        w = r.topk_weights.to(dev).requires_grad_()
        got = buffer.low_latency_dispatch(x, r.topk_idx.to(dev), w)
        expert_of_row = torch.searchsorted(got.expert_offsets.long(),
                                           torch.arange(got.recv_weights.shape[0], device=dev), right=True)
        my_scale = scale[rank * per_rank:(rank + 1) * per_rank].to(dev)
        y = (got.recv_x.float() * my_scale[expert_of_row.clamp(max=per_rank - 1)]).to(torch.bfloat16)
        out = buffer.low_latency_combine(y, got.handle)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + rank)).to(torch.bfloat16)
        out.backward(upstream.to(dev))
    rx = r.x.detach().float().requires_grad_()
    rw = r.topk_weights.detach().clone().requires_grad_()
    valid = r.topk_idx >= 0
    dense = (rx.unsqueeze(1) * scale[r.topk_idx.clamp(min=0)] * (rw * valid).unsqueeze(2)).sum(1)
    dense.backward(upstream.float())
    tol = dict(rtol=3e-2, atol=3e-2)  # bf16 rows and partials
    torch.testing.assert_close(out.detach().float().cpu(), dense.detach(), **tol)
    torch.testing.assert_close(x.grad.float().cpu(), rx.grad, **tol)
    torch.testing.assert_close(w.grad.cpu(), rw.grad, rtol=3e-2, atol=0.1 * float(rw.grad.abs().max()) + 1e-3)


def opcheck_every_op(device):
    rank, world, dev = dist.get_rank(), dist.get_world_size(), _device(device)
    r = make_routing(rank, 5, 128, 4, 2, seed=8, num_ranks=world)
    with torch_ep.Buffer(None, 4, 128, 6, device=device, low_latency=True) as buffer:
        x, idx, w = r.x.to(dev).requires_grad_(), r.topk_idx.to(dev), r.topk_weights.to(dev).requires_grad_()
        # On CUDA, dispatch rows past expert_offsets[-1] are unspecified memory, so two runs differ there:
        # leave out the check that compares whole outputs of an eager and a compiled run.
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        utils += () if device == "cuda" else ("test_aot_dispatch_dynamic",)
        torch.library.opcheck(torch.ops.ep.low_latency_dispatch.default, (x, idx, w, buffer.name, False),
                              test_utils=utils)
        # FP8 rows have no gradient (as in normal mode)
        torch.library.opcheck(torch.ops.ep.low_latency_dispatch.default,
                              (x.detach(), idx, w.detach(), buffer.name, True), test_utils=utils)
        got = buffer.low_latency_dispatch(x.detach(), idx, w.detach())
        h = got.handle
        y = torch.randn(got.recv_x.shape, device=dev).to(torch.bfloat16).requires_grad_()
        weights = h.recv_weights.clone().requires_grad_()
        torch.library.opcheck(torch.ops.ep.low_latency_combine.default,
                              (y, weights, h.token_rows, h.dest_ranks, buffer.name))
        torch.library.opcheck(torch.ops.ep.low_latency_cached_dispatch.default,
                              (x.detach(), h.token_rows, h.dest_ranks, buffer.name))


def _ll_layer(buffer, x, idx, w):
    got = buffer.low_latency_dispatch(x, idx, w)
    return buffer.low_latency_combine((got.recv_x.float() * 2).to(torch.bfloat16), got.handle)


def compiled_matches_eager(device):
    rank, world, dev = dist.get_rank(), dist.get_world_size(), _device(device)
    r = make_routing(rank, 7, 128, 8, 3, seed=9, num_ranks=world)
    torch._dynamo.reset()
    with torch_ep.Buffer(None, 8, 128, 8, device=device, low_latency=True) as buffer:
        results = []
        for fn in (_ll_layer, torch.compile(_ll_layer, fullgraph=True)):
            x = r.x.to(dev).requires_grad_()
            out = fn(buffer, x, r.topk_idx.to(dev), r.topk_weights.to(dev))
            out.float().sum().backward()
            results.append((out.detach().cpu(), x.grad.cpu()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def rejects_without_region(device):
    with torch_ep.Buffer(None, 4, 128, 4, device=device) as buffer:
        r = make_routing(0, 2, 128, 4, 1)
        try:
            buffer.low_latency_dispatch(r.x.to(_device(device)), r.topk_idx.to(_device(device)),
                                        r.topk_weights.to(_device(device)))
        except ValueError as exc:
            return str(exc)
    raise AssertionError("low_latency_dispatch ran on a buffer without the low-latency region")


def bad_input_names_argument(device, case):
    dev = _device(device)
    r = make_routing(dist.get_rank(), 3, 128, 4, 2)
    x, idx, w = r.x.to(dev), r.topk_idx.to(dev), r.topk_weights.to(dev)
    if case == "x":
        x = x.float()
    elif case == "topk_idx":
        idx = idx.int()
    elif case == "topk_weights":
        w = w[:, :1]
    elif case == "max_tokens_per_rank":
        x, idx, w = x.repeat(3, 1), idx.repeat(3, 1), w.repeat(3, 1)
    with torch_ep.Buffer(None, 4, 128, 4, device=device, low_latency=True) as buffer:
        try:
            buffer.low_latency_dispatch(x, idx, w)
        except ValueError as exc:
            return str(exc)
    raise AssertionError(f"bad {case} accepted")


# -- CPU tests ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu2():
    pool = Pool(2)
    yield pool
    pool.close()


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_random_routing_with_dropped_entries(cpu2, use_fp8):
    assert min(cpu2.run(roundtrip, "cpu", [13, 7], 256, 8, 3, use_fp8=use_fp8, p_none=0.2)) > 0


def test_hot_expert_receives_every_token(cpu2):
    cpu2.run(roundtrip, "cpu", [9, 12], 128, 8, 2, hot_expert=5, p_none=0.0)


def test_rank_with_zero_valid_tokens(cpu2):
    cpu2.run(roundtrip, "cpu", [5, 0], 128, 8, 2, max_tokens=8)
    cpu2.run(roundtrip, "cpu", [4, 3], 128, 8, 2, p_none=1.0)  # padding tokens: all ids -1


def test_one_token_per_rank(cpu2):
    cpu2.run(roundtrip, "cpu", [1, 1], 128, 8, 4, use_fp8=True)


def test_repeated_expert_in_topk_gets_one_row(cpu2):
    cpu2.run(roundtrip, "cpu", [8, 5], 128, 8, 3, duplicate=True, p_none=0.0)


def test_fp8_quantisation_matches_rule():
    x = torch.randn(3, 256).to(torch.bfloat16) * torch.tensor([1e-3, 1.0, 300.0]).to(torch.bfloat16).unsqueeze(1)
    x[1, :128] = 0  # a zero block gets scale 1
    q, s = torch_ep.low_latency.quantize_fp8(x)
    wq, ws = ref_quantize(x)
    assert torch.equal(q.view(torch.uint8), wq.view(torch.uint8)) and torch.equal(s, ws)
    assert float(s[1, 0]) == 1.0 and bool((q.float().abs() <= FP8_MAX).all())


def test_gradients_match_dense_layer(cpu2):
    cpu2.run(gradients_match_dense, "cpu", [7, 5], 128, 8, 3)


def test_opcheck_every_op(cpu2):
    cpu2.run(opcheck_every_op, "cpu")


def test_compiled_fullgraph_matches_eager(cpu2):
    cpu2.run(compiled_matches_eager, "cpu")


def test_buffer_without_region_raises(cpu2):
    for message in cpu2.run(rejects_without_region, "cpu"):
        assert "low_latency=True" in message, message


@pytest.mark.parametrize("case", ["x", "topk_idx", "topk_weights", "max_tokens_per_rank"])
def test_bad_input_names_the_argument(cpu2, case):
    for message in cpu2.run(bad_input_names_argument, "cpu", case):
        assert case in message, message


def test_low_latency_num_sms_must_be_positive(cpu2):
    for message in cpu2.run(low_latency_grid_error, "cpu", [0, 0]):
        assert "low_latency_num_sms=0 must be positive" in message, message


def test_region_adds_to_buffer_bytes():
    plain = torch_ep._C.buffer_bytes(2, 256, 7168, 128)
    with_ll = torch_ep._C.buffer_bytes(2, 256, 7168, 128, True)
    # two parities of dispatch slots (256 B metadata + a bf16 row) and of combine rows, per source and token
    assert with_ll - plain >= 2 * 2 * 128 * (256 + 2 * 7168 + 2 * 7168)


# -- GPU tests -----------------------------------------------------------------------------------------

def _skip_without_gpus():
    if not HAVE_GPUS:
        pytest.skip("needs 2 CUDA GPUs (or TORCH_EP_SHARED_GPU=1)")
    if not torch_ep._C.WITH_CUDA:
        pytest.skip("torch_ep was built without CUDA")


def _gpu_pool(world):
    _skip_without_gpus()
    pool = Pool(world, backend="gloo", use_cuda=True)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def gpus():
    yield from _gpu_pool(2)


@pytest.mark.parametrize("tokens,hidden,experts,k,fp8", [
    ([128, 128], 7168, 256, 8, False),
    ([128, 128], 7168, 256, 8, True),
    ([1, 1], 7168, 256, 8, True),
    ([37, 0], 2048, 64, 4, False),
    ([256, 200], 4096, 16, 8, True),   # min(K, E/R) = 8 local experts per token possible
])
@pytest.mark.gpu
def test_gpu_roundtrip(gpus, tokens, hidden, experts, k, fp8):
    _skip_without_gpus()
    gpus.run(roundtrip, "cuda", tokens, hidden, experts, k, use_fp8=fp8, p_none=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_buffer_sized_for_more_tokens_than_sent(gpus, use_fp8):
    """A serving buffer sized for 256 tokens on 1- and 3-token steps: only what landed is expanded."""
    _skip_without_gpus()
    gpus.run(roundtrip, "cuda", [1, 3], 7168, 256, 8, max_tokens=256, use_fp8=use_fp8, p_none=0.1)


@pytest.fixture(scope="module")
def gpus4():
    """Four ranks as four processes, two per GPU when two are lent (correctness only)."""
    yield from _gpu_pool(4)


@pytest.mark.gpu
@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_four_ranks(gpus4, use_fp8):
    """Three sources per rank, with a rank sending nothing and one sending one token, in an oversized buffer."""
    _skip_without_gpus()
    gpus4.run(roundtrip, "cuda", [5, 0, 64, 1], 2048, 64, 8, max_tokens=96, use_fp8=use_fp8, p_none=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("num_blocks", [3, 24])
def test_gpu_grid_sizes(gpus, num_blocks):
    """Fewer low-latency blocks than the default (one per SM): each block takes many tokens and rows."""
    _skip_without_gpus()
    gpus.run(roundtrip, "cuda", [128, 77], 7168, 256, 8, use_fp8=True, num_blocks=num_blocks, p_none=0.1)
    gpus.run(roundtrip, "cuda", [77, 128], 2048, 64, 8, num_blocks=num_blocks, hot_expert=5)


@pytest.mark.gpu
def test_gpu_ranks_must_agree_on_blocks(gpus):
    _skip_without_gpus()
    for message in gpus.run(low_latency_grid_error, "cuda", [2, 3]):  # ranks that disagree
        assert "ranks disagree on low_latency_num_sms (rank 0: 2, rank 1: 3)" in message, message


@pytest.mark.gpu
def test_gpu_hot_expert_and_repeats(gpus):
    _skip_without_gpus()
    gpus.run(roundtrip, "cuda", [64, 64], 2048, 64, 8, hot_expert=3, duplicate=True, p_none=0.0)


@pytest.mark.gpu
def test_gpu_gradients_opcheck_compile(gpus):
    _skip_without_gpus()
    gpus.run(gradients_match_dense, "cuda", [7, 5], 128, 8, 3)
    gpus.run(opcheck_every_op, "cuda")
    gpus.run(compiled_matches_eager, "cuda")


@pytest.mark.gpu
def test_gpu_bad_input_names_the_argument(gpus):
    _skip_without_gpus()
    for message in gpus.run(rejects_without_region, "cuda"):
        assert "low_latency=True" in message, message
    for case in ("x", "topk_idx", "topk_weights", "max_tokens_per_rank"):
        for message in gpus.run(bad_input_names_argument, "cuda", case):
            assert case in message, message


def cpu_equals_cuda(tokens, hidden, experts, k, use_fp8):
    """The same inputs through the CPU path and the CUDA kernels give the same bytes."""
    rank = dist.get_rank()
    r = _routing(tokens, hidden, experts, k, 3, p_none=0.2)[rank]
    outs = []
    for device in ("cpu", "cuda"):
        dev = _device(device)
        with torch_ep.Buffer(None, experts, hidden, max(tokens), device=device, low_latency=True) as buffer:
            got = buffer.low_latency_dispatch(r.x.to(dev), r.topk_idx.to(dev), r.topk_weights.to(dev),
                                              use_fp8=use_fp8)
            n = int(got.expert_offsets[-1])
            recv = got.recv_x[0] if use_fp8 else got.recv_x
            y = (recv.float() * 0.5 + 1).to(torch.bfloat16)
            out = buffer.low_latency_combine(y, got.handle)
            outs.append([recv[:n].cpu().view(torch.uint8), got.recv_weights[:n].cpu(), got.expert_offsets.cpu(),
                         out.cpu(), got.handle.token_rows.cpu(), got.handle.dest_ranks.cpu()]
                        + ([got.recv_x[1][:n].cpu()] if use_fp8 else []))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_cpu_equals_cuda_bitwise(gpus, use_fp8):
    _skip_without_gpus()
    gpus.run(cpu_equals_cuda, [100, 61], 7168, 256, 8, use_fp8)


def graph_replays(tokens_max, hidden, experts, k, replays):
    """One captured dispatch -> expert -> combine, replayed with new routing and valid-token counts."""
    rank, world, dev = dist.get_rank(), dist.get_world_size(), _device("cuda")
    with torch_ep.Buffer(None, experts, hidden, tokens_max, low_latency=True) as buffer:
        x = torch.zeros(tokens_max, hidden, dtype=torch.bfloat16, device=dev)
        idx = torch.full((tokens_max, k), -1, dtype=torch.long, device=dev)
        w = torch.zeros(tokens_max, k, device=dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph
            _ll_layer(buffer, x, idx, w)
        torch.cuda.current_stream().wait_stream(side)
        dist.barrier()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = buffer.low_latency_dispatch(x, idx, w)
            out = buffer.low_latency_combine((got.recv_x.float() * 2).to(torch.bfloat16), got.handle)
        failures = []
        for step in range(replays):
            counts = (tokens_max, 0, 1, tokens_max // 2 + 1)  # valid tokens; the rest is padding
            valid = [counts[(step + s) % len(counts)] for s in range(world)]
            inputs = _routing(valid, hidden, experts, k, 100 + step, p_none=0.1)
            r = inputs[rank]
            x.zero_()
            idx.fill_(-1)
            w.zero_()
            x[:valid[rank]], idx[:valid[rank]], w[:valid[rank]] = r.x.to(dev), r.topk_idx.to(dev), \
                r.topk_weights.to(dev)
            graph.replay()
            torch.cuda.synchronize()
            # keep replaying on every rank whatever one rank finds (a rank that stopped would hang the others)
            if int(got.expert_offsets[-1]) != len(ref_rows(inputs, rank, experts)):
                failures.append(f"replay {step}: wrong row count")
            if not torch.equal(out[:valid[rank]].cpu(), _doubled_combine(inputs, rank, experts)):
                failures.append(f"replay {step}: wrong combine")
            if bool(out[valid[rank]:].any()):  # padding tokens are routed nowhere
                failures.append(f"replay {step}: padding tokens not zero")
            dist.barrier()
    assert not failures, failures


def _doubled_combine(inputs, rank, experts):
    """Reference combine of the graph's expert (2 * x) with the dispatch weights."""
    return ref_combine(inputs, rank, experts, expert=lambda x_row, d, e: (x_row.float() * 2).to(torch.bfloat16))


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_new_routing(gpus):
    _skip_without_gpus()
    gpus.run(graph_replays, 64, 2048, 64, 4, 6)
