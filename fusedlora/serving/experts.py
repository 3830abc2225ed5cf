"""AdapterPool's MoE layers: an experts module with adapter slots on its expert parameters.

PooledExperts holds, per targeted expert parameter of E experts, lora_A (L, E, R, K) and lora_B
(L, E, N, R) buffers, scalings (L,) and ranks (L,) (an adapter that leaves a parameter alone has rank 0
there), allocated once; AdapterPool loads PEFT adapters with target_parameters into a slot. Inside
`pool.use(names)` each token is served with its sequence's adapter on every expert it is routed to:
the experts see the batch flattened (B·S tokens), so the batch's per-row slots repeat S times, and
fusedlora.modules.experts.experts_forward groups the (token, expert) pairs by (expert, adapter).
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from fusedlora.modules.experts import ExpertLoRA, expert_weight, experts_forward, experts_reason, projections, \
    targeted_parameters


class PooledExperts(nn.Module):
    """A frozen transformers experts module plus `max_adapters` slots of rank up to `max_rank` on its
    parameters `parameter_names`. batch_ids() returns the (B,) slot of each row of the batch being served
    (-1: the base alone), or None outside a `use` block."""

    def __init__(self, base_layer: nn.Module, parameter_names: Sequence[str], max_adapters: int, max_rank: int,
                 batch_ids, dtype=None):
        super().__init__()
        reason = experts_reason(base_layer)
        if reason is not None:
            raise TypeError(f"an adapter pool cannot serve {type(base_layer).__name__}: {reason}")
        self.base_layer = base_layer
        self.parameter_names: List[str] = list(parameter_names)
        for p in self.parameter_names:
            w, _ = expert_weight(base_layer, p)
            E, N, K = w.shape
            kw = dict(device=w.device)
            adapter_dtype = dtype or w.dtype
            self.register_buffer(f"{p}_lora_A", torch.zeros(max_adapters, E, max_rank, K, dtype=adapter_dtype, **kw))
            self.register_buffer(f"{p}_lora_B", torch.zeros(max_adapters, E, N, max_rank, dtype=adapter_dtype, **kw))
            self.register_buffer(f"{p}_scalings", torch.zeros(max_adapters, dtype=torch.float32, **kw))
            self.register_buffer(f"{p}_ranks", torch.zeros(max_adapters, dtype=torch.int32, **kw))
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self._batch_ids = batch_ids

    def slots(self, p: str):
        """(lora_A, lora_B, scalings, ranks) of parameter p."""
        return tuple(getattr(self, f"{p}_{part}") for part in ("lora_A", "lora_B", "scalings", "ranks"))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        rows = self._batch_ids()
        if rows is None:
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        T, B = hidden_states.shape[0], rows.numel()
        if T % B:
            raise ValueError(f"pool.use was given {B} adapter names, but an experts module got {T} tokens: one name "
                             "per sequence, every sequence the same length")
        terms = {}
        for p in self.parameter_names:
            A, Bs, scalings, ranks = self.slots(p)
            terms[p] = ExpertLoRA(A, Bs, scalings.to(A.dtype), ranks)
        return experts_forward(self.base_layer, hidden_states, top_k_index, top_k_weights, terms,
                               adapter_ids=rows.repeat_interleave(T // B), num_adapters=self.max_adapters)

    def extra_repr(self) -> str:
        return f"parameters={self.parameter_names}, slots={self.max_adapters}, max_rank={self.max_rank}"


def pooled_experts(model: nn.Module, target_parameters: Optional[Sequence[str]], max_adapters: int, max_rank: int,
                   batch_ids, dtype=None) -> Dict[str, PooledExperts]:
    """{module name: PooledExperts} for the experts modules target_parameters selects (PEFT's rule), built,
    not yet in the model."""
    if target_parameters is None:
        return {}
    if isinstance(target_parameters, str) or not target_parameters:
        raise TypeError(f"target_parameters must be a non-empty list of parameter names, got {target_parameters!r}")
    layers = {}
    for name, module in model.named_modules():
        params = targeted_parameters(name, module, target_parameters) if name else []
        if not params:
            continue
        others = [p for p in params if experts_reason(module) is None and p not in projections(module)]
        if others:
            raise ValueError(f"target_parameters selects {others} of {name}: only expert projections take LoRA")
        layers[name] = PooledExperts(module, params, max_adapters, max_rank, batch_ids, dtype)
    if not layers:
        raise ValueError(f"target_parameters {list(target_parameters)} matches no expert parameter of the model")
    return layers


def check_fits(layers: Dict[str, PooledExperts], resolved, max_rank: int, directory, error: type) -> None:
    """Every expert parameter of the adapter (experts_io.resolve_experts' result) has a pool layer and a
    rank the slots hold; raises `error` (the pool's AdapterFileError) naming the directory otherwise."""
    for name, params in resolved.items():
        layer = layers.get(name)
        if layer is None:
            raise error(f"{directory}: the adapter has LoRA on the expert parameters of {name!r}, which the pool does not "
                  f"hold (pool expert layers: {', '.join(layers) or 'none'})")
        for p, w in params.items():
            if p not in layer.parameter_names:
                raise error(f"{directory}: the adapter targets {name}.{p}, which the pool does not hold")
            if w.r > max_rank:
                raise error(f"{directory}: {name}.{p} has rank {w.r}, above the pool's max_rank {max_rank}")


@torch.no_grad()
def fill(layers: Dict[str, PooledExperts], slot: int, resolved) -> None:
    """Write the adapter's expert weights (PEFT's layout, read through views) into `slot`; zero elsewhere."""
    for name, layer in layers.items():
        params = resolved.get(name, {})
        for p in layer.parameter_names:
            A, B, scalings, ranks = layer.slots(p)
            A[slot].zero_()
            B[slot].zero_()
            w = params.get(p)
            if w is not None:
                E = A.shape[1]
                A[slot, :, :w.r].copy_(w.lora_A.view(E, w.r, -1))
                B[slot, :, :, :w.r].copy_(w.lora_B.view(-1, w.r, E).permute(2, 0, 1))
            scalings[slot] = w.scaling if w is not None else 0.0
            ranks[slot] = w.r if w is not None else 0


@torch.no_grad()
def clear(layers: Dict[str, PooledExperts], slot: int) -> None:
    for layer in layers.values():
        for p in layer.parameter_names:
            _, _, scalings, ranks = layer.slots(p)
            ranks[slot] = 0
            scalings[slot] = 0.0
