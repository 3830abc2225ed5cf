"""Multi-adapter LoRA: every token may use its own adapter (multi-tenant serving, batched training).

With L adapters stacked as A: (L, R, K), B: (L, N, R), scalings s: (L,), ranks r_l <= R and
adapter_ids: (M,) in [-1, L) (-1 = base only):

    y[t] = x[t]·Wᵀ + b + s_l · (x[t]·A[l, :r_l]ᵀ)·B[l, :, :r_l]ᵀ,   l = ids[t]

Tokens are grouped by adapter on the device: a stable sort of the ids gives `order` (token of each
sorted position) and `sorted_ids`, and `starts[v + 1]` is the first sorted position whose id is >= v,
for v in [-1, L]. No host sync, and every grid depends only on (M, L, R, K, N), never on the ids, so a
decode step can be captured in a CUDA graph. Programs whose adapter has no tokens, or whose rank
block lies past the adapter's rank, exit at once: work follows each adapter's true rank.

- _multi_shrink_kernel  S[p] = s_l · X[order[p]]·Q_lᵀ   (sorted rows) for S (X=x, Q=A) and dU (X=dY, Q=Bᵀ)
- _multi_gemm_kernel    out[order[p]] = X[order[p]]·Wᵀ + b + S[p]·P_lᵀ, the base GEMM over sorted rows
                        with each adapter's expand as extra K-steps: y (W, B) and dX (Wᵀ, Aᵀ)
- _multi_reduce_kernel  out_l = Σ_{p in l} Y[order[p]]ᵀ·Z[p]  for dA (Y=x, Z=dU) and dB (Y=dY, Z=S)
Ids outside [-1, L) cannot be checked on the GPU without a host sync: their output rows are NaN.
"""
import torch
import triton
import triton.language as tl

from .common import dot_dtype, dot_precision, gemm_blocks, interpreting, rank_block
from .lora_gemm import grouped_pid, matmul_tile


def group_by_adapter(adapter_ids: torch.Tensor, num_adapters: int):
    """(order, sorted_ids, starts) for flat int ids, all on the ids' device, without a host sync."""
    sorted_ids, order = torch.sort(adapter_ids.reshape(-1).to(torch.int32), stable=True)
    bounds = torch.arange(-1, num_adapters + 1, dtype=torch.int32, device=adapter_ids.device)
    starts = torch.searchsorted(sorted_ids, bounds).to(torch.int32)
    return order.to(torch.int32), sorted_ids, starts


