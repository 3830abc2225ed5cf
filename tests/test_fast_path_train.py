"""Eager lora_linear calls that need gradients, served from the per-shape cache (fusedlora/ops/eager_cache.py).
At the one-launch sizes (up to 64 rows, rank up to 64, the frozen base of LoRA training) an entry binds
the forward and the backward, one launch each; elsewhere the entry runs the full path without its
checks. Either way the output and every gradient equal the uncached path's bitwise and the float64
oracle's, for each subset of inputs that needs a gradient, with dropout, and for any dY the engine
passes (contiguous, expanded by a sum, transposed)."""
import pytest
import torch
from oracle import NAMES, check_lora_linear, make_inputs

import fusedlora
import fusedlora.functional
from fusedlora.ops import eager_cache as cache

f32, bf16 = torch.float32, torch.bfloat16


@pytest.fixture(autouse=True)
def cold_cache():
    cache._FAST.clear()
    yield
    cache._FAST.clear()


@pytest.fixture
def launches(monkeypatch):
    """Triton launches by kernel name."""
    from fusedlora.kernels.lora_backward import _lora_backward_kernel
    kind = type(_lora_backward_kernel)  # JITFunction, or the interpreter's stand-in
    seen = {}
    real = kind.run

    def run(self, *args, **kwargs):
        seen[self.fn.__name__] = seen.get(self.fn.__name__, 0) + 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(kind, "run", run)
    return seen


def call(fn, names, inputs, needs, dy_kind, p, seed):
    """(y, {name: grad}, dy) of fn(*inputs in `names` order, 1.5, p, seed) on fresh leaves, `needs` naming
    those that require a gradient."""
    leaves = {n: (t.detach().clone().requires_grad_(n in needs) if t is not None else None)
              for n, t in inputs.items()}
    y = fn(*(leaves[n] for n in names), 1.5, p, seed)
    if dy_kind == "sum":  # the engine passes an expanded tensor of ones (zero strides)
        dy = torch.ones_like(y)
        y.sum().backward()
    else:
        gen = torch.Generator().manual_seed(4)
        dy = torch.randn(y.shape[::-1] if dy_kind == "transposed" else y.shape, generator=gen).to(y.dtype).to(y.device)
        dy = dy.t() if dy_kind == "transposed" else dy
        y.backward(dy)
    return y.detach(), {n: leaves[n].grad for n in needs}, dy


def served(public, uncached, checks, one_launch, names, inputs, needs, dy_kind, p, seed, kind, monkeypatch, launches):
    """The public call twice (a miss, then served without running `checks`) and the uncached path:
    the entry is of `kind`, one launch each way when it is `one_launch`, every result bitwise the
    uncached one's. Returns the served call's (y, grads, dy)."""
    first = call(public, names, inputs, needs, dy_kind, p, seed)
    (entry,) = cache._FAST.values()
    assert type(entry).__name__ == kind
    with monkeypatch.context() as m:
        m.setattr(fusedlora.functional, checks, lambda *a: pytest.fail("the full path ran"))
        launches.clear()
        again = call(public, names, inputs, needs, dy_kind, p, seed)
        if kind == one_launch:
            assert launches == {"_lora_gemm_kernel": 1, "_lora_backward_kernel": 1}
    full = call(uncached, names, inputs, needs, dy_kind, p, seed)
    assert len(cache._FAST) == 1
    for y, grads, _ in (first, again):
        assert torch.equal(y, full[0])
        assert grads.keys() == set(needs) and all(torch.equal(grads[n], full[1][n]) for n in needs)
    return again


CASES = [
    # (M, K, N, r, dtype, adapter dtype, needs, p, seed, dY, entry)
    pytest.param(16, 70, 45, 3, bf16, f32, ("lora_A", "lora_B"), 0.0, None, "contiguous", "_Train", id="lora-bf16"),
    pytest.param(16, 70, 45, 3, f32, f32, ("x", "lora_A", "lora_B"), 0.25, 7, "sum", "_Train", id="x-dropout-sum"),
    pytest.param(24, 64, 40, 16, f32, f32, ("x",), 0.1, 3, "transposed", "_Train", id="x-only-transposed"),
    pytest.param(9, 40, 24, 8, f32, f32, ("lora_B",), 0.0, None, "contiguous", "_Train", id="B-only"),
    pytest.param(16, 40, 24, 8, f32, f32, ("weight", "lora_A"), 0.0, None, "contiguous", "_Full", id="weight-grad"),
    pytest.param(70, 40, 24, 8, f32, f32, ("lora_A", "lora_B"), 0.1, 2, "contiguous", "_Full", id="split-rows"),
]


@pytest.mark.parametrize("M,K,N,r,dtype,adapter_dtype,needs,p,seed,dy_kind,kind", CASES)
def test_served_matches_full_path_and_oracle(M, K, N, r, dtype, adapter_dtype, needs, p, seed, dy_kind, kind,
                                             device, monkeypatch, launches):
    inputs = make_inputs(M, K, N, r, dtype, adapter_dtype, True, device)
    y, grads, dy = served(fusedlora.lora_linear, fusedlora.ops.single.lora_linear, "check_lora_linear", "_Train",
                          NAMES, inputs, needs, dy_kind, p, seed, kind, monkeypatch, launches)
    keep = fusedlora.dropout_mask(seed, inputs["x"].shape, p, device) if p > 0 else None
    check_lora_linear(y, grads, inputs, 1.5, keep, p, dy)


