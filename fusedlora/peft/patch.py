"""patch_peft / unpatch_peft: serve a PEFT model's LoRA Linear layers through the fused path, in place.

Only the forward of each PEFT LoRA Linear instance changes (an instance attribute that shadows the
class's forward); PEFT keeps owning the parameters and the config, so its save, set_adapter, merge
and mixed-batch inference work as before. What a served call computes is in fusedlora/peft/forward.py:
the layer's direct base layer (which may itself be another tuner's layer, a quantized Linear or any
module) is either computed by the fused GEMM, when it is a plain nn.Linear or transformers Conv1D, or
run as it is with the low-rank terms added by fusedlora.lora_add. Vanilla LoRA adapters are served,
one or several at once, with or without lora_bias and dropout. A DoRA adapter (use_dora=True) over a
plain nn.Linear, Conv1D or bitsandbytes Linear4bit is served by fusedlora.dora_linear when it is the
layer's one active adapter, and beside other active adapters by PEFT's loop over them with each term
from fusedlora.lora_add (forward.dora_chain_forward).

Anything else runs PEFT's own forward: the other LoRA variants, DoRA elsewhere, custom dropout modules,
dtypes or devices the kernels do not take, and mixed-adapter batches the multi-adapter kernel cannot
reproduce. A call PEFT refuses (adapter_names= with a merged layer or a wrong length) raises PEFT's own
error, from PEFT's own check; adapter_names= with a DoRA adapter is served where the kernels serve the
call, and raises PEFT's refusal where the call falls back to PEFT. Each reason is reported once per
patch_peft call: with warnings.warn where the fused path would have been faster, with logging (INFO)
where there is nothing to fuse (adapters disabled or merged, no active adapter).

adapter_names= calls (PEFT's mixed-adapter batches) are served by fusedlora.multi_lora_linear over the
layer's adapters stacked (on every call, so that no write to a weight goes unseen), when the direct base
layer is a plain nn.Linear or Conv1D, without dropout, autocast or lora_bias. DoRA adapters among them,
which PEFT refuses there, are served too, each with its scale m / ‖W + s·B·A‖_row computed on every call.

PEFT's dtypes are kept: fp32 adapters under a bf16 base run as bf16 x and W with fp32 A and B, and
the output has the base layer's dtype, as PEFT returns. Under autocast, x and W take the autocast
dtype as nn.Linear would (modules.fused_call, modules.added_call).
"""
import logging
import numbers
import types
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from fusedlora.core.checks import FLOAT_DTYPES
from fusedlora.modules.lora_linear import fused_call, is_plain_linear
from fusedlora.peft.experts import patch_param_wrappers
from fusedlora.peft.forward import (MixedBatchCache, Stacks, active_adapters, check_mixed_batch, dora_chain_forward,
                                    dora_forward, dora_reason, dropout_p, has_hooks, is_dora, mixed_batch_adapters,
                                    mixed_batch_forward, own_weights, served_forward)

logger = logging.getLogger(__name__)
# The model attribute holding its MixedBatchCache. It outlives unpatch_peft: a CUDA graph captured over
# the patched model may still replay, reading the ids of the batches it captured.
CACHE_ATTR = "fusedlora_batch_cache"


# The oldest PEFT patch_peft runs with (setup.py's floor, tested by tests/compat/matrix.py): it reads
# PEFT's layer internals (lora_variant, VARIANT_KWARG_KEYS, _check_forward_args, the variant classes),
# which move between releases, and peft 0.17 does not import with transformers 5.
PEFT_FLOOR = "0.18.0"


def check_peft_version(version: str) -> None:
    """Raise ImportError, naming the floor, for a PEFT release older than PEFT_FLOOR."""
    from packaging.version import Version  # a dependency of peft
    if Version(version) < Version(PEFT_FLOOR):
        raise ImportError(f"patch_peft needs peft >= {PEFT_FLOOR}, the oldest release it is tested with; "
                          f"peft {version} is installed (pip install 'peft>={PEFT_FLOOR}')")


def _peft_classes() -> Dict[type, object]:
    """The PEFT LoRA layer classes whose forward patch_peft reproduces, each with that forward: the
    Linear layer, and where bitsandbytes is installed its 8-bit and 4-bit (QLoRA) layers, whose
    forward differs only in rounding each adapter's term to the output dtype before adding it."""
    try:
        import peft
        from peft.tuners.lora import Linear
    except ImportError as e:
        raise ImportError("patch_peft needs the peft package (pip install peft)") from e
    check_peft_version(peft.__version__)
    classes = {Linear: Linear.forward}
    try:
        from peft.tuners.lora import bnb
    except ImportError:
        return classes
    for name in ("Linear8bitLt", "Linear4bit"):
        cls = getattr(bnb, name, None)
        if cls is not None:
            classes[cls] = cls.forward
    return classes


