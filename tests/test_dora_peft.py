"""patch_peft serves PEFT's DoRA layers (LoraConfig(use_dora=True)) through fusedlora.dora_linear:
the calls are counted (a silent fallback fails), no fallback is reported, and output and every
gradient (the magnitude vector's included) equal PEFT's own by tests/oracle.py's float64 oracle."""
import copy
import dataclasses
import warnings

import pytest
import torch
from test_peft_layers import (GPT2Block, MLP, assert_patched_equals_peft, calls, fallback_warnings, inputs,  # noqa: F401
                              peft_model, run)

import fusedlora
import fusedlora.modules.lora_linear


@pytest.fixture
def dora_calls(monkeypatch):
    counts = {"dora_linear": 0}
    real = fusedlora.modules.lora_linear.dora_linear

    def counted(*args, **kwargs):
        counts["dora_linear"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(fusedlora.modules.lora_linear, "dora_linear", counted)
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


def test_dora_under_autocast_is_served(dora_calls):
    """Under autocast to bf16 (mixed-precision training: fp32 weights, bf16 compute) the layers are
    served with nn.Linear's autocast dtypes: PEFT's output dtype, every gradient (the magnitude's
    included) in its parameter's dtype, values by the norm-wise oracle."""
    from test_peft_layers import assert_run_normwise
    model = peft_model(MLP(), use_dora=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    x = inputs()
    exact = run(copy.deepcopy(model).double(), x.double())
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        want = run(model, x)
        fusedlora.patch_peft(model)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = run(model, x)
    assert fallback_warnings(record) == []
    assert dora_calls == {"dora_linear": 2}
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    assert all(got[1][n].dtype == want[1][n].dtype for n in want[1])
    assert_run_normwise(got, want, exact)


def _two_adapters(kinds, **options):
    """An MLP with adapters "default" and "other" of the given kinds ("lora" or "dora"), both active,
    the magnitudes moved off their initial value (g = 1) so that the DoRA scaling matters."""
    first, second = (kind == "dora" for kind in kinds)
    model = peft_model(MLP(), use_dora=first, **options)
    model.add_adapter("other", dataclasses.replace(model.peft_config["default"], use_dora=second))
    model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_" in name:  # the new adapter's weights start at PEFT's init (B = 0)
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i)) * 0.3
                        + (p if "magnitude" in name else 0))
    return model


@pytest.mark.parametrize("kinds", [("lora", "dora"), ("dora", "lora"), ("dora", "dora")])
def test_dora_beside_other_active_adapters_is_served(calls, dora_calls, kinds):
    """PEFT's loop over the active adapters, where a DoRA adapter scales the running result (the
    earlier adapters' terms included): served with one lora_add per adapter and layer."""
    model = _two_adapters(kinds)
    assert_patched_equals_peft(model, inputs())
    assert calls == {"lora_linear": 0, "lora_add": 4} and dora_calls == {"dora_linear": 0}


def test_dora_beside_another_adapter_in_training_with_dropout_is_served(calls):
    model = _two_adapters(("lora", "dora"), lora_dropout=0.2).train()
    fusedlora.patch_peft(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, grads = run(model, inputs())
    assert fallback_warnings(record) == []
    assert calls == {"lora_linear": 0, "lora_add": 4}
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())


def test_dora_in_a_mixed_batch_is_served():
    """PEFT refuses adapter_names= with a DoRA adapter; the patched model serves it (no fallback), each row
    as PEFT computes it with that row's adapter alone, without gradients (the kernels) and with them
    (the PyTorch backend), by the norm-wise oracle. tests/test_peft_mixed_dora.py has the whole model."""
    from oracle import assert_normwise
    model = _two_adapters(("dora", "lora"))
    x, names = inputs(shape=(3, 5)), ["default", "other", "__base__"]
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        model(x, adapter_names=names)

    def alone(model, x):
        rows = []
        with torch.no_grad():
            for b, name in enumerate(names):
                if name == "__base__":
                    with model.disable_adapter():
                        rows.append(model(x[b:b + 1]))
                else:
                    model.base_model.set_adapter(name)
                    rows.append(model(x[b:b + 1]))
        return torch.cat(rows)
    model = _two_adapters(("dora", "lora"))  # PEFT leaves its forward hooks behind when it raises
    low, exact = alone(model, x), alone(copy.deepcopy(model).double(), x.double())
    fusedlora.patch_peft(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            served = model(x, adapter_names=names)
        with_grad = model(x, adapter_names=names)
    assert fallback_warnings(record) == [] and with_grad.requires_grad
    for got in (served, with_grad.detach()):
        assert_normwise(dict(y=got), dict(y=low), dict(y=exact))


def test_lora_linear_use_dora_equals_peft_and_merges(plan):
    """LoRALinear(use_dora=True): the magnitude starts at PEFT's value, and output and gradients (x,
    lora_A, lora_B, magnitude) equal PEFT's DoRA layer's by the norm-wise oracle; merge() folds the
    layer into the weight and unmerge() restores it."""
    from oracle import assert_normwise
    from peft import LoraConfig, get_peft_model
    from torch import nn
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    peft = get_peft_model(nn.Sequential(copy.deepcopy(base)), LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                                          use_dora=True, init_lora_weights=False))
    peft_layer = peft.base_model.model[0]
    layer = fusedlora.LoRALinear(copy.deepcopy(base), r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
        layer.lora_magnitude_vector.copy_(layer.weight_norm())  # as PEFT initialises it from A and B
    m_peft = peft_layer.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(layer.lora_magnitude_vector, m_peft, rtol=1e-6, atol=0)
    with torch.no_grad():
        m_peft.mul_(1.2)
        layer.lora_magnitude_vector.copy_(m_peft)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(2))

    def grads(module, x, A, B, m):
        x = x.detach().clone().requires_grad_()
        out = module(x)
        out.backward(dy.to(out.dtype))
        return {"out": out.detach(), "x": x.grad, "A": A.grad, "B": B.grad, "m": m.grad}

    got = grads(layer, x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)
    low = grads(peft_layer, x, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight, m_peft)
    peft64 = copy.deepcopy(peft).double().base_model.model[0]
    exact = grads(peft64, x.double(), peft64.lora_A["default"].weight, peft64.lora_B["default"].weight,
                  peft64.lora_magnitude_vector["default"].weight)
    assert_normwise(got, low, exact)
    with torch.no_grad():
        weight = layer.base_layer.weight.clone()
        layer.merge()
        merged = layer(x)
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, weight, rtol=1e-5, atol=1e-6)
        assert_normwise({"out": merged}, {"out": low["out"]}, {"out": exact["out"]})
