"""The ProcessGroup transport: transport choice, hierarchical forwarding, fixed capacity, agreement
across ranks, timeouts. CPU tests run over gloo; the GPU tests at the end skip without 2 GPUs."""
import contextlib
import faulthandler
import os
import threading
import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import torch_ep
import torch_ep.cpu
from multiprocess import Pool
from reference import capture_graph, expected_combine, expected_dispatch, expert_output, make_routing, replay_with
from torch_ep.transport import ArrivalWriter, PeerInfo, host_layout, select_transport

CPU = torch.device("cpu")
GPU = torch.device("cuda", 0)


# -- choosing the transport (single process, peer information made up) -------------------------

def _peers(hosts, reach=None):
    """One PeerInfo per rank: hosts[r] its hostname, GPU "g<r>", reaching the GPUs in reach[r] (default: all)."""
    uuids = [f"g{r}" for r in range(len(hosts))]
    return [PeerInfo(h, uuids[r], frozenset(uuids if reach is None else reach[r])) for r, h in enumerate(hosts)]


def test_nvlink_chosen_when_all_ranks_are_ipc_peers_on_one_host():
    assert select_transport(_peers(["a"] * 4), None, GPU) == "nvlink"


def test_process_group_chosen_across_hosts():
    assert select_transport(_peers(["a", "a", "b", "b"]), None, GPU) == "process_group"


def test_process_group_chosen_without_p2p_between_two_gpus():
    reach = [{"g0", "g1"}, {"g0", "g1", "g2"}, {"g1", "g2"}]  # g0 and g2 cannot reach each other
    assert select_transport(_peers(["a"] * 3, reach), None, GPU) == "process_group"


def test_cpu_buffers_always_use_the_process_group():
    assert select_transport(_peers(["a"] * 2), None, CPU) == "process_group"
    with pytest.raises(ValueError, match="transport='nvlink' needs a CUDA device"):
        select_transport(_peers(["a"] * 2), "nvlink", CPU)


def test_explicit_transport_overrides_and_is_checked():
    assert select_transport(_peers(["a"] * 2), "process_group", GPU) == "process_group"
    with pytest.raises(ValueError, match="transport='nvlink' needs every rank on one host"):
        select_transport(_peers(["a", "b"]), "nvlink", GPU)
    with pytest.raises(ValueError, match="transport must be"):
        select_transport(_peers(["a"]), "nccl2", GPU)


def test_host_layout_from_hostnames_keyword_and_environment(monkeypatch):
    monkeypatch.delenv("TORCH_EP_SIMULATE_HOSTS", raising=False)
    assert host_layout(_peers(["a", "a", "b", "b"]), None).ranks_per_host == 2
    assert host_layout(_peers(["a", "b", "a", "b"]), None).num_hosts == 1  # not consecutive blocks: flat
    assert host_layout(_peers(["a"] * 4), 2).num_hosts == 2
    monkeypatch.setenv("TORCH_EP_SIMULATE_HOSTS", "2")
    assert host_layout(_peers(["a"] * 4), None).hierarchical
    monkeypatch.setenv("TORCH_EP_SIMULATE_HOSTS", "3")
    with pytest.raises(ValueError, match="TORCH_EP_SIMULATE_HOSTS"):
        host_layout(_peers(["a"] * 4), None)


# -- workers (module level: they run on every rank of a pool) -------------------------------------

def _device(device):
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else CPU


def _routing(tokens, hidden, experts, k, seed, dtype=torch.bfloat16, **kw):
    world = dist.get_world_size()
    return [make_routing(r, tokens[r], hidden, experts, k, seed=seed, dtype=dtype, num_ranks=world, **kw)
            for r in range(world)]


