"""Failures across ranks on the NVLink kernels (test/failure_cases.py): ranks that disagree on a call, a
rank that never calls or destroyed its Buffer. The waiting ranks raise a RuntimeError naming the op and the
other rank (from the op or Buffer.synchronize()), within timeout_s, instead of a device-side trap; the CUDA
context stays usable (each scenario ends by building a new Buffer and checking a dispatch + combine).

Skipped without 2 GPUs; TORCH_EP_SHARED_GPU=1 runs both ranks on one GPU (see test/test_cuda.py).
"""
import os

import pytest
import torch
import torch.distributed as dist

import cases
import failure_cases
import torch_ep
from multiprocess import Pool
from reference import make_routing

SHARED_GPU = os.environ.get("TORCH_EP_SHARED_GPU") == "1"
HAVE_GPUS = torch.cuda.is_available() and (torch.cuda.device_count() >= 2 or SHARED_GPU)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAVE_GPUS, reason="needs 2 CUDA GPUs (or TORCH_EP_SHARED_GPU=1)"),
              pytest.mark.skipif(not torch_ep._C.WITH_CUDA, reason="torch_ep was built without CUDA")]

# the Buffers' timeout_s; longer under compute-sanitizer, whose instrumented kernels start and run slowly
TIMEOUT_S = float(os.environ.get("TORCH_EP_FAILURE_TIMEOUT_S", "3"))


@pytest.fixture(scope="module")
def gpus():
    # one pool for every scenario: a failed op must leave each process's CUDA context usable for the next
    pool = Pool(2, backend="gloo", use_cuda=True, task_timeout_s=120.0)
    yield pool
    pool.close()


@pytest.mark.parametrize("name", [s.name for s in failure_cases.SCENARIOS])
def test_failure_is_raised_naming_op_and_rank(gpus, name):
    outcomes = gpus.run(failure_cases.run_scenario, name, "cuda", TIMEOUT_S)
    failure_cases.check_outcomes(name, outcomes, TIMEOUT_S, ("RuntimeError",))


def test_buffers_of_different_layouts_are_refused(gpus):
    layout = dict(num_experts=8, hidden=256, max_tokens_per_rank=16)
    for message in gpus.run(cases.refused_buffer, "cuda", layout, {1: {"num_experts": 16}}):
        assert "ranks disagree on num_experts (rank 0: 8, rank 1: 16)" in message, message


def _combine_input_on_rank_0_only():
    """Rank 0's y is its combine region, rank 1's a plain tensor: both fail the combine, naming the other."""
    rank, dev = dist.get_rank(), torch.device("cuda", torch.cuda.current_device())
    r = make_routing(rank, 16, 256, 8, 2, seed=5, num_ranks=2)
    buffer = torch_ep.Buffer(None, 8, 256, 16, device="cuda", timeout_s=TIMEOUT_S, zero_copy_combine=True)
    got = buffer.dispatch(r.x.to(dev), r.topk_idx.to(dev), r.topk_weights.to(dev))
    y = buffer.combine_input(got.recv_x.shape[0]) if rank == 0 else torch.empty_like(got.recv_x)
    y.copy_(got.recv_x)
    message = None
    try:
        buffer.combine(y, got.handle)
        buffer.synchronize()
    except RuntimeError as exc:
        message = str(exc)
    buffer.destroy()
    cases.dispatch_combine_roundtrip("cuda", [16, 8], 256, 8, 2, seed=4)  # the context still works
    return message


def test_combine_input_on_some_ranks_only_fails_on_every_rank(gpus):
    for rank, message in enumerate(gpus.run(_combine_input_on_rank_0_only)):
        assert message is not None, f"rank {rank} did not fail"
        assert "combine_input" in message and f"rank {1 - rank}" in message, message
