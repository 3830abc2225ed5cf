"""multi_lora_linear: one batch, many adapters, each token with its own (or none).

The public function validates, makes the AdapterBatch (fusedlora/core/adapter_batch.py) unless given
one, picks the backend (fusedlora/core/backend.py) and calls the kernels' op (fusedlora/ops/multi.py,
over the plans of fusedlora/plans/multi.py) or the PyTorch backend (fusedlora/core/torch_backend.py).
"""
from typing import Optional, Union

import torch

from fusedlora.core import torch_backend
from fusedlora.core.adapter_batch import AdapterBatch, values_checked
from fusedlora.core.backend import backend_for
from fusedlora.core.checks import check_col_scale, check_multi, check_ranks_values, describe
from fusedlora.ops import multi as ops


def _batch(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks) -> AdapterBatch:
    """The call's AdapterBatch after the checks: adapter_ids itself when it is one (its ids were checked
    when it was built; here only its shape and adapter count are compared with the layer's), else one
    built over the bare ids, which checks their values."""
    given = isinstance(adapter_ids, AdapterBatch)
    check_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_ids.ids if given else adapter_ids, ranks,
                values=False)
    L, R = lora_A.shape[:2]
    if given and adapter_ids.num_adapters != L:
        raise ValueError(f"the AdapterBatch was built for {adapter_ids.num_adapters} adapters, but "
                         f"{describe('lora_A', lora_A)} holds L = {L}")
    batch = adapter_ids if given else AdapterBatch(adapter_ids, L)
    if ranks is not None and values_checked(ranks):
        check_ranks_values(ranks, R)
    return batch


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
    An eager call without gradients over an AdapterBatch is served from a per-shape cache after its
    first call (fusedlora/ops/multi.py says what the key holds): the same result, less host time.
    col_scale: (L, N) float32 or None. Given (DoRA adapters in the batch), y[t] = col_scale[i] ⊙ (x[t]·Wᵀ +
    scalings[i]·(x[t]·A[i]ᵀ)·B[i]ᵀ) + b on rows with an adapter i, col_scale[i] = m_i / ‖W + s_i·B_i·A_i‖_row
    for a DoRA adapter and ones for a plain one; rows with id -1 are unscaled. The kernels serve it
    eagerly without gradients (serving); a call that needs a gradient, or runs under torch.compile,
    takes the PyTorch backend, which is differentiable in col_scale too.
    """
    if col_scale is not None:
        batch = _batch(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks)
        check_col_scale(col_scale, weight, lora_A)
        col_scale = col_scale.contiguous()
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                               for t in (x, weight, bias, lora_A, lora_B, col_scale))
        if backend_for(x) == "torch" or grad or torch.compiler.is_compiling():
            return torch_backend.multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, batch.ids, ranks,
                                                   col_scale)
        return ops.multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, batch, ranks, col_scale)
    key = None
    if type(adapter_ids) is AdapterBatch and not torch.compiler.is_compiling():
        key = ops.fast_key(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks)
        entry = ops.fast_lookup(key)
        if entry is not None:
            if ranks is not None and values_checked(ranks):
                check_ranks_values(ranks, lora_A.shape[1])
            return entry(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks)
    batch = _batch(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks)
    if backend_for(x) == "torch":
        return torch_backend.multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, batch.ids, ranks)
    if key is not None:
        return ops.fast_entry(key, x, weight, bias, lora_A, lora_B, scalings, batch, ranks)(
            x, weight, bias, lora_A, lora_B, scalings, batch, ranks)
    return ops.multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, batch, ranks)

