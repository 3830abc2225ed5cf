"""multi_lora_linear with DoRA adapters in the batch (col_scale) against the float64 reference, under
each execution plan, with the per-adapter scales computed as AdapterPool and patch_peft compute them
(fusedlora/plans/multi_dora.py: from ‖W‖², W·Aᵀ and A·Aᵀ); plain and DoRA adapters and base rows in one
batch, ranks that differ; no tensor of the weight's size; gradients through the PyTorch backend."""
import pytest
import torch
from oracle import assert_oracle, chain_lengths, run
from test_dora import Sizes
from test_multi_lora import ids_for, make_multi

import fusedlora
from fusedlora.core import reference
from fusedlora.plans.multi_dora import dora_col_scale, stacked_weight_norms

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
NAN = float("nan")
CASES = [
    # (M, K, N, L, R, ranks, dtype, adapter dtype, ids, which adapters are DoRA)
    pytest.param(37, 70, 45, 4, 8, [3, 5, 8, 5], f32, f32, "unsorted", (1, 0, 1, 0), id="mixed-f32"),
    pytest.param(24, 64, 40, 8, 8, [8, 3, 5, 2, 8, 1, 4, 6], bf16, f32, "each-own", (1, 1, 0, 1, 0, 1, 1, 0),
                 id="decode-bf16-fp32adapters"),
    pytest.param(50, 64, 48, 3, 16, [4, 8, 16], bf16, bf16, "runs", (1, 1, 1), id="all-dora-bf16"),
    pytest.param((3, 11), 70, 45, 4, 8, [8, 3, 5, 5], f16, f32, "unsorted", (0, 1, 1, 0), id="3d-f16"),
    pytest.param(90, 40, 36, 6, 16, [16, 5, 0, 9, 1, 12], f32, f32, "unsorted", (1, 0, 1, 1, 0, 1),
                 id="prefill-mixed-ranks"),
]


def dora_case(M, K, N, L, R, ranks, dtype, adapter_dtype, kind, dora, device="cpu"):
    """(inputs with NaN past each rank, the same zero-padded, magnitudes (L, N), ids): magnitudes are the
    float64 row norms moved by 30% (PEFT starts them at the norms, g = 1), garbage on plain adapters."""
    inputs = make_multi(M, K, N, L, R, dtype, adapter_dtype, ranks, device=device, past_rank=NAN)
    clean = dict(inputs, lora_A=inputs["lora_A"].nan_to_num(0.0), lora_B=inputs["lora_B"].nan_to_num(0.0))
    gen = torch.Generator().manual_seed(3)
    n64 = exact_norms(clean)
    m = n64 * (1 + 0.3 * torch.randn(L, N, generator=gen, dtype=torch.float64))
    m[[not d for d in dora]] = 7.0
    lead = M if isinstance(M, tuple) else (M,)
    ids = ids_for(kind, int(torch.tensor(lead).prod()), L, device).reshape(lead)
    return inputs, clean, m.to(adapter_dtype), ids


def exact_norms(inputs, absolute=False):
    """‖W + s_l·B_l·A_l‖_row per adapter in float64 through the reference (which forms W + s·B·A); with
    `absolute`, of |W| + |s|·|B|·|A|."""
    f = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())
    W, A, B, s = (f(inputs[k]) for k in ("weight", "lora_A", "lora_B", "scalings"))
    return torch.stack([reference.dora_weight_norm(W, A[i], B[i], float(s[i])) for i in range(A.shape[0])])


def norm_extra(inputs, R):
    """Roundings the scale g = m / n adds to a result's path: the norm's K + 2R + 6, weighted by its
    condition κ = max ‖|W| + |s|·|B|·|A|‖² / ‖W + s·B·A‖² (as tests/test_dora.py), the root and the
    division."""
    kappa = float((exact_norms(inputs, absolute=True) / exact_norms(inputs)).square().max())
    return int((inputs["weight"].shape[1] + 2 * R + 6) * kappa) + 3


