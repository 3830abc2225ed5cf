"""The planner's choices, FUSEDLORA_PLAN, and that each call runs the plan the planner chose."""
import pytest
import torch
from oracle import NAMES, make_inputs

import fusedlora
import fusedlora.kernels.configs
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
    """Records the plan each direction's launches are built for (a call plan asks the planner when it is
    built; its backward, when it binds the launches for a dY), and the kernels that then run."""
    from fusedlora.kernels import configs
    configs.clear_caches(tables=False)
    seen = []
    real = fusedlora.plans.single.choose
    monkeypatch.setattr(fusedlora.plans.single, "choose",
                        lambda direction, *a: seen.append((direction, real(direction, *a))) or seen[-1][1])
    yield seen
    configs.clear_caches(tables=False)


@pytest.fixture
def kernels(monkeypatch):
    from fusedlora.kernels.lora_gemm import _lora_gemm_kernel
    kind, seen = type(_lora_gemm_kernel), []
    real = kind.run
    monkeypatch.setattr(kind, "run", lambda self, *a, **k: seen.append(self.fn.__name__) or real(self, *a, **k))
    return seen


@pytest.mark.parametrize("M", [16, 80])
def test_calls_run_the_chosen_plan(M, chosen, kernels, monkeypatch, device):
    """Without FUSEDLORA_PLAN each direction runs the planner's choice for the call's shape: at 16 rows
    the fused plan's one launch each way, at 80 the split plan's shrink, expand (and the library GEMM),
    then dU and dB, and dA (lora_A alone needs a gradient)."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    inputs = make_inputs(M, 32, 24, 4, torch.float32, device=device)
    A = inputs["lora_A"].requires_grad_()
    fusedlora.lora_linear(inputs["x"], inputs["weight"], None, A, inputs["lora_B"], 1.0).sum().backward()
    want = planner.choose("forward", M, 32, 24, 4)
    assert chosen == [("forward", want), ("backward", planner.choose("backward", M, 32, 24, 4))]
    assert want == ("fused" if M <= 64 else "split")
    assert kernels == (["_lora_gemm_kernel", "_lora_backward_kernel"] if M <= 64 else
                       ["_lora_shrink_kernel", "_lora_gemm_kernel", "_lora_dy_kernel", "_lora_shrink_kernel"])


def test_backward_may_take_the_other_plan(chosen, monkeypatch, device):
    """Both plans save the same tensors, so a forward under one plan and a backward under the other
    give the gradients of either alone."""
    inputs = make_inputs(24, 32, 20, 4, torch.float32, device=device)
    grads = {}
    for fwd, bwd in (("fused", "split"), ("split", "fused"), ("fused", "fused")):
        fusedlora.kernels.configs.clear_caches(tables=False)  # each forward builds its plan (and asks)
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
