"""Calls with gradients run their call plans through PlannedCall (fusedlora/ops/call.py). At the one-launch
sizes (up to 64 rows, rank up to 64, the frozen base of LoRA training) the plan binds the forward and,
per specialization of dY, the backward: one launch each. Either way the output and every gradient equal
a freshly built plan's bitwise and the float64 oracle's, for each subset of inputs that needs a gradient,
with dropout, and for any dY the engine passes (contiguous, expanded by a sum, transposed), including a
dY of another specialization than the previous backward's."""
import collections

import pytest
import torch
from oracle import NAMES, check_lora_add, check_lora_linear, check_multi_lora_linear, make_inputs
from test_lora_add import add_inputs
from test_multi_lora import make_multi

import fusedlora
import fusedlora.ops.multi
import fusedlora.ops.single
from fusedlora import AdapterBatch
from fusedlora.core import knobs
from fusedlora.kernels import configs

f32, bf16 = torch.float32, torch.bfloat16
ADD_NAMES = ("base", "x", "lora_A", "lora_B")


@pytest.fixture(autouse=True)
def cold():
    configs.clear_caches(tables=False)
    yield
    configs.clear_caches(tables=False)


@pytest.fixture
def launches(monkeypatch):
    """Triton launches by kernel name."""
    from fusedlora.kernels.lora_backward import _lora_backward_kernel
    kind = type(_lora_backward_kernel)  # JITFunction, or the interpreter's stand-in
    seen = collections.Counter()
    real = kind.run

    def run(self, *args, **kwargs):
        seen[self.fn.__name__] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(kind, "run", run)
    return seen


def _dy(y, dy_kind):
    if dy_kind == "sum":  # what y.sum().backward() passes: a tensor of ones expanded (zero strides)
        return torch.ones((), dtype=y.dtype, device=y.device).expand(y.shape)
    gen = torch.Generator().manual_seed(4)
    dy = torch.randn(y.shape[::-1] if dy_kind == "transposed" else y.shape, generator=gen).to(y.dtype).to(y.device)
    return dy.t() if dy_kind == "transposed" else dy


def call(fn, names, inputs, needs, dy_kind, p, seed):
    """(y, {name: grad}, dy) of fn(*inputs in `names` order, 1.5, p, seed) on fresh leaves, `needs` naming
    those that require a gradient; the backward through y.sum() for dy_kind "sum"."""
    leaves = {n: (t.detach().clone().requires_grad_(n in needs) if t is not None else None)
              for n, t in inputs.items()}
    y = fn(*(leaves[n] for n in names), 1.5, p, seed)
    dy = _dy(y, dy_kind)
    if dy_kind == "sum":
        y.sum().backward()
    else:
        y.backward(dy)
    return y.detach(), {n: leaves[n].grad for n in needs}, dy


def served(public, names, inputs, needs, dy_kind, p, seed, one_launch, launches):
    """The call twice (a build, then served by the kept plan) and once more after the caches are emptied:
    one launch each way when one_launch and the planner chooses (under a FUSEDLORA_PLAN the forced plan
    launches what it launches), every result bitwise the fresh plan's. Returns the served call's (y, grads, dy)."""
    first = call(public, names, inputs, needs, dy_kind, p, seed)
    launches.clear()
    again = call(public, names, inputs, needs, dy_kind, p, seed)
    if one_launch and knobs.plan() == "auto":
        assert launches == {"_lora_gemm_kernel": 1, "_lora_backward_kernel": 1}
    configs.clear_caches(tables=False)
    fresh = call(public, names, inputs, needs, dy_kind, p, seed)
    for y, grads, _ in (first, again):
        assert torch.equal(y, fresh[0])
        assert grads.keys() == set(needs) and all(torch.equal(grads[n], fresh[1][n]) for n in needs)
    return again


