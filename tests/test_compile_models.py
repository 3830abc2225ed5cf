"""The layers users build, under torch.compile, checkpointing and CUDA graphs.

- multi_lora_linear: its two custom ops pass opcheck; a model of multi-adapter layers compiles forward
  and backward with fullgraph=True, equals eager for every batch size with one graph, on both
  backends; ids are not checked inside a compiled region (NaN rows, as documented).
- A tiny transformers Llama with LoRALinear layers (fusedlora.inject), and the same Llama as a PEFT
  model patched with fusedlora.patch_peft: the whole model compiles with fullgraph=True, every LoRA
  layer is fusedlora's op in the graph, and logits and gradients (dropout on) equal eager.
- A patched PEFT model under Inductor (the LoRALinear one is tests/test_compile.py's small model).
- transformers' gradient_checkpointing_enable with dropout: gradients equal the run without it.
- A multi-adapter decode step in a CUDA graph, replayed with new ids and new adapters (CUDA only).

aot_eager (dynamo, fake tensors, AOTAutograd, then eager kernels) serves where Inductor adds nothing
to what a test checks: Inductor compiles of a Llama take ~35 s on 2 CPU cores.
"""
import copy

import pytest
import torch
import torch._inductor.config
from compiling import (assert_steps_equal, capture, fresh_dynamo,  # noqa: F401 (a fixture)
                       graphs_compiled, op_calls, recording)
from conftest import CUDA
from lora_model import make_batch
from lora_models import DEVICE, TARGETS, canonical, tiny_llama, tokens
from oracle import BITWISE, assert_same, float64_fusedlora
from peft import LoraConfig, get_peft_model
from test_multi_lora import make_multi
from torch import nn

import fusedlora
from fusedlora.modules.inject import lora_layers
from fusedlora.core.adapter_batch import group_by_adapter
from fusedlora.ops.multi import multi_lora_linear_backward_op, multi_lora_linear_op

pytestmark = [pytest.mark.usefixtures("fresh_dynamo"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:`gradient_checkpointing_(en|dis)able` is deprecated:FutureWarning")]
f16, f32 = torch.float16, torch.float32
LORA_OP = torch.ops.fusedlora.lora_linear.default
MULTI_OP = torch.ops.fusedlora.multi_lora_linear.default


@pytest.mark.parametrize("grouped", [False, True])
def test_multi_opcheck(grouped, plan, device):
    """Both ops, under each plan (the decode plan runs its kernels at these 14 rows), with the
    grouping made inside the op or passed in (as from an AdapterBatch)."""
    inputs = make_multi((2, 7), 40, 24, 3, 8, f32, ranks=[8, 2, 5], device=device)
    ids = torch.tensor([[0, 1, 2, -1, 0, 1, 2], [2, 2, 1, -1, 0, 0, 1]], device=device)
    groups = list(group_by_adapter(ids.reshape(-1), 3)) if grouped else [None] * 3
    x, W, b, A, B = (inputs[n].requires_grad_() for n in ("x", "weight", "bias", "lora_A", "lora_B"))
    scalings, ranks = inputs["scalings"], inputs["ranks"]
    torch.library.opcheck(multi_lora_linear_op, (x, W, b, A, B, scalings, ids, ranks, *groups))
    x, W, A, B = (t.detach() for t in (x, W, A, B))
    y, S = multi_lora_linear_op(x, W, None, A, B, scalings, ids, ranks, *groups)
    for needs in ([True, True, True, True, True], [False, False, False, True, True]):
        torch.library.opcheck(multi_lora_linear_backward_op,
                              (torch.randn_like(y), x, W, A, B, scalings, ids, ranks, S, *groups, needs))


class MultiLoRALayer(nn.Module):
    """A frozen base projection with L stacked adapters (zero past each rank), each token choosing its
    own: the layer a multi-tenant server builds around multi_lora_linear."""

    def __init__(self, K, N, L=3, R=8, ranks=(8, 2, 5), seed=0, device="cpu"):
        super().__init__()
        inputs = make_multi(1, K, N, L, R, f32, ranks=list(ranks), seed=seed, device=device)
        self.lora_A, self.lora_B = nn.Parameter(inputs["lora_A"]), nn.Parameter(inputs["lora_B"])
        for name in ("weight", "bias", "scalings", "ranks"):
            self.register_buffer(name, inputs[name])

    def forward(self, x, adapter_ids):
        return fusedlora.multi_lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scalings,
                                           adapter_ids, self.ranks)


class MultiModel(nn.Module):
    """MultiLoRALayer(32 -> 40), ReLU, MultiLoRALayer(40 -> 24), one adapter id per token."""

    def __init__(self, device="cpu"):
        super().__init__()
        self.first = MultiLoRALayer(32, 40, seed=0, device=device)
        self.second = MultiLoRALayer(40, 24, seed=1, device=device)

    def forward(self, x, adapter_ids):
        return self.second(torch.relu(self.first(x, adapter_ids)), adapter_ids)


def multi_batch(rows, device, seed=0):
    """x: (rows, 32), target: (rows, 24) and ids in [-1, 3) that change with the seed."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, 3, (rows,), generator=gen).to(device)
    return torch.randn(rows, 32, generator=gen).to(device), torch.randn(rows, 24, generator=gen).to(device), ids


@pytest.mark.parametrize("backend,compiler", [("triton", "inductor"), ("torch", "aot_eager")])
def test_compiled_multi_adapter_model_matches_eager(backend, compiler, monkeypatch, device):
    """The loss and the gradients of x and of both layers' stacked adapters equal eager's, for three
    batch sizes and fresh ids each time, from one graph. Bitwise on CPU: the triton backend's op is
    opaque to Inductor, and the torch backend's matmuls run as they do in eager under aot_eager (on
    CUDA, against float64: compiling.assert_steps_equal)."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    eager, model = MultiModel(device), MultiModel(device)
    backend_fn, graphs = recording(compiler)
    compiled = torch.compile(model, backend=backend_fn, fullgraph=True, dynamic=True)
    batches = []
    for rows in (5, 11, 16):
        x, target, ids = multi_batch(rows, device, seed=rows)
        batches.append((rows, [x, ids], target))
    assert assert_steps_equal(eager, model, compiled, batches) == 6  # loss, dx, both layers' A and B
    assert graphs_compiled() == 1
    assert op_calls(graphs, MULTI_OP) == (2 if backend == "triton" else 0)


