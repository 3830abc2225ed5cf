"""The per-shape cache of eager no-grad multi_lora_linear calls over an AdapterBatch
(fusedlora/ops/multi.py): served calls give the full path's result and the float64 oracle's, a key is
never served to a call that differs in a specialization or a setting, and bad values still raise."""
import pytest
import torch
from oracle import check_multi_lora_linear
from test_multi_lora import make_multi

import fusedlora
import fusedlora.multi
from fusedlora import AdapterBatch
from fusedlora.ops import multi as ops

f32, bf16 = torch.float32, torch.bfloat16
ORDER = ("x", "weight", "bias", "lora_A", "lora_B", "scalings")


@pytest.fixture(autouse=True)
def cold_cache():
    ops._FAST.clear()
    yield
    ops._FAST.clear()


def call(inputs, ids, **change):
    args = {**inputs, **change}
    return fusedlora.multi_lora_linear(*(args[n] for n in ORDER), ids, args["ranks"])


def full_path(inputs, ids, **change):
    """The eager path without the cache (ops.multi_lora_linear over a validated batch)."""
    args = {**inputs, **change}
    return ops.multi_lora_linear(*(args[n] for n in ORDER), ids, args["ranks"])


CASES = [
    # (M, K, N, L, R, ranks, dtype, adapter dtype, entry kind)
    pytest.param(16, 40, 24, 3, 8, [8, 3, 5], f32, f32, "_Decode", id="decode-ranks"),
    pytest.param((2, 9), 48, 40, 4, 16, None, bf16, f32, "_Decode", id="decode-3d-bf16"),
    pytest.param(70, 32, 24, 3, 8, None, f32, f32, "_Planned", id="split-plan"),
]


@pytest.mark.parametrize("M,K,N,L,R,ranks,dtype,adapter_dtype,kind", CASES)
def test_served_call_matches_full_path_and_oracle(M, K, N, L, R, ranks, dtype, adapter_dtype, kind, device,
                                                  monkeypatch):
    inputs = make_multi(M, K, N, L, R, dtype, adapter_dtype, ranks, device=device)
    lead = inputs["x"].shape[:-1]
    ids = torch.randint(-1, L, lead, generator=torch.Generator().manual_seed(3)).to(device)
    batch = AdapterBatch(ids, L)
    with torch.no_grad():
        first = call(inputs, batch)
        (entry,) = ops._FAST.values()
        assert type(entry).__name__ == kind
        full = full_path(inputs, batch)
        with monkeypatch.context() as m:
            m.setattr(fusedlora.multi, "check_multi", lambda *a, **k: pytest.fail("the full path ran"))
            again = call(inputs, batch)
        other = AdapterBatch(torch.flip(ids, (-1,)), L)  # another batch of the same shape: its own ids
        with monkeypatch.context() as m:
            m.setattr(fusedlora.multi, "check_multi", lambda *a, **k: pytest.fail("the full path ran"))
            flipped = call(inputs, other)
    assert len(ops._FAST) == 1
    assert torch.equal(first, full) and torch.equal(again, full)
    assert torch.equal(flipped, full_path(inputs, other))
    check_multi_lora_linear(again, None, {k: v for k, v in inputs.items()}, ids)


def test_key_covers_every_specialization(device, monkeypatch):
    inputs = make_multi(16, 32, 24, 3, 8, f32, device=device)
    L = 3
    ids = torch.randint(-1, L, (16,), generator=torch.Generator().manual_seed(0)).to(device)
    batch = AdapterBatch(ids, L)
    x, A = inputs["x"], inputs["lora_A"]
    variants = {
        "transposed x": dict(x=x.t().contiguous().t()),
        "no bias": dict(bias=None),
        "ranks": dict(ranks=torch.tensor([8, 2, 5], dtype=torch.int32, device=device)),
        "transposed lora_A": dict(lora_A=A.transpose(1, 2).contiguous().transpose(1, 2)),
        "half x and weight": dict(x=x.half(), weight=inputs["weight"].half(), bias=inputs["bias"].half()),
    }
    with torch.no_grad():
        call(inputs, batch)
        for name, change in variants.items():
            before = len(ops._FAST)
            got = call(inputs, batch, **change)
            assert len(ops._FAST) == before + 1, f"{name}: served by another call's entry"
            assert torch.equal(got, full_path(inputs, batch, **change)), name
        before = len(ops._FAST)
        monkeypatch.setenv("FUSEDLORA_PLAN", "split")
        assert torch.equal(call(inputs, batch), full_path(inputs, batch))
        assert len(ops._FAST) == before + 1 and type(list(ops._FAST.values())[-1]).__name__ == "_Planned"


def test_bad_input_after_a_warm_cache(device):
    inputs = make_multi(8, 32, 24, 3, 8, f32, ranks=[8, 2, 5], device=device)
    batch = AdapterBatch(torch.tensor([0, 1, 2, -1, 0, 1, 2, -1], device=device), 3)
    with torch.no_grad():
        call(inputs, batch)
        call(inputs, batch)
        with pytest.raises(ValueError, match="ranks"):  # a value the key leaves out, checked per call
            call(inputs, batch, ranks=torch.tensor([8, 9, 5], dtype=torch.int32, device=device))
        with pytest.raises(ValueError, match="AdapterBatch was built for 4 adapters"):
            call(inputs, AdapterBatch(batch.ids, 4))
        with pytest.raises(ValueError, match="lora_B"):
            call(inputs, batch, lora_B=inputs["lora_B"][:, :20])
    assert len(ops._FAST) == 1
