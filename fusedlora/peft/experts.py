"""patch_peft for PEFT's LoRA on expert parameters (LoraConfig(target_parameters=[...]), lora.ParamWrapper).

PEFT wraps an MoE layer's experts module once per targeted 3-D parameter, the wrappers nested (the
outermost's base_layer is the next wrapper, the innermost's the experts module). Its forward, every
call, registers a torch parametrization that returns W + ΔW for all E experts of each targeted
parameter (a new E·N·K tensor each, again on recompute) and runs the experts module on those weights;
it refuses mixed-adapter batches (adapter_names=).

patch_peft gives the outermost wrapper of each chain a forward that serves the whole chain: the experts
module's function through fusedlora.modules.experts.experts_forward, each wrapper's active adapters
read in place in PEFT's layout as the LoRA term of its parameter (several adapters on one parameter:
their ranks concatenated, each block of B scaled by its adapter's scaling). A wrapper that is merged
adds no term (its adapters are in the weight, as in PEFT); one that is disabled adds none either, after
the unmerge PEFT's forward does there. Mixed-adapter batches (adapter_names=, one name per sequence of
the batch) are served too: each token's adapter on the experts it is routed to, over the adapters
stacked per parameter (zero-padded to the largest rank, built from the weights on every call).

Everything else runs PEFT's forward, with the reason reported once per patch_peft call (warning where
fusedlora would have served it): an experts module experts_reason refuses, a hooked experts module or
inner wrapper (PEFT would call them), arguments other than (top_k_index, top_k_weights), LoRA variants,
adapters whose dtype or device the op does not take. A plain call's decision is kept with
the state it was decided from (chain_state): set_adapter, merge / unmerge, enable / disable, adding or
deleting an adapter, a hook, train / eval, a parameter replaced or re-dtyped, x's dtype or device, the
autocast state and FUSEDLORA_BACKEND each make the next call decide again. Weights are read on every call.
"""
import numbers
import types
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from fusedlora.core import knobs
from fusedlora.core.checks import FLOAT_DTYPES
from fusedlora.modules.experts import ExpertLoRA, experts_forward, experts_reason, peft_layout, versions_reason

MERGED_ERROR = "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."


def param_wrapper_class() -> Optional[type]:
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # a PEFT release without target_parameters
        return None
    return ParamWrapper


def chain(outer: nn.Module, wrapper_cls: type) -> Tuple[List[nn.Module], nn.Module]:
    """(the wrappers, outermost first; the module below the innermost)."""
    wrappers, module = [], outer
    while isinstance(module, wrapper_cls):
        wrappers.append(module)
        module = module.base_layer
    return wrappers, module


def routing_args(args, kwargs) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(top_k_index, top_k_weights) from an experts call's arguments after hidden_states, or None."""
    kwargs = {k: v for k, v in kwargs.items() if k != "adapter_names"}
    if len(args) == 2 and not kwargs:
        return args
    names = (("top_k_index", "top_k_weights"), ("router_indices", "routing_weights"))
    for index, weights in names:
        if not args and set(kwargs) == {index, weights}:
            return kwargs[index], kwargs[weights]
    return None


def _names_hook():
    try:
        from peft.tuners.lora.model import _adapter_names_pre_forward_hook
    except ImportError:
        return None
    return _adapter_names_pre_forward_hook


def hooked(module: nn.Module) -> bool:
    """has_hooks (fusedlora/peft/forward.py), less the pre-forward hooks PEFT puts on every LoRA layer to
    pass adapter_names: the patched forward reads those names itself, so skipping an inner wrapper's
    copy loses nothing."""
    names_hook = _names_hook()
    hooks = nn.modules.module
    return (any(getattr(h, "func", None) is not names_hook for h in module._forward_pre_hooks.values())
            or bool(module._forward_hooks or module._backward_hooks or module._backward_pre_hooks
                    or "forward" in module.__dict__ or hooks._global_forward_hooks
                    or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                    or hooks._global_backward_pre_hooks))