def test_compiled_layer_takes_an_adapter_batch_and_its_grouping(device):
    """An AdapterBatch grouped outside the compiled region (as a server does once per step) hands its
    grouping to the op as inputs (80 rows, above the decode size): no sort in the graph or in the op,
    and the result equals eager's (bitwise on CPU; on CUDA both against float64)."""
    layer = MultiLoRALayer(32, 24, device=device)
    x, _, ids = multi_batch(80, device)
    batch = fusedlora.AdapterBatch(ids, 3)
    batch.groups()
    backend_fn, graphs = recording("aot_eager")
    compiled = torch.compile(layer, backend=backend_fn, fullgraph=True)
    with torch.no_grad():
        got, want = dict(y=compiled(x, batch)), dict(y=layer(x, batch))
        exact = low = None
        if not BITWISE:
            with float64_fusedlora():
                exact = dict(y=copy.deepcopy(layer).double()(x.double(), batch.ids))
                low = dict(y=layer(x, batch.ids))
        assert_same(got, want, exact, low)
    (call,) = [node for g in graphs for node in g.graph.nodes if node.target is MULTI_OP]
    assert all(arg is not None for arg in call.args[8:11]), "order, sorted_ids and starts passed in"
    assert not any("sort" in str(node.target) for g in graphs for node in g.graph.nodes)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ids_are_not_checked_inside_a_compiled_region(backend, monkeypatch, device):
    """Eager refuses an id outside [-1, L) (on CPU, and on CUDA with FUSEDLORA_DEBUG=1); a compiled
    call cannot branch on values without a graph break, so it returns NaN rows there (README), and
    the other rows as eager computes them."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    monkeypatch.setenv("FUSEDLORA_DEBUG", "1")
    layer = MultiLoRALayer(32, 24, device=device)
    x, _, ids = multi_batch(6, device)
    bad_ids = ids.clone()
    bad_ids[[1, 4]] = torch.tensor([3, -2], device=device)
    with pytest.raises(ValueError, match="outside"):
        layer(x, bad_ids)
    with torch.no_grad():
        y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x, bad_ids)
        want = layer(x, ids)
    bad = torch.zeros(6, dtype=torch.bool, device=device)
    bad[[1, 4]] = True
    assert torch.isnan(y[bad]).all()
    # Not bitwise: the bad ids regroup the rows, and the interpreter's BLAS may round a row differently
    # at another position in a block.
    torch.testing.assert_close(y[~bad], want[~bad], rtol=1e-5, atol=1e-5)


def injected_llama(dropout):
    model = tiny_llama(layers=1)
    torch.manual_seed(1)
    return fusedlora.inject(model, TARGETS, r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False)


def patched_peft_llama(dropout):
    model = tiny_llama(layers=1)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout, init_lora_weights=False)
    model = get_peft_model(model, config)
    assert fusedlora.patch_peft(model) == len(TARGETS)
    return model


def llama_step(net, params, ids, seed):
    """Logits and the trainable parameters' gradients (by canonical name) of net(input_ids=ids), for a
    fixed random weighting of the logits; torch seeded first, so the layers draw the same masks."""
    params.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = net(input_ids=ids).logits
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))  # the same for a float64 net
    (out * weights.to(out)).sum().backward()
    grads = {canonical(n): p.grad for n, p in params.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return dict(logits=out.detach(), **grads)


@pytest.mark.parametrize("build", [injected_llama, patched_peft_llama], ids=["inject", "patch_peft"])
def test_compiled_llama_matches_eager(build):
    """The whole model (transformers' Llama, and PEFT's wrappers around it) in one graph, dynamic over
    the batch, with every LoRA layer as fusedlora::lora_linear in it: patch_peft's checks of each call
    trace without breaking the graph and choose the fused path. Training mode, dropout 0.1: under
    aot_eager the seeds drawn in the graph are eager's, so logits and gradients are equal bitwise on
    CPU (on CUDA, where cuBLAS may pick other algorithms for the traced layouts, both against float64)."""
    eager, model = build(0.1).train(), build(0.1).train()
    reference = None if BITWISE else copy.deepcopy(eager).double()
    backend_fn, graphs = recording("aot_eager")
    compiled = torch.compile(model, backend=backend_fn, fullgraph=True, dynamic=True)
    for batch in (2, 3):
        ids = tokens(seed=batch, batch=batch)
        want, got = llama_step(eager, eager, ids, batch), llama_step(compiled, model, ids, batch)
        assert len(want) == 1 + 2 * len(TARGETS)
        exact = low = None
        if reference is not None:
            with float64_fusedlora():
                exact = llama_step(reference, reference, ids, batch)
                low = llama_step(eager, eager, ids, batch)
        assert_same(got, want, exact, low, where=f"at batch {batch}")
    assert graphs_compiled() == 1
    assert op_calls(graphs, LORA_OP) == len(TARGETS)


def patched_peft_mlp():
    """PEFT over nn.Linear(32 -> 48), ReLU, nn.Linear(48 -> 24) (the shapes of lora_model.make_model)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 24)).to(DEVICE)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], lora_dropout=0.25, init_lora_weights=False)
    model = get_peft_model(base, config)
    assert fusedlora.patch_peft(model) == 2
    return model.train()


