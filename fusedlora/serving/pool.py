"""AdapterPool: many PEFT LoRA (and DoRA) adapters over one base model, served in one batch.

The pool turns the model's target nn.Linear layers into MultiLoRALinear layers (serving/layer.py)
whose adapters live in buffers allocated once. Loading an adapter copies it into a free slot
(zero-padded past its rank); updating one copies new weights into its slot; nothing is reallocated,
so buffer addresses stay fixed (CUDA graphs captured over the model stay valid). Within
`with pool.use(names):` every forward of the model serves row b of the batch with adapter names[b]
through fusedlora.multi_lora_linear.

Every layer of a forward sees the same ids: the pool hands them out as one fusedlora.AdapterBatch per
layer-input shape (B, ...) within a `use` block, so they are checked, flattened and (for batches
above the decode size) grouped by adapter once per shape, not once per layer.

Threads: load, update, unload and use take one lock only to change or read the name -> slot table
and the in-use counts. A load fills a slot no name points to yet, waits for the device to finish the
copies, then publishes the name. An unload waits until no `use` of that name is open and the device
has finished the work already queued, then frees the slot. An update waits until no other thread has
a `use` block of that name open, holds new ones back meanwhile (they wait for it), then copies: every
`use` block, a whole generate() included, sees one version of an adapter. A thread may update an
adapter its own `use` block holds, between its own forwards. The batch's ids (and its AdapterBatch
objects) live in thread-local state, so threads serving different batches through one model do not
see each other's.
"""
import contextlib
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import nn

from fusedlora.core.adapter_batch import AdapterBatch
from fusedlora.modules.inject import find_targets, replace_module
from fusedlora.peft.adapter_io import WEIGHTS_NAME, AdapterFileError, read_with_experts, state_dict_with_experts
from fusedlora.peft.experts_io import resolve_experts
from fusedlora.serving import experts as pooled
from fusedlora.serving.layer import MultiLoRALinear
from fusedlora.serving.updates import check_experts, layer_weights, split_update

__all__ = ["AdapterPool", "MultiLoRALinear", "BASE"]

BASE = "__base__"
# Input shapes whose AdapterBatch a `use` block keeps at once.
_BATCH_SHAPES = 8


