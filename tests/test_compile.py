"""lora_linear under torch.compile: the custom ops pass opcheck; compiled forward and backward, of a
function and of a module, match eager with no graph break (fullgraph=True); batch sizes do not
recompile; drawn seeds stay reproducible; checkpointing recomputes the same mask when compiled.

Inductor compiles cost about 12 s each on 2 CPU cores, so only the tests that say what Inductor
does use it; the others use aot_eager, which traces the same graphs (dynamo, fake tensors,
AOTAutograd) and runs them eagerly.
"""
import copy

import pytest
import torch
import torch._inductor.config
from compiling import (assert_steps_equal, capture, fresh_dynamo,  # noqa: F401 (a fixture)
                       graphs_compiled, training_step)
from conftest import CUDA
from lora_model import make_batch, make_model, mse
from oracle import BITWISE, NAMES, assert_same, check_lora_linear, float64_fusedlora, make_inputs
from torch.utils.checkpoint import checkpoint

import fusedlora
from fusedlora.ops.single import lora_linear_backward_op, lora_linear_op
from fusedlora.core.dropout import keep_mask_op

BACKENDS = ("triton", "torch")
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def run(fn, inputs, dy, **kwargs):
    """fn over fresh leaves of `inputs` (all requiring grad), backward with dy: (y, {name: grad})."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    y = fn(*(leaves.get(n) for n in NAMES), **kwargs)
    y.backward(dy)
    return y.detach(), {n: t.grad for n, t in leaves.items()}


def layer(x, weight, bias, lora_A, lora_B, seed=None):
    return fusedlora.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, dropout_p=0.25, seed=seed)


@pytest.mark.parametrize("p,bias,lead,grads", [
    (0.3, True, (2, 7), (True, True, True, True, True)),
    (0.0, False, (9,), (False, False, False, True, True)),
])
def test_opcheck(p, bias, lead, grads, device):
    inputs = make_inputs(lead, 40, 24, 4, torch.float32, bias=bias, device=device)
    args = [inputs[n].requires_grad_(g) if inputs[n] is not None else None for n, g in zip(NAMES, grads)]
    seed = torch.tensor(5)
    torch.library.opcheck(lora_linear_op, (*args, 2.0, p, seed))
    x, weight, _, lora_A, lora_B = (t.detach() if t is not None else None for t in args)
    y, S = lora_linear_op(x, weight, None, lora_A, lora_B, 2.0, p, seed)
    needs = [g and (n != "bias" or bias) for n, g in zip(NAMES, grads)]
    torch.library.opcheck(lora_linear_backward_op,
                          (torch.randn_like(y), x, weight, lora_A, lora_B, S, 2.0, p, seed, needs))
    torch.library.opcheck(keep_mask_op, (seed, 14, 40, 5033165, torch.device(device)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_function_matches_eager(backend, monkeypatch, device):
    """Inductor, fullgraph: the output and the gradients of all five inputs, with dropout."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    inputs = make_inputs((2, 13), 40, 24, 4, torch.float32, device=device)
    dy = torch.randn(2, 13, 24, generator=torch.Generator().manual_seed(3)).to(device)
    compiled = torch.compile(layer, fullgraph=True)
    y_c, grads_c = run(compiled, inputs, dy, seed=11)
    y_e, grads_e = run(layer, inputs, dy, seed=11)
    assert graphs_compiled() == 1
    if backend == "triton" and BITWISE:
        # The op is opaque to Inductor: the compiled graph launches eager's kernels on eager's inputs.
        assert_same(dict(y=y_c, **grads_c), dict(y=y_e, **grads_e))
        return
    # Inductor sums dbias in its own order, and on CUDA nothing promises eager's bits: the compiled
    # result meets the oracle against float64.
    keep = fusedlora.dropout_mask(11, inputs["x"].shape, 0.25, device)
    check_lora_linear(y_c, grads_c, inputs, 2.0, keep, 0.25, dy, torch_ops=backend == "torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_module_matches_eager_for_every_batch_size(backend, monkeypatch, device):
    """Inductor, fullgraph, dynamic=True: one compile serves every batch size, and with Inductor's
    fallback_random the seeds the layers draw (dropout 0.25) are eager's, so losses and gradients
    (of x and the adapters) are equal."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    eager, model = make_model().to(device), make_model().to(device)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    batches = [(rows, [x.to(device)], target.to(device))
               for rows in (3, 8, 13) for x, target in [make_batch(rows, seed=rows)]]
    with torch._inductor.config.patch(fallback_random=True):
        compared = assert_steps_equal(eager, model, compiled, batches)
    assert compared == 6  # the loss, dx, and lora_A and lora_B of both layers
    assert graphs_compiled() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_sizes_recompile_once_by_default(backend, monkeypatch, device):
    """Default dynamic=None: the first batch size compiles static, the second dynamic, then none."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    model = make_model().to(device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for i, rows in enumerate((4, 6, 9, 17, 30)):
        x, target = (t.to(device) for t in make_batch(rows))
        mse(compiled(x), target).backward()
        assert graphs_compiled() == min(i + 1, 2), f"batch {rows}"


def test_explicit_int_seeds_recompile_once(device):
    inputs = make_inputs(12, 40, 24, 4, torch.float32, device=device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for i, seed in enumerate((1, 2, 3, 2**40)):
        y = compiled(*(inputs[n] for n in NAMES), seed=seed)
        assert torch.equal(y, layer(*(inputs[n] for n in NAMES), seed=seed)), f"seed {seed}"
        assert graphs_compiled() == min(i + 1, 2), f"seed {seed}"


def test_drawn_seed_in_a_graph_is_eagers_draw(device):
    """The draw is a torch.randint in the graph: with a backend that runs the graph's ops as eager
    does, torch.manual_seed gives the eager mask."""
    inputs = [make_inputs(12, 40, 24, 4, torch.float32, device=device)[n] for n in NAMES]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.manual_seed(4)
    y_c = compiled(*inputs)
    torch.manual_seed(4)
    assert torch.equal(y_c, layer(*inputs))


def test_inductor_draws_are_reproducible_but_its_own(device):
    """Inductor draws random numbers with its own generator, seeded from torch's: torch.manual_seed
    reproduces a compiled run and each call draws a new mask."""
    inputs = [make_inputs(12, 40, 24, 4, torch.float32, device=device)[n] for n in NAMES]
    compiled = torch.compile(layer, fullgraph=True)
    torch.manual_seed(4)
    y1, y2 = compiled(*inputs), compiled(*inputs)
    torch.manual_seed(4)
    assert torch.equal(compiled(*inputs), y1) and not torch.equal(y1, y2)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_checkpointing_recomputes_the_same_mask(compile_backend, device):
    """Checkpointing inside a compiled function (non-reentrant, the mode torch.compile traces) with
    drawn seeds: gradients equal the compiled run without checkpointing (bitwise where BITWISE: the
    recompute runs the same code on the same values; on CUDA the two graphs are compiled apart, so
    both are held against float64)."""
    model = make_model(dropout=0.5).to(device)
    reference = None if BITWISE else copy.deepcopy(model).double()
    x, target = (t.to(device) for t in make_batch(6))

    def plain(x):
        return model(x)

    def checkpointed(x):
        return checkpoint(model, x, use_reentrant=False)

    # Against float64 (not BITWISE), Inductor must draw the seeds from eager's generator, as the
    # float64 run does; elsewhere it keeps its own.
    with torch._inductor.config.patch(fallback_random=not BITWISE):
        want, got = (training_step(torch.compile(fn, fullgraph=True, backend=compile_backend), model, 9, [x], target)
                     for fn in (plain, checkpointed))
    exact = low = None
    if reference is not None:
        with float64_fusedlora():
            exact = training_step(reference, reference, 9, [x], target, torch.float64)
            low = training_step(model, model, 9, [x], target)
    assert_same(got, want, exact, low)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_with_new_inputs_and_adapters():
    """A fixed-shape call captured once, replayed after copying new x and new adapter weights into
    the captured tensors, equals an eager call on the new values."""
    inputs = make_inputs(8, 64, 48, 16, torch.float16, device="cuda")
    static = {n: t.clone() for n, t in inputs.items()}

    def step():
        return fusedlora.lora_linear(*(static[n] for n in NAMES), 2.0)

    graph, y = capture(step)
    for seed in (1, 2):
        new = make_inputs(8, 64, 48, 16, torch.float16, device="cuda", seed=seed)
        for n in ("x", "lora_A", "lora_B"):
            static[n].copy_(new[n])
        graph.replay()
        torch.testing.assert_close(y, fusedlora.lora_linear(*(static[n] for n in NAMES), 2.0),
                                   rtol=0, atol=0)
