"""The public functional API."""
from typing import Optional, Union

import torch

from fusedlora import reference
from fusedlora.autograd import lora_linear_op
from fusedlora.backend import backend_for
from fusedlora.checks import check_lora_linear, require_scalar
from fusedlora.dropout import dropout_mask, seed_tensor


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Union[int, torch.Tensor, None] = None,
) -> torch.Tensor:
    """y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ, fused.

    x: (*, K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r) -> (*, N) in x's
    dtype. x, weight and bias are float32, float16 or bfloat16; lora_A and lora_B are in x's dtype
    or float32. Dropout (probability dropout_p, on the low-rank path only) keeps element (m, k) of x
    by Philox from (seed, m, k): `dropout_mask(seed, x.shape, dropout_p)` is that mask. seed: an
    int in [0, 2**63), a 0-d int64 CPU tensor, or None to draw one from torch's default generator
    (only when dropout_p > 0).
    Differentiable in x, weight, bias, lora_A and lora_B. Runs under torch.compile(fullgraph=True)
    (the kernels are the custom op fusedlora::lora_linear) and activation checkpointing.
    """
    check_lora_linear(x, weight, bias, lora_A, lora_B)
    scaling = require_scalar("scaling", scaling)
    dropout_p = require_scalar("dropout_p", dropout_p, low=0.0, high=1.0)
    seed = seed_tensor(seed, dropout_p)
    if backend_for(x) == "torch":
        keep = dropout_mask(seed, x.shape, dropout_p, x.device) if dropout_p > 0 else None
        return reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling, keep, dropout_p)
    y, _ = lora_linear_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return y
