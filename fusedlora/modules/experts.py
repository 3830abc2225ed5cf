"""transformers' Mixture-of-Experts experts modules through fusedlora.moe_lora_linear, with LoRA on their
3-D expert parameters.

transformers 5 keeps all experts of an MoE layer in one module (decorated with
transformers.integrations.moe.use_experts_implementation) whose 3-D parameters hold every expert:
gate_up_proj (E, 2I, H) (or up_proj (E, I, H) without a gate) and down_proj (E, H, I), stored
transposed, (E, H, 2I) and (E, I, H), where the module says `is_transposed` (gpt-oss), with biases
gate_up_proj_bias (E, 2I) and down_proj_bias (E, H) where it says `has_bias`. Every experts
implementation transformers offers (grouped_mm, the default; batched_mm; ...) computes, for token t
routed to experts top_k_index[t] with weights top_k_weights[t],

    y[t] = Σ_j top_k_weights[t, j]·norm(down_e(gate(gate_up_e(x[t]))))      e = top_k_index[t, j]

with the module's own gate (`_apply_gate`: SwiGLU over concatenated halves for Qwen3-MoE and Mixtral,
gpt-oss's clamped GLU over interleaved columns; `act_fn` when there is no gate) and its own
post-expert norm where it has one. experts_forward computes that function with each projection one
moe_lora_linear call over one ExpertRouting shared by both, LoRA added per expert (and per adapter in
mixed-adapter batches). Any module whose forward is not that function is refused with the reason
(experts_reason): no such flags, expert parallelism, or the "eager" implementation of a class whose own
loop is not checked against it.

LoRAExperts is fusedlora's own expert LoRA module (inject(..., target_parameters=...)): the adapters in
PEFT's ParamWrapper layout, dropout included (PEFT refuses dropout on expert parameters).
"""
import functools
import importlib
import sys
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from fusedlora.core.checks import FLOAT_DTYPES
from fusedlora.core.moe_routing import ExpertRouting
from fusedlora.modules.rules import (check_init_lora_weights, check_lora_options, init_lora_factors, matches_target,
                                     pattern_value, set_lora_options)
from fusedlora.moe import moe_lora_linear

# Experts classes whose own ("eager") forward computes the function above, read off their code in
# transformers 5.25. Under any other implementation every decorated class computes it.
EAGER_CHECKED = ("Qwen3MoeExperts", "MixtralExperts", "GptOssExperts")
# The oldest releases the expert support is tested with. The dense layers' floors (peft 0.18.0,
# transformers 5.4.0) do not serve experts: 5.4's expert modules are not use_experts_implementation
# modules, and with transformers 5.5 and peft 0.18 the expert adapters reached the kernels in another
# layout (not investigated further). Below these, patch_peft leaves experts to PEFT with a warning
# naming the floor; inject and AdapterPool refuse them.
EXPERTS_FLOORS = {"transformers": "5.25.0", "peft": "0.21.2"}
IMPLEMENTATION = "fusedlora"


class ExpertLoRA(NamedTuple):
    """The LoRA terms of one expert parameter: lora_A (L, E, R, K) and lora_B (L, E, N, R) (any strides),
    scaling (a float, or (L,) per adapter), ranks ((L,) or None), dropout_p (on the projection's input)."""
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: Union[float, torch.Tensor]
    ranks: Optional[torch.Tensor] = None
    dropout_p: float = 0.0


def peft_layout(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int):
    """PEFT's ParamWrapper weights as moe_lora_linear's (1, E, R, K) and (1, E, N, R) views, no copy:
    lora_A (E·R, K) holds expert e's rows at [e·R, (e + 1)·R); lora_B (N, E·R) holds B_e[n, j] at
    [n, j·E + e] (PEFT reads it as (N, R, E))."""
    E = num_experts
    R = lora_A.shape[0] // E
    return (lora_A.view(1, E, R, lora_A.shape[1]),
            lora_B.view(lora_B.shape[0], R, E).permute(2, 0, 1).unsqueeze(0))


