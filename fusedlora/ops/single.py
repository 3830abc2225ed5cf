"""lora_linear and lora_add: every call runs its call plan (fusedlora/plans/single.py), eager or compiled.

- Eager (training loops, HF generate): the call's key (fusedlora/core/specialization.py) finds its plan,
  or the plan is built (checks, backend, plan choice, bound launches) and kept; a call without
  gradients runs it directly, a call with gradients through PlannedCall (fusedlora/ops/call.py). The
  seed is a Python int and nothing is allocated for it.
- Under torch.compile: the custom ops fusedlora::lora_linear / fusedlora::lora_add and their backward
  ops, with fake implementations and registered autograd, so that torch.compile(fullgraph=True) traces
  through them (a raw Triton launch or a plain autograd.Function breaks the graph). Each op's body looks
  its plan up (or builds it) with the tensors it is given and runs it. There the seed is a 0-d int64 CPU
  tensor, so that a seed drawn inside a compiled region stays a graph value and is saved for backward.
Each plan picks its launches per direction from the shapes, inside the op, so the choice adds no guard
to a compiled graph.
"""
import math
from typing import List, Optional, Tuple

import torch

from fusedlora.core import torch_backend
from fusedlora.core.backend import backend_for
from fusedlora.core.checks import check_lora_add, check_lora_linear, require_scalar
from fusedlora.core.dropout import seed_tensor
from fusedlora.core.specialization import OPTIONAL, PER_CALL, TENSOR, VALUE, Signature
from fusedlora.ops.call import PlannedCall, planned
from fusedlora.plans.single import add_plan, linear_plan

LINEAR = Signature("lora_linear", x=TENSOR, weight=TENSOR, bias=OPTIONAL, lora_A=TENSOR, lora_B=TENSOR,
                   scaling=PER_CALL, dropout_p=VALUE, seed=PER_CALL)
ADD = Signature("lora_add", base=TENSOR, x=TENSOR, lora_A=TENSOR, lora_B=TENSOR, scaling=PER_CALL, dropout_p=VALUE,
                seed=PER_CALL)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> torch.Tensor:
    """fusedlora.lora_linear (fusedlora/functional.py documents it)."""
    if torch.compiler.is_compiling():
        return _compiled_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    key = LINEAR.key(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    plan = LINEAR.plans.get(key)
    if plan is None:
        plan = planned(LINEAR, key, linear_plan, (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed))
    if plan.run is not None:
        return plan.run(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return PlannedCall.apply(plan, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def lora_add(base, x, lora_A, lora_B, scaling, dropout_p, seed) -> torch.Tensor:
    """fusedlora.lora_add (fusedlora/functional.py documents it)."""
    if torch.compiler.is_compiling():
        return _compiled_add(base, x, lora_A, lora_B, scaling, dropout_p, seed)
    key = ADD.key(base, x, lora_A, lora_B, scaling, dropout_p, seed)
    plan = ADD.plans.get(key)
    if plan is None:
        plan = planned(ADD, key, add_plan, (base, x, lora_A, lora_B, scaling, dropout_p, seed))
    if plan.run is not None:
        return plan.run(base, x, lora_A, lora_B, scaling, dropout_p, seed)
    return PlannedCall.apply(plan, base, x, lora_A, lora_B, scaling, dropout_p, seed)


# ---- torch.compile ------------------------------------------------------------------------------
# The checks and the backend choice are traced (plain Python on shapes); the kernels run in custom ops.
# A custom op's body is autograd's business from outside, so it asks for the plan with gradients
# (forward saves S) whatever the tensors say; the backward op is told which gradients to compute.
_ALL = (True,) * 5


def _compiled_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    check_lora_linear(x, weight, bias, lora_A, lora_B)
    scaling = require_scalar("scaling", scaling)
    dropout_p = require_scalar("dropout_p", dropout_p, low=0.0, high=1.0)
    if backend_for(x) == "torch":
        return torch_backend.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return lora_linear_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_tensor(seed, dropout_p))[0]


def _compiled_add(base, x, lora_A, lora_B, scaling, dropout_p, seed):
    check_lora_add(base, x, lora_A, lora_B)
    scaling = require_scalar("scaling", scaling)
    dropout_p = require_scalar("dropout_p", dropout_p, low=0.0, high=1.0)
    if backend_for(x) == "torch":
        return torch_backend.lora_add(base, x, lora_A, lora_B, scaling, dropout_p, seed)
    return lora_add_op(base, x, lora_A, lora_B, scaling, dropout_p, seed_tensor(seed, dropout_p))[0]


def _op_plan(signature, build, args, tensors: int):
    """The plan with gradients of an op's first `tensors` arguments."""
    needs = _ALL[:tensors]
    key = signature.key(*args, needs=needs)
    return signature.plans.get(key) or planned(signature, key, build, args, needs=needs)


@torch.library.custom_op("fusedlora::lora_linear", mutates_args=())
def lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                   lora_B: torch.Tensor, scaling: float, dropout_p: float,
                   seed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y: (*, N), S: (M, r) fp32); seed: 0-d int64 CPU tensor. Inputs validated by the caller."""
    plan = _op_plan(LINEAR, linear_plan, (x, weight, bias, lora_A, lora_B, scaling, dropout_p, None), 5)
    y, saved, _ = plan.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, int(seed))
    return y, saved[-1]


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
    plan = _op_plan(LINEAR, linear_plan, (x, weight, None, lora_A, lora_B, scaling, dropout_p, None), 5)
    grads = plan.backward(dy, (x, weight, lora_A, lora_B, S), (scaling, int(seed)), tuple(needs))
    return [g for g in grads[:5] if g is not None]


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
    plan = _op_plan(ADD, add_plan, (base, x, lora_A, lora_B, scaling, dropout_p, None), 4)
    y, saved, _ = plan.forward(base, x, lora_A, lora_B, scaling, dropout_p, int(seed))
    return y, saved[-1]


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
    base = dy  # the base's specialization is dY's (same shape and dtype); the plan reads no base in backward
    plan = _op_plan(ADD, add_plan, (base, x, lora_A, lora_B, scaling, dropout_p, None), 4)
    grads = plan.backward(dy, (x, None, lora_A, lora_B, S), (scaling, int(seed)), (False, *needs))
    return [g for g in grads[1:4] if g is not None]


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
