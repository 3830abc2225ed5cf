"""Adapters on disk: fusedlora <-> PEFT in both directions, and bad files refused with the model untouched."""
import json
import shutil

import peft
import pytest
import torch
from lora_models import TARGETS, logits, tiny_llama, tokens
from oracle import assert_normwise
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import fusedlora
from fusedlora.peft.adapter_io import CONFIG_NAME, PREFIX, WEIGHTS_NAME

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
OPTIONS = dict(target_modules=TARGETS, r=4, lora_alpha=8, bias="lora_only", modules_to_save=["lm_head"],
               rank_pattern={"layers.1.mlp.down_proj": 2, "v_proj": 6}, alpha_pattern={"q_proj": 3})


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", request.param)
    return request.param


@torch.no_grad()
def perturb(model, names):
    """Stand-in for training: move the named parameters (biases, modules to save) off their base values."""
    gen = torch.Generator().manual_seed(5)
    params = dict(model.named_parameters())
    for name in names:
        params[name].add_(0.1 * torch.randn(params[name].shape, generator=gen).to(params[name].device))


def injected_model():
    model = fusedlora.inject(tiny_llama(), init_lora_weights=False, **OPTIONS)
    perturb(model, [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n])
    return model


def assert_logits_match(got, peft_model, ids):
    """`got` (fusedlora's logits) against PEFT's, in fp32 and in float64, by the oracle."""
    low = logits(peft_model, ids)
    exact = logits(peft_model.double(), ids)
    assert_normwise(dict(logits=got), dict(logits=low), dict(logits=exact))


@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
def test_fusedlora_adapter_loads_in_peft(backend, tmp_path):
    model = injected_model()
    ids = tokens()
    got = logits(model, ids)
    fusedlora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["target_modules"] == sorted(TARGETS) and config["modules_to_save"] == ["lm_head"]
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    layers = dict(peft_model.base_model.model.named_modules())
    assert layers["model.layers.1.mlp.down_proj"].r["default"] == 2
    assert layers["model.layers.0.self_attn.v_proj"].r["default"] == 6
    assert layers["model.layers.0.self_attn.q_proj"].scaling["default"] == 3 / 4
    assert_logits_match(got, peft_model, ids)


