"""The fast launch path (kernels/launch.py) launches what Triton's binder would, checked on CPU.

The check runs Triton's GPU launch path for sm_90 in a subprocess without the interpreter (the test
session has it on); see tests/fast_launch_check.py. On a CUDA machine the kernel tests run the fast
path for real, and again with FUSEDLORA_FAST_LAUNCH=0."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import CUDA


@pytest.mark.skipif(CUDA, reason="CUDA present: the kernel tests launch through the fast path for real")
def test_fast_launch_matches_tritons_binder():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDLORA_FAST_LAUNCH")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = pathlib.Path(__file__).with_name("fast_launch_check.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "FAIL" not in proc.stdout


def test_fast_launch_switch():
    from fusedlora.kernels import launch
    previous = launch.set_fast_launch(False)
    try:
        assert not launch.fast_launch()
        launch.set_fast_launch(True)
        assert launch.fast_launch() != launch.interpreting()
    finally:
        launch.set_fast_launch(previous)


# ---- the fast path's logic, in this process: a kernel and a driver that record what they are asked ------
# Under the interpreter launch.py takes the plain path; these tests switch that off and hand launch() and
# Bound a stand-in kernel (kernel[grid](...) records a plain launch and returns a compiled kernel) and a
# stand-in driver, so every branch of the fast path runs here and its arguments can be read back.

class Compiled:
    function, packed_metadata = "function", "packed metadata"

    def __init__(self):
        self.runs = []

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid, stream)

    def run(self, *args):
        self.runs.append(args)


class Kernel:
    """A kernel with runtime arguments (x_ptr, n, seed, scale) and constexprs (BLOCK, FLAG)."""
    arg_names = ["x_ptr", "n", "seed", "scale", "BLOCK", "FLAG"]

    def __init__(self, compiled=True):
        self.plain, self.compiled = [], Compiled() if compiled else object()

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.plain.append((grid, args, kwargs))
            return self.compiled
        return run


class Driver:
    def __init__(self):
        self.device, self.fail = 0, False
        self.active = self

    def get_current_device(self):
        if self.fail:
            raise RuntimeError("no GPU driver")
        return self.device

    def get_current_stream(self, device):
        return f"stream {device}"


@pytest.fixture
def fast(monkeypatch):
    """launch.py with the fast path on outside the interpreter, the stand-in driver and an empty cache."""
    from fusedlora.kernels import launch
    driver = Driver()
    monkeypatch.setattr(launch, "_INTERPRETING", False)
    monkeypatch.setattr(launch, "_fast", True)
    monkeypatch.setattr(launch, "driver", driver)
    monkeypatch.setattr(launch, "_COMPILED", {})
    return launch, driver


def _hooks():
    from triton import knobs
    return knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook


def _aligned(offset=0):
    buffer = torch.zeros(64)
    start = (-buffer.data_ptr() // 4) % 4 + offset  # elements to the first 16-byte boundary, plus offset
    return buffer[start:start + 16]


@pytest.mark.parametrize("grid", [(3,), (3, 2), (3, 2, 5)], ids=["1d", "2d", "3d"])
def test_launch_runs_the_compiled_kernel_it_kept(fast, grid):
    launch, _ = fast
    kernel, x = Kernel(), _aligned()
    launch.launch(kernel, grid, x, 5, 2**40, 0.5, BLOCK=16, FLAG=True)
    assert len(kernel.plain) == 1 and not kernel.compiled.runs
    launch.launch(kernel, grid, x, 5, 2**40 + 32, 0.25, BLOCK=16, FLAG=True)  # the same specialization
    assert len(kernel.plain) == 1
    (args,) = kernel.compiled.runs
    grid_1, grid_2 = (list(grid[1:]) + [1, 1])[:2]
    assert args == (grid[0], grid_1, grid_2, "stream 0", "function", "packed metadata", ("metadata", grid, "stream 0"),
                    *_hooks(), x, 5, 2**40 + 32, 0.25, 16, True)


def _spec_of_triton(value):
    """What Triton's binder (for sm_90) specializes an int argument on."""
    import triton
    import triton.language as tl
    from sm90 import bind

    @triton.jit
    def kernel(out_ptr, n, BLOCK: tl.constexpr):
        tl.store(out_ptr + tl.arange(0, BLOCK), n)

    return bind(kernel, (torch.empty(16), value), dict(BLOCK=16))[2][1]


INT_EDGES = (0, 1, 2, 15, 16, 17, 65535, 65536, 2**30, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**32, 2**62,
             2**63 - 16, 2**63 - 1, 2**63, 2**63 + 16, 2**64 - 16, 2**64 - 1, -1, -16, -65536, -65537, -2**31 + 16,
             -2**31, -2**31 - 1, -2**31 - 16, -2**63, -2**63 + 16)


def test_an_id_a_freed_kernel_leaves_is_a_miss(fast):
    """The cache keys a kernel by id: a kernel created where a freed one lived (same id) must compile its
    own, not launch the freed kernel's code. Its entry is put under the new kernel's id by hand, as
    the freed kernel's would look to its successor."""
    launch, _ = fast
    first, second, x = Kernel(), Kernel(), _aligned()
    launch.launch(first, (1,), x, 5, 0, 1.0, BLOCK=16, FLAG=True)
    ((key, entry),) = launch._COMPILED.items()
    launch._COMPILED[(id(second), *key[1:])] = entry
    launch.launch(second, (1,), x, 5, 0, 1.0, BLOCK=16, FLAG=True)
    assert len(second.plain) == 1 and not first.compiled.runs
    launch.launch(second, (1,), x, 5, 0, 1.0, BLOCK=16, FLAG=True)  # now served by its own
    assert len(second.plain) == 1 and len(second.compiled.runs) == 1 and not first.compiled.runs


