"""No cache serves old weights: a patched PEFT model equals PEFT after every way a user, a loader or an
optimizer changes its adapters, in single-adapter and mixed-adapter (adapter_names=) batches.

Each case runs both kinds of batch once (so whatever the patched layers keep is warm), changes the model,
and compares the next patched forward with PEFT's own forward of the same layers (their instance forward
set aside for the call) and with the float64 copy of that PEFT model, by the norm-wise rule. The cases
run on the torch backend: what is cached sits above the backend (fusedlora/peft/forward.py), and the
Triton interpreter would make the matrix minutes long; one case runs the kernels.

The compiled column: the same changes where a compiled model is served (single-adapter batches; PEFT's
adapter_names= registers hooks inside its forward, which dynamo does not trace), on a two-layer PEFT MLP
compiled once with aot_eager and called again after the change, through the kernels: whatever dynamo
guards on or lifts into the graph must follow the change.
"""
import contextlib
import copy

import pytest
import torch
from compiling import fresh_dynamo, op_calls, recording  # noqa: F401 (a fixture)
from lora_models import TARGETS, tokens, tiny_llama
from oracle import assert_normwise
from peft import LoraConfig, get_peft_model
from torch import nn

import fusedlora

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
MIXED = ["other", "__base__", "default"]


def two_adapters():
    """Tiny Llama, adapters "default" (r=4) and "other" (r=2, so the mixed-batch stack pads) on every
    projection, random non-zero A and B."""
    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                     init_lora_weights=False))
    torch.manual_seed(2)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    return model.eval()


def lora_layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


@contextlib.contextmanager
def peft_forward(model):
    """PEFT's own forward for the duration: the patched layers' instance forward set aside and put back
    as it was (the same function, holding whatever it caches)."""
    saved = {m: m.__dict__.pop("forward") for m in lora_layers(model) if "forward" in m.__dict__}
    try:
        yield
    finally:
        for m, forward in saved.items():
            m.forward = forward


def forward(model, ids, names):
    with torch.no_grad():
        kwargs = {} if names is None else {"adapter_names": names}
        return model(input_ids=ids, **kwargs).logits


def assert_equals_peft(model, ids, names, where):
    got = forward(model, ids, names)
    with peft_forward(model):
        low = forward(model, ids, names)
        exact = forward(copy.deepcopy(model).double(), ids, names)
    assert_normwise(dict(logits=got), dict(logits=low), dict(logits=exact.to(low.dtype)), where=where)
    return got


def q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


def data_mul(model):
    for layer in lora_layers(model):
        layer.lora_B["default"].weight.data.mul_(3)
        layer.lora_A["other"].weight.data.mul_(-2)


def data_assign(model):
    for layer in lora_layers(model):
        for half in (layer.lora_A, layer.lora_B):
            for name in ("default", "other"):
                half[name].weight.data = half[name].weight.data * 1.5 + 0.01


def copy_no_grad(model):
    with torch.no_grad():
        for layer in lora_layers(model):
            w = layer.lora_B["other"].weight
            w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(3)).to(w))
            layer.lora_A["default"].weight.mul_(0.5)


def load_state_dict(model):
    state = model.state_dict()
    for name in state:
        if ".lora_" in name:
            state[name] = state[name] * -1.25
    model.load_state_dict(state)


def optimizer_step(model):
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    gen = torch.Generator().manual_seed(4)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p)
    torch.optim.SGD(params, lr=0.5).step()


def load_adapter(model, tmp_path):
    """Another "other": deleted and loaded again under its name from another model's file."""
    donor = two_adapters()
    with torch.no_grad():
        for p in donor.parameters():
            p.mul_(2)
    donor.save_pretrained(tmp_path, selected_adapters=["other"])
    model.delete_adapter("other")
    model.load_adapter(tmp_path / "other", adapter_name="other")
    model.eval()


def set_adapter(model):
    model.set_adapter("other")


def add_weighted_and_delete(model):
    model.add_weighted_adapter(["default", "other"], [0.7, -1.3], "mix", combination_type="cat")
    model.delete_adapter("other")
    model.set_adapter("mix")
    return ["mix", "__base__", "default"]