def _conv1d() -> Optional[type]:
    """transformers' Conv1D (GPT-2's projections, weight (K, N)), if transformers is installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _variant_keys() -> Tuple[str, ...]:
    """Keyword arguments PEFT's forward takes for LoRA variants and never passes to the base layer."""
    try:
        from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
    except ImportError:
        return ()
    return tuple(VARIANT_KWARG_KEYS)


def _plain_dropout(module: nn.Module) -> bool:
    if type(module) is nn.Identity:
        return True
    return isinstance(module, nn.Dropout) and type(module).forward is nn.Dropout.forward and not module.inplace


def _adapter_reason(layer, adapter: str, x: torch.Tensor) -> Optional[str]:
    """Why this adapter's term cannot be computed by the kernels exactly as PEFT computes it, or None."""
    variants = getattr(layer, "lora_variant", {})  # PEFT >= 0.16; older releases only have use_dora
    if adapter in variants and not is_dora(layer, adapter):
        return f"adapter {adapter!r} is a LoRA variant ({type(variants[adapter]).__name__})"
    if adapter not in variants and getattr(layer, "use_dora", {}).get(adapter):
        return f"adapter {adapter!r} is a DoRA adapter of a PEFT release without lora_variant"
    if not _plain_dropout(layer.lora_dropout[adapter]):
        return f"a custom dropout module {type(layer.lora_dropout[adapter]).__name__}"
    scaling = layer.scaling[adapter]
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        return f"a scaling of type {type(scaling).__name__}"
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if A.dtype != B.dtype or A.dtype not in FLOAT_DTYPES:
        return f"adapter weights in {A.dtype} / {B.dtype}"
    if not (x.device == A.device == B.device):
        return "x and the adapter weights are on different devices"
    casting = getattr(layer, "cast_input_dtype_enabled", True)
    if not casting and A.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        return "input dtype casting is disabled (peft.helpers.disable_input_dtype_casting)"
    return None


def _mixed_batch_reason(layer, x, adapters, rest, conv1d) -> Optional[str]:
    """The extra conditions of an adapter_names= call, served by fusedlora.multi_lora_linear, which
    computes the base GEMM itself and has one dtype, no dropout and no per-adapter bias."""
    if torch.is_autocast_enabled(x.device.type):
        return "autocast in a mixed-adapter batch"
    if layer.training and any(dropout_p(layer.lora_dropout[a]) > 0 for a in adapters):
        return "dropout in a mixed-adapter batch (the multi-adapter kernel has none)"
    if any(layer.lora_B[a].bias is not None for a in adapters):
        return "lora_bias in a mixed-adapter batch"
    if len({layer.lora_A[a].weight.dtype for a in adapters}) > 1:
        return "adapters of different dtypes in one mixed batch"
    own = None if rest else own_weights(layer.base_layer, conv1d)
    if own is None:
        return (f"a mixed-adapter batch over a {type(layer.base_layer).__name__} base layer (hooked, "
                "with extra arguments, or not an nn.Linear or Conv1D)")
    weight, bias = own
    A = layer.lora_A[adapters[0]].weight
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype) or A.dtype not in (x.dtype,
                                                                                                torch.float32):
        return f"a mixed-adapter batch with x in {x.dtype}, the base weight in {weight.dtype}, adapters in {A.dtype}"
    if weight.device != x.device:
        return "x and the base weight are on different devices"
    for a in adapters:
        if is_dora(layer, a):
            m = layer.lora_magnitude_vector[a].weight
            if m.dtype != A.dtype or m.device != A.device:
                return f"a DoRA magnitude in {m.dtype} on {m.device} with adapters in {A.dtype} on {A.device}"
    return None


