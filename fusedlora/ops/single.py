"""lora_linear and lora_add over the plans, in two wrappers that share one implementation.

- Eager (the common case: training loops, HF generate): a plain torch.autograd.Function, or no
  autograd at all when nothing needs a gradient. The seed is a Python int and nothing is allocated
  for it; the host work per call is a few checks and the kernel launches, and less for calls served
  from the per-shape cache (fusedlora/ops/eager_cache.py).
- Under torch.compile: the custom ops fusedlora::lora_linear / fusedlora::lora_add and their
  backward ops, with fake implementations and registered autograd, so that
  torch.compile(fullgraph=True) traces through them (a raw Triton launch or a plain
  autograd.Function breaks the graph). There the seed is a 0-d int64 CPU tensor, so that a seed
  drawn inside a compiled region stays a graph value and is saved for backward like any other.
Both call fusedlora/plans/single.py; each op picks its plan per direction from the shapes
(fusedlora/plans/planner.py), inside the op, so the choice adds no guard to a compiled graph.
"""
import math
from typing import List, Optional, Tuple

import torch

from fusedlora.core.dropout import check_seed, draw_seed, seed_tensor
from fusedlora.plans import single as plans
from fusedlora.plans.planner import choose


def _rows(x) -> torch.Tensor:
    """x as (M, K): itself when 2-D (a reshape is a dispatch even when it is a view)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _plan(direction, x2, weight, lora_A):
    return choose(direction, x2.shape[0], x2.shape[1], weight.shape[0], lora_A.shape[0])


def _linear_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    # The output is allocated in its final shape and the kernels write a 2-D view of it: a Function
    # that returned a view could not have its output modified in place.
    x2, N = _rows(x), weight.shape[0]
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    S = plans.forward(_plan("forward", x2, weight, lora_A), x2, weight, bias, lora_A, lora_B, scaling, dropout_p,
                      seed, y.view(-1, N))
    return y, S


def _linear_backward(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, needs):
    return plans.backward(_plan("backward", _rows(x), weight, lora_A), dy, x, weight, lora_A, lora_B, S,
                          scaling, dropout_p, seed, needs)


def _add_backward(dy, x, lora_A, lora_B, S, scaling, dropout_p, seed, needs):
    return plans.add_backward(dy, x, lora_A, lora_B, S, scaling, dropout_p, seed, needs,
                              _plan("backward", _rows(x), lora_B, lora_A))


def _add_forward(base, x, lora_A, lora_B, scaling, dropout_p, seed):
    # lora_add follows the single-adapter plan's choice for its rows (B gives N), in both directions.
    N, x2 = base.shape[-1], _rows(x)
    y = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    S = plans.add_forward(_plan("forward", x2, lora_B, lora_A), _rows(base), x2, lora_A, lora_B, scaling, dropout_p,
                          seed, y.view(-1, N))
    return y, S


# ---- eager -------------------------------------------------------------------------------------

class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        y, S = _linear_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        ctx.save_for_backward(x, weight, lora_A, lora_B, S)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, S = ctx.saved_tensors
        grads = _linear_backward(dy, x, weight, lora_A, lora_B, S, ctx.scaling, ctx.dropout_p, ctx.seed,
                                 ctx.needs_input_grad[:5])
        return (*grads, None, None, None)


class _LoRAAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, x, lora_A, lora_B, scaling, dropout_p, seed):
        y, S = _add_forward(base, x, lora_A, lora_B, scaling, dropout_p, seed)
        ctx.save_for_backward(x, lora_A, lora_B, S)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, S = ctx.saved_tensors
        grads = _add_backward(dy, x, lora_A, lora_B, S, ctx.scaling, ctx.dropout_p, ctx.seed,
                              ctx.needs_input_grad[:4])
        return (*grads, None, None, None)


def _int_seed(seed, dropout_p: float) -> int:
    """The seed as a Python int for the eager path: as given, drawn from torch's generator when
    dropout_p > 0 and seed is None, else 0 (no mask is drawn)."""
    if seed is None:
        return int(draw_seed()) if dropout_p > 0 else 0
    check_seed(seed)
    return int(seed)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed) -> torch.Tensor:
    """The kernels' lora_linear for validated inputs (fusedlora.functional checks them)."""
    if torch.compiler.is_compiling():
        return lora_linear_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_tensor(seed, dropout_p))[0]
    seed = _int_seed(seed, dropout_p)
    if _needs_grad(x, weight, bias, lora_A, lora_B):
        return _LoRALinear.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return _linear_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)[0]


