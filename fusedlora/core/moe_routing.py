"""ExpertRouting: one MoE layer call's (token, expert) pairs, checked once and grouped by expert once.

A Mixture-of-Experts layer sends token t to k experts (top_k_index: (T, k)). Each of the P = T·k
(token, expert) pairs runs the expert's projections: gate_up on x[t], then the activation, then down.
Both projections, forward and backward, need the same grouping of the pairs by expert, so it is made
once per layer call (a stable sort on the device, no host sync) and shared, as AdapterBatch shares a
multi-adapter batch's grouping.

Pairs are numbered in routing order: pair p = t·k + j is token t's j-th expert. Sorted order groups
them by expert and, within an expert, by adapter (mixed-adapter batches: each token may carry its own
adapter id, or -1 for the base alone); it is stable, so within one (expert, adapter) segment pairs keep
routing order. Segment c = e·(L + 1) + (a + 1) holds the pairs of expert e with adapter a, a in [-1, L);
without adapter ids every pair has adapter 0 (L = 1), so segment 2e + 1 holds expert e's pairs and
segment 2e is empty.

    order      (P,) int64   the pair at each sorted position
    rows       (P,) int64   its token (order // k): the row of x that gate_up reads there
    keys       (P,) int32   its segment c, in sorted order (nondecreasing)
    seg_starts (C + 1,) int32, C = E·(L + 1): segment c is sorted positions [seg_starts[c], seg_starts[c + 1])
    inverse    (P,) int64   the sorted position of each pair (inverse[order] = arange(P))

Expert e's pairs, whatever their adapter, are positions [seg_starts[e·(L + 1)], seg_starts[(e + 1)·(L + 1)]).
A dropout mask is indexed by pair (routing order), not by sorted position, so it does not depend on the
grouping: element (p, k) of the (P, K) input of a projection.
"""
from typing import Optional

import torch

from fusedlora.core import knobs
from fusedlora.core.checks import INT_DTYPES, describe, require_tensor


