"""The fast launch path (kernels/launch.py) launches what Triton's binder would, checked on CPU.

The check runs Triton's GPU launch path for sm_90 in a subprocess without the interpreter (the test
session has it on); see tests/fast_launch_check.py. On a CUDA machine the kernel tests run the fast
path for real, and again with FUSEDLORA_FAST_LAUNCH=0."""
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import CUDA


@pytest.mark.skipif(CUDA, reason="CUDA present: the kernel tests launch through the fast path for real")
def test_fast_launch_matches_tritons_binder():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDLORA_FAST_LAUNCH")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = pathlib.Path(__file__).with_name("fast_launch_check.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "FAIL" not in proc.stdout


def test_fast_launch_switch():
    from fusedlora.kernels import launch
    previous = launch.set_fast_launch(False)
    try:
        assert not launch.fast_launch()
        launch.set_fast_launch(True)
        assert launch.fast_launch() != launch.interpreting()
    finally:
        launch.set_fast_launch(previous)
