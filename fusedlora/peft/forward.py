"""What a patched PEFT LoRA layer computes for a call that fusedlora serves (fusedlora/peft/patch.py
decides which calls those are). PEFT's forward, for reference:

    result = base_layer(x, *args, **kwargs)
    for each active adapter a:  x = cast(x, A_a.dtype);  result = result + s_a·lora_B_a(lora_A_a(dropout_a(x)))
    return result.to(the base output's dtype)

lora_B_a may carry a bias b_a (lora_bias), added after the dropout: s_a·b_a is a constant, added once.

Two plans, chosen per call:
- own weights: the direct base layer is an nn.Linear or a transformers Conv1D whose forward is the
  class's own, with no hooks and no extra arguments. Then x·Wᵀ + b (+ Σ s_a·b_a) and the first
  low-rank term are one fusedlora.lora_linear call; a Conv1D's (K, N) weight is passed as its
  transposed view, which the kernels read in place.
- split: any other direct base layer (a stacked tuner layer, a quantized Linear, a custom module, a
  hooked Linear) runs its own forward, hooks, arguments and autograd included, and
  fusedlora.lora_add adds the low-rank terms into its output.
Several active adapters: without dropout, their sum is one LoRA of the concatenated ranks, each block
of B scaled by its adapter's scaling: one call, the same function. With dropout, PEFT draws an
independent mask per adapter; one mask over the concatenated ranks would correlate them, so each
adapter then gets its own call (and seed), the first fused into the base GEMM where it can be.
"""
import functools
import threading
from collections import OrderedDict
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from fusedlora.core.adapter_batch import AdapterBatch
from fusedlora.core.checks import FLOAT_DTYPES
from fusedlora.core.torch_backend import dora_weight_norm
from fusedlora.modules.lora_linear import added_call, dora_call, fused_call, is_plain_linear
from fusedlora.multi import multi_lora_linear
from fusedlora.plans.multi_dora import dora_col_scale


class Term(NamedTuple):
    """One low-rank term s·(dropout_p(x)·Aᵀ)·Bᵀ."""
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    dropout_p: float


def has_hooks(module: nn.Module) -> bool:
    """Anything that runs when the module is called, besides its class's forward: its own or global
    hooks, or a forward set on the instance (accelerate's offloading hooks replace forward this way)."""
    hooks = nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__
                or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or hooks._global_backward_hooks or hooks._global_backward_pre_hooks)


def own_weights(base: nn.Module, conv1d: Optional[type]) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(weight as (N, K), bias) when calling `base` computes exactly x·Wᵀ + b, else None."""
    if has_hooks(base):
        return None
    if is_plain_linear(base):
        return base.weight, base.bias
    if conv1d is not None and isinstance(base, conv1d) and type(base).forward is conv1d.forward:
        return base.weight.t(), base.bias  # Conv1D keeps (K, N): fan_in_fan_out
    return None


def dropout_p(module: nn.Module) -> float:
    """The probability the adapter's dropout module drops with on this call (0 in eval mode)."""
    return module.p if isinstance(module, nn.Dropout) and module.training else 0.0


def active_adapters(layer) -> List[str]:
    return [a for a in layer.active_adapters if a in layer.lora_A]


def _cast_x(layer, x: torch.Tensor, parts: List["Term"]) -> torch.Tensor:
    """x as PEFT hands it to the last of these terms: cast to each adapter's dtype in turn (so an
    adapter after a narrower one sees the narrowed x), unless peft.helpers.disable_input_dtype_casting
    turned casting off. Casts to x's own dtype cost nothing."""
    if getattr(layer, "cast_input_dtype_enabled", True):
        for term in parts:
            x = x.to(term.lora_A.dtype)
    return x


def terms(layer, adapters: List[str]) -> List[Term]:
    """The low-rank terms of the adapters, concatenated into one where that is the same function."""
    weights = [(layer.lora_A[a].weight, layer.lora_B[a].weight) for a in adapters]
    scalings = [float(layer.scaling[a]) for a in adapters]
    ps = [dropout_p(layer.lora_dropout[a]) for a in adapters]
    one_dtype = len({(A.dtype, B.dtype) for A, B in weights}) == 1
    if len(adapters) > 1 and one_dtype and not any(ps):
        lora_A = torch.cat([A for A, _ in weights])
        if len(set(scalings)) == 1:
            lora_B, scaling = torch.cat([B for _, B in weights], dim=1), scalings[0]
        else:
            lora_B, scaling = torch.cat([B * s for (_, B), s in zip(weights, scalings)], dim=1), 1.0
        return [Term(lora_A, lora_B, scaling, 0.0)]
    return [Term(A, B, s, p) for (A, B), s, p in zip(weights, scalings, ps)]


