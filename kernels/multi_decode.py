"""Multi-adapter LoRA for small batches (decode): per-row adapter lookup, no sort.

With L adapters stacked as Q: (L, R, C) for the shrink and P: (L, N, R) for the expand, scalings s,
ranks r_l <= R and ids: (M,) in [-1, L), for M <= DECODE_MAX_ROWS rows:

    shrink   S[m] = s_l · X[m]·Q_l[:r_l]ᵀ      (M, R) fp32, l = ids[m]      S (X=x, Q=A), dU (X=dY, Q=Bᵀ)
    expand   out[m] = b + S[m]·P_l[:, :r_l]ᵀ                                y's (P=B) and dX's (P=Aᵀ) low-rank term

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
from .common import cdiv, check_shapes, dot_dtype, dot_precision
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
def _decode_expand_kernel(
    part_ptr, q_ptr, bias_ptr, out_ptr, s_ptr, ids_ptr, ranks_ptr,
    M, N, L, R, SPLIT,
    stride_ps, stride_pm, stride_pr, stride_ql, stride_qn, stride_qr, stride_om, stride_on, stride_sm, stride_sr,
    HAS_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr,
    WRITE_S: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    i = tl.program_id(0)
    pid_n = tl.program_id(1)
    mine, first = _leader(ids_ptr, M, BLOCK_IDS)
    valid = (mine >= 0) & (mine < L)
    if first | (mine < 0) | (mine >= L):
        adapter = tl.where(valid, mine, 0).to(tl.int64)
        if HAS_RANKS:
            rank = tl.minimum(tl.load(ranks_ptr + adapter, mask=valid, other=0).to(tl.int32), R)
        else:
            rank = R
        rank = tl.where(valid, rank, 0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        cols = offs_n.to(tl.int64)
        # Rows in chunks of BLOCK_M (registers stay bounded at M = 64); chunks without this program's
        # rows are skipped.
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_in = offs_m < M
            ids = tl.load(ids_ptr + offs_m, mask=m_in, other=-1)
            rows = m_in & tl.where(valid, ids == mine, offs_m == i)
            if tl.max(rows.to(tl.int32), axis=0) > 0:
                if WRITE_S:
                    if pid_n == 0:  # S in token order, every column: zero past the rank and on adapterless rows
                        for r0 in range(0, R, BLOCK_R):
                            offs_r = r0 + tl.arange(0, BLOCK_R)
                            s_tile = _sum_parts(part_ptr, offs_m, offs_r, rows[:, None] & (offs_r < rank)[None, :],
                                                SPLIT, stride_ps, stride_pm, stride_pr, BLOCK_M, BLOCK_R)
                            tl.store(s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :] * stride_sr,
                                     s_tile, mask=rows[:, None] & (offs_r < R)[None, :])
                if HAS_OUT:
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    for r0 in range(0, rank, BLOCK_R):
                        offs_r = r0 + tl.arange(0, BLOCK_R)
                        r_ok = offs_r < rank
                        p = _sum_parts(part_ptr, offs_m, offs_r, rows[:, None] & r_ok[None, :],
                                       SPLIT, stride_ps, stride_pm, stride_pr, BLOCK_M, BLOCK_R)
                        q = tl.load(q_ptr + adapter * stride_ql + offs_r[:, None].to(tl.int64) * stride_qr
                                    + cols[None, :] * stride_qn, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                        acc = tl.dot(p, q.to(tl.float32), acc, input_precision=PRECISION)
                    bad = (mine < -1) | (mine >= L)
                    acc = tl.where(bad, float("nan"), acc)
                    if HAS_BIAS:
                        acc += tl.load(bias_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on,
                             acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] & n_ok[None, :])


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
def _expand_config(M: int, N: int, R: int, has_out: bool, device) -> tuple:
    """(grid, BLOCK_IDS, config)."""
    cfg = configs.decode_expand(M, R, device)
    return (M, max(1, cdiv(N, cfg["BLOCK_N"])) if has_out else 1), _block_ids(M), cfg


def decode_shrink(x, q, scalings, ids, ranks):
    """Partial sums P: (SPLIT, M, R) fp32 of S[m] = s_l · x[m]·Q_lᵀ over SPLIT slices of C, to be
    added by decode_expand. x: (M, C); q: (L, R, C) any strides; scalings: (L,); ids: (M,) integer,
    contiguous; ranks: (L,) integer or None. Entries of rows without an adapter, and past each rank,
    are left unwritten: decode_expand never reads them."""
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


def decode_expand(part, q, ids, ranks, out=None, bias=None, write_s=False):
    """out = bias + S·Q_lᵀ, written into out: (M, N) (any strides and float dtype; None: not
    computed), and S: (M, R) fp32 returned with write_s (else None), with S = Σ_s part[s] (decode_shrink's
    partial sums, added in a fixed order).

    q: (L, N, R) any strides; ids: (M,) integer, contiguous; ranks: (L,) integer or None; bias: (N,)
    or None. Rows with id -1 get the bias alone, rows with an id outside [-1, L) NaN; a library GEMM
    then adds x·Wᵀ (dY·W). S is zero past each rank and on rows without an adapter."""
    split, M, R = part.shape
    L, N, R_q = q.shape
    _check_ids(ids, "decode_expand")
    check_shapes(R == R_q and ids.shape == (M,) and (ranks is None or ranks.shape == (L,))
                 and (bias is None or bias.shape == (N,)) and (out is None or out.shape == (M, N)),
                 "decode_expand", part=part, q=q, ids=ids, ranks=ranks, bias=bias, out=out)
    S = torch.empty((M, R), dtype=torch.float32, device=part.device) if write_s else None
    if M == 0 or (N == 0 and not write_s):
        return S
    grid, pointers, frozen, kwargs = _expand_arguments(part, q, ids, ranks, out, bias, S)
    launch(_decode_expand_kernel, grid, *pointers, *frozen, **kwargs)
    return S


def _expand_arguments(part, q, ids, ranks, out, bias, S):
    """(grid, pointers, frozen, kwargs) of decode_expand's launch, as _shrink_arguments."""
    split, M, R = part.shape
    L, N, _ = q.shape
    grid, block_ids, cfg = _expand_config(M, N, R, out is not None, part.device)
    o, s = (t if t is not None else part for t in (out, S))
    kwargs = dict(HAS_OUT=out is not None, HAS_BIAS=bias is not None, HAS_RANKS=ranks is not None,
                  WRITE_S=S is not None, PRECISION=dot_precision(o.dtype, torch.float32, low_rank=True),
                  BLOCK_IDS=block_ids, **cfg)
    return (grid, (part, q, bias if bias is not None else part, o, s, ids, ranks if ranks is not None else ids),
            (M, N, L, R, split, *part.stride(), *q.stride(), o.stride(0), o.stride(1), s.stride(0), s.stride(1)),
            kwargs)


