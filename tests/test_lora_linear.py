"""lora_linear through the kernels against the float64 reference: output and every gradient, under
both execution plans (the `plan` fixture)."""
import pytest
import torch
from oracle import NAMES, check_lora_linear, make_inputs

import fusedlora
from fusedlora.core.backend import backend_for

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

# A small matrix, not a cross product: each row adds something the others do not.
CASES = [
    # (M, K, N, r, dtype, adapter dtype, bias, dropout p)
    pytest.param(37, 70, 45, 3, f32, f32, True, 0.0, id="odd-f32"),
    pytest.param(37, 70, 45, 3, f32, f32, True, 0.25, id="odd-f32-dropout"),
    pytest.param(64, 64, 64, 16, f16, f16, True, 0.0, id="even-f16"),
    pytest.param(33, 50, 40, 8, f16, f32, False, 0.1, id="f16-fp32adapters-dropout"),
    pytest.param(37, 70, 45, 1, bf16, bf16, True, 0.0, id="r1-bf16"),
    pytest.param(40, 96, 72, 8, bf16, f32, True, 0.1, id="bf16-fp32adapters-dropout"),
    pytest.param(20, 48, 36, 64, f32, f32, True, 0.5, id="r64-dropout"),
    pytest.param(17, 40, 24, 100, f32, f32, False, 0.0, id="r100-rank-loop"),
    pytest.param(9, 33, 20, 200, bf16, bf16, True, 0.2, id="r200-bf16-dropout"),
    pytest.param((2, 19), 70, 45, 16, f32, f32, True, 0.3, id="3d-input"),
    pytest.param(1, 64, 48, 16, f16, f16, True, 0.0, id="decode-M1"),
]


def run_kernel(inputs, scaling, p, seed, dy):
    leaves = {n: (t.detach().clone().requires_grad_() if t is not None else None) for n, t in inputs.items()}
    y = fusedlora.lora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"],
                              leaves["lora_B"], scaling, dropout_p=p, seed=seed)
    y.backward(dy)
    return y.detach(), {n: t.grad for n, t in leaves.items() if t is not None}