def _roundtrip(buffer, x, idx, w, num_worst_tokens=0, scales=None):
    """Everything a dispatch + cached dispatch + combine returns, on the CPU."""
    rank = dist.get_rank()
    payload = x if scales is None else (x, scales)
    got = buffer.dispatch(payload, idx, w, num_worst_tokens=num_worst_tokens)
    recv_x = got.recv_x if scales is None else got.recv_x[0]
    again = buffer.dispatch(payload, handle=got.handle).recv_x
    again = again if scales is None else again[0]
    y = recv_x if scales is None else recv_x.float()
    out = buffer.combine(expert_output(y, rank), got.handle)
    n = int(got.handle.num_recv_tokens)
    result = dict(recv_x=recv_x[:n], again=again[:n], idx=got.recv_topk_idx[:n], w=got.recv_topk_weights[:n],
                  src=got.handle.recv_src_idx[:n], per_expert=got.num_recv_tokens_per_expert, out=out,
                  send_pos=got.handle.send_pos, rank_prefix=got.handle.rank_prefix)
    if scales is not None:
        result["scales"] = got.recv_x[1][:n]
    result = {k: v.cpu() for k, v in result.items()}
    if scales is not None:  # compare FP8 by its bytes
        result["recv_x"], result["again"] = result["recv_x"].view(torch.uint8), result["again"].view(torch.uint8)
    return result


def _assert_bitwise_equal(a, b, what):
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{what}: {key} differs"


