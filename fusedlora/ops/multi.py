"""multi_lora_linear over the plans, in two wrappers that share one implementation (as fusedlora/ops/single.py).

- Eager (serving loops, HF generate, training): a plain torch.autograd.Function, or no autograd at all
  when nothing needs a gradient. The AdapterBatch travels as the Python object it is, so backward
  reuses the grouping that forward made (or that an earlier layer made for the same batch).
- Under torch.compile: the custom ops fusedlora::multi_lora_linear -> (y, S) and
  fusedlora::multi_lora_linear_backward, with fake implementations and registered autograd, so that
  torch.compile(fullgraph=True) traces through them. A custom op takes tensors, not objects: the
  batch's flat ids go in, with its grouping (order, sorted_ids, starts) when the batch already holds
  one; else the op groups inside where its plan needs it (and again in backward: a compiled training
  step under a grouping plan over a batch built inside the compiled region sorts twice).
Each op picks its plan per direction from the shapes, inside the op, so the choice adds no guard to a
compiled graph.
"""
import math
from typing import List, Optional, Tuple

import torch

from fusedlora.core import knobs
from fusedlora.core.adapter_batch import AdapterBatch, group_by_adapter
from fusedlora.kernels import configs
from fusedlora.ops.eager_cache import _fp32_precision
from fusedlora.plans import multi as plans
from fusedlora.plans.planner import choose_multi


def _plan(direction, x, weight, lora_A):
    L, R, K = lora_A.shape
    return choose_multi(direction, x.numel() // K if K else 0, K, weight.shape[0], R, L)


def _forward(plan, x, weight, bias, lora_A, lora_B, scalings, ranks, ids, groups, need_S, col_scale=None):
    # The output is allocated in its final shape and the kernels write a 2-D view of it: a Function
    # that returned a view could not have its output modified in place.
    K, N = x.shape[-1], weight.shape[0]
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    S = plans.forward(plan, x.reshape(-1, K), weight, bias, lora_A, lora_B, scalings, ranks, ids, groups, need_S,
                      y.view(-1, N), col_scale)
    return y, S


# ---- eager -------------------------------------------------------------------------------------

def _eager_groups(plan, batch: AdapterBatch):
    return None if plan == "decode" else batch.groups()


class _MultiLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scalings, ranks, batch):
        plan = _plan("forward", x, weight, lora_A)
        y, S = _forward(plan, x, weight, bias, lora_A, lora_B, scalings, ranks, batch.flat,
                        _eager_groups(plan, batch), need_S=True)
        ctx.save_for_backward(x, weight, lora_A, lora_B, scalings, ranks, S)
        ctx.batch = batch
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, scalings, ranks, S = ctx.saved_tensors
        plan, batch = _plan("backward", x, weight, lora_A), ctx.batch
        grads = plans.backward(plan, dy, x, weight, lora_A, lora_B, scalings, ranks, S, batch.flat,
                               _eager_groups(plan, batch), ctx.needs_input_grad[:5])
        return (*grads, None, None, None)


def multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, batch: AdapterBatch, ranks,
                      col_scale=None) -> torch.Tensor:
    """The kernels' multi_lora_linear for validated inputs (fusedlora.multi checks them and builds the
    batch). col_scale (DoRA): eager and without gradients only; fusedlora.multi sends other calls
    with one to the PyTorch backend."""
    if col_scale is not None:
        plan = _plan("forward", x, weight, lora_A)
        return _forward(plan, x, weight, bias, lora_A, lora_B, scalings, ranks, batch.flat,
                        _eager_groups(plan, batch), need_S=False, col_scale=col_scale)[0]
    if torch.compiler.is_compiling():
        return multi_lora_linear_op(x, weight, bias, lora_A, lora_B, scalings, batch.flat, ranks,
                                    *batch.cached_groups)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B)):
        return _MultiLoRA.apply(x, weight, bias, lora_A, lora_B, scalings, ranks, batch)
    plan = _plan("forward", x, weight, lora_A)
    return _forward(plan, x, weight, bias, lora_A, lora_B, scalings, ranks, batch.flat, _eager_groups(plan, batch),
                    need_S=False)[0]


# ---- eager calls without gradients over an AdapterBatch: a per-shape cache ------------------------
# As for lora_linear (fusedlora/ops/eager_cache.py): the checks, plan, grids, strides and constexprs of a call
# depend only on what `fast_key` reads, so they are worked out once per key by the full path and kept
# as an entry; every call passes its own tensors. The key: each tensor's type, shape, strides, dtype,
# device and address modulo 16 (x, weight, bias, lora_A, lora_B, scalings, the batch's flat ids,
# ranks), the batch's adapter count, the raw FUSEDLORA_BACKEND and FUSEDLORA_PLAN, and for float32 x
# torch's fp32 matmul precision. The batch's ids were checked when it was built; ranks' values are
# checked per call where the full path checks them. kernels/configs.clear_caches clears it too.
_FAST = {}
configs.CLEAR_HOOKS.append(_FAST.clear)


