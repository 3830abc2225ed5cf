"""AdapterBatch: the adapter ids of one batch, checked and flattened once, grouped by adapter at most once.

A model serving a mixed batch calls multi_lora_linear in every adapted layer with the same ids. Given
bare ids, each call would check them, flatten them and (for the plans that need it) sort the tokens by
adapter. An AdapterBatch does that once per batch and every layer reuses it: AdapterPool.use builds
one per input shape, a caller can build one and pass it as `adapter_ids`, and multi_lora_linear builds
one from bare ids. The same object travels to the ops, eager and under torch.compile alike.
"""
from typing import Optional, Tuple

import torch

from fusedlora.core import knobs
from fusedlora.core.checks import INT_DTYPES, check_ids_values, describe, require_tensor


def group_by_adapter(flat_ids: torch.Tensor, num_adapters: int):
    """(order (M,) int64, sorted_ids (M,), starts (L + 2,) int32) for flat integer ids (M,), on the ids'
    device, without a host sync: one stable sort, one arange, one searchsorted. order[i] is the token
    at sorted position i; starts[v + 1] is the first sorted position whose id is >= v, for v in
    [-1, L]: the layout the segment kernels of fusedlora/kernels/multi_lora.py read."""
    ids = flat_ids if flat_ids.dtype in (torch.int32, torch.int64) else flat_ids.to(torch.int32)
    sorted_ids, order = torch.sort(ids, stable=True)
    bounds = torch.arange(-1, num_adapters + 1, dtype=ids.dtype, device=ids.device)
    return order, sorted_ids, torch.searchsorted(sorted_ids, bounds, out_int32=True)


def values_checked(t: torch.Tensor) -> bool:
    """Whether ids and ranks on t's device get their values checked. Reading values back from a GPU
    would stall the stream and break CUDA-graph capture, so there it is opt-in (FUSEDLORA_DEBUG=1);
    under torch.compile a branch on tensor values would break the graph, so there it never happens."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or knobs.debug()


class AdapterBatch:
    """`AdapterBatch(adapter_ids, num_adapters)`: ids of any integer dtype and shape (the leading shape
    of the layer inputs, x.shape[:-1]), in [-1, num_adapters), -1 for the base model alone.

    Pass it to fusedlora.multi_lora_linear as `adapter_ids` for every layer whose lora_A holds
    num_adapters adapters. The values are checked here, once (on CPU; on CUDA with FUSEDLORA_DEBUG=1),
    not per layer; the grouping by adapter (a sort on the device, no host sync) is made on first need
    and kept. Immutable: write new ids into a new batch (CUDA graphs read the ids tensor in place)."""

    __slots__ = ("ids", "flat", "num_adapters", "spec", "_groups")

    def __init__(self, adapter_ids: torch.Tensor, num_adapters: int, *, check_values: bool = True):
        require_tensor("adapter_ids", adapter_ids)
        if adapter_ids.dtype not in INT_DTYPES:
            raise TypeError(f"{describe('adapter_ids', adapter_ids)} must be an integer tensor")
        if isinstance(num_adapters, bool) or not isinstance(num_adapters, int) or num_adapters < 0:
            raise ValueError(f"num_adapters must be a non-negative int, got {num_adapters!r}")
        self.ids = adapter_ids
        flat = adapter_ids.reshape(-1)
        self.flat = flat = flat if flat.numel() < 2 or flat.stride(0) == 1 else flat.contiguous()
        self.num_adapters = num_adapters
        # What the kernels read of the batch, for a call's key (fusedlora/core/specialization.py): the flat
        # ids' specialization and the adapter count. Fixed: the batch is immutable. A traced batch has no
        # storage to align and no key to make (compiled calls are keyed inside their custom ops).
        self.spec = None if torch.compiler.is_compiling() else (
            type(flat), flat.shape, flat.stride(), flat.dtype, flat.device, flat.data_ptr() & 15, num_adapters)
        self._groups: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        if check_values and values_checked(adapter_ids):
            check_ids_values(adapter_ids, num_adapters)

    @classmethod
    def grouped(cls, adapter_ids: torch.Tensor, num_adapters: int, groups=None) -> "AdapterBatch":
        """A batch over ids whose values are not checked here (a torch.compile op's ids, which are never
        checked: see values_checked), with group_by_adapter's grouping of them when one was made."""
        batch = cls(adapter_ids, num_adapters, check_values=False)
        batch._groups = groups
        return batch

    def groups(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """group_by_adapter's (order, sorted_ids, starts) for these ids, computed on first need and kept."""
        if self._groups is None:
            self._groups = group_by_adapter(self.flat, self.num_adapters)
        return self._groups

    @property
    def cached_groups(self):
        """The grouping if it was made, else (None, None, None): what the compiled path may pass on
        without adding a sort to the graph."""
        return self._groups if self._groups is not None else (None, None, None)

    def __repr__(self) -> str:
        return (f"AdapterBatch(ids shape {tuple(self.ids.shape)}, {self.num_adapters} adapters, "
                f"{'grouped' if self._groups is not None else 'not grouped'})")
