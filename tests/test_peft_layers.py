"""patch_peft on the layers PEFT users run beyond one adapter on an nn.Linear: transformers Conv1D
(fan_in_fan_out), lora_bias, several active adapters, LoRA stacked on another tuner in a
PeftMixedModel, and base layers fusedlora does not own (a custom module, a Linear subclass, a hooked
Linear). Each is served by the kernels (lora_linear, or the base layer's own forward plus lora_add:
the calls are counted, and no fallback is reported) and equals PEFT's own output and gradients by
tests/oracle.py's float64 oracle."""
import copy
import warnings

import pytest
import torch
from compiling import assert_steps_equal, fresh_dynamo, graphs_compiled, op_calls, recording  # noqa: F401
from lora_models import DEVICE
from oracle import assert_normwise, assert_oracle, chain_lengths
from peft import LoHaConfig, LoraConfig, PeftMixedModel, get_peft_model
from peft.tuners import lora
from torch import nn
from transformers.pytorch_utils import Conv1D

import fusedlora
from fusedlora.core.dropout import draw_seed

K, N, HIDDEN = 24, 20, 32
pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning")]  # PEFT on Scaled


def _randomize(model):
    """Biases too (PEFT starts lora_B's bias and Conv1D's at zero, which would hide a bias left out)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    return model


class MLP(nn.Module):
    def __init__(self, first=None):
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = first if first is not None else nn.Linear(K, HIDDEN)
        self.lin1 = nn.Linear(HIDDEN, N)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class GPT2Block(nn.Module):
    """transformers' Conv1D projections, as in GPT-2: weights (K, N)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c_fc, self.c_proj = Conv1D(HIDDEN, K), Conv1D(N, HIDDEN)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_fc(x)))


def peft_model(base, **options):
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["lin0", "lin1"], "init_lora_weights": False,
                           **options})
    torch.manual_seed(1)
    return _randomize(get_peft_model(base.to(DEVICE), config)).eval()