def check(y, inputs, clean, m, ids, dora, g, torch_ops=False):
    """y by the componentwise rule: `low` in the tested dtypes with the computed scale g, `exact` in
    float64 with the exact one, `magnitude` on |inputs| with |exact scale|."""
    K, N, R = inputs["weight"].shape[1], inputs["weight"].shape[0], inputs["lora_A"].shape[1]
    g64 = torch.where(torch.tensor(dora, dtype=torch.bool)[:, None], m.double() / exact_norms(clean), 1.0)
    args = dict(inputs, adapter_ids=ids)
    y_low = run(reference.multi_lora_linear, dict(args, col_scale=g), None, [], "low")[0]
    y64 = run(reference.multi_lora_linear, dict(args, col_scale=g64), None, [], "exact")[0]
    y_mag = run(reference.multi_lora_linear, dict(args, col_scale=g64), None, [], "magnitude")[0]
    M = y.numel() // N
    n = chain_lengths(M, K, N, R)["y"] + 1 + norm_extra(clean, R)
    assert_oracle("y", y, y_low, y64, y_mag, n, inputs["x"].dtype, torch_ops)


def serve(inputs, ids, g):
    with torch.no_grad():
        return fusedlora.multi_lora_linear(*(inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B",
                                                                 "scalings")), ids, inputs["ranks"], col_scale=g)


@pytest.mark.parametrize("M,K,N,L,R,ranks,dtype,adapter_dtype,kind,dora", CASES)
def test_matches_reference(M, K, N, L, R, ranks, dtype, adapter_dtype, kind, dora, plan, device):
    """Every plan's kernels, with the scales computed on the kernel path (W·Aᵀ by the shrink kernel)."""
    inputs, clean, m, ids = dora_case(M, K, N, L, R, ranks, dtype, adapter_dtype, kind, dora, device)
    g = dora_col_scale(clean["weight"], clean["lora_A"], clean["lora_B"], clean["scalings"], m, dora)
    check(serve(inputs, ids, g), inputs, clean, m, ids, dora, g)


