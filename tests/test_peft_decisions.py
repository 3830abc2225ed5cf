"""patch_peft remembers what it decided about a layer; every event that changes the decision takes
effect on the next call: the patched output equals PEFT's own forward after each."""
import copy

import pytest
import torch
from oracle import assert_normwise
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLinear

import fusedlora

pytestmark = pytest.mark.filterwarnings("ignore:fusedlora. PEFT layer")


def layer_and_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 24))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    model = get_peft_model(model, config)
    model.add_adapter("other", LoraConfig(r=8, lora_alpha=4, target_modules=["0"], init_lora_weights=False))
    model.eval()
    fusedlora.patch_peft(model)
    return model, model.base_model.model[0]


def check(layer, x, got):
    """got against PEFT's own forward of the layer: the same-dtype run and a float64 copy."""
    exact = PeftLinear.forward(copy.deepcopy(layer).double(), x.double())
    assert_normwise({"y": got}, {"y": PeftLinear.forward(layer, x)}, {"y": exact})


def replace_B(layer):
    layer.lora_B["default"].weight = torch.nn.Parameter(torch.randn_like(layer.lora_B["default"].weight))


def reassign_data(layer):
    layer.lora_A["default"].weight.data = torch.randn_like(layer.lora_A["default"].weight)


EVENTS = {
    "set_adapter": lambda model, layer: model.set_adapter("other"),
    "merge": lambda model, layer: layer.merge(),
    "merge-unmerge": lambda model, layer: (layer.merge(), layer.unmerge()),
    "disable": lambda model, layer: layer.enable_adapters(False),
    "delete_adapter": lambda model, layer: (model.set_adapter("other"), model.delete_adapter("default")),
    "hook": lambda model, layer: layer.base_layer.register_forward_hook(lambda m, i, o: o * 2),
    "replace_B": lambda model, layer: replace_B(layer),
    "data": lambda model, layer: reassign_data(layer),
    "adapters_to_float64": lambda model, layer: (layer.lora_A.to(torch.float64), layer.lora_B.to(torch.float64)),
    "adapters_to_bfloat16": lambda model, layer: (layer.lora_A.to(torch.bfloat16), layer.lora_B.to(torch.bfloat16)),
    "scale_layer": lambda model, layer: layer.scale_layer(3.0),
    "lora_bias": lambda model, layer: setattr(layer.lora_B["default"], "bias",
                                              torch.nn.Parameter(torch.randn(24))),
}


# Events that change the path (PEFT's forward after them) but not the function.
SAME_OUTPUT = {"merge", "merge-unmerge", "adapters_to_float64"}


@pytest.mark.parametrize("event", list(EVENTS))
def test_patched_layer_equals_peft_after(event):
    model, layer = layer_and_model()
    x = torch.randn(5, 32)
    with torch.no_grad():
        before = layer(x)
        check(layer, x, before)
        EVENTS[event](model, layer)
        got = layer(x)
        check(layer, x, got)
        if event not in SAME_OUTPUT:  # the event must change the output, or the test shows nothing
            assert not torch.allclose(PeftLinear.forward(layer, x).float(), before)


def test_train_eval_switches_dropout():
    """Dropout in the decision: in train mode the layer drops (a different output), in eval it does not."""
    model, layer = layer_and_model()
    layer.lora_dropout["default"] = torch.nn.Dropout(0.5).eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        evaluated = layer(x)
        check(layer, x, evaluated)
        model.train()
        trained = layer(x)
        model.eval()
        again = layer(x)
    assert not torch.allclose(trained, evaluated)
    assert torch.equal(again, evaluated)


def test_decision_is_not_retaken_per_call(monkeypatch):
    """Calls with an unchanged layer reuse the decision (fallback_reason runs once)."""
    from fusedlora.peft import patch
    calls = []
    real = patch.fallback_reason
    monkeypatch.setattr(patch, "fallback_reason", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, layer = layer_and_model()
    x = torch.randn(5, 32)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
        assert len(calls) == 1
        model.set_adapter("other")
        layer(x)
    assert len(calls) == 2
