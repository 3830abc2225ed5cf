"""One place that decides where the tests run.

Without CUDA the kernels run in the Triton interpreter, which must be switched on before triton is
first imported. The interpreter is then made to refuse tl.dot shapes the GPU refuses (K < 16),
so a kernel that only works on CPU fails here, not on the H100.
"""
import os
import random
import sys
from pathlib import Path

# `python -m pytest` puts the working directory on sys.path. From the repository root that makes its
# kernels/ folder (installed as fusedlora.kernels) importable as a top-level `kernels`, which shadows
# the PyPI package of that name: transformers imports it when it is installed (bitsandbytes 0.50
# brings it) and fails. The tests import the installed fusedlora, so the root has no business there.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA:
    assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1", \
        "triton was imported before tests/conftest.py could set TRITON_INTERPRET=1"
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

if not CUDA:
    interpreter.interpreter_builder.codegen_fns["min_dot_size"] = (
        lambda lhs, rhs: (1, 1, 32 if lhs.scalar.primitive_bitwidth == 8 else 16))

DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=("fused", "split", "decode"))
def plan(request, monkeypatch):
    """Runs a test under each value of FUSEDLORA_PLAN but auto (fusedlora/plans/planner.py: for the
    single-adapter op decode is the fused plan); without it the planner picks by shape."""
    monkeypatch.setenv("FUSEDLORA_PLAN", request.param)
    return request.param


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    """Every test goes through the kernels unless it sets FUSEDLORA_BACKEND itself."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")


@pytest.fixture(autouse=True)
def seeded_rngs():
    """Every test starts from the same global RNG state, whatever ran before it: inputs a test draws
    without its own generator do not depend on the order the tests run in."""
    random.seed(0)
    torch.manual_seed(0)


# Lines a test wants shown after the run whatever its outcome (tests/test_peft_suite.py's counts).
SUMMARY = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter, config):
    for line in config.stash.get(SUMMARY, []):
        terminalreporter.write_line(line)
