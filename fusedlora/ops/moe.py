"""moe_lora_linear: every call runs its call plan (fusedlora/plans/moe.py), eager or compiled.

- Eager: the call's key (fusedlora/core/specialization.py; the ExpertRouting's `spec` stands for its
  grouping) finds its plan, or the plan is built (checks, backend, choose_moe's plan) and kept; a call
  with gradients runs through PlannedCall (fusedlora/ops/call.py), whose state holds the routing, so
  backward reuses the grouping forward used.
- Under torch.compile: the custom ops fusedlora::moe_lora_linear -> (y, S) and its backward take the
  routing's tensors (the ids and the grouping the ExpertRouting made, traced in the graph), rebuild the
  routing object from them without sorting again (ExpertRouting.from_grouping) and run the same plan.
  With the PyTorch backend (or without adapters) the call is traced whole instead.
"""
from typing import List, Optional, Tuple

import torch

from fusedlora.core import moe_torch
from fusedlora.core.backend import backend_for
from fusedlora.core.checks import check_moe, require_scalar
from fusedlora.core.dropout import seed_tensor
from fusedlora.core.moe_routing import ExpertRouting
from fusedlora.core.specialization import OPTIONAL, PER_CALL, SCALE, SPEC, TENSOR, VALUE, Signature
from fusedlora.ops.call import PlannedCall, planned
from fusedlora.plans.moe import moe_plan

MOE = Signature("moe_lora_linear", x=TENSOR, routing=SPEC, weight=TENSOR, bias=OPTIONAL, lora_A=OPTIONAL,
                lora_B=OPTIONAL, scaling=SCALE, dropout_p=VALUE, seed=PER_CALL, gather=VALUE, ranks=OPTIONAL)


def moe_lora_linear(x, routing, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gather, ranks):
    """fusedlora.moe_lora_linear (fusedlora/moe.py documents it)."""
    args = (x, routing, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gather, ranks)
    if torch.compiler.is_compiling():
        return _compiled(*args)
    key = MOE.key(*args)
    plan = MOE.plans.get(key)
    if plan is None:
        plan = planned(MOE, key, moe_plan, args)
    if plan.run is not None:
        return plan.run(*args)
    return PlannedCall.apply(plan, *args)


# ---- torch.compile ------------------------------------------------------------------------------
_ALL = (True,) * 6  # of (x, weight, bias, lora_A, lora_B, ranks), as the key counts them


def _compiled(x, routing, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gather, ranks):
    check_moe(x, routing, weight, bias, lora_A, lora_B, scaling, ranks, gather)
    dropout_p = require_scalar("dropout_p", dropout_p, low=0.0, high=1.0)
    if lora_A is None or backend_for(x) == "torch":
        return moe_torch.moe_lora_linear(x, routing, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gather,
                                         ranks)
    tensor = isinstance(scaling, torch.Tensor)
    scale = 1.0 if tensor else require_scalar("scaling", scaling)
    return moe_lora_linear_op(x, routing.top_k_index, routing.adapter_ids, routing.order, routing.keys,
                              routing.seg_starts, routing.num_experts, routing.num_adapters, weight, bias, lora_A,
                              lora_B, scale, scaling if tensor else None, dropout_p, seed_tensor(seed, dropout_p),
                              gather, ranks)[0]


def _op_plan(x, top_k_index, adapter_ids, order, keys, seg_starts, E, L, weight, bias, lora_A, lora_B, scale,
             scales, dropout_p, gather, ranks):
    """(the plan with gradients, its arguments but the seed), as an op's body runs it."""
    routing = ExpertRouting.from_grouping(top_k_index, E, adapter_ids, L, order, keys, seg_starts)
    args = (x, routing, weight, bias, lora_A, lora_B, scale if scales is None else scales, dropout_p, None, gather,
            ranks)
    key = MOE.key(*args, needs=_ALL)
    return MOE.plans.get(key) or planned(MOE, key, moe_plan, args, needs=_ALL), args


