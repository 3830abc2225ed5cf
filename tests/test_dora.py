"""dora_linear through the kernels against the float64 reference (fusedlora.reference.dora_linear):
the output and every gradient, magnitude included, under both plans, dropout on and off; and the
proof that no N·K tensor is created."""
import os
import sys

import pytest
import torch
from oracle import assert_oracle, chain_lengths, make_inputs, run
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fusedlora
from fusedlora.core import reference

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

CASES = [
    # (M, K, N, r, dtype, adapter dtype, bias, dropout p)
    pytest.param(37, 70, 45, 3, f32, f32, True, 0.0, id="odd-f32"),
    pytest.param(37, 70, 45, 3, f32, f32, True, 0.25, id="odd-f32-dropout"),
    pytest.param(33, 50, 40, 8, f16, f32, False, 0.0, id="f16-fp32adapters"),
    pytest.param(40, 64, 72, 8, bf16, f32, True, 0.1, id="bf16-fp32adapters-dropout"),
    pytest.param(20, 48, 36, 16, bf16, bf16, True, 0.0, id="bf16"),
    pytest.param((2, 9), 40, 24, 4, f32, f32, False, 0.3, id="3d-input-dropout"),
]


def dora_inputs(M, K, N, r, dtype, adapter_dtype, bias, scaling, seed=0):
    inputs = make_inputs(M, K, N, r, dtype, adapter_dtype, bias, seed=seed)
    # The magnitude starts as the row norms in PEFT (g = 1); moved away from them so that g matters.
    n = reference.dora_weight_norm(inputs["weight"].double(), inputs["lora_A"].double(), inputs["lora_B"].double(),
                                   scaling)
    gen = torch.Generator().manual_seed(seed + 7)
    m = n * (1 + 0.3 * torch.randn(N, generator=gen, dtype=torch.float64))
    return dict(inputs, magnitude=m.to(adapter_dtype))


def norm_condition(inputs, scaling):
    """κ = ‖|W| + |s|·|B|·|A|‖² / ‖W + s·B·A‖², worst row: how much the row norms' rounding errors
    (a sum of K + 2r products) are amplified relative to the norm."""
    a = {k: inputs[k].double() for k in ("weight", "lora_A", "lora_B")}
    exact = reference.dora_weight_norm(a["weight"], a["lora_A"], a["lora_B"], scaling)
    mag = reference.dora_weight_norm(a["weight"].abs(), a["lora_A"].abs(), a["lora_B"].abs(), abs(scaling))
    return exact, float((mag / exact).square().max())


def dora_lengths(M, K, N, r, kappa):
    """chain_lengths, each lengthened by the path of g = m / n: the norm's K + 2r + 6 roundings weighted
    by its condition κ, the square root and the division; dm adds the row sum of its M terms."""
    extra = int((K + 2 * r + 6) * kappa) + 3
    lengths = {k: v + extra for k, v in chain_lengths(M, K, N, r).items()}
    lengths["magnitude"] = lengths["y"] + M + 1
    return lengths


def dora_magnitude(x, weight, bias, lora_A, lora_B, magnitude, scaling, keep_mask, dropout_p, weight_norm):
    """Σ|terms| of every output (and, through autograd, of every gradient) on |inputs|: the reference's
    sum with its coefficient g - 1 replaced by |g - 1| (whose derivative in m keeps its size 1/n)."""
    g = magnitude / weight_norm
    y = x @ weight.t() + (0 if bias is None else bias)
    xd = x if keep_mask is None else reference.dropout(x, keep_mask, dropout_p)
    low_rank = ((xd @ lora_A.t()) @ lora_B.t()) * scaling
    if keep_mask is None:
        return g * (y + low_rank) - (0 if bias is None else bias) * (g - 1)
    c = (g - 1).abs().detach() + (g - g.detach())
    return y + c * (xd @ weight.t()) + g * low_rank


