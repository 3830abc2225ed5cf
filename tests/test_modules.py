"""LoRALinear and inject(): the drop-in modules for plain PyTorch and transformers models."""
import copy
import math

import pytest
import torch
from lora_models import DEVICE, N_TARGETS, TARGETS, assert_training_lowers_loss, logits, tiny_llama, tokens
from oracle import check_lora_linear
from peft import LoraConfig, get_peft_model
from torch import nn

import fusedlora
from fusedlora.core.dropout import draw_seed

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
f32, bf16 = torch.float32, torch.bfloat16


def linear(K=40, N=24, dtype=f32, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=bias).to(device=DEVICE, dtype=dtype)


def forward_and_grads(layer, x):
    """y, and the gradients of x, lora_A and lora_B for a cotangent dy in y's dtype: (y, grads, dy)."""
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(y)
    y.backward(dy)
    return y.detach(), {"x": x.grad, "lora_A": layer.lora_A.grad, "lora_B": layer.lora_B.grad}, dy


@pytest.mark.parametrize("dtype,use_rslora,p", [(f32, False, 0.0), (f32, True, 0.3), (bf16, False, 0.2)],
                         ids=["f32", "f32-rslora-dropout", "bf16-base-dropout"])
def test_lora_linear_module_matches_reference(dtype, use_rslora, p):
    """Forward and gradients in training mode equal the float64 reference with the mask of the seed
    the module draws from torch's generator; the base stays frozen, the adapters stay fp32."""
    layer = fusedlora.LoRALinear(linear(dtype=dtype), r=6, lora_alpha=12, lora_dropout=p, use_rslora=use_rslora,
                                 init_lora_weights=False).train()
    assert layer.lora_A.dtype == f32 and not layer.base_layer.weight.requires_grad
    assert layer.scaling == (12 / math.sqrt(6) if use_rslora else 2.0)
    x = torch.randn(3, 7, 40).to(device=DEVICE, dtype=dtype)
    torch.manual_seed(11)
    seed = draw_seed()
    torch.manual_seed(11)
    y, grads, dy = forward_and_grads(layer, x)
    keep = fusedlora.dropout_mask(seed, x.shape, p, DEVICE) if p > 0 else None
    inputs = dict(x=x, weight=layer.base_layer.weight.detach(), bias=layer.base_layer.bias.detach(),
                  lora_A=layer.lora_A.detach(), lora_B=layer.lora_B.detach())
    check_lora_linear(y, grads, inputs, layer.scaling, keep, p, dy)