def active(wrapper) -> List[str]:
    return [a for a in wrapper.active_adapters if a in wrapper.lora_A]


def _adapter_reason(wrapper, adapter: str, dtype: torch.dtype, device) -> Optional[str]:
    if wrapper.lora_variant.get(adapter) is not None:
        return f"adapter {adapter!r} is a LoRA variant"
    drop = wrapper.lora_dropout[adapter]
    if not (type(drop) is nn.Identity or (type(drop) is nn.Dropout and drop.p == 0)):
        return f"a dropout module {type(drop).__name__} on an expert parameter"
    if wrapper.lora_B[adapter].bias is not None:
        return "lora_bias on an expert parameter"
    scaling = wrapper.scaling[adapter]
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        return f"a scaling of type {type(scaling).__name__}"
    A, B = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight
    if A.dtype != B.dtype or A.dtype not in (dtype, torch.float32):
        return f"expert adapter weights in {A.dtype} / {B.dtype} with expert weights in {dtype}"
    if A.device != device or B.device != device:
        return "expert adapters and expert weights on different devices"
    if A.shape[0] % wrapper.num_experts or A.shape[0] != B.shape[1]:
        return f"expert adapter weights {tuple(A.shape)} / {tuple(B.shape)} not (E·r, K) / (N, E·r)"
    return None


def chain_reason(wrappers, experts, x, args, kwargs, mixed: bool) -> Optional[Tuple[str, bool]]:
    """(reason, costs speed) when this call must run PEFT's forward; None when it is served."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() != 2:
        return f"hidden states {getattr(x, 'shape', type(x).__name__)} that are not (T, H) float", True
    reason = versions_reason(("peft",)) or experts_reason(experts)
    if reason is not None:
        return reason, True
    if hooked(experts) or any(hooked(w) for w in wrappers[1:]):
        return "hooks on the experts module or an inner ParamWrapper", True
    if routing_args(args, kwargs) is None:
        return "experts called with arguments other than (top_k_index, top_k_weights)", True
    if not mixed and all(w.disable_adapters or w.merged or not active(w) for w in wrappers):
        return "no active, unmerged adapter on the expert parameters", False
    weight = getattr(experts, wrappers[0].parameter_name)
    for w in wrappers:
        for adapter in (w.lora_A if mixed else active(w)):
            reason = _adapter_reason(w, adapter, weight.dtype, weight.device)
            if reason is not None:
                return reason, True
    if mixed and len({w.lora_A[a].weight.dtype for w in wrappers for a in w.lora_A}) > 1:
        return "expert adapters of different dtypes in one mixed batch", True
    return None


def chain_state(wrappers, experts, x):
    """What chain_reason's answer for a plain call depends on, as a comparable value (None: unreadable)."""
    if not isinstance(x, torch.Tensor):
        return None
    hooks = nn.modules.module
    try:
        per_wrapper = []
        for w in wrappers:
            d = w.__dict__
            adapters = tuple((a, w.lora_A[a].weight.dtype, w.lora_A[a].weight.device, w.lora_A[a].weight.shape,
                              w.lora_B[a].weight.dtype, w.lora_B[a].weight.device, w.lora_B[a].bias is None,
                              w.scaling.get(a), w.lora_dropout[a], a in w.lora_variant) for a in active(w))
            per_wrapper.append((d["_active_adapter"] if isinstance(d["_active_adapter"], str)
                                else tuple(d["_active_adapter"]), d["_disable_adapters"], len(d["merged_adapters"]),
                                d["training"], adapters, d["_modules"]["base_layer"], len(d["_forward_hooks"]),
                                len(d["_forward_pre_hooks"]), len(d["_backward_hooks"]),
                                len(d["_backward_pre_hooks"]), "forward" in d))
        e = experts.__dict__
        params = tuple((n, id(p), p.dtype, p.device) for n, p in e["_parameters"].items() if p is not None)
        experts_part = (params, "parametrizations" in e["_modules"], len(e["_forward_hooks"]),
                        len(e["_forward_pre_hooks"]), len(e["_backward_hooks"]), len(e["_backward_pre_hooks"]),
                        "forward" in e, getattr(getattr(experts, "config", None), "_experts_implementation", None),
                        e.get("_is_expert_parallel"))
    except (KeyError, AttributeError, TypeError):
        return None
    global_hooks = (len(hooks._global_forward_hooks), len(hooks._global_forward_pre_hooks),
                    len(hooks._global_backward_hooks), len(hooks._global_backward_pre_hooks))
    return (tuple(per_wrapper), experts_part, global_hooks, x.dtype, x.device, x.dim(),
            torch.is_autocast_enabled(x.device.type), knobs.backend())


