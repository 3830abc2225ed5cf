"""The key a Signature makes (fusedlora/core/specialization.py), for every kind of argument, and PlanCache.

One probe signature holds one argument of each kind. Changing one component of one argument (a tensor's
type, shape, strides, dtype, 16-byte alignment or requires_grad; an optional's None-ness; a TYPE's type;
a VALUE's value or type; a NONE's None-ness; a SPEC's spec), a setting (FUSEDLORA_BACKEND,
FUSEDLORA_PLAN, torch's fp32 precision switch with a float32 tensor) or grad mode gives another key;
changing a per-call value, or what the key leaves out, gives the same key. What each op's plans do with
their keys: tests/test_call_plans.py and tests/test_call_plans_train.py."""
import types

import pytest
import torch
from test_plan_keys import Sub, unaligned

from fusedlora.core import knobs, specialization
from fusedlora.core.specialization import (NONE, OPTIONAL, PER_CALL, SPEC, TENSOR, TYPE, VALUE, PlanCache, Signature,
                                           settings)
from fusedlora.kernels import configs

PROBE = Signature("probe", t=TENSOR, o=OPTIONAL, ty=TYPE, v=VALUE, n=NONE, s=SPEC, p=PER_CALL)
ARGS = ("t", "o", "ty", "v", "n", "s", "p")


def base_args():
    t = torch.zeros(4, 8)
    return dict(t=t, o=torch.zeros(8), ty=2.0, v=0.5, n=None, s=types.SimpleNamespace(spec=("ids", 3)), p=7)


def key(**changes):
    args = dict(base_args(), **changes)
    return PROBE.key(*(args[n] for n in ARGS))


def zeros(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)  # at address 0 mod 16 (CPU allocations are 64-byte aligned)


# Pairs of changes to the probe's arguments (from base_args) whose keys differ.
DIFFER = {
    "tensor type": ({}, dict(t=zeros(4, 8).as_subclass(Sub))),
    "tensor shape": ({}, dict(t=zeros(3, 8))),
    "tensor strides": ({}, dict(t=zeros(8, 4).t())),
    "tensor dtype": (dict(t=zeros(4, 8, dtype=torch.float16)), dict(t=zeros(4, 8, dtype=torch.bfloat16))),
    "tensor device": ({}, dict(t=torch.zeros(4, 8, device="meta"))),  # no second device here: meta has no data
    "tensor alignment": ({}, dict(t=unaligned(zeros(4, 8)))),
    "tensor requires_grad": ({}, dict(t=zeros(4, 8).requires_grad_())),
    "optional None": ({}, dict(o=None)),
    "optional type": ({}, dict(o=zeros(8).as_subclass(Sub))),
    "optional shape": ({}, dict(o=zeros(9))),
    "optional strides": ({}, dict(o=zeros(8, 2)[:, 1])),
    "optional dtype": ({}, dict(o=zeros(8, dtype=torch.float16))),
    "optional alignment": ({}, dict(o=unaligned(zeros(8)))),
    "optional requires_grad": ({}, dict(o=zeros(8).requires_grad_())),
    "TYPE's type": ({}, dict(ty=2)),
    "VALUE's value": ({}, dict(v=0.25)),
    "VALUE's type, int and float": (dict(v=1), dict(v=1.0)),  # 1 == 1.0 == True
    "VALUE's type, bool and int": (dict(v=True), dict(v=1)),
    "NONE's None-ness": ({}, dict(n=len)),
    "SPEC's spec": ({}, dict(s=types.SimpleNamespace(spec=("ids", 4)))),
}
# Pairs whose keys are equal: what the key leaves out.
EQUAL = {
    "tensor values": ({}, dict(t=torch.ones(4, 8))),
    "TYPE's value": ({}, dict(ty=-3.5)),
    "NONE's value": (dict(n=len), dict(n=print)),
    "SPEC's object": ({}, dict(s=types.SimpleNamespace(spec=("ids", 3), other=1))),
    "PER_CALL": ({}, dict(p=None)),
}


def test_a_key_is_made_and_repeats():
    assert key() is not None and key() == key() and hash(key()) == hash(key())


@pytest.mark.parametrize("change", list(DIFFER))
def test_each_component_changes_the_key(change):
    a, b = DIFFER[change]
    assert key(**a) != key(**b)


@pytest.mark.parametrize("change", list(EQUAL))
def test_what_the_key_leaves_out(change):
    a, b = EQUAL[change]
    assert key(**a) == key(**b)


def test_the_first_element_is_which_tensors_need_a_gradient():
    t, o = torch.zeros(4, 8, requires_grad=True), torch.zeros(8, requires_grad=True)
    assert key()[0] is None
    assert key(t=t)[0] == (True, False)
    assert key(o=o)[0] == (False, True)
    assert key(t=t, o=o)[0] == (True, True)
    assert key(t=t, o=None)[0] == (True, False)
    with torch.no_grad():
        assert key(t=t)[0] is None  # grad mode off: no gradients, whatever the tensors say
    args = base_args()
    assert PROBE.key(*(args[n] for n in ARGS), needs=(False, True))[0] == (False, True)  # a custom op says
    assert PROBE.needs(*(dict(args, t=t)[n] for n in ARGS)) == (True, False)
    assert PROBE.needs(*(args[n] for n in ARGS)) is None
    with torch.no_grad():
        assert PROBE.needs(*(dict(args, t=t)[n] for n in ARGS)) is None


def test_arguments_of_the_wrong_kind_make_no_key():
    assert key(t="not a tensor") is None
    assert key(o=3) is None
    assert key(s=object()) is None  # no spec
    args = base_args()
    assert PROBE.needs(*(dict(args, t="not a tensor")[n] for n in ARGS)) is None


def test_settings_are_in_the_key(monkeypatch):
    monkeypatch.delenv("FUSEDLORA_PLAN", raising=False)
    before = key()
    monkeypatch.setenv("FUSEDLORA_PLAN", "split")
    assert key() != before
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    assert key() != before
    assert settings(False) == (knobs.call_state(), None)
    assert settings(True) == (knobs.call_state(), specialization.fp32_precision())


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
def test_fp32_precision_is_in_the_key_of_float32_tensors_only():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        half = dict(t=zeros(4, 8, dtype=torch.float16), o=zeros(8, dtype=torch.float16))
        matmul.fp32_precision = "ieee"
        f32, f16, f16_f32 = key(), key(**half), key(t=half["t"])  # the optional's dtype is not consulted
        ieee = settings(True)
        matmul.fp32_precision = "tf32"
        assert key() != f32
        assert key(**half) == f16 and key(t=half["t"]) == f16_f32
        assert settings(True) != ieee
    finally:
        matmul.fp32_precision = before


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind 'tensr'"):
        Signature("bad", x="tensr")


def test_plan_cache_keeps_at_most_max_entries():
    cache = PlanCache(max_entries=2, register=False)
    assert cache.keep(None, "unkeyed") == "unkeyed" and not cache
    assert cache.keep("a", 1) == 1 and cache.keep("b", 2) == 2 and len(cache) == 2
    assert cache.keep("c", 3) == 3
    assert len(cache) <= 2 and cache["c"] == 3
    for k in "defgh":
        cache.keep(k, 0)
        assert len(cache) <= 2 and cache[k] == 0


def test_plan_caches_follow_configs_clear_caches():
    registered, private = PlanCache(), PlanCache(register=False)
    registered.keep("a", 1)
    private.keep("a", 1)
    try:
        configs.clear_caches(tables=False)
        assert not registered and private == {"a": 1}
    finally:
        configs.CLEAR_HOOKS.remove(registered.clear)
