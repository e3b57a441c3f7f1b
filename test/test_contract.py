"""Every path raises the contract's error for the same bad input (test/contract_cases.py): the CPU path,
the fake kernels (under FakeTensorMode and under torch.compile) and, with 2 GPUs, the CUDA ops. The CPU
path also meets the failure scenarios (test/failure_cases.py) that test/test_reliability_gpu.py runs
on GPUs."""
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import contract_cases
import failure_cases
import torch_ep
from contract_cases import CASES, bad_args, call, error_of
from multiprocess import Pool
from torch_ep.buffer import _check_same_layout

SHAPE_CASES = [c for c in CASES if not c.reads_data]


def _ids(cases):
    return [c.name for c in cases]


def _check(case, results):
    for rank, (kind, text) in enumerate(results):
        assert kind == case.error.__name__, f"rank {rank}: {kind}: {text}"
        assert case.message in text, f"rank {rank}: {text!r} lacks {case.message!r}"


def test_cases_cover_every_op():
    assert {c.op for c in CASES} == {"get_dispatch_layout", "dispatch", "cached_dispatch", "combine"}
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_cpu_path_raises_the_contract_error(world2, case):
    _check(case, world2.run(contract_cases.run_case, case.name, "cpu"))


def _run_fake(name):
    case = contract_cases.BY_NAME[name]
    with torch_ep.Buffer(None, contract_cases.EXPERTS, contract_cases.HIDDEN, contract_cases.MAX_TOKENS,
                         device="cpu") as buffer:
        args = bad_args(case, buffer, torch.device("cpu"))
        mode = FakeTensorMode()
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with mode:
            exc = error_of(lambda: call(case.op, fake))
    return type(exc).__name__, str(exc)


@pytest.mark.parametrize("case", SHAPE_CASES, ids=_ids(SHAPE_CASES))
def test_fake_kernel_raises_the_contract_error(world2, case):
    _check(case, world2.run(_run_fake, case.name))


def _never_compiled(gm, example_inputs):
    raise AssertionError("the fake kernel accepted the bad input: a graph reached the backend")


def _run_compiled(name):
    """Trace one op call with fullgraph=True; the fake kernel must reject the input while tracing."""
    case = contract_cases.BY_NAME[name]
    with torch_ep.Buffer(None, contract_cases.EXPERTS, contract_cases.HIDDEN, contract_cases.MAX_TOKENS,
                         device="cpu") as buffer:
        args = bad_args(case, buffer, torch.device("cpu"))
        tensors = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in args.items() if k not in tensors}
        torch._dynamo.reset()
        fn = torch.compile(lambda t: call(case.op, {**t, **rest}), fullgraph=True, backend=_never_compiled)
        exc = error_of(lambda: fn(tensors))
    # dynamo reports errors raised while tracing as its own type; the cause is the checks' ValueError
    cause = exc
    while not isinstance(cause, case.error) and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    return type(cause).__name__, str(exc)


@pytest.mark.parametrize("case", SHAPE_CASES, ids=_ids(SHAPE_CASES))
def test_compiled_call_raises_the_contract_error(world2, case):
    _check(case, world2.run(_run_compiled, case.name))


# -- CUDA ------------------------------------------------------------------------------------------

SHARED_GPU = os.environ.get("TORCH_EP_SHARED_GPU") == "1"
HAVE_GPUS = torch.cuda.is_available() and (torch.cuda.device_count() >= 2 or SHARED_GPU)


@pytest.fixture(scope="module")
def gpus():
    pool = Pool(2, backend="gloo", use_cuda=True)
    yield pool
    pool.close()


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPUS, reason="needs 2 CUDA GPUs (or TORCH_EP_SHARED_GPU=1)")
@pytest.mark.skipif(not torch_ep._C.WITH_CUDA, reason="torch_ep was built without CUDA")
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_cuda_raises_the_contract_error(gpus, case):
    _check(case, gpus.run(contract_cases.run_case, case.name, "cuda"))


# -- calls that go wrong across ranks (test/failure_cases.py; on GPUs: test/test_reliability_gpu.py) ------

FAILURE_TIMEOUT_S = 2.0


def test_nvlink_buffers_must_share_a_layout():
    same = {"num_experts": 8, "hidden": 256, "num_sms": 24}
    _check_same_layout([same, same])
    with pytest.raises(ValueError, match=r"ranks disagree on hidden \(rank 0: 256, rank 1: 512\)"):
        _check_same_layout([same, {**same, "hidden": 512}])


@pytest.mark.parametrize("name", [s.name for s in failure_cases.SCENARIOS])
def test_cpu_path_raises_naming_op_and_rank(world2, name):
    outcomes = world2.run(failure_cases.run_scenario, name, "cpu", FAILURE_TIMEOUT_S)
    # the count exchange rejects a disagreeing call (ValueError); a silent rank fails the Buffer
    failure_cases.check_outcomes(name, outcomes, FAILURE_TIMEOUT_S, ("ValueError", "TransportError"))
