"""patch_peft remembers what it decided about a layer; every event that changes the decision takes
effect on the next call: the patched output equals PEFT's own forward after each."""
import copy
import functools
import types
import warnings

import pytest
import torch
from oracle import assert_normwise, check_lora_linear
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLinear

import fusedlora
import fusedlora.modules.lora_linear
from fusedlora.core.dropout import draw_seed

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


# ---- one component of the decision's state at a time ----------------------------------------------
# _state (fusedlora/peft/patch.py) is what a layer's decision is kept with. Each case warms the patched
# layer (its decision kept), changes exactly one component of that state, and compares the next patched
# call with PEFT's own forward of the layer, by the norm-wise rule against the float64 copy's; where PEFT
# refuses the call, the patched call must refuse it with PEFT's own error. The cases run on the PyTorch
# backend: the decision sits above it. The devices of x, the adapters and the base weights cannot change
# on a machine with one device.

class Halve(torch.nn.Module):
    """A dropout-like module of the user's own (no p), in eval mode."""

    def __init__(self):
        super().__init__()
        self.eval()

    def forward(self, x):
        return x * 0.5


class Doubled(torch.nn.Linear):
    """An nn.Linear subclass with a forward of its own."""

    def forward(self, x):
        return super().forward(x) * 2


class Variant:
    """A LoRA variant of the user's own: twice the plain term."""

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        A, B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        return result + 2 * B(A(x)) * module.scaling[active_adapter]


def _doubled_base(layer):
    old = layer.base_layer
    new = Doubled(old.in_features, old.out_features)
    new.weight, new.bias = old.weight, old.bias  # the same parameters: only the module changes
    layer.base_layer = new


def _new_param(module, name, dtype):
    old = getattr(module, name)
    setattr(module, name, torch.nn.Parameter(old.detach().to(dtype), requires_grad=old.requires_grad))


def _same_but_the_name(layer):
    """"other" made to differ from "default" only by its name and weights (not in the state): the same
    scaling and the same dropout module."""
    layer.scaling["other"] = layer.scaling["default"]
    layer.lora_dropout["other"] = layer.lora_dropout["default"]


def _global(register, hook):
    """A global module hook, removed after the test (the fixture below)."""
    _GLOBAL_HOOKS.append(register(hook))


_GLOBAL_HOOKS = []


# Hooks that act on the modules marked `hooked` (the base layer), so that a global one changes the base
# layer's call alone, as a per-module one does.
def _plus_one(module, args, output):
    return output + 1 if getattr(module, "hooked", False) else None


def _scale_grad(module, grad_input, grad_output):
    return tuple(g * 3 if g is not None else None for g in grad_input) if getattr(module, "hooked", False) else None


def _scale_grad_output(module, grad_output):
    return tuple(g * 3 for g in grad_output) if getattr(module, "hooked", False) else None


def _double_input(module, args):
    return (args[0] * 2, *args[1:]) if getattr(module, "hooked", False) else None


def _doubled_forward(self, x):
    return torch.nn.Linear.forward(self, x) * 2


