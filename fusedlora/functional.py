"""The public functional API."""
from typing import Optional

import torch

from fusedlora import reference
from fusedlora.autograd import LoRALinearFunction
from fusedlora.backend import backend_for
from fusedlora.checks import check_lora_linear, require_scalar
from fusedlora.dropout import check_seed, draw_seed, dropout_mask


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ, fused.

    x: (*, K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r) -> (*, N) in x's
    dtype. x, weight and bias are float32, float16 or bfloat16; lora_A and lora_B are in x's dtype
    or float32. Dropout (probability dropout_p, on the low-rank path only) keeps element (m, k) of x
    by Philox from (seed, m, k): `dropout_mask(seed, x.shape, dropout_p)` is that mask. seed=None
    draws one from torch's default generator (only when dropout_p > 0).
    Differentiable in x, weight, bias, lora_A and lora_B.
    """
    check_lora_linear(x, weight, bias, lora_A, lora_B)
    scaling = require_scalar("scaling", scaling)
    dropout_p = require_scalar("dropout_p", dropout_p, low=0.0, high=1.0)
    if seed is None:
        seed = draw_seed() if dropout_p > 0 else 0
    check_seed(seed)
    if backend_for(x) == "torch":
        keep = dropout_mask(seed, x.shape, dropout_p, x.device) if dropout_p > 0 else None
        return reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling, keep, dropout_p)
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
