"""Every call runs the call plan of its specialization (fusedlora/core/specialization.py, fusedlora/ops/call.py).

A call served by a kept plan gives what a freshly built plan gives, and the float64 oracle's. Per-call
values (scaling, seed) are read and checked by every call, on every path a plan takes; bad input raises
the build's error after the cache is warm; a plan holds no tensor; at one-launch sizes a served call runs
the launch its plan bound; on the sm_90 host path a served call launches what Triton's binder would.
A call that differs from a warm one in one component of its key: tests/test_plan_keys.py. Calls with
gradients: tests/test_call_plans_train.py."""
import collections
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from oracle import NAMES, check_lora_add, check_lora_linear, check_multi_lora_linear, make_inputs
from test_bad_input import BAD, call, good
from test_lora_add import add_inputs
from test_multi_lora import make_multi

import fusedlora
import fusedlora.ops.dora
import fusedlora.ops.multi
import fusedlora.ops.single
from fusedlora import AdapterBatch
from fusedlora.kernels import configs
from fusedlora.plans.callplan import CallPlan

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
BUILDERS = ((fusedlora.ops.single, "linear_plan"), (fusedlora.ops.single, "add_plan"),
            (fusedlora.ops.multi, "multi_plan"), (fusedlora.ops.dora, "dora_plan"))
MULTI = ("x", "weight", "bias", "lora_A", "lora_B", "scalings")
ADD = ("base", "x", "lora_A", "lora_B")


@pytest.fixture(autouse=True)
def cold():
    configs.clear_caches(tables=False)
    yield
    configs.clear_caches(tables=False)