def hierarchical_equals_flat(device, tokens, hidden, experts, k, seed=0, dtype=torch.bfloat16, fp8=False,
                             layouts=(2, 1), **routing_kw):
    """With simulated hosts of each of `layouts` ranks (2: 2 hosts x 2 on 4 ranks) every output is bitwise
    the flat one, and the flat one matches the reference."""
    rank, dev = dist.get_rank(), _device(device)
    inputs = _routing(tokens, hidden, experts, k, seed, dtype=torch.float32 if fp8 else dtype, **routing_kw)
    x, idx, w = (t.to(dev) for t in (inputs[rank].x, inputs[rank].topk_idx, inputs[rank].topk_weights))
    scales = None
    if fp8:
        x = x.to(torch.float8_e4m3fn)
        scales = torch.rand(x.shape[0], (hidden + 127) // 128, generator=torch.Generator().manual_seed(rank)).to(dev)
    results = {}
    for per_host in (None,) + tuple(layouts):
        with torch_ep.Buffer(None, experts, hidden, max(tokens), device=device, transport="process_group",
                             ranks_per_host=per_host) as buffer:
            assert buffer.pg_transport.hosts.ranks_per_host == (per_host or len(tokens))
            results[per_host] = _roundtrip(buffer, x, idx, w, scales=scales)
    for per_host in layouts:
        _assert_bitwise_equal(results[None], results[per_host], f"hosts of {per_host} ranks vs flat")
    if not fp8:
        want = expected_dispatch(inputs, rank, experts)
        assert torch.equal(results[None]["recv_x"], want.x) and torch.equal(results[None]["idx"], want.topk_idx)
        assert torch.equal(results[None]["out"], expected_combine(inputs, rank, experts))
    return int(results[None]["src"].shape[0])


def fixed_capacity_equals_exact(device, tokens, hidden, experts, k, capacity, ranks_per_host=None, seed=0):
    """num_worst_tokens > 0 (static splits): valid rows, handle and combine bitwise the exact mode's."""
    rank, dev = dist.get_rank(), _device(device)
    inputs = _routing(tokens, hidden, experts, k, seed)
    x, idx, w = (t.to(dev) for t in (inputs[rank].x, inputs[rank].topk_idx, inputs[rank].topk_weights))
    with torch_ep.Buffer(None, experts, hidden, max(tokens), device=device, transport="process_group",
                         ranks_per_host=ranks_per_host) as buffer:
        exact = _roundtrip(buffer, x, idx, w)
        fixed = _roundtrip(buffer, x, idx, w, num_worst_tokens=capacity)
        padded = buffer.dispatch(x, idx, w, num_worst_tokens=capacity)
    _assert_bitwise_equal(exact, fixed, "fixed capacity vs exact")
    n = int(padded.handle.num_recv_tokens)
    assert padded.recv_x.shape[0] == capacity and n < capacity
    assert bool((padded.recv_x[n:] == 0).all()) and bool((padded.recv_topk_idx[n:] == -1).all())
    assert bool((padded.handle.recv_src_idx[n:] == -1).all())


def gradients_hierarchical_equal_flat(device, tokens, hidden, experts, k, seed=0):
    """Autograd through dispatch/combine with 2 simulated hosts gives the flat transport's gradients bit for bit."""
    rank, dev = dist.get_rank(), _device(device)
    inputs = _routing(tokens, hidden, experts, k, seed, dtype=torch.float32)
    scale = torch.randn(experts // dist.get_world_size(), hidden, generator=torch.Generator().manual_seed(3))
    grads = {}
    for per_host in (None, 2):
        with torch_ep.Buffer(None, experts, hidden, max(tokens), device=device, transport="process_group",
                             ranks_per_host=per_host) as buffer:
            x = inputs[rank].x.to(dev).requires_grad_()
            w = inputs[rank].topk_weights.to(dev).requires_grad_()
            got = buffer.dispatch(x, inputs[rank].topk_idx.to(dev), w)
            expert_scale = scale.to(dev)[got.recv_topk_idx.clamp(min=0)] * got.recv_topk_weights.unsqueeze(-1)
            out = buffer.combine((got.recv_x.unsqueeze(1) * expert_scale).sum(1), got.handle)
            out.backward(torch.ones_like(out))
            grads[per_host] = (out.detach().cpu(), x.grad.cpu(), w.grad.cpu())
    for a, b in zip(grads[None], grads[2]):
        assert torch.equal(a, b)
    assert bool(grads[None][2].abs().sum() > 0)  # the weights did get gradients


def simulated_hosts_from_environment():
    os.environ["TORCH_EP_SIMULATE_HOSTS"] = "2"
    try:
        with torch_ep.Buffer(None, 8, 8, 4, device="cpu") as buffer:
            return buffer.transport, buffer.pg_transport.hosts.num_hosts, buffer.pg_transport.hosts.ranks_per_host
    finally:
        del os.environ["TORCH_EP_SIMULATE_HOSTS"]


def test_hierarchical_equals_flat_bitwise(world4):
    counts = world4.run(hierarchical_equals_flat, "cpu", [13, 0, 21, 7], 16, 16, 3)
    assert sum(counts) > 0


def test_hierarchical_equals_flat_skewed_and_fp8(world4):
    world4.run(hierarchical_equals_flat, "cpu", [9, 4, 0, 6], 8, 8, 2, hot_rank=3, p_none=0.0)
    world4.run(hierarchical_equals_flat, "cpu", [5, 8, 3, 6], 256, 8, 3, fp8=True)


def hierarchical_equals_flat_random(seeds):
    """Random token counts (zeros included), top-k, skew and capacity: hierarchical == flat == reference."""
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 12, (dist.get_world_size(),), generator=g).tolist()
        k = int(torch.randint(1, 5, (1,), generator=g))
        hot = int(torch.randint(-1, 4, (1,), generator=g))
        hierarchical_equals_flat("cpu", tokens, 8, 8, k, seed=seed, hot_rank=hot, layouts=(2,))
        fixed_capacity_equals_exact("cpu", [max(t, 1) for t in tokens], 8, 8, k, 4 * 12 + 1, 2, seed=seed)


def test_hierarchical_equals_flat_random_routings(world4):
    world4.run(hierarchical_equals_flat_random, 6)


def test_hierarchical_gradients_equal_flat(world4):
    world4.run(gradients_hierarchical_equal_flat, "cpu", [6, 9, 2, 5], 8, 8, 3)


def test_simulated_hosts_from_environment(world4):
    assert world4.run(simulated_hosts_from_environment) == [("process_group", 2, 2)] * 4


@pytest.mark.parametrize("per_host", [None, 2])
def test_fixed_capacity_equals_exact(world4, per_host):
    world4.run(fixed_capacity_equals_exact, "cpu", [10, 3, 0, 12], 8, 8, 3, 60, per_host)


def test_fixed_capacity_equals_exact_three_ranks(world3):
    world3.run(fixed_capacity_equals_exact, "cpu", [7, 11, 2], 16, 6, 2, 40)


# -- what a CUDA graph captures: no host reads ---------------------------------------------------------

aten = torch.ops.aten
# aten ops that read device values on the host (item/bool/int go through _local_scalar_dense).
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
              aten.bincount.default, aten.repeat_interleave.Tensor, aten.equal.default, aten.is_nonzero.default,
              aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default}