def _one_term(w, adapters: List[str]) -> ExpertLoRA:
    """The LoRA term of one wrapper's active adapters: PEFT sums their deltas, which is one LoRA of the
    concatenated ranks with each block of B scaled by its adapter's scaling."""
    E = w.num_experts
    views = [peft_layout(w.lora_A[a].weight, w.lora_B[a].weight, E) for a in adapters]
    scalings = [float(w.scaling[a]) for a in adapters]
    if len(views) == 1:
        (A, B), = views
        return ExpertLoRA(A, B, scalings[0])
    A = torch.cat([A for A, _ in views], dim=2)
    if len(set(scalings)) == 1:
        return ExpertLoRA(A, torch.cat([B for _, B in views], dim=3), scalings[0])
    return ExpertLoRA(A, torch.cat([B * s for (_, B), s in zip(views, scalings)], dim=3), 1.0)


def plain_terms(wrappers) -> Dict[str, ExpertLoRA]:
    """{parameter name: term} of a plain call, with PEFT's disabled and merged semantics."""
    terms = {}
    for w in wrappers:
        if w.disable_adapters:
            if w.merged:
                w.unmerge()  # what PEFT's forward does for a disabled, merged wrapper
            continue
        adapters = active(w)
        if w.merged or not adapters:
            continue
        terms[w.parameter_name] = _one_term(w, adapters)
    return terms


