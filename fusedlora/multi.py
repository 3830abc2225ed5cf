"""multi_lora_linear: one batch, many adapters, each token with its own (or none).

The public function makes the AdapterBatch (fusedlora/core/adapter_batch.py) unless given one and
calls the op (fusedlora/ops/multi.py), whose call plan (fusedlora/plans/multi.py) checks the inputs,
picks the backend (the kernels or fusedlora/core/torch_backend.py) and the plan, and launches.
"""
from typing import Optional, Union

import torch

from fusedlora.core.adapter_batch import AdapterBatch
from fusedlora.core.checks import check_multi
from fusedlora.ops import multi as ops


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: Union[torch.Tensor, AdapterBatch],
    ranks: Optional[torch.Tensor] = None,
    col_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y[t] = x[t]·Wᵀ + b + scalings[i]·(x[t]·A[i]ᵀ)·B[i]ᵀ with i = adapter_ids[t] (-1: base only).

    x: (*, K); weight: (N, K); bias: (N,) or None; lora_A: (L, R, K); lora_B: (L, N, R), adapters stacked
    and zero-padded to R; scalings: (L,) float; adapter_ids: integer, shape x.shape[:-1], in [-1, L), or
    an AdapterBatch over such ids (built once per batch and shared by every layer); ranks: (L,) integer
    or None, each adapter's true rank (entries past it are never read and the kernels do no work for
    them). Returns (*, N) in x's dtype; dtype rules as lora_linear. Differentiable in x, lora_A, lora_B
    (and weight, bias).
    The values of adapter_ids and ranks are checked (ValueError) for CPU tensors, and on CUDA only with
    FUSEDLORA_DEBUG=1 (a host sync). Under torch.compile they are never checked, since a branch on
    tensor values would break the graph. Unchecked ids outside [-1, L) give NaN rows.
    Runs under torch.compile(fullgraph=True) (the kernels are the custom op fusedlora::multi_lora_linear)
    and in CUDA graphs: on CUDA, without FUSEDLORA_DEBUG, nothing in it reads a value back to the host.
    The execution plan (FUSEDLORA_PLAN, fusedlora/plans/planner.py) does not change the result beyond rounding.
    Every call runs the call plan of its specialization (fusedlora/core/specialization.py), built by
    its first call, as lora_linear's.
    col_scale: (L, N) float32 or None. Given (DoRA adapters in the batch), y[t] = col_scale[i] ⊙ (x[t]·Wᵀ +
    scalings[i]·(x[t]·A[i]ᵀ)·B[i]ᵀ) + b on rows with an adapter i, col_scale[i] = m_i / ‖W + s_i·B_i·A_i‖_row
    for a DoRA adapter and ones for a plain one; rows with id -1 are unscaled. The kernels serve it
    eagerly without gradients (serving); a call that needs a gradient, or runs under torch.compile,
    takes the PyTorch backend, which is differentiable in col_scale too.
    """
    if not isinstance(adapter_ids, AdapterBatch):
        # Bare ids: checked with the call's other inputs (their values where that costs no GPU sync),
        # then made a batch; an AdapterBatch's ids were checked when it was built.
        check_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, values=False)
        adapter_ids = AdapterBatch(adapter_ids, lora_A.shape[0])
    return ops.multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks, col_scale)
