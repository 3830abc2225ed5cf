"""The launch sequences of the single-adapter LoRA layer, one pair (forward, backward) for both plans.

With x: (M, K), W: (N, K), A: (r, K), B: (N, r), s the scaling, keep the dropout mask, c = s/(1-p):
    forward    S = c·(keep ⊙ x)·Aᵀ              shrink, mask drawn in-kernel; (M, r) fp32, saved
               y = x·Wᵀ + b + S·Bᵀ
    backward   dU = c·dY·B,  dB = dYᵀ·S         one pass over dY
               dX = dY·W + keep ⊙ (dU·A)
               dA = dUᵀ·(keep ⊙ x)               mask regenerated from the seed
               dW = dYᵀ·x,  db = Σ_rows dY
The plans (fusedlora/plans/planner.py) differ only in how y and dX are formed: "fused" adds the low-rank
term inside one Triton GEMM; "split" writes it first (lora_expand) and lets the library GEMM
accumulate x·Wᵀ or dY·W onto it (addmm_ with beta = 1). Everything else is shared, so forward and
backward may choose differently. Saved for backward: x, S and the seed, never a mask or a dropped x.

lora_add (any base layer) is the split plan with the base product computed by someone else:
    y = base + S·Bᵀ;  d(base) = dY;  dX = keep ⊙ (dU·A)  (the base layer's own autograd adds its dX).
Where the single-adapter plan would run a direction as one launch, lora_add's does too.
"""
import torch

from fusedlora.core.dropout import keep_threshold
from fusedlora.kernels import configs
from fusedlora.kernels.lora_gemm import SHRINK_MAX_R, gemm_shrink_launcher, lora_expand, lora_gemm, lora_gemm_shrink
from fusedlora.kernels.lora_backward import backward_launcher, fits, lora_backward
from fusedlora.kernels.lora_shrink import lora_dy, lora_shrink


def shrink(x2, lora_A, scaling: float, dropout_p: float, seed: int) -> torch.Tensor:
    """S = s/(1-p)·(keep ⊙ x)·Aᵀ: (M, r) fp32."""
    return lora_shrink(x2, lora_A, scaling / (1.0 - dropout_p), seed, keep_threshold(dropout_p),
                       dropout=dropout_p > 0)


# Rows up to which the fused plan's forward is one launch, the shrink inside the GEMM's K loop
# (fusedlora/kernels/configs.py says why; untimed on a GPU).
ONE_LAUNCH_MAX_M = configs.planner_value("one_launch_max_m")


def forward(plan: str, x2, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: int, out):
    """y into out: (M, N) in x's dtype, and S: (M, r) fp32, for x2: (M, K); inputs already validated."""
    if one_launch(plan, x2, lora_A):
        return lora_gemm_shrink(x2, weight, bias, lora_A, lora_B, scaling / (1.0 - dropout_p), seed,
                                keep_threshold(dropout_p), dropout=dropout_p > 0, out=out)[1]
    S = shrink(x2, lora_A, scaling, dropout_p, seed)
    if plan == "fused":
        lora_gemm(x2, weight, bias, p=S, q=lora_B, out=out)
    else:
        lora_expand(S, lora_B, bias, out=out).addmm_(x2, weight.t())
    return S


def one_launch(plan: str, x2, lora_A) -> bool:
    """Whether forward runs as one launch (lora_gemm_shrink) for x2: (M, K) and lora_A: (r, K)."""
    return plan == "fused" and x2.shape[0] <= ONE_LAUNCH_MAX_M and lora_A.shape[0] <= SHRINK_MAX_R


def add_forward(plan: str, base2, x2, lora_A, lora_B, scaling: float, dropout_p: float, seed: int, out):
    """base + S·Bᵀ into out: (M, N), and S, for base2: (M, N), x2: (M, K). plan: the single-adapter
    forward's choice for these rows; where it would run as one launch, so does this (the shrink inside
    the expand's loop over K), else the shrink and the expand are a launch each."""
    if one_launch(plan, x2, lora_A):
        return lora_gemm_shrink(x2, None, None, lora_A, lora_B, scaling / (1.0 - dropout_p), seed,
                                keep_threshold(dropout_p), dropout=dropout_p > 0, out=out, addend=base2)[1]
    S = shrink(x2, lora_A, scaling, dropout_p, seed)
    lora_expand(S, lora_B, addend=base2, out=out)
    return S


