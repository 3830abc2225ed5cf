"""The tl.dot input precision the kernels choose (fusedlora.kernels.common.dot_precision), per dtype
combination and torch's TF32 setting. Compiled kernels only: the interpreter computes every dot in
IEEE fp32, so the choice is checked in a fresh process without TRITON_INTERPRET, where it is made as
on a GPU (no GPU is needed to make it)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fusedlora.kernels.common import dot_precision, interpreting

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
# (operand dtypes, low_rank, torch allows TF32) -> the choice. The base GEMM over fp32 follows torch's
# switch; a low-rank dot with an fp32 operand is never less precise than PEFT's fp32 matmul: tf32x3
# where one operand is half precision or TF32 is allowed, IEEE otherwise; half-precision operands only
# ever need tf32 (the setting is ignored for them).
CASES = [
    ((f32, f32), False, False, "ieee"),
    ((f32, f32), False, True, "tf32"),
    ((f32, f32), True, False, "ieee"),
    ((f32, f32), True, True, "tf32x3"),
    ((bf16, f32), True, False, "tf32x3"),
    ((bf16, f32), True, True, "tf32x3"),
    ((f16, f32), True, False, "tf32x3"),
    ((f32, f16), False, False, "tf32x3"),
    ((bf16, bf16), False, False, "tf32"),
    ((bf16, bf16), True, True, "tf32"),
    ((f16, f16), True, False, "tf32"),
]

PROBE = """
import json, sys, torch
from fusedlora.kernels.common import dot_precision, interpreting
assert not interpreting()
out = []
for dtypes, low_rank, tf32 in json.loads(sys.argv[1]):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    out.append(dot_precision(*(getattr(torch, d) for d in dtypes), low_rank=low_rank))
print(json.dumps(out))
"""


def test_dot_precision_per_dtype_and_tf32_setting():
    cases = [([str(d).removeprefix("torch.") for d in dtypes], low_rank, tf32) for dtypes, low_rank, tf32, _ in CASES]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    want = [case[-1] for case in CASES]
    wrong = [(case[:3], g, w) for case, g, w in zip(CASES, got, want) if g != w]
    assert not wrong, f"(dtypes, low_rank, allow_tf32), chosen, expected: {wrong}"


@pytest.mark.skipif(not interpreting(), reason="the interpreter's choice")
def test_interpreter_dots_are_ieee():
    assert {dot_precision(*dtypes, low_rank=low_rank) for dtypes, low_rank, _, _ in CASES} == {"ieee"}
