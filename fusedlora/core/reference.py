"""LoRA linear in plain PyTorch, written from the math. The oracle for every kernel test.

    y = x·Wᵀ + b + scaling · (D(x)·Aᵀ)·Bᵀ,   D(x) = where(keep, x / (1 - p), 0)

Dropped elements contribute exactly zero (an Inf or NaN that is dropped does not leak into the
low-rank path). This module imports nothing from fusedlora.
"""
from typing import Optional

import torch


def dropout(x: torch.Tensor, keep_mask: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """D(x): keep_mask is a bool tensor of x's shape (True = kept); None means no dropout."""
    if keep_mask is None:
        return x
    return torch.where(keep_mask, x / (1.0 - p), torch.zeros((), dtype=x.dtype, device=x.device))


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    keep_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """x: (*, K), weight: (N, K), bias: (N,) or None, lora_A: (r, K), lora_B: (N, r) -> (*, N).

    Computed in the dtype of the inputs as given; pass float64 tensors for the oracle. When the
    adapter weights are wider than x (fp32 adapters under a bf16 base, PEFT's default), the low-rank
    path runs in the adapters' dtype and the sum is rounded back to x's dtype, as PEFT does.
    """
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    return lora_add(y, x, lora_A, lora_B, scaling, keep_mask, dropout_p)


def lora_add(
    base: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    keep_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """base + scaling·(D(x)·Aᵀ)·Bᵀ: the low-rank update added to the output of any base layer.

    base: (*, N), x: (*, K), lora_A: (r, K), lora_B: (N, r) -> (*, N) in base's dtype; the low-rank
    path runs in the adapters' dtype, as in lora_linear."""
    xd = dropout(x, keep_mask, dropout_p).to(lora_A.dtype)
    low_rank = ((xd @ lora_A.t()) @ lora_B.t()) * scaling
    return (base.to(low_rank.dtype) + low_rank).to(base.dtype)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: Optional[torch.Tensor] = None,
    col_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y[t] = x[t]·Wᵀ + b + scalings[i]·(x[t]·A[i, :r_i]ᵀ)·B[i, :, :r_i]ᵀ with i = adapter_ids[t]; i = -1
    adds nothing. x: (*, K), lora_A: (L, R, K), lora_B: (L, N, R), scalings: (L,), adapter_ids: x.shape[:-1],
    ranks: (L,) or None (= R for all). Same dtype rules as lora_linear; one adapter at a time.
    col_scale: (L, N) or None, DoRA's g_i = m_i / ‖W + s_i·B_i·A_i‖_row per adapter (ones for a plain
    one): the rows of adapter i are then y[t] = g_i ⊙ (x[t]·Wᵀ + s_i·(x[t]·A_iᵀ)·B_iᵀ) + b."""
    if col_scale is not None:
        return _multi_dora(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, col_scale)
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    y = y.to(lora_A.dtype)
    low_rank = torch.zeros_like(y)
    xa = x.to(lora_A.dtype)
    for i in range(lora_A.shape[0]):
        r = lora_A.shape[1] if ranks is None else int(ranks[i])
        rows = adapter_ids == i
        update = ((xa[rows] @ lora_A[i, :r].t()) @ lora_B[i, :, :r].t()) * scalings[i].to(lora_A.dtype)
        low_rank = low_rank.index_put((rows,), update)
    return (y + low_rank).to(x.dtype)


def _multi_dora(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, col_scale):
    """multi_lora_linear with a DoRA scale per adapter: each adapter's rows as its own DoRA layer without
    dropout, g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b, in the adapters' dtype; rows with id -1 get x·Wᵀ + b."""
    dtype = lora_A.dtype
    y = (x @ weight.t()).to(dtype)
    out = y.clone()
    xa = x.to(dtype)
    for i in range(lora_A.shape[0]):
        r = lora_A.shape[1] if ranks is None else int(ranks[i])
        rows = adapter_ids == i
        update = ((xa[rows] @ lora_A[i, :r].t()) @ lora_B[i, :, :r].t()) * scalings[i].to(dtype)
        out = out.index_put((rows,), col_scale[i].to(dtype) * (y[rows] + update))
    if bias is not None:
        out = out + bias.to(dtype)
    return out.to(x.dtype)


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W_n + s·B_n·A‖ for every row n: (N,) in the adapters' dtype, detached (DoRA treats it as a
    constant). weight: (N, K), lora_A: (r, K), lora_B: (N, r). Builds the N×K matrix: a reference."""
    full = weight.detach().to(lora_A.dtype) + scaling * (lora_B.detach() @ lora_A.detach())
    return torch.linalg.vector_norm(full, dim=1)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    keep_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    weight_norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DoRA (weight-decomposed low-rank adaptation): the layer W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row.

    With g = m / ‖W + s·B·A‖_row (the norm detached: no gradient flows through it), y = x·Wᵀ:
        no dropout:  out = g ⊙ (y + s·(x·Aᵀ)·Bᵀ) + b
        dropout:     out = y + b + (g - 1) ⊙ (D(x)·Wᵀ) + g ⊙ s·(D(x)·Aᵀ)·Bᵀ
    The dropout form is PEFT's: the correction term sees the dropped input, so the base product runs
    a second time on D(x); without dropout both forms agree.
    x: (*, K), weight: (N, K), bias: (N,) or None, lora_A: (r, K), lora_B: (N, r), magnitude: (N,)
    -> (*, N) in x's dtype. The DoRA terms run in the adapters' dtype, as PEFT runs them.
    weight_norm: the row norms to use instead of computing them (tests pass the float64 ones).
    """
    if weight_norm is None:
        weight_norm = dora_weight_norm(weight, lora_A, lora_B, scaling)
    g = magnitude / weight_norm.detach()
    y = x @ weight.t()
    out = y if bias is None else y + bias
    if keep_mask is None:
        base = y.to(lora_A.dtype)
        xd = x.to(lora_A.dtype)
    else:
        xd = dropout(x, keep_mask, dropout_p).to(lora_A.dtype)
        base = xd @ weight.to(lora_A.dtype).t()
    low_rank = ((xd @ lora_A.t()) @ lora_B.t()) * scaling
    return (out.to(low_rank.dtype) + (g - 1) * base + g * low_rank).to(x.dtype)