def test_compiled_patched_peft_model_with_inductor():
    """Inductor over a patched PEFT model, dynamic over the batch, dropout drawn with Inductor's
    fallback_random (eager's generator): the loss and the gradients of x and of the LoRA weights
    equal eager (bitwise on CPU)."""
    eager, model = patched_peft_mlp(), patched_peft_mlp()
    backend_fn, graphs = recording("inductor")
    compiled = torch.compile(model, backend=backend_fn, fullgraph=True, dynamic=True)
    batches = [(rows, [x.to(DEVICE)], target.to(DEVICE))
               for rows in (3, 7) for x, target in [make_batch(rows, seed=rows)]]
    with torch._inductor.config.patch(fallback_random=True):
        assert assert_steps_equal(eager, model, compiled, batches) == 6
    assert graphs_compiled() == 1
    assert op_calls(graphs, LORA_OP) == 2


def peft_fallback(kind):
    """A patched PEFT MLP whose calls run PEFT's own forward: its adapter merged (reported with
    logging), or a dropout module of another class than nn.Dropout (reported with warnings.warn)."""
    model = patched_peft_mlp().eval()
    if kind == "merged":
        model.merge_adapter()
    else:
        for name in ("0", "2"):
            model.base_model.model.get_submodule(name).lora_dropout["default"] = nn.AlphaDropout(0.25).eval()
    return model


@pytest.mark.filterwarnings("ignore:fusedlora. PEFT layer")
@pytest.mark.parametrize("kind", ["merged", "custom-dropout"])
@pytest.mark.parametrize("reported_first", [True, False], ids=["after-eager", "first-call"])
def test_compiled_peft_fallback(kind, reported_first):
    """PEFT's own forward, for a merged adapter or a custom dropout module, compiles with fullgraph=True,
    whether or not an eager call reported the fallback first (reports are skipped while compiling)."""
    model = peft_fallback(kind)
    x = make_batch(3)[0].to(DEVICE)
    exact = None if BITWISE else dict(y=copy.deepcopy(model).double()(x.double()).detach())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    if reported_first:
        want = model(x)
        got = compiled(x)
    else:
        got = compiled(x)
        want = model(x)
    # PEFT's own forward runs in both: the eager one is the PyTorch run.
    assert_same(dict(y=got.detach()), dict(y=want.detach()), exact, None if exact is None else dict(y=want.detach()))


