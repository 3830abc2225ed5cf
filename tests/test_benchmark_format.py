"""The benchmark's check path and its outputs: JSON schema, markdown, ratios, plot, and no timings
without a GPU. The path runs for real on tiny shapes (through the interpreter on CPU); only the
ratio, markdown and plot tests feed made-up timings to the formatting functions."""
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CUDA, DEVICE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dora_providers  # noqa: E402
import moe_providers  # noqa: E402
import multi_providers  # noqa: E402
import providers  # noqa: E402
import qlora_providers  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import suite  # noqa: E402

TINY = [(37, 70, 45, 3, "fp32")]
TIMING_KEYS = ("ms", "tflops", "ratio_to_base", "peak_mb", "host_us")
CASE_PROVIDERS = {**multi_providers.PROVIDERS, **dora_providers.PROVIDERS, **qlora_providers.PROVIDERS,
                  **moe_providers.PROVIDERS}


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """One untimed run of every case on one tiny shape, written out as a CPU run writes it."""
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSEDLORA_BACKEND", "triton")
        mp.setattr(suite, "CPU_GRID", TINY)
        rows, failures = suite.run_rows(suite.specs("cpu"), DEVICE, timed=False, log=lines.append)
    result = {**suite.header(None), "rows": rows}
    out = tmp_path_factory.mktemp("bench")
    messages = report.write(result, out, "cpu-check")
    return dict(rows=rows, failures=failures, lines=lines, out=out, messages=messages)


def test_every_provider_agrees_with_float64(checked):
    assert checked["failures"] == []  # each within twice the same-dtype reference's error
    assert all(math.isfinite(row["rel_err"]) for row in checked["rows"])
    expected = {(case, p) for case in suite.CASES if case not in suite.skipped()
                for p in CASE_PROVIDERS.get(case, providers.PROVIDERS)}
    assert {(row["case"], row["provider"]) for row in checked["rows"]} == expected
    assert len(checked["lines"]) == len(checked["rows"])  # one progress line per row


def test_json_schema_and_no_timings(checked):
    result = json.loads((checked["out"] / "cpu-check.json").read_text())
    assert tuple(result) == suite.HEADER_KEYS + ("rows",)
    assert result["gpu"] == suite.CPU_NAME and result["torch"] == torch.__version__
    assert result["rows"] == checked["rows"]
    for row in result["rows"]:
        assert tuple(row) == suite.ROW_KEYS + suite.EXTRA_KEYS
        assert all(row[key] is None for key in TIMING_KEYS), row
        lora = row["provider"] != "base"
        adapters = 3 if row["case"].startswith("multi") else 1
        assert (row["r"], row["adapters"]) == ((3, adapters) if lora else (None, None))
        assert (row["saved_mb"] is None) == (row["case"] in ("fwd", "multi_fwd", "dora_fwd", "qlora_fwd", "moe_fwd"))


def test_fusedlora_saves_less_than_peft_with_dropout(checked):
    saved = {(row["case"], row["provider"]): row["saved_mb"] for row in checked["rows"]}
    assert 0 < saved["train_mem", "fusedlora"] < saved["train_mem", "peft"]
    assert saved["train_mem", "base"] == 0  # frozen weights: the GEMMs keep nothing new for dX


def test_moe_training_keeps_at_most_half_of_peft(checked):
    """The issue's bound on the CPU size: LoRA on the experts keeps at most half of PEFT's saved-for-backward
    bytes (PEFT keeps W + ΔW of every expert); and the rule flags a row above it."""
    saved = {row["provider"]: row["saved_mb"] for row in checked["rows"] if row["case"] == "moe_fwd_bwd"}
    assert 0 < saved["fusedlora[torch]"] <= moe_providers.SAVED_SHARE * saved["peft"], saved
    spec = suite.Spec("moe_fwd_bwd", 37, 70, 45, 3, "fp32")
    rows = [suite.make_row(spec, "peft", saved_mb=1.0), suite.make_row(spec, "fusedlora[torch]", saved_mb=0.6)]
    assert len(suite.memory_failures(rows)) == 1
    rows[1]["saved_mb"] = 0.5
    assert suite.memory_failures(rows) == []