def fallback_reason(layer, x, args, kwargs, conv1d=None, variant_keys=()) -> Optional[Tuple[str, bool]]:
    """(reason, costs speed) when this call must run PEFT's forward; None when the fused path serves it."""
    if layer.disable_adapters:
        return "adapters are disabled", False
    if layer.merged:
        return "the adapter is merged into the base weight", False
    names = kwargs.get("adapter_names")
    if names is not None:
        adapters = mixed_batch_adapters(layer, names)
        if not adapters:
            return "no adapter of the mixed batch is on this layer", False
    else:
        adapters = active_adapters(layer)
        if not adapters:
            return "no active adapter", False
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        return f"x has dtype {getattr(x, 'dtype', type(x).__name__)}", True
    for adapter in adapters:
        reason = _adapter_reason(layer, adapter, x)
        if reason is not None:
            return reason, True
    if names is not None:
        rest = args or {k: v for k, v in kwargs.items() if k != "adapter_names" and k not in variant_keys}
        reason = _mixed_batch_reason(layer, x, adapters, rest, conv1d)
        if reason is not None:
            return reason, True
    elif any(is_dora(layer, a) for a in adapters):
        rest = args or {k: v for k, v in kwargs.items() if k not in variant_keys}
        reason = dora_reason(layer, x, adapters, rest, conv1d)
        if reason is not None:
            return reason, True
    return None


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


class _Decision:
    """What patch_peft decided about a layer for a plain call (x alone), remembered with the state it
    was decided from: the adapter set and its switches (disabled, merged, active), each active
    adapter's dtypes, devices, lora_bias, scaling, dropout module and variant, the base layer and its
    hooks, the casting switch, train/eval, and x's dtype and device under the autocast state. A call
    whose state differs decides again, so set_adapter, merge/unmerge, enable/disable, adding or deleting
    an adapter, a hook, train/eval, a parameter replaced or re-dtyped all take effect on the next call.
    Only the decision is kept: every call reads the weights from the layer."""

    __slots__ = ("state", "why", "single")

    def __init__(self):
        self.state, self.why, self.single = None, None, None

    def __call__(self, layer, x, conv1d, variant_keys):
        """(fallback reason or None, (adapter, scaling, dropout p) when one adapter is fused into a plain
        base layer's GEMM, else None)."""
        state = _state(layer, x)
        if state is None:  # a layer whose state this cannot read: decide on every call
            return fallback_reason(layer, x, (), {}, conv1d, variant_keys), None
        if state != self.state:
            self.why = fallback_reason(layer, x, (), {}, conv1d, variant_keys)
            self.single = None if self.why is not None else _single_fused(layer, x, conv1d)
            self.state = state
        return self.why, self.single


def _state(layer, x):
    """The layer and call state the decision depends on, read from the modules' dicts (a PEFT property
    or nn.Module attribute costs a microsecond each); None where the layer lacks PEFT's usual fields."""
    d = layer.__dict__
    try:
        active, mods = d["_active_adapter"], d["_modules"]
        lora_A, lora_B, drops = mods["lora_A"]._modules, mods["lora_B"]._modules, mods["lora_dropout"]._modules
        base = mods["base_layer"]
        flags = (d["_disable_adapters"], len(d["merged_adapters"]), d["training"], d.get("cast_input_dtype_enabled"))
    except (KeyError, AttributeError, TypeError):
        return None
    if not isinstance(x, torch.Tensor):
        return None
    active = (active,) if isinstance(active, str) else tuple(active)
    hooks = nn.modules.module
    b = base.__dict__
    base_state = (base, b["_parameters"].get("weight"), b["_parameters"].get("bias"),
                  len(b["_forward_hooks"]), len(b["_forward_pre_hooks"]), len(b["_backward_hooks"]),
                  len(b["_backward_pre_hooks"]), "forward" in b, len(hooks._global_forward_hooks),
                  len(hooks._global_forward_pre_hooks), len(hooks._global_backward_hooks),
                  len(hooks._global_backward_pre_hooks))
    weights = tuple((t.dtype, t.device, t.requires_grad) if t is not None else None for t in base_state[1:3])
    variants, dora, scaling = d.get("lora_variant", {}), d.get("use_dora", {}), d.get("scaling", {})
    adapters = []
    for a in active:
        if a not in lora_A:
            adapters.append(None)
            continue
        A, B = lora_A[a]._parameters, lora_B[a]._parameters
        drop = drops.get(a)
        adapters.append((a, A["weight"].dtype, A["weight"].device, B["weight"].dtype, B["weight"].device,
                         B.get("bias") is None, scaling.get(a), drop, getattr(drop, "training", None),
                         getattr(drop, "p", None), a in variants, dora.get(a)))
    return (flags, active, tuple(adapters), base_state[0], base_state[3:], weights, x.dtype, x.device,
            torch.is_autocast_enabled(x.device.type))


