"""The DoRA rows (dora_fwd, dora_fwd_bwd): one projection with a DoRA adapter, LayerStack's interface.

Providers, over the same inputs (adapters and magnitude in the row's dtype):
- base:            x·Wᵀ through torch.matmul (cuBLAS): the floor; with backward, plus the dX GEMM.
- peft:            a real PEFT DoRA layer (LoraConfig(use_dora=True), autocast_adapter_dtype=False).
- fusedlora:       fusedlora.dora_linear on the plan the planner picks; fusedlora[fused] and
                   fusedlora[split] force one plan.
- fusedlora_lora:  fusedlora.lora_linear on the same x, W, A and B: plain LoRA's cost, the reference
                   the DoRA target is stated against (DoRA forward+backward <= 1.15x of it).
With backward each call returns the gradients of x, A, B and (DoRA) the magnitude. Checks run with
dropout off against float64 (fusedlora.reference.dora_linear, reference.lora_linear for the LoRA row).
"""
import functools
import itertools

import peft
import torch
from torch import nn

import fusedlora
from fusedlora.core import reference

from providers import L2_FLUSH_BYTES, _rel_err, norm_tolerance, saved_mib

DORA_PROVIDERS = ("base", "peft", "fusedlora", "fusedlora[fused]", "fusedlora[split]", "fusedlora_lora")
PROVIDERS = {"dora_fwd": DORA_PROVIDERS, "dora_fwd_bwd": DORA_PROVIDERS}


def peft_dora_layer(weight, lora_A, lora_B, magnitude, scaling):
    r = lora_A.shape[0]
    model = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                                    dtype=weight.dtype))
    config = peft.LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["0"], use_dora=True)
    peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    layer = model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
        layer.scaling["default"] = scaling
    return layer


class OneProjection:
    """What the one-projection benches (DoRA here, QLoRA in qlora_providers.py) share: a call with or
    without the gradients of leaves(), the float64 result of _exact(), and the operation count. A subclass
    sets forwards, backward, dy, M, K, N, r and defines leaves() and _exact()."""

    def _shapes(self, M, K, N, r, dtype, device, backward, scaling):
        """Keep the shapes and options; returns (rnd, gen): rnd(*shape, scale=1.0, grad=False) draws normal
        tensors in dtype on device from gen, a CPU generator seeded 0, in call order."""
        self.M, self.K, self.N, self.r, self.dtype = M, K, N, r, dtype
        self.backward, self.scaling = backward, scaling
        gen = torch.Generator().manual_seed(0)

        def rnd(*shape, scale=1.0, grad=False):
            t = torch.randn(*shape, generator=gen) * scale
            return t.to(device=device, dtype=dtype).requires_grad_(grad)

        return rnd, gen

    def call(self, name, x):
        if not self.backward:
            with torch.no_grad():
                return [self.forwards[name](x)]
        y = self.forwards[name](x)
        return [y, *torch.autograd.grad(y, self.leaves(name, x), self.dy)]

    @functools.lru_cache(maxsize=None)
    def _float64(self, name):
        return self._exact(torch.float64, name)

    def flops(self, name):
        """The LoRA layer's operations, one count for every provider of a row (DoRA's norms, W·Aᵀ: 2·N·K·r,
        and dequantizing a 4-bit W are not counted)."""
        gemm, low_rank = 2 * self.M * self.N * self.K, 2 * self.M * self.r * (self.K + self.N)
        if not self.backward:
            return gemm + (0 if name == "base" else low_rank)
        return 2 * gemm + (0 if name == "base" else 3 * low_rank)


class DoRABench(OneProjection):
    def __init__(self, M, K, N, r, dtype, device, backward=False, scaling=2.0, rotate=True):
        rnd, gen = self._shapes(M, K, N, r, dtype, device, backward, scaling)
        self.weight = rnd(N, K, scale=K ** -0.5)
        self.lora_A = rnd(r, K, scale=K ** -0.5, grad=backward)
        self.lora_B = rnd(N, r, scale=r ** -0.5, grad=backward)
        norm = reference.dora_weight_norm(self.weight.float(), self.lora_A.float(), self.lora_B.float(), scaling)
        self.magnitude = (norm * (1 + 0.2 * torch.randn(N, generator=gen).to(device))).to(dtype)
        self.magnitude.requires_grad_(backward)
        copies = max(1, min(16, L2_FLUSH_BYTES // max(M * K * dtype.itemsize, 1))) if rotate else 1
        self.xs = [rnd(M, K, grad=backward) for _ in range(copies)]
        self.dy = rnd(M, N)
        self.peft_layer = peft_dora_layer(self.weight, self.lora_A, self.lora_B, self.magnitude, scaling).eval()
        dora = lambda x: fusedlora.dora_linear(x, self.weight, None, self.lora_A, self.lora_B,  # noqa: E731
                                               self.magnitude, scaling)
        self.forwards = {
            "base": lambda x: torch.matmul(x, self.weight.t()),
            "peft": lambda x: self.peft_layer(x),
            "fusedlora": dora, "fusedlora[fused]": dora, "fusedlora[split]": dora,
            "fusedlora_lora": lambda x: fusedlora.lora_linear(x, self.weight, None, self.lora_A, self.lora_B, scaling),
        }
        nxt = itertools.cycle(self.xs).__next__
        self.providers = {name: (lambda name=name: self.call(name, nxt())) for name in DORA_PROVIDERS}

    def leaves(self, name, x):
        if name == "base":
            return [x]
        if name == "peft":
            layer = self.peft_layer
            return [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                    layer.lora_magnitude_vector["default"].weight]
        return [x, self.lora_A, self.lora_B] + ([] if name == "fusedlora_lora" else [self.magnitude])

    def _exact(self, dtype, name):
        """The provider's function in plain torch, in `dtype`: output, then the gradients of leaves()."""
        def leaf(t):
            return t.detach().to(dtype).requires_grad_(self.backward)

        x, A, B, m = leaf(self.xs[0]), leaf(self.lora_A), leaf(self.lora_B), leaf(self.magnitude)
        W = self.weight.to(dtype)
        if name == "base":
            y, leaves = x @ W.t(), [x]
        elif name == "fusedlora_lora":
            y, leaves = reference.lora_linear(x, W, None, A, B, self.scaling), [x, A, B]
        else:
            y, leaves = reference.dora_linear(x, W, None, A, B, m, self.scaling), [x, A, B, m]
        if not self.backward:
            return [y.detach()]
        return [y.detach(), *torch.autograd.grad(y, leaves, self.dy.to(dtype))]

    def check(self, name):
        return _rel_err(zip(self.call(name, self.xs[0]), self._float64(name)))

    @functools.cached_property
    def tolerance(self):
        low = self._exact(self.dtype, "fusedlora")
        return norm_tolerance(_rel_err(zip(low, self._float64("fusedlora"))), self.dtype)

    def saved_mb(self, name):
        if not self.backward:
            return None
        held = [*self.xs, self.weight, self.lora_A, self.lora_B, self.magnitude, *self.peft_layer.parameters()]
        return saved_mib(lambda: self.forwards[name](self.xs[0]), held)



def dora_bench(case, spec, device, rotate=True):
    """Case builder for dora_fwd and dora_fwd_bwd."""
    return DoRABench(spec.M, spec.K, spec.N, spec.r, spec.torch_dtype, device, backward=case.backward, rotate=rotate)
