"""multi_lora_linear through the kernels against the float64 reference, gradients included, under
each execution plan (the `plan` fixture: fused, split over grouped tokens at any M, decode up to
MULTI_DECODE_MAX_M rows)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from oracle import assert_oracle, chain_lengths, check_multi_lora_linear

import fusedlora
import fusedlora.core.adapter_batch
import fusedlora.plans.multi
from fusedlora import AdapterBatch
from fusedlora.plans import planner
from fusedlora.core import reference
from fusedlora.core.adapter_batch import group_by_adapter

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16


def make_multi(M, K, N, L, R, dtype, adapter_dtype=None, ranks=None, seed=0, device="cpu", past_rank=0.0):
    """Stacked adapters, `past_rank` (zero, or garbage such as NaN) past each rank; inputs scaled to
    order one."""
    gen = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    lead = M if isinstance(M, tuple) else (M,)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dt).to(device)

    A = rnd(L, R, K, scale=K ** -0.5, dt=adapter_dtype)
    B = rnd(L, N, R, scale=R ** -0.5, dt=adapter_dtype)
    if ranks is not None:
        for i, r in enumerate(ranks):
            A[i, r:] = past_rank
            B[i, :, r:] = past_rank
        ranks = torch.tensor(ranks, dtype=torch.int32, device=device)
    return dict(x=rnd(*lead, K), weight=rnd(N, K, scale=K ** -0.5), bias=rnd(N), lora_A=A, lora_B=B,
                scalings=(torch.rand(L, generator=gen, dtype=torch.float64) * 2 + 0.5).float().to(device),
                ranks=ranks)


GRAD = ("x", "lora_A", "lora_B")


def run(inputs, ids, dy, grad=GRAD):
    """y and the gradients named in `grad` of multi_lora_linear on `inputs`."""
    leaves = {n: (t.detach().clone().requires_grad_() if n in grad else t) for n, t in inputs.items()}
    y = fusedlora.multi_lora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"],
                                    leaves["lora_B"], leaves["scalings"], ids, leaves["ranks"])
    y.backward(dy)
    return y.detach(), {n: leaves[n].grad for n in grad}


def check(inputs, ids, dtype, grad=GRAD, torch_ops=False):
    x = inputs["x"]
    dy = torch.randn(*x.shape[:-1], inputs["weight"].shape[0], generator=torch.Generator().manual_seed(1),
                     dtype=torch.float64).to(dtype).to(x.device)
    y, grads = run(inputs, ids, dy, grad=grad)
    check_multi_lora_linear(y, grads, inputs, ids, dy, torch_ops)


def ids_for(kind, M, L, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "unsorted":
        ids = torch.randint(-1, L, (M,), generator=gen)
    elif kind == "each-own":      # decode: every token a different adapter, in scrambled order
        ids = torch.randperm(M, generator=gen) % L
    elif kind == "one":           # prefill: all tokens one adapter
        ids = torch.full((M,), L - 1)
    elif kind == "runs":          # prefill: long runs, base rows between
        ids = torch.arange(M) * (L + 1) // M - 1
    return ids.to(device)


NAN = float("nan")
CASES = [
    # (M, K, N, L, R, ranks, dtype, adapter dtype, ids); NaN past each rank where ranks are given
    pytest.param(37, 70, 45, 4, 16, None, f32, f32, "unsorted", id="unsorted-f32"),
    pytest.param(24, 64, 40, 24, 8, None, f32, f32, "each-own", id="decode-each-own"),
    pytest.param(40, 48, 36, 3, 16, None, f16, f16, "one", id="one-adapter-f16"),
    pytest.param(50, 64, 48, 3, 16, [4, 8, 16], bf16, bf16, "runs", id="mixed-ranks-runs-bf16"),
    pytest.param(33, 40, 24, 5, 32, [1, 32, 3, 17, 8], bf16, f32, "unsorted", id="mixed-ranks-fp32-adapters"),
    pytest.param((3, 11), 70, 45, 4, 8, None, f16, f32, "unsorted", id="3d-input"),
    pytest.param(90, 40, 36, 6, 16, [16, 5, 0, 9, 1, 12], f32, f32, "unsorted", id="prefill-mixed-ranks"),
]


def case_inputs(M, K, N, L, R, ranks, dtype, adapter_dtype, kind, device):
    inputs = make_multi(M, K, N, L, R, dtype, adapter_dtype, ranks, device=device, past_rank=NAN)
    lead = M if isinstance(M, tuple) else (M,)
    return inputs, ids_for(kind, int(torch.tensor(lead).prod()), L, device).reshape(lead)


@pytest.mark.parametrize("M,K,N,L,R,ranks,dtype,adapter_dtype,kind", CASES)
def test_matches_reference(M, K, N, L, R, ranks, dtype, adapter_dtype, kind, plan, device):
    """Every path of the kernels against the float64 reference: output and gradients."""
    inputs, ids = case_inputs(M, K, N, L, R, ranks, dtype, adapter_dtype, kind, device)
    check(inputs, ids, dtype)


@pytest.mark.parametrize("M,K,N,L,R,ranks,dtype,adapter_dtype,kind", CASES)
def test_torch_backend_matches_reference(M, K, N, L, R, ranks, dtype, adapter_dtype, kind, monkeypatch, device):
    """The torch backend's gather-free formulation against the float64 reference."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    inputs, ids = case_inputs(M, K, N, L, R, ranks, dtype, adapter_dtype, kind, device)
    check(inputs, ids, dtype, torch_ops=True)