class NoHostReads(TorchDispatchMode):
    """Fails on every aten op that would read a device value on the host (a sync a CUDA graph cannot
    capture), boolean-mask indexing included."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if func in HOST_READS or boolean_index:
            raise AssertionError(f"host read of a device value: {func}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def simulated_capture():
    """Run torch_ep.cpu as it runs while a CUDA stream is captured, and fail on any host read."""
    def no_tolist(self):
        raise AssertionError("host read of a device value: Tensor.tolist")
    with mock.patch.object(torch_ep.cpu, "_capturing", lambda t: True), \
            mock.patch.object(torch.Tensor, "tolist", no_tolist), NoHostReads():
        yield


def captured_path_equals_eager(tokens, hidden, experts, k, capacity, ranks_per_host=None, fp8=False):
    """The fixed-capacity path a CUDA graph captures (dispatch, cached dispatch, combine; combine and cached
    dispatch over the static exchange), run on gloo with capture simulated: no host read anywhere, outputs
    bitwise the eager fixed mode's. A bad expert id counts as no expert there (eager mode rejects it), and
    dispatch without num_worst_tokens raises."""
    rank = dist.get_rank()
    inputs = _routing(tokens, hidden, experts, k, seed=4, dtype=torch.float32 if fp8 else torch.bfloat16)
    x, idx, w = inputs[rank].x, inputs[rank].topk_idx, inputs[rank].topk_weights
    scales = None
    if fp8:
        x = x.to(torch.float8_e4m3fn)
        scales = torch.rand(x.shape[0], (hidden + 127) // 128, generator=torch.Generator().manual_seed(rank))
    bad_idx = idx.clone()
    if bad_idx.shape[0]:
        bad_idx[0, 0] = experts + 3 if rank == 0 else -7  # not rejected under capture: counts as no expert
    routable = torch.where((bad_idx >= 0) & (bad_idx < experts), bad_idx, -1)
    with torch_ep.Buffer(None, experts, hidden, max(tokens), device="cpu", ranks_per_host=ranks_per_host) as buffer:
        name = buffer.name
        eager = _roundtrip(buffer, x, routable, w, num_worst_tokens=capacity, scales=scales)
        with simulated_capture():
            got = torch_ep.cpu.dispatch(x, scales, bad_idx, w, name, 1, capacity)
            handle = got[5:]
            again = torch_ep.cpu.cached_dispatch(x, scales, *handle, name)[0]
            out = torch_ep.cpu.combine(expert_output(got[0].float() if fp8 else got[0], rank), *handle, name)
        with simulated_capture(), pytest.raises(RuntimeError, match="pass num_worst_tokens > 0"):
            torch_ep.cpu.dispatch(x, scales, idx, w, name, 1, 0)
    n = int(got[7][-1, rank])
    captured = dict(recv_x=got[0][:n], again=again[:n], idx=got[2][:n], w=got[3][:n], src=got[6][:n],
                    per_expert=got[4], out=out, send_pos=got[5], rank_prefix=got[7])
    if fp8:  # compared by their bytes, as _roundtrip returns them
        captured.update(recv_x=got[0][:n].view(torch.uint8), again=again[:n].view(torch.uint8), scales=got[1][:n])
    _assert_bitwise_equal(eager, captured, "simulated capture vs eager fixed capacity")
    assert got[0].shape[0] == capacity and bool((got[6][n:] == -1).all())
    return n


@pytest.mark.parametrize("per_host,fp8", [(None, False), (2, False), (None, True)],
                         ids=["flat", "hierarchical", "flat_fp8"])
def test_captured_path_makes_no_host_reads_and_equals_eager(world4, per_host, fp8):
    received = world4.run(captured_path_equals_eager, [10, 3, 0, 12], 256 if fp8 else 16, 8, 3, 40, per_host, fp8)
    assert sum(received) > 0


def captured_combine_serves_exact_handles(tokens, hidden, experts, k):
    """Under capture, combine and cached dispatch take the static exchange whatever the handle: with an exact
    dispatch's handle (here routing where every expert is on rank 0, so rank 1 receives no row) they return
    the eager exact results bit for bit, and read nothing on the host."""
    rank = dist.get_rank()
    r = _routing(tokens, hidden, experts, k, seed=6, hot_rank=0)[rank]
    with torch_ep.Buffer(None, experts, hidden, max(tokens), device="cpu") as buffer:
        got = buffer.dispatch(r.x, r.topk_idx, r.topk_weights)
        y = expert_output(got.recv_x, rank)
        eager = (buffer.dispatch(r.x, handle=got.handle).recv_x, buffer.combine(y, got.handle))
        with simulated_capture():
            captured = (torch_ep.cpu.cached_dispatch(r.x, None, *got.handle[:3], buffer.name)[0],
                        torch_ep.cpu.combine(y, *got.handle[:3], buffer.name))
    assert all(torch.equal(a, b) for a, b in zip(eager, captured))
    return got.recv_x.shape[0]


def test_captured_combine_serves_exact_handles(world2):
    assert world2.run(captured_combine_serves_exact_handles, [9, 6], 16, 8, 2)[1] == 0  # rank 1 received none


def test_no_host_reads_mode_catches_host_reads():
    """The checker above does fail on the reads it is there to catch."""
    t = torch.tensor([[True, False], [False, True]])
    for read in (lambda: int(t.sum()), lambda: t.nonzero(), lambda: t.t().tolist(), lambda: torch.ones(2, 2)[t],
                 lambda: bool(t.any())):
        with pytest.raises(AssertionError, match="host read"), simulated_capture():
            read()


def pg_twins_match_the_ops():
    """ep.pg_* (what the CUDA kernels call for a buffer without NVLink state) pass opcheck and give ep.*'s results."""
    rank, world = dist.get_rank(), dist.get_world_size()
    r = make_routing(rank, 6, 8, 4, 2, seed=5, dtype=torch.float32, num_ranks=world)
    with torch_ep.Buffer(None, 4, 8, 8, device="cpu") as buffer:
        args = (r.x, None, r.topk_idx, r.topk_weights, buffer.name, 1, 0)
        got, twin = torch.ops.ep.dispatch(*args), torch.ops.ep.pg_dispatch(*args)
        handle = got[5:]
        y = got[0] * 3
        outs = [torch.ops.ep.combine(y, *handle, buffer.name), torch.ops.ep.pg_combine(y, *handle, buffer.name),
                torch.ops.ep.cached_dispatch(r.x, None, *handle, buffer.name)[0],
                torch.ops.ep.pg_cached_dispatch(r.x, None, *handle, buffer.name)[0]]
        for worst in (0, 16):
            torch.library.opcheck(torch.ops.ep.pg_dispatch.default, args[:-1] + (worst,))
        torch.library.opcheck(torch.ops.ep.pg_combine.default, (y, *handle, buffer.name))
        torch.library.opcheck(torch.ops.ep.pg_cached_dispatch.default, (r.x, None, *handle, buffer.name))
    assert all(torch.equal(a, b) for a, b in zip(got, twin))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2], outs[3])


