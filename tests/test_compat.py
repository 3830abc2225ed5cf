"""The declared floors hold: CI's share of the version matrix (tests/compat/matrix.py --ci), and the
floors agreeing wherever they are written.

The matrix's CI rows: lora_linear and multi_lora_linear through the interpreter under the oldest Triton
minor setup.py admits, and the model-level PEFT-interop tests under the oldest peft and transformers.
Each builds a virtual environment under .ci/cache/compat (kept between runs) and downloads what it
lacks; without a package index the rows skip, except in CI (CI set in the environment). The whole
matrix, every admitted Triton minor and every PEFT-interop file, is run by hand (docs/testing.md).
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CUDA

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compat_matrix", ROOT / "tests" / "compat" / "matrix.py")
matrix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(matrix)


def test_the_floors_agree():
    from fusedlora.peft.patch import PEFT_FLOOR
    floors = matrix.floors()
    assert {"torch", "triton", "peft", "transformers"} <= set(floors), floors
    assert floors["peft"] == PEFT_FLOOR
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| peft, transformers"))
    assert f">= {floors['peft']}" in row and f">= {floors['transformers']}" in row, row
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| torch, triton"))
    assert f">= {floors['torch']}" in row and f">= {floors['triton']}" in row, row
    # transformers 5 (transformers.integrations.moe) is what the MoE work needs.
    assert int(floors["transformers"].split(".")[0]) >= 5


def test_floors_are_read_from_every_requirement(tmp_path):
    setup = tmp_path / "setup.py"
    setup.write_text('setup(install_requires=["torch>=2.11", "triton>=3.6,<4"], '
                     'extras_require={"x": ["peft>=0.18.0", "transformers[torch]>=5.3.0", "pytest"]})')
    assert matrix.floors(setup) == {"torch": "2.11", "triton": "3.6", "peft": "0.18.0", "transformers": "5.3.0"}
    setup.write_text('setup(install_requires=["peft>=0.18.0"], extras_require={"x": ["peft>=0.17"]})')
    with pytest.raises(ValueError, match="two floors for peft"):
        matrix.floors(setup)


def test_patch_peft_refuses_a_peft_older_than_the_floor(monkeypatch):
    import peft
    from torch import nn

    import fusedlora
    from fusedlora.peft.patch import PEFT_FLOOR, check_peft_version
    model = peft.get_peft_model(nn.Sequential(nn.Linear(8, 8)), peft.LoraConfig(r=2, target_modules=["0"]))
    monkeypatch.setattr(peft, "__version__", "0.17.1")
    with pytest.raises(ImportError, match=re.escape(f"patch_peft needs peft >= {PEFT_FLOOR}") + ".*0.17.1"):
        fusedlora.patch_peft(model)
    assert not any("forward" in vars(m) for m in model.modules())  # nothing patched
    check_peft_version(PEFT_FLOOR)  # the floor itself is accepted
    check_peft_version("0.21.2")


def _run_row(kind: str) -> str:
    # One pytest worker inside the row: the suite's own workers already share the machine.
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "compat" / "matrix.py"), "--ci", "--kinds", kind,
                           "--jobs", "1"], capture_output=True, text=True, timeout=1800)
    if proc.returncode == matrix.SETUP_FAILED and not os.environ.get("CI"):
        pytest.skip(f"the {kind} row's environment could not be built: {proc.stdout[-800:]}")
    summary = proc.stdout[proc.stdout.rfind("=== summary"):]
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert re.search(r"^ok +\S+ +[1-9]\d* passed, 0 failed, 0 errors", summary, re.M), summary
    return summary


@pytest.mark.skipif(CUDA, reason="the rows run the kernels in the interpreter")
def test_the_oldest_admitted_triton_runs_lora_linear_and_multi_lora_linear():
    summary = _run_row("triton")
    floor = matrix.floors()["triton"]
    assert re.search(rf"\| triton {re.escape(floor)}\.\d+ \|", summary), summary
    assert f"torch {torch.__version__}" in summary, summary


@pytest.mark.skipif(CUDA, reason="the rows run the kernels in the interpreter")
def test_the_oldest_peft_and_transformers_run_the_interop_tests():
    summary = _run_row("peft")
    floors = matrix.floors()
    assert f"| peft {floors['peft']} | transformers {floors['transformers']}" in summary, summary


def test_experts_below_their_floors_are_refused_or_left_to_peft(monkeypatch):
    """The installed releases serve experts (the suite's MoE tests run here); with transformers or peft
    reported older than fusedlora/modules/experts.py's EXPERTS_FLOORS, inject refuses the expert
    parameters and patch_peft leaves them to PEFT's forward, each naming the floor."""
    import peft
    import transformers
    from moe_models import TARGETS, peft_moe, tiny_moe, tokens

    import fusedlora
    from fusedlora.modules.experts import EXPERTS_FLOORS, LoRAExperts, versions_reason
    assert versions_reason(("transformers", "peft")) is None
    monkeypatch.setattr(transformers, "__version__", "5.5.0")
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ValueError, match=re.escape(f"needs transformers >= {EXPERTS_FLOORS['transformers']}")):
        fusedlora.inject(model, target_parameters=TARGETS)
    assert not any(isinstance(m, LoRAExperts) for m in model.modules())
    monkeypatch.setattr(transformers, "__version__", EXPERTS_FLOORS["transformers"])
    monkeypatch.setattr(peft, "__version__", "0.18.0")
    model = peft_moe("qwen3_moe")
    fusedlora.patch_peft(model)
    with pytest.warns(UserWarning, match=re.escape(f"needs peft >= {EXPERTS_FLOORS['peft']}")), torch.no_grad():
        model(input_ids=tokens(seed=1, batch=2))
