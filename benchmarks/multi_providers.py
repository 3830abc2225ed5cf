"""The multi_fwd case: one batch in which every token uses one of L adapters, drawn uniformly.

Providers, all over the same inputs (x: (M, K), L adapters of rank r stacked as (L, r, K) and (L, N, r)):
- base:              the base GEMM alone through torch.matmul: the floor.
- peft:              a real PEFT LoRA Linear holding the L adapters, called with adapter_names=
                     (PEFT's mixed-batch inference: a loop over the adapters present).
- bmm:               gather each token's adapter and batched matmuls.
- fusedlora_unfused: the base GEMM, then fusedlora's shrink and expand kernels (the Punica/vLLM
                     structure).
- fusedlora:         fusedlora.multi_lora_linear, the expand inside the base GEMM.
Forward only, under no_grad, as in serving.
"""
import functools
import itertools

import peft
import torch
from torch import nn

import fusedlora
from fusedlora import reference
from fusedlora.multi import multi_lora_linear_unfused
from providers import norm_tolerance

L2_FLUSH_BYTES = 256 << 20
PROVIDERS = ("base", "peft", "bmm", "fusedlora_unfused", "fusedlora")


def peft_layer(weight, lora_A, lora_B, scalings):
    """A PEFT LoRA Linear over `weight` with adapters "a0".."a{L-1}" set to the given stacks."""
    L, r, K = lora_A.shape
    model = nn.Sequential(nn.Linear(K, weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype))
    for i in range(L):
        config = peft.LoraConfig(r=r, lora_alpha=r, target_modules=["0"])
        if i == 0:
            peft.get_peft_model(model, config, adapter_name="a0", autocast_adapter_dtype=False)
        else:
            model[0].update_layer(f"a{i}", r, lora_alpha=r, config=config)
    layer = model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        for i in range(L):
            layer.lora_A[f"a{i}"].weight.copy_(lora_A[i])
            layer.lora_B[f"a{i}"].weight.copy_(lora_B[i])
            layer.scaling[f"a{i}"] = float(scalings[i])
    return layer.to(weight.dtype).eval()


def bmm_forward(x, weight, lora_A, lora_B, scalings, ids):
    """Every token's adapter gathered, then two batched matmuls: memory M·r·(K + N)."""
    u = torch.bmm(lora_A[ids], x.unsqueeze(2))                  # (M, r, 1)
    low_rank = torch.bmm(lora_B[ids], u).squeeze(2)             # (M, N)
    return x @ weight.t() + low_rank * scalings[ids, None].to(x.dtype)


class MultiBatch:
    """One multi_fwd row; the interface of providers.LayerStack (suite.py uses it)."""

    backward = False

    def __init__(self, M, K, N, r, L, dtype, device, rotate=True):
        self.M, self.K, self.N, self.r, self.L, self.dtype = M, K, N, r, L, dtype
        gen = torch.Generator().manual_seed(0)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

        self.weight = rnd(N, K, scale=K ** -0.5)
        self.lora_A = rnd(L, r, K, scale=K ** -0.5)
        self.lora_B = rnd(L, N, r, scale=r ** -0.5)
        self.scalings = (torch.rand(L, generator=gen) + 0.5).to(device)
        copies = max(1, min(16, L2_FLUSH_BYTES // max(M * K * dtype.itemsize, 1))) if rotate else 1
        self.inputs = [(rnd(M, K), torch.randint(0, L, (M,), generator=gen).to(device)) for _ in range(copies)]
        self.peft_layer = peft_layer(self.weight, self.lora_A, self.lora_B, self.scalings)
        self._names = {id(ids): [f"a{i}" for i in ids.tolist()] for _, ids in self.inputs}
        stacks = (self.lora_A, self.lora_B, self.scalings)
        self.forwards = {
            "base": lambda x, ids: x @ self.weight.t(),
            "peft": lambda x, ids: self.peft_layer(x, adapter_names=self._names[id(ids)]),
            "bmm": lambda x, ids: bmm_forward(x, self.weight, *stacks, ids),
            "fusedlora_unfused": lambda x, ids: multi_lora_linear_unfused(x, self.weight, None, *stacks, ids),
            "fusedlora": lambda x, ids: fusedlora.multi_lora_linear(x, self.weight, None, *stacks, ids),
        }
        nxt = itertools.cycle(self.inputs).__next__
        self.providers = {name: (lambda name=name: self.call(name, *nxt())) for name in PROVIDERS}

    def call(self, name, x, ids):
        with torch.no_grad():
            return self.forwards[name](x, ids)

    def _exact(self, dtype, base=False):
        x, ids = self.inputs[0]
        if base:
            return x.to(dtype) @ self.weight.to(dtype).t()
        return reference.multi_lora_linear(x.to(dtype), self.weight.to(dtype), None, self.lora_A.to(dtype),
                                           self.lora_B.to(dtype), self.scalings.to(dtype), ids)

    @functools.cached_property
    def _float64(self):
        return self._exact(torch.float64)

    def check(self, name):
        got = self.call(name, *self.inputs[0]).double()
        exact = self._exact(torch.float64, base=True) if name == "base" else self._float64
        return ((got - exact).norm() / exact.norm()).item()

    @functools.cached_property
    def tolerance(self):
        """providers.norm_tolerance of the same-dtype reference's relative error."""
        low = self._exact(self.dtype).double()
        return norm_tolerance(((low - self._float64).norm() / self._float64.norm()).item(), self.dtype)

    def saved_mb(self, name):
        return None  # forward only

    def flops(self, name):
        gemm = 2 * self.M * self.N * self.K
        return gemm if name == "base" else gemm + 2 * self.M * self.r * (self.K + self.N)


def multi_batch(case, spec, device, rotate=True):
    """Case builder for multi_fwd."""
    return MultiBatch(spec.M, spec.K, spec.N, spec.r, spec.adapters, spec.torch_dtype, device, rotate=rotate)