@pytest.fixture
def builds(monkeypatch):
    """Plan builds per builder name: a call served by a kept plan builds none."""
    count = collections.Counter()
    for module, name in BUILDERS:
        def counted(*args, _real=getattr(module, name), _name=name, **kwargs):
            count[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return count


@pytest.fixture
def launches(monkeypatch):
    """Triton launches by kernel name."""
    from fusedlora.kernels.lora_gemm import _lora_gemm_kernel
    kind = type(_lora_gemm_kernel)  # JITFunction, or the interpreter's stand-in
    seen = collections.Counter()
    real = kind.run

    def run(self, *args, **kwargs):
        seen[self.fn.__name__] += 1
        return real(self, *args, **kwargs)
    monkeypatch.setattr(kind, "run", run)
    return seen


def linear(inputs, scaling=2.0, p=0.0, seed=None):
    return fusedlora.lora_linear(*(inputs[n] for n in NAMES), scaling, p, seed)


def served_twice_and_fresh(fn, builds, name):
    """fn() three times: a build, a call served by the kept plan (no build), and after the caches are
    emptied a fresh build; all three bitwise equal. Returns the served result."""
    first = fn()
    assert builds[name] == 1
    again = fn()
    assert builds[name] == 1, "a warm call built its plan again"
    configs.clear_caches(tables=False)
    fresh = fn()
    assert builds[name] == 2
    assert torch.equal(first, fresh) and torch.equal(again, fresh)
    return again


CASES = [
    # (M, K, N, r, dtype, adapter dtype, bias, p, seed)
    pytest.param(16, 70, 45, 3, bf16, f32, True, 0.0, None, id="one-launch-bf16-fp32adapters"),
    pytest.param((2, 7), 64, 40, 16, f16, f16, False, 0.25, 5, id="3d-dropout"),
    pytest.param(70, 40, 24, 8, f32, f32, True, 0.0, None, id="split-rows"),
    pytest.param(9, 33, 20, 100, f32, f32, True, 0.1, 3, id="rank-above-one-launch"),
]


@pytest.mark.parametrize("M,K,N,r,dtype,adapter_dtype,bias,p,seed", CASES)
def test_lora_linear_served_equals_fresh_and_oracle(M, K, N, r, dtype, adapter_dtype, bias, p, seed, device, builds):
    inputs = make_inputs(M, K, N, r, dtype, adapter_dtype, bias, device)
    with torch.no_grad():
        y = served_twice_and_fresh(lambda: linear(inputs, 2.0, p, seed), builds, "linear_plan")
    assert y.shape == (*inputs["x"].shape[:-1], N) and y._base is None
    keep = fusedlora.dropout_mask(seed, inputs["x"].shape, p, device) if p > 0 else None
    check_lora_linear(y, None, inputs, 2.0, keep, p)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("lead", [(2, 5), 70], ids=["one-launch-3d", "split-rows"])
def test_lora_add_served_equals_fresh_and_oracle(backend, lead, device, builds, monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    inputs = add_inputs(lead, 40, 24, 4, bf16, f32, device=device)
    args = [inputs[n] for n in ("base", "x", "lora_A", "lora_B")]
    with torch.no_grad():
        y = served_twice_and_fresh(lambda: fusedlora.lora_add(*args, 1.5, 0.2, seed=9), builds, "add_plan")
    keep = fusedlora.dropout_mask(9, inputs["x"].shape, 0.2, device)
    check_lora_add(y, None, inputs, 1.5, keep, 0.2, torch_ops=backend == "torch")


@pytest.mark.parametrize("M,L,R,ranks,dtype", [
    pytest.param(16, 3, 8, [8, 3, 5], f32, id="decode-ranks"),
    pytest.param((2, 9), 4, 16, None, bf16, id="decode-3d-bf16"),
    pytest.param(70, 3, 8, None, f32, id="split-rows"),
])
def test_multi_served_equals_fresh_and_oracle(M, L, R, ranks, dtype, device, builds):
    inputs = make_multi(M, 40, 24, L, R, dtype, f32, ranks, device=device)
    ids = torch.randint(-1, L, inputs["x"].shape[:-1], generator=torch.Generator().manual_seed(3)).to(device)
    batch = AdapterBatch(ids, L)
    args = [inputs[n] for n in MULTI]
    with torch.no_grad():
        y = served_twice_and_fresh(lambda: fusedlora.multi_lora_linear(*args, batch, inputs["ranks"]), builds,
                                   "multi_plan")
        other = AdapterBatch(torch.flip(ids, (-1,)), L)  # another batch of the same spec: its own ids read
        flipped = fusedlora.multi_lora_linear(*args, other, inputs["ranks"])
        assert builds["multi_plan"] == 2
    check_multi_lora_linear(y, None, inputs, ids)
    check_multi_lora_linear(flipped, None, inputs, other.ids)


def test_dora_served_equals_fresh_and_oracle(device, builds):
    from test_dora import check_dora, dora_inputs, dora_lengths, norm_condition
    inputs, scaling = dora_inputs(12, 40, 24, 4, f32, f32, True, 1.5), 1.5
    args = [inputs[n] for n in (*NAMES, "magnitude")]
    with torch.no_grad():
        y = served_twice_and_fresh(lambda: fusedlora.dora_linear(*args, scaling, 0.1, seed=4), builds, "dora_plan")
    keep = fusedlora.dropout_mask(4, inputs["x"].shape, 0.1, device)
    n64, kappa = norm_condition(inputs, scaling)
    check_dora(y, {}, dict(inputs, scaling=scaling, keep_mask=keep, dropout_p=0.1, weight_norm=n64), None,
               dora_lengths(12, 40, 24, 4, kappa))


def test_seed_none_draws_a_new_mask_every_call(device):
    """seed=None with dropout: each call draws its seed from torch's generator (a new mask each call),
    served by its plan or not; torch.manual_seed reproduces it."""
    inputs = make_inputs(16, 32, 24, 4, f32, device=device)
    add = add_inputs(16, 32, 24, 4, f32, device=device)
    dora = dict(inputs, magnitude=torch.rand(24, device=device) + 0.5)
    calls = {
        "lora_linear": lambda: linear(inputs, 2.0, 0.5),
        "lora_add": lambda: fusedlora.lora_add(*(add[n] for n in ("base", "x", "lora_A", "lora_B")), 2.0, 0.5),
        "dora_linear": lambda: fusedlora.dora_linear(*(dora[n] for n in (*NAMES, "magnitude")), 2.0, 0.5),
    }
    for name, fn in calls.items():
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                inputs["lora_A"].requires_grad_(grad)
                add["lora_A"].requires_grad_(grad)
                outs = []
                for step in range(3):
                    torch.manual_seed(step)
                    outs.append(fn().detach())
                torch.manual_seed(1)
                again = fn().detach()
                inputs["lora_A"].requires_grad_(False)
                add["lora_A"].requires_grad_(False)
            assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2]), (name, grad)
            assert torch.equal(again, outs[1]), (name, grad)
    torch.manual_seed(2)
    seed = int(fusedlora.core.dropout.draw_seed())
    torch.manual_seed(2)
    with torch.no_grad():
        y = linear(inputs, 2.0, 0.5)
    check_lora_linear(y, None, inputs, 2.0, fusedlora.dropout_mask(seed, inputs["x"].shape, 0.5, device), 0.5)