def check_dora(y, grads, args, dy, lengths):
    """The componentwise rule (tests/oracle.py) on y and every gradient; the magnitude run is
    dora_magnitude, since the reference's dropout form has a coefficient of either sign."""
    names = list(grads)
    (y_low, g_low), (y64, g64) = (run(reference.dora_linear, args, dy, names, mode) for mode in ("low", "exact"))
    y_mag, g_mag = run(dora_magnitude, args, dy, names, "magnitude")
    dtype = args["x"].dtype
    assert y.dtype == dtype
    assert_oracle("y", y, y_low, y64, y_mag, lengths["y"], dtype)
    for n in names:
        assert grads[n].dtype == args[n].dtype, f"d{n} has dtype {grads[n].dtype}, {n} {args[n].dtype}"
        assert_oracle(f"d{n}", grads[n], g_low[n], g64[n], g_mag[n], lengths[n], dtype)


def run_kernel(inputs, scaling, p, seed, dy):
    leaves = {n: (t.detach().clone().requires_grad_() if t is not None else None) for n, t in inputs.items()}
    y = fusedlora.dora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"],
                              leaves["magnitude"], scaling, dropout_p=p, seed=seed)
    y.backward(dy)
    return y.detach(), {n: t.grad for n, t in leaves.items() if t is not None}


