"""patch_peft: a real PEFT model served through the fused path equals PEFT itself, and falls back to
PEFT's forward, saying why once, for what the fused path does not serve."""
import copy
import logging
import warnings

import numpy as np
import pytest
import torch
import triton.language as tl
import triton.runtime.interpreter as interpreter
from lora_models import (DEVICE, N_TARGETS, TARGETS, assert_layers_compute_lora, assert_run_matches,
                         assert_training_lowers_loss, logits, oracle_runs, recording_layers, run, tiny_llama, tokens)
from oracle import assert_normwise, assert_same, check_lora_linear
from peft import LoraConfig, PeftModel, get_peft_model

import fusedlora
from fusedlora.core.dropout import draw_seed
from fusedlora.peft.forward import MixedBatchCache
from fusedlora.kernels.common import interpreting

BACKENDS = ["triton", "torch"]
# transformers 5 warns from inside get_peft_model; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def peft_llama(dtype=torch.float32, seed=1, **options):
    """get_peft_model on q/k/v/o/gate/up/down with random (non-zero) A and B."""
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **options}
    config = LoraConfig(**options)
    base = tiny_llama(dtype=dtype)
    torch.manual_seed(seed)
    return get_peft_model(base, config).eval()


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("options", [{}, {"use_rslora": True, "lora_alpha": 16}, {"bias": "lora_only"}],
                         ids=["plain", "rslora", "bias-lora_only"])
def test_patched_logits_and_grads_equal_peft(backend, options):
    model = peft_llama(**options)
    ids = tokens()
    runs = oracle_runs(model, ids)
    assert fusedlora.patch_peft(model) == N_TARGETS
    with warnings.catch_warnings(record=True) as record, recording_layers(model) as layers:
        warnings.simplefilter("always")
        got = run(model, ids)
    assert fallback_warnings(record) == []  # the recording hooks sit on the LoRA layer: served fused still
    assert_run_matches(got, runs, torch.float32, lora_grads=2 * N_TARGETS)
    assert len(layers) == N_TARGETS
    assert_layers_compute_lora(model, layers, torch_ops=backend == "torch")
    if options.get("bias") == "lora_only":
        assert sum(name.endswith("base_layer.bias") for name in runs[0][1]) == N_TARGETS


