"""patch_peft / unpatch_peft: serve a PEFT model's LoRA Linear layers through the fused path, in place.

Only the forward of each peft.tuners.lora.Linear instance changes (an instance attribute that
shadows the class's forward); PEFT keeps owning the parameters and the config, so its save,
set_adapter, merge and mixed-batch inference work as before. On every call the fused path serves
the common case, one active vanilla LoRA adapter on a plain nn.Linear; anything else runs PEFT's own
forward, and each reason for that is reported once per patch_peft call: with warnings.warn where
the fused path would have been faster, with logging (INFO) where there is nothing to fuse (adapters
disabled or merged, no active adapter).

adapter_names= calls (PEFT's mixed-adapter batches) are served by fusedlora.multi_lora_linear over the
layer's adapters stacked (cached until a weight or the adapter set changes), without dropout: in
training mode with lora_dropout > 0 they fall back.

PEFT's dtypes are kept: fp32 adapters under a bf16 base run as bf16 x and W with fp32 A and B, and
the output has the base layer's dtype, as PEFT returns. Under autocast, x and W take the autocast
dtype as nn.Linear would (modules.fused_call).
"""
import logging
import types
import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from fusedlora.checks import FLOAT_DTYPES
from fusedlora.modules import fused_call, is_plain_linear
from fusedlora.multi import multi_lora_linear

logger = logging.getLogger(__name__)


def _peft_linear():
    try:
        from peft.tuners.lora import Linear
    except ImportError as e:
        raise ImportError("patch_peft needs the peft package (pip install peft)") from e
    return Linear


def _dtype_reason(layer, x, base, A, B) -> Optional[str]:
    if torch.is_autocast_enabled(x.device.type):
        return None  # fused_call casts x and W to the autocast dtype, as nn.Linear would
    if x.dtype not in FLOAT_DTYPES:
        return f"x has dtype {x.dtype}"
    if base.weight.dtype != x.dtype:
        return f"x ({x.dtype}) and the base weight ({base.weight.dtype}) differ in dtype"
    if A.dtype != B.dtype or A.dtype not in (x.dtype, torch.float32):
        return f"adapter weights in {A.dtype} / {B.dtype} under a {x.dtype} base"
    if A.dtype != x.dtype and not getattr(layer, "cast_input_dtype_enabled", True):
        return "input dtype casting is disabled (peft.helpers.disable_input_dtype_casting)"
    return None


def _serving_reason(layer, x, adapters, args, kwargs) -> Optional[str]:
    """Why the fused path cannot serve these adapters of this layer on this call, or None."""
    for adapter in adapters:
        variants = getattr(layer, "lora_variant", {})  # PEFT >= 0.16; older releases only have use_dora
        if adapter in variants:
            return f"adapter {adapter!r} is a LoRA variant ({type(variants[adapter]).__name__})"
        if getattr(layer, "use_dora", {}).get(adapter):
            return f"adapter {adapter!r} is a DoRA adapter"
        if getattr(layer, "lora_bias", {}).get(adapter):
            return f"adapter {adapter!r} has a bias on lora_B (lora_bias)"
        if not isinstance(layer.lora_dropout[adapter], (nn.Identity, nn.Dropout)):
            return f"a custom dropout module {type(layer.lora_dropout[adapter]).__name__}"
    base = layer.get_base_layer()
    if not is_plain_linear(base):
        return f"the base layer is a {type(base).__name__}, not an nn.Linear"
    if base._forward_hooks or base._forward_pre_hooks:
        return "the base layer has forward hooks"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    if args or any(v is not None for v in kwargs.values()):
        return "extra forward arguments"
    for adapter in adapters:
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        reason = _dtype_reason(layer, x, base, A, B)
        if reason is not None:
            return reason
        if not (x.device == base.weight.device == A.device == B.device):
            return "x, the base weight and the adapter weights are on different devices"
    return None


def _mixed_batch_reason(layer, x, names) -> Optional[Tuple[str, bool]]:
    """The extra conditions of an adapter_names= call, served by fusedlora.multi_lora_linear."""
    used = mixed_batch_adapters(layer, names)
    if not used:
        return "no adapter of the mixed batch is on this layer", False
    if torch.is_autocast_enabled(x.device.type):
        return "autocast in a mixed-adapter batch", True
    if layer.training and any(getattr(layer.lora_dropout[a], "p", 0.0) > 0 for a in used):
        return "dropout in a mixed-adapter batch (the multi-adapter kernel has none)", True
    if len({layer.lora_A[a].weight.dtype for a in used}) > 1:
        return "adapters of different dtypes in one mixed batch", True
    return None


def mixed_batch_adapters(layer, names):
    """The adapters of an adapter_names= list that this layer holds, sorted (the stack's order)."""
    return sorted({n for n in names if n in layer.lora_A})


def fallback_reason(layer, x, args, kwargs) -> Optional[Tuple[str, bool]]:
    """(reason, costs speed) when this call must run PEFT's forward; None when the fused path serves it."""
    if layer.disable_adapters:
        return "adapters are disabled", False
    if layer.merged:
        return "the adapter is merged into the base weight", False
    names = kwargs.get("adapter_names")
    rest = {k: v for k, v in kwargs.items() if k != "adapter_names"}
    if names is not None:
        why = _mixed_batch_reason(layer, x, names)
        if why is not None:
            return why
        adapters = mixed_batch_adapters(layer, names)
    else:
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        if not adapters:
            return "no active adapter", False
        if len(adapters) > 1:
            return f"several active adapters {adapters}", True
    reason = _serving_reason(layer, x, adapters, args, rest)
    return (reason, True) if reason is not None else None