hooks = torch.nn.modules.module
# component -> (change(layer), how the next call runs: "y", "grad" (y and dx), "dropout" (y against the
# float64 reference with the drawn mask), "warns" (PEFT's forward serves it, with a warning)). The
# prepare step (dropout cases) runs before the warm call.
STATE = {
    "flags: adapters disabled": (lambda layer: setattr(layer, "_disable_adapters", True), "y"),
    "flags: merged adapters": (lambda layer: layer.merge(), "y"),
    "flags: training": (lambda layer: setattr(layer, "training", True), "y"),
    "flags: input dtype casting": (lambda layer: setattr(layer, "cast_input_dtype_enabled", False), "y"),
    "active adapter": (lambda layer: setattr(layer, "_active_adapter", "other"), "y"),
    "active adapters, two": (lambda layer: setattr(layer, "_active_adapter", ["default", "other"]), "y"),
    "active adapters, one not on the layer": (lambda layer: setattr(layer, "_active_adapter", ["default", "ghost"]),
                                              "y"),
    "adapter: lora_A dtype": (lambda layer: _new_param(layer.lora_A["default"], "weight", torch.bfloat16), "y"),
    "adapter: lora_B dtype": (lambda layer: _new_param(layer.lora_B["default"], "weight", torch.bfloat16), "y"),
    "adapter: lora_B bias": (lambda layer: setattr(layer.lora_B["default"], "bias",
                                                   torch.nn.Parameter(torch.randn(24))), "y"),
    "adapter: scaling": (lambda layer: layer.scaling.__setitem__("default", 3.0), "y"),
    "adapter: scaling, after an active adapter not on the layer": (
        lambda layer: layer.scaling.__setitem__("default", 3.0), "y"),
    "adapter: dropout module": (lambda layer: layer.lora_dropout.__setitem__("default", Halve()), "y"),
    "adapter: dropout module's training": (lambda layer: layer.lora_dropout["default"].train(), "dropout"),
    "adapter: dropout module's p": (lambda layer: setattr(layer.lora_dropout["default"], "p", 0.25), "dropout"),
    "adapter: a variant": (lambda layer: layer.lora_variant.__setitem__("default", Variant()), "y"),
    "adapter: use_dora": (lambda layer: layer.use_dora.__setitem__("default", True), "warns"),
    "base layer": (_doubled_base, "y"),
    "base: forward hook": (lambda layer: layer.base_layer.register_forward_hook(_plus_one), "y"),
    "base: forward pre-hook": (lambda layer: layer.base_layer.register_forward_pre_hook(_double_input), "y"),
    "base: backward hook": (lambda layer: layer.base_layer.register_full_backward_hook(_scale_grad), "grad"),
    "base: backward pre-hook": (lambda layer: layer.base_layer.register_full_backward_pre_hook(_scale_grad_output),
                                "grad"),
    "base: forward of the instance": (lambda layer: setattr(layer.base_layer, "forward",
                                                            types.MethodType(_doubled_forward, layer.base_layer)), "y"),
    "global forward hook": (lambda layer: _global(hooks.register_module_forward_hook, _plus_one), "y"),
    "global forward pre-hook": (lambda layer: _global(hooks.register_module_forward_pre_hook, _double_input), "y"),
    "global backward hook": (lambda layer: _global(hooks.register_module_full_backward_hook, _scale_grad), "grad"),
    "global backward pre-hook": (lambda layer: _global(hooks.register_module_full_backward_pre_hook,
                                                       _scale_grad_output), "grad"),
    "base weight dtype": (lambda layer: _new_param(layer.base_layer, "weight", torch.float64), "y"),
    "base weight requires_grad": (lambda layer: layer.base_layer.weight.requires_grad_(True), "grad"),
    "base bias dtype": (lambda layer: _new_param(layer.base_layer, "bias", torch.float64), "y"),
    "base bias removed": (lambda layer: setattr(layer.base_layer, "bias", None), "y"),
    "base bias requires_grad": (lambda layer: layer.base_layer.bias.requires_grad_(True), "grad"),
    "x dtype": (None, "y"),
    "autocast": (None, "y"),
}
PREPARE = {
    "adapter: scaling, after an active adapter not on the layer": lambda layer: setattr(layer, "_active_adapter",
                                                                                     ["ghost", "default"]),
    "active adapter": _same_but_the_name,
    # bf16 adapters under fp32 x: served while PEFT casts x to them; with casting off PEFT refuses
    "flags: input dtype casting": lambda layer: (_new_param(layer.lora_A["default"], "weight", torch.bfloat16),
                                                 _new_param(layer.lora_B["default"], "weight", torch.bfloat16)),
    "adapter: dropout module's training": lambda layer: layer.lora_dropout.__setitem__(
        "default", torch.nn.Dropout(0.5).eval()),
    "adapter: dropout module's p": lambda layer: layer.lora_dropout.__setitem__("default",
                                                                                torch.nn.Dropout(0.5).train()),
}
# Components a plain call's decision does not read (kept in the state all the same): the output is PEFT's
# whether or not the decision is taken again.
NOT_DECIDED_BY = {"flags: training", "active adapters, one not on the layer", "base weight requires_grad",
                  "base bias removed", "base bias requires_grad"}


