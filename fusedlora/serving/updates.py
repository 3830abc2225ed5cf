"""The weights of an AdapterPool.update, read and checked before anything is written.

Two forms: a state dict as peft.get_peft_model_state_dict returns it (the keys of an adapter file:
`base_model.model.<layer>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`), or one entry per
layer, {layer: {"lora_A": (r, K), "lora_B": (N, r), "magnitude": (N,)}}. Either must cover exactly the
layers the adapter was loaded with, at the ranks it was loaded with, with a magnitude exactly where it
is DoRA, in a floating-point dtype the buffers take (copies convert it, as a file load does). An
adapter with LoRA on expert parameters (target_parameters) is updated through the state dict form only:
its expert entries are PEFT's ParamWrapper keys, read with the config the adapter was loaded with.
"""
from typing import Dict, Mapping, Optional, Tuple

import torch

from fusedlora.peft.adapter_io import PREFIX, AdapterFileError, split_keys
from fusedlora.peft.experts_io import split_expert_entries

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PARTS = ("lora_A", "lora_B", "magnitude")


def _fail(where: str, what: str):
    raise AdapterFileError(f"{where}: {what}")


def split_update(weights, config: dict, where: str) -> Tuple[Dict[str, dict], Dict[str, Dict[int, dict]]]:
    """(the Linear layers' entries {layer: {"lora_A", "lora_B", ("magnitude")}}, the expert parameters'
    entries {experts module: {depth: {"lora_A", "lora_B"}}}) of an update, for an adapter loaded with
    `config`; only the state dict form has expert entries."""
    layers = _per_layer(weights, where)
    keyed = all(isinstance(k, str) and k.startswith(PREFIX) for k in weights)
    return layers, split_expert_entries(where, config, layers) if keyed else {}


def check_experts(resolved, loaded: Dict[str, Dict[str, int]], where: str) -> None:
    """The update's expert parameters (experts_io.resolve_experts' result, its ranks checked against the
    config) are exactly those the adapter was loaded with, {experts module: {parameter: rank}}."""
    have = {f"{m}.{p}" for m, params in resolved.items() for p in params}
    want = {f"{m}.{p}" for m, params in loaded.items() for p in params}
    if have - want:
        _fail(where, f"has weights for the expert parameters {sorted(have - want)}, which the adapter was not "
                     f"loaded with (its expert parameters: {sorted(want)})")
    if want - have:
        _fail(where, f"has no weights for the expert parameters {sorted(want - have)}: an update gives every "
                     "layer of the adapter, expert parameters in a state dict as peft.get_peft_model_state_dict "
                     "returns it")


def _per_layer(weights, where: str) -> Dict[str, dict]:
    """{layer: {"lora_A": t, "lora_B": t, ("magnitude": t)}} from either form."""
    if not isinstance(weights, Mapping) or not weights:
        _fail(where, f"must be a non-empty state dict or {{layer: {{'lora_A', 'lora_B', 'magnitude'}}}}, "
                     f"got {type(weights).__name__}")
    if all(isinstance(k, str) and k.startswith(PREFIX) for k in weights):
        for key, t in weights.items():
            if not isinstance(t, torch.Tensor):
                _fail(where, f"{key} is a {type(t).__name__}, not a tensor")
        lora, extra = split_keys(where, dict(weights))
        if extra:
            _fail(where, f"holds {sorted(extra)}, which are not LoRA weights (trained biases or modules to save "
                         "cannot be updated in a pool)")
        return lora
    layers = {}
    for layer, parts in weights.items():
        if not isinstance(layer, str) or not isinstance(parts, Mapping):
            _fail(where, f"entry {layer!r}: expected a layer name and a dict of 'lora_A', 'lora_B' (and 'magnitude' "
                         f"for DoRA), or a state dict whose keys all start with {PREFIX!r}")
        unknown = sorted(set(parts) - set(_PARTS), key=str)
        if unknown:
            _fail(where, f"{layer}: unknown entries {unknown} (expected {', '.join(_PARTS)})")
        layers[layer] = dict(parts)
    return layers


def _tensor(where: str, layer: str, part: str, t, shape: Tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        _fail(where, f"{layer}.{part} is a {type(t).__name__}, not a tensor")
    if t.dtype not in FLOATS:
        _fail(where, f"{layer}.{part} has dtype {t.dtype}; adapter weights must be float16, bfloat16, float32 or "
                     "float64")
    if tuple(t.shape) != shape:
        _fail(where, f"{layer}.{part} has shape {tuple(t.shape)}, but the loaded adapter needs {shape} there "
                     "(an update keeps the ranks and layers the adapter was loaded with)")
    return t


def layer_weights(layers: Dict[str, dict], loaded: Dict[str, Tuple[int, bool]], shapes: Dict[str, Tuple[int, int]],
                  where: str) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """{layer: (lora_A, lora_B, magnitude or None)} from split_update's Linear entries, checked against the
    adapter as loaded: loaded {layer: (rank, DoRA)}, shapes {layer: (N, K)} of the pool's base weights.
    Raises AdapterFileError naming `where`, the layer and the tensor."""
    missing, extra = sorted(set(loaded) - set(layers)), sorted(set(layers) - set(loaded))
    if extra:
        _fail(where, f"has weights for {extra}, which the adapter was not loaded with (it covers "
                     f"{sorted(loaded)})")
    if missing:
        _fail(where, f"has no weights for {missing}: an update gives every layer of the adapter")
    out = {}
    for layer, (r, dora) in loaded.items():
        parts = layers[layer]
        N, K = shapes[layer]
        for part in ("lora_A", "lora_B"):
            if part not in parts:
                _fail(where, f"{layer} has no {part}")
        A = _tensor(where, layer, "lora_A", parts["lora_A"], (r, K))
        B = _tensor(where, layer, "lora_B", parts["lora_B"], (N, r))
        m = parts.get("magnitude")
        if dora != (m is not None):
            _fail(where, f"{layer}: the adapter {'is' if dora else 'is not'} DoRA, but the update "
                         f"{'has no' if dora else 'has a'} magnitude vector")
        out[layer] = (A, B, None if m is None else _tensor(where, layer, "magnitude", m, (N,)))
    return out