def _values_checked(t: torch.Tensor) -> bool:
    # As AdapterBatch's ids: reading values back from a GPU stalls the stream and breaks CUDA-graph
    # capture (opt-in there with FUSEDLORA_DEBUG=1); under torch.compile a value branch breaks the graph.
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or knobs.debug()


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class ExpertRouting:
    """`ExpertRouting(top_k_index, num_experts, adapter_ids=None, num_adapters=1)`.

    top_k_index: (T, k) integer, each in [0, num_experts); adapter_ids: None (every pair uses adapter 0),
    or (T,) integer in [-1, num_adapters), -1 for the base alone. Values are checked here, once, on CPU
    (on CUDA with FUSEDLORA_DEBUG=1). Immutable; build a new one per layer call (the router's choice
    changes from layer to layer)."""

    __slots__ = ("top_k_index", "adapter_ids", "num_experts", "num_adapters", "T", "k", "P", "order", "rows", "keys",
                 "seg_starts", "inverse", "spec")

    def __init__(self, top_k_index: torch.Tensor, num_experts: int, adapter_ids: Optional[torch.Tensor] = None,
                 num_adapters: int = 1):
        require_tensor("top_k_index", top_k_index)
        if top_k_index.dtype not in INT_DTYPES or top_k_index.dim() != 2:
            raise TypeError(f"{describe('top_k_index', top_k_index)} must be a (T, k) integer tensor")
        E, L = _check_count("num_experts", num_experts), _check_count("num_adapters", num_adapters)
        T, k = top_k_index.shape
        device = top_k_index.device
        if adapter_ids is not None:
            require_tensor("adapter_ids", adapter_ids)
            if adapter_ids.dtype not in INT_DTYPES or tuple(adapter_ids.shape) != (T,):
                raise TypeError(f"{describe('adapter_ids', adapter_ids)} must be a ({T},) integer tensor, one id "
                                f"per token of {describe('top_k_index', top_k_index)}")
            if adapter_ids.device != device:
                raise ValueError(f"{describe('adapter_ids', adapter_ids)} must be on {device}, as top_k_index")
        if _values_checked(top_k_index) and top_k_index.numel():
            if top_k_index.min() < 0 or top_k_index.max() >= E:
                bad = top_k_index[(top_k_index < 0) | (top_k_index >= E)][0].item()
                raise ValueError(f"{describe('top_k_index', top_k_index)} holds expert {bad}, outside "
                                 f"[0, num_experts) = [0, {E})")
        if adapter_ids is not None and _values_checked(adapter_ids) and adapter_ids.numel():
            if adapter_ids.min() < -1 or adapter_ids.max() >= L:
                bad = adapter_ids[(adapter_ids < -1) | (adapter_ids >= L)][0].item()
                raise ValueError(f"{describe('adapter_ids', adapter_ids)} holds {bad}, outside [-1, num_adapters) "
                                 f"= [-1, {L})")
        self.top_k_index, self.adapter_ids = top_k_index, adapter_ids
        self.num_experts, self.num_adapters, self.T, self.k, self.P = E, L, T, k, T * k
        experts = top_k_index.reshape(-1).to(torch.int32)
        if adapter_ids is None:
            keys = experts * (L + 1) + 1
        else:
            keys = experts * (L + 1) + (adapter_ids.to(torch.int32) + 1).repeat_interleave(k)
        sorted_keys, order = torch.sort(keys, stable=True)
        bounds = torch.arange(E * (L + 1) + 1, dtype=torch.int32, device=device)
        self._grouped(order, sorted_keys, torch.searchsorted(sorted_keys, bounds, out_int32=True))

    def _grouped(self, order, keys, seg_starts):
        self.keys, self.order, self.seg_starts = keys, order, seg_starts
        self.rows = torch.div(order, self.k, rounding_mode="floor")
        self.inverse = torch.empty_like(order).scatter_(0, order, torch.arange(self.P, device=order.device))
        # What the kernels read of the routing, for a call's key (fusedlora/core/specialization.py): its
        # sizes, whether tokens carry adapter ids, the device (its tensors' dtypes are fixed here).
        self.spec = (self.T, self.k, self.num_experts, self.num_adapters, self.adapter_ids is not None, order.device)

    @classmethod
    def from_grouping(cls, top_k_index, num_experts: int, adapter_ids, num_adapters: int, order, keys,
                      seg_starts) -> "ExpertRouting":
        """A routing whose grouping was made by another ExpertRouting of these ids (a torch.compile op
        receives the tensors, not the object): nothing is checked or sorted again."""
        routing = cls.__new__(cls)
        routing.top_k_index, routing.adapter_ids = top_k_index, adapter_ids
        routing.num_experts, routing.num_adapters = num_experts, num_adapters
        routing.T, routing.k = top_k_index.shape
        routing.P = routing.T * routing.k
        routing._grouped(order, keys, seg_starts)
        return routing

    @property
    def num_segments(self) -> int:
        """C = E·(L + 1)."""
        return self.num_experts * (self.num_adapters + 1)

    def expert_offsets(self) -> torch.Tensor:
        """(E,) int32: the sorted position where each expert's pairs end (torch's grouped_mm `offs`)."""
        return self.seg_starts[self.num_adapters + 1::self.num_adapters + 1]

    def combine(self, y_sorted: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """out[t] = Σ_j top_k_weights[t, j]·y[pair t·k + j] -> (T, N) in y's dtype, from y_sorted: (P, N) in
        sorted order; summed over k in fp32 at least (differentiable in both)."""
        N = y_sorted.shape[-1]
        y = y_sorted.index_select(0, self.inverse).view(self.T, self.k, N)
        wide = torch.promote_types(y_sorted.dtype, torch.float32)
        out = (y.to(wide) * top_k_weights.to(wide).unsqueeze(-1)).sum(1)
        return out.to(y_sorted.dtype)

    def __repr__(self) -> str:
        return (f"ExpertRouting({self.T} tokens, top-{self.k} of {self.num_experts} experts, "
                f"{self.num_adapters} adapter{'s' if self.num_adapters > 1 else ''}, {self.top_k_index.device})")
