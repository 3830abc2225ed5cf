"""The launch sequences of the DoRA layer (fusedlora.dora_linear), one pair (forward, backward).

With x: (M, K), W: (N, K), A: (r, K), B: (N, r), magnitude m: (N,), s the scaling, keep the dropout
mask and D(x) = keep ⊙ x / (1 - p):
    norms     n² = ‖W_n‖² + 2s·B_n·(A·W_nᵀ) + s²·B_n·(A·Aᵀ)·B_nᵀ from W·Aᵀ (N, r) and A·Aᵀ (r, r),
              so no N×K matrix W + s·B·A is ever formed; g = m / n in fp32, a constant for autograd
              (DoRA detaches the norm). One launch reads W once for ‖W_n‖² and W·Aᵀ together
              (kernels/dora_norm.py), recomputed on every call: nothing cheap tells that W is unchanged
              (`.data` writes do not bump its version), and the pass costs what one decode-sized GEMM
              costs.
    forward   S = s·D(x)·Aᵀ (the LoRA shrink; (M, r) fp32, saved);  y = x·Wᵀ
              no dropout  out = g ⊙ (y + S·Bᵀ) + b          g and b in the epilogue of the fused GEMM
                                                              (fused plan) or of the expand (split plan)
              dropout     out = y + b + (g - 1) ⊙ (D(x)·Wᵀ) + S·(g ⊙ B)ᵀ
                          PEFT's semantics: the base product runs a second time, on D(x).
    backward  G = dOut; Bg = g ⊙ B (rows of B scaled: N×r, so G·Bg = (G ⊙ g)·B without an M×N pass)
              dU = s/(1-p)·G·Bg,  Gᵀ·S          one pass over G (the LoRA dY kernel)
              dB = g ⊙ (Gᵀ·S),  dA = dUᵀ·(keep ⊙ x)
              dm = (Σ_rows G ⊙ Z + Σ_j B ⊙ (Gᵀ·S)) / n,  Z = x·Wᵀ (D(x)·Wᵀ with dropout)
              no dropout  dX = (G ⊙ g)·W + dU·A,  dW = (G ⊙ g)ᵀ·x
              dropout     dX = G·W + keep/(1-p) ⊙ (G ⊙ (g - 1))·W + keep ⊙ (dU·A)
                          dW = Gᵀ·x + (G ⊙ (g - 1))ᵀ·D(x)
              db = Σ_rows G.
Saved for backward: what plain LoRA saves (x, S, the seed) plus g and n, two N-vectors. Z is
recomputed by one GEMM in backward instead of being saved (M×N): memory over speed, since the
point of the fused layer is to keep no M×N activation beyond plain LoRA's; the recomputed Z and
G ⊙ g are transients of the backward pass, as the dX GEMM's output is.
"""
import torch

from fusedlora.core import torch_backend
from fusedlora.core.backend import backend_for
from fusedlora.core.checks import check_dora_magnitude, check_lora_linear
from fusedlora.core.dropout import dropout_mask, int_seed, keep_threshold
from fusedlora.kernels.dora_norm import MAX_RANK as DORA_NORM_MAX_RANK
from fusedlora.kernels.dora_norm import dora_norm
from fusedlora.kernels.lora_gemm import lora_expand, lora_gemm
from fusedlora.kernels.lora_shrink import lora_dy, lora_shrink
from fusedlora.plans.callplan import CallPlan, with_contiguous
from fusedlora.plans.planner import choose
from fusedlora.plans.single import checked_scalars, masked_dx, rows, scale_of, shrink