def test_dropout_only_in_training_mode():
    layer = fusedlora.LoRALinear(linear(), r=4, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(5, 40, device=DEVICE)
    layer.eval()
    evaluated = layer(x)
    no_dropout = fusedlora.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(evaluated, no_dropout, rtol=0, atol=0)
    layer.train()
    assert not torch.allclose(layer(x), evaluated)


def test_initialisations_follow_peft():
    base = linear(K=256, N=32)
    default = fusedlora.LoRALinear(base, r=8)
    bound = 1 / math.sqrt(256)  # kaiming-uniform with a=√5 on (r, in): U(-1/√in, 1/√in)
    assert default.lora_A.abs().max() <= bound and default.lora_A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(default.lora_B) == 0
    x = torch.randn(4, 256, device=DEVICE)
    torch.testing.assert_close(default(x), base(x), rtol=1e-6, atol=1e-6)
    gaussian = fusedlora.LoRALinear(linear(K=256, N=32), r=4, init_lora_weights="gaussian")
    assert abs(gaussian.lora_A.std().item() - 1 / 4) < 0.03 and torch.count_nonzero(gaussian.lora_B) == 0
    random = fusedlora.LoRALinear(linear(K=256, N=32), r=4, init_lora_weights=False)
    assert random.lora_B.abs().max() <= 1 / 2 and torch.count_nonzero(random.lora_B) == random.lora_B.numel()


@pytest.mark.parametrize("dtype", [f32, bf16])
def test_merge_and_unmerge_keep_outputs(dtype):
    layer = fusedlora.LoRALinear(linear(dtype=dtype), r=4, lora_alpha=8, init_lora_weights=False).eval()
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(6, 40).to(device=DEVICE, dtype=dtype)
    want = layer(x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    merged = layer(x)
    tol = 1e-5 if dtype == f32 else 3e-2
    torch.testing.assert_close(merged, want, rtol=tol, atol=tol)
    torch.testing.assert_close(merged, layer.base_layer(x), rtol=0, atol=0)  # the base alone
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=tol, atol=tol)
    torch.testing.assert_close(layer(x), want, rtol=tol, atol=tol)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merging_twice_is_refused_and_changes_nothing():
    layer = fusedlora.LoRALinear(linear(), r=4, lora_alpha=8, init_lora_weights=False).eval()
    layer.merge()
    merged = layer.base_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    assert layer.merged and torch.equal(layer.base_layer.weight, merged)


def test_set_options_changes_what_the_layer_computes():
    """alpha, dropout and rslora changed after construction (as a loaded adapter does): the scaling and the
    forward follow; bad values are refused before anything changes."""
    layer = fusedlora.LoRALinear(linear(), r=4, lora_alpha=8, init_lora_weights=False).eval()
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    layer.set_options(lora_alpha=6, lora_dropout=0.25, use_rslora=True)
    assert (layer.lora_alpha, layer.lora_dropout, layer.use_rslora, layer.scaling) == (6, 0.25, True, 3.0)
    inputs = dict(x=x, weight=layer.base_layer.weight.detach(), bias=layer.base_layer.bias.detach(),
                  lora_A=layer.lora_A.detach(), lora_B=layer.lora_B.detach())
    check_lora_linear(layer(x).detach(), None, inputs, 3.0, None, 0.0)
    layer.train()
    torch.manual_seed(4)
    keep = fusedlora.dropout_mask(draw_seed(), x.shape, 0.25, DEVICE)
    torch.manual_seed(4)
    check_lora_linear(layer(x).detach(), None, inputs, 3.0, keep, 0.25)
    with pytest.raises(ValueError, match="lora_dropout"):
        layer.set_options(lora_alpha=6, lora_dropout=1.0, use_rslora=False)
    assert (layer.lora_dropout, layer.use_rslora, layer.scaling) == (0.25, True, 3.0)


def test_base_without_bias():
    """nn.Linear(bias=False): forward and gradients against the reference with no bias, merge and unmerge."""
    layer = fusedlora.LoRALinear(linear(bias=False), r=4, lora_alpha=8, init_lora_weights=False).eval()
    assert layer.base_layer.bias is None
    x = torch.randn(2, 7, 40, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    y, grads, dy = forward_and_grads(layer, x)
    inputs = dict(x=x, weight=layer.base_layer.weight.detach(), bias=None, lora_A=layer.lora_A.detach(),
                  lora_B=layer.lora_B.detach())
    check_lora_linear(y, grads, inputs, layer.scaling, None, 0.0, dy)
    layer.merge()
    torch.testing.assert_close(layer(x), x @ layer.base_layer.weight.t(), rtol=0, atol=0)
    layer.unmerge()
    check_lora_linear(layer(x).detach(), None, inputs, layer.scaling, None, 0.0)


@pytest.mark.parametrize("breakage", ["overflow", "nan"])
def test_merge_that_would_break_the_weight_is_refused(breakage):
    layer = fusedlora.LoRALinear(linear(dtype=bf16), r=2, init_lora_weights=False)
    with torch.no_grad():
        if breakage == "overflow":
            layer.lora_A.fill_(1e20)
            layer.lora_B.fill_(1e20)
        else:
            layer.lora_B[3, 1] = float("nan")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, before)


def test_extra_repr_is_readable():
    text = repr(fusedlora.LoRALinear(linear(), r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True))
    for part in ("r=4", "lora_alpha=16", "scaling=8", "lora_dropout=0.1", "use_rslora=True", "merged=False",
                 "Linear(in_features=40, out_features=24, bias=True)"):
        assert part in text, (part, text)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(base_layer=nn.Conv1d(3, 3, 1)), TypeError, ["nn.Linear", "Conv1d"]),
    (dict(r=0), ValueError, ["r must be a positive int", "0"]),
    (dict(r=2.0), ValueError, ["r must be a positive int"]),
    (dict(lora_dropout=1.0), ValueError, ["lora_dropout"]),
    (dict(lora_alpha=float("inf")), ValueError, ["lora_alpha", "finite"]),
    (dict(init_lora_weights="pissa"), ValueError, ["init_lora_weights", "pissa"]),
])
def test_lora_linear_bad_arguments(kwargs, error, words):
    args = dict(base_layer=linear(), r=4)
    args.update(kwargs)
    with pytest.raises(error) as info:
        fusedlora.LoRALinear(**args)
    for word in words:
        assert word in str(info.value)


def lora_names(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, fusedlora.LoRALinear))


@pytest.mark.parametrize("targets,expected", [
    (["q_proj", "v_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                            "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]),
    (["model.layers.1.mlp.up_proj"], ["model.layers.1.mlp.up_proj"]),  # an exact name
    (["proj"], []),  # a suffix must start at a dot: "proj" is no module's last name
    (r".*\.1\.self_attn\.(k|o)_proj", ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj"]),
    (r"self_attn\.q_proj", []),  # a regex must match the whole name
    ("all-linear", sorted(f"model.layers.{i}.{part}" for i in range(2) for part in
                          ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])),  # lm_head left out
])
def test_inject_matches_like_peft(targets, expected):
    model = tiny_llama()
    if not expected:
        with pytest.raises(ValueError, match="matches no nn.Linear"):
            fusedlora.inject(model, targets)
        assert lora_names(model) == []
        return
    fusedlora.inject(model, targets, r=2)
    assert lora_names(model) == expected
    peft = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=targets))
    assert sorted(n.removeprefix("base_model.model.") for n, m in peft.named_modules()
                  if hasattr(m, "lora_A") and "default" in m.lora_A) == expected


