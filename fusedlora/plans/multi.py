"""The launch sequences of the multi-adapter layer: forward and backward for both plans.

With x: (M, K), W: (N, K), adapters A: (L, R, K), B: (L, N, R), s_l, ranks r_l, and l = ids[t]:
    forward    S[t] = s_l · x[t]·A_lᵀ                 (M, R) fp32 in token order, saved
               y[t] = x[t]·Wᵀ + b + S[t]·B_lᵀ
    backward   dU[t] = s_l · dY[t]·B_l
               dX[t] = dY[t]·W + dU[t]·A_l
               dA_l = Σ_{t in l} dU[t]ᵀ·x[t],  dB_l = Σ_{t in l} dY[t]ᵀ·S[t]   (every adapter written)
               dW = dYᵀ·x,  db = Σ_rows dY
The plans (chosen by fusedlora/plans/planner.py: choose_multi) differ in how y and dX are formed:
- fused   tokens grouped by adapter; the base GEMM runs in Triton with each adapter's expand as
          extra K-steps (kernels/multi_lora.py).
- split   the low-rank term (+ b) is written first by the segment kernels over tokens grouped by
          adapter, and the library GEMM accumulates x·Wᵀ (dY·W) onto it (addmm_, beta = 1), as the
          single-adapter split plan does.
- decode  two launches, no grouping (kernels/multi_decode.py, per-row adapter lookup), for 1 to
          DECODE_MAX_ROWS rows: the shrink split over K, then one Triton GEMM that computes x·Wᵀ (dY·W)
          and adds b and each row's adapter term S[t]·B_lᵀ (dU[t]·A_l) before its single write.
DoRA (col_scale G: (L, N) fp32, each adapter's magnitude over its row norms; forward only):
    y[t] = G[l] ⊙ (x[t]·Wᵀ + S[t]·B_lᵀ) + b on rows with an adapter, x[t]·Wᵀ + b on the others.
  The scale sits in the epilogue of the kernel that writes y last: the decode GEMM, the fused GEMM, and
  in the split plan the segment expand, which then runs after the library GEMM and accumulates onto its
  x·Wᵀ (the order of the single-adapter DoRA split plan), since a scale cannot be applied to a sum
  that is not complete yet.
S and dU are in token order in every plan, so forward and backward may choose differently. ids are
the flat (M,) adapter ids; groups, group_by_adapter's (order, sorted_ids, starts) of them, which
fused and split need and decode does not (None there): the AdapterBatch makes them once per batch.
Rows with id -1 get the base alone; ids outside [-1, L) give NaN rows.
"""
import torch

from fusedlora.core import knobs, torch_backend
from fusedlora.core.adapter_batch import values_checked
from fusedlora.core.backend import backend_for
from fusedlora.core.specialization import PlanCache
from fusedlora.core.checks import check_col_scale, check_multi, check_ranks_values, describe
from fusedlora.kernels.multi_decode import decode_gemm, decode_launcher, decode_shrink
from fusedlora.kernels.multi_lora import multi_gemm, multi_reduce, multi_shrink
from fusedlora.plans.callplan import DY, CallPlan, with_contiguous
from fusedlora.plans.planner import choose_multi
from fusedlora.plans.single import rows


def forward(plan: str, x2, weight, bias, lora_A, lora_B, scalings, ranks, ids, groups, need_S: bool, out,
            col_scale=None):
    """y into out: (M, N) in x's dtype; returns S: (M, R) fp32, or None when not need_S and the plan does
    without. x2: (M, K); col_scale: (L, N) fp32 (DoRA) or None; inputs already validated."""
    if plan == "decode":
        part = decode_shrink(x2, lora_A, scalings, ids, ranks)
        return decode_gemm(part, lora_B, ids, ranks, x2, weight, out=out, bias=bias, write_s=need_S,
                           col_scale=col_scale)
    S = multi_shrink(x2, lora_A, scalings, groups, ranks)
    if plan == "fused":
        multi_gemm(x2, weight, bias, S, lora_B, groups, ranks, out, col_scale=col_scale)
    elif col_scale is not None:
        torch.mm(x2, weight.t(), out=out)
        multi_gemm(None, None, bias, S, lora_B, groups, ranks, out, accumulate=True, col_scale=col_scale)
    else:
        multi_gemm(None, None, bias, S, lora_B, groups, ranks, out).addmm_(x2, weight.t())
    return S


