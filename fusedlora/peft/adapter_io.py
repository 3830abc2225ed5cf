"""Adapters on disk in PEFT's format: read, save, load into a model.

A directory holds adapter_config.json (peft_type "LORA", r, lora_alpha, lora_dropout,
target_modules, bias, use_rslora, rank_pattern, alpha_pattern, modules_to_save, ...) and
adapter_model.safetensors with keys `base_model.model.<module>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r), `.lora_magnitude_vector` (out,) for DoRA (use_dora), plus trained biases
and modules to save under their own parameter names.
Weights are read with safetensors only: a pickled adapter_model.bin is refused, never unpickled.

read_adapter() does every check a file allows without a model and knows nothing of modules, so that
other loaders (a multi-adapter pool) can reuse it. load_adapter() then checks every key and shape
against the model and changes the model only when all of them fit.
"""
import json
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, Mapping, NamedTuple, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fusedlora.modules.inject import (CONFIG_ATTR, check_bias, check_modules_to_save, lora_layers, record_config,
                              replace_module, set_trainable)
from fusedlora.modules.lora_linear import LoRALinear, is_plain_linear
from fusedlora.modules.rules import (check_lora_options, check_targets, lora_scaling, matches_target, matches_to_save,
                             pattern_value)
from fusedlora.peft import experts_io

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# LoraConfig options (PEFT 0.21) whose adapters compute something other than x·Wᵀ + s·x·Aᵀ·Bᵀ on an
# nn.Linear, or need layers fusedlora does not build: refused when set.
UNSUPPORTED = {
    "lora_bias": "a bias on lora_B (lora_bias)",
    "fan_in_fan_out": "transposed (Conv1D) base weights (fan_in_fan_out)", "use_qalora": "QALoRA",
    "use_bdlora": "BD-LoRA", "alora_invocation_tokens": "aLoRA", "arrow_config": "Arrow",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens", "megatron_config": "Megatron parallel layers",
}


class AdapterFileError(ValueError):
    """A bad adapter directory or file; the message names the file and what is wrong with it."""


class LoRAWeights(NamedTuple):
    """One layer of an adapter: lora_A (r, in), lora_B (out, r), and for DoRA the magnitude (out,), as
    stored (dtype included)."""
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    r: int
    lora_alpha: float
    scaling: float
    magnitude: Optional[torch.Tensor] = None


class Adapter(NamedTuple):
    """What read_adapter returns: `config, layers, extra = read_adapter(directory)`.

    config: adapter_config.json as a dict. layers: {module name: LoRAWeights}, names relative to the
    model PEFT wrapped (the `base_model.model.` prefix removed). extra: {parameter name: tensor} for
    the other tensors of the file (trained biases, modules to save), which a model can load but LoRA
    layers alone cannot serve.
    """
    config: dict
    layers: Dict[str, LoRAWeights]
    extra: Dict[str, torch.Tensor]


def _fail(path, what: str):
    raise AdapterFileError(f"{path}: {what}")


