"""The public functional API: validate, pick the backend, call the op."""
from typing import Callable, Optional, Union

import torch

from fusedlora.core import torch_backend
from fusedlora.core.backend import backend_for
from fusedlora.core.checks import check_dora_magnitude, check_lora_add, check_lora_linear, require_scalar
from fusedlora.ops import dora as dora_ops
from fusedlora.ops import eager_cache as cache
from fusedlora.ops import single as ops

Seed = Union[int, torch.Tensor, None]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Seed = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ, fused.

    x: (*, K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r) -> (*, N) in x's
    dtype. x, weight and bias are float32, float16 or bfloat16; lora_A and lora_B are in x's dtype
    or float32. Dropout (probability dropout_p, on the low-rank path only) keeps element (m, k) of x
    by Philox from (seed, m, k): `dropout_mask(seed, x.shape, dropout_p)` is that mask. seed: an
    int in [0, 2**63), a 0-d int64 CPU tensor, or None to draw one from torch's default generator
    (only when dropout_p > 0).
    Differentiable in x, weight, bias, lora_A and lora_B. Runs under torch.compile(fullgraph=True)
    (the kernels are the custom op fusedlora::lora_linear) and activation checkpointing. The
    execution plan (FUSEDLORA_PLAN, fusedlora/plans/planner.py) does not change the result beyond rounding.
    An eager call is served from a per-shape cache after its first call (fusedlora/ops/eager_cache.py says
    what the key holds; a call with gradients is keyed with which inputs need one): the same result and
    gradients, less host time.
    """
    key = None
    if not torch.compiler.is_compiling():
        key = cache.fast_key(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
        entry = cache.fast_lookup(key)
        if entry is not None:
            y = entry(x, weight, bias, lora_A, lora_B, scaling, seed)
            if y is not None:  # None: a scaling that is not finite, which the checks below report
                return y
    check_lora_linear(x, weight, bias, lora_A, lora_B)
    scaling = require_scalar("scaling", scaling)
    dropout_p = require_scalar("dropout_p", dropout_p, low=0.0, high=1.0)
    backend = backend_for(x)
    if key is not None:
        return cache.fast_entry(key, backend, x, weight, bias, lora_A, lora_B, dropout_p, seed)(
            x, weight, bias, lora_A, lora_B, scaling, seed)
    if backend == "torch":
        return torch_backend.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return ops.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def lora_add(
    base: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Seed = None,
) -> torch.Tensor:
    """base + scaling·(dropout(x)·Aᵀ)·Bᵀ: the LoRA update added to the output of a base layer that
    fusedlora does not own (a quantized Linear, a stacked tuner, any module).

    base: (*, N), the base layer's output for x: (*, K); lora_A: (r, K); lora_B: (N, r) -> (*, N) in
    base's dtype (a new tensor; base is not modified). Dtypes, dropout and seed as in lora_linear.
    Differentiable in base (its gradient is the output's), x, lora_A and lora_B: the base layer's own
    autograd carries the gradient of x through base. Up to 64 rows (rank up to 64) each direction is
    one launch, as lora_linear's; above, a shrink and an expand kernel (and dU's pass in backward);
    x·Wᵀ is whatever the base layer computes. Eager calls without gradients are served from the
    per-shape cache lora_linear's are.
    """
    key = None
    if not torch.compiler.is_compiling():
        key = cache.add_fast_key(base, x, lora_A, lora_B, scaling, dropout_p, seed)
        entry = cache.fast_lookup(key)
        if entry is not None:
            y = entry(base, x, lora_A, lora_B, scaling, seed)
            if y is not None:
                return y
    check_lora_add(base, x, lora_A, lora_B)
    scaling = require_scalar("scaling", scaling)
    dropout_p = require_scalar("dropout_p", dropout_p, low=0.0, high=1.0)
    backend = backend_for(x)
    if key is not None:
        entry = cache.add_fast_entry(key, backend, base, x, lora_A, lora_B, dropout_p, seed)
        return entry(base, x, lora_A, lora_B, scaling, seed)
    if backend == "torch":
        return torch_backend.lora_add(base, x, lora_A, lora_B, scaling, dropout_p, seed)
    return ops.lora_add(base, x, lora_A, lora_B, scaling, dropout_p, seed)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Seed = None,
    weight_fn: Optional[Callable[[], torch.Tensor]] = None,
) -> torch.Tensor:
    """DoRA: the layer m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row applied to x, fused (PEFT's use_dora=True).

    With g = magnitude / ‖W + s·B·A‖_row (a constant for autograd, as DoRA prescribes):
        out = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b                          without dropout
        out = x·Wᵀ + b + (g - 1) ⊙ (D(x)·Wᵀ) + g ⊙ s·(D(x)·Aᵀ)·Bᵀ   with dropout (PEFT's semantics)
    x: (*, K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r); magnitude: (N,) in
    the adapters' dtype -> (*, N) in x's dtype. Dtypes, dropout and seed as in lora_linear.
    Differentiable in x, weight, bias, lora_A, lora_B and magnitude. The row norms come from W·Aᵀ and
    A·Aᵀ, never from an N×K matrix (fusedlora/plans/dora.py). Not a torch.compile custom op yet.
    weight_fn: None, or a function returning `weight` again (the same values, shape and dtype), for a
    weight made on the fly such as a dequantized 4-bit weight (QDoRA): the kernels then keep no
    reference to weight for backward and call weight_fn there, so no N×K tensor lives from the forward
    to the backward. The PyTorch backend ignores it.
    """
    check_lora_linear(x, weight, bias, lora_A, lora_B)
    check_dora_magnitude(magnitude, weight, lora_A)
    scaling = require_scalar("scaling", scaling)
    dropout_p = require_scalar("dropout_p", dropout_p, low=0.0, high=1.0)
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(f"weight_fn must be None or a function returning the weight, got {type(weight_fn).__name__}")
    if backend_for(x) == "torch":
        return torch_backend.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed)
    return dora_ops.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_fn)
