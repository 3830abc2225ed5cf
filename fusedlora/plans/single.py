"""The launch sequences of the single-adapter LoRA layer, one pair (forward, backward) for both plans.

With x: (M, K), W: (N, K), A: (r, K), B: (N, r), s the scaling, keep the dropout mask, c = s/(1-p):
    forward    S = c·(keep ⊙ x)·Aᵀ              shrink, mask drawn in-kernel; (M, r) fp32, saved
               y = x·Wᵀ + b + S·Bᵀ
    backward   dU = c·dY·B,  dB = dYᵀ·S         one pass over dY
               dX = dY·W + keep ⊙ (dU·A)
               dA = dUᵀ·(keep ⊙ x)               mask regenerated from the seed
               dW = dYᵀ·x,  db = Σ_rows dY
The plans (fusedlora/plans/planner.py) differ only in how y and dX are formed: "fused" adds the low-rank
term inside one Triton GEMM; "split" writes it first (lora_expand) and lets the library GEMM
accumulate x·Wᵀ or dY·W onto it (addmm_ with beta = 1). Everything else is shared, so forward and
backward may choose differently. Saved for backward: x, S and the seed, never a mask or a dropped x.

lora_add (any base layer) is the split plan with the base product computed by someone else:
    y = base + S·Bᵀ;  d(base) = dY;  dX = keep ⊙ (dU·A)  (the base layer's own autograd adds its dX).
Where the single-adapter plan would run a direction as one launch, lora_add's does too.
"""
import math

import torch

from fusedlora.core import torch_backend
from fusedlora.core.backend import backend_for
from fusedlora.core.checks import check_lora_add, check_lora_linear, require_scalar
from fusedlora.core.dropout import check_seed, int_seed, keep_threshold
from fusedlora.core.specialization import PlanCache
from fusedlora.kernels import configs
from fusedlora.kernels.lora_gemm import SHRINK_MAX_R, gemm_shrink_launcher, lora_expand, lora_gemm, lora_gemm_shrink
from fusedlora.kernels.lora_backward import backward_launcher, fits, lora_backward
from fusedlora.kernels.lora_shrink import lora_dy, lora_shrink
from fusedlora.plans.callplan import DY, CallPlan, with_contiguous
from fusedlora.plans.planner import choose


def shrink(x2, lora_A, scaling: float, dropout_p: float, seed: int) -> torch.Tensor:
    """S = s/(1-p)·(keep ⊙ x)·Aᵀ: (M, r) fp32."""
    return lora_shrink(x2, lora_A, scaling / (1.0 - dropout_p), seed, keep_threshold(dropout_p),
                       dropout=dropout_p > 0)


# Rows up to which the fused plan's forward is one launch, the shrink inside the GEMM's K loop
# (fusedlora/kernels/configs.py says why; untimed on a GPU).
ONE_LAUNCH_MAX_M = configs.planner_value("one_launch_max_m")


def forward(plan: str, x2, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed: int, out):
    """y into out: (M, N) in x's dtype, and S: (M, r) fp32, for x2: (M, K); inputs already validated."""
    if one_launch(plan, x2, lora_A):
        return lora_gemm_shrink(x2, weight, bias, lora_A, lora_B, scaling / (1.0 - dropout_p), seed,
                                keep_threshold(dropout_p), dropout=dropout_p > 0, out=out)[1]
    S = shrink(x2, lora_A, scaling, dropout_p, seed)
    if plan == "fused":
        lora_gemm(x2, weight, bias, p=S, q=lora_B, out=out)
    else:
        lora_expand(S, lora_B, bias, out=out).addmm_(x2, weight.t())
    return S


def one_launch(plan: str, x2, lora_A) -> bool:
    """Whether forward runs as one launch (lora_gemm_shrink) for x2: (M, K) and lora_A: (r, K)."""
    return plan == "fused" and x2.shape[0] <= ONE_LAUNCH_MAX_M and lora_A.shape[0] <= SHRINK_MAX_R


def add_forward(plan: str, base2, x2, lora_A, lora_B, scaling: float, dropout_p: float, seed: int, out):
    """base + S·Bᵀ into out: (M, N), and S, for base2: (M, N), x2: (M, K). plan: the single-adapter
    forward's choice for these rows; where it would run as one launch, so does this (the shrink inside
    the expand's loop over K), else the shrink and the expand are a launch each."""
    if one_launch(plan, x2, lora_A):
        return lora_gemm_shrink(x2, None, None, lora_A, lora_B, scaling / (1.0 - dropout_p), seed,
                                keep_threshold(dropout_p), dropout=dropout_p > 0, out=out, addend=base2)[1]
    S = shrink(x2, lora_A, scaling, dropout_p, seed)
    lora_expand(S, lora_B, addend=base2, out=out)
    return S


