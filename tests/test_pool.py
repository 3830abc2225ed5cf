"""AdapterPool against PEFT's mixed-batch inference on a tiny Llama with three PEFT-saved adapters."""
import copy
import json
import threading

import pytest
import torch
from lora_models import TARGETS, tiny_llama, tokens
from oracle import assert_normwise
from peft import LoraConfig, PeftModel, get_peft_model
from test_peft_interop import bf16_rounding_as_on_gpu  # noqa: F401 (a fixture)

from fusedlora import AdapterFileError, AdapterPool

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

# Three adapters as PEFT saves them: ranks 4, 8 and 16, their own alphas, one with rslora, one with
# rank and alpha patterns, one covering only the attention projections.
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8),
    "b": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "c": dict(r=16, lora_alpha=16, rank_pattern={"down_proj": 4}, alpha_pattern={"q_proj": 32}),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    paths = {}
    for i, (name, options) in enumerate(ADAPTERS.items()):
        config = LoraConfig(**{"target_modules": TARGETS, "init_lora_weights": False, **options})
        torch.manual_seed(10 + i)
        model = get_peft_model(tiny_llama(), config)
        paths[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def peft_model(saved):
    model = PeftModel.from_pretrained(tiny_llama(), saved["a"], adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(saved[name], adapter_name=name)
    return model.eval()


def peft_logits(model, ids, names):
    with torch.no_grad():
        return model(input_ids=ids, adapter_names=[n or "__base__" for n in names]).logits


def pool_with(saved, names=("a", "b", "c"), **options):
    model = tiny_llama()
    pool = AdapterPool(model, **{"max_adapters": 4, "max_rank": 16, **options})
    for name in names:
        pool.load(name, saved[name])
    return model, pool


def pool_logits(model, pool, ids, names):
    with pool.use(names), torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", request.param)


@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
def test_pool_equals_peft_mixed_batch(saved, peft_model, backend):
    ids = tokens(batch=5)
    names = ["c", None, "a", "b", "__base__"]
    model, pool = pool_with(saved)
    got = pool_logits(model, pool, ids, names)
    low = peft_logits(peft_model, ids, names)
    exact = peft_logits(copy.deepcopy(peft_model).double(), ids, names)
    assert_normwise(dict(logits=got), dict(logits=low), dict(logits=exact))
    with torch.no_grad():  # outside `use`, the model is the base model, bit for bit
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits, rtol=0, atol=0)


def test_one_grouping_per_forward(saved, peft_model, monkeypatch):
    """Every pool layer of a forward shares one AdapterBatch: 65 rows (above the decode kernels' size)
    are grouped by adapter once for all 14 layers, and once per `use` block for forwards of one shape."""
    import fusedlora.core.adapter_batch
    calls = []
    real = fusedlora.core.adapter_batch.group_by_adapter
    monkeypatch.setattr(fusedlora.core.adapter_batch, "group_by_adapter", lambda *a: calls.append(1) or real(*a))
    names = ["c", None, "a", "b", "a"]
    model, pool = pool_with(saved)
    ids = tokens(batch=5, length=13)
    got = pool_logits(model, pool, ids, names)
    assert len(calls) == 1
    assert_normwise(dict(logits=got), dict(logits=peft_logits(peft_model, ids, names)),
                    dict(logits=peft_logits(copy.deepcopy(peft_model).double(), ids, names)))
    with pool.use(names), torch.no_grad():
        model(input_ids=ids)
        model(input_ids=ids)
    assert len(calls) == 2


def test_generate_matches_peft(saved, peft_model):
    ids = tokens(batch=3, length=5)
    names = ["b", "c", "a"]
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        want = peft_model.generate(input_ids=ids, adapter_names=names, **kwargs)
    model, pool = pool_with(saved)
    with pool.use(names), torch.no_grad():
        got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)


