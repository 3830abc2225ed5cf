"""Every tile choice and planner threshold comes from kernels/configs.py: a GPU's table overrides the
defaults per kernel and shape bucket, the launchers launch what it says, and benchmarks/tune.py's
plumbing runs in the interpreter with two candidates per kernel."""
import json
import pathlib
import re
import sys

import pytest
import torch

from fusedlora.kernels import configs, lora_gemm
from fusedlora.plans import planner
from sm90 import record_launches

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_tile_size_or_threshold_outside_the_config_module():
    literal = re.compile(r"\b(BLOCK_[A-Z]+|num_warps|num_stages|GROUP_M|PROGRAMS_PER_SM|cap)\s*=\s*\d")
    for path in sorted((ROOT / "kernels").glob("*.py")):
        if path.name != "configs.py":
            hits = [line for line in path.read_text().splitlines() if literal.search(line)]
            assert not hits, f"{path.name}: {hits}"
    text = (ROOT / "fusedlora" / "plans" / "planner.py").read_text()
    assert re.search(r"^SPLIT_FROM_M = configs\.", text, re.M) and re.search(r"^MULTI_DECODE_MAX_M = configs\.", text, re.M)


def test_planner_thresholds_are_the_config_defaults():
    assert dict(planner.SPLIT_FROM_M) == configs.PLANNER["split_from_m"]
    assert planner.MULTI_DECODE_MAX_M == configs.PLANNER["multi_decode_max_m"] == configs.DECODE_MAX_ROWS


def test_a_gpu_table_overrides_the_defaults_per_bucket(tmp_path, monkeypatch):
    name = "Fake GPU 80GB"
    (tmp_path / "Fake_GPU_80GB.json").write_text(json.dumps(
        {"kernels": {"lora_gemm": {"8192": {"BLOCK_N": 256, "num_stages": 4}}}}))
    monkeypatch.setattr(configs, "TABLES", tmp_path)
    configs.clear_caches()
    try:
        default = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
        assert configs._choose("lora_gemm", name, 5000, default) == dict(default, BLOCK_N=256, num_stages=4)
        assert configs._choose("lora_gemm", name, 2048, default) == default  # another bucket
        assert configs._choose("lora_gemm", "", 8192, default) == default  # no table
        assert configs.bucket(1) == 1 and configs.bucket(65) == 128 and configs.bucket(8192) == 8192
    finally:
        configs.clear_caches()


def test_the_launcher_launches_the_configured_tiles():
    """An entry for the interpreter's table changes the launch (BLOCK_M 16 instead of 32)."""
    x, w = torch.randn(20, 64), torch.randn(48, 64)
    launch = lambda: lora_gemm.lora_gemm(x, w)  # noqa: E731
    (before,) = record_launches(launch, [lora_gemm._lora_gemm_kernel])
    entry = configs.table(configs.INTERPRETER).setdefault("kernels", {}).setdefault("lora_gemm", {})
    entry["32"] = dict(BLOCK_M=16)
    configs.clear_caches(tables=False)
    try:
        (after,) = record_launches(launch, [lora_gemm._lora_gemm_kernel])
    finally:
        entry.pop("32")
        configs.clear_caches(tables=False)
    assert before[2]["BLOCK_M"] == 32 and after[2]["BLOCK_M"] == 16


def test_tune_runs_in_the_interpreter_with_two_candidates(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import tune
    assert tune.main(["--dry-run", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "tune-cpu-check.jsonl").read_text().splitlines()]
    tried = {}
    for row in rows:
        if row["kind"] == "config":
            assert row["ok"] and row["ms"] is None, row
            tried.setdefault((row["kernel"], row["M"]), []).append(row["config"])
    assert set(k for k, _ in tried) == set(tune.CPU_CANDIDATES)
    assert all(len(cands) == 2 and cands[0] != cands[1] for cands in tried.values())
    assert {(row["plan"], row["direction"]) for row in rows if row["kind"] == "plan"} == \
        {(p, d) for p in ("fused", "split") for d in ("forward", "forward_backward")}
    table = json.loads((tmp_path / "cpu-check-configs.json").read_text())
    assert table["planner"] == configs.PLANNER and table["kernels"] == {}  # nothing timed: the defaults
    assert configs.table(configs.INTERPRETER).get("kernels", {}).get("lora_gemm", {}) == {}  # left as found
