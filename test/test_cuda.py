"""torch_ep on CUDA: two ranks, checked against the same pure-torch reference as the CPU path.

Skipped without 2 GPUs. TORCH_EP_SHARED_GPU=1 runs both ranks on one GPU (CUDA IPC within one
device): a correctness check when only one GPU is at hand, never a performance one.
"""
import os

import pytest
import torch
import torch.distributed as dist

import cases
import soak
import torch_ep
from multiprocess import Pool
from reference import capture_graph, expected_combine, expected_dispatch, expert_output, make_routing, replay_with

SHARED_GPU = os.environ.get("TORCH_EP_SHARED_GPU") == "1"
HAVE_GPUS = torch.cuda.is_available() and (torch.cuda.device_count() >= 2 or SHARED_GPU)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAVE_GPUS, reason="needs 2 CUDA GPUs (or TORCH_EP_SHARED_GPU=1)"),
              pytest.mark.skipif(not torch_ep._C.WITH_CUDA, reason="torch_ep was built without CUDA")]


@pytest.fixture(scope="module")
def gpus():
    pool = Pool(2, backend="gloo", use_cuda=True)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def gpus4():
    """Four ranks as four processes, two per GPU when two are lent (correctness only)."""
    pool = Pool(4, backend="gloo", use_cuda=True)
    yield pool
    pool.close()


@pytest.mark.parametrize("tokens,hidden,experts,k", [
    ([1, 7], 2048, 8, 2),
    ([7, 1], 4096, 64, 1),
    ([128, 127], 7168, 256, 8),
    ([4096, 4095], 7168, 256, 8),
    ([4096, 3001], 2048, 64, 2),
    ([16384, 16384], 7168, 256, 8),
])
def test_dispatch_and_combine_match_reference(gpus, tokens, hidden, experts, k):
    gpus.run(cases.dispatch_combine_roundtrip, "cuda", tokens, hidden, experts, k)


def test_layout_matches_cpu_path():
    r = make_routing(0, 1000, 8, 256, 8, seed=4)
    want = torch.ops.ep.get_dispatch_layout(r.topk_idx, 256, 8)
    got = torch.ops.ep.get_dispatch_layout(r.topk_idx.cuda(), 256, 8)
    for w, g in zip(want, got):
        assert torch.equal(g.cpu(), w)


def test_skewed_routing_rank_receives_nothing(gpus):
    gpus.run(cases.dispatch_combine_roundtrip, "cuda", [300, 0], 2048, 64, 8, 3, hot_rank=0, p_none=0.0)


@pytest.mark.parametrize("tokens", [[0, 300], [300, 0], [0, 0]])
def test_rank_with_zero_tokens(gpus, tokens):
    gpus.run(cases.dispatch_combine_roundtrip, "cuda", tokens, 2048, 64, 8, 9)


def test_zero_tokens_no_host_sync(gpus):
    gpus.run(cases.dispatch_combine_roundtrip, "cuda", [0, 77], 2048, 64, 8, 10, torch.bfloat16, 200)


def test_float64_rows(gpus):
    gpus.run(cases.dispatch_combine_roundtrip, "cuda", [65, 40], 512, 16, 4, 11, torch.float64)


def test_many_calls_in_a_row_with_changing_routing(gpus):
    gpus.run(cases.repeated_roundtrips, "cuda", 2048, 64, 8, 40)


@pytest.mark.parametrize("num_sms", [24, 12])
def test_exact_mode_row_count_grows_and_shrinks(gpus, num_sms):
    gpus.run(cases.exact_row_counts_change, "cuda", 2048, 64, 8, num_sms=num_sms)


@pytest.mark.parametrize("num_sms,num_worst_tokens", [(12, 0), (16, 0), (12, 9000)])
def test_few_sms(gpus, num_sms, num_worst_tokens):
    """Fewer blocks than tokens' chunks: each sender block claims several chunks, each receiver many."""
    gpus.run(cases.dispatch_combine_roundtrip, "cuda", [4096, 3001], 7168, 256, 8, 12, torch.bfloat16,
             num_worst_tokens, num_sms=num_sms)


@pytest.mark.parametrize("num_sms", [24, 12])  # 12: the in-place senders of small grids
def test_zero_copy_recv_buffer(gpus, num_sms):
    gpus.run(cases.zero_copy_roundtrips, "cuda", 2048, 48, 8, num_sms=num_sms, graph=num_sms == 24)