def _stacked_term(w, adapters: List[str]) -> Optional[ExpertLoRA]:
    """One wrapper's share of a mixed batch over `adapters` (the batch's, sorted): lora_A (L, E, R, K) and
    lora_B (L, E, N, R) zero-padded to the largest rank, ranks 0 for adapters the wrapper lacks."""
    held = [a for a in adapters if a in w.lora_A]
    if not held:
        return None
    E = w.num_experts
    ref_A, ref_B = w.lora_A[held[0]].weight, w.lora_B[held[0]].weight
    K, N = ref_A.shape[1], ref_B.shape[0]
    ranks = [w.lora_A[a].weight.shape[0] // E if a in w.lora_A else 0 for a in adapters]
    R = max(ranks)
    As, Bs = [], []
    for a, r in zip(adapters, ranks):
        if r:
            A, B = peft_layout(w.lora_A[a].weight, w.lora_B[a].weight, E)
            As.append(nn.functional.pad(A[0], (0, 0, 0, R - r)))
            Bs.append(nn.functional.pad(B[0], (0, R - r)))
        else:
            As.append(ref_A.new_zeros(E, R, K))
            Bs.append(ref_B.new_zeros(E, N, R))
    device = ref_A.device
    scalings = torch.tensor([float(w.scaling[a]) if a in w.lora_A else 0.0 for a in adapters], device=device)
    return ExpertLoRA(torch.stack(As), torch.stack(Bs), scalings, torch.tensor(ranks, device=device))


class _TokenIds:
    """Per-token adapter ids of recent mixed batches, keyed by (names, adapters, tokens, device): the MoE
    layers of one forward share them. A small table of int tensors made from the names alone."""

    def __init__(self, size: int = 8):
        self.size, self.table = size, OrderedDict()

    def __call__(self, names, adapters: List[str], tokens: int, device) -> torch.Tensor:
        key = (tuple(names), tuple(adapters), tokens, device)
        ids = self.table.get(key)
        if ids is None:
            slot = {a: i for i, a in enumerate(adapters)}
            per_row = torch.tensor([slot.get(n, -1) for n in names], device=device)
            ids = per_row.repeat_interleave(tokens // len(names))
            if not torch.compiler.is_compiling():
                self.table[key] = ids
                if len(self.table) > self.size:
                    self.table.popitem(last=False)
        return ids


def mixed_forward(wrappers, experts, x, top_k_index, top_k_weights, names, token_ids: _TokenIds):
    """PEFT's adapter_names= semantics on the experts: the tokens of sequence b (the experts see the batch
    flattened, B·S tokens) use adapter names[b] on every expert they are routed to; "__base__" and names
    the chain does not hold add nothing."""
    if any(w.merged for w in wrappers):
        raise ValueError(MERGED_ERROR)
    T = x.shape[0]
    if not names or T % len(names):
        raise ValueError(f"adapter_names has {len(names)} names, but the experts got {T} tokens: each of the "
                         f"{len(names)} sequences must hold the same number of tokens")
    adapters = sorted({n for n in names for w in wrappers if n in w.lora_A})
    if not adapters:
        return experts_forward(experts, x, top_k_index, top_k_weights)
    terms = {w.parameter_name: t for w in wrappers if (t := _stacked_term(w, adapters)) is not None}
    ids = token_ids(names, adapters, T, x.device)
    return experts_forward(experts, x, top_k_index, top_k_weights, terms, adapter_ids=ids, num_adapters=len(adapters))


def _patched_forward(layer_name: str, report, peft_forward, wrapper_cls):
    decided = {"state": None, "why": None}
    token_ids = _TokenIds()

    def forward(self, x, *args, **kwargs):
        wrappers, experts = chain(self, wrapper_cls)
        names = kwargs.get("adapter_names")
        # A plain call's decision is kept (chain_state); under torch.compile the graph's guards do that job.
        if names is None and len(args) == 2 and not kwargs and not torch.compiler.is_compiling():
            state = chain_state(wrappers, experts, x)
            if state is None or state != decided["state"]:
                decided["why"] = chain_reason(wrappers, experts, x, args, kwargs, mixed=False)
                decided["state"] = state
            why = decided["why"]
        else:
            why = chain_reason(wrappers, experts, x, args, kwargs, mixed=names is not None)
        if why is not None:
            report(layer_name, *why)
            return peft_forward(self, x, *args, **kwargs)
        top_k_index, top_k_weights = routing_args(args, kwargs)
        if names is not None:
            return mixed_forward(wrappers, experts, x, top_k_index, top_k_weights, list(names), token_ids)
        terms = plain_terms(wrappers)
        if not terms:
            return experts(x, *args, **{k: v for k, v in kwargs.items() if k != "adapter_names"})
        return experts_forward(experts, x, top_k_index, top_k_weights, terms)

    forward.fusedlora_patch = True
    return forward


def patch_param_wrappers(peft_model: nn.Module, report) -> int:
    """Give the outermost ParamWrapper of every chain over 3-D expert parameters the served forward;
    returns how many chains it patched. Wrappers of 2-D parameters (one "expert") and subclasses with a
    forward of their own are left to PEFT."""
    wrapper_cls = param_wrapper_class()
    if wrapper_cls is None:
        return 0
    inner = {id(m.base_layer) for m in peft_model.modules() if isinstance(m, wrapper_cls)}
    count = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, wrapper_cls) or id(module) in inner or type(module).forward is not wrapper_cls.forward:
            continue
        wrappers, _ = chain(module, wrapper_cls)
        if any(getattr(w, "num_experts", 1) < 2 or getattr(w, "_param_ndim", 3) != 3 for w in wrappers):
            continue
        module.forward = types.MethodType(_patched_forward(name, report, wrapper_cls.forward, wrapper_cls), module)
        count += 1
    return count
