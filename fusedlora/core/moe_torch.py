"""The PyTorch backend of moe_lora_linear (fusedlora/moe.py): one expert projection with LoRA, every
(token, expert) pair of an ExpertRouting at once, in its sorted order.

    y[i] = x_i·W_eᵀ + b_e + s_a·(D(x_i)·A_{a,e}ᵀ)·B_{a,e}ᵀ      sorted position i: expert e, adapter a

No tensor of the weight's E·N·K size is made, forward or backward: the base product is one grouped
matrix product over the experts' segments of the sorted rows (the weight read in place through a
transposed view), and the low-rank term two more over the (expert, adapter) segments, against stacks
of the adapters' factors (E·(L + 1)·R·K elements: adapter-sized, zero for the base-only segments).
Dropout is the Philox mask of fusedlora/core/dropout.py over the (P, K) input in routing order,
so it does not depend on the grouping; the dropped copy of x is the one (P, K) tensor it adds.

The grouped products go through segment_mm: torch's grouped_mm where it serves (float32, bfloat16 and
float16 on CPU, bfloat16 on CUDA; operands whose strides are multiples of 16 bytes), else a loop of
one mm per segment (its boundaries read back to the host once). In eager mode segment_mm is a plain
autograd.Function over those torch ops, so every tensor it makes is an ordinary aten op's output (the
tests count them); under torch.compile it is the custom op fusedlora::moe_segment_mm, opaque to the
compiler, since grouped_mm's meta function accepts only bfloat16 and the loop depends on values.
Backward makes the incoming gradient contiguous first: grouped_mm refuses the zero strides of an
expanded gradient (measured: torch 2.13 on CPU, `y.sum().backward()`).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from fusedlora.core.dropout import dropout_mask, seed_tensor
from fusedlora.core.moe_routing import ExpertRouting

_GROUPED_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm's layout rule (torch 2.13): one of the last two dims contiguous, every other stride
    of a dim longer than 1 a non-zero multiple of 16 bytes."""
    if t.shape[-1] > 1 and t.shape[-2] > 1 and 1 not in (t.stride(-1), t.stride(-2)):
        return False
    size = t.element_size()
    return all(n <= 1 or s == 1 or (s != 0 and (s * size) % 16 == 0) for n, s in zip(t.shape, t.stride()))


def _grouped_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    dtypes = _GROUPED_DTYPES.get(a.device.type, ())
    return a.dtype in dtypes and b.dtype == a.dtype and _aligned(a) and _aligned(b)


def _ends(offs: torch.Tensor):
    return [0] + offs.tolist()  # one read back of the segment boundaries


def segment_mm_forward(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, compact: bool = False) -> torch.Tensor:
    """x: (P, K) rows grouped in segments; w: (G, K, N) any strides; offs: (G,) int32, segment g is rows
    [offs[g - 1], offs[g]) (offs[-1] = P) -> (P, N) in w's dtype, row i of segment g = x[i]·w[g]. x in
    another dtype (bf16 rows, fp32 adapters) is cast here, so the cast copy is never kept for backward.
    compact: w is adapter-sized, and a layout grouped_mm refuses (PEFT's lora_B view) may be copied here,
    a copy that lives for this call only; an expert weight is never copied (the per-segment loop reads it)."""
    x = x.to(w.dtype)
    if compact and not _aligned(w):
        w = w.contiguous()
    if _grouped_ok(x, w):
        return F.grouped_mm(x, w, offs=offs)
    out = x.new_zeros(x.shape[0], w.shape[2])
    ends = _ends(offs)
    for g in range(w.shape[0]):
        lo, hi = ends[g], ends[g + 1]
        if hi > lo:
            out[lo:hi] = x[lo:hi] @ w[g]
    return out


