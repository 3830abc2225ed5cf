"""dora_linear over the plans (fusedlora/plans/dora.py): an autograd Function for eager use, or no
autograd at all when nothing needs a gradient.

Not a torch.compile custom op yet: a raw Triton launch inside a compiled region breaks it, so under
torch.compile the call runs the PyTorch backend (fusedlora/core/torch_backend.py: the same layer in
torch ops, traced whole, its row norms from W·Aᵀ and A·Aᵀ as well).
"""
import torch

from fusedlora.core import torch_backend
from fusedlora.ops.single import _int_seed, _needs_grad, _rows
from fusedlora.plans import dora as plans
from fusedlora.plans.planner import choose


def _plan(direction, x2, weight, lora_A):
    return choose(direction, x2.shape[0], x2.shape[1], weight.shape[0], lora_A.shape[0])


def _forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed):
    x2, N = _rows(x), weight.shape[0]
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    saved = plans.forward(_plan("forward", x2, weight, lora_A), x2, weight, bias, lora_A, lora_B, magnitude,
                          scaling, dropout_p, seed, y.view(-1, N))
    return y, saved


class _DoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_fn):
        y, (S, g, n) = _forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed)
        # With weight_fn the weight is made again in backward instead of being kept (see dora_linear).
        ctx.save_for_backward(x, weight if weight_fn is None else None, lora_A, lora_B, S, g, n)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.m_dtype = scaling, dropout_p, seed, magnitude.dtype
        ctx.weight_fn = weight_fn
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, S, g, n = ctx.saved_tensors
        if ctx.weight_fn is not None:
            weight = ctx.weight_fn()
        plan = _plan("backward", _rows(x), weight, lora_A)
        *grads, dm = plans.backward(plan, dy, x, weight, lora_A, lora_B, S, g, n, ctx.scaling, ctx.dropout_p,
                                    ctx.seed, ctx.needs_input_grad[:6])
        return (*grads, None if dm is None else dm.to(ctx.m_dtype), None, None, None, None)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling: float, dropout_p: float, seed,
                weight_fn=None) -> torch.Tensor:
    """The kernels' dora_linear for validated inputs (fusedlora.functional checks them). weight_fn: None,
    or a function that returns weight again, called in backward instead of keeping weight."""
    if torch.compiler.is_compiling():
        return torch_backend.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed)
    seed = _int_seed(seed, dropout_p)
    if _needs_grad(x, weight, bias, lora_A, lora_B, magnitude):
        return _DoRALinear.apply(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_fn)
    return _forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed)[0]
