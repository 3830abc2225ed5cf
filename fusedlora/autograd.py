"""The fused LoRA linear as torch custom ops over the Triton launchers, with their autograd.

Forward: S = s·D(x)·Aᵀ (shrink, dropout mask drawn in-kernel), then y = x·Wᵀ + b + S·Bᵀ (one GEMM).
Backward, with G = dY and c = s/(1-p):
    dU, dB = c·G·B, Gᵀ·S          one pass over G
    dX     = G·W + keep ⊙ (dU·A)   the dX GEMM with dU·A as extra K-steps, mask in the epilogue
    dA     = dUᵀ·(keep ⊙ x)       the mask regenerated from the seed
    dW     = Gᵀ·x,  db = Σ_rows G
Saved for backward: x, S (M×r fp32), the parameters and the seed; never a mask or a dropped copy of x.

fused_forward and fused_backward are the launcher sequences. They are registered as the custom ops
fusedlora::lora_linear -> (y, S) and fusedlora::lora_linear_backward, with fake (meta) versions and
register_autograd, so torch.compile(fullgraph=True) traces through them without a graph break (a raw
Triton launch or a plain autograd.Function would break the graph; TRITON-NOTES.md). The seed is a 0-d
int64 CPU tensor input rather than an int, so that a seed drawn from torch's generator inside a
compiled region stays a graph value and is saved for backward like any other tensor.
"""
import math
from typing import List, Optional, Tuple

import torch

from fusedlora.dropout import keep_threshold
from fusedlora.kernels.lora_gemm import lora_gemm
from fusedlora.kernels.lora_shrink import lora_dy, lora_shrink


def fused_forward(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float,
                  seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y: (*, N), S: (M, r) fp32) for x: (*, K); inputs already validated."""
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    S = lora_shrink(x2, lora_A, scaling / (1.0 - dropout_p), seed, keep_threshold(dropout_p),
                    dropout=dropout_p > 0)
    y = lora_gemm(x2, weight, bias, p=S, q=lora_B)
    return y.reshape(*x.shape[:-1], N), S


def fused_backward(dy, x, weight, lora_A, lora_B, S, scaling: float, dropout_p: float, seed: int,
                   needs: Tuple[bool, bool, bool, bool, bool]):
    """Gradients (dx, dweight, dbias, dlora_A, dlora_B) for the flags in `needs`, None elsewhere."""
    need_x, need_w, need_b, need_A, need_B = needs
    K, N = x.shape[-1], weight.shape[0]
    g = dy.reshape(-1, N)
    x2 = x.reshape(-1, K)
    threshold, dropout = keep_threshold(dropout_p), dropout_p > 0
    c = scaling / (1.0 - dropout_p)
    dU, dB = lora_dy(g, lora_B, S, c, compute_ds=need_x or need_A, compute_db=need_B)
    dx = dw = db = dA = None
    if need_x:
        dx = lora_gemm(g, weight.t(), None, p=dU, q=lora_A.t(), seed=seed, threshold=threshold,
                       dropout=dropout).reshape(x.shape)
    if need_A:
        dA = torch.empty_like(lora_A, memory_format=torch.contiguous_format)
        lora_shrink(x2.t(), dU.t(), 1.0, seed, threshold, dropout=dropout, mask_transposed=True, out=dA.t())
    if need_w:
        dw = lora_gemm(g.t(), x2.t(), out_dtype=weight.dtype)
    if need_b:
        db = g.sum(0, dtype=torch.float32).to(weight.dtype)
    if need_B:
        dB = dB.to(lora_B.dtype)
    return dx, dw, db, dA, dB


@torch.library.custom_op("fusedlora::lora_linear", mutates_args=())
def lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                   lora_B: torch.Tensor, scaling: float, dropout_p: float,
                   seed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y: (*, N), S: (M, r) fp32); seed: 0-d int64 CPU tensor. Inputs validated by the caller."""
    return fused_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, int(seed))


@lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, x.new_empty((math.prod(x.shape[:-1]), lora_A.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fusedlora::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                            lora_B: torch.Tensor, S: torch.Tensor, scaling: float, dropout_p: float,
                            seed: torch.Tensor, needs: List[bool]) -> List[torch.Tensor]:
    """The gradients of (x, weight, bias, lora_A, lora_B) whose flag in `needs` is set, in that order.

    A list of only the needed ones because a custom op cannot return None."""
    grads = fused_backward(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, int(seed), tuple(needs))
    return [g for g in grads if g is not None]


@lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, needs):
    like = (x, weight, weight.new_empty(weight.shape[0]), lora_A, lora_B)
    return [torch.empty_like(t, memory_format=torch.contiguous_format)
            for t, need in zip(like, needs) if need]


def _setup_context(ctx, inputs, output):
    x, weight, _, lora_A, lora_B, scaling, dropout_p, seed = inputs
    S = output[1]
    ctx.mark_non_differentiable(S)
    ctx.save_for_backward(x, weight, lora_A, lora_B, S, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _backward(ctx, dy, _dS):
    x, weight, lora_A, lora_B, S, seed = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = iter(lora_linear_backward_op(dy, x, weight, lora_A, lora_B, S, ctx.scaling, ctx.dropout_p,
                                         seed, needs))
    return (*(next(grads) if need else None for need in needs), None, None, None)


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)
