"""Bad input is refused with an error that names the tensor and its shape, before any kernel runs."""
import pytest
import torch
from oracle import make_inputs

import fusedlora


def good(device):
    return dict(make_inputs(6, 16, 12, 4, torch.float32, device=device), scaling=1.0)


def call(args):
    return fusedlora.lora_linear(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("lora_A"),
                                 args.pop("lora_B"), **args)


BAD = [
    # (what to change, expected error, words the message must hold)
    (lambda a: a.update(weight=a["weight"][:, :8]), ValueError, ["weight", "(12, 8)", "K = x.shape[-1] = 16"]),
    (lambda a: a.update(lora_A=a["lora_A"][:, :8]), ValueError, ["lora_A", "(4, 8)"]),
    (lambda a: a.update(lora_B=a["lora_B"][:, :3]), ValueError, ["lora_B", "(12, 3)", "(12, 4)"]),
    (lambda a: a.update(bias=a["bias"][:5]), ValueError, ["bias", "(5,)", "(12,)"]),
    (lambda a: a.update(lora_A=a["lora_A"][:0], lora_B=a["lora_B"][:, :0]), ValueError, ["rank", "(0, 16)"]),
    (lambda a: a.update(x=a["x"].to(torch.int64)), TypeError, ["x", "torch.int64", "(6, 16)"]),
    (lambda a: a.update(lora_A=a["lora_A"].to(torch.int32)), TypeError, ["lora_A", "torch.int32"]),
    (lambda a: a.update(weight=a["weight"].half()), TypeError, ["weight", "torch.float16", "x's dtype"]),
    (lambda a: a.update(bias=a["bias"].double()), TypeError, ["bias", "float32, float16 or bfloat16"]),
    (lambda a: a.update(lora_B=a["lora_B"].half()), TypeError, ["lora_A", "lora_B", "share one dtype"]),
    (lambda a: a.update(x=a["x"].half(), weight=a["weight"].half(), bias=a["bias"].half(),
                        lora_A=a["lora_A"].bfloat16(), lora_B=a["lora_B"].bfloat16()),
     TypeError, ["torch.bfloat16", "torch.float16"]),
    (lambda a: a.update(x=a["x"][0, 0]), ValueError, ["x", "(*, K)"]),
    (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, ["weight", "device"]),
    (lambda a: a.update(x=a["x"].tolist()), TypeError, ["x", "torch.Tensor", "list"]),
    (lambda a: a.update(dropout_p=1.0), ValueError, ["dropout_p", "[0.0, 1.0)"]),
    (lambda a: a.update(dropout_p=-0.1), ValueError, ["dropout_p"]),
    (lambda a: a.update(scaling=float("nan")), ValueError, ["scaling", "finite"]),
    (lambda a: a.update(scaling="2"), TypeError, ["scaling", "str"]),
    (lambda a: a.update(dropout_p=0.1, seed=-1), ValueError, ["seed", "-1"]),
    (lambda a: a.update(dropout_p=0.1, seed=2**63), ValueError, ["seed"]),
    (lambda a: a.update(dropout_p=0.1, seed=torch.tensor([3])), ValueError, ["seed tensor", "0-d", "(1,)"]),
    (lambda a: a.update(dropout_p=0.1, seed=torch.tensor(3, dtype=torch.int32)), ValueError,
     ["seed tensor", "torch.int32"]),
    (lambda a: a.update(dropout_p=0.1, seed=torch.tensor(3.0)), ValueError, ["seed tensor", "torch.float32"]),
    (lambda a: a.update(dropout_p=0.1, seed=torch.tensor(3, device="meta")), ValueError,
     ["seed tensor", "meta"]),
]


class Launched(Exception):
    """Raised by the recording stubs: nothing after a launch runs."""


@pytest.fixture
def launches(monkeypatch):
    """Records launcher calls instead of running them."""
    import fusedlora.plans.single as plans
    from fusedlora.kernels import configs
    configs.clear_caches(tables=False)  # kept plans hold launchers bound before the stubs
    launched = []

    def stub(*args, _name, **kwargs):
        launched.append(_name)
        raise Launched(_name)

    for name in ("lora_shrink", "lora_gemm", "lora_gemm_shrink", "gemm_shrink_launcher", "lora_expand", "lora_dy"):
        monkeypatch.setattr(plans, name, lambda *a, _n=name, **k: stub(*a, _name=_n, **k))
    return launched


def test_launch_recorder_sees_a_good_call(launches, device):
    with pytest.raises(Launched):
        call(good(device))
    assert launches


@pytest.mark.parametrize("change,error,words", BAD)
def test_bad_input_is_named(change, error, words, device, launches):
    args = good(device)
    change(args)
    with pytest.raises(error) as info:
        call(args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
    assert not launches, "a kernel launcher ran before the error"


def test_triton_backend_on_cpu_without_interpreter_says_how(monkeypatch):
    import fusedlora.core.backend as backend
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.backend_for(torch.zeros(1))
