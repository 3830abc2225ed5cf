"""patch_peft serves PEFT's DoRA layers (LoraConfig(use_dora=True)) through fusedlora.dora_linear:
the calls are counted (a silent fallback fails), no fallback is reported, and output and every
gradient (the magnitude vector's included) equal PEFT's own by tests/oracle.py's float64 oracle."""
import warnings

import pytest
import torch
from test_peft_layers import GPT2Block, MLP, assert_patched_equals_peft, fallback_warnings, inputs, peft_model, run

import fusedlora
import fusedlora.peft.forward


@pytest.fixture
def dora_calls(monkeypatch):
    counts = {"dora_linear": 0}
    real = fusedlora.peft.forward.dora_linear

    def counted(*args, **kwargs):
        counts["dora_linear"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(fusedlora.peft.forward, "dora_linear", counted)
    return counts


def test_dora_layers_are_served(dora_calls, plan):
    model = peft_model(MLP(), use_dora=True)
    # PEFT starts the magnitude at the row norms (g = 1); moved so that the magnitude matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    got = assert_patched_equals_peft(model, inputs())
    assert dora_calls == {"dora_linear": 2}
    assert any("lora_magnitude_vector" in name for name in got[1])


def test_dora_conv1d_fan_in_fan_out(dora_calls):
    model = peft_model(GPT2Block(), target_modules=["c_fc", "c_proj"], fan_in_fan_out=True, use_dora=True)
    assert_patched_equals_peft(model, inputs())
    assert dora_calls == {"dora_linear": 2}


def test_dora_training_with_dropout_is_served(dora_calls):
    """In training with dropout the masks are fusedlora's, not torch's: served (counted), no fallback,
    and a finite output; the dropout form's numbers are tests/test_dora.py's."""
    model = peft_model(MLP(), use_dora=True, lora_dropout=0.2).train()
    fusedlora.patch_peft(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, grads = run(model, inputs())
    assert fallback_warnings(record) == []
    assert dora_calls == {"dora_linear": 2}
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())


def test_dora_with_two_active_adapters_falls_back(dora_calls):
    model = peft_model(MLP(), use_dora=True)
    model.add_adapter("other", model.peft_config["default"])
    model.base_model.set_adapter(["default", "other"])
    fusedlora.patch_peft(model)
    with pytest.warns(UserWarning, match="DoRA with other active adapters"):
        model(inputs())
    assert dora_calls == {"dora_linear": 0}
