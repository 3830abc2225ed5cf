"""AdapterPool: many PEFT LoRA adapters over one base model, served in one batch.

The pool turns the model's target nn.Linear layers into MultiLoRALinear layers whose adapters live in
buffers allocated once: lora_A (L, R, K), lora_B (L, N, R), scalings (L,) and ranks (L,) per layer.
Loading an adapter copies it into a free slot (zero-padded past its rank); nothing is reallocated, so
buffer addresses stay fixed (CUDA graphs captured over the model stay valid). Within
`with pool.use(names):` every forward of the model serves row b of the batch with adapter names[b]
through fusedlora.multi_lora_linear.

Every layer of a forward sees the same ids: the pool hands them out as one fusedlora.AdapterBatch per
layer-input shape (B, ...) within a `use` block, so they are checked, flattened and (for batches
above the decode size) grouped by adapter once per shape, not once per layer.

Threads: load, unload and use take one lock only to change or read the name -> slot table and the
in-use counts. A load fills a slot no name points to yet, waits for the device to finish the copies,
then publishes the name; an unload waits until no `use` of that name is open and the device has
finished the work already queued, then frees the slot. The batch's ids (and its AdapterBatch objects)
live in thread-local state, so threads serving different batches through one model do not see each
other's.
"""
import contextlib
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from fusedlora.core.adapter_batch import AdapterBatch
from fusedlora.peft.adapter_io import WEIGHTS_NAME, AdapterFileError, read_with_experts
from fusedlora.peft.experts_io import resolve_experts
from fusedlora.modules.inject import find_targets, replace_module
from fusedlora.multi import multi_lora_linear
from fusedlora.serving import experts as pooled

BASE = "__base__"
# Input shapes whose AdapterBatch a `use` block keeps at once.
_BATCH_SHAPES = 8


