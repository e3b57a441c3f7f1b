"""The op contract: every input check of the ep ops, used by the CPU path and the fake kernels.

Limits and element types are defined once in C++ (csrc/runtime/layout.h, csrc/contract.h) and read
here from `_C`. Each message names the op and the argument; the CUDA checks in csrc/ops_cuda.cpp
produce the same text (dtypes by torch name, shapes as [a, b]), which test/contract_cases.py holds
every path to. Checks raise ValueError.
"""
import torch

from . import _C

MAX_TOPK: int = _C.MAX_TOPK              # top-k entries a token may carry
MAX_CUDA_RANKS: int = _C.MAX_RANKS       # ranks of one NVLink buffer (the CPU path has no limit)
SCALE_BLOCK: int = _C.SCALE_BLOCK        # FP8 channels that share one fp32 scale
ACTIVATION_DTYPES = tuple(getattr(torch, name) for name in _C.ACTIVATION_DTYPES)  # x (unless FP8) and y
FP8_DTYPE = getattr(torch, _C.FP8_DTYPE)
SCALE_DTYPE = getattr(torch, _C.SCALE_DTYPE)
TOPK_IDX_DTYPE = getattr(torch, _C.TOPK_IDX_DTYPE)
TOPK_WEIGHT_DTYPE = getattr(torch, _C.TOPK_WEIGHT_DTYPE)  # what the ops take
# What Buffer.dispatch takes for topk_weights: routers often produce bf16; it converts to fp32 first.
ROUTER_WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
COMBINE_INPUT_DTYPES = (torch.bfloat16, torch.float16)  # Buffer.combine_input: rows of a bf16 row's size


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype without the module ("bfloat16"), as the C++ checks print it."""
    return str(dtype).removeprefix("torch.")


def names(dtypes) -> str:
    """'a, b, c or d'."""
    listed = [dtype_name(d) for d in dtypes]
    return ", ".join(listed[:-1]) + " or " + listed[-1] if len(listed) > 1 else listed[0]


def shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def scale_columns(hidden: int) -> int:
    """Columns of the fp32 scale tensor that accompanies an FP8 row of `hidden` channels."""
    return (hidden + SCALE_BLOCK - 1) // SCALE_BLOCK


def _require(ok, message) -> None:
    """Raise ValueError(message()) unless ok. A symbolic condition (torch.compile) goes to
    torch._check_value, which guards on it; a plain bool is checked directly, which keeps the first
    op call from importing the symbolic-shape machinery."""
    if isinstance(ok, bool):
        if not ok:
            raise ValueError(message())
    else:
        torch._check_value(ok, message)


def check_group_experts(num_experts: int, num_ranks: int, op: str) -> None:
    _require(num_ranks >= 1, lambda: f"{op}: num_ranks={num_ranks} must be >= 1")
    _require(num_experts > 0 and num_experts % num_ranks == 0,
             lambda: f"{op}: num_experts={num_experts} must be a positive multiple of num_ranks={num_ranks}")


def check_topk_idx(topk_idx, op: str) -> None:
    """topk_idx [num_tokens, k] int64 with 1 <= k <= MAX_TOPK (no data reads)."""
    _require(topk_idx.dtype == TOPK_IDX_DTYPE and topk_idx.dim() == 2,
             lambda: f"{op}: topk_idx must be int64 [num_tokens, k], got {dtype_name(topk_idx.dtype)} "
                     f"{shape(topk_idx)}")
    _require(1 <= topk_idx.shape[1] <= MAX_TOPK,
             lambda: f"{op}: topk_idx has k={topk_idx.shape[1]}, must be in [1, {MAX_TOPK}]")


def expert_id_error(topk_idx, num_experts: int, op: str):
    """Message naming topk_idx if it holds ids outside [-1, num_experts), else None (reads the data)."""
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    if bool(bad.any()):
        return f"{op}: topk_idx holds expert id {int(topk_idx[bad][0])}, outside [-1, num_experts={num_experts})"
    return None


def check_layout_inputs(topk_idx, num_experts: int, num_ranks: int) -> None:
    """ep.get_dispatch_layout's arguments, the shape-only part (fake and CPU)."""
    op = "ep.get_dispatch_layout"
    check_group_experts(num_experts, num_ranks, op)
    check_topk_idx(topk_idx, op)


def check_x(x, x_scales, op: str, hidden=None, max_tokens=None) -> None:
    """x [num_tokens, hidden] in an activation dtype, or FP8 with x_scales [num_tokens, ceil(hidden/128)]
    fp32. hidden=None: any width (cached_dispatch also moves gradients of other widths)."""
    _require(x.dim() == 2, lambda: f"{op}: x must be 2-D [num_tokens, hidden], got shape {shape(x)}")
    num_tokens, width = x.shape
    _require(x.dtype in ACTIVATION_DTYPES or x.dtype == FP8_DTYPE,
             lambda: f"{op}: x must be {names(ACTIVATION_DTYPES + (FP8_DTYPE,))}, got {dtype_name(x.dtype)}")
    if hidden is not None:
        _require(width == hidden, lambda: f"{op}: x has hidden size {width} but the buffer was built for "
                                          f"hidden={hidden}")
    if max_tokens is not None:
        _require(num_tokens <= max_tokens, lambda: f"{op}: x has {num_tokens} tokens, more than the buffer's "
                                                   f"max_tokens_per_rank={max_tokens}")
    if x.dtype != FP8_DTYPE:
        _require(x_scales is None, lambda: f"{op}: x_scales is only accepted with float8_e4m3fn x")
        return
    _require(x_scales is not None, lambda: f"{op}: float8_e4m3fn x needs x_scales (pass x as (x, scales))")
    want = [num_tokens, scale_columns(width)]
    _require(x_scales.dtype == SCALE_DTYPE and list(x_scales.shape) == want,
             lambda: f"{op}: x_scales must be float32 {want}, got {dtype_name(x_scales.dtype)} {shape(x_scales)}")