@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
def test_peft_adapter_loads_into_a_plain_model(backend, tmp_path):
    torch.manual_seed(1)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, use_rslora=True, **OPTIONS))
    perturb(peft_model, [n for n, p in peft_model.named_parameters() if p.requires_grad and ".lora_" not in n])
    peft_model.save_pretrained(tmp_path)
    model = fusedlora.load_adapter(tiny_llama(), tmp_path)
    layers = dict(model.named_modules())
    assert layers["model.layers.1.mlp.down_proj"].r == 2 and layers["model.layers.0.self_attn.v_proj"].r == 6
    assert layers["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(3 / 2)  # rslora: 3 / √4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in trainable and "model.layers.0.mlp.up_proj.base_layer.bias" in trainable
    assert "model.layers.0.input_layernorm.weight" not in trainable
    got = logits(model, tokens())
    # fusedlora reads the files as PEFT reads them back. Before peft 0.21 PEFT's save leaves out the
    # base-layer biases bias="lora_only" trains (0.18.0 to 0.20.0: its own reload is 4.1 off the live
    # model's logits), so the live model is the oracle only from 0.21 on.
    assert_logits_match(got, PeftModel.from_pretrained(tiny_llama(), tmp_path).eval(), tokens())
    if Version(peft.__version__) >= Version("0.21"):
        assert_logits_match(got, peft_model.eval(), tokens())


def test_fusedlora_roundtrip_is_exact(tmp_path):
    model = injected_model()
    fusedlora.save_adapter(model, tmp_path)
    loaded = tiny_llama()
    state = torch.random.get_rng_state()
    fusedlora.load_adapter(loaded, tmp_path)
    assert torch.equal(torch.random.get_rng_state(), state), "load_adapter must not move the caller's RNG"
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert ({n: p.requires_grad for n, p in loaded.named_parameters()}
            == {n: p.requires_grad for n, p in model.named_parameters()})
    for name, layer in model.named_modules():
        if isinstance(layer, fusedlora.LoRALinear):
            other = loaded.get_submodule(name)
            assert (other.r, other.lora_alpha, other.scaling) == (layer.r, layer.lora_alpha, layer.scaling)
    # Into a model that already has the layers: the weights are copied in place.
    target = fusedlora.inject(tiny_llama(), **OPTIONS)
    fusedlora.load_adapter(target, tmp_path)
    assert all(torch.equal(target.state_dict()[k], want[k]) for k in want)


def test_read_adapter_without_a_model(tmp_path):
    fusedlora.save_adapter(injected_model(), tmp_path)
    config, layers, extra = fusedlora.read_adapter(tmp_path)
    assert config["peft_type"] == "LORA" and len(layers) == 14
    down = layers["model.layers.1.mlp.down_proj"]
    assert down.lora_A.shape == (2, 128) and down.lora_B.shape == (64, 2) and down.scaling == 8 / 2
    assert layers["model.layers.1.self_attn.q_proj"].scaling == 3 / 4
    assert sorted(extra) == sorted(["lm_head.weight"] + [f"model.layers.{i}.{m}.base_layer.bias" for i in range(2)
                                                         for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                                   "self_attn.v_proj", "self_attn.o_proj",
                                                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")])


def edit_weights(change):
    def apply(directory):
        tensors = load_file(str(directory / WEIGHTS_NAME))
        change(tensors)
        save_file(tensors, str(directory / WEIGHTS_NAME))
    return apply


def edit_config(change):
    def apply(directory):
        config = json.loads((directory / CONFIG_NAME).read_text())
        change(config)
        (directory / CONFIG_NAME).write_text(json.dumps(config))
    return apply


def write(name, data: bytes):
    return lambda directory: (directory / name).write_bytes(data)


Q_A = PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = PREFIX + "model.layers.0.self_attn.q_proj.lora_B.weight"
EMBED = PREFIX + "model.embed_tokens."

BAD = [
    # (id, how to break a good adapter directory, file named, words the message must hold)
    ("no-directory", lambda d: shutil.rmtree(d), None, ["not a directory"]),
    ("no-config", lambda d: (d / CONFIG_NAME).unlink(), CONFIG_NAME, ["missing"]),
    ("no-weights", lambda d: (d / WEIGHTS_NAME).unlink(), WEIGHTS_NAME, ["missing"]),
    ("pickle-only", lambda d: (d / WEIGHTS_NAME).rename(d / "adapter_model.bin"), WEIGHTS_NAME,
     ["adapter_model.bin", "pickle", "never"]),
    ("truncated", lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-100]), WEIGHTS_NAME,
     ["truncated or malformed"]),
    ("garbage-weights", write(WEIGHTS_NAME, b"\x80\x04not safetensors"), WEIGHTS_NAME, ["truncated or malformed"]),
    ("bad-json", write(CONFIG_NAME, b'{"peft_type": "LORA", "r": '), CONFIG_NAME, ["not valid JSON"]),
    ("json-list", write(CONFIG_NAME, b"[1, 2]"), CONFIG_NAME, ["JSON object", "list"]),
    ("not-lora", edit_config(lambda c: c.update(peft_type="IA3")), CONFIG_NAME, ["peft_type is 'IA3'", "LoRA"]),
    ("dora-config", edit_config(lambda c: c.update(use_dora=True)), WEIGHTS_NAME,
     ["use_dora = True", "has no", "lora_magnitude_vector"]),
    ("fan-in-fan-out", edit_config(lambda c: c.update(fan_in_fan_out=True)), CONFIG_NAME, ["fan_in_fan_out"]),
    ("bad-bias-mode", edit_config(lambda c: c.update(bias="some")), CONFIG_NAME, ["bias must be one of"]),
    ("bad-r", edit_config(lambda c: c.update(r="4")), CONFIG_NAME, ["r must be a positive int"]),
    ("bad-pattern", edit_config(lambda c: c.update(rank_pattern={"(": 2})), CONFIG_NAME, ["not a valid regex"]),
    ("r-disagrees", edit_config(lambda c: c.update(r=5)), WEIGHTS_NAME, ["r = 3 rows", "r = 5"]),
    ("save-unknown", edit_config(lambda c: c.update(modules_to_save=["nope"])), CONFIG_NAME,
     ["'nope' matches no module"]),
    ("dora-key", edit_weights(lambda t: t.update({Q_A[:-len("lora_A.weight")] + "lora_magnitude_vector":
                                                  torch.ones(64)})), WEIGHTS_NAME,
     ["use_dora = False", "has a", "lora_magnitude_vector"]),
    ("lora-bias", edit_weights(lambda t: t.update({Q_B[:-6] + "bias": torch.ones(64)})), WEIGHTS_NAME,
     ["lora_B.bias", "lora_bias"]),
    ("a-without-b", edit_weights(lambda t: t.pop(Q_B)), WEIGHTS_NAME, [Q_A, "no matching lora_B"]),
    ("no-prefix", edit_weights(lambda t: t.update({"lora_A.weight": t.pop(Q_A)})), WEIGHTS_NAME,
     ["'lora_A.weight'", "does not start with"]),
    ("int-tensor", edit_weights(lambda t: t.update({Q_A: t[Q_A].to(torch.int32)})), WEIGHTS_NAME,
     [Q_A, "torch.int32"]),
    ("unknown-module", edit_weights(lambda t: t.update({Q_A.replace("layers.0", "layers.7"): t[Q_A].clone(),
                                                        Q_B.replace("layers.0", "layers.7"): t[Q_B].clone()})),
     WEIGHTS_NAME, ["no module 'model.layers.7.self_attn.q_proj'"]),
    ("wrong-shape", edit_weights(lambda t: t.update({Q_A: t[Q_A][:, :60].contiguous()})), WEIGHTS_NAME,
     ["(3, 60)", "do not fit", "(3, 64)"]),
    ("not-linear", edit_weights(lambda t: t.update({EMBED + "lora_A.weight": torch.ones(3, 128),
                                                    EMBED + "lora_B.weight": torch.ones(64, 3)})),
     WEIGHTS_NAME, ["model.embed_tokens (Embedding) is not an nn.Linear"]),
    ("extra-unknown", edit_weights(lambda t: t.update({PREFIX + "model.nope.weight": torch.ones(3)})), WEIGHTS_NAME,
     ["no tensor 'model.nope.weight'"]),
    ("extra-shape", edit_weights(lambda t: t.update({PREFIX + "lm_head.weight": torch.ones(3, 64)})), WEIGHTS_NAME,
     ["lm_head.weight", "(3, 64)", "(128, 64)"]),
]


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m).__name__ for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model, before):
    tensors, types, grads = snapshot(model)
    assert types == before[1], "modules were replaced"
    assert grads == before[2], "trainability changed"
    assert sorted(tensors) == sorted(before[0]) and all(torch.equal(tensors[k], before[0][k]) for k in tensors)


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    fusedlora.save_adapter(fusedlora.inject(tiny_llama(), ["q_proj", "v_proj"], r=4, lora_alpha=8,
                                            modules_to_save=["lm_head"], rank_pattern={"q_proj": 3}), directory)
    return directory


