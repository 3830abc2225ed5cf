"""What a call's specialization is, said once per op, and the cache of what is built per specialization.

An eager call at decode sizes costs its host time: the checks, the backend and plan choice, and each
launch's configuration, grid, strides and constexprs, a few microseconds each. All of them depend only
on the call's specialization: for each tensor its type, shape, strides, dtype, device, 16-byte
alignment (Triton specializes on it) and whether it needs a gradient; the types or values of the
scalars that choose a path; and the settings that change a path beyond the arguments (the raw
FUSEDLORA_BACKEND and FUSEDLORA_PLAN, and torch's fp32 matmul precision when a tensor is float32, since
it chooses the precision of fp32 dots). So an op builds its call plan once per specialization and every
call runs the plan of its own.

A `Signature` describes an op's arguments once, by kind, and makes the op's key function from that
description (generated source, as collections.namedtuple makes its class: the key runs on every call,
and a loop over the description would cost a fraction of a microsecond per argument more):

    TENSOR           type, shape, strides, dtype, device, address mod 16; and whether it needs a gradient
    OPTIONAL         None, or as TENSOR
    TYPE             the value's type (a per-call value, checked by every call: the scaling)
    VALUE            the value and its type (hashable: dropout_p, a flag)
    NONE             whether the value is None (an optional function)
    SPEC             the object's `spec` attribute (AdapterBatch, ExpertRouting: what their kernels read)
    PER_CALL         nothing (a per-call value the plan reads and checks: the seed)
    SCALE            a tensor as TENSOR (it needs no gradient), else nothing: a per-call number

The key's first element says which tensor arguments need a gradient, in order (None when grad mode is
off or none does): a call with gradients runs a plan that keeps what its backward needs. Only
specializations are kept, never a tensor or an address: every call passes its own tensors, so a weight
changed in place or replaced is read as it is. A key cannot be made (None) for arguments of the wrong
kind: the op then builds a plan for the call without keeping it, and the build's checks name what is
wrong.
"""
import torch

from fusedlora.core import knobs
from fusedlora.kernels import configs
from fusedlora.kernels.common import fp32_matmul_allows_tf32

TENSOR, OPTIONAL, TYPE, VALUE, NONE, SPEC, PER_CALL, SCALE = ("tensor", "optional", "type", "value", "none", "spec",
                                                               "per_call", "scale")
KINDS = (TENSOR, OPTIONAL, TYPE, VALUE, NONE, SPEC, PER_CALL, SCALE)

# torch's fp32 matmul precision settings, read through the getter its own properties call (torch >= 2.9;
# ~0.2 µs against ~2 µs through torch.backends): fp32_matmul_allows_tf32 is a function of these two.
_precision_getter = getattr(torch._C, "_get_fp32_precision_getter", None)


def fp32_precision():
    """What decides the precision of float32 dots on the GPU (a key component)."""
    if _precision_getter is None:
        return fp32_matmul_allows_tf32()
    return _precision_getter("cuda", "matmul"), _precision_getter("generic", "all")


def settings(with_fp32: bool) -> tuple:
    """The settings part of a key, for plans that key something themselves (a backward's dY)."""
    return knobs.call_state(), fp32_precision() if with_fp32 else None


class PlanCache(dict):
    """Plans (or anything built per specialization) by key. At most `max_entries`: past that it is
    emptied, since a process that keeps seeing new specializations is not one a cache helps.
    `register=True` lets kernels.configs.clear_caches empty it too (a new tuning table changes plans)."""

    def __init__(self, max_entries: int = 4096, register: bool = True):
        super().__init__()
        self.max_entries = max_entries
        if register:
            configs.CLEAR_HOOKS.append(self.clear)

    def keep(self, key, plan):
        """plan, kept under key unless key is None (a call that could not be keyed)."""
        if key is not None:
            if len(self) >= self.max_entries:
                self.clear()
            self[key] = plan
        return plan


_AUTO = object()


class Signature:
    """`Signature(op, name=KIND, ...)`: an op's arguments in call order, each with its kind.

    `sig.key(*args, needs=...)` is the call's key (or None); `needs`, when given, replaces what the
    arguments' requires_grad and grad mode say (a custom op's body, which autograd wraps from outside,
    passes it). `sig.needs(*args)` is the key's first element alone (for a call that cannot be keyed).
    `sig.plans` is the op's PlanCache; `sig.source` the generated functions."""

    def __init__(self, op: str, **params: str):
        for name, kind in params.items():
            if kind not in KINDS:
                raise ValueError(f"{op}: argument {name} has unknown kind {kind!r} (kinds: {KINDS})")
        self.op, self.params = op, dict(params)
        self.plans = PlanCache()
        self.source = _key_source(self.params)
        scope = dict(_grad=torch.is_grad_enabled, _state=knobs.call_state, _precision=fp32_precision,
                     _F32=torch.float32, _AUTO=_AUTO, _Tensor=torch.Tensor)
        exec(compile(self.source, f"<key of {op}>", "exec"), scope)
        self.key, self.needs = scope["key"], scope["needs_of"]

    def __repr__(self) -> str:
        return f"Signature({self.op}: {', '.join(f'{n}={k}' for n, k in self.params.items())})"


def _tensor(name: str) -> str:
    return f"type({name}), {name}.shape, {name}.stride(), {name}.dtype, {name}.device, {name}.data_ptr() & 15"


def _key_source(params: dict) -> str:
    """The key function of a signature, as Python source (see Signature)."""
    names = ", ".join(params)
    tensors = [n for n, k in params.items() if k == TENSOR]
    grads = [f"{n}.requires_grad" if k == TENSOR else f"({n} is not None and {n}.requires_grad)"
             for n, k in params.items() if k in (TENSOR, OPTIONAL)]
    parts = []
    for name, kind in params.items():
        if kind == TENSOR:
            parts.append(_tensor(name))
        elif kind == OPTIONAL:
            parts.append(f"None if {name} is None else ({_tensor(name)})")
        elif kind == TYPE:
            parts.append(f"type({name})")
        elif kind == VALUE:
            parts.append(f"type({name}), {name}")  # by type too: False == 0 == 0.0, and only 0.0 passes the checks
        elif kind == NONE:
            parts.append(f"{name} is None")
        elif kind == SPEC:
            parts.append(f"{name}.spec")
        elif kind == SCALE:
            parts.append(f"({_tensor(name)}) if isinstance({name}, _Tensor) else None")
    # The fp32 switch matters only for float32 tensors; the optional ones (a bias) share x's dtype.
    fp32 = f"_precision() if _F32 in ({', '.join(f'{n}.dtype' for n in tensors)},) else None" if tensors else "None"
    lines = [f"def key({names}, needs=_AUTO):", "    try:"]
    if grads:
        lines += ["        if needs is _AUTO:",
                  "            needs = None",
                  f"            if _grad() and ({' or '.join(grads)}):",
                  f"                needs = ({', '.join(grads)},)"]
    lines += [f"        return (needs, {', '.join(parts)}{', ' if parts else ''}_state(), {fp32})",
              "    except (AttributeError, TypeError, RuntimeError):  # not tensors, or tensors without storage",
              "        return None",
              "",
              f"def needs_of({names}):",
              "    try:",
              f"        return ({', '.join(grads)},) if _grad() and ({' or '.join(grads) or 'False'}) else None",
              "    except AttributeError:  # not tensors: the build's checks say which",
              "        return None"]
    return "\n".join(lines) + "\n"

