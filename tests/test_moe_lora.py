"""moe_lora_linear (one projection of an MoE layer with LoRA on its experts) against the float64 reference
pair by pair, output and every gradient by the componentwise rule (tests/oracle.py); the routings that
stress a grouping (experts without tokens, every token on one expert, top-k = 1 and top-k = E); no
E·N·K tensor in forward or backward; torch.compile; bad input named before anything runs.

The Triton backend has no MoE op yet: its cases are strict xfails, to flip when the op is wired."""
import pytest
import torch
from moe_models import LargestTensors
from oracle import BITWISE, _check, chain_lengths

import fusedlora
from fusedlora import ExpertRouting
from fusedlora.core import reference

f32, bf16 = torch.float32, torch.bfloat16
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", request.param)
    return request.param


def routing_for(kind, T, k, E, seed=0):
    """(T, k) expert ids: distinct experts per token (as top-k picks them), or a routing that stresses
    the grouping."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    if kind == "some-experts-idle":   # only the even experts receive tokens
        return torch.stack([torch.randperm(E // 2, generator=gen)[:k] * 2 for _ in range(T)])
    if kind == "one-expert":          # every token on expert E - 2
        return torch.full((T, k), E - 2)
    if kind == "all-experts":         # top-k = E: every token on every expert
        return torch.stack([torch.randperm(E, generator=gen) for _ in range(T)])
    raise ValueError(kind)


def make(T, k, E, K, N, L, R, dtype, adapter_dtype, kind="random", ranks=None, adapters=False, bias=True, seed=0,
         layout="plain"):
    """Inputs of one projection in routing order (x (T, K) and, for gather=False, xp (P, K)); layout
    "peft": lora_A and lora_B as the strided views of PEFT's ParamWrapper weights, weight the transposed
    view of an (E, K, N) parameter (gpt-oss)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dt)

    top = routing_for(kind, T, k, E, seed)
    ids = torch.randint(-1, L, (T,), generator=gen) if adapters else None
    A, B = rnd(L, E, R, K, scale=K ** -0.5, dt=adapter_dtype), rnd(L, E, N, R, scale=R ** -0.5, dt=adapter_dtype)
    W = rnd(E, N, K, scale=K ** -0.5)
    if layout == "peft":
        assert L == 1
        W = W.transpose(1, 2).contiguous().transpose(1, 2)              # an (E, K, N) parameter, viewed
        A = A.reshape(E * R, K).view(1, E, R, K)                        # lora_A.weight (E·R, K)
        B = B[0].permute(1, 2, 0).contiguous().view(N, R * E).view(N, R, E).permute(2, 0, 1).unsqueeze(0)
    if ranks is not None:
        ranks = torch.tensor(ranks, dtype=torch.int32)
        past = torch.arange(R) >= ranks[:, None]
        A.transpose(1, 2)[past] = float("nan")                          # never read
        B.permute(0, 3, 1, 2)[past] = float("nan")
    return dict(x=rnd(T, K), xp=rnd(T * k, K), top_k_index=top, weight=W, bias=rnd(E, N) if bias else None,
                lora_A=A, lora_B=B, adapter_ids=ids, ranks=ranks,
                scaling=(torch.rand(L, generator=gen, dtype=torch.float64) * 2 + 0.5).float() if adapters else 1.5)


def ours(routing, gather):
    """moe_lora_linear with x and the result in routing order, so that it takes the reference's arguments."""
    def fn(x, top_k_index, weight, bias, lora_A, lora_B, scaling, keep_mask=None, dropout_p=0.0, adapter_ids=None,
           ranks=None, gather=gather, seed=None):
        xin = x if gather else x.index_select(0, routing.order)
        y = fusedlora.moe_lora_linear(xin, routing, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                                      gather=gather, ranks=ranks)
        return y.index_select(0, routing.inverse)
    return fn