CASES = [
    # (M, K, N, r, dtype, adapter dtype, needs, p, seed, dY, one launch each way)
    pytest.param(16, 70, 45, 3, bf16, f32, ("lora_A", "lora_B"), 0.0, None, "contiguous", True, id="lora-bf16"),
    pytest.param(16, 70, 45, 3, f32, f32, ("x", "lora_A", "lora_B"), 0.25, 7, "sum", True, id="x-dropout-sum"),
    pytest.param(24, 64, 40, 16, f32, f32, ("x",), 0.1, 3, "transposed", False, id="x-only-transposed"),
    pytest.param(9, 40, 24, 8, f32, f32, ("lora_B",), 0.0, None, "contiguous", True, id="B-only"),
    pytest.param(16, 40, 24, 8, f32, f32, ("weight", "bias", "lora_A"), 0.0, None, "contiguous", True,
                 id="weight-grad"),
    pytest.param(70, 40, 24, 8, f32, f32, ("lora_A", "lora_B"), 0.1, 2, "contiguous", False, id="split-rows"),
]


@pytest.mark.parametrize("M,K,N,r,dtype,adapter_dtype,needs,p,seed,dy_kind,one", CASES)
def test_lora_linear_served_matches_fresh_and_oracle(M, K, N, r, dtype, adapter_dtype, needs, p, seed, dy_kind,
                                                     one, device, launches):
    inputs = make_inputs(M, K, N, r, dtype, adapter_dtype, True, device)
    y, grads, dy = served(fusedlora.lora_linear, NAMES, inputs, needs, dy_kind, p, seed, one, launches)
    keep = fusedlora.dropout_mask(seed, inputs["x"].shape, p, device) if p > 0 else None
    check_lora_linear(y, grads, inputs, 1.5, keep, p, dy)


ADD_CASES = [
    # (lead, K, N, r, dtype, adapter dtype, needs, p, seed, dY, one launch each way)
    pytest.param(16, 70, 45, 3, bf16, f32, ("base", "x", "lora_A", "lora_B"), 0.1, 5, "contiguous", True,
                 id="all-bf16-dropout"),
    pytest.param((2, 5), 40, 24, 8, f32, f32, ("lora_A", "lora_B"), 0.0, None, "sum", True, id="3d-sum"),
    pytest.param(12, 40, 24, 8, f32, f32, ("x", "lora_B"), 0.25, 3, "transposed", False, id="x-B-transposed"),
    pytest.param(70, 40, 24, 8, f32, f32, ("base", "lora_A"), 0.1, 2, "contiguous", False, id="split-rows"),
]


@pytest.mark.parametrize("lead,K,N,r,dtype,adapter_dtype,needs,p,seed,dy_kind,one", ADD_CASES)
def test_lora_add_served_matches_fresh_and_oracle(lead, K, N, r, dtype, adapter_dtype, needs, p, seed, dy_kind, one,
                                                  device, launches):
    """lora_add's calls with gradients; the base's gradient is dY itself."""
    inputs = add_inputs(lead, K, N, r, dtype, adapter_dtype, device)
    y, grads, dy = served(fusedlora.lora_add, ADD_NAMES, inputs, needs, dy_kind, p, seed, one, launches)
    keep = fusedlora.dropout_mask(seed, inputs["x"].shape, p, device) if p > 0 else None
    check_lora_add(y, grads, inputs, 1.5, keep, p, dy)


@pytest.mark.parametrize("fn,names", [(fusedlora.lora_linear, NAMES), (fusedlora.lora_add, ADD_NAMES)],
                         ids=["lora_linear", "lora_add"])
def test_backward_of_another_dy_specialization(fn, names, device):
    """One plan, backward after backward with dY's strides changing (contiguous, then the zero strides of
    y.sum(), then transposed, then contiguous again): each backward its own binding, the oracle's
    gradients."""
    inputs = (make_inputs(16, 40, 24, 8, f32, device=device) if fn is fusedlora.lora_linear
              else add_inputs(16, 40, 24, 8, f32, device=device))
    needs = ("x", "lora_A", "lora_B")
    check = check_lora_linear if fn is fusedlora.lora_linear else check_lora_add
    for dy_kind in ("contiguous", "sum", "transposed", "contiguous"):
        y, grads, dy = call(fn, names, inputs, needs, dy_kind, 0.2, 11)
        check(y, grads, inputs, 1.5, fusedlora.dropout_mask(11, (16, 40), 0.2, device), 0.2, dy)
    signature = fusedlora.ops.single.LINEAR if fn is fusedlora.lora_linear else fusedlora.ops.single.ADD
    assert len(signature.plans) == 1


