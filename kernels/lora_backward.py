"""The LoRA layer's backward in one launch, for row counts that fit one row block (training and
fine-tuning steps at small batch, where launches and host work cost more than the GPU work).

With x: (M, K), W: (N, K), A: (r, K), B: (N, r), dY: (M, N), S = c·(keep ⊙ x)·Aᵀ saved by the forward,
c = s/(1-p) and keep the dropout mask on (m, k):

    dU = c·dY·B                                    (M, r), never written out
    dX = [dY·W] + keep ⊙ (dU·A)                     the base product only with HAS_BASE (lora_add has none)
    dA = dUᵀ·(keep ⊙ x)                             (r, K)
    dB = dYᵀ·S                                      (N, r)

Program j owns columns [j·BLOCK_N, (j+1)·BLOCK_N) of K and every row (M <= BLOCK_M). It sweeps N once,
loading each dY tile for the base product and for dU (every program recomputes dU, as the one-launch
forward recomputes S: B is r×N, small next to W). Since one program holds every row, dX and dA for its
columns are complete at the end, and dB's row block i (of N) is written whole by program i mod
(number of programs) when its sweep passes that block: no atomics, no zero-filled buffer, every
output written once. The general path (kernels/lora_shrink.py, kernels/lora_gemm.py) takes three
launches and an fp32 dB buffer.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .common import cdiv, check_shapes, dot_dtype, dot_precision
from .dropout import SEED_ARGS, keep_mask_tile, seed_words
from .launch import Bound, launch

# One row block holds every row, and one rank block every rank.
MAX_ROWS = configs.DECODE_MAX_ROWS
MAX_RANK = configs.SHRINK_MAX_R


@triton.jit(do_not_specialize=SEED_ARGS)
def _lora_backward_kernel(
    dy_ptr, w_ptr, a_ptr, b_ptr, x_ptr, s_ptr, dx_ptr, da_ptr, db_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_xm, stride_xk, stride_sm, stride_sr, stride_dxm, stride_dxk, stride_dar, stride_dak,
    stride_dbn, stride_dbr,
    du_scale, seed_lo, seed_hi, threshold,
    HAS_BASE: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr, COMPUTE_DB: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, DU_DTYPE: tl.constexpr,
    DU_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_k = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    cols = offs_k.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    ranks = offs_r.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_K)
    NEED_DU: tl.constexpr = COMPUTE_DX or COMPUTE_DA
    dy_ptrs = dy_ptr + rows[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + cols[None, :] * stride_wk
    b_ptrs = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + ranks[None, :] * stride_br
    db_ptrs = db_ptr + offs_n[:, None].to(tl.int64) * stride_dbn + ranks[None, :] * stride_dbr
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    du = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if COMPUTE_DB:
        st = tl.load(s_ptr + rows[:, None] * stride_sm + ranks[None, :] * stride_sr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    for n0 in range(0, N, BLOCK_K):
        n_ok = offs_n < N - n0
        # Rows past M load as zeros: they would otherwise add into dB.
        g = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if COMPUTE_DX and HAS_BASE:
            wt = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(g.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if NEED_DU:
            bt = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            du = tl.dot(g.to(DU_DTYPE), bt.to(DU_DTYPE), du, input_precision=DU_PRECISION)
        if COMPUTE_DB:
            if (n0 // BLOCK_K) % programs == pid:
                part = tl.dot(tl.trans(g.to(tl.float32)), st, input_precision=LORA_PRECISION)
                tl.store(db_ptrs, part.to(db_ptr.dtype.element_ty), mask=n_ok[:, None] & r_ok[None, :])
        dy_ptrs += BLOCK_K * stride_dyn
        w_ptrs += BLOCK_K * stride_wn
        b_ptrs += BLOCK_K * stride_bn
        db_ptrs += BLOCK_K * stride_dbn
    du = du * du_scale
    if HAS_DROPOUT:
        keep = keep_mask_tile(seed_lo, seed_hi, offs_m, pid * BLOCK_N, threshold, BLOCK_N)
    if COMPUTE_DX:
        at = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                     mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        low_rank = tl.dot(du, at.to(tl.float32), input_precision=LORA_PRECISION)
        if HAS_DROPOUT:
            low_rank = tl.where(keep, low_rank, 0.0)
        acc += low_rank
        tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & k_ok[None, :])
    if COMPUTE_DA:
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            xt = tl.where(keep, xt, 0.0)
        da = tl.dot(tl.trans(du), xt, input_precision=LORA_PRECISION)
        tl.store(da_ptr + ranks[:, None] * stride_dar + cols[None, :] * stride_dak, da.to(da_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & k_ok[None, :])


def fits(M: int, r: int) -> bool:
    """Whether lora_backward serves M rows at rank r."""
    return 0 < M <= MAX_ROWS and r <= MAX_RANK


def _arguments(dy, weight, lora_A, lora_B, x, S, dx, da, db, dropout):
    """(grid, pointers, frozen, kwargs) of one launch: its tensors, then its shapes and strides, then its
    constexprs and options. The per-call scalars (dU's scale, the seed words, the threshold) follow
    the frozen arguments and are not included."""
    M, N = dy.shape
    r, K = lora_A.shape
    cfg = configs.lora_backward(M, K, r, dy.device)
    grid = (max(1, cdiv(K, cfg["BLOCK_N"])),)  # at least one program: dB's row blocks need an owner
    w = weight if weight is not None else dy
    pointers = (dy, w, lora_A, lora_B, x, S, dx if dx is not None else dy, da if da is not None else S,
                db if db is not None else S)
    frozen = (M, N, K, r, *dy.stride(), *(weight.stride() if weight is not None else (0, 0)), *lora_A.stride(),
              *lora_B.stride(), *x.stride(), *S.stride(), *(dx.stride() if dx is not None else (0, 0)),
              *(da.stride() if da is not None else (0, 0)), *(db.stride() if db is not None else (0, 0)))
    kwargs = dict(
        HAS_BASE=weight is not None, COMPUTE_DX=dx is not None, COMPUTE_DA=da is not None,
        COMPUTE_DB=db is not None, HAS_DROPOUT=dropout, DOT_DTYPE=dot_dtype(dy.dtype, w.dtype),
        PRECISION=dot_precision(dy.dtype, w.dtype), DU_DTYPE=dot_dtype(dy.dtype, lora_B.dtype),
        DU_PRECISION=dot_precision(dy.dtype, lora_B.dtype, low_rank=True),
        LORA_PRECISION=dot_precision(dy.dtype, lora_A.dtype, torch.float32, low_rank=True),
        BLOCK_M=max(16, 1 << (M - 1).bit_length()), **cfg)
    return grid, pointers, frozen, kwargs


def _check(dy, weight, lora_A, lora_B, x, S, launcher):
    M, N = dy.shape
    r, K = lora_A.shape
    check_shapes(fits(M, r) and lora_B.shape == (N, r) and x.shape == (M, K) and S.shape == (M, r)
                 and (weight is None or weight.shape == (N, K)), launcher,
                 dy=dy, weight=weight, lora_A=lora_A, lora_B=lora_B, x=x, S=S)


def _outputs(dy, lora_A, lora_B, compute_dx, compute_da, compute_db, dx_shape, dx_dtype):
    M, N = dy.shape
    r, K = lora_A.shape
    return (torch.empty(dx_shape or (M, K), dtype=dx_dtype or dy.dtype, device=dy.device) if compute_dx else None,
            torch.empty((r, K), dtype=lora_A.dtype, device=dy.device) if compute_da else None,
            torch.empty((N, r), dtype=lora_B.dtype, device=dy.device) if compute_db else None)


def lora_backward(dy, weight, lora_A, lora_B, x, S, du_scale, seed=0, threshold=0, dropout=False,
                  compute_dx=True, compute_da=True, compute_db=True, dx_dtype=None):
    """(dX, dA, dB) in one launch, each None unless asked for. dy: (M, N); weight: (N, K) or None (no
    base product: lora_add's dX); lora_A: (r, K); lora_B: (N, r); x: (M, K); S: (M, r) fp32; any strides.
    dX is in dx_dtype (default dy's), dA in lora_A's dtype, dB in lora_B's. Needs fits(M, r)."""
    _check(dy, weight, lora_A, lora_B, x, S, "lora_backward")
    dx, da, db = _outputs(dy, lora_A, lora_B, compute_dx, compute_da, compute_db, None, dx_dtype)
    grid, pointers, frozen, kwargs = _arguments(dy, weight, lora_A, lora_B, x, S, dx, da, db, dropout)
    launch(_lora_backward_kernel, grid, *pointers, *frozen, float(du_scale), *seed_words(seed), threshold, **kwargs)
    return dx, da, db


def backward_launcher(dy, weight, lora_A, lora_B, x, S, dropout: bool, compute_dx: bool, compute_da: bool,
                      compute_db: bool, dx_shape, dx_dtype):
    """lora_backward's launch fixed for every call whose tensors have these ones' shapes, strides, dtypes,
    devices and 16-byte alignment (the caller's cache keys guarantee it), with dX allocated in dx_shape
    (contiguous; its rows are dX's (M, K)): returns run(dy, weight, lora_A, lora_B, x, S, du_scale, seed,
    threshold) -> (dX, dA, dB), which allocates the outputs and launches with the grid, strides and
    constexprs computed here. Each call may pass, as dy or x, any tensor whose data starts where the
    2-D view given here does."""
    _check(dy, weight, lora_A, lora_B, x, S, "backward_launcher")
    outputs = _outputs(dy, lora_A, lora_B, compute_dx, compute_da, compute_db, dx_shape, dx_dtype)
    dx2 = outputs[0].view(dy.shape[0], lora_A.shape[1]) if compute_dx else None
    grid, _, frozen, kwargs = _arguments(dy, weight, lora_A, lora_B, x, S, dx2, *outputs[1:], dropout)
    bound = Bound(_lora_backward_kernel, grid, frozen, kwargs)
    (dx_shape, dx_dtype), (da_shape, da_dtype), (db_shape, db_dtype) = (
        (t.shape, t.dtype) if t is not None else (None, None) for t in outputs)
    device = dy.device

    def run(dy, weight, lora_A, lora_B, x, S, du_scale, seed, threshold):
        dx = torch.empty(dx_shape, dtype=dx_dtype, device=device) if compute_dx else None
        da = torch.empty(da_shape, dtype=da_dtype, device=device) if compute_da else None
        db = torch.empty(db_shape, dtype=db_dtype, device=device) if compute_db else None
        bound((dy, weight if weight is not None else dy, lora_A, lora_B, x, S, dx if dx is not None else dy,
               da if da is not None else S, db if db is not None else S),
              (du_scale, 0, 0, threshold) if seed == 0 else (du_scale, *seed_words(seed), threshold))
        return dx, da, db

    return run
