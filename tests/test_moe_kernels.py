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
    top_k_index = torch.stack([choices[torch.randperm(len(choices), generator=gen)[:k]] for _ in range(T)])
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
    pytest.param((12, 2, 4, 40, 36, 8), (f32, f32), 0.2, True, dict(L=3, ranks=[3, 5, 8], mixed=True), LORA,
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