def test_base_weight_and_bias_gradients(plan, device):
    """A trainable base layer under a multi-adapter batch: dW and db join dx, dA and dB."""
    inputs = make_multi(29, 48, 40, 3, 8, f32, ranks=[8, 3, 5], device=device)
    check(inputs, ids_for("unsorted", 29, 3, device), f32, grad=("x", "weight", "bias", "lora_A", "lora_B"))


def test_ranks_mean_work_past_the_rank_is_skipped(plan, device):
    """With ranks given, entries past an adapter's rank are never read: garbage there changes nothing,
    and their gradients are zero."""
    clean = make_multi(30, 48, 40, 3, 16, f32, ranks=[2, 16, 5], device=device)
    dirty = dict(clean, lora_A=clean["lora_A"].clone(), lora_B=clean["lora_B"].clone())
    dirty["lora_A"][0, 2:] = 7.0
    dirty["lora_B"][2, :, 5:] = -3.0
    ids = ids_for("unsorted", 30, 3, device)
    dy = torch.randn(30, 40, device=device)
    y_clean, _ = run(clean, ids, dy)
    y_dirty, grads = run(dirty, ids, dy)
    torch.testing.assert_close(y_dirty, y_clean, rtol=0, atol=0)
    assert grads["lora_A"][0, 2:].abs().max() == 0 and grads["lora_B"][2, :, 5:].abs().max() == 0
    assert grads["lora_A"][1].abs().max() > 0


def test_base_only_rows_equal_the_base_layer(plan, device):
    inputs = make_multi(20, 32, 24, 2, 8, f32, device=device)
    ids = torch.tensor([-1, 0, 1, -1] * 5, device=device)
    y = fusedlora.multi_lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"],
                                    inputs["lora_B"], inputs["scalings"], ids)
    x, W, b = inputs["x"], inputs["weight"], inputs["bias"]
    base = torch.nn.functional.linear(x, W, b)
    exact = torch.nn.functional.linear(x.double(), W.double(), b.double())
    magnitude = torch.nn.functional.linear(x.double().abs(), W.double().abs(), b.double().abs())
    rows = ids == -1
    n = chain_lengths(20, 32, 24, 8)["y"]
    assert_oracle("base rows", y[rows], base[rows], exact[rows], magnitude[rows], n, f32)
    assert (y[ids >= 0] - base[ids >= 0]).abs().max() > 1e-2


