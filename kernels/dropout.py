"""Dropout keep-mask from Philox4x32-10, shared by every kernel that needs it.

The mask is never stored: each kernel regenerates the bits of the tile it touches from
(seed, row, column). The keep decision for element (m, k) of x (x viewed as rows x K) is

    bits = Philox4x32-10(counter=(k, m, 0, 0), key=(seed mod 2^32, seed >> 32))[0]
    keep = (bits >> 8) >= threshold,   threshold = ceil(p * 2^24)

An integer compare (instead of a float uniform) makes the decision bit-exact in every
implementation: fusedlora/dropout.py draws the same mask with PyTorch integer ops.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def keep_mask_tile(seed, offs_m, offs_k, threshold):
    """Keep-mask of the (len(offs_m), len(offs_k)) tile at rows offs_m, columns offs_k (int32)."""
    rows = tl.broadcast_to(offs_m[:, None], (offs_m.shape[0], offs_k.shape[0]))
    cols = tl.broadcast_to(offs_k[None, :], (offs_m.shape[0], offs_k.shape[0]))
    zero = tl.zeros_like(rows)
    bits, _, _, _ = tl.philox(seed, cols, rows, zero, zero)
    return (bits >> 8).to(tl.int32) >= threshold


@triton.jit
def _keep_mask_kernel(out_ptr, M, K, seed, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask_tile(seed, offs_m, offs_k, threshold)
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def keep_mask(seed: int, rows: int, cols: int, threshold: int, device) -> torch.Tensor:
    """Materialize the (rows, cols) keep-mask the kernels use. For tests and debugging only:
    the LoRA kernels never build it."""
    out = torch.empty((rows, cols), dtype=torch.int8, device=device)
    if rows and cols:
        grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 32))
        _keep_mask_kernel[grid](out, rows, cols, seed, threshold, BLOCK_M=32, BLOCK_K=32)
    return out.bool()
