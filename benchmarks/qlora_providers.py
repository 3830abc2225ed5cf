"""The QLoRA rows (qlora_fwd, qlora_fwd_bwd): one projection over a bitsandbytes 4-bit base, set up as
PEFT sets up QLoRA, LayerStack's interface.

The base is a bitsandbytes Linear4bit (nf4, compute dtype the row's dtype) in a model marked as loaded
in 4 bits and passed through peft.prepare_model_for_kbit_training, so that get_peft_model wraps it in
PEFT's bnb LoRA layer (peft.tuners.lora.bnb.Linear4bit; asserted). Adapters and magnitude are in the
row's dtype (autocast_adapter_dtype=False), as in the other cases. Providers, over the same inputs:
- base:            the Linear4bit alone (dequantize, then the GEMM): the floor; with backward, plus dX.
- peft:            PEFT's bnb LoRA layer, unpatched.
- fusedlora:       the same PEFT layer after fusedlora.patch_peft: the 4-bit base's output, then
                   fusedlora.lora_add of the low-rank term onto it.
- peft_dora:       QDoRA: PEFT's bnb layer with use_dora=True (it dequantizes W for the row norms).
- fusedlora_dora:  that layer after patch_peft (fusedlora.dora_linear over the dequantized weight).
With backward each call returns the gradients of x, lora_A, lora_B and (DoRA) the magnitude.

A 4-bit layer cannot run in float64, but its function is x·dequant(W)ᵀ: checks compare against float64
math over the weight bitsandbytes.functional.dequantize_4bit returns, written here in plain torch.

bitsandbytes is optional (the GPU machine may lack it): MISSING then says why, and suite.py runs no
row of these cases and run.py says so.
"""
import copy
import functools
import itertools

import peft
import torch
from torch import nn

import fusedlora
from fusedlora.peft.patch import fallback_reason

from dora_providers import OneProjection
from providers import L2_FLUSH_BYTES, _rel_err, norm_tolerance, saved_mib

try:
    import bitsandbytes as bnb
    MISSING = None
except Exception as exc:  # ImportError, or a broken install failing in its own import code
    bnb = None
    MISSING = f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc})"

QLORA_PROVIDERS = ("base", "peft", "fusedlora", "peft_dora", "fusedlora_dora")
PROVIDERS = {"qlora_fwd": QLORA_PROVIDERS, "qlora_fwd_bwd": QLORA_PROVIDERS}
DORA = ("peft_dora", "fusedlora_dora")


def missing():
    """Why the QLoRA cases cannot run here, or None when they can."""
    return MISSING


def linear_4bit(weight, dtype):
    """A bitsandbytes nf4 Linear4bit over `weight` (N, K), computing in `dtype`; quantized by the move
    to the weight's device."""
    N, K = weight.shape
    layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.detach().cpu().clone(), requires_grad=False, quant_type="nf4")
    return layer.to(weight.device)


def peft_qlora_layer(base, lora_A, lora_B, scaling, magnitude=None):
    """PEFT's bnb LoRA layer (DoRA when a magnitude is given) over a copy of the 4-bit `base`, its
    adapters set to the given ones, inside the model PEFT built (the model is what patch_peft takes)."""
    from peft.tuners.lora import bnb as lora_bnb

    r, dtype = lora_A.shape[0], lora_A.dtype
    model = nn.Sequential(copy.deepcopy(base))
    model.is_loaded_in_4bit = True  # what transformers sets on a model loaded with load_in_4bit
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["0"], use_dora=magnitude is not None)
    peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    layer = model[0]
    if type(layer) is not lora_bnb.Linear4bit:
        raise TypeError(f"PEFT wrapped the 4-bit base in {type(layer).__module__}.{type(layer).__name__}, "
                        "not its bnb LoRA layer peft.tuners.lora.bnb.Linear4bit: not a QLoRA setup")
    adapters = [layer.lora_A["default"], layer.lora_B["default"]]
    if magnitude is not None:
        adapters.append(layer.lora_magnitude_vector["default"])
    with torch.no_grad():
        for module, value in zip(adapters, (lora_A, lora_B, magnitude)):
            module.to(dtype)  # PEFT leaves adapters over a uint8 (packed) weight in float32
            module.weight.copy_(value)
        layer.scaling["default"] = scaling  # exact, whatever lora_alpha / r rounds to
    return model