@pytest.mark.parametrize("fn,names,need", [(fusedlora.lora_linear, NAMES, n) for n in NAMES]
                         + [(fusedlora.lora_add, ADD_NAMES, n) for n in ADD_NAMES],
                         ids=[f"lora_linear-{n}" for n in NAMES] + [f"lora_add-{n}" for n in ADD_NAMES])
def test_which_inputs_need_gradients_is_a_key_component(fn, names, need, device):
    """After a warm call with lora_A alone needing a gradient, a call where `need` alone needs one: its
    own plan, and exactly the oracle's gradient of `need` (a plan bound for lora_A's would compute dA)."""
    linear = fn is fusedlora.lora_linear
    inputs = make_inputs(16, 40, 24, 8, f32, device=device) if linear else add_inputs(16, 40, 24, 8, f32, device=device)
    call(fn, names, inputs, ("lora_A",), "contiguous", 0.0, None)
    y, grads, dy = call(fn, names, inputs, (need,), "contiguous", 0.0, None)
    signature = fusedlora.ops.single.LINEAR if linear else fusedlora.ops.single.ADD
    assert len(signature.plans) == (1 if need == "lora_A" else 2)
    (check_lora_linear if linear else check_lora_add)(y, grads, inputs, 1.5, None, 0.0, dy)


MULTI_NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


@pytest.mark.parametrize("need", MULTI_NAMES)
def test_which_inputs_need_gradients_is_a_key_component_of_multi(need, device):
    inputs = make_multi(16, 40, 24, 3, 8, f32, device=device)
    ids = torch.randint(-1, 3, (16,), generator=torch.Generator().manual_seed(2)).to(device)
    batch = AdapterBatch(ids, 3)
    dy = torch.randn(16, 24, generator=torch.Generator().manual_seed(5)).to(device)

    def step(needs):
        leaves = {n: inputs[n].detach().clone().requires_grad_(n in needs) for n in (*MULTI_NAMES, "scalings")}
        y = fusedlora.multi_lora_linear(*(leaves[n] for n in (*MULTI_NAMES, "scalings")), batch, None)
        y.backward(dy)
        return y.detach(), {n: leaves[n].grad for n in needs}

    step(("lora_A",))
    y, grads = step((need,))
    assert len(fusedlora.ops.multi.MULTI.plans) == (1 if need == "lora_A" else 2)
    check_multi_lora_linear(y, grads, inputs, ids, dy)


def test_plan_keeps_no_tensor_and_sees_in_place_writes(device):
    """A weight written in place between steps (an optimizer step) is what the next call reads."""
    inputs = make_inputs(16, 40, 24, 8, f32, device=device)
    A = inputs["lora_A"].clone().requires_grad_()
    for step in range(3):
        y = fusedlora.lora_linear(inputs["x"], inputs["weight"], inputs["bias"], A, inputs["lora_B"], 2.0)
        y.square().sum().backward()
        check_lora_linear(y.detach(), None, dict(inputs, lora_A=A.detach().clone()), 2.0, None, 0.0)
        with torch.no_grad():
            A -= 0.1 * A.grad
        A.grad = None
    assert len(fusedlora.ops.single.LINEAR.plans) == 1


