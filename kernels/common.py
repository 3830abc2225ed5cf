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
    """
    if interpreting():
        return "ieee"
    if torch.float32 not in dtypes:
        return "tf32"  # half-precision operands: the setting is ignored (what the H200 ran with)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    if all(d == torch.float32 for d in dtypes) and (not low_rank or not allow_tf32):
        return "tf32" if allow_tf32 else "ieee"
    return "tf32x3"


def rank_block(r: int, cap: int = 64) -> int:
    """Block over the LoRA rank: a power of two, at least 16 (the GPU's tl.dot minimum), at most cap;
    ranks above cap loop over rank blocks."""
    return min(max(16, triton.next_power_of_2(r)), cap)


def gemm_blocks(M: int) -> dict:
    """Tile shape for the fused GEMM. Untuned: no GPU has measured other choices yet."""
    if interpreting():
        # Small tiles keep masked edges and several programs in play on small test shapes.
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def expand_blocks(M: int) -> dict:
    """Tile shape for the low-rank term alone (out = addend + p·qᵀ): a memory-bound pass over the
    M×N output whose reduction is the rank, so wide tiles and no deep pipeline. Untuned."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)
    return dict(BLOCK_M=16 if M <= 16 else 64, BLOCK_N=128, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)