def test_pg_twins_have_the_same_schemas():
    for name in ("dispatch", "cached_dispatch", "combine"):
        schema = str(getattr(torch.ops.ep, name).default._schema)
        twin = str(getattr(torch.ops.ep, "pg_" + name).default._schema)
        assert twin == schema.replace(f"ep::{name}(", f"ep::pg_{name}("), twin


def test_pg_twins_match_the_ops(world2):
    world2.run(pg_twins_match_the_ops)


# -- agreement across ranks -------------------------------------------------------------------------

def disagreeing_call(case):
    """Rank 1 calls differently from rank 0; every rank must raise ValueError, naming field and ranks."""
    rank = dist.get_rank()
    experts = 8 if case == "num_experts" and rank == 1 else 4
    hidden = 16 if case == "buffer_hidden" and rank == 1 else 8
    r = make_routing(rank, 6, 8, 4, 2, seed=1, num_ranks=2)
    x, idx, w = r.x, r.topk_idx, r.topk_weights
    if rank == 1 and case == "dtype":
        x = x.float()
    if rank == 1 and case == "topk":
        idx, w = idx[:, :1].contiguous(), w[:, :1].contiguous()
    if case == "buffer_hidden" and rank == 1:
        x = torch.randn(6, 16, dtype=torch.bfloat16)
    with torch_ep.Buffer(None, experts, hidden, 8, device="cpu") as buffer:
        try:
            if case == "op":
                got = buffer.dispatch(x, idx, w)
                buffer.combine(got.recv_x, got.handle) if rank == 0 else buffer.dispatch(x, handle=got.handle)
            elif case == "combine_width":
                got = buffer.dispatch(x, idx, w)
                y = got.recv_x if rank == 0 else torch.cat([got.recv_x, got.recv_x], 1)
                buffer.combine(y, got.handle)
            else:
                buffer.dispatch(x, idx, w)
        except ValueError as exc:
            return str(exc)
    raise AssertionError("ranks that disagree were not stopped")


