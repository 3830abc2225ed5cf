"""LoRA on MoE experts through the plans (fusedlora/plans/moe.py) against the float64 reference, under each
plan (the `plan` fixture: fused, split, decode): the output and every gradient by the componentwise rule,
and a proof that no tensor of a projection's E·N·K size is made."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from oracle import check_moe_lora_linear

import fusedlora.kernels.moe_lora
import fusedlora.kernels.moe_reduce
import fusedlora.plans.moe as moe
from fusedlora.core.dropout import dropout_mask
from fusedlora.core.moe_routing import ExpertRouting
from fusedlora.plans import planner

f32, bf16 = torch.float32, torch.bfloat16
NAMES = ("x", "weight", "bias", "lora_A", "lora_B")
LORA = ("x", "lora_A", "lora_B")
NAN = float("nan")


def make_moe(T, k, E, K, N, R, dtype, adapter_dtype=None, L=1, ranks=None, mixed=False, bias=True,
             transposed=False, peft=False, experts=None, gather=True, device="cpu", seed=0):
    """Inputs of one projection, scaled to order-one outputs. experts: the experts each token may be
    routed to (default all); ranks: per adapter, NaN stored past each (never to be read); mixed: adapter
    ids per token in [-1, L) and a scaling per adapter; transposed: W stored (E, K, N) (gpt-oss); peft:
    lora_A and lora_B as views of PEFT's (E·R, K) and (N, E·R) parameters (L = 1)."""
    gen = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dt)

    choices = torch.tensor(experts if experts is not None else range(E))
    top_k_index = torch.stack([choices[torch.randperm(len(choices), generator=gen)[:k]] for _ in range(T)]) if T else \
        torch.empty(0, k, dtype=torch.int64)
    weight = rnd(E, K, N, scale=K ** -0.5).transpose(1, 2) if transposed else rnd(E, N, K, scale=K ** -0.5)
    if peft:
        lora_A = rnd(E * R, K, scale=K ** -0.5, dt=adapter_dtype).view(1, E, R, K)
        # PEFT's lora_B.weight (N, E·R): element [n, j·E + e] is B_e[n, j]
        lora_B = rnd(N, E * R, scale=R ** -0.5, dt=adapter_dtype).view(N, R, E).permute(2, 0, 1).unsqueeze(0)
    else:
        lora_A = rnd(L, E, R, K, scale=K ** -0.5, dt=adapter_dtype)
        lora_B = rnd(L, E, N, R, scale=R ** -0.5, dt=adapter_dtype)
    if ranks is not None:
        for a, r in enumerate(ranks):
            lora_A[a, :, r:] = NAN
            lora_B[a, :, :, r:] = NAN
        ranks = torch.tensor(ranks, dtype=torch.int32)
    adapter_ids = torch.randint(-1, L, (T,), generator=gen) if mixed else None
    scaling = (torch.rand(L, generator=gen, dtype=torch.float64) * 2 + 0.5).float() if mixed else 1.5
    inputs = dict(x=rnd(T if gather else T * k, K), top_k_index=top_k_index, weight=weight,
                  bias=rnd(E, N) if bias else None, lora_A=lora_A, lora_B=lora_B, scaling=scaling,
                  adapter_ids=adapter_ids, ranks=ranks)
    return {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in inputs.items()}


def routing_of(inputs, E, L=1):
    return ExpertRouting(inputs["top_k_index"], E, inputs["adapter_ids"], L)