def segment_mm_weight_grad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, groups: int) -> torch.Tensor:
    """(G, K, N): segment g's x_gᵀ·dy_g, the gradient of w in segment_mm_forward (zero for empty segments),
    in dy's dtype."""
    xt = x.to(dy.dtype).t()
    if _grouped_ok(xt, dy):
        return F.grouped_mm(xt, dy, offs=offs)
    out = x.new_zeros(groups, x.shape[1], dy.shape[1])
    ends = _ends(offs)
    for g in range(groups):
        lo, hi = ends[g], ends[g + 1]
        if hi > lo:
            out[g] = xt[:, lo:hi] @ dy[lo:hi]
    return out


def _segment_mm_backward(x, w, offs, dy, groups: int, x_dtype: torch.dtype, compact: bool, need_x: bool,
                         need_w: bool):
    """(dx, dw) of segment_mm_forward; x is needed only for dw, w only for dx; dx in x's dtype."""
    dy = dy.contiguous()
    dx = segment_mm_forward(dy, w.transpose(-1, -2), offs, compact).to(x_dtype) if need_x else None
    dw = segment_mm_weight_grad(x, dy, offs, groups) if need_w else None
    return dx, dw


class _SegmentMM(torch.autograd.Function):
    """segment_mm in eager mode: keeps x only when w needs a gradient and w only when x does."""

    @staticmethod
    def forward(ctx, x, w, offs, compact):
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if need_w else None, w if need_x else None, offs)
        ctx.groups, ctx.x_dtype, ctx.compact = w.shape[0], x.dtype, compact
        return segment_mm_forward(x, w, offs, compact)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        dx, dw = _segment_mm_backward(x, w, offs, dy, ctx.groups, ctx.x_dtype, ctx.compact, need_x, need_w)
        return dx, dw, None, None


@torch.library.custom_op("fusedlora::moe_segment_mm", mutates_args=())
def _segment_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, compact: bool) -> torch.Tensor:
    return segment_mm_forward(x, w, offs, compact)


@_segment_mm_op.register_fake
def _(x, w, offs, compact):
    return w.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("fusedlora::moe_segment_mm_weight_grad", mutates_args=())
def _weight_grad_op(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, groups: int) -> torch.Tensor:
    return segment_mm_weight_grad(x, dy, offs, groups)


@_weight_grad_op.register_fake
def _(x, dy, offs, groups):
    return dy.new_empty(groups, x.shape[1], dy.shape[1])


def _op_setup(ctx, inputs, output):
    x, w, offs, compact = inputs
    need_x, need_w = ctx.needs_input_grad[:2]
    ctx.save_for_backward(x if need_w else None, w if need_x else None, offs)
    ctx.groups, ctx.x_dtype, ctx.compact = w.shape[0], x.dtype, compact


def _op_backward(ctx, dy):
    x, w, offs = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    dy = dy.contiguous()
    dx = _segment_mm_op(dy, w.transpose(-1, -2), offs, ctx.compact).to(ctx.x_dtype) if need_x else None
    dw = _weight_grad_op(x, dy, offs, ctx.groups) if need_w else None
    return dx, dw, None, None


_segment_mm_op.register_autograd(_op_backward, setup_context=_op_setup)


def segment_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, compact: bool = False) -> torch.Tensor:
    """segment_mm_forward, differentiable in x and w: an autograd.Function eagerly, the custom op
    fusedlora::moe_segment_mm under torch.compile. Backward keeps x (for w's gradient) and w (for x's) as
    given: a view of a parameter costs nothing, and a compact copy of w is made again, not kept."""
    if torch.compiler.is_compiling():
        return _segment_mm_op(x, w, offs, compact)
    return _SegmentMM.apply(x, w, offs, compact)


