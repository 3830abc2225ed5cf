"""The MoE rows (moe_fwd, moe_fwd_bwd): one MoE layer's experts with LoRA on both expert parameters, on one
fixed routing (random top-k experts and weights per token), LayerStack's interface.

A row's M is the number of tokens, K the hidden size H and N the experts' intermediate size I; the
experts and top-k come from EXPERTS (Qwen3-30B-A3B on a GPU: E = 128, top-8, H = 2048, I = 768). The
experts module is a transformers Qwen3MoeExperts (gate_up_proj (E, 2I, H), down_proj (E, H, I), SiLU gate)
in the row's dtype, adapters in the row's dtype too (autocast_adapter_dtype=False, as the other rows).
Providers, over the same inputs:
- base:              the experts module's own forward without LoRA (transformers' grouped_mm
                     implementation): the unit; with backward, the gradient of x (weights frozen).
- peft:              PEFT 0.21's LoRA on the expert parameters (LoraConfig(target_parameters=...), nested
                     ParamWrappers): W + ΔW for every expert each forward.
- fusedlora[torch]:  the same PEFT model after fusedlora.patch_peft, on fusedlora's PyTorch backend
                     (grouped products, no W + ΔW; suite.py sets FUSEDLORA_BACKEND=torch).
- fusedlora:         the same on the default backend: the Triton MoE op (its plan by choose_moe).
With backward each call returns the gradients of x and of the four LoRA weights. The check is against
the PEFT model copied to float64 with transformers' "eager" experts implementation (each family's own
loop over experts; grouped_mm has no float64 kernel), the tolerance from the same eager path in the row's
dtype. moe_fwd_bwd must keep at most SAVED_SHARE of PEFT's saved-for-backward bytes (suite.memory_failures).
"""
import copy
import functools
import itertools

import peft
import torch
from torch import nn

import fusedlora
from providers import L2_FLUSH_BYTES, _rel_err, norm_tolerance, saved_mib

