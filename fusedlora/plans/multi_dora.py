"""The DoRA scale of a multi-adapter layer: every DoRA adapter's row norms over one base weight.

For adapters stacked as A: (L, R, K), B: (L, N, R) (zero past each rank), scalings s: (L,) and base
weight W: (N, K), DoRA's per-adapter column scale is g_l = m_l / ‖W + s_l·B_l·A_l‖_row, and

    ‖W_n + s_l·B_l[n]·A_l‖² = ‖W_n‖² + 2·s_l·B_l[n]·(A_l·W_nᵀ) + s_l²·B_l[n]·(A_l·A_lᵀ)·B_l[n]ᵀ

(plans/dora.py's identity, for one adapter). ‖W‖² (N,) and W·A_allᵀ (N, L·R) come from one pass over
W for all the adapters at once, A_l·A_lᵀ (L, R, R) from the adapters alone, so no N×K matrix
W + s·B·A is ever formed. The kernel path reads W in place through the shrink kernel (fp32
accumulation); the PyTorch path multiplies in fp32, converting a half-precision W in row blocks of at
most 2^22 elements. The (L, N, R) products are formed over the same row blocks, so what a call
allocates is bounded by the blocks, the (N, L·R) product and the (L, N) result.

Used where a layer's adapters change: AdapterPool computes the scales when an adapter is loaded or
updated, or when the base weight changed (serving/pool.py), and patch_peft on every mixed-batch call
(peft/forward.py), as PEFT itself recomputes its norms on every DoRA call.
"""
import torch

from fusedlora.core.backend import backend_for
from fusedlora.kernels.lora_shrink import lora_shrink

# Elements of a row block of W converted to fp32 (and of the (rows, L·R) products) on the PyTorch path.
BLOCK_ELEMENTS = 1 << 22


def _w_times_a(weight, A2):
    """W·A2ᵀ: (N, C) fp32 for W (N, K) and A2 (C, K) fp32, without an fp32 copy of all of W."""
    if backend_for(weight) == "triton" and not torch.compiler.is_compiling():
        return lora_shrink(weight, A2, 1.0)
    if weight.dtype == torch.float32:
        return weight @ A2.t()
    N, K = weight.shape
    rows = max(1, BLOCK_ELEMENTS // max(K, 1))
    return torch.cat([weight[n0:n0 + rows].float() @ A2.t() for n0 in range(0, N, rows)])


@torch.no_grad()
def stacked_weight_norms(weight, lora_A, lora_B, scalings) -> torch.Tensor:
    """‖W_n + s_l·B_l[n]·A_l‖ for every adapter l and row n: (L, N) fp32, detached (DoRA treats the norm as a
    constant). weight: (N, K); lora_A: (L, R, K) and lora_B: (L, N, R), zero past each adapter's rank (or
    any strides and dtype); scalings: (L,) float."""
    N, K = weight.shape
    L, R, _ = lora_A.shape
    A = lora_A.detach().to(torch.float32)
    s = scalings.detach().to(device=weight.device, dtype=torch.float32)
    w2 = torch.linalg.vector_norm(weight.detach(), dim=1, dtype=torch.float32).square()      # (N,)
    WA = _w_times_a(weight.detach(), A.reshape(L * R, K)).view(N, L, R)                      # one pass over W
    AA = A @ A.transpose(1, 2)                                                               # (L, R, R)
    n2 = torch.empty((L, N), dtype=torch.float32, device=weight.device)
    rows = max(1, BLOCK_ELEMENTS // max(L * R, 1))
    for n0 in range(0, N, rows):  # the (L, rows, R) products a block at a time
        B = lora_B[:, n0:n0 + rows].detach().to(torch.float32)                               # (L, rows, R)
        cross = (B * WA[n0:n0 + rows].transpose(0, 1)).sum(-1)                               # B_l[n]·(A_l·W_nᵀ)
        quad = (torch.bmm(B, AA) * B).sum(-1)                                                # B_l[n]·AA_l·B_l[n]ᵀ
        n2[:, n0:n0 + rows] = w2[n0:n0 + rows] + (2 * s)[:, None] * cross + (s * s)[:, None] * quad
    return n2.clamp_min_(0.0).sqrt_()


def dora_col_scale(weight, lora_A, lora_B, scalings, magnitudes, dora) -> torch.Tensor:
    """multi_lora_linear's col_scale: (L, N) fp32, m_l / ‖W + s_l·B_l·A_l‖_row for the adapters where
    `dora` (a list of L bools) is true, ones for the others. magnitudes: (L, N), any float dtype, rows of
    plain adapters ignored; the norms are computed for the DoRA adapters only, and the result keeps the
    magnitudes' autograd graph (the gradient of m flows, the norm's does not, as in DoRA)."""
    L, N = lora_A.shape[0], weight.shape[0]
    picked = [i for i in range(L) if dora[i]]
    if not picked:
        return torch.ones((L, N), dtype=torch.float32, device=weight.device)

    def rows(t):  # by Python ints: an index tensor would be a host-to-device copy, which a CUDA graph refuses
        return t if len(picked) == L else torch.stack([t[i] for i in picked])
    norms = stacked_weight_norms(weight, rows(lora_A), rows(lora_B), rows(scalings))
    scales = rows(magnitudes).to(torch.float32) / norms
    ones = torch.ones((N,), dtype=torch.float32, device=weight.device)
    rows = iter(scales.unbind(0))
    return torch.stack([next(rows) if dora[i] else ones for i in range(L)])
