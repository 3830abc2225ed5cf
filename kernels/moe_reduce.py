"""The MoE LoRA layer's weight gradients: sums over the sorted rows of each segment or expert.

With the pairs sorted by segment (kernels/moe_lora.py: sorted row i, pair order[i], expert e, adapter
a, input row X_i), dY: (P, N), S and dU: (P, R) fp32, all in sorted order:

    dA_{a,e} = Σ_{i∈(e,a)} dU_iᵀ·(keep_i ⊙ X_i)     (R, K)    Y = dU, Z = X gathered, mask at (pair, k)
    dB_{a,e} = Σ_{i∈(e,a)} dY_iᵀ·S_i                 (N, R)    Y = dY, Z = S
    dW_e     = Σ_{i∈e} dY_iᵀ·X_i                     (N, K)    Y = dY, Z = X gathered, over every adapter
    db_e     = Σ_{i∈e} dY_i                          (N,)      Y = dY, no Z

_moe_reduce_kernel computes out_g[a, b] = Σ_{i∈g} Y[i, a]·Z[i, b] for one group g (a segment (e, a ≥ 0),
or an expert), one block of a and one of b per program, looping over the group's rows in a fixed
order: deterministic, no atomics, every output written once (zero for a group without rows). The
(1 - p) and the scalings are in dU and S already; rows past an adapter's rank are zero in both, so
its gradients are zero there.
"""
import triton
import triton.language as tl

from . import configs
from .common import cdiv, check_shapes, dot_dtype, dot_precision
from .dropout import SEED_ARGS, keep_mask_tile, seed_words
from .launch import launch
from .moe_lora import Groups, _check_groups


@triton.jit(do_not_specialize=SEED_ARGS)
def _moe_reduce_kernel(
    y_ptr, z_ptr, out_ptr, order_ptr, starts_ptr,
    A, B, L, TOPK,
    stride_ym, stride_ya, stride_zm, stride_zb, stride_ol, stride_oe, stride_oa, stride_ob,
    seed_lo, seed_hi, threshold,
    PER_EXPERT: tl.constexpr, HAS_Z: tl.constexpr, GATHER_Z: tl.constexpr, DROP_Z: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    g = tl.program_id(1)
    if PER_EXPERT:  # every adapter's rows of expert g, a = -1 included
        expert = g
        lo = tl.load(starts_ptr + g * (L + 1))
        hi = tl.load(starts_ptr + (g + 1) * (L + 1))
    else:
        expert = g // L
        adapter = g % L
        seg = expert * (L + 1) + adapter + 1
        lo = tl.load(starts_ptr + seg)
        hi = tl.load(starts_ptr + seg + 1)
    offs_a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    b0 = tl.program_id(2) * BLOCK_B
    offs_b = b0 + tl.arange(0, BLOCK_B)
    a_ok = offs_a < A
    b_ok = offs_b < B
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < hi
        yt = tl.load(y_ptr + offs_t[None, :].to(tl.int64) * stride_ym + offs_a[:, None].to(tl.int64) * stride_ya,
                     mask=a_ok[:, None] & t_ok[None, :], other=0.0)
        if HAS_Z:
            pairs = tl.load(order_ptr + offs_t, mask=t_ok, other=0).to(tl.int32)
            z_rows = (pairs // TOPK).to(tl.int64) if GATHER_Z else offs_t.to(tl.int64)
            zt = tl.load(z_ptr + z_rows[:, None] * stride_zm + offs_b[None, :].to(tl.int64) * stride_zb,
                         mask=t_ok[:, None] & b_ok[None, :], other=0.0)
            if DROP_Z:
                zt = tl.where(keep_mask_tile(seed_lo, seed_hi, pairs, b0, threshold, BLOCK_B), zt, 0.0)
            acc = tl.dot(yt.to(DOT_DTYPE), zt.to(DOT_DTYPE), acc, input_precision=PRECISION)
        else:
            acc += tl.sum(yt.to(tl.float32), axis=1)[:, None]
    out_ptrs = (out_ptr + expert.to(tl.int64) * stride_oe + offs_a[:, None].to(tl.int64) * stride_oa
                + offs_b[None, :].to(tl.int64) * stride_ob)
    if not PER_EXPERT:
        out_ptrs += adapter.to(tl.int64) * stride_ol
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=a_ok[:, None] & b_ok[None, :])


def moe_reduce(y, z, groups: Groups, out, per_expert=False, gather_z=False, seed=0, threshold=0, dropout=False,
               low_rank=True):
    """out[g][a, b] = Σ_{i in group g} y[i, a]·Z_i[b] -> out, for every group g in a fixed order.

    y: (P, A) sorted; z: (P, B) sorted, (T, B) with gather_z (row i reads z[order[i] // top_k]), or None
    (out[g][a] = Σ y[i, a], B = 1); dropout masks Z at (pair, column). Groups: the (expert, adapter)
    segments, a >= 0 (out: (L, E, A, B)), or per_expert (out: (E, A, B), every adapter's rows); any
    strides and float dtype. low_rank: an fp32 operand is S or dU (dA, dB), held to the adapters'
    precision; False for dW, which follows torch's fp32 matmul setting as the base GEMM does."""
    _check_groups(groups, "moe_reduce")
    E, L, P = groups.experts, groups.adapters, groups.pairs
    A = y.shape[1]
    B = z.shape[1] if z is not None else 1
    want = (E, A, B) if per_expert else (L, E, A, B)
    check_shapes(y.shape == (P, A) and (z is None or gather_z or z.shape[0] == P)
                 and out.shape[-2:] == want[-2:] and out.shape[:-2] == want[:-2], "moe_reduce", y=y, z=z, out=out)
    if out.numel() == 0:
        return out
    cfg = dict(configs.moe_reduce(P, y.device))
    block_a = min(cfg.pop("BLOCK_A"), max(16, triton.next_power_of_2(A)))
    block_b = min(cfg.pop("BLOCK_B"), max(16, triton.next_power_of_2(B)))
    groups_count = E if per_expert else E * L
    grid = (cdiv(A, block_a), groups_count, cdiv(B, block_b))
    o_strides = (0, *out.stride()) if per_expert else out.stride()
    z_ = z if z is not None else y
    launch(
        _moe_reduce_kernel, grid,
        y, z_, out, groups.order, groups.starts,
        A, B, L, groups.top_k,
        *y.stride(), *(z_.stride() if z is not None else (0, 0)), *o_strides,
        *seed_words(seed), threshold,
        PER_EXPERT=per_expert, HAS_Z=z is not None, GATHER_Z=gather_z, DROP_Z=z is not None and dropout,
        DOT_DTYPE=dot_dtype(y.dtype, z_.dtype), PRECISION=dot_precision(y.dtype, z_.dtype, low_rank=low_rank),
        BLOCK_A=block_a, BLOCK_B=block_b, **cfg,
    )
    return out
