"""Multi-adapter LoRA for small batches (decode): per-row adapter lookup, no sort.

With L adapters stacked as Q: (L, R, C) for the shrink and P: (L, N, R) for the expand, scalings s,
ranks r_l <= R and ids: (M,) in [-1, L), for M <= DECODE_MAX_ROWS rows:

    shrink   S[m] = s_l · X[m]·Q_l[:r_l]ᵀ      (M, R) fp32, l = ids[m]      S (X=x, Q=A), dU (X=dY, Q=Bᵀ)
    expand   out[m] = b + S[m]·P_l[:, :r_l]ᵀ                                y's (P=B) and dX's (P=Aᵀ) low-rank term
    DoRA     out[m] = G[l] ⊙ (X[m]·Wᵀ + S[m]·P_lᵀ) + b   HAS_COL_SCALE: G (L, N) fp32, each adapter's
             magnitude over its row norms, read at the row's adapter (rows with id -1 unscaled)

Program layout. Program i reads all M ids (M is small) and serves row i's adapter l only if i is the
first row holding l, its leader; it then serves every row holding l, so each adapter's weights are
read once per call however many rows share them. Later rows of l exit at once. A row with id -1
(base only) or an id outside [-1, L) is served by its own program: a zero term, or NaN. The grids,
(M, SPLIT) and (M, N blocks), depend on the shapes only, so a decode step captures in a CUDA graph.

The shrink is split over C into SPLIT slices, so that about M·SPLIT programs keep the SMs busy when M
is small and each reads a slice of its adapter. The slices' partial sums go to a workspace (SPLIT, M,
R) that the expand adds in a fixed order: deterministic, no atomics. Entries past an adapter's rank
are never read, and no program works on them.
"""
import functools

import torch
import triton
import triton.language as tl

from . import configs
from .common import cdiv, check_col_scale, check_shapes, dot_dtype, dot_precision
from .launch import Bound, launch
from .lora_gemm import matmul_tile
from .multi_lora import adapter_rank

# The leader test holds every id of the batch in one block, so the path serves up to this many rows.
DECODE_MAX_ROWS = configs.DECODE_MAX_ROWS


@triton.jit
def _leader(ids_ptr, M, BLOCK_IDS: tl.constexpr):
    """(id of this program's row, whether no earlier row holds the same id)."""
    i = tl.program_id(0)
    offs = tl.arange(0, BLOCK_IDS)
    ids = tl.load(ids_ptr + offs, mask=offs < M, other=-1)
    mine = tl.load(ids_ptr + i)
    earlier = tl.sum(((offs < i) & (ids == mine)).to(tl.int32), axis=0)
    return mine, earlier == 0


@triton.jit
def _decode_shrink_kernel(
    x_ptr, q_ptr, scale_ptr, ids_ptr, ranks_ptr, part_ptr,
    M, C, L, R, c_per_split,
    stride_xm, stride_xc, stride_ql, stride_qr, stride_qc, stride_ps, stride_pm, stride_pr,
    HAS_RANKS: tl.constexpr, EVEN_C: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    mine, first = _leader(ids_ptr, M, BLOCK_M)
    if first & (mine >= 0) & (mine < L):
        adapter = mine.to(tl.int64)
        rank = adapter_rank(ranks_ptr, adapter, R, HAS_RANKS)
        offs_m = tl.arange(0, BLOCK_M)
        rows = (offs_m < M) & (tl.load(ids_ptr + offs_m, mask=offs_m < M, other=-1) == mine)
        c0 = tl.program_id(1) * c_per_split
        count = tl.minimum(c_per_split, C - c0)
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        scale = tl.load(scale_ptr + adapter).to(tl.float32)
        part = part_ptr + tl.program_id(1).to(tl.int64) * stride_ps
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < rank
            acc = matmul_tile(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_c[None, :] * stride_xc,
                              q_ptr + adapter * stride_ql + offs_c[:, None] * stride_qc
                              + offs_r[None, :].to(tl.int64) * stride_qr,
                              rows, r_ok, count, BLOCK_C * stride_xc, BLOCK_C * stride_qc,
                              tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), EVEN_C, DOT_DTYPE, PRECISION, BLOCK_C)
            tl.store(part + offs_m[:, None] * stride_pm + offs_r[None, :] * stride_pr, acc * scale,
                     mask=rows[:, None] & r_ok[None, :])