def test_per_call_values_are_read_on_every_call(device, builds):
    """Scaling, seed and the tensors' values are not in the key: a served call reads them."""
    inputs = make_inputs(8, 32, 24, 4, f32, device=device)
    linear(inputs, 1.0, 0.3, seed=1)
    for scaling, seed in ((1.0, 1), (2.5, 1), (2.5, 77), (-3.0, 77), (2, 77)):
        got = linear(inputs, scaling, 0.3, seed=seed)
        check_lora_linear(got, None, inputs, float(scaling), fusedlora.dropout_mask(seed, (8, 32), 0.3, device), 0.3)
    inputs["lora_B"].mul_(-2.0)  # a weight changed in place is read as it is now
    check_lora_linear(linear(inputs, 1.0, 0.3, seed=1), None, inputs, 1.0,
                      fusedlora.dropout_mask(1, (8, 32), 0.3, device), 0.3)
    assert builds["linear_plan"] == 1


def test_settings_are_in_the_key(device, monkeypatch, launches, builds):
    """FUSEDLORA_PLAN and FUSEDLORA_BACKEND take effect on the next call (torch's fp32 precision switch,
    which only a GPU build reads, is checked on the sm_90 host path below)."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    inputs = make_inputs(16, 32, 24, 4, f32, device=device)
    linear(inputs)
    assert launches == {"_lora_gemm_kernel": 1}
    monkeypatch.setenv("FUSEDLORA_PLAN", "split")
    launches.clear()
    check_lora_linear(linear(inputs), None, inputs, 2.0, None, 0.0)
    assert launches == {"_lora_shrink_kernel": 1, "_lora_gemm_kernel": 1}  # the shrink, the expand, addmm_
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    launches.clear()
    check_lora_linear(linear(inputs), None, inputs, 2.0, None, 0.0, torch_ops=True)
    assert not launches and builds["linear_plan"] == 3
    monkeypatch.setenv("FUSEDLORA_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FUSEDLORA_BACKEND"):
        linear(inputs)


def test_calls_needing_gradients_have_their_own_plans(device, builds):
    inputs = make_inputs(8, 32, 24, 4, f32, device=device)
    inputs["lora_A"].requires_grad_()
    y = linear(inputs)
    with torch.no_grad():
        assert not linear(inputs).requires_grad
    assert y.requires_grad and builds["linear_plan"] == 2


def _tensors_held(obj, seen=None):
    """Every tensor reachable from obj through closures, slotted or plain attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (type, str, bytes, int, float, bool, torch.dtype, torch.device)):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    found = []
    children = []
    if callable(obj) and getattr(obj, "__closure__", None):
        children += [c.cell_contents for c in obj.__closure__]
    if isinstance(obj, (tuple, list, set)):
        children += list(obj)
    if isinstance(obj, dict):
        children += list(obj.values())
    if type(obj).__module__.startswith("fusedlora"):
        children += [getattr(obj, s) for s in getattr(type(obj), "__slots__", ()) if hasattr(obj, s)]
        children += list(getattr(obj, "__dict__", {}).values())
    for child in children:
        found += _tensors_held(child, seen)
    return found


