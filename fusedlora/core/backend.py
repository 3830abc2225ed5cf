"""Which implementation serves a call: FUSEDLORA_BACKEND = auto | triton | torch (core/knobs.py).

auto (default): the Triton kernels for CUDA tensors, the PyTorch backend (core/torch_backend.py)
elsewhere. triton: always the kernels; CPU tensors need the Triton interpreter (TRITON_INTERPRET=1
set before triton is first imported). torch: the PyTorch backend, with the same Philox dropout mask.
"""
import torch

from fusedlora.core import knobs
from fusedlora.kernels.common import interpreting


@torch.compiler.assume_constant_result
def _interpreting() -> bool:
    # Triton reads its knob through a C++ builtin that torch.compile cannot trace; the answer is
    # fixed for the process once the kernels are defined, so the compiler may take it as a constant.
    return interpreting()


def backend_for(x: torch.Tensor) -> str:
    """'triton' or 'torch' for a call whose inputs live where x does. Read on every call, so a test or
    a user can switch it at run time."""
    choice = knobs.backend()
    if choice == "auto":
        return "triton" if x.is_cuda else "torch"
    if choice == "triton" and not x.is_cuda and not _interpreting():
        raise RuntimeError(
            f"FUSEDLORA_BACKEND=triton with tensors on {x.device} needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported, or use FUSEDLORA_BACKEND=torch")
    return choice