@torch.library.custom_op("fusedlora::moe_lora_linear", mutates_args=())
def moe_lora_linear_op(x: torch.Tensor, top_k_index: torch.Tensor, adapter_ids: Optional[torch.Tensor],
                       order: torch.Tensor, keys: torch.Tensor, seg_starts: torch.Tensor, num_experts: int,
                       num_adapters: int, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scale: float, scales: Optional[torch.Tensor], dropout_p: float,
                       seed: torch.Tensor, gather: bool, ranks: Optional[torch.Tensor]
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y: (P, N) sorted, S: (P, R) fp32 sorted). The routing as its ExpertRouting's tensors; scaling as a
    float `scale` or the (L,) tensor `scales`. Inputs validated by the caller."""
    plan, args = _op_plan(x, top_k_index, adapter_ids, order, keys, seg_starts, num_experts, num_adapters, weight,
                          bias, lora_A, lora_B, scale, scales, dropout_p, gather, ranks)
    y, saved, _ = plan.forward(*args[:8], int(seed), *args[9:])
    return y, saved[4]


@moe_lora_linear_op.register_fake
def _(x, top_k_index, adapter_ids, order, keys, seg_starts, num_experts, num_adapters, weight, bias, lora_A, lora_B,
      scale, scales, dropout_p, seed, gather, ranks):
    P = order.shape[0]
    return x.new_empty((P, weight.shape[1])), x.new_empty((P, lora_A.shape[2]), dtype=torch.float32)


@torch.library.custom_op("fusedlora::moe_lora_linear_backward", mutates_args=())
def moe_lora_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, top_k_index: torch.Tensor,
                                adapter_ids: Optional[torch.Tensor], order: torch.Tensor, keys: torch.Tensor,
                                seg_starts: torch.Tensor, num_experts: int, num_adapters: int, weight: torch.Tensor,
                                lora_A: torch.Tensor, lora_B: torch.Tensor, S: torch.Tensor, scale: float,
                                scales: Optional[torch.Tensor], dropout_p: float, seed: torch.Tensor, gather: bool,
                                ranks: Optional[torch.Tensor], needs: List[bool]) -> List[torch.Tensor]:
    """The gradients of (x, weight, bias, lora_A, lora_B) whose flag in `needs` is set, in that order."""
    plan, (x, routing, *_) = _op_plan(x, top_k_index, adapter_ids, order, keys, seg_starts, num_experts,
                                      num_adapters, weight, None, lora_A, lora_B, scale, scales, dropout_p, gather,
                                      ranks)
    need_x, need_w, need_b, need_A, need_B = needs
    grads = plan.backward(dy, (x, weight, lora_A, lora_B, S, ranks, scales),
                          (routing, None if scales is not None else scale, int(seed)),
                          (need_x, False, need_w, need_b, need_A, need_B))
    return [g for g in (grads[0], *grads[2:6]) if g is not None]


@moe_lora_linear_backward_op.register_fake
def _(dy, x, top_k_index, adapter_ids, order, keys, seg_starts, num_experts, num_adapters, weight, lora_A, lora_B, S,
      scale, scales, dropout_p, seed, gather, ranks, needs):
    like = (x, weight, weight.new_empty(weight.shape[:2]), lora_A, lora_B)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t, need in zip(like, needs) if need]


def _setup_context(ctx, inputs, output):
    (x, top_k_index, adapter_ids, order, keys, seg_starts, E, L, weight, _, lora_A, lora_B, scale, scales, dropout_p,
     seed, gather, ranks) = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, top_k_index, adapter_ids, order, keys, seg_starts, weight, lora_A, lora_B, output[1],
                          scales, seed, ranks)
    ctx.E, ctx.L, ctx.scale, ctx.dropout_p, ctx.gather = E, L, scale, dropout_p, gather


def _autograd(ctx, dy, _dS):
    x, top_k_index, adapter_ids, order, keys, seg_starts, weight, lora_A, lora_B, S, scales, seed, ranks = \
        ctx.saved_tensors
    flags = ctx.needs_input_grad
    needs = [flags[0], flags[8], flags[9], flags[10], flags[11]]
    grads = iter(moe_lora_linear_backward_op(dy, x, top_k_index, adapter_ids, order, keys, seg_starts, ctx.E, ctx.L,
                                             weight, lora_A, lora_B, S, ctx.scale, scales, ctx.dropout_p, seed,
                                             ctx.gather, ranks, needs) if any(needs) else [])
    dx, dw, db, dA, dB = (next(grads) if need else None for need in needs)
    return (dx, None, None, None, None, None, None, None, dw, db, dA, dB, None, None, None, None, None, None)


moe_lora_linear_op.register_autograd(_autograd, setup_context=_setup_context)