@pytest.mark.parametrize("case,words", [
    ("dtype", ["dtype", "rank 0: torch.bfloat16", "rank 1: torch.float32"]),
    ("topk", ["top-k", "rank 0: 2", "rank 1: 1"]),
    ("num_experts", ["num_experts", "rank 0: 4", "rank 1: 8"]),
    ("buffer_hidden", ["buffer hidden", "rank 1: 16"]),
    ("op", ["ep.combine", "rank 0: ep.combine", "rank 1: ep.cached_dispatch"]),
    ("combine_width", ["row width", "rank 0: 8", "rank 1: 16"]),
])
def test_disagreeing_ranks_raise_on_every_rank(world2, case, words):
    for message in world2.run(disagreeing_call, case):  # each rank names the op it called
        for word in words:
            assert word in message, message


# -- the private group: shared by Buffers one after another, replaced on every rank after a failure ------

def private_groups_in_sequence():
    """Buffers made one after another share one transport group (a new one per Buffer is what hung NCCL on
    torch < 2.14: a destroyed group's name came back with its stale store keys); a different timeout gets its
    own; a group discarded on one rank only (as after a failure there) is replaced on every rank, and the
    ops work on the replacement; a live Buffer that shares a dropped group refuses its next op."""
    rank = dist.get_rank()
    r = make_routing(rank, 9, 16, 4, 2, seed=2, num_ranks=2)

    def buffer_group(timeout_s=30.0):
        with torch_ep.Buffer(None, 4, 16, 16, device="cpu", timeout_s=timeout_s) as buffer:
            got = _roundtrip(buffer, r.x, r.topk_idx, r.topk_weights)
            assert torch.equal(got["out"], expected_combine([make_routing(s, 9, 16, 4, 2, seed=2, num_ranks=2)
                                                              for s in range(2)], rank, 4))
            return buffer.pg_transport.group

    first, second = buffer_group(), buffer_group()
    assert second is first
    assert buffer_group(31.0) is not first
    with torch_ep.Buffer(None, 4, 16, 16, device="cpu", timeout_s=30.0) as alive:  # shares `first`
        if rank == 0:  # as after a failed collective seen on rank 0 only
            torch_ep.transport.discard_private_group(first, "test: a collective failed")
            with pytest.raises(torch_ep.transport.TransportError, match="shares: test: a collective failed"):
                alive.dispatch(r.x, r.topk_idx, r.topk_weights)
    third = buffer_group()
    assert third is not first and buffer_group() is third
    return True


def test_buffers_share_the_private_group_until_it_fails(world2):
    assert world2.run(private_groups_in_sequence) == [True, True]


# -- a rank that never calls, or dies -----------------------------------------------------------------

def test_arrival_records_are_written_off_the_ops_path():
    """The writer thread stores the latest record soon after it is made; flush writes it at once; stop ends
    the thread."""
    store = dist.HashStore()
    writer = ArrivalWriter(store, "0")
    writer.record("1 ep.dispatch")
    writer.record("2 ep.combine")
    deadline = time.monotonic() + 5.0
    while not (store.check(["0"]) and store.get("0") == b"2 ep.combine") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.get("0") == b"2 ep.combine"
    writer.stop()
    writer.record("3 ep.dispatch")  # after stop the thread is gone: only flush writes
    writer.flush()
    assert store.get("0") == b"3 ep.dispatch"
    assert not any(t.name == "torch_ep arrivals 0" and t.is_alive() for t in threading.enumerate())