@pytest.mark.parametrize("M,K,N,L,R,ranks,dtype,adapter_dtype,kind,dora", CASES)
def test_torch_backend_matches_reference(M, K, N, L, R, ranks, dtype, adapter_dtype, kind, dora, monkeypatch,
                                         device):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    inputs, clean, m, ids = dora_case(M, K, N, L, R, ranks, dtype, adapter_dtype, kind, dora, device)
    g = dora_col_scale(clean["weight"], clean["lora_A"], clean["lora_B"], clean["scalings"], m, dora)
    check(serve(inputs, ids, g), inputs, clean, m, ids, dora, g, torch_ops=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_stacked_norms_match_float64(backend, dtype, monkeypatch):
    """The row norms of every adapter at once (a bf16 W read in place by the shrink kernel, or in fp32
    blocks by the PyTorch path), each row within γ of the norm's own path (the n² error over 2n)."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    monkeypatch.setattr("fusedlora.plans.multi_dora.BLOCK_ELEMENTS", 700)  # several row blocks: 10 rows of K=70
    inputs = make_multi(5, 70, 45, 4, 8, dtype, f32, [3, 5, 8, 1])
    got = stacked_weight_norms(inputs["weight"], inputs["lora_A"], inputs["lora_B"], inputs["scalings"])
    exact, mag = exact_norms(inputs), exact_norms(inputs, absolute=True)
    u = 2.0 ** -24
    n = 70 + 2 * 8 + 6
    bound = (n * u / (1 - n * u)) * mag.square() / (2 * exact) + u * exact
    err = (got.double() - exact).abs()
    assert got.dtype == f32 and got.shape == (4, 45)
    bad = ~(err <= bound)
    assert not bad.any(), (f"{int(bad.sum())} norms exceed the bound; first at {tuple(bad.nonzero()[0].tolist())}: "
                           f"error {err[bad][0].item():.3e} > {bound[bad][0].item():.3e}")


def test_no_tensor_of_weight_size(plan):
    """The scales (one pass over W through the shrink kernel) and a mixed DoRA batch through each plan
    create no tensor of N·K elements or more (M < N, K so that activations stay below it)."""
    M, K, N = 12, 70, 45
    inputs = make_multi(M, K, N, 4, 8, f32, ranks=[3, 5, 8, 5])
    m = torch.rand(4, N) + 0.5
    ids = ids_for("unsorted", M, 4, "cpu")
    with Sizes() as rec:
        g = dora_col_scale(inputs["weight"], inputs["lora_A"], inputs["lora_B"], inputs["scalings"], m,
                           [True, False, True, True])
        serve(inputs, ids, g)
    big = [(numel, op) for numel, op in rec.sizes if numel >= N * K]
    assert rec.sizes and not big, big


def test_gradients_take_the_pytorch_backend(device):
    """A call that needs a gradient is served by the PyTorch backend (the kernels serve DoRA batches
    without one): x, lora_A, lora_B and col_scale itself get theirs, by the componentwise rule."""
    inputs = make_multi(29, 48, 40, 3, 8, f32, ranks=[8, 3, 5], device=device)
    inputs["col_scale"] = torch.rand(3, 40, generator=torch.Generator().manual_seed(2)).to(device) + 0.5
    ids = ids_for("unsorted", 29, 3, device)
    grad = ("x", "lora_A", "lora_B", "col_scale")
    leaves = {k: (t.detach().clone().requires_grad_() if k in grad else t) for k, t in inputs.items()}
    y = fusedlora.multi_lora_linear(*(leaves[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "scalings")),
                                    ids, leaves["ranks"], col_scale=leaves["col_scale"])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
    y.backward(dy)
    args = dict(inputs, adapter_ids=ids)
    (y_low, g_low), (y64, g64), (y_mag, g_mag) = (run(reference.multi_lora_linear, args, dy, list(grad), mode)
                                                  for mode in ("low", "exact", "magnitude"))
    lengths = {k: v + 1 for k, v in chain_lengths(29, 48, 40, 8).items()}
    lengths["col_scale"] = lengths["y"] + 29 + 1
    assert_oracle("y", y.detach(), y_low, y64, y_mag, lengths["y"], f32, torch_ops=True)
    for k in grad:
        assert_oracle(f"d{k}", leaves[k].grad, g_low[k], g64[k], g_mag[k], lengths[k], f32, torch_ops=True)


def test_bad_col_scale_is_refused_before_any_kernel():
    inputs = make_multi(6, 32, 24, 3, 8, f32)
    ids = torch.tensor([0, 1, 2, -1, 0, 1])
    call = [inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "scalings")] + [ids]
    cases = [(torch.ones(3, 24, dtype=bf16), TypeError, "must be float32"),
             (torch.ones(24, 3), ValueError, r"must be \(L, N\) = \(3, 24\)"),
             (torch.ones(3, 24, device="meta"), ValueError, "not on the weight's device"),
             (torch.ones(3, 24).numpy(), TypeError, "col_scale must be a torch.Tensor")]
    for col_scale, error, words in cases:
        with pytest.raises(error, match=words):
            fusedlora.multi_lora_linear(*call, col_scale=col_scale)


def test_bound_decode_launcher_takes_the_scale(device):
    """kernels/multi_decode.decode_launcher, the per-shape binding an eager cache calls, bound with a
    col_scale: bit for bit the decode plan's result, for the tensors of another call of the same key."""
    from fusedlora.kernels.multi_decode import decode_launcher
    M, K, N = 12, 70, 45
    first = make_multi(M, K, N, 4, 8, f32, ranks=[3, 5, 8, 5], device=device)
    second = make_multi(M, K, N, 4, 8, f32, ranks=[8, 2, 5, 1], seed=1, device=device)
    ids, g = ids_for("unsorted", M, 4, device), torch.rand(4, N, device=device) + 0.5
    run = decode_launcher(*(first[k] for k in ("x", "weight", "lora_A", "lora_B", "scalings")), ids, first["ranks"],
                          first["bias"], torch.empty(M, N, device=device), col_scale=g)
    out = torch.empty(M, N, device=device)
    g2 = torch.rand(4, N, device=device) + 0.5
    run(*(second[k] for k in ("x", "weight", "lora_A", "lora_B", "scalings")), ids, second["ranks"], second["bias"],
        out, col_scale=g2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FUSEDLORA_PLAN", "decode")
        want = serve(second, ids, g2)
    assert torch.equal(out, want)