def test_unload_and_reload_cycles(saved, peft_model, monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    ids = tokens(batch=3)
    model, pool = pool_with(saved, names=("a", "b"), max_adapters=2)
    for _ in range(2):
        pool.unload("a")
        assert pool.names == ["b"]
        pool.load("c", saved["c"])  # into a's slot: nothing of a may remain
        torch.testing.assert_close(pool_logits(model, pool, ids, ["c", "b", None]),
                                   peft_logits(peft_model, ids, ["c", "b", None]), rtol=1e-5, atol=1e-5)
        pool.unload("c")
        pool.load("a", saved["a"])
        assert sorted(pool.names) == ["a", "b"]
    torch.testing.assert_close(pool_logits(model, pool, ids, ["a", "b", "b"]),
                               peft_logits(peft_model, ids, ["a", "b", "b"]), rtol=1e-5, atol=1e-5)


def state(model, pool):
    return pool.names, {k: v.clone() for k, v in model.state_dict().items()}


def not_lora(tmp_path, saved):
    bad = tmp_path / "ia3"
    bad.mkdir()
    config = json.loads((saved["a"] / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    (bad / "adapter_model.safetensors").write_bytes((saved["a"] / "adapter_model.safetensors").read_bytes())
    return bad


def test_errors_leave_the_pool_as_it_was(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model, pool = pool_with(saved, names=("a", "b"), max_adapters=3, max_rank=8)
    before = state(model, pool)
    cases = [
        (lambda: pool.load("a", saved["b"]), ValueError, "already loaded"),
        (lambda: pool.load("c", saved["c"]), AdapterFileError, "above the pool's max_rank 8"),
        (lambda: pool.load("x", not_lora(tmp_path, saved)), AdapterFileError, "peft_type"),
        (lambda: pool.load("x", tmp_path / "missing"), AdapterFileError, "not a directory"),
        (lambda: pool.unload("zzz"), ValueError, "no adapter named 'zzz'"),
        (lambda: pool.use(["a", "zzz"]).__enter__(), ValueError, "unknown adapter names ['zzz']"),
        (lambda: pool.load("__base__", saved["a"]), ValueError, "adapter name"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=None) as info:
            call()
        assert words in str(info.value), str(info.value)
        after = state(model, pool)
        assert after[0] == before[0] and all(torch.equal(after[1][k], v) for k, v in before[1].items())
    pool.load("a2", saved["a"])
    with pytest.raises(ValueError, match="the pool is full"):
        pool.load("a3", saved["a"])
    with pytest.raises(ValueError, match="one name per batch row"), pool.use(["a", "b"]):
        model(input_ids=tokens(batch=3))
    narrow = tiny_llama()
    narrow_pool = AdapterPool(narrow, max_adapters=2, max_rank=16, target_modules=["q_proj"])
    with pytest.raises(AdapterFileError, match="not a layer of this pool"):
        narrow_pool.load("a", saved["a"])
    assert narrow_pool.names == []
    with pytest.raises(ValueError, match="one pool per model"):
        AdapterPool(narrow, max_adapters=2, max_rank=16)


def test_load_and_unload_from_another_thread_while_forwards_run(saved, peft_model, monkeypatch):
    """Forwards with "b" keep their result while another thread cycles "c" in and out, and an unload
    of an adapter in use waits for the `use` block to end."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    ids = tokens(batch=2)
    model, pool = pool_with(saved, names=("a", "b"), max_adapters=3)
    want = peft_logits(peft_model, ids, ["b", None])
    stop, errors = threading.Event(), []

    def churn():
        try:
            while not stop.is_set():
                pool.load("c", saved["c"])
                pool.unload("c")
        except Exception as e:  # reported by the main thread
            errors.append(e)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(5):
            torch.testing.assert_close(pool_logits(model, pool, ids, ["b", None]), want, rtol=1e-5, atol=1e-5)
    finally:
        stop.set()
        worker.join()
    assert not errors and "c" not in pool.names
    with pool.use(["a", "b"]):
        unloader = threading.Thread(target=pool.unload, args=("a",))
        unloader.start()
        unloader.join(timeout=0.3)
        assert unloader.is_alive() and "a" in pool.names  # waits while "a" is in use
        with pytest.raises(RuntimeError, match="inside a `with pool.use"):
            pool.unload("b")
    unloader.join(timeout=10)
    assert not unloader.is_alive() and pool.names == ["b"]


def test_nested_use_and_more_shapes_than_a_block_keeps(saved, monkeypatch):
    """An inner `use` serves its own names and gives the outer ones back; neither can unload an adapter
    either uses. Past the input shapes a block keeps AdapterBatches for, the forward still serves the
    block's names (the kept batches are dropped, not reused for another shape)."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model, pool = pool_with(saved)
    ids = tokens(batch=2, length=4)
    outer, inner = pool_logits(model, pool, ids, ["a", "b"]), pool_logits(model, pool, ids, ["c", None])
    assert not torch.equal(outer, inner)
    with pool.use(["a", "b"]), torch.no_grad():
        with pool.use(["c", None]):
            assert torch.equal(model(input_ids=ids).logits, inner)
            for name in ("a", "c"):
                with pytest.raises(RuntimeError, match=f"cannot unload '{name}'"):
                    pool.unload(name)
        assert torch.equal(model(input_ids=ids).logits, outer)
        got = {length: model(input_ids=tokens(batch=2, length=length)).logits for length in range(1, 12)}
    for length in (1, 11):
        assert torch.equal(got[length], pool_logits(model, pool, tokens(batch=2, length=length), ["a", "b"]))


@pytest.mark.parametrize("adapter_dtype", [None, torch.float32], ids=["bf16-adapters", "fp32-adapters"])
def test_pool_serves_a_bf16_model(saved, adapter_dtype, bf16_rounding_as_on_gpu):
    """A bf16 model: the adapter buffers take `dtype` (default the base's), the output stays bf16, and the
    logits equal PEFT's mixed batch over the same adapter weights (fp32, PEFT's default under a bf16 base;
    bf16 when the pool rounds them so), through the kernels."""
    model = tiny_llama(dtype=torch.bfloat16)
    pool = AdapterPool(model, max_adapters=4, max_rank=16, dtype=adapter_dtype)
    for name in ("a", "b", "c"):
        pool.load(name, saved[name])
    want_dtype = adapter_dtype or torch.bfloat16
    assert all(layer.lora_A.dtype == layer.lora_B.dtype == want_dtype for layer in pool.layers.values())
    peft_model = PeftModel.from_pretrained(tiny_llama(dtype=torch.bfloat16), saved["a"], adapter_name="a")
    for name in ("b", "c"):
        peft_model.load_adapter(saved[name], adapter_name=name)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["a"].weight.dtype == torch.float32
    if adapter_dtype is None:
        for name, p in peft_model.named_parameters():
            if ".lora_" in name:
                p.data = p.data.to(torch.bfloat16)
    peft_model.eval()
    ids, names = tokens(batch=4, length=4), ["c", None, "a", "b"]
    got = pool_logits(model, pool, ids, names)
    assert got.dtype == torch.bfloat16
    low = peft_logits(peft_model, ids, names)
    exact = peft_logits(copy.deepcopy(peft_model).double(), ids, names)
    assert_normwise(dict(logits=got), dict(logits=low), dict(logits=exact.to(low.dtype)))