def test_settings_changed_before_backward_are_read(monkeypatch, device, launches):
    """FUSEDLORA_PLAN set between a forward and its backward: the backward runs the plan it names, as a
    backward planned from scratch would, and the gradients stay the oracle's."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    inputs = make_inputs(16, 40, 24, 8, f32, device=device)
    for step in range(2):  # the second forward is served by the kept plan
        leaves = {n: t.detach().clone().requires_grad_(n in ("lora_A", "lora_B")) for n, t in inputs.items()}
        y = fusedlora.lora_linear(*(leaves[n] for n in NAMES), 1.5)
        monkeypatch.setenv("FUSEDLORA_PLAN", "split")
        launches.clear()
        dy = torch.ones_like(y)
        y.backward(dy)
        monkeypatch.delenv("FUSEDLORA_PLAN")
        assert "_lora_backward_kernel" not in launches and launches.get("_lora_dy_kernel") == 1
        check_lora_linear(y.detach(), {n: leaves[n].grad for n in ("lora_A", "lora_B")}, inputs, 1.5, None, 0.0, dy)
    assert len(fusedlora.ops.single.LINEAR.plans) == 1


@pytest.mark.parametrize("M", [16, 70], ids=["decode", "split"])
def test_multi_with_gradients_served_matches_fresh_and_oracle(M, device):
    """multi_lora_linear's calls with gradients run their plans too; the batch is the plan's state."""
    inputs = make_multi(M, 40, 24, 3, 8, f32, ranks=[8, 3, 5], device=device)
    ids = torch.randint(-1, 3, (M,), generator=torch.Generator().manual_seed(2)).to(device)
    batch = AdapterBatch(ids, 3)
    order = ("x", "weight", "bias", "lora_A", "lora_B", "scalings")
    dy = torch.randn(M, 24, generator=torch.Generator().manual_seed(5)).to(device)

    def step():
        leaves = {n: inputs[n].detach().clone().requires_grad_(n in ("x", "lora_A", "lora_B")) for n in order}
        y = fusedlora.multi_lora_linear(*(leaves[n] for n in order), batch, inputs["ranks"])
        y.backward(dy)
        return y.detach(), {n: leaves[n].grad for n in ("x", "lora_A", "lora_B")}

    first, again = step(), step()
    assert len(fusedlora.ops.multi.MULTI.plans) == 1
    configs.clear_caches(tables=False)
    fresh = step()
    for y, grads in (first, again):
        assert torch.equal(y, fresh[0]) and all(torch.equal(grads[n], fresh[1][n]) for n in grads)
    check_multi_lora_linear(again[0], again[1], inputs, ids, dy)


# ---- the bound backward: keyed by dY's specialization, which inputs need a gradient, the settings ------

@pytest.fixture
def bindings(monkeypatch):
    """How many backward runs the plans bound (one per key of the bound backward)."""
    from fusedlora.plans import single
    count = collections.Counter()
    real = single._backward_run

    def counted(*args, **kwargs):
        count["bound"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(single, "_backward_run", counted)
    return count


def _step(fn, names, inputs, needs, dy):
    """(y, grads) of fn on fresh leaves with y.backward(dy)."""
    leaves = {n: (t.detach().clone().requires_grad_(n in needs) if t is not None else None) for n, t in inputs.items()}
    y = fn(*(leaves[n] for n in names), 1.5, 0.2, 11)
    y.backward(dy)
    return y.detach(), {n: leaves[n].grad for n in needs}


def _unaligned(t):
    buffer = torch.empty(t.numel() + 16, dtype=t.dtype, device=t.device)
    offset = 1 if buffer.data_ptr() % 16 == 0 else 0
    return buffer[offset:offset + t.numel()].view(t.shape).copy_(t)


BOUND = [(fusedlora.lora_linear, NAMES, check_lora_linear), (fusedlora.lora_add, ADD_NAMES, check_lora_add)]


class Sub(torch.Tensor):
    """A tensor subclass: another type, the same plan."""


DY_CHANGES = {"alignment": _unaligned, "type": lambda t: t.as_subclass(Sub)}


@pytest.mark.parametrize("change", list(DY_CHANGES))
@pytest.mark.parametrize("fn,names,check", BOUND, ids=["lora_linear", "lora_add"])
def test_bound_backward_is_keyed_by_dys_specialization(fn, names, check, change, device, bindings):
    """dY changed in one component after a backward of the same plan (its address off a 16-byte
    boundary, which Triton specializes pointers on; its type): its own binding, the oracle's gradients.
    Its strides: test_backward_of_another_dy_specialization; its shape and dtype are y's."""
    inputs = (make_inputs if fn is fusedlora.lora_linear else add_inputs)(16, 40, 24, 8, f32, device=device)
    needs = ("x", "lora_A", "lora_B")
    dy = torch.randn(16, 24, generator=torch.Generator().manual_seed(4)).to(device)
    keep = fusedlora.dropout_mask(11, (16, 40), 0.2, device)
    for count, g in enumerate((dy, DY_CHANGES[change](dy)), 1):
        y, grads = _step(fn, names, inputs, needs, g)
        assert bindings["bound"] == count
        check(y, grads, inputs, 1.5, keep, 0.2, g.as_subclass(torch.Tensor))
    assert len(fusedlora.ops.single.LINEAR.plans) + len(fusedlora.ops.single.ADD.plans) == 1


