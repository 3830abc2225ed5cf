"""The planner's choices, FUSEDLORA_PLAN, and that each call runs the plan the planner chose."""
import pytest
import torch
from oracle import NAMES, make_inputs

import fusedlora
import fusedlora.plans.single
from fusedlora.plans import planner


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("M,expected", [(1, "fused"), (16, "fused"), (64, "fused"), (65, "split"),
                                        (2048, "split"), (8192, "split")])
def test_rule_by_rows(direction, M, expected, monkeypatch):
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    for K, N in ((4096, 4096), (4096, 14336)):
        assert planner.choose(direction, M, K, N, 16) == expected


@pytest.mark.parametrize("forced,want", [("fused", "fused"), ("split", "split"), (" Split ", "split"),
                                         ("decode", "fused")])
def test_forcing(forced, want, monkeypatch):
    """decode names a multi-adapter plan; the single-adapter op takes it as the fused plan, at any M."""
    monkeypatch.setenv("FUSEDLORA_PLAN", forced)
    for M in (1, 8192):
        for direction in ("forward", "backward"):
            assert planner.choose(direction, M, 64, 64, 8) == want


def test_unknown_plan_is_refused(monkeypatch, device):
    monkeypatch.setenv("FUSEDLORA_PLAN", "fastest")
    inputs = make_inputs(4, 16, 8, 2, torch.float32, device=device)
    with pytest.raises(ValueError, match="FUSEDLORA_PLAN"):
        fusedlora.lora_linear(*(inputs[n] for n in NAMES), 1.0)


@pytest.fixture
def chosen(monkeypatch):
    """Records the plan each forward and backward sequence receives."""
    seen = []
    for name in ("forward", "backward"):
        real = getattr(fusedlora.plans.single, name)
        monkeypatch.setattr(fusedlora.plans.single, name,
                            lambda plan, *a, _real=real, _name=name: seen.append((_name, plan)) or _real(plan, *a))
    return seen


@pytest.mark.parametrize("M", [16, 80])
def test_calls_run_the_chosen_plan(M, chosen, monkeypatch, device):
    """Without FUSEDLORA_PLAN each direction runs the planner's choice for the call's shape. (The eager
    path itself: a call served from the per-shape cache runs launches bound from it, which
    tests/test_fast_path_train.py checks.)"""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    inputs = make_inputs(M, 32, 24, 4, torch.float32, device=device)
    A = inputs["lora_A"].requires_grad_()
    fusedlora.ops.single.lora_linear(inputs["x"], inputs["weight"], None, A, inputs["lora_B"], 1.0, 0.0,
                                     None).sum().backward()
    want = planner.choose("forward", M, 32, 24, 4)
    assert chosen == [("forward", want), ("backward", planner.choose("backward", M, 32, 24, 4))]
    assert want == ("fused" if M <= 64 else "split")


def test_backward_may_take_the_other_plan(chosen, monkeypatch, device):
    """Both plans save the same tensors, so a forward under one plan and a backward under the other
    give the gradients of either alone."""
    inputs = make_inputs(24, 32, 20, 4, torch.float32, device=device)
    grads = {}
    for fwd, bwd in (("fused", "split"), ("split", "fused"), ("fused", "fused")):
        leaves = {n: inputs[n].detach().clone().requires_grad_() for n in NAMES}
        monkeypatch.setenv("FUSEDLORA_PLAN", fwd)
        y = fusedlora.lora_linear(*(leaves[n] for n in NAMES), 1.5, 0.2, seed=3)
        monkeypatch.setenv("FUSEDLORA_PLAN", bwd)
        y.sum().backward()
        grads[fwd, bwd] = [leaves[n].grad for n in NAMES]
    assert chosen[-6:] == [("forward", "fused"), ("backward", "split"), ("forward", "split"),
                           ("backward", "fused"), ("forward", "fused"), ("backward", "fused")]
    for a, b in zip(grads["fused", "split"], grads["fused", "fused"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads["split", "fused"], grads["fused", "fused"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
