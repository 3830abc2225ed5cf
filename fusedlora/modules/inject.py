"""inject(): adapt a plain PyTorch or transformers model in place, the way get_peft_model would.

Matching nn.Linear modules become LoRALinear; every other parameter is frozen, except biases
(bias="all" / "lora_only") and modules_to_save, as in PEFT. The settings save_adapter needs later
(bias, modules_to_save) are kept on the model in a plain dict attribute, `fusedlora_config`.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from fusedlora.modules.experts import LoRAExperts, expert_layers, plan_experts
from fusedlora.modules.lora_linear import LoRALinear, is_plain_linear
from fusedlora.modules.rules import (ALL_LINEAR, Targets, check_init_lora_weights, check_lora_options, check_targets,
                             inside_to_save, matches_target, matches_to_save, pattern_value)

BIAS_MODES = ("none", "all", "lora_only")
CONFIG_ATTR = "fusedlora_config"


def lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    """{module name: LoRALinear} for every LoRA layer in the model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def output_head_name(model: nn.Module) -> Optional[str]:
    """The name of the model's output head (transformers' get_output_embeddings), which "all-linear"
    leaves out as PEFT does; None for a model that has none."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return None
    return next((name for name, m in model.named_modules() if m is head), None)


def find_targets(model: nn.Module, target_modules: Targets, modules_to_save=None) -> List[str]:
    """Names of the nn.Linear modules that target_modules selects, under PEFT's rules.

    Modules inside an existing LoRALinear or inside a module to save are never targets. A target that
    is not a plain nn.Linear (or is already a LoRALinear) is an error, as is matching nothing.
    """
    check_targets(target_modules)
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    head = output_head_name(model) if all_linear else None
    existing = lora_layers(model)
    found, refused = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(n + ".") for n in existing) or inside_to_save(modules_to_save, name):
            continue
        if all_linear:
            hit = isinstance(module, nn.Linear) and name != head
        else:
            hit = matches_target(target_modules, name)
        if not hit:
            continue
        if is_plain_linear(module):
            found.append(name)
        else:
            what = "already a LoRALinear" if isinstance(module, LoRALinear) else type(module).__name__
            refused.append(f"{name} ({what})")
    if refused:
        raise ValueError(f"target_modules {target_modules!r} matches modules LoRA cannot wrap (only plain "
                         f"nn.Linear layers are supported): {', '.join(refused)}")
    if not found:
        raise ValueError(f"target_modules {target_modules!r} matches no nn.Linear module of the model")
    return found


def check_modules_to_save(model: nn.Module, modules_to_save) -> Optional[List[str]]:
    """A list of name suffixes, each matching at least one module; None when empty."""
    if modules_to_save is None:
        return None
    if isinstance(modules_to_save, str) or not all(isinstance(m, str) and m for m in modules_to_save):
        raise TypeError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    names = [name for name, _ in model.named_modules() if name]
    for m in modules_to_save:
        if not any(name.endswith(m) for name in names):
            raise ValueError(f"modules_to_save entry {m!r} matches no module of the model")
    return list(modules_to_save) or None


def check_bias(bias) -> None:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def set_trainable(model: nn.Module, bias: str, modules_to_save: Optional[Sequence[str]]) -> None:
    """PEFT's trainability: LoRA weights, then biases by mode, then the modules to save; all else frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = lora_layers(model)
    for layer in layers.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    for experts in expert_layers(model).values():
        experts.lora.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for layer in layers.values():
            if layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)
    for name, module in model.named_modules():
        if matches_to_save(modules_to_save, name):
            for p in module.parameters():
                p.requires_grad_(True)


def record_config(model: nn.Module, bias: str, modules_to_save: Optional[Sequence[str]]) -> None:
    """Keep what save_adapter must write; modules to save accumulate over several inject calls."""
    saved = list(getattr(model, CONFIG_ATTR, {}).get("modules_to_save") or [])
    saved += [m for m in modules_to_save or [] if m not in saved]
    setattr(model, CONFIG_ATTR, {"bias": bias, "modules_to_save": saved or None})


def inject(model: nn.Module, target_modules: Optional[Targets] = None, r: int = 8, lora_alpha: float = 8,
           lora_dropout: float = 0.0, bias: str = "none", use_rslora: bool = False,
           modules_to_save: Optional[Sequence[str]] = None, init_lora_weights: Union[bool, str] = True,
           rank_pattern: Optional[Dict[str, int]] = None,
           alpha_pattern: Optional[Dict[str, float]] = None, use_dora: bool = False,
           target_parameters: Optional[Sequence[str]] = None) -> nn.Module:
    """Replace the matching nn.Linear modules of `model` by LoRALinear, in place, and return the model.
    use_dora=True makes them DoRA layers (LoRALinear's use_dora).

    target_modules: a list of names (matched exactly or as a dotted suffix), a regex string (matched
    against the whole module name) or "all-linear" (every nn.Linear but the output head).
    target_parameters: MoE expert parameters (PEFT's option of that name: "mlp.experts.gate_up_proj",
    ...); their experts modules become LoRAExperts (fusedlora/modules/experts.py), dropout included.
    rank_pattern / alpha_pattern: {name pattern: r or alpha} overriding r / lora_alpha per module (per
    "<module>.<parameter>" for expert parameters), with PEFT's matching. Everything is checked before the
    model changes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject: model must be a torch.nn.Module, got {type(model).__name__}")
    check_bias(bias)
    check_init_lora_weights(init_lora_weights)
    modules_to_save = check_modules_to_save(model, modules_to_save)
    if target_modules is None and target_parameters is None:
        raise TypeError("inject needs target_modules, target_parameters or both")
    if use_dora and target_parameters is not None:
        raise ValueError("inject: DoRA (use_dora=True) on expert parameters (target_parameters) is not supported")
    targets = [] if target_modules is None else find_targets(model, target_modules, modules_to_save)
    experts_plan = {} if target_parameters is None else plan_experts(
        model, target_parameters, r, lora_alpha, lora_dropout, use_rslora, rank_pattern, alpha_pattern,
        skip=lambda name: inside_to_save(modules_to_save, name))
    plan = {}
    for name in targets:
        layer_r = pattern_value(rank_pattern or {}, name, r)
        layer_alpha = pattern_value(alpha_pattern or {}, name, lora_alpha)
        try:
            check_lora_options(layer_r, layer_alpha, lora_dropout, use_rslora)
        except (TypeError, ValueError) as e:
            raise type(e)(f"inject, module {name}: {e}") from None
        plan[name] = layer_r, layer_alpha
    for name, (layer_r, layer_alpha) in plan.items():
        replace_module(model, name, LoRALinear(model.get_submodule(name), layer_r, layer_alpha, lora_dropout,
                                               use_rslora, init_lora_weights, use_dora))
    for name, (params, ranks, alphas) in experts_plan.items():
        replace_module(model, name, LoRAExperts(model.get_submodule(name), params, ranks, alphas, lora_dropout,
                                                use_rslora, init_lora_weights))
    set_trainable(model, bias, modules_to_save)
    record_config(model, bias, modules_to_save)
    return model


def trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts; a parameter shared by several modules counts once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints the counts in PEFT's format."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
