"""Adapters for the serving tests with DoRA: two DoRA adapters and a plain one on the tiny Llama of
tests/lora_models.py, as PEFT saves them, and PEFT's own forward of each one alone (PEFT refuses
adapter_names= with a DoRA adapter, so running each adapter's rows alone is its only way)."""
import copy

import torch
from lora_models import TARGETS, tiny_llama
from oracle import assert_normwise
from peft import LoraConfig, PeftModel, get_peft_model

# Ranks 4, 8 and 6; "d2" covers only the attention projections (its rows get the base elsewhere).
ADAPTERS = {
    "d1": dict(r=4, lora_alpha=8, use_dora=True),
    "d2": dict(r=8, lora_alpha=4, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "p": dict(r=6, lora_alpha=12, rank_pattern={"down_proj": 2}),
}


def peft_adapter(name: str, seed: int = 0, adapter_name: str = "default"):
    """A PeftModel with adapter `name` of ADAPTERS as its adapter `adapter_name` (random A and B, magnitudes
    moved 30% off PEFT's initial row norms, so that the scale g = m / ‖W + s·B·A‖ matters)."""
    config = LoraConfig(**{"target_modules": TARGETS, "init_lora_weights": False, **ADAPTERS[name]})
    base = tiny_llama()  # seeds torch itself: the adapter's seed comes after
    torch.manual_seed(10 + list(ADAPTERS).index(name) + 100 * seed)
    model = get_peft_model(base, config, adapter_name=adapter_name)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_magnitude_vector" in key:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)).to(p))
    return model.eval()


def save_all(directory):
    """{name: path} of every adapter of ADAPTERS saved by PEFT under directory."""
    paths = {}
    for name in ADAPTERS:
        paths[name] = directory / name
        peft_adapter(name).save_pretrained(paths[name])
    return paths


def rows_alone(models, ids, names, dtype=None):
    """Logits of each row of ids (B, S) through PEFT with its own adapter alone (None: the base model),
    concatenated: models {name: PeftModel}; dtype float64 runs deep copies in float64."""
    out = []
    for b, name in enumerate(names):
        model = tiny_llama() if name is None else models[name]
        if dtype is not None:
            model = copy.deepcopy(model).to(dtype)
        with torch.no_grad():
            out.append(model(input_ids=ids[b:b + 1]).logits)
    return torch.cat(out)


def load_models(paths):
    return {name: PeftModel.from_pretrained(tiny_llama(), path).eval() for name, path in paths.items()}


def assert_rows_equal_alone(got, models, ids, names, where=""):
    """Each row of `got` against its adapter run alone through PEFT, by the norm-wise rule per row (a
    wrong adapter on one row cannot hide among the others): PEFT in float32 is the noise scale, PEFT in
    float64 the answer."""
    low = rows_alone(models, ids, names)
    exact = rows_alone(models, ids, names, torch.float64)
    key = [f"row {b} ({n})" for b, n in enumerate(names)]
    assert_normwise({k: got[b] for b, k in enumerate(key)}, {k: low[b] for b, k in enumerate(key)},
                    {k: exact[b] for b, k in enumerate(key)}, where=where)