def projections(experts: nn.Module) -> List[str]:
    """The names of the module's two expert parameters, in the order the forward applies them."""
    return ["gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj", "down_proj"]


def versions_reason(packages=("transformers",)) -> Optional[str]:
    """Why the installed releases of `packages` cannot serve expert parameters, or None."""
    for name in packages:
        module = sys.modules.get(name) or importlib.import_module(name)
        if _older(name, module.__version__):
            return (f"{name} {module.__version__}: LoRA on expert parameters needs {name} >= "
                    f"{EXPERTS_FLOORS[name]}, the oldest release it is tested with")
    return None


@functools.lru_cache(maxsize=None)
def _older(name: str, version: str) -> bool:
    from packaging.version import Version  # a dependency of transformers
    return Version(version) < Version(EXPERTS_FLOORS[name])


def experts_reason(experts: nn.Module) -> Optional[str]:
    """Why experts_forward cannot stand in for this module's forward, or None."""
    reason = versions_reason()
    if reason is not None:
        return reason
    flags = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")
    if not all(isinstance(getattr(experts, f, None), bool) for f in flags):
        return f"{type(experts).__name__} is not a transformers experts module (use_experts_implementation)"
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallelism (experts sharded across devices)"
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if implementation == "eager" and type(experts).__name__ not in EAGER_CHECKED:
        return f"the eager forward of {type(experts).__name__}, its own code"
    if "parametrizations" in experts.__dict__.get("_modules", {}):
        return "a parametrized expert parameter"
    shapes = {}
    for name in projections(experts):
        w = experts._parameters.get(name)
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.dtype not in FLOAT_DTYPES:
            return f"expert parameter {name} is {None if w is None else (tuple(w.shape), w.dtype)}, not 3-D float"
        shapes[name] = tuple(w.transpose(1, 2).shape) if experts.is_transposed else tuple(w.shape)  # (E, N, K)
        if experts.has_bias:
            b = experts._parameters.get(name + "_bias")
            if not isinstance(b, torch.Tensor) or tuple(b.shape) != shapes[name][:2]:
                return f"{name}_bias is not (E, N) = {shapes[name][:2]}"
    (E, N1, H), (E2, H2, I) = shapes.values()
    if E2 != E or H2 != H:
        return f"expert parameters {shapes} do not chain (E, N, H) then (E, H, I)"
    if experts.has_gate and getattr(experts, "_apply_gate", None) is None:
        return "a gated experts module without _apply_gate"
    if not experts.has_gate and not callable(getattr(experts, "act_fn", None)):
        return "an experts module without a gate or act_fn"
    return None


def expert_weight(experts: nn.Module, name: str):
    """(weight as (E, N, K), a view; bias (E, N) or None) of one projection."""
    w = getattr(experts, name)
    bias = getattr(experts, name + "_bias") if experts.has_bias else None
    return (w.transpose(1, 2) if experts.is_transposed else w), bias


def experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, lora: Optional[Dict[str, ExpertLoRA]] = None,
                    adapter_ids: Optional[torch.Tensor] = None, num_adapters: int = 1) -> torch.Tensor:
    """The experts module's function (module docstring), LoRA added on the parameters named in `lora`.

    hidden_states: (T, H); top_k_index: (T, k); top_k_weights: (T, k) -> (T, H) in hidden_states' dtype.
    adapter_ids: (T,) in [-1, num_adapters) for a mixed-adapter batch (each ExpertLoRA then holds
    num_adapters adapters), or None. As transformers' grouped implementation does, the products run in
    the weights' dtype (x is cast to it, autocast off), the adapters in theirs."""
    lora = lora or {}
    first, second = projections(experts)
    w1, b1 = expert_weight(experts, first)
    w2, b2 = expert_weight(experts, second)
    routing = ExpertRouting(top_k_index, w1.shape[0], adapter_ids, num_adapters)
    x = hidden_states.to(w1.dtype)
    with torch.autocast(x.device.type, enabled=False):
        h = _project(x, routing, w1, b1, lora.get(first), gather=True)
        h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
        out = _project(h.to(w2.dtype), routing, w2, b2, lora.get(second), gather=False)
        if experts.has_post_expert_norm:
            out = experts.post_expert_norm(out)
        return routing.combine(out, top_k_weights).to(hidden_states.dtype)