@pytest.fixture
def bf16_rounding_as_on_gpu(monkeypatch):
    """Make the interpreter round fp32 -> bf16 to nearest even, as the GPU does, instead of truncating
    (TRITON-NOTES.md). One kernel tolerates the truncation (tests/oracle.py), but through a whole
    model its bias compounds: measured on this test's model, layer-0 LoRA gradients came out with up
    to 6x PEFT's bf16 error when truncating and at most 1.2x when rounding. Kernels cast with
    .to(), which the interpreter runs through _convert_float (triton 3.x)."""
    if not interpreting():
        return
    convert = interpreter._convert_float

    def round_bf16(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(data).view(np.float32)).to(torch.bfloat16)
            return rounded.view(torch.int16).numpy().view(np.uint16)
        return convert(data, src, dst, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", round_bf16)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bf16_base_with_fp32_adapters(backend, bf16_rounding_as_on_gpu):
    """PEFT's default dtypes: a bf16 base keeps fp32 adapters; the output stays bf16 as PEFT's does. Whole
    model against PEFT, and each layer on the inputs it got (a one-percent error in one layer's low-rank
    term moves the model's tensors by less than bf16 noise compounded over two layers does)."""
    model = peft_llama(dtype=torch.bfloat16)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    ids = tokens()
    runs = oracle_runs(model, ids)
    fusedlora.patch_peft(model)
    with warnings.catch_warnings(record=True) as record, recording_layers(model) as layers:
        warnings.simplefilter("always")
        got = run(model, ids)
    assert fallback_warnings(record) == []  # the recording hooks sit on the LoRA layer: served fused still
    assert got[0].dtype == torch.bfloat16
    assert_run_matches(got, runs, torch.bfloat16, lora_grads=2 * N_TARGETS)
    assert len(layers) == N_TARGETS
    assert_layers_compute_lora(model, layers, torch_ops=backend == "torch")


def test_unpatch_restores_peft_forward(monkeypatch):
    model = peft_llama()
    layers = [m for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]
    assert fusedlora.patch_peft(model) == N_TARGETS == len(layers)
    assert all("forward" in m.__dict__ for m in layers)
    assert fusedlora.patch_peft(model) == N_TARGETS  # patching again re-patches, no double wrapping
    assert fusedlora.unpatch_peft(model) == N_TARGETS
    assert not any("forward" in m.__dict__ for m in layers)
    assert fusedlora.unpatch_peft(model) == 0


def test_patched_layers_go_through_lora_linear(monkeypatch):
    """The patched forward really is the fused call: count lora_linear calls."""
    calls = []
    real = fusedlora.modules.lora_linear.lora_linear
    monkeypatch.setattr(fusedlora.modules.lora_linear, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model = peft_llama()
    fusedlora.patch_peft(model)
    logits(model, tokens())
    assert len(calls) == N_TARGETS


def two_adapter_model():
    model = peft_llama()
    torch.manual_seed(2)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
    return model


def test_set_adapter_save_and_reload_work_when_patched(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model = two_adapter_model()
    ids = tokens()
    want = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        want[name] = logits(model, ids)
    fusedlora.patch_peft(model)
    for name in ("other", "default"):
        model.set_adapter(name)
        torch.testing.assert_close(logits(model, ids), want[name], rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    fusedlora.patch_peft(reloaded)
    torch.testing.assert_close(logits(reloaded, ids), want["default"], rtol=1e-5, atol=1e-5)


def fallback_warnings(record):
    return [str(w.message) for w in record if "runs PEFT's own forward" in str(w.message)]


def mixed_run(model, ids, names):
    """Logits and every trainable gradient of a mixed-adapter batch (adapter_names=)."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, adapter_names=names).logits
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (out.double() * weights.to(out.device)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_mixed_batch_is_served_by_the_multi_adapter_kernels(backend):
    """adapter_names= rows go through multi_lora_linear: "other" covers only q/v (elsewhere its rows get
    the base alone, as in PEFT), "__base__" adds nothing; logits and both adapters' gradients match PEFT."""
    model = two_adapter_model()
    for name, p in model.named_parameters():  # train both adapters in the one batch
        p.requires_grad_("lora_" in name)
    ids = tokens(batch=3)
    names = ["other", "__base__", "default"]
    y64, g64 = mixed_run(copy.deepcopy(model).double(), ids, names)
    y_low, g_low = mixed_run(model, ids, names)
    fusedlora.patch_peft(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y, g = mixed_run(model, ids, names)
    assert fallback_warnings(record) == []
    assert any(".other." in n for n in g64) and any(".default." in n for n in g64)
    assert_normwise(dict(logits=y, **g), dict(logits=y_low, **g_low), dict(logits=y64, **g64))


def test_mixed_batch_sends_its_ids_to_the_device_once(monkeypatch):
    """The layers of a mixed-batch forward share one AdapterBatch per set of adapters they hold (here
    two: q/v hold "default" and "other", the rest "default" alone), kept in the model's cache, and the
    next forward with the same names and shape reuses them: no per-layer host-to-device copy or sort.
    Same code twice: bitwise. The cache sits above the backend: the torch one keeps this quick."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model = two_adapter_model()
    fusedlora.patch_peft(model)
    cache = model.fusedlora_batch_cache
    ids, names = tokens(batch=3), ["other", "__base__", "default"]
    with torch.no_grad():
        first = model(input_ids=ids, adapter_names=names).logits
        held = {key: cache.get(*key) for key in cache.keys()}
        second = model(input_ids=ids, adapter_names=names).logits
    assert sorted(key[1] for key in held) == [("default",), ("default", "other")]
    assert cache.keys() == list(held) and all(cache.get(*key) is batch for key, batch in held.items())
    assert_same(dict(logits=second), dict(logits=first))
    model(input_ids=ids[:, :-1], adapter_names=names)  # another shape: new batches
    assert len(cache) == 4
    fusedlora.patch_peft(model)  # the cache belongs to the model: patching again keeps it
    assert model.fusedlora_batch_cache is cache and len(cache) == 4
    assert len(copy.deepcopy(model).fusedlora_batch_cache) == 0
    cache.clear()
    assert len(cache) == 0


def test_mixed_batch_cache_keeps_what_a_cuda_graph_captured():
    """The cache of mixed-batch AdapterBatches drops its oldest entries, except those made or used while
    a CUDA graph was being captured: the graph reads their ids on every replay."""
    capturing = [False]
    cache = MixedBatchCache(max_entries=4, capturing=lambda device: capturing[0])
    cpu = torch.device("cpu")

    def batch(length, names=("a", "__base__")):
        return cache.get(list(names), ["a"], torch.Size([2, length]), cpu)

    capturing[0] = True
    captured = batch(3)
    capturing[0] = False
    plain = batch(3, names=("__base__", "a"))
    assert plain.ids.tolist() == [[-1] * 3, [0] * 3] and captured.ids.tolist() == [[0] * 3, [-1] * 3]
    assert batch(3) is captured and batch(3, names=("__base__", "a")) is plain
    for length in range(4, 5 + cache.max_entries):  # more new keys than the cache holds
        batch(length)
    assert batch(3) is captured
    assert batch(3, names=("__base__", "a")) is not plain
    cache.clear()
    assert cache.keys() == cache.captured_keys() and batch(3) is captured
    cache.clear(captured=True)
    assert len(cache) == 0 and batch(3) is not captured


def test_mixed_batch_falls_back_with_dropout(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model = peft_llama(lora_dropout=0.1)
    fusedlora.patch_peft(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.train()  # PeftModel refuses training mode
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        layer(torch.randn(2, 3, 64, device=DEVICE), adapter_names=["default", "__base__"])
    assert any("dropout in a mixed-adapter batch" in m for m in fallback_warnings(record))


def hook_on_first_base_layer(model):
    """A pre-hook that changes the input: the fused GEMM must not stand in for this base layer."""
    calls = []
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.base_layer.register_forward_pre_hook(lambda module, args: calls.append(1) or (args[0] * 0.5,))
    return calls


def plain_dropout_subclass(model):
    class Dropout(torch.nn.Dropout):
        def forward(self, x):
            return super().forward(x) * 2
    for module in model.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = Dropout(0.1).eval()


@pytest.mark.parametrize("options,prepare,reason", [
    ({}, plain_dropout_subclass, "a custom dropout module Dropout"),
], ids=["custom-dropout"])
def test_fallbacks_equal_peft_and_are_reported_once(options, prepare, reason, monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model = peft_llama(**options)
    if prepare:
        prepare(model)
    ids = tokens()
    want = logits(model, ids)
    fusedlora.patch_peft(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            got = logits(model, ids)
    # Every layer runs PEFT's own forward: the same ops on the same values, bitwise on every device.
    assert_same(dict(logits=got), dict(logits=want))
    messages = fallback_warnings(record)
    assert len(messages) == 1 and reason in messages[0], messages


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("options,prepare", [({"lora_bias": True}, None), ({}, hook_on_first_base_layer),
                                             ({"lora_bias": True}, hook_on_first_base_layer)],
                         ids=["lora_bias", "hooked-base", "lora_bias-hooked-base"])
def test_served_beyond_one_plain_adapter_equal_peft(backend, options, prepare):
    """lora_bias through the fused GEMM's bias, and a hooked base layer through its own forward (the
    hook runs once per forward, as in PEFT) plus lora_add, the two together (lora_bias added to the
    base layer's output): logits and gradients equal PEFT's."""
    model = peft_llama(**options)
    calls = prepare(model) if prepare else None
    ids = tokens()
    runs = oracle_runs(model, ids)
    fusedlora.patch_peft(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = run(model, ids)
    assert fallback_warnings(record) == []
    assert_run_matches(got, runs, torch.float32, lora_grads=(3 if options else 2) * N_TARGETS)
    if calls is not None:
        assert len(calls) == 3  # PEFT's float64 and float32 runs, then the patched one


def test_merge_unmerge_and_disable_when_patched(caplog):
    """Triton backend: after unmerge the layers are served fused again."""
    model = peft_llama()
    ids = tokens()
    want = logits(model, ids)
    with model.disable_adapter():
        base = logits(model, ids)
    fusedlora.patch_peft(model)
    caplog.set_level(logging.INFO, logger="fusedlora.peft.patch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to fuse is no reason to warn
        model.merge_adapter()
        torch.testing.assert_close(logits(model, ids), want, rtol=1e-4, atol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(logits(model, ids), want, rtol=1e-4, atol=1e-4)
        with model.disable_adapter():
            # merge then unmerge leaves the base weights a rounding away from where they were
            torch.testing.assert_close(logits(model, ids), base, rtol=1e-5, atol=1e-5)
    assert sum("merged" in r.getMessage() for r in caplog.records) == 1
    assert sum("disabled" in r.getMessage() for r in caplog.records) == 1


def test_patched_model_under_autocast():
    """Autocast to bf16: the output dtype is PEFT's and the values agree to bf16 rounding; and, training
    under autocast, each layer's output and gradients are its function of the bf16-cast inputs it got
    (the logits alone would not see a one-percent error in one layer's low-rank term)."""
    model = peft_llama()
    ids = tokens()
    exact = logits(copy.deepcopy(model).double(), ids)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        want = logits(model, ids)
        fusedlora.patch_peft(model)
        got = logits(model, ids)
    assert got.dtype == want.dtype == torch.bfloat16
    assert_normwise(dict(logits=got), dict(logits=want), dict(logits=exact))
    with recording_layers(model) as layers, torch.autocast(DEVICE, dtype=torch.bfloat16):
        run(model, ids)
    assert len(layers) == N_TARGETS
    assert_layers_compute_lora(model, layers, autocast=torch.bfloat16)


def test_patched_dropout_draws_the_mask_of_torchs_generator():
    """In training mode a patched layer drops x with the mask of the seed drawn from torch's generator
    (so torch.manual_seed reproduces it); in eval mode it does not drop."""
    model = peft_llama(lora_dropout=0.3)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    fusedlora.patch_peft(model)
    x = torch.randn(2, 5, 64, device=DEVICE)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W, b, s = layer.base_layer.weight, layer.base_layer.bias, layer.scaling["default"]
    model.train()
    torch.manual_seed(4)
    keep = fusedlora.dropout_mask(draw_seed(), x.shape, 0.3, DEVICE)
    torch.manual_seed(4)
    got = layer(x)
    inputs = {n: t.detach() for n, t in dict(x=x, weight=W, bias=b, lora_A=A, lora_B=B).items()}
    check_lora_linear(got.detach(), None, inputs, s, keep, 0.3)
    model.eval()
    no_dropout = fusedlora.reference.lora_linear(x, W, b, A, B, s)
    torch.testing.assert_close(layer(x), no_dropout, rtol=1e-5, atol=1e-5)


def test_training_with_dropout_lowers_the_loss():
    """A few AdamW steps of a patched PEFT model with dropout 0.1, through the kernels."""
    model = peft_llama(lora_dropout=0.1)
    fusedlora.patch_peft(model)
    torch.manual_seed(0)
    assert_training_lowers_loss(model)


def test_patch_peft_refuses_a_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        fusedlora.patch_peft(copy.deepcopy)