def moe_lora_linear(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling,
    keep_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    adapter_ids: Optional[torch.Tensor] = None,
    ranks: Optional[torch.Tensor] = None,
    gather: bool = True,
) -> torch.Tensor:
    """One projection of Mixture-of-Experts layer with LoRA on its experts, pair by pair.

    Pair p = t·k + j is token t routed to expert e = top_k_index[t, j] (routing order), with adapter
    a = adapter_ids[t] (0 when adapter_ids is None; -1: no adapter). With x_p = x[t] (gather=True, x: (T, K))
    or x_p = x[p] (gather=False, x: (P, K) in routing order, as the down projection's input):
        y[p] = x_p·W_eᵀ + b_e + s_a·(D(x_p)·A_{a,e}ᵀ)·B_{a,e}ᵀ        (no low-rank term when a = -1)
    top_k_index: (T, k); weight: (E, N, K) (any strides: a (E, K, N) parameter transposed); bias: (E, N) or
    None; lora_A: (L, E, R, K); lora_B: (L, E, N, R); scaling: a float, or (L,) per adapter; keep_mask:
    (P, K) bool in routing order or None; ranks: (L,) or None (= R), entries past a rank unused.
    -> (P, N) in routing order, in x's dtype; the low-rank path runs in the adapters' dtype, as lora_linear.
    """
    T, k = top_k_index.shape
    experts = top_k_index.reshape(-1)
    xp = x.repeat_interleave(k, dim=0) if gather else x
    adapters = (torch.zeros_like(experts) if adapter_ids is None
                else adapter_ids.reshape(-1).repeat_interleave(k))
    out = []
    for p in range(T * k):
        e, a = int(experts[p]), int(adapters[p])
        y = xp[p] @ weight[e].t()
        if bias is not None:
            y = y + bias[e]
        if a < 0:
            out.append(y.to(x.dtype))
            continue
        r = lora_A.shape[2] if ranks is None else int(ranks[a])
        s = scaling if isinstance(scaling, (int, float)) else scaling[a].to(lora_A.dtype)
        xd = dropout(xp[p], None if keep_mask is None else keep_mask[p], dropout_p).to(lora_A.dtype)
        low_rank = ((xd @ lora_A[a, e, :r].t()) @ lora_B[a, e, :, :r].t()) * s
        out.append((y.to(low_rank.dtype) + low_rank).to(x.dtype))
    return torch.stack(out) if out else x.new_empty((0, weight.shape[1]))
