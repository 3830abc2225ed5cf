"""The launch sequences of LoRA on a Mixture-of-Experts projection: forward and backward, three plans.

The (token, expert) pairs are grouped once per layer call by ExpertRouting (fusedlora/core/moe_routing.py):
sorted row i is pair p = order[i] of token t = p // k, expert e, adapter a (-1: no LoRA). Its input
X_i is x[t] (gather: the gate_up projection reads x: (T, K) in place) or x[i] (gather=False: x is
(P, K) in sorted order, the down projection's input). With W: (E, N, K), A: (L, E, R, K),
B: (L, E, N, R), s_a the scaling of adapter a, r_a its rank, c_a = s_a/(1-p) and keep the dropout mask
of the (P, K) input in routing order (Philox at (seed, pair, column)):

    forward    S_i  = c_a·(keep_i ⊙ X_i)·A_{a,e}ᵀ            (P, R) fp32 sorted, saved for backward
               y_i  = X_i·W_eᵀ + b_e + S_i·B_{a,e}ᵀ          (P, N) sorted, into `out`
    backward   dU_i = c_a·dY_i·B_{a,e}                         (P, R) fp32
               dX_i = dY_i·W_e + keep_i ⊙ (dU_i·A_{a,e})       gather: dX[t] = Σ_j dX_{t·k+j}, in routing order
               dA_{a,e} = Σ_{i∈(e,a)} dU_iᵀ·(keep_i ⊙ X_i),   dB_{a,e} = Σ_{i∈(e,a)} dY_iᵀ·S_i
               dW_e = Σ_{i∈e} dY_iᵀ·X_i,   db_e = Σ_{i∈e} dY_i          (only when asked)
S_i and dU_i are zero past r_a and on rows without an adapter, so every gradient past a rank is zero.
Backward keeps x, S and the seed: never a mask, a dropped x, or anything of E·N·K elements.

The plans (fusedlora/plans/planner.py: choose_moe) differ in how y and dX are formed:
- fused   the Triton grouped GEMM (kernels/moe_lora.py) with the expand in its epilogue (extra K-steps
          over the rank), after a shrink launch; up to ONE_LAUNCH_MAX_PAIRS pairs (and rank
          SHRINK_MAX_R) the shrink runs in the GEMM's K loop instead: y and S in one launch, dX and dU
          in one launch.
- split   the library grouped GEMM (torch.nn.functional.grouped_mm, else torch._grouped_mm) computes
          X·W_eᵀ (dY·W_e), and a Triton launch adds b_e and the low-rank term onto it, after the
          Triton shrink. Where the library cannot serve the operands (its dtype and 16-byte layout
          rules, below), that product runs as in the fused plan.
- decode  the fused plan's one-launch kernels on the decode schedule: a program per segment and column
          block, none searching for its tile, those of segments without a pair exiting at once.
All three share dA, dB, dW and db (kernels/moe_reduce.py: sums over each segment in a fixed order, no
atomics) and save the same S, so forward and backward may take different plans.
"""
import functools

import torch

from fusedlora.core import moe_torch
from fusedlora.core.adapter_batch import values_checked
from fusedlora.core.backend import backend_for
from fusedlora.core.checks import check_moe, check_ranks_values
from fusedlora.core.dropout import int_seed, keep_threshold
from fusedlora.kernels import configs
from fusedlora.kernels.moe_lora import SHRINK_MAX_R, Groups, moe_gemm, moe_shrink
from fusedlora.kernels.moe_reduce import moe_reduce
from fusedlora.plans.callplan import CallPlan
from fusedlora.plans.planner import choose_moe
from fusedlora.plans.single import checked_scalars, scale_of

_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


# Pairs up to which the fused plan runs each direction as one launch (fusedlora/kernels/configs.py says
# why; untimed on a GPU).
ONE_LAUNCH_MAX_PAIRS = configs.planner_value("moe_one_launch_max_pairs")


def one_launch(plan: str, P: int, R: int) -> bool:
    """Whether a direction's product runs with the shrink in the GEMM's K loop."""
    return R <= SHRINK_MAX_R and (plan == "decode" or P <= ONE_LAUNCH_MAX_PAIRS)


