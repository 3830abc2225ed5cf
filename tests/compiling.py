"""What the compile tests share: a fresh dynamo for each test, a backend that keeps the graphs dynamo
hands it, and the bitwise comparison of compiled with eager results."""
import pytest
import torch
import torch._dynamo
import torch._dynamo.utils


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
                           f"{tuple(bad.nonzero()[0].tolist())}: {got[bad][0].item()!r}, expected {want[bad][0].item()!r}")
