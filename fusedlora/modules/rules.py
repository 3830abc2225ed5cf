"""PEFT's LoRA rules as pure functions: which modules an adapter touches, its scaling, its options.

Kept apart from the module code so that the adapter reader (adapter_io.read_adapter), inject() and
LoRALinear apply the same rules PEFT 0.21 applies (peft/tuners/tuners_utils.py check_target_module_exists,
peft/utils/other.py get_pattern_key and _set_trainable):
- target_modules, a string: a regex that must match the whole module name;
- target_modules, a list: a name matches when it equals an entry or ends with "." + entry;
- "all-linear": every linear layer but the output head (resolved by inject, which sees the model);
- modules_to_save: a name matches when it ends with an entry (plain string suffix), and LoRA never
  targets a module to save or anything inside one;
- rank_pattern / alpha_pattern: the first key k for which `(.*\\.)?(k)$` matches the name wins;
- scaling = lora_alpha / r, or lora_alpha / √r with rank-stabilised LoRA (use_rslora).
"""
import math
import re
from typing import Iterable, Mapping, Optional, Sequence, Union

from torch import nn

from fusedlora.core.checks import require_scalar

ALL_LINEAR = "all-linear"

Targets = Union[str, Sequence[str]]


def check_targets(target_modules) -> None:
    """A regex string or a non-empty list of names; TypeError/ValueError otherwise."""
    if isinstance(target_modules, str):
        if target_modules.lower() != ALL_LINEAR:
            try:
                re.compile(target_modules)
            except re.error as e:
                raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {e}") from None
        return
    if isinstance(target_modules, (list, tuple, set, frozenset)) and target_modules:
        for t in target_modules:
            if not isinstance(t, str) or not t:
                raise TypeError(f"target_modules entries must be non-empty strings, got {t!r}")
        return
    raise TypeError("target_modules must be a regex string, 'all-linear' or a non-empty list of module names, "
                    f"got {target_modules!r}")


def matches_target(target_modules: Targets, name: str) -> bool:
    """Whether module `name` is a LoRA target under PEFT's rules ("all-linear" is resolved elsewhere)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def matches_to_save(modules_to_save: Optional[Iterable[str]], name: str) -> bool:
    """Whether module `name` is one of the modules to save (trained in full and saved with the adapter)."""
    return bool(modules_to_save) and any(name.endswith(m) for m in modules_to_save)


def inside_to_save(modules_to_save: Optional[Iterable[str]], name: str) -> bool:
    """Whether `name` is a module to save or lies inside one: LoRA must leave it alone."""
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def pattern_value(pattern: Mapping[str, object], name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the first matching key, else default."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def check_lora_options(r, lora_alpha, lora_dropout, use_rslora) -> None:
    """The hyper-parameters of one LoRA layer: r a positive int, lora_alpha a finite number,
    lora_dropout in [0, 1), use_rslora a bool."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    require_scalar("lora_alpha", lora_alpha)
    require_scalar("lora_dropout", lora_dropout, low=0.0, high=1.0)
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")


def check_init_lora_weights(init_lora_weights) -> None:
    """The initialisations LoRALinear implements, by PEFT's names."""
    if not (isinstance(init_lora_weights, bool) or init_lora_weights == "gaussian"):
        raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")


def set_lora_options(module, lora_alpha: float, lora_dropout: float, use_rslora: bool) -> None:
    """Checks and sets a LoRA module's alpha, dropout, rslora and the scaling they make (r is fixed by
    its shapes): LoRALinear's and LoRAExperts' set_options."""
    check_lora_options(module.r, lora_alpha, lora_dropout, use_rslora)
    module.lora_alpha, module.lora_dropout, module.use_rslora = lora_alpha, float(lora_dropout), use_rslora
    module.scaling = lora_scaling(module.r, lora_alpha, use_rslora)


def init_lora_factors(lora_A, lora_B, r: int, init_lora_weights: Union[bool, str]) -> None:
    """PEFT's initialisation of the two factors (under no_grad): A Kaiming-uniform, or normal with
    std 1/r for "gaussian"; B zero, so the update starts at zero, or Kaiming-uniform for False."""
    if init_lora_weights == "gaussian":
        nn.init.normal_(lora_A, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    if init_lora_weights is False:
        nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
    else:
        nn.init.zeros_(lora_B)
