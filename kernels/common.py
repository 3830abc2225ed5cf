"""Choices every launcher makes the same way: interpreter or GPU, dot operand dtype and precision.
Tile sizes live in kernels/configs.py."""
import functools

import torch
import triton
import triton.language as tl

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def check_shapes(ok: bool, launcher: str, **tensors) -> None:
    """Raise ValueError naming the launcher and every tensor given, with its shape, unless ok.

    The launchers' checks guard memory, not user input (fusedlora/ validates that, with messages for
    users), and survive `python -O`. The message is built only on failure."""
    if not ok:
        shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items() if t is not None)
        raise ValueError(f"{launcher}: shapes do not chain: {shapes}")


def check_col_scale(col_scale, launcher: str) -> None:
    """A per-adapter column scale (DoRA's magnitude over the row norms): (L, N) float32 on the output's
    columns with unit column stride, as the epilogues read it; None passes."""
    if col_scale is not None and (col_scale.dtype != torch.float32 or col_scale.dim() != 2
                                  or (col_scale.shape[1] > 1 and col_scale.stride(1) != 1)):
        raise ValueError(f"{launcher}: col_scale must be an (L, N) float32 tensor with unit column stride, got "
                         f"shape {tuple(col_scale.shape)}, {col_scale.dtype}, strides {col_scale.stride()}")


def cdiv(a: int, b: int) -> int:
    """Ceiling division for grids: plain Python (triton.cdiv is a constexpr function on recent Triton,
    ~1.75 µs a host call)."""
    return -(-a // b)


def interpreting() -> bool:
    """True when kernels run in the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return bool(triton.knobs.runtime.interpret)


@functools.lru_cache(maxsize=None)
def dot_dtype(*dtypes: torch.dtype):
    """Operand dtype for a tl.dot over tiles of these dtypes.

    Mixed half/fp32 operands (a bf16 x against fp32 adapter weights) go up to fp32. The interpreter
    multiplies bf16 as raw 16-bit integers (upstream triton #11584), so there bf16 goes up to fp32 as
    well; on the GPU bf16 and fp16 stay as they are for the tensor cores.
    """
    if torch.float32 in dtypes:
        return tl.float32
    (dtype,) = set(dtypes)
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TL_DTYPE[dtype]


def dot_precision(*dtypes: torch.dtype, low_rank: bool = False) -> str:
    """input_precision for a tl.dot over tiles of these dtypes (only fp32 operands care).

    The base GEMM over all-fp32 operands follows torch's own switch, so an fp32 model gets the
    precision torch.matmul would give it. Low-rank dots with an fp32 operand (the adapters, S, dU)
    must be at least as precise as PEFT's fp32 matmul of the same product: "tf32x3" (three tf32
    passes, product error about 2^-21 relative, below the fp32 accumulation error of any K >= 8)
    where one operand is half precision (exactly representable in tf32) or tf32 is allowed, and
    "ieee" for all-fp32 operands when torch itself would not use tf32. These dots are memory-bound
    (rank 16 against K in the thousands), so the extra passes cost little. Plain tf32 (2^-11 per
    product) made the fused path less precise than PEFT's on an H200.

    torch's switch is read only for all-fp32 operands, the one case it decides (a read costs ~2 µs).
    """
    if interpreting():
        return "ieee"
    if torch.float32 not in dtypes:
        return "tf32"  # half-precision operands: the setting is ignored (what the H200 ran with)
    if not all(d == torch.float32 for d in dtypes):
        return "tf32x3"
    if fp32_matmul_allows_tf32():
        return "tf32x3" if low_rank else "tf32"
    return "ieee"


def fp32_matmul_allows_tf32() -> bool:
    """Whether torch.matmul may use tf32 for fp32 CUDA operands, through the API the installed torch
    offers: `torch.backends.cuda.matmul.fp32_precision` from torch 2.9 (where reading the legacy
    `allow_tf32` raises once a user has set the new one), `allow_tf32` before."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:  # torch < 2.9
        return bool(matmul.allow_tf32)
    if precision == "none":  # not set for cuBLAS: the backends-wide setting decides
        precision = torch.backends.fp32_precision
    return precision == "tf32"