class _Loaded(NamedTuple):
    """A loaded adapter: its slot, per pool layer it covers (rank, DoRA or not), its checked config (an
    update's expert entries are read with it) and {experts module: {parameter: rank}}."""
    slot: int
    layers: Dict[str, tuple]
    config: dict
    experts: Dict[str, Dict[str, int]]


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class AdapterPool:
    """`AdapterPool(model, max_adapters, max_rank, target_modules="all-linear", dtype=None, dora=False,
    target_parameters=None)`.

    Replaces the model's target nn.Linear layers (PEFT's matching rules; "all-linear" leaves out the
    output head) in place with MultiLoRALinear layers, and the experts modules whose expert parameters
    target_parameters selects (PEFT's option; fusedlora/serving/experts.py) with PooledExperts
    (target_modules=None: those alone). dtype is that of the adapter buffers (default: each base layer's);
    PEFT keeps adapters in float32, which a float32 buffer reproduces exactly.
    dora=True also allocates each layer's magnitudes and DoRA scales ((L, N) each), so that DoRA
    adapters (use_dora=True) load; its layers then apply a scale per row (ones for plain adapters).
    """

    def __init__(self, model: nn.Module, max_adapters: int, max_rank: int, target_modules="all-linear",
                 dtype: Optional[torch.dtype] = None, dora: bool = False,
                 target_parameters: Optional[Sequence[str]] = None):
        self.max_adapters = _check_count("max_adapters", max_adapters)
        self.max_rank = _check_count("max_rank", max_rank)
        if not isinstance(dora, bool):
            raise TypeError(f"dora must be a bool, got {dora!r}")
        self.dora = dora
        taken = [name for name, m in model.named_modules() if isinstance(m, (MultiLoRALinear, pooled.PooledExperts))]
        if taken:
            raise ValueError(f"the model already has adapter-pool layers ({', '.join(taken[:3])}, ...): one pool "
                             "per model")
        targets = [] if target_modules is None and target_parameters else find_targets(model, target_modules)
        self._norms_lock = threading.Lock()
        # Build every layer before replacing any: an allocation failure leaves the model as it was.
        self.layers: Dict[str, MultiLoRALinear] = {
            name: MultiLoRALinear(model.get_submodule(name), max_adapters, max_rank, self._ids_for, dtype, dora,
                                  self._norms_lock)
            for name in targets}
        self.experts = pooled.pooled_experts(model, target_parameters, max_adapters, max_rank, self._batch_ids, dtype)
        for name, layer in {**self.layers, **self.experts}.items():
            replace_module(model, name, layer)
        self.model = model
        self._device = next(next(iter({**self.layers, **self.experts}.values())).buffers()).device
        self._lock = threading.Condition()
        self._loaded: Dict[str, _Loaded] = {}
        self._loading: set = set()
        self._updating: set = set()
        self._free: List[int] = list(range(max_adapters - 1, -1, -1))
        self._in_use: Dict[str, int] = {}
        self._local = threading.local()

    @property
    def names(self) -> List[str]:
        """Loaded adapter names, in load order."""
        with self._lock:
            return list(self._loaded)

    def load(self, name: str, source, config=None) -> None:
        """Load an adapter into a free slot as `name`: source is a PEFT LoRA adapter directory
        (adapter_config.json + adapter_model.safetensors), or its weights in memory, a state dict as
        peft.get_peft_model_state_dict returns it, with `config` its LoraConfig (or that config as a
        dict). Both are checked alike; any error leaves the pool as it was."""
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"adapter name must be a non-empty string other than {BASE!r}, got {name!r}")
        if isinstance(source, (str, os.PathLike)):
            if config is not None:
                raise TypeError("config goes with weights in memory; a directory holds its own adapter_config.json")
            (adapter, experts), where = read_with_experts(source), str(source)
            weights_path = Path(source) / WEIGHTS_NAME
        elif isinstance(source, Mapping):
            if config is None:
                raise TypeError(f"loading {name!r} from a state dict needs its config (a peft LoraConfig or its "
                                "dict: the ranks, alphas and target modules)")
            where = f"the state dict of {name!r}"
            adapter, experts = state_dict_with_experts(source, config, where)
            weights_path = where
        else:
            raise TypeError(f"source must be an adapter directory or a state dict, got {type(source).__name__}")
        if adapter.config.get("use_dora") and not self.dora:
            raise AdapterFileError(f"{where}: use_dora = True: a DoRA adapter needs a pool built with "
                                   "AdapterPool(..., dora=True), which holds each layer's magnitudes")
        experts = resolve_experts(self.model, experts, adapter.config, weights_path)
        self._check_fits(adapter, where)
        pooled.check_fits(self.experts, experts, self.max_rank, where, AdapterFileError)
        weights = {m: (w.lora_A, w.lora_B, w.magnitude) for m, w in adapter.layers.items()}
        with self._lock:
            if name in self._loaded or name in self._loading:
                raise ValueError(f"an adapter named {name!r} is already loaded; unload it first (or update it)")
            if not self._free:
                raise ValueError(f"the pool is full ({self.max_adapters} adapters: {', '.join(self._loaded)}); "
                                 f"unload one before loading {name!r}")
            slot = self._free.pop()
            self._loading.add(name)
        try:
            pooled.fill(self.experts, slot, experts)
            self._write(slot, weights, {m: w.scaling for m, w in adapter.layers.items()})  # waits for the device
        except BaseException:
            with self._lock:
                self._loading.discard(name)
                self._free.append(slot)
            raise
        with self._lock:
            self._loading.discard(name)
            self._loaded[name] = _Loaded(slot, {m: (w.r, w.magnitude is not None) for m, w in adapter.layers.items()},
                                         adapter.config, {m: {p: w.r for p, w in params.items()}
                                                          for m, params in experts.items()})

    def update(self, name: str, weights) -> None:
        """New weights for the loaded adapter `name`, copied into its slot in place (no buffer moves,
        ranks, alphas and target layers stay as loaded). weights: a state dict as
        peft.get_peft_model_state_dict returns it, or {layer name: {"lora_A": (r, K), "lora_B": (N, r),
        "magnitude": (N,) for DoRA}}, covering every layer the adapter covers, with the same ranks, in a
        float dtype; an adapter with expert parameters takes the state dict form. Everything is
        checked before anything is written: any error (AdapterFileError or ValueError naming the layer
        and tensor) leaves the slot as it was. Waits until no other
        thread's `use` block holds `name`, and holds new ones back until it is done; the DoRA scales
        of the slot are recomputed before it returns."""
        with self._lock:
            loaded = self._loaded.get(name)
        if loaded is None:
            raise ValueError(f"no adapter named {name!r} is loaded (loaded: {self.names})")
        where = f"the update of {name!r}"
        layers, entries = split_update(weights, loaded.config, where)
        experts = resolve_experts(self.model, entries, loaded.config, where)
        check_experts(experts, loaded.experts, where)
        parsed = layer_weights(layers, loaded.layers, self._shapes(), where)
        own = getattr(self._local, "held", Counter())[name]
        with self._lock:
            while name in self._updating:
                self._lock.wait()
            self._updating.add(name)
            try:
                while self._in_use.get(name, 0) > own:
                    self._lock.wait()
                current = self._loaded.get(name)
            except BaseException:
                self._updating.discard(name)
                self._lock.notify_all()
                raise
        try:
            if current is None or current.slot != loaded.slot:  # unloaded (and perhaps loaded again) meanwhile
                raise ValueError(f"{name!r} was unloaded while its update waited")
            self._wait_for_device()  # kernels queued before the update may still read the slot
            pooled.fill(self.experts, loaded.slot, experts)
            self._write(loaded.slot, parsed, None)
        finally:
            with self._lock:
                self._updating.discard(name)
                self._lock.notify_all()

    def refresh(self) -> None:
        """Recompute every DoRA scale of every layer from the weights as they are now. Needed only after
        a write the layers' version check cannot see (through `.data`), or before replaying a CUDA graph
        after a write to a base weight: loads and updates compute their own."""
        with self._norms_lock:
            for layer in self.layers.values():
                layer.compute_scales()
        self._wait_for_device()

    def unload(self, name: str) -> None:
        """Free the slot of `name`, once no `use` of it is open (waits for those in other threads)."""
        if name in getattr(self._local, "held", ()):
            raise RuntimeError(f"cannot unload {name!r} inside a `with pool.use(...)` block that uses it")
        with self._lock:
            if name not in self._loaded:
                raise ValueError(f"no adapter named {name!r} is loaded (loaded: {list(self._loaded)})")
            while self._in_use.get(name, 0) or name in self._updating:
                self._lock.wait()
            slot = self._loaded.pop(name).slot
        self._wait_for_device()  # kernels already queued may still read the slot
        with self._norms_lock:
            for layer in self.layers.values():
                stale = layer.stale()
                layer.ranks[slot] = 0
                layer.scalings[slot] = 0.0
                layer.clear_dora(slot)
                layer.compute_scales(None if stale else ())  # as in _write
        pooled.clear(self.experts, slot)
        with self._lock:
            self._free.append(slot)

    @contextlib.contextmanager
    def use(self, adapter_names: Sequence[Optional[str]]):
        """Within the block, row b of every batch the model sees uses adapter_names[b] (None or "__base__":
        the base model alone). Works with model(...) and model.generate(...). Waits while another thread
        updates one of the adapters."""
        if isinstance(adapter_names, str):
            raise TypeError("adapter_names must be a sequence with one name per batch row, not a string")
        names = list(adapter_names)
        mine = getattr(self._local, "held", Counter())
        with self._lock:
            held = {n for n in names if n not in (None, BASE)}
            # A name this thread already holds cannot be mid-update (the update waits for this thread's
            # block): only the others wait, or a nested block would wait for an update waiting for it.
            while {n for n in held if not mine[n]} & self._updating:
                self._lock.wait()
            unknown = sorted({n for n in held if n not in self._loaded}, key=str)
            if unknown:
                raise ValueError(f"unknown adapter names {unknown}; loaded: {list(self._loaded)}")
            slots = [-1 if n in (None, BASE) else self._loaded[n].slot for n in names]
            for n in held:
                self._in_use[n] = self._in_use.get(n, 0) + 1
        local = self._local
        saved = getattr(local, "ids", None), getattr(local, "held", Counter()), getattr(local, "batches", None)
        local.ids = torch.tensor(slots, dtype=torch.int64, device=self._device)
        local.held = saved[1] + Counter(held)
        local.batches = {}
        try:
            yield self
        finally:
            local.ids, local.held, local.batches = saved
            with self._lock:
                for n in held:
                    self._in_use[n] -= 1
                self._lock.notify_all()

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

    def _batch_ids(self) -> Optional[torch.Tensor]:
        """The (B,) adapter slot of each row of the batch being served in this thread, None outside `use`."""
        return getattr(self._local, "ids", None)

    def _shapes(self) -> Dict[str, tuple]:
        return {name: tuple(layer.base_layer.weight.shape) for name, layer in self.layers.items()}

    def _check_fits(self, adapter, where) -> None:
        for module, w in adapter.layers.items():
            layer = self.layers.get(module)
            if layer is None:
                raise AdapterFileError(f"{where}: the adapter targets {module!r}, which is not a layer of "
                                       f"this pool (pool layers: {', '.join(self.layers)})")
            if w.r > self.max_rank:
                raise AdapterFileError(f"{where}: {module} has rank {w.r}, above the pool's max_rank "
                                       f"{self.max_rank}")
            N, K = layer.base_layer.weight.shape
            if tuple(w.lora_A.shape) != (w.r, K) or tuple(w.lora_B.shape) != (N, w.r):
                raise AdapterFileError(f"{where}: {module} has lora_A {tuple(w.lora_A.shape)} and lora_B "
                                       f"{tuple(w.lora_B.shape)}; the layer needs ({w.r}, {K}) and ({N}, {w.r})")
        if adapter.extra:
            raise AdapterFileError(f"{where}: the adapter also holds {sorted(adapter.extra)} (trained biases or "
                                   "modules to save), which a pool of LoRA layers cannot serve per row")

    def _write(self, slot: int, weights: Dict[str, tuple], scalings: Optional[Dict[str, float]]) -> None:
        """Copy an adapter's weights into `slot` of every layer (a load with `scalings`, which also covers
        the layers the adapter does not; an update without), recompute the slot's DoRA scales, and wait
        for the device. Under the norms lock: no forward recomputes scales from a half-written slot."""
        with torch.no_grad(), self._norms_lock:
            stale = {module: layer.stale() for module, layer in self.layers.items()}
            for module, layer in self.layers.items():
                if scalings is not None or module in weights:
                    layer.write_slot(slot, weights.get(module), None if scalings is None else scalings.get(module))
            for module, layer in self.layers.items():
                # A layer whose weights changed behind the pool's back before this write recomputes every
                # DoRA slot: remembering the state after the write would hide that change.
                layer.compute_scales(None if stale[module] else (slot,))
        self._wait_for_device()

    def _wait_for_device(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