def lora_bias(layer, adapters: List[str]) -> Optional[torch.Tensor]:
    """Σ s_a·b_a over the adapters with a bias on lora_B, or None."""
    biases = [layer.lora_B[a].bias * float(layer.scaling[a]) for a in adapters if layer.lora_B[a].bias is not None]
    return sum(biases[1:], biases[0]) if biases else None


def _linear_accepts(x, weight, bias, term: Term) -> bool:
    """Whether lora_linear takes (x, weight, bias) with this term's adapter weights as they are (under
    autocast fused_call casts them first, as nn.Linear would). An fp32 adapter under a half-precision
    x reads x exactly as PEFT's upcast copy of it."""
    if torch.is_autocast_enabled(x.device.type):
        return True
    same = weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
    on_device = weight.device == x.device and (bias is None or bias.device == x.device)
    return same and on_device and term.lora_A.dtype in (x.dtype, torch.float32)


def _add_accepts(result, x, term: Term) -> bool:
    """Whether lora_add takes a base layer's output as it came (a custom module may return anything)."""
    return (isinstance(result, torch.Tensor) and result.dtype in FLOAT_DTYPES and result.device == x.device
            and result.dim() == x.dim() and result.shape[:-1] == x.shape[:-1]
            and result.shape[-1] == term.lora_B.shape[0])


def peft_terms(layer, adapters: List[str], x, result) -> torch.Tensor:
    """PEFT's own loop over the adapters' modules, for a base output lora_add does not take."""
    dtype = result.dtype
    for a in adapters:
        x = layer._cast_input_dtype(x, layer.lora_A[a].weight.dtype)
        result = result + layer.lora_B[a](layer.lora_A[a](layer.lora_dropout[a](x))) * layer.scaling[a]
    return result.to(dtype)


def served_forward(layer, x, args, kwargs, conv1d: Optional[type], report) -> torch.Tensor:
    """The layer's output for one batch with its active adapters, through lora_linear or lora_add.
    report(reason) is called when the base layer's output turns out to be one lora_add does not take,
    after the base layer ran: PEFT's own adapter loop then finishes the call."""
    adapters = active_adapters(layer)
    parts = terms(layer, adapters)
    extra = lora_bias(layer, adapters)
    base = layer.base_layer
    own = None if args or kwargs else own_weights(base, conv1d)
    if own is not None and _linear_accepts(x, *own, parts[0]):
        weight, bias = own
        if extra is not None:
            bias = extra.to(weight.dtype) if bias is None else (bias + extra).to(weight.dtype)
        first = parts[0]
        result = fused_call(x, weight, bias, first.lora_A, first.lora_B, first.scaling, first.dropout_p)
        dtype, done = result.dtype, 1
    else:
        result = base(x, *args, **kwargs)
        if not _add_accepts(result, x, parts[0]):
            report(f"the base layer {type(base).__name__} returned {getattr(result, 'dtype', type(result).__name__)}"
                   " or a shape lora_add does not take")
            return peft_terms(layer, adapters, x, result)
        dtype, done = result.dtype, 0
        if extra is not None:
            result = result + extra  # PEFT's sum: in the wider dtype, rounded once at the end
    for i in range(done, len(parts)):
        term = parts[i]
        result = added_call(result, _cast_x(layer, x, parts[:i + 1]), term.lora_A, term.lora_B, term.scaling,
                            term.dropout_p)
    return result.to(dtype)