def _low_rank_grads(g, x2, lora_A, lora_B, S, scaling, dropout_p, seed, need_dU, need_A, need_B):
    """(dU, dA, dB): the steps both plans share. dU is returned for dX (None unless need_dU)."""
    c = scaling / (1.0 - dropout_p)
    dU, dB = lora_dy(g, lora_B, S, c, compute_du=need_dU or need_A, compute_db=need_B)
    dA = None
    if need_A:
        dA = torch.empty_like(lora_A, memory_format=torch.contiguous_format)
        lora_shrink(x2.t(), dU.t(), 1.0, seed, keep_threshold(dropout_p), dropout=dropout_p > 0,
                    mask_transposed=True, out=dA.t())
    return dU, dA, (dB.to(lora_B.dtype) if need_B else None)


def masked_dx(g, weight, dU, lora_A, dropout_p, seed, plan, out_dtype):
    """dX = dY·W + keep ⊙ (dU·A), or keep ⊙ (dU·A) alone when weight is None (lora_add)."""
    mask = dict(seed=seed, threshold=keep_threshold(dropout_p), dropout=dropout_p > 0)
    if weight is not None and plan == "fused":
        return lora_gemm(g, weight.t(), None, p=dU, q=lora_A.t(), **mask)
    dx = lora_expand(dU, lora_A.t(), out_dtype=out_dtype, **mask)
    return dx if weight is None else dx.addmm_(g, weight)


def _input_and_adapter_grads(plan, g, x, x2, weight, lora_A, lora_B, S, scaling, dropout_p, seed, need_x,
                             need_A, need_B):
    """(dX, dA, dB), each None unless needed, of either op (weight None: lora_add's, whose base layer adds
    its own dX). The fused plan at up to 64 rows (one row block) is one launch (kernels/lora_backward.py);
    otherwise dU and dB, dA and dX take a launch each."""
    if plan == "fused" and fits(g.shape[0], lora_A.shape[0]) and (need_x or need_A or need_B):
        dx, dA, dB = lora_backward(g, weight, lora_A, lora_B, x2, S, scaling / (1.0 - dropout_p), seed,
                                   keep_threshold(dropout_p), dropout=dropout_p > 0, compute_dx=need_x,
                                   compute_da=need_A, compute_db=need_B, dx_dtype=x.dtype)
        return (dx.view(x.shape) if need_x else None), dA, dB
    dU, dA, dB = _low_rank_grads(g, x2, lora_A, lora_B, S, scaling, dropout_p, seed, need_x, need_A, need_B)
    dx = masked_dx(g, weight, dU, lora_A, dropout_p, seed, plan, x.dtype).reshape(x.shape) if need_x else None
    return dx, dA, dB


def backward(plan: str, dy, x, weight, lora_A, lora_B, S, scaling: float, dropout_p: float, seed: int, needs):
    """Gradients (dx, dweight, dbias, dlora_A, dlora_B) for the flags in `needs`, None elsewhere.
    x: (*, K), dy: (*, N)."""
    need_x, need_w, need_b, need_A, need_B = needs
    g, x2 = rows(dy), rows(x)
    dx, dA, dB = _input_and_adapter_grads(plan, g, x, x2, weight, lora_A, lora_B, S, scaling, dropout_p, seed,
                                          need_x, need_A, need_B)
    # dW through the library GEMM in both plans: it is a plain (N, M)·(M, K) product.
    dw = torch.mm(g.t(), x2).to(weight.dtype) if need_w else None
    db = g.sum(0, dtype=torch.float32).to(weight.dtype) if need_b else None
    return dx, dw, db, dA, dB


def add_backward(dy, x, lora_A, lora_B, S, scaling: float, dropout_p: float, seed: int, needs, plan: str = "split"):
    """Gradients (dbase, dx, dlora_A, dlora_B) of lora_add for the flags in `needs`, None elsewhere. plan:
    the single-adapter backward's choice for these rows; "fused" at up to 64 rows is one launch, as
    backward's."""
    need_base, need_x, need_A, need_B = needs
    g, x2 = rows(dy), rows(x)
    dx, dA, dB = _input_and_adapter_grads(plan, g, x, x2, None, lora_A, lora_B, S, scaling, dropout_p, seed,
                                          need_x, need_A, need_B)
    return (dy if need_base else None), dx, dA, dB


