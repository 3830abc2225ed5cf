"""Every kernel variant the default plans choose on a GPU compiles for sm_90 within its limits (shared
memory, no spills, wgmma for the large GEMMs), checked on CPU: tests/gpu_compile.py --quick.

The interpreter cannot see what only the GPU compiler refuses; Triton's bundled ptxas can, without a
GPU. On a CUDA machine the other tests run the kernels for real, so this one is not needed there."""
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import CUDA


@pytest.mark.skipif(CUDA, reason="CUDA present: the kernel tests compile and run every variant")
def test_every_kernel_variant_compiles_for_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = pathlib.Path(__file__).with_name("gpu_compile.py")
    proc = subprocess.run([sys.executable, str(script), "--quick"], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "FAIL" not in proc.stdout
