"""multi_lora_linear: every call runs its call plan (fusedlora/plans/multi.py), eager or compiled.

- Eager (serving loops, HF generate, training): the call's key (fusedlora/core/specialization.py; the
  AdapterBatch's `spec` stands for its ids) finds its plan, or the plan is built and kept; a call with
  gradients runs through PlannedCall (fusedlora/ops/call.py), whose saved state is the batch itself, so
  backward reuses the grouping forward made (or that an earlier layer made for the same batch).
- Under torch.compile: the custom ops fusedlora::multi_lora_linear -> (y, S) and
  fusedlora::multi_lora_linear_backward, with fake implementations and registered autograd, so that
  torch.compile(fullgraph=True) traces through them. A custom op takes tensors, not objects: the
  batch's flat ids go in, with its grouping (order, sorted_ids, starts) when the batch already holds
  one; the op's body makes a batch of them (its ids unchecked: they never are under torch.compile) and
  runs its plan, which groups where it needs to (again in backward: a compiled training step under a
  grouping plan over a batch built inside the compiled region sorts twice).
Each plan picks its launches per direction from the shapes, inside the op, so the choice adds no guard
to a compiled graph.
"""
import math
from typing import List, Optional, Tuple

import torch

from fusedlora.core import torch_backend
from fusedlora.core.adapter_batch import AdapterBatch
from fusedlora.core.backend import backend_for
from fusedlora.core.checks import check_col_scale, check_multi
from fusedlora.core.specialization import OPTIONAL, SPEC, TENSOR, Signature
from fusedlora.ops.call import PlannedCall, planned
from fusedlora.plans.multi import check_batch_size, multi_plan

MULTI = Signature("multi_lora_linear", x=TENSOR, weight=TENSOR, bias=OPTIONAL, lora_A=TENSOR, lora_B=TENSOR,
                  scalings=TENSOR, batch=SPEC, ranks=OPTIONAL, col_scale=OPTIONAL)


def multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, batch: AdapterBatch, ranks,
                      col_scale=None) -> torch.Tensor:
    """fusedlora.multi_lora_linear over an AdapterBatch (fusedlora/multi.py documents it)."""
    if torch.compiler.is_compiling():
        return _compiled(x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale)
    key = MULTI.key(x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale)
    plan = MULTI.plans.get(key)
    if plan is None:
        plan = planned(MULTI, key, multi_plan, (x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale))
    if plan.run is not None:
        return plan.run(x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale)
    return PlannedCall.apply(plan, x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale)


def _compiled(x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale):
    check_multi(x, weight, bias, lora_A, lora_B, scalings, batch.ids, ranks, values=False)
    check_batch_size(batch, lora_A)
    if col_scale is not None:  # DoRA's scale: traced through the PyTorch backend, differentiable in it too
        check_col_scale(col_scale, weight, lora_A)
        return torch_backend.multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, batch.ids, ranks, col_scale)
    if backend_for(x) == "torch":
        return torch_backend.multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, batch.ids, ranks)
    return multi_lora_linear_op(x, weight, bias, lora_A, lora_B, scalings, batch.flat, ranks, *batch.cached_groups)[0]


# ---- torch.compile: custom ops -----------------------------------------------------------------

_ALL = (True,) * 5


def _op_plan(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, order, sorted_ids, starts):
    """(the plan with gradients of these arguments, the arguments it takes), as an op's body runs it.
    adapter_ids: x.shape[:-1] or flat; the batch made of them is the plan's."""
    ids = adapter_ids.reshape(x.shape[:-1])  # a view of the AdapterBatch's flat ids
    batch = AdapterBatch.grouped(ids, lora_A.shape[0], (order, sorted_ids, starts) if order is not None else None)
    args = (x, weight, bias, lora_A, lora_B, scalings, batch, ranks, None)
    key = MULTI.key(*args, needs=_ALL)
    plan = MULTI.plans.get(key) or planned(MULTI, key, multi_plan, args, needs=_ALL)
    return plan, args


@torch.library.custom_op("fusedlora::multi_lora_linear", mutates_args=())
def multi_lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                         lora_B: torch.Tensor, scalings: torch.Tensor, adapter_ids: torch.Tensor,
                         ranks: Optional[torch.Tensor], order: Optional[torch.Tensor],
                         sorted_ids: Optional[torch.Tensor], starts: Optional[torch.Tensor]
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y: (*, N), S: (M, R) fp32 in token order). adapter_ids: x.shape[:-1] or flat (M,); ranks: (L,) or
    None; order, sorted_ids, starts: group_by_adapter's grouping of the flat ids, or None. Inputs
    validated by the caller."""
    plan, args = _op_plan(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, order, sorted_ids, starts)
    y, saved, _ = plan.forward(*args)
    return y, saved[-1]


@multi_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, order, sorted_ids, starts):
    M, R = math.prod(x.shape[:-1]), lora_A.shape[1]
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((M, R), dtype=torch.float32)


@torch.library.custom_op("fusedlora::multi_lora_linear_backward", mutates_args=())
def multi_lora_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                                  lora_B: torch.Tensor, scalings: torch.Tensor, adapter_ids: torch.Tensor,
                                  ranks: Optional[torch.Tensor], S: torch.Tensor, order: Optional[torch.Tensor],
                                  sorted_ids: Optional[torch.Tensor], starts: Optional[torch.Tensor],
                                  needs: List[bool]) -> List[torch.Tensor]:
    """The gradients of (x, weight, bias, lora_A, lora_B) whose flag in `needs` is set, in that order
    (a custom op cannot return None)."""
    plan, (x, weight, _, lora_A, lora_B, scalings, batch, ranks, _) = _op_plan(
        x, weight, None, lora_A, lora_B, scalings, adapter_ids, ranks, order, sorted_ids, starts)
    grads = plan.backward(dy, (x, weight, lora_A, lora_B, scalings, ranks, S), (batch,), tuple(needs))
    return [g for g in grads[:5] if g is not None]


@multi_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, scalings, adapter_ids, ranks, S, order, sorted_ids, starts, needs):
    like = (x, weight, weight.new_empty(weight.shape[0]), lora_A, lora_B)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t, need in zip(like, needs) if need]


def _setup_context(ctx, inputs, output):
    x, weight, _, lora_A, lora_B, scalings, adapter_ids, ranks, order, sorted_ids, starts = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, lora_A, lora_B, scalings, adapter_ids, ranks, output[1], order, sorted_ids,
                          starts)


def _autograd(ctx, dy, _dS):
    needs = list(ctx.needs_input_grad[:5])
    grads = iter(multi_lora_linear_backward_op(dy, *ctx.saved_tensors, needs))
    return (*(next(grads) if need else None for need in needs), *(None,) * 6)


multi_lora_linear_op.register_autograd(_autograd, setup_context=_setup_context)
