"""fusedlora's own route for LoRA on MoE expert parameters (inject(..., target_parameters=...), LoRAExperts):
training with dropout against a float64 oracle written from the math, PEFT's adapter files both ways, the
checks before anything changes; and AdapterPool serving a mixed-adapter batch on an MoE model."""
import copy
import tempfile

import pytest
import torch
from moe_models import FAMILIES, TARGETS, experts_modules, needs_expert_floors, peft_moe, tiny_moe, tokens
from oracle import assert_normwise
from peft import PeftModel

import fusedlora
from fusedlora.core import reference
from fusedlora.core.dropout import draw_seed
from fusedlora.modules.experts import LoRAExperts, expert_weight, peft_layout

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              needs_expert_floors]


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")


def relative(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def experts_reference(layer: LoRAExperts, x, top, weights, keeps, p):
    """The experts module with LoRA, from the math: each projection through fusedlora.reference.moe_lora_linear
    pair by pair (its dropout mask given), the module's own gate between them, then y[t] = Σ_j w[t, j]·o[t·k + j].
    Runs in the dtype of the layer and x as given."""
    experts = layer.base_layer
    first, second = layer.parameter_names
    h = x
    for name, keep, gather in ((first, keeps[0], True), (second, keeps[1], False)):
        w, b = expert_weight(experts, name)
        adapter = layer.lora[name]
        A, B = peft_layout(adapter.lora_A, adapter.lora_B, adapter.num_experts)
        h = reference.moe_lora_linear(h, top, w, b, A, B, adapter.scaling, keep, p, gather=gather)
        if gather:
            h = experts._apply_gate(h)
    T, k = top.shape
    return (h.view(T, k, -1) * weights[..., None]).sum(1)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_trains_with_dropout_against_float64(family):
    """LoRAExperts in training mode with dropout 0.2, one fixed routing: the output, x's gradient and the four
    LoRA gradients against float64, the norm-wise rule with the same reference run in fp32 as the noise scale.
    The masks are those the two projections draw, in order, from torch's generator."""
    model = tiny_moe(family)
    fusedlora.inject(model, target_parameters=TARGETS, r=4, lora_alpha=8, lora_dropout=0.2, init_lora_weights=False)
    layer = experts_modules(model)[0]
    assert isinstance(layer, LoRAExperts)
    layer.train()
    gen = torch.Generator().manual_seed(7)
    T, k = 20, 2
    x = torch.randn(T, 64, generator=gen, dtype=torch.float64)
    top = torch.stack([torch.randperm(8, generator=gen)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).softmax(-1)
    dy = torch.randn(T, 64, generator=gen, dtype=torch.float64)
    params = dict(layer.lora.named_parameters())

    def run(fn, module, dtype):
        for q in module.lora.parameters():
            q.grad = None
        xi = x.to(dtype).clone().requires_grad_()
        y = fn(module, xi, weights.to(dtype))
        y.backward(dy.to(dtype))
        return dict(y=y.detach(), x=xi.grad, **{n: q.grad for n, q in module.lora.named_parameters()})

    torch.manual_seed(11)
    got = run(lambda m, xi, w: m(xi, top, w), layer, torch.float32)
    torch.manual_seed(11)
    seeds = [draw_seed(), draw_seed()]  # gate_up's call draws first, then down's
    P = T * k
    keeps = [fusedlora.dropout_mask(seeds[0], (P, 64), 0.2), fusedlora.dropout_mask(seeds[1], (P, 32), 0.2)]
    low = run(lambda m, xi, w: experts_reference(m, xi, top, w, keeps, 0.2), layer, torch.float32)
    exact = run(lambda m, xi, w: experts_reference(m, xi, top, w, keeps, 0.2), copy.deepcopy(layer).double(),
                torch.float64)
    assert len(got) == 2 + len(params) == 6
    assert_normwise(got, low, exact, torch_ops=True, where=family)
    torch.manual_seed(12)  # another mask: the reference with this one no longer holds
    other = run(lambda m, xi, w: m(xi, top, w), layer, torch.float32)
    assert relative(other["y"], exact["y"]) > 10 * relative(got["y"], exact["y"])


def test_training_lowers_the_loss():
    model = tiny_moe("mixtral")
    fusedlora.inject(model, target_parameters=TARGETS, r=4, lora_alpha=8, lora_dropout=0.1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".lora." in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)
    ids = tokens()
    model.train()
    first = model(input_ids=ids, labels=ids).loss.item()
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = model.eval()(input_ids=ids, labels=ids).loss.item()
    assert final < first - 0.1, (first, final)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_files_both_ways_with_peft(family, tmp_path):
    """save_adapter's files load in PEFT (PeftModel.from_pretrained) with PEFT's own keys and give the same
    logits; PEFT's files load with load_adapter and give PEFT's logits. Per-parameter ranks and alphas
    (rank_pattern / alpha_pattern keyed by "<module>.<parameter>") and rsLoRA survive both ways."""
    model = tiny_moe(family)
    fusedlora.inject(model, target_parameters=TARGETS, r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                     rank_pattern={"layers.1.mlp.experts.down_proj": 2}, alpha_pattern={"gate_up_proj": 3})
    ids = tokens()
    with torch.no_grad():
        ours = model.eval()(input_ids=ids).logits
    fusedlora.save_adapter(model, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(tiny_moe(family), tmp_path / "ours").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    assert relative(theirs, ours) <= 1e-5
    peft_model.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file
    mine, peft_keys = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert sorted(mine) == sorted(peft_keys) and all(torch.equal(mine[k], peft_keys[k]) for k in mine)
    reloaded = fusedlora.load_adapter(tiny_moe(family), tmp_path / "peft").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, ours)
    layer = experts_modules(reloaded)[1]
    assert layer.lora["down_proj"].r == 2 and layer.lora["gate_up_proj"].lora_alpha == 3


def test_load_of_a_peft_model_file():
    """A PEFT model built directly (get_peft_model, random A and B), saved by PEFT, loads with the same logits."""
    peft_model = peft_moe("gpt_oss", r=3, lora_alpha=5)
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        peft_model.save_pretrained(d)
        model = fusedlora.load_adapter(tiny_moe("gpt_oss"), d).eval()
        ids = tokens()
        assert relative(model(input_ids=ids).logits, peft_model(input_ids=ids).logits) <= 1e-5


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target_parameters=["nothing.here"]), ValueError, "matches no expert parameter"),
    (dict(target_parameters=["mlp.experts.gate_up_proj_bias"]), ValueError, "only the expert projections"),
    (dict(target_parameters=TARGETS, use_dora=True), ValueError, "DoRA .* on expert parameters"),
    (dict(target_parameters="mlp.experts.down_proj"), TypeError, "non-empty list"),
    (dict(), TypeError, "needs target_modules, target_parameters or both"),
    (dict(target_parameters=TARGETS, rank_pattern={"down_proj": 0}), ValueError, r"parameter .*down_proj: r must"),
])
def test_inject_refuses_before_changing_the_model(kwargs, error, match):
    model = tiny_moe("gpt_oss")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        fusedlora.inject(model, **kwargs)
    assert model.state_dict().keys() == before.keys()