def read_config(path: Path) -> dict:
    """adapter_config.json, checked: a LoRA config with options fusedlora supports."""
    if not path.is_file():
        _fail(path, f"missing (an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(path, f"not valid JSON ({e})")
    return check_config(config, path)


def check_config(config, path) -> dict:
    """A config as adapter_config.json holds it (a dict; a peft LoraConfig is turned into one), checked:
    a LoRA config with options fusedlora supports. `path` names it in errors. Returns a new dict with
    PEFT's defaults filled in."""
    if hasattr(config, "to_dict") and not isinstance(config, dict):  # peft's LoraConfig and its kin
        config = config.to_dict()
    if not isinstance(config, dict):
        _fail(path, f"must hold a JSON object, got {type(config).__name__}")
    config = dict(config)
    if config.get("peft_type") != "LORA":
        _fail(path, f"peft_type is {config.get('peft_type')!r}; only LoRA adapters (peft_type 'LORA') load")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            _fail(path, f"{key} = {config[key]!r}: {what} is not supported")
    if config.get("init_lora_weights") == "mica":
        _fail(path, "init_lora_weights = 'mica': the MiCA variant is not supported")
    try:
        config.setdefault("bias", "none")
        config.setdefault("use_rslora", False)
        config.setdefault("lora_dropout", 0.0)
        check_lora_options(config.get("r"), config.get("lora_alpha"), config["lora_dropout"], config["use_rslora"])
        check_bias(config["bias"])
        # PEFT writes target_modules [] (or None) for an adapter on expert parameters alone
        if config.get("target_modules") is not None and not (config.get("target_parameters")
                                                              and config["target_modules"] == []):
            check_targets(config["target_modules"])
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = config.get(name) or {}
            if not isinstance(pattern, dict):
                raise TypeError(f"{name} must be an object, got {type(pattern).__name__}")
            config[name] = pattern
            for key in pattern:
                try:
                    re.compile(key)
                except re.error as e:
                    raise ValueError(f"{name} key {key!r} is not a valid regex ({e})") from None
        modules_to_save = config.get("modules_to_save")
        if modules_to_save is not None and (isinstance(modules_to_save, str)
                                            or not all(isinstance(m, str) and m for m in modules_to_save)):
            raise TypeError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    except (TypeError, ValueError) as e:
        _fail(path, str(e))
    return config


def read_weights(path: Path) -> Dict[str, torch.Tensor]:
    """adapter_model.safetensors as {key: tensor}; a missing, truncated or malformed file is an error."""
    if not path.is_file():
        if (path.parent / PICKLED_WEIGHTS_NAME).is_file():
            _fail(path, f"missing; the directory has {PICKLED_WEIGHTS_NAME}, a pickle, which fusedlora never "
                        "loads (re-save the adapter with PEFT's safe_serialization=True)")
        _fail(path, "missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        _fail(path, f"not a readable safetensors file, truncated or malformed ({e})")


def split_keys(path: Path, tensors: Dict[str, torch.Tensor]):
    """({module: {"lora_A": t, "lora_B": t}}, {parameter name: t}) from the file's keys."""
    lora, extra = {}, {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            _fail(path, f"key {key!r} does not start with {PREFIX!r} (not a PEFT adapter file)")
        if not t.is_floating_point():
            _fail(path, f"{key} has dtype {t.dtype}; adapter tensors must be floating point")
        name = key[len(PREFIX):]
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] == "lora_magnitude_vector":
            lora.setdefault(".".join(parts[:-1]), {})["magnitude"] = t
            continue
        if "lora_magnitude_vector" in parts:
            _fail(path, f"{key}: a DoRA magnitude vector under a key fusedlora does not know "
                        "(<module>.lora_magnitude_vector)")
        if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
            _fail(path, f"{key}: LoRA on an embedding; only nn.Linear layers are supported")
        if len(parts) >= 3 and parts[-2] in ("lora_A", "lora_B") and parts[-1] == "weight":
            lora.setdefault(".".join(parts[:-2]), {})[parts[-2]] = t
        elif len(parts) >= 3 and parts[-2] == "lora_B" and parts[-1] == "bias":
            _fail(path, f"{key}: a bias on lora_B (lora_bias) is not supported")
        elif any(p.startswith("lora_") for p in parts):
            _fail(path, f"key {key!r} is not a LoRA key fusedlora knows (<module>.lora_A.weight / .lora_B.weight)")
        else:
            extra[name] = t
    return lora, extra


def read_adapter(directory) -> Adapter:
    """Read and check a PEFT LoRA adapter directory, without a model. Raises AdapterFileError (a
    ValueError) naming the file for anything missing, unreadable, not LoRA, DoRA or inconsistent.
    LoRA on MoE expert parameters (target_parameters) is left out of `layers`: which parameter each
    entry holds depends on the model (read_with_experts, fusedlora/peft/experts_io.py)."""
    return read_with_experts(directory)[0]


def read_with_experts(directory):
    """(read_adapter's Adapter, the expert-parameter entries set aside: {experts module: {depth: pair}})."""
    directory = Path(directory)
    if not directory.is_dir():
        _fail(directory, "not a directory")
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    config = read_config(config_path)
    return _adapter(config, read_weights(weights_path), weights_path, config_path)


def adapter_from_state_dict(state_dict, config, where: str = "the state dict") -> Adapter:
    """The Adapter that read_adapter would return for these weights and this config, from memory:
    state_dict as PEFT saves it (peft.get_peft_model_state_dict(model, adapter_name=...): keys
    `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`), config a
    peft LoraConfig (model.peft_config[adapter_name]) or its dict. The same checks as a file, with
    errors (AdapterFileError) naming `where`. The tensors are not copied."""
    return state_dict_with_experts(state_dict, config, where)[0]


def state_dict_with_experts(state_dict, config, where: str = "the state dict"):
    """(adapter_from_state_dict's Adapter, the expert-parameter entries set aside), as read_with_experts."""
    if not isinstance(state_dict, Mapping):
        _fail(where, f"must be a mapping of names to tensors (a state dict), got {type(state_dict).__name__}")
    for key, t in state_dict.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            _fail(where, f"entry {key!r} is a {type(t).__name__}; a state dict maps names to tensors")
    config = check_config(config, f"{where} (config)")
    return _adapter(config, dict(state_dict), where, f"{where} (config)")


def _adapter(config: dict, tensors: Dict[str, torch.Tensor], weights_path, config_path):
    """(the checked Adapter of a config and its weights, their expert-parameter entries); the paths name
    them in errors."""
    lora, extra = split_keys(weights_path, tensors)
    experts = experts_io.split_expert_entries(weights_path, config, lora)
    if not lora and not experts:
        _fail(weights_path, "holds no LoRA weights (no <module>.lora_A.weight keys)")
    layers = {}
    for module, pair in sorted(lora.items()):
        for half, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if half not in pair:
                _fail(weights_path, f"{PREFIX}{module}.{other}.weight has no matching {half}.weight")
        A, B = pair["lora_A"], pair["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] == 0:
            _fail(weights_path, f"{module}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} must be (r, in) "
                                "and (out, r) with one r >= 1")
        r = A.shape[0]
        config_r = pattern_value(config["rank_pattern"], module, config["r"])
        if r != config_r:
            _fail(weights_path, f"{module}: lora_A has r = {r} rows but {CONFIG_NAME} gives r = {config_r}")
        alpha = pattern_value(config["alpha_pattern"], module, config["lora_alpha"])
        try:
            check_lora_options(r, alpha, config["lora_dropout"], config["use_rslora"])
        except (TypeError, ValueError) as e:
            _fail(config_path, f"{module}: {e}")
        magnitude = pair.get("magnitude")
        if bool(config.get("use_dora")) != (magnitude is not None):
            _fail(weights_path, f"{module}: use_dora = {bool(config.get('use_dora'))} in {CONFIG_NAME}, but the "
                                f"file {'has no' if magnitude is None else 'has a'} {PREFIX}{module}.lora_magnitude_vector")
        if magnitude is not None and tuple(magnitude.shape) != (B.shape[0],):
            _fail(weights_path, f"{module}: lora_magnitude_vector {tuple(magnitude.shape)} must be (out,) = "
                                f"({B.shape[0]},) for lora_B {tuple(B.shape)}")
        layers[module] = LoRAWeights(A, B, r, alpha, lora_scaling(r, alpha, config["use_rslora"]), magnitude)
    return Adapter(config, layers, extra), experts


def _resolve_extra(model: nn.Module, name: str, to_wrap) -> Optional[torch.Tensor]:
    """The model tensor an extra key names. `<layer>.base_layer.<p>` (PEFT's name for a LoRA layer's
    own parameter) also names `<layer>.<p>` of an nn.Linear that load_adapter is about to wrap."""
    module_name, _, attr = name.rpartition(".")
    if module_name.endswith(".base_layer") and module_name[:-len(".base_layer")] in to_wrap:
        module_name = module_name[:-len(".base_layer")]
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    t = getattr(module, attr, None)
    return t if isinstance(t, torch.Tensor) else None


def _check_against_model(model: nn.Module, adapter: Adapter, weights_path: Path) -> Dict[str, nn.Linear]:
    """Every key and shape of the adapter against the model; returns the nn.Linear modules to wrap."""
    existing = lora_layers(model)
    to_wrap = {}
    for name, w in adapter.layers.items():
        where = f"{PREFIX}{name}.lora_A.weight"
        try:
            module = model.get_submodule(name)
        except AttributeError:
            _fail(weights_path, f"{where}: the model has no module {name!r}")
        if isinstance(module, LoRALinear):
            if module.use_dora != (w.magnitude is not None):
                _fail(weights_path, f"{where}: the adapter {'is' if w.magnitude is not None else 'is not'} DoRA, "
                                    f"but the model's LoRA layer {name} {'is' if module.use_dora else 'is not'}")
            if module.merged:
                _fail(weights_path, f"{where}: the model's LoRA layer {name} is merged; unmerge() it first")
            if module.r != w.r:
                _fail(weights_path, f"{where}: r = {w.r}, but the model's LoRA layer {name} has r = {module.r}")
            base = module.base_layer
        elif is_plain_linear(module):
            outer = [n for n in existing if name.startswith(n + ".")]
            if outer:
                _fail(weights_path, f"{where}: {name} lies inside the model's LoRA layer {outer[0]}")
            base = to_wrap[name] = module
        else:
            _fail(weights_path, f"{where}: the model's module {name} ({type(module).__name__}) is not an "
                                "nn.Linear that LoRA can wrap")
        want_A, want_B = (w.r, base.in_features), (base.out_features, w.r)
        if tuple(w.lora_A.shape) != want_A or tuple(w.lora_B.shape) != want_B:
            _fail(weights_path, f"{name}: lora_A {tuple(w.lora_A.shape)} and lora_B {tuple(w.lora_B.shape)} do "
                                f"not fit the model's layer (in {base.in_features}, out {base.out_features}): "
                                f"expected {want_A} and {want_B}")
    left_out = sorted(set(existing) - set(adapter.layers))
    if left_out:
        _fail(weights_path, f"has no weights for the model's LoRA layers {', '.join(left_out)}")
    for name, t in adapter.extra.items():
        target = _resolve_extra(model, name, to_wrap)
        if target is None:
            _fail(weights_path, f"{PREFIX}{name}: the model has no tensor {name!r}")
        if target.shape != t.shape:
            _fail(weights_path, f"{PREFIX}{name}: shape {tuple(t.shape)} does not fit the model's "
                                f"{tuple(target.shape)}")
    return to_wrap


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Load a PEFT LoRA adapter into `model` in place and return it.

    nn.Linear modules the adapter covers become LoRALinear (r from the weights, alpha from
    lora_alpha / alpha_pattern); LoRA layers already there get the adapter's weights and options.
    Trainability then follows the adapter's config as in inject(). Every key and shape is checked
    first: on any error the model is left exactly as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_adapter: model must be a torch.nn.Module, got {type(model).__name__}")
    adapter, experts = read_with_experts(directory)
    config, weights_path = adapter.config, Path(directory) / WEIGHTS_NAME
    try:
        modules_to_save = check_modules_to_save(model, config.get("modules_to_save"))
    except ValueError as e:
        _fail(Path(directory) / CONFIG_NAME, str(e))
    to_wrap = _check_against_model(model, adapter, weights_path)
    experts = experts_io.resolve_experts(model, experts, config, weights_path)
    experts_io.check_expert_layers(model, experts, weights_path)
    extra_targets = {name: _resolve_extra(model, name, to_wrap) for name in adapter.extra}
    dropout, rslora = config["lora_dropout"], config["use_rslora"]
    devices = sorted({m.weight.device.index for m in to_wrap.values() if m.weight.device.type == "cuda"})
    # A new layer's random init is overwritten at once; fork_rng keeps it from moving the caller's RNG.
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        for name, module in to_wrap.items():
            w = adapter.layers[name]
            replace_module(model, name, LoRALinear(module, w.r, w.lora_alpha, dropout, rslora,
                                                   use_dora=w.magnitude is not None))
        for name, w in adapter.layers.items():
            layer = model.get_submodule(name)
            layer.set_options(w.lora_alpha, dropout, rslora)
            layer.lora_A.copy_(w.lora_A)
            layer.lora_B.copy_(w.lora_B)
            if w.magnitude is not None:
                layer.lora_magnitude_vector.copy_(w.magnitude)
        for name, target in extra_targets.items():
            target.copy_(adapter.extra[name])
        experts_io.load_experts(model, experts, dropout, rslora)
    set_trainable(model, config["bias"], modules_to_save)
    record_config(model, config["bias"], modules_to_save)
    return model


def _target_modules(model: nn.Module, layers: Dict[str, LoRALinear]):
    """The layers' last name parts, PEFT-style, when those select exactly these layers; else full names."""
    short = sorted({name.rpartition(".")[2] for name in layers})
    hits = {name for name, _ in model.named_modules()
            if matches_target(short, name) and not any(name.startswith(n + ".") for n in layers)}
    return short if hits == set(layers) else sorted(layers)


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def save_adapter(model: nn.Module, directory) -> None:
    """Write the model's LoRA layers (LoRALinear, and LoRAExperts as PEFT's target_parameters) as a PEFT
    adapter (adapter_config.json and adapter_model.safetensors) that PeftModel.from_pretrained and
    load_adapter read. Ranks and alphas
    that differ between layers go to rank_pattern / alpha_pattern; lora_dropout and use_rslora must
    be one value for the whole model, as PEFT's config has one."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_adapter: model must be a torch.nn.Module, got {type(model).__name__}")
    layers = lora_layers(model)
    expert_tensors, target_parameters, expert_r, expert_alpha, expert_adapters = experts_io.expert_entries(model)
    if not layers and not expert_adapters:
        raise ValueError("save_adapter: the model has no LoRALinear layers, nor LoRAExperts (use inject or "
                         "load_adapter first)")
    every = list(layers.values()) + expert_adapters
    for option in ("lora_dropout", "use_rslora", "use_dora"):
        values = {getattr(layer, option, False) for layer in every}
        if len(values) > 1:
            raise ValueError(f"save_adapter: the LoRA layers use several {option} values {sorted(values)}; "
                             "a PEFT adapter config holds one")
    first = every[0]
    ranks = {**{name: layer.r for name, layer in layers.items()}, **expert_r}
    alphas = {**{name: layer.lora_alpha for name, layer in layers.items()}, **expert_alpha}
    r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    settings = getattr(model, CONFIG_ATTR, {})
    bias, modules_to_save = settings.get("bias", "none"), settings.get("modules_to_save")

    tensors = dict(expert_tensors)
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B
        if layer.use_dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    if bias == "all":
        tensors.update({PREFIX + n: p for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")})
    elif bias == "lora_only":
        tensors.update({f"{PREFIX}{name}.base_layer.bias": layer.base_layer.bias
                        for name, layer in layers.items() if layer.base_layer.bias is not None})
    for name, module in model.named_modules():
        if matches_to_save(modules_to_save, name):
            tensors.update({f"{PREFIX}{name}.{k}": v for k, v in module.state_dict().items()})
    # Clones: safetensors refuses tensors that share storage (tied weights) and non-contiguous ones.
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}

    dropout = first.lora_dropout
    if expert_adapters and dropout > 0:
        # PEFT refuses a config with dropout and target_parameters (its ParamWrapper raises when loading): the
        # file records 0, which changes nothing the adapter computes outside training.
        warnings.warn(f"save_adapter: lora_dropout {dropout} is written as 0.0: PEFT refuses dropout on expert "
                      "parameters (target_parameters) and could not load the file otherwise", stacklevel=2)
        dropout = 0.0
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None,
        "inference_mode": True, "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "use_rslora": first.use_rslora, "bias": bias, "target_modules": _target_modules(model, layers),
        "modules_to_save": modules_to_save, "fan_in_fan_out": False, "init_lora_weights": True,
        "use_dora": getattr(first, "use_dora", False), "lora_bias": False,
        "target_parameters": target_parameters or None,
        "rank_pattern": {name: value for name, value in ranks.items() if value != r},
        "alpha_pattern": {name: value for name, value in alphas.items() if value != alpha},
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
