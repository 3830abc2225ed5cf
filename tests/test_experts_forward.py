"""experts_forward (fusedlora/modules/experts.py) computes transformers' experts function for every layout its
flags describe: checked against transformers' own grouped implementation and the families' eager loops, with
a post-expert norm and without a gate too; registered as the "fusedlora" experts implementation; what it
refuses, it names."""
import pytest
import torch
from moe_models import FAMILIES, experts_modules, needs_expert_floors, tiny_moe, tokens
from oracle import assert_normwise
from torch import nn
from transformers import PretrainedConfig
from transformers.integrations.moe import use_experts_implementation

import fusedlora
from fusedlora.modules.experts import experts_forward, experts_reason, register_experts_implementation

pytestmark = needs_expert_floors


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")


def relative(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def routed(T=24, k=2, E=8, H=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    top = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    return x, top, torch.rand(T, k, generator=gen).softmax(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_against_its_own_loop(family):
    """Without LoRA: experts_forward in fp32 against the family's own eager loop in float64, with transformers'
    grouped_mm in fp32 as the noise scale (the norm-wise rule)."""
    experts = experts_modules(tiny_moe(family))[0]
    x, top, w = routed()
    low = experts(x, top, w)
    got = experts_forward(experts, x, top, w)
    experts.config._experts_implementation = "eager"
    exact = experts.double()(x.double(), top, w.double())
    assert_normwise(dict(y=got), dict(y=low), dict(y=exact))


def _decorated(**flags):
    """An experts class of transformers' kind that no model here uses: a post-expert norm, or no gate."""
    @use_experts_implementation(**flags)
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            E, H, I = 8, 64, 32
            self.num_experts = E
            gen = torch.Generator().manual_seed(3)
            first = "gate_up_proj" if flags.get("has_gate", True) else "up_proj"
            width = 2 * I if flags.get("has_gate", True) else I
            setattr(self, first, nn.Parameter(torch.randn(E, width, H, generator=gen) / 8))
            self.down_proj = nn.Parameter(torch.randn(E, H, I, generator=gen) / 6)
            self.act_fn = nn.GELU()
            if flags.get("has_post_expert_norm"):
                self.post_expert_norm = nn.LayerNorm(H)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the generic implementations serve this class")

    config = PretrainedConfig()
    config._experts_implementation = "grouped_mm"
    return Experts(config)


@pytest.mark.parametrize("flags", [dict(has_post_expert_norm=True), dict(has_gate=False)], ids=["post-norm", "no-gate"])
def test_other_layouts_against_transformers(flags):
    experts = _decorated(**flags)
    assert experts_reason(experts) is None
    x, top, w = routed()
    want = experts(x, top, w)  # transformers' grouped_mm_experts_forward
    assert relative(experts_forward(experts, x, top, w), want) < 1e-6
    experts.config._experts_implementation = "batched_mm"
    assert relative(experts_forward(experts, x, top, w), experts(x, top, w)) < 1e-6


def test_registered_as_an_experts_implementation():
    """model.set_experts_implementation("fusedlora") runs every experts module through experts_forward."""
    model = tiny_moe("gpt_oss")
    ids = tokens()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert register_experts_implementation() == "fusedlora"
        model.set_experts_implementation("fusedlora")
        calls = []
        real = fusedlora.modules.experts.experts_forward
        try:
            fusedlora.modules.experts.experts_forward = lambda *a, **k: calls.append(1) or real(*a, **k)
            got = model(input_ids=ids).logits
        finally:
            fusedlora.modules.experts.experts_forward = real
    assert len(calls) == 2 and relative(got, want) < 1e-5


def test_refusals_name_the_reason():
    experts = experts_modules(tiny_moe("qwen3_moe"))[0]
    assert "not a transformers experts module" in experts_reason(nn.Linear(4, 4))
    experts._is_expert_parallel = True
    assert "expert parallelism" in experts_reason(experts)
    experts._is_expert_parallel = False
    other = _decorated()
    other.config._experts_implementation = "eager"
    assert "the eager forward of Experts, its own code" in experts_reason(other)
    experts.config._experts_implementation = "eager"  # a family whose loop was checked against the function
    assert experts_reason(experts) is None
    experts.down_proj = nn.Parameter(torch.randn(8, 63, 32))
    assert "do not chain" in experts_reason(experts)