def _single_fused(layer, x, conv1d):
    """(adapter, scaling, dropout p) when the served call is one lora_linear over a plain nn.Linear base
    with one adapter and no lora_bias, as served_forward would run it; else None."""
    adapters = active_adapters(layer)
    if len(adapters) != 1:
        return None
    (a,) = adapters
    base = layer.base_layer
    if is_dora(layer, a) or not is_plain_linear(base) or has_hooks(base) or layer.lora_B[a].bias is not None:
        return None
    A = layer.lora_A[a].weight
    if torch.is_autocast_enabled(x.device.type) or base.weight.dtype != x.dtype or base.weight.device != x.device \
            or (base.bias is not None and (base.bias.dtype != x.dtype or base.bias.device != x.device)) \
            or A.dtype not in (x.dtype, torch.float32):
        return None
    return a, float(layer.scaling[a]), dropout_p(layer.lora_dropout[a])


def _patched_forward(layer_name: str, report: _Reporter, peft_forward, conv1d, variant_keys,
                     batches: MixedBatchCache):
    stacks = Stacks()
    decide = _Decision()

    def forward(self, x, *args, **kwargs):
        # Under torch.compile the graph's guards do this job; a Python-side cache there would only
        # add guards on it (and a recompile when it changes).
        if not args and not kwargs and not torch.compiler.is_compiling():
            why, single = decide(self, x, conv1d, variant_keys)
            if single is not None:  # the common call, served without deciding again
                a, scaling, p = single
                mods = self._modules
                base = mods["base_layer"]._parameters
                return fused_call(x, base["weight"], base["bias"], mods["lora_A"][a]._parameters["weight"],
                                  mods["lora_B"][a]._parameters["weight"], scaling, p)
        else:
            if kwargs.get("adapter_names") is not None:  # PEFT's own refusals, raised as PEFT raises them
                check_mixed_batch(self, x, kwargs["adapter_names"], *args,
                                  **{k: v for k, v in kwargs.items() if k != "adapter_names"})
            why = fallback_reason(self, x, args, kwargs, conv1d, variant_keys)
        if why is not None:
            report(layer_name, *why)
            return peft_forward(self, x, *args, **kwargs)
        names = kwargs.pop("adapter_names", None)
        for key in variant_keys:  # PEFT drops these before calling the base layer
            kwargs.pop(key, None)
        if names is not None:
            return mixed_batch_forward(self, x, names, stacks, batches, *own_weights(self.base_layer, conv1d))
        adapters = active_adapters(self)
        if any(is_dora(self, a) for a in adapters):
            return dora_forward(self, x, conv1d) if len(adapters) == 1 else dora_chain_forward(self, x, conv1d)
        return served_forward(self, x, args, kwargs, conv1d, lambda reason: report(layer_name, reason, True))

    forward.fusedlora_patch = True
    return forward


def _is_patched(module: nn.Module) -> bool:
    return getattr(getattr(module.__dict__.get("forward"), "__func__", None), "fusedlora_patch", False)


def patch_peft(peft_model: nn.Module) -> int:
    """Serve every PEFT LoRA Linear layer of `peft_model` (a PeftModel, a PeftMixedModel or any module
    holding peft.tuners.lora.Linear layers), and every chain of ParamWrappers over an MoE layer's expert
    parameters (target_parameters; fusedlora/peft/experts.py), through fusedlora's kernels. Returns how
    many layers it patched (a chain of ParamWrappers counts as one). Layer subclasses with a forward of their own are left alone. Patching again re-patches;
    unpatch_peft undoes it.

    The patched layers share the model's `fusedlora_batch_cache` (a fusedlora.peft.forward.MixedBatchCache
    of the adapter ids of recent adapter_names= batches: len(), keys(), clear()), made by the first
    patch_peft and kept with the model."""
    classes = _peft_classes()
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"patch_peft: expected a torch.nn.Module, got {type(peft_model).__name__}")
    conv1d, variant_keys = _conv1d(), _variant_keys()
    report = _Reporter()
    batches = vars(peft_model).get(CACHE_ATTR)
    if batches is None:
        batches = MixedBatchCache()
        setattr(peft_model, CACHE_ATTR, batches)
    count = 0
    for name, module in peft_model.named_modules():
        peft_forward = next((f for cls, f in classes.items() if isinstance(module, cls) and type(module).forward is f),
                            None)
        if peft_forward is not None:
            forward = _patched_forward(name, report, peft_forward, conv1d, variant_keys, batches)
            module.forward = types.MethodType(forward, module)
            count += 1
    return count + patch_param_wrappers(peft_model, report)  # LoRA on MoE expert parameters (peft/experts.py)


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
