"""DDP and FSDP2 training of a model whose layers call fusedlora.lora_linear, in 2 CPU processes
with gloo, gives the single-process losses, gradients and parameters (tests/distributed_train.py).

Without CUDA the processes run the kernels through the Triton interpreter. On a CUDA machine they
stay on the CPU (one GPU cannot hold two NCCL ranks) and take the torch path: the interpreter of
the GPU machine's triton 3.6 breaks with its numpy (TRITON-NOTES.md).
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import CUDA
from distributed_train import single_process
from safetensors.torch import load_file

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_train.py")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One torchrun of 2 processes (about 10 s, mostly start-up) serves every test here."""
    out = tmp_path_factory.mktemp("dist") / "record.safetensors"
    env = dict(os.environ, FUSEDLORA_BACKEND="torch" if CUDA else "triton", CUDA_VISIBLE_DEVICES="")
    if not CUDA:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           WORKER, str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    report = f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    # The worker renames its record into place only once training is over, so a record that exists
    # is complete. torchrun's exit code alone would also fail the test for a worker that crashed on
    # its way out afterwards, which says nothing about the training under test.
    if not out.exists():
        pytest.fail(f"no record written; {report}")
    if done.returncode != 0:
        warnings.warn(f"the record is complete but a worker failed afterwards; {report}")
    return load_file(out)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_distributed_training_equals_single_process(wrapper, two_process_run, monkeypatch):
    """Exactly equal, not close: the two ranks' gradients are averaged by halving, which is exact in
    binary floating point, and sums of two terms do not depend on order."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch" if CUDA else "triton")
    reference = single_process()
    assert all(torch.isfinite(t).all() for t in reference.values()), "the reference run diverged"
    got = {key[len(wrapper) + 1:]: t for key, t in two_process_run.items() if key.startswith(wrapper + ".")}
    assert sorted(got) == sorted(reference)
    assert any(key.endswith("lora_A.grad") for key in got) and any(key.startswith("final.") for key in got)
    for key, want in reference.items():
        bad = got[key] != want
        assert not bad.any(), (f"{wrapper} {key}: {int(bad.sum())} of {bad.numel()} differ, the first at "
                               f"{tuple(bad.nonzero()[0].tolist())}: {got[key][bad][0].item()!r} vs "
                               f"single process {want[bad][0].item()!r}")