@pytest.mark.parametrize("M,K,N,r,dtype,adapter_dtype,bias,p", CASES)
def test_matches_reference(M, K, N, r, dtype, adapter_dtype, bias, p, plan):
    scaling, seed = 2.0, 1234
    inputs = dora_inputs(M, K, N, r, dtype, adapter_dtype, bias, scaling)
    x = inputs["x"]
    dy = torch.randn(*x.shape[:-1], N, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    keep = fusedlora.dropout_mask(seed, x.shape, p) if p > 0 else None
    y, grads = run_kernel(inputs, scaling, p, seed, dy)
    n64, kappa = norm_condition(inputs, scaling)
    args = dict(inputs, scaling=scaling, keep_mask=keep, dropout_p=p, weight_norm=n64)
    check_dora(y, grads, args, dy, dora_lengths(x.numel() // K, K, N, r, kappa))


@pytest.mark.parametrize("M,K,N,r,dtype,adapter_dtype,bias,p", [CASES[1], CASES[3]])
def test_torch_backend_matches_reference(M, K, N, r, dtype, adapter_dtype, bias, p, monkeypatch):
    """The CPU path (FUSEDLORA_BACKEND=torch: fusedlora/core/torch_backend.py, written apart from the
    reference) under the same float64 oracle as the kernels, dropout mask included."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    scaling, seed = 2.0, 1234
    inputs = dora_inputs(M, K, N, r, dtype, adapter_dtype, bias, scaling)
    x = inputs["x"]
    dy = torch.randn(*x.shape[:-1], N, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    y, grads = run_kernel(inputs, scaling, p, seed, dy)
    n64, kappa = norm_condition(inputs, scaling)
    args = dict(inputs, scaling=scaling, keep_mask=fusedlora.dropout_mask(seed, x.shape, p), dropout_p=p, weight_norm=n64)
    check_dora(y, grads, args, dy, dora_lengths(x.numel() // K, K, N, r, kappa))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_weight_made_again_in_backward(p, plan):
    """weight_fn: the weight is not kept for backward but made again there (as a dequantized 4-bit
    weight would be): the same output and gradients, bit for bit, as with the weight kept, and weight_fn
    called once per backward, never in the forward."""
    scaling, seed = 2.0, 99
    inputs = dora_inputs(12, 40, 24, 4, f32, f32, True, scaling)
    x, W, b, A, B, m = (inputs[n].detach() for n in ("x", "weight", "bias", "lora_A", "lora_B", "magnitude"))
    dy = torch.randn(12, 24, generator=torch.Generator().manual_seed(3))
    calls = []

    def made_again():
        calls.append(1)
        return W.clone()

    def run(weight_fn):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, m)]
        y = fusedlora.dora_linear(leaves[0], W.clone(), b, leaves[1], leaves[2], leaves[3], scaling, p, seed,
                                  weight_fn=weight_fn)
        forward_calls = len(calls)
        y.backward(dy)
        return y.detach(), [t.grad for t in leaves], forward_calls

    want = run(None)
    got = run(made_again)
    assert got[2] == 0 and len(calls) == 1
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with pytest.raises(TypeError, match="weight_fn"):
        fusedlora.dora_linear(x, W, b, A, B, m, scaling, weight_fn=W)


def test_no_dropout_forms_agree():
    """With every element kept, PEFT's dropout form equals the plain one: the two branches of the
    reference describe one layer."""
    inputs = {k: (v.double() if v is not None else None) for k, v in dora_inputs(9, 24, 20, 4, f32, f32, True, 1.5).items()}
    keep = torch.ones_like(inputs["x"], dtype=torch.bool)
    a = reference.dora_linear(**inputs, scaling=1.5)
    b = reference.dora_linear(**inputs, scaling=1.5, keep_mask=keep, dropout_p=0.0)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bad_magnitude_is_named():
    inputs = dora_inputs(4, 16, 8, 2, f32, f32, False, 1.0)
    with pytest.raises(ValueError, match="magnitude"):
        fusedlora.dora_linear(inputs["x"], inputs["weight"], None, inputs["lora_A"], inputs["lora_B"],
                              inputs["magnitude"][:5], 1.0)
    with pytest.raises(TypeError, match="magnitude"):
        fusedlora.dora_linear(inputs["x"], inputs["weight"], None, inputs["lora_A"], inputs["lora_B"],
                              inputs["magnitude"].double(), 1.0)


def _in_interpreter() -> bool:
    """Whether the Triton interpreter is on the stack: it copies every kernel argument to host buffers
    and back, copies that a GPU launch does not make."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(os.path.join("triton", "runtime", "interpreter.py")):
            return True
        frame = frame.f_back
    return False


class Sizes(TorchDispatchMode):
    """Records the element count of every tensor an op allocates (outside the interpreter's copies)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _in_interpreter():
            return out
        # Views and in-place results share an input's storage: they allocate nothing.
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((t.numel(), str(func)))
        return out


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_no_tensor_of_weight_size(p, plan):
    """A fused DoRA forward and backward of an (N, K) layer creates no tensor of N·K elements or more
    (M < N, K so that activations stay below it); PEFT's DoRA layer creates two (B·A through an
    identity matrix, and W + s·B·A), both of exactly N·K."""
    M, K, N, r = 8, 48, 40, 4
    inputs = dora_inputs(M, K, N, r, f32, f32, True, 2.0)
    leaves = {n: t.detach().clone().requires_grad_(n != "weight") for n, t in inputs.items()}
    dy = torch.randn(M, N)
    with Sizes() as rec:
        y = fusedlora.dora_linear(*(leaves[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")),
                                  2.0, dropout_p=p, seed=3)
        y.backward(dy)
    big = [(numel, op) for numel, op in rec.sizes if numel >= N * K]
    assert rec.sizes and not big, big

    from peft.tuners.lora.dora import DoraLinearLayer
    base = torch.nn.Linear(K, N)
    base.weight.data.copy_(inputs["weight"])
    A, B = torch.nn.Linear(K, r, bias=False), torch.nn.Linear(r, N, bias=False)
    A.weight.data.copy_(inputs["lora_A"])
    B.weight.data.copy_(inputs["lora_B"])
    layer = DoraLinearLayer(fan_in_fan_out=False)
    layer.update_layer(base_layer=base, lora_A=A.weight, lora_B=B.weight, scaling=2.0)
    x = inputs["x"].clone().requires_grad_()
    with Sizes() as rec:
        out = layer(x, lora_A=A, lora_B=B, scaling=2.0, base_layer=base, base_result=base(x))
        out.backward(dy)
    assert sum(numel >= N * K for numel, _ in rec.sizes) >= 2, rec.sizes


def test_compiled_call_runs_whole_and_matches_reference():
    """Under torch.compile(fullgraph=True) dora_linear traces whole (through the PyTorch backend) and
    its output and gradients meet the same float64 oracle as the eager kernels, dropout included."""
    torch._dynamo.reset()
    M, K, N, r, scaling, p, seed = 6, 20, 12, 2, 1.5, 0.25, 99
    inputs = dora_inputs(M, K, N, r, f32, f32, True, scaling)
    dy = torch.randn(M, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(f32)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}

    def layer(*args):
        return fusedlora.dora_linear(*args, scaling, dropout_p=p, seed=seed)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(*(leaves[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")))
    y.backward(dy)
    n64, kappa = norm_condition(inputs, scaling)
    args = dict(inputs, scaling=scaling, keep_mask=fusedlora.dropout_mask(seed, (M, K), p), dropout_p=p,
                weight_norm=n64)
    check_dora(y.detach(), {n: t.grad for n, t in leaves.items()}, args, dy, dora_lengths(M, K, N, r, kappa))


@pytest.mark.parametrize("N,K,r,wdtype,adtype,strided", [
    (45, 70, 3, torch.float32, torch.float32, False),
    (45, 70, 3, torch.bfloat16, torch.float32, True),
    (40, 96, 64, torch.bfloat16, torch.bfloat16, False),
    (24, 40, 65, torch.float32, torch.float32, False),  # above the kernel's rank: the torch sequence
])
def test_norms_against_float64(N, K, r, wdtype, adtype, strided, device):
    """The row norms n = ‖W + s·B·A‖ and g = m / n of plans/dora.norms (kernels/dora_norm.py up to rank
    64) against float64. n² sums K + 2r + 3 products per term and takes 3 more roundings to combine, so
    its error is at most γ_{K+2r+6}·mag², mag = ‖|W| + |s|·|B|·|A|‖ (the sum of the terms' magnitudes);
    the square root halves it relative to n and rounds once more, the division by m once more."""
    from fusedlora.plans.dora import norms
    scaling = -1.75
    inputs = make_inputs(8, K, N, r, wdtype, adtype, False, device, seed=3)
    W, A, B = inputs["weight"], inputs["lora_A"], inputs["lora_B"]
    if strided:  # B as PEFT never stores it, A through a transposed copy: the kernel takes strides
        A, B = A.t().contiguous().t(), B.t().contiguous().t()
    m = (torch.rand(N, generator=torch.Generator().manual_seed(4)) + 0.5).to(adtype).to(device)
    n, g = norms(W, A, B, m, scaling)
    exact, kappa = norm_condition(dict(weight=W, lora_A=A, lora_B=B), scaling)
    u = 3 * 2.0 ** -22 if torch.cuda.is_available() else 2.0 ** -24  # tf32x3 products, else IEEE fp32
    length = K + 2 * r + 6
    rel = length * u / (1 - length * u) * kappa / 2 + u
    assert n.dtype == g.dtype == torch.float32 and n.shape == g.shape == (N,)
    err_n = ((n.double() - exact.to(device)).abs() / exact.to(device)).max().item()
    assert err_n <= rel, f"n: relative error {err_n:.3e} > bound {rel:.3e} (κ = {kappa:.2f})"
    g64 = m.double() / exact.to(device)
    err_g = ((g.double() - g64).abs() / g64.abs()).max().item()
    assert err_g <= rel + 2 * u, f"g: relative error {err_g:.3e} > bound {rel + 2 * u:.3e}"


@pytest.mark.parametrize("M", [16, (2, 8)])
def test_no_output_feature(M, plan):
    """N = 0: an empty (*, 0) output and zero gradients of the inputs' shapes (the rows of the empty
    output used to be viewed as (-1, 0), which raises)."""
    inputs = {n: t.detach().requires_grad_() for n, t in dora_inputs(M, 32, 0, 4, f32, f32, True, 2.0).items()}
    y = fusedlora.dora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"],
                              inputs["magnitude"], 2.0, dropout_p=0.2, seed=3)
    assert y.shape == (*inputs["x"].shape[:-1], 0)
    y.sum().backward()
    for name, t in inputs.items():
        assert torch.equal(t.grad, torch.zeros_like(t)), name