def test_ints_that_triton_specializes_apart_are_launched_apart(fast):
    """Of two int arguments Triton's binder specializes differently (1, a multiple of 16, i32 / i64 /
    u64), the second is not served by the kernel compiled for the first: launch's key separates them
    (by value for small ints, by Triton's classes for the others)."""
    launch, _ = fast
    triton_spec = {v: _spec_of_triton(v) for v in INT_EDGES}
    x = _aligned()
    for a in INT_EDGES:
        for b in INT_EDGES:
            if triton_spec[a] == triton_spec[b]:
                continue
            kernel = Kernel()
            launch.launch(kernel, (1,), x, a, 0, 1.0, BLOCK=16, FLAG=True)
            launch.launch(kernel, (1,), x, b, 0, 1.0, BLOCK=16, FLAG=True)
            assert len(kernel.plain) == 2, f"{b} served by the kernel compiled for {a}"


@pytest.mark.parametrize("change", ["x unaligned", "x dtype", "scale an int", "seed None", "BLOCK", "FLAG"])
def test_launch_keys_what_triton_specializes_on(fast, change):
    launch, _ = fast
    kernel, x = Kernel(), _aligned()
    args, kwargs = [x, 5, 7, 0.5], dict(BLOCK=16, FLAG=True)
    launch.launch(kernel, (1,), *args, **kwargs)
    if change == "x unaligned":
        args[0] = _aligned(1)
    elif change == "x dtype":
        args[0] = x.double()
    elif change == "scale an int":
        args[3] = 2
    elif change == "seed None":
        args[2] = None
    else:
        kwargs[change] = not kwargs[change] if change == "FLAG" else 32
    launch.launch(kernel, (1,), *args, **kwargs)
    assert len(kernel.plain) == 2 and not kernel.compiled.runs


def test_launch_takes_the_plain_path_when_it_must(fast):
    launch, driver = fast
    x = _aligned()
    pending = Kernel(compiled=False)  # an asynchronous compile: nothing to keep yet
    for _ in range(2):
        launch.launch(pending, (1,), x, 5, 7, 0.5, BLOCK=16, FLAG=True)
    assert len(pending.plain) == 2
    kernel = Kernel()
    driver.fail = True  # no GPU driver: Triton's path decides
    for _ in range(2):
        launch.launch(kernel, (1,), x, 5, 7, 0.5, BLOCK=16, FLAG=True)
    assert len(kernel.plain) == 2 and not launch._COMPILED
    driver.fail = False
    launch.set_fast_launch(False)
    for _ in range(2):
        launch.launch(kernel, (1,), x, 5, 7, 0.5, BLOCK=16, FLAG=True)
    assert len(kernel.plain) == 4 and not kernel.compiled.runs
    assert not launch.fast_launch()


@pytest.mark.parametrize("grid", [(3,), (3, 2), (3, 2, 5)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("tail", [(), (2**40, 0.5)], ids=["no-tail", "tail"])
def test_bound_launches_with_its_frozen_arguments(fast, grid, tail):
    launch, driver = fast
    kernel, x = Kernel(), _aligned()
    bound = launch.Bound(kernel, grid, (5,) if tail else (5, 7, 0.5), dict(BLOCK=16, FLAG=True))
    bound((x,), tail)
    assert kernel.plain == [(grid, (x, 5, *tail) if tail else (x, 5, 7, 0.5), dict(BLOCK=16, FLAG=True))]
    y = _aligned()
    bound((y,), tail)
    assert len(kernel.plain) == 1
    (args,) = kernel.compiled.runs
    grid_1, grid_2 = (list(grid[1:]) + [1, 1])[:2]
    assert args == (grid[0], grid_1, grid_2, "stream 0", "function", "packed metadata", ("metadata", grid, "stream 0"),
                    *_hooks(), y, 5, *(tail or (7, 0.5)), 16, True)
    driver.device = 1  # another device than the first call's: the plain path
    bound((y,), tail)
    assert len(kernel.plain) == 2 and len(kernel.compiled.runs) == 1


def test_bound_takes_the_plain_path_when_it_must(fast):
    launch, driver = fast
    x = _aligned()
    pending = Kernel(compiled=False)
    bound = launch.Bound(pending, (1,), (5, 7, 0.5), dict(BLOCK=16, FLAG=True))
    bound((x,), ())
    bound((x,), ())
    assert len(pending.plain) == 2
    kernel = Kernel()
    driver.fail = True  # no GPU driver: nothing kept, the next call binds again
    bound = launch.Bound(kernel, (1,), (5, 7, 0.5), dict(BLOCK=16, FLAG=True))
    bound((x,), ())
    assert bound.compiled is None
    driver.fail = False
    bound((x,), ())
    bound((x,), ())
    assert len(kernel.plain) == 2 and len(kernel.compiled.runs) == 1
    kernel = Kernel()
    bound = launch.Bound(kernel, (1,), (5, 7, 0.5), dict(BLOCK=16, FLAG=True))
    bound((x,), ())
    launch.set_fast_launch(False)
    bound((x,), ())
    assert len(kernel.plain) == 2 and not kernel.compiled.runs


@pytest.mark.skipif(CUDA, reason="the import-time switch is read by the session's own launches there")
def test_fast_launch_environment_switch():
    """FUSEDLORA_FAST_LAUNCH=0 (spaces allowed), read at import, turns the fast path off; without it the
    path is on (tests/fast_launch_check.py checks that)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FUSEDLORA_FAST_LAUNCH"] = " 0 "
    code = "from fusedlora.kernels import launch; import sys; sys.exit(3 if launch.fast_launch() else 0)"
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=pathlib.Path(__file__).parent).returncode == 0
