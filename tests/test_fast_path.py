"""The per-shape cache of eager no-grad lora_linear calls (fusedlora/ops/eager_cache.py): a call served from
it gives the full path's result (and the float64 oracle's), a key is never served to a call that
differs in anything the checks, the planner or the launch read, and bad input still gets the full
path's error after the cache is warm."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from oracle import NAMES, check_lora_linear, make_inputs
from test_bad_input import BAD, call, good

import fusedlora
import fusedlora.functional
from fusedlora.ops import eager_cache as cache
from fusedlora.ops import single as ops

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def cold_cache():
    cache._FAST.clear()
    yield
    cache._FAST.clear()


def served(monkeypatch):
    """Make the full path's checks fail loudly: a call that returns was served from the cache."""
    def refuse(*args):
        raise AssertionError("the full path ran")
    monkeypatch.setattr(fusedlora.functional, "check_lora_linear", refuse)


def args_of(inputs):
    return [inputs[n] for n in NAMES]


CASES = [
    # (M, K, N, r, dtype, adapter dtype, bias, p, seed, entry kind)
    pytest.param(16, 70, 45, 3, bf16, f32, True, 0.0, None, "_OneLaunch", id="decode-bf16-fp32adapters"),
    pytest.param((2, 7), 64, 40, 16, f16, f16, False, 0.25, 5, "_OneLaunch", id="3d-dropout"),
    pytest.param(70, 40, 24, 8, f32, f32, True, 0.0, None, "_Planned", id="split-plan"),
    pytest.param(9, 33, 20, 100, f32, f32, True, 0.1, 3, "_Planned", id="rank-above-one-launch"),
]


@pytest.mark.parametrize("M,K,N,r,dtype,adapter_dtype,bias,p,seed,kind", CASES)
def test_served_call_matches_full_path_and_oracle(M, K, N, r, dtype, adapter_dtype, bias, p, seed, kind, device,
                                                  monkeypatch):
    inputs = make_inputs(M, K, N, r, dtype, adapter_dtype, bias, device)
    with torch.no_grad():
        first = fusedlora.lora_linear(*args_of(inputs), 2.0, p, seed)  # a miss: checks, then the new entry
        (entry,) = cache._FAST.values()
        assert type(entry).__name__ == kind
        full = ops.lora_linear(*args_of(inputs), 2.0, p, seed)  # the eager path without the cache
        with monkeypatch.context() as m:
            served(m)
            again = fusedlora.lora_linear(*args_of(inputs), 2.0, p, seed)
    assert len(cache._FAST) == 1
    assert torch.equal(first, full) and torch.equal(again, full)
    assert again.shape == (*inputs["x"].shape[:-1], N) and again._base is None
    keep = fusedlora.dropout_mask(seed, inputs["x"].shape, p, device) if p > 0 else None
    check_lora_linear(again, None, inputs, 2.0, keep, p)


def test_torch_backend_served(monkeypatch, device):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    inputs = make_inputs(6, 16, 12, 4, f32, device=device)
    want = fusedlora.core.torch_backend.lora_linear(*args_of(inputs), 1.5)
    fusedlora.lora_linear(*args_of(inputs), 1.5)
    served(monkeypatch)
    assert torch.equal(fusedlora.lora_linear(*args_of(inputs), 1.5), want)


def test_per_call_values_are_read_on_every_call(device, monkeypatch):
    """Scaling, seed and the tensors' values are not part of the key: a served call reads them."""
    inputs = make_inputs(8, 32, 24, 4, f32, device=device)
    fusedlora.lora_linear(*args_of(inputs), 1.0, 0.3, seed=1)
    served(monkeypatch)
    for scaling, seed in ((1.0, 1), (2.5, 1), (2.5, 77), (-3.0, 77)):
        got = fusedlora.lora_linear(*args_of(inputs), scaling, 0.3, seed=seed)
        assert torch.equal(got, ops.lora_linear(*args_of(inputs), float(scaling), 0.3, seed))
    inputs["lora_B"].mul_(-2.0)  # a weight changed in place is read as it is now
    got = fusedlora.lora_linear(*args_of(inputs), 1.0, 0.3, seed=1)
    assert torch.equal(got, ops.lora_linear(*args_of(inputs), 1.0, 0.3, 1))
    assert len(cache._FAST) == 1