@pytest.mark.parametrize("options", [
    dict(target_modules=TARGETS),
    dict(target_modules="all-linear", bias="all", lora_alpha=32),
    dict(target_modules=["q_proj", "v_proj"], bias="lora_only", use_rslora=True),
    dict(target_modules=TARGETS, rank_pattern={"layers.1.mlp.down_proj": 2, "v_proj": 6},
         alpha_pattern={"q_proj": 3}),
    dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
], ids=["seven", "all-linear-bias-all", "lora_only", "patterns", "modules_to_save"])
def test_trainable_parameter_count_equals_peft(options, capsys):
    model = fusedlora.inject(tiny_llama(), **options)
    peft = get_peft_model(tiny_llama(), LoraConfig(**options))
    trainable, total = fusedlora.trainable_parameters(model)
    peft_trainable, peft_total = peft.get_nb_trainable_parameters()
    assert trainable == peft_trainable
    # PEFT keeps a frozen copy of each module to save besides the trained one; inject trains in place.
    copies = sum(p.numel() for p in model.lm_head.parameters()) if "modules_to_save" in options else 0
    assert total == peft_total - copies
    fusedlora.print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                               f"trainable%: {100 * trainable / total:.4f}")


def test_inject_trains_the_right_parameters():
    model = fusedlora.inject(tiny_llama(), ["q_proj", "down_proj"], bias="lora_only", modules_to_save=["lm_head"],
                             rank_pattern={"down_proj": 3}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 5})
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.{m}.{p}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")
                         for p in ("lora_A", "lora_B", "base_layer.bias")} | {"lm_head.weight"}
    layers = dict(model.named_modules())
    assert layers["model.layers.0.mlp.down_proj"].r == 3 and layers["model.layers.0.self_attn.q_proj"].r == 8
    assert layers["model.layers.1.self_attn.q_proj"].lora_alpha == 5
    assert layers["model.layers.0.self_attn.q_proj"].lora_alpha == 8


def test_inject_starts_as_the_base_model_and_refuses_bad_targets():
    ids = tokens()
    base = tiny_llama()
    want = logits(base, ids)
    fusedlora.inject(base, TARGETS)  # default init: B = 0
    torch.testing.assert_close(logits(base, ids), want, rtol=1e-5, atol=1e-5)
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    for targets, error, words in [
        (["mlp"], ValueError, ["model.layers.0.mlp (LlamaMLP)"]),
        (["q_proj", "embed_tokens"], ValueError, ["model.embed_tokens (Embedding)"]),
        (42, TypeError, ["target_modules"]),
        ("(", ValueError, ["not a valid regex"]),
    ]:
        with pytest.raises(error) as info:
            fusedlora.inject(model, targets)
        for word in words:
            assert word in str(info.value)
    with pytest.raises(ValueError, match="'nope' matches no module"):
        fusedlora.inject(model, TARGETS, modules_to_save=["nope"])
    with pytest.raises(ValueError, match="bias must be one of"):
        fusedlora.inject(model, TARGETS, bias="some")
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj: r must be a positive int"):
        fusedlora.inject(model, TARGETS, rank_pattern={"layers.0.mlp.up_proj": 0})
    assert lora_names(model) == [] and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fusedlora.inject(model, ["q_proj"])
    with pytest.raises(ValueError, match="already a LoRALinear"):
        fusedlora.inject(model, ["q_proj"])
    fusedlora.inject(model, "all-linear")  # adds the rest, leaves the LoRA layers' own base layers alone
    assert len(lora_names(model)) == N_TARGETS


def test_lora_linear_under_autocast():
    """Under autocast to bf16, as nn.Linear: bf16 output, close to the fp32 result."""
    layer = fusedlora.LoRALinear(linear(K=64, N=32), r=4, init_lora_weights=False).eval()
    x = torch.randn(8, 64, device=DEVICE)
    want = layer(x)
    with torch.autocast(DEVICE, dtype=bf16):
        got = layer(x)
        plain = layer.base_layer(x)
    assert got.dtype == plain.dtype == bf16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_training_with_dropout_lowers_the_loss(backend, monkeypatch):
    """A few AdamW steps on an injected tiny Llama with dropout 0.1, through each backend."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    torch.manual_seed(0)
    model = fusedlora.inject(tiny_llama(), TARGETS, r=4, lora_alpha=8, lora_dropout=0.1)
    assert_training_lowers_loss(model)
