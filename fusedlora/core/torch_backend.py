"""The PyTorch backend: what FUSEDLORA_BACKEND=torch, and auto on tensors off CUDA, runs for
lora_linear, lora_add and multi_lora_linear (fusedlora/core/backend.py decides).

Same results as the kernels to rounding: the same Philox keep-mask (fusedlora/core/dropout.py), the
same dtype rules (the low-rank path in the adapters' dtype, the sum rounded to the output's), and the
same treatment of non-finite values. Written for speed and for torch.compile (fullgraph, no shape
that depends on a value), not as an oracle: the tests check it against fusedlora/core/reference.py,
which is written separately from the math.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from fusedlora.core.dropout import dropout_mask, seed_tensor


def _shrink(x, lora_A, scaling, dropout_p, seed):
    """S = scaling · D(x)·Aᵀ in the adapters' dtype, with D(x) = x / (1 - p) where kept, else 0.
    The 1 / (1 - p) is folded into the scaling of the (*, r) product rather than a pass over x; a
    dropped element is selected away, not multiplied by zero, so a dropped Inf or NaN adds nothing."""
    xa = x.to(lora_A.dtype)
    if dropout_p > 0:
        keep = dropout_mask(seed_tensor(seed, dropout_p), x.shape, dropout_p, x.device)
        xa = torch.where(keep, xa, 0)
        scaling = scaling / (1.0 - dropout_p)
    return F.linear(xa, lora_A) * scaling


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, seed=None):
    """fusedlora.lora_linear for validated inputs: x·Wᵀ + b + S·Bᵀ, shapes and dtypes as there."""
    y = F.linear(x, weight, bias)
    update = F.linear(_shrink(x, lora_A, scaling, dropout_p, seed), lora_B)
    return (y.to(update.dtype) + update).to(x.dtype)


def lora_add(base, x, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, seed=None):
    """fusedlora.lora_add for validated inputs: base + S·Bᵀ in base's dtype (a new tensor)."""
    update = F.linear(_shrink(x, lora_A, scaling, dropout_p, seed), lora_B)
    return (base.to(update.dtype) + update).to(base.dtype)


def multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, adapter_ids: torch.Tensor,
                      ranks: Optional[torch.Tensor], col_scale: Optional[torch.Tensor] = None):
    """fusedlora.multi_lora_linear for validated inputs and bare ids (x.shape[:-1]); col_scale: (L, N)
    float32 (DoRA) or None: each row's sum x·Wᵀ + update is scaled by its adapter's row of it, before the
    bias, in fp32; rows without an adapter keep a scale of one.

    Its shapes never depend on the ids, so it compiles without graph breaks and captures in CUDA
    graphs: each adapter's update is computed for every token and kept where the token chose it, L
    times the low-rank work of the kernels. Selecting after each adapter's expand, rather than one
    dense matmul over all adapters, keeps a row from ever touching another adapter's weights, so a NaN
    in an unused slot cannot leak (0 * NaN is NaN); entries past each rank are zeroed before use for
    the same reason. Ids outside [-1, L) give NaN rows, as in the kernels."""
    L, R, K = lora_A.shape
    M, N, dtype = adapter_ids.numel(), weight.shape[0], lora_A.dtype
    ids = adapter_ids.reshape(M)
    x2 = x.reshape(M, K)
    y = F.linear(x2, weight, bias if col_scale is None else None).to(dtype)
    xa = x2.to(dtype)
    if ranks is None:
        ranks = torch.full((L,), R, device=x.device)
    in_rank = torch.arange(R, device=x.device) < ranks[:, None]  # (L, R)
    for i in range(L):
        A = torch.where(in_rank[i, :, None], lora_A[i], 0)
        B = torch.where(in_rank[i, None, :], lora_B[i], 0)
        update = F.linear(F.linear(xa, A) * scalings[i].to(dtype), B)
        y = torch.where((ids == i)[:, None], y + update, y)
    if col_scale is not None:
        valid = (ids >= 0) & (ids < L)
        if L:  # an (M, N) gather of the scales: output-sized, never N×K
            y = y * torch.where(valid[:, None], col_scale[torch.where(valid, ids, 0)], 1.0)
        if bias is not None:
            y = y + bias
    y = torch.where(((ids < -1) | (ids >= L))[:, None], float("nan"), y)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def dora_weight_norm(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """‖W_n + s·B_n·A‖ for every row n, (N,) fp32 and detached, from ‖W_n‖², W·Aᵀ (N, r) and A·Aᵀ (r, r):
    ‖W_n + s·B_n·A‖² = ‖W_n‖² + 2s·B_n·(A·W_nᵀ) + s²·B_n·(A·Aᵀ)·B_nᵀ, so no N×K matrix is formed."""
    weight, A, B = weight.detach(), lora_A.detach(), lora_B.detach()
    w2 = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
    WA = F.linear(weight, A.to(weight.dtype)).to(torch.float32)
    A32, B32 = A.to(torch.float32), B.to(torch.float32)
    n2 = w2 + (2.0 * scaling) * (B32 * WA).sum(1) + (scaling * scaling) * ((B32 @ (A32 @ A32.t())) * B32).sum(1)
    return n2.clamp_min(0.0).sqrt()


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float = 0.0, seed=None):
    """fusedlora.dora_linear for validated inputs. With g = m / ‖W + s·B·A‖_row (detached):
    out = g ⊙ (x·Wᵀ + S·Bᵀ) + b without dropout; with it, PEFT's form
    out = x·Wᵀ + b + (g - 1) ⊙ (D(x)·Wᵀ) + g ⊙ S·Bᵀ, S = s·D(x)·Aᵀ. The DoRA terms in the adapters' dtype."""
    dtype = lora_A.dtype
    if dropout_p > 0:
        seed = seed_tensor(seed, dropout_p)  # drawn once: the shrink and the base correction share the mask
    g = magnitude / dora_weight_norm(weight, lora_A, lora_B, scaling).to(magnitude.dtype)
    y = F.linear(x, weight)
    update = F.linear(_shrink(x, lora_A, scaling, dropout_p, seed), lora_B)
    if dropout_p > 0:
        keep = dropout_mask(seed_tensor(seed, dropout_p), x.shape, dropout_p, x.device)
        xd = torch.where(keep, x.to(dtype) / (1.0 - dropout_p), 0)
        out = y.to(dtype) + (g - 1) * F.linear(xd, weight.to(dtype)) + g * update
    else:
        out = g * (y.to(dtype) + update)
    if bias is not None:
        out = out + bias.to(dtype)
    return out.to(x.dtype)