def _variants(inputs):
    """name -> (args, scaling, p): calls that must not be served by the base call's entry."""
    x, w, b, A, B = args_of(inputs)
    offset = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view(x.shape).copy_(x)
    return {
        "transposed x": ((x.t().contiguous().t(), w, b, A, B), 2.0, 0.0),
        "no bias": ((x, w, None, A, B), 2.0, 0.0),
        "half x and weight": ((x.half(), w.half(), b.half(), A, B), 2.0, 0.0),
        "misaligned x": ((offset, w, b, A, B), 2.0, 0.0),
        "transposed lora_A": ((x, w, b, A.t().contiguous().t(), B), 2.0, 0.0),
        "dropout": ((x, w, b, A, B), 2.0, 0.2),
        "int scaling": ((x, w, b, A, B), 2, 0.0),
    }


def test_key_covers_every_specialization(device):
    base = make_inputs(16, 32, 24, 4, f32, device=device)
    with torch.no_grad():
        fusedlora.lora_linear(*args_of(base), 2.0)
        for name, (args, scaling, p) in _variants(base).items():
            before = len(cache._FAST)
            got = fusedlora.lora_linear(*args, scaling, p, seed=4)
            assert len(cache._FAST) == before + 1, f"{name}: served by another call's entry"
            assert torch.equal(got, ops.lora_linear(*args, float(scaling), p, 4)), name


def test_settings_are_in_the_key(device, monkeypatch):
    """FUSEDLORA_PLAN, FUSEDLORA_BACKEND and torch's fp32 matmul precision switch take effect on the
    next call, as on the full path."""
    inputs = make_inputs(16, 32, 24, 4, f32, device=device)
    fusedlora.lora_linear(*args_of(inputs), 2.0)
    assert type(next(iter(cache._FAST.values()))).__name__ == "_OneLaunch"
    monkeypatch.setenv("FUSEDLORA_PLAN", "split")
    fusedlora.lora_linear(*args_of(inputs), 2.0)
    assert [type(e).__name__ for e in cache._FAST.values()] == ["_OneLaunch", "_Planned"]
    assert cache._FAST[cache.fast_key(*args_of(inputs), 2.0, 0.0, None)].plan == "split"
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    fusedlora.lora_linear(*args_of(inputs), 2.0)
    assert type(list(cache._FAST.values())[-1]).__name__ == "_TorchBackend"
    monkeypatch.setenv("FUSEDLORA_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FUSEDLORA_BACKEND"):
        fusedlora.lora_linear(*args_of(inputs), 2.0)
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    try:
        keys = set()
        for precision in ("ieee", "tf32"):
            matmul.fp32_precision = precision
            keys.add(cache.fast_key(*args_of(inputs), 2.0, 0.0, None))
        assert len(keys) == 2
        half = make_inputs(16, 32, 24, 4, f16, device=device)  # half precision ignores the switch
        assert cache.fast_key(*args_of(half), 2.0, 0.0, None) == cache.fast_key(*args_of(half), 2.0, 0.0, None)
    finally:
        matmul.fp32_precision = previous


def test_calls_needing_gradients_have_their_own_entries(device):
    """A call that needs a gradient gets an entry of its own (tests/test_fast_path_train.py tests them),
    never the no-grad entry of the same tensors."""
    inputs = make_inputs(8, 32, 24, 4, f32, device=device)
    inputs["lora_A"].requires_grad_()
    y = fusedlora.lora_linear(*args_of(inputs), 2.0)
    assert y.requires_grad and [type(e).__name__ for e in cache._FAST.values()] == ["_Train"]
    with torch.no_grad():
        assert not fusedlora.lora_linear(*args_of(inputs), 2.0).requires_grad
    assert len(cache._FAST) == 2


