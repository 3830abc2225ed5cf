"""Dropout keep-mask from Philox4x32-10, shared by every kernel that needs it.

The mask is never stored: each kernel regenerates the bits of the tile it touches from
(seed, row, column). One Philox call gives four 32-bit words, and each word decides one element, so
a row's columns 4q .. 4q+3 share the call at counter q. For element (m, k) of x (x viewed as rows x K):

    words = Philox4x32-10(counter=(k // 4, m, 0, 0), key=(seed mod 2^32, (seed >> 32) mod 2^32))
    keep  = (words[k % 4] >> 8) >= threshold,   threshold = ceil(p * 2^24)

An integer compare (instead of a float uniform) makes the decision bit-exact in every
implementation: fusedlora/core/dropout.py draws the same mask with PyTorch integer ops. Drawing one call
per element and keeping one word of four made dropout cost a third of the forward time on an H200
(p=0.1 at M=8192: 1.95x the base GEMM against 1.49x without).

Kernels take the seed as two 32-bit words (seed_words) and list them, with the threshold, in
do_not_specialize (SEED_ARGS). Triton specializes a plain int argument on its value: 1 becomes a
constant, a multiple of 16 gets a divisibility attribute, one of 2^31 or more switches to i64. A
random seed would then compile a new kernel about one call in 16, mid-training or mid-benchmark.
"""
import torch
import triton
import triton.language as tl

from . import configs


# Per-call integers a kernel must not be specialized on (triton.jit's do_not_specialize).
SEED_ARGS = ("seed_lo", "seed_hi", "threshold")


def seed_words(seed) -> tuple:
    """(low, high) 32-bit words of a 64-bit seed (an int or a 0-d integer tensor, two's complement if
    negative), each as a signed int32 value, so that Triton types both as i32 whatever the seed."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    lo, hi = seed & 0xFFFFFFFF, seed >> 32
    return lo - (lo >> 31 << 32), hi - (hi >> 31 << 32)


@triton.jit
def keep_mask_tile(seed_lo, seed_hi, offs_m, k0, threshold, BLOCK_K: tl.constexpr):
    """Keep-mask of the (len(offs_m), BLOCK_K) tile at rows offs_m and columns k0 .. k0 + BLOCK_K - 1,
    for the seed whose 32-bit words seed_words gave.

    k0 must be a multiple of 4 (every caller's column blocks are) and BLOCK_K at least 4."""
    BLOCK_M: tl.constexpr = offs_m.shape[0]
    QUADS: tl.constexpr = BLOCK_K // 4
    rows = tl.broadcast_to(offs_m[:, None], (BLOCK_M, QUADS))
    quads = tl.broadcast_to((k0 // 4 + tl.arange(0, QUADS))[None, :], (BLOCK_M, QUADS))
    zero = tl.zeros_like(rows)
    # Each word through uint32 first: a direct int32 -> uint64 cast would sign-extend the low word.
    seed = (seed_hi.to(tl.uint32).to(tl.uint64) << 32) | seed_lo.to(tl.uint32).to(tl.uint64)
    w0, w1, w2, w3 = tl.philox(seed, quads, rows, zero, zero)
    # join(join(w0, w2), join(w1, w3)) has shape (BLOCK_M, QUADS, 2, 2) with element [m, q, i, j] =
    # word 2i + j of quad q: flattened, column 4q + t holds word t.
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_M, BLOCK_K))
    return (words >> 8).to(tl.int32) >= threshold


@triton.jit(do_not_specialize=SEED_ARGS)
def _keep_mask_kernel(out_ptr, M, K, seed_lo, seed_hi, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    keep = keep_mask_tile(seed_lo, seed_hi, offs_m, k0, threshold, BLOCK_K)
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def keep_mask(seed: int, rows: int, cols: int, threshold: int, device) -> torch.Tensor:
    """Materialize the (rows, cols) keep-mask the kernels use. For tests and debugging only:
    the LoRA kernels never build it."""
    out = torch.empty((rows, cols), dtype=torch.int8, device=device)
    if rows and cols:
        cfg = configs.keep_mask(device)
        grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(cols, cfg["BLOCK_K"]))
        _keep_mask_kernel[grid](out, rows, cols, *seed_words(seed), threshold, **cfg)
    return out.bool()