def test_inject_refuses_experts_it_cannot_serve():
    model = tiny_moe("qwen3_moe")
    experts_modules(model)[1]._is_expert_parallel = True
    with pytest.raises(ValueError, match=r"layers.1.mlp.experts.*expert parallelism"):
        fusedlora.inject(model, target_parameters=TARGETS)
    assert not any(isinstance(m, LoRAExperts) for m in model.modules())


def test_failed_load_leaves_the_model_as_it_was(tmp_path):
    """An adapter for 8 experts does not fit a model with 4; an adapter for one parameter does not fit a
    LoRAExperts holding two. Nothing changes in either model."""
    peft_moe("qwen3_moe").save_pretrained(tmp_path / "eight")
    config = tiny_moe("qwen3_moe").config
    config.num_experts = 4
    import transformers
    small = transformers.Qwen3MoeForCausalLM(config)
    keys = sorted(small.state_dict())
    # lora_A (8·4, 64) reads as 4 experts of rank 8, which the config's r = 4 contradicts
    with pytest.raises(fusedlora.AdapterFileError, match=r"gate_up_proj: lora_A holds r = 8 rows per expert but the "
                                                         r"config gives r = 4"):
        fusedlora.load_adapter(small, tmp_path / "eight")
    assert sorted(small.state_dict()) == keys
    peft_moe("qwen3_moe", target_parameters=["mlp.experts.down_proj"]).save_pretrained(tmp_path / "down")
    model = tiny_moe("qwen3_moe")
    fusedlora.inject(model, target_parameters=TARGETS, init_lora_weights=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fusedlora.AdapterFileError, match=r"covers \['down_proj'\], the model's LoRAExperts"):
        fusedlora.load_adapter(model, tmp_path / "down")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_pool_serves_a_mixed_batch_on_experts(family, tmp_path):
    """AdapterPool over an MoE model's expert parameters: each sequence of a batch with its own adapter (ranks 2
    and 4, another alpha each, the base alone) equals PEFT running that adapter alone, against float64; an
    unloaded slot serves nothing."""
    for i, r in enumerate((2, 4)):
        peft_moe(family, seed=10 + i, r=r, lora_alpha=3 * r).save_pretrained(tmp_path / f"a{i}")
    model = tiny_moe(family)
    pool = fusedlora.AdapterPool(model, max_adapters=3, max_rank=4, target_modules=None, target_parameters=TARGETS,
                                 dtype=torch.float32)
    for i in range(2):
        pool.load(f"a{i}", tmp_path / f"a{i}")
    names = ["a1", None, "a0", "a1"]
    ids = tokens(seed=2, batch=4)
    with pool.use(names), torch.no_grad():
        got = model(input_ids=ids).logits
    for b, name in enumerate(names):
        reference_model = tiny_moe(family) if name is None else PeftModel.from_pretrained(tiny_moe(family),
                                                                                           tmp_path / name)
        with torch.no_grad():
            low = reference_model(input_ids=ids[b:b + 1]).logits
            from moe_models import eager_copy
            exact = eager_copy(reference_model)(input_ids=ids[b:b + 1]).logits
        assert_normwise(dict(logits=got[b:b + 1]), dict(logits=low), dict(logits=exact.float()), where=str(name))
    slot = pool._loaded["a1"].slot
    pool.unload("a1")
    assert all(int(layer.slots(p)[3][slot]) == 0 for layer in pool.experts.values() for p in layer.parameter_names)
    with pool.use([None, "a0"]), torch.no_grad():
        again = model(input_ids=ids[1:3]).logits
    assert relative(again, got[1:3]) <= 1e-5