def test_configs_clear_caches_clears_it(device):
    from fusedlora.kernels import configs
    inputs = make_inputs(8, 32, 24, 4, f32, device=device)
    fusedlora.lora_linear(*args_of(inputs), 2.0)
    configs.clear_caches(tables=False)
    assert not cache._FAST


@pytest.mark.parametrize("change,error,words", BAD)
def test_bad_input_after_a_warm_cache(change, error, words, device):
    def message():
        args = good(device)
        change(args)
        with pytest.raises(error) as info:
            call(args)
        return str(info.value)

    cold = message()
    for _ in range(2):
        call(good(device))  # the good call's entry, and every specialization a bad call shares with it
    assert cache._FAST
    assert message() == cold
    assert all(w in cold for w in words)


SM90_CHECK = r"""
import sys
sys.path.insert(0, sys.argv[1])
import host
host.install_sm90_host_path()
import torch
from triton.runtime.jit import JITFunction
import fusedlora
from fusedlora.kernels import launch
from fusedlora.ops import eager_cache, multi

g = torch.Generator().manual_seed(0)
flat = torch.randn(64 * 96 + 1, generator=g)

def calls(dtype):
    W, b = torch.randn(80, 96, generator=g).to(dtype), torch.randn(80, generator=g).to(dtype)
    A, B = torch.randn(16, 96, generator=g), torch.randn(80, 16, generator=g)
    mA, mB = torch.randn(3, 16, 96, generator=g), torch.randn(3, 80, 16, generator=g)
    s, ranks = torch.ones(3), torch.tensor([16, 5, 9], dtype=torch.int32)
    for M in (1, 16, 40):
        for offset in (0, 1):
            x = flat[offset:offset + M * 96].to(dtype).view(M, 96)
            for p, seed in ((0.0, None), (0.1, 3), (0.1, 2**40 + 16), (0.1, 1)):
                for bias in (b, None):
                    yield fusedlora.lora_linear, (x, W, bias, A, B, 2.0, p, seed)
            yield fusedlora.lora_linear, (x.view(1, M, 96), W, b, A, B, 0.5, 0.0, None)
            Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()
            gy = torch.randn(M, 80, generator=g).to(dtype)
            for p, seed in ((0.0, None), (0.1, 3)):
                yield train_step, (x, W, b, Ag, Bg, gy, p, seed)
            base = flat[offset:offset + M * 80].to(dtype).view(M, 80)
            for p, seed in ((0.0, None), (0.1, 3), (0.1, 2**40 + 16)):
                yield fusedlora.lora_add, (base, x, A, B, 2.0, p, seed)
            yield add_train_step, (base, x, Ag, Bg, gy, 0.1, 5)
            batch = fusedlora.AdapterBatch(torch.arange(M) % 4 - 1, 3)
            for bias, r in ((b, ranks), (None, None)):
                yield fusedlora.multi_lora_linear, (x, W, bias, mA.to(dtype), mB.to(dtype), s, batch, r)

def train_step(x, W, b, A, B, gy, p, seed):
    with torch.enable_grad():  # a call with gradients: forward and backward
        torch.autograd.grad(fusedlora.lora_linear(x, W, b, A, B, 2.0, p, seed), (A, B), gy)

def add_train_step(base, x, A, B, gy, p, seed):
    with torch.enable_grad():
        torch.autograd.grad(fusedlora.lora_add(base, x, A, B, 2.0, p, seed), (A, B), gy)

def comparable(args):
    return tuple((a.dtype, a.data_ptr() % 16) if isinstance(a, torch.Tensor) else a for a in args)

def warm():
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            for fn, args in calls(dtype):
                fn(*args)

def record(fast):
    if fast:  # the entries, and their compiled kernels, made with the fast launch on
        warm()
    host._Skipped.record = out = []
    plain = []
    original = JITFunction.run
    JITFunction.run = lambda self, *a, **k: plain.append(1) or original(self, *a, **k)
    try:
        with torch.no_grad():
            for dtype in (torch.float32, torch.bfloat16):
                for fn, args in calls(dtype):
                    if not fast:
                        eager_cache._FAST.clear()
                        multi._FAST.clear()
                        launch.set_fast_launch(False)
                    fn(*args)
    finally:
        JITFunction.run = original
        host._Skipped.record = None
        launch.set_fast_launch(True)
    return [(s.key, comparable(a)) for s, a in out], len(plain)

warm()  # first sight of every specialization
slow, slow_plain = record(False)
fast, fast_plain = record(True)
assert slow_plain == len(slow) > 0, (slow_plain, len(slow))
assert fast_plain == 0, f"{fast_plain} launches took Triton's binder with the cache warm"
assert len(fast) == len(slow)
for i, (a, b) in enumerate(zip(fast, slow)):
    assert a == b, f"launch {i}: cached {a}\n plain {b}"
print("OK", len(fast), "launches")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above launch for real")
def test_cached_launch_matches_tritons_binder():
    """On benchmarks/host.py's sm_90 host path, calls served from the caches (lora_linear's and
    lora_add's, with and without gradients, and multi_lora_linear's) launch the compiled kernel Triton's binder picks, with the arguments it is
    given on the full path with the plain launch."""
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDLORA_FAST_LAUNCH",
                                                            "FUSEDLORA_BACKEND", "FUSEDLORA_PLAN")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SM90_CHECK, str(root / "benchmarks")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_bad_per_call_values_after_a_warm_cache(device):
    """A key hit still checks the values the key leaves out: the scaling and the seed."""
    inputs = make_inputs(8, 32, 24, 4, f32, device=device)
    fusedlora.lora_linear(*args_of(inputs), 1.0, 0.3, seed=1)
    with pytest.raises(ValueError, match="scaling must be finite"):
        fusedlora.lora_linear(*args_of(inputs), float("inf"), 0.3, seed=1)
    with pytest.raises(ValueError, match="seed must be an int in"):
        fusedlora.lora_linear(*args_of(inputs), 1.0, 0.3, seed=-1)
    with pytest.raises(ValueError, match="seed must be an int in"):
        fusedlora.lora_linear(*args_of(inputs), 1.0, 0.3, seed=2**63)
    assert len(cache._FAST) == 1


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lora_add_served(backend, device, monkeypatch):
    """lora_add's entries: the full path's result and the float64 oracle's; a different base
    specialization is another key; bad input after a warm cache gets the full path's error."""
    from oracle import check_lora_add
    from test_lora_add import add_inputs
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    inputs = add_inputs((2, 5), 40, 24, 4, bf16, f32, device=device)
    args = [inputs[n] for n in ("base", "x", "lora_A", "lora_B")]
    with torch.no_grad():
        first = fusedlora.lora_add(*args, 1.5, 0.2, seed=9)
        full = (ops.lora_add(*args, 1.5, 0.2, 9) if backend == "triton"
                else fusedlora.core.torch_backend.lora_add(*args, 1.5, 0.2, 9))
        with monkeypatch.context() as m:
            m.setattr(fusedlora.functional, "check_lora_add", lambda *a: pytest.fail("the full path ran"))
            again = fusedlora.lora_add(*args, 1.5, 0.2, seed=9)
        assert len(cache._FAST) == 1 and torch.equal(first, full) and torch.equal(again, full)
        # Ten rows take the one-launch forward (the shrink inside the expand's K loop) on the kernels.
        assert type(next(iter(cache._FAST.values()))).__name__ == ("_AddedOneLaunch" if backend == "triton"
                                                                  else "_Added")
        fusedlora.lora_add(args[0].float(), *args[1:], 1.5, 0.2, seed=9)
        assert len(cache._FAST) == 2
        with pytest.raises(ValueError, match="lora_B"):
            fusedlora.lora_add(args[0], args[1], args[2], args[3][:, :3], 1.5, 0.2, seed=9)
        with pytest.raises(ValueError, match="scaling must be finite"):
            fusedlora.lora_add(*args, float("nan"), 0.2, seed=9)
    keep = fusedlora.dropout_mask(9, inputs["x"].shape, 0.2, device)
    check_lora_add(again, None, inputs, 1.5, keep, 0.2, torch_ops=backend == "torch")