def _low_rank_grads(g, x2, lora_A, lora_B, S, scaling, dropout_p, seed, need_dU, need_A, need_B):
    """(dU, dA, dB): the steps both plans share. dU is returned for dX (None unless need_dU)."""
    c = scaling / (1.0 - dropout_p)
    dU, dB = lora_dy(g, lora_B, S, c, compute_du=need_dU or need_A, compute_db=need_B)
    dA = None
    if need_A:
        dA = torch.empty_like(lora_A, memory_format=torch.contiguous_format)
        lora_shrink(x2.t(), dU.t(), 1.0, seed, keep_threshold(dropout_p), dropout=dropout_p > 0,
                    mask_transposed=True, out=dA.t())
    return dU, dA, (dB.to(lora_B.dtype) if need_B else None)


def masked_dx(g, weight, dU, lora_A, dropout_p, seed, plan, out_dtype):
    """dX = dY·W + keep ⊙ (dU·A), or keep ⊙ (dU·A) alone when weight is None (lora_add)."""
    mask = dict(seed=seed, threshold=keep_threshold(dropout_p), dropout=dropout_p > 0)
    if weight is not None and plan == "fused":
        return lora_gemm(g, weight.t(), None, p=dU, q=lora_A.t(), **mask)
    dx = lora_expand(dU, lora_A.t(), out_dtype=out_dtype, **mask)
    return dx if weight is None else dx.addmm_(g, weight)


def _input_and_adapter_grads(plan, g, x, x2, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_x,
                             need_A, need_B):
    """(dX, dA, dB), each None unless needed, of either op (weight None: lora_add's, whose base layer adds
    its own dX). The fused plan at up to 64 rows (one row block) is one launch (kernels/lora_backward.py);
    otherwise dU and dB, dA and dX take a launch each."""
    if plan == "fused" and fits(g.shape[0], lora_A.shape[0]) and (need_x or need_A or need_B):
        dx, dA, dB = lora_backward(g, weight, lora_A, lora_B, x2, S, scaling / (1.0 - dropout_p), seed,
                                   keep_threshold(dropout_p), dropout=dropout_p > 0, compute_dx=need_x,
                                   compute_da=need_A, compute_db=need_B, dx_dtype=x.dtype)
        return (dx.view(x.shape) if need_x else None), dA, dB
    dU, dA, dB = _low_rank_grads(g, x2, lora_A, lora_B, S, scaling, dropout_p, seed, need_x, need_A, need_B)
    dx = masked_dx(g, weight, dU, lora_A, dropout_p, seed, plan, x.dtype).reshape(x.shape) if need_x else None
    return dx, dA, dB


def backward(plan: str, dy, x, weight, lora_A, lora_B, S, scaling: float, dropout_p: float, seed: int, needs):
    """Gradients (dx, dweight, dbias, dlora_A, dlora_B) for the flags in `needs`, None elsewhere.
    x: (*, K), dy: (*, N)."""
    need_x, need_w, need_b, need_A, need_B = needs
    K, N = x.shape[-1], weight.shape[0]
    g, x2 = dy.reshape(-1, N), x.reshape(-1, K)
    dx, dA, dB = _input_and_adapter_grads(plan, g, x, x2, weight, lora_A, lora_B, S, scaling, dropout_p, seed,
                                          need_x, need_A, need_B)
    # dW through the library GEMM in both plans: it is a plain (N, M)·(M, K) product.
    dw = torch.mm(g.t(), x2).to(weight.dtype) if need_w else None
    db = g.sum(0, dtype=torch.float32).to(weight.dtype) if need_b else None
    return dx, dw, db, dA, dB


def add_backward(dy, x, lora_A, lora_B, S, scaling: float, dropout_p: float, seed: int, needs, plan: str = "split"):
    """Gradients (dbase, dx, dlora_A, dlora_B) of lora_add for the flags in `needs`, None elsewhere. plan:
    the single-adapter backward's choice for these rows; "fused" at up to 64 rows is one launch, as
    backward's."""
    need_base, need_x, need_A, need_B = needs
    K, N = x.shape[-1], lora_B.shape[0]
    g, x2 = dy.reshape(-1, N), x.reshape(-1, K)
    dx, dA, dB = _input_and_adapter_grads(plan, g, x, x2, None, lora_A, lora_B, S, scaling, dropout_p, seed,
                                          need_x, need_A, need_B)
    return (dy if need_base else None), dx, dA, dB
