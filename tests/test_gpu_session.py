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
    for name in ("versions", "benchmark", "host", "serve", "serve-dora", "train_moe", "serve_moe", "plans", "tune",
                 "train", "plain", "tests"):
        assert f"{name:10} exit   0" in summary, summary
    for stem in ("cpu-check", "cpu-check-plans", "serve-cpu-check", "serve-cpu-check-dora-rl", "cpu-check-train",
                 "cpu-check-train-moe",
                 "tune-cpu-check"):
        record = json.loads((tmp_path / f"{stem}.json").read_text())
        rows = [json.loads(line) for line in (tmp_path / f"{stem}.jsonl").read_text().splitlines()]
        assert rows and "partial" not in record, stem
    assert (tmp_path / "cpu-check.md").read_text().startswith("# fusedlora benchmark")
    assert "commit" in (tmp_path / "versions.txt").read_text()
    assert json.loads((tmp_path / "host.json").read_text())["rows"]


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