@triton.jit
def _sum_parts(part_ptr, offs_m, offs_r, ok, SPLIT, stride_ps, stride_pm, stride_pr,
               BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Σ_s P[s, offs_m, offs_r] in slice order (zero where not ok)."""
    ptrs = part_ptr + offs_m[:, None].to(tl.int64) * stride_pm + offs_r[None, :] * stride_pr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(ptrs + s * stride_ps, mask=ok, other=0.0)
    return acc


@triton.jit
def _decode_gemm_kernel(
    x_ptr, w_ptr, part_ptr, q_ptr, bias_ptr, out_ptr, s_ptr, ids_ptr, ranks_ptr, g_ptr,
    M, N, K, L, R, SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ps, stride_pm, stride_pr,
    stride_ql, stride_qn, stride_qr, stride_om, stride_on, stride_sm, stride_sr, stride_gl,
    HAS_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, WRITE_S: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    R_CHUNK: tl.constexpr,
):
    pid_n = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    rows = offs_m.to(tl.int64)
    ids = tl.load(ids_ptr + offs_m, mask=m_ok, other=-1)
    valid = m_ok & (ids >= 0) & (ids < L)
    adapters = tl.where(valid, ids, 0).to(tl.int64)
    # Each row's rank (0 without an adapter): S is zero past it, and no adapter entry past it is read.
    if HAS_RANKS:
        row_rank = tl.minimum(tl.load(ranks_ptr + adapters, mask=valid, other=0).to(tl.int32), R)
    else:
        row_rank = tl.full((BLOCK_M,), R, tl.int32)
    row_rank = tl.where(valid, row_rank, 0)
    if WRITE_S:
        if pid_n == 0:  # S in token order, every column
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                s_tile = _sum_parts(part_ptr, offs_m, offs_r, offs_r[None, :] < row_rank[:, None],
                                    SPLIT, stride_ps, stride_pm, stride_pr, BLOCK_M, BLOCK_R)
                tl.store(s_ptr + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr, s_tile,
                         mask=m_ok[:, None] & (offs_r < R)[None, :])
    if HAS_OUT:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        cols = offs_n.to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        acc = matmul_tile(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                          w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn,
                          m_ok, n_ok, K, BLOCK_K * stride_xk, BLOCK_K * stride_wk,
                          tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), EVEN_K, DOT_DTYPE, PRECISION, BLOCK_K)
        # The low-rank term with each row's own adapter: Q gathered per row, (rows, R_CHUNK, columns) at
        # a time, multiplied and summed in fp32. Every load is independent of the others, however many
        # adapters the rows hold (a loop over the block's adapters would chain one per adapter).
        q_rows = q_ptr + adapters[:, None, None] * stride_ql + cols[None, None, :] * stride_qn
        for r0 in range(0, R, BLOCK_R):
            for c in tl.static_range(0, BLOCK_R, R_CHUNK):
                offs_r = r0 + c + tl.arange(0, R_CHUNK)
                in_rank = offs_r[None, :] < row_rank[:, None]
                p = _sum_parts(part_ptr, offs_m, offs_r, in_rank, SPLIT, stride_ps, stride_pm, stride_pr,
                               BLOCK_M, R_CHUNK)
                q = tl.load(q_rows + offs_r[None, :, None].to(tl.int64) * stride_qr,
                            mask=in_rank[:, :, None] & n_ok[None, None, :], other=0.0)
                acc += tl.sum(p[:, :, None] * q.to(tl.float32), axis=1)
        if HAS_COL_SCALE:
            # DoRA: each row's adapter scales base and low-rank term together, before the bias. Rows
            # without an adapter read nothing and keep a scale of one.
            acc *= tl.load(g_ptr + adapters[:, None] * stride_gl + cols[None, :],
                           mask=valid[:, None] & n_ok[None, :], other=1.0)
        acc = tl.where((m_ok & ((ids < -1) | (ids >= L)))[:, None], float("nan"), acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _check_ids(ids, launcher: str) -> None:
    if ids.dim() != 1 or ids.stride(0) != 1:  # the leader test reads ids at unit stride
        raise ValueError(f"{launcher}: ids must be 1-D and contiguous, got shape {tuple(ids.shape)}, "
                         f"strides {ids.stride()}")


def _block_ids(M: int) -> int:
    return max(16, 1 << (M - 1).bit_length())


@functools.lru_cache(maxsize=1024)
def _shrink_config(M: int, C: int, R: int, device, wide: bool) -> tuple:
    """(grid, BLOCK_C, columns per slice, EVEN_C, BLOCK_M, BLOCK_R, num_warps): enough slices of C that
    M·SPLIT programs give every SM about PROGRAMS_PER_SM of them (fewer if C runs out of blocks), every
    slice non-empty. Cached: at decode sizes the host time of a call matters as much as its kernels'."""
    cfg = configs.decode_shrink(M, R, device, wide)
    block_c = cfg["BLOCK_C"]
    blocks = cdiv(max(C, 1), block_c)
    per_split = cdiv(blocks, max(1, min(blocks, cdiv(cfg["PROGRAMS_PER_SM"] * configs.sm_count(device), M))))
    grid = (M, cdiv(blocks, per_split))
    return grid, block_c, per_split * block_c, C % block_c == 0, _block_ids(M), cfg["BLOCK_R"], cfg["num_warps"]


@functools.lru_cache(maxsize=1024)
def _gemm_config(M: int, N: int, K: int, R: int, has_out: bool, device) -> tuple:
    """(grid, EVEN_K, config): one program per block of rows and block of columns (one column block
    when only S is wanted). R_CHUNK: rank entries per gathered (rows, R_CHUNK, columns) tile of Q,
    about 4096 elements (32 fp32 registers a thread at 4 warps)."""
    cfg = dict(configs.decode_gemm(M, N, R, device))
    cfg["R_CHUNK"] = max(2, min(cfg["BLOCK_R"], 4096 // (cfg["BLOCK_M"] * cfg["BLOCK_N"])))
    grid = (cdiv(M, cfg["BLOCK_M"]), max(1, cdiv(N, cfg["BLOCK_N"])) if has_out else 1)
    return grid, K % cfg["BLOCK_K"] == 0, cfg


def decode_shrink(x, q, scalings, ids, ranks):
    """Partial sums P: (SPLIT, M, R) fp32 of S[m] = s_l · x[m]·Q_lᵀ over SPLIT slices of C, to be
    added by decode_gemm. x: (M, C); q: (L, R, C) any strides; scalings: (L,); ids: (M,) integer,
    contiguous; ranks: (L,) integer or None. Entries of rows without an adapter, and past each rank,
    are left unwritten: decode_gemm never reads them."""
    M, C = x.shape
    L, R, C_q = q.shape
    if not 0 < M <= DECODE_MAX_ROWS:
        raise ValueError(f"decode_shrink: {M} rows, outside [1, {DECODE_MAX_ROWS}]")
    _check_ids(ids, "decode_shrink")
    check_shapes(C == C_q and scalings.shape == (L,) and ids.shape == (M,)
                 and (ranks is None or ranks.shape == (L,)), "decode_shrink", x=x, q=q, scalings=scalings,
                 ids=ids, ranks=ranks)
    part = torch.empty((_shrink_config(M, C, R, x.device, torch.float32 in (x.dtype, q.dtype))[0][1], M, R),
                       dtype=torch.float32, device=x.device)
    if L == 0 or C == 0:
        return part.zero_()
    grid, pointers, frozen, kwargs = _shrink_arguments(x, q, scalings, ids, ranks, part)
    launch(_decode_shrink_kernel, grid, *pointers, *frozen, **kwargs)
    return part


def _shrink_arguments(x, q, scalings, ids, ranks, part):
    """(grid, pointers, frozen, kwargs) of decode_shrink's launch: its tensors, then its shapes and
    strides, then its constexprs and options."""
    M, C = x.shape
    L, R, _ = q.shape
    grid, block_c, c_per_split, even_c, block_m, block_r, num_warps = _shrink_config(M, C, R, x.device, torch.float32 in (x.dtype, q.dtype))
    kwargs = dict(HAS_RANKS=ranks is not None, EVEN_C=even_c, DOT_DTYPE=dot_dtype(x.dtype, q.dtype),
                  PRECISION=dot_precision(x.dtype, q.dtype, low_rank=True),
                  BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=num_warps)
    return (grid, (x, q, scalings, ids, ranks if ranks is not None else ids, part),
            (M, C, L, R, c_per_split, *x.stride(), *q.stride(), *part.stride()), kwargs)


def decode_gemm(part, q, ids, ranks, x=None, w=None, out=None, bias=None, write_s=False, col_scale=None):
    """out = x·wᵀ + bias + S·Q_lᵀ, written into out: (M, N) (any strides and float dtype; None: not
    computed), and S: (M, R) fp32 returned with write_s (else None), with S = Σ_s part[s]
    (decode_shrink's partial sums, added in a fixed order). col_scale: (L, N) fp32 with unit column
    stride, or None; given, out = col_scale[l] ⊙ (x·wᵀ + S·Q_lᵀ) + bias on rows with an adapter l.

    x: (M, K) and w: (N, K), any strides (needed with out); q: (L, N, R) any strides; ids: (M,) integer,
    contiguous; ranks: (L,) integer or None; bias: (N,) or None. Rows with id -1 get x·wᵀ + bias, rows
    with an id outside [-1, L) NaN. S is zero past each rank and on rows without an adapter."""
    split, M, R = part.shape
    L, N, R_q = q.shape
    _check_ids(ids, "decode_gemm")
    check_shapes(R == R_q and ids.shape == (M,) and (ranks is None or ranks.shape == (L,))
                 and (bias is None or bias.shape == (N,))
                 and (out is None or (out.shape == (M, N) and x is not None and w is not None and x.shape[0] == M
                                      and w.shape == (N, x.shape[1])))
                 and (col_scale is None or (out is not None and col_scale.shape == (L, N))),
                 "decode_gemm", part=part, q=q, ids=ids, ranks=ranks, bias=bias, out=out, x=x, w=w, col_scale=col_scale)
    check_col_scale(col_scale, "decode_gemm")
    S = torch.empty((M, R), dtype=torch.float32, device=part.device) if write_s else None
    if M == 0 or (N == 0 and not write_s):
        return S
    grid, pointers, frozen, kwargs = _gemm_arguments(part, q, ids, ranks, x, w, out, bias, S, col_scale)
    launch(_decode_gemm_kernel, grid, *pointers, *frozen, **kwargs)
    return S


def _gemm_arguments(part, q, ids, ranks, x, w, out, bias, S, col_scale=None):
    """(grid, pointers, frozen, kwargs) of decode_gemm's launch, as _shrink_arguments."""
    split, M, R = part.shape
    L, N, _ = q.shape
    has_out = out is not None
    if not has_out:  # S alone: the base operands are never read
        x = w = out = part[0]
    K = x.shape[1]
    grid, even_k, cfg = _gemm_config(M, N, K, R, has_out, part.device)
    s = S if S is not None else part[0]
    g = col_scale if col_scale is not None else part[0]  # a stand-in the flag compiles away
    kwargs = dict(HAS_OUT=has_out, HAS_BIAS=bias is not None, HAS_RANKS=ranks is not None, WRITE_S=S is not None,
                  HAS_COL_SCALE=col_scale is not None, EVEN_K=even_k, DOT_DTYPE=dot_dtype(x.dtype, w.dtype),
                  PRECISION=dot_precision(x.dtype, w.dtype), **cfg)
    return (grid, (x, w, part, q, bias if bias is not None else part, out, s, ids, ranks if ranks is not None else ids,
                   g),
            (M, N, K, L, R, split, *x.stride(), *w.stride(), *part.stride(), *q.stride(), *out.stride(), *s.stride(),
             g.stride(0)),
            kwargs)


def decode_launcher(x, weight, lora_A, lora_B, scalings, ids, ranks, bias, out, col_scale=None, write_s=False):
    """decode_shrink then decode_gemm into out, fixed for every call whose tensors have these ones'
    shapes, strides, dtypes, devices and 16-byte alignment (the caller's cache key guarantees it):
    returns run(x, weight, lora_A, lora_B, scalings, ids, ranks, bias, out, col_scale=None), which
    allocates the partial sums (and, with write_s, S: (M, R) fp32, which it returns; else None) and makes
    both launches with the grids, strides and constexprs computed here. x: (M, K) with
    0 < M <= DECODE_MAX_ROWS, K > 0, L > 0; weight: (N, K); out: (M, N); col_scale: (L, N) fp32 (DoRA) or
    None, given to every call exactly when it was given here. Each call may pass, as x or out, any tensor
    whose data starts where such a 2-D view's does. The backward's dX and dU are the same two launches
    over (dY, Wᵀ, Bᵀ, Aᵀ), as fusedlora/plans/multi.py runs them."""
    M, K = x.shape
    L, R, _ = lora_A.shape
    check_shapes(0 < M <= DECODE_MAX_ROWS and K > 0 and L > 0 and lora_A.shape[2] == K and ids.shape == (M,)
                 and weight.shape == (lora_B.shape[1], K) and out.shape == (M, lora_B.shape[1])
                 and (col_scale is None or col_scale.shape == (L, lora_B.shape[1])),
                 "decode_launcher", x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, ids=ids, out=out,
                 col_scale=col_scale)
    _check_ids(ids, "decode_launcher")
    check_col_scale(col_scale, "decode_launcher")
    split = _shrink_config(M, K, R, x.device, torch.float32 in (x.dtype, lora_A.dtype))[0][1]
    part = torch.empty((split, M, R), dtype=torch.float32, device=x.device)  # for its strides
    grid, _, frozen, kwargs = _shrink_arguments(x, lora_A, scalings, ids, ranks, part)
    shrink = Bound(_decode_shrink_kernel, grid, frozen, kwargs)
    S = torch.empty((M, R), dtype=torch.float32, device=x.device) if write_s else None  # for its strides
    grid, _, frozen, kwargs = _gemm_arguments(part, lora_B, ids, ranks, x, weight, out, bias, S, col_scale)
    gemm = Bound(_decode_gemm_kernel, grid, frozen, kwargs)
    part_shape, s_shape, device = part.shape, (M, R), part.device

    def run(x, weight, lora_A, lora_B, scalings, ids, ranks, bias, out, col_scale=None):
        part = torch.empty(part_shape, dtype=torch.float32, device=device)
        S = torch.empty(s_shape, dtype=torch.float32, device=device) if write_s else None
        if ranks is None:
            ranks = ids
        shrink((x, lora_A, scalings, ids, ranks, part), ())
        gemm((x, weight, part, lora_B, bias if bias is not None else part, out, S if write_s else part, ids, ranks,
              col_scale if col_scale is not None else part), ())
        return S

    return run
