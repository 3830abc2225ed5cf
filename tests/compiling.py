"""What the compile tests share: a fresh dynamo for each test, a backend that keeps the graphs dynamo
hands it, the bitwise comparison of compiled with eager results, and CUDA-graph capture."""
import pytest
import torch
import torch._dynamo
import torch._dynamo.utils
from lora_model import mse


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def graphs_compiled():
    """Graphs dynamo produced since the fixture cleared the counters: one per compile or recompile
    (a restart within one compile, as when a float attribute gets specialized, is not counted)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def recording(backend: str):
    """(a torch.compile backend that runs `backend`, the list of dynamo graphs it was given)."""
    graphs = []
    inner = torch._dynamo.lookup_backend(backend)

    def compile_fn(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)

    return compile_fn, graphs


def op_calls(graphs, op) -> int:
    """How many calls of the custom op `op` (an OpOverload) the graphs hold."""
    return sum(node.op == "call_function" and node.target is op for g in graphs for node in g.graph.nodes)


def assert_same(name, got, want, exact=True):
    """got (compiled, checkpointed, replayed) equals want (eager) bitwise when `exact`: the fused op
    is opaque to Inductor, and on CPU the torch path's matmuls are the same BLAS calls, with correctly
    rounded elementwise fp32 ops around them (reductions other than matmuls can be reordered: see
    test_compile.py's function test). Inductor's generated GPU code for the torch path is not checked
    bitwise."""
    if not exact:
        torch.testing.assert_close(got, want, msg=name)
        return
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != expected {tuple(want.shape)}"
    bad = got != want
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} differ, the first at "
                           f"{tuple(bad.nonzero()[0].tolist())}: {got[bad][0].item()!r}, "
                           f"expected {want[bad][0].item()!r}")


def assert_steps_equal(eager, model, compiled, batches, exact=True) -> int:
    """One training step of `eager` and one of `compiled` (compiled from `model`, built as `eager`
    was) per (seed, args, target) in `batches`: torch seeded with `seed` (the layers draw the same
    dropout seeds), the mse of net(*args) against target, backward. The loss, the gradient of every
    trainable parameter and of every float arg must be equal (bitwise when `exact`). Returns how many
    tensors each step compared."""
    for seed, args, target in batches:
        results = []
        for net, params in ((eager, eager), (compiled, model)):
            params.zero_grad(set_to_none=True)
            leaves = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in args]
            torch.manual_seed(seed)
            loss = mse(net(*leaves), target)
            loss.backward()
            results.append(dict(loss=loss.detach(), **{f"arg {i}": a.grad for i, a in enumerate(leaves)
                                                       if a.is_floating_point()},
                                **{n: p.grad for n, p in params.named_parameters() if p.requires_grad}))
        assert all(g is not None for g in results[0].values()), "every gradient must be there"
        for name, want in results[0].items():
            assert_same(f"{name} at batch seed {seed}", results[1][name], want, exact)
    return len(results[0])


def capture(step):
    """(a CUDA graph of step(), the tensor it returns): step runs once first on a side stream, so that
    the Triton kernels compile and the allocator warms up outside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out