# ---- call plans: what every eager call of one specialization runs (fusedlora/plans/callplan.py) ----
# lora_linear's arguments: (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed); lora_add's:
# (base, x, lora_A, lora_B, scaling, dropout_p, seed). A plan with gradients saves (x, weight, lora_A,
# lora_B, S) (weight None for lora_add) and keeps (scaling, seed) as a float and an int as its state: the
# torch.compile ops (fusedlora/ops/single.py) pass both to backward themselves. Its backward binds the
# launches once per specialization of dY (y.sum().backward() passes a stride-0 dY) and of the settings
# at backward time: a plan or precision switched between forward and backward is honoured, as it is by
# a backward planned from scratch.
_INF = math.inf


def rows(x) -> torch.Tensor:
    """x as (M, K): itself when 2-D (a reshape is a dispatch even when it is a view). M is counted, not
    inferred: reshape(-1, 0) of an empty last dimension is ambiguous and raises."""
    return x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def scale_of(scaling) -> float:
    """The per-call scaling as a float, checked: the one value check a call served by its plan repeats."""
    if type(scaling) is float and -_INF < scaling < _INF:
        return scaling
    return require_scalar("scaling", scaling)


def checked_scalars(scaling, dropout_p, seed) -> float:
    """The scalar checks of a build; returns dropout_p as a float."""
    require_scalar("scaling", scaling)
    p = require_scalar("dropout_p", dropout_p, low=0.0, high=1.0)
    if seed is not None:
        check_seed(seed)
    return p