class QLoRABench(OneProjection):
    def __init__(self, M, K, N, r, dtype, device, backward=False, scaling=2.0, rotate=True):
        rnd, gen = self._shapes(M, K, N, r, dtype, device, backward, scaling)
        self.base = linear_4bit(rnd(N, K, scale=K ** -0.5), dtype)
        for p in self.base.parameters():
            p.requires_grad_(False)
        w = self.base.weight
        # The weight the 4-bit layer computes with (in the dtype it was quantized from).
        self.weight = bnb.functional.dequantize_4bit(w.data, w.quant_state).to(dtype)
        self.lora_A = rnd(r, K, scale=K ** -0.5, grad=backward)
        self.lora_B = rnd(N, r, scale=r ** -0.5, grad=backward)  # never zero: the low-rank term counts
        norm = self.row_norm(self.weight.double(), self.lora_A.double(), self.lora_B.double())
        self.magnitude = (norm * (1 + 0.2 * torch.randn(N, generator=gen, dtype=torch.float64).to(device))).to(dtype)
        self.magnitude.requires_grad_(backward)
        copies = max(1, min(16, L2_FLUSH_BYTES // max(M * K * dtype.itemsize, 1))) if rotate else 1
        self.xs = [rnd(M, K, grad=backward) for _ in range(copies)]
        self.dy = rnd(M, N)
        self.models = {
            "peft": peft_qlora_layer(self.base, self.lora_A, self.lora_B, scaling),
            "fusedlora": peft_qlora_layer(self.base, self.lora_A, self.lora_B, scaling),
            "peft_dora": peft_qlora_layer(self.base, self.lora_A, self.lora_B, scaling, self.magnitude),
            "fusedlora_dora": peft_qlora_layer(self.base, self.lora_A, self.lora_B, scaling, self.magnitude),
        }
        for name in ("fusedlora", "fusedlora_dora"):
            if fusedlora.patch_peft(self.models[name]) != 1:
                raise RuntimeError(f"{name}: patch_peft did not patch PEFT's bnb LoRA layer")
        # Every module stays in training mode (dropout is 0 anyway): in eval mode bitsandbytes' CPU path
        # repacks the weight in place for its AVX512-bf16 kernel, which needs N % 32 == 0 and leaves a
        # layout dequantize_4bit does not read. A GPU never takes that path.
        self.forwards = {"base": self.base, **self.models}
        nxt = itertools.cycle(self.xs).__next__
        self.providers = {name: (lambda name=name: self.call(name, nxt())) for name in QLORA_PROVIDERS}

    def row_norm(self, W, A, B):
        """‖W_n + s·B_n·A‖ per output row n, as DoRA takes it (and detaches it)."""
        return (W + self.scaling * B @ A).norm(dim=1).detach()

    def leaves(self, name, x):
        if name == "base":
            return [x]
        layer = self.models[name][0]
        leaves = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        return leaves + ([layer.lora_magnitude_vector["default"].weight] if name in DORA else [])

    def _exact(self, dtype, name):
        """The provider's function from the math, in plain torch in `dtype`, over the dequantized weight:
        output, then the gradients of leaves()."""
        def leaf(t):
            return t.detach().to(dtype).requires_grad_(self.backward)

        x, A, B, m = leaf(self.xs[0]), leaf(self.lora_A), leaf(self.lora_B), leaf(self.magnitude)
        W = self.weight.to(dtype)
        if name == "base":
            y, leaves = x @ W.t(), [x]
        else:
            y, leaves = x @ W.t() + self.scaling * (x @ A.t()) @ B.t(), [x, A, B]
            if name in DORA:
                # DoRA: the output rescaled by m / ‖W + s·B·A‖, the norm a constant for autograd.
                y, leaves = m / self.row_norm(W, A, B) * y, leaves + [m]
        if not self.backward:
            return [y.detach()]
        return [y.detach(), *torch.autograd.grad(y, leaves, self.dy.to(dtype))]

    def check(self, name):
        if name.startswith("fusedlora"):
            # A patched layer that falls back to PEFT's forward would pass the check and time PEFT.
            why = fallback_reason(self.models[name][0], self.xs[0], (), {})
            if why is not None:
                raise RuntimeError(f"{name}: the patched layer runs PEFT's own forward ({why[0]})")
        return _rel_err(zip(self.call(name, self.xs[0]), self._float64(name)))

    @functools.cached_property
    def tolerance(self):
        """The bound of the looser of LoRA's and DoRA's math in the row's dtype (one bound per row)."""
        return max(norm_tolerance(_rel_err(zip(self._exact(self.dtype, name), self._float64(name))), self.dtype)
                   for name in ("fusedlora", "fusedlora_dora"))

    def saved_mb(self, name):
        if not self.backward:
            return None
        held = [*self.xs, self.weight, self.lora_A, self.lora_B, self.magnitude, *self.base.parameters(),
                *(p for model in self.models.values() for p in model.parameters())]
        return saved_mib(lambda: self.forwards[name](self.xs[0]), held)



def qlora_bench(case, spec, device, rotate=True):
    """Case builder for qlora_fwd and qlora_fwd_bwd (suite.py builds none when MISSING is set)."""
    if MISSING is not None:
        raise RuntimeError(MISSING)
    return QLoRABench(spec.M, spec.K, spec.N, spec.r, spec.torch_dtype, device, backward=case.backward,
                      rotate=rotate)