def merge_unmerge(model):
    model.merge_adapter()
    model.unmerge_adapter()
    with torch.no_grad():
        for layer in lora_layers(model):  # and a change while merged would be lost on unmerge: change after
            layer.lora_B["other"].weight.data.add_(0.05)


def to_bfloat16(model):
    model.to(torch.bfloat16)


CHANGES = dict(data_mul=data_mul, data_assign=data_assign, copy_no_grad=copy_no_grad,
               load_state_dict=load_state_dict, optimizer_step=optimizer_step, load_adapter=load_adapter,
               set_adapter=set_adapter, add_weighted_and_delete=add_weighted_and_delete,
               merge_unmerge=merge_unmerge, to_bfloat16=to_bfloat16)


# The batches each change reaches, where not both: the single batch runs "default" alone.
CHANGED = dict(load_adapter=("mixed",), set_adapter=("single",), merge_unmerge=("mixed",))


@pytest.mark.parametrize("change", list(CHANGES))
def test_patched_model_serves_the_weights_as_they_are_now(change, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    model = two_adapters()
    assert fusedlora.patch_peft(model) == len(lora_layers(model))
    ids = tokens(batch=3, length=4)
    before = {kind: assert_equals_peft(model, ids, names, f"before, {kind}")
              for kind, names in (("single", None), ("mixed", MIXED))}
    fn = CHANGES[change]
    mixed = (fn(model, tmp_path) if change == "load_adapter" else fn(model)) or MIXED
    for kind, names in (("single", None), ("mixed", mixed)):
        after = assert_equals_peft(model, ids, names, f"after {change}, {kind}")
        if kind in CHANGED.get(change, ("single", "mixed")):  # the test's own check: the change reached the batch
            assert not torch.equal(after.float(), before[kind].float()), f"{change} changed nothing ({kind})"


def test_in_place_data_write_is_seen_by_the_kernels():
    """The reported case, on the kernels: a mixed batch served, then lora_B.data.mul_(3), then the same
    adapter_names again."""
    model = two_adapters()
    fusedlora.patch_peft(model)
    ids = tokens(batch=3, length=4)
    assert_equals_peft(model, ids, MIXED, "before")
    q_proj(model).lora_B["other"].weight.data.mul_(3)
    assert_equals_peft(model, ids, MIXED, "after lora_B.data.mul_(3)")


def two_adapter_mlp():
    """PEFT over nn.Linear(32 -> 48), ReLU, nn.Linear(48 -> 24), adapters "default" (r=4) and "other" (r=2)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 24))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False))
    torch.manual_seed(2)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False))
    return model.eval()


def merge(model):
    model.merge_adapter()


def merge_unmerge_then_write(model):
    model.merge_adapter()
    model.unmerge_adapter()
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B["default"].weight.data.add_(0.05)


COMPILED = dict(data_mul=data_mul, data_assign=data_assign, copy_no_grad=copy_no_grad, optimizer_step=optimizer_step,
                set_adapter=set_adapter, merge=merge, merge_unmerge=merge_unmerge_then_write)
LORA_OP = torch.ops.fusedlora.lora_linear.default


def assert_compiled_equals_peft(compiled, model, x, where):
    with torch.no_grad():
        got = compiled(x)
        with peft_forward(model):
            low = model(x)
            exact = copy.deepcopy(model).double()(x.double())
    assert_normwise(dict(y=got), dict(y=low), dict(y=exact.to(low.dtype)), where=where)
    return got


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("change", list(COMPILED))
def test_compiled_patched_model_serves_the_weights_as_they_are_now(change):
    model = two_adapter_mlp()
    assert fusedlora.patch_peft(model) == 2
    backend, graphs = recording("aot_eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(5))
    before = assert_compiled_equals_peft(compiled, model, x, "before")
    assert op_calls(graphs, LORA_OP) == 2, "the compiled model must be served by fusedlora's op"
    COMPILED[change](model)
    after = assert_compiled_equals_peft(compiled, model, x, f"after {change}")
    if change == "merge":  # the same function up to rounding; a merged layer runs PEFT's forward, recompiled
        assert op_calls(graphs[-1:], LORA_OP) == 0 and len(graphs) == 2
    else:
        assert not torch.equal(after, before), f"{change} changed nothing"
