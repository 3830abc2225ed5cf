"""The GPU session script without a GPU: its dry run takes every step through the interpreter at tiny
sizes, and a step stopped midway (as `timeout` stops it) leaves a valid partial record."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from conftest import CUDA

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(CUDA, reason="on a GPU the session script is run for its numbers")


def _env():
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1",
               FUSEDLORA_BACKEND="triton")
    env.pop("FUSEDLORA_PLAN", None)
    return env


def test_dry_run_takes_every_step(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--dry-run", str(tmp_path)],
                          env=_env(), capture_output=True, text=True, timeout=900)
    summary = proc.stdout[proc.stdout.rindex("=== summary"):]
    assert proc.returncode == 0, summary + proc.stderr[-3000:]
    for name in ("launch", "versions", "benchmark", "host", "serve", "serve-dora", "train_moe", "serve_moe", "plans",
                 "tune", "train", "plain", "tests"):
        assert f"{name:10} exit   0" in summary, summary
    assert "fast launch: the launch check passed" in summary, summary
    assert json.loads((tmp_path / "launch_check.json").read_text())["ok"]
    for stem in ("cpu-check", "cpu-check-plans", "serve-cpu-check", "serve-cpu-check-dora-rl", "cpu-check-train",
                 "cpu-check-train-moe", "tune-cpu-check"):
        record = json.loads((tmp_path / f"{stem}.json").read_text())
        rows = [json.loads(line) for line in (tmp_path / f"{stem}.jsonl").read_text().splitlines()]
        assert rows and "partial" not in record, stem
    assert (tmp_path / "cpu-check.md").read_text().startswith("# fusedlora benchmark")
    assert "commit" in (tmp_path / "versions.txt").read_text()
    assert json.loads((tmp_path / "host.json").read_text())["rows"]


def test_a_failed_launch_check_turns_the_fast_launch_off_for_every_later_step(tmp_path):
    """The launch check forced to a mismatch (its first kind only): the later steps run with
    FUSEDLORA_FAST_LAUNCH=0, in their processes too (versions.txt), and the summary says so. Three
    steps, not the whole dry run: ~1 min."""
    env = dict(_env(), FUSEDLORA_LAUNCH_CHECK_FORCE="mismatch", GPU_SESSION_STEPS="launch versions plain")
    env.pop("FUSEDLORA_FAST_LAUNCH", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--dry-run", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout
    summary = log[log.rindex("=== summary"):]
    assert proc.returncode == 1, summary + proc.stderr[-3000:]  # the failed check counts as a failed step
    assert f"{'launch':10} exit   1" in summary and f"{'versions':10} exit   0" in summary, summary
    assert "fast launch: OFF: the launch check failed (exit 1" in summary, summary
    assert "FUSEDLORA_FAST_LAUNCH=0" in (tmp_path / "versions.txt").read_text()
    assert "FUSEDLORA_FAST_LAUNCH=0): " in log.split("=== versions ")[1].splitlines()[0]
    assert "=== plain " not in log  # with every launch plain already, the plain rerun is skipped
    record = json.loads((tmp_path / "launch_check.json").read_text())
    assert not record["ok"] and record["force"] == "mismatch" and len(record["kinds"]) == 1
    assert "fast != plain: 1 of " in record["kinds"][0]["problems"][0]


def test_gpu_session_refuses_an_unknown_step(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--dry-run", str(tmp_path)],
                          env=dict(_env(), GPU_SESSION_STEPS="launch bench"), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "unknown step 'bench'" in proc.stderr, proc.stderr


def test_a_step_stopped_midway_leaves_a_valid_partial_record(tmp_path):
    """run.py under SIGTERM after its second row: the rows on the disk, and a JSON and markdown of them."""
    env = dict(_env(), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--dry-run", "--out", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    jsonl = tmp_path / "cpu-check.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "run.py finished before it could be stopped: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "partial record" in err
    lines = jsonl.read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line a whole row
    record = json.loads((tmp_path / "cpu-check.json").read_text())
    assert record["partial"] is True and len(rows) >= 2
    # The signal may land between a row's arrival and its line: the JSON then holds one row more.
    assert record["rows"][:len(rows)] == rows and len(record["rows"]) - len(rows) in (0, 1)
    assert rows[0]["provider"] == "base" and rows[0]["rel_err"] is not None
    text = (tmp_path / "cpu-check.md").read_text()
    assert text.startswith("**Partial record**") and "## All rows" in text
    assert text.count("\n| fwd_bwd | ") == len(record["rows"])