class Stacks:
    """A layer's adapters stacked for multi_lora_linear: (lora_A (L, R, K), lora_B (L, N, R), scalings,
    ranks). The weight stacks are copies, so they are made on every call, from the weights as they are
    now: no write to a weight can go unseen, whatever path it takes (a write through `.data` bumps no
    version counter a cache could check). Each half is one op: torch.stack when the ranks are equal,
    else one torch.cat of the weights with zero blocks between them (lora_B as a strided (L, N, R) view
    of the (N, L·R) result, which the kernels read in place), measured 3x cheaper on the host than
    padding each adapter. Kept between calls, keyed by the values they depend on (adapter names,
    scalings, ranks, shapes, dtype, device; every call reads them anew, so a hit cannot be stale): the
    (L,) scalings and ranks tensors, which saves two host-to-device copies per layer, and the zero
    blocks, which hold no weights."""

    def __init__(self):
        self.key, self.value = None, None

    def __call__(self, layer, adapters):
        As = [layer.lora_A[a].weight for a in adapters]
        Bs = [layer.lora_B[a].weight for a in adapters]
        scalings = [float(layer.scaling[a]) for a in adapters]
        ranks = [A.shape[0] for A in As]
        L, R, (N, K), dtype, device = len(As), max(ranks), (Bs[0].shape[0], As[0].shape[1]), As[0].dtype, As[0].device
        key = (tuple(adapters), tuple(scalings), tuple(ranks), N, K, dtype, device)
        if torch.compiler.is_compiling() or key != self.key:
            value = (torch.tensor(scalings, device=device), torch.tensor(ranks, dtype=torch.int32, device=device),
                     [torch.zeros(R - r, K, dtype=dtype, device=device) for r in ranks],
                     [torch.zeros(N, R - r, dtype=dtype, device=device) for r in ranks])
            if not torch.compiler.is_compiling():
                self.key, self.value = key, value
        else:
            value = self.value
        scalings_t, ranks_t, zeros_A, zeros_B = value
        if min(ranks) == R:
            stack_A, stack_B = torch.stack(As), torch.stack(Bs)
        else:
            stack_A = torch.cat([t for A, Z in zip(As, zeros_A) for t in (A, Z)]).view(L, R, K)
            stack_B = torch.cat([t for B, Z in zip(Bs, zeros_B) for t in (B, Z)], dim=1).view(N, L, R).transpose(0, 1)
        return stack_A, stack_B, scalings_t, ranks_t


def mixed_batch_adapters(layer, names) -> List[str]:
    """The adapters of an adapter_names= list that this layer holds, sorted (the stack's order)."""
    return sorted({n for n in names if n in layer.lora_A})


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class MixedBatchCache:
    """The AdapterBatches of a patched model's recent adapter_names= calls, keyed by (names, the layer's
    adapters among them, input shape, device). Every adapted layer of a forward sees the same names
    and, mostly, the same adapters, so the ids go to the device (a host-to-device copy) and get grouped
    by adapter once per forward instead of once per layer, and a generate loop reuses them from step
    to step. The entries hold small integer tensors made from the names alone, never weights.

    patch_peft makes one per model (its `fusedlora_batch_cache` attribute; patching again keeps it,
    and unpatch_peft leaves it, for the reason below). The `max_entries` most recently used entries are
    kept, the oldest go first, except those made or used while a CUDA graph was being captured: the
    graph reads their ids on every replay, so they stay for the life of the cache unless
    clear(captured=True) is told no such graph will replay. Thread-safe: serving threads share it.
    A copy (copy.deepcopy of the model) starts empty. `capturing(device)` says whether a graph is
    being captured on device (default: the current CUDA stream's state)."""

    def __init__(self, max_entries: int = 16, capturing=_capturing):
        self.max_entries = max_entries
        self._capturing = capturing
        self._recent: "OrderedDict[tuple, AdapterBatch]" = OrderedDict()
        self._captured: dict = {}
        self._lock = threading.Lock()

    def get(self, names, adapters: List[str], shape: torch.Size, device: torch.device):
        """The batch for a layer holding `adapters` (sorted): row b uses adapters.index(names[b]), or -1
        (the base alone) for a name not among them. Inside a traced graph: a plain ids tensor, uncached."""
        slot = {a: i for i, a in enumerate(adapters)}

        def build():
            rows = torch.tensor([slot.get(n, -1) for n in names], device=device)
            return rows.view(-1, *([1] * (len(shape) - 1))).expand(shape)

        if torch.compiler.is_compiling():  # no Python-side cache inside a traced graph
            return build()
        key = (tuple(names), tuple(adapters), tuple(shape), device)
        with self._lock:
            batch = self._recent.get(key)
            if batch is None:
                batch = self._captured.get(key)
            if batch is None:
                batch = self._recent[key] = AdapterBatch(build(), len(adapters))
                if len(self._recent) > self.max_entries:
                    self._recent.popitem(last=False)
            elif key in self._recent:
                self._recent.move_to_end(key)
            if self._capturing(device):
                self._captured[key] = batch
        return batch

    def keys(self) -> List[tuple]:
        """The keys held: the recent ones, oldest first, then those only a captured graph keeps."""
        with self._lock:
            return list(self._recent) + [k for k in self._captured if k not in self._recent]

    def captured_keys(self) -> List[tuple]:
        with self._lock:
            return list(self._captured)

    def __len__(self) -> int:
        return len(self.keys())

    def clear(self, captured: bool = False) -> None:
        """Drop the entries; with captured=True also those a CUDA graph captured (no such graph may
        replay afterwards)."""
        with self._lock:
            self._recent.clear()
            if captured:
                self._captured.clear()

    def __deepcopy__(self, memo):
        return MixedBatchCache(self.max_entries, self._capturing)

    def __reduce__(self):
        return MixedBatchCache, (self.max_entries,)

    def __repr__(self) -> str:
        with self._lock:
            return (f"MixedBatchCache({len(self._recent)} recent of at most {self.max_entries}, "
                    f"{len(self._captured)} kept for captured CUDA graphs)")


