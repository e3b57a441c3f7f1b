"""Fake (meta) implementations and autograd formulas of the ep operators.

dispatch and combine are adjoint: the gradient of dispatch is a combine of the gradients, and the
gradient of combine is a dispatch (with the cached layout) of the gradient.
"""
import torch

from ._checks import (check_cached_dispatch_inputs, check_combine_inputs, check_dispatch_inputs, check_layout_inputs,
                      scale_columns)
from .buffer import after, call_op, lookup

# -- fake implementations ------------------------------------------------------------------------


@torch.library.register_fake("ep::get_dispatch_layout")
def _get_dispatch_layout_fake(topk_idx, num_experts, num_ranks):
    check_layout_inputs(topk_idx, num_experts, num_ranks)
    return (topk_idx.new_empty((num_ranks,), dtype=torch.int32),
            topk_idx.new_empty((num_experts,), dtype=torch.int32),
            topk_idx.new_empty((topk_idx.shape[0], num_ranks), dtype=torch.bool))


def _recv_scales_like(x, x_scales, num_rows):
    cols = scale_columns(x.shape[1]) if x_scales is not None else 0
    return x.new_empty((num_rows, cols), dtype=torch.float32)


@torch.library.register_fake("ep::dispatch")
def _dispatch_fake(x, x_scales, topk_idx, topk_weights, buffer, expert_alignment=1, num_worst_tokens=0):
    cfg = lookup(buffer).config
    check_dispatch_inputs(x, x_scales, topk_idx, topk_weights, cfg, expert_alignment, num_worst_tokens)
    num_rows = num_worst_tokens if num_worst_tokens > 0 else torch.library.get_ctx().new_dynamic_size()
    k = topk_idx.shape[1]
    return (x.new_empty((num_rows, x.shape[1])),
            _recv_scales_like(x, x_scales, num_rows),
            topk_idx.new_empty((num_rows, k)),
            topk_weights.new_empty((num_rows, k)),
            topk_idx.new_empty((cfg.experts_per_rank,), dtype=torch.int32),
            topk_idx.new_empty((x.shape[0], cfg.num_ranks), dtype=torch.int32),
            topk_idx.new_empty((num_rows,), dtype=torch.int32),
            topk_idx.new_empty((cfg.num_ranks + 1, cfg.num_ranks), dtype=torch.int32))


@torch.library.register_fake("ep::cached_dispatch")
def _cached_dispatch_fake(x, x_scales, send_pos, recv_src_idx, rank_prefix, buffer):
    cfg = lookup(buffer).config
    check_cached_dispatch_inputs(x, x_scales, send_pos, recv_src_idx, rank_prefix, cfg)
    num_rows = recv_src_idx.shape[0]
    return x.new_empty((num_rows, x.shape[1])), _recv_scales_like(x, x_scales, num_rows)


@torch.library.register_fake("ep::combine")
def _combine_fake(y, send_pos, recv_src_idx, rank_prefix, buffer):
    cfg = lookup(buffer).config
    check_combine_inputs(y, send_pos, recv_src_idx, rank_prefix, cfg)
    return y.new_empty((send_pos.shape[0], y.shape[1]))


# The ProcessGroup transport's twins (same schemas, see csrc/registration.cpp) have the same shapes.
for _name, _fake in (("dispatch", _dispatch_fake), ("cached_dispatch", _cached_dispatch_fake),
                     ("combine", _combine_fake)):
    torch.library.register_fake(f"ep::pg_{_name}", _fake)


# -- autograd ------------------------------------------------------------------------------------

_WEIGHT_PAD = 4  # fp32 columns per 16 bytes: kernels move rows in 16-byte units


def _combine(grad, handle, buffer):
    return call_op(torch.ops.ep.combine.default, (grad,), grad, *handle, buffer)


def _combine_weights(grad_recv_weights, recv_topk_idx, handle, buffer):
    """Gradient of topk_weights: each entry's gradient lives on the rank owning its expert."""
    grad = grad_recv_weights.masked_fill(recv_topk_idx < 0, 0.0)
    k = grad.shape[1]
    padded = torch.nn.functional.pad(grad, (0, -k % _WEIGHT_PAD))
    return _combine(padded, handle, buffer)[:, :k]


def _dispatch_setup(ctx, inputs, output):
    ctx.buffer = inputs[4]
    ctx.x_is_fp8 = inputs[0].dtype == torch.float8_e4m3fn
    recv_topk_idx, send_pos, recv_src_idx, rank_prefix = output[2], output[5], output[6], output[7]
    ctx.save_for_backward(recv_topk_idx, send_pos, recv_src_idx, rank_prefix)


def _dispatch_backward(ctx, grad_recv_x, _grad_scales, _grad_idx, grad_recv_weights, *_rest):
    recv_topk_idx, send_pos, recv_src_idx, rank_prefix = ctx.saved_tensors
    grad_x = grad_weights = None
    # the weights' combine first, and x's after it (see buffer.after): x's gradient is what the rest of the
    # backward waits for, so every later collective call comes after both
    if ctx.needs_input_grad[3]:
        grad_weights = _combine_weights(grad_recv_weights, recv_topk_idx, (send_pos, recv_src_idx, rank_prefix),
                                        ctx.buffer)
        rank_prefix = after(grad_weights, rank_prefix)
    if ctx.needs_input_grad[0] and not ctx.x_is_fp8:
        grad_x = _combine(grad_recv_x, (send_pos, recv_src_idx, rank_prefix), ctx.buffer)
    return grad_x, None, None, grad_weights, None, None, None


def _cached_dispatch_setup(ctx, inputs, output):
    ctx.buffer = inputs[5]
    ctx.save_for_backward(*inputs[2:5])


def _cached_dispatch_backward(ctx, grad_recv_x, _grad_scales):
    grad_x = _combine(grad_recv_x, ctx.saved_tensors, ctx.buffer) if ctx.needs_input_grad[0] else None
    return grad_x, None, None, None, None, None


def _combine_setup(ctx, inputs, output):
    ctx.buffer = inputs[4]
    ctx.save_for_backward(*inputs[1:4])


def _combine_backward(ctx, grad_out):
    grad_y = None
    if ctx.needs_input_grad[0]:
        grad_y, _ = call_op(torch.ops.ep.cached_dispatch.default, (grad_out,),
                            grad_out, None, *ctx.saved_tensors, ctx.buffer)
    return grad_y, None, None, None, None


torch.library.register_autograd("ep::dispatch", _dispatch_backward, setup_context=_dispatch_setup)
torch.library.register_autograd("ep::cached_dispatch", _cached_dispatch_backward,
                                setup_context=_cached_dispatch_setup)
torch.library.register_autograd("ep::combine", _combine_backward, setup_context=_combine_setup)
