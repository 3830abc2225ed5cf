"""moe_lora_linear: one projection of a Mixture-of-Experts layer with LoRA on its experts.

The public function validates (fusedlora/core/checks.py check_moe, before anything runs), picks the
backend (fusedlora/core/backend.py) and calls the PyTorch backend (fusedlora/core/moe_torch.py) or the
Triton op. An MoE layer's experts forward is two calls sharing one ExpertRouting:

    h = moe_lora_linear(x, routing, W_gate_up, b_gate_up, A_gu, B_gu, s_gu, gather=True)    # (P, 2I)
    h = activation(h)                                                                        # (P, I)
    o = moe_lora_linear(h, routing, W_down, b_down, A_d, B_d, s_d, gather=False)             # (P, H)
    y = routing.combine(o, top_k_weights)                                                    # (T, H)

(fusedlora/modules/experts.py runs it for transformers' expert modules.)
"""
from typing import Optional, Union

import torch

from fusedlora.core import moe_torch
from fusedlora.core.adapter_batch import values_checked
from fusedlora.core.backend import backend_for
from fusedlora.core.checks import check_moe, check_ranks_values, require_scalar
from fusedlora.core.moe_routing import ExpertRouting

Seed = Union[int, torch.Tensor, None]

# Whether backend "triton" has an MoE op to call. False until the Triton kernels and their launch
# sequences are wired in (fusedlora/ops/moe.py); until then the Triton backend raises for this op, and
# the layers that have PEFT's forward to fall back to (fusedlora/peft/experts.py) use it instead.
TRITON_WIRED = False


def moe_lora_linear(
    x: torch.Tensor,
    routing: ExpertRouting,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    scaling: Union[float, torch.Tensor],
    dropout_p: float = 0.0,
    seed: Seed = None,
    *,
    gather: bool,
    ranks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Every (token, expert) pair of `routing` through its expert's projection with LoRA, in sorted order.

    Sorted position i holds pair p = routing.order[i]: token t = routing.rows[i], expert e, adapter a
    (routing.keys[i] = e·(L + 1) + a + 1; a = -1 adds no low-rank term). With x_i its input row,
        y[i] = x_i·W_eᵀ + b_e + s_a·(D(x_i)·A_{a,e}ᵀ)·B_{a,e}ᵀ
    x: (T, K) tokens with gather=True (x_i = x[routing.rows[i]], a gate_up projection), or (P, K) rows
    already in sorted order with gather=False (a down projection's input); weight: (E, N, K), any
    strides (an (E, K, N) parameter passes its .transpose(1, 2)); bias: (E, N) or None; lora_A:
    (L, E, R, K); lora_B: (L, E, N, R), any strides (PEFT's ParamWrapper weights are read in place:
    lora_A.weight (E·R, K) as .view(1, E, R, K), lora_B.weight (N, E·R) as
    .view(N, R, E).permute(2, 0, 1).unsqueeze(0)); both None: the base projection alone. scaling: a
    float, or an (L,) float tensor per adapter; ranks: (L,) integers, each adapter's true rank (entries
    past it are never used), or None (= R). Returns (P, N) in x's dtype; the low-rank path runs in the
    adapters' dtype (x's or float32), as in lora_linear.
    Dropout (probability dropout_p, on the low-rank path only) drops element (p, k) of the (P, K) input
    in routing order (pair p, not sorted position): fusedlora.dropout_mask(seed, (P, K), dropout_p) is
    the keep-mask, whatever the grouping. seed as in lora_linear (an int, a 0-d int64 CPU tensor, or
    None to draw one from torch's generator when dropout_p > 0).
    Differentiable in x, weight, bias, lora_A and lora_B. No tensor of the weight's E·N·K size is made in
    forward or backward. Runs under torch.compile(fullgraph=True) (the PyTorch backend's grouped
    products are the custom op fusedlora::moe_segment_mm there).
    Every tensor is checked (ValueError or TypeError naming it and its shape) before anything runs;
    ranks' values on CPU (on CUDA with FUSEDLORA_DEBUG=1), expert and adapter ids when `routing` is built.
    """
    check_moe(x, routing, weight, bias, lora_A, lora_B, scaling, ranks, gather)
    dropout_p = require_scalar("dropout_p", dropout_p, low=0.0, high=1.0)
    if lora_A is not None and ranks is not None and values_checked(ranks):
        check_ranks_values(ranks, lora_A.shape[2])
    if lora_A is None or backend_for(x) == "torch":
        # Without LoRA there is no kernel of ours to run: the base product is the library's grouped GEMM.
        return moe_torch.moe_lora_linear(x, routing, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                                         gather, ranks)
    return _triton_moe_lora_linear(x, routing, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gather, ranks)


def _triton_moe_lora_linear(x, routing, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gather, ranks):
    """The Triton backend's MoE projection: the op of fusedlora/ops/moe.py (the kernels and their launch
    sequences, one call plan per direction) goes here, and TRITON_WIRED becomes True with it."""
    raise NotImplementedError(
        "moe_lora_linear: the Triton MoE op is not wired yet; FUSEDLORA_BACKEND=torch runs the PyTorch "
        f"backend (tensors on {x.device})")
