"""The planner's multi-adapter choices, FUSEDLORA_PLAN, and that each call runs the path chosen."""
import pytest
import torch
from test_multi_lora import ids_for, make_multi

import fusedlora
import fusedlora.plans.multi
from fusedlora.plans import planner

ARGS = ("x", "weight", "bias", "lora_A", "lora_B", "scalings")


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("M", [1, 16, 64, 65, 4096, 16384])
def test_auto_is_split_everywhere(direction, M, monkeypatch):
    """No measured shape had the fused plan faster (planner.py), so auto never takes it."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    for K, N, R, L in ((4096, 4096, 16, 64), (4096, 14336, 64, 8), (8192, 8192, 8, 1)):
        assert planner.choose_multi(direction, M, K, N, R, L) == "split"


@pytest.mark.parametrize("forced", ["fused", "split", " Fused "])
def test_forcing(forced, monkeypatch):
    monkeypatch.setenv("FUSEDLORA_PLAN", forced)
    for M in (1, 4096):
        assert planner.choose_multi("forward", M, 64, 64, 8, 3) == forced.strip().lower()


@pytest.mark.parametrize("M,decode", [(0, False), (1, True), (64, True), (65, False), (4096, False)])
def test_decode_kernels_serve_small_batches_of_the_split_plan(M, decode):
    assert planner.multi_decode("split", M) is decode
    assert planner.multi_decode("fused", M) is False


def test_unknown_plan_is_refused(monkeypatch, device):
    monkeypatch.setenv("FUSEDLORA_PLAN", "fastest")
    inputs = make_multi(4, 16, 8, 2, 4, torch.float32, device=device)
    with pytest.raises(ValueError, match="FUSEDLORA_PLAN"):
        fusedlora.multi_lora_linear(*(inputs[n] for n in ARGS), torch.zeros(4, dtype=torch.long, device=device))


@pytest.fixture
def chosen(monkeypatch):
    """Records (sequence, plan, decode kernels or not) for each forward and backward sequence run."""
    seen = []
    for name in ("forward", "backward"):
        real = getattr(fusedlora.plans.multi, name)

        def record(plan, *a, _real=real, _name=name):
            rows = a[0].shape[0] if _name == "forward" else a[0].reshape(-1, a[0].shape[-1]).shape[0]
            seen.append((_name, plan, planner.multi_decode(plan, rows)))
            return _real(plan, *a)

        monkeypatch.setattr(fusedlora.plans.multi, name, record)
    return seen


@pytest.mark.parametrize("M", [16, 80])
def test_calls_run_the_chosen_plan(M, chosen, monkeypatch, device):
    """Without FUSEDLORA_PLAN each direction runs the planner's choice for the call's shape: the split
    plan, through the decode kernels up to MULTI_DECODE_MAX_M rows."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    inputs = make_multi(M, 32, 24, 3, 4, torch.float32, device=device)
    A = inputs["lora_A"].requires_grad_()
    fusedlora.multi_lora_linear(inputs["x"], inputs["weight"], None, A, inputs["lora_B"], inputs["scalings"],
                                ids_for("unsorted", M, 3, device)).sum().backward()
    decode = M <= planner.MULTI_DECODE_MAX_M
    assert chosen == [("forward", "split", decode), ("backward", "split", decode)]
