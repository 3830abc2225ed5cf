"""The training-step benchmark runs on CPU: a tiny Llama, patched PEFT's loss and adapter gradients
checked against PEFT's and a float64 run, no timings."""
import pathlib
import sys

import pytest
from conftest import CUDA

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