def test_entry_keeps_no_tensor_and_sees_in_place_writes(device):
    """A weight written in place between steps (an optimizer step) is what the next served call reads."""
    inputs = make_inputs(16, 40, 24, 8, f32, device=device)
    A = inputs["lora_A"].clone().requires_grad_()
    for step in range(3):
        y = fusedlora.lora_linear(inputs["x"], inputs["weight"], inputs["bias"], A, inputs["lora_B"], 2.0)
        y.square().sum().backward()
        check_lora_linear(y.detach(), None, dict(inputs, lora_A=A.detach().clone()), 2.0, None, 0.0)
        with torch.no_grad():
            A -= 0.1 * A.grad
        A.grad = None
    (entry,) = cache._FAST.values()
    assert type(entry).__name__ == "_Train"
    assert not any(isinstance(getattr(entry, name), torch.Tensor) for name in type(entry).__slots__)


def test_the_key_holds_which_inputs_need_gradients(device):
    """The same tensors with and without gradients, and with other inputs needing them, are other keys."""
    inputs = make_inputs(16, 40, 24, 8, f32, device=device)
    A = inputs["lora_A"].clone().requires_grad_()
    fusedlora.lora_linear(inputs["x"], inputs["weight"], None, A, inputs["lora_B"], 2.0)
    with torch.no_grad():
        fusedlora.lora_linear(inputs["x"], inputs["weight"], None, A, inputs["lora_B"], 2.0)
    fusedlora.lora_linear(inputs["x"].requires_grad_(), inputs["weight"], None, A, inputs["lora_B"], 2.0)
    assert sorted(type(e).__name__ for e in cache._FAST.values()) == ["_OneLaunch", "_Train", "_Train"]


def test_settings_changed_before_backward_are_read(monkeypatch, device, launches):
    """FUSEDLORA_PLAN set between a served forward and its backward: the backward runs the plan it names,
    as the full path reads it there, and the gradients stay the oracle's."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    inputs = make_inputs(16, 40, 24, 8, f32, device=device)
    for step in range(2):  # the second forward is served
        leaves = {n: t.detach().clone().requires_grad_(n in ("lora_A", "lora_B")) for n, t in inputs.items()}
        y = fusedlora.lora_linear(*(leaves[n] for n in NAMES), 1.5)
        monkeypatch.setenv("FUSEDLORA_PLAN", "split")
        launches.clear()
        dy = torch.ones_like(y)
        y.backward(dy)
        monkeypatch.delenv("FUSEDLORA_PLAN")
        assert "_lora_backward_kernel" not in launches and launches.get("_lora_dy_kernel") == 1
        check_lora_linear(y.detach(), {n: leaves[n].grad for n in ("lora_A", "lora_B")}, inputs, 1.5, None, 0.0, dy)
    assert [type(e).__name__ for e in cache._FAST.values()] == ["_Train"]


ADD_NAMES = ("base", "x", "lora_A", "lora_B")
ADD_CASES = [
    # (lead, K, N, r, dtype, adapter dtype, needs, p, seed, dY, entry)
    pytest.param(16, 70, 45, 3, bf16, f32, ("base", "x", "lora_A", "lora_B"), 0.1, 5, "contiguous", "_AddTrain",
                 id="all-bf16-dropout"),
    pytest.param((2, 5), 40, 24, 8, f32, f32, ("lora_A", "lora_B"), 0.0, None, "sum", "_AddTrain", id="3d-sum"),
    pytest.param(12, 40, 24, 8, f32, f32, ("x", "lora_B"), 0.25, 3, "transposed", "_AddTrain", id="x-B-transposed"),
    pytest.param(70, 40, 24, 8, f32, f32, ("base", "lora_A"), 0.1, 2, "contiguous", "_Added", id="split-rows"),
]


@pytest.mark.parametrize("lead,K,N,r,dtype,adapter_dtype,needs,p,seed,dy_kind,kind", ADD_CASES)
def test_lora_add_served_with_gradients(lead, K, N, r, dtype, adapter_dtype, needs, p, seed, dy_kind, kind, device,
                                        monkeypatch, launches):
    """lora_add's calls with gradients: the same bitwise as its uncached path, the oracle's, one launch
    each way at the one-launch sizes; the base's gradient is dY itself."""
    from oracle import check_lora_add
    from test_lora_add import add_inputs
    inputs = add_inputs(lead, K, N, r, dtype, adapter_dtype, device)
    y, grads, dy = served(fusedlora.lora_add, fusedlora.ops.single.lora_add, "check_lora_add", "_AddTrain",
                          ADD_NAMES, inputs, needs, dy_kind, p, seed, kind, monkeypatch, launches)
    keep = fusedlora.dropout_mask(seed, inputs["x"].shape, p, device) if p > 0 else None
    check_lora_add(y, grads, inputs, 1.5, keep, p, dy)