def test_plans_hold_no_tensor(device):
    """Plans keep specializations, never tensors: every call passes its own (a weight written in place or
    replaced is read as it is)."""
    inputs = make_inputs(16, 32, 24, 4, f32, device=device)
    multi = make_multi(16, 32, 24, 3, 8, f32, ranks=[8, 2, 5], device=device)
    batch = AdapterBatch(torch.arange(16, device=device) % 4 - 1, 3)
    with torch.no_grad():
        linear(inputs)
        fusedlora.multi_lora_linear(*(multi[n] for n in MULTI), batch, multi["ranks"])
    inputs["lora_A"].requires_grad_()
    linear(inputs).sum().backward()
    plans = [plan for sig in (fusedlora.ops.single.LINEAR, fusedlora.ops.multi.MULTI) for plan in sig.plans.values()]
    assert len(plans) == 3 and all(isinstance(p, CallPlan) for p in plans)
    for plan in plans:
        assert not _tensors_held(plan), plan


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
        call(good(device))  # the good call's plan, and every specialization a bad call shares with it
    assert fusedlora.ops.single.LINEAR.plans
    assert message() == cold
    assert all(w in cold for w in words)


def test_bad_values_after_a_warm_cache(device):
    """A warm call still checks the values its key leaves out: the scaling, the seed, the ranks, and
    the AdapterBatch against the layer."""
    inputs = make_inputs(8, 32, 24, 4, f32, device=device)
    linear(inputs, 1.0, 0.3, seed=1)
    with pytest.raises(ValueError, match="scaling must be finite"):
        linear(inputs, float("inf"), 0.3, seed=1)
    with pytest.raises(TypeError, match="scaling must be a real number"):
        linear(inputs, True, 0.3, seed=1)
    with pytest.raises(ValueError, match="seed must be an int in"):
        linear(inputs, 1.0, 0.3, seed=-1)
    with pytest.raises(TypeError, match="dropout_p must be a real number"):
        linear(inputs, 1.0, False, seed=1)  # False == 0: a value keyed with its type
    multi = make_multi(8, 32, 24, 3, 8, f32, ranks=[8, 2, 5], device=device)
    batch = AdapterBatch(torch.tensor([0, 1, 2, -1, 0, 1, 2, -1], device=device), 3)
    args = [multi[n] for n in MULTI]
    with torch.no_grad():
        fusedlora.multi_lora_linear(*args, batch, multi["ranks"])
        with pytest.raises(ValueError, match="ranks"):
            fusedlora.multi_lora_linear(*args, batch, torch.tensor([8, 9, 5], dtype=torch.int32, device=device))
        with pytest.raises(ValueError, match=r"AdapterBatch was built for 4 adapters, but lora_A .* holds L = 3$"):
            fusedlora.multi_lora_linear(*args, AdapterBatch(batch.ids, 4), multi["ranks"])


# The call paths a plan takes, each of which checks the per-call scalars itself: (rows, gradients, backend).
PATHS = {"one launch": (8, False, "triton"), "one launch, gradients": (8, True, "triton"), "rows": (70, False, "triton"),
         "rows, gradients": (70, True, "triton"), "torch backend": (8, False, "torch")}
BAD_SCALARS = [(float("inf"), 1, ValueError, "scaling must be finite"),
               (float("-inf"), 1, ValueError, "scaling must be finite"),
               (float("nan"), 1, ValueError, "scaling must be finite"),
               (True, 1, TypeError, "scaling must be a real number"),
               ("2", 1, TypeError, "scaling must be a real number"),
               (1.0, -1, ValueError, "seed must be an int in")]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("op", ["lora_linear", "lora_add", "dora_linear"])
def test_bad_scalars_after_a_warm_cache(op, path, device, monkeypatch):
    """Every path of a kept plan checks the scaling and the seed of each call, as the build did: with
    dropout and without (where the seed draws no mask, but a bad one is refused as at the build)."""
    rows, grad, backend = PATHS[path]
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    if op == "lora_linear":
        inputs = make_inputs(rows, 32, 24, 4, f32, device=device)
        args = [inputs[n] for n in NAMES]
        fn = fusedlora.lora_linear
    elif op == "lora_add":
        inputs = add_inputs(rows, 32, 24, 4, f32, device=device)
        args = [inputs[n] for n in ADD]
        fn = fusedlora.lora_add
    else:
        inputs = make_inputs(rows, 32, 24, 4, f32, device=device)
        args = [inputs[n] for n in NAMES] + [inputs["weight"].norm(dim=1)]
        fn = fusedlora.dora_linear
    inputs["lora_A"].requires_grad_(grad)
    for p in (0.3, 0.0):
        fn(*args, 1.0, p, 1)
        for scaling, seed, error, words in BAD_SCALARS:
            with pytest.raises(error, match=words):
                fn(*args, scaling, p, seed)