def groups_of(routing) -> Groups:
    """What the kernels read of an ExpertRouting."""
    return Groups(routing.order, routing.seg_starts, routing.num_experts, routing.num_adapters, routing.k,
                  routing.adapter_ids is not None)


def _scaling(scaling, dropout_p: float):
    """(scalar, per-adapter tensor or None): c_a = scalar·tensor[a], or the scalar alone for a float."""
    if isinstance(scaling, torch.Tensor):
        return 1.0 / (1.0 - dropout_p), scaling if scaling.stride(0) == 1 else scaling.contiguous()
    return float(scaling) / (1.0 - dropout_p), None


def _ranks(ranks):
    return ranks if ranks is None or ranks.stride(0) == 1 else ranks.contiguous()


def _library_layout(t: torch.Tensor) -> bool:
    """The library grouped GEMM's rule for an operand: one of the two innermost dimensions contiguous,
    the other's stride a multiple of 16 bytes (and at least its size), the data 16-byte aligned."""
    if t.device.type != "meta" and t.data_ptr() % 16:
        return False
    align = 16 // t.element_size()
    (rows, cols), (s_rows, s_cols) = t.shape[-2:], t.stride()[-2:]
    if s_cols == 1 and s_rows >= max(1, cols):
        return s_rows % align == 0
    if s_rows == 1 and s_cols >= max(1, rows):
        return s_cols % align == 0
    return False


