"""Input checks shared by the fake and CPU implementations: each error names the argument."""
import torch

FP8_BLOCK = 128  # channels per FP8 scale
MAX_TOPK = 32
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def scale_columns(hidden: int) -> int:
    """Columns of the fp32 scale tensor that accompanies an FP8 row of `hidden` channels."""
    return (hidden + FP8_BLOCK - 1) // FP8_BLOCK


def check_dispatch_inputs(x, x_scales, topk_idx, topk_weights, cfg) -> None:
    """Shape/dtype checks of ep.dispatch inputs against a buffer config (no data reads)."""
    torch._check_value(x.dim() == 2, lambda: f"ep.dispatch: x must be 2-D [num_tokens, hidden], got shape {tuple(x.shape)}")
    num_tokens, hidden = x.shape
    torch._check_value(hidden == cfg.hidden,
                 lambda: f"ep.dispatch: x has hidden size {hidden} but the buffer was built for hidden={cfg.hidden}")
    torch._check_value(num_tokens <= cfg.max_tokens_per_rank,
                 lambda: f"ep.dispatch: x has {num_tokens} tokens, more than the buffer's "
                         f"max_tokens_per_rank={cfg.max_tokens_per_rank}")
    if x.dtype == torch.float8_e4m3fn:
        torch._check_value(x_scales is not None, lambda: "ep.dispatch: FP8 x needs x_scales (pass x as (x, scales))")
        want = (num_tokens, scale_columns(hidden))
        torch._check_value(x_scales.dtype == torch.float32 and tuple(x_scales.shape) == want,
                     lambda: f"ep.dispatch: x_scales must be float32 of shape {want}, "
                             f"got {x_scales.dtype} {tuple(x_scales.shape)}")
    else:
        torch._check_value(x.dtype in ACTIVATION_DTYPES,
                     lambda: f"ep.dispatch: x must be bfloat16, float16, float32, float64 or float8_e4m3fn, got {x.dtype}")
        torch._check_value(x_scales is None, lambda: "ep.dispatch: x_scales is only accepted with float8_e4m3fn x")
    check_topk(topk_idx, topk_weights, num_tokens)


def check_topk(topk_idx, topk_weights, num_tokens: int) -> None:
    torch._check_value(topk_idx.dtype == torch.int64 and topk_idx.dim() == 2,
                 lambda: f"ep.dispatch: topk_idx must be int64 [num_tokens, k], got {topk_idx.dtype} "
                         f"{tuple(topk_idx.shape)}")
    torch._check_value(topk_idx.shape[0] == num_tokens,
                 lambda: f"ep.dispatch: topk_idx has {topk_idx.shape[0]} rows but x has {num_tokens} tokens")
    torch._check_value(topk_idx.shape[1] <= MAX_TOPK,
                 lambda: f"ep.dispatch: topk_idx has k={topk_idx.shape[1]}, more than the supported {MAX_TOPK}")
    torch._check_value(topk_weights.dtype == torch.float32 and tuple(topk_weights.shape) == tuple(topk_idx.shape),
                 lambda: f"ep.dispatch: topk_weights must be float32 of shape {tuple(topk_idx.shape)}, got "
                         f"{topk_weights.dtype} {tuple(topk_weights.shape)}")


def check_handle(send_pos, recv_src_idx, rank_prefix, num_ranks: int, op: str) -> None:
    torch._check_value(send_pos.dtype == torch.int32 and send_pos.dim() == 2 and send_pos.shape[1] == num_ranks,
                 lambda: f"{op}: send_pos must be int32 [num_tokens, {num_ranks}], got {send_pos.dtype} "
                         f"{tuple(send_pos.shape)}")
    torch._check_value(recv_src_idx.dtype == torch.int32 and recv_src_idx.dim() == 1,
                 lambda: f"{op}: recv_src_idx must be int32 [num_recv], got {recv_src_idx.dtype} "
                         f"{tuple(recv_src_idx.shape)}")
    torch._check_value(rank_prefix.dtype == torch.int32 and tuple(rank_prefix.shape) == (num_ranks + 1, num_ranks),
                 lambda: f"{op}: rank_prefix must be int32 [{num_ranks + 1}, {num_ranks}], got {rank_prefix.dtype} "
                         f"{tuple(rank_prefix.shape)}")


def check_combine_input(y, recv_src_idx) -> None:
    torch._check_value(y.dim() == 2 and y.shape[0] == recv_src_idx.shape[0],
                 lambda: f"ep.combine: y must be [num_recv={recv_src_idx.shape[0]}, hidden], got {tuple(y.shape)}")
    torch._check_value(y.dtype in ACTIVATION_DTYPES,
                 lambda: f"ep.combine: y must be bfloat16, float16, float32 or float64, got {y.dtype}")


def check_expert_ids(topk_idx, num_experts: int) -> str | None:
    """Message naming topk_idx if it holds ids outside [-1, num_experts), else None (reads data)."""
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    if bool(bad.any()):
        first = int(topk_idx[bad][0])
        return f"ep.dispatch: topk_idx holds expert id {first}, outside [-1, num_experts={num_experts})"
    return None