def weight_norm(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """‖W_n + s·B_n·A‖ for every row: (N,) fp32, with no N×K temporary (see the module docstring)."""
    w2 = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
    WA = lora_shrink(weight, lora_A, 1.0)                                  # (N, r) fp32
    A32 = lora_A.detach().to(torch.float32)
    B32 = lora_B.detach().to(torch.float32)
    AA = A32 @ A32.t()                                                     # (r, r)
    n2 = w2 + (2.0 * scaling) * (B32 * WA).sum(1) + (scaling * scaling) * ((B32 @ AA) * B32).sum(1)
    return n2.clamp_min(0.0).sqrt()


def norms(weight, lora_A, lora_B, magnitude, scaling: float):
    """(n, g): the row norms ‖W + s·B·A‖ and g = m / n, (N,) fp32 each. One launch up to rank 64
    (kernels/dora_norm.py: one pass over W), weight_norm's sequence above it."""
    if lora_A.shape[0] <= DORA_NORM_MAX_RANK:
        return dora_norm(weight, lora_A, lora_B, magnitude, scaling)
    n = weight_norm(weight, lora_A, lora_B, scaling)
    return n, (magnitude.detach().to(torch.float32) / n).contiguous()


def _dropped(x2, dropout_p: float, seed: int):
    """(keep, D(x)) for x2: (M, K); D(x) in x's dtype, as the reference rounds it."""
    keep = dropout_mask(seed, x2.shape, dropout_p, x2.device)
    return keep, torch.where(keep, x2 / (1.0 - dropout_p), torch.zeros((), dtype=x2.dtype, device=x2.device))


def forward(plan: str, x2, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float, seed: int,
            out):
    """out: (M, N) in x's dtype, written; returns (S, g, n) for backward. Inputs already validated."""
    n, g = norms(weight, lora_A, lora_B, magnitude, scaling)
    S = shrink(x2, lora_A, scaling, dropout_p, seed)
    if dropout_p == 0:
        if plan == "fused":
            lora_gemm(x2, weight, bias, p=S, q=lora_B, out=out, col_scale=g)
        else:
            torch.mm(x2, weight.t(), out=out)
            lora_expand(S, lora_B, bias, addend=out, out=out, col_scale=g)
        return S, g, n
    # With dropout both plans run the same sequence: two library GEMMs (x and D(x)), the low-rank
    # term with g folded into B's rows, and the bias, added by the expand kernel.
    _, xd = _dropped(x2, dropout_p, seed)
    torch.mm(xd, weight.t(), out=out)
    out.mul_(g - 1.0)
    lora_expand(S, lora_B * g[:, None], bias, addend=out, out=out)
    out.addmm_(x2, weight.t())
    return S, g, n


def backward(plan: str, dy, x, weight, lora_A, lora_B, S, g, n, scaling: float, dropout_p: float, seed: int,
             needs):
    """Gradients (dx, dweight, dbias, dlora_A, dlora_B, dmagnitude) for the flags in `needs`, None
    elsewhere (dmagnitude in fp32: the caller casts it). x: (*, K), dy: (*, N)."""
    need_x, need_w, need_b, need_A, need_B, need_m = needs
    G, x2 = rows(dy), rows(x)
    c = scaling / (1.0 - dropout_p)
    mask = dict(seed=seed, threshold=keep_threshold(dropout_p), dropout=dropout_p > 0)
    Bg = lora_B.detach().to(torch.float32) * g[:, None]
    dU, GS = lora_dy(G, Bg, S, c, compute_du=need_x or need_A, compute_db=need_B or need_m)
    dA = dB = dm = dx = dw = None
    if need_A:
        dA = torch.empty_like(lora_A, memory_format=torch.contiguous_format)
        lora_shrink(x2.t(), dU.t(), 1.0, out=dA.t(), mask_transposed=True, **mask)
    if need_B:
        dB = (GS * g[:, None]).to(lora_B.dtype)
    keep = xd = None
    if dropout_p > 0 and (need_x or need_w or need_m):
        keep, xd = _dropped(x2, dropout_p, seed)
    if need_m:
        # Z recomputed, not saved (see the module docstring), and kept in fp32 (the Triton GEMM stores its
        # accumulator): a half-precision Z would add a rounding of every term to dm, which is fp32.
        Z = lora_gemm(x2 if xd is None else xd, weight, out_dtype=torch.float32)
        dm = (Z.mul_(G).sum(0) + (lora_B.detach().to(torch.float32) * GS).sum(1)) / n
    if dropout_p == 0:
        Gs = (G * g).to(G.dtype) if need_x or need_w else None
        if need_x:
            dx = masked_dx(Gs, weight, dU, lora_A, 0.0, seed, plan, x.dtype)
        if need_w:
            dw = torch.mm(Gs.t(), x2).to(weight.dtype)
    elif need_x or need_w:
        Gd = (G * (g - 1.0)).to(G.dtype)
        if need_x:
            t = torch.mm(Gd, weight)
            t = torch.where(keep, t * (1.0 / (1.0 - dropout_p)), torch.zeros((), dtype=t.dtype, device=t.device))
            dx = lora_expand(dU, lora_A.t(), addend=t, out=t, **mask).addmm_(G, weight)
        if need_w:
            # One GEMM over the rows of both terms stacked: one rounding of dW instead of two.
            dw = torch.mm(torch.cat((G, Gd)).t(), torch.cat((x2, xd))).to(weight.dtype)
    if dx is not None:
        dx = dx.reshape(x.shape)
    db = G.sum(0, dtype=torch.float32).to(weight.dtype) if need_b else None
    return dx, dw, db, dA, dB, dm


# ---- the call plan (fusedlora/plans/callplan.py) --------------------------------------------------
# dora_linear's arguments: (x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed,
# weight_fn). With gradients forward saves (x, weight, lora_A, lora_B, S, g, n), weight None when
# weight_fn will make it again in backward, and keeps (scaling, seed) as its state.

def check_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_fn) -> float:
    """dora_linear's checks (a build runs them; so does a traced call); returns dropout_p as a float."""
    check_lora_linear(x, weight, bias, lora_A, lora_B)
    check_dora_magnitude(magnitude, weight, lora_A)
    p = checked_scalars(scaling, dropout_p, seed)
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(f"weight_fn must be None or a function returning the weight, got {type(weight_fn).__name__}")
    return p