def test_pool_refusals(tmp_path):
    peft_moe("qwen3_moe", r=8).save_pretrained(tmp_path / "r8")
    model = tiny_moe("qwen3_moe")
    pool = fusedlora.AdapterPool(model, max_adapters=2, max_rank=4, target_modules=None, target_parameters=TARGETS)
    with pytest.raises(fusedlora.AdapterFileError, match="rank 8, above the pool's max_rank 4"):
        pool.load("big", tmp_path / "r8")
    assert pool.names == []
    linear_only = fusedlora.AdapterPool(tiny_moe("qwen3_moe"), max_adapters=2, max_rank=8)
    with pytest.raises(fusedlora.AdapterFileError, match="which the pool does not hold"):
        linear_only.load("big", tmp_path / "r8")


def test_adapter_trained_with_dropout_loads_in_peft(tmp_path):
    """PEFT refuses dropout on expert parameters, so the file records 0 (and says so): PEFT loads it."""
    model = tiny_moe("qwen3_moe")
    fusedlora.inject(model, target_parameters=TARGETS, lora_dropout=0.1, init_lora_weights=False)
    with pytest.warns(UserWarning, match="lora_dropout 0.1 is written as 0.0"):
        fusedlora.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_moe("qwen3_moe"), tmp_path).eval()
    with torch.no_grad():
        ids = tokens()
        assert relative(peft_model(input_ids=ids).logits, model.eval()(input_ids=ids).logits) <= 1e-5


