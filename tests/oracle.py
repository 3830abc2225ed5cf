"""The one tolerance table and the oracle every kernel test uses.

A kernel result passes when its worst error against the float64 reference is at most twice the
worst error of the same computation done by the PyTorch reference in the kernel's dtype, plus a
small atol. The factor 2 leaves room for a different summation order and, in the interpreter, for
fp32->bf16 stores that truncate instead of rounding (TRITON-NOTES.md); the atol covers outputs the
low-precision reference happens to get exact.
"""
import torch

from fusedlora import reference

# Absolute slack per dtype, for values of order one (the helpers below scale inputs to keep them
# there): about one unit in the last place of each format near 1.
ATOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
FACTOR = 2.0


def assert_oracle(name, got, low, exact, dtype):
    """got: kernel result; low: the PyTorch reference in the kernel's dtypes; exact: float64 reference."""
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(exact.shape)}"
    got, low, exact = got.double(), low.double(), exact
    bound = FACTOR * (low - exact).abs().max().item() + ATOL[dtype]
    err = (got - exact).abs()
    bad = err > bound
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: error {err.max().item():.3e} exceeds bound {bound:.3e} ({bad.sum().item()} of "
            f"{bad.numel()} elements); first at index {idx}: kernel {got[idx].item():.6g}, "
            f"float64 reference {exact[idx].item():.6g}, same-dtype reference {low[idx].item():.6g}")


def make_inputs(M, K, N, r, dtype, adapter_dtype=None, bias=True, device="cpu", seed=0):
    """Random LoRA inputs scaled so outputs and gradients are of order one. x is (M, K); pass M as a
    tuple for a leading batch shape."""
    gen = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    lead = M if isinstance(M, tuple) else (M,)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dt).to(device)

    return dict(
        x=rnd(*lead, K),
        weight=rnd(N, K, scale=K ** -0.5),
        bias=rnd(N) if bias else None,
        lora_A=rnd(r, K, scale=K ** -0.5, dt=adapter_dtype),
        lora_B=rnd(N, r, scale=r ** -0.5, dt=adapter_dtype),
    )


NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


def reference_run(inputs, scaling, keep, p, dy, dtype64=False):
    """Output and gradients of the PyTorch reference, in the inputs' dtypes or in float64."""
    leaves = {}
    for name in NAMES:
        t = inputs[name]
        if t is not None:
            t = t.detach().double() if dtype64 else t.detach().clone()
            leaves[name] = t.requires_grad_()
    y = reference.lora_linear(leaves["x"], leaves["weight"], leaves.get("bias"), leaves["lora_A"],
                              leaves["lora_B"], scaling, keep, p)
    y.backward(dy.double() if dtype64 else dy.to(y.dtype))
    return y.detach(), {n: t.grad for n, t in leaves.items()}