def linear_plan(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, needs) -> CallPlan:
    """lora_linear's plan for this call's specialization: the checks (user errors raise here), the backend,
    the plan of each direction, the launches bound. needs: which of (x, weight, bias, lora_A, lora_B)
    need a gradient, or None."""
    check_lora_linear(x, weight, bias, lora_A, lora_B)
    p = checked_scalars(scaling, dropout_p, seed)
    if backend_for(x) == "torch":  # torch's autograd takes its gradients
        def run(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
            return torch_backend.lora_linear(x, weight, bias, lora_A, lora_B, scale_of(scaling), p, int_seed(seed, p))
        return CallPlan(run=run)
    return with_contiguous(_kernel_plan(x, weight, bias, lora_A, lora_B, None, p, needs is not None),
                           (x, weight, bias, lora_A, lora_B), (2,))


def add_plan(base, x, lora_A, lora_B, scaling, dropout_p, seed, needs) -> CallPlan:
    """lora_add's plan, as linear_plan's; needs: of (base, x, lora_A, lora_B), or None. The same launches
    as lora_linear's without the base product, onto base."""
    check_lora_add(base, x, lora_A, lora_B)
    p = checked_scalars(scaling, dropout_p, seed)
    if backend_for(x) == "torch":
        def run(base, x, lora_A, lora_B, scaling, dropout_p, seed):
            return torch_backend.lora_add(base, x, lora_A, lora_B, scale_of(scaling), p, int_seed(seed, p))
        return CallPlan(run=run)
    linear = _kernel_plan(x, None, None, lora_A, lora_B, base, p, needs is not None)
    if linear.run is not None:
        run = linear.run

        def run_add(base, x, lora_A, lora_B, scaling, dropout_p, seed):
            return run(x, None, None, lora_A, lora_B, scaling, dropout_p, seed, base)
        return CallPlan(run=run_add)
    forward, backward = linear.forward, linear.backward

    def forward_add(base, x, lora_A, lora_B, scaling, dropout_p, seed):
        return forward(x, None, None, lora_A, lora_B, scaling, dropout_p, seed, base)

    def backward_add(dy, saved, state, needs):
        dx, _, _, dA, dB, *_ = backward(dy, saved, state, (needs[1], False, False, needs[2], needs[3]))
        return dy if needs[0] else None, dx, dA, dB, None, None, None
    return CallPlan(forward=forward_add, backward=backward_add)


def _kernel_plan(x, weight, bias, lora_A, lora_B, base, p: float, grad: bool) -> CallPlan:
    """The kernels' plan of lora_linear, or of lora_add (weight None, base given: its closures take the
    base last). grad: a plan with gradients (forward saves S; which gradients backward computes is read
    from each backward call). Rows up to ONE_LAUNCH_MAX_M take the one-launch forward, bound here once:
    the kernel takes x (and base) themselves, so each must be viewable as its rows without a copy."""
    x2, N, r = rows(x), lora_B.shape[0], lora_A.shape[0]
    M, K = x2.shape
    out_dtype, device = (x.dtype if base is None else base.dtype), x.device
    y_shape = (*x.shape[:-1], N) if base is None else base.shape
    base2 = None if base is None else rows(base)
    plan = choose("forward", M, K, N, r)
    keep, threshold = 1.0 - p, keep_threshold(p)
    one = (one_launch(plan, x2, lora_A) and M > 0 and N > 0 and x2.data_ptr() == x.data_ptr()
           and (base is None or base2.data_ptr() == base.data_ptr()))
    launch = None
    if one:
        S = torch.empty((M, r), dtype=torch.float32, device=device) if grad else None
        launch = gemm_shrink_launcher(x2, weight, bias, lora_A, lora_B, S,
                                      torch.empty((M, N), dtype=out_dtype, device=device), dropout=p > 0, addend=base2)

    if not grad:
        if launch is not None:
            def run(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, base=None):
                if type(scaling) is not float or not -_INF < scaling < _INF:
                    scaling = require_scalar("scaling", scaling)
                y = torch.empty(y_shape, dtype=out_dtype, device=device)
                launch(x, weight, bias, lora_A, lora_B, y, int_seed(seed, p),
                       threshold, scaling / keep, addend=base)
                return y
        else:
            def run(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, base=None):
                y = torch.empty(y_shape, dtype=out_dtype, device=device)
                _forward_of(plan, x, weight, bias, lora_A, lora_B, base, scale_of(scaling), p, int_seed(seed, p),
                            rows(y))
                return y
        return CallPlan(run=run)

    def forward_(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, base=None):
        if type(scaling) is not float or not -_INF < scaling < _INF:
            scaling = require_scalar("scaling", scaling)
        seed = int_seed(seed, p)
        y = torch.empty(y_shape, dtype=out_dtype, device=device)
        if launch is not None:
            S = torch.empty((M, r), dtype=torch.float32, device=device)
            launch(x, weight, bias, lora_A, lora_B, y, seed, threshold, scaling / keep, S, addend=base)
        else:
            S = _forward_of(plan, x, weight, bias, lora_A, lora_B, base, scaling, p, seed, rows(y))
        return y, (x, weight, lora_A, lora_B, S), (scaling, seed)

    bound = PlanCache(register=False)

    def backward_(dy, saved, state, needs):
        key = DY.key(dy, needs=tuple(needs[:5]))
        run = bound.get(key)
        if run is None:
            run = bound.keep(key, _backward_run(dy, *saved, p, tuple(needs[:5])))
        return run(dy, *saved, *state)
    return CallPlan(forward=forward_, backward=backward_)


def _forward_of(plan, x, weight, bias, lora_A, lora_B, base, scaling, p, seed, out):
    if base is None:
        return forward(plan, rows(x), weight, bias, lora_A, lora_B, scaling, p, seed, out)
    return add_forward(plan, rows(base), rows(x), lora_A, lora_B, scaling, p, seed, out)


def _backward_run(dy, x, weight, lora_A, lora_B, S, p: float, needs):
    """The backward of one dY specialization: run(dy, x, weight, lora_A, lora_B, S, scaling, seed) ->
    (dx, dweight, dbias, dlora_A, dlora_B, None, None, None). weight None: lora_add's (no dW, db). At up
    to 64 rows under the fused plan, dX, dA and dB are one launch, bound here."""
    need_x, need_w, need_b, need_A, need_B = needs
    N, (M, K), r = lora_B.shape[0], rows(x).shape, lora_A.shape[0]
    plan = choose("backward", M, K, N, r)
    g, x2 = rows(dy), rows(x)
    keep, threshold = 1.0 - p, keep_threshold(p)
    if (plan == "fused" and fits(M, r) and (need_x or need_A or need_B) and g.data_ptr() == dy.data_ptr()
            and x2.data_ptr() == x.data_ptr()):
        launch = backward_launcher(g, weight, lora_A, lora_B, x2, S, p > 0, need_x, need_A, need_B, x.shape, x.dtype)

        def run(dy, x, weight, lora_A, lora_B, S, scaling, seed):
            dx, dA, dB = launch(dy, weight, lora_A, lora_B, x, S, scaling / keep, seed, threshold)
            dw = db = None
            if need_w or need_b:
                g = rows(dy)
                dw = torch.mm(g.t(), rows(x)).to(weight.dtype) if need_w else None
                db = g.sum(0, dtype=torch.float32).to(weight.dtype) if need_b else None
            return dx, dw, db, dA, dB, None, None, None
        return run
    if weight is None:
        def run_add(dy, x, weight, lora_A, lora_B, S, scaling, seed):
            _, dx, dA, dB = add_backward(dy, x, lora_A, lora_B, S, scaling, p, seed, (False, need_x, need_A, need_B),
                                         plan)
            return dx, None, None, dA, dB, None, None, None
        return run_add

    def run(dy, x, weight, lora_A, lora_B, S, scaling, seed):
        return (*backward(plan, dy, x, weight, lora_A, lora_B, S, scaling, p, seed, needs), None, None, None)
    return run