@pytest.mark.parametrize("breakage,file,words", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_adapter_is_refused_and_the_model_left_as_it_was(breakage, file, words, good_adapter, tmp_path):
    directory = tmp_path / "adapter"
    shutil.copytree(good_adapter, directory)
    breakage(directory)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(fusedlora.AdapterFileError) as info:
        fusedlora.load_adapter(model, directory)
    message = str(info.value)
    assert str(directory / file) in message if file else str(directory) in message
    for word in words:
        assert word in message, (word, message)
    assert_unchanged(model, before)
    assert isinstance(info.value, ValueError)


def test_peft_dora_adapters_load_and_save_both_ways(tmp_path, monkeypatch):
    """A PEFT DoRA adapter (magnitude vector included) loads into DoRA LoRALinear layers that compute
    PEFT's logits; saved again, PEFT loads it back to the same logits."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    torch.manual_seed(0)
    peft = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True,
                                                   init_lora_weights=False)).eval()
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.5)
    peft.save_pretrained(tmp_path / "peft")
    ids = tokens()
    want = logits(peft, ids)
    model = fusedlora.load_adapter(tiny_llama(), tmp_path / "peft").eval()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.use_dora and layer.lora_magnitude_vector is not None
    torch.testing.assert_close(logits(model, ids), want, rtol=1e-5, atol=1e-5)
    fusedlora.save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())["use_dora"] is True
    back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, ids), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(fusedlora.AdapterFileError, match="is DoRA"):
        fusedlora.load_adapter(fusedlora.inject(tiny_llama(), ["q_proj", "v_proj"], r=2), tmp_path / "peft")


def test_loading_into_lora_layers_that_do_not_fit(good_adapter):
    for make, words in [
        (lambda: fusedlora.inject(tiny_llama(), ["q_proj", "v_proj"], r=4), ["r = 3", "has r = 4"]),
        (lambda: fusedlora.inject(tiny_llama(), ["q_proj", "v_proj", "o_proj"], r=4, rank_pattern={"q_proj": 3}),
         ["no weights for the model's LoRA layers", "model.layers.0.self_attn.o_proj"]),
    ]:
        model = make()
        before = snapshot(model)
        with pytest.raises(fusedlora.AdapterFileError) as info:
            fusedlora.load_adapter(model, good_adapter)
        for word in words:
            assert word in str(info.value)
        assert_unchanged(model, before)
    model = fusedlora.inject(tiny_llama(), ["q_proj", "v_proj"], r=4, rank_pattern={"q_proj": 3})
    model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(fusedlora.AdapterFileError, match="is merged; unmerge"):
        fusedlora.load_adapter(model, good_adapter)


def test_save_adapter_refusals(tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        fusedlora.save_adapter(tiny_llama(), tmp_path)
    model = fusedlora.inject(tiny_llama(), ["q_proj"], lora_dropout=0.1)
    fusedlora.inject(model, ["v_proj"], lora_dropout=0.2)
    with pytest.raises(ValueError, match=r"several lora_dropout values \[0.1, 0.2\]"):
        fusedlora.save_adapter(model, tmp_path)
    assert not (tmp_path / WEIGHTS_NAME).exists()


@pytest.mark.parametrize("targets,saved_as", [
    (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
    # q_proj alone would select layer 1's as well: the full names are written instead
    (["0.self_attn.q_proj", "1.mlp.up_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]),
], ids=["short-names", "full-name-fallback"])
def test_save_adapter_roundtrip_with_bias_all_rslora_and_dropout(targets, saved_as, tmp_path, monkeypatch):
    """bias="all" writes every bias of the model (the untargeted layers' too), use_rslora and a non-zero
    lora_dropout go to the config, and target_modules selects exactly the injected layers: PEFT and
    load_adapter rebuild the same model (logits in eval mode, scalings, dropout modules)."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model = fusedlora.inject(tiny_llama(), targets, r=4, lora_alpha=8, lora_dropout=0.1, bias="all", use_rslora=True,
                             init_lora_weights=False)
    biases = [n for n, p in model.named_parameters() if n.endswith(".bias")]
    assert biases and all(p.requires_grad for n, p in model.named_parameters() if n.endswith(".bias"))
    perturb(model, biases)
    ids = tokens()
    got = logits(model.eval(), ids)
    fusedlora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (config["bias"], config["use_rslora"], config["lora_dropout"]) == ("all", True, 0.1)
    assert config["target_modules"] == saved_as
    stored = load_file(str(tmp_path / WEIGHTS_NAME))
    assert {k for k in stored if k.endswith(".bias")} == {PREFIX + n for n in biases}
    injected = sorted(n for n, m in model.named_modules() if isinstance(m, fusedlora.LoRALinear))

    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert sorted(layers) == injected
    for layer in layers.values():
        assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # rslora: alpha / sqrt(r)
        assert layer.lora_dropout["default"].p == 0.1
    assert_logits_match(got, peft_model, ids)

    loaded = fusedlora.load_adapter(tiny_llama(), tmp_path)
    want, have = model.state_dict(), loaded.state_dict()
    assert sorted(have) == sorted(want) and all(torch.equal(have[k], want[k]) for k in want)
    for name in injected:
        layer = loaded.get_submodule(name)
        assert (layer.use_rslora, layer.lora_dropout, layer.scaling) == (True, 0.1, pytest.approx(4.0))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
