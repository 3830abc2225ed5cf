"""moe_lora_linear: one projection of a Mixture-of-Experts layer with LoRA on its experts.

The public function calls the op (fusedlora/ops/moe.py), whose call plan (fusedlora/plans/moe.py) checks
the inputs (check_moe, before anything runs), picks the backend (the kernels, or the PyTorch backend of
fusedlora/core/moe_torch.py) and the plan (choose_moe), and launches. An MoE layer's experts forward is two calls sharing one ExpertRouting:

    h = moe_lora_linear(x, routing, W_gate_up, b_gate_up, A_gu, B_gu, s_gu, gather=True)    # (P, 2I)
    h = activation(h)                                                                        # (P, I)
    o = moe_lora_linear(h, routing, W_down, b_down, A_d, B_d, s_d, gather=False)             # (P, H)
    y = routing.combine(o, top_k_weights)                                                    # (T, H)

(fusedlora/modules/experts.py runs it for transformers' expert modules.)
"""
from typing import Optional, Union

import torch

from fusedlora.core.moe_routing import ExpertRouting
from fusedlora.ops import moe as ops

Seed = Union[int, torch.Tensor, None]

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
    forward or backward. Runs under torch.compile(fullgraph=True): the kernels are the custom op
    fusedlora::moe_lora_linear there (the PyTorch backend's grouped products, fusedlora::moe_segment_mm).
    Every call runs the call plan of its specialization, as lora_linear's.
    Every tensor is checked (ValueError or TypeError naming it and its shape) before anything runs;
    ranks' values on CPU (on CUDA with FUSEDLORA_DEBUG=1), expert and adapter ids when `routing` is built.
    """
    return ops.moe_lora_linear(x, routing, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, gather, ranks)