def check_mixed_batch(layer, x, names, *args, **kwargs) -> None:
    """PEFT's own checks of an adapter_names= call (the batch length, a merged layer, ...), with its
    messages, but for its refusal of DoRA adapters, which fusedlora serves: they are checked as
    "__base__" (every other check PEFT makes reads the names' count, not which they are)."""
    served = ["__base__" if n in layer.lora_A and is_dora(layer, n) else n for n in names]
    layer._check_forward_args(x, *args, **{**kwargs, "adapter_names": served})


def dora_scales(layer, adapters: List[str], weight, lora_A, lora_B, scalings) -> Optional[torch.Tensor]:
    """multi_lora_linear's col_scale for the stacked adapters when DoRA is among them, else None:
    m_a / ‖W + s_a·B_a·A_a‖_row per DoRA adapter, ones for the others. Computed on every call, as PEFT
    computes its norms on every DoRA call and for the same reason as Stacks: no write to W, to an
    adapter or to a magnitude can go unseen. The cost is one pass over W for all the DoRA adapters of
    the batch (plans/multi_dora.py), where PEFT forms W + s·B·A, N×K, per adapter."""
    dora = [is_dora(layer, a) for a in adapters]
    if not any(dora):
        return None
    zeros = None
    magnitudes = []
    for a, d in zip(adapters, dora):
        if d:
            magnitudes.append(layer.lora_magnitude_vector[a].weight)
        else:
            zeros = torch.zeros(weight.shape[0], dtype=lora_A.dtype, device=lora_A.device) if zeros is None else zeros
            magnitudes.append(zeros)
    return dora_col_scale(weight, lora_A, lora_B, scalings, torch.stack(magnitudes), dora)


def mixed_batch_forward(layer, x, names, stacks: Stacks, batches: MixedBatchCache, weight, bias):
    """PEFT's adapter_names= semantics through one multi_lora_linear call: row b of x uses adapter
    names[b]; "__base__", and adapters this layer does not hold, add nothing. DoRA adapters (which
    PEFT refuses here) are served with their scales: each row as its adapter alone would compute it.
    weight (N, K) and bias are the direct base layer's (own_weights). The caller has run
    check_mixed_batch on the call, with its keywords, which PEFT checks together."""
    adapters = mixed_batch_adapters(layer, names)
    ids = batches.get(names, adapters, x.shape[:-1], x.device)
    lora_A, lora_B, scalings, ranks = stacks(layer, adapters)
    col_scale = dora_scales(layer, adapters, weight, lora_A, lora_B, scalings)
    return multi_lora_linear(x, weight, bias, lora_A, lora_B, scalings, ids, ranks, col_scale=col_scale)


# ---- DoRA (PEFT's use_dora=True) -------------------------------------------------------------------

def is_dora(layer, adapter: str) -> bool:
    """Whether the adapter is PEFT's DoRA on a Linear layer (exactly that variant, not a subclass)."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is None:
        return False
    try:
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:
        return False
    return variant is DoraLinearVariant or type(variant) is DoraLinearVariant


def dora_reason(layer, x, adapters: List[str], rest, conv1d) -> Optional[str]:
    """Why a call with a DoRA adapter among the active ones must run PEFT's forward, or None: the fused
    DoRA needs the base weight (for the row norms, and the base GEMM it computes itself)."""
    base = layer.base_layer
    own = None if rest else own_weights(base, conv1d)
    if own is None and (rest or not _is_4bit(base)):
        return (f"DoRA over a {type(base).__name__} base layer (hooked, with extra arguments, or not an nn.Linear, "
                "Conv1D or bitsandbytes Linear4bit)")
    if any(layer.lora_B[a].bias is not None for a in adapters):
        return "DoRA with lora_bias"
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast and len(adapters) > 1:
        return "DoRA beside other adapters under autocast"
    if own is not None:
        weight, bias = own
        if autocast:  # dora_call casts x, W and b to the autocast dtype, as nn.Linear would
            if weight.device != x.device:
                return f"DoRA with x on {x.device} and the base weight on {weight.device}"
        elif weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype) or weight.device != x.device:
            return f"DoRA with x in {x.dtype} and the base weight in {weight.dtype} on {weight.device}"
    elif base.weight.device != x.device:
        return "DoRA with x and the 4-bit base weight on different devices"
    for a in adapters:
        A = layer.lora_A[a].weight
        if len(adapters) > 1 and A.dtype != x.dtype:
            return f"DoRA beside other adapters, with x in {x.dtype} and an adapter in {A.dtype}"
        if is_dora(layer, a):
            m = layer.lora_magnitude_vector[a].weight
            if m.dtype != A.dtype or m.device != A.device:
                return f"a DoRA magnitude in {m.dtype} with adapters in {A.dtype}"
    return None


def _is_4bit(base: nn.Module) -> bool:
    """A bitsandbytes Linear4bit running its class's own forward (QDoRA's base layer)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(base, bnb.nn.Linear4bit) and type(base).forward is bnb.nn.Linear4bit.forward \
        and not has_hooks(base)


