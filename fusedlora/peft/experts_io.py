"""PEFT's adapter files for LoRA on MoE expert parameters (target_parameters), both ways.

PEFT wraps an experts module once per targeted parameter, nested in the module's own parameter order:
the first targeted parameter's wrapper is innermost. Its keys are therefore
`base_model.model.<module>` + `.base_layer` × depth + `.lora_A.weight` / `.lora_B.weight`, depth 0 for
the last targeted parameter; lora_A is (E·r, in) and lora_B (out, E·r) (fusedlora.modules.experts.
peft_layout). Which parameter a depth holds depends on the model, so a file is resolved against one:
read_adapter sets these entries aside (split_expert_entries) and resolve_experts names them. r of a
parameter comes from the weights (rows of lora_A over E) and must agree with rank_pattern, matched
against "<module>.<parameter>" as PEFT matches it; alpha from alpha_pattern the same way.
"""
from pathlib import Path
from typing import Dict, NamedTuple, Tuple

import torch
from torch import nn

from fusedlora.modules.experts import LoRAExperts, expert_layers, expert_weight, experts_reason, projections, \
    targeted_parameters
from fusedlora.modules.rules import check_lora_options, lora_scaling, matches_target, pattern_value

PREFIX = "base_model.model."
BASE = ".base_layer"


class ExpertWeights(NamedTuple):
    """One expert parameter of an adapter: lora_A (E·r, K), lora_B (N, E·r) as stored, r, alpha, scaling."""
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    r: int
    lora_alpha: float
    scaling: float


def _fail(path, what: str):
    from fusedlora.peft.adapter_io import AdapterFileError  # adapter_io imports this module
    raise AdapterFileError(f"{path}: {what}")


def unwrap(module: str) -> Tuple[str, int]:
    """(the module a ParamWrapper chain wraps, depth): "a.experts.base_layer" -> ("a.experts", 1)."""
    depth = 0
    while module.endswith(BASE):
        module, depth = module[:-len(BASE)], depth + 1
    return module, depth


def split_expert_entries(path, config: dict, lora: dict) -> Dict[str, Dict[int, dict]]:
    """Take the entries of expert parameters out of `lora` ({module: {"lora_A", "lora_B"}} of the file):
    {experts module: {depth: {"lora_A", "lora_B"}}}. An entry is an expert's when a target_parameters entry
    selects "<module>.<p>" for its own parameter name p (PEFT's rule)."""
    targets = config.get("target_parameters") or []
    if targets and (isinstance(targets, str) or not all(isinstance(t, str) and t for t in targets)):
        _fail(path, f"target_parameters must be a list of parameter names, got {targets!r}")
    experts = {}
    for module in list(lora):
        unwrapped, depth = unwrap(module)
        if any(matches_target(targets, f"{unwrapped}.{t.rpartition('.')[2]}") for t in targets):
            pair = lora.pop(module)
            if "magnitude" in pair:
                _fail(path, f"{module}: DoRA on an expert parameter is not supported")
            experts.setdefault(unwrapped, {})[depth] = pair
    return experts


def resolve_experts(model: nn.Module, entries: Dict[str, Dict[int, dict]], config: dict,
                    path: Path) -> Dict[str, Dict[str, ExpertWeights]]:
    """{experts module: {parameter: ExpertWeights}} of split_expert_entries' result for this model, every
    key, shape and rank checked against it; nothing is changed."""
    out = {}
    targets = config.get("target_parameters") or []
    for name, by_depth in sorted(entries.items()):
        where = f"{PREFIX}{name}"
        try:
            module = model.get_submodule(name)
        except AttributeError:
            _fail(path, f"{where}: the model has no module {name!r}")
        # LoRAExperts and an adapter pool's PooledExperts hold the experts module as base_layer
        experts = module.base_layer if isinstance(getattr(module, "base_layer", None), nn.Module) else module
        reason = experts_reason(experts) if isinstance(experts, nn.Module) else "not a module"
        if reason is not None:
            _fail(path, f"{where}: the model's {type(module).__name__} cannot take expert LoRA: {reason}")
        params = targeted_parameters(name, experts, targets)
        if sorted(by_depth) != list(range(len(params))):
            _fail(path, f"{where}: the file holds ParamWrapper depths {sorted(by_depth)}, but target_parameters "
                        f"selects {params} of the model's module (depths 0..{len(params) - 1})")
        out[name] = {}
        for depth, pair in by_depth.items():
            p = params[len(params) - 1 - depth]  # the first targeted parameter is wrapped innermost
            if p not in projections(experts):
                _fail(path, f"{where}: target_parameters selects {p}, not an expert projection {projections(experts)}")
            for half in ("lora_A", "lora_B"):
                if half not in pair:
                    _fail(path, f"{where}{BASE * depth}: no {half}.weight")
            A, B = pair["lora_A"], pair["lora_B"]
            E, N, K = expert_weight(experts, p)[0].shape
            r = A.shape[0] // E if A.dim() == 2 else 0
            if A.dim() != 2 or B.dim() != 2 or r == 0 or tuple(A.shape) != (E * r, K) or tuple(B.shape) != (N, E * r):
                _fail(path, f"{where}.{p}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit the model's "
                            f"{E} experts (in {K}, out {N}): expected (E·r, {K}) and ({N}, E·r)")
            key = f"{name}.{p}"
            config_r = pattern_value(config["rank_pattern"], key, config["r"])
            if r != config_r:
                _fail(path, f"{key}: lora_A holds r = {r} rows per expert but the config gives r = {config_r}")
            alpha = pattern_value(config["alpha_pattern"], key, config["lora_alpha"])
            try:
                check_lora_options(r, alpha, config["lora_dropout"], config["use_rslora"])
            except (TypeError, ValueError) as e:
                _fail(path, f"{key}: {e}")
            out[name][p] = ExpertWeights(A, B, r, alpha, lora_scaling(r, alpha, config["use_rslora"]))
    return out


