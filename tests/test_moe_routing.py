"""ExpertRouting: the grouping of (token, expert) pairs that every MoE projection shares, checked against
its definition pair by pair."""
import pytest
import torch

from fusedlora.core.moe_routing import ExpertRouting


def _check(routing, top_k_index, adapter_ids, E, L):
    T, k = top_k_index.shape
    experts = top_k_index.reshape(-1)
    adapters = torch.zeros_like(experts) if adapter_ids is None else adapter_ids.repeat_interleave(k)
    keys = experts * (L + 1) + adapters + 1
    assert routing.P == T * k
    assert torch.equal(torch.sort(routing.order).values, torch.arange(T * k))  # a permutation
    assert torch.equal(routing.keys.long(), keys[routing.order])
    assert bool((routing.keys[1:] >= routing.keys[:-1]).all())
    for c in range(E * (L + 1)):  # segment c: exactly the pairs with key c, in routing order (stable)
        lo, hi = int(routing.seg_starts[c]), int(routing.seg_starts[c + 1])
        assert routing.order[lo:hi].tolist() == [p for p in range(T * k) if int(keys[p]) == c]
    assert int(routing.seg_starts[-1]) == T * k
    assert torch.equal(routing.rows, routing.order // k)
    assert torch.equal(routing.inverse[routing.order], torch.arange(T * k))
    ends = [int((experts <= e).sum()) for e in range(E)]
    assert routing.expert_offsets().tolist() == ends


@pytest.mark.parametrize("T, k, E", [(5, 2, 4), (1, 1, 1), (6, 3, 3), (0, 2, 4), (4, 4, 4)])
def test_grouping_matches_its_definition(T, k, E):
    g = torch.Generator().manual_seed(T * 100 + k * 10 + E)
    top_k_index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else \
        torch.empty(0, k, dtype=torch.int64)
    _check(ExpertRouting(top_k_index, E), top_k_index, None, E, 1)


def test_mixed_adapters_group_by_expert_then_adapter():
    top_k_index = torch.tensor([[3, 1], [1, 0], [3, 2], [2, 1], [0, 3]])
    adapter_ids = torch.tensor([1, -1, 0, 1, 2])
    routing = ExpertRouting(top_k_index, 4, adapter_ids=adapter_ids, num_adapters=3)
    _check(routing, top_k_index, adapter_ids, 4, 3)


def test_every_token_on_one_expert():
    top_k_index = torch.full((7, 1), 2)
    routing = ExpertRouting(top_k_index, 4)
    _check(routing, top_k_index, None, 4, 1)
    assert routing.expert_offsets().tolist() == [0, 0, 7, 7]


def test_combine_weights_each_pair_and_sums_per_token():
    top_k_index = torch.tensor([[3, 1], [1, 0], [2, 2]])
    routing = ExpertRouting(top_k_index, 4)
    y_pairs = torch.randn(6, 5, dtype=torch.float64)
    w = torch.rand(3, 2, dtype=torch.float64)
    got = routing.combine(y_pairs[routing.order], w)
    want = (y_pairs.view(3, 2, 5) * w[..., None]).sum(1)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k_index=torch.tensor([[0, 4]]), num_experts=4), r"holds expert 4, outside \[0, num_experts\)"),
    (dict(top_k_index=torch.tensor([[0, -1]]), num_experts=4), r"holds expert -1"),
    (dict(top_k_index=torch.tensor([0, 1]), num_experts=4), r"top_k_index .* must be a \(T, k\) integer tensor"),
    (dict(top_k_index=torch.tensor([[0.0]]), num_experts=4), r"must be a \(T, k\) integer tensor"),
    (dict(top_k_index=torch.tensor([[0]]), num_experts=0), r"num_experts must be a positive int"),
    (dict(top_k_index=torch.tensor([[0], [1]]), num_experts=2, adapter_ids=torch.tensor([0])),
     r"adapter_ids .* must be a \(2,\) integer tensor"),
    (dict(top_k_index=torch.tensor([[0], [1]]), num_experts=2, adapter_ids=torch.tensor([0, 2]), num_adapters=2),
     r"adapter_ids .* holds 2, outside \[-1, num_adapters\)"),
])
def test_bad_routing_is_named(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ExpertRouting(**kwargs)


def test_reference_projection_is_lora_linear_per_pair():
    """fusedlora.reference.moe_lora_linear against the dense reference run once per pair: the expert's
    weight and bias, the token's adapter (none for -1), the pair's row of the mask."""
    from fusedlora import reference
    g = torch.Generator().manual_seed(3)
    T, k, E, L, N, K, R = 4, 2, 3, 2, 5, 6, 3
    f64 = dict(dtype=torch.float64)
    x, W, b = torch.randn(T, K, generator=g, **f64), torch.randn(E, N, K, generator=g, **f64), torch.randn(E, N, **f64)
    A, B = torch.randn(L, E, R, K, generator=g, **f64), torch.randn(L, E, N, R, generator=g, **f64)
    top_k_index, adapter_ids = torch.tensor([[0, 2], [1, 0], [2, 1], [1, 2]]), torch.tensor([1, -1, 0, 1])
    keep, s = torch.rand(T * k, K, generator=g) > 0.3, torch.tensor([0.5, 2.0], **f64)
    got = reference.moe_lora_linear(x, top_k_index, W, b, A, B, s, keep, 0.3, adapter_ids=adapter_ids,
                                    ranks=torch.tensor([3, 2]))
    for p in range(T * k):
        t, e, a = p // k, int(top_k_index.view(-1)[p]), int(adapter_ids[p // k])
        if a < 0:
            want = x[t] @ W[e].t() + b[e]
        else:
            r = (3, 2)[a]
            want = reference.lora_linear(x[t:t + 1], W[e], b[e], A[a, e, :r], B[a, e, :, :r], float(s[a]),
                                         keep[p:p + 1], 0.3)[0]
        torch.testing.assert_close(got[p], want, rtol=1e-13, atol=1e-13)