def backward(plan: str, dy, x, weight, lora_A, lora_B, scalings, ranks, S, ids, groups, needs):
    """Gradients (dx, dweight, dbias, dlora_A, dlora_B) for the flags in `needs`, None elsewhere.
    x: (*, K), dy: (*, N)."""
    need_x, need_w, need_b, need_A, need_B = needs
    g, x2 = rows(dy), rows(x)
    decode = plan == "decode"
    scan = dict(ids=ids) if decode else dict(groups=groups)
    lora_At, lora_Bt = lora_A.transpose(1, 2), lora_B.transpose(1, 2)  # (L, K, R), (L, R, N): strides only
    dw = db = dA = dB = None
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
    dx2 = rows(dx) if need_x else None
    if decode and (need_x or need_A):
        part = decode_shrink(g, lora_Bt, scalings, ids, ranks)
        dU = decode_gemm(part, lora_At, ids, ranks, g, weight.t(), out=dx2, write_s=need_A)
    elif need_x or need_A:
        dU = multi_shrink(g, lora_Bt, scalings, groups, ranks)
        if need_x and plan == "fused":
            multi_gemm(g, weight.t(), None, dU, lora_At, groups, ranks, dx2)
        elif need_x:
            multi_gemm(None, None, None, dU, lora_At, groups, ranks, dx2).addmm_(g, weight)
    if need_A:
        dA = torch.empty_like(lora_A, memory_format=torch.contiguous_format)
        multi_reduce(x2, dU, ranks, dA.transpose(1, 2), **scan)
    if need_B:
        dB = torch.empty_like(lora_B, memory_format=torch.contiguous_format)
        multi_reduce(g, S, ranks, dB, **scan)
    # dW through the library GEMM in both plans: a plain (N, M)·(M, K) product.
    if need_w:
        dw = torch.mm(g.t(), x2).to(weight.dtype)
    if need_b:
        db = g.sum(0, dtype=torch.float32).to(weight.dtype)
    return dx, dw, db, dA, dB


# ---- the call plan (fusedlora/plans/callplan.py) --------------------------------------------------
# multi_lora_linear's arguments: (x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale), batch an
# AdapterBatch (its ids were checked when it was built). With gradients forward saves (x, weight,
# lora_A, lora_B, scalings, ranks, S) and keeps the batch as its state, so that backward reuses the
# grouping forward made (or an earlier layer made for the same batch). ranks' values are per-call values:
# checked on every call where reading them costs no GPU sync (values_checked). A DoRA column scale
# (col_scale) is served by the kernels without gradients; with them, by the PyTorch backend, which is
# differentiable in it too.

