"""The op contract as a table: one bad argument -> the error every path must raise.

Each Case edits one argument of an otherwise valid call of a `torch.ops.ep` op. test/test_contract.py
runs every case through the CPU path, the fake kernels (FakeTensorMode and torch.compile) and, with
2 GPUs, the CUDA ops: each must raise `error` with `message` in its text. csrc/ops_cuda.cpp mirrors
the messages of torch_ep/_checks.py; checks run in the order of this table, so the first bad
argument decides the message.
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

import torch_ep

HIDDEN, EXPERTS, TOKENS, K, MAX_TOKENS = 16, 4, 6, 2, 8


@dataclass(frozen=True)
class Case:
    name: str
    op: str                        # get_dispatch_layout, dispatch, cached_dispatch or combine
    bad: Callable[[dict], None]    # edits the valid keyword arguments of the op in place
    message: str                   # a substring of the error's text
    error: type = ValueError
    reads_data: bool = False       # needs the values (fake kernels see shapes only)


def _set(**values):
    return lambda args: args.update(values)


def _edit(name, fn):
    return lambda args: args.update({name: fn(args[name])})


def _cat_k(args, k):
    """topk_idx/topk_weights with k columns."""
    args["topk_idx"] = torch.zeros(TOKENS, k, dtype=torch.int64, device=args["topk_idx"].device)
    args["topk_weights"] = torch.ones(TOKENS, k, device=args["topk_idx"].device)


def _tokens(args, n):
    dev = args["x"].device
    args.update(x=torch.zeros(n, HIDDEN, dtype=torch.bfloat16, device=dev),
                topk_idx=torch.zeros(n, K, dtype=torch.int64, device=dev), topk_weights=torch.ones(n, K, device=dev))


def _fp8(args, scale_cols=None):
    args["x"] = args["x"].to(torch.float8_e4m3fn)
    if scale_cols is not None:
        args["x_scales"] = torch.ones(args["x"].shape[0], scale_cols, device=args["x"].device)


def _set_scales(args):
    args["x_scales"] = torch.ones(TOKENS, 1, device=args["x"].device)


def _poke(name, value):
    """Set entry [0, 0] of a tensor argument."""
    def bad(args):
        args[name] = args[name].clone()
        args[name][0, 0] = value
    return bad


CASES = [
    # get_dispatch_layout(topk_idx, num_experts, num_ranks)
    Case("layout_num_ranks", "get_dispatch_layout", _set(num_ranks=0),
         "ep.get_dispatch_layout: num_ranks=0 must be >= 1"),
    Case("layout_num_experts", "get_dispatch_layout", _set(num_experts=5),
         "ep.get_dispatch_layout: num_experts=5 must be a positive multiple of num_ranks="),
    Case("layout_topk_dtype", "get_dispatch_layout", _edit("topk_idx", lambda t: t.int()),
         f"ep.get_dispatch_layout: topk_idx must be int64 [num_tokens, k], got int32 [{TOKENS}, {K}]"),
    Case("layout_topk_1d", "get_dispatch_layout", _edit("topk_idx", lambda t: t.reshape(-1)),
         f"ep.get_dispatch_layout: topk_idx must be int64 [num_tokens, k], got int64 [{TOKENS * K}]"),
    Case("layout_k_zero", "get_dispatch_layout", _edit("topk_idx", lambda t: t[:, :0]),
         "ep.get_dispatch_layout: topk_idx has k=0, must be in [1, 32]"),
    Case("layout_k_too_large", "get_dispatch_layout", _edit("topk_idx", lambda t: t[:, :1].expand(-1, 33)),
         "ep.get_dispatch_layout: topk_idx has k=33, must be in [1, 32]"),
    Case("layout_expert_too_large", "get_dispatch_layout", _poke("topk_idx", EXPERTS),
         f"ep.get_dispatch_layout: topk_idx holds expert id {EXPERTS}, outside [-1, num_experts={EXPERTS})",
         reads_data=True),
    Case("layout_expert_below_minus_one", "get_dispatch_layout", _poke("topk_idx", -2),
         f"ep.get_dispatch_layout: topk_idx holds expert id -2, outside [-1, num_experts={EXPERTS})",
         reads_data=True),
    # dispatch(x, x_scales, topk_idx, topk_weights, buffer, expert_alignment, num_worst_tokens)
    Case("x_1d", "dispatch", _edit("x", lambda t: t.reshape(-1)),
         f"ep.dispatch: x must be 2-D [num_tokens, hidden], got shape [{TOKENS * HIDDEN}]"),
    Case("x_dtype", "dispatch", _edit("x", lambda t: t.int()),
         "ep.dispatch: x must be bfloat16, float16, float32, float64 or float8_e4m3fn, got int32"),
    Case("x_hidden", "dispatch", _edit("x", lambda t: t[:, :8]),
         f"ep.dispatch: x has hidden size 8 but the buffer was built for hidden={HIDDEN}"),
    Case("x_too_many_tokens", "dispatch", lambda args: _tokens(args, MAX_TOKENS + 1),
         f"ep.dispatch: x has {MAX_TOKENS + 1} tokens, more than the buffer's max_tokens_per_rank={MAX_TOKENS}"),
    Case("scales_without_fp8", "dispatch", _set_scales,
         "ep.dispatch: x_scales is only accepted with float8_e4m3fn x"),
    Case("fp8_without_scales", "dispatch", _fp8,
         "ep.dispatch: float8_e4m3fn x needs x_scales (pass x as (x, scales))"),
    Case("fp8_scales_shape", "dispatch", lambda args: _fp8(args, 2),
         f"ep.dispatch: x_scales must be float32 [{TOKENS}, 1], got float32 [{TOKENS}, 2]"),
    Case("topk_idx_dtype", "dispatch", _edit("topk_idx", lambda t: t.int()),
         f"ep.dispatch: topk_idx must be int64 [num_tokens, k], got int32 [{TOKENS}, {K}]"),
    Case("k_zero", "dispatch", lambda args: _cat_k(args, 0), "ep.dispatch: topk_idx has k=0, must be in [1, 32]"),
    Case("k_too_large", "dispatch", lambda args: _cat_k(args, 33),
         "ep.dispatch: topk_idx has k=33, must be in [1, 32]"),
    Case("topk_idx_rows", "dispatch", _edit("topk_idx", lambda t: t[:-1]),
         f"ep.dispatch: topk_idx has {TOKENS - 1} rows but x has {TOKENS} tokens"),
    Case("topk_weights_dtype", "dispatch", _edit("topk_weights", lambda t: t.bfloat16()),
         f"ep.dispatch: topk_weights must be float32 [{TOKENS}, {K}], got bfloat16 [{TOKENS}, {K}]"),
    Case("topk_weights_shape", "dispatch", _edit("topk_weights", lambda t: t[:, :1]),
         f"ep.dispatch: topk_weights must be float32 [{TOKENS}, {K}], got float32 [{TOKENS}, 1]"),
    Case("expert_alignment", "dispatch", _set(expert_alignment=0), "ep.dispatch: expert_alignment=0 must be >= 1"),
    Case("num_worst_tokens", "dispatch", _set(num_worst_tokens=-1), "ep.dispatch: num_worst_tokens=-1 must be >= 0"),
    Case("expert_too_large", "dispatch", _poke("topk_idx", EXPERTS),
         f"ep.dispatch: topk_idx holds expert id {EXPERTS}, outside [-1, num_experts={EXPERTS})", reads_data=True),
    Case("expert_below_minus_one", "dispatch", _poke("topk_idx", -2),
         f"ep.dispatch: topk_idx holds expert id -2, outside [-1, num_experts={EXPERTS})", reads_data=True),
    # cached_dispatch(x, x_scales, send_pos, recv_src_idx, rank_prefix, buffer)
    Case("cached_send_pos_dtype", "cached_dispatch", _edit("send_pos", lambda t: t.long()),
         "ep.cached_dispatch: send_pos must be int32 [num_tokens, "),
    Case("cached_recv_src_idx_2d", "cached_dispatch", _edit("recv_src_idx", lambda t: t.unsqueeze(1)),
         "ep.cached_dispatch: recv_src_idx must be int32 [num_recv], got int32 ["),
    Case("cached_rank_prefix_shape", "cached_dispatch", _edit("rank_prefix", lambda t: t[:-1]),
         "ep.cached_dispatch: rank_prefix must be int32 ["),
    Case("cached_x_dtype", "cached_dispatch", _edit("x", lambda t: t.int()),
         "ep.cached_dispatch: x must be bfloat16, float16, float32, float64 or float8_e4m3fn, got int32"),
    Case("cached_x_rows", "cached_dispatch", _edit("x", lambda t: t[:-1]),
         f"ep.cached_dispatch: x has {TOKENS - 1} tokens but the handle's send_pos has {TOKENS}"),
    # combine(y, send_pos, recv_src_idx, rank_prefix, buffer)
    Case("combine_send_pos_shape", "combine", _edit("send_pos", lambda t: t[:, :1]),
         "ep.combine: send_pos must be int32 [num_tokens, "),
    Case("combine_y_rows", "combine", _edit("y", lambda t: torch.cat([t, t[:1]])),
         "ep.combine: y must be [num_recv="),
    Case("combine_y_1d", "combine", _edit("y", lambda t: t.reshape(-1)), "ep.combine: y must be [num_recv="),
    Case("combine_y_dtype", "combine", _edit("y", lambda t: t.int()),
         "ep.combine: y must be bfloat16, float16, float32 or float64, got int32"),
]


def valid_args(op: str, buffer, device) -> dict:
    """Keyword arguments of a valid call of `op` on every rank (dispatch and combine get a real handle,
    which takes one collective dispatch)."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(TOKENS, HIDDEN, generator=g).bfloat16().to(device)
    topk_idx = torch.randperm(EXPERTS, generator=g)[:K].repeat(TOKENS, 1).to(device)
    topk_weights = torch.rand(TOKENS, K, generator=g).to(device)
    if op == "get_dispatch_layout":
        return dict(topk_idx=topk_idx, num_experts=EXPERTS, num_ranks=dist.get_world_size())
    if op == "dispatch":
        return dict(x=x, x_scales=None, topk_idx=topk_idx, topk_weights=topk_weights, buffer=buffer.name,
                    expert_alignment=1, num_worst_tokens=0)
    got = buffer.dispatch(x, topk_idx, topk_weights)
    handle = dict(send_pos=got.handle.send_pos, recv_src_idx=got.handle.recv_src_idx,
                  rank_prefix=got.handle.rank_prefix, buffer=buffer.name)
    if op == "cached_dispatch":
        return dict(x=x, x_scales=None, **handle)
    return dict(y=got.recv_x, **handle)


BY_NAME = {case.name: case for case in CASES}


def bad_args(case: Case, buffer, device) -> dict:
    args = valid_args(case.op, buffer, device)
    case.bad(args)
    return args


def call(op: str, args: dict):
    return getattr(torch.ops.ep, op)(**args)


def error_of(fn) -> BaseException:
    try:
        fn()
    except Exception as exc:  # the caller checks type and text
        return exc
    raise AssertionError("the bad input was accepted")


def run_case(name: str, device: str):
    """Every rank makes the same bad call (the case named `name`; cases hold lambdas, which do not
    pickle); returns (type name, text) of this rank's error."""
    case = BY_NAME[name]
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    with torch_ep.Buffer(None, EXPERTS, HIDDEN, MAX_TOKENS, device=device) as buffer:
        args = bad_args(case, buffer, dev)
        exc = error_of(lambda: call(case.op, args))
        if device == "cuda":
            torch.cuda.synchronize()
    return type(exc).__name__, str(exc)
