"""lora_linear's and lora_add's call plans (fusedlora/plans/single.py) where a result cannot tell a plan
from another: which launches a call makes. A dropout variant at p = 0, the general backward where the
one-launch backward applies, or the unbound forward where the bound one applies all give the right
numbers, more slowly; these tests see the launches. Results: tests/test_call_plans.py and
tests/test_call_plans_train.py."""
import collections

import pytest
import torch
from oracle import NAMES, check_lora_linear, make_inputs
from test_call_plans import ADD, cold  # noqa: F401 (a fixture)
from test_lora_add import add_inputs

import fusedlora
from fusedlora.kernels.lora_backward import MAX_RANK


@pytest.fixture
def launches(monkeypatch):
    """[(kernel name, HAS_DROPOUT)] of every Triton launch, in order."""
    from fusedlora.kernels.lora_gemm import _lora_gemm_kernel
    kind = type(_lora_gemm_kernel)  # JITFunction, or the interpreter's stand-in
    seen = []
    real = kind.run

    def run(self, *args, **kwargs):
        seen.append((self.fn.__name__, kwargs.get("HAS_DROPOUT")))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(kind, "run", run)
    return seen


@pytest.fixture
def auto(monkeypatch):
    """The planner's own choice of plan (a forced FUSEDLORA_PLAN launches otherwise)."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)


def _inputs(op, M, N=24, grad=(), K=32):
    inputs = make_inputs(M, K, N, 4, torch.float32) if op == "lora_linear" else add_inputs(M, K, N, 4, torch.float32)
    for name in grad:
        inputs[name].requires_grad_(True)
    return inputs, (NAMES if op == "lora_linear" else ADD)


@pytest.mark.parametrize("op", ["lora_linear", "lora_add"])
@pytest.mark.parametrize("M", [16, 200])  # the one-launch forward and backward; the general ones
def test_no_launch_takes_the_dropout_variant_at_p_0(op, M, launches):
    """At p = 0 no launch, forward or backward, is a dropout variant (whose mask keeps everything: the same
    numbers, more work); at p > 0 the launches that apply the mask are. Under any plan."""
    for p in (0.0, 0.25):
        inputs, names = _inputs(op, M, grad=("x", "lora_A", "lora_B"))
        launches.clear()
        getattr(fusedlora, op)(*(inputs[n] for n in names), 2.0, p, 5).sum().backward()
        dropout = [name for name, flag in launches if flag]
        assert launches and (dropout if p else not dropout), (p, launches)


@pytest.mark.parametrize("M,N", [(1, 24), (16, 1), (16, 0), (0, 24)])
def test_one_launch_forward_down_to_one_row_or_output_feature(M, N, launches, auto, monkeypatch):
    """At one row (a decode step) or one output feature the planner's one-launch forward runs its bound
    launch; at no output feature or no row the call returns its empty output and launches nothing
    (binding and launching an empty grid is host work for nothing; N = 0 used to fail viewing the
    output as (-1, 0))."""
    from fusedlora.plans import single
    unbound = collections.Counter()
    real = single._forward_of
    monkeypatch.setattr(single, "_forward_of", lambda *a, **k: unbound.update(["calls"]) or real(*a, **k))
    inputs, _ = _inputs("lora_linear", M, N=N)
    for _ in range(2):
        y = fusedlora.lora_linear(*(inputs[n] for n in NAMES), 2.0)
        assert y.shape == (M, N)
        if M and N:
            check_lora_linear(y, None, inputs, 2.0, None, 0.0)
    assert unbound["calls"] == (0 if M and N else 2)
    assert [name for name, _ in launches] == ["_lora_gemm_kernel"] * (2 if M and N else 0)


@pytest.mark.parametrize("K", [32, 2 * MAX_RANK])  # the kernel's bound is on the rank, not on K
@pytest.mark.parametrize("grad", [("x",), ("lora_A",), ("x", "lora_B")])
def test_one_launch_backward_for_any_adapter_gradient_or_dx(grad, K, launches, auto, monkeypatch):
    """At up to 64 rows the fused plan's backward is its bound launch whichever of dX, dA and dB are asked
    (dX alone too: a frozen adapter in a stack of trained layers), with a contiguous dY or the stride-0
    dY of y.sum().backward(), not the unbound backward (the same kernel, bound on every call); the
    gradients match float64."""
    from fusedlora.plans import single
    unbound = collections.Counter()
    real = single.backward
    monkeypatch.setattr(single, "backward", lambda *a, **k: unbound.update(["calls"]) or real(*a, **k))
    for dy_kind in ("contiguous", "sum"):
        inputs, _ = _inputs("lora_linear", 16, grad=grad, K=K)
        y = fusedlora.lora_linear(*(inputs[n] for n in NAMES), 2.0)
        dy = torch.ones((), dtype=y.dtype).expand(y.shape) if dy_kind == "sum" else torch.randn_like(y)
        launches.clear()
        got = torch.autograd.grad(y, [inputs[n] for n in grad], dy)
        assert [name for name, _ in launches] == ["_lora_backward_kernel"], (dy_kind, launches)
        assert unbound["calls"] == 0, dy_kind
        check_lora_linear(y.detach(), dict(zip(grad, got)), {n: t.detach() if t is not None else None
                                                            for n, t in inputs.items()}, 2.0, None, 0.0, dy=dy)


@pytest.mark.parametrize("op", ["lora_linear", "lora_add"])
@pytest.mark.parametrize("rows,grad", [(16, False), (16, True), (200, False), (200, True)])
def test_a_float_scaling_is_checked_inline(op, rows, grad, monkeypatch):
    """A served call with a finite float scaling checks it inline, on every path: the general scalar
    check (a function call per layer call, host time at decode sizes) is for the build and for other
    types. An infinite one is still refused (tests/test_call_plans.py)."""
    from fusedlora.plans import single
    inputs, names = _inputs(op, rows, grad=("lora_A",) if grad else ())
    fn = getattr(fusedlora, op)
    fn(*(inputs[n] for n in names), 2.0)
    checked = collections.Counter()
    real = single.require_scalar
    monkeypatch.setattr(single, "require_scalar", lambda *a, **k: checked.update([a[0]]) or real(*a, **k))
    fn(*(inputs[n] for n in names), 1.5)
    assert not checked, checked