def plan_of(direction: str, x, weight, lora_A) -> str:
    L, R, K = lora_A.shape
    return choose_multi(direction, x.numel() // K if K else 0, K, weight.shape[0], R, L)


def check_batch_size(batch, lora_A) -> None:
    """The AdapterBatch's adapter count is lora_A's L (eager plans and the compiled op alike)."""
    if batch.num_adapters != lora_A.shape[0]:
        raise ValueError(f"the AdapterBatch was built for {batch.num_adapters} adapters, but "
                         f"{describe('lora_A', lora_A)} holds L = {lora_A.shape[0]}")


# The arguments the kernels index without a stride (with_contiguous): bias, scalings, ranks, col_scale.
VECTORS = (2, 5, 7, 8)


def multi_plan(x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale, needs) -> CallPlan:
    """multi_lora_linear's plan for this call's specialization: the checks, the backend, the plan of each
    direction, the decode launches bound. needs: which of (x, weight, bias, lora_A, lora_B, ranks,
    col_scale) need a gradient, or None."""
    args = (x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale)
    # The launches are bound over what the runs will pass them, the vectors' contiguous copies: the
    # decode launcher refuses a DoRA scale whose columns are not adjacent. What is not a tensor is left
    # to the checks, which name it.
    built = (a.contiguous() if i in VECTORS and isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
    return with_contiguous(_multi_plan(*built, needs), args, VECTORS)


def _multi_plan(x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale, needs) -> CallPlan:
    check_multi(x, weight, bias, lora_A, lora_B, scalings, batch.ids, ranks, values=False)
    L, R, K = lora_A.shape
    check_batch_size(batch, lora_A)
    if col_scale is not None:
        check_col_scale(col_scale, weight, lora_A)
    if ranks is not None and values_checked(ranks):
        check_ranks_values(ranks, R)
    cpu_ranks = ranks is not None and ranks.device.type == "cpu"
    if backend_for(x) == "torch" or (col_scale is not None and needs is not None):
        # torch's autograd takes the gradients
        def run(x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale):
            if ranks is not None and (cpu_ranks or knobs.debug()):
                check_ranks_values(ranks, R)
            return torch_backend.multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, batch.ids, ranks,
                                                   col_scale)
        return CallPlan(run=run)
    N = weight.shape[0]
    M = x.numel() // K if K else 0
    y_shape, dtype, device = (*x.shape[:-1], N), x.dtype, x.device
    plan = plan_of("forward", x, weight, lora_A)

    def groups(plan, batch):
        return None if plan == "decode" else batch.groups()

    if needs is None and plan == "decode" and M > 0 and K > 0 and N > 0 and L > 0:
        # The decode plan's two launches, bound; M within the kernels' bound (the planner's rule).
        launch = decode_launcher(rows(x), weight, lora_A, lora_B, scalings, batch.flat, ranks, bias,
                                 torch.empty((M, N), dtype=dtype, device=device), col_scale=col_scale)

        def run(x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale):
            if ranks is not None and (cpu_ranks or knobs.debug()):
                check_ranks_values(ranks, R)
            # y is new and contiguous: its data starts where its 2-D view's does (the launches' strides are
            # fixed). x of more dimensions may not be viewable as 2-D: reshaped as forward does.
            y = torch.empty(y_shape, dtype=dtype, device=device)
            launch(rows(x), weight, lora_A, lora_B, scalings, batch.flat, ranks, bias,
                   y, col_scale)
            return y
        return CallPlan(run=run)

    launch = None
    if needs is not None and plan == "decode" and M > 0 and K > 0 and N > 0 and L > 0:
        # The decode forward with S written, bound as the no-grad one is.
        launch = decode_launcher(rows(x), weight, lora_A, lora_B, scalings, batch.flat, ranks, bias,
                                 torch.empty((M, N), dtype=dtype, device=device), write_s=True)

    def forward_(x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale, need_S=True):
        if ranks is not None and (cpu_ranks or knobs.debug()):
            check_ranks_values(ranks, R)
        y = torch.empty(y_shape, dtype=dtype, device=device)
        if launch is not None:
            S = launch(rows(x), weight, lora_A, lora_B, scalings, batch.flat, ranks,
                       bias, y)
        else:
            S = forward(plan, rows(x), weight, bias, lora_A, lora_B, scalings, ranks, batch.flat,
                        groups(plan, batch), need_S, rows(y), col_scale)
        return y, (x, weight, lora_A, lora_B, scalings, ranks, S), (batch,)

    if needs is None:
        def run(x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale):
            return forward_(x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale, need_S=False)[0]
        return CallPlan(run=run)

    bound = PlanCache(register=False)

    def backward_(dy, saved, state, needs):
        key = DY.key(dy, needs=tuple(needs[:5]))
        run = bound.get(key)
        if run is None:
            run = bound.keep(key, _backward_run(dy, *saved, state[0], tuple(needs[:5])))
        return (*run(dy, *saved, state[0]), None, None, None, None)
    return CallPlan(forward=forward_, backward=backward_)


def _backward_run(dy, x, weight, lora_A, lora_B, scalings, ranks, S, batch, needs):
    """The backward of one dY specialization: run(dy, x, weight, lora_A, lora_B, scalings, ranks, S, batch)
    -> (dx, dweight, dbias, dlora_A, dlora_B). Under the decode plan dX and dU are the decode forward's two
    launches over (dY, Wᵀ, Bᵀ, Aᵀ), bound here; dA and dB the two scans over the ids."""
    need_x, need_w, need_b, need_A, need_B = needs
    K, N = x.shape[-1], weight.shape[0]
    plan = plan_of("backward", x, weight, lora_A)
    g = rows(dy)
    M = g.shape[0]
    if plan != "decode" or not need_x or g.data_ptr() != dy.data_ptr() or 0 in (M, K, N, lora_A.shape[0]):
        def run(dy, x, weight, lora_A, lora_B, scalings, ranks, S, batch):
            return backward(plan, dy, x, weight, lora_A, lora_B, scalings, ranks, S, batch.flat,
                            None if plan == "decode" else batch.groups(), needs)
        return run
    lora_At, lora_Bt = lora_A.transpose(1, 2), lora_B.transpose(1, 2)  # (L, K, R), (L, R, N): strides only
    launch = decode_launcher(g, weight.t(), lora_Bt, lora_At, scalings, batch.flat, ranks, None,
                             torch.empty((M, K), dtype=x.dtype, device=x.device), write_s=need_A)

    def run(dy, x, weight, lora_A, lora_B, scalings, ranks, S, batch):
        g, x2 = rows(dy), rows(x)
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dU = launch(g, weight.t(), lora_B.transpose(1, 2), lora_A.transpose(1, 2), scalings, batch.flat, ranks, None,
                    rows(dx))
        dA = dB = dw = db = None
        if need_A:
            dA = torch.empty_like(lora_A, memory_format=torch.contiguous_format)
            multi_reduce(x2, dU, ranks, dA.transpose(1, 2), ids=batch.flat)
        if need_B:
            dB = torch.empty_like(lora_B, memory_format=torch.contiguous_format)
            multi_reduce(g, S, ranks, dB, ids=batch.flat)
        if need_w:
            dw = torch.mm(g.t(), x2).to(weight.dtype)
        if need_b:
            db = g.sum(0, dtype=torch.float32).to(weight.dtype)
        return dx, dw, db, dA, dB
    return run
