"""The public functional API: each function documents its op and calls it (fusedlora/ops/), whose call plan
checks the inputs, picks the backend and the plan, and launches."""
from typing import Callable, Optional, Union

import torch

from fusedlora.ops import dora as dora_ops
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
    Every call runs the call plan of its specialization (fusedlora/core/specialization.py says what
    that is), built by its first call: the checks, the backend and plan choice and the bound launches
    are made once per specialization, the tensors and per-call values (scaling, seed) read every call.
    """
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
    x·Wᵀ is whatever the base layer computes. Calls run call plans, as lora_linear's do.
    """
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
    return dora_ops.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_fn)
