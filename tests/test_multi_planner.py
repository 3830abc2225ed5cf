"""The planner's multi-adapter choices, FUSEDLORA_PLAN, and that each call runs the path chosen."""
import pytest
import torch
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
    bound True; the backward's are bound over Wᵀ, a transposed view). The plan caches are emptied so
    that the call builds its plan here."""
    seen = []
    for name in ("forward", "backward"):
        real = getattr(fusedlora.plans.multi, name)

        def record(plan, *a, _real=real, _name=name):
            seen.append((_name, plan, False))
            return _real(plan, *a)

        monkeypatch.setattr(fusedlora.plans.multi, name, record)
    real_launcher = fusedlora.plans.multi.decode_launcher

    def launcher(x, weight, *a, **k):
        run = real_launcher(x, weight, *a, **k)
        direction = "forward" if weight.stride(-1) == 1 else "backward"

        def recorded(*args, **kw):
            seen.append((direction, "decode", True))
            return run(*args, **kw)
        return recorded

    monkeypatch.setattr(fusedlora.plans.multi, "decode_launcher", launcher)
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
