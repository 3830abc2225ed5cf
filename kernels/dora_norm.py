"""DoRA's row norms and column scale in one pass over W, with no N×K temporary.

With W: (N, K), A: (r, K), B: (N, r), the scaling s and the magnitude m: (N,):
    n_n² = ‖W_n‖² + 2s·B_n·(W_n·Aᵀ) + s²·B_n·(A·Aᵀ)·B_nᵀ        (= ‖W_n + s·B_n·A‖²)
    g_n  = m_n / n_n                                              both (N,) fp32
Each program owns BLOCK_N rows of W and streams them over K once, accumulating ‖W_n‖² and W_n·Aᵀ, with
A·Aᵀ (r × r) beside them: every program reads all of A (r·K elements, what one row block of W costs at
r = BLOCK_N) rather than a second launch computing it once. The composition of the three terms and the
division by m happen in the epilogue. Ranks up to MAX_RANK (the r × r accumulator lives in registers).
The torch formulation it replaces read W twice (its row norms, then W·Aᵀ) and took about fifteen small
library ops.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .common import cdiv, check_shapes, dot_dtype, dot_precision
from .launch import launch

MAX_RANK = 64


@triton.jit
def _dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, m_ptr, n_ptr, g_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_m,
    scaling,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, AA_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K)
    n_ok, r_ok = rows < N, ranks < R
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :].to(tl.int64) * stride_wk
    a_ptrs = a_ptr + ranks[:, None].to(tl.int64) * stride_ar + cols[None, :].to(tl.int64) * stride_ak
    w2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    wa = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    aa = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = cols < K - k0
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        w32 = w.to(tl.float32)
        w2 += tl.sum(w32 * w32, axis=1)
        wa = tl.dot(w.to(DOT_DTYPE), tl.trans(a.to(DOT_DTYPE)), wa, input_precision=PRECISION)
        a32 = a.to(tl.float32)
        aa = tl.dot(a32, tl.trans(a32), aa, input_precision=AA_PRECISION)
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
    b = tl.load(b_ptr + rows[:, None].to(tl.int64) * stride_bn + ranks[None, :] * stride_br,
                mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    cross = tl.sum(b * wa, axis=1)
    quadratic = tl.sum(tl.dot(b, aa, input_precision=AA_PRECISION) * b, axis=1)
    norm = tl.sqrt(tl.maximum(w2 + (2.0 * scaling) * cross + (scaling * scaling) * quadratic, 0.0))
    m = tl.load(m_ptr + rows.to(tl.int64) * stride_m, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(n_ptr + rows, norm, mask=n_ok)
    tl.store(g_ptr + rows, m / norm, mask=n_ok)


def dora_norm(weight, lora_A, lora_B, magnitude, scaling: float):
    """(n, g): n = ‖W + s·B·A‖ per row and g = magnitude / n, both (N,) fp32, in one launch. weight: (N, K);
    lora_A: (r, K) with r <= MAX_RANK; lora_B: (N, r); magnitude: (N,); any strides. Callers (fusedlora/)
    validate user input; these checks guard memory only."""
    N, K = weight.shape
    r = lora_A.shape[0]
    check_shapes(lora_A.shape == (r, K) and lora_B.shape == (N, r) and magnitude.shape == (N,) and 0 < r <= MAX_RANK,
                 "dora_norm", weight=weight, lora_A=lora_A, lora_B=lora_B, magnitude=magnitude)
    n = torch.empty(N, dtype=torch.float32, device=weight.device)
    g = torch.empty(N, dtype=torch.float32, device=weight.device)
    if N == 0:
        return n, g
    cfg = configs.dora_norm(N, K, r, weight.device)
    launch(_dora_norm_kernel, (cdiv(N, cfg["BLOCK_N"]),), weight, lora_A, lora_B, magnitude, n, g, N, K, r,
           *weight.stride(), *lora_A.stride(), *lora_B.stride(), magnitude.stride(0), float(scaling),
           DOT_DTYPE=dot_dtype(weight.dtype, lora_A.dtype),
           PRECISION=dot_precision(weight.dtype, lora_A.dtype, low_rank=True),
           AA_PRECISION=dot_precision(torch.float32, low_rank=True), **cfg)
    return n, g
