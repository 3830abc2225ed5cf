"""QLoRA and QDoRA as PEFT sets them up: bitsandbytes Linear4bit base layers (nf4), the model marked as
loaded in 4 bits and passed through prepare_model_for_kbit_training, LoRA (PEFT dispatches its bnb
LoRA layer, peft.tuners.lora.bnb.Linear4bit) or DoRA on top; patched, then compared with PEFT's own
forward and gradients. The fused path's calls are counted, so a silent fallback fails.

The 4-bit layers cannot run in float64, but their function is x·dequant(W)ᵀ + b: the float64 oracle
is the same model with nn.Linear layers holding the dequantized weights, in float64."""
import copy
import warnings

import pytest
import torch
from oracle import assert_normwise
from torch import nn

import fusedlora
import fusedlora.peft.forward

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from peft.tuners.lora import bnb as lora_bnb  # noqa: E402

K, HIDDEN, N = 32, 48, 24
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes")


class MLP(nn.Module):
    def __init__(self, lin0, lin1):
        super().__init__()
        self.lin0, self.lin1 = lin0, lin1

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def quantized(linear: nn.Linear) -> nn.Module:
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True, compute_dtype=torch.float32,
                          quant_type="nf4")
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def models(use_dora: bool):
    """(PEFT's QLoRA/QDoRA model, its float64 twin over the dequantized weights)."""
    torch.manual_seed(0)
    plain = MLP(nn.Linear(K, HIDDEN), nn.Linear(HIDDEN, N))
    base = MLP(quantized(plain.lin0), quantized(plain.lin1))
    base.is_loaded_in_4bit = True
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    twin = copy.deepcopy(plain)
    with torch.no_grad():
        for name in ("lin0", "lin1"):
            layer = getattr(base, name)
            getattr(twin, name).weight.copy_(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=False,
                        use_dora=use_dora)
    torch.manual_seed(1)
    model = get_peft_model(base, config).eval()
    twin = get_peft_model(twin, copy.deepcopy(config)).eval()
    with torch.no_grad():
        own = dict(model.named_parameters())
        for name, p in twin.named_parameters():
            if "lora_" in name:
                if "lora_magnitude_vector" in name:
                    own[name].mul_(1.25)  # PEFT starts m at the row norms; moved so that it matters
                p.copy_(own[name])
    assert type(model.base_model.model.lin0) is lora_bnb.Linear4bit
    return model, twin.double()


def run(model, x, dtype=torch.float32):
    model.zero_grad(set_to_none=True)
    x = x.detach().to(dtype).clone().requires_grad_()
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out.double() * weights).sum().backward()
    grads = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return {"out": out.detach(), "x": x.grad, **grads}


@pytest.fixture
def counted(monkeypatch):
    counts = {"lora_add": 0, "lora_linear": 0, "dora_linear": 0}
    for module, name in ((fusedlora.modules.lora_linear, "lora_add"), (fusedlora.modules.lora_linear, "lora_linear"),
                         (fusedlora.modules.lora_linear, "dora_linear")):
        real = getattr(module, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)
    return counts


@pytest.mark.parametrize("use_dora,served", [(False, {"lora_add": 2, "lora_linear": 0, "dora_linear": 0}),
                                             (True, {"lora_add": 0, "lora_linear": 0, "dora_linear": 2})],
                         ids=["qlora", "qdora"])
def test_4bit_models_are_served_and_equal_peft(use_dora, served, counted):
    model, twin = models(use_dora)
    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(0))
    low = run(model, x)
    exact = run(twin, x, torch.float64)
    assert fusedlora.patch_peft(model) == 2
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = run(model, x)
    assert [str(w.message) for w in record if "runs PEFT's own forward" in str(w.message)] == []
    assert counted == served
    assert_normwise(got, low, exact)


def test_qdora_keeps_no_dequantized_weight_for_backward(counted):
    """The fused QDoRA makes the dequantized (N, K) weight again in backward instead of keeping it from
    the forward: no tensor autograd saves is as large as a layer's N·K (PEFT's QDoRA keeps several),
    and the gradients still equal PEFT's (the test above)."""
    model, _ = models(use_dora=True)
    fusedlora.patch_peft(model)
    smallest = min(K * HIDDEN, HIDDEN * N)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    assert counted["dora_linear"] == 2 and saved
    assert max(saved) < smallest, (sorted(saved)[-5:], smallest)
    assert x.grad is not None and torch.isfinite(x.grad).all()