def _rank_padding(R: int, dtype: torch.dtype) -> int:
    """R rounded up so that a row of R elements is a multiple of 16 bytes (grouped_mm's rule)."""
    per = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return -(-R // per) * per


def _segment_stack(factor: torch.Tensor, ranks: Optional[torch.Tensor], rank_dim: int, R_pad: int):
    """(E·(L + 1), ...) stacks of the adapters' per-expert factors in segment order c = e·(L + 1) + a + 1,
    zero for the base-only segments (a = -1) and past each adapter's rank, the rank padded to R_pad.
    factor: lora_A (L, E, R, K) (rank_dim 2) or lora_B (L, E, N, R) (rank_dim 3)."""
    L, E = factor.shape[:2]
    R = factor.shape[rank_dim]
    if ranks is not None:
        in_rank = torch.arange(R, device=factor.device) < ranks.reshape(L, 1).to(factor.device)  # (L, R)
        shape = [L, 1, 1, 1]
        shape[rank_dim] = R
        # where, not a multiply: a NaN past a rank must not leak (0 * NaN is NaN)
        factor = torch.where(in_rank.reshape(shape), factor, 0)
    per_expert = factor.transpose(0, 1)  # (E, L, ...)
    zeros = per_expert.new_zeros((E, 1) + tuple(per_expert.shape[2:]))
    stack = torch.cat([zeros, per_expert], dim=1)  # (E, L + 1, ...)
    if R_pad > R:
        # F.pad lists dims from the last; the rank's dim of the stack is rank_dim, as in the factor
        stack = F.pad(stack, [0, 0] * (stack.dim() - 1 - rank_dim) + [0, R_pad - R])
    return stack.reshape((E * (L + 1),) + tuple(stack.shape[2:]))


def moe_lora_linear(x, routing: ExpertRouting, weight, bias, lora_A, lora_B, scaling, dropout_p: float = 0.0,
                    seed=None, gather: bool = True, ranks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fusedlora.moe_lora_linear for validated inputs -> (P, N) in x's dtype, sorted order. lora_A and
    lora_B None: the base projection alone."""
    rows = x.index_select(0, routing.rows) if gather else x  # (P, K) sorted
    y = segment_mm(rows, weight.transpose(-1, -2), routing.expert_offsets())
    L1 = routing.num_adapters + 1
    if bias is not None:
        experts = torch.div(routing.keys, L1, rounding_mode="floor")
        y = y + bias.index_select(0, experts)
    if lora_A is None:
        return y
    dtype = lora_A.dtype
    xa = rows  # in x's dtype: the shrink reads it in the adapters' dtype without keeping a cast copy
    if dropout_p > 0:
        keep = dropout_mask(seed_tensor(seed, dropout_p), (routing.P, x.shape[1]), dropout_p, x.device)
        xa = torch.where(keep.index_select(0, routing.order), xa, 0)  # selected away: a dropped NaN adds nothing
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    if routing.adapter_ids is None and routing.num_adapters == 1 and ranks is None:
        # One adapter on every pair (training, a single-adapter model): the segments are the experts', and
        # the factors are read through views (PEFT's layout in place), so backward keeps no copy of them.
        offs = routing.expert_offsets()
        S = segment_mm(xa, lora_A[0].transpose(-1, -2), offs, compact=True)
        s = scaling[0].to(dtype) if isinstance(scaling, torch.Tensor) else float(scaling)
        update = segment_mm(S * (s * keep_scale), lora_B[0].transpose(-1, -2), offs, compact=True)
        return (y.to(dtype) + update).to(x.dtype)
    R_pad = _rank_padding(lora_A.shape[2], dtype)
    stack_A = _segment_stack(lora_A, ranks, 2, R_pad)  # (C, R_pad, K)
    stack_B = _segment_stack(lora_B, ranks, 3, R_pad)  # (C, N, R_pad)
    if isinstance(scaling, torch.Tensor):
        per_segment = torch.cat([scaling.new_zeros(1), scaling]).to(dtype)  # (L + 1,): a = -1 scales by 0
    else:
        per_segment = torch.full((L1,), float(scaling), dtype=dtype, device=x.device)
    row_scaling = per_segment.index_select(0, torch.remainder(routing.keys, L1)) * keep_scale
    offs = routing.seg_starts[1:]
    S = segment_mm(xa, stack_A.transpose(-1, -2), offs) * row_scaling[:, None]
    update = segment_mm(S, stack_B.transpose(-1, -2), offs)
    return (y.to(dtype) + update).to(x.dtype)