def check_expert_layers(model: nn.Module, resolved, path) -> None:
    """The model's LoRAExperts and the file must cover the same parameters with the same ranks."""
    existing = expert_layers(model)
    for name, layer in existing.items():
        have = resolved.get(name)
        if have is None:
            _fail(path, f"has no weights for the model's expert LoRA layer {name}")
        if sorted(have) != sorted(layer.parameter_names):
            _fail(path, f"{PREFIX}{name}: the file covers {sorted(have)}, the model's LoRAExperts "
                        f"{sorted(layer.parameter_names)}")
        for p, w in have.items():
            if layer.lora[p].r != w.r:
                _fail(path, f"{name}.{p}: r = {w.r}, but the model's LoRAExperts has r = {layer.lora[p].r}")


@torch.no_grad()
def load_experts(model: nn.Module, resolved, dropout: float, rslora: bool) -> None:
    """Install resolved (checked) expert weights: new LoRAExperts where the module has none."""
    from fusedlora.modules.inject import replace_module
    for name, params in resolved.items():
        module = model.get_submodule(name)
        if not isinstance(module, LoRAExperts):
            module = LoRAExperts(module, list(params), {p: w.r for p, w in params.items()},
                                 {p: w.lora_alpha for p, w in params.items()}, dropout, rslora)
            replace_module(model, name, module)
        for p, w in params.items():
            adapter = module.lora[p]
            adapter.set_options(w.lora_alpha, dropout, rslora)
            adapter.lora_A.copy_(w.lora_A)
            adapter.lora_B.copy_(w.lora_B)


def expert_entries(model: nn.Module):
    """(tensors under PEFT's keys, target_parameters, {key: r}, {key: alpha}, the adapters) of the model's
    LoRAExperts, for save_adapter."""
    tensors, targets, ranks, alphas, adapters = {}, [], {}, {}, []
    for name, layer in expert_layers(model).items():
        params = layer.parameter_names
        for i, p in enumerate(params):
            key = f"{PREFIX}{name}{BASE * (len(params) - 1 - i)}"
            adapter = layer.lora[p]
            tensors[f"{key}.lora_A.weight"] = adapter.lora_A
            tensors[f"{key}.lora_B.weight"] = adapter.lora_B
            targets.append(f"{name}.{p}")
            ranks[f"{name}.{p}"], alphas[f"{name}.{p}"] = adapter.r, adapter.lora_alpha
            adapters.append(adapter)
    return tensors, _short_targets(model, targets), ranks, alphas, adapters


def _short_targets(model: nn.Module, keys):
    """"<last module part>.<parameter>" entries when those select exactly `keys` in the model, else the keys."""
    short = sorted({f"{k.rpartition('.')[0].rpartition('.')[2]}.{k.rpartition('.')[2]}" for k in keys})
    hits = set()
    for name, module in model.named_modules():
        if isinstance(module, LoRAExperts):
            module = module.base_layer
            hits |= {f"{name}.{p}" for p in targeted_parameters(name, module, short)}
        elif not any(name.startswith(n + ".") for n in expert_layers(model)):
            hits |= {f"{name}.{p}" for p in module._parameters if matches_target(short, f"{name}.{p}")}
    return short if hits == set(keys) else sorted(keys)