# (experts, top-k) per device: Qwen3-30B-A3B's on a GPU; on CPU 8 experts, top-2, so that the tiny rows keep
# some tokens per expert (E·2I/P, the share of expert weights to routed activations: 6 at the GPU row of
# 4096 tokens, 9.7 at the CPU check's 37 tokens).
EXPERTS = {"cuda": (128, 8), "cpu": (8, 2)}
SAVED_SHARE = 0.5
MOE_PROVIDERS = ("base", "peft", "fusedlora[torch]", "fusedlora")
PROVIDERS = {"moe_fwd": MOE_PROVIDERS, "moe_fwd_bwd": MOE_PROVIDERS}
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def experts_module(E, H, I, dtype, device, gen):
    """A Qwen3MoeExperts with random weights ~1/√K (its own init is 0.02 and would leave LoRA most of the output)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=1,
                            num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                            vocab_size=8)
    # What a model built from the config would choose; torch's grouped_mm refuses rows that are not a multiple
    # of 16 bytes (the CPU check's H = 70, I = 45), where the family's own loop serves the base and PEFT.
    size = torch.empty((), dtype=dtype).element_size()
    aligned = (H * size) % 16 == 0 and (I * size) % 16 == 0
    config._experts_implementation = "grouped_mm" if aligned else "eager"
    experts = Qwen3MoeExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=gen) * H ** -0.5)
        experts.down_proj.copy_(torch.randn(E, H, I, generator=gen) * I ** -0.5)
    return experts.to(device=device, dtype=dtype).requires_grad_(False)


class MoEBench:
    def __init__(self, M, K, N, r, dtype, device, backward=False, scaling=2.0, rotate=True):
        self.M, self.H, self.I, self.r, self.dtype, self.backward = M, K, N, r, dtype, backward
        self.E, self.k = EXPERTS["cuda" if str(device).startswith("cuda") else "cpu"]
        gen = torch.Generator().manual_seed(0)
        holder = nn.Module()
        holder.experts = experts_module(self.E, K, N, dtype, device, gen)
        config = peft.LoraConfig(r=r, lora_alpha=scaling * r, target_parameters=TARGETS, init_lora_weights=False)
        torch.manual_seed(0)
        self.peft_model = peft.get_peft_model(holder, config, autocast_adapter_dtype=False)
        self.peft_model.requires_grad_(False)
        self.lora = [p for n, p in self.peft_model.named_parameters() if ".lora_" in n]
        with torch.no_grad():
            for p in self.lora:  # B random too, and scaled so that LoRA moves the output by some percent
                p.copy_(torch.randn(p.shape, generator=gen) * (0.1 / max(p.shape) ** 0.5))
        for p in self.lora:
            p.requires_grad_(backward)
        self.layer = self.peft_model.base_model.model.experts  # the outermost ParamWrapper
        self.patched = copy.deepcopy(self.peft_model)
        fusedlora.patch_peft(self.patched)
        self.patched_lora = [p for n, p in self.patched.named_parameters() if ".lora_" in n]
        self.patched_layer = self.patched.base_model.model.experts
        self.base = self._base_module()
        self.top = torch.stack([torch.randperm(self.E, generator=gen)[:self.k] for _ in range(M)]).to(device)
        self.weights = torch.rand(M, self.k, generator=gen).softmax(-1).to(device=device, dtype=dtype)
        copies = max(1, min(16, L2_FLUSH_BYTES // max(M * K * dtype.itemsize, 1))) if rotate else 1
        self.xs = [(torch.randn(M, K, generator=gen)).to(device=device, dtype=dtype).requires_grad_(backward)
                   for _ in range(copies)]
        self.dy = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)
        self.forwards = {
            "base": lambda x: self.base(x, self.top, self.weights),
            "peft": lambda x: self.layer(x, self.top, self.weights),
            "fusedlora[torch]": lambda x: self.patched_layer(x, self.top, self.weights),
            "fusedlora": lambda x: self.patched_layer(x, self.top, self.weights),
        }
        nxt = itertools.cycle(self.xs).__next__
        self.providers = {name: (lambda name=name: self.call(name, nxt())) for name in MOE_PROVIDERS}

    def _base_module(self):
        """The experts module under PEFT's wrappers (shared with the PEFT model: no second copy of the weights)."""
        module = self.peft_model.base_model.model.experts
        while hasattr(module, "base_layer"):
            module = module.base_layer
        return module

    def leaves(self, name, x):
        if name == "base":
            return [x]
        return [x] + (self.lora if name == "peft" else self.patched_lora)

    def call(self, name, x):
        if not self.backward:
            with torch.no_grad():
                return [self.forwards[name](x)]
        y = self.forwards[name](x)
        return [y, *torch.autograd.grad(y, self.leaves(name, x), self.dy)]

    def _exact(self, dtype, lora: bool):
        """Output (and gradients of x and the LoRA weights) of the PEFT model copied to `dtype` with the eager
        experts implementation; lora False: the experts module alone (the base provider's function)."""
        twin = copy.deepcopy(self.peft_model).to(dtype)
        layer = twin.base_model.model.experts
        module = layer
        while hasattr(module, "base_layer"):
            module = module.base_layer
        module.config._experts_implementation = "eager"
        fn = layer if lora else module
        x = self.xs[0].detach().to(dtype).requires_grad_(self.backward)
        params = [p for n, p in twin.named_parameters() if ".lora_" in n] if lora else []
        for p in params:
            p.requires_grad_(self.backward)
        y = fn(x, self.top, self.weights.to(dtype))
        if not self.backward:
            return [y.detach()]
        return [y.detach(), *torch.autograd.grad(y, [x] + params, self.dy.to(dtype))]

    @functools.lru_cache(maxsize=None)
    def _float64(self, lora: bool):
        return self._exact(torch.float64, lora)

    def check(self, name):
        return _rel_err(zip(self.call(name, self.xs[0]), self._float64(name != "base")))

    @functools.cached_property
    def tolerance(self):
        return norm_tolerance(_rel_err(zip(self._exact(self.dtype, True), self._float64(True))), self.dtype)

    def saved_mb(self, name):
        if not self.backward:
            return None
        held = [*self.xs, self.weights, *self.peft_model.parameters(), *self.patched.parameters()]
        return saved_mib(lambda: self.forwards[name](self.xs[0]), held)

    def flops(self, name):
        """The experts' products over the P = M·k routed pairs (LoRA's rank-r products but for base)."""
        P, H, I, r = self.M * self.k, self.H, self.I, self.r
        gemm = 2 * P * (H * 2 * I + I * H)
        low_rank = 2 * P * r * (H + 2 * I + I + H)
        if not self.backward:
            return gemm + (0 if name == "base" else low_rank)
        return 2 * gemm + (0 if name == "base" else 3 * low_rank)


def moe_bench(case, spec, device, rotate=True):
    """Case builder for moe_fwd and moe_fwd_bwd."""
    return MoEBench(spec.M, spec.K, spec.N, spec.r, spec.torch_dtype, device, backward=case.backward, rotate=rotate)