def _project(x, routing, weight, bias, term: Optional[ExpertLoRA], gather: bool):
    if term is None:
        return moe_lora_linear(x, routing, weight, bias, None, None, 1.0, gather=gather)
    return moe_lora_linear(x, routing, weight, bias, term.lora_A, term.lora_B, term.scaling, term.dropout_p,
                           gather=gather, ranks=term.ranks)


def fused_experts_implementation(self, hidden_states, top_k_index, top_k_weights):
    """transformers' experts-implementation signature: the module's function through moe_lora_linear,
    without LoRA (LoRAExperts and patched PEFT layers add theirs)."""
    return experts_forward(self, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> str:
    """Register experts_forward with transformers' ExpertsInterface as "fusedlora" and return the name:
    then `model.set_experts_implementation("fusedlora")` (or `from_pretrained(...,
    experts_implementation="fusedlora")`) runs every experts module of a model through fusedlora."""
    from transformers.integrations.moe import ExpertsInterface
    ExpertsInterface.register(IMPLEMENTATION, fused_experts_implementation)
    return IMPLEMENTATION


class ExpertAdapter(nn.Module):
    """LoRA on one expert parameter of E experts, in PEFT's ParamWrapper layout: lora_A (E·r, K) and
    lora_B (N, E·r) (PEFT's lora_A.weight and lora_B.weight), fp32, trainable; scaling alpha/r (alpha/√r
    with rslora). init_lora_weights as LoRALinear's (True: A kaiming-uniform over K, B zero)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, r: int, lora_alpha: float,
                 lora_dropout: float, use_rslora: bool, init_lora_weights, device=None):
        super().__init__()
        check_lora_options(r, lora_alpha, lora_dropout, use_rslora)
        self.num_experts, self.in_features, self.out_features, self.r = num_experts, in_features, out_features, r
        self.lora_A = nn.Parameter(torch.empty(num_experts * r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, num_experts * r, device=device))
        self.set_options(lora_alpha, lora_dropout, use_rslora)
        self.reset_lora_parameters(init_lora_weights)

    def set_options(self, lora_alpha: float, lora_dropout: float, use_rslora: bool) -> None:
        set_lora_options(self, lora_alpha, lora_dropout, use_rslora)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: Union[bool, str] = True) -> None:
        init_lora_factors(self.lora_A, self.lora_B, self.r, init_lora_weights)

    def term(self, training: bool) -> ExpertLoRA:
        A, B = peft_layout(self.lora_A, self.lora_B, self.num_experts)
        return ExpertLoRA(A, B, self.scaling, None, self.lora_dropout if training else 0.0)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}")


class LoRAExperts(nn.Module):
    """A frozen transformers experts module (`base_layer`) with LoRA on some of its expert parameters.

    parameter_names: the targeted parameters (gate_up_proj, up_proj, down_proj), each with its own
    ExpertAdapter in `lora[name]`; r and lora_alpha: an int / float for all, or {name: value}. Called
    as the experts module is, (hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H),
    through experts_forward; dropout applies in training mode, a fresh mask per projection."""

    def __init__(self, base_layer: nn.Module, parameter_names: Sequence[str], r: Union[int, Dict[str, int]] = 8,
                 lora_alpha: Union[float, Dict[str, float]] = 8, lora_dropout: float = 0.0, use_rslora: bool = False,
                 init_lora_weights: Union[bool, str] = True):
        super().__init__()
        reason = experts_reason(base_layer)
        if reason is not None:
            raise TypeError(f"LoRAExperts cannot serve {type(base_layer).__name__}: {reason}")
        check_init_lora_weights(init_lora_weights)
        allowed = projections(base_layer)
        names = [n for n in base_layer._parameters if n in parameter_names]  # the module's own order
        if not names or len(names) != len(set(parameter_names)):
            raise ValueError(f"LoRAExperts: parameter_names {list(parameter_names)} must name expert parameters of "
                             f"{type(base_layer).__name__} among {allowed}")
        for n in names:
            if n not in allowed:
                raise ValueError(f"LoRAExperts: {n} is not an expert projection of {type(base_layer).__name__} "
                                 f"({allowed})")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.lora = nn.ModuleDict()
        for n in names:
            w, _ = expert_weight(base_layer, n)
            E, N, K = w.shape
            self.lora[n] = ExpertAdapter(E, K, N, r[n] if isinstance(r, dict) else r,
                                         lora_alpha[n] if isinstance(lora_alpha, dict) else lora_alpha,
                                         lora_dropout, use_rslora, init_lora_weights, device=w.device)

    @property
    def parameter_names(self) -> List[str]:
        return list(self.lora.keys())

    def forward(self, hidden_states, top_k_index, top_k_weights):
        terms = {n: adapter.term(self.training) for n, adapter in self.lora.items()}
        return experts_forward(self.base_layer, hidden_states, top_k_index, top_k_weights, terms)


def expert_layers(model: nn.Module) -> Dict[str, LoRAExperts]:
    """{module name: LoRAExperts} for every expert LoRA module of the model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAExperts)}


