"""multi_lora_linear's call plans (fusedlora/plans/multi.py) on the paths tests/test_call_plans.py does not
take: per-call checks on every path after a warm cache, a strided DoRA scale, a batch whose ids were not
checked."""
import pytest
import torch
from oracle import assert_oracle, chain_lengths, check_multi_lora_linear, run
from test_multi_lora import make_multi

import fusedlora
from fusedlora import AdapterBatch
from fusedlora.core import reference
from fusedlora.kernels import configs

f32 = torch.float32
MULTI = ("x", "weight", "bias", "lora_A", "lora_B", "scalings")


@pytest.fixture(autouse=True)
def cold():
    configs.clear_caches(tables=False)
    yield
    configs.clear_caches(tables=False)


# The paths of a plan that check the ranks' values on each call: (backend, rows, gradients). The bound
# decode run without gradients is tests/test_call_plans.py::test_bad_values_after_a_warm_cache's.
RANK_PATHS = {"torch backend": ("torch", 8, False), "torch backend, gradients": ("torch", 8, True),
              "split": ("triton", 70, False), "split, gradients": ("triton", 70, True),
              "decode, gradients": ("triton", 8, True)}


@pytest.mark.parametrize("path", list(RANK_PATHS))
def test_bad_ranks_after_a_warm_cache(path, device, monkeypatch):
    """ranks of the same specialization as a warm call's but with a value past R: refused on every path,
    as a cold call refuses them (ranks on the CPU are read at no GPU sync). Without the check the torch
    backend would take rank 9 of 8 as 8 and the kernels read past the stack."""
    backend, M, grad = RANK_PATHS[path]
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    inputs = make_multi(M, 32, 24, 3, 8, f32, ranks=[8, 2, 5], device=device)
    batch = AdapterBatch(torch.arange(M, device=device) % 4 - 1, 3)
    leaves = [inputs[n].detach().clone().requires_grad_(grad and n in ("x", "lora_A")) for n in MULTI]
    fusedlora.multi_lora_linear(*leaves, batch, inputs["ranks"])
    bad = torch.tensor([8, 9, 5], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"ranks .* must lie in \[0, R\] = \[0, 8\]"):
        fusedlora.multi_lora_linear(*leaves, batch, bad)
    assert len(fusedlora.ops.multi.MULTI.plans) == 1  # the bad call was served by the warm plan


@pytest.mark.parametrize("M", [8, 70], ids=["decode", "split"])
def test_strided_col_scale(M, device):
    """A DoRA scale (L, N) whose columns are not adjacent (the transpose of an (N, L) tensor): the kernels
    read it with unit column stride, so the plan passes them a contiguous copy; the result is the
    reference's, y[t] = g[l] ⊙ (x[t]·Wᵀ + s_l·(x[t]·A_lᵀ)·B_lᵀ) + b."""
    inputs = make_multi(M, 32, 24, 3, 8, f32, ranks=[8, 2, 5], device=device)
    g = (torch.rand(24, 3, generator=torch.Generator().manual_seed(2)) + 0.5).to(device).t()
    assert g.shape == (3, 24) and g.stride(1) != 1
    ids = torch.arange(M, device=device) % 4 - 1
    with torch.no_grad():
        y = fusedlora.multi_lora_linear(*(inputs[n] for n in MULTI), AdapterBatch(ids, 3), inputs["ranks"],
                                        col_scale=g)
    args = dict(inputs, adapter_ids=ids, col_scale=g)
    (y_low, _), (y64, _), (y_mag, _) = (run(reference.multi_lora_linear, args, None, [], mode)
                                        for mode in ("low", "exact", "magnitude"))
    assert_oracle("y", y, y_low, y64, y_mag, chain_lengths(M, 32, 24, 8)["y"] + 1, f32)


@pytest.mark.parametrize("M", [8, 70], ids=["decode", "split"])
def test_unchecked_batch_is_not_checked_by_the_call(M, device):
    """AdapterBatch(..., check_values=False) (the caller vouches for its ids, or cannot afford reading
    them) is served without a read of its ids: an id outside [-1, L) gives a NaN row, as documented,
    not an error, and the other rows are the reference's."""
    inputs = make_multi(M, 32, 24, 3, 8, f32, device=device)
    ids = torch.arange(M, device=device) % 5 - 1  # ..., -1, 0, 1, 2, 3: 3 is past L = 3
    with torch.no_grad():
        y = fusedlora.multi_lora_linear(*(inputs[n] for n in MULTI), AdapterBatch(ids, 3, check_values=False), None)
    outside = ids == 3
    assert torch.isnan(y[outside]).all() and not torch.isnan(y[~outside]).any()
    rows = dict(inputs, x=inputs["x"][~outside])
    check_multi_lora_linear(y[~outside], None, rows, ids[~outside])