def _meta(t):
    return None if t is None else (type(t), t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15)


def fast_key(x, weight, bias, lora_A, lora_B, scalings, batch, ranks):
    """The cache key of an eager multi_lora_linear call over an AdapterBatch, or None when it needs a
    gradient or cannot be keyed."""
    try:
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or lora_A.requires_grad
                                        or lora_B.requires_grad or (bias is not None and bias.requires_grad)):
            return None
        dtype = x.dtype
        return (_meta(x), _meta(weight), _meta(bias), _meta(lora_A), _meta(lora_B), _meta(scalings),
                _meta(batch.flat), batch.num_adapters, _meta(ranks), knobs.call_state(),
                _fp32_precision() if dtype is torch.float32 else None)
    except (AttributeError, TypeError, RuntimeError):
        return None


class _Decode:
    """The decode plan's forward: its two launches (the shrink, then the GEMM with each row's adapter
    term) into y."""
    __slots__ = ("run", "y_shape", "dtype", "device")

    def __call__(self, x, weight, bias, lora_A, lora_B, scalings, batch, ranks):
        # y is new and contiguous: its data starts where its 2-D view's does (the launches' strides are
        # fixed). x of more dimensions may not be viewable as 2-D: reshaped as the full path does.
        y = torch.empty(self.y_shape, dtype=self.dtype, device=self.device)
        self.run(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), weight, lora_A, lora_B, scalings, batch.flat,
                 ranks, bias, y)
        return y


class _Planned:
    """Any other call: the plan chosen once, the launches as the full path makes them."""
    __slots__ = ("plan",)

    def __call__(self, x, weight, bias, lora_A, lora_B, scalings, batch, ranks):
        return _forward(self.plan, x, weight, bias, lora_A, lora_B, scalings, ranks, batch.flat,
                        _eager_groups(self.plan, batch), need_S=False)[0]


def fast_entry(key, x, weight, bias, lora_A, lora_B, scalings, batch, ranks):
    """Make and keep the entry for `key`, from a call that passed every check (Triton backend)."""
    plan = _plan("forward", x, weight, lora_A)
    K, N = x.shape[-1], weight.shape[0]
    M, L = x.numel() // K if K else 0, lora_A.shape[0]
    if plan == "decode" and M > 0 and K > 0 and N > 0 and L > 0:  # decode: M within the kernels' bound
        entry = _Decode()
        entry.y_shape, entry.dtype, entry.device = (*x.shape[:-1], N), x.dtype, x.device
        x2 = x.reshape(-1, K)
        entry.run = plans.decode_launcher(x2, weight, lora_A, lora_B, scalings, batch.flat, ranks, bias,
                                          torch.empty((M, N), dtype=x.dtype, device=x.device))
    else:
        entry = _Planned()
        entry.plan = plan
    if len(_FAST) >= 4096:
        _FAST.clear()
    _FAST[key] = entry
    return entry


# The entry kept for a key, or None (the dict's own get: no Python frame of its own).
fast_lookup = _FAST.get


# ---- torch.compile: custom ops -----------------------------------------------------------------

def _op_groups(plan, ids, lora_A, order, sorted_ids, starts):
    """The grouping passed in, else made here when the plan needs one. ids: flat (M,)."""
    if plan == "decode":
        return None
    return (order, sorted_ids, starts) if order is not None else group_by_adapter(ids, lora_A.shape[0])


def _flat(adapter_ids):
    return adapter_ids.reshape(-1).contiguous()  # a no-op for the AdapterBatch's flat ids


@torch.library.custom_op("fusedlora::multi_lora_linear", mutates_args=())
def multi_lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                         lora_B: torch.Tensor, scalings: torch.Tensor, adapter_ids: torch.Tensor,
                         ranks: Optional[torch.Tensor], order: Optional[torch.Tensor],
                         sorted_ids: Optional[torch.Tensor], starts: Optional[torch.Tensor]
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y: (*, N), S: (M, R) fp32 in token order). adapter_ids: x.shape[:-1] or flat (M,); ranks: (L,) or
    None; order, sorted_ids, starts: group_by_adapter's grouping of the flat ids, or None. Inputs
    validated by the caller."""
    plan, ids = _plan("forward", x, weight, lora_A), _flat(adapter_ids)
    return _forward(plan, x, weight, bias, lora_A, lora_B, scalings, ranks, ids,
                    _op_groups(plan, ids, lora_A, order, sorted_ids, starts), need_S=True)


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
    plan, ids = _plan("backward", x, weight, lora_A), _flat(adapter_ids)
    grads = plans.backward(plan, dy, x, weight, lora_A, lora_B, scalings, ranks, S, ids,
                           _op_groups(plan, ids, lora_A, order, sorted_ids, starts), tuple(needs))
    return [g for g in grads if g is not None]


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