class _Reporter:
    """Reports each fallback reason once per patch_peft call, naming the first layer it hit."""

    def __init__(self):
        self.seen = set()

    def __call__(self, layer_name: str, reason: str, costly: bool) -> None:
        # Dynamo cannot trace warnings or logging: a compiled region falls back without a word, and
        # the first eager call reports it.
        if reason in self.seen or torch.compiler.is_compiling():
            return
        self.seen.add(reason)
        message = (f"fusedlora: PEFT layer {layer_name} runs PEFT's own forward: {reason} "
                   "(reported once per reason)")
        if costly:
            warnings.warn(message, stacklevel=4)
        else:
            logger.info(message)


class _Stacks:
    """A layer's adapters stacked for multi_lora_linear: (lora_A (L, R, K), lora_B (L, N, R), scalings,
    ranks), rebuilt only when the adapter set or a weight changes (tensor version counters), except
    when gradients flow to the adapters, where the stack must be part of the graph."""

    def __init__(self):
        self.key, self.value = None, None

    def __call__(self, layer, adapters):
        weights = [(layer.lora_A[a].weight, layer.lora_B[a].weight) for a in adapters]
        track = torch.is_grad_enabled() and any(A.requires_grad or B.requires_grad for A, B in weights)
        key = tuple((a, A.data_ptr(), A._version, B.data_ptr(), B._version, float(layer.scaling[a]))
                    for a, (A, B) in zip(adapters, weights))
        if track or key != self.key:
            R = max(A.shape[0] for A, _ in weights)
            with torch.set_grad_enabled(track):
                stack_A = torch.stack([nn.functional.pad(A, (0, 0, 0, R - A.shape[0])) for A, _ in weights])
                stack_B = torch.stack([nn.functional.pad(B, (0, R - B.shape[1])) for _, B in weights])
            device = stack_A.device
            scalings = torch.tensor([float(layer.scaling[a]) for a in adapters], device=device)
            ranks = torch.tensor([A.shape[0] for A, _ in weights], dtype=torch.int32, device=device)
            value = (stack_A, stack_B, scalings, ranks)
            if track:
                return value
            self.key, self.value = key, value
        return self.value


def _mixed_batch_forward(layer, x, names, stacks: _Stacks):
    """PEFT's adapter_names= semantics through one multi_lora_linear call: row b of x uses adapter
    names[b]; "__base__", and adapters this layer does not hold, add nothing."""
    layer._check_forward_args(x, adapter_names=names)  # PEFT's own checks and messages
    adapters = mixed_batch_adapters(layer, names)
    slot = {a: i for i, a in enumerate(adapters)}
    rows = torch.tensor([slot.get(n, -1) for n in names], device=x.device)
    ids = rows.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
    base = layer.get_base_layer()
    lora_A, lora_B, scalings, ranks = stacks(layer, adapters)
    return multi_lora_linear(x, base.weight, base.bias, lora_A, lora_B, scalings, ids, ranks)


def _patched_forward(layer_name: str, report: _Reporter, peft_forward):
    stacks = _Stacks()

    def forward(self, x, *args, **kwargs):
        why = fallback_reason(self, x, args, kwargs)
        if why is not None:
            report(layer_name, *why)
            return peft_forward(self, x, *args, **kwargs)
        if kwargs.get("adapter_names") is not None:
            return _mixed_batch_forward(self, x, kwargs["adapter_names"], stacks)
        adapter = next(a for a in self.active_adapters if a in self.lora_A)
        base, dropout = self.get_base_layer(), self.lora_dropout[adapter]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        return fused_call(x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                          self.scaling[adapter], p)

    forward.fusedlora_patch = True
    return forward


def _is_patched(module: nn.Module) -> bool:
    return getattr(getattr(module.__dict__.get("forward"), "__func__", None), "fusedlora_patch", False)


def patch_peft(peft_model: nn.Module) -> int:
    """Serve every PEFT LoRA Linear layer of `peft_model` (a PeftModel or any module holding
    peft.tuners.lora.Linear layers) through fusedlora.lora_linear. Returns how many layers it patched.
    Layer subclasses with a forward of their own (quantized LoRA layers) are left alone. Patching again
    re-patches; unpatch_peft undoes it."""
    linear = _peft_linear()
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"patch_peft: expected a torch.nn.Module, got {type(peft_model).__name__}")
    report = _Reporter()
    count = 0
    for name, module in peft_model.named_modules():
        if isinstance(module, linear) and type(module).forward is linear.forward:
            module.forward = types.MethodType(_patched_forward(name, report, linear.forward), module)
            count += 1
    return count


def unpatch_peft(peft_model: nn.Module) -> int:
    """Give the patched layers their PEFT forward back; returns how many it restored."""
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"unpatch_peft: expected a torch.nn.Module, got {type(peft_model).__name__}")
    count = 0
    for module in peft_model.modules():
        if _is_patched(module):
            del module.forward
            count += 1
    return count
