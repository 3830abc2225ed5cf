"""Multi-adapter LoRA over tokens grouped by adapter (prefill and training batches).

With L adapters stacked as A: (L, R, K), B: (L, N, R), scalings s: (L,), ranks r_l <= R and
adapter_ids: (M,) in [-1, L) (-1 = base only):

    y[t] = x[t]·Wᵀ + b + s_l · (x[t]·A[l, :r_l]ᵀ)·B[l, :, :r_l]ᵀ,   l = ids[t]

Tokens are grouped by adapter on the device: a stable sort of the ids gives `order` (token of each
sorted position) and `sorted_ids`, and `starts[v + 1]` is the first sorted position whose id is >= v,
for v in [-1, L]. No host sync, and every grid depends only on (M, L, R, K, N), never on the ids, so a
step can be captured in a CUDA graph. Programs whose adapter has no tokens, or whose rank block lies
past the adapter's rank, exit at once: work follows each adapter's true rank. The low-rank
intermediates (S, dU) are (M, R) fp32 in token order, so that every path (these kernels, the decode
kernels of kernels/multi_decode.py) reads what any other wrote.

- _multi_shrink_kernel  S[t] = s_l · X[t]·Q_lᵀ  per adapter segment, for S (X=x, Q=A) and dU (X=dY, Q=Bᵀ)
- _multi_gemm_kernel    out[t] (+)= X[t]·Wᵀ + b + S[t]·P_lᵀ over blocks of sorted rows, each adapter's
                        expand as extra K-steps: the fused plan's y (W, B) and dX (Wᵀ, Aᵀ); without W,
                        the split plan's low-rank term (a library GEMM then adds x·Wᵀ or dY·W).
                        DoRA (HAS_COL_SCALE, G: (L, N) fp32): out[t] = G[l] ⊙ (X[t]·Wᵀ + S[t]·P_lᵀ
                        (+ out[t] with ACCUMULATE)) + b, the scale before the bias; rows with id -1
                        unscaled. The split plan then writes x·Wᵀ first and accumulates onto it.
- _multi_reduce_kernel  out_l = Σ_{t in l} Y[t]ᵀ·Z[t]  for dA (Y=x, Z=dU) and dB (Y=dY, Z=S); over a
                        segment of sorted rows, or (SCAN, for small M) over every row whose id is l
Without `ranks` (HAS_RANKS=False) every adapter has rank R. Ids outside [-1, L) cannot be checked on
the GPU without a host sync: their output rows are NaN.
"""
import torch
import triton
import triton.language as tl

from . import configs
from .common import cdiv, check_col_scale, check_shapes, dot_dtype, dot_precision
from .launch import launch
from .lora_gemm import grouped_pid, matmul_tile


@triton.jit
def adapter_rank(ranks_ptr, adapter, R, HAS_RANKS: tl.constexpr):
    """The adapter's rank clamped to R (R for every adapter without a ranks tensor)."""
    if HAS_RANKS:
        return tl.minimum(tl.load(ranks_ptr + adapter).to(tl.int32), R)
    return R


@triton.jit
def _multi_shrink_kernel(
    x_ptr, q_ptr, scale_ptr, out_ptr, order_ptr, starts_ptr, ranks_ptr,
    C, R,
    stride_xm, stride_xc, stride_ql, stride_qr, stride_qc, stride_om, stride_or,
    HAS_RANKS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    adapter = tl.program_id(1)
    seg_end = tl.load(starts_ptr + adapter + 2)
    row0 = tl.load(starts_ptr + adapter + 1) + tl.program_id(0) * BLOCK_M
    rank = adapter_rank(ranks_ptr, adapter, R, HAS_RANKS)
    r0 = tl.program_id(2) * BLOCK_R
    if (row0 < seg_end) & (r0 < rank):
        offs_p = row0 + tl.arange(0, BLOCK_M)
        p_ok = offs_p < seg_end
        tokens = tl.load(order_ptr + offs_p, mask=p_ok, other=0).to(tl.int64)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
        q_base = q_ptr + adapter.to(tl.int64) * stride_ql
        acc = matmul_tile(x_ptr + tokens[:, None] * stride_xm + offs_c[None, :] * stride_xc,
                          q_base + offs_c[:, None] * stride_qc + offs_r[None, :].to(tl.int64) * stride_qr,
                          p_ok, r_ok, C, BLOCK_C * stride_xc, BLOCK_C * stride_qc,
                          tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), False, DOT_DTYPE, PRECISION, BLOCK_C)
        acc *= tl.load(scale_ptr + adapter).to(tl.float32)
        out_ptrs = out_ptr + tokens[:, None] * stride_om + offs_r[None, :] * stride_or
        tl.store(out_ptrs, acc, mask=p_ok[:, None] & r_ok[None, :])


