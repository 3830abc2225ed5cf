"""benchmarks/host.py runs, and each eager call launches the kernels its plan launches.

The benchmark measures Triton's GPU launch path on the CPU, so it runs in a subprocess without the
interpreter (the test session has it on). One repeat of one call: this checks counts, not speed."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import CUDA

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "host.py"

# Triton launches per call at these shapes (M = 16 single-adapter rows: the fused plan; M = 64 multi:
# the decode plan):
#   forward    one LoRA GEMM with the shrink in its K loop (S, and x·Wᵀ + b + S·Bᵀ)
#   backward   one launch (kernels/lora_backward.py: dX, dA and dB, with dU recomputed per column block)
#   lora_add   the forward's one launch without the base product, onto the base output
#   multi      the decode shrink, the decode GEMM (x·Wᵀ + b + each row's S·B_lᵀ); no library op; its
#              backward the same two for dX and dU, and a scan each for dA and dB
#   dora       W·Aᵀ for the row norms, the shrink, the LoRA GEMM with g in its epilogue; its backward
#              dU and GᵀS, dA, the recomputed x·Wᵀ for dm, the dX GEMM
EXPECTED = {
    "lora_linear, no grad": 1,
    "lora_linear, forward+backward, p=0.0": 2,
    "lora_linear, forward+backward, p=0.1": 2,
    "lora_add, no grad": 1,
    "multi_lora_linear, bare ids": 2,
    "multi_lora_linear, AdapterBatch": 2,
    "multi_lora_linear, forward+backward, AdapterBatch": 6,
    "dora_linear, no grad": 3,
    "dora_linear, forward+backward": 7,
    "multi_lora_linear, AdapterBatch, col_scale": 2,
    "AdapterPool layer, dora=False": 2,
    "AdapterPool layer, dora=True": 2,
    "PEFT LoRA Linear, unpatched": 0,
    "PEFT LoRA Linear, patch_peft": 1,
    "PEFT LoRA Linear, forward+backward, unpatched": 0,
    "PEFT LoRA Linear, forward+backward, patch_peft": 2,
    "nn.Linear + unfused LoRA (PEFT-style)": 0,
    "LoRALinear": 1,
}


def _run(tmp_path, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDLORA_BACKEND", "FUSEDLORA_PLAN")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env.update(extra_env or {})
    out = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--repeats", "1", "--calls", "1", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| lora_linear, no grad |" in proc.stdout
    return json.loads(out.read_text())


@pytest.mark.skipif(CUDA, reason="on a GPU, run benchmarks/host.py itself")
def test_host_bench_counts_the_planned_launches(tmp_path):
    result = _run(tmp_path)
    assert "cuLaunchKernel" in result["skipped"]
    launches = {row["name"]: row["launches"] for row in result["rows"]}
    assert launches == EXPECTED
    library = {row["name"]: row["library_ops"] for row in result["rows"]}
    assert library["lora_linear, no grad"] == 0 and library["multi_lora_linear, AdapterBatch"] == 0
    assert all(row["host_us"] > 0 for row in result["rows"]) and result["unit"]["host_us"] > 0
