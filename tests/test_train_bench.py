"""The training-step benchmark runs on CPU: a tiny Llama, patched PEFT's loss and adapter gradients
checked against PEFT's and a float64 run, no timings."""
import pathlib
import sys

import pytest
from conftest import CUDA
from moe_models import needs_expert_floors

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import train  # noqa: E402


@pytest.mark.skipif(CUDA, reason="on a GPU the benchmark is run for its numbers, not as a test")
def test_training_benchmark_checks_on_cpu(capsys, tmp_path):
    assert train.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "patched PEFT vs PEFT" in out and " ok" in out and "ms/step" not in out
    written = list(tmp_path.glob("*-train.json"))
    assert len(written) == 1 and '"provider": "fusedlora"' in written[0].read_text()


@pytest.mark.skipif(CUDA, reason="on a GPU the benchmark is run for its numbers, not as a test")
def test_training_benchmark_with_dora_checks_on_cpu(capsys, tmp_path):
    """--dora: PEFT DoRA adapters on every linear layer, patched (served by dora_linear), train as PEFT's."""
    assert train.main(["--dora", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "patched PEFT vs PEFT" in out and " ok" in out
    written = list(tmp_path.glob("*-train.json"))
    assert len(written) == 1 and '"case": "train_step_dora_p0"' in written[0].read_text()


@pytest.mark.skipif(CUDA, reason="on a GPU the benchmark is run for its numbers, not as a test")
@needs_expert_floors
def test_training_benchmark_with_moe_checks_on_cpu(capsys, tmp_path, monkeypatch):
    """--moe: a tiny Qwen3-MoE with LoRA on every linear layer and on its expert parameters (target_parameters),
    patched, trains as PEFT's; the expert layers on fusedlora's PyTorch backend until the Triton MoE op is
    wired, and the row says so."""
    monkeypatch.setattr(train, "PROVIDERS", ("peft", "fusedlora"))
    assert train.main(["--moe", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "a tiny Qwen3-MoE" in out and "patched PEFT vs PEFT" in out and " ok" in out
    text = next(tmp_path.glob("*-train-moe.json")).read_text()
    assert '"case": "train_step_moe_p0"' in text and '"provider": "fusedlora"' in text
