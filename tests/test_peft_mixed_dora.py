"""patch_peft serves PEFT's mixed-adapter batches (adapter_names=) with DoRA adapters among them, which
PEFT itself refuses: the rows of two DoRA adapters, a plain one and the base equal each row run through
PEFT with its adapter alone (PEFT's own forward, set_adapter per row; float64 rule, row by row), the
call goes through multi_lora_linear with a DoRA scale (no fallback), and no write to the base weight,
an adapter or a magnitude, by any route (set_peft_model_state_dict, the RL update, included), is missed:
the scales are computed on every call."""
import contextlib
import copy
import warnings

import pytest
import torch
from dora_adapters import ADAPTERS, peft_adapter
from lora_models import TARGETS, tokens
from oracle import assert_normwise
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

import fusedlora
import fusedlora.peft.forward

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
NAMES = ["d1", "__base__", "p", "d2", "d1"]


def three_adapters():
    """One PeftModel holding d1 and d2 (DoRA, d2 on the attention projections only) and p (plain), the
    weights of tests/dora_adapters.py's."""
    model = peft_adapter("d1", adapter_name="d1")
    for name in ("d2", "p"):
        model.add_adapter(name, LoraConfig(**{"target_modules": TARGETS, **ADAPTERS[name]}))
        set_peft_model_state_dict(model, get_peft_model_state_dict(peft_adapter(name)), adapter_name=name)
    model.set_adapter("d1")
    return model.eval()


def lora_layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


@contextlib.contextmanager
def peft_forward(model):
    """PEFT's own forward for the duration (the patched layers' instance forward set aside)."""
    saved = {m: m.__dict__.pop("forward") for m in lora_layers(model) if "forward" in m.__dict__}
    try:
        yield
    finally:
        for m, forward in saved.items():
            m.forward = forward


def peft_rows(model, ids, names):
    """Each row through PEFT's own forward with its adapter alone active (the base model for "__base__")."""
    out = []
    with peft_forward(model), torch.no_grad():
        for b, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    out.append(model(input_ids=ids[b:b + 1]).logits)
            else:
                model.set_adapter(name)
                out.append(model(input_ids=ids[b:b + 1]).logits)
    model.set_adapter("d1")
    return torch.cat(out)


def served(model, ids, names=NAMES):
    with torch.no_grad():
        return model(input_ids=ids, adapter_names=names).logits


def assert_rows_equal_peft(got, model, ids, names=NAMES, where=""):
    low, exact = peft_rows(model, ids, names), peft_rows(copy.deepcopy(model).double(), ids, names)
    key = [f"row {b} ({n})" for b, n in enumerate(names)]
    assert_normwise({k: got[b] for b, k in enumerate(key)}, {k: low[b] for b, k in enumerate(key)},
                    {k: exact[b] for b, k in enumerate(key)}, where=where)


@pytest.fixture
def scaled_calls(monkeypatch):
    """multi_lora_linear calls of the patched layers, by whether they carried a DoRA scale."""
    counts = {"dora": 0, "plain": 0}
    real = fusedlora.peft.forward.multi_lora_linear

    def counted(*args, col_scale=None, **kwargs):
        counts["plain" if col_scale is None else "dora"] += 1
        return real(*args, col_scale=col_scale, **kwargs)
    monkeypatch.setattr(fusedlora.peft.forward, "multi_lora_linear", counted)
    return counts


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mixed_dora_batch_equals_each_adapter_alone(backend, scaled_calls, monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    ids = tokens(batch=len(NAMES))
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        served(three_adapters(), ids)  # PEFT's own refusal (which leaves its forward hooks behind: a copy)
    model = three_adapters()
    fusedlora.patch_peft(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = served(model, ids)
    assert [str(w.message) for w in record if "runs PEFT's own forward" in str(w.message)] == []
    # Every layer holds d1 (DoRA): all 14 carry a scale; the MLP layers hold d1 and p only.
    assert scaled_calls == {"dora": 14, "plain": 0}
    assert_rows_equal_peft(got, model, ids)


def test_a_call_that_falls_back_raises_peft_refusal(monkeypatch):
    """Under autocast a mixed batch runs PEFT's forward, which refuses DoRA adapters as it always has."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model = three_adapters()
    fusedlora.patch_peft(model)
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        served(model, tokens(batch=2))  # PEFT's other checks stay on the served path
    model = three_adapters()  # PEFT leaves its forward hooks behind when it raises: a fresh model
    fusedlora.patch_peft(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=torch.bfloat16), \
                pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
            served(model, tokens(batch=len(NAMES)))


# ---- staleness: every route that writes W, an adapter or a magnitude, then a served batch ----------

def magnitudes(model, name="d1"):
    return [layer.lora_magnitude_vector[name].weight for layer in lora_layers(model)
            if name in layer.lora_magnitude_vector]


def base_in_place(model):
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.base_layer.weight.mul_(1.25)


def base_data(model):
    for layer in lora_layers(model):
        layer.base_layer.weight.data.mul_(1.25)


def magnitude_data(model):
    for m in magnitudes(model):
        m.data.mul_(0.8)


def optimizer_step(model):
    params = magnitudes(model, "d2") + [p for n, p in model.named_parameters() if ".lora_A.d1." in n]
    gen = torch.Generator().manual_seed(4)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    torch.optim.SGD(params, lr=0.2).step()


def load_state_dict(model):
    state = model.state_dict()
    for key in state:
        if "lora_magnitude_vector.d2" in key or ".lora_B.d1." in key:
            state[key] = state[key] * -1.25
    model.load_state_dict(state)


def rl_update(model):
    """The RL route: the trainer's new weights of d2 (another seed), loaded by PEFT's own function."""
    set_peft_model_state_dict(model, get_peft_model_state_dict(peft_adapter("d2", seed=1)), adapter_name="d2")


ROUTES = dict(base_in_place=base_in_place, base_data=base_data, magnitude_data=magnitude_data,
              optimizer_step=optimizer_step, load_state_dict=load_state_dict, rl_update=rl_update)


@pytest.mark.parametrize("route", list(ROUTES))
def test_every_write_is_served(route, monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model = three_adapters()
    fusedlora.patch_peft(model)
    ids = tokens(batch=len(NAMES))
    before = served(model, ids)
    ROUTES[route](model)
    got = served(model, ids)
    assert not torch.equal(got, before), f"{route} changed nothing"
    assert_rows_equal_peft(got, model, ids, where=f"after {route}")