def check_against_reference(inputs, scaling, p, seed, dtype, device, torch_ops=False):
    x = inputs["x"]
    dy = torch.randn(*x.shape[:-1], inputs["weight"].shape[0], dtype=torch.float64,
                     generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    keep = fusedlora.dropout_mask(seed, x.shape, p, device) if p > 0 else None
    y, grads = run_kernel(inputs, scaling, p, seed, dy)
    check_lora_linear(y, grads, inputs, scaling, keep, p, dy, torch_ops=torch_ops)


@pytest.mark.parametrize("M,K,N,r,dtype,adapter_dtype,bias,p", CASES)
def test_matches_reference(M, K, N, r, dtype, adapter_dtype, bias, p, device, plan):
    inputs = make_inputs(M, K, N, r, dtype, adapter_dtype, bias, device)
    check_against_reference(inputs, 2.0, p, seed=1234, dtype=dtype, device=device)


@pytest.mark.parametrize("M,K,N,r,dtype,adapter_dtype,bias,p", CASES)
def test_default_backend_matches_reference(M, K, N, r, dtype, adapter_dtype, bias, p, device, monkeypatch):
    """What a user gets without setting FUSEDLORA_BACKEND (the kernels on CUDA, the PyTorch path on
    CPU), against the float64 reference of fusedlora.core.reference."""
    monkeypatch.delenv("FUSEDLORA_BACKEND")
    inputs = make_inputs(M, K, N, r, dtype, adapter_dtype, bias, device)
    torch_ops = backend_for(inputs["x"]) == "torch"
    check_against_reference(inputs, 2.0, p, seed=1234, dtype=dtype, device=device, torch_ops=torch_ops)


def test_strided_and_transposed_inputs(device, plan):
    """Transposes and slices reach the kernels as strides; results are those of contiguous copies."""
    base = make_inputs(30, 80, 48, 8, f32, device=device)
    inputs = dict(
        x=base["x"].t().contiguous().t(),                           # column-major x
        weight=base["weight"].t().contiguous().t(),                 # column-major W
        bias=torch.stack([base["bias"], base["bias"]], 1)[:, 0],    # bias with stride 2
        lora_A=torch.cat([base["lora_A"], base["lora_A"]], 1)[:, ::2],  # every other column
        lora_B=base["lora_B"].t().contiguous().t(),
    )
    assert not inputs["x"].is_contiguous() and inputs["lora_A"].stride(1) == 2
    check_against_reference(inputs, 0.5, 0.2, seed=7, dtype=f32, device=device)
    # A sliced 3-D input that cannot be viewed as 2-D without a copy.
    x3 = torch.randn(3, 22, 160, dtype=f32, generator=torch.Generator().manual_seed(3)).to(device)[:, ::2, ::2]
    check_against_reference(dict(base, x=x3), 0.5, 0.0, seed=7, dtype=f32, device=device)


def test_frozen_base_needs_only_adapter_grads(device):
    """LoRA training: W, b and x need no grad; only lora_A and lora_B get one."""
    inputs = make_inputs(24, 64, 32, 8, bf16, f32, device=device)
    A = inputs["lora_A"].clone().requires_grad_()
    B = inputs["lora_B"].clone().requires_grad_()
    y = fusedlora.lora_linear(inputs["x"], inputs["weight"], inputs["bias"], A, B, 2.0, 0.1, seed=3)
    y.float().square().sum().backward()
    assert A.grad is not None and B.grad is not None
    assert A.grad.dtype == f32 and B.grad.dtype == f32
    assert torch.isfinite(A.grad).all() and A.grad.abs().sum() > 0


@pytest.mark.parametrize("needs", [("x",), ("weight",), ("weight", "bias"), ("x", "lora_B"), ("lora_A",),
                                   ("bias", "lora_A", "lora_B")], ids="+".join)
def test_gradients_of_any_subset(needs, device, plan):
    """requires_grad on only some of x, W, b, A, B (an x-only saliency pass, a weight-only fine-tune, one
    adapter half frozen): exactly those get a gradient, each equal to the float64 reference's; the
    backward skips the others' kernels, so each subset is its own path."""
    inputs = make_inputs(19, 40, 24, 4, f32, device=device)
    leaves = {n: t.detach().clone().requires_grad_(n in needs) for n, t in inputs.items()}
    dy = torch.randn(19, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(f32).to(device)
    y = fusedlora.lora_linear(*(leaves[n] for n in NAMES), 1.5, dropout_p=0.2, seed=8)
    y.backward(dy)
    assert {n for n, t in leaves.items() if t.grad is not None} == set(needs)
    keep = fusedlora.dropout_mask(8, inputs["x"].shape, 0.2, device)
    check_lora_linear(y.detach(), {n: leaves[n].grad for n in needs}, inputs, 1.5, keep, 0.2, dy)


def test_empty_batch(device, plan):
    inputs = make_inputs(0, 32, 16, 4, f32, device=device)
    leaves = {n: t.requires_grad_() for n, t in inputs.items()}
    y = fusedlora.lora_linear(*(leaves[n] for n in NAMES), 1.0, 0.1, seed=5)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert leaves["x"].grad.shape == (0, 32)
    assert torch.equal(leaves["lora_A"].grad, torch.zeros_like(inputs["lora_A"]))
    assert torch.equal(leaves["weight"].grad, torch.zeros_like(inputs["weight"]))


@pytest.mark.parametrize("M,K,N", [(16, 32, 0), (16, 0, 24), ((2, 8), 32, 0), ((2, 8), 0, 24)])
def test_empty_features(M, K, N, device, plan):
    """No output feature (N = 0), or no input feature (K = 0: y is the bias), 2-D and 3-D x, dropout on,
    every gradient: lora_linear and lora_add against float64. Viewing an empty tensor's rows as
    (-1, 0) is ambiguous: these calls used to raise there."""
    from test_lora_add import add_inputs
    from oracle import check_lora_add
    inputs, add = make_inputs(M, max(K, 1), N, 4, f32, device=device), add_inputs(M, max(K, 1), N, 4, f32)
    for args in (inputs, add):  # K = 0: the inputs' scale is K ** -0.5, so narrow K = 1 ones
        args.update({n: args[n][..., :K].contiguous() for n in ("x", "weight", "lora_A") if n in args})
    for fn, names, check, args in ((fusedlora.lora_linear, NAMES, check_lora_linear, inputs),
                                   (fusedlora.lora_add, ("base", "x", "lora_A", "lora_B"), check_lora_add, add)):
        leaves = {n: args[n].detach().clone().requires_grad_() for n in names if args[n] is not None}
        y = fn(*(leaves.get(n) for n in names), 1.5, 0.2, 8)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(device)
        y.backward(dy)
        keep = fusedlora.dropout_mask(8, args["x"].shape, 0.2, device)
        check(y.detach(), {n: t.grad for n, t in leaves.items()}, args, 1.5, keep, 0.2, dy)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on the NaNs
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_nan_and_inf_propagate_as_in_reference(p, device, plan):
    inputs = make_inputs(20, 40, 24, 4, f32, device=device)
    inputs["x"][3, 5] = float("nan")
    inputs["x"][7, 11] = float("inf")
    inputs["weight"][2, 9] = float("-inf")
    inputs["lora_B"][5, 1] = float("nan")
    keep = fusedlora.dropout_mask(9, inputs["x"].shape, p, device) if p > 0 else None
    y = fusedlora.lora_linear(*(inputs[n] for n in NAMES), 1.5, p, seed=9)
    ref = fusedlora.reference.lora_linear(*(inputs[n].double() for n in NAMES), 1.5, keep, p)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isposinf(y), torch.isposinf(ref))
    assert torch.equal(torch.isneginf(y), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    assert finite.any()
    torch.testing.assert_close(y[finite].double(), ref[finite], rtol=1e-5, atol=1e-5)


def test_torch_backend_equals_triton_backend(monkeypatch, device):
    """Same seed, same mask: the two backends agree to rounding, dropout included."""
    inputs = make_inputs(26, 56, 40, 8, f32, device=device)
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
        outs[backend] = fusedlora.lora_linear(*(inputs[n] for n in NAMES), 2.0, dropout_p=0.4, seed=42)
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_refused(monkeypatch, device):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "cuda-magic")
    inputs = make_inputs(4, 16, 8, 2, f32, device=device)
    with pytest.raises(ValueError, match="FUSEDLORA_BACKEND"):
        fusedlora.lora_linear(*(inputs[n] for n in NAMES), 1.0)


def test_output_can_be_modified_in_place(device, plan):
    """The output is no view (a view returned by an autograd Function could not be modified in place),
    so code that scales a projection's output in place keeps working, gradients included."""
    inputs = make_inputs((2, 5), 32, 24, 4, f32, device=device)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    y = fusedlora.lora_linear(*(leaves[n] for n in NAMES), 2.0, 0.2, seed=6)
    assert y._base is None and y.shape == (2, 5, 24)
    y.mul_(3.0).sum().backward()
    ref = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    keep = fusedlora.dropout_mask(6, inputs["x"].shape, 0.2, device)
    (3.0 * fusedlora.reference.lora_linear(*(ref[n] for n in NAMES), 2.0, keep, 0.2)).sum().backward()
    for name in NAMES:
        torch.testing.assert_close(leaves[name].grad, ref[name].grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_two_launch_fused_forward(p, device, monkeypatch):
    """The fused plan's forward as two launches (lora_shrink, then the GEMM), which it takes above the
    one-launch row count; the other tests' shapes take the one-launch forward."""
    from fusedlora.plans import single
    monkeypatch.setenv("FUSEDLORA_PLAN", "fused")
    M = single.ONE_LAUNCH_MAX_M + 13
    inputs = make_inputs(M, 70, 45, 3, f32, f32, True, device)
    check_against_reference(inputs, 2.0, p, seed=99, dtype=f32, device=device)