def rank_one_stays_away(timeout_s):
    """Rank 0 dispatches, rank 1 does not: rank 0 fails within the timeout naming rank 1; both then destroy
    the buffer, and the default group still works afterwards."""
    rank = dist.get_rank()
    r = make_routing(rank, 6, 8, 4, 2, seed=1, num_ranks=2)
    buffer = torch_ep.Buffer(None, 4, 8, 8, device="cpu", timeout_s=timeout_s)
    message, elapsed = None, 0.0
    if rank == 0:
        start = time.monotonic()
        try:
            buffer.dispatch(r.x, r.topk_idx, r.topk_weights)
        except torch_ep.transport.TransportError as exc:
            message = str(exc)
        elapsed = time.monotonic() - start
        try:
            buffer.dispatch(r.x, r.topk_idx, r.topk_weights)
        except torch_ep.transport.TransportError as exc:
            assert "failed earlier" in str(exc)
    else:
        time.sleep(timeout_s * 1.5)
    buffer.destroy()
    dist.barrier()  # the pool's own group is untouched
    return message, elapsed


def test_missing_rank_is_named_within_timeout(world2):
    (message, elapsed), _ = world2.run(rank_one_stays_away, 2.0)
    assert message is not None and "ep.dispatch" in message and "rank 1" in message, message
    assert "made no call" in message, message
    assert elapsed < 10.0, elapsed


def rank_one_dies(timeout_s):
    rank = dist.get_rank()
    r = make_routing(rank, 6, 8, 4, 2, seed=1, num_ranks=2)
    buffer = torch_ep.Buffer(None, 4, 8, 8, device="cpu", timeout_s=timeout_s)
    got = buffer.dispatch(r.x, r.topk_idx, r.topk_weights)
    if rank == 1:
        threading.Timer(0.5, os._exit, (1,)).start()  # die after this answer has gone back
        return None
    start = time.monotonic()
    try:
        buffer.combine(got.recv_x, got.handle)
    except torch_ep.transport.TransportError as exc:
        return str(exc), time.monotonic() - start
    raise AssertionError("combine with a dead peer returned")


def test_dead_rank_is_named():
    pool = Pool(2)
    try:
        (message, elapsed), _ = pool.run(rank_one_dies, 3.0)
    finally:
        pool.close()
    assert "ep.combine" in message and "rank 1 (its last call was #1 ep.dispatch)" in message, message
    assert elapsed < 15.0, elapsed


# -- on GPUs (the lead runs these): NCCL transport forced, and simulated hosts ------------------------

HAVE_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.fixture(scope="module")
def gpus():
    pool = Pool(2, backend="gloo", use_cuda=True)
    yield pool
    pool.close()


def nccl_transport_matches_nvlink(tokens, hidden, experts, k):
    """transport="process_group" on CUDA tensors (NCCL) gives the NVLink kernels' outputs bit for bit; so
    does its fixed-capacity mode."""
    rank, dev = dist.get_rank(), _device("cuda")
    inputs = _routing(tokens, hidden, experts, k, seed=5)
    x, idx, w = (t.to(dev) for t in (inputs[rank].x, inputs[rank].topk_idx, inputs[rank].topk_weights))
    results = {}
    for transport in ("process_group", "nvlink"):
        with torch_ep.Buffer(None, experts, hidden, max(tokens), transport=transport) as buffer:
            assert buffer.transport == transport
            results[transport] = _roundtrip(buffer, x, idx, w)
            fixed = _roundtrip(buffer, x, idx, w, num_worst_tokens=sum(tokens) + 1)
            _assert_bitwise_equal(results[transport], fixed, f"{transport}: fixed capacity vs exact")
    _assert_bitwise_equal(results["process_group"], results["nvlink"], "NCCL transport vs NVLink kernels")
    want = expected_dispatch(inputs, rank, experts)
    assert torch.equal(results["process_group"]["recv_x"], want.x)
    assert torch.equal(results["process_group"]["out"], expected_combine(inputs, rank, experts))


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPUS, reason="needs 2 CUDA GPUs")
@pytest.mark.skipif(not torch_ep._C.WITH_CUDA, reason="torch_ep was built without CUDA")
@pytest.mark.parametrize("tokens,hidden,experts,k", [([7, 1], 2048, 8, 2), ([4096, 3001], 7168, 256, 8)])
def test_nccl_transport_on_two_gpus(gpus, tokens, hidden, experts, k):
    gpus.run(nccl_transport_matches_nvlink, tokens, hidden, experts, k)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPUS, reason="needs 2 CUDA GPUs")
