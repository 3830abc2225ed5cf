"""MultiLoRALinear: a frozen nn.Linear with adapter slots, the layer an AdapterPool puts in a model.

Buffers, allocated once (their addresses never change, so CUDA graphs captured over the model stay
valid): lora_A (L, R, K), lora_B (L, N, R), scalings (L,), ranks (L,); in a pool built with dora=True
also magnitudes (L, N) and col_scale (L, N) fp32, each slot's DoRA scale g = m / ‖W + s·B·A‖_row (ones
for a plain adapter, and on a layer the adapter does not cover).

When the scales are computed: where the pool changes a slot (load, update, unload), for that slot
(fusedlora/plans/multi_dora.py: one pass over W, no N×K matrix). A write that does not go through the
pool is caught by a version check on every forward: the state the scales were computed from (the base
weight's identity, address and version counter, and the version counters of lora_A, lora_B,
scalings and magnitudes) is kept, and a forward that finds another recomputes every DoRA slot of the
layer first. In-place writes (copy_, mul_, an optimizer step, load_state_dict), a replaced weight
Parameter and writes to the buffers are all seen this way. Writes through `.data` (or any alias that
bumps no version counter) are not: call AdapterPool.refresh() after them. The check is a few attribute
reads per layer (measured in docs/serving.md); a recompute costs one pass over W. Under torch.compile
and in a CUDA graph's replays the check does not run (no host code runs): refresh() before replaying
after such a write (update() computes the scales itself).
"""
import threading
from typing import Optional, Set

import torch
from torch import nn

from fusedlora.multi import multi_lora_linear
from fusedlora.plans.multi_dora import stacked_weight_norms


class MultiLoRALinear(nn.Module):
    """A frozen nn.Linear plus `max_adapters` adapter slots of rank up to `max_rank` (DoRA slots too when
    `dora`). ids_source(x) gives the AdapterBatch of a layer input (None: the base layer alone);
    norms_lock serialises the DoRA scales' writers (a pool shares one among its layers)."""

    def __init__(self, base_layer: nn.Linear, max_adapters: int, max_rank: int, ids_source, dtype=None,
                 dora: bool = False, norms_lock: Optional[threading.Lock] = None):
        super().__init__()
        self.base_layer = base_layer
        N, K = base_layer.weight.shape
        kw = dict(device=base_layer.weight.device)
        dtype = dtype or base_layer.weight.dtype
        self.register_buffer("lora_A", torch.zeros(max_adapters, max_rank, K, dtype=dtype, **kw))
        self.register_buffer("lora_B", torch.zeros(max_adapters, N, max_rank, dtype=dtype, **kw))
        self.register_buffer("scalings", torch.zeros(max_adapters, dtype=torch.float32, **kw))
        self.register_buffer("ranks", torch.zeros(max_adapters, dtype=torch.int32, **kw))
        self.dora = dora
        if dora:
            self.register_buffer("magnitudes", torch.zeros(max_adapters, N, dtype=dtype, **kw))
            self.register_buffer("col_scale", torch.ones(max_adapters, N, dtype=torch.float32, **kw))
        self.dora_slots: Set[int] = set()
        self._ids_source = ids_source
        self._norms_lock = norms_lock or threading.Lock()
        self._seen = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x):
        batch = self._ids_source(x)  # an AdapterBatch (or ids tensor) for x.shape[:-1], None for the base
        if batch is None:
            return self.base_layer(x)
        col_scale = None
        if self.dora:
            if self.dora_slots and not torch.compiler.is_compiling() and self._state() != self._seen:
                with self._norms_lock:
                    if self._state() != self._seen:  # another thread may have recomputed them meanwhile
                        self.compute_scales()
            col_scale = self.col_scale
        return multi_lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                                 self.scalings, batch, self.ranks, col_scale=col_scale)

    def stale(self) -> bool:
        """Whether the DoRA scales were computed from other weights than the layer holds now (as far as
        version counters tell)."""
        return self.dora and self._state() != self._seen

    def _state(self):
        """What the DoRA scales depend on, read from the modules' dicts: nn.Module's attribute lookup
        made this 10 µs a call, the dicts 1 µs (measured on CPU, docs/serving.md)."""
        b = self._buffers
        w = self._modules["base_layer"]._parameters.get("weight")
        if w is None:  # a base layer whose weight is not its own parameter
            w = self.base_layer.weight
        return (id(w), w.data_ptr(), w._version, b["lora_A"]._version, b["lora_B"]._version, b["scalings"]._version,
                b["magnitudes"]._version)

    @torch.no_grad()
    def compute_scales(self, slots=None) -> None:
        """col_scale of the given DoRA slots (default: all of them) from the weights as they are now, in
        place, then remember the state they were computed from. The caller holds the norms lock."""
        if self.dora:
            slots = sorted(self.dora_slots if slots is None else set(slots) & self.dora_slots)
            if slots:
                # Slots picked by Python ints, never an index tensor: that would be a host-to-device
                # copy, which a forward being captured in a CUDA graph must not make.
                def picked(t):
                    return torch.stack([t[i] for i in slots])
                norms = stacked_weight_norms(self.base_layer.weight, picked(self.lora_A), picked(self.lora_B),
                                             picked(self.scalings))
                scales = picked(self.magnitudes).to(torch.float32) / norms
                for row, slot in enumerate(slots):
                    self.col_scale[slot].copy_(scales[row])
            self._seen = self._state()

    @torch.no_grad()
    def write_slot(self, slot: int, weights, scaling: Optional[float] = None) -> None:
        """Copy one adapter's weights for this layer into `slot` (the caller holds the norms lock and
        computes the scales afterwards). weights: (lora_A (r, K), lora_B (N, r), magnitude (N,) or None)
        or None (the adapter does not cover this layer). With `scaling` (a load) the slot is cleared
        first and takes the rank, scaling and kind of the adapter; without it (an update) only the
        entries within the rank are written, the rest is already zero."""
        A, B, m = weights if weights is not None else (None, None, None)
        if scaling is not None:
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
            self.scalings[slot] = scaling if weights is not None else 0.0
            self.ranks[slot] = A.shape[0] if weights is not None else 0
            self.clear_dora(slot)
        if weights is None:
            return
        r = A.shape[0]
        self.lora_A[slot, :r].copy_(A)
        self.lora_B[slot, :, :r].copy_(B)
        if m is not None:
            self.magnitudes[slot].copy_(m)
            self.dora_slots.add(slot)

    def clear_dora(self, slot: int) -> None:
        """The slot holds no DoRA adapter on this layer: a scale of one."""
        self.dora_slots.discard(slot)
        if self.dora:
            self.col_scale[slot] = 1.0
            self.magnitudes[slot] = 0.0

    def extra_repr(self) -> str:
        L, R, K = self.lora_A.shape
        return (f"in_features={K}, out_features={self.lora_B.shape[1]}, slots={L}, max_rank={R}"
                + (", dora=True" if self.dora else ""))
