"""What the benchmark runs: for each case, one callable per provider over the same inputs.

Cases (frozen base weight throughout, as in LoRA training and serving):
- fwd:     y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ
- fwd_bwd: the forward, then backward for x, lora_A and lora_B
Providers:
- base:      the base GEMM alone through torch.matmul (cuBLAS): the floor. For fwd_bwd, its forward
             plus the dX GEMM.
- peft:      the unfused eager computation of a PEFT LoRA Linear: base, dropout copy of x, two small
             GEMMs, an add.
- fusedlora: fusedlora.lora_linear.
Inputs are random normal (never zeros) and rotate among several copies so that small shapes are not
timed out of L2.
"""
import itertools

import torch

import fusedlora
from fusedlora import reference

L2_FLUSH_BYTES = 256 << 20  # rotate inputs until this many bytes are in flight: several times any L2


def make_case(case, M, K, N, r, dtype, device, p=0.0, scaling=2.0, rotate=True):
    """Returns (providers: dict name -> callable, check: callable(name) -> relative error vs float64)."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    weight = rnd(N, K, scale=K ** -0.5)
    lora_A = rnd(r, K, scale=K ** -0.5).requires_grad_(case == "fwd_bwd")
    lora_B = rnd(N, r, scale=r ** -0.5).requires_grad_(case == "fwd_bwd")
    x_bytes = M * K * torch.finfo(dtype).bits // 8
    copies = max(1, min(16, L2_FLUSH_BYTES // max(x_bytes, 1))) if rotate else 1
    xs = [rnd(M, K).requires_grad_(case == "fwd_bwd") for _ in range(copies)]
    dy = rnd(M, N)
    nxt = itertools.cycle(xs).__next__

    def base(x, p):
        return x @ weight.t()

    def peft(x, p):
        dropped = torch.nn.functional.dropout(x, p) if p > 0 else x
        return x @ weight.t() + ((dropped @ lora_A.t()) @ lora_B.t()) * scaling

    def fused(x, p):
        return fusedlora.lora_linear(x, weight, None, lora_A, lora_B, scaling, dropout_p=p)

    forwards = {"base": base, "peft": peft, "fusedlora": fused}
    if case == "fwd":
        providers = {name: (lambda f=f: f(nxt(), p)) for name, f in forwards.items()}
    elif case == "fwd_bwd":
        providers = {name: (lambda f=f: f(nxt(), p).backward(dy)) for name, f in forwards.items()}
    else:
        raise ValueError(f"unknown case {case!r}")

    def check(name):
        """Worst relative error (output, and gradients for fwd_bwd) against float64, dropout off."""
        x = xs[0]
        leaves = [t.detach().double().requires_grad_() for t in (x, weight, lora_A, lora_B)]
        ref = reference.lora_linear(leaves[0], leaves[1], None, leaves[2], leaves[3], scaling)
        for t in (x, lora_A, lora_B):
            t.grad = None
        out = forwards[name](x, 0.0)
        if name == "base":
            ref = leaves[0] @ leaves[1].t()
        pairs = [(out, ref)]
        if case == "fwd_bwd":
            out.backward(dy)
            ref.backward(dy.double())
            pairs.append((x.grad, leaves[0].grad))
            if name != "base":
                pairs += [(lora_A.grad, leaves[2].grad), (lora_B.grad, leaves[3].grad)]
        return max(((o.double() - e).norm() / e.norm()).item() for o, e in pairs)

    return providers, check


def flops(case, provider, M, K, N, r):
    """Floating-point operations of the work a provider is asked to do."""
    base = 2 * M * N * K
    low_rank = 2 * M * r * (K + N)
    if case == "fwd":
        return base if provider == "base" else base + low_rank
    # backward: dX = dY·W (+ the low-rank chain), dA, dB
    return 2 * base if provider == "base" else 2 * base + 2 * low_rank + 2 * M * r * (K + N)