class MultiLoRALinear(nn.Module):
    """A frozen nn.Linear plus `max_adapters` adapter slots of rank up to `max_rank`."""

    def __init__(self, base_layer: nn.Linear, max_adapters: int, max_rank: int, ids_source, dtype=None):
        super().__init__()
        self.base_layer = base_layer
        N, K = base_layer.weight.shape
        kw = dict(device=base_layer.weight.device)
        dtype = dtype or base_layer.weight.dtype
        self.register_buffer("lora_A", torch.zeros(max_adapters, max_rank, K, dtype=dtype, **kw))
        self.register_buffer("lora_B", torch.zeros(max_adapters, N, max_rank, dtype=dtype, **kw))
        self.register_buffer("scalings", torch.zeros(max_adapters, dtype=torch.float32, **kw))
        self.register_buffer("ranks", torch.zeros(max_adapters, dtype=torch.int32, **kw))
        self._ids_source = ids_source

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
        return multi_lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                                 self.scalings, batch, self.ranks)

    def extra_repr(self) -> str:
        L, R, K = self.lora_A.shape
        return f"in_features={K}, out_features={self.lora_B.shape[1]}, slots={L}, max_rank={R}"


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class AdapterPool:
    """`AdapterPool(model, max_adapters, max_rank, target_modules="all-linear", dtype=None, target_parameters=None)`.

    Replaces the model's target nn.Linear layers (PEFT's matching rules; "all-linear" leaves out the
    output head) in place with MultiLoRALinear layers, and the experts modules whose expert parameters
    target_parameters selects (PEFT's option; fusedlora/serving/experts.py) with PooledExperts
    (target_modules=None: those alone). dtype is that of the adapter buffers (default: each base layer's);
    PEFT keeps adapters in float32, which a float32 buffer reproduces exactly.
    """

    def __init__(self, model: nn.Module, max_adapters: int, max_rank: int, target_modules="all-linear",
                 dtype: Optional[torch.dtype] = None, target_parameters: Optional[Sequence[str]] = None):
        self.max_adapters = _check_count("max_adapters", max_adapters)
        self.max_rank = _check_count("max_rank", max_rank)
        taken = [name for name, m in model.named_modules() if isinstance(m, (MultiLoRALinear, pooled.PooledExperts))]
        if taken:
            raise ValueError(f"the model already has adapter-pool layers ({', '.join(taken[:3])}, ...): one pool "
                             "per model")
        targets = [] if target_modules is None and target_parameters else find_targets(model, target_modules)
        # Build every layer before replacing any: an allocation failure leaves the model as it was.
        self.layers: Dict[str, MultiLoRALinear] = {
            name: MultiLoRALinear(model.get_submodule(name), max_adapters, max_rank, self._ids_for, dtype)
            for name in targets}
        self.experts = pooled.pooled_experts(model, target_parameters, max_adapters, max_rank, self._batch_ids, dtype)
        for name, layer in {**self.layers, **self.experts}.items():
            replace_module(model, name, layer)
        self.model = model
        self._device = next(next(iter({**self.layers, **self.experts}.values())).buffers()).device
        self._lock = threading.Condition()
        self._slots: Dict[str, int] = {}
        self._loading: set = set()
        self._free: List[int] = list(range(max_adapters - 1, -1, -1))
        self._in_use: Dict[str, int] = {}
        self._local = threading.local()

    @property
    def names(self) -> List[str]:
        """Loaded adapter names, in load order."""
        with self._lock:
            return list(self._slots)

    def load(self, name: str, directory) -> None:
        """Load the PEFT LoRA adapter in `directory` (adapter_config.json + adapter_model.safetensors) into a
        free slot as `name`. Any error leaves the pool as it was."""
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"adapter name must be a non-empty string other than {BASE!r}, got {name!r}")
        adapter, experts = read_with_experts(directory)
        if adapter.config.get("use_dora"):
            raise AdapterFileError(f"{directory}: use_dora = True: the multi-adapter kernels serve plain LoRA "
                                   "adapters, not DoRA")
        experts = resolve_experts(self.model, experts, adapter.config, Path(directory) / WEIGHTS_NAME)
        self._check_fits(adapter, directory)
        pooled.check_fits(self.experts, experts, self.max_rank, directory, AdapterFileError)
        with self._lock:
            if name in self._slots or name in self._loading:
                raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")
            if not self._free:
                raise ValueError(f"the pool is full ({self.max_adapters} adapters: {', '.join(self._slots)}); "
                                 f"unload one before loading {name!r}")
            slot = self._free.pop()
            self._loading.add(name)
        try:
            pooled.fill(self.experts, slot, experts)
            self._fill(slot, adapter)  # waits for the device's copies
        except BaseException:
            with self._lock:
                self._loading.discard(name)
                self._free.append(slot)
            raise
        with self._lock:
            self._loading.discard(name)
            self._slots[name] = slot

    def unload(self, name: str) -> None:
        """Free the slot of `name`, once no `use` of it is open (waits for those in other threads)."""
        if name in getattr(self._local, "names", ()):
            raise RuntimeError(f"cannot unload {name!r} inside a `with pool.use(...)` block that uses it")
        with self._lock:
            if name not in self._slots:
                raise ValueError(f"no adapter named {name!r} is loaded (loaded: {list(self._slots)})")
            while self._in_use.get(name, 0):
                self._lock.wait()
            slot = self._slots.pop(name)
        self._wait_for_device()  # kernels already queued may still read the slot
        for layer in self.layers.values():
            layer.ranks[slot] = 0
            layer.scalings[slot] = 0.0
        pooled.clear(self.experts, slot)
        with self._lock:
            self._free.append(slot)

    @contextlib.contextmanager
    def use(self, adapter_names: Sequence[Optional[str]]):
        """Within the block, row b of every batch the model sees uses adapter_names[b] (None or "__base__":
        the base model alone). Works with model(...) and model.generate(...)."""
        if isinstance(adapter_names, str):
            raise TypeError("adapter_names must be a sequence with one name per batch row, not a string")
        names = list(adapter_names)
        with self._lock:
            unknown = sorted({n for n in names if n not in (None, BASE) and n not in self._slots}, key=str)
            if unknown:
                raise ValueError(f"unknown adapter names {unknown}; loaded: {list(self._slots)}")
            slots = [-1 if n in (None, BASE) else self._slots[n] for n in names]
            held = {n for n in names if n not in (None, BASE)}
            for n in held:
                self._in_use[n] = self._in_use.get(n, 0) + 1
        local = self._local
        saved = getattr(local, "ids", None), getattr(local, "names", ()), getattr(local, "batches", None)
        self._local.ids = torch.tensor(slots, dtype=torch.int64, device=self._device)
        self._local.names = set(saved[1]) | held
        self._local.batches = {}
        try:
            yield self
        finally:
            self._local.ids, self._local.names, self._local.batches = saved
            with self._lock:
                for n in held:
                    self._in_use[n] -= 1
                self._lock.notify_all()

    def _batch_ids(self) -> Optional[torch.Tensor]:
        """The (B,) adapter slot of each row of the batch being served in this thread, None outside `use`."""
        return getattr(self._local, "ids", None)

    def _ids_for(self, x: torch.Tensor) -> Optional[AdapterBatch]:
        """The AdapterBatch of the per-token adapter slots for a layer input x: (B, ..., K), or None
        outside `use`. One per input shape within a `use` block: every layer of a forward (and every
        decode step of one shape) shares it, with its grouping."""
        ids = getattr(self._local, "ids", None)
        if ids is None:
            return None
        lead = tuple(x.shape[:-1])
        batches = self._local.batches
        batch = batches.get(lead)
        if batch is None:
            if x.dim() < 2 or x.shape[0] != ids.numel():
                raise ValueError(f"pool.use was given {ids.numel()} adapter names, but a layer input has shape "
                                 f"{tuple(x.shape)}: one name per batch row (dimension 0) is needed")
            if len(batches) >= _BATCH_SHAPES:  # generate without a KV cache: one shape per step
                batches.clear()
            batch = AdapterBatch(ids.view(-1, *([1] * (x.dim() - 2))).expand(lead), self.max_adapters)
            batches[lead] = batch
        return batch

    def _check_fits(self, adapter, directory) -> None:
        for module, w in adapter.layers.items():
            layer = self.layers.get(module)
            if layer is None:
                raise AdapterFileError(f"{directory}: the adapter targets {module!r}, which is not a layer of "
                                       f"this pool (pool layers: {', '.join(self.layers)})")
            if w.r > self.max_rank:
                raise AdapterFileError(f"{directory}: {module} has rank {w.r}, above the pool's max_rank "
                                       f"{self.max_rank}")
            N, K = layer.base_layer.weight.shape
            if tuple(w.lora_A.shape) != (w.r, K) or tuple(w.lora_B.shape) != (N, w.r):
                raise AdapterFileError(f"{directory}: {module} has lora_A {tuple(w.lora_A.shape)} and lora_B "
                                       f"{tuple(w.lora_B.shape)}; the layer needs ({w.r}, {K}) and ({N}, {w.r})")
        if adapter.extra:
            raise AdapterFileError(f"{directory}: the adapter also holds {sorted(adapter.extra)} (trained biases or "
                                   "modules to save), which a pool of LoRA layers cannot serve per row")

    @torch.no_grad()
    def _fill(self, slot: int, adapter) -> None:
        for module, layer in self.layers.items():
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()
            w = adapter.layers.get(module)
            if w is not None:
                layer.lora_A[slot, :w.r].copy_(w.lora_A)
                layer.lora_B[slot, :, :w.r].copy_(w.lora_B)
            layer.scalings[slot] = w.scaling if w is not None else 0.0
            layer.ranks[slot] = w.r if w is not None else 0
        self._wait_for_device()

    def _wait_for_device(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