def inputs(seed=0, shape=(2, 5)):
    return torch.randn(*shape, K, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def run(model, x):
    """Output, and the gradients of x and of every trainable parameter for a fixed weighting."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out.double() * weights.to(out.device)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return out.detach(), {"x": x.grad, **grads}


@pytest.fixture
def calls(monkeypatch):
    """How often the patched layers called the kernels' lora_linear and lora_add."""
    counts = {"lora_linear": 0, "lora_add": 0}
    for name in counts:
        real = getattr(fusedlora.modules.lora_linear, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(fusedlora.modules.lora_linear, name, counted)
    return counts


def fallback_warnings(record):
    return [str(w.message) for w in record if "runs PEFT's own forward" in str(w.message)]


def assert_patched_equals_peft(model, x, layers=2):
    """model (unpatched) against itself patched: output and every gradient, oracle in float64; no
    fallback reported. Returns the patched run."""
    exact = run(copy.deepcopy(model).double(), x.double())
    low = run(model, x)
    assert fusedlora.patch_peft(model) == layers
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = run(model, x)
    assert fallback_warnings(record) == []
    assert got[0].dtype == low[0].dtype
    assert sorted(got[1]) == sorted(exact[1])
    assert_run_normwise(got, low, exact)
    return got


def assert_run_normwise(got, low, exact):
    """Output and gradients of three runs (see run) by the norm-wise rule: these models have a ReLU or
    a tanh between their layers, so no componentwise bound."""
    assert_normwise(*({"output": y, **grads} for y, grads in (got, low, exact)))


def test_conv1d_is_served_fused_through_the_transposed_weight(calls):
    model = peft_model(GPT2Block(), target_modules=["c_fc", "c_proj"], fan_in_fan_out=True)
    assert model.base_model.model.c_fc.fan_in_fan_out
    assert_patched_equals_peft(model, inputs())
    assert calls == {"lora_linear": 2, "lora_add": 0}


def test_lora_bias_is_added_once_with_the_base_bias(calls):
    model = peft_model(MLP(), lora_bias=True, lora_dropout=0.1)  # eval mode: no dropout
    assert model.base_model.model.lin0.lora_B["default"].bias is not None
    assert_patched_equals_peft(model, inputs())
    assert calls == {"lora_linear": 2, "lora_add": 0}


def two_adapters(base, dropout=0.0, **options):
    model = peft_model(base, lora_dropout=dropout, **options)
    torch.manual_seed(2)
    model.add_adapter("other", LoraConfig(r=3, lora_alpha=12, target_modules=options.get("target_modules",
                                          ["lin0", "lin1"]), init_lora_weights=False, lora_dropout=dropout / 2,
                                          lora_bias=options.get("lora_bias", False)))
    model.base_model.set_adapter(["default", "other"])
    return _randomize(model)


@pytest.mark.parametrize("base", ["linear", "conv1d"])
def test_two_active_adapters_are_one_call_of_the_concatenated_ranks(base, calls):
    options = {"target_modules": ["c_fc", "c_proj"], "fan_in_fan_out": True} if base == "conv1d" else {}
    model = two_adapters(GPT2Block() if base == "conv1d" else MLP(), lora_bias=True, **options)
    assert model.base_model.active_adapters == ["default", "other"]
    assert_patched_equals_peft(model, inputs())
    assert calls == {"lora_linear": 2, "lora_add": 0}


def test_two_active_adapters_with_dropout_draw_a_mask_each(calls):
    """In training mode each adapter draws its own mask, as PEFT does: the first term inside the
    base GEMM (lora_linear), the second by lora_add, with the seeds torch's generator gives in turn."""
    model = two_adapters(MLP(), dropout=0.4, lora_bias=True)
    layer = model.base_model.model.lin0
    fusedlora.patch_peft(model)
    layer.train()
    x = inputs(shape=(3, 4))
    torch.manual_seed(5)
    seeds = [draw_seed(), draw_seed()]
    torch.manual_seed(5)
    got = layer(x)
    assert calls == {"lora_linear": 1, "lora_add": 1}
    assert seeds[0] != seeds[1]

    def reference(dtype, magnitude=False):
        f = torch.abs if magnitude else (lambda t: t)  # magnitude: the float64 run on |inputs|
        t = {n: f(p.detach().to(dtype)) for n, p in layer.named_parameters()}
        xx = f(x.to(dtype))
        y = fusedlora.reference.lora_linear(
            xx, t["base_layer.weight"], t["base_layer.bias"], t["lora_A.default.weight"],
            t["lora_B.default.weight"], layer.scaling["default"], fusedlora.dropout_mask(seeds[0], x.shape, 0.4), 0.4)
        y = fusedlora.reference.lora_add(y, xx, t["lora_A.other.weight"], t["lora_B.other.weight"],
                                         layer.scaling["other"], fusedlora.dropout_mask(seeds[1], x.shape, 0.2), 0.2)
        return y + layer.scaling["default"] * t["lora_B.default.bias"] + layer.scaling["other"] * t["lora_B.other.bias"]

    # lora_linear over both ranks' worth of steps, then lora_add's sum and the two lora_B biases.
    n = chain_lengths(12, K, HIDDEN, 4 + 3)["y"] + 4
    assert_oracle("y", got, reference(torch.float32), reference(torch.float64),
                  reference(torch.float64, magnitude=True), n, torch.float32)


def test_lora_stacked_on_loha_adds_to_the_loha_output(calls):
    """PeftMixedModel: a LoRA adapter added to a layer that carries LoHa wraps the LoHa layer, whose
    own forward (with its delta) is the LoRA layer's base; only the innermost nn.Linear is not it."""
    torch.manual_seed(1)
    model = PeftMixedModel(MLP().to(DEVICE), LoHaConfig(r=4, target_modules=["lin0"], init_weights=False), "loha")
    model.add_adapter("lora", LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=False))
    model.set_adapter(["loha", "lora"])
    _randomize(model.eval())
    lin0 = model.base_model.model.lin0
    assert isinstance(lin0, lora.Linear) and type(lin0.base_layer).__name__ == "Linear"
    assert type(lin0.base_layer).__module__.startswith("peft.tuners.loha")
    assert_patched_equals_peft(model, inputs())
    assert calls == {"lora_linear": 1, "lora_add": 1}  # lin1 over its nn.Linear, lin0 over LoHa


class Scaled(nn.Module):
    """A user's layer: PEFT wraps it through LoraConfig._register_custom_module."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = K, HIDDEN
        self.weight = nn.Parameter(torch.randn(HIDDEN, K) / K ** 0.5)

    def forward(self, x):
        return torch.nn.functional.silu(x) @ self.weight.t() * 1.5


class ClampedLinear(nn.Linear):
    """An nn.Linear subclass whose forward is not nn.Linear's: PEFT wraps it as a Linear."""

    def forward(self, x):
        return super().forward(x).clamp(-0.5, 0.5)


def hooked_linear():
    layer = nn.Linear(K, HIDDEN)
    layer.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    return layer


@pytest.mark.parametrize("first", ["custom-module", "linear-subclass", "hooked-linear"])
def test_a_base_layer_fusedlora_does_not_own_runs_its_own_forward(first, calls):
    torch.manual_seed(0)
    base = {"custom-module": Scaled, "linear-subclass": lambda: ClampedLinear(K, HIDDEN),
            "hooked-linear": hooked_linear}[first]()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=False)
    if first == "custom-module":
        config._register_custom_module({Scaled: lora.Linear})
    torch.manual_seed(1)
    model = _randomize(get_peft_model(MLP(base).to(DEVICE), config)).eval()
    if first != "custom-module":
        model.base_model.model.lin0.base_layer.weight.requires_grad_(True)  # its gradient through its autograd
    assert_patched_equals_peft(model, inputs())
    assert calls == {"lora_linear": 1, "lora_add": 1}