def library_serves(a_dtype: torch.dtype, a_cols: int, b: torch.Tensor, a: torch.Tensor = None) -> bool:
    """Whether the library grouped GEMM computes a (P, C) sorted operand times b: (E, C, N): the same
    dtype, bf16 on CUDA from sm_80 (all torch 2.13's CUDA kernel and its meta checks accept), bf16, fp16
    or fp32 on CPU, and every operand in its layout. a: the operand as it will be passed, or None for a
    contiguous copy (a gathered x) with a_cols columns."""
    if _GROUPED_MM is None or b.dtype != a_dtype:
        return False
    if b.device.type == "cpu":
        if a_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return False
    elif a_dtype != torch.bfloat16 or (b.device.type == "cuda" and _capability(b.device) < (8, 0)):
        return False
    if a is not None:
        if not _library_layout(a) or a.stride(-1) != 1:  # mat_a row-major
            return False
    elif (a_cols * torch.finfo(a_dtype).bits // 8) % 16:
        return False
    return _library_layout(b)


@functools.lru_cache(maxsize=16)
def _capability(device: torch.device) -> tuple:
    return torch.cuda.get_device_capability(device)


def _offsets(routing) -> torch.Tensor:
    offs = routing.expert_offsets()
    return offs if offs.is_contiguous() else offs.contiguous()


def forward(plan: str, x, routing, weight, bias, lora_A, lora_B, scaling, ranks, dropout_p: float, seed: int,
            gather: bool, out, need_S: bool):
    """y into out: (P, N) sorted, in x's dtype; returns S: (P, R) fp32 sorted, or None unless need_S (the
    plan may then skip writing it). x: (T, K) with gather, else (P, K) sorted; weight: (E, N, K), bias:
    (E, N) or None, lora_A: (L, E, R, K), lora_B: (L, E, N, R), any strides; scaling: a float or (L,)
    tensor; ranks: (L,) integer or None. Inputs already validated."""
    groups = groups_of(routing)
    scale, scales = _scaling(scaling, dropout_p)
    ranks = _ranks(ranks)
    R = lora_A.shape[2]
    drop = dict(seed=seed, threshold=keep_threshold(dropout_p))
    dropout = dropout_p > 0
    if plan == "split" and library_serves(x.dtype, x.shape[1], weight.transpose(1, 2), None if gather else x):
        xs = x.index_select(0, routing.rows) if gather else x  # sorted rows, as the library reads them
        S = moe_shrink(xs, lora_A, groups, scale, scales, ranks, dropout=dropout, **drop)
        base = _GROUPED_MM(xs, weight.transpose(1, 2), offs=_offsets(routing))
        moe_gemm(None, None, bias, None, lora_B, groups, out, u=S, addend=base, ranks=ranks)
        return S if need_S else None
    decode = plan == "decode"
    if one_launch(plan, routing.P, R):
        S = torch.empty((routing.P, R), dtype=torch.float32, device=x.device) if need_S else None
        moe_gemm(x, weight, bias, lora_A, lora_B, groups, out, u=S, shrink=True, store_u=need_S, scale=scale,
                 scales=scales, ranks=ranks, drop_x=dropout, gather=gather, decode=decode, **drop)
        return S
    S = moe_shrink(x, lora_A, groups, scale, scales, ranks, dropout=dropout, gather=gather, **drop)
    moe_gemm(x, weight, bias, None, lora_B, groups, out, u=S, ranks=ranks, gather=gather, decode=decode)
    return S if need_S else None


def _dx(plan, dy, routing, groups, weight, lora_A, lora_B, scale, scales, ranks, dropout, drop, out, scatter,
        need_dU):
    """dX_i = dY_i·W_e + keep ⊙ (dU_i·A_{a,e}) into out (rows by pair with scatter, else sorted); returns dU
    when need_dU or computed anyway, else None."""
    R = lora_A.shape[2]
    lora_At, lora_Bt = lora_A.transpose(2, 3), lora_B.transpose(2, 3)  # (L, E, K, R), (L, E, R, N)
    if plan == "split" and library_serves(dy.dtype, dy.shape[1], weight, dy):
        dU = moe_shrink(dy, lora_Bt, groups, scale, scales, ranks)
        base = _GROUPED_MM(dy, weight, offs=_offsets(routing))
        moe_gemm(None, None, None, None, lora_At, groups, out, u=dU, addend=base, ranks=ranks, drop_out=dropout,
                 scatter=scatter, **drop)
        return dU
    decode = plan == "decode"
    if one_launch(plan, routing.P, R):
        dU = torch.empty((routing.P, R), dtype=torch.float32, device=dy.device) if need_dU else None
        moe_gemm(dy, weight.transpose(1, 2), None, lora_Bt, lora_At, groups, out, u=dU, shrink=True,
                 store_u=need_dU, scale=scale, scales=scales, ranks=ranks, drop_out=dropout, scatter=scatter,
                 decode=decode, **drop)
        return dU
    dU = moe_shrink(dy, lora_Bt, groups, scale, scales, ranks)
    moe_gemm(dy, weight.transpose(1, 2), None, None, lora_At, groups, out, u=dU, ranks=ranks, drop_out=dropout,
             scatter=scatter, decode=decode, **drop)
    return dU


def backward(plan: str, dy, x, routing, weight, lora_A, lora_B, scaling, ranks, S, dropout_p: float, seed: int,
             gather: bool, needs):
    """Gradients (dx, dweight, dbias, dlora_A, dlora_B) for the flags in `needs` (x, weight, bias, lora_A,
    lora_B), None elsewhere. dy: (P, N) sorted; S: forward's. dx: (T, K) with gather (each token's pairs
    summed in routing order, in fp32), else (P, K) sorted, in x's dtype; dweight: weight's shape and
    layout; dbias: (E, N) in weight's dtype; dlora_A, dlora_B: contiguous, in the adapters' shapes and
    dtypes."""
    need_x, need_w, need_b, need_A, need_B = needs
    groups = groups_of(routing)
    scale, scales = _scaling(scaling, dropout_p)
    ranks = _ranks(ranks)
    drop = dict(seed=seed, threshold=keep_threshold(dropout_p))
    dropout = dropout_p > 0
    P, K, k = routing.P, x.shape[1], routing.k
    lora_Bt = lora_B.transpose(2, 3)
    dx = dw = db = dA = dB = dU = None
    if need_x:
        # Rows by pair (routing order) when gathering: each token's k rows are adjacent, summed below.
        # With k = 1 a pair is its token and dX is written in place.
        pairs = gather and k > 1
        out = torch.empty((P, K) if pairs or not gather else (routing.T, K), dtype=x.dtype, device=x.device)
        dU = _dx(plan, dy, routing, groups, weight, lora_A, lora_B, scale, scales, ranks, dropout, drop, out,
                 gather, need_A)
        dx = out.view(routing.T, k, K).sum(1, dtype=torch.float32).to(x.dtype) if pairs else out
    if need_A:
        if dU is None:
            dU = moe_shrink(dy, lora_Bt, groups, scale, scales, ranks)
        dA = torch.empty(lora_A.shape, dtype=lora_A.dtype, device=x.device)
        moe_reduce(dU, x, groups, dA, gather_z=gather, dropout=dropout, **drop)
    if need_B:
        dB = torch.empty(lora_B.shape, dtype=lora_B.dtype, device=x.device)
        moe_reduce(dy, S, groups, dB)
    if need_w:
        dw = torch.empty_like(weight)  # weight's layout: a transposed (E, K, N) parameter's gradient maps back
        moe_reduce(dy, x, groups, dw, per_expert=True, gather_z=gather, low_rank=False)
    if need_b:
        db = torch.empty(weight.shape[:2], dtype=weight.dtype, device=x.device)
        moe_reduce(dy, None, groups, db.unsqueeze(-1), per_expert=True)
    return dx, dw, db, dA, dB


# ---- the call plan (fusedlora/plans/callplan.py) --------------------------------------------------
# moe_lora_linear's arguments: (x, routing, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gather,
# ranks); scaling a float (a per-call value, checked by every call) or an (L,) tensor. With gradients
# forward saves (x, weight, lora_A, lora_B, S, ranks, scaling if a tensor) and keeps (routing, scaling if
# a float, seed) as its state: the routing, made once per layer call, serves both directions.

def moe_plan(x, routing, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gather, ranks, needs) -> CallPlan:
    """moe_lora_linear's plan for this call's specialization: the checks (bad input raises here, before
    anything runs), the backend, the plan of each direction (choose_moe). needs: which of (x, weight,
    bias, lora_A, lora_B) need a gradient, or None. Without adapters (lora_A None) the base product is
    the library's grouped GEMM, through the PyTorch backend."""
    check_moe(x, routing, weight, bias, lora_A, lora_B, scaling, ranks, gather)
    p = checked_scalars(0.0 if isinstance(scaling, torch.Tensor) else scaling, dropout_p, seed)
    R = None if lora_A is None else lora_A.shape[2]
    cpu_ranks = ranks is not None and ranks.device.type == "cpu"
    if ranks is not None and values_checked(ranks):
        check_ranks_values(ranks, R)

    def per_call(scaling, ranks):
        if ranks is not None and (cpu_ranks or values_checked(ranks)):
            check_ranks_values(ranks, R)
        return scaling if isinstance(scaling, torch.Tensor) else scale_of(scaling)

    if lora_A is None or backend_for(x) == "torch":  # torch's autograd takes its gradients
        def run(x, routing, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gather, ranks):
            scaling = per_call(scaling, ranks) if lora_A is not None else scaling
            return moe_torch.moe_lora_linear(x, routing, weight, bias, lora_A, lora_B, scaling, p, seed, gather,
                                             ranks)
        return CallPlan(run=run)
    P, K, N, (L, E) = routing.P, x.shape[1], weight.shape[1], lora_A.shape[:2]
    plan = choose_moe("forward", P, K, N, R, E, L)
    shape, dtype, device = (P, N), x.dtype, x.device

    def forward_(x, routing, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gather, ranks, need_S=True):
        scaling, seed = per_call(scaling, ranks), int_seed(seed, p)
        y = torch.empty(shape, dtype=dtype, device=device)
        S = forward(plan, x, routing, weight, bias, lora_A, lora_B, scaling, ranks, p, seed, gather, y, need_S)
        tensor = isinstance(scaling, torch.Tensor)
        return y, (x, weight, lora_A, lora_B, S, ranks, scaling if tensor else None), (
            routing, None if tensor else scaling, seed)

    if needs is None:
        def run(x, routing, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gather, ranks):
            return forward_(x, routing, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gather, ranks,
                            need_S=False)[0]
        return CallPlan(run=run)

    def backward_(dy, saved, state, needs):
        x, weight, lora_A, lora_B, S, ranks, scales = saved
        routing, scaling, seed = state
        plan = choose_moe("backward", P, K, N, R, E, L)
        grads = backward(plan, dy, x, routing, weight, lora_A, lora_B, scaling if scales is None else scales,
                         ranks, S, p, seed, gather, (needs[0], needs[2], needs[3], needs[4], needs[5]))
        dx, dw, db, dA, dB = grads
        return dx, None, dw, db, dA, dB, None, None, None, None, None
    return CallPlan(forward=forward_, backward=backward_)