@pytest.mark.parametrize("fn,names,check", BOUND, ids=["lora_linear", "lora_add"])
def test_bound_backward_is_keyed_by_the_settings(fn, names, check, monkeypatch, device, launches, bindings):
    """A backward bound under the default plan (one launch at 16 rows), then a served forward whose
    backward runs with FUSEDLORA_PLAN=split: bound again, the split plan's launches, the oracle's
    gradients."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    inputs = (make_inputs if fn is fusedlora.lora_linear else add_inputs)(16, 40, 24, 8, f32, device=device)
    needs = ("x", "lora_A", "lora_B")
    dy = torch.randn(16, 24, generator=torch.Generator().manual_seed(4)).to(device)
    keep = fusedlora.dropout_mask(11, (16, 40), 0.2, device)
    check(*_step(fn, names, inputs, needs, dy), inputs, 1.5, keep, 0.2, dy)
    leaves = {n: t.detach().clone().requires_grad_(n in needs) for n, t in inputs.items() if t is not None}
    y = fn(*(leaves.get(n) for n in names), 1.5, 0.2, 11)
    monkeypatch.setenv("FUSEDLORA_PLAN", "split")
    launches.clear()
    y.backward(dy)
    assert bindings["bound"] == 2
    assert "_lora_backward_kernel" not in launches and launches.get("_lora_dy_kernel") == 1
    check(y.detach(), {n: leaves[n].grad for n in needs}, inputs, 1.5, keep, 0.2, dy)


def test_bound_backward_is_keyed_by_fp32_precision(device, bindings):
    """torch's fp32 switch changed between a float32 forward and its backward: bound again."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9")
    before = matmul.fp32_precision
    inputs = make_inputs(16, 40, 24, 8, f32, device=device)
    dy = torch.randn(16, 24, generator=torch.Generator().manual_seed(4)).to(device)
    keep = fusedlora.dropout_mask(11, (16, 40), 0.2, device)
    try:
        matmul.fp32_precision = "ieee"
        _step(fusedlora.lora_linear, NAMES, inputs, ("lora_A",), dy)
        leaves = {n: t.detach().clone().requires_grad_(n == "lora_A") for n, t in inputs.items()}
        y = fusedlora.lora_linear(*(leaves[n] for n in NAMES), 1.5, 0.2, 11)
        matmul.fp32_precision = "tf32"
        y.backward(dy)
    finally:
        matmul.fp32_precision = before
    assert bindings["bound"] == 2 and len(fusedlora.ops.single.LINEAR.plans) == 1
    check_lora_linear(y.detach(), {"lora_A": leaves["lora_A"].grad}, inputs, 1.5, keep, 0.2, dy)