@triton.jit
def _multi_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, p_ptr, q_ptr, out_ptr, order_ptr, sorted_ids_ptr, starts_ptr, ranks_ptr, g_ptr,
    M, N, K, L, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pr,
    stride_ql, stride_qn, stride_qr, stride_om, stride_on, stride_gl,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, ACCUMULATE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # sorted positions
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ok = offs_p < M
    n_ok = offs_n < N
    tokens = tl.load(order_ptr + offs_p, mask=p_ok, other=0).to(tl.int64)
    ids = tl.load(sorted_ids_ptr + offs_p, mask=p_ok, other=-1)
    cols = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BASE:
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        acc = matmul_tile(x_ptr + tokens[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                          w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn,
                          p_ok, n_ok, K, BLOCK_K * stride_xk, BLOCK_K * stride_wk, acc,
                          EVEN_K, DOT_DTYPE, PRECISION, BLOCK_K)
    # Walk the adapter segments that meet this block of sorted rows; each adds its expand as extra
    # K-steps over its own rank, with the rows of other adapters masked out.
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    p_ptrs = p_ptr + tokens[:, None] * stride_pm + offs_r[None, :] * stride_pr
    pos = pid_m * BLOCK_M
    block_end = min(pos + BLOCK_M, M)
    while pos < block_end:
        adapter = tl.load(sorted_ids_ptr + pos)
        valid = (adapter >= 0) & (adapter < L)
        if valid:
            rank = adapter_rank(ranks_ptr, adapter, R, HAS_RANKS)
            q_ptrs = q_ptr + adapter.to(tl.int64) * stride_ql + offs_r[:, None] * stride_qr + cols[None, :] * stride_qn
            acc = matmul_tile(p_ptrs, q_ptrs, p_ok & (ids == adapter), n_ok, rank,
                              BLOCK_R * stride_pr, BLOCK_R * stride_qr, acc, False, tl.float32, LORA_PRECISION, BLOCK_R)
        # Segment end: starts[id + 1] for the next id; ids past L are sorted last and end the block.
        next_start = tl.load(starts_ptr + tl.where(adapter < -1, 0, tl.minimum(adapter + 2, L + 1)))
        pos = tl.where(adapter >= L, block_end, next_start)
    out_ptrs = out_ptr + tokens[:, None] * stride_om + cols[None, :] * stride_on
    out_mask = p_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    if HAS_COL_SCALE:
        # DoRA: the row's adapter scales everything so far (base and low-rank term), then the bias is
        # added. Rows without an adapter read nothing and keep a scale of one.
        valid = p_ok & (ids >= 0) & (ids < L)
        acc *= tl.load(g_ptr + tl.where(valid, ids, 0).to(tl.int64)[:, None] * stride_gl + cols[None, :],
                       mask=valid[:, None] & n_ok[None, :], other=1.0)
    bad = (ids < -1) | (ids >= L)
    acc = tl.where(bad[:, None], float("nan"), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _multi_reduce_kernel(
    y_ptr, z_ptr, out_ptr, order_ptr, ids_ptr, starts_ptr, ranks_ptr,
    M, A, R,
    stride_ym, stride_ya, stride_zm, stride_zr, stride_ol, stride_oa, stride_or,
    SCAN: tl.constexpr, HAS_RANKS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # out[l, a, r] = Σ over adapter l's tokens t of Y[t, a]·Z[t, r]; zero past the rank. Every adapter
    # is written (zero where no token uses it), in a fixed order: deterministic, no atomics.
    adapter = tl.program_id(1)
    rank = adapter_rank(ranks_ptr, adapter, R, HAS_RANKS)
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    a_ok = offs_a < A
    r_ok = offs_r < rank
    acc = tl.zeros((BLOCK_A, BLOCK_R), dtype=tl.float32)
    if tl.program_id(2) * BLOCK_R < rank:
        if SCAN:  # small M: the tokens of l are found by reading every id (no grouping needed)
            t_start = 0
            t_end = M
        else:
            t_start = tl.load(starts_ptr + adapter + 1)
            t_end = tl.load(starts_ptr + adapter + 2)
        for t0 in range(t_start, t_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_ok = offs_t < t_end
            if SCAN:
                t_ok = t_ok & (tl.load(ids_ptr + offs_t, mask=t_ok, other=-1) == adapter)
                tokens = offs_t.to(tl.int64)
            else:
                tokens = tl.load(order_ptr + offs_t, mask=t_ok, other=0).to(tl.int64)
            yt = tl.load(y_ptr + tokens[None, :] * stride_ym + offs_a[:, None].to(tl.int64) * stride_ya,
                         mask=a_ok[:, None] & t_ok[None, :], other=0.0)
            zt = tl.load(z_ptr + tokens[:, None] * stride_zm + offs_r[None, :] * stride_zr,
                         mask=t_ok[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(yt.to(DOT_DTYPE), zt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    out_ptrs = (out_ptr + adapter.to(tl.int64) * stride_ol + offs_a[:, None].to(tl.int64) * stride_oa
                + offs_r[None, :].to(tl.int64) * stride_or)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=a_ok[:, None] & (offs_r < R)[None, :])


def _ranks_arg(ranks, fallback):
    return (ranks, True) if ranks is not None else (fallback, False)


def multi_shrink(x, q, scalings, groups, ranks):
    """S[t] = s_l · x[t]·Q_lᵀ -> (M, R) fp32 in token order, zero for base-only tokens and past each rank.
    x: (M, C); q: (L, R, C) any strides; scalings: (L,) float; groups from group_by_adapter;
    ranks: (L,) integer or None (all R)."""
    M, C = x.shape
    L, R, C_q = q.shape
    check_shapes(C == C_q and scalings.shape == (L,) and (ranks is None or ranks.shape == (L,)), "multi_shrink",
                 x=x, q=q, scalings=scalings, ranks=ranks)
    # Zeros: rows of base-only tokens and columns past a rank are never written, and S is an output of
    # the forward op (saved for backward), whose values must not be leftover memory.
    out = torch.zeros((M, R), dtype=torch.float32, device=x.device)
    if M == 0 or L == 0:
        return out
    order, _, starts = groups
    ranks, has_ranks = _ranks_arg(ranks, starts)
    cfg = configs.multi_shrink(M, R, x.device, torch.float32 in (x.dtype, q.dtype))
    grid = (cdiv(M, cfg["BLOCK_M"]), L, cdiv(R, cfg["BLOCK_R"]))
    launch(
        _multi_shrink_kernel, grid,
        x, q, scalings, out, order, starts, ranks, C, R,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
        HAS_RANKS=has_ranks, DOT_DTYPE=dot_dtype(x.dtype, q.dtype),
        PRECISION=dot_precision(x.dtype, q.dtype, low_rank=True), **cfg,
    )
    return out


def multi_gemm(x, weight, bias, p, q, groups, ranks, out, accumulate=False, col_scale=None):
    """out[t] (+)= x[t]·weightᵀ + bias + P[t]·Q_lᵀ, into out: (M, N), any strides and float dtype.

    x: (M, K), or None with weight None (the low-rank term alone); weight: (N, K) or None; p: (M, R)
    fp32 in token order; q: (L, N, R) any strides; ranks: (L,) integer or None. With `accumulate`, the
    result is added to what out holds (the unfused expand). col_scale: (L, N) fp32 with unit column
    stride, or None; given, out[t] = col_scale[l] ⊙ (x[t]·weightᵀ + P[t]·Q_lᵀ (+ out[t])) + bias on
    rows with an adapter l (DoRA)."""
    M, R = p.shape
    L, N, R_q = q.shape
    has_base = weight is not None
    check_shapes(R == R_q and (ranks is None or ranks.shape == (L,))
                 and (not has_base or (x.shape[0] == M and weight.shape == (N, x.shape[1])))
                 and (bias is None or bias.shape == (N,)) and out.shape == (M, N)
                 and (col_scale is None or col_scale.shape == (L, N)), "multi_gemm",
                 x=x, weight=weight, bias=bias, p=p, q=q, ranks=ranks, out=out, col_scale=col_scale)
    check_col_scale(col_scale, "multi_gemm")
    if M == 0 or N == 0:
        return out
    order, sorted_ids, starts = groups
    cfg = configs.multi_gemm(M, N, R, has_base, out.device)
    x = x if has_base else p
    w = weight if has_base else p
    K = x.shape[1] if has_base else 0
    ranks, has_ranks = _ranks_arg(ranks, starts)
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    launch(
        _multi_gemm_kernel, grid,
        x, w, bias if bias is not None else p, p, q, out, order, sorted_ids, starts, ranks,
        col_scale if col_scale is not None else p,
        M, N, K, L, R,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), p.stride(0), p.stride(1),
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
        col_scale.stride(0) if col_scale is not None else 0,
        HAS_BASE=has_base, HAS_BIAS=bias is not None, HAS_RANKS=has_ranks, ACCUMULATE=accumulate,
        HAS_COL_SCALE=col_scale is not None,
        EVEN_K=K % cfg["BLOCK_K"] == 0,
        DOT_DTYPE=dot_dtype(x.dtype, w.dtype), PRECISION=dot_precision(x.dtype, w.dtype),
        LORA_PRECISION=dot_precision(out.dtype, torch.float32, low_rank=True), **cfg,
    )
    return out


def multi_reduce(y, z, ranks, out, groups=None, ids=None):
    """out[l] = Σ over adapter l's tokens of y[t]ᵀ·z[t], zero past each rank and for unused adapters.

    y: (M, A) and z: (M, R), both in token order; out: (L, A, R), any strides and float dtype (dAᵀ and
    dB views). Tokens are found through `groups` (group_by_adapter), or without them by scanning the
    flat `ids` (M,) (small M: the decode path has no grouping)."""
    M, A = y.shape
    L, A_o, R = out.shape
    check_shapes(z.shape == (M, R) and A == A_o and (ranks is None or ranks.shape == (L,))
                 and (ids is None or ids.shape == (M,)), "multi_reduce", y=y, z=z, ranks=ranks, out=out, ids=ids)
    if (groups is None) == (ids is None):
        raise ValueError("multi_reduce: give exactly one of groups and ids")
    if L == 0 or A == 0:
        return out
    scan = groups is None
    order, _, starts = (ids, ids, ids) if scan else groups
    ranks, has_ranks = _ranks_arg(ranks, order)
    cfg = configs.multi_reduce(M, R, out.device)
    grid = (cdiv(A, cfg["BLOCK_A"]), L, cdiv(R, cfg["BLOCK_R"]))
    launch(
        _multi_reduce_kernel, grid,
        y, z, out, order, ids if scan else order, starts, ranks, M, A, R,
        y.stride(0), y.stride(1), z.stride(0), z.stride(1), out.stride(0), out.stride(1), out.stride(2),
        SCAN=scan, HAS_RANKS=has_ranks, DOT_DTYPE=dot_dtype(y.dtype, z.dtype),
        PRECISION=dot_precision(y.dtype, z.dtype, low_rank=True), **cfg,
    )
    return out