def test_cpu_markdown_says_no_timings(checked):
    text = (checked["out"] / "cpu-check.md").read_text()
    assert "No timings" in text
    assert text.index("## Headline") < text.index("## All rows")
    assert text.count("\n| fwd_bwd | ") == len(providers.PROVIDERS)
    assert not (checked["out"] / "cpu-check.png").exists()
    assert checked["messages"][-1] == "plot skipped: no timings to plot"


@pytest.mark.skipif(CUDA, reason="with CUDA, run.main times the headline grid")
def test_command_on_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suite, "CPU_GRID", TINY)
    monkeypatch.setattr(suite, "CASES", {"fwd": suite.CASES["fwd"]})
    assert run.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "No timings: they need a CUDA GPU" in out
    assert f"{len(providers.PROVIDERS)} of {len(providers.PROVIDERS)} provider checks agree" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu-check.json", "cpu-check.jsonl", "cpu-check.md"]


def test_a_wrong_provider_fails_its_check_and_is_not_timed(monkeypatch):
    def off_by_one_percent(x, weights, lora_As, lora_Bs, scaling, p):
        return providers.reference_stack(x, weights, lora_As, lora_Bs, scaling * 1.01, p)

    monkeypatch.setattr(providers, "fused_stack", off_by_one_percent)
    rows, failures = suite.run_rows([suite.Spec("fwd", *TINY[0])], DEVICE, timed=False, log=lambda line: None)
    fused = [p for p in providers.PROVIDERS if p.startswith("fusedlora")]  # the planner's choice and each plan
    assert len(failures) == len(fused) and all("fusedlora" in failure for failure in failures)
    assert all(row["rel_err"] > 1e-4 for row in rows if row["provider"] in fused)


def test_a_wrong_qlora_provider_fails_its_check(monkeypatch):
    """The QLoRA case's check over the dequantized weight catches the patched layers' scaling off by 1%,
    LoRA and DoRA, and passes the unchanged PEFT layers."""
    pytest.importorskip("bitsandbytes")

    def off_by_one_percent(case, spec, device, rotate=True):
        bench = qlora_providers.qlora_bench(case, spec, device, rotate)
        for name in ("fusedlora", "fusedlora_dora"):
            bench.models[name][0].scaling["default"] *= 1.01
        return bench

    monkeypatch.setitem(suite.CASES, "qlora_fwd_bwd", dataclasses.replace(suite.CASES["qlora_fwd_bwd"],
                                                                          build=off_by_one_percent))
    rows, failures = suite.run_rows([suite.Spec("qlora_fwd_bwd", *TINY[0])], DEVICE, timed=False,
                                    log=lambda line: None)
    assert len(failures) == 2 and all(" fusedlora" in failure for failure in failures), failures
    assert {row["provider"] for row in rows if row["rel_err"] > 1e-4} == {"fusedlora", "fusedlora_dora"}


def test_qlora_setup_that_is_not_peft_bnb_layer_fails_loudly():
    """A base PEFT does not wrap in its bnb LoRA layer (here a plain nn.Linear) is refused, not benchmarked
    as if it were QLoRA."""
    pytest.importorskip("bitsandbytes")
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    with pytest.raises(TypeError, match="not its bnb LoRA layer"):
        qlora_providers.peft_qlora_layer(torch.nn.Linear(8, 8, bias=False), A, B, 2.0)


NO_BITSANDBYTES = """
import sys
sys.modules["bitsandbytes"] = None  # `import bitsandbytes` raises ImportError, as where it is not installed
sys.path.insert(0, sys.argv[1])
import run, suite
assert not [s for size in ("headline", "full", "plans", "cpu") for s in suite.specs(size) if "qlora" in s.case]
suite.CASES = {name: case for name, case in suite.CASES.items() if name.startswith("qlora")}
sys.exit(run.main([]))
"""


