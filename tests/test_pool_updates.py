"""AdapterPool.update and AdapterPool.load from memory (the RL loop: new adapter weights after every
step, without a file): the next batch serves the new weights and nothing else changes, every buffer
keeps its address, a bad update leaves the slot as it was with an error naming the layer and tensor,
and an update waits for other threads' `use` blocks of the adapter (and holds new ones back)."""
import threading

import pytest
import torch
from conftest import CUDA
from dora_adapters import assert_rows_equal_alone, load_models, peft_adapter, save_all
from lora_models import tiny_llama, tokens
from peft import LoraConfig, get_peft_model_state_dict
from torch import nn

from fusedlora import AdapterFileError, AdapterPool

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
NAMES = ["d1", None, "p", "d2", "d1"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_all(tmp_path_factory.mktemp("dora"))


def dora_pool(saved):
    model = tiny_llama()
    pool = AdapterPool(model, max_adapters=4, max_rank=8, dora=True)
    for name, path in saved.items():
        pool.load(name, path)
    return model, pool


def served(model, pool, ids, names=NAMES):
    with pool.use(names), torch.no_grad():
        return model(input_ids=ids).logits


def buffers(model):
    return {name: (t.data_ptr(), t.clone()) for name, t in model.named_buffers() if ".lora_" in name or
            name.endswith((".scalings", ".ranks", ".magnitudes", ".col_scale"))}


def per_layer(peft_model):
    """{layer: {"lora_A", "lora_B", ("magnitude")}}: update's second form."""
    out = {}
    for key, t in get_peft_model_state_dict(peft_model).items():
        name = key.removeprefix("base_model.model.")
        if name.endswith(".lora_magnitude_vector"):
            module, part = name.rpartition(".")[0], "magnitude"
        else:  # <module>.lora_A.weight
            module, part, _ = name.rsplit(".", 2)
        out.setdefault(module, {})[part] = t
    return out


def test_update_serves_the_new_weights_and_nothing_else(saved, monkeypatch):
    """d1 (DoRA) from a state dict, then p (plain) in the per-layer form: each time its rows equal PEFT
    running the new adapter alone, every other row is unchanged bit for bit, and no buffer moved. On the
    torch backend: an update writes the same buffers either way, and the kernels' DoRA batches and
    scales are tests/test_pool_dora.py's and tests/test_multi_dora.py's."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model, pool = dora_pool(saved)
    ids = tokens(batch=len(NAMES))
    before, held = served(model, pool, ids), buffers(model)
    models = load_models(saved)
    for name, weights in (("d1", "state dict"), ("p", "per layer")):
        new = peft_adapter(name, seed=1)
        pool.update(name, get_peft_model_state_dict(new) if weights == "state dict" else per_layer(new))
        models[name] = new
        got = served(model, pool, ids)
        rows = [b for b, n in enumerate(NAMES) if n == name]
        others = [b for b, n in enumerate(NAMES) if n != name]
        assert torch.equal(got[others], before[others]), f"the update of {name} changed other rows"
        assert not torch.equal(got[rows], before[rows]), f"the update of {name} changed nothing"
        assert_rows_equal_alone(got, models, ids, NAMES, where=f"after updating {name} ({weights})")
        before = got
    assert {k: p for k, (p, _) in buffers(model).items()} == {k: p for k, (p, _) in held.items()}


def test_load_from_memory_equals_load_from_a_directory(saved):
    """pool.load(name, state_dict, config=LoraConfig) fills the slot exactly as the adapter's files do."""
    model, pool = dora_pool(saved)
    peft_model = peft_adapter("d2")
    pool.load("d2-memory", get_peft_model_state_dict(peft_model), config=peft_model.peft_config["default"])
    a, b = pool._loaded["d2"].slot, pool._loaded["d2-memory"].slot
    for layer in pool.layers.values():
        for buffer in ("lora_A", "lora_B", "scalings", "ranks", "magnitudes", "col_scale"):
            t = getattr(layer, buffer)
            assert torch.equal(t[a], t[b]), buffer
    state = get_peft_model_state_dict(peft_model)
    with pytest.raises(TypeError, match="needs its config"):
        pool.load("x", state)
    with pytest.raises(TypeError, match="config goes with weights in memory"):
        pool.load("x", saved["p"], config=peft_model.peft_config["default"])
    with pytest.raises(AdapterFileError, match="peft_type"):
        pool.load("x", state, config={"peft_type": "IA3", "r": 8, "lora_alpha": 4})
    with pytest.raises(AdapterFileError, match="which a pool of LoRA layers cannot serve"):
        pool.load("x", {**state, "base_model.model.lm_head.weight": torch.zeros(128, 64)},
                  config=peft_model.peft_config["default"])
    assert "x" not in pool.names


def bad_updates(saved):
    """(name, weights, error words) of updates that must be refused; the last layer in order is the one
    at fault where one is, so that a check after the first write would leave a half-written slot."""
    d1 = get_peft_model_state_dict(peft_adapter("d1", seed=1))
    last = sorted(d1)[-1].rpartition(".lora_")[0]
    p_layers = per_layer(peft_adapter("p", seed=1))
    last_p = sorted(p_layers)[-1]

    def edit(state, key, value):
        out = dict(state)
        out[key] = value
        return out

    A = f"{last}.lora_A.weight"
    return [
        ("d1", edit(d1, A, torch.zeros(5, d1[A].shape[1])),
         "lora_A has shape (5, 64), but the loaded adapter needs (4, 64)"),
        ("d1", {k: v for k, v in d1.items() if not k.startswith(last + ".")}, "has no weights for"),
        ("d1", {k: v for k, v in d1.items() if "magnitude" not in k}, "is DoRA, but the update has no magnitude"),
        ("d1", edit(d1, A, d1[A].to(torch.int32)), "adapter tensors must be floating point"),
        ("d1", edit(d1, A, d1[A].numpy()), "is a ndarray, not a tensor"),
        ("d2", d1, "which the adapter was not loaded with"),
        ("p", {**p_layers, last_p: {**p_layers[last_p], "magnitude": torch.ones(64)}},
         "is not DoRA, but the update has a magnitude"),
        ("p", {**p_layers, last_p: {**p_layers[last_p], "lora_B": p_layers[last_p]["lora_B"].to(torch.int64)}},
         "lora_B has dtype torch.int64"),
        ("p", {**p_layers, last_p: {"lora_A": p_layers[last_p]["lora_A"]}}, "has no lora_B"),
        ("p", {**p_layers, last_p: {**p_layers[last_p], "lora_C": torch.ones(1)}}, "unknown entries ['lora_C']"),
        ("zzz", d1, "no adapter named 'zzz'"),
    ]


def test_bad_updates_leave_the_slots_as_they_were(saved, monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model, pool = dora_pool(saved)
    ids = tokens(batch=len(NAMES))
    before, held = served(model, pool, ids), buffers(model)
    for name, weights, words in bad_updates(saved):
        with pytest.raises(ValueError) as info:  # AdapterFileError is a ValueError
            pool.update(name, weights)
        assert words in str(info.value), str(info.value)
        for key, (ptr, value) in buffers(model).items():
            assert ptr == held[key][0] and torch.equal(value, held[key][1]), f"{words}: {key} changed"
    assert torch.equal(served(model, pool, ids), before) and pool.names == ["d1", "d2", "p"]


def test_update_waits_for_other_threads_and_holds_new_uses_back(saved, monkeypatch):
    """While this thread's `use` block holds d1, another thread's update of d1 waits and the block keeps
    serving the old weights; a third thread's `use` of d1 waits for the update and serves the new ones.
    A thread may update an adapter its own block holds, between its forwards."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model, pool = dora_pool(saved)
    ids, names = tokens(batch=2), ["d1", "p"]
    new = get_peft_model_state_dict(peft_adapter("d1", seed=1))
    old = served(model, pool, ids, names)
    results, errors = [], []

    def run(fn):
        def body():
            try:
                results.append(fn())
            except Exception as e:  # reported by the main thread
                errors.append(e)
        thread = threading.Thread(target=body)
        thread.start()
        return thread

    with pool.use(names), torch.no_grad():
        updater = run(lambda: pool.update("d1", new))
        updater.join(timeout=0.3)
        assert updater.is_alive(), "the update did not wait for the open `use` block"
        user = run(lambda: served(model, pool, ids, names))
        user.join(timeout=0.3)
        assert user.is_alive(), "a new `use` of d1 did not wait for the pending update"
        assert torch.equal(model(input_ids=ids).logits, old)
    updater.join(timeout=30)
    user.join(timeout=30)
    assert not errors and not updater.is_alive() and not user.is_alive()
    updated = served(model, pool, ids, names)
    assert torch.equal(results[-1], updated) and not torch.equal(updated, old)

    back = get_peft_model_state_dict(peft_adapter("d1"))
    with pool.use(names), torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, updated)
        pool.update("d1", back)  # this thread's own block: between its forwards, no wait
        assert torch.equal(model(input_ids=ids).logits, old)


@pytest.mark.skipif(not CUDA, reason="a CUDA graph needs CUDA; on CPU the addresses are checked above")
def test_cuda_graph_replays_an_update():
    """A DoRA pool layer's forward captured once, replayed after pool.update: the graph reads the new
    weights and scales from the same buffers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48)).cuda()
    pool = AdapterPool(model, max_adapters=2, max_rank=8, target_modules=["0"], dora=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True)

    def weights(seed):
        gen = torch.Generator().manual_seed(seed)
        return {"base_model.model.0.lora_A.weight": torch.randn(4, 64, generator=gen) / 8,
                "base_model.model.0.lora_B.weight": torch.randn(48, 4, generator=gen) / 2,
                "base_model.model.0.lora_magnitude_vector": torch.rand(48, generator=gen) + 0.5}
    pool.load("a", weights(1), config=config)
    x = torch.randn(4, 64, device="cuda")
    with pool.use(["a", None, "a", "a"]), torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = model(x)
        pool.update("a", weights(2))
        graph.replay()
        want = model(x)
    torch.cuda.synchronize()
    assert (y - want).norm() <= 1e-5 * want.norm(), ((y - want).norm().item(), want.norm().item())
