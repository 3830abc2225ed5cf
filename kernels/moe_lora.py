"""LoRA on the experts of a Mixture-of-Experts layer: grouped GEMMs over (token, expert) pairs.

The pairs of one layer call are sorted by segment once (fusedlora/core/moe_routing.py): sorted row i
holds pair p = order[i] (token t = p // k), of expert e and adapter a, segment c = e·(L + 1) + a + 1
(a = -1: no LoRA on that pair). Its input row is X_i = x[t] (gather: the gate_up projection reads the
tokens in place, no gathered copy) or x[i] (the down projection's input, already sorted). With
W: (E, N, K), A: (L, E, R, K), B: (L, E, N, R), scalings s_a and c_a = s_a / (1 - p):

    forward    S_i  = c_a · (keep_i ⊙ X_i)·A_{a,e}ᵀ            (P, R) fp32, sorted, saved for backward
               y_i  = X_i·W_eᵀ + b_e + S_i·B_{a,e}ᵀ            (P, N), sorted
    backward   dU_i = c_a · dY_i·B_{a,e}                         (P, R) fp32
               dX_i = dY_i·W_e + keep_i ⊙ (dU_i·A_{a,e})         one row per pair
               dA, dB, dW, db: sums over segments (kernels/moe_reduce.py)
keep_i is the dropout mask of the pair's row of the (P, K) input in routing order: Philox at (seed,
pair p, column k), never the sorted position, so it does not depend on the grouping.

One GEMM body serves every product (_moe_gemm_kernel), specialised by compile-time flags as
kernels/lora_gemm.py's: out_i (+)= X_i·W_eᵀ + b_e + keep ⊙ (U_i·Q_{a,e}ᵀ), where U is computed in the K
loop from the X tiles the base product loads (SHRINK: U = c_a·D(X)·P_{a,e}ᵀ, written out for backward)
or read from memory (EXPAND: written by _moe_shrink_kernel). Its uses (W, P, Q transposed by strides,
never copied):
- forward   X = x, W, P = A, Q = B, dropout on X           y (and S with SHRINK) in one launch
- dX        X = dY, Wᵀ, P = Bᵀ, Q = Aᵀ, dropout on the term  dX (and dU with SHRINK) in one launch
- split     no base product: out = addend + b_e + keep ⊙ (U·Qᵀ), the library grouped GEMM's output as
            the addend (y, or dX)
SHRINK recomputes U in every column block: the plans take it at decode sizes (fusedlora/plans/moe.py).

Tile schedule, on the device: a tile is BLOCK_M rows of one segment. Tile j belongs to the segment
where the running count of tiles Σ_c cdiv(len_c, BLOCK_M) passes j, found by every program from
seg_starts (a prefix sum in chunks of BLOCK_G segments); the grid is the bound P // BLOCK_M + 1 +
min(P, G) (each non-empty segment adds at most one partial tile) times the column blocks, and
programs past the work exit. The decode schedule (DECODE) gives each segment its own programs, one per
column block, looping over its rows: no search, and programs of segments without a pair exit at once.
Both grids depend on shapes only: no host sync, CUDA-graph friendly. Without adapter ids only the
segments c = e·(L + 1) + 1 can hold pairs, so the G = E groups step over the others.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import configs
from .common import cdiv, check_shapes, dot_dtype, dot_precision
from .dropout import SEED_ARGS, keep_mask_tile, seed_words
from .launch import Bound, launch
from .lora_gemm import grouped_pid

SHRINK_MAX_R = configs.SHRINK_MAX_R


class Groups(NamedTuple):
    """The grouping the kernels read, from an ExpertRouting: order (P,) int64, starts (E·(L+1)+1,) int32,
    E experts, L adapters, top_k, and mixed (adapter ids given: every segment may hold pairs)."""
    order: torch.Tensor
    starts: torch.Tensor
    experts: int
    adapters: int
    top_k: int
    mixed: bool

    @property
    def pairs(self) -> int:
        return self.order.shape[0]

    def schedule(self) -> tuple:
        """(G, step, offset): group g of the schedule is segment g·step + offset."""
        if self.mixed:
            return self.experts * (self.adapters + 1), 1, 0
        return self.experts, self.adapters + 1, 1


@triton.jit
def segment_tile(starts_ptr, tile, G, seg_step, seg_off, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """(group g, first sorted row, end of its segment) of tile `tile`; the first row is at or past the
    end when the tile is past the work. With last_g the tiles of groups 0..g (nondecreasing in g), the
    tile belongs to the first group whose last_g passes it: g is the number of groups with last_g <= tile,
    and the tiles before it are the largest such last_g."""
    offs = tl.arange(0, BLOCK_G)
    group = 0
    before = 0
    running = 0
    for g0 in range(0, G, BLOCK_G):
        g_ok = g0 + offs < G
        c = (g0 + offs) * seg_step + seg_off
        lo = tl.load(starts_ptr + c, mask=g_ok, other=0)
        hi = tl.load(starts_ptr + c + 1, mask=g_ok, other=0)
        last = tl.cumsum((hi - lo + BLOCK_M - 1) // BLOCK_M, 0) + running
        done = g_ok & (last <= tile)
        group += tl.sum(done.to(tl.int32), 0)
        before = tl.maximum(before, tl.max(tl.where(done, last, 0), 0))
        running = tl.max(last, 0)  # groups past G count no tiles
    seg = group * seg_step + seg_off
    inside = group < G
    start = tl.load(starts_ptr + seg, mask=inside, other=0)
    end = tl.load(starts_ptr + seg + 1, mask=inside, other=0)
    return group, tl.where(inside, start + (tile - before) * BLOCK_M, end), end


@triton.jit
def segment_rank(ranks_ptr, adapter, R, HAS_RANKS: tl.constexpr):
    """The rank of adapter a (clamped to R; R for all without ranks), 0 for a = -1 (no LoRA)."""
    if HAS_RANKS:
        rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(adapter, 0)).to(tl.int32), R)
    else:
        rank = R
    return tl.where(adapter >= 0, rank, 0)


@triton.jit
def segment_scale(scales_ptr, adapter, scale, HAS_SCALES: tl.constexpr):
    """c_a: the scalar times adapter a's own scaling when they come as a tensor."""
    if HAS_SCALES:
        return scale * tl.load(scales_ptr + tl.maximum(adapter, 0)).to(tl.float32)
    return scale