def test_bound_backward_is_keyed_by_which_gradients_are_asked(device, bindings):
    """The torch.compile backward op takes the flags from autograd, for one forward plan (the op's, with
    every gradient): for the same dY, each set of flags is bound and gives exactly the oracle's
    gradients of its inputs."""
    from fusedlora.ops.single import lora_linear_backward_op, lora_linear_op
    inputs = make_inputs(16, 40, 24, 8, f32, device=device)
    x, W, b, A, B = (inputs[n] for n in NAMES)
    seed = torch.tensor(11)
    y, S = lora_linear_op(x, W, b, A, B, 1.5, 0.2, seed)
    dy = torch.randn(16, 24, generator=torch.Generator().manual_seed(4)).to(device)
    keep = fusedlora.dropout_mask(11, (16, 40), 0.2, device)
    sets = (("lora_A",), ("x",), ("lora_A", "lora_B"), ("weight",), ("bias",), ("weight", "lora_A"), ("bias", "lora_B"))
    for count, needs in enumerate(sets, 1):
        grads = lora_linear_backward_op(dy, x, W, A, B, S, 1.5, 0.2, seed, [n in needs for n in NAMES])
        assert bindings["bound"] == count and len(grads) == len(needs)
        check_lora_linear(y, dict(zip(needs, grads)), inputs, 1.5, keep, 0.2, dy)


def test_multi_bound_backward_is_keyed_by_which_gradients_are_asked(device, monkeypatch):
    """The torch.compile backward op of multi_lora_linear takes the flags from autograd, for one forward
    plan (the op's, with every gradient): for the same dY, each set of flags of (x, weight, bias, lora_A,
    lora_B) is bound once and gives exactly the oracle's gradients of its inputs, whichever flag tells
    two sets apart (the last, lora_B's, included)."""
    from fusedlora.ops.multi import multi_lora_linear_backward_op, multi_lora_linear_op
    from fusedlora.plans import multi
    bound = collections.Counter()
    real = multi._backward_run
    monkeypatch.setattr(multi, "_backward_run", lambda *a, **k: bound.update(["bound"]) or real(*a, **k))
    inputs = make_multi(8, 40, 24, 3, 8, f32, ranks=[8, 3, 5], device=device)
    ids = torch.tensor([0, 2, -1, 1, 1, 0, 2, -1], device=device)
    x, W, b, A, B, s, ranks = (inputs[n] for n in (*MULTI_NAMES, "scalings", "ranks"))
    y, S = multi_lora_linear_op(x, W, b, A, B, s, ids, ranks, None, None, None)
    dy = torch.randn(8, 24, generator=torch.Generator().manual_seed(4)).to(device)
    sets = (("lora_A",), ("lora_A", "lora_B"), ("x",), ("x", "lora_B"), ("lora_B",), ("weight",), ("bias",))
    for count, needs in enumerate(sets, 1):
        grads = multi_lora_linear_backward_op(dy, x, W, A, B, s, ids, ranks, S, None, None, None,
                                              [n in needs for n in MULTI_NAMES])
        assert bound["bound"] == count and len(grads) == len(needs)
        check_multi_lora_linear(y, dict(zip(needs, grads)), inputs, ids, dy)


def test_plans_with_gradients_leave_no_global_hook(device):
    """A plan with gradients keeps its bound backwards in a cache of its own, dropped with the plan: it
    registers nothing with configs.clear_caches, whose hooks live as long as the process (one per plan
    built would keep every plan's bindings alive and grow without bound)."""
    multi = make_multi(8, 40, 24, 3, 8, f32, device=device)
    single = make_inputs(8, 40, 24, 8, f32, device=device)
    batch = AdapterBatch(torch.tensor([0, 2, -1, 1, 1, 0, 2, -1], device=device), 3)

    def steps():
        A = multi["lora_A"].clone().requires_grad_()
        fusedlora.multi_lora_linear(multi["x"], multi["weight"], None, A, multi["lora_B"], multi["scalings"],
                                    batch, None).sum().backward()
        A = single["lora_A"].clone().requires_grad_()
        fusedlora.lora_linear(single["x"], single["weight"], None, A, single["lora_B"], 2.0).sum().backward()

    steps()  # anything registered once per process (a first import, a first table) is registered by now
    hooks = len(configs.CLEAR_HOOKS)
    for _ in range(3):
        configs.clear_caches(tables=False)
        steps()
    assert len(configs.CLEAR_HOOKS) == hooks
