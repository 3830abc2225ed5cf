"""Kernel launches without Triton's per-call binding work, once a kernel is compiled.

`kernel[grid](*args, **constexprs)` binds the arguments, works out the specialization and looks the
compiled kernel up on every call: at decode sizes that host work (~18 µs a launch on a 2-core CPU,
measured with benchmarks/host.py) costs more than the GPU work it launches. `launch` does the plain
launch the first time it sees a specialization and keeps the compiled kernel it returns; later calls
with the same specialization go straight to the compiled kernel's launcher, exactly as Triton's own
`JITFunction.run` calls it (and as `CompiledKernel.__getitem__` does), with the current stream.

The specialization is what Triton specializes a compiled kernel on, computed here with Triton's rules
(the same in triton 3.6 and 3.9): for a tensor, its dtype and whether its address is a multiple of 16;
for an int, whether it is 1, whether it is a multiple of 16 and its integer type (i32, i64, u64); bools
and floats by type; the keyword arguments (constexprs and options such as num_warps) by value; and
the current device. Anything else Triton puts in its key (TRITON_DEBUG and the other compilation knobs)
is read when a specialization is first seen, and so is Triton's check that the globals a kernel reads
have not changed (fusedlora's kernels read none that can). FUSEDLORA_FAST_LAUNCH=0 (read at import)
or set_fast_launch(False) sends every launch down the plain path, to debug with those knobs say.
Under the Triton interpreter every launch takes the plain path.
"""
import os

import torch
from triton import knobs
from triton.runtime.driver import driver

from .common import interpreting

# Whether the interpreter runs is fixed when triton is first imported, before this module.
_INTERPRETING = interpreting()
_fast = os.environ.get("FUSEDLORA_FAST_LAUNCH", "1").strip() != "0"
# (kernel, device, argument specializations, keyword arguments) -> (compiled kernel, constexpr values
# in parameter order). Bounded by the specializations the launchers ask for, like Triton's own cache.
_COMPILED = {}
_Tensor = torch.Tensor


def set_fast_launch(enabled: bool) -> bool:
    """Turn the fast path on or off for this process; returns the previous setting."""
    global _fast
    previous, _fast = _fast, bool(enabled)
    return previous


def fast_launch() -> bool:
    """Whether launches take the fast path."""
    return _fast and not _INTERPRETING


def _spec(arg):
    """What Triton's binder specializes a non-tensor kernel argument on (a finer key is harmless, a
    coarser one would launch a kernel compiled for other arguments). launch keys tensors, and ints
    below 65536 in magnitude (1, Triton's other class, among them), itself."""
    kind = type(arg)
    if kind is int:
        width = 32 if -2**31 <= arg < 2**31 else 64 if -2**63 <= arg < 2**63 else 65
        return (width, arg % 16 == 0)
    if kind is bool or kind is float:
        return kind
    return (kind, arg)  # anything else (None): by value, as Triton does


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs): positional arguments are the kernel's runtime arguments (tensors,
    ints, floats), keyword arguments its constexprs and launch options."""
    if not _fast or _INTERPRETING:
        kernel[grid](*args, **kwargs)
        return
    try:
        device = driver.active.get_current_device()
    except RuntimeError:  # no GPU driver (a launch recorded instead of run, say): Triton's path decides
        kernel[grid](*args, **kwargs)
        return
    # Small ints (shapes, strides) by value: finer than Triton's key, cheaper than _spec, and bounded
    # by the shapes a process sees; other ints (seeds, large strides) by Triton's classes. The kernel
    # by id: JITFunction's own hash recomputes its cache key. The entry holds the kernel itself, so an
    # id that a freed kernel's successor reuses is a miss, not that kernel's compiled code.
    key = (id(kernel), device, tuple([
        a if type(a) is int and -65536 < a < 65536 else
        (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, _Tensor) else _spec(a) for a in args]),
        tuple(kwargs.items()))
    entry = _COMPILED.get(key)
    if entry is None or entry[0] is not kernel:
        compiled = kernel[grid](*args, **kwargs)
        if hasattr(compiled, "packed_metadata"):  # a compiled kernel, not a pending asynchronous compile
            _COMPILED[key] = (kernel, compiled, tuple(kwargs[name] for name in kernel.arg_names[len(args):]))
        return
    _, compiled, constexprs = entry
    every = args + constexprs
    stream = driver.active.get_current_stream(device)
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    metadata = compiled.launch_metadata(grid, stream, *every)
    compiled.run(grid[0], grid_1, grid_2, stream, compiled.function, compiled.packed_metadata, metadata,
                 knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *every)


class Bound:
    """The launches of one kernel specialization with everything but the per-call arguments fixed.

    `Bound(kernel, grid, frozen, kwargs)(head, tail)` launches kernel[grid](*head, *frozen, *tail,
    **kwargs). The caller owns the promise that makes this safe: every call's head (the tensors) and
    tail (per-call scalars: seed words, thresholds, scales; ints listed in do_not_specialize or always
    of one integer type) specialize the kernel as the first call's did, i.e. the tensors have the
    first call's dtypes and 16-byte alignment (fusedlora's per-shape caches key on both). Then the
    grid, the frozen arguments (shapes, strides) and the constexprs are not recomputed, and after the
    first launch neither is Triton's binding: the compiled kernel's launcher is called as `launch`
    calls it, on the current stream. Under the interpreter, with the fast path off, or on a device
    other than the first call's, every call takes the plain `kernel[grid]` path."""

    __slots__ = ("kernel", "grid", "frozen", "kwargs", "compiled", "constexprs", "rest", "device", "grid_1", "grid_2")

    def __init__(self, kernel, grid, frozen: tuple, kwargs: dict):
        self.kernel, self.grid, self.frozen, self.kwargs = kernel, grid, frozen, kwargs
        self.compiled = self.constexprs = self.device = None
        self.grid_1 = grid[1] if len(grid) > 1 else 1
        self.grid_2 = grid[2] if len(grid) > 2 else 1

    def __call__(self, head: tuple, tail: tuple) -> None:
        compiled = self.compiled
        if compiled is not None and _fast:
            device = driver.active.get_current_device()
            if device == self.device:
                every = head + self.frozen + tail + self.constexprs if tail else head + self.rest
                stream = driver.active.get_current_stream(device)
                grid = self.grid
                compiled.run(grid[0], self.grid_1, self.grid_2, stream, compiled.function, compiled.packed_metadata,
                             compiled.launch_metadata(grid, stream, *every), knobs.runtime.launch_enter_hook,
                             knobs.runtime.launch_exit_hook, *every)
                return
        args = head + self.frozen + tail
        result = self.kernel[self.grid](*args, **self.kwargs)
        if compiled is None and _fast and not _INTERPRETING and hasattr(result, "packed_metadata"):
            try:
                self.device = driver.active.get_current_device()
            except RuntimeError:  # no GPU driver: stay on the plain path
                return
            self.constexprs = tuple(self.kwargs[name] for name in self.kernel.arg_names[len(args):])
            self.rest = self.frozen + self.constexprs  # what follows the head in a call without a tail
            self.compiled = result
