"""dora_linear: every eager call runs its call plan (fusedlora/plans/dora.py), as lora_linear's does
(fusedlora/ops/single.py, fusedlora/ops/call.py).

Not a torch.compile custom op yet: a raw Triton launch inside a compiled region breaks it, so under
torch.compile the call runs the PyTorch backend (fusedlora/core/torch_backend.py: the same layer in
torch ops, traced whole, its row norms from W·Aᵀ and A·Aᵀ as well) after the same checks.
"""
import torch

from fusedlora.core import torch_backend
from fusedlora.core.specialization import NONE, OPTIONAL, PER_CALL, TENSOR, VALUE, Signature
from fusedlora.ops.call import PlannedCall, planned
from fusedlora.plans.dora import check_dora, dora_plan

DORA = Signature("dora_linear", x=TENSOR, weight=TENSOR, bias=OPTIONAL, lora_A=TENSOR, lora_B=TENSOR,
                 magnitude=TENSOR, scaling=PER_CALL, dropout_p=VALUE, seed=PER_CALL, weight_fn=NONE)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_fn) -> torch.Tensor:
    """fusedlora.dora_linear (fusedlora/functional.py documents it)."""
    args = (x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_fn)
    if torch.compiler.is_compiling():
        p = check_dora(*args)  # traced with the PyTorch backend's ops
        return torch_backend.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, float(scaling), p, seed)
    key = DORA.key(*args)
    plan = DORA.plans.get(key)
    if plan is None:
        plan = planned(DORA, key, dora_plan, args)
    if plan.run is not None:
        return plan.run(*args)
    return PlannedCall.apply(plan, *args)
