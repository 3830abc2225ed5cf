"""The serving benchmark runs on CPU: tiny, through the kernels, the same tokens as PEFT, no throughput."""
import pathlib
import sys

import pytest
from conftest import CUDA

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import serve  # noqa: E402


@pytest.mark.skipif(CUDA, reason="on a GPU the benchmark is run for its numbers, not as a test")
def test_serving_benchmark_runs_tiny_on_cpu(capsys):
    assert serve.main([]) == 0
    out = capsys.readouterr().out
    assert "Throughput needs a GPU" in out and "tokens/s" not in out
    assert "identical in 100.0% of positions" in out