@pytest.mark.parametrize("op", ["lora_linear", "lora_add"])
def test_one_launch_calls_run_their_bound_launch(op, device, monkeypatch):
    """At up to ONE_LAUNCH_MAX_M rows a kept plan launches the kernel it bound, with and without
    gradients; an x (or base) that is not a view of its rows is copied first, and takes the unbound
    forward, which launches on the copy. The planner's own choice: a forced plan may launch otherwise."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    from fusedlora.plans import single
    unbound = collections.Counter()
    real = single._forward_of
    monkeypatch.setattr(single, "_forward_of", lambda *a, **k: unbound.update(["calls"]) or real(*a, **k))
    if op == "lora_linear":
        inputs = make_inputs(16, 32, 24, 4, f32, device=device)
        names, check, scaling = NAMES, check_lora_linear, 2.0
    else:
        inputs = add_inputs(16, 32, 24, 4, f32, device=device)
        names, check, scaling = ADD, check_lora_add, 2.0
    fn = getattr(fusedlora, op)
    for grad in (False, False, True, True):
        inputs["lora_A"].requires_grad_(grad)
        y = fn(*(inputs[n] for n in names), scaling, 0.25, 5)
        check(y.detach(), None, {n: t.detach() if t is not None else None for n, t in inputs.items()}, scaling,
              fusedlora.dropout_mask(5, (16, 32), 0.25, device), 0.25)
    assert unbound["calls"] == 0, "a one-launch call took the unbound forward"
    inputs["lora_A"].requires_grad_(False)
    strided = dict(inputs, x=inputs["x"].view(8, 2, 32).transpose(0, 1).contiguous().transpose(0, 1))  # (8, 2, 32)
    if op == "lora_add":
        strided["base"] = inputs["base"].view(8, 2, 24).transpose(0, 1).contiguous().transpose(0, 1)
    for _ in range(2):
        y = fn(*(strided[n] for n in names), scaling, 0.25, 5)
        check(y, None, strided, scaling, fusedlora.dropout_mask(5, (8, 2, 32), 0.25, device), 0.25)
    assert unbound["calls"] == 2


SM90_CHECK = r"""
import math
import sys
sys.path.insert(0, sys.argv[1])
import host
host.install_sm90_host_path()
import torch
from triton.runtime.jit import JITFunction
import fusedlora
from fusedlora.kernels import configs, launch

g = torch.Generator().manual_seed(0)

def aligned(shape, dtype, offset):
    # A tensor whose address is a multiple of 16 bytes (offset 0) or not (offset 1 element).
    n = math.prod(shape)
    t = torch.empty(n + 16, dtype=dtype)[offset:offset + n].view(shape)
    return t.copy_(torch.randn(shape, generator=g).to(dtype))

def calls(dtype):
    for M in (1, 16, 40):
        for off_x, off_w, off_a in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)):
            x = aligned((M, 96), dtype, off_x)
            W, b = aligned((80, 96), dtype, off_w), aligned((80,), dtype, off_w)
            A, B = aligned((16, 96), torch.float32, off_a), aligned((80, 16), torch.float32, off_a)
            mA, mB = torch.randn(3, 16, 96, generator=g), torch.randn(3, 80, 16, generator=g)
            s, ranks = torch.ones(3), torch.tensor([16, 5, 9], dtype=torch.int32)
            for p, seed in ((0.0, None), (0.1, 3), (0.1, 2**40 + 16), (0.1, 1)):
                for bias in (b, None):
                    yield fusedlora.lora_linear, (x, W, bias, A, B, 2.0, p, seed)
            yield fusedlora.lora_linear, (x.view(1, M, 96), W, b, A, B, 0.5, 0.0, None)
            Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()
            gy = torch.randn(M, 80, generator=g).to(dtype)
            for p, seed in ((0.0, None), (0.1, 3)):
                yield train_step, (x, W, b, Ag, Bg, gy, p, seed)
            yield train_step, (x, W, b, Ag, Bg, aligned((M, 80), dtype, 1), 0.0, None)  # dY off 16 bytes
            yield switch_step, (x, W, b, Ag, Bg, gy)
            base = aligned((M, 80), dtype, off_w)
            for p, seed in ((0.0, None), (0.1, 3), (0.1, 2**40 + 16)):
                yield fusedlora.lora_add, (base, x, A, B, 2.0, p, seed)
            yield add_train_step, (base, x, Ag, Bg, gy, 0.1, 5)
            yield add_train_step, (base, x, Ag, Bg, aligned((M, 80), dtype, 1), 0.1, 5)
            ids = torch.arange(M) % 4 - 1
            batch = fusedlora.AdapterBatch(ids, 3)
            for bias, r in ((b, ranks), (None, None)):
                yield fusedlora.multi_lora_linear, (x, W, bias, mA.to(dtype), mB.to(dtype), s, batch, r)
            shifted = fusedlora.AdapterBatch(torch.empty(M + 1, dtype=ids.dtype)[1:].copy_(ids), 3)  # ids off 16 bytes
            yield fusedlora.multi_lora_linear, (x, W, b, mA.to(dtype), mB.to(dtype), s, shifted, ranks)
            yield fusedlora.multi_lora_linear, (x, W, b, mA.to(dtype), mB.to(dtype), s.double(), batch, ranks)