def decode_launcher(x, lora_A, lora_B, scalings, ids, ranks, bias, out):
    """decode_shrink then decode_expand into out (no S), fixed for every call whose tensors have these
    ones' shapes, strides, dtypes, devices and 16-byte alignment (the caller's cache key guarantees
    it): returns run(x, lora_A, lora_B, scalings, ids, ranks, bias, out), which allocates the partial
    sums and makes both launches with the grids, strides and constexprs computed here. x: (M, K) with
    0 < M <= DECODE_MAX_ROWS, K > 0, L > 0; out: (M, N). Each call may pass, as x or out, any tensor
    whose data starts where such a 2-D view's does."""
    M, K = x.shape
    L, R, _ = lora_A.shape
    check_shapes(0 < M <= DECODE_MAX_ROWS and K > 0 and L > 0 and lora_A.shape[2] == K and ids.shape == (M,)
                 and out.shape == (M, lora_B.shape[1]), "decode_launcher", x=x, lora_A=lora_A, lora_B=lora_B,
                 ids=ids, out=out)
    _check_ids(ids, "decode_launcher")
    split = _shrink_config(M, K, R, x.device, torch.float32 in (x.dtype, lora_A.dtype))[0][1]
    part = torch.empty((split, M, R), dtype=torch.float32, device=x.device)  # for its strides
    grid, _, frozen, kwargs = _shrink_arguments(x, lora_A, scalings, ids, ranks, part)
    shrink = Bound(_decode_shrink_kernel, grid, frozen, kwargs)
    grid, _, frozen, kwargs = _expand_arguments(part, lora_B, ids, ranks, out, bias, None)
    expand = Bound(_decode_expand_kernel, grid, frozen, kwargs)
    part_shape, device = part.shape, part.device

    def run(x, lora_A, lora_B, scalings, ids, ranks, bias, out):
        part = torch.empty(part_shape, dtype=torch.float32, device=device)
        if ranks is None:
            ranks = ids
        shrink((x, lora_A, scalings, ids, ranks, part), ())
        expand((part, lora_B, bias if bias is not None else part, out, part, ids, ranks), ())

    return run