@pytest.mark.skipif(CUDA, reason="with CUDA, run.main times rows")
def test_qlora_cases_are_skipped_with_a_message_without_bitsandbytes(tmp_path):
    bench_dir = str(Path(__file__).resolve().parents[1] / "benchmarks")
    done = subprocess.run([sys.executable, "-c", NO_BITSANDBYTES, bench_dir], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Skipped cases") == 1, done.stdout
    assert "Skipped cases qlora_fwd, qlora_fwd_bwd: bitsandbytes cannot be imported (" in done.stdout
    assert "0 of 0 provider checks agree" in done.stdout


def test_docs_name_every_case_in_order():
    """docs/benchmarks.md's `case` row lists suite.CASES, key by key."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    line = next(line for line in page.splitlines() if line.startswith("| `case` |"))
    documented = re.findall(r"`(\w+)`", line.split("|")[2])
    assert documented == list(suite.CASES)


def timed_rows():
    """Made-up timings in the shape of a GPU run: two M for one shape, the base GEMM at 2 ms."""
    rows = []
    for M in (16, 8192):
        spec = suite.Spec("fwd", M, 4096, 4096, 16, "bf16")
        for provider, ms in dict(base=2.0, peft=5.0, addmm=4.0, compile=3.0, fusedlora=2.5).items():
            rows.append(suite.make_row(spec, provider, ms=ms * M / 16, tflops=1.0, peak_mb=1.0, rel_err=1e-3))
    return rows


def test_ratio_to_base_matches_case_shape_and_dtype():
    rows = timed_rows()
    # No fp16 base row, and no fwd_bwd one: ratios stay empty rather than borrow another case's floor.
    rows.append(suite.make_row(suite.Spec("fwd", 16, 4096, 4096, 16, "fp16"), "fusedlora", ms=1.0))
    rows.append(suite.make_row(suite.Spec("fwd_bwd", 16, 4096, 4096, 16, "bf16"), "fusedlora", ms=1.0))
    suite.add_ratios(rows)
    ratios = {(row["M"], row["provider"], row["dtype"], row["case"]): row["ratio_to_base"] for row in rows}
    assert ratios[16, "base", "bf16", "fwd"] == 1.0
    assert ratios[16, "fusedlora", "bf16", "fwd"] == pytest.approx(1.25)
    assert ratios[8192, "peft", "bf16", "fwd"] == pytest.approx(2.5)
    assert ratios[16, "fusedlora", "fp16", "fwd"] is None
    assert ratios[16, "fusedlora", "bf16", "fwd_bwd"] is None
    untimed = [suite.make_row(suite.Spec("fwd", 16, 64, 64, 4, "fp32"), p) for p in ("base", "fusedlora")]
    assert [row["ratio_to_base"] for row in suite.add_ratios(untimed)] == [None, None]


def test_markdown_headline_first_with_overhead_and_speedups():
    rows = suite.add_ratios(timed_rows())
    text = report.markdown({**suite.header("NVIDIA H100 80GB HBM3"), "rows": rows})
    assert "No timings" not in text
    headline = text[text.index("## Headline"):text.index("## All rows")]
    line = next(line for line in headline.splitlines() if line.startswith("| 16 | 4096→4096 | 16 | bf16 |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[5:11] == ["2.0000", "2.5000", "+25.0%", "2.00×", "1.60×", "1.20×"]
    assert "speed-up over peft | speed-up over addmm | speed-up over compile" in headline
    assert text[text.index("## All rows"):].count("\n| fwd | ") == len(rows)


def test_plot_per_provider_or_a_clear_skip(tmp_path, monkeypatch):
    result = {**suite.header("test GPU"), "rows": suite.add_ratios(timed_rows())}
    pytest.importorskip("matplotlib")
    assert report.plot(result, tmp_path / "a.png") == f"wrote {tmp_path / 'a.png'}"
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert "matplotlib is not installed" in report.plot(result, tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists()


def test_grids_cover_the_issue():
    headline, full = suite.specs("headline"), suite.specs("full")
    assert set(suite.CASES) == {"fwd", "fwd_bwd", "train_mem", "multi_fwd", "multi_fwd_bwd", "dora_fwd",
                                "dora_fwd_bwd", "qlora_fwd", "qlora_fwd_bwd", "moe_fwd", "moe_fwd_bwd"}
    # Qwen3-30B-A3B's MoE layer (H = 2048, I = 768; E = 128, top-8 in moe_providers) at decode and prefill
    assert {(s.case, s.M, s.K, s.N, s.r) for s in headline if s.case.startswith("moe")} == {
        (case, M, 2048, 768, 16) for case in ("moe_fwd", "moe_fwd_bwd") for M in (16, 4096)}
    assert moe_providers.EXPERTS["cuda"] == (128, 8)
    assert {s.case for s in headline} == set(suite.CASES) - set(suite.skipped())
    assert set(suite.skipped()) <= {"qlora_fwd", "qlora_fwd_bwd"}  # bitsandbytes is optional
    if not suite.skipped():
        assert {(s.M, s.K, s.N) for s in headline if s.case.startswith("qlora")} == {(16, 4096, 4096),
                                                                                    (4096, 4096, 4096)}
    assert {(s.M, s.adapters) for s in headline if s.case == "multi_fwd"} == {(64, 64), (4096, 64)}
    assert {(s.M, s.adapters) for s in headline if s.case == "multi_fwd_bwd"} == {(4096, 4)}
    assert {s.adapters for s in full if s.case == "multi_fwd"} == {1, 8, 64}
    assert {s.dtype for s in headline} == {"bf16"}
    assert {(s.K, s.N) for s in full if not s.case.startswith("moe")} == {(4096, 4096), (4096, 14336), (14336, 4096),
                                                                        (8192, 8192), (8192, 28672)}
    assert {s.M for s in full if s.case == "fwd"} == {1, 16, 64, 256, 2048, 4096, 8192, 16384}
    assert {s.r for s in full if s.case == "fwd"} == {8, 16, 64, 128}
    assert {(s.K, s.N, s.r) for s in full if s.dtype == "fp16"} == {(4096, 4096, 16)}
    assert len(set(full)) == len(full)
    plans = suite.specs("plans")
    assert {s.case for s in plans} == {"fwd", "fwd_bwd"} and {s.r for s in plans} == {16}
    assert {s.M for s in plans} >= {16, 64, 128, 2048} and len(set(plans)) == len(plans)


def test_result_file_names():
    assert report.stem("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert report.stem("NVIDIA H200", "full") == "NVIDIA-H200-full"
    assert report.stem("NVIDIA H200", "plans") == "NVIDIA-H200-plans"


@pytest.mark.skipif(CUDA, reason="with CUDA, run.main --plans times the whole crossover grid")
def test_plans_run_checks_only_the_crossover_providers(tmp_path, monkeypatch, capsys):
    """`run.py --plans` checks fwd and fwd_bwd with base, addmm and fusedlora's plans only, and names
    its files <gpu>-plans.*."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    monkeypatch.setattr(suite, "CPU_GRID", TINY)
    assert run.main(["--plans", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "cpu-check-plans.json").read_text())["rows"]
    assert {(row["case"], row["provider"]) for row in rows} == \
        {(case, p) for case in suite.PLANS_CASES for p in suite.PLANS_PROVIDERS}
    assert "--plans needs a GPU" in capsys.readouterr().out


def test_unfused_provider_matches_reference():
    """The benchmark's Punica/vLLM-structured provider (fusedlora's segment kernels around a library
    GEMM) against the float64 reference, mixed ranks with NaN past each rank."""
    from oracle import check_multi_lora_linear
    from test_multi_lora import NAN, ids_for, make_multi
    inputs = make_multi(37, 70, 45, 4, 16, torch.bfloat16, torch.float32, ranks=[3, 16, 8, 1], device=DEVICE,
                        past_rank=NAN)
    ids = ids_for("unsorted", 37, 4, DEVICE)
    args = [inputs[n] for n in ("x", "weight", "bias", "lora_A", "lora_B", "scalings")]
    check_multi_lora_linear(multi_providers.multi_lora_linear_unfused(*args, ids, inputs["ranks"]), None, inputs, ids)
