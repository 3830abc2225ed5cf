"""Choices every launcher makes the same way: interpreter or GPU, dot operand dtype and precision,
block sizes."""
import torch
import triton
import triton.language as tl

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
FLOAT_DTYPES = tuple(_TL_DTYPE)


def interpreting() -> bool:
    """True when kernels run in the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return bool(triton.knobs.runtime.interpret)


def dot_dtype(*dtypes: torch.dtype):
    """Operand dtype for a tl.dot over tiles of these dtypes.

    Mixed half/fp32 operands (a bf16 x against fp32 adapter weights) go up to fp32. The interpreter
    multiplies bf16 as raw 16-bit integers (TRITON-NOTES.md), so there bf16 goes up to fp32 as
    well; on the GPU bf16 and fp16 stay as they are for the tensor cores.
    """
    if torch.float32 in dtypes:
        return tl.float32
    (dtype,) = set(dtypes)
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TL_DTYPE[dtype]


def dot_precision(*dtypes: torch.dtype) -> str:
    """input_precision for a tl.dot over tiles of these dtypes (only fp32 operands care).

    All-fp32 dots follow torch's own switch, so an fp32 model gets the precision torch.matmul would
    give it. A dot that mixes half with fp32 uses tf32: its result lands in a half-precision output
    whose rounding (2^-9 for bf16, 2^-11 for fp16) is no finer than tf32's.
    """
    if interpreting():
        return "ieee"
    if all(d == torch.float32 for d in dtypes):
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def rank_block(r: int, cap: int = 64) -> int:
    """Block over the LoRA rank: a power of two, at least 16 (the GPU's tl.dot minimum), at most cap;
    ranks above cap loop over rank blocks."""
    return min(max(16, triton.next_power_of_2(r)), cap)


def gemm_blocks(M: int) -> dict:
    """Tile shape for the fused GEMM. A first, untuned choice; issue 6 tunes it on the H100."""
    if interpreting():
        # Small tiles keep masked edges and several programs in play on small test shapes.
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
