"""PEFT's own tests as the judge of patch_peft: the LoRA tests of test_custom_models.py and
test_mixed.py from the installed peft version's sdist, run with every PEFT model patched
(tests/peft_suite/fusedlora_peft_plugin.py), kernels through the interpreter on CPU.

A test that fails patched is run again unpatched in the same process; it is a regression only if it
passes there. Tests that need the Hub fail fast on both runs (it points at a closed port, offline,
with an empty cache), so they cancel out instead of living on an allow-list.

The sdist is downloaded once with pip into ~/.cache/fusedlora (XDG_CACHE_HOME respected). Without
network the test skips, except in CI (CI set in the environment), where the check must run and a
failed download fails it.
"""
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from conftest import SUMMARY

HERE = Path(__file__).resolve().parent
VERSION = importlib.metadata.version("peft")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fusedlora"
TIMEOUT_S = 1200
# Floors that catch a run that silently stopped testing the fused path (with peft 0.21.2: 1816
# tests, of which 322 have a call served by the kernels; most of the others never call a patched layer).
MIN_TESTS, MIN_FUSED = 1200, 290


def _unavailable(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"PEFT's test suite is needed in CI: {why}")
    pytest.skip(f"PEFT's test suite is not available: {why}")


def peft_sdist_root() -> Path:
    """The unpacked peft-<version> sdist, its tests/ made a package (its modules import each other
    relatively, and the sdist leaves out tests/__init__.py)."""
    root = CACHE / f"peft-{VERSION}"
    if (root / "tests" / "__init__.py").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"peft=={VERSION}", "--no-binary", ":all:", "--no-deps",
               "-q", "-d", tmp]
        # pip reads the sdist's metadata; with the setuptools and wheel already installed that takes 4 s,
        # in a build environment it downloads first 45 s (measured), so the latter only when needed.
        for isolation in (["--no-build-isolation"], []):
            done = subprocess.run(cmd + isolation, capture_output=True, text=True, timeout=300)
            archives = list(Path(tmp).glob("peft-*.tar.gz"))
            if done.returncode == 0 and archives:
                break
        else:
            _unavailable(f"`{' '.join(cmd[2:])}` failed: {done.stderr.strip()[-500:]}")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        unpacked = Path(tmp) / f"peft-{VERSION}"
        (unpacked / "tests" / "__init__.py").touch()
        if not root.exists():
            unpacked.rename(root)  # one step, so that a reader never sees half an extraction
    return root


def run_peft_suite(root: Path, work: Path) -> dict:
    pytest.importorskip("parameterized", reason="PEFT's test_mixed.py needs parameterized (the test extra)")
    report = work / "report.json"
    ini = work / "pytest.ini"
    ini.write_text("[pytest]\n")  # not PEFT's pyproject options: they need pytest-cov
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE / "peft_suite"), os.environ.get("PYTHONPATH", "")]),
           "FUSEDLORA_PEFT_REPORT": str(report), "FUSEDLORA_BACKEND": "triton",
           "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(work / "hf")}
    cmd = [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(root), "-q", "-p", "no:cacheprovider",
           "-p", "fusedlora_peft_plugin", "-W", "ignore::DeprecationWarning", "-W", "ignore::FutureWarning",
           "tests/test_custom_models.py", "tests/test_mixed.py"]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(min(4, os.cpu_count() or 1))]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert report.exists(), f"the PEFT suite wrote no report (exit {done.returncode}):\n{done.stdout[-3000:]}"
    return json.loads(report.read_text())


def test_peft_lora_tests_pass_patched_wherever_they_pass_unpatched(tmp_path, request):
    result = run_peft_suite(peft_sdist_root(), tmp_path)
    lines = [f"PEFT {VERSION} suite, patched: {result['tests']} tests, {result['passed']} passed, "
             f"{result['skipped']} skipped, {result['failed_both']} failed patched and unpatched, "
             f"{len(result['by_design'])} differ by design, {len(result['regressions'])} regressions; "
             f"{result['fused']} tests had a call served by the kernels, {result['no_patched_call']} called no "
             "patched layer"]
    lines += [f"  by design: {test}: {why}" for test, why in sorted(result["by_design"].items())]
    lines += [f"  not fused, {n} tests: {reason}" for reason, n in sorted(result["not_fused"].items(),
                                                                         key=lambda kv: -kv[1])]
    request.config.stash.setdefault(SUMMARY, []).extend(lines)
    assert not result["regressions"], "fail patched, pass unpatched:\n" + "\n\n".join(
        f"{test}\n{error}" for test, error in result["regressions"].items())
    assert result["tests"] >= MIN_TESTS, lines[0]
    assert result["fused"] >= MIN_FUSED, lines[0]

