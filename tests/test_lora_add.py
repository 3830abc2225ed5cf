"""lora_add: the LoRA update added to the output of a base layer fusedlora does not own, through the
kernels against the float64 reference (outputs and the gradients of base, x, lora_A and lora_B), a
custom base module trained through it, compile, and bad input."""
import pytest
import torch
from compiling import fresh_dynamo, graphs_compiled  # noqa: F401 (a fixture)
from oracle import BITWISE, assert_normwise, assert_same, check_lora_add, make_inputs

import fusedlora
from fusedlora.core.backend import backend_for
from fusedlora.core import reference
from fusedlora.ops.single import lora_add_backward_op, lora_add_op

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
ADD_NAMES = ("base", "x", "lora_A", "lora_B")


def add_inputs(lead, K, N, r, dtype, adapter_dtype=None, device="cpu", seed=0):
    inputs = make_inputs(lead, K, N, r, dtype, adapter_dtype, device=device, seed=seed)
    lead = lead if isinstance(lead, tuple) else (lead,)
    base = torch.randn(*lead, N, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return dict(base=base.to(dtype).to(device), x=inputs["x"], lora_A=inputs["lora_A"], lora_B=inputs["lora_B"])


def run(fn, inputs, dy, **kwargs):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    y = fn(*(leaves[n] for n in ADD_NAMES), **kwargs)
    y.backward(dy.to(y.dtype))
    return y.detach(), {n: t.grad for n, t in leaves.items()}


CASES = [
    pytest.param(37, 70, 45, 3, f32, f32, 0.0, id="odd-f32"),
    pytest.param(37, 70, 45, 3, f32, f32, 0.25, id="odd-f32-dropout"),
    pytest.param((2, 19), 48, 40, 8, bf16, f32, 0.1, id="3d-bf16-fp32adapters-dropout"),
    pytest.param(20, 64, 36, 16, f16, f16, 0.0, id="f16"),
    pytest.param(17, 40, 24, 100, f32, f32, 0.3, id="r100-rank-loop"),
]


@pytest.mark.parametrize("backward", ["one-launch", "split"])
@pytest.mark.parametrize("lead,K,N,r,dtype,adapter_dtype,p", CASES)
def test_matches_reference(lead, K, N, r, dtype, adapter_dtype, p, backward, device, monkeypatch):
    """Both backward paths: one launch (what these row counts take, ranks up to 64) and the split
    plan's three launches (FUSEDLORA_PLAN=split)."""
    monkeypatch.setenv("FUSEDLORA_PLAN", "fused" if backward == "one-launch" else "split")
    inputs = add_inputs(lead, K, N, r, dtype, adapter_dtype, device)
    base_before = inputs["base"].clone()
    dy = torch.randn(inputs["base"].shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    keep = fusedlora.dropout_mask(9, inputs["x"].shape, p, device) if p > 0 else None
    y, grads = run(fusedlora.lora_add, inputs, dy, scaling=1.5, dropout_p=p, seed=9)
    assert torch.equal(inputs["base"], base_before), "lora_add modified its base argument"
    assert y.dtype == dtype and y.shape == inputs["base"].shape
    check_lora_add(y, grads, inputs, 1.5, keep, p, dy)


@pytest.mark.parametrize("lead,K,N,r,dtype,adapter_dtype,p", CASES)
def test_default_backend_matches_reference(lead, K, N, r, dtype, adapter_dtype, p, device, monkeypatch):
    """What a user gets without setting FUSEDLORA_BACKEND (the kernels on CUDA, the PyTorch path on
    CPU), against the float64 reference of fusedlora.core.reference."""
    monkeypatch.delenv("FUSEDLORA_BACKEND")
    inputs = add_inputs(lead, K, N, r, dtype, adapter_dtype, device)
    dy = torch.randn(inputs["base"].shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    keep = fusedlora.dropout_mask(9, inputs["x"].shape, p, device) if p > 0 else None
    y, grads = run(fusedlora.lora_add, inputs, dy, scaling=1.5, dropout_p=p, seed=9)
    check_lora_add(y, grads, inputs, 1.5, keep, p, dy, torch_ops=backend_for(inputs["x"]) == "torch")


def test_strided_base_and_x(device):
    """A transposed base output and a sliced x are read in place."""
    inputs = add_inputs(30, 80, 48, 8, f32, device=device)
    strided = dict(inputs, base=inputs["base"].t().contiguous().t(), x=torch.stack([inputs["x"]] * 2, -1)[..., 0])
    assert not strided["base"].is_contiguous() and strided["x"].stride(1) == 2
    dy = torch.randn(30, 48, device=device)
    y, grads = run(fusedlora.lora_add, strided, dy, scaling=0.5, dropout_p=0.2, seed=4)
    y_ref, grads_ref = run(fusedlora.lora_add, inputs, dy, scaling=0.5, dropout_p=0.2, seed=4)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    for name in ADD_NAMES:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-6, atol=1e-6)


class Scaled(torch.nn.Module):
    """A base layer that is no nn.Linear: x·Wᵀ·2, then a tanh."""

    def __init__(self, K, N):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(N, K) / K ** 0.5)

    def forward(self, x):
        return torch.tanh(2 * x @ self.weight.t())


def test_custom_base_module_trains_through_lora_add(device):
    """y = lora_add(base(x), x, A, B): the gradient of x is the sum of the base layer's own and the
    low-rank path's, and the base layer's weight gets its gradient through its own autograd."""
    torch.manual_seed(0)
    base = Scaled(32, 24).to(device)
    A = torch.randn(4, 32, device=device) / 6
    B = torch.randn(24, 4, device=device) / 2
    x = torch.randn(10, 32, device=device)
    dy = torch.randn(10, 24, device=device)
    runs = {}
    for name, fn, dtype in (("kernel", fusedlora.lora_add, f32), ("low", reference.lora_add, f32),
                            ("exact", reference.lora_add, torch.float64)):
        layer = Scaled(32, 24).to(device=device, dtype=dtype)
        layer.load_state_dict(base.state_dict())
        xx, AA, BB = (t.to(dtype).clone().requires_grad_() for t in (x, A, B))
        y = fn(layer(xx), xx, AA, BB, 2.0)
        y.backward(dy.to(dtype))
        runs[name] = [y.detach(), xx.grad, layer.weight.grad, AA.grad, BB.grad]
    # A tanh inside: no componentwise bound, so the norm-wise rule of a whole model.
    labels = ("y", "dx", "dweight", "dlora_A", "dlora_B")
    assert_normwise(*(dict(zip(labels, tensors)) for tensors in runs.values()))


def test_compiled_equals_eager_and_opcheck(fresh_dynamo, device):  # noqa: F811
    inputs = add_inputs((2, 7), 40, 24, 4, f32, device=device)
    dy = torch.randn(2, 7, 24, device=device)

    def fn(base, x, lora_A, lora_B):
        return fusedlora.lora_add(base, x, lora_A, lora_B, 2.0, 0.25, seed=11)

    y_c, grads_c = run(torch.compile(fn, fullgraph=True, backend="aot_eager"), inputs, dy)
    y_e, grads_e = run(fn, inputs, dy)
    assert graphs_compiled() == 1
    if BITWISE:  # the op is opaque to the compiler: eager's kernels on eager's inputs
        assert_same(dict(y=y_c, **grads_c), dict(y=y_e, **grads_e))
    else:
        keep = fusedlora.dropout_mask(11, inputs["x"].shape, 0.25, device)
        check_lora_add(y_c, grads_c, inputs, 2.0, keep, 0.25, dy)
    args = [inputs[n].clone().requires_grad_() for n in ADD_NAMES]
    seed = torch.tensor(5)
    torch.library.opcheck(lora_add_op, (*args, 2.0, 0.3, seed))
    base, x, A, B = (t.detach() for t in args)
    y, S = lora_add_op(base, x, A, B, 2.0, 0.3, seed)
    torch.library.opcheck(lora_add_backward_op, (torch.randn_like(y), x, A, B, S, 2.0, 0.3, seed, [True, True, True]))


def test_torch_backend_equals_triton_backend(monkeypatch, device):
    inputs = add_inputs(26, 56, 40, 8, f32, device=device)
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
        outs[backend] = fusedlora.lora_add(*(inputs[n] for n in ADD_NAMES), 2.0, dropout_p=0.4, seed=42)
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change,words", [
    (lambda a: a.update(base=a["base"][:, :-1]), ["lora_B", "(N, r)"]),
    (lambda a: a.update(base=a["base"][:-1]), ["base", "leading shape"]),
    (lambda a: a.update(x=a["x"][:, :-1]), ["lora_A", "(r, K)"]),
    (lambda a: a.update(lora_A=a["lora_A"].double(), lora_B=a["lora_B"].double()), ["dtype"]),
    (lambda a: a.update(base=a["base"].to(torch.int32)), ["base", "dtype"]),
])
def test_bad_input_is_named(change, words, device):
    args = add_inputs(6, 16, 12, 2, f32, device=device)
    change(args)
    with pytest.raises((ValueError, TypeError)) as info:
        fusedlora.lora_add(*(args[n] for n in ADD_NAMES), 1.0)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
