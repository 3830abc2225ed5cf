"""Choices every launcher makes the same way: interpreter or GPU, dot operand dtype and precision,
block sizes. Each is cached by its arguments (whether the interpreter runs is fixed when triton is
first imported): at decode sizes the host time of a call matters as much as its kernels'."""
import functools

import torch
import triton
import triton.language as tl

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
FLOAT_DTYPES = tuple(_TL_DTYPE)


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
    # torch's flag matters only for all-fp32 operands; reading it costs more than the rest of this.
    allow_tf32 = dtypes.count(torch.float32) == len(dtypes) and torch.backends.cuda.matmul.allow_tf32
    return _precision(dtypes, low_rank, allow_tf32)


@functools.lru_cache(maxsize=None)
def _precision(dtypes, low_rank: bool, allow_tf32: bool) -> str:
    if interpreting():
        return "ieee"
    if torch.float32 not in dtypes:
        return "tf32"  # half-precision operands: the setting is ignored (what the H200 ran with)
    if all(d == torch.float32 for d in dtypes) and (not low_rank or not allow_tf32):
        return "tf32" if allow_tf32 else "ieee"
    return "tf32x3"


@functools.lru_cache(maxsize=None)
def rank_block(r: int, cap: int = 64) -> int:
    """Block over the LoRA rank: a power of two, at least 16 (the GPU's tl.dot minimum), at most cap;
    ranks above cap loop over rank blocks."""
    return min(max(16, triton.next_power_of_2(r)), cap)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device; an H100/H200's 132 for anything else (compiling
    GPU variants on a machine without one)."""
    if device is None or torch.device(device).type != "cuda":
        return 132
    index = torch.device(device).index
    return _sm_count(index if index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=4096)
def gemm_blocks(M: int, N: int = 0, device=None) -> dict:
    """Tile shape for the LoRA GEMM. Untuned: no GPU has measured other choices yet.

    At decode sizes the GEMM is bound by reading W, and the only lever is to have every SM stream a
    share of it: 64x64 tiles gave 64 programs for N = 4096 on a 132-SM H200, so small M narrows the
    column block until there are two programs per SM."""
    if interpreting():
        # Small tiles keep masked edges and several programs in play on small test shapes.
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if M <= 64:
        block_m = max(16, triton.next_power_of_2(M))
        sms = sm_count(device)
        block_n = 64
        while N and block_n > 16 and cdiv(M, block_m) * cdiv(N, block_n) < 2 * sms:
            block_n //= 2
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=4096)
def expand_blocks(M: int) -> dict:
    """Tile shape for the low-rank term alone (out = addend + p·qᵀ): a memory-bound pass over the
    M×N output whose reduction is the rank, so wide tiles and no deep pipeline. Untuned."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)
    return dict(BLOCK_M=16 if M <= 16 else 64, BLOCK_N=128, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)
