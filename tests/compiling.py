"""What the compile tests share: a fresh dynamo for each test, a backend that keeps the graphs dynamo
hands it, the comparison of compiled with eager training steps, and CUDA-graph capture."""
import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils
from lora_model import mse
from oracle import BITWISE, assert_same, float64_fusedlora


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


def training_step(net, params, seed, args, target, dtype=None):
    """torch seeded with `seed` (the layers draw their dropout seeds from it), the mse of net(*args)
    against target, backward: the loss and the gradients of every float arg and every trainable
    parameter of `params`. dtype: cast args and target first (the float64 run)."""
    params.zero_grad(set_to_none=True)
    leaves = [(a.detach().to(dtype or a.dtype).requires_grad_() if a.is_floating_point() else a) for a in args]
    torch.manual_seed(seed)
    loss = mse(net(*leaves), target.to(dtype or target.dtype))
    loss.backward()
    result = dict(loss=loss.detach(), **{f"arg {i}": a.grad for i, a in enumerate(leaves) if a.is_floating_point()},
                  **{n: p.grad for n, p in params.named_parameters() if p.requires_grad})
    assert all(g is not None for g in result.values()), "every gradient must be there"
    return result


def assert_steps_equal(eager, model, compiled, batches) -> int:
    """One training step of `eager` and one of `compiled` (compiled from `model`, built as `eager`
    was) per (seed, args, target) in `batches`. The loss, the gradient of every trainable parameter
    and of every float arg must be equal bitwise where BITWISE (the fused op is opaque to the
    compiler; the torch path's matmuls are the same BLAS calls). Elsewhere both are held against a
    float64 run of a copy of `eager`, whose layers draw the same seeds, with eager's PyTorch path as
    the noise scale. Returns how many tensors each
    step compared."""
    reference = None if BITWISE else copy.deepcopy(eager).double()
    for seed, args, target in batches:
        want = training_step(eager, eager, seed, args, target)
        got = training_step(compiled, model, seed, args, target)
        exact = low = None
        if reference is not None:
            with float64_fusedlora():
                exact = training_step(reference, reference, seed, args, target, torch.float64)
                low = training_step(eager, eager, seed, args, target)
        assert_same(got, want, exact, low, where=f"at batch seed {seed}")
    return len(want)


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