def test_single_adapter_equals_lora_linear(device):
    """One adapter for every row is lora_linear with that adapter."""
    inputs = make_multi(26, 48, 32, 3, 8, f32, device=device)
    ids = torch.full((26,), 1, device=device)
    y = fusedlora.multi_lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"],
                                    inputs["lora_B"], inputs["scalings"], ids)
    single = fusedlora.lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"][1],
                                   inputs["lora_B"][1], float(inputs["scalings"][1]))
    torch.testing.assert_close(y, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M", [12, 70])
def test_invalid_ids_give_nan_rows_in_the_kernels(M, plan, device):
    """What a GPU caller gets without FUSEDLORA_DEBUG (the plans run on ids nobody checked): the bad
    rows poisoned, the others right."""
    inputs = make_multi(M, 32, 16, 2, 8, f32, device=device)
    ids = torch.tensor([0, 1, -1, 5, 0, -3, 1, 1, 2, 0, -1, 1] * (M // 12 + 1), device=device)[:M]
    chosen = planner.choose_multi("forward", M, 32, 16, 8, 2)
    groups = None if chosen == "decode" else group_by_adapter(ids, 2)
    y = torch.empty(M, 16, device=device)
    fusedlora.plans.multi.forward(chosen, inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"],
                                  inputs["lora_B"], inputs["scalings"], inputs["ranks"], ids, groups, False, y)
    bad = (ids < -1) | (ids >= 2)
    assert torch.isnan(y[bad]).all() and not torch.isnan(y[~bad]).any()
    ref = reference.multi_lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"],
                                      inputs["lora_B"], inputs["scalings"], ids.clamp(-1, 1))
    torch.testing.assert_close(y[~bad], ref[~bad], rtol=1e-5, atol=1e-5)


def test_invalid_ids_give_nan_rows_in_the_torch_path(device):
    """The torch backend's answer to unchecked ids (under torch.compile, or on CUDA) is the kernels'."""
    from fusedlora.core import torch_backend
    inputs = make_multi(6, 32, 16, 2, 8, f32, device=device)
    ids = torch.tensor([0, 2, -1, 1, -2, 0], device=device)
    ranks = torch.full((2,), 8, device=device)
    args = [inputs[n] for n in ("x", "weight", "bias", "lora_A", "lora_B", "scalings")]
    y = torch_backend.multi_lora_linear(*args, ids, ranks)
    bad = torch.tensor([False, True, False, False, True, False], device=device)
    assert torch.isnan(y[bad]).all() and not torch.isnan(y[~bad]).any()
    torch.testing.assert_close(y[~bad], reference.multi_lora_linear(*args, ids.clamp(-1, 1))[~bad],
                               rtol=1e-5, atol=1e-5)


def test_torch_backend_equals_kernels(monkeypatch, device):
    inputs = make_multi(30, 40, 24, 3, 8, f32, ranks=[8, 2, 5], device=device)
    ids = ids_for("unsorted", 30, 3, device)
    args = [inputs[n] for n in ("x", "weight", "bias", "lora_A", "lora_B", "scalings")]
    y = fusedlora.multi_lora_linear(*args, ids, inputs["ranks"])
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    torch.testing.assert_close(fusedlora.multi_lora_linear(*args, ids, inputs["ranks"]), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_an_adapter_no_token_uses_is_never_read(backend, plan, monkeypatch, device):
    """A slot full of NaN (say, a pool slot not loaded yet) leaves the rows of other adapters alone."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    inputs = make_multi(20, 32, 24, 3, 8, f32, device=device)
    args = [inputs[n] for n in ("x", "weight", "bias", "lora_A", "lora_B", "scalings")]
    ids = ids_for("unsorted", 20, 2, device)
    clean = fusedlora.multi_lora_linear(*args, ids)
    args[3], args[4] = args[3].clone(), args[4].clone()
    args[3][2], args[4][2] = float("nan"), float("nan")
    torch.testing.assert_close(fusedlora.multi_lora_linear(*args, ids), clean, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend, plan, monkeypatch, device):
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    inputs = make_multi(0, 32, 16, 2, 8, f32, device=device)
    x = inputs["x"].requires_grad_()
    y = fusedlora.multi_lora_linear(x, inputs["weight"], None, inputs["lora_A"], inputs["lora_B"],
                                    inputs["scalings"], torch.zeros(0, dtype=torch.long, device=device))
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 32)


@pytest.mark.parametrize("M,K,N", [(16, 32, 0), (16, 0, 24), (1, 32, 0), ((2, 4), 32, 0), ((2, 4), 0, 24)])
def test_empty_features(M, K, N, plan, device):
    """No output feature (N = 0) or no input feature (K = 0: y is the bias), one row (the decode kernels'
    bound launches) and 3-D x, every gradient, mixed ranks: against float64. Viewing an empty tensor's
    rows as (-1, 0) is ambiguous, and the decode backward's launches cannot reduce over N = 0: these
    calls used to raise."""
    inputs = make_multi(M, max(K, 1), N, 3, 4, f32, ranks=[4, 2, 3], device=device)
    inputs.update({n: inputs[n][..., :K].contiguous() for n in ("x", "weight", "lora_A")})  # scaled by K ** -0.5
    lead = M if isinstance(M, tuple) else (M,)
    ids = torch.randint(-1, 3, lead, generator=torch.Generator().manual_seed(2)).to(device)
    check(inputs, ids, f32, grad=GRAD + ("weight", "bias"))


@pytest.mark.parametrize("M", [20, 80])
def test_backward_may_take_another_path(M, monkeypatch, device):
    """S and dU are in token order on every path, so a forward under one and a backward under another
    give the gradients of either alone."""
    inputs = make_multi(M, 40, 24, 4, 16, f32, ranks=[16, 3, 0, 9], device=device, past_rank=NAN)
    ids = ids_for("unsorted", M, 4, device)
    grads = {}
    pairs = (("fused", "split"), ("split", "fused"), ("decode", "fused"), ("fused", "decode"))
    for fwd, bwd in pairs + (("fused", "fused"),):
        leaves = {n: inputs[n].detach().clone().requires_grad_() for n in GRAD}
        monkeypatch.setenv("FUSEDLORA_PLAN", fwd)
        y = fusedlora.multi_lora_linear(leaves["x"], inputs["weight"], inputs["bias"], leaves["lora_A"],
                                        leaves["lora_B"], inputs["scalings"], ids, inputs["ranks"])
        monkeypatch.setenv("FUSEDLORA_PLAN", bwd)
        y.sum().backward()
        grads[fwd, bwd] = [leaves[n].grad for n in GRAD]
    for pair in pairs:
        for a, b in zip(grads[pair], grads["fused", "fused"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


BAD = [
    (lambda a: a.update(ids=a["ids"].float()), TypeError, ["adapter_ids", "integer"]),
    (lambda a: a.update(ids=a["ids"][:5]), TypeError, ["adapter_ids", "(5,)", "(8,)"]),
    (lambda a: a.update(ids=a["ids"] + 3), ValueError, ["adapter_ids", "outside [-1, L) = [-1, 3)"]),
    (lambda a: a.update(ids=a["ids"] - 5), ValueError, ["adapter_ids", "outside"]),
    (lambda a: a.update(lora_A=a["lora_A"][0]), ValueError, ["lora_A", "(L, R, K)"]),
    (lambda a: a.update(lora_B=a["lora_B"][:2]), ValueError, ["lora_B", "(2, 12, 4)", "(3, N, 4)"]),
    (lambda a: a.update(scalings=a["scalings"][:2]), ValueError, ["scalings", "(3,)"]),
    (lambda a: a.update(ranks=torch.tensor([1, 2, 9])), ValueError, ["ranks", "[0, R] = [0, 4]"]),
    (lambda a: a.update(ranks=torch.tensor([1.0, 2.0, 3.0])), TypeError, ["ranks", "integer"]),
    (lambda a: a.update(weight=a["weight"][:, :7]), ValueError, ["weight", "(12, 7)"]),
]


@pytest.mark.parametrize("change,error,words", BAD)
def test_bad_input_is_named(change, error, words):
    inputs = make_multi(8, 16, 12, 3, 4, f32)
    args = dict(inputs, ids=torch.tensor([0, 1, 2, -1, 0, 1, 2, 0]), ranks=None)
    change(args)
    with pytest.raises(error) as info:
        fusedlora.multi_lora_linear(args["x"], args["weight"], args["bias"], args["lora_A"], args["lora_B"],
                                    args["scalings"], args["ids"], args["ranks"])
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


def test_bad_adapter_batch_is_named(device):
    inputs = make_multi(8, 16, 12, 3, 4, f32, device=device)
    args = [inputs[n] for n in ("x", "weight", "bias", "lora_A", "lora_B", "scalings")]
    ids = torch.tensor([0, 1, 2, -1, 0, 1, 2, 0], device=device)
    with pytest.raises(ValueError, match=r"built for 4 adapters, but lora_A \(shape \(3, 4, 16\)"):
        fusedlora.multi_lora_linear(*args, AdapterBatch(ids, 4))
    with pytest.raises(TypeError, match=r"adapter_ids \(shape \(4,\).*x.shape\[:-1\] = \(8,\)"):
        fusedlora.multi_lora_linear(*args, AdapterBatch(ids[:4], 3))
    with pytest.raises(ValueError, match=r"holds 3, outside \[-1, L\) = \[-1, 3\)"):
        AdapterBatch(ids + 1, 3)
    with pytest.raises(TypeError, match="integer"):
        AdapterBatch(ids.float(), 3)


@pytest.fixture
def counted(monkeypatch):
    """Counts Triton launches by kernel name and groupings (sorts) made."""
    from fusedlora.kernels.multi_decode import _decode_shrink_kernel
    kind = type(_decode_shrink_kernel)  # JITFunction, or the interpreter's stand-in
    seen = {"group": 0}
    real_run, real_group = kind.run, fusedlora.core.adapter_batch.group_by_adapter

    def run(self, *args, **kwargs):
        seen[self.fn.__name__] = seen.get(self.fn.__name__, 0) + 1
        return real_run(self, *args, **kwargs)

    def group(*args):
        seen["group"] += 1
        return real_group(*args)

    monkeypatch.setattr(kind, "run", run)
    monkeypatch.setattr(fusedlora.core.adapter_batch, "group_by_adapter", group)
    return seen


class _LibraryOps(TorchDispatchMode):
    """The aten ops a call dispatches, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("M", [16, 64])
@pytest.mark.parametrize("batched", [False, True], ids=["ids", "batch"])
def test_decode_step_is_two_kernels_and_no_sort(M, batched, counted, monkeypatch, device):
    """Without a gradient, a decode-sized call is the shrink and the decode GEMM (which adds x·Wᵀ
    itself): no sort, no other launch, no library product; twice, so that the second call of an
    AdapterBatch comes from the per-shape cache."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    inputs = make_multi(M, 32, 24, 3, 8, f32, ranks=[8, 2, 5], device=device)
    ids = ids_for("unsorted", M, 3, device)
    ids = AdapterBatch(ids, 3) if batched else ids
    for _ in range(2):
        with torch.no_grad(), _LibraryOps() as ops:
            fusedlora.multi_lora_linear(*(inputs[n] for n in ("x", "weight", "bias", "lora_A", "lora_B",
                                                              "scalings")), ids, inputs["ranks"])
        assert not {"mm", "addmm", "addmm_", "matmul", "bmm"} & {name.split(".")[0] for name in ops.names}
    assert counted == {"group": 0, "_decode_shrink_kernel": 2, "_decode_gemm_kernel": 2}


def test_a_batch_is_grouped_once_for_every_layer(counted, monkeypatch, device):
    """Above the decode size, layers sharing an AdapterBatch share one grouping, forward and backward;
    bare ids group once per call. Both give the same output bitwise."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    first = make_multi(80, 32, 32, 3, 8, f32, ranks=[8, 2, 5], device=device)
    second = make_multi(80, 32, 24, 3, 8, f32, ranks=[1, 8, 4], seed=1, device=device)
    ids = ids_for("unsorted", 80, 3, device)

    def model(adapter_ids, x):
        h = fusedlora.multi_lora_linear(x, *(first[n] for n in ("weight", "bias", "lora_A", "lora_B", "scalings")),
                                        adapter_ids, first["ranks"])
        return fusedlora.multi_lora_linear(h, *(second[n] for n in ("weight", "bias", "lora_A", "lora_B",
                                                                    "scalings")), adapter_ids, second["ranks"])

    x = first["x"].requires_grad_()
    y = model(AdapterBatch(ids, 3), x)
    y.sum().backward()
    assert counted["group"] == 1
    with torch.no_grad():
        assert torch.equal(model(ids, x), y)
    assert counted["group"] == 3


def test_output_can_be_modified_in_place(plan, device):
    """The output is not a view (a Function's view output forbids in-place ops): a model may scale it
    in place, 3-D input included, and the gradients follow."""
    inputs = make_multi((3, 11), 40, 24, 3, 8, f32, ranks=[8, 2, 5], device=device)
    ids = ids_for("unsorted", 33, 3, device).reshape(3, 11)
    grads = []
    for inplace in (True, False):
        x = inputs["x"].detach().clone().requires_grad_()
        y = fusedlora.multi_lora_linear(x, *(inputs[n] for n in ("weight", "bias", "lora_A", "lora_B", "scalings")),
                                        ids, inputs["ranks"])
        y = y.mul_(2.0) if inplace else y * 2.0
        y.sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