def test_zero_copy_recv_region_overflow(gpus):
    gpus.run(cases.zero_copy_region_overflow, "cuda", 2048, 8, 2)


@pytest.mark.parametrize("num_sms", [24, 12])
def test_combine_input_region(gpus, num_sms):
    gpus.run(cases.combine_input_roundtrips, "cuda", 7168, 256, 8, num_sms=num_sms, max_tokens=512,
             graph=num_sms == 24)


def test_rejected_call_leaves_buffer_usable(gpus):
    gpus.run(cases.rejected_call_between_good_ones, "cuda", 2048, 64, 8)


@pytest.mark.parametrize("tokens,k,kw", [
    ([300, 0, 77, 1], 8, {}),
    ([129, 64, 0, 250], 8, {"hot_rank": 3, "p_none": 0.0}),
    ([33, 200, 1, 100], 3, {"num_worst_tokens": 800}),
])
def test_four_ranks(gpus4, tokens, k, kw):
    gpus4.run(cases.dispatch_combine_roundtrip, "cuda", tokens, 2048, 64, k, 12, **kw)


def test_four_ranks_zero_copy_recv(gpus4):
    gpus4.run(cases.zero_copy_roundtrips, "cuda", 2048, 48, 8, num_sms=12)


def test_four_ranks_combine_input_region(gpus4):
    gpus4.run(cases.combine_input_roundtrips, "cuda", 2048, 64, 4)


def test_four_ranks_gradients(gpus4):
    gpus4.run(cases.gradients_match_reference, "cuda", [40, 7, 0, 33], 1024, 16, 4)


def test_buffer_cycles_and_steps_leak_nothing(gpus):
    cycles, steps = (200, 10_000) if soak.LONG else (50, 1000)
    gpus.run(soak.leak_check, "cuda", cycles, steps)