def train_step(x, W, b, A, B, gy, p, seed):
    with torch.enable_grad():  # a call with gradients: forward and backward
        torch.autograd.grad(fusedlora.lora_linear(x, W, b, A, B, 2.0, p, seed), (A, B), gy)

def switch_step(x, W, b, A, B, gy):
    # torch's fp32 switch flipped between the forward and its backward: the backward follows the switch
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with torch.enable_grad():
        y = fusedlora.lora_linear(x, W, b, A, B, 2.0, 0.0, None)
        matmul.fp32_precision = "tf32" if before == "ieee" else "ieee"
        try:
            torch.autograd.grad(y, (A, B), gy)
        finally:
            matmul.fp32_precision = before

def add_train_step(base, x, A, B, gy, p, seed):
    with torch.enable_grad():
        torch.autograd.grad(fusedlora.lora_add(base, x, A, B, 2.0, p, seed), (A, B), gy)

def comparable(args):
    return tuple((a.dtype, a.data_ptr() % 16) if isinstance(a, torch.Tensor) else a for a in args)

PRECISIONS = ("ieee", "tf32")  # torch's fp32 matmul switch, which chooses fp32 dots' precision on a GPU

def each_call():
    for precision in PRECISIONS:
        torch.backends.cuda.matmul.fp32_precision = precision
        for dtype in (torch.float32, torch.bfloat16):
            for fn, args in calls(dtype):
                yield fn, args

def warm():
    with torch.no_grad():
        for fn, args in each_call():
            fn(*args)

def record(fast):
    if fast:  # the plans, and their compiled kernels, made with the fast launch on
        warm()
    host._Skipped.record = out = []
    plain = []
    original = JITFunction.run
    JITFunction.run = lambda self, *a, **k: plain.append(1) or original(self, *a, **k)
    try:
        with torch.no_grad():
            for fn, args in each_call():
                if not fast:
                    configs.clear_caches(tables=False)
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
assert fast_plain == 0, f"{fast_plain} launches took Triton's binder with the plans warm"
assert len(fast) == len(slow)
for i, (a, b) in enumerate(zip(fast, slow)):
    assert a == b, f"launch {i}: planned {a}\n plain {b}"
print("OK", len(fast), "launches")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above launch for real")
def test_planned_launch_matches_tritons_binder():
    """On benchmarks/host.py's sm_90 host path, calls served by kept plans (lora_linear's and lora_add's,
    with and without gradients, and multi_lora_linear's; x, W, the adapters, dY and the adapter ids each
    16-byte aligned or not; under both settings of torch's fp32 precision switch, and with the switch
    flipped between a forward and its backward) launch the compiled kernel Triton's binder picks, with
    the arguments it is given by a freshly built plan with the plain launch."""
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDLORA_FAST_LAUNCH",
                                                            "FUSEDLORA_BACKEND", "FUSEDLORA_PLAN")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SM90_CHECK, str(root / "benchmarks")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
