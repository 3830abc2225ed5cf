"""The fused LoRA linear as an autograd Function over the Triton launchers.

Forward: S = s·D(x)·Aᵀ (shrink, dropout mask drawn in-kernel), then y = x·Wᵀ + b + S·Bᵀ (one GEMM).
Backward, with G = dY and c = s/(1-p):
    dU, dB = c·G·B, Gᵀ·S          one pass over G
    dX     = G·W + keep ⊙ (dU·A)   the dX GEMM with dU·A as extra K-steps, mask in the epilogue
    dA     = dUᵀ·(keep ⊙ x)       the mask regenerated from the seed
    dW     = Gᵀ·x,  db = Σ_rows G
Saved for backward: x, S (M×r fp32), the parameters and the seed; never a mask or a dropped copy of x.
fused_forward and fused_backward are plain functions so they can be registered as custom ops.
"""
from typing import Optional, Tuple

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


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias: Optional[torch.Tensor], lora_A, lora_B, scaling: float,
                dropout_p: float, seed: int):
        y, S = fused_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        ctx.save_for_backward(x, weight, lora_A, lora_B, S)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, S = ctx.saved_tensors
        grads = fused_backward(dy, x, weight, lora_A, lora_B, S, ctx.scaling, ctx.dropout_p, ctx.seed,
                               tuple(ctx.needs_input_grad[:5]))
        return (*grads, None, None, None)