def dora_plan(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_fn, needs) -> CallPlan:
    """dora_linear's plan for this call's specialization: the checks, the backend, the plans of both
    directions. needs: which of (x, weight, bias, lora_A, lora_B, magnitude) need a gradient, or None."""
    p = check_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_fn)
    if backend_for(x) == "torch":  # torch's autograd takes its gradients; it has no use for weight_fn
        def run(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_fn):
            return torch_backend.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scale_of(scaling), p,
                                             int_seed(seed, p))
        return CallPlan(run=run)
    return with_contiguous(_kernel_plan(x, weight, lora_A, magnitude, p, needs),
                           (x, weight, bias, lora_A, lora_B, magnitude), (2,))


def _kernel_plan(x, weight, lora_A, magnitude, p: float, needs) -> CallPlan:
    x2, N = rows(x), weight.shape[0]
    plan = choose("forward", x2.shape[0], x2.shape[1], N, lora_A.shape[0])
    y_shape, dtype, device = (*x.shape[:-1], N), x.dtype, x.device
    m_dtype = magnitude.dtype

    def forward_(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_fn):
        scaling, seed = scale_of(scaling), int_seed(seed, p)
        y = torch.empty(y_shape, dtype=dtype, device=device)
        S, g, n = forward(plan, rows(x), weight, bias, lora_A, lora_B, magnitude, scaling, p, seed, rows(y))
        return y, (x, weight, lora_A, lora_B, S, g, n), (scaling, seed)

    if needs is None:
        def run(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_fn):
            return forward_(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_fn)[0]
        return CallPlan(run=run)

    def forward_saving(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_fn):
        y, saved, (scaling, seed) = forward_(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed,
                                             weight_fn)
        if weight_fn is not None:  # made again in backward: no N×K tensor lives from forward to backward
            saved = (x, None, *saved[2:])
        return y, saved, (scaling, seed, weight_fn)

    def backward_(dy, saved, state, needs):
        x, weight, lora_A, lora_B, S, g, n = saved
        scaling, seed, weight_fn = state
        if weight is None:
            weight = weight_fn()
        x2 = rows(x)
        plan = choose("backward", x2.shape[0], x2.shape[1], N, lora_A.shape[0])
        *grads, dm = backward(plan, dy, x, weight, lora_A, lora_B, S, g, n, scaling, p, seed, tuple(needs[:6]))
        return (*grads, None if dm is None else dm.to(m_dtype), None, None, None, None)
    return CallPlan(forward=forward_saving, backward=backward_)
