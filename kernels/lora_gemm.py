"""The fused GEMM: a dense matmul with the low-rank term as extra K-steps, dropout, scale and bias.

    out[m, n] = Σ_k X[m, k]·W[n, k] + bias[n] + keep(m, n) · lora_scale · Σ_j P[m, j]·Q[n, j]

One kernel body serves three products of the LoRA layer (x: (M, K), W: (N, K), A: (r, K), B: (N, r)):
- forward   y  = x·Wᵀ + b + S·Bᵀ                     X=x, W=W, P=S (M, r), Q=B, no mask
- backward  dX = dY·W + s/(1-p) · keep ⊙ (dS·A)      X=dY, W=Wᵀ, P=dS (M, r), Q=Aᵀ, mask on (m, k)
- backward  dW = dYᵀ·x                               X=dYᵀ, W=xᵀ, no low-rank term
Transposes are strides, never copies. S and dS come from kernels/lora_shrink.py in fp32.

Without a mask the low-rank steps accumulate into the base accumulator (no second BLOCK_M x BLOCK_N
accumulator held in registers); with one they need their own, masked in the epilogue.
"""
import torch
import triton
import triton.language as tl

from .common import dot_dtype, dot_precision, gemm_blocks, rank_block
from .dropout import keep_mask_tile


@triton.jit
def _lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, p_ptr, q_ptr, out_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_pm, stride_pr, stride_qn, stride_qr,
    stride_om, stride_on,
    lora_scale, seed, threshold,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M row blocks sweep the column blocks together, so the W tiles
    # they share are still in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_in_group) * GROUP_M
    group_size = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_in_group) % group_size
    pid_n = (pid % pids_in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge read row 0 / column 0 instead of masking every load; the
    # store drops them.
    rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    cols = tl.where(offs_n < N, offs_n, 0).to(tl.int64)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    w_ptrs = w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wt = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - k0
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(xt.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        p_ptrs = p_ptr + rows[:, None] * stride_pm + offs_r[None, :] * stride_pr
        q_ptrs = q_ptr + offs_r[:, None] * stride_qr + cols[None, :] * stride_qn
        if HAS_DROPOUT:
            low_rank = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            low_rank = acc
        for r0 in range(0, R, BLOCK_R):
            r_ok = offs_r < R - r0
            pt = tl.load(p_ptrs, mask=r_ok[None, :], other=0.0).to(tl.float32) * lora_scale
            qt = tl.load(q_ptrs, mask=r_ok[:, None], other=0.0).to(tl.float32)
            low_rank = tl.dot(pt, qt, low_rank, input_precision=LORA_PRECISION)
            p_ptrs += BLOCK_R * stride_pr
            q_ptrs += BLOCK_R * stride_qr
        if HAS_DROPOUT:
            keep = keep_mask_tile(seed, offs_m, offs_n, threshold)
            acc += tl.where(keep, low_rank, 0.0)
        else:
            acc = low_rank

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :].to(tl.int64) * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def lora_gemm(x, weight, bias=None, p=None, q=None, lora_scale=1.0, seed=0, threshold=0,
              dropout=False, out_dtype=None):
    """out = x·weightᵀ + bias + keep ⊙ lora_scale·(p·qᵀ) -> (M, N) in out_dtype (default x's).

    x: (M, K), weight: (N, K), bias: (N,) or None, p: (M, R) fp32 or None, q: (N, R), any strides.
    dropout=True masks the low-rank term with the keep-mask of (seed, threshold) at (m, n).
    Callers (fusedlora/) validate user input; this checks only what would corrupt memory.
    """
    M, K = x.shape
    N, K_w = weight.shape
    assert K == K_w and (bias is None or bias.shape == (N,)), "lora_gemm: shapes do not chain"
    has_lora = p is not None
    if has_lora:
        R = p.shape[1]
        assert p.shape == (M, R) and q.shape == (N, R), "lora_gemm: low-rank operands do not chain"
    else:
        R, p, q = 0, x, weight  # unused pointers; HAS_LORA=False compiles them away
    out = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    cfg = gemm_blocks(M, N)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _lora_gemm_kernel[grid](
        x, weight, bias if bias is not None else x, p, q, out,
        M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        out.stride(0), out.stride(1),
        float(lora_scale), seed, threshold,
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_DROPOUT=has_lora and dropout,
        EVEN_K=K % cfg["BLOCK_K"] == 0,
        DOT_DTYPE=dot_dtype(x.dtype, weight.dtype), PRECISION=dot_precision(x.dtype, weight.dtype),
        LORA_PRECISION=dot_precision(x.dtype, torch.float32),
        BLOCK_R=rank_block(R), **cfg,
    )
    return out