def run(plan, inputs, routing, gather, p, seed, dy, grad):
    """y (P, N) and {name: gradient} in routing order (dx: (T, K) with gather) through plans/moe.py: x and
    dy go in sorted order where the plans take them so."""
    x = inputs["x"] if gather else inputs["x"][routing.order]
    out = torch.empty(routing.P, inputs["weight"].shape[1], dtype=x.dtype, device=x.device)
    args = (inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"], inputs["scaling"], inputs["ranks"])
    S = moe.forward(plan, x, routing, *args, p, seed, gather, out, True)
    W, _, A, B, scaling, ranks = args
    got = moe.backward(plan, dy[routing.order], x, routing, W, A, B, scaling, ranks, S, p, seed, gather,
                       tuple(n in grad for n in NAMES))
    grads = {n: g for n, g in zip(NAMES, got) if n in grad}
    if "x" in grads and not gather:
        grads["x"] = grads["x"][routing.inverse]
    return out[routing.inverse], grads


CASES = [
    # (id, shape (T, k, E, K, N, R), dtypes (x, adapters), dropout p, gather, make_moe options, gradients)
    pytest.param((11, 2, 4, 70, 45, 8), (f32, f32), 0.0, True, {}, NAMES, id="odd-sizes-all-grads"),
    pytest.param((12, 2, 4, 64, 48, 16), (bf16, bf16), 0.25, True, {}, LORA, id="bf16-dropout"),
    pytest.param((10, 2, 4, 48, 32, 8), (bf16, f32), 0.1, False, {}, LORA, id="fp32-adapters-sorted-input"),
    pytest.param((9, 2, 4, 40, 48, 8), (bf16, bf16), 0.0, True, dict(transposed=True), NAMES, id="gpt-oss-layout"),
    pytest.param((9, 3, 4, 48, 40, 8), (f32, f32), 0.1, True, dict(peft=True), LORA, id="peft-strided-adapters"),
    pytest.param((12, 2, 4, 40, 36, 8), (f32, f32), 0.2, True, dict(L=2, ranks=[3, 5], mixed=True), NAMES,
                 id="mixed-adapters-ranks"),
    pytest.param((7, 2, 8, 40, 32, 8), (f32, f32), 0.0, True, dict(experts=[1, 6]), NAMES, id="empty-experts"),
    pytest.param((40, 1, 4, 32, 40, 8), (f32, f32), 0.1, True, dict(experts=[2]), NAMES, id="one-expert-top-1"),
    pytest.param((6, 4, 4, 40, 32, 8), (f32, f32), 0.0, False, {}, NAMES, id="top-k-equals-E"),
    pytest.param((8, 2, 4, 40, 36, 80), (f32, f32), 0.1, True, {}, LORA, id="rank-80"),
]


@pytest.mark.parametrize("shape,dtypes,p,gather,options,grad", CASES)
def test_matches_reference(shape, dtypes, p, gather, options, grad, plan, device):
    T, k, E, K, N, R = shape
    inputs = make_moe(T, k, E, K, N, R, *dtypes, gather=gather, device=device, **options)
    routing = routing_of(inputs, E, options.get("L", 1))
    seed = 2**40 + 7
    dy = torch.randn(T * k, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtypes[0])
    y, grads = run(plan, inputs, routing, gather, p, seed, dy.to(device), grad)
    keep = dropout_mask(seed, (T * k, K), p, device) if p else None
    # The split plan's dX with gather rounds each pair's row twice (the library GEMM's output, then the
    # low-rank term added onto it) before the sum over the token's pairs rounds it a third time.
    roundings = {"x": 3} if plan == "split" and gather and k > 1 else None
    check_moe_lora_linear(y, grads, inputs, keep, p, dy.to(device), gather, roundings)


@pytest.mark.parametrize("shape,dtypes,p,gather,options,grad", [CASES[1], CASES[5]])
def test_fused_plan_in_two_launches(shape, dtypes, p, gather, options, grad, monkeypatch, device):
    """Above ONE_LAUNCH_MAX_PAIRS the fused plan runs the shrink as a launch of its own and the GEMM reads
    S (dU) back: the same parity, here forced at test sizes."""
    monkeypatch.setattr(moe, "ONE_LAUNCH_MAX_PAIRS", 0)
    test_matches_reference(shape, dtypes, p, gather, options, grad, "fused", device)


class LargeTensors(TorchDispatchMode):
    """Records every new tensor of at least `limit` elements made by an aten op: outputs that alias an
    input (views, in-place results: an alias annotation in the op's schema) are not new."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t, ret in zip(outs, func._schema.returns):
            if isinstance(t, torch.Tensor) and t.numel() >= self.limit and ret.alias_info is None:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def _unwatched(launch):
    """A launch run with the dispatch modes off: the Triton interpreter copies its arguments (the
    weight included), which a GPU launch never does."""
    def run(*args, **kwargs):
        with _disable_current_modes():
            launch(*args, **kwargs)
    return run


@pytest.mark.parametrize("plan,gather", [("fused", True), ("split", True), ("decode", True), ("split", False)],
                         ids=["fused-gate_up", "split-gate_up", "decode-gate_up", "split-down"])
def test_no_tensor_of_the_experts_size_is_made(plan, gather, monkeypatch, device):
    """Forward and backward (LoRA gradients, dropout on) make no tensor of E·N·K elements: sizes chosen so
    that E·N·K exceeds every legitimate buffer (P·K, P·N, the adapters' gradients)."""
    for module in (fusedlora.kernels.moe_lora, fusedlora.kernels.moe_reduce):
        monkeypatch.setattr(module, "launch", _unwatched(module.launch))
    T, k, E, K, N, R = 6, 2, 8, 40, 48, 8
    inputs = make_moe(T, k, E, K, N, R, f32, gather=gather, device=device)
    routing = routing_of(inputs, E)
    dy = torch.randn(T * k, N, device=device)
    limit = E * N * K
    assert limit > max(T * k * max(K, N), E * R * (K + N))
    with LargeTensors(limit) as mode:
        inputs["weight"].clone()  # the mode sees what it is there to see
        assert mode.seen == [("aten.clone.default", (E, N, K))]
        mode.seen.clear()
        run(plan, inputs, routing, gather, 0.1, 5, dy, LORA)
    assert mode.seen == []


def test_split_takes_the_library_grouped_gemm_where_it_serves(monkeypatch, device):
    """Forward and dX each call the library once when the operands fit its rules (fp32 on CPU, rows of
    16-byte multiples), and never when they do not (K = 70 fp32: 280-byte rows are not multiples of 16)."""
    calls = []
    library = moe._GROUPED_MM
    monkeypatch.setattr(moe, "_GROUPED_MM", lambda *a, **kw: calls.append(a[0].shape) or library(*a, **kw))
    for K, expected in ((64, 2), (70, 0)):
        calls.clear()
        inputs = make_moe(7, 2, 4, K, 32, 8, f32, device=device)
        run("split", inputs, routing_of(inputs, 4), True, 0.0, 0, torch.randn(14, 32, device=device), LORA)
        assert len(calls) == expected, (K, calls)


def test_library_rules_follow_the_cuda_checks():
    """On CUDA (and the meta device, whose checks are CUDA's) the library serves bf16 only, in its layouts."""
    meta = torch.device("meta")
    w = torch.empty(4, 64, 48, dtype=bf16, device=meta)
    assert moe.library_serves(bf16, 64, w.transpose(1, 2))  # (E, N, K) contiguous read as (E, K, N)
    assert moe.library_serves(bf16, 64, torch.empty(4, 48, 64, dtype=bf16, device=meta))  # gpt-oss (E, K, N)
    assert not moe.library_serves(f32, 64, w.transpose(1, 2).float())
    assert not moe.library_serves(bf16, 60, torch.empty(4, 60, 45, dtype=bf16, device=meta))  # 90-byte rows
    assert not moe.library_serves(bf16, 64, w.transpose(1, 2), torch.empty(64, 20, dtype=bf16, device=meta)[:, :16].t())
    assert not moe.library_serves(torch.float16, 64, w.transpose(1, 2).half())


def test_every_plan_saves_the_same_S(device):
    """S (P, R) fp32 sorted, zero past each rank and on rows without an adapter, whatever the plan: a forward
    under one plan and a backward under another give the gradients of either alone. A forward that needs
    no S gives the same y."""
    inputs = make_moe(6, 2, 4, 48, 40, 8, f32, L=2, ranks=[8, 3], mixed=True, device=device)
    routing = routing_of(inputs, 4, 2)
    args = (inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"], inputs["scaling"], inputs["ranks"])
    saved = {}
    for plan in ("fused", "split", "decode"):
        y, y_alone = torch.empty(12, 40), torch.empty(12, 40)
        saved[plan] = moe.forward(plan, inputs["x"], routing, *args, 0.2, 11, True, y, True)
        assert moe.forward(plan, inputs["x"], routing, *args, 0.2, 11, True, y_alone, False) is None
        assert torch.equal(y_alone, y), plan  # without gradients S may go unwritten, y is the same
    assert (saved["fused"][routing.keys.long() % 3 == 0] == 0).all()  # adapter -1
    assert (saved["fused"][routing.keys.long() % 3 == 2, 3:] == 0).all()  # adapter 1, rank 3
    for plan in ("split", "decode"):
        torch.testing.assert_close(saved[plan], saved["fused"], rtol=1e-5, atol=1e-6)


def test_an_expert_no_pair_reaches_is_never_read(plan, device):
    """NaN in the weights, bias and adapters of experts nobody is routed to changes nothing, and their
    gradients are zero."""
    inputs = make_moe(6, 2, 6, 40, 32, 8, f32, experts=[0, 3, 4], device=device)
    for name in ("weight", "bias", "lora_A", "lora_B"):
        t = inputs[name]
        for e in (1, 2, 5):
            (t[:, e] if name.startswith("lora") else t[e]).fill_(NAN)
    routing = routing_of(inputs, 6)
    y, grads = run(plan, inputs, routing, True, 0.1, 3, torch.randn(12, 32, device=device), NAMES)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())
    for name, g in grads.items():
        if name != "x":
            unused = g[:, [1, 2, 5]] if name.startswith("lora") else g[[1, 2, 5]]
            assert (unused == 0).all(), name


def test_no_pairs(plan, device):
    inputs = make_moe(0, 2, 4, 32, 16, 8, f32, device=device)
    y, grads = run(plan, inputs, routing_of(inputs, 4), True, 0.1, 3, torch.empty(0, 16, device=device), NAMES)
    assert y.shape == (0, 16) and grads["x"].shape == (0, 32)
    for name in NAMES[1:]:
        assert grads[name].shape == inputs[name].shape and (grads[name] == 0).all(), name


def test_grids_depend_on_shapes_only(plan, monkeypatch, device):
    """Two routings of the same shapes (one spreading the pairs, one sending all to two experts) launch the
    same kernels with the same grids and arguments but the routing tensors: nothing is read back from
    the device to size a launch (CUDA-graph capture, no host sync). The launches are recorded, not run."""
    kernels = (fusedlora.kernels.moe_lora._moe_gemm_kernel, fusedlora.kernels.moe_lora._moe_shrink_kernel,
               fusedlora.kernels.moe_reduce._moe_reduce_kernel)
    recorded = []

    def record(self, *args, grid, warmup, **kwargs):
        recorded.append((self.fn.__name__, grid, [a for a in args if not isinstance(a, torch.Tensor)], kwargs))

    for cls in {type(kernel) for kernel in kernels}:
        monkeypatch.setattr(cls, "run", record)

    def launches(experts):
        recorded.clear()
        inputs = make_moe(12, 2, 4, 40, 32, 8, f32, L=2, mixed=True, experts=experts, device=device)
        run(plan, inputs, routing_of(inputs, 4, 2), True, 0.1, 3, torch.randn(24, 32, device=device), NAMES)
        return list(recorded)

    spread, piled = launches(None), launches([1, 2])
    assert {name for name, *_ in spread} >= {"_moe_gemm_kernel", "_moe_reduce_kernel"}
    assert spread == piled


@pytest.mark.parametrize("forced", ["fused", "split", "decode"])
def test_choose_moe_serves_the_forced_plan(forced, monkeypatch):
    monkeypatch.setenv("FUSEDLORA_PLAN", forced)
    assert planner.choose_moe("forward", 32768, 2048, 1536, 16, 128, 1) == forced


def test_choose_moe_by_pairs(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_PLAN", "auto")
    decode_max, split_from = planner.moe_thresholds()
    assert planner.choose_moe("forward", 128, 2048, 1536, 16, 128, 1) == "decode"  # 16 tokens, top-8
    assert planner.choose_moe("backward", decode_max, 2048, 1536, 16, 128, 1) == "decode"
    assert planner.choose_moe("forward", 32768, 2048, 1536, 16, 128, 1) == "split"  # 4096 tokens, top-8
    assert split_from["forward"] == decode_max + 1  # no fused range until measured


def test_bound_launch_equals_the_launcher(device):
    """gemm_launcher's run, fixed once for a shape, launches what moe_gemm does for each routing of it."""
    from fusedlora.kernels.moe_lora import gemm_launcher, moe_gemm
    shapes = (8, 2, 4, 40, 32, 8)
    first = make_moe(*shapes, f32, device=device)
    groups = moe.groups_of(routing_of(first, 4))
    args = lambda inp: (inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"])  # noqa: E731
    flags = dict(shrink=True, store_u=True, drop_x=True, gather=True, decode=True)
    out, S = torch.empty(16, 32, device=device), torch.empty(16, 8, device=device)
    run_bound = gemm_launcher(*args(first), groups, out, u=S, **flags)
    for seed in (1, 2):
        inputs = make_moe(*shapes, f32, device=device, seed=seed)
        groups = moe.groups_of(routing_of(inputs, 4))
        want_out, want_S = torch.empty_like(out), torch.empty_like(S)
        moe_gemm(*args(inputs), groups, want_out, u=want_S, scale=1.5, seed=seed, threshold=1 << 22, **flags)
        run_bound(*args(inputs), groups, out, 1.5, seed, 1 << 22, u=S)
        assert torch.equal(out, want_out) and torch.equal(S, want_S)


def test_seeds_share_one_specialization(device):
    """The seed words and the dropout threshold are not specialized in the MoE kernels either: every seed
    shares one compiled variant (Triton's binder for sm_90, launches recorded instead of run)."""
    from sm90 import bind, record_launches
    kernels = [fusedlora.kernels.moe_lora._moe_gemm_kernel, fusedlora.kernels.moe_lora._moe_shrink_kernel,
               fusedlora.kernels.moe_reduce._moe_reduce_kernel]
    inputs = make_moe(8, 2, 4, 48, 32, 8, f32, device=device)
    routing = routing_of(inputs, 4)
    dy = torch.randn(16, 32, device=device)
    keys = {}
    for seed in (1, 5, 2**40 + 32, 2**62 + 3):
        for p in (0.1, 0.5):
            launches = record_launches(lambda: run("split", inputs, routing, True, p, seed, dy, LORA), kernels)
            for i, (kernel, args, kwargs) in enumerate(launches):
                _, _, specialization, options = bind(kernel, args, kwargs)
                keys.setdefault(i, set()).add((tuple(specialization), tuple(sorted(options.items()))))
    assert len(keys) >= 4 and all(len(k) == 1 for k in keys.values())