@pytest.fixture
def global_hooks():
    yield
    while _GLOBAL_HOOKS:
        _GLOBAL_HOOKS.pop().remove()


def _outcome(fn):
    """fn()'s tensors, or its exception's (type, message)."""
    try:
        return fn()
    except (RuntimeError, TypeError, ValueError) as e:
        return type(e), str(e)


def _run(forward, x, kind, autocast):
    """{"y": forward(x)} (and "dx" for the gradient cases)."""
    x = x.detach().clone().requires_grad_(kind == "grad")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = forward(x)
    if kind != "grad":
        return {"y": y.detach()}
    y.backward(torch.ones_like(y))
    return {"y": y.detach(), "dx": x.grad}


@pytest.mark.usefixtures("global_hooks")
@pytest.mark.parametrize("component", list(STATE))
def test_each_component_of_the_decision_state(component, monkeypatch):
    from fusedlora.peft import patch
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model, layer = layer_and_model()
    decided = []
    real = patch.fallback_reason
    monkeypatch.setattr(patch, "fallback_reason", lambda *a, **k: decided.append(1) or real(*a, **k))
    change, kind = STATE[component]
    layer.base_layer.hooked = True
    PREPARE.get(component, lambda layer: None)(layer)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer(x)
        layer(x)
    assert len(decided) == 1, "the warm call decided again"
    autocast = component == "autocast"
    if component == "x dtype":
        x = x.to(torch.bfloat16)
    elif change is not None:
        change(layer)
    if kind == "dropout":
        torch.manual_seed(3)
        keep = fusedlora.dropout_mask(draw_seed(), x.shape, layer.lora_dropout["default"].p, "cpu")
        torch.manual_seed(3)
        with torch.no_grad():
            got = layer(x)
        inputs = dict(x=x, weight=layer.base_layer.weight, bias=layer.base_layer.bias,
                      lora_A=layer.lora_A["default"].weight, lora_B=layer.lora_B["default"].weight)
        p = layer.lora_dropout["default"].p
        check_lora_linear(got, None, {n: t.detach() for n, t in inputs.items()}, layer.scaling["default"], keep, p,
                          torch_ops=True)
        return
    if kind == "warns":
        with pytest.warns(UserWarning, match="runs PEFT's own forward"):
            got = _run(layer.forward, x, "y", autocast)
    else:
        got = _outcome(lambda: _run(layer.forward, x, kind, autocast))
    low = _outcome(lambda: _run(lambda t: PeftLinear.forward(layer, t), x, kind, autocast))
    if isinstance(low, tuple):  # PEFT refuses the call: so must the patched layer, with PEFT's error
        assert got == low
        return
    assert isinstance(got, dict), got
    exact = _run(lambda t: PeftLinear.forward(copy.deepcopy(layer).double(), t), x.double(), kind, False)
    assert_normwise(got, low, exact, torch_ops=True, where=component)
    assert len(decided) == 2 or component in NOT_DECIDED_BY or kind == "warns"