@pytest.fixture(scope="module")
def llama_without_checkpointing():
    """The injected 2-layer Llama's step with dropout 0.1 (torch seeded with 5), and with seed 6.
    Module-scoped fixtures start before conftest's per-test backend choice, so this sets its own."""
    model = fusedlora.inject(tiny_llama(), TARGETS, r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False)
    model.train()
    ids = tokens()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FUSEDLORA_BACKEND", "triton")
        return model, ids, llama_step(model, model, ids, 5), llama_step(model, model, ids, 6)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_transformers_gradient_checkpointing_recomputes_the_same_masks(use_reentrant, llama_without_checkpointing):
    """transformers recomputes each decoder layer in backward, and the recompute draws the same seeds
    (checkpoint restores torch's RNG state): every gradient equals the run without checkpointing
    bitwise. The forward calls are counted, so a checkpointing that did not happen fails; the seed-6
    run shows the masks matter. On CUDA, where SDPA's backward may sum with atomics, both runs are held
    against float64 instead."""
    model, ids, want, other_seed = llama_without_checkpointing
    exact = low = None
    if not BITWISE:
        reference = copy.deepcopy(model).double()
        with float64_fusedlora():
            exact = llama_step(reference, reference, ids, 5)
            low = llama_step(model, model, ids, 5)
    assert len(want) == 1 + 2 * 2 * len(TARGETS)
    assert any(not torch.equal(want[n], other_seed[n]) for n in want if n != "logits"), "dropout had no effect"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    calls = []
    # Pre-hooks: non-reentrant checkpointing stops a recompute once the last saved tensor is back, which
    # is inside the last LoRA layer of each block, before its forward hooks would run.
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in lora_layers(model).values()]
    try:
        got = llama_step(model, model, ids, 5)
    finally:
        for hook in hooks:
            hook.remove()
        model.gradient_checkpointing_disable()
    assert len(calls) == 2 * 2 * len(TARGETS), "each LoRA layer runs twice: forward and recompute"
    assert_same(got, want, exact, low)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("rows", [16, 80])
def test_cuda_graph_replays_a_multi_adapter_decode_step(rows, plan):
    """A step of MultiModel (16 requests, one token each: the split plan's decode kernels; or 80 rows,
    grouped by adapter on the device; fp16 activations with fp32 adapters) through the kernels of each
    plan, captured once with static x and ids; replayed after new ids, then after new adapters are
    copied into slots of the stacks (weights, scaling, rank), it equals bitwise an eager call on the
    new values (the same deterministic kernels on the same inputs)."""
    model = MultiModel("cuda")
    for layer in (model.first, model.second):
        layer.weight, layer.bias = layer.weight.half(), layer.bias.half()
    x, _, ids = multi_batch(rows, "cuda")
    static_x, static_ids = x.half(), ids.clone()

    @torch.no_grad()
    def step():
        return model(static_x, static_ids)

    graph, y = capture(step)

    def replay_equals_eager(what):
        graph.replay()
        assert_same(dict(y=y), dict(y=step()), where=f"replay after {what}")
        return y.clone()

    first = replay_equals_eager("capture")
    static_ids.copy_(torch.arange(rows, device="cuda") % 4 - 1)  # new ids: every adapter and base rows
    new_ids = replay_equals_eager("new ids")
    assert not torch.equal(new_ids, first)
    with torch.no_grad():  # a new adapter of rank 3 into slot 1 of both layers (entries past it zeroed)
        for layer, (K, N) in ((model.first, (32, 40)), (model.second, (40, 24))):
            new = make_multi(1, K, N, 1, 8, f32, ranks=[3], seed=7, device="cuda")
            layer.lora_A[1].copy_(new["lora_A"][0])
            layer.lora_B[1].copy_(new["lora_B"][0])
            layer.scalings[1] = 4.0
            layer.ranks[1] = 3
        static_x.copy_(torch.randn(rows, 32, generator=torch.Generator().manual_seed(9)).half())
    new_adapters = replay_equals_eager("new adapters and x")
    assert not torch.equal(new_adapters, new_ids)
