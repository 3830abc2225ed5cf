"""Every kernel variant the default plans choose on a GPU compiles for sm_90 within its limits (shared
memory, no spills in a hot loop, wgmma for the large GEMMs), checked on CPU: tests/gpu_compile.py --quick.

The interpreter cannot see what only the GPU compiler refuses; Triton's bundled ptxas can, without a
GPU. On a CUDA machine the other tests run the kernels for real, so this one is not needed there."""
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import CUDA
from gpu_compile import hot_spills


@pytest.mark.skipif(CUDA, reason="CUDA present: the kernel tests compile and run every variant")
def test_every_kernel_variant_compiles_for_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = pathlib.Path(__file__).with_name("gpu_compile.py")
    proc = subprocess.run([sys.executable, str(script), "--quick"], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "FAIL" not in proc.stdout


def test_only_spills_in_innermost_loops_are_hot():
    """An outer loop (0x10-0x80) holds an inner one (0x30-0x50): only the load in the inner loop's body is
    hot. (The branch to itself at 0x90 is the trap after EXIT: a loop with no spill in it.)"""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R2 ;
        /*0020*/                   LDL R3, [R1] ;
        /*0030*/                   LDL R4, [R1+0x4] ;
        /*0040*/                   FFMA R5, R4, R4, R5 ;
        /*0050*/               @P0 BRA 0x30 ;
        /*0060*/                   STL [R1+0x4], R5 ;
        /*0070*/                   IADD3 R6, R6, 0x1, RZ ;
        /*0080*/              @!P1 BRA 0x10 ;
        /*0090*/                   BRA 0x90;
    """
    assert hot_spills(sass) == 1
    # With the inner branch forward, the outer loop is innermost: its four spill instructions are hot.
    assert hot_spills(sass.replace("@P0 BRA 0x30", "@P0 BRA 0x60")) == 4
    assert hot_spills(sass.replace("@!P1 BRA 0x10", "@!P1 BRA 0x90").replace("@P0 BRA 0x30", "@P0 BRA 0x60")) == 0