@pytest.mark.parametrize("fields", ["merged_adapters None", "a flag on the class"])
def test_a_layer_whose_state_cannot_be_read_is_decided_on_every_call(fields, monkeypatch):
    """_state reads PEFT's fields from the layer's own dict; a layer that keeps one elsewhere (a class
    attribute) or of another kind (merged_adapters None, which PEFT's `merged` reads as False) is decided
    on every call, and its output stays PEFT's."""
    from fusedlora.peft import patch
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model, layer = layer_and_model()
    if fields == "merged_adapters None":
        layer.merged_adapters = None
    else:
        layer.__class__ = type("Flagged", (type(layer),), {"_disable_adapters": False})
        del layer._disable_adapters
    decided = []
    real = patch.fallback_reason
    monkeypatch.setattr(patch, "fallback_reason", lambda *a, **k: decided.append(1) or real(*a, **k))
    x = torch.randn(5, 32)
    with torch.no_grad():
        for scaling in (2.0, 2.0, 3.0):
            layer.scaling["default"] = scaling
            check(layer, x, layer(x))
    assert len(decided) == 3


class Widening(torch.nn.Module):
    """A base layer of the user's own that returns float64, which lora_add does not take."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x).double()


def test_a_base_output_lora_add_cannot_take_is_finished_by_peft_and_reported(monkeypatch):
    """The served call runs the base layer, finds its output is not one lora_add takes, warns (the fused
    path would have been faster) and finishes with PEFT's loop over the adapters."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model, layer = layer_and_model()
    layer.base_layer = Widening(layer.base_layer)
    x = torch.randn(5, 32)
    with torch.no_grad(), pytest.warns(UserWarning, match="returned torch.float64"):
        got = layer(x)
    with torch.no_grad():
        assert torch.equal(got, PeftLinear.forward(layer, x))  # PEFT's own ops, in PEFT's order


def test_peft_variant_keywords_are_not_passed_to_the_base_layer(monkeypatch):
    """PEFT drops its LoRA variants' keyword arguments (alora_offsets) before calling the base layer; so
    does the served call, which stays fused."""
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    calls = []
    real = fusedlora.modules.lora_linear.lora_linear
    monkeypatch.setattr(fusedlora.modules.lora_linear, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, layer = layer_and_model()
    x = torch.randn(5, 32)
    kwargs = {key: None for key in VARIANT_KWARG_KEYS}
    assert kwargs
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        got = layer(x, **kwargs)
        check(layer, x, got)
    assert calls == [1]


def test_mixed_batch_check_sees_every_keyword(monkeypatch):
    """An adapter_names= call is checked by PEFT's own _check_forward_args (its refusals, its messages)
    with the keyword arguments PEFT's forward would give it, a variant's (alora_offsets) included, and
    is served fused. PEFT 0.21's check reads only adapter_names; a check that reads more (a variant's
    own, as MultiheadAttention's and ParamWrapper's overrides show the pattern) stands in for one here:
    it refuses alora_offsets in a mixed batch, which the patched call must raise just as PEFT does."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
    real = LoraLayer._check_forward_args
    seen = []

    def check(self, x, *args, **kwargs):
        seen.append(sorted(kwargs))
        if kwargs.get("adapter_names") is not None and kwargs.get("alora_offsets") is not None:
            raise ValueError("alora_offsets in a mixed-adapter batch")
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(LoraLayer, "_check_forward_args", check)
    model, layer = layer_and_model()
    x, names = torch.randn(4, 32), ["default", "other", "__base__", "default"]
    kwargs = {key: None for key in VARIANT_KWARG_KEYS}
    assert "alora_offsets" in kwargs
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # served fused, no fallback to PEFT's forward
        got = layer(x, adapter_names=names, **kwargs)
    assert seen == [sorted(["adapter_names", *kwargs])]  # once a call: PEFT's check is host time too
    with torch.no_grad():
        want = PeftLinear.forward(layer, x, adapter_names=names, **kwargs)
    assert_normwise({"y": got}, {"y": want}, {"y": PeftLinear.forward(copy.deepcopy(layer).double(), x.double(),
                                                                      adapter_names=names, **kwargs)})
    offsets = {"alora_offsets": [1, 1, 1, 1]}
    for forward in (layer, functools.partial(PeftLinear.forward, layer)):
        with torch.no_grad(), pytest.raises(ValueError, match="alora_offsets in a mixed-adapter batch"):
            forward(x, adapter_names=names, **offsets)
