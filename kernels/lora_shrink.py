"""The rank-r side of the LoRA layer: products whose output has the rank as a dimension.

With x: (M, K), A: (r, K), B: (N, r), dY: (M, N), s = scaling, keep the dropout mask on (m, k) and
D(x) = keep ⊙ x / (1 - p):
- forward    S  = s · D(x)·Aᵀ                        (M, r), fp32, saved for backward
- backward   dU = s/(1-p) · dY·B  and  dB = dYᵀ·S  one pass over dY (_lora_dy_kernel)
             dA = dUᵀ·(keep ⊙ x)                    (r, K)
The dX GEMM (kernels/lora_gemm.py) takes dU as its extra K-steps.

_lora_shrink_kernel computes out[a, j] = scale · Σ_c keep ⊙ X[a, c] · Q[j, c] for S (X=x, Q=A) and for
dAᵀ (X=xᵀ, Q=dUᵀ, mask transposed, reducing over M); strides do the transposes.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .common import cdiv, check_shapes, dot_dtype, dot_precision
from .dropout import SEED_ARGS, keep_mask_tile, seed_words
from .launch import launch


@triton.jit(do_not_specialize=SEED_ARGS)
def _lora_shrink_kernel(
    x_ptr, q_ptr, out_ptr,
    M, C, R,
    stride_xm, stride_xc, stride_qr, stride_qc, stride_om, stride_or,
    scale, seed_lo, seed_hi, threshold,
    HAS_DROPOUT: tl.constexpr, MASK_T: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    m_ok = offs_m < M
    r_ok = offs_r < R
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_c[None, :].to(tl.int64) * stride_xc
    q_ptrs = q_ptr + offs_c[:, None].to(tl.int64) * stride_qc + offs_r[None, :].to(tl.int64) * stride_qr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c_ok = offs_c < C - c0
        xt = tl.load(x_ptrs, mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            # The mask belongs to x's (row, column); MASK_T says this X is xᵀ.
            if MASK_T:
                keep = tl.trans(keep_mask_tile(seed_lo, seed_hi, c0 + offs_c, tl.program_id(0) * BLOCK_M, threshold, BLOCK_M))
            else:
                keep = keep_mask_tile(seed_lo, seed_hi, offs_m, c0, threshold, BLOCK_C)
            xt = tl.where(keep, xt, 0.0)
        qt = tl.load(q_ptrs, mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(xt.to(DOT_DTYPE), qt.to(DOT_DTYPE), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_C * stride_xc
        q_ptrs += BLOCK_C * stride_qc
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_r[None, :].to(tl.int64) * stride_or
    tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_dy_kernel(
    dy_ptr, b_ptr, s_ptr, du_ptr, db_ptr,
    M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dum, stride_dur, stride_dbn, stride_dbr, du_scale,
    COMPUTE_DU: tl.constexpr, COMPUTE_DB: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Each program owns BLOCK_M rows of dY and one rank block, and sweeps N once: dU for its rows is
    # complete at the end; its share of dB = dYᵀ·S is added into an fp32 buffer with atomics
    # (summation order across row blocks varies on the GPU: dB is not bitwise deterministic).
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    r_ok = offs_r < R
    dy_ptrs = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn
    b_ptrs = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :].to(tl.int64) * stride_br
    db_ptrs = db_ptr + offs_n[:, None].to(tl.int64) * stride_dbn + offs_r[None, :].to(tl.int64) * stride_dbr
    if COMPUTE_DB:
        s_ptrs = s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :].to(tl.int64) * stride_sr
        st = tl.load(s_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(DOT_DTYPE)
    du = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_ok = offs_n < N - n0
        # Rows past M must load as zeros: they would otherwise add into dB.
        dyt = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(DOT_DTYPE)
        if COMPUTE_DU:
            bt = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(DOT_DTYPE)
            du = tl.dot(dyt, bt, du, input_precision=PRECISION)
        if COMPUTE_DB:
            part = tl.dot(tl.trans(dyt), st, input_precision=PRECISION)
            tl.atomic_add(db_ptrs, part, mask=n_ok[:, None] & r_ok[None, :])
        dy_ptrs += BLOCK_N * stride_dyn
        b_ptrs += BLOCK_N * stride_bn
        db_ptrs += BLOCK_N * stride_dbn
    if COMPUTE_DU:
        du_ptrs = du_ptr + offs_m[:, None].to(tl.int64) * stride_dum + offs_r[None, :].to(tl.int64) * stride_dur
        tl.store(du_ptrs, du * du_scale, mask=m_ok[:, None] & r_ok[None, :])


def lora_shrink(x, q, scale, seed=0, threshold=0, dropout=False, mask_transposed=False, out=None):
    """out = scale · (keep ⊙ x)·qᵀ -> (M, R), fp32 unless `out` is given.

    x: (M, C) and q: (R, C), any strides; out: (M, R), any strides and float dtype (the dAᵀ view).
    dropout=True masks x with the keep-mask of (seed, threshold); mask_transposed=True when x is
    the transpose of the tensor the mask was drawn for.
    """
    M, C = x.shape
    R, C_q = q.shape
    check_shapes(C == C_q and (out is None or out.shape == (M, R)), "lora_shrink", x=x, q=q, out=out)
    if out is None:
        out = torch.empty((M, R), dtype=torch.float32, device=x.device)
    if M == 0 or R == 0:
        return out
    cfg = configs.lora_shrink(M, R, x.device, torch.float32 in (x.dtype, q.dtype))
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(R, cfg["BLOCK_R"]))
    launch(
        _lora_shrink_kernel, grid,
        x, q, out, M, C, R,
        *x.stride(), *q.stride(), *out.stride(),
        float(scale), *seed_words(seed), threshold,
        HAS_DROPOUT=dropout, MASK_T=mask_transposed,
        DOT_DTYPE=dot_dtype(x.dtype, q.dtype), PRECISION=dot_precision(x.dtype, q.dtype, low_rank=True), **cfg,
    )
    return out


def lora_dy(dy, lora_B, S, du_scale=1.0, compute_du=True, compute_db=True):
    """(dU, dB) = (du_scale·dY·B, dYᵀ·S) from one pass over dY; either may be skipped (returned as None).

    dy: (M, N), lora_B: (N, R), S: (M, R) fp32. dU is fp32; dB is fp32 (cast by the caller).
    """
    M, N = dy.shape
    R = lora_B.shape[1]
    check_shapes(lora_B.shape[0] == N and S.shape == (M, R), "lora_dy", dy=dy, lora_B=lora_B, S=S)
    du = torch.empty((M, R), dtype=torch.float32, device=dy.device) if compute_du else None
    db = torch.zeros((N, R), dtype=torch.float32, device=dy.device) if compute_db else None
    if M == 0 or not (compute_du or compute_db):
        return du, db
    cfg = configs.lora_dy(M, R, dy.device, True)  # S and dU are fp32
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(R, cfg["BLOCK_R"]))
    du_arg, db_arg = (du if du is not None else S), (db if db is not None else S)
    launch(
        _lora_dy_kernel, grid,
        dy, lora_B, S, du_arg, db_arg, M, N, R,
        *dy.stride(), *lora_B.stride(), *S.stride(), *du_arg.stride(), *db_arg.stride(), float(du_scale),
        COMPUTE_DU=compute_du, COMPUTE_DB=compute_db,
        DOT_DTYPE=dot_dtype(dy.dtype, torch.float32), PRECISION=dot_precision(dy.dtype, torch.float32, low_rank=True),
        **cfg,
    )
    return du, db