def test_soak_random_routing_matches_reference(gpus):
    iterations, check_every = (10_000, 10) if soak.LONG else (1000, 10)
    for result in gpus.run(soak.soak, "cuda", iterations, check_every):
        assert result["mismatches"] == 0 and result["checked"] == -(-iterations // check_every), result
        assert result["graph_replays"] > iterations // 8, result  # about a quarter are CUDA-graph replays


def test_tokens_routed_nowhere_get_zeros(gpus):
    gpus.run(cases.dispatch_combine_roundtrip, "cuda", [257, 100], 4096, 64, 2, 4, p_none=0.8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_activation_dtypes(gpus, dtype):
    gpus.run(cases.dispatch_combine_roundtrip, "cuda", [200, 77], 2048, 64, 8, 5, dtype)


def test_no_host_sync_mode_pads_to_capacity(gpus):
    gpus.run(cases.dispatch_combine_roundtrip, "cuda", [513, 200], 4096, 256, 8, 6, torch.bfloat16, 713)


def test_expert_alignment(gpus):
    gpus.run(cases.dispatch_combine_roundtrip, "cuda", [300, 301], 2048, 64, 8, 7, torch.bfloat16, 0, 128)


# scales a row: 56 (7168), 5 (640), 132 (16896: more than the 64 a sender loads with the row)
@pytest.mark.parametrize("hidden", [7168, 640, 16896])
def test_fp8_dispatch_carries_scales(gpus, hidden):
    gpus.run(cases.fp8_dispatch_carries_scales, "cuda", [300, 123], hidden, 256, 8)


def test_gradients_match_dense_reference(gpus):
    gpus.run(cases.gradients_match_reference, "cuda", [96, 65], 2048, 16, 4)


def test_compiled_layer_matches_eager(gpus):
    gpus.run(cases.compiled_matches_eager, "cuda", [96, 65], 2048, 16, 4)


def test_compiled_layer_no_host_sync(gpus):
    gpus.run(cases.compiled_matches_eager, "cuda", [96, 65], 2048, 16, 4, 1, 161)


def _graph_worker(tokens, hidden, experts, k, replays):
    """Capture dispatch -> expert -> combine once; every replay routes fresh inputs correctly."""
    rank, dev = dist.get_rank(), torch.device("cuda", torch.cuda.current_device())
    capacity = sum(tokens)
    make = lambda seed: [make_routing(r, tokens[r], hidden, experts, k, seed=seed, num_ranks=2) for r in range(2)]
    first = make(0)[rank]
    static = [first.x.to(dev), first.topk_idx.to(dev), first.topk_weights.to(dev)]
    with torch_ep.Buffer(None, experts, hidden, max(tokens), device="cuda") as buffer:
        def step():
            got = buffer.dispatch(*static, num_worst_tokens=capacity)
            return got, buffer.combine(expert_output(got.recv_x, rank), got.handle)

        graph, (got, out) = capture_graph(step)
        for seed in range(1, replays + 1):
            inputs = make(seed)
            replay_with(graph, static, inputs[rank])
            want = expected_dispatch(inputs, rank, experts)
            n = want.x.shape[0]
            assert int(got.handle.num_recv_tokens) == n
            assert torch.equal(got.recv_x[:n].cpu(), want.x)
            assert torch.equal(got.recv_topk_idx[:n].cpu(), want.topk_idx)
            assert torch.equal(out.cpu(), expected_combine(inputs, rank, experts))
        with pytest.raises(RuntimeError, match="num_worst_tokens"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                buffer.dispatch(*static)
        torch.cuda.synchronize()


def test_cuda_graph_replays_new_routing(gpus):
    gpus.run(_graph_worker, [200, 150], 2048, 64, 8, 4)


def _bad_input_worker():
    """Every rank passes the same bad argument: each raises before communicating."""
    dev = torch.device("cuda", torch.cuda.current_device())
    r = make_routing(dist.get_rank(), 16, 2048, 8, 2, seed=1, num_ranks=2)
    x, idx, w = r.x.to(dev), r.topk_idx.to(dev), r.topk_weights.to(dev)
    bad_idx = idx.clone()
    bad_idx[3, 1] = 8
    messages = []
    with torch_ep.Buffer(None, 8, 2048, 16, device="cuda") as buffer:
        for args in ((x, bad_idx, w), (x[:, :1024], idx, w), (x.int(), idx, w), (x, idx, w.double()),
                     (torch.cat([x, x]), torch.cat([idx, idx]), torch.cat([w, w]))):
            with pytest.raises(ValueError) as err:
                buffer.dispatch(*args)
            messages.append(str(err.value))
    return messages


def test_bad_input_raises_value_error_naming_argument(gpus):
    messages = gpus.run(_bad_input_worker)[0]
    for message, name in zip(messages, ("topk_idx", "hidden", "x must be", "topk_weights", "max_tokens_per_rank")):
        assert name in message, message


def _refusal_routing(seed):
    """Both ranks' routing (16 tokens, hidden 2048, top-2 of 8) and this rank's x, topk_idx, topk_weights on its GPU."""
    rank, dev = dist.get_rank(), torch.device("cuda", torch.cuda.current_device())
    inputs = [make_routing(r, 16, 2048, 8, 2, seed=seed, num_ranks=2) for r in range(2)]
    return inputs, tuple(t.to(dev) for t in (inputs[rank].x, inputs[rank].topk_idx, inputs[rank].topk_weights))


def _check_good_call(buffer, inputs, call, num_worst_tokens=0):
    """A good dispatch and combine on `buffer` after a refused call: both right (rows past the count are padding)."""
    rank = dist.get_rank()
    got = buffer.dispatch(*call, num_worst_tokens=num_worst_tokens)
    out = buffer.combine(expert_output(got.recv_x, rank), got.handle)
    buffer.synchronize()
    recv_x = got.recv_x[:got.handle.num_recv_tokens_int()] if num_worst_tokens else got.recv_x
    assert torch.equal(recv_x.cpu(), expected_dispatch(inputs, rank, 8).x)
    assert torch.equal(out.cpu(), expected_combine(inputs, rank, 8))


def _refused_on_one_rank_worker(case, num_worst_tokens):
    """Rank 0 passes an argument its dispatch refuses (in C++, or in Buffer.dispatch), rank 1 a good call. Exact
    mode: both raise ValueError (rank 1 naming rank 0), and their next calls pair up and are right. No-host-sync
    mode: rank 1's call returns, and the call fails on both ranks (raised by synchronize). Neither waits for the
    other or pairs its call with the other's next one."""
    rank = dist.get_rank()
    inputs, (x, idx, w) = _refusal_routing(seed=3)
    call = {"hidden": (x[:, :1024], idx, w), "weights_dtype": (x, idx, idx)}[case] if rank == 0 else (x, idx, w)
    with torch_ep.Buffer(None, 8, 2048, 16, device="cuda", timeout_s=20) as buffer:
        if num_worst_tokens:
            if rank == 0:
                with pytest.raises(ValueError) as err:
                    buffer.dispatch(*call, num_worst_tokens=num_worst_tokens)
            else:
                buffer.dispatch(*call, num_worst_tokens=num_worst_tokens)
            with pytest.raises(RuntimeError, match="rejected its input") as failed:
                buffer.synchronize()
            return str(err.value) if rank == 0 else str(failed.value)
        with pytest.raises(ValueError) as err:
            buffer.dispatch(*call)
        _check_good_call(buffer, inputs, (x, idx, w))
    return str(err.value)


def _refused_on_every_rank_no_sync_worker():
    """Every rank passes the same refused argument in the no-host-sync mode: each raises ValueError, no rank holds
    a handle of the call, and the buffer stays usable."""
    inputs, (x, idx, w) = _refusal_routing(seed=5)
    with torch_ep.Buffer(None, 8, 2048, 16, device="cuda", timeout_s=20) as buffer:
        with pytest.raises(ValueError, match="hidden"):
            buffer.dispatch(x[:, :1024], idx, w, num_worst_tokens=32)
        _check_good_call(buffer, inputs, (x, idx, w), num_worst_tokens=32)


def test_input_refused_on_every_rank_no_host_sync_leaves_buffer_usable(gpus):
    gpus.run(_refused_on_every_rank_no_sync_worker)


@pytest.mark.parametrize("case,name", [("hidden", "hidden"), ("weights_dtype", "topk_weights")])
@pytest.mark.parametrize("num_worst_tokens", [0, 32])
def test_input_refused_on_one_rank_raises_on_every_rank(gpus, case, name, num_worst_tokens):
    refused, other = gpus.run(_refused_on_one_rank_worker, case, num_worst_tokens)
    assert name in refused, refused
    assert "rank 0 rejected its input" in other, other


def _odd_view(t: torch.Tensor) -> torch.Tensor:
    """A copy of t whose data starts one element (2 bytes) past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view_as(t)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


def _misaligned_worker():
    """Rows given as views at an odd offset (the kernels move 16-byte vectors) are moved like aligned ones."""
    rank, dev = dist.get_rank(), torch.device("cuda", torch.cuda.current_device())
    inputs = [make_routing(r, 33, 2048, 16, 4, seed=7, num_ranks=2) for r in range(2)]
    x, idx, w = (t.to(dev) for t in (inputs[rank].x, inputs[rank].topk_idx, inputs[rank].topk_weights))
    with torch_ep.Buffer(None, 16, 2048, 33, device="cuda", low_latency=True) as buffer:
        got = buffer.dispatch(_odd_view(x), idx, w)
        out = buffer.combine(_odd_view(expert_output(got.recv_x, rank)), got.handle)
        ll = [buffer.low_latency_dispatch(v, idx, w) for v in (x, _odd_view(x))]
        ll_out = [buffer.low_latency_combine(v, ll[0].handle) for v in (ll[0].recv_x, _odd_view(ll[0].recv_x))]
        torch.cuda.synchronize()
    want = expected_dispatch(inputs, rank, 16)
    assert torch.equal(got.recv_x.cpu(), want.x)
    assert torch.equal(out.cpu(), expected_combine(inputs, rank, 16))
    rows = int(ll[0].expert_offsets[-1])
    assert rows > 0 and torch.equal(ll[1].recv_x[:rows], ll[0].recv_x[:rows])
    assert torch.equal(ll_out[1], ll_out[0])


def test_rows_at_odd_offsets(gpus):
    gpus.run(_misaligned_worker)


def _timeout_worker():
    """Rank 1 never joins; rank 0's dispatch must fail with an error, not hang."""
    rank = dist.get_rank()
    buffer = torch_ep.Buffer(None, 8, 2048, 16, device="cuda", timeout_s=3.0)
    if rank == 1:
        return "idle"
    r = make_routing(0, 16, 2048, 8, 2, seed=1, num_ranks=2)
    dev = torch.device("cuda", torch.cuda.current_device())
    try:
        buffer.dispatch(r.x.to(dev), r.topk_idx.to(dev), r.topk_weights.to(dev))
        torch.cuda.synchronize()
    except RuntimeError as exc:
        return str(exc)
    raise AssertionError("dispatch without a peer returned normally")


def test_missing_peer_times_out_with_error():
    pool = Pool(2, backend="gloo", use_cuda=True)  # its own pool: rank 0's buffer is broken afterwards
    try:
        message = pool.run(_timeout_worker)[0]
    finally:
        pool.close()
    assert "timed out" in message and "rank 1" in message, message