@pytest.mark.skipif(not torch_ep._C.WITH_CUDA, reason="torch_ep was built without CUDA")
def test_two_simulated_hosts_on_two_gpus(gpus):
    """Two "hosts" of one GPU each: the NCCL transport with a host layout, against flat and the reference."""
    gpus.run(hierarchical_equals_flat, "cuda", [300, 129], 2048, 64, 8, layouts=(1,))


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 4), reason="needs 4 CUDA GPUs")
@pytest.mark.skipif(not torch_ep._C.WITH_CUDA, reason="torch_ep was built without CUDA")
def test_two_simulated_hosts_of_two_gpus():
    """4 GPUs as 2 "hosts" x 2: hierarchical forwarding over NCCL, bitwise flat, gradients too; the fixed
    capacity mode in a CUDA graph."""
    pool = Pool(4, backend="gloo", use_cuda=True)
    try:
        pool.run(hierarchical_equals_flat, "cuda", [300, 129, 0, 77], 2048, 64, 8)
        pool.run(gradients_hierarchical_equal_flat, "cuda", [64, 33, 5, 40], 256, 16, 4)
        pool.run(fixed_capacity_equals_exact, "cuda", [30, 12, 0, 41], 512, 16, 4, 200, 2)
        pool.run(nccl_transport_graph_replays, [30, 12, 0, 41], 512, 16, 4, 2, 2)  # hierarchical, captured
    finally:
        pool.close()


def nccl_transport_graph_replays(tokens, hidden, experts, k, replays, ranks_per_host=None):
    """Fixed capacity on the NCCL transport: dispatch, cached dispatch and combine captured once in a CUDA
    graph, replayed on new routing copied into the static inputs; every replay is bitwise the eager fixed
    mode's result for that routing, and the reference's. Capturing dispatch without num_worst_tokens raises."""
    faulthandler.dump_traceback_later(150)  # should it hang: every thread's stack in the log, not just a timeout
    try:
        rank, dev = dist.get_rank(), _device("cuda")
        capacity = sum(tokens)
        make = lambda seed: _routing(tokens, hidden, experts, k, seed)  # noqa: E731
        first = make(0)[rank]
        static = [first.x.to(dev), first.topk_idx.to(dev), first.topk_weights.to(dev)]
        with torch_ep.Buffer(None, experts, hidden, max(tokens), transport="process_group",
                             ranks_per_host=ranks_per_host) as buffer:
            def step():
                got = buffer.dispatch(*static, num_worst_tokens=capacity)
                again = buffer.dispatch(static[0], handle=got.handle).recv_x
                return got, again, buffer.combine(expert_output(got.recv_x, rank), got.handle)

            graph, (got, again, out) = capture_graph(step)
            for seed in range(1, replays + 1):
                inputs = make(seed)
                replay_with(graph, static, inputs[rank])
                n = int(got.handle.num_recv_tokens)
                replayed = dict(recv_x=got.recv_x[:n], again=again[:n], idx=got.recv_topk_idx[:n],
                                w=got.recv_topk_weights[:n], src=got.handle.recv_src_idx[:n],
                                per_expert=got.num_recv_tokens_per_expert, out=out, send_pos=got.handle.send_pos,
                                rank_prefix=got.handle.rank_prefix)
                replayed = {key: value.cpu() for key, value in replayed.items()}
                eager = _roundtrip(buffer, *static, num_worst_tokens=capacity)
                _assert_bitwise_equal(eager, replayed, f"replay {seed} vs eager fixed capacity")
                assert torch.equal(replayed["recv_x"], expected_dispatch(inputs, rank, experts).x)
                assert torch.equal(replayed["out"], expected_combine(inputs, rank, experts))
            del graph  # before the buffer (and its NCCL communicator) goes
            torch.cuda.synchronize()
            with pytest.raises(RuntimeError, match="pass num_worst_tokens > 0"):
                with torch.cuda.graph(torch.cuda.CUDAGraph()):
                    buffer.dispatch(*static)
            torch.cuda.synchronize()
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPUS, reason="needs 2 CUDA GPUs")
@pytest.mark.skipif(not torch_ep._C.WITH_CUDA, reason="torch_ep was built without CUDA")
@pytest.mark.parametrize("per_host", [None, 1], ids=["flat", "two_simulated_hosts"])
def test_nccl_transport_in_a_cuda_graph(gpus, per_host):
    gpus.run(nccl_transport_graph_replays, [200, 150], 2048, 64, 8, 3, per_host)