def targeted_parameters(module_name: str, experts: nn.Module, target_parameters: Sequence[str]) -> List[str]:
    """The module's parameters that PEFT's target_parameters rule selects: "<module>.<parameter>" equal to
    an entry or ending with "." + an entry; in the module's own (registration) order."""
    return [p for p in experts._parameters if matches_target(list(target_parameters), f"{module_name}.{p}")]


def plan_experts(model: nn.Module, target_parameters: Sequence[str], r: int, lora_alpha: float, lora_dropout: float,
                 use_rslora: bool, rank_pattern=None, alpha_pattern=None, skip=lambda name: False):
    """{module name: (parameter names, {name: r}, {name: alpha})} for the experts modules whose parameters
    target_parameters selects (PEFT's rule, targeted_parameters), each checked: a targeted module must be
    one experts_forward serves, and only its projections may be targeted. rank_pattern / alpha_pattern are
    matched against "<module>.<parameter>", as PEFT matches them. skip(name): modules to leave alone."""
    if isinstance(target_parameters, str) or not target_parameters or \
            not all(isinstance(t, str) and t for t in target_parameters):
        raise TypeError(f"target_parameters must be a non-empty list of parameter names, got {target_parameters!r}")
    plan = {}
    inside = [n for n, m in model.named_modules() if isinstance(m, LoRAExperts)]
    for name, module in model.named_modules():
        if not name or skip(name) or any(name == n or name.startswith(n + ".") for n in inside):
            continue
        params = targeted_parameters(name, module, target_parameters)
        if not params:
            continue
        reason = experts_reason(module)
        if reason is not None:
            raise ValueError(f"target_parameters selects {', '.join(f'{name}.{p}' for p in params)}, but "
                             f"{type(module).__name__} cannot be served: {reason}")
        others = [p for p in params if p not in projections(module)]
        if others:
            raise ValueError(f"target_parameters selects {', '.join(f'{name}.{p}' for p in others)}: only the expert "
                             f"projections {projections(module)} take LoRA")
        ranks = {p: pattern_value(rank_pattern or {}, f"{name}.{p}", r) for p in params}
        alphas = {p: pattern_value(alpha_pattern or {}, f"{name}.{p}", lora_alpha) for p in params}
        for p in params:
            try:
                check_lora_options(ranks[p], alphas[p], lora_dropout, use_rslora)
            except (TypeError, ValueError) as e:
                raise type(e)(f"inject, parameter {name}.{p}: {e}") from None
        plan[name] = params, ranks, alphas
    if not plan:
        raise ValueError(f"target_parameters {list(target_parameters)} matches no expert parameter of the model")
    return plan