def _dequantized(base: nn.Module, dtype: torch.dtype):
    """(weight, bias) of a 4-bit base layer in x's dtype. The (N, K) dequantized weight is the one N·K
    temporary of QDoRA, as in PEFT, which dequantizes it on every forward as well; fusedlora makes it
    again in backward instead of keeping it (dora_forward)."""
    from peft.utils.integrations import dequantize_module_weight
    bias = base.bias
    return dequantize_module_weight(base).to(dtype), (None if bias is None else bias.to(dtype))


def _dequantized_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    return _dequantized(base, dtype)[0]


def dora_forward(layer, x, conv1d: Optional[type]) -> torch.Tensor:
    """PEFT's DoRA layer (one active adapter, dora_reason None) through fusedlora.dora_linear: the same
    function, including PEFT's dropout form (the base product on the dropped input) in training, and
    under autocast the dtypes nn.Linear would take (modules.dora_call). Over
    a bitsandbytes 4-bit base (QDoRA) the weight is dequantized and the base product computed here."""
    (adapter,) = active_adapters(layer)
    base = layer.base_layer
    own = own_weights(base, conv1d)
    weight_fn = None
    if own is not None:
        weight, bias = own
    else:
        # Dequantized again in backward rather than kept: an N×K weight in x's dtype held from the forward
        # to the backward of every layer would cost QLoRA the memory it exists to save.
        weight, bias = _dequantized(base, x.dtype)
        weight_fn = functools.partial(_dequantized_weight, base, x.dtype)
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    magnitude = layer.lora_magnitude_vector[adapter].weight
    return dora_call(x, weight, bias, A, B, magnitude, float(layer.scaling[adapter]),
                     dropout_p(layer.lora_dropout[adapter]), weight_fn)


def dora_chain_forward(layer, x, conv1d: Optional[type]) -> torch.Tensor:
    """Several active adapters, DoRA among them (dora_reason None), as PEFT's adapter loop computes
    them: each adapter in turn updates the running result r, and PEFT's DoRA variant takes r where a
    lone DoRA adapter would take the base output, so the earlier adapters' terms are scaled as well:
        r + (g - 1) ⊙ (r - b) + g ⊙ s·(x·Aᵀ)·Bᵀ                    without dropout (or in eval)
        r + (g - 1) ⊙ (D(x)·Wᵀ) + g ⊙ s·(D(x)·Aᵀ)·Bᵀ               with the dropout module in training
    with g = m / ‖W + s·B·A‖_row detached. The norms come from W·Aᵀ and A·Aᵀ (no N×K matrix) and each
    low-rank term is one lora_add, with g folded into B's rows. A rare configuration, so this is the
    plain sequence of those calls rather than a fused kernel; the dropout, as in PEFT, is the adapter's
    own module applied to x (an M×K copy, as PEFT makes)."""
    base = layer.base_layer
    own = own_weights(base, conv1d)
    weight, bias = own if own is not None else _dequantized(base, x.dtype)
    result = base(x)
    dtype = result.dtype
    for a in active_adapters(layer):
        A, B, s = layer.lora_A[a].weight, layer.lora_B[a].weight, float(layer.scaling[a])
        drop = layer.lora_dropout[a]
        if not is_dora(layer, a):
            result = added_call(result, x, A, B, s, dropout_p(drop))
            continue
        m = layer.lora_magnitude_vector[a].weight
        g = m / dora_weight_norm(weight, A, B, s).to(m.dtype)
        if isinstance(drop, nn.Identity) or not layer.training:  # PEFT's DoRA variant's own test
            xa, z = x, (result if bias is None else result - bias)
        else:
            xa = drop(x)
            z = torch.nn.functional.linear(xa, weight)
        result = added_call(result + (g - 1) * z, xa, A, B * g[:, None], s, 0.0)
    return result.to(dtype)
