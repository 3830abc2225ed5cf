"""The planner's multi-adapter choices, FUSEDLORA_PLAN, and that each call runs the path chosen."""
import pytest
import torch
from oracle import check_multi_lora_linear
from test_multi_lora import ids_for, make_multi

import fusedlora
import fusedlora.plans.multi
from fusedlora.kernels import configs
from fusedlora.kernels.multi_decode import DECODE_MAX_ROWS
from fusedlora.plans import planner

ARGS = ("x", "weight", "bias", "lora_A", "lora_B", "scalings")


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("M,want", [(0, "split"), (1, "decode"), (16, "decode"), (64, "decode"), (65, "split"),
                                    (4096, "split"), (16384, "split")])
def test_auto_is_decode_where_it_serves_else_split(direction, M, want, monkeypatch):
    """No measured shape had the fused plan faster (planner.py), so auto never takes it; the decode
    kernels serve 1 to MULTI_DECODE_MAX_M rows, their own limit."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    assert planner.MULTI_DECODE_MAX_M == DECODE_MAX_ROWS == 64
    for K, N, R, L in ((4096, 4096, 16, 64), (4096, 14336, 64, 8), (8192, 8192, 8, 1)):
        assert planner.choose_multi(direction, M, K, N, R, L) == want


@pytest.mark.parametrize("forced,small,large", [("fused", "fused", "fused"), (" Fused ", "fused", "fused"),
                                                ("split", "split", "split"), ("decode", "decode", "split")])
def test_forcing(forced, small, large, monkeypatch):
    """A forced plan serves every call; decode, where its kernels cannot (M = 0 or above their limit),
    runs the split plan."""
    monkeypatch.setenv("FUSEDLORA_PLAN", forced)
    for M, want in ((1, small), (64, small), (0, large), (65, large), (4096, large)):
        assert planner.choose_multi("forward", M, 64, 64, 8, 3) == want


def test_unknown_plan_is_refused(monkeypatch, device):
    monkeypatch.setenv("FUSEDLORA_PLAN", "fastest")
    inputs = make_multi(4, 16, 8, 2, 4, torch.float32, device=device)
    with pytest.raises(ValueError, match="FUSEDLORA_PLAN"):
        fusedlora.multi_lora_linear(*(inputs[n] for n in ARGS), torch.zeros(4, dtype=torch.long, device=device))


@pytest.fixture
def chosen(monkeypatch):
    """Records (direction, plan, bound) for each forward and backward run: the sequences of plans/multi.py
    (bound False), and the decode launches bound once per specialization (their runs record themselves,
    bound True; the backward's are those bound inside _backward_run). The plan caches are emptied so
    that the call builds its plan here."""
    seen = []
    for name in ("forward", "backward"):
        real = getattr(fusedlora.plans.multi, name)

        def record(plan, *a, _real=real, _name=name):
            seen.append((_name, plan, False))
            return _real(plan, *a)

        monkeypatch.setattr(fusedlora.plans.multi, name, record)
    real_launcher, real_backward_run = fusedlora.plans.multi.decode_launcher, fusedlora.plans.multi._backward_run
    binding_backward = []  # set while _backward_run binds: Wᵀ's strides cannot tell the direction when K = 1

    def backward_run(*a, **k):
        binding_backward.append(True)
        try:
            return real_backward_run(*a, **k)
        finally:
            binding_backward.pop()

    def launcher(x, weight, *a, **k):
        run = real_launcher(x, weight, *a, **k)
        direction = "backward" if binding_backward else "forward"

        def recorded(*args, **kw):
            seen.append((direction, "decode", True))
            return run(*args, **kw)
        return recorded

    monkeypatch.setattr(fusedlora.plans.multi, "decode_launcher", launcher)
    monkeypatch.setattr(fusedlora.plans.multi, "_backward_run", backward_run)
    configs.clear_caches(tables=False)
    yield seen
    configs.clear_caches(tables=False)


@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("M", [16, 80])
def test_calls_run_the_chosen_plan(M, x_grad, chosen, monkeypatch, device):
    """Without FUSEDLORA_PLAN each direction runs the planner's choice for the call's shape: the decode
    plan up to MULTI_DECODE_MAX_M rows, the split plan above; with and without dX. The decode forward
    runs its bound launches, and so does the decode backward when it computes dX (its dX and dU are the
    forward's two launches); dA and dB alone take the unbound sequence."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    inputs = make_multi(M, 32, 24, 3, 4, torch.float32, device=device)
    A = inputs["lora_A"].requires_grad_()
    x = inputs["x"].requires_grad_(x_grad)
    fusedlora.multi_lora_linear(x, inputs["weight"], None, A, inputs["lora_B"], inputs["scalings"],
                                ids_for("unsorted", M, 3, device)).sum().backward()
    decode = M <= planner.MULTI_DECODE_MAX_M
    want = "decode" if decode else "split"
    assert chosen == [("forward", want, decode), ("backward", want, decode and x_grad)]


def _served(inputs, ids, grad, dy_seed=1):
    """(y, {name: gradient}) of multi_lora_linear on `inputs`; grad: the inputs that need one (none: a
    call under no_grad). dy is random, so every gradient is checked against more than a sum."""
    leaves = {n: (t.detach().clone().requires_grad_() if n in grad else t) for n, t in inputs.items()}
    with torch.set_grad_enabled(bool(grad)):
        y = fusedlora.multi_lora_linear(*(leaves[n] for n in ARGS), ids, leaves["ranks"])
    if not grad:
        return y, None, None
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed)).to(y.device)
    y.backward(dy)
    return y.detach(), {n: leaves[n].grad for n in grad}, dy


