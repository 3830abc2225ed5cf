"""multi_lora_linear: one batch, many adapters, each token with its own (or none).

Forward, with tokens grouped by adapter on the device (kernels/multi_lora.py):
    S  = s_l · x·A_lᵀ                       per adapter segment, (M, R) fp32 in sorted order
    y  = x·Wᵀ + b + S·B_lᵀ                  the base GEMM with each segment's expand as extra K-steps
Backward, G = dY:
    dU = s_l · G·B_l;  dX = G·W + dU·A_l;  dA_l = dU_lᵀ·x_l;  dB_l = G_lᵀ·S_l
Saved: x, the grouping, S and the parameters.

multi_forward and multi_backward are the launcher sequences, registered as the custom ops
fusedlora::multi_lora_linear -> (y, S, order, sorted_ids, starts) and fusedlora::multi_lora_linear_backward
with fake versions and register_autograd, as fusedlora/ops.py does for lora_linear, so that
torch.compile(fullgraph=True) traces through them. The grouping is made inside the forward op (a sort and
a searchsorted on the device) and returned, so backward reuses it; every output shape follows from the
input shapes alone, never from the ids.
"""
import math
import os
from typing import List, Optional, Tuple

import torch

from fusedlora.backend import backend_for
from fusedlora.checks import check_lora_linear, describe, require_tensor
from fusedlora.kernels.lora_gemm import lora_gemm
from fusedlora.kernels.multi_lora import group_by_adapter, multi_gemm, multi_reduce, multi_shrink

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks) -> None:
    """Shapes, dtypes and devices; the values of ids and ranks only where that costs no GPU sync."""
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("scalings", scalings), ("adapter_ids", adapter_ids)):
        require_tensor(name, t)
    require_tensor("ranks", ranks, optional=True)
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(f"{describe('lora_A', lora_A)} must be (L, R, K) and {describe('lora_B', lora_B)} "
                         "must be (L, N, R)")
    L, R, _ = lora_A.shape
    if lora_B.shape[0] != L or lora_B.shape[2] != R:
        raise ValueError(f"{describe('lora_B', lora_B)} must be (L, N, R) = ({L}, N, {R}) to match "
                         f"{describe('lora_A', lora_A)}")
    # The per-adapter shape rules are those of lora_linear, checked on adapter 0's layout.
    check_lora_linear(x, weight, bias, lora_A[0] if L else lora_A.new_empty(R, lora_A.shape[2]),
                      lora_B[0] if L else lora_B.new_empty(lora_B.shape[1], R))
    if not scalings.is_floating_point() or tuple(scalings.shape) != (L,):
        raise ValueError(f"{describe('scalings', scalings)} must be a float tensor of shape (L,) = ({L},)")
    if adapter_ids.dtype not in _INT_DTYPES or tuple(adapter_ids.shape) != tuple(x.shape[:-1]):
        raise TypeError(f"{describe('adapter_ids', adapter_ids)} must be an integer tensor of shape "
                        f"x.shape[:-1] = {tuple(x.shape[:-1])}")
    if ranks is not None and (ranks.dtype not in _INT_DTYPES or tuple(ranks.shape) != (L,)):
        raise TypeError(f"{describe('ranks', ranks)} must be an integer tensor of shape (L,) = ({L},)")
    for name, t in (("scalings", scalings), ("adapter_ids", adapter_ids), ("ranks", ranks)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{describe(name, t)} is not on x's device {x.device}")
    # Reading values back from a GPU would stall the stream and break CUDA-graph capture, so there
    # it is opt-in (FUSEDLORA_DEBUG=1). Under torch.compile a branch on tensor values would break the
    # graph, so there it is skipped on every device. Unchecked ids outside [-1, L) give NaN rows.
    if torch.compiler.is_compiling():
        return
    if x.device.type == "cpu" or os.environ.get("FUSEDLORA_DEBUG") == "1":
        if adapter_ids.numel() and (adapter_ids.min() < -1 or adapter_ids.max() >= L):
            bad = adapter_ids[(adapter_ids < -1) | (adapter_ids >= L)][0].item()
            raise ValueError(f"{describe('adapter_ids', adapter_ids)} holds {bad}, outside [-1, L) = [-1, {L})")
        if ranks is not None and L and (ranks.min() < 0 or ranks.max() > R):
            raise ValueError(f"{describe('ranks', ranks)} must lie in [0, R] = [0, {R}], got {ranks.tolist()}")


def multi_forward(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks):
    """(y: (*, N), S: (M, R) fp32, order, sorted_ids, starts); scalings fp32, ranks int32, inputs checked."""
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    groups = group_by_adapter(adapter_ids, lora_A.shape[0])
    S = multi_shrink(x2, lora_A, scalings, groups, ranks)
    y = multi_gemm(x2, weight, bias, S, lora_B, groups, ranks)
    return (y.reshape(*x.shape[:-1], N), S, *groups)


def multi_backward(dy, x, weight, lora_A, lora_B, scalings, ranks, S, groups, needs):
    """Gradients (dx, dweight, dbias, dlora_A, dlora_B) for the flags in `needs`, None elsewhere."""
    need_x, need_w, need_b, need_A, need_B = needs
    K, N = x.shape[-1], weight.shape[0]
    g, x2 = dy.reshape(-1, N), x.reshape(-1, K)
    dx = dw = db = dA = dB = None
    if need_x or need_A:
        dU = multi_shrink(g, lora_B.transpose(1, 2), scalings, groups, ranks)
    if need_x:
        dx = multi_gemm(g, weight.t(), None, dU, lora_A.transpose(1, 2), groups, ranks).reshape(x.shape)
    if need_A:
        dA = torch.empty_like(lora_A, memory_format=torch.contiguous_format)
        multi_reduce(x2, dU, groups, ranks, dA.transpose(1, 2))
    if need_B:
        dB = torch.empty_like(lora_B, memory_format=torch.contiguous_format)
        multi_reduce(g, S, groups, ranks, dB)
    if need_w:
        dw = lora_gemm(g.t(), x2.t(), out_dtype=weight.dtype)
    if need_b:
        db = g.sum(0, dtype=torch.float32).to(weight.dtype)
    return dx, dw, db, dA, dB


@torch.library.custom_op("fusedlora::multi_lora_linear", mutates_args=())
def multi_lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         lora_A: torch.Tensor, lora_B: torch.Tensor, scalings: torch.Tensor,
                         adapter_ids: torch.Tensor, ranks: torch.Tensor
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y: (*, N), S: (M, R) fp32, order: (M,), sorted_ids: (M,), starts: (L + 2,)), the last three
    int32; scalings: (L,) fp32; ranks: (L,) int32. Inputs validated by the caller."""
    return multi_forward(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks)


@multi_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks):
    M, (L, R) = math.prod(x.shape[:-1]), lora_A.shape[:2]
    index = dict(dtype=torch.int32, device=x.device)
    return (x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((M, R), dtype=torch.float32),
            torch.empty((M,), **index), torch.empty((M,), **index), torch.empty((L + 2,), **index))


@torch.library.custom_op("fusedlora::multi_lora_linear_backward", mutates_args=())
def multi_lora_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                                  lora_B: torch.Tensor, scalings: torch.Tensor, ranks: torch.Tensor,
                                  S: torch.Tensor, order: torch.Tensor, sorted_ids: torch.Tensor,
                                  starts: torch.Tensor, needs: List[bool]) -> List[torch.Tensor]:
    """The gradients of (x, weight, bias, lora_A, lora_B) whose flag in `needs` is set, in that order
    (a custom op cannot return None)."""
    grads = multi_backward(dy, x, weight, lora_A, lora_B, scalings, ranks, S, (order, sorted_ids, starts),
                           tuple(needs))
    return [g for g in grads if g is not None]


@multi_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, scalings, ranks, S, order, sorted_ids, starts, needs):
    like = (x, weight, weight.new_empty(weight.shape[0]), lora_A, lora_B)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t, need in zip(like, needs) if need]


def _setup_context(ctx, inputs, output):
    x, weight, _, lora_A, lora_B, scalings, _, ranks = inputs
    _, S, *groups = output
    ctx.mark_non_differentiable(S, *groups)
    ctx.save_for_backward(x, weight, lora_A, lora_B, scalings, ranks, S, *groups)


def _backward(ctx, dy, *_):
    needs = list(ctx.needs_input_grad[:5])
    grads = iter(multi_lora_linear_backward_op(dy, *ctx.saved_tensors, needs))
    return (*(next(grads) if need else None for need in needs), None, None, None)


multi_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def multi_lora_torch(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks):
    """The torch backend: the function in PyTorch ops whose shapes never depend on the ids, so that it
    compiles without graph breaks and captures in CUDA graphs (fusedlora.reference uses boolean
    indexing instead, the plainer oracle). Each adapter's update is computed for every token and kept
    where the token chose it: L times the low-rank work of the kernels. Selecting after each adapter's
    expand, rather than one dense matmul over all adapters, keeps a row from ever touching another
    adapter's weights, so a NaN in an unused slot cannot leak (0 * NaN is NaN); entries past each rank
    are zeroed before use for the same reason."""
    L, R, K = lora_A.shape
    M, N, dtype = adapter_ids.numel(), weight.shape[0], lora_A.dtype
    ids = adapter_ids.reshape(M)
    y = x.reshape(M, K) @ weight.t()
    if bias is not None:
        y = y + bias
    y = y.to(dtype)
    xa = x.reshape(M, K).to(dtype)
    in_rank = torch.arange(R, device=x.device) < ranks[:, None]  # (L, R)
    for i in range(L):
        A = torch.where(in_rank[i, :, None], lora_A[i], 0)
        B = torch.where(in_rank[i, None, :], lora_B[i], 0)
        update = ((xa @ A.t()) @ B.t()) * scalings[i].to(dtype)
        y = torch.where((ids == i)[:, None], y + update, y)
    y = torch.where(((ids < -1) | (ids >= L))[:, None], float("nan"), y)
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y[t] = x[t]·Wᵀ + b + scalings[i]·(x[t]·A[i]ᵀ)·B[i]ᵀ with i = adapter_ids[t] (-1: base only).

    x: (*, K); weight: (N, K); bias: (N,) or None; lora_A: (L, R, K); lora_B: (L, N, R), adapters stacked
    and zero-padded to R; scalings: (L,) float; adapter_ids: integer, shape x.shape[:-1], in [-1, L);
    ranks: (L,) integer or None, each adapter's true rank (entries past it are ignored and the kernels do
    no work for them). Returns (*, N) in x's dtype; dtype rules as lora_linear. Differentiable in x,
    lora_A, lora_B (and weight, bias).
    The values of adapter_ids and ranks are checked (ValueError) for CPU tensors, and on CUDA only with
    FUSEDLORA_DEBUG=1 (a host sync). Under torch.compile they are never checked, since a branch on
    tensor values would break the graph. Unchecked ids outside [-1, L) give NaN rows.
    Runs under torch.compile(fullgraph=True) (the kernels are the custom op fusedlora::multi_lora_linear)
    and in CUDA graphs: on CUDA, without FUSEDLORA_DEBUG, nothing in it reads a value back to the host.
    """
    check_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks)
    L, R = lora_A.shape[:2]
    if ranks is None:
        ranks = torch.full((L,), R, dtype=torch.int32, device=x.device)
    if backend_for(x) == "torch":
        return multi_lora_torch(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks)
    y, *_ = multi_lora_linear_op(x, weight, bias, lora_A, lora_B, scalings.float(), adapter_ids,
                                 ranks.to(torch.int32))
    return y


def multi_lora_linear_unfused(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks=None):
    """Forward only, the Punica/vLLM structure: the base GEMM (torch), then the shrink kernel, then the
    expand kernel adding into the output. For benchmarks: the fused path is multi_lora_linear."""
    check_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_ids, ranks)
    L, R = lora_A.shape[:2]
    ranks = torch.full((L,), R, dtype=torch.int32, device=x.device) if ranks is None else ranks.to(torch.int32)
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    y = torch.nn.functional.linear(x2, weight, bias)
    groups = group_by_adapter(adapter_ids, L)
    S = multi_shrink(x2, lora_A, scalings.float(), groups, ranks)
    return multi_gemm(x2, None, None, S, lora_B, groups, ranks, out=y).reshape(*x.shape[:-1], N)