def check(inputs, gather, grads=("x", "bias", "lora_A", "lora_B"), p=0.0, seed=None):
    """Output and gradients against the float64 reference, componentwise (every gradient its own tensor)."""
    x = inputs["x"] if gather else inputs["xp"]
    top, L = inputs["top_k_index"], inputs["lora_A"].shape[0]
    routing = ExpertRouting(top, inputs["weight"].shape[0], inputs["adapter_ids"], L)
    args = {n: inputs[n] for n in ("top_k_index", "weight", "bias", "lora_A", "lora_B", "scaling", "adapter_ids",
                                   "ranks")}
    args.update(x=x, gather=gather, dropout_p=p)
    if p > 0:
        args["keep_mask"] = fusedlora.dropout_mask(seed, (routing.P, x.shape[1]), p)
    grads = [g for g in grads if args.get(g) is not None]
    leaves = {n: (v.detach().clone().requires_grad_(n in grads) if isinstance(v, torch.Tensor)
                  and v.is_floating_point() else v) for n, v in args.items()}
    fn = ours(routing, gather)
    y = fn(**{n: v for n, v in leaves.items() if n != "keep_mask"}, seed=seed)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    y.backward(dy)
    got = {n: leaves[n].grad for n in grads}
    E, N, K = inputs["weight"].shape
    R = inputs["lora_A"].shape[2]
    _check(reference.moe_lora_linear, args, y.detach(), got, dy, chain_lengths(routing.P, K, N, R), torch_ops=True)


CASES = [
    # (T, k, E, K, N, L, R, dtype, adapter dtype, routing, extra)
    pytest.param(7, 2, 4, 16, 24, 1, 4, f32, f32, "random", {}, id="f32"),
    pytest.param(9, 2, 8, 32, 16, 1, 3, bf16, f32, "random", {}, id="bf16-fp32-adapters"),
    pytest.param(6, 2, 8, 16, 16, 1, 4, f32, f32, "some-experts-idle", {}, id="idle-experts"),
    pytest.param(5, 1, 4, 16, 8, 1, 4, f32, f32, "one-expert", {}, id="one-expert-top1"),
    pytest.param(4, 4, 4, 16, 16, 1, 2, f32, f32, "all-experts", {}, id="top-k-equals-E"),
    pytest.param(7, 2, 4, 12, 10, 1, 3, f32, f32, "random", {}, id="unaligned-K-N"),
    pytest.param(6, 2, 4, 16, 24, 1, 4, f32, f32, "random", {"layout": "peft", "bias": False}, id="peft-layout"),
    pytest.param(11, 2, 4, 16, 16, 3, 8, f32, f32, "random", {"adapters": True, "ranks": [8, 3, 1]},
                 id="mixed-adapters-ranks"),
    pytest.param(8, 3, 6, 16, 8, 2, 4, bf16, bf16, "random", {"adapters": True}, id="mixed-adapters-bf16"),
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "sorted-rows"])
@pytest.mark.parametrize("T, k, E, K, N, L, R, dtype, adapter_dtype, kind, extra", CASES)
def test_against_float64(backend, gather, T, k, E, K, N, L, R, dtype, adapter_dtype, kind, extra):
    check(make(T, k, E, K, N, L, R, dtype, adapter_dtype, kind, **extra), gather)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("grads", [("x", "weight", "bias", "lora_A", "lora_B"), ("lora_A", "lora_B")],
                         ids=["weight-too", "adapters-only"])
def test_which_gradients(backend, grads):
    """The weight is differentiable too (a full fine-tune of the experts beside the adapters); an input that
    needs no gradient (a first layer's) gets none, and the adapters still get theirs."""
    check(make(6, 2, 4, 16, 8, 1, 4, f32, f32), True, grads=grads)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "sorted-rows"])
def test_dropout_mask_is_per_pair(backend, gather):
    """The keep-mask is dropout_mask(seed, (P, K), p) in routing order: the reference gets it as such."""
    check(make(9, 2, 4, 16, 8, 2, 4, f32, f32, adapters=True), gather, p=0.3, seed=1234)