def test_inject_route_compiles_whole():
    """A model with LoRAExperts (dropout on, seeds drawn in the graph) under torch.compile(fullgraph=True,
    aot_eager): the loss and LoRA gradients of eager, after the same torch.manual_seed."""
    from lora_models import canonical
    from oracle import BITWISE, assert_same
    model = tiny_moe("qwen3_moe")
    fusedlora.inject(model, target_parameters=TARGETS, r=4, lora_dropout=0.2, init_lora_weights=False)
    model.train()
    ids = tokens()

    def step(net):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        return dict(loss=loss.detach(), **{canonical(n): p.grad for n, p in model.named_parameters() if p.requires_grad})

    eager = step(model)
    torch._dynamo.reset()
    compiled = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch._dynamo.reset()
    if BITWISE:
        assert_same(compiled, eager)
    else:
        assert all(relative(compiled[n], eager[n]) <= 1e-4 for n in eager)


def test_pool_updates_expert_parameters_in_place(tmp_path):
    """AdapterPool.update of an adapter with LoRA on expert parameters and on attention Linear layers, one
    state dict for both: the slot then serves the new weights (PEFT running them, against float64) and
    the base rows stay the base. A bad update is refused naming what is wrong, and the slot serves the
    old weights, bit for bit: an expert parameter of another rank, an experts module left out, the
    per-layer form (which has no expert entries), expert parameters the adapter was not loaded with."""
    from moe_models import eager_copy
    from peft import get_peft_model_state_dict
    options = dict(target_modules=["q_proj"])
    peft_moe("qwen3_moe", seed=10, **options).save_pretrained(tmp_path / "a")
    new = peft_moe("qwen3_moe", seed=11, **options)
    model = tiny_moe("qwen3_moe")
    pool = fusedlora.AdapterPool(model, max_adapters=2, max_rank=4, target_modules=["q_proj"],
                                 target_parameters=TARGETS, dtype=torch.float32)
    pool.load("a", tmp_path / "a")
    ids = tokens(seed=2, batch=2)

    def served():
        with pool.use(["a", None]), torch.no_grad():
            return model(input_ids=ids).logits

    before = served()
    state = get_peft_model_state_dict(new)
    pool.update("a", state)
    got = served()
    with torch.no_grad():
        low, exact = new(input_ids=ids[:1]).logits, eager_copy(new)(input_ids=ids[:1]).logits
        base = tiny_moe("qwen3_moe")(input_ids=ids[1:]).logits
    assert relative(got[:1], before[:1]) > 1e-2  # the update changed what the slot serves
    assert_normwise(dict(logits=got[:1]), dict(logits=low), dict(logits=exact.float()), where="updated")
    assert relative(got[1:], base) <= 1e-5

    module = "model.layers.0.mlp.experts"
    inner = f"base_model.model.{module}.base_layer"  # the ParamWrapper of the first targeted parameter
    N, E = state[f"{inner}.lora_B.weight"].shape[0], 8
    smaller = {**state, f"{inner}.lora_A.weight": torch.zeros(E * 2, 64),
               f"{inner}.lora_B.weight": torch.zeros(N, E * 2)}
    without = {k: v for k, v in state.items() if not k.startswith(f"base_model.model.{module}.")}
    q_proj = "model.layers.{}.self_attn.q_proj"
    per_layer = {q_proj.format(i): {h: state[f"base_model.model.{q_proj.format(i)}.{h}.weight"]
                                    for h in ("lora_A", "lora_B")} for i in range(2)}
    for bad, match in ((smaller, "r = 2 rows per expert but the config gives r = 4"),
                       (without, rf"has no weights for the expert parameters \['{module}.down_proj', "
                                 rf"'{module}.gate_up_proj'\]"),
                       (per_layer, "has no weights for the expert parameters")):
        with pytest.raises(fusedlora.AdapterFileError, match=match):
            pool.update("a", bad)
        assert torch.equal(served(), got)
    pool.load("b", without, config=new.peft_config["default"])  # loaded without layer 0's experts
    extra = rf"has weights for the expert parameters \['{module}.down_proj', '{module}.gate_up_proj'\], which the"
    with pytest.raises(fusedlora.AdapterFileError, match=extra):
        pool.update("b", state)
