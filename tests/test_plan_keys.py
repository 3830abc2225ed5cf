"""One component of a call's key at a time: after a warm call, a call that differs in exactly that
component gets a plan of its own (a build counted) and the float64 oracle's result, for lora_linear,
lora_add and multi_lora_linear (fusedlora/core/specialization.py's keys, fusedlora/ops/call.py's plans).

These tests kill the mutants of a key that misses a component: the warm plan, bound for the other
specialization, gives a wrong result, or, where the interpreter computes the same either way (a tensor's
16-byte alignment, its type, torch's fp32 precision switch: what a GPU compiles for), the build count
shows the plan was shared; tests/test_call_plans.py's sm_90 host-path check shows what those components
change on a GPU. Components that cannot change alone: x's dtype and weight's (the checks tie them), the
shapes past the rows (tied to the other tensors'), the device (one here). Which inputs need a gradient,
and the bound backward's key: tests/test_call_plans_train.py; the key itself: tests/test_signature.py."""
import pytest
import torch
from oracle import check_lora_add, check_lora_linear, check_multi_lora_linear, make_inputs
from test_call_plans import ADD, MULTI, builds, cold, linear  # noqa: F401 (fixtures)
from test_lora_add import add_inputs
from test_multi_lora import make_multi

import fusedlora
from fusedlora import AdapterBatch

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16


def _transposed(t):
    return t.t().contiguous().t()


class Sub(torch.Tensor):
    """A tensor subclass: another type, the same plan."""


def unaligned(t):
    """A contiguous copy of t whose address is one element past a 16-byte boundary (Triton specializes
    a pointer on its alignment)."""
    buffer = torch.empty(t.numel() + 16, dtype=t.dtype, device=t.device)
    offset = 1 if buffer.data_ptr() % 16 == 0 else 0
    return buffer[offset:offset + t.numel()].view(t.shape).copy_(t)


def linear_variants(inputs):
    """name -> inputs differing from `inputs` (M = 16, fp16 x, fp16 adapters, a bias) in one key component
    (x's dtype, shape past the rows and device cannot change alone: the checks tie them to weight's)."""
    x, w, A, B = inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"]
    return {
        "x rows": dict(x=x[:15]),
        "x strides": dict(x=_transposed(x)),
        "x alignment": dict(x=unaligned(x)),
        "x type": dict(x=x.as_subclass(Sub)),
        "weight strides": dict(weight=_transposed(w)),
        "weight alignment": dict(weight=unaligned(w)),
        "no bias": dict(bias=None),
        "bias strides": dict(bias=torch.stack([inputs["bias"]] * 2, 1)[:, 1]),
        "bias alignment": dict(bias=unaligned(inputs["bias"])),
        "lora_A strides": dict(lora_A=_transposed(A)),
        "lora_A alignment": dict(lora_A=unaligned(A)),
        "lora_B strides": dict(lora_B=_transposed(B)),
        "lora_B alignment": dict(lora_B=unaligned(B)),
        "adapters' dtype": dict(lora_A=A.float(), lora_B=B.float()),  # A and B share one dtype
    }


@pytest.mark.parametrize("variant", list(linear_variants(make_inputs(16, 32, 24, 4, f16))))
def test_lora_linear_key_component(variant, device, builds):
    """A warm plan, then the call that differs in one component: a plan of its own, the oracle's result."""
    inputs = make_inputs(16, 32, 24, 4, f16, device=device)
    changed = dict(inputs, **linear_variants(inputs)[variant])
    with torch.no_grad():
        linear(inputs)
        y = linear(changed)
    assert builds["linear_plan"] == 2, f"{variant}: served by the other call's plan"
    check_lora_linear(y, None, changed, 2.0, None, 0.0)


def test_lora_linear_dropout_p_is_a_key_component(device, builds):
    inputs = make_inputs(16, 32, 24, 4, f32, device=device)
    with torch.no_grad():
        linear(inputs, 2.0, 0.0, 3)
        y = linear(inputs, 2.0, 0.3, 3)
        assert builds["linear_plan"] == 2
        check_lora_linear(y, None, inputs, 2.0, fusedlora.dropout_mask(3, inputs["x"].shape, 0.3, device), 0.3)
        y = linear(inputs, 2.0, 0.5, 3)  # another p, dropout on both times: the plan holds p's threshold
        assert builds["linear_plan"] == 3
    check_lora_linear(y, None, inputs, 2.0, fusedlora.dropout_mask(3, inputs["x"].shape, 0.5, device), 0.5)