def test_dropout_seed_drawn_from_torch():
    """seed=None draws the seed from torch's generator: torch.manual_seed reproduces the call."""
    inputs = make(5, 2, 4, 16, 8, 1, 4, f32, f32)
    routing = ExpertRouting(inputs["top_k_index"], 4)
    args = (inputs["x"], routing, inputs["weight"], None, inputs["lora_A"], inputs["lora_B"], 2.0, 0.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSEDLORA_BACKEND", "torch")
        torch.manual_seed(3)
        first = fusedlora.moe_lora_linear(*args, gather=True)
        torch.manual_seed(3)
        again = fusedlora.moe_lora_linear(*args, gather=True)
        other = fusedlora.moe_lora_linear(*args, gather=True)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_expanded_gradient(monkeypatch):
    """y.sum().backward() hands backward a gradient with zero strides, which grouped_mm refuses: the same
    gradients as a contiguous one of ones."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    inputs = make(6, 2, 4, 16, 8, 1, 4, f32, f32)
    routing = ExpertRouting(inputs["top_k_index"], 4)
    grads = []
    for reduce in (lambda y: y.sum().backward(), lambda y: y.backward(torch.ones_like(y))):
        x, A = inputs["x"].clone().requires_grad_(), inputs["lora_A"].clone().requires_grad_()
        reduce(fusedlora.moe_lora_linear(x, routing, inputs["weight"], None, A, inputs["lora_B"], 2.0, gather=True))
        grads.append((x.grad, A.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_empty_batch(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    inputs = make(3, 2, 4, 16, 8, 1, 4, f32, f32)
    routing = ExpertRouting(torch.empty(0, 2, dtype=torch.int64), 4)
    x = torch.empty(0, 16, requires_grad=True)
    y = fusedlora.moe_lora_linear(x, routing, inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"],
                                  2.0, gather=True)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16)


@pytest.mark.parametrize("adapters", [False, True], ids=["one-adapter", "mixed-adapters"])
def test_no_expert_sized_tensor(monkeypatch, adapters):
    """Forward and backward (x, lora_A and lora_B trained, the weight frozen, dropout on) make no tensor
    as large as the weight's E·N·K elements; the same count catches a forward that builds W + ΔW."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    T, k, E, K, N, R, L = 6, 2, 16, 32, 48, 4, 2 if adapters else 1
    inputs = make(T, k, E, K, N, L, R, f32, f32, adapters=adapters, layout="plain" if adapters else "peft")
    routing = ExpertRouting(inputs["top_k_index"], E, inputs["adapter_ids"], L)
    x = inputs["x"].requires_grad_()
    A, B = inputs["lora_A"].requires_grad_(), inputs["lora_B"].requires_grad_()
    with LargestTensors() as seen:
        y = fusedlora.moe_lora_linear(x, routing, inputs["weight"], inputs["bias"], A, B, inputs["scaling"], 0.2,
                                      seed=5, gather=True)
        y.backward(torch.randn_like(y))
    assert seen.largest < E * N * K, seen.report()
    assert seen.count > 10  # the mode saw the ops, forward and backward
    with LargestTensors() as seen:  # the mutant: PEFT's way, W + ΔW for every expert
        merged = inputs["weight"] + 2.0 * B[0].detach() @ A[0].detach()
        fusedlora.moe_lora_linear(x, routing, merged, None, None, None, 1.0, gather=True).sum().backward()
    assert seen.largest >= E * N * K


def test_compiles_whole(monkeypatch):
    """torch.compile(fullgraph=True) of a gate_up projection, SiLU, a down projection and the combine,
    forward and backward, fp32 (where grouped_mm has no meta function), two adapters, dropout with a
    tensor seed: the output and gradients of eager (bitwise on CPU)."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    up = make(7, 2, 4, 16, 24, 2, 4, f32, f32, adapters=True)
    down = make(7, 2, 4, 24, 16, 2, 4, f32, f32, adapters=True, seed=1)
    routing = ExpertRouting(up["top_k_index"], 4, up["adapter_ids"], 2)
    weights = torch.rand(7, 2)

    def step(x, A, B, A2, B2):
        h = fusedlora.moe_lora_linear(x, routing, up["weight"], up["bias"], A, B, up["scaling"], 0.25,
                                      torch.tensor(7), gather=True)
        o = fusedlora.moe_lora_linear(torch.nn.functional.silu(h), routing, down["weight"], None, A2, B2,
                                      down["scaling"], gather=False)
        return routing.combine(o, weights)

    runs = []
    torch._dynamo.reset()
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [t.detach().clone().requires_grad_() for t in (up["x"], up["lora_A"], up["lora_B"], down["lora_A"],
                                                                 down["lora_B"])]
        y = fn(*leaves)
        y.backward(torch.ones_like(y))
        runs.append([y.detach()] + [t.grad for t in leaves])
    torch._dynamo.reset()
    for got, want in zip(*runs):
        assert torch.equal(got, want) if BITWISE else torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def _bad(**change):
    """moe_lora_linear's arguments with some replaced; the defaults are valid."""
    inputs = make(5, 2, 4, 16, 8, 2, 4, f32, f32, adapters=True)
    routing = ExpertRouting(inputs["top_k_index"], 4, inputs["adapter_ids"], 2)
    args = dict(x=inputs["x"], routing=routing, weight=inputs["weight"], bias=inputs["bias"],
                lora_A=inputs["lora_A"], lora_B=inputs["lora_B"], scaling=inputs["scaling"], gather=True,
                ranks=torch.tensor([4, 2]))
    args.update(change)
    return args


BAD = [
    (dict(x=torch.randn(6, 16)), ValueError, r"x \(shape \(6, 16\).*one row per token"),
    (dict(x=torch.randn(5, 16), gather=False), ValueError, r"x \(shape \(5, 16\).*\(10, K\)"),
    (dict(weight=torch.randn(3, 8, 16)), ValueError, r"weight \(shape \(3, 8, 16\).*\(E, N, K\) = \(4, N, 16\)"),
    (dict(bias=torch.randn(4, 9)), ValueError, r"bias \(shape \(4, 9\).*\(4, 8\)"),
    (dict(lora_A=torch.randn(2, 4, 4, 15)), ValueError, r"lora_A \(shape \(2, 4, 4, 15\)"),
    (dict(lora_A=torch.randn(3, 4, 4, 16)), ValueError, r"lora_A \(shape \(3, 4, 4, 16\).*\(2, 4, R, 16\)"),
    (dict(lora_B=torch.randn(2, 4, 8, 3)), ValueError, r"lora_B \(shape \(2, 4, 8, 3\).*\(2, 4, 8, 4\)"),
    (dict(lora_B=None), ValueError, "both be tensors, or both None"),
    (dict(weight=torch.randn(4, 8, 16, dtype=torch.bfloat16)), TypeError, r"weight .*bfloat16.*x's dtype"),
    (dict(lora_A=torch.randn(2, 4, 4, 16, dtype=torch.float64)), TypeError, r"lora_A .*float64.*must be float32"),
    (dict(x=torch.randint(0, 3, (5, 16))), TypeError, r"x \(shape \(5, 16\), torch.int64"),
    (dict(scaling=torch.ones(3)), ValueError, r"scaling \(shape \(3,\).*\(L,\) = \(2,\)"),
    (dict(scaling=float("nan")), ValueError, "scaling must be finite"),
    (dict(ranks=torch.tensor([4, 5])), ValueError, r"ranks \(shape \(2,\).*\[0, R\] = \[0, 4\]"),
    (dict(ranks=torch.tensor([4])), TypeError, r"ranks \(shape \(1,\)"),
    (dict(routing=torch.zeros(5, 2)), TypeError, "routing must be a fusedlora.ExpertRouting"),
    (dict(gather=1), TypeError, "gather must be a bool"),
]


@pytest.mark.parametrize("change, error, match", BAD)
def test_bad_input_is_named(monkeypatch, change, error, match):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    args = _bad(**change)
    with pytest.raises(error, match=match):
        fusedlora.moe_lora_linear(args.pop("x"), args.pop("routing"), args.pop("weight"), args.pop("bias"),
                                  args.pop("lora_A"), args.pop("lora_B"), args.pop("scaling"), **args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k_index=torch.tensor([[0, 4]]), num_experts=4), r"top_k_index .*holds expert 4, outside"),
    (dict(top_k_index=torch.tensor([[0, 1]]), num_experts=4, adapter_ids=torch.tensor([2]), num_adapters=2),
     r"adapter_ids .*holds 2, outside \[-1, num_adapters\)"),
])
def test_ids_out_of_range_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertRouting(**kwargs)