def test_fp16_adapters_under_an_fp32_base_take_the_cast_x(calls):
    """PEFT casts x to the adapters' dtype; lora_add takes that x and adds into the fp32 output."""
    model = peft_model(MLP())
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.half()
    exact = run(copy.deepcopy(model).double(), inputs().double())
    low = run(model, inputs())
    fusedlora.patch_peft(model)
    got = run(model, inputs())
    assert calls == {"lora_linear": 0, "lora_add": 2}
    assert got[0].dtype == torch.float32
    for name in exact[1]:
        assert got[1][name].dtype == low[1][name].dtype
    assert_run_normwise(got, low, exact)


def test_adapters_of_two_dtypes_are_added_one_by_one(calls):
    """An fp32 and a bf16 adapter active together: no concatenation; the fp32 one inside the base
    GEMM, the bf16 one by lora_add on x cast to bf16, as PEFT casts it."""
    model = two_adapters(MLP())
    for name, p in model.named_parameters():
        if ".other." in name:
            p.data = p.data.bfloat16()
    exact = run(copy.deepcopy(model).double(), inputs().double())
    low = run(model, inputs())
    fusedlora.patch_peft(model)
    got = run(model, inputs())
    assert calls == {"lora_linear": 2, "lora_add": 2}
    for name in exact[1]:
        assert got[1][name].dtype == low[1][name].dtype
    assert_run_normwise(got, low, exact)


def test_split_path_under_autocast_keeps_peft_dtypes(calls):
    torch.manual_seed(1)
    model = PeftMixedModel(MLP().to(DEVICE), LoHaConfig(r=4, target_modules=["lin0"], init_weights=False), "loha")
    model.add_adapter("lora", LoraConfig(r=4, lora_alpha=8, target_modules=["lin0"], init_lora_weights=False))
    model.set_adapter(["loha", "lora"])
    model.eval()
    x = inputs()
    exact = run(copy.deepcopy(model).double(), x.double())
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        want = run(model, x)
        fusedlora.patch_peft(model)
        got = run(model, x)
    assert calls["lora_add"] == 1
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    assert_run_normwise(got, want, exact)