def lora_add(base, x, lora_A, lora_B, scaling: float, dropout_p: float, seed) -> torch.Tensor:
    """The kernels' lora_add for validated inputs (fusedlora.functional checks them)."""
    if torch.compiler.is_compiling():
        return lora_add_op(base, x, lora_A, lora_B, scaling, dropout_p, seed_tensor(seed, dropout_p))[0]
    seed = _int_seed(seed, dropout_p)
    if _needs_grad(base, x, lora_A, lora_B):
        return _LoRAAdd.apply(base, x, lora_A, lora_B, scaling, dropout_p, seed)
    return _add_forward(base, x, lora_A, lora_B, scaling, dropout_p, seed)[0]


# ---- torch.compile: custom ops -----------------------------------------------------------------

@torch.library.custom_op("fusedlora::lora_linear", mutates_args=())
def lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                   lora_B: torch.Tensor, scaling: float, dropout_p: float,
                   seed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y: (*, N), S: (M, r) fp32); seed: 0-d int64 CPU tensor. Inputs validated by the caller."""
    return _linear_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, int(seed))


@lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, x.new_empty((math.prod(x.shape[:-1]), lora_A.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fusedlora::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                            lora_B: torch.Tensor, S: torch.Tensor, scaling: float, dropout_p: float,
                            seed: torch.Tensor, needs: List[bool]) -> List[torch.Tensor]:
    """The gradients of (x, weight, bias, lora_A, lora_B) whose flag in `needs` is set, in that order
    (a custom op cannot return None)."""
    grads = _linear_backward(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, int(seed), tuple(needs))
    return [g for g in grads if g is not None]


@lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, S, scaling, dropout_p, seed, needs):
    like = (x, weight, weight.new_empty(weight.shape[0]), lora_A, lora_B)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t, need in zip(like, needs) if need]


def _linear_setup(ctx, inputs, output):
    x, weight, _, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _linear_autograd(ctx, dy, _dS):
    needs = list(ctx.needs_input_grad[:5])
    grads = iter(lora_linear_backward_op(dy, *ctx.saved_tensors[:5], ctx.scaling, ctx.dropout_p,
                                         ctx.saved_tensors[5], needs))
    return (*(next(grads) if need else None for need in needs), None, None, None)


lora_linear_op.register_autograd(_linear_autograd, setup_context=_linear_setup)


@torch.library.custom_op("fusedlora::lora_add", mutates_args=())
def lora_add_op(base: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                dropout_p: float, seed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(base + s·D(x)·Aᵀ·Bᵀ: base's shape and dtype, S: (M, r) fp32). Inputs validated by the caller."""
    return _add_forward(base, x, lora_A, lora_B, scaling, dropout_p, int(seed))


@lora_add_op.register_fake
def _(base, x, lora_A, lora_B, scaling, dropout_p, seed):
    S = x.new_empty((math.prod(x.shape[:-1]), lora_A.shape[0]), dtype=torch.float32)
    return torch.empty_like(base, memory_format=torch.contiguous_format), S


@torch.library.custom_op("fusedlora::lora_add_backward", mutates_args=())
def lora_add_backward_op(dy: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                         S: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor,
                         needs: List[bool]) -> List[torch.Tensor]:
    """The gradients of (x, lora_A, lora_B) whose flag in `needs` is set, in that order. The gradient
    of base is dy itself and never passes through the op (an op's output may not alias its input)."""
    grads = _add_backward(dy, x, lora_A, lora_B, S, scaling, dropout_p, int(seed), (False, *needs))
    return [g for g in grads[1:] if g is not None]


@lora_add_backward_op.register_fake
def _(dy, x, lora_A, lora_B, S, scaling, dropout_p, seed, needs):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t, need in zip((x, lora_A, lora_B), needs)
            if need]


def _add_setup(ctx, inputs, output):
    _, x, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _add_autograd(ctx, dy, _dS):
    need_base, *needs = ctx.needs_input_grad[:4]
    grads = iter(lora_add_backward_op(dy, *ctx.saved_tensors[:4], ctx.scaling, ctx.dropout_p,
                                      ctx.saved_tensors[4], list(needs)) if any(needs) else [])
    return (dy if need_base else None, *(next(grads) if need else None for need in needs), None, None, None)


lora_add_op.register_autograd(_add_autograd, setup_context=_add_setup)
