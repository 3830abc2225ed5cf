"""The LoRA GEMM: a dense matmul with the low-rank term as extra K-steps, dropout, scale, bias.

    out[m, n] = C[m, n] + Σ_k X[m, k]·W[n, k] + bias[n] + keep(m, n) · Σ_j P[m, j]·Q[n, j]

One kernel body, specialised by compile-time flags (HAS_BASE, HAS_LORA, HAS_DROPOUT, HAS_BIAS,
HAS_ADDEND for C), serves the products of the LoRA layer (x: (M, K), W: (N, K), A: (r, K), B: (N, r)):
- fused plan     y  = x·Wᵀ + b + S·Bᵀ               X=x, W=W, P=S (M, r), Q=B, no mask
                 dX = dY·W + keep ⊙ (dU·A)          X=dY, W=Wᵀ, P=dU (M, r), Q=Aᵀ, mask on (m, k)
- split plan     the same without the base product (lora_expand), which the library GEMM adds:
                 y = S·Bᵀ + b, then y += x·Wᵀ;  dX = keep ⊙ (dU·A), then dX += dY·W
- any base       out = base(x) + S·Bᵀ               C = the base layer's output
- DoRA           out = g ⊙ (x·Wᵀ + S·Bᵀ) + b         HAS_COL_SCALE: the magnitude over the row norms
Transposes are strides, never copies. S and dU = s/(1-p)·dY·B come from kernels/lora_shrink.py in fp32.

At decode sizes the forward runs as one launch (HAS_SHRINK): the shrink S = c·(keep ⊙ x)·Aᵀ is computed
inside the GEMM's K loop from the x tiles the base product loads, then added as y += S·Bᵀ after the
loop. Every column block recomputes S for its rows (A is r×K, small next to W at decode), and the
programs of the first column block write it out for the backward. lora_add's forward at decode sizes
is the same launch without the base product: out = C + S·Bᵀ.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .common import cdiv, check_shapes, dot_dtype, dot_precision
from .dropout import SEED_ARGS, keep_mask_tile, seed_words
from .launch import Bound, launch

SHRINK_MAX_R = configs.SHRINK_MAX_R


@triton.jit
def matmul_tile(a_ptrs, b_ptrs, a_ok, b_ok, C, step_a, step_b, acc,
                EVEN_C: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_C: tl.constexpr):
    """acc + Σ_c A[:, c]·B[c, :] in BLOCK_C steps. a_ptrs: (BM, BLOCK_C) tile pointers advancing by
    step_a, b_ptrs: (BLOCK_C, BN) advancing by step_b; a_ok / b_ok mask A's rows and B's columns.
    Shared by every kernel that runs a reduction over a strided dimension."""
    offs_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        if EVEN_C:
            a = tl.load(a_ptrs, mask=a_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=b_ok[None, :], other=0.0)
        else:
            c_ok = offs_c < C - c0
            a = tl.load(a_ptrs, mask=a_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=c_ok[:, None] & b_ok[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
        a_ptrs += step_a
        b_ptrs += step_b
    return acc


@triton.jit
def grouped_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row blocks sweep the column blocks together, so the
    W tiles they share are still in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_in_group) * GROUP_M
    group_size = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (pid % pids_in_group) % group_size, (pid % pids_in_group) // group_size


@triton.jit(do_not_specialize=SEED_ARGS)
def _lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, p_ptr, q_ptr, c_ptr, g_ptr, out_ptr, a_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_pm, stride_pr, stride_qn, stride_qr,
    stride_cm, stride_cn, stride_om, stride_on, stride_ar, stride_ak,
    seed_lo, seed_hi, threshold, shrink_scale,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_ADDEND: tl.constexpr, HAS_SHRINK: tl.constexpr, HAS_COL_SCALE: tl.constexpr, EVEN_K: tl.constexpr,
    STORE_S: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    SHRINK_DTYPE: tl.constexpr, SHRINK_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # HAS_SHRINK (with HAS_LORA): P is S's output, written here when STORE_S (backward reads it; a call
    # without gradients does not), A (r, K) at a_ptr, R <= BLOCK_R, and HAS_DROPOUT masks x in the shrink
    # (keep on (m, k)) instead of the low-rank term. Without HAS_BASE (lora_add's one launch) the K loop
    # reads x for the shrink alone, and HAS_ADDEND brings the base output.
    pid_m, pid_n = grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_SHRINK:
        # x·Wᵀ and S = c·(keep ⊙ x)·Aᵀ from the same x tiles: one pass over x, one launch.
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
        w_ptrs = w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + cols[None, :] * stride_wn
        a_ptrs = a_ptr + offs_k[:, None].to(tl.int64) * stride_ak + offs_r[None, :].to(tl.int64) * stride_ar
        s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_BASE:
                wt = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(xt.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION)
            if HAS_DROPOUT:
                xt = tl.where(keep_mask_tile(seed_lo, seed_hi, offs_m, k0, threshold, BLOCK_K), xt, 0.0)
            at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            s = tl.dot(xt.to(SHRINK_DTYPE), at.to(SHRINK_DTYPE), s, input_precision=SHRINK_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
            a_ptrs += BLOCK_K * stride_ak
        s = s * shrink_scale
        if STORE_S and pid_n == 0:
            tl.store(p_ptr + rows[:, None] * stride_pm + offs_r[None, :].to(tl.int64) * stride_pr, s,
                     mask=m_ok[:, None] & r_ok[None, :])
        qt = tl.load(q_ptr + offs_r[:, None].to(tl.int64) * stride_qr + cols[None, :] * stride_qn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(s, qt.to(tl.float32), acc, input_precision=LORA_PRECISION)
    elif HAS_BASE:
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        acc = matmul_tile(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                          w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn,
                          m_ok, n_ok, K, BLOCK_K * stride_xk, BLOCK_K * stride_wk, acc,
                          EVEN_K, DOT_DTYPE, PRECISION, BLOCK_K)
    if HAS_LORA and not HAS_SHRINK:
        # The low-rank term as extra K-steps over r. Unmasked, it adds into the base accumulator (no
        # second BLOCK_M x BLOCK_N accumulator held in registers); masked, it needs its own.
        offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
        p_ptrs = p_ptr + rows[:, None] * stride_pm + offs_r[None, :] * stride_pr
        q_ptrs = q_ptr + offs_r[:, None] * stride_qr + cols[None, :] * stride_qn
        if HAS_DROPOUT:
            low_rank = matmul_tile(p_ptrs, q_ptrs, m_ok, n_ok, R, BLOCK_R * stride_pr, BLOCK_R * stride_qr,
                                   tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                                   False, tl.float32, LORA_PRECISION, BLOCK_R)
            keep = keep_mask_tile(seed_lo, seed_hi, offs_m, pid_n * BLOCK_N, threshold, BLOCK_N)
            acc += tl.where(keep, low_rank, 0.0)
        else:
            acc = matmul_tile(p_ptrs, q_ptrs, m_ok, n_ok, R, BLOCK_R * stride_pr, BLOCK_R * stride_qr, acc,
                              False, tl.float32, LORA_PRECISION, BLOCK_R)
    if HAS_BIAS and not HAS_COL_SCALE:
        acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_ADDEND:
        # A tensor computed elsewhere (the library GEMM's x·Wᵀ + b, any base layer's output) that the
        # low-rank term is added to; it may be `out` itself.
        acc += tl.load(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, mask=out_mask,
                       other=0.0).to(tl.float32)
    if HAS_COL_SCALE:
        # DoRA's epilogue: out = g ⊙ (everything above) + bias, g: (N,) fp32, so the magnitude costs
        # no pass over the output of its own. The bias is added after the scale.
        acc = acc * tl.load(g_ptr + cols, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _arguments(x, weight, bias, p, q, addend, out, dropout, cfg, a=None, col_scale=None, store_s=True):
    """(grid, pointers, frozen, kwargs) of one launch: the kernel's pointer arguments, the shapes and
    strides that follow them, and its constexprs and options. The per-call scalars (seed words,
    threshold, shrink scale) come last and are not included."""
    M, N = out.shape
    has_base, has_lora, has_addend, has_shrink = weight is not None, p is not None, addend is not None, a is not None
    K = x.shape[1] if has_base or has_shrink else 0
    R = (a.shape[0] if has_shrink else p.shape[1]) if has_lora else 0  # with the shrink, p may be a stand-in
    # Pointers a variant does not use still need a tensor; its flag compiles them away.
    x = x if has_base or has_shrink else out
    weight, p, q, addend, a = (t if t is not None else x for t in (weight, p, q, addend, a))
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    if col_scale is not None and (col_scale.shape != (N,) or col_scale.dtype != torch.float32
                                  or not col_scale.is_contiguous()):
        raise ValueError(f"col_scale must be a contiguous ({N},) float32 tensor, got {tuple(col_scale.shape)} "
                         f"{col_scale.dtype}")
    pointers = (x, weight, bias if bias is not None else x, p, q, addend, col_scale if col_scale is not None else x,
                out, a)
    frozen = (M, N, K, R, *x.stride(), *weight.stride(), *p.stride(), *q.stride(), *addend.stride(), *out.stride(),
              *a.stride())
    kwargs = dict(
        HAS_BASE=has_base, HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_DROPOUT=has_lora and dropout,
        HAS_ADDEND=has_addend, HAS_SHRINK=has_shrink, HAS_COL_SCALE=col_scale is not None,
        STORE_S=has_shrink and store_s,
        EVEN_K=K % cfg["BLOCK_K"] == 0,
        DOT_DTYPE=dot_dtype(x.dtype, weight.dtype), PRECISION=dot_precision(x.dtype, weight.dtype),
        LORA_PRECISION=dot_precision(x.dtype, torch.float32, low_rank=True),
        SHRINK_DTYPE=dot_dtype(x.dtype, a.dtype) if has_shrink else tl.float32,
        SHRINK_PRECISION=dot_precision(x.dtype, a.dtype, low_rank=True) if has_shrink else "ieee",
        BLOCK_R=configs.rank_block(R), **cfg,
    )
    return grid, pointers, frozen, kwargs


def _launch(x, weight, bias, p, q, addend, out, seed, threshold, dropout, cfg, a=None, shrink_scale=1.0,
            col_scale=None):
    grid, pointers, frozen, kwargs = _arguments(x, weight, bias, p, q, addend, out, dropout, cfg, a, col_scale)
    launch(_lora_gemm_kernel, grid, *pointers, *frozen, *seed_words(seed), threshold, float(shrink_scale), **kwargs)
    return out


def lora_gemm(x, weight, bias=None, p=None, q=None, seed=0, threshold=0, dropout=False, out_dtype=None, out=None,
              col_scale=None):
    """out = x·weightᵀ + bias + keep ⊙ (p·qᵀ) -> (M, N), a new tensor in out_dtype (default x's) unless
    `out` is given. col_scale: (N,) fp32 or None; given, out = col_scale ⊙ (x·weightᵀ + keep ⊙ (p·qᵀ)) + bias.

    x: (M, K), weight: (N, K), bias: (N,) or None, p: (M, R) fp32 or None, q: (N, R), out: (M, N), any strides.
    dropout=True masks the low-rank term with the keep-mask of (seed, threshold) at (m, n).
    Callers (fusedlora/) validate user input; these checks guard memory only and survive `python -O`.
    """
    M, K = x.shape
    N = weight.shape[0]
    check_shapes(weight.shape[1] == K and (bias is None or bias.shape == (N,))
                 and (p is None or (p.shape[0] == M and q.shape == (N, p.shape[1])))
                 and (out is None or out.shape == (M, N)), "lora_gemm", x=x, weight=weight, bias=bias, p=p, q=q, out=out)
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    return _launch(x, weight, bias, p, q, None, out, seed, threshold, dropout, configs.lora_gemm(M, N, x.device),
                   col_scale=col_scale)


def lora_gemm_shrink(x, weight, bias, lora_A, lora_B, scale, seed=0, threshold=0, dropout=False, out=None,
                     addend=None):
    """(out, S): S = scale · (keep ⊙ x)·lora_Aᵀ -> (M, R) fp32 and out = x·weightᵀ + bias + S·lora_Bᵀ -> (M, N),
    in one launch (the decode forward); weight=None with an addend: out = addend + S·lora_Bᵀ (lora_add's).

    x: (M, K), weight: (N, K) or None, bias: (N,) or None, lora_A: (R, K) with R <= SHRINK_MAX_R,
    lora_B: (N, R), addend: (M, N) or None, out: (M, N) or None (a new tensor in x's dtype, addend's
    without a weight); any strides. dropout=True masks x with the keep-mask of (seed, threshold) on
    (m, k), as lora_shrink does. Every column block recomputes S, so this is for small M (the plans
    choose it).
    """
    M, K = x.shape
    N, R = lora_B.shape[0], lora_A.shape[0]
    check_shapes((weight is None or weight.shape == (N, K)) and (weight is not None or addend is not None)
                 and lora_A.shape == (R, K) and lora_B.shape == (N, R) and (bias is None or bias.shape == (N,))
                 and (addend is None or addend.shape == (M, N)) and (out is None or out.shape == (M, N)),
                 "lora_gemm_shrink", x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, addend=addend,
                 out=out)
    if R > SHRINK_MAX_R:
        raise ValueError(f"lora_gemm_shrink: rank {R} over {SHRINK_MAX_R}")
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype if weight is not None else addend.dtype, device=x.device)
    S = torch.empty((M, R), dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return out, S
    _launch(x, weight, bias, S, lora_B, addend, out, seed, threshold, dropout,
            configs.lora_gemm_shrink(M, N, x.device), a=lora_A, shrink_scale=scale)
    return out, S


def lora_expand(p, q, bias=None, addend=None, seed=0, threshold=0, dropout=False, out=None, out_dtype=None,
                col_scale=None):
    """out = addend + bias + keep ⊙ (p·qᵀ) -> (M, N): the low-rank term without the base GEMM.
    col_scale: (N,) fp32 or None; given, out = col_scale ⊙ (addend + keep ⊙ (p·qᵀ)) + bias (DoRA).

    p: (M, R) fp32, q: (N, R), bias: (N,) or None, addend: (M, N) or None, any strides. `out` may be
    `addend` itself (an in-place add); otherwise a new tensor in out_dtype (default addend's dtype).
    dropout=True masks the term with the keep-mask of (seed, threshold) at (m, n).
    """
    M, R = p.shape
    N = q.shape[0]
    check_shapes(q.shape == (N, R) and (bias is None or bias.shape == (N,))
                 and (addend is None or addend.shape == (M, N)) and (out is None or out.shape == (M, N)), "lora_expand", p=p, q=q, bias=bias, addend=addend, out=out)
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype or addend.dtype, device=p.device)
    if M == 0 or N == 0:
        return out
    return _launch(None, None, bias, p, q, addend, out, seed, threshold, dropout, configs.lora_expand(M, p.device),
                   col_scale=col_scale)


def gemm_shrink_launcher(x, weight, bias, lora_A, lora_B, S, out, dropout: bool, addend=None):
    """lora_gemm_shrink's launch fixed for every call whose tensors have these ones' shapes, strides,
    dtypes, devices and 16-byte alignment (the caller's cache key guarantees it): returns
    run(x, weight, bias, lora_A, lora_B, out, seed, threshold, scale, S=None, addend=None), which launches
    with the grid, configuration, strides and constexprs computed here. x: (M, K) here; each call may
    pass, as x or out, any tensor whose data starts where such a 2-D view's does (the (*, K) tensor it
    views), and likewise the addend. S: (M, R) fp32, written by every call; or None for calls without
    gradients, which need no S: then none is written (nor allocated: x stands in for its pointer, which
    the kernel does not use). weight None with an addend: lora_add's one launch (no bias)."""
    M, K = x.shape
    N, R = lora_B.shape[0], lora_A.shape[0]
    check_shapes(M > 0 and N > 0 and R <= SHRINK_MAX_R and (weight is None or weight.shape == (N, K))
                 and (weight is not None or addend is not None) and lora_A.shape == (R, K)
                 and lora_B.shape == (N, R) and (S is None or S.shape == (M, R)) and out.shape == (M, N)
                 and (addend is None or addend.shape == (M, N)) and (bias is None or bias.shape == (N,)),
                 "gemm_shrink_launcher", x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, S=S,
                 addend=addend, out=out)
    store_s = S is not None
    grid, _, frozen, kwargs = _arguments(x, weight, bias, S if store_s else x, lora_B, addend, out, dropout,
                                         configs.lora_gemm_shrink(M, N, x.device), a=lora_A, store_s=store_s)
    bound = Bound(_lora_gemm_kernel, grid, frozen, kwargs)

    def run(x, weight, bias, lora_A, lora_B, out, seed, threshold, scale, S=None, addend=None):
        bound((x, weight if weight is not None else x, bias if bias is not None else x, S if S is not None else x,
               lora_B, addend if addend is not None else x, x, out, lora_A),
              (0, 0, threshold, scale) if seed == 0 else (*seed_words(seed), threshold, scale))

    return run