@triton.jit(do_not_specialize=SEED_ARGS)
def _moe_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, qa_ptr, qb_ptr, u_ptr, c_ptr, out_ptr, order_ptr, starts_ptr, ranks_ptr, scales_ptr,
    M, N, K, R, L, TOPK, G, seg_step, seg_off,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_be, stride_bn,
    stride_qal, stride_qae, stride_qar, stride_qak, stride_qbl, stride_qbe, stride_qbn, stride_qbr,
    stride_um, stride_ur, stride_cm, stride_cn, stride_om, stride_on,
    scale, seed_lo, seed_hi, threshold,
    DECODE: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, HAS_BASE: tl.constexpr,
    HAS_BIAS: tl.constexpr, SHRINK: tl.constexpr, STORE_U: tl.constexpr, EXPAND: tl.constexpr,
    HAS_ADDEND: tl.constexpr, DROP_X: tl.constexpr, DROP_OUT: tl.constexpr, HAS_RANKS: tl.constexpr,
    HAS_SCALES: tl.constexpr, EVEN_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    SHRINK_DTYPE: tl.constexpr, SHRINK_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Rows: sorted positions i; X's row is pair // TOPK (GATHER) or i; out's row is the pair (SCATTER:
    # dX in routing order, summed over each token's pairs by the caller) or i. U (SHRINK: written when
    # STORE_U, by the first column block; EXPAND: read) is (M, R) fp32 in sorted order.
    if DECODE:
        n_blocks = tl.maximum(tl.cdiv(N, BLOCK_N), 1)  # one at N = 0: the first column block writes U
        group = tl.program_id(0) // n_blocks
        pid_n = tl.program_id(0) % n_blocks
        seg = group * seg_step + seg_off
        first = tl.load(starts_ptr + seg)
        end = tl.load(starts_ptr + seg + 1)
        last = end
    else:
        pid_m, pid_n = grouped_pid((M // BLOCK_M + 1 + tl.minimum(G, M)) * BLOCK_M, tl.maximum(N, 1), BLOCK_M,
                                   BLOCK_N, GROUP_M)
        group, first, end = segment_tile(starts_ptr, pid_m, G, seg_step, seg_off, BLOCK_M, BLOCK_G)
        seg = group * seg_step + seg_off
        last = tl.minimum(first + 1, end)  # one tile: one pass of the loop below, none past the work
    expert = (seg // (L + 1)).to(tl.int64)
    adapter = seg % (L + 1) - 1
    a_idx = tl.maximum(adapter, 0).to(tl.int64)
    rank = segment_rank(ranks_ptr, adapter, R, HAS_RANKS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    cols = offs_n.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert * stride_we
    qa_base = qa_ptr + a_idx * stride_qal + expert * stride_qae
    qb_base = qb_ptr + a_idx * stride_qbl + expert * stride_qbe
    for row0 in range(first, last, BLOCK_M):
        offs_i = row0 + tl.arange(0, BLOCK_M)
        i_ok = offs_i < end
        sorted_rows = offs_i.to(tl.int64)
        pairs = tl.load(order_ptr + offs_i, mask=i_ok, other=0).to(tl.int32)
        x_rows = (pairs // TOPK).to(tl.int64) if GATHER else sorted_rows
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if EXPAND:
            # U read back, over the segment's rank only (rank 0: no LoRA, nothing read), before the base
            # product: masked here, it then seeds the base product's accumulator, so that no second
            # BLOCK_M x BLOCK_N accumulator is held beside it (with one, the masked dX spilled 232-288
            # bytes a thread for sm_90 at 128x128x64 tiles, triton 3.9).
            u_ptrs = u_ptr + sorted_rows[:, None] * stride_um + offs_r[None, :].to(tl.int64) * stride_ur
            qb_ptrs = qb_base + offs_r[:, None].to(tl.int64) * stride_qbr + cols[None, :] * stride_qbn
            for r0 in range(0, rank, BLOCK_R):
                in_rank = offs_r < rank - r0
                ut = tl.load(u_ptrs, mask=i_ok[:, None] & in_rank[None, :], other=0.0)
                qt = tl.load(qb_ptrs, mask=in_rank[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(ut, qt.to(tl.float32), acc, input_precision=LORA_PRECISION)
                u_ptrs += BLOCK_R * stride_ur
                qb_ptrs += BLOCK_R * stride_qbr
            if DROP_OUT:
                acc = tl.where(keep_mask_tile(seed_lo, seed_hi, pairs, pid_n * BLOCK_N, threshold, BLOCK_N), acc, 0.0)
        if SHRINK:
            # X·W_eᵀ and U = c_a·D(X)·P_{a,e}ᵀ from the same X tiles: one pass over X, one launch.
            x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
            w_ptrs = w_base + offs_k[:, None].to(tl.int64) * stride_wk + cols[None, :] * stride_wn
            qa_ptrs = qa_base + offs_k[:, None].to(tl.int64) * stride_qak + offs_r[None, :].to(tl.int64) * stride_qar
            u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = (offs_k < K - k0) | EVEN_K
                xt = tl.load(x_ptrs, mask=i_ok[:, None] & k_ok[None, :], other=0.0)
                if HAS_BASE:
                    wt = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                    acc = tl.dot(xt.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION)
                if DROP_X:
                    xt = tl.where(keep_mask_tile(seed_lo, seed_hi, pairs, k0, threshold, BLOCK_K), xt, 0.0)
                qt = tl.load(qa_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                u = tl.dot(xt.to(SHRINK_DTYPE), qt.to(SHRINK_DTYPE), u, input_precision=SHRINK_PRECISION)
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K * stride_wk
                qa_ptrs += BLOCK_K * stride_qak
            u = u * segment_scale(scales_ptr, adapter, scale, HAS_SCALES)
            if STORE_U and pid_n == 0:  # zeros past the rank and on rows without an adapter
                tl.store(u_ptr + sorted_rows[:, None] * stride_um + offs_r[None, :].to(tl.int64) * stride_ur, u,
                         mask=i_ok[:, None] & (offs_r < R)[None, :])
            qt = tl.load(qb_base + offs_r[:, None].to(tl.int64) * stride_qbr + cols[None, :] * stride_qbn,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            low_rank = tl.dot(u, qt.to(tl.float32), input_precision=LORA_PRECISION)
            if DROP_OUT:
                low_rank = tl.where(keep_mask_tile(seed_lo, seed_hi, pairs, pid_n * BLOCK_N, threshold, BLOCK_N),
                                    low_rank, 0.0)
            acc += low_rank
        elif HAS_BASE:
            x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
            w_ptrs = w_base + offs_k[:, None].to(tl.int64) * stride_wk + cols[None, :] * stride_wn
            for k0 in range(0, K, BLOCK_K):
                if EVEN_K:
                    xt = tl.load(x_ptrs, mask=i_ok[:, None], other=0.0)
                    wt = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
                else:
                    k_ok = offs_k < K - k0
                    xt = tl.load(x_ptrs, mask=i_ok[:, None] & k_ok[None, :], other=0.0)
                    wt = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(xt.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=PRECISION)
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            bias = tl.load(bias_ptr + expert * stride_be + cols * stride_bn, mask=n_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        out_mask = i_ok[:, None] & n_ok[None, :]
        if HAS_ADDEND:  # the library grouped GEMM's product, in sorted order; it may be out itself
            acc += tl.load(c_ptr + sorted_rows[:, None] * stride_cm + cols[None, :] * stride_cn, mask=out_mask,
                           other=0.0).to(tl.float32)
        out_rows = pairs.to(tl.int64) if SCATTER else offs_i.to(tl.int64)
        tl.store(out_ptr + out_rows[:, None] * stride_om + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=SEED_ARGS)
def _moe_shrink_kernel(
    x_ptr, q_ptr, out_ptr, order_ptr, starts_ptr, ranks_ptr, scales_ptr,
    M, C, R, L, TOPK, G, seg_step, seg_off,
    stride_xm, stride_xc, stride_ql, stride_qe, stride_qr, stride_qc, stride_om, stride_or,
    scale, seed_lo, seed_hi, threshold,
    GATHER: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_RANKS: tl.constexpr, HAS_SCALES: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    # out_i = c_a·D(X_i)·Q_{a,e}ᵀ over the tile's rows and one rank block; zeros past the rank and on
    # rows without an adapter (U is an output: never leftover memory).
    group, row0, end = segment_tile(starts_ptr, tl.program_id(0), G, seg_step, seg_off, BLOCK_M, BLOCK_G)
    if row0 < end:
        seg = group * seg_step + seg_off
        expert = (seg // (L + 1)).to(tl.int64)
        adapter = seg % (L + 1) - 1
        rank = segment_rank(ranks_ptr, adapter, R, HAS_RANKS)
        offs_i = row0 + tl.arange(0, BLOCK_M)
        i_ok = offs_i < end
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if tl.program_id(1) * BLOCK_R < rank:
            pairs = tl.load(order_ptr + offs_i, mask=i_ok, other=0).to(tl.int32)
            x_rows = (pairs // TOPK).to(tl.int64) if GATHER else offs_i.to(tl.int64)
            offs_c = tl.arange(0, BLOCK_C)
            x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_c[None, :].to(tl.int64) * stride_xc
            q_ptrs = (q_ptr + tl.maximum(adapter, 0).to(tl.int64) * stride_ql + expert * stride_qe
                      + offs_c[:, None].to(tl.int64) * stride_qc + offs_r[None, :].to(tl.int64) * stride_qr)
            for c0 in range(0, C, BLOCK_C):
                c_ok = offs_c < C - c0
                xt = tl.load(x_ptrs, mask=i_ok[:, None] & c_ok[None, :], other=0.0)
                if HAS_DROPOUT:
                    xt = tl.where(keep_mask_tile(seed_lo, seed_hi, pairs, c0, threshold, BLOCK_C), xt, 0.0)
                qt = tl.load(q_ptrs, mask=c_ok[:, None] & r_ok[None, :], other=0.0)
                acc = tl.dot(xt.to(DOT_DTYPE), qt.to(DOT_DTYPE), acc, input_precision=PRECISION)
                x_ptrs += BLOCK_C * stride_xc
                q_ptrs += BLOCK_C * stride_qc
            acc = acc * segment_scale(scales_ptr, adapter, scale, HAS_SCALES)
        tl.store(out_ptr + offs_i[:, None].to(tl.int64) * stride_om + offs_r[None, :].to(tl.int64) * stride_or, acc,
                 mask=i_ok[:, None] & (offs_r < R)[None, :])


def _tile_grid(groups: Groups, block_m: int) -> int:
    """Row tiles to launch: P // BLOCK_M + 1 + min(P, G) bounds the tiles of any grouping (each non-empty
    segment adds at most one partial tile). Must match the kernel's own bound."""
    G = groups.schedule()[0]
    return groups.pairs // block_m + 1 + min(G, groups.pairs)


def _scales(scales, dummy):
    return (scales, True) if scales is not None else (dummy, False)


def _check_groups(groups: Groups, launcher: str) -> None:
    P = groups.pairs
    if P >= 2**31 or groups.order.dim() != 1 or groups.order.stride(0) != 1:
        raise ValueError(f"{launcher}: order must be 1-D, contiguous, with fewer than 2^31 pairs "
                         f"(the dropout counter is a 32-bit pair index), got shape {tuple(groups.order.shape)}")
    C = groups.experts * (groups.adapters + 1)
    check_shapes(groups.starts.shape == (C + 1,) and groups.starts.dtype == torch.int32, launcher,
                 order=groups.order, starts=groups.starts)


def _gemm_arguments(x, weight, bias, qa, qb, groups: Groups, out, u, addend, shrink, store_u, scales, ranks,
                    drop_x, drop_out, gather, scatter, decode):
    """(grid, pointers, frozen, kwargs) of one _moe_gemm_kernel launch: its tensors, then its shapes and
    strides, then its constexprs and options. The per-call scalars (scale, seed words, threshold) follow
    and are not included."""
    _check_groups(groups, "moe_gemm")
    E, L, P = groups.experts, groups.adapters, groups.pairs
    N = out.shape[1]
    has_base, has_lora = weight is not None, shrink or u is not None
    C = (x.shape[1] if has_base or shrink else 0)
    R = qb.shape[3] if has_lora else 0
    check_shapes(out.shape[0] == P and (not has_base or weight.shape == (E, N, C))
                 and (not (has_base or shrink) or gather or x.shape[0] == P)
                 and (bias is None or bias.shape == (E, N)) and (addend is None or addend.shape == (P, N))
                 and (not has_lora or (qb.shape == (L, E, N, R) and (u is None or u.shape == (P, R))))
                 and (not shrink or (qa.shape == (L, E, R, C) and R <= SHRINK_MAX_R and (u is not None or not store_u)))
                 and (scales is None or scales.shape == (L,)) and (ranks is None or ranks.shape == (L,)),
                 "moe_gemm", x=x, weight=weight, bias=bias, qa=qa, qb=qb, u=u, addend=addend, out=out)
    G, step, offset = groups.schedule()
    wide = shrink and torch.float32 in (x.dtype, qa.dtype)
    cfg = dict(configs.moe_decode(P, N, out.device, wide) if decode
               else configs.moe_gemm(P, N, G, shrink, out.device, wide, has_base))
    block_g = min(triton.next_power_of_2(G), cfg.pop("SEGMENT_CHUNK"))
    rank_cap = cfg.pop("RANK_CAP")
    n_blocks = max(1, cdiv(N, cfg["BLOCK_N"]))  # at least one: the first column block writes U
    grid = ((G if decode else _tile_grid(groups, cfg["BLOCK_M"])) * n_blocks,)
    # Pointers a variant does not use still need a tensor; its flag compiles them away.
    dummy = out
    x_ = x if has_base or shrink else dummy
    w_ = weight if has_base else dummy
    ranks_, has_ranks = (ranks, True) if ranks is not None else (groups.starts, False)
    scales_, has_scales = _scales(scales, groups.starts)
    pointers = (x_, w_, bias if bias is not None else dummy, qa if shrink else dummy, qb if has_lora else dummy,
                u if u is not None else dummy, addend if addend is not None else dummy, out, groups.order,
                groups.starts, ranks_, scales_)
    frozen = (P, N, C, R, L, groups.top_k, G, step, offset, *x_.stride(), *(w_.stride() if has_base else (0, 0, 0)),
              *(bias.stride() if bias is not None else (0, 0)), *(qa.stride() if shrink else (0, 0, 0, 0)),
              *(qb.stride() if has_lora else (0, 0, 0, 0)), *(u.stride() if u is not None else (0, 0)),
              *(addend.stride() if addend is not None else (0, 0)), *out.stride())
    x_dtype = x_.dtype
    kwargs = dict(
        DECODE=decode, GATHER=gather, SCATTER=scatter, HAS_BASE=has_base, HAS_BIAS=bias is not None, SHRINK=shrink,
        STORE_U=shrink and store_u, EXPAND=has_lora and not shrink, HAS_ADDEND=addend is not None,
        DROP_X=shrink and drop_x, DROP_OUT=has_lora and drop_out, HAS_RANKS=has_ranks, HAS_SCALES=has_scales,
        EVEN_K=C % cfg["BLOCK_K"] == 0, DOT_DTYPE=dot_dtype(x_dtype, w_.dtype) if has_base else tl.float32,
        PRECISION=dot_precision(x_dtype, w_.dtype) if has_base else "ieee",
        SHRINK_DTYPE=dot_dtype(x_dtype, qa.dtype) if shrink else tl.float32,
        SHRINK_PRECISION=dot_precision(x_dtype, qa.dtype, low_rank=True) if shrink else "ieee",
        LORA_PRECISION=dot_precision(out.dtype, torch.float32, low_rank=True),
        BLOCK_R=configs.rank_block(R, SHRINK_MAX_R if shrink else rank_cap) if has_lora else 16,
        BLOCK_G=block_g, **cfg)
    return grid, pointers, frozen, kwargs


def moe_gemm(x, weight, bias, qa, qb, groups: Groups, out, *, u=None, addend=None, shrink=False, store_u=False,
             scale=1.0, scales=None, ranks=None, seed=0, threshold=0, drop_x=False, drop_out=False,
             gather=False, scatter=False, decode=False):
    """out_i (+)= X_i·W_eᵀ + b_e + keep ⊙ (U_i·Q_{a,e}ᵀ) + addend_i over the sorted rows i -> out.

    x: (T, C) with gather (row i reads x[order[i] // top_k]) or (P, C) sorted, or None (no base product);
    weight: (E, N, C) or None; bias: (E, N) or None; qa: (L, E, R, C) (shrink's P), qb: (L, E, N, R) (the
    expand's Q), any strides. shrink=True: U = scale·s_a·D(X)·qaᵀ in the K loop (R <= SHRINK_MAX_R),
    written into u: (P, R) fp32 when store_u; otherwise U is read from u (None: no low-rank term).
    addend: (P, N) sorted, may be out. out: (P, N), sorted, or in routing order with scatter.
    drop_x masks X in the shrink, drop_out the low-rank term (keep of (seed, threshold) at (pair, column)).
    scales: (L,) float tensor or None; ranks: (L,) integer or None (R). decode: the decode schedule.
    Callers validate user input; these checks guard memory only."""
    grid, pointers, frozen, kwargs = _gemm_arguments(x, weight, bias, qa, qb, groups, out, u, addend, shrink, store_u,
                                                     scales, ranks, drop_x, drop_out, gather, scatter, decode)
    if groups.pairs == 0:
        return out
    launch(_moe_gemm_kernel, grid, *pointers, *frozen, float(scale), *seed_words(seed), threshold, **kwargs)
    return out


def gemm_launcher(x, weight, bias, qa, qb, groups: Groups, out, *, u=None, addend=None, shrink=False, store_u=False,
                  scales=None, ranks=None, drop_x=False, drop_out=False, gather=False, scatter=False, decode=False):
    """moe_gemm's launch fixed for every call whose tensors (the routing's included) have these ones' shapes,
    strides, dtypes, devices and 16-byte alignment, and whose groups have these counts (the caller's cache
    key guarantees it): returns run(x, weight, bias, qa, qb, groups, out, scale, seed, threshold, u=None,
    addend=None, scales=None, ranks=None), which launches with the grid, strides and constexprs computed
    here; the tensors given as None here must be None there. Needs at least one pair."""
    grid, _, frozen, kwargs = _gemm_arguments(x, weight, bias, qa, qb, groups, out, u, addend, shrink, store_u, scales,
                                              ranks, drop_x, drop_out, gather, scatter, decode)
    check_shapes(groups.pairs > 0, "gemm_launcher", order=groups.order)
    bound = Bound(_moe_gemm_kernel, grid, frozen, kwargs)

    def run(x, weight, bias, qa, qb, groups, out, scale, seed, threshold, u=None, addend=None, scales=None, ranks=None):
        dummy = out
        bound((x if x is not None else dummy, weight if weight is not None else dummy,
               bias if bias is not None else dummy, qa if qa is not None else dummy, qb if qb is not None else dummy,
               u if u is not None else dummy, addend if addend is not None else dummy, out, groups.order,
               groups.starts, ranks if ranks is not None else groups.starts,
               scales if scales is not None else groups.starts),
              (float(scale), 0, 0, threshold) if seed == 0 else (float(scale), *seed_words(seed), threshold))

    return run


def moe_shrink(x, q, groups: Groups, scale=1.0, scales=None, ranks=None, seed=0, threshold=0, dropout=False,
               gather=False):
    """U_i = scale·s_a·(keep ⊙ X_i)·Q_{a,e}ᵀ -> (P, R) fp32 in sorted order, zero past each rank and on rows
    without an adapter. x: (T, C) with gather, else (P, C) sorted; q: (L, E, R, C) any strides."""
    _check_groups(groups, "moe_shrink")
    E, L, P = groups.experts, groups.adapters, groups.pairs
    C = x.shape[1]
    R = q.shape[2]
    check_shapes(q.shape == (L, E, R, C) and (gather or x.shape[0] == P) and (scales is None or scales.shape == (L,))
                 and (ranks is None or ranks.shape == (L,)), "moe_shrink", x=x, q=q, scales=scales, ranks=ranks)
    out = torch.empty((P, R), dtype=torch.float32, device=x.device)
    if P == 0 or R == 0:
        return out
    cfg = dict(configs.moe_shrink(P, R, x.device, torch.float32 in (x.dtype, q.dtype)))
    G, step, offset = groups.schedule()
    block_g = min(triton.next_power_of_2(G), cfg.pop("SEGMENT_CHUNK"))
    grid = (_tile_grid(groups, cfg["BLOCK_M"]), cdiv(R, cfg["BLOCK_R"]))
    ranks_, has_ranks = (ranks, True) if ranks is not None else (groups.starts, False)
    scales_, has_scales = _scales(scales, groups.starts)
    launch(
        _moe_shrink_kernel, grid,
        x, q, out, groups.order, groups.starts, ranks_, scales_,
        P, C, R, L, groups.top_k, G, step, offset,
        *x.stride(), *q.stride(), *out.stride(),
        float(scale), *seed_words(seed), threshold,
        GATHER=gather, HAS_DROPOUT=dropout, HAS_RANKS=has_ranks, HAS_SCALES=has_scales,
        DOT_DTYPE=dot_dtype(x.dtype, q.dtype), PRECISION=dot_precision(x.dtype, q.dtype, low_rank=True),
        BLOCK_G=block_g, **cfg,
    )
    return out