@pytest.mark.parametrize("grad", [(), ("x", "lora_A", "lora_B")], ids=["no-grad", "grad"])
@pytest.mark.parametrize("dims", [dict(M=1), dict(K=1), dict(N=1), dict(L=1)], ids=["M=1", "K=1", "N=1", "L=1"])
def test_decode_binds_down_to_one(dims, grad, chosen, monkeypatch, device):
    """One row, one input feature, one output feature or one adapter is a shape the decode launches
    serve, so it runs them bound as any other (a binding guard that wants more than one of any, as
    `M > 1` would, sends it down the unbound sequence), with the oracle's results."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    shape = dict(M=6, K=32, N=24, L=3) | dims
    M, K, N, L = shape["M"], shape["K"], shape["N"], shape["L"]
    inputs = make_multi(M, K, N, L, 4, torch.float32, device=device)
    ids = ids_for("each-own", M, L, device)
    y, grads, dy = _served(inputs, ids, grad)
    want = [("forward", "decode", True)] + ([("backward", "decode", True)] if grad else [])
    assert chosen == want
    check_multi_lora_linear(y, grads, inputs, ids, dy)


@pytest.mark.parametrize("grad", [(), ("x", "weight", "bias", "lora_A", "lora_B")], ids=["no-grad", "grad"])
def test_decode_without_adapters(grad, chosen, monkeypatch, device):
    """L = 0 (a batch of base rows only, every id -1): the decode launches take no empty adapter stack,
    so the decode plan runs its unbound sequence, which gives x·Wᵀ + b and the base's gradients (the
    adapters' are empty)."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    inputs = make_multi(5, 32, 24, 0, 4, torch.float32, device=device)
    ids = torch.full((5,), -1, device=device)
    y, grads, dy = _served(inputs, ids, grad)
    want = [("forward", "decode", False)] + ([("backward", "decode", False)] if grad else [])
    assert chosen == want
    if grads is not None:  # the adapters' gradients are empty; the reference has none to compare with
        assert grads.pop("lora_A").shape == (0, 4, 32) and grads.pop("lora_B").shape == (0, 24, 4)
    check_multi_lora_linear(y, grads, inputs, ids, dy)


@pytest.mark.parametrize("grad", [(), ("x", "lora_A", "lora_B")], ids=["no-grad", "grad"])
@pytest.mark.parametrize("layout", ["contiguous", "not-viewable"])
def test_decode_takes_x_of_more_dimensions(layout, grad, chosen, monkeypatch, device):
    """x: (B, T, K) on the bound decode launches, whose strides were fixed for x's 2-D rows. A
    contiguous x starts where its rows' view does; one that is not viewable as (B·T, K) (its two lead
    dimensions swapped) must be reshaped, a copy in token order, or the launches read its memory in
    the wrong order."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    inputs = make_multi((3, 2), 32, 24, 3, 4, torch.float32, device=device)
    if layout == "not-viewable":
        inputs["x"] = inputs["x"].transpose(0, 1).contiguous().transpose(0, 1)  # (3, 2, K), strides (K, 3K, 1)
        assert inputs["x"].shape == (3, 2, 32) and not inputs["x"].is_contiguous()
    ids = torch.tensor([[0, 2], [-1, 1], [2, 0]], device=device)
    y, grads, dy = _served(inputs, ids, grad)
    assert y.shape == (3, 2, 24)
    want = [("forward", "decode", True)] + ([("backward", "decode", True)] if grad else [])
    assert chosen == want
    check_multi_lora_linear(y, grads, inputs, ids, dy)