@triton.jit
def _multi_shrink_kernel(
    x_ptr, q_ptr, scale_ptr, out_ptr, order_ptr, starts_ptr, ranks_ptr,
    C, R,
    stride_xm, stride_xc, stride_ql, stride_qr, stride_qc, stride_om, stride_or,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    adapter = tl.program_id(1)
    seg_end = tl.load(starts_ptr + adapter + 2)
    row0 = tl.load(starts_ptr + adapter + 1) + tl.program_id(0) * BLOCK_M
    rank = min(tl.load(ranks_ptr + adapter), R)
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
        out_ptrs = out_ptr + offs_p[:, None].to(tl.int64) * stride_om + offs_r[None, :] * stride_or
        tl.store(out_ptrs, acc, mask=p_ok[:, None] & r_ok[None, :])


@triton.jit
def _multi_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, p_ptr, q_ptr, out_ptr, order_ptr, sorted_ids_ptr, starts_ptr, ranks_ptr,
    M, N, K, L, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pr,
    stride_ql, stride_qn, stride_qr, stride_om, stride_on,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
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
    p_ptrs = p_ptr + offs_p[:, None].to(tl.int64) * stride_pm + offs_r[None, :] * stride_pr
    pos = pid_m * BLOCK_M
    block_end = min(pos + BLOCK_M, M)
    while pos < block_end:
        adapter = tl.load(sorted_ids_ptr + pos)
        valid = (adapter >= 0) & (adapter < L)
        if valid:
            rank = min(tl.load(ranks_ptr + adapter), R)
            q_ptrs = q_ptr + adapter.to(tl.int64) * stride_ql + offs_r[:, None] * stride_qr + cols[None, :] * stride_qn
            acc = matmul_tile(p_ptrs, q_ptrs, p_ok & (ids == adapter), n_ok, rank,
                              BLOCK_R * stride_pr, BLOCK_R * stride_qr, acc, False, tl.float32, LORA_PRECISION, BLOCK_R)
        # Segment end: starts[id + 1] for the next id; ids past L are sorted last and end the block.
        next_start = tl.load(starts_ptr + tl.where(adapter < -1, 0, tl.minimum(adapter + 2, L + 1)))
        pos = tl.where(adapter >= L, block_end, next_start)
    bad = (ids < -1) | (ids >= L)
    acc = tl.where(bad[:, None], float("nan"), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + tokens[:, None] * stride_om + cols[None, :] * stride_on
    out_mask = p_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _multi_reduce_kernel(
    y_ptr, z_ptr, out_ptr, order_ptr, starts_ptr, ranks_ptr,
    A, R,
    stride_ym, stride_ya, stride_zm, stride_zr, stride_ol, stride_oa, stride_or,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # out[l, a, r] = Σ over adapter l's sorted rows p of Y[order[p], a]·Z[p, r]; zero past the rank.
    adapter = tl.program_id(1)
    seg_start = tl.load(starts_ptr + adapter + 1)
    seg_end = tl.load(starts_ptr + adapter + 2)
    rank = min(tl.load(ranks_ptr + adapter), R)
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    a_ok = offs_a < A
    r_ok = offs_r < rank
    acc = tl.zeros((BLOCK_A, BLOCK_R), dtype=tl.float32)
    if tl.program_id(2) * BLOCK_R < rank:
        for t0 in range(seg_start, seg_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_ok = offs_t < seg_end
            tokens = tl.load(order_ptr + offs_t, mask=t_ok, other=0).to(tl.int64)
            yt = tl.load(y_ptr + tokens[None, :] * stride_ym + offs_a[:, None].to(tl.int64) * stride_ya,
                         mask=a_ok[:, None] & t_ok[None, :], other=0.0)
            zt = tl.load(z_ptr + offs_t[:, None].to(tl.int64) * stride_zm + offs_r[None, :] * stride_zr,
                         mask=t_ok[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(yt.to(DOT_DTYPE), zt.to(DOT_DTYPE), acc, input_precision=PRECISION)
    out_ptrs = (out_ptr + adapter.to(tl.int64) * stride_ol + offs_a[:, None].to(tl.int64) * stride_oa
                + offs_r[None, :].to(tl.int64) * stride_or)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=a_ok[:, None] & (offs_r < R)[None, :])


def _blocks(M: int) -> dict:
    if interpreting():
        # 16-row blocks: small test batches still span several blocks and several adapters per block.
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    return gemm_blocks(M)


def multi_shrink(x, q, scalings, groups, ranks):
    """S = s_l · x[order]·Q_lᵀ -> (M, R) fp32 in sorted row order.
    x: (M, C); q: (L, R, C) any strides; scalings: (L,); groups from group_by_adapter; ranks: (L,) int32."""
    M, C = x.shape
    L, R, C_q = q.shape
    assert C == C_q and scalings.shape == (L,) and ranks.shape == (L,), "multi_shrink: shapes do not chain"
    # Zeros, not empty: rows of base-only tokens and columns past an adapter's rank are never written,
    # and the forward op returns S (saved for backward), whose values must not be leftover memory.
    out = torch.zeros((M, R), dtype=torch.float32, device=x.device)
    if M == 0 or L == 0:
        return out
    order, _, starts = groups
    block_m = 16 if interpreting() or M <= 64 else 64
    block_c = 32 if interpreting() else 128
    block_r = rank_block(R, cap=128)
    grid = (triton.cdiv(M, block_m), L, triton.cdiv(R, block_r))
    _multi_shrink_kernel[grid](
        x, q, scalings, out, order, starts, ranks, C, R,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
        DOT_DTYPE=dot_dtype(x.dtype, q.dtype), PRECISION=dot_precision(x.dtype, q.dtype, low_rank=True),
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4,
    )
    return out


def multi_gemm(x, weight, bias, p, q, groups, ranks, out=None):
    """out[order] (+)= x[order]·weightᵀ + bias + P·Q_lᵀ -> (M, N).

    x: (M, K); weight: (N, K), or None for the expand alone; p: (M, R) fp32 in sorted row order;
    q: (L, N, R) any strides. With `out` given, the result is added into it (the unfused expand)."""
    M, K = x.shape
    L, N, R = q.shape
    assert p.shape == (M, R) and ranks.shape == (L,), "multi_gemm: shapes do not chain"
    assert weight is None or weight.shape == (N, K), "multi_gemm: weight does not chain"
    accumulate = out is not None
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    order, sorted_ids, starts = groups
    cfg = _blocks(M)
    w = weight if weight is not None else x
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _multi_gemm_kernel[grid](
        x, w, bias if bias is not None else x, p, q, out, order, sorted_ids, starts, ranks,
        M, N, K, L, R,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), p.stride(0), p.stride(1),
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
        HAS_BASE=weight is not None, HAS_BIAS=bias is not None, ACCUMULATE=accumulate,
        EVEN_K=K % cfg["BLOCK_K"] == 0,
        DOT_DTYPE=dot_dtype(x.dtype, w.dtype), PRECISION=dot_precision(x.dtype, w.dtype),
        LORA_PRECISION=dot_precision(x.dtype, torch.float32, low_rank=True), BLOCK_R=rank_block(R), **cfg,
    )
    return out


def multi_reduce(y, z, groups, ranks, out):
    """out[l] = Σ over adapter l's rows of y[order]ᵀ·z, zero past each rank. y: (M, A) in token
    order; z: (M, R) in sorted order; out: (L, A, R), any strides and float dtype (dAᵀ and dB views)."""
    M, A = y.shape
    L, A_o, R = out.shape
    assert z.shape == (M, R) and A == A_o and ranks.shape == (L,), "multi_reduce: shapes do not chain"
    if L == 0 or A == 0:
        return out
    _, _, starts = groups
    block_a = 32 if interpreting() else 64
    block_t = 16 if interpreting() else 64
    block_r = rank_block(R, cap=64)
    grid = (triton.cdiv(A, block_a), L, triton.cdiv(R, block_r))
    _multi_reduce_kernel[grid](
        y, z, out, groups[0], starts, ranks, A, R,
        y.stride(0), y.stride(1), z.stride(0), z.stride(1), out.stride(0), out.stride(1), out.stride(2),
        DOT_DTYPE=dot_dtype(y.dtype, z.dtype), PRECISION=dot_precision(y.dtype, z.dtype, low_rank=True),
        BLOCK_A=block_a, BLOCK_T=block_t, BLOCK_R=block_r, num_warps=4,
    )
    return out