def test_mixed_batch_over_conv1d_and_its_fallback_over_a_custom_base(calls):
    """adapter_names= over Conv1D goes through multi_lora_linear with the transposed weight; over a
    base layer it cannot compute itself, PEFT's own forward runs, reported once."""
    model = two_adapters(GPT2Block(), target_modules=["c_fc", "c_proj"], fan_in_fan_out=True)
    x, names = inputs(shape=(3, 4)), ["other", "__base__", "default"]
    with torch.no_grad():
        want = model(x, adapter_names=names)
        fusedlora.patch_peft(model)
        multi = []
        real = fusedlora.peft.forward.multi_lora_linear
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(fusedlora.peft.forward, "multi_lora_linear", lambda *a, **k: multi.append(1) or real(*a, **k))
            got = model(x, adapter_names=names)
    assert len(multi) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["lin0"], init_lora_weights=False)
    config._register_custom_module({Scaled: lora.Linear})
    model = get_peft_model(MLP(Scaled()).to(DEVICE), config).eval()
    with torch.no_grad():
        want = model(x, adapter_names=["default", "__base__", "default"])
        fusedlora.patch_peft(model)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = model(x, adapter_names=["default", "__base__", "default"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    messages = fallback_warnings(record)
    assert len(messages) == 1 and "mixed-adapter batch over a Scaled base layer" in messages[0]


def compile_case(kind):
    if kind == "conv1d-two-adapters-dropout-lora_bias":
        return two_adapters(GPT2Block(), dropout=0.3, lora_bias=True, target_modules=["c_fc", "c_proj"],
                            fan_in_fan_out=True).train()
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], lora_dropout=0.3, init_lora_weights=False)
    config._register_custom_module({Scaled: lora.Linear})
    return get_peft_model(MLP(Scaled()).to(DEVICE), config).train()


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("kind,ops", [
    ("conv1d-two-adapters-dropout-lora_bias", {"lora_linear": 2, "lora_add": 2}),
    ("custom-base-module", {"lora_linear": 1, "lora_add": 1}),
])
def test_compiled_patched_layers_match_eager(kind, ops):
    """The new paths trace whole: torch.compile(fullgraph=True, dynamic=True) of the patched model in
    training mode (dropout drawn in the graph) gives eager's loss and gradients bitwise under
    aot_eager, in one graph, with the counted fusedlora ops in it."""
    eager, model = compile_case(kind), compile_case(kind)
    fusedlora.patch_peft(eager)
    fusedlora.patch_peft(model)
    backend, graphs = recording("aot_eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    batches = [(rows, [inputs(rows, shape=(rows,))], torch.randn(rows, N, generator=torch.Generator().manual_seed(rows))
                .to(DEVICE)) for rows in (3, 6)]
    assert assert_steps_equal(eager, model, compiled, batches) > 4
    assert graphs_compiled() == 1
    for name, n in ops.items():
        assert op_calls(graphs, getattr(torch.ops.fusedlora, name).default) == n


@pytest.mark.parametrize("layer", ["qlora", "lora-linear"])
def test_4bit_base_runs_as_it_is_and_gets_the_low_rank_term_added(layer, calls):
    """A bitsandbytes Linear4bit base, under PEFT's QLoRA layer (a model marked as loaded in 4 bits)
    or under a plain LoRA Linear (PEFT's default dispatch of a Linear subclass): the quantized layer
    runs as it is and lora_add adds the adapter's term. The base cannot run in float64, so PEFT's own
    fp32 forward is the reference: the same base output, the low-rank term to fp32 rounding."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = nn.Linear(K, HIDDEN)
    quantized = bnb.nn.Linear4bit(K, HIDDEN, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    quantized.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    quantized.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    base = MLP(quantized)
    base.is_loaded_in_4bit = layer == "qlora"
    model = peft_model(base, lora_dropout=0.1)
    module = "peft.tuners.lora.bnb" if layer == "qlora" else "peft.tuners.lora.layer"
    assert type(model.base_model.model.lin0).__module__ == module
    want = run(model, inputs())
    assert fusedlora.patch_peft(model) == 2
    got = run(model, inputs())
    assert calls == {"lora_linear": 1, "lora_add": 1}
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-5, msg=name)