def test_dropout_p_is_keyed_with_its_type(device):
    """False == 0 == 0.0: after a call with 0.0, one with False is another key, whose build refuses it."""
    inputs = make_inputs(8, 32, 24, 4, f32, device=device)
    add = add_inputs(8, 32, 24, 4, f32, device=device)
    with torch.no_grad():
        linear(inputs, 1.0, 0.0)
        fusedlora.lora_add(*(add[n] for n in ADD), 1.0, 0.0)
        with pytest.raises(TypeError, match="dropout_p must be a real number"):
            linear(inputs, 1.0, False)
        with pytest.raises(TypeError, match="dropout_p must be a real number"):
            fusedlora.lora_add(*(add[n] for n in ADD), 1.0, False)


def test_fp32_precision_is_a_key_component_for_float32(device, builds):
    """torch's fp32 matmul switch chooses the GPU's fp32 dot precision: float32 calls are planned again
    when it changes (which launch that gives is the sm_90 check's, below); other dtypes are not."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9")
    before = matmul.fp32_precision
    f32_inputs, bf16_inputs = make_inputs(16, 32, 24, 4, f32, device=device), make_inputs(16, 32, 24, 4, bf16,
                                                                                          device=device)
    try:
        with torch.no_grad():
            matmul.fp32_precision = "ieee"
            linear(f32_inputs)
            linear(bf16_inputs)
            matmul.fp32_precision = "tf32"
            y = linear(f32_inputs)
            assert builds["linear_plan"] == 3
            linear(bf16_inputs)
            assert builds["linear_plan"] == 3
    finally:
        matmul.fp32_precision = before
    check_lora_linear(y, None, f32_inputs, 2.0, None, 0.0)


def add_variants(inputs):
    """name -> lora_add inputs (M = 16, fp32) differing in one key component (rows change base and x
    together: the checks tie them)."""
    base, x, A, B = (inputs[n] for n in ADD)
    return {
        "base strides": dict(base=_transposed(base)),
        "base dtype": dict(base=base.half()),
        "base alignment": dict(base=unaligned(base)),
        "base type": dict(base=base.as_subclass(Sub)),
        "x strides": dict(x=_transposed(x)),
        "x dtype": dict(x=x.half()),  # fp32 adapters take any x
        "x alignment": dict(x=unaligned(x)),
        "lora_A strides": dict(lora_A=_transposed(A)),
        "lora_A alignment": dict(lora_A=unaligned(A)),
        "lora_B strides": dict(lora_B=_transposed(B)),
        "lora_B alignment": dict(lora_B=unaligned(B)),
        "rows": dict(base=base[:15], x=x[:15]),
        "dropout_p": {},
    }


@pytest.mark.parametrize("variant", list(add_variants(add_inputs(16, 32, 24, 4, f32))))
def test_lora_add_key_component(variant, device, builds):
    inputs = add_inputs(16, 32, 24, 4, f32, device=device)
    changed = dict(inputs, **add_variants(inputs)[variant])
    p = 0.2 if variant == "dropout_p" else 0.0
    with torch.no_grad():
        fusedlora.lora_add(*(inputs[n] for n in ADD), 1.5, 0.0, 6)
        y = fusedlora.lora_add(*(changed[n] for n in ADD), 1.5, p, 6)
    assert builds["add_plan"] == 2, f"{variant}: served by the other call's plan"
    check_lora_add(y, None, changed, 1.5, fusedlora.dropout_mask(6, inputs["x"].shape, p, device) if p else None, p)


def multi_variants(inputs, ids):
    """name -> (multi_lora_linear inputs, ids) differing from (inputs, ids) (M = 16, fp32, no ranks) in one
    key component: the batch's spec is its flat ids' specialization and its adapter count (L, which the
    checks tie to lora_A's)."""
    x, A, B = inputs["x"], inputs["lora_A"], inputs["lora_B"]
    stacked = A.transpose(1, 2).contiguous().transpose(1, 2), B.transpose(1, 2).contiguous().transpose(1, 2)
    ranks = torch.tensor([8, 2, 5], dtype=torch.int32, device=x.device)
    return {
        "x strides": (dict(x=_transposed(x)), ids),
        "x leading dims": (dict(x=x.view(2, 8, -1)), ids.view(2, 8)),
        "x alignment": (dict(x=unaligned(x)), ids),
        "x type": (dict(x=x.as_subclass(Sub)), ids),
        "weight strides": (dict(weight=_transposed(inputs["weight"])), ids),
        "no bias": (dict(bias=None), ids),
        "bias strides": (dict(bias=torch.stack([inputs["bias"]] * 2, 1)[:, 1]), ids),
        "lora_A strides": (dict(lora_A=stacked[0]), ids),
        "lora_A alignment": (dict(lora_A=unaligned(A)), ids),
        "lora_B strides": (dict(lora_B=stacked[1]), ids),
        "scalings strides": (dict(scalings=torch.stack([inputs["scalings"]] * 2, 1)[:, 1]), ids),
        "scalings dtype": (dict(scalings=inputs["scalings"].double()), ids),
        "ranks given": (dict(ranks=ranks), ids),
        "ids dtype": ({}, ids.to(torch.int32)),
        "ids alignment": ({}, unaligned(ids)),
    }


def _zero_past_ranks(inputs):
    """inputs with the entries past each rank zeroed (they are not read), for the oracle."""
    A, B = inputs["lora_A"].clone(), inputs["lora_B"].clone()
    for i, r in enumerate(inputs["ranks"].tolist()):
        A[i, r:] = 0
        B[i, :, r:] = 0
    return dict(inputs, lora_A=A, lora_B=B)


def _multi_ids(device, shape=(16,)):
    return torch.randint(-1, 3, shape, generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("variant", list(multi_variants(make_multi(16, 32, 24, 3, 8, f32), _multi_ids("cpu"))))
def test_multi_key_component(variant, device, builds):
    inputs, ids = make_multi(16, 32, 24, 3, 8, f32, device=device), _multi_ids(device)
    change, other_ids = multi_variants(inputs, ids)[variant]
    changed = dict(inputs, **change)
    with torch.no_grad():
        fusedlora.multi_lora_linear(*(inputs[n] for n in MULTI), AdapterBatch(ids, 3), inputs["ranks"])
        y = fusedlora.multi_lora_linear(*(changed[n] for n in MULTI), AdapterBatch(other_ids, 3), changed["ranks"])
    assert builds["multi_plan"] == 2, f"{variant}: served by the other call's plan"
    check_multi_lora_linear(y, None, _zero_past_ranks(changed) if variant == "ranks given" else changed, other_ids)


def test_multi_ranks_strides_and_dtype_are_key_components(device, builds):
    inputs, ids = make_multi(16, 32, 24, 3, 8, f32, ranks=[8, 2, 5], device=device), _multi_ids(device)
    batch, ranks = AdapterBatch(ids, 3), inputs["ranks"]
    args = [inputs[n] for n in MULTI]
    with torch.no_grad():
        fusedlora.multi_lora_linear(*args, batch, ranks)
        for count, other in enumerate((torch.stack([ranks] * 2, 1)[:, 1], ranks.long()), 2):
            y = fusedlora.multi_lora_linear(*args, batch, other)
            assert builds["multi_plan"] == count
            check_multi_lora_linear(y, None, inputs, ids)


OPS = ("lora_linear", "lora_add", "multi_lora_linear")


def _op_call(op, device):
    """(call, check(y, torch_ops), builder name) of one op on fixed inputs of 16 rows."""
    if op == "lora_linear":
        inputs = make_inputs(16, 32, 24, 4, f32, device=device)
        return (lambda: linear(inputs), lambda y, t: check_lora_linear(y, None, inputs, 2.0, None, 0.0, torch_ops=t),
                "linear_plan")
    if op == "lora_add":
        inputs = add_inputs(16, 32, 24, 4, f32, device=device)
        return (lambda: fusedlora.lora_add(*(inputs[n] for n in ADD), 1.5),
                lambda y, t: check_lora_add(y, None, inputs, 1.5, None, 0.0, torch_ops=t), "add_plan")
    inputs, ids = make_multi(16, 32, 24, 3, 8, f32, ranks=[8, 2, 5], device=device), _multi_ids(device)
    batch = AdapterBatch(ids, 3)
    return (lambda: fusedlora.multi_lora_linear(*(inputs[n] for n in MULTI), batch, inputs["ranks"]),
            lambda y, t: check_multi_lora_linear(y, None, inputs, ids, torch_ops=t), "multi_plan")


@pytest.mark.parametrize("op", OPS)
def test_settings_are_key_components_of_every_op(op, device, monkeypatch, builds):
    """FUSEDLORA_PLAN, then FUSEDLORA_BACKEND, changed after a warm call: a plan of each, the oracle's result."""
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    call, check, name = _op_call(op, device)
    with torch.no_grad():
        call()
        for count, (variable, value) in enumerate((("FUSEDLORA_PLAN", "split"), ("FUSEDLORA_BACKEND", "torch")), 2):
            monkeypatch.setenv(variable, value)
            y = call()
            assert builds[name] == count, f"{variable}={value}: served by the other setting's plan"
            check(y, value == "torch")