def check_dispatch_inputs(x, x_scales, topk_idx, topk_weights, cfg, expert_alignment=1,
                          num_worst_tokens=0) -> None:
    """ep.dispatch's arguments against a buffer config (no data reads)."""
    op = "ep.dispatch"
    check_x(x, x_scales, op, cfg.hidden, cfg.max_tokens_per_rank)
    check_topk_idx(topk_idx, op)
    _require(topk_idx.shape[0] == x.shape[0],
             lambda: f"{op}: topk_idx has {topk_idx.shape[0]} rows but x has {x.shape[0]} tokens")
    _require(topk_weights.dtype == TOPK_WEIGHT_DTYPE and topk_weights.shape == topk_idx.shape,
             lambda: f"{op}: topk_weights must be float32 {shape(topk_idx)}, got {dtype_name(topk_weights.dtype)} "
                     f"{shape(topk_weights)}")
    _require(expert_alignment >= 1, lambda: f"{op}: expert_alignment={expert_alignment} must be >= 1")
    _require(num_worst_tokens >= 0, lambda: f"{op}: num_worst_tokens={num_worst_tokens} must be >= 0")


def check_handle(send_pos, recv_src_idx, rank_prefix, num_ranks: int, op: str) -> None:
    """The handle tensors of a dispatch, as combine and cached_dispatch take them."""
    _require(send_pos.dtype == torch.int32 and send_pos.dim() == 2 and send_pos.shape[1] == num_ranks,
             lambda: f"{op}: send_pos must be int32 [num_tokens, {num_ranks}], got {dtype_name(send_pos.dtype)} "
                     f"{shape(send_pos)}")
    _require(recv_src_idx.dtype == torch.int32 and recv_src_idx.dim() == 1,
             lambda: f"{op}: recv_src_idx must be int32 [num_recv], got {dtype_name(recv_src_idx.dtype)} "
                     f"{shape(recv_src_idx)}")
    _require(rank_prefix.dtype == torch.int32 and list(rank_prefix.shape) == [num_ranks + 1, num_ranks],
             lambda: f"{op}: rank_prefix must be int32 [{num_ranks + 1}, {num_ranks}], got "
                     f"{dtype_name(rank_prefix.dtype)} {shape(rank_prefix)}")


def check_cached_dispatch_inputs(x, x_scales, send_pos, recv_src_idx, rank_prefix, cfg) -> None:
    op = "ep.cached_dispatch"
    check_handle(send_pos, recv_src_idx, rank_prefix, cfg.num_ranks, op)
    check_x(x, x_scales, op)
    _require(x.shape[0] == send_pos.shape[0],
             lambda: f"{op}: x has {x.shape[0]} tokens but the handle's send_pos has {send_pos.shape[0]}")


def check_combine_input(y, recv_src_idx) -> None:
    op = "ep.combine"
    _require(y.dim() == 2 and y.shape[0] == recv_src_idx.shape[0],
             lambda: f"{op}: y must be [num_recv={recv_src_idx.shape[0]}, hidden], got shape {shape(y)}")
    _require(y.dtype in ACTIVATION_DTYPES, lambda: f"{op}: y must be {names(ACTIVATION_DTYPES)}, got "
                                                   f"{dtype_name(y.dtype)}")


def check_combine_inputs(y, send_pos, recv_src_idx, rank_prefix, cfg) -> None:
    check_handle(send_pos, recv_src_idx, rank_prefix, cfg.num_ranks, "ep.combine")
    check_combine_input(y, recv_src_idx)


def check_expert_ids(topk_idx, num_experts: int):
    """ep.dispatch's data check: a message if topk_idx holds ids outside [-1, num_experts), else None."""
    return expert_id_error(topk_idx, num_experts, "ep.dispatch")


def check_capability(capability, archs, ptx_arch: int, device) -> None:
    """Refuse a GPU the CUDA kernels were not compiled for. A cubin for X.Y runs on X.Z (Z >= Y);
    PTX for X.Y JIT-compiles for any capability >= X.Y."""
    major, minor = capability
    cap = major * 10 + minor
    runs = any(a // 10 == major and a % 10 <= minor for a in archs) or (ptx_arch and cap >= ptx_arch)
    if not runs:
        built = ", ".join(f"{a // 10}.{a % 10}" for a in archs) + (f" (+PTX {ptx_arch // 10}.{ptx_arch % 10})"
                                                                   if ptx_arch else "")
        raise RuntimeError(
            f"torch_ep.Buffer: {device} has compute capability {major}.{minor}, but torch_ep's CUDA kernels were "
            f"built for {built or 'none'}; rebuild for it: TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" "
            f"pip install --no-build-isolation -e .")
